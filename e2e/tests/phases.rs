//! DMVPN phases 1, 2 and 3 with real agents: registration, LAN-to-LAN traffic via the hub,
//! shortcut (2, 3) or none (1), hub bypassed after the shortcut, purge on leave.

mod common;

use dmvpn_e2e::checks::{self, Report};

fn run_phase(phase: u8) -> Option<Report> {
    if !common::root_or_skip(&format!("phase{phase}")) {
        return None;
    }
    let _g = common::serial();
    let mut lab = common::start(common::spec(2, phase));
    let prefix = lab.prefix().to_string();
    let r = checks::run(&mut lab);
    println!("{}", checks::json_line(&r));
    if !r.ok {
        common::fail(&lab, &format!("phase {phase} failed: {:?}", r.failures));
    }
    drop(lab);
    assert!(common::namespaces_with(&prefix).is_empty());
    Some(r)
}

#[test]
fn phase1_hub_and_spoke_only() {
    let Some(r) = run_phase(1) else { return };
    assert_eq!(r.registered, 2);
    assert_eq!(r.shortcut_ms, None);
    assert!(r.passed.iter().any(|p| p == "no-shortcut"));
    // Every packet of the burst (request and reply) crossed the hub.
    assert!(r.hub_forwarded_after_shortcut.unwrap() >= u64::from(r.burst_received));
    assert!(r.burst_received > 0);
    assert!(r.purged);
}

#[test]
fn phase2_data_driven_resolution() {
    let Some(r) = run_phase(2) else { return };
    assert_eq!(r.registered, 2);
    assert!(r.shortcut_ms.is_some());
    assert!(r.hub_forwarded_before_shortcut.unwrap() > 0);
    assert_eq!(r.hub_forwarded_after_shortcut, Some(0));
    assert!(r.burst_received > 0);
    assert!(r.purged);
}

#[test]
fn phase3_redirect_and_shortcut() {
    let Some(r) = run_phase(3) else { return };
    assert_eq!(r.registered, 2);
    assert!(r.shortcut_ms.is_some());
    assert!(r.passed.iter().any(|p| p == "redirect"));
    assert!(r.hub_forwarded_before_shortcut.unwrap() > 0);
    assert_eq!(r.hub_forwarded_after_shortcut, Some(0));
    assert!(r.burst_received > 0);
    assert!(r.purged);
}
