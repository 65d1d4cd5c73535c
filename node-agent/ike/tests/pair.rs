//! Two endpoints of this crate talking to each other through an in-memory "network".

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use dmvpn_ike::{AuthConfig, ChildMode, Config, Endpoint, Event, FailReason, Identity, Transmit};
use zeroize::Zeroizing;

const A: &str = "198.51.100.1";
const B: &str = "198.51.100.2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn psk(s: &str) -> AuthConfig {
    AuthConfig::Psk(Zeroizing::new(s.as_bytes().to_vec()))
}

struct Net {
    a: Endpoint,
    b: Endpoint,
    now: Instant,
    ev_a: Vec<Event>,
    ev_b: Vec<Event>,
    /// Datagrams seen on the wire (for assertions).
    wire: Vec<Transmit>,
    /// Drop the next n datagrams from A.
    drop_from_a: usize,
}

impl Net {
    fn new(ca: Config, cb: Config) -> Self {
        let now = Instant::now();
        Net {
            a: Endpoint::new(ca, now).unwrap(),
            b: Endpoint::new(cb, now).unwrap(),
            now,
            ev_a: Vec::new(),
            ev_b: Vec::new(),
            wire: Vec::new(),
            drop_from_a: 0,
        }
    }

    /// Delivers datagrams until both are quiet.
    fn run(&mut self) {
        for _ in 0..100 {
            let mut moved = false;
            while let Some(t) = self.a.poll_transmit() {
                moved = true;
                self.wire.push(t.clone());
                if self.drop_from_a > 0 {
                    self.drop_from_a -= 1;
                    continue;
                }
                assert_eq!(t.dst.ip(), self.b.config().local_addr);
                self.b.handle_datagram(self.now, t.src, t.dst, &t.payload);
            }
            while let Some(t) = self.b.poll_transmit() {
                moved = true;
                self.wire.push(t.clone());
                assert_eq!(t.dst.ip(), self.a.config().local_addr);
                self.a.handle_datagram(self.now, t.src, t.dst, &t.payload);
            }
            while let Some(e) = self.a.poll_event() {
                self.ev_a.push(e);
            }
            while let Some(e) = self.b.poll_event() {
                self.ev_b.push(e);
            }
            if !moved {
                return;
            }
        }
        panic!("endpoints never went quiet");
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
        self.run();
    }
}

fn child_keys(ev: &[Event]) -> Vec<dmvpn_ike::ChildSaKeys> {
    ev.iter()
        .filter_map(|e| match e {
            Event::ChildSaUp { keys, .. } => Some(keys.clone()),
            _ => None,
        })
        .collect()
}

