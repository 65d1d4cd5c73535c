//! Test helpers: a minimal pcap (libpcap classic format) reader and writer, and the
//! Ethernet / IPv4 / GRE framing that NHRP rides in on the wire.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

pub const LINKTYPE_ETHERNET: u32 = 1;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IPPROTO_GRE: u8 = 47;

/// The shared fixtures/tools directory: `$DMVPN_SHARED`, else `<repo>/../shared`.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("DMVPN_SHARED") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    shared_dir().join("fixtures/pcap").join(name)
}

/// All frames of a classic pcap file (either byte order, micro- or nanosecond timestamps).
pub fn read_pcap(path: &Path) -> (u32, Vec<Vec<u8>>) {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        data.len() >= 24,
        "{}: shorter than a pcap header",
        path.display()
    );
    let magic = u32::from_le_bytes(data[0..4].try_into().unwrap());
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        m => panic!(
            "{}: not a classic pcap file (magic {m:#010x})",
            path.display()
        ),
    };
    let u32_at = |off: usize| {
        let b: [u8; 4] = data[off..off + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let linktype = u32_at(20);
    let mut frames = Vec::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let incl = u32_at(off + 8) as usize;
        let start = off + 16;
        assert!(
            start + incl <= data.len(),
            "{}: truncated record",
            path.display()
        );
        frames.push(data[start..start + incl].to_vec());
        off = start + incl;
    }
    assert_eq!(off, data.len(), "{}: trailing bytes", path.display());
    (linktype, frames)
}

/// Writes frames as a little-endian microsecond pcap, one second apart.
pub fn write_pcap(path: &Path, linktype: u32, frames: &[Vec<u8>]) {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&linktype.to_le_bytes());
    for (i, f) in frames.iter().enumerate() {
        out.extend_from_slice(&(1_767_225_600u32 + i as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    std::fs::write(path, out).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// One GRE packet found in a frame.
#[derive(Debug, Clone)]
pub struct GreFrame {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub key: Option<u32>,
    pub proto: u16,
    pub payload: Vec<u8>,
}

/// Ethernet (optionally one VLAN tag) / IPv4 / GRE (RFC 2784 + 2890 key and sequence), or `None`
/// when the frame is something else (ARP, IPv6 neighbour discovery, ...).
pub fn parse_gre(frame: &[u8]) -> Option<GreFrame> {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes(frame.get(off..off + 2)?.try_into().ok()?);
    off += 2;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = u16::from_be_bytes(frame.get(off + 2..off + 4)?.try_into().ok()?);
        off += 4;
    }
    if ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(off..)?;
    let ihl = usize::from(ip.first()? & 0x0F) * 4;
    let total = usize::from(u16::from_be_bytes(ip.get(2..4)?.try_into().ok()?));
    if *ip.get(9)? != IPPROTO_GRE || ihl < 20 || total < ihl {
        return None;
    }
    let src = Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(12..16)?).ok()?);
    let dst = Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(16..20)?).ok()?);
    // IPv4 total length bounds the payload: Ethernet padding after it is not GRE data.
    let gre = ip.get(ihl..total)?;
    let flags = u16::from_be_bytes(gre.get(0..2)?.try_into().ok()?);
    let proto = u16::from_be_bytes(gre.get(2..4)?.try_into().ok()?);
    let mut g = 4;
    if flags & 0x8000 != 0 {
        g += 4; // checksum + reserved1
    }
    let key = if flags & 0x2000 != 0 {
        let k = u32::from_be_bytes(gre.get(g..g + 4)?.try_into().ok()?);
        g += 4;
        Some(k)
    } else {
        None
    };
    if flags & 0x1000 != 0 {
        g += 4; // sequence number
    }
    Some(GreFrame {
        src,
        dst,
        key,
        proto,
        payload: gre.get(g..)?.to_vec(),
    })
}

fn ipv4_header_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet / IPv4 / GRE (key bit set) frame carrying `payload` with GRE protocol `proto`.
pub fn ethernet_ipv4_gre(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    key: u32,
    proto: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 20 + 8 + payload.len());
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // locally administered MACs
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, IPPROTO_GRE, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = ipv4_header_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&0x2000u16.to_be_bytes());
    f.extend_from_slice(&proto.to_be_bytes());
    f.extend_from_slice(&key.to_be_bytes());
    f.extend_from_slice(payload);
    f
}
