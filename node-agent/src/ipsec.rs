//! The agent's IKE shell: the UDP 500 and 4500 sockets on the NBMA address, the sans-IO
//! `dmvpn_ike::Endpoint`, per-peer IKE state for `show`, and the identity binding between
//! certificates and NHRP claims.
//!
//! The run loop (agent.rs) owns an [`Ike`]: it feeds it datagrams (UDP 500 directly, UDP
//! 4500 through the data plane, which shares that socket for ESP-in-UDP) and timeouts, and
//! applies what [`Ike::drain`] returns: SAs to install in or remove from the data plane.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dmvpn_esp::Suite;
use dmvpn_ike::{
    AuthConfig, ChildSaKeys, Endpoint, Event, FailReason, IKE_PORT, Identity, NAT_T_PORT,
};
use dmvpn_nhrp::wire::{Body, ExtensionBody, Op, Packet};
use dmvpn_pki as pki;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::{Cipher, Config, DhGroup, IpsecAuth};

/// First retry delay after a failed negotiation; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Distinct (peer, reason) failure counters kept; beyond, failures go to one overflow count.
const MAX_FAILURE_KEYS: usize = 4096;
/// Peers whose state is kept for `show`; the oldest failed/down ones are forgotten first.
const MAX_PEERS: usize = 4096;
/// NAT keepalive interval on UDP 4500 (RFC 3948 §4): keeps NAT mappings open.
const NAT_KEEPALIVE: Duration = dmvpn_esp::udp::DEFAULT_KEEPALIVE_INTERVAL;
/// How often the data plane's SAs are asked whether a byte/packet/sequence limit wants a
/// rekey, and how long a peer is not asked again after a rekey was requested.
const SA_LIMIT_CHECK: Duration = Duration::from_secs(10);
const REKEY_HOLD_OFF: Duration = Duration::from_secs(30);

/// IKE state of one peer (by NBMA address), for `show dmvpn`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IkePeerView {
    /// The peer's NBMA address.
    pub nbma_address: IpAddr,
    /// "connecting", "established", "failed" or "down".
    pub state: String,
    pub state_secs: u64,
    /// The identity the peer proved (with certificates: its tunnel address).
    pub identity: Option<String>,
    /// Address and port IKE talks to (port 4500 after NAT detection or forced encapsulation).
    pub remote: Option<SocketAddr>,
    /// NAT detected (or encapsulation forced): ESP goes in UDP 4500.
    pub nat: bool,
    /// CHILD SAs up with this peer (more than one while a rekey overlaps).
    pub child_sas: usize,
    /// Time from our first IKE_SA_INIT to the first CHILD SA, when we initiated.
    pub established_ms: Option<f64>,
    /// Reason of the last failure: NO_PROPOSAL_CHOSEN, AUTHENTICATION_FAILED,
    /// TS_UNACCEPTABLE, TIMEOUT, IDENTITY_MISMATCH, PEER_ERROR_<n>, PROTOCOL_ERROR.
    pub last_error_reason: Option<String>,
    /// The last failure in words.
    pub last_error: Option<String>,
    /// Failures by reason.
    pub failures: BTreeMap<String, u64>,
}

/// `ipsec` in `show dmvpn`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpsecView {
    /// "psk" or "certificate".
    pub auth: String,
    /// Our IKE identity.
    pub identity: String,
    pub force_udp_encap: bool,
    pub peers: Vec<IkePeerView>,
    /// Every installed ESP SA with its counters.
    pub sas: Vec<dmvpn_dataplane::SaInfo>,
}

/// A failure counted per peer and reason (`show counters` → `ike.failures`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureCount {
    pub peer: IpAddr,
    pub reason: String,
    pub count: u64,
}

