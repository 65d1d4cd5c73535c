//! The Internet checksum (RFC 1071) that NHRP carries in `ar$chksum`.

/// Ones-complement sum of `bytes` as big-endian 16-bit words, not yet folded or inverted.
/// An odd trailing byte counts as the high byte of a word padded with zero.
pub(crate) fn sum(bytes: &[u8]) -> u64 {
    let (words, rest) = bytes.as_chunks::<2>();
    // A u64 cannot overflow here: it would take more than 2^48 words.
    let mut acc: u64 = words
        .iter()
        .map(|w| u64::from(u16::from_be_bytes(*w)))
        .sum();
    if let [last] = rest {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a ones-complement sum to 16 bits and inverts it.
pub(crate) fn finish(mut acc: u64) -> u16 {
    while acc > 0xFFFF {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    // The loop leaves acc <= 0xFFFF, so the cast keeps every bit.
    !(acc as u16)
}

/// RFC 1071 checksum of `bytes` (an odd length is padded with one zero byte).
///
/// Computing it over a whole NHRP packet whose `ar$chksum` field holds the correct value gives 0.
pub fn checksum(bytes: &[u8]) -> u16 {
    finish(sum(bytes))
}

#[cfg(test)]
mod tests {
    use super::checksum;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2, checksum 220d.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(
            checksum(&[0x12, 0x34, 0x56]),
            checksum(&[0x12, 0x34, 0x56, 0x00])
        );
        assert_eq!(checksum(&[0xab]), !0xab00);
    }

    #[test]
    fn empty_and_carry() {
        assert_eq!(checksum(&[]), 0xffff);
        // 0xffff + 0x0001 = 0x1_0000 -> folds to 0x0001 -> inverted 0xfffe.
        assert_eq!(checksum(&[0xff, 0xff, 0x00, 0x01]), 0xfffe);
    }
}
