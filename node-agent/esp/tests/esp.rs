//! Behaviour of ESP SAs and the SA database: round trips, wire format, ESN, anti-replay,
//! tampering, truncation, lifetimes, rekey.

mod common;

use std::time::{Duration, Instant};

use common::{default_padding, keymat, reference_seal, reference_seal_plaintext};
use dmvpn_esp::{
    Direction, ESP_HEADROOM, EspError, InboundSa, Lifetime, LimitKind, OutboundSa, SaDatabase,
    SaEvent, SaSignal, SecurityAssociation, Suite, sealed_len,
};

const SPI: u32 = 0x1234_5678;

fn pair(suite: Suite, esn: bool, life: Lifetime, now: Instant) -> (OutboundSa, InboundSa) {
    let sa = SecurityAssociation::new(SPI, suite, &keymat(suite, 3))
        .unwrap()
        .with_esn(esn)
        .with_lifetime(life)
        .unwrap();
    (
        sa.clone().into_outbound(now).unwrap(),
        sa.into_inbound(now).unwrap(),
    )
}

fn seal(tx: &mut OutboundSa, now: Instant, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    tx.seal_to_vec(now, 47, payload, &mut out).unwrap();
    out
}

fn gre(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 1) as u8).collect()
}

#[test]
fn roundtrip_all_suites_all_pad_lengths() {
    let now = Instant::now();
    for suite in Suite::ALL {
        for esn in [false, true] {
            let (mut tx, mut rx) = pair(suite, esn, Lifetime::default(), now);
            for len in 0..=67usize {
                let payload = gre(len);
                let mut pkt = seal(&mut tx, now, &payload);
                assert_eq!(pkt.len(), sealed_len(len));
                // ESP trailer alignment: ciphertext is a multiple of 4 (RFC 4303 §2.4).
                assert_eq!((pkt.len() - ESP_HEADROOM - 16) % 4, 0);
                let o = rx.open_in_place(now, &mut pkt).unwrap();
                assert_eq!(o.next_header, 47);
                assert_eq!(&pkt[o.payload.clone()], &payload[..], "{suite} len {len}");
                assert_eq!(o.seq, len as u64 + 1);
            }
            assert_eq!(rx.counters().packets, 68);
            assert_eq!(rx.counters().dropped(), 0);
            assert_eq!(tx.counters().packets, 68);
        }
    }
}

#[test]
fn wire_format_matches_independent_encoder() {
    let now = Instant::now();
    for suite in Suite::ALL {
        for esn in [false, true] {
            let (mut tx, _) = pair(suite, esn, Lifetime::default(), now);
            if esn {
                // High half non-zero: shows it is in the AAD but not on the wire.
                tx.skip_to_seq(0x1_0000_0005);
            }
            for len in [0usize, 1, 2, 3, 100, 1400] {
                let seq = tx.next_seq();
                let ours = seal(&mut tx, now, &gre(len));
                let padding = default_padding((4 - (len + 2) % 4) % 4);
                let theirs = reference_seal(
                    suite,
                    &keymat(suite, 3),
                    SPI,
                    seq,
                    esn,
                    seq.to_be_bytes(),
                    47,
                    &gre(len),
                    &padding,
                );
                assert_eq!(ours, theirs, "{suite} esn {esn} len {len}");
                // Only the low 32 bits of the sequence number are on the wire.
                assert_eq!(&ours[4..8], &(seq as u32).to_be_bytes());
            }
        }
    }
}

