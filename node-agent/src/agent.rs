//! The run loop: the userspace data plane, the sans-IO NHRP engine, the control socket, the
//! timers and the signals, in one task.
//!
//! Data plane events and control requests feed the engine; after every engine call its
//! transmits go to the data plane and its events program the data plane (neighbours, routes)
//! and the kernel (routes into the TUN). The loop is the only owner of the engine, so every
//! `show` answer is one consistent state.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use dmvpn_dataplane::{self as dp, DataPlane, UserspaceConfig, UserspaceDataPlane};
use dmvpn_nhrp::engine::{self, CacheType, Engine, NhsState};
use ipnet::IpNet;
use serde_json::{Value, json};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

use crate::config::{Config, NbmaSource, Phase, Role, interface_address};
use crate::control::{self, Command};
use crate::ipsec::{Ike, SaChange};
use crate::kernel::Kernel;
use crate::routes::{RouteChange, RouteLayers};
use crate::view::{
    CacheEntryView, CacheView, ClearView, DmvpnView, NhsListView, NhsView, PeerView, TrafficView,
};

/// How often the NBMA interface's address is checked (nbma_interface mode).
const NBMA_POLL: Duration = Duration::from_secs(3);
/// Distinct (reason, peer) pairs whose first drop is logged; beyond, drops are only counted.
const MAX_LOGGED_DROPS: usize = 1024;
/// Shutdown (purges out, routes withdrawn) gets at most this long.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(5);
/// Attempts to recreate the data plane after an NBMA change (the old TUN must vanish first).
const RESTART_ATTEMPTS: u32 = 50;
/// An inbound SA outlives its deletion this long: ESP the peer sent just before its delete
/// reaches the receive task after the agent handled the delete (two sockets, two tasks).
const INBOUND_GRACE: Duration = Duration::from_secs(2);
/// How long a responder waits at most before sending with a new outbound SA, unless the
/// peer's first packet on the paired inbound SA comes earlier (see `SaChange::Up`).
const OUTBOUND_DELAY: Duration = Duration::from_millis(200);

/// Queued NHRP packets go out this long after their peer's outbound SA is installed when we
/// do not know that the peer has its inbound half: it may still be processing the IKE message
/// that completes the SA on its side, and its ESP receive task would drop what arrives before
/// (two sockets, two tasks). When we initiated, the responder installed its SAs before its
/// IKE_AUTH response left; when the peer already sent on the SA, it has it: no wait then.
const NHRP_FLUSH_DELAY: Duration = Duration::from_millis(30);

/// An outbound SA waiting for the peer to use the paired inbound SA, or `OUTBOUND_DELAY`.
struct PendingOut {
    at: Instant,
    spi_in: u32,
    peer: IpAddr,
    sa: dmvpn_esp::OutboundSa,
    udp_port: Option<u16>,
}

/// SIGINT and SIGTERM.
pub struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    /// Installs the handlers; call early so a signal during start-up is not lost.
    pub fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// Waits for either signal and names it.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// Runs the agent until SIGINT/SIGTERM. Errors name what failed and how to fix it.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    let (listener, guard) = control::bind(&cfg.control_socket)?;
    let (ctl_tx, mut ctl_rx) = mpsc::channel(16);
    let server = tokio::spawn(control::serve(listener, ctl_tx));
    let result = async {
        let Some(nbma) = initial_nbma(&cfg, &mut signals, &mut ctl_rx).await? else {
            return Ok(());
        };
        let mut agent = Agent::start(cfg, nbma).await?;
        let res = agent.run(ctl_rx, &mut signals).await;
        agent.stop().await;
        res
    }
    .await;
    server.abort();
    drop(guard);
    result
}

/// The local NBMA address; waits (interruptibly) for the interface to get one. `None` when a
/// signal arrived while waiting.
async fn initial_nbma(
    cfg: &Config,
    signals: &mut Signals,
    ctl_rx: &mut mpsc::Receiver<control::Request>,
) -> anyhow::Result<Option<Ipv4Addr>> {
    let name = match &cfg.nbma {
        NbmaSource::Address(IpAddr::V4(a)) => return Ok(Some(*a)),
        NbmaSource::Address(a @ IpAddr::V6(_)) => {
            bail!("nbma_address {a}: the userspace data plane has an IPv4 underlay only")
        }
        NbmaSource::Interface(name) => name,
    };
    let mut warned = false;
    loop {
        match interface_address(name, true) {
            Ok(Some(IpAddr::V4(a))) => {
                tracing::info!(interface = %name, nbma = %a, "NBMA address from interface");
                return Ok(Some(a));
            }
            other => {
                if !warned {
                    warned = true;
                    let why = match other {
                        Err(e) => e,
                        _ => "no IPv4 address yet".to_owned(),
                    };
                    tracing::warn!(interface = %name, "nbma_interface: {why}; waiting for an address");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(NBMA_POLL) => {}
            // Answer at once rather than let the CLI time out.
            Some(req) = ctl_rx.recv() => {
                let _ = req.reply.send(Err(format!(
                    "the agent is starting: waiting for an IPv4 address on nbma_interface {name}"
                )));
            }
            sig = signals.recv() => {
                tracing::info!("{sig} received while waiting for the NBMA address; exiting");
                return Ok(None);
            }
        }
    }
}

fn dataplane_config(
    cfg: &Config,
    nbma: Ipv4Addr,
    nat_t: Option<Arc<std::net::UdpSocket>>,
) -> UserspaceConfig {
    let mut d = UserspaceConfig::new(cfg.tun_name.clone(), cfg.tunnel_address, nbma);
    if cfg.ipsec.enabled {
        d.ipsec = Some(dp::IpsecDataConfig {
            require: true,
            nat_t_socket: nat_t,
        });
        d.extra_overhead = dp::ESP_OVERHEAD;
    }
    d.gre_key = cfg.gre_key;
    d.hub = cfg.role == Role::Hub;
    d.mtu = cfg.mtu;
    // The agent owns kernel routes (see kernel.rs).
    d.manage_kernel_routes = false;
    d
}

/// The engine configuration for `cfg` with local NBMA address `nbma`.
pub fn engine_config(cfg: &Config, nbma: IpAddr) -> engine::Config {
    let role = match cfg.role {
        Role::Hub => engine::Role::Hub,
        Role::Spoke => engine::Role::Spoke,
    };
    let mut e = engine::Config::new(role, cfg.tunnel_ip(), cfg.tunnel_address.prefix_len(), nbma);
    e.holdtime = cfg.holdtime;
    e.registration_unique = cfg.registration_unique;
    e.phase = match cfg.phase {
        Phase::ONE => engine::Phase::One,
        Phase::TWO => engine::Phase::Two,
        _ => engine::Phase::Three,
    };
    e.local_prefixes = cfg.local_prefixes.clone();
    e.auth = cfg.nhrp_auth.clone();
    e.mtu = cfg.mtu.unwrap_or(0);
    e.nhs = cfg
        .nhs
        .iter()
        .map(|n| engine::NhsConfig {
            tunnel_address: n.tunnel_address,
            nbma_address: n.nbma_address,
            priority: n.priority,
        })
        .collect();
    // Without an NHS (a top-level hub) overlay routes are kernel routes only.
    for r in cfg.overlay_routes.iter().filter(|_| !cfg.nhs.is_empty()) {
        if !e.routes_via_nhs.contains(r) {
            e.routes_via_nhs.push(*r);
        }
    }
    e.redirect_limit.interval = Duration::from_secs(cfg.redirect_rate_limit_secs.into());
    e.initial_request_id = request_id_seed();
    e
}

/// RFC 2332 wants request ids not to repeat across restarts: start from the clock.
fn request_id_seed() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_secs());
    // 256 ids per second of downtime; wraps after ~194 days.
    ((secs << 8) as u32).max(1)
}

