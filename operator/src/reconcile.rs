//! The DmvpnHub and DmvpnSpoke reconcilers.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dmvpn_crds::conditions::{
    self, ConditionStatus, HUB_READY_REQUIRES, SPOKE_READY_REQUIRES, reasons, types,
};
use dmvpn_crds::{
    CertificateStatus, DmvpnHub, DmvpnHubStatus, DmvpnSpoke, DmvpnSpokeStatus, NodeSelection,
    NodeSelectionMode, PrefixSource,
};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::certs::{self, CertAction, CertError};
use crate::context::Context;
use crate::ipam::{self, IpamError, Want};
use crate::metrics::{ErrorLabels, HubLabel, KindLabel};
use crate::pki::{Identity, IdentityKind};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error("could not serialize status: {0}")]
    Serialize(#[from] serde_json::Error),
}

impl Error {
    /// A bounded label for metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(_) => "kube",
            Error::Cert(CertError::Conflict(_)) => "conflict",
            Error::Cert(_) => "certificate",
            Error::Ipam(_) => "ipam",
            Error::Serialize(_) => "internal",
        }
    }
}

pub(crate) const HUB: &str = "hub";
pub(crate) const SPOKE: &str = "spoke";

fn to_time(t: SystemTime) -> Option<Time> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    let secs = i64::try_from(d.as_secs()).ok()?;
    Timestamp::from_second(secs).ok().map(Time)
}

fn now_time(ctx: &Context) -> Time {
    to_time(ctx.settings.clock.now()).unwrap_or_else(conditions::now)
}

fn cond(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    conditions::new_condition(type_, status, reason, message, generation, now.clone())
}

/// Adds our finalizer (with a resourceVersion precondition). Returns the updated object.
async fn ensure_finalizer<K>(api: &Api<K>, obj: &K) -> Result<Option<K>, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    if obj
        .finalizers()
        .iter()
        .any(|f| f == dmvpn_crds::FINALIZER_ADDRESS)
    {
        return Ok(None);
    }
    let mut fins: Vec<String> = obj.finalizers().to_vec();
    fins.push(dmvpn_crds::FINALIZER_ADDRESS.to_owned());
    let patch = json!({"metadata": {
        "finalizers": fins,
        "resourceVersion": obj.resource_version(),
    }});
    let updated = api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(Some(updated))
}

async fn remove_finalizer<K>(api: &Api<K>, obj: &K) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let fins: Vec<&String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != dmvpn_crds::FINALIZER_ADDRESS)
        .collect();
    let patch = json!({"metadata": {
        "finalizers": if fins.is_empty() { Value::Null } else { json!(fins) },
        "resourceVersion": obj.resource_version(),
    }});
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A merge patch that turns `old` into `new`: changed fields set, vanished top-level fields
/// nulled (a merge patch keeps what it does not mention).
fn status_patch<S: Serialize>(old: Option<&S>, new: &S) -> Result<Value, serde_json::Error> {
    let mut new_v = serde_json::to_value(new)?;
    if let (Some(old), Some(obj)) = (old, new_v.as_object_mut()) {
        let old_v = serde_json::to_value(old)?;
        if let Some(old_obj) = old_v.as_object() {
            for k in old_obj.keys() {
                if !obj.contains_key(k) {
                    obj.insert(k.clone(), Value::Null);
                }
            }
        }
    }
    Ok(new_v)
}

