//! Two-layer route table between the engine's route events and the data plane.
//!
//! The engine points its "routes via NHS" (the tunnel network, `overlay_routes`) at the
//! preferred NHS, and installs shortcuts with whatever prefix the responder answered. When a
//! shortcut has exactly the prefix of a route via NHS, its RouteAdd replaces that route and
//! its RouteDel would leave no route at all, cutting the prefix off until the NHS changes.
//! So routes via NHS live in a base layer and everything else on top: the data plane gets
//! the top entry if there is one, else the base entry.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

/// What the data plane must be told after a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteChange {
    Set(IpNet, IpAddr),
    Del(IpNet),
    Unchanged,
}

#[derive(Debug, Clone, Default)]
pub struct RouteLayers {
    /// Prefixes the engine routes via the preferred NHS.
    via_nhs: BTreeSet<IpNet>,
    /// Overlay addresses of the configured NHSs.
    nhs: BTreeSet<IpAddr>,
    base: BTreeMap<IpNet, IpAddr>,
    top: BTreeMap<IpNet, IpAddr>,
}

impl RouteLayers {
    pub fn new(
        via_nhs: impl IntoIterator<Item = IpNet>,
        nhs: impl IntoIterator<Item = IpAddr>,
    ) -> Self {
        RouteLayers {
            via_nhs: via_nhs.into_iter().collect(),
            nhs: nhs.into_iter().collect(),
            base: BTreeMap::new(),
            top: BTreeMap::new(),
        }
    }

    /// The route the data plane should have for `prefix`.
    pub fn effective(&self, prefix: &IpNet) -> Option<IpAddr> {
        self.top
            .get(prefix)
            .or_else(|| self.base.get(prefix))
            .copied()
    }

    /// The NHS a route via NHS currently points to (ignoring shortcuts on top).
    pub fn base(&self, prefix: &IpNet) -> Option<IpAddr> {
        self.base.get(prefix).copied()
    }

    fn change(&self, prefix: IpNet, before: Option<IpAddr>) -> RouteChange {
        match (before, self.effective(&prefix)) {
            (b, Some(a)) if b != Some(a) => RouteChange::Set(prefix, a),
            (Some(_), None) => RouteChange::Del(prefix),
            _ => RouteChange::Unchanged,
        }
    }

    /// An engine RouteAdd.
    pub fn add(&mut self, prefix: IpNet, next_hop: IpAddr) -> RouteChange {
        let before = self.effective(&prefix);
        if self.via_nhs.contains(&prefix) && self.nhs.contains(&next_hop) {
            self.base.insert(prefix, next_hop);
        } else {
            self.top.insert(prefix, next_hop);
        }
        self.change(prefix, before)
    }

    /// An engine RouteDel: removes the top entry if there is one (a shortcut ending), else the
    /// base entry.
    pub fn del(&mut self, prefix: IpNet) -> RouteChange {
        let before = self.effective(&prefix);
        if self.top.remove(&prefix).is_none() {
            self.base.remove(&prefix);
        }
        self.change(prefix, before)
    }

    /// Every effective route, for re-programming a new data plane.
    pub fn effective_all(&self) -> BTreeMap<IpNet, IpAddr> {
        let mut all = self.base.clone();
        all.extend(self.top.iter().map(|(k, v)| (*k, *v)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn layers() -> RouteLayers {
        RouteLayers::new(
            [net("10.42.0.0/24"), net("10.102.0.0/24")],
            [ip("10.42.0.1"), ip("10.42.0.254")],
        )
    }

    #[test]
    fn shortcut_with_the_prefix_of_a_route_via_nhs_falls_back_to_the_nhs() {
        let mut r = layers();
        let p = net("10.102.0.0/24");
        assert_eq!(
            r.add(p, ip("10.42.0.1")),
            RouteChange::Set(p, ip("10.42.0.1"))
        );
        assert_eq!(
            r.add(p, ip("10.42.0.12")),
            RouteChange::Set(p, ip("10.42.0.12"))
        );
        // NHS fail-over while the shortcut is up: the shortcut stays in force.
        assert_eq!(r.add(p, ip("10.42.0.254")), RouteChange::Unchanged);
        assert_eq!(r.effective(&p), Some(ip("10.42.0.12")));
        assert_eq!(r.base(&p), Some(ip("10.42.0.254")));
        // The shortcut ends: back to the (new) NHS, not to nothing.
        assert_eq!(r.del(p), RouteChange::Set(p, ip("10.42.0.254")));
        // Shutdown withdraws the route via NHS too.
        assert_eq!(r.del(p), RouteChange::Del(p));
        assert_eq!(r.del(p), RouteChange::Unchanged);
    }

    #[test]
    fn other_prefixes_are_plain() {
        let mut r = layers();
        let p = net("10.103.0.0/24");
        assert_eq!(
            r.add(p, ip("10.42.0.13")),
            RouteChange::Set(p, ip("10.42.0.13"))
        );
        assert_eq!(r.add(p, ip("10.42.0.13")), RouteChange::Unchanged);
        assert_eq!(r.del(p), RouteChange::Del(p));
        // A registered spoke's prefix on a hub whose next hop happens to be an NHS address
        // but is not a route via NHS stays in the top layer.
        let q = net("10.200.0.0/24");
        assert_eq!(
            r.add(q, ip("10.42.0.1")),
            RouteChange::Set(q, ip("10.42.0.1"))
        );
        assert_eq!(r.base(&q), None);
    }

    #[test]
    fn effective_all_prefers_the_top_layer() {
        let mut r = layers();
        r.add(net("10.42.0.0/24"), ip("10.42.0.1"));
        r.add(net("10.102.0.0/24"), ip("10.42.0.1"));
        r.add(net("10.102.0.0/24"), ip("10.42.0.12"));
        r.add(net("10.103.0.0/24"), ip("10.42.0.13"));
        let all = r.effective_all();
        assert_eq!(all.len(), 3);
        assert_eq!(all[&net("10.102.0.0/24")], ip("10.42.0.12"));
        assert_eq!(all[&net("10.42.0.0/24")], ip("10.42.0.1"));
    }
}
