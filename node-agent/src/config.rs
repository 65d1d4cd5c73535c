//! Standalone agent configuration (TOML), see docs/architecture.md.
//!
//! The file is first read into [`RawConfig`] (every field optional, unknown fields rejected), then
//! [`RawConfig::validate`] turns it into a typed [`Config`]. Every error names the file and the
//! field at fault, so an operator can fix it without reading code.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Default control socket path.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/dmvpn/agent.sock";
/// Default TUN device name.
pub const DEFAULT_TUN_NAME: &str = "dmvpn0";
/// Default NHRP holding time in seconds (Cisco and FRR use 7200).
pub const DEFAULT_HOLDTIME: u16 = 7200;
/// Default minimum interval between two redirects for the same flow (seconds).
pub const DEFAULT_REDIRECT_RATE_LIMIT_SECS: u32 = 5;
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Linux IFNAMSIZ minus the NUL.
const MAX_IFNAME: usize = 15;
/// Cisco cleartext authentication carries at most 8 bytes.
pub const MAX_NHRP_AUTH: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Hub,
    Spoke,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Hub => "hub",
            Role::Spoke => "spoke",
        })
    }
}

/// DMVPN phase: 1 hub-and-spoke only, 2 data-driven spoke-to-spoke resolution, 3 redirects and
/// shortcuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Phase(u8);

impl Phase {
    pub const ONE: Phase = Phase(1);
    pub const TWO: Phase = Phase(2);
    pub const THREE: Phase = Phase(3);

    pub fn get(self) -> u8 {
        self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneKind {
    Userspace,
}

/// Where the local NBMA (underlay) address comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbmaSource {
    Address(IpAddr),
    /// The first address of this interface (of the tunnel address family), watched for changes.
    Interface(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NhsConfig {
    pub tunnel_address: IpAddr,
    pub nbma_address: IpAddr,
    pub priority: u8,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub role: Role,
    /// Own overlay address with the tunnel network's prefix length.
    pub tunnel_address: IpNet,
    pub nbma: NbmaSource,
    pub gre_key: Option<u32>,
    pub holdtime: u16,
    pub phase: Phase,
    pub local_prefixes: Vec<IpNet>,
    /// Prefixes that this node routes into the tunnel besides the tunnel network.
    pub overlay_routes: Vec<IpNet>,
    pub nhrp_auth: Option<Vec<u8>>,
    pub registration_unique: bool,
    pub control_socket: PathBuf,
    pub dataplane: DataplaneKind,
    pub tun_name: String,
    pub log_level: String,
    pub redirect_rate_limit_secs: u32,
    pub mtu: Option<u16>,
    pub nhs: Vec<NhsConfig>,
    pub ipsec: IpsecConfig,
}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes redacted>", self.0.len())
    }
}

/// How IKE authenticates the peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpsecAuth {
    /// One pre-shared key for every peer of the network.
    Psk(Secret),
    /// X.509: the CA certificate peers must chain to, our certificate and its private key
    /// (PEM files). The certificate's IP SAN is our IKE identity: the tunnel address.
    Certificate {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
}

/// AEAD of IKE SAs and ESP SAs, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cipher {
    Aes256Gcm,
    ChaCha20Poly1305,
}

/// Key exchange groups of IKE, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DhGroup {
    X25519,
    P256,
}

/// Default IKE SA lifetime in seconds (rekeyed at 90 %).
pub const DEFAULT_IKE_LIFETIME: u32 = 4 * 3600;
/// Default CHILD SA lifetime in seconds (rekeyed at 90 %).
pub const DEFAULT_CHILD_LIFETIME: u32 = 3600;
/// Default liveness check interval in seconds.
pub const DEFAULT_DPD_INTERVAL: u32 = 30;

/// `[ipsec]`: IKEv2 + ESP for every tunnel packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpsecConfig {
    pub enabled: bool,
    /// `None` only when disabled.
    pub auth: Option<IpsecAuth>,
    pub ciphers: Vec<Cipher>,
    pub dh_groups: Vec<DhGroup>,
    pub ike_lifetime_secs: u32,
    pub child_lifetime_secs: u32,
    /// Always use ESP-in-UDP on port 4500, even without NAT.
    pub force_udp_encap: bool,
    /// Liveness check after this much silence; 0 turns it off.
    pub dpd_interval_secs: u32,
}

impl IpsecConfig {
    fn disabled() -> IpsecConfig {
        IpsecConfig {
            enabled: false,
            auth: None,
            ciphers: vec![Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305],
            dh_groups: vec![DhGroup::X25519, DhGroup::P256],
            ike_lifetime_secs: DEFAULT_IKE_LIFETIME,
            child_lifetime_secs: DEFAULT_CHILD_LIFETIME,
            force_udp_encap: false,
            dpd_interval_secs: DEFAULT_DPD_INTERVAL,
        }
    }
}

/// `[ipsec]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIpsec {
    pub enabled: Option<bool>,
    pub auth: Option<String>,
    pub psk: Option<String>,
    pub psk_file: Option<String>,
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub proposals: Option<Vec<String>>,
    pub ike_lifetime: Option<i64>,
    pub child_lifetime: Option<i64>,
    pub force_udp_encap: Option<bool>,
    pub dpd_interval: Option<i64>,
}

/// Smallest PSK accepted: shorter keys are guessable offline from one captured exchange.
pub const MIN_PSK_LEN: usize = 16;

