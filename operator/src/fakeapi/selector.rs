//! Label and field selectors as the API server parses them.

use serde_json::Value;

use super::store::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector`: equality (`a=b`, `a==b`, `a!=b`), set (`a in (x,y)`,
/// `a notin (x)`) and existence (`a`, `!a`) requirements, all of which must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Req>);

/// Splits on commas that are not inside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_set(key: &str, rest: &str, term: &str) -> Result<(String, Vec<String>), ApiError> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| invalid(term))?;
    Ok((
        key.trim().to_owned(),
        inner.split(',').map(|v| v.trim().to_owned()).collect(),
    ))
}

fn invalid(term: &str) -> ApiError {
    ApiError::new(
        400,
        "BadRequest",
        format!("unable to parse requirement: invalid selector term {term:?}"),
    )
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for term in split_terms(s) {
            let req = if let Some((k, v)) = term.split_once("!=") {
                Req::Ne(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = term.split_once("==") {
                Req::Eq(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = term.split_once('=') {
                Req::Eq(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                let (k, vs) = parse_set(k, rest, term)?;
                Req::NotIn(k, vs)
            } else if let Some((k, rest)) = term.split_once(" in ") {
                let (k, vs) = parse_set(k, rest, term)?;
                Req::In(k, vs)
            } else if let Some(k) = term.strip_prefix('!') {
                Req::NotExists(k.trim().to_owned())
            } else if term.contains(char::is_whitespace) || term.contains('(') {
                return Err(invalid(term));
            } else {
                Req::Exists(term.to_owned())
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v.as_str()),
            Req::Ne(k, v) => get(k) != Some(v.as_str()),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed `fieldSelector`: `metadata.name`, `metadata.namespace` and, for convenience, any
/// dotted path to a string field, with `=`, `==` or `!=`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(Vec<String>, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for term in split_terms(s) {
            let (path, eq, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(invalid(term));
            };
            let path: Vec<String> = path.trim().split('.').map(str::to_owned).collect();
            reqs.push((path, eq, value.trim().to_owned()));
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, value)| {
            let mut cur = Some(obj);
            for p in path {
                cur = cur.and_then(|c| c.get(p));
            }
            let found = cur.and_then(Value::as_str).unwrap_or_default();
            (found == value) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selector_terms() {
        let obj = json!({"metadata": {"labels": {"app": "dmvpn", "tier": "hub"}}});
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&obj);
        assert!(m(""));
        assert!(m("app=dmvpn"));
        assert!(m("app==dmvpn,tier=hub"));
        assert!(!m("app=dmvpn,tier=spoke"));
        assert!(m("tier!=spoke"));
        assert!(m("tier in (hub, spoke)"));
        assert!(!m("tier notin (hub)"));
        assert!(m("app"));
        assert!(!m("!app"));
        assert!(m("!zone"));
        assert!(LabelSelector::parse("a in b").is_err());
    }

    #[test]
    fn field_selector_terms() {
        let obj =
            json!({"metadata": {"name": "x", "namespace": "ns"}, "type": "kubernetes.io/tls"});
        let m = |s: &str| FieldSelector::parse(s).unwrap().matches(&obj);
        assert!(m("metadata.name=x"));
        assert!(!m("metadata.name=y"));
        assert!(m("metadata.namespace!=other,type=kubernetes.io/tls"));
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