/// The data plane and its event channel.
struct Plane {
    dp: Arc<UserspaceDataPlane>,
    events: mpsc::Receiver<dp::Event>,
}

impl Plane {
    async fn start(
        cfg: &Config,
        nbma: Ipv4Addr,
        nat_t: Option<Arc<std::net::UdpSocket>>,
    ) -> anyhow::Result<Plane> {
        let (dp, events) = UserspaceDataPlane::start(dataplane_config(cfg, nbma, nat_t))
            .await
            .context("starting the userspace data plane")?;
        Ok(Plane { dp, events })
    }
}

/// Agent-side counters (shown under `agent` in `show counters`).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct AgentCounters {
    pub control_requests: u64,
    pub dataplane_events: u64,
    pub nhrp_send_errors: u64,
    pub dataplane_errors: u64,
    pub kernel_route_errors: u64,
    pub nbma_changes: u64,
    pub engine_drops: u64,
    /// NHRP packets refused because the sender's certificate does not carry the tunnel
    /// address it claims (per peer in `ike.identity_refused`).
    pub nhrp_identity_refused: u64,
    /// SAs IKE negotiated that the data plane could not install.
    pub sa_install_errors: u64,
}

/// A tunnel neighbour as programmed into the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbor {
    pub nbma: IpAddr,
    pub since: Instant,
}

/// What the loop remembers besides the engine: mirrors of what it programmed (to re-apply
/// after a data plane restart and for `show`) and the times of state changes.
#[derive(Debug)]
pub struct Mirror {
    pub neighbors: BTreeMap<IpAddr, Neighbor>,
    /// Routes as the engine asked for them, in two layers (see routes.rs).
    pub routes: RouteLayers,
    /// Kernel routes installed for engine routes (not the configured overlay routes).
    pub kernel_routes: BTreeSet<IpNet>,
    /// Last NhsUp/NhsDown per NHS.
    pub nhs_since: HashMap<IpAddr, Instant>,
}

impl Mirror {
    /// An empty mirror for an engine with this configuration.
    pub fn new(e: &engine::Config) -> Mirror {
        Mirror {
            neighbors: BTreeMap::new(),
            routes: RouteLayers::new(
                e.routes_via_nhs.iter().copied(),
                e.nhs.iter().map(|n| n.tunnel_address),
            ),
            kernel_routes: BTreeSet::new(),
            nhs_since: HashMap::new(),
        }
    }
}

struct Agent {
    cfg: Config,
    engine: Engine,
    plane: Option<Plane>,
    kernel: Kernel,
    nbma: Ipv4Addr,
    started: Instant,
    mirror: Mirror,
    counters: AgentCounters,
    logged_drops: HashSet<(engine::DropReason, IpAddr)>,
    logged_send_errors: HashSet<IpAddr>,
    logged_error_indications: HashSet<(IpAddr, u16)>,
    nbma_warned: bool,
    /// IKE, when `[ipsec]` is enabled.
    ike: Option<Ike>,
    /// Inbound SAs (SPI) to remove at the given time.
    inbound_gc: Vec<(Instant, u32)>,
    /// Outbound SAs to install at their time.
    pending_out: Vec<PendingOut>,
    /// Peers whose queued NHRP packets go out at the given time.
    nhrp_flush: Vec<(Instant, IpAddr)>,
}

impl Agent {
    async fn start(cfg: Config, nbma: Ipv4Addr) -> anyhow::Result<Agent> {
        let now = Instant::now();
        let ecfg = engine_config(&cfg, IpAddr::V4(nbma));
        let mirror = Mirror::new(&ecfg);
        let engine = Engine::new(ecfg, now).context("NHRP engine configuration")?;
        let ike = if cfg.ipsec.enabled {
            Some(Ike::start(&cfg, nbma, now)?)
        } else {
            tracing::warn!("[ipsec] enabled = false: GRE and NHRP cross the underlay in clear");
            None
        };
        let plane = Plane::start(&cfg, nbma, ike.as_ref().map(Ike::nat_t_socket)).await?;
        let kernel = Kernel::open().map_err(anyhow::Error::msg)?;
        let mut agent = Agent {
            cfg,
            engine,
            plane: Some(plane),
            kernel,
            nbma,
            started: now,
            mirror,
            counters: AgentCounters::default(),
            logged_drops: HashSet::new(),
            logged_send_errors: HashSet::new(),
            logged_error_indications: HashSet::new(),
            nbma_warned: false,
            ike,
            inbound_gc: Vec::new(),
            pending_out: Vec::new(),
            nhrp_flush: Vec::new(),
        };
        agent.program_static().await?;
        agent.pump().await;
        tracing::info!(
            role = %agent.cfg.role,
            tunnel = %agent.cfg.tunnel_address,
            nbma = %nbma,
            phase = agent.cfg.phase.get(),
            nhs = agent.cfg.nhs.len(),
            socket = %agent.cfg.control_socket.display(),
            "agent started"
        );
        Ok(agent)
    }

