//! The userspace mGRE data plane: a TUN device for the overlay and a raw IPv4 socket
//! (protocol 47) for the underlay. It needs no `ip_gre` module, only CAP_NET_ADMIN and
//! CAP_NET_RAW.
//!
//! Where `ip_gre` is loaded, the kernel also sees every GRE packet and answers those that
//! match none of its tunnels with (rate-limited) ICMP port unreachable; traffic still flows
//! (verified against the Debian 6.1 kernel), but such hosts should use the kernel data
//! plane. `start` logs a warning.
//!
//! Two tasks move packets, each in batches with preallocated buffers:
//! - TUN → look up the destination (one snapshot load per batch) → GRE-encapsulate in
//!   place (headroom before the packet) → `sendmmsg` to the neighbours' NBMA addresses;
//! - raw socket → `recvmmsg` → outer IPv4 + GRE checks → NHRP to the agent, data to the
//!   TUN, or (hub) re-encapsulated in place and sent to another spoke.
//!
//! Offloads (`UserspaceConfig::offload`, default on): the TUN is opened with
//! IFF_VNET_HDR and TSO/checksum offload, so the kernel hands over TCP super-packets of up
//! to 64 KiB in one read; tun-rs splits them into MTU-sized segments (`recv_multiple`)
//! straight into the batch buffers, behind our GRE headroom. In the other direction the
//! decapsulated packets of a batch are coalesced (GRO, `send_multiple`) before they are
//! written, so a TCP stream costs one TUN write per batch instead of one per packet. The
//! raw sockets (GRE, ESP) have no segmentation offload: each segment is one `sendmmsg`
//! entry and one trip through the underlay stack. ESP-in-UDP has: the sealed segments of
//! a super-packet leave as one UDP GSO datagram, and the 4500 socket receives bursts
//! coalesced (UDP GRO), which roughly halves the CPU per byte. If the kernel refuses the
//! offload flags, the data plane falls back to plain reads and writes.

pub mod esp;
mod mmsg;
mod netlink;
pub(crate) mod path;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tun_rs::AsyncDevice;

use crate::counters::{AtomicCounters, Batch, DropReason, Field};
use crate::events::{DEDUPE_WINDOW, Event};
use crate::gre::{self, GreHeader};
use crate::tables::Tables;
use crate::{BoxFuture, Counters, DataPlane, DataPlaneError};
use dmvpn_esp::{ESP_HEADROOM, EspError, InboundSa, OutboundSa};
use esp::{SaInfo, SaTables, Wire, lock};
use netlink::Netlink;
use path::{HEADROOM, PathConfig, RxAction, TaskState, TunAction};

/// Packets per receive batch on the raw socket (one `recvmmsg`).
pub const BATCH: usize = 32;
/// Packets per TUN batch: one offloaded read can yield up to 64 KiB / MTU segments.
const TUN_BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;
/// The most packets one `sendmmsg` call carries.
const MAX_SEND: usize = mmsg::MAX_MSGS;
const _: () = assert!(TUN_BATCH <= MAX_SEND && BATCH <= MAX_SEND);
/// TUN buffer per packet beyond the headroom: the MTU, but at least a jumbo frame, so an
/// MTU raised later by hand does not truncate packets.
const TUN_MIN_BUF: usize = 9216;
/// Receive buffer per packet: the largest IPv4 datagram, so nothing is ever truncated.
const RX_BUF: usize = 65_535;
/// Outer IPv4 header without options, as the kernel builds it for our raw socket.
const IPV4_HEADER: u16 = 20;
/// Where a UDP 4500 datagram is received in its buffer: room in front for a new GRE and
/// ESP header when the hub forwards what it decapsulated.
const UDP_RX_OFFSET: usize = 32;
/// Worst-case ESP overhead per packet: header, IV, padding, trailer, ICV and the UDP header
/// of ESP-in-UDP. The overlay MTU is lowered by this much when IPsec is on.
pub const ESP_OVERHEAD: u16 =
    (dmvpn_esp::ESP_HEADROOM + dmvpn_esp::ESP_MAX_TAILROOM + dmvpn_esp::udp::UDP_HEADER_LEN) as u16;

/// IPsec settings of the userspace data plane (ESP transport mode protecting GRE).
#[derive(Debug, Clone)]
pub struct IpsecDataConfig {
    /// Drop GRE arriving in clear, queue NHRP and drop data for peers without an SA
    /// (default true). False only for migrations: clear GRE is still accepted and sent to
    /// peers without an SA.
    pub require: bool,
    /// The UDP 4500 socket bound to the NBMA address, shared with the IKE endpoint. The
    /// data plane receives on it (ESP-in-UDP; IKE datagrams are passed on as
    /// [`Event::Ike`]) and sends ESP-in-UDP from it. `None`: no NAT traversal.
    pub nat_t_socket: Option<Arc<std::net::UdpSocket>>,
}

impl Default for IpsecDataConfig {
    fn default() -> Self {
        Self {
            require: true,
            nat_t_socket: None,
        }
    }
}

/// Configuration of [`UserspaceDataPlane::start`].
#[derive(Debug, Clone)]
pub struct UserspaceConfig {
    /// TUN interface name (at most 15 bytes), e.g. `dmvpn0`.
    pub tun_name: String,
    /// Overlay addresses with their tunnel network, e.g. `10.42.0.2/24` (IPv4 and/or IPv6).
    pub addresses: Vec<IpNet>,
    /// Our underlay (NBMA) address; the raw socket binds to it.
    pub local_nbma: Ipv4Addr,
    /// GRE key (Cisco `tunnel key`); `None` sends and accepts unkeyed GRE only.
    pub gre_key: Option<u32>,
    /// Hub: forward spoke-to-spoke packets in userspace and report them as hairpins.
    pub hub: bool,
    /// Underlay MTU (default 1500).
    pub underlay_mtu: u16,
    /// Further per-packet overhead below GRE, e.g. ESP (default 0).
    pub extra_overhead: u16,
    /// Overrides the computed overlay MTU.
    pub mtu: Option<u16>,
    /// Capacity of the event channel to the agent (default 1024).
    pub event_capacity: usize,
    /// Requested SO_RCVBUF/SO_SNDBUF of the raw socket (default 4 MiB; the kernel caps it
    /// at net.core.rmem_max/wmem_max).
    pub socket_buffer: usize,
    /// Install kernel routes `prefix dev <tun>` for routes outside the tunnel networks
    /// (default true), so the kernel sends that traffic into the TUN.
    pub manage_kernel_routes: bool,
    /// Dedupe window of Hairpin, Miss and Used events (default 1 s).
    pub dedupe_window: Duration,
    /// Metric of those kernel routes (default 1000). An existing route for the same prefix
    /// with a lower metric, such as the underlay default route, is left alone and keeps
    /// precedence: overlay routes must never capture the NBMA addresses (recursive
    /// routing).
    pub kernel_route_metric: u32,
    /// TUN segmentation/coalescing offload (default true; falls back to plain I/O if the
    /// kernel refuses it).
    pub offload: bool,
    /// ESP for every tunnel packet (default off). Set `extra_overhead` to at least
    /// [`ESP_OVERHEAD`] with it.
    pub ipsec: Option<IpsecDataConfig>,
}

