//! Root-only IPsec tests: a hub and spokes in network namespaces on one underlay bridge
//! (198.51.100.0/24), every tunnel protected by IKEv2 + ESP.
//!
//! - PSK and certificates: registration, a spoke-to-spoke shortcut with its own SA, and a
//!   capture of the underlay that holds only IKE (UDP 500/4500) and ESP, never GRE;
//! - a wrong PSK: no registration, AUTHENTICATION_FAILED in `show dmvpn --json`;
//! - a spoke whose certificate carries another tunnel address than it claims: the hub
//!   refuses its NHRP.
//!
//! Skipped with a message when not root or when `ip`/`tcpdump` are missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_dmvpn-agent");
/// How long to wait for a state to appear (polling; the test goes on as soon as it does).
const WAIT: Duration = Duration::from_secs(15);
const PSK: &str = "ipsec-test-pre-shared-key";

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"))
}

fn must(cmd: &str, args: &[&str]) {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: the IPsec tests need root (network namespaces, TUN, raw sockets)");
        return false;
    }
    if !Path::new("/dev/net/tun").exists() {
        println!("SKIPPED: /dev/net/tun is missing");
        return false;
    }
    for tool in ["ip", "tcpdump"] {
        if Command::new(tool).arg("--version").output().is_err() {
            println!("SKIPPED: {tool} is missing");
            return false;
        }
    }
    true
}

/// Namespaces, agents and the capture of one test; all removed on drop, also on failure.
struct Lab {
    id: String,
    namespaces: Vec<String>,
    agents: Vec<(String, Child)>,
    capture: Option<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(c) = &mut self.capture {
            let _ = c.kill();
            let _ = c.wait();
        }
        for (_, c) in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

impl Lab {
    /// A switch namespace with a bridge, and one namespace per node (`n0` = .1, ...).
    fn new(tag: &str, nodes: usize) -> Lab {
        let id = format!("dmip{}{tag}", std::process::id());
        let mut lab = Lab {
            id: id.clone(),
            namespaces: Vec::new(),
            agents: Vec::new(),
            capture: None,
            dir: tempfile::tempdir().unwrap(),
        };
        let sw = lab.sw();
        must("ip", &["netns", "add", &sw]);
        lab.namespaces.push(sw.clone());
        must("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        must("ip", &["-n", &sw, "link", "set", "br0", "up"]);
        for i in 0..nodes {
            let ns = lab.ns(i);
            must("ip", &["netns", "add", &ns]);
            lab.namespaces.push(ns.clone());
            must("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            let port = format!("p{i}");
            must(
                "ip",
                &[
                    "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "ul0",
                    "netns", &ns,
                ],
            );
            must("ip", &["-n", &sw, "link", "set", &port, "master", "br0"]);
            must("ip", &["-n", &sw, "link", "set", &port, "up"]);
            let addr = format!("198.51.100.{}/24", i + 1);
            must("ip", &["-n", &ns, "addr", "add", &addr, "dev", "ul0"]);
            must("ip", &["-n", &ns, "link", "set", "ul0", "up"]);
        }
        lab
    }

    fn sw(&self) -> String {
        format!("{}sw", self.id)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.id)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn sock(&self, i: usize) -> PathBuf {
        self.path(&format!("n{i}.sock"))
    }

    /// Captures everything on the underlay switch into `underlay.pcap`.
    fn start_capture(&mut self) {
        let pcap = self.path("underlay.pcap");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.sw(),
                "tcpdump",
                // Every bridge port: frames forwarded between ports never pass br0 itself.
                "-i",
                "any",
                // Keep root: the test's private temporary directory is not writable by
                // the user tcpdump switches to.
                "-Z",
                "root",
                // Deliver each packet at once (no 1 s ring-buffer blocks lost at SIGINT).
                "--immediate-mode",
                "-U",
                "-n",
                "-w",
                pcap.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.path("tcpdump.log")).unwrap())
            .spawn()
            .unwrap();
        self.capture = Some(child);
        wait_for("the capture file", || pcap.exists());
    }

    fn stop_capture(&mut self) -> PathBuf {
        if let Some(mut c) = self.capture.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let _ = c.wait();
        }
        self.path("underlay.pcap")
    }