#[test]
fn opens_any_pad_length_and_rejects_bad_padding() {
    let now = Instant::now();
    for suite in Suite::ALL {
        let (_, mut rx) = pair(suite, true, Lifetime::default(), now);
        let km = keymat(suite, 3);
        let mut seq = 0u64;
        for pad in 0..=255usize {
            seq += 1;
            let mut pkt = reference_seal(
                suite,
                &km,
                SPI,
                seq,
                true,
                [9; 8],
                47,
                b"gre!",
                &default_padding(pad),
            );
            let o = rx.open_in_place(now, &mut pkt).unwrap();
            assert_eq!(&pkt[o.payload], b"gre!");
        }
        // Authentic packets with a broken trailer.
        let bad: [&[u8]; 4] = [
            b"gre!\x01\x02\x04\x03\x2f", // padding 1, 2, 4 instead of 1, 2, 3
            b"gre!\x00\x01\x2f",         // padding must start at 1
            b"\x01\x02\x03\xc8\x2f",     // pad length 200 > plaintext
            b"\x2f",                     // no room for the pad length byte
        ];
        for plain in bad {
            seq += 1;
            let mut pkt = reference_seal_plaintext(suite, &km, SPI, seq, true, [1; 8], plain);
            let want = if plain.len() < 2 {
                EspError::Truncated { len: pkt.len() }
            } else {
                EspError::BadPadding
            };
            assert_eq!(rx.open_in_place(now, &mut pkt), Err(want), "{plain:?}");
        }
        assert_eq!(rx.counters().bad_padding, 3);
        assert_eq!(rx.counters().truncated, 1);
        // A malformed authentic packet still took its place in the window.
        let mut again = reference_seal_plaintext(suite, &km, SPI, seq - 1, true, [1; 8], bad[2]);
        assert_eq!(
            rx.open_in_place(now, &mut again),
            Err(EspError::Replayed { seq: seq - 1 })
        );
        // The truncated one did not (it was never authenticated).
        let mut fixed = reference_seal(suite, &km, SPI, seq, true, [1; 8], 47, b"", &[]);
        assert!(rx.open_in_place(now, &mut fixed).is_ok());
    }
}

#[test]
fn esn_wraparound_receiver_infers_high_bits() {
    let now = Instant::now();
    for suite in Suite::ALL {
        let (mut tx, mut rx) = pair(suite, true, Lifetime::UNLIMITED, now);
        // Bring the receiver near the end of the first 2^32 subspace, in steps of less than
        // 2^31 (a bigger jump reads as a packet from the past).
        for step in [0x7000_0000u64, 0xE000_0000, (1 << 32) - 2000] {
            tx.skip_to_seq(step);
            let mut p = seal(&mut tx, now, b"x");
            rx.open_in_place(now, &mut p).unwrap();
        }
        tx.skip_to_seq((1 << 32) - 5);
        let mut sealed = Vec::new();
        for _ in 0..10 {
            sealed.push((tx.next_seq(), seal(&mut tx, now, b"across the wrap")));
        }
        // Deliver out of order around the wrap point: the new subspace first, then the old.
        sealed.swap(2, 7);
        for (seq, mut pkt) in sealed {
            let o = rx.open_in_place(now, &mut pkt).unwrap();
            assert_eq!(o.seq, seq);
            assert_eq!(&pkt[o.payload], b"across the wrap");
        }
        assert_eq!(rx.highest_seq(), (1 << 32) + 4);
        // A packet from far back in the old subspace is now too old.
        let (mut tx2, _) = pair(suite, true, Lifetime::UNLIMITED, now);
        tx2.skip_to_seq((1 << 32) - 3000);
        let mut old = seal(&mut tx2, now, b"old");
        assert!(rx.open_in_place(now, &mut old).is_err());
    }
}

#[test]
fn esn_high_bits_are_authenticated() {
    let now = Instant::now();
    let (mut tx, _) = pair(Suite::Aes256Gcm, true, Lifetime::UNLIMITED, now);
    let (_, mut rx_no_esn) = pair(Suite::Aes256Gcm, false, Lifetime::UNLIMITED, now);
    tx.skip_to_seq((1 << 32) + 10);
    let mut pkt = seal(&mut tx, now, b"hi");
    // A non-ESN receiver sees seq 10 and builds the AAD without the high half: ICV mismatch.
    assert_eq!(
        rx_no_esn.open_in_place(now, &mut pkt),
        Err(EspError::AuthFailed)
    );
}

#[test]
fn non_esn_sequence_exhaustion() {
    let now = Instant::now();
    let (mut tx, _) = pair(Suite::ChaCha20Poly1305, false, Lifetime::UNLIMITED, now);
    tx.skip_to_seq(u64::from(u32::MAX) - 1);
    let mut out = Vec::new();
    tx.seal_to_vec(now, 47, b"a", &mut out).unwrap();
    // The rekey was asked for well before the end (at 7/8 of the space).
    assert_eq!(
        tx.poll_signal(),
        Some(SaSignal::RekeyNeeded(LimitKind::SequenceNumbers))
    );
    tx.seal_to_vec(now, 47, b"b", &mut out).unwrap(); // seq 2^32 - 1: the last one
    assert_eq!(
        tx.poll_signal(),
        Some(SaSignal::Expired(LimitKind::SequenceNumbers))
    );
    assert_eq!(
        tx.seal_to_vec(now, 47, b"c", &mut out),
        Err(EspError::LifetimeExpired {
            limit: LimitKind::SequenceNumbers
        })
    );
    assert_eq!(tx.counters().expired, 1);
    assert_eq!(tx.counters().packets, 2);
}