impl UserspaceConfig {
    /// Defaults for everything but the interface name, overlay address and NBMA address.
    pub fn new(tun_name: impl Into<String>, address: IpNet, local_nbma: Ipv4Addr) -> Self {
        Self {
            tun_name: tun_name.into(),
            addresses: vec![address],
            local_nbma,
            gre_key: None,
            hub: false,
            underlay_mtu: 1500,
            extra_overhead: 0,
            mtu: None,
            event_capacity: 1024,
            socket_buffer: 4 << 20,
            manage_kernel_routes: true,
            dedupe_window: DEDUPE_WINDOW,
            kernel_route_metric: 1000,
            offload: true,
            ipsec: None,
        }
    }

    /// Overlay MTU: underlay MTU − outer IPv4 (20) − GRE (4, or 8 with a key) − extra
    /// overhead, unless overridden. 1472 for a keyed tunnel over a 1500-byte underlay.
    pub fn effective_mtu(&self) -> u16 {
        self.mtu.unwrap_or_else(|| {
            let gre = GreHeader::with_key(0, self.gre_key).len() as u16;
            self.underlay_mtu
                .saturating_sub(IPV4_HEADER + gre)
                .saturating_sub(self.extra_overhead)
        })
    }

    fn validate(&self) -> Result<(), DataPlaneError> {
        if self.tun_name.is_empty() || self.tun_name.len() > 15 {
            return Err(DataPlaneError::Config(format!(
                "TUN name {:?} must have 1 to 15 bytes",
                self.tun_name
            )));
        }
        if self.addresses.is_empty() {
            return Err(DataPlaneError::Config(
                "at least one overlay address (e.g. 10.42.0.2/24) is required".into(),
            ));
        }
        let mtu = self.effective_mtu();
        if mtu < 576 {
            return Err(DataPlaneError::Config(format!(
                "overlay MTU {mtu} is below 576: raise the underlay MTU or lower the overhead"
            )));
        }
        if self.event_capacity == 0 {
            return Err(DataPlaneError::Config(
                "event_capacity must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// State shared by the packet tasks and the control methods.
struct Shared {
    tables: Tables,
    counters: AtomicCounters,
    sock: AsyncFd<Socket>,
    tun: AsyncDevice,
    /// IFF_VNET_HDR is on: every TUN read and write carries a virtio-net header.
    offload: bool,
    mtu: u16,
    path: PathConfig,
    /// IPsec on: raw IP protocol 50 socket, optional UDP 4500 socket, the SA tables.
    ipsec: Option<Ipsec>,
    /// For NeedSa events raised by the control path (NHRP sends).
    events: mpsc::Sender<Event>,
}

struct Ipsec {
    esp: AsyncFd<Socket>,
    udp: Option<(AsyncFd<Socket>, SocketAddr)>,
    /// UDP GSO works on the UDP socket (cleared on the first refusal).
    udp_gso: AtomicBool,
    sas: SaTables,
    require: bool,
}

/// The userspace data plane. Dropping it stops its tasks and removes the TUN device.
pub struct UserspaceDataPlane {
    shared: Arc<Shared>,
    netlink: Netlink,
    tasks: Vec<JoinHandle<()>>,
    mtu: u16,
    networks: Vec<IpNet>,
    manage_kernel_routes: bool,
    ifindex: u32,
}

impl std::fmt::Debug for UserspaceDataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserspaceDataPlane")
            .field("ifindex", &self.ifindex)
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

impl Drop for UserspaceDataPlane {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn register(sock: Socket) -> Result<AsyncFd<Socket>, DataPlaneError> {
    // SAFETY: the socket2 `Socket` owns its descriptor, which stays open and unchanged
    // until the `AsyncFd` (its owner) is dropped.
    unsafe { AsyncFd::register(sock) }.map_err(|e| DataPlaneError::Socket {
        source: e.into_parts().1,
    })
}

fn open_socket(cfg: &UserspaceConfig, proto: i32) -> io::Result<Socket> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(proto)))?;
    sock.set_nonblocking(true)?;
    sock.bind(&SockAddr::from(SocketAddrV4::new(cfg.local_nbma, 0)))?;
    sock.set_ttl_v4(64)?;
    // SO_*BUFFORCE (CAP_NET_ADMIN) may exceed net.core.rmem_max/wmem_max; fall back to
    // the capped variants without it.
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(&sock, sockopt::RcvBufForce, &cfg.socket_buffer).is_err() {
        sock.set_recv_buffer_size(cfg.socket_buffer)?;
    }
    if setsockopt(&sock, sockopt::SndBufForce, &cfg.socket_buffer).is_err() {
        sock.set_send_buffer_size(cfg.socket_buffer)?;
    }
    let got = sock.recv_buffer_size()?;
    if got < cfg.socket_buffer {
        tracing::info!(
            requested = cfg.socket_buffer,
            got,
            "raw socket receive buffer capped by net.core.rmem_max"
        );
    }
    Ok(sock)
}

impl UserspaceDataPlane {
    /// Creates the TUN device (address, MTU, link up), opens the raw GRE socket and starts
    /// the packet tasks on the current tokio runtime. Everything is created in the
    /// caller's network namespace.
    pub async fn start(
        cfg: UserspaceConfig,
    ) -> Result<(Arc<Self>, mpsc::Receiver<Event>), DataPlaneError> {
        cfg.validate()?;
        let mtu = cfg.effective_mtu();
        let tun_err = |source| DataPlaneError::Tun {
            name: cfg.tun_name.clone(),
            source,
        };
        // IFF_NO_PI is tun-rs's default on Linux (packet_information = false).
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(&cfg.tun_name)
                .mtu(mtu)
                .offload(offload)
                .build_async()
        };
        let (tun, offload) = match build(cfg.offload) {
            Ok(t) => (t, cfg.offload),
            Err(e) if cfg.offload => {
                tracing::warn!(error = %e, "TUN offload unavailable; using plain TUN I/O");
                (build(false).map_err(tun_err)?, false)
            }
            Err(e) => return Err(tun_err(e)),
        };
        let ifindex = tun.if_index().map_err(tun_err)?;
        let netlink = Netlink::open(ifindex, cfg.kernel_route_metric)?;
        netlink.configure(&cfg.addresses).await?;
        if std::path::Path::new("/sys/module/ip_gre").exists() {
            // ip_gre sees every GRE packet too (raw sockets get a copy) and answers those
            // that match none of its tunnels with ICMP port unreachable (rate-limited).
            tracing::warn!(
                "the ip_gre kernel module is loaded: the kernel will answer received GRE \
                 packets with ICMP port unreachable; prefer the kernel data plane on this host \
                 or unload ip_gre"
            );
        }
        let sock = open_socket(&cfg, libc::IPPROTO_GRE)
            .map_err(|source| DataPlaneError::Socket { source })?;
        let sock = register(sock)?;
        let ipsec = match &cfg.ipsec {
            None => None,
            Some(ic) => {
                let esp = open_socket(&cfg, libc::IPPROTO_ESP)
                    .map_err(|source| DataPlaneError::Socket { source })?;
                let udp = match &ic.nat_t_socket {
                    None => None,
                    Some(u) => {
                        let io = |source| DataPlaneError::Socket { source };
                        let local = u.local_addr().map_err(io)?;
                        let dup = Socket::from(u.try_clone().map_err(io)?);
                        dup.set_nonblocking(true).map_err(io)?;
                        // UDP GRO: a burst of ESP-in-UDP datagrams (a GSO send from the
                        // peer) arrives as one buffer, split in `rx_loop`. Optional.
                        use nix::sys::socket::{setsockopt, sockopt};
                        if let Err(e) = setsockopt(&dup, sockopt::UdpGroSegment, &true) {
                            tracing::info!(error = %e, "UDP GRO unavailable on the 4500 socket");
                        }
                        Some((register(dup)?, local))
                    }
                };
                Some(Ipsec {
                    esp: register(esp)?,
                    udp,
                    udp_gso: AtomicBool::new(true),
                    sas: SaTables::default(),
                    require: ic.require,
                })
            }
        };
        let has_udp = ipsec.as_ref().is_some_and(|i| i.udp.is_some());
        let has_esp = ipsec.is_some();

        let (tx, rx) = mpsc::channel(cfg.event_capacity);
        let shared = Arc::new(Shared {
            tables: Tables::new(),
            counters: AtomicCounters::default(),
            sock,
            tun,
            offload,
            mtu,
            path: PathConfig {
                local_nbma: cfg.local_nbma,
                key: cfg.gre_key,
                hub: cfg.hub,
                local_addrs: cfg.addresses.iter().map(IpNet::addr).collect(),
                require_ipsec: cfg.ipsec.as_ref().is_some_and(|i| i.require),
            },
            ipsec,
            events: tx.clone(),
        });
        let tun_task = tokio::spawn(tun_loop(
            shared.clone(),
            TaskState::new("tun", tx.clone(), cfg.dedupe_window),
        ));
        let rx_task = tokio::spawn(rx_loop(
            shared.clone(),
            TaskState::new("gre-rx", tx.clone(), cfg.dedupe_window),
            RxKind::Gre,
        ));
        let mut tasks = vec![tun_task, rx_task];
        if has_esp {
            tasks.push(tokio::spawn(rx_loop(
                shared.clone(),
                TaskState::new("esp-rx", tx.clone(), cfg.dedupe_window),
                RxKind::Esp,
            )));
        }
        if has_udp {
            tasks.push(tokio::spawn(rx_loop(
                shared.clone(),
                TaskState::new("udp4500-rx", tx, cfg.dedupe_window),
                RxKind::Udp,
            )));
        }
        tracing::info!(
            tun = %cfg.tun_name, mtu, nbma = %cfg.local_nbma, key = ?cfg.gre_key, hub = cfg.hub, offload,
            ipsec = has_esp, nat_t = has_udp,
            "userspace data plane started"
        );
        let dp = Arc::new(Self {
            shared,
            netlink,
            tasks,
            mtu,
            networks: cfg.addresses.iter().map(IpNet::trunc).collect(),
            manage_kernel_routes: cfg.manage_kernel_routes,
            ifindex,
        });
        Ok((dp, rx))
    }

    /// Interface index of the TUN device.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Whether the kernel already routes `prefix` into the TUN (it lies in a tunnel
    /// network, which has a connected route).
    fn connected(&self, prefix: &IpNet) -> bool {
        self.networks.iter().any(|n| n.contains(prefix))
    }

    async fn send_nhrp_impl(&self, dst: IpAddr, bytes: &[u8]) -> Result<(), DataPlaneError> {
        let IpAddr::V4(dst4) = dst else {
            return Err(DataPlaneError::Unsupported {
                addr: dst,
                why: "the userspace data plane has an IPv4 underlay only",
            });
        };
        let max = usize::from(self.mtu);
        if bytes.len() > max {
            return Err(DataPlaneError::TooBig {
                len: bytes.len(),
                max,
            });
        }
        let hdr = GreHeader::with_key(gre::PROTO_NHRP, self.shared.path.key);
        let pkt = hdr.to_packet(bytes);
        let mut b = Batch::default();
        let out = match &self.shared.ipsec {
            None => self.send_raw(&self.shared.sock, &pkt, dst4, 0).await,
            Some(ip) => {
                let entry = ip.sas.load().out.get(&dst4).cloned();
                match entry {
                    Some(e) => {
                        let mut esp = Vec::with_capacity(dmvpn_esp::sealed_len(pkt.len()));
                        let sealed = lock(&e.sa).seal_to_vec(
                            Instant::now(),
                            dmvpn_esp::NEXT_HEADER_GRE,
                            &pkt,
                            &mut esp,
                        );
                        match sealed {
                            Ok(_) => {
                                b.add(Field::EspTx, 1);
                                self.send_wire(ip, e.wire, &esp).await
                            }
                            Err(e) => {
                                b.drop(DropReason::NoSa);
                                self.need_sa(dst4);
                                Err(DataPlaneError::Config(format!(
                                    "sealing NHRP for {dst4}: {e}; waiting for a new SA"
                                )))
                            }
                        }
                    }
                    None if ip.require => {
                        if ip.sas.enqueue(dst4, bytes) {
                            b.add(Field::NhrpQueued, 1);
                            self.need_sa(dst4);
                            self.shared.counters.flush(&mut b);
                            return Ok(());
                        }
                        b.drop(DropReason::NhrpQueueFull);
                        self.need_sa(dst4);
                        self.shared.counters.flush(&mut b);
                        return Err(DataPlaneError::Config(format!(
                            "NHRP queue for {dst4} is full while its IPsec SA is negotiated"
                        )));
                    }
                    None => self.send_raw(&self.shared.sock, &pkt, dst4, 0).await,
                }
            }
        };
        match &out {
            Ok(()) => {
                b.add(Field::NhrpTx, 1);
                b.add(Field::TxPackets, 1);
                b.add(Field::TxBytes, pkt.len() as u64);
            }
            Err(DataPlaneError::Socket { .. }) => b.drop(DropReason::SendError),
            Err(_) => {}
        }
        self.shared.counters.flush(&mut b);
        out
    }

    fn need_sa(&self, peer: Ipv4Addr) {
        let mut b = Batch::default();
        match self.shared.events.try_send(Event::NeedSa {
            nbma: IpAddr::V4(peer),
        }) {
            Ok(()) => b.add(Field::EventsSent, 1),
            Err(_) => b.drop(DropReason::EventQueueFull),
        }
        self.shared.counters.flush(&mut b);
    }

    async fn send_raw(
        &self,
        sock: &AsyncFd<Socket>,
        pkt: &[u8],
        to: Ipv4Addr,
        port: u16,
    ) -> Result<(), DataPlaneError> {
        let addr = SockAddr::from(SocketAddrV4::new(to, port));
        sock.async_io(tokio::io::Interest::WRITABLE, |s| s.send_to(pkt, &addr))
            .await
            .map(|_| ())
            .map_err(|source| DataPlaneError::Socket { source })
    }

    async fn send_wire(&self, ip: &Ipsec, wire: Wire, esp: &[u8]) -> Result<(), DataPlaneError> {
        match (wire, &ip.udp) {
            (Wire::Raw(to), _) => self.send_raw(&ip.esp, esp, to, 0).await,
            (Wire::Udp(to), Some((udp, _))) => self.send_raw(udp, esp, *to.ip(), to.port()).await,
            (Wire::Udp(to), None) => Err(DataPlaneError::Config(format!(
                "ESP-in-UDP to {to} without a UDP 4500 socket"
            ))),
        }
    }

    fn ipsec(&self) -> Result<&Ipsec, DataPlaneError> {
        self.shared
            .ipsec
            .as_ref()
            .ok_or_else(|| DataPlaneError::Config("IPsec is not enabled in this data plane".into()))
    }

    /// Whether the data plane runs ESP.
    pub fn ipsec_enabled(&self) -> bool {
        self.shared.ipsec.is_some()
    }

    /// Installs an inbound SA of `peer` (its NBMA address). Several may exist per peer (a
    /// rekeyed SA stays until its successor carries traffic and IKE deletes it).
    pub fn install_inbound(&self, peer: IpAddr, sa: InboundSa) -> Result<(), DataPlaneError> {
        let peer = v4_only(peer)?;
        self.ipsec()?.sas.install_inbound(peer, sa);
        Ok(())
    }

    /// Installs (or replaces) the outbound SA of `peer`; `udp_port` is the peer's ESP-in-UDP
    /// port when NAT traversal is in use. NHRP packets queued for the peer stay queued until
    /// [`Self::flush_nhrp`]: the caller gives the peer a moment to install its inbound half.
    pub fn install_outbound(
        &self,
        peer: IpAddr,
        sa: OutboundSa,
        udp_port: Option<u16>,
    ) -> Result<(), DataPlaneError> {
        let peer4 = v4_only(peer)?;
        let ip = self.ipsec()?;
        let wire = match udp_port {
            Some(port) if ip.udp.is_some() => Wire::Udp(SocketAddrV4::new(peer4, port)),
            Some(_) => {
                return Err(DataPlaneError::Config(
                    "the SA uses ESP-in-UDP but the data plane has no UDP 4500 socket".into(),
                ));
            }
            None => Wire::Raw(peer4),
        };
        ip.sas.install_outbound(peer4, sa, wire);
        Ok(())
    }

    /// Sends the NHRP packets queued for `peer` (through its SA, or queued again if it has
    /// none); returns how many were taken from the queue.
    pub async fn flush_nhrp(&self, peer: IpAddr) -> Result<usize, DataPlaneError> {
        let peer4 = v4_only(peer)?;
        let ip = self.ipsec()?;
        let queued = ip.sas.take_queue(peer4);
        let n = queued.len();
        if n > 0 {
            let mut b = Batch::default();
            b.add(Field::NhrpDequeued, n as u64);
            self.shared.counters.flush(&mut b);
        }
        for bytes in queued {
            self.send_nhrp_impl(peer, &bytes).await?;
        }
        Ok(n)
    }

    /// Removes an inbound SA; false if there was none with this SPI.
    pub fn remove_inbound(&self, spi: u32) -> bool {
        self.shared
            .ipsec
            .as_ref()
            .is_some_and(|ip| ip.sas.remove_inbound(spi))
    }

    /// Removes `peer`'s outbound SA if it is `spi` (or whatever it is, with `None`).
    pub fn remove_outbound(&self, peer: IpAddr, spi: Option<u32>) -> bool {
        let (Some(ip), IpAddr::V4(p)) = (&self.shared.ipsec, peer) else {
            return false;
        };
        ip.sas.remove_outbound(p, spi)
    }

    /// Removes every SA of `peer` and drops its queued NHRP packets; returns the SA count.
    pub fn remove_peer_sas(&self, peer: IpAddr) -> usize {
        let (Some(ip), IpAddr::V4(p)) = (&self.shared.ipsec, peer) else {
            return 0;
        };
        ip.sas.remove_peer(p)
    }

    /// Whether `peer` has an outbound SA.
    pub fn has_outbound_sa(&self, peer: IpAddr) -> bool {
        let (Some(ip), IpAddr::V4(p)) = (&self.shared.ipsec, peer) else {
            return false;
        };
        ip.sas.load().out.contains_key(&p)
    }

    /// NHRP packets waiting for `peer`'s SA.
    pub fn queued_nhrp(&self, peer: IpAddr) -> usize {
        let (Some(ip), IpAddr::V4(p)) = (&self.shared.ipsec, peer) else {
            return 0;
        };
        ip.sas.queued(p)
    }

    /// Peers whose outbound SA asks for a rekey (a soft byte, packet or sequence number
    /// limit was reached).
    pub fn rekey_needed(&self) -> Vec<IpAddr> {
        let Some(ip) = &self.shared.ipsec else {
            return Vec::new();
        };
        ip.sas
            .load()
            .out
            .iter()
            .filter(|(_, e)| lock(&e.sa).rekey_needed())
            .map(|(p, _)| IpAddr::V4(*p))
            .collect()
    }

    /// Every installed SA with its counters, for `show`.
    pub fn sas(&self) -> Vec<SaInfo> {
        self.shared
            .ipsec
            .as_ref()
            .map(|ip| ip.sas.infos())
            .unwrap_or_default()
    }
}

fn v4_only(a: IpAddr) -> Result<Ipv4Addr, DataPlaneError> {
    match a {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(_) => Err(DataPlaneError::Unsupported {
            addr: a,
            why: "the userspace data plane has an IPv4 underlay only",
        }),
    }
}

impl DataPlane for UserspaceDataPlane {
    fn set_neighbor(
        &self,
        proto: IpAddr,
        nbma: IpAddr,
    ) -> BoxFuture<'_, Result<(), DataPlaneError>> {
        Box::pin(async move {
            if nbma.is_ipv6() {
                return Err(DataPlaneError::Unsupported {
                    addr: nbma,
                    why: "the userspace data plane has an IPv4 underlay only",
                });
            }
            self.shared.tables.set_neighbor(proto, nbma);
            Ok(())
        })
    }

    fn del_neighbor(&self, proto: IpAddr) -> BoxFuture<'_, Result<(), DataPlaneError>> {
        Box::pin(async move {
            self.shared.tables.del_neighbor(proto);
            Ok(())
        })
    }

