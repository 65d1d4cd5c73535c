//! ESP state of the userspace data plane: the outbound SA per peer and the inbound SAs by
//! SPI, published as immutable snapshots (one `arc_swap` load per batch), and the bounded
//! per-peer queues of NHRP packets that wait for their peer's SA.
//!
//! An SA's sequence counter and anti-replay window change with every packet, so each SA
//! sits behind its own mutex. The packet tasks take it once per run of consecutive packets
//! of one batch that use the same SA (see `SealRun` / `OpenRun` in `mod.rs`), not once per
//! packet; the tasks touching one SA are at most two (TUN and hub forwarding for
//! outbound, one receive socket per direction for inbound), so the lock is uncontended in
//! practice.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use dmvpn_esp::{InboundSa, OutboundSa};
use serde::{Deserialize, Serialize};

/// How an outbound SA's packets leave: raw IP protocol 50, or ESP-in-UDP (RFC 3948).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    Raw(Ipv4Addr),
    Udp(SocketAddrV4),
}

/// An outbound SA and where its packets go.
#[derive(Debug)]
pub(crate) struct OutEntry {
    pub sa: Mutex<OutboundSa>,
    pub spi: u32,
    pub wire: Wire,
}

/// An inbound SA and the peer (NBMA address) it belongs to.
#[derive(Debug)]
pub(crate) struct InEntry {
    pub sa: Mutex<InboundSa>,
    pub peer: Ipv4Addr,
}

/// Locks an SA; a poisoned lock (a panicking holder) leaves the SA usable: its state is
/// only counters and sequence numbers, updated before any call that could panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One immutable state of the SA tables.
#[derive(Debug, Clone, Default)]
pub(crate) struct SaSnapshot {
    pub out: HashMap<Ipv4Addr, Arc<OutEntry>>,
    pub inb: HashMap<u32, Arc<InEntry>>,
}

/// Per-SA figures for `show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaInfo {
    /// The peer's NBMA address.
    pub peer: IpAddr,
    /// "inbound" or "outbound".
    pub direction: String,
    pub spi: u32,
    pub suite: String,
    pub esn: bool,
    /// ESP-in-UDP (port 4500) rather than IP protocol 50.
    pub udp_encap: bool,
    pub packets: u64,
    /// Payload (GRE) bytes.
    pub bytes: u64,
    /// Inbound: packets refused by this SA (authentication, replay, ...); outbound: packets
    /// refused because the SA expired or a buffer was too small.
    pub dropped: u64,
    /// Inbound: replayed or too old; outbound: 0.
    pub replayed: u64,
    /// Inbound: failed authentication; outbound: 0.
    pub auth_failed: u64,
}

/// Most NHRP packets queued per peer while its SA is negotiated.
pub const NHRP_QUEUE_PER_PEER: usize = 16;
/// Most peers with queued NHRP packets.
pub const NHRP_QUEUE_PEERS: usize = 1024;

/// Older outbound SAs kept per peer while newer ones are in use.
const STANDBY_PER_PEER: usize = 4;

/// The SA tables plus the NHRP wait queues.
#[derive(Debug, Default)]
pub(crate) struct SaTables {
    current: ArcSwap<SaSnapshot>,
    /// Outbound SAs replaced by a newer one but not deleted yet (a rekey overlap, or two
    /// IKE SAs negotiated at once), newest last. If the SA in use is deleted, the newest of
    /// these takes over. Guarded by the writer lock's critical sections.
    standby: Mutex<HashMap<Ipv4Addr, Vec<Arc<OutEntry>>>>,
    writer: Mutex<()>,
    queue: Mutex<HashMap<Ipv4Addr, VecDeque<Vec<u8>>>>,
}

impl SaTables {
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<SaSnapshot>> {
        self.current.load()
    }

    fn update<R>(&self, f: impl FnOnce(&mut SaSnapshot) -> R) -> R {
        let _w = lock(&self.writer);
        let mut next = SaSnapshot::clone(&self.current.load());
        let r = f(&mut next);
        self.current.store(Arc::new(next));
        r
    }

    pub(crate) fn install_inbound(&self, peer: Ipv4Addr, sa: InboundSa) -> bool {
        let spi = sa.spi();
        self.update(|s| {
            s.inb
                .insert(
                    spi,
                    Arc::new(InEntry {
                        sa: Mutex::new(sa),
                        peer,
                    }),
                )
                .is_none()
        })
    }

    /// Installs the outbound SA of `peer`; the one it replaces is kept on standby until
    /// it is removed.
    pub(crate) fn install_outbound(&self, peer: Ipv4Addr, sa: OutboundSa, wire: Wire) {
        let spi = sa.spi();
        self.update(|s| {
            let old = s.out.insert(
                peer,
                Arc::new(OutEntry {
                    sa: Mutex::new(sa),
                    spi,
                    wire,
                }),
            );
            if let Some(old) = old {
                let mut sb = lock(&self.standby);
                let list = sb.entry(peer).or_default();
                list.push(old);
                if list.len() > STANDBY_PER_PEER {
                    list.remove(0);
                }
            }
        });
    }

    pub(crate) fn remove_inbound(&self, spi: u32) -> bool {
        self.update(|s| s.inb.remove(&spi).is_some())
    }

