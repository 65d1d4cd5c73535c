//! Shared by the integration tests: loading the committed CRDs and manifests and running the
//! two validation layers the API server runs (schema, then CEL rules) with the schema from the
//! committed YAML.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use dmvpn_crds::validation::{CrdValidator, ViolationKind};
use serde::Deserialize;
use serde_json::Value;

pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Reads a single-document YAML file as JSON.
pub fn load_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut docs = serde_yaml::Deserializer::from_str(&text);
    let doc = docs
        .next()
        .unwrap_or_else(|| panic!("{} is empty", path.display()));
    Value::deserialize(doc).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

/// The committed CRD for `plural` (e.g. "dmvpnhubs").
pub fn crd(plural: &str) -> Value {
    load_yaml(&crate_dir().join("yaml").join(format!("{plural}.yaml")))
}

/// `spec.versions[0].schema.openAPIV3Schema` of the committed CRD for `plural`.
pub fn openapi_schema(plural: &str) -> Value {
    let crd = crd(plural);
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The plural of the CRD that holds objects of `kind`.
pub fn plural_of(kind: &str) -> &'static str {
    match kind {
        "DmvpnHub" => "dmvpnhubs",
        "DmvpnSpoke" => "dmvpnspokes",
        other => panic!("unknown kind {other}"),
    }
}

/// A validator for `kind` built from the committed CRD file.
pub fn validator(kind: &str) -> CrdValidator {
    CrdValidator::from_openapi(kind, openapi_schema(plural_of(kind))).expect("validator")
}

/// Schema-layer errors of `obj` ("<instance path>: <message>"), after schema defaulting.
pub fn schema_errors(obj: &Value) -> Vec<String> {
    let kind = obj["kind"].as_str().expect("object has a kind");
    validator(kind)
        .schema_violations(obj)
        .iter()
        .map(|v| v.to_string())
        .collect()
}

/// CEL-layer errors of `obj` (with `old` for transition rules), after schema defaulting.
/// A rule that evaluated to false is tagged `[ValidationFailure]`.
pub fn cel_errors(obj: &Value, old: Option<&Value>) -> Vec<String> {
    let kind = obj["kind"].as_str().expect("object has a kind");
    validator(kind)
        .rule_violations(obj, old)
        .iter()
        .map(|v| {
            let tag = if v.kind == ViolationKind::Rule {
                "[ValidationFailure]"
            } else {
                "[RuleError]"
            };
            format!("{v} {tag} rule `{}`", v.rule.as_deref().unwrap_or_default())
        })
        .collect()
}
