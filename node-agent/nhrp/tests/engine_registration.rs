//! Registration: NHC to NHS, refresh, expiry, unique / no-unique, NBMA change, NAT.

mod sim;

use std::time::Duration;

use dmvpn_nhrp::engine::{CacheType, Event, NhsState};
use dmvpn_nhrp::wire::{Body, ExtensionBody, Op, cie_code, flags};
use sim::{Sim, hub_config, ip, net, spoke_config};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn three_spokes_register() {
    let mut s = Sim::new();
    let hub = s.add(hub_config(1));
    let spokes: Vec<usize> = (2..=4).map(|n| s.add(spoke_config(n, &[1]))).collect();
    s.run_for(secs(1));

    let dp = s.dp(hub);
    for n in 2..=4u8 {
        let proto = ip(&format!("10.42.0.{n}"));
        let nbma = ip(&format!("203.0.113.{n}"));
        assert_eq!(
            dp.peers.get(&proto),
            Some(&nbma),
            "hub neighbour for spoke {n}"
        );
        assert_eq!(s.engine(hub).lookup(proto), Some(nbma));
        assert_eq!(
            dp.routes.get(&net(&format!("10.42.0.{n}/32"))),
            Some(&proto)
        );
        assert_eq!(
            dp.routes.get(&net(&format!("10.100.{n}.0/24"))),
            Some(&proto)
        );
    }
    assert_eq!(s.engine(hub).registered_clients(), 3);
    let snap = s.engine(hub).snapshot();
    let dynamic = snap
        .cache
        .iter()
        .filter(|e| e.kind == CacheType::Dynamic)
        .count();
    assert_eq!(dynamic, 6, "tunnel /32 and LAN /24 of each spoke");
    assert_eq!(snap.counters.rx(Op::RegistrationRequest), 3);
    assert_eq!(snap.counters.tx(Op::RegistrationReply), 3);

    for &sp in &spokes {
        let evs: Vec<&Event> = s.events(sp).collect();
        assert!(evs.contains(&&Event::PeerUp {
            proto: ip("10.42.0.1"),
            nbma: ip("198.51.100.1")
        }));
        assert!(evs.contains(&&Event::NhsUp {
            proto: ip("10.42.0.1")
        }));
        // default route for the tunnel network via the hub
        assert_eq!(
            s.dp(sp).routes.get(&net("10.42.0.0/24")),
            Some(&ip("10.42.0.1"))
        );
        let nhs = &s.engine(sp).snapshot().nhs[0];
        assert_eq!(nhs.state, NhsState::Up);
        assert!(nhs.registered);
    }

    // Wire details of a registration: hop count 1, no-unique (no U bit), /32 CIE then LAN CIE,
    // reply echoes both with code 0 and carries a responder address.
    let (_, dst, req) = s.sent_ops(spokes[0], Op::RegistrationRequest)[0];
    assert_eq!(*dst, ip("198.51.100.1"));
    assert_eq!(req.header.hop_count, 1);
    let m = req.mandatory().unwrap();
    assert_eq!(m.flags & flags::REG_U, 0);
    assert_eq!(m.cies.len(), 2);
    assert_eq!(m.cies[0].prefix_len, 32);
    assert_eq!(m.cies[0].client_proto, None);
    assert_eq!(m.cies[1].prefix_len, 24);
    assert_eq!(m.cies[1].client_proto, Some(ip("10.100.2.0")));
    let (_, _, rep) = s.received_ops(spokes[0], Op::RegistrationReply)[0];
    let rm = rep.mandatory().unwrap();
    assert_eq!(rm.request_id, m.request_id);
    // FRR and Cisco learn the NHS's protocol address from the reply's destination field.
    assert_eq!(rm.dst_proto, Some(ip("10.42.0.1")));
    assert!(rm.cies.iter().all(|c| c.code == cie_code::SUCCESS));
    assert!(rep.extensions.iter().any(|e| matches!(
        &e.body,
        ExtensionBody::ResponderAddress(Some(c)) if c.client_proto == Some(ip("10.42.0.1"))
    )));
}

