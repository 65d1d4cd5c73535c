//! Cryptographic pieces of IKEv2, all from aws-lc-rs: Diffie-Hellman (groups 31 and 19),
//! PRF and prf+ (RFC 7296 §2.13), the AEAD SK payload (RFC 5282, RFC 7634), NAT detection
//! hashes (§2.23) and stateless cookies (§2.6).

use aws_lc_rs::{aead, agreement, digest, hmac, rand};
use zeroize::Zeroizing;

use crate::wire::{self, DecodeError, GENERIC_LEN, HEADER_LEN, Header, Payload, payload_type};

/// Errors from the crypto layer. Deliberately coarse: a peer learns nothing from them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("key exchange failed: invalid peer public value")]
    KeyExchange,
    #[error("random number generator failed")]
    Random,
    #[error("encrypted payload failed to authenticate")]
    Integrity,
    #[error("encrypted payload too short")]
    Short,
    #[error("decrypted payloads malformed: {0}")]
    Inner(#[from] DecodeError),
}

/// Fills `buf` with random bytes.
pub fn random(buf: &mut [u8]) -> Result<(), CryptoError> {
    rand::fill(buf).map_err(|_| CryptoError::Random)
}

/// A random non-zero 64-bit SPI.
pub fn random_spi64() -> Result<u64, CryptoError> {
    loop {
        let mut b = [0u8; 8];
        random(&mut b)?;
        let v = u64::from_be_bytes(b);
        if v != 0 {
            return Ok(v);
        }
    }
}

/// A random 32-bit ESP SPI outside the reserved range 0..=255.
pub fn random_spi32() -> Result<u32, CryptoError> {
    loop {
        let mut b = [0u8; 4];
        random(&mut b)?;
        let v = u32::from_be_bytes(b);
        if v > 255 {
            return Ok(v);
        }
    }
}

/// Diffie-Hellman groups supported here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DhGroup {
    /// Group 31, Curve25519 (RFC 8031).
    X25519,
    /// Group 19, NIST P-256 (RFC 5903).
    P256,
}

impl DhGroup {
    pub fn id(self) -> u16 {
        match self {
            DhGroup::X25519 => wire::transform::DH_X25519,
            DhGroup::P256 => wire::transform::DH_P256,
        }
    }
    pub fn from_id(id: u16) -> Option<Self> {
        match id {
            wire::transform::DH_X25519 => Some(DhGroup::X25519),
            wire::transform::DH_P256 => Some(DhGroup::P256),
            _ => None,
        }
    }
    fn alg(self) -> &'static agreement::Algorithm {
        match self {
            DhGroup::X25519 => &agreement::X25519,
            DhGroup::P256 => &agreement::ECDH_P256,
        }
    }
    /// Length of the KE payload data for this group.
    pub fn public_len(self) -> usize {
        match self {
            DhGroup::X25519 => 32,
            DhGroup::P256 => 64,
        }
    }
}

/// Our half of a key exchange.
pub struct KeyShare {
    group: DhGroup,
    private: agreement::PrivateKey,
    public: Vec<u8>,
}

impl std::fmt::Debug for KeyShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyShare")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl KeyShare {
    pub fn generate(group: DhGroup) -> Result<Self, CryptoError> {
        let private =
            agreement::PrivateKey::generate(group.alg()).map_err(|_| CryptoError::Random)?;
        let public = private
            .compute_public_key()
            .map_err(|_| CryptoError::Random)?;
        let public = match group {
            // IKE carries the P-256 point as x || y, without the SEC1 0x04 prefix (RFC 5903 §7).
            DhGroup::P256 => public.as_ref().get(1..).unwrap_or_default().to_vec(),
            DhGroup::X25519 => public.as_ref().to_vec(),
        };
        Ok(KeyShare {
            group,
            private,
            public,
        })
    }
    pub fn group(&self) -> DhGroup {
        self.group
    }
    /// The KE payload data.
    pub fn public(&self) -> &[u8] {
        &self.public
    }
    /// g^ir from the peer's KE payload data.
    pub fn agree(&self, peer: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if peer.len() != self.group.public_len() {
            return Err(CryptoError::KeyExchange);
        }
        let mut sec1;
        let peer_bytes: &[u8] = match self.group {
            DhGroup::P256 => {
                sec1 = Vec::with_capacity(65);
                sec1.push(4);
                sec1.extend_from_slice(peer);
                &sec1
            }
            DhGroup::X25519 => peer,
        };
        let parsed = agreement::UnparsedPublicKey::new(self.group.alg(), peer_bytes);
        agreement::agree(&self.private, parsed, CryptoError::KeyExchange, |k| {
            Ok(Zeroizing::new(k.to_vec()))
        })
    }
}

