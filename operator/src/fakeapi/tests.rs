//! The fake API server driven by a real `kube::Client`.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use serde_json::json;

use super::*;

fn widget_spec() -> ResourceSpec {
    ResourceSpec::new("example.test", "v1", "widgets", "Widget", true, true)
}

fn widget_api(client: kube::Client) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.test", "v1", "Widget"),
        "widgets",
    );
    Api::namespaced_with(client, "default", &ar)
}

fn secret(name: &str, labels: &[(&str, &str)]) -> Secret {
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        },
        "stringData": {},
        "data": {"k": "dmFsdWU="},
    }))
    .unwrap()
}

fn api_code<T: std::fmt::Debug>(r: kube::Result<T>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn secret_crud_conflicts_and_selectors() {
    let server = FakeApiServer::start(vec![]).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(server.client().unwrap(), "ops");

    let a = secrets
        .create(&PostParams::default(), &secret("a", &[("app", "dmvpn")]))
        .await
        .unwrap();
    assert_eq!(a.metadata.namespace.as_deref(), Some("ops"));
    assert!(a.metadata.uid.is_some());
    assert!(a.metadata.creation_timestamp.is_some());
    secrets
        .create(&PostParams::default(), &secret("b", &[("app", "other")]))
        .await
        .unwrap();

    let again = secrets
        .create(&PostParams::default(), &secret("a", &[]))
        .await;
    assert_eq!(api_code(again), (409, "AlreadyExists".to_owned()));

    let got = secrets.get("a").await.unwrap();
    assert_eq!(got.data.unwrap()["k"].0, b"value");
    assert_eq!(
        api_code(secrets.get("zzz").await),
        (404, "NotFound".to_owned())
    );

    // Replace with the current version works, with a stale one conflicts.
    let mut fresh = secrets.get("a").await.unwrap();
    fresh.metadata.labels = Some(
        [
            ("app".to_owned(), "dmvpn".to_owned()),
            ("x".to_owned(), "1".to_owned()),
        ]
        .into(),
    );
    let stale = fresh.clone();
    let replaced = secrets
        .replace("a", &PostParams::default(), &fresh)
        .await
        .unwrap();
    assert_ne!(
        replaced.metadata.resource_version,
        stale.metadata.resource_version
    );
    assert_eq!(
        api_code(secrets.replace("a", &PostParams::default(), &stale).await),
        (409, "Conflict".to_owned())
    );

    // Merge patch, and a no-op patch does not change the version.
    let patched = secrets
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": "dmvpn"}}})),
        )
        .await
        .unwrap();
    let noop = secrets
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": "dmvpn"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.metadata.resource_version,
        noop.metadata.resource_version
    );

    // A resourceVersion in a merge patch is a precondition.
    let cond = secrets
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": "1", "labels": {"y": "2"}}})),
        )
        .await;
    assert_eq!(api_code(cond), (409, "Conflict".to_owned()));

    let list = secrets
        .list(&ListParams::default().labels("app=dmvpn"))
        .await
        .unwrap();
    let names: Vec<_> = list
        .items
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(names, ["a", "b"]);
    let list = secrets
        .list(&ListParams::default().labels("x=1"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    let list = secrets
        .list(&ListParams::default().fields("metadata.name=b"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    assert!(list.metadata.resource_version.is_some());

    // Other namespaces are separate.
    let other: Api<Secret> = Api::namespaced(server.client().unwrap(), "elsewhere");
    assert!(
        other
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let all: Api<Secret> = Api::all(server.client().unwrap());
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );

    secrets.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(
        api_code(secrets.get("a").await),
        (404, "NotFound".to_owned())
    );
    assert_eq!(
        api_code(secrets.delete("a", &DeleteParams::default()).await),
        (404, "NotFound".to_owned())
    );
}

#[tokio::test]
async fn status_subresource_and_generation() {
    let server = FakeApiServer::start(vec![widget_spec()]).await.unwrap();
    let api = widget_api(server.client().unwrap());
    let mut w: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.test/v1", "kind": "Widget",
        "metadata": {"name": "w"},
        "spec": {"size": 1},
        "status": {"ready": true},
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created.data.get("status").is_none(),
        "status is ignored on create"
    );

    // Status writes do not touch spec or generation.
    let s = api
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ready": true}, "spec": {"size": 9}})),
        )
        .await
        .unwrap();
    assert_eq!(s.data["status"]["ready"], json!(true));
    assert_eq!(s.data["spec"]["size"], json!(1));
    assert_eq!(s.metadata.generation, Some(1));

    // Main-resource writes ignore status and bump generation on spec changes.
    let m = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 2}, "status": {"ready": false}})),
        )
        .await
        .unwrap();
    assert_eq!(m.data["spec"]["size"], json!(2));
    assert_eq!(m.data["status"]["ready"], json!(true));
    assert_eq!(m.metadata.generation, Some(2));
    let labels_only = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(labels_only.metadata.generation, Some(2));

    // replace_status with a stale version conflicts.
    w = api.get("w").await.unwrap();
    w.data["status"] = json!({"ready": false});
    let stale = w.clone();
    api.replace_status("w", &PostParams::default(), &w)
        .await
        .unwrap();
    assert_eq!(
        api_code(
            api.replace_status("w", &PostParams::default(), &stale)
                .await
        ),
        (409, "Conflict".to_owned())
    );

    // JSON patch, including a failing test operation.
    let j = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(json!([
                    {"op": "test", "path": "/spec/size", "value": 2},
                    {"op": "replace", "path": "/spec/size", "value": 3},
                ]))
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(j.data["spec"]["size"], json!(3));
    let failed = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(json!([
                    {"op": "test", "path": "/spec/size", "value": 2},
                ]))
                .unwrap(),
            ),
        )
        .await;
    assert_eq!(api_code(failed).0, 422);

    // Server-side apply: fieldManager required; creates when missing; merges otherwise.
    let ssa = json!({"apiVersion": "example.test/v1", "kind": "Widget", "metadata": {"name": "v"}, "spec": {"size": 5}});
    let created = api
        .patch("v", &PatchParams::apply("tester"), &Patch::Apply(&ssa))
        .await
        .unwrap();
    assert_eq!(created.data["spec"]["size"], json!(5));
    let merged = api
        .patch("v", &PatchParams::apply("tester"), &Patch::Apply(json!({"apiVersion": "example.test/v1", "kind": "Widget", "spec": {"color": "red"}})))
        .await
        .unwrap();
    assert_eq!(merged.data["spec"], json!({"size": 5, "color": "red"}));

    // Unknown subresources are 404.
    let scale = server.client().unwrap();
    let req = http::Request::get(format!(
        "{}/apis/example.test/v1/namespaces/default/widgets/w/scale",
        server.url()
    ))
    .body(Vec::new())
    .unwrap();
    assert_eq!(
        api_code(scale.request::<serde_json::Value>(req).await).0,
        404
    );
}

