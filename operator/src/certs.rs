//! The CA secret and the per-site certificate secrets.
//!
//! CA secret (`dmvpn-ca`, type `kubernetes.io/tls`): `tls.crt` / `tls.key` = the current CA;
//! `ca.crt` = the trust bundle: the current CA plus, after a CA rotation, the previous CA until
//! it expires.
//!
//! Site secret (`dmvpn-hub-<name>-cert` / `dmvpn-spoke-<name>-cert`, type `kubernetes.io/tls`):
//! `tls.crt`, `tls.key`, `ca.crt` (the trust bundle). After a renewal, the previous certificate
//! and key stay as `tls.crt.previous` / `tls.key.previous` until the previous certificate
//! expires: agents keep SAs authenticated with it while new ones use the new certificate, and
//! peers accept both because both chain to a CA in the bundle.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::pki::{self, CertInfo, CertificateAuthority, Identity, PkiError};

pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
pub const TLS_CRT_PREVIOUS: &str = "tls.crt.previous";
pub const TLS_KEY_PREVIOUS: &str = "tls.key.previous";
pub const SECRET_TYPE_TLS: &str = "kubernetes.io/tls";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("secret {0} was changed concurrently; retrying")]
    Conflict(String),
    #[error("secret {name} holds an unusable CA: {reason}")]
    BadCa { name: String, reason: String },
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

fn bytes(s: &str) -> Value {
    json!(ByteString(s.as_bytes().to_vec()))
}

fn labels(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut l: BTreeMap<String, String> = [(
        "app.kubernetes.io/managed-by".to_owned(),
        dmvpn_crds::MANAGED_BY.to_owned(),
    )]
    .into();
    for (k, v) in extra {
        l.insert((*k).to_owned(), (*v).to_owned());
    }
    l
}

/// The CA in use and the trust bundle.
#[derive(Debug, Clone)]
pub struct CaState {
    pub ca: Arc<CertificateAuthority>,
    /// PEM: current CA first, then previous CAs still valid.
    pub bundle: String,
}

/// Keeps the CA secret: creates it on first start, rotates the CA at 2/3 of its lifetime.
pub struct CaManager {
    api: Api<Secret>,
    name: String,
    lifetime: Duration,
    state: tokio::sync::Mutex<Option<CaState>>,
}

impl std::fmt::Debug for CaManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaManager")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn bundle_of(current: &str, old_bundle: Option<&str>, now: SystemTime) -> String {
    let mut out = current.trim_end().to_owned();
    out.push('\n');
    let mut seen: std::collections::BTreeSet<String> = pki::inspect(current)
        .ok()
        .map(|i| i.serial)
        .into_iter()
        .collect();
    if let Some(old) = old_bundle {
        for block in split_pem(old) {
            let Ok(info) = pki::inspect(&block) else {
                continue;
            };
            if info.valid_at(now) && seen.insert(info.serial.clone()) {
                out.push_str(block.trim_end());
                out.push('\n');
            }
        }
    }
    out
}

