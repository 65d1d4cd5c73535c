//! Everything the engine emits in a full phase 3 scenario (registration behind NAT, redirect,
//! forwarded resolution, direct reply, purge on shutdown, loop error), with authentication,
//! is fed to Wireshark's NHRP dissector: right type, good checksum, no expert info, nothing
//! malformed.
//!
//! Without tshark the test fails when `CI` is set and otherwise skips, saying so.
//! `DMVPN_KEEP_PCAP=<path>` keeps the capture.

mod sim;

use std::process::Command;
use std::time::Duration;

use dmvpn_nhrp::wire::{Body, Cie, Extension, ExtensionBody, Header, Mandatory, Op, Packet};
use sim::{Sim, hub_config, ip, ipv4_head, spoke_config};

#[test]
fn wireshark_accepts_every_packet_the_engine_sends() {
    if Command::new("tshark").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "tshark is not installed but CI is set: apt-get install tshark"
        );
        eprintln!("SKIPPED engine_tshark: tshark not found");
        return;
    }
    // A password at least as long as the NBMA address: Wireshark reads the Cisco form as the
    // RFC one and flags shorter ones (see wire_tshark.rs).
    let pw = b"dmvpn-pw".to_vec();
    let mut s = Sim::new();
    let mut h = hub_config(1);
    h.auth = Some(pw.clone());
    h.mtu = 1400;
    let hub = s.add(h);
    let mut ca = spoke_config(2, &[1]);
    ca.auth = Some(pw.clone());
    ca.registration_unique = true;
    let a = s.add_behind_nat(ca, ip("198.51.100.200"));
    let mut cb = spoke_config(3, &[1]);
    cb.auth = Some(pw.clone());
    let b = s.add(cb);
    s.run_for(Duration::from_secs(1));
    let head = ipv4_head("10.100.2.1", "10.100.3.1");
    s.with(hub, |e, now| {
        e.hairpinned(
            now,
            ip("10.100.2.1"),
            ip("10.100.3.1"),
            ip("198.51.100.200"),
            &head,
        )
    });
    s.run_for(Duration::from_secs(1));
    // a looped request gets an Error Indication
    let looped = Packet {
        header: Header::ipv4(Op::ResolutionRequest, 8),
        body: Body::Mandatory(Mandatory {
            flags: 0,
            request_id: 9,
            src_nbma: Some(ip("203.0.113.3")),
            src_nbma_sub: vec![],
            src_proto: Some(ip("10.42.0.3")),
            dst_proto: Some(ip("10.100.2.1")),
            cies: vec![],
            payload: vec![],
        }),
        extensions: vec![
            Extension::new(
                true,
                ExtensionBody::ForwardTransitNhs(vec![Cie {
                    client_nbma: Some(ip("198.51.100.1")),
                    client_proto: Some(ip("10.42.0.1")),
                    ..Cie::default()
                }]),
            ),
            Extension::new(
                true,
                ExtensionBody::Authentication(dmvpn_nhrp::wire::Authentication::CiscoCleartext(
                    pw.clone(),
                )),
            ),
            Extension::end(),
        ],
    };
    s.inject(hub, ip("203.0.113.3"), &looped.to_bytes().unwrap());
    s.with(a, |e, now| e.shutdown(now));
    s.run_for(Duration::from_secs(1));

    let mut sent: Vec<(
        std::time::Instant,
        std::net::IpAddr,
        std::net::IpAddr,
        Packet,
    )> = Vec::new();
    for i in [hub, a, b] {
        let src = s.nodes[i].nbma;
        for (t, dst, p) in &s.nodes[i].sent {
            sent.push((*t, src, *dst, p.clone()));
        }
    }
    sent.sort_by_key(|x| x.0);
    let ops: std::collections::BTreeSet<u8> = sent.iter().map(|x| x.3.op().as_u8()).collect();
    assert_eq!(
        ops.into_iter().collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 7, 8],
        "scenario covers resolution, registration, purge, error and redirect"
    );
    let frames: Vec<Vec<u8>> = sent
        .iter()
        .map(|(_, src, dst, p)| sim::pcap::frame(*src, *dst, 42, &p.to_bytes().unwrap()))
        .collect();
    let path = match std::env::var_os("DMVPN_KEEP_PCAP") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::env::temp_dir().join(format!("dmvpn-engine-{}.pcap", std::process::id())),
    };
    sim::pcap::write(&path, &frames);
    let out = Command::new("tshark")
        .arg("-r")
        .arg(&path)
        .args(["-T", "fields", "-E", "separator=|", "-E", "occurrence=f"])
        .args(["-e", "nhrp.hdr.op.type", "-e", "nhrp.hdr.chksum.status"])
        .args(["-e", "_ws.expert", "-e", "_ws.malformed"])
        .output()
        .expect("run tshark");
    if std::env::var_os("DMVPN_KEEP_PCAP").is_none() {
        let _ = std::fs::remove_file(&path);
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), sent.len(), "{text}");
    for (line, (_, _, _, p)) in lines.iter().zip(&sent) {
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f[0], p.op().as_u8().to_string(), "{line}");
        assert_eq!(f[1], "1", "checksum good: {line}");
        assert_eq!(f[2], "", "expert info: {line} for {p:?}");
        assert_eq!(f[3], "", "malformed: {line}");
    }
}