fn failures(ev: &[Event]) -> Vec<FailReason> {
    ev.iter()
        .filter_map(|e| match e {
            Event::Failed { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

/// ESP packets sealed with one side's outbound keys open with the other's inbound keys.
fn assert_esp_works(x: &dmvpn_ike::ChildSaKeys, y: &dmvpn_ike::ChildSaKeys) {
    let now = Instant::now();
    assert_eq!(x.spi_out, y.spi_in);
    assert_eq!(x.spi_in, y.spi_out);
    let mut tx = x.outbound().unwrap().into_outbound(now).unwrap();
    let mut rx = y.inbound().unwrap().into_inbound(now).unwrap();
    let mut buf = Vec::new();
    tx.seal_to_vec(now, 47, b"gre payload", &mut buf).unwrap();
    let opened = rx.open_in_place(now, &mut buf).unwrap();
    assert_eq!(&buf[opened.payload], b"gre payload");
}

fn established(cfg_a: Config, cfg_b: Config) -> Net {
    let mut n = Net::new(cfg_a, cfg_b);
    n.a.initiate(n.now, ip(B)).unwrap();
    n.run();
    n
}

#[test]
fn psk_establishes_ike_and_child_sa() {
    let n = established(
        Config::new(ip(A), psk("sekrit-123456789")),
        Config::new(ip(B), psk("sekrit-123456789")),
    );
    assert!(failures(&n.ev_a).is_empty(), "{:?}", n.ev_a);
    assert!(n.ev_a.iter().any(|e| matches!(e, Event::IkeSaUp { peer_identity: Identity::Ip(p), nat: false, .. } if *p == ip(B))));
    assert!(n.ev_b.iter().any(
        |e| matches!(e, Event::IkeSaUp { peer_identity: Identity::Ip(p), .. } if *p == ip(A))
    ));
    let ka = child_keys(&n.ev_a);
    let kb = child_keys(&n.ev_b);
    assert_eq!((ka.len(), kb.len()), (1, 1));
    assert_eq!(ka[0].mode, ChildMode::Transport);
    assert_eq!(ka[0].suite, dmvpn_esp::Suite::Aes256Gcm);
    assert!(ka[0].esn);
    assert_eq!(ka[0].local_ts.ip_protocol, 47);
    assert_eq!(ka[0].udp_encap, None);
    assert_esp_works(&ka[0], &kb[0]);
    assert_esp_works(&kb[0], &ka[0]);
    let snap = n.a.snapshot(n.now);
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].state, dmvpn_ike::IkeSaState::Established);
    assert_eq!(snap[0].peer_identity, Some(Identity::Ip(ip(B))));
    assert!(snap[0].initiator);
    assert_eq!(snap[0].children.len(), 1);
    assert_eq!(snap[0].children[0].spi_in, ka[0].spi_in);
    assert!(!n.b.snapshot(n.now)[0].initiator);
    // Four messages: IKE_SA_INIT and IKE_AUTH request/response, all on port 500.
    assert_eq!(n.wire.len(), 4);
    assert!(
        n.wire
            .iter()
            .all(|t| t.src.port() == 500 && t.dst.port() == 500)
    );
}

#[test]
fn wrong_psk_fails_authentication_on_both_sides() {
    let n = established(
        Config::new(ip(A), psk("sekrit-123456789")),
        Config::new(ip(B), psk("other-123456789")),
    );
    assert_eq!(failures(&n.ev_b), vec![FailReason::AuthenticationFailed]);
    assert_eq!(failures(&n.ev_a), vec![FailReason::AuthenticationFailed]);
    assert!(child_keys(&n.ev_a).is_empty() && child_keys(&n.ev_b).is_empty());
    assert_eq!(n.a.ike_sa_count() + n.b.ike_sa_count(), 0);
}

#[test]
fn p256_and_chacha_are_negotiated_when_preferred() {
    let mut ca = Config::new(ip(A), psk("sekrit-123456789"));
    ca.ike_dh = vec![dmvpn_ike::DhGroup::P256];
    ca.ike_encr = vec![dmvpn_ike::Encr::ChaCha20Poly1305];
    ca.esp_suites = vec![dmvpn_esp::Suite::ChaCha20Poly1305];
    ca.esn = false;
    let n = established(ca, Config::new(ip(B), psk("sekrit-123456789")));
    let ka = child_keys(&n.ev_a);
    let kb = child_keys(&n.ev_b);
    assert_eq!(ka[0].suite, dmvpn_esp::Suite::ChaCha20Poly1305);
    assert!(!ka[0].esn && !kb[0].esn);
    assert_esp_works(&ka[0], &kb[0]);
}

#[test]
fn invalid_ke_payload_makes_the_initiator_switch_group() {
    let ca = Config::new(ip(A), psk("sekrit-123456789"));
    let mut cb = Config::new(ip(B), psk("sekrit-123456789"));
    cb.ike_dh = vec![dmvpn_ike::DhGroup::P256];
    let n = established(ca, cb);
    assert_eq!(child_keys(&n.ev_a).len(), 1);
    // INIT with X25519, INVALID_KE, INIT with P-256, response, AUTH pair.
    assert_eq!(n.wire.len(), 6);
    // Rekeys use the group both accepted (P-256), not A's first choice.
    let mut n = n;
    n.a.rekey_child(n.now, ip(B)).unwrap();
    n.run();
    n.a.rekey_ike(n.now, ip(B)).unwrap();
    n.run();
    assert!(
        failures(&n.ev_a).is_empty() && failures(&n.ev_b).is_empty(),
        "{:?}",
        n.ev_b
    );
    assert!(
        n.ev_a
            .iter()
            .any(|e| matches!(e, Event::IkeSaRekeyed { .. }))
    );
}

#[test]
fn no_common_proposal_is_reported() {
    let mut ca = Config::new(ip(A), psk("sekrit-123456789"));
    ca.ike_encr = vec![dmvpn_ike::Encr::AesGcm128];
    let n = established(ca, Config::new(ip(B), psk("sekrit-123456789")));
    assert_eq!(failures(&n.ev_a), vec![FailReason::NoProposalChosen]);
    assert_eq!(failures(&n.ev_b), vec![FailReason::NoProposalChosen]);
}

#[test]
fn child_without_common_esp_suite_fails_but_ike_sa_stays() {
    let mut ca = Config::new(ip(A), psk("sekrit-123456789"));
    ca.esp_suites = vec![dmvpn_esp::Suite::Aes128Gcm];
    let n = established(ca, Config::new(ip(B), psk("sekrit-123456789")));
    assert_eq!(failures(&n.ev_a), vec![FailReason::NoProposalChosen]);
    assert!(n.a.is_established(ip(B)));
    assert!(child_keys(&n.ev_a).is_empty());
}

#[test]
fn ts_unacceptable_when_protocols_differ() {
    let mut ca = Config::new(ip(A), psk("sekrit-123456789"));
    ca.ts_protocol = 17;
    let n = established(ca, Config::new(ip(B), psk("sekrit-123456789")));
    assert_eq!(failures(&n.ev_b), vec![FailReason::TsUnacceptable]);
    assert_eq!(failures(&n.ev_a), vec![FailReason::TsUnacceptable]);
}

#[test]
fn lost_packets_are_retransmitted_and_timeouts_reported() {
    let mut n = Net::new(
        Config::new(ip(A), psk("sekrit-123456789")),
        Config::new(ip(B), psk("sekrit-123456789")),
    );
    n.drop_from_a = 2;
    n.a.initiate(n.now, ip(B)).unwrap();
    n.run();
    assert!(n.ev_a.is_empty());
    let t1 = n.a.poll_timeout().unwrap();
    assert_eq!(t1 - n.now, Duration::from_millis(500));
    n.advance(Duration::from_millis(500)); // retransmission 1: dropped
    let t2 = n.a.poll_timeout().unwrap();
    assert_eq!(t2 - n.now, Duration::from_millis(1000), "backoff doubles");
    n.advance(Duration::from_millis(1000)); // retransmission 2: delivered
    assert_eq!(child_keys(&n.ev_a).len(), 1);

    // Now B disappears: the liveness check times out after all retransmissions.
    let mut n2 = Net::new(
        Config::new(ip(A), psk("sekrit-123456789")),
        Config::new(ip(B), psk("sekrit-123456789")),
    );
    n2.drop_from_a = usize::MAX;
    n2.a.initiate(n2.now, ip(B)).unwrap();
    n2.run();
    for _ in 0..20 {
        if let Some(t) = n2.a.poll_timeout() {
            let d = t - n2.now;
            n2.advance(d);
        }
    }
    assert_eq!(failures(&n2.ev_a), vec![FailReason::Timeout]);
    assert_eq!(n2.a.ike_sa_count(), 0);
    // 6 transmissions of IKE_SA_INIT in total.
    assert_eq!(n2.wire.len(), 6);
}

#[test]
fn delete_and_liveness() {
    let mut n = established(
        Config::new(ip(A), psk("sekrit-123456789")),
        Config::new(ip(B), psk("sekrit-123456789")),
    );
    n.wire.clear();
    n.a.liveness(n.now, ip(B)).unwrap();
    n.run();
    assert_eq!(n.wire.len(), 2);
    assert!(n.a.is_established(ip(B)));
    n.b.delete(n.now, ip(A)).unwrap();
    n.run();
    for ev in [&n.ev_a, &n.ev_b] {
        assert!(ev.iter().any(|e| matches!(e, Event::ChildSaDown { .. })));
        assert!(ev.iter().any(|e| matches!(e, Event::IkeSaDown { .. })));
    }
    assert_eq!(n.a.ike_sa_count() + n.b.ike_sa_count(), 0);
}

#[test]
fn forced_encapsulation_moves_to_4500() {
    let mut ca = Config::new(ip(A), psk("sekrit-123456789"));
    ca.force_udp_encap = true;
    let n = established(ca, Config::new(ip(B), psk("sekrit-123456789")));
    let ka = child_keys(&n.ev_a);
    let kb = child_keys(&n.ev_b);
    assert_eq!(ka[0].udp_encap, Some((4500, 4500)));
    assert_eq!(kb[0].udp_encap, Some((4500, 4500)));
    assert!(
        n.wire[2..]
            .iter()
            .all(|t| t.dst.port() == 4500 && t.payload.starts_with(&[0, 0, 0, 0]))
    );
}

#[test]
fn responder_forcing_encapsulation_moves_the_initiator_to_4500() {
    let mut cb = Config::new(ip(B), psk("sekrit-123456789"));
    cb.force_udp_encap = true;
    let n = established(Config::new(ip(A), psk("sekrit-123456789")), cb);
    assert_eq!(child_keys(&n.ev_a)[0].udp_encap, Some((4500, 4500)));
    assert_eq!(child_keys(&n.ev_b)[0].udp_encap, Some((4500, 4500)));
}

#[test]
fn cookies_are_demanded_under_load_and_half_open_is_bounded() {
    let mut cb = Config::new(ip(B), psk("sekrit-123456789"));
    cb.cookie_threshold = 2;
    cb.max_half_open = 4;
    let mut b = Endpoint::new(cb, Instant::now()).unwrap();
    let now = Instant::now();
    // Floods of IKE_SA_INIT from spoofed initiators that never continue.
    for i in 0..50u8 {
        let mut a = Endpoint::new(Config::new(ip(A), psk("x-123456789abcdef")), now).unwrap();
        a.initiate(now, ip(B)).unwrap();
        let t = a.poll_transmit().unwrap();
        let src = SocketAddr::new(ip(&format!("198.51.100.{}", 10 + i)), 500);
        b.handle_datagram(now, src, t.dst, &t.payload);
    }
    assert_eq!(b.half_open(), 2);
    assert_eq!(b.stats().cookies_sent, 48);
    let mut answers = 0;
    while let Some(t) = b.poll_transmit() {
        assert!(
            t.payload.len() < 100 || answers < 2,
            "only two full answers"
        );
        answers += 1;
    }
    assert_eq!(answers, 50);
    // A real initiator answers the cookie and gets through.
    let mut n = Net::new(
        Config::new(ip(A), psk("sekrit-123456789")),
        Config::new(ip(B), psk("sekrit-123456789")),
    );
    n.b = b;
    n.a.initiate(n.now, ip(B)).unwrap();
    n.run();
    assert!(n.a.is_established(ip(B)), "{:?}", n.ev_a);
    // Half-open SAs expire.
    n.advance(Duration::from_secs(31));
    assert_eq!(n.b.half_open(), 0);
}

#[test]
fn child_and_ike_rekey_keep_traffic_flowing() {
    let mut n = established(
        Config::new(ip(A), psk("sekrit-123456789")),
        Config::new(ip(B), psk("sekrit-123456789")),
    );
    let old_a = child_keys(&n.ev_a)[0].clone();
    n.ev_a.clear();
    n.ev_b.clear();
    n.a.rekey_child(n.now, ip(B)).unwrap();
    n.run();
    let new_a = child_keys(&n.ev_a);
    let new_b = child_keys(&n.ev_b);
    assert_eq!((new_a.len(), new_b.len()), (1, 1));
    assert_ne!(new_a[0].spi_in, old_a.spi_in);
    assert_esp_works(&new_a[0], &new_b[0]);
    assert!(
        n.ev_a
            .iter()
            .any(|e| matches!(e, Event::ChildSaUp { rekeys: Some(s), .. } if *s == old_a.spi_in))
    );
    // The old SA goes only after the new one is up.
    let up = n
        .ev_a
        .iter()
        .position(|e| matches!(e, Event::ChildSaUp { .. }))
        .unwrap();
    let down = n
        .ev_a
        .iter()
        .position(|e| matches!(e, Event::ChildSaDown { spi_in, .. } if *spi_in == old_a.spi_in))
        .unwrap();
    assert!(up < down);
    assert!(
        n.ev_b
            .iter()
            .any(|e| matches!(e, Event::ChildSaDown { spi_out, .. } if *spi_out == old_a.spi_in))
    );

    n.a.rekey_ike(n.now, ip(B)).unwrap();
    n.run();
    assert!(failures(&n.ev_a).is_empty() && failures(&n.ev_b).is_empty());
    // The old IKE SA was deleted on both sides; its CHILD SA moved to the new one.
    assert_eq!((n.a.ike_sa_count(), n.b.ike_sa_count()), (1, 1));
    assert!(!n.ev_a.iter().any(|e| matches!(e, Event::IkeSaDown { .. })));
    // The rekeyed IKE SA still works: liveness and another child rekey.
    n.ev_a.clear();
    n.a.rekey_child(n.now, ip(B)).unwrap();
    n.run();
    assert_eq!(child_keys(&n.ev_a).len(), 1, "{:?}", n.ev_a);
}

struct TestPki {
    ca: Vec<u8>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn test_pki() -> TestPki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name.push(DnType::CommonName, "test CA");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).unwrap();
    TestPki {
        ca: cert.der().to_vec(),
        issuer: Issuer::new(p, key),
    }
}

fn cert_auth(
    pki: &TestPki,
    alg: &'static rcgen::SignatureAlgorithm,
    san: &str,
    pad_cn: usize,
) -> AuthConfig {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};
    let key = KeyPair::generate_for(alg).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    // A long CN makes the certificate big enough to need IKE fragmentation when asked.
    p.distinguished_name
        .push(DnType::CommonName, format!("{san}{}", "x".repeat(pad_cn)));
    p.subject_alt_names = vec![SanType::IpAddress(ip(san))];
    let cert = p.signed_by(&key, &pki.issuer).unwrap();
    AuthConfig::Certificate {
        cert: cert.der().to_vec(),
        key_pkcs8: Zeroizing::new(key.serialize_der()),
        cas: vec![pki.ca.clone()],
    }
}