    /// What does not come from the engine: the NHS set and the kernel routes for the
    /// configured overlay routes.
    async fn program_static(&mut self) -> anyhow::Result<()> {
        let Some(p) = &self.plane else { return Ok(()) };
        p.dp.set_nhs(self.cfg.nhs.iter().map(|n| n.tunnel_address).collect())
            .await
            .context("programming the NHS set")?;
        let ifindex = p.dp.ifindex();
        for r in &self.cfg.overlay_routes {
            self.kernel
                .route_add(*r, ifindex)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    async fn run(
        &mut self,
        mut ctl_rx: mpsc::Receiver<control::Request>,
        signals: &mut Signals,
    ) -> anyhow::Result<()> {
        let watch_nbma = matches!(self.cfg.nbma, NbmaSource::Interface(_));
        let mut nbma_tick = tokio::time::interval(NBMA_POLL);
        nbma_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ike_buf = vec![0u8; 65_535];
        loop {
            let deadline = self.engine.poll_timeout();
            let timer = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                    None => std::future::pending().await,
                }
            };
            let gc = self
                .inbound_gc
                .iter()
                .map(|(t, _)| *t)
                .chain(self.pending_out.iter().map(|p| p.at))
                .chain(self.nhrp_flush.iter().map(|(t, _)| *t))
                .min();
            let ike_deadline = match (self.ike.as_ref().and_then(Ike::poll_timeout), gc) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let ike_timer = async {
                match ike_deadline {
                    Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                    None => std::future::pending().await,
                }
            };
            let ike_sock = self.ike.as_ref().map(Ike::socket500);
            let ike_rx = async {
                match ike_sock {
                    Some(s) => Ike::recv500(s, &mut ike_buf).await,
                    None => std::future::pending().await,
                }
            };
            let Some(plane) = self.plane.as_mut() else {
                bail!("the data plane is gone");
            };
            tokio::select! {
                sig = signals.recv() => {
                    tracing::info!("{sig} received: purging registrations and exiting");
                    return Ok(());
                }
                ev = plane.events.recv() => match ev {
                    Some(ev) => self.on_dataplane_event(ev).await,
                    None => bail!("the data plane stopped unexpectedly (its tasks ended)"),
                },
                req = ctl_rx.recv() => {
                    if let Some(req) = req {
                        self.counters.control_requests += 1;
                        let answer = self.answer(req.command).await;
                        let _ = req.reply.send(answer);
                    }
                }
                () = timer => {
                    self.engine.handle_timeout(Instant::now());
                    self.pump().await;
                }
                () = ike_timer => {
                    let now = Instant::now();
                    if let Some(ike) = self.ike.as_mut()
                        && ike.poll_timeout().is_some_and(|t| t <= now)
                    {
                        ike.handle_timeout(now);
                    }
                    if let (Some(ike), Some(p)) = (self.ike.as_mut(), &self.plane)
                        && ike.limit_check_due(now)
                    {
                        ike.rekey_for_limits(now, &p.dp.rekey_needed());
                    }
                    self.collect_inbound(now);
                    self.install_due(now, None, None).await;
                    self.flush_due(now).await;
                    self.pump_ike().await;
                }
                r = ike_rx => match r {
                    Ok((n, from)) => {
                        if let (Some(ike), Some(data)) = (self.ike.as_mut(), ike_buf.get(..n)) {
                            ike.handle_datagram(Instant::now(), from, None, data);
                        }
                        self.pump_ike().await;
                    }
                    Err(e) => {
                        tracing::debug!("UDP 500 receive: {e}");
                    }
                },
                _ = nbma_tick.tick(), if watch_nbma => self.check_nbma().await?,
            }
        }
    }

    async fn on_dataplane_event(&mut self, ev: dp::Event) {
        self.counters.dataplane_events += 1;
        let now = Instant::now();
        match ev {
            dp::Event::Nhrp { from_nbma, bytes } => {
                if let Some(ike) = self.ike.as_mut()
                    && ike.refused_claim(from_nbma, &bytes).is_some()
                {
                    self.counters.nhrp_identity_refused += 1;
                    return;
                }
                self.engine.handle_packet(now, from_nbma, &bytes);
            }
            dp::Event::SaActive { spi } => {
                self.install_due(now, Some(spi), None).await;
                return;
            }
            dp::Event::NeedSa { nbma } => {
                if let Some(ike) = self.ike.as_mut() {
                    ike.need_sa(now, nbma);
                }
                self.pump_ike().await;
                return;
            }
            dp::Event::Ike {
                from,
                local,
                payload,
            } => {
                if let Some(ike) = self.ike.as_mut() {
                    ike.handle_datagram(now, from, Some(local), &payload);
                }
                self.pump_ike().await;
                return;
            }
            dp::Event::Hairpin {
                src,
                dst,
                ingress_nbma,
                head,
            } => self.engine.hairpinned(now, src, dst, ingress_nbma, &head),
            // Phase 2 resolves on demand; phase 3 waits for the hub's redirect; phase 1 never
            // builds shortcuts.
            dp::Event::Miss { dst, .. } => {
                if self.cfg.phase == Phase::TWO {
                    self.engine.resolve(now, dst);
                } else {
                    return;
                }
            }
            dp::Event::Used { dst, .. } => self.engine.traffic(now, dst),
        }
        self.pump().await;
    }

    /// Sends what the engine wants sent and applies what it decided.
    async fn pump(&mut self) {
        while let Some(t) = self.engine.poll_transmit() {
            let Some(p) = &self.plane else { break };
            if let Err(e) = p.dp.send_nhrp(t.dst_nbma, &t.bytes).await {
                self.counters.nhrp_send_errors += 1;
                if self.logged_send_errors.len() < MAX_LOGGED_DROPS
                    && self.logged_send_errors.insert(t.dst_nbma)
                {
                    tracing::warn!(dst = %t.dst_nbma, "sending NHRP failed: {e} (logged once per destination)");
                }
            }
        }
        while let Some(ev) = self.engine.poll_event() {
            self.apply(ev).await;
        }
    }

    /// Sends IKE's datagrams and applies its SA changes to the data plane.
    async fn pump_ike(&mut self) {
        loop {
            let Some(ike) = self.ike.as_mut() else {
                return;
            };
            let changes = ike.events(Instant::now());
            let idle = changes.is_empty();
            for c in changes {
                self.apply_sa(c).await;
            }
            // Only now: SAs are installed before the messages that complete them leave.
            let sent = self.ike.as_mut().map_or(0, Ike::send);
            if idle && sent == 0 {
                return;
            }
        }
    }

