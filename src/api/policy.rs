//! `FirewallPolicy` (palisade.dev/v1alpha1): one allow-list, enforced on the
//! AWS Security Group and on every selected node's iptables.
//!
//! Every doc comment here becomes `kubectl explain` text; every
//! `x_kube(validation = ...)` becomes a CEL rule the apiserver checks at
//! admission, so a bad policy is refused before any controller sees it.

use std::collections::BTreeMap;

use super::conditions::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Largest number of rules one direction of one policy may list. A Security
/// Group holds 60 rules per direction by default (1000 with a quota raise);
/// the bound also keeps the CEL cost of the per-rule checks within budget.
pub const MAX_RULES_PER_DIRECTION: usize = 100;
/// Largest number of peers one rule may list.
pub const MAX_PEERS_PER_RULE: usize = 50;
/// Largest number of port entries one rule may list.
pub const MAX_PORTS_PER_RULE: usize = 16;
/// The ICMP type iptables reads as "every type" (`--icmp-type 255` is
/// `any`): refused in rules, so a rule matches exactly what it names.
pub const ICMP_TYPE_ANY: u8 = 255;

/// A label value as Kubernetes defines it (the empty value is refused by
/// `minLength` separately: it would widen a selector).
pub const LABEL_VALUE_PATTERN: &str = "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";
/// A label key as Kubernetes defines it: an optional DNS-1123 subdomain
/// prefix and `/`, then a name of 1-63 letters, digits, `-`, `_`, `.`
/// starting and ending alphanumeric.
pub const LABEL_KEY_PATTERN: &str = "^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// The prefix of a label key is at most 253 characters.
pub const LABEL_KEY_PREFIX_BOUND: &str = "^([^/]{1,253}/)?[^/]*$";
const LABEL_KEY_MESSAGE: &str = "label keys are [prefix/]name: an optional DNS subdomain prefix of at most 253 characters, and a name of 1-63 letters, digits, '-', '_' or '.', starting and ending alphanumeric (e.g. node-role.kubernetes.io/worker)";
/// The characters AWS allows in Security Group names and rule descriptions.
const AWS_TEXT_RULE: &str = "self.matches('^[a-zA-Z0-9. _:/()#,@\\\\[\\\\]+=&;{}!$*-]*$')";

/// Desired state of a FirewallPolicy: which nodes it selects, what it allows
/// in and out of them, and which Security Group carries its cloud layer.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "FirewallPolicy",
    plural = "firewallpolicies",
    singular = "firewallpolicy",
    shortname = "fwp",
    // GitOps: CRDs land before the policies that use them (Argo CD sync waves).
    annotation("argocd.argoproj.io/sync-wave", "-1"),
    category = "palisade",
    status = "FirewallPolicyStatus",
    cel,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"SG","type":"string","jsonPath":".status.securityGroup.id"}"#,
    printcolumn = r#"{"name":"Nodes","type":"string","description":"nodes synced / selected","jsonPath":".status.nodes.summary"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Reconciling","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Reconciling\")].reason"}"#,
    printcolumn = r#"{"name":"Drift-Repairs","type":"integer","priority":1,"jsonPath":".status.cloudSync.driftRepairs"}"#,
    printcolumn = r#"{"name":"Last-Sync","type":"date","priority":1,"jsonPath":".status.cloudSync.time"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#,
    // The apiserver reports a root rule at path <nil> and refuses a
    // fieldPath into metadata (no schema declares its fields), so the
    // message names the field itself.
    validation = Rule::new("size(self.metadata.name) <= 63").message("metadata.name: a FirewallPolicy name must be at most 63 characters (it is written into Security Group names, tags and rule descriptions)").reason(Reason::FieldValueInvalid)
)]
#[x_kube(validation = Rule::new(format!("!has(self.nodeSelector) || !has(self.nodeSelector.matchLabels) || self.nodeSelector.matchLabels.all(k, k.matches('{LABEL_KEY_PATTERN}') && k.matches('{LABEL_KEY_PREFIX_BOUND}'))")).message(LABEL_KEY_MESSAGE).field_path(".nodeSelector.matchLabels"))]
#[x_kube(validation = Rule::new("has(self.policyTypes)").message("policyTypes is required: name the directions this policy governs (Ingress, Egress or both; a direction named with no rules denies it)"))]
#[x_kube(validation = Rule::new("!has(self.ingress) || (has(self.policyTypes) && 'Ingress' in self.policyTypes)").message("ingress rules are listed but policyTypes does not name Ingress: add Ingress to policyTypes, or remove the ingress rules"))]
#[x_kube(validation = Rule::new("!has(self.egress) || (has(self.policyTypes) && 'Egress' in self.policyTypes)").message("egress rules are listed but policyTypes does not name Egress: add Egress to policyTypes, or remove the egress rules"))]
#[serde(rename_all = "camelCase")]
pub struct FirewallPolicySpec {
    /// Which nodes this policy applies to, by their labels. Empty or absent
    /// selects every node of the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<NodeSelector>,

