//! Error handling: loops, hop count, error-for-error, unknown compulsory extensions,
//! authentication, configuration validation, hostile input.

mod sim;

use std::time::{Duration, Instant};

use dmvpn_nhrp::engine::{Config, DropReason, Engine, Event, Phase, Role};
use dmvpn_nhrp::wire::{
    Authentication, Body, Cie, ErrorIndication, Extension, ExtensionBody, Header, Mandatory, Op,
    Packet, error_code, flags,
};
use proptest::prelude::*;
use sim::{Sim, hub_config, ip, net, spoke_config};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn resolution_request(
    src: &str,
    src_nbma: &str,
    dst: &str,
    exts: Vec<Extension>,
    hop: u8,
) -> Packet {
    Packet {
        header: Header::ipv4(Op::ResolutionRequest, hop),
        body: Body::Mandatory(Mandatory {
            flags: flags::RES_Q | flags::RES_S,
            request_id: 77,
            src_nbma: Some(ip(src_nbma)),
            src_nbma_sub: vec![],
            src_proto: Some(ip(src)),
            dst_proto: Some(ip(dst)),
            cies: vec![Cie {
                prefix_len: 32,
                holding_time: 600,
                ..Cie::default()
            }],
            payload: vec![],
        }),
        extensions: exts,
    }
}

fn transit(addr: &str, nbma: &str) -> Cie {
    Cie {
        prefix_len: 32,
        client_nbma: Some(ip(nbma)),
        client_proto: Some(ip(addr)),
        ..Cie::default()
    }
}

/// hub 1 with spokes 2 and 3 registered (phase 2).
fn topology() -> (Sim, usize, usize, usize) {
    let mut s = Sim::new();
    let mut h = hub_config(1);
    h.phase = Phase::Two;
    let hub = s.add(h);
    let a = s.add(spoke_config(2, &[1]));
    let b = s.add(spoke_config(3, &[1]));
    s.run_for(secs(1));
    for i in [hub, a, b] {
        s.clear_log(i);
    }
    (s, hub, a, b)
}

#[test]
fn loop_detected_gives_error_3_and_no_error_for_error() {
    let (mut s, hub, _a, _b) = topology();
    // A request that already went through this hub (its address is in the forward transit
    // records) comes back from another NHS.
    let pkt = resolution_request(
        "10.42.0.2",
        "203.0.113.2",
        "10.100.3.1",
        vec![
            Extension::new(
                true,
                ExtensionBody::ForwardTransitNhs(vec![
                    transit("10.42.0.1", "198.51.100.1"),
                    transit("10.42.0.9", "198.51.100.9"),
                ]),
            ),
            Extension::end(),
        ],
        10,
    );
    s.inject(hub, ip("198.51.100.9"), &pkt.to_bytes().unwrap());
    let errs = s.sent_ops(hub, Op::ErrorIndication);
    assert_eq!(errs.len(), 1, "exactly one Error Indication");
    let (_, to, e) = errs[0];
    assert_eq!(*to, ip("198.51.100.9"));
    let Body::Error(ei) = &e.body else {
        panic!("not an error body")
    };
    assert_eq!(ei.code, error_code::LOOP_DETECTED);
    assert_eq!(ei.code, 3, "RFC 2332 value, not FRR's 2");
    assert_eq!(ei.src_proto, Some(ip("10.42.0.1")));
    assert!(
        e.extensions.is_empty(),
        "no extensions on an Error Indication"
    );
    assert_eq!(
        Packet::decode(&ei.offending).map(|p| p.op()).ok(),
        Some(Op::ResolutionRequest)
    );
    assert_eq!(s.engine(hub).counters().dropped(DropReason::Loop), 1);
    assert!(
        s.sent_ops(hub, Op::ResolutionRequest).is_empty(),
        "not forwarded"
    );

    // An Error Indication never triggers another one, whatever it says.
    s.clear_log(hub);
    let err = Packet {
        header: Header::ipv4(Op::ErrorIndication, 0),
        body: Body::Error(ErrorIndication {
            unused: 0,
            code: error_code::LOOP_DETECTED,
            offset: 0,
            src_nbma: Some(ip("198.51.100.9")),
            src_nbma_sub: vec![],
            src_proto: Some(ip("10.42.0.9")),
            dst_proto: Some(ip("10.42.0.1")),
            offending: pkt.to_bytes().unwrap(),
        }),
        extensions: vec![],
    };
    s.inject(hub, ip("198.51.100.9"), &err.to_bytes().unwrap());
    assert!(s.nodes[hub].sent.is_empty(), "no error for an error");
    assert!(s.events(hub).any(|e| *e
        == Event::ErrorIndication {
            from_nbma: ip("198.51.100.9"),
            code: 3
        }));

    // An Error Indication claiming to come from ourselves is dropped.
    let mut own = err.clone();
    if let Body::Error(e) = &mut own.body {
        e.src_proto = Some(ip("10.42.0.1"));
        e.src_nbma = Some(ip("198.51.100.1"));
    }
    s.clear_log(hub);
    s.inject(hub, ip("198.51.100.9"), &own.to_bytes().unwrap());
    assert!(s.nodes[hub].sent.is_empty());
    assert!(s.events(hub).any(|e| matches!(
        e,
        Event::Dropped {
            reason: DropReason::Unexpected,
            ..
        }
    )));
}

