//! `dmvpn-lab bench`: single-stream TCP throughput (iperf3) between two LAN namespaces,
//! through several paths measured in the same run, round-robin so that load drift on a
//! noisy machine hits every path alike:
//!
//! - `veth-direct`: two namespaces joined by one veth pair (upper bound of the machine);
//! - `routed` (the baseline): the lab topology without agents, LAN1 → spoke1 → underlay
//!   bridge → spoke2 → LAN2 routed in clear: the same namespaces and hops as the tunnel;
//! - `ipsec-shortcut`: our agents, IKEv2 + ESP, phase 3, traffic over the spoke-to-spoke
//!   shortcut (the hub's forwarded counter is checked to stay still);
//! - `ipsec-hub`: our agents, IKEv2 + ESP, phase 1: every packet hairpins through the hub;
//! - `gre-shortcut`: our agents without IPsec (clear GRE), phase 3 shortcut;
//! - `strongswan`: the lab topology without agents, one charon per spoke namespace with the
//!   kernel-libipsec plugin (userspace ESP over TUN `ipsec0`, tunnel mode, always ESP-in-UDP
//!   4500), AES-GCM-256, LAN1 ↔ LAN2 traffic selectors.
//!
//! Per repetition: iperf3 `-t secs -O omit -J`, receiver bit rate, retransmits, the CPU time
//! of the data-path processes (agents, charons) from /proc/<pid>/stat, and the machine's busy
//! share from /proc/stat. Medians over the repetitions; ratios against `routed` and
//! `veth-direct` medians of the same run.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use nix::sys::signal::Signal;
use serde::Serialize;
use serde_json::Value;

use crate::agent::locate_agent;
use crate::checks;
use crate::cleanup;
use crate::lab::{self, Lab, LabSpec, Role};
use crate::netns::{Netns, NsFactory, require_root};

/// iperf3's default port.
const IPERF_PORT: u16 = 5201;
const CHARON: &str = "/usr/lib/ipsec/charon";
/// The strongSwan PSK (lab-only secret).
const SWAN_PSK: &str = "dmvpn-bench-strongswan-psk-0123456789";

/// Options of `dmvpn-lab bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Repetitions per path (round-robin over the paths).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub reps: u32,
    /// Seconds per iperf3 run (measured part, after --omit).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=300))]
    pub secs: u32,
    /// Seconds at the start of each run left out of the result (TCP slow start).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=30))]
    pub omit: u32,
    /// Paths to measure, comma-separated (default: all):
    /// veth-direct,routed,ipsec-shortcut,ipsec-hub,gre-shortcut,strongswan.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Write the full results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The dmvpn-agent binary (default: next to this binary).
    #[arg(long)]
    pub agent: Option<PathBuf>,
}

/// The measured paths, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    VethDirect,
    Routed,
    IpsecShortcut,
    IpsecUdpShortcut,
    IpsecHub,
    GreShortcut,
    Strongswan,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::VethDirect,
        Kind::Routed,
        Kind::IpsecShortcut,
        Kind::IpsecUdpShortcut,
        Kind::IpsecHub,
        Kind::GreShortcut,
        Kind::Strongswan,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::VethDirect => "veth-direct",
            Kind::Routed => "routed",
            Kind::IpsecShortcut => "ipsec-shortcut",
            Kind::IpsecUdpShortcut => "ipsec-udp-shortcut",
            Kind::IpsecHub => "ipsec-hub",
            Kind::GreShortcut => "gre-shortcut",
            Kind::Strongswan => "strongswan",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::VethDirect => "one veth pair between two namespaces",
            Kind::Routed => {
                "baseline: LAN1-spoke1-bridge-spoke2-LAN2 routed in clear (veth hops, no tunnel)"
            }
            Kind::IpsecShortcut => "dmvpn-agent, IKEv2+ESP, phase 3, spoke-to-spoke shortcut",
            Kind::IpsecUdpShortcut => {
                "dmvpn-agent, IKEv2+ESP in UDP 4500 (force_udp_encap: UDP GSO/GRO), phase 3 shortcut"
            }
            Kind::IpsecHub => "dmvpn-agent, IKEv2+ESP, phase 1, via the hub (hairpin)",
            Kind::GreShortcut => "dmvpn-agent, clear GRE (no IPsec), phase 3 shortcut",
            Kind::Strongswan => {
                "strongSwan charon kernel-libipsec, tunnel mode, ESP-in-UDP, AES-GCM-256"
            }
        }
    }

    fn parse(s: &str) -> Result<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s.trim())
            .ok_or_else(|| {
                anyhow!(
                    "unknown path {s:?} in --only; known: {}",
                    Kind::ALL.map(Kind::name).join(",")
                )
            })
    }

    fn uses_agents(self) -> bool {
        matches!(
            self,
            Kind::IpsecShortcut | Kind::IpsecUdpShortcut | Kind::IpsecHub | Kind::GreShortcut
        )
    }

    fn wants_shortcut(self) -> bool {
        matches!(
            self,
            Kind::IpsecShortcut | Kind::IpsecUdpShortcut | Kind::GreShortcut
        )
    }
}

