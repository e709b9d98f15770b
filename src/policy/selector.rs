//! Label selectors, parsed once and matched purely.
//!
//! The apiserver does not check the syntax of a `NodeSelector` embedded in a
//! custom resource, so [`Selector::parse`] does: label keys and values as
//! Kubernetes defines them, operators `In`, `NotIn`, `Exists`,
//! `DoesNotExist`, values present exactly when the operator needs them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::api::NodeSelector;
use serde::Serialize;

use super::PolicyError;
use super::facts::NodeFacts;

/// One requirement of a selector. `matchLabels: {k: v}` becomes `In {k, [v]}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "operator", rename_all = "camelCase")]
pub enum Requirement {
    /// The label is set to one of `values`.
    In {
        /// Label key.
        key: String,
        /// Accepted values (non-empty).
        values: BTreeSet<String>,
    },
    /// The label is absent or set to none of `values`.
    NotIn {
        /// Label key.
        key: String,
        /// Refused values (non-empty).
        values: BTreeSet<String>,
    },
    /// The label is set (to anything).
    Exists {
        /// Label key.
        key: String,
    },
    /// The label is not set.
    DoesNotExist {
        /// Label key.
        key: String,
    },
}

impl Requirement {
    /// The label key the requirement is about.
    pub fn key(&self) -> &str {
        match self {
            Requirement::In { key, .. }
            | Requirement::NotIn { key, .. }
            | Requirement::Exists { key }
            | Requirement::DoesNotExist { key } => key,
        }
    }

    /// Whether `labels` satisfy this requirement (Kubernetes semantics:
    /// `NotIn` matches an absent label).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::In { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn { key, values } => {
                labels.get(key).is_none_or(|v| !values.contains(v))
            }
            Requirement::Exists { key } => labels.contains_key(key),
            Requirement::DoesNotExist { key } => !labels.contains_key(key),
        }
    }
}

