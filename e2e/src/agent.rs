//! Talking to a running `dmvpn-agent`: its control socket (one JSON request per line, one
//! JSON reply per line) and a typed view of what the checks need.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One request on the control socket; returns the parsed reply.
pub fn control(socket: &Path, cmd: &str) -> Result<Value> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to control socket {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    let req = serde_json::json!({ "cmd": cmd });
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .with_context(|| format!("no reply to {cmd} on {}", socket.display()))?;
    let v: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("reply to {cmd} is not JSON: {}", line.trim()))?;
    if let Some(e) = v.get("error") {
        bail!("agent answered {cmd} with an error: {e}");
    }
    Ok(v)
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

/// What the checks read from one agent at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dmvpn: Value,
    pub cache: Value,
    pub nhs: Value,
    pub counters: Value,
}

impl Snapshot {
    pub fn query(socket: &Path) -> Result<Snapshot> {
        Ok(Snapshot {
            dmvpn: control(socket, "show_dmvpn")?,
            cache: control(socket, "show_nhrp_cache")?,
            nhs: control(socket, "show_nhrp_nhs")?,
            counters: control(socket, "show_counters")?,
        })
    }

    /// NHRP cache entries (array in the reply).
    pub fn cache_entries(&self) -> Vec<CacheEntry> {
        Cache::from_json(self.cache.clone()).entries
    }

    /// Data packets the hub forwarded from one spoke to another.
    pub fn hub_forwarded(&self) -> u64 {
        self.counter("hub_forwarded_packets")
    }

    /// Traffic Indications (redirects) sent.
    pub fn redirects_sent(&self) -> u64 {
        self.counters
            .pointer("/nhrp/messages/traffic_indication/tx")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// Is `tunnel` registered with NBMA `nbma` (a dynamic entry in a hub's cache)?
    pub fn has_registration(&self, tunnel: Ipv4Addr, nbma: Ipv4Addr) -> bool {
        self.cache_entries()
            .iter()
            .any(|e| e.covers(tunnel) && e.nbma == Some(nbma) && e.is_registration())
    }

    /// Any cache entry covering `addr`?
    pub fn entry_for(&self, addr: Ipv4Addr) -> Option<CacheEntry> {
        self.cache_entries().into_iter().find(|e| e.covers(addr))
    }

    /// A shortcut (resolved, not via an NHS) towards `addr`, with its NBMA.
    pub fn shortcut_for(&self, addr: Ipv4Addr) -> Option<CacheEntry> {
        self.cache_entries()
            .into_iter()
            .find(|e| e.covers(addr) && e.is_shortcut())
    }

    /// NHS entries: (tunnel address, up?).
    pub fn nhs_states(&self) -> Vec<(Option<Ipv4Addr>, bool)> {
        entries(&self.nhs)
            .iter()
            .map(|v| {
                let addr = str_field(v, &["tunnel_address", "proto", "protocol", "nhs"])
                    .and_then(|s| s.parse().ok());
                let state = str_field(v, &["state", "status"]).unwrap_or_default();
                let up = state.eq_ignore_ascii_case("up")
                    || state.eq_ignore_ascii_case("registered")
                    || v.get("up").and_then(Value::as_bool).unwrap_or(false);
                (addr, up)
            })
            .collect()
    }

    pub fn nhs_up_count(&self) -> usize {
        self.nhs_states().iter().filter(|(_, up)| *up).count()
    }

    pub fn nhs_up(&self, nhs: Ipv4Addr) -> Option<bool> {
        self.nhs_states()
            .into_iter()
            .find(|(a, _)| *a == Some(nhs))
            .map(|(_, up)| up)
    }

    /// A counter by name (searched in the counters reply, nested objects included).
    pub fn counter(&self, name: &str) -> u64 {
        find_u64(&self.counters, name).unwrap_or(0)
    }
}

/// The NHRP cache of one agent.
#[derive(Debug, Clone)]
pub struct Cache {
    pub raw: Value,
    pub entries: Vec<CacheEntry>,
}

impl Cache {
    pub fn query(socket: &Path) -> Result<Cache> {
        Ok(Cache::from_json(control(socket, "show_nhrp_cache")?))
    }

    pub fn from_json(raw: Value) -> Cache {
        let entries = entries(&raw)
            .iter()
            .filter_map(CacheEntry::from_json)
            .collect();
        Cache { raw, entries }
    }

    pub fn entry_for(&self, addr: Ipv4Addr) -> Option<&CacheEntry> {
        self.entries.iter().find(|e| e.covers(addr))
    }

    pub fn shortcut_for(&self, addr: Ipv4Addr) -> Option<&CacheEntry> {
        self.entries
            .iter()
            .find(|e| e.covers(addr) && e.is_shortcut())
    }
}

/// One NHRP cache entry, as far as the checks care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    pub prefix: Ipv4Addr,
    pub prefix_len: u8,
    pub nbma: Option<Ipv4Addr>,
    pub kind: String,
    pub raw: Value,
}

impl CacheEntry {
    fn from_json(v: &Value) -> Option<CacheEntry> {
        let target = str_field(v, &["prefix", "target", "protocol", "proto", "address"])?;
        let (addr, len) = match target.split_once('/') {
            Some((a, l)) => (a.parse().ok()?, l.parse().ok()?),
            None => (target.parse().ok()?, 32),
        };
        let nbma = str_field(v, &["nbma", "nbma_address"]).and_then(|s| s.parse().ok());
        let kind = str_field(v, &["type", "kind"]).unwrap_or_default();
        Some(CacheEntry {
            prefix: addr,
            prefix_len: len,
            nbma,
            kind: kind.to_ascii_lowercase(),
            raw: v.clone(),
        })
    }

    pub fn covers(&self, a: Ipv4Addr) -> bool {
        if self.prefix_len > 32 {
            return false;
        }
        let mask = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        };
        u32::from(a) & mask == u32::from(self.prefix) & mask
    }

    pub fn is_registration(&self) -> bool {
        self.kind.contains("dynamic") || self.kind.contains("registered")
    }

    pub fn is_shortcut(&self) -> bool {
        self.kind.contains("shortcut")
            || self.kind.contains("resolved")
            || self.kind.contains("dynamic")
    }
}

fn entries(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Object(o) => o
            .values()
            .find_map(|x| x.as_array().cloned())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn str_field(v: &Value, names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| v.get(*n).and_then(Value::as_str).map(str::to_string))
}

fn find_u64(v: &Value, name: &str) -> Option<u64> {
    match v {
        Value::Object(o) => o
            .get(name)
            .and_then(Value::as_u64)
            .or_else(|| o.values().find_map(|x| find_u64(x, name))),
        Value::Array(a) => a.iter().find_map(|x| find_u64(x, name)),
        _ => None,
    }
}
