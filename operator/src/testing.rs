//! A lab for tests and benchmarks: the fake API server with the CRDs, nodes, the operator
//! running in-process, and stand-ins for the node agents (which report `Registered`).

use std::sync::Arc;
use std::time::Duration;

use dmvpn_crds::conditions::{self, ConditionStatus, reasons, types};
use dmvpn_crds::{DmvpnHub, DmvpnSpoke};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::context::Settings;
use crate::fakeapi::{FakeApiConfig, FakeApiServer, ResourceSpec};
use crate::metrics::Metrics;
use crate::run::{Options, RunError, run};

/// The user the operator's requests are recorded under.
pub const OPERATOR_USER: &str = "system:serviceaccount:kube-dmvpn-system:dmvpn-operator";

pub struct Lab {
    pub server: FakeApiServer,
    /// The test's own client (recorded as user `tester`).
    pub client: kube::Client,
    pub hubs: Api<DmvpnHub>,
    pub spokes: Api<DmvpnSpoke>,
}

/// A running operator instance.
pub struct RunningOperator {
    pub stop: CancellationToken,
    pub handle: JoinHandle<Result<(), RunError>>,
    pub metrics: Arc<Metrics>,
}

impl RunningOperator {
    /// Stops it as SIGTERM would and waits for it to finish.
    pub async fn shutdown(self) -> Result<(), RunError> {
        self.stop.cancel();
        match self.handle.await {
            Ok(r) => r,
            Err(e) => panic!("operator task failed: {e}"),
        }
    }
}

/// Operator settings for tests: the default namespace, a fixed identity.
pub fn test_settings() -> Settings {
    Settings::new(dmvpn_crds::OPERATOR_NAMESPACE, "operator-test")
}

impl Lab {
    /// A fake API server with the CRDs and two nodes (pod CIDRs 10.244.1.0/24, 10.244.2.0/24).
    pub async fn start() -> Self {
        Self::start_with(FakeApiConfig::default()).await
    }

