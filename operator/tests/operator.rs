//! Whole-operator checks: every API request it makes is granted by the RBAC manifests, leader
//! election hands over, and the HTTP endpoints answer.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use dmvpn_crds::rbac::{self, Access, Scope};
use dmvpn_operator::Options;
use dmvpn_operator::fakeapi::RequestKey;
use dmvpn_operator::http::Health;
use dmvpn_operator::leader::LeaseConfig;
use dmvpn_operator::metrics::Metrics;
use dmvpn_operator::testing::{Lab, OPERATOR_USER, is_ready, test_settings};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NS: &str = dmvpn_crds::OPERATOR_NAMESPACE;
const WAIT: Duration = Duration::from_secs(120);

fn lease_config(identity: &str) -> LeaseConfig {
    let mut c = LeaseConfig::new(NS, dmvpn_crds::LEADER_LEASE_NAME, identity);
    c.lease_duration = Duration::from_secs(3);
    c.renew_deadline = Duration::from_secs(2);
    c.retry_period = Duration::from_millis(300);
    c
}

/// One RBAC rule from the manifests.
#[derive(Debug)]
struct Rule {
    namespace: Option<String>,
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn manifest_rules() -> Vec<Rule> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/rbac");
    let mut rules = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            let namespace = match v["kind"].as_str() {
                Some("ClusterRole") => None,
                Some("Role") => Some(v["metadata"]["namespace"].as_str().unwrap().to_owned()),
                _ => continue,
            };
            for r in v["rules"].as_array().unwrap() {
                rules.push(Rule {
                    namespace: namespace.clone(),
                    groups: strings(&r["apiGroups"]),
                    resources: strings(&r["resources"]),
                    verbs: strings(&r["verbs"]),
                    names: strings(&r["resourceNames"]),
                });
            }
        }
    }
    assert!(!rules.is_empty(), "no rules found in {dir}");
    rules
}

fn resource_of(k: &RequestKey) -> String {
    if k.subresource.is_empty() {
        k.resource.clone()
    } else {
        format!("{}/{}", k.resource, k.subresource)
    }
}

