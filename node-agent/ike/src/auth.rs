//! IKE_AUTH authentication: pre-shared keys (RFC 7296 §2.15) and digital signatures with
//! X.509 certificates (RFC 7427, ECDSA P-256/SHA-256 and Ed25519) verified against a CA.

use std::net::IpAddr;

use aws_lc_rs::signature::{self, KeyPair};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use zeroize::Zeroizing;

use crate::crypto::Prf;
use crate::wire::{Id, id_type};

/// DER AlgorithmIdentifier of ecdsa-with-SHA256 (RFC 7427 Appendix A.4.1).
const ALG_ECDSA_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];
/// DER AlgorithmIdentifier of Ed25519 (RFC 8420).
const ALG_ED25519: &[u8] = &[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
/// id-kp-ipsecIKE (RFC 4945 §5.1.3.12), DER contents of the OID.
const EKU_IPSEC_IKE: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x11];

/// Hash algorithms we announce in SIGNATURE_HASH_ALGORITHMS (RFC 7427 §4): SHA2-256 and
/// "Identity" (RFC 8420, needed for Ed25519).
pub const SIGNATURE_HASHES: &[u16] = &[2, 5];

/// Identities as carried in ID payloads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Ip(IpAddr),
    Fqdn(String),
    /// Any other ID type, kept raw.
    Other {
        id_type: u8,
        data: Vec<u8>,
    },
}

impl Identity {
    pub fn to_id(&self) -> Id {
        match self {
            Identity::Ip(IpAddr::V4(a)) => Id {
                id_type: id_type::IPV4_ADDR,
                data: a.octets().to_vec(),
            },
            Identity::Ip(IpAddr::V6(a)) => Id {
                id_type: id_type::IPV6_ADDR,
                data: a.octets().to_vec(),
            },
            Identity::Fqdn(s) => Id {
                id_type: id_type::FQDN,
                data: s.as_bytes().to_vec(),
            },
            Identity::Other { id_type, data } => Id {
                id_type: *id_type,
                data: data.clone(),
            },
        }
    }
    pub fn from_id(id: &Id) -> Identity {
        match (id.id_type, id.data.len()) {
            (id_type::IPV4_ADDR, 4) => {
                let a: [u8; 4] = id.data.first_chunk().copied().unwrap_or_default();
                Identity::Ip(IpAddr::from(a))
            }
            (id_type::IPV6_ADDR, 16) => {
                let a: [u8; 16] = id.data.first_chunk().copied().unwrap_or_default();
                Identity::Ip(IpAddr::from(a))
            }
            (id_type::FQDN, _) => match std::str::from_utf8(&id.data) {
                Ok(s) => Identity::Fqdn(s.to_owned()),
                Err(_) => Identity::Other {
                    id_type: id.id_type,
                    data: id.data.clone(),
                },
            },
            _ => Identity::Other {
                id_type: id.id_type,
                data: id.data.clone(),
            },
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Ip(a) => write!(f, "{a}"),
            Identity::Fqdn(s) => write!(f, "{s}"),
            Identity::Other { id_type, data } => {
                write!(f, "id-type-{id_type}:{} bytes", data.len())
            }
        }
    }
}

/// A private key for signature authentication.
pub enum SigningKey {
    EcdsaP256(signature::EcdsaKeyPair),
    Ed25519(signature::Ed25519KeyPair),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SigningKey::EcdsaP256(_) => "SigningKey::EcdsaP256",
            SigningKey::Ed25519(_) => "SigningKey::Ed25519",
        })
    }
}

/// Why a key or certificate in the configuration is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "private key is neither a PKCS#8 ECDSA P-256 nor an Ed25519 key: convert it to PKCS#8 DER"
    )]
    Key,
    #[error("certificate does not parse as X.509 DER: {0}")]
    Certificate(String),
    #[error("CA certificate does not parse as a trust anchor: {0}")]
    Ca(String),
    #[error("the pre-shared key is empty: configure a secret of at least 16 bytes")]
    EmptyPsk,
}

impl SigningKey {
    /// Loads a PKCS#8 DER key (as rcgen and `openssl pkcs8 -topk8` write them).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, CredentialError> {
        if let Ok(k) =
            signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, der)
        {
            return Ok(SigningKey::EcdsaP256(k));
        }
        signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(SigningKey::Ed25519)
            .map_err(|_| CredentialError::Key)
    }

    /// The public key (SEC1 point or raw Ed25519), for matching against a certificate.
    pub fn public_key(&self) -> Vec<u8> {
        match self {
            SigningKey::EcdsaP256(k) => k.public_key().as_ref().to_vec(),
            SigningKey::Ed25519(k) => k.public_key().as_ref().to_vec(),
        }
    }

    /// AUTH payload data for method 14: AlgorithmIdentifier length, AlgorithmIdentifier, signature.
    pub fn sign(&self, octets: &[u8]) -> Option<Vec<u8>> {
        let (alg, sig) = match self {
            SigningKey::EcdsaP256(k) => {
                let rng = aws_lc_rs::rand::SystemRandom::new();
                (
                    ALG_ECDSA_SHA256,
                    k.sign(&rng, octets).ok()?.as_ref().to_vec(),
                )
            }
            SigningKey::Ed25519(k) => (ALG_ED25519, k.sign(octets).as_ref().to_vec()),
        };
        let mut out = Vec::with_capacity(1 + alg.len() + sig.len());
        out.push(u8::try_from(alg.len()).ok()?);
        out.extend_from_slice(alg);
        out.extend_from_slice(&sig);
        Some(out)
    }
}

