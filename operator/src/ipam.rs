//! Tunnel address allocation.
//!
//! The record of which address belongs to whom is one Secret per tunnel network in the operator
//! namespace (`dmvpn-ipam-10-42-0-0-24`; data key = address, value = `hub/<name>` or
//! `spoke/<name>`). It is the single owner of a network's addresses: hubs that share a network
//! share the record, and every change is a patch that carries the resourceVersion it was
//! computed from, so concurrent writers (even two operator instances) can never hand out the
//! same address; a 409 means "re-read and try again". Within one process a per-network lock
//! keeps writers from racing each other needlessly.
//!
//! Allocation is deterministic: the lowest free host address of the network. A hub takes its
//! `spec.tunnelAddress` or else the first host address. Addresses are also written to the
//! objects' status; on a restart the record is read back, and an address found in a status but
//! missing from the record is re-claimed (so losing the record loses no assignment).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::Ipv4Net;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// Fewest host addresses a tunnel network must have: the hub and one spoke.
pub const MIN_HOSTS: u32 = 2;

/// Label on IPAM record secrets (value: the network, `10.42.0.0_24`).
pub const LABEL_IPAM_NETWORK: &str = "dmvpn.kube-dmvpn.io/ipam-network";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("tunnel network {network} has no free address left ({used} of {size} in use)")]
    Exhausted {
        network: Ipv4Net,
        used: usize,
        size: u32,
    },
    #[error("address {address} is already held by {holder}")]
    Taken { address: Ipv4Addr, holder: String },
    #[error("address {address} is not a host address of {network}")]
    OutOfNetwork { address: Ipv4Addr, network: Ipv4Net },
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("gave up after {0} resourceVersion conflicts")]
    Contended(u32),
}

/// Parses and checks a tunnel network: IPv4, host bits zero, room for a hub and a spoke.
/// The error says what is wrong, for a `Ready=False` message.
pub fn parse_network(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 network in CIDR form (e.g. 10.42.0.0/24)"))?;
    if net.network() != net.addr() {
        return Err(format!(
            "{s} has host bits set; use {}",
            Ipv4Net::new(net.network(), net.prefix_len()).unwrap_or(net)
        ));
    }
    let hosts = host_count(&net);
    if hosts < MIN_HOSTS {
        return Err(format!(
            "{s} has {hosts} host address(es); a tunnel network needs at least {MIN_HOSTS} (the hub and one spoke), use /30 or larger"
        ));
    }
    Ok(net)
}

/// Number of usable host addresses (no network or broadcast address below /31).
pub fn host_count(net: &Ipv4Net) -> u32 {
    match net.prefix_len() {
        32 => 1,
        31 => 2,
        p => (1u32 << (32 - u32::from(p))) - 2,
    }
}

/// The first host address: the default hub address.
pub fn first_host(net: &Ipv4Net) -> Option<Ipv4Addr> {
    net.hosts().next()
}

pub fn is_host(net: &Ipv4Net, a: Ipv4Addr) -> bool {
    net.contains(&a) && (net.prefix_len() >= 31 || (a != net.network() && a != net.broadcast()))
}

/// The lowest host address of `net` neither in `used` nor `reserved`.
pub fn lowest_free(
    net: &Ipv4Net,
    used: &BTreeMap<Ipv4Addr, String>,
    reserved: &BTreeSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    net.hosts()
        .find(|a| !used.contains_key(a) && !reserved.contains(a))
}

/// The record secret's name for a network.
pub fn record_name(net: &Ipv4Net) -> String {
    let o = net.network().octets();
    format!(
        "dmvpn-ipam-{}-{}-{}-{}-{}",
        o[0],
        o[1],
        o[2],
        o[3],
        net.prefix_len()
    )
}

/// Who holds an address, as written in the record.
pub fn holder(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

/// What to allocate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// The lowest free address.
    Any,
    /// This address (a hub's address, a spoke's static address, or one re-claimed from status).
    Exactly(Ipv4Addr),
    /// This address if free, else the lowest free one (re-claiming after a lost record).
    Prefer(Ipv4Addr),
}

/// Result of an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub address: Ipv4Addr,
    /// Whether the record changed (a new assignment).
    pub new: bool,
    /// Addresses in use in the network afterwards.
    pub used: usize,
}

#[derive(Default)]
struct NetState {
    /// The last record read or written: (resourceVersion, entries).
    cached: Option<(String, BTreeMap<Ipv4Addr, String>)>,
}

/// The allocator: per-network locks and cached records.
pub struct Ipam {
    api: Api<Secret>,
    nets: std::sync::Mutex<HashMap<Ipv4Net, Arc<Mutex<NetState>>>>,
    field_manager: String,
    /// Called on every resourceVersion conflict (for metrics).
    on_conflict: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Ipam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ipam").finish_non_exhaustive()
    }
}

const MAX_ATTEMPTS: u32 = 64;