/// One iperf3 run.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub gbps: f64,
    pub retransmits: u64,
    /// CPU of each data-path process during the run, in % of one core.
    pub proc_cpu: Vec<(String, f64)>,
    /// iperf3's own CPU (sender, receiver), % as iperf3 reports it.
    pub iperf_cpu_sender: f64,
    pub iperf_cpu_receiver: f64,
    /// Share of all cores busy during the run (whole machine, %).
    pub machine_busy: f64,
    /// Packets the hub forwarded during the run (agent paths only).
    pub hub_forwarded: Option<u64>,
    /// The sender's mean smoothed RTT and largest congestion window (iperf3 `streams[0]`):
    /// with few retransmits, throughput ≈ cwnd / RTT shows where the time goes.
    pub mean_rtt_ms: Option<f64>,
    pub max_cwnd_kib: Option<f64>,
}

/// Results of one path.
#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    pub kind: Kind,
    pub description: &'static str,
    pub samples: Vec<Sample>,
    pub errors: Vec<String>,
    pub median_gbps: Option<f64>,
    pub ratio_vs_routed: Option<f64>,
    pub ratio_vs_veth_direct: Option<f64>,
    /// TUN offload as the agents logged it at start (agent paths only).
    pub tun_offload: Option<bool>,
    /// MTU of the tunnel device in spoke 1 (dmvpn0 or ipsec0).
    pub tunnel_mtu: Option<u32>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_utc: String,
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub kernel: String,
    pub cpus: usize,
    pub iperf3: String,
    pub reps: u32,
    pub secs: u32,
    pub omit: u32,
    pub paths: Vec<PathResult>,
}

/// A path set up and ready to measure. Dropping it removes its namespaces and processes.
struct Setup {
    kind: Kind,
    /// Owns namespaces and processes of lab paths.
    lab: Option<Lab>,
    /// Owns the two namespaces of `veth-direct`, and its log dir.
    _factory: Option<(NsFactory, tempfile::TempDir)>,
    client: Netns,
    server: Ipv4Addr,
    /// Processes whose CPU time is reported (label, pid).
    procs: Vec<(String, u32)>,
    tun_offload: Option<bool>,
    tunnel_mtu: Option<u32>,
}

/// Entry point of `dmvpn-lab bench`: exit code 0 when every path was measured.
pub fn main(args: &BenchArgs) -> Result<std::process::ExitCode> {
    require_root()?;
    cleanup::install_signal_handler();
    let kinds: Vec<Kind> = if args.only.is_empty() {
        Kind::ALL.to_vec()
    } else {
        args.only
            .iter()
            .map(|s| Kind::parse(s))
            .collect::<Result<_>>()?
    };
    which("iperf3", "apt-get install iperf3")?;
    let report = run(args, &kinds)?;
    let md = markdown(&report, args);
    print!("{md}");
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&report).context("cannot render JSON")?;
        std::fs::write(p, text + "\n").with_context(|| format!("cannot write {}", p.display()))?;
        eprintln!("bench: JSON written to {}", p.display());
    }
    let ok = report
        .paths
        .iter()
        .all(|p| p.errors.is_empty() && !p.samples.is_empty());
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}