    fn set_route(
        &self,
        prefix: IpNet,
        next_hop: IpAddr,
    ) -> BoxFuture<'_, Result<(), DataPlaneError>> {
        Box::pin(async move {
            let prefix = prefix.trunc();
            if self.manage_kernel_routes && !self.connected(&prefix) {
                self.netlink.route_add(prefix).await?;
            }
            self.shared.tables.set_route(prefix, next_hop);
            Ok(())
        })
    }

    fn del_route(&self, prefix: IpNet) -> BoxFuture<'_, Result<(), DataPlaneError>> {
        Box::pin(async move {
            let prefix = prefix.trunc();
            self.shared.tables.del_route(prefix);
            if self.manage_kernel_routes && !self.connected(&prefix) {
                self.netlink.route_del(prefix).await?;
            }
            Ok(())
        })
    }

    fn set_nhs(&self, nhs: Vec<IpAddr>) -> BoxFuture<'_, Result<(), DataPlaneError>> {
        Box::pin(async move {
            self.shared.tables.set_nhs(&nhs);
            Ok(())
        })
    }

    fn send_nhrp<'a>(
        &'a self,
        dst_nbma: IpAddr,
        bytes: &'a [u8],
    ) -> BoxFuture<'a, Result<(), DataPlaneError>> {
        Box::pin(self.send_nhrp_impl(dst_nbma, bytes))
    }

    fn counters(&self) -> Counters {
        self.shared.counters.snapshot()
    }

    fn mtu(&self) -> u16 {
        self.mtu
    }

    fn neighbors(&self) -> Vec<(IpAddr, IpAddr)> {
        self.shared.tables.load().neighbors()
    }

    fn routes(&self) -> Vec<(IpNet, IpAddr)> {
        self.shared.tables.load().routes()
    }
}

