//! Failure scenarios with real agents: a hub dies, a spoke's NBMA address changes, a spoke
//! leaves, a spoke has the wrong GRE key or the wrong NHRP password.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use dmvpn_e2e::agent::counter;
use dmvpn_e2e::checks;
use dmvpn_e2e::lab::{Lab, Role, spoke_lan_host};
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(20);

fn hub_counter(lab: &Lab, h: usize, pointer: &str) -> u64 {
    counter(&lab.hub(h).snapshot().unwrap().counters, pointer)
}

fn registered_at(lab: &Lab, h: usize, s: usize) -> bool {
    let spoke = lab.spoke(s);
    lab.hub(h)
        .snapshot()
        .is_ok_and(|snap| snap.has_registration(spoke.tunnel, spoke.nbma))
}

#[test]
fn two_hubs_one_fails() {
    if !common::root_or_skip("two_hubs_one_fails") {
        return;
    }
    let _g = common::serial();
    // Phase 1: all spoke-to-spoke traffic must cross a hub, so "flows via hub 2" is
    // observable. A short holdtime makes the spokes refresh (and notice the dead hub) soon.
    let mut spec = common::spec(2, 1);
    spec.hubs = 2;
    spec.holdtime = 9;
    let mut lab = common::start(spec);
    if lab.wait_registered(WAIT).unwrap() != 2 {
        common::fail(&lab, "spokes did not register with both hubs");
    }
    let p = lab.lan_ping(1, 2, 3, "0.2").unwrap();
    if !p.ok() {
        common::fail(&lab, &format!("LAN1 -> LAN2 before the failure: {p:?}"));
    }
    // Hub 1 crashes (no purge, no goodbye).
    lab.stop_agent(Role::Hub, 1, Signal::SIGKILL, Duration::from_secs(2));
    let hub1 = lab.hub(1).tunnel;
    let hub2 = lab.hub(2).tunnel;
    let ok = common::wait_until(WAIT, || {
        (1..=2).all(|s| {
            lab.spoke(s).snapshot().is_ok_and(|snap| {
                snap.nhs(hub1).is_some_and(|n| n.state == "down")
                    && snap.nhs(hub2).is_some_and(|n| n.is_up() && n.preferred)
            })
        })
    });
    if !ok {
        let nhs: Vec<_> = (1..=2)
            .map(|s| lab.spoke(s).snapshot().map(|x| x.nhs))
            .collect();
        common::fail(
            &lab,
            &format!("spokes do not show hub1 down and hub2 up: {nhs:?}"),
        );
    }
    let before = hub_counter(&lab, 2, "/dataplane/hub_forwarded_packets");
    let p = lab.lan_ping(1, 2, 10, "0.05").unwrap();
    let after = hub_counter(&lab, 2, "/dataplane/hub_forwarded_packets");
    if !p.ok() {
        common::fail(&lab, &format!("LAN1 -> LAN2 after hub1 died: {p:?}"));
    }
    assert!(
        after - before >= u64::from(p.received),
        "hub2 forwarded {} packets for {} replies",
        after - before,
        p.received
    );
}

#[test]
fn spoke_nbma_change_reregisters() {
    if !common::root_or_skip("spoke_nbma_change_reregisters") {
        return;
    }
    let _g = common::serial();
    let mut spec = common::spec(2, 3);
    spec.spoke_nbma_interface = true;
    let mut lab = common::start(spec);
    if lab.wait_registered(WAIT).unwrap() != 2 {
        common::fail(&lab, "spokes did not register");
    }
    let old = lab.spoke(1).nbma;
    let new = Ipv4Addr::new(198, 51, 100, 111);
    lab.renumber_spoke(1, new).unwrap();
    let tunnel = lab.spoke(1).tunnel;
    let ok = common::wait_until(WAIT, || {
        lab.hub(1).cache().is_ok_and(|c| {
            c.registration(tunnel)
                .is_some_and(|e| e.nbma_v4() == Some(new))
        })
    });
    if !ok {
        common::fail(
            &lab,
            &format!("hub cache does not show spoke1 at {new} (was {old})"),
        );
    }
    let changes = counter(
        &lab.spoke(1).snapshot().unwrap().counters,
        "/agent/nbma_changes",
    );
    assert!(changes >= 1, "spoke1 counted {changes} NBMA changes");
    let c = lab.hub(1).cache().unwrap();
    assert!(
        !c.entries.iter().any(|e| e.nbma_v4() == Some(old)),
        "old NBMA {old} still in the hub cache: {:?}",
        c.entries
    );
    for (a, b) in [(1, 2), (2, 1)] {
        let p = lab.lan_ping(a, b, 5, "0.1").unwrap();
        if !p.ok() {
            common::fail(
                &lab,
                &format!(
                    "LAN{a} -> {} after the NBMA change: {p:?}",
                    spoke_lan_host(b)
                ),
            );
        }
    }
}