fn run(args: &BenchArgs, kinds: &[Kind]) -> Result<Report> {
    let agent = if kinds.iter().any(|k| k.uses_agents()) {
        Some(locate_agent(args.agent.clone())?)
    } else {
        None
    };
    let started_utc = cmd_out(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]));
    let loadavg_before = loadavg();
    let mut results: Vec<PathResult> = kinds
        .iter()
        .map(|&kind| PathResult {
            kind,
            description: kind.describe(),
            samples: Vec::new(),
            errors: Vec::new(),
            median_gbps: None,
            ratio_vs_routed: None,
            ratio_vs_veth_direct: None,
            tun_offload: None,
            tunnel_mtu: None,
        })
        .collect();
    // All paths stay up together so that each repetition measures them back to back.
    let mut setups: Vec<Option<Setup>> = Vec::new();
    for r in results.iter_mut() {
        eprintln!("bench: setting up {}", r.kind.name());
        match setup(r.kind, agent.as_deref()) {
            Ok(s) => {
                r.tun_offload = s.tun_offload;
                r.tunnel_mtu = s.tunnel_mtu;
                setups.push(Some(s));
            }
            Err(e) => {
                eprintln!("bench: {} setup failed: {e:#}", r.kind.name());
                r.errors.push(format!("setup: {e:#}"));
                setups.push(None);
            }
        }
    }
    for rep in 1..=args.reps {
        for (r, s) in results.iter_mut().zip(setups.iter_mut()) {
            let Some(s) = s else { continue };
            match measure(s, args) {
                Ok(sample) => {
                    eprintln!(
                        "bench: rep {rep}/{} {:<15} {:6.2} Gbit/s  retr {:5}  cpu {}  busy {:.0}%",
                        args.reps,
                        r.kind.name(),
                        sample.gbps,
                        sample.retransmits,
                        cpu_text(&sample.proc_cpu),
                        sample.machine_busy
                    );
                    r.samples.push(sample);
                }
                Err(e) => {
                    eprintln!("bench: rep {rep} {} failed: {e:#}", r.kind.name());
                    if let Some(lab) = &s.lab {
                        eprintln!("{}", lab.logs(20));
                    }
                    r.errors.push(format!("rep {rep}: {e:#}"));
                }
            }
        }
    }
    drop(setups);
    for r in results.iter_mut() {
        r.median_gbps = median(r.samples.iter().map(|s| s.gbps).collect());
    }
    let base = |k: Kind| {
        results
            .iter()
            .find(|r| r.kind == k)
            .and_then(|r| r.median_gbps)
    };
    let (routed, direct) = (base(Kind::Routed), base(Kind::VethDirect));
    for r in results.iter_mut() {
        r.ratio_vs_routed = ratio(r.median_gbps, routed);
        r.ratio_vs_veth_direct = ratio(r.median_gbps, direct);
    }
    Ok(Report {
        started_utc,
        loadavg_before,
        loadavg_after: loadavg(),
        kernel: cmd_out(Command::new("uname").arg("-r")),
        cpus: thread::available_parallelism().map_or(0, |n| n.get()),
        iperf3: cmd_out(Command::new("iperf3").arg("--version"))
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        reps: args.reps,
        secs: args.secs,
        omit: args.omit,
        paths: results,
    })
}

fn ratio(x: Option<f64>, base: Option<f64>) -> Option<f64> {
    match (x, base) {
        (Some(x), Some(b)) if b > 0.0 => Some(x / b),
        _ => None,
    }
}

/// Median (mean of the two middle values for an even count); None when empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return None;
    }
    let hi = *v.get(n / 2)?;
    if n % 2 == 1 {
        Some(hi)
    } else {
        Some((*v.get(n / 2 - 1)? + hi) / 2.0)
    }
}

fn setup(kind: Kind, agent: Option<&Path>) -> Result<Setup> {
    match kind {
        Kind::VethDirect => setup_veth(),
        Kind::Routed => setup_routed(),
        Kind::Strongswan => setup_strongswan(),
        Kind::IpsecShortcut | Kind::IpsecUdpShortcut | Kind::IpsecHub | Kind::GreShortcut => {
            let agent = agent.ok_or_else(|| anyhow!("no agent binary"))?;
            setup_agents(kind, agent)
        }
    }
}

fn setup_veth() -> Result<Setup> {
    let factory = NsFactory::new();
    let a = factory.create("vethA")?;
    let b = factory.create("vethB")?;
    for ns in [&a, &b] {
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    }
    a.veth_to("eth0", &b, "eth0")?;
    a.addr_add("eth0", "10.98.0.1/24")?;
    b.addr_add("eth0", "10.98.0.2/24")?;
    let server = Ipv4Addr::new(10, 98, 0, 2);
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-", factory.prefix()))
        .tempdir()
        .context("cannot create a temp dir")?;
    start_iperf_server(&b, server, dir.path(), factory.prefix())?;
    Ok(Setup {
        kind: Kind::VethDirect,
        lab: None,
        _factory: Some((factory, dir)),
        client: a,
        server,
        procs: Vec::new(),
        tun_offload: None,
        tunnel_mtu: None,
    })
}

/// A two-spoke lab without agents (the hub namespace exists but stays idle).
fn bare_lab() -> Result<Lab> {
    // No agent runs: any path satisfies the spec.
    let mut spec = LabSpec::new(PathBuf::from("/nonexistent/dmvpn-agent"));
    spec.spokes = 2;
    spec.hubs = 1;
    Lab::build(spec)
}