    pub async fn start_with(config: FakeApiConfig) -> Self {
        // Logs for debugging a failing test: RUST_LOG=dmvpn_operator=debug.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let server = FakeApiServer::start_with(
            vec![
                ResourceSpec::of::<DmvpnHub>(false, true),
                ResourceSpec::of::<DmvpnSpoke>(false, true),
            ],
            config,
        )
        .await
        .expect("fake API server starts");
        let client = server.client_as("tester").expect("client");
        let nodes: Api<Node> = Api::all(client.clone());
        for i in 1..=2 {
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": format!("node-{i}"), "labels": {"dmvpn.example/site": "a"}},
                "spec": {"podCIDR": format!("10.244.{i}.0/24"), "podCIDRs": [format!("10.244.{i}.0/24")]},
            }))
            .expect("node");
            nodes
                .create(&PostParams::default(), &node)
                .await
                .expect("node created");
        }
        Self {
            hubs: Api::all(client.clone()),
            spokes: Api::all(client.clone()),
            server,
            client,
        }
    }

    pub fn operator_client(&self) -> kube::Client {
        self.server.client_as(OPERATOR_USER).expect("client")
    }

    /// Starts the operator in-process (no leader election, no HTTP endpoint).
    pub fn start_operator(&self, settings: Settings) -> RunningOperator {
        self.start_operator_with(Options::new(settings))
    }

    pub fn start_operator_with(&self, opts: Options) -> RunningOperator {
        self.start_operator_as(opts, OPERATOR_USER)
    }

    /// Starts an operator whose requests are recorded under `user`.
    pub fn start_operator_as(&self, opts: Options, user: &str) -> RunningOperator {
        let stop = CancellationToken::new();
        let metrics = opts.metrics.clone();
        let client = self.server.client_as(user).expect("client");
        let handle = tokio::spawn(run(client, opts, stop.clone()));
        RunningOperator {
            stop,
            handle,
            metrics,
        }
    }

    /// Stand-ins for the node agents: once a spoke has its address and certificate, they
    /// report `Registered=True`, as an agent does after its first NHRP registration.
    pub fn start_agents(&self) -> CancellationToken {
        let stop = CancellationToken::new();
        let client = self.server.client_as("agent").expect("client");
        let api: Api<DmvpnSpoke> = Api::all(client);
        let token = stop.clone();
        tokio::spawn(async move {
            let mut events = watcher(api.clone(), watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            loop {
                let next = tokio::select! {
                    _ = token.cancelled() => return,
                    n = events.next() => n,
                };
                let Some(Ok(spoke)) = next else {
                    if next.is_none() {
                        return;
                    }
                    continue;
                };
                register(&api, &spoke.name_any()).await;
            }
        });
        stop
    }

    pub async fn create_hub(&self, name: &str, network: &str) -> DmvpnHub {
        let hub: DmvpnHub = serde_json::from_value(json!({
            "apiVersion": dmvpn_crds::API_VERSION, "kind": "DmvpnHub",
            "metadata": {"name": name},
            "spec": {"tunnelNetwork": network, "endpoint": {"addresses": ["198.51.100.1"]}},
        }))
        .expect("hub");
        self.hubs
            .create(&PostParams::default(), &hub)
            .await
            .expect("hub created")
    }

    pub async fn create_spoke_json(
        &self,
        spec: serde_json::Value,
        name: &str,
    ) -> kube::Result<DmvpnSpoke> {
        let spoke: DmvpnSpoke = serde_json::from_value(json!({
            "apiVersion": dmvpn_crds::API_VERSION, "kind": "DmvpnSpoke",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .expect("spoke");
        self.spokes.create(&PostParams::default(), &spoke).await
    }

    /// A spoke of `hub` with one static prefix.
    pub async fn create_spoke(&self, name: &str, hub: &str, prefix: &str) -> DmvpnSpoke {
        self.create_spoke_json(
            json!({
                "hubs": [{"name": hub}],
                "sitePrefixes": {"source": "Static", "prefixes": [prefix]},
            }),
            name,
        )
        .await
        .expect("spoke created")
    }

    /// Polls until `f` holds for the list of spokes, or panics after `timeout`.
    pub async fn wait_spokes<F>(&self, timeout: Duration, what: &str, f: F) -> Vec<DmvpnSpoke>
    where
        F: Fn(&[DmvpnSpoke]) -> bool,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let list = self
                .spokes
                .list(&ListParams::default())
                .await
                .expect("list spokes")
                .items;
            if f(&list) {
                return list;
            }
            if tokio::time::Instant::now() > deadline {
                let summary: Vec<String> = list
                    .iter()
                    .map(|s| format!("{}: {:?}", s.name_any(), ready_of(s)))
                    .collect();
                panic!("timed out waiting for {what}; spokes: {summary:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until exactly `n` spokes exist and all are Ready.
    pub async fn wait_all_ready(&self, n: usize, timeout: Duration) -> Vec<DmvpnSpoke> {
        self.wait_spokes(timeout, &format!("{n} Ready spokes"), |l| {
            l.len() == n && l.iter().all(is_ready)
        })
        .await
    }
}

/// (status, reason, message) of a condition.
pub fn condition_of(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> Option<(String, String, String)> {
    conditions::find_condition(conds, t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub fn ready_of(s: &DmvpnSpoke) -> Option<(String, String, String)> {
    s.status
        .as_ref()
        .and_then(|st| condition_of(&st.conditions, types::READY))
}

pub fn is_ready(s: &DmvpnSpoke) -> bool {
    s.status
        .as_ref()
        .is_some_and(|st| conditions::is_condition_true(&st.conditions, types::READY))
}

/// Sets `Registered=True` on a spoke that has its address and certificate.
async fn register(api: &Api<DmvpnSpoke>, name: &str) {
    for _ in 0..20 {
        let Ok(spoke) = api.get(name).await else {
            return;
        };
        let Some(status) = spoke.status.clone() else {
            return;
        };
        let ok = |t| conditions::is_condition_true(&status.conditions, t);
        if spoke.metadata.deletion_timestamp.is_some()
            || !ok(types::ADDRESS_ASSIGNED)
            || !ok(types::CERTIFICATE_READY)
            || ok(types::REGISTERED)
        {
            return;
        }
        let mut conds = status.conditions.clone();
        conditions::set_condition(
            &mut conds,
            conditions::new_condition(
                types::REGISTERED,
                ConditionStatus::True,
                reasons::REGISTERED,
                "registered with the hub",
                spoke.metadata.generation,
                conditions::now(),
            ),
        );
        let patch = json!({
            "metadata": {"resourceVersion": spoke.resource_version()},
            "status": {"conditions": conds},
        });
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(_) => return,
        }
    }
}
