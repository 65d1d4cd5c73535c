//! The operator with the real kube-runtime Controller against the fake API server.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use dmvpn_crds::conditions::{reasons, types};
use dmvpn_crds::{DmvpnHub, DmvpnSpoke};
use dmvpn_operator::certs;
use dmvpn_operator::pki;
use dmvpn_operator::testing::{Lab, condition_of, is_ready, ready_of, test_settings};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use serde_json::json;

const NS: &str = dmvpn_crds::OPERATOR_NAMESPACE;
const WAIT: Duration = Duration::from_secs(120);

fn addr_of(s: &DmvpnSpoke) -> Ipv4Addr {
    s.status
        .as_ref()
        .and_then(|st| st.tunnel_address.as_deref())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("spoke {} has no address", s.name_any()))
}

fn addresses(list: &[DmvpnSpoke]) -> BTreeMap<String, Ipv4Addr> {
    list.iter().map(|s| (s.name_any(), addr_of(s))).collect()
}

async fn secret(lab: &Lab, name: &str) -> Option<Secret> {
    let api: Api<Secret> = Api::namespaced(lab.client.clone(), NS);
    api.get_opt(name).await.unwrap()
}

fn text(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .map(|b| String::from_utf8(b.0.clone()).unwrap())
}

async fn ipam_record(lab: &Lab, net: &str) -> BTreeMap<String, String> {
    let name = dmvpn_operator::ipam::record_name(&net.parse().unwrap());
    let s = secret(lab, &name).await.expect("ipam record exists");
    s.data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
        .collect()
}

