//! Condition types and reasons, as named constants so the controller, the
//! agent, the tests and the Argo CD health check agree on every string.
//!
//! Polarity follows kstatus: `Ready=True` is healthy; `Reconciling=True`
//! means work in progress; `Stalled=True` means stuck until something changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A condition of a FirewallPolicy: the fields of Kubernetes' `Condition`,
/// with `lastTransitionTime` optional. The CRD's default status (before the
/// controller first writes one) says `Reconciling=True`/`Pending` and has
/// no transition to date: it carries no time rather than a made-up one
/// (1970-01-01). Every condition the controller writes carries its time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Reconciling`, `Stalled`, `CloudSynced` or `NodesSynced`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// When the status last changed; absent only in the default status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// The `metadata.generation` the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Why, in CamelCase (see [`reason`]).
    #[serde(default)]
    pub reason: String,
    /// Why, for humans.
    #[serde(default)]
    pub message: String,
}

/// The policy is fully applied on both layers for its current generation.
pub const READY: &str = "Ready";
/// The controller or agents are still working toward the current generation.
pub const RECONCILING: &str = "Reconciling";
/// Progress is impossible until the policy or the environment changes.
pub const STALLED: &str = "Stalled";
/// The Security Group holds exactly the planned rules.
pub const CLOUD_SYNCED: &str = "CloudSynced";
/// Every selected node's agent applied the current generation.
pub const NODES_SYNCED: &str = "NodesSynced";

/// No other Security Group on the selected nodes' interfaces admits more
/// than the policy (`False`: one does; see the policy's warnings).
pub const EFFECTIVE_ACCESS: &str = "EffectiveAccess";

/// Reasons (CamelCase, as Kubernetes requires).
pub mod reason {
    /// Not reconciled yet (the CRD's default status).
    pub const PENDING: &str = "Pending";
    /// Everything applied.
    pub const SYNCED: &str = "Synced";
    /// Work under way.
    pub const PROGRESSING: &str = "Progressing";
    /// The policy would exceed a Security Group rule quota.
    pub const QUOTA_EXCEEDED: &str = "QuotaExceeded";
    /// A referenced group, prefix list, VPC or instance does not exist.
    pub const INVALID_REFERENCE: &str = "InvalidReference";
    /// AWS refused our credentials or permissions.
    pub const AUTH_FAILED: &str = "AuthFailed";
    /// The policy is valid for the schema but cannot be compiled.
    pub const INVALID_POLICY: &str = "InvalidPolicy";
    /// Some nodes failed to apply the policy.
    pub const NODES_FAILED: &str = "NodesFailed";
    /// Waiting on nodes to apply the policy.
    pub const NODES_PENDING: &str = "NodesPending";
    /// `EffectiveAccess`: nothing wider than the policy on the interfaces.
    pub const AS_INTENDED: &str = "AsIntended";
    /// `EffectiveAccess`: another group on the interfaces admits more.
    pub const WIDENED_BY_OTHER_GROUPS: &str = "WidenedByOtherGroups";
    /// `EffectiveAccess`: the policy's group is attached to no node.
    pub const NOT_ATTACHED: &str = "NotAttached";
    /// `CloudSynced`: the policy has no cloud-layer rule, so Palisade keeps
    /// no Security Group for it.
    pub const NO_CLOUD_RULES: &str = "NoCloudRules";
    /// A transient error; retrying with backoff.
    pub const RETRYING: &str = "Retrying";
    /// The agent's DaemonSet was deleted: it removed the node's rules.
    pub const REMOVED: &str = "Removed";
}