#[test]
fn rekey_signal_comes_well_before_sequence_end() {
    let now = Instant::now();
    let (mut tx, _) = pair(Suite::Aes256Gcm, false, Lifetime::UNLIMITED, now);
    let soft = u64::from(u32::MAX) - u64::from(u32::MAX) / 8;
    tx.skip_to_seq(soft - 1);
    seal(&mut tx, now, b"a");
    assert_eq!(tx.poll_signal(), None);
    seal(&mut tx, now, b"b");
    assert_eq!(
        tx.poll_signal(),
        Some(SaSignal::RekeyNeeded(LimitKind::SequenceNumbers))
    );
    assert!(u64::from(u32::MAX) - soft > 500_000_000);
}

#[test]
fn anti_replay_duplicates_too_old_and_reordering() {
    let now = Instant::now();
    let (mut tx, mut rx) = pair(Suite::Aes256Gcm, true, Lifetime::UNLIMITED, now);
    let pkts: Vec<Vec<u8>> = (0..3000).map(|_| seal(&mut tx, now, b"p")).collect();
    let open = |rx: &mut InboundSa, i: usize| {
        let mut p = pkts[i].clone();
        rx.open_in_place(now, &mut p).map(|o| o.seq)
    };
    // Out of order within the window: accepted once each.
    for i in [10, 3, 7, 0, 1, 2, 9, 8, 4, 5, 6] {
        assert_eq!(open(&mut rx, i), Ok(i as u64 + 1));
    }
    for i in 0..11 {
        assert_eq!(
            open(&mut rx, i),
            Err(EspError::Replayed { seq: i as u64 + 1 })
        );
    }
    // Window advance: jump to seq 2000; 976 is the oldest still inside (2000 - 1024 + 1 = 977).
    assert_eq!(open(&mut rx, 1999), Ok(2000));
    assert_eq!(open(&mut rx, 975), Err(EspError::TooOld { seq: 976 }));
    assert_eq!(open(&mut rx, 976), Ok(977));
    assert_eq!(open(&mut rx, 1500), Ok(1501));
    assert_eq!(open(&mut rx, 1500), Err(EspError::Replayed { seq: 1501 }));
    assert_eq!(open(&mut rx, 20), Err(EspError::TooOld { seq: 21 }));
    // Advance by more than the whole window: older packets all too old, newer all fine.
    assert_eq!(open(&mut rx, 2999), Ok(3000));
    assert_eq!(open(&mut rx, 1975), Err(EspError::TooOld { seq: 1976 }));
    for i in 1976..2999 {
        if i != 1999 {
            assert_eq!(open(&mut rx, i), Ok(i as u64 + 1));
        }
    }
    let c = rx.counters();
    assert_eq!(c.replayed, 12);
    assert_eq!(c.too_old, 3);
    assert_eq!(c.packets, 11 + 3 + 1 + 1022);
}

#[test]
fn replay_window_is_configurable_and_bounded() {
    let sa = SecurityAssociation::new(SPI, Suite::Aes256Gcm, &keymat(Suite::Aes256Gcm, 0)).unwrap();
    assert_eq!(sa.replay_window(), 1024);
    assert!(sa.clone().with_replay_window(4096).is_ok());
    assert!(sa.clone().with_replay_window(16).is_err());
    assert!(sa.with_replay_window(1 << 20).is_err());
    assert!(SecurityAssociation::new(255, Suite::Aes256Gcm, &[0; 36]).is_err());
    assert!(SecurityAssociation::new(SPI, Suite::Aes256Gcm, &[0; 20]).is_err());
}

