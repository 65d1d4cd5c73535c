//! Sans-IO NHRP engine: NHS (hub) and NHC (spoke) in one state machine.
//!
//! The engine owns no sockets and reads no clock (the model is quinn-proto): the shell feeds it
//! received packets, timer expiries and commands with the current [`Instant`], and drains
//! packets to send ([`Engine::poll_transmit`]), events for the data plane
//! ([`Engine::poll_event`]) and the next deadline ([`Engine::poll_timeout`]).
//!
//! ```text
//! let mut e = Engine::new(config, now)?;
//! e.handle_packet(now, from_nbma, bytes);   // GRE 0x2001 payload
//! e.handle_timeout(now);                    // once poll_timeout() has passed
//! while let Some(ev) = e.poll_event() { /* program the data plane */ }
//! while let Some(t) = e.poll_transmit() { /* send t.bytes to t.dst_nbma in GRE 0x2001 */ }
//! ```
//!
//! Drain events before transmits: a packet may go to a peer announced by a PeerUp of the same
//! batch (e.g. a Resolution Reply to the requester), and the shell may have to bring up the
//! path (IPsec SA) to it first. Events come in the order their effects must be applied
//! (PeerUp before the RouteAdd that uses it, RouteDel before PeerDown).
//!
//! Behaviour in brief:
//!
//! | what | when |
//! |---|---|
//! | registration to every NHS (parallel) | at start, then every holdtime/3; after NBMA change |
//! | registration retry (same request id) | 1, 2, 4, ... 64 s; NHS down after 3 timeouts, still probed |
//! | retry after a rejection (e.g. code 14) | 1, 2, 4, ... 64 s, new request id each time |
//! | resolution retry (same request id) | +1, +2, +4 s via another NHS if one is not down, then negative for `negative_holdtime` |
//! | shortcut refresh | at 2/3 of its holding time if used since the last refresh; idle ones expire |
//! | Traffic Indication | at most `redirect_limit.burst` per `interval` per (source, destination) |
//!
//! A hub forwards a Resolution Request for a client's address or prefix to that client (which
//! answers the requester directly and adds it as a peer, so both directions get the shortcut),
//! unless `answer_for_clients` is set; it forwards what it does not know to its own NHS (hub
//! hierarchy) or answers negatively. When a client's binding changes NBMA address or goes
//! away, the hub purges it at the requesters it told. A spoke purges its registrations at each
//! NHS and its binding at each shortcut peer on shutdown and NBMA change.
//!
//! Submodules: [`config`] (configuration and validation), `nhs` (server side: registrations,
//! resolution answers and forwarding, purge, redirects), `nhc` (client side: registration to
//! each NHS, resolution, shortcuts), `cache` (tables and timers), `ratelimit` (Traffic
//! Indication limiter), `stats` (counters).

pub mod config;

mod cache;
mod nhc;
mod nhs;
mod ratelimit;
mod stats;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::wire::{
    Authentication, Body, Cie, DecodeError, ErrorIndication, Extension, ExtensionBody, Header,
    Mandatory, Op, Packet,
};

pub use cache::{CacheEntry, CacheType};
pub use config::{Config, ConfigError, NhsConfig, Phase, RedirectLimit, Role};
pub use nhc::{NhsInfo, NhsState};
pub use stats::{Counters, DropReason, RxTx};

use cache::{Binding, Negative, Peers, Pending, PrefixMap, Shortcut, TimerKey, Timers, host};
use nhc::NhsEntry;
use ratelimit::RedirectLimiter;
use stats::Stats;

/// A packet to send: the GRE 0x2001 payload and the NBMA (underlay) destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub dst_nbma: IpAddr,
    pub bytes: Vec<u8>,
}

