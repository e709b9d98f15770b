//! Problems that do not stop a policy from applying, for `status.warnings`:
//! duplicate and shadowed rules, a quota nearly reached, references the node
//! layer cannot resolve, peers that stand for nobody.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::api::Layer;

use super::{Direction, IpFamily};

/// One warning about one policy. `Display` gives the sentence for
/// `status.warnings`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Warning {
    /// Several rules (or one rule twice) produce the same permission on a
    /// layer; it is applied once.
    DuplicateRule {
        /// Policy name.
        policy: String,
        /// Direction.
        direction: Direction,
        /// Layer where the duplicate shows.
        layer: Layer,
        /// The rules involved, sorted (one name when a rule repeats itself).
        rules: Vec<String>,
        /// The first duplicated permission, as text.
        example: String,
        /// How many permissions are duplicated.
        count: usize,
    },
    /// Everything a rule allows on a layer is already allowed by other rules
    /// of the policy (its rate limit or log then never applies either).
    ShadowedRule {
        /// Policy name.
        policy: String,
        /// Direction.
        direction: Direction,
        /// Layer where the rule is shadowed.
        layer: Layer,
        /// The shadowed rule.
        rule: String,
        /// The rules that allow its traffic, sorted.
        by: Vec<String>,
    },
    /// A direction of the Security Group is at or above 80 % of its quota.
    QuotaNear {
        /// Policy name.
        policy: String,
        /// Direction.
        direction: Direction,
        /// Family.
        family: IpFamily,
        /// Rules used, as AWS counts them.
        used: u32,
        /// Rules allowed.
        limit: u32,
    },
    /// A Security Group or prefix-list peer with no resolution in the facts:
    /// the node layer matches nobody for it (fail closed), and a prefix list
    /// counts as one rule toward the quota until its size is known.
    UnresolvedReference {
        /// Policy name.
        policy: String,
        /// Direction.
        direction: Direction,
        /// The rule naming the reference.
        rule: String,
        /// The `sg-` or `pl-` id.
        id: String,
        /// Layer affected.
        layer: Layer,
    },
    /// A `nodeSelector` peer that matches no node with an address: the rule
    /// allows nothing for it until such a node exists.
    EmptyPeer {
        /// Policy name.
        policy: String,
        /// Direction.
        direction: Direction,
        /// The rule.
        rule: String,
        /// The selector, as text.
        selector: String,
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::DuplicateRule {
                policy,
                direction,
                layer,
                rules,
                example,
                count,
            } => {
                let rules: Vec<String> = rules.iter().map(|r| format!("{direction}/{r}")).collect();
                let more = if *count > 1 {
                    format!(" (and {} more)", count - 1)
                } else {
                    String::new()
                };
                if rules.len() == 1 {
                    write!(
                        f,
                        "policy {policy}: rule {} produces {example}{more} twice on the {layer:?} layer",
                        rules[0]
                    )
                } else {
                    write!(
                        f,
                        "policy {policy}: rules {} produce the same {layer:?} permission {example}{more}; it is applied once",
                        rules.join(", ")
                    )
                }
            }
            Warning::ShadowedRule {
                policy,
                direction,
                layer,
                rule,
                by,
            } => {
                let by: Vec<String> = by.iter().map(|r| format!("{direction}/{r}")).collect();
                write!(
                    f,
                    "policy {policy}: rule {direction}/{rule} is shadowed on the {layer:?} layer: {} already allow all of its traffic",
                    by.join(", ")
                )
            }
            Warning::QuotaNear {
                policy,
                direction,
                family,
                used,
                limit,
            } => write!(
                f,
                "policy {policy}: {direction} uses {used} of {limit} {family} Security Group rules (80 % or more of the quota)"
            ),
            Warning::UnresolvedReference {
                policy,
                direction,
                rule,
                id,
                layer: Layer::Node,
            } => write!(
                f,
                "policy {policy}: rule {direction}/{rule} references {id}, which is not resolved to addresses: the node layer matches nobody for it"
            ),
            Warning::UnresolvedReference {
                policy,
                direction,
                rule,
                id,
                layer: Layer::Cloud,
            } => write!(
                f,
                "policy {policy}: rule {direction}/{rule} references {id}, whose size is unknown: it is counted as one rule toward the quota"
            ),
            Warning::EmptyPeer {
                policy,
                direction,
                rule,
                selector,
            } => write!(
                f,
                "policy {policy}: rule {direction}/{rule} peer nodeSelector {selector} matches no node with an address"
            ),
        }
    }
}

