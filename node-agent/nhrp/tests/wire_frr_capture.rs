//! Decodes NHRP captured from real FRR nhrpd (and a hand-built reference packet), checks the
//! fields, and re-encodes each packet byte-identical.

mod support;

use std::net::{IpAddr, Ipv4Addr};

use dmvpn_nhrp::wire::{
    Body, Cie, Extension, ExtensionBody, GRE_PROTO_NHRP, Op, Packet, checksum, ext_type, flags,
};
use support::{LINKTYPE_ETHERNET, fixture, parse_gre, read_pcap};

fn v4(a: u8, b: u8, c: u8, d: u8) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
}

/// NHRP payloads (GRE proto 0x2001) of a capture, with the outer addresses and GRE key.
fn nhrp_payloads(name: &str) -> Vec<support::GreFrame> {
    let (linktype, frames) = read_pcap(&fixture(name));
    assert_eq!(linktype, LINKTYPE_ETHERNET);
    frames
        .iter()
        .filter_map(|f| parse_gre(f))
        .filter(|g| g.proto == GRE_PROTO_NHRP)
        .collect()
}

fn roundtrip(bytes: &[u8]) -> Packet {
    assert_eq!(checksum(bytes), 0, "capture checksum must verify");
    let p = Packet::decode(bytes).unwrap_or_else(|e| panic!("decode failed: {e}\n{bytes:02x?}"));
    assert_eq!(
        p.to_bytes().unwrap(),
        bytes,
        "re-encoding must be byte-identical"
    );
    p
}

/// The NAT extension FRR sends: one CIE naming the NHS (NBMA 198.51.100.1) with the "cisco
/// magic" protocol address 0.0.0.0 because the NHS was configured dynamically.
fn frr_nat_cie() -> Cie {
    Cie {
        prefix_len: 32,
        client_nbma: v4(198, 51, 100, 1),
        client_proto: v4(0, 0, 0, 0),
        ..Cie::default()
    }
}

#[test]
fn frr_registration_exchange() {
    let grams = nhrp_payloads("frr-nhrp-registration.pcap");
    // 5 retransmitted requests from the spoke, then the hub's reply.
    assert_eq!(
        grams.len(),
        6,
        "expected 5 Registration Requests and 1 Reply"
    );
    for g in &grams {
        assert_eq!(g.key, Some(42));
    }

    let spoke_cie = Cie {
        prefix_len: 32,
        holding_time: 60,
        ..Cie::default()
    };
    for g in &grams[..5] {
        assert_eq!(
            (g.src, g.dst),
            (
                Ipv4Addr::new(198, 51, 100, 2),
                Ipv4Addr::new(198, 51, 100, 1)
            )
        );
        let p = roundtrip(&g.payload);
        assert_eq!(p.header.op, Op::RegistrationRequest);
        assert_eq!(
            (p.header.afn, p.header.pro_type, p.header.version),
            (1, 0x0800, 1)
        );
        // FRR sends registrations with hop count 1 (Cisco drops 0).
        assert_eq!(p.header.hop_count, 1);
        let m = p.mandatory().unwrap();
        assert_eq!(m.request_id, 1, "retransmissions reuse the request id");
        // `registration no-unique`: U clear, NAT-capable set.
        assert_eq!(m.flags, flags::CISCO_NAT);
        assert_eq!(m.src_nbma, v4(198, 51, 100, 2));
        assert!(m.src_nbma_sub.is_empty());
        assert_eq!(m.src_proto, v4(10, 42, 0, 2));
        // FRR puts its own protocol address in the destination field.
        assert_eq!(m.dst_proto, v4(10, 42, 0, 2));
        assert_eq!(m.cies, vec![spoke_cie.clone()]);
        assert_eq!(
            p.extensions,
            vec![
                Extension::new(true, ExtensionBody::ForwardTransitNhs(vec![])),
                Extension::new(true, ExtensionBody::ReverseTransitNhs(vec![])),
                Extension::new(true, ExtensionBody::ResponderAddress(None)),
                Extension::new(false, ExtensionBody::CiscoNatAddress(vec![frr_nat_cie()])),
                Extension::end(),
            ]
        );
    }

    let reply = &grams[5];
    assert_eq!(
        (reply.src, reply.dst),
        (
            Ipv4Addr::new(198, 51, 100, 1),
            Ipv4Addr::new(198, 51, 100, 2)
        )
    );
    let p = roundtrip(&reply.payload);
    assert_eq!(p.header.op, Op::RegistrationReply);
    assert_eq!(p.header.hop_count, 64);
    let m = p.mandatory().unwrap();
    assert_eq!(m.request_id, 1);
    assert_eq!(m.flags, flags::CISCO_NAT);
    // A reply keeps the requester's source fields; dst becomes the hub.
    assert_eq!(m.src_nbma, v4(198, 51, 100, 2));
    assert_eq!(m.src_proto, v4(10, 42, 0, 2));
    assert_eq!(m.dst_proto, v4(10, 42, 0, 1));
    assert_eq!(m.cies, vec![spoke_cie], "CIE code 0 = success");
    let responder = Cie {
        holding_time: 60,
        client_nbma: v4(198, 51, 100, 1),
        client_proto: v4(10, 42, 0, 1),
        ..Cie::default()
    };
    assert_eq!(
        p.extension(ext_type::RESPONDER_ADDRESS),
        Some(&Extension::new(
            true,
            ExtensionBody::ResponderAddress(Some(responder))
        ))
    );
    assert_eq!(
        p.extension(ext_type::CISCO_NAT_ADDRESS),
        Some(&Extension::new(
            false,
            ExtensionBody::CiscoNatAddress(vec![frr_nat_cie()])
        ))
    );
    assert_eq!(p.extensions.len(), 5);
    assert_eq!(p.extensions.last(), Some(&Extension::end()));
}

#[test]
fn reference_registration_request() {
    let grams = nhrp_payloads("nhrp-regreq.pcap");
    assert_eq!(grams.len(), 1);
    let g = &grams[0];
    assert_eq!(g.key, Some(42));
    // The fixture documents this checksum value.
    assert_eq!(u16::from_be_bytes([g.payload[12], g.payload[13]]), 0xbe86);
    let p = roundtrip(&g.payload);
    assert_eq!(p.header.op, Op::RegistrationRequest);
    assert_eq!(p.header.hop_count, 255);
    let Body::Mandatory(m) = &p.body else {
        panic!("mandatory part expected")
    };
    assert_eq!(m.flags, flags::REG_U);
    assert_eq!(m.request_id, 0x1234);
    assert_eq!(m.src_nbma, v4(198, 51, 100, 2));
    assert_eq!(m.src_proto, v4(10, 42, 0, 2));
    assert_eq!(m.dst_proto, v4(10, 42, 0, 1));
    assert_eq!(
        m.cies,
        vec![Cie {
            prefix_len: 32,
            mtu: 1400,
            holding_time: 7200,
            client_nbma: v4(198, 51, 100, 2),
            client_proto: v4(10, 42, 0, 2),
            ..Cie::default()
        }]
    );
    let kinds: Vec<(u16, bool)> = p
        .extensions
        .iter()
        .map(|e| (e.ty(), e.compulsory))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (ext_type::RESPONDER_ADDRESS, true),
            (ext_type::FORWARD_TRANSIT_NHS, true),
            (ext_type::REVERSE_TRANSIT_NHS, true),
            (ext_type::END, true),
        ]
    );
    assert!(p.extension(ext_type::CISCO_NAT_ADDRESS).is_none());
}
