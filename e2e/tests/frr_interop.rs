//! Live NHRP interop with FRR nhrpd: runs `e2e/interop/frr-vm.sh` inside the qemu VM of the
//! shared test tools (FRR needs kernel mGRE, which the sandbox host lacks), asserts its checks,
//! then decodes the returned underlay captures with tshark on the host: every NHRP packet, FRR's
//! and ours, must carry a correct checksum and raise no expert warning.
//!
//! Skips (with a message, never a failure) when not root, when the VM harness is not set up
//! (`shared/tools/vm/setup.sh`, `qemu-system-x86_64`), or when FRR, jq or tshark is missing.
//! Env: `DMVPN_SHARED` (default `../shared` next to the repository), `DMVPN_FRR_SCENARIOS`
//! (`+`-separated subset of `frrhub ourhub ourhub-static frrhub-nat ourhub-nat frrhub-auth
//! ourhub-auth`), `DMVPN_AGENT`.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

const ALL_SCENARIOS: &str =
    "frrhub+ourhub+ourhub-static+frrhub-nat+ourhub-nat+frrhub-auth+ourhub-auth";
const HUB: &str = "198.51.100.1";
const OUR_SPOKE: &str = "198.51.100.11";
const FRR_SPOKE: &str = "198.51.100.12";
/// Public (NAT) addresses of our spoke in frrhub-nat and of FRR's spoke in ourhub-nat: the
/// capture on the underlay bridge sees these.
const OUR_SPOKE_NAT: &str = "198.51.100.21";
const FRR_SPOKE_NAT: &str = "198.51.100.22";
/// tshark's expert severity for warnings (PI_WARN); errors are above it.
const PI_WARN: u64 = 0x0060_0000;

fn skip(reason: &str) {
    // Straight to the stderr handle: the harness captures eprintln!, and a skip must be visible.
    let line = format!("frr_interop: skipped ({reason})\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

fn shared_tools() -> PathBuf {
    match std::env::var_os("DMVPN_SHARED") {
        Some(p) => PathBuf::from(p).join("tools"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools"),
    }
}

/// The guest kernel the harness would boot (vm/common.sh: $KROOT, else the tools cache).
fn guest_kernel_present() -> bool {
    let root = match std::env::var_os("KROOT") {
        Some(k) => PathBuf::from(k),
        None => {
            let cache = std::env::var_os("DMVPN_TOOLS_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("dmvpn-tools"))
                })
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/dmvpn-tools"))
                });
            match cache {
                Some(c) => c.join("kernel"),
                None => return false,
            }
        }
    };
    std::fs::read_dir(root.join("boot"))
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or(false)
}

/// Why the test cannot run here, if it cannot.
fn missing_prerequisite(tools: &Path) -> Option<String> {
    if !tools.join("vm/in-vm.sh").is_file() {
        return Some(format!(
            "no VM harness at {} (set DMVPN_SHARED)",
            tools.join("vm/in-vm.sh").display()
        ));
    }
    if !on_path("qemu-system-x86_64") {
        return Some(format!(
            "qemu-system-x86_64 not installed: run {}/vm/setup.sh",
            tools.display()
        ));
    }
    if !guest_kernel_present() {
        return Some(format!(
            "no guest kernel in the tools cache: run {}/vm/setup.sh",
            tools.display()
        ));
    }
    if !Path::new("/usr/lib/frr/nhrpd").is_file() || !on_path("vtysh") {
        return Some(format!(
            "FRR (nhrpd, vtysh) not installed: run {}/setup-host.sh",
            tools.display()
        ));
    }
    for bin in ["tshark", "jq", "tcpdump"] {
        if !on_path(bin) {
            return Some(format!("{bin} not installed (apt-get install {bin})"));
        }
    }
    None
}

/// One NHRP packet of a capture, as tshark decodes it.
#[derive(Debug)]
struct Nhrp {
    frame: String,
    src: String,
    op: u8,
    checksum_status: String,
    expert: Vec<(u64, String)>,
}

