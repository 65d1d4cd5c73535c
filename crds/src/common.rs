//! Types shared by `DmvpnHub` and `DmvpnSpoke`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::KubeSchema;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Schema of `status.conditions`: the k8s-openapi `Condition` schema plus the constraints the
/// API server applies to `metav1.Condition` in built-in types (status enum, reason and type
/// patterns, lengths), a bound on the list, and map semantics keyed by `type` so that
/// server-side apply merges conditions one by one.
pub(crate) fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    let obj = schema.ensure_object();
    obj.insert("maxItems".into(), json!(crate::conditions::MAX_CONDITIONS));
    obj.insert("x-kubernetes-list-type".into(), json!("map"));
    obj.insert("x-kubernetes-list-map-keys".into(), json!(["type"]));
    if let Some(props) = obj
        .get_mut("items")
        .and_then(|i| i.get_mut("properties"))
        .and_then(|p| p.as_object_mut())
    {
        let mut set = |field: &str, extra: serde_json::Value| {
            if let (Some(target), Some(extra)) = (
                props.get_mut(field).and_then(|f| f.as_object_mut()),
                extra.as_object(),
            ) {
                for (k, v) in extra {
                    target.insert(k.clone(), v.clone());
                }
            }
        };
        set("status", json!({"enum": ["True", "False", "Unknown"]}));
        set(
            "reason",
            json!({"minLength": 1, "maxLength": 1024, "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"}),
        );
        set(
            "type",
            json!({"maxLength": 316, "pattern": "^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"}),
        );
        set(
            "message",
            json!({"maxLength": crate::conditions::MAX_MESSAGE_LEN}),
        );
        set("observedGeneration", json!({"minimum": 0}));
    }
    schema
}

/// An IKE SA proposal (encryption, PRF/integrity, key exchange), written as strongSwan spells
/// it. Only key exchanges the project's IKEv2 implements are listed (ECP and Curve25519).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum IkeProposal {
    #[serde(rename = "aes256gcm16-prfsha384-ecp384")]
    Aes256GcmPrfSha384Ecp384,
    #[serde(rename = "aes128gcm16-prfsha256-ecp256")]
    Aes128GcmPrfSha256Ecp256,
    #[serde(rename = "aes256gcm16-prfsha384-curve25519")]
    Aes256GcmPrfSha384Curve25519,
    #[serde(rename = "aes256-sha384-ecp384")]
    Aes256CbcSha384Ecp384,
}

/// An ESP (Child SA) proposal, written as strongSwan spells it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum EspProposal {
    #[serde(rename = "aes256gcm16")]
    Aes256Gcm,
    #[serde(rename = "aes128gcm16")]
    Aes128Gcm,
    #[serde(rename = "chacha20poly1305")]
    ChaCha20Poly1305,
}

pub(crate) fn default_ike_proposals() -> Vec<IkeProposal> {
    vec![
        IkeProposal::Aes256GcmPrfSha384Ecp384,
        IkeProposal::Aes128GcmPrfSha256Ecp256,
    ]
}
pub(crate) fn default_esp_proposals() -> Vec<EspProposal> {
    vec![EspProposal::Aes256Gcm, EspProposal::Aes128Gcm]
}
pub(crate) fn default_ike_lifetime() -> u32 {
    86400
}
pub(crate) fn default_child_lifetime() -> u32 {
    3600
}
pub(crate) fn default_dpd_interval() -> u32 {
    30
}

/// IPsec profile of a DMVPN: what IKEv2 and ESP negotiate between all its members.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.childLifetimeSeconds < self.ikeLifetimeSeconds").message("childLifetimeSeconds must be shorter than ikeLifetimeSeconds (Child SAs are rekeyed inside the IKE SA)"))]
pub struct IpsecProfile {
    /// IKE SA proposals, most preferred first.
    #[serde(default = "default_ike_proposals")]
    #[schemars(length(min = 1, max = 8))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub ike_proposals: Vec<IkeProposal>,
    /// ESP proposals for the GRE Child SAs (transport mode), most preferred first.
    #[serde(default = "default_esp_proposals")]
    #[schemars(length(min = 1, max = 8))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub esp_proposals: Vec<EspProposal>,
    /// IKE SA lifetime in seconds (reauthentication/rekey period).
    #[serde(default = "default_ike_lifetime")]
    #[schemars(range(min = 300, max = 172800))]
    pub ike_lifetime_seconds: u32,
    /// Child SA lifetime in seconds; must be shorter than the IKE SA lifetime.
    #[serde(default = "default_child_lifetime")]
    #[schemars(range(min = 120, max = 86400))]
    pub child_lifetime_seconds: u32,
    /// Dead peer detection interval in seconds.
    #[serde(default = "default_dpd_interval")]
    #[schemars(range(min = 5, max = 3600))]
    pub dpd_interval_seconds: u32,
}

impl Default for IpsecProfile {
    fn default() -> Self {
        Self {
            ike_proposals: default_ike_proposals(),
            esp_proposals: default_esp_proposals(),
            ike_lifetime_seconds: default_ike_lifetime(),
            child_lifetime_seconds: default_child_lifetime(),
            dpd_interval_seconds: default_dpd_interval(),
        }
    }
}

/// How the nodes that act for a site are chosen.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum NodeSelectionMode {
    /// Every node of the cluster.
    #[default]
    All,
    /// Nodes matching `selector`.
    Selector,
}

/// Which nodes run the data plane for a site.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode == 'Selector' ? has(self.selector) : !has(self.selector)").message("set nodes.selector if and only if nodes.mode is Selector"))]
pub struct NodeSelection {
    #[serde(default)]
    pub mode: NodeSelectionMode,
    /// Label selector of the nodes (mode `Selector` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// A key in a Secret in the operator namespace. Secrets are referenced, never inlined, and are
/// only read from the operator's own namespace (the objects are cluster-scoped, so there is no
/// namespace to take them from, and the operator has no cluster-wide secret access).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Where a site's certificate is and when it expires.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// Secret in the operator namespace with `tls.crt`, `tls.key` and `ca.crt`.
    pub secret_name: String,
    /// End of the certificate's validity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Time>,
    /// When the operator will renew it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_after: Option<Time>,
    /// Serial number, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
}

/// What a peer is to the site reporting it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PeerKind {
    /// A hub (NHS) the spoke registers with.
    Hub,
    /// A spoke registered with the hub.
    Spoke,
    /// A spoke-to-spoke shortcut (phase 2/3).
    Shortcut,
}

/// State of the tunnel to a peer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PeerState {
    Up,
    Connecting,
    Down,
}

/// One peer in a status peer list. Lists are bounded (see `MAX_PEERS` of each kind), so a
/// busy hub reports a subset and the total in `peerCount`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    /// The peer's tunnel (overlay) address.
    pub tunnel_address: String,
    /// The peer's NBMA (underlay) address as seen by this site (after NAT).
    pub nbma_address: String,
    pub kind: PeerKind,
    pub state: PeerState,
    /// Name of the peer's DmvpnHub / DmvpnSpoke, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Local node that holds this tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// NAT was detected on the path (IKE NAT-D), so ESP is UDP-encapsulated.
    #[serde(default)]
    pub nat_detected: bool,
    /// When the tunnel reached its current state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Last measured round-trip time in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_milliseconds: Option<u32>,
}
