//! The committed CRD YAML is what the Rust types generate, and it carries what the API server
//! needs: names, printer columns, bounded lists, a structural schema and the CEL rules.

mod support;

use dmvpn_crds::generate::{REGENERATE_COMMAND, generated_files};
use serde_json::Value;
use support::{cel_errors, crate_dir, crd, load_yaml, openapi_schema};

#[test]
fn committed_yaml_is_up_to_date() {
    for f in generated_files().unwrap() {
        let path = crate_dir().join(f.path);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == f.content,
            "{} is stale or missing: the Rust types changed. Regenerate it with `{REGENERATE_COMMAND}` and commit the result.",
            path.display()
        );
    }
}

#[test]
fn names_scope_and_subresources() {
    for (plural, kind, short) in [
        ("dmvpnhubs", "DmvpnHub", "dh"),
        ("dmvpnspokes", "DmvpnSpoke", "ds"),
    ] {
        let c = crd(plural);
        assert_eq!(
            c["metadata"]["name"],
            format!("{plural}.{}", dmvpn_crds::GROUP)
        );
        assert_eq!(c["spec"]["scope"], "Cluster");
        let names = &c["spec"]["names"];
        assert_eq!(names["kind"], kind);
        assert_eq!(names["shortNames"], serde_json::json!([short]));
        assert_eq!(
            names["categories"],
            serde_json::json!([dmvpn_crds::CATEGORY])
        );
        let v = &c["spec"]["versions"][0];
        assert_eq!(v["name"], dmvpn_crds::VERSION);
        assert!(v["subresources"]["status"].is_object());
        let cols: Vec<&str> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        for want in ["Ready", "Reason", "Address", "Peers", "Age"] {
            assert!(
                cols.contains(&want),
                "{plural}: no {want} column in {cols:?}"
            );
        }
        let ready = &v["additionalPrinterColumns"][0];
        assert_eq!(
            ready["jsonPath"],
            r#".status.conditions[?(@.type=="Ready")].status"#
        );
    }
}

/// Every rule the design relies on is in the YAML the API server gets.
#[test]
fn cel_rules_are_present() {
    let expected: &[(&str, &str, &str)] = &[
        (
            "dmvpnhubs",
            "/properties/spec/properties/tunnelNetwork",
            "self == oldSelf",
        ),
        (
            "dmvpnhubs",
            "/properties/spec/properties/tunnelNetwork",
            "isCIDR(self)",
        ),
        (
            "dmvpnhubs",
            "/properties/spec",
            "containsIP(self.tunnelAddress)",
        ),
        (
            "dmvpnhubs",
            "/properties/spec/properties/nhrp",
            "self.registrationIntervalSeconds * 2 <= self.holdtimeSeconds",
        ),
        (
            "dmvpnhubs",
            "/properties/spec/properties/ipsec",
            "self.childLifetimeSeconds < self.ikeLifetimeSeconds",
        ),
        (
            "dmvpnhubs",
            "/properties/spec/properties/endpoint",
            "has(self.addresses) != has(self.service)",
        ),
        (
            "dmvpnhubs",
            "/properties/spec/properties/nodes",
            "self.mode == 'Selector'",
        ),
        ("dmvpnhubs", "", "self.metadata.name.size() <= 63"),
        (
            "dmvpnspokes",
            "/properties/spec",
            "self.hubs[0].name == oldSelf.hubs[0].name",
        ),
        (
            "dmvpnspokes",
            "/properties/spec",
            "self.tunnelAddress == oldSelf.tunnelAddress",
        ),
        (
            "dmvpnspokes",
            "/properties/spec/properties/sitePrefixes",
            "self.source == 'Static'",
        ),
        (
            "dmvpnspokes",
            "/properties/spec/properties/sitePrefixes/properties/prefixes",
            "isCIDR(p)",
        ),
        (
            "dmvpnspokes",
            "/properties/spec/properties/nodes",
            "self.mode == 'Selector'",
        ),
        (
            "dmvpnspokes",
            "/properties/spec/properties/nat/properties/publicAddress",
            "isIP(self)",
        ),
        ("dmvpnspokes", "", "self.metadata.name.matches("),
    ];
    for (plural, pointer, rule) in expected {
        let schema = openapi_schema(plural);
        let node = schema
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{plural}: no schema node at {pointer:?}"));
        let rules: Vec<&str> = node["x-kubernetes-validations"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["rule"].as_str()).collect())
            .unwrap_or_default();
        assert!(
            rules.iter().any(|r| r.contains(rule)),
            "{plural}{pointer}: no rule containing {rule:?} in {rules:?}"
        );
    }
}

fn walk<'a>(node: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>) {
    out.push((path.clone(), node));
    if let Some(props) = node["properties"].as_object() {
        for (k, v) in props {
            walk(v, format!("{path}.{k}"), out);
        }
    }
    if node["items"].is_object() {
        walk(&node["items"], format!("{path}[]"), out);
    }
    if node["additionalProperties"].is_object() {
        walk(&node["additionalProperties"], format!("{path}{{}}"), out);
    }
}

