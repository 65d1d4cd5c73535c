//! ESP seal/open throughput by packet size, next to the bare AEAD on the same plaintext length
//! (payload + ESP trailer), so the ratio shows what the ESP layer itself costs.
//!
//! `cargo bench -p dmvpn-esp --bench esp`; throughput is in payload bytes per second.
//!
//! The clock is the benchmarking thread's CPU time, not wall time: on a shared machine, time
//! spent descheduled would otherwise land in whichever benchmark happened to be running, and the
//! ESP-versus-AEAD ratio would be noise.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{
    AES_256_GCM, Aad, Algorithm, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dmvpn_esp::{
    ESP_HEADROOM, ICV_LEN, InboundSa, Lifetime, OutboundSa, SecurityAssociation, Suite, sealed_len,
};
use nix::time::{ClockId, clock_gettime};

const SIZES: [usize; 4] = [64, 512, 1400, 8000];
const SUITES: [Suite; 2] = [Suite::Aes256Gcm, Suite::ChaCha20Poly1305];
/// Packets sealed ahead (untimed) per batch in the open benchmarks.
const BATCH: u64 = 256;

/// CPU time consumed by the calling thread.
fn cpu_now() -> Duration {
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).expect("thread CPU clock");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

struct ThreadCpuTime;

static WALL: WallTime = WallTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;
    fn start(&self) -> Duration {
        cpu_now()
    }
    fn end(&self, start: Duration) -> Duration {
        cpu_now().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        // Values are durations, so the wall-clock formatter (ns/µs, bytes/s) applies as is.
        WALL.formatter()
    }
}

fn sa(suite: Suite) -> SecurityAssociation {
    SecurityAssociation::new(0x1001, suite, &vec![0x42; suite.keymat_len()])
        .unwrap()
        .with_lifetime(Lifetime::UNLIMITED)
        .unwrap()
}

fn raw_key(suite: Suite) -> LessSafeKey {
    let alg: &'static Algorithm = match suite {
        Suite::Aes256Gcm => &AES_256_GCM,
        _ => &CHACHA20_POLY1305,
    };
    LessSafeKey::new(UnboundKey::new(alg, &vec![0x42; suite.key_len()]).unwrap())
}

fn nonce(n: u64) -> Nonce {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(b)
}

/// Plaintext length the AEAD processes inside ESP: payload, padding, pad length, next header.
fn body_len(size: usize) -> usize {
    sealed_len(size) - ESP_HEADROOM - ICV_LEN
}

fn seal(c: &mut Criterion<ThreadCpuTime>) {
    for suite in SUITES {
        let mut g = c.benchmark_group(format!("seal/{suite}"));
        for size in SIZES {
            g.throughput(Throughput::Bytes(size as u64));
            let now = Instant::now();
            let mut tx: OutboundSa = sa(suite).into_outbound(now).unwrap();
            let mut buf = vec![0x17u8; sealed_len(size)];
            g.bench_with_input(BenchmarkId::new("esp", size), &size, |b, &size| {
                b.iter(|| {
                    tx.seal_in_place(now, 47, black_box(&mut buf), size)
                        .unwrap()
                })
            });
            let key = raw_key(suite);
            let mut body = vec![0x17u8; body_len(size)];
            let mut n = 0u64;
            g.bench_with_input(BenchmarkId::new("raw_aead", size), &size, |b, _| {
                b.iter(|| {
                    n += 1;
                    key.seal_in_place_separate_tag(
                        nonce(n),
                        Aad::from([0u8; 12]),
                        black_box(&mut body),
                    )
                    .unwrap()
                })
            });
        }
        g.finish();
    }
}

fn open(c: &mut Criterion<ThreadCpuTime>) {
    for suite in SUITES {
        let mut g = c.benchmark_group(format!("open/{suite}"));
        for size in SIZES {
            g.throughput(Throughput::Bytes(size as u64));
            let now = Instant::now();
            let mut tx: OutboundSa = sa(suite).into_outbound(now).unwrap();
            let mut rx: InboundSa = sa(suite).into_inbound(now).unwrap();
            let payload = vec![0x17u8; size];
            // Sequence numbers only grow, as on a real link: seal a batch (untimed), open it
            // (timed).
            g.bench_with_input(BenchmarkId::new("esp", size), &size, |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut left = iters;
                    let mut pkts: Vec<Vec<u8>> = Vec::with_capacity(BATCH as usize);
                    while left > 0 {
                        let n = left.min(BATCH);
                        pkts.clear();
                        for _ in 0..n {
                            let mut p = Vec::new();
                            tx.seal_to_vec(now, 47, &payload, &mut p).unwrap();
                            pkts.push(p);
                        }
                        let t = cpu_now();
                        for p in &mut pkts {
                            black_box(rx.open_in_place(now, p).unwrap());
                        }
                        total += cpu_now() - t;
                        left -= n;
                    }
                    total
                })
            });
            let key = raw_key(suite);
            let mut seq = 0u64;
            g.bench_with_input(BenchmarkId::new("raw_aead", size), &size, |b, &size| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut left = iters;
                    let mut pkts: Vec<(u64, Vec<u8>, Vec<u8>)> = Vec::with_capacity(BATCH as usize);
                    while left > 0 {
                        let n = left.min(BATCH);
                        pkts.clear();
                        for _ in 0..n {
                            seq += 1;
                            let mut body = vec![0x17u8; body_len(size)];
                            let tag = key
                                .seal_in_place_separate_tag(
                                    nonce(seq),
                                    Aad::from([0u8; 12]),
                                    &mut body,
                                )
                                .unwrap();
                            pkts.push((seq, body, tag.as_ref().to_vec()));
                        }
                        let t = cpu_now();
                        for (s, body, tag) in &mut pkts {
                            black_box(
                                key.open_in_place_separate_tag(
                                    nonce(*s),
                                    Aad::from([0u8; 12]),
                                    tag,
                                    body,
                                )
                                .unwrap(),
                            );
                        }
                        total += cpu_now() - t;
                        left -= n;
                    }
                    total
                })
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .with_measurement(ThreadCpuTime)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = seal, open
}
criterion_main!(benches);
