//! The apiserver's verdict on a FirewallPolicy, reproduced offline.
//!
//! `palisade validate` must accept exactly what `kubectl apply` gets
//! admitted. The apiserver judges a custom resource in three steps, and so
//! does [`admit`], from the same CRD this crate generates:
//!
//! 1. **Structural schema** ([`check_schema`]): unknown fields are refused
//!    (strict field validation, as `kubectl apply` asks for), types are
//!    checked with the apiserver's coercions (an integer may be written
//!    `80.0`; a `null` field is pruned, as if absent), then `enum`,
//!    `pattern`, `minLength`/`maxLength` (in characters), item and property
//!    counts, `required`, list-type `set` and `map` uniqueness.
//! 2. **CEL**: every `x-kubernetes-validations` rule, evaluated by kube-cel.
//! 3. **Object metadata**: the name a DNS subdomain, labels and
//!    annotations well formed, no unknown metadata field.
//!
//! The result is the normalised object the apiserver would store (the
//! compiler's input), or every problem with its field path.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use serde_json::{Map, Value};

use super::selector::{is_dns_subdomain, is_label_key, is_label_value};
use crate::api::FirewallPolicy;

/// One reason the apiserver would refuse an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Field path as the apiserver writes it (`spec.ingress[0].ports[0].port`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

fn problem(path: &str, message: impl Into<String>) -> Problem {
    Problem {
        path: path.to_string(),
        message: message.into(),
    }
}

/// The openAPIV3Schema of the FirewallPolicy CRD, as installed.
fn policy_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        crate::api::crds()
            .into_iter()
            .find(|c| c.spec.names.kind == "FirewallPolicy")
            .and_then(|c| c.spec.versions.into_iter().next())
            .and_then(|v| v.schema)
            .and_then(|s| s.open_api_v3_schema)
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(Value::Null)
    })
}

thread_local! {
    /// The CRD's CEL rules, compiled once per thread (a validator is not
    /// shared between threads).
    static CEL: (kube::core::cel::Validator, kube::core::cel::CompiledSchema) = (
        kube::core::cel::Validator::new(),
        kube::core::cel::compile_schema(policy_schema()),
    );
}

