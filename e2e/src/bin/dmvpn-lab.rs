//! `dmvpn-lab`: build a DMVPN of network namespaces with real `dmvpn-agent` processes, and
//! either keep it up (`up`) or run the end-to-end checks (`check`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use dmvpn_e2e::agent::locate_agent;
use dmvpn_e2e::checks;
use dmvpn_e2e::lab::{Lab, LabSpec};
use dmvpn_e2e::netns::require_root;

#[derive(Parser)]
#[command(
    name = "dmvpn-lab",
    version,
    about = "DMVPN lab in network namespaces (root only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the lab, run the agents, print the hub's `show dmvpn` every few seconds until Ctrl-C.
    Up {
        #[command(flatten)]
        lab: LabArgs,
        /// Seconds between two `show dmvpn` prints.
        #[arg(long, default_value_t = 5)]
        interval: u64,
    },
    /// Build the lab and run the end-to-end checks; the last stdout line is a JSON summary.
    Check {
        #[command(flatten)]
        lab: LabArgs,
    },
    /// Build only the namespaces and links (no agents) and check the underlay with pings.
    Underlay {
        #[arg(long, default_value_t = 3)]
        spokes: usize,
        #[arg(long, default_value_t = 1)]
        hubs: usize,
        /// Stay up until Ctrl-C after the checks.
        #[arg(long)]
        hold: bool,
        /// Capture the underlay bridge into this pcap file.
        #[arg(long)]
        pcap: Option<PathBuf>,
    },
    /// Measure single-stream TCP throughput (iperf3) LAN to LAN: plain veth, our tunnel
    /// (shortcut, via hub, clear GRE) and strongSwan kernel-libipsec, in one run.
    Bench(dmvpn_e2e::bench::BenchArgs),
}

#[derive(Args)]
struct LabArgs {
    /// Number of spokes (each with a LAN behind it).
    #[arg(long, default_value_t = 3)]
    spokes: usize,
    /// Number of hubs (1 or 2; spokes register with every hub).
    #[arg(long, default_value_t = 1)]
    hubs: usize,
    /// DMVPN phase: 1 hub-and-spoke, 2 data-driven resolution, 3 redirect + shortcut.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
    phase: u8,
    /// Capture the underlay bridge into this pcap file.
    #[arg(long)]
    pcap: Option<PathBuf>,
    /// The dmvpn-agent binary (default: next to this binary).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// NHRP holdtime in seconds given to every agent.
    #[arg(long, default_value_t = 30)]
    holdtime: u32,
    /// Run the tunnels without IPsec (GRE and NHRP in clear on the underlay).
    #[arg(long)]
    no_ipsec: bool,
}

