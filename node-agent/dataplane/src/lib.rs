//! mGRE data planes for kube-dmvpn behind one trait, [`DataPlane`].
//!
//! - [`gre`]: the GRE codec (RFC 2784/2890), byte-compatible with Linux `ip_gre` and Cisco.
//! - [`tables`]: forwarding (longest prefix match) and neighbour tables, published as
//!   lock-free snapshots.
//! - [`userspace`]: a TUN device plus a raw IPv4 GRE socket; works without the `ip_gre`
//!   kernel module, and forwards spoke-to-spoke traffic on a hub in userspace. With
//!   [`IpsecDataConfig`] every GRE packet is carried in ESP transport mode (raw IP protocol
//!   50, or ESP-in-UDP on port 4500) with the SAs the agent installs from IKE.
//!
//! A kernel data plane (an rtnetlink multipoint `gre` link, kernel neighbour entries for
//! the NBMA mappings, kernel routes, and XFRM for IPsec) implements the same trait; the
//! agent chooses one at run time and holds it as `Arc<dyn DataPlane>`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use dmvpn_dataplane::{DataPlane, Event, UserspaceConfig, UserspaceDataPlane};
//!
//! # async fn agent() -> Result<(), dmvpn_dataplane::DataPlaneError> {
//! let mut cfg = UserspaceConfig::new(
//!     "dmvpn0",
//!     "10.42.0.2/24".parse().unwrap(),
//!     "198.51.100.2".parse().unwrap(),
//! );
//! cfg.gre_key = Some(42);
//! let (dp, mut events) = UserspaceDataPlane::start(cfg).await?;
//! let dp: Arc<dyn DataPlane> = dp;
//! // Spoke: the hub is an NHS and the tunnel network is reached through it.
//! dp.set_neighbor("10.42.0.1".parse().unwrap(), "198.51.100.1".parse().unwrap()).await?;
//! dp.set_route("10.42.0.0/24".parse().unwrap(), "10.42.0.1".parse().unwrap()).await?;
//! dp.set_nhs(vec!["10.42.0.1".parse().unwrap()]).await?;
//! while let Some(ev) = events.recv().await {
//!     match ev {
//!         Event::Nhrp { from_nbma, bytes } => { /* engine.handle_packet(now, from_nbma, &bytes) */ }
//!         Event::Miss { dst, .. } => { /* phase 2: engine.resolve(now, dst) */ }
//!         Event::Used { dst, .. } => { /* engine.traffic(now, dst) */ }
//!         Event::Hairpin { src, dst, ingress_nbma, head } => { /* engine.hairpinned(..) */ }
//!         // With IPsec (`cfg.ipsec`): start IKE with the peer; feed IKE from UDP 4500.
//!         Event::NeedSa { nbma } => { /* ike.initiate(now, nbma) */ }
//!         Event::SaActive { spi } => { /* the peer has this SA: use its outbound half */ }
//!         Event::Ike { from, local, payload } => { /* ike.handle_datagram(..) */ }
//!     }
//! }
//! # Ok(())
//! # }
//! ```

pub mod counters;
pub mod events;
pub mod gre;
pub mod tables;
pub mod userspace;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use ipnet::IpNet;
use thiserror::Error;

pub use counters::{Counters, DropCounters, DropReason};
pub use events::{Event, MissReason};
pub use userspace::esp::{NHRP_QUEUE_PEERS, NHRP_QUEUE_PER_PEER, SaInfo};
pub use userspace::{ESP_OVERHEAD, IpsecDataConfig, UserspaceConfig, UserspaceDataPlane};

/// A boxed future, so that [`DataPlane`] stays object-safe (`Arc<dyn DataPlane>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Errors of data plane operations. Messages say what is wrong and how to fix it.
#[derive(Debug, Error)]
pub enum DataPlaneError {
    /// The configuration cannot work.
    #[error("invalid data plane configuration: {0}")]
    Config(String),
    /// An address family this data plane does not carry (e.g. an IPv6 NBMA address on the
    /// IPv4 underlay socket).
    #[error("unsupported address {addr}: {why}")]
    Unsupported { addr: IpAddr, why: &'static str },
    /// Creating or configuring the TUN device failed.
    #[error("TUN device {name}: {source} (needs CAP_NET_ADMIN and /dev/net/tun)")]
    Tun {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// Opening or using the raw GRE socket failed.
    #[error(
        "raw GRE socket: {source} (needs CAP_NET_RAW; is the NBMA address configured on this host?)"
    )]
    Socket {
        #[source]
        source: std::io::Error,
    },
    /// A netlink request (address, link, route) failed.
    #[error("netlink: {0}")]
    Netlink(String),
    /// The packet to send is larger than the underlay allows.
    #[error("packet of {len} bytes exceeds the maximum of {max}")]
    TooBig { len: usize, max: usize },
    /// The data plane has been shut down.
    #[error("the data plane is stopped")]
    Stopped,
}

/// The data plane seen by the agent.
///
/// Object-safe: async operations return a [`BoxFuture`] (one allocation per control-plane
/// call; the packet path does not go through this trait). Implementations are `Send + Sync`
/// and shared as `Arc<dyn DataPlane>`. Events come from a bounded `tokio::sync::mpsc`
/// receiver handed out when the data plane is started (see
/// [`UserspaceDataPlane::start`]).
///
/// Table semantics: a neighbour (overlay address → NBMA address) is also a host route to
/// itself and wins over any prefix; a route (prefix → overlay next hop) resolves through
/// the neighbour table. `set_*` replace existing entries; `del_*` of an absent entry is
/// not an error.
pub trait DataPlane: Send + Sync {
    /// Adds or replaces the NBMA address of an overlay neighbour.
    fn set_neighbor(
        &self,
        proto: IpAddr,
        nbma: IpAddr,
    ) -> BoxFuture<'_, Result<(), DataPlaneError>>;
    /// Removes a neighbour.
    fn del_neighbor(&self, proto: IpAddr) -> BoxFuture<'_, Result<(), DataPlaneError>>;
    /// Adds or replaces a route: `prefix` is reachable via the overlay address `next_hop`.
    fn set_route(
        &self,
        prefix: IpNet,
        next_hop: IpAddr,
    ) -> BoxFuture<'_, Result<(), DataPlaneError>>;
    /// Removes a route.
    fn del_route(&self, prefix: IpNet) -> BoxFuture<'_, Result<(), DataPlaneError>>;
    /// Replaces the set of next hop servers (overlay addresses). Traffic routed via one of
    /// them raises [`Event::Miss`] (`ViaNhs`); traffic to other neighbours raises
    /// [`Event::Used`].
    fn set_nhs(&self, nhs: Vec<IpAddr>) -> BoxFuture<'_, Result<(), DataPlaneError>>;
    /// Sends an NHRP packet (GRE protocol 0x2001, with our key) to an NBMA address.
    fn send_nhrp<'a>(
        &'a self,
        dst_nbma: IpAddr,
        bytes: &'a [u8],
    ) -> BoxFuture<'a, Result<(), DataPlaneError>>;
    /// Current counters.
    fn counters(&self) -> Counters;
    /// MTU of the overlay interface (underlay MTU minus encapsulation overhead).
    fn mtu(&self) -> u16;
    /// Current neighbours (overlay, NBMA), for `show`.
    fn neighbors(&self) -> Vec<(IpAddr, IpAddr)>;
    /// Current routes (prefix, next hop), for `show`.
    fn routes(&self) -> Vec<(IpNet, IpAddr)>;
}
