//! Validation: a `FirewallPolicy` in, a [`ValidPolicy`] (or every problem
//! with its field path) out.
//!
//! Mirrors the CRD's CEL rules, because a policy may come from a file through
//! the CLI without an apiserver, and adds what CEL cannot check: label
//! selector syntax, canonical IPv6 text, unique names in a list that is not
//! (yet) a map, AWS's character set for group names.
//!
//! A [`ValidPolicy`] can only be built here, so the compiler's later stages
//! take it as proof that these checks passed.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::Serialize;

use crate::api::{
    ExistingConnections, FirewallPolicy, FirewallRule, ICMP_TYPE_ANY, IcmpMatch, Layer,
    MAX_PEERS_PER_RULE, MAX_PORTS_PER_RULE, MAX_RULES_PER_DIRECTION, Peer, PolicyMode, PolicyType,
    Protocol, RateLimit, SecurityGroupTarget,
};

use super::facts::{Facts, NodeFacts};
use super::selector::{Selector, is_dns_subdomain};
use super::{Direction, IpFamily, PolicyError};

/// Longest policy name: it is written into Security Group names, tags and
/// rule descriptions.
pub const MAX_POLICY_NAME: usize = 63;

/// An inclusive range of ports, `first <= last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortSpan {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl PortSpan {
    /// Whether `port` is in the span.
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
    /// Whether `other` lies entirely within this span.
    pub fn covers(&self, other: &PortSpan) -> bool {
        self.first <= other.first && other.last <= self.last
    }
}

/// One peer of a valid rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PeerRef {
    /// A canonical CIDR.
    Cidr(IpNet),
    /// A Security Group id.
    SecurityGroup(String),
    /// A managed prefix list id.
    PrefixList(String),
    /// The nodes a selector stands for.
    Nodes(Selector),
}

/// A rule that passed validation, with its peers parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidRule {
    /// Rule name, unique within its direction.
    pub name: String,
    /// Position in the policy's list (for field paths in messages).
    pub index: usize,
    /// The rule's free-text description.
    pub description: Option<String>,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination ports, sorted and de-duplicated; empty = every port
    /// (always empty unless the protocol is TCP or UDP).
    pub ports: Vec<PortSpan>,
    /// ICMP/ICMPv6 type and code; `None` = every type.
    pub icmp: Option<IcmpMatch>,
    /// Peers, in the order written.
    pub peers: Vec<PeerRef>,
    /// Enforced by the Security Group.
    pub cloud: bool,
    /// Enforced by the node's iptables.
    pub node: bool,
    /// Node layer: new-connection rate limit per peer address.
    pub rate_limit: Option<RateLimit>,
    /// Node layer: log accepted new connections.
    pub log: bool,
}

impl ValidRule {
    /// Whether the rule is enforced on `layer`.
    pub fn on(&self, layer: Layer) -> bool {
        match layer {
            Layer::Cloud => self.cloud,
            Layer::Node => self.node,
        }
    }

    /// The address families this rule can match: ICMP is IPv4 only, ICMPv6
    /// IPv6 only, the rest both.
    pub fn families(&self) -> &'static [IpFamily] {
        match self.protocol {
            Protocol::Icmp => &[IpFamily::V4],
            Protocol::Icmpv6 => &[IpFamily::V6],
            _ => &[IpFamily::V4, IpFamily::V6],
        }
    }
}

/// A policy that passed every check. Only [`validate`] builds one.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidPolicy {
    name: String,
    mode: PolicyMode,
    selector: Selector,
    ingress: Option<Vec<ValidRule>>,
    egress: Option<Vec<ValidRule>>,
    security_group: Option<SecurityGroupTarget>,
    cut_established: bool,
}

