//! Engine configuration and its validation.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

/// What the node is in the NHRP topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Next Hop Server. With a non-empty [`Config::nhs`] list it is also a client of upstream
    /// hubs (hub hierarchy): it registers there and forwards resolutions it cannot answer.
    Hub,
    /// Next Hop Client: registers to every [`Config::nhs`] (at least one is required).
    Spoke,
}

/// DMVPN phase: 1 hub-and-spoke only, 2 data-driven resolution, 3 redirect + shortcut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Phase {
    One = 1,
    Two = 2,
    Three = 3,
}

impl TryFrom<u8> for Phase {
    type Error = ConfigError;
    fn try_from(v: u8) -> Result<Self, ConfigError> {
        match v {
            1 => Ok(Phase::One),
            2 => Ok(Phase::Two),
            3 => Ok(Phase::Three),
            _ => Err(ConfigError::new("phase", format!("{v} is not 1, 2 or 3"))),
        }
    }
}

/// A statically configured Next Hop Server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NhsConfig {
    /// Its overlay (tunnel) address.
    pub tunnel_address: IpAddr,
    /// Its underlay address.
    pub nbma_address: IpAddr,
    /// Lower value = preferred (Cisco convention); ties go to the earlier entry.
    pub priority: u8,
}

/// Per-(source, destination) limit on Traffic Indications sent by a hub (phase 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectLimit {
    /// At most `burst` indications per `interval` for one (source, destination) pair.
    pub interval: Duration,
    pub burst: u32,
    /// Cap on Traffic Indications per second over all pairs (Cisco `max-send` analogue).
    pub global_per_second: u32,
    /// Pairs remembered at most; idle pairs are evicted first, and when the table is full of
    /// active pairs new pairs get no indication (bounded memory under a flood).
    pub max_pairs: usize,
}

impl Default for RedirectLimit {
    fn default() -> Self {
        RedirectLimit {
            interval: Duration::from_secs(10),
            burst: 1,
            global_per_second: 1000,
            max_pairs: 65536,
        }
    }
}

/// Engine configuration. Build it with [`Config::new`] and adjust the public fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub role: Role,
    /// Our overlay address.
    pub tunnel_address: IpAddr,
    /// Prefix length of the tunnel network (e.g. 24 for 10.42.0.0/24).
    pub tunnel_prefix_len: u8,
    /// Our underlay address.
    pub nbma_address: IpAddr,
    /// Holding time we register and answer with, seconds, 1..=65000.
    pub holdtime: u16,
    /// U bit on our registrations (`false` = Cisco `registration no-unique`).
    pub registration_unique: bool,
    pub phase: Phase,
    /// Prefixes behind this node, registered as extra CIEs after the tunnel address CIE and
    /// used to answer resolutions with the right prefix length.
    pub local_prefixes: Vec<IpNet>,
    /// Cisco cleartext authentication password (at most 8 bytes).
    pub auth: Option<Vec<u8>>,
    /// MTU advertised in our CIEs (0 = not advertised).
    pub mtu: u16,
    /// NHSs to register to (spoke; or upstream hubs of a hub).
    pub nhs: Vec<NhsConfig>,
    /// Prefixes routed via the preferred NHS (RouteAdd with the NHS as next hop). A spoke's
    /// default is the tunnel network, so that traffic without a shortcut goes via the hub.
    pub routes_via_nhs: Vec<IpNet>,
    /// Hub: answer resolutions for registered clients itself instead of forwarding the
    /// request to the client (forwarding lets the client learn the requester: both
    /// directions get a shortcut).
    pub answer_for_clients: bool,
    pub redirect_limit: RedirectLimit,
    /// First request id. The shell should seed it from something that changes across
    /// restarts (RFC 2332 wants request ids not to repeat after a reboot).
    pub initial_request_id: u32,
    /// How long a failed resolution suppresses new attempts for that destination.
    pub negative_holdtime: Duration,
    /// Hop count of the requests we originate (Registration and Traffic Indication use 1).
    pub hop_count: u8,
}

/// Prefixes broader than this are neither registered nor installed as shortcuts (as FRR).
pub(crate) const MIN_PREFIX_LEN_V4: u8 = 8;
pub(crate) const MIN_PREFIX_LEN_V6: u8 = 16;

impl Config {
    /// A configuration with the defaults: holdtime 7200 s, no-unique, phase 3, no prefixes, no
    /// auth, no NHS, hop count 16.
    pub fn new(
        role: Role,
        tunnel_address: IpAddr,
        tunnel_prefix_len: u8,
        nbma_address: IpAddr,
    ) -> Config {
        let routes_via_nhs = match role {
            Role::Spoke => IpNet::new(tunnel_address, tunnel_prefix_len)
                .map(|n| vec![n.trunc()])
                .unwrap_or_default(),
            Role::Hub => Vec::new(),
        };
        Config {
            role,
            tunnel_address,
            tunnel_prefix_len,
            nbma_address,
            holdtime: 7200,
            registration_unique: false,
            phase: Phase::Three,
            local_prefixes: Vec::new(),
            auth: None,
            mtu: 0,
            nhs: Vec::new(),
            routes_via_nhs,
            answer_for_clients: false,
            redirect_limit: RedirectLimit::default(),
            initial_request_id: 1,
            negative_holdtime: Duration::from_secs(30),
            hop_count: 16,
        }
    }