#[test]
fn certificates_ecdsa_and_ed25519() {
    let pki = test_pki();
    for (alg_a, alg_b) in [
        (
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P256_SHA256,
        ),
        (&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P256_SHA256),
        (&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ED25519),
    ] {
        let n = established(
            Config::new(ip(A), cert_auth(&pki, alg_a, A, 0)),
            Config::new(ip(B), cert_auth(&pki, alg_b, B, 0)),
        );
        assert!(
            failures(&n.ev_a).is_empty() && failures(&n.ev_b).is_empty(),
            "{:?} {:?}",
            n.ev_a,
            n.ev_b
        );
        assert!(n.ev_a.iter().any(
            |e| matches!(e, Event::IkeSaUp { peer_identity: Identity::Ip(p), .. } if *p == ip(B))
        ));
        assert_esp_works(&child_keys(&n.ev_a)[0], &child_keys(&n.ev_b)[0]);
    }
}

#[test]
fn certificate_from_another_ca_or_for_another_address_is_refused() {
    let pki = test_pki();
    let other = test_pki();
    // B's certificate is from a CA that A does not trust.
    let n = established(
        Config::new(ip(A), cert_auth(&pki, &rcgen::PKCS_ECDSA_P256_SHA256, A, 0)),
        Config::new(
            ip(B),
            cert_auth(&other, &rcgen::PKCS_ECDSA_P256_SHA256, B, 0),
        ),
    );
    assert_eq!(
        failures(&n.ev_b),
        vec![FailReason::AuthenticationFailed],
        "{:?}",
        n.ev_b
    );
    assert_eq!(failures(&n.ev_a), vec![FailReason::AuthenticationFailed]);
    // A's certificate names another address than the ID it sends.
    let n = established(
        Config::new(
            ip(A),
            cert_auth(&pki, &rcgen::PKCS_ECDSA_P256_SHA256, "198.51.100.99", 0),
        ),
        Config::new(ip(B), cert_auth(&pki, &rcgen::PKCS_ECDSA_P256_SHA256, B, 0)),
    );
    assert_eq!(failures(&n.ev_b), vec![FailReason::AuthenticationFailed]);
    match n.ev_b.iter().find(|e| matches!(e, Event::Failed { .. })) {
        Some(Event::Failed { detail, .. }) => {
            assert!(detail.contains("does not cover its ID"), "{detail}")
        }
        _ => unreachable!(),
    }
}

