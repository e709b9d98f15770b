//! The cloud layer: a policy's rules as canonical Security Group permissions,
//! with AWS's quota accounting.
//!
//! AWS models each Security Group rule as one protocol, one port range (for
//! ICMP: type and code, `-1` for any) and one peer (an IPv4 CIDR, an IPv6
//! CIDR, a referenced group or a prefix list). [`plan_cloud`] expands every
//! rule enforced on the `Cloud` layer into such permissions, de-duplicated
//! and sorted, so the same policy always yields the same plan.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

use crate::api::{Layer, PolicyMode, Protocol};

use super::facts::Facts;
use super::validate::{PeerRef, ValidPolicy, ValidRule};
use super::warnings::{Covers, Produced, Warning, lint};
use super::{Direction, IpFamily, PolicyError};

/// Prefix of every Security Group rule description Palisade writes; the
/// policy name and `/` follow. It is how Palisade recognises its own rules
/// in a group it adopted (see [`super::sgdiff`]).
pub const DESCRIPTION_MARKER: &str = "palisade:";

/// Longest description AWS accepts on a Security Group rule.
pub const MAX_DESCRIPTION: usize = 255;

/// The IP protocol of a Security Group rule, as AWS names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum SgProtocol {
    /// `tcp` (6).
    Tcp,
    /// `udp` (17).
    Udp,
    /// `icmp` (1).
    Icmp,
    /// `58` (AWS also accepts `icmpv6` on input).
    Icmpv6,
    /// `-1`: every protocol.
    All,
    /// Any other protocol number, as found in groups Palisade did not write
    /// (Palisade never plans one).
    Number(u8),
}

impl SgProtocol {
    /// The `IpProtocol` string to send to AWS.
    pub fn aws_name(&self) -> String {
        match self {
            SgProtocol::Tcp => "tcp".into(),
            SgProtocol::Udp => "udp".into(),
            SgProtocol::Icmp => "icmp".into(),
            SgProtocol::Icmpv6 => "58".into(),
            SgProtocol::All => "-1".into(),
            SgProtocol::Number(n) => n.to_string(),
        }
    }

    /// Reads AWS's `IpProtocol` (`tcp`, `6`, `icmpv6`, `58`, `-1`, `all`, any
    /// number 0-255), case-insensitively.
    pub fn from_aws(name: &str) -> Option<SgProtocol> {
        Some(match name.to_ascii_lowercase().as_str() {
            "tcp" | "6" => SgProtocol::Tcp,
            "udp" | "17" => SgProtocol::Udp,
            "icmp" | "1" => SgProtocol::Icmp,
            "icmpv6" | "58" => SgProtocol::Icmpv6,
            "-1" | "all" => SgProtocol::All,
            other => SgProtocol::Number(other.parse().ok()?),
        })
    }

    pub(crate) fn of(protocol: Protocol) -> SgProtocol {
        match protocol {
            Protocol::Tcp => SgProtocol::Tcp,
            Protocol::Udp => SgProtocol::Udp,
            Protocol::Icmp => SgProtocol::Icmp,
            Protocol::Icmpv6 => SgProtocol::Icmpv6,
            Protocol::All => SgProtocol::All,
        }
    }
}

/// The one peer of a Security Group rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum SgPeer {
    /// `CidrIpv4`.
    Ipv4(Ipv4Net),
    /// `CidrIpv6`.
    Ipv6(Ipv6Net),
    /// `ReferencedGroupId`.
    SecurityGroup(String),
    /// `PrefixListId`.
    PrefixList(String),
}

impl SgPeer {
    /// Builds a peer from the fields of an AWS `SecurityGroupRule`; exactly
    /// one must be set. CIDRs are parsed and made canonical.
    pub fn from_aws(
        cidr_ipv4: Option<&str>,
        cidr_ipv6: Option<&str>,
        referenced_group_id: Option<&str>,
        prefix_list_id: Option<&str>,
    ) -> Result<SgPeer, String> {
        match (cidr_ipv4, cidr_ipv6, referenced_group_id, prefix_list_id) {
            (Some(c), None, None, None) => {
                c.parse::<Ipv4Net>().map(|n| SgPeer::Ipv4(n.trunc())).map_err(|_| format!("{c:?} is not an IPv4 CIDR"))
            }
            (None, Some(c), None, None) => {
                c.parse::<Ipv6Net>().map(|n| SgPeer::Ipv6(n.trunc())).map_err(|_| format!("{c:?} is not an IPv6 CIDR"))
            }
            (None, None, Some(g), None) => Ok(SgPeer::SecurityGroup(g.to_string())),
            (None, None, None, Some(p)) => Ok(SgPeer::PrefixList(p.to_string())),
            _ => Err("the rule must have exactly one of CidrIpv4, CidrIpv6, ReferencedGroupId, PrefixListId".into()),
        }
    }

