//! Resolution: phase 2 (data-driven), phase 3 (redirect), shortcut lifetime, multi-hub.

mod sim;

use std::time::Duration;

use dmvpn_nhrp::engine::{CacheType, DropReason, Event, NhsConfig, NhsState, Phase};
use dmvpn_nhrp::wire::{ExtensionBody, Op, cie_code};
use sim::{Sim, hub_config, ip, ipv4_head, net, spoke_config};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn phase(mut c: dmvpn_nhrp::engine::Config, p: Phase) -> dmvpn_nhrp::engine::Config {
    c.phase = p;
    c
}

/// hub 1, spokes 2 and 3, all registered.
fn topology(p: Phase) -> (Sim, usize, usize, usize) {
    let mut s = Sim::new();
    let hub = s.add(phase(hub_config(1), p));
    let a = s.add(phase(spoke_config(2, &[1]), p));
    let b = s.add(phase(spoke_config(3, &[1]), p));
    s.run_for(secs(1));
    for i in [hub, a, b] {
        s.clear_log(i);
    }
    (s, hub, a, b)
}

#[test]
fn phase2_resolution_via_hub_reply_direct() {
    let (mut s, hub, a, b) = topology(Phase::Two);
    s.with(a, |e, now| e.resolve(now, ip("10.100.3.5")));
    // pending until the reply comes
    assert!(
        s.engine(a)
            .snapshot()
            .cache
            .iter()
            .any(|e| e.kind == CacheType::Incomplete && e.proto == ip("10.100.3.5"))
    );
    s.run_for(secs(1));

    // spoke a -> hub -> spoke b
    let (_, to, _) = s.sent_ops(a, Op::ResolutionRequest)[0];
    assert_eq!(*to, ip("198.51.100.1"));
    let (_, to, fwd) = s.sent_ops(hub, Op::ResolutionRequest)[0];
    assert_eq!(*to, ip("203.0.113.3"), "hub forwards to the owner");
    assert_eq!(fwd.header.hop_count, 15, "hop count decremented");
    assert!(fwd.extensions.iter().any(|e| matches!(
        &e.body,
        ExtensionBody::ForwardTransitNhs(c) if c.len() == 1 && c[0].client_proto == Some(ip("10.42.0.1"))
    )));
    // b replies directly to a's NBMA address
    let (_, to, rep) = s.sent_ops(b, Op::ResolutionReply)[0];
    assert_eq!(*to, ip("203.0.113.2"));
    let c = &rep.mandatory().unwrap().cies[0];
    assert_eq!((c.code, c.prefix_len), (cie_code::SUCCESS, 24));
    assert!(s.sent_ops(hub, Op::ResolutionReply).is_empty());

    // both sides have the shortcut
    assert_eq!(
        s.dp(a).routes.get(&net("10.100.3.0/24")),
        Some(&ip("10.42.0.3"))
    );
    assert_eq!(
        s.dp(a).peers.get(&ip("10.42.0.3")),
        Some(&ip("203.0.113.3"))
    );
    assert_eq!(s.engine(a).lookup(ip("10.42.0.3")), Some(ip("203.0.113.3")));
    assert_eq!(
        s.dp(b).peers.get(&ip("10.42.0.2")),
        Some(&ip("203.0.113.2"))
    );
    assert_eq!(
        s.dp(b).routes.get(&net("10.42.0.2/32")),
        Some(&ip("10.42.0.2"))
    );
    assert!(s.events(a).any(|e| *e
        == Event::RouteAdd {
            prefix: net("10.100.3.0/24"),
            next_hop: ip("10.42.0.3")
        }));
    assert!(s.events(b).any(|e| *e
        == Event::PeerUp {
            proto: ip("10.42.0.2"),
            nbma: ip("203.0.113.2")
        }));

    // resolved: a second resolve() for the same /24 sends nothing
    s.clear_log(a);
    s.with(a, |e, now| e.resolve(now, ip("10.100.3.77")));
    assert!(s.sent_ops(a, Op::ResolutionRequest).is_empty());
    // the hub itself is never resolved
    s.with(a, |e, now| e.resolve(now, ip("10.42.0.1")));
    assert!(s.sent_ops(a, Op::ResolutionRequest).is_empty());
}

