//! Client-side validation of `DmvpnHub` / `DmvpnSpoke` objects in the order the API server
//! applies it: schema defaults, the OpenAPI schema, then the CEL rules
//! (`x-kubernetes-validations`, with the old object for transition rules). It lets tests and
//! fake API servers reject what a real cluster would reject. Feature `validation`.
//!
//! The OpenAPI schema is checked as JSON Schema after a small translation: `nullable` becomes
//! a `null` alternative, `x-kubernetes-*` extensions are dropped, and objects reject unknown
//! fields (as kubectl's strict field validation does; a server without it would prune them).

use std::fmt;

use kube::CustomResourceExt;
use serde_json::{Map, Value, json};

use crate::{API_VERSION, DmvpnHub, DmvpnSpoke, HUB_KIND, SPOKE_KIND};

/// Why an object is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationKind {
    /// The OpenAPI schema rejects it (type, range, enum, required, unknown field...).
    Schema,
    /// A CEL rule evaluated to false.
    Rule,
    /// A CEL rule could not be evaluated (the object is rejected, as the API server does).
    RuleError,
}

/// One reason an object is invalid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: ViolationKind,
    /// Where: a JSON pointer (`/spec/phase`) for schema violations, a dotted path
    /// (`spec.nhrp`) for rules.
    pub path: String,
    pub message: String,
    /// The CEL rule, for rule violations.
    pub rule: Option<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "<root>"
        } else {
            &self.path
        };
        match self.kind {
            ViolationKind::Schema => write!(f, "{path}: {}", self.message),
            ViolationKind::Rule => write!(f, "{path}: {}", self.message),
            ViolationKind::RuleError => {
                write!(f, "{path}: rule could not be evaluated: {}", self.message)
            }
        }
    }
}

/// A validator cannot be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The kind is neither `DmvpnHub` nor `DmvpnSpoke`.
    UnknownKind(String),
    /// The schema cannot be used (a bug in the types, or a damaged CRD file).
    Schema(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnknownKind(k) => {
                write!(f, "unknown kind {k:?}: expected {HUB_KIND} or {SPOKE_KIND}")
            }
            Error::Schema(e) => write!(f, "unusable CRD schema: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// Validates objects of one kind. Build it once and reuse it: building compiles the schema
/// and every rule.
pub struct CrdValidator {
    openapi: Value,
    schema: jsonschema::Validator,
    cel: kube_cel::CompiledSchema,
    evaluator: kube_cel::Validator,
}

impl fmt::Debug for CrdValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrdValidator").finish_non_exhaustive()
    }
}

impl CrdValidator {
    /// A validator for `kind` from the schema the Rust types generate.
    pub fn new(kind: &str) -> Result<Self, Error> {
        let crd = match kind {
            HUB_KIND => DmvpnHub::crd(),
            SPOKE_KIND => DmvpnSpoke::crd(),
            other => return Err(Error::UnknownKind(other.to_owned())),
        };
        let openapi = crd
            .spec
            .versions
            .first()
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .ok_or_else(|| Error::Schema("the CRD has no openAPIV3Schema".into()))
            .and_then(|s| serde_json::to_value(s).map_err(|e| Error::Schema(e.to_string())))?;
        Self::from_openapi(kind, openapi)
    }

    /// A validator for `kind` from an `openAPIV3Schema` (e.g. read from a CRD file).
    pub fn from_openapi(kind: &str, openapi: Value) -> Result<Self, Error> {
        if kind != HUB_KIND && kind != SPOKE_KIND {
            return Err(Error::UnknownKind(kind.to_owned()));
        }
        let json_schema = to_json_schema(&openapi, kind)?;
        let schema = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .should_ignore_unknown_formats(true)
            .build(&json_schema)
            .map_err(|e| Error::Schema(e.to_string()))?;
        let cel = kube_cel::compile_schema(&openapi);
        if cel.has_errors() {
            let errs: Vec<String> = cel
                .compilation_errors()
                .iter()
                .map(|e| e.to_string())
                .collect();
            return Err(Error::Schema(format!(
                "CEL rules do not compile: {}",
                errs.join("; ")
            )));
        }
        Ok(Self {
            openapi,
            schema,
            cel,
            evaluator: kube_cel::Validator::new(),
        })
    }

    /// The `openAPIV3Schema` this validator uses.
    pub fn openapi_schema(&self) -> &Value {
        &self.openapi
    }

    /// `obj` with the schema defaults filled in, as the API server stores it.
    pub fn apply_defaults(&self, obj: &Value) -> Value {
        kube_cel::apply_defaults(&self.openapi, obj)
    }

    /// Schema violations of `obj` (after defaulting).
    pub fn schema_violations(&self, obj: &Value) -> Vec<Violation> {
        let defaulted = self.apply_defaults(obj);
        self.schema
            .iter_errors(&defaulted)
            .map(|e| Violation {
                kind: ViolationKind::Schema,
                path: e.instance_path().to_string(),
                message: e.to_string(),
                rule: None,
            })
            .collect()
    }