    fn of_net(net: IpNet) -> SgPeer {
        match net {
            IpNet::V4(n) => SgPeer::Ipv4(n),
            IpNet::V6(n) => SgPeer::Ipv6(n),
        }
    }
}

impl fmt::Display for SgPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SgPeer::Ipv4(n) => n.fmt(f),
            SgPeer::Ipv6(n) => n.fmt(f),
            SgPeer::SecurityGroup(id) | SgPeer::PrefixList(id) => f.write_str(id),
        }
    }
}

/// The identity of a Security Group rule: protocol, ports and peer. The
/// description is not part of it (AWS lets Palisade change descriptions in
/// place), so two rules with equal `SgPermission`s are the same rule to AWS,
/// which refuses to hold both.
///
/// Canonical form: `All` has ports `-1/-1`; TCP/UDP without ports is
/// `0-65535`; ICMP without a type is `-1/-1`, a type without a code `t/-1`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SgPermission {
    /// Protocol.
    pub protocol: SgProtocol,
    /// First port, or ICMP type (`-1`: any).
    pub from_port: i32,
    /// Last port, or ICMP code (`-1`: any).
    pub to_port: i32,
    /// The peer.
    pub peer: SgPeer,
}

impl SgPermission {
    /// Builds a permission from the fields of an AWS `SecurityGroupRule`,
    /// canonicalising what AWS may spell several ways (`6` for `tcp`, absent
    /// ports for `-1`). `from_aws` of what [`SgProtocol::aws_name`] and the
    /// port fields give back is the identity.
    pub fn from_aws(
        ip_protocol: &str,
        from_port: Option<i32>,
        to_port: Option<i32>,
        peer: SgPeer,
    ) -> Result<SgPermission, String> {
        let protocol = SgProtocol::from_aws(ip_protocol)
            .ok_or_else(|| format!("unknown IpProtocol {ip_protocol:?}"))?;
        let (from_port, to_port) = match protocol {
            SgProtocol::All => (-1, -1),
            SgProtocol::Tcp | SgProtocol::Udp => {
                let from = from_port.unwrap_or(0);
                let to = to_port.unwrap_or(65535);
                // AWS reports "all ports" of TCP/UDP as 0-65535; -1 is read the same way.
                if from == -1 && to == -1 {
                    (0, 65535)
                } else if (0..=65535).contains(&from) && (from..=65535).contains(&to) {
                    (from, to)
                } else {
                    return Err(format!("port range {from}-{to} is out of range"));
                }
            }
            SgProtocol::Icmp | SgProtocol::Icmpv6 => {
                let t = from_port.unwrap_or(-1);
                let c = if t == -1 { -1 } else { to_port.unwrap_or(-1) };
                if !(-1..=255).contains(&t) || !(-1..=255).contains(&c) {
                    return Err(format!("ICMP type/code {t}/{c} is out of range"));
                }
                (t, c)
            }
            SgProtocol::Number(_) => (from_port.unwrap_or(-1), to_port.unwrap_or(-1)),
        };
        Ok(SgPermission {
            protocol,
            from_port,
            to_port,
            peer,
        })
    }

    /// The address families this permission counts against in AWS's quota.
    fn families(&self) -> &'static [IpFamily] {
        match &self.peer {
            SgPeer::Ipv4(_) => &[IpFamily::V4],
            SgPeer::Ipv6(_) => &[IpFamily::V6],
            SgPeer::SecurityGroup(_) | SgPeer::PrefixList(_) => &[IpFamily::V4, IpFamily::V6],
        }
    }

    /// The all-traffic egress rules AWS puts in a new group (`-1` to
    /// `0.0.0.0/0`, and `::/0` where the VPC has IPv6).
    pub fn default_egress() -> [SgPermission; 2] {
        let all = |peer| SgPermission {
            protocol: SgProtocol::All,
            from_port: -1,
            to_port: -1,
            peer,
        };
        [
            all(SgPeer::Ipv4(Ipv4Net::default())),
            all(SgPeer::Ipv6(Ipv6Net::default())),
        ]
    }
}

impl Covers for SgPermission {
    fn covers(&self, other: &Self) -> bool {
        let peer = match (&self.peer, &other.peer) {
            (SgPeer::Ipv4(a), SgPeer::Ipv4(b)) => a.contains(b),
            (SgPeer::Ipv6(a), SgPeer::Ipv6(b)) => a.contains(b),
            (a, b) => a == b,
        };
        peer && traffic_covers(self, other)
    }
}