/// Pseudo-random functions (transform type 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prf {
    HmacSha256,
    HmacSha384,
}

impl Prf {
    pub fn id(self) -> u16 {
        match self {
            Prf::HmacSha256 => wire::transform::PRF_HMAC_SHA2_256,
            Prf::HmacSha384 => wire::transform::PRF_HMAC_SHA2_384,
        }
    }
    pub fn from_id(id: u16) -> Option<Self> {
        match id {
            wire::transform::PRF_HMAC_SHA2_256 => Some(Prf::HmacSha256),
            wire::transform::PRF_HMAC_SHA2_384 => Some(Prf::HmacSha384),
            _ => None,
        }
    }
    fn alg(self) -> hmac::Algorithm {
        match self {
            Prf::HmacSha256 => hmac::HMAC_SHA256,
            Prf::HmacSha384 => hmac::HMAC_SHA384,
        }
    }
    /// Output length, also the length of SK_d, SK_pi and SK_pr.
    pub fn output_len(self) -> usize {
        match self {
            Prf::HmacSha256 => 32,
            Prf::HmacSha384 => 48,
        }
    }
    pub fn prf(self, key: &[u8], data: &[&[u8]]) -> Zeroizing<Vec<u8>> {
        let key = hmac::Key::new(self.alg(), key);
        let mut ctx = hmac::Context::with_key(&key);
        for d in data {
            ctx.update(d);
        }
        Zeroizing::new(ctx.sign().as_ref().to_vec())
    }
    /// prf+ (RFC 7296 §2.13): T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n).
    pub fn prf_plus(self, key: &[u8], seed: &[u8], len: usize) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(len));
        let mut t: Zeroizing<Vec<u8>> = Zeroizing::new(Vec::new());
        let mut n: u8 = 1;
        while out.len() < len {
            t = self.prf(key, &[&t, seed, &[n]]);
            out.extend_from_slice(&t);
            // prf+ is defined for at most 255 blocks; callers ask for far less.
            n = n.wrapping_add(1);
        }
        out.truncate(len);
        out
    }
}

/// AEAD ciphers for the SK payload (transform type 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encr {
    /// ENCR_AES_GCM_16 with a 256-bit key (RFC 5282).
    AesGcm256,
    /// ENCR_AES_GCM_16 with a 128-bit key.
    AesGcm128,
    /// ENCR_CHACHA20_POLY1305 (RFC 7634).
    ChaCha20Poly1305,
}

/// AEAD IV length in the SK payload.
pub const SK_IV_LEN: usize = 8;
/// AEAD ICV length in the SK payload.
pub const SK_ICV_LEN: usize = 16;
const SALT_LEN: usize = 4;