#[tokio::test]
async fn finalizers_hold_deletion() {
    let server = FakeApiServer::start(vec![widget_spec()]).await.unwrap();
    let api = widget_api(server.client().unwrap());
    let w: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.test/v1", "kind": "Widget",
        "metadata": {"name": "f", "finalizers": ["example.test/cleanup"]},
        "spec": {},
    }))
    .unwrap();
    api.create(&PostParams::default(), &w).await.unwrap();
    let mut stream = api
        .watch(
            &WatchParams::default(),
            &server.resource_version().to_string(),
        )
        .await
        .unwrap()
        .boxed();

    let deleted = api.delete("f", &DeleteParams::default()).await.unwrap();
    let held = deleted
        .left()
        .expect("object returned while finalizers remain");
    assert!(held.metadata.deletion_timestamp.is_some());
    let still = api.get("f").await.unwrap();
    assert!(still.metadata.deletion_timestamp.is_some());

    // No new finalizers while deleting.
    let add = api
        .patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["example.test/cleanup", "other"]}})),
        )
        .await;
    assert_eq!(api_code(add).0, 422);

    api.patch(
        "f",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(api_code(api.get("f").await).0, 404);

    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            WatchEvent::Modified(_) => kinds.push("MODIFIED"),
            WatchEvent::Deleted(_) => kinds.push("DELETED"),
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(kinds, ["MODIFIED", "DELETED"]);
}