/// The signed octets (RFC 7296 §2.15): the sender's first message, the peer's nonce and
/// prf(SK_p, ID payload body).
pub fn signed_octets(
    prf: Prf,
    sk_p: &[u8],
    first_msg: &[u8],
    peer_nonce: &[u8],
    id: &Id,
) -> Vec<u8> {
    let mut id_body = vec![id.id_type, 0, 0, 0];
    id_body.extend_from_slice(&id.data);
    let maced = prf.prf(sk_p, &[&id_body]);
    [first_msg, peer_nonce, &maced].concat()
}

/// AUTH data for a pre-shared key: prf(prf(secret, "Key Pad for IKEv2"), octets).
pub fn psk_auth(prf: Prf, psk: &[u8], octets: &[u8]) -> Zeroizing<Vec<u8>> {
    let pad = prf.prf(psk, &[b"Key Pad for IKEv2"]);
    prf.prf(&pad, &[octets])
}

/// Why the peer's AUTH was rejected (logged; the peer only sees AUTHENTICATION_FAILED).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("AUTH payload does not match the pre-shared key")]
    PskMismatch,
    #[error("peer used AUTH method {0}, expected {1}")]
    Method(u8, u8),
    #[error("peer sent no certificate")]
    NoCertificate,
    #[error("peer certificate is not valid under the configured CA: {0}")]
    Chain(String),
    #[error("peer certificate does not cover its ID {0}")]
    IdMismatch(String),
    #[error("signature algorithm in AUTH is not supported (ECDSA P-256/SHA-256 or Ed25519 only)")]
    Algorithm,
    #[error("signature in AUTH does not verify")]
    Signature,
}

/// Verifies a peer's method-14 AUTH against its end-entity certificate, after checking the
/// certificate chains to one of `cas` and names the peer's `id`.
pub fn verify_signature_auth(
    cas: &[Vec<u8>],
    cert: &[u8],
    intermediates: &[Vec<u8>],
    id: &Identity,
    auth: &[u8],
    octets: &[u8],
    now: UnixTime,
) -> Result<(), AuthError> {
    let cert_der = CertificateDer::from(cert);
    let ee =
        webpki::EndEntityCert::try_from(&cert_der).map_err(|e| AuthError::Chain(e.to_string()))?;
    let ca_ders: Vec<CertificateDer<'_>> = cas
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let mut anchors = Vec::new();
    for c in &ca_ders {
        anchors.push(
            webpki::anchor_from_trusted_cert(c).map_err(|e| AuthError::Chain(e.to_string()))?,
        );
    }
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &inter,
        now,
        webpki::KeyUsage::required_if_present(EKU_IPSEC_IKE),
        None,
        None,
    )
    .map_err(|e| AuthError::Chain(e.to_string()))?;
    let name = match id {
        Identity::Ip(a) => ServerName::IpAddress((*a).into()),
        Identity::Fqdn(s) => ServerName::try_from(s.as_str())
            .map_err(|_| AuthError::IdMismatch(s.clone()))?
            .to_owned(),
        Identity::Other { .. } => return Err(AuthError::IdMismatch(id.to_string())),
    };
    ee.verify_is_valid_for_subject_name(&name)
        .map_err(|_| AuthError::IdMismatch(id.to_string()))?;
    let (&alg_len, rest) = auth.split_first().ok_or(AuthError::Algorithm)?;
    let (alg, sig) = rest
        .split_at_checked(usize::from(alg_len))
        .ok_or(AuthError::Algorithm)?;
    let verifier: &dyn rustls_pki_types::SignatureVerificationAlgorithm = if alg == ALG_ECDSA_SHA256
    {
        webpki::aws_lc_rs::ECDSA_P256_SHA256
    } else if alg == ALG_ED25519 {
        webpki::aws_lc_rs::ED25519
    } else {
        return Err(AuthError::Algorithm);
    };
    ee.verify_signature(verifier, octets, sig)
        .map_err(|_| AuthError::Signature)
}

/// CERTREQ data for a CA: SHA-1 of its SubjectPublicKeyInfo (RFC 7296 §3.7).
pub fn ca_key_id(ca_der: &[u8]) -> Option<Vec<u8>> {
    let der = CertificateDer::from(ca_der);
    let anchor = webpki::anchor_from_trusted_cert(&der).ok()?;
    let contents: &[u8] = anchor.subject_public_key_info.as_ref();
    // webpki keeps the SEQUENCE contents; the hash covers the whole DER element.
    let mut spki = vec![0x30];
    let len = contents.len();
    if len < 0x80 {
        spki.push(u8::try_from(len).ok()?);
    } else if len < 0x100 {
        spki.extend_from_slice(&[0x81, u8::try_from(len).ok()?]);
    } else {
        spki.push(0x82);
        spki.extend_from_slice(&u16::try_from(len).ok()?.to_be_bytes());
    }
    spki.extend_from_slice(contents);
    Some(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &spki)
            .as_ref()
            .to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trip() {
        for id in [
            Identity::Ip("198.51.100.1".parse().unwrap()),
            Identity::Ip("2001:db8::1".parse().unwrap()),
            Identity::Fqdn("hub.example".into()),
            Identity::Other {
                id_type: 11,
                data: vec![1, 2],
            },
        ] {
            assert_eq!(Identity::from_id(&id.to_id()), id);
        }
    }

    #[test]
    fn psk_auth_depends_on_key_and_octets() {
        let a = psk_auth(Prf::HmacSha256, b"secret", b"octets");
        assert_ne!(a, psk_auth(Prf::HmacSha256, b"secreT", b"octets"));
        assert_ne!(a, psk_auth(Prf::HmacSha256, b"secret", b"octetS"));
        assert_eq!(a.len(), 32);
    }
}
