//! The example manifests in crds/examples/ pass both validation layers the API server applies
//! (OpenAPI schema, then CEL rules) and deserialize into the Rust types with the same
//! defaults; every manifest in crds/examples/invalid/ is rejected by the layer its header
//! names (`# layer: schema|cel`) with an error mentioning `# expect: ...`.

mod support;

use std::path::PathBuf;

use dmvpn_crds::{DmvpnHub, DmvpnSpoke, NodeSelectionMode, PrefixSource};
use serde_json::Value;
use support::{cel_errors, crate_dir, load_yaml, openapi_schema, plural_of, schema_errors};

fn examples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(crate_dir().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

fn invalid_examples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(crate_dir().join("examples/invalid"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

#[test]
fn there_are_one_hub_and_two_spokes() {
    let kinds: Vec<String> = examples()
        .iter()
        .map(|p| load_yaml(p)["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "DmvpnHub").count(), 1);
    assert_eq!(kinds.iter().filter(|k| *k == "DmvpnSpoke").count(), 2);
}

#[test]
fn examples_pass_schema_and_cel() {
    for path in examples() {
        let obj = load_yaml(&path);
        let errs = schema_errors(&obj);
        assert!(
            errs.is_empty(),
            "{}: schema errors: {errs:#?}",
            path.display()
        );
        let errs = cel_errors(&obj, None);
        assert!(errs.is_empty(), "{}: CEL errors: {errs:#?}", path.display());
        // An update that changes nothing passes the transition rules too.
        let errs = cel_errors(&obj, Some(&obj));
        assert!(
            errs.is_empty(),
            "{}: CEL errors on update: {errs:#?}",
            path.display()
        );
    }
}

/// The defaults the API server applies (from the schema) are the defaults the operator sees
/// (from serde): an example defaulted by the schema equals the example read into the Rust
/// type and written back.
#[test]
fn schema_defaults_match_serde_defaults() {
    for path in examples() {
        let obj = load_yaml(&path);
        let kind = obj["kind"].as_str().unwrap();
        let defaulted = kube_cel::apply_defaults(&openapi_schema(plural_of(kind)), &obj);
        let via_rust: Value = match kind {
            "DmvpnHub" => {
                serde_json::to_value(serde_json::from_value::<DmvpnHub>(obj.clone()).unwrap())
            }
            _ => serde_json::to_value(serde_json::from_value::<DmvpnSpoke>(obj.clone()).unwrap()),
        }
        .unwrap();
        assert_eq!(
            defaulted["spec"],
            via_rust["spec"],
            "{}: schema defaults differ from serde defaults",
            path.display()
        );
    }
}

#[test]
fn minimal_objects_get_the_documented_defaults() {
    let spoke = load_yaml(&crate_dir().join("examples/spoke-a.yaml"));
    let d = kube_cel::apply_defaults(&openapi_schema("dmvpnspokes"), &spoke);
    assert_eq!(d["spec"]["sitePrefixes"]["source"], "NodePodCIDRs");
    assert_eq!(d["spec"]["nodes"]["mode"], "All");
    assert_eq!(d["spec"]["nat"]["keepaliveSeconds"], 20);
    assert_eq!(d["spec"]["nat"]["forceUdpEncapsulation"], false);
    let s: DmvpnSpoke = serde_json::from_value(spoke).unwrap();
    assert_eq!(s.spec.site_prefixes.source, PrefixSource::NodePodCIDRs);
    assert_eq!(s.spec.nodes.mode, NodeSelectionMode::All);

    let hub = serde_json::json!({
        "apiVersion": "dmvpn.kube-dmvpn.io/v1alpha1",
        "kind": "DmvpnHub",
        "metadata": {"name": "h"},
        "spec": {"tunnelNetwork": "10.9.0.0/24", "endpoint": {"addresses": ["198.51.100.9"]}},
    });
    assert!(schema_errors(&hub).is_empty());
    assert!(cel_errors(&hub, None).is_empty());
    let d = kube_cel::apply_defaults(&openapi_schema("dmvpnhubs"), &hub);
    assert_eq!(d["spec"]["phase"], 3);
    assert_eq!(d["spec"]["priority"], 0);
    assert_eq!(d["spec"]["nhrp"]["holdtimeSeconds"], 600);
    assert_eq!(d["spec"]["ipsec"]["ikeLifetimeSeconds"], 86400);
    assert_eq!(d["spec"]["ipsec"]["childLifetimeSeconds"], 3600);
    assert_eq!(
        d["spec"]["ipsec"]["ikeProposals"][0],
        "aes256gcm16-prfsha384-ecp384"
    );
    let h: DmvpnHub = serde_json::from_value(hub).unwrap();
    assert_eq!(h.spec.nhrp.effective_registration_interval(), 200);
    assert_eq!(h.spec.gre_key, None);
}

fn header(text: &str, key: &str) -> Option<String> {
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
        .map(str::to_owned)
}

#[test]
fn invalid_examples_are_rejected_by_the_named_layer() {
    let paths = invalid_examples();
    assert!(paths.len() >= 10, "negative examples went missing");
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        let layer = header(&text, "layer").expect("# layer: header");
        let expect = header(&text, "expect").expect("# expect: header");
        let obj = load_yaml(&path);
        let schema = schema_errors(&obj);
        if std::env::var_os("SHOW_ERRORS").is_some() {
            eprintln!(
                "{}:\n  schema: {schema:?}\n  cel: {:?}",
                path.display(),
                cel_errors(&obj, None)
            );
        }
        match layer.as_str() {
            "schema" => {
                assert!(
                    schema.iter().any(|e| e.contains(&expect)),
                    "{}: expected a schema error mentioning {expect:?}, got {schema:#?}",
                    path.display()
                );
            }
            "cel" => {
                // Only CEL catches it, so this example proves the rule matters.
                assert!(
                    schema.is_empty(),
                    "{}: expected to pass the schema, got {schema:#?}",
                    path.display()
                );
                let cel = cel_errors(&obj, None);
                // a rule that evaluated to false, not one that failed to run
                assert!(
                    cel.iter()
                        .any(|e| e.contains(&expect) && e.contains("[ValidationFailure]")),
                    "{}: expected a CEL validation failure mentioning {expect:?}, got {cel:#?}",
                    path.display()
                );
            }
            other => panic!("{}: unknown layer {other:?}", path.display()),
        }
    }
}