#[test]
fn every_flipped_bit_is_rejected_and_counted() {
    let now = Instant::now();
    for suite in Suite::ALL {
        let (mut tx, mut rx) = pair(suite, true, Lifetime::UNLIMITED, now);
        let pkt = seal(&mut tx, now, &gre(61));
        for bit in 0..pkt.len() * 8 {
            let mut t = pkt.clone();
            t[bit / 8] ^= 1 << (bit % 8);
            assert!(rx.open_in_place(now, &mut t).is_err(), "{suite} bit {bit}");
        }
        let c = *rx.counters();
        assert_eq!(c.dropped(), pkt.len() as u64 * 8);
        assert_eq!(c.wrong_spi, 32);
        assert_eq!(c.packets, 0);
        // The genuine packet still opens: failures do not move the window.
        let mut good = pkt.clone();
        assert!(rx.open_in_place(now, &mut good).is_ok());
    }
}

#[test]
fn every_truncation_is_rejected_and_counted() {
    let now = Instant::now();
    let (mut tx, mut rx) = pair(Suite::Aes256Gcm, true, Lifetime::UNLIMITED, now);
    let pkt = seal(&mut tx, now, &gre(40));
    for len in 0..pkt.len() {
        let mut t = pkt[..len].to_vec();
        let r = rx.open_in_place(now, &mut t);
        if len < 16 + 2 + 16 {
            assert_eq!(r, Err(EspError::Truncated { len }));
        } else {
            assert_eq!(r, Err(EspError::AuthFailed));
        }
    }
    assert_eq!(rx.counters().truncated, 34);
    assert_eq!(rx.counters().auth_failed, pkt.len() as u64 - 34);
}

#[test]
fn seal_needs_room_and_counts_refusals() {
    let now = Instant::now();
    let (mut tx, _) = pair(Suite::Aes256Gcm, true, Lifetime::UNLIMITED, now);
    let mut buf = vec![0u8; sealed_len(10) - 1];
    assert_eq!(
        tx.seal_in_place(now, 47, &mut buf, 10),
        Err(EspError::BufferTooSmall {
            needed: sealed_len(10),
            have: sealed_len(10) - 1
        })
    );
    assert_eq!(tx.counters().buffer_too_small, 1);
    // A refused packet does not consume a sequence number.
    assert_eq!(tx.next_seq(), 1);
    // Extra room after the packet is left alone.
    let mut big = vec![0xAAu8; 200];
    let n = tx.seal_in_place(now, 47, &mut big, 10).unwrap();
    assert_eq!(n, sealed_len(10));
    assert!(big[n..].iter().all(|b| *b == 0xAA));
}

#[test]
fn lifetime_packets_soft_then_hard() {
    let now = Instant::now();
    let life = Lifetime {
        soft_packets: Some(5),
        hard_packets: Some(8),
        ..Lifetime::UNLIMITED
    };
    let (mut tx, mut rx) = pair(Suite::Aes256Gcm, true, life, now);
    let mut pkts = Vec::new();
    for i in 1..=8u64 {
        pkts.push(seal(&mut tx, now, b"data"));
        let sig = tx.poll_signal();
        match i {
            5 => assert_eq!(sig, Some(SaSignal::RekeyNeeded(LimitKind::Packets))),
            8 => assert_eq!(sig, Some(SaSignal::Expired(LimitKind::Packets))),
            _ => assert_eq!(sig, None, "packet {i}"),
        }
    }
    let mut out = Vec::new();
    assert_eq!(
        tx.seal_to_vec(now, 47, b"data", &mut out),
        Err(EspError::LifetimeExpired {
            limit: LimitKind::Packets
        })
    );
    // Inbound counts too.
    for p in &mut pkts {
        rx.open_in_place(now, p).unwrap();
    }
    assert!(rx.rekey_needed() && rx.expired());
    let mut extra = SecurityAssociation::new(SPI, Suite::Aes256Gcm, &keymat(Suite::Aes256Gcm, 3))
        .unwrap()
        .into_outbound(now)
        .unwrap();
    extra.skip_to_seq(9);
    let mut p9 = seal(&mut extra, now, b"data");
    assert_eq!(
        rx.open_in_place(now, &mut p9),
        Err(EspError::LifetimeExpired {
            limit: LimitKind::Packets
        })
    );
    assert_eq!(rx.counters().expired, 1);
}

