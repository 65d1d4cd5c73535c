//! The object store of the fake API server: objects, resourceVersions, watch history.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::ResourceSpec;
use super::selector::{FieldSelector, LabelSelector};

/// An error the API server answers with (a `Status` object).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: String) -> Self {
        Self {
            code,
            reason,
            message,
            details: None,
        }
    }

    fn with_details(mut self, spec: &ResourceSpec, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": spec.group, "kind": spec.plural}));
        self
    }

    pub fn not_found_path(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    pub fn not_found(spec: &ResourceSpec, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(spec)),
        )
        .with_details(spec, name)
    }

    fn already_exists(spec: &ResourceSpec, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qualified(spec)),
        )
        .with_details(spec, name)
    }

    fn conflict(spec: &ResourceSpec, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                qualified(spec)
            ),
        )
        .with_details(spec, name)
    }

    fn invalid(spec: &ResourceSpec, name: &str, message: String) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {message}", spec.kind),
        )
        .with_details(spec, name)
    }

    fn bad_request(message: String) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn gone(message: String) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn injected(code: u16, spec: &ResourceSpec, name: Option<&str>) -> Self {
        let name = name.unwrap_or_default();
        match code {
            404 => Self::not_found(spec, name),
            409 => Self::conflict(spec, name),
            410 => Self::gone("injected: too old resource version".to_owned()),
            _ => Self::new(
                code,
                "InternalError",
                format!(
                    "an error on the server (injected failure {code}) has prevented the request from succeeding"
                ),
            ),
        }
    }

    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let (Some(details), Some(obj)) = (&self.details, status.as_object_mut()) {
            obj.insert("details".to_owned(), details.clone());
        }
        status
    }
}

fn qualified(spec: &ResourceSpec) -> String {
    if spec.group.is_empty() {
        spec.plural.clone()
    } else {
        format!("{}.{}", spec.plural, spec.group)
    }
}

/// One change, as kept in the watch history and sent to watchers.
#[derive(Debug)]
pub(crate) struct WatchRecord {
    pub rv: u64,
    pub group: String,
    pub plural: String,
    pub namespace: Option<String>,
    pub kind: &'static str,
    pub object: Arc<Value>,
}

impl WatchRecord {
    pub fn to_event(&self) -> Value {
        json!({"type": self.kind, "object": &*self.object})
    }
}

/// Which records a watch stream wants.
#[derive(Debug, Clone)]
pub(crate) struct WatchFilter {
    group: String,
    plural: String,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    pub kind: String,
    pub api_version: String,
}

impl WatchFilter {
    pub fn matches(&self, rec: &WatchRecord) -> bool {
        rec.group == self.group
            && rec.plural == self.plural
            && (self.namespace.is_none() || rec.namespace == self.namespace)
            && self.labels.matches(&rec.object)
            && self.fields.matches(&rec.object)
    }
}

/// Everything a new watch stream needs, taken under the store lock so nothing is missed.
pub(crate) struct WatchStart {
    pub filter: WatchFilter,
    pub initial: Vec<Arc<WatchRecord>>,
    pub receiver: broadcast::Receiver<Arc<WatchRecord>>,
    pub last_rv: u64,
    pub bookmarks: bool,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchKind {
    Merge,
    Json,
    Strategic,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Result<Self, ApiError> {
        let base = ct.split(';').next().unwrap_or_default().trim();
        match base {
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/json-patch+json" => Ok(Self::Json),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(Self::Apply),
            other => Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
                ),
            )),
        }
    }
}

type ObjKey = (String, String); // (namespace or "", name)
type ResKey = (String, String); // (group, plural)

pub(crate) struct Store {
    rv: u64,
    uid_seq: u64,
    specs: HashMap<(String, String, String), ResourceSpec>,
    objects: HashMap<ResKey, BTreeMap<ObjKey, Arc<Value>>>,
    history: VecDeque<Arc<WatchRecord>>,
    history_cap: usize,
    /// The newest version no longer in the history; watches from before it get `410 Gone`.
    history_floor: u64,
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

fn meta_str<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    meta(obj).and_then(|m| m.get(key)).and_then(Value::as_str)
}

fn meta_mut(obj: &mut Value) -> Option<&mut Map<String, Value>> {
    let root = obj.as_object_mut()?;
    let m = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !m.is_object() {
        *m = Value::Object(Map::new());
    }
    m.as_object_mut()
}

fn has_finalizers(obj: &Value) -> bool {
    meta(obj)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
}

/// Everything but metadata and status: a change here bumps `generation`.
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.as_object().cloned().unwrap_or_default();
    o.remove("metadata");
    o.remove("status");
    Value::Object(o)
}

