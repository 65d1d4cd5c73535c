//! An in-process, stateful fake of the Kubernetes API server.
//!
//! It listens on a real TCP socket (127.0.0.1, an ephemeral port) and speaks the Kubernetes REST
//! protocol: get, list (label and field selectors), watch streams (with resourceVersion replay,
//! bookmarks and `410 Gone` for expired versions), create, update, patch (merge, JSON patch,
//! strategic merge and server-side apply, the last two treated as a merge), the `/status`
//! subresource, delete with finalizers, `generation` and optimistic concurrency. That is enough to
//! run a real `kube::Client` and the kube-runtime `Controller` without a cluster.
//!
//! Every request is recorded as (verb, group, resource, subresource) so that tests can check the
//! operator's RBAC rules against what it really does.
//!
//! Deliberate simplifications: no admission, no schema validation, no defaulting, one global
//! resourceVersion counter (as with etcd), no garbage collection of owned objects, no pagination
//! (`limit` is accepted and everything is returned in one page).

mod selector;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, oneshot};

pub use selector::{FieldSelector, LabelSelector};
pub use store::ApiError;
use store::{Store, WatchRecord};

/// How a resource is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceSpec {
    /// API group; empty for the core group.
    pub group: String,
    pub version: String,
    /// Plural resource name as used in URLs (`secrets`, `dmvpnspokes`).
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
    /// Whether `/status` is a subresource (then writes to the main resource ignore `.status`
    /// and writes to `/status` change only `.status`).
    pub status_subresource: bool,
}

impl ResourceSpec {
    pub fn new(
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        status_subresource: bool,
    ) -> Self {
        Self {
            group: group.to_owned(),
            version: version.to_owned(),
            plural: plural.to_owned(),
            kind: kind.to_owned(),
            namespaced,
            status_subresource,
        }
    }