impl LabArgs {
    fn spec(&self) -> Result<LabSpec> {
        let agent = locate_agent(self.agent.clone())?;
        let mut spec = LabSpec::new(agent);
        spec.spokes = self.spokes;
        spec.hubs = self.hubs;
        spec.phase = self.phase;
        spec.pcap = self.pcap.clone();
        spec.holdtime = self.holdtime;
        if self.no_ipsec {
            spec.ipsec_psk = None;
        }
        Ok(spec)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Up { lab, interval } => up(&lab, interval),
        Cmd::Check { lab } => check(&lab),
        Cmd::Underlay {
            spokes,
            hubs,
            hold,
            pcap,
        } => underlay(spokes, hubs, hold, pcap),
        Cmd::Bench(args) => dmvpn_e2e::bench::main(&args),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dmvpn-lab: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn build_and_start(args: &LabArgs) -> Result<Lab> {
    require_root()?;
    let spec = args.spec()?;
    let mut lab = Lab::build(spec)?;
    eprintln!(
        "lab {}: {} hub(s), {} spoke(s), phase {}, files in {}",
        lab.prefix(),
        lab.hubs.len(),
        lab.spokes.len(),
        lab.spec.phase,
        lab.dir().display()
    );
    if let Err(e) = lab.start_agents() {
        eprintln!("{}", lab.logs(50));
        return Err(e);
    }
    Ok(lab)
}

fn up(args: &LabArgs, interval: u64) -> Result<ExitCode> {
    let lab = build_and_start(args)?;
    let n = lab.spokes.len();
    let registered = lab.wait_registered(checks::REGISTER_TIMEOUT)?;
    if registered == n {
        eprintln!("all {n} spokes registered");
    } else {
        eprintln!(
            "only {registered} of {n} spokes registered within {} s; staying up anyway",
            checks::REGISTER_TIMEOUT.as_secs()
        );
    }
    eprintln!("namespaces: {}", lab.namespaces().join(" "));
    eprintln!(
        "try: ip netns exec {} ping {}   (Ctrl-C to stop and clean up)",
        lab.spoke(1)
            .lan
            .as_ref()
            .map(|l| l.ns.name())
            .unwrap_or_default(),
        dmvpn_e2e::lab::spoke_lan_host(n.min(2))
    );
    eprintln!(
        "     {} show nhrp cache --socket {}",
        lab.spec.agent.display(),
        lab.spoke(1).socket.display()
    );
    let hub = lab.hub(1);
    let started = Instant::now();
    loop {
        for h in &lab.hubs {
            let out = std::process::Command::new(&lab.spec.agent)
                .args(["show", "dmvpn", "--socket"])
                .arg(&h.socket)
                .output()
                .with_context(|| format!("cannot run {}", lab.spec.agent.display()))?;
            println!(
                "===== {} `show dmvpn` (lab up {} s) =====",
                h.label,
                started.elapsed().as_secs()
            );
            print!("{}", String::from_utf8_lossy(&out.stdout));
            if !out.status.success() {
                print!("{}", String::from_utf8_lossy(&out.stderr));
            }
        }
        if !hub.agent_running() {
            eprintln!(
                "{}'s agent exited; log:\n{}",
                hub.label,
                dmvpn_e2e::lab::tail(&hub.log, 50)
            );
            return Ok(ExitCode::from(1));
        }
        thread::sleep(Duration::from_secs(interval.max(1)));
    }
}

fn check(args: &LabArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let mut lab = match build_and_start(args) {
        Ok(l) => l,
        Err(e) => {
            // The JSON line is promised even when the lab could not be built.
            let line = serde_json::json!({
                "ok": false, "phase": args.phase, "spokes": args.spokes, "registered": 0,
                "shortcut_ms": null, "hub_forwarded_after_shortcut": null, "purged": false,
                "failures": [format!("setup: {e:#}")],
            });
            eprintln!("dmvpn-lab: error: {e:#}");
            println!("{line}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut report = checks::run(&mut lab);
    let capture = lab
        .spec
        .pcap
        .clone()
        .filter(|_| lab.spec.ipsec_psk.is_some());
    let logs = lab.logs(50);
    // The capture is complete once the lab is down (agents, then tcpdump, stopped).
    drop(lab);
    if let Some(pcap) = capture {
        checks::capture_check(&pcap, &mut report);
    }
    if !report.ok {
        eprintln!("{logs}");
        eprintln!("failed checks:");
        for f in &report.failures {
            eprintln!("  {f}");
        }
    }
    eprintln!(
        "{} checks passed, {} failed ({:.1} s)",
        report.passed.len(),
        report.failures.len(),
        started.elapsed().as_secs_f64()
    );
    println!("{}", checks::json_line(&report));
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn underlay(spokes: usize, hubs: usize, hold: bool, pcap: Option<PathBuf>) -> Result<ExitCode> {
    require_root()?;
    // No agent is started: any path satisfies the spec.
    let mut spec = LabSpec::new(PathBuf::from("/nonexistent/dmvpn-agent"));
    spec.spokes = spokes;
    spec.hubs = hubs;
    spec.pcap = pcap;
    let lab = Lab::build(spec)?;
    println!(
        "lab {} namespaces: {}",
        lab.prefix(),
        lab.namespaces().join(" ")
    );
    let failures = dmvpn_e2e::checks::underlay(&lab);
    for f in &failures {
        println!("FAIL {f}");
    }
    println!(
        "underlay: {}",
        if failures.is_empty() {
            "all pings answered"
        } else {
            "FAILED"
        }
    );
    if hold {
        println!("ready; Ctrl-C to clean up");
        loop {
            thread::sleep(Duration::from_secs(3600));
        }
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