    /// `Enforce` (default) drops what no rule allows. `Audit` is a dry run
    /// that changes no verdict on either layer: on the node it neither
    /// allows nor drops, and logs and counts what it would drop (the
    /// FirewallNode's `wouldDrop`); on the cloud its Security Group gets no
    /// permission and is attached to no node (a group can only widen
    /// access), while the status says how many permissions are planned.
    #[serde(default)]
    pub mode: PolicyMode,

    /// The directions this policy governs: `Ingress`, `Egress` or both. A
    /// governed direction is default-deny on the selected nodes apart from
    /// what the selected policies allow (and the agent's scoped failsafe);
    /// a direction no selected policy governs is left as it was. Naming a
    /// direction with no rules for it denies it: deny-all is this value,
    /// not an empty list, so it survives server-side apply and merges by
    /// any number of field managers. Required on every write; a policy
    /// stored before the field existed is read as governing the directions
    /// it lists rules for, as it was enforced then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 2))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub policy_types: Vec<PolicyType>,

    /// What happens to connections already established when an edit
    /// narrows the node layer: `Keep` (default) lets them run to their end,
    /// as a Security Group does; `Cut` deletes the conntrack entries of
    /// flows the new ruleset no longer allows, once it is programmed (for
    /// an incident: the attacker's open session ends within a second).
    #[serde(default)]
    pub existing_connections: ExistingConnections,

    /// Traffic allowed into the selected nodes, when `policyTypes` names
    /// `Ingress`. Absent or empty with `Ingress` governed: only the
    /// failsafe gets in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub ingress: Option<Vec<FirewallRule>>,

    /// Traffic allowed out of the selected nodes, when `policyTypes` names
    /// `Egress`. With `Egress` not governed, egress stays as it was (open),
    /// as a Security Group's default egress rule leaves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub egress: Option<Vec<FirewallRule>>,

    /// The Security Group that carries the cloud layer. Absent: Palisade
    /// creates and owns one group for this policy, in the VPC of the selected
    /// nodes, and attaches it to their primary network interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_group: Option<SecurityGroupTarget>,
}

/// A direction of traffic a policy governs.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum PolicyType {
    /// Traffic into the selected nodes.
    Ingress,
    /// Traffic out of the selected nodes.
    Egress,
}

/// What an edit that narrows the node layer does to established flows.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum ExistingConnections {
    /// Established connections run to their end (a Security Group's behaviour).
    #[default]
    Keep,
    /// Established connections the new ruleset does not allow are cut.
    Cut,
}

/// Whether a policy drops what it does not allow, or only reports it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum PolicyMode {
    /// Drop traffic no rule allows.
    #[default]
    Enforce,
    /// Log what would be dropped; drop nothing.
    Audit,
}

