//! Client side (NHC, the spoke; also a hub towards upstream hubs): registration to each NHS,
//! resolution, shortcuts.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::cache::{
    Negative, Origin, Pending, Shortcut, TimerKey, host, host_len, peer_ref, prefix,
};
use super::config::{MIN_PREFIX_LEN_V4, MIN_PREFIX_LEN_V6, NhsConfig, Phase};
use super::{
    Cie, DropReason, Engine, Event, Extension, ExtensionBody, HOP_COUNT_ONE_HOP, MAX_PENDING, Op,
    Packet, mandatory, nat_nbma_for, secs, unknown_compulsory,
};
use crate::wire::{cie_code, error_code, flags};

/// Consecutive registration timeouts after which an NHS is declared down (as FRR).
const NHS_DOWN_AFTER: u32 = 3;
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(64);
/// Resolution attempts (sent at +0, +1, +3, +7 s; given up at +15 s).
const RESOLUTION_TRIES: u32 = 4;

/// Reachability of an NHS, as in Cisco's `show ip nhrp nhs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NhsState {
    /// Not heard from yet (or since a restart of registration).
    Probing,
    Up,
    /// Missed 3 registration attempts in a row; still probed with backoff.
    Down,
}

/// One row of [`super::Snapshot::nhs`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NhsInfo {
    pub proto: IpAddr,
    pub nbma: IpAddr,
    pub priority: u8,
    pub state: NhsState,
    /// Our registration is accepted (no CIE rejected in the last reply).
    pub registered: bool,
    /// Seconds since the last Registration Reply.
    pub last_reply_ago: Option<u64>,
    /// Registration timeouts, total.
    pub failures: u64,
    pub consecutive_timeouts: u32,
    pub request_id: u32,
    /// Our NBMA address as this NHS sees it, when different (NAT).
    pub nat_nbma: Option<IpAddr>,
    /// CIE code of the last rejection (e.g. 14), if the last reply rejected something.
    pub last_rejection: Option<u8>,
}

#[derive(Debug)]
pub(crate) struct NhsEntry {
    pub cfg: NhsConfig,
    pub state: NhsState,
    pub request_id: u32,
    /// A request is outstanding (the timer is a retry timer, not a refresh timer).
    pub awaiting: bool,
    pub registered: bool,
    pub timeouts: u32,
    pub failures: u64,
    pub backoff: Duration,
    /// Wait before the next attempt after a rejection or an Error Indication; doubles up to
    /// the cap, reset by an accepted registration.
    pub reject_backoff: Duration,
    pub last_reply: Option<Instant>,
    pub nat_nbma: Option<IpAddr>,
    pub last_rejection: Option<u8>,
    pub deadline: Option<Instant>,
}

impl NhsEntry {
    pub(crate) fn new(cfg: NhsConfig) -> NhsEntry {
        NhsEntry {
            cfg,
            state: NhsState::Probing,
            request_id: 0,
            awaiting: false,
            registered: false,
            timeouts: 0,
            failures: 0,
            backoff: RETRY_FIRST,
            reject_backoff: RETRY_FIRST,
            last_reply: None,
            nat_nbma: None,
            last_rejection: None,
            deadline: None,
        }
    }

    pub(crate) fn info(&self, now: Instant) -> NhsInfo {
        NhsInfo {
            proto: self.cfg.tunnel_address,
            nbma: self.cfg.nbma_address,
            priority: self.cfg.priority,
            state: self.state,
            registered: self.registered,
            last_reply_ago: self
                .last_reply
                .map(|t| now.saturating_duration_since(t).as_secs()),
            failures: self.failures,
            consecutive_timeouts: self.timeouts,
            request_id: self.request_id,
            nat_nbma: self.nat_nbma,
            last_rejection: self.last_rejection,
        }
    }
}

impl Engine {
    // ------------------------------------------------------------------- registration

    /// Starts a new registration (new request id) to NHS `i`.
    pub(super) fn start_registration(&mut self, now: Instant, i: usize) {
        let id = self.next_id();
        let Some(n) = self.nhs.get_mut(i) else { return };
        n.request_id = id;
        n.awaiting = true;
        n.backoff = RETRY_FIRST;
        self.send_registration(i);
        self.set_nhs_timer(i, Some(now + RETRY_FIRST));
    }

