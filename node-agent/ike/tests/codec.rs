//! Property tests of the IKEv2 codec: round trips, arbitrary and mutated input never panics,
//! and ipsec-parser (an independent parser) reads what we write the same way.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use dmvpn_ike::wire::{
    Attribute, Delete, Header, Id, Message, Notify, Payload, Proposal, TrafficSelector, Transform,
    VERSION_2, decode_chain, encode_chain, payload_type,
};
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn attribute() -> impl Strategy<Value = Attribute> {
    prop_oneof![
        (0u16..0x8000, any::<u16>()).prop_map(|(kind, value)| Attribute::Tv { kind, value }),
        (0u16..0x8000, bytes(8)).prop_map(|(kind, value)| Attribute::Tlv { kind, value }),
    ]
}

fn proposal() -> impl Strategy<Value = Proposal> {
    (
        any::<u8>(),
        any::<u8>(),
        bytes(9),
        proptest::collection::vec(
            (
                any::<u8>(),
                any::<u16>(),
                proptest::collection::vec(attribute(), 0..3),
            )
                .prop_map(|(kind, id, attributes)| Transform {
                    kind,
                    id,
                    attributes,
                }),
            0..6,
        ),
    )
        .prop_map(|(number, protocol, spi, transforms)| Proposal {
            number,
            protocol,
            spi,
            transforms,
        })
}

fn ts() -> impl Strategy<Value = TrafficSelector> {
    let v4 = (any::<u32>(), any::<u32>())
        .prop_map(|(a, b)| (IpAddr::V4(Ipv4Addr::from(a)), IpAddr::V4(Ipv4Addr::from(b))));
    let v6 = (any::<u128>(), any::<u128>())
        .prop_map(|(a, b)| (IpAddr::V6(Ipv6Addr::from(a)), IpAddr::V6(Ipv6Addr::from(b))));
    (prop_oneof![v4, v6], any::<u8>(), any::<u16>(), any::<u16>()).prop_map(
        |((start_addr, end_addr), ip_protocol, start_port, end_port)| TrafficSelector {
            ip_protocol,
            start_port,
            end_port,
            start_addr,
            end_addr,
        },
    )
}

/// Payloads that may appear anywhere in a chain (not SK/SKF).
fn plain_payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        proptest::collection::vec(proposal(), 1..4).prop_map(Payload::Sa),
        (any::<u16>(), bytes(70)).prop_map(|(group, data)| Payload::Ke { group, data }),
        (any::<u8>(), bytes(20)).prop_map(|(id_type, data)| Payload::IdI(Id { id_type, data })),
        (any::<u8>(), bytes(20)).prop_map(|(id_type, data)| Payload::IdR(Id { id_type, data })),
        (any::<u8>(), bytes(50)).prop_map(|(encoding, data)| Payload::Cert { encoding, data }),
        (any::<u8>(), bytes(50)).prop_map(|(encoding, data)| Payload::CertReq { encoding, data }),
        (any::<u8>(), bytes(50)).prop_map(|(method, data)| Payload::Auth { method, data }),
        bytes(64).prop_map(Payload::Nonce),
        (any::<u8>(), bytes(9), any::<u16>(), bytes(24)).prop_map(|(protocol, spi, kind, data)| {
            Payload::Notify(Notify {
                protocol,
                spi,
                kind,
                data,
            })
        }),
        (any::<u8>(), 0u8..9, 0usize..4).prop_map(|(protocol, spi_size, n)| {
            let n = if spi_size == 0 { 0 } else { n };
            Payload::Delete(Delete {
                protocol,
                spi_size,
                spis: (0..n)
                    .map(|i| vec![i as u8; usize::from(spi_size)])
                    .collect(),
            })
        }),
        bytes(30).prop_map(Payload::VendorId),
        proptest::collection::vec(ts(), 0..4).prop_map(Payload::TsI),
        proptest::collection::vec(ts(), 0..4).prop_map(Payload::TsR),
        // Unassigned payload type numbers.
        (prop_oneof![1u8..33, 54u8..=255], any::<bool>(), bytes(20)).prop_map(
            |(kind, critical, data)| Payload::Unknown {
                kind,
                critical,
                data
            }
        ),
    ]
}

