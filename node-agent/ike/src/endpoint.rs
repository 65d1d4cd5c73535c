//! The sans-IO IKEv2 endpoint: all IKE SAs of one node, driven by datagrams, timeouts and
//! commands; it emits datagrams to send and events for the agent.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use dmvpn_esp::Suite;
use zeroize::Zeroizing;

use crate::auth::{self, Identity, SigningKey};
use crate::config::{AuthConfig, ChildMode, Config, ConfigError};
use crate::crypto::{CookieJar, DhGroup, Encr, IkeKeys, KeyShare, Prf, SkCipher};
use crate::wire::{
    self, Delete, FLAG_INITIATOR, FLAG_RESPONSE, HEADER_LEN, Header, Message, Notify, Payload,
    Proposal, TrafficSelector, Transform, VERSION_2, exchange, notify, protocol, transform,
};

/// UDP port of IKE.
pub const IKE_PORT: u16 = 500;
/// UDP port of NAT traversal (IKE with a non-ESP marker, and ESP-in-UDP).
pub const NAT_T_PORT: u16 = 4500;
const NON_ESP_MARKER: [u8; 4] = [0; 4];
const NONCE_LEN: usize = 32;
/// At most this many fragments per message are buffered (RFC 7383 leaves the bound to us).
const MAX_FRAGMENTS: u16 = 32;

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Our address and port to send from (500 or 4500).
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The UDP payload, including the non-ESP marker on port 4500.
    pub payload: Vec<u8>,
}

/// Key material of a CHILD SA, ready for `dmvpn_esp`.
#[derive(Clone)]
pub struct ChildSaKeys {
    /// SPI the peer puts on packets to us.
    pub spi_in: u32,
    /// SPI we put on packets to the peer.
    pub spi_out: u32,
    pub suite: Suite,
    pub esn: bool,
    pub mode: ChildMode,
    /// Key followed by the 4-byte salt, for inbound and outbound.
    pub key_in: Zeroizing<Vec<u8>>,
    pub key_out: Zeroizing<Vec<u8>>,
    /// ESP-in-UDP (RFC 3948) ports, local and remote, when NAT was detected or forced.
    pub udp_encap: Option<(u16, u16)>,
    pub local_ts: TrafficSelector,
    pub remote_ts: TrafficSelector,
}

impl std::fmt::Debug for ChildSaKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSaKeys")
            .field("spi_in", &format_args!("{:#010x}", self.spi_in))
            .field("spi_out", &format_args!("{:#010x}", self.spi_out))
            .field("suite", &self.suite)
            .field("esn", &self.esn)
            .field("mode", &self.mode)
            .field("udp_encap", &self.udp_encap)
            .finish_non_exhaustive()
    }
}

impl ChildSaKeys {
    /// The inbound SA for [`dmvpn_esp::SaDatabase::install_inbound`].
    pub fn inbound(&self) -> Result<dmvpn_esp::SecurityAssociation, dmvpn_esp::ConfigError> {
        Ok(
            dmvpn_esp::SecurityAssociation::new(self.spi_in, self.suite, &self.key_in)?
                .with_esn(self.esn),
        )
    }
    /// The outbound SA for [`dmvpn_esp::SaDatabase::install_outbound`].
    pub fn outbound(&self) -> Result<dmvpn_esp::SecurityAssociation, dmvpn_esp::ConfigError> {
        Ok(
            dmvpn_esp::SecurityAssociation::new(self.spi_out, self.suite, &self.key_out)?
                .with_esn(self.esn),
        )
    }
}

/// Why a negotiation failed or an SA went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailReason {
    NoProposalChosen,
    AuthenticationFailed,
    TsUnacceptable,
    /// The peer did not answer after all retransmissions.
    Timeout,
    /// The peer reported another error notify.
    PeerError(u16),
    /// The peer's messages violated the protocol.
    Protocol(&'static str),
}

impl std::fmt::Display for FailReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailReason::NoProposalChosen => f.write_str("NO_PROPOSAL_CHOSEN"),
            FailReason::AuthenticationFailed => f.write_str("AUTHENTICATION_FAILED"),
            FailReason::TsUnacceptable => f.write_str("TS_UNACCEPTABLE"),
            FailReason::Timeout => f.write_str("timeout"),
            FailReason::PeerError(n) => write!(f, "peer error notify {n}"),
            FailReason::Protocol(s) => write!(f, "protocol error: {s}"),
        }
    }
}

/// What the endpoint tells the agent.
#[derive(Debug, Clone)]
pub enum Event {
    IkeSaUp {
        peer: IpAddr,
        peer_identity: Identity,
        remote: SocketAddr,
        /// NAT between us and the peer (from NAT detection or forced encapsulation).
        nat: bool,
    },
    IkeSaDown {
        peer: IpAddr,
    },
    /// The IKE SA with `peer` was rekeyed (CREATE_CHILD_SA); its CHILD SAs are unchanged.
    IkeSaRekeyed {
        peer: IpAddr,
    },
    ChildSaUp {
        peer: IpAddr,
        keys: ChildSaKeys,
        lifetime: Duration,
        /// `spi_in` of the CHILD SA this one rekeys; keep it until its `ChildSaDown`.
        rekeys: Option<u32>,
    },
    ChildSaDown {
        peer: IpAddr,
        spi_in: u32,
        spi_out: u32,
    },
    Failed {
        peer: IpAddr,
        reason: FailReason,
        detail: String,
    },
}

/// Phase of an IKE SA, for `show`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IkeSaState {
    /// Initiator: IKE_SA_INIT or IKE_AUTH under way.
    Connecting,
    /// Responder: IKE_SA_INIT answered, IKE_AUTH not yet received.
    HalfOpen,
    Established,
    /// Being deleted, or replaced by a rekeyed IKE SA and waiting for its delete.
    Closing,
}

/// One CHILD SA, for `show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildSaInfo {
    pub spi_in: u32,
    pub spi_out: u32,
    pub age: Duration,
    pub rekeying: bool,
}

/// One IKE SA, for `show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IkeSaInfo {
    pub peer: IpAddr,
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub spi_i: u64,
    pub spi_r: u64,
    /// Whether we initiated this IKE SA (after an IKE rekey: the rekey).
    pub initiator: bool,
    pub state: IkeSaState,
    pub peer_identity: Option<Identity>,
    pub nat: bool,
    /// Time since IKE_SA_INIT, or since establishment / the last IKE rekey.
    pub age: Duration,
    pub children: Vec<ChildSaInfo>,
}

/// Counters of dropped input, for `show` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub malformed: u64,
    pub unknown_spi: u64,
    pub integrity_failed: u64,
    pub unexpected: u64,
    pub retransmits_answered: u64,
    pub cookies_sent: u64,
    pub half_open_dropped: u64,
    pub not_ike: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Initiator: IKE_SA_INIT sent.
    InitSent,
    /// Initiator: IKE_AUTH sent.
    AuthSent,
    /// Responder: IKE_SA_INIT answered, waiting for IKE_AUTH (half-open).
    HalfOpen,
    Established,
    /// Our delete of the IKE SA is outstanding.
    Deleting,
    /// Replaced by a rekeyed IKE SA: only answers retransmissions and the delete of itself.
    Rekeyed,
}

#[derive(Debug, Clone)]
enum Request {
    /// IKE_SA_INIT (msg 0) or IKE_AUTH (msg 1): built by the state machine, not queued.
    Handshake,
    Liveness,
    DeleteChild {
        spi_in: u32,
    },
    DeleteIke,
    RekeyChild {
        spi_in: u32,
        new_spi: u32,
        nonce: Vec<u8>,
        share: Option<std::sync::Arc<KeyShare>>,
    },
    RekeyIke {
        new_spi: u64,
        nonce: Vec<u8>,
        share: std::sync::Arc<KeyShare>,
    },
}

struct Outstanding {
    message_id: u32,
    exchange: u8,
    datagrams: Vec<Vec<u8>>,
    request: Request,
    sent: u32,
    deadline: Instant,
}

struct Child {
    spi_in: u32,
    spi_out: u32,
    created: Instant,
    rekeying: bool,
    /// When the original initiator rekeys it (90 % of the lifetime, or a retry).
    rekey_at: Instant,
    /// Past its lifetime without a successful rekey: being deleted.
    expiring: bool,
}

struct FragBuf {
    message_id: u32,
    total: u16,
    first_inner: u8,
    parts: Vec<Option<Zeroizing<Vec<u8>>>>,
}

struct IkeSa {
    initiator: bool,
    spi_i: u64,
    spi_r: u64,
    local: SocketAddr,
    remote: SocketAddr,
    state: State,
    share: Option<KeyShare>,
    groups_tried: u8,
    cookie: Option<Vec<u8>>,
    ni: Vec<u8>,
    nr: Vec<u8>,
    keys: Option<IkeKeys>,
    tx: Option<SkCipher>,
    rx: Option<SkCipher>,
    /// The IKE_SA_INIT request and response as sent (signed in IKE_AUTH).
    init_req: Vec<u8>,
    init_resp: Vec<u8>,
    nat: bool,
    peer_fragments: bool,
    peer_sig_hashes: bool,
    next_request_id: u32,
    outstanding: Option<Outstanding>,
    pending: VecDeque<Request>,
    expected_request_id: u32,
    last_response: Option<(u32, Vec<Vec<u8>>)>,
    frags: Option<FragBuf>,
    children: Vec<Child>,
    /// For the initiator: the inbound SPI of the CHILD SA proposed in IKE_AUTH.
    auth_child_spi: u32,
    peer_identity: Option<Identity>,
    created: Instant,
    last_heard: Instant,
    rekeying_ike: bool,
    /// Send INITIAL_CONTACT in IKE_AUTH.
    initial_contact: bool,
    /// When the original initiator rekeys this IKE SA (90 % of the lifetime, or a retry).
    rekey_at: Instant,
    /// The DH group of IKE_SA_INIT (or the last IKE rekey), reused for rekeys.
    dh_group: Option<DhGroup>,
}

/// All IKE SAs of one node.
pub struct Endpoint {
    config: Config,
    signing_key: Option<SigningKey>,
    ca_key_ids: Vec<u8>,
    sas: HashMap<u64, IkeSa>,
    /// (peer address, peer SPIi) -> our SPI, to recognise retransmitted IKE_SA_INIT requests.
    init_index: HashMap<(SocketAddr, u64), u64>,
    half_open: usize,
    cookies: CookieJar,
    cookie_rotated: Instant,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
}

/// A command could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("no established IKE SA with {0}")]
    NoSa(IpAddr),
    #[error("peer address {0} is not of the same family as the local address")]
    Family(IpAddr),
    #[error("random number generator failed")]
    Random,
}

impl From<crate::crypto::CryptoError> for CommandError {
    fn from(_: crate::crypto::CryptoError) -> Self {
        CommandError::Random
    }
}

fn notify_reason(kind: u16) -> FailReason {
    match kind {
        notify::NO_PROPOSAL_CHOSEN => FailReason::NoProposalChosen,
        notify::AUTHENTICATION_FAILED => FailReason::AuthenticationFailed,
        notify::TS_UNACCEPTABLE => FailReason::TsUnacceptable,
        k => FailReason::PeerError(k),
    }
}

/// Picks, for each transform type we need, the first of the peer's transforms we accept,
/// over the peer's proposals in order. Returns the chosen proposal (number kept).
fn choose_ike(
    config: &Config,
    proposals: &[Proposal],
) -> Option<(Proposal, Encr, Prf, Vec<DhGroup>)> {
    for p in proposals.iter().filter(|p| p.protocol == protocol::IKE) {
        let encr = p
            .transforms
            .iter()
            .filter(|t| t.kind == transform::ENCR)
            .find_map(|t| Encr::from_transform(t).filter(|e| config.ike_encr.contains(e)));
        let prf = p
            .transforms
            .iter()
            .filter(|t| t.kind == transform::PRF)
            .find_map(|t| Prf::from_id(t.id).filter(|x| config.ike_prf.contains(x)));
        let dhs: Vec<DhGroup> = p
            .transforms
            .iter()
            .filter(|t| t.kind == transform::DH)
            .filter_map(|t| DhGroup::from_id(t.id).filter(|g| config.ike_dh.contains(g)))
            .collect();
        // AEAD ciphers take no integrity transform (RFC 5282 §8); a proposal that insists on
        // one cannot be an AEAD-only proposal.
        let has_integ = p
            .transforms
            .iter()
            .any(|t| t.kind == transform::INTEG && t.id != 0);
        if let (Some(encr), Some(prf), Some(&dh), false) = (encr, prf, dhs.first(), has_integ) {
            let chosen = Proposal {
                number: p.number,
                protocol: protocol::IKE,
                spi: Vec::new(),
                transforms: vec![
                    encr.transform(),
                    Transform::new(transform::PRF, prf.id()),
                    Transform::new(transform::DH, dh.id()),
                ],
            };
            return Some((chosen, encr, prf, dhs));
        }
    }
    None
}

