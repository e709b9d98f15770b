//! Effective cloud access: what the *union* of every Security Group on a
//! node's interface admits, compared with what a policy intends.
//!
//! AWS evaluates the groups of one interface as a union: a rule in any of
//! them admits the traffic. A policy that allows SSH only from the office
//! is silently ineffective on the cloud layer when another group on the same
//! interface (an EKS cluster group, a node-group group) allows SSH from
//! anywhere. This module finds such rules: for each group the controller
//! read on the selected nodes' interfaces, each rule that admits traffic the
//! policy's own intent does not ([`widenings`]).
//!
//! What is *not* foreign: the policy's own rules; rules of groups Palisade
//! created (other policies: policies are a union by design, on both
//! layers); rules that carry a Palisade marker in a group Palisade adopted.
//!
//! Pure: the controller reads the groups, this module judges them, and the
//! status and metrics report it. Nothing here ever changes a group.

use std::collections::BTreeSet;
use std::fmt;

use ipnet::IpNet;
use serde::Serialize;

use crate::api::{Layer, PolicyMode};

use super::cloud::{
    DESCRIPTION_MARKER, SgPeer, SgPermission, SgProtocol, port_pairs, sg_peers, traffic_covers,
};
use super::sgdiff::{CurrentSgRule, GroupOwnership, owns_rule};
use super::validate::ValidPolicy;
use super::{Direction, Facts};

/// A Security Group found on the interfaces of a policy's selected nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachedGroup {
    /// `sg-...`.
    pub id: String,
    /// Its `GroupName`.
    pub name: String,
    /// Created by Palisade (for some policy of this cluster): every rule in
    /// it is a policy's intent.
    pub palisade: bool,
    /// Its rules, both directions.
    pub rules: Vec<CurrentSgRule>,
    /// How many of the policy's selected nodes carry it.
    pub nodes: usize,
}

/// What a policy intends on one layer, per direction, as Security Group
/// permissions (`None`: the policy does not govern that direction).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Intent {
    /// Inbound.
    pub ingress: Option<Vec<SgPermission>>,
    /// Outbound.
    pub egress: Option<Vec<SgPermission>>,
}

impl Intent {
    /// What `policy`'s rules on `layer` admit, with `nodeSelector` peers
    /// resolved from `facts` (as the cloud plan resolves them).
    pub fn of(policy: &ValidPolicy, facts: &Facts, layer: Layer) -> Intent {
        let direction = |direction: Direction| {
            policy.rules(direction).map(|rules| {
                let mut out = BTreeSet::new();
                for rule in rules.iter().filter(|r| r.on(layer)) {
                    for peer in &rule.peers {
                        for sg_peer in sg_peers(rule, peer, facts) {
                            for (from_port, to_port) in port_pairs(rule) {
                                out.insert(SgPermission {
                                    protocol: SgProtocol::of(rule.protocol),
                                    from_port,
                                    to_port,
                                    peer: sg_peer.clone(),
                                });
                            }
                        }
                    }
                }
                out.into_iter().collect()
            })
        };
        Intent {
            ingress: direction(Direction::Ingress),
            egress: direction(Direction::Egress),
        }
    }

    /// One direction.
    pub fn direction(&self, direction: Direction) -> Option<&[SgPermission]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

/// A rule of another group that admits traffic the policy does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Widening {
    /// The policy.
    pub policy: String,
    /// The group holding the rule.
    pub group_id: String,
    /// Its name.
    pub group_name: String,
    /// `sgr-...`.
    pub rule_id: String,
    /// Direction of the rule.
    pub direction: Direction,
    /// What the rule admits.
    pub permission: SgPermission,
    /// How many selected nodes carry the group.
    pub nodes: usize,
    /// The peers the policy admits for overlapping traffic (empty: none).
    pub intended_peers: Vec<SgPeer>,
    /// The node layer still drops what the policy does not allow (Enforce,
    /// and the policy's node rules do not admit this rule's traffic).
    pub node_layer_blocks: bool,
}

