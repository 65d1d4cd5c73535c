//! Certificates for IKE in standalone mode: a private ECDSA P-256 CA, and node
//! certificates whose identity is the node's tunnel address.
//!
//! A node certificate carries the tunnel address as an IP SAN (the agent uses it as its IKE
//! identity and peers check NHRP claims against it), a DNS SAN with the node name, the
//! extended key usages id-kp-ipsecIKE, serverAuth and clientAuth, and digitalSignature.
//! This module has no Kubernetes dependency so the operator can issue with the same code.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use x509_parser::extensions::{GeneralName, ParsedExtension};

/// id-kp-ipsecIKE (RFC 4945 §5.1.3.12).
pub const EKU_IPSEC_IKE: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 17];
/// Default CA validity.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default node certificate validity.
pub const DEFAULT_NODE_DAYS: u32 = 365;
/// File names inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

/// Why a certificate could not be made or read. Messages name the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn file_err(path: &Path, message: impl Into<String>) -> PkiError {
    PkiError::File {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams, now: SystemTime, days: u32) -> Result<(), PkiError> {
    if days == 0 {
        return Err(PkiError::Invalid("validity must be at least 1 day".into()));
    }
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| PkiError::Invalid("the system clock is before 1970".into()))?
        .as_secs();
    // Backdated an hour: peers with a slightly slow clock accept it at once.
    let start = secs.saturating_sub(3600);
    let end = secs.saturating_add(u64::from(days) * 86_400);
    let t = |s: u64| {
        time::OffsetDateTime::from_unix_timestamp(i64::try_from(s).unwrap_or(i64::MAX))
            .map_err(|e| PkiError::Invalid(format!("validity out of range: {e}")))
    };
    params.not_before = t(start)?;
    params.not_after = t(end)?;
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial)
        .map_err(|_| PkiError::Invalid("random number generator failed".into()))?;
    // Positive and non-zero (RFC 5280 §4.1.2.2).
    serial[0] = (serial[0] & 0x7F) | 0x01;
    params.serial_number = Some(SerialNumber::from(serial.to_vec()));
    Ok(())
}

/// A new self-signed ECDSA P-256 CA that may sign node certificates only (path length 0).
pub fn generate_ca(common_name: &str, now: SystemTime, days: u32) -> Result<Issued, PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "kube-dmvpn");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, now, days)?;
    let cert = params.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a node certificate with a fresh P-256 key: CN and DNS SAN `name`, IP SAN
/// `tunnel_address`, EKU ipsecIKE + serverAuth + clientAuth.
pub fn issue(
    ca: &Issued,
    name: &str,
    tunnel_address: IpAddr,
    now: SystemTime,
    days: u32,
) -> Result<Issued, PkiError> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(PkiError::Invalid(format!(
            "node name {name:?} must be 1 to 63 characters of letters, digits, '-' and '.'"
        )));
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "kube-dmvpn");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![
        SanType::IpAddress(tunnel_address),
        SanType::DnsName(name.try_into()?),
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::Other(EKU_IPSEC_IKE.to_vec()),
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, now, days)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The DER bodies of every CERTIFICATE block in a PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<Vec<u8>>, PkiError> {
    let mut out = Vec::new();
    for p in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let p = p.map_err(|e| PkiError::Invalid(format!("bad PEM: {e}")))?;
        if p.label == "CERTIFICATE" {
            out.push(p.contents);
        }
    }
    if out.is_empty() {
        return Err(PkiError::Invalid(
            "no CERTIFICATE block in the PEM text".into(),
        ));
    }
    Ok(out)
}

/// A PEM private key (PKCS#8, as written by [`issue`]) as PKCS#8 DER.
pub fn key_pkcs8_from_pem(pem: &str) -> Result<Vec<u8>, PkiError> {
    Ok(KeyPair::from_pem(pem)?.serialize_der())
}

/// The IP SANs of a DER certificate, in order.
pub fn san_ips(der: &[u8]) -> Result<Vec<IpAddr>, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::Invalid(format!("not an X.509 certificate: {e}")))?;
    let mut ips = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for n in &san.general_names {
                if let GeneralName::IPAddress(b) = n {
                    match b.len() {
                        4 => {
                            let a: [u8; 4] = b.first_chunk().copied().unwrap_or_default();
                            ips.push(IpAddr::from(a));
                        }
                        16 => {
                            let a: [u8; 16] = b.first_chunk().copied().unwrap_or_default();
                            ips.push(IpAddr::from(a));
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    Ok(ips)
}

/// Reads a text file, naming it in the error.
pub fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|e| file_err(path, format!("cannot read: {e}")))
}

/// Writes a file that must not exist yet (unless `force`); keys get mode 0600.
pub fn write_new(path: &Path, text: &str, secret: bool, force: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).mode(if secret { 0o600 } else { 0o644 });
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let mut f = o.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            file_err(path, "exists already; remove it or pass --force")
        } else {
            file_err(path, format!("cannot create: {e}"))
        }
    })?;
    f.write_all(text.as_bytes())
        .map_err(|e| file_err(path, format!("cannot write: {e}")))
}