/// What the shell must apply to the data plane or report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Add or update a neighbour: overlay `proto` is reached at underlay `nbma`.
    PeerUp {
        proto: IpAddr,
        nbma: IpAddr,
    },
    /// Remove the neighbour `proto`.
    PeerDown {
        proto: IpAddr,
    },
    /// Add or replace the route `prefix` via overlay next hop `next_hop` (which has a
    /// neighbour entry from a PeerUp).
    RouteAdd {
        prefix: IpNet,
        next_hop: IpAddr,
    },
    RouteDel {
        prefix: IpNet,
    },
    /// The NHS answered a registration after being down or not yet heard from.
    NhsUp {
        proto: IpAddr,
    },
    /// The NHS missed 3 registration attempts in a row (it is still probed).
    NhsDown {
        proto: IpAddr,
    },
    /// A received packet was dropped (all drops are also counted). `detail` says why in words;
    /// the shell should log the first occurrence per reason.
    Dropped {
        reason: DropReason,
        from_nbma: IpAddr,
        detail: String,
    },
    /// The NHS refused (part of) our registration; `code` is the CIE code (14: the address is
    /// registered uniquely from another NBMA address: wait for it to expire, purge it, or use
    /// `registration_unique = false`). The engine retries with backoff.
    RegistrationRejected {
        nhs: IpAddr,
        prefix: IpNet,
        code: u8,
    },
    /// The NHS saw our registration come from `public_nbma`, not from our configured NBMA
    /// address: we are behind NAT.
    NatDetected {
        nhs: IpAddr,
        public_nbma: IpAddr,
    },
    /// An Error Indication arrived (`code`: RFC 2332 §5.2.7, e.g. 3 loop detected, 6
    /// unreachable, 11 authentication failure, 15 hop count exceeded).
    ErrorIndication {
        from_nbma: IpAddr,
        code: u16,
    },
}

/// State of the engine for `show` commands.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    pub role: Role,
    pub phase: Phase,
    pub tunnel_address: IpAddr,
    pub nbma_address: IpAddr,
    pub shut_down: bool,
    pub cache: Vec<CacheEntry>,
    pub nhs: Vec<NhsInfo>,
    pub counters: Counters,
}

/// Queued Dropped events are capped so that a flood of bad packets cannot grow the event
/// queue when the shell is slow to drain it; the counters still count every drop.
const MAX_QUEUED_DROPS: usize = 64;
/// Pending resolutions at most (each is bounded work; beyond this, resolve() is refused).
const MAX_PENDING: usize = 4096;
/// Leading bytes of a redirected packet carried in a Traffic Indication.
const TI_PAYLOAD_MAX: usize = 128;
/// Leading bytes of an offending packet carried in an Error Indication.
const ERROR_PAYLOAD_MAX: usize = 512;
/// Registration and Traffic Indication hop count (Cisco drops 0; FRR sends 1).
const HOP_COUNT_ONE_HOP: u8 = 1;

/// The NHRP engine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    cfg: Config,
    tunnel_net: IpNet,
    now: Instant,
    next_request_id: u32,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    queued_drops: usize,
    /// Set while one received packet is processed: at most one Error Indication per packet.
    error_sent: bool,
    timers: Timers,
    peers: Peers,
    stats: Stats,
    shut_down: bool,
    // server side
    bindings: HashMap<IpAddr, Binding>,
    /// Registered prefix → owning client's tunnel address.
    owners: PrefixMap<IpAddr>,
    limiter: RedirectLimiter,
    // client side
    nhs: Vec<NhsEntry>,
    /// Index of the NHS that `routes_via_nhs` currently point to.
    nhs_route: Option<usize>,
    shortcuts: PrefixMap<Shortcut>,
    pending: HashMap<IpAddr, Pending>,
    negative: PrefixMap<Negative>,
}

impl Engine {
    /// Validates `cfg` and starts the engine: a client emits PeerUp for each configured NHS
    /// and the `routes_via_nhs` routes, and sends its first registrations at once.
    pub fn new(cfg: Config, now: Instant) -> Result<Engine, ConfigError> {
        cfg.validate()?;
        let tunnel_net = cfg.tunnel_network()?;
        let limiter = RedirectLimiter::new(cfg.redirect_limit.clone(), now);
        let nhs = cfg.nhs.iter().cloned().map(NhsEntry::new).collect();
        let mut e = Engine {
            next_request_id: cfg.initial_request_id.max(1),
            cfg,
            tunnel_net,
            now,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            queued_drops: 0,
            error_sent: false,
            timers: Timers::default(),
            peers: Peers::default(),
            stats: Stats::default(),
            shut_down: false,
            bindings: HashMap::new(),
            owners: PrefixMap::default(),
            limiter,
            nhs,
            nhs_route: None,
            shortcuts: PrefixMap::default(),
            pending: HashMap::new(),
            negative: PrefixMap::default(),
        };
        e.start_client(now);
        Ok(e)
    }

