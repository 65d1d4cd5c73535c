//! Configuration of an IKE endpoint.

use std::net::IpAddr;
use std::time::Duration;

use dmvpn_esp::Suite;
use zeroize::Zeroizing;

use crate::auth::Identity;
use crate::crypto::{DhGroup, Encr, Prf};

/// How this endpoint authenticates itself and its peers (the same method both ways).
#[derive(Clone)]
pub enum AuthConfig {
    /// One pre-shared key for every peer.
    Psk(Zeroizing<Vec<u8>>),
    /// X.509: our end-entity certificate (DER), its PKCS#8 private key (ECDSA P-256 or
    /// Ed25519), and the CA certificates (DER) peers' certificates must chain to.
    Certificate {
        cert: Vec<u8>,
        key_pkcs8: Zeroizing<Vec<u8>>,
        cas: Vec<Vec<u8>>,
    },
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthConfig::Psk(_) => f.write_str("Psk(<redacted>)"),
            AuthConfig::Certificate { cert, cas, .. } => f
                .debug_struct("Certificate")
                .field("cert_len", &cert.len())
                .field("cas", &cas.len())
                .finish_non_exhaustive(),
        }
    }
}

/// CHILD SA encapsulation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildMode {
    /// Transport mode (USE_TRANSPORT_MODE): what DMVPN uses for GRE between NBMA addresses.
    Transport,
    /// Tunnel mode (for peers that cannot do transport mode, e.g. strongSwan's libipsec).
    Tunnel,
}

/// Everything an [`crate::Endpoint`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our NBMA (underlay) address; IKE runs from it and CHILD SAs protect traffic from it.
    pub local_addr: IpAddr,
    /// The identity we send in IDi/IDr.
    pub local_id: Identity,
    pub auth: AuthConfig,
    /// IKE SA algorithms we offer/accept, in order of preference.
    pub ike_encr: Vec<Encr>,
    pub ike_prf: Vec<Prf>,
    pub ike_dh: Vec<DhGroup>,
    /// ESP AEAD suites for CHILD SAs, in order of preference.
    pub esp_suites: Vec<Suite>,
    /// Offer extended sequence numbers (we accept either when responding).
    pub esn: bool,
    pub mode: ChildMode,
    /// Perfect forward secrecy for rekeyed CHILD SAs: a fresh key exchange (first group of
    /// `ike_dh`) in each CREATE_CHILD_SA. The peer must allow a DH group in its ESP proposal.
    pub child_pfs: bool,
    /// IP protocol of the traffic selectors (47, GRE, for DMVPN; 0 for any).
    pub ts_protocol: u8,
    /// Lifetimes; rekeying starts at 90 % of them.
    pub ike_lifetime: Duration,
    pub child_lifetime: Duration,
    /// First retransmission timeout; doubles each time (RFC 7296 §2.4).
    pub retransmit_initial: Duration,
    /// Transmissions of one request before the peer is declared dead.
    pub retransmit_tries: u32,
    /// Send a liveness check after this much silence from the peer.
    pub dpd_interval: Option<Duration>,
    /// Half-open (responder, IKE_SA_INIT done, no IKE_AUTH yet) SAs above which cookies are
    /// demanded (RFC 7296 §2.6).
    pub cookie_threshold: usize,
    /// Hard limit of half-open SAs; further IKE_SA_INIT requests are dropped.
    pub max_half_open: usize,
    /// A half-open SA is forgotten after this long.
    pub half_open_timeout: Duration,
    /// Always move to UDP 4500 with ESP-in-UDP, even without NAT.
    pub force_udp_encap: bool,
    /// Fragment encrypted messages larger than this (RFC 7383), if the peer supports it.
    pub fragment_size: usize,
}