/// A packet staged for `sendmmsg`: `bufs[buf][start..end]` to `to:port` (port 0 on raw
/// sockets).
#[derive(Debug, Clone, Copy)]
struct Staged {
    buf: usize,
    start: usize,
    end: usize,
    to: Ipv4Addr,
    port: u16,
}

/// Sends the staged packets on `sock` with as few `sendmmsg` calls as the socket allows. A
/// packet the kernel refuses is counted and skipped; the rest of the batch still goes out.
async fn send_staged(
    sock: &AsyncFd<Socket>,
    bufs: &[Box<[u8]>],
    staged: &[Staged],
    st: &mut TaskState,
    gso: Option<&AtomicBool>,
) {
    // With UDP GRO on the receive side a batch can hold more packets than one call takes.
    if staged.len() > MAX_SEND {
        for chunk in staged.chunks(MAX_SEND) {
            Box::pin(send_staged(sock, bufs, chunk, st, gso)).await;
        }
        return;
    }
    let n = staged.len();
    if n == 0 {
        return;
    }
    let unspecified = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
    let msgs: [(&[u8], SocketAddrV4); MAX_SEND] = std::array::from_fn(|i| {
        staged.get(i).map_or((&[][..], unspecified), |s| {
            let pkt = bufs
                .get(s.buf)
                .and_then(|b| b.get(s.start..s.end))
                .unwrap_or(&[]);
            (pkt, SocketAddrV4::new(s.to, s.port))
        })
    });
    let mut done = 0;
    while done < n {
        let Some(rest) = msgs.get(done..n) else {
            return;
        };
        let mut guard = match sock.writable().await {
            Ok(g) => g,
            Err(e) => {
                for (_, to) in rest {
                    st.drop_pkt(DropReason::SendError, Some(IpAddr::V4(*to.ip())), &e);
                }
                return;
            }
        };
        let use_gso = gso.is_some_and(|g| g.load(Ordering::Relaxed));
        let r = guard.try_io(|fd| {
            if use_gso {
                mmsg::send_v4_gso(fd.as_fd(), rest)
            } else {
                mmsg::send_v4(fd.as_fd(), rest)
            }
        });
        match r {
            Ok(Err(e)) if use_gso && gso_unsupported(&e) => {
                // This kernel or route cannot segment UDP (e.g. an xfrm policy on the
                // route): send datagram by datagram from now on.
                tracing::info!(error = %e, "UDP GSO refused; sending ESP-in-UDP unsegmented");
                if let Some(g) = gso {
                    g.store(false, Ordering::Relaxed);
                }
            }
            Ok(Ok(sent)) => {
                for (pkt, _) in rest.iter().take(sent) {
                    st.batch.add(Field::TxPackets, 1);
                    st.batch.add(Field::TxBytes, pkt.len() as u64);
                }
                // sendmmsg returns at least 1 on success; guard against a zero anyway.
                done += sent.max(1);
            }
            Ok(Err(e)) => {
                // The error belongs to the first unsent packet (EMSGSIZE, ENOBUFS, ...).
                let to = rest.first().map(|(_, to)| IpAddr::V4(*to.ip()));
                st.drop_pkt(DropReason::SendError, to, &e);
                done += 1;
            }
            Err(_would_block) => {}
        }
    }
}