#[test]
fn refresh_at_a_third_of_holdtime_and_expiry_when_refreshes_stop() {
    let mut s = Sim::new();
    let hub = s.add(hub_config(1));
    let sp = s.add(spoke_config(2, &[1])); // holdtime 600: refresh every 200 s
    s.run_for(secs(650));
    let times: Vec<Duration> = s
        .sent_ops(sp, Op::RegistrationRequest)
        .iter()
        .map(|(t, _, _)| t.duration_since(s.nodes[hub].events[0].0))
        .collect();
    assert_eq!(
        times.len(),
        4,
        "registration at 0, 200, 400, 600 s: {times:?}"
    );
    for (k, t) in times.iter().enumerate() {
        let expect = secs(200 * k as u64);
        assert!(t.abs_diff(expect) < secs(1), "refresh {k} at {t:?}");
    }
    // each refresh is a new registration: new request id
    let ids: Vec<u32> = s
        .sent_ops(sp, Op::RegistrationRequest)
        .iter()
        .map(|(_, _, p)| p.mandatory().unwrap().request_id)
        .collect();
    assert!(ids.windows(2).all(|w| w[0] != w[1]), "{ids:?}");
    assert_eq!(s.engine(hub).registered_clients(), 1);

    // The spoke goes silent: the binding expires 600 s after the last refresh.
    s.partition(sp, true);
    s.clear_log(hub);
    s.run_for(secs(540));
    assert_eq!(s.engine(hub).registered_clients(), 1, "not yet expired");
    s.run_for(secs(20));
    assert_eq!(s.engine(hub).registered_clients(), 0);
    let evs: Vec<&Event> = s.events(hub).collect();
    assert!(evs.contains(&&Event::PeerDown {
        proto: ip("10.42.0.2")
    }));
    assert!(evs.contains(&&Event::RouteDel {
        prefix: net("10.42.0.2/32")
    }));
    assert!(evs.contains(&&Event::RouteDel {
        prefix: net("10.100.2.0/24")
    }));
    assert!(s.dp(hub).peers.is_empty());
    assert!(s.dp(hub).routes.is_empty());

    // Meanwhile the spoke declared the NHS down after 3 timeouts and keeps probing.
    assert!(s.events(sp).any(|e| *e
        == Event::NhsDown {
            proto: ip("10.42.0.1")
        }));
    let nhs = &s.engine(sp).snapshot().nhs[0];
    assert_eq!(nhs.state, NhsState::Down);
    assert!(nhs.failures >= 3);

    // Reconnected: the next probe brings it back up.
    s.partition(sp, false);
    s.clear_log(sp);
    s.run_for(secs(70));
    assert!(s.events(sp).any(|e| *e
        == Event::NhsUp {
            proto: ip("10.42.0.1")
        }));
    assert_eq!(s.engine(hub).registered_clients(), 1);
}

#[test]
fn retries_back_off_and_reuse_the_request_id() {
    let mut s = Sim::new();
    let sp = s.add(spoke_config(2, &[1])); // no hub at all
    s.run_for(secs(300));
    let sent = s.sent_ops(sp, Op::RegistrationRequest);
    let t0 = sent[0].0;
    let gaps: Vec<u64> = sent
        .windows(2)
        .map(|w| w[1].0.duration_since(w[0].0).as_secs())
        .collect();
    assert_eq!(&gaps[..8], &[1, 2, 4, 8, 16, 32, 64, 64], "{gaps:?}");
    let id = sent[0].2.mandatory().unwrap().request_id;
    assert!(
        sent.iter()
            .all(|(_, _, p)| p.mandatory().unwrap().request_id == id)
    );
    // NhsDown exactly once, after the third timeout (t0 + 1 + 2 + 4 s)
    let downs: Vec<_> = s.nodes[sp]
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::NhsDown { .. }))
        .collect();
    assert_eq!(downs.len(), 1);
    assert_eq!(downs[0].0.duration_since(t0), secs(7));
}