#[test]
fn lifetime_bytes_soft_then_hard() {
    let now = Instant::now();
    let life = Lifetime {
        soft_bytes: Some(1000),
        hard_bytes: Some(2000),
        ..Lifetime::UNLIMITED
    };
    let (mut tx, _) = pair(Suite::ChaCha20Poly1305, true, life, now);
    let mut signals = Vec::new();
    let mut sealed = 0;
    while seal_ok(&mut tx, now, &[0u8; 300]) {
        sealed += 1;
        signals.extend(std::iter::from_fn(|| tx.poll_signal()).map(|s| (sealed, s)));
    }
    assert_eq!(
        signals,
        vec![
            (4, SaSignal::RekeyNeeded(LimitKind::Bytes)),
            (7, SaSignal::Expired(LimitKind::Bytes))
        ]
    );
    assert_eq!(tx.counters().bytes, 2100);
}

fn seal_ok(tx: &mut OutboundSa, now: Instant, p: &[u8]) -> bool {
    let mut out = Vec::new();
    tx.seal_to_vec(now, 47, p, &mut out).is_ok()
}

#[test]
fn lifetime_time_soft_then_hard() {
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    let life = Lifetime {
        soft_time: Some(100 * s),
        hard_time: Some(120 * s),
        ..Lifetime::UNLIMITED
    };
    let (mut tx, mut rx) = pair(Suite::Aes128Gcm, true, life, t0);
    assert_eq!(tx.poll_timeout(), Some(t0 + 100 * s));
    tx.handle_timeout(t0 + 99 * s);
    assert_eq!(tx.poll_signal(), None);
    tx.handle_timeout(t0 + 100 * s);
    assert_eq!(
        tx.poll_signal(),
        Some(SaSignal::RekeyNeeded(LimitKind::Time))
    );
    assert_eq!(tx.poll_timeout(), Some(t0 + 120 * s));
    let mut p = seal(&mut tx, t0 + 119 * s, b"still fine");
    assert!(rx.open_in_place(t0 + 119 * s, &mut p).is_ok());
    let mut out = Vec::new();
    assert_eq!(
        tx.seal_to_vec(t0 + 120 * s, 47, b"late", &mut out),
        Err(EspError::LifetimeExpired {
            limit: LimitKind::Time
        })
    );
    assert_eq!(tx.poll_signal(), Some(SaSignal::Expired(LimitKind::Time)));
    assert_eq!(tx.poll_timeout(), None);
    // Inbound refuses after its own hard time.
    let mut tx2 = SecurityAssociation::new(SPI, Suite::Aes128Gcm, &keymat(Suite::Aes128Gcm, 3))
        .unwrap()
        .into_outbound(t0)
        .unwrap();
    tx2.skip_to_seq(5);
    let mut q = seal(&mut tx2, t0, b"x");
    assert_eq!(
        rx.open_in_place(t0 + 121 * s, &mut q),
        Err(EspError::LifetimeExpired {
            limit: LimitKind::Time
        })
    );
}

