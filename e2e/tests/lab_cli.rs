//! The `dmvpn-lab` binary: errors a user meets, and a full `check` run with a capture that
//! leaves nothing behind.

mod common;

use std::process::Command;

fn lab_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dmvpn-lab"))
}

fn last_json(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {text}"))
}

#[test]
fn missing_agent_says_how_to_build_it() {
    if !common::root_or_skip("missing_agent_says_how_to_build_it") {
        return;
    }
    let out = lab_bin()
        .args(["check", "--agent", "/nonexistent/dmvpn-agent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cargo build --release -p dmvpn-agent -p dmvpn-e2e"),
        "{err}"
    );
    let j = last_json(&out.stdout);
    assert_eq!(j["ok"], false);
    assert_eq!(j["registered"], 0);
}

#[test]
fn refuses_to_run_unprivileged() {
    if !common::root_or_skip("refuses_to_run_unprivileged") {
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_dmvpn-lab"))
        .args(["underlay"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must run as root"), "{err}");
}

#[test]
fn check_with_capture_leaves_nothing_behind() {
    if !common::root_or_skip("check_with_capture_leaves_nothing_behind") {
        return;
    }
    let _g = common::serial();
    let agent = common::agent();
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("lab.pcap");
    let child = lab_bin()
        // In clear, so that the capture shows GRE and decodes NHRP (encrypted: below).
        .args([
            "check",
            "--phase",
            "3",
            "--spokes",
            "2",
            "--no-ipsec",
            "--agent",
        ])
        .arg(&agent)
        .arg("--pcap")
        .arg(&pcap)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let j = last_json(&out.stdout);
    assert_eq!(j["ok"], true, "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(j["phase"], 3);
    assert_eq!(j["spokes"], 2);
    assert_eq!(j["registered"], 2);
    assert_eq!(j["hub_forwarded_after_shortcut"], 0);
    assert!(j["shortcut_ms"].as_u64().is_some());
    assert_eq!(j["purged"], true);
    assert!(common::namespaces_with(&format!("dl{pid}x")).is_empty());
    // The capture holds the NHRP exchange (GRE protocol 0x2001) and the tunnelled pings.
    let r = Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(&pcap)
        .arg("proto gre")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        text.lines().count() > 10,
        "few GRE packets in the capture:\n{text}"
    );
    // After the shortcut, spoke 1 and spoke 2 talk GRE directly on the underlay (the burst
    // alone is 50 requests and 50 replies).
    let direct = |src: &str, dst: &str| {
        let r = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&pcap)
            .arg(format!("proto gre and src host {src} and dst host {dst}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&r.stdout).lines().count()
    };
    assert!(direct("198.51.100.11", "198.51.100.12") >= 50);
    assert!(direct("198.51.100.12", "198.51.100.11") >= 50);
    // The NHRP exchange of phase 3, as Wireshark decodes it (when tshark is installed).
    if let Ok(t) = Command::new("tshark")
        .args(["-n", "-r"])
        .arg(&pcap)
        .args(["-Y", "nhrp"])
        .output()
    {
        let text = String::from_utf8_lossy(&t.stdout);
        for what in [
            "Registration Request",
            "Registration Reply",
            "Traffic Indication",
            "Resolution Request",
            "Resolution Reply",
            "Purge Request",
        ] {
            assert!(
                text.contains(what),
                "no NHRP {what} in the capture:\n{text}"
            );
        }
    }
}

#[test]
fn encrypted_check_sees_only_ike_and_esp_and_reports_ike_ms() {
    if !common::root_or_skip("encrypted_check_sees_only_ike_and_esp_and_reports_ike_ms") {
        return;
    }
    let _g = common::serial();
    let agent = common::agent();
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("lab.pcap");
    let out = lab_bin()
        .args(["check", "--phase", "3", "--spokes", "2", "--agent"])
        .arg(&agent)
        .arg("--pcap")
        .arg(&pcap)
        .output()
        .unwrap();
    let j = last_json(&out.stdout);
    assert_eq!(j["ok"], true, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(j["ike_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{j}");
    assert!(j["underlay_esp_packets"].as_u64() > Some(100), "{j}");
    assert_eq!(j["underlay_clear_packets"], 0, "{j}");
    let passed: Vec<&str> = j["passed"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        passed.contains(&"ike") && passed.contains(&"encrypted-underlay"),
        "{j}"
    );
    // No GRE at all in the capture, and the spokes talk ESP directly.
    let count = |filter: &str| {
        let r = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&pcap)
            .arg(filter)
            .output()
            .unwrap();
        String::from_utf8_lossy(&r.stdout).lines().count()
    };
    assert_eq!(count("proto gre"), 0);
    assert!(count("ip proto 50 and src host 198.51.100.11 and dst host 198.51.100.12") >= 50);
}

#[test]
fn agent_failing_at_start_is_reported_and_cleaned_up() {
    if !common::root_or_skip("agent_failing_at_start_is_reported_and_cleaned_up") {
        return;
    }
    let _g = common::serial();
    let mut spec = common::spec(2, 3);
    spec.tweak = Some(Box::new(|n, t| {
        if n.role == dmvpn_e2e::lab::Role::Spoke && n.index == 2 {
            t.insert("holdtme".into(), toml::Value::Integer(5));
        }
    }));
    let mut lab = dmvpn_e2e::lab::Lab::build(spec).unwrap();
    let prefix = lab.prefix().to_string();
    let e = format!("{:#}", lab.start_agents().unwrap_err());
    // Names the node, says it exited, and carries the agent's own message.
    assert!(e.contains("spoke2") && e.contains("exited at start"), "{e}");
    assert!(e.contains("holdtme"), "{e}");
    assert!(lab.hub(1).agent_running() && lab.spoke(1).agent_running());
    drop(lab);
    assert!(common::namespaces_with(&prefix).is_empty());
}
