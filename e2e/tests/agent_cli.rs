//! The agent's CLI against a running lab: `show` tables and JSON, and `clear nhrp cache`
//! removing a shortcut that traffic then forms again (via the hub first).

mod common;

use std::process::Command;
use std::time::Duration;

use dmvpn_e2e::checks;
use dmvpn_e2e::lab::{Lab, Role, spoke_lan_host};

fn cli(lab: &Lab, socket: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(&lab.spec.agent)
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dmvpn-agent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn show_and_clear_nhrp_cache() {
    if !common::root_or_skip("show_and_clear_nhrp_cache") {
        return;
    }
    let _g = common::serial();
    let mut spec = common::spec(2, 3);
    // The hub redirects a flow at most once per this interval: keep it short, the shortcut
    // is cleared and must form again below.
    spec.tweak = Some(Box::new(|n, t| {
        if n.role == Role::Hub {
            t.insert("redirect_rate_limit_secs".into(), toml::Value::Integer(1));
        }
    }));
    let lab = common::start(spec);
    if lab.wait_registered(Duration::from_secs(20)).unwrap() != 2 {
        common::fail(&lab, "spokes did not register");
    }
    let hub = lab.hub(1);
    let table = cli(&lab, &hub.socket, &["show", "dmvpn"]);
    for s in &lab.spokes {
        let row = table
            .lines()
            .find(|l| l.contains(&s.nbma.to_string()))
            .unwrap_or_else(|| panic!("no row for {} in:\n{table}", s.nbma));
        assert!(
            row.contains(&s.tunnel.to_string()) && row.contains("UP"),
            "{row}"
        );
    }
    let json: serde_json::Value = serde_json::from_str(&cli(
        &lab,
        &hub.socket,
        &["show", "nhrp", "cache", "--json"],
    ))
    .unwrap();
    assert_eq!(json["interface"], "dmvpn0");

    // A shortcut forms, is cleared, and forms again on new traffic (through the hub first).
    let s1 = lab.spoke(1);
    let dst = spoke_lan_host(2);
    let nbma2 = lab.spoke(2).nbma;
    let p = lab.lan_ping(1, 2, 20, "0.02").unwrap();
    assert!(p.ok(), "{p:?}");
    let has_shortcut = || {
        s1.cache().is_ok_and(|c| {
            c.shortcut_for(dst)
                .is_some_and(|e| e.nbma_v4() == Some(nbma2))
        })
    };
    if !common::wait_until(Duration::from_secs(10), has_shortcut) {
        common::fail(&lab, "no shortcut after the first traffic");
    }
    let out = cli(&lab, &s1.socket, &["clear", "nhrp", "cache"]);
    assert!(out.starts_with("Cleared "), "{out}");
    assert!(!out.starts_with("Cleared 0 "), "{out}");
    assert!(!has_shortcut(), "shortcut still there after clear");
    let fwd0 = checks::hub_forwarded(&lab).unwrap();
    let (ping, _log) = lab.spawn_lan_ping(1, 2, "0.02", 500).unwrap();
    let formed = common::wait_until(Duration::from_secs(10), has_shortcut);
    dmvpn_e2e::cleanup::stop(ping, Duration::from_secs(1));
    if !formed {
        common::fail(&lab, "the shortcut did not form again after clear");
    }
    assert!(
        checks::hub_forwarded(&lab).unwrap() > fwd0,
        "traffic after clear did not go through the hub first"
    );
}
