//! AEAD suites usable for ESP.

use aws_lc_rs::aead;

/// Salt length of every suite here: the first 4 bytes of the 12-byte AEAD nonce, taken from
/// the end of the key material (RFC 4106 §8.1, RFC 7634 §4).
pub const SALT_LEN: usize = 4;

/// The AEAD transform of a Security Association.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Suite {
    /// AES-GCM, 128-bit key, 16-byte ICV (RFC 4106; IKEv2 ENCR_AES_GCM_16, key length 128).
    Aes128Gcm,
    /// AES-GCM, 256-bit key, 16-byte ICV (RFC 4106; IKEv2 ENCR_AES_GCM_16, key length 256).
    Aes256Gcm,
    /// ChaCha20-Poly1305 (RFC 7634; IKEv2 ENCR_CHACHA20_POLY1305).
    ChaCha20Poly1305,
}

impl Suite {
    /// All suites, for iteration in tests and benches.
    pub const ALL: [Suite; 3] = [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::ChaCha20Poly1305];

    /// Cipher key length in bytes (without the salt).
    pub const fn key_len(self) -> usize {
        match self {
            Suite::Aes128Gcm => 16,
            Suite::Aes256Gcm | Suite::ChaCha20Poly1305 => 32,
        }
    }

    /// Key material length in bytes as taken from IKEv2 KEYMAT: key followed by the salt.
    pub const fn keymat_len(self) -> usize {
        self.key_len() + SALT_LEN
    }

    /// IKEv2 encryption transform ID (IANA "Transform Type 1").
    pub const fn ikev2_transform_id(self) -> u16 {
        match self {
            Suite::Aes128Gcm | Suite::Aes256Gcm => 20,
            Suite::ChaCha20Poly1305 => 28,
        }
    }

    /// The suite for a negotiated IKEv2 encryption transform: ID and Key Length attribute in
    /// bits (`None` when absent, as for ChaCha20-Poly1305). Other transforms are not supported.
    pub const fn from_ikev2(transform_id: u16, key_bits: Option<u16>) -> Option<Suite> {
        match (transform_id, key_bits) {
            (20, Some(128)) => Some(Suite::Aes128Gcm),
            (20, Some(256)) => Some(Suite::Aes256Gcm),
            (28, None) => Some(Suite::ChaCha20Poly1305),
            _ => None,
        }
    }

    /// Name as in the Linux crypto API / `ip xfrm` (`aead <name> <key> 128`).
    pub const fn xfrm_name(self) -> &'static str {
        match self {
            Suite::Aes128Gcm | Suite::Aes256Gcm => "rfc4106(gcm(aes))",
            Suite::ChaCha20Poly1305 => "rfc7539esp(chacha20,poly1305)",
        }
    }

    pub(crate) fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

impl std::fmt::Display for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Suite::Aes128Gcm => "aes128gcm16",
            Suite::Aes256Gcm => "aes256gcm16",
            Suite::ChaCha20Poly1305 => "chacha20poly1305",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ikev2_mapping_roundtrips() {
        for s in Suite::ALL {
            let bits = match s {
                Suite::ChaCha20Poly1305 => None,
                _ => Some((s.key_len() * 8) as u16),
            };
            assert_eq!(Suite::from_ikev2(s.ikev2_transform_id(), bits), Some(s));
        }
        assert_eq!(Suite::from_ikev2(20, Some(192)), None);
        assert_eq!(Suite::from_ikev2(20, None), None);
        assert_eq!(Suite::from_ikev2(12, Some(128)), None); // AES-CBC
    }
}