    /// A spec for a kube `Resource` type (CRDs and k8s-openapi types alike).
    pub fn of<K>(namespaced: bool, status_subresource: bool) -> Self
    where
        K: kube::Resource<DynamicType = ()>,
    {
        Self::new(
            &K::group(&()),
            &K::version(&()),
            &K::plural(&()),
            &K::kind(&()),
            namespaced,
            status_subresource,
        )
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// The built-in resources the fake serves from the start.
pub fn builtin_resources() -> Vec<ResourceSpec> {
    vec![
        ResourceSpec::new("", "v1", "namespaces", "Namespace", false, true),
        ResourceSpec::new("", "v1", "nodes", "Node", false, true),
        ResourceSpec::new("", "v1", "secrets", "Secret", true, false),
        ResourceSpec::new("", "v1", "services", "Service", true, true),
        ResourceSpec::new("", "v1", "configmaps", "ConfigMap", true, false),
        ResourceSpec::new("", "v1", "events", "Event", true, false),
        ResourceSpec::new("events.k8s.io", "v1", "events", "Event", true, false),
        ResourceSpec::new("coordination.k8s.io", "v1", "leases", "Lease", true, false),
    ]
}

/// One kind of request, as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestKey {
    /// Who asked: the bearer token of the request (see [`FakeApiServer::client_as`]), or
    /// `anonymous`.
    pub user: String,
    /// Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    pub group: String,
    pub resource: String,
    /// Empty for the main resource, else e.g. `status`.
    pub subresource: String,
    /// Namespace of the request; None for cluster-scoped resources and all-namespace requests.
    pub namespace: Option<String>,
    /// Object name for requests on one object (RBAC `resourceNames` apply to these).
    pub name: Option<String>,
}

/// A scripted failure: the next `count` requests matching (verb, resource) get `code`.
#[derive(Debug, Clone)]
struct Injection {
    verb: String,
    resource: String,
    code: u16,
    count: u32,
}

/// Tunables of the fake.
#[derive(Debug, Clone)]
pub struct FakeApiConfig {
    /// How many watch events are kept for resuming watches; older versions get `410 Gone`.
    pub history: usize,
    /// Interval between BOOKMARK events on watches that asked for them.
    pub bookmark_interval: Duration,
}

impl Default for FakeApiConfig {
    fn default() -> Self {
        Self {
            history: 20_000,
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

pub(crate) struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<Arc<WatchRecord>>,
    requests: Mutex<BTreeMap<RequestKey, u64>>,
    injections: Mutex<Vec<Injection>>,
    config: FakeApiConfig,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A poisoned lock only means a handler panicked; the data is still usable for a fake.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake API server. Dropping it stops the listener.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
}

impl FakeApiServer {
    /// Starts a server with the built-in resources plus `extra` (e.g. the CRDs).
    pub async fn start(extra: Vec<ResourceSpec>) -> std::io::Result<Self> {
        Self::start_with(extra, FakeApiConfig::default()).await
    }

    pub async fn start_with(
        extra: Vec<ResourceSpec>,
        config: FakeApiConfig,
    ) -> std::io::Result<Self> {
        let mut store = Store::new(config.history);
        for spec in builtin_resources().into_iter().chain(extra) {
            store.register(spec);
        }
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            events,
            requests: Mutex::new(BTreeMap::new()),
            injections: Mutex::new(Vec::new()),
            config,
        });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "fake API server stopped");
            }
        });
        Ok(Self {
            addr,
            shared,
            stop: Some(stop),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client configuration pointing at this server (plain HTTP, namespace `default`).
    pub fn config(&self) -> kube::Config {
        let uri: http::Uri = self
            .url()
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("http://127.0.0.1"));
        let mut config = kube::Config::new(uri);
        config.read_timeout = Some(Duration::from_secs(600));
        config
    }

    /// A real `kube::Client` talking to this server.
    pub fn client(&self) -> kube::Result<kube::Client> {
        kube::Client::try_from(self.config())
    }

    /// A client whose requests are recorded under `user` (sent as a bearer token), so tests
    /// can tell the operator's requests from their own.
    pub fn client_as(&self, user: &str) -> kube::Result<kube::Client> {
        let mut config = self.config();
        if let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {user}")) {
            config.headers.push((http::header::AUTHORIZATION, v));
        }
        kube::Client::try_from(config)
    }

    /// Serves one more resource type.
    pub fn register(&self, spec: ResourceSpec) {
        self.shared.store().register(spec);
    }

    /// The (verb, resource) pairs seen so far with their counts.
    pub fn requests(&self) -> BTreeMap<RequestKey, u64> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn clear_requests(&self) {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Makes the next `count` requests with this verb on this resource plural fail with `code`
    /// (e.g. 409 to exercise conflict retries, 500 for error paths).
    pub fn inject_failure(&self, verb: &str, resource: &str, code: u16, count: u32) {
        self.shared
            .injections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Injection {
                verb: verb.to_owned(),
                resource: resource.to_owned(),
                code,
                count,
            });
    }

    /// A snapshot of every stored object of a resource (by plural, any group), sorted by
    /// namespace and name.
    pub fn objects(&self, plural: &str) -> Vec<Value> {
        self.shared.store().objects_of(plural)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv()
    }

    /// Stops accepting connections (open watch streams end when their clients go away).
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What a URL path names.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