    fn set_nhs_timer(&mut self, i: usize, at: Option<Instant>) {
        if let Some(n) = self.nhs.get_mut(i) {
            self.timers.set(&mut n.deadline, TimerKey::Nhs(i), at);
        }
    }

    /// The CIEs we register: our tunnel address first (Cisco/FRR form: no addresses, prefix
    /// 0xFF when unique), then one per local prefix.
    fn registration_cies(&self, client_nbma: Option<IpAddr>) -> Vec<Cie> {
        let hl = self.host_len();
        let mut cies = Vec::with_capacity(1 + self.cfg.local_prefixes.len());
        cies.push(Cie {
            prefix_len: if self.cfg.registration_unique {
                0xFF
            } else {
                hl
            },
            mtu: self.cfg.mtu,
            holding_time: self.cfg.holdtime,
            client_nbma,
            ..Cie::default()
        });
        for p in &self.cfg.local_prefixes {
            cies.push(Cie {
                prefix_len: p.prefix_len(),
                mtu: self.cfg.mtu,
                holding_time: self.cfg.holdtime,
                client_nbma,
                client_proto: Some(p.network()),
                ..Cie::default()
            });
        }
        cies
    }

    fn send_registration(&mut self, i: usize) {
        let Some(n) = self.nhs.get(i) else { return };
        let (proto, nbma, id) = (n.cfg.tunnel_address, n.cfg.nbma_address, n.request_id);
        let hl = self.host_len();
        let mut f = flags::CISCO_NAT;
        if self.cfg.registration_unique {
            f |= flags::REG_U;
        }
        let mut exts = vec![
            Extension::new(true, ExtensionBody::ForwardTransitNhs(Vec::new())),
            Extension::new(true, ExtensionBody::ReverseTransitNhs(Vec::new())),
            Extension::new(true, ExtensionBody::ResponderAddress(None)),
            Extension::new(
                false,
                ExtensionBody::CiscoNatAddress(vec![Cie {
                    prefix_len: hl,
                    client_nbma: Some(nbma),
                    client_proto: Some(proto),
                    ..Cie::default()
                }]),
            ),
        ];
        self.finish_extensions(&mut exts);
        let pkt = Packet {
            header: self.header(Op::RegistrationRequest, HOP_COUNT_ONE_HOP),
            body: mandatory(
                f,
                id,
                Some(self.cfg.nbma_address),
                Some(self.cfg.tunnel_address),
                Some(proto),
                self.registration_cies(None),
            ),
            extensions: exts,
        };
        self.send(nbma, &pkt);
    }

    /// Purge Request for our registration at NHS `i` (request id of that registration, CIEs
    /// naming `old_nbma`, so that the NHS does not mistake it for our next registration).
    pub(super) fn send_purge_to_nhs(&mut self, i: usize, old_nbma: IpAddr, no_reply: bool) {
        let Some(n) = self.nhs.get(i) else { return };
        if !(n.registered || n.awaiting || n.last_reply.is_some()) {
            return;
        }
        let (proto, to, id) = (n.cfg.tunnel_address, n.cfg.nbma_address, n.request_id);
        let mut exts = Vec::new();
        self.finish_extensions(&mut exts);
        let pkt = Packet {
            header: self.header(Op::PurgeRequest, HOP_COUNT_ONE_HOP),
            body: mandatory(
                if no_reply { flags::PURGE_N } else { 0 },
                id,
                Some(self.cfg.nbma_address),
                Some(self.cfg.tunnel_address),
                Some(proto),
                self.registration_cies(Some(old_nbma)),
            ),
            extensions: exts,
        };
        self.send(to, &pkt);
        if let Some(n) = self.nhs.get_mut(i) {
            n.registered = false;
        }
    }

    pub(super) fn nhs_timer(&mut self, now: Instant, i: usize) {
        let Some(n) = self.nhs.get_mut(i) else { return };
        n.deadline = None;
        if !n.awaiting {
            // Refresh (holdtime/3) or retry after a rejection: a new registration.
            self.start_registration(now, i);
            return;
        }
        n.timeouts = n.timeouts.saturating_add(1);
        n.failures += 1;
        n.backoff = (n.backoff * 2).min(RETRY_CAP);
        let backoff = n.backoff;
        let went_down = n.timeouts >= NHS_DOWN_AFTER && n.state != NhsState::Down;
        if went_down {
            n.state = NhsState::Down;
            let proto = n.cfg.tunnel_address;
            self.events.push_back(Event::NhsDown { proto });
            self.update_nhs_route();
        }
        // Retries reuse the request id (RFC 2332; FRR PR #16788).
        self.send_registration(i);
        self.set_nhs_timer(i, Some(now + backoff));
    }

