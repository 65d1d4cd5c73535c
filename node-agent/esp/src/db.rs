//! SA database: inbound SAs by SPI, outbound SAs by peer, lifetime events for the IKE layer.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::ops::Range;
use std::time::Instant;

use crate::error::{ConfigError, EspError};
use crate::lifetime::{LimitKind, SaSignal};
use crate::sa::{InboundCounters, InboundSa, OutboundCounters, OutboundSa, peek_spi};

/// Inbound SAs one peer may have at once: old and new during a rekey, plus room for the
/// redundant pair of a simultaneous rekey (RFC 7296 §2.8.1) until one is deleted.
pub const MAX_INBOUND_PER_PEER: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// A lifetime event for the IKE layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SaEvent<P> {
    /// Start a CHILD_SA rekey with this peer.
    RekeyNeeded {
        peer: P,
        spi: u32,
        direction: Direction,
        limit: LimitKind,
    },
    /// The SA refuses traffic from now on: delete it (and send the IKE delete).
    Expired {
        peer: P,
        spi: u32,
        direction: Direction,
        limit: LimitKind,
    },
}

/// An opened inbound packet and the peer its SA belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedFrom<P> {
    pub peer: P,
    pub spi: u32,
    pub next_header: u8,
    pub payload: Range<usize>,
    pub seq: u64,
}

/// Monotonic totals over all SAs, including deleted ones (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub inbound: InboundCounters,
    pub outbound: OutboundCounters,
    /// Packets whose SPI matched no inbound SA.
    pub unknown_spi: u64,
    /// Packets too short to carry an SPI.
    pub truncated: u64,
    /// Seal requests for a peer without an outbound SA.
    pub no_outbound_sa: u64,
}

/// Inbound SAs keyed by SPI, one outbound SA per peer. `P` identifies the peer (typically its
/// NBMA address, plus the UDP port behind NAT).
#[derive(Debug)]
pub struct SaDatabase<P> {
    inbound: HashMap<u32, (P, InboundSa)>,
    outbound: HashMap<P, OutboundSa>,
    events: VecDeque<SaEvent<P>>,
    retired: Totals,
}

impl<P: Clone + Eq + Hash> Default for SaDatabase<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Clone + Eq + Hash> SaDatabase<P> {
    pub fn new() -> Self {
        SaDatabase {
            inbound: HashMap::new(),
            outbound: HashMap::new(),
            events: VecDeque::new(),
            retired: Totals::default(),
        }
    }

    /// Adds an inbound SA. Older inbound SAs of the peer stay valid until removed, so packets
    /// sealed with the old SA still open during a rekey.
    pub fn install_inbound(&mut self, peer: P, sa: InboundSa) -> Result<(), ConfigError> {
        let spi = sa.spi();
        if self.inbound.contains_key(&spi) {
            return Err(ConfigError::SpiInUse { spi });
        }
        if self.inbound_spis(&peer).count() >= MAX_INBOUND_PER_PEER {
            return Err(ConfigError::TooManyInbound {
                max: MAX_INBOUND_PER_PEER,
            });
        }
        self.inbound.insert(spi, (peer, sa));
        Ok(())
    }

    /// Installs the peer's outbound SA; new packets use it at once. Returns the one it replaces
    /// (its counters are kept in [`Self::totals`]).
    pub fn install_outbound(&mut self, peer: P, sa: OutboundSa) -> Option<OutboundSa> {
        let old = self.outbound.insert(peer, sa);
        if let Some(o) = &old {
            self.retired.outbound.add(o.counters());
        }
        old
    }

    pub fn remove_inbound(&mut self, spi: u32) -> Option<(P, InboundSa)> {
        let old = self.inbound.remove(&spi);
        if let Some((_, sa)) = &old {
            self.retired.inbound.add(sa.counters());
        }
        old
    }

    pub fn remove_outbound(&mut self, peer: &P) -> Option<OutboundSa> {
        let old = self.outbound.remove(peer);
        if let Some(o) = &old {
            self.retired.outbound.add(o.counters());
        }
        old
    }

    /// Removes every SA of the peer; returns how many.
    pub fn remove_peer(&mut self, peer: &P) -> usize {
        let spis: Vec<u32> = self.inbound_spis(peer).collect();
        let mut n = 0;
        for spi in spis {
            n += usize::from(self.remove_inbound(spi).is_some());
        }
        n + usize::from(self.remove_outbound(peer).is_some())
    }

    pub fn inbound(&self, spi: u32) -> Option<&InboundSa> {
        self.inbound.get(&spi).map(|(_, sa)| sa)
    }

    pub fn inbound_peer(&self, spi: u32) -> Option<&P> {
        self.inbound.get(&spi).map(|(p, _)| p)
    }

    pub fn outbound(&self, peer: &P) -> Option<&OutboundSa> {
        self.outbound.get(peer)
    }