/// Errors of a UDP GSO send that mean "not supported here" rather than "this datagram".
fn gso_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// Sends GRE packets: in clear, or sealed in place with each peer's outbound SA and split
/// by how the SA leaves (raw ESP or ESP-in-UDP).
async fn send_gre(
    shared: &Shared,
    bufs: &mut [Box<[u8]>],
    staged: &[Staged],
    out: &mut Scratch,
    st: &mut TaskState,
) {
    let Some(ip) = &shared.ipsec else {
        send_staged(&shared.sock, bufs, staged, st, None).await;
        return;
    };
    let Scratch { raw, udp, clear } = out;
    raw.clear();
    udp.clear();
    clear.clear();
    {
        let now = Instant::now();
        let sas = ip.sas.load();
        // The SA of the previous packet stays locked while consecutive packets use it.
        let mut run: Option<(
            Ipv4Addr,
            &esp::OutEntry,
            std::sync::MutexGuard<'_, OutboundSa>,
        )> = None;
        for s in staged {
            let Some(e) = sas.out.get(&s.to) else {
                if ip.require {
                    st.drop_pkt(
                        DropReason::NoSa,
                        Some(IpAddr::V4(s.to)),
                        &format_args!("no IPsec SA with {} yet; IKE is started", s.to),
                    );
                    st.need_sa(s.to, now);
                } else {
                    clear.push(*s);
                }
                continue;
            };
            if run.as_ref().is_none_or(|(p, ..)| *p != s.to) {
                run = Some((s.to, e.as_ref(), lock(&e.sa)));
            }
            let Some((_, entry, sa)) = run.as_mut() else {
                continue;
            };
            let Some(esp_start) = s.start.checked_sub(ESP_HEADROOM) else {
                st.drop_pkt(DropReason::EspInvalid, None, &"no room for the ESP header");
                continue;
            };
            let Some(buf) = bufs.get_mut(s.buf).and_then(|b| b.get_mut(esp_start..)) else {
                continue;
            };
            match sa.seal_in_place(now, dmvpn_esp::NEXT_HEADER_GRE, buf, s.end - s.start) {
                Ok(len) => {
                    st.batch.add(Field::EspTx, 1);
                    let (to, port, list) = match entry.wire {
                        Wire::Raw(a) => (a, 0, &mut *raw),
                        Wire::Udp(a) => (*a.ip(), a.port(), &mut *udp),
                    };
                    list.push(Staged {
                        buf: s.buf,
                        start: esp_start,
                        end: esp_start + len,
                        to,
                        port,
                    });
                }
                Err(e) => {
                    let reason = match e {
                        EspError::LifetimeExpired { .. } => DropReason::NoSa,
                        _ => DropReason::EspInvalid,
                    };
                    st.drop_pkt(reason, Some(IpAddr::V4(s.to)), &e);
                    if reason == DropReason::NoSa {
                        st.need_sa(s.to, now);
                    }
                }
            }
        }
    }
    send_staged(&ip.esp, bufs, raw, st, None).await;
    send_staged(&shared.sock, bufs, clear, st, None).await;
    if let Some((sock, _)) = &ip.udp {
        send_staged(sock, bufs, udp, st, Some(&ip.udp_gso)).await;
    }
}

