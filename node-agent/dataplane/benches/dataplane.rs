//! Hot-path building blocks: GRE encode/decode of a 1400-byte packet, and a forwarding
//! lookup in tables with 1,000 neighbours and 1,000 prefixes.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dmvpn_dataplane::gre::{GreHeader, PROTO_IPV4};
use dmvpn_dataplane::tables::Tables;
use ipnet::IpNet;

fn gre(c: &mut Criterion) {
    let h = GreHeader::with_key(PROTO_IPV4, Some(42));
    let mut buf = vec![0x45u8; 8 + 1400];
    let mut g = c.benchmark_group("gre");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("encode_keyed", |b| {
        b.iter(|| h.encode_packet(black_box(&mut buf)))
    });
    let pkt = h.to_packet(&[0x45u8; 1400]);
    g.bench_function("decode_keyed", |b| {
        b.iter(|| GreHeader::decode(black_box(&pkt)))
    });
    let hc = GreHeader {
        checksum: true,
        ..h
    };
    let pkt = hc.to_packet(&[0x45u8; 1400]);
    g.bench_function("decode_checksummed", |b| {
        b.iter(|| GreHeader::decode(black_box(&pkt)))
    });
    g.finish();
}

fn lookup(c: &mut Criterion) {
    let t = Tables::new();
    for i in 0..1000u32 {
        let spoke = Ipv4Addr::from(0x0A2A_0000 + 2 + i);
        t.set_neighbor(spoke.into(), Ipv4Addr::from(0xC633_6400 + (i % 250)).into());
        let net = IpNet::new(Ipv4Addr::from(0x0A00_0000 + (i << 8)).into(), 24).unwrap();
        t.set_route(net, spoke.into());
    }
    t.set_route("0.0.0.0/0".parse().unwrap(), "10.42.0.1".parse().unwrap());
    let snap = t.load();
    let dst: IpAddr = Ipv4Addr::new(10, 1, 200, 9).into();
    c.bench_function("lookup_1000_routes", |b| {
        b.iter(|| snap.lookup(black_box(dst)))
    });
}

criterion_group!(benches, gre, lookup);
criterion_main!(benches);
