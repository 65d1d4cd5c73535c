//! Forwarding and neighbour tables, published as immutable snapshots.
//!
//! The packet path loads the current [`Snapshot`] once per batch (one atomic load through
//! `arc_swap`) and reads it without any lock. Updates are rare (control plane): they copy
//! the current snapshot, change it and publish the new one. Updates are serialised by a
//! mutex held only by writers, so two concurrent updates cannot lose each other.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ipnet::IpNet;

/// Longest-prefix-match table for one address family, keyed by the address as an integer.
///
/// Buckets per prefix length, longest first: a lookup costs one hash probe per distinct
/// prefix length in use (a handful in practice), independent of the number of routes.
#[derive(Debug, Clone, Default)]
struct Lpm<A: Copy + Eq + std::hash::Hash> {
    buckets: Vec<(u8, HashMap<A, IpAddr>)>,
}

trait Bits: Copy + Eq + std::hash::Hash {
    const WIDTH: u8;
    fn mask(self, len: u8) -> Self;
}

impl Bits for u32 {
    const WIDTH: u8 = 32;
    fn mask(self, len: u8) -> Self {
        if len == 0 {
            0
        } else {
            self & (u32::MAX << (32 - u32::from(len.min(32))))
        }
    }
}

impl Bits for u128 {
    const WIDTH: u8 = 128;
    fn mask(self, len: u8) -> Self {
        if len == 0 {
            0
        } else {
            self & (u128::MAX << (128 - u32::from(len.min(128))))
        }
    }
}

impl<A: Bits> Lpm<A> {
    fn build<'a>(routes: impl Iterator<Item = (A, u8, &'a IpAddr)>) -> Self {
        let mut by_len: BTreeMap<u8, HashMap<A, IpAddr>> = BTreeMap::new();
        for (addr, len, nh) in routes {
            by_len
                .entry(len.min(A::WIDTH))
                .or_default()
                .insert(addr.mask(len), *nh);
        }
        Lpm {
            buckets: by_len.into_iter().rev().collect(),
        }
    }

    fn lookup(&self, addr: A) -> Option<IpAddr> {
        self.buckets
            .iter()
            .find_map(|(len, map)| map.get(&addr.mask(*len)).copied())
    }
}

/// Where the data plane sends a packet for an overlay destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Send to this NBMA address; `next_hop` is the overlay neighbour it belongs to.
    Neighbor { next_hop: IpAddr, nbma: IpAddr },
    /// A route matched, but its next hop has no neighbour entry (NBMA unknown).
    NoNeighbor { next_hop: IpAddr },
    /// No route and no neighbour covers the destination.
    NoRoute,
}

/// One immutable state of both tables. Cheap to read, rebuilt on every update.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    routes: BTreeMap<IpNet, IpAddr>,
    neighbors: HashMap<IpAddr, IpAddr>,
    nhs: BTreeSet<IpAddr>,
    v4: Lpm<u32>,
    v6: Lpm<u128>,
}

impl Snapshot {
    fn rebuild(&mut self) {
        self.v4 = Lpm::build(self.routes.iter().filter_map(|(net, nh)| match net {
            IpNet::V4(n) => Some((u32::from(n.network()), n.prefix_len(), nh)),
            IpNet::V6(_) => None,
        }));
        self.v6 = Lpm::build(self.routes.iter().filter_map(|(net, nh)| match net {
            IpNet::V6(n) => Some((u128::from(n.network()), n.prefix_len(), nh)),
            IpNet::V4(_) => None,
        }));
    }