#[test]
fn resolution_of_a_spoke_tunnel_address_gives_a_host_route() {
    let (mut s, _hub, a, _b) = topology(Phase::Two);
    s.with(a, |e, now| e.resolve(now, ip("10.42.0.3")));
    s.run_for(secs(1));
    assert_eq!(
        s.dp(a).routes.get(&net("10.42.0.3/32")),
        Some(&ip("10.42.0.3"))
    );
}

#[test]
fn phase1_spoke_does_not_resolve() {
    let (mut s, _hub, a, _b) = topology(Phase::One);
    s.with(a, |e, now| e.resolve(now, ip("10.100.3.5")));
    assert!(s.sent_ops(a, Op::ResolutionRequest).is_empty());
}

#[test]
fn unknown_destination_gets_a_negative_entry() {
    let (mut s, hub, a, _b) = topology(Phase::Two);
    s.with(a, |e, now| e.resolve(now, ip("10.200.0.1")));
    s.run_for(secs(1));
    let (_, _, rep) = s.sent_ops(hub, Op::ResolutionReply)[0];
    assert_eq!(rep.mandatory().unwrap().cies[0].code, cie_code::NO_BINDING);
    let snap = s.engine(a).snapshot();
    assert!(
        snap.cache
            .iter()
            .any(|e| e.kind == CacheType::Negative && e.prefix == net("10.200.0.1/32"))
    );
    assert_eq!(snap.counters.resolutions_failed, 1);
    assert!(!s.dp(a).routes.contains_key(&net("10.200.0.1/32")));
    // suppressed while negative, retried after it expires (30 s)
    s.clear_log(a);
    s.with(a, |e, now| e.resolve(now, ip("10.200.0.1")));
    assert!(s.sent_ops(a, Op::ResolutionRequest).is_empty());
    s.run_for(secs(31));
    s.with(a, |e, now| e.resolve(now, ip("10.200.0.1")));
    assert_eq!(s.sent_ops(a, Op::ResolutionRequest).len(), 1);
}

