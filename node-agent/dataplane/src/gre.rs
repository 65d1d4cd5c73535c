//! GRE header codec (RFC 2784 with the RFC 2890 key and sequence extensions).
//!
//! Wire layout (all fields network byte order):
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! |C| |K|S| Reserved0       | Ver |         Protocol Type         |
//! |      Checksum (optional)      |       Reserved1 (Optional)    |
//! |                         Key (optional)                        |
//! |                 Sequence Number (Optional)                    |
//! ```
//!
//! The optional fields appear in the order checksum, key, sequence, which is also the
//! order Linux `ip_gre` (`gre_build_header`) and Cisco IOS emit them, so a header built
//! here is byte-identical to theirs for the same flags. mGRE DMVPN tunnels use the key
//! only: flags `0x2000`, 8 header bytes.
//!
//! Decoding is total: any byte slice yields a header plus the payload offset, or a
//! [`GreError`]. It never panics and never allocates.

use thiserror::Error;

/// GRE protocol type of IPv4 payloads.
pub const PROTO_IPV4: u16 = 0x0800;
/// GRE protocol type of IPv6 payloads.
pub const PROTO_IPV6: u16 = 0x86DD;
/// GRE protocol type of NHRP (Cisco and Linux `ETH_P_NHRP`); the NHRP packet follows the
/// GRE header directly, without an IP header.
pub const PROTO_NHRP: u16 = 0x2001;

/// The largest header this codec produces or accepts: base + checksum + key + sequence.
pub const MAX_HEADER_LEN: usize = 16;

const FLAG_C: u16 = 0x8000;
const FLAG_R: u16 = 0x4000;
const FLAG_K: u16 = 0x2000;
const FLAG_S: u16 = 0x1000;
/// Bits 4 and 5 (RFC 1701 strict source route and the top recursion bit). RFC 2784 §2.3: a
/// receiver that does not implement RFC 1701 discards packets with any of bits 1–5 set;
/// bits 2 and 3 are K and S since RFC 2890, bit 1 is R.
const FLAG_SSR_RECUR: u16 = 0x0800 | 0x0400;
const VERSION_MASK: u16 = 0x0007;

/// A decoded or to-be-encoded GRE header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GreHeader {
    /// EtherType of the payload ([`PROTO_IPV4`], [`PROTO_IPV6`], [`PROTO_NHRP`], ...).
    pub protocol: u16,
    /// Checksum present (C bit). On encode the checksum is computed; on decode it has been
    /// verified.
    pub checksum: bool,
    /// RFC 2890 key (K bit).
    pub key: Option<u32>,
    /// RFC 2890 sequence number (S bit).
    pub sequence: Option<u32>,
}

/// Why a byte slice is not an acceptable GRE packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum GreError {
    /// Fewer bytes than the flags announce.
    #[error("GRE packet truncated: header needs {needed} bytes, got {got}")]
    Truncated { needed: usize, got: usize },
    /// Version field is not 0 (version 1 is the PPTP variant).
    #[error("GRE version {0} is not supported (only version 0, RFC 2784)")]
    Version(u8),
    /// Routing present, strict source route or recursion control set (RFC 1701 features,
    /// which RFC 2784 receivers must discard).
    #[error("GRE flags {0:#06x} use RFC 1701 routing/recursion bits, which are not supported")]
    Rfc1701Flags(u16),
    /// The checksum does not match the packet.
    #[error("GRE checksum mismatch: packet carries {carried:#06x}")]
    BadChecksum { carried: u16 },
    /// The output buffer is too small for the header (encoding only).
    #[error("buffer of {got} bytes cannot hold a {needed}-byte GRE header")]
    BufferTooSmall { needed: usize, got: usize },
}

impl GreHeader {
    /// A keyed header as DMVPN uses it (no checksum, no sequence).
    pub const fn with_key(protocol: u16, key: Option<u32>) -> Self {
        Self {
            protocol,
            checksum: false,
            key,
            sequence: None,
        }
    }

    /// Encoded header length in bytes: 4, plus 4 for each optional field.
    pub const fn len(&self) -> usize {
        4 + if self.checksum { 4 } else { 0 }
            + if self.key.is_some() { 4 } else { 0 }
            + if self.sequence.is_some() { 4 } else { 0 }
    }

    /// Never true: a GRE header has at least 4 bytes. Present for API symmetry with `len`.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// The first 16-bit word: flags and version (always 0).
    pub const fn flags(&self) -> u16 {
        (if self.checksum { FLAG_C } else { 0 })
            | (if self.key.is_some() { FLAG_K } else { 0 })
            | (if self.sequence.is_some() { FLAG_S } else { 0 })
    }