#[test]
fn large_ike_auth_is_fragmented_and_reassembled() {
    let pki = test_pki();
    let mut ca = Config::new(
        ip(A),
        cert_auth(&pki, &rcgen::PKCS_ECDSA_P256_SHA256, A, 40),
    );
    ca.fragment_size = 576;
    let mut cb = Config::new(
        ip(B),
        cert_auth(&pki, &rcgen::PKCS_ECDSA_P256_SHA256, B, 40),
    );
    cb.fragment_size = 576;
    let n = established(ca, cb);
    assert!(
        failures(&n.ev_a).is_empty() && failures(&n.ev_b).is_empty(),
        "{:?} {:?}",
        n.ev_a,
        n.ev_b
    );
    assert_eq!(child_keys(&n.ev_a).len(), 1);
    // IKE_AUTH went in SKF fragments no larger than the configured size.
    let auth: Vec<_> = n.wire.iter().skip(2).collect();
    assert!(
        auth.len() > 2,
        "IKE_AUTH was not fragmented: {} datagrams",
        auth.len()
    );
    assert!(
        auth.iter().all(|t| t.payload.len() <= 576),
        "{:?}",
        auth.iter().map(|t| t.payload.len()).collect::<Vec<_>>()
    );
    let skf = auth.iter().filter(|t| {
        let m = dmvpn_ike::wire::Message::decode(&t.payload).unwrap();
        matches!(
            m.payloads.last(),
            Some(dmvpn_ike::wire::Payload::Skf { .. })
        )
    });
    assert!(skf.count() > 2);
}