impl RawIpsec {
    fn validate(self, ctx: &Ctx<'_>) -> Result<IpsecConfig, ConfigError> {
        let mut c = IpsecConfig::disabled();
        c.enabled = self.enabled.unwrap_or(true);
        if !c.enabled {
            return Ok(c);
        }
        let path = |field: &str, v: Option<String>| -> Result<PathBuf, ConfigError> {
            match v {
                Some(p) if !p.trim().is_empty() => Ok(PathBuf::from(p)),
                Some(_) => Err(ctx.err(format!("ipsec.{field}"), "is empty; give a file path")),
                None => Err(ctx.err(
                    format!("ipsec.{field}"),
                    "missing: auth = \"certificate\" needs ca, cert and key (PEM files; create them with `dmvpn-agent cert ca` and `dmvpn-agent cert issue`)",
                )),
            }
        };
        let auth = match self.auth.as_deref() {
            None | Some("psk") => {
                let psk = match (self.psk, self.psk_file) {
                    (Some(_), Some(_)) => {
                        return Err(ctx.err(
                            "ipsec.psk",
                            "both psk and psk_file are set; keep exactly one",
                        ));
                    }
                    (Some(p), None) => p.into_bytes(),
                    (None, Some(f)) => {
                        let text = std::fs::read_to_string(&f).map_err(|e| {
                            ctx.err("ipsec.psk_file", format!("cannot read {f}: {e}"))
                        })?;
                        text.trim_end_matches(['\n', '\r']).as_bytes().to_vec()
                    }
                    (None, None) => {
                        return Err(ctx.err(
                            "ipsec",
                            "IPsec is on by default and needs credentials: set psk (or psk_file) under [ipsec], or auth = \"certificate\" with ca, cert and key; enabled = false sends GRE in clear",
                        ));
                    }
                };
                if psk.len() < MIN_PSK_LEN {
                    return Err(ctx.err(
                        "ipsec.psk",
                        format!(
                            "is {} bytes long; use at least {MIN_PSK_LEN} random bytes (e.g. `openssl rand -base64 24`)",
                            psk.len()
                        ),
                    ));
                }
                IpsecAuth::Psk(Secret(psk))
            }
            Some("certificate") => {
                if self.psk.is_some() || self.psk_file.is_some() {
                    return Err(ctx.err(
                        "ipsec.psk",
                        "is set although auth = \"certificate\"; remove it",
                    ));
                }
                IpsecAuth::Certificate {
                    ca: path("ca", self.ca)?,
                    cert: path("cert", self.cert)?,
                    key: path("key", self.key)?,
                }
            }
            Some(other) => {
                return Err(ctx.err(
                    "ipsec.auth",
                    format!(
                        "{other:?} is not an authentication method: use \"psk\" or \"certificate\""
                    ),
                ));
            }
        };
        c.auth = Some(auth);
        if let Some(list) = self.proposals {
            let (mut ciphers, mut groups) = (Vec::new(), Vec::new());
            for (i, p) in list.iter().enumerate() {
                match p.as_str() {
                    "aes256gcm" => ciphers.push(Cipher::Aes256Gcm),
                    "chacha20poly1305" => ciphers.push(Cipher::ChaCha20Poly1305),
                    "x25519" => groups.push(DhGroup::X25519),
                    "p256" => groups.push(DhGroup::P256),
                    other => {
                        return Err(ctx.err(
                            format!("ipsec.proposals[{i}]"),
                            format!("{other:?} is not supported: use aes256gcm, chacha20poly1305 (encryption) and x25519, p256 (key exchange)"),
                        ));
                    }
                }
            }
            ciphers.dedup();
            groups.dedup();
            if !ciphers.is_empty() {
                c.ciphers = ciphers;
            }
            if !groups.is_empty() {
                c.dh_groups = groups;
            }
        }
        if let Some(v) = self.ike_lifetime {
            c.ike_lifetime_secs =
                in_range(ctx, "ipsec.ike_lifetime", v, 300, 86400, " seconds")? as u32;
        }
        if let Some(v) = self.child_lifetime {
            c.child_lifetime_secs =
                in_range(ctx, "ipsec.child_lifetime", v, 10, 86400, " seconds")? as u32;
        }
        if c.child_lifetime_secs > c.ike_lifetime_secs {
            return Err(ctx.err(
                "ipsec.child_lifetime",
                format!(
                    "{} s is longer than ike_lifetime {} s; CHILD SAs are rekeyed within their IKE SA",
                    c.child_lifetime_secs, c.ike_lifetime_secs
                ),
            ));
        }
        c.force_udp_encap = self.force_udp_encap.unwrap_or(false);
        if let Some(v) = self.dpd_interval {
            c.dpd_interval_secs =
                in_range(ctx, "ipsec.dpd_interval", v, 0, 3600, " seconds (0 = off)")? as u32;
        }
        Ok(c)
    }
}

impl Config {
    /// The tunnel network (own address with the host bits cleared).
    pub fn tunnel_network(&self) -> IpNet {
        self.tunnel_address.trunc()
    }

    /// Own overlay address.
    pub fn tunnel_ip(&self) -> IpAddr {
        self.tunnel_address.addr()
    }
}

/// An [`NhsConfig`] as written in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNhs {
    pub tunnel_address: Option<String>,
    pub nbma_address: Option<String>,
    pub priority: Option<i64>,
}

/// The file as written: all fields optional so that a missing one gets a message naming it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub role: Option<String>,
    pub tunnel_address: Option<String>,
    pub nbma_address: Option<String>,
    pub nbma_interface: Option<String>,
    pub gre_key: Option<i64>,
    pub holdtime: Option<i64>,
    pub phase: Option<i64>,
    pub local_prefixes: Option<Vec<String>>,
    pub overlay_routes: Option<Vec<String>>,
    pub nhrp_auth: Option<String>,
    pub registration_unique: Option<bool>,
    pub control_socket: Option<String>,
    pub dataplane: Option<String>,
    pub tun_name: Option<String>,
    pub log_level: Option<String>,
    pub redirect_rate_limit_secs: Option<i64>,
    pub mtu: Option<i64>,
    pub nhs: Option<Vec<RawNhs>>,
    pub ipsec: Option<RawIpsec>,
}

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the configuration file: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {field}{message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        /// "field `x`: " when the key is known, else empty.
        field: String,
        message: String,
    },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
}

impl ConfigError {
    /// The field at fault, when known.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            ConfigError::Syntax { field, .. } if !field.is_empty() => Some(field),
            _ => None,
        }
    }
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        file: file.clone(),
        source,
    })?;
    parse(&text, &file)
}

/// Parses and validates configuration text; `file` names it in error messages.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(text, file, &e))?;
    raw.validate(file)
}

