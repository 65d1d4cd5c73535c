//! The RBAC manifests in crds/rbac/ grant exactly `dmvpn_crds::rbac::REQUIRED`: every
//! required (group, resource, verb, names) in the right scope, nothing more, no wildcards, and
//! the bindings give them to the operator's service account.

use std::collections::BTreeSet;
use std::path::Path;

use dmvpn_crds::rbac::{REQUIRED, ROLE_NAME, Scope};
use dmvpn_crds::{OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::Deserialize;

/// (scope, apiGroup, resource, verb, resourceNames)
type Grant = (Scope, String, String, String, Vec<String>);

#[derive(Default)]
struct Manifests {
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    role_bindings: Vec<RoleBinding>,
    service_accounts: Vec<serde_json::Value>,
}

fn load() -> Manifests {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rbac");
    let mut m = Manifests::default();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no RBAC manifests in {}", dir.display());
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_json::Value::deserialize(doc).unwrap();
            if v.is_null() {
                continue;
            }
            let kind = v["kind"].as_str().unwrap_or_default().to_owned();
            let what = format!("{kind} in {}", path.display());
            match kind.as_str() {
                "ClusterRole" => m
                    .cluster_roles
                    .push(serde_json::from_value(v).expect(&what)),
                "Role" => m.roles.push(serde_json::from_value(v).expect(&what)),
                "ClusterRoleBinding" => m
                    .cluster_role_bindings
                    .push(serde_json::from_value(v).expect(&what)),
                "RoleBinding" => m
                    .role_bindings
                    .push(serde_json::from_value(v).expect(&what)),
                "ServiceAccount" => m.service_accounts.push(v),
                other => panic!("unexpected kind {other:?} in {}", path.display()),
            }
        }
    }
    m
}

fn grants_of(scope: Scope, rules: &[PolicyRule], out: &mut BTreeSet<Grant>) {
    for r in rules {
        assert!(
            r.non_resource_urls.as_ref().is_none_or(|u| u.is_empty()),
            "nonResourceURLs granted: {r:?}"
        );
        let groups = r.api_groups.clone().unwrap_or_default();
        let resources = r.resources.clone().unwrap_or_default();
        assert!(
            !groups.is_empty() && !resources.is_empty() && !r.verbs.is_empty(),
            "{r:?}"
        );
        let mut names = r.resource_names.clone().unwrap_or_default();
        names.sort();
        for g in &groups {
            for res in &resources {
                for verb in &r.verbs {
                    for s in [g, res, verb] {
                        assert!(!s.contains('*'), "wildcard in rule {r:?}");
                    }
                    out.insert((scope, g.clone(), res.clone(), verb.clone(), names.clone()));
                }
            }
        }
    }
}

fn required_grants() -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for p in REQUIRED {
        let mut names: Vec<String> = p.resource_names.iter().map(|s| s.to_string()).collect();
        names.sort();
        for v in p.verbs {
            out.insert((
                p.scope,
                p.api_group.to_owned(),
                p.resource.to_owned(),
                v.to_string(),
                names.clone(),
            ));
        }
    }
    out
}

#[test]
fn manifests_grant_exactly_required() {
    let m = load();
    assert_eq!(m.cluster_roles.len(), 1, "one ClusterRole");
    assert_eq!(m.roles.len(), 1, "one Role");

    let mut granted = BTreeSet::new();
    let cr = &m.cluster_roles[0];
    assert_eq!(cr.metadata.name.as_deref(), Some(ROLE_NAME));
    assert!(cr.aggregation_rule.is_none(), "aggregation would add rules");
    grants_of(
        Scope::Cluster,
        cr.rules.as_deref().unwrap_or_default(),
        &mut granted,
    );

    let role = &m.roles[0];
    assert_eq!(role.metadata.name.as_deref(), Some(ROLE_NAME));
    assert_eq!(role.metadata.namespace.as_deref(), Some(OPERATOR_NAMESPACE));
    grants_of(
        Scope::OperatorNamespace,
        role.rules.as_deref().unwrap_or_default(),
        &mut granted,
    );

    let required = required_grants();
    let extra: Vec<_> = granted.difference(&required).collect();
    let missing: Vec<_> = required.difference(&granted).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "crds/rbac/*.yaml and dmvpn_crds::rbac::REQUIRED disagree\n  granted but not required: {extra:#?}\n  required but not granted: {missing:#?}"
    );
}

#[test]
fn bindings_target_the_operator_service_account() {
    let m = load();
    assert_eq!(m.service_accounts.len(), 1);
    let sa = &m.service_accounts[0];
    assert_eq!(sa["metadata"]["name"], OPERATOR_SERVICE_ACCOUNT);
    assert_eq!(sa["metadata"]["namespace"], OPERATOR_NAMESPACE);

    assert_eq!(m.cluster_role_bindings.len(), 1);
    let crb = &m.cluster_role_bindings[0];
    assert_eq!(crb.role_ref.kind, "ClusterRole");
    assert_eq!(crb.role_ref.name, ROLE_NAME);
    let subjects = crb.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, OPERATOR_SERVICE_ACCOUNT);
    assert_eq!(subjects[0].namespace.as_deref(), Some(OPERATOR_NAMESPACE));

    assert_eq!(m.role_bindings.len(), 1);
    let rb = &m.role_bindings[0];
    assert_eq!(rb.metadata.namespace.as_deref(), Some(OPERATOR_NAMESPACE));
    assert_eq!(rb.role_ref.kind, "Role");
    assert_eq!(rb.role_ref.name, ROLE_NAME);
    let subjects = rb.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, OPERATOR_SERVICE_ACCOUNT);
    assert_eq!(subjects[0].namespace.as_deref(), Some(OPERATOR_NAMESPACE));
}

#[test]
fn the_comparison_detects_an_extra_grant() {
    // Guard against a vacuous comparison: an added verb must show up as a difference.
    let mut granted = required_grants();
    granted.insert((
        Scope::Cluster,
        String::new(),
        "secrets".into(),
        "get".into(),
        vec![],
    ));
    assert_eq!(granted.difference(&required_grants()).count(), 1);
}