/// Chooses an ESP proposal: AEAD suite and ESN. Returns (proposal with our SPI, suite, esn, peer SPI).
fn choose_esp(
    config: &Config,
    proposals: &[Proposal],
    our_spi: u32,
) -> Option<(Proposal, Suite, bool, u32)> {
    for p in proposals.iter().filter(|p| p.protocol == protocol::ESP) {
        let Ok(peer_spi) = <[u8; 4]>::try_from(p.spi.as_slice()) else {
            continue;
        };
        let suite = p
            .transforms
            .iter()
            .filter(|t| t.kind == transform::ENCR)
            .find_map(|t| {
                Encr::from_transform(t)
                    .map(Encr::esp_suite)
                    .filter(|s| config.esp_suites.contains(s))
            });
        let esns: Vec<u16> = p
            .transforms
            .iter()
            .filter(|t| t.kind == transform::ESN)
            .map(|t| t.id)
            .collect();
        let esn = if esns.contains(&transform::ESN_YES)
            && (config.esn || !esns.contains(&transform::ESN_NO))
        {
            Some(true)
        } else if esns.contains(&transform::ESN_NO) || esns.is_empty() {
            Some(false)
        } else {
            None
        };
        let has_integ = p
            .transforms
            .iter()
            .any(|t| t.kind == transform::INTEG && t.id != 0);
        if let (Some(suite), Some(esn), false) = (suite, esn, has_integ) {
            let chosen = esp_proposal(p.number, our_spi, &[suite], Some(esn));
            return Some((chosen, suite, esn, u32::from_be_bytes(peer_spi)));
        }
    }
    None
}

fn esp_proposal(number: u8, spi: u32, suites: &[Suite], esn: Option<bool>) -> Proposal {
    let mut transforms: Vec<Transform> = suites
        .iter()
        .map(|s| Encr::from_esp_suite(*s).transform())
        .collect();
    match esn {
        Some(true) => transforms.push(Transform::new(transform::ESN, transform::ESN_YES)),
        Some(false) => transforms.push(Transform::new(transform::ESN, transform::ESN_NO)),
        None => {
            transforms.push(Transform::new(transform::ESN, transform::ESN_YES));
            transforms.push(Transform::new(transform::ESN, transform::ESN_NO));
        }
    }
    Proposal {
        number,
        protocol: protocol::ESP,
        spi: spi.to_be_bytes().to_vec(),
        transforms,
    }
}

fn find<T>(payloads: &[Payload], f: impl Fn(&Payload) -> Option<&T>) -> Option<&T> {
    payloads.iter().find_map(f)
}

/// The TSi and TSr payloads of a message, when present.
fn traffic_selectors(
    payloads: &[Payload],
) -> (Option<&Vec<TrafficSelector>>, Option<&Vec<TrafficSelector>>) {
    let tsi = find(payloads, |x| match x {
        Payload::TsI(t) => Some(t),
        _ => None,
    });
    let tsr = find(payloads, |x| match x {
        Payload::TsR(t) => Some(t),
        _ => None,
    });
    (tsi, tsr)
}

fn has_notify(payloads: &[Payload], kind: u16) -> bool {
    wire::notifies(payloads).any(|n| n.kind == kind)
}

fn first_error(payloads: &[Payload]) -> Option<u16> {
    wire::notifies(payloads)
        .map(|n| n.kind)
        .find(|k| *k < notify::FIRST_STATUS)
}

/// Adds the non-ESP marker where port 4500 is in use.
fn frame(local: SocketAddr, remote: SocketAddr, msg: &[u8]) -> Vec<u8> {
    if local.port() == NAT_T_PORT || remote.port() == NAT_T_PORT {
        [&NON_ESP_MARKER[..], msg].concat()
    } else {
        msg.to_vec()
    }
}

