//! Server side (NHS, the hub): registrations, resolution answers and forwarding, purges,
//! Traffic Indications for hairpinned traffic.

use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;

use super::cache::{Binding, MAX_INFORMED, TimerKey, host, peer_ref, prefix};
use super::config::{MIN_PREFIX_LEN_V4, MIN_PREFIX_LEN_V6, Phase, Role};
use super::{
    Body, Cie, DropReason, Engine, Event, Extension, ExtensionBody, HOP_COUNT_ONE_HOP, Op, Packet,
    TI_PAYLOAD_MAX, append_transit, echoed_extensions, mandatory, nat_nbma_for, secs,
    transit_lists, unknown_compulsory,
};
use crate::wire::{cie_code, error_code, flags};

/// Registration CIEs accepted per client (tunnel address plus prefixes); more get code 5.
const MAX_CIES_PER_CLIENT: usize = 64;

/// What a registration CIE asks for, after validation.
struct Requested {
    net: Option<IpNet>,
    code: u8,
}

impl Engine {
    fn min_prefix_len(&self) -> u8 {
        if self.cfg.tunnel_address.is_ipv4() {
            MIN_PREFIX_LEN_V4
        } else {
            MIN_PREFIX_LEN_V6
        }
    }

    /// Registration Request (RFC 2332 §5.2.3) at the NHS.
    pub(super) fn on_registration_request(&mut self, from: IpAddr, pkt: &Packet, raw: &[u8]) {
        if self.cfg.role != Role::Hub {
            self.drop_packet(
                DropReason::Unexpected,
                from,
                "Registration Request at a spoke",
            );
            return;
        }
        let Some(m) = pkt.mandatory() else { return };
        let Some(client) = m.src_proto else {
            self.drop_packet(
                DropReason::Unexpected,
                from,
                "Registration Request without source protocol address",
            );
            return;
        };
        if unknown_compulsory(pkt) {
            self.send_error(from, error_code::UNRECOGNIZED_EXTENSION, raw, pkt);
            return;
        }
        let unique = m.flags & flags::REG_U != 0;
        let now = self.now;
        let hl = self.host_len();
        let client_ok = self.tunnel_net.contains(&client)
            && client != self.cfg.tunnel_address
            && client.is_ipv4() == self.cfg.tunnel_address.is_ipv4();

        // The tunnel address is bound first; the other CIEs are the client's prefixes.
        let existing = self.bindings.get(&client);
        let host_conflict = existing.is_some_and(|b| b.nbma != from && (unique || b.unique));
        let mut holding_time = self.cfg.holdtime;
        let mut requested: Vec<Requested> = Vec::with_capacity(m.cies.len());
        for (k, cie) in m.cies.iter().enumerate() {
            if k >= MAX_CIES_PER_CLIENT {
                // Bounded state per client, whatever fits in a packet.
                requested.push(Requested {
                    net: None,
                    code: cie_code::INSUFFICIENT_RESOURCES,
                });
                continue;
            }
            let addr = cie.client_proto.unwrap_or(client);
            let len = if cie.prefix_len == 0xFF || cie.prefix_len == 0 {
                hl
            } else {
                cie.prefix_len
            };
            let net = if addr.is_ipv4() == client.is_ipv4() && len <= hl {
                prefix(addr, len)
            } else {
                None
            };
            let code = match net {
                _ if !client_ok => cie_code::ADMIN_PROHIBITED,
                None => cie_code::ADMIN_PROHIBITED,
                Some(n) if n == host(client) => {
                    if cie.holding_time != 0 {
                        holding_time = cie.holding_time;
                    }
                    if host_conflict {
                        cie_code::UNIQUE_ALREADY_REGISTERED
                    } else {
                        cie_code::SUCCESS
                    }
                }
                Some(_) if host_conflict => cie_code::UNIQUE_ALREADY_REGISTERED,
                Some(n)
                    if n.prefix_len() < self.min_prefix_len()
                        || n.contains(&self.cfg.tunnel_address)
                        || self.own_prefix_for(n.addr()).is_some() =>
                {
                    cie_code::ADMIN_PROHIBITED
                }
                Some(n) => match self.owners.get(&n) {
                    Some(owner) if *owner != client => {
                        let owner_unique = self.bindings.get(owner).is_some_and(|b| b.unique);
                        if unique || owner_unique {
                            cie_code::UNIQUE_ALREADY_REGISTERED
                        } else {
                            cie_code::SUCCESS
                        }
                    }
                    _ => cie_code::SUCCESS,
                },
            };
            requested.push(Requested { net, code });
        }

        if client_ok && !host_conflict {
            let mut nets: Vec<IpNet> = vec![host(client)];
            for r in &requested {
                if let (Some(n), cie_code::SUCCESS) = (r.net, r.code)
                    && !nets.contains(&n)
                {
                    nets.push(n);
                }
            }
            self.install_binding(
                now,
                client,
                from,
                m.src_nbma,
                unique,
                m.request_id,
                nets,
                holding_time,
            );
        }

        // Registration Reply: the request's CIEs with their codes.
        let cies: Vec<Cie> = m
            .cies
            .iter()
            .zip(&requested)
            .map(|(c, r)| Cie {
                code: r.code,
                ..c.clone()
            })
            .collect();
        let mut exts = Vec::new();
        for e in &pkt.extensions {
            match &e.body {
                ExtensionBody::ResponderAddress(_)
                | ExtensionBody::Authentication(_)
                | ExtensionBody::End => {}
                ExtensionBody::CiscoNatAddress(_) => {}
                ExtensionBody::Unknown { .. } if e.compulsory => {}
                _ => exts.push(e.clone()),
            }
        }
        exts.push(Extension::new(
            true,
            ExtensionBody::ResponderAddress(Some(self.own_cie(hl))),
        ));
        if !exts
            .iter()
            .any(|e| matches!(e.body, ExtensionBody::ReverseTransitNhs(_)))
        {
            exts.push(Extension::new(
                true,
                ExtensionBody::ReverseTransitNhs(Vec::new()),
            ));
        }
        // Cisco NAT convention: echo the client's CIE, then add (observed NBMA, client) when
        // the registration came from another address than the one it claims.
        let mut nat: Vec<Cie> = pkt
            .extensions
            .iter()
            .find_map(|e| match &e.body {
                ExtensionBody::CiscoNatAddress(c) => Some(c.clone()),
                _ => None,
            })
            .unwrap_or_default();
        let natted = m.src_nbma.is_some_and(|claimed| claimed != from);
        if natted {
            if nat.is_empty() {
                nat.push(self.own_cie(hl));
            }
            nat.push(Cie {
                prefix_len: hl,
                holding_time,
                client_nbma: Some(from),
                client_proto: Some(client),
                ..Cie::default()
            });
        }
        if natted
            || pkt
                .extensions
                .iter()
                .any(|e| matches!(e.body, ExtensionBody::CiscoNatAddress(_)))
        {
            exts.push(Extension::new(false, ExtensionBody::CiscoNatAddress(nat)));
        }
        self.finish_extensions(&mut exts);
        let reply = Packet {
            header: self.header(Op::RegistrationReply, self.cfg.hop_count),
            body: mandatory(
                m.flags,
                m.request_id,
                m.src_nbma,
                m.src_proto,
                // FRR and Cisco learn the NHS's protocol address from this field (a spoke with
                // a dynamic NHS registers to itself and would otherwise learn its own address).
                Some(self.cfg.tunnel_address),
                cies,
            ),
            extensions: exts,
        };
        self.send(from, &reply);
    }