    pub(super) fn on_registration_reply(&mut self, from: IpAddr, pkt: &Packet, raw: &[u8]) {
        let Some(m) = pkt.mandatory() else { return };
        let Some(i) = self.nhs.iter().position(|n| {
            n.awaiting && n.request_id == m.request_id && Some(n.cfg.tunnel_address) == m.dst_proto
        }) else {
            self.drop_packet(
                DropReason::Unexpected,
                from,
                "Registration Reply for no outstanding request",
            );
            return;
        };
        if unknown_compulsory(pkt) {
            self.send_error(from, error_code::UNRECOGNIZED_EXTENSION, raw, pkt);
            return;
        }
        let now = self.now;
        let hl = self.host_len();
        let Some(nhs_proto) = self.nhs.get(i).map(|n| n.cfg.tunnel_address) else {
            return;
        };
        let me = self.cfg.tunnel_address;
        let mut rejected = None;
        for c in &m.cies {
            if c.code != cie_code::SUCCESS {
                let len = if c.prefix_len == 0xFF || c.prefix_len == 0 {
                    hl
                } else {
                    c.prefix_len
                };
                let net = prefix(c.client_proto.unwrap_or(me), len).unwrap_or(host(me));
                self.stats.registrations_rejected += 1;
                self.events.push_back(Event::RegistrationRejected {
                    nhs: nhs_proto,
                    prefix: net,
                    code: c.code,
                });
                rejected = Some(c.code);
            }
        }
        let nat = nat_nbma_for_second(pkt, me);
        let Some(n) = self.nhs.get_mut(i) else { return };
        n.awaiting = false;
        n.timeouts = 0;
        n.last_reply = Some(now);
        n.last_rejection = rejected;
        let came_up = n.state != NhsState::Up;
        n.state = NhsState::Up;
        let mut nat_event = None;
        if nat != n.nat_nbma {
            n.nat_nbma = nat;
            if let Some(p) = nat {
                nat_event = Some(Event::NatDetected {
                    nhs: nhs_proto,
                    public_nbma: p,
                });
            }
        }
        let next = if rejected.is_some() {
            n.registered = false;
            let wait = n.reject_backoff;
            n.reject_backoff = (n.reject_backoff * 2).min(RETRY_CAP);
            wait
        } else {
            n.registered = true;
            n.reject_backoff = RETRY_FIRST;
            secs(self.cfg.holdtime / 3).max(RETRY_FIRST)
        };
        if came_up {
            self.events.push_back(Event::NhsUp { proto: nhs_proto });
            self.update_nhs_route();
        }
        if let Some(ev) = nat_event {
            self.events.push_back(ev);
        }
        self.set_nhs_timer(i, Some(now + next));
    }

    /// An Error Indication about our Registration Request `rid`: retry with backoff.
    pub(super) fn registration_error(&mut self, rid: u32) {
        let now = self.now;
        let Some(i) = self
            .nhs
            .iter()
            .position(|n| n.awaiting && n.request_id == rid)
        else {
            return;
        };
        let Some(n) = self.nhs.get_mut(i) else { return };
        n.awaiting = false;
        n.registered = false;
        let wait = n.reject_backoff;
        n.reject_backoff = (n.reject_backoff * 2).min(RETRY_CAP);
        self.stats.registrations_rejected += 1;
        self.set_nhs_timer(i, Some(now + wait));
    }

    /// Preferred NHS: up first, then lower priority value, then configuration order; a down
    /// NHS only if nothing else is left.
    pub(super) fn best_nhs(&self) -> Option<usize> {
        self.best_nhs_avoiding(None)
    }