/// Preallocated lists of packets to send, by socket.
struct Scratch {
    raw: Vec<Staged>,
    udp: Vec<Staged>,
    clear: Vec<Staged>,
}

impl Scratch {
    fn new(cap: usize) -> Self {
        Self {
            raw: Vec::with_capacity(cap),
            udp: Vec::with_capacity(cap),
            clear: Vec::with_capacity(cap),
        }
    }
}

/// Reads one batch from the TUN into `bufs[i][HEADROOM..]`, filling `lens`. Without
/// offload the first read waits and the following ones only drain what is queued; with
/// offload one read yields all segments of a super-packet.
async fn read_tun_batch(
    shared: &Shared,
    vnet: &mut [u8],
    bufs: &mut [Box<[u8]>],
    lens: &mut [usize],
    errors_logged: &mut bool,
) -> usize {
    if shared.offload {
        return match shared.tun.recv_multiple(vnet, bufs, lens, HEADROOM).await {
            Ok(n) => n,
            Err(e) => {
                if !*errors_logged {
                    *errors_logged = true;
                    tracing::warn!(error = %e, "TUN read failed (logged once)");
                }
                0
            }
        };
    }
    let mut n = 0;
    for (i, (buf, len)) in bufs.iter_mut().zip(lens.iter_mut()).enumerate() {
        let Some(room) = buf.get_mut(HEADROOM..) else {
            break;
        };
        let r = if i == 0 {
            shared.tun.recv(room).await
        } else {
            shared.tun.try_recv(room)
        };
        match r {
            Ok(l) => {
                *len = l;
                n += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                if !*errors_logged {
                    *errors_logged = true;
                    tracing::warn!(error = %e, "TUN read failed (logged once)");
                }
                break;
            }
        }
    }
    n
}

/// TUN → GRE (→ ESP): read a batch, encapsulate in place, send with `sendmmsg`.
async fn tun_loop(shared: Arc<Shared>, mut st: TaskState) {
    // Room after the packet for the ESP trailer and ICV.
    let buf_len = HEADROOM + usize::from(shared.mtu).max(TUN_MIN_BUF) + dmvpn_esp::ESP_MAX_TAILROOM;
    let mut bufs: Vec<Box<[u8]>> = (0..TUN_BATCH)
        .map(|_| vec![0u8; buf_len].into_boxed_slice())
        .collect();
    let mut lens = vec![0usize; TUN_BATCH];
    // Offload: the raw read (virtio-net header + up to 64 KiB) before segmentation.
    let mut vnet = vec![
        0u8;
        if shared.offload {
            tun_rs::VIRTIO_NET_HDR_LEN + 65_535
        } else {
            0
        }
    ];
    let mut staged: Vec<Staged> = Vec::with_capacity(TUN_BATCH);
    let mut scratch = Scratch::new(TUN_BATCH);
    let mut errors_logged = false;
    loop {
        let n = read_tun_batch(&shared, &mut vnet, &mut bufs, &mut lens, &mut errors_logged).await;
        if n == 0 {
            // Only after an error: do not spin on a persistent one.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        staged.clear();
        {
            let now = Instant::now();
            let snap = shared.tables.load();
            for (i, (buf, len)) in bufs.iter_mut().zip(lens.iter()).take(n).enumerate() {
                // With offload the segment may end close to the buffer end: keep the ESP
                // tail room free.
                let room = buf.len().saturating_sub(dmvpn_esp::ESP_MAX_TAILROOM);
                let Some(buf) = buf.get_mut(..room) else {
                    continue;
                };
                if let TunAction::Send { start, end, to } =
                    path::tun_packet(&shared.path, &snap, buf, *len, now, &mut st)
                {
                    staged.push(Staged {
                        buf: i,
                        start,
                        end,
                        to,
                        port: 0,
                    });
                }
            }
        }
        send_gre(&shared, &mut bufs, &staged, &mut scratch, &mut st).await;
        shared.counters.flush(&mut st.batch);
    }
}

/// Which receive socket an `rx_loop` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxKind {
    /// Raw IP protocol 47: GRE in clear.
    Gre,
    /// Raw IP protocol 50: ESP.
    Esp,
    /// UDP 4500: ESP-in-UDP, IKE (non-ESP marker) and NAT keepalives.
    Udp,
}