    #[allow(clippy::too_many_arguments)]
    fn install_binding(
        &mut self,
        now: Instant,
        client: IpAddr,
        nbma: IpAddr,
        claimed: Option<IpAddr>,
        unique: bool,
        request_id: u32,
        nets: Vec<IpNet>,
        holding_time: u16,
    ) {
        let expires = now + secs(holding_time);
        let (old_nets, old_nbma, informed, mut deadline) = match self.bindings.remove(&client) {
            Some(b) => (b.prefixes, Some(b.nbma), b.informed, b.deadline),
            None => (Vec::new(), None, Vec::new(), None),
        };
        // Take over prefixes registered by another client (allowed by the caller's check).
        for n in &nets {
            if let Some(owner) = self.owners.get(n).copied()
                && owner != client
                && let Some(ob) = self.bindings.get_mut(&owner)
            {
                ob.prefixes.retain(|p| p != n);
            }
        }
        for n in &old_nets {
            if !nets.contains(n) {
                self.owners.remove(n);
                self.events.push_back(Event::RouteDel { prefix: *n });
            }
        }
        self.peers
            .add(client, nbma, peer_ref::BINDING, &mut self.events);
        for n in &nets {
            let prev = self.owners.insert(*n, client);
            if prev != Some(client) {
                self.events.push_back(Event::RouteAdd {
                    prefix: *n,
                    next_hop: client,
                });
            }
        }
        let mut informed = informed;
        if old_nbma.is_some_and(|o| o != nbma) {
            // Requesters hold shortcuts to the old NBMA address: tell them.
            self.purge_informed(client, &old_nets, old_nbma, &informed);
            informed.clear();
        }
        self.timers
            .set(&mut deadline, TimerKey::Binding(client), Some(expires));
        self.bindings.insert(
            client,
            Binding {
                nbma,
                claimed_nbma: claimed,
                unique,
                request_id,
                prefixes: nets,
                expires,
                deadline,
                informed,
            },
        );
    }