    fn best_nhs_avoiding(&self, avoid: Option<usize>) -> Option<usize> {
        self.nhs
            .iter()
            .enumerate()
            .min_by_key(|(i, n)| {
                let avoided = Some(*i) == avoid && n.state != NhsState::Down;
                let rank = match n.state {
                    NhsState::Up => 0,
                    NhsState::Probing => 1,
                    NhsState::Down => 2,
                };
                // An avoided NHS ranks just above the down ones.
                let rank = if avoided { 1 } else { rank };
                (rank, avoided, n.cfg.priority, *i)
            })
            .map(|(i, _)| i)
    }

    /// Points `routes_via_nhs` at the preferred NHS (RouteAdd replaces the next hop).
    pub(super) fn update_nhs_route(&mut self) {
        if self.shut_down {
            return;
        }
        let best = self.best_nhs();
        if best == self.nhs_route || best.is_none() {
            return;
        }
        self.nhs_route = best;
        let Some(n) = best.and_then(|i| self.nhs.get(i)) else {
            return;
        };
        let next_hop = n.cfg.tunnel_address;
        for r in &self.cfg.routes_via_nhs {
            self.events.push_back(Event::RouteAdd {
                prefix: *r,
                next_hop,
            });
        }
    }

    // --------------------------------------------------------------------- resolution

    /// Phase 2/3: resolve `dst` via the preferred NHS, unless we own it, a shortcut or a
    /// negative entry covers it, or a resolution is already pending.
    pub fn resolve(&mut self, now: Instant, dst: IpAddr) {
        self.advance(now);
        if self.shut_down || self.cfg.phase < Phase::Two || self.nhs.is_empty() {
            return;
        }
        if dst.is_ipv4() != self.cfg.tunnel_address.is_ipv4()
            || dst.is_unspecified()
            || dst.is_multicast()
            || self.own_prefix_for(dst).is_some()
            || self.is_nhs_address(dst)
            || self.pending.contains_key(&dst)
            || self.owners.lookup(dst).is_some()
        {
            return;
        }
        if self
            .shortcuts
            .lookup(dst)
            .is_some_and(|(_, s)| s.expires > now)
            || self
                .negative
                .lookup(dst)
                .is_some_and(|(_, n)| n.expires > now)
        {
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            return;
        }
        self.start_resolution(now, dst, None);
    }

    fn start_resolution(&mut self, now: Instant, dst: IpAddr, refresh_of: Option<IpNet>) {
        if self.pending.contains_key(&dst) {
            return;
        }
        let id = self.next_id();
        let via = self.send_resolution_request(dst, id, None);
        let mut p = Pending {
            request_id: id,
            tries: 1,
            via,
            refresh_of,
            deadline: None,
        };
        self.timers.set(
            &mut p.deadline,
            TimerKey::Pending(dst),
            Some(now + RETRY_FIRST),
        );
        self.pending.insert(dst, p);
    }

    /// Sends a Resolution Request for `dst` to the preferred NHS (avoiding `avoid` when
    /// another NHS is not down); returns its index.
    fn send_resolution_request(
        &mut self,
        dst: IpAddr,
        id: u32,
        avoid: Option<usize>,
    ) -> Option<usize> {
        let i = self.best_nhs_avoiding(avoid)?;
        let to = self.nhs.get(i)?.cfg.nbma_address;
        let hl = self.host_len();
        let nat = self.nhs.get(i).and_then(|n| n.nat_nbma);
        let nat_cies = nat
            .map(|n| {
                vec![Cie {
                    prefix_len: hl,
                    client_nbma: Some(n),
                    client_proto: Some(self.cfg.tunnel_address),
                    ..Cie::default()
                }]
            })
            .unwrap_or_default();
        let mut exts = vec![
            Extension::new(true, ExtensionBody::ForwardTransitNhs(Vec::new())),
            Extension::new(true, ExtensionBody::ReverseTransitNhs(Vec::new())),
            Extension::new(true, ExtensionBody::ResponderAddress(None)),
            Extension::new(false, ExtensionBody::CiscoNatAddress(nat_cies)),
        ];
        self.finish_extensions(&mut exts);
        // The CIE tells the responder how long it may keep our binding.
        let cie = Cie {
            prefix_len: hl,
            mtu: self.cfg.mtu,
            holding_time: self.cfg.holdtime,
            ..Cie::default()
        };
        let pkt = Packet {
            header: self.header(Op::ResolutionRequest, self.cfg.hop_count),
            body: mandatory(
                flags::RES_Q | flags::RES_A | flags::RES_S | flags::CISCO_NAT,
                id,
                Some(self.cfg.nbma_address),
                Some(self.cfg.tunnel_address),
                Some(dst),
                vec![cie],
            ),
            extensions: exts,
        };
        self.send(to, &pkt);
        Some(i)
    }