impl fmt::Display for Widening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.permission;
        let (from, word) = match self.direction {
            Direction::Ingress => ("from", "inbound"),
            Direction::Egress => ("to", "outbound"),
        };
        let nodes = if self.nodes == 1 { "node" } else { "nodes" };
        write!(
            f,
            "{} ({}) on {} {nodes} allows {word} {} {from} {} (rule {}); ",
            self.group_id,
            self.group_name,
            self.nodes,
            traffic(p),
            p.peer,
            self.rule_id
        )?;
        if self.intended_peers.is_empty() {
            write!(f, "{} does not allow it", self.policy)?;
        } else {
            let peers: Vec<String> = self
                .intended_peers
                .iter()
                .map(ToString::to_string)
                .collect();
            write!(
                f,
                "{} allows it only {from} {}",
                self.policy,
                peers.join(", ")
            )?;
        }
        if self.node_layer_blocks {
            f.write_str(" (the node layer still blocks it)")
        } else {
            f.write_str(" (the node layer does not block it either)")
        }
    }
}

/// `tcp/22`, `tcp/8000-8080`, `udp/all ports`, `icmp type 8`, `all traffic`.
pub fn traffic(p: &SgPermission) -> String {
    match p.protocol {
        SgProtocol::All => "all traffic".into(),
        SgProtocol::Tcp | SgProtocol::Udp => {
            let proto = p.protocol.aws_name();
            if p.from_port == 0 && p.to_port == 65535 {
                format!("{proto}/all ports")
            } else if p.from_port == p.to_port {
                format!("{proto}/{}", p.from_port)
            } else {
                format!("{proto}/{}-{}", p.from_port, p.to_port)
            }
        }
        SgProtocol::Icmp | SgProtocol::Icmpv6 => {
            let proto = if p.protocol == SgProtocol::Icmp {
                "icmp"
            } else {
                "icmpv6"
            };
            match (p.from_port, p.to_port) {
                (-1, _) => format!("{proto}/all types"),
                (t, -1) => format!("{proto} type {t}"),
                (t, c) => format!("{proto} type {t} code {c}"),
            }
        }
        SgProtocol::Number(n) => format!("protocol {n}"),
    }
}

/// Every rule of `groups` that admits, in a direction `cloud` governs,
/// traffic outside the policy's cloud intent. `own` is the policy's group
/// and how it owns it. Sorted by direction, group and rule; at most one
/// entry per rule.
pub fn widenings(
    policy: &str,
    mode: PolicyMode,
    cloud: &Intent,
    node: &Intent,
    own: Option<(&str, GroupOwnership)>,
    groups: &[AttachedGroup],
) -> Vec<Widening> {
    let mut out = Vec::new();
    for group in groups {
        if group.nodes == 0 {
            continue;
        }
        let is_own = own.is_some_and(|(id, _)| id == group.id);
        if group.palisade && !is_own {
            continue;
        }
        for rule in &group.rules {
            let ours = match own {
                Some((_, ownership)) if is_own => {
                    owns_rule(policy, ownership, rule.description.as_deref())
                }
                _ => false,
            };
            let palisade_marked = rule
                .description
                .as_deref()
                .is_some_and(|d| d.starts_with(DESCRIPTION_MARKER));
            if ours || palisade_marked {
                continue;
            }
            let Some(intent) = cloud.direction(rule.direction) else {
                continue;
            };
            if covered(&rule.permission, intent) {
                continue;
            }
            let node_layer_blocks = mode == PolicyMode::Enforce
                && node
                    .direction(rule.direction)
                    .is_none_or(|n| !covered(&rule.permission, n));
            let mut intended_peers: Vec<SgPeer> = intent
                .iter()
                .filter(|i| overlaps(i, &rule.permission))
                .map(|i| i.peer.clone())
                .collect();
            intended_peers.sort();
            intended_peers.dedup();
            out.push(Widening {
                policy: policy.to_string(),
                group_id: group.id.clone(),
                group_name: group.name.clone(),
                rule_id: rule.rule_id.clone(),
                direction: rule.direction,
                permission: rule.permission.clone(),
                nodes: group.nodes,
                intended_peers,
                node_layer_blocks,
            });
        }
    }
    out.sort_by(|a, b| {
        (a.direction, &a.group_id, &a.rule_id).cmp(&(b.direction, &b.group_id, &b.rule_id))
    });
    out.dedup_by(|a, b| a.group_id == b.group_id && a.rule_id == b.rule_id);
    out
}

