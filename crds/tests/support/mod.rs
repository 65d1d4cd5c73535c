//! Shared by the integration tests: loading the committed CRDs and manifests, turning a CRD's
//! OpenAPI v3 schema into JSON Schema, and running the two validation layers the API server
//! runs (schema, then CEL rules).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value, json};

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

/// Translates a Kubernetes structural schema into JSON Schema (draft 2020-12):
/// - `nullable: true` becomes a `null` alternative of `type`;
/// - `x-kubernetes-*` extensions are dropped (CEL rules run in [`cel_errors`]);
/// - objects with `properties` reject unknown fields, as kubectl's strict field validation
///   does (the API server would otherwise prune them silently);
/// - the root gets `apiVersion`, `kind` and `metadata`, which a CRD schema leaves implicit.
pub fn to_json_schema(openapi: &Value, api_version: &str, kind: &str) -> Value {
    let mut root = translate(openapi);
    let props = root["properties"]
        .as_object_mut()
        .expect("root schema has properties");
    props.insert("apiVersion".into(), json!({"const": api_version}));
    props.insert("kind".into(), json!({"const": kind}));
    props.insert(
        "metadata".into(),
        json!({
            "type": "object",
            "properties": {"name": {"type": "string", "minLength": 1}},
            "required": ["name"],
        }),
    );
    root["required"] = json!(["apiVersion", "kind", "metadata", "spec"]);
    root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    root
}

fn translate(node: &Value) -> Value {
    let Some(m) = node.as_object() else {
        return node.clone();
    };
    let mut out = Map::new();
    for (k, v) in m {
        if k.starts_with("x-kubernetes-") || k == "nullable" {
            continue;
        }
        let t = match k.as_str() {
            "properties" => Value::Object(
                v.as_object()
                    .expect("properties is a map")
                    .iter()
                    .map(|(name, s)| (name.clone(), translate(s)))
                    .collect(),
            ),
            "items" | "additionalProperties" if v.is_object() => translate(v),
            "allOf" | "anyOf" | "oneOf" => {
                Value::Array(v.as_array().expect("array").iter().map(translate).collect())
            }
            "not" => translate(v),
            _ => v.clone(),
        };
        out.insert(k.clone(), t);
    }
    if m.get("nullable") == Some(&Value::Bool(true))
        && let Some(t) = out.get("type").cloned()
    {
        out.insert("type".into(), json!([t, "null"]));
    }
    if m.contains_key("properties") && !m.contains_key("additionalProperties") {
        out.insert("additionalProperties".into(), Value::Bool(false));
    }
    Value::Object(out)
}

/// Schema-layer errors of `obj` ("<instance path>: <message>"), after schema defaulting.
pub fn schema_errors(obj: &Value) -> Vec<String> {
    let kind = obj["kind"].as_str().expect("object has a kind");
    let openapi = openapi_schema(plural_of(kind));
    let schema = to_json_schema(&openapi, dmvpn_crds::API_VERSION, kind);
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .should_ignore_unknown_formats(true)
        .build(&schema)
        .expect("translated schema compiles");
    let defaulted = kube_cel::apply_defaults(&openapi, obj);
    validator
        .iter_errors(&defaulted)
        .map(|e| format!("{}: {}", e.instance_path(), e))
        .collect()
}

/// CEL-layer errors of `obj` (with `old` for transition rules), after schema defaulting.
pub fn cel_errors(obj: &Value, old: Option<&Value>) -> Vec<String> {
    let kind = obj["kind"].as_str().expect("object has a kind");
    let openapi = openapi_schema(plural_of(kind));
    match kube_cel::Validator::new().validate(&openapi, obj, old) {
        Ok(()) => vec![],
        Err(errs) => errs
            .iter()
            .map(|e| format!("{} [{:?}] rule `{}`", e, e.kind, e.rule))
            .collect(),
    }
}