    /// The configuration in force (with the current NBMA address).
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    // ----------------------------------------------------------------------------- inputs

    /// An NHRP packet (GRE protocol 0x2001 payload) arrived from underlay address `from_nbma`.
    pub fn handle_packet(&mut self, now: Instant, from_nbma: IpAddr, bytes: &[u8]) {
        self.advance(now);
        self.error_sent = false;
        if self.shut_down {
            self.drop_packet(DropReason::Unexpected, from_nbma, "engine is shut down");
            return;
        }
        let pkt = match Packet::decode(bytes) {
            Ok(p) => p,
            Err(DecodeError::BadChecksum { carried, computed }) => {
                let detail = format!("checksum {carried:#06x}, expected {computed:#06x}");
                self.drop_packet(DropReason::BadChecksum, from_nbma, &detail);
                return;
            }
            Err(e) => {
                self.drop_packet(DropReason::DecodeError, from_nbma, &e.to_string());
                return;
            }
        };
        self.stats.rx(pkt.op());
        if !self.family_ok(&pkt, from_nbma) {
            self.drop_packet(
                DropReason::Unexpected,
                from_nbma,
                "address family does not match the tunnel",
            );
            return;
        }
        // An Error Indication carries no extensions, so it cannot be authenticated.
        if let Body::Error(err) = &pkt.body {
            self.on_error_indication(from_nbma, err);
            return;
        }
        if let Err(detail) = self.check_auth(&pkt) {
            self.drop_packet(DropReason::BadAuth, from_nbma, detail);
            return;
        }
        match pkt.op() {
            Op::RegistrationRequest => self.on_registration_request(from_nbma, &pkt, bytes),
            Op::RegistrationReply => self.on_registration_reply(from_nbma, &pkt, bytes),
            Op::ResolutionRequest => self.on_resolution_request(from_nbma, pkt, bytes),
            Op::ResolutionReply => self.on_resolution_reply(from_nbma, pkt, bytes),
            Op::PurgeRequest => self.on_purge_request(from_nbma, &pkt, bytes),
            Op::PurgeReply => {} // counted; purges carry no state to complete
            Op::TrafficIndication => self.on_traffic_indication(from_nbma, &pkt),
            Op::ErrorIndication => {} // handled above
        }
    }