impl ValidPolicy {
    /// `metadata.name`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// `spec.mode`.
    pub fn mode(&self) -> PolicyMode {
        self.mode
    }
    /// The parsed `spec.nodeSelector` (everything when absent).
    pub fn selector(&self) -> &Selector {
        &self.selector
    }
    /// Whether narrowing this policy cuts established flows it no longer
    /// allows (`existingConnections: Cut`).
    pub fn cuts_established(&self) -> bool {
        self.cut_established
    }
    /// The rules of one direction; `None` when the policy does not govern
    /// it (`policyTypes` does not name it), possibly empty (deny-all) when
    /// it does.
    pub fn rules(&self, direction: Direction) -> Option<&[ValidRule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
    /// `spec.securityGroup`.
    pub fn security_group(&self) -> Option<&SecurityGroupTarget> {
        self.security_group.as_ref()
    }
    /// Whether the policy applies to `node` (its `nodeSelector` matches the
    /// node's labels).
    pub fn selects(&self, node: &NodeFacts) -> bool {
        self.selector.matches(&node.labels)
    }
    /// The `nodeSelector` peers of its node-layer rules, both directions:
    /// the selectors whose node addresses an agent enforcing it needs.
    pub fn node_peer_selectors(&self) -> impl Iterator<Item = &Selector> {
        [&self.ingress, &self.egress]
            .into_iter()
            .flatten()
            .flatten()
            .filter(|r| r.node)
            .flat_map(|r| r.peers.iter())
            .filter_map(|p| match p {
                PeerRef::Nodes(sel) => Some(sel),
                _ => None,
            })
    }
}

/// The policies among `policies` that select `node`, sorted by name.
pub fn policies_for_node<'a>(
    node: &NodeFacts,
    policies: &'a [ValidPolicy],
) -> Vec<&'a ValidPolicy> {
    let mut selected: Vec<&ValidPolicy> = policies.iter().filter(|p| p.selects(node)).collect();
    selected.sort_by(|a, b| a.name.cmp(&b.name));
    selected
}

/// The names of the nodes in `facts` that `policy` selects, sorted.
pub fn nodes_selected(policy: &ValidPolicy, facts: &Facts) -> Vec<String> {
    let mut names: Vec<String> = policy
        .selector
        .select(&facts.nodes)
        .into_iter()
        .map(|n| n.name.clone())
        .collect();
    names.sort();
    names
}

/// Checks `policy` and returns its validated form, or
/// [`PolicyError::Invalid`] listing every problem (field path, what is wrong,
/// what to write instead). Never panics, whatever the input.
pub fn validate(policy: &FirewallPolicy) -> Result<ValidPolicy, PolicyError> {
    let mut errors = Vec::new();
    let name = policy.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        errors.push(PolicyError::field(
            "metadata.name",
            "the policy has no name",
            "set metadata.name",
        ));
    } else if name.len() > MAX_POLICY_NAME || !is_dns_subdomain(&name) {
        errors.push(PolicyError::field(
            "metadata.name",
            format!("{name:?} is not a valid FirewallPolicy name"),
            "use at most 63 lowercase letters, digits, '-' and '.', starting and ending alphanumeric",
        ));
    }
    let spec = &policy.spec;
    if !spec.governs(PolicyType::Ingress) && !spec.governs(PolicyType::Egress) {
        errors.push(PolicyError::field(
            "spec.policyTypes",
            "the policy governs no direction",
            "name Ingress, Egress or both in policyTypes (a direction named with no rules denies it)",
        ));
    }
    for (listed, direction, field) in [
        (spec.ingress.is_some(), PolicyType::Ingress, "spec.ingress"),
        (spec.egress.is_some(), PolicyType::Egress, "spec.egress"),
    ] {
        if listed && !spec.governs(direction) {
            errors.push(PolicyError::field(
                field,
                format!("{field} rules are listed but policyTypes does not name {direction:?}"),
                format!("add {direction:?} to spec.policyTypes, or remove {field}"),
            ));
        }
    }
    let selector = match &spec.node_selector {
        Some(sel) => Selector::parse(sel, "spec.nodeSelector").unwrap_or_else(|errs| {
            errors.extend(errs);
            Selector::everything()
        }),
        None => Selector::everything(),
    };
    let ingress = spec.governs(PolicyType::Ingress).then(|| {
        validate_rules(
            spec.ingress.as_deref().unwrap_or_default(),
            "spec.ingress",
            &mut errors,
        )
    });
    let egress = spec.governs(PolicyType::Egress).then(|| {
        validate_rules(
            spec.egress.as_deref().unwrap_or_default(),
            "spec.egress",
            &mut errors,
        )
    });
    if let Some(sg) = &spec.security_group {
        validate_target(sg, &mut errors);
    }
    if errors.is_empty() {
        Ok(ValidPolicy {
            name,
            mode: spec.mode,
            selector,
            ingress,
            egress,
            security_group: spec.security_group.clone(),
            cut_established: spec.existing_connections == ExistingConnections::Cut,
        })
    } else {
        let policy = if name.is_empty() {
            "<unnamed>".to_string()
        } else {
            name
        };
        Err(PolicyError::Invalid { policy, errors })
    }
}

