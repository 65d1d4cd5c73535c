//! Test helpers: an independent ESP encoder (built from the RFC text, sharing only the AEAD
//! primitive with the crate) and a minimal pcap reader.
#![allow(dead_code)]

use aws_lc_rs::aead::{
    AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};
use dmvpn_esp::Suite;

pub fn keymat(suite: Suite, fill: u8) -> Vec<u8> {
    (0..suite.keymat_len())
        .map(|i| fill.wrapping_add(i as u8))
        .collect()
}

/// Builds an ESP transport-mode packet by hand: SPI | seq low | IV | AEAD(payload | padding |
/// pad length | next header) | ICV, with AAD SPI | [seq high] | seq low.
#[allow(clippy::too_many_arguments)]
pub fn reference_seal(
    suite: Suite,
    keymat: &[u8],
    spi: u32,
    seq: u64,
    esn: bool,
    iv: [u8; 8],
    next_header: u8,
    payload: &[u8],
    padding: &[u8],
) -> Vec<u8> {
    let mut plain = payload.to_vec();
    plain.extend_from_slice(padding);
    plain.push(padding.len() as u8);
    plain.push(next_header);
    reference_seal_plaintext(suite, keymat, spi, seq, esn, iv, &plain)
}

/// Like [`reference_seal`], but encrypts exactly `plain` (which must end with the trailer), so
/// tests can forge authentic packets with a malformed trailer.
pub fn reference_seal_plaintext(
    suite: Suite,
    keymat: &[u8],
    spi: u32,
    seq: u64,
    esn: bool,
    iv: [u8; 8],
    plain: &[u8],
) -> Vec<u8> {
    let alg = match suite {
        Suite::Aes128Gcm => &AES_128_GCM,
        Suite::Aes256Gcm => &AES_256_GCM,
        Suite::ChaCha20Poly1305 => &CHACHA20_POLY1305,
    };
    let (key, salt) = keymat.split_at(suite.key_len());
    let key = LessSafeKey::new(UnboundKey::new(alg, key).unwrap());
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(salt);
    nonce[4..].copy_from_slice(&iv);
    let mut aad = spi.to_be_bytes().to_vec();
    if esn {
        aad.extend_from_slice(&((seq >> 32) as u32).to_be_bytes());
    }
    aad.extend_from_slice(&(seq as u32).to_be_bytes());
    let mut body = plain.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(&aad),
        &mut body,
    )
    .unwrap();
    let mut out = spi.to_be_bytes().to_vec();
    out.extend_from_slice(&(seq as u32).to_be_bytes());
    out.extend_from_slice(&iv);
    out.extend_from_slice(&body);
    out
}

/// Default padding 1, 2, 3, ... of length n.
pub fn default_padding(n: usize) -> Vec<u8> {
    (1..=n).map(|i| i as u8).collect()
}

/// Records of a classic little- or big-endian pcap file (microsecond or nanosecond).
pub fn pcap_records(data: &[u8]) -> (u32, Vec<Vec<u8>>) {
    assert!(data.len() >= 24, "pcap too short");
    let magic = u32::from_le_bytes(data[..4].try_into().unwrap());
    let le = match magic {
        0xa1b2c3d4 | 0xa1b23c4d => true,
        0xd4c3b2a1 | 0x4d3cb2a1 => false,
        m => panic!("not a pcap file (magic {m:#x})"),
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
    let mut off = 24;
    let mut out = Vec::new();
    while off + 16 <= data.len() {
        let incl = u32_at(off + 8) as usize;
        off += 16;
        out.push(data[off..off + incl].to_vec());
        off += incl;
    }
    assert_eq!(off, data.len(), "trailing bytes in pcap");
    (linktype, out)
}

/// An IPv4 packet inside an Ethernet frame.
pub struct Ipv4<'a> {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    pub payload: &'a [u8],
}

pub fn ipv4_of_ethernet(frame: &[u8]) -> Option<Ipv4<'_>> {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    Some(Ipv4 {
        src: ip[12..16].try_into().unwrap(),
        dst: ip[16..20].try_into().unwrap(),
        proto: ip[9],
        payload: &ip[ihl..total],
    })
}

pub fn hex(s: &str) -> Vec<u8> {
    let s = s.trim().trim_start_matches("0x");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