#[tokio::test]
async fn watch_resumes_and_expires() {
    let config = FakeApiConfig {
        history: 3,
        bookmark_interval: Duration::from_millis(50),
    };
    let server = FakeApiServer::start_with(vec![], config).await.unwrap();
    let client = server.client().unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let rv0 = server.resource_version();
    for i in 0..2 {
        leases
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": format!("l{i}")}})).unwrap(),
            )
            .await
            .unwrap();
    }
    // Replay from rv0: both ADDED events, then a bookmark.
    let mut stream = leases
        .watch(&WatchParams::default().timeout(5), &rv0.to_string())
        .await
        .unwrap()
        .boxed();
    let mut added = 0;
    loop {
        match stream.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(_) => added += 1,
            WatchEvent::Bookmark(b) => {
                assert_eq!(added, 2);
                assert!(b.metadata.resource_version.parse::<u64>().unwrap() >= rv0 + 2);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Push the history past rv0: resuming from it now fails with 410 Gone.
    for i in 2..6 {
        leases
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": format!("l{i}")}})).unwrap(),
            )
            .await
            .unwrap();
    }
    let mut expired = leases
        .watch(&WatchParams::default(), &rv0.to_string())
        .await
        .unwrap()
        .boxed();
    match expired.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn runtime_watcher_lists_then_watches() {
    let server = FakeApiServer::start(vec![]).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(server.client().unwrap(), "default");
    secrets
        .create(&PostParams::default(), &secret("pre", &[("app", "dmvpn")]))
        .await
        .unwrap();
    let cfg = watcher::Config::default().labels("app=dmvpn");
    let mut stream = watcher(secrets.clone(), cfg).boxed();
    let mut seen_init = false;
    let mut names = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while names.len() < 2 {
        let ev = tokio::time::timeout_at(deadline, stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match ev {
            watcher::Event::InitApply(s) => names.push(s.metadata.name.unwrap()),
            watcher::Event::InitDone => {
                seen_init = true;
                secrets
                    .create(&PostParams::default(), &secret("ignored", &[("app", "x")]))
                    .await
                    .unwrap();
                secrets
                    .create(&PostParams::default(), &secret("post", &[("app", "dmvpn")]))
                    .await
                    .unwrap();
            }
            watcher::Event::Apply(s) => names.push(s.metadata.name.unwrap()),
            watcher::Event::Init => {}
            watcher::Event::Delete(_) => panic!("no deletes here"),
        }
    }
    assert!(seen_init);
    assert_eq!(names, ["pre", "post"]);
}

#[tokio::test]
async fn records_requests_and_injects_failures() {
    let server = FakeApiServer::start(vec![]).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(server.client().unwrap(), "default");
    server.inject_failure("create", "secrets", 500, 1);
    assert_eq!(
        api_code(
            secrets
                .create(&PostParams::default(), &secret("s", &[]))
                .await
        )
        .0,
        500
    );
    secrets
        .create(&PostParams::default(), &secret("s", &[]))
        .await
        .unwrap();
    secrets.get("s").await.unwrap();
    let reqs = server.requests();
    let key = |verb: &str| RequestKey {
        user: "anonymous".to_owned(),
        namespace: Some("default".to_owned()),
        name: (verb != "create").then(|| "s".to_owned()),
        verb: verb.to_owned(),
        group: String::new(),
        resource: "secrets".to_owned(),
        subresource: String::new(),
    };
    assert_eq!(reqs.get(&key("create")), Some(&2));
    assert_eq!(reqs.get(&key("get")), Some(&1));
    assert_eq!(reqs.len(), 2);

    let op: Api<Secret> = Api::namespaced(server.client_as("operator").unwrap(), "default");
    op.get("s").await.unwrap();
    let by_op: Vec<_> = server
        .requests()
        .into_keys()
        .filter(|k| k.user == "operator")
        .collect();
    assert_eq!(by_op.len(), 1);
    assert_eq!(by_op[0].verb, "get");
}