/// `dmvpn-agent cert ca`: writes `ca.pem` and `ca.key` into `dir` (created if needed).
pub fn cmd_ca(dir: &Path, name: &str, days: u32, force: bool) -> Result<String, PkiError> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, format!("cannot create: {e}")))?;
    let ca = generate_ca(name, SystemTime::now(), days)?;
    let cert = dir.join(CA_CERT_FILE);
    let key = dir.join(CA_KEY_FILE);
    write_new(&key, &ca.key_pem, true, force)?;
    write_new(&cert, &ca.cert_pem, false, force)?;
    Ok(format!(
        "CA certificate {}\nCA key         {} (keep it secret; needed only to issue)\n",
        cert.display(),
        key.display()
    ))
}

/// `dmvpn-agent cert issue`: reads the CA from `ca_dir`, writes `<name>.pem`,
/// `<name>.key` and a copy of `ca.pem` into `out`.
pub fn cmd_issue(
    ca_dir: &Path,
    name: &str,
    tunnel_address: IpAddr,
    out: &Path,
    days: u32,
    force: bool,
) -> Result<String, PkiError> {
    let ca = Issued {
        cert_pem: read(&ca_dir.join(CA_CERT_FILE))?,
        key_pem: read(&ca_dir.join(CA_KEY_FILE))?,
    };
    let node = issue(&ca, name, tunnel_address, SystemTime::now(), days)?;
    std::fs::create_dir_all(out).map_err(|e| file_err(out, format!("cannot create: {e}")))?;
    let cert = out.join(format!("{name}.pem"));
    let key = out.join(format!("{name}.key"));
    let ca_copy = out.join(CA_CERT_FILE);
    write_new(&key, &node.key_pem, true, force)?;
    write_new(&cert, &node.cert_pem, false, force)?;
    if ca_copy != ca_dir.join(CA_CERT_FILE) {
        write_new(&ca_copy, &ca.cert_pem, false, true)?;
    }
    Ok(format!(
        "[ipsec]\nauth = \"certificate\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        ca_copy.display(),
        cert.display(),
        key.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificate_names_the_tunnel_address_and_chains_to_the_ca() {
        let now = SystemTime::now();
        let ca = generate_ca("test CA", now, 30).unwrap();
        let node = issue(&ca, "spoke1", "10.42.0.2".parse().unwrap(), now, 10).unwrap();
        let der = certs_from_pem(&node.cert_pem).unwrap().remove(0);
        assert_eq!(
            san_ips(&der).unwrap(),
            vec!["10.42.0.2".parse::<IpAddr>().unwrap()]
        );
        let ca_der = certs_from_pem(&ca.cert_pem).unwrap().remove(0);
        // Chain, validity and the IKE usage, checked by the verifier IKE uses.
        let ee_der = rustls_pki_types::CertificateDer::from(der.as_slice());
        let ee = webpki::EndEntityCert::try_from(&ee_der).unwrap();
        let ca_der = rustls_pki_types::CertificateDer::from(ca_der.as_slice());
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).unwrap();
        let ike_eku: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x11];
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::required(ike_eku),
            None,
            None,
        )
        .unwrap();
        let ip =
            rustls_pki_types::ServerName::IpAddress("10.42.0.2".parse::<IpAddr>().unwrap().into());
        assert!(ee.verify_is_valid_for_subject_name(&ip).is_ok());
        let other =
            rustls_pki_types::ServerName::IpAddress("10.42.0.3".parse::<IpAddr>().unwrap().into());
        assert!(ee.verify_is_valid_for_subject_name(&other).is_err());
        // The key loads as PKCS#8 for IKE.
        assert!(!key_pkcs8_from_pem(&node.key_pem).unwrap().is_empty());
    }

    #[test]
    fn bad_names_and_existing_files_are_refused() {
        let now = SystemTime::now();
        let ca = generate_ca("test CA", now, 30).unwrap();
        assert!(issue(&ca, "a b", "10.42.0.2".parse().unwrap(), now, 10).is_err());
        assert!(issue(&ca, "", "10.42.0.2".parse().unwrap(), now, 10).is_err());
        let dir = tempfile::tempdir().unwrap();
        cmd_ca(dir.path(), "ca", 30, false).unwrap();
        let e = cmd_ca(dir.path(), "ca", 30, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        let out = dir.path().join("spoke1");
        let snippet = cmd_issue(
            dir.path(),
            "spoke1",
            "10.42.0.2".parse().unwrap(),
            &out,
            10,
            false,
        )
        .unwrap();
        assert!(snippet.contains("auth = \"certificate\""));
        let key_mode = std::fs::metadata(out.join("spoke1.key"))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap();
        assert_eq!(key_mode, 0o600);
        assert!(out.join(CA_CERT_FILE).exists());
    }
}