#[test]
fn phase3_redirect_rate_limited_then_shortcut_both_sides() {
    let (mut s, hub, a, b) = topology(Phase::Three);
    let head = ipv4_head("10.100.2.5", "10.100.3.5");
    s.with(hub, |e, now| {
        e.hairpinned(
            now,
            ip("10.100.2.5"),
            ip("10.100.3.5"),
            ip("203.0.113.2"),
            &head,
        )
    });
    // a second hairpinned packet of the same flow inside the window: no second TI
    s.with(hub, |e, now| {
        e.hairpinned(
            now,
            ip("10.100.2.5"),
            ip("10.100.3.5"),
            ip("203.0.113.2"),
            &head,
        )
    });
    assert_eq!(s.sent_ops(hub, Op::TrafficIndication).len(), 1);
    assert_eq!(s.engine(hub).counters().dropped(DropReason::RateLimited), 1);
    let (_, to, ti) = s.sent_ops(hub, Op::TrafficIndication)[0];
    assert_eq!(*to, ip("203.0.113.2"));
    assert!(ti.header.hop_count >= 1);
    let m = ti.mandatory().unwrap();
    assert_eq!(
        m.dst_proto,
        Some(ip("10.100.2.5")),
        "TI names the source of the packet"
    );
    assert_eq!(m.payload, head);

    s.run_for(secs(1));
    // TI, request, forwarded request, reply: the shortcut is there after four one-way
    // network delays, with no timer on the path.
    let ti_at = s.sent_ops(hub, Op::TrafficIndication)[0].0;
    let (added_at, _) = s.nodes[a]
        .events
        .iter()
        .find(
            |(_, e)| matches!(e, Event::RouteAdd { prefix, .. } if *prefix == net("10.100.3.0/24")),
        )
        .unwrap();
    assert_eq!(added_at.duration_since(ti_at), sim::LATENCY * 4);
    // a resolved the destination of the redirected packet
    let (_, _, rq) = s.sent_ops(a, Op::ResolutionRequest)[0];
    assert_eq!(rq.mandatory().unwrap().dst_proto, Some(ip("10.100.3.5")));
    assert_eq!(
        s.dp(a).routes.get(&net("10.100.3.0/24")),
        Some(&ip("10.42.0.3"))
    );
    assert_eq!(
        s.dp(a).peers.get(&ip("10.42.0.3")),
        Some(&ip("203.0.113.3"))
    );
    assert!(s.events(a).any(|e| *e
        == Event::PeerUp {
            proto: ip("10.42.0.3"),
            nbma: ip("203.0.113.3")
        }));
    assert!(s.events(b).any(|e| *e
        == Event::PeerUp {
            proto: ip("10.42.0.2"),
            nbma: ip("203.0.113.2")
        }));
    assert!(
        s.events(b)
            .any(|e| matches!(e, Event::RouteAdd { next_hop, .. } if *next_hop == ip("10.42.0.2")))
    );

    // the reverse direction redirected too: b resolves a's LAN
    let head = ipv4_head("10.100.3.5", "10.100.2.5");
    s.with(hub, |e, now| {
        e.hairpinned(
            now,
            ip("10.100.3.5"),
            ip("10.100.2.5"),
            ip("203.0.113.3"),
            &head,
        )
    });
    s.run_for(secs(1));
    assert_eq!(
        s.dp(b).routes.get(&net("10.100.2.0/24")),
        Some(&ip("10.42.0.2"))
    );

    // once the window has passed the same flow may be redirected again
    s.clear_log(hub);
    s.run_for(secs(10));
    let head = ipv4_head("10.100.2.5", "10.100.3.5");
    s.with(hub, |e, now| {
        e.hairpinned(
            now,
            ip("10.100.2.5"),
            ip("10.100.3.5"),
            ip("203.0.113.2"),
            &head,
        )
    });
    assert_eq!(s.sent_ops(hub, Op::TrafficIndication).len(), 1);
    // but a already has the shortcut: it does not resolve again
    s.clear_log(a);
    s.run_for(secs(1));
    assert!(s.sent_ops(a, Op::ResolutionRequest).is_empty());
}

#[test]
fn shortcut_refreshed_while_used_and_expires_when_idle() {
    let (mut s, _hub, a, b) = topology(Phase::Two);
    // holdtime 600 at b: a's shortcut is refreshed at 400 s when used
    s.with(a, |e, now| e.resolve(now, ip("10.100.3.5")));
    s.run_for(secs(1));
    assert!(s.dp(a).routes.contains_key(&net("10.100.3.0/24")));
    for _ in 0..20 {
        s.run_for(secs(60));
        s.with(a, |e, now| e.traffic(now, ip("10.100.3.9")));
    }
    // 1200 s later, still there: refreshed (each refresh is a new Resolution Request)
    assert!(s.dp(a).routes.contains_key(&net("10.100.3.0/24")));
    let n = s.sent_ops(a, Op::ResolutionRequest).len();
    assert!((3..=4).contains(&n), "{n} resolution requests");
    assert!(!s.events(a).any(|e| matches!(e, Event::RouteDel { .. })));
    // b's reverse entry is kept alive by those refreshes too
    assert!(s.dp(b).peers.contains_key(&ip("10.42.0.2")));

    // idle: the last use still earns one refresh, then it is gone
    s.clear_log(a);
    s.run_for(secs(1201));
    assert!(!s.dp(a).routes.contains_key(&net("10.100.3.0/24")));
    assert!(!s.dp(a).peers.contains_key(&ip("10.42.0.3")));
    assert!(s.events(a).any(|e| *e
        == Event::RouteDel {
            prefix: net("10.100.3.0/24")
        }));
    assert!(s.events(a).any(|e| *e
        == Event::PeerDown {
            proto: ip("10.42.0.3")
        }));
    assert!(s.dp(a).peers.contains_key(&ip("10.42.0.1")), "NHS stays");
    assert!(
        !s.dp(b).peers.contains_key(&ip("10.42.0.2")),
        "reverse entry expired too"
    );
}