#[test]
fn one_error_per_packet_even_with_several_faults() {
    let (mut s, hub, _a, _b) = topology();
    // loop AND an unknown compulsory extension AND hop count 1
    let pkt = resolution_request(
        "10.42.0.2",
        "203.0.113.2",
        "10.100.3.1",
        vec![
            Extension::new(
                true,
                ExtensionBody::ForwardTransitNhs(vec![transit("10.42.0.1", "198.51.100.1")]),
            ),
            Extension::new(
                true,
                ExtensionBody::Unknown {
                    ty: 0x1234,
                    data: vec![1, 2],
                },
            ),
            Extension::end(),
        ],
        1,
    );
    s.inject(hub, ip("203.0.113.2"), &pkt.to_bytes().unwrap());
    assert_eq!(s.sent_ops(hub, Op::ErrorIndication).len(), 1);
    assert_eq!(s.nodes[hub].sent.len(), 1);
}

#[test]
fn hop_count_exhausted_gives_error_15() {
    let (mut s, hub, _a, b) = topology();
    let pkt = resolution_request(
        "10.42.0.2",
        "203.0.113.2",
        "10.100.3.1",
        vec![Extension::end()],
        1,
    );
    s.inject(hub, ip("203.0.113.2"), &pkt.to_bytes().unwrap());
    let errs = s.sent_ops(hub, Op::ErrorIndication);
    assert_eq!(errs.len(), 1);
    let Body::Error(ei) = &errs[0].2.body else {
        panic!()
    };
    assert_eq!(ei.code, error_code::HOP_COUNT_EXCEEDED);
    assert_eq!(errs[0].1, ip("203.0.113.2"), "to the registered requester");
    assert_eq!(s.engine(hub).counters().dropped(DropReason::HopCount), 1);
    s.run_for(secs(1));
    assert!(s.received_ops(b, Op::ResolutionRequest).is_empty());
}

#[test]
fn unknown_compulsory_extension_addressed_to_us_gives_error_1() {
    let (mut s, hub, a, _b) = topology();
    // a Registration Request (always addressed to the NHS) with an unknown compulsory ext
    let reg = Packet {
        header: Header::ipv4(Op::RegistrationRequest, 1),
        body: Body::Mandatory(Mandatory {
            flags: 0,
            request_id: 5,
            src_nbma: Some(ip("203.0.113.50")),
            src_nbma_sub: vec![],
            src_proto: Some(ip("10.42.0.50")),
            dst_proto: Some(ip("10.42.0.1")),
            cies: vec![Cie {
                prefix_len: 32,
                holding_time: 600,
                ..Cie::default()
            }],
            payload: vec![],
        }),
        extensions: vec![
            Extension::new(
                true,
                ExtensionBody::Unknown {
                    ty: 0x0042,
                    data: vec![],
                },
            ),
            Extension::end(),
        ],
    };
    s.inject(hub, ip("203.0.113.50"), &reg.to_bytes().unwrap());
    let errs = s.sent_ops(hub, Op::ErrorIndication);
    assert_eq!(errs.len(), 1);
    let Body::Error(ei) = &errs[0].2.body else {
        panic!()
    };
    assert_eq!(ei.code, error_code::UNRECOGNIZED_EXTENSION);
    assert_eq!(s.engine(hub).registered_clients(), 2, "not registered");

    // non-compulsory unknown extension: accepted
    let mut ok = reg.clone();
    ok.extensions[0].compulsory = false;
    s.clear_log(hub);
    s.inject(hub, ip("203.0.113.50"), &ok.to_bytes().unwrap());
    assert!(s.sent_ops(hub, Op::ErrorIndication).is_empty());
    assert_eq!(s.engine(hub).registered_clients(), 3);

    // in transit an unknown compulsory extension is passed on, without our transit record
    s.clear_log(hub);
    let rq = resolution_request(
        "10.42.0.2",
        "203.0.113.2",
        "10.100.3.1",
        vec![
            Extension::new(
                true,
                ExtensionBody::Unknown {
                    ty: 0x0042,
                    data: vec![],
                },
            ),
            Extension::end(),
        ],
        8,
    );
    s.inject(hub, ip("203.0.113.2"), &rq.to_bytes().unwrap());
    let (_, to, fwd) = s.sent_ops(hub, Op::ResolutionRequest)[0];
    assert_eq!(*to, ip("203.0.113.3"));
    assert!(
        !fwd.extensions
            .iter()
            .any(|e| matches!(&e.body, ExtensionBody::ForwardTransitNhs(c) if !c.is_empty()))
    );
    // the owner, to whom it is addressed, answers with Error 1 instead of a reply
    s.run_for(secs(1));
    let b = 2;
    assert_eq!(s.sent_ops(b, Op::ErrorIndication).len(), 1);
    assert!(s.sent_ops(b, Op::ResolutionReply).is_empty());
    let _ = a;
}