    /// Longest-prefix route for `dst` only (neighbour host routes not considered).
    pub fn route(&self, dst: IpAddr) -> Option<IpAddr> {
        match dst {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }

    /// Resolves `dst` to a neighbour. A neighbour is its own host route (/32 or /128), so it
    /// wins over any configured prefix; otherwise the longest matching prefix gives the
    /// overlay next hop, whose neighbour entry gives the NBMA address.
    pub fn lookup(&self, dst: IpAddr) -> Lookup {
        if let Some(nbma) = self.neighbors.get(&dst) {
            return Lookup::Neighbor {
                next_hop: dst,
                nbma: *nbma,
            };
        }
        match self.route(dst) {
            None => Lookup::NoRoute,
            Some(next_hop) => match self.neighbors.get(&next_hop) {
                Some(nbma) => Lookup::Neighbor {
                    next_hop,
                    nbma: *nbma,
                },
                None => Lookup::NoNeighbor { next_hop },
            },
        }
    }

    /// NBMA address of an overlay neighbour.
    pub fn neighbor(&self, proto: IpAddr) -> Option<IpAddr> {
        self.neighbors.get(&proto).copied()
    }

    /// Whether `proto` is one of the configured next hop servers (hubs).
    pub fn is_nhs(&self, proto: IpAddr) -> bool {
        self.nhs.contains(&proto)
    }

    /// All routes, sorted by prefix.
    pub fn routes(&self) -> Vec<(IpNet, IpAddr)> {
        self.routes.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// All neighbours (overlay address, NBMA address), sorted by overlay address.
    pub fn neighbors(&self) -> Vec<(IpAddr, IpAddr)> {
        let mut v: Vec<_> = self.neighbors.iter().map(|(k, v)| (*k, *v)).collect();
        v.sort();
        v
    }
}

/// The shared tables: lock-free reads, copy-on-write updates.
#[derive(Debug, Default)]
pub struct Tables {
    current: ArcSwap<Snapshot>,
    writer: Mutex<()>,
}

impl Tables {
    /// Empty tables.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current snapshot. The data path calls this once per batch.
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    fn update(&self, f: impl FnOnce(&mut Snapshot) -> bool) {
        // A poisoned lock only means another writer panicked; the snapshot itself is
        // immutable and still consistent, so carry on.
        let _w = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = Snapshot::clone(&self.current.load());
        if f(&mut next) {
            self.current.store(Arc::new(next));
        }
    }

    /// Adds or replaces a neighbour (overlay address → NBMA address).
    pub fn set_neighbor(&self, proto: IpAddr, nbma: IpAddr) {
        self.update(|s| s.neighbors.insert(proto, nbma) != Some(nbma));
    }

    /// Removes a neighbour. Returns nothing: removing an absent entry is not an error.
    pub fn del_neighbor(&self, proto: IpAddr) {
        self.update(|s| s.neighbors.remove(&proto).is_some());
    }

    /// Adds or replaces a route. The prefix is normalised (host bits cleared).
    pub fn set_route(&self, prefix: IpNet, next_hop: IpAddr) {
        let prefix = prefix.trunc();
        self.update(|s| {
            let changed = s.routes.insert(prefix, next_hop) != Some(next_hop);
            if changed {
                s.rebuild();
            }
            changed
        });
    }

    /// Removes a route.
    pub fn del_route(&self, prefix: IpNet) {
        let prefix = prefix.trunc();
        self.update(|s| {
            let changed = s.routes.remove(&prefix).is_some();
            if changed {
                s.rebuild();
            }
            changed
        });
    }

    /// Replaces the set of next hop servers.
    pub fn set_nhs(&self, nhs: &[IpAddr]) {
        self.update(|s| {
            s.nhs = nhs.iter().copied().collect();
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_neighbours_are_host_routes() {
        let t = Tables::new();
        t.set_route(net("10.0.0.0/8"), ip("10.42.0.1"));
        t.set_route(net("10.1.0.0/16"), ip("10.42.0.2"));
        t.set_route(net("10.1.2.0/24"), ip("10.42.0.3"));
        t.set_neighbor(ip("10.42.0.1"), ip("198.51.100.1"));
        t.set_neighbor(ip("10.42.0.3"), ip("198.51.100.3"));
        let s = t.load();
        assert_eq!(
            s.lookup(ip("10.1.2.9")),
            Lookup::Neighbor {
                next_hop: ip("10.42.0.3"),
                nbma: ip("198.51.100.3")
            }
        );
        assert_eq!(
            s.lookup(ip("10.1.9.9")),
            Lookup::NoNeighbor {
                next_hop: ip("10.42.0.2")
            }
        );
        assert_eq!(
            s.lookup(ip("10.9.9.9")),
            Lookup::Neighbor {
                next_hop: ip("10.42.0.1"),
                nbma: ip("198.51.100.1")
            }
        );
        assert_eq!(s.lookup(ip("11.0.0.1")), Lookup::NoRoute);
        // 10.42.0.3 is covered by 10.0.0.0/8 via the hub, but its neighbour entry wins.
        assert_eq!(
            s.lookup(ip("10.42.0.3")),
            Lookup::Neighbor {
                next_hop: ip("10.42.0.3"),
                nbma: ip("198.51.100.3")
            }
        );
    }

    #[test]
    fn updates_publish_new_snapshots_and_old_ones_stay_valid() {
        let t = Tables::new();
        t.set_route(net("10.1.2.77/24"), ip("10.42.0.3"));
        let before = t.load_full_for_test();
        t.del_route(net("10.1.2.0/24"));
        assert_eq!(before.route(ip("10.1.2.1")), Some(ip("10.42.0.3")));
        assert_eq!(t.load().route(ip("10.1.2.1")), None);
        t.set_neighbor(ip("10.42.0.3"), ip("198.51.100.3"));
        t.del_neighbor(ip("10.42.0.3"));
        assert_eq!(t.load().neighbor(ip("10.42.0.3")), None);
        t.set_nhs(&[ip("10.42.0.1")]);
        assert!(t.load().is_nhs(ip("10.42.0.1")));
        assert!(!t.load().is_nhs(ip("10.42.0.2")));
    }

    #[test]
    fn ipv6_and_default_routes() {
        let t = Tables::new();
        t.set_route(net("::/0"), ip("fd00::1"));
        t.set_route(net("fd00:1::/64"), ip("fd00::2"));
        t.set_route(net("0.0.0.0/0"), ip("10.42.0.1"));
        let s = t.load();
        assert_eq!(s.route(ip("fd00:1::5")), Some(ip("fd00::2")));
        assert_eq!(s.route(ip("2001:db8::1")), Some(ip("fd00::1")));
        assert_eq!(s.route(ip("203.0.113.5")), Some(ip("10.42.0.1")));
        assert_eq!(s.routes().len(), 3);
    }

    impl Tables {
        fn load_full_for_test(&self) -> Arc<Snapshot> {
            self.current.load_full()
        }
    }

    proptest! {
        #[test]
        fn lpm_matches_linear_scan(
            routes in proptest::collection::vec((any::<u32>(), 0u8..=32, any::<u8>()), 0..40),
            probes in proptest::collection::vec(any::<u32>(), 1..40),
        ) {
            let t = Tables::new();
            for (a, l, nh) in &routes {
                let n = IpNet::new(IpAddr::V4(Ipv4Addr::from(*a)), *l).unwrap();
                t.set_route(n, IpAddr::V4(Ipv4Addr::new(10, 42, 0, *nh)));
            }
            let s = t.load();
            let table = s.routes();
            for p in probes {
                let dst = IpAddr::V4(Ipv4Addr::from(p));
                let want = table
                    .iter()
                    .filter(|(n, _)| n.contains(&dst))
                    .max_by_key(|(n, _)| n.prefix_len())
                    .map(|(_, nh)| *nh);
                prop_assert_eq!(s.route(dst), want);
            }
        }

        #[test]
        fn lpm_v6_matches_linear_scan(
            routes in proptest::collection::vec((any::<u128>(), 0u8..=128, any::<u8>()), 0..30),
            probes in proptest::collection::vec(any::<u128>(), 1..30),
        ) {
            let t = Tables::new();
            for (a, l, nh) in &routes {
                let n = IpNet::new(IpAddr::V6(Ipv6Addr::from(*a)), *l).unwrap();
                t.set_route(n, IpAddr::V6(Ipv6Addr::from(u128::from(*nh))));
            }
            let s = t.load();
            let table = s.routes();
            for p in probes {
                let dst = IpAddr::V6(Ipv6Addr::from(p));
                let want = table
                    .iter()
                    .filter(|(n, _)| n.contains(&dst))
                    .max_by_key(|(n, _)| n.prefix_len())
                    .map(|(_, nh)| *nh);
                prop_assert_eq!(s.route(dst), want);
            }
        }
    }
}