#[test]
fn two_hubs_one_failing() {
    let mut s = Sim::new();
    let h1 = s.add(hub_config(1));
    let h2 = s.add(hub_config(250));
    let mut c = spoke_config(2, &[1, 250]);
    c.nhs[0].priority = 0; // hub 1 preferred
    c.nhs[1].priority = 10;
    c.phase = Phase::Two;
    s.partition(h1, true);
    let a = s.add(c);
    let mut c3 = spoke_config(3, &[250]);
    c3.phase = Phase::Two;
    let b = s.add(c3);
    s.run_for(secs(10));

    let evs: Vec<&Event> = s.events(a).collect();
    assert!(evs.contains(&&Event::NhsDown {
        proto: ip("10.42.0.1")
    }));
    assert!(evs.contains(&&Event::NhsUp {
        proto: ip("10.42.0.250")
    }));
    assert!(!evs.contains(&&Event::NhsDown {
        proto: ip("10.42.0.250")
    }));
    let snap = s.engine(a).snapshot();
    let st: Vec<(std::net::IpAddr, NhsState)> =
        snap.nhs.iter().map(|n| (n.proto, n.state)).collect();
    assert_eq!(
        st,
        vec![
            (ip("10.42.0.1"), NhsState::Down),
            (ip("10.42.0.250"), NhsState::Up)
        ]
    );
    assert_eq!(snap.nhs[0].consecutive_timeouts, 3);
    // traffic without a shortcut goes via the hub that is up
    assert_eq!(
        s.dp(a).routes.get(&net("10.42.0.0/24")),
        Some(&ip("10.42.0.250"))
    );
    assert_eq!(s.engine(h2).registered_clients(), 2);

    // resolution goes to the up hub and succeeds
    s.clear_log(a);
    s.with(a, |e, now| e.resolve(now, ip("10.100.3.1")));
    let (_, to, _) = s.sent_ops(a, Op::ResolutionRequest)[0];
    assert_eq!(*to, ip("198.51.100.250"));
    s.run_for(secs(1));
    assert_eq!(
        s.dp(a).routes.get(&net("10.100.3.0/24")),
        Some(&ip("10.42.0.3"))
    );
    let _ = b;

    // hub 1 comes back: the spoke's probe finds it, it is preferred again
    s.partition(h1, false);
    s.run_for(secs(70));
    assert!(s.events(a).any(|e| *e
        == Event::NhsUp {
            proto: ip("10.42.0.1")
        }));
    assert_eq!(
        s.dp(a).routes.get(&net("10.42.0.0/24")),
        Some(&ip("10.42.0.1"))
    );
}

#[test]
fn resolution_retries_then_fails_over_to_another_hub() {
    let mut s = Sim::new();
    let h1 = s.add(hub_config(1));
    let _h2 = s.add(hub_config(250));
    let mut c = spoke_config(2, &[1, 250]);
    c.nhs[1].priority = 10;
    c.phase = Phase::Two;
    let a = s.add(c);
    let mut c3 = spoke_config(3, &[250]);
    c3.phase = Phase::Two;
    let _b = s.add(c3);
    s.run_for(secs(1));
    // hub 1 dies just before the resolution
    s.partition(h1, true);
    s.clear_log(a);
    s.with(a, |e, now| e.resolve(now, ip("10.100.3.1")));
    s.run_for(secs(30));
    let dsts: Vec<_> = s
        .sent_ops(a, Op::ResolutionRequest)
        .iter()
        .map(|(_, d, _)| *d)
        .collect();
    assert_eq!(dsts[0], ip("198.51.100.1"));
    assert!(dsts.contains(&ip("198.51.100.250")), "{dsts:?}");
    let ids: Vec<u32> = s
        .sent_ops(a, Op::ResolutionRequest)
        .iter()
        .map(|(_, _, p)| p.mandatory().unwrap().request_id)
        .collect();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "retries reuse the request id"
    );
    assert_eq!(
        s.dp(a).routes.get(&net("10.100.3.0/24")),
        Some(&ip("10.42.0.3"))
    );
}

