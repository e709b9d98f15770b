//! `FirewallNode` (palisade.dev/v1alpha1): what one node's agent applied.
//!
//! One cluster-scoped object per node, named after the node, written only by
//! that node's agent. The controller reads them to fill each policy's node
//! counts and to know when every agent has removed a deleted policy's rules.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Identifies the node a FirewallNode reports on. The object's name is the
/// node's name too; the field is repeated so admission policies and field
/// selectors can match it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "FirewallNode",
    plural = "firewallnodes",
    singular = "firewallnode",
    shortname = "fwn",
    // GitOps: CRDs land before the policies that use them (Argo CD sync waves).
    annotation("argocd.argoproj.io/sync-wave", "-1"),
    category = "palisade",
    status = "FirewallNodeStatus",
    selectable = ".spec.nodeName",
    printcolumn = r#"{"name":"Backend","type":"string","jsonPath":".status.backend"}"#,
    printcolumn = r#"{"name":"Policies","type":"integer","jsonPath":".status.policyCount"}"#,
    printcolumn = r#"{"name":"Rules","type":"integer","jsonPath":".status.ruleCount"}"#,
    printcolumn = r#"{"name":"Result","type":"string","jsonPath":".status.lastSync.result"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.metadata.name == self.spec.nodeName").message("a FirewallNode is named after its node: metadata.name must equal spec.nodeName")
)]
#[serde(rename_all = "camelCase")]
pub struct FirewallNodeSpec {
    /// Name of the Node this object reports on (equal to metadata.name).
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
}

/// The node layer as the agent last applied it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FirewallNodeStatus {
    /// The host's iptables backend, detected as kube-proxy does: `nft` or
    /// `legacy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,

    /// Every policy whose rules are in force on the node.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub policies: Vec<AppliedPolicy>,

    /// Number of policies in `policies`, for the printer column.
    #[serde(default)]
    pub policy_count: i32,

    /// iptables + ip6tables rules Palisade owns on the node.
    #[serde(default)]
    pub rule_count: i32,

    /// ipsets Palisade owns on the node.
    #[serde(default)]
    pub set_count: i32,

    /// Entries across those ipsets.
    #[serde(default)]
    pub set_entries: i64,

    /// Out-of-band changes found and repaired since the agent started.
    #[serde(default)]
    pub drift_repairs: i64,

    /// The last sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<SyncResult>,

    /// Written by the controller: what the whole internet (`0.0.0.0/0`,
    /// `::/0`) and the VPC can reach on this node after both layers (every
    /// Security Group on its interface, intersected with its node layer).
    /// At most 16 entries per range, then a count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposure: Vec<String>,

    /// `Ready` when the node's ruleset matches its policies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One policy in force on a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppliedPolicy {
    /// Policy name.
    pub name: String,
    /// Policy uid, so a policy deleted and re-created under the same name is
    /// not mistaken for the old one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The policy generation applied.
    pub generation: i64,
    /// Hash of the compiled node rules of this policy, as applied.
    pub hash: String,
    /// `Enforce` or `Audit`, as applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<crate::api::PolicyMode>,
    /// Audit policies only: packets this policy would have dropped on this
    /// node had it been in Enforce (packets no Enforce policy, no failsafe
    /// entry and none of its own rules allowed), read from the counters of
    /// its rules since the agent last programmed them. The packets
    /// themselves are logged, rate-limited, with the prefix
    /// `pal-audit:<policy>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub would_drop: Option<WouldDrop>,
}

/// Packets an Audit policy would have dropped, per direction.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WouldDrop {
    /// Inbound packets (IPv4 and IPv6).
    pub ingress: i64,
    /// Outbound packets (IPv4 and IPv6).
    pub egress: i64,
}

/// Outcome of one agent sync.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncResult {
    /// When the sync finished.
    pub time: Time,
    /// `Success` or `Failed`.
    pub result: String,
    /// What failed, for a person to act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