impl Encr {
    /// The transform for proposals (with its Key Length attribute where one applies).
    pub fn transform(self) -> wire::Transform {
        use wire::transform as t;
        match self {
            Encr::AesGcm256 => wire::Transform::with_key_len(t::ENCR, t::ENCR_AES_GCM_16, 256),
            Encr::AesGcm128 => wire::Transform::with_key_len(t::ENCR, t::ENCR_AES_GCM_16, 128),
            Encr::ChaCha20Poly1305 => wire::Transform::new(t::ENCR, t::ENCR_CHACHA20_POLY1305),
        }
    }
    pub fn from_transform(tr: &wire::Transform) -> Option<Self> {
        use wire::transform as t;
        match (tr.id, tr.key_len()) {
            (t::ENCR_AES_GCM_16, Some(256)) => Some(Encr::AesGcm256),
            (t::ENCR_AES_GCM_16, Some(128)) => Some(Encr::AesGcm128),
            (t::ENCR_CHACHA20_POLY1305, None) => Some(Encr::ChaCha20Poly1305),
            _ => None,
        }
    }
    fn alg(self) -> &'static aead::Algorithm {
        match self {
            Encr::AesGcm256 => &aead::AES_256_GCM,
            Encr::AesGcm128 => &aead::AES_128_GCM,
            Encr::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
    /// Key material length: cipher key and the 4-byte salt.
    pub fn keymat_len(self) -> usize {
        match self {
            Encr::AesGcm128 => 16 + SALT_LEN,
            Encr::AesGcm256 | Encr::ChaCha20Poly1305 => 32 + SALT_LEN,
        }
    }
    /// The ESP suite with the same algorithm, for CHILD SAs.
    pub fn esp_suite(self) -> dmvpn_esp::Suite {
        match self {
            Encr::AesGcm256 => dmvpn_esp::Suite::Aes256Gcm,
            Encr::AesGcm128 => dmvpn_esp::Suite::Aes128Gcm,
            Encr::ChaCha20Poly1305 => dmvpn_esp::Suite::ChaCha20Poly1305,
        }
    }
    pub fn from_esp_suite(s: dmvpn_esp::Suite) -> Self {
        match s {
            dmvpn_esp::Suite::Aes256Gcm => Encr::AesGcm256,
            dmvpn_esp::Suite::Aes128Gcm => Encr::AesGcm128,
            dmvpn_esp::Suite::ChaCha20Poly1305 => Encr::ChaCha20Poly1305,
        }
    }
}

/// One direction of SK payload protection: cipher, key and salt, and the IV counter.
pub struct SkCipher {
    encr: Encr,
    key: aead::LessSafeKey,
    salt: [u8; SALT_LEN],
    next_iv: u64,
}

impl std::fmt::Debug for SkCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SkCipher")
            .field("encr", &self.encr)
            .finish_non_exhaustive()
    }
}

impl SkCipher {
    /// `keymat` is SK_ei or SK_er: key followed by salt.
    pub fn new(encr: Encr, keymat: &[u8]) -> Result<Self, CryptoError> {
        let split = keymat
            .len()
            .checked_sub(SALT_LEN)
            .ok_or(CryptoError::KeyExchange)?;
        let (key, salt) = keymat.split_at(split);
        let salt: [u8; SALT_LEN] = salt.try_into().map_err(|_| CryptoError::KeyExchange)?;
        let key = aead::UnboundKey::new(encr.alg(), key).map_err(|_| CryptoError::KeyExchange)?;
        Ok(SkCipher {
            encr,
            key: aead::LessSafeKey::new(key),
            salt,
            next_iv: 0,
        })
    }

    fn nonce(&self, iv: &[u8; SK_IV_LEN]) -> aead::Nonce {
        let mut n = [0u8; 12];
        n[..SALT_LEN].copy_from_slice(&self.salt);
        n[SALT_LEN..].copy_from_slice(iv);
        aead::Nonce::assume_unique_for_key(n)
    }

    /// Builds a whole encrypted message: header, an SK payload holding `inner`, with the
    /// header's length and next-payload fields filled in.
    pub fn seal_message(&mut self, mut header: Header, inner: &[Payload]) -> Vec<u8> {
        let (first, mut plain) = wire::encode_chain(inner);
        plain.push(0); // Pad Length: AEAD needs no padding (RFC 5282 §3)
        self.seal_with_prefix(&mut header, payload_type::SK, first, &[], plain)
    }

