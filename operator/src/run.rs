//! Wiring: leader election, the CA, both controllers, the HTTP endpoints, shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use dmvpn_crds::{DmvpnHub, DmvpnSpoke};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::context::{Context, Settings};
use crate::http::{self, Health};
use crate::leader::{LeaderElector, LeaseConfig};
use crate::metrics::Metrics;
use crate::reconcile::{self, HUB, SPOKE};

/// Everything `run` needs besides the client.
pub struct Options {
    pub settings: Settings,
    /// None: no leader election (a single instance, or tests).
    pub leader: Option<LeaseConfig>,
    /// Where to serve `/metrics`, `/healthz`, `/readyz`.
    pub http: Option<tokio::net::TcpListener>,
    /// Shared metrics (tests read them).
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

impl Options {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            leader: None,
            http: None,
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::default()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("lost the leader lease; exiting so that a fresh instance can campaign again")]
    LostLeadership,
    #[error("CA setup failed: {0}")]
    Ca(#[from] crate::certs::CertError),
}

/// Runs the operator until `stop` is cancelled (SIGTERM in the binary): in-flight
/// reconciliations finish, the lease is released, then it returns.
pub async fn run(
    client: kube::Client,
    opts: Options,
    stop: CancellationToken,
) -> Result<(), RunError> {
    let Options {
        settings,
        leader,
        http: http_listener,
        metrics,
        health,
    } = opts;
    let http_task = http_listener.map(|l| {
        let (m, h, s) = (metrics.clone(), health.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(e) = http::serve(l, m, h, s).await {
                tracing::warn!(error = %e, "HTTP endpoint failed");
            }
        })
    });

    // Leader election.
    let (leading_tx, mut leading_rx) = watch::channel(leader.is_none());
    let (elector_stop_tx, elector_stop_rx) = watch::channel(false);
    let elector = leader.map(|cfg| {
        let e = LeaderElector::new(client.clone(), cfg);
        tokio::spawn(e.run(leading_tx, elector_stop_rx))
    });
    if elector.is_some() {
        // A standby that can reach the API is healthy and ready to take over.
        health.ready.store(true, Ordering::Relaxed);
    }
    let became_leader = tokio::select! {
        _ = stop.cancelled() => false,
        r = leading_rx.wait_for(|l| *l) => r.is_ok(),
    };
    let result = match became_leader {
        true => {
            metrics.leader.set(1);
            health.leader.store(true, Ordering::Relaxed);
            health.ready.store(false, Ordering::Relaxed);
            let work = stop.child_token();
            let lost = {
                let work = work.clone();
                let mut rx = leading_rx.clone();
                async move {
                    // Without election the sender is gone from the start: never "lost".
                    if rx.wait_for(|l| !*l).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                    work.cancel();
                    true
                }
            };
            let controllers = run_controllers(
                client.clone(),
                settings,
                metrics.clone(),
                health.clone(),
                work.clone(),
            );
            tokio::pin!(controllers);
            let r = tokio::select! {
                r = &mut controllers => r,
                lost = lost => {
                    // Let in-flight work finish before reporting.
                    let _ = controllers.await;
                    if lost && !stop.is_cancelled() { Err(RunError::LostLeadership) } else { Ok(()) }
                }
            };
            metrics.leader.set(0);
            health.leader.store(false, Ordering::Relaxed);
            r
        }
        false => Ok(()),
    };
    health.ready.store(false, Ordering::Relaxed);
    let _ = elector_stop_tx.send(true);
    if let Some(e) = elector {
        let _ = e.await;
    }
    stop.cancel();
    if let Some(h) = http_task {
        let _ = h.await;
    }
    result
}

fn managed_secrets() -> watcher::Config {
    watcher::Config::default().labels(&format!(
        "app.kubernetes.io/managed-by={}",
        dmvpn_crds::MANAGED_BY
    ))
}