/// Whether the union of `intent` admits everything `p` admits.
///
/// Exact for CIDR peers (a CIDR may be covered by several smaller ones) and
/// TCP/UDP port ranges (a range may be covered by several); a referenced
/// group or prefix list is covered only by the same reference. A rule for
/// every protocol is covered only by rules for every protocol.
pub fn covered(p: &SgPermission, intent: &[SgPermission]) -> bool {
    match p.protocol {
        SgProtocol::Tcp | SgProtocol::Udp => {
            // Cut the range at every boundary of an intent rule inside it;
            // each piece must be covered by the peers of the rules that
            // span it.
            let mut cuts: BTreeSet<i32> = BTreeSet::new();
            cuts.insert(p.from_port);
            for i in intent.iter().filter(|i| i.protocol == p.protocol) {
                if i.from_port > p.from_port && i.from_port <= p.to_port {
                    cuts.insert(i.from_port);
                }
                if i.to_port >= p.from_port && i.to_port < p.to_port {
                    cuts.insert(i.to_port + 1);
                }
            }
            let starts: Vec<i32> = cuts.into_iter().collect();
            starts.iter().enumerate().all(|(k, &from)| {
                let to = starts.get(k + 1).map_or(p.to_port, |next| next - 1);
                let peers: Vec<&SgPeer> = intent
                    .iter()
                    .filter(|i| {
                        i.protocol == SgProtocol::All
                            || (i.protocol == p.protocol && i.from_port <= from && to <= i.to_port)
                    })
                    .map(|i| &i.peer)
                    .collect();
                peer_covered(&p.peer, &peers)
            })
        }
        _ => {
            let peers: Vec<&SgPeer> = intent
                .iter()
                .filter(|i| traffic_covers(i, p))
                .map(|i| &i.peer)
                .collect();
            peer_covered(&p.peer, &peers)
        }
    }
}

/// Whether `a` and `b` admit some traffic in common (peers aside).
fn overlaps(a: &SgPermission, b: &SgPermission) -> bool {
    match (a.protocol, b.protocol) {
        (SgProtocol::All, _) | (_, SgProtocol::All) => true,
        (x, y) if x != y => false,
        (SgProtocol::Tcp | SgProtocol::Udp, _) => {
            a.from_port <= b.to_port && b.from_port <= a.to_port
        }
        (SgProtocol::Icmp | SgProtocol::Icmpv6, _) => {
            a.from_port == -1
                || b.from_port == -1
                || (a.from_port == b.from_port
                    && (a.to_port == -1 || b.to_port == -1 || a.to_port == b.to_port))
        }
        _ => a.from_port == b.from_port && a.to_port == b.to_port,
    }
}

/// Whether the union of `peers` includes `peer`.
fn peer_covered(peer: &SgPeer, peers: &[&SgPeer]) -> bool {
    let net = match peer {
        SgPeer::Ipv4(n) => IpNet::V4(*n),
        SgPeer::Ipv6(n) => IpNet::V6(*n),
        other => return peers.contains(&other),
    };
    let nets: Vec<IpNet> = peers
        .iter()
        .filter_map(|p| match p {
            SgPeer::Ipv4(n) => Some(IpNet::V4(*n)),
            SgPeer::Ipv6(n) => Some(IpNet::V6(*n)),
            _ => None,
        })
        .collect();
    net_covered(net, &nets)
}

/// Whether the union of `nets` includes all of `net`: some net contains
/// it, or both of its halves are covered (only split while some net lies
/// strictly inside, so the recursion is bounded by the nets given).
fn net_covered(net: IpNet, nets: &[IpNet]) -> bool {
    if nets.iter().any(|n| n.contains(&net)) {
        return true;
    }
    let inside: Vec<IpNet> = nets
        .iter()
        .filter(|n| net.contains(*n) && **n != net)
        .copied()
        .collect();
    if inside.is_empty() {
        return false;
    }
    match net.subnets(net.prefix_len() + 1) {
        Ok(halves) => halves.into_iter().all(|h| net_covered(h, &inside)),
        Err(_) => false,
    }
}

/// Traffic reachable on a node from the whole of one address range after
/// both layers: `tcp/22 from 0.0.0.0/0`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Exposed {
    /// Protocol and ports (the peer is `scope`).
    pub traffic: SgPermission,
}

impl fmt::Display for Exposed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} from {}", traffic(&self.traffic), self.traffic.peer)
    }
}

/// Most entries [`exposure`] returns per scope; the rest are counted by
/// the caller from the returned `more`.
pub const MAX_EXPOSED: usize = 16;