fn lan_pair(lab: &Lab) -> Result<(Netns, Netns)> {
    let l1 = lab.node(Role::Spoke, 1)?.lan.as_ref();
    let l2 = lab.node(Role::Spoke, 2)?.lan.as_ref();
    match (l1, l2) {
        (Some(a), Some(b)) => Ok((a.ns.clone(), b.ns.clone())),
        _ => bail!("the lab's spokes have no LANs"),
    }
}

fn setup_routed() -> Result<Setup> {
    let lab = bare_lab()?;
    let (s1, s2) = (lab.node(Role::Spoke, 1)?, lab.node(Role::Spoke, 2)?);
    let nbma1 = lab::spoke_nbma(1).to_string();
    let nbma2 = lab::spoke_nbma(2).to_string();
    s1.ns
        .route_replace(&lab::spoke_lan_prefix(2), &["via", &nbma2])?;
    s2.ns
        .route_replace(&lab::spoke_lan_prefix(1), &["via", &nbma1])?;
    finish_lab_setup(Kind::Routed, lab, Vec::new(), None, None)
}

fn finish_lab_setup(
    kind: Kind,
    lab: Lab,
    procs: Vec<(String, u32)>,
    tun_offload: Option<bool>,
    tunnel_mtu: Option<u32>,
) -> Result<Setup> {
    let (client, server_ns) = lan_pair(&lab)?;
    let server = lab::spoke_lan_host(2);
    let ping = client.ping(&server.to_string(), 5, "0.1")?;
    if !ping.ok() {
        bail!(
            "LAN1 cannot ping LAN2 ({server}) through the {} path",
            kind.name()
        );
    }
    start_iperf_server(&server_ns, server, lab.dir(), lab.prefix())?;
    Ok(Setup {
        kind,
        lab: Some(lab),
        _factory: None,
        client,
        server,
        procs,
        tun_offload,
        tunnel_mtu,
    })
}

fn setup_agents(kind: Kind, agent: &Path) -> Result<Setup> {
    let mut spec = LabSpec::new(agent.to_path_buf());
    spec.spokes = 2;
    spec.hubs = 1;
    spec.phase = if kind == Kind::IpsecHub { 1 } else { 3 };
    if kind == Kind::GreShortcut {
        spec.ipsec_psk = None;
    }
    if kind == Kind::IpsecUdpShortcut {
        spec.tweak = Some(Box::new(|_, t: &mut toml::Table| {
            if let Some(toml::Value::Table(ipsec)) = t.get_mut("ipsec") {
                ipsec.insert("force_udp_encap".into(), toml::Value::Boolean(true));
            }
        }));
    }
    let mut lab = Lab::build(spec)?;
    if let Err(e) = lab.start_agents() {
        eprintln!("{}", lab.logs(30));
        return Err(e);
    }
    let n = lab.wait_registered(checks::REGISTER_TIMEOUT)?;
    if n != 2 {
        eprintln!("{}", lab.logs(30));
        bail!(
            "only {n} of 2 spokes registered within {} s",
            checks::REGISTER_TIMEOUT.as_secs()
        );
    }
    let mut procs = Vec::new();
    let mut offload = Vec::new();
    for node in lab.nodes() {
        if let Some(pid) = node.agent_pid {
            procs.push((node.label.clone(), pid));
        }
        offload.push(logged_offload(&node.log));
    }
    // Offload is "on" only when every agent logged it on.
    let tun_offload = if offload.iter().all(Option::is_some) {
        Some(offload.iter().all(|o| *o == Some(true)))
    } else {
        None
    };
    let mtu = link_mtu(&lab.node(Role::Spoke, 1)?.ns, lab::TUN_NAME);
    let setup = finish_lab_setup(kind, lab, procs, tun_offload, mtu)?;
    if kind.wants_shortcut() {
        ensure_shortcut(&setup)?;
    }
    Ok(setup)
}

/// The `offload` field of the agent's "userspace data plane started" log line.
fn logged_offload(log: &Path) -> Option<bool> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .find(|l| l.contains("userspace data plane started"))?;
    if line.contains("offload=true") {
        Some(true)
    } else if line.contains("offload=false") {
        Some(false)
    } else {
        None
    }
}

fn link_mtu(ns: &Netns, dev: &str) -> Option<u32> {
    let out = ns.ip(&["-o", "link", "show", "dev", dev]).ok()?;
    let mut w = out.split_whitespace();
    while let Some(t) = w.next() {
        if t == "mtu" {
            return w.next()?.parse().ok();
        }
    }
    None
}

