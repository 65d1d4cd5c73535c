//! The DMVPN lab topology: an "internet" bridge namespace, one or two hubs, N spokes, each
//! spoke with a LAN namespace behind it, and real `dmvpn-agent` processes.
//!
//! Addressing (fixed, documented in e2e/README.md):
//! - underlay 198.51.100.0/24 on bridge `br0` in "<p>-inet": hub h = .h, spoke i = .(10+i)
//! - tunnel 10.42.0.0/24: hub h = .h, spoke i = .(10+i)
//! - spoke i's LAN 10.(100+i).0.0/24 in "<p>-lanI": spoke .1 (`lan0`), host .2 (`eth0`)

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;

use crate::agent::{self, Snapshot};
use crate::cleanup;
use crate::netns::{Netns, NsFactory, PingResult};

/// Largest spoke count: LANs 10.101..=10.120 stay inside the overlay aggregate 10.96.0.0/11.
pub const MAX_SPOKES: usize = 20;
/// The overlay aggregate routed into the tunnel on every node (covers all spoke LANs).
pub const LAN_AGGREGATE: &str = "10.96.0.0/11";
static PING_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Name of the agent's TUN device in the lab.
pub const TUN_NAME: &str = "dmvpn0";
/// Underlay interface name inside hub and spoke namespaces.
pub const UNDERLAY_IF: &str = "eth0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Hub,
    Spoke,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Hub => "hub",
            Role::Spoke => "spoke",
        })
    }
}

/// What a config tweak sees about the node whose config it edits.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub role: Role,
    /// 1-based.
    pub index: usize,
    pub nbma: Ipv4Addr,
    pub tunnel: Ipv4Addr,
}

/// Edits a node's agent configuration before it is written (tests use it for wrong keys etc.).
pub type ConfigTweak = Box<dyn Fn(&NodeInfo, &mut toml::Table) + Send + Sync>;

/// What to build.
pub struct LabSpec {
    pub spokes: usize,
    pub hubs: usize,
    pub phase: u8,
    pub agent: PathBuf,
    pub pcap: Option<PathBuf>,
    pub holdtime: u32,
    pub gre_key: u32,
    pub nhrp_auth: Option<String>,
    /// Spokes learn their NBMA address from `eth0` (`nbma_interface`) instead of a fixed one.
    pub spoke_nbma_interface: bool,
    /// IKEv2 + ESP on every tunnel with this pre-shared key (the agent's default is IPsec
    /// on); `None` writes `[ipsec] enabled = false` (GRE and NHRP in clear).
    pub ipsec_psk: Option<String>,
    pub tweak: Option<ConfigTweak>,
}

/// The lab's default IPsec pre-shared key.
pub const LAB_PSK: &str = "dmvpn-lab-pre-shared-key";