/// What the data plane must do after IKE events.
#[derive(Debug)]
pub enum SaChange {
    /// A new CHILD SA: install inbound first, then outbound (a rekey overlaps the old one).
    /// `use_now`: we initiated the negotiation, so the peer has the SA already; otherwise
    /// the peer installs it only when our response arrives, and ESP sent at once could
    /// overtake that response (two sockets, two tasks on its side): the caller waits a
    /// moment before it sends with the new outbound SA.
    Up {
        peer: IpAddr,
        keys: Box<ChildSaKeys>,
        lifetime: Duration,
        use_now: bool,
    },
    /// A CHILD SA ended: remove its inbound SA, and the outbound one if it is still `spi_out`.
    Down {
        peer: IpAddr,
        spi_in: u32,
        spi_out: u32,
    },
    /// The IKE SA with the peer is gone: remove all of the peer's SAs.
    PeerDown { peer: IpAddr },
}

#[derive(Debug, Clone)]
struct PeerState {
    state: &'static str,
    since: Instant,
    identity: Option<Identity>,
    remote: Option<SocketAddr>,
    nat: bool,
    child_sas: usize,
    started: Option<Instant>,
    established_ms: Option<f64>,
    last_error: Option<(String, String)>,
    failures: BTreeMap<String, u64>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Next NAT keepalive (NAT detected or UDP encapsulation forced, SA established).
    keepalive_at: Option<Instant>,
    /// A CHILD SA rekey for SA limits was requested at this time.
    limit_rekey_at: Option<Instant>,
}

impl PeerState {
    fn new(now: Instant) -> Self {
        PeerState {
            state: "connecting",
            since: now,
            identity: None,
            remote: None,
            nat: false,
            child_sas: 0,
            started: None,
            established_ms: None,
            last_error: None,
            failures: BTreeMap::new(),
            retry_at: None,
            backoff: MIN_BACKOFF,
            keepalive_at: None,
            limit_rekey_at: None,
        }
    }

    fn set(&mut self, state: &'static str, now: Instant) {
        if self.state != state {
            self.state = state;
            self.since = now;
        }
    }
}

/// Short stable name of a failure reason (for JSON and counters).
pub fn reason_name(r: &FailReason) -> String {
    match r {
        FailReason::NoProposalChosen => "NO_PROPOSAL_CHOSEN".into(),
        FailReason::AuthenticationFailed => "AUTHENTICATION_FAILED".into(),
        FailReason::TsUnacceptable => "TS_UNACCEPTABLE".into(),
        FailReason::Timeout => "TIMEOUT".into(),
        FailReason::PeerError(n) => format!("PEER_ERROR_{n}"),
        FailReason::Protocol(_) => "PROTOCOL_ERROR".into(),
    }
}

/// The IKE side of the agent.
pub struct Ike {
    ep: Endpoint,
    sock500: tokio::net::UdpSocket,
    sock4500: Arc<UdpSocket>,
    local500: SocketAddr,
    cert_mode: bool,
    identity: Identity,
    force_udp_encap: bool,
    peers: BTreeMap<IpAddr, PeerState>,
    failures: BTreeMap<(IpAddr, String), u64>,
    failures_overflow: u64,
    identity_refused: BTreeMap<(IpAddr, IpAddr), u64>,
    send_errors: u64,
    /// NHS NBMA address → its configured tunnel address (identity check at IKE up).
    nhs: BTreeMap<IpAddr, IpAddr>,
    limit_check_at: Instant,
}

fn bind(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let s = UdpSocket::bind(addr).with_context(|| {
        format!("binding UDP {addr} for IKE (is another IKE daemon such as charon running? is the NBMA address configured?)")
    })?;
    s.set_nonblocking(true)
        .with_context(|| format!("UDP {addr}: non-blocking mode"))?;
    Ok(s)
}

