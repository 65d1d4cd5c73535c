//! Random operation sequences on a simulated network (two hubs, four spokes): whatever happens
//! (resolutions, redirects, traffic, partitions, NBMA changes, cache clears, shutdowns, time
//! jumps), the data-plane view each node builds from its events stays consistent with the
//! engine, and engines never send each other anything the other side cannot decode.

mod sim;

use std::time::Duration;

use dmvpn_nhrp::engine::{DropReason, Event, Phase};
use proptest::prelude::*;
use sim::{Sim, hub_config, ip, ipv4_head, spoke_config};

#[derive(Debug, Clone)]
enum Op {
    Resolve(usize, usize),
    Traffic(usize, usize),
    Hairpin(usize, usize),
    Advance(u64),
    Partition(usize, bool),
    ChangeNbma(usize, u8),
    ClearCache(usize),
    Shutdown(usize),
    RestartHub(bool),
}

const SPOKES: [u8; 4] = [2, 3, 4, 5];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..4usize, 0..4usize).prop_map(|(a, b)| Op::Resolve(a, b)),
        (0..4usize, 0..4usize).prop_map(|(a, b)| Op::Traffic(a, b)),
        (0..4usize, 0..4usize).prop_map(|(a, b)| Op::Hairpin(a, b)),
        (0u64..900).prop_map(Op::Advance),
        (0..6usize, any::<bool>()).prop_map(|(n, c)| Op::Partition(n, c)),
        (0..4usize, 100u8..120).prop_map(|(n, x)| Op::ChangeNbma(n, x)),
        (0..4usize).prop_map(Op::ClearCache),
        (0..4usize).prop_map(Op::Shutdown),
        any::<bool>().prop_map(Op::RestartHub),
    ]
}

fn check(s: &Sim) {
    for (i, node) in s.nodes.iter().enumerate() {
        let dp = &node.dp;
        for (prefix, nh) in &dp.routes {
            assert!(
                dp.peers.contains_key(nh),
                "node {i}: route {prefix} via {nh} has no neighbour; peers {:?}",
                dp.peers
            );
        }
        for (proto, nbma) in &dp.peers {
            assert_eq!(
                node.engine.lookup(*proto),
                Some(*nbma),
                "node {i} neighbour {proto}"
            );
        }
        let c = node.engine.counters();
        assert_eq!(c.dropped(DropReason::DecodeError), 0, "node {i}");
        assert_eq!(c.dropped(DropReason::BadChecksum), 0, "node {i}");
        assert_eq!(c.dropped(DropReason::Loop), 0, "node {i}");
        assert_eq!(c.encode_failures, 0, "node {i}");
        // Applied one by one, the events never leave a route pointing at a missing
        // neighbour, and never remove a neighbour that is not there.
        let mut up = std::collections::HashSet::new();
        let mut routes = std::collections::HashMap::new();
        for (_, e) in &node.events {
            match e {
                Event::PeerUp { proto, .. } => {
                    up.insert(*proto);
                }
                Event::PeerDown { proto } => {
                    assert!(
                        up.remove(proto),
                        "node {i}: PeerDown {proto} without PeerUp"
                    );
                    assert!(
                        !routes.values().any(|nh| nh == proto),
                        "node {i}: PeerDown {proto} while routes use it: {routes:?}"
                    );
                }
                Event::RouteAdd { prefix, next_hop } => {
                    assert!(
                        up.contains(next_hop),
                        "node {i}: RouteAdd {prefix} via unknown {next_hop}"
                    );
                    routes.insert(*prefix, *next_hop);
                }
                Event::RouteDel { prefix } => {
                    routes.remove(prefix);
                }
                _ => {}
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_every_node_consistent(ops in proptest::collection::vec(op(), 1..40)) {
        let mut s = Sim::new();
        let h1 = s.add(hub_config(1));
        let h2 = s.add(hub_config(250));
        let mut spokes = Vec::new();
        for (k, n) in SPOKES.iter().enumerate() {
            let mut c = spoke_config(*n, if k % 2 == 0 { &[1, 250] } else { &[1] });
            c.phase = Phase::Three;
            spokes.push(s.add(c));
        }
        let nodes = [h1, h2, spokes[0], spokes[1], spokes[2], spokes[3]];
        s.run_for(Duration::from_secs(1));
        check(&s);
        for op in ops {
            match op {
                Op::Resolve(a, b) => {
                    let dst = ip(&format!("10.100.{}.9", SPOKES[b]));
                    s.with(spokes[a], |e, now| e.resolve(now, dst));
                }
                Op::Traffic(a, b) => {
                    let dst = ip(&format!("10.100.{}.9", SPOKES[b]));
                    s.with(spokes[a], |e, now| e.traffic(now, dst));
                }
                Op::Hairpin(a, b) => {
                    let (src, dst) = (format!("10.100.{}.1", SPOKES[a]), format!("10.100.{}.1", SPOKES[b]));
                    let ingress = s.nodes[spokes[a]].nbma;
                    let head = ipv4_head(&src, &dst);
                    s.with(h1, |e, now| e.hairpinned(now, ip(&src), ip(&dst), ingress, &head));
                }
                Op::Advance(t) => s.run_for(Duration::from_secs(t)),
                Op::Partition(n, cut) => s.partition(nodes[n], cut),
                // distinct per spoke: two nodes never share an underlay address
                Op::ChangeNbma(a, x) => {
                    let addr = format!("203.0.113.{}", 100 + 10 * a as u8 + x % 10);
                    s.change_nbma(spokes[a], ip(&addr));
                }
                Op::ClearCache(a) => s.with(spokes[a], |e, now| e.clear_cache(now)),
                Op::Shutdown(a) => s.with(spokes[a], |e, now| e.shutdown(now)),
                Op::RestartHub(first) => {
                    let (h, n) = if first { (h1, 1) } else { (h2, 250) };
                    s.restart(h, hub_config(n));
                }
            }
            s.run_for(Duration::from_millis(50));
            check(&s);
        }
        // Heal the network: within one holding time every live spoke is registered at its
        // hubs under its current address and sees them up; shut-down spokes are gone.
        for n in nodes {
            s.partition(n, false);
        }
        s.run_for(Duration::from_secs(700));
        check(&s);
        for (k, &i) in spokes.iter().enumerate() {
            let proto = ip(&format!("10.42.0.{}", SPOKES[k]));
            let hubs: &[usize] = if k % 2 == 0 { &[h1, h2] } else { &[h1] };
            if s.engine(i).snapshot().shut_down {
                prop_assert!(s.dp(i).peers.is_empty() && s.dp(i).routes.is_empty());
                for &h in hubs {
                    prop_assert_eq!(s.engine(h).lookup(proto), None);
                }
            } else {
                for &h in hubs {
                    prop_assert_eq!(s.engine(h).lookup(proto), Some(s.nodes[i].nbma));
                }
                let snap = s.engine(i).snapshot();
                prop_assert!(snap.nhs.iter().all(|n| n.state == dmvpn_nhrp::engine::NhsState::Up && n.registered));
            }
        }
    }
}