impl LabSpec {
    pub fn new(agent: PathBuf) -> Self {
        LabSpec {
            spokes: 2,
            hubs: 1,
            phase: 3,
            agent,
            pcap: None,
            holdtime: 30,
            gre_key: 42,
            nhrp_auth: Some("dmvpn".into()),
            spoke_nbma_interface: false,
            ipsec_psk: Some(LAB_PSK.into()),
            tweak: None,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.spokes == 0 || self.spokes > MAX_SPOKES {
            bail!("--spokes must be 1..={MAX_SPOKES} (got {})", self.spokes);
        }
        if !(1..=2).contains(&self.hubs) {
            bail!("the lab supports 1 or 2 hubs (got {})", self.hubs);
        }
        if !(1..=65000).contains(&self.holdtime) {
            bail!(
                "--holdtime must be 1..=65000 seconds (got {})",
                self.holdtime
            );
        }
        if !(1..=3).contains(&self.phase) {
            bail!("--phase must be 1, 2 or 3 (got {})", self.phase);
        }
        Ok(())
    }

    fn check_agent(&self) -> Result<()> {
        if !self.agent.is_file() {
            bail!(
                "agent binary {} not found; build it with `cargo build --release -p dmvpn-agent -p dmvpn-e2e` \
                 or pass --agent PATH (tests: set DMVPN_AGENT)",
                self.agent.display()
            );
        }
        Ok(())
    }
}

/// Spoke i's LAN.
#[derive(Debug, Clone)]
pub struct Lan {
    pub ns: Netns,
    /// e.g. "10.101.0.0/24"
    pub prefix: String,
    pub gateway: Ipv4Addr,
    pub host: Ipv4Addr,
}

/// A hub or spoke: its namespace, addresses, and agent files.
#[derive(Debug)]
pub struct Node {
    pub role: Role,
    pub index: usize,
    /// "hub1", "spoke2"
    pub label: String,
    pub ns: Netns,
    pub nbma: Ipv4Addr,
    pub tunnel: Ipv4Addr,
    pub lan: Option<Lan>,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub agent_pid: Option<u32>,
}

impl Node {
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            role: self.role,
            index: self.index,
            nbma: self.nbma,
            tunnel: self.tunnel,
        }
    }

    /// One control-socket request (`show_dmvpn`, `show_nhrp_cache`, ...).
    pub fn control(&self, cmd: &str) -> Result<serde_json::Value> {
        agent::control(&self.socket, cmd).with_context(|| format!("{}: control {cmd}", self.label))
    }

    /// Cache, NHS states and counters in one view.
    pub fn snapshot(&self) -> Result<Snapshot> {
        Snapshot::query(&self.socket).with_context(|| format!("{}: snapshot", self.label))
    }

    /// The NHRP cache (`show_nhrp_cache`), cheap enough to poll every few ms.
    pub fn cache(&self) -> Result<agent::Cache> {
        agent::Cache::query(&self.socket).with_context(|| format!("{}: cache", self.label))
    }

    pub fn agent_running(&self) -> bool {
        self.agent_pid.is_some_and(cleanup::is_running)
    }
}

pub fn hub_nbma(h: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, h as u8)
}
pub fn hub_tunnel(h: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 42, 0, h as u8)
}
pub fn spoke_nbma(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, (10 + i) as u8)
}
pub fn spoke_tunnel(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 42, 0, (10 + i) as u8)
}
pub fn spoke_lan_prefix(i: usize) -> String {
    format!("10.{}.0.0/24", 100 + i)
}
pub fn spoke_lan_host(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, (100 + i) as u8, 0, 2)
}

/// A running lab. Dropping it stops every process it started and deletes every namespace.
pub struct Lab {
    factory: NsFactory,
    /// None once kept (DMVPN_LAB_KEEP) in Drop.
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    pub spec: LabSpec,
    pub inet: Netns,
    pub hubs: Vec<Node>,
    pub spokes: Vec<Node>,
    capture_pid: Option<u32>,
}

impl fmt::Debug for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.factory.prefix())
            .field("dir", &self.dir_path)
            .field("hubs", &self.hubs)
            .field("spokes", &self.spokes)
            .finish()
    }
}

impl Lab {
    /// Build namespaces, links, addresses and routes; start the capture if asked. No agents yet.
    pub fn build(spec: LabSpec) -> Result<Lab> {
        spec.validate()?;
        crate::netns::require_root()?;
        cleanup::install_signal_handler();
        let factory = NsFactory::new();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", factory.prefix()))
            .tempdir()
            .context("cannot create the lab's temp dir")?;
        // From here on, a failure drops `lab`, which removes whatever was created so far.
        let inet = factory.create("inet")?;
        let dir_path = dir.path().to_path_buf();
        cleanup::register_dir(factory.owner(), &dir_path);
        let mut lab = Lab {
            factory,
            dir: Some(dir),
            dir_path,
            spec,
            inet,
            hubs: Vec::new(),
            spokes: Vec::new(),
            capture_pid: None,
        };
        lab.build_topology()?;
        Ok(lab)
    }

    /// The namespace name prefix ("dl<pid>x<n>").
    pub fn prefix(&self) -> &str {
        self.factory.prefix()
    }