impl Config {
    /// Defaults: AES-GCM-256 then ChaCha20-Poly1305, HMAC-SHA-256 then SHA-384, X25519 then
    /// P-256, ESP AES-GCM-256 then ChaCha20-Poly1305 with ESN, transport mode, GRE selectors.
    pub fn new(local_addr: IpAddr, auth: AuthConfig) -> Self {
        Config {
            local_addr,
            local_id: Identity::Ip(local_addr),
            auth,
            ike_encr: vec![Encr::AesGcm256, Encr::ChaCha20Poly1305],
            ike_prf: vec![Prf::HmacSha256, Prf::HmacSha384],
            ike_dh: vec![DhGroup::X25519, DhGroup::P256],
            esp_suites: vec![Suite::Aes256Gcm, Suite::ChaCha20Poly1305],
            esn: true,
            mode: ChildMode::Transport,
            child_pfs: true,
            ts_protocol: 47,
            ike_lifetime: Duration::from_secs(4 * 3600),
            child_lifetime: Duration::from_secs(3600),
            retransmit_initial: Duration::from_millis(500),
            retransmit_tries: 6,
            dpd_interval: Some(Duration::from_secs(30)),
            cookie_threshold: 64,
            max_half_open: 1024,
            half_open_timeout: Duration::from_secs(30),
            force_udp_encap: false,
            fragment_size: 1280,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.ike_encr.is_empty() || self.ike_prf.is_empty() || self.ike_dh.is_empty() {
            return Err(ConfigError::EmptyProposal("IKE"));
        }
        if self.esp_suites.is_empty() {
            return Err(ConfigError::EmptyProposal("ESP"));
        }
        if self.retransmit_tries == 0
            || self.retransmit_tries > 16
            || self.retransmit_initial.is_zero()
            || self.retransmit_initial > Duration::from_secs(60)
        {
            return Err(ConfigError::Retransmit);
        }
        // Bounded durations keep every deadline computation far from Instant overflow.
        let day = Duration::from_secs(86_400);
        for (name, d, max) in [
            ("ike_lifetime", Some(self.ike_lifetime), 30 * day),
            ("child_lifetime", Some(self.child_lifetime), 30 * day),
            ("dpd_interval", self.dpd_interval, day),
            ("half_open_timeout", Some(self.half_open_timeout), day),
        ] {
            if let Some(d) = d
                && (d < Duration::from_secs(1) || d > max)
            {
                return Err(ConfigError::Duration {
                    name,
                    max_secs: max.as_secs(),
                });
            }
        }
        if self.cookie_threshold > self.max_half_open {
            return Err(ConfigError::CookieThreshold);
        }
        if self.fragment_size < 576 {
            return Err(ConfigError::FragmentSize(self.fragment_size));
        }
        if let AuthConfig::Psk(k) = &self.auth
            && k.is_empty()
        {
            return Err(ConfigError::Credential(
                crate::auth::CredentialError::EmptyPsk,
            ));
        }
        Ok(())
    }
}

/// A configuration the endpoint cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("no {0} algorithms configured: list at least one of each kind")]
    EmptyProposal(&'static str),
    #[error("retransmit_tries must be 1..=16 and retransmit_initial between 1 ms and 60 s")]
    Retransmit,
    #[error("{name} must be between 1 s and {max_secs} s")]
    Duration { name: &'static str, max_secs: u64 },
    #[error("cookie_threshold must not exceed max_half_open")]
    CookieThreshold,
    #[error("fragment_size {0} is below the IPv4 minimum of 576 bytes")]
    FragmentSize(usize),
    #[error(transparent)]
    Credential(#[from] crate::auth::CredentialError),
    #[error("random number generator failed")]
    Random,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::new(
            "198.51.100.1".parse().unwrap(),
            AuthConfig::Psk(Zeroizing::new(b"0123456789abcdef".to_vec())),
        )
    }

    #[test]
    fn defaults_validate_and_bounds_are_enforced() {
        assert_eq!(cfg().validate(), Ok(()));
        let mut c = cfg();
        c.ike_lifetime = Duration::from_secs(u64::MAX / 4);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Duration {
                name: "ike_lifetime",
                ..
            })
        ));
        let mut c = cfg();
        c.retransmit_tries = 0;
        assert_eq!(c.validate(), Err(ConfigError::Retransmit));
        let mut c = cfg();
        c.esp_suites.clear();
        assert_eq!(c.validate(), Err(ConfigError::EmptyProposal("ESP")));
        let mut c = cfg();
        c.auth = AuthConfig::Psk(Zeroizing::new(Vec::new()));
        assert!(matches!(c.validate(), Err(ConfigError::Credential(_))));
        let mut c = cfg();
        c.cookie_threshold = c.max_half_open + 1;
        assert_eq!(c.validate(), Err(ConfigError::CookieThreshold));
    }
}
