//! Certificate issuance for DMVPN identities: an ECDSA P-256 CA and leaf certificates whose
//! identity carries the tunnel address.
//!
//! One implementation for the operator (site certificate secrets) and the agent's standalone
//! `dmvpn-agent cert` commands and IKE credential loading; it has no Kubernetes dependency.
//! Nothing here reads the clock or touches files: every function takes `now` and PEM text.
//!
//! A leaf certificate carries:
//! - subject CN = the object name;
//! - SAN IP = the tunnel address (the IKE identity peers check);
//! - SAN URI = `dmvpn://<kind>/<name>` and SAN DNS `<name>.<kind>.dmvpn` (the Kubernetes object
//!   or standalone node it belongs to; `<kind>` is `hub` or `spoke`);
//! - EKU id-kp-ipsecIKE (1.3.6.1.5.5.7.3.17), serverAuth and clientAuth.
//!
//! Rotation: a certificate is renewed once 2/3 of its lifetime has passed. The old one stays valid
//! until it expires (the remaining third is the overlap in which both are accepted, since both
//! chain to the same CA).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

/// id-kp-ipsecIKE (RFC 4945).
pub const EKU_IPSEC_IKE: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 17];
const EKU_IPSEC_IKE_DOTTED: &str = "1.3.6.1.5.5.7.3.17";

/// Certificates start up to this long before `now` (at most a tenth of their lifetime), to
/// tolerate clock skew between nodes.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// The shortest lifetime a certificate may have (times have second precision).
pub const MIN_LIFETIME: Duration = Duration::from_secs(3);

fn backdate(lifetime: Duration) -> Duration {
    Duration::from_secs((lifetime / 10).min(BACKDATE).as_secs())
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the PEM data is not a valid certificate: {0}")]
    Parse(String),
    #[error("the certificate was not signed by any CA in the bundle")]
    UntrustedIssuer,
    #[error("the certificate is not valid at this time (valid {not_before:?} .. {not_after:?})")]
    Expired {
        not_before: SystemTime,
        not_after: SystemTime,
    },
    #[error("the system random number generator failed")]
    Random,
    #[error("time {0:?} is out of the range a certificate can carry")]
    Time(SystemTime),
    #[error("certificate lifetime must be at least {min:?}, got {got:?}")]
    Lifetime { min: Duration, got: Duration },
    #[error(
        "name {name:?} cannot be used in a certificate: {why}; use DNS labels of 1 to 63 \
         letters, digits and '-', separated by '.'"
    )]
    Name { name: String, why: &'static str },
}

/// The longest DNS name (RFC 1035), here `<name>[.<namespace>].<kind>.dmvpn`.
const MAX_DNS_NAME: usize = 253;

/// Checks that the identity makes a valid DNS SAN (which also makes `name` a safe file name
/// for the CLI: no '/', no leading '.').
fn check_names(id: &Identity) -> Result<(), PkiError> {
    let err = |why| {
        Err(PkiError::Name {
            name: match &id.namespace {
                Some(ns) => format!("{ns}/{}", id.name),
                None => id.name.clone(),
            },
            why,
        })
    };
    if id.name.is_empty() {
        return err("it is empty");
    }
    let dns = id.dns_name();
    if dns.len() > MAX_DNS_NAME {
        return err("it is too long for a DNS name (253 characters with the .<kind>.dmvpn suffix)");
    }
    for label in dns.split('.') {
        if label.is_empty() {
            return err("it has an empty label (leading, trailing or doubled '.')");
        }
        if label.len() > 63 {
            return err("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return err("it contains a character other than letters, digits, '-' and '.'");
        }
    }
    Ok(())
}

/// Which kind of object an identity belongs to (used in the URI and DNS SAN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    Hub,
    Spoke,
}

impl IdentityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hub => "hub",
            Self::Spoke => "spoke",
        }
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IdentityKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hub" => Ok(Self::Hub),
            "spoke" => Ok(Self::Spoke),
            _ => Err(format!("unknown kind {s:?}: use \"hub\" or \"spoke\"")),
        }
    }
}

/// What a leaf certificate is for. `name` and `namespace` must be DNS labels separated by '.'
/// (Kubernetes object names are); [`CertificateAuthority::issue`] refuses others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub kind: IdentityKind,
    /// None for cluster-scoped objects (DmvpnHub and DmvpnSpoke are).
    pub namespace: Option<String>,
    pub name: String,
    pub tunnel_address: IpAddr,
}