/// One allow rule: a protocol, optional ports or ICMP type, and the peers it
/// applies to. Rules only allow, as Security Group rules do.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!has(self.ports) || self.protocol in ['TCP', 'UDP']").message("ports are only valid with protocol TCP or UDP: for protocol All, write one TCP and one UDP rule with these ports; for ICMP, match types with icmp"))]
#[x_kube(validation = Rule::new("!has(self.icmp) || self.protocol in ['ICMP', 'ICMPv6']").message("icmp is only valid with protocol ICMP or ICMPv6"))]
#[x_kube(validation = Rule::new("!has(self.layers) || 'Node' in self.layers || (!has(self.rateLimit) && !(has(self.log) && self.log))").message("rateLimit and log are enforced by the node layer only: a rule with layers [Cloud] cannot use them (add Node to layers)"))]
#[x_kube(validation = Rule::new("self.protocol != 'ICMP' || self.peers.all(p, !has(p.cidr) || !isCIDR(p.cidr) || cidr(p.cidr).ip().family() == 4)").message("protocol ICMP is IPv4 only: use protocol ICMPv6 for IPv6 peers"))]
#[x_kube(validation = Rule::new("self.protocol != 'ICMPv6' || self.peers.all(p, !has(p.cidr) || !isCIDR(p.cidr) || cidr(p.cidr).ip().family() == 6)").message("protocol ICMPv6 is IPv6 only: use protocol ICMP for IPv4 peers"))]
#[serde(rename_all = "camelCase")]
pub struct FirewallRule {
    /// Name of the rule, unique within its direction of this policy. It is
    /// written into the Security Group rule description and the iptables rule
    /// comment, so a packet log or an SG rule can be traced back to it.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Free text kept with the rule: at most 200 characters, ASCII letters,
    /// digits, spaces and `._-:/()#,@[]+=&;{}!$*`, as AWS allows in rule
    /// descriptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    #[x_kube(validation = Rule::new(AWS_TEXT_RULE).message("description may use only ASCII letters, digits, spaces and ._-:/()#,@[]+=&;{}!$* (AWS refuses other characters in rule descriptions)"))]
    pub description: Option<String>,

    /// IP protocol: `TCP`, `UDP`, `ICMP`, `ICMPv6`, or `All`.
    pub protocol: Protocol,

    /// Destination ports (TCP/UDP only). Absent: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub ports: Option<Vec<PortRange>>,

    /// ICMP or ICMPv6 type and code (ICMP/ICMPv6 only). Absent: every type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpMatch>,

    /// Who the rule allows: sources for ingress, destinations for egress. At
    /// least one; use `cidr: 0.0.0.0/0` (and `::/0`) for anywhere.
    #[schemars(length(min = 1, max = 50))]
    pub peers: Vec<Peer>,

    /// Which layers enforce the rule: `Cloud` (the Security Group), `Node`
    /// (iptables), or both (the default). Effective access is the
    /// intersection of the layers, so a Node-only rule can narrow what the
    /// Security Group lets in (SSH from the jump host only, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub layers: Option<Vec<Layer>>,

    /// Node layer only: limit new connections per peer address; connections
    /// above the rate are dropped (or logged, in Audit mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,

    /// Node layer only: log each new connection this rule accepts, rate
    /// limited, with a prefix naming the policy and rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<bool>,
}

/// IP protocol of a rule.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    JsonSchema,
)]
pub enum Protocol {
    /// TCP.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
    /// ICMP (IPv4).
    #[serde(rename = "ICMP")]
    Icmp,
    /// ICMPv6.
    #[serde(rename = "ICMPv6")]
    Icmpv6,
    /// Every protocol.
    All,
}

/// A destination port, or a range of them when `endPort` is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[x_kube(validation = Rule::new("!has(self.endPort) || self.endPort >= self.port").message("endPort must be greater than or equal to port"))]
#[serde(rename_all = "camelCase")]
pub struct PortRange {
    /// The port, or the first port of the range (1-65535).
    #[schemars(range(min = 1, max = 65535), extend("format" = "int32"))]
    pub port: u16,
    /// The last port of the range, inclusive (1-65535, at least `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535), extend("format" = "int32"))]
    pub end_port: Option<u16>,
}

/// ICMP/ICMPv6 type and optional code.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "camelCase")]
pub struct IcmpMatch {
    /// ICMP type (0-254), e.g. 8 for echo request, 128 for ICMPv6 echo
    /// request. 255 is refused: iptables reads it as every type; leave
    /// `icmp` out to allow every type.
    #[serde(rename = "type")]
    #[schemars(range(min = 0, max = 254), extend("format" = "int32"))]
    pub icmp_type: u8,
    /// ICMP code (0-255). Absent: every code of the type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 255), extend("format" = "int32"))]
    pub code: Option<u8>,
}

