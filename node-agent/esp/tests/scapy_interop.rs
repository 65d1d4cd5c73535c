//! Cross-check against an independent ESP implementation: scapy (scapy.layers.ipsec, on top of
//! pyca/cryptography) decrypts packets we sealed and seals packets we must open, for AES-GCM
//! (128 and 256) and ChaCha20-Poly1305, with and without ESN, including sequence numbers past
//! 2^32. scapy runs under `unshare -n` (no network at all).
//!
//! Needs python3 with scapy and `unshare`; without them the test is skipped with a message,
//! unless the environment variable CI is set, where it fails.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::{hex, keymat};
use dmvpn_esp::udp::{Udp4500, classify_udp_4500, parse_udp, write_udp_header};
use dmvpn_esp::{InboundSa, Lifetime, OutboundSa, SecurityAssociation, Suite};

const SPI: u32 = 0x0000_1001;

fn have_scapy() -> Result<(), String> {
    let probe = Command::new("unshare")
        .args(["-n", "python3", "-c", "import scapy.layers.ipsec"])
        .output()
        .map_err(|e| format!("cannot run `unshare -n python3`: {e}"))?;
    if probe.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&probe.stderr);
        Err(format!(
            "`unshare -n python3 -c 'import scapy.layers.ipsec'` failed ({}); install scapy (pip install scapy, or apt-get install python3-scapy)",
            err.lines().last().unwrap_or("no output").trim()
        ))
    }
}

fn sa(suite: Suite, esn: bool) -> SecurityAssociation {
    SecurityAssociation::new(SPI, suite, &keymat(suite, 0x40))
        .unwrap()
        .with_esn(esn)
        .with_lifetime(Lifetime::UNLIMITED)
        .unwrap()
}

/// Steps an inbound SA up towards `target` with our own packets (each step below 2^31, so ESN
/// inference follows), leaving the highest seen number within 2^30 below `target`.
fn advance(rx: &mut InboundSa, tx: &mut OutboundSa, target: u64) {
    let now = Instant::now();
    while tx.next_seq() + (1 << 30) < target {
        tx.skip_to_seq(tx.next_seq() + (1 << 30));
        let mut p = Vec::new();
        tx.seal_to_vec(now, 47, b"", &mut p).unwrap();
        rx.open_in_place(now, &mut p).unwrap();
    }
}