fn decode_pcap(pcap: &Path) -> Vec<Nhrp> {
    // NHRP directly in GRE (outermost IP carries GRE): ICMP errors quoting a GRE packet are not
    // NHRP packets. A Traffic Indication quotes an IP packet, so IP fields can repeat: the first
    // occurrence is the underlay.
    let out = Command::new("tshark")
        .args(["-r"])
        .arg(pcap)
        .args([
            "-Y",
            "nhrp && ip.proto#1 == 47",
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-E",
            "occurrence=a",
            "-E",
            "aggregator=;",
            "-e",
            "frame.number",
            "-e",
            "ip.src",
            "-e",
            "nhrp.hdr.op.type",
            "-e",
            "nhrp.hdr.chksum.status",
            "-e",
            "_ws.expert.severity",
            "-e",
            "_ws.expert.message",
        ])
        .output()
        .expect("run tshark");
    assert!(
        out.status.success(),
        "tshark failed on {}: {}",
        pcap.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            let field = |i: usize| f.get(i).copied().unwrap_or("").to_string();
            let first = |i: usize| field(i).split(';').next().unwrap_or("").to_string();
            let sev: Vec<u64> = field(4)
                .split(';')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap_or(u64::MAX))
                .collect();
            let msgs: Vec<String> = field(5)
                .split(';')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            Nhrp {
                frame: first(0),
                src: first(1),
                op: first(2).parse().unwrap_or(0),
                checksum_status: first(3),
                expert: sev.into_iter().zip(msgs).collect(),
            }
        })
        .collect()
}

/// Underlay addresses of our spoke and FRR's spoke as the capture sees them.
fn spokes(scenario: &str) -> (&'static str, &'static str) {
    match scenario {
        "frrhub-nat" => (OUR_SPOKE_NAT, FRR_SPOKE),
        "ourhub-nat" => (OUR_SPOKE, FRR_SPOKE_NAT),
        _ => (OUR_SPOKE, FRR_SPOKE),
    }
}

/// The underlay addresses that run FRR in a scenario.
fn frr_speakers(scenario: &str) -> Vec<&'static str> {
    let (_, frr_spoke) = spokes(scenario);
    if scenario.starts_with("frrhub") {
        vec![HUB, frr_spoke]
    } else {
        vec![frr_spoke]
    }
}

/// NHRP message types that must appear, per sender role, in a scenario's capture.
fn expected_ops(scenario: &str) -> Vec<(&'static str, u8, &'static str)> {
    // (sender NBMA, ar$op.type, what)
    let (ours, frr) = spokes(scenario);
    if scenario.starts_with("frrhub") {
        vec![
            (ours, 3, "our Registration Request"),
            (HUB, 4, "FRR's Registration Reply"),
            (HUB, 8, "FRR's Traffic Indication"),
            (ours, 1, "our Resolution Request"),
            (frr, 2, "FRR's Resolution Reply"),
        ]
    } else {
        vec![
            (frr, 3, "FRR's Registration Request"),
            (HUB, 4, "our Registration Reply"),
            (HUB, 8, "our Traffic Indication"),
            (frr, 1, "FRR's Resolution Request"),
            (ours, 2, "our Resolution Reply"),
        ]
    }
}