    /// Removes `peer`'s outbound SA `spi` (every one with `None`). When it is the SA in
    /// use, the newest one on standby takes over.
    pub(crate) fn remove_outbound(&self, peer: Ipv4Addr, spi: Option<u32>) -> bool {
        self.update(|s| {
            let mut sb = lock(&self.standby);
            let Some(spi) = spi else {
                sb.remove(&peer);
                return s.out.remove(&peer).is_some();
            };
            if s.out.get(&peer).is_some_and(|e| e.spi == spi) {
                s.out.remove(&peer);
                if let Some(next) = sb.get_mut(&peer).and_then(Vec::pop) {
                    s.out.insert(peer, next);
                }
                return true;
            }
            let Some(list) = sb.get_mut(&peer) else {
                return false;
            };
            let before = list.len();
            list.retain(|e| e.spi != spi);
            before != list.len()
        })
    }

    /// Removes every SA of `peer` and its queued NHRP packets; returns how many SAs went.
    pub(crate) fn remove_peer(&self, peer: Ipv4Addr) -> usize {
        lock(&self.queue).remove(&peer);
        self.update(|s| {
            lock(&self.standby).remove(&peer);
            let before = s.out.len() + s.inb.len();
            s.out.remove(&peer);
            s.inb.retain(|_, e| e.peer != peer);
            before - s.out.len() - s.inb.len()
        })
    }

    /// Queues an NHRP packet for `peer`; false if the queue is full.
    pub(crate) fn enqueue(&self, peer: Ipv4Addr, bytes: &[u8]) -> bool {
        let mut q = lock(&self.queue);
        if !q.contains_key(&peer) && q.len() >= NHRP_QUEUE_PEERS {
            return false;
        }
        let e = q.entry(peer).or_default();
        if e.len() >= NHRP_QUEUE_PER_PEER {
            return false;
        }
        e.push_back(bytes.to_vec());
        true
    }

    pub(crate) fn take_queue(&self, peer: Ipv4Addr) -> VecDeque<Vec<u8>> {
        lock(&self.queue).remove(&peer).unwrap_or_default()
    }

    pub(crate) fn queued(&self, peer: Ipv4Addr) -> usize {
        lock(&self.queue).get(&peer).map_or(0, VecDeque::len)
    }

    pub(crate) fn infos(&self) -> Vec<SaInfo> {
        let snap = self.load();
        let mut v = Vec::with_capacity(snap.out.len() + snap.inb.len());
        for (peer, e) in &snap.out {
            let sa = lock(&e.sa);
            let c = sa.counters();
            v.push(SaInfo {
                peer: IpAddr::V4(*peer),
                direction: "outbound".into(),
                spi: e.spi,
                suite: format!("{:?}", sa.suite()),
                esn: sa.esn(),
                udp_encap: matches!(e.wire, Wire::Udp(_)),
                packets: c.packets,
                bytes: c.bytes,
                dropped: c.expired + c.buffer_too_small,
                replayed: 0,
                auth_failed: 0,
            });
        }
        for (spi, e) in &snap.inb {
            let sa = lock(&e.sa);
            let c = sa.counters();
            v.push(SaInfo {
                peer: IpAddr::V4(e.peer),
                direction: "inbound".into(),
                spi: *spi,
                suite: format!("{:?}", sa.suite()),
                esn: sa.esn(),
                udp_encap: false,
                packets: c.packets,
                bytes: c.bytes,
                dropped: c.dropped(),
                replayed: c.replayed + c.too_old,
                auth_failed: c.auth_failed,
            });
        }
        v.sort_by(|a, b| (a.peer, &a.direction, a.spi).cmp(&(b.peer, &b.direction, b.spi)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmvpn_esp::{SecurityAssociation, Suite};
    use std::time::Instant;

    fn out(spi: u32) -> OutboundSa {
        SecurityAssociation::new(spi, Suite::Aes256Gcm, &[7u8; 36])
            .unwrap()
            .into_outbound(Instant::now())
            .unwrap()
    }

    fn current(t: &SaTables, peer: Ipv4Addr) -> Option<u32> {
        t.load().out.get(&peer).map(|e| e.spi)
    }

    #[test]
    fn replaced_outbound_sa_takes_over_when_the_newer_one_is_deleted() {
        let t = SaTables::default();
        let p = Ipv4Addr::new(198, 51, 100, 3);
        t.install_outbound(p, out(0x100), Wire::Raw(p));
        t.install_outbound(p, out(0x200), Wire::Raw(p));
        assert_eq!(current(&t, p), Some(0x200));
        // Rekey: the old SA is deleted while the new one is in use.
        assert!(t.remove_outbound(p, Some(0x100)));
        assert_eq!(current(&t, p), Some(0x200));
        // Two IKE SAs at once: the newer is deleted, the older one carries on.
        t.install_outbound(p, out(0x300), Wire::Raw(p));
        assert!(t.remove_outbound(p, Some(0x300)));
        assert_eq!(current(&t, p), Some(0x200));
        assert!(!t.remove_outbound(p, Some(0x999)));
        assert!(t.remove_outbound(p, Some(0x200)));
        assert_eq!(current(&t, p), None);
    }

    #[test]
    fn nhrp_queue_is_bounded_per_peer() {
        let t = SaTables::default();
        let p = Ipv4Addr::new(198, 51, 100, 3);
        for _ in 0..NHRP_QUEUE_PER_PEER {
            assert!(t.enqueue(p, b"nhrp"));
        }
        assert!(!t.enqueue(p, b"nhrp"));
        assert_eq!(t.queued(p), NHRP_QUEUE_PER_PEER);
        assert_eq!(t.take_queue(p).len(), NHRP_QUEUE_PER_PEER);
        assert_eq!(t.queued(p), 0);
        assert!(t.enqueue(p, b"nhrp"));
        assert_eq!(t.remove_peer(p), 0);
        assert_eq!(t.queued(p), 0);
    }
}