    /// Runs the timers due at `now` (call when [`Engine::poll_timeout`] has passed; calling
    /// early or late is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        while let Some((_, key)) = self.timers.pop_due(now) {
            match key {
                TimerKey::Nhs(i) => self.nhs_timer(now, i),
                TimerKey::Binding(client) => self.binding_timer(now, client),
                TimerKey::Shortcut(net) => self.shortcut_timer(now, net),
                TimerKey::Pending(dst) => self.pending_timer(now, dst),
                TimerKey::Negative(net) => {
                    self.negative.remove(&net);
                }
            }
        }
    }

    /// Operator command: forget shortcuts, pending and negative resolutions and the redirect
    /// limiter state. Registrations (ours at the NHSs, clients' at this NHS) are kept: they
    /// are refreshed by their owners and clearing them would cut spokes off until then.
    pub fn clear_cache(&mut self, now: Instant) {
        self.advance(now);
        for net in self.shortcuts.keys() {
            self.remove_shortcut(net);
        }
        for dst in self.pending.keys().copied().collect::<Vec<_>>() {
            if let Some(mut p) = self.pending.remove(&dst) {
                self.timers
                    .set(&mut p.deadline, TimerKey::Pending(dst), None);
            }
        }
        for net in self.negative.keys() {
            if let Some(mut n) = self.negative.remove(&net) {
                self.timers
                    .set(&mut n.deadline, TimerKey::Negative(net), None);
            }
        }
        self.limiter.clear();
    }

    /// Purges our registrations at each NHS (Purge Request with the N bit, request id of the
    /// registration, as Cisco expects) and our binding at each shortcut peer, withdraws every
    /// neighbour and route the engine installed, and stops. Later inputs are ignored.
    pub fn shutdown(&mut self, now: Instant) {
        self.advance(now);
        if self.shut_down {
            return;
        }
        let nbma = self.cfg.nbma_address;
        for i in 0..self.nhs.len() {
            self.send_purge_to_nhs(i, nbma, true);
        }
        self.purge_shortcut_peers(nbma);
        for net in self.shortcuts.keys() {
            self.remove_shortcut(net);
        }
        for client in self.bindings.keys().copied().collect::<Vec<_>>() {
            self.remove_binding(client, false);
        }
        if self.nhs_route.take().is_some() {
            for r in self.cfg.routes_via_nhs.clone() {
                self.events.push_back(Event::RouteDel { prefix: r });
            }
        }
        for n in self
            .nhs
            .iter()
            .map(|n| n.cfg.tunnel_address)
            .collect::<Vec<_>>()
        {
            self.peers.remove(n, cache::peer_ref::NHS, &mut self.events);
        }
        self.pending.clear();
        self.negative = PrefixMap::default();
        self.timers = Timers::default();
        for n in &mut self.nhs {
            n.deadline = None;
        }
        self.shut_down = true;
    }

    // ---------------------------------------------------------------------------- outputs

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        let ev = self.events.pop_front();
        if let Some(Event::Dropped { .. }) = ev {
            self.queued_drops = self.queued_drops.saturating_sub(1);
        }
        ev
    }

    /// The next time [`Engine::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.shut_down {
            return None;
        }
        self.timers.next()
    }

    /// The NBMA address of overlay neighbour `proto` (NHS, registered client or shortcut peer).
    pub fn lookup(&self, proto: IpAddr) -> Option<IpAddr> {
        self.peers.get(&proto)
    }

    /// Cache, NHS states and counters. Expiry times are relative to the latest time given to
    /// the engine.
    pub fn snapshot(&self) -> Snapshot {
        let now = self.now;
        let secs = |t: Instant| Some(t.saturating_duration_since(now).as_secs());
        let mut cache = Vec::new();
        cache.push(CacheEntry {
            kind: CacheType::Local,
            proto: self.cfg.tunnel_address,
            prefix: host(self.cfg.tunnel_address),
            nbma: Some(self.cfg.nbma_address),
            expires_in: None,
            used: false,
            unique: false,
        });
        for p in &self.cfg.local_prefixes {
            cache.push(CacheEntry {
                kind: CacheType::Local,
                proto: self.cfg.tunnel_address,
                prefix: *p,
                nbma: Some(self.cfg.nbma_address),
                expires_in: None,
                used: false,
                unique: false,
            });
        }
        for n in &self.nhs {
            cache.push(CacheEntry {
                kind: CacheType::Nhs,
                proto: n.cfg.tunnel_address,
                prefix: host(n.cfg.tunnel_address),
                nbma: Some(n.cfg.nbma_address),
                expires_in: None,
                used: false,
                unique: false,
            });
        }
        for (client, b) in &self.bindings {
            for p in &b.prefixes {
                cache.push(CacheEntry {
                    kind: CacheType::Dynamic,
                    proto: *client,
                    prefix: *p,
                    nbma: Some(b.nbma),
                    expires_in: secs(b.expires),
                    used: false,
                    unique: b.unique,
                });
            }
        }
        for (net, s) in self.shortcuts.iter() {
            cache.push(CacheEntry {
                kind: CacheType::Shortcut,
                proto: s.next_hop,
                prefix: *net,
                nbma: Some(s.nbma),
                expires_in: secs(s.expires),
                used: s.used,
                unique: false,
            });
        }
        for (dst, p) in &self.pending {
            cache.push(CacheEntry {
                kind: CacheType::Incomplete,
                proto: *dst,
                prefix: host(*dst),
                nbma: None,
                expires_in: p.deadline.and_then(secs),
                used: false,
                unique: false,
            });
        }
        for (net, n) in self.negative.iter() {
            cache.push(CacheEntry {
                kind: CacheType::Negative,
                proto: net.addr(),
                prefix: *net,
                nbma: None,
                expires_in: secs(n.expires),
                used: false,
                unique: false,
            });
        }
        Snapshot {
            role: self.cfg.role,
            phase: self.cfg.phase,
            tunnel_address: self.cfg.tunnel_address,
            nbma_address: self.cfg.nbma_address,
            shut_down: self.shut_down,
            cache,
            nhs: self.nhs.iter().map(|n| n.info(now)).collect(),
            counters: self.stats.snapshot(),
        }
    }

    /// Counters only (cheaper than a snapshot).
    pub fn counters(&self) -> Counters {
        self.stats.snapshot()
    }

    // ---------------------------------------------------------------------------- helpers

    fn advance(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
    }

    fn next_id(&mut self) -> u32 {
        let id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        id
    }

    fn host_len(&self) -> u8 {
        cache::host_len(self.cfg.tunnel_address)
    }

    fn is_nhs_address(&self, proto: IpAddr) -> bool {
        self.nhs.iter().any(|n| n.cfg.tunnel_address == proto)
    }

    /// Our own prefix (tunnel host or local prefix) that contains `addr`, longest first.
    fn own_prefix_for(&self, addr: IpAddr) -> Option<IpNet> {
        if addr == self.cfg.tunnel_address {
            return Some(host(addr));
        }
        self.cfg
            .local_prefixes
            .iter()
            .filter(|p| p.contains(&addr))
            .max_by_key(|p| p.prefix_len())
            .copied()
    }

    fn family_ok(&self, pkt: &Packet, from_nbma: IpAddr) -> bool {
        let nbma_v4 = self.cfg.nbma_address.is_ipv4();
        let proto_v4 = self.cfg.tunnel_address.is_ipv4();
        let afn_ok = pkt.header.afn
            == if nbma_v4 {
                crate::wire::AFN_IPV4
            } else {
                crate::wire::AFN_IPV6
            };
        let pro_ok = pkt.header.pro_type
            == if proto_v4 {
                crate::wire::PROTO_IPV4
            } else {
                crate::wire::PROTO_IPV6
            };
        afn_ok && pro_ok && from_nbma.is_ipv4() == nbma_v4
    }

    fn check_auth(&self, pkt: &Packet) -> Result<(), &'static str> {
        let Some(pw) = &self.cfg.auth else {
            return Ok(());
        };
        let got = pkt.extensions.iter().find_map(|e| match &e.body {
            ExtensionBody::Authentication(a) => Some(a),
            _ => None,
        });
        match got {
            None => Err("no authentication extension (nhrp_auth is set here)"),
            Some(Authentication::CiscoCleartext(p)) if ct_eq(p, pw) => Ok(()),
            Some(Authentication::CiscoCleartext(_)) => {
                Err("authentication password mismatch (check nhrp_auth on both ends)")
            }
            Some(Authentication::Other(_)) => {
                Err("authentication extension is not Cisco cleartext")
            }
        }
    }

    fn drop_packet(&mut self, reason: DropReason, from_nbma: IpAddr, detail: &str) {
        self.stats.drop(reason);
        if self.queued_drops < MAX_QUEUED_DROPS {
            self.queued_drops += 1;
            self.events.push_back(Event::Dropped {
                reason,
                from_nbma,
                detail: detail.to_owned(),
            });
        }
    }

    fn header(&self, op: Op, hop_count: u8) -> Header {
        Header {
            afn: if self.cfg.nbma_address.is_ipv4() {
                crate::wire::AFN_IPV4
            } else {
                crate::wire::AFN_IPV6
            },
            pro_type: if self.cfg.tunnel_address.is_ipv4() {
                crate::wire::PROTO_IPV4
            } else {
                crate::wire::PROTO_IPV6
            },
            pro_snap: [0; 5],
            hop_count: hop_count.max(1),
            version: 1,
            op,
        }
    }

    /// A CIE describing this node (transit records, responder address).
    fn own_cie(&self, prefix_len: u8) -> Cie {
        Cie {
            code: 0,
            prefix_len,
            unused: 0,
            mtu: self.cfg.mtu,
            holding_time: self.cfg.holdtime,
            preference: 0,
            client_nbma: Some(self.cfg.nbma_address),
            client_nbma_sub: Vec::new(),
            client_proto: Some(self.cfg.tunnel_address),
        }
    }

    /// Appends our authentication extension (when configured) and End.
    fn finish_extensions(&self, exts: &mut Vec<Extension>) {
        exts.retain(|e| {
            !matches!(
                e.body,
                ExtensionBody::End | ExtensionBody::Authentication(_)
            )
        });
        if let Some(pw) = &self.cfg.auth {
            exts.push(Extension::new(
                true,
                ExtensionBody::Authentication(Authentication::CiscoCleartext(pw.clone())),
            ));
        }
        exts.push(Extension::end());
    }

    /// Re-creates the authentication extension of a forwarded packet (regenerated per hop;
    /// kept as received when we have no password).
    fn regenerate_auth(&self, exts: &mut Vec<Extension>) {
        if self.cfg.auth.is_some() {
            self.finish_extensions(exts);
        } else if !exts.iter().any(|e| matches!(e.body, ExtensionBody::End)) {
            exts.push(Extension::end());
        }
    }

    fn send(&mut self, dst_nbma: IpAddr, pkt: &Packet) {
        match pkt.to_bytes() {
            Ok(bytes) => {
                self.stats.tx(pkt.op());
                self.transmits.push_back(Transmit { dst_nbma, bytes });
            }
            Err(_) => self.stats.encode_failures += 1,
        }
    }

    /// Sends an Error Indication about `offending` (raw bytes) to `to`, unless one was already
    /// sent for the packet being processed or the offending packet is itself an Error
    /// Indication (RFC 2332 §5.2.7).
    fn send_error(&mut self, to: IpAddr, code: u16, offending: &[u8], offending_pkt: &Packet) {
        if self.error_sent || offending_pkt.op() == Op::ErrorIndication {
            return;
        }
        self.error_sent = true;
        let dst_proto = offending_pkt.mandatory().and_then(|m| m.src_proto);
        let keep = offending.len().min(ERROR_PAYLOAD_MAX);
        let pkt = Packet {
            header: self.header(Op::ErrorIndication, self.cfg.hop_count),
            body: Body::Error(ErrorIndication {
                unused: 0,
                code,
                offset: 0,
                src_nbma: Some(self.cfg.nbma_address),
                src_nbma_sub: Vec::new(),
                src_proto: Some(self.cfg.tunnel_address),
                dst_proto,
                offending: offending.get(..keep).unwrap_or(offending).to_vec(),
            }),
            extensions: Vec::new(),
        };
        self.stats.errors_sent += 1;
        self.send(to, &pkt);
    }

    fn on_error_indication(&mut self, from_nbma: IpAddr, err: &ErrorIndication) {
        if err.src_proto == Some(self.cfg.tunnel_address)
            || err.src_nbma == Some(self.cfg.nbma_address)
        {
            self.drop_packet(
                DropReason::Unexpected,
                from_nbma,
                "Error Indication with our own source address",
            );
            return;
        }
        self.events.push_back(Event::ErrorIndication {
            from_nbma,
            code: err.code,
        });
        // Fail what the offending packet was about: the fixed header's op type (byte 17)
        // and the request id (bytes 24..28, after the two lengths and the flags).
        let op = err.offending.get(17).copied().and_then(Op::from_u8);
        let rid = err
            .offending
            .get(24..28)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes);
        if let (Some(op), Some(rid)) = (op, rid) {
            match op {
                Op::ResolutionRequest => self.fail_pending_by_id(rid),
                Op::RegistrationRequest => self.registration_error(rid),
                _ => {}
            }
        }
    }

    fn start_client(&mut self, now: Instant) {
        let statics: Vec<(IpAddr, IpAddr)> = self
            .nhs
            .iter()
            .map(|n| (n.cfg.tunnel_address, n.cfg.nbma_address))
            .collect();
        for (proto, nbma) in statics {
            self.peers
                .add(proto, nbma, cache::peer_ref::NHS, &mut self.events);
        }
        self.update_nhs_route();
        for i in 0..self.nhs.len() {
            self.start_registration(now, i);
        }
    }
}