impl Endpoint {
    pub fn new(config: Config, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let (signing_key, ca_key_ids) = match &config.auth {
            AuthConfig::Psk(_) => (None, Vec::new()),
            AuthConfig::Certificate {
                cert,
                key_pkcs8,
                cas,
            } => {
                let key = SigningKey::from_pkcs8(key_pkcs8)?;
                webpki::EndEntityCert::try_from(&rustls_pki_types::CertificateDer::from(
                    cert.as_slice(),
                ))
                .map_err(|e| auth::CredentialError::Certificate(e.to_string()))?;
                let mut ids = Vec::new();
                for ca in cas {
                    ids.extend(auth::ca_key_id(ca).ok_or_else(|| {
                        auth::CredentialError::Ca("not a valid X.509 CA certificate (DER)".into())
                    })?);
                }
                (Some(key), ids)
            }
        };
        Ok(Endpoint {
            config,
            signing_key,
            ca_key_ids,
            sas: HashMap::new(),
            init_index: HashMap::new(),
            half_open: 0,
            cookies: CookieJar::new().map_err(|_| ConfigError::Random)?,
            cookie_rotated: now,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    /// Number of half-open (responder) IKE SAs.
    pub fn half_open(&self) -> usize {
        self.half_open
    }
    /// Number of IKE SAs in any state.
    pub fn ike_sa_count(&self) -> usize {
        self.sas.len()
    }
    /// Every IKE SA and its CHILD SAs, for `show` (no key material).
    pub fn snapshot(&self, now: Instant) -> Vec<IkeSaInfo> {
        let mut v: Vec<IkeSaInfo> = self
            .sas
            .values()
            .map(|sa| IkeSaInfo {
                peer: sa.remote.ip(),
                remote: sa.remote,
                local: sa.local,
                spi_i: sa.spi_i,
                spi_r: sa.spi_r,
                initiator: sa.initiator,
                state: match sa.state {
                    State::InitSent | State::AuthSent => IkeSaState::Connecting,
                    State::HalfOpen => IkeSaState::HalfOpen,
                    State::Established => IkeSaState::Established,
                    State::Deleting | State::Rekeyed => IkeSaState::Closing,
                },
                peer_identity: sa.peer_identity.clone(),
                nat: sa.nat,
                age: now.saturating_duration_since(sa.created),
                children: sa
                    .children
                    .iter()
                    .map(|c| ChildSaInfo {
                        spi_in: c.spi_in,
                        spi_out: c.spi_out,
                        age: now.saturating_duration_since(c.created),
                        rekeying: c.rekeying,
                    })
                    .collect(),
            })
            .collect();
        v.sort_by_key(|i| (i.peer, i.spi_i));
        v
    }

    /// Whether an established IKE SA with `peer` exists.
    pub fn is_established(&self, peer: IpAddr) -> bool {
        self.sas
            .values()
            .any(|sa| sa.remote.ip() == peer && sa.state == State::Established)
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The earliest time `handle_timeout` must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        for sa in self.sas.values() {
            if let Some(o) = &sa.outstanding {
                at(o.deadline);
            }
            match sa.state {
                State::HalfOpen | State::Rekeyed => at(sa.created + self.config.half_open_timeout),
                State::Established if sa.outstanding.is_none() => {
                    if let Some(d) = self.config.dpd_interval {
                        at(sa.last_heard + d);
                    }
                    if sa.initiator_of_rekeys() {
                        if !sa.rekeying_ike {
                            at(sa.rekey_at);
                        }
                        for c in sa.children.iter().filter(|c| !c.rekeying && !c.expiring) {
                            at(c.rekey_at);
                        }
                    }
                    // Hard lifetimes, for when rekeying failed.
                    at(sa.created + self.config.ike_lifetime);
                    for c in sa.children.iter().filter(|c| !c.expiring) {
                        at(c.created + self.config.child_lifetime);
                    }
                }
                _ => {}
            }
        }
        if self.half_open > 0 {
            at(self.cookie_rotated + Duration::from_secs(60));
        }
        t
    }

    /// Starts an IKE SA (and its CHILD SA) with `peer` on port 500, unless one exists.
    pub fn initiate(&mut self, now: Instant, peer: IpAddr) -> Result<(), CommandError> {
        if peer.is_ipv4() != self.config.local_addr.is_ipv4() {
            return Err(CommandError::Family(peer));
        }
        if self.sas.values().any(|sa| {
            sa.remote.ip() == peer && !matches!(sa.state, State::Deleting | State::Rekeyed)
        }) {
            return Ok(());
        }
        let spi = crate::crypto::random_spi64()?;
        let group = self
            .config
            .ike_dh
            .first()
            .copied()
            .unwrap_or(DhGroup::X25519);
        let mut ni = vec![0u8; NONCE_LEN];
        crate::crypto::random(&mut ni)?;
        let local_port = if self.config.force_udp_encap {
            NAT_T_PORT
        } else {
            IKE_PORT
        };
        let mut sa = IkeSa::new(
            true,
            spi,
            0,
            SocketAddr::new(self.config.local_addr, local_port),
            SocketAddr::new(peer, local_port),
            now,
        );
        sa.share = Some(KeyShare::generate(group)?);
        sa.ni = ni;
        sa.auth_child_spi = crate::crypto::random_spi32()?;
        // No SA at all with this peer: tell it to forget any it still has (after our restart).
        sa.initial_contact = !self.sas.values().any(|x| x.remote.ip() == peer);
        let mut ctx = self.ctx(now);
        sa.send_init_request(&mut ctx);
        self.sas.insert(spi, sa);
        Ok(())
    }

    /// Deletes every IKE SA with `peer` (INFORMATIONAL Delete; the CHILD SAs go with it).
    pub fn delete(&mut self, now: Instant, peer: IpAddr) -> Result<(), CommandError> {
        let mut found = false;
        let mut ctx = Ctx::new(
            &self.config,
            self.signing_key.as_ref(),
            &self.ca_key_ids,
            now,
            &mut self.transmits,
            &mut self.events,
        );
        let mut dead = Vec::new();
        for (spi, sa) in self.sas.iter_mut().filter(|(_, sa)| sa.remote.ip() == peer) {
            found = true;
            if sa.state == State::Established {
                sa.state = State::Deleting;
                sa.pending.clear();
                sa.pending.push_front(Request::DeleteIke);
                sa.pump(&mut ctx);
            } else if sa.state != State::Deleting {
                dead.push(*spi);
            }
        }
        for spi in dead {
            self.remove_sa(spi);
        }
        if found {
            Ok(())
        } else {
            Err(CommandError::NoSa(peer))
        }
    }

    /// Rekeys the CHILD SAs with `peer` now (CREATE_CHILD_SA); the old ones stay until the
    /// new ones are up.
    pub fn rekey_child(&mut self, now: Instant, peer: IpAddr) -> Result<(), CommandError> {
        self.with_established(now, peer, |sa, ctx| {
            let spis: Vec<u32> = sa
                .children
                .iter()
                .filter(|c| !c.rekeying)
                .map(|c| c.spi_in)
                .collect();
            for s in spis {
                sa.queue_child_rekey(ctx, s);
            }
        })
    }

    /// Rekeys the IKE SA with `peer` now (CREATE_CHILD_SA).
    pub fn rekey_ike(&mut self, now: Instant, peer: IpAddr) -> Result<(), CommandError> {
        self.with_established(now, peer, |sa, ctx| sa.queue_ike_rekey(ctx))
    }

    /// Sends a liveness check (empty INFORMATIONAL) to `peer` now.
    pub fn liveness(&mut self, now: Instant, peer: IpAddr) -> Result<(), CommandError> {
        self.with_established(now, peer, |sa, ctx| {
            sa.pending.push_back(Request::Liveness);
            sa.pump(ctx);
        })
    }

    fn with_established(
        &mut self,
        now: Instant,
        peer: IpAddr,
        f: impl FnOnce(&mut IkeSa, &mut Ctx<'_>),
    ) -> Result<(), CommandError> {
        let mut ctx = Ctx::new(
            &self.config,
            self.signing_key.as_ref(),
            &self.ca_key_ids,
            now,
            &mut self.transmits,
            &mut self.events,
        );
        let sa = self
            .sas
            .values_mut()
            .find(|sa| sa.remote.ip() == peer && sa.state == State::Established)
            .ok_or(CommandError::NoSa(peer))?;
        f(sa, &mut ctx);
        let moved = ctx.moved.take();
        if let Some((old, new, zombie)) = moved {
            self.rehome(old, new, zombie);
        }
        Ok(())
    }

    fn ctx(&mut self, now: Instant) -> Ctx<'_> {
        Ctx::new(
            &self.config,
            self.signing_key.as_ref(),
            &self.ca_key_ids,
            now,
            &mut self.transmits,
            &mut self.events,
        )
    }

    fn remove_sa(&mut self, spi: u64) {
        if let Some(sa) = self.sas.remove(&spi) {
            if sa.state == State::HalfOpen {
                self.half_open = self.half_open.saturating_sub(1);
            }
            self.init_index.retain(|_, v| *v != spi);
        }
    }

    /// Moves an IKE SA to a new map key after an IKE rekey changed our SPI; the old SA's
    /// remains stay under the old key until deleted.
    fn rehome(&mut self, old: u64, new: u64, zombie: Box<IkeSa>) {
        if let Some(sa) = self.sas.remove(&old) {
            self.sas.insert(new, sa);
            self.sas.insert(old, *zombie);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.half_open > 0 && now >= self.cookie_rotated + Duration::from_secs(60) {
            // Rotating the secret bounds how long a captured cookie stays usable.
            if self.cookies.rotate().is_ok() {
                self.cookie_rotated = now;
            }
        }
        let mut dead = Vec::new();
        let mut moves = Vec::new();
        let mut ctx = Ctx::new(
            &self.config,
            self.signing_key.as_ref(),
            &self.ca_key_ids,
            now,
            &mut self.transmits,
            &mut self.events,
        );
        for (spi, sa) in self.sas.iter_mut() {
            if sa.state == State::HalfOpen && now >= sa.created + ctx.config.half_open_timeout {
                dead.push(*spi);
                continue;
            }
            if !sa.on_timeout(&mut ctx) {
                dead.push(*spi);
            }
            if let Some(m) = ctx.moved.take() {
                moves.push(m);
            }
        }
        for spi in dead {
            self.remove_sa(spi);
        }
        for (old, new, zombie) in moves {
            self.rehome(old, new, zombie);
        }
    }

    /// Feeds one received UDP datagram. `remote` is the sender, `local` the address and port
    /// it arrived on (500 or 4500).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local: SocketAddr,
        data: &[u8],
    ) {
        let msg = if local.port() == NAT_T_PORT || remote.port() == NAT_T_PORT {
            match data.split_first_chunk::<4>() {
                Some((marker, rest)) if *marker == NON_ESP_MARKER => rest,
                // 0xff is a NAT keepalive; anything else is ESP for the data plane.
                _ => {
                    if data != [0xff] {
                        self.stats.not_ike += 1;
                    }
                    return;
                }
            }
        } else {
            data
        };
        let header = match Header::decode(msg) {
            Ok(h) => h,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        if header.exchange == exchange::IKE_SA_INIT && !header.is_response() && header.spi_r == 0 {
            self.responder_init(now, remote, local, header, msg);
            return;
        }
        let our_spi = if header.is_initiator() {
            header.spi_r
        } else {
            header.spi_i
        };
        let Some(sa) = self.sas.get_mut(&our_spi) else {
            self.stats.unknown_spi += 1;
            return;
        };
        let peer_spi_ok = if header.is_initiator() {
            header.spi_i == sa.spi_i
        } else {
            sa.spi_r == 0 || header.spi_r == sa.spi_r
        };
        if !peer_spi_ok || sa.initiator == header.is_initiator() {
            self.stats.unknown_spi += 1;
            return;
        }
        let mut ctx = Ctx::new(
            &self.config,
            self.signing_key.as_ref(),
            &self.ca_key_ids,
            now,
            &mut self.transmits,
            &mut self.events,
        );
        let was_half_open = sa.state == State::HalfOpen;
        let was_established = sa.state == State::Established;
        let keep = sa.handle(&mut ctx, &mut self.stats, remote, local, header, msg);
        let became_established = keep && !was_established && sa.state == State::Established;
        let moved = ctx.moved.take();
        let initial_contact = ctx.initial_contact.take();
        let now_half_open = sa.state == State::HalfOpen;
        if was_half_open && !now_half_open {
            self.half_open = self.half_open.saturating_sub(1);
            self.init_index.retain(|_, v| *v != our_spi);
        }
        if !keep {
            if let Some(sa) = self.sas.remove(&our_spi)
                && sa.state == State::HalfOpen
            {
                self.half_open = self.half_open.saturating_sub(1);
            }
            self.init_index.retain(|_, v| *v != our_spi);
        }
        if let Some((old, new, zombie)) = moved {
            self.rehome(old, new, zombie);
        }
        if became_established {
            self.resolve_duplicates(now, remote.ip());
        }
        if let Some(identity) = initial_contact {
            self.drop_stale(now, our_spi, &identity);
        }
    }

    /// INITIAL_CONTACT: every other SA authenticated as this peer is stale. Drop it silently
    /// (the peer no longer knows it) and report its CHILD SAs down.
    fn drop_stale(&mut self, now: Instant, keep: u64, identity: &Identity) {
        let stale: Vec<u64> = self
            .sas
            .iter()
            .filter(|(spi, sa)| **spi != keep && sa.peer_identity.as_ref() == Some(identity))
            .map(|(spi, _)| *spi)
            .collect();
        let mut ctx = Ctx::new(
            &self.config,
            self.signing_key.as_ref(),
            &self.ca_key_ids,
            now,
            &mut self.transmits,
            &mut self.events,
        );
        for spi in &stale {
            if let Some(sa) = self.sas.get_mut(spi) {
                sa.tear_down(&mut ctx);
            }
        }
        for spi in stale {
            self.remove_sa(spi);
        }
    }

    /// Both ends may initiate at once (a shortcut resolved on both spokes), leaving two IKE
    /// SAs. The SA initiated by the lower address survives; the higher address deletes the
    /// one it initiated, so both ends agree without crossing deletes.
    fn resolve_duplicates(&mut self, now: Instant, peer: IpAddr) {
        if self.config.local_addr < peer {
            return;
        }
        let established =
            |sa: &&mut IkeSa| sa.remote.ip() == peer && sa.state == State::Established;
        let responder_sa = self
            .sas
            .values_mut()
            .filter(established)
            .any(|sa| !sa.initiator);
        if !responder_sa {
            return;
        }
        let mut ctx = Ctx::new(
            &self.config,
            self.signing_key.as_ref(),
            &self.ca_key_ids,
            now,
            &mut self.transmits,
            &mut self.events,
        );
        for sa in self
            .sas
            .values_mut()
            .filter(established)
            .filter(|sa| sa.initiator)
        {
            sa.state = State::Deleting;
            sa.pending.clear();
            sa.pending.push_front(Request::DeleteIke);
            sa.pump(&mut ctx);
        }
    }

    fn send_plain(&mut self, local: SocketAddr, remote: SocketAddr, msg: &Message) {
        self.transmits.push_back(Transmit {
            src: local,
            dst: remote,
            payload: frame(local, remote, &msg.encode()),
        });
    }

    fn init_error(&mut self, local: SocketAddr, remote: SocketAddr, req: &Header, n: Notify) {
        let msg = Message {
            header: Header {
                spi_i: req.spi_i,
                spi_r: 0,
                next_payload: 0,
                version: VERSION_2,
                exchange: exchange::IKE_SA_INIT,
                flags: FLAG_RESPONSE,
                message_id: 0,
                length: 0,
            },
            payloads: vec![Payload::Notify(n)],
        };
        self.send_plain(local, remote, &msg);
    }

    fn responder_init(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local: SocketAddr,
        header: Header,
        bytes: &[u8],
    ) {
        if header.message_id != 0 || header.is_response() {
            self.stats.unexpected += 1;
            return;
        }
        // A retransmitted request gets the stored response again.
        if let Some(spi) = self.init_index.get(&(remote, header.spi_i)).copied() {
            if let Some(sa) = self.sas.get(&spi)
                && let Some((0, resp)) = &sa.last_response
            {
                for d in resp.clone() {
                    self.transmits.push_back(Transmit {
                        src: local,
                        dst: remote,
                        payload: frame(local, remote, &d),
                    });
                }
                self.stats.retransmits_answered += 1;
            }
            return;
        }
        if self.half_open >= self.config.max_half_open {
            self.stats.half_open_dropped += 1;
            return;
        }
        let msg = match Message::decode(bytes) {
            Ok(m) => m,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        let p = &msg.payloads;
        let (Some(proposals), Some((ke_group, ke_data)), Some(ni)) = (
            find(p, |x| {
                if let Payload::Sa(s) = x {
                    Some(s)
                } else {
                    None
                }
            }),
            p.iter().find_map(|x| {
                if let Payload::Ke { group, data } = x {
                    Some((*group, data))
                } else {
                    None
                }
            }),
            find(p, |x| {
                if let Payload::Nonce(n) = x {
                    Some(n)
                } else {
                    None
                }
            }),
        ) else {
            self.stats.malformed += 1;
            return;
        };
        if !(16..=256).contains(&ni.len()) {
            self.stats.malformed += 1;
            return;
        }
        if self.half_open >= self.config.cookie_threshold {
            let ok = wire::notifies(p)
                .find(|n| n.kind == notify::COOKIE)
                .is_some_and(|n| self.cookies.check(&n.data, ni, remote.ip(), header.spi_i));
            if !ok {
                let c = self.cookies.make(ni, remote.ip(), header.spi_i);
                self.stats.cookies_sent += 1;
                self.init_error(local, remote, &header, Notify::status(notify::COOKIE, c));
                return;
            }
        }
        let Some((chosen, encr, prf, groups)) = choose_ike(&self.config, proposals) else {
            self.init_error(
                local,
                remote,
                &header,
                Notify::status(notify::NO_PROPOSAL_CHOSEN, Vec::new()),
            );
            self.events.push_back(Event::Failed {
                peer: remote.ip(),
                reason: FailReason::NoProposalChosen,
                detail: "no acceptable IKE proposal in IKE_SA_INIT".into(),
            });
            return;
        };
        let Some(group) = groups.iter().copied().find(|g| g.id() == ke_group) else {
            let want = groups.first().map_or(0, |g| g.id());
            self.init_error(
                local,
                remote,
                &header,
                Notify::status(notify::INVALID_KE_PAYLOAD, want.to_be_bytes().to_vec()),
            );
            return;
        };
        let mut chosen = chosen;
        if let Some(t) = chosen
            .transforms
            .iter_mut()
            .find(|t| t.kind == transform::DH)
        {
            t.id = group.id();
        }
        let Ok(spi_r) = crate::crypto::random_spi64() else {
            return;
        };
        let Ok(share) = KeyShare::generate(group) else {
            return;
        };
        let Ok(shared) = share.agree(ke_data) else {
            self.stats.malformed += 1;
            return;
        };
        let mut nr = vec![0u8; NONCE_LEN];
        if crate::crypto::random(&mut nr).is_err() {
            return;
        }
        let keys = IkeKeys::derive(prf, encr, &shared, ni, &nr, header.spi_i, spi_r);
        // NAT detection: the peer hashed SPIi, 0 and the addresses as it saw them.
        let src_ok = wire::notifies(p)
            .filter(|n| n.kind == notify::NAT_DETECTION_SOURCE_IP)
            .any(|n| n.data == crate::crypto::nat_hash(header.spi_i, 0, remote));
        let dst_ok = wire::notifies(p)
            .filter(|n| n.kind == notify::NAT_DETECTION_DESTINATION_IP)
            .any(|n| n.data == crate::crypto::nat_hash(header.spi_i, 0, local));
        let nat_d_present = has_notify(p, notify::NAT_DETECTION_SOURCE_IP);
        let nat = (nat_d_present && !(src_ok && dst_ok)) || self.config.force_udp_encap;
        let mut sa = IkeSa::new(false, header.spi_i, spi_r, local, remote, now);
        sa.nat = nat;
        sa.dh_group = Some(group);
        sa.peer_fragments = has_notify(p, notify::IKEV2_FRAGMENTATION_SUPPORTED);
        sa.peer_sig_hashes = has_notify(p, notify::SIGNATURE_HASH_ALGORITHMS);
        sa.ni = ni.clone();
        sa.nr = nr.clone();
        let rh = Header {
            spi_i: header.spi_i,
            spi_r,
            next_payload: 0,
            version: VERSION_2,
            exchange: exchange::IKE_SA_INIT,
            flags: FLAG_RESPONSE,
            message_id: 0,
            length: 0,
        };
        let mut payloads = vec![
            Payload::Sa(vec![chosen]),
            Payload::Ke {
                group: group.id(),
                data: share.public().to_vec(),
            },
            Payload::Nonce(nr),
        ];
        if nat_d_present {
            payloads.push(Payload::Notify(Notify::status(
                notify::NAT_DETECTION_SOURCE_IP,
                crate::crypto::nat_hash(header.spi_i, spi_r, local),
            )));
            payloads.push(Payload::Notify(Notify::status(
                notify::NAT_DETECTION_DESTINATION_IP,
                // A wrong hash makes the initiator see NAT when encapsulation is forced.
                if self.config.force_udp_encap {
                    vec![0; 20]
                } else {
                    crate::crypto::nat_hash(header.spi_i, spi_r, remote)
                },
            )));
        }
        payloads.extend(self.capability_notifies());
        let resp = Message {
            header: rh,
            payloads,
        }
        .encode();
        sa.init_req = bytes.to_vec();
        sa.init_resp = resp.clone();
        sa.install_keys(keys);
        sa.state = State::HalfOpen;
        sa.expected_request_id = 1;
        sa.last_response = Some((0, vec![resp.clone()]));
        self.transmits.push_back(Transmit {
            src: local,
            dst: remote,
            payload: frame(local, remote, &resp),
        });
        self.init_index.insert((remote, header.spi_i), spi_r);
        self.half_open += 1;
        self.sas.insert(spi_r, sa);
    }

    fn capability_notifies(&self) -> Vec<Payload> {
        let mut v = vec![Payload::Notify(Notify::status(
            notify::IKEV2_FRAGMENTATION_SUPPORTED,
            Vec::new(),
        ))];
        if self.signing_key.is_some() {
            let data = auth::SIGNATURE_HASHES
                .iter()
                .flat_map(|h| h.to_be_bytes())
                .collect();
            v.push(Payload::Notify(Notify::status(
                notify::SIGNATURE_HASH_ALGORITHMS,
                data,
            )));
            v.push(Payload::CertReq {
                encoding: wire::cert_encoding::X509_SIGNATURE,
                data: self.ca_key_ids.clone(),
            });
        }
        v
    }
}

/// CHILD SA key material: initiator-to-responder, then responder-to-initiator.
type KeyPair = (Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>);

/// Delay before a refused rekey is tried again.
const REKEY_RETRY: Duration = Duration::from_secs(30);

fn rekey_after(lifetime: Duration) -> Duration {
    lifetime.mul_f64(0.9)
}

/// What an SA needs from the endpoint while it handles input.
struct Ctx<'a> {
    config: &'a Config,
    key: Option<&'a SigningKey>,
    ca_key_ids: &'a [u8],
    now: Instant,
    out: &'a mut VecDeque<Transmit>,
    events: &'a mut VecDeque<Event>,
    /// Set when an IKE rekey moved the SA to a new SPI of ours: (old, new, the old SA kept
    /// under the old SPI until it is deleted).
    moved: Option<(u64, u64, Box<IkeSa>)>,
    /// The peer sent INITIAL_CONTACT: its other SAs are stale.
    initial_contact: Option<Identity>,
}

impl<'a> Ctx<'a> {
    fn new(
        config: &'a Config,
        key: Option<&'a SigningKey>,
        ca_key_ids: &'a [u8],
        now: Instant,
        out: &'a mut VecDeque<Transmit>,
        events: &'a mut VecDeque<Event>,
    ) -> Self {
        Ctx {
            config,
            key,
            ca_key_ids,
            now,
            out,
            events,
            moved: None,
            initial_contact: None,
        }
    }
    fn fail(&mut self, peer: IpAddr, reason: FailReason, detail: impl Into<String>) {
        self.events.push_back(Event::Failed {
            peer,
            reason,
            detail: detail.into(),
        });
    }
}

/// Result of checking the peer's traffic selectors against our policy.
fn narrow_ts(
    config: &Config,
    local: IpAddr,
    remote: IpAddr,
    nat: bool,
    ts_peer_side: &[TrafficSelector],
    ts_our_side: &[TrafficSelector],
) -> Option<(TrafficSelector, TrafficSelector)> {
    let ours = TrafficSelector::host(local, config.ts_protocol);
    let theirs_want = TrafficSelector::host(remote, config.ts_protocol);
    let our_ok = ts_our_side.iter().any(|t| t.contains(&ours));
    let theirs = ts_peer_side.iter().find_map(|t| {
        if t.contains(&theirs_want) {
            Some(theirs_want)
        } else if nat
            && t.start_addr == t.end_addr
            && (t.ip_protocol == 0 || t.ip_protocol == config.ts_protocol)
        {
            // Behind NAT the peer names its private address; accept that single host.
            Some(TrafficSelector::host(t.start_addr, config.ts_protocol))
        } else {
            None
        }
    });
    match (our_ok, theirs) {
        (true, Some(t)) => Some((ours, t)),
        _ => None,
    }
}

impl IkeSa {
    fn new(
        initiator: bool,
        spi_i: u64,
        spi_r: u64,
        local: SocketAddr,
        remote: SocketAddr,
        now: Instant,
    ) -> Self {
        IkeSa {
            initiator,
            spi_i,
            spi_r,
            local,
            remote,
            state: State::InitSent,
            share: None,
            groups_tried: 0,
            cookie: None,
            ni: Vec::new(),
            nr: Vec::new(),
            keys: None,
            tx: None,
            rx: None,
            init_req: Vec::new(),
            init_resp: Vec::new(),
            nat: false,
            peer_fragments: false,
            peer_sig_hashes: false,
            next_request_id: 0,
            outstanding: None,
            pending: VecDeque::new(),
            expected_request_id: 0,
            last_response: None,
            frags: None,
            children: Vec::new(),
            auth_child_spi: 0,
            peer_identity: None,
            created: now,
            last_heard: now,
            rekeying_ike: false,
            initial_contact: false,
            rekey_at: now,
            dh_group: None,
        }
    }

    fn our_spi(&self) -> u64 {
        if self.initiator {
            self.spi_i
        } else {
            self.spi_r
        }
    }

    /// Only the original initiator starts scheduled rekeys, so both ends do not collide.
    fn initiator_of_rekeys(&self) -> bool {
        self.initiator
    }

    fn install_keys(&mut self, keys: IkeKeys) {
        let (tx, rx) = if self.initiator {
            (&keys.sk_ei, &keys.sk_er)
        } else {
            (&keys.sk_er, &keys.sk_ei)
        };
        self.tx = SkCipher::new(keys.encr, tx).ok();
        self.rx = SkCipher::new(keys.encr, rx).ok();
        self.keys = Some(keys);
    }

    fn header(&self, exch: u8, response: bool, message_id: u32) -> Header {
        let mut flags = if self.initiator { FLAG_INITIATOR } else { 0 };
        if response {
            flags |= FLAG_RESPONSE;
        }
        Header {
            spi_i: self.spi_i,
            spi_r: self.spi_r,
            next_payload: 0,
            version: VERSION_2,
            exchange: exch,
            flags,
            message_id,
            length: 0,
        }
    }

    fn emit(&self, ctx: &mut Ctx<'_>, datagrams: &[Vec<u8>]) {
        for d in datagrams {
            ctx.out.push_back(Transmit {
                src: self.local,
                dst: self.remote,
                payload: frame(self.local, self.remote, d),
            });
        }
    }

    /// Encrypts `inner` into one message or, if too large and the peer supports it, fragments.
    fn seal(&mut self, ctx: &Ctx<'_>, header: Header, inner: &[Payload]) -> Vec<Vec<u8>> {
        let Some(tx) = self.tx.as_mut() else {
            return Vec::new();
        };
        let (first, plain) = wire::encode_chain(inner);
        // fragment_size bounds the IP datagram (RFC 7383 §2.5.1): IPv6 and UDP headers, the
        // non-ESP marker, the IKE header, the SKF header, IV, pad length and ICV.
        let overhead =
            40 + 8 + 4 + HEADER_LEN + 8 + crate::crypto::SK_IV_LEN + 1 + crate::crypto::SK_ICV_LEN;
        let room = ctx.config.fragment_size.saturating_sub(overhead).max(64);
        if !self.peer_fragments || plain.len() <= room {
            return vec![tx.seal_message(header, inner)];
        }
        let chunks: Vec<&[u8]> = plain.chunks(room).collect();
        let total = u16::try_from(chunks.len()).unwrap_or(u16::MAX);
        chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let n = u16::try_from(i + 1).unwrap_or(u16::MAX);
                tx.seal_fragment(header, first, n, total, c)
            })
            .collect()
    }

    fn send_request(&mut self, ctx: &mut Ctx<'_>, exch: u8, inner: &[Payload], request: Request) {
        let id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1);
        let header = self.header(exch, false, id);
        let datagrams = self.seal(ctx, header, inner);
        self.emit(ctx, &datagrams);
        self.outstanding = Some(Outstanding {
            message_id: id,
            exchange: exch,
            datagrams,
            request,
            sent: 1,
            deadline: ctx.now + ctx.config.retransmit_initial,
        });
    }

    fn send_response(&mut self, ctx: &mut Ctx<'_>, exch: u8, message_id: u32, inner: &[Payload]) {
        let header = self.header(exch, true, message_id);
        let datagrams = self.seal(ctx, header, inner);
        self.emit(ctx, &datagrams);
        self.last_response = Some((message_id, datagrams));
    }

    fn send_init_request(&mut self, ctx: &mut Ctx<'_>) {
        let Some(share) = &self.share else { return };
        let c = ctx.config;
        let mut transforms: Vec<Transform> = c.ike_encr.iter().map(|e| e.transform()).collect();
        transforms.extend(
            c.ike_prf
                .iter()
                .map(|p| Transform::new(transform::PRF, p.id())),
        );
        // The group of our KE payload goes first so a responder preferring order picks it.
        transforms.push(Transform::new(transform::DH, share.group().id()));
        transforms.extend(
            c.ike_dh
                .iter()
                .filter(|g| **g != share.group())
                .map(|g| Transform::new(transform::DH, g.id())),
        );
        let mut payloads = Vec::new();
        if let Some(cookie) = &self.cookie {
            payloads.push(Payload::Notify(Notify::status(
                notify::COOKIE,
                cookie.clone(),
            )));
        }
        payloads.push(Payload::Sa(vec![Proposal {
            number: 1,
            protocol: protocol::IKE,
            spi: Vec::new(),
            transforms,
        }]));
        payloads.push(Payload::Ke {
            group: share.group().id(),
            data: share.public().to_vec(),
        });
        payloads.push(Payload::Nonce(self.ni.clone()));
        payloads.push(Payload::Notify(Notify::status(
            notify::NAT_DETECTION_SOURCE_IP,
            crate::crypto::nat_hash(self.spi_i, 0, self.local),
        )));
        payloads.push(Payload::Notify(Notify::status(
            notify::NAT_DETECTION_DESTINATION_IP,
            // A different hash than the real one forces the peer to see NAT when encapsulation is forced.
            if c.force_udp_encap {
                vec![0; 20]
            } else {
                crate::crypto::nat_hash(self.spi_i, 0, self.remote)
            },
        )));
        payloads.push(Payload::Notify(Notify::status(
            notify::IKEV2_FRAGMENTATION_SUPPORTED,
            Vec::new(),
        )));
        if ctx.key.is_some() {
            let data = auth::SIGNATURE_HASHES
                .iter()
                .flat_map(|h| h.to_be_bytes())
                .collect();
            payloads.push(Payload::Notify(Notify::status(
                notify::SIGNATURE_HASH_ALGORITHMS,
                data,
            )));
        }
        let msg = Message {
            header: self.header(exchange::IKE_SA_INIT, false, 0),
            payloads,
        }
        .encode();
        self.init_req = msg.clone();
        self.emit(ctx, std::slice::from_ref(&msg));
        self.next_request_id = 1;
        self.state = State::InitSent;
        self.outstanding = Some(Outstanding {
            message_id: 0,
            exchange: exchange::IKE_SA_INIT,
            datagrams: vec![msg],
            request: Request::Handshake,
            sent: 1,
            deadline: ctx.now + ctx.config.retransmit_initial,
        });
    }

    /// Returns false when the SA is finished and must be removed.
    fn on_timeout(&mut self, ctx: &mut Ctx<'_>) -> bool {
        let now = ctx.now;
        if self.state == State::Rekeyed
            && self.outstanding.is_none()
            && now >= self.created + ctx.config.half_open_timeout
        {
            return false;
        }
        if let Some(o) = &mut self.outstanding {
            if now < o.deadline {
                return true;
            }
            if o.sent >= ctx.config.retransmit_tries {
                let peer = self.remote.ip();
                let what = match self.state {
                    State::InitSent => "IKE_SA_INIT",
                    State::AuthSent => "IKE_AUTH",
                    _ => "request",
                };
                if !matches!(self.state, State::Deleting | State::Rekeyed) {
                    ctx.fail(
                        peer,
                        FailReason::Timeout,
                        format!("no answer to {what} after {} transmissions", o.sent),
                    );
                }
                self.tear_down(ctx);
                return false;
            }
            let backoff = ctx
                .config
                .retransmit_initial
                .saturating_mul(1u32 << o.sent.min(16));
            o.sent += 1;
            o.deadline = now + backoff;
            let d = o.datagrams.clone();
            self.emit(ctx, &d);
            return true;
        }
        if self.state != State::Established {
            return true;
        }
        if now >= self.created + ctx.config.ike_lifetime {
            // Not rekeyed in time: the IKE SA and its CHILD SAs end here.
            self.state = State::Deleting;
            self.pending.clear();
            self.pending.push_back(Request::DeleteIke);
            self.pump(ctx);
            return true;
        }
        let expired: Vec<u32> = self
            .children
            .iter()
            .filter(|c| !c.expiring && now >= c.created + ctx.config.child_lifetime)
            .map(|c| c.spi_in)
            .collect();
        for spi_in in expired {
            if let Some(c) = self.children.iter_mut().find(|c| c.spi_in == spi_in) {
                c.expiring = true;
            }
            self.pending.push_back(Request::DeleteChild { spi_in });
        }
        if let Some(d) = ctx.config.dpd_interval
            && now >= self.last_heard + d
            && self.pending.is_empty()
        {
            self.pending.push_back(Request::Liveness);
        }
        if self.initiator_of_rekeys() {
            if !self.rekeying_ike && now >= self.rekey_at {
                self.queue_ike_rekey(ctx);
            }
            let due: Vec<u32> = self
                .children
                .iter()
                .filter(|c| !c.rekeying && !c.expiring && now >= c.rekey_at)
                .map(|c| c.spi_in)
                .collect();
            for s in due {
                self.queue_child_rekey(ctx, s);
            }
        }
        self.pump(ctx);
        true
    }

    /// Emits ChildSaDown/IkeSaDown for everything this SA carried.
    fn tear_down(&mut self, ctx: &mut Ctx<'_>) {
        let peer = self.remote.ip();
        for c in self.children.drain(..) {
            ctx.events.push_back(Event::ChildSaDown {
                peer,
                spi_in: c.spi_in,
                spi_out: c.spi_out,
            });
        }
        if self.peer_identity.is_some() {
            ctx.events.push_back(Event::IkeSaDown { peer });
        }
        self.outstanding = None;
        self.pending.clear();
    }

    /// Starts the next queued request if the window (size 1) is free.
    fn pump(&mut self, ctx: &mut Ctx<'_>) {
        if self.outstanding.is_some() {
            return;
        }
        let Some(req) = self.pending.pop_front() else {
            return;
        };
        match req {
            Request::Liveness => {
                self.send_request(ctx, exchange::INFORMATIONAL, &[], Request::Liveness)
            }
            Request::DeleteIke => {
                let d = Payload::Delete(Delete {
                    protocol: protocol::IKE,
                    spi_size: 0,
                    spis: Vec::new(),
                });
                self.send_request(ctx, exchange::INFORMATIONAL, &[d], Request::DeleteIke);
            }
            Request::DeleteChild { spi_in } => {
                let d = Payload::Delete(Delete {
                    protocol: protocol::ESP,
                    spi_size: 4,
                    spis: vec![spi_in.to_be_bytes().to_vec()],
                });
                self.send_request(
                    ctx,
                    exchange::INFORMATIONAL,
                    &[d],
                    Request::DeleteChild { spi_in },
                );
            }
            Request::RekeyChild {
                spi_in,
                new_spi,
                nonce,
                share,
            } => {
                if !self.children.iter().any(|c| c.spi_in == spi_in) {
                    return self.pump(ctx);
                }
                let mut inner = vec![Payload::Notify(Notify {
                    protocol: protocol::ESP,
                    spi: spi_in.to_be_bytes().to_vec(),
                    kind: notify::REKEY_SA,
                    data: Vec::new(),
                })];
                if ctx.config.mode == ChildMode::Transport {
                    inner.push(Payload::Notify(Notify::status(
                        notify::USE_TRANSPORT_MODE,
                        Vec::new(),
                    )));
                }
                let mut proposal = esp_proposal(
                    1,
                    new_spi,
                    &ctx.config.esp_suites,
                    if ctx.config.esn { None } else { Some(false) },
                );
                if let Some(s) = &share {
                    // PFS: the proposal names the group of our KE payload.
                    proposal
                        .transforms
                        .push(Transform::new(transform::DH, s.group().id()));
                }
                inner.push(Payload::Sa(vec![proposal]));
                inner.push(Payload::Nonce(nonce.clone()));
                if let Some(s) = &share {
                    inner.push(Payload::Ke {
                        group: s.group().id(),
                        data: s.public().to_vec(),
                    });
                }
                let (tsi, tsr) = self.our_ts(ctx);
                inner.push(Payload::TsI(vec![tsi]));
                inner.push(Payload::TsR(vec![tsr]));
                self.send_request(
                    ctx,
                    exchange::CREATE_CHILD_SA,
                    &inner,
                    Request::RekeyChild {
                        spi_in,
                        new_spi,
                        nonce,
                        share,
                    },
                );
            }
            Request::RekeyIke {
                new_spi,
                nonce,
                share,
            } => {
                let Some(keys) = &self.keys else { return };
                let mut transforms = vec![
                    keys.encr.transform(),
                    Transform::new(transform::PRF, keys.prf.id()),
                ];
                transforms.push(Transform::new(transform::DH, share.group().id()));
                let inner = vec![
                    Payload::Sa(vec![Proposal {
                        number: 1,
                        protocol: protocol::IKE,
                        spi: new_spi.to_be_bytes().to_vec(),
                        transforms,
                    }]),
                    Payload::Nonce(nonce.clone()),
                    Payload::Ke {
                        group: share.group().id(),
                        data: share.public().to_vec(),
                    },
                ];
                self.send_request(
                    ctx,
                    exchange::CREATE_CHILD_SA,
                    &inner,
                    Request::RekeyIke {
                        new_spi,
                        nonce,
                        share,
                    },
                );
            }
            Request::Handshake => {}
        }
    }

    /// Our TSi/TSr as the requester of an exchange (TSi names the requester's side).
    fn our_ts(&self, ctx: &Ctx<'_>) -> (TrafficSelector, TrafficSelector) {
        (
            TrafficSelector::host(ctx.config.local_addr, ctx.config.ts_protocol),
            TrafficSelector::host(self.remote.ip(), ctx.config.ts_protocol),
        )
    }

    fn queue_child_rekey(&mut self, ctx: &mut Ctx<'_>, spi_in: u32) {
        let (Ok(new_spi), Some(c)) = (
            crate::crypto::random_spi32(),
            self.children.iter_mut().find(|c| c.spi_in == spi_in),
        ) else {
            return;
        };
        let mut nonce = vec![0u8; NONCE_LEN];
        if crate::crypto::random(&mut nonce).is_err() {
            return;
        }
        c.rekeying = true;
        // PFS: a fresh key exchange for every rekeyed CHILD SA.
        // The group IKE_SA_INIT settled on is one both ends accept.
        let group = self
            .dh_group
            .or_else(|| ctx.config.ike_dh.first().copied())
            .unwrap_or(DhGroup::X25519);
        let share = KeyShare::generate(group).ok().map(std::sync::Arc::new);
        self.pending.push_back(Request::RekeyChild {
            spi_in,
            new_spi,
            nonce,
            share,
        });
        self.pump(ctx);
    }

    fn queue_ike_rekey(&mut self, ctx: &mut Ctx<'_>) {
        if self.rekeying_ike {
            return;
        }
        let Ok(new_spi) = crate::crypto::random_spi64() else {
            return;
        };
        let mut nonce = vec![0u8; NONCE_LEN];
        if crate::crypto::random(&mut nonce).is_err() {
            return;
        }
        // The group IKE_SA_INIT settled on is one both ends accept.
        let group = self
            .dh_group
            .or_else(|| ctx.config.ike_dh.first().copied())
            .unwrap_or(DhGroup::X25519);
        let Ok(share) = KeyShare::generate(group) else {
            return;
        };
        self.rekeying_ike = true;
        self.pending.push_back(Request::RekeyIke {
            new_spi,
            nonce,
            share: std::sync::Arc::new(share),
        });
        self.pump(ctx);
    }

    /// Handles one datagram for this SA. Returns false when the SA must be removed.
    fn handle(
        &mut self,
        ctx: &mut Ctx<'_>,
        stats: &mut Stats,
        remote: SocketAddr,
        local: SocketAddr,
        header: Header,
        bytes: &[u8],
    ) -> bool {
        if header.is_response() {
            let Some(o) = &self.outstanding else {
                stats.unexpected += 1;
                return true;
            };
            if o.message_id != header.message_id || o.exchange != header.exchange {
                stats.unexpected += 1;
                return true;
            }
            if header.exchange == exchange::IKE_SA_INIT {
                return self.init_response(ctx, stats, header, bytes);
            }
        } else if header.message_id != self.expected_request_id {
            if let Some((id, d)) = &self.last_response
                && *id == header.message_id
            {
                let d = d.clone();
                // Answer retransmissions once per complete request (first fragment only).
                let first_fragment = match Message::decode(bytes) {
                    Ok(m) => {
                        !matches!(m.payloads.last(), Some(Payload::Skf { number, .. }) if *number != 1)
                    }
                    Err(_) => false,
                };
                if first_fragment {
                    self.emit(ctx, &d);
                    stats.retransmits_answered += 1;
                }
            } else {
                stats.unexpected += 1;
            }
            return true;
        }
        let Some(inner) = self.decrypt(stats, header, bytes) else {
            return true;
        };
        self.last_heard = ctx.now;
        // Authenticated traffic from a new address (NAT mapping change): follow it.
        if self.nat && (remote != self.remote || local != self.local) {
            self.remote = remote;
            self.local = local;
        }
        if header.is_response() {
            let Some(o) = self.outstanding.take() else {
                return true;
            };
            let keep = match (header.exchange, o.request) {
                (exchange::IKE_AUTH, _) => self.auth_response(ctx, &inner),
                (exchange::INFORMATIONAL, Request::DeleteIke) => {
                    self.tear_down(ctx);
                    false
                }
                (exchange::INFORMATIONAL, Request::DeleteChild { spi_in }) => {
                    self.remove_child(ctx, spi_in);
                    true
                }
                (exchange::INFORMATIONAL, _) => true,
                (
                    exchange::CREATE_CHILD_SA,
                    Request::RekeyChild {
                        spi_in,
                        new_spi,
                        nonce,
                        share,
                    },
                ) => {
                    self.rekey_child_response(
                        ctx,
                        &inner,
                        spi_in,
                        new_spi,
                        &nonce,
                        share.as_deref(),
                    );
                    true
                }
                (
                    exchange::CREATE_CHILD_SA,
                    Request::RekeyIke {
                        new_spi,
                        nonce,
                        share,
                    },
                ) => self.rekey_ike_response(ctx, &inner, new_spi, &nonce, &share),
                _ => {
                    stats.unexpected += 1;
                    true
                }
            };
            if keep {
                self.pump(ctx);
            }
            return keep;
        }
        self.expected_request_id = self.expected_request_id.wrapping_add(1);
        match header.exchange {
            exchange::IKE_AUTH if self.state == State::HalfOpen => {
                self.auth_request(ctx, header, &inner)
            }
            exchange::INFORMATIONAL => self.informational_request(ctx, header, &inner),
            exchange::CREATE_CHILD_SA if self.state == State::Established => {
                self.create_child_request(ctx, header, &inner);
                true
            }
            _ => {
                stats.unexpected += 1;
                // Answer anyway so the peer does not retransmit forever.
                let n = Payload::Notify(Notify::status(notify::INVALID_SYNTAX, Vec::new()));
                self.send_response(ctx, header.exchange, header.message_id, &[n]);
                true
            }
        }
    }

    /// Opens SK or reassembles SKF; None if not (yet) available.
    fn decrypt(&mut self, stats: &mut Stats, header: Header, bytes: &[u8]) -> Option<Vec<Payload>> {
        let msg = match Message::decode(bytes) {
            Ok(m) => m,
            Err(_) => {
                stats.malformed += 1;
                return None;
            }
        };
        let rx = self.rx.as_ref()?;
        match msg.payloads.last() {
            Some(Payload::Sk { first_inner, body }) => {
                let plain = match rx.open(bytes, body) {
                    Ok(p) => p,
                    Err(_) => {
                        stats.integrity_failed += 1;
                        return None;
                    }
                };
                match wire::decode_chain(*first_inner, &plain) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        stats.malformed += 1;
                        None
                    }
                }
            }
            Some(Payload::Skf {
                first_inner,
                number,
                total,
                body,
            }) => {
                if *total > MAX_FRAGMENTS {
                    stats.malformed += 1;
                    return None;
                }
                let plain = match rx.open(bytes, body) {
                    Ok(p) => p,
                    Err(_) => {
                        stats.integrity_failed += 1;
                        return None;
                    }
                };
                let fresh = !matches!(&self.frags, Some(f) if f.message_id == header.message_id && f.total == *total);
                if fresh {
                    self.frags = Some(FragBuf {
                        message_id: header.message_id,
                        total: *total,
                        first_inner: 0,
                        parts: (0..*total).map(|_| None).collect(),
                    });
                }
                let f = self.frags.as_mut()?;
                if *number == 1 {
                    f.first_inner = *first_inner;
                }
                if let Some(slot) = f.parts.get_mut(usize::from(*number) - 1) {
                    *slot = Some(plain);
                }
                if f.parts.iter().any(Option::is_none) {
                    return None;
                }
                let f = self.frags.take()?;
                let whole: Vec<u8> = f
                    .parts
                    .iter()
                    .flatten()
                    .flat_map(|p| p.iter().copied())
                    .collect();
                match wire::decode_chain(f.first_inner, &whole) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        stats.malformed += 1;
                        None
                    }
                }
            }
            _ => {
                stats.malformed += 1;
                None
            }
        }
    }

    fn init_response(
        &mut self,
        ctx: &mut Ctx<'_>,
        stats: &mut Stats,
        header: Header,
        bytes: &[u8],
    ) -> bool {
        if self.state != State::InitSent {
            stats.unexpected += 1;
            return true;
        }
        let msg = match Message::decode(bytes) {
            Ok(m) => m,
            Err(_) => {
                stats.malformed += 1;
                return true;
            }
        };
        let p = &msg.payloads;
        let peer = self.remote.ip();
        if let Some(n) = wire::notifies(p).find(|n| n.kind == notify::COOKIE) {
            if self.cookie.is_some() && self.groups_tried > 4 {
                ctx.fail(
                    peer,
                    FailReason::Protocol("cookie loop"),
                    "peer keeps demanding cookies",
                );
                return false;
            }
            self.groups_tried += 1;
            self.cookie = Some(n.data.clone());
            self.send_init_request(ctx);
            return true;
        }
        if let Some(n) = wire::notifies(p).find(|n| n.kind == notify::INVALID_KE_PAYLOAD) {
            let group = n
                .data
                .first_chunk::<2>()
                .map(|b| u16::from_be_bytes(*b))
                .and_then(DhGroup::from_id);
            match group {
                Some(g) if ctx.config.ike_dh.contains(&g) && self.groups_tried < 4 => {
                    self.groups_tried += 1;
                    let Ok(share) = KeyShare::generate(g) else {
                        return false;
                    };
                    self.share = Some(share);
                    self.send_init_request(ctx);
                    return true;
                }
                _ => {
                    ctx.fail(
                        peer,
                        FailReason::NoProposalChosen,
                        "peer wants a DH group we do not offer",
                    );
                    return false;
                }
            }
        }
        if let Some(k) = first_error(p) {
            ctx.fail(
                peer,
                notify_reason(k),
                format!("IKE_SA_INIT refused with notify {k}"),
            );
            return false;
        }
        let proposals = find(p, |x| {
            if let Payload::Sa(s) = x {
                Some(s)
            } else {
                None
            }
        });
        let ke = p.iter().find_map(|x| {
            if let Payload::Ke { group, data } = x {
                Some((*group, data))
            } else {
                None
            }
        });
        let nr = find(p, |x| {
            if let Payload::Nonce(n) = x {
                Some(n)
            } else {
                None
            }
        });
        let (Some(proposals), Some((group, ke_data)), Some(nr)) = (proposals, ke, nr) else {
            stats.malformed += 1;
            return true;
        };
        // The responder must pick exactly one of our offers.
        let chosen = match proposals.as_slice() {
            [one] => choose_ike(ctx.config, std::slice::from_ref(one)),
            _ => None,
        };
        let Some((_, encr, prf, dhs)) = chosen else {
            ctx.fail(
                peer,
                FailReason::NoProposalChosen,
                "responder chose a proposal we did not offer",
            );
            return false;
        };
        let Some(share) = self
            .share
            .as_ref()
            .filter(|s| s.group().id() == group && dhs.contains(&s.group()))
        else {
            ctx.fail(
                peer,
                FailReason::Protocol("KE group"),
                "responder's KE group differs from ours",
            );
            return false;
        };
        if !(16..=256).contains(&nr.len()) {
            stats.malformed += 1;
            return true;
        }
        let Ok(shared) = share.agree(ke_data) else {
            ctx.fail(
                peer,
                FailReason::Protocol("KE"),
                "invalid responder public value",
            );
            return false;
        };
        self.spi_r = header.spi_r;
        self.nr = nr.clone();
        let keys = IkeKeys::derive(prf, encr, &shared, &self.ni, nr, self.spi_i, self.spi_r);
        self.install_keys(keys);
        self.dh_group = DhGroup::from_id(group);
        self.share = None;
        self.init_resp = bytes.to_vec();
        self.peer_fragments = has_notify(p, notify::IKEV2_FRAGMENTATION_SUPPORTED);
        self.peer_sig_hashes = has_notify(p, notify::SIGNATURE_HASH_ALGORITHMS);
        let nat_d = has_notify(p, notify::NAT_DETECTION_SOURCE_IP);
        let src_ok = wire::notifies(p)
            .filter(|n| n.kind == notify::NAT_DETECTION_SOURCE_IP)
            .any(|n| n.data == crate::crypto::nat_hash(self.spi_i, self.spi_r, self.remote));
        let dst_ok = wire::notifies(p)
            .filter(|n| n.kind == notify::NAT_DETECTION_DESTINATION_IP)
            .any(|n| n.data == crate::crypto::nat_hash(self.spi_i, self.spi_r, self.local));
        self.nat = (nat_d && !(src_ok && dst_ok)) || ctx.config.force_udp_encap;
        if self.nat {
            // RFC 7296 §2.23: move to port 4500 once NAT is detected.
            self.local.set_port(NAT_T_PORT);
            self.remote.set_port(NAT_T_PORT);
        }
        self.outstanding = None;
        self.state = State::AuthSent;
        let Some(inner) = self.auth_payloads(ctx, true) else {
            ctx.fail(peer, FailReason::Protocol("signing"), "could not sign AUTH");
            return false;
        };
        let mut inner = inner;
        if self.initial_contact {
            // After IDi and CERT, before CERTREQ and AUTH (RFC 7296 §1.2).
            let at = inner
                .iter()
                .position(|p| matches!(p, Payload::CertReq { .. } | Payload::Auth { .. }))
                .unwrap_or(inner.len());
            inner.insert(
                at,
                Payload::Notify(Notify::status(notify::INITIAL_CONTACT, Vec::new())),
            );
        }
        if ctx.config.mode == ChildMode::Transport {
            inner.push(Payload::Notify(Notify::status(
                notify::USE_TRANSPORT_MODE,
                Vec::new(),
            )));
        }
        inner.push(Payload::Sa(vec![esp_proposal(
            1,
            self.auth_child_spi,
            &ctx.config.esp_suites,
            if ctx.config.esn { None } else { Some(false) },
        )]));
        let (tsi, tsr) = self.our_ts(ctx);
        inner.push(Payload::TsI(vec![tsi]));
        inner.push(Payload::TsR(vec![tsr]));
        self.send_request(ctx, exchange::IKE_AUTH, &inner, Request::Handshake);
        true
    }

    /// ID, CERT, CERTREQ and AUTH payloads for our IKE_AUTH message.
    fn auth_payloads(&self, ctx: &Ctx<'_>, initiator: bool) -> Option<Vec<Payload>> {
        let keys = self.keys.as_ref()?;
        let id = ctx.config.local_id.to_id();
        let (first, nonce, sk_p) = if initiator {
            (&self.init_req, &self.nr, &keys.sk_pi)
        } else {
            (&self.init_resp, &self.ni, &keys.sk_pr)
        };
        let octets = auth::signed_octets(keys.prf, sk_p, first, nonce, &id);
        let mut v = vec![if initiator {
            Payload::IdI(id)
        } else {
            Payload::IdR(id)
        }];
        match (&ctx.config.auth, ctx.key) {
            (AuthConfig::Psk(psk), _) => {
                v.push(Payload::Auth {
                    method: wire::auth_method::SHARED_KEY_MIC,
                    data: auth::psk_auth(keys.prf, psk, &octets).to_vec(),
                });
            }
            (AuthConfig::Certificate { cert, .. }, Some(key)) => {
                v.push(Payload::Cert {
                    encoding: wire::cert_encoding::X509_SIGNATURE,
                    data: cert.clone(),
                });
                if initiator {
                    v.push(Payload::CertReq {
                        encoding: wire::cert_encoding::X509_SIGNATURE,
                        data: ctx.ca_key_ids.to_vec(),
                    });
                }
                v.push(Payload::Auth {
                    method: wire::auth_method::DIGITAL_SIGNATURE,
                    data: key.sign(&octets)?,
                });
            }
            (AuthConfig::Certificate { .. }, None) => return None,
        }
        Some(v)
    }

    /// Checks the peer's ID/CERT/AUTH. `peer_is_initiator` selects the signed octets.
    fn verify_peer(
        &self,
        ctx: &Ctx<'_>,
        inner: &[Payload],
        peer_is_initiator: bool,
    ) -> Result<Identity, String> {
        let keys = self.keys.as_ref().ok_or("no keys")?;
        let id = find(inner, |x| match x {
            Payload::IdI(i) if peer_is_initiator => Some(i),
            Payload::IdR(i) if !peer_is_initiator => Some(i),
            _ => None,
        })
        .ok_or("no ID payload")?;
        let (method, data) = inner
            .iter()
            .find_map(|x| {
                if let Payload::Auth { method, data } = x {
                    Some((*method, data))
                } else {
                    None
                }
            })
            .ok_or("no AUTH payload")?;
        let (first, nonce, sk_p) = if peer_is_initiator {
            (&self.init_req, &self.nr, &keys.sk_pi)
        } else {
            (&self.init_resp, &self.ni, &keys.sk_pr)
        };
        let octets = auth::signed_octets(keys.prf, sk_p, first, nonce, id);
        let identity = Identity::from_id(id);
        match &ctx.config.auth {
            AuthConfig::Psk(psk) => {
                if method != wire::auth_method::SHARED_KEY_MIC {
                    return Err(
                        auth::AuthError::Method(method, wire::auth_method::SHARED_KEY_MIC)
                            .to_string(),
                    );
                }
                let want = auth::psk_auth(keys.prf, psk, &octets);
                aws_lc_rs::constant_time::verify_slices_are_equal(&want, data)
                    .map_err(|_| auth::AuthError::PskMismatch.to_string())?;
            }
            AuthConfig::Certificate { cas, .. } => {
                if method != wire::auth_method::DIGITAL_SIGNATURE {
                    return Err(auth::AuthError::Method(
                        method,
                        wire::auth_method::DIGITAL_SIGNATURE,
                    )
                    .to_string());
                }
                let mut certs = inner.iter().filter_map(|x| match x {
                    Payload::Cert {
                        encoding: wire::cert_encoding::X509_SIGNATURE,
                        data,
                    } => Some(data.clone()),
                    _ => None,
                });
                let ee = certs
                    .next()
                    .ok_or_else(|| auth::AuthError::NoCertificate.to_string())?;
                let intermediates: Vec<Vec<u8>> = certs.collect();
                auth::verify_signature_auth(
                    cas,
                    &ee,
                    &intermediates,
                    &identity,
                    data,
                    &octets,
                    rustls_pki_types::UnixTime::now(),
                )
                .map_err(|e| e.to_string())?;
            }
        }
        Ok(identity)
    }

    fn child_keymat(
        &self,
        suite: Suite,
        ni: &[u8],
        nr: &[u8],
        shared: Option<&[u8]>,
    ) -> Option<KeyPair> {
        let keys = self.keys.as_ref()?;
        let len = suite.keymat_len();
        let seed = [shared.unwrap_or_default(), ni, nr].concat();
        let km = keys.prf.prf_plus(&keys.sk_d, &seed, 2 * len);
        let a = Zeroizing::new(km.get(..len)?.to_vec());
        let b = Zeroizing::new(km.get(len..)?.to_vec());
        Some((a, b))
    }

    #[allow(clippy::too_many_arguments)]
    fn child_up(
        &mut self,
        ctx: &mut Ctx<'_>,
        we_requested: bool,
        spi_in: u32,
        spi_out: u32,
        suite: Suite,
        esn: bool,
        mode: ChildMode,
        (ki_r, kr_i): KeyPair,
        (local_ts, remote_ts): (TrafficSelector, TrafficSelector),
        rekeys: Option<u32>,
    ) {
        // KEYMAT: initiator-to-responder keys come first (RFC 7296 §2.17).
        let (key_out, key_in) = if we_requested {
            (ki_r, kr_i)
        } else {
            (kr_i, ki_r)
        };
        let udp_encap = (self.nat || self.local.port() == NAT_T_PORT)
            .then_some((self.local.port(), self.remote.port()));
        self.children.push(Child {
            spi_in,
            spi_out,
            created: ctx.now,
            rekeying: false,
            rekey_at: ctx.now + rekey_after(ctx.config.child_lifetime),
            expiring: false,
        });
        ctx.events.push_back(Event::ChildSaUp {
            peer: self.remote.ip(),
            keys: ChildSaKeys {
                spi_in,
                spi_out,
                suite,
                esn,
                mode,
                key_in,
                key_out,
                udp_encap,
                local_ts,
                remote_ts,
            },
            lifetime: ctx.config.child_lifetime,
            rekeys,
        });
    }

    fn ike_up(&mut self, ctx: &mut Ctx<'_>, identity: Identity) {
        self.state = State::Established;
        self.created = ctx.now;
        self.rekey_at = ctx.now + rekey_after(ctx.config.ike_lifetime);
        self.peer_identity = Some(identity.clone());
        ctx.events.push_back(Event::IkeSaUp {
            peer: self.remote.ip(),
            peer_identity: identity,
            remote: self.remote,
            nat: self.nat,
        });
    }

    fn auth_response(&mut self, ctx: &mut Ctx<'_>, inner: &[Payload]) -> bool {
        let peer = self.remote.ip();
        if has_notify(inner, notify::AUTHENTICATION_FAILED) {
            ctx.fail(
                peer,
                FailReason::AuthenticationFailed,
                "peer rejected our AUTH",
            );
            return false;
        }
        let identity = match self.verify_peer(ctx, inner, false) {
            Ok(i) => i,
            Err(e) => {
                ctx.fail(
                    peer,
                    FailReason::AuthenticationFailed,
                    format!("peer AUTH rejected: {e}"),
                );
                // Tell the peer, then drop the SA (RFC 7296 §2.21.2).
                let n = Payload::Notify(Notify::status(notify::AUTHENTICATION_FAILED, Vec::new()));
                let id = self.next_request_id;
                let h = self.header(exchange::INFORMATIONAL, false, id);
                let d = self.seal(ctx, h, &[n]);
                self.emit(ctx, &d);
                return false;
            }
        };
        self.ike_up(ctx, identity);
        if let Some(k) = first_error(inner) {
            ctx.fail(
                peer,
                notify_reason(k),
                format!("CHILD SA refused in IKE_AUTH with notify {k}"),
            );
            return true;
        }
        let transport = has_notify(inner, notify::USE_TRANSPORT_MODE);
        let mode = if transport {
            ChildMode::Transport
        } else {
            ChildMode::Tunnel
        };
        if mode != ctx.config.mode {
            ctx.fail(
                peer,
                FailReason::NoProposalChosen,
                format!("peer chose {mode:?} mode, we need {:?}", ctx.config.mode),
            );
            self.pending.push_back(Request::DeleteIke);
            self.state = State::Deleting;
            return true;
        }
        self.accept_child_response(
            ctx,
            inner,
            self.auth_child_spi,
            &self.ni.clone(),
            &self.nr.clone(),
            None,
            None,
            mode,
        );
        true
    }

    /// The requester's side of a CHILD SA answer (IKE_AUTH or CREATE_CHILD_SA).
    #[allow(clippy::too_many_arguments)]
    fn accept_child_response(
        &mut self,
        ctx: &mut Ctx<'_>,
        inner: &[Payload],
        spi_in: u32,
        ni: &[u8],
        nr: &[u8],
        shared: Option<&[u8]>,
        rekeys: Option<u32>,
        mode: ChildMode,
    ) {
        let peer = self.remote.ip();
        let proposals = find(inner, |x| {
            if let Payload::Sa(s) = x {
                Some(s)
            } else {
                None
            }
        });
        let chosen = match proposals.map(Vec::as_slice) {
            Some([one]) => choose_esp(ctx.config, std::slice::from_ref(one), spi_in),
            _ => None,
        };
        let Some((_, suite, esn, spi_out)) = chosen else {
            ctx.fail(
                peer,
                FailReason::NoProposalChosen,
                "peer's CHILD SA proposal is not one we offered",
            );
            return;
        };
        if !ctx.config.esn && esn {
            ctx.fail(
                peer,
                FailReason::NoProposalChosen,
                "peer chose ESN, which we did not offer",
            );
            return;
        }
        let (tsi, tsr) = traffic_selectors(inner);
        let (Some(tsi), Some(tsr)) = (tsi, tsr) else {
            ctx.fail(
                peer,
                FailReason::TsUnacceptable,
                "no traffic selectors in the answer",
            );
            return;
        };
        // The answer's TSi is our side, TSr the peer's.
        let Some(ts) = narrow_ts(ctx.config, ctx.config.local_addr, peer, self.nat, tsr, tsi)
        else {
            ctx.fail(peer, FailReason::TsUnacceptable, "peer narrowed the traffic selectors to something else than GRE between the NBMA addresses");
            return;
        };
        let Some(km) = self.child_keymat(suite, ni, nr, shared) else {
            return;
        };
        self.child_up(ctx, true, spi_in, spi_out, suite, esn, mode, km, ts, rekeys);
    }

    /// The responder's side of a CHILD SA request. Returns the payloads to answer with.
    #[allow(clippy::too_many_arguments)]
    fn offer_child(
        &mut self,
        ctx: &mut Ctx<'_>,
        inner: &[Payload],
        ni: &[u8],
        nr: &[u8],
        shared: Option<&[u8]>,
        rekeys: Option<u32>,
    ) -> Vec<Payload> {
        let peer = self.remote.ip();
        let refuse = |ctx: &mut Ctx<'_>, kind: u16, reason: FailReason, detail: &str| {
            ctx.fail(peer, reason, detail);
            vec![Payload::Notify(Notify::status(kind, Vec::new()))]
        };
        let transport = has_notify(inner, notify::USE_TRANSPORT_MODE);
        let mode = if transport {
            ChildMode::Transport
        } else {
            ChildMode::Tunnel
        };
        if mode != ctx.config.mode {
            return refuse(
                ctx,
                notify::NO_PROPOSAL_CHOSEN,
                FailReason::NoProposalChosen,
                "peer asked for another encapsulation mode",
            );
        }
        let Ok(our_spi) = crate::crypto::random_spi32() else {
            return Vec::new();
        };
        let proposals = find(inner, |x| {
            if let Payload::Sa(s) = x {
                Some(s)
            } else {
                None
            }
        });
        let Some((chosen, suite, esn, spi_out)) =
            proposals.and_then(|p| choose_esp(ctx.config, p, our_spi))
        else {
            return refuse(
                ctx,
                notify::NO_PROPOSAL_CHOSEN,
                FailReason::NoProposalChosen,
                "no acceptable ESP proposal",
            );
        };
        let (tsi, tsr) = traffic_selectors(inner);
        let ts = match (tsi, tsr) {
            (Some(tsi), Some(tsr)) => {
                narrow_ts(ctx.config, ctx.config.local_addr, peer, self.nat, tsi, tsr)
            }
            _ => None,
        };
        let Some((ours, theirs)) = ts else {
            return refuse(
                ctx,
                notify::TS_UNACCEPTABLE,
                FailReason::TsUnacceptable,
                "peer's traffic selectors do not cover GRE between the NBMA addresses",
            );
        };
        let Some(km) = self.child_keymat(suite, ni, nr, shared) else {
            return Vec::new();
        };
        self.child_up(
            ctx,
            false,
            our_spi,
            spi_out,
            suite,
            esn,
            mode,
            km,
            (ours, theirs),
            rekeys,
        );
        let mut out = Vec::new();
        if mode == ChildMode::Transport {
            out.push(Payload::Notify(Notify::status(
                notify::USE_TRANSPORT_MODE,
                Vec::new(),
            )));
        }
        out.push(Payload::Sa(vec![chosen]));
        out.push(Payload::TsI(vec![theirs]));
        out.push(Payload::TsR(vec![ours]));
        out
    }

    fn auth_request(&mut self, ctx: &mut Ctx<'_>, header: Header, inner: &[Payload]) -> bool {
        let peer = self.remote.ip();
        let identity = match self.verify_peer(ctx, inner, true) {
            Ok(i) => i,
            Err(e) => {
                ctx.fail(
                    peer,
                    FailReason::AuthenticationFailed,
                    format!("peer AUTH rejected: {e}"),
                );
                let n = Payload::Notify(Notify::status(notify::AUTHENTICATION_FAILED, Vec::new()));
                self.send_response(ctx, exchange::IKE_AUTH, header.message_id, &[n]);
                return false;
            }
        };
        let Some(mut out) = self.auth_payloads(ctx, false) else {
            return false;
        };
        if has_notify(inner, notify::INITIAL_CONTACT) {
            ctx.initial_contact = Some(identity.clone());
        }
        self.ike_up(ctx, identity);
        let (ni, nr) = (self.ni.clone(), self.nr.clone());
        out.extend(self.offer_child(ctx, inner, &ni, &nr, None, None));
        self.send_response(ctx, exchange::IKE_AUTH, header.message_id, &out);
        true
    }

    fn remove_child(&mut self, ctx: &mut Ctx<'_>, spi_in: u32) {
        if let Some(i) = self.children.iter().position(|c| c.spi_in == spi_in) {
            let c = self.children.remove(i);
            ctx.events.push_back(Event::ChildSaDown {
                peer: self.remote.ip(),
                spi_in: c.spi_in,
                spi_out: c.spi_out,
            });
        }
    }

    fn informational_request(
        &mut self,
        ctx: &mut Ctx<'_>,
        header: Header,
        inner: &[Payload],
    ) -> bool {
        let mut reply = Vec::new();
        let mut delete_ike = false;
        for p in inner {
            let Payload::Delete(d) = p else { continue };
            match d.protocol {
                protocol::IKE => delete_ike = true,
                protocol::ESP | protocol::AH => {
                    let mut ours = Vec::new();
                    for s in &d.spis {
                        let Ok(b) = <[u8; 4]>::try_from(s.as_slice()) else {
                            continue;
                        };
                        let spi_out = u32::from_be_bytes(b);
                        if let Some(c) = self.children.iter().find(|c| c.spi_out == spi_out) {
                            ours.push(c.spi_in);
                        }
                    }
                    for s in &ours {
                        self.remove_child(ctx, *s);
                    }
                    if !ours.is_empty() {
                        reply.push(Payload::Delete(Delete {
                            protocol: d.protocol,
                            spi_size: 4,
                            spis: ours.iter().map(|s| s.to_be_bytes().to_vec()).collect(),
                        }));
                    }
                }
                _ => {}
            }
        }
        // An initiator that rejects our AUTH says so in a separate INFORMATIONAL and drops
        // the SA (RFC 7296 §2.21.2); so do we, CHILD SAs included.
        if has_notify(inner, notify::AUTHENTICATION_FAILED) {
            ctx.fail(
                self.remote.ip(),
                FailReason::AuthenticationFailed,
                "peer rejected our AUTH",
            );
            delete_ike = true;
        }
        if delete_ike {
            self.send_response(ctx, exchange::INFORMATIONAL, header.message_id, &[]);
            self.tear_down(ctx);
            return false;
        }
        self.send_response(ctx, exchange::INFORMATIONAL, header.message_id, &reply);
        true
    }

    fn create_child_request(&mut self, ctx: &mut Ctx<'_>, header: Header, inner: &[Payload]) {
        let peer = self.remote.ip();
        let Some(ni) = find(inner, |x| {
            if let Payload::Nonce(n) = x {
                Some(n)
            } else {
                None
            }
        })
        .cloned() else {
            let n = Payload::Notify(Notify::status(notify::INVALID_SYNTAX, Vec::new()));
            return self.send_response(ctx, exchange::CREATE_CHILD_SA, header.message_id, &[n]);
        };
        let mut nr = vec![0u8; NONCE_LEN];
        if crate::crypto::random(&mut nr).is_err() {
            return;
        }
        let proposals = find(inner, |x| {
            if let Payload::Sa(s) = x {
                Some(s)
            } else {
                None
            }
        });
        let ike_rekey = proposals.is_some_and(|p| p.iter().any(|p| p.protocol == protocol::IKE));
        let ke = inner.iter().find_map(|x| {
            if let Payload::Ke { group, data } = x {
                Some((*group, data.clone()))
            } else {
                None
            }
        });
        if ike_rekey {
            return self.rekey_ike_request(ctx, header, inner, &ni, nr, ke);
        }
        let rekeyed = wire::notifies(inner)
            .find(|n| n.kind == notify::REKEY_SA && n.protocol == protocol::ESP)
            .and_then(|n| <[u8; 4]>::try_from(n.spi.as_slice()).ok())
            .map(u32::from_be_bytes);
        let old = rekeyed.and_then(|spi_out| {
            self.children
                .iter()
                .find(|c| c.spi_out == spi_out)
                .map(|c| c.spi_in)
        });
        if rekeyed.is_some() && old.is_none() {
            let n = Payload::Notify(Notify {
                protocol: protocol::ESP,
                spi: rekeyed.unwrap_or_default().to_be_bytes().to_vec(),
                kind: notify::CHILD_SA_NOT_FOUND,
                data: Vec::new(),
            });
            return self.send_response(ctx, exchange::CREATE_CHILD_SA, header.message_id, &[n]);
        }
        let mut ke_out = None;
        let mut shared = None;
        if let Some((group, data)) = &ke {
            let Some(g) = DhGroup::from_id(*group).filter(|g| ctx.config.ike_dh.contains(g)) else {
                let want = ctx.config.ike_dh.first().map_or(0, |g| g.id());
                let n = Payload::Notify(Notify::status(
                    notify::INVALID_KE_PAYLOAD,
                    want.to_be_bytes().to_vec(),
                ));
                return self.send_response(ctx, exchange::CREATE_CHILD_SA, header.message_id, &[n]);
            };
            let Ok(share) = KeyShare::generate(g) else {
                return;
            };
            let Ok(s) = share.agree(data) else {
                let n = Payload::Notify(Notify::status(notify::INVALID_SYNTAX, Vec::new()));
                return self.send_response(ctx, exchange::CREATE_CHILD_SA, header.message_id, &[n]);
            };
            shared = Some(s);
            ke_out = Some(Payload::Ke {
                group: g.id(),
                data: share.public().to_vec(),
            });
        }
        let mut out = self.offer_child(
            ctx,
            inner,
            &ni,
            &nr,
            shared.as_deref().map(|v| v.as_slice()),
            old,
        );
        if out.iter().any(|p| matches!(p, Payload::Sa(_))) {
            // Our answer's SA must carry the DH transform if a KE was exchanged.
            if let (Some(Payload::Ke { group, .. }), Some(Payload::Sa(props))) = (
                &ke_out,
                out.iter_mut().find(|p| matches!(p, Payload::Sa(_))),
            ) {
                for pr in props.iter_mut() {
                    pr.transforms.push(Transform::new(transform::DH, *group));
                }
            }
            out.push(Payload::Nonce(nr));
            if let Some(k) = ke_out {
                out.push(k);
            }
            if let Some(old) = old
                && let Some(c) = self.children.iter_mut().find(|c| c.spi_in == old)
            {
                // The requester deletes the old SA; we keep it until then (no loss).
                c.rekeying = true;
            }
        }
        let _ = peer;
        self.send_response(ctx, exchange::CREATE_CHILD_SA, header.message_id, &out);
    }

    fn rekey_child_response(
        &mut self,
        ctx: &mut Ctx<'_>,
        inner: &[Payload],
        old_spi: u32,
        new_spi: u32,
        ni: &[u8],
        share: Option<&KeyShare>,
    ) {
        let peer = self.remote.ip();
        if let Some(k) = first_error(inner) {
            if let Some(c) = self.children.iter_mut().find(|c| c.spi_in == old_spi) {
                c.rekeying = false;
                // Try again later rather than at once; the hard lifetime still applies.
                c.rekey_at = ctx.now + REKEY_RETRY;
            }
            ctx.fail(
                peer,
                notify_reason(k),
                format!("CHILD SA rekey refused with notify {k}"),
            );
            return;
        }
        let Some(nr) = find(inner, |x| {
            if let Payload::Nonce(n) = x {
                Some(n)
            } else {
                None
            }
        })
        .cloned() else {
            ctx.fail(
                peer,
                FailReason::Protocol("no nonce"),
                "CREATE_CHILD_SA answer without nonce",
            );
            return;
        };
        let shared = match (
            share,
            inner.iter().find_map(|x| {
                if let Payload::Ke { data, .. } = x {
                    Some(data)
                } else {
                    None
                }
            }),
        ) {
            (Some(s), Some(d)) => s.agree(d).ok(),
            _ => None,
        };
        let before = self.children.len();
        self.accept_child_response(
            ctx,
            inner,
            new_spi,
            ni,
            &nr,
            shared.as_deref().map(|v| v.as_slice()),
            Some(old_spi),
            ctx.config.mode,
        );
        if self.children.len() > before {
            // New SA in place: now delete the old one (RFC 7296 §2.8).
            self.pending
                .push_back(Request::DeleteChild { spi_in: old_spi });
        }
    }

    fn rekey_ike_request(
        &mut self,
        ctx: &mut Ctx<'_>,
        header: Header,
        inner: &[Payload],
        ni: &[u8],
        nr: Vec<u8>,
        ke: Option<(u16, Vec<u8>)>,
    ) {
        let peer = self.remote.ip();
        let refuse = |kind: u16| vec![Payload::Notify(Notify::status(kind, Vec::new()))];
        let proposals = find(inner, |x| {
            if let Payload::Sa(s) = x {
                Some(s)
            } else {
                None
            }
        });
        let chosen = proposals.and_then(|p| choose_ike(ctx.config, p));
        let (Some((mut chosen, encr, prf, dhs)), Some((group, ke_data))) = (chosen, ke) else {
            ctx.fail(
                peer,
                FailReason::NoProposalChosen,
                "IKE rekey proposal not acceptable",
            );
            return self.send_response(
                ctx,
                exchange::CREATE_CHILD_SA,
                header.message_id,
                &refuse(notify::NO_PROPOSAL_CHOSEN),
            );
        };
        let peer_spi = proposals
            .and_then(|p| p.iter().find(|p| p.number == chosen.number))
            .and_then(|p| <[u8; 8]>::try_from(p.spi.as_slice()).ok())
            .map(u64::from_be_bytes);
        let (Some(peer_spi), Some(g)) = (peer_spi, dhs.iter().copied().find(|g| g.id() == group))
        else {
            let want = dhs.first().map_or(0, |g| g.id());
            let n = Payload::Notify(Notify::status(
                notify::INVALID_KE_PAYLOAD,
                want.to_be_bytes().to_vec(),
            ));
            return self.send_response(ctx, exchange::CREATE_CHILD_SA, header.message_id, &[n]);
        };
        let (Ok(share), Ok(new_spi)) = (KeyShare::generate(g), crate::crypto::random_spi64())
        else {
            return;
        };
        let Ok(shared) = share.agree(&ke_data) else {
            return;
        };
        if let Some(t) = chosen
            .transforms
            .iter_mut()
            .find(|t| t.kind == transform::DH)
        {
            t.id = g.id();
        }
        chosen.spi = new_spi.to_be_bytes().to_vec();
        let out = vec![
            Payload::Sa(vec![chosen]),
            Payload::Nonce(nr.clone()),
            Payload::Ke {
                group: g.id(),
                data: share.public().to_vec(),
            },
        ];
        self.send_response(ctx, exchange::CREATE_CHILD_SA, header.message_id, &out);
        let Some(old) = self.keys.as_ref() else {
            return;
        };
        // The peer requested: it is the new SA's initiator.
        let keys = IkeKeys::derive_rekey(
            old.prf, &old.sk_d, prf, encr, &shared, ni, &nr, peer_spi, new_spi,
        );
        self.switch_ike(ctx, keys, false, peer_spi, new_spi, false, g);
    }

    fn rekey_ike_response(
        &mut self,
        ctx: &mut Ctx<'_>,
        inner: &[Payload],
        new_spi: u64,
        ni: &[u8],
        share: &KeyShare,
    ) -> bool {
        let peer = self.remote.ip();
        self.rekeying_ike = false;
        if let Some(k) = first_error(inner) {
            ctx.fail(
                peer,
                notify_reason(k),
                format!("IKE SA rekey refused with notify {k}"),
            );
            self.rekey_at = ctx.now + REKEY_RETRY;
            return true;
        }
        let proposals = find(inner, |x| {
            if let Payload::Sa(s) = x {
                Some(s)
            } else {
                None
            }
        });
        let nr = find(inner, |x| {
            if let Payload::Nonce(n) = x {
                Some(n)
            } else {
                None
            }
        })
        .cloned();
        let ke = inner.iter().find_map(|x| {
            if let Payload::Ke { data, .. } = x {
                Some(data)
            } else {
                None
            }
        });
        let chosen = match proposals.map(Vec::as_slice) {
            Some([one]) => {
                choose_ike(ctx.config, std::slice::from_ref(one)).map(|c| (c, one.spi.clone()))
            }
            _ => None,
        };
        let (Some(((_, encr, prf, _), spi)), Some(nr), Some(ke)) = (chosen, nr, ke) else {
            ctx.fail(
                peer,
                FailReason::NoProposalChosen,
                "IKE rekey answer not acceptable",
            );
            self.rekey_at = ctx.now + REKEY_RETRY;
            return true;
        };
        let (Ok(b), Ok(shared)) = (<[u8; 8]>::try_from(spi.as_slice()), share.agree(ke)) else {
            ctx.fail(
                peer,
                FailReason::Protocol("IKE rekey"),
                "bad SPI or KE in IKE rekey answer",
            );
            self.rekey_at = ctx.now + REKEY_RETRY;
            return true;
        };
        let peer_spi = u64::from_be_bytes(b);
        let Some(old) = self.keys.as_ref() else {
            return true;
        };
        let keys = IkeKeys::derive_rekey(
            old.prf, &old.sk_d, prf, encr, &shared, ni, &nr, new_spi, peer_spi,
        );
        // Continue under the new keys; the old SA deletes itself (RFC 7296 §2.18).
        self.switch_ike(ctx, keys, true, new_spi, peer_spi, true, share.group());
        true
    }

    /// Moves this SA (its CHILD SAs included) onto rekeyed IKE keys and SPIs.
    #[allow(clippy::too_many_arguments)]
    fn switch_ike(
        &mut self,
        ctx: &mut Ctx<'_>,
        keys: IkeKeys,
        initiator: bool,
        spi_i: u64,
        spi_r: u64,
        delete_old: bool,
        group: DhGroup,
    ) {
        let old = self.our_spi();
        // The old SA keeps its keys to answer retransmissions and the delete, or to send it.
        let mut zombie = IkeSa::new(
            self.initiator,
            self.spi_i,
            self.spi_r,
            self.local,
            self.remote,
            ctx.now,
        );
        zombie.state = State::Rekeyed;
        zombie.tx = self.tx.take();
        zombie.rx = self.rx.take();
        zombie.nat = self.nat;
        zombie.peer_fragments = self.peer_fragments;
        zombie.next_request_id = self.next_request_id;
        zombie.expected_request_id = self.expected_request_id;
        zombie.last_response = self.last_response.take();
        if delete_old {
            zombie.pending.push_back(Request::DeleteIke);
            zombie.pump(ctx);
        }
        self.initiator = initiator;
        self.spi_i = spi_i;
        self.spi_r = spi_r;
        self.install_keys(keys);
        self.next_request_id = 0;
        self.expected_request_id = 0;
        self.last_response = None;
        self.outstanding = None;
        self.created = ctx.now;
        self.rekey_at = ctx.now + rekey_after(ctx.config.ike_lifetime);
        self.dh_group = Some(group);
        ctx.moved = Some((old, self.our_spi(), Box::new(zombie)));
        ctx.events.push_back(Event::IkeSaRekeyed {
            peer: self.remote.ip(),
        });
    }
}
