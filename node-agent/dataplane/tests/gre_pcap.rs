//! GRE interop against real captures and tshark.
//!
//! - `linux_ip_gre_golden`: every GRE packet that Linux `ip_gre` (FRR nhrpd hub and spoke,
//!   key 42) put on the wire decodes, and re-encoding gives the same bytes.
//! - `tshark_decodes_our_gre`: a pcap of Ethernet/IPv4/GRE packets built with our encoder
//!   is decoded by tshark with the right flags, key, protocol and checksum, and without
//!   expert warnings. Skipped (with a message) when tshark is missing, unless `CI` is set.

use std::path::Path;
use std::process::Command;

use dmvpn_dataplane::gre::{self, GreHeader};

/// Minimal pcap (LINKTYPE_ETHERNET) reader: returns the frames.
fn read_pcap(path: &Path) -> Vec<Vec<u8>> {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..4], &[0xd4, 0xc3, 0xb2, 0xa1], "little-endian pcap");
    assert_eq!(
        u32::from_le_bytes(b[20..24].try_into().unwrap()),
        1,
        "Ethernet"
    );
    let mut off = 24;
    let mut frames = Vec::new();
    while off + 16 <= b.len() {
        let incl = u32::from_le_bytes(b[off + 8..off + 12].try_into().unwrap()) as usize;
        frames.push(b[off + 16..off + 16 + incl].to_vec());
        off += 16 + incl;
    }
    frames
}

fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    let mut b = Vec::new();
    b.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&4u16.to_le_bytes());
    b.extend_from_slice(&0i32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&65535u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    for (i, f) in frames.iter().enumerate() {
        b.extend_from_slice(&(1_767_225_600u32 + i as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(f.len() as u32).to_le_bytes());
        b.extend_from_slice(&(f.len() as u32).to_le_bytes());
        b.extend_from_slice(f);
    }
    std::fs::write(path, b).unwrap();
}

/// The GRE part (header + payload) of an Ethernet/IPv4/GRE frame.
fn gre_of(frame: &[u8]) -> Option<&[u8]> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[23] != 47 {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0F) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    Some(&ip[ihl..total])
}

fn frame(src: [u8; 4], dst: [u8; 4], gre: &[u8]) -> Vec<u8> {
    let mut h =
        etherparse::Ipv4Header::new(gre.len() as u16, 64, etherparse::IpNumber::GRE, src, dst)
            .unwrap();
    h.header_checksum = h.calc_header_checksum();
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(&h.to_bytes());
    f.extend_from_slice(gre);
    f
}

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/frr-nhrp-registration.pcap")
}

#[test]
fn linux_ip_gre_golden() {
    let frames = read_pcap(&fixture());
    let gres: Vec<&[u8]> = frames.iter().filter_map(|f| gre_of(f)).collect();
    assert_eq!(gres.len(), 6, "5 Registration Requests and 1 Reply");
    for g in gres {
        let (h, off) = GreHeader::decode(g).unwrap();
        assert_eq!(h, GreHeader::with_key(gre::PROTO_NHRP, Some(42)));
        assert_eq!(off, 8);
        assert_eq!(h.to_packet(&g[off..]), g, "byte-identical to ip_gre");
    }
}

fn nhrp_payload_from_fixture() -> Vec<u8> {
    let frames = read_pcap(&fixture());
    let g = frames.iter().filter_map(|f| gre_of(f)).next().unwrap();
    g[8..].to_vec()
}

#[test]
fn tshark_decodes_our_gre() {
    let have = Command::new("tshark").arg("--version").output().is_ok();
    if !have {
        if std::env::var_os("CI").is_some() {
            panic!("tshark is required when CI is set (apt-get install tshark)");
        }
        eprintln!("SKIP tshark_decodes_our_gre: tshark not found (install tshark to run it)");
        return;
    }
    let icmp4 = {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 42, 0, 2], [10, 42, 0, 3], 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut v, b"kube-dmvpn")
            .unwrap();
        v
    };
    let icmp6 = {
        let mut v = Vec::new();
        let a: [u8; 16] = "fd00:42::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let b: [u8; 16] = "fd00:42::3".parse::<std::net::Ipv6Addr>().unwrap().octets();
        etherparse::PacketBuilder::ipv6(a, b, 64)
            .icmpv6_echo_request(7, 1)
            .write(&mut v, b"kube-dmvpn")
            .unwrap();
        v
    };
    let nhrp = nhrp_payload_from_fixture();
    let all_opts = GreHeader {
        protocol: gre::PROTO_IPV6,
        checksum: true,
        key: Some(0xDEAD_BEEF),
        sequence: Some(7),
    };
    let cases: Vec<(GreHeader, &[u8])> = vec![
        (GreHeader::with_key(gre::PROTO_IPV4, Some(42)), &icmp4),
        (GreHeader::with_key(gre::PROTO_NHRP, Some(42)), &nhrp),
        (all_opts, &icmp6),
        (GreHeader::with_key(gre::PROTO_IPV4, None), &icmp4),
    ];
    let frames: Vec<Vec<u8>> = cases
        .iter()
        .map(|(h, p)| frame([198, 51, 100, 2], [198, 51, 100, 1], &h.to_packet(p)))
        .collect();
    let dir = std::env::temp_dir().join(format!("dmvpn-gre-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pcap = dir.join("gre.pcap");
    write_pcap(&pcap, &frames);

    let out = Command::new("tshark")
        .arg("-r")
        .arg(&pcap)
        .args(["-T", "fields", "-E", "separator=|", "-E", "occurrence=f"])
        .args([
            "-e",
            "gre.flags_and_version",
            "-e",
            "gre.key",
            "-e",
            "gre.proto",
        ])
        .args(["-e", "gre.checksum.status", "-e", "gre.sequence_number"])
        .args([
            "-e",
            "icmp.type",
            "-e",
            "icmpv6.type",
            "-e",
            "nhrp.hdr.op.type",
        ])
        .args(["-e", "_ws.expert.severity", "-e", "_ws.malformed"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(rows.len(), 4, "{text}");
    // flags, key, proto, checksum status (1 = good, 0 = bad), seq, icmp, icmpv6, nhrp op, expert, malformed
    assert_eq!(rows[0][..3], ["0x2000", "0x0000002a", "0x0800"], "{text}");
    assert_eq!(rows[0][5], "8", "inner ICMP echo decoded: {text}");
    assert_eq!(rows[1][..3], ["0x2000", "0x0000002a", "0x2001"], "{text}");
    assert_eq!(rows[1][7], "3", "NHRP Registration Request decoded: {text}");
    assert_eq!(
        rows[2][..5],
        ["0xb000", "0xdeadbeef", "0x86dd", "1", "7"],
        "{text}"
    );
    assert_eq!(rows[2][6], "128", "inner ICMPv6 echo decoded: {text}");
    assert_eq!(rows[3][..3], ["0x0000", "", "0x0800"], "{text}");
    for r in &rows {
        // Severity: chat 0x200000, note 0x400000, warn 0x600000, error 0x800000.
        let sev = r[8].trim_start_matches("0x");
        let sev = u32::from_str_radix(sev, 16).unwrap_or(0);
        assert!(sev < 0x60_0000, "tshark expert warning/error: {text}");
        assert_eq!(r[9], "", "tshark marked a packet malformed: {text}");
    }
}
