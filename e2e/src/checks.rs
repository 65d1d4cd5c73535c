//! The end-to-end checks of `dmvpn-lab check`, shared with the integration tests.

use std::net::Ipv4Addr;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::signal::Signal;
use serde::Serialize;

use crate::cleanup;
use crate::lab::{Lab, Role, spoke_lan_host};
use crate::netns::PingResult;

/// How long spokes get to register.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a shortcut gets to form once traffic flows.
pub const SHORTCUT_TIMEOUT: Duration = Duration::from_secs(10);
/// Burst sent after the shortcut formed (or, in phase 1, after waiting).
pub const BURST: u32 = 50;

/// Result of `dmvpn-lab check` (serialised as the last stdout line).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub ok: bool,
    pub phase: u8,
    pub spokes: usize,
    pub hubs: usize,
    /// Spokes registered at every hub.
    pub registered: usize,
    /// From the first LAN packet to spoke 1's shortcut towards spoke 2's LAN (phase 2/3).
    pub shortcut_ms: Option<u64>,
    /// Hub data packets forwarded (hairpinned) while the post-shortcut burst ran.
    pub hub_forwarded_after_shortcut: Option<u64>,
    /// Hub forwarded packets during the first (pre-shortcut) traffic.
    pub hub_forwarded_before_shortcut: Option<u64>,
    pub lan_ping_sent: u32,
    pub lan_ping_received: u32,
    pub burst_sent: u32,
    pub burst_received: u32,
    pub purged: bool,
    pub purge_ms: Option<u64>,
    /// IPsec: time to establish the spoke1-spoke2 SA (from the initiator's first IKE_SA_INIT
    /// to its CHILD SA), as the initiating spoke reports it in `show dmvpn`.
    pub ike_ms: Option<f64>,
    /// IPsec with `--pcap`: ESP packets on the underlay, and IPv4 packets from the NBMA
    /// network that were neither IKE (UDP 500/4500) nor ESP after the first IKE packet.
    pub underlay_esp_packets: Option<u64>,
    pub underlay_clear_packets: Option<u64>,
    /// Names and messages of the checks that failed.
    pub failures: Vec<String>,
    /// Checks that passed, in order.
    pub passed: Vec<String>,
}

impl Report {
    fn pass(&mut self, name: &str, detail: impl AsRef<str>) {
        let line = format!("PASS {name}: {}", detail.as_ref());
        println!("{line}");
        self.passed.push(name.to_string());
    }

    fn fail(&mut self, name: &str, detail: impl AsRef<str>) {
        let line = format!("FAIL {name}: {}", detail.as_ref());
        println!("{line}");
        self.failures.push(format!("{name}: {}", detail.as_ref()));
    }

    fn check(&mut self, name: &str, ok: bool, detail: impl AsRef<str>) -> bool {
        if ok {
            self.pass(name, detail);
        } else {
            self.fail(name, detail);
        }
        ok
    }
}

/// `established_ms` of the IKE peer `nbma` in a spoke's `show dmvpn`.
fn established_ms(lab: &Lab, spoke: usize, nbma: Ipv4Addr) -> Option<f64> {
    let d = lab.spoke(spoke).control("show_dmvpn").ok()?;
    d.pointer("/ipsec/peers")?
        .as_array()?
        .iter()
        .find(|p| p["nbma_address"] == nbma.to_string())
        .and_then(|p| p["established_ms"].as_f64())
}

/// The spoke-to-spoke SA is up; its set-up time is `ike_ms`.
fn ike_check(lab: &Lab, r: &mut Report) {
    let (n1, n2) = (lab.spoke(1).nbma, lab.spoke(2).nbma);
    // Whichever spoke initiated measured it (both may have, at once).
    r.ike_ms = [established_ms(lab, 1, n2), established_ms(lab, 2, n1)]
        .into_iter()
        .flatten()
        .reduce(f64::min);
    r.check(
        "ike",
        r.ike_ms.is_some(),
        match r.ike_ms {
            Some(ms) => format!("spoke1-spoke2 IPsec SA established in {ms} ms"),
            None => "no IPsec SA between spoke1 and spoke2 in show dmvpn".to_string(),
        },
    );
}

/// tcpdump's `-tt` lines of `pcap` matching `filter`; their timestamps and count.
fn capture_times(pcap: &std::path::Path, filter: &str) -> Result<Vec<f64>> {
    let out = std::process::Command::new("tcpdump")
        .args(["-tt", "-nn", "-r"])
        .arg(pcap)
        .arg(filter)
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "tcpdump -r {}: {}",
            pcap.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect())
}