async fn run_controllers(
    client: kube::Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: CancellationToken,
) -> Result<(), RunError> {
    let hubs_api: Api<DmvpnHub> = Api::all(client.clone());
    let spokes_api: Api<DmvpnSpoke> = Api::all(client.clone());
    let nodes_api: Api<Node> = Api::all(client.clone());
    let secrets_api: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);

    let hub_ctrl = Controller::new(hubs_api.clone(), watcher::Config::default());
    let spoke_ctrl = Controller::new(spokes_api, watcher::Config::default());
    let spokes = spoke_ctrl.store();

    // Own caches of hubs and nodes for the spoke reconciler, each driven by one task that
    // reports when its initial list is in.
    let (hubs, hubs_ready) = spawn_cache(hubs_api.clone(), stop.clone(), None);
    let (node_tx, node_rx) = tokio::sync::mpsc::channel::<()>(16);
    let (nodes, nodes_ready) = spawn_cache(nodes_api, stop.clone(), Some(node_tx));
    let (caches_tx, caches_ready) = watch::channel(false);
    {
        let (mut h, mut n, health) = (hubs_ready, nodes_ready, health.clone());
        tokio::spawn(async move {
            if h.wait_for(|r| *r).await.is_ok() && n.wait_for(|r| *r).await.is_ok() {
                caches_tx.send_replace(true);
                health.ready.store(true, Ordering::Relaxed);
            }
        });
    }
    let node_events = futures::stream::unfold(node_rx, |mut rx| async move {
        rx.recv().await.map(|()| ((), rx))
    });

    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics,
        hubs,
        spokes.clone(),
        nodes,
        caches_ready,
    ));
    // Create (or load) the CA, and re-claim recorded addresses, before reconciling anything.
    ctx.ca.current(ctx.settings.clock.now()).await?;
    let mut attempt = 0u32;
    while let Err(e) = reconcile::rebuild_records(&ctx).await {
        attempt += 1;
        tracing::warn!(error = %e, attempt, "rebuilding address records failed; retrying");
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
        }
    }

    let spokes_for_hub = spokes.clone();
    let spoke_run = spoke_ctrl
        .watches(
            hubs_api,
            watcher::Config::default(),
            move |hub: DmvpnHub| {
                let name = hub.name_any();
                spokes_for_hub
                    .state()
                    .into_iter()
                    .filter(|s| s.spec.hubs.iter().any(|h| h.name == name))
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            },
        )
        .watches(secrets_api.clone(), managed_secrets(), |s: Secret| {
            s.labels()
                .get(dmvpn_crds::LABEL_SPOKE)
                .map(|n| ObjectRef::<DmvpnSpoke>::new(n))
        })
        .reconcile_all_on(node_events)
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(
            reconcile::reconcile_spoke,
            reconcile::error_policy(SPOKE),
            ctx.clone(),
        )
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "spoke controller");
            }
            futures::future::ready(())
        });
    let hub_run = hub_ctrl
        .watches(secrets_api, managed_secrets(), |s: Secret| {
            s.labels()
                .get(dmvpn_crds::LABEL_HUB)
                .map(|n| ObjectRef::<DmvpnHub>::new(n))
        })
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(
            reconcile::reconcile_hub,
            reconcile::error_policy(HUB),
            ctx.clone(),
        )
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "hub controller");
            }
            futures::future::ready(())
        });
    futures::join!(spoke_run, hub_run);
    Ok(())
}

/// A reflector cache driven by its own task. The watch flag turns true once the initial list
/// is in; `changes` (if given) gets a message for every change after that.
fn spawn_cache<K>(
    api: Api<K>,
    stop: CancellationToken,
    changes: Option<tokio::sync::mpsc::Sender<()>>,
) -> (reflector::Store<K>, watch::Receiver<bool>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let (ready_tx, ready_rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .boxed();
        loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => return,
                ev = stream.next() => ev,
            };
            match ev {
                None => return,
                Some(Ok(watcher::Event::InitDone)) => {
                    ready_tx.send_replace(true);
                    if let Some(c) = &changes {
                        let _ = c.try_send(());
                    }
                }
                Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => {
                    if let Some(c) = &changes {
                        // A full channel already means "something changed": dropping is fine.
                        let _ = c.try_send(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, kind = %K::kind(&()), "watch failed; retrying")
                }
            }
        }
    });
    (store, ready_rx)
}