fn event_reasons(lab: &Lab) -> BTreeSet<String> {
    lab.server
        .objects("events")
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_and_fifty_spokes_become_ready_with_unique_addresses() {
    let lab = Lab::start().await;
    let op = lab.start_operator(test_settings());
    let agents = lab.start_agents();
    lab.create_hub("hub-a", "10.42.0.0/24").await;
    // Created concurrently: allocation must still be unique and gap-free.
    let creates = (0..50).map(|i| {
        let lab = &lab;
        async move {
            lab.create_spoke(
                &format!("spoke-{i:02}"),
                "hub-a",
                &format!("10.100.{i}.0/24"),
            )
            .await
        }
    });
    futures::future::join_all(creates).await;
    let list = lab.wait_all_ready(50, WAIT).await;

    let addrs = addresses(&list);
    let unique: BTreeSet<Ipv4Addr> = addrs.values().copied().collect();
    assert_eq!(unique.len(), 50, "duplicate addresses: {addrs:?}");
    let expected: BTreeSet<Ipv4Addr> = (2..=51).map(|i| Ipv4Addr::new(10, 42, 0, i)).collect();
    assert_eq!(unique, expected, "lowest free addresses, .1 is the hub's");

    let hub = lab.hubs.get("hub-a").await.unwrap();
    let hs = hub.status.unwrap();
    assert_eq!(hs.tunnel_address.as_deref(), Some("10.42.0.1"));
    assert_eq!(
        condition_of(&hs.conditions, types::READY).unwrap().0,
        "True"
    );

    // The record holds exactly the hub and the 50 spokes.
    let record = ipam_record(&lab, "10.42.0.0/24").await;
    assert_eq!(record.len(), 51);
    assert_eq!(record["10.42.0.1"], "hub/hub-a");
    for (name, a) in &addrs {
        assert_eq!(record[&a.to_string()], format!("spoke/{name}"));
    }

    // Every spoke's certificate carries its address and chains to the CA.
    let ca = secret(&lab, dmvpn_crds::CA_SECRET_NAME)
        .await
        .expect("CA secret");
    let bundle = text(&ca, certs::CA_CRT).unwrap();
    for s in &list {
        let sec = secret(
            &lab,
            &dmvpn_crds::spoke_certificate_secret_name(&s.name_any()),
        )
        .await
        .expect("spoke secret");
        assert_eq!(sec.type_.as_deref(), Some("kubernetes.io/tls"));
        let info = pki::verify(
            &text(&sec, certs::TLS_CRT).unwrap(),
            &bundle,
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(info.ip_addresses, vec![IpAddr::V4(addr_of(s))]);
        assert_eq!(info.uris, vec![format!("dmvpn://spoke/{}", s.name_any())]);
        assert!(info.ipsec_ike_eku);
        assert_eq!(text(&sec, certs::CA_CRT).unwrap(), bundle);
        let st = s.status.as_ref().unwrap();
        assert_eq!(
            st.certificate.as_ref().unwrap().serial_number.as_deref(),
            Some(info.serial.as_str())
        );
        assert_eq!(st.site_prefixes.len(), 1);
        assert_eq!(st.active_nodes, Some(2));
        assert!(
            s.finalizers()
                .iter()
                .any(|f| f == dmvpn_crds::FINALIZER_ADDRESS)
        );
    }

    let reasons_seen = event_reasons(&lab);
    for r in [
        "AddressAllocated",
        "CertificateIssued",
        reasons::ALL_CONDITIONS_MET,
    ] {
        assert!(reasons_seen.contains(r), "no {r} event in {reasons_seen:?}");
    }
    let text = op.metrics.encode();
    assert!(text.contains("dmvpn_operator_spokes_ready 50"), "{text}");
    assert!(
        text.contains("dmvpn_operator_addresses_allocated{hub=\"hub-a\"}"),
        "{text}"
    );
    agents.cancel();
    op.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_releases_the_address_and_recreate_reuses_it() {
    let lab = Lab::start().await;
    let op = lab.start_operator(test_settings());
    let agents = lab.start_agents();
    lab.create_hub("hub-a", "10.42.0.0/24").await;
    for i in 0..5 {
        lab.create_spoke(&format!("s{i}"), "hub-a", &format!("10.100.{i}.0/24"))
            .await;
    }
    let list = lab.wait_all_ready(5, WAIT).await;
    let before = addresses(&list);
    let freed = before["s2"];

    lab.spokes
        .delete("s2", &DeleteParams::default())
        .await
        .unwrap();
    lab.wait_spokes(WAIT, "s2 gone", |l| l.len() == 4).await;
    let record = ipam_record(&lab, "10.42.0.0/24").await;
    assert!(!record.contains_key(&freed.to_string()), "{record:?}");
    assert!(
        secret(&lab, &dmvpn_crds::spoke_certificate_secret_name("s2"))
            .await
            .is_none(),
        "certificate secret deleted with the spoke"
    );

    lab.create_spoke("s-new", "hub-a", "10.100.50.0/24").await;
    let list = lab.wait_all_ready(5, WAIT).await;
    let after = addresses(&list);
    assert_eq!(
        after["s-new"], freed,
        "the released address is the lowest free one again"
    );
    for (n, a) in &before {
        if n != "s2" {
            assert_eq!(after[n], *a);
        }
    }
    assert!(event_reasons(&lab).contains("AddressReleased"));
    agents.cancel();
    op.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_every_assignment() {
    let lab = Lab::start().await;
    let op = lab.start_operator(test_settings());
    let agents = lab.start_agents();
    lab.create_hub("hub-a", "10.42.0.0/24").await;
    for i in 0..20 {
        lab.create_spoke(&format!("s{i:02}"), "hub-a", &format!("10.100.{i}.0/24"))
            .await;
    }
    let before = addresses(&lab.wait_all_ready(20, WAIT).await);
    let serials: BTreeMap<String, String> = lab
        .spokes
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|s| {
            (
                s.name_any(),
                s.status
                    .as_ref()
                    .unwrap()
                    .certificate
                    .as_ref()
                    .unwrap()
                    .serial_number
                    .clone()
                    .unwrap(),
            )
        })
        .collect();
    op.shutdown().await.unwrap();

    // While it is down, a crash leftover appears: an address held for a spoke that is gone.
    let records: Api<Secret> = Api::namespaced(lab.client.clone(), NS);
    let record_name = dmvpn_operator::ipam::record_name(&"10.42.0.0/24".parse().unwrap());
    records
        .patch(
            &record_name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"data": {"10.42.0.200": "c3Bva2UvZ2hvc3Q="}})),
        )
        .await
        .unwrap();
    assert_eq!(
        ipam_record(&lab, "10.42.0.0/24").await["10.42.0.200"],
        "spoke/ghost"
    );

    // Restart 1: the record survives; the leftover is released.
    let op = lab.start_operator(test_settings());
    lab.create_spoke("late-1", "hub-a", "10.100.90.0/24").await;
    let list = lab.wait_all_ready(21, WAIT).await;
    let after = addresses(&list);
    for (n, a) in &before {
        assert_eq!(after[n], *a, "{n} kept its address");
    }
    assert_eq!(after["late-1"], Ipv4Addr::new(10, 42, 0, 22));
    assert!(
        !ipam_record(&lab, "10.42.0.0/24")
            .await
            .contains_key("10.42.0.200")
    );
    // Certificates were not re-issued just because of the restart.
    for s in &list {
        if let Some(old) = serials.get(&s.name_any()) {
            assert_eq!(
                s.status
                    .as_ref()
                    .unwrap()
                    .certificate
                    .as_ref()
                    .unwrap()
                    .serial_number
                    .as_ref(),
                Some(old)
            );
        }
    }
    op.shutdown().await.unwrap();

    // Restart 2: the record itself is lost; assignments come back from the statuses, and a
    // spoke created meanwhile does not take any of them.
    let api: Api<Secret> = Api::namespaced(lab.client.clone(), NS);
    api.delete(
        &dmvpn_operator::ipam::record_name(&"10.42.0.0/24".parse().unwrap()),
        &DeleteParams::default(),
    )
    .await
    .unwrap();
    lab.create_spoke("late-2", "hub-a", "10.100.91.0/24").await;
    let op = lab.start_operator(test_settings());
    let list = lab.wait_all_ready(22, WAIT).await;
    let again = addresses(&list);
    for (n, a) in &after {
        assert_eq!(
            again[n], *a,
            "{n} kept its address after the record was lost"
        );
    }
    assert_eq!(again["late-2"], Ipv4Addr::new(10, 42, 0, 23));
    let record = ipam_record(&lab, "10.42.0.0/24").await;
    assert_eq!(record.len(), 23);
    agents.cancel();
    op.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_at_two_thirds_with_overlap() {
    let lab = Lab::start().await;
    let mut settings = test_settings();
    settings.cert_lifetime = Duration::from_secs(9);
    let op = lab.start_operator(settings);
    let agents = lab.start_agents();
    lab.create_hub("hub-a", "10.42.0.0/24").await;
    lab.create_spoke("s0", "hub-a", "10.100.0.0/24").await;
    lab.wait_all_ready(1, WAIT).await;
    let name = dmvpn_crds::spoke_certificate_secret_name("s0");
    let first = secret(&lab, &name).await.unwrap();
    let old_crt = text(&first, certs::TLS_CRT).unwrap();
    let old = pki::inspect(&old_crt).unwrap();
    assert_eq!(
        old.not_after.duration_since(old.not_before).unwrap(),
        Duration::from_secs(9)
    );

    // Wait for the renewal (due at 2/3 of the lifetime, 6 s after notBefore).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let rotated = loop {
        let s = secret(&lab, &name).await.unwrap();
        if text(&s, certs::TLS_CRT).as_deref() != Some(old_crt.as_str()) {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "no rotation");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let now = SystemTime::now();
    let new_crt = text(&rotated, certs::TLS_CRT).unwrap();
    let new = pki::inspect(&new_crt).unwrap();
    assert!(
        new.not_before + Duration::from_secs(1) >= old.renew_at(),
        "renewed at 2/3, not before"
    );
    assert!(now >= old.renew_at());
    assert_eq!(new.ip_addresses, old.ip_addresses, "same identity");
    assert_ne!(new.serial, old.serial);
    // The overlap: the previous certificate is still offered and both are accepted.
    assert_eq!(
        text(&rotated, certs::TLS_CRT_PREVIOUS).as_deref(),
        Some(old_crt.as_str())
    );
    assert!(text(&rotated, certs::TLS_KEY_PREVIOUS).is_some());
    let bundle = text(&rotated, certs::CA_CRT).unwrap();
    if now < old.not_after {
        pki::verify(&old_crt, &bundle, now).unwrap();
    }
    pki::verify(&new_crt, &bundle, now).unwrap();
    pki::verify(&old_crt, &bundle, old.renew_at() + Duration::from_secs(1)).unwrap();
    pki::verify(&new_crt, &bundle, old.renew_at() + Duration::from_secs(1)).unwrap();
    assert!(pki::verify(&old_crt, &bundle, old.not_after + Duration::from_secs(1)).is_err());

    // The spoke status follows, and the rotation is visible as an event and a metric.
    let list = lab
        .wait_spokes(WAIT, "status shows the new serial", |l| {
            l[0].status
                .as_ref()
                .and_then(|s| s.certificate.as_ref())
                .and_then(|c| c.serial_number.as_deref())
                == Some(new.serial.as_str())
        })
        .await;
    assert!(is_ready(&list[0]));
    assert!(event_reasons(&lab).contains("CertificateRotated"));
    assert!(
        op.metrics
            .encode()
            .contains("dmvpn_operator_certificate_rotations_total{kind=\"spoke\"}")
    );
    agents.cancel();
    op.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_reported_on_the_field() {
    let lab = Lab::start().await;
    let op = lab.start_operator(test_settings());
    let agents = lab.start_agents();
    lab.create_hub("hub-a", "10.42.0.0/24").await;
    // Schema would reject these; the fake API server does not run CEL, so the operator's own
    // checks show.
    lab.create_hub("tiny", "10.60.0.0/32").await;
    lab.create_hub("small", "10.61.0.0/30").await;

    // A spoke naming a hub that does not exist (yet).
    lab.create_spoke("orphan", "hub-missing", "10.100.1.0/24")
        .await;
    // Prefixes: the first keeps them, the second overlaps and is refused.
    lab.create_spoke("first", "hub-a", "10.1.0.0/16").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    lab.create_spoke("second", "hub-a", "10.1.2.0/24").await;
    // Prefix overlapping the tunnel network.
    lab.create_spoke("in-tunnel", "hub-a", "10.42.0.0/16").await;
    // The small network has room for the hub and one spoke only; the first takes it.
    lab.create_spoke("small-1", "small", "10.100.2.0/24").await;
    lab.wait_spokes(WAIT, "small-1 Ready", |l| {
        l.iter().any(|s| s.name_any() == "small-1" && is_ready(s))
    })
    .await;
    lab.create_spoke("small-2", "small", "10.100.3.0/24").await;
    // A fixed address another spoke holds, and a secondary hub that does not exist.
    lab.create_spoke_json(
        json!({"hubs": [{"name": "small"}], "tunnelAddress": "10.61.0.2",
        "sitePrefixes": {"source": "Static", "prefixes": ["10.100.4.0/24"]}}),
        "static-dup",
    )
    .await
    .unwrap();
    lab.create_spoke_json(
        json!({"hubs": [{"name": "hub-a"}, {"name": "hub-gone"}],
        "sitePrefixes": {"source": "Static", "prefixes": ["10.100.5.0/24"]}}),
        "two-hubs",
    )
    .await
    .unwrap();
    // No node matches the selector.
    lab.create_spoke_json(json!({"hubs": [{"name": "hub-a"}],
        "sitePrefixes": {"source": "Static", "prefixes": ["10.100.6.0/24"]},
        "nodes": {"mode": "Selector", "selector": {"matchLabels": {"dmvpn.example/site": "nowhere"}}}}), "no-nodes").await.unwrap();

    let expect: &[(&str, &str, &str)] = &[
        ("orphan", reasons::HUB_NOT_FOUND, "spec.hubs[0].name"),
        (
            "second",
            reasons::INVALID_SPEC,
            "spec.sitePrefixes.prefixes: 10.1.2.0/24 overlaps 10.1.0.0/16 of DmvpnSpoke \"first\"",
        ),
        (
            "in-tunnel",
            reasons::INVALID_SPEC,
            "overlaps the tunnel network 10.42.0.0/24",
        ),
        (
            "small-2",
            reasons::POOL_EXHAUSTED,
            "spec.hubs[0].name: the tunnel network 10.61.0.0/30",
        ),
        (
            "static-dup",
            reasons::ADDRESS_CONFLICT,
            "spec.tunnelAddress: 10.61.0.2 is already held by spoke/small-1",
        ),
        (
            "two-hubs",
            reasons::INVALID_SPEC,
            "spec.hubs[1].name: DmvpnHub \"hub-gone\" does not exist",
        ),
        ("no-nodes", reasons::NO_NODES, "spec.nodes"),
    ];
    let list = lab
        .wait_spokes(WAIT, "every spoke evaluated", |l| {
            let by: BTreeMap<String, &DmvpnSpoke> = l.iter().map(|s| (s.name_any(), s)).collect();
            expect.iter().all(|(n, reason, _)| {
                by.get(*n)
                    .and_then(|s| ready_of(s))
                    .is_some_and(|(st, r, _)| st == "False" && r == *reason)
            }) && ["first", "small-1"]
                .iter()
                .all(|n| by.get(*n).is_some_and(|s| is_ready(s)))
        })
        .await;
    for (n, _, field) in expect {
        let s = list.iter().find(|s| s.name_any() == *n).unwrap();
        let (_, _, msg) = ready_of(s).unwrap();
        assert!(msg.contains(field), "{n}: {msg:?} should name {field:?}");
    }

    let hubs: BTreeMap<String, DmvpnHub> = lab
        .hubs
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|h| (h.name_any(), h))
        .collect();
    let tiny = condition_of(
        &hubs["tiny"].status.as_ref().unwrap().conditions,
        types::READY,
    )
    .unwrap();
    assert_eq!(tiny.0, "False");
    assert!(tiny.2.contains("spec.tunnelNetwork"), "{tiny:?}");

    // Warnings were published for the transitions.
    let warnings = lab
        .server
        .objects("events")
        .iter()
        .filter(|e| e["type"] == "Warning")
        .count();
    assert!(warnings >= expect.len(), "{warnings} warnings");

    // Fixing the spec heals: the missing hub appears.
    lab.create_hub("hub-missing", "10.70.0.0/24").await;
    lab.wait_spokes(WAIT, "orphan Ready once its hub exists", |l| {
        l.iter().any(|s| s.name_any() == "orphan" && is_ready(s))
    })
    .await;
    agents.cancel();
    op.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_manifests_become_ready() {
    // The same objects e2e/k8s/run.sh applies to a real cluster.
    let lab = Lab::start().await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(lab.client.clone());
    for n in ["node-1", "node-2"] {
        let patch = json!({"metadata": {"labels": {
            "dmvpn.kube-dmvpn.io/role": "hub", "dmvpn.kube-dmvpn.io/gateway": "true"}}});
        nodes
            .patch(
                n,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .unwrap();
    }
    let op = lab.start_operator(test_settings());
    let agents = lab.start_agents();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/examples");
    for file in ["hub.yaml", "spoke-a.yaml", "spoke-b.yaml"] {
        let text = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        let v: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        match v["kind"].as_str() {
            Some("DmvpnHub") => {
                let hub: DmvpnHub = serde_json::from_value(v).unwrap();
                lab.hubs.create(&Default::default(), &hub).await.unwrap();
            }
            _ => {
                let spoke: DmvpnSpoke = serde_json::from_value(v).unwrap();
                lab.spokes
                    .create(&Default::default(), &spoke)
                    .await
                    .unwrap();
            }
        }
    }
    let list = lab.wait_all_ready(2, WAIT).await;
    let addrs = addresses(&list);
    assert_eq!(
        addrs["spoke-b"],
        Ipv4Addr::new(10, 42, 0, 20),
        "static address"
    );
    assert_eq!(
        addrs["spoke-a"],
        Ipv4Addr::new(10, 42, 0, 2),
        "lowest free after the hub's .1"
    );
    let a = list.iter().find(|s| s.name_any() == "spoke-a").unwrap();
    assert_eq!(
        a.status.as_ref().unwrap().site_prefixes,
        vec!["10.244.1.0/24".to_owned(), "10.244.2.0/24".to_owned()],
        "pod CIDRs of the nodes"
    );
    let hub = lab.hubs.get("hub-a").await.unwrap();
    assert_eq!(
        hub.status.unwrap().tunnel_address.as_deref(),
        Some("10.42.0.1")
    );
    agents.cancel();
    op.shutdown().await.unwrap();
}
