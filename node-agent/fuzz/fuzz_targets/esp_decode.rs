//! Fuzz target: ESP decoding (SA database lookup, replay check, AEAD open, trailer parsing) and
//! the port-4500 demultiplexer. Any input must give a typed error or a consistent result, never
//! a panic, and every refused packet must be counted exactly once. A packet changed after
//! sealing must never open; an unchanged one must.
//!
//! Modes 0-2 and mode 3 use separate SA databases with different keys: nothing ever seals for
//! the first one, so nothing may open there; the second one only ever sees packets from its own
//! sender, so its window is predictable even when libFuzzer replays learnt packets.
//!
//! The first byte picks the mode:
//!   0: the rest is a UDP payload received on port 4500 (keepalive / IKE / ESP);
//!   1: the rest is an ESP packet for the database as is;
//!   2: the rest follows a known SPI (the next byte picks the suite), to get past the lookup;
//!   3: the rest is a payload that we seal with a known key; then up to 8 (offset, xor) byte
//!      pairs taken from its start are applied to the sealed packet before opening it. An
//!      unmodified packet must open to the same payload, a modified one must not.
#![no_main]

use std::cell::RefCell;
use std::time::Instant;

use dmvpn_esp::udp::{Udp4500, classify_udp_4500, parse_udp};
use dmvpn_esp::{Lifetime, OutboundSa, SaDatabase, SecurityAssociation, Suite};
use libfuzzer_sys::fuzz_target;

const SPI: u32 = 0x0000_5000;
const SPI3: u32 = 0x0000_6000;

struct State {
    now: Instant,
    /// Modes 0-2: receivers only.
    db: SaDatabase<u8>,
    /// Mode 3: receivers for `tx`.
    db3: SaDatabase<u8>,
    tx: Vec<OutboundSa>,
}

fn params(spi: u32, suite: Suite, key: u8) -> SecurityAssociation {
    let keymat: Vec<u8> = (0..suite.keymat_len()).map(|b| b as u8 ^ key).collect();
    SecurityAssociation::new(spi, suite, &keymat)
        .unwrap()
        .with_lifetime(Lifetime::UNLIMITED)
        .unwrap()
}

fn fresh_state() -> State {
    let now = Instant::now();
    let mut db = SaDatabase::new();
    let mut db3 = SaDatabase::new();
    let mut tx = Vec::new();
    for (i, suite) in Suite::ALL.into_iter().enumerate() {
        let p = params(SPI + i as u32, suite, 0x3c);
        db.install_inbound(i as u8, p.into_inbound(now).unwrap()).unwrap();
        let p3 = params(SPI3 + i as u32, suite, 0xc3);
        db3.install_inbound(i as u8, p3.clone().into_inbound(now).unwrap()).unwrap();
        tx.push(p3.into_outbound(now).unwrap());
    }
    State { now, db, db3, tx }
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(fresh_state());
}

fn drops(db: &SaDatabase<u8>) -> u64 {
    let t = db.totals();
    t.inbound.dropped() + t.unknown_spi + t.truncated
}

/// Opens `pkt`; checks the drop accounting and the payload range. Returns the payload if it
/// opened.
fn open(db: &mut SaDatabase<u8>, now: Instant, pkt: &mut [u8]) -> Option<Vec<u8>> {
    let before = drops(db);
    let len = pkt.len();
    match db.open_in_place(now, pkt) {
        Ok(o) => {
            assert!(o.payload.end <= len);
            assert_eq!(drops(db), before);
            Some(pkt[o.payload].to_vec())
        }
        Err(_) => {
            assert_eq!(drops(db), before + 1);
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    STATE.with(|s| {
        let st = &mut *s.borrow_mut();
        match mode % 4 {
            0 => {
                let _ = parse_udp(rest);
                if let Ok(Udp4500::Esp(esp)) = classify_udp_4500(rest) {
                    assert!(open(&mut st.db, st.now, &mut esp.to_vec()).is_none());
                }
            }
            1 => assert!(open(&mut st.db, st.now, &mut rest.to_vec()).is_none()),
            2 => {
                let Some((&which, body)) = rest.split_first() else {
                    return;
                };
                let mut pkt = (SPI + u32::from(which % 3)).to_be_bytes().to_vec();
                pkt.extend_from_slice(body);
                assert!(open(&mut st.db, st.now, &mut pkt).is_none());
            }
            _ => {
                let Some((&which, payload)) = rest.split_first() else {
                    return;
                };
                let i = usize::from(which % 3);
                let mut pkt = Vec::new();
                let nh = which.wrapping_mul(31);
                st.tx[i].seal_to_vec(st.now, nh, payload, &mut pkt).unwrap();
                let original = pkt.clone();
                for pair in payload.chunks_exact(2).take(usize::from(which >> 5)) {
                    let off = usize::from(pair[0]) % pkt.len();
                    pkt[off] ^= pair[1];
                }
                let changed = pkt != original;
                match open(&mut st.db3, st.now, &mut pkt) {
                    Some(p) => {
                        assert!(!changed, "a modified packet opened");
                        assert_eq!(p, payload);
                    }
                    None => assert!(changed, "an unmodified packet did not open"),
                }
            }
        }
    });
});