/// What the *whole* of each `scope` (say `0.0.0.0/0`, `::/0`, the VPC) can
/// reach inbound on a node, after both layers: the union of every group on
/// its interface (`groups`: every rule, Palisade's or not) intersected with
/// the node layer (`node`: what the Enforce policies governing its inbound
/// traffic admit; `None` when none does and the node layer drops nothing).
///
/// TCP/UDP are reported as maximal port ranges; other protocols per rule.
/// Sorted; at most [`MAX_EXPOSED`] entries per scope, and the number left
/// out.
pub fn exposure(
    groups: &[SgPermission],
    node: Option<&[SgPermission]>,
    scopes: &[IpNet],
) -> (Vec<Exposed>, usize) {
    let mut out = BTreeSet::new();
    for scope in scopes {
        let peer = match scope {
            IpNet::V4(n) => SgPeer::Ipv4(*n),
            IpNet::V6(n) => SgPeer::Ipv6(*n),
        };
        let admits = |p: &SgPermission| covered(p, groups) && node.is_none_or(|n| covered(p, n));
        // Candidates: the traffic of each group rule, from the scope.
        let mut candidates: BTreeSet<(SgProtocol, i32, i32)> = BTreeSet::new();
        for r in groups {
            candidates.insert((r.protocol, r.from_port, r.to_port));
        }
        let all = SgPermission {
            protocol: SgProtocol::All,
            from_port: -1,
            to_port: -1,
            peer: peer.clone(),
        };
        if admits(&all) {
            out.insert(Exposed { traffic: all });
            continue;
        }
        for (protocol, from, to) in candidates {
            match protocol {
                SgProtocol::All => {
                    // Not all of it (checked above): its TCP and UDP pieces.
                    for p in [SgProtocol::Tcp, SgProtocol::Udp] {
                        for (a, b) in open_ranges(p, 0, 65535, &peer, groups, node) {
                            out.insert(Exposed {
                                traffic: SgPermission {
                                    protocol: p,
                                    from_port: a,
                                    to_port: b,
                                    peer: peer.clone(),
                                },
                            });
                        }
                    }
                }
                SgProtocol::Tcp | SgProtocol::Udp => {
                    for (a, b) in open_ranges(protocol, from, to, &peer, groups, node) {
                        out.insert(Exposed {
                            traffic: SgPermission {
                                protocol,
                                from_port: a,
                                to_port: b,
                                peer: peer.clone(),
                            },
                        });
                    }
                }
                _ => {
                    let p = SgPermission {
                        protocol,
                        from_port: from,
                        to_port: to,
                        peer: peer.clone(),
                    };
                    if admits(&p) {
                        out.insert(Exposed { traffic: p });
                    }
                }
            }
        }
    }
    // Merge overlapping or adjacent TCP/UDP ranges of one scope.
    let mut merged: Vec<Exposed> = Vec::new();
    for e in out {
        if let Some(last) = merged.last_mut() {
            let (l, t) = (&mut last.traffic, &e.traffic);
            if matches!(t.protocol, SgProtocol::Tcp | SgProtocol::Udp)
                && l.protocol == t.protocol
                && l.peer == t.peer
                && t.from_port <= l.to_port.saturating_add(1)
            {
                l.to_port = l.to_port.max(t.to_port);
                continue;
            }
        }
        merged.push(e);
    }
    // Keep at most MAX_EXPOSED per scope.
    let mut kept = Vec::new();
    let mut left = 0;
    let mut per_scope: std::collections::BTreeMap<SgPeer, usize> =
        std::collections::BTreeMap::new();
    for e in merged {
        let n = per_scope.entry(e.traffic.peer.clone()).or_default();
        if *n < MAX_EXPOSED {
            *n += 1;
            kept.push(e);
        } else {
            left += 1;
        }
    }
    (kept, left)
}