/// IPsec with a capture (read after the lab is down): from the first IKE packet on, only
/// IKE (UDP 500/4500) and ESP leave the NBMA addresses. ICMP unreachables about UDP are
/// allowed (IKE reaching a node whose agent is not listening yet or any more).
pub fn capture_check(pcap: &std::path::Path, r: &mut Report) {
    let res = (|| -> Result<(u64, u64, Option<f64>)> {
        let start = capture_times(pcap, "udp port 500")?.into_iter().next();
        let esp = capture_times(pcap, "ip proto 50")?.len() as u64;
        let clear = capture_times(
            pcap,
            "ip and src net 198.51.100.0/24 and not (ip proto 50 or udp port 500 or udp port 4500)              and not (icmp[icmptype] == icmp-unreach and icmp[17] == 17)",
        )?
        .into_iter()
        .filter(|t| start.is_some_and(|s| *t >= s))
        .count() as u64;
        Ok((esp, clear, start))
    })();
    match res {
        Ok((esp, clear, start)) => {
            r.underlay_esp_packets = Some(esp);
            r.underlay_clear_packets = Some(clear);
            r.check(
                "encrypted-underlay",
                start.is_some() && esp > 0 && clear == 0,
                format!(
                    "after the first IKE packet the underlay carried {esp} ESP packets and {clear} others (GRE, NHRP or data in clear)"
                ),
            );
        }
        Err(e) => r.fail("encrypted-underlay", format!("reading the capture: {e:#}")),
    }
    r.ok = r.failures.is_empty();
}

/// Sum of the hubs' forwarded (hairpinned) data packet counters.
pub fn hub_forwarded(lab: &Lab) -> Result<u64> {
    let mut sum = 0;
    for h in lab.hubs.iter().filter(|h| h.agent_running()) {
        sum += h.snapshot()?.hub_forwarded();
    }
    Ok(sum)
}

