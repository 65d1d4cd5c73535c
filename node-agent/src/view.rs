//! The JSON shapes of the control socket replies (`show …`). These are a stable interface:
//! the CLI renders them, `--json` prints them as they are, and the lab and the operator read
//! them. Fields are only ever added, never renamed or removed. node-agent/README.md lists them.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Reply to `show_dmvpn`: this node and one row per tunnel peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DmvpnView {
    /// The TUN device carrying the overlay.
    pub interface: String,
    /// "hub" or "spoke".
    pub role: String,
    /// DMVPN phase 1, 2 or 3.
    pub phase: u8,
    /// Own overlay address with the tunnel prefix length.
    pub tunnel_address: IpNet,
    /// Own underlay address in use.
    pub nbma_address: IpAddr,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    pub peers: Vec<PeerView>,
    /// Data plane totals (per-peer counters are not kept by this data plane).
    pub traffic: TrafficView,
    /// IKE and ESP state; absent when `[ipsec] enabled = false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipsec: Option<crate::ipsec::IpsecView>,
}

/// One tunnel peer: a configured NHS, a registered spoke (hub side) or a shortcut peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    pub tunnel_address: IpAddr,
    /// Underlay address traffic to the peer goes to (absent while unresolved).
    pub nbma_address: Option<IpAddr>,
    /// "up", or for an NHS its registration state ("down", "probe", …).
    pub state: String,
    /// Seconds since the peer entered `state` (Cisco "UpDn Tm"); absent when unknown.
    pub state_secs: Option<u64>,
    /// Cisco-style letters: S static NHS, D dynamic (registered with us), T shortcut
    /// (learned by resolution), in that order.
    pub attributes: String,
    /// Overlay prefixes routed via this peer (its registered or resolved prefixes).
    pub prefixes: Vec<IpNet>,
    /// Seconds until the registration or shortcut expires (absent for a static NHS).
    pub expires_in_secs: Option<u64>,
    /// IKE state with the peer's NBMA address ("connecting", "established", "failed",
    /// "down"); absent without IPsec or before any IKE exchange.
    #[serde(default)]
    pub ike_state: Option<String>,
    /// Reason of the last IKE failure with the peer (e.g. AUTHENTICATION_FAILED).
    #[serde(default)]
    pub ike_error: Option<String>,
}

/// Data plane totals for `show dmvpn`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficView {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub dropped_packets: u64,
}

/// Reply to `show_nhrp_cache`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheView {
    pub interface: String,
    pub entries: Vec<CacheEntryView>,
}

/// One NHRP cache entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntryView {
    /// "local", "nhs", "dynamic", "shortcut", "incomplete" or "negative".
    #[serde(rename = "type")]
    pub kind: String,
    /// The overlay prefix the entry maps.
    pub prefix: IpNet,
    /// Overlay address of the node owning the prefix (the next hop).
    pub protocol: IpAddr,
    /// Its underlay address (absent for incomplete and negative entries).
    pub nbma: Option<IpAddr>,
    pub expires_in_secs: Option<u64>,
    /// Shortcut in use since its last refresh.
    pub used: bool,
    /// Registered with the unique (U) bit.
    pub unique: bool,
}

/// Reply to `show_nhrp_nhs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NhsListView {
    pub interface: String,
    pub nhs: Vec<NhsView>,
}

/// One configured next hop server and our registration with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NhsView {
    pub tunnel_address: IpAddr,
    pub nbma_address: IpAddr,
    /// Lower is preferred (Cisco convention).
    pub priority: u8,
    /// "probing" (not heard from yet), "up" or "down" (missed 3 registrations; still probed).
    pub state: String,
    /// Our registration is currently accepted.
    pub registered: bool,
    /// The routes via NHS (tunnel network, overlay_routes) currently point to this NHS.
    pub preferred: bool,
    /// Seconds since its last Registration Reply.
    pub last_reply_secs_ago: Option<u64>,
    /// Registration timeouts in total, and in a row now.
    pub failures: u64,
    pub consecutive_timeouts: u32,
    /// Request id of our current registration.
    pub request_id: u32,
    /// Our NBMA address as this NHS sees it, when different from ours (NAT).
    pub nat_address: Option<IpAddr>,
    /// CIE code of the last rejection (e.g. 14: unique address already registered).
    pub last_rejection_code: Option<u8>,
}

/// Reply to `clear_nhrp_cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClearView {
    /// Cache entries (shortcuts, incomplete and negative) removed.
    pub cleared: u64,
}