    /// Starts node `i` (`.1` is the hub) with `ipsec` as its `[ipsec]` section body.
    fn start(&mut self, i: usize, tunnel: &str, ipsec: &str) {
        let sock = self.sock(i);
        let common = format!(
            "tunnel_address = \"{tunnel}/24\"\nnbma_address = \"198.51.100.{}\"\ngre_key = 42\nholdtime = 60\ncontrol_socket = \"{}\"\ntun_name = \"dmvpn0\"\n",
            i + 1,
            sock.display()
        );
        let config = if i == 0 {
            format!("role = \"hub\"\n{common}\n[ipsec]\n{ipsec}\n")
        } else {
            format!(
                "role = \"spoke\"\n{common}local_prefixes = [\"10.1.{i}.0/24\"]\n\n[ipsec]\n{ipsec}\n\n[[nhs]]\ntunnel_address = \"10.42.0.1\"\nnbma_address = \"198.51.100.1\"\n"
            )
        };
        let name = format!("n{i}");
        let cfg = self.path(&format!("{name}.toml"));
        std::fs::write(&cfg, &config).unwrap();
        let check = run(AGENT, &["check-config", cfg.to_str().unwrap()]);
        assert!(
            check.status.success(),
            "{}\n{config}",
            String::from_utf8_lossy(&check.stderr)
        );
        let log = std::fs::File::create(self.path(&format!("{name}.log"))).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(i),
                AGENT,
                "run",
                "--config",
                cfg.to_str().unwrap(),
            ])
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.push((name, child));
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.agents {
            let log =
                std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            out.push_str(&format!(
                "--- {name} (last lines, newest first)\n{}\n",
                tail.join("\n")
            ));
        }
        out
    }

    fn show(&self, i: usize, what: &[&str]) -> Option<Value> {
        let sock = self.sock(i);
        let mut args = vec!["show"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["--json", "--socket", sock.to_str().unwrap()]);
        let o = run(AGENT, &args);
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    fn ping(&self, i: usize, dst: &str) -> bool {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns(i),
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                dst,
            ],
        )
        .status
        .success()
    }

    fn registered(&self, i: usize) -> bool {
        self.show(i, &["nhrp", "nhs"])
            .is_some_and(|v| v["nhs"][0]["registered"] == true)
    }

    fn try_wait_for(&self, what: &str, mut f: impl FnMut() -> bool) -> Result<(), String> {
        let start = Instant::now();
        while !f() {
            if start.elapsed() > WAIT {
                return Err(format!("timed out waiting for {what}\n{}", self.logs()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The IKE peer entry for `nbma` in a `show dmvpn --json` reply.
fn ike_peer<'a>(dmvpn: &'a Value, nbma: &str) -> Option<&'a Value> {
    dmvpn["ipsec"]["peers"]
        .as_array()?
        .iter()
        .find(|p| p["nbma_address"] == nbma)
}

/// Counts the packets of a capture that match a tcpdump filter.
fn count(pcap: &Path, filter: &str) -> usize {
    let o = run("tcpdump", &["-r", pcap.to_str().unwrap(), "-nn", filter]);
    assert!(
        o.status.success(),
        "tcpdump -r: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).lines().count()
}

/// Hub and two spokes: registration, a spoke-to-spoke shortcut with its own SA, and an
/// underlay that carries only IKE and ESP.
fn hub_and_two_spokes(lab: &mut Lab, ipsec: [String; 3]) {
    lab.start_capture();
    let [h, s1, s2] = ipsec;
    lab.start(0, "10.42.0.1", &h);
    lab.start(1, "10.42.0.2", &s1);
    lab.start(2, "10.42.0.3", &s2);
    let r = lab.try_wait_for("both spokes registered", || {
        lab.registered(1) && lab.registered(2)
    });
    r.unwrap();
    // The hub holds an established IKE SA and ESP SAs with each spoke.
    let dmvpn = lab.show(0, &["dmvpn"]).unwrap();
    for spoke in ["198.51.100.2", "198.51.100.3"] {
        let p = ike_peer(&dmvpn, spoke).unwrap_or_else(|| panic!("{dmvpn:#}"));
        assert_eq!(p["state"], "established", "{dmvpn:#}");
        assert!(p["child_sas"].as_u64() >= Some(1), "{dmvpn:#}");
    }
    // Spoke 1 → spoke 2's tunnel address: first via the hub, then (phase 3 redirect and
    // resolution) over a shortcut protected by its own SA.
    lab.try_wait_for("a spoke-to-spoke shortcut with an SA", || {
        lab.ping(1, "10.42.0.3");
        let Some(d) = lab.show(1, &["dmvpn"]) else {
            return false;
        };
        let shortcut = d["peers"].as_array().is_some_and(|a| {
            a.iter().any(|p| {
                p["tunnel_address"] == "10.42.0.3"
                    && p["nbma_address"] == "198.51.100.3"
                    && p["attributes"].as_str().is_some_and(|s| s.contains('T'))
            })
        });
        shortcut && ike_peer(&d, "198.51.100.3").is_some_and(|p| p["state"] == "established")
    })
    .unwrap();
    // The first packets may meet an SA still being installed on the other side.
    lab.try_wait_for("a ping over the shortcut", || lab.ping(1, "10.42.0.3"))
        .unwrap();
    let d = lab.show(1, &["dmvpn"]).unwrap();
    let sas = d["ipsec"]["sas"].as_array().unwrap();
    let out = sas
        .iter()
        .find(|s| s["peer"] == "198.51.100.3" && s["direction"] == "outbound")
        .unwrap_or_else(|| panic!("no outbound SA to spoke 2: {d:#}"));
    assert!(out["packets"].as_u64() >= Some(1), "{d:#}");
    // The set-up time of the spoke-to-spoke SA is measured by whichever spoke initiated.
    let d2 = lab.show(2, &["dmvpn"]).unwrap();
    let ms = [ike_peer(&d, "198.51.100.3"), ike_peer(&d2, "198.51.100.2")]
        .iter()
        .flatten()
        .filter_map(|p| p["established_ms"].as_f64())
        .reduce(f64::max);
    assert!(
        ms.is_some(),
        "no established_ms on either spoke: {d:#}\n{d2:#}"
    );
    // Data plane counters: ESP both ways, nothing dropped for lack of SAs once up.
    let c = lab.show(1, &["counters"]).unwrap();
    assert!(
        c.pointer("/dataplane/esp_tx_packets")
            .and_then(Value::as_u64)
            >= Some(1)
    );
    assert!(
        c.pointer("/dataplane/esp_rx_packets")
            .and_then(Value::as_u64)
            >= Some(1)
    );
    assert_eq!(
        c.pointer("/dataplane/drops/esp_auth")
            .and_then(Value::as_u64),
        Some(0),
        "{c:#}"
    );

    let pcap = lab.stop_capture();
    // ESP: raw (protocol 50) or in UDP 4500 (first 4 payload bytes not the non-ESP marker).
    let esp = count(
        &pcap,
        "ip proto 50 or (udp port 4500 and udp[8:4] != 0 and udp[4:2] > 9)",
    );
    let ike = count(&pcap, "udp port 500 or udp port 4500");
    let gre = count(&pcap, "ip proto 47");
    // Sent by the nodes (the switch's own bridge sends IGMP reports from 0.0.0.0); an ICMP
    // unreachable about a UDP datagram is a node answering IKE before its agent listens.
    let other = count(
        &pcap,
        "ip and src net 198.51.100.0/24 and not (ip proto 50 or udp port 500 or udp port 4500) and not (icmp[icmptype] == icmp-unreach and icmp[17] == 17)",
    );
    assert!(
        esp > 0 && ike > 0,
        "esp {esp}, ike {ike}, all {}; tcpdump: {}",
        count(&pcap, ""),
        std::fs::read_to_string(lab.path("tcpdump.log")).unwrap_or_default()
    );
    assert_eq!(gre, 0, "GRE in clear on the underlay");
    assert_eq!(
        other,
        0,
        "IPv4 packets besides IKE and ESP on the underlay:\n{}",
        String::from_utf8_lossy(
            &run(
                "tcpdump",
                &[
                    "-r",
                    pcap.to_str().unwrap(),
                    "-nn",
                    "ip and src net 198.51.100.0/24 and not (ip proto 50 or udp port 500 or udp port 4500) and not (icmp[icmptype] == icmp-unreach and icmp[17] == 17)"
                ]
            )
            .stdout
        )
    );
    // Spoke-to-spoke ESP went directly between the spokes.
    assert!(
        count(
            &pcap,
            "(ip proto 50 or udp port 4500) and src host 198.51.100.2 and dst host 198.51.100.3"
        ) > 0
    );
}

#[test]
fn psk_hub_and_spokes_only_ike_and_esp_on_the_underlay() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("p", 3);
    let psk = format!("psk = \"{PSK}\"");
    hub_and_two_spokes(&mut lab, [psk.clone(), psk.clone(), psk]);

    // The shortcut goes away (operator clear): its SA is deleted with it, on both spokes;
    // the SAs with the hub stay.
    let sock = lab.sock(1);
    must(
        AGENT,
        &["clear", "nhrp", "cache", "--socket", sock.to_str().unwrap()],
    );
    lab.try_wait_for("the spoke-to-spoke SA deleted on both spokes", || {
        let gone = |i: usize, peer: &str| {
            lab.show(i, &["dmvpn"]).is_some_and(|d| {
                !d["ipsec"]["sas"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|s| s["peer"] == peer))
            })
        };
        gone(1, "198.51.100.3") && gone(2, "198.51.100.2")
    })
    .unwrap();
    let d = lab.show(1, &["dmvpn"]).unwrap();
    assert_eq!(
        ike_peer(&d, "198.51.100.1").unwrap()["state"],
        "established",
        "{d:#}"
    );
    assert!(lab.registered(1));
}

#[test]
fn forced_udp_encapsulation_carries_esp_in_udp_4500() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("u", 3);
    let psk = format!("psk = \"{PSK}\"\nforce_udp_encap = true");
    hub_and_two_spokes(&mut lab, [psk.clone(), psk.clone(), psk]);
    let pcap = lab.path("underlay.pcap");
    // Everything went in UDP 4500 (IKE after IKE_SA_INIT, and ESP): no raw ESP at all.
    assert_eq!(count(&pcap, "ip proto 50"), 0);
    assert!(
        count(
            &pcap,
            "udp port 4500 and src host 198.51.100.2 and dst host 198.51.100.3"
        ) > 0
    );
    let d = lab.show(1, &["dmvpn"]).unwrap();
    assert!(
        d["ipsec"]["sas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["direction"] == "outbound")
            .all(|s| s["udp_encap"] == true),
        "{d:#}"
    );
    assert_eq!(
        ike_peer(&d, "198.51.100.1").unwrap()["remote"],
        "198.51.100.1:4500"
    );
}

/// Creates a CA and a certificate per node; returns the `[ipsec]` bodies. `claimed` lists
/// the tunnel address each certificate carries.
fn certificates(lab: &Lab, claimed: &[&str]) -> Vec<String> {
    let ca = lab.path("ca");
    must(AGENT, &["cert", "ca", "--out", ca.to_str().unwrap()]);
    claimed
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let name = format!("node{i}");
            let out = lab.path(&name);
            must(
                AGENT,
                &[
                    "cert",
                    "issue",
                    "--ca",
                    ca.to_str().unwrap(),
                    "--tunnel-address",
                    addr,
                    "--name",
                    &name,
                    "--out",
                    out.to_str().unwrap(),
                ],
            );
            format!(
                "auth = \"certificate\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"",
                out.join("ca.pem").display(),
                out.join(format!("{name}.pem")).display(),
                out.join(format!("{name}.key")).display()
            )
        })
        .collect()
}