    /// Builds one SKF fragment message (RFC 7383 §2.5): `chunk` is a slice of the plaintext
    /// payload chain; the first fragment names the first inner payload, the others 0.
    pub fn seal_fragment(
        &mut self,
        mut header: Header,
        first_inner: u8,
        number: u16,
        total: u16,
        chunk: &[u8],
    ) -> Vec<u8> {
        let mut plain = chunk.to_vec();
        plain.push(0);
        let np = if number == 1 { first_inner } else { 0 };
        let mut extra = [0u8; 4];
        extra[..2].copy_from_slice(&number.to_be_bytes());
        extra[2..].copy_from_slice(&total.to_be_bytes());
        self.seal_with_prefix(&mut header, payload_type::SKF, np, &extra, plain)
    }

    fn seal_with_prefix(
        &mut self,
        header: &mut Header,
        kind: u8,
        np: u8,
        extra: &[u8],
        mut plain: Vec<u8>,
    ) -> Vec<u8> {
        let payload_len = GENERIC_LEN + extra.len() + SK_IV_LEN + plain.len() + SK_ICV_LEN;
        header.next_payload = kind;
        header.length = u32::try_from(HEADER_LEN + payload_len).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
        header.encode(&mut out);
        out.push(np);
        out.push(0);
        out.extend_from_slice(&u16::try_from(payload_len).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(extra);
        let iv = self.next_iv.to_be_bytes();
        self.next_iv = self.next_iv.wrapping_add(1);
        let nonce = self.nonce(&iv);
        // Everything before the IV is authenticated (RFC 5282 §5.1).
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(&out[..]), &mut plain);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&plain);
        match tag {
            Ok(tag) => out.extend_from_slice(tag.as_ref()),
            // Sealing fails only for absurd lengths; an unauthenticatable message is dropped
            // by the peer, which is the right outcome.
            Err(_) => out.extend_from_slice(&[0; SK_ICV_LEN]),
        }
        out
    }

    /// Opens the encrypted body (IV, ciphertext, ICV) that ends `datagram`; everything
    /// before it is the AAD. Returns the plaintext with the padding removed.
    pub fn open(&self, datagram: &[u8], body: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let aad_len = datagram
            .len()
            .checked_sub(body.len())
            .ok_or(CryptoError::Short)?;
        let aad = datagram.get(..aad_len).ok_or(CryptoError::Short)?;
        if body.len() < SK_IV_LEN + SK_ICV_LEN + 1 {
            return Err(CryptoError::Short);
        }
        let (iv, ct) = body.split_at(SK_IV_LEN);
        let iv: &[u8; SK_IV_LEN] = iv.try_into().map_err(|_| CryptoError::Short)?;
        let mut buf = Zeroizing::new(ct.to_vec());
        let plain_len = self
            .key
            .open_in_place(self.nonce(iv), aead::Aad::from(aad), &mut buf)
            .map_err(|_| CryptoError::Integrity)?
            .len();
        buf.truncate(plain_len);
        let pad = usize::from(buf.last().copied().ok_or(CryptoError::Short)?);
        let keep = plain_len.checked_sub(1 + pad).ok_or(CryptoError::Short)?;
        buf.truncate(keep);
        Ok(buf)
    }
}

/// The IKE SA keys (RFC 7296 §2.14). SK_ai/SK_ar are empty with AEAD ciphers.
pub struct IkeKeys {
    pub prf: Prf,
    pub encr: Encr,
    pub sk_d: Zeroizing<Vec<u8>>,
    pub sk_pi: Zeroizing<Vec<u8>>,
    pub sk_pr: Zeroizing<Vec<u8>>,
    pub sk_ei: Zeroizing<Vec<u8>>,
    pub sk_er: Zeroizing<Vec<u8>>,
}

