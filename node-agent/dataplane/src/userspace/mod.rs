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
//! raw socket has no segmentation offload: each segment is one `sendmmsg` entry. If the
//! kernel refuses the offload flags, the data plane falls back to plain reads and writes.

mod mmsg;
mod netlink;
pub(crate) mod path;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::Arc;
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

fn open_socket(cfg: &UserspaceConfig) -> io::Result<Socket> {
    let sock = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_GRE)),
    )?;
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
        let sock = open_socket(&cfg).map_err(|source| DataPlaneError::Socket { source })?;
        // SAFETY: the socket2 `Socket` owns its descriptor, which stays open and unchanged
        // until the `AsyncFd` (its owner) is dropped.
        let sock = unsafe { AsyncFd::register(sock) }.map_err(|e| DataPlaneError::Socket {
            source: e.into_parts().1,
        })?;

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
            },
        });
        let tun_task = tokio::spawn(tun_loop(
            shared.clone(),
            TaskState::new("tun", tx.clone(), cfg.dedupe_window),
        ));
        let rx_task = tokio::spawn(rx_loop(
            shared.clone(),
            TaskState::new("gre-rx", tx, cfg.dedupe_window),
        ));
        tracing::info!(
            tun = %cfg.tun_name, mtu, nbma = %cfg.local_nbma, key = ?cfg.gre_key, hub = cfg.hub, offload,
            "userspace data plane started"
        );
        let dp = Arc::new(Self {
            shared,
            netlink,
            tasks: vec![tun_task, rx_task],
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
        let hdr = GreHeader::with_key(gre::PROTO_NHRP, self.shared.path.key);
        let max = usize::from(self.mtu);
        if bytes.len() > max {
            return Err(DataPlaneError::TooBig {
                len: bytes.len(),
                max,
            });
        }
        let pkt = hdr.to_packet(bytes);
        let addr = SockAddr::from(SocketAddrV4::new(dst4, 0));
        let res = self
            .shared
            .sock
            .async_io(tokio::io::Interest::WRITABLE, |s| s.send_to(&pkt, &addr))
            .await;
        let mut b = Batch::default();
        let out = match res {
            Ok(_) => {
                b.add(Field::NhrpTx, 1);
                b.add(Field::TxPackets, 1);
                b.add(Field::TxBytes, pkt.len() as u64);
                Ok(())
            }
            Err(source) => {
                b.drop(DropReason::SendError);
                Err(DataPlaneError::Socket { source })
            }
        };
        self.shared.counters.flush(&mut b);
        out
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

/// A packet staged for `sendmmsg`: `bufs[buf][start..end]` to `to`.
#[derive(Debug, Clone, Copy)]
struct Staged {
    buf: usize,
    start: usize,
    end: usize,
    to: Ipv4Addr,
}

/// Sends the staged packets with as few `sendmmsg` calls as the socket allows. A packet
/// the kernel refuses is counted and skipped; the rest of the batch still goes out.
async fn send_staged(shared: &Shared, bufs: &[Box<[u8]>], staged: &[Staged], st: &mut TaskState) {
    let n = staged.len().min(MAX_SEND);
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
            (pkt, SocketAddrV4::new(s.to, 0))
        })
    });
    let mut done = 0;
    while done < n {
        let Some(rest) = msgs.get(done..n) else {
            return;
        };
        let mut guard = match shared.sock.writable().await {
            Ok(g) => g,
            Err(e) => {
                for (_, to) in rest {
                    st.drop_pkt(DropReason::SendError, Some(IpAddr::V4(*to.ip())), &e);
                }
                return;
            }
        };
        match guard.try_io(|fd| mmsg::send_v4(fd.as_fd(), rest)) {
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

/// TUN → GRE: read a batch, encapsulate in place, send with `sendmmsg`.
async fn tun_loop(shared: Arc<Shared>, mut st: TaskState) {
    let buf_len = HEADROOM + usize::from(shared.mtu).max(TUN_MIN_BUF);
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
                if let TunAction::Send { start, end, to } =
                    path::tun_packet(&shared.path, &snap, buf, *len, now, &mut st)
                {
                    staged.push(Staged {
                        buf: i,
                        start,
                        end,
                        to,
                    });
                }
            }
        }
        send_staged(&shared, &bufs, &staged, &mut st).await;
        shared.counters.flush(&mut st.batch);
    }
}

/// GRE → TUN (or, on a hub, → another spoke).
async fn rx_loop(shared: Arc<Shared>, mut st: TaskState) {
    let mut bufs: Vec<Box<[u8]>> = (0..BATCH)
        .map(|_| vec![0u8; RX_BUF].into_boxed_slice())
        .collect();
    let mut lens = [0usize; BATCH];
    let mut actions = [RxAction::Skip; BATCH];
    let mut staged: Vec<Staged> = Vec::with_capacity(BATCH);
    // Offload: inner packets behind room for the virtio-net header, coalesced by GRO.
    let vhl = tun_rs::VIRTIO_NET_HDR_LEN;
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
        let mut guard = match shared.sock.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "waiting on the raw GRE socket failed; stopping");
                return;
            }
        };
        let n = match guard.try_io(|fd| mmsg::recv(fd.as_fd(), &mut bufs, &mut lens)) {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                // Unexpected (the socket is non-blocking and reports no ICMP errors): log
                // the first, then back off briefly so a persistent error cannot spin.
                if !rx_error_logged {
                    rx_error_logged = true;
                    tracing::warn!(error = %e, "receiving on the raw GRE socket failed (logged once)");
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
            for ((buf, len), action) in bufs
                .iter_mut()
                .zip(lens.iter())
                .zip(actions.iter_mut())
                .take(n)
            {
                *action = match buf.get_mut(..*len) {
                    Some(pkt) => path::rx_packet(&shared.path, &snap, pkt, now, &mut st),
                    None => RxAction::Skip,
                };
            }
        }
        let (mut n_out, mut out_bytes) = (0usize, 0u64);
        for (i, action) in actions.iter().take(n).enumerate() {
            match *action {
                RxAction::Skip => {}
                RxAction::Forward { start, end, to } => staged.push(Staged {
                    buf: i,
                    start,
                    end,
                    to,
                }),
                RxAction::Tun { start, end } => {
                    let Some(pkt) = bufs.get(i).and_then(|b| b.get(start..end)) else {
                        continue;
                    };
                    if shared.offload {
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
        send_staged(&shared, &bufs, &staged, &mut st).await;
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