/// The IKE endpoint configuration for the agent's `[ipsec]` settings.
pub fn endpoint_config(cfg: &Config, nbma: Ipv4Addr) -> anyhow::Result<dmvpn_ike::Config> {
    let ic = &cfg.ipsec;
    let (auth, identity) = match &ic.auth {
        None => bail!("[ipsec] has no credentials (psk or certificate)"),
        Some(IpsecAuth::Psk(p)) => (
            AuthConfig::Psk(Zeroizing::new(p.0.clone())),
            Identity::Ip(IpAddr::V4(nbma)),
        ),
        Some(IpsecAuth::Certificate { ca, cert, key }) => {
            let read = |what: &str, path: &std::path::Path| {
                std::fs::read_to_string(path)
                    .with_context(|| format!("{what} {}: cannot read", path.display()))
            };
            let ca_pem = read("ipsec.ca", ca)?;
            let cert_pem = read("ipsec.cert", cert)?;
            let key_pem = read("ipsec.key", key)?;
            let cas = pki::certs_from_pem(&ca_pem)
                .with_context(|| format!("ipsec.ca {}", ca.display()))?;
            let chain = pki::certs_from_pem(&cert_pem)
                .with_context(|| format!("ipsec.cert {}", cert.display()))?;
            // certs_from_pem returns at least one certificate; the first is ours.
            let Some(ours) = chain.into_iter().next() else {
                bail!("ipsec.cert {}: no certificate", cert.display());
            };
            let key_der = pki::key_pkcs8_from_pem(&key_pem)
                .with_context(|| format!("ipsec.key {}", key.display()))?;
            let ips = pki::inspect_der(&ours)
                .with_context(|| format!("ipsec.cert {}", cert.display()))?
                .ip_addresses;
            // Our identity is the certificate's tunnel address: peers check NHRP claims
            // against it.
            let Some(id) = ips.first().copied() else {
                bail!(
                    "ipsec.cert {}: the certificate has no IP SAN; issue it with `dmvpn-agent cert issue --tunnel-address {}`",
                    cert.display(),
                    cfg.tunnel_ip()
                );
            };
            if !ips.contains(&cfg.tunnel_ip()) {
                tracing::warn!(
                    cert = %cert.display(),
                    cert_address = %id,
                    tunnel_address = %cfg.tunnel_ip(),
                    "the certificate does not carry this node's tunnel address: peers will refuse our NHRP"
                );
            }
            (
                AuthConfig::Certificate {
                    cert: ours,
                    key_pkcs8: Zeroizing::new(key_der),
                    cas,
                },
                Identity::Ip(id),
            )
        }
    };
    let mut c = dmvpn_ike::Config::new(IpAddr::V4(nbma), auth);
    c.local_id = identity;
    c.ike_encr = ic
        .ciphers
        .iter()
        .map(|x| match x {
            Cipher::Aes256Gcm => dmvpn_ike::Encr::AesGcm256,
            Cipher::ChaCha20Poly1305 => dmvpn_ike::Encr::ChaCha20Poly1305,
        })
        .collect();
    c.esp_suites = ic
        .ciphers
        .iter()
        .map(|x| match x {
            Cipher::Aes256Gcm => Suite::Aes256Gcm,
            Cipher::ChaCha20Poly1305 => Suite::ChaCha20Poly1305,
        })
        .collect();
    c.ike_dh = ic
        .dh_groups
        .iter()
        .map(|g| match g {
            DhGroup::X25519 => dmvpn_ike::DhGroup::X25519,
            DhGroup::P256 => dmvpn_ike::DhGroup::P256,
        })
        .collect();
    c.ike_lifetime = Duration::from_secs(ic.ike_lifetime_secs.into());
    c.child_lifetime = Duration::from_secs(ic.child_lifetime_secs.into());
    c.dpd_interval =
        (ic.dpd_interval_secs > 0).then(|| Duration::from_secs(ic.dpd_interval_secs.into()));
    c.force_udp_encap = ic.force_udp_encap;
    Ok(c)
}

