//! The namespace topology on its own (no agents): underlay reachability and cleanup on
//! drop, on panic and on Ctrl-C of `dmvpn-lab`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dmvpn_e2e::checks;
use dmvpn_e2e::lab::{Lab, LabSpec};

fn spec(spokes: usize, hubs: usize) -> LabSpec {
    // No agent is started in these tests.
    let mut s = LabSpec::new("/nonexistent/dmvpn-agent".into());
    s.spokes = spokes;
    s.hubs = hubs;
    s
}

#[test]
fn underlay_reachable_and_removed_on_drop() {
    if !common::root_or_skip("underlay_reachable_and_removed_on_drop") {
        return;
    }
    let _g = common::serial();
    let lab = Lab::build(spec(3, 2)).unwrap();
    let prefix = lab.prefix().to_string();
    let dir = lab.dir().to_path_buf();
    // inet + 2 hubs + 3 spokes + 3 LANs
    assert_eq!(common::namespaces_with(&prefix).len(), 9);
    assert_eq!(lab.namespaces().len(), 9);
    let failures = checks::underlay(&lab);
    assert!(failures.is_empty(), "underlay failures: {failures:?}");
    // LAN hosts are isolated from the underlay except through their own spoke: with no
    // tunnel yet, LAN1 cannot reach LAN2.
    let p = lab.lan_ping(1, 2, 1, "0.2").unwrap();
    assert!(!p.ok(), "LAN1 reached LAN2 without a tunnel: {p:?}");
    drop(lab);
    assert!(common::namespaces_with(&prefix).is_empty());
    assert!(!dir.exists(), "lab dir {} left behind", dir.display());
}

#[test]
fn removed_on_panic() {
    if !common::root_or_skip("removed_on_panic") {
        return;
    }
    let _g = common::serial();
    let prefix = std::sync::Mutex::new(String::new());
    let res = std::panic::catch_unwind(|| {
        let lab = Lab::build(spec(1, 1)).unwrap();
        *prefix.lock().unwrap() = lab.prefix().to_string();
        assert_eq!(common::namespaces_with(lab.prefix()).len(), 4);
        panic!("deliberate");
    });
    assert!(res.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    assert!(common::namespaces_with(&prefix).is_empty());
}

#[test]
fn bad_spec_is_refused_before_creating_anything() {
    if !common::root_or_skip("bad_spec_is_refused_before_creating_anything") {
        return;
    }
    let mut s = spec(0, 1);
    let e = Lab::build(s).unwrap_err().to_string();
    assert!(e.contains("--spokes"), "{e}");
    s = spec(2, 3);
    let e = Lab::build(s).unwrap_err().to_string();
    assert!(e.contains("1 or 2 hubs"), "{e}");
    let mut s = spec(2, 1);
    s.phase = 4;
    assert!(Lab::build(s).is_err());
    let mine = format!("dl{}x", std::process::id());
    // Other tests of this binary may hold labs; none of them are half-built leftovers of
    // the refused specs, which never got a namespace.
    let _g = common::serial();
    assert!(common::namespaces_with(&mine).is_empty());
}

#[test]
fn ctrl_c_removes_everything() {
    if !common::root_or_skip("ctrl_c_removes_everything") {
        return;
    }
    let _g = common::serial();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmvpn-lab"))
        .args(["underlay", "--spokes", "2", "--hold"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let prefix = format!("dl{pid}x");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !line.contains("ready") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "dmvpn-lab exited early"
        );
        assert!(Instant::now() < deadline);
    }
    assert_eq!(common::namespaces_with(&prefix).len(), 6);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(
        common::namespaces_with(&prefix).is_empty(),
        "left: {:?}",
        common::namespaces_with(&prefix)
    );
}

#[test]
fn capture_sees_forwarded_underlay_traffic() {
    if !common::root_or_skip("capture_sees_forwarded_underlay_traffic") {
        return;
    }
    let _g = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("underlay.pcap");
    let mut s = spec(2, 1);
    s.pcap = Some(pcap.clone());
    let lab = Lab::build(s).unwrap();
    let p = lab.spoke(1).ns.ping("198.51.100.12", 3, "0.05").unwrap();
    assert_eq!(p.received, 3);
    drop(lab);
    // Spoke-to-spoke unicast is bridged between two ports, not addressed to the bridge: it
    // is only seen because the capture puts br0 in promiscuous mode.
    let out = Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(&pcap)
        .arg("icmp and host 198.51.100.11 and host 198.51.100.12")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 6, "{text}");
    let all = Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(&pcap)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&all.stdout).contains("IP6"),
        "IPv6 in an IPv4-only lab"
    );
}

#[test]
fn factory_creates_and_deletes_namespaces() {
    if !common::root_or_skip("factory_creates_and_deletes_namespaces") {
        return;
    }
    let _g = common::serial();
    let f = dmvpn_e2e::netns::NsFactory::new();
    let a = f.create("a").unwrap();
    let b = f.create("b").unwrap();
    a.veth_to("va", &b, "vb").unwrap();
    a.addr_add("va", "10.77.0.1/30").unwrap();
    b.addr_add("vb", "10.77.0.2/30").unwrap();
    assert!(a.ping("10.77.0.2", 1, "0.2").unwrap().ok());
    let name_a = a.name().to_string();
    a.delete();
    assert!(common::namespaces_with(&name_a).is_empty());
    // The peer end goes with namespace a (the kernel dismantles a namespace asynchronously).
    assert!(common::wait_until(Duration::from_secs(5), || !b.has_link("vb")));
    let prefix = f.prefix().to_string();
    drop(f);
    assert!(common::namespaces_with(&prefix).is_empty());
}