/// Poll spoke `from`'s cache every few ms until it holds a shortcut towards `dst` with the
/// NBMA address `nbma`; returns the time it took, or None on timeout.
pub fn wait_shortcut(
    lab: &Lab,
    from: usize,
    dst: Ipv4Addr,
    nbma: Ipv4Addr,
    start: Instant,
    timeout: Duration,
) -> Option<Duration> {
    let spoke = lab.spoke(from);
    while start.elapsed() < timeout {
        if let Ok(cache) = spoke.cache()
            && cache
                .shortcut_for(dst)
                .is_some_and(|e| e.nbma_v4() == Some(nbma))
        {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Wait until a spoke is gone from every running hub's cache.
pub fn wait_purged(lab: &Lab, tunnel: Ipv4Addr, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        let gone = lab
            .hubs
            .iter()
            .filter(|h| h.agent_running())
            .all(|h| h.cache().map(|c| !c.mentions(tunnel)).unwrap_or(false));
        if gone {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

fn stop_ping(pid: u32, log: &std::path::Path) -> PingResult {
    cleanup::signal(pid, Signal::SIGINT);
    cleanup::wait_exit(pid, Duration::from_secs(3));
    cleanup::stop(pid, Duration::from_millis(100));
    PingResult::parse(&std::fs::read_to_string(log).unwrap_or_default())
}

/// Run every check on a lab whose agents are started. Needs at least 2 spokes for the
/// LAN-to-LAN checks; the purge check uses the last spoke (and stops its agent).
pub fn run(lab: &mut Lab) -> Report {
    let mut r = Report {
        phase: lab.spec.phase,
        spokes: lab.spokes.len(),
        hubs: lab.hubs.len(),
        ..Report::default()
    };
    if let Err(e) = run_inner(lab, &mut r) {
        r.fail("lab", format!("{e:#}"));
    }
    r.ok = r.failures.is_empty();
    r
}

fn run_inner(lab: &mut Lab, r: &mut Report) -> Result<()> {
    let n = lab.spokes.len();
    // (a) registration
    r.registered = lab.wait_registered(REGISTER_TIMEOUT)?;
    if !r.check(
        "registered",
        r.registered == n,
        format!("{} of {n} spokes registered at the hub(s) (cache entry with the spoke's NBMA, NHS up on the spoke)", r.registered),
    ) {
        return Ok(());
    }
    if n >= 2 {
        lan_checks(lab, r)?;
    }
    // (d) purge on leave: the last spoke stops gracefully.
    let leaver = lab.spoke(n);
    let (tunnel, holdtime) = (leaver.tunnel, lab.spec.holdtime);
    // The spoke must be in the hub cache right before it leaves, or "gone" proves nothing.
    let present = lab
        .hubs
        .iter()
        .filter(|h| h.agent_running())
        .all(|h| h.cache().is_ok_and(|c| c.mentions(tunnel)));
    if !r.check(
        "purge-precondition",
        present,
        format!("spoke{n} ({tunnel}) is in the hub cache before it leaves"),
    ) {
        return Ok(());
    }
    lab.signal_agent(Role::Spoke, n, Signal::SIGTERM)?;
    // Purge must beat expiry by far: a third of the holdtime.
    let limit = Duration::from_secs(u64::from(holdtime) / 3).max(Duration::from_secs(2));
    let purge = wait_purged(lab, tunnel, limit);
    r.purged = purge.is_some();
    r.purge_ms = purge.map(|d| d.as_millis() as u64);
    r.check(
        "purge",
        r.purged,
        match purge {
            Some(d) => format!("spoke{n} ({tunnel}) gone from the hub cache {:.1} ms after SIGTERM (holdtime {holdtime} s)", d.as_secs_f64() * 1000.0),
            None => format!("spoke{n} ({tunnel}) still in the hub cache {} s after SIGTERM (holdtime {holdtime} s): no purge", limit.as_secs()),
        },
    );
    let clean = lab.stop_agent(Role::Spoke, n, Signal::SIGTERM, Duration::from_secs(3));
    r.check(
        "leave-exit",
        clean,
        format!(
            "spoke{n}'s agent {} after SIGTERM",
            if clean {
                "exited"
            } else {
                "did not exit within 3 s"
            }
        ),
    );
    Ok(())
}

fn lan_checks(lab: &mut Lab, r: &mut Report) -> Result<()> {
    let phase = lab.spec.phase;
    let dst = spoke_lan_host(2);
    let dst_nbma = lab.spoke(2).nbma;
    let redirects0 = hub_redirects(lab)?;
    let resolutions0 = spoke_resolutions(lab, 1)?;
    let fwd0 = hub_forwarded(lab)?;
    // (b) continuous traffic LAN1 -> LAN2; (c) time to the shortcut.
    let (pid, log) = lab.spawn_lan_ping(1, 2, "0.01", 2000)?;
    let start = Instant::now();
    if phase >= 2 {
        let took = wait_shortcut(lab, 1, dst, dst_nbma, start, SHORTCUT_TIMEOUT);
        r.shortcut_ms = took.map(|d| d.as_millis() as u64);
        r.check(
            "shortcut",
            took.is_some(),
            match took {
                Some(d) => format!("spoke1 has a shortcut to {dst} via NBMA {dst_nbma} after {} ms", d.as_millis()),
                None => format!("no shortcut to {dst} (NBMA {dst_nbma}) in spoke1's cache within {} s of traffic; cache: {}", SHORTCUT_TIMEOUT.as_secs(), lab.spoke(1).cache().map(|c| c.raw.to_string()).unwrap_or_default()),
            },
        );
        // Let the reverse direction settle too.
        thread::sleep(Duration::from_millis(500));
        if lab.spec.ipsec_psk.is_some() {
            ike_check(lab, r);
        }
    } else {
        thread::sleep(Duration::from_secs(2));
    }
    let ping = stop_ping(pid, &log);
    r.lan_ping_sent = ping.transmitted;
    r.lan_ping_received = ping.received;
    r.check(
        "lan-traffic",
        ping.received > 0,
        format!(
            "LAN1 host -> {dst}: {} sent, {} received",
            ping.transmitted, ping.received
        ),
    );
    let fwd1 = hub_forwarded(lab)?;
    r.hub_forwarded_before_shortcut = Some(fwd1.saturating_sub(fwd0));
    r.check(
        "via-hub-first",
        fwd1 > fwd0,
        format!(
            "hub forwarded {} packets of the first traffic (counter {fwd0} -> {fwd1})",
            fwd1.saturating_sub(fwd0)
        ),
    );
    let redirects = hub_redirects(lab)?.saturating_sub(redirects0);
    match phase {
        3 => {
            r.check(
                "redirect",
                redirects > 0,
                format!("hub sent {redirects} redirect(s)"),
            );
        }
        _ => {
            r.check(
                "no-redirect",
                redirects == 0,
                format!("hub sent {redirects} redirect(s) (phase {phase}: none expected)"),
            );
        }
    }
    let resolutions = spoke_resolutions(lab, 1)?.saturating_sub(resolutions0);
    if phase >= 2 {
        r.check(
            "resolution",
            resolutions > 0,
            format!("spoke1 sent {resolutions} Resolution Request(s)"),
        );
    } else {
        r.check(
            "no-resolution",
            resolutions == 0,
            format!("phase 1: spoke1 sent {resolutions} Resolution Request(s) (none expected)"),
        );
    }
    if phase == 1 {
        let sc = lab.spoke(1).cache()?.shortcut_for(dst).cloned();
        r.check(
            "no-shortcut",
            sc.is_none(),
            match &sc {
                None => "phase 1: spoke1 has no shortcut to spoke2's LAN".to_string(),
                Some(e) => format!("phase 1 but spoke1 has a shortcut: {e:?}"),
            },
        );
    }
    // The burst: after the shortcut the hub must not see this flow any more (phase 2/3);
    // in phase 1 every packet (both directions) crosses the hub.
    let before = hub_forwarded(lab)?;
    let burst = lab.lan_ping(1, 2, BURST, "0.01")?;
    let after = hub_forwarded(lab)?;
    let via_hub = after.saturating_sub(before);
    r.burst_sent = burst.transmitted;
    r.burst_received = burst.received;
    r.hub_forwarded_after_shortcut = Some(via_hub);
    r.check(
        "burst-traffic",
        burst.received > 0,
        format!(
            "burst LAN1 -> LAN2: {} sent, {} received",
            burst.transmitted, burst.received
        ),
    );
    if phase >= 2 {
        r.check(
            "hub-bypassed",
            via_hub == 0,
            format!("hub forwarded {via_hub} packets during the {BURST}-packet burst after the shortcut (0 expected)"),
        );
    } else {
        r.check(
            "hub-forwards",
            via_hub >= u64::from(burst.received),
            format!(
                "phase 1: hub forwarded {via_hub} packets during the burst ({} replies received)",
                burst.received
            ),
        );
    }
    Ok(())
}

/// Resolution Requests spoke `i` sent.
pub fn spoke_resolutions(lab: &Lab, i: usize) -> Result<u64> {
    let c = crate::agent::counters(&lab.spoke(i).socket)?;
    Ok(crate::agent::counter(
        &c,
        "/nhrp/messages/resolution_request/tx",
    ))
}

/// Sum of the hubs' redirect-sent counters.
pub fn hub_redirects(lab: &Lab) -> Result<u64> {
    let mut sum = 0;
    for h in lab.hubs.iter().filter(|h| h.agent_running()) {
        sum += h.snapshot()?.redirects_sent();
    }
    Ok(sum)
}

/// One line per check result plus the JSON line, for stdout.
pub fn json_line(r: &Report) -> String {
    serde_json::to_string(r)
        .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"cannot serialise report: {e}\"}}"))
}

/// Underlay sanity without agents: every node pings every other node's NBMA address, each
/// LAN host pings its gateway, forwarding is on. Returns the failures (empty = all good).
pub fn underlay(lab: &Lab) -> Vec<String> {
    let mut failures = Vec::new();
    let nodes: Vec<_> = lab.nodes().collect();
    for a in &nodes {
        for b in &nodes {
            if a.label == b.label {
                continue;
            }
            match a.ns.ping(&b.nbma.to_string(), 1, "0.2") {
                Ok(p) if p.ok() => {}
                Ok(_) => {
                    failures.push(format!("{} -> {} ({}): no reply", a.label, b.label, b.nbma))
                }
                Err(e) => failures.push(format!("{} -> {}: {e:#}", a.label, b.label)),
            }
        }
        match a.ns.sysctl_get("net.ipv4.ip_forward") {
            Ok(v) if v == "1" => {}
            Ok(v) => failures.push(format!("{}: ip_forward is {v}", a.label)),
            Err(e) => failures.push(format!("{}: {e:#}", a.label)),
        }
    }
    for s in &lab.spokes {
        let Some(lan) = &s.lan else { continue };
        match lan.ns.ping(&lan.gateway.to_string(), 1, "0.2") {
            Ok(p) if p.ok() => {}
            _ => failures.push(format!(
                "{} LAN host -> gateway {}: no reply",
                s.label, lan.gateway
            )),
        }
        // Through the spoke's forwarding path: the LAN host reaches the spoke's underlay
        // address via its default route.
        match lan.ns.ping(&s.nbma.to_string(), 1, "0.2") {
            Ok(p) if p.ok() => {}
            _ => failures.push(format!(
                "{} LAN host -> {} via default route: no reply",
                s.label, s.nbma
            )),
        }
    }
    failures
}
