//! Kubernetes API types of kube-dmvpn: `DmvpnHub` and `DmvpnSpoke`
//! (group [`GROUP`], version [`VERSION`], both cluster-scoped), the condition helpers the
//! operator uses to fill their status, the RBAC the operator needs ([`rbac::REQUIRED`]) and the
//! CRD YAML generator ([`generate`]). With the feature `validation`, `validation` checks
//! objects against the CRDs' schema and CEL rules as the API server would.
//!
//! The objects are cluster-scoped because they select nodes and program host networking;
//! certificate and CA secrets live in the operator namespace ([`OPERATOR_NAMESPACE`]).

pub mod common;
pub mod conditions;
pub mod generate;
pub mod hub;
pub mod rbac;
pub mod spoke;
#[cfg(feature = "validation")]
pub mod validation;

pub use common::{
    CertificateStatus, EspProposal, IkeProposal, IpsecProfile, NodeSelection, NodeSelectionMode,
    PeerKind, PeerState, PeerStatus, SecretKeyReference,
};
pub use hub::{
    DmvpnHub, DmvpnHubSpec, DmvpnHubStatus, HubEndpoint, NhrpSettings, ServiceReference,
};
pub use spoke::{
    DmvpnSpoke, DmvpnSpokeSpec, DmvpnSpokeStatus, HubReference, NatHints, PrefixSource,
    SitePrefixes,
};

/// API group of every kube-dmvpn resource.
pub const GROUP: &str = "dmvpn.kube-dmvpn.io";
/// API version of the types in this crate.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` value of the types in this crate.
pub const API_VERSION: &str = "dmvpn.kube-dmvpn.io/v1alpha1";
/// Kind of the hub resource.
pub const HUB_KIND: &str = "DmvpnHub";
/// Kind of the spoke resource.
pub const SPOKE_KIND: &str = "DmvpnSpoke";
/// Plural (resource) name of the hub resource, as used in RBAC and URLs.
pub const HUB_PLURAL: &str = "dmvpnhubs";
/// Plural (resource) name of the spoke resource, as used in RBAC and URLs.
pub const SPOKE_PLURAL: &str = "dmvpnspokes";
/// `kubectl get dmvpn` lists hubs and spokes together.
pub const CATEGORY: &str = "dmvpn";

/// Finalizer the operator puts on hubs and spokes while it holds a tunnel address for them,
/// so the address returns to the pool (and the certificate secret is deleted) before the
/// object disappears.
pub const FINALIZER_ADDRESS: &str = "dmvpn.kube-dmvpn.io/address";

/// Namespace the operator runs in by default; it holds the CA secret, the per-site certificate
/// secrets and the leader-election lease.
pub const OPERATOR_NAMESPACE: &str = "kube-dmvpn-system";
/// Service account of the operator (bound by the RBAC manifests in `crds/rbac/`).
pub const OPERATOR_SERVICE_ACCOUNT: &str = "dmvpn-operator";
/// Name of the leader-election lease in [`OPERATOR_NAMESPACE`].
pub const LEADER_LEASE_NAME: &str = "dmvpn-operator-leader";
/// Name of the secret in [`OPERATOR_NAMESPACE`] that holds the CA certificate and key.
pub const CA_SECRET_NAME: &str = "dmvpn-ca";

/// Label put on secrets the operator creates for a hub (value: the hub name).
pub const LABEL_HUB: &str = "dmvpn.kube-dmvpn.io/hub";
/// Label put on secrets the operator creates for a spoke (value: the spoke name).
pub const LABEL_SPOKE: &str = "dmvpn.kube-dmvpn.io/spoke";
/// `app.kubernetes.io/managed-by` value on objects the operator creates.
pub const MANAGED_BY: &str = "dmvpn-operator";

/// Name of the secret (in [`OPERATOR_NAMESPACE`]) that holds the certificate and key of the hub
/// `hub_name`. Hub names are DNS labels (enforced by the CRD), so the result is a valid name.
pub fn hub_certificate_secret_name(hub_name: &str) -> String {
    format!("dmvpn-hub-{hub_name}-cert")
}

/// Name of the secret (in [`OPERATOR_NAMESPACE`]) that holds the certificate and key of the
/// spoke `spoke_name`.
pub fn spoke_certificate_secret_name(spoke_name: &str) -> String {
    format!("dmvpn-spoke-{spoke_name}-cert")
}