/// Whether `a`'s protocol and ports include all of `b`'s (peers aside).
pub(crate) fn traffic_covers(a: &SgPermission, b: &SgPermission) -> bool {
    match (a.protocol, b.protocol) {
        (SgProtocol::All, _) => true,
        (x, y) if x != y => false,
        (SgProtocol::Tcp | SgProtocol::Udp, _) => {
            a.from_port <= b.from_port && b.to_port <= a.to_port
        }
        (SgProtocol::Icmp | SgProtocol::Icmpv6, _) => {
            a.from_port == -1
                || (a.from_port == b.from_port && (a.to_port == -1 || a.to_port == b.to_port))
        }
        _ => a.from_port == b.from_port && a.to_port == b.to_port,
    }
}

/// `tcp 22 203.0.113.0/24`, `icmp 3/4 0.0.0.0/0`, `all ::/0`.
impl fmt::Display for SgPermission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            SgProtocol::Icmpv6 => "icmpv6".to_string(),
            SgProtocol::All => "all".to_string(),
            p => p.aws_name(),
        };
        match self.protocol {
            SgProtocol::All => write!(f, "{proto} {}", self.peer),
            SgProtocol::Tcp | SgProtocol::Udp if self.from_port == self.to_port => {
                write!(f, "{proto} {} {}", self.from_port, self.peer)
            }
            SgProtocol::Tcp | SgProtocol::Udp => write!(
                f,
                "{proto} {}-{} {}",
                self.from_port, self.to_port, self.peer
            ),
            _ if self.from_port == -1 => write!(f, "{proto} {}", self.peer),
            _ if self.to_port == -1 => write!(f, "{proto} {} {}", self.from_port, self.peer),
            _ => write!(
                f,
                "{proto} {}/{} {}",
                self.from_port, self.to_port, self.peer
            ),
        }
    }
}

/// A permission the plan wants, with the description that traces it back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedPermission {
    /// The rule's identity.
    pub permission: SgPermission,
    /// `palisade:<policy>/<rule>[ <rule description>]`, ASCII, at most 255
    /// characters, AWS's character set. Names the first rule (by name)
    /// producing the permission.
    pub description: String,
    /// Every rule of the policy producing this permission, sorted.
    pub rules: Vec<String>,
}

/// Rules per address family, as AWS counts them against the quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FamilyCount {
    /// IPv4 rules.
    pub ipv4: u32,
    /// IPv6 rules.
    pub ipv6: u32,
}

impl FamilyCount {
    /// The count for one family.
    pub fn get(&self, family: IpFamily) -> u32 {
        match family {
            IpFamily::V4 => self.ipv4,
            IpFamily::V6 => self.ipv6,
        }
    }
    fn add(&mut self, family: IpFamily, n: u32) {
        match family {
            IpFamily::V4 => self.ipv4 = self.ipv4.saturating_add(n),
            IpFamily::V6 => self.ipv6 = self.ipv6.saturating_add(n),
        }
    }
}

/// Adds the quota cost of `planned` (one `direction` of a group) to
/// `count`: a CIDR once toward its family, a referenced group once toward
/// each, a known prefix list its `max_entries`; plus AWS's default egress
/// rule when the group keeps it and the plan does not already hold it.
fn count_rules(
    count: &mut FamilyCount,
    planned: &BTreeMap<SgPermission, PlannedPermission>,
    facts: &Facts,
    direction: Direction,
    keeps_default_egress: bool,
) {
    for p in planned.values() {
        let cost = match &p.permission.peer {
            SgPeer::PrefixList(id) => facts
                .prefix_lists
                .get(id)
                .map(|pl| (pl.family, pl.max_entries)),
            _ => None,
        };
        match cost {
            Some((family, n)) => count.add(family, n),
            None => p
                .permission
                .families()
                .iter()
                .for_each(|f| count.add(*f, 1)),
        }
    }
    if direction == Direction::Egress
        && keeps_default_egress
        && !planned.contains_key(&SgPermission::default_egress()[0])
    {
        count.add(IpFamily::V4, 1);
    }
}

/// Quota use of one policy's group, per direction and family. An IPv4 or
/// IPv6 CIDR counts once toward its family; a referenced group once toward
/// each; a prefix list its `max_entries` toward its family (one toward each
/// while unresolved); the default egress rule kept in Audit mode once toward
/// IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaUsage {
    /// Rules allowed per direction and family.
    pub limit: u32,
    /// Inbound rules.
    pub ingress: FamilyCount,
    /// Outbound rules.
    pub egress: FamilyCount,
}