/// Compares two passwords without an early exit on the first different byte.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// True when the packet carries a compulsory extension this engine does not understand.
fn unknown_compulsory(pkt: &Packet) -> bool {
    pkt.extensions
        .iter()
        .any(|e| e.compulsory && matches!(e.body, ExtensionBody::Unknown { .. }))
}

/// Does the transit record extension of type `ty` list `proto`?
fn transit_lists(pkt: &Packet, forward: bool, proto: IpAddr) -> bool {
    pkt.extensions.iter().any(|e| match &e.body {
        ExtensionBody::ForwardTransitNhs(c) if forward => {
            c.iter().any(|c| c.client_proto == Some(proto))
        }
        ExtensionBody::ReverseTransitNhs(c) if !forward => {
            c.iter().any(|c| c.client_proto == Some(proto))
        }
        _ => false,
    })
}

/// Appends `cie` to the transit record extension (creating it before End when absent).
fn append_transit(exts: &mut Vec<Extension>, forward: bool, cie: Cie) {
    for e in exts.iter_mut() {
        match &mut e.body {
            ExtensionBody::ForwardTransitNhs(c) if forward => {
                c.push(cie);
                return;
            }
            ExtensionBody::ReverseTransitNhs(c) if !forward => {
                c.push(cie);
                return;
            }
            _ => {}
        }
    }
    let body = if forward {
        ExtensionBody::ForwardTransitNhs(vec![cie])
    } else {
        ExtensionBody::ReverseTransitNhs(vec![cie])
    };
    let at = exts
        .iter()
        .position(|e| matches!(e.body, ExtensionBody::End))
        .unwrap_or(exts.len());
    exts.insert(at, Extension::new(true, body));
}