fn validate_rules(
    rules: &[FirewallRule],
    path: &str,
    errors: &mut Vec<PolicyError>,
) -> Vec<ValidRule> {
    if rules.len() > MAX_RULES_PER_DIRECTION {
        errors.push(PolicyError::Count {
            path: path.to_string(),
            what: "rules".into(),
            found: rules.len(),
            bound: format!("at most {MAX_RULES_PER_DIRECTION} are allowed"),
            fix: "merge rules (a rule may list several ports and peers) or split the policy".into(),
        });
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut out = Vec::with_capacity(rules.len());
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("{path}[{i}]");
        match seen.get(rule.name.as_str()) {
            Some(first) => errors.push(PolicyError::Duplicate {
                path: format!("{at}.name"),
                what: "rule name".into(),
                value: rule.name.clone(),
                first: format!("{path}[{first}].name"),
            }),
            None => {
                seen.insert(&rule.name, i);
            }
        }
        if let Some(valid) = validate_rule(rule, i, &at, errors) {
            out.push(valid);
        }
    }
    out
}

fn is_rule_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(|c| *c != b'-')
        && b.last().is_some_and(|c| *c != b'-')
}

/// Longest rule description (AWS allows 255; Palisade appends its own
/// marker to what it writes).
pub const MAX_DESCRIPTION: usize = 200;

/// Whether `c` is in AWS's character set for Security Group names and rule
/// descriptions.
fn is_aws_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || ". _-:/()#,@[]+=&;{}!$*".contains(c)
}

fn first_non_aws_char(s: &str) -> Option<char> {
    s.chars().find(|c| !is_aws_char(*c))
}

fn is_aws_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