/// Traffic LAN1 → LAN2 until spoke 1 holds a shortcut to spoke 2 (phase 3 paths). An idle
/// shortcut may have been purged between repetitions: this runs before each one.
fn ensure_shortcut(s: &Setup) -> Result<()> {
    let lab = s.lab.as_ref().ok_or_else(|| anyhow!("no lab"))?;
    let dst = lab::spoke_lan_host(2);
    let nbma = lab::spoke_nbma(2);
    let start = Instant::now();
    let deadline = start + checks::SHORTCUT_TIMEOUT;
    loop {
        lab.lan_ping(1, 2, 3, "0.05")?;
        if checks::wait_shortcut(
            lab,
            1,
            dst,
            nbma,
            Instant::now(),
            Duration::from_millis(200),
        )
        .is_some()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "spoke1 has no shortcut to {dst} (NBMA {nbma}) within {} s",
                checks::SHORTCUT_TIMEOUT.as_secs()
            );
        }
    }
    // The shortcut's SA may still be negotiating: wait for the path to answer directly.
    let hub_before = checks::hub_forwarded(lab)?;
    let p = lab.lan_ping(1, 2, 5, "0.05")?;
    let hub_after = checks::hub_forwarded(lab)?;
    if !p.ok() {
        bail!("no ping reply over the shortcut to {dst}");
    }
    if hub_after > hub_before {
        eprintln!(
            "bench: {}: hub still forwarded {} packets after the shortcut formed",
            s.kind.name(),
            hub_after - hub_before
        );
    }
    Ok(())
}