/// A parsed, canonical label selector: requirements sorted (by key) and de-duplicated,
/// so two selectors that say the same thing the same way compare (and hash)
/// equal. No requirement selects everything.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that selects everything (an absent or empty `nodeSelector`).
    pub fn everything() -> Self {
        Selector::default()
    }

    /// Parses `selector`, checking its syntax. `path` is the field path of
    /// the selector, used in errors (`spec.nodeSelector`). Every problem is
    /// returned, not only the first.
    pub fn parse(selector: &NodeSelector, path: &str) -> Result<Selector, Vec<PolicyError>> {
        Self::parse_with(selector, path, true)
    }

    /// [`Selector::parse`] for a peer's `nodeSelector`, where the syntax of
    /// `matchLabels` keys is not checked: admission cannot afford that CEL
    /// rule across 100 rules × 50 peers (the apiserver refuses the CRD's
    /// cost), and the compiler must accept what admission accepts. A key
    /// that is not a label key can never be on a Node, so it matches no
    /// node (and [`Selector::invalid_keys`] lets the caller warn).
    pub fn parse_peer(selector: &NodeSelector, path: &str) -> Result<Selector, Vec<PolicyError>> {
        Self::parse_with(selector, path, false)
    }

    /// The keys of this selector that are not label keys (only a peer
    /// selector's `matchLabels` may hold them; they match no node).
    pub fn invalid_keys(&self) -> Vec<&str> {
        self.requirements
            .iter()
            .map(Requirement::key)
            .filter(|k| !is_label_key(k))
            .collect()
    }

    fn parse_with(
        selector: &NodeSelector,
        path: &str,
        check_match_label_keys: bool,
    ) -> Result<Selector, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut requirements = Vec::new();
        // The CRD's bounds, which keep admission's CEL cost in budget.
        let labels = selector.match_labels.as_ref().map_or(0, |m| m.len());
        let exprs = selector.match_expressions.as_ref().map_or(0, Vec::len);
        for (field, found, max) in [("matchLabels", labels, 32), ("matchExpressions", exprs, 16)] {
            if found > max {
                errors.push(PolicyError::Count {
                    path: format!("{path}.{field}"),
                    what: field.into(),
                    found,
                    bound: format!("at most {max} are allowed"),
                    fix: "select on fewer labels (a dedicated node label is simplest)".into(),
                });
            }
        }
        if selector
            .match_labels
            .as_ref()
            .is_some_and(BTreeMap::is_empty)
        {
            errors.push(PolicyError::field(
                format!("{path}.matchLabels"),
                "matchLabels is empty",
                "list the labels to match, or remove matchLabels (a label whose value was left null is pruned, which would widen the selector)",
            ));
        }
        for (key, value) in selector.match_labels.iter().flatten() {
            let at = format!("{path}.matchLabels[{key}]");
            if check_match_label_keys {
                check_key(key, &at, &mut errors);
            }
            check_value(value, &at, &mut errors);
            requirements.push(Requirement::In {
                key: key.clone(),
                values: BTreeSet::from([value.clone()]),
            });
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let at = format!("{path}.matchExpressions[{i}]");
            check_key(&expr.key, &format!("{at}.key"), &mut errors);
            let values = expr.values.clone().unwrap_or_default();
            if values.len() > 64 {
                errors.push(PolicyError::Count {
                    path: format!("{at}.values"),
                    what: "values".into(),
                    found: values.len(),
                    bound: "at most 64 are allowed".into(),
                    fix: "label the nodes instead of listing values".into(),
                });
            }
            for (j, value) in values.iter().enumerate() {
                check_value(value, &format!("{at}.values[{j}]"), &mut errors);
            }
            let key = expr.key.clone();
            let set: BTreeSet<String> = values.iter().cloned().collect();
            let needs_values = |errors: &mut Vec<PolicyError>| {
                if values.is_empty() {
                    errors.push(PolicyError::field(
                        format!("{at}.values"),
                        format!("operator {} needs at least one value", expr.operator),
                        "list the values, or use Exists / DoesNotExist",
                    ));
                }
            };
            let no_values = |errors: &mut Vec<PolicyError>| {
                if !values.is_empty() {
                    errors.push(PolicyError::field(
                        format!("{at}.values"),
                        format!("operator {} takes no values", expr.operator),
                        "remove values, or use In / NotIn",
                    ));
                }
            };
            match expr.operator.as_str() {
                "In" => {
                    needs_values(&mut errors);
                    requirements.push(Requirement::In { key, values: set });
                }
                "NotIn" => {
                    needs_values(&mut errors);
                    requirements.push(Requirement::NotIn { key, values: set });
                }
                "Exists" => {
                    no_values(&mut errors);
                    requirements.push(Requirement::Exists { key });
                }
                "DoesNotExist" => {
                    no_values(&mut errors);
                    requirements.push(Requirement::DoesNotExist { key });
                }
                other => errors.push(PolicyError::field(
                    format!("{at}.operator"),
                    format!("{other:?} is not a label selector operator"),
                    "use In, NotIn, Exists or DoesNotExist",
                )),
            }
        }
        // By key first, so the text form reads like what was written.
        requirements.sort_by(|a, b| (a.key(), a).cmp(&(b.key(), b)));
        requirements.dedup();
        if errors.is_empty() {
            Ok(Selector { requirements })
        } else {
            Err(errors)
        }
    }

    /// The requirements, sorted.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// The nodes among `nodes` this selector stands for, in the given order.
    pub fn select<'a>(&self, nodes: &'a [NodeFacts]) -> Vec<&'a NodeFacts> {
        nodes.iter().filter(|n| self.matches(&n.labels)).collect()
    }
}

/// Canonical text, as `kubectl get -l` would accept it: `a=b,c in (d,e),!f`.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match r {
                Requirement::In { key, values } if values.len() == 1 => {
                    format!("{key}={}", values.iter().next().map_or("", String::as_str))
                }
                Requirement::In { key, values } => format!("{key} in ({})", join(values)),
                Requirement::NotIn { key, values } => format!("{key} notin ({})", join(values)),
                Requirement::Exists { key } => key.clone(),
                Requirement::DoesNotExist { key } => format!("!{key}"),
            })
            .collect();
        if parts.is_empty() {
            f.write_str("<all>")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

fn join(values: &BTreeSet<String>) -> String {
    values
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters.
/// A label key as Kubernetes defines it: `[prefix/]name`, the prefix a
/// DNS-1123 subdomain, the name 1-63 characters.
pub(crate) fn is_label_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    }
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A DNS-1123 subdomain as Kubernetes checks it: lowercase labels of
/// `[a-z0-9-]` joined by dots, at most 253 characters in all (no bound per
/// label: `IsDNS1123Subdomain` has none).
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && !s.is_empty()
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b.first().is_some_and(|c| *c != b'-')
                && b.last().is_some_and(|c| *c != b'-')
        })
}

fn check_key(key: &str, path: &str, errors: &mut Vec<PolicyError>) {
    if !is_label_key(key) {
        errors.push(PolicyError::field(
            path,
            format!("{key:?} is not a label key"),
            "write [prefix/]name: an optional DNS subdomain prefix, and a name of at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric (e.g. node-role.kubernetes.io/worker)",
        ));
    }
}

