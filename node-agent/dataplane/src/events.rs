//! Events from the data plane to the agent, and the per-task helpers that keep them
//! (and the drop logs) from flooding: a time-window deduper and a log-once set.
//!
//! Each packet task owns its own `Deduper`s and `LogOnce`, so the packet path takes no lock.
//! Both are bounded and preallocated: they never grow beyond their capacity.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::counters::DropReason;

/// How many bytes of a hairpinned packet a [`Event::Hairpin`] carries (the start of the
/// inner IP packet, for an NHRP Traffic Indication).
pub const HAIRPIN_HEAD_LEN: usize = 128;

/// Default dedupe window for Hairpin, Miss and Used events.
pub const DEDUPE_WINDOW: Duration = Duration::from_secs(1);

/// Why the data plane asks for resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissReason {
    /// The route's next hop has no NBMA address; the packet was dropped.
    NoNeighbor,
    /// The packet went to a next hop server (hub); a shortcut could be resolved (phase 2).
    /// The packet itself was forwarded to the hub.
    ViaNhs,
}

/// What the data plane reports to the agent (bounded channel, see `start`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// An NHRP packet (GRE protocol 0x2001, key already checked); `bytes` starts at the
    /// NHRP fixed header.
    Nhrp { from_nbma: IpAddr, bytes: Vec<u8> },
    /// Hub: a data packet from spoke `ingress_nbma` was forwarded back into the overlay.
    /// `src`/`dst` are the inner addresses; `head` is the first up to
    /// [`HAIRPIN_HEAD_LEN`] bytes of the inner packet. At most one per (src, dst) per
    /// dedupe window.
    Hairpin {
        src: IpAddr,
        dst: IpAddr,
        ingress_nbma: IpAddr,
        head: Vec<u8>,
    },
    /// A packet from the TUN to `dst` needs resolution: its route's `next_hop` has no
    /// neighbour, or is a next hop server. At most one per dst per dedupe window.
    Miss {
        dst: IpAddr,
        next_hop: IpAddr,
        reason: MissReason,
    },
    /// A packet from the TUN to `dst` went directly to a non-NHS neighbour `next_hop` (a
    /// shortcut is in use). At most one per dst per dedupe window.
    Used { dst: IpAddr, next_hop: IpAddr },
    /// IPsec is required and the peer at `nbma` has no outbound SA: a data packet was
    /// dropped or an NHRP packet queued. The agent starts IKE. At most one per peer per
    /// dedupe window from the packet path.
    NeedSa { nbma: IpAddr },
    /// The first packet authenticated on the inbound SA `spi`: the peer uses it, so it has
    /// the SA's keys (a responder may start sending on the paired outbound SA).
    SaActive { spi: u32 },
    /// An IKE datagram (non-ESP marker included) arrived on the UDP 4500 socket that the
    /// data plane shares with the agent's IKE endpoint.
    Ike {
        from: std::net::SocketAddr,
        local: std::net::SocketAddr,
        payload: Vec<u8>,
    },
}

/// Remembers keys for a time window; `allow` is true for the first sighting per window.
#[derive(Debug)]
pub(crate) struct Deduper<K> {
    seen: HashMap<K, Instant>,
    window: Duration,
    cap: usize,
}

impl<K: Hash + Eq + Copy> Deduper<K> {
    pub(crate) fn new(window: Duration, cap: usize) -> Self {
        Self {
            seen: HashMap::with_capacity(cap),
            window,
            cap: cap.max(1),
        }
    }

    /// True if `key` was not allowed within the last window (and records it now).
    pub(crate) fn allow(&mut self, key: K, now: Instant) -> bool {
        if let Some(t) = self.seen.get_mut(&key) {
            if now.saturating_duration_since(*t) < self.window {
                return false;
            }
            *t = now;
            return true;
        }
        if self.seen.len() >= self.cap {
            let window = self.window;
            self.seen
                .retain(|_, t| now.saturating_duration_since(*t) < window);
            if self.seen.len() >= self.cap {
                // More distinct live flows than the table holds: report new flows at the
                // cost of forgetting old ones, rather than going silent.
                self.seen.clear();
            }
        }
        self.seen.insert(key, now);
        true
    }
}

/// Logs the first drop per (reason, peer) with `tracing::warn`; later ones are only counted.
#[derive(Debug)]
pub(crate) struct LogOnce {
    seen: HashSet<(DropReason, Option<IpAddr>)>,
    cap: usize,
    full_reported: bool,
    task: &'static str,
}

impl LogOnce {
    pub(crate) fn new(task: &'static str, cap: usize) -> Self {
        Self {
            seen: HashSet::with_capacity(cap),
            cap,
            full_reported: false,
            task,
        }
    }

    /// Returns true (and logs) if this is the first occurrence.
    pub(crate) fn drop(
        &mut self,
        reason: DropReason,
        peer: Option<IpAddr>,
        detail: &dyn std::fmt::Display,
    ) -> bool {
        if self.seen.contains(&(reason, peer)) {
            return false;
        }
        if self.seen.len() >= self.cap {
            if !self.full_reported {
                self.full_reported = true;
                tracing::warn!(
                    task = self.task,
                    "more than {} distinct drop sources; further first occurrences are only counted",
                    self.cap
                );
            }
            return false;
        }
        self.seen.insert((reason, peer));
        match peer {
            Some(p) => tracing::warn!(
                task = self.task,
                reason = reason.as_str(),
                peer = %p,
                "dropping packet: {detail} (logged once per reason and peer; see counters)"
            ),
            None => tracing::warn!(
                task = self.task,
                reason = reason.as_str(),
                "dropping packet: {detail} (logged once per reason; see counters)"
            ),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deduper_allows_once_per_window() {
        let t0 = Instant::now();
        let mut d = Deduper::new(Duration::from_secs(1), 4);
        assert!(d.allow(1u32, t0));
        assert!(!d.allow(1, t0 + Duration::from_millis(999)));
        assert!(d.allow(2, t0));
        assert!(d.allow(1, t0 + Duration::from_millis(1000)));
        assert!(!d.allow(1, t0 + Duration::from_millis(1500)));
    }

    #[test]
    fn deduper_stays_bounded() {
        let t0 = Instant::now();
        let mut d = Deduper::new(Duration::from_secs(1), 8);
        for k in 0..100u32 {
            assert!(d.allow(k, t0));
            assert!(d.seen.len() <= 8);
        }
        // Expired entries are reclaimed before anything is forgotten.
        while d.seen.len() < 8 {
            d.allow(d.seen.len() as u32 + 500, t0);
        }
        let t1 = t0 + Duration::from_secs(2);
        assert!(d.allow(1000, t1));
        assert_eq!(d.seen.len(), 1);
    }

    #[test]
    fn log_once_per_reason_and_peer() {
        let mut l = LogOnce::new("test", 2);
        let a: IpAddr = "198.51.100.2".parse().unwrap();
        let b: IpAddr = "198.51.100.3".parse().unwrap();
        assert!(l.drop(DropReason::WrongKey, Some(a), &"x"));
        assert!(!l.drop(DropReason::WrongKey, Some(a), &"x"));
        assert!(l.drop(DropReason::BadGre, Some(a), &"x"));
        // Capacity reached: still counted by the caller, no longer logged.
        assert!(!l.drop(DropReason::WrongKey, Some(b), &"x"));
    }
}