    /// The tunnel network (tunnel address with the prefix length, host bits cleared).
    pub fn tunnel_network(&self) -> Result<IpNet, ConfigError> {
        IpNet::new(self.tunnel_address, self.tunnel_prefix_len)
            .map(|n| n.trunc())
            .map_err(|_| {
                ConfigError::new(
                    "tunnel_prefix_len",
                    format!(
                        "{} is too long for {}",
                        self.tunnel_prefix_len, self.tunnel_address
                    ),
                )
            })
    }

    /// Checks every field; the error names the field and what is wrong with it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let net = self.tunnel_network()?;
        if self.tunnel_address.is_unspecified() || self.tunnel_address.is_multicast() {
            return Err(ConfigError::new(
                "tunnel_address",
                format!("{} is not a unicast address", self.tunnel_address),
            ));
        }
        if self.nbma_address.is_unspecified() || self.nbma_address.is_multicast() {
            return Err(ConfigError::new(
                "nbma_address",
                format!("{} is not a unicast address", self.nbma_address),
            ));
        }
        if !(1..=65000).contains(&self.holdtime) {
            return Err(ConfigError::new(
                "holdtime",
                format!("{} s is outside 1..=65000", self.holdtime),
            ));
        }
        if let Some(pw) = &self.auth
            && (pw.is_empty() || pw.len() > 8)
        {
            return Err(ConfigError::new(
                "nhrp_auth",
                format!(
                    "{} bytes; the Cisco cleartext password is 1 to 8 bytes",
                    pw.len()
                ),
            ));
        }
        if self.hop_count == 0 {
            return Err(ConfigError::new("hop_count", "must be at least 1".into()));
        }
        for p in &self.local_prefixes {
            if p.addr().is_ipv4() != self.tunnel_address.is_ipv4() {
                return Err(ConfigError::new(
                    "local_prefixes",
                    format!("{p} is not of the tunnel address family"),
                ));
            }
            let min = if p.addr().is_ipv4() {
                MIN_PREFIX_LEN_V4
            } else {
                MIN_PREFIX_LEN_V6
            };
            if p.prefix_len() < min {
                return Err(ConfigError::new(
                    "local_prefixes",
                    format!("{p} is broader than /{min}"),
                ));
            }
        }
        for r in &self.routes_via_nhs {
            if r.addr().is_ipv4() != self.tunnel_address.is_ipv4() {
                return Err(ConfigError::new(
                    "routes_via_nhs",
                    format!("{r} is not of the tunnel address family"),
                ));
            }
        }
        match self.role {
            Role::Spoke if self.nhs.is_empty() => {
                return Err(ConfigError::new(
                    "nhs",
                    "a spoke needs at least one NHS ([[nhs]] entry)".into(),
                ));
            }
            _ => {}
        }
        for (i, n) in self.nhs.iter().enumerate() {
            if n.tunnel_address.is_ipv4() != self.tunnel_address.is_ipv4() {
                return Err(ConfigError::new(
                    "nhs.tunnel_address",
                    format!(
                        "NHS #{i} {} is not of the tunnel address family",
                        n.tunnel_address
                    ),
                ));
            }
            if !net.contains(&n.tunnel_address) {
                return Err(ConfigError::new(
                    "nhs.tunnel_address",
                    format!(
                        "NHS #{i} {} is outside the tunnel network {net}",
                        n.tunnel_address
                    ),
                ));
            }
            if n.tunnel_address == self.tunnel_address {
                return Err(ConfigError::new(
                    "nhs.tunnel_address",
                    format!("NHS #{i} {} is our own tunnel address", n.tunnel_address),
                ));
            }
            if n.nbma_address.is_ipv4() != self.nbma_address.is_ipv4() {
                return Err(ConfigError::new(
                    "nhs.nbma_address",
                    format!(
                        "NHS #{i} {} is not of the NBMA address family",
                        n.nbma_address
                    ),
                ));
            }
            if self.nhs[..i]
                .iter()
                .any(|o| o.tunnel_address == n.tunnel_address)
            {
                return Err(ConfigError::new(
                    "nhs.tunnel_address",
                    format!("NHS {} is listed twice", n.tunnel_address),
                ));
            }
        }
        let rl = &self.redirect_limit;
        if rl.interval.is_zero() || rl.burst == 0 || rl.global_per_second == 0 || rl.max_pairs == 0
        {
            return Err(ConfigError::new(
                "redirect_limit",
                "interval, burst, global_per_second and max_pairs must all be non-zero".into(),
            ));
        }
        // Bounds that keep every deadline computation far from Instant overflow.
        if rl.interval > Duration::from_secs(3600) || rl.burst > 1000 {
            return Err(ConfigError::new(
                "redirect_limit",
                "interval is at most 3600 s and burst at most 1000".into(),
            ));
        }
        if self.negative_holdtime.is_zero() || self.negative_holdtime > Duration::from_secs(86400) {
            return Err(ConfigError::new(
                "negative_holdtime",
                format!("{:?} is outside 1 s..=1 day", self.negative_holdtime),
            ));
        }
        Ok(())
    }
}

/// A configuration field is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NHRP configuration: {field}: {reason}")]
pub struct ConfigError {
    /// The field at fault, as named in the agent's configuration file.
    pub field: &'static str,
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: String) -> ConfigError {
        ConfigError { field, reason }
    }
}