/// Structural schema rules the API server enforces on a CRD, and the bounds CEL cost
/// estimation needs (rules over unbounded lists or strings are rejected as too expensive).
#[test]
fn schemas_are_structural_and_rules_are_bounded() {
    for plural in ["dmvpnhubs", "dmvpnspokes"] {
        let schema = openapi_schema(plural);
        let mut nodes = Vec::new();
        walk(&schema, String::new(), &mut nodes);
        for (path, node) in &nodes {
            assert!(node["type"].is_string(), "{plural}{path}: no type");
            for junctor in ["oneOf", "anyOf", "allOf", "$ref"] {
                assert!(node.get(junctor).is_none(), "{plural}{path}: {junctor}");
            }
            if let Some(rules) = node["x-kubernetes-validations"].as_array() {
                if node["type"] == "string" {
                    assert!(
                        node["maxLength"].is_u64(),
                        "{plural}{path}: unbounded string with a rule"
                    );
                }
                // cost and missing-bounds analysis of each rule (the scope analysis of
                // kube-cel flags comprehension variables, so it is not used)
                let compiled = kube_cel::compile_schema(node);
                for r in rules {
                    let rule = r["rule"].as_str().unwrap();
                    let warnings = kube_cel::estimate_rule_cost(rule, &compiled);
                    assert!(
                        warnings.is_empty(),
                        "{plural}{path}: `{rule}`: {warnings:#?}"
                    );
                }
            }
        }
        // all rules compile with the Kubernetes CEL library
        let compiled = kube_cel::compile_schema(&schema);
        assert!(
            !compiled.has_errors(),
            "{plural}: CEL compile errors: {:#?}",
            compiled.compilation_errors()
        );
    }
}

#[test]
fn status_bounds_match_the_crate_constants() {
    let hub = openapi_schema("dmvpnhubs");
    let st = "/properties/status/properties";
    assert_eq!(
        hub.pointer(&format!("{st}/peers/maxItems")),
        Some(&Value::from(dmvpn_crds::hub::HUB_MAX_PEERS))
    );
    assert_eq!(
        hub.pointer(&format!("{st}/conditions/maxItems")),
        Some(&Value::from(dmvpn_crds::conditions::MAX_CONDITIONS))
    );
    assert_eq!(
        hub.pointer(&format!("{st}/conditions/x-kubernetes-list-type")),
        Some(&Value::from("map"))
    );
    let spoke = openapi_schema("dmvpnspokes");
    assert_eq!(
        spoke.pointer(&format!("{st}/peers/maxItems")),
        Some(&Value::from(dmvpn_crds::spoke::SPOKE_MAX_PEERS))
    );
    assert_eq!(
        spoke.pointer(&format!("{st}/sitePrefixes/maxItems")),
        Some(&Value::from(dmvpn_crds::spoke::SPOKE_MAX_SITE_PREFIXES))
    );
    assert_eq!(
        spoke.pointer("/properties/spec/properties/hubs/maxItems"),
        Some(&Value::from(dmvpn_crds::spoke::SPOKE_MAX_HUBS))
    );
    assert_eq!(
        spoke.pointer(&format!("{st}/conditions/maxItems")),
        Some(&Value::from(dmvpn_crds::conditions::MAX_CONDITIONS))
    );
}

// ---- transition rules (need the old object, so they are tested here rather than as files)

fn example(name: &str) -> Value {
    load_yaml(&crate_dir().join("examples").join(name))
}

#[test]
fn hub_tunnel_network_is_immutable() {
    let old = example("hub.yaml");
    let mut new = old.clone();
    new["spec"]["tunnelNetwork"] = "10.42.1.0/24".into();
    new["spec"]["tunnelAddress"] = "10.42.1.1".into();
    assert!(cel_errors(&new, None).is_empty(), "valid as a new object");
    let errs = cel_errors(&new, Some(&old));
    assert!(
        errs.iter()
            .any(|e| e.contains("tunnelNetwork is immutable")),
        "{errs:#?}"
    );
    // other fields may change
    let mut new = old.clone();
    new["spec"]["nhrp"]["holdtimeSeconds"] = 900.into();
    new["spec"]["phase"] = 2.into();
    assert!(cel_errors(&new, Some(&old)).is_empty());
}

#[test]
fn spoke_primary_hub_is_immutable_but_secondaries_may_change() {
    let old = example("spoke-a.yaml");
    let mut new = old.clone();
    new["spec"]["hubs"] = serde_json::json!([{"name": "hub-b"}]);
    let errs = cel_errors(&new, Some(&old));
    assert!(errs.iter().any(|e| e.contains("primary hub")), "{errs:#?}");

    let mut new = old.clone();
    new["spec"]["hubs"] = serde_json::json!([{"name": "hub-a"}, {"name": "hub-b"}]);
    assert!(cel_errors(&new, Some(&old)).is_empty());
    assert!(
        cel_errors(&old, Some(&new)).is_empty(),
        "removing a secondary hub"
    );
}

#[test]
fn spoke_tunnel_address_cannot_be_added_changed_or_removed() {
    let with = example("spoke-b.yaml");
    let mut changed = with.clone();
    changed["spec"]["tunnelAddress"] = "10.42.0.21".into();
    let mut without = with.clone();
    without["spec"]
        .as_object_mut()
        .unwrap()
        .remove("tunnelAddress");
    for (new, old, what) in [
        (&changed, &with, "changed"),
        (&without, &with, "removed"),
        (&with, &without, "added"),
    ] {
        let errs = cel_errors(new, Some(old));
        assert!(
            errs.iter().any(|e| e.contains("tunnelAddress cannot be")),
            "{what}: {errs:#?}"
        );
    }
}

#[test]
fn committed_yaml_is_a_typed_crd_equal_to_the_generated_one() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    for (plural, generated) in [
        ("dmvpnhubs", dmvpn_crds::DmvpnHub::crd()),
        ("dmvpnspokes", dmvpn_crds::DmvpnSpoke::crd()),
    ] {
        let parsed: CustomResourceDefinition = serde_json::from_value(crd(plural)).unwrap();
        assert_eq!(parsed, generated, "{plural}");
    }
}