/// Turns a TOML/serde error into one line: position, the key when we can find it, the message.
fn syntax_error(text: &str, file: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return ConfigError::Syntax {
            file: file.to_owned(),
            line: 0,
            column: 0,
            field: String::new(),
            message,
        };
    };
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = start - line_start + 1;
    let line_text = text
        .get(line_start..)
        .unwrap_or("")
        .lines()
        .next()
        .unwrap_or("");
    // Unknown fields already carry the key in the message; for type errors take the key from
    // the source line (`key = value`) and the enclosing [[table]] header.
    let field = match line_text.split_once('=') {
        Some((key, _)) if !message.contains("unknown field") => {
            let key = key.trim();
            let table = enclosing_table(before);
            match table {
                Some(t) => format!("field `{t}.{key}`: "),
                None => format!("field `{key}`: "),
            }
        }
        _ => String::new(),
    };
    ConfigError::Syntax {
        file: file.to_owned(),
        line,
        column,
        field,
        message,
    }
}

/// The `[table]` or `[[array]]` header (as `nhs[2]`) that encloses the text just before `before`.
fn enclosing_table(before: &str) -> Option<String> {
    let mut current: Option<String> = None;
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for l in before.lines() {
        let t = l.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_owned();
            let n = counts.entry(name.clone()).or_insert(0);
            current = Some(format!("{name}[{n}]"));
            *n += 1;
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            current = Some(name.trim().to_owned());
        }
    }
    current
}

struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            field: field.into(),
            message: message.into(),
        }
    }
}

fn parse_ip(ctx: &Ctx<'_>, field: &str, s: &str) -> Result<IpAddr, ConfigError> {
    let ip: IpAddr = s.trim().parse().map_err(|_| {
        ctx.err(
            field,
            format!("{s:?} is not an IP address (expected e.g. \"198.51.100.1\")"),
        )
    })?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(ctx.err(
            field,
            format!("{ip} is unspecified or multicast; give a unicast address"),
        ));
    }
    Ok(ip)
}

