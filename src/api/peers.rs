//! `FirewallPeerSlice` (palisade.dev/v1alpha1): the addresses of the nodes
//! a `nodeSelector` peer stands for, published by the controller so that
//! agents never list or watch Nodes.
//!
//! Sharded as EndpointSlices are: at most [`MAX_PEER_SLICE_NODES`] nodes per
//! object, labelled with the hash of the selector, so a node joining or
//! changing address rewrites one small object and every agent receives only
//! that. The selector `<all>` (every node) is always published: it is the
//! `Cluster` scope of the agents' failsafe.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most nodes one slice lists (as EndpointSlice's default of 100 endpoints).
pub const MAX_PEER_SLICE_NODES: usize = 100;
/// Label carrying the 16-hex hash of the slice's selector.
pub const SELECTOR_HASH_LABEL: &str = "palisade.dev/selector-hash";

/// The [`SELECTOR_HASH_LABEL`] value of a selector's slices (16 hex): what
/// an agent watches by.
pub fn selector_hash(selector: &str) -> String {
    crate::policy::short_hash(&["peer-slices", selector])
}

/// One shard of the node addresses a selector stands for.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "FirewallPeerSlice",
    plural = "firewallpeerslices",
    singular = "firewallpeerslice",
    shortname = "fwps",
    annotation("argocd.argoproj.io/sync-wave", "-1"),
    category = "palisade",
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".spec.selector"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FirewallPeerSliceSpec {
    /// The node selector, in canonical text (`<all>`: every node).
    #[schemars(length(min = 1, max = 4096))]
    pub selector: String,
    /// The selected nodes of this shard and their InternalIP addresses.
    #[serde(default)]
    #[schemars(length(max = 100))]
    pub nodes: Vec<PeerNode>,
}

/// One node of a slice.
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Default, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct PeerNode {
    /// The Node's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Its InternalIP addresses (IPv4 and IPv6).
    #[serde(default)]
    #[schemars(length(max = 8))]
    pub addresses: Vec<String>,
}