    /// Decodes a GRE packet (header and payload). Returns the header and the offset of the
    /// payload in `packet`. When the C bit is set, the checksum over the whole packet is
    /// verified. Reserved0 bits 6–12 are ignored, as RFC 2784 requires.
    pub fn decode(packet: &[u8]) -> Result<(GreHeader, usize), GreError> {
        let (Some(&b0), Some(&b1), Some(&p0), Some(&p1)) =
            (packet.first(), packet.get(1), packet.get(2), packet.get(3))
        else {
            return Err(GreError::Truncated {
                needed: 4,
                got: packet.len(),
            });
        };
        let flags = u16::from_be_bytes([b0, b1]);
        let version = (flags & VERSION_MASK) as u8;
        if version != 0 {
            return Err(GreError::Version(version));
        }
        if flags & (FLAG_R | FLAG_SSR_RECUR) != 0 {
            return Err(GreError::Rfc1701Flags(flags));
        }
        let checksum = flags & FLAG_C != 0;
        let has_key = flags & FLAG_K != 0;
        let has_seq = flags & FLAG_S != 0;
        let mut hdr = GreHeader {
            protocol: u16::from_be_bytes([p0, p1]),
            checksum,
            key: None,
            sequence: None,
        };
        let needed = 4 + 4 * (usize::from(checksum) + usize::from(has_key) + usize::from(has_seq));
        if packet.len() < needed {
            return Err(GreError::Truncated {
                needed,
                got: packet.len(),
            });
        }
        let mut off = 4;
        if checksum {
            if internet_checksum(packet) != 0 {
                let carried = read_u32(packet, off).map_or(0, |w| (w >> 16) as u16);
                return Err(GreError::BadChecksum { carried });
            }
            off += 4;
        }
        if has_key {
            hdr.key = read_u32(packet, off);
            off += 4;
        }
        if has_seq {
            hdr.sequence = read_u32(packet, off);
            off += 4;
        }
        Ok((hdr, off))
    }

    /// Writes the header into `out[..self.len()]` with a zero checksum field. Use
    /// [`GreHeader::encode_packet`] when the C bit is set, so the checksum is filled in.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, GreError> {
        let len = self.len();
        let got = out.len();
        let Some(out) = out.get_mut(..len) else {
            return Err(GreError::BufferTooSmall { needed: len, got });
        };
        out.fill(0);
        let mut words = out.chunks_exact_mut(4);
        let mut put = |v: u32| {
            if let Some(w) = words.next() {
                w.copy_from_slice(&v.to_be_bytes());
            }
        };
        put((u32::from(self.flags()) << 16) | u32::from(self.protocol));
        if self.checksum {
            put(0);
        }
        if let Some(k) = self.key {
            put(k);
        }
        if let Some(s) = self.sequence {
            put(s);
        }
        Ok(len)
    }

    /// Encodes in place: `packet` is `self.len()` bytes of room followed by the payload.
    /// Writes the header and, if the C bit is set, the checksum over header and payload.
    pub fn encode_packet(&self, packet: &mut [u8]) -> Result<(), GreError> {
        self.write(packet)?;
        if self.checksum {
            let sum = internet_checksum(packet).to_be_bytes();
            if let Some(field) = packet.get_mut(4..6) {
                field.copy_from_slice(&sum);
            }
        }
        Ok(())
    }

    /// Convenience for tests and control traffic: header + payload in a new vector.
    pub fn to_packet(&self, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; self.len() + payload.len()];
        if let Some(tail) = v.get_mut(self.len()..) {
            tail.copy_from_slice(payload);
        }
        // Cannot fail: the vector was sized for the header.
        let _ = self.encode_packet(&mut v);
        v
    }
}

fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    let w = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
}