fn validate_rule(
    rule: &FirewallRule,
    index: usize,
    at: &str,
    errors: &mut Vec<PolicyError>,
) -> Option<ValidRule> {
    let before = errors.len();
    if !is_rule_name(&rule.name) {
        errors.push(PolicyError::field(
            format!("{at}.name"),
            format!("{:?} is not a valid rule name", rule.name),
            "use 1-63 lowercase letters, digits and '-', starting and ending alphanumeric (e.g. ssh-from-bastion)",
        ));
    }
    if let Some(desc) = &rule.description {
        let chars = desc.chars().count();
        if chars > MAX_DESCRIPTION {
            errors.push(PolicyError::field(
                format!("{at}.description"),
                format!("the description is {chars} characters long"),
                format!("shorten it to at most {MAX_DESCRIPTION} characters"),
            ));
        }
        if let Some(bad) = first_non_aws_char(desc) {
            errors.push(PolicyError::field(
                format!("{at}.description"),
                format!(
                    "the description uses {bad:?}, a character AWS refuses in rule descriptions"
                ),
                "use only ASCII letters, digits, spaces and ._-:/()#,@[]+=&;{}!$*",
            ));
        }
    }

    // Ports: TCP/UDP only, 1-16 entries, 1 <= port <= endPort.
    let mut ports = Vec::new();
    if let Some(list) = &rule.ports {
        if !matches!(rule.protocol, Protocol::Tcp | Protocol::Udp) {
            errors.push(PolicyError::field(
                format!("{at}.ports"),
                format!(
                    "ports are only valid with protocol TCP or UDP, not {:?}",
                    rule.protocol
                ),
                "ports name TCP or UDP ports: for protocol All, write one TCP and one UDP rule with these ports; for ICMP, match types with icmp",
            ));
        }
        if list.is_empty() || list.len() > MAX_PORTS_PER_RULE {
            errors.push(PolicyError::Count {
                path: format!("{at}.ports"),
                what: "ports".into(),
                found: list.len(),
                bound: format!("between 1 and {MAX_PORTS_PER_RULE} are allowed"),
                fix: "list 1 to 16 ports or ranges, or split the rule".into(),
            });
        }
        for (j, p) in list.iter().enumerate() {
            let end = p.end_port.unwrap_or(p.port);
            if p.port == 0 || end == 0 {
                errors.push(PolicyError::field(
                    format!("{at}.ports[{j}]"),
                    "port 0 is not a port",
                    "use ports 1-65535",
                ));
            } else if end < p.port {
                errors.push(PolicyError::field(
                    format!("{at}.ports[{j}].endPort"),
                    format!("endPort {end} is below port {}", p.port),
                    format!("write endPort >= {} (or swap them)", p.port),
                ));
            } else {
                ports.push(PortSpan {
                    first: p.port,
                    last: end,
                });
            }
        }
        ports.sort();
        ports.dedup();
    }

    if rule.icmp.is_some_and(|m| m.icmp_type == ICMP_TYPE_ANY) {
        errors.push(PolicyError::field(
            format!("{at}.icmp.type"),
            "ICMP type 255 is iptables' wildcard: it would allow every ICMP type",
            "name the type to allow (0-254)",
        ));
    }
    if rule.icmp.is_some() && !matches!(rule.protocol, Protocol::Icmp | Protocol::Icmpv6) {
        errors.push(PolicyError::field(
            format!("{at}.icmp"),
            format!(
                "icmp is only valid with protocol ICMP or ICMPv6, not {:?}",
                rule.protocol
            ),
            "set protocol ICMP or ICMPv6, or drop icmp",
        ));
    }

    // Peers: 1-50, exactly one field each, canonical CIDRs of the right family.
    if rule.peers.is_empty() || rule.peers.len() > MAX_PEERS_PER_RULE {
        errors.push(PolicyError::Count {
            path: format!("{at}.peers"),
            what: "peers".into(),
            found: rule.peers.len(),
            bound: format!("between 1 and {MAX_PEERS_PER_RULE} are allowed"),
            fix: "list who the rule allows (at most 50; split the rule, or use a prefix list, for more)".into(),
        });
    }
    let mut peers = Vec::with_capacity(rule.peers.len());
    for (j, peer) in rule.peers.iter().enumerate() {
        if let Some(p) = validate_peer(peer, rule.protocol, &format!("{at}.peers[{j}]"), errors) {
            peers.push(p);
        }
    }

    // Layers: 1-2 distinct; node-only features need the node layer.
    let (mut cloud, mut node) = (true, true);
    if let Some(layers) = &rule.layers {
        if layers.is_empty() || layers.len() > 2 {
            errors.push(PolicyError::Count {
                path: format!("{at}.layers"),
                what: "layers".into(),
                found: layers.len(),
                bound: "1 or 2 are allowed".into(),
                fix: "list Cloud, Node, or both (omit layers for both)".into(),
            });
        }
        for (j, layer) in layers.iter().enumerate() {
            if let Some(first) = layers[..j].iter().position(|l| l == layer) {
                errors.push(PolicyError::Duplicate {
                    path: format!("{at}.layers[{j}]"),
                    what: "layer".into(),
                    value: format!("{layer:?}"),
                    first: format!("{at}.layers[{first}]"),
                });
            }
        }
        cloud = layers.contains(&Layer::Cloud);
        node = layers.contains(&Layer::Node);
    }
    let log = rule.log.unwrap_or(false);
    if !node && !layers_empty(rule) {
        for (field, set) in [("rateLimit", rule.rate_limit.is_some()), ("log", log)] {
            if set {
                errors.push(PolicyError::field(
                    format!("{at}.{field}"),
                    format!("{field} is enforced by the node layer only, and this rule has layers [Cloud]"),
                    format!("add Node to layers, or remove {field}"),
                ));
            }
        }
    }
    if let Some(rl) = &rule.rate_limit {
        if !(1..=10_000).contains(&rl.count) {
            errors.push(PolicyError::field(
                format!("{at}.rateLimit.count"),
                format!("{} is out of range", rl.count),
                "use 1-10000 new connections per period",
            ));
        }
        if rl.burst.is_some_and(|b| !(1..=10_000).contains(&b)) {
            errors.push(PolicyError::field(
                format!("{at}.rateLimit.burst"),
                "burst is out of range",
                "use 1-10000 (or omit it for 5)",
            ));
        }
    }

    (errors.len() == before).then(|| ValidRule {
        name: rule.name.clone(),
        index,
        description: rule.description.clone(),
        protocol: rule.protocol,
        ports,
        icmp: rule.icmp,
        peers,
        cloud,
        node,
        rate_limit: rule.rate_limit,
        log,
    })
}

fn layers_empty(rule: &FirewallRule) -> bool {
    rule.layers.as_ref().is_some_and(Vec::is_empty)
}

