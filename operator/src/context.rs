//! State shared by the reconcilers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dmvpn_crds::{DmvpnHub, DmvpnSpoke};
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};

use crate::certs::CaManager;
use crate::clock::{Clock, SystemClock};
use crate::ipam::Ipam;
use crate::metrics::Metrics;

/// How the operator behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Namespace holding the CA, the site secrets, the IPAM records and the lease.
    pub namespace: String,
    /// Lifetime of hub and spoke certificates (renewed at 2/3).
    pub cert_lifetime: Duration,
    /// Lifetime of the CA (renewed at 2/3; the old one stays trusted until it expires).
    pub ca_lifetime: Duration,
    /// Periodic re-check even without changes.
    pub resync: Duration,
    /// Identity of this instance (events, lease).
    pub identity: String,
    pub clock: Arc<dyn Clock>,
}

impl Settings {
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            cert_lifetime: Duration::from_secs(90 * 86400),
            ca_lifetime: Duration::from_secs(10 * 365 * 86400),
            resync: Duration::from_secs(600),
            identity: identity.to_owned(),
            clock: Arc::new(SystemClock),
        }
    }
}

pub struct Context {
    pub client: kube::Client,
    pub settings: Settings,
    pub hubs_api: Api<DmvpnHub>,
    pub spokes_api: Api<DmvpnSpoke>,
    pub secrets: Api<Secret>,
    pub services: Api<Service>,
    pub hubs: Store<DmvpnHub>,
    pub spokes: Store<DmvpnSpoke>,
    pub nodes: Store<Node>,
    /// Set once the hub and node caches hold their initial lists. (Store::wait_until_ready
    /// wakes only one waiter, so the reconcilers wait on this instead.)
    pub caches_ready: tokio::sync::watch::Receiver<bool>,
    pub ipam: Ipam,
    pub ca: CaManager,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Spoke name → Ready, for the `spokes_ready` gauge.
    pub(crate) ready: Mutex<HashMap<String, bool>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: kube::Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        hubs: Store<DmvpnHub>,
        spokes: Store<DmvpnSpoke>,
        nodes: Store<Node>,
        caches_ready: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let conflicts = metrics.allocation_conflicts.clone();
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "dmvpn-operator".to_owned(),
                instance: Some(settings.identity.clone()),
            },
        );
        Self {
            hubs_api: Api::all(client.clone()),
            spokes_api: Api::all(client.clone()),
            secrets: Api::namespaced(client.clone(), &settings.namespace),
            services: Api::namespaced(client.clone(), &settings.namespace),
            ipam: Ipam::new(
                client.clone(),
                &settings.namespace,
                Box::new(move || {
                    conflicts.inc();
                }),
            ),
            ca: CaManager::new(
                client.clone(),
                &settings.namespace,
                dmvpn_crds::CA_SECRET_NAME,
                settings.ca_lifetime,
            ),
            client,
            settings,
            hubs,
            spokes,
            nodes,
            caches_ready,
            metrics,
            recorder,
            ready: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes an event about `obj`; failures are logged, never fatal.
    pub async fn event<K>(&self, obj: &K, warning: bool, reason: &str, action: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, object = %obj.name_any(), reason, "could not publish event");
        }
    }

    pub(crate) fn set_spoke_ready(&self, name: &str, ready: Option<bool>) {
        let mut map = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        match ready {
            Some(r) => {
                map.insert(name.to_owned(), r);
            }
            None => {
                map.remove(name);
            }
        }
        let n = map.values().filter(|r| **r).count();
        self.metrics
            .spokes_ready
            .set(i64::try_from(n).unwrap_or(i64::MAX));
        self.metrics
            .spokes_total
            .set(i64::try_from(map.len()).unwrap_or(i64::MAX));
    }
}