    pub(super) fn pending_timer(&mut self, now: Instant, dst: IpAddr) {
        let Some(p) = self.pending.get_mut(&dst) else {
            return;
        };
        p.deadline = None;
        if p.tries >= RESOLUTION_TRIES {
            self.fail_pending(dst);
            return;
        }
        p.tries += 1;
        let wait = RETRY_FIRST * (1u32 << (p.tries - 1).min(6));
        let id = p.request_id;
        let last = p.via;
        // The NHS that did not answer may be dead: probe it now with a registration rather
        // than at the next refresh, so that it is declared down within seconds.
        if let Some(i) = last
            && self.nhs.get(i).is_some_and(|n| !n.awaiting)
        {
            self.start_registration(now, i);
        }
        // Same request id; another NHS if there is one that is not down.
        let via = self.send_resolution_request(dst, id, last);
        if let Some(p) = self.pending.get_mut(&dst) {
            p.via = via;
            self.timers
                .set(&mut p.deadline, TimerKey::Pending(dst), Some(now + wait));
        }
    }

    pub(super) fn fail_pending_by_id(&mut self, rid: u32) {
        if let Some(dst) = self
            .pending
            .iter()
            .find(|(_, p)| p.request_id == rid)
            .map(|(d, _)| *d)
        {
            self.fail_pending(dst);
        }
    }

    /// Gives up a resolution: a negative entry suppresses new attempts for a while; a
    /// shortcut being refreshed is left to expire.
    fn fail_pending(&mut self, dst: IpAddr) {
        let Some(mut p) = self.pending.remove(&dst) else {
            return;
        };
        self.timers
            .set(&mut p.deadline, TimerKey::Pending(dst), None);
        self.stats.resolutions_failed += 1;
        if p.refresh_of.is_none() {
            let hold = self.cfg.negative_holdtime;
            self.add_negative(host(dst), hold);
        }
    }

    fn add_negative(&mut self, net: IpNet, hold: Duration) {
        let expires = self.now + hold;
        let mut n = self.negative.remove(&net).unwrap_or(Negative {
            expires,
            deadline: None,
        });
        n.expires = expires;
        self.timers
            .set(&mut n.deadline, TimerKey::Negative(net), Some(expires));
        self.negative.insert(net, n);
    }