impl QuotaUsage {
    /// The count for one direction.
    pub fn direction(&self, direction: Direction) -> FamilyCount {
        match direction {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }
}

/// What one policy wants in its Security Group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudPlan {
    /// Policy name (the marker in every description).
    pub policy: String,
    /// The policy's mode.
    pub mode: PolicyMode,
    /// Inbound permissions, sorted; `None`: the policy does not speak for
    /// inbound traffic and the group's inbound rules are not Palisade's to set.
    pub ingress: Option<Vec<PlannedPermission>>,
    /// Outbound permissions, sorted; `None`: the group's default egress is
    /// left as it is.
    pub egress: Option<Vec<PlannedPermission>>,
    /// True when the group's default all-traffic egress rules
    /// ([`SgPermission::default_egress`]) must never be revoked: in `Audit`
    /// mode (the cloud side of an audit never drops more than before) and
    /// when `egress` is `None`.
    pub keeps_default_egress: bool,
    /// Rule counts as AWS counts them.
    pub quota: QuotaUsage,
    /// Duplicate or shadowed permissions, quota near, prefix lists of
    /// unknown size. Sorted.
    pub warnings: Vec<Warning>,
}

impl CloudPlan {
    /// What the controller writes to the group: the plan itself in
    /// Enforce. In Audit, no permission at all — on a Security Group every
    /// allow can only widen access (groups on an interface are a union),
    /// so the cloud side of a dry run authorizes nothing, and Palisade's
    /// own rules in the group are revoked (switching Enforce to Audit
    /// removes them); the group's default egress stays.
    pub fn applied(&self) -> CloudPlan {
        if self.mode == PolicyMode::Enforce {
            return self.clone();
        }
        CloudPlan {
            ingress: self.ingress.as_ref().map(|_| Vec::new()),
            egress: self.egress.as_ref().map(|_| Vec::new()),
            keeps_default_egress: true,
            ..self.clone()
        }
    }

    /// Number of permissions planned, both directions.
    pub fn planned(&self) -> usize {
        self.ingress.iter().chain(&self.egress).map(Vec::len).sum()
    }

    /// The permissions of one direction (`None` when the plan does not
    /// speak for it).
    pub fn permissions(&self, direction: Direction) -> Option<&[PlannedPermission]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// The description prefix that marks this policy's rules:
    /// `palisade:<policy>/`.
    pub fn marker(&self) -> String {
        marker(&self.policy)
    }
}

/// The description prefix that marks `policy`'s rules: `palisade:<policy>/`.
pub fn marker(policy: &str) -> String {
    format!("{DESCRIPTION_MARKER}{policy}/")
}