    async fn apply_sa(&mut self, change: SaChange) {
        let Some(p) = &self.plane else { return };
        let now = Instant::now();
        match change {
            SaChange::Up {
                peer,
                keys,
                lifetime,
                use_now,
            } => {
                // The ESP SA outlives IKE's rekey point (90 %) a little, so a rekey that
                // comes late does not cut traffic; IKE deletes it when replaced.
                let life = dmvpn_esp::Lifetime {
                    soft_time: None,
                    hard_time: Some(lifetime + lifetime / 4),
                    ..dmvpn_esp::Lifetime::UNLIMITED
                };
                let res = async {
                    let inb = keys.inbound()?.with_lifetime(life)?.into_inbound(now)?;
                    let out = keys.outbound()?.with_lifetime(life)?.into_outbound(now)?;
                    Ok::<_, dmvpn_esp::ConfigError>((inb, out))
                }
                .await;
                let (inb, out) = match res {
                    Ok(x) => x,
                    Err(e) => {
                        self.counters.sa_install_errors += 1;
                        tracing::warn!(%peer, "CHILD SA keys unusable: {e}");
                        return;
                    }
                };
                // Inbound first: the peer may already send with the new SA.
                if let Err(e) = p.dp.install_inbound(peer, inb) {
                    self.counters.sa_install_errors += 1;
                    tracing::warn!(%peer, "installing the inbound SA: {e}");
                    return;
                }
                let udp_port = keys.udp_encap.map(|(_, remote)| remote);
                if use_now {
                    self.install_outbound(peer, out, udp_port, Duration::ZERO)
                        .await;
                } else {
                    self.pending_out.push(PendingOut {
                        at: now + OUTBOUND_DELAY,
                        spi_in: keys.spi_in,
                        peer,
                        sa: out,
                        udp_port,
                    });
                }
            }
            SaChange::Down {
                peer,
                spi_in,
                spi_out,
            } => {
                self.pending_out.retain(|o| o.sa.spi() != spi_out);
                // A rekey deletes the old SA as soon as the new one exists: its successor
                // takes over now rather than after its delay.
                self.install_due(now, None, Some(peer)).await;
                if let Some(p) = &self.plane {
                    p.dp.remove_outbound(peer, Some(spi_out));
                }
                self.inbound_gc.push((now + INBOUND_GRACE, spi_in));
            }
            SaChange::PeerDown { peer } => {
                self.pending_out.retain(|o| o.peer != peer);
                p.dp.remove_peer_sas(peer);
            }
        }
    }

    /// Installs the delayed outbound SAs whose time has come, whose inbound half `active`
    /// the peer has started to use, or whose peer `replacing` loses its current one.
    async fn install_due(&mut self, now: Instant, active: Option<u32>, replacing: Option<IpAddr>) {
        let (due, rest): (Vec<PendingOut>, Vec<PendingOut>) = std::mem::take(&mut self.pending_out)
            .into_iter()
            .partition(|o| o.at <= now || Some(o.spi_in) == active || Some(o.peer) == replacing);
        self.pending_out = rest;
        for o in due {
            let peer_has_it = Some(o.spi_in) == active;
            let settle = if peer_has_it {
                Duration::ZERO
            } else {
                NHRP_FLUSH_DELAY
            };
            self.install_outbound(o.peer, o.sa, o.udp_port, settle)
                .await;
        }
    }

    /// Installs an outbound SA; the NHRP packets that waited for it go out after `settle`.
    async fn install_outbound(
        &mut self,
        peer: IpAddr,
        out: dmvpn_esp::OutboundSa,
        udp_port: Option<u16>,
        settle: Duration,
    ) {
        let Some(p) = &self.plane else { return };
        match p.dp.install_outbound(peer, out, udp_port) {
            Ok(()) => self.nhrp_flush.push((Instant::now() + settle, peer)),
            Err(e) => {
                self.counters.sa_install_errors += 1;
                tracing::warn!(%peer, "installing the outbound SA: {e}");
            }
        }
    }