impl IkeKeys {
    /// Derives all IKE SA keys from a fresh exchange (IKE_SA_INIT).
    pub fn derive(
        prf: Prf,
        encr: Encr,
        shared: &[u8],
        ni: &[u8],
        nr: &[u8],
        spi_i: u64,
        spi_r: u64,
    ) -> IkeKeys {
        let nonces = [ni, nr].concat();
        let skeyseed = prf.prf(&nonces, &[shared]);
        Self::expand(prf, encr, &skeyseed, ni, nr, spi_i, spi_r)
    }

    /// Derives the keys of a rekeyed IKE SA (RFC 7296 §2.18): SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr).
    #[allow(clippy::too_many_arguments)]
    pub fn derive_rekey(
        old_prf: Prf,
        old_sk_d: &[u8],
        prf: Prf,
        encr: Encr,
        shared: &[u8],
        ni: &[u8],
        nr: &[u8],
        spi_i: u64,
        spi_r: u64,
    ) -> IkeKeys {
        let skeyseed = old_prf.prf(old_sk_d, &[shared, ni, nr]);
        Self::expand(prf, encr, &skeyseed, ni, nr, spi_i, spi_r)
    }

    fn expand(
        prf: Prf,
        encr: Encr,
        skeyseed: &[u8],
        ni: &[u8],
        nr: &[u8],
        spi_i: u64,
        spi_r: u64,
    ) -> IkeKeys {
        let seed = [ni, nr, &spi_i.to_be_bytes(), &spi_r.to_be_bytes()].concat();
        let p = prf.output_len();
        let e = encr.keymat_len();
        let km = prf.prf_plus(skeyseed, &seed, 3 * p + 2 * e);
        let part = |from: usize, len: usize| {
            Zeroizing::new(km.get(from..from + len).unwrap_or_default().to_vec())
        };
        IkeKeys {
            prf,
            encr,
            sk_d: part(0, p),
            sk_ei: part(p, e),
            sk_er: part(p + e, e),
            sk_pi: part(p + 2 * e, p),
            sk_pr: part(2 * p + 2 * e, p),
        }
    }
}

/// NAT detection hash (RFC 7296 §2.23): SHA-1(SPIi | SPIr | IP | port).
pub fn nat_hash(spi_i: u64, spi_r: u64, addr: std::net::SocketAddr) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(&spi_i.to_be_bytes());
    ctx.update(&spi_r.to_be_bytes());
    match addr.ip() {
        std::net::IpAddr::V4(a) => ctx.update(&a.octets()),
        std::net::IpAddr::V6(a) => ctx.update(&a.octets()),
    }
    ctx.update(&addr.port().to_be_bytes());
    ctx.finish().as_ref().to_vec()
}

/// Stateless cookie generator (RFC 7296 §2.6): cookie = version | HMAC(secret, Ni | IPi | SPIi).
pub struct CookieJar {
    version: u8,
    secret: hmac::Key,
    previous: Option<hmac::Key>,
}

