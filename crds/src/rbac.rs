//! The permissions the operator needs, as data. `crds/rbac/*.yaml` must grant exactly these
//! (checked by this crate's tests), and the operator's tests check that every API call it
//! makes is covered (with [`allows`]).

use crate::{GROUP, HUB_PLURAL, LEADER_LEASE_NAME, SPOKE_PLURAL};

/// Where a permission is granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// ClusterRole `dmvpn-operator` (bound by a ClusterRoleBinding).
    Cluster,
    /// Role `dmvpn-operator` in the operator namespace (`kube-dmvpn-system`).
    OperatorNamespace,
}

/// One RBAC rule: verbs on a resource (or subresource, `dmvpnhubs/status`) of an API group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permission {
    /// API group; `""` is the core group.
    pub api_group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// If not empty, the rule only covers objects with these names.
    pub resource_names: &'static [&'static str],
    pub scope: Scope,
}

const fn p(
    scope: Scope,
    api_group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
) -> Permission {
    Permission {
        api_group,
        resource,
        verbs,
        resource_names: &[],
        scope,
    }
}

/// Name of the ClusterRole, Role and their bindings.
pub const ROLE_NAME: &str = "dmvpn-operator";

/// Everything the operator may do, and nothing more.
pub const REQUIRED: &[Permission] = &[
    // Watch and reconcile the custom resources; patch/update for finalizers and metadata.
    p(
        Scope::Cluster,
        GROUP,
        HUB_PLURAL,
        &["get", "list", "watch", "patch", "update"],
    ),
    p(
        Scope::Cluster,
        GROUP,
        SPOKE_PLURAL,
        &["get", "list", "watch", "patch", "update"],
    ),
    p(Scope::Cluster, GROUP, "dmvpnhubs/status", &["patch"]),
    p(Scope::Cluster, GROUP, "dmvpnspokes/status", &["patch"]),
    // Needed to set ownerReferences with blockOwnerDeletion on the objects it creates.
    p(Scope::Cluster, GROUP, "dmvpnhubs/finalizers", &["update"]),
    p(Scope::Cluster, GROUP, "dmvpnspokes/finalizers", &["update"]),
    // Pod CIDRs of nodes (site prefixes) and node selection.
    p(Scope::Cluster, "", "nodes", &["get", "list", "watch"]),
    // Events about cluster-scoped objects go to the `default` namespace, so this is
    // cluster-wide.
    p(
        Scope::Cluster,
        "events.k8s.io",
        "events",
        &["create", "patch"],
    ),
    // CA and per-site certificate secrets, only in the operator namespace.
    p(
        Scope::OperatorNamespace,
        "",
        "secrets",
        &["create", "get", "list", "watch", "patch", "delete"],
    ),
    // Hub endpoints given as a Service reference (load-balancer addresses).
    p(
        Scope::OperatorNamespace,
        "",
        "services",
        &["get", "list", "watch"],
    ),
    // Leader election: create cannot be limited by name, get/update can.
    p(
        Scope::OperatorNamespace,
        "coordination.k8s.io",
        "leases",
        &["create"],
    ),
    Permission {
        api_group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "update"],
        resource_names: &[LEADER_LEASE_NAME],
        scope: Scope::OperatorNamespace,
    },
];

/// Whether [`REQUIRED`] lets the operator do `verb` on `resource` of `api_group` in `scope`
/// (ignoring name restrictions).
pub fn allows(scope: Scope, api_group: &str, resource: &str, verb: &str) -> bool {
    REQUIRED.iter().any(|perm| {
        perm.scope == scope
            && perm.api_group == api_group
            && perm.resource == resource
            && perm.verbs.contains(&verb)
    })
}

/// All verbs [`REQUIRED`] grants on `resource` of `api_group`, in any scope, sorted and
/// deduplicated.
pub fn verbs_for(api_group: &str, resource: &str) -> Vec<&'static str> {
    let mut v: Vec<&'static str> = REQUIRED
        .iter()
        .filter(|perm| perm.api_group == api_group && perm.resource == resource)
        .flat_map(|perm| perm.verbs.iter().copied())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// One kind of API call the operator makes: `verb` on `resource` of `api_group` in `scope`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Access<'a> {
    pub scope: Scope,
    pub api_group: &'a str,
    pub resource: &'a str,
    pub verb: &'a str,
}

/// The calls in `used` that [`REQUIRED`] does not grant (the operator would get 403s).
pub fn not_granted<'a>(used: &[Access<'a>]) -> Vec<Access<'a>> {
    let mut v: Vec<Access<'a>> = used
        .iter()
        .filter(|a| !allows(a.scope, a.api_group, a.resource, a.verb))
        .copied()
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The grants in [`REQUIRED`] that no call in `used` needs (more privilege than used).
pub fn not_used(used: &[Access<'_>]) -> Vec<Access<'static>> {
    let mut v = Vec::new();
    for perm in REQUIRED {
        for verb in perm.verbs {
            let needed = used.iter().any(|a| {
                a.scope == perm.scope
                    && a.api_group == perm.api_group
                    && a.resource == perm.resource
                    && a.verb == *verb
            });
            if !needed {
                v.push(Access {
                    scope: perm.scope,
                    api_group: perm.api_group,
                    resource: perm.resource,
                    verb,
                });
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        assert!(allows(Scope::Cluster, GROUP, "dmvpnspokes/status", "patch"));
        assert!(!allows(Scope::Cluster, "", "secrets", "get"));
        assert!(allows(Scope::OperatorNamespace, "", "secrets", "get"));
        assert_eq!(
            verbs_for("coordination.k8s.io", "leases"),
            vec!["create", "get", "update"]
        );
        assert!(verbs_for("", "pods").is_empty());
    }

    #[test]
    fn used_versus_granted() {
        let all: Vec<Access> = REQUIRED
            .iter()
            .flat_map(|p| {
                p.verbs.iter().map(|v| Access {
                    scope: p.scope,
                    api_group: p.api_group,
                    resource: p.resource,
                    verb: v,
                })
            })
            .collect();
        assert!(not_granted(&all).is_empty());
        assert!(not_used(&all).is_empty());

        let pods = Access {
            scope: Scope::Cluster,
            api_group: "",
            resource: "pods",
            verb: "list",
        };
        assert_eq!(not_granted(&[pods]), vec![pods]);
        // secrets granted only in the operator namespace
        let cluster_secrets = Access {
            scope: Scope::Cluster,
            api_group: "",
            resource: "secrets",
            verb: "get",
        };
        assert_eq!(not_granted(&[cluster_secrets]), vec![cluster_secrets]);
        let unused = not_used(&all[1..]);
        assert_eq!(unused.len(), 1);
        assert_eq!(unused[0], all[0]);
    }

    #[test]
    fn no_wildcards_or_duplicates() {
        for perm in REQUIRED {
            assert!(!perm.verbs.contains(&"*"), "{perm:?}");
            assert_ne!(perm.resource, "*");
            let mut v = perm.verbs.to_vec();
            v.sort_unstable();
            v.dedup();
            assert_eq!(v.len(), perm.verbs.len(), "duplicate verb in {perm:?}");
        }
    }
}