/// One peer of a rule. Exactly one of its fields is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("[has(self.cidr), has(self.securityGroupId), has(self.prefixListId), has(self.nodeSelector)].filter(x, x).size() == 1").message("a peer sets exactly one of cidr, securityGroupId, prefixListId or nodeSelector"))]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    /// An IPv4 or IPv6 network in canonical CIDR form (no host bits set),
    /// e.g. `203.0.113.0/24`, `10.0.0.5/32` or `2001:db8::/32`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 43))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("cidr must be an IPv4 or IPv6 network such as 203.0.113.0/24 or 2001:db8::/32 (IPv4-mapped IPv6 such as ::ffff:10.0.0.0/104 is refused: write the IPv4 network)"))]
    #[x_kube(validation = Rule::new("!isCIDR(self) || string(cidr(self).masked()) == self").message("cidr must be canonical: no host bits set (10.0.0.0/24, not 10.0.0.5/24), IPv6 in lowercase with leading zeros dropped and the longest run of zero groups compressed (2001:db8::/32, not 2001:DB8:0::/32); palisade validate names the exact form"))]
    pub cidr: Option<String>,

    /// A Security Group id (`sg-` and 8 or 17 hex digits). The cloud layer
    /// references the group; the node layer matches the private addresses of
    /// the interfaces in it, which the controller resolves and publishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 20))]
    #[x_kube(validation = Rule::new("self.matches('^sg-([0-9a-f]{8}|[0-9a-f]{17})$')").message("securityGroupId must be a Security Group id such as sg-0123456789abcdef0"))]
    pub security_group_id: Option<String>,

    /// A managed prefix list id (`pl-` and 8 or 17 hex digits). The cloud
    /// layer references the list; the node layer matches its entries, which
    /// the controller resolves and publishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 20))]
    #[x_kube(validation = Rule::new("self.matches('^pl-([0-9a-f]{8}|[0-9a-f]{17})$')").message("prefixListId must be a prefix list id such as pl-0123456789abcdef0"))]
    pub prefix_list_id: Option<String>,

    /// Other nodes of this cluster, by label: their internal addresses (as
    /// /32 and /128) on both layers, kept current as nodes come and go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<NodeSelector>,
}

/// A Kubernetes label selector over Nodes (the same shape as a Deployment's
/// `selector`): every `matchLabels` pair and every `matchExpressions`
/// requirement must hold. An empty selector matches every node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelector {
    /// Labels a node must carry, with exactly these values. Neither the
    /// map nor a value may be empty: a value left blank (an unset Helm
    /// value renders as null, and null is pruned) would otherwise widen
    /// the selector to every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend(
        "maxProperties" = 32,
        "minProperties" = 1,
        "additionalProperties" = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": LABEL_VALUE_PATTERN}
    ))]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Requirements on node labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub match_expressions: Option<Vec<NodeSelectorRequirement>>,
}

/// One requirement of a [`NodeSelector`].
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, Default)]
#[x_kube(validation = Rule::new("self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)").message("operators In and NotIn need at least one value; Exists and DoesNotExist take none"))]
#[serde(rename_all = "camelCase")]
pub struct NodeSelectorRequirement {
    /// The label key: `[prefix/]name`, as Kubernetes defines label keys.
    #[schemars(length(min = 1, max = 317))]
    #[schemars(extend("allOf" = [{"pattern": LABEL_KEY_PATTERN}, {"pattern": LABEL_KEY_PREFIX_BOUND}]))]
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    #[schemars(extend("enum" = ["In", "NotIn", "Exists", "DoesNotExist"]))]
    pub operator: String,
    /// Values for `In` and `NotIn`; none may be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63), regex(pattern = LABEL_VALUE_PATTERN)))]
    pub values: Option<Vec<String>>,
}

/// A layer that enforces a rule.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum Layer {
    /// The AWS Security Group, enforced by the hypervisor before traffic
    /// reaches the instance.
    Cloud,
    /// The node's iptables/ip6tables, enforced by its kernel.
    Node,
}

/// New-connection rate limit per peer address (node layer, hashlimit).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// New connections allowed per `per`, per peer address (1-10000).
    #[schemars(range(min = 1, max = 10000), extend("format" = "int32"))]
    pub count: u32,
    /// The period of `count`: `Second`, `Minute` (default) or `Hour`.
    #[serde(default)]
    pub per: RatePeriod,
    /// Connections allowed in a burst above the rate (1-10000; default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000), extend("format" = "int32"))]
    pub burst: Option<u32>,
}