/// Judges `value` (one decoded manifest) as the apiserver judges a create
/// of it with strict field validation: the normalised, typed object, or
/// every problem found.
pub fn admit(value: &Value) -> Result<FirewallPolicy, Vec<Problem>> {
    let mut problems = Vec::new();
    let api_version = value.get("apiVersion").and_then(Value::as_str);
    let kind = value.get("kind").and_then(Value::as_str);
    if api_version != Some("palisade.dev/v1alpha1") || kind != Some("FirewallPolicy") {
        return Err(vec![problem(
            "",
            format!(
                "not a FirewallPolicy: apiVersion {:?}, kind {:?} (want palisade.dev/v1alpha1, FirewallPolicy)",
                api_version.unwrap_or_default(),
                kind.unwrap_or_default()
            ),
        )]);
    }
    let Some(object) = value.as_object() else {
        return Err(vec![problem("", "a manifest must be an object")]);
    };
    let mut normalised = Map::new();
    for (key, field) in object {
        if field.is_null() {
            // Pruned, as if absent.
            continue;
        }
        match key.as_str() {
            "apiVersion" | "kind" => {
                normalised.insert(key.clone(), field.clone());
            }
            "metadata" => {
                check_metadata(field, &mut problems);
                normalised.insert(key.clone(), field.clone());
            }
            // The status subresource: what a create carries there is dropped.
            "status" => {}
            "spec" => {
                let schema = &policy_schema()["properties"]["spec"];
                if let Some(spec) = check_schema(field, schema, "spec", &mut problems) {
                    normalised.insert(key.clone(), spec);
                }
            }
            other => problems.push(problem(other, "unknown field")),
        }
    }
    for required in policy_schema()["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if object.get(required).is_none_or(Value::is_null) {
            problems.push(problem(required, "Required value"));
        }
    }
    let normalised = Value::Object(normalised);
    // The apiserver evaluates CEL only over a schema-valid object. Over
    // what is left of an invalid one (wrong-typed fields dropped) the rules
    // that still hold an opinion are reported too, so one run shows every
    // problem; the verdict is "refused" either way.
    let schema_valid = problems.is_empty();
    if let Err(errors) =
        CEL.with(|(validator, compiled)| validator.validate_compiled(compiled, &normalised, None))
    {
        for e in errors.into_vec() {
            if schema_valid || e.kind == kube::core::cel::ErrorKind::ValidationFailure {
                problems.push(problem(e.field_path.trim_start_matches('.'), e.message));
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    serde_json::from_value(normalised).map_err(|e| {
        vec![problem(
            "",
            format!("the object passed the schema but does not decode: {e} (a Palisade bug: please report it)"),
        )]
    })
}

/// Checks `value` against a structural `schema`, returning the value the
/// apiserver would go on with (integers as integers, nulls pruned), or
/// `None` when it has the wrong type.
pub fn check_schema(
    value: &Value,
    schema: &Value,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Option<Value> {
    let want = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let before = problems.len();
    let out = match (want, value) {
        ("object", Value::Object(map)) => Some(check_object(map, schema, path, problems)),
        ("array", Value::Array(items)) => Some(check_array(items, schema, path, problems)),
        ("string", Value::String(s)) => {
            check_string(s, schema, path, problems);
            Some(value.clone())
        }
        ("integer", Value::Number(n)) => match integer(n) {
            Some(i) => {
                check_number(i as f64, schema, path, problems);
                Some(Value::from(i))
            }
            None => {
                problems.push(type_error(path, "integer", value));
                None
            }
        },
        ("number", Value::Number(n)) => {
            check_number(n.as_f64().unwrap_or(f64::NAN), schema, path, problems);
            Some(value.clone())
        }
        ("boolean", Value::Bool(_)) => Some(value.clone()),
        ("", _) => Some(value.clone()),
        (_, _) => {
            problems.push(type_error(path, want, value));
            None
        }
    };
    if let (Some(allowed), Some(v)) = (schema.get("enum").and_then(Value::as_array), &out)
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(ToString::to_string).collect();
        problems.push(problem(
            path,
            format!(
                "Unsupported value: {v}: supported values: {}",
                list.join(", ")
            ),
        ));
    }
    for sub in schema
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Value::String(s) = value {
            check_string(s, sub, path, problems);
        }
    }
    // A container goes on with what is valid inside it, so the CEL rules
    // still see it; a scalar with a problem is dropped.
    if value.is_object() || value.is_array() {
        out
    } else {
        (problems.len() == before).then_some(out).flatten()
    }
}

/// An integer as the apiserver reads one: a JSON number with no fraction,
/// however it is written (`80`, `80.0`, `8e1`).
fn integer(n: &serde_json::Number) -> Option<i64> {
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    let f = n.as_f64()?;
    (f.fract() == 0.0 && f.abs() < 9.0e18).then_some(f as i64)
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_error(path: &str, want: &str, value: &Value) -> Problem {
    problem(
        path,
        format!(
            "Invalid value: {:?}: {path} in body must be of type {want}: {:?}",
            type_name(value),
            type_name(value)
        ),
    )
}

fn check_object(
    map: &Map<String, Value>,
    schema: &Value,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Value {
    let properties = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    let mut out = Map::new();
    for (key, value) in map {
        if value.is_null() {
            // A null field of a non-nullable schema is pruned: as if absent.
            continue;
        }
        if let Some(sub) = properties.and_then(|p| p.get(key)) {
            let at = join(path, key);
            if let Some(v) = check_schema(value, sub, &at, problems) {
                out.insert(key.clone(), v);
            }
        } else if let Some(sub) = additional {
            let at = format!("{path}[{key}]");
            if let Some(v) = check_schema(value, sub, &at, problems) {
                out.insert(key.clone(), v);
            }
        } else {
            problems.push(problem(&join(path, key), "unknown field"));
        }
    }
    for required in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if !out.contains_key(required) && map.get(required).is_none_or(Value::is_null) {
            problems.push(problem(&join(path, required), "Required value"));
        }
    }
    let count = map.values().filter(|v| !v.is_null()).count() as u64;
    if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
        && count > max
    {
        problems.push(problem(
            path,
            format!("Too many: {count}: must have at most {max} items"),
        ));
    }
    if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
        && count < min
    {
        problems.push(problem(
            path,
            format!("Invalid value: {count}: {path} in body should have at least {min} properties"),
        ));
    }
    Value::Object(out)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn check_array(items: &[Value], schema: &Value, path: &str, problems: &mut Vec<Problem>) -> Value {
    let item_schema = schema.get("items").cloned().unwrap_or(Value::Null);
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("{path}[{i}]");
        if item.is_null() {
            problems.push(type_error(
                &at,
                item_schema
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("object"),
                item,
            ));
            continue;
        }
        if let Some(v) = check_schema(item, &item_schema, &at, problems) {
            out.push(v);
        }
    }
    let count = items.len() as u64;
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
        && count > max
    {
        problems.push(problem(
            path,
            format!("Too many: {count}: must have at most {max} items"),
        ));
    }
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
        && count < min
    {
        problems.push(problem(
            path,
            format!("Invalid value: {count}: {path} in body should have at least {min} items"),
        ));
    }
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => {
            let mut seen = BTreeSet::new();
            for (i, v) in out.iter().enumerate() {
                if !seen.insert(v.to_string()) {
                    problems.push(problem(
                        &format!("{path}[{i}]"),
                        format!("Duplicate value: {v}"),
                    ));
                }
            }
        }
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let mut seen = BTreeSet::new();
            for (i, v) in out.iter().enumerate() {
                let key: Vec<String> = keys.iter().map(|k| v[*k].to_string()).collect();
                if !seen.insert(key.clone()) {
                    problems.push(problem(
                        &format!("{path}[{i}]"),
                        format!("Duplicate value: {}", key.join(", ")),
                    ));
                }
            }
        }
        _ => {}
    }
    Value::Array(out)
}