impl Identity {
    /// `dmvpn://<kind>/<name>`, or `dmvpn://<kind>/<namespace>/<name>` for namespaced objects.
    pub fn uri(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("dmvpn://{}/{ns}/{}", self.kind.as_str(), self.name),
            None => format!("dmvpn://{}/{}", self.kind.as_str(), self.name),
        }
    }

    /// `<name>.<kind>.dmvpn`, or `<name>.<namespace>.<kind>.dmvpn` for namespaced objects.
    pub fn dns_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}.{ns}.{}.dmvpn", self.name, self.kind.as_str()),
            None => format!("{}.{}.dmvpn", self.name, self.kind.as_str()),
        }
    }
}

/// A PEM certificate and its PEM PKCS#8 private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// What the operator needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub serial: String,
    pub subject_cn: Option<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub ip_addresses: Vec<IpAddr>,
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    pub ipsec_ike_eku: bool,
    pub is_ca: bool,
}

impl CertInfo {
    /// When the certificate should be replaced: after 2/3 of its lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life * 2 / 3
    }

    pub fn needs_renewal(&self, now: SystemTime) -> bool {
        now >= self.renew_at()
    }

    pub fn valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

fn to_offset(t: SystemTime) -> Result<time::OffsetDateTime, PkiError> {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).map_err(|_| PkiError::Time(t))?,
        Err(e) => -i64::try_from(e.duration().as_secs()).map_err(|_| PkiError::Time(t))?,
    };
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|_| PkiError::Time(t))
}

fn from_timestamp(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Certificate times have second precision: round down so the stored value matches.
fn whole_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| PkiError::Random)?;
    // Positive and non-zero leading byte, as RFC 5280 asks.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// An ECDSA P-256 certificate authority.
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    info: CertInfo,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA valid for `lifetime` from slightly before `now`.
    pub fn generate(
        common_name: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Self, PkiError> {
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
        if lifetime < MIN_LIFETIME {
            return Err(PkiError::Lifetime {
                min: MIN_LIFETIME,
                got: lifetime,
            });
        }
        let start = whole_seconds(now) - backdate(lifetime);
        params.not_before = to_offset(start)?;
        params.not_after = to_offset(start + lifetime)?;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// Loads a CA from its PEM certificate and PEM private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let info = inspect(cert_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
            info,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    fn leaf_params(
        &self,
        id: &Identity,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<CertificateParams, PkiError> {
        if lifetime < MIN_LIFETIME {
            return Err(PkiError::Lifetime {
                min: MIN_LIFETIME,
                got: lifetime,
            });
        }
        check_names(id)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id.name.as_str());
        dn.push(DnType::OrganizationName, "kube-dmvpn");
        dn.push(DnType::OrganizationalUnitName, id.kind.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::IpAddress(id.tunnel_address),
            SanType::URI(id.uri().try_into()?),
            SanType::DnsName(id.dns_name().try_into()?),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::Other(EKU_IPSEC_IKE.to_vec()),
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        // The lifetime counts from the backdated start, so rotation at 2/3 is exact.
        let start = whole_seconds(now) - backdate(lifetime);
        params.not_before = to_offset(start)?;
        params.not_after = to_offset(start + lifetime)?;
        params.serial_number = Some(random_serial()?);
        Ok(params)
    }

    /// Issues a certificate and a fresh P-256 key for `id`.
    pub fn issue(
        &self,
        id: &Identity,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = self.leaf_params(id, now, lifetime)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let cert_pem = cert.pem();
        let info = inspect(&cert_pem)?;
        Ok(IssuedCert {
            cert_pem,
            key_pem: key.serialize_pem(),
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// Signs a PEM CSR (the key stays with the requester). The identity comes from `id`, not
    /// from the CSR: only the public key is taken from it.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &Identity,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let params = self.leaf_params(id, now, lifetime)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.pem())
    }
}

/// The DER bodies of every CERTIFICATE block of a PEM text, in order (at least one).
pub fn certs_from_pem(pem: &str) -> Result<Vec<Vec<u8>>, PkiError> {
    let mut out = Vec::new();
    for item in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let item = item.map_err(|e| PkiError::Parse(e.to_string()))?;
        if item.label == "CERTIFICATE" {
            out.push(item.contents);
        }
    }
    if out.is_empty() {
        return Err(PkiError::Parse("no CERTIFICATE block found".to_owned()));
    }
    Ok(out)
}

fn info_of(cert: &X509Certificate<'_>) -> CertInfo {
    let mut info = CertInfo {
        serial: cert.raw_serial_as_string(),
        subject_cn: cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        not_before: from_timestamp(cert.validity().not_before.timestamp()),
        not_after: from_timestamp(cert.validity().not_after.timestamp()),
        ip_addresses: Vec::new(),
        uris: Vec::new(),
        dns_names: Vec::new(),
        ipsec_ike_eku: false,
        is_ca: cert.is_ca(),
    };
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::IPAddress(b) => {
                            if let Ok(a) = <[u8; 4]>::try_from(*b) {
                                info.ip_addresses.push(IpAddr::from(a));
                            } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                                info.ip_addresses.push(IpAddr::from(a));
                            }
                        }
                        GeneralName::URI(u) => info.uris.push((*u).to_owned()),
                        GeneralName::DNSName(d) => info.dns_names.push((*d).to_owned()),
                        _ => {}
                    }
                }
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                info.ipsec_ike_eku = eku
                    .other
                    .iter()
                    .any(|oid| oid.to_id_string() == EKU_IPSEC_IKE_DOTTED);
            }
            _ => {}
        }
    }
    info
}