    /// Sends the NHRP packets that waited for an SA, once their delay has passed.
    async fn flush_due(&mut self, now: Instant) {
        let Some(p) = &self.plane else { return };
        let mut due = Vec::new();
        self.nhrp_flush.retain(|(t, peer)| {
            if *t <= now {
                due.push(*peer);
                false
            } else {
                true
            }
        });
        for peer in due {
            match p.dp.flush_nhrp(peer).await {
                Ok(n) if n > 0 => {
                    tracing::debug!(%peer, queued = n, "sent the NHRP packets that waited for the SA")
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(%peer, "sending queued NHRP: {e}"),
            }
        }
    }

    /// Removes the inbound SAs whose grace time has passed.
    fn collect_inbound(&mut self, now: Instant) {
        let Some(p) = &self.plane else { return };
        self.inbound_gc.retain(|(t, spi)| {
            if *t <= now {
                p.dp.remove_inbound(*spi);
                false
            } else {
                true
            }
        });
    }

    /// Whether a route needs its own kernel route into the TUN: not when the tunnel
    /// network's connected route or a configured overlay route already covers it.
    fn needs_kernel_route(&self, prefix: &IpNet) -> bool {
        !self.cfg.tunnel_network().contains(prefix)
            && !self.cfg.overlay_routes.iter().any(|r| r.contains(prefix))
    }

    /// Applies a change of the effective route to the data plane and the kernel.
    async fn program_route(&mut self, change: RouteChange) {
        let ifindex = self.plane.as_ref().map(|p| p.dp.ifindex());
        match change {
            RouteChange::Unchanged => {}
            RouteChange::Set(prefix, next_hop) => {
                if let Some(p) = &self.plane
                    && let Err(e) = p.dp.set_route(prefix, next_hop).await
                {
                    self.dp_error(&format!("route {prefix} via {next_hop}"), &e);
                }
                if self.needs_kernel_route(&prefix)
                    && !self.mirror.kernel_routes.contains(&prefix)
                    && let Some(ifindex) = ifindex
                {
                    match self.kernel.route_add(prefix, ifindex).await {
                        Ok(()) => {
                            self.mirror.kernel_routes.insert(prefix);
                        }
                        Err(e) => {
                            self.counters.kernel_route_errors += 1;
                            tracing::warn!("{e}");
                        }
                    }
                }
            }
            RouteChange::Del(prefix) => {
                if let Some(p) = &self.plane
                    && let Err(e) = p.dp.del_route(prefix).await
                {
                    self.dp_error(&format!("removing route {prefix}"), &e);
                }
                if self.mirror.kernel_routes.remove(&prefix)
                    && let Some(ifindex) = ifindex
                    && let Err(e) = self.kernel.route_del(prefix, ifindex).await
                {
                    self.counters.kernel_route_errors += 1;
                    tracing::warn!("{e}");
                }
            }
        }
    }

    fn dp_error(&mut self, what: &str, e: &dp::DataPlaneError) {
        self.counters.dataplane_errors += 1;
        tracing::warn!("data plane: {what}: {e}");
    }

    async fn apply(&mut self, ev: engine::Event) {
        let now = Instant::now();
        match ev {
            engine::Event::PeerUp { proto, nbma } => {
                tracing::info!(peer = %proto, nbma = %nbma, "tunnel peer up");
                if let Some(p) = &self.plane
                    && let Err(e) = p.dp.set_neighbor(proto, nbma).await
                {
                    self.dp_error(&format!("neighbour {proto} at {nbma}"), &e);
                }
                let since = match self.mirror.neighbors.get(&proto) {
                    Some(n) if n.nbma == nbma => n.since,
                    _ => now,
                };
                self.mirror
                    .neighbors
                    .insert(proto, Neighbor { nbma, since });
            }
            engine::Event::PeerDown { proto } => {
                tracing::info!(peer = %proto, "tunnel peer down");
                if let Some(p) = &self.plane
                    && let Err(e) = p.dp.del_neighbor(proto).await
                {
                    self.dp_error(&format!("removing neighbour {proto}"), &e);
                }
                let gone = self.mirror.neighbors.remove(&proto).map(|n| n.nbma);
                // An idle shortcut (or an expired registration) takes its SA with it,
                // unless the NBMA address still serves another neighbour or is an NHS.
                if let Some(nbma) = gone
                    && !self.cfg.nhs.iter().any(|n| n.nbma_address == nbma)
                    && !self.mirror.neighbors.values().any(|n| n.nbma == nbma)
                    && let Some(ike) = self.ike.as_mut()
                {
                    ike.delete(now, nbma);
                    self.pump_ike().await;
                }
            }
            engine::Event::RouteAdd { prefix, next_hop } => {
                tracing::info!(%prefix, via = %next_hop, "route add");
                let change = self.mirror.routes.add(prefix, next_hop);
                self.program_route(change).await;
            }
            engine::Event::RouteDel { prefix } => {
                tracing::info!(%prefix, "route del");
                let change = self.mirror.routes.del(prefix);
                self.program_route(change).await;
            }
            engine::Event::NhsUp { proto } => {
                tracing::info!(nhs = %proto, "NHS up: registration accepted");
                self.mirror.nhs_since.insert(proto, now);
            }
            engine::Event::NhsDown { proto } => {
                tracing::warn!(nhs = %proto, "NHS down: 3 registrations unanswered (still probing)");
                self.mirror.nhs_since.insert(proto, now);
            }
            engine::Event::Dropped {
                reason,
                from_nbma,
                detail,
            } => {
                self.counters.engine_drops += 1;
                if self.logged_drops.len() < MAX_LOGGED_DROPS
                    && self.logged_drops.insert((reason, from_nbma))
                {
                    tracing::warn!(
                        from = %from_nbma,
                        reason = %reason,
                        "NHRP packet dropped: {detail} (logged once per reason and peer; see show counters)"
                    );
                }
            }
            engine::Event::RegistrationRejected { nhs, prefix, code } => {
                let hint = if code == 14 {
                    ": the address is registered uniquely from another NBMA address; wait for it to expire or set registration_unique = false"
                } else {
                    ""
                };
                tracing::warn!(%nhs, %prefix, code, "registration rejected{hint}");
            }
            engine::Event::NatDetected { nhs, public_nbma } => {
                tracing::info!(%nhs, public = %public_nbma, "NAT detected: the NHS sees us at another NBMA address");
            }
            engine::Event::ErrorIndication { from_nbma, code } => {
                // A peer can send these at packet rate: log each (peer, code) once.
                if self.logged_error_indications.len() < MAX_LOGGED_DROPS
                    && self.logged_error_indications.insert((from_nbma, code))
                {
                    tracing::warn!(
                        from = %from_nbma,
                        code,
                        "NHRP Error Indication received (logged once per peer and code; see show counters)"
                    );
                }
            }
        }
    }

    async fn check_nbma(&mut self) -> anyhow::Result<()> {
        let NbmaSource::Interface(name) = &self.cfg.nbma else {
            return Ok(());
        };
        match interface_address(name, true) {
            Ok(Some(IpAddr::V4(a))) => {
                self.nbma_warned = false;
                if a != self.nbma {
                    tracing::info!(interface = %name, old = %self.nbma, new = %a, "NBMA address changed");
                    self.rebind(a).await?;
                }
            }
            other => {
                if !self.nbma_warned {
                    self.nbma_warned = true;
                    let why = match other {
                        Err(e) => e,
                        _ => "no IPv4 address".to_owned(),
                    };
                    tracing::warn!(interface = %name, nbma = %self.nbma, "nbma_interface: {why}; keeping the last address");
                }
            }
        }
        Ok(())
    }

    /// The raw socket is bound to the NBMA address: recreate the data plane on the new one,
    /// program it again from the mirror, then let the engine purge and re-register.
    async fn rebind(&mut self, nbma: Ipv4Addr) -> anyhow::Result<()> {
        self.counters.nbma_changes += 1;
        // The old TUN must be gone before one with the same name can be created.
        self.plane = None;
        // IKE runs from the NBMA address: start over there (peers re-negotiate on demand).
        if self.ike.is_some() {
            self.ike = None;
            self.ike = Some(Ike::start(&self.cfg, nbma, Instant::now())?);
        }
        let nat_t = self.ike.as_ref().map(Ike::nat_t_socket);
        let mut attempt = 0;
        let plane = loop {
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            match Plane::start(&self.cfg, nbma, nat_t.clone()).await {
                Ok(p) => break p,
                Err(e) if attempt < RESTART_ATTEMPTS => {
                    tracing::debug!("data plane restart attempt {attempt}: {e:#}");
                }
                Err(e) => {
                    return Err(e.context("restarting the data plane on the new NBMA address"));
                }
            }
        };
        self.plane = Some(plane);
        self.nbma = nbma;
        self.program_static().await?;
        let ifindex = self.plane.as_ref().map(|p| p.dp.ifindex());
        if let Some(p) = &self.plane {
            for (proto, n) in &self.mirror.neighbors {
                if let Err(e) = p.dp.set_neighbor(*proto, n.nbma).await {
                    tracing::warn!("data plane: neighbour {proto}: {e}");
                }
            }
            for (prefix, nh) in &self.mirror.routes.effective_all() {
                if let Err(e) = p.dp.set_route(*prefix, *nh).await {
                    tracing::warn!("data plane: route {prefix}: {e}");
                }
            }
        }
        if let Some(ifindex) = ifindex {
            for prefix in &self.mirror.kernel_routes {
                if let Err(e) = self.kernel.route_add(*prefix, ifindex).await {
                    tracing::warn!("{e}");
                }
            }
        }
        self.engine.set_local_nbma(Instant::now(), IpAddr::V4(nbma));
        self.pump().await;
        Ok(())
    }

    async fn answer(&mut self, command: Command) -> Result<Value, String> {
        let now = Instant::now();
        let to_json = |v: Result<Value, serde_json::Error>| v.map_err(|e| e.to_string());
        match command {
            Command::ShowDmvpn => {
                let traffic = self
                    .plane
                    .as_ref()
                    .map(|p| traffic(&p.dp.counters()))
                    .unwrap_or_default();
                let mut v = dmvpn_view(
                    &self.cfg,
                    &self.engine.snapshot(),
                    &self.mirror,
                    traffic,
                    now.saturating_duration_since(self.started).as_secs(),
                    now,
                );
                if let Some(ike) = &self.ike {
                    for p in &mut v.peers {
                        if let Some((state, err)) = p.nbma_address.and_then(|a| ike.peer_state(a)) {
                            p.ike_state = Some(state);
                            p.ike_error = err;
                        }
                    }
                    let sas = self.plane.as_ref().map(|p| p.dp.sas()).unwrap_or_default();
                    v.ipsec = Some(ike.view(now, sas));
                }
                to_json(serde_json::to_value(v))
            }
            Command::ShowNhrpCache => to_json(serde_json::to_value(cache_view(
                &self.cfg,
                &self.engine.snapshot(),
            ))),
            Command::ShowNhrpNhs => to_json(serde_json::to_value(nhs_view(
                &self.cfg,
                &self.engine.snapshot(),
                &self.mirror,
            ))),
            Command::ClearNhrpCache => {
                let before = clearable(&self.engine.snapshot());
                self.engine.clear_cache(now);
                self.pump().await;
                let after = clearable(&self.engine.snapshot());
                tracing::info!(
                    cleared = before.saturating_sub(after),
                    "NHRP cache cleared by operator"
                );
                to_json(serde_json::to_value(ClearView {
                    cleared: before.saturating_sub(after),
                }))
            }
            Command::ShowCounters => {
                let dataplane = match &self.plane {
                    Some(p) => to_json(serde_json::to_value(p.dp.counters()))?,
                    None => Value::Null,
                };
                Ok(json!({
                    "nhrp": to_json(serde_json::to_value(self.engine.counters()))?,
                    "dataplane": dataplane,
                    "agent": to_json(serde_json::to_value(&self.counters))?,
                    "ike": self.ike.as_ref().map_or(Value::Null, Ike::counters_json),
                }))
            }
        }
    }

    /// Purges our registrations, withdraws what the engine installed, removes our kernel
    /// routes. Bounded in time: a stuck socket must not keep the process alive.
    async fn stop(&mut self) {
        let work = async {
            self.engine.shutdown(Instant::now());
            self.pump().await;
            // The purges went out through the SAs; now tell the peers the SAs are gone.
            if let Some(ike) = self.ike.as_mut() {
                ike.delete_all(Instant::now());
                let _ = ike.events(Instant::now());
                ike.send();
            }
            if let Some(p) = &self.plane {
                let ifindex = p.dp.ifindex();
                for r in &self.cfg.overlay_routes {
                    if let Err(e) = self.kernel.route_del(*r, ifindex).await {
                        tracing::warn!("{e}");
                    }
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_BUDGET, work).await.is_err() {
            tracing::warn!(
                "shutdown took longer than {}s; exiting anyway",
                SHUTDOWN_BUDGET.as_secs()
            );
        }
        self.plane = None;
        tracing::info!("agent stopped");
    }
}

fn traffic(c: &dp::Counters) -> TrafficView {
    TrafficView {
        tx_packets: c.tx_packets,
        tx_bytes: c.tx_bytes,
        rx_packets: c.rx_packets,
        rx_bytes: c.rx_bytes,
        dropped_packets: c.drops.total(),
    }
}

/// Entries that `clear nhrp cache` removes.
fn clearable(s: &engine::Snapshot) -> u64 {
    s.cache
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                CacheType::Shortcut | CacheType::Incomplete | CacheType::Negative
            )
        })
        .count() as u64
}