/// The period of a rate limit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum RatePeriod {
    /// Per second.
    Second,
    /// Per minute.
    #[default]
    Minute,
    /// Per hour.
    Hour,
}

/// The Security Group of the cloud layer: either an existing group to adopt
/// (`id`), or one Palisade creates and owns (every other field).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!has(self.id) || (!has(self.name) && !has(self.vpcId) && !has(self.tags))").message("securityGroup.id adopts an existing group: name, vpcId and tags only apply to a group Palisade creates"))]
#[serde(rename_all = "camelCase")]
pub struct SecurityGroupTarget {
    /// Adopt this existing Security Group: Palisade adds and removes only the
    /// rules it created in it (recorded by rule id and description) and never
    /// touches rules it does not own, nor deletes the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 20))]
    #[x_kube(validation = Rule::new("self.matches('^sg-([0-9a-f]{8}|[0-9a-f]{17})$')").message("securityGroup.id must be a Security Group id such as sg-0123456789abcdef0"))]
    pub id: Option<String>,

    /// Name of the group Palisade creates (default: `palisade-<policy
    /// name>`): 1-255 ASCII letters, digits, spaces and
    /// `._-:/()#,@[]+=&;{}!$*`, not starting with `sg-`, as AWS requires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("!self.startsWith('sg-')").message("AWS refuses Security Group names that start with sg-"))]
    #[x_kube(validation = Rule::new(AWS_TEXT_RULE).message("name may use only ASCII letters, digits, spaces and ._-:/()#,@[]+=&;{}!$* (AWS refuses other characters in group names)"))]
    pub name: Option<String>,

    /// VPC of the group Palisade creates (default: the VPC of the selected
    /// nodes' instances; they must all be in one VPC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 21))]
    #[x_kube(validation = Rule::new("self.matches('^vpc-([0-9a-f]{8}|[0-9a-f]{17})$')").message("vpcId must be a VPC id such as vpc-0123456789abcdef0"))]
    pub vpc_id: Option<String>,

    /// Extra tags on the group Palisade creates: keys of 1-128 characters,
    /// values of at most 256 (counted in characters, as AWS counts them).
    /// Palisade's own tags (`palisade.dev/*`) are always added and cannot
    /// be overridden; `aws:` (in any case) is reserved by AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 40, "additionalProperties" = {"type": "string", "maxLength": 256}))]
    #[x_kube(validation = Rule::new("self.all(k, k.matches('^.{1,128}$'))").message("tag keys must be 1-128 characters"))]
    #[x_kube(validation = Rule::new("self.all(k, !k.lowerAscii().startsWith('aws:') && !k.startsWith('palisade.dev/'))").message("tag keys must not start with aws: (reserved by AWS, in any case) or palisade.dev/ (Palisade's own tags)"))]
    pub tags: Option<BTreeMap<String, String>>,

    /// Attach the group to the primary network interface of every selected
    /// node, keeping the interface's other groups (default: true for a group
    /// Palisade creates, false for an adopted group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_to_nodes: Option<bool>,

    /// What happens in AWS when the policy is deleted: `Delete` (default)
    /// detaches and deletes a created group, or revokes Palisade's rules from
    /// an adopted one; `Retain` leaves the group and its rules in place.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// What deleting a policy does to its Security Group.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum DeletionPolicy {
    /// Detach and delete a created group; revoke owned rules from an adopted one.
    #[default]
    Delete,
    /// Leave the group and its rules as they are.
    Retain,
}

/// Observed state of a FirewallPolicy, written by the controller only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FirewallPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`, `Reconciling` and `Stalled` (kstatus polarity: Flux and
    /// Argo CD read them), plus `CloudSynced` and `NodesSynced`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The Security Group carrying the cloud layer, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_group: Option<SecurityGroupStatus>,

    /// How many selected nodes have applied this generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeCounts>,

    /// Addresses of Security Group and prefix-list peers, resolved by the
    /// controller for the node layer (which cannot reference them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolved_peers: Vec<ResolvedPeer>,

    /// Problems that do not stop the policy from applying: shadowed or
    /// duplicate rules, a quota nearly reached, unresolvable references.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,

    /// The last full sync of the cloud layer: what it applied, when, and
    /// how many out-of-band changes have been repaired. Kept here (not only
    /// in the controller's memory) so a restarted controller still tells
    /// drift from a change of the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_sync: Option<CloudSync>,

    /// What the whole internet (`0.0.0.0/0`, `::/0`) and the VPC can reach
    /// on the selected nodes after both layers (every Security Group on
    /// their interfaces, intersected with their node layer), each entry
    /// with how many nodes expose it. At most 10 entries and a count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposure: Vec<String>,
}

