//! The per-packet decisions of the userspace data plane, free of I/O so they can be tested
//! without root: what to do with a packet read from the TUN, and with a packet read from
//! the raw GRE socket. Buffers are modified in place (encapsulation, TTL); nothing here
//! allocates except events, which are deduplicated.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::counters::{Batch, DropReason, Field};
use crate::events::{Deduper, Event, HAIRPIN_HEAD_LEN, LogOnce, MissReason};
use crate::gre::{self, GreHeader};
use crate::tables::{Lookup, Snapshot};

/// Room kept in front of a packet read from the TUN for the GRE header and, in front of
/// that, the ESP header and IV.
pub(crate) const HEADROOM: usize = dmvpn_esp::ESP_HEADROOM + gre::MAX_HEADER_LEN;

/// Static facts the packet path needs.
#[derive(Debug, Clone)]
pub(crate) struct PathConfig {
    pub local_nbma: Ipv4Addr,
    pub key: Option<u32>,
    pub hub: bool,
    pub local_addrs: Vec<IpAddr>,
    /// IPsec is required: GRE in clear is dropped, packets go out only through an SA.
    pub require_ipsec: bool,
}

impl PathConfig {
    fn is_local(&self, a: IpAddr) -> bool {
        self.local_addrs.contains(&a)
    }
}

/// What one packet task owns: counters for the current batch, event dedupers, drop log.
#[derive(Debug)]
pub(crate) struct TaskState {
    pub batch: Batch,
    pub log: LogOnce,
    events: mpsc::Sender<Event>,
    hairpin: Deduper<(IpAddr, IpAddr)>,
    miss: Deduper<IpAddr>,
    used: Deduper<IpAddr>,
    need_sa: Deduper<Ipv4Addr>,
}

/// Distinct flows each deduper remembers.
const DEDUPE_CAP: usize = 4096;

impl TaskState {
    pub(crate) fn new(task: &'static str, events: mpsc::Sender<Event>, window: Duration) -> Self {
        Self {
            batch: Batch::default(),
            log: LogOnce::new(task, 1024),
            events,
            hairpin: Deduper::new(window, DEDUPE_CAP),
            miss: Deduper::new(window, DEDUPE_CAP),
            used: Deduper::new(window, DEDUPE_CAP),
            need_sa: Deduper::new(window, DEDUPE_CAP),
        }
    }

    pub(crate) fn emit(&mut self, ev: Event) {
        match self.events.try_send(ev) {
            Ok(()) => self.batch.add(Field::EventsSent, 1),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.drop_pkt(DropReason::EventQueueFull, None, &"agent event queue full")
            }
            // The agent went away; nothing to report to.
            Err(mpsc::error::TrySendError::Closed(_)) => self.drop_pkt(
                DropReason::EventQueueFull,
                None,
                &"agent event queue closed",
            ),
        }
    }

    pub(crate) fn drop_pkt(
        &mut self,
        reason: DropReason,
        peer: Option<IpAddr>,
        detail: &dyn std::fmt::Display,
    ) {
        self.batch.drop(reason);
        self.log.drop(reason, peer, detail);
    }

    /// Asks the agent for an SA with `peer` (deduplicated per window).
    pub(crate) fn need_sa(&mut self, peer: Ipv4Addr, now: Instant) {
        if self.need_sa.allow(peer, now) {
            self.emit(Event::NeedSa {
                nbma: IpAddr::V4(peer),
            });
        } else {
            self.suppressed();
        }
    }

    fn suppressed(&mut self) {
        self.batch.add(Field::EventsSuppressed, 1);
    }
}

/// Source and destination of an inner IP packet, and the GRE protocol type it needs.
pub(crate) fn inner_addrs(p: &[u8]) -> Option<(u16, IpAddr, IpAddr)> {
    match p.first()? >> 4 {
        4 => {
            let h: &[u8; 20] = p.get(..20)?.try_into().ok()?;
            if h[0] & 0x0F < 5 {
                return None;
            }
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            Some((gre::PROTO_IPV4, src.into(), dst.into()))
        }
        6 => {
            let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            Some((
                gre::PROTO_IPV6,
                Ipv6Addr::from(src).into(),
                Ipv6Addr::from(dst).into(),
            ))
        }
        _ => None,
    }
}

