//! A status built with the crate's types and helpers, as the operator writes it, is accepted
//! by the CRD schema; one that exceeds the list bounds is not.

mod support;

use dmvpn_crds::conditions::{
    self, ConditionStatus, HUB_READY_REQUIRES, SPOKE_READY_REQUIRES, new_condition, reasons,
    set_condition, set_ready, types,
};
use dmvpn_crds::hub::HUB_MAX_PEERS;
use dmvpn_crds::spoke::SPOKE_MAX_PEERS;
use dmvpn_crds::{
    CertificateStatus, DmvpnHub, DmvpnHubStatus, DmvpnSpoke, DmvpnSpokeStatus, PeerKind, PeerState,
    PeerStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use support::{crate_dir, load_yaml, schema_errors};

fn t(s: i64) -> Time {
    Time(Timestamp::from_second(s).unwrap())
}

fn peer(i: usize, kind: PeerKind) -> PeerStatus {
    PeerStatus {
        tunnel_address: format!("10.42.{}.{}", i / 250, i % 250 + 2),
        nbma_address: "203.0.113.9".into(),
        kind,
        state: PeerState::Up,
        name: Some(format!("spoke-{i}")),
        node: Some("node-1".into()),
        nat_detected: i.is_multiple_of(2),
        since: Some(t(1_700_000_000)),
        rtt_milliseconds: Some(12),
    }
}

fn certificate(name: &str) -> CertificateStatus {
    CertificateStatus {
        secret_name: dmvpn_crds::spoke_certificate_secret_name(name),
        not_after: Some(t(1_800_000_000)),
        renew_after: Some(t(1_790_000_000)),
        serial_number: Some("0a1b2c".into()),
    }
}

fn hub_with_status(peers: usize) -> DmvpnHub {
    let mut hub: DmvpnHub =
        serde_json::from_value(load_yaml(&crate_dir().join("examples/hub.yaml"))).unwrap();
    let mut st = DmvpnHubStatus {
        observed_generation: Some(1),
        tunnel_address: Some("10.42.0.1".into()),
        nbma_addresses: vec!["198.51.100.1".into()],
        certificate: Some(certificate("hub-a")),
        peers: (0..peers).map(|i| peer(i, PeerKind::Spoke)).collect(),
        peer_count: Some(peers as u32),
        ..Default::default()
    };
    for (ty, reason) in [
        (types::ADDRESS_ASSIGNED, reasons::ADDRESS_STATIC),
        (types::CERTIFICATE_READY, reasons::CERTIFICATE_ISSUED),
        (types::ENDPOINT_READY, reasons::STATIC_ADDRESSES),
    ] {
        set_condition(
            &mut st.conditions,
            new_condition(ty, ConditionStatus::True, reason, "", Some(1), t(10)),
        );
    }
    set_ready(&mut st.conditions, HUB_READY_REQUIRES, Some(1), t(10));
    hub.status = Some(st);
    hub
}

#[test]
fn hub_status_is_accepted() {
    let hub = hub_with_status(HUB_MAX_PEERS);
    let st = hub.status.as_ref().unwrap();
    assert!(conditions::is_condition_true(&st.conditions, types::READY));
    let v = serde_json::to_value(&hub).unwrap();
    assert_eq!(
        v["status"]["certificate"]["notAfter"],
        "2027-01-15T08:00:00Z"
    );
    let errs = schema_errors(&v);
    assert!(errs.is_empty(), "{errs:#?}");
}

#[test]
fn hub_status_over_the_peer_bound_is_rejected() {
    let v = serde_json::to_value(hub_with_status(HUB_MAX_PEERS + 1)).unwrap();
    let errs = schema_errors(&v);
    assert!(
        errs.iter().any(|e| e.starts_with("/status/peers")),
        "{errs:#?}"
    );
}

#[test]
fn spoke_status_is_accepted_and_bounded() {
    let mut spoke: DmvpnSpoke =
        serde_json::from_value(load_yaml(&crate_dir().join("examples/spoke-b.yaml"))).unwrap();
    let mut st = DmvpnSpokeStatus {
        observed_generation: Some(2),
        tunnel_address: Some("10.42.0.20".into()),
        tunnel_network: Some("10.42.0.0/24".into()),
        certificate: Some(certificate("spoke-b")),
        site_prefixes: vec!["10.2.0.0/16".into(), "10.3.1.0/24".into()],
        active_nodes: Some(2),
        peers: (0..SPOKE_MAX_PEERS)
            .map(|i| {
                peer(
                    i,
                    if i == 0 {
                        PeerKind::Hub
                    } else {
                        PeerKind::Shortcut
                    },
                )
            })
            .collect(),
        peer_count: Some(40),
        ..Default::default()
    };
    set_condition(
        &mut st.conditions,
        new_condition(
            types::REGISTERED,
            ConditionStatus::False,
            reasons::NOT_REGISTERED,
            "no hub answered",
            Some(2),
            t(5),
        ),
    );
    set_ready(&mut st.conditions, SPOKE_READY_REQUIRES, Some(2), t(5));
    spoke.status = Some(st);
    let errs = schema_errors(&serde_json::to_value(&spoke).unwrap());
    assert!(errs.is_empty(), "{errs:#?}");

    if let Some(st) = spoke.status.as_mut() {
        st.peers.push(peer(99, PeerKind::Shortcut));
    }
    let errs = schema_errors(&serde_json::to_value(&spoke).unwrap());
    assert!(
        errs.iter().any(|e| e.starts_with("/status/peers")),
        "{errs:#?}"
    );
}

#[test]
fn malformed_conditions_are_rejected() {
    let good = serde_json::to_value(hub_with_status(1)).unwrap();
    assert!(schema_errors(&good).is_empty());
    for (field, value) in [
        ("status", serde_json::json!("Maybe")),
        ("reason", serde_json::json!("")),
        ("reason", serde_json::json!("Not Ready")),
        ("type", serde_json::json!("has space")),
    ] {
        let mut bad = good.clone();
        bad["status"]["conditions"][0][field] = value.clone();
        let errs = schema_errors(&bad);
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&format!("/status/conditions/0/{field}"))),
            "{field}={value}: {errs:#?}"
        );
    }
}