    /// Resolution Reply: ours (install the shortcut) or in transit (forward it).
    pub(super) fn on_resolution_reply(&mut self, from: IpAddr, pkt: Packet, raw: &[u8]) {
        let Some(m) = pkt.mandatory() else { return };
        if m.src_proto != Some(self.cfg.tunnel_address) {
            self.forward_reply(from, pkt, raw);
            return;
        }
        let Some(dst) = m.dst_proto else { return };
        let matches = self
            .pending
            .get(&dst)
            .is_some_and(|p| p.request_id == m.request_id);
        if !matches {
            self.drop_packet(
                DropReason::Unexpected,
                from,
                "Resolution Reply for no pending request",
            );
            return;
        }
        if unknown_compulsory(&pkt) {
            self.send_error(from, error_code::UNRECOGNIZED_EXTENSION, raw, &pkt);
            return;
        }
        let Some(cie) = m.cies.first() else {
            self.fail_pending(dst);
            return;
        };
        if cie.code != cie_code::SUCCESS {
            let refresh = self.pending.get(&dst).and_then(|p| p.refresh_of);
            if let Some(mut p) = self.pending.remove(&dst) {
                self.timers
                    .set(&mut p.deadline, TimerKey::Pending(dst), None);
            }
            self.stats.resolutions_failed += 1;
            if refresh.is_none() {
                let hold = if cie.holding_time == 0 {
                    self.cfg.negative_holdtime
                } else {
                    secs(cie.holding_time).min(self.cfg.negative_holdtime)
                };
                self.add_negative(host(dst), hold);
            }
            return;
        }
        let responder = pkt.extensions.iter().find_map(|e| match &e.body {
            ExtensionBody::ResponderAddress(Some(c)) => Some(c.clone()),
            _ => None,
        });
        let Some(next_hop) = cie
            .client_proto
            .or(responder.as_ref().and_then(|r| r.client_proto))
        else {
            self.fail_pending(dst);
            return;
        };
        let claimed = cie
            .client_nbma
            .or(responder.as_ref().and_then(|r| r.client_nbma));
        // NAT extension first, then the observed sender when it is not an NHS relaying the
        // answer, then the claimed address.
        let nbma = nat_nbma_for(&pkt, next_hop)
            .or_else(|| {
                let from_nhs = self.nhs.iter().any(|n| n.cfg.nbma_address == from);
                (!from_nhs && claimed != Some(from)).then_some(from)
            })
            .or(claimed);
        let valid = self.tunnel_net.contains(&next_hop)
            && next_hop != self.cfg.tunnel_address
            && nbma.is_some_and(|n| n.is_ipv4() == self.cfg.nbma_address.is_ipv4());
        let Some(nbma) = nbma.filter(|_| valid) else {
            self.drop_packet(
                DropReason::Unexpected,
                from,
                "Resolution Reply with an unusable next hop",
            );
            self.fail_pending(dst);
            return;
        };
        let hl = host_len(dst);
        let min = if dst.is_ipv4() {
            MIN_PREFIX_LEN_V4
        } else {
            MIN_PREFIX_LEN_V6
        };
        // A prefix broader than /8 (or a malformed length) is narrowed to the host: never a
        // default-ish route from a reply.
        let len = if cie.prefix_len == 0xFF || cie.prefix_len > hl || cie.prefix_len < min {
            hl
        } else {
            cie.prefix_len
        };
        let net = prefix(dst, len).unwrap_or(host(dst));
        let ht = if cie.holding_time == 0 {
            self.cfg.holdtime
        } else {
            cie.holding_time
        };
        if let Some(mut p) = self.pending.remove(&dst) {
            self.timers
                .set(&mut p.deadline, TimerKey::Pending(dst), None);
            // A refresh that comes back narrower or wider replaces the old prefix.
            if let Some(old) = p.refresh_of.filter(|o| *o != net) {
                self.remove_shortcut(old);
            }
        }
        if let Some(mut n) = self.negative.remove(&host(dst)) {
            self.timers
                .set(&mut n.deadline, TimerKey::Negative(host(dst)), None);
        }
        self.install_shortcut(net, next_hop, nbma, ht, Origin::Resolved, dst);
    }

    /// Installs or refreshes a shortcut: PeerUp for the next hop and RouteAdd for the prefix
    /// when new or changed.
    pub(super) fn install_shortcut(
        &mut self,
        net: IpNet,
        next_hop: IpAddr,
        nbma: IpAddr,
        holding_time: u16,
        origin: Origin,
        target: IpAddr,
    ) {
        let now = self.now;
        let ht = secs(holding_time.max(1));
        let expires = now + ht;
        let refresh_at = now + ht * 2 / 3;
        if let Some(mut s) = self.shortcuts.remove(&net) {
            // New neighbour and route first, old neighbour last: the route never points at a
            // removed neighbour.
            if s.next_hop != next_hop {
                self.peers
                    .add(next_hop, nbma, peer_ref::SHORTCUT, &mut self.events);
                self.events.push_back(Event::RouteAdd {
                    prefix: net,
                    next_hop,
                });
                self.peers
                    .remove(s.next_hop, peer_ref::SHORTCUT, &mut self.events);
            } else if s.nbma != nbma {
                self.peers.set_nbma(next_hop, nbma, &mut self.events);
            }
            s.next_hop = next_hop;
            s.nbma = nbma;
            match origin {
                Origin::Resolved => {
                    s.origin = Origin::Resolved;
                    s.expires = expires;
                    s.refresh_at = refresh_at;
                    s.refresh_sent = false;
                    s.used = false;
                    s.target = target;
                    s.holding_time = holding_time;
                }
                Origin::Answered => {
                    s.expires = s.expires.max(expires);
                    if s.origin == Origin::Answered {
                        s.refresh_at = s.expires;
                    }
                }
            }
            let at = if s.origin == Origin::Resolved && !s.refresh_sent {
                s.refresh_at
            } else {
                s.expires
            };
            self.timers
                .set(&mut s.deadline, TimerKey::Shortcut(net), Some(at));
            self.shortcuts.insert(net, s);
            return;
        }
        self.peers
            .add(next_hop, nbma, peer_ref::SHORTCUT, &mut self.events);
        self.events.push_back(Event::RouteAdd {
            prefix: net,
            next_hop,
        });
        self.stats.shortcuts_installed += 1;
        let mut s = Shortcut {
            next_hop,
            nbma,
            origin,
            holding_time,
            expires,
            refresh_at: if origin == Origin::Resolved {
                refresh_at
            } else {
                expires
            },
            refresh_sent: false,
            used: false,
            target,
            deadline: None,
        };
        let at = s.refresh_at;
        self.timers
            .set(&mut s.deadline, TimerKey::Shortcut(net), Some(at));
        self.shortcuts.insert(net, s);
    }