#[test]
fn certificates_hub_and_spokes_only_ike_and_esp_on_the_underlay() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("c", 3);
    let c = certificates(&lab, &["10.42.0.1", "10.42.0.2", "10.42.0.3"]);
    hub_and_two_spokes(&mut lab, [c[0].clone(), c[1].clone(), c[2].clone()]);
    // With certificates the identities are the tunnel addresses.
    let d = lab.show(0, &["dmvpn"]).unwrap();
    assert_eq!(d["ipsec"]["auth"], "certificate");
    assert_eq!(d["ipsec"]["identity"], "10.42.0.1");
    assert_eq!(
        ike_peer(&d, "198.51.100.2").unwrap()["identity"],
        "10.42.0.2"
    );
}

#[test]
fn wrong_psk_is_refused_with_authentication_failed() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("w", 2);
    lab.start(0, "10.42.0.1", &format!("psk = \"{PSK}\""));
    lab.start(1, "10.42.0.2", "psk = \"not-the-network-key!\"");
    lab.try_wait_for("AUTHENTICATION_FAILED in show dmvpn", || {
        lab.show(1, &["dmvpn"]).is_some_and(|d| {
            ike_peer(&d, "198.51.100.1")
                .is_some_and(|p| p["last_error_reason"] == "AUTHENTICATION_FAILED")
        })
    })
    .unwrap();
    let d = lab.show(1, &["dmvpn"]).unwrap();
    let nhs = d["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["tunnel_address"] == "10.42.0.1")
        .unwrap();
    assert_eq!(nhs["ike_error"], "AUTHENTICATION_FAILED", "{d:#}");
    assert_ne!(nhs["ike_state"], "established", "{d:#}");
    assert!(!lab.registered(1), "registered despite the wrong PSK");
    // The hub names the spoke and the reason too.
    let c = lab.show(0, &["counters"]).unwrap();
    let failures = c
        .pointer("/ike/failures")
        .and_then(Value::as_array)
        .unwrap();
    assert!(
        failures
            .iter()
            .any(|f| f["peer"] == "198.51.100.2" && f["reason"] == "AUTHENTICATION_FAILED"),
        "{c:#}"
    );
    // Nothing reached the hub's NHRP engine.
    let hub_cache = lab.show(0, &["nhrp", "cache"]).unwrap();
    assert!(
        !hub_cache["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "dynamic"),
        "{hub_cache:#}"
    );
}

#[test]
fn disjoint_proposals_fail_with_no_proposal_chosen() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("n", 2);
    lab.start(
        0,
        "10.42.0.1",
        &format!("psk = \"{PSK}\"\nproposals = [\"chacha20poly1305\"]"),
    );
    lab.start(
        1,
        "10.42.0.2",
        &format!("psk = \"{PSK}\"\nproposals = [\"aes256gcm\"]"),
    );
    lab.try_wait_for("NO_PROPOSAL_CHOSEN in show dmvpn", || {
        lab.show(1, &["dmvpn"]).is_some_and(|d| {
            ike_peer(&d, "198.51.100.1")
                .is_some_and(|p| p["last_error_reason"] == "NO_PROPOSAL_CHOSEN")
        })
    })
    .unwrap();
    assert!(!lab.registered(1));
    let c = lab.show(1, &["counters"]).unwrap();
    assert!(
        c.pointer("/ike/failures")
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .any(|f| f["peer"] == "198.51.100.1" && f["reason"] == "NO_PROPOSAL_CHOSEN"),
        "{c:#}"
    );
}