fn cache_type_name(t: CacheType) -> &'static str {
    match t {
        CacheType::Local => "local",
        CacheType::Dynamic => "dynamic",
        CacheType::Nhs => "nhs",
        CacheType::Shortcut => "shortcut",
        CacheType::Incomplete => "incomplete",
        CacheType::Negative => "negative",
    }
}

fn nhs_state_name(s: NhsState) -> &'static str {
    match s {
        NhsState::Probing => "probing",
        NhsState::Up => "up",
        NhsState::Down => "down",
    }
}

/// `show_nhrp_cache` from an engine snapshot.
pub fn cache_view(cfg: &Config, s: &engine::Snapshot) -> CacheView {
    CacheView {
        interface: cfg.tun_name.clone(),
        entries: s
            .cache
            .iter()
            .map(|e| CacheEntryView {
                kind: cache_type_name(e.kind).to_owned(),
                prefix: e.prefix,
                protocol: e.proto,
                nbma: e.nbma,
                expires_in_secs: e.expires_in,
                used: e.used,
                unique: e.unique,
            })
            .collect(),
    }
}

/// The NHS the routes via NHS point to: the next hop of the first such route in the mirror.
fn preferred_nhs(cfg: &Config, mirror: &Mirror) -> Option<IpAddr> {
    let nhs: HashSet<IpAddr> = cfg.nhs.iter().map(|n| n.tunnel_address).collect();
    let mut via = std::iter::once(cfg.tunnel_network()).chain(cfg.overlay_routes.iter().copied());
    via.find_map(|p| mirror.routes.base(&p).filter(|nh| nhs.contains(nh)))
}

/// `show_nhrp_nhs` from an engine snapshot.
pub fn nhs_view(cfg: &Config, s: &engine::Snapshot, mirror: &Mirror) -> NhsListView {
    let preferred = preferred_nhs(cfg, mirror);
    NhsListView {
        interface: cfg.tun_name.clone(),
        nhs: s
            .nhs
            .iter()
            .map(|n| NhsView {
                tunnel_address: n.proto,
                nbma_address: n.nbma,
                priority: n.priority,
                state: nhs_state_name(n.state).to_owned(),
                registered: n.registered,
                preferred: preferred == Some(n.proto),
                last_reply_secs_ago: n.last_reply_ago,
                failures: n.failures,
                consecutive_timeouts: n.consecutive_timeouts,
                request_id: n.request_id,
                nat_address: n.nat_nbma,
                last_rejection_code: n.last_rejection,
            })
            .collect(),
    }
}

