//! Talking to a running `dmvpn-agent` over its control socket: one JSON request per line,
//! one reply per line, `{"ok":true,"result":{...}}` or `{"ok":false,"error":"..."}`
//! (node-agent/src/control.rs). The reply shapes are node-agent/src/view.rs; only the fields
//! the checks use are declared here, so fields the agent adds later do not break the lab.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// One request on the control socket; returns the `result` of a successful reply.
pub fn control(socket: &Path, cmd: &str) -> Result<Value> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to control socket {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let req = serde_json::json!({ "cmd": cmd });
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .with_context(|| format!("no reply to {cmd} on {}", socket.display()))?;
    let v: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("reply to {cmd} is not JSON: {}", line.trim()))?;
    if v.get("ok").and_then(Value::as_bool) != Some(true) {
        let err = v
            .get("error")
            .map(Value::to_string)
            .unwrap_or_else(|| v.to_string());
        bail!("agent answered {cmd} with an error: {err}");
    }
    v.get("result")
        .cloned()
        .ok_or_else(|| anyhow!("reply to {cmd} has no result: {v}"))
}

fn typed<T: DeserializeOwned>(socket: &Path, cmd: &str) -> Result<(T, Value)> {
    let v = control(socket, cmd)?;
    let t = serde_json::from_value(v.clone())
        .with_context(|| format!("unexpected {cmd} reply shape: {v}"))?;
    Ok((t, v))
}

/// The agent binary: explicit path, else env `DMVPN_AGENT`, else `dmvpn-agent` next to the
/// running executable (or one directory up, for test executables in `target/*/deps`).
pub fn locate_agent(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    if let Some(p) = std::env::var_os("DMVPN_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot find the running executable's path")?;
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join("dmvpn-agent"));
        if let Some(up) = dir.parent() {
            candidates.push(up.join("dmvpn-agent"));
        }
    }
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    bail!(
        "dmvpn-agent binary not found (looked at {}); build it with \
         `cargo build --release -p dmvpn-agent -p dmvpn-e2e`, or pass --agent PATH / set DMVPN_AGENT",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// One NHRP cache entry (`show_nhrp_cache` → `entries[]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CacheEntry {
    /// "local", "nhs", "dynamic", "shortcut", "incomplete" or "negative".
    #[serde(rename = "type")]
    pub kind: String,
    /// "10.102.0.0/24"
    pub prefix: String,
    /// Overlay next hop owning the prefix.
    pub protocol: IpAddr,
    pub nbma: Option<IpAddr>,
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

impl CacheEntry {
    /// (network, length) of `prefix`, IPv4 only.
    fn net(&self) -> Option<(Ipv4Addr, u8)> {
        let (a, l) = self.prefix.split_once('/')?;
        let len: u8 = l.parse().ok()?;
        (len <= 32).then_some(())?;
        Some((a.parse().ok()?, len))
    }

    /// Does the entry's prefix contain `a`?
    pub fn covers(&self, a: Ipv4Addr) -> bool {
        let Some((net, len)) = self.net() else {
            return false;
        };
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        };
        u32::from(a) & mask == u32::from(net) & mask
    }

    pub fn nbma_v4(&self) -> Option<Ipv4Addr> {
        match self.nbma {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct CacheReply {
    entries: Vec<CacheEntry>,
}

/// The NHRP cache of one agent.
#[derive(Debug, Clone)]
pub struct Cache {
    pub raw: Value,
    pub entries: Vec<CacheEntry>,
}

impl Cache {
    pub fn query(socket: &Path) -> Result<Cache> {
        let (r, raw): (CacheReply, _) = typed(socket, "show_nhrp_cache")?;
        Ok(Cache {
            raw,
            entries: r.entries,
        })
    }

    /// The most specific entry (any type) covering `addr`.
    pub fn entry_for(&self, addr: Ipv4Addr) -> Option<&CacheEntry> {
        self.entries
            .iter()
            .filter(|e| e.covers(addr))
            .max_by_key(|e| e.net().map(|(_, l)| l))
    }

    /// A registration of `tunnel` (hub side: type "dynamic").
    pub fn registration(&self, tunnel: Ipv4Addr) -> Option<&CacheEntry> {
        self.entries
            .iter()
            .find(|e| e.kind == "dynamic" && e.protocol == IpAddr::V4(tunnel))
    }

    /// Any entry whose next hop is `tunnel` (its registrations and registered prefixes).
    pub fn mentions(&self, tunnel: Ipv4Addr) -> bool {
        self.entries
            .iter()
            .any(|e| e.kind != "local" && e.protocol == IpAddr::V4(tunnel))
    }

    /// A shortcut (learned by resolution) covering `addr`.
    pub fn shortcut_for(&self, addr: Ipv4Addr) -> Option<&CacheEntry> {
        self.entries
            .iter()
            .find(|e| e.kind == "shortcut" && e.covers(addr))
    }
}

/// One configured NHS (`show_nhrp_nhs` → `nhs[]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Nhs {
    pub tunnel_address: IpAddr,
    pub nbma_address: IpAddr,
    pub state: String,
    pub registered: bool,
    #[serde(default)]
    pub preferred: bool,
}

impl Nhs {
    /// Registration state "up" and the registration accepted.
    pub fn is_up(&self) -> bool {
        self.state == "up" && self.registered
    }
}

#[derive(Debug, Clone, Deserialize)]
struct NhsReply {
    nhs: Vec<Nhs>,
}

/// `show_dmvpn`, the fields the lab reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Dmvpn {
    pub role: String,
    pub phase: u8,
    pub nbma_address: IpAddr,
    pub peers: Vec<Value>,
}

/// What the checks read from one agent at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dmvpn: Dmvpn,
    pub cache: Cache,
    pub nhs: Vec<Nhs>,
    /// `show_counters`: `{"nhrp": {...}, "dataplane": {...}}`.
    pub counters: Value,
}