/// The maximal sub-ranges of `from..=to` of `protocol` that the whole of
/// `peer` reaches through both layers.
fn open_ranges(
    protocol: SgProtocol,
    from: i32,
    to: i32,
    peer: &SgPeer,
    groups: &[SgPermission],
    node: Option<&[SgPermission]>,
) -> Vec<(i32, i32)> {
    let mut cuts: BTreeSet<i32> = BTreeSet::new();
    cuts.insert(from);
    for r in groups.iter().chain(node.unwrap_or_default()) {
        if r.protocol != protocol {
            continue;
        }
        if r.from_port > from && r.from_port <= to {
            cuts.insert(r.from_port);
        }
        if r.to_port >= from && r.to_port < to {
            cuts.insert(r.to_port + 1);
        }
    }
    let starts: Vec<i32> = cuts.into_iter().collect();
    let mut open: Vec<(i32, i32)> = Vec::new();
    for (k, &a) in starts.iter().enumerate() {
        let b = starts.get(k + 1).map_or(to, |next| next - 1);
        let p = SgPermission {
            protocol,
            from_port: a,
            to_port: b,
            peer: peer.clone(),
        };
        if covered(&p, groups) && node.is_none_or(|n| covered(&p, n)) {
            match open.last_mut() {
                Some(last) if last.1 + 1 == a => last.1 = b,
                _ => open.push((a, b)),
            }
        }
    }
    open
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn perm(protocol: SgProtocol, from: i32, to: i32, peer: &str) -> SgPermission {
        let peer = if let Ok(n) = peer.parse::<ipnet::Ipv4Net>() {
            SgPeer::Ipv4(n)
        } else if let Ok(n) = peer.parse::<ipnet::Ipv6Net>() {
            SgPeer::Ipv6(n)
        } else {
            SgPeer::SecurityGroup(peer.to_string())
        };
        SgPermission {
            protocol,
            from_port: from,
            to_port: to,
            peer,
        }
    }
    fn tcp(from: i32, to: i32, peer: &str) -> SgPermission {
        perm(SgProtocol::Tcp, from, to, peer)
    }

    #[test]
    fn a_rule_is_covered_by_an_equal_or_wider_one() {
        let intent = [tcp(22, 22, "203.0.113.0/24")];
        assert!(covered(&tcp(22, 22, "203.0.113.0/24"), &intent));
        assert!(covered(&tcp(22, 22, "203.0.113.128/25"), &intent));
        assert!(!covered(&tcp(22, 22, "0.0.0.0/0"), &intent));
        assert!(!covered(&tcp(22, 23, "203.0.113.0/24"), &intent));
        assert!(!covered(
            &perm(SgProtocol::Udp, 22, 22, "203.0.113.0/24"),
            &intent
        ));
    }

    #[test]
    fn unions_cover_across_ranges_and_cidrs() {
        let intent = [
            tcp(80, 89, "10.0.0.0/9"),
            tcp(80, 89, "10.128.0.0/9"),
            tcp(90, 100, "10.0.0.0/8"),
        ];
        assert!(covered(&tcp(80, 100, "10.0.0.0/8"), &intent));
        assert!(covered(&tcp(85, 95, "10.1.2.0/24"), &intent));
        assert!(!covered(&tcp(80, 101, "10.0.0.0/8"), &intent));
        assert!(!covered(&tcp(79, 100, "10.0.0.0/8"), &intent));
        assert!(!covered(&tcp(80, 100, "10.0.0.0/7"), &intent));
        // A gap in the middle.
        let gap = [tcp(80, 84, "10.0.0.0/8"), tcp(86, 90, "10.0.0.0/8")];
        assert!(!covered(&tcp(80, 90, "10.0.0.0/8"), &gap));
        assert!(covered(&tcp(86, 90, "10.0.0.0/8"), &gap));
    }

    #[test]
    fn every_protocol_is_covered_only_by_every_protocol() {
        let all = perm(SgProtocol::All, -1, -1, "10.0.0.0/8");
        let split = [
            tcp(0, 65535, "10.0.0.0/8"),
            perm(SgProtocol::Udp, 0, 65535, "10.0.0.0/8"),
            perm(SgProtocol::Icmp, -1, -1, "10.0.0.0/8"),
        ];
        assert!(!covered(&all, &split));
        assert!(covered(&all, &[perm(SgProtocol::All, -1, -1, "0.0.0.0/0")]));
        assert!(covered(
            &tcp(22, 22, "10.1.1.1/32"),
            std::slice::from_ref(&all)
        ));
    }

    #[test]
    fn icmp_types_and_references() {
        let echo = perm(SgProtocol::Icmp, 8, -1, "0.0.0.0/0");
        assert!(covered(
            &echo,
            &[perm(SgProtocol::Icmp, -1, -1, "0.0.0.0/0")]
        ));
        assert!(covered(
            &echo,
            &[perm(SgProtocol::Icmp, 8, -1, "0.0.0.0/0")]
        ));
        assert!(!covered(
            &echo,
            &[perm(SgProtocol::Icmp, 0, -1, "0.0.0.0/0")]
        ));
        assert!(!covered(
            &perm(SgProtocol::Icmp, -1, -1, "0.0.0.0/0"),
            std::slice::from_ref(&echo)
        ));
        // A referenced group is covered by the same reference only.
        let by_group = tcp(443, 443, "sg-0peer");
        assert!(covered(&by_group, &[tcp(0, 65535, "sg-0peer")]));
        assert!(!covered(&by_group, &[tcp(443, 443, "0.0.0.0/0")]));
        // IPv6 is not covered by IPv4 and vice versa.
        assert!(!covered(&tcp(22, 22, "::/0"), &[tcp(22, 22, "0.0.0.0/0")]));
    }

    fn rule(
        id: &str,
        direction: Direction,
        p: SgPermission,
        description: Option<&str>,
    ) -> CurrentSgRule {
        CurrentSgRule {
            rule_id: id.into(),
            direction,
            permission: p,
            description: description.map(str::to_string),
        }
    }

    fn intent(ingress: Vec<SgPermission>) -> Intent {
        Intent {
            ingress: Some(ingress),
            egress: None,
        }
    }

    #[test]
    fn wider_foreign_rules_are_reported_with_group_rule_and_nodes() {
        let cloud = intent(vec![tcp(22, 22, "203.0.113.0/24")]);
        let groups = vec![
            AttachedGroup {
                id: "sg-0abc".into(),
                name: "eks-cluster-sg-prod".into(),
                palisade: false,
                nodes: 12,
                rules: vec![
                    rule(
                        "sgr-wide",
                        Direction::Ingress,
                        tcp(22, 22, "0.0.0.0/0"),
                        None,
                    ),
                    rule(
                        "sgr-narrow",
                        Direction::Ingress,
                        tcp(22, 22, "203.0.113.7/32"),
                        None,
                    ),
                    // Outbound: the policy does not govern egress.
                    rule(
                        "sgr-egress",
                        Direction::Egress,
                        perm(SgProtocol::All, -1, -1, "0.0.0.0/0"),
                        None,
                    ),
                    // Another policy's rule in an adopted group: intended.
                    rule(
                        "sgr-other-policy",
                        Direction::Ingress,
                        tcp(80, 80, "0.0.0.0/0"),
                        Some("palisade:web/http"),
                    ),
                ],
            },
            AttachedGroup {
                id: "sg-0pal".into(),
                name: "palisade-other".into(),
                palisade: true,
                nodes: 12,
                rules: vec![rule(
                    "sgr-p",
                    Direction::Ingress,
                    tcp(0, 65535, "0.0.0.0/0"),
                    None,
                )],
            },
        ];
        let found = widenings(
            "web-server",
            PolicyMode::Enforce,
            &cloud,
            &cloud,
            None,
            &groups,
        );
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(
            found[0].to_string(),
            "sg-0abc (eks-cluster-sg-prod) on 12 nodes allows inbound tcp/22 from 0.0.0.0/0 (rule sgr-wide); web-server allows it only from 203.0.113.0/24 (the node layer still blocks it)"
        );
        // Audit: the node layer blocks nothing.
        let audit = widenings(
            "web-server",
            PolicyMode::Audit,
            &cloud,
            &cloud,
            None,
            &groups,
        );
        assert!(!audit[0].node_layer_blocks);
        // A Node-layer rule admitting it: the node layer does not block it.
        let node = intent(vec![tcp(0, 65535, "0.0.0.0/0")]);
        let open = widenings(
            "web-server",
            PolicyMode::Enforce,
            &cloud,
            &node,
            None,
            &groups,
        );
        assert!(!open[0].node_layer_blocks);
    }

    #[test]
    fn the_policys_own_rules_are_not_foreign_but_others_in_its_adopted_group_are() {
        let cloud = intent(vec![tcp(443, 443, "10.0.0.0/8")]);
        let groups = vec![AttachedGroup {
            id: "sg-0own".into(),
            name: "shared".into(),
            palisade: false,
            nodes: 3,
            rules: vec![
                rule(
                    "sgr-mine",
                    Direction::Ingress,
                    tcp(443, 443, "10.0.0.0/8"),
                    Some("palisade:api/https"),
                ),
                rule(
                    "sgr-legacy",
                    Direction::Ingress,
                    tcp(3306, 3306, "0.0.0.0/0"),
                    Some("old db"),
                ),
            ],
        }];
        let found = widenings(
            "api",
            PolicyMode::Enforce,
            &cloud,
            &cloud,
            Some(("sg-0own", GroupOwnership::Adopted)),
            &groups,
        );
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].rule_id, "sgr-legacy");
        assert!(found[0].intended_peers.is_empty());
        assert!(found[0].to_string().contains("api does not allow it"));
        // A group the policy created holds only its own rules.
        let created = widenings(
            "api",
            PolicyMode::Enforce,
            &cloud,
            &cloud,
            Some(("sg-0own", GroupOwnership::Created)),
            &groups,
        );
        assert!(created.is_empty());
    }

    #[test]
    fn exposure_is_the_intersection_of_the_union_and_the_node_layer() {
        let anywhere: IpNet = "0.0.0.0/0".parse().unwrap();
        let vpc: IpNet = "10.0.0.0/16".parse().unwrap();
        let groups = [
            tcp(22, 22, "0.0.0.0/0"),
            tcp(443, 443, "0.0.0.0/0"),
            tcp(8000, 8100, "0.0.0.0/1"),
            tcp(8000, 8100, "128.0.0.0/1"),
            perm(SgProtocol::All, -1, -1, "10.0.0.0/8"),
        ];
        // The node layer admits 443 from anywhere, 8050-9000 from anywhere,
        // everything from the VPC.
        let node = [
            tcp(443, 443, "0.0.0.0/0"),
            tcp(8050, 9000, "0.0.0.0/0"),
            perm(SgProtocol::All, -1, -1, "10.0.0.0/16"),
        ];
        let (found, left) = exposure(&groups, Some(&node), &[anywhere, vpc]);
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "tcp/443 from 0.0.0.0/0",
                "tcp/8050-8100 from 0.0.0.0/0",
                "all traffic from 10.0.0.0/16"
            ],
        );
        assert_eq!(left, 0);
        // No Enforce policy on the node: the union alone decides.
        let (open, _) = exposure(&groups, None, &[anywhere]);
        let text: Vec<String> = open.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "tcp/22 from 0.0.0.0/0",
                "tcp/443 from 0.0.0.0/0",
                "tcp/8000-8100 from 0.0.0.0/0"
            ]
        );
        // Nothing from anywhere when no rule admits all of it.
        let (none, _) = exposure(&[tcp(22, 22, "203.0.113.0/24")], None, &[anywhere]);
        assert!(none.is_empty());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;
        use std::net::Ipv4Addr;

        /// A TCP/UDP rule inside a small world: ports 0-15, 10.0.0.0/28.
        fn small_rule() -> impl Strategy<Value = SgPermission> {
            (0..2u8, 0..16i32, 0..16i32, 0..16u8, 28..=32u8).prop_map(|(pr, a, b, host, len)| {
                let net = ipnet::Ipv4Net::new(Ipv4Addr::new(10, 0, 0, host), len)
                    .map(|n| n.trunc())
                    .unwrap();
                SgPermission {
                    protocol: if pr == 0 {
                        SgProtocol::Tcp
                    } else {
                        SgProtocol::Udp
                    },
                    from_port: a.min(b),
                    to_port: a.max(b),
                    peer: SgPeer::Ipv4(net),
                }
            })
        }

        fn admits(p: &SgPermission, proto: SgProtocol, port: i32, addr: Ipv4Addr) -> bool {
            let SgPeer::Ipv4(net) = &p.peer else {
                return false;
            };
            p.protocol == proto && p.from_port <= port && port <= p.to_port && net.contains(&addr)
        }

        proptest! {
            /// `covered` agrees with checking every (port, address) point.
            #[test]
            fn covered_is_exact_on_every_point(
                foreign in small_rule(),
                intent in proptest::collection::vec(small_rule(), 0..6),
            ) {
                let SgPeer::Ipv4(net) = &foreign.peer else { unreachable!() };
                let brute = (foreign.from_port..=foreign.to_port).all(|port| {
                    net.hosts().chain([net.network(), net.broadcast()]).all(|addr| {
                        intent.iter().any(|i| admits(i, foreign.protocol, port, addr))
                    })
                });
                prop_assert_eq!(covered(&foreign, &intent), brute);
            }
        }
    }
}