#[test]
fn spoke_leaving_is_purged() {
    if !common::root_or_skip("spoke_leaving_is_purged") {
        return;
    }
    let _g = common::serial();
    let mut lab = common::start(common::spec(3, 3));
    if lab.wait_registered(WAIT).unwrap() != 3 {
        common::fail(&lab, "spokes did not register");
    }
    let tunnel = lab.spoke(2).tunnel;
    lab.signal_agent(Role::Spoke, 2, Signal::SIGTERM).unwrap();
    // Holdtime is 30 s: gone within 10 s means it was purged, not expired.
    if checks::wait_purged(&lab, tunnel, Duration::from_secs(10)).is_none() {
        common::fail(&lab, "spoke2 still in the hub cache 10 s after SIGTERM");
    }
    assert!(lab.stop_agent(Role::Spoke, 2, Signal::SIGTERM, Duration::from_secs(3)));
    assert!(registered_at(&lab, 1, 1) && registered_at(&lab, 1, 3));
    let p = lab.lan_ping(1, 3, 3, "0.2").unwrap();
    if !p.ok() {
        common::fail(&lab, &format!("LAN1 -> LAN3 after spoke2 left: {p:?}"));
    }
}

#[test]
fn wrong_gre_key_cannot_register() {
    if !common::root_or_skip("wrong_gre_key_cannot_register") {
        return;
    }
    let _g = common::serial();
    let mut spec = common::spec(2, 3);
    spec.tweak = Some(Box::new(|n, t| {
        if n.role == Role::Spoke && n.index == 2 {
            t.insert("gre_key".into(), toml::Value::Integer(4242));
        }
    }));
    let lab = common::start(spec);
    let ok = common::wait_until(WAIT, || {
        registered_at(&lab, 1, 1) && hub_counter(&lab, 1, "/dataplane/drops/wrong_key") > 0
    });
    if !ok {
        common::fail(
            &lab,
            "spoke1 registered and wrong_key drops at the hub expected",
        );
    }
    // Give spoke2 a few retries: it must never get in.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !registered_at(&lab, 1, 2),
        "spoke2 with the wrong GRE key registered"
    );
    let s2 = lab.spoke(2).snapshot().unwrap();
    assert_eq!(s2.nhs_up_count(), 0, "spoke2 shows an NHS up: {:?}", s2.nhs);
    assert!(hub_counter(&lab, 1, "/dataplane/drops/wrong_key") >= 2);
}

#[test]
fn wrong_nhrp_password_is_dropped() {
    if !common::root_or_skip("wrong_nhrp_password_is_dropped") {
        return;
    }
    let _g = common::serial();
    let mut spec = common::spec(2, 3);
    spec.tweak = Some(Box::new(|n, t| {
        if n.role == Role::Spoke && n.index == 2 {
            t.insert("nhrp_auth".into(), toml::Value::String("wrong".into()));
        }
    }));
    let lab = common::start(spec);
    let ok = common::wait_until(WAIT, || {
        registered_at(&lab, 1, 1) && hub_counter(&lab, 1, "/nhrp/drops/bad_auth") > 0
    });
    if !ok {
        common::fail(
            &lab,
            "spoke1 registered and bad_auth drops at the hub expected",
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !registered_at(&lab, 1, 2),
        "spoke2 with the wrong password registered"
    );
    let s2 = lab.spoke(2).snapshot().unwrap();
    assert_eq!(s2.nhs_up_count(), 0, "spoke2 shows an NHS up: {:?}", s2.nhs);
}