    pub(super) fn remove_shortcut(&mut self, net: IpNet) {
        let Some(mut s) = self.shortcuts.remove(&net) else {
            return;
        };
        self.timers
            .set(&mut s.deadline, TimerKey::Shortcut(net), None);
        self.events.push_back(Event::RouteDel { prefix: net });
        self.peers
            .remove(s.next_hop, peer_ref::SHORTCUT, &mut self.events);
    }

    pub(super) fn remove_shortcuts_via(&mut self, next_hop: IpAddr) {
        let nets: Vec<IpNet> = self
            .shortcuts
            .iter()
            .filter(|(_, s)| s.next_hop == next_hop)
            .map(|(n, _)| *n)
            .collect();
        for n in nets {
            self.remove_shortcut(n);
        }
    }

    pub(super) fn shortcut_timer(&mut self, now: Instant, net: IpNet) {
        let Some(s) = self.shortcuts.get_mut(&net) else {
            return;
        };
        s.deadline = None;
        if s.expires <= now {
            self.remove_shortcut(net);
            return;
        }
        let mut refresh = None;
        // Unused at refresh time: left to expire unless traffic() sees it used before then.
        if s.origin == Origin::Resolved && !s.refresh_sent && now >= s.refresh_at && s.used {
            s.refresh_sent = true;
            refresh = Some(s.target);
        }
        let at = s.expires;
        let mut slot = None;
        self.timers
            .set(&mut slot, TimerKey::Shortcut(net), Some(at));
        if let Some(s) = self.shortcuts.get_mut(&net) {
            s.deadline = slot;
        }
        if let Some(t) = refresh {
            self.start_resolution(now, t, Some(net));
        }
    }

    /// A shortcut covering `dst` carries traffic: keep it alive (refreshed at 2/3 of its
    /// holding time while used; idle ones expire).
    pub fn traffic(&mut self, now: Instant, dst: IpAddr) {
        self.advance(now);
        if self.shut_down {
            return;
        }
        let Some((net, _)) = self.shortcuts.lookup(dst) else {
            return;
        };
        let Some(s) = self.shortcuts.get_mut(&net) else {
            return;
        };
        s.used = true;
        if s.origin == Origin::Resolved && !s.refresh_sent && now >= s.refresh_at && s.expires > now
        {
            s.refresh_sent = true;
            let t = s.target;
            self.start_resolution(now, t, Some(net));
        }
    }

    /// Phase 3: a Traffic Indication tells us traffic to the destination of the enclosed
    /// packet went via the hub: resolve that destination.
    pub(super) fn on_traffic_indication(&mut self, from: IpAddr, pkt: &Packet) {
        if self.cfg.phase < Phase::Three || self.nhs.is_empty() {
            self.drop_packet(
                DropReason::Unexpected,
                from,
                "Traffic Indication while not in phase 3",
            );
            return;
        }
        let Some(m) = pkt.mandatory() else { return };
        // Only our NHSs redirect us: a TI from elsewhere could make us resolve at will.
        let from_nhs = self
            .nhs
            .iter()
            .any(|n| n.cfg.nbma_address == from || Some(n.cfg.tunnel_address) == m.src_proto);
        if !from_nhs {
            self.drop_packet(
                DropReason::Unexpected,
                from,
                "Traffic Indication not from one of our NHSs",
            );
            return;
        }
        let Some(dst) = packet_destination(&m.payload) else {
            self.drop_packet(
                DropReason::DecodeError,
                from,
                "Traffic Indication without an IP header",
            );
            return;
        };
        let now = self.now;
        self.resolve(now, dst);
    }