/// Containment between two matches of one layer: `a.covers(b)` when every
/// packet `b` matches, `a` matches too.
pub(crate) trait Covers {
    fn covers(&self, other: &Self) -> bool;
}

/// Above this many matches per direction and layer, shadowed rules are not
/// looked for (the search is quadratic).
pub(crate) const MAX_SHADOW_ITEMS: usize = 2000;

/// One produced match, with the rule it came from and whether that rule
/// allows its traffic unconditionally (a rate-limited rule does not).
pub(crate) struct Produced<T> {
    pub rule: String,
    pub item: T,
    pub unconditional: bool,
}

/// Duplicate and shadowed-rule warnings for the matches one direction of a
/// policy produces on one layer.
pub(crate) fn lint<T: Covers + Ord + fmt::Display>(
    policy: &str,
    direction: Direction,
    layer: Layer,
    produced: &[Produced<T>],
) -> Vec<Warning> {
    let mut warnings = Vec::new();

    // Duplicates: identical items, grouped by the set of rules involved.
    let mut by_item: BTreeMap<&T, Vec<&str>> = BTreeMap::new();
    for p in produced {
        by_item.entry(&p.item).or_default().push(&p.rule);
    }
    let mut groups: BTreeMap<Vec<String>, Vec<&T>> = BTreeMap::new();
    for (item, rules) in &by_item {
        if rules.len() > 1 {
            let names: BTreeSet<String> = rules.iter().map(|r| r.to_string()).collect();
            groups
                .entry(names.into_iter().collect())
                .or_default()
                .push(item);
        }
    }
    for (rules, items) in groups {
        if let Some(first) = items.first() {
            warnings.push(Warning::DuplicateRule {
                policy: policy.to_string(),
                direction,
                layer,
                rules,
                example: first.to_string(),
                count: items.len(),
            });
        }
    }

    // Shadowed rules: every item is covered by an unconditional item of
    // another rule, and at least one of them strictly (the all-equal case is
    // a duplicate, already reported). Quadratic, so skipped for huge inputs
    // rather than stalling a reconcile.
    if produced.len() > MAX_SHADOW_ITEMS {
        return warnings;
    }
    let mut rules: BTreeMap<&str, Vec<&T>> = BTreeMap::new();
    for p in produced {
        rules.entry(&p.rule).or_default().push(&p.item);
    }
    for (rule, items) in &rules {
        let mut by = BTreeSet::new();
        let mut strict = false;
        let covered = items.iter().all(|item| {
            // Every coverer is named, not the first found, so the warning
            // does not depend on the order rules and peers were written in.
            let coverers: Vec<&Produced<T>> = produced
                .iter()
                .filter(|o| o.unconditional && o.rule != *rule && o.item.covers(item))
                .collect();
            let equal = produced.iter().any(|o| o.rule != *rule && o.item == **item);
            strict |= !coverers.is_empty() && !equal;
            by.extend(coverers.iter().map(|o| o.rule.clone()));
            !coverers.is_empty()
        });
        if covered && strict {
            warnings.push(Warning::ShadowedRule {
                policy: policy.to_string(),
                direction,
                layer,
                rule: rule.to_string(),
                by: by.into_iter().collect(),
            });
        }
    }
    warnings
}