#[test]
fn authentication_mismatch_is_dropped_and_counted() {
    let mut s = Sim::new();
    let mut h = hub_config(1);
    h.auth = Some(b"secret".to_vec());
    let hub = s.add(h);
    let mut good = spoke_config(2, &[1]);
    good.auth = Some(b"secret".to_vec());
    let mut bad = spoke_config(3, &[1]);
    bad.auth = Some(b"wrong".to_vec());
    let none = spoke_config(4, &[1]);
    let g = s.add(good);
    let b = s.add(bad);
    let n = s.add(none);
    s.run_for(secs(1));
    assert_eq!(
        s.engine(hub).lookup(ip("10.42.0.2")),
        Some(ip("203.0.113.2"))
    );
    assert_eq!(s.engine(hub).lookup(ip("10.42.0.3")), None);
    assert_eq!(s.engine(hub).lookup(ip("10.42.0.4")), None);
    assert_eq!(s.engine(hub).counters().dropped(DropReason::BadAuth), 2);
    let drops: Vec<&Event> = s
        .events(hub)
        .filter(|e| {
            matches!(
                e,
                Event::Dropped {
                    reason: DropReason::BadAuth,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(drops.len(), 2);
    assert!(
        drops.iter().any(
            |e| matches!(e, Event::Dropped { from_nbma, .. } if *from_nbma == ip("203.0.113.3"))
        )
    );
    // no answer of any kind to an unauthenticated packet
    assert_eq!(s.sent_ops(hub, Op::RegistrationReply).len(), 1);
    assert!(s.sent_ops(hub, Op::ErrorIndication).is_empty());
    // everything the hub sends carries the password (Cisco cleartext, type 7, compulsory)
    let (_, _, rep) = s.sent_ops(hub, Op::RegistrationReply)[0];
    let auth: Vec<&Extension> = rep
        .extensions
        .iter()
        .filter(|e| matches!(e.body, ExtensionBody::Authentication(_)))
        .collect();
    assert_eq!(auth.len(), 1);
    assert!(auth[0].compulsory);
    assert_eq!(
        auth[0].body,
        ExtensionBody::Authentication(Authentication::CiscoCleartext(b"secret".to_vec()))
    );
    assert!(s.events(g).any(|e| matches!(e, Event::NhsUp { .. })));
    assert!(!s.events(b).any(|e| matches!(e, Event::NhsUp { .. })));
    let _ = n;
}

#[test]
fn authenticated_redirect_and_forwarding_regenerate_auth() {
    let mut s = Sim::new();
    let mut h = hub_config(1);
    h.auth = Some(b"k3y".to_vec());
    let hub = s.add(h);
    let mut c2 = spoke_config(2, &[1]);
    c2.auth = Some(b"k3y".to_vec());
    let mut c3 = spoke_config(3, &[1]);
    c3.auth = Some(b"k3y".to_vec());
    let a = s.add(c2);
    let _b = s.add(c3);
    s.run_for(secs(1));
    let head = sim::ipv4_head("10.100.2.1", "10.100.3.1");
    s.with(hub, |e, now| {
        e.hairpinned(
            now,
            ip("10.100.2.1"),
            ip("10.100.3.1"),
            ip("203.0.113.2"),
            &head,
        )
    });
    s.run_for(secs(1));
    assert_eq!(
        s.dp(a).routes.get(&net("10.100.3.0/24")),
        Some(&ip("10.42.0.3"))
    );
    let (_, _, fwd) = s.sent_ops(hub, Op::ResolutionRequest)[0];
    let n = fwd
        .extensions
        .iter()
        .filter(|e| matches!(e.body, ExtensionBody::Authentication(_)))
        .count();
    assert_eq!(n, 1, "one auth extension after forwarding");
    assert_eq!(s.engine(hub).counters().dropped(DropReason::BadAuth), 0);
}

#[test]
fn config_errors_name_the_field() {
    let base = Config::new(Role::Spoke, ip("10.42.0.2"), 24, ip("203.0.113.2"));
    let now = Instant::now();
    let err = |c: Config| Engine::new(c, now).expect_err("invalid").field;
    assert_eq!(err(base.clone()), "nhs");
    let mut c = spoke_config(2, &[1]);
    c.holdtime = 0;
    assert_eq!(err(c), "holdtime");
    let mut c = spoke_config(2, &[1]);
    c.auth = Some(b"123456789".to_vec());
    assert_eq!(err(c), "nhrp_auth");
    let mut c = spoke_config(2, &[1]);
    c.tunnel_prefix_len = 33;
    assert_eq!(err(c), "tunnel_prefix_len");
    let mut c = spoke_config(2, &[1]);
    c.local_prefixes = vec![net("0.0.0.0/0")];
    assert_eq!(err(c), "local_prefixes");
    let mut c = spoke_config(2, &[1]);
    c.nhs[0].tunnel_address = ip("10.43.0.1");
    let e = Engine::new(c, now).err().unwrap();
    assert_eq!(e.field, "nhs.tunnel_address");
    assert!(e.to_string().contains("outside the tunnel network"), "{e}");
    assert_eq!(Phase::try_from(4).err().unwrap().field, "phase");
    assert!(Engine::new(spoke_config(2, &[1]), now).is_ok());
    assert!(Engine::new(hub_config(1), now).is_ok());
}

#[test]
fn spoke_ignores_what_only_a_hub_handles() {
    let (mut s, _hub, a, _b) = topology();
    // a Resolution Request for someone else's address, sent straight to a spoke
    let pkt = resolution_request(
        "10.42.0.3",
        "203.0.113.3",
        "10.100.9.1",
        vec![Extension::end()],
        8,
    );
    s.inject(a, ip("203.0.113.3"), &pkt.to_bytes().unwrap());
    assert!(s.nodes[a].sent.is_empty());
    assert_eq!(s.engine(a).counters().dropped(DropReason::Unexpected), 1);
}

fn engines() -> Vec<Engine> {
    let now = Instant::now();
    let mut h = hub_config(1);
    h.auth = None;
    let mut auth = hub_config(1);
    auth.auth = Some(b"pw".to_vec());
    vec![
        Engine::new(h, now).unwrap(),
        Engine::new(auth, now).unwrap(),
        Engine::new(spoke_config(2, &[1, 5]), now).unwrap(),
    ]
}

fn drain(e: &mut Engine) {
    while let Some(t) = e.poll_transmit() {
        Packet::decode(&t.bytes).expect("emitted packets decode");
    }
    while e.poll_event().is_some() {}
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), from in any::<[u8; 4]>()) {
        for mut e in engines() {
            let now = Instant::now();
            e.handle_packet(now, std::net::IpAddr::from(from), &bytes);
            drain(&mut e);
        }
    }

    /// Valid packets with random fields (addresses, codes, flags, hop count, CIEs) go deeper
    /// into the engine than random bytes, which mostly fail the checksum.
    #[test]
    fn random_valid_packets_never_panic(
        op in 1u8..=8,
        hop in any::<u8>(),
        fl in any::<u16>(),
        rid in any::<u32>(),
        src in any::<[u8; 4]>(),
        dst_last in any::<u8>(),
        src_last in any::<u8>(),
        ncies in 0usize..4,
        code in prop_oneof![Just(0u8), any::<u8>()],
        plen in any::<u8>(),
        ht in any::<u16>(),
        payload in proptest::collection::vec(any::<u8>(), 0..48),
        with_transit in any::<bool>(),
    ) {
        let op = Op::from_u8(op).unwrap();
        let cie = Cie { code, prefix_len: plen, holding_time: ht, client_proto: Some(ip(&format!("10.100.{dst_last}.0"))), client_nbma: Some(std::net::IpAddr::from(src)), ..Cie::default() };
        let mut exts = vec![];
        if with_transit {
            exts.push(Extension::new(true, ExtensionBody::ForwardTransitNhs(vec![transit("10.42.0.9", "198.51.100.9")])));
        }
        exts.push(Extension::new(true, ExtensionBody::Authentication(Authentication::CiscoCleartext(b"pw".to_vec()))));
        exts.push(Extension::end());
        let body = if op == Op::ErrorIndication {
            Body::Error(ErrorIndication { unused: 0, code: u16::from(code), offset: 0, src_nbma: Some(std::net::IpAddr::from(src)), src_nbma_sub: vec![], src_proto: Some(ip(&format!("10.42.0.{src_last}"))), dst_proto: None, offending: payload.clone() })
        } else {
            Body::Mandatory(Mandatory {
                flags: fl,
                request_id: rid,
                src_nbma: Some(std::net::IpAddr::from(src)),
                src_nbma_sub: vec![],
                src_proto: Some(ip(&format!("10.42.0.{src_last}"))),
                dst_proto: Some(ip(&format!("10.{}.{dst_last}.1", if dst_last % 2 == 0 { 100 } else { 42 }))),
                cies: if op == Op::TrafficIndication { vec![] } else { vec![cie; ncies] },
                payload: if op == Op::TrafficIndication { payload } else { vec![] },
            })
        };
        let pkt = Packet { header: Header::ipv4(op, hop), body, extensions: if op == Op::ErrorIndication { vec![] } else { exts } };
        let bytes = pkt.to_bytes().unwrap();
        for mut e in engines() {
            let mut now = Instant::now();
            e.handle_packet(now, std::net::IpAddr::from(src), &bytes);
            drain(&mut e);
            // and the engine keeps running its timers afterwards
            for _ in 0..3 {
                now += Duration::from_secs(700);
                e.handle_timeout(now);
                drain(&mut e);
            }
            let _ = e.snapshot();
        }
    }
}

#[test]
fn traffic_indication_only_from_our_nhs() {
    let (mut s, _hub, a, _b) = topology();
    let ti = |src: &str, nbma: &str| Packet {
        header: Header::ipv4(Op::TrafficIndication, 1),
        body: Body::Mandatory(Mandatory {
            flags: 0,
            request_id: 0,
            src_nbma: Some(ip(nbma)),
            src_nbma_sub: vec![],
            src_proto: Some(ip(src)),
            dst_proto: Some(ip("10.100.2.1")),
            cies: vec![],
            payload: sim::ipv4_head("10.100.2.1", "10.100.3.1"),
        }),
        extensions: vec![Extension::end()],
    };
    let mut c = spoke_config(2, &[1]);
    c.phase = Phase::Three;
    let p3 = s.add(c);
    s.run_for(secs(1));
    s.clear_log(p3);
    s.inject(
        p3,
        ip("203.0.113.3"),
        &ti("10.42.0.3", "203.0.113.3").to_bytes().unwrap(),
    );
    assert!(s.sent_ops(p3, Op::ResolutionRequest).is_empty());
    assert_eq!(s.engine(p3).counters().dropped(DropReason::Unexpected), 1);
    s.inject(
        p3,
        ip("198.51.100.1"),
        &ti("10.42.0.1", "198.51.100.1").to_bytes().unwrap(),
    );
    let rq = s.sent_ops(p3, Op::ResolutionRequest);
    assert_eq!(rq.len(), 1);
    assert_eq!(
        rq[0].2.mandatory().unwrap().dst_proto,
        Some(ip("10.100.3.1"))
    );
    // a phase 2 spoke does not act on redirects
    let mut c = spoke_config(8, &[1]);
    c.phase = Phase::Two;
    let p2 = s.add(c);
    s.run_for(secs(1));
    let bytes = ti("10.42.0.1", "198.51.100.1").to_bytes().unwrap();
    s.inject(p2, ip("198.51.100.1"), &bytes);
    assert!(s.sent_ops(p2, Op::ResolutionRequest).is_empty());
    assert_eq!(s.engine(p2).counters().dropped(DropReason::Unexpected), 1);
    let _ = a;
}
