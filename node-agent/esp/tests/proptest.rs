//! Properties: decoding never panics on any input, every drop is counted, round trips hold for
//! arbitrary payloads and sequence numbers, and the anti-replay window matches a simple model.

mod common;

use std::collections::HashSet;
use std::time::Instant;

use common::keymat;
use dmvpn_esp::udp::{Udp4500, classify_udp_4500, parse_udp};
use dmvpn_esp::{
    InboundSa, Lifetime, OutboundSa, SaDatabase, SecurityAssociation, Suite, sealed_len,
};
use proptest::prelude::*;

const SPI: u32 = 0x0000_4242;

fn suite() -> impl Strategy<Value = Suite> {
    prop::sample::select(Suite::ALL.to_vec())
}

fn pair(suite: Suite, esn: bool, now: Instant) -> (OutboundSa, InboundSa) {
    let sa = SecurityAssociation::new(SPI, suite, &keymat(suite, 11))
        .unwrap()
        .with_esn(esn)
        .with_lifetime(Lifetime::UNLIMITED)
        .unwrap();
    (
        sa.clone().into_outbound(now).unwrap(),
        sa.into_inbound(now).unwrap(),
    )
}

fn db_with_all_suites(now: Instant) -> SaDatabase<u8> {
    let mut db = SaDatabase::new();
    for (i, s) in Suite::ALL.into_iter().enumerate() {
        let sa = SecurityAssociation::new(SPI + i as u32, s, &keymat(s, 11)).unwrap();
        db.install_inbound(i as u8, sa.into_inbound(now).unwrap())
            .unwrap();
    }
    db
}