/// `show_dmvpn`: the NHSs and every programmed neighbour, with what the cache says about
/// each (attributes, prefixes, expiry).
pub fn dmvpn_view(
    cfg: &Config,
    s: &engine::Snapshot,
    mirror: &Mirror,
    traffic: TrafficView,
    uptime_secs: u64,
    now: Instant,
) -> DmvpnView {
    let age = |t: Instant| now.saturating_duration_since(t).as_secs();
    let mut peers: BTreeMap<IpAddr, PeerView> = BTreeMap::new();
    for n in &s.nhs {
        let state = nhs_state_name(n.state);
        let since = mirror.nhs_since.get(&n.proto).copied();
        peers.insert(
            n.proto,
            PeerView {
                tunnel_address: n.proto,
                nbma_address: Some(n.nbma),
                state: state.to_owned(),
                // Before the first NhsUp/NhsDown the NHS has been probing since start.
                state_secs: since.map(age).or(Some(uptime_secs)),
                attributes: String::new(),
                prefixes: Vec::new(),
                expires_in_secs: None,
                ike_state: None,
                ike_error: None,
            },
        );
    }
    for (proto, n) in &mirror.neighbors {
        let p = peers.entry(*proto).or_insert_with(|| PeerView {
            tunnel_address: *proto,
            nbma_address: Some(n.nbma),
            state: "up".to_owned(),
            state_secs: Some(age(n.since)),
            attributes: String::new(),
            prefixes: Vec::new(),
            expires_in_secs: None,
            ike_state: None,
            ike_error: None,
        });
        // The programmed address wins over the configured one (it is what traffic uses).
        p.nbma_address = Some(n.nbma);
    }
    let mut flags: HashMap<IpAddr, (bool, bool, bool)> = HashMap::new();
    for e in &s.cache {
        let (kind_s, kind_d, kind_t) = match e.kind {
            CacheType::Nhs => (true, false, false),
            CacheType::Dynamic => (false, true, false),
            CacheType::Shortcut => (false, false, true),
            _ => continue,
        };
        let Some(p) = peers.get_mut(&e.proto) else {
            continue;
        };
        let f = flags.entry(e.proto).or_default();
        f.0 |= kind_s;
        f.1 |= kind_d;
        f.2 |= kind_t;
        if kind_d || kind_t {
            if !p.prefixes.contains(&e.prefix) {
                p.prefixes.push(e.prefix);
            }
            if let Some(x) = e.expires_in {
                p.expires_in_secs = Some(p.expires_in_secs.map_or(x, |y| y.max(x)));
            }
        }
    }
    for (proto, p) in &mut peers {
        let (st, dy, sc) = flags.get(proto).copied().unwrap_or_default();
        let mut a = String::new();
        if st {
            a.push('S');
        }
        if dy {
            a.push('D');
        }
        if sc {
            a.push('T');
        }
        p.attributes = a;
        p.prefixes.sort();
    }
    DmvpnView {
        interface: cfg.tun_name.clone(),
        role: cfg.role.to_string(),
        phase: cfg.phase.get(),
        tunnel_address: cfg.tunnel_address,
        nbma_address: s.nbma_address,
        uptime_secs,
        peers: peers.into_values().collect(),
        traffic,
        ipsec: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cfg(text: &str) -> Config {
        crate::config::parse(text, "test.toml").unwrap()
    }

    const SPOKE: &str = r#"
role = "spoke"
tunnel_address = "10.42.0.2/24"
nbma_address = "198.51.100.2"
gre_key = 7
holdtime = 300
phase = 2
local_prefixes = ["10.1.2.0/24"]
overlay_routes = ["10.0.0.0/8"]
nhrp_auth = "pw"
redirect_rate_limit_secs = 20
ipsec = { psk = "a-test-key-of-24-bytes!!" }
[[nhs]]
tunnel_address = "10.42.0.1"
nbma_address = "198.51.100.1"
[[nhs]]
tunnel_address = "10.42.0.254"
nbma_address = "198.51.100.254"
priority = 5
"#;

    #[test]
    fn engine_config_from_file() {
        let c = cfg(&SPOKE.replace(
            "local_prefixes = [\"10.1.2.0/24\"]",
            "local_prefixes = [\"172.16.2.0/24\"]",
        ));
        let e = engine_config(&c, ip("198.51.100.2"));
        assert_eq!(e.role, engine::Role::Spoke);
        assert_eq!(e.tunnel_address, ip("10.42.0.2"));
        assert_eq!(e.tunnel_prefix_len, 24);
        assert_eq!(e.holdtime, 300);
        assert_eq!(e.phase, engine::Phase::Two);
        assert_eq!(e.auth.as_deref(), Some(&b"pw"[..]));
        assert_eq!(e.nhs.len(), 2);
        assert_eq!(e.nhs[1].priority, 5);
        assert_eq!(
            e.routes_via_nhs,
            vec![
                "10.42.0.0/24".parse::<IpNet>().unwrap(),
                "10.0.0.0/8".parse().unwrap()
            ]
        );
        assert_eq!(e.redirect_limit.interval, Duration::from_secs(20));
        assert!(e.initial_request_id > 1);
        e.validate().unwrap();
        // The engine accepts what the agent's validation accepts.
        Engine::new(e, Instant::now()).unwrap();
    }

    #[test]
    fn hub_without_nhs_keeps_overlay_routes_out_of_the_engine() {
        let c = cfg(
            "role = \"hub\"\ntunnel_address = \"10.42.0.1/24\"\nnbma_address = \"198.51.100.1\"\noverlay_routes = [\"10.100.0.0/16\"]\n[ipsec]\nenabled = false\n",
        );
        let e = engine_config(&c, ip("198.51.100.1"));
        assert!(e.routes_via_nhs.is_empty());
        assert!(e.nhs.is_empty());
        Engine::new(e, Instant::now()).unwrap();
    }

    #[test]
    fn dataplane_config_from_file() {
        let c = cfg(&SPOKE.replace(
            "local_prefixes = [\"10.1.2.0/24\"]",
            "local_prefixes = [\"172.16.2.0/24\"]",
        ));
        let d = dataplane_config(&c, "198.51.100.2".parse().unwrap(), None);
        assert_eq!(d.gre_key, Some(7));
        // IPsec is on by default: ESP required, MTU lowered by the ESP overhead.
        assert!(d.ipsec.as_ref().is_some_and(|i| i.require));
        assert_eq!(d.effective_mtu(), 1472 - dp::ESP_OVERHEAD);
        assert!(!d.hub);
        assert!(!d.manage_kernel_routes);
        assert_eq!(d.addresses, vec!["10.42.0.2/24".parse::<IpNet>().unwrap()]);
    }

    fn entry(
        kind: CacheType,
        proto: &str,
        prefix: &str,
        nbma: Option<&str>,
        exp: Option<u64>,
    ) -> engine::CacheEntry {
        engine::CacheEntry {
            kind,
            proto: ip(proto),
            prefix: prefix.parse().unwrap(),
            nbma: nbma.map(ip),
            expires_in: exp,
            used: false,
            unique: false,
        }
    }

    fn nhs_info(proto: &str, nbma: &str, state: NhsState) -> engine::NhsInfo {
        engine::NhsInfo {
            proto: ip(proto),
            nbma: ip(nbma),
            priority: 0,
            state,
            registered: state == NhsState::Up,
            last_reply_ago: Some(4),
            failures: 0,
            consecutive_timeouts: 0,
            request_id: 9,
            nat_nbma: None,
            last_rejection: None,
        }
    }

    /// A spoke with one NHS up, one NHS down, and a shortcut to another spoke.
    fn spoke_state(now: Instant) -> (Config, engine::Snapshot, Mirror) {
        let c = cfg(&SPOKE.replace(
            "local_prefixes = [\"10.1.2.0/24\"]",
            "local_prefixes = [\"172.16.2.0/24\"]",
        ));
        let ecfg = engine_config(&c, ip("198.51.100.2"));
        let mut m = Mirror::new(&ecfg);
        let e = Engine::new(ecfg, now).unwrap();
        let mut s = e.snapshot();
        s.nhs = vec![
            nhs_info("10.42.0.1", "198.51.100.1", NhsState::Up),
            nhs_info("10.42.0.254", "198.51.100.254", NhsState::Down),
        ];
        s.cache.push(entry(
            CacheType::Shortcut,
            "10.42.0.3",
            "172.16.3.0/24",
            Some("203.0.113.3"),
            Some(100),
        ));
        s.cache.push(entry(
            CacheType::Shortcut,
            "10.42.0.3",
            "10.42.0.3/32",
            Some("203.0.113.3"),
            Some(250),
        ));
        s.cache.push(entry(
            CacheType::Negative,
            "10.42.0.9",
            "10.42.0.9/32",
            None,
            Some(20),
        ));
        let t0 = now.checked_sub(Duration::from_secs(30)).unwrap_or(now);
        m.neighbors.insert(
            ip("10.42.0.1"),
            Neighbor {
                nbma: ip("198.51.100.1"),
                since: t0,
            },
        );
        m.neighbors.insert(
            ip("10.42.0.254"),
            Neighbor {
                nbma: ip("198.51.100.254"),
                since: t0,
            },
        );
        m.neighbors.insert(
            ip("10.42.0.3"),
            Neighbor {
                nbma: ip("203.0.113.3"),
                since: now,
            },
        );
        m.routes
            .add("10.42.0.0/24".parse().unwrap(), ip("10.42.0.1"));
        m.routes.add("10.0.0.0/8".parse().unwrap(), ip("10.42.0.1"));
        m.nhs_since.insert(ip("10.42.0.1"), t0);
        (c, s, m)
    }

    #[test]
    fn dmvpn_view_merges_engine_and_mirror() {
        let now = Instant::now();
        let (c, s, m) = spoke_state(now);
        let v = dmvpn_view(&c, &s, &m, TrafficView::default(), 31, now);
        assert_eq!(v.role, "spoke");
        assert_eq!(v.phase, 2);
        assert_eq!(v.peers.len(), 3);
        let hub = v
            .peers
            .iter()
            .find(|p| p.tunnel_address == ip("10.42.0.1"))
            .unwrap();
        assert_eq!(hub.attributes, "S");
        assert_eq!(hub.state, "up");
        assert_eq!(hub.state_secs, Some(30));
        assert!(hub.prefixes.is_empty());
        let backup = v
            .peers
            .iter()
            .find(|p| p.tunnel_address == ip("10.42.0.254"))
            .unwrap();
        assert_eq!(backup.state, "down");
        assert_eq!(
            backup.state_secs,
            Some(31),
            "never changed state: age is the uptime"
        );
        let sc = v
            .peers
            .iter()
            .find(|p| p.tunnel_address == ip("10.42.0.3"))
            .unwrap();
        assert_eq!(sc.attributes, "T");
        assert_eq!(sc.nbma_address, Some(ip("203.0.113.3")));
        assert_eq!(
            sc.prefixes,
            vec![
                "10.42.0.3/32".parse::<IpNet>().unwrap(),
                "172.16.3.0/24".parse().unwrap()
            ]
        );
        assert_eq!(sc.expires_in_secs, Some(250));
        assert_eq!(sc.state_secs, Some(0));
        // The negative entry is no peer.
        assert!(!v.peers.iter().any(|p| p.tunnel_address == ip("10.42.0.9")));
    }

    #[test]
    fn nhs_view_marks_preferred() {
        let now = Instant::now();
        let (c, s, mut m) = spoke_state(now);
        let v = nhs_view(&c, &s, &m);
        assert_eq!(v.nhs.len(), 2);
        assert!(v.nhs[0].preferred && v.nhs[0].registered && v.nhs[0].state == "up");
        assert!(!v.nhs[1].preferred && !v.nhs[1].registered && v.nhs[1].state == "down");
        // Fail-over: the routes now point to the backup.
        m.routes
            .add("10.42.0.0/24".parse().unwrap(), ip("10.42.0.254"));
        m.routes
            .add("10.0.0.0/8".parse().unwrap(), ip("10.42.0.254"));
        let v = nhs_view(&c, &s, &m);
        assert!(!v.nhs[0].preferred && v.nhs[1].preferred);
    }

    #[test]
    fn cache_view_maps_every_entry() {
        let now = Instant::now();
        let (c, s, _) = spoke_state(now);
        let v = cache_view(&c, &s);
        assert_eq!(v.entries.len(), s.cache.len());
        let kinds: Vec<&str> = v.entries.iter().map(|e| e.kind.as_str()).collect();
        assert!(
            kinds.contains(&"local")
                && kinds.contains(&"nhs")
                && kinds.contains(&"shortcut")
                && kinds.contains(&"negative"),
            "{kinds:?}"
        );
        assert_eq!(clearable(&s), 3);
        let json = serde_json::to_value(&v).unwrap();
        let neg = json["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == "negative")
            .unwrap();
        assert_eq!(neg["nbma"], Value::Null);
        assert_eq!(neg["prefix"], "10.42.0.9/32");
    }
}