#[test]
fn certificate_for_another_tunnel_address_is_refused() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("i", 2);
    // The spoke's certificate names 10.42.0.9; it claims 10.42.0.2 in NHRP.
    let c = certificates(&lab, &["10.42.0.1", "10.42.0.9"]);
    lab.start(0, "10.42.0.1", &c[0]);
    lab.start(1, "10.42.0.2", &c[1]);
    lab.try_wait_for("the hub to refuse the spoke's registration", || {
        lab.show(0, &["counters"]).is_some_and(|c| {
            c.pointer("/agent/nhrp_identity_refused")
                .and_then(Value::as_u64)
                >= Some(1)
        })
    })
    .unwrap();
    let c = lab.show(0, &["counters"]).unwrap();
    let refused = c
        .pointer("/ike/identity_refused")
        .and_then(Value::as_array)
        .unwrap();
    assert!(
        refused
            .iter()
            .any(|r| r["peer"] == "198.51.100.2" && r["claimed"] == "10.42.0.2"),
        "{c:#}"
    );
    // IKE itself succeeded (the certificate is valid), but no registration was accepted.
    let d = lab.show(0, &["dmvpn"]).unwrap();
    assert_eq!(
        ike_peer(&d, "198.51.100.2").unwrap()["identity"],
        "10.42.0.9"
    );
    assert!(!lab.registered(1));
    let hub_cache = lab.show(0, &["nhrp", "cache"]).unwrap();
    assert!(
        !hub_cache["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "dynamic"),
        "{hub_cache:#}"
    );
}