    pub(super) fn binding_timer(&mut self, now: Instant, client: IpAddr) {
        let Some(b) = self.bindings.get_mut(&client) else {
            return;
        };
        b.deadline = None;
        if b.expires <= now {
            self.remove_binding(client, true);
        } else {
            let at = b.expires;
            let mut slot = None;
            self.timers
                .set(&mut slot, TimerKey::Binding(client), Some(at));
            if let Some(b) = self.bindings.get_mut(&client) {
                b.deadline = slot;
            }
        }
    }

    /// Removes a client's registration: RouteDel for each prefix, PeerDown, and (when
    /// `notify`) purges at the requesters that were told about it.
    pub(super) fn remove_binding(&mut self, client: IpAddr, notify: bool) {
        let Some(mut b) = self.bindings.remove(&client) else {
            return;
        };
        self.timers
            .set(&mut b.deadline, TimerKey::Binding(client), None);
        for n in &b.prefixes {
            if self.owners.get(n) == Some(&client) {
                self.owners.remove(n);
                self.events.push_back(Event::RouteDel { prefix: *n });
            }
        }
        self.peers
            .remove(client, peer_ref::BINDING, &mut self.events);
        if notify {
            self.purge_informed(client, &b.prefixes, Some(b.nbma), &b.informed);
        }
    }

