//! `DmvpnHub`: a DMVPN hub (NHRP server) and the tunnel network it serves.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    CertificateStatus, IpsecProfile, NodeSelection, PeerStatus, SecretKeyReference,
};

/// Most peers listed in `DmvpnHub.status.peers` (the CRD schema enforces the same bound);
/// `status.peerCount` holds the total.
pub const HUB_MAX_PEERS: usize = 64;

pub(crate) fn default_phase() -> u8 {
    3
}
pub(crate) fn default_holdtime() -> u32 {
    600
}
pub(crate) fn default_network_id() -> u32 {
    1
}

/// A DMVPN hub. The hub owns the tunnel network: spokes that list it first get their tunnel
/// address from `tunnelNetwork`, so that field cannot change after creation.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dmvpn.kube-dmvpn.io",
    version = "v1alpha1",
    kind = "DmvpnHub",
    plural = "dmvpnhubs",
    singular = "dmvpnhub",
    shortname = "dh",
    category = "dmvpn",
    status = "DmvpnHubStatus",
    derive = "PartialEq",
    doc = "A DMVPN hub: NHRP server, IKEv2 responder and relay for a tunnel network.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Network","type":"string","jsonPath":".spec.tunnelNetwork"}"#,
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".status.tunnelAddress"}"#,
    printcolumn = r#"{"name":"Phase","type":"integer","jsonPath":".spec.phase"}"#,
    printcolumn = r#"{"name":"Peers","type":"integer","jsonPath":".status.peerCount"}"#,
    printcolumn = r#"{"name":"Cert-Expiry","type":"date","jsonPath":".status.certificate.notAfter","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("a DmvpnHub name must be a DNS label (at most 63 characters of a-z, 0-9 and '-'): it names the hub's certificate and secret")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.tunnelAddress) || (cidr(self.tunnelNetwork).containsIP(self.tunnelAddress) && ip(self.tunnelAddress) != cidr(self.tunnelNetwork).ip())").message("tunnelAddress must lie inside tunnelNetwork and must not be its network address"))]
pub struct DmvpnHubSpec {
    /// IPv4 tunnel (overlay) network, e.g. `10.42.0.0/24`. Immutable: spokes hold addresses
    /// from it; to renumber, create a new DmvpnHub.
    #[schemars(length(min = 9, max = 18))]
    #[x_kube(
        validation = Rule::new("isCIDR(self) && cidr(self).ip().family() == 4 && cidr(self).prefixLength() <= 30 && cidr(self) == cidr(self).masked()").message("tunnelNetwork must be an IPv4 network in CIDR form with the host bits zero and a prefix length of at most /30, e.g. 10.42.0.0/24"),
        validation = Rule::new("self == oldSelf").message("tunnelNetwork is immutable: spokes hold addresses from it; create a new DmvpnHub to renumber")
    )]
    pub tunnel_network: String,

    /// The hub's own tunnel address; defaults to the first host address of the network.
    /// Two hubs sharing a tunnel network must set distinct addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 7, max = 15))]
    #[x_kube(validation = Rule::new("isIP(self) && ip(self).family() == 4").message("tunnelAddress must be an IPv4 address"))]
    pub tunnel_address: Option<String>,

    /// GRE key carried by every packet of this DMVPN (1..4294967295); absent: no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub gre_key: Option<u32>,

    /// DMVPN phase: 1 (hub and spoke only), 2 (spoke-to-spoke via NHRP resolution),
    /// 3 (spoke-to-spoke via NHRP redirect and shortcut).
    #[serde(default = "default_phase")]
    #[schemars(range(min = 1, max = 3))]
    pub phase: u8,

    /// NHRP settings shared by the hub and its spokes.
    #[serde(default)]
    pub nhrp: NhrpSettings,

    /// IKEv2 / ESP profile used between all members.
    #[serde(default)]
    pub ipsec: IpsecProfile,

    /// How spokes reach the hub on the underlay.
    pub endpoint: HubEndpoint,

    /// Redundancy priority of this hub (NHS priority) in spokes that list several hubs; lower
    /// is preferred.
    #[serde(default)]
    pub priority: u8,

    /// Nodes that run the hub's data plane.
    #[serde(default)]
    pub nodes: NodeSelection,
}

/// NHRP settings of a DMVPN.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.registrationIntervalSeconds) || self.registrationIntervalSeconds * 2 <= self.holdtimeSeconds").message("registrationIntervalSeconds must be at most half of holdtimeSeconds, so a registration is refreshed before it expires even if one is lost"))]
pub struct NhrpSettings {
    /// Holdtime of registrations and resolutions, in seconds.
    #[serde(default = "default_holdtime")]
    #[schemars(range(min = 30, max = 65000))]
    pub holdtime_seconds: u32,
    /// How often spokes refresh their registration; default one third of the holdtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 32500))]
    pub registration_interval_seconds: Option<u32>,
    /// NHRP network id (local to each router, but kept equal for clarity).
    #[serde(default = "default_network_id")]
    #[schemars(range(min = 1))]
    pub network_id: u32,
    /// Cleartext NHRP authentication string (at most 8 bytes; Cisco `ip nhrp authentication`),
    /// read from a Secret in the operator namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<SecretKeyReference>,
    /// Set the Unique bit in registrations (Cisco default); false = `registration no-unique`,
    /// which lets a spoke behind a changing NAT re-register from a new address.
    #[serde(default)]
    pub registration_unique: bool,
}

impl Default for NhrpSettings {
    fn default() -> Self {
        Self {
            holdtime_seconds: default_holdtime(),
            registration_interval_seconds: None,
            network_id: default_network_id(),
            authentication: None,
            registration_unique: false,
        }
    }
}

impl NhrpSettings {
    /// The registration interval agents should use: the explicit one, or a third of the
    /// holdtime (at least one second).
    pub fn effective_registration_interval(&self) -> u32 {
        self.registration_interval_seconds
            .unwrap_or((self.holdtime_seconds / 3).max(1))
    }
}

/// How spokes reach a hub: fixed NBMA addresses, or the load-balancer address of a Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.addresses) != has(self.service)").message("set exactly one of endpoint.addresses and endpoint.service"))]
pub struct HubEndpoint {
    /// IPv4 NBMA addresses of the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4), inner(length(min = 7, max = 15)))]
    #[x_kube(
        validation = Rule::new("self.all(a, isIP(a) && ip(a).family() == 4)").message("endpoint.addresses must be IPv4 addresses"),
        merge_strategy = ListMerge::Set
    )]
    pub addresses: Option<Vec<String>>,
    /// A Service (type LoadBalancer) in the operator namespace whose ingress addresses are the
    /// hub's NBMA addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceReference>,
}

/// A Service in the operator namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReference {
    /// Name of the Service.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

/// Observed state of a hub.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DmvpnHubStatus {
    /// Generation of the spec the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (roll-up of `AddressAssigned`, `CertificateReady`, `EndpointReady`), each with
    /// `observedGeneration`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The hub's tunnel address in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_address: Option<String>,
    /// NBMA addresses spokes are told to use (from the spec or the Service).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub nbma_addresses: Vec<String>,
    /// The hub's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
    /// Registered spokes and shortcuts seen by the hub (at most 64; see `peerCount`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub peers: Vec<PeerStatus>,
    /// Total number of peers, including those not listed in `peers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_count: Option<u32>,
}