impl Store {
    pub fn new(history_cap: usize) -> Self {
        Self {
            rv: 1,
            uid_seq: 0,
            specs: HashMap::new(),
            objects: HashMap::new(),
            history: VecDeque::new(),
            history_cap: history_cap.max(1),
            history_floor: 0,
        }
    }

    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn register(&mut self, spec: ResourceSpec) {
        self.objects
            .entry((spec.group.clone(), spec.plural.clone()))
            .or_default();
        self.specs.insert(
            (
                spec.group.clone(),
                spec.version.clone(),
                spec.plural.clone(),
            ),
            spec,
        );
    }

    pub fn spec(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceSpec> {
        self.specs
            .get(&(group.to_owned(), version.to_owned(), plural.to_owned()))
    }

    pub fn objects_of(&self, plural: &str) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((_, p), _)| p == plural)
            .flat_map(|(_, m)| m.values().map(|v| (**v).clone()))
            .collect()
    }

    fn bucket(&mut self, spec: &ResourceSpec) -> &mut BTreeMap<ObjKey, Arc<Value>> {
        self.objects
            .entry((spec.group.clone(), spec.plural.clone()))
            .or_default()
    }

    fn lookup(&self, spec: &ResourceSpec, ns: Option<&str>, name: &str) -> Option<Arc<Value>> {
        self.objects
            .get(&(spec.group.clone(), spec.plural.clone()))
            .and_then(|m| m.get(&(ns.unwrap_or_default().to_owned(), name.to_owned())))
            .cloned()
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(
        &mut self,
        spec: &ResourceSpec,
        ns: Option<&str>,
        kind: &'static str,
        object: Arc<Value>,
        rv: u64,
    ) -> Arc<WatchRecord> {
        let rec = Arc::new(WatchRecord {
            rv,
            group: spec.group.clone(),
            plural: spec.plural.clone(),
            namespace: ns.map(str::to_owned),
            kind,
            object,
        });
        self.history.push_back(rec.clone());
        while self.history.len() > self.history_cap {
            if let Some(old) = self.history.pop_front() {
                self.history_floor = old.rv;
            }
        }
        rec
    }

    pub fn get(
        &self,
        spec: &ResourceSpec,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.lookup(spec, ns, name)
            .map(|v| (*v).clone())
            .ok_or_else(|| ApiError::not_found(spec, name))
    }

    pub fn list(
        &self,
        spec: &ResourceSpec,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Value {
        let items: Vec<Value> = self
            .objects
            .get(&(spec.group.clone(), spec.plural.clone()))
            .map(|m| {
                m.iter()
                    .filter(|((o_ns, _), _)| ns.is_none_or(|n| n == o_ns))
                    .filter(|(_, v)| labels.matches(v) && fields.matches(v))
                    .map(|(_, v)| (**v).clone())
                    .collect()
            })
            .unwrap_or_default();
        json!({
            "kind": format!("{}List", spec.kind),
            "apiVersion": spec.api_version(),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn watch_start(
        &self,
        spec: &ResourceSpec,
        ns: Option<&str>,
        labels: LabelSelector,
        fields: FieldSelector,
        since: &str,
        bookmarks: bool,
        timeout_secs: Option<u64>,
        events: &broadcast::Sender<Arc<WatchRecord>>,
    ) -> Result<WatchStart, ApiError> {
        let filter = WatchFilter {
            group: spec.group.clone(),
            plural: spec.plural.clone(),
            namespace: ns.map(str::to_owned),
            labels,
            fields,
            kind: spec.kind.clone(),
            api_version: spec.api_version(),
        };
        let initial: Vec<Arc<WatchRecord>> = if since.is_empty() || since == "0" {
            // No version: synthetic ADDED events for the current state, then changes.
            self.objects
                .get(&(spec.group.clone(), spec.plural.clone()))
                .map(|m| {
                    m.iter()
                        .map(|((o_ns, _), v)| {
                            Arc::new(WatchRecord {
                                rv: self.rv,
                                group: spec.group.clone(),
                                plural: spec.plural.clone(),
                                namespace: (!o_ns.is_empty()).then(|| o_ns.clone()),
                                kind: "ADDED",
                                object: v.clone(),
                            })
                        })
                        .filter(|r| filter.matches(r))
                        .collect()
                })
                .unwrap_or_default()
        } else {
            let since: u64 = since
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {since:?}")))?;
            if since < self.history_floor {
                return Err(ApiError::gone(format!(
                    "too old resource version: {since} ({})",
                    self.history_floor + 1
                )));
            }
            self.history
                .iter()
                .filter(|r| r.rv > since && filter.matches(r))
                .cloned()
                .collect()
        };
        Ok(WatchStart {
            filter,
            initial,
            receiver: events.subscribe(),
            last_rv: self.rv,
            bookmarks,
            timeout: timeout_secs.map(Duration::from_secs),
        })
    }

    fn check_namespace(
        spec: &ResourceSpec,
        ns: Option<&str>,
        obj: &mut Value,
        name: &str,
    ) -> Result<(), ApiError> {
        let body_ns = meta_str(obj, "namespace").map(str::to_owned);
        match (ns, body_ns.as_deref()) {
            (Some(path), Some(body)) if path != body => Err(ApiError::bad_request(format!(
                "the namespace of the provided object ({body}) does not match the namespace sent on the request ({path})"
            ))),
            (None, Some(body)) if !body.is_empty() && !spec.namespaced => Err(ApiError::invalid(
                spec,
                name,
                "metadata.namespace: Forbidden: not allowed on this type".to_owned(),
            )),
            _ => {
                if let (Some(path), Some(m)) = (ns, meta_mut(obj)) {
                    m.insert("namespace".to_owned(), Value::String(path.to_owned()));
                }
                Ok(())
            }
        }
    }

    fn check_kind(spec: &ResourceSpec, obj: &mut Value) -> Result<(), ApiError> {
        let Some(root) = obj.as_object_mut() else {
            return Err(ApiError::bad_request(
                "the request body is not a JSON object".to_owned(),
            ));
        };
        if let Some(kind) = root.get("kind").and_then(Value::as_str)
            && kind != spec.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind of the provided object ({kind}) does not match the resource ({})",
                spec.kind
            )));
        }
        if let Some(av) = root.get("apiVersion").and_then(Value::as_str)
            && av != spec.api_version()
        {
            return Err(ApiError::bad_request(format!(
                "the apiVersion of the provided object ({av}) does not match the resource ({})",
                spec.api_version()
            )));
        }
        root.insert("kind".to_owned(), Value::String(spec.kind.clone()));
        root.insert("apiVersion".to_owned(), Value::String(spec.api_version()));
        Ok(())
    }

    pub fn create(
        &mut self,
        spec: &ResourceSpec,
        ns: Option<&str>,
        mut obj: Value,
    ) -> Result<(Value, Vec<Arc<WatchRecord>>), ApiError> {
        Self::check_kind(spec, &mut obj)?;
        let name = match meta_str(&obj, "name") {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => match meta_str(&obj, "generateName") {
                Some(prefix) if !prefix.is_empty() => {
                    format!("{prefix}{:05x}", (self.uid_seq + 1) & 0xfffff)
                }
                _ => {
                    return Err(ApiError::invalid(
                        spec,
                        "",
                        "metadata.name: Required value: name or generateName is required"
                            .to_owned(),
                    ));
                }
            },
        };
        Self::check_namespace(spec, ns, &mut obj, &name)?;
        if self.lookup(spec, ns, &name).is_some() {
            return Err(ApiError::already_exists(spec, &name));
        }
        if spec.status_subresource
            && let Some(root) = obj.as_object_mut()
        {
            // Status is written only through the subresource.
            root.remove("status");
        }
        self.uid_seq += 1;
        let rv = self.next_rv();
        let uid = format!("00000000-0000-4000-8000-{:012x}", self.uid_seq);
        if let Some(m) = meta_mut(&mut obj) {
            m.insert("name".to_owned(), Value::String(name.clone()));
            m.insert("uid".to_owned(), Value::String(uid));
            m.insert("resourceVersion".to_owned(), Value::String(rv.to_string()));
            m.insert("generation".to_owned(), json!(1));
            m.insert("creationTimestamp".to_owned(), Value::String(now_rfc3339()));
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            m.remove("managedFields");
        }
        let stored = Arc::new(obj);
        self.bucket(spec)
            .insert((ns.unwrap_or_default().to_owned(), name), stored.clone());
        let rec = self.record(spec, ns, "ADDED", stored.clone(), rv);
        Ok(((*stored).clone(), vec![rec]))
    }

    /// Applies a new desired object to an existing one: the write path shared by update and
    /// patch. Returns the stored result and the watch records it produced.
    fn write(
        &mut self,
        spec: &ResourceSpec,
        ns: Option<&str>,
        name: &str,
        old: &Value,
        mut new: Value,
        status_only: bool,
    ) -> Result<(Value, Vec<Arc<WatchRecord>>), ApiError> {
        Self::check_kind(spec, &mut new)?;
        Self::check_namespace(spec, ns, &mut new, name)?;
        if let Some(n) = meta_str(&new, "name")
            && n != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(want) = meta_str(&new, "resourceVersion")
            && !want.is_empty()
            && Some(want) != meta_str(old, "resourceVersion")
        {
            return Err(ApiError::conflict(spec, name));
        }
        let mut next = if status_only {
            // Only .status moves; everything else stays as stored.
            let mut next = old.clone();
            if let Some(root) = next.as_object_mut() {
                match new.get("status") {
                    Some(s) => root.insert("status".to_owned(), s.clone()),
                    None => root.remove("status"),
                };
            }
            next
        } else {
            if spec.status_subresource
                && let Some(root) = new.as_object_mut()
            {
                match old.get("status") {
                    Some(s) => root.insert("status".to_owned(), s.clone()),
                    None => root.remove("status"),
                };
            }
            new
        };
        // Server-owned metadata is kept from the stored object.
        let old_meta = meta(old).cloned().unwrap_or_default();
        if let Some(m) = meta_mut(&mut next) {
            for key in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "resourceVersion",
                "namespace",
                "name",
            ] {
                match old_meta.get(key) {
                    Some(v) => m.insert(key.to_owned(), v.clone()),
                    None => m.remove(key),
                };
            }
            m.remove("managedFields");
            if m.get("finalizers").is_some_and(Value::is_null) {
                m.remove("finalizers");
            }
            if m.get("labels").is_some_and(Value::is_null) {
                m.remove("labels");
            }
            if m.get("annotations").is_some_and(Value::is_null) {
                m.remove("annotations");
            }
        }
        if next == *old {
            // A no-op write changes nothing, not even the resourceVersion.
            return Ok((next, Vec::new()));
        }
        let deleting = meta(old).is_some_and(|m| m.contains_key("deletionTimestamp"));
        if deleting && let Some(m) = meta(&next) {
            let old_f = old_meta.get("finalizers").and_then(Value::as_array);
            let new_f = m.get("finalizers").and_then(Value::as_array);
            if let Some(new_f) = new_f
                && new_f.iter().any(|f| !old_f.is_some_and(|o| o.contains(f)))
            {
                return Err(ApiError::invalid(
                    spec,
                    name,
                    "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted".to_owned(),
                ));
            }
        }
        if spec_part(&next) != spec_part(old)
            && let Some(m) = meta_mut(&mut next)
        {
            let g = m.get("generation").and_then(Value::as_i64).unwrap_or(0);
            m.insert("generation".to_owned(), json!(g + 1));
        }
        let rv = self.next_rv();
        if let Some(m) = meta_mut(&mut next) {
            m.insert("resourceVersion".to_owned(), Value::String(rv.to_string()));
        }
        let key = (ns.unwrap_or_default().to_owned(), name.to_owned());
        let stored = Arc::new(next);
        if deleting && !has_finalizers(&stored) {
            self.bucket(spec).remove(&key);
            let rec = self.record(spec, ns, "DELETED", stored.clone(), rv);
            return Ok(((*stored).clone(), vec![rec]));
        }
        self.bucket(spec).insert(key, stored.clone());
        let rec = self.record(spec, ns, "MODIFIED", stored.clone(), rv);
        Ok(((*stored).clone(), vec![rec]))
    }

    pub fn update(
        &mut self,
        spec: &ResourceSpec,
        ns: Option<&str>,
        name: &str,
        obj: Value,
        status_only: bool,
    ) -> Result<(Value, Vec<Arc<WatchRecord>>), ApiError> {
        let old = self
            .lookup(spec, ns, name)
            .ok_or_else(|| ApiError::not_found(spec, name))?;
        self.write(spec, ns, name, &old, obj, status_only)
    }

    pub fn patch(
        &mut self,
        spec: &ResourceSpec,
        ns: Option<&str>,
        name: &str,
        kind: PatchKind,
        patch: &Value,
        status_only: bool,
    ) -> Result<(u16, Value, Vec<Arc<WatchRecord>>), ApiError> {
        let Some(old) = self.lookup(spec, ns, name) else {
            if kind == PatchKind::Apply {
                // Server-side apply creates what does not exist.
                let mut obj = json!({});
                json_patch::merge(&mut obj, patch);
                if let Some(m) = meta_mut(&mut obj) {
                    m.insert("name".to_owned(), Value::String(name.to_owned()));
                }
                let status = obj.get("status").cloned();
                let (created, mut recs) = self.create(spec, ns, obj)?;
                if status_only && let Some(status) = status {
                    let (out, more) =
                        self.write(spec, ns, name, &created, json!({"status": status}), true)?;
                    recs.extend(more);
                    return Ok((201, out, recs));
                }
                return Ok((201, created, recs));
            }
            return Err(ApiError::not_found(spec, name));
        };
        let mut next = (*old).clone();
        match kind {
            PatchKind::Merge | PatchKind::Strategic | PatchKind::Apply => {
                if !patch.is_object() {
                    return Err(ApiError::bad_request(
                        "a merge patch must be a JSON object".to_owned(),
                    ));
                }
                json_patch::merge(&mut next, patch);
            }
            PatchKind::Json => {
                let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                json_patch::patch(&mut next, &ops).map_err(|e| {
                    ApiError::invalid(spec, name, format!("the JSON patch failed: {e}"))
                })?;
            }
        }
        // A resourceVersion in the patch is a precondition; otherwise the patch applies to the
        // current version.
        let want = patch
            .get("metadata")
            .and_then(|m| m.get("resourceVersion"))
            .and_then(Value::as_str);
        if let Some(m) = meta_mut(&mut next) {
            let v = want
                .map(str::to_owned)
                .or_else(|| meta_str(&old, "resourceVersion").map(str::to_owned))
                .unwrap_or_default();
            m.insert("resourceVersion".to_owned(), Value::String(v));
        }
        let (out, recs) = self.write(spec, ns, name, &old, next, status_only)?;
        Ok((200, out, recs))
    }

    pub fn delete(
        &mut self,
        spec: &ResourceSpec,
        ns: Option<&str>,
        name: &str,
        opts: &Value,
    ) -> Result<(Value, Vec<Arc<WatchRecord>>), ApiError> {
        let old = self
            .lookup(spec, ns, name)
            .ok_or_else(|| ApiError::not_found(spec, name))?;
        if let Some(pre) = opts.get("preconditions") {
            let rv_ok = pre
                .get("resourceVersion")
                .and_then(Value::as_str)
                .is_none_or(|v| Some(v) == meta_str(&old, "resourceVersion"));
            let uid_ok = pre
                .get("uid")
                .and_then(Value::as_str)
                .is_none_or(|v| Some(v) == meta_str(&old, "uid"));
            if !rv_ok || !uid_ok {
                return Err(ApiError::conflict(spec, name));
            }
        }
        let key = (ns.unwrap_or_default().to_owned(), name.to_owned());
        if has_finalizers(&old) {
            if meta(&old).is_some_and(|m| m.contains_key("deletionTimestamp")) {
                return Ok(((*old).clone(), Vec::new()));
            }
            let mut next = (*old).clone();
            let rv = self.next_rv();
            if let Some(m) = meta_mut(&mut next) {
                m.insert("deletionTimestamp".to_owned(), Value::String(now_rfc3339()));
                m.insert("deletionGracePeriodSeconds".to_owned(), json!(0));
                m.insert("resourceVersion".to_owned(), Value::String(rv.to_string()));
            }
            let stored = Arc::new(next);
            self.bucket(spec).insert(key, stored.clone());
            let rec = self.record(spec, ns, "MODIFIED", stored.clone(), rv);
            return Ok(((*stored).clone(), vec![rec]));
        }
        self.bucket(spec).remove(&key);
        let rv = self.next_rv();
        let mut gone = (*old).clone();
        if let Some(m) = meta_mut(&mut gone) {
            m.insert("resourceVersion".to_owned(), Value::String(rv.to_string()));
        }
        let stored = Arc::new(gone);
        let rec = self.record(spec, ns, "DELETED", stored.clone(), rv);
        Ok(((*stored).clone(), vec![rec]))
    }

    pub fn delete_collection(
        &mut self,
        spec: &ResourceSpec,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Result<(Value, Vec<Arc<WatchRecord>>), ApiError> {
        let names: Vec<(String, String)> = self
            .objects
            .get(&(spec.group.clone(), spec.plural.clone()))
            .map(|m| {
                m.iter()
                    .filter(|((o_ns, _), _)| ns.is_none_or(|n| n == o_ns))
                    .filter(|(_, v)| labels.matches(v) && fields.matches(v))
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut items = Vec::new();
        let mut recs = Vec::new();
        for (o_ns, name) in names {
            let ns = (!o_ns.is_empty()).then_some(o_ns.as_str());
            let (item, r) = self.delete(spec, ns, &name, &Value::Null)?;
            items.push(item);
            recs.extend(r);
        }
        let list = json!({
            "kind": format!("{}List", spec.kind),
            "apiVersion": spec.api_version(),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        });
        Ok((list, recs))
    }
}