/// Hex, with "-" for empty so that every job line has all its fields.
fn hexs(b: &[u8]) -> String {
    if b.is_empty() {
        return "-".into();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Job {
    line: String,
    /// UDP-encapsulated on port 4500.
    udp: bool,
    /// D: the payload scapy must return (None: scapy must reject it). E: the payload we must open.
    expect: Option<Vec<u8>>,
    suite: Suite,
    esn: bool,
    seq: u64,
    nh: u8,
}

#[test]
fn scapy_decrypts_ours_and_we_decrypt_scapys() {
    if let Err(why) = have_scapy() {
        if std::env::var_os("CI").is_some() {
            panic!("scapy cross-check cannot run in CI: {why}");
        }
        eprintln!("SKIPPED scapy cross-check: {why}");
        return;
    }
    let now = Instant::now();
    let mut jobs = Vec::new();
    let seqs_for = |esn: bool| -> Vec<u64> {
        if esn {
            vec![1, 2, (1 << 32) + 7, (1 << 32) + 0x9000_0000]
        } else {
            vec![1, 2, 0xFFFF_FFF0]
        }
    };
    for suite in Suite::ALL {
        for esn in [false, true] {
            let km = hexs(&keymat(suite, 0x40));
            // Ours -> scapy, every pad length.
            let mut tx = sa(suite, esn).into_outbound(now).unwrap();
            for (i, seq) in seqs_for(esn).into_iter().enumerate() {
                tx.skip_to_seq(seq);
                for len in [0usize, 1, 2, 3, 61, 1400 + i] {
                    let payload: Vec<u8> = (0..len).map(|b| (b * 13 + i) as u8).collect();
                    let seq = tx.next_seq();
                    let mut esp = Vec::new();
                    tx.seal_to_vec(now, 47, &payload, &mut esp).unwrap();
                    let line = format!("D {suite} {} {SPI:x} {km} {seq:x} 0", u8::from(esn));
                    if len == 61 {
                        // Tampered copy: scapy must reject it too.
                        let mut bad = esp.clone();
                        let mid = bad.len() / 2;
                        bad[mid] ^= 0x20;
                        jobs.push(Job {
                            line: format!("{line} {}", hexs(&bad)),
                            udp: false,
                            expect: None,
                            suite,
                            esn,
                            seq,
                            nh: 47,
                        });
                    }
                    jobs.push(Job {
                        line: format!("{line} {}", hexs(&esp)),
                        udp: false,
                        expect: Some(payload),
                        suite,
                        esn,
                        seq,
                        nh: 47,
                    });
                }
            }
            // scapy -> ours.
            for (i, seq) in seqs_for(esn).into_iter().enumerate() {
                for (k, len) in [0usize, 1, 2, 3, 200, 1450].into_iter().enumerate() {
                    let payload: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
                    let seq = seq + k as u64;
                    let nh = if len == 3 { 59 } else { 47 };
                    jobs.push(Job {
                        line: format!(
                            "E {suite} {} {SPI:x} {km} {:x} {nh} {}",
                            u8::from(esn),
                            seq,
                            hexs(&payload)
                        ),
                        udp: false,
                        expect: Some(payload),
                        suite,
                        esn,
                        seq,
                        nh,
                    });
                }
            }
        }
    }

    // RFC 3948 UDP encapsulation, both directions. Next header 253 (experimental): scapy would
    // otherwise re-dissect the payload as GRE.
    for suite in Suite::ALL {
        let km = hexs(&keymat(suite, 0x40));
        let mut tx = sa(suite, true).into_outbound(now).unwrap();
        for seq in [1u64, (1 << 32) + 7] {
            tx.skip_to_seq(seq);
            for len in [0usize, 3, 100] {
                let payload: Vec<u8> = (0..len).map(|b| (b * 3) as u8).collect();
                let seq = tx.next_seq();
                let mut esp = Vec::new();
                let n = tx.seal_to_vec(now, 253, &payload, &mut esp).unwrap();
                let mut dgram = vec![0u8; 8];
                write_udp_header(&mut dgram, 4500, 4500, n).unwrap();
                dgram.extend_from_slice(&esp);
                jobs.push(Job {
                    line: format!("V {suite} 1 {SPI:x} {km} {seq:x} 0 {}", hexs(&dgram)),
                    udp: true,
                    expect: Some(payload.clone()),
                    suite,
                    esn: true,
                    seq,
                    nh: 253,
                });
                let seq = seq + len as u64 + 1000;
                jobs.push(Job {
                    line: format!("U {suite} 1 {SPI:x} {km} {seq:x} 47 {}", hexs(&payload)),
                    udp: true,
                    expect: Some(payload),
                    suite,
                    esn: true,
                    seq,
                    nh: 47,
                });
            }
        }
    }

    let dir = std::env::temp_dir().join(format!("dmvpn-esp-scapy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jobs_path = dir.join("jobs.txt");
    let out_path = dir.join("out.txt");
    let text: String = jobs.iter().map(|j| format!("{}\n", j.line)).collect();
    std::fs::write(&jobs_path, text).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scapy/esp_crosscheck.py");
    let run = Command::new("unshare")
        .arg("-n")
        .arg("python3")
        .arg(&script)
        .arg(&jobs_path)
        .arg(&out_path)
        .output()
        .unwrap();
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        run.status.success(),
        "scapy script failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), jobs.len());

    let (mut decrypted, mut rejected, mut opened) = (0, 0, 0);
    let (mut udp_decrypted, mut udp_opened) = (0, 0);
    for (job, line) in jobs.iter().zip(lines) {
        let f: Vec<&str> = line.split(' ').collect();
        match (f[0], &job.expect) {
            ("D", Some(payload)) => {
                assert_eq!(f[1], job.nh.to_string(), "scapy: {line} for {}", job.line);
                assert_eq!(hex(&f[2].replace('-', "")), *payload, "{}", job.line);
                decrypted += 1;
                udp_decrypted += usize::from(job.udp);
            }
            ("D", None) => {
                assert_eq!(
                    f[1], "ERR",
                    "scapy accepted a tampered packet: {}",
                    job.line
                );
                rejected += 1;
            }
            ("E", Some(payload)) => {
                let params = sa(job.suite, job.esn);
                let mut rx = params.clone().into_inbound(now).unwrap();
                let mut tx = params.into_outbound(now).unwrap();
                advance(&mut rx, &mut tx, job.seq);
                let mut esp = hex(f[1]);
                if job.udp {
                    let (h, inner) = parse_udp(&esp).unwrap();
                    assert_eq!((h.src_port, h.dst_port, h.checksum), (4500, 4500, 0));
                    let Ok(Udp4500::Esp(inner)) = classify_udp_4500(inner) else {
                        panic!("scapy's datagram is not ESP-in-UDP: {}", f[1]);
                    };
                    esp = inner.to_vec();
                    udp_opened += 1;
                }
                let o = rx
                    .open_in_place(now, &mut esp)
                    .unwrap_or_else(|e| panic!("{e} opening scapy's packet for {}", job.line));
                assert_eq!(o.seq, job.seq);
                assert_eq!(o.next_header, job.nh);
                assert_eq!(&esp[o.payload], &payload[..]);
                opened += 1;
            }
            _ => panic!("unexpected output {line}"),
        }
    }
    eprintln!(
        "scapy decrypted {decrypted} of our packets ({udp_decrypted} in UDP), rejected {rejected} tampered; we opened {opened} of scapy's ({udp_opened} in UDP)"
    );
    assert_eq!(rejected, 3 * (3 + 4));
    assert_eq!((udp_decrypted, udp_opened), (18, 18));
    assert!(decrypted > 100 && opened > 30);
}