fn check_string(s: &str, schema: &Value, path: &str, problems: &mut Vec<Problem>) {
    // The apiserver counts characters (runes), not bytes.
    let chars = s.chars().count() as u64;
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && chars > max
    {
        problems.push(problem(
            path,
            format!("Too long: may not be more than {max} characters ({chars} given)"),
        ));
    }
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && chars < min
    {
        problems.push(problem(
            path,
            format!("Invalid value: {s:?}: {path} in body should be at least {min} chars long"),
        ));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match regex::Regex::new(pattern) {
            Ok(re) if re.is_match(s) => {}
            Ok(_) => problems.push(problem(
                path,
                format!("Invalid value: {s:?}: {path} in body should match '{pattern}'"),
            )),
            Err(e) => problems.push(problem(
                path,
                format!("the schema's pattern does not compile: {e}"),
            )),
        }
    }
}

fn check_number(n: f64, schema: &Value, path: &str, problems: &mut Vec<Problem>) {
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
        && n > max
    {
        problems.push(problem(
            path,
            format!("Invalid value: {n}: {path} in body should be less than or equal to {max}"),
        ));
    }
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
        && n < min
    {
        problems.push(problem(
            path,
            format!("Invalid value: {n}: {path} in body should be greater than or equal to {min}"),
        ));
    }
}

/// The fields of `metadata` a client may write (ObjectMeta).
const METADATA_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

