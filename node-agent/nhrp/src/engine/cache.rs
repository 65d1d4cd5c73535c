//! The NHRP cache: registrations held by an NHS, shortcuts and pending resolutions of a
//! client, negative entries, and the neighbour (peer) table derived from all of them.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;

use super::Event;

/// Kind of a cache entry, as shown by `show nhrp cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheType {
    /// Our own tunnel address or one of our local prefixes.
    Local,
    /// Registered by a client (NHS side).
    Dynamic,
    /// A configured NHS.
    Nhs,
    /// Learned from a Resolution Reply, or a requester we answered.
    Shortcut,
    /// Resolution in progress.
    Incomplete,
    /// Resolution failed; no new attempt until it expires.
    Negative,
}

/// One row of [`super::Snapshot::cache`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CacheEntry {
    #[serde(rename = "type")]
    pub kind: CacheType,
    /// Overlay address of the node that owns `prefix` (the next hop).
    pub proto: IpAddr,
    pub prefix: IpNet,
    pub nbma: Option<IpAddr>,
    /// Seconds until expiry, relative to the latest time given to the engine.
    pub expires_in: Option<u64>,
    /// Shortcut: used since the last refresh.
    pub used: bool,
    /// NHS side: registered with the U bit.
    pub unique: bool,
}

/// Timer identities. Each owner stores its deadline so that it can be rescheduled exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum TimerKey {
    /// Registration retry or refresh for NHS number n.
    Nhs(usize),
    /// Expiry of the registrations of one client (keyed by its tunnel address).
    Binding(IpAddr),
    /// Refresh or expiry of a shortcut.
    Shortcut(IpNet),
    /// Retry of a pending resolution.
    Pending(IpAddr),
    /// Expiry of a negative entry.
    Negative(IpNet),
}

#[derive(Debug, Default)]
pub(crate) struct Timers {
    set: BTreeSet<(Instant, TimerKey)>,
}

impl Timers {
    /// Moves the timer `key` from `*slot` to `at` (None cancels it).
    pub(crate) fn set(&mut self, slot: &mut Option<Instant>, key: TimerKey, at: Option<Instant>) {
        if let Some(old) = slot.take() {
            self.set.remove(&(old, key));
        }
        if let Some(at) = at {
            self.set.insert((at, key));
            *slot = Some(at);
        }
    }

    pub(crate) fn next(&self) -> Option<Instant> {
        self.set.first().map(|(t, _)| *t)
    }

    /// Removes and returns the earliest timer due at `now`. The owner's slot still holds the
    /// deadline; the handler clears or reschedules it.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Instant, TimerKey)> {
        match self.set.first() {
            Some(&(t, _)) if t <= now => self.set.pop_first(),
            _ => None,
        }
    }
}

/// A client's registration at this NHS: its tunnel address plus extra prefixes.
#[derive(Debug, Clone)]
pub(crate) struct Binding {
    /// Where its traffic goes (the observed source of the registration).
    pub nbma: IpAddr,
    /// What it claimed in ar$src_nbma (differs from `nbma` behind NAT).
    pub claimed_nbma: Option<IpAddr>,
    pub unique: bool,
    pub request_id: u32,
    /// Host prefix of the tunnel address first, then the registered prefixes.
    pub prefixes: Vec<IpNet>,
    pub expires: Instant,
    pub deadline: Option<Instant>,
    /// Requesters (proto, NBMA) that were told about this client, so that a change can be
    /// purged at them. Bounded by [`MAX_INFORMED`].
    pub informed: Vec<(IpAddr, IpAddr)>,
}

pub(crate) const MAX_INFORMED: usize = 16;

/// Where a shortcut came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// We resolved it: we refresh it while used.
    Resolved,
    /// We answered the owner's resolution: it refreshes it, we only let it expire.
    Answered,
}

#[derive(Debug, Clone)]
pub(crate) struct Shortcut {
    pub next_hop: IpAddr,
    pub nbma: IpAddr,
    pub origin: Origin,
    pub holding_time: u16,
    pub expires: Instant,
    pub refresh_at: Instant,
    pub refresh_sent: bool,
    pub used: bool,
    /// The address that was resolved (refreshes resolve it again).
    pub target: IpAddr,
    pub deadline: Option<Instant>,
}

#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub request_id: u32,
    pub tries: u32,
    /// Index of the NHS the last attempt went to.
    pub via: Option<usize>,
    /// Set when this resolution refreshes an installed shortcut.
    pub refresh_of: Option<IpNet>,
    pub deadline: Option<Instant>,
}

#[derive(Debug, Clone)]
pub(crate) struct Negative {
    pub expires: Instant,
    pub deadline: Option<Instant>,
}

/// Reasons a neighbour entry exists; PeerDown is emitted when the last one goes.
pub(crate) mod peer_ref {
    pub const NHS: u8 = 1;
    pub const BINDING: u8 = 2;
    pub const SHORTCUT: u8 = 4;
}

#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub nbma: IpAddr,
    pub refs: u8,
    /// Shortcuts (by count) that use this peer as next hop.
    pub shortcuts: u32,
}

/// The neighbour table (overlay address → NBMA) with reference reasons.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    pub map: HashMap<IpAddr, Peer>,
}