/// The description of a permission produced by `rule` of `policy`.
fn describe(policy: &str, rule: &ValidRule) -> String {
    let mut text = format!("{}{}", marker(policy), rule.name);
    if let Some(desc) = rule.description.as_deref().filter(|d| !d.is_empty()) {
        text.push(' ');
        text.push_str(desc);
    }
    // Everything here is ASCII (validated), so byte truncation is safe;
    // the guard keeps it so if that ever changes.
    let mut end = text.len().min(MAX_DESCRIPTION);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

/// The (from, to) port pairs a rule becomes on AWS.
pub(crate) fn port_pairs(rule: &ValidRule) -> Vec<(i32, i32)> {
    match rule.protocol {
        Protocol::Tcp | Protocol::Udp if rule.ports.is_empty() => vec![(0, 65535)],
        Protocol::Tcp | Protocol::Udp => rule
            .ports
            .iter()
            .map(|p| (i32::from(p.first), i32::from(p.last)))
            .collect(),
        Protocol::Icmp | Protocol::Icmpv6 => vec![rule.icmp.map_or((-1, -1), |m| {
            (i32::from(m.icmp_type), m.code.map_or(-1, i32::from))
        })],
        Protocol::All => vec![(-1, -1)],
    }
}

/// The AWS peers a rule's peer stands for. `nodeSelector` peers become the
/// matched nodes' addresses of the families the protocol can carry.
pub(crate) fn sg_peers(rule: &ValidRule, peer: &PeerRef, facts: &Facts) -> Vec<SgPeer> {
    match peer {
        PeerRef::Cidr(net) => vec![SgPeer::of_net(*net)],
        PeerRef::SecurityGroup(id) => vec![SgPeer::SecurityGroup(id.clone())],
        PeerRef::PrefixList(id) => vec![SgPeer::PrefixList(id.clone())],
        PeerRef::Nodes(selector) => selector
            .select(&facts.nodes)
            .into_iter()
            .flat_map(|n| n.addresses.iter())
            .filter(|a| rule.families().contains(&IpFamily::of_addr(a)))
            .map(|a| SgPeer::of_net(IpNet::from(*a)))
            .collect(),
    }
}

/// Compiles the `Cloud`-layer rules of `policy` into a [`CloudPlan`].
///
/// Contract: pure and deterministic (the order of rules, peers and ports in
/// the policy does not change the result); only rules enforced on the Cloud
/// layer contribute; each permission appears once, with the description of
/// the first rule (by name) producing it. Fails with
/// [`PolicyError::QuotaExceeded`] when a direction needs more rules than
/// `facts.quota` allows in either family, before any API call could fail
/// halfway; warns (in the plan) at 80 %.
pub fn plan_cloud(policy: &ValidPolicy, facts: &Facts) -> Result<CloudPlan, PolicyError> {
    let keeps_default_egress =
        policy.mode() == PolicyMode::Audit || policy.rules(Direction::Egress).is_none();
    let mut quota = QuotaUsage {
        limit: facts.quota.rules_per_direction,
        ..Default::default()
    };
    let mut warnings = Vec::new();
    let mut plan_direction = |direction: Direction| -> Option<Vec<PlannedPermission>> {
        let rules = policy.rules(direction)?;
        let mut rules: Vec<&ValidRule> = rules.iter().filter(|r| r.on(Layer::Cloud)).collect();
        rules.sort_by(|a, b| a.name.cmp(&b.name));
        let mut produced = Vec::new();
        let mut planned: BTreeMap<SgPermission, PlannedPermission> = BTreeMap::new();
        for rule in rules {
            for peer in &rule.peers {
                if let PeerRef::PrefixList(id) = peer
                    && !facts.prefix_lists.contains_key(id)
                {
                    warnings.push(Warning::UnresolvedReference {
                        policy: policy.name().to_string(),
                        direction,
                        rule: rule.name.clone(),
                        id: id.clone(),
                        layer: Layer::Cloud,
                    });
                }
                for sg_peer in sg_peers(rule, peer, facts) {
                    for (from_port, to_port) in port_pairs(rule) {
                        let permission = SgPermission {
                            protocol: SgProtocol::of(rule.protocol),
                            from_port,
                            to_port,
                            peer: sg_peer.clone(),
                        };
                        produced.push(Produced {
                            rule: rule.name.clone(),
                            item: permission.clone(),
                            unconditional: true,
                        });
                        let entry = planned.entry(permission.clone()).or_insert_with(|| {
                            PlannedPermission {
                                permission,
                                description: describe(policy.name(), rule),
                                rules: Vec::new(),
                            }
                        });
                        if !entry.rules.contains(&rule.name) {
                            entry.rules.push(rule.name.clone());
                        }
                    }
                }
            }
        }
        warnings.extend(lint(policy.name(), direction, Layer::Cloud, &produced));
        let count = match direction {
            Direction::Ingress => &mut quota.ingress,
            Direction::Egress => &mut quota.egress,
        };
        count_rules(count, &planned, facts, direction, keeps_default_egress);
        Some(planned.into_values().collect())
    };
    let ingress = plan_direction(Direction::Ingress);
    let egress = plan_direction(Direction::Egress);

    for direction in [Direction::Ingress, Direction::Egress] {
        if policy.rules(direction).is_none() {
            continue;
        }
        for family in [IpFamily::V4, IpFamily::V6] {
            let used = quota.direction(direction).get(family);
            let limit = quota.limit;
            if used > limit {
                return Err(PolicyError::QuotaExceeded {
                    policy: policy.name().to_string(),
                    direction,
                    family,
                    used,
                    limit,
                });
            }
            if u64::from(used) * 5 >= u64::from(limit) * 4 && used > 0 {
                warnings.push(Warning::QuotaNear {
                    policy: policy.name().to_string(),
                    direction,
                    family,
                    used,
                    limit,
                });
            }
        }
    }
    warnings.sort();
    warnings.dedup();
    Ok(CloudPlan {
        policy: policy.name().to_string(),
        mode: policy.mode(),
        ingress,
        egress,
        keeps_default_egress,
        quota,
        warnings,
    })
}

/// The plan of a group several policies share: the union of their plans,
/// each permission once, described by the first plan (in the order given)
/// that holds it, and counted against the quota as AWS counts it (prefix
/// lists by their size in `facts`). A direction is spoken for when any
/// plan speaks for it; the default egress stays when any plan keeps it
/// (groups on an interface are a union, so sharing changes no verdict).
pub fn union_plan(name: &str, plans: &[&CloudPlan], facts: &Facts) -> CloudPlan {
    let mut quota = QuotaUsage {
        limit: facts.quota.rules_per_direction,
        ..Default::default()
    };
    let keeps_default_egress = plans.iter().any(|p| p.keeps_default_egress);
    let mut direction_union = |direction: Direction| -> Option<Vec<PlannedPermission>> {
        let mut planned: BTreeMap<SgPermission, PlannedPermission> = BTreeMap::new();
        let mut spoken = false;
        for plan in plans {
            let Some(perms) = plan.permissions(direction) else {
                continue;
            };
            spoken = true;
            for p in perms {
                planned
                    .entry(p.permission.clone())
                    .or_insert_with(|| p.clone());
            }
        }
        if !spoken {
            return None;
        }
        let count = match direction {
            Direction::Ingress => &mut quota.ingress,
            Direction::Egress => &mut quota.egress,
        };
        count_rules(count, &planned, facts, direction, keeps_default_egress);
        Some(planned.into_values().collect())
    };
    let ingress = direction_union(Direction::Ingress);
    let egress = direction_union(Direction::Egress);
    CloudPlan {
        policy: name.to_string(),
        mode: PolicyMode::Enforce,
        ingress,
        egress,
        keeps_default_egress,
        quota,
        warnings: Vec::new(),
    }
}

impl CloudPlan {
    /// The first direction and family whose count exceeds the quota, with
    /// the count.
    pub fn over_quota(&self) -> Option<(Direction, IpFamily, u32)> {
        [Direction::Ingress, Direction::Egress]
            .into_iter()
            .flat_map(|d| [IpFamily::V4, IpFamily::V6].map(|f| (d, f)))
            .map(|(d, f)| (d, f, self.quota.direction(d).get(f)))
            .find(|(_, _, n)| *n > self.quota.limit)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::api::{Layer, PolicyMode};
    use crate::policy::facts::PrefixListFacts;
    use crate::policy::testing::*;
    use crate::policy::validate;

    fn texts(perms: &[PlannedPermission]) -> Vec<String> {
        perms
            .iter()
            .map(|p| format!("{} [{}]", p.permission, p.description))
            .collect()
    }

    #[test]
    fn seed_web_server_on_both_layers() {
        let plan = plan_cloud(&validate(&web_policy()).unwrap(), &Facts::default()).unwrap();
        assert_eq!(
            texts(plan.ingress.as_deref().unwrap()),
            [
                "tcp 22 203.0.113.0/24 [palisade:web/ssh]",
                "tcp 80 0.0.0.0/0 [palisade:web/http]",
                "tcp 80 ::/0 [palisade:web/http]",
                "tcp 443 0.0.0.0/0 [palisade:web/http]",
                "tcp 443 ::/0 [palisade:web/http]",
            ]
        );
        assert_eq!(plan.egress, None);
        assert!(plan.keeps_default_egress);
        assert_eq!(plan.quota.ingress, FamilyCount { ipv4: 3, ipv6: 2 });
        assert_eq!(plan.quota.egress, FamilyCount::default());
        assert_eq!(plan.warnings, []);
    }

    #[test]
    fn seed_jump_host_rule_stays_off_the_security_group() {
        let plan = plan_cloud(&validate(&jump_host_policy()).unwrap(), &Facts::default()).unwrap();
        // The node-only narrowing is not a cloud rule: the SG keeps SSH from the office.
        assert_eq!(
            texts(plan.ingress.as_deref().unwrap()),
            ["tcp 22 203.0.113.0/24 [palisade:bastion/ssh-office]"]
        );
    }

    #[test]
    fn aws_shapes_for_each_protocol() {
        let mut ping = rule("ping", Protocol::Icmp, &[], &["0.0.0.0/0"]);
        ping.icmp = Some(crate::api::IcmpMatch {
            icmp_type: 8,
            code: None,
        });
        let mut pmtu = rule("pmtu", Protocol::Icmpv6, &[], &["::/0"]);
        pmtu.icmp = Some(crate::api::IcmpMatch {
            icmp_type: 2,
            code: Some(0),
        });
        let any6 = rule("any6", Protocol::Icmpv6, &[], &["2001:db8::/32"]);
        let all = rule("all", Protocol::All, &[], &["10.0.0.0/8"]);
        let dns = rule("dns", Protocol::Udp, &[], &["10.0.0.2/32"]);
        let p = policy("p", vec![ping, pmtu, any6, all, dns], None);
        let plan = plan_cloud(&validate(&p).unwrap(), &Facts::default()).unwrap();
        let shapes: Vec<_> = plan
            .ingress
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p.permission.protocol.aws_name(),
                    p.permission.from_port,
                    p.permission.to_port,
                )
            })
            .collect();
        assert_eq!(
            shapes,
            [
                ("udp".to_string(), 0, 65535),
                ("icmp".to_string(), 8, -1),
                ("58".to_string(), -1, -1),
                ("58".to_string(), 2, 0),
                ("-1".to_string(), -1, -1),
            ]
        );
    }

    #[test]
    fn node_selector_peers_become_host_addresses() {
        let mut r = rule("from-db", Protocol::Tcp, &[5432], &[]);
        r.peers.push(node_peer(&[("role", "db")]));
        let p = policy("p", vec![r], None);
        let facts = facts_with_nodes();
        let plan = plan_cloud(&validate(&p).unwrap(), &facts).unwrap();
        assert_eq!(
            texts(plan.ingress.as_deref().unwrap()),
            [
                "tcp 5432 10.0.2.10/32 [palisade:p/from-db]",
                "tcp 5432 2001:db8::2:10/128 [palisade:p/from-db]"
            ]
        );
    }

    #[test]
    fn duplicates_and_shadows_are_warned() {
        let wide = rule("all-tcp", Protocol::Tcp, &[], &["0.0.0.0/0"]);
        let ssh = rule("ssh", Protocol::Tcp, &[22], &["10.0.0.0/24"]);
        let web = rule("web", Protocol::Tcp, &[80], &["0.0.0.0/0", "0.0.0.0/0"]);
        let web2 = rule("web2", Protocol::Tcp, &[80], &["0.0.0.0/0"]);
        let dns = rule("dns", Protocol::Udp, &[53], &["10.0.0.2/32", "10.0.0.2/32"]);
        let p = policy("p", vec![wide, ssh, web, web2, dns], None);
        let plan = plan_cloud(&validate(&p).unwrap(), &Facts::default()).unwrap();
        let text: Vec<String> = plan.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "policy p: rule ingress/dns produces udp 53 10.0.0.2/32 twice on the Cloud layer",
                "policy p: rules ingress/web, ingress/web2 produce the same Cloud permission tcp 80 0.0.0.0/0; it is applied once",
                "policy p: rule ingress/ssh is shadowed on the Cloud layer: ingress/all-tcp already allow all of its traffic",
            ]
        );
        let perms = plan.ingress.unwrap();
        assert_eq!(perms.len(), 4);
        let http = perms.iter().find(|p| p.permission.from_port == 80).unwrap();
        assert_eq!(http.rules, ["web", "web2"]);
        assert_eq!(http.description, "palisade:p/web");
    }

    #[test]
    fn quota_counts_as_aws_does() {
        let mut r = rule(
            "refs",
            Protocol::Tcp,
            &[443],
            &["10.0.0.0/8", "2001:db8::/32"],
        );
        r.peers.push(sg_peer("sg-0123456789abcdef0"));
        r.peers.push(pl_peer("pl-0123456789abcdef0"));
        r.peers.push(pl_peer("pl-01234567"));
        let p = policy("p", vec![r], None);
        let mut facts = Facts::default();
        facts.prefix_lists.insert(
            "pl-0123456789abcdef0".into(),
            PrefixListFacts {
                family: IpFamily::V6,
                cidrs: vec![],
                max_entries: 20,
            },
        );
        let plan = plan_cloud(&validate(&p).unwrap(), &facts).unwrap();
        // v4: cidr + sg + unresolved pl; v6: cidr + sg + 20 (pl max entries) + unresolved pl.
        assert_eq!(plan.quota.ingress, FamilyCount { ipv4: 3, ipv6: 23 });
        assert!(plan.warnings.iter().any(|w| matches!(w, Warning::UnresolvedReference { id, layer: Layer::Cloud, .. } if id == "pl-01234567")));

        facts.quota.rules_per_direction = 22;
        let err = plan_cloud(&validate(&p).unwrap(), &facts).unwrap_err();
        assert_eq!(
            err,
            PolicyError::QuotaExceeded {
                policy: "p".into(),
                direction: Direction::Ingress,
                family: IpFamily::V6,
                used: 23,
                limit: 22
            }
        );
        assert_eq!(err.reason(), "QuotaExceeded");
        facts.quota.rules_per_direction = 25;
        let plan = plan_cloud(&validate(&p).unwrap(), &facts).unwrap();
        assert!(plan.warnings.iter().any(|w| matches!(
            w,
            Warning::QuotaNear {
                used: 23,
                limit: 25,
                ..
            }
        )));
    }

    #[test]
    fn audit_keeps_default_egress_and_counts_it() {
        let mut p = policy(
            "p",
            vec![],
            Some(vec![rule("https", Protocol::Tcp, &[443], &["0.0.0.0/0"])]),
        );
        p.spec.mode = PolicyMode::Audit;
        let plan = plan_cloud(&validate(&p).unwrap(), &Facts::default()).unwrap();
        assert!(plan.keeps_default_egress);
        assert_eq!(plan.quota.egress, FamilyCount { ipv4: 2, ipv6: 0 });
        p.spec.mode = PolicyMode::Enforce;
        let plan = plan_cloud(&validate(&p).unwrap(), &Facts::default()).unwrap();
        assert!(!plan.keeps_default_egress);
        assert_eq!(plan.quota.egress, FamilyCount { ipv4: 1, ipv6: 0 });
        assert_eq!(plan.ingress, Some(vec![]));
    }

    #[test]
    fn descriptions_carry_the_rule_description_within_limits() {
        let mut r = rule("ssh", Protocol::Tcp, &[22], &["10.0.0.0/8"]);
        r.description = Some("x".repeat(200));
        let name = "n".repeat(63);
        let p = policy(&name, vec![r], None);
        let plan = plan_cloud(&validate(&p).unwrap(), &Facts::default()).unwrap();
        let desc = &plan.ingress.unwrap()[0].description;
        assert_eq!(desc.len(), MAX_DESCRIPTION);
        assert!(desc.starts_with(&format!("palisade:{name}/ssh xxx")));
    }

    #[test]
    fn aws_fields_round_trip() {
        let peer = SgPeer::from_aws(Some("10.0.0.0/8"), None, None, None).unwrap();
        let p = SgPermission::from_aws("6", Some(22), Some(22), peer.clone()).unwrap();
        assert_eq!(p.protocol, SgProtocol::Tcp);
        let all = SgPermission::from_aws("-1", None, None, peer.clone()).unwrap();
        assert_eq!((all.from_port, all.to_port), (-1, -1));
        let icmp = SgPermission::from_aws("icmpv6", Some(-1), Some(7), peer.clone()).unwrap();
        assert_eq!(
            (icmp.protocol, icmp.from_port, icmp.to_port),
            (SgProtocol::Icmpv6, -1, -1)
        );
        let esp = SgPermission::from_aws("50", None, None, peer).unwrap();
        assert_eq!(esp.protocol, SgProtocol::Number(50));
        assert!(SgPeer::from_aws(Some("10.0.0.0/8"), Some("::/0"), None, None).is_err());
        assert!(
            SgPermission::from_aws("sctp", None, None, SgPeer::PrefixList("pl-1".into())).is_err()
        );
    }

    #[test]
    fn a_shared_plan_is_the_union_once_each() {
        let facts = Facts::default();
        let a = plan_cloud(
            &validate(&policy(
                "a",
                vec![rule("web", Protocol::Tcp, &[443], &["10.0.0.0/8"])],
                None,
            ))
            .unwrap(),
            &facts,
        )
        .unwrap();
        let b = plan_cloud(
            &validate(&policy(
                "b",
                vec![
                    rule("https", Protocol::Tcp, &[443], &["10.0.0.0/8"]),
                    rule("ssh", Protocol::Tcp, &[22], &["192.0.2.0/24"]),
                ],
                None,
            ))
            .unwrap(),
            &facts,
        )
        .unwrap();
        let u = union_plan("shared", &[&a, &b], &facts);
        let ingress = u.ingress.as_ref().unwrap();
        assert_eq!(ingress.len(), 2);
        // The permission both hold is described by the first plan.
        let https = ingress
            .iter()
            .find(|p| p.permission.from_port == 443)
            .unwrap();
        assert!(https.description.starts_with("palisade:a/"), "{https:?}");
        assert_eq!(u.quota.ingress, FamilyCount { ipv4: 2, ipv6: 0 });
        assert!(u.keeps_default_egress);
        assert_eq!(u.over_quota(), None);
        let mut tight = facts.clone();
        tight.quota.rules_per_direction = 1;
        let u = union_plan("shared", &[&a, &b], &tight);
        assert_eq!(u.over_quota(), Some((Direction::Ingress, IpFamily::V4, 2)));
    }
}
