//! The one error type of the policy compiler.
//!
//! Every field-level variant names the field path (`spec.ingress[2].peers[0].cidr`)
//! and its message says what to write instead, so the controller can copy it
//! into a condition and the CLI can print it as is.

use serde::Serialize;

use crate::api::conditions::reason;

use super::{Direction, IpFamily};

/// Why a policy cannot be compiled, or why its plan cannot be applied.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum PolicyError {
    /// Several problems in one policy, each with its field path.
    #[error("policy {policy}: {}", join_errors(errors))]
    Invalid {
        /// Policy name (`<unnamed>` when metadata.name is missing).
        policy: String,
        /// Every problem found, in field order.
        errors: Vec<PolicyError>,
    },

    /// A field holds a value the API does not accept.
    #[error("{path}: {problem}; {fix}")]
    InvalidField {
        /// Field path, e.g. `spec.ingress[2].peers[0].cidr`.
        path: String,
        /// What is wrong with the value.
        problem: String,
        /// What to write instead.
        fix: String,
    },

    /// A CIDR with host bits set (or not written in canonical form).
    #[error("{path}: {value} is not a canonical CIDR; write {canonical}")]
    NonCanonicalCidr {
        /// Field path.
        path: String,
        /// The value as written.
        value: String,
        /// The canonical form to write instead.
        canonical: String,
    },

    /// Two entries of a list share a key that must be unique.
    #[error("{path}: {what} {value:?} is already used at {first}; give each a distinct {what}")]
    Duplicate {
        /// Field path of the second occurrence.
        path: String,
        /// What must be unique (`rule name`, `layer`, ...).
        what: String,
        /// The duplicated value.
        value: String,
        /// Field path of the first occurrence.
        first: String,
    },

    /// A list longer or shorter than allowed.
    #[error("{path}: {found} {what}, but {bound}; {fix}")]
    Count {
        /// Field path of the list.
        path: String,
        /// What is counted.
        what: String,
        /// How many there are.
        found: usize,
        /// The bound, in words (`at most 50 are allowed`).
        bound: String,
        /// What to do instead.
        fix: String,
    },

    /// The plan needs more Security Group rules than the group may hold.
    #[error(
        "policy {policy}: {direction} needs {used} {family} Security Group rules, over the quota of {limit} per direction; \
         merge CIDRs, use a prefix list, or raise the quota (and the controller's --sg-rules-per-direction)"
    )]
    QuotaExceeded {
        /// Policy name.
        policy: String,
        /// The direction over quota.
        direction: Direction,
        /// The address family over quota.
        family: IpFamily,
        /// Rules needed, counted as AWS counts them.
        used: u32,
        /// Rules allowed.
        limit: u32,
    },

    /// Two different owners hash to the same chain, set or hashlimit name.
    #[error(
        "name collision: {name} stands for both {first} and {second}; rename one policy or rule"
    )]
    NameCollision {
        /// The colliding name.
        name: String,
        /// First owner.
        first: String,
        /// Second owner.
        second: String,
    },

    /// Two policies with the same name were given to one compilation.
    #[error("policy {policy} is given twice; policy names are unique in a cluster")]
    DuplicatePolicy {
        /// The policy name.
        policy: String,
    },

    /// A node the caller asked about is not in the facts.
    #[error("node {node} is not in the facts; pass its labels and addresses")]
    UnknownNode {
        /// The node name.
        node: String,
    },

    /// A Security Group rule read from AWS that cannot be represented.
    #[error("Security Group rule {rule_id}: {problem}")]
    UnreadableSgRule {
        /// The `sgr-...` id, or empty when unknown.
        rule_id: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn join_errors(errors: &[PolicyError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl PolicyError {
    /// The condition reason (`InvalidPolicy`, `QuotaExceeded`, ...) under which
    /// the controller reports this error. Doubles as a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            PolicyError::QuotaExceeded { .. } => reason::QUOTA_EXCEEDED,
            PolicyError::UnreadableSgRule { .. } => reason::INVALID_REFERENCE,
            _ => reason::INVALID_POLICY,
        }
    }

    /// Every field-level problem, flattened (an `Invalid` yields its parts).
    pub fn problems(&self) -> Vec<&PolicyError> {
        match self {
            PolicyError::Invalid { errors, .. } => {
                errors.iter().flat_map(PolicyError::problems).collect()
            }
            other => vec![other],
        }
    }

    /// The field path of a field-level problem, when it has one.
    pub fn path(&self) -> Option<&str> {
        match self {
            PolicyError::InvalidField { path, .. }
            | PolicyError::NonCanonicalCidr { path, .. }
            | PolicyError::Duplicate { path, .. }
            | PolicyError::Count { path, .. } => Some(path),
            _ => None,
        }
    }

    pub(crate) fn field(
        path: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        PolicyError::InvalidField {
            path: path.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}