impl Ike {
    /// Binds UDP 500 and 4500 on `nbma` and creates the endpoint. The 4500 socket is
    /// returned for the data plane (ESP-in-UDP).
    pub fn start(cfg: &Config, nbma: Ipv4Addr, now: Instant) -> anyhow::Result<Ike> {
        let ecfg = endpoint_config(cfg, nbma)?;
        let identity = ecfg.local_id.clone();
        let ep = Endpoint::new(ecfg, now).context("IKE configuration")?;
        let local500 = SocketAddr::new(IpAddr::V4(nbma), IKE_PORT);
        let s500 = bind(local500)?;
        let s4500 = bind(SocketAddr::new(IpAddr::V4(nbma), NAT_T_PORT))?;
        let sock500 = tokio::net::UdpSocket::from_std(s500).context("UDP 500: tokio")?;
        let nhs = cfg
            .nhs
            .iter()
            .map(|n| (n.nbma_address, n.tunnel_address))
            .collect();
        tracing::info!(identity = %identity, nbma = %nbma, "IKE listening on UDP 500 and 4500");
        Ok(Ike {
            ep,
            sock500,
            sock4500: Arc::new(s4500),
            local500,
            cert_mode: matches!(cfg.ipsec.auth, Some(IpsecAuth::Certificate { .. })),
            identity,
            force_udp_encap: cfg.ipsec.force_udp_encap,
            peers: BTreeMap::new(),
            failures: BTreeMap::new(),
            failures_overflow: 0,
            identity_refused: BTreeMap::new(),
            send_errors: 0,
            nhs,
            limit_check_at: now + SA_LIMIT_CHECK,
        })
    }