impl CookieJar {
    pub fn new() -> Result<Self, CryptoError> {
        Ok(CookieJar {
            version: 0,
            secret: Self::fresh()?,
            previous: None,
        })
    }
    fn fresh() -> Result<hmac::Key, CryptoError> {
        let mut k = Zeroizing::new([0u8; 32]);
        random(&mut k[..])?;
        Ok(hmac::Key::new(hmac::HMAC_SHA256, &k[..]))
    }
    /// Replaces the secret; cookies made with the previous one stay valid until the next rotation.
    pub fn rotate(&mut self) -> Result<(), CryptoError> {
        let next = Self::fresh()?;
        self.previous = Some(std::mem::replace(&mut self.secret, next));
        self.version = self.version.wrapping_add(1);
        Ok(())
    }
    fn mac(key: &hmac::Key, version: u8, ni: &[u8], ip: std::net::IpAddr, spi_i: u64) -> Vec<u8> {
        let mut ctx = hmac::Context::with_key(key);
        ctx.update(ni);
        match ip {
            std::net::IpAddr::V4(a) => ctx.update(&a.octets()),
            std::net::IpAddr::V6(a) => ctx.update(&a.octets()),
        }
        ctx.update(&spi_i.to_be_bytes());
        let mut out = vec![version];
        out.extend_from_slice(ctx.sign().as_ref());
        out
    }
    pub fn make(&self, ni: &[u8], ip: std::net::IpAddr, spi_i: u64) -> Vec<u8> {
        Self::mac(&self.secret, self.version, ni, ip, spi_i)
    }
    pub fn check(&self, cookie: &[u8], ni: &[u8], ip: std::net::IpAddr, spi_i: u64) -> bool {
        let Some(&v) = cookie.first() else {
            return false;
        };
        let key = if v == self.version {
            &self.secret
        } else if v == self.version.wrapping_sub(1) {
            match &self.previous {
                Some(k) => k,
                None => return false,
            }
        } else {
            return false;
        };
        let want = Self::mac(key, v, ni, ip, spi_i);
        aws_lc_rs::constant_time::verify_slices_are_equal(&want, cookie).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dh_agrees_both_groups() {
        for g in [DhGroup::X25519, DhGroup::P256] {
            let a = KeyShare::generate(g).unwrap();
            let b = KeyShare::generate(g).unwrap();
            assert_eq!(a.public().len(), g.public_len());
            let s1 = a.agree(b.public()).unwrap();
            let s2 = b.agree(a.public()).unwrap();
            assert_eq!(*s1, *s2);
            assert!(a.agree(&b.public()[1..]).is_err());
        }
    }

    #[test]
    fn prf_plus_matches_definition() {
        let p = Prf::HmacSha256;
        let out = p.prf_plus(b"key", b"seed", 70);
        let t1 = p.prf(b"key", &[b"seed", &[1]]);
        let t2 = p.prf(b"key", &[&t1, b"seed", &[2]]);
        let t3 = p.prf(b"key", &[&t2, b"seed", &[3]]);
        assert_eq!(&out[..32], &t1[..]);
        assert_eq!(&out[32..64], &t2[..]);
        assert_eq!(&out[64..], &t3[..6]);
    }

    #[test]
    fn sk_seal_open_and_tamper() {
        for encr in [Encr::AesGcm256, Encr::AesGcm128, Encr::ChaCha20Poly1305] {
            let km = vec![9u8; encr.keymat_len()];
            let mut tx = SkCipher::new(encr, &km).unwrap();
            let rx = SkCipher::new(encr, &km).unwrap();
            let header = Header {
                spi_i: 1,
                spi_r: 2,
                next_payload: 0,
                version: wire::VERSION_2,
                exchange: wire::exchange::INFORMATIONAL,
                flags: 0,
                message_id: 5,
                length: 0,
            };
            let inner = vec![Payload::Nonce(vec![1, 2, 3])];
            let msg = tx.seal_message(header, &inner);
            let parsed = wire::Message::decode(&msg).unwrap();
            let Some(Payload::Sk { first_inner, body }) = parsed.payloads.last() else {
                panic!("no SK");
            };
            let plain = rx.open(&msg, body).unwrap();
            assert_eq!(wire::decode_chain(*first_inner, &plain).unwrap(), inner);
            let mut bad = msg.clone();
            bad[20] ^= 1; // message ID is authenticated
            let parsed = wire::Message::decode(&bad).unwrap();
            let Some(Payload::Sk { body, .. }) = parsed.payloads.last() else {
                panic!("no SK");
            };
            assert_eq!(rx.open(&bad, body), Err(CryptoError::Integrity));
        }
    }

    #[test]
    fn cookies_verify_and_rotate() {
        let mut jar = CookieJar::new().unwrap();
        let ip = "198.51.100.7".parse().unwrap();
        let c = jar.make(b"nonce", ip, 42);
        assert!(jar.check(&c, b"nonce", ip, 42));
        assert!(!jar.check(&c, b"nonce", ip, 43));
        jar.rotate().unwrap();
        assert!(jar.check(&c, b"nonce", ip, 42));
        jar.rotate().unwrap();
        assert!(!jar.check(&c, b"nonce", ip, 42));
    }
}