#[test]
fn initiator_rejecting_the_responder_tears_down_both_sides() {
    let pki = test_pki();
    // B's certificate names another address than the ID it sends: B accepts A first,
    // then A refuses B, tells it, and B must take back what it reported up.
    let n = established(
        Config::new(ip(A), cert_auth(&pki, &rcgen::PKCS_ECDSA_P256_SHA256, A, 0)),
        Config::new(
            ip(B),
            cert_auth(&pki, &rcgen::PKCS_ECDSA_P256_SHA256, "198.51.100.99", 0),
        ),
    );
    assert_eq!(failures(&n.ev_a), vec![FailReason::AuthenticationFailed]);
    assert_eq!(
        failures(&n.ev_b),
        vec![FailReason::AuthenticationFailed],
        "{:?}",
        n.ev_b
    );
    assert!(
        n.ev_b
            .iter()
            .any(|e| matches!(e, Event::ChildSaDown { .. }))
    );
    assert!(n.ev_b.iter().any(|e| matches!(e, Event::IkeSaDown { .. })));
    assert_eq!(n.a.ike_sa_count() + n.b.ike_sa_count(), 0);
}

#[test]
fn simultaneous_initiation_leaves_one_sa_pair() {
    let mut n = Net::new(
        Config::new(ip(A), psk("sekrit-123456789")),
        Config::new(ip(B), psk("sekrit-123456789")),
    );
    n.a.initiate(n.now, ip(B)).unwrap();
    n.b.initiate(n.now, ip(A)).unwrap();
    n.run();
    assert!(failures(&n.ev_a).is_empty() && failures(&n.ev_b).is_empty());
    assert_eq!((n.a.ike_sa_count(), n.b.ike_sa_count()), (1, 1));
    // The CHILD SAs still up on each side are the two halves of the same SA.
    let live = |ev: &[Event]| {
        let down: Vec<u32> = ev
            .iter()
            .filter_map(|e| match e {
                Event::ChildSaDown { spi_in, .. } => Some(*spi_in),
                _ => None,
            })
            .collect();
        child_keys(ev)
            .into_iter()
            .filter(|k| !down.contains(&k.spi_in))
            .collect::<Vec<_>>()
    };
    let (la, lb) = (live(&n.ev_a), live(&n.ev_b));
    assert_eq!((la.len(), lb.len()), (1, 1), "{:?} {:?}", n.ev_a, n.ev_b);
    assert_esp_works(&la[0], &lb[0]);
    assert_esp_works(&lb[0], &la[0]);
}