/// Reads the first certificate of a PEM bundle.
pub fn inspect(cert_pem: &str) -> Result<CertInfo, PkiError> {
    let ders = certs_from_pem(cert_pem)?;
    let der = ders
        .first()
        .ok_or_else(|| PkiError::Parse("empty bundle".to_owned()))?;
    inspect_der(der)
}

/// Reads one DER certificate.
pub fn inspect_der(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    Ok(info_of(&cert))
}

/// A PEM private key (PKCS#8, as [`CertificateAuthority::issue`] writes it) as PKCS#8 DER, the
/// form IKE signs with.
pub fn key_pkcs8_from_pem(key_pem: &str) -> Result<Vec<u8>, PkiError> {
    Ok(KeyPair::from_pem(key_pem)?.serialize_der())
}

/// Reads every certificate of a PEM bundle.
pub fn inspect_bundle(pem: &str) -> Result<Vec<CertInfo>, PkiError> {
    certs_from_pem(pem)?
        .iter()
        .map(|der| {
            X509Certificate::from_der(der)
                .map(|(_, c)| info_of(&c))
                .map_err(|e| PkiError::Parse(e.to_string()))
        })
        .collect()
}

/// Checks that `cert_pem` was signed by one of the CAs in `ca_bundle_pem` and that both are
/// valid at `now`. This is what a peer does with a certificate during the rotation overlap.
pub fn verify(cert_pem: &str, ca_bundle_pem: &str, now: SystemTime) -> Result<CertInfo, PkiError> {
    let ders = certs_from_pem(cert_pem)?;
    let der = ders
        .first()
        .ok_or_else(|| PkiError::Parse("empty bundle".to_owned()))?;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let info = info_of(&cert);
    if !info.valid_at(now) {
        return Err(PkiError::Expired {
            not_before: info.not_before,
            not_after: info.not_after,
        });
    }
    for ca_der in certs_from_pem(ca_bundle_pem)? {
        let Ok((_, ca)) = X509Certificate::from_der(&ca_der) else {
            continue;
        };
        if info_of(&ca).valid_at(now) && cert.verify_signature(Some(ca.public_key())).is_ok() {
            return Ok(info);
        }
    }
    Err(PkiError::UntrustedIssuer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(addr: &str) -> Identity {
        Identity {
            kind: IdentityKind::Spoke,
            namespace: Some("edge".to_owned()),
            name: "site-a".to_owned(),
            tunnel_address: addr.parse().unwrap(),
        }
    }

    #[test]
    fn issues_leaf_with_tunnel_identity() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate("dmvpn-ca", now, Duration::from_secs(86400 * 365))
            .unwrap();
        assert!(ca.info().is_ca);
        let leaf = ca
            .issue(&id("10.42.0.7"), now, Duration::from_secs(3600))
            .unwrap();
        let info = verify(&leaf.cert_pem, ca.cert_pem(), now).unwrap();
        assert_eq!(
            info.ip_addresses,
            vec!["10.42.0.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(info.uris, vec!["dmvpn://spoke/edge/site-a".to_owned()]);
        assert_eq!(info.dns_names, vec!["site-a.edge.spoke.dmvpn".to_owned()]);
        assert!(info.ipsec_ike_eku);
        assert!(!info.is_ca);
        assert_eq!(info.subject_cn.as_deref(), Some("site-a"));
        assert_eq!(
            info.not_after.duration_since(info.not_before).unwrap(),
            Duration::from_secs(3600)
        );
        // The key parses and belongs with the certificate.
        KeyPair::from_pem(&leaf.key_pem).unwrap();
    }

    #[test]
    fn renewal_at_two_thirds_and_overlap() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ca =
            CertificateAuthority::generate("dmvpn-ca", t0, Duration::from_secs(86400)).unwrap();
        let life = Duration::from_secs(3000);
        let old = ca.issue(&id("10.42.0.2"), t0, life).unwrap();
        let info = inspect(&old.cert_pem).unwrap();
        assert_eq!(info.renew_at(), info.not_before + Duration::from_secs(2000));
        assert!(!info.needs_renewal(info.not_before + Duration::from_secs(1999)));
        let t_renew = info.not_before + Duration::from_secs(2000);
        assert!(info.needs_renewal(t_renew));
        let new = ca.issue(&id("10.42.0.2"), t_renew, life).unwrap();
        // During the overlap both are accepted; after the old one expires only the new one.
        verify(
            &old.cert_pem,
            ca.cert_pem(),
            t_renew + Duration::from_secs(10),
        )
        .unwrap();
        verify(
            &new.cert_pem,
            ca.cert_pem(),
            t_renew + Duration::from_secs(10),
        )
        .unwrap();
        let after = info.not_after + Duration::from_secs(1);
        assert!(matches!(
            verify(&old.cert_pem, ca.cert_pem(), after),
            Err(PkiError::Expired { .. })
        ));
        verify(&new.cert_pem, ca.cert_pem(), after).unwrap();
    }

    #[test]
    fn rejects_foreign_ca_and_accepts_bundle() {
        let now = SystemTime::now();
        let ca1 = CertificateAuthority::generate("one", now, Duration::from_secs(86400)).unwrap();
        let ca2 = CertificateAuthority::generate("two", now, Duration::from_secs(86400)).unwrap();
        let leaf = ca1
            .issue(&id("10.0.0.9"), now, Duration::from_secs(600))
            .unwrap();
        assert!(matches!(
            verify(&leaf.cert_pem, ca2.cert_pem(), now),
            Err(PkiError::UntrustedIssuer)
        ));
        let bundle = format!("{}{}", ca2.cert_pem(), ca1.cert_pem());
        verify(&leaf.cert_pem, &bundle, now).unwrap();
        assert_eq!(inspect_bundle(&bundle).unwrap().len(), 2);
    }

    #[test]
    fn reload_from_pem_and_sign_csr() {
        let now = SystemTime::now();
        let ca =
            CertificateAuthority::generate("dmvpn-ca", now, Duration::from_secs(86400)).unwrap();
        let again = CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let node_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = CertificateParams::new(vec!["ignored.example".to_owned()])
            .unwrap()
            .serialize_request(&node_key)
            .unwrap()
            .pem()
            .unwrap();
        let cert = again
            .sign_csr(&csr, &id("10.42.0.3"), now, Duration::from_secs(600))
            .unwrap();
        let info = verify(&cert, ca.cert_pem(), now).unwrap();
        assert_eq!(
            info.ip_addresses,
            vec!["10.42.0.3".parse::<IpAddr>().unwrap()]
        );
        assert!(info.dns_names.iter().all(|d| d != "ignored.example"));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(inspect("not pem"), Err(PkiError::Parse(_))));
        assert!(CertificateAuthority::from_pem("x", "y").is_err());
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate("c", now, Duration::from_secs(86400)).unwrap();
        assert!(matches!(
            ca.issue(&id("10.0.0.1"), now, Duration::from_secs(2)),
            Err(PkiError::Lifetime { .. })
        ));
    }

    fn standalone(name: &str, addr: &str) -> Identity {
        Identity {
            kind: IdentityKind::Spoke,
            namespace: None,
            name: name.to_owned(),
            tunnel_address: addr.parse().unwrap(),
        }
    }

    #[test]
    fn cluster_scoped_names_and_kinds() {
        let hub = Identity {
            kind: IdentityKind::Hub,
            ..standalone("hub1", "10.42.0.1")
        };
        assert_eq!(hub.uri(), "dmvpn://hub/hub1");
        assert_eq!(hub.dns_name(), "hub1.hub.dmvpn");
        let spoke = standalone("spoke1", "10.42.0.2");
        assert_eq!(spoke.uri(), "dmvpn://spoke/spoke1");
        assert_eq!(spoke.dns_name(), "spoke1.spoke.dmvpn");
        assert_eq!("hub".parse::<IdentityKind>(), Ok(IdentityKind::Hub));
        assert_eq!("spoke".parse::<IdentityKind>(), Ok(IdentityKind::Spoke));
        assert!(
            "Hub"
                .parse::<IdentityKind>()
                .unwrap_err()
                .contains("\"hub\"")
        );
        assert_eq!(IdentityKind::Hub.to_string(), "hub");
    }

    /// The IKE side checks chain, validity, the ipsecIKE usage and the IP SAN with webpki:
    /// a certificate from here must pass exactly those checks.
    #[test]
    fn leaf_passes_the_ike_verifier_for_its_tunnel_address_only() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate("test CA", now, Duration::from_secs(86400 * 30))
            .unwrap();
        let leaf = ca
            .issue(
                &standalone("spoke1", "10.42.0.2"),
                now,
                Duration::from_secs(86400),
            )
            .unwrap();
        let der = certs_from_pem(&leaf.cert_pem).unwrap().remove(0);
        let info = inspect_der(&der).unwrap();
        assert_eq!(
            info.ip_addresses,
            vec!["10.42.0.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(info.dns_names, vec!["spoke1.spoke.dmvpn".to_owned()]);
        assert_eq!(info.uris, vec!["dmvpn://spoke/spoke1".to_owned()]);
        let ca_der = certs_from_pem(ca.cert_pem()).unwrap().remove(0);
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
        // The key is the one the certificate names, in the PKCS#8 form IKE signs with.
        let pkcs8 = key_pkcs8_from_pem(&leaf.key_pem).unwrap();
        let signer = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &pkcs8,
        )
        .unwrap();
        let sig = signer
            .sign(&aws_lc_rs::rand::SystemRandom::new(), b"AUTH payload")
            .unwrap();
        ee.verify_signature(
            webpki::aws_lc_rs::ECDSA_P256_SHA256,
            b"AUTH payload",
            sig.as_ref(),
        )
        .unwrap();
    }

    #[test]
    fn names_that_make_no_dns_name_are_refused() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate("c", now, Duration::from_secs(86400)).unwrap();
        let life = Duration::from_secs(600);
        for bad in ["", "a b", "a/b", ".hidden", "a..b", "a_b", &"x".repeat(64)] {
            let e = ca
                .issue(&standalone(bad, "10.42.0.2"), now, life)
                .unwrap_err();
            assert!(matches!(e, PkiError::Name { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains("DNS labels"), "{e}");
        }
        let long = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(50)
        );
        assert!(matches!(
            ca.issue(&standalone(&long, "10.42.0.2"), now, life),
            Err(PkiError::Name { .. })
        ));
        let bad_ns = Identity {
            namespace: Some("a b".to_owned()),
            ..standalone("ok", "10.42.0.2")
        };
        let e = ca.issue(&bad_ns, now, life).unwrap_err();
        assert!(e.to_string().contains("\"a b/ok\""), "{e}");
        // Dotted names, upper case and the longest label are fine.
        for good in ["node-1.site.example", "Spoke1", &"x".repeat(63)] {
            ca.issue(&standalone(good, "10.42.0.2"), now, life).unwrap();
        }
    }

    #[test]
    fn key_and_der_garbage_are_errors() {
        assert!(key_pkcs8_from_pem("not a key").is_err());
        assert!(matches!(
            inspect_der(&[0x30, 0x03, 1, 2]),
            Err(PkiError::Parse(_))
        ));
        assert!(matches!(certs_from_pem(""), Err(PkiError::Parse(_))));
    }
}
