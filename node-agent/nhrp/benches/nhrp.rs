//! NHRP wire codec throughput: encode and decode of the packets a DMVPN node handles most.
//!
//! `cargo bench -p dmvpn-nhrp --bench nhrp`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dmvpn_nhrp::wire::{
    Authentication, Body, Cie, Extension, ExtensionBody, Header, Mandatory, Op, Packet, flags,
};

fn v4(a: u8, b: u8, c: u8, d: u8) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
}

fn body(
    flags: u16,
    request_id: u32,
    dst: Option<IpAddr>,
    cies: Vec<Cie>,
    payload: Vec<u8>,
) -> Body {
    Body::Mandatory(Mandatory {
        flags,
        request_id,
        src_nbma: v4(198, 51, 100, 2),
        src_nbma_sub: vec![],
        src_proto: v4(10, 42, 0, 2),
        dst_proto: dst,
        cies,
        payload,
    })
}

/// A spoke's Registration Request as FRR sends it, plus Cisco cleartext authentication.
fn registration_request() -> Packet {
    let nat = Cie {
        prefix_len: 32,
        client_nbma: v4(198, 51, 100, 1),
        client_proto: v4(10, 42, 0, 1),
        ..Cie::default()
    };
    Packet {
        header: Header::ipv4(Op::RegistrationRequest, 1),
        body: body(
            flags::REG_U | flags::CISCO_NAT,
            1,
            v4(10, 42, 0, 1),
            vec![Cie {
                prefix_len: 0xFF,
                holding_time: 7200,
                ..Cie::default()
            }],
            vec![],
        ),
        extensions: vec![
            Extension::new(true, ExtensionBody::ForwardTransitNhs(vec![])),
            Extension::new(true, ExtensionBody::ReverseTransitNhs(vec![])),
            Extension::new(true, ExtensionBody::ResponderAddress(None)),
            Extension::new(false, ExtensionBody::CiscoNatAddress(vec![nat])),
            Extension::new(
                true,
                ExtensionBody::Authentication(Authentication::CiscoCleartext(b"secret".to_vec())),
            ),
            Extension::end(),
        ],
    }
}

/// A hub's Resolution Reply for a spoke behind NAT, with transit records filled in.
fn resolution_reply() -> Packet {
    let hub = Cie {
        mtu: 1400,
        holding_time: 7200,
        client_nbma: v4(198, 51, 100, 1),
        client_proto: v4(10, 42, 0, 1),
        ..Cie::default()
    };
    let target = Cie {
        prefix_len: 32,
        mtu: 1400,
        holding_time: 7200,
        client_nbma: v4(198, 51, 100, 3),
        client_proto: v4(10, 42, 0, 3),
        ..Cie::default()
    };
    Packet {
        header: Header::ipv4(Op::ResolutionReply, 63),
        body: body(
            flags::RES_Q | flags::RES_A | flags::RES_D | flags::RES_S | flags::CISCO_NAT,
            77,
            v4(10, 42, 0, 3),
            vec![target.clone()],
            vec![],
        ),
        extensions: vec![
            Extension::new(true, ExtensionBody::ForwardTransitNhs(vec![hub.clone()])),
            Extension::new(true, ExtensionBody::ReverseTransitNhs(vec![hub])),
            Extension::new(true, ExtensionBody::ResponderAddress(Some(target.clone()))),
            Extension::new(
                false,
                ExtensionBody::CiscoNatAddress(vec![Cie {
                    client_nbma: v4(203, 0, 113, 9),
                    ..target
                }]),
            ),
            Extension::end(),
        ],
    }
}

/// A hub's Traffic Indication carrying the first 84 bytes of the redirected packet.
fn traffic_indication() -> Packet {
    let mut head = vec![
        0x45, 0, 0, 84, 0, 1, 0x40, 0, 63, 1, 0, 0, 10, 42, 0, 2, 10, 42, 0, 3,
    ];
    head.resize(84, 0xA5);
    Packet {
        header: Header::ipv4(Op::TrafficIndication, 1),
        body: Body::Mandatory(Mandatory {
            flags: 0,
            request_id: 0,
            src_nbma: v4(198, 51, 100, 1),
            src_nbma_sub: vec![],
            src_proto: v4(10, 42, 0, 1),
            dst_proto: v4(10, 42, 0, 2),
            cies: vec![],
            payload: head,
        }),
        extensions: vec![
            Extension::new(
                true,
                ExtensionBody::Authentication(Authentication::CiscoCleartext(b"secret".to_vec())),
            ),
            Extension::end(),
        ],
    }
}

fn codec(c: &mut Criterion) {
    let cases = [
        ("registration_request", registration_request()),
        ("resolution_reply", resolution_reply()),
        ("traffic_indication", traffic_indication()),
    ];
    let mut g = c.benchmark_group("nhrp_wire");
    for (name, packet) in &cases {
        let bytes = packet.to_bytes().expect("bench packet encodes");
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        let mut buf = Vec::with_capacity(256);
        g.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| {
                buf.clear();
                black_box(packet).encode(&mut buf).expect("encode");
                black_box(buf.len())
            })
        });
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| Packet::decode(black_box(&bytes)).expect("decode"))
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