/// RFC 1071 one's complement checksum of `data` (odd length padded with a zero byte).
/// Over a packet whose checksum field is filled in correctly the result is 0.
pub fn internet_checksum(data: &[u8]) -> u16 {
    // 32-bit big-endian words summed into 64 bits, folded at the end: the same one's
    // complement sum as 16-bit words (RFC 1071 §2), with half the additions.
    let mut sum: u64 = 0;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        sum += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let mut rest = words.remainder().chunks_exact(2);
    for c in &mut rest {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = rest.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keyed_ipv4_header_matches_linux_and_cisco_bytes() {
        // `ip tunnel add ... mode gre key 42` and Cisco `tunnel key 42` emit exactly this.
        let h = GreHeader::with_key(PROTO_IPV4, Some(42));
        let mut b = [0u8; 8];
        assert_eq!(h.write(&mut b), Ok(8));
        assert_eq!(b, [0x20, 0x00, 0x08, 0x00, 0, 0, 0, 42]);
        let nhrp = GreHeader::with_key(PROTO_NHRP, Some(0x0102_0304));
        let p = nhrp.to_packet(&[0xAA]);
        assert_eq!(p, [0x20, 0x00, 0x20, 0x01, 1, 2, 3, 4, 0xAA]);
    }

    #[test]
    fn plain_header_is_four_bytes() {
        let h = GreHeader::with_key(PROTO_IPV6, None);
        assert_eq!(h.to_packet(&[]), [0, 0, 0x86, 0xDD]);
        assert_eq!(GreHeader::decode(&[0, 0, 0x86, 0xDD]), Ok((h, 4)));
    }

    #[test]
    fn all_options_in_rfc_order() {
        let h = GreHeader {
            protocol: PROTO_IPV4,
            checksum: true,
            key: Some(0x1122_3344),
            sequence: Some(0x5566_7788),
        };
        let p = h.to_packet(&[0x45, 0, 0, 20]);
        assert_eq!(p.len(), 20);
        assert_eq!(&p[..4], &[0xB0, 0x00, 0x08, 0x00]);
        assert_eq!(&p[8..16], &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
        assert_eq!(
            internet_checksum(&p),
            0,
            "checksum field makes the sum verify"
        );
        assert_eq!(GreHeader::decode(&p), Ok((h, 16)));
    }

    #[test]
    fn checksum_mismatch_is_detected() {
        let h = GreHeader {
            protocol: PROTO_IPV4,
            checksum: true,
            key: None,
            sequence: None,
        };
        let mut p = h.to_packet(&[1, 2, 3, 4, 5]);
        p[9] ^= 0xFF;
        assert!(matches!(
            GreHeader::decode(&p),
            Err(GreError::BadChecksum { .. })
        ));
    }

    #[test]
    fn rejects_what_rfc_2784_says_to_discard() {
        assert_eq!(
            GreHeader::decode(&[0, 1, 0x88, 0x0B]),
            Err(GreError::Version(1))
        );
        assert!(matches!(
            GreHeader::decode(&[0x40, 0, 8, 0, 0, 0, 0, 0]),
            Err(GreError::Rfc1701Flags(_))
        ));
        assert!(matches!(
            GreHeader::decode(&[0x08, 0, 8, 0]),
            Err(GreError::Rfc1701Flags(_))
        ));
        assert!(matches!(
            GreHeader::decode(&[0x04, 0, 8, 0]),
            Err(GreError::Rfc1701Flags(_))
        ));
        // Bits 6-12 are ignored on receipt.
        assert_eq!(
            GreHeader::decode(&[0x03, 0xF8, 8, 0]),
            Ok((GreHeader::with_key(PROTO_IPV4, None), 4))
        );
    }

    #[test]
    fn truncation_reports_needed_length() {
        assert_eq!(
            GreHeader::decode(&[0x20, 0]),
            Err(GreError::Truncated { needed: 4, got: 2 })
        );
        assert_eq!(
            GreHeader::decode(&[0x30, 0, 8, 0, 0, 0, 0, 1]),
            Err(GreError::Truncated { needed: 12, got: 8 })
        );
    }

    #[test]
    fn write_reports_small_buffer() {
        let h = GreHeader::with_key(PROTO_IPV4, Some(1));
        assert_eq!(
            h.write(&mut [0u8; 7]),
            Err(GreError::BufferTooSmall { needed: 8, got: 7 })
        );
    }

    fn header() -> impl Strategy<Value = GreHeader> {
        (
            any::<u16>(),
            any::<bool>(),
            any::<Option<u32>>(),
            any::<Option<u32>>(),
        )
            .prop_map(|(protocol, checksum, key, sequence)| GreHeader {
                protocol,
                checksum,
                key,
                sequence,
            })
    }

    proptest! {
        #[test]
        fn decode_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok((h, off)) = GreHeader::decode(&bytes) {
                prop_assert_eq!(off, h.len());
                prop_assert!(off <= bytes.len());
            }
        }

        #[test]
        fn encode_decode_round_trip(h in header(), payload in proptest::collection::vec(any::<u8>(), 0..100)) {
            let p = h.to_packet(&payload);
            prop_assert_eq!(p.len(), h.len() + payload.len());
            let (d, off) = GreHeader::decode(&p).unwrap();
            prop_assert_eq!(d, h);
            prop_assert_eq!(&p[off..], &payload[..]);
        }

        #[test]
        fn checksum_matches_rfc_1071_reference(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut sum: u32 = 0;
            for c in data.chunks(2) {
                let w = u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]);
                sum += u32::from(w);
                sum = (sum & 0xFFFF) + (sum >> 16);
            }
            prop_assert_eq!(internet_checksum(&data), !(sum as u16));
        }

        #[test]
        fn decode_encode_reproduces_canonical_input(bytes in proptest::collection::vec(any::<u8>(), 4..64)) {
            // Canonical = reserved bits 6-12 clear; then re-encoding gives back the same bytes.
            let mut b = bytes.clone();
            b[0] &= 0xFC;
            b[1] &= 0x07;
            if let Ok((h, off)) = GreHeader::decode(&b) {
                prop_assert_eq!(h.to_packet(&b[off..]), b);
            }
        }
    }
}