fn total_drops(db: &SaDatabase<u8>) -> u64 {
    let t = db.totals();
    t.inbound.dropped() + t.unknown_spi + t.truncated
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes: an error, counted once, never a panic.
    #[test]
    fn arbitrary_bytes_never_open(mut bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let now = Instant::now();
        let mut db = db_with_all_suites(now);
        prop_assert!(db.open_in_place(now, &mut bytes).is_err());
        prop_assert_eq!(total_drops(&db), 1);
    }

    /// Arbitrary bytes behind a valid SPI and any sequence number reach the replay, lifetime
    /// and AEAD code: still an error, counted once.
    #[test]
    fn arbitrary_bytes_with_known_spi(
        which in 0u32..3,
        seq in any::<u32>(),
        rest in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let now = Instant::now();
        let mut db = db_with_all_suites(now);
        let mut pkt = (SPI + which).to_be_bytes().to_vec();
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(&rest);
        prop_assert!(db.open_in_place(now, &mut pkt).is_err());
        prop_assert_eq!(total_drops(&db), 1);
        prop_assert_eq!(db.totals().unknown_spi, 0);
    }

    /// Round trip for any payload, suite, ESN setting and starting sequence number.
    #[test]
    fn roundtrip_any_payload(
        suite in suite(),
        esn in any::<bool>(),
        start in 1u64..u64::from(u32::MAX) - 10,
        nh in any::<u8>(),
        payload in prop::collection::vec(any::<u8>(), 0..3000),
    ) {
        let now = Instant::now();
        let (mut tx, mut rx) = pair(suite, esn, now);
        // Step the receiver first: the first packet must be within 2^31 of it.
        if start > 1 << 30 {
            tx.skip_to_seq(start / 2);
            let mut p = Vec::new();
            tx.seal_to_vec(now, nh, b"", &mut p).unwrap();
            rx.open_in_place(now, &mut p).unwrap();
        }
        tx.skip_to_seq(start);
        let mut pkt = Vec::new();
        let n = tx.seal_to_vec(now, nh, &payload, &mut pkt).unwrap();
        prop_assert_eq!(n, sealed_len(payload.len()));
        let o = rx.open_in_place(now, &mut pkt).unwrap();
        prop_assert_eq!(o.next_header, nh);
        prop_assert_eq!(o.seq, start);
        prop_assert_eq!(&pkt[o.payload], &payload[..]);
    }

    /// Any set of flipped bits, or any truncation or extension, is rejected and counted; the
    /// genuine packet opens afterwards.
    #[test]
    fn tampered_packets_rejected(
        suite in suite(),
        payload in prop::collection::vec(any::<u8>(), 0..300),
        flips in prop::collection::vec(any::<prop::sample::Index>(), 1..4),
        cut in any::<prop::sample::Index>(),
        extra in prop::collection::vec(any::<u8>(), 1..20),
    ) {
        let now = Instant::now();
        let (mut tx, mut rx) = pair(suite, true, now);
        let mut pkt = Vec::new();
        tx.seal_to_vec(now, 47, &payload, &mut pkt).unwrap();

        let mut t = pkt.clone();
        let bits: HashSet<usize> = flips.iter().map(|i| i.index(pkt.len() * 8)).collect();
        for b in &bits {
            t[b / 8] ^= 1 << (b % 8);
        }
        prop_assert!(rx.open_in_place(now, &mut t).is_err());

        let mut short = pkt[..cut.index(pkt.len())].to_vec();
        prop_assert!(rx.open_in_place(now, &mut short).is_err());

        let mut long = pkt.clone();
        long.extend_from_slice(&extra);
        prop_assert!(rx.open_in_place(now, &mut long).is_err());

        prop_assert_eq!(rx.counters().dropped(), 3);
        prop_assert!(rx.open_in_place(now, &mut pkt).is_ok());
    }

    /// The anti-replay window agrees with a model: a packet is accepted iff it was not accepted
    /// before and is newer than (highest accepted - window).
    #[test]
    fn replay_window_matches_model(
        esn in any::<bool>(),
        order in prop::collection::vec(0usize..2600, 1..400),
    ) {
        let now = Instant::now();
        let (mut tx, mut rx) = pair(Suite::Aes128Gcm, esn, now);
        let base = if esn { (1u64 << 32) - 1300 } else { 1 };
        if esn {
            // Move the receiver near the 2^32 boundary so the sequence crosses it.
            for step in [0x7000_0000u64, 0xE000_0000, base - 3000] {
                tx.skip_to_seq(step);
                let mut p = Vec::new();
                tx.seal_to_vec(now, 47, b"", &mut p).unwrap();
                rx.open_in_place(now, &mut p).unwrap();
            }
        }
        tx.skip_to_seq(base);
        let pkts: Vec<Vec<u8>> = (0..2600)
            .map(|_| {
                let mut p = Vec::new();
                tx.seal_to_vec(now, 47, b"m", &mut p).unwrap();
                p
            })
            .collect();
        let mut seen = HashSet::new();
        let mut top = rx.highest_seq();
        for i in order {
            let seq = base + i as u64;
            let want = !seen.contains(&seq) && seq + 1024 > top;
            let mut p = pkts[i].clone();
            let got = rx.open_in_place(now, &mut p);
            prop_assert_eq!(got.is_ok(), want, "seq {} top {}: {:?}", seq, top, got);
            if want {
                seen.insert(seq);
                top = top.max(seq);
            }
        }
    }

    /// The port-4500 demultiplexer and UDP parser are total.
    #[test]
    fn udp_helpers_total(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        match classify_udp_4500(&bytes) {
            Ok(Udp4500::Keepalive) => prop_assert_eq!(&bytes[..], &[0xFF][..]),
            Ok(Udp4500::Ike(m)) => prop_assert_eq!(m.len() + 4, bytes.len()),
            Ok(Udp4500::Esp(e)) => prop_assert!(e.len() >= 8 && e[..4] != [0; 4]),
            Err(_) => prop_assert!(bytes.len() < 8),
        }
        if let Ok((h, p)) = parse_udp(&bytes) {
            prop_assert_eq!(usize::from(h.length), p.len() + 8);
        }
    }
}
