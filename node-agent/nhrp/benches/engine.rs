//! NHRP engine cost at a hub with 10,000 registered spokes: Registration Request refresh,
//! Resolution Request answered (authoritative) and forwarded, Traffic Indication (rate
//! limiter path: the clock is fixed, so after the first indication per pair every call is
//! suppressed, which is the steady state of a busy hairpinned flow).
//!
//! `cargo bench -p dmvpn-nhrp --bench engine`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dmvpn_nhrp::engine::{Config, Engine, NhsConfig, Phase, Role};
use ipnet::IpNet;

const SPOKES: usize = 10_000;

fn hub_tunnel() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 64, 0, 1))
}
fn hub_nbma() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))
}

/// Spoke i: tunnel 10.64.x.y/16, NBMA in 198.18.0.0/15 (benchmarking range), LAN
/// 10.(128 + i/256).(i%256).0/24.
fn spoke(i: usize) -> (IpAddr, IpAddr, IpNet) {
    let n = i + 2;
    let tunnel = IpAddr::V4(Ipv4Addr::new(10, 64, (n / 256) as u8, (n % 256) as u8));
    let nbma = IpAddr::V4(Ipv4Addr::new(198, 18, (n / 256) as u8 + 1, (n % 256) as u8));
    let lan = IpNet::new(
        IpAddr::V4(Ipv4Addr::new(10, 128 + (i / 256) as u8, (i % 256) as u8, 0)),
        24,
    )
    .unwrap();
    (tunnel, nbma, lan)
}

fn spoke_engine(i: usize, now: Instant) -> Engine {
    let (tunnel, nbma, lan) = spoke(i);
    let mut c = Config::new(Role::Spoke, tunnel, 16, nbma);
    c.phase = Phase::Three;
    c.local_prefixes = vec![lan];
    c.nhs = vec![NhsConfig {
        tunnel_address: hub_tunnel(),
        nbma_address: hub_nbma(),
        priority: 0,
    }];
    Engine::new(c, now).unwrap()
}

fn drain(e: &mut Engine) {
    while let Some(t) = e.poll_transmit() {
        black_box(t);
    }
    while let Some(ev) = e.poll_event() {
        black_box(ev);
    }
}

/// A hub with every spoke registered, plus each spoke's Registration Request and a
/// Resolution Request from spoke i for a host in spoke i+1's LAN.
struct Setup {
    hub: Engine,
    regs: Vec<(IpAddr, Vec<u8>)>,
    resolutions: Vec<(IpAddr, Vec<u8>)>,
    now: Instant,
}

fn setup(answer_for_clients: bool) -> Setup {
    let now = Instant::now();
    let mut hc = Config::new(Role::Hub, hub_tunnel(), 16, hub_nbma());
    hc.answer_for_clients = answer_for_clients;
    let mut hub = Engine::new(hc, now).unwrap();
    let mut regs = Vec::with_capacity(SPOKES);
    let mut resolutions = Vec::with_capacity(SPOKES);
    for i in 0..SPOKES {
        let mut s = spoke_engine(i, now);
        let (_, nbma, _) = spoke(i);
        let reg = s.poll_transmit().unwrap().bytes;
        drain(&mut s);
        let (_, _, next_lan) = spoke((i + 1) % SPOKES);
        let target = match next_lan.addr() {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) + 7)),
            other => other,
        };
        s.resolve(now, target);
        let res = s.poll_transmit().unwrap().bytes;
        hub.handle_packet(now, nbma, &reg);
        drain(&mut hub);
        regs.push((nbma, reg));
        resolutions.push((nbma, res));
    }
    assert_eq!(hub.registered_clients(), SPOKES);
    Setup {
        hub,
        regs,
        resolutions,
        now,
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub_10k_spokes");
    g.throughput(Throughput::Elements(1));

    let mut s = setup(false);
    let mut i = 0usize;
    g.bench_function("registration_refresh", |b| {
        b.iter(|| {
            let (from, bytes) = &s.regs[i % SPOKES];
            s.hub.handle_packet(s.now, *from, bytes);
            drain(&mut s.hub);
            i += 1;
        })
    });
    let mut i = 0usize;
    g.bench_function("resolution_forwarded_to_owner", |b| {
        b.iter(|| {
            let (from, bytes) = &s.resolutions[i % SPOKES];
            s.hub.handle_packet(s.now, *from, bytes);
            drain(&mut s.hub);
            i += 1;
        })
    });
    let mut i = 0usize;
    let head = [0x45u8; 40];
    g.bench_function("hairpinned_rate_limited", |b| {
        b.iter(|| {
            let (src_tunnel, nbma, _) = spoke(i % SPOKES);
            let (dst, _, _) = spoke((i + 1) % SPOKES);
            s.hub.hairpinned(s.now, src_tunnel, dst, nbma, &head);
            drain(&mut s.hub);
            i += 1;
        })
    });
    drop(s);

    // Spoke side: the data plane reports a miss for a destination already being resolved
    // (the common case while a resolution is in flight), and shortcut use.
    let now = Instant::now();
    let mut sp = spoke_engine(0, now);
    drain(&mut sp);
    let target = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1));
    sp.resolve(now, target);
    drain(&mut sp);
    g.bench_function("spoke_resolve_already_pending", |b| {
        b.iter(|| {
            sp.resolve(now, black_box(target));
            drain(&mut sp);
        })
    });
    g.bench_function("spoke_traffic_no_shortcut", |b| {
        b.iter(|| sp.traffic(now, black_box(target)))
    });

    let mut s = setup(true);
    let mut i = 0usize;
    g.bench_function("resolution_answered", |b| {
        b.iter(|| {
            let (from, bytes) = &s.resolutions[i % SPOKES];
            s.hub.handle_packet(s.now, *from, bytes);
            drain(&mut s.hub);
            i += 1;
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