    /// Our NBMA address changed: purge the old registrations, drop shortcuts (peers hold the
    /// old address), register again from the new address.
    pub fn set_local_nbma(&mut self, now: Instant, nbma: IpAddr) {
        self.advance(now);
        if self.shut_down
            || nbma == self.cfg.nbma_address
            || nbma.is_ipv4() != self.cfg.nbma_address.is_ipv4()
        {
            return;
        }
        let old = self.cfg.nbma_address;
        self.cfg.nbma_address = nbma;
        for i in 0..self.nhs.len() {
            self.send_purge_to_nhs(i, old, false);
            if let Some(n) = self.nhs.get_mut(i) {
                n.nat_nbma = None;
            }
        }
        self.purge_shortcut_peers(old);
        for net in self.shortcuts.keys() {
            self.remove_shortcut(net);
        }
        for i in 0..self.nhs.len() {
            self.start_registration(now, i);
        }
    }

    /// Tells every shortcut peer (not the NHSs, which get their own purge) to forget us:
    /// Purge Request with the N bit for our tunnel address and prefixes at `old_nbma`.
    /// Without it they would keep sending straight to an address we no longer use until
    /// their entry expires.
    pub(super) fn purge_shortcut_peers(&mut self, old_nbma: IpAddr) {
        let mut peers: Vec<(IpAddr, IpAddr)> = self
            .shortcuts
            .iter()
            .map(|(_, s)| (s.next_hop, s.nbma))
            .filter(|(p, _)| !self.is_nhs_address(*p) && !self.bindings.contains_key(p))
            .collect();
        peers.sort();
        peers.dedup_by_key(|(p, _)| *p);
        if peers.is_empty() {
            return;
        }
        let hl = self.host_len();
        let mut cies = self.registration_cies(Some(old_nbma));
        if let Some(first) = cies.first_mut() {
            // explicit host entry: the receiver drops every shortcut through us
            first.prefix_len = hl;
            first.client_proto = Some(self.cfg.tunnel_address);
        }
        for (proto, to) in peers {
            let id = self.next_id();
            let mut exts = Vec::new();
            self.finish_extensions(&mut exts);
            let pkt = Packet {
                header: self.header(Op::PurgeRequest, HOP_COUNT_ONE_HOP),
                body: mandatory(
                    flags::PURGE_N,
                    id,
                    Some(self.cfg.nbma_address),
                    Some(self.cfg.tunnel_address),
                    Some(proto),
                    cies.clone(),
                ),
                extensions: exts,
            };
            self.send(to, &pkt);
        }
    }
}

/// The second NAT extension CIE for `me`: our NBMA address as the NHS observed it.
fn nat_nbma_for_second(pkt: &Packet, me: IpAddr) -> Option<IpAddr> {
    pkt.extensions.iter().find_map(|e| match &e.body {
        ExtensionBody::CiscoNatAddress(cies) => cies
            .iter()
            .skip(1)
            .find(|c| c.client_proto == Some(me))
            .and_then(|c| c.client_nbma),
        _ => None,
    })
}

/// Destination address of the IPv4 or IPv6 packet whose leading bytes are `head`.
fn packet_destination(head: &[u8]) -> Option<IpAddr> {
    match head.first()? >> 4 {
        4 => {
            let b: [u8; 4] = head.get(16..20)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 => {
            let b: [u8; 16] = head.get(24..40)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::packet_destination;

    #[test]
    fn destination_of_redirected_packets() {
        let mut v4 = vec![0x45u8; 20];
        v4[16..20].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(packet_destination(&v4), Some("10.1.2.3".parse().unwrap()));
        assert_eq!(packet_destination(&v4[..19]), None, "truncated");
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[24..40].copy_from_slice(&"fd00::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
        assert_eq!(packet_destination(&v6), Some("fd00::7".parse().unwrap()));
        assert_eq!(packet_destination(&[]), None);
        assert_eq!(packet_destination(&[0x50; 40]), None, "not IP");
    }
}