#[test]
fn initial_contact_after_a_restart_drops_the_stale_sa() {
    let mut n = established(
        Config::new(ip(A), psk("sekrit-123456789")),
        Config::new(ip(B), psk("sekrit-123456789")),
    );
    let old_b = child_keys(&n.ev_b)[0].clone();
    // A restarts: a fresh endpoint with no memory of the SA.
    n.a = Endpoint::new(Config::new(ip(A), psk("sekrit-123456789")), n.now).unwrap();
    n.ev_b.clear();
    n.wire.clear();
    n.a.initiate(n.now, ip(B)).unwrap();
    n.run();
    assert_eq!(n.b.ike_sa_count(), 1);
    assert!(
        n.ev_b
            .iter()
            .any(|e| matches!(e, Event::ChildSaDown { spi_in, .. } if *spi_in == old_b.spi_in)),
        "{:?}",
        n.ev_b
    );
    assert!(n.ev_b.iter().any(|e| matches!(e, Event::IkeSaDown { .. })));
    assert_eq!(child_keys(&n.ev_b).len(), 1);
    // Only the new exchange went on the wire: no delete for the stale SA.
    assert_eq!(n.wire.len(), 4);
}

#[test]
fn ipv6_nbma_addresses() {
    let (a6, b6) = (ip("2001:db8::1"), ip("2001:db8::2"));
    let mut n = Net::new(
        Config::new(a6, psk("sekrit-123456789")),
        Config::new(b6, psk("sekrit-123456789")),
    );
    n.a.initiate(n.now, b6).unwrap();
    n.run();
    let (ka, kb) = (child_keys(&n.ev_a), child_keys(&n.ev_b));
    assert_eq!((ka.len(), kb.len()), (1, 1), "{:?}", n.ev_a);
    assert_eq!(
        ka[0].local_ts,
        dmvpn_ike::wire::TrafficSelector::host(a6, 47)
    );
    assert_eq!(
        ka[0].remote_ts,
        dmvpn_ike::wire::TrafficSelector::host(b6, 47)
    );
    assert_eq!(ka[0].udp_encap, None);
    assert_esp_works(&ka[0], &kb[0]);
    assert!(
        n.a.initiate(n.now, ip(B)).is_err(),
        "IPv4 peer from an IPv6 endpoint"
    );
}