    /// The temp dir with configs, sockets and logs.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// Names of every namespace of this lab.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = vec![self.inet.name().to_string()];
        for n in self.hubs.iter().chain(self.spokes.iter()) {
            v.push(n.ns.name().to_string());
            if let Some(l) = &n.lan {
                v.push(l.ns.name().to_string());
            }
        }
        v
    }

    fn build_topology(&mut self) -> Result<()> {
        ipv4_only(&self.inet)?;
        self.inet.bridge("br0")?;
        for h in 1..=self.spec.hubs {
            let node = self.make_node(Role::Hub, h, hub_nbma(h), hub_tunnel(h))?;
            self.hubs.push(node);
        }
        for i in 1..=self.spec.spokes {
            let mut node = self.make_node(Role::Spoke, i, spoke_nbma(i), spoke_tunnel(i))?;
            let lan_ns = self.factory.create(&format!("lan{i}"))?;
            ipv4_only(&lan_ns)?;
            node.ns.veth_to("lan0", &lan_ns, "eth0")?;
            let gateway = Ipv4Addr::new(10, (100 + i) as u8, 0, 1);
            let host = spoke_lan_host(i);
            node.ns.addr_add("lan0", &format!("{gateway}/24"))?;
            lan_ns.addr_add("eth0", &format!("{host}/24"))?;
            lan_ns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
            node.lan = Some(Lan {
                ns: lan_ns,
                prefix: spoke_lan_prefix(i),
                gateway,
                host,
            });
            self.spokes.push(node);
        }
        if let Some(pcap) = self.spec.pcap.clone() {
            self.start_capture(&pcap)?;
        }
        Ok(())
    }

    fn make_node(
        &self,
        role: Role,
        index: usize,
        nbma: Ipv4Addr,
        tunnel: Ipv4Addr,
    ) -> Result<Node> {
        let label = format!("{role}{index}");
        let ns = self.factory.create(&label)?;
        ipv4_only(&ns)?;
        // Bridge-side port name in inet: "u-hub1", "u-spoke12" (<= 15 chars).
        let port = format!("u-{label}");
        self.inet.veth_to(&port, &ns, UNDERLAY_IF)?;
        self.inet.bridge_port(&port, "br0")?;
        ns.addr_add(UNDERLAY_IF, &format!("{nbma}/24"))?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        // The hub forwards spoke-to-spoke traffic back out of the tunnel it came from:
        // neither strict reverse-path filtering nor ICMP redirects belong in that path.
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
        ns.sysctl("net.ipv4.conf.default.send_redirects", "0")?;
        let dir = &self.dir_path;
        Ok(Node {
            role,
            index,
            ns,
            nbma,
            tunnel,
            lan: None,
            config: dir.join(format!("{label}.toml")),
            socket: dir.join(format!("{label}.sock")),
            log: dir.join(format!("{label}.log")),
            label,
            agent_pid: None,
        })
    }

    fn start_capture(&mut self, pcap: &Path) -> Result<()> {
        let file = std::path::absolute(pcap)
            .with_context(|| format!("bad --pcap path {}", pcap.display()))?;
        let file_s = file.to_string_lossy().into_owned();
        let log = self.dir_path.join("tcpdump.log");
        // -U/--immediate-mode: short captures are otherwise nearly empty (block timeout);
        // -Z root: do not drop privileges before opening the output file.
        let pid = self.inet.spawn(
            "tcpdump",
            &[
                "tcpdump",
                "--immediate-mode",
                "-U",
                "-Z",
                "root",
                "-s",
                "0",
                "-i",
                "br0",
                "-w",
                &file_s,
            ],
            &log,
            &[],
            Signal::SIGINT,
        )?;
        cleanup::mark_last(pid);
        self.capture_pid = Some(pid);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("listening on") {
                return Ok(());
            }
            if !cleanup::is_running(pid) {
                bail!("tcpdump exited at start: {}", text.trim());
            }
            if Instant::now() > deadline {
                bail!(
                    "tcpdump did not start listening on br0 within 5 s: {}",
                    text.trim()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// All nodes, hubs first.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.hubs.iter().chain(self.spokes.iter())
    }

    /// Hub h (1-based).
    ///
    /// # Panics
    /// If there is no hub h (a test convenience; use [`Lab::node`] for checked access).
    pub fn hub(&self, h: usize) -> &Node {
        self.node(Role::Hub, h).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Spoke i (1-based).
    ///
    /// # Panics
    /// If there is no spoke i (a test convenience; use [`Lab::node`] for checked access).
    pub fn spoke(&self, i: usize) -> &Node {
        self.node(Role::Spoke, i).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Hub or spoke `index` (1-based).
    pub fn node(&self, role: Role, index: usize) -> Result<&Node> {
        let list = match role {
            Role::Hub => &self.hubs,
            Role::Spoke => &self.spokes,
        };
        index
            .checked_sub(1)
            .and_then(|i| list.get(i))
            .ok_or_else(|| anyhow!("the lab has no {role}{index} ({} {role}s)", list.len()))
    }

    fn node_mut(&mut self, role: Role, index: usize) -> Result<&mut Node> {
        let list = match role {
            Role::Hub => &mut self.hubs,
            Role::Spoke => &mut self.spokes,
        };
        let n = list.len();
        index
            .checked_sub(1)
            .and_then(|i| list.get_mut(i))
            .ok_or_else(|| anyhow!("the lab has no {role}{index} ({n} {role}s)"))
    }

    /// The agent configuration for a node (before the spec's tweak).
    pub fn agent_config(&self, node: &Node) -> toml::Table {
        let s = &self.spec;
        let mut t = toml::Table::new();
        let str_v = |v: &str| toml::Value::String(v.to_string());
        t.insert("role".into(), str_v(&node.role.to_string()));
        t.insert(
            "tunnel_address".into(),
            str_v(&format!("{}/24", node.tunnel)),
        );
        if node.role == Role::Spoke && s.spoke_nbma_interface {
            t.insert("nbma_interface".into(), str_v(UNDERLAY_IF));
        } else {
            t.insert("nbma_address".into(), str_v(&node.nbma.to_string()));
        }
        t.insert("gre_key".into(), toml::Value::Integer(s.gre_key.into()));
        t.insert("holdtime".into(), toml::Value::Integer(s.holdtime.into()));
        t.insert("phase".into(), toml::Value::Integer(s.phase.into()));
        let prefixes = node
            .lan
            .iter()
            .map(|l| str_v(&l.prefix))
            .collect::<Vec<_>>();
        t.insert("local_prefixes".into(), toml::Value::Array(prefixes));
        if let Some(a) = &s.nhrp_auth {
            t.insert("nhrp_auth".into(), str_v(a));
        }
        t.insert("registration_unique".into(), toml::Value::Boolean(false));
        t.insert(
            "control_socket".into(),
            str_v(&node.socket.to_string_lossy()),
        );
        t.insert("dataplane".into(), str_v("userspace"));
        t.insert("tun_name".into(), str_v(TUN_NAME));
        // Other spokes' LANs are routed into the tunnel (the agent installs `overlay_routes`);
        // the agent's forwarding table then picks the overlay next hop: the hub or a shortcut.
        let routes: Vec<toml::Value> = match node.role {
            Role::Hub => vec![str_v(LAN_AGGREGATE)],
            Role::Spoke => (1..=s.spokes)
                .filter(|i| *i != node.index)
                .map(|i| str_v(&spoke_lan_prefix(i)))
                .collect(),
        };
        t.insert("overlay_routes".into(), toml::Value::Array(routes));
        if node.role == Role::Spoke {
            let nhs = (1..=s.hubs)
                .map(|h| {
                    let mut e = toml::Table::new();
                    e.insert("tunnel_address".into(), str_v(&hub_tunnel(h).to_string()));
                    e.insert("nbma_address".into(), str_v(&hub_nbma(h).to_string()));
                    e.insert("priority".into(), toml::Value::Integer(0));
                    toml::Value::Table(e)
                })
                .collect::<Vec<_>>();
            t.insert("nhs".into(), toml::Value::Array(nhs));
        }
        let mut ipsec = toml::Table::new();
        match &s.ipsec_psk {
            Some(psk) => ipsec.insert("psk".into(), str_v(psk)),
            None => ipsec.insert("enabled".into(), toml::Value::Boolean(false)),
        };
        t.insert("ipsec".into(), toml::Value::Table(ipsec));
        if let Some(tweak) = &s.tweak {
            tweak(&node.info(), &mut t);
        }
        t
    }

    /// Write the config and start the agent of one node; wait for its control socket and
    /// tunnel device, then route the LAN aggregate into the tunnel.
    pub fn start_agent(&mut self, role: Role, index: usize) -> Result<()> {
        self.spec.check_agent()?;
        let (config, text, log, label, ns, socket) = {
            let node = self.node(role, index)?;
            let cfg = self.agent_config(node);
            let text = toml::to_string(&cfg).context("cannot render agent config")?;
            (
                node.config.clone(),
                text,
                node.log.clone(),
                node.label.clone(),
                node.ns.clone(),
                node.socket.clone(),
            )
        };
        std::fs::write(&config, &text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let _ = std::fs::remove_file(&socket);
        let agent = self.spec.agent.to_string_lossy().into_owned();
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        let pid = ns.spawn(
            &format!("dmvpn-agent {label}"),
            &[&agent, "run", "--config", &config.to_string_lossy()],
            &log,
            &[("RUST_LOG", &rust_log)],
            Signal::SIGTERM,
        )?;
        self.node_mut(role, index)?.agent_pid = Some(pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if !cleanup::is_running(pid) {
                bail!(
                    "{label}: dmvpn-agent exited at start ({:?}); log {}:\n{}",
                    cleanup::exit_status(pid),
                    log.display(),
                    tail(&log, 50)
                );
            }
            if socket.exists()
                && ns.has_link(TUN_NAME)
                && agent::control(&socket, "show_dmvpn").is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{label}: no control socket {} and tunnel device {TUN_NAME} within 10 s; log:\n{}",
                    socket.display(),
                    tail(&log, 50)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Start every agent: hubs first, then spokes.
    pub fn start_agents(&mut self) -> Result<()> {
        for h in 1..=self.hubs.len() {
            self.start_agent(Role::Hub, h)?;
        }
        for i in 1..=self.spokes.len() {
            self.start_agent(Role::Spoke, i)?;
        }
        Ok(())
    }

    /// Send a signal to a node's agent (SIGTERM: graceful leave with purge; SIGKILL: crash).
    pub fn signal_agent(&self, role: Role, index: usize, sig: Signal) -> Result<()> {
        let node = self.node(role, index)?;
        let pid = node
            .agent_pid
            .ok_or_else(|| anyhow!("{}: agent not started", node.label))?;
        if !cleanup::signal(pid, sig) {
            bail!("{}: agent (pid {pid}) is not running", node.label);
        }
        Ok(())
    }

    /// Stop a node's agent: `sig`, wait up to `grace`, then SIGKILL. Returns true if it exited
    /// by itself within `grace`.
    pub fn stop_agent(&mut self, role: Role, index: usize, sig: Signal, grace: Duration) -> bool {
        let Some(pid) = self.node(role, index).ok().and_then(|n| n.agent_pid) else {
            return true;
        };
        cleanup::signal(pid, sig);
        let clean = cleanup::wait_exit(pid, grace);
        cleanup::stop(pid, Duration::from_millis(100));
        if let Ok(n) = self.node_mut(role, index) {
            n.agent_pid = None;
        }
        clean
    }

    /// Poll until every running spoke is in every running hub's cache and every spoke sees
    /// at least one NHS up. Returns the number of registered spokes (as the hubs see them).
    pub fn wait_registered(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        let want: Vec<&Node> = self.spokes.iter().filter(|s| s.agent_running()).collect();
        loop {
            let count = self.registered_count()?;
            let spokes_up = want.iter().all(|s| {
                s.snapshot()
                    .map(|snap| snap.nhs_up_count() > 0)
                    .unwrap_or(false)
            });
            if count == want.len() && spokes_up {
                return Ok(count);
            }
            if Instant::now() > deadline {
                return Ok(count);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Spokes registered at *every* running hub (a spoke missing at one hub does not count).
    pub fn registered_count(&self) -> Result<usize> {
        let mut count = 0;
        let hubs: Vec<Snapshot> = self
            .hubs
            .iter()
            .filter(|h| h.agent_running())
            .map(|h| h.snapshot())
            .collect::<Result<_>>()?;
        if hubs.is_empty() {
            return Ok(0);
        }
        for s in self.spokes.iter().filter(|s| s.agent_running()) {
            if hubs
                .iter()
                .all(|snap| snap.has_registration(s.tunnel, s.nbma))
            {
                count += 1;
            }
        }
        Ok(count)
    }

    /// Ping from spoke `from`'s LAN host to spoke `to`'s LAN host.
    pub fn lan_ping(
        &self,
        from: usize,
        to: usize,
        count: u32,
        interval: &str,
    ) -> Result<PingResult> {
        let src = self
            .node(Role::Spoke, from)?
            .lan
            .as_ref()
            .ok_or_else(|| anyhow!("spoke{from} has no LAN"))?;
        src.ns
            .ping(&spoke_lan_host(to).to_string(), count, interval)
    }

    /// Spawn a continuous ping (tracked) from spoke `from`'s LAN host; output to a log file.
    pub fn spawn_lan_ping(
        &self,
        from: usize,
        to: usize,
        interval: &str,
        count: u32,
    ) -> Result<(u32, PathBuf)> {
        let src = self
            .node(Role::Spoke, from)?
            .lan
            .as_ref()
            .ok_or_else(|| anyhow!("spoke{from} has no LAN"))?;
        let seq = PING_SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = self.dir_path.join(format!("ping-{from}-{to}-{seq}.log"));
        let dst = spoke_lan_host(to).to_string();
        let count_s = count.to_string();
        let pid = src.ns.spawn(
            "ping",
            &[
                "ping", "-n", "-i", interval, "-c", &count_s, "-W", "1", &dst,
            ],
            &log,
            &[],
            Signal::SIGINT,
        )?;
        Ok((pid, log))
    }

    /// Replace spoke i's underlay address (NBMA change).
    pub fn renumber_spoke(&mut self, i: usize, new: Ipv4Addr) -> Result<()> {
        let node = self.node_mut(Role::Spoke, i)?;
        let old = format!("{}/24", node.nbma);
        // Without promotion, deleting the primary address also deletes the new (secondary)
        // one of the same subnet, and the interface would be left with none.
        node.ns.sysctl(
            &format!("net.ipv4.conf.{UNDERLAY_IF}.promote_secondaries"),
            "1",
        )?;
        node.ns
            .ip(&["addr", "add", &format!("{new}/24"), "dev", UNDERLAY_IF])?;
        node.ns.ip(&["addr", "del", &old, "dev", UNDERLAY_IF])?;
        node.nbma = new;
        Ok(())
    }

    /// Last `n` lines of every agent log, for failure reports.
    pub fn logs(&self, n: usize) -> String {
        let mut s = String::new();
        for node in self.nodes() {
            s.push_str(&format!(
                "===== {} log ({}), last {n} lines =====\n",
                node.label,
                node.log.display()
            ));
            s.push_str(&tail(&node.log, n));
            s.push('\n');
        }
        s
    }

    /// Stop agents (so that their leave traffic is captured), then the capture, then
    /// everything else; delete the namespaces. Idempotent.
    pub fn shutdown(&mut self) {
        let agents: Vec<u32> = self.nodes().filter_map(|n| n.agent_pid).collect();
        for pid in &agents {
            cleanup::signal(*pid, Signal::SIGTERM);
        }
        for pid in agents {
            cleanup::stop(pid, Duration::from_secs(3));
        }
        for n in self.hubs.iter_mut().chain(self.spokes.iter_mut()) {
            n.agent_pid = None;
        }
        if let Some(pid) = self.capture_pid.take() {
            // Let the last packets reach the file before tcpdump stops.
            thread::sleep(Duration::from_millis(500));
            cleanup::stop(pid, Duration::from_secs(3));
        }
        self.factory.cleanup();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::env::var_os("DMVPN_LAB_KEEP").is_some()
            && let Some(d) = self.dir.take()
        {
            cleanup::unregister_dir(d.path());
            eprintln!("keeping lab dir {} (configs, logs)", d.keep().display());
        }
        self.shutdown();
    }
}

/// The lab is IPv4-only: no IPv6 neighbour discovery noise in captures, no DAD delays.
fn ipv4_only(ns: &Netns) -> Result<()> {
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")
}

/// Last `n` lines of a file (empty if unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines.get(start..).unwrap_or_default().join("\n")
}