fn check_metadata(metadata: &Value, problems: &mut Vec<Problem>) {
    let Some(map) = metadata.as_object() else {
        problems.push(type_error("metadata", "object", metadata));
        return;
    };
    for (key, value) in map {
        let at = format!("metadata.{key}");
        if !METADATA_FIELDS.contains(&key.as_str()) {
            problems.push(problem(&at, "unknown field"));
            continue;
        }
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "name" | "generateName" | "namespace" if !value.is_string() => {
                problems.push(type_error(&at, "string", value));
            }
            "labels" | "annotations" => match value.as_object() {
                None => problems.push(type_error(&at, "object", value)),
                Some(entries) => {
                    for (k, v) in entries {
                        let at = format!("{at}[{k}]");
                        match v {
                            Value::String(v) => {
                                if key == "labels" && !is_label_value(v) {
                                    problems.push(problem(
                                        &at,
                                        format!("Invalid value: {v:?}: not a label value"),
                                    ));
                                }
                            }
                            Value::Null => {}
                            other => problems.push(type_error(&at, "string", other)),
                        }
                        if !is_label_key(k) {
                            problems.push(problem(
                                &at,
                                format!("Invalid value: {k:?}: not a qualified name"),
                            ));
                        }
                    }
                }
            },
            _ => {}
        }
    }
    match map.get("name").and_then(Value::as_str) {
        None | Some("") => problems.push(problem("metadata.name", "Required value: name is required")),
        Some(name) if !is_dns_subdomain(name) => problems.push(problem(
            "metadata.name",
            format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character, at most 253 characters"),
        )),
        Some(_) => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn problems(yaml: &str) -> Vec<String> {
        let value: Value = serde_yaml::from_str(yaml).unwrap();
        match admit(&value) {
            Ok(_) => vec![],
            Err(ps) => ps.iter().map(ToString::to_string).collect(),
        }
    }

    fn policy(spec: &str) -> String {
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {{name: p}}\nspec:\n{spec}"
        )
    }

    #[test]
    fn integers_written_as_floats_are_coerced_as_the_apiserver_does() {
        let value: Value = serde_yaml::from_str(&policy(
            "  policyTypes: [Ingress]\n  ingress: [{name: r, protocol: TCP, ports: [{port: 80.0, endPort: 8e1}], peers: [{cidr: 10.0.0.0/8}]}]\n",
        ))
        .unwrap();
        let p = admit(&value).unwrap();
        let port = &p.spec.ingress.unwrap()[0].ports.clone().unwrap()[0];
        assert_eq!((port.port, port.end_port), (80, Some(80)));
        let ps = problems(&policy(
            "  policyTypes: [Ingress]\n  ingress: [{name: r, protocol: TCP, ports: [{port: 80.5}], peers: [{cidr: 10.0.0.0/8}]}]\n",
        ));
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert!(
            ps[0].starts_with("spec.ingress[0].ports[0].port: Invalid value: \"number\""),
            "{ps:?}"
        );
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused_with_their_paths() {
        let ps = problems(
            "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {name: p, lables: {a: b}}\nspec:\n  policyTypes: [Ingress]\n  nodeSelector: []\n  securityGroup: []\n  extra: 1\n",
        );
        assert_eq!(
            ps,
            [
                "metadata.lables: unknown field",
                "spec.extra: unknown field",
                "spec.nodeSelector: Invalid value: \"array\": spec.nodeSelector in body must be of type object: \"array\"",
                "spec.securityGroup: Invalid value: \"array\": spec.securityGroup in body must be of type object: \"array\"",
            ]
        );
    }

    #[test]
    fn nulls_are_pruned_and_lengths_count_characters() {
        // mode: null is as if absent (the default applies).
        assert!(problems(&policy("  policyTypes: [Ingress]\n  mode: null\n")).is_empty());
        let tags = |k: &str, v: &str| {
            problems(&policy(&format!(
                "  policyTypes: [Ingress]\n  securityGroup:\n    tags: {{\"{k}\": \"{v}\"}}\n"
            )))
        };
        assert!(tags(&"é".repeat(128), &"é".repeat(256)).is_empty());
        assert_eq!(tags(&"é".repeat(129), "v").len(), 1);
        assert_eq!(tags("k", &"é".repeat(257)).len(), 1);
        assert_eq!(tags("", "v").len(), 1);
    }

    #[test]
    fn label_syntax_is_checked_where_admission_checks_it() {
        let sel = |s: &str| {
            problems(&policy(&format!(
                "  policyTypes: [Ingress]\n  nodeSelector:\n{s}"
            )))
        };
        assert_eq!(
            sel("    matchLabels: {\"my role\": web}\n").len(),
            1,
            "{:?}",
            sel("    matchLabels: {\"my role\": web}\n")
        );
        assert_eq!(
            sel("    matchLabels: {role: \"a b\"}\n").len(),
            1,
            "{:?}",
            sel("    matchLabels: {role: \"a b\"}\n")
        );
        assert_eq!(
            sel(&format!("    matchLabels: {{{}: web}}\n", "k".repeat(64))).len(),
            1
        );
        assert_eq!(
            sel(&format!(
                "    matchLabels: {{\"{}/k\": web}}\n",
                "p".repeat(254)
            ))
            .len(),
            1
        );
        assert!(
            sel(&format!(
                "    matchLabels: {{\"{}/k\": web}}\n",
                "p".repeat(253)
            ))
            .is_empty()
        );
        // Two slashes break both of the key's patterns.
        assert_eq!(
            sel("    matchExpressions: [{key: \"a/b/c\", operator: Exists}]\n").len(),
            2
        );
        assert!(
            sel(
                "    matchExpressions: [{key: node-role.kubernetes.io/worker, operator: Exists}]\n"
            )
            .is_empty()
        );
    }

    #[test]
    fn every_problem_is_reported_even_when_the_schema_fails() {
        let ps = problems(&policy(
            "  policyTypes: [Ingress]\n  ingress: [{name: r, protocol: TCP, ports: [{port: 65536}], peers: [{cidr: \"2001:DB8::/32\"}]}]\n",
        ));
        assert_eq!(ps.len(), 2, "{ps:#?}");
        assert!(
            ps[1].starts_with("spec.ingress[0].peers[0].cidr: cidr must be canonical"),
            "{ps:#?}"
        );
    }
}