#[test]
fn unique_registration_conflict_gets_code_14() {
    let mut s = Sim::new();
    let hub = s.add(hub_config(1));
    let mut c = spoke_config(2, &[1]);
    c.registration_unique = true;
    let sp = s.add(c.clone());
    s.run_for(secs(1));
    assert_eq!(
        s.engine(hub).lookup(ip("10.42.0.2")),
        Some(ip("203.0.113.2"))
    );
    let req = &s.sent_ops(sp, Op::RegistrationRequest)[0].2;
    assert_ne!(
        req.mandatory().unwrap().flags & flags::REG_U,
        0,
        "U bit set"
    );
    assert_eq!(req.mandatory().unwrap().cies[0].prefix_len, 0xFF);

    // Another node claims the same tunnel address from another NBMA address.
    c.nbma_address = ip("203.0.113.99");
    let dup = s.add(c);
    s.run_for(secs(1));
    assert_eq!(
        s.engine(hub).lookup(ip("10.42.0.2")),
        Some(ip("203.0.113.2")),
        "binding kept"
    );
    let (_, _, rep) = s.received_ops(dup, Op::RegistrationReply)[0];
    let codes: Vec<u8> = rep
        .mandatory()
        .unwrap()
        .cies
        .iter()
        .map(|c| c.code)
        .collect();
    assert_eq!(codes, vec![cie_code::UNIQUE_ALREADY_REGISTERED; 2]);
    assert!(s.events(dup).any(|e| matches!(
        e,
        Event::RegistrationRejected { code: 14, prefix, .. } if *prefix == net("10.42.0.2/32")
    )));
    let snap = s.engine(dup).snapshot();
    assert_eq!(snap.counters.registrations_rejected, 2);
    assert_eq!(snap.nhs[0].last_rejection, Some(14));
    assert!(!snap.nhs[0].registered);

    // The rejected node retries with backoff (1, 2, 4, ... s), each time rejected again.
    s.clear_log(dup);
    s.run_for(secs(8));
    let n = s.sent_ops(dup, Op::RegistrationRequest).len();
    assert!((2..=4).contains(&n), "{n} retries in 8 s");
    assert_eq!(
        s.engine(hub).lookup(ip("10.42.0.2")),
        Some(ip("203.0.113.2"))
    );
}

#[test]
fn no_unique_registration_from_a_new_nbma_replaces_the_binding() {
    let mut s = Sim::new();
    let hub = s.add(hub_config(1));
    let mut c = spoke_config(2, &[1]);
    let _sp = s.add(c.clone());
    s.run_for(secs(1));
    s.clear_log(hub);
    c.nbma_address = ip("203.0.113.99");
    let dup = s.add(c);
    s.run_for(secs(1));
    assert_eq!(
        s.engine(hub).lookup(ip("10.42.0.2")),
        Some(ip("203.0.113.99"))
    );
    assert!(s.events(hub).any(|e| *e
        == Event::PeerUp {
            proto: ip("10.42.0.2"),
            nbma: ip("203.0.113.99")
        }));
    // routes unchanged: no RouteDel
    assert!(!s.events(hub).any(|e| matches!(e, Event::RouteDel { .. })));
    let (_, _, rep) = s.received_ops(dup, Op::RegistrationReply)[0];
    assert!(rep.mandatory().unwrap().cies.iter().all(|c| c.code == 0));
}