fn parse_path(store: &Store, path: &str) -> Result<Target, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (String::new(), (*v).to_owned(), rest),
        ["apis", g, v, rest @ ..] => ((*g).to_owned(), (*v).to_owned(), rest),
        _ => return Err(ApiError::not_found_path(path)),
    };
    let namespaced_target =
        |ns: &str, plural: &str, name: Option<&str>, sub: Option<&str>| Target {
            group: group.clone(),
            version: version.clone(),
            plural: plural.to_owned(),
            namespace: Some(ns.to_owned()),
            name: name.map(str::to_owned),
            subresource: sub.map(str::to_owned),
        };
    let cluster_target = |plural: &str, name: Option<&str>, sub: Option<&str>| Target {
        group: group.clone(),
        version: version.clone(),
        plural: plural.to_owned(),
        namespace: None,
        name: name.map(str::to_owned),
        subresource: sub.map(str::to_owned),
    };
    let is_namespaced = |plural: &str| {
        store
            .spec(&group, &version, plural)
            .is_some_and(|s| s.namespaced)
    };
    let target = match rest {
        [plural] => cluster_target(plural, None, None),
        ["namespaces", ns, plural] if is_namespaced(plural) => {
            namespaced_target(ns, plural, None, None)
        }
        ["namespaces", ns, plural, name] if is_namespaced(plural) => {
            namespaced_target(ns, plural, Some(name), None)
        }
        ["namespaces", ns, plural, name, sub] if is_namespaced(plural) => {
            namespaced_target(ns, plural, Some(name), Some(sub))
        }
        [plural, name] => cluster_target(plural, Some(name), None),
        [plural, name, sub] => cluster_target(plural, Some(name), Some(sub)),
        _ => return Err(ApiError::not_found_path(path)),
    };
    if target.name.as_deref() == Some("") || target.namespace.as_deref() == Some("") {
        return Err(ApiError::not_found_path(path));
    }
    Ok(target)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match route(&shared, &method, &uri, &query, &headers, &body) {
        Ok(Reply::Json(code, value)) => json_response(code, &value),
        Ok(Reply::Watch(watch)) => watch_response(shared, watch),
        Ok(Reply::WatchError(e)) => {
            let body = line(&json!({"type": "ERROR", "object": e.to_status()}));
            (
                StatusCode::OK,
                [(http::header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
        Err(e) => json_response(e.code, &e.to_status()),
    }
}

enum Reply {
    Json(u16, Value),
    Watch(store::WatchStart),
    WatchError(ApiError),
}

fn json_response(code: u16, value: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(value).unwrap_or_default();
    (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

fn is_true(query: &HashMap<String, String>, key: &str) -> bool {
    matches!(query.get(key).map(String::as_str), Some("true" | "1"))
}

fn route(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Reply, ApiError> {
    if uri.path() == "/version" {
        return Ok(Reply::Json(
            200,
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake"}),
        ));
    }
    let mut store = shared.store();
    let target = parse_path(&store, uri.path())?;
    let spec = store
        .spec(&target.group, &target.version, &target.plural)
        .cloned()
        .ok_or_else(|| ApiError::not_found_path(uri.path()))?;
    if spec.namespaced != target.namespace.is_some() && target.name.is_some() {
        return Err(ApiError::not_found_path(uri.path()));
    }
    let verb = match (method, target.name.is_some()) {
        (&Method::GET, false) if is_true(query, "watch") => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, false) => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!("method {method} is not allowed on {}", uri.path()),
            ));
        }
    };
    {
        let mut requests = shared.requests.lock().unwrap_or_else(|e| e.into_inner());
        let user = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("anonymous")
            .to_owned();
        *requests
            .entry(RequestKey {
                user,
                namespace: target.namespace.clone(),
                name: target.name.clone(),
                verb: verb.to_owned(),
                group: spec.group.clone(),
                resource: spec.plural.clone(),
                subresource: target.subresource.clone().unwrap_or_default(),
            })
            .or_insert(0) += 1;
    }
    {
        let mut injections = shared.injections.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = injections
            .iter_mut()
            .find(|i| i.count > 0 && i.verb == verb && i.resource == spec.plural)
        {
            i.count -= 1;
            let code = i.code;
            injections.retain(|i| i.count > 0);
            return Err(ApiError::injected(code, &spec, target.name.as_deref()));
        }
    }
    if let Some(sub) = target.subresource.as_deref()
        && !(sub == "status" && spec.status_subresource)
    {
        return Err(ApiError::not_found_path(uri.path()));
    }
    let status_only = target.subresource.is_some();
    let ns = target.namespace.as_deref();
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))?;
    let publish = |recs: Vec<Arc<WatchRecord>>| {
        for rec in recs {
            // No receivers is fine: nobody is watching.
            let _ = shared.events.send(rec);
        }
    };
    match verb {
        "get" => {
            let name = target.name.as_deref().unwrap_or_default();
            Ok(Reply::Json(200, store.get(&spec, ns, name)?))
        }
        "list" => Ok(Reply::Json(200, store.list(&spec, ns, &labels, &fields))),
        "watch" => {
            let since = query.get("resourceVersion").cloned().unwrap_or_default();
            let start = match store.watch_start(
                &spec,
                ns,
                labels,
                fields,
                &since,
                is_true(query, "allowWatchBookmarks"),
                query
                    .get("timeoutSeconds")
                    .and_then(|t| t.parse::<u64>().ok()),
                &shared.events,
            ) {
                Ok(start) => start,
                // As the real server does: an expired version is an ERROR event in a 200 stream.
                Err(e) if e.code == 410 => return Ok(Reply::WatchError(e)),
                Err(e) => return Err(e),
            };
            Ok(Reply::Watch(start))
        }
        "create" => {
            let obj = parse_body(body)?;
            let (out, recs) = store.create(&spec, ns, obj)?;
            publish(recs);
            Ok(Reply::Json(201, out))
        }
        "update" => {
            let obj = parse_body(body)?;
            let name = target.name.as_deref().unwrap_or_default();
            let (out, recs) = store.update(&spec, ns, name, obj, status_only)?;
            publish(recs);
            Ok(Reply::Json(200, out))
        }
        "patch" => {
            let patch = parse_body(body)?;
            let name = target.name.as_deref().unwrap_or_default();
            let kind = store::PatchKind::from_content_type(content_type)?;
            if kind == store::PatchKind::Apply && !query.contains_key("fieldManager") {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch".to_owned(),
                ));
            }
            let (code, out, recs) = store.patch(&spec, ns, name, kind, &patch, status_only)?;
            publish(recs);
            Ok(Reply::Json(code, out))
        }
        "delete" => {
            let opts = if body.is_empty() {
                Value::Null
            } else {
                parse_body(body)?
            };
            let name = target.name.as_deref().unwrap_or_default();
            let (out, recs) = store.delete(&spec, ns, name, &opts)?;
            publish(recs);
            Ok(Reply::Json(200, out))
        }
        _ => {
            // deletecollection
            let (out, recs) = store.delete_collection(&spec, ns, &labels, &fields)?;
            publish(recs);
            Ok(Reply::Json(200, out))
        }
    }
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            400,
            "BadRequest",
            format!("the request body is not valid JSON: {e}"),
        )
    })
}