#[test]
fn hub_answers_for_clients_when_configured() {
    let mut s = Sim::new();
    let mut hc = hub_config(1);
    hc.answer_for_clients = true;
    let hub = s.add(hc);
    let a = s.add(spoke_config(2, &[1]));
    let b = s.add(spoke_config(3, &[1]));
    s.run_for(secs(1));
    s.with(a, |e, now| e.resolve(now, ip("10.100.3.5")));
    s.run_for(secs(1));
    assert!(
        s.sent_ops(hub, Op::ResolutionRequest).is_empty(),
        "not forwarded"
    );
    let (_, to, rep) = s.sent_ops(hub, Op::ResolutionReply)[0];
    assert_eq!(*to, ip("203.0.113.2"));
    let c = &rep.mandatory().unwrap().cies[0];
    assert_eq!(c.prefix_len, 24, "registered prefix length");
    assert_eq!(c.client_nbma, Some(ip("203.0.113.3")));
    assert_eq!(
        s.dp(a).routes.get(&net("10.100.3.0/24")),
        Some(&ip("10.42.0.3"))
    );
    assert_eq!(
        s.dp(a).peers.get(&ip("10.42.0.3")),
        Some(&ip("203.0.113.3"))
    );
    let _ = b;
}

#[test]
fn hub_purges_requesters_when_a_client_moves() {
    let (mut s, hub, a, b) = topology(Phase::Two);
    s.with(a, |e, now| e.resolve(now, ip("10.100.3.5")));
    s.run_for(secs(1));
    assert_eq!(
        s.dp(a).peers.get(&ip("10.42.0.3")),
        Some(&ip("203.0.113.3"))
    );
    // b's address changes: the hub tells a, which drops its stale shortcut
    s.change_nbma(b, ip("203.0.113.33"));
    s.run_for(secs(1));
    assert_eq!(
        s.engine(hub).lookup(ip("10.42.0.3")),
        Some(ip("203.0.113.33"))
    );
    assert!(!s.received_ops(a, Op::PurgeRequest).is_empty());
    assert!(!s.dp(a).routes.contains_key(&net("10.100.3.0/24")));
    assert!(!s.dp(a).peers.contains_key(&ip("10.42.0.3")));
}

#[test]
fn clear_cache_withdraws_shortcuts_only() {
    let (mut s, _hub, a, _b) = topology(Phase::Two);
    s.with(a, |e, now| e.resolve(now, ip("10.100.3.5")));
    s.run_for(secs(1));
    s.clear_log(a);
    s.with(a, |e, now| e.clear_cache(now));
    assert!(s.events(a).any(|e| *e
        == Event::RouteDel {
            prefix: net("10.100.3.0/24")
        }));
    assert!(!s.dp(a).routes.contains_key(&net("10.100.3.0/24")));
    assert!(s.dp(a).peers.contains_key(&ip("10.42.0.1")));
    assert_eq!(s.engine(a).snapshot().nhs[0].state, NhsState::Up);
    let _ = NhsConfig {
        tunnel_address: ip("10.42.0.1"),
        nbma_address: ip("198.51.100.1"),
        priority: 0,
    };
}