/// A label value as Kubernetes defines it: empty, or at most 63 letters,
/// digits, `-`, `_`, `.`, starting and ending alphanumeric.
pub(crate) fn is_label_value(value: &str) -> bool {
    value.is_empty() || is_label_name(value)
}

fn check_value(value: &str, path: &str, errors: &mut Vec<PolicyError>) {
    if value.is_empty() {
        // An unset Helm value renders as null, which the apiserver prunes
        // to nothing: refused, so a blank never widens a selector.
        errors.push(PolicyError::field(
            path,
            "the label value is empty",
            "write the value (an empty or null value would widen the selector), or use matchExpressions with Exists",
        ));
    } else if !is_label_name(value) {
        errors.push(PolicyError::field(
            path,
            format!("{value:?} is not a label value"),
            "write at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric",
        ));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::api::NodeSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, operator: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|v| v.to_string()).collect())
            },
        }
    }

    #[test]
    fn empty_selector_selects_everything() {
        let sel = Selector::parse(&NodeSelector::default(), "spec.nodeSelector").unwrap();
        assert!(sel.matches(&labels(&[])));
        assert_eq!(sel, Selector::everything());
        assert_eq!(sel.to_string(), "<all>");
    }

    #[test]
    fn operators_follow_kubernetes_semantics() {
        let sel = NodeSelector {
            match_labels: Some(labels(&[("role", "web")])),
            match_expressions: Some(vec![
                expr("zone", "In", &["a", "b"]),
                expr("tier", "NotIn", &["db"]),
                expr("ready", "Exists", &[]),
                expr("cordoned", "DoesNotExist", &[]),
            ]),
        };
        let sel = Selector::parse(&sel, "spec.nodeSelector").unwrap();
        assert!(sel.matches(&labels(&[("role", "web"), ("zone", "a"), ("ready", "")])));
        // NotIn matches an absent label, and refuses a listed value.
        assert!(!sel.matches(&labels(&[
            ("role", "web"),
            ("zone", "a"),
            ("ready", ""),
            ("tier", "db")
        ])));
        assert!(!sel.matches(&labels(&[("role", "web"), ("zone", "c"), ("ready", "")])));
        assert!(!sel.matches(&labels(&[("role", "web"), ("zone", "a")])));
        assert!(!sel.matches(&labels(&[
            ("role", "web"),
            ("zone", "a"),
            ("ready", ""),
            ("cordoned", "1")
        ])));
        assert_eq!(
            sel.to_string(),
            "!cordoned,ready,role=web,tier notin (db),zone in (a,b)"
        );
    }

    #[test]
    fn syntax_errors_name_the_field_and_the_fix() {
        let sel = NodeSelector {
            match_labels: Some(labels(&[("bad key!", "ok"), ("k", "-bad")])),
            match_expressions: Some(vec![
                expr("k", "Equals", &["x"]),
                expr("k", "In", &[]),
                expr("k", "Exists", &["x"]),
                expr("Example.com/x", "Exists", &[]),
            ]),
        };
        let errs = Selector::parse(&sel, "spec.nodeSelector").unwrap_err();
        let paths: Vec<_> = errs.iter().filter_map(PolicyError::path).collect();
        assert_eq!(
            paths,
            [
                "spec.nodeSelector.matchLabels[bad key!]",
                "spec.nodeSelector.matchLabels[k]",
                "spec.nodeSelector.matchExpressions[0].operator",
                "spec.nodeSelector.matchExpressions[1].values",
                "spec.nodeSelector.matchExpressions[2].values",
                "spec.nodeSelector.matchExpressions[3].key",
            ]
        );
        assert!(
            errs[2]
                .to_string()
                .contains("use In, NotIn, Exists or DoesNotExist")
        );
    }

    #[test]
    fn prefixed_keys_are_accepted() {
        let sel = NodeSelector {
            match_expressions: Some(vec![expr(
                "node-role.kubernetes.io/control-plane",
                "Exists",
                &[],
            )]),
            ..Default::default()
        };
        let sel = Selector::parse(&sel, "p").unwrap();
        assert!(sel.matches(&labels(&[("node-role.kubernetes.io/control-plane", "")])));
    }

    #[test]
    fn equivalent_selectors_are_equal() {
        let a = NodeSelector {
            match_labels: Some(labels(&[("a", "1")])),
            match_expressions: Some(vec![expr("b", "Exists", &[])]),
        };
        let b = NodeSelector {
            match_labels: None,
            match_expressions: Some(vec![
                expr("b", "Exists", &[]),
                expr("a", "In", &["1"]),
                expr("b", "Exists", &[]),
            ]),
        };
        assert_eq!(
            Selector::parse(&a, "x").unwrap(),
            Selector::parse(&b, "x").unwrap()
        );
    }
}