/// Opens ESP packet `buf[start..end]` with the inbound SA of its SPI (locked once per run
/// of packets of one SA); returns the GRE range and the SA's peer.
#[allow(clippy::too_many_arguments)]
fn open_esp<'a>(
    sas: &'a esp::SaSnapshot,
    run: &mut Option<(u32, &'a esp::InEntry, std::sync::MutexGuard<'a, InboundSa>)>,
    buf: &mut [u8],
    start: usize,
    end: usize,
    from: Ipv4Addr,
    now: Instant,
    st: &mut TaskState,
) -> Option<(usize, usize, Ipv4Addr)> {
    let peer = Some(IpAddr::V4(from));
    let pkt = buf.get_mut(start..end)?;
    let Some(spi) = dmvpn_esp::peek_spi(pkt) else {
        st.drop_pkt(DropReason::EspInvalid, peer, &"ESP packet without an SPI");
        return None;
    };
    if run.as_ref().is_none_or(|(s, ..)| *s != spi) {
        *run = None;
        let Some(e) = sas.inb.get(&spi) else {
            st.drop_pkt(
                DropReason::EspUnknownSpi,
                peer,
                &format_args!("no inbound SA with SPI {spi:#010x}"),
            );
            return None;
        };
        *run = Some((spi, e.as_ref(), lock(&e.sa)));
    }
    let (_, entry, sa) = run.as_mut()?;
    match sa.open_in_place(now, pkt) {
        Ok(o) if o.next_header == dmvpn_esp::NEXT_HEADER_GRE => {
            st.batch.add(Field::EspRx, 1);
            if sa.counters().packets == 1 {
                st.emit(Event::SaActive { spi });
            }
            Some((start + o.payload.start, start + o.payload.end, entry.peer))
        }
        // A dummy packet (RFC 4303 §2.6): discard silently.
        Ok(o) if o.next_header == dmvpn_esp::NEXT_HEADER_NONE => None,
        Ok(o) => {
            st.drop_pkt(
                DropReason::EspInvalid,
                peer,
                &format_args!("ESP carries protocol {}, not GRE", o.next_header),
            );
            None
        }
        Err(e) => {
            let reason = match e {
                EspError::Replayed { .. } | EspError::TooOld { .. } => DropReason::EspReplay,
                EspError::AuthFailed => DropReason::EspAuth,
                EspError::UnknownSpi { .. } => DropReason::EspUnknownSpi,
                _ => DropReason::EspInvalid,
            };
            st.drop_pkt(reason, peer, &e);
            None
        }
    }
}