fn validate_peer(
    peer: &Peer,
    protocol: Protocol,
    at: &str,
    errors: &mut Vec<PolicyError>,
) -> Option<PeerRef> {
    let set = [
        peer.cidr.is_some(),
        peer.security_group_id.is_some(),
        peer.prefix_list_id.is_some(),
        peer.node_selector.is_some(),
    ]
    .into_iter()
    .filter(|b| *b)
    .count();
    if set != 1 {
        errors.push(PolicyError::field(
            at,
            format!("the peer sets {set} fields"),
            "set exactly one of cidr, securityGroupId, prefixListId or nodeSelector (one peer per list entry)",
        ));
        return None;
    }
    if let Some(cidr) = &peer.cidr {
        let path = format!("{at}.cidr");
        let canonical = match parse_cidr(cidr, &path) {
            Ok(net) => net,
            Err(e) => {
                errors.push(e);
                return None;
            }
        };
        let family = IpFamily::of_net(&canonical);
        let wrong = match (protocol, family) {
            (Protocol::Icmp, IpFamily::V6) => {
                Some("protocol ICMP is IPv4 only: use protocol ICMPv6 for IPv6 peers")
            }
            (Protocol::Icmpv6, IpFamily::V4) => {
                Some("protocol ICMPv6 is IPv6 only: use protocol ICMP for IPv4 peers")
            }
            _ => None,
        };
        if let Some(msg) = wrong {
            errors.push(PolicyError::field(path, format!("{cidr} is {family}"), msg));
            return None;
        }
        return Some(PeerRef::Cidr(canonical));
    }
    if let Some(id) = &peer.security_group_id {
        if !is_aws_id(id, "sg-") {
            errors.push(PolicyError::field(
                format!("{at}.securityGroupId"),
                format!("{id:?} is not a Security Group id"),
                "write sg- and 8 or 17 lowercase hex digits, e.g. sg-0123456789abcdef0",
            ));
            return None;
        }
        return Some(PeerRef::SecurityGroup(id.clone()));
    }
    if let Some(id) = &peer.prefix_list_id {
        if !is_aws_id(id, "pl-") {
            errors.push(PolicyError::field(
                format!("{at}.prefixListId"),
                format!("{id:?} is not a prefix list id"),
                "write pl- and 8 or 17 lowercase hex digits, e.g. pl-0123456789abcdef0",
            ));
            return None;
        }
        return Some(PeerRef::PrefixList(id.clone()));
    }
    let sel = peer.node_selector.as_ref()?;
    match Selector::parse_peer(sel, &format!("{at}.nodeSelector")) {
        Ok(s) => Some(PeerRef::Nodes(s)),
        Err(errs) => {
            errors.extend(errs);
            None
        }
    }
}

/// Parses a peer's `cidr` as admission accepts it: a network with no host
/// bits, written canonically (the apiserver compares text), not
/// IPv4-mapped. The error says what to write; it never suggests a wider
/// network than the one written.
pub fn parse_cidr(cidr: &str, path: &str) -> Result<IpNet, PolicyError> {
    let Ok(net) = cidr.parse::<IpNet>() else {
        return Err(PolicyError::field(
            path,
            format!("{cidr:?} is not a CIDR"),
            "write an IPv4 or IPv6 network such as 203.0.113.0/24, 10.0.0.5/32 or 2001:db8::/32",
        ));
    };
    if let IpNet::V6(v6) = net
        && v6.addr().to_ipv4_mapped().is_some()
    {
        // The apiserver's cidr() refuses IPv4-mapped IPv6 outright.
        return Err(PolicyError::field(
            path,
            format!("{cidr} is an IPv4-mapped IPv6 network, which the apiserver refuses"),
            "write the IPv4 network itself (IPv4 peers are matched as IPv4 on both layers)",
        ));
    }
    let canonical = net.trunc();
    if canonical != net {
        // Host bits set: a typo in the address or in the prefix length.
        // Point it out; never suggest the masked network, which may be
        // far wider than meant (10.0.0.0/0 is every address).
        let host = IpNet::new(net.addr(), net.max_prefix_len()).unwrap_or(net);
        return Err(PolicyError::field(
            path,
            format!("{cidr} has host bits set after /{}", net.prefix_len()),
            format!(
                "write {host} for that one address, or correct the address or the prefix length"
            ),
        ));
    }
    if canonical.to_string() != cidr {
        // Same network, spelled differently: the apiserver compares text.
        return Err(PolicyError::NonCanonicalCidr {
            path: path.to_string(),
            value: cidr.to_string(),
            canonical: canonical.to_string(),
        });
    }
    Ok(canonical)
}