#[test]
fn hub_hierarchy_forwards_unknown_destinations_upstream() {
    let mut s = Sim::new();
    // upstream hub U (.250); regional hub R (.1) registers to U; spoke a under R, spoke c
    // under U.
    let u = s.add(phase(hub_config(250), Phase::Two));
    let mut rc = phase(hub_config(1), Phase::Two);
    rc.nhs = vec![NhsConfig {
        tunnel_address: ip("10.42.0.250"),
        nbma_address: ip("198.51.100.250"),
        priority: 0,
    }];
    let r = s.add(rc);
    let a = s.add(phase(spoke_config(2, &[1]), Phase::Two));
    let c = s.add(phase(spoke_config(7, &[250]), Phase::Two));
    s.run_for(secs(1));
    assert_eq!(
        s.engine(u).lookup(ip("10.42.0.1")),
        Some(ip("198.51.100.1"))
    );
    assert!(s.events(r).any(|e| *e
        == Event::NhsUp {
            proto: ip("10.42.0.250")
        }));

    s.with(a, |e, now| e.resolve(now, ip("10.100.7.9")));
    s.run_for(secs(1));
    let (_, to, fwd) = s.sent_ops(r, Op::ResolutionRequest)[0];
    assert_eq!(*to, ip("198.51.100.250"), "regional hub forwards upstream");
    assert_eq!(fwd.header.hop_count, 15);
    let (_, to, fwd2) = s.sent_ops(u, Op::ResolutionRequest)[0];
    assert_eq!(*to, ip("203.0.113.7"));
    assert_eq!(fwd2.header.hop_count, 14);
    let transit: Vec<_> = fwd2
        .extensions
        .iter()
        .find_map(|e| match &e.body {
            ExtensionBody::ForwardTransitNhs(c) => {
                Some(c.iter().map(|c| c.client_proto).collect::<Vec<_>>())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(
        transit,
        vec![Some(ip("10.42.0.1")), Some(ip("10.42.0.250"))]
    );
    let (_, to, _) = s.sent_ops(c, Op::ResolutionReply)[0];
    assert_eq!(*to, ip("203.0.113.2"), "answered straight to the requester");
    assert_eq!(
        s.dp(a).routes.get(&net("10.100.7.0/24")),
        Some(&ip("10.42.0.7"))
    );
    assert_eq!(
        s.dp(a).peers.get(&ip("10.42.0.7")),
        Some(&ip("203.0.113.7"))
    );
}

#[test]
fn hub_relays_a_reply_back_to_its_client() {
    let (mut s, hub, a, _b) = topology(Phase::Two);
    // a asks; the reply is then sent (by some responder) to the hub instead of to a
    s.with(a, |e, now| e.resolve(now, ip("10.100.3.5")));
    let rq = s.sent_ops(a, Op::ResolutionRequest)[0].2.clone();
    let m = rq.mandatory().unwrap();
    let reply = dmvpn_nhrp::wire::Packet {
        header: dmvpn_nhrp::wire::Header::ipv4(Op::ResolutionReply, 8),
        body: dmvpn_nhrp::wire::Body::Mandatory(dmvpn_nhrp::wire::Mandatory {
            cies: vec![dmvpn_nhrp::wire::Cie {
                prefix_len: 24,
                holding_time: 300,
                client_nbma: Some(ip("203.0.113.3")),
                client_proto: Some(ip("10.42.0.3")),
                ..Default::default()
            }],
            ..m.clone()
        }),
        extensions: vec![dmvpn_nhrp::wire::Extension::end()],
    };
    s.clear_log(hub);
    s.inject(hub, ip("198.51.100.77"), &reply.to_bytes().unwrap());
    let (_, to, relayed) = s.sent_ops(hub, Op::ResolutionReply)[0];
    assert_eq!(*to, ip("203.0.113.2"));
    assert_eq!(relayed.header.hop_count, 7);
    assert!(relayed.extensions.iter().any(|e| matches!(
        &e.body,
        ExtensionBody::ReverseTransitNhs(c) if c.iter().any(|c| c.client_proto == Some(ip("10.42.0.1")))
    )));
    s.run_for(secs(1));
    assert_eq!(
        s.dp(a).routes.get(&net("10.100.3.0/24")),
        Some(&ip("10.42.0.3"))
    );
    // relayed by an NHS: the CIE's NBMA address is used, not the relay's
    assert_eq!(
        s.dp(a).peers.get(&ip("10.42.0.3")),
        Some(&ip("203.0.113.3"))
    );
}

#[test]
fn fifty_spokes_with_two_hubs_build_a_partial_mesh() {
    let mut s = Sim::new();
    let h1 = s.add(hub_config(1));
    let h2 = s.add(hub_config(250));
    let spokes: Vec<(u8, usize)> = (10..60u8)
        .map(|n| (n, s.add(spoke_config(n, &[1, 250]))))
        .collect();
    s.run_for(secs(2));
    assert_eq!(s.engine(h1).registered_clients(), 50);
    assert_eq!(s.engine(h2).registered_clients(), 50);
    // each spoke is redirected towards the next three
    for (k, &(n, _)) in spokes.iter().enumerate() {
        for d in 1..=3 {
            let (m, _) = spokes[(k + d) % spokes.len()];
            let (src, dst) = (format!("10.100.{n}.1"), format!("10.100.{m}.1"));
            let head = ipv4_head(&src, &dst);
            s.with(h1, |e, now| {
                e.hairpinned(
                    now,
                    ip(&src),
                    ip(&dst),
                    ip(&format!("203.0.113.{n}")),
                    &head,
                )
            });
        }
    }
    s.run_for(secs(2));
    for (k, &(n, i)) in spokes.iter().enumerate() {
        for d in 1..=3 {
            let (m, _) = spokes[(k + d) % spokes.len()];
            assert_eq!(
                s.dp(i).routes.get(&net(&format!("10.100.{m}.0/24"))),
                Some(&ip(&format!("10.42.0.{m}"))),
                "spoke {n} -> {m}"
            );
            assert_eq!(
                s.engine(i).lookup(ip(&format!("10.42.0.{m}"))),
                Some(ip(&format!("203.0.113.{m}")))
            );
        }
        // and it answered the three spokes before it
        for d in 1..=3 {
            let (m, _) = spokes[(k + spokes.len() - d) % spokes.len()];
            assert!(
                s.dp(i).peers.contains_key(&ip(&format!("10.42.0.{m}"))),
                "{n} knows {m}"
            );
        }
        assert_eq!(s.engine(i).counters().resolutions_failed, 0);
    }
    assert_eq!(s.lost, 0);
}

#[test]
fn shortcut_peers_are_purged_on_shutdown_and_nbma_change() {
    let (mut s, _hub, a, b) = topology(Phase::Two);
    s.with(a, |e, now| e.resolve(now, ip("10.100.3.5")));
    s.run_for(secs(1));
    assert!(s.dp(b).peers.contains_key(&ip("10.42.0.2")));
    // a moves: b forgets a's old address at once (it re-learns it on the next resolution)
    s.change_nbma(a, ip("203.0.113.222"));
    s.run_for(secs(1));
    assert!(
        !s.dp(b).peers.contains_key(&ip("10.42.0.2")),
        "{:?}",
        s.dp(b).peers
    );
    assert!(!s.dp(b).routes.contains_key(&net("10.42.0.2/32")));
    // a resolves again from its new address; then b shuts down: a drops the shortcut now,
    // not when it expires
    s.with(a, |e, now| e.resolve(now, ip("10.100.3.5")));
    s.run_for(secs(1));
    assert_eq!(
        s.dp(b).peers.get(&ip("10.42.0.2")),
        Some(&ip("203.0.113.222"))
    );
    assert!(s.dp(a).routes.contains_key(&net("10.100.3.0/24")));
    s.with(b, |e, now| e.shutdown(now));
    s.run_for(secs(1));
    assert!(!s.dp(a).routes.contains_key(&net("10.100.3.0/24")));
    assert!(!s.dp(a).peers.contains_key(&ip("10.42.0.3")));
    assert!(s.dp(a).peers.contains_key(&ip("10.42.0.1")));
}

#[test]
fn events_come_in_the_order_the_data_plane_needs() {
    let (mut s, _hub, a, _b) = topology(Phase::Two);
    s.with(a, |e, now| e.resolve(now, ip("10.100.3.5")));
    s.run_for(secs(1));
    s.run_for(secs(700)); // unused: expires
    let evs: Vec<&Event> = s.events(a).collect();
    let pos = |want: &Event| evs.iter().position(|e| *e == want).unwrap();
    let up = pos(&Event::PeerUp {
        proto: ip("10.42.0.3"),
        nbma: ip("203.0.113.3"),
    });
    let add = pos(&Event::RouteAdd {
        prefix: net("10.100.3.0/24"),
        next_hop: ip("10.42.0.3"),
    });
    let del = pos(&Event::RouteDel {
        prefix: net("10.100.3.0/24"),
    });
    let down = pos(&Event::PeerDown {
        proto: ip("10.42.0.3"),
    });
    assert!(up < add && add < del && del < down, "{evs:?}");
}