fn setup_strongswan() -> Result<Setup> {
    if !Path::new(CHARON).is_file() {
        bail!(
            "{CHARON} not found: install strongswan-charon and libcharon-extra-plugins (/work/shared/tools/setup-host.sh)"
        );
    }
    which("swanctl", "apt-get install strongswan-swanctl")?;
    let lab = bare_lab()?;
    let mut procs = Vec::new();
    for (i, id) in [(1usize, "a"), (2usize, "b")] {
        let j = 3 - i;
        let dir = lab.dir().join(format!("swan-{id}"));
        write_charon_files(&dir, i, j, id)?;
        let ns = &lab.node(Role::Spoke, i)?.ns;
        let conf = dir.join("strongswan.conf");
        // charon's pid file /var/run/charon.pid is fixed: a private mount namespace with its
        // own /run keeps the two instances (and any host charon) apart.
        let script = format!(
            "mount -t tmpfs tmpfs /run && STRONGSWAN_CONF='{}' exec {CHARON}",
            conf.display()
        );
        let pid = ns.spawn(
            &format!("charon spoke{i}"),
            &[
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ],
            &dir.join("charon.stdout"),
            &[],
            Signal::SIGTERM,
        )?;
        procs.push((format!("charon{i}"), pid));
    }
    for (_, id) in [(1, "a"), (2, "b")] {
        let dir = lab.dir().join(format!("swan-{id}"));
        let sock = dir.join("charon.vici");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if Instant::now() > deadline {
                bail!(
                    "charon ({id}) opened no vici socket {} within 10 s; log:\n{}",
                    sock.display(),
                    lab::tail(&dir.join("charon.log"), 20)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        swanctl(
            &dir,
            &[
                "--load-all",
                "--file",
                &dir.join("swanctl.conf").to_string_lossy(),
            ],
        )?;
    }
    let dir_a = lab.dir().join("swan-a");
    swanctl(&dir_a, &["--initiate", "--child", "lan", "--timeout", "20"]).with_context(|| {
        format!(
            "strongSwan CHILD_SA did not come up; charon log:\n{}",
            lab::tail(&dir_a.join("charon.log"), 20)
        )
    })?;
    let mtu = link_mtu(&lab.node(Role::Spoke, 1)?.ns, "ipsec0");
    let s = finish_lab_setup(Kind::Strongswan, lab, procs, None, mtu)?;
    let sas = swanctl(&dir_a, &["--list-sas"])?;
    if !sas.contains("INSTALLED, TUNNEL-in-UDP, ESP:AES_GCM_16-256") {
        bail!("unexpected strongSwan CHILD_SA (want TUNNEL-in-UDP, AES_GCM_16-256):\n{sas}");
    }
    Ok(s)
}

fn write_charon_files(dir: &Path, i: usize, j: usize, id: &str) -> Result<()> {
    // swanctl wants the credential directories next to swanctl.conf.
    for sub in [
        "x509", "x509ca", "x509ocsp", "x509aa", "x509ac", "x509crl", "pubkey", "private", "rsa",
        "ecdsa", "bliss", "pkcs8", "pkcs12",
    ] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let d = dir.display();
    // strongSwan 5.9.8 needs the `kdf` plugin explicitly with load_modular = no.
    let conf = format!(
        "charon {{\n  load_modular = no\n  load = random nonce openssl aes sha1 sha2 hmac kdf gcm \
         pem pkcs1 x509 pubkey curve25519 kernel-libipsec kernel-netlink socket-default vici \
         updown\n  filelog {{\n    log {{\n      path = {d}/charon.log\n      time_format = %T\n      \
         default = 1\n      flush_line = yes\n    }}\n  }}\n  plugins {{\n    vici {{ socket = \
         unix://{d}/charon.vici }}\n  }}\n}}\nswanctl {{ socket = unix://{d}/charon.vici }}\n"
    );
    let other = if id == "a" { "b" } else { "a" };
    let swanctl = format!(
        "connections {{\n  lan {{\n    version = 2\n    local_addrs = {la}\n    remote_addrs = {ra}\n    \
         proposals = aes256gcm16-prfsha256-x25519\n    local {{\n      auth = psk\n      id = {id}\n    }}\n    \
         remote {{\n      auth = psk\n      id = {other}\n    }}\n    children {{\n      lan {{\n        \
         local_ts = {lts}\n        remote_ts = {rts}\n        esp_proposals = aes256gcm16\n        \
         mode = tunnel\n        start_action = none\n      }}\n    }}\n  }}\n}}\nsecrets {{\n  ike-1 {{\n    \
         id-1 = a\n    id-2 = b\n    secret = \"{SWAN_PSK}\"\n  }}\n}}\n",
        la = lab::spoke_nbma(i),
        ra = lab::spoke_nbma(j),
        lts = lab::spoke_lan_prefix(i),
        rts = lab::spoke_lan_prefix(j),
    );
    std::fs::write(dir.join("strongswan.conf"), conf)
        .with_context(|| format!("cannot write {d}/strongswan.conf"))?;
    std::fs::write(dir.join("swanctl.conf"), swanctl)
        .with_context(|| format!("cannot write {d}/swanctl.conf"))?;
    Ok(())
}

/// `swanctl ARGS` against the charon whose files are in `dir` (a unix socket: works from
/// the root namespace without touching its network).
fn swanctl(dir: &Path, args: &[&str]) -> Result<String> {
    let uri = format!("unix://{}", dir.join("charon.vici").display());
    let out = Command::new("swanctl")
        .args(args)
        .args(["--uri", &uri])
        .env("STRONGSWAN_CONF", dir.join("strongswan.conf"))
        .stdin(Stdio::null())
        .output()
        .context("cannot run swanctl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "swanctl {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(text)
}

fn start_iperf_server(ns: &Netns, addr: Ipv4Addr, dir: &Path, tag: &str) -> Result<u32> {
    let log = dir.join(format!("{tag}-iperf3-server.log"));
    let a = addr.to_string();
    let pid = ns.spawn(
        "iperf3 server",
        &["iperf3", "-s", "-B", &a, "-p", &IPERF_PORT.to_string()],
        &log,
        &[],
        Signal::SIGTERM,
    )?;
    let filter = format!("sport = :{IPERF_PORT}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if !cleanup::is_running(pid) {
            bail!("iperf3 server exited at start: {}", lab::tail(&log, 10));
        }
        let out = ns.exec(&["ss", "-Hltn", &filter]).unwrap_or_default();
        if out.contains(&a) {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            bail!("iperf3 server did not listen on {a}:{IPERF_PORT} within 5 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn measure(s: &Setup, args: &BenchArgs) -> Result<Sample> {
    if s.kind.wants_shortcut() {
        ensure_shortcut(s)?;
    }
    let hub_before = match &s.lab {
        Some(l) if s.kind.uses_agents() => Some(checks::hub_forwarded(l)?),
        _ => None,
    };
    let cpu0: Vec<Option<u64>> = s.procs.iter().map(|(_, p)| proc_ticks(*p)).collect();
    let m0 = machine_ticks();
    let t0 = Instant::now();
    let json = iperf_client(s, args)?;
    let wall = t0.elapsed().as_secs_f64();
    let m1 = machine_ticks();
    let tick = clk_tck();
    let proc_cpu = s
        .procs
        .iter()
        .zip(cpu0)
        .map(|((label, pid), before)| {
            let pct = match (before, proc_ticks(*pid)) {
                (Some(a), Some(b)) => b.saturating_sub(a) as f64 / tick / wall * 100.0,
                _ => f64::NAN,
            };
            (label.clone(), pct)
        })
        .collect();
    let machine_busy = match (m0, m1) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            b1.saturating_sub(b0) as f64 / (t1 - t0) as f64 * 100.0
        }
        _ => f64::NAN,
    };
    let hub_forwarded = match (&s.lab, hub_before) {
        (Some(l), Some(b)) => Some(checks::hub_forwarded(l)?.saturating_sub(b)),
        _ => None,
    };
    let num = |p: &str| json.pointer(p).and_then(Value::as_f64);
    let bps = num("/end/sum_received/bits_per_second")
        .ok_or_else(|| anyhow!("iperf3 JSON has no end.sum_received.bits_per_second"))?;
    Ok(Sample {
        gbps: bps / 1e9,
        retransmits: json
            .pointer("/end/sum_sent/retransmits")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        proc_cpu,
        iperf_cpu_sender: num("/end/cpu_utilization_percent/host_total").unwrap_or(f64::NAN),
        iperf_cpu_receiver: num("/end/cpu_utilization_percent/remote_total").unwrap_or(f64::NAN),
        machine_busy,
        hub_forwarded,
        mean_rtt_ms: num("/end/streams/0/sender/mean_rtt").map(|us| us / 1000.0),
        max_cwnd_kib: num("/end/streams/0/sender/max_snd_cwnd").map(|b| b / 1024.0),
    })
}

/// One iperf3 client run from the client namespace, killed if it overruns by 30 s.
fn iperf_client(s: &Setup, args: &BenchArgs) -> Result<Value> {
    let secs = args.secs.to_string();
    let omit = args.omit.to_string();
    let server = s.server.to_string();
    let port = IPERF_PORT.to_string();
    let argv = [
        "iperf3",
        "-c",
        &server,
        "-p",
        &port,
        "-t",
        &secs,
        "-O",
        &omit,
        "-J",
        "--connect-timeout",
        "3000",
    ];
    let mut cmd = s.client.command(&argv);
    let out_file = tempfile::tempfile().context("cannot create a temp file for iperf3")?;
    let err_file = tempfile::tempfile().context("cannot create a temp file for iperf3")?;
    cmd.stdin(Stdio::null())
        .stdout(out_file.try_clone()?)
        .stderr(err_file.try_clone()?);
    let mut child = cmd.spawn().context("cannot run iperf3")?;
    let limit = Duration::from_secs(u64::from(args.secs + args.omit) + 30);
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("iperf3 client did not finish within {} s", limit.as_secs());
        }
        thread::sleep(Duration::from_millis(50));
    };
    let text = read_back(out_file)?;
    let json: Value = serde_json::from_str(&text)
        .with_context(|| format!("iperf3 output is not JSON ({status}): {}", trunc(&text)))?;
    if let Some(e) = json.get("error").and_then(Value::as_str) {
        bail!("iperf3 ({status}): {e}; {}", read_back(err_file)?.trim());
    }
    if !status.success() {
        bail!(
            "iperf3 exited with {status}: {}",
            read_back(err_file)?.trim()
        );
    }
    Ok(json)
}

fn read_back(mut f: std::fs::File) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    f.seek(SeekFrom::Start(0))?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    Ok(s)
}

fn trunc(s: &str) -> String {
    s.chars().take(400).collect()
}

/// utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/<pid>/stat; the
/// command name may contain spaces and parentheses, so fields are counted after the last ')').
pub fn proc_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_proc_ticks(&text)
}