fn validate_target(sg: &SecurityGroupTarget, errors: &mut Vec<PolicyError>) {
    let at = "spec.securityGroup";
    if let Some(id) = &sg.id {
        if !is_aws_id(id, "sg-") {
            errors.push(PolicyError::field(
                format!("{at}.id"),
                format!("{id:?} is not a Security Group id"),
                "write sg- and 8 or 17 lowercase hex digits, e.g. sg-0123456789abcdef0",
            ));
        }
        for (field, set) in [
            ("name", sg.name.is_some()),
            ("vpcId", sg.vpc_id.is_some()),
            ("tags", sg.tags.is_some()),
        ] {
            if set {
                errors.push(PolicyError::field(
                    format!("{at}.{field}"),
                    format!("{field} only applies to a group Palisade creates, and securityGroup.id adopts an existing one"),
                    format!("remove {field}, or remove id to let Palisade create the group"),
                ));
            }
        }
    }
    if let Some(name) = &sg.name {
        let chars = name.chars().count();
        if chars == 0 || chars > 255 {
            errors.push(PolicyError::field(
                format!("{at}.name"),
                format!("the group name is {chars} characters long"),
                "use 1-255 characters",
            ));
        }
        if name.starts_with("sg-") {
            errors.push(PolicyError::field(
                format!("{at}.name"),
                format!("{name:?} starts with sg-, which AWS refuses in group names"),
                "choose a name that does not start with sg-",
            ));
        }
        if let Some(bad) = first_non_aws_char(name) {
            errors.push(PolicyError::field(
                format!("{at}.name"),
                format!("the group name uses {bad:?}, a character AWS refuses in group names"),
                "use only ASCII letters, digits, spaces and ._-:/()#,@[]+=&;{}!$*",
            ));
        }
    }
    if let Some(vpc) = &sg.vpc_id
        && !is_aws_id(vpc, "vpc-")
    {
        errors.push(PolicyError::field(
            format!("{at}.vpcId"),
            format!("{vpc:?} is not a VPC id"),
            "write vpc- and 8 or 17 lowercase hex digits, e.g. vpc-0123456789abcdef0",
        ));
    }
    if let Some(tags) = &sg.tags {
        if tags.len() > 40 {
            errors.push(PolicyError::Count {
                path: format!("{at}.tags"),
                what: "tags".into(),
                found: tags.len(),
                bound: "at most 40 are allowed".into(),
                fix: "AWS allows 50 tags per resource and Palisade uses some: drop tags".into(),
            });
        }
        // AWS counts tag keys and values in characters, not bytes.
        for (key, value) in tags {
            let chars = key.chars().count();
            if chars == 0 || chars > 128 {
                errors.push(PolicyError::field(
                    format!("{at}.tags[{key}]"),
                    format!("the tag key is {chars} characters long"),
                    "use 1-128 characters",
                ));
            }
            if key.to_ascii_lowercase().starts_with("aws:") || key.starts_with("palisade.dev/") {
                errors.push(PolicyError::field(
                    format!("{at}.tags[{key}]"),
                    format!("tag key {key:?} is reserved"),
                    "do not start tag keys with aws: (AWS's, in any case) or palisade.dev/ (Palisade's own tags)",
                ));
            }
            let chars = value.chars().count();
            if chars > 256 {
                errors.push(PolicyError::field(
                    format!("{at}.tags[{key}]"),
                    format!("the tag value is {chars} characters long"),
                    "shorten it to at most 256 characters",
                ));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::api::{FirewallPolicySpec, PortRange};
    use crate::policy::testing::*;

    #[test]
    fn seed_web_policy_is_valid() {
        let policy = validate(&web_policy()).unwrap();
        assert_eq!(policy.name(), "web");
        let ingress = policy.rules(Direction::Ingress).unwrap();
        assert_eq!(ingress.len(), 2);
        assert_eq!(
            ingress[0].ports,
            [
                PortSpan {
                    first: 80,
                    last: 80
                },
                PortSpan {
                    first: 443,
                    last: 443
                }
            ]
        );
        assert!(ingress.iter().all(|r| r.cloud && r.node));
        assert!(policy.rules(Direction::Egress).is_none());
    }

    fn problems(policy: &FirewallPolicy) -> Vec<String> {
        match validate(policy) {
            Ok(_) => vec![],
            Err(e) => e.problems().iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn non_canonical_cidr_says_what_to_write() {
        let p = policy(
            "p",
            vec![rule("ssh", Protocol::Tcp, &[22], &["203.0.113.7/24"])],
            None,
        );
        assert_eq!(
            problems(&p),
            [
                "spec.ingress[0].peers[0].cidr: 203.0.113.7/24 has host bits set after /24; write 203.0.113.7/32 for that one address, or correct the address or the prefix length"
            ]
        );
        let p = policy(
            "p",
            vec![rule("v6", Protocol::Tcp, &[22], &["2001:DB8::/32"])],
            None,
        );
        assert_eq!(
            problems(&p),
            [
                "spec.ingress[0].peers[0].cidr: 2001:DB8::/32 is not a canonical CIDR; write 2001:db8::/32"
            ]
        );
    }

    #[test]
    fn cidr_suggestions_never_widen_and_are_themselves_valid() {
        let one = |cidr: &str| {
            problems(&policy(
                "p",
                vec![rule("r", Protocol::Tcp, &[22], &[cidr])],
                None,
            ))
        };
        // A likely typo is pointed out, not replaced by the /0 network.
        let ps = one("10.0.0.0/0");
        assert_eq!(ps.len(), 1);
        assert!(
            ps[0].contains("write 10.0.0.0/32 for that one address"),
            "{ps:?}"
        );
        assert!(!ps[0].contains(" 0.0.0.0/0"), "{ps:?}");
        // Spelling only: the same network, written as the apiserver writes it.
        for (written, canonical) in [
            ("2001:DB8::/32", "2001:db8::/32"),
            ("2001:0db8::/32", "2001:db8::/32"),
            ("2001:db8:0:0:0:0:0:0/32", "2001:db8::/32"),
            ("2001:db8:0:0:1:0:0:0/80", "2001:db8:0:0:1::/80"),
        ] {
            let ps = one(written);
            assert_eq!(
                ps,
                [format!(
                    "spec.ingress[0].peers[0].cidr: {written} is not a canonical CIDR; write {canonical}"
                )]
            );
            assert!(
                one(canonical).is_empty(),
                "{canonical} must itself be valid"
            );
        }
        // IPv4-mapped IPv6 is refused by the apiserver's cidr(): no
        // suggestion of another mapped spelling.
        let ps = one("::ffff:0:0/96");
        assert_eq!(ps.len(), 1);
        assert!(ps[0].contains("IPv4-mapped"), "{ps:?}");
        assert!(!ps[0].contains("::ffff:0.0.0.0/96"), "{ps:?}");
    }

    #[test]
    fn aws_lengths_count_characters_and_each_fault_has_its_message() {
        let mut p = policy("p", vec![], None);
        p.spec.security_group = Some(SecurityGroupTarget {
            tags: Some(BTreeMap::from([
                ("é".repeat(128), "é".repeat(256)),
                ("ok".into(), "x".repeat(257)),
                (String::new(), "v".into()),
                ("AWS:x".into(), "v".into()),
            ])),
            name: Some("café <web>".into()),
            ..Default::default()
        });
        let ps = problems(&p);
        assert_eq!(ps.len(), 4, "{ps:#?}");
        assert!(
            ps.iter()
                .any(|p| p.contains("uses 'é', a character AWS refuses in group names")),
            "{ps:#?}"
        );
        assert!(
            ps.iter()
                .any(|p| p.contains("the tag value is 257 characters long")),
            "{ps:#?}"
        );
        assert!(
            ps.iter()
                .any(|p| p.contains("the tag key is 0 characters long")),
            "{ps:#?}"
        );
        assert!(
            ps.iter()
                .any(|p| p.contains("tag key \"AWS:x\" is reserved")),
            "{ps:#?}"
        );
        let mut r = rule("r", Protocol::Tcp, &[22], &["10.0.0.0/8"]);
        r.description = Some("é".repeat(201));
        let ps = problems(&policy("p", vec![r], None));
        assert_eq!(ps.len(), 2, "{ps:#?}");
        assert!(ps[0].contains("is 201 characters long"), "{ps:#?}");
        assert!(ps[1].contains("uses 'é'"), "{ps:#?}");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let mut bad = rule(
            "Bad_Name",
            Protocol::Icmp,
            &[],
            &["2001:db8::/32", "nonsense"],
        );
        bad.ports = Some(vec![PortRange {
            port: 90,
            end_port: Some(80),
        }]);
        bad.layers = Some(vec![Layer::Cloud, Layer::Cloud]);
        bad.log = Some(true);
        bad.peers.push(Peer {
            security_group_id: Some("sg-xyz".into()),
            ..Default::default()
        });
        bad.peers.push(Peer {
            cidr: Some("10.0.0.0/8".into()),
            prefix_list_id: Some("pl-12345678".into()),
            ..Default::default()
        });
        let dup = rule("web", Protocol::Tcp, &[80], &["0.0.0.0/0"]);
        let p = policy("p", vec![dup.clone(), bad, dup], None);
        let paths: Vec<String> = match validate(&p) {
            Err(e) => e
                .problems()
                .iter()
                .filter_map(|e| e.path().map(str::to_string))
                .collect(),
            Ok(_) => panic!("must fail"),
        };
        assert_eq!(
            paths,
            [
                "spec.ingress[1].name",
                "spec.ingress[1].ports",
                "spec.ingress[1].ports[0].endPort",
                "spec.ingress[1].peers[0].cidr",
                "spec.ingress[1].peers[1].cidr",
                "spec.ingress[1].peers[2].securityGroupId",
                "spec.ingress[1].peers[3]",
                "spec.ingress[1].layers[1]",
                "spec.ingress[1].log",
                "spec.ingress[2].name",
            ]
        );
    }

    #[test]
    fn duplicate_rule_names_point_at_the_first() {
        let r = rule("web", Protocol::Tcp, &[80], &["0.0.0.0/0"]);
        let p = policy("p", vec![r.clone(), r], None);
        assert_eq!(
            problems(&p),
            [
                "spec.ingress[1].name: rule name \"web\" is already used at spec.ingress[0].name; give each a distinct rule name"
            ]
        );
        // The same name in the other direction is fine.
        let r = rule("dns", Protocol::Udp, &[53], &["10.0.0.0/8"]);
        assert!(problems(&policy("p", vec![r.clone()], Some(vec![r]))).is_empty());
    }

    #[test]
    fn node_only_fields_on_cloud_only_rules() {
        let mut r = rule("ssh", Protocol::Tcp, &[22], &["0.0.0.0/0"]);
        r.layers = Some(vec![Layer::Cloud]);
        r.rate_limit = Some(RateLimit {
            count: 10,
            ..Default::default()
        });
        assert_eq!(
            problems(&policy("p", vec![r], None)),
            [
                "spec.ingress[0].rateLimit: rateLimit is enforced by the node layer only, and this rule has layers [Cloud]; add Node to layers, or remove rateLimit"
            ]
        );
    }

    #[test]
    fn protocol_field_consistency() {
        let mut r = rule("ping", Protocol::Tcp, &[], &["0.0.0.0/0"]);
        r.icmp = Some(IcmpMatch {
            icmp_type: 8,
            code: None,
        });
        let mut all = rule("all", Protocol::All, &[22], &["0.0.0.0/0"]);
        all.icmp = None;
        let ps = problems(&policy("p", vec![r, all], None));
        assert_eq!(ps.len(), 2);
        assert!(
            ps[0].starts_with(
                "spec.ingress[0].icmp: icmp is only valid with protocol ICMP or ICMPv6"
            )
        );
        assert!(
            ps[1].starts_with(
                "spec.ingress[1].ports: ports are only valid with protocol TCP or UDP"
            )
        );
    }

    #[test]
    fn a_policy_stored_before_policy_types_keeps_its_meaning() {
        // Written before the field existed: admission now refuses it, but
        // the stored object must keep being enforced as it was on upgrade.
        let mut p = FirewallPolicy::new("legacy", FirewallPolicySpec::default());
        p.spec.egress = Some(vec![]);
        let v = validate(&p).unwrap();
        assert_eq!(
            v.rules(Direction::Egress),
            Some(&[][..]),
            "egress: [] was deny-all"
        );
        assert!(v.rules(Direction::Ingress).is_none());
        // Named explicitly, policyTypes wins over the lists.
        p.spec.policy_types = vec![PolicyType::Ingress];
        p.spec.egress = None;
        let v = validate(&p).unwrap();
        assert_eq!(v.rules(Direction::Ingress), Some(&[][..]));
        assert!(v.rules(Direction::Egress).is_none());
    }

    #[test]
    fn policy_level_checks() {
        let mut p = FirewallPolicy::new("Not_A_Name", FirewallPolicySpec::default());
        p.spec.node_selector = Some(Default::default());
        p.spec.security_group = Some(SecurityGroupTarget {
            id: Some("sg-0123456789abcdef0".into()),
            name: Some("x".into()),
            ..Default::default()
        });
        let ps = problems(&p);
        assert_eq!(ps.len(), 3, "{ps:#?}");
        assert!(ps[0].starts_with("metadata.name:"));
        // Rules for a direction policyTypes does not name are refused too.
        let mut q = p.clone();
        q.metadata.name = Some("q".into());
        q.spec.security_group = None;
        q.spec.policy_types = vec![PolicyType::Ingress];
        q.spec.egress = Some(vec![]);
        let qs = problems(&q);
        assert_eq!(qs.len(), 1, "{qs:#?}");
        assert!(
            qs[0].starts_with(
                "spec.egress: spec.egress rules are listed but policyTypes does not name Egress"
            ),
            "{qs:#?}"
        );
        assert!(ps[1].starts_with("spec.policyTypes: the policy governs no direction"));
        assert!(
            ps[2].starts_with(
                "spec.securityGroup.name: name only applies to a group Palisade creates"
            )
        );
    }

    #[test]
    fn error_display_and_reason() {
        let p = policy(
            "p",
            vec![rule("ssh", Protocol::Tcp, &[22], &["10.0.0.1/8"])],
            None,
        );
        let err = validate(&p).unwrap_err();
        assert_eq!(err.reason(), "InvalidPolicy");
        assert_eq!(
            err.to_string(),
            "policy p: spec.ingress[0].peers[0].cidr: 10.0.0.1/8 has host bits set after /8; write 10.0.0.1/32 for that one address, or correct the address or the prefix length"
        );
    }
}