    /// Purge Request (N bit: no reply wanted) to each requester that resolved `client`.
    fn purge_informed(
        &mut self,
        client: IpAddr,
        nets: &[IpNet],
        nbma: Option<IpAddr>,
        informed: &[(IpAddr, IpAddr)],
    ) {
        if informed.is_empty() {
            return;
        }
        let hl = self.host_len();
        let cies: Vec<Cie> = nets
            .iter()
            .map(|n| Cie {
                prefix_len: if n.prefix_len() == hl {
                    hl
                } else {
                    n.prefix_len()
                },
                client_nbma: nbma,
                client_proto: Some(if n.prefix_len() == hl {
                    client
                } else {
                    n.addr()
                }),
                ..Cie::default()
            })
            .collect();
        for &(proto, to) in informed {
            let id = self.next_id();
            let mut exts = Vec::new();
            self.finish_extensions(&mut exts);
            let pkt = Packet {
                header: self.header(Op::PurgeRequest, self.cfg.hop_count),
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

    /// Resolution Request: answer as owner, answer or forward for a registered client,
    /// forward upstream, or answer negatively.
    pub(super) fn on_resolution_request(&mut self, from: IpAddr, pkt: Packet, raw: &[u8]) {
        let Some(m) = pkt.mandatory() else { return };
        let (Some(src), Some(dst)) = (m.src_proto, m.dst_proto) else {
            self.drop_packet(
                DropReason::Unexpected,
                from,
                "Resolution Request without protocol addresses",
            );
            return;
        };
        if src == self.cfg.tunnel_address {
            self.drop_packet(
                DropReason::Loop,
                from,
                "our own Resolution Request came back",
            );
            return;
        }
        if transit_lists(&pkt, true, self.cfg.tunnel_address) {
            self.send_error(from, error_code::LOOP_DETECTED, raw, &pkt);
            self.drop_packet(
                DropReason::Loop,
                from,
                "our address is in the Forward Transit NHS records",
            );
            return;
        }
        let own = self.own_prefix_for(dst);
        let client = if self.cfg.role == Role::Hub {
            self.owners.lookup(dst).map(|(n, c)| (n, *c))
        } else {
            None
        };
        // Longest match wins between our prefixes and the clients'.
        let client = match (own, client) {
            (Some(o), Some((n, _))) if o.prefix_len() >= n.prefix_len() => None,
            (_, c) => c,
        };
        if let (Some(own), None) = (own, client) {
            if unknown_compulsory(&pkt) {
                self.send_error(from, error_code::UNRECOGNIZED_EXTENSION, raw, &pkt);
                return;
            }
            self.answer_as_owner(from, &pkt, own);
            return;
        }
        if self.cfg.role != Role::Hub {
            self.drop_packet(
                DropReason::Unexpected,
                from,
                "Resolution Request for an address that is not ours",
            );
            return;
        }
        if let Some((net, owner)) = client {
            if owner == src {
                self.drop_packet(
                    DropReason::Unexpected,
                    from,
                    "Resolution Request for the requester's own address",
                );
                return;
            }
            let Some(b) = self.bindings.get(&owner) else {
                return;
            };
            let owner_nbma = b.nbma;
            // Remember who learns about this client, to purge them when it changes.
            let req_nbma = self.requester_nbma(from, &pkt, src);
            if let Some(b) = self.bindings.get_mut(&owner)
                && !b.informed.iter().any(|(p, _)| *p == src)
                && b.informed.len() < MAX_INFORMED
            {
                b.informed.push((src, req_nbma));
            }
            if self.cfg.answer_for_clients {
                if unknown_compulsory(&pkt) {
                    self.send_error(from, error_code::UNRECOGNIZED_EXTENSION, raw, &pkt);
                    return;
                }
                self.answer_for_client(from, &pkt, net, owner);
            } else {
                self.forward_request(from, pkt, raw, owner_nbma);
            }
            return;
        }
        if let Some(to) = self
            .best_nhs()
            .and_then(|i| self.nhs.get(i))
            .map(|n| n.cfg.nbma_address)
        {
            self.forward_request(from, pkt, raw, to);
            return;
        }
        if unknown_compulsory(&pkt) {
            self.send_error(from, error_code::UNRECOGNIZED_EXTENSION, raw, &pkt);
            return;
        }
        self.answer_negative(from, &pkt);
    }

    /// Where to send a reply to the requester `src` of `pkt`: the address it registered from,
    /// else its NAT-observed address, else the address it claims, else the previous hop.
    pub(super) fn requester_nbma(&self, from: IpAddr, pkt: &Packet, src: IpAddr) -> IpAddr {
        if let Some(b) = self.bindings.get(&src) {
            return b.nbma;
        }
        if let Some(n) = nat_nbma_for(pkt, src) {
            return n;
        }
        pkt.mandatory().and_then(|m| m.src_nbma).unwrap_or(from)
    }

    fn forward_request(&mut self, from: IpAddr, mut pkt: Packet, raw: &[u8], to: IpAddr) {
        if pkt.header.hop_count <= 1 {
            self.send_error(from, error_code::HOP_COUNT_EXCEEDED, raw, &pkt);
            self.drop_packet(
                DropReason::HopCount,
                from,
                "hop count exhausted while forwarding",
            );
            return;
        }
        pkt.header.hop_count -= 1;
        let src = pkt.mandatory().and_then(|m| m.src_proto);
        // Transit nodes pass unknown compulsory extensions on but do not record themselves.
        if !unknown_compulsory(&pkt) {
            let cie = self.own_cie(self.host_len());
            append_transit(&mut pkt.extensions, true, cie);
        }
        // A requester behind NAT that sent an empty NAT extension: fill in what we observed.
        if let Some(src) = src
            && let Some(b) = self.bindings.get(&src)
            && b.claimed_nbma.is_some_and(|c| c != b.nbma)
        {
            let observed = b.nbma;
            let hl = self.host_len();
            for e in &mut pkt.extensions {
                if let ExtensionBody::CiscoNatAddress(c) = &mut e.body
                    && c.is_empty()
                {
                    c.push(Cie {
                        prefix_len: hl,
                        client_nbma: Some(observed),
                        client_proto: Some(src),
                        ..Cie::default()
                    });
                }
            }
        }
        self.regenerate_auth(&mut pkt.extensions);
        self.send(to, &pkt);
    }

    /// Resolution Reply for a destination we own (our tunnel address or a local prefix),
    /// sent straight to the requester. A spoke also adds the requester as a peer, so that
    /// return traffic takes the shortcut too.
    fn answer_as_owner(&mut self, from: IpAddr, pkt: &Packet, own: IpNet) {
        let Some(m) = pkt.mandatory() else { return };
        let Some(src) = m.src_proto else { return };
        // The shortcut lives as long as the shorter of the two holding times on both sides:
        // we do not keep the requester longer than it asked, and it refreshes (at 2/3 of the
        // time we reply with) before our entry for it expires.
        let requested_ht = m.cies.first().map_or(0, |c| c.holding_time);
        let ht = if requested_ht == 0 {
            self.cfg.holdtime
        } else {
            requested_ht.min(self.cfg.holdtime)
        };
        let cie = Cie {
            code: cie_code::SUCCESS,
            prefix_len: own.prefix_len(),
            unused: 0,
            mtu: self.cfg.mtu,
            holding_time: ht,
            preference: 0,
            client_nbma: Some(self.cfg.nbma_address),
            client_nbma_sub: Vec::new(),
            client_proto: Some(self.cfg.tunnel_address),
        };
        let to = self.requester_nbma(from, pkt, src);
        // Requester as a shortcut peer (PeerUp before the reply that goes to it).
        let is_client = self.bindings.contains_key(&src);
        if self.tunnel_net.contains(&src) && !is_client && !self.is_nhs_address(src) {
            self.install_shortcut(host(src), src, to, ht, super::cache::Origin::Answered, src);
        }
        let nat = self.nhs.iter().find_map(|n| n.nat_nbma);
        // A requester behind NAT gets the reply back through the NHS that forwarded the
        // request (as FRR does): an unsolicited packet to its public address would create a
        // NAT mapping that clashes with the requester's own first packet to us.
        let requester_natted = nat_nbma_for(pkt, src)
            .is_some_and(|n| pkt.mandatory().and_then(|m| m.src_nbma) != Some(n));
        let via = if self.cfg.role != Role::Hub && from != to && requester_natted {
            from
        } else {
            to
        };
        self.send_resolution_reply(via, pkt, cie, nat);
    }

    /// Authoritative Resolution Reply on behalf of registered client `owner`.
    fn answer_for_client(&mut self, from: IpAddr, pkt: &Packet, net: IpNet, owner: IpAddr) {
        let Some(b) = self.bindings.get(&owner) else {
            return;
        };
        let remaining = b.expires.saturating_duration_since(self.now).as_secs();
        let cie = Cie {
            code: cie_code::SUCCESS,
            prefix_len: net.prefix_len(),
            unused: 0,
            mtu: self.cfg.mtu,
            holding_time: u16::try_from(remaining).unwrap_or(u16::MAX).max(1),
            preference: 0,
            client_nbma: Some(b.nbma),
            client_nbma_sub: Vec::new(),
            client_proto: Some(owner),
        };
        let Some(src) = pkt.mandatory().and_then(|m| m.src_proto) else {
            return;
        };
        let to = self.requester_nbma(from, pkt, src);
        self.send_resolution_reply(to, pkt, cie, None);
    }

    fn answer_negative(&mut self, from: IpAddr, pkt: &Packet) {
        let Some(src) = pkt.mandatory().and_then(|m| m.src_proto) else {
            return;
        };
        let cie = Cie {
            code: cie_code::NO_BINDING,
            prefix_len: self.host_len(),
            holding_time: u16::try_from(self.cfg.negative_holdtime.as_secs()).unwrap_or(u16::MAX),
            ..Cie::default()
        };
        let to = self.requester_nbma(from, pkt, src);
        self.send_resolution_reply(to, pkt, cie, None);
    }

    fn send_resolution_reply(&mut self, to: IpAddr, req: &Packet, cie: Cie, nat: Option<IpAddr>) {
        let Some(m) = req.mandatory() else { return };
        let hl = self.host_len();
        let success = cie.code == cie_code::SUCCESS;
        let mut exts = Vec::new();
        for e in &req.extensions {
            if let ExtensionBody::ForwardTransitNhs(_) = e.body {
                exts.push(e.clone());
            }
        }
        exts.push(Extension::new(
            true,
            ExtensionBody::ReverseTransitNhs(Vec::new()),
        ));
        exts.push(Extension::new(
            true,
            ExtensionBody::ResponderAddress(Some(self.own_cie(hl))),
        ));
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
        exts.push(Extension::new(
            false,
            ExtensionBody::CiscoNatAddress(nat_cies),
        ));
        exts.extend(echoed_extensions(req));
        self.finish_extensions(&mut exts);
        let mut f = m.flags & (flags::RES_Q | flags::RES_S);
        if success {
            f |= flags::RES_D | flags::RES_A;
        }
        f |= flags::CISCO_NAT;
        let reply = Packet {
            header: self.header(Op::ResolutionReply, self.cfg.hop_count),
            body: mandatory(
                f,
                m.request_id,
                m.src_nbma,
                m.src_proto,
                m.dst_proto,
                vec![cie],
            ),
            extensions: exts,
        };
        self.send(to, &reply);
    }

    /// A Resolution Reply not addressed to us: pass it on towards the requester, recording
    /// ourselves in the Reverse Transit NHS extension.
    pub(super) fn forward_reply(&mut self, from: IpAddr, mut pkt: Packet, raw: &[u8]) {
        if self.cfg.role != Role::Hub {
            self.drop_packet(
                DropReason::Unexpected,
                from,
                "Resolution Reply for another node at a spoke",
            );
            return;
        }
        if transit_lists(&pkt, false, self.cfg.tunnel_address) {
            self.send_error(from, error_code::LOOP_DETECTED, raw, &pkt);
            self.drop_packet(
                DropReason::Loop,
                from,
                "our address is in the Reverse Transit NHS records",
            );
            return;
        }
        let Some(src) = pkt.mandatory().and_then(|m| m.src_proto) else {
            return;
        };
        if pkt.header.hop_count <= 1 {
            self.send_error(from, error_code::HOP_COUNT_EXCEEDED, raw, &pkt);
            self.drop_packet(
                DropReason::HopCount,
                from,
                "hop count exhausted while forwarding",
            );
            return;
        }
        // Next hop back: the requester if it is our client, else the NHS before us in the
        // forward path, else the address the requester claimed.
        let me = self.cfg.tunnel_address;
        let prev_nhs = pkt.extensions.iter().find_map(|e| match &e.body {
            ExtensionBody::ForwardTransitNhs(c) => {
                let pos = c.iter().position(|c| c.client_proto == Some(me))?;
                pos.checked_sub(1)
                    .and_then(|p| c.get(p))
                    .and_then(|c| c.client_nbma)
            }
            _ => None,
        });
        let to = match self.bindings.get(&src) {
            Some(b) => b.nbma,
            None => match prev_nhs {
                Some(n) => n,
                None => match pkt.mandatory().and_then(|m| m.src_nbma) {
                    Some(n) => n,
                    None => {
                        self.drop_packet(
                            DropReason::Unexpected,
                            from,
                            "no way back to the requester",
                        );
                        return;
                    }
                },
            },
        };
        pkt.header.hop_count -= 1;
        if !unknown_compulsory(&pkt) {
            let cie = self.own_cie(self.host_len());
            append_transit(&mut pkt.extensions, false, cie);
        }
        self.regenerate_auth(&mut pkt.extensions);
        self.send(to, &pkt);
    }

    /// Purge Request: a client withdrawing its registration (NHS), or an NHS/peer withdrawing
    /// a binding we hold as a shortcut.
    pub(super) fn on_purge_request(&mut self, from: IpAddr, pkt: &Packet, raw: &[u8]) {
        let Some(m) = pkt.mandatory() else { return };
        if unknown_compulsory(pkt) {
            self.send_error(from, error_code::UNRECOGNIZED_EXTENSION, raw, pkt);
            return;
        }
        let hl = self.host_len();
        let src = m.src_proto;
        let mut cies = m.cies.clone();
        match src.and_then(|s| self.bindings.get(&s).map(|b| (s, b))) {
            Some((client, b)) if self.cfg.role == Role::Hub => {
                // Only the registration this purge is about: same request id (Cisco pairs
                // them) or same NBMA address. A purge overtaken by the client's newer
                // registration (e.g. after an NBMA change) must not remove it.
                let matches = b.request_id == m.request_id
                    || m.cies.iter().any(|c| {
                        c.client_nbma
                            .is_some_and(|n| n == b.nbma || Some(n) == b.claimed_nbma)
                    });
                let whole = m.cies.is_empty()
                    || m.cies.iter().any(|c| {
                        let len = if c.prefix_len == 0xFF || c.prefix_len == 0 {
                            hl
                        } else {
                            c.prefix_len
                        };
                        c.client_proto.unwrap_or(client) == client && len == hl
                    });
                if matches && whole {
                    self.remove_binding(client, true);
                } else if matches {
                    for c in &m.cies {
                        let len = if c.prefix_len == 0xFF || c.prefix_len == 0 {
                            hl
                        } else {
                            c.prefix_len
                        };
                        if let Some(n) = c.client_proto.and_then(|a| prefix(a, len))
                            && self.owners.get(&n) == Some(&client)
                        {
                            self.owners.remove(&n);
                            self.events.push_back(Event::RouteDel { prefix: n });
                            if let Some(b) = self.bindings.get_mut(&client) {
                                b.prefixes.retain(|p| *p != n);
                            }
                        }
                    }
                } else {
                    for c in &mut cies {
                        c.code = cie_code::NO_BINDING;
                    }
                }
            }
            _ => {
                for c in &m.cies {
                    let len = if c.prefix_len == 0xFF || c.prefix_len == 0 {
                        hl
                    } else {
                        c.prefix_len
                    };
                    let Some(addr) = c.client_proto else { continue };
                    if let Some(n) = prefix(addr, len) {
                        self.remove_shortcut(n);
                    }
                    if len == hl {
                        // The node itself is purged: every shortcut through it goes.
                        self.remove_shortcuts_via(addr);
                    }
                }
            }
        }
        if m.flags & flags::PURGE_N != 0 {
            return;
        }
        let mut exts: Vec<Extension> = echoed_extensions(pkt).collect();
        self.finish_extensions(&mut exts);
        let reply = Packet {
            header: self.header(Op::PurgeReply, self.cfg.hop_count),
            body: mandatory(
                m.flags,
                m.request_id,
                m.src_nbma,
                m.src_proto,
                m.dst_proto,
                cies,
            ),
            extensions: exts,
        };
        self.send(from, &reply);
    }

    /// Hub, phase 3: a data packet from `src` to `dst` came in from the overlay at
    /// `ingress_nbma` and went back out to it. Sends a Traffic Indication carrying the leading
    /// bytes `head` of the packet to `ingress_nbma`, at most `redirect_limit.burst` per
    /// `redirect_limit.interval` per (src, dst).
    pub fn hairpinned(
        &mut self,
        now: Instant,
        src: IpAddr,
        dst: IpAddr,
        ingress_nbma: IpAddr,
        head: &[u8],
    ) {
        self.advance(now);
        if self.shut_down || self.cfg.role != Role::Hub || self.cfg.phase < Phase::Three {
            return;
        }
        if ingress_nbma.is_ipv4() != self.cfg.nbma_address.is_ipv4() {
            return;
        }
        if self.limiter.allow(now, src, dst).is_err() {
            self.stats.drop(DropReason::RateLimited);
            return;
        }
        let keep = head.len().min(TI_PAYLOAD_MAX);
        let mut exts = Vec::new();
        self.finish_extensions(&mut exts);
        let pkt = Packet {
            header: self.header(Op::TrafficIndication, HOP_COUNT_ONE_HOP),
            body: Body::Mandatory(crate::wire::Mandatory {
                flags: 0, // traffic code: redirect (0)
                request_id: 0,
                src_nbma: Some(self.cfg.nbma_address),
                src_nbma_sub: Vec::new(),
                src_proto: Some(self.cfg.tunnel_address),
                dst_proto: Some(src),
                cies: Vec::new(),
                payload: head.get(..keep).unwrap_or(head).to_vec(),
            }),
            extensions: exts,
        };
        self.send(ingress_nbma, &pkt);
    }

    /// Number of clients registered at this NHS.
    pub fn registered_clients(&self) -> usize {
        self.bindings.len()
    }
}