fn encrypted_payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        (any::<u8>(), bytes(80)).prop_map(|(first_inner, body)| Payload::Sk { first_inner, body }),
        (any::<u8>(), 1u16..20, bytes(80)).prop_flat_map(|(first_inner, total, body)| {
            (1..=total).prop_map(move |number| Payload::Skf {
                first_inner,
                number,
                total,
                body: body.clone(),
            })
        }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u8>(),
        any::<u8>(),
        any::<u32>(),
        proptest::collection::vec(plain_payload(), 0..6),
        proptest::option::of(encrypted_payload()),
    )
        .prop_map(
            |(spi_i, spi_r, exchange, flags, message_id, mut payloads, enc)| {
                payloads.extend(enc);
                Message {
                    header: Header {
                        spi_i,
                        spi_r,
                        next_payload: 0,
                        version: VERSION_2,
                        exchange,
                        flags,
                        message_id,
                        length: 0,
                    },
                    payloads,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn message_round_trip(m in message()) {
        let bytes = m.encode();
        let back = Message::decode(&bytes).unwrap();
        prop_assert_eq!(&back.payloads, &m.payloads);
        prop_assert_eq!(back.header.spi_i, m.header.spi_i);
        prop_assert_eq!(back.header.message_id, m.header.message_id);
        prop_assert_eq!(back.header.length as usize, bytes.len());
        prop_assert_eq!(back.encode(), bytes);
    }

    #[test]
    fn chain_round_trip(p in proptest::collection::vec(plain_payload(), 0..8)) {
        let (first, bytes) = encode_chain(&p);
        prop_assert_eq!(decode_chain(first, &bytes).unwrap(), p);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in bytes(600)) {
        let _ = Message::decode(&data);
        for first in [payload_type::SA, payload_type::NOTIFY, payload_type::TSI, payload_type::DELETE, payload_type::SKF, 99] {
            let _ = decode_chain(first, &data);
        }
    }

    #[test]
    fn arbitrary_body_behind_a_valid_header_never_panics(first in any::<u8>(), body in bytes(600)) {
        let mut data = Message {
            header: Header { spi_i: 1, spi_r: 2, next_payload: 0, version: VERSION_2, exchange: 34, flags: 8, message_id: 0, length: 0 },
            payloads: vec![],
        }.encode();
        data[16] = first;
        data.extend_from_slice(&body);
        let len = (data.len() as u32).to_be_bytes();
        data[24..28].copy_from_slice(&len);
        let _ = Message::decode(&data);
    }

    #[test]
    fn mutated_messages_never_panic(m in message(), edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>()) {
        let mut bytes = m.encode();
        for (at, x) in edits {
            let n = bytes.len();
            bytes[at % n] ^= x;
        }
        let _ = Message::decode(&bytes);
        let n = bytes.len();
        let _ = Message::decode(&bytes[..cut % (n + 1)]);
    }

    /// ipsec-parser, written independently, reads our encoding with the same payload types.
    #[test]
    fn ipsec_parser_agrees(m in message()) {
        // ipsec-parser 0.7 knows neither SKF nor unassigned types, refuses a Delete with
        // less than 4 bytes of SPIs (an IKE SA delete has none, RFC 7296 §3.11) and a Vendor
        // ID shorter than 8 bytes (any length is valid, §3.12), and TS payloads without selectors.
        let known: Vec<Payload> = m
            .payloads
            .iter()
            .filter(|p| !matches!(p, Payload::Unknown { .. } | Payload::Skf { .. }))
            .filter(|p| !matches!(p, Payload::Delete(d) if d.spis.iter().map(Vec::len).sum::<usize>() < 4))
            .filter(|p| !matches!(p, Payload::VendorId(v) if v.len() < 8))
            .filter(|p| !matches!(p, Payload::TsI(t) | Payload::TsR(t) if t.is_empty()))
            .cloned()
            .collect();
        let m = Message { header: m.header, payloads: known };
        let bytes = m.encode();
        let (rest, (hdr, payloads)) = ipsec_parser::parse_ikev2_message(&bytes).unwrap();
        prop_assert!(rest.is_empty());
        prop_assert_eq!(hdr.init_spi, m.header.spi_i);
        prop_assert_eq!(hdr.resp_spi, m.header.spi_r);
        prop_assert_eq!(hdr.msg_id, m.header.message_id);
        let payloads = payloads.unwrap();
        // ipsec-parser puts a dummy first.
        let theirs: Vec<u8> = payloads.iter().skip(1).map(|p| p.hdr.next_payload_type.0).collect();
        let ours: Vec<u8> = m.payloads.iter().skip(1).map(Payload::kind).chain(std::iter::once(match m.payloads.last() {
            Some(Payload::Sk { first_inner, .. }) => *first_inner,
            _ => 0,
        })).collect();
        if !m.payloads.is_empty() {
            prop_assert_eq!(theirs, ours);
        }
    }

    /// Random datagrams fed to an endpoint (on both ports, with and without a valid-looking
    /// header) never panic and are counted as dropped.
    #[test]
    fn endpoint_survives_garbage(data in bytes(400), spi_r in any::<u64>(), exch in 33u8..38, flags in any::<u8>()) {
        let now = Instant::now();
        let cfg = dmvpn_ike::Config::new("198.51.100.2".parse().unwrap(), dmvpn_ike::AuthConfig::Psk(zeroize::Zeroizing::new(b"0123456789abcdef".to_vec())));
        let mut ep = dmvpn_ike::Endpoint::new(cfg, now).unwrap();
        let from = "198.51.100.1:500".parse().unwrap();
        let to = "198.51.100.2:500".parse().unwrap();
        ep.handle_datagram(now, from, to, &data);
        let mut framed = Message {
            header: Header { spi_i: 7, spi_r, next_payload: 0, version: VERSION_2, exchange: exch, flags, message_id: 0, length: 0 },
            payloads: vec![],
        }.encode();
        framed.extend_from_slice(&data);
        let len = (framed.len() as u32).to_be_bytes();
        framed[24..28].copy_from_slice(&len);
        ep.handle_datagram(now, from, to, &framed);
        let mut nat = vec![0u8; 4];
        nat.extend_from_slice(&framed);
        ep.handle_datagram(now, "198.51.100.1:4500".parse().unwrap(), "198.51.100.2:4500".parse().unwrap(), &nat);
        ep.handle_timeout(now);
        while ep.poll_transmit().is_some() {}
        prop_assert!(ep.ike_sa_count() <= 2);
    }
}
