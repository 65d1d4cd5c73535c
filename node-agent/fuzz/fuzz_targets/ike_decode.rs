//! Fuzz target: IKEv2 decoding, from the bare codec to a live endpoint. No input may panic;
//! whatever decodes must re-encode to something that decodes to the same message.
//!
//! The first byte picks the mode:
//!   0: the rest is a whole IKE message (`Message::decode`), re-encoded and decoded again;
//!   1: the next byte is a payload type, the rest a payload chain (as inside SK);
//!   2: the rest is a UDP datagram for an endpoint, on port 500 and (with a non-ESP marker)
//!      on port 4500; the endpoint keeps its state across inputs, so half-open SAs and
//!      cookies are exercised, and its IKE SA count must stay within its configured bound;
//!   3: the rest is sealed as SK plaintext with a known key, then opened and decoded: the
//!      plaintext must come back unchanged.
#![no_main]

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::Instant;

use dmvpn_ike::crypto::{Encr, SkCipher};
use dmvpn_ike::wire::{Header, Message, Payload, VERSION_2, decode_chain, encode_chain};
use dmvpn_ike::{AuthConfig, Config, Endpoint};
use libfuzzer_sys::fuzz_target;

const MAX_HALF_OPEN: usize = 64;

thread_local! {
    static ENDPOINT: RefCell<(Instant, Endpoint)> = RefCell::new({
        let now = Instant::now();
        let mut cfg = Config::new(
            "198.51.100.2".parse().unwrap(),
            AuthConfig::Psk(zeroize::Zeroizing::new(b"fuzzing-psk-0123456789".to_vec())),
        );
        cfg.cookie_threshold = 8;
        cfg.max_half_open = MAX_HALF_OPEN;
        (now, Endpoint::new(cfg, now).unwrap())
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => {
            if let Ok(m) = Message::decode(rest) {
                let again = Message::decode(&m.encode()).expect("re-encoded message decodes");
                assert_eq!(again.payloads, m.payloads);
            }
        }
        1 => {
            let Some((&first, chain)) = rest.split_first() else { return };
            if let Ok(p) = decode_chain(first, chain) {
                let (f, bytes) = encode_chain(&p);
                assert_eq!(decode_chain(f, &bytes).expect("re-encoded chain decodes"), p);
            }
        }
        2 => ENDPOINT.with(|e| {
            let (now, ep) = &mut *e.borrow_mut();
            let from: SocketAddr = "198.51.100.1:500".parse().unwrap();
            let to: SocketAddr = "198.51.100.2:500".parse().unwrap();
            ep.handle_datagram(*now, from, to, rest);
            let mut framed = vec![0u8; 4];
            framed.extend_from_slice(rest);
            ep.handle_datagram(*now, "198.51.100.1:4500".parse().unwrap(), "198.51.100.2:4500".parse().unwrap(), &framed);
            ep.handle_timeout(*now);
            while ep.poll_transmit().is_some() {}
            while ep.poll_event().is_some() {}
            assert!(ep.half_open() <= MAX_HALF_OPEN);
        }),
        _ => {
            let km = [0x42u8; 36];
            let mut tx = SkCipher::new(Encr::AesGcm256, &km).unwrap();
            let rx = SkCipher::new(Encr::AesGcm256, &km).unwrap();
            let header = Header { spi_i: 1, spi_r: 2, next_payload: 0, version: VERSION_2, exchange: 37, flags: 0, message_id: 1, length: 0 };
            let inner = vec![Payload::VendorId(rest.to_vec())];
            let msg = tx.seal_message(header, &inner);
            let parsed = Message::decode(&msg).expect("sealed message decodes");
            let Some(Payload::Sk { first_inner, body }) = parsed.payloads.last() else {
                panic!("no SK payload in a sealed message");
            };
            let plain = rx.open(&msg, body).expect("sealed message opens");
            assert_eq!(decode_chain(*first_inner, &plain).expect("inner chain decodes"), inner);
        }
    }
});