fn watch_response(shared: Arc<Shared>, start: store::WatchStart) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let bookmark_interval = shared.config.bookmark_interval;
    tokio::spawn(async move {
        let _ = run_watch(start, tx, bookmark_interval).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        StatusCode::OK,
        [(http::header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

fn line(value: &Value) -> Bytes {
    let mut v = serde_json::to_vec(value).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Feeds one watch stream; returns when the client goes away, the timeout passes or the
/// stream lags too far behind (then the client resumes from its last resourceVersion).
async fn run_watch(
    start: store::WatchStart,
    tx: mpsc::Sender<Bytes>,
    bookmark_interval: Duration,
) -> Result<(), ()> {
    let store::WatchStart {
        filter,
        initial,
        mut receiver,
        mut last_rv,
        bookmarks,
        timeout,
    } = start;
    for rec in initial {
        tx.send(line(&rec.to_event())).await.map_err(|_| ())?;
    }
    let deadline = tokio::time::Instant::now() + timeout.unwrap_or(Duration::from_secs(3600));
    let mut ticker = tokio::time::interval(bookmark_interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            _ = tx.closed() => return Err(()),
            _ = ticker.tick(), if bookmarks => {
                let bm = json!({
                    "type": "BOOKMARK",
                    "object": {
                        "kind": filter.kind,
                        "apiVersion": filter.api_version,
                        "metadata": {"resourceVersion": last_rv.to_string()},
                    }
                });
                tx.send(line(&bm)).await.map_err(|_| ())?;
            }
            rec = receiver.recv() => match rec {
                Ok(rec) => {
                    if rec.rv <= last_rv {
                        continue;
                    }
                    last_rv = rec.rv;
                    if filter.matches(&rec) {
                        tx.send(line(&rec.to_event())).await.map_err(|_| ())?;
                    }
                }
                // Lagged or closed: end the stream; the client re-watches from its last version.
                Err(_) => return Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests;