impl Peers {
    /// Adds reason `r` for `proto`; emits PeerUp when new or when the NBMA changes.
    pub(crate) fn add(&mut self, proto: IpAddr, nbma: IpAddr, r: u8, ev: &mut VecDeque<Event>) {
        match self.map.get_mut(&proto) {
            Some(p) => {
                p.refs |= r;
                if r == peer_ref::SHORTCUT {
                    p.shortcuts = p.shortcuts.saturating_add(1);
                }
                if p.nbma != nbma {
                    p.nbma = nbma;
                    ev.push_back(Event::PeerUp { proto, nbma });
                }
            }
            None => {
                self.map.insert(
                    proto,
                    Peer {
                        nbma,
                        refs: r,
                        shortcuts: u32::from(r == peer_ref::SHORTCUT),
                    },
                );
                ev.push_back(Event::PeerUp { proto, nbma });
            }
        }
    }

    /// Moves an existing neighbour to another NBMA address (PeerUp with the new one).
    pub(crate) fn set_nbma(&mut self, proto: IpAddr, nbma: IpAddr, ev: &mut VecDeque<Event>) {
        if let Some(p) = self.map.get_mut(&proto)
            && p.nbma != nbma
        {
            p.nbma = nbma;
            ev.push_back(Event::PeerUp { proto, nbma });
        }
    }

    /// Removes reason `r` (one shortcut reference for SHORTCUT); emits PeerDown when none is
    /// left.
    pub(crate) fn remove(&mut self, proto: IpAddr, r: u8, ev: &mut VecDeque<Event>) {
        let Some(p) = self.map.get_mut(&proto) else {
            return;
        };
        if r == peer_ref::SHORTCUT {
            p.shortcuts = p.shortcuts.saturating_sub(1);
            if p.shortcuts == 0 {
                p.refs &= !r;
            }
        } else {
            p.refs &= !r;
        }
        if p.refs == 0 {
            self.map.remove(&proto);
            ev.push_back(Event::PeerDown { proto });
        }
    }

    pub(crate) fn get(&self, proto: &IpAddr) -> Option<IpAddr> {
        self.map.get(proto).map(|p| p.nbma)
    }
}

/// Longest-prefix-match table over a small number of distinct prefix lengths: one hash lookup
/// per length in use, longest first.
#[derive(Debug)]
pub(crate) struct PrefixMap<V> {
    map: HashMap<IpNet, V>,
    /// Number of entries per prefix length (index 0..=128).
    lens: Vec<u32>,
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        PrefixMap {
            map: HashMap::new(),
            lens: vec![0; 129],
        }
    }
}

impl<V> PrefixMap<V> {
    pub(crate) fn insert(&mut self, k: IpNet, v: V) -> Option<V> {
        let old = self.map.insert(k, v);
        if old.is_none()
            && let Some(c) = self.lens.get_mut(usize::from(k.prefix_len()))
        {
            *c += 1;
        }
        old
    }

    pub(crate) fn remove(&mut self, k: &IpNet) -> Option<V> {
        let old = self.map.remove(k);
        if old.is_some()
            && let Some(c) = self.lens.get_mut(usize::from(k.prefix_len()))
        {
            *c = c.saturating_sub(1);
        }
        old
    }

    pub(crate) fn get(&self, k: &IpNet) -> Option<&V> {
        self.map.get(k)
    }

    pub(crate) fn get_mut(&mut self, k: &IpNet) -> Option<&mut V> {
        self.map.get_mut(k)
    }

    /// Longest prefix containing `addr`.
    pub(crate) fn lookup(&self, addr: IpAddr) -> Option<(IpNet, &V)> {
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        for len in (0..=max).rev() {
            if self.lens.get(usize::from(len)).copied().unwrap_or(0) == 0 {
                continue;
            }
            if let Ok(net) = IpNet::new(addr, len) {
                let net = net.trunc();
                if let Some(v) = self.map.get(&net) {
                    return Some((net, v));
                }
            }
        }
        None
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&IpNet, &V)> {
        self.map.iter()
    }

    pub(crate) fn keys(&self) -> Vec<IpNet> {
        self.map.keys().copied().collect()
    }
}

/// Host prefix (/32 or /128) of an address.
pub(crate) fn host(addr: IpAddr) -> IpNet {
    IpNet::from(addr)
}

/// The prefix of `addr` with length `len`, host bits cleared; None when `len` is too long.
pub(crate) fn prefix(addr: IpAddr, len: u8) -> Option<IpNet> {
    IpNet::new(addr, len).ok().map(|n| n.trunc())
}

pub(crate) fn host_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpm_prefers_longest() {
        let mut m = PrefixMap::default();
        m.insert("10.1.0.0/16".parse().unwrap(), 1);
        m.insert("10.1.2.0/24".parse().unwrap(), 2);
        m.insert("10.1.2.3/32".parse().unwrap(), 3);
        assert_eq!(m.lookup("10.1.2.3".parse().unwrap()).map(|x| *x.1), Some(3));
        assert_eq!(m.lookup("10.1.2.4".parse().unwrap()).map(|x| *x.1), Some(2));
        assert_eq!(m.lookup("10.1.3.4".parse().unwrap()).map(|x| *x.1), Some(1));
        assert_eq!(m.lookup("10.2.3.4".parse().unwrap()).map(|x| *x.1), None);
        m.remove(&"10.1.2.0/24".parse().unwrap());
        assert_eq!(m.lookup("10.1.2.4".parse().unwrap()).map(|x| *x.1), Some(1));
    }
}