#[test]
fn child_sa_rekey_loses_no_packet() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("r", 2);
    // Rekeyed at 90 % of 10 s.
    let ipsec = format!("psk = \"{PSK}\"\nchild_lifetime = 10");
    lab.start(0, "10.42.0.1", &ipsec);
    lab.start(1, "10.42.0.2", &ipsec);
    lab.try_wait_for("registration", || lab.registered(1))
        .unwrap();
    lab.try_wait_for("a first ping", || lab.ping(1, "10.42.0.1"))
        .unwrap();
    let spi = |lab: &Lab| {
        lab.show(1, &["dmvpn"]).and_then(|d| {
            d["ipsec"]["sas"].as_array()?.iter().find_map(|s| {
                (s["direction"] == "outbound")
                    .then(|| s["spi"].as_u64())
                    .flatten()
            })
        })
    };
    let before = spi(&lab).unwrap();
    // 12 s of pings every 50 ms across the rekey at about 9 s.
    let out = run(
        "ip",
        &[
            "netns",
            "exec",
            &lab.ns(1),
            "ping",
            "-q",
            "-c",
            "240",
            "-i",
            "0.05",
            "-W",
            "1",
            "10.42.0.1",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("240 packets transmitted, 240 received"),
        "{text}\n{}",
        lab.logs()
    );
    let after = spi(&lab).unwrap();
    assert_ne!(before, after, "no rekey happened");
    let log = std::fs::read_to_string(lab.path("n1.log")).unwrap();
    assert!(log.contains("rekey=true"), "no rekeyed CHILD SA in the log");
}