#[test]
fn nbma_change_purges_then_reregisters_even_when_unique() {
    let mut s = Sim::new();
    let hub = s.add(hub_config(1));
    let mut c = spoke_config(2, &[1]);
    c.registration_unique = true;
    let sp = s.add(c);
    s.run_for(secs(1));
    let reg_id = s.sent_ops(sp, Op::RegistrationRequest)[0]
        .2
        .mandatory()
        .unwrap()
        .request_id;
    s.clear_log(sp);
    s.change_nbma(sp, ip("203.0.113.77"));
    s.run_for(secs(1));
    let purge = &s.sent_ops(sp, Op::PurgeRequest)[0].2;
    assert_eq!(
        purge.mandatory().unwrap().request_id,
        reg_id,
        "purge reuses the registration id"
    );
    assert_eq!(
        purge.mandatory().unwrap().cies[0].client_nbma,
        Some(ip("203.0.113.2"))
    );
    assert_eq!(
        s.engine(hub).lookup(ip("10.42.0.2")),
        Some(ip("203.0.113.77"))
    );
    let rep = &s.received_ops(sp, Op::RegistrationReply)[0].2;
    assert!(
        rep.mandatory().unwrap().cies.iter().all(|c| c.code == 0),
        "no code 14"
    );
    assert_eq!(s.engine(sp).snapshot().counters.registrations_rejected, 0);
}

#[test]
fn late_purge_does_not_remove_the_newer_registration() {
    let mut s = Sim::new();
    let hub = s.add(hub_config(1));
    let sp = s.add(spoke_config(2, &[1]));
    s.run_for(secs(1));
    // Capture a purge for the first registration, deliver it after a re-registration.
    s.change_nbma(sp, ip("203.0.113.77"));
    let purge = s.nodes[sp]
        .sent
        .iter()
        .rev()
        .find(|(_, _, p)| p.op() == Op::PurgeRequest)
        .unwrap()
        .2
        .to_bytes()
        .unwrap();
    s.run_for(secs(1));
    assert_eq!(
        s.engine(hub).lookup(ip("10.42.0.2")),
        Some(ip("203.0.113.77"))
    );
    s.inject(hub, ip("203.0.113.77"), &purge);
    assert_eq!(
        s.engine(hub).lookup(ip("10.42.0.2")),
        Some(ip("203.0.113.77"))
    );
}