/// GRE (or ESP, or UDP 4500) → TUN (or, on a hub, → another spoke).
async fn rx_loop(shared: Arc<Shared>, mut st: TaskState, kind: RxKind) {
    let sock = match (kind, &shared.ipsec) {
        (RxKind::Gre, _) => &shared.sock,
        (RxKind::Esp, Some(ip)) => &ip.esp,
        (
            RxKind::Udp,
            Some(Ipsec {
                udp: Some((u, _)), ..
            }),
        ) => u,
        _ => return,
    };
    let udp_local = match &shared.ipsec {
        Some(Ipsec {
            udp: Some((_, l)), ..
        }) => *l,
        _ => SocketAddr::from((shared.path.local_nbma, dmvpn_esp::udp::NAT_T_PORT)),
    };
    // UDP datagrams land at UDP_RX_OFFSET: the room in front must not shorten the
    // largest (GRO-coalesced) datagram.
    let mut bufs: Vec<Box<[u8]>> = (0..BATCH)
        .map(|_| vec![0u8; RX_BUF + UDP_RX_OFFSET].into_boxed_slice())
        .collect();
    let mut lens = [0usize; BATCH];
    let mut froms = [SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0); BATCH];
    // UDP GRO: the segment size of each received buffer (0: one datagram).
    let mut segs = [0usize; BATCH];
    // What to do with each packet (several per buffer with UDP GRO): (buffer, action).
    let mut actions: Vec<(usize, RxAction)> = Vec::with_capacity(BATCH);
    let mut staged: Vec<Staged> = Vec::with_capacity(BATCH);
    let mut scratch = Scratch::new(BATCH);
    // Offload: inner packets behind room for the virtio-net header, coalesced by GRO.
    let vhl = tun_rs::VIRTIO_NET_HDR_LEN;
    // GRO appends a flow's segments to its first packet: room for 64 KiB up front, so
    // coalescing never reallocates. More entries are added on demand (UDP GRO can yield
    // more packets than buffers) and kept for later batches.
    let mut tun_out: Vec<Vec<u8>> = if shared.offload {
        (0..BATCH)
            .map(|_| Vec::with_capacity(vhl + RX_BUF))
            .collect()
    } else {
        Vec::new()
    };
    let mut gro = tun_rs::GROTable::new();
    let mut rx_error_logged = false;
    loop {
        let mut guard = match sock.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, ?kind, "waiting on a receive socket failed; stopping");
                return;
            }
        };
        let r = guard.try_io(|fd| match kind {
            RxKind::Udp => mmsg::recv_from_v4(
                fd.as_fd(),
                &mut bufs,
                UDP_RX_OFFSET,
                &mut lens,
                &mut froms,
                &mut segs,
            ),
            _ => mmsg::recv(fd.as_fd(), &mut bufs, &mut lens),
        });
        let n = match r {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                // Unexpected (the socket is non-blocking and reports no ICMP errors): log
                // the first, then back off briefly so a persistent error cannot spin.
                if !rx_error_logged {
                    rx_error_logged = true;
                    tracing::warn!(error = %e, ?kind, "receiving failed (logged once)");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Err(_would_block) => continue,
        };
        drop(guard);
        staged.clear();
        {
            let now = Instant::now();
            let snap = shared.tables.load();
            let sas = shared.ipsec.as_ref().map(|ip| ip.sas.load());
            let mut run = None;
            actions.clear();
            for (i, (((buf, len), from), seg)) in bufs
                .iter_mut()
                .zip(lens.iter())
                .zip(froms.iter())
                .zip(segs.iter())
                .take(n)
                .enumerate()
            {
                let action = &mut RxAction::Skip;
                match (kind, &sas) {
                    (RxKind::Gre, _) => {
                        *action = match buf.get_mut(..*len) {
                            Some(pkt) => path::rx_packet(&shared.path, &snap, pkt, now, &mut st),
                            None => RxAction::Skip,
                        };
                    }
                    (RxKind::Esp, Some(sas)) => {
                        let Some((ihl, total, src)) = path::outer_v4(
                            &shared.path,
                            buf.get(..*len).unwrap_or(&[]),
                            50,
                            &mut st,
                        ) else {
                            continue;
                        };
                        if let Some((gs, ge, peer)) =
                            open_esp(sas, &mut run, buf, ihl, total, src, now, &mut st)
                        {
                            *action =
                                path::rx_gre(&shared.path, &snap, buf, gs, ge, peer, now, &mut st);
                        }
                    }
                    (RxKind::Udp, Some(sas)) => {
                        // Each coalesced datagram in turn (one if no GRO); each opened in
                        // place. A segment's ESP header and the tail of the one before
                        // leave room in front of it for hub forwarding.
                        let total_end = UDP_RX_OFFSET + *len;
                        let seg = if *seg == 0 { *len } else { *seg };
                        let mut start = UDP_RX_OFFSET;
                        loop {
                            let end = start.saturating_add(seg).min(total_end);
                            let Some(payload) = buf.get(start..end) else {
                                break;
                            };
                            let mut action = RxAction::Skip;
                            match dmvpn_esp::udp::classify_udp_4500(payload) {
                                Ok(dmvpn_esp::udp::Udp4500::Keepalive) => {}
                                Ok(dmvpn_esp::udp::Udp4500::Ike(_)) => {
                                    st.batch.add(Field::IkeRx, 1);
                                    st.emit(Event::Ike {
                                        from: SocketAddr::V4(*from),
                                        local: udp_local,
                                        payload: payload.to_vec(),
                                    });
                                }
                                Ok(dmvpn_esp::udp::Udp4500::Esp(_)) => {
                                    if let Some((gs, ge, peer)) = open_esp(
                                        sas,
                                        &mut run,
                                        buf,
                                        start,
                                        end,
                                        *from.ip(),
                                        now,
                                        &mut st,
                                    ) {
                                        action = path::rx_gre(
                                            &shared.path,
                                            &snap,
                                            buf,
                                            gs,
                                            ge,
                                            peer,
                                            now,
                                            &mut st,
                                        );
                                    }
                                }
                                Err(e) => st.drop_pkt(
                                    DropReason::EspInvalid,
                                    Some(IpAddr::V4(*from.ip())),
                                    &e,
                                ),
                            }
                            if action != RxAction::Skip {
                                actions.push((i, action));
                            }
                            if end >= total_end || end <= start {
                                break;
                            }
                            start = end;
                        }
                    }
                    _ => {}
                }
                if *action != RxAction::Skip {
                    actions.push((i, *action));
                }
            }
        }
        let (mut n_out, mut out_bytes) = (0usize, 0u64);
        for &(i, action) in &actions {
            match action {
                RxAction::Skip => {}
                RxAction::Forward { start, end, to } => staged.push(Staged {
                    buf: i,
                    start,
                    end,
                    to,
                    port: 0,
                }),
                RxAction::Tun { start, end } => {
                    let Some(pkt) = bufs.get(i).and_then(|b| b.get(start..end)) else {
                        continue;
                    };
                    if shared.offload {
                        if tun_out.len() <= n_out {
                            tun_out.push(Vec::with_capacity(vhl + 2048));
                        }
                        if let Some(out) = tun_out.get_mut(n_out) {
                            out.clear();
                            out.resize(vhl, 0);
                            out.extend_from_slice(pkt);
                            n_out += 1;
                            out_bytes += pkt.len() as u64;
                        }
                        continue;
                    }
                    let r = match shared.tun.try_send(pkt) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            shared.tun.send(pkt).await
                        }
                        r => r,
                    };
                    match r {
                        Ok(_) => {
                            st.batch.add(Field::TunTxPackets, 1);
                            st.batch.add(Field::TunTxBytes, pkt.len() as u64);
                        }
                        Err(e) => st.drop_pkt(DropReason::TunWriteError, None, &e),
                    }
                }
            }
        }
        if n_out > 0 {
            let out = tun_out.get_mut(..n_out).unwrap_or_default();
            match shared.tun.send_multiple(&mut gro, out, vhl).await {
                Ok(_) => {
                    st.batch.add(Field::TunTxPackets, n_out as u64);
                    st.batch.add(Field::TunTxBytes, out_bytes);
                }
                // tun-rs reports the last failed write of the batch; count one drop.
                Err(e) => st.drop_pkt(DropReason::TunWriteError, None, &e),
            }
        }
        send_gre(&shared, &mut bufs, &staged, &mut scratch, &mut st).await;
        shared.counters.flush(&mut st.batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_mtu_leaves_room_for_ipv4_and_keyed_gre() {
        let mut c = UserspaceConfig::new(
            "dmvpn0",
            "10.42.0.2/24".parse().unwrap(),
            Ipv4Addr::new(198, 51, 100, 2),
        );
        assert_eq!(c.effective_mtu(), 1476);
        c.gre_key = Some(42);
        assert_eq!(c.effective_mtu(), 1472);
        c.extra_overhead = 58;
        assert_eq!(c.effective_mtu(), 1414);
        c.mtu = Some(1400);
        assert_eq!(c.effective_mtu(), 1400);
        assert!(c.validate().is_ok());
        c.tun_name = "a-name-that-is-too-long".into();
        assert!(matches!(c.validate(), Err(DataPlaneError::Config(_))));
    }
}