    /// Direct access for a data path that seals a batch for one peer with a single lookup.
    /// Lifetime signals raised meanwhile are queued by the next [`Self::handle_timeout`].
    pub fn outbound_mut(&mut self, peer: &P) -> Option<&mut OutboundSa> {
        self.outbound.get_mut(peer)
    }

    /// Direct access to an inbound SA; see [`Self::outbound_mut`] for its lifetime signals.
    pub fn inbound_mut(&mut self, spi: u32) -> Option<&mut InboundSa> {
        self.inbound.get_mut(&spi).map(|(_, sa)| sa)
    }

    /// SPIs of the peer's inbound SAs (any order).
    pub fn inbound_spis<'a>(&'a self, peer: &'a P) -> impl Iterator<Item = u32> + 'a {
        self.inbound
            .iter()
            .filter(move |(_, (p, _))| p == peer)
            .map(|(spi, _)| *spi)
    }

    pub fn inbound_len(&self) -> usize {
        self.inbound.len()
    }

    pub fn outbound_len(&self) -> usize {
        self.outbound.len()
    }

    /// Seals with the peer's outbound SA; see [`OutboundSa::seal_in_place`] for the buffer layout.
    pub fn seal_in_place(
        &mut self,
        now: Instant,
        peer: &P,
        next_header: u8,
        buf: &mut [u8],
        payload_len: usize,
    ) -> Result<usize, EspError> {
        let Some(sa) = self.outbound.get_mut(peer) else {
            self.retired.no_outbound_sa += 1;
            return Err(EspError::NoOutboundSa);
        };
        let r = sa.seal_in_place(now, next_header, buf, payload_len);
        if sa.has_signal() {
            drain_signals(
                &mut self.events,
                peer,
                sa.spi(),
                Direction::Outbound,
                || sa.poll_signal(),
            );
        }
        r
    }

    /// Opens an ESP packet (starting at the SPI) with the inbound SA its SPI names.
    pub fn open_in_place(
        &mut self,
        now: Instant,
        buf: &mut [u8],
    ) -> Result<OpenedFrom<P>, EspError> {
        let Some(spi) = peek_spi(buf) else {
            self.retired.truncated += 1;
            return Err(EspError::Truncated { len: buf.len() });
        };
        let Some((peer, sa)) = self.inbound.get_mut(&spi) else {
            self.retired.unknown_spi += 1;
            return Err(EspError::UnknownSpi { spi });
        };
        let r = sa.open_in_place(now, buf);
        if sa.has_signal() {
            drain_signals(&mut self.events, peer, spi, Direction::Inbound, || {
                sa.poll_signal()
            });
        }
        let o = r?;
        Ok(OpenedFrom {
            peer: peer.clone(),
            spi,
            next_header: o.next_header,
            payload: o.payload,
            seq: o.seq,
        })
    }

    /// Checks time lifetimes of every SA; call when [`Self::poll_timeout`] has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (spi, (peer, sa)) in &mut self.inbound {
            sa.handle_timeout(now);
            drain_signals(&mut self.events, peer, *spi, Direction::Inbound, || {
                sa.poll_signal()
            });
        }
        for (peer, sa) in &mut self.outbound {
            sa.handle_timeout(now);
            let spi = sa.spi();
            drain_signals(&mut self.events, peer, spi, Direction::Outbound, || {
                sa.poll_signal()
            });
        }
    }

    /// The earliest time limit of any SA.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let inb = self
            .inbound
            .values()
            .filter_map(|(_, sa)| sa.poll_timeout());
        let outb = self.outbound.values().filter_map(|sa| sa.poll_timeout());
        inb.chain(outb).min()
    }

    /// Lifetime events in the order they happened. Each SA reports at most one `RekeyNeeded`
    /// and one `Expired`, so the queue is bounded by twice the number of SAs ever installed
    /// between polls.
    pub fn poll_event(&mut self) -> Option<SaEvent<P>> {
        self.events.pop_front()
    }

    /// Counters over all current and removed SAs plus database-level drops.
    pub fn totals(&self) -> Totals {
        let mut t = self.retired;
        for (_, sa) in self.inbound.values() {
            t.inbound.add(sa.counters());
        }
        for sa in self.outbound.values() {
            t.outbound.add(sa.counters());
        }
        t
    }
}

fn drain_signals<P: Clone>(
    events: &mut VecDeque<SaEvent<P>>,
    peer: &P,
    spi: u32,
    direction: Direction,
    mut next: impl FnMut() -> Option<SaSignal>,
) {
    while let Some(s) = next() {
        let peer = peer.clone();
        events.push_back(match s {
            SaSignal::RekeyNeeded(limit) => SaEvent::RekeyNeeded {
                peer,
                spi,
                direction,
                limit,
            },
            SaSignal::Expired(limit) => SaEvent::Expired {
                peer,
                spi,
                direction,
                limit,
            },
        });
    }
}