/// A prefix whose host bits must be zero (a route or a registered prefix).
fn parse_prefix(ctx: &Ctx<'_>, field: &str, s: &str) -> Result<IpNet, ConfigError> {
    let net: IpNet = s.trim().parse().map_err(|_| {
        ctx.err(
            field,
            format!("{s:?} is not a prefix (expected address/length, e.g. \"10.1.2.0/24\")"),
        )
    })?;
    if net.trunc() != net {
        return Err(ctx.err(
            field,
            format!("{net} has host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn in_range(
    ctx: &Ctx<'_>,
    field: &str,
    v: i64,
    lo: i64,
    hi: i64,
    unit: &str,
) -> Result<i64, ConfigError> {
    if v < lo || v > hi {
        return Err(ctx.err(
            field,
            format!("{v} is out of range: must be {lo}..={hi}{unit}"),
        ));
    }
    Ok(v)
}

fn valid_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > MAX_IFNAME {
        return Err(format!(
            "{name:?} is {} bytes long; Linux interface names have at most {MAX_IFNAME}",
            name.len()
        ));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{name:?} is not a valid interface name (no '/', ':', whitespace, \".\" or \"..\")"
        ));
    }
    Ok(())
}

impl RawConfig {
    /// Checks every field and builds the typed [`Config`]. `file` names the source in errors.
    pub fn validate(self, file: &str) -> Result<Config, ConfigError> {
        let ctx = Ctx { file };

        let role = match self.role.as_deref() {
            Some("hub") => Role::Hub,
            Some("spoke") => Role::Spoke,
            Some(other) => {
                return Err(ctx.err(
                    "role",
                    format!("{other:?} is not a role: use \"hub\" or \"spoke\""),
                ));
            }
            None => return Err(ctx.err("role", "missing: set role = \"hub\" or \"spoke\"")),
        };

        let tunnel_address: IpNet = match self.tunnel_address.as_deref() {
            None => {
                return Err(ctx.err(
                    "tunnel_address",
                    "missing: set the overlay address with the tunnel prefix length, e.g. \"10.42.0.2/24\"",
                ));
            }
            Some(s) => s.trim().parse().map_err(|_| {
                ctx.err(
                    "tunnel_address",
                    format!("{s:?} is not address/prefix-length (e.g. \"10.42.0.2/24\")"),
                )
            })?,
        };
        let tunnel_net = tunnel_address.trunc();
        let tip = tunnel_address.addr();
        if tunnel_address.prefix_len() == tunnel_address.max_prefix_len() {
            return Err(ctx.err(
                "tunnel_address",
                format!(
                    "{tunnel_address} is a host route; give the tunnel network's prefix length (e.g. /24) so that NHS and peers are inside it"
                ),
            ));
        }
        if tip.is_unspecified() || tip.is_multicast() || tip.is_loopback() {
            return Err(ctx.err(
                "tunnel_address",
                format!("{tip} is not a usable unicast address"),
            ));
        }
        let host_bits_usable = tunnel_address.max_prefix_len() - tunnel_address.prefix_len() >= 2;
        if matches!(tip, IpAddr::V4(_)) && host_bits_usable {
            if tip == tunnel_net.network() {
                return Err(ctx.err(
                    "tunnel_address",
                    format!("{tip} is the network address of {tunnel_net}; pick a host address"),
                ));
            }
            if tip == tunnel_net.broadcast() {
                return Err(ctx.err(
                    "tunnel_address",
                    format!("{tip} is the broadcast address of {tunnel_net}; pick a host address"),
                ));
            }
        }

        let nbma = match (self.nbma_address.as_deref(), self.nbma_interface.as_deref()) {
            (Some(_), Some(_)) => {
                return Err(ctx.err(
                    "nbma_address",
                    "both nbma_address and nbma_interface are set; keep exactly one",
                ));
            }
            (None, None) => {
                return Err(ctx.err(
                    "nbma_address",
                    "missing: set nbma_address (underlay IP) or nbma_interface (take the interface's address)",
                ));
            }
            (Some(a), None) => {
                let ip = parse_ip(&ctx, "nbma_address", a)?;
                if ip.is_ipv4() != tip.is_ipv4() {
                    // Mixed families would need a second codec path nobody tests; refuse early.
                    return Err(ctx.err(
                        "nbma_address",
                        format!("{ip} is not of the same address family as tunnel_address {tip}; mixed IPv4/IPv6 underlay and overlay are not supported"),
                    ));
                }
                NbmaSource::Address(ip)
            }
            (None, Some(i)) => {
                valid_ifname(i).map_err(|m| ctx.err("nbma_interface", m))?;
                NbmaSource::Interface(i.to_owned())
            }
        };

        let gre_key = match self.gre_key {
            None => None,
            Some(k) => Some(in_range(&ctx, "gre_key", k, 0, u32::MAX.into(), "")? as u32),
        };
        let holdtime = match self.holdtime {
            None => DEFAULT_HOLDTIME,
            Some(h) => in_range(&ctx, "holdtime", h, 1, 65000, " seconds")? as u16,
        };
        let phase = match self.phase {
            None => Phase::THREE,
            Some(p) => Phase(in_range(&ctx, "phase", p, 1, 3, " (DMVPN phase)")? as u8),
        };

        let mut local_prefixes = Vec::new();
        for (i, s) in self.local_prefixes.unwrap_or_default().iter().enumerate() {
            let field = format!("local_prefixes[{i}]");
            let p = parse_prefix(&ctx, &field, s)?;
            if p.addr().is_ipv4() != tip.is_ipv4() {
                return Err(ctx.err(&field, format!("{p} is not of the tunnel's address family")));
            }
            // The engine neither registers nor installs prefixes broader than this (as FRR).
            let min_len = if p.addr().is_ipv4() { 8 } else { 16 };
            if p.prefix_len() < min_len {
                return Err(ctx.err(
                    &field,
                    format!(
                        "{p} is broader than /{min_len}; NHRP does not register prefixes that broad"
                    ),
                ));
            }
            if overlaps(&p, &tunnel_net) {
                return Err(ctx.err(
                    &field,
                    format!("{p} overlaps the tunnel network {tunnel_net}; local prefixes are the LANs behind this node"),
                ));
            }
            if let Some(prev) = local_prefixes.iter().find(|q| overlaps(q, &p)) {
                return Err(ctx.err(&field, format!("{p} overlaps {prev} listed before it")));
            }
            local_prefixes.push(p);
        }

        let nhrp_auth = match self.nhrp_auth {
            None => None,
            Some(a) if a.is_empty() => {
                return Err(ctx.err("nhrp_auth", "is empty; remove it or give 1 to 8 bytes"));
            }
            Some(a) if a.len() > MAX_NHRP_AUTH => {
                return Err(ctx.err(
                    "nhrp_auth",
                    format!(
                        "is {} bytes long; Cisco cleartext authentication allows at most {MAX_NHRP_AUTH}",
                        a.len()
                    ),
                ));
            }
            Some(a) => Some(a.into_bytes()),
        };

        let control_socket = PathBuf::from(
            self.control_socket
                .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.to_owned()),
        );
        {
            let s = control_socket.as_os_str();
            if s.is_empty() {
                return Err(ctx.err(
                    "control_socket",
                    "is empty; give a path such as /run/dmvpn/agent.sock",
                ));
            }
            if s.len() > MAX_SOCKET_PATH {
                return Err(ctx.err(
                    "control_socket",
                    format!(
                        "{} is {} bytes long; a Unix socket path has at most {MAX_SOCKET_PATH}",
                        control_socket.display(),
                        s.len()
                    ),
                ));
            }
            if control_socket.file_name().is_none() {
                return Err(ctx.err(
                    "control_socket",
                    format!("{} does not name a file", control_socket.display()),
                ));
            }
        }

        let dataplane = match self.dataplane.as_deref() {
            None | Some("userspace") => DataplaneKind::Userspace,
            Some("kernel") => {
                return Err(ctx.err(
                    "dataplane",
                    "\"kernel\" is not available in this build; use \"userspace\"",
                ));
            }
            Some(other) => {
                return Err(ctx.err(
                    "dataplane",
                    format!("{other:?} is not a data plane: use \"userspace\""),
                ));
            }
        };

        let tun_name = self.tun_name.unwrap_or_else(|| DEFAULT_TUN_NAME.to_owned());
        valid_ifname(&tun_name).map_err(|m| ctx.err("tun_name", m))?;
        if let NbmaSource::Interface(i) = &nbma
            && *i == tun_name
        {
            return Err(ctx.err(
                "nbma_interface",
                format!(
                    "{i:?} is the tunnel device itself (tun_name); name the underlay interface"
                ),
            ));
        }

        let log_level = self.log_level.unwrap_or_else(|| "info".to_owned());
        if !matches!(
            log_level.as_str(),
            "trace" | "debug" | "info" | "warn" | "error"
        ) {
            return Err(ctx.err(
                "log_level",
                format!("{log_level:?} is not a level: use trace, debug, info, warn or error"),
            ));
        }

        let redirect_rate_limit_secs = match self.redirect_rate_limit_secs {
            None => DEFAULT_REDIRECT_RATE_LIMIT_SECS,
            Some(v) => in_range(&ctx, "redirect_rate_limit_secs", v, 1, 3600, " seconds")? as u32,
        };

        let min_mtu = if tip.is_ipv4() { 576 } else { 1280 };
        let mtu = match self.mtu {
            None => None,
            Some(m) => Some(in_range(&ctx, "mtu", m, min_mtu, 9000, " bytes")? as u16),
        };

        let mut nhs = Vec::new();
        let raw_nhs = self.nhs.unwrap_or_default();
        if role == Role::Spoke && raw_nhs.is_empty() {
            return Err(ctx.err(
                "nhs",
                "a spoke needs at least one [[nhs]] entry (tunnel_address and nbma_address of a hub)",
            ));
        }
        let mut seen_tunnel = HashSet::new();
        let mut seen_nbma = HashSet::new();
        for (i, n) in raw_nhs.into_iter().enumerate() {
            let f = |name: &str| format!("nhs[{i}].{name}");
            let ta = match n.tunnel_address.as_deref() {
                None => {
                    return Err(ctx.err(f("tunnel_address"), "missing: the hub's overlay address"));
                }
                Some(s) => parse_ip(&ctx, &f("tunnel_address"), s)?,
            };
            if !tunnel_net.contains(&ta) {
                return Err(ctx.err(
                    f("tunnel_address"),
                    format!(
                        "{ta} is not inside the tunnel network {tunnel_net} (from tunnel_address)"
                    ),
                ));
            }
            if ta == tip {
                return Err(ctx.err(
                    f("tunnel_address"),
                    format!("{ta} is this node's own tunnel_address"),
                ));
            }
            let na = match n.nbma_address.as_deref() {
                None => {
                    return Err(ctx.err(f("nbma_address"), "missing: the hub's underlay address"));
                }
                Some(s) => parse_ip(&ctx, &f("nbma_address"), s)?,
            };
            if na.is_ipv4() != tip.is_ipv4() {
                return Err(ctx.err(
                    f("nbma_address"),
                    format!("{na} is not of the tunnel's address family"),
                ));
            }
            if let NbmaSource::Address(own) = &nbma
                && *own == na
            {
                return Err(ctx.err(
                    f("nbma_address"),
                    format!("{na} is this node's own nbma_address"),
                ));
            }
            let priority = match n.priority {
                None => 0,
                Some(p) => in_range(&ctx, &f("priority"), p, 0, 255, "")? as u8,
            };
            if !seen_tunnel.insert(ta) {
                return Err(ctx.err(
                    f("tunnel_address"),
                    format!("duplicate NHS: {ta} is listed twice"),
                ));
            }
            if !seen_nbma.insert(na) {
                return Err(ctx.err(
                    f("nbma_address"),
                    format!("duplicate NHS: NBMA address {na} is listed twice"),
                ));
            }
            nhs.push(NhsConfig {
                tunnel_address: ta,
                nbma_address: na,
                priority,
            });
        }

        // Without an NHS (a top-level hub) these are only kernel routes into the TUN; the
        // data plane then forwards by the registered spokes' prefixes.
        let raw_routes = self.overlay_routes.unwrap_or_default();
        let mut overlay_routes: Vec<IpNet> = Vec::new();
        for (i, s) in raw_routes.iter().enumerate() {
            let field = format!("overlay_routes[{i}]");
            let p = parse_prefix(&ctx, &field, s)?;
            if p.addr().is_ipv4() != tip.is_ipv4() {
                return Err(ctx.err(&field, format!("{p} is not of the tunnel's address family")));
            }
            // Routing an underlay address into the tunnel would send the GRE packets into
            // the tunnel itself.
            for n in &nhs {
                if p.contains(&n.nbma_address) {
                    return Err(ctx.err(
                        &field,
                        format!(
                            "{p} contains the NBMA address {} of NHS {}; routing it into the tunnel would loop",
                            n.nbma_address, n.tunnel_address
                        ),
                    ));
                }
            }
            if let NbmaSource::Address(own) = &nbma
                && p.contains(own)
            {
                return Err(ctx.err(
                    &field,
                    format!("{p} contains this node's own nbma_address {own}; routing it into the tunnel would loop"),
                ));
            }
            // A broader overlay route around a local LAN is the usual setup (the LAN's own,
            // longer route wins); one inside a local LAN would pull the LAN into the tunnel.
            if let Some(lp) = local_prefixes.iter().find(|q| q.contains(&p)) {
                return Err(ctx.err(
                    &field,
                    format!("{p} lies inside local prefix {lp}; a local LAN must not be routed into the tunnel"),
                ));
            }
            if overlay_routes.contains(&p) {
                return Err(ctx.err(&field, format!("{p} is listed twice")));
            }
            overlay_routes.push(p);
        }

        let ipsec = self.ipsec.unwrap_or_default().validate(&ctx)?;

        Ok(Config {
            role,
            tunnel_address,
            nbma,
            gre_key,
            holdtime,
            phase,
            local_prefixes,
            overlay_routes,
            nhrp_auth,
            registration_unique: self.registration_unique.unwrap_or(false),
            control_socket,
            dataplane,
            tun_name,
            log_level,
            redirect_rate_limit_secs,
            mtu,
            nhs,
            ipsec,
        })
    }
}

/// The first address of `family` (IPv4 when `v4`) on interface `name`, skipping link-local
/// IPv6 addresses. `Ok(None)` when the interface exists but has no such address yet.
pub fn interface_address(name: &str, v4: bool) -> Result<Option<IpAddr>, String> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("getifaddrs: {e}"))?;
    let mut exists = false;
    for ifa in addrs {
        if ifa.interface_name != name {
            continue;
        }
        exists = true;
        let Some(addr) = ifa.address else { continue };
        if v4 {
            if let Some(sin) = addr.as_sockaddr_in() {
                return Ok(Some(IpAddr::V4(sin.ip())));
            }
        } else if let Some(sin6) = addr.as_sockaddr_in6() {
            let ip = sin6.ip();
            // fe80::/10 cannot be an NBMA address reachable from other nodes.
            if !ip.is_unicast_link_local() {
                return Ok(Some(IpAddr::V6(ip)));
            }
        }
    }
    if exists {
        Ok(None)
    } else {
        Err(format!("interface {name:?} does not exist"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPOKE: &str = r#"
role = "spoke"
tunnel_address = "10.42.0.2/24"
nbma_address = "198.51.100.2"
gre_key = 42
holdtime = 600
phase = 3
local_prefixes = ["10.1.2.0/24"]
nhrp_auth = "secret"
registration_unique = false
control_socket = "/run/dmvpn/agent.sock"
dataplane = "userspace"
tun_name = "dmvpn0"
ipsec = { psk = "a-test-key-of-24-bytes!!" }

[[nhs]]
tunnel_address = "10.42.0.1"
nbma_address = "198.51.100.1"
priority = 0
"#;

    fn err_of(text: &str) -> ConfigError {
        match parse(text, "test.toml") {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e,
        }
    }

    /// Replaces the line starting with `key =` in SPOKE (or appends `line` at the top level).
    fn spoke_with(key: &str, line: &str) -> String {
        let mut out = String::new();
        let mut replaced = false;
        for l in SPOKE.lines() {
            if !replaced && l.starts_with(&format!("{key} =")) {
                out.push_str(line);
                replaced = true;
            } else {
                out.push_str(l);
            }
            out.push('\n');
        }
        if replaced {
            out
        } else {
            format!("{line}\n{out}")
        }
    }

    fn assert_field(e: &ConfigError, field: &str, words: &str) {
        let msg = e.to_string();
        assert!(msg.contains("test.toml"), "no file name in {msg:?}");
        assert!(msg.contains(field), "field {field:?} not named in {msg:?}");
        assert!(msg.contains(words), "{words:?} not in {msg:?}");
    }

    #[test]
    fn doc_example_parses() {
        let c = parse(SPOKE, "test.toml").unwrap();
        assert_eq!(c.role, Role::Spoke);
        assert_eq!(c.tunnel_address.to_string(), "10.42.0.2/24");
        assert_eq!(c.tunnel_network().to_string(), "10.42.0.0/24");
        assert_eq!(c.nbma, NbmaSource::Address("198.51.100.2".parse().unwrap()));
        assert_eq!(c.gre_key, Some(42));
        assert_eq!(c.holdtime, 600);
        assert_eq!(c.phase, Phase::THREE);
        assert_eq!(c.nhrp_auth.as_deref(), Some(&b"secret"[..]));
        assert_eq!(c.nhs.len(), 1);
        assert_eq!(c.nhs[0].nbma_address.to_string(), "198.51.100.1");
        assert_eq!(c.dataplane, DataplaneKind::Userspace);
        assert!(c.overlay_routes.is_empty());
    }

    #[test]
    fn defaults() {
        let c = parse(
            "role = \"hub\"\ntunnel_address = \"10.42.0.1/24\"\nnbma_interface = \"eth0\"\n[ipsec]\npsk = \"0123456789abcdef\"\n",
            "test.toml",
        )
        .unwrap();
        assert!(c.ipsec.enabled);
        assert_eq!(
            c.ipsec.auth,
            Some(IpsecAuth::Psk(Secret(b"0123456789abcdef".to_vec())))
        );
        assert_eq!(
            c.ipsec.ciphers,
            vec![Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305]
        );
        assert_eq!(c.ipsec.dh_groups, vec![DhGroup::X25519, DhGroup::P256]);
        assert_eq!(c.ipsec.child_lifetime_secs, DEFAULT_CHILD_LIFETIME);
        assert_eq!(c.ipsec.dpd_interval_secs, DEFAULT_DPD_INTERVAL);
        assert!(!c.ipsec.force_udp_encap);
        assert_eq!(c.holdtime, DEFAULT_HOLDTIME);
        assert_eq!(c.phase, Phase::THREE);
        assert_eq!(c.gre_key, None);
        assert_eq!(c.tun_name, DEFAULT_TUN_NAME);
        assert_eq!(c.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        assert_eq!(c.nbma, NbmaSource::Interface("eth0".into()));
        assert!(!c.registration_unique);
        assert_eq!(c.log_level, "info");
        assert!(c.nhs.is_empty());
    }

    #[test]
    fn unknown_field_rejected() {
        let e = err_of(&spoke_with("holdtme", "holdtme = 5"));
        assert_field(&e, "holdtme", "unknown field");
    }

    #[test]
    fn unknown_nhs_field_rejected() {
        let e = err_of(&format!("{SPOKE}prio = 3\n"));
        assert_field(&e, "prio", "unknown field");
    }

    #[test]
    fn wrong_type_names_field_and_line() {
        let e = err_of(&spoke_with("gre_key", "gre_key = \"forty-two\""));
        assert_field(&e, "gre_key", "invalid type");
        assert!(e.to_string().contains("test.toml:5:"), "{e}");
        let e = err_of(&format!("{SPOKE}\n[[nhs]]\ntunnel_address = 7\n"));
        assert_field(&e, "nhs[1].tunnel_address", "invalid type");
    }

    #[test]
    fn role_missing_or_wrong() {
        let e = err_of(&SPOKE.replace("role = \"spoke\"\n", ""));
        assert_field(&e, "role", "missing");
        let e = err_of(&spoke_with("role", "role = \"server\""));
        assert_field(&e, "role", "\"server\"");
    }

    #[test]
    fn spoke_without_nhs() {
        let text = SPOKE.split("[[nhs]]").next().unwrap();
        let e = err_of(text);
        assert_field(&e, "nhs", "at least one");
    }

    #[test]
    fn hub_with_nhs_is_fine() {
        let c = parse(&spoke_with("role", "role = \"hub\""), "test.toml").unwrap();
        assert_eq!(c.role, Role::Hub);
        assert_eq!(c.nhs.len(), 1);
    }

    #[test]
    fn password_too_long() {
        let e = err_of(&spoke_with("nhrp_auth", "nhrp_auth = \"123456789\""));
        assert_field(&e, "nhrp_auth", "at most 8");
        let e = err_of(&spoke_with("nhrp_auth", "nhrp_auth = \"\""));
        assert_field(&e, "nhrp_auth", "empty");
        // 8 bytes is the limit; multi-byte characters count in bytes.
        parse(
            &spoke_with("nhrp_auth", "nhrp_auth = \"12345678\""),
            "test.toml",
        )
        .unwrap();
        let e = err_of(&spoke_with("nhrp_auth", "nhrp_auth = \"ééééé\""));
        assert_field(&e, "nhrp_auth", "10 bytes");
    }

    #[test]
    fn holdtime_range() {
        let e = err_of(&spoke_with("holdtime", "holdtime = 0"));
        assert_field(&e, "holdtime", "1..=65000");
        let e = err_of(&spoke_with("holdtime", "holdtime = 65001"));
        assert_field(&e, "holdtime", "out of range");
        let e = err_of(&spoke_with("holdtime", "holdtime = -5"));
        assert_field(&e, "holdtime", "out of range");
    }

    #[test]
    fn phase_range() {
        let e = err_of(&spoke_with("phase", "phase = 4"));
        assert_field(&e, "phase", "1..=3");
    }

    #[test]
    fn gre_key_range() {
        let e = err_of(&spoke_with("gre_key", "gre_key = 4294967296"));
        assert_field(&e, "gre_key", "out of range");
    }

    #[test]
    fn tunnel_address_checks() {
        let e = err_of(&spoke_with(
            "tunnel_address",
            "tunnel_address = \"10.42.0.2\"",
        ));
        assert_field(&e, "tunnel_address", "address/prefix-length");
        let e = err_of(&spoke_with(
            "tunnel_address",
            "tunnel_address = \"10.42.0.2/32\"",
        ));
        assert_field(&e, "tunnel_address", "host route");
        let e = err_of(&spoke_with(
            "tunnel_address",
            "tunnel_address = \"10.42.0.0/24\"",
        ));
        assert_field(&e, "tunnel_address", "network address");
        let e = err_of(&spoke_with(
            "tunnel_address",
            "tunnel_address = \"10.42.0.255/24\"",
        ));
        assert_field(&e, "tunnel_address", "broadcast");
    }

    #[test]
    fn nhs_outside_tunnel_network() {
        let e = err_of(&SPOKE.replace(
            "tunnel_address = \"10.42.0.1\"",
            "tunnel_address = \"10.43.0.1\"",
        ));
        assert_field(
            &e,
            "nhs[0].tunnel_address",
            "not inside the tunnel network 10.42.0.0/24",
        );
    }

    #[test]
    fn nhs_is_self() {
        let e = err_of(&SPOKE.replace(
            "tunnel_address = \"10.42.0.1\"",
            "tunnel_address = \"10.42.0.2\"",
        ));
        assert_field(&e, "nhs[0].tunnel_address", "own tunnel_address");
        let e = err_of(&SPOKE.replace(
            "nbma_address = \"198.51.100.1\"",
            "nbma_address = \"198.51.100.2\"",
        ));
        assert_field(&e, "nhs[0].nbma_address", "own nbma_address");
    }

    #[test]
    fn duplicate_nhs() {
        let text = format!(
            "{SPOKE}\n[[nhs]]\ntunnel_address = \"10.42.0.1\"\nnbma_address = \"198.51.100.9\"\n"
        );
        let e = err_of(&text);
        assert_field(&e, "nhs[1].tunnel_address", "duplicate");
        let text = format!(
            "{SPOKE}\n[[nhs]]\ntunnel_address = \"10.42.0.9\"\nnbma_address = \"198.51.100.1\"\n"
        );
        let e = err_of(&text);
        assert_field(&e, "nhs[1].nbma_address", "duplicate");
    }

    #[test]
    fn nhs_missing_fields_and_priority() {
        let e = err_of(&format!(
            "{SPOKE}\n[[nhs]]\nnbma_address = \"198.51.100.9\"\n"
        ));
        assert_field(&e, "nhs[1].tunnel_address", "missing");
        let e = err_of(&format!(
            "{SPOKE}\n[[nhs]]\ntunnel_address = \"10.42.0.9\"\n"
        ));
        assert_field(&e, "nhs[1].nbma_address", "missing");
        let e = err_of(&SPOKE.replace("priority = 0", "priority = 256"));
        assert_field(&e, "nhs[0].priority", "0..=255");
        let e = err_of(&SPOKE.replace(
            "nbma_address = \"198.51.100.1\"",
            "nbma_address = \"hub.example\"",
        ));
        assert_field(&e, "nhs[0].nbma_address", "not an IP address");
    }

    #[test]
    fn local_prefix_checks() {
        let e = err_of(&spoke_with(
            "local_prefixes",
            "local_prefixes = [\"10.42.0.0/16\"]",
        ));
        assert_field(&e, "local_prefixes[0]", "overlaps the tunnel network");
        let e = err_of(&spoke_with(
            "local_prefixes",
            "local_prefixes = [\"10.42.0.128/25\"]",
        ));
        assert_field(&e, "local_prefixes[0]", "overlaps the tunnel network");
        let e = err_of(&spoke_with(
            "local_prefixes",
            "local_prefixes = [\"10.1.2.1/24\"]",
        ));
        assert_field(&e, "local_prefixes[0]", "did you mean 10.1.2.0/24");
        let e = err_of(&spoke_with(
            "local_prefixes",
            "local_prefixes = [\"10.1.0.0/16\", \"10.1.2.0/24\"]",
        ));
        assert_field(&e, "local_prefixes[1]", "overlaps 10.1.0.0/16");
        let e = err_of(&spoke_with(
            "local_prefixes",
            "local_prefixes = [\"172.0.0.0/7\"]",
        ));
        assert_field(&e, "local_prefixes[0]", "broader than /8");
        let e = err_of(&spoke_with("local_prefixes", "local_prefixes = [\"lan\"]"));
        assert_field(&e, "local_prefixes[0]", "not a prefix");
    }

    #[test]
    fn overlay_route_checks() {
        let e = err_of(&spoke_with(
            "overlay_routes",
            "overlay_routes = [\"0.0.0.0/0\"]",
        ));
        assert_field(&e, "overlay_routes[0]", "would loop");
        let e = err_of(&spoke_with(
            "overlay_routes",
            "overlay_routes = [\"10.1.2.128/25\"]",
        ));
        assert_field(&e, "overlay_routes[0]", "inside local prefix 10.1.2.0/24");
        // A summary around the local LAN is fine: the LAN's longer route wins locally.
        let c = parse(
            &spoke_with("overlay_routes", "overlay_routes = [\"10.0.0.0/8\"]"),
            "test.toml",
        )
        .unwrap();
        assert_eq!(
            c.overlay_routes,
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        let e = err_of(&spoke_with(
            "overlay_routes",
            "overlay_routes = [\"10.0.0.0/8\", \"10.0.0.0/8\"]",
        ));
        assert_field(&e, "overlay_routes[1]", "listed twice");
    }

    #[test]
    fn hub_overlay_routes_without_nhs() {
        let text = "role = \"hub\"\ntunnel_address = \"10.42.0.1/24\"\nnbma_address = \"198.51.100.1\"\noverlay_routes = [\"10.100.0.0/16\"]\n[ipsec]\nenabled = false\n";
        let c = parse(text, "test.toml").unwrap();
        assert!(!c.ipsec.enabled);
        assert_eq!(
            c.overlay_routes,
            vec!["10.100.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert!(c.nhs.is_empty());
    }

    #[test]
    fn nbma_source_exactly_one() {
        let e = err_of(&spoke_with(
            "nbma_address",
            "nbma_address = \"198.51.100.2\"\nnbma_interface = \"eth0\"",
        ));
        assert_field(&e, "nbma_address", "exactly one");
        let e = err_of(&SPOKE.replace("nbma_address = \"198.51.100.2\"\n", ""));
        assert_field(&e, "nbma_address", "missing");
        let e = err_of(&spoke_with("nbma_address", "nbma_address = \"0.0.0.0\""));
        assert_field(&e, "nbma_address", "unspecified");
        let e = err_of(&spoke_with(
            "nbma_address",
            "nbma_address = \"2001:db8::1\"",
        ));
        assert_field(&e, "nbma_address", "address family");
        let e = err_of(&spoke_with("nbma_address", "nbma_interface = \"a/b\""));
        assert_field(&e, "nbma_interface", "not a valid interface name");
        let e = err_of(&spoke_with("nbma_address", "nbma_interface = \"dmvpn0\""));
        assert_field(&e, "nbma_interface", "tunnel device itself");
    }

    #[test]
    fn dataplane_kernel_rejected() {
        let e = err_of(&spoke_with("dataplane", "dataplane = \"kernel\""));
        assert_field(&e, "dataplane", "not available in this build");
        let e = err_of(&spoke_with("dataplane", "dataplane = \"dpdk\""));
        assert_field(&e, "dataplane", "\"dpdk\"");
    }

    #[test]
    fn tun_name_checks() {
        let e = err_of(&spoke_with(
            "tun_name",
            "tun_name = \"a-very-long-tunnel-name\"",
        ));
        assert_field(&e, "tun_name", "at most 15");
        let e = err_of(&spoke_with("tun_name", "tun_name = \"\""));
        assert_field(&e, "tun_name", "empty");
    }

    #[test]
    fn control_socket_checks() {
        let long = format!("control_socket = \"/{}\"", "x".repeat(120));
        let e = err_of(&spoke_with("control_socket", &long));
        assert_field(&e, "control_socket", "at most 107");
        let e = err_of(&spoke_with("control_socket", "control_socket = \"\""));
        assert_field(&e, "control_socket", "empty");
    }

    #[test]
    fn log_level_mtu_redirect() {
        let e = err_of(&spoke_with("log_level", "log_level = \"loud\""));
        assert_field(&e, "log_level", "\"loud\"");
        let e = err_of(&spoke_with("mtu", "mtu = 100"));
        assert_field(&e, "mtu", "576..=9000");
        let e = err_of(&spoke_with(
            "redirect_rate_limit_secs",
            "redirect_rate_limit_secs = 0",
        ));
        assert_field(&e, "redirect_rate_limit_secs", "out of range");
        let c = parse(
            &spoke_with("mtu", "mtu = 1400\nredirect_rate_limit_secs = 10"),
            "test.toml",
        )
        .unwrap();
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(c.redirect_rate_limit_secs, 10);
    }

    #[test]
    fn toml_syntax_error_is_one_line() {
        let e = err_of("role = \"spoke\"\nfoo");
        let msg = e.to_string();
        assert!(msg.starts_with("test.toml:2:"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn load_names_missing_file() {
        let e = load(Path::new("/nonexistent/dmvpn.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dmvpn.toml"), "{e}");
    }

    #[test]
    fn loopback_interface_address() {
        // `lo` exists in every namespace and carries 127.0.0.1 once it is configured; its
        // presence is what matters here, the address only when it is up.
        assert!(interface_address("lo", true).is_ok());
        assert!(interface_address("no-such-if0", true).is_err());
    }

    const HUB: &str =
        "role = \"hub\"\ntunnel_address = \"10.42.0.1/24\"\nnbma_address = \"198.51.100.1\"\n";

    #[test]
    fn ipsec_needs_credentials_by_default() {
        let e = err_of(HUB);
        assert_field(&e, "ipsec", "psk");
        let e = err_of(&format!("{HUB}[ipsec]\npsk = \"short\"\n"));
        assert_field(&e, "ipsec.psk", "at least 16");
        let e = err_of(&format!(
            "{HUB}[ipsec]\npsk = \"0123456789abcdef\"\npsk_file = \"/x\"\n"
        ));
        assert_field(&e, "ipsec.psk", "exactly one");
        let e = err_of(&format!("{HUB}[ipsec]\npsk_file = \"/nonexistent/psk\"\n"));
        assert_field(&e, "ipsec.psk_file", "/nonexistent/psk");
        let e = err_of(&format!("{HUB}[ipsec]\nauth = \"rsa\"\n"));
        assert_field(&e, "ipsec.auth", "\"psk\" or \"certificate\"");
        let e = err_of(&format!(
            "{HUB}[ipsec]\nauth = \"certificate\"\nca = \"/a\"\ncert = \"/b\"\n"
        ));
        assert_field(&e, "ipsec.key", "dmvpn-agent cert");
        let e = err_of(&format!("{HUB}[ipsec]\nbogus = 1\n"));
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn ipsec_fields() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("psk");
        std::fs::write(&f, "0123456789abcdefXYZ\n").unwrap();
        let c = parse(
            &format!(
                "{HUB}[ipsec]\npsk_file = \"{}\"\nproposals = [\"chacha20poly1305\", \"p256\"]\nike_lifetime = 3600\nchild_lifetime = 600\nforce_udp_encap = true\ndpd_interval = 0\n",
                f.display()
            ),
            "test.toml",
        )
        .unwrap();
        assert_eq!(
            c.ipsec.auth,
            Some(IpsecAuth::Psk(Secret(b"0123456789abcdefXYZ".to_vec())))
        );
        assert_eq!(c.ipsec.ciphers, vec![Cipher::ChaCha20Poly1305]);
        assert_eq!(c.ipsec.dh_groups, vec![DhGroup::P256]);
        assert_eq!(
            (c.ipsec.ike_lifetime_secs, c.ipsec.child_lifetime_secs),
            (3600, 600)
        );
        assert!(c.ipsec.force_udp_encap);
        assert_eq!(c.ipsec.dpd_interval_secs, 0);
        assert!(
            !format!("{c:?}").contains("0123456789abcdef"),
            "the key is redacted"
        );
        let c = parse(
            &format!("{HUB}[ipsec]\nauth = \"certificate\"\nca = \"/c/ca.pem\"\ncert = \"/c/n.pem\"\nkey = \"/c/n.key\"\n"),
            "test.toml",
        )
        .unwrap();
        assert!(matches!(c.ipsec.auth, Some(IpsecAuth::Certificate { .. })));
        let e = err_of(&format!(
            "{HUB}[ipsec]\npsk = \"0123456789abcdef\"\nproposals = [\"aes128cbc\"]\n"
        ));
        assert_field(&e, "ipsec.proposals[0]", "aes256gcm");
        let e = err_of(&format!(
            "{HUB}[ipsec]\npsk = \"0123456789abcdef\"\nike_lifetime = 600\nchild_lifetime = 900\n"
        ));
        assert_field(&e, "ipsec.child_lifetime", "ike_lifetime");
    }
}