fn step(n: &mut Net, secs: u64) {
    for _ in 0..secs {
        n.advance(Duration::from_secs(1));
    }
}

#[test]
fn scheduled_rekeys_and_hard_lifetimes() {
    // Both sides: CHILD SAs rekeyed by the initiator at 90 % of 10 s.
    let mut ca = Config::new(ip(A), psk("sekrit-123456789"));
    ca.child_lifetime = Duration::from_secs(10);
    let mut cb = Config::new(ip(B), psk("sekrit-123456789"));
    cb.child_lifetime = Duration::from_secs(10);
    let mut n = established(ca, cb);
    n.ev_a.clear();
    step(&mut n, 9);
    assert!(
        n.ev_a.iter().any(|e| matches!(
            e,
            Event::ChildSaUp {
                rekeys: Some(_),
                ..
            }
        )),
        "{:?}",
        n.ev_a
    );
    assert!(failures(&n.ev_a).is_empty());

    // Only the responder has a short CHILD lifetime: nobody rekeys in time, so it deletes
    // the CHILD SA when the lifetime ends; the IKE SA stays.
    let mut cb = Config::new(ip(B), psk("sekrit-123456789"));
    cb.child_lifetime = Duration::from_secs(10);
    let mut n = established(Config::new(ip(A), psk("sekrit-123456789")), cb);
    step(&mut n, 11);
    for ev in [&n.ev_a, &n.ev_b] {
        assert!(
            ev.iter().any(|e| matches!(e, Event::ChildSaDown { .. })),
            "{ev:?}"
        );
        assert!(!ev.iter().any(|e| matches!(e, Event::IkeSaDown { .. })));
    }
    assert!(n.a.is_established(ip(B)));

    // The same for the IKE SA: it ends, with its CHILD SA, on both sides.
    let mut cb = Config::new(ip(B), psk("sekrit-123456789"));
    cb.ike_lifetime = Duration::from_secs(20);
    let mut n = established(Config::new(ip(A), psk("sekrit-123456789")), cb);
    step(&mut n, 21);
    for ev in [&n.ev_a, &n.ev_b] {
        assert!(
            ev.iter().any(|e| matches!(e, Event::IkeSaDown { .. })),
            "{ev:?}"
        );
    }
    assert_eq!(n.a.ike_sa_count() + n.b.ike_sa_count(), 0);
}