    /// The UDP 4500 socket, shared with the data plane.
    pub fn nat_t_socket(&self) -> Arc<UdpSocket> {
        self.sock4500.clone()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| p.keepalive_at)
            .chain(self.ep.poll_timeout())
            .chain(std::iter::once(self.limit_check_at))
            .min()
    }

    /// Runs the endpoint's timers and sends the NAT keepalives that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.ep.handle_timeout(now);
        for (peer, p) in &mut self.peers {
            let (Some(at), Some(remote)) = (p.keepalive_at, p.remote) else {
                continue;
            };
            if at > now {
                continue;
            }
            p.keepalive_at = Some(now + NAT_KEEPALIVE);
            let to = SocketAddr::new(remote.ip(), remote.port());
            if let Err(e) = self.sock4500.send_to(&dmvpn_esp::udp::NAT_KEEPALIVE, to) {
                self.send_errors += 1;
                tracing::debug!(%peer, "NAT keepalive: {e}");
            }
        }
    }

    /// Whether the SA limits are due for a check (see [`Ike::rekey_for_limits`]).
    pub fn limit_check_due(&self, now: Instant) -> bool {
        self.limit_check_at <= now
    }

    /// Rekeys the CHILD SAs of `peers`, whose outbound SAs reached a soft byte, packet or
    /// sequence number limit (IKE rekeys by time on its own).
    pub fn rekey_for_limits(&mut self, now: Instant, peers: &[IpAddr]) {
        self.limit_check_at = now + SA_LIMIT_CHECK;
        for peer in peers {
            let Some(p) = self.peers.get_mut(peer) else {
                continue;
            };
            if p.limit_rekey_at.is_some_and(|t| now < t + REKEY_HOLD_OFF) {
                continue;
            }
            p.limit_rekey_at = Some(now);
            match self.ep.rekey_child(now, *peer) {
                Ok(()) => tracing::info!(%peer, "rekeying: an SA reached its byte/packet limit"),
                Err(e) => tracing::debug!(%peer, "rekey for SA limits: {e}"),
            }
        }
    }

    /// Waits for a datagram on UDP 500.
    pub async fn recv500(
        sock: &tokio::net::UdpSocket,
        buf: &mut [u8],
    ) -> std::io::Result<(usize, SocketAddr)> {
        sock.recv_from(buf).await
    }

    pub fn socket500(&self) -> &tokio::net::UdpSocket {
        &self.sock500
    }

    /// A datagram from UDP 500 (`local` = our 500 address) or 4500 (via the data plane).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        local: Option<SocketAddr>,
        data: &[u8],
    ) {
        let local = local.unwrap_or(self.local500);
        self.ep.handle_datagram(now, from, local, data);
    }

    /// The data plane needs an SA with `peer`: start IKE unless one is under way, up, or
    /// backing off after a failure.
    pub fn need_sa(&mut self, now: Instant, peer: IpAddr) {
        if self.ep.is_established(peer) {
            return;
        }
        if self.peers.len() >= MAX_PEERS && !self.peers.contains_key(&peer) {
            self.forget_one();
        }
        let p = self
            .peers
            .entry(peer)
            .or_insert_with(|| PeerState::new(now));
        if p.retry_at.is_some_and(|t| now < t) {
            return;
        }
        p.set("connecting", now);
        // Endpoint::initiate does nothing while any negotiation with the peer runs (also
        // one the peer started): only a new IKE SA makes us the initiator.
        let before = self.ep.ike_sa_count();
        match self.ep.initiate(now, peer) {
            Ok(()) if self.ep.ike_sa_count() > before => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.started = Some(now);
                }
            }
            Ok(()) => {}
            Err(e) => tracing::warn!(%peer, "cannot start IKE: {e}"),
        }
    }

    fn forget_one(&mut self) {
        let victim = self
            .peers
            .iter()
            .filter(|(_, p)| p.state != "established")
            .min_by_key(|(_, p)| p.since)
            .map(|(a, _)| *a);
        if let Some(v) = victim {
            self.peers.remove(&v);
        }
    }

    /// Deletes the IKE SA with `peer` (an idle shortcut went away).
    pub fn delete(&mut self, now: Instant, peer: IpAddr) {
        if self.ep.delete(now, peer).is_ok() {
            tracing::info!(%peer, "deleting the IKE SA of a peer that went away");
        }
        self.peers.remove(&peer);
    }

    /// Deletes every IKE SA (shutdown).
    pub fn delete_all(&mut self, now: Instant) {
        let peers: Vec<IpAddr> = self.peers.keys().copied().collect();
        for p in peers {
            let _ = self.ep.delete(now, p);
        }
    }

    fn fail(&mut self, now: Instant, peer: IpAddr, reason: String, detail: String) {
        tracing::warn!(%peer, %reason, "IKE with {peer} failed: {detail}");
        if self.failures.len() < MAX_FAILURE_KEYS
            || self.failures.contains_key(&(peer, reason.clone()))
        {
            *self.failures.entry((peer, reason.clone())).or_default() += 1;
        } else {
            self.failures_overflow += 1;
        }
        let p = self
            .peers
            .entry(peer)
            .or_insert_with(|| PeerState::new(now));
        *p.failures.entry(reason.clone()).or_default() += 1;
        p.last_error = Some((reason, detail));
        if !self.ep.is_established(peer) {
            p.set("failed", now);
            p.retry_at = Some(now + p.backoff);
            p.backoff = (p.backoff * 2).min(MAX_BACKOFF);
            p.started = None;
        }
    }

    /// Turns the endpoint's events into data plane changes. Call [`Ike::send`] after
    /// applying them: a responder's CHILD SA must be installed before its IKE_AUTH
    /// response leaves, or the initiator's first ESP packets arrive before it.
    pub fn events(&mut self, now: Instant) -> Vec<SaChange> {
        let mut out = Vec::new();
        while let Some(ev) = self.ep.poll_event() {
            self.on_event(now, ev, &mut out);
        }
        out
    }

    /// Sends what the endpoint wants sent; returns how many datagrams.
    pub fn send(&mut self) -> usize {
        let mut n = 0;
        while let Some(t) = self.ep.poll_transmit() {
            n += 1;
            let r = if t.src.port() == NAT_T_PORT {
                self.sock4500.send_to(&t.payload, t.dst)
            } else {
                self.sock500.try_send_to(&t.payload, t.dst)
            };
            // A lost datagram is retransmitted by the endpoint.
            if let Err(e) = r {
                self.send_errors += 1;
                tracing::debug!(dst = %t.dst, "IKE send failed: {e}");
            }
        }
        n
    }

    fn on_event(&mut self, now: Instant, ev: Event, out: &mut Vec<SaChange>) {
        match ev {
            Event::IkeSaUp {
                peer,
                peer_identity,
                remote,
                nat,
            } => {
                // A hub must prove the tunnel address we have configured for it.
                if self.cert_mode
                    && let Some(want) = self.nhs.get(&peer).copied()
                    && peer_identity != Identity::Ip(want)
                {
                    self.fail(
                        now,
                        peer,
                        "IDENTITY_MISMATCH".into(),
                        format!(
                            "NHS at {peer} authenticated as {peer_identity}, but it is configured as {want}; refusing it"
                        ),
                    );
                    let _ = self.ep.delete(now, peer);
                    out.push(SaChange::PeerDown { peer });
                    return;
                }
                tracing::info!(%peer, identity = %peer_identity, %remote, nat, "IKE SA up");
                let p = self
                    .peers
                    .entry(peer)
                    .or_insert_with(|| PeerState::new(now));
                p.identity = Some(peer_identity);
                p.remote = Some(remote);
                p.nat = nat;
                p.keepalive_at = (nat && remote.port() == NAT_T_PORT).then(|| now + NAT_KEEPALIVE);
            }
            Event::IkeSaRekeyed { peer } => tracing::info!(%peer, "IKE SA rekeyed"),
            Event::IkeSaDown { peer } => {
                // Its CHILD SAs were reported down one by one. Another IKE SA with the peer
                // may live on (both ends initiated at once and the duplicate went away).
                if self.ep.is_established(peer) {
                    tracing::debug!(%peer, "duplicate IKE SA removed; another one is up");
                    return;
                }
                tracing::info!(%peer, "IKE SA down");
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.set("down", now);
                    p.keepalive_at = None;
                    p.child_sas = 0;
                    p.identity = None;
                    p.started = None;
                }
                out.push(SaChange::PeerDown { peer });
            }
            Event::ChildSaUp {
                peer,
                keys,
                lifetime,
                rekeys,
            } => {
                tracing::info!(
                    %peer,
                    spi_in = format_args!("{:#010x}", keys.spi_in),
                    spi_out = format_args!("{:#010x}", keys.spi_out),
                    suite = ?keys.suite,
                    udp = ?keys.udp_encap,
                    rekey = rekeys.is_some(),
                    "CHILD SA up"
                );
                let p = self
                    .peers
                    .entry(peer)
                    .or_insert_with(|| PeerState::new(now));
                p.child_sas += 1;
                p.set("established", now);
                p.retry_at = None;
                p.backoff = MIN_BACKOFF;
                // Only the IKE_AUTH CHILD SA of a negotiation we started finds `started`
                // set; a rekey or a negotiation the peer started does not.
                let initiated = rekeys.is_none() && p.started.is_some();
                if let Some(t) = p.started.take() {
                    // Milliseconds with microsecond resolution: a local IKE exchange can
                    // take well under a millisecond.
                    let us = now.saturating_duration_since(t).as_micros();
                    p.established_ms = Some(us as f64 / 1000.0);
                }
                out.push(SaChange::Up {
                    peer,
                    keys: Box::new(keys),
                    lifetime,
                    use_now: initiated,
                });
            }
            Event::ChildSaDown {
                peer,
                spi_in,
                spi_out,
            } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.child_sas = p.child_sas.saturating_sub(1);
                }
                out.push(SaChange::Down {
                    peer,
                    spi_in,
                    spi_out,
                });
            }
            Event::Failed {
                peer,
                reason,
                detail,
            } => {
                let name = reason_name(&reason);
                self.fail(now, peer, name, format!("{reason}: {detail}"));
            }
        }
    }

    /// With certificates: whether an NHRP packet from `from_nbma` claims a tunnel address
    /// its IKE identity does not prove. Returns the refused claim. Packets from a
    /// configured NHS are not checked here (its identity was checked at IKE up, and it
    /// forwards other nodes' packets).
    pub fn refused_claim(&mut self, from_nbma: IpAddr, bytes: &[u8]) -> Option<IpAddr> {
        if !self.cert_mode || self.nhs.contains_key(&from_nbma) {
            return None;
        }
        let claim = claimed_address(bytes)?;
        let proven = self.peers.get(&from_nbma).and_then(|p| p.identity.as_ref());
        if proven == Some(&Identity::Ip(claim)) {
            return None;
        }
        // Bounded like the failure counters: an authenticated peer could make up claims.
        let key = (from_nbma, claim);
        if self.identity_refused.len() >= MAX_FAILURE_KEYS
            && !self.identity_refused.contains_key(&key)
        {
            self.failures_overflow += 1;
            return Some(claim);
        }
        let n = self.identity_refused.entry(key).or_default();
        *n += 1;
        if *n == 1 {
            tracing::warn!(
                peer = %from_nbma,
                claimed = %claim,
                proven = %proven.map_or_else(|| "nothing".to_owned(), ToString::to_string),
                "refusing NHRP: the peer claims a tunnel address its certificate does not carry (logged once per peer and address; see show counters)"
            );
        }
        Some(claim)
    }

    /// IKE state of every peer, for `show dmvpn`.
    pub fn peer_views(&self, now: Instant) -> Vec<IkePeerView> {
        self.peers
            .iter()
            .map(|(a, p)| IkePeerView {
                nbma_address: *a,
                state: p.state.to_owned(),
                state_secs: now.saturating_duration_since(p.since).as_secs(),
                identity: p.identity.as_ref().map(ToString::to_string),
                remote: p.remote,
                nat: p.nat,
                child_sas: p.child_sas,
                established_ms: p.established_ms,
                last_error_reason: p.last_error.as_ref().map(|e| e.0.clone()),
                last_error: p.last_error.as_ref().map(|e| e.1.clone()),
                failures: p.failures.clone(),
            })
            .collect()
    }

    /// IKE state of one peer: (state, last error reason).
    pub fn peer_state(&self, nbma: IpAddr) -> Option<(String, Option<String>)> {
        self.peers.get(&nbma).map(|p| {
            (
                p.state.to_owned(),
                p.last_error.as_ref().map(|e| e.0.clone()),
            )
        })
    }

    pub fn view(&self, now: Instant, sas: Vec<dmvpn_dataplane::SaInfo>) -> IpsecView {
        IpsecView {
            auth: if self.cert_mode { "certificate" } else { "psk" }.into(),
            identity: self.identity.to_string(),
            force_udp_encap: self.force_udp_encap,
            peers: self.peer_views(now),
            sas,
        }
    }

    /// `show counters` → `ike`.
    pub fn counters_json(&self) -> serde_json::Value {
        let failures: Vec<FailureCount> = self
            .failures
            .iter()
            .map(|((peer, reason), count)| FailureCount {
                peer: *peer,
                reason: reason.clone(),
                count: *count,
            })
            .collect();
        let refused: Vec<serde_json::Value> = self
            .identity_refused
            .iter()
            .map(|((peer, claimed), count)| {
                serde_json::json!({"peer": peer, "claimed": claimed, "count": count})
            })
            .collect();
        let s = self.ep.stats();
        serde_json::json!({
            "failures": failures,
            "failures_overflow": self.failures_overflow,
            "identity_refused": refused,
            "send_errors": self.send_errors,
            "ike_sas": self.ep.ike_sa_count(),
            "half_open": self.ep.half_open(),
            "malformed": s.malformed,
            "unknown_spi": s.unknown_spi,
            "integrity_failed": s.integrity_failed,
            "unexpected": s.unexpected,
            "retransmits_answered": s.retransmits_answered,
            "cookies_sent": s.cookies_sent,
            "half_open_dropped": s.half_open_dropped,
            "not_ike": s.not_ike,
        })
    }
}

/// The tunnel address an NHRP packet's sender claims as its own: the source protocol
/// address of requests it originates, the responder's address in a reply.
pub fn claimed_address(bytes: &[u8]) -> Option<IpAddr> {
    let p = Packet::decode(bytes).ok()?;
    let Body::Mandatory(m) = &p.body else {
        return None;
    };
    match p.header.op {
        Op::RegistrationRequest | Op::ResolutionRequest | Op::PurgeRequest => m.src_proto,
        Op::ResolutionReply => p.extensions.iter().find_map(|e| match &e.body {
            ExtensionBody::ResponderAddress(Some(c)) => c.client_proto,
            _ => None,
        }),
        _ => None,
    }
}
