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