#[test]
fn database_rekey_without_loss_and_events() {
    type Peer = std::net::IpAddr;
    let now = Instant::now();
    let a: Peer = "198.51.100.1".parse().unwrap();
    let b: Peer = "198.51.100.2".parse().unwrap();
    let life = Lifetime {
        soft_packets: Some(3),
        hard_packets: Some(100),
        ..Lifetime::UNLIMITED
    };
    let mk = |spi: u32, fill: u8| {
        SecurityAssociation::new(spi, Suite::Aes256Gcm, &keymat(Suite::Aes256Gcm, fill))
            .unwrap()
            .with_lifetime(life)
            .unwrap()
    };
    // Node A sends to B; B receives.
    let mut node_a: SaDatabase<Peer> = SaDatabase::new();
    let mut node_b: SaDatabase<Peer> = SaDatabase::new();
    node_a.install_outbound(b, mk(0x1001, 1).into_outbound(now).unwrap());
    node_b
        .install_inbound(a, mk(0x1001, 1).into_inbound(now).unwrap())
        .unwrap();

    let send = |db: &mut SaDatabase<Peer>, msg: &[u8]| {
        let mut buf = vec![0u8; sealed_len(msg.len())];
        buf[ESP_HEADROOM..ESP_HEADROOM + msg.len()].copy_from_slice(msg);
        let n = db.seal_in_place(now, &b, 47, &mut buf, msg.len()).unwrap();
        buf.truncate(n);
        buf
    };
    let mut in_flight: Vec<Vec<u8>> = (0..3).map(|i| send(&mut node_a, &[i])).collect();
    assert_eq!(
        node_a.poll_event(),
        Some(SaEvent::RekeyNeeded {
            peer: b,
            spi: 0x1001,
            direction: Direction::Outbound,
            limit: LimitKind::Packets
        })
    );
    assert_eq!(node_a.poll_event(), None);

    // Rekey: B installs the new inbound SA first, then A switches its outbound SA.
    node_b
        .install_inbound(a, mk(0x2002, 2).into_inbound(now).unwrap())
        .unwrap();
    assert_eq!(
        node_b.install_inbound(a, mk(0x2002, 2).into_inbound(now).unwrap()),
        Err(dmvpn_esp::ConfigError::SpiInUse { spi: 0x2002 })
    );
    let old = node_a.install_outbound(b, mk(0x2002, 2).into_outbound(now).unwrap());
    assert_eq!(old.map(|o| o.spi()), Some(0x1001));
    in_flight.extend((3..6).map(|i| send(&mut node_a, &[i])));

    // Everything arrives, old-SA packets last: nothing is lost.
    in_flight.rotate_left(3);
    let mut got = Vec::new();
    for p in &mut in_flight {
        let o = node_b.open_in_place(now, p).unwrap();
        assert_eq!(o.peer, a);
        got.push((o.spi, p[o.payload][0]));
    }
    got.sort_by_key(|x| x.1);
    assert_eq!(
        got,
        vec![
            (0x1001, 0),
            (0x1001, 1),
            (0x1001, 2),
            (0x2002, 3),
            (0x2002, 4),
            (0x2002, 5)
        ]
    );
    let mut spis: Vec<u32> = node_b.inbound_spis(&a).collect();
    spis.sort();
    assert_eq!(spis, vec![0x1001, 0x2002]);

    // The old inbound SA is deleted: a late old packet is now an unknown SPI.
    let (mut late_tx, _) = (mk(0x1001, 1).into_outbound(now).unwrap(), ());
    late_tx.skip_to_seq(50);
    let mut late = Vec::new();
    late_tx.seal_to_vec(now, 47, b"late", &mut late).unwrap();
    assert!(node_b.remove_inbound(0x1001).is_some());
    assert_eq!(
        node_b.open_in_place(now, &mut late),
        Err(EspError::UnknownSpi { spi: 0x1001 })
    );
    let t = node_b.totals();
    assert_eq!(t.unknown_spi, 1);
    assert_eq!(t.inbound.packets, 6); // counters of the removed SA are kept
    assert_eq!(
        node_b.open_in_place(now, &mut [1, 2]),
        Err(EspError::Truncated { len: 2 })
    );
    assert_eq!(node_b.totals().truncated, 1);
    assert_eq!(
        node_a.seal_in_place(now, &a, 47, &mut [0; 64], 1),
        Err(EspError::NoOutboundSa)
    );
    assert_eq!(node_a.totals().no_outbound_sa, 1);
    assert_eq!(node_a.totals().outbound.packets, 6);

    // Bounded number of inbound SAs per peer.
    for spi in [0x3003, 0x4004, 0x5005] {
        node_b
            .install_inbound(a, mk(spi, 3).into_inbound(now).unwrap())
            .unwrap();
    }
    assert!(matches!(
        node_b.install_inbound(a, mk(0x6006, 3).into_inbound(now).unwrap()),
        Err(dmvpn_esp::ConfigError::TooManyInbound { .. })
    ));
    assert_eq!(node_b.remove_peer(&a), 4);
    assert_eq!(node_b.inbound_len(), 0);
}