/// The last full sync of a policy's Security Group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudSync {
    /// The generation synced.
    pub generation: i64,
    /// 16 hex digits over everything that sync applied (plan, instances,
    /// target): equal on the next sync means any difference found is drift.
    pub inputs: String,
    /// When a full sync first found (or made) the group as planned at this
    /// generation and inputs, or last repaired drift. Later read-backs that
    /// find it unchanged leave the record alone (their time is the
    /// `palisade_controller_last_successful_sync_timestamp_seconds`
    /// metric), so a resync or a restart writes no status.
    pub time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// Out-of-band changes to the group found and repaired, in all.
    pub drift_repairs: i64,
}

/// The Security Group of a policy, as last reconciled.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityGroupStatus {
    /// The group id.
    pub id: String,
    /// The group's VPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc_id: Option<String>,
    /// True when Palisade created the group (and will delete it with the
    /// policy, unless `deletionPolicy: Retain`).
    pub owned: bool,
    /// Ingress rules Palisade manages in the group.
    pub ingress_rules: i32,
    /// Egress rules Palisade manages in the group.
    pub egress_rules: i32,
    /// How many selected instances' primary interfaces carry the group.
    #[serde(default)]
    pub attached: i32,
    /// Some of them (at most 10 instance ids, sorted): the status stays
    /// small whatever the number of nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attached_sample: Vec<String>,
    /// How many Security Groups hold the policy's cloud rules on the nodes
    /// it selects: 1, or, when its nodes are in several placement classes
    /// (composed groups), one per class. 0 in a status written before this
    /// field.
    #[serde(default)]
    pub group_count: i32,
    /// Those groups, with how many of the selected nodes carry each: at
    /// most 10, most nodes first (`groupCount` counts them all); the first
    /// is `id`. The status stays small whatever the number of nodes or
    /// classes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupShare>,
}

/// One of the Security Groups holding a policy's cloud rules.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupShare {
    /// The group id.
    pub id: String,
    /// How many of the policy's selected nodes carry it.
    pub nodes: i32,
}

/// Most instance ids `securityGroup.attachedSample` lists.
pub const ATTACHED_SAMPLE: usize = 10;

/// Most groups `securityGroup.groups` lists.
pub const GROUPS_SAMPLE: usize = 10;

/// Node counts for a policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    /// Nodes the policy selects.
    pub selected: i32,
    /// Selected nodes whose agent applied the current generation.
    pub synced: i32,
    /// Selected nodes whose agent failed to apply it.
    pub failed: i32,
    /// `synced/selected`, for the printer column.
    pub summary: String,
}

/// Addresses a Security Group or prefix-list peer stands for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedPeer {
    /// The `sg-...` or `pl-...` id.
    pub id: String,
    /// Its addresses, canonical CIDRs, sorted.
    #[serde(default)]
    pub cidrs: Vec<String>,
}

impl FirewallPolicySpec {
    /// Whether the policy governs `direction`: names it in `policyTypes`,
    /// or, for a policy stored before `policyTypes` existed (none named),
    /// lists rules for it (what it meant then), so an upgrade never drops
    /// a rule.
    pub fn governs(&self, direction: PolicyType) -> bool {
        if self.policy_types.is_empty() {
            return match direction {
                PolicyType::Ingress => self.ingress.is_some(),
                PolicyType::Egress => self.egress.is_some(),
            };
        }
        self.policy_types.contains(&direction)
    }
}

impl FirewallRule {
    /// The layers that enforce this rule (both when `layers` is absent).
    pub fn enforced_on(&self, layer: Layer) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }
}

impl SecurityGroupTarget {
    /// Whether the group is created and owned by Palisade (no `id`).
    pub fn is_owned(&self) -> bool {
        self.id.is_none()
    }
    /// Whether to attach the group to the selected nodes' interfaces.
    pub fn attaches(&self) -> bool {
        self.attach_to_nodes.unwrap_or(self.is_owned())
    }
}