#[test]
fn frr_nhrpd_interop_in_vm() {
    if !common::root_or_skip("frr_nhrpd_interop_in_vm") {
        return;
    }
    let tools = shared_tools();
    if let Some(reason) = missing_prerequisite(&tools) {
        skip(&reason);
        return;
    }
    let agent = common::agent();
    let agent_s = agent.to_string_lossy().into_owned();
    assert!(
        !agent_s.contains([' ', ',']),
        "the agent path {agent_s} contains a space or comma: it cannot travel on the VM's kernel command line"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/frr-vm.sh");
    let scenarios =
        std::env::var("DMVPN_FRR_SCENARIOS").unwrap_or_else(|_| ALL_SCENARIOS.to_string());
    let share = tempfile::Builder::new()
        .prefix("frr-interop-")
        .tempdir()
        .expect("temp dir for the VM share");

    let _serial = common::serial();
    let out = Command::new(tools.join("vm/in-vm.sh"))
        .arg(&script)
        .arg(&agent)
        .arg("/mnt/host-share")
        .arg(&scenarios)
        .env("SHARE", share.path())
        .env("TIMEOUT", "900")
        .output()
        .expect("run vm/in-vm.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report: Vec<&str> = stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| {
            l.starts_with("PASS ")
                || l.starts_with("FAIL ")
                || l.starts_with("SKIP ")
                || l.contains(" passed, ")
        })
        .collect();
    println!("{}", report.join("\n"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "frr-vm.sh failed (exit {:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
    for sc in scenarios.split('+') {
        // The script skips a scenario the installed FRR cannot run (auth needs FRR >= 10).
        if let Some(l) = report
            .iter()
            .find(|l| l.starts_with(&format!("SKIP {sc}:")))
        {
            skip(&format!("scenario {}", l.trim_start_matches("SKIP ")));
            continue;
        }
        let frr = frr_speakers(sc);
        let must: &[&str] = if sc.starts_with("frrhub") {
            &[
                "FRR hub caches our spoke",
                "our spoke: NHS",
                "ping our spoke -> FRR hub",
                "phase 3: FRR hub redirects",
                "phase 3: our spoke received a Traffic Indication",
                "phase 3: FRR spoke has a direct binding for our spoke",
            ]
        } else {
            &[
                "our hub caches the FRR spoke",
                "FRR spoke: NHS",
                "ping FRR spoke -> our hub",
                "phase 3: our hub redirects",
                "phase 3: our hub sent a Traffic Indication",
                "phase 3: our spoke answered FRR's Resolution Request",
                "phase 3: our spoke resolves the FRR spoke",
            ]
        };
        for m in must {
            let line = format!("PASS {sc}: {m}");
            assert!(
                report.iter().any(|l| l.starts_with(&line)),
                "missing `{line}` in the VM output:\n{stdout}"
            );
        }
        if sc.ends_with("-nat") {
            assert!(
                report
                    .iter()
                    .any(|l| l.starts_with(&format!("PASS {sc}: NAT:"))),
                "no NAT check passed in {sc}"
            );
        }
        if sc.ends_with("-auth") {
            assert!(
                report
                    .iter()
                    .any(|l| l.starts_with(&format!("PASS {sc}: wrong password"))),
                "no wrong-password check passed in {sc}"
            );
        }

        let pcap = share.path().join(format!("{sc}.pcap"));
        assert!(pcap.is_file(), "no capture {} returned", pcap.display());
        let pkts = decode_pcap(&pcap);
        let senders: BTreeSet<&str> = pkts.iter().map(|p| p.src.as_str()).collect();
        for a in &frr {
            assert!(
                senders.contains(a),
                "{sc}: no NHRP packet from FRR at {a} in {}",
                pcap.display()
            );
        }
        for (src, op, what) in expected_ops(sc) {
            assert!(
                pkts.iter().any(|p| p.src == src && p.op == op),
                "{sc}: {what} (op {op} from {src}) missing in {}",
                pcap.display()
            );
        }
        for p in &pkts {
            let who = if frr.contains(&p.src.as_str()) {
                "FRR"
            } else {
                "dmvpn-agent"
            };
            assert_eq!(
                p.checksum_status,
                "1",
                "{sc}: frame {} ({who}, op {}) checksum not [correct] in {}",
                p.frame,
                p.op,
                pcap.display()
            );
            let warnings: Vec<&(u64, String)> =
                p.expert.iter().filter(|(s, _)| *s >= PI_WARN).collect();
            assert!(
                warnings.is_empty(),
                "{sc}: frame {} ({who}, op {}) has expert warnings {warnings:?} in {}",
                p.frame,
                p.op,
                pcap.display()
            );
        }
        println!(
            "{sc}: {} NHRP packets decoded, checksums correct, no expert warnings",
            pkts.len()
        );
    }
}