/// What a router checks before forwarding (RFC 1812 §5.2.2): for IPv4 the header length,
/// total length and header checksum. The TTL rewrite below would otherwise turn a corrupt
/// header into a valid one.
fn header_ok(p: &[u8]) -> bool {
    match p.first().map(|b| (b >> 4, usize::from(b & 0x0F) * 4)) {
        Some((4, ihl)) => {
            let total = p
                .get(2..4)
                .map_or(0, |t| usize::from(u16::from_be_bytes([t[0], t[1]])));
            ihl >= 20
                && total >= ihl
                && total <= p.len()
                && p.get(..ihl).is_some_and(|h| gre::internet_checksum(h) == 0)
        }
        Some((6, _)) => p
            .get(4..6)
            .is_some_and(|l| 40 + usize::from(u16::from_be_bytes([l[0], l[1]])) <= p.len()),
        _ => false,
    }
}

/// Whether a router may forward the packet: TTL / hop limit above 1.
fn ttl_allows_forwarding(p: &[u8]) -> bool {
    match p.first().map(|b| b >> 4) {
        Some(4) => p.get(8).is_some_and(|t| *t > 1),
        Some(6) => p.get(7).is_some_and(|h| *h > 1),
        _ => false,
    }
}

/// Decrements the TTL / hop limit of an IP packet (IPv4: and fixes the header checksum).
/// Returns false, leaving the packet unchanged, if it must not be forwarded.
fn decrement_ttl(p: &mut [u8]) -> bool {
    match p.first().map(|b| (b >> 4, usize::from(b & 0x0F) * 4)) {
        Some((4, ihl)) => {
            let Some(h) = p.get_mut(..ihl).filter(|h| h.len() >= 20) else {
                return false;
            };
            if h[8] <= 1 {
                return false;
            }
            h[8] -= 1;
            h[10..12].fill(0);
            let sum = gre::internet_checksum(h).to_be_bytes();
            h[10..12].copy_from_slice(&sum);
            true
        }
        Some((6, _)) => match p.get_mut(7) {
            Some(h) if *h > 1 => {
                *h -= 1;
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// Multicast, broadcast or IPv6 link-local destinations.
fn is_link_scope(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_multicast() || a.is_unicast_link_local(),
    }
}

fn v4(a: IpAddr) -> Option<Ipv4Addr> {
    match a {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

/// Decision for a packet read from the TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TunAction {
    Skip,
    /// Send `buf[start..end]` (GRE header included) to `to`.
    Send {
        start: usize,
        end: usize,
        to: Ipv4Addr,
    },
}

/// A packet was read into `buf[HEADROOM..HEADROOM + len]`: route it, encapsulate in place.
pub(crate) fn tun_packet(
    cfg: &PathConfig,
    snap: &Snapshot,
    buf: &mut [u8],
    len: usize,
    now: Instant,
    st: &mut TaskState,
) -> TunAction {
    let Some(pkt) = buf.get(HEADROOM..HEADROOM + len) else {
        st.drop_pkt(
            DropReason::BadInner,
            None,
            &"TUN read larger than the buffer",
        );
        return TunAction::Skip;
    };
    st.batch.add(Field::TunRxPackets, 1);
    st.batch.add(Field::TunRxBytes, len as u64);
    let Some((proto, _src, dst)) = inner_addrs(pkt) else {
        st.drop_pkt(DropReason::BadInner, None, &"TUN packet is not IPv4/IPv6");
        return TunAction::Skip;
    };
    let (next_hop, nbma) = match snap.lookup(dst) {
        Lookup::Neighbor { next_hop, nbma } => (next_hop, nbma),
        Lookup::NoNeighbor { next_hop } => {
            st.drop_pkt(
                DropReason::NoNeighbor,
                Some(next_hop),
                &format_args!("next hop {next_hop} for {dst} has no NBMA address yet"),
            );
            if st.miss.allow(dst, now) {
                st.emit(Event::Miss {
                    dst,
                    next_hop,
                    reason: MissReason::NoNeighbor,
                });
            } else {
                st.suppressed();
            }
            return TunAction::Skip;
        }
        Lookup::NoRoute => {
            if is_link_scope(dst) {
                // IPv6 neighbour discovery, MLD, multicast the kernel sends on any link:
                // counted, not worth a warning.
                st.batch.drop(DropReason::NoRoute);
            } else {
                st.drop_pkt(
                    DropReason::NoRoute,
                    None,
                    &format_args!("no overlay route to {dst}"),
                );
            }
            return TunAction::Skip;
        }
    };
    let Some(to) = v4(nbma) else {
        st.drop_pkt(
            DropReason::SendError,
            Some(nbma),
            &"IPv6 NBMA addresses need an IPv6 underlay socket",
        );
        return TunAction::Skip;
    };
    let hdr = GreHeader::with_key(proto, cfg.key);
    let start = HEADROOM - hdr.len();
    let end = HEADROOM + len;
    if buf
        .get_mut(start..end)
        .is_none_or(|p| hdr.encode_packet(p).is_err())
    {
        st.drop_pkt(DropReason::BadInner, None, &"no room for the GRE header");
        return TunAction::Skip;
    }
    if snap.is_nhs(next_hop) {
        if dst != next_hop {
            if st.miss.allow(dst, now) {
                st.emit(Event::Miss {
                    dst,
                    next_hop,
                    reason: MissReason::ViaNhs,
                });
            } else {
                st.suppressed();
            }
        }
    } else if st.used.allow(dst, now) {
        st.emit(Event::Used { dst, next_hop });
    } else {
        st.suppressed();
    }
    TunAction::Send { start, end, to }
}

/// Decision for a packet read from the raw GRE socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RxAction {
    Skip,
    /// Write `buf[start..end]` (the inner packet) to the TUN.
    Tun {
        start: usize,
        end: usize,
    },
    /// Hub: send `buf[start..end]` (new GRE header included) to `to`.
    Forward {
        start: usize,
        end: usize,
        to: Ipv4Addr,
    },
}

/// Checks the outer IPv4 header of a raw packet of IP protocol `proto` addressed to us;
/// returns (header length, total length, source).
pub(crate) fn outer_v4(
    cfg: &PathConfig,
    buf: &[u8],
    proto: u8,
    st: &mut TaskState,
) -> Option<(usize, usize, Ipv4Addr)> {
    // The kernel has validated and reassembled it already; check only what we rely on.
    let Some(h) = buf.get(..20) else {
        st.drop_pkt(DropReason::BadOuter, None, &"shorter than an IPv4 header");
        return None;
    };
    let ihl = usize::from(h[0] & 0x0F) * 4;
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
    let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
    let peer = Some(IpAddr::V4(src));
    if h[0] >> 4 != 4 || ihl < 20 || h[9] != proto || total < ihl || total > buf.len() {
        st.drop_pkt(DropReason::BadOuter, peer, &"malformed outer IPv4 header");
        return None;
    }
    if dst != cfg.local_nbma {
        st.drop_pkt(
            DropReason::NotForUs,
            peer,
            &format_args!("outer destination {dst} is not our NBMA address"),
        );
        return None;
    }
    Some((ihl, total, src))
}

/// A raw IPv4 packet (outer header included, as raw sockets deliver it) is in `buf`.
pub(crate) fn rx_packet(
    cfg: &PathConfig,
    snap: &Snapshot,
    buf: &mut [u8],
    now: Instant,
    st: &mut TaskState,
) -> RxAction {
    let Some((ihl, total, src)) = outer_v4(cfg, buf, 47, st) else {
        return RxAction::Skip;
    };
    let peer = Some(IpAddr::V4(src));
    if cfg.require_ipsec {
        st.drop_pkt(
            DropReason::Unprotected,
            peer,
            &"GRE in clear although IPsec is required (is the peer's ipsec enabled?)",
        );
        return RxAction::Skip;
    }
    rx_gre(cfg, snap, buf, ihl, total, src, now, st)
}

/// The GRE packet `buf[gre_start..end]` came from the peer at NBMA address `src` (outer
/// source, or the peer of the ESP SA that opened it). There is room in front of it for a
/// new GRE header plus the ESP header (hub forwarding).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rx_gre(
    cfg: &PathConfig,
    snap: &Snapshot,
    buf: &mut [u8],
    gre_start: usize,
    end: usize,
    src: Ipv4Addr,
    now: Instant,
    st: &mut TaskState,
) -> RxAction {
    let peer = Some(IpAddr::V4(src));
    let (hdr, off) = match buf.get(gre_start..end).map(GreHeader::decode) {
        Some(Ok(x)) => x,
        Some(Err(e)) => {
            st.drop_pkt(DropReason::BadGre, peer, &e);
            return RxAction::Skip;
        }
        None => {
            st.drop_pkt(DropReason::BadOuter, peer, &"bad outer length");
            return RxAction::Skip;
        }
    };
    if hdr.key != cfg.key {
        let detail = format_args!(
            "GRE key {:?} does not match ours ({:?}); check the tunnel key on both ends",
            hdr.key, cfg.key
        );
        st.drop_pkt(DropReason::WrongKey, peer, &detail);
        return RxAction::Skip;
    }
    let inner_start = gre_start + off;
    st.batch.add(Field::RxPackets, 1);
    st.batch.add(Field::RxBytes, (end - gre_start) as u64);
    let Some(inner) = buf.get(inner_start..end) else {
        return RxAction::Skip;
    };
    match hdr.protocol {
        gre::PROTO_NHRP => {
            st.batch.add(Field::NhrpRx, 1);
            st.emit(Event::Nhrp {
                from_nbma: IpAddr::V4(src),
                bytes: inner.to_vec(),
            });
            RxAction::Skip
        }
        gre::PROTO_IPV4 | gre::PROTO_IPV6 => {
            let Some((proto, isrc, idst)) = inner_addrs(inner) else {
                st.drop_pkt(DropReason::BadInner, peer, &"inner packet is not IPv4/IPv6");
                return RxAction::Skip;
            };
            if proto != hdr.protocol {
                st.drop_pkt(
                    DropReason::BadInner,
                    peer,
                    &"inner IP version does not match the GRE protocol type",
                );
                return RxAction::Skip;
            }
            let to_tun = RxAction::Tun {
                start: inner_start,
                end,
            };
            if !cfg.hub || cfg.is_local(idst) {
                return to_tun;
            }
            let Lookup::Neighbor { nbma, .. } = snap.lookup(idst) else {
                // Not for another spoke: the hub's own stack decides (local prefixes, ICMP).
                return to_tun;
            };
            let Some(to) = v4(nbma) else {
                return to_tun;
            };
            if to == src {
                st.drop_pkt(
                    DropReason::HairpinLoop,
                    peer,
                    &format_args!("packet for {idst} would go back to the spoke it came from"),
                );
                return RxAction::Skip;
            }
            let Some(inner) = buf.get_mut(inner_start..end) else {
                return RxAction::Skip;
            };
            if !header_ok(inner) {
                st.drop_pkt(
                    DropReason::BadInner,
                    peer,
                    &"inner IPv4 header is corrupt (length or checksum); not forwarding it",
                );
                return RxAction::Skip;
            }
            if !ttl_allows_forwarding(inner) {
                // TTL expired: let the kernel answer with ICMP time exceeded.
                return to_tun;
            }
            // The head is taken before the TTL changes: it is what the spoke sent.
            let head = if st.hairpin.allow((isrc, idst), now) {
                Some(inner.get(..HAIRPIN_HEAD_LEN).unwrap_or(inner).to_vec())
            } else {
                st.suppressed();
                None
            };
            decrement_ttl(inner);
            let out = GreHeader::with_key(proto, cfg.key);
            // The old outer IPv4 + GRE headers (at least 24 bytes) leave room for ours.
            let Some(start) = inner_start.checked_sub(out.len()) else {
                return to_tun;
            };
            if buf
                .get_mut(start..end)
                .is_none_or(|p| out.encode_packet(p).is_err())
            {
                return to_tun;
            }
            st.batch.add(Field::HubFwdPackets, 1);
            st.batch.add(Field::HubFwdBytes, (end - inner_start) as u64);
            if let Some(head) = head {
                st.emit(Event::Hairpin {
                    src: isrc,
                    dst: idst,
                    ingress_nbma: IpAddr::V4(src),
                    head,
                });
            }
            RxAction::Forward { start, end, to }
        }
        other => {
            st.drop_pkt(
                DropReason::UnknownProtocol,
                peer,
                &format_args!("GRE protocol type {other:#06x} is not IPv4, IPv6 or NHRP"),
            );
            RxAction::Skip
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::AtomicCounters;
    use crate::tables::Tables;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn icmp(src: [u8; 4], dst: [u8; 4], ttl: u8) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4(src, dst, ttl).icmpv4_echo_request(1, 1);
        let mut v = Vec::new();
        b.write(&mut v, &[7u8; 20]).unwrap();
        v
    }

    /// Outer IPv4 header (protocol 47) + GRE + payload, as a raw socket delivers it.
    fn outer(src: [u8; 4], dst: [u8; 4], gre: &[u8]) -> Vec<u8> {
        let h =
            etherparse::Ipv4Header::new(gre.len() as u16, 64, etherparse::IpNumber::GRE, src, dst)
                .unwrap();
        let mut v = h.to_bytes().to_vec();
        v.extend_from_slice(gre);
        v
    }

    fn setup(hub: bool, local: &str) -> (PathConfig, Tables, TaskState, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(16);
        let cfg = PathConfig {
            local_nbma: "198.51.100.1".parse().unwrap(),
            key: Some(42),
            hub,
            local_addrs: vec![ip(local)],
            require_ipsec: false,
        };
        (
            cfg,
            Tables::new(),
            TaskState::new("test", tx, Duration::from_secs(1)),
            rx,
        )
    }

    fn counters(st: &mut TaskState) -> crate::Counters {
        let c = AtomicCounters::default();
        c.flush(&mut st.batch);
        c.snapshot()
    }

    #[test]
    fn tun_packet_is_encapsulated_to_the_neighbour() {
        let (cfg, t, mut st, mut rx) = setup(false, "10.42.0.2");
        t.set_neighbor(ip("10.42.0.3"), ip("198.51.100.3"));
        let pkt = icmp([10, 42, 0, 2], [10, 42, 0, 3], 64);
        let mut buf = vec![0u8; HEADROOM + 2000];
        buf[HEADROOM..HEADROOM + pkt.len()].copy_from_slice(&pkt);
        let now = Instant::now();
        let a = tun_packet(&cfg, &t.load(), &mut buf, pkt.len(), now, &mut st);
        let TunAction::Send { start, end, to } = a else {
            panic!("{a:?}")
        };
        assert_eq!(to, Ipv4Addr::new(198, 51, 100, 3));
        assert_eq!(&buf[start..start + 8], &[0x20, 0, 0x08, 0, 0, 0, 0, 42]);
        assert_eq!(&buf[start + 8..end], &pkt[..]);
        assert_eq!(
            rx.try_recv().unwrap(),
            Event::Used {
                dst: ip("10.42.0.3"),
                next_hop: ip("10.42.0.3")
            }
        );
        // The same destination again within the window: no second event.
        let _ = tun_packet(&cfg, &t.load(), &mut buf, pkt.len(), now, &mut st);
        assert!(rx.try_recv().is_err());
        let c = counters(&mut st);
        assert_eq!(c.tun_rx_packets, 2);
        assert_eq!(c.events_suppressed, 1);
    }

    #[test]
    fn tun_misses_via_hub_and_without_neighbour() {
        let (cfg, t, mut st, mut rx) = setup(false, "10.42.0.2");
        t.set_neighbor(ip("10.42.0.1"), ip("198.51.100.1"));
        t.set_route("10.42.0.0/24".parse().unwrap(), ip("10.42.0.1"));
        t.set_route("10.1.3.0/24".parse().unwrap(), ip("10.42.0.3"));
        t.set_nhs(&[ip("10.42.0.1")]);
        let now = Instant::now();
        let mut buf = vec![0u8; HEADROOM + 2000];
        let pkt = icmp([10, 42, 0, 2], [10, 42, 0, 3], 64);
        buf[HEADROOM..HEADROOM + pkt.len()].copy_from_slice(&pkt);
        let a = tun_packet(&cfg, &t.load(), &mut buf, pkt.len(), now, &mut st);
        assert!(matches!(a, TunAction::Send { to, .. } if to == Ipv4Addr::new(198, 51, 100, 1)));
        assert_eq!(
            rx.try_recv().unwrap(),
            Event::Miss {
                dst: ip("10.42.0.3"),
                next_hop: ip("10.42.0.1"),
                reason: MissReason::ViaNhs
            }
        );
        let pkt = icmp([10, 42, 0, 2], [10, 1, 3, 9], 64);
        buf[HEADROOM..HEADROOM + pkt.len()].copy_from_slice(&pkt);
        let a = tun_packet(&cfg, &t.load(), &mut buf, pkt.len(), now, &mut st);
        assert_eq!(a, TunAction::Skip);
        assert_eq!(
            rx.try_recv().unwrap(),
            Event::Miss {
                dst: ip("10.1.3.9"),
                next_hop: ip("10.42.0.3"),
                reason: MissReason::NoNeighbor
            }
        );
        let pkt = icmp([10, 42, 0, 2], [172, 16, 0, 1], 64);
        buf[HEADROOM..HEADROOM + pkt.len()].copy_from_slice(&pkt);
        assert_eq!(
            tun_packet(&cfg, &t.load(), &mut buf, pkt.len(), now, &mut st),
            TunAction::Skip
        );
        // Traffic to the hub itself is neither a miss nor shortcut use.
        let pkt = icmp([10, 42, 0, 2], [10, 42, 0, 1], 64);
        buf[HEADROOM..HEADROOM + pkt.len()].copy_from_slice(&pkt);
        let _ = tun_packet(&cfg, &t.load(), &mut buf, pkt.len(), now, &mut st);
        assert!(rx.try_recv().is_err());
        let c = counters(&mut st);
        assert_eq!((c.drops.no_neighbor, c.drops.no_route), (1, 1));
    }

    #[test]
    fn hub_forwards_between_spokes_and_reports_hairpin() {
        let (cfg, t, mut st, mut rx) = setup(true, "10.42.0.1");
        t.set_neighbor(ip("10.42.0.2"), ip("198.51.100.2"));
        t.set_neighbor(ip("10.42.0.3"), ip("198.51.100.3"));
        let inner = icmp([10, 42, 0, 2], [10, 42, 0, 3], 64);
        let gre = GreHeader::with_key(gre::PROTO_IPV4, Some(42)).to_packet(&inner);
        let now = Instant::now();
        for round in 0..2 {
            let mut buf = outer([198, 51, 100, 2], [198, 51, 100, 1], &gre);
            let a = rx_packet(&cfg, &t.load(), &mut buf, now, &mut st);
            let RxAction::Forward { start, end, to } = a else {
                panic!("{a:?}")
            };
            assert_eq!(to, Ipv4Addr::new(198, 51, 100, 3));
            let (h, off) = GreHeader::decode(&buf[start..end]).unwrap();
            assert_eq!(h.key, Some(42));
            let fwd = &buf[start + off..end];
            let parsed = etherparse::Ipv4HeaderSlice::from_slice(fwd).unwrap();
            assert_eq!(parsed.ttl(), 63);
            assert_eq!(
                gre::internet_checksum(&fwd[..20]),
                0,
                "header checksum updated"
            );
            if round == 0 {
                let Ok(Event::Hairpin {
                    src,
                    dst,
                    ingress_nbma,
                    head,
                }) = rx.try_recv()
                else {
                    panic!()
                };
                assert_eq!((src, dst), (ip("10.42.0.2"), ip("10.42.0.3")));
                assert_eq!(ingress_nbma, ip("198.51.100.2"));
                assert_eq!(head.len(), inner.len().min(HAIRPIN_HEAD_LEN));
                assert_eq!(&head[..], &inner[..head.len()], "head as the spoke sent it");
            } else {
                assert!(rx.try_recv().is_err(), "deduplicated");
            }
        }
        // Addressed to the hub itself: to the TUN, not forwarded.
        let inner = icmp([10, 42, 0, 2], [10, 42, 0, 1], 64);
        let gre = GreHeader::with_key(gre::PROTO_IPV4, Some(42)).to_packet(&inner);
        let mut buf = outer([198, 51, 100, 2], [198, 51, 100, 1], &gre);
        let a = rx_packet(&cfg, &t.load(), &mut buf, now, &mut st);
        assert_eq!(
            a,
            RxAction::Tun {
                start: 28,
                end: buf.len()
            }
        );
        assert_eq!(&buf[28..], &inner[..]);
        // A corrupt inner header is not forwarded (nor repaired by the TTL rewrite).
        let mut inner = icmp([10, 42, 0, 2], [10, 42, 0, 3], 64);
        inner[10] ^= 0x55;
        let gre = GreHeader::with_key(gre::PROTO_IPV4, Some(42)).to_packet(&inner);
        let mut buf = outer([198, 51, 100, 2], [198, 51, 100, 1], &gre);
        assert_eq!(
            rx_packet(&cfg, &t.load(), &mut buf, now, &mut st),
            RxAction::Skip
        );
        // TTL 1: not forwarded; the hub's kernel gets it (and answers time exceeded).
        let inner = icmp([10, 42, 0, 2], [10, 42, 0, 3], 1);
        let gre = GreHeader::with_key(gre::PROTO_IPV4, Some(42)).to_packet(&inner);
        let mut buf = outer([198, 51, 100, 2], [198, 51, 100, 1], &gre);
        let a = rx_packet(&cfg, &t.load(), &mut buf, now, &mut st);
        assert_eq!(
            a,
            RxAction::Tun {
                start: 28,
                end: buf.len()
            }
        );
        assert_eq!(&buf[28..], &inner[..], "unchanged");
        // Back to the sender: a loop.
        let inner = icmp([10, 42, 0, 3], [10, 42, 0, 2], 64);
        let gre = GreHeader::with_key(gre::PROTO_IPV4, Some(42)).to_packet(&inner);
        let mut buf = outer([198, 51, 100, 2], [198, 51, 100, 1], &gre);
        assert_eq!(
            rx_packet(&cfg, &t.load(), &mut buf, now, &mut st),
            RxAction::Skip
        );
        let c = counters(&mut st);
        assert_eq!(c.hub_forwarded_packets, 2);
        assert_eq!(c.drops.hairpin_loop, 1);
        assert_eq!(c.drops.bad_inner, 1);
        assert_eq!(c.events_suppressed, 1);
    }

    #[test]
    fn rx_checks_key_destination_and_protocols() {
        let (cfg, t, mut st, mut rx) = setup(false, "10.42.0.1");
        let now = Instant::now();
        let inner = icmp([10, 42, 0, 2], [10, 42, 0, 1], 64);
        for key in [Some(7), None] {
            let gre = GreHeader::with_key(gre::PROTO_IPV4, key).to_packet(&inner);
            let mut buf = outer([198, 51, 100, 2], [198, 51, 100, 1], &gre);
            assert_eq!(
                rx_packet(&cfg, &t.load(), &mut buf, now, &mut st),
                RxAction::Skip
            );
        }
        let gre = GreHeader::with_key(gre::PROTO_IPV4, Some(42)).to_packet(&inner);
        let mut buf = outer([198, 51, 100, 2], [198, 51, 100, 9], &gre);
        assert_eq!(
            rx_packet(&cfg, &t.load(), &mut buf, now, &mut st),
            RxAction::Skip
        );
        let gre = GreHeader::with_key(0x88CC, Some(42)).to_packet(&inner);
        let mut buf = outer([198, 51, 100, 2], [198, 51, 100, 1], &gre);
        assert_eq!(
            rx_packet(&cfg, &t.load(), &mut buf, now, &mut st),
            RxAction::Skip
        );
        let gre = GreHeader::with_key(gre::PROTO_IPV6, Some(42)).to_packet(&inner);
        let mut buf = outer([198, 51, 100, 2], [198, 51, 100, 1], &gre);
        assert_eq!(
            rx_packet(&cfg, &t.load(), &mut buf, now, &mut st),
            RxAction::Skip
        );
        let mut buf = outer([198, 51, 100, 2], [198, 51, 100, 1], &[0x20, 0, 8]);
        assert_eq!(
            rx_packet(&cfg, &t.load(), &mut buf, now, &mut st),
            RxAction::Skip
        );
        let nhrp = [0u8, 1, 8, 0, 0, 0, 0, 0];
        let gre = GreHeader::with_key(gre::PROTO_NHRP, Some(42)).to_packet(&nhrp);
        let mut buf = outer([198, 51, 100, 2], [198, 51, 100, 1], &gre);
        assert_eq!(
            rx_packet(&cfg, &t.load(), &mut buf, now, &mut st),
            RxAction::Skip
        );
        assert_eq!(
            rx.try_recv().unwrap(),
            Event::Nhrp {
                from_nbma: ip("198.51.100.2"),
                bytes: nhrp.to_vec()
            }
        );
        let c = counters(&mut st);
        assert_eq!(c.drops.wrong_key, 2);
        assert_eq!(c.drops.not_for_us, 1);
        assert_eq!(c.drops.unknown_protocol, 1);
        assert_eq!(c.drops.bad_inner, 1);
        assert_eq!(c.drops.bad_gre, 1);
        assert_eq!((c.rx_packets, c.nhrp_rx_packets), (3, 1));
    }

    #[test]
    fn clear_gre_is_dropped_when_ipsec_is_required() {
        let (mut cfg, t, mut st, mut rx) = setup(false, "10.42.0.1");
        cfg.require_ipsec = true;
        let now = Instant::now();
        let nhrp = [0u8, 1, 8, 0, 0, 0, 0, 0];
        let gre = GreHeader::with_key(gre::PROTO_NHRP, Some(42)).to_packet(&nhrp);
        let mut buf = outer([198, 51, 100, 2], [198, 51, 100, 1], &gre);
        assert_eq!(
            rx_packet(&cfg, &t.load(), &mut buf, now, &mut st),
            RxAction::Skip
        );
        assert!(rx.try_recv().is_err(), "no NHRP event from clear GRE");
        // The same GRE packet opened from ESP (rx_gre after decryption) is accepted.
        let mut buf = outer([198, 51, 100, 2], [198, 51, 100, 1], &gre);
        let end = buf.len();
        assert_eq!(
            rx_gre(
                &cfg,
                &t.load(),
                &mut buf,
                20,
                end,
                Ipv4Addr::new(198, 51, 100, 2),
                now,
                &mut st
            ),
            RxAction::Skip
        );
        assert_eq!(
            rx.try_recv().unwrap(),
            Event::Nhrp {
                from_nbma: ip("198.51.100.2"),
                bytes: nhrp.to_vec()
            }
        );
        let c = counters(&mut st);
        assert_eq!(c.drops.unprotected, 1);
        assert_eq!(c.nhrp_rx_packets, 1);
    }

    proptest::proptest! {
        #[test]
        fn ttl_helpers_are_total(mut p in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let ok = header_ok(&p);
            let may = ttl_allows_forwarding(&p);
            let before = p.clone();
            if decrement_ttl(&mut p) {
                proptest::prop_assert!(may);
                if ok && p[0] >> 4 == 4 {
                    // A valid header stays valid after the rewrite.
                    proptest::prop_assert!(header_ok(&p));
                }
            } else {
                proptest::prop_assert_eq!(p, before);
            }
        }
    }

    #[test]
    fn rx_never_panics_on_garbage() {
        use proptest::prelude::*;
        let (cfg, t, st, _rx) = setup(true, "10.42.0.1");
        t.set_neighbor(ip("10.42.0.3"), ip("198.51.100.3"));
        let st = std::cell::RefCell::new(st);
        proptest!(|(mut bytes in proptest::collection::vec(any::<u8>(), 0..120), fix in any::<bool>())| {
            if fix && bytes.len() >= 20 {
                // Make the outer header plausible so the GRE and inner parsers are reached.
                let n = bytes.len() as u16;
                bytes[0] = 0x45;
                bytes[2..4].copy_from_slice(&n.to_be_bytes());
                bytes[9] = 47;
                bytes[16..20].copy_from_slice(&[198, 51, 100, 1]);
            }
            let _ = rx_packet(&cfg, &t.load(), &mut bytes, Instant::now(), &mut st.borrow_mut());
        });
    }
}