/// Splits a PEM bundle into its certificate blocks.
pub fn split_pem(pem: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in pem.lines() {
        if line.starts_with("-----BEGIN ") {
            cur.clear();
        }
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END ") {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

impl CaManager {
    pub fn new(client: kube::Client, namespace: &str, name: &str, lifetime: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            lifetime,
            state: tokio::sync::Mutex::new(None),
        }
    }

    /// The CA to issue with, loading, creating or rotating it as needed.
    pub async fn current(&self, now: SystemTime) -> Result<CaState, CertError> {
        let mut guard = self.state.lock().await;
        if let Some(s) = guard.as_ref()
            && !s.ca.info().needs_renewal(now)
        {
            return Ok(s.clone());
        }
        for _ in 0..8 {
            let state = match self.api.get_opt(&self.name).await? {
                None => {
                    let ca = CertificateAuthority::generate("kube-dmvpn CA", now, self.lifetime)?;
                    let bundle = bundle_of(ca.cert_pem(), None, now);
                    let secret = Secret {
                        metadata: ObjectMeta {
                            name: Some(self.name.clone()),
                            labels: Some(labels(&[])),
                            ..Default::default()
                        },
                        type_: Some(SECRET_TYPE_TLS.to_owned()),
                        data: Some(
                            [
                                (
                                    TLS_CRT.to_owned(),
                                    ByteString(ca.cert_pem().as_bytes().to_vec()),
                                ),
                                (
                                    TLS_KEY.to_owned(),
                                    ByteString(ca.key_pem().as_bytes().to_vec()),
                                ),
                                (CA_CRT.to_owned(), ByteString(bundle.as_bytes().to_vec())),
                            ]
                            .into(),
                        ),
                        ..Default::default()
                    };
                    match self.api.create(&PostParams::default(), &secret).await {
                        Ok(_) => {
                            tracing::info!(secret = %self.name, "created the CA");
                            CaState {
                                ca: Arc::new(ca),
                                bundle,
                            }
                        }
                        // Another instance created it first: use theirs.
                        Err(e) if is_status(&e, 409) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Some(secret) => {
                    let bad = |reason: String| CertError::BadCa {
                        name: self.name.clone(),
                        reason,
                    };
                    let cert =
                        text(&secret, TLS_CRT).ok_or_else(|| bad("no tls.crt".to_owned()))?;
                    let key = text(&secret, TLS_KEY).ok_or_else(|| bad("no tls.key".to_owned()))?;
                    let ca = CertificateAuthority::from_pem(&cert, &key)
                        .map_err(|e| bad(e.to_string()))?;
                    let old_bundle = text(&secret, CA_CRT);
                    if ca.info().needs_renewal(now) {
                        let next =
                            CertificateAuthority::generate("kube-dmvpn CA", now, self.lifetime)?;
                        let keep = format!("{}{}", cert, old_bundle.clone().unwrap_or_default());
                        let bundle = bundle_of(next.cert_pem(), Some(&keep), now);
                        let patch = json!({
                            "metadata": {"resourceVersion": secret.metadata.resource_version},
                            "data": {
                                TLS_CRT: bytes(next.cert_pem()),
                                TLS_KEY: bytes(next.key_pem()),
                                CA_CRT: bytes(&bundle),
                            }
                        });
                        match self
                            .api
                            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                            .await
                        {
                            Ok(_) => {
                                tracing::info!(secret = %self.name, "rotated the CA; the previous one stays in ca.crt until it expires");
                                CaState {
                                    ca: Arc::new(next),
                                    bundle,
                                }
                            }
                            Err(e) if is_status(&e, 409) => continue,
                            Err(e) => return Err(e.into()),
                        }
                    } else {
                        let bundle = bundle_of(&cert, old_bundle.as_deref(), now);
                        CaState {
                            ca: Arc::new(ca),
                            bundle,
                        }
                    }
                }
            };
            *guard = Some(state.clone());
            return Ok(state);
        }
        Err(CertError::Conflict(self.name.clone()))
    }
}

/// What `ensure_site_certificate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertAction {
    Unchanged,
    Issued,
    /// Renewed at 2/3 of the lifetime (or re-signed by a new CA); the old one is kept as
    /// `tls.crt.previous`.
    Rotated,
    /// Re-issued because the identity (tunnel address) changed; the old one is dropped.
    Reissued,
}

#[derive(Debug, Clone)]
pub struct CertOutcome {
    pub info: CertInfo,
    pub action: CertAction,
}

/// Makes sure `secret_name` holds a current certificate for `id`.
#[allow(clippy::too_many_arguments)]
pub async fn ensure_site_certificate(
    api: &Api<Secret>,
    secret_name: &str,
    id: &Identity,
    ca: &CaState,
    lifetime: Duration,
    now: SystemTime,
    owner: Option<OwnerReference>,
    extra_labels: &[(&str, &str)],
) -> Result<CertOutcome, CertError> {
    let existing = api.get_opt(secret_name).await?;
    let current = existing.as_ref().and_then(|s| {
        let crt = text(s, TLS_CRT)?;
        let info = pki::inspect(&crt).ok()?;
        Some((crt, text(s, TLS_KEY).unwrap_or_default(), info))
    });
    let same_identity = |info: &CertInfo| {
        info.ip_addresses == vec![id.tunnel_address] && info.uris == vec![id.uri()]
    };
    let signed_by_current = |crt: &str| pki::verify(crt, ca.ca.cert_pem(), now).is_ok();

    if let (Some(secret), Some((crt, _, info))) = (existing.as_ref(), current.as_ref())
        && same_identity(info)
        && !info.needs_renewal(now)
        && signed_by_current(crt)
    {
        // Still good: only refresh the bundle and drop an expired previous certificate.
        let mut data = serde_json::Map::new();
        if text(secret, CA_CRT).as_deref() != Some(ca.bundle.as_str()) {
            data.insert(CA_CRT.to_owned(), bytes(&ca.bundle));
        }
        if let Some(prev) = text(secret, TLS_CRT_PREVIOUS)
            && pki::inspect(&prev).map_or(true, |p| !p.valid_at(now))
        {
            data.insert(TLS_CRT_PREVIOUS.to_owned(), Value::Null);
            data.insert(TLS_KEY_PREVIOUS.to_owned(), Value::Null);
        }
        if !data.is_empty() {
            patch_secret(api, secret_name, secret, Value::Object(data)).await?;
        }
        return Ok(CertOutcome {
            info: info.clone(),
            action: CertAction::Unchanged,
        });
    }

    let issued = ca.ca.issue(id, now, lifetime)?;
    let info = pki::inspect(&issued.cert_pem)?;
    match existing {
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(secret_name.to_owned()),
                    labels: Some(labels(extra_labels)),
                    owner_references: owner.map(|o| vec![o]),
                    ..Default::default()
                },
                type_: Some(SECRET_TYPE_TLS.to_owned()),
                data: Some(
                    [
                        (TLS_CRT.to_owned(), ByteString(issued.cert_pem.into_bytes())),
                        (TLS_KEY.to_owned(), ByteString(issued.key_pem.into_bytes())),
                        (CA_CRT.to_owned(), ByteString(ca.bundle.as_bytes().to_vec())),
                    ]
                    .into(),
                ),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => Ok(CertOutcome {
                    info,
                    action: CertAction::Issued,
                }),
                Err(e) if is_status(&e, 409) => Err(CertError::Conflict(secret_name.to_owned())),
                Err(e) => Err(e.into()),
            }
        }
        Some(secret) => {
            let keep_previous = current
                .as_ref()
                .filter(|(_, _, old)| same_identity(old) && old.valid_at(now));
            let mut data = serde_json::Map::new();
            data.insert(TLS_CRT.to_owned(), bytes(&issued.cert_pem));
            data.insert(TLS_KEY.to_owned(), bytes(&issued.key_pem));
            data.insert(CA_CRT.to_owned(), bytes(&ca.bundle));
            let action = match keep_previous {
                Some((crt, key, _)) => {
                    data.insert(TLS_CRT_PREVIOUS.to_owned(), bytes(crt));
                    data.insert(TLS_KEY_PREVIOUS.to_owned(), bytes(key));
                    CertAction::Rotated
                }
                None => {
                    data.insert(TLS_CRT_PREVIOUS.to_owned(), Value::Null);
                    data.insert(TLS_KEY_PREVIOUS.to_owned(), Value::Null);
                    if current.is_some() {
                        CertAction::Reissued
                    } else {
                        CertAction::Issued
                    }
                }
            };
            patch_secret(api, secret_name, &secret, Value::Object(data)).await?;
            Ok(CertOutcome { info, action })
        }
    }
}

async fn patch_secret(
    api: &Api<Secret>,
    name: &str,
    secret: &Secret,
    data: Value,
) -> Result<(), CertError> {
    let patch = json!({
        "metadata": {"resourceVersion": secret.metadata.resource_version},
        "type": SECRET_TYPE_TLS,
        "data": data,
    });
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 409) => Err(CertError::Conflict(name.to_owned())),
        Err(e) => Err(e.into()),
    }
}

/// Deletes a site secret; a missing one is fine.
pub async fn delete_secret(api: &Api<Secret>, name: &str) -> Result<(), kube::Error> {
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 404) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reads the certificates of a site secret: (current, previous).
pub fn secret_certs(secret: &Secret) -> (Option<String>, Option<String>) {
    (text(secret, TLS_CRT), text(secret, TLS_CRT_PREVIOUS))
}

/// Reads the trust bundle of a site or CA secret.
pub fn secret_bundle(secret: &Secret) -> Option<String> {
    text(secret, CA_CRT)
}