fn decode(secret: &Secret) -> BTreeMap<Ipv4Addr, String> {
    secret
        .data
        .iter()
        .flatten()
        .filter_map(|(k, v)| {
            let a: Ipv4Addr = k.parse().ok()?;
            let h = String::from_utf8(v.0.clone()).ok()?;
            Some((a, h))
        })
        .collect()
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Ipam {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        on_conflict: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            nets: std::sync::Mutex::new(HashMap::new()),
            field_manager: "dmvpn-operator".to_owned(),
            on_conflict,
        }
    }

    fn net_state(&self, net: &Ipv4Net) -> Arc<Mutex<NetState>> {
        self.nets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(*net)
            .or_default()
            .clone()
    }

    /// Reads the record, creating an empty one if there is none.
    async fn load(&self, net: &Ipv4Net) -> Result<(String, BTreeMap<Ipv4Addr, String>), IpamError> {
        let name = record_name(net);
        loop {
            if let Some(s) = self.api.get_opt(&name).await? {
                let rv = s.metadata.resource_version.clone().unwrap_or_default();
                return Ok((rv, decode(&s)));
            }
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(
                        [
                            (
                                "app.kubernetes.io/managed-by".to_owned(),
                                dmvpn_crds::MANAGED_BY.to_owned(),
                            ),
                            (
                                LABEL_IPAM_NETWORK.to_owned(),
                                net.to_string().replace('/', "_"),
                            ),
                        ]
                        .into(),
                    ),
                    ..Default::default()
                },
                type_: Some("Opaque".to_owned()),
                data: Some(BTreeMap::new()),
                ..Default::default()
            };
            match self.api.create(&PostParams::default(), &secret).await {
                Ok(s) => {
                    let rv = s.metadata.resource_version.clone().unwrap_or_default();
                    return Ok((rv, BTreeMap::new()));
                }
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes `changes` (address → Some(holder) to set, None to remove) if the record is still
    /// at `rv`. Returns the new resourceVersion, or None on a conflict.
    async fn write(
        &self,
        net: &Ipv4Net,
        rv: &str,
        changes: &[(Ipv4Addr, Option<&str>)],
    ) -> Result<Option<String>, IpamError> {
        let data: serde_json::Map<String, Value> = changes
            .iter()
            .map(|(a, h)| {
                let v = match h {
                    Some(h) => json!(ByteString(h.as_bytes().to_vec())),
                    None => Value::Null,
                };
                (a.to_string(), v)
            })
            .collect();
        let patch = json!({"metadata": {"resourceVersion": rv}, "data": data});
        let pp = PatchParams {
            field_manager: Some(self.field_manager.clone()),
            ..Default::default()
        };
        match self
            .api
            .patch(&record_name(net), &pp, &Patch::Merge(&patch))
            .await
        {
            Ok(s) => Ok(Some(s.metadata.resource_version.unwrap_or_default())),
            Err(e) if is_conflict(&e) => {
                (self.on_conflict)();
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives `who` an address in `net` (the one it already holds, if any).
    pub async fn allocate(
        &self,
        net: &Ipv4Net,
        who: &str,
        want: Want,
    ) -> Result<Allocation, IpamError> {
        self.allocate_avoiding(net, who, want, &BTreeSet::new())
            .await
    }

    /// Like [`Ipam::allocate`], but a free pick (`Any`, `Prefer`) never lands on `reserved`
    /// (the hubs' addresses, which they may not have claimed yet).
    pub async fn allocate_avoiding(
        &self,
        net: &Ipv4Net,
        who: &str,
        want: Want,
        reserved: &BTreeSet<Ipv4Addr>,
    ) -> Result<Allocation, IpamError> {
        let state = self.net_state(net);
        let mut state = state.lock().await;
        for _ in 0..MAX_ATTEMPTS {
            let (rv, entries) = match state.cached.take() {
                Some(c) => c,
                None => self.load(net).await?,
            };
            let held: Vec<Ipv4Addr> = entries
                .iter()
                .filter(|(_, h)| h.as_str() == who)
                .map(|(a, _)| *a)
                .collect();
            let exact = match &want {
                Want::Exactly(a) => Some(*a),
                _ => None,
            };
            // Already holding the wanted address (or any address when any will do): done.
            if let Some(a) = held.iter().copied().find(|a| exact.is_none_or(|w| w == *a)) {
                let used = entries.len();
                state.cached = Some((rv, entries));
                return Ok(Allocation {
                    address: a,
                    new: false,
                    used,
                });
            }
            let pick = match &want {
                Want::Exactly(a) => {
                    if !is_host(net, *a) {
                        state.cached = Some((rv, entries));
                        return Err(IpamError::OutOfNetwork {
                            address: *a,
                            network: *net,
                        });
                    }
                    if let Some(h) = entries.get(a) {
                        let holder = h.clone();
                        state.cached = Some((rv, entries));
                        return Err(IpamError::Taken {
                            address: *a,
                            holder,
                        });
                    }
                    *a
                }
                Want::Prefer(a)
                    if is_host(net, *a) && !entries.contains_key(a) && !reserved.contains(a) =>
                {
                    *a
                }
                _ => match lowest_free(net, &entries, reserved) {
                    Some(a) => a,
                    None => {
                        let used = entries.len();
                        state.cached = Some((rv, entries));
                        return Err(IpamError::Exhausted {
                            network: *net,
                            used,
                            size: host_count(net),
                        });
                    }
                },
            };
            // A holder has one address per network: drop any other it held (a changed
            // static address).
            let mut changes: Vec<(Ipv4Addr, Option<&str>)> =
                held.iter().map(|a| (*a, None)).collect();
            changes.push((pick, Some(who)));
            match self.write(net, &rv, &changes).await? {
                Some(new_rv) => {
                    let mut entries = entries;
                    for a in &held {
                        entries.remove(a);
                    }
                    entries.insert(pick, who.to_owned());
                    let used = entries.len();
                    state.cached = Some((new_rv, entries));
                    return Ok(Allocation {
                        address: pick,
                        new: true,
                        used,
                    });
                }
                None => state.cached = None,
            }
        }
        Err(IpamError::Contended(MAX_ATTEMPTS))
    }

    /// Releases every address `who` holds in `net`. Returns how many are left in use.
    pub async fn release(&self, net: &Ipv4Net, who: &str) -> Result<usize, IpamError> {
        let state = self.net_state(net);
        let mut state = state.lock().await;
        for _ in 0..MAX_ATTEMPTS {
            let (rv, mut entries) = match state.cached.take() {
                Some(c) => c,
                None => self.load(net).await?,
            };
            let held: Vec<Ipv4Addr> = entries
                .iter()
                .filter(|(_, h)| h.as_str() == who)
                .map(|(a, _)| *a)
                .collect();
            if held.is_empty() {
                let used = entries.len();
                state.cached = Some((rv, entries));
                return Ok(used);
            }
            let changes: Vec<(Ipv4Addr, Option<&str>)> = held.iter().map(|a| (*a, None)).collect();
            if let Some(new_rv) = self.write(net, &rv, &changes).await? {
                for a in &held {
                    entries.remove(a);
                }
                let used = entries.len();
                state.cached = Some((new_rv, entries));
                return Ok(used);
            }
        }
        Err(IpamError::Contended(MAX_ATTEMPTS))
    }

    /// The current record of a network (fresh read).
    pub async fn entries(&self, net: &Ipv4Net) -> Result<BTreeMap<Ipv4Addr, String>, IpamError> {
        let state = self.net_state(net);
        let mut state = state.lock().await;
        let (rv, entries) = self.load(net).await?;
        state.cached = Some((rv, entries.clone()));
        Ok(entries)
    }
}

/// Parses an address from status or spec.
pub fn parse_addr(s: &str) -> Option<Ipv4Addr> {
    s.parse().ok()
}

/// `IpAddr` form for certificates.
pub fn ip(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_checks() {
        assert!(parse_network("10.42.0.0/24").is_ok());
        assert!(parse_network("10.42.0.0/30").is_ok());
        let e = parse_network("10.42.0.0/32").unwrap_err();
        assert!(e.contains("at least 2"), "{e}");
        let e = parse_network("10.42.0.1/24").unwrap_err();
        assert!(e.contains("10.42.0.0/24"), "{e}");
        assert!(parse_network("fd00::/64").is_err());
        assert_eq!(host_count(&"10.0.0.0/24".parse().unwrap()), 254);
        assert_eq!(host_count(&"10.0.0.0/31".parse().unwrap()), 2);
    }

    #[test]
    fn lowest_free_skips_used_and_special() {
        let net: Ipv4Net = "10.42.0.0/29".parse().unwrap();
        let mut used = BTreeMap::new();
        let none = BTreeSet::new();
        assert_eq!(
            lowest_free(&net, &used, &none),
            Some("10.42.0.1".parse().unwrap())
        );
        let hub: BTreeSet<Ipv4Addr> = ["10.42.0.1".parse().unwrap()].into();
        assert_eq!(
            lowest_free(&net, &used, &hub),
            Some("10.42.0.2".parse().unwrap())
        );
        used.insert("10.42.0.1".parse().unwrap(), "hub/a".to_owned());
        used.insert("10.42.0.3".parse().unwrap(), "spoke/b".to_owned());
        assert_eq!(
            lowest_free(&net, &used, &none),
            Some("10.42.0.2".parse().unwrap())
        );
        for i in 2..=6 {
            used.insert(Ipv4Addr::new(10, 42, 0, i), format!("spoke/{i}"));
        }
        assert_eq!(
            lowest_free(&net, &used, &none),
            None,
            "broadcast .7 is not handed out"
        );
        assert!(!is_host(&net, "10.42.0.0".parse().unwrap()));
        assert!(!is_host(&net, "10.42.0.7".parse().unwrap()));
        assert_eq!(record_name(&net), "dmvpn-ipam-10-42-0-0-29");
    }
}
