//! `DmvpnSpoke`: a site (this cluster, or a group of its nodes) that registers with hubs.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{CertificateStatus, NodeSelection, PeerStatus};

/// Most peers listed in `DmvpnSpoke.status.peers` (the CRD schema enforces the same bound);
/// `status.peerCount` holds the total.
pub const SPOKE_MAX_PEERS: usize = 32;
/// Most prefixes in `DmvpnSpoke.status.sitePrefixes`.
pub const SPOKE_MAX_SITE_PREFIXES: usize = 64;
/// Most hubs a spoke can list.
pub const SPOKE_MAX_HUBS: usize = 4;

pub(crate) fn default_keepalive() -> u32 {
    20
}

/// A DMVPN spoke. Its tunnel address comes from the tunnel network of its primary hub
/// (`hubs[0]`), unless `tunnelAddress` asks for a fixed one; both are immutable.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dmvpn.kube-dmvpn.io",
    version = "v1alpha1",
    kind = "DmvpnSpoke",
    plural = "dmvpnspokes",
    singular = "dmvpnspoke",
    shortname = "ds",
    category = "dmvpn",
    status = "DmvpnSpokeStatus",
    derive = "PartialEq",
    doc = "A DMVPN spoke: a site that registers its prefixes with one or more hubs and builds shortcuts to other spokes.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".status.tunnelAddress"}"#,
    printcolumn = r#"{"name":"Hub","type":"string","jsonPath":".spec.hubs[0].name"}"#,
    printcolumn = r#"{"name":"Peers","type":"integer","jsonPath":".status.peerCount"}"#,
    printcolumn = r#"{"name":"Cert-Expiry","type":"date","jsonPath":".status.certificate.notAfter","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("a DmvpnSpoke name must be a DNS label (at most 63 characters of a-z, 0-9 and '-'): it is the spoke's identity in its certificate")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.hubs[0].name == oldSelf.hubs[0].name").message("hubs[0] (the primary hub, whose tunnel network the spoke's address comes from) is immutable; add or remove secondary hubs after it, or recreate the spoke"),
    validation = Rule::new("has(self.tunnelAddress) == has(oldSelf.tunnelAddress) && (!has(self.tunnelAddress) || self.tunnelAddress == oldSelf.tunnelAddress)").message("tunnelAddress cannot be added, changed or removed after creation; recreate the spoke")
)]
pub struct DmvpnSpokeSpec {
    /// DmvpnHubs (in this cluster) to register with; the first is the primary hub, the others
    /// are redundant hubs in the same tunnel network (all are registered with at once).
    #[schemars(length(min = 1, max = 4))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub hubs: Vec<HubReference>,

    /// A fixed tunnel address inside the primary hub's network; absent: the operator
    /// allocates one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 7, max = 15))]
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4").message("tunnelAddress must be an IPv4 address"))]
    pub tunnel_address: Option<String>,

    /// The prefixes behind this spoke that it registers with the hubs.
    #[serde(default)]
    pub site_prefixes: SitePrefixes,

    /// NAT hints.
    #[serde(default)]
    pub nat: NatHints,

    /// Nodes that act for the spoke (run the agent and terminate tunnels). Site prefixes taken
    /// from pod CIDRs come from every node of the cluster, not only from these.
    #[serde(default)]
    pub nodes: NodeSelection,
}

/// A hub a spoke registers with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HubReference {
    /// Name of a DmvpnHub.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

/// Where a spoke's site prefixes come from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PrefixSource {
    /// The IPv4 pod CIDRs (`spec.podCIDRs`) of the cluster's nodes.
    #[default]
    NodePodCIDRs,
    /// The prefixes listed in `prefixes`.
    Static,
}

/// The prefixes a spoke registers with its hubs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.source == 'Static' ? has(self.prefixes) : !has(self.prefixes)").message("sitePrefixes.prefixes must be set when source is Static and omitted when source is NodePodCIDRs"))]
pub struct SitePrefixes {
    #[serde(default)]
    pub source: PrefixSource,
    /// IPv4 prefixes (source `Static` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32), inner(length(min = 9, max = 18)))]
    #[x_kube(
        validation = Rule::new("self.all(p, isCIDR(p) && cidr(p).ip().family() == 4 && cidr(p) == cidr(p).masked())").message("sitePrefixes.prefixes must be IPv4 networks in CIDR form with the host bits zero, e.g. 10.1.0.0/16"),
        merge_strategy = ListMerge::Set
    )]
    pub prefixes: Option<Vec<String>>,
}

/// What the spoke knows about NAT in front of it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatHints {
    /// The public (post-NAT) NBMA address, when it is fixed and known. Otherwise it is learnt
    /// from the hub (NHRP registration reply and IKE NAT detection), never from an external
    /// IP-echo service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 7, max = 15))]
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4").message("nat.publicAddress must be an IPv4 address"))]
    pub public_address: Option<String>,
    /// Always encapsulate ESP in UDP 4500, even when no NAT is detected (for paths that drop
    /// IP protocol 50).
    #[serde(default)]
    pub force_udp_encapsulation: bool,
    /// NAT-T keepalive interval in seconds.
    #[serde(default = "default_keepalive")]
    #[schemars(range(min = 5, max = 300))]
    pub keepalive_seconds: u32,
    /// Do not build spoke-to-spoke shortcuts (traffic stays relayed by the hub), e.g. behind
    /// symmetric NAT or CGNAT where direct paths cannot work.
    #[serde(default)]
    pub disable_shortcuts: bool,
}

impl Default for NatHints {
    fn default() -> Self {
        Self {
            public_address: None,
            force_udp_encapsulation: false,
            keepalive_seconds: default_keepalive(),
            disable_shortcuts: false,
        }
    }
}

/// Observed state of a spoke.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DmvpnSpokeStatus {
    /// Generation of the spec the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (roll-up of `AddressAssigned`, `CertificateReady`, `Registered`), `Degraded`,
    /// each with `observedGeneration`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The spoke's tunnel address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_address: Option<String>,
    /// The tunnel network the address belongs to (the primary hub's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_network: Option<String>,
    /// The spoke's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
    /// The prefixes the spoke registers (resolved from the spec).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub site_prefixes: Vec<String>,
    /// Number of nodes acting for the spoke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_nodes: Option<u32>,
    /// Hubs and shortcut peers (at most 32; see `peerCount`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub peers: Vec<PeerStatus>,
    /// Total number of peers, including those not listed in `peers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_count: Option<u32>,
}