impl Snapshot {
    pub fn query(socket: &Path) -> Result<Snapshot> {
        let (dmvpn, _) = typed(socket, "show_dmvpn")?;
        let cache = Cache::query(socket)?;
        let (nhs, _): (NhsReply, _) = typed(socket, "show_nhrp_nhs")?;
        Ok(Snapshot {
            dmvpn,
            cache,
            nhs: nhs.nhs,
            counters: counters(socket)?,
        })
    }

    /// Is `tunnel` registered with NBMA `nbma` (a dynamic entry in a hub's cache)?
    pub fn has_registration(&self, tunnel: Ipv4Addr, nbma: Ipv4Addr) -> bool {
        self.cache
            .registration(tunnel)
            .is_some_and(|e| e.nbma == Some(IpAddr::V4(nbma)))
    }

    /// NHSs whose registration state is "up" (and registered).
    pub fn nhs_up_count(&self) -> usize {
        self.nhs.iter().filter(|n| n.is_up()).count()
    }

    /// The NHS entry for `tunnel`.
    pub fn nhs(&self, tunnel: Ipv4Addr) -> Option<&Nhs> {
        self.nhs
            .iter()
            .find(|n| n.tunnel_address == IpAddr::V4(tunnel))
    }

    /// Data packets the hub forwarded from one spoke to another.
    pub fn hub_forwarded(&self) -> u64 {
        counter(&self.counters, "/dataplane/hub_forwarded_packets")
    }

    /// Traffic Indications (redirects) sent.
    pub fn redirects_sent(&self) -> u64 {
        counter(&self.counters, "/nhrp/messages/traffic_indication/tx")
    }
}

/// `show_counters` as a JSON tree.
pub fn counters(socket: &Path) -> Result<Value> {
    control(socket, "show_counters")
}

/// A counter by JSON pointer ("/dataplane/drops/wrong_key"); 0 when absent.
pub fn counter(counters: &Value, pointer: &str) -> u64 {
    counters
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, prefix: &str, proto: &str, nbma: Option<&str>) -> CacheEntry {
        CacheEntry {
            kind: kind.into(),
            prefix: prefix.into(),
            protocol: proto.parse().unwrap(),
            nbma: nbma.map(|n| n.parse().unwrap()),
            expires_in_secs: None,
        }
    }

    #[test]
    fn cache_lookups() {
        let c = Cache {
            raw: Value::Null,
            entries: vec![
                entry("local", "10.42.0.11/32", "10.42.0.11", None),
                entry("nhs", "10.42.0.1/32", "10.42.0.1", Some("198.51.100.1")),
                entry(
                    "shortcut",
                    "10.102.0.0/24",
                    "10.42.0.12",
                    Some("198.51.100.12"),
                ),
                entry(
                    "dynamic",
                    "10.42.0.13/32",
                    "10.42.0.13",
                    Some("198.51.100.13"),
                ),
            ],
        };
        let dst: Ipv4Addr = "10.102.0.2".parse().unwrap();
        let sc = c.shortcut_for(dst).unwrap();
        assert_eq!(sc.nbma_v4(), Some("198.51.100.12".parse().unwrap()));
        assert!(c.shortcut_for("10.103.0.2".parse().unwrap()).is_none());
        assert!(c.registration("10.42.0.13".parse().unwrap()).is_some());
        assert!(c.registration("10.42.0.12".parse().unwrap()).is_none());
        assert!(c.mentions("10.42.0.12".parse().unwrap()));
        assert!(!c.mentions("10.42.0.14".parse().unwrap()));
        assert!(
            !c.mentions("10.42.0.11".parse().unwrap()),
            "local entries do not count"
        );
    }

    #[test]
    fn reply_shapes_parse() {
        let v = serde_json::json!({"interface":"dmvpn0","entries":[{"type":"dynamic","prefix":"10.101.0.0/24",
            "protocol":"10.42.0.11","nbma":"198.51.100.11","expires_in_secs":29,"used":false,"unique":false,"new":1}]});
        let r: CacheReply = serde_json::from_value(v).unwrap();
        assert!(r.entries[0].covers("10.101.0.9".parse().unwrap()));
        let v = serde_json::json!({"interface":"dmvpn0","nhs":[{"tunnel_address":"10.42.0.1","nbma_address":"198.51.100.1",
            "priority":0,"state":"up","registered":true,"preferred":true,"requests_sent":1,"replies_received":1,
            "next_attempt_in_secs":10,"nat_address":null}]});
        let r: NhsReply = serde_json::from_value(v).unwrap();
        assert!(r.nhs[0].registered);
        let c = serde_json::json!({"nhrp":{"messages":{"traffic_indication":{"rx":0,"tx":3}}},"dataplane":{"hub_forwarded_packets":7}});
        assert_eq!(counter(&c, "/nhrp/messages/traffic_indication/tx"), 3);
        assert_eq!(counter(&c, "/dataplane/hub_forwarded_packets"), 7);
        assert_eq!(counter(&c, "/dataplane/drops/wrong_key"), 0);
    }
}