async fn write_status<K, S>(api: &Api<K>, obj: &K, old: Option<&S>, new: &S) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if old == Some(new) {
        return Ok(());
    }
    let patch = json!({
        "metadata": {"resourceVersion": obj.resource_version()},
        "status": status_patch(old, new)?,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// One event per condition whose status changed.
async fn transition_events<K>(ctx: &Context, obj: &K, old: &[Condition], new: &[Condition])
where
    K: Resource<DynamicType = ()>,
{
    for c in new {
        let before = conditions::find_condition(old, &c.type_);
        if before.is_some_and(|b| b.status == c.status && b.reason == c.reason) {
            continue;
        }
        let warning = c.status == "False";
        ctx.event(
            obj,
            warning,
            &c.reason,
            &format!("Set{}", c.type_),
            format!("{} is {}: {}", c.type_, c.status, c.message),
        )
        .await;
    }
}

fn cert_status(secret_name: &str, info: &crate::pki::CertInfo) -> CertificateStatus {
    CertificateStatus {
        secret_name: secret_name.to_owned(),
        not_after: to_time(info.not_after),
        renew_after: to_time(info.renew_at()),
        serial_number: Some(info.serial.clone()),
    }
}

/// How long until `t` (at least a second, at most the resync period).
fn until(ctx: &Context, t: SystemTime) -> Duration {
    let now = ctx.settings.clock.now();
    t.duration_since(now)
        .unwrap_or_default()
        .clamp(Duration::from_secs(1), ctx.settings.resync)
}

/// The address a hub uses in its network: its spec address or the first host address.
fn hub_address(hub: &DmvpnHub, net: &Ipv4Net) -> Result<Ipv4Addr, String> {
    match hub.spec.tunnel_address.as_deref() {
        Some(a) => {
            let addr: Ipv4Addr = a
                .parse()
                .map_err(|_| format!("spec.tunnelAddress: {a:?} is not an IPv4 address"))?;
            if !ipam::is_host(net, addr) {
                return Err(format!(
                    "spec.tunnelAddress: {addr} is not a host address of spec.tunnelNetwork {net}"
                ));
            }
            Ok(addr)
        }
        None => ipam::first_host(net)
            .ok_or_else(|| format!("spec.tunnelNetwork: {net} has no host address")),
    }
}

/// Addresses spokes must never get: those of every hub in the network.
fn hub_reserved(ctx: &Context, net: &Ipv4Net) -> BTreeSet<Ipv4Addr> {
    ctx.hubs
        .state()
        .iter()
        .filter(|h| ipam::parse_network(&h.spec.tunnel_network).ok().as_ref() == Some(net))
        .filter_map(|h| hub_address(h, net).ok())
        .collect()
}

fn node_matches(sel: &NodeSelection, node: &Node) -> bool {
    match sel.mode {
        NodeSelectionMode::All => true,
        NodeSelectionMode::Selector => {
            let Some(ls) = sel.selector.clone() else {
                return false;
            };
            let Ok(selector) = Selector::try_from(ls) else {
                return false;
            };
            let labels = node.metadata.labels.clone().unwrap_or_default();
            selector.matches(&labels)
        }
    }
}

fn node_pod_cidrs(nodes: &[Arc<Node>]) -> Vec<Ipv4Net> {
    let mut out: Vec<Ipv4Net> = nodes
        .iter()
        .filter_map(|n| n.spec.as_ref())
        .flat_map(|s| {
            s.pod_cidrs
                .clone()
                .unwrap_or_default()
                .into_iter()
                .chain(s.pod_cidr.clone())
        })
        .filter_map(|c| c.parse::<Ipv4Net>().ok())
        .map(|n| n.trunc())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The prefixes a spoke registers, or a message naming the bad field.
fn site_prefixes(spoke: &DmvpnSpoke, nodes: &[Arc<Node>]) -> Result<Vec<Ipv4Net>, String> {
    match spoke.spec.site_prefixes.source {
        PrefixSource::NodePodCIDRs => Ok(node_pod_cidrs(nodes)),
        PrefixSource::Static => {
            let list = spoke
                .spec
                .site_prefixes
                .prefixes
                .clone()
                .unwrap_or_default();
            let mut out = Vec::new();
            for (i, p) in list.iter().enumerate() {
                let net: Ipv4Net = p.parse().map_err(|_| {
                    format!("spec.sitePrefixes.prefixes[{i}]: {p:?} is not an IPv4 CIDR")
                })?;
                out.push(net);
            }
            Ok(out)
        }
    }
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Whether `a` was there first (older, then name order): the older spoke keeps its prefixes.
fn precedes(a: &DmvpnSpoke, b: &DmvpnSpoke) -> bool {
    let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
    (ta, a.name_any()) < (tb, b.name_any())
}

// ---------------------------------------------------------------------------------------------
// DmvpnHub

pub async fn reconcile_hub(hub: Arc<DmvpnHub>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics
        .reconciliations
        .get_or_create(&KindLabel { kind: HUB })
        .inc();
    let name = hub.name_any();
    let holder = ipam::holder(HUB, &name);
    let secret_name = dmvpn_crds::hub_certificate_secret_name(&name);

    if hub.metadata.deletion_timestamp.is_some() {
        if let Ok(net) = ipam::parse_network(&hub.spec.tunnel_network) {
            let used = ctx.ipam.release(&net, &holder).await?;
            ctx.metrics
                .addresses_allocated
                .get_or_create(&HubLabel { hub: name.clone() })
                .set(i64::try_from(used).unwrap_or(i64::MAX));
        }
        ctx.metrics
            .addresses_allocated
            .remove(&HubLabel { hub: name.clone() });
        certs::delete_secret(&ctx.secrets, &secret_name).await?;
        ctx.event(
            &*hub,
            false,
            "AddressReleased",
            "Delete",
            format!(
                "released the tunnel address of DmvpnHub {name} and deleted secret {secret_name}"
            ),
        )
        .await;
        remove_finalizer(&ctx.hubs_api, &*hub).await?;
        return Ok(Action::await_change());
    }

    let hub: Arc<DmvpnHub> = match ensure_finalizer(&ctx.hubs_api, &*hub).await? {
        Some(h) => Arc::new(h),
        None => hub,
    };
    let now = now_time(&ctx);
    let gen_ = hub.metadata.generation;
    let old_status = hub.status.clone();
    let mut status = old_status.clone().unwrap_or_default();
    let mut conds = status.conditions.clone();
    let mut requeue = ctx.settings.resync;

    // Address.
    let mut address: Option<Ipv4Addr> = None;
    match ipam::parse_network(&hub.spec.tunnel_network)
        .map_err(|e| format!("spec.tunnelNetwork: {e}"))
        .and_then(|net| hub_address(&hub, &net).map(|a| (net, a)))
    {
        Err(msg) => {
            conditions::set_condition(
                &mut conds,
                cond(
                    types::ADDRESS_ASSIGNED,
                    ConditionStatus::False,
                    reasons::INVALID_SPEC,
                    msg,
                    gen_,
                    &now,
                ),
            );
        }
        Ok((net, want)) => match ctx.ipam.allocate(&net, &holder, Want::Exactly(want)).await {
            Ok(a) => {
                address = Some(a.address);
                ctx.metrics
                    .addresses_allocated
                    .get_or_create(&HubLabel { hub: name.clone() })
                    .set(i64::try_from(a.used).unwrap_or(i64::MAX));
                let reason = if hub.spec.tunnel_address.is_some() {
                    reasons::ADDRESS_STATIC
                } else {
                    reasons::ADDRESS_ALLOCATED
                };
                conditions::set_condition(
                    &mut conds,
                    cond(
                        types::ADDRESS_ASSIGNED,
                        ConditionStatus::True,
                        reason,
                        format!("tunnel address {}/{}", a.address, net.prefix_len()),
                        gen_,
                        &now,
                    ),
                );
            }
            Err(IpamError::Taken { address, holder }) => {
                conditions::set_condition(
                    &mut conds,
                    cond(
                        types::ADDRESS_ASSIGNED,
                        ConditionStatus::False,
                        reasons::ADDRESS_CONFLICT,
                        format!(
                            "spec.tunnelAddress: {address} is already held by {holder}; give this hub a distinct spec.tunnelAddress"
                        ),
                        gen_,
                        &now,
                    ),
                );
            }
            Err(IpamError::OutOfNetwork { address, network }) => {
                conditions::set_condition(
                    &mut conds,
                    cond(
                        types::ADDRESS_ASSIGNED,
                        ConditionStatus::False,
                        reasons::INVALID_SPEC,
                        format!("spec.tunnelAddress: {address} is not a host address of {network}"),
                        gen_,
                        &now,
                    ),
                );
            }
            Err(e) => return Err(e.into()),
        },
    }
    status.tunnel_address = address.map(|a| a.to_string());

    // Endpoint.
    let endpoint = &hub.spec.endpoint;
    match (&endpoint.addresses, &endpoint.service) {
        (Some(addrs), _) if !addrs.is_empty() => {
            status.nbma_addresses = addrs.clone();
            conditions::set_condition(
                &mut conds,
                cond(
                    types::ENDPOINT_READY,
                    ConditionStatus::True,
                    reasons::STATIC_ADDRESSES,
                    format!("NBMA addresses {}", addrs.join(", ")),
                    gen_,
                    &now,
                ),
            );
        }
        (_, Some(svc)) => match ctx.services.get_opt(&svc.name).await? {
            None => {
                status.nbma_addresses.clear();
                requeue = requeue.min(Duration::from_secs(30));
                conditions::set_condition(
                    &mut conds,
                    cond(
                        types::ENDPOINT_READY,
                        ConditionStatus::False,
                        reasons::SERVICE_NOT_FOUND,
                        format!(
                            "spec.endpoint.service.name: Service {:?} not found in namespace {}",
                            svc.name, ctx.settings.namespace
                        ),
                        gen_,
                        &now,
                    ),
                );
            }
            Some(s) => {
                let ips: Vec<String> = s
                    .status
                    .and_then(|st| st.load_balancer)
                    .and_then(|lb| lb.ingress)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|i| i.ip)
                    .filter(|ip| ip.parse::<Ipv4Addr>().is_ok())
                    .take(4)
                    .collect();
                if ips.is_empty() {
                    status.nbma_addresses.clear();
                    requeue = requeue.min(Duration::from_secs(30));
                    conditions::set_condition(
                        &mut conds,
                        cond(
                            types::ENDPOINT_READY,
                            ConditionStatus::False,
                            reasons::SERVICE_ADDRESS_PENDING,
                            format!("Service {} has no IPv4 load-balancer address yet", svc.name),
                            gen_,
                            &now,
                        ),
                    );
                } else {
                    conditions::set_condition(
                        &mut conds,
                        cond(
                            types::ENDPOINT_READY,
                            ConditionStatus::True,
                            reasons::SERVICE_ADDRESS,
                            format!(
                                "NBMA addresses {} from Service {}",
                                ips.join(", "),
                                svc.name
                            ),
                            gen_,
                            &now,
                        ),
                    );
                    status.nbma_addresses = ips;
                }
            }
        },
        _ => {
            status.nbma_addresses.clear();
            conditions::set_condition(
                &mut conds,
                cond(
                    types::ENDPOINT_READY,
                    ConditionStatus::False,
                    reasons::INVALID_SPEC,
                    "spec.endpoint: set endpoint.addresses or endpoint.service",
                    gen_,
                    &now,
                ),
            );
        }
    }

    // Certificate.
    let cert = site_certificate(
        &ctx,
        &*hub,
        IdentityKind::Hub,
        address,
        &secret_name,
        &mut conds,
        gen_,
        &now,
    )
    .await?;
    if let Some(c) = &cert {
        status.certificate = Some(cert_status(&secret_name, c));
        requeue = requeue.min(until(&ctx, c.renew_at()));
    }

    conditions::set_ready(&mut conds, HUB_READY_REQUIRES, gen_, now.clone());
    transition_events(&ctx, &*hub, &status.conditions, &conds).await;
    status.conditions = conds;
    status.observed_generation = gen_;
    write_status::<DmvpnHub, DmvpnHubStatus>(&ctx.hubs_api, &hub, old_status.as_ref(), &status)
        .await?;
    Ok(Action::requeue(requeue))
}

/// Issues or renews the certificate of a site; sets `CertificateReady`.
#[allow(clippy::too_many_arguments)]
async fn site_certificate<K>(
    ctx: &Context,
    obj: &K,
    kind: IdentityKind,
    address: Option<Ipv4Addr>,
    secret_name: &str,
    conds: &mut Vec<Condition>,
    gen_: Option<i64>,
    now: &Time,
) -> Result<Option<crate::pki::CertInfo>, Error>
where
    K: Resource<DynamicType = ()>,
{
    let Some(address) = address else {
        conditions::set_condition(
            conds,
            cond(
                types::CERTIFICATE_READY,
                ConditionStatus::False,
                reasons::WAITING_FOR_ADDRESS,
                "the certificate carries the tunnel address, which is not assigned",
                gen_,
                now,
            ),
        );
        return Ok(None);
    };
    let clock_now = ctx.settings.clock.now();
    let ca = match ctx.ca.current(clock_now).await {
        Ok(ca) => ca,
        Err(CertError::Kube(e)) => return Err(e.into()),
        Err(e) => {
            conditions::set_condition(
                conds,
                cond(
                    types::CERTIFICATE_READY,
                    ConditionStatus::False,
                    reasons::CA_NOT_READY,
                    e.to_string(),
                    gen_,
                    now,
                ),
            );
            return Ok(None);
        }
    };
    let name = obj.meta().name.clone().unwrap_or_default();
    let id = Identity {
        kind,
        namespace: None,
        name: name.clone(),
        tunnel_address: ipam::ip(address),
    };
    let label = match kind {
        IdentityKind::Hub => dmvpn_crds::LABEL_HUB,
        IdentityKind::Spoke => dmvpn_crds::LABEL_SPOKE,
    };
    let owner = obj.controller_owner_ref(&());
    let outcome = match certs::ensure_site_certificate(
        &ctx.secrets,
        secret_name,
        &id,
        &ca,
        ctx.settings.cert_lifetime,
        clock_now,
        owner,
        &[(label, name.as_str())],
    )
    .await
    {
        Ok(o) => o,
        Err(CertError::Pki(e)) => {
            conditions::set_condition(
                conds,
                cond(
                    types::CERTIFICATE_READY,
                    ConditionStatus::False,
                    reasons::CERTIFICATE_ISSUE_FAILED,
                    e.to_string(),
                    gen_,
                    now,
                ),
            );
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let kind_label = KindLabel {
        kind: kind.as_str(),
    };
    let info = outcome.info;
    match outcome.action {
        CertAction::Unchanged => {}
        CertAction::Issued | CertAction::Reissued => {
            ctx.metrics
                .certificates_issued
                .get_or_create(&kind_label)
                .inc();
            ctx.event(
                obj,
                false,
                "CertificateIssued",
                "IssueCertificate",
                format!(
                    "issued certificate {} for {address} in secret {secret_name}",
                    info.serial
                ),
            )
            .await;
        }
        CertAction::Rotated => {
            ctx.metrics
                .certificates_issued
                .get_or_create(&kind_label)
                .inc();
            ctx.metrics
                .certificate_rotations
                .get_or_create(&kind_label)
                .inc();
            ctx.event(obj, false, "CertificateRotated", "RotateCertificate",
                format!("renewed certificate (new serial {}); the previous one stays in {secret_name} as tls.crt.previous until it expires", info.serial)).await;
        }
    }
    conditions::set_condition(
        conds,
        cond(
            types::CERTIFICATE_READY,
            ConditionStatus::True,
            reasons::CERTIFICATE_ISSUED,
            format!("certificate in secret {secret_name}"),
            gen_,
            now,
        ),
    );
    Ok(Some(info))
}

// ---------------------------------------------------------------------------------------------
// DmvpnSpoke

/// The primary hub and its network, or why the spoke cannot use it.
fn primary_network(
    ctx: &Context,
    spoke: &DmvpnSpoke,
) -> Result<(Arc<DmvpnHub>, Ipv4Net), (String, String)> {
    let Some(first) = spoke.spec.hubs.first() else {
        return Err((
            reasons::INVALID_SPEC.to_owned(),
            "spec.hubs: at least one hub is required".to_owned(),
        ));
    };
    let Some(hub) = ctx
        .hubs
        .get(&kube::runtime::reflector::ObjectRef::new(&first.name))
    else {
        return Err((
            reasons::HUB_NOT_FOUND.to_owned(),
            format!(
                "spec.hubs[0].name: DmvpnHub {:?} does not exist",
                first.name
            ),
        ));
    };
    if hub.metadata.deletion_timestamp.is_some() {
        return Err((
            reasons::HUB_NOT_FOUND.to_owned(),
            format!(
                "spec.hubs[0].name: DmvpnHub {:?} is being deleted",
                first.name
            ),
        ));
    }
    let net = ipam::parse_network(&hub.spec.tunnel_network).map_err(|e| {
        (
            reasons::INVALID_SPEC.to_owned(),
            format!(
                "spec.hubs[0].name: DmvpnHub {:?} has an unusable spec.tunnelNetwork: {e}",
                first.name
            ),
        )
    })?;
    Ok((hub, net))
}

pub async fn reconcile_spoke(spoke: Arc<DmvpnSpoke>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics
        .reconciliations
        .get_or_create(&KindLabel { kind: SPOKE })
        .inc();
    let name = spoke.name_any();
    let holder = ipam::holder(SPOKE, &name);
    let secret_name = dmvpn_crds::spoke_certificate_secret_name(&name);
    tracing::trace!(spoke = %name, "reconcile");
    // Allocation must see every hub (reserved addresses), so wait for the initial list.
    let _ = ctx.caches_ready.clone().wait_for(|r| *r).await;

    if spoke.metadata.deletion_timestamp.is_some() {
        let net = spoke
            .status
            .as_ref()
            .and_then(|s| s.tunnel_network.as_deref())
            .and_then(|n| ipam::parse_network(n).ok())
            .or_else(|| primary_network(&ctx, &spoke).ok().map(|(_, n)| n));
        if let Some(net) = net {
            ctx.ipam.release(&net, &holder).await?;
        }
        certs::delete_secret(&ctx.secrets, &secret_name).await?;
        ctx.set_spoke_ready(&name, None);
        ctx.event(
            &*spoke,
            false,
            "AddressReleased",
            "Delete",
            format!(
                "released the tunnel address of DmvpnSpoke {name} and deleted secret {secret_name}"
            ),
        )
        .await;
        remove_finalizer(&ctx.spokes_api, &*spoke).await?;
        return Ok(Action::await_change());
    }

    let spoke: Arc<DmvpnSpoke> = match ensure_finalizer(&ctx.spokes_api, &*spoke).await? {
        Some(s) => Arc::new(s),
        None => spoke,
    };
    let now = now_time(&ctx);
    let gen_ = spoke.metadata.generation;
    let old_status = spoke.status.clone();
    let mut status = old_status.clone().unwrap_or_default();
    let mut conds = status.conditions.clone();
    let mut requeue = ctx.settings.resync;
    let mut invalid: Vec<String> = Vec::new();

    // Address.
    let mut address = None;
    let mut network = None;
    match primary_network(&ctx, &spoke) {
        Err((reason, msg)) => {
            conditions::set_condition(
                &mut conds,
                cond(
                    types::ADDRESS_ASSIGNED,
                    ConditionStatus::False,
                    &reason,
                    msg,
                    gen_,
                    &now,
                ),
            );
            // A hub may appear later; its creation triggers a reconcile, this is a fallback.
            requeue = requeue.min(Duration::from_secs(60));
        }
        Ok((hub, net)) => {
            network = Some(net);
            for (i, h) in spoke.spec.hubs.iter().enumerate().skip(1) {
                match ctx.hubs.get(&kube::runtime::reflector::ObjectRef::new(&h.name)) {
                    None => invalid.push(format!("spec.hubs[{i}].name: DmvpnHub {:?} does not exist", h.name)),
                    Some(other) if ipam::parse_network(&other.spec.tunnel_network).ok() != Some(net) => invalid.push(format!(
                        "spec.hubs[{i}].name: DmvpnHub {:?} serves tunnel network {}, not {net} of the primary hub {:?}",
                        h.name, other.spec.tunnel_network, hub.name_any()
                    )),
                    Some(_) => {}
                }
            }
            let reserved = hub_reserved(&ctx, &net);
            let want = match spoke.spec.tunnel_address.as_deref() {
                Some(a) => match a.parse::<Ipv4Addr>() {
                    Ok(a) if reserved.contains(&a) => Err(format!(
                        "spec.tunnelAddress: {a} is the address of a hub in {net}"
                    )),
                    Ok(a) => Ok(Want::Exactly(a)),
                    Err(_) => Err(format!("spec.tunnelAddress: {a:?} is not an IPv4 address")),
                },
                None => Ok(
                    match status
                        .tunnel_address
                        .as_deref()
                        .and_then(ipam::parse_addr)
                        .filter(|_| {
                            status.tunnel_network.as_deref() == Some(net.to_string().as_str())
                        }) {
                        Some(a) => Want::Prefer(a),
                        None => Want::Any,
                    },
                ),
            };
            let result = match want {
                Err(msg) => Err((reasons::INVALID_SPEC, msg)),
                Ok(want) => match ctx
                    .ipam
                    .allocate_avoiding(&net, &holder, want, &reserved)
                    .await
                {
                    Ok(a) => Ok(a),
                    Err(IpamError::Taken { address, holder }) => Err((
                        reasons::ADDRESS_CONFLICT,
                        format!("spec.tunnelAddress: {address} is already held by {holder}"),
                    )),
                    Err(IpamError::OutOfNetwork { address, network }) => Err((
                        reasons::INVALID_SPEC,
                        format!(
                            "spec.tunnelAddress: {address} is not a host address of {network} (the network of DmvpnHub {:?})",
                            hub.name_any()
                        ),
                    )),
                    Err(IpamError::Exhausted { used, size, .. }) => Err((
                        reasons::POOL_EXHAUSTED,
                        format!(
                            "spec.hubs[0].name: the tunnel network {net} (spec.tunnelNetwork of DmvpnHub {:?}) has no free address left ({used} of {size} in use); use a larger network",
                            hub.name_any()
                        ),
                    )),
                    Err(e) => return Err(e.into()),
                },
            };
            match result {
                Ok(a) => {
                    address = Some(a.address);
                    if a.new {
                        ctx.event(
                            &*spoke,
                            false,
                            "AddressAllocated",
                            "AllocateAddress",
                            format!(
                                "tunnel address {}/{} from {net}",
                                a.address,
                                net.prefix_len()
                            ),
                        )
                        .await;
                    }
                    let reason = if spoke.spec.tunnel_address.is_some() {
                        reasons::ADDRESS_STATIC
                    } else {
                        reasons::ADDRESS_ALLOCATED
                    };
                    conditions::set_condition(
                        &mut conds,
                        cond(
                            types::ADDRESS_ASSIGNED,
                            ConditionStatus::True,
                            reason,
                            format!(
                                "tunnel address {}/{} from DmvpnHub {}",
                                a.address,
                                net.prefix_len(),
                                hub.name_any()
                            ),
                            gen_,
                            &now,
                        ),
                    );
                }
                Err((reason, msg)) => {
                    conditions::set_condition(
                        &mut conds,
                        cond(
                            types::ADDRESS_ASSIGNED,
                            ConditionStatus::False,
                            reason,
                            msg,
                            gen_,
                            &now,
                        ),
                    );
                }
            }
        }
    }
    status.tunnel_address = address.map(|a| a.to_string());
    status.tunnel_network = network.map(|n| n.to_string());

    // Site prefixes: valid, not overlapping the tunnel network or an older spoke's.
    let nodes = ctx.nodes.state();
    match site_prefixes(&spoke, &nodes) {
        Err(msg) => {
            invalid.push(msg);
            status.site_prefixes.clear();
        }
        Ok(mine) => {
            let field = match spoke.spec.site_prefixes.source {
                PrefixSource::Static => "spec.sitePrefixes.prefixes",
                PrefixSource::NodePodCIDRs => "spec.sitePrefixes.source (node pod CIDRs)",
            };
            if let Some(net) = network
                && let Some(p) = mine.iter().find(|p| overlaps(p, &net))
            {
                invalid.push(format!("{field}: {p} overlaps the tunnel network {net}"));
            }
            'outer: for other in ctx.spokes.state() {
                if other.name_any() == name
                    || other.metadata.deletion_timestamp.is_some()
                    || !precedes(&other, &spoke)
                {
                    continue;
                }
                let Ok(theirs) = site_prefixes(&other, &nodes) else {
                    continue;
                };
                for p in &mine {
                    if let Some(q) = theirs.iter().find(|q| overlaps(p, q)) {
                        invalid.push(format!(
                            "{field}: {p} overlaps {q} of DmvpnSpoke {:?}",
                            other.name_any()
                        ));
                        break 'outer;
                    }
                }
            }
            status.site_prefixes = mine
                .iter()
                .take(dmvpn_crds::spoke::SPOKE_MAX_SITE_PREFIXES)
                .map(|p| p.to_string())
                .collect();
        }
    }

    // Nodes acting for the spoke; `Registered` itself is reported by the agents.
    let active = nodes
        .iter()
        .filter(|n| node_matches(&spoke.spec.nodes, n))
        .count();
    status.active_nodes = Some(u32::try_from(active).unwrap_or(u32::MAX));
    let registered = conditions::find_condition(&conds, types::REGISTERED).cloned();
    if active == 0 {
        conditions::set_condition(
            &mut conds,
            cond(
                types::REGISTERED,
                ConditionStatus::False,
                reasons::NO_NODES,
                "spec.nodes: no node matches the spoke's node selection",
                gen_,
                &now,
            ),
        );
    } else if registered
        .as_ref()
        .is_none_or(|c| c.reason == reasons::NO_NODES)
    {
        conditions::set_condition(
            &mut conds,
            cond(
                types::REGISTERED,
                ConditionStatus::Unknown,
                reasons::WAITING_FOR_AGENTS,
                format!("{active} node(s) selected; no agent has reported a registration yet"),
                gen_,
                &now,
            ),
        );
    }

    // Certificate.
    let cert = site_certificate(
        &ctx,
        &*spoke,
        IdentityKind::Spoke,
        address,
        &secret_name,
        &mut conds,
        gen_,
        &now,
    )
    .await?;
    if let Some(c) = &cert {
        status.certificate = Some(cert_status(&secret_name, c));
        requeue = requeue.min(until(&ctx, c.renew_at()));
    } else if address.is_none() {
        status.certificate = None;
    }

    conditions::set_ready(&mut conds, SPOKE_READY_REQUIRES, gen_, now.clone());
    if !invalid.is_empty() {
        conditions::set_condition(
            &mut conds,
            cond(
                types::READY,
                ConditionStatus::False,
                reasons::INVALID_SPEC,
                invalid.join("; "),
                gen_,
                &now,
            ),
        );
    }
    transition_events(&ctx, &*spoke, &status.conditions, &conds).await;
    ctx.set_spoke_ready(
        &name,
        Some(conditions::is_condition_true(&conds, types::READY)),
    );
    status.conditions = conds;
    status.observed_generation = gen_;
    write_status::<DmvpnSpoke, DmvpnSpokeStatus>(
        &ctx.spokes_api,
        &spoke,
        old_status.as_ref(),
        &status,
    )
    .await?;
    Ok(Action::requeue(requeue))
}

/// Requeue with a short backoff on errors; conflicts retry almost at once.
pub fn error_policy<K>(kind: &'static str) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |_obj, err, ctx| {
        ctx.metrics
            .errors
            .get_or_create(&ErrorLabels {
                kind,
                error: err.class(),
            })
            .inc();
        if err.class() == "conflict" {
            tracing::debug!(kind, error = %err, "conflict; retrying");
            Action::requeue(Duration::from_millis(200))
        } else {
            tracing::warn!(kind, error = %err, "reconcile failed");
            Action::requeue(Duration::from_secs(5))
        }
    }
}

/// Makes the address records agree with the objects, before any new address is handed out:
/// addresses recorded in statuses but missing from a record (a lost or older record) are
/// re-claimed, and addresses held for objects that no longer exist (a crash between deletion
/// steps) are released.
pub async fn rebuild_records(ctx: &Context) -> Result<usize, Error> {
    let mut claimed = 0;
    let hubs = ctx.hubs_api.list(&Default::default()).await?.items;
    let spokes = ctx.spokes_api.list(&Default::default()).await?.items;
    let mut holders = std::collections::HashSet::new();
    for hub in &hubs {
        holders.insert(ipam::holder(HUB, &hub.name_any()));
        let (Some(addr), Ok(net)) = (
            hub.status
                .as_ref()
                .and_then(|s| s.tunnel_address.as_deref())
                .and_then(ipam::parse_addr),
            ipam::parse_network(&hub.spec.tunnel_network),
        ) else {
            continue;
        };
        match ctx
            .ipam
            .allocate(
                &net,
                &ipam::holder(HUB, &hub.name_any()),
                Want::Exactly(addr),
            )
            .await
        {
            Ok(a) => claimed += usize::from(a.new),
            Err(IpamError::Kube(e)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(hub = %hub.name_any(), error = %e, "cannot re-claim the hub address")
            }
        }
    }
    for spoke in &spokes {
        holders.insert(ipam::holder(SPOKE, &spoke.name_any()));
        let Some(status) = spoke.status.as_ref() else {
            continue;
        };
        let (Some(addr), Some(Ok(net))) = (
            status.tunnel_address.as_deref().and_then(ipam::parse_addr),
            status.tunnel_network.as_deref().map(ipam::parse_network),
        ) else {
            continue;
        };
        match ctx
            .ipam
            .allocate(
                &net,
                &ipam::holder(SPOKE, &spoke.name_any()),
                Want::Exactly(addr),
            )
            .await
        {
            Ok(a) => claimed += usize::from(a.new),
            Err(IpamError::Kube(e)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(spoke = %spoke.name_any(), error = %e, "cannot re-claim the spoke address")
            }
        }
    }
    if claimed > 0 {
        tracing::info!(
            claimed,
            "re-claimed addresses recorded in statuses but missing from the records"
        );
    }
    // Release what nobody holds any more.
    let records = ctx
        .secrets
        .list(&kube::api::ListParams::default().labels(ipam::LABEL_IPAM_NETWORK))
        .await?
        .items;
    for record in records {
        let Some(net) = record
            .labels()
            .get(ipam::LABEL_IPAM_NETWORK)
            .and_then(|v| ipam::parse_network(&v.replace('_', "/")).ok())
        else {
            continue;
        };
        let stale: BTreeSet<String> = ctx
            .ipam
            .entries(&net)
            .await?
            .into_values()
            .filter(|h| !holders.contains(h))
            .collect();
        for h in stale {
            tracing::info!(holder = %h, network = %net, "releasing the address of an object that no longer exists");
            ctx.ipam.release(&net, &h).await?;
        }
    }
    Ok(claimed)
}