#[test]
fn database_time_events_and_timeout() {
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    let life = Lifetime {
        soft_time: Some(10 * s),
        hard_time: Some(20 * s),
        ..Lifetime::UNLIMITED
    };
    let sa = SecurityAssociation::new(0x777, Suite::ChaCha20Poly1305, &[5; 36])
        .unwrap()
        .with_lifetime(life)
        .unwrap();
    let mut db: SaDatabase<u8> = SaDatabase::new();
    db.install_inbound(1, sa.clone().into_inbound(t0).unwrap())
        .unwrap();
    db.install_outbound(1, sa.into_outbound(t0 + 5 * s).unwrap());
    assert_eq!(db.poll_timeout(), Some(t0 + 10 * s));
    db.handle_timeout(t0 + 10 * s);
    assert_eq!(
        db.poll_event(),
        Some(SaEvent::RekeyNeeded {
            peer: 1,
            spi: 0x777,
            direction: Direction::Inbound,
            limit: LimitKind::Time
        })
    );
    assert_eq!(db.poll_event(), None);
    assert_eq!(db.poll_timeout(), Some(t0 + 15 * s));
    db.handle_timeout(t0 + 26 * s);
    let evs: Vec<_> = std::iter::from_fn(|| db.poll_event()).collect();
    assert_eq!(evs.len(), 3, "{evs:?}"); // inbound expired; outbound rekey + expired
    assert!(evs.contains(&SaEvent::Expired {
        peer: 1,
        spi: 0x777,
        direction: Direction::Outbound,
        limit: LimitKind::Time
    }));
    assert_eq!(db.poll_timeout(), None);
}

#[test]
fn database_direct_access_signals_reach_the_queue() {
    let now = Instant::now();
    let life = Lifetime {
        soft_packets: Some(2),
        hard_packets: Some(4),
        ..Lifetime::UNLIMITED
    };
    let sa = SecurityAssociation::new(0x999, Suite::Aes256Gcm, &[1; 36])
        .unwrap()
        .with_lifetime(life)
        .unwrap();
    let mut db: SaDatabase<u8> = SaDatabase::new();
    db.install_outbound(7, sa.into_outbound(now).unwrap());
    let tx = db.outbound_mut(&7).unwrap();
    let mut out = Vec::new();
    for _ in 0..3 {
        tx.seal_to_vec(now, 47, b"batch", &mut out).unwrap();
    }
    assert_eq!(db.poll_event(), None);
    db.handle_timeout(now);
    assert_eq!(
        db.poll_event(),
        Some(SaEvent::RekeyNeeded {
            peer: 7,
            spi: 0x999,
            direction: Direction::Outbound,
            limit: LimitKind::Packets
        })
    );
    assert_eq!(db.poll_event(), None);
    assert_eq!(db.totals().outbound.packets, 3);
}

#[test]
fn esp_in_udp_4500_roundtrip() {
    use dmvpn_esp::udp::{
        NAT_KEEPALIVE, NAT_T_PORT, UDP_HEADER_LEN, Udp4500, classify_udp_4500, parse_udp,
        write_non_esp_marker, write_udp_header,
    };
    let now = Instant::now();
    let (mut tx, mut rx) = pair(Suite::ChaCha20Poly1305, true, Lifetime::UNLIMITED, now);
    // Seal with room for the UDP header in front, then add it: one buffer, no copies.
    let gre = gre(300);
    let mut buf = vec![0u8; UDP_HEADER_LEN + sealed_len(gre.len())];
    let at = UDP_HEADER_LEN + ESP_HEADROOM;
    buf[at..at + gre.len()].copy_from_slice(&gre);
    let n = tx
        .seal_in_place(now, 47, &mut buf[UDP_HEADER_LEN..], gre.len())
        .unwrap();
    write_udp_header(&mut buf, NAT_T_PORT, NAT_T_PORT, n).unwrap();

    let (h, payload) = parse_udp(&buf).unwrap();
    assert_eq!((h.dst_port, usize::from(h.length)), (4500, n + 8));
    let Ok(Udp4500::Esp(esp)) = classify_udp_4500(payload) else {
        panic!("not classified as ESP");
    };
    let mut esp = esp.to_vec();
    let o = rx.open_in_place(now, &mut esp).unwrap();
    assert_eq!(&esp[o.payload], &gre[..]);

    // IKE on the same port carries the marker; keepalives are one 0xFF byte.
    let mut ike = vec![0u8; 4 + 28];
    ike[4..].fill(0xAB);
    write_non_esp_marker(&mut ike).unwrap();
    assert_eq!(classify_udp_4500(&ike), Ok(Udp4500::Ike(&ike[4..])));
    assert_eq!(classify_udp_4500(&NAT_KEEPALIVE), Ok(Udp4500::Keepalive));
}