/// Whether the manifests grant the request, as the API server's RBAC authorizer decides.
fn granted(rules: &[Rule], k: &RequestKey) -> bool {
    let res = resource_of(k);
    rules.iter().any(|r| {
        (r.namespace.is_none() || r.namespace == k.namespace)
            && r.groups.contains(&k.group)
            && r.resources.contains(&res)
            && r.verbs.contains(&k.verb)
            && (r.names.is_empty() || k.name.as_ref().is_some_and(|n| r.names.contains(n)))
    })
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_granted_by_the_rbac_manifests() {
    let lab = Lab::start().await;
    let services: Api<Service> = Api::namespaced(lab.client.clone(), NS);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "hub-b-lb"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 500, "protocol": "UDP"}]},
    }))
    .unwrap();
    services.create(&PostParams::default(), &svc).await.unwrap();
    // The load balancer gets its address.
    let mut svc = services.get("hub-b-lb").await.unwrap();
    svc.status =
        serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}))
            .unwrap();
    services
        .replace_status("hub-b-lb", &PostParams::default(), &svc)
        .await
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = listener.local_addr().unwrap();
    let mut settings = test_settings();
    settings.cert_lifetime = Duration::from_secs(6);
    let mut opts = Options::new(settings);
    opts.leader = Some(lease_config("op-a"));
    opts.http = Some(listener);
    let op = lab.start_operator_with(opts);
    let agents = lab.start_agents();

    lab.create_hub("hub-a", "10.42.0.0/24").await;
    let hub_b: dmvpn_crds::DmvpnHub = serde_json::from_value(json!({
        "apiVersion": dmvpn_crds::API_VERSION, "kind": "DmvpnHub",
        "metadata": {"name": "hub-b"},
        "spec": {"tunnelNetwork": "10.43.0.0/24", "endpoint": {"service": {"name": "hub-b-lb"}}},
    }))
    .unwrap();
    lab.hubs
        .create(&PostParams::default(), &hub_b)
        .await
        .unwrap();
    for i in 0..3 {
        lab.create_spoke(
            &format!("s{i}"),
            if i == 2 { "hub-b" } else { "hub-a" },
            &format!("10.100.{i}.0/24"),
        )
        .await;
    }
    lab.wait_all_ready(3, WAIT).await;
    let hb = lab.hubs.get("hub-b").await.unwrap();
    assert_eq!(
        hb.status.unwrap().nbma_addresses,
        vec!["203.0.113.10".to_owned()]
    );

    // Probes and metrics while leading.
    let (code, body) = http_get(http_addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("dmvpn_operator_leader 1"), "{body}");
    assert!(body.contains("dmvpn_operator_reconciliations_total{kind=\"spoke\"}"));
    assert_eq!(http_get(http_addr, "/healthz").await.0, 200);
    assert_eq!(http_get(http_addr, "/readyz").await.0, 200);

    // Deletion (finalizer, secret removal) and one certificate rotation.
    lab.spokes
        .delete("s1", &DeleteParams::default())
        .await
        .unwrap();
    lab.wait_spokes(WAIT, "s1 gone", |l| l.len() == 2).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    lab.wait_spokes(WAIT, "rotated spokes Ready", |l| l.iter().all(is_ready))
        .await;
    agents.cancel();
    op.shutdown().await.unwrap();

    // The lease was released on shutdown.
    let leases: Api<Lease> = Api::namespaced(lab.client.clone(), NS);
    let lease = leases.get(dmvpn_crds::LEADER_LEASE_NAME).await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity, None);

    let rules = manifest_rules();
    let used: Vec<RequestKey> = lab
        .server
        .requests()
        .into_keys()
        .filter(|k| k.user == OPERATOR_USER)
        .collect();
    let denied: Vec<&RequestKey> = used.iter().filter(|k| !granted(&rules, k)).collect();
    assert!(
        denied.is_empty(),
        "requests the RBAC manifests do not grant: {denied:#?}"
    );

    // The same against dmvpn_crds::rbac::REQUIRED, and what it grants that is never used.
    let resources: Vec<String> = used.iter().map(resource_of).collect();
    let accesses: Vec<Access<'_>> = used
        .iter()
        .zip(&resources)
        .map(|(k, res)| Access {
            scope: if k.namespace.as_deref() == Some(NS)
                && !rbac::allows(Scope::Cluster, &k.group, res, &k.verb)
            {
                Scope::OperatorNamespace
            } else {
                Scope::Cluster
            },
            api_group: &k.group,
            resource: res,
            verb: &k.verb,
        })
        .collect();
    assert!(
        rbac::not_granted(&accesses).is_empty(),
        "{:?}",
        rbac::not_granted(&accesses)
    );
    let unused: BTreeSet<String> = rbac::not_used(&accesses)
        .iter()
        .map(|a| format!("{} {}/{}", a.verb, a.api_group, a.resource))
        .collect();
    // Granted but not exercised here, each for a reason the fake API server cannot show:
    // `*/finalizers update` is checked by the real API server's owner-reference admission
    // (blockOwnerDeletion), not requested; `update` on the objects and `list/watch` on services
    // are not used (patch and get suffice); an event `patch` happens only when the same event
    // repeats within the recorder's cache window.
    let allowed_unused: BTreeSet<&str> = [
        "update dmvpn.kube-dmvpn.io/dmvpnhubs/finalizers",
        "update dmvpn.kube-dmvpn.io/dmvpnspokes/finalizers",
        "update dmvpn.kube-dmvpn.io/dmvpnhubs",
        "update dmvpn.kube-dmvpn.io/dmvpnspokes",
        "list /services",
        "watch /services",
        "patch events.k8s.io/events",
        // Reads come from watch caches; `get` is harmless to keep for kubectl-like debugging.
        "get /nodes",
        "get dmvpn.kube-dmvpn.io/dmvpnhubs",
        "get dmvpn.kube-dmvpn.io/dmvpnspokes",
    ]
    .into();
    let surprising: Vec<&String> = unused
        .iter()
        .filter(|u| !allowed_unused.contains(u.as_str()))
        .collect();
    assert!(
        surprising.is_empty(),
        "granted but never used: {surprising:?}"
    );
    println!("granted, not used by the operator: {unused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_hands_over() {
    let lab = Lab::start().await;
    let start = |id: &str| {
        let mut opts = Options::new(test_settings());
        opts.leader = Some(lease_config(id));
        opts.metrics = Arc::new(Metrics::new());
        opts.health = Arc::new(Health::default());
        let health = opts.health.clone();
        (
            lab.start_operator_as(opts, &format!("operator-{id}")),
            health,
        )
    };
    let (a, a_health) = start("op-a");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (b, b_health) = start("op-b");
    let agents = lab.start_agents();
    lab.create_hub("hub-a", "10.42.0.0/24").await;
    lab.create_spoke("s0", "hub-a", "10.100.0.0/24").await;
    lab.wait_all_ready(1, WAIT).await;
    let leases: Api<Lease> = Api::namespaced(lab.client.clone(), NS);
    let holder = || async {
        leases
            .get(dmvpn_crds::LEADER_LEASE_NAME)
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
    };
    assert_eq!(holder().await.as_deref(), Some("op-a"));
    assert!(a_health.leader.load(std::sync::atomic::Ordering::Relaxed));
    assert!(!b_health.leader.load(std::sync::atomic::Ordering::Relaxed));
    assert!(
        b_health.ready.load(std::sync::atomic::Ordering::Relaxed),
        "a standby is ready"
    );
    // The standby wrote nothing but its lease attempts.
    let standby_writes: Vec<RequestKey> = lab
        .server
        .requests()
        .into_keys()
        .filter(|k| {
            k.user == "operator-op-b" && !["get", "list", "watch"].contains(&k.verb.as_str())
        })
        .filter(|k| k.resource != "leases")
        .collect();
    assert!(standby_writes.is_empty(), "{standby_writes:?}");

    a.shutdown().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while holder().await.as_deref() != Some("op-b") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "op-b never took over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The new leader works: a new spoke gets the next address.
    lab.create_spoke("s1", "hub-a", "10.100.1.0/24").await;
    let list = lab.wait_all_ready(2, WAIT).await;
    let s1 = list.iter().find(|s| s.name_any() == "s1").unwrap();
    assert_eq!(
        s1.status.as_ref().unwrap().tunnel_address.as_deref(),
        Some("10.42.0.3")
    );
    agents.cancel();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_keeps_the_previous_ca_trusted_and_reissues_leaves() {
    use dmvpn_operator::certs::{self, CaManager, CertAction};
    use dmvpn_operator::pki::{self, Identity, IdentityKind};
    use k8s_openapi::api::core::v1::Secret;
    use std::time::SystemTime;

    let lab = Lab::start().await;
    let client = lab.operator_client();
    let t0 = SystemTime::now();
    let ca_life = Duration::from_secs(30);
    let mgr = CaManager::new(client.clone(), NS, dmvpn_crds::CA_SECRET_NAME, ca_life);
    let first = mgr.current(t0).await.unwrap();
    assert_eq!(pki::inspect_bundle(&first.bundle).unwrap().len(), 1);
    // A second manager (another instance, or a restart) loads the same CA.
    let again = CaManager::new(client.clone(), NS, dmvpn_crds::CA_SECRET_NAME, ca_life);
    assert_eq!(
        again.current(t0).await.unwrap().ca.cert_pem(),
        first.ca.cert_pem()
    );

    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let id = Identity {
        kind: IdentityKind::Spoke,
        namespace: None,
        name: "s0".to_owned(),
        tunnel_address: "10.42.0.2".parse().unwrap(),
    };
    let leaf_life = Duration::from_secs(3600);
    let issued =
        certs::ensure_site_certificate(&secrets, "leaf", &id, &first, leaf_life, t0, None, &[])
            .await
            .unwrap();
    assert_eq!(issued.action, CertAction::Issued);
    let old_leaf = certs::secret_certs(&secrets.get("leaf").await.unwrap())
        .0
        .unwrap();

    // At 2/3 of the CA lifetime a new CA takes over; the old one stays in the bundle.
    let t1 = t0 + Duration::from_secs(21);
    let second = mgr.current(t1).await.unwrap();
    assert_ne!(second.ca.cert_pem(), first.ca.cert_pem());
    assert_eq!(pki::inspect_bundle(&second.bundle).unwrap().len(), 2);
    pki::verify(&old_leaf, &second.bundle, t1).unwrap();

    // The leaf is re-signed by the new CA, keeping the old one as the previous certificate.
    let renewed =
        certs::ensure_site_certificate(&secrets, "leaf", &id, &second, leaf_life, t1, None, &[])
            .await
            .unwrap();
    assert_eq!(renewed.action, CertAction::Rotated);
    let s = secrets.get("leaf").await.unwrap();
    let (cur, prev) = certs::secret_certs(&s);
    assert_eq!(prev.as_deref(), Some(old_leaf.as_str()));
    let bundle = certs::secret_bundle(&s).unwrap();
    pki::verify(&cur.clone().unwrap(), second.ca.cert_pem(), t1).unwrap();
    pki::verify(&old_leaf, &bundle, t1).unwrap();
    // Nothing more to do until the next renewal.
    let same =
        certs::ensure_site_certificate(&secrets, "leaf", &id, &second, leaf_life, t1, None, &[])
            .await
            .unwrap();
    assert_eq!(same.action, CertAction::Unchanged);
    // Once the old CA has expired it leaves the bundle.
    let t2 = t0 + Duration::from_secs(31);
    let fresh = CaManager::new(client, NS, dmvpn_crds::CA_SECRET_NAME, ca_life);
    let third = fresh.current(t2).await.unwrap();
    assert_eq!(third.ca.cert_pem(), second.ca.cert_pem());
    assert_eq!(pki::inspect_bundle(&third.bundle).unwrap().len(), 1);
}