fn parse_proc_ticks(text: &str) -> Option<u64> {
    let rest = text.get(text.rfind(')')? + 1..)?;
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// (busy, total) jiffies over all CPUs from the first line of /proc/stat.
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_ticks(text.lines().next()?)
}

fn parse_machine_ticks(line: &str) -> Option<(u64, u64)> {
    let mut w = line.split_whitespace();
    if w.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let v: Vec<u64> = w.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

fn clk_tck() -> f64 {
    cmd_out(Command::new("getconf").arg("CLK_TCK"))
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cmd_out(cmd: &mut Command) -> String {
    cmd.stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn which(prog: &str, fix: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()));
    if !found {
        bail!("{prog} not found in PATH: {fix}");
    }
    Ok(())
}

fn cpu_text(v: &[(String, f64)]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|(l, c)| format!("{l} {c:.0}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report as markdown: a header with the machine state and one row per path.
pub fn markdown(r: &Report, args: &BenchArgs) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### TCP throughput, single stream (iperf3 -t {} -O {}, {} repetitions, round-robin)\n",
        r.secs, r.omit, r.reps
    );
    let _ = writeln!(
        s,
        "- started {} · kernel {} · {} CPUs · {} · load average before {} / after {}",
        r.started_utc, r.kernel, r.cpus, r.iperf3, r.loadavg_before, r.loadavg_after
    );
    let _ = writeln!(
        s,
        "- command: `dmvpn-lab bench --reps {} --secs {} --omit {}{}`\n",
        args.reps,
        args.secs,
        args.omit,
        if args.only.is_empty() {
            String::new()
        } else {
            format!(" --only {}", args.only.join(","))
        }
    );
    let _ = writeln!(
        s,
        "| path | median Gbit/s | min–max | vs routed | vs veth-direct | retransmits (median) | mean RTT ms / max cwnd KiB (median) | data-path CPU, % of a core (median) | machine busy | TUN offload | tunnel MTU |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|");
    for p in &r.paths {
        let g: Vec<f64> = p.samples.iter().map(|x| x.gbps).collect();
        let lo = g.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = g.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let f2 = |x: Option<f64>| x.map_or("–".to_string(), |v| format!("{v:.2}"));
        let retr = median(p.samples.iter().map(|x| x.retransmits as f64).collect());
        let busy = median(p.samples.iter().map(|x| x.machine_busy).collect());
        let rtt = median(
            p.samples
                .iter()
                .map(|x| x.mean_rtt_ms.unwrap_or(f64::NAN))
                .collect(),
        );
        let cwnd = median(
            p.samples
                .iter()
                .map(|x| x.max_cwnd_kib.unwrap_or(f64::NAN))
                .collect(),
        );
        let rtt_cwnd = format!(
            "{} / {}",
            rtt.map_or("–".into(), |v| format!("{v:.2}")),
            cwnd.map_or("–".into(), |v| format!("{v:.0}"))
        );
        let labels: Vec<String> = p
            .samples
            .first()
            .map(|x| x.proc_cpu.iter().map(|(l, _)| l.clone()).collect())
            .unwrap_or_default();
        let cpu = if labels.is_empty() {
            "–".to_string()
        } else {
            labels
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let m = median(
                        p.samples
                            .iter()
                            .filter_map(|x| x.proc_cpu.get(i).map(|c| c.1))
                            .collect(),
                    );
                    format!("{l} {}", m.map_or("?".into(), |v| format!("{v:.0}")))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let range = if g.is_empty() {
            "–".into()
        } else {
            format!("{lo:.2}–{hi:.2}")
        };
        let name = if p.errors.is_empty() {
            format!("`{}`", p.kind.name())
        } else {
            format!("`{}` (errors: {})", p.kind.name(), p.errors.len())
        };
        let _ = writeln!(
            s,
            "| {name} | {} | {range} | {} | {} | {} | {rtt_cwnd} | {cpu} | {} | {} | {} |",
            f2(p.median_gbps),
            f2(p.ratio_vs_routed),
            f2(p.ratio_vs_veth_direct),
            retr.map_or("–".into(), |v| format!("{v:.0}")),
            busy.map_or("–".into(), |v| format!("{v:.0}%")),
            match p.tun_offload {
                Some(true) => "on",
                Some(false) => "off",
                None => "–",
            },
            p.tunnel_mtu.map_or("–".into(), |m| m.to_string()),
        );
    }
    let _ = writeln!(s);
    for p in &r.paths {
        let _ = writeln!(s, "- `{}`: {}", p.kind.name(), p.description);
        if let Some(h) = p
            .samples
            .iter()
            .filter_map(|x| x.hub_forwarded)
            .max()
            .filter(|_| p.kind.uses_agents())
        {
            let _ = writeln!(s, "  - hub forwarded at most {h} packets during a run");
        }
        for e in &p.errors {
            let _ = writeln!(s, "  - error: {}", e.lines().next().unwrap_or_default());
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn proc_stat_fields_after_comm() {
        // comm with spaces and a ')' inside: fields are counted after the last ')'.
        let line = "1234 (dmvpn (x) a) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 \
                    100 0 0";
        assert_eq!(parse_proc_ticks(line), Some(325));
        assert_eq!(parse_proc_ticks("1234 (x) S 1"), None);
        assert_eq!(parse_proc_ticks(""), None);
    }

    #[test]
    fn machine_busy_from_proc_stat() {
        let l = "cpu  100 5 50 800 40 1 4 0 0 0";
        assert_eq!(parse_machine_ticks(l), Some((160, 1000)));
        assert_eq!(parse_machine_ticks("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse_machine_ticks("cpu 1 2"), None);
    }

    #[test]
    fn kinds_parse_by_name() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.name()).unwrap(), k);
        }
        assert!(Kind::parse("ipsec").is_err());
    }

    #[test]
    fn offload_from_agent_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.log");
        std::fs::write(
            &p,
            "x\n2026 INFO userspace data plane started tun=dmvpn0 mtu=1400 offload=true ipsec=true\n",
        )
        .unwrap();
        assert_eq!(logged_offload(&p), Some(true));
        std::fs::write(&p, "userspace data plane started offload=false\n").unwrap();
        assert_eq!(logged_offload(&p), Some(false));
        std::fs::write(&p, "nothing\n").unwrap();
        assert_eq!(logged_offload(&p), None);
    }
}