#[test]
fn nat_observed_address_is_used_and_reported() {
    let mut s = Sim::new();
    let hub = s.add(hub_config(1));
    let sp = s.add_behind_nat(spoke_config(2, &[1]), ip("198.51.100.200"));
    s.run_for(secs(1));
    assert_eq!(
        s.engine(hub).lookup(ip("10.42.0.2")),
        Some(ip("198.51.100.200"))
    );
    let rep = &s.received_ops(sp, Op::RegistrationReply)[0].2;
    let nat = rep
        .extensions
        .iter()
        .find_map(|e| match &e.body {
            ExtensionBody::CiscoNatAddress(c) => Some(c.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(nat.len(), 2, "echoed CIE then the observed one");
    assert_eq!(nat[1].client_nbma, Some(ip("198.51.100.200")));
    assert_eq!(nat[1].client_proto, Some(ip("10.42.0.2")));
    assert!(s.events(sp).any(|e| *e
        == Event::NatDetected {
            nhs: ip("10.42.0.1"),
            public_nbma: ip("198.51.100.200")
        }));
    assert_eq!(
        s.engine(sp).snapshot().nhs[0].nat_nbma,
        Some(ip("198.51.100.200"))
    );
    // Resolution Requests then carry our NAT-observed address.
    s.with(sp, |e, now| e.resolve(now, ip("10.100.9.1")));
    let rq = &s.sent_ops(sp, Op::ResolutionRequest)[0].2;
    assert!(rq.extensions.iter().any(|e| matches!(
        &e.body,
        ExtensionBody::CiscoNatAddress(c) if c.first().and_then(|c| c.client_nbma) == Some(ip("198.51.100.200"))
    )));
    let _ = Body::Mandatory;
}

#[test]
fn purge_on_shutdown_removes_the_spoke_at_the_hub() {
    let mut s = Sim::new();
    let hub = s.add(hub_config(1));
    let sp = s.add(spoke_config(2, &[1]));
    s.run_for(secs(1));
    s.clear_log(hub);
    s.with(sp, |e, now| e.shutdown(now));
    s.run_for(secs(1));
    assert_eq!(s.engine(hub).registered_clients(), 0);
    let evs: Vec<&Event> = s.events(hub).collect();
    assert!(evs.contains(&&Event::PeerDown {
        proto: ip("10.42.0.2")
    }));
    assert!(evs.contains(&&Event::RouteDel {
        prefix: net("10.100.2.0/24")
    }));
    let purge = &s.received_ops(hub, Op::PurgeRequest)[0].2;
    assert_ne!(purge.mandatory().unwrap().flags & flags::PURGE_N, 0);
    assert!(
        s.sent_ops(hub, Op::PurgeReply).is_empty(),
        "N bit: no reply"
    );
    // the spoke withdrew everything it installed and stopped
    assert!(s.dp(sp).peers.is_empty(), "{:?}", s.dp(sp).peers);
    assert!(s.dp(sp).routes.is_empty());
    assert_eq!(s.engine(sp).poll_timeout(), None);
    assert!(s.engine(sp).snapshot().shut_down);
}

#[test]
fn snapshot_serialises_for_the_control_socket() {
    let mut s = Sim::new();
    let hub = s.add(hub_config(1));
    let sp = s.add(spoke_config(2, &[1]));
    s.run_for(secs(1));
    // a corrupted packet: counted as a bad checksum
    let mut bytes = s.nodes[sp].sent[0].2.to_bytes().unwrap();
    bytes[25] ^= 0xFF;
    s.inject(hub, ip("203.0.113.2"), &bytes);
    let v = serde_json::to_value(s.engine(hub).snapshot()).unwrap();
    assert_eq!(v["role"], "hub");
    let cache = v["cache"].as_array().unwrap();
    assert!(cache.iter().any(|e| {
        e["type"] == "dynamic"
            && e["prefix"] == "10.100.2.0/24"
            && e["proto"] == "10.42.0.2"
            && e["nbma"] == "203.0.113.2"
            && e["expires_in"]
                .as_u64()
                .is_some_and(|t| t > 590 && t <= 600)
    }));
    assert!(
        cache
            .iter()
            .any(|e| e["type"] == "local" && e["prefix"] == "10.42.0.1/32")
    );
    assert_eq!(v["counters"]["messages"]["registration_request"]["rx"], 1);
    assert_eq!(v["counters"]["messages"]["registration_reply"]["tx"], 1);
    assert_eq!(v["counters"]["drops"]["bad_checksum"], 1);
    assert_eq!(v["counters"]["drops"]["bad_auth"], 0);
    let v = serde_json::to_value(s.engine(sp).snapshot()).unwrap();
    assert_eq!(v["nhs"][0]["state"], "up");
    assert_eq!(v["nhs"][0]["proto"], "10.42.0.1");
    assert!(
        v["cache"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "nhs")
    );
    let ev = serde_json::to_value(Event::NhsUp {
        proto: ip("10.42.0.1"),
    })
    .unwrap();
    assert_eq!(ev["event"], "nhs_up");
}

#[test]
fn too_many_prefixes_are_refused_with_code_5() {
    let mut s = Sim::new();
    let hub = s.add(hub_config(1));
    let mut c = spoke_config(2, &[1]);
    c.local_prefixes = (0..70).map(|k| net(&format!("10.101.{k}.0/24"))).collect();
    let sp = s.add(c);
    s.run_for(secs(1));
    let (_, _, rep) = s.received_ops(sp, Op::RegistrationReply)[0];
    let codes: Vec<u8> = rep
        .mandatory()
        .unwrap()
        .cies
        .iter()
        .map(|c| c.code)
        .collect();
    assert_eq!(codes.len(), 71);
    assert!(codes[..64].iter().all(|c| *c == 0));
    assert!(
        codes[64..]
            .iter()
            .all(|c| *c == cie_code::INSUFFICIENT_RESOURCES)
    );
    let dynamic = s
        .engine(hub)
        .snapshot()
        .cache
        .iter()
        .filter(|e| e.kind == CacheType::Dynamic)
        .count();
    assert_eq!(dynamic, 64);
}

#[test]
fn ipv6_overlay_registers_and_resolves() {
    use dmvpn_nhrp::engine::{Config, NhsConfig, Phase, Role};
    let mut s = Sim::new();
    let mut h = Config::new(Role::Hub, ip("fd00:42::1"), 64, ip("198.51.100.1"));
    h.phase = Phase::Two;
    let hub = s.add(h);
    let spoke = |n: u8| {
        let mut c = Config::new(
            Role::Spoke,
            ip(&format!("fd00:42::{n}")),
            64,
            ip(&format!("203.0.113.{n}")),
        );
        c.phase = Phase::Two;
        c.local_prefixes = vec![net(&format!("fd00:100:{n}::/64"))];
        c.nhs = vec![NhsConfig {
            tunnel_address: ip("fd00:42::1"),
            nbma_address: ip("198.51.100.1"),
            priority: 0,
        }];
        c
    };
    let a = s.add(spoke(2));
    let _b = s.add(spoke(3));
    s.run_for(secs(1));
    assert_eq!(
        s.engine(hub).lookup(ip("fd00:42::3")),
        Some(ip("203.0.113.3"))
    );
    assert_eq!(
        s.dp(hub).routes.get(&net("fd00:100:3::/64")),
        Some(&ip("fd00:42::3"))
    );
    s.with(a, |e, now| e.resolve(now, ip("fd00:100:3::99")));
    s.run_for(secs(1));
    assert_eq!(
        s.dp(a).routes.get(&net("fd00:100:3::/64")),
        Some(&ip("fd00:42::3"))
    );
    assert_eq!(
        s.dp(a).peers.get(&ip("fd00:42::3")),
        Some(&ip("203.0.113.3"))
    );
}

#[test]
fn prefix_registered_by_two_spokes() {
    let mut s = Sim::new();
    let hub = s.add(hub_config(1));
    let mut c2 = spoke_config(2, &[1]);
    c2.local_prefixes.push(net("10.200.0.0/16"));
    let _a = s.add(c2);
    s.run_for(secs(1));
    // no-unique: the later registration takes the prefix over
    let mut c3 = spoke_config(3, &[1]);
    c3.local_prefixes.push(net("10.200.0.0/16"));
    let _b = s.add(c3);
    s.run_for(secs(1));
    assert_eq!(
        s.dp(hub).routes.get(&net("10.200.0.0/16")),
        Some(&ip("10.42.0.3"))
    );
    // unique: refused with 14 for that prefix only
    let mut c4 = spoke_config(4, &[1]);
    c4.registration_unique = true;
    c4.local_prefixes.push(net("10.200.0.0/16"));
    let d = s.add(c4);
    s.run_for(secs(1));
    let (_, _, rep) = s.received_ops(d, Op::RegistrationReply)[0];
    let codes: Vec<u8> = rep
        .mandatory()
        .unwrap()
        .cies
        .iter()
        .map(|c| c.code)
        .collect();
    assert_eq!(codes, vec![0, 0, cie_code::UNIQUE_ALREADY_REGISTERED]);
    assert_eq!(
        s.dp(hub).routes.get(&net("10.200.0.0/16")),
        Some(&ip("10.42.0.3"))
    );
    assert_eq!(
        s.dp(hub).routes.get(&net("10.100.4.0/24")),
        Some(&ip("10.42.0.4"))
    );
    // a prefix covering the hub's own tunnel address is refused (code 4)
    let mut c5 = spoke_config(5, &[1]);
    c5.local_prefixes = vec![net("10.42.0.0/16")];
    let e = s.add(c5);
    s.run_for(secs(1));
    let (_, _, rep) = s.received_ops(e, Op::RegistrationReply)[0];
    let codes: Vec<u8> = rep
        .mandatory()
        .unwrap()
        .cies
        .iter()
        .map(|c| c.code)
        .collect();
    assert_eq!(codes, vec![0, cie_code::ADMIN_PROHIBITED]);
}