/// The NAT extension CIE for `proto`, if any (Cisco: the NBMA address as seen by an NHS).
fn nat_nbma_for(pkt: &Packet, proto: IpAddr) -> Option<IpAddr> {
    pkt.extensions.iter().find_map(|e| match &e.body {
        ExtensionBody::CiscoNatAddress(cies) => cies
            .iter()
            .find(|c| c.client_proto == Some(proto))
            .and_then(|c| c.client_nbma),
        _ => None,
    })
}

/// Extensions a reply must echo from its request: non-compulsory ones this engine does not
/// interpret (RFC 2332 §5.3).
fn echoed_extensions(pkt: &Packet) -> impl Iterator<Item = Extension> + '_ {
    pkt.extensions.iter().filter_map(|e| match &e.body {
        ExtensionBody::VendorPrivate { .. } => Some(e.clone()),
        ExtensionBody::Unknown { .. } if !e.compulsory => Some(e.clone()),
        _ => None,
    })
}

fn mandatory(
    flags: u16,
    request_id: u32,
    src_nbma: Option<IpAddr>,
    src_proto: Option<IpAddr>,
    dst_proto: Option<IpAddr>,
    cies: Vec<Cie>,
) -> Body {
    Body::Mandatory(Mandatory {
        flags,
        request_id,
        src_nbma,
        src_nbma_sub: Vec::new(),
        src_proto,
        dst_proto,
        cies,
        payload: Vec::new(),
    })
}

fn secs(d: u16) -> Duration {
    Duration::from_secs(u64::from(d))
}

#[cfg(test)]
mod tests {
    use super::ct_eq;

    #[test]
    fn password_compare() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret1"));
        assert!(ct_eq(b"", b""));
    }
}