    /// CEL rule violations of `obj` (after defaulting); `old` is the stored object on update.
    pub fn rule_violations(&self, obj: &Value, old: Option<&Value>) -> Vec<Violation> {
        match self.evaluator.validate_compiled(&self.cel, obj, old) {
            Ok(()) => Vec::new(),
            Err(errs) => errs
                .iter()
                .map(|e| Violation {
                    kind: if e.kind == kube_cel::ErrorKind::ValidationFailure {
                        ViolationKind::Rule
                    } else {
                        ViolationKind::RuleError
                    },
                    path: e.field_path.clone(),
                    message: e.message.clone(),
                    rule: Some(e.rule.clone()),
                })
                .collect(),
        }
    }

    /// Validates `obj` (a create when `old` is `None`, else an update of `old`) and returns it
    /// with defaults applied. CEL rules run only on schema-valid objects, so their messages
    /// are not buried under type errors.
    pub fn validate(&self, obj: &Value, old: Option<&Value>) -> Result<Value, Vec<Violation>> {
        let schema = self.schema_violations(obj);
        if !schema.is_empty() {
            return Err(schema);
        }
        let rules = self.rule_violations(obj, old);
        if !rules.is_empty() {
            return Err(rules);
        }
        Ok(self.apply_defaults(obj))
    }
}

/// Translates a Kubernetes structural schema into a JSON Schema (draft 2020-12) for objects
/// of `kind`; see the module documentation.
pub fn to_json_schema(openapi: &Value, kind: &str) -> Result<Value, Error> {
    let mut root = translate(openapi);
    let props = root
        .get_mut("properties")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| Error::Schema("the root schema has no properties".into()))?;
    props.insert("apiVersion".into(), json!({"const": API_VERSION}));
    props.insert("kind".into(), json!({"const": kind}));
    props.insert(
        "metadata".into(),
        json!({"type": "object", "properties": {"name": {"type": "string"}}}),
    );
    if let Some(obj) = root.as_object_mut() {
        obj.insert(
            "required".into(),
            json!(["apiVersion", "kind", "metadata", "spec"]),
        );
        obj.insert(
            "$schema".into(),
            json!("https://json-schema.org/draft/2020-12/schema"),
        );
    }
    Ok(root)
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
        let t = match (k.as_str(), v) {
            ("properties", Value::Object(props)) => Value::Object(
                props
                    .iter()
                    .map(|(name, s)| (name.clone(), translate(s)))
                    .collect(),
            ),
            ("items" | "additionalProperties" | "not", Value::Object(_)) => translate(v),
            ("allOf" | "anyOf" | "oneOf", Value::Array(a)) => {
                Value::Array(a.iter().map(translate).collect())
            }
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

/// Validates a `DmvpnHub` or `DmvpnSpoke` given as JSON (the kind is read from the object)
/// and returns it with defaults applied. Builds a validator per call; keep a
/// [`CrdValidator`] to validate many objects.
pub fn validate_object(obj: &Value, old: Option<&Value>) -> Result<Value, Vec<Violation>> {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    let validator = CrdValidator::new(kind).map_err(|e| {
        vec![Violation {
            kind: ViolationKind::Schema,
            path: "/kind".into(),
            message: e.to_string(),
            rule: None,
        }]
    })?;
    validator.validate(obj, old)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(network: &str) -> Value {
        json!({
            "apiVersion": API_VERSION, "kind": "DmvpnHub", "metadata": {"name": "h1"},
            "spec": {"tunnelNetwork": network, "endpoint": {"addresses": ["198.51.100.1"]}},
        })
    }

    #[test]
    fn validates_and_defaults() {
        let v = CrdValidator::new(HUB_KIND).unwrap();
        let stored = v.validate(&hub("10.42.0.0/24"), None).unwrap();
        assert_eq!(stored["spec"]["phase"], 3);
        let errs = v.validate(&hub("10.42.0.9/24"), None).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].kind, ViolationKind::Rule);
        assert_eq!(errs[0].path, "spec.tunnelNetwork");
        let errs = v
            .validate(&hub("10.43.0.0/24"), Some(&hub("10.42.0.0/24")))
            .unwrap_err();
        assert!(errs[0].message.contains("immutable"), "{errs:?}");
    }

    #[test]
    fn schema_errors_come_first() {
        let mut obj = hub("10.42.0.9/24");
        obj["spec"]["phase"] = json!("three");
        let errs = validate_object(&obj, None).unwrap_err();
        assert!(errs.iter().all(|e| e.kind == ViolationKind::Schema));
        assert_eq!(errs[0].path, "/spec/phase");
        assert!(errs[0].to_string().starts_with("/spec/phase: "));
    }

    #[test]
    fn unknown_kind_is_an_error_not_a_panic() {
        assert_eq!(
            CrdValidator::new("Pod").unwrap_err(),
            Error::UnknownKind("Pod".into())
        );
        let errs = validate_object(&json!({"kind": 5}), None).unwrap_err();
        assert!(errs[0].message.contains("unknown kind"));
        assert!(to_json_schema(&json!({"type": "object"}), HUB_KIND).is_err());
    }
}
