//! Reference evaluators: what a [`CloudPlan`] and a [`NodeRuleset`] do with
//! one packet, read straight off the compiled values.
//!
//! They are a model, not the kernel nor AWS: the property tests compare
//! them with a direct reading of the policies, the CLI can answer "would
//! this packet pass?" with them, and the end-to-end tests can check real
//! packets against them.

use std::net::IpAddr;

use serde::Serialize;

use super::cloud::{CloudPlan, SgPeer, SgPermission, SgProtocol};
use super::facts::Facts;
use super::node::{
    AddrSide, Address, AllowTarget, BuiltinChain, L4Protocol, NodeAction, NodeMatch, NodeRule,
    NodeRuleset, RuleOrigin,
};
use super::{Direction, IpFamily};

/// The protocol part of a probe packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ProbeProtocol {
    /// TCP to a destination port.
    Tcp {
        /// Destination port.
        port: u16,
    },
    /// UDP to a destination port.
    Udp {
        /// Destination port.
        port: u16,
    },
    /// ICMP (IPv4) with a type and code.
    Icmp {
        /// Type.
        icmp_type: u8,
        /// Code.
        code: u8,
    },
    /// ICMPv6 with a type and code.
    Icmpv6 {
        /// Type.
        icmp_type: u8,
        /// Code.
        code: u8,
    },
    /// Any other IP protocol number.
    Other(u8),
}

/// The first packet of a new connection, not on loopback, seen from the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    /// Into or out of the node.
    pub direction: Direction,
    /// The remote address: the source of ingress, the destination of egress.
    pub peer: IpAddr,
    /// Protocol, port or ICMP type.
    pub protocol: ProbeProtocol,
    /// Whether the peer is above every rate limit (a rate-limited rule does
    /// not accept it).
    pub over_rate: bool,
}

/// What the node layer does with a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum NodeVerdict {
    /// Allowed by a rule (failsafe or Enforce policy): handed back to the
    /// host's own rules (or accepted, with [`AllowVerdict::Accept`]).
    ///
    /// [`AllowVerdict::Accept`]: super::AllowVerdict::Accept
    Accept,
    /// Dropped.
    Drop,
    /// No rule allows it, but no Enforce policy governs the direction: it
    /// passes on, counted as a would-be drop of the Audit policies.
    AuditAccept,
    /// No Palisade chain sees it (no selected policy speaks for the direction).
    NotFiltered,
}

/// Whether one Security Group permission grants `probe`, with references
/// resolved through `facts` (an unresolved one grants nothing here).
pub fn permission_matches(p: &SgPermission, probe: &Probe, facts: &Facts) -> bool {
    let icmp = |t: u8, c: u8| {
        p.from_port == -1
            || (p.from_port == i32::from(t) && (p.to_port == -1 || p.to_port == i32::from(c)))
    };
    let traffic = match (p.protocol, probe.protocol) {
        (SgProtocol::All, _) => true,
        (SgProtocol::Tcp, ProbeProtocol::Tcp { port })
        | (SgProtocol::Udp, ProbeProtocol::Udp { port }) => {
            p.from_port <= i32::from(port) && i32::from(port) <= p.to_port
        }
        (SgProtocol::Icmp, ProbeProtocol::Icmp { icmp_type, code }) => icmp(icmp_type, code),
        (SgProtocol::Icmpv6, ProbeProtocol::Icmpv6 { icmp_type, code }) => icmp(icmp_type, code),
        (SgProtocol::Number(n), ProbeProtocol::Other(m)) => n == m,
        _ => false,
    };
    let addr = probe.peer;
    let peer = match &p.peer {
        SgPeer::Ipv4(n) => matches!(addr, IpAddr::V4(a) if n.contains(&a)),
        SgPeer::Ipv6(n) => matches!(addr, IpAddr::V6(a) if n.contains(&a)),
        SgPeer::SecurityGroup(id) => facts
            .security_groups
            .get(id)
            .is_some_and(|nets| nets.iter().any(|n| n.contains(&addr))),
        SgPeer::PrefixList(id) => facts
            .prefix_lists
            .get(id)
            .is_some_and(|pl| pl.cidrs.iter().any(|n| n.contains(&addr))),
    };
    traffic && peer
}

/// Whether the plan's permissions grant `probe` in its direction; `None`
/// when the plan does not speak for that direction. The default egress a
/// plan keeps is not counted (it is the group's, not the plan's).
pub fn cloud_permits(plan: &CloudPlan, probe: &Probe, facts: &Facts) -> Option<bool> {
    let perms = plan.permissions(probe.direction)?;
    Some(
        perms
            .iter()
            .any(|p| permission_matches(&p.permission, probe, facts)),
    )
}

/// What the node layer does with `probe`: the walk iptables would make from
/// the built-in chain through Palisade's chains. The probe is a NEW,
/// non-loopback packet; rules matching the node's own address (never
/// generated) do not match.
pub fn node_verdict(ruleset: &NodeRuleset, probe: &Probe) -> NodeVerdict {
    node_decision(ruleset, probe).verdict
}

/// The rule that decided a probe's fate, and the chain holding it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DecidingRule {
    /// The chain (`PALISADE-FAILSAFE-IN`, `PAL-I-...`, `PALISADE-END-IN`).
    pub chain: String,
    /// The rule: its id, origin (failsafe entry, policy rule, default
    /// drop) and matches.
    pub rule: NodeRule,
}

/// [`node_verdict`] with the reasons: the rule that allowed or dropped the
/// probe, and the Audit policies that counted it as a would-be drop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDecision {
    /// The verdict.
    pub verdict: NodeVerdict,
    /// The rule that decided (`None` when no rule did: not filtered, or
    /// no rule allowed it and nothing drops it).
    pub by: Option<DecidingRule>,
    /// Audit policies whose would-be-drop counter the probe reached.
    pub audit_would_drop: Vec<String>,
}

/// The walk of [`node_verdict`], naming the deciding rule.
pub fn node_decision(ruleset: &NodeRuleset, probe: &Probe) -> NodeDecision {
    node_decision_marked(ruleset, probe, false).0
}

/// [`node_decision`] for a packet arriving with the borrowed mark bit
/// ([`MARK_BIT`](super::node::MARK_BIT)) set or clear, and the state of
/// the bit when the packet leaves Palisade's chains (allowed or not
/// filtered; a dropped packet leaves nothing).
pub fn node_decision_marked(
    ruleset: &NodeRuleset,
    probe: &Probe,
    arrived_marked: bool,
) -> (NodeDecision, bool) {
    let family = IpFamily::of_addr(&probe.peer);
    let table = ruleset.family(family);
    let builtin = match probe.direction {
        Direction::Ingress => BuiltinChain::Input,
        Direction::Egress => BuiltinChain::Output,
    };
    let mut walker = Walker {
        ruleset,
        family,
        probe,
        audit: Vec::new(),
        mark: arrived_marked,
        allowed_by: None,
    };
    let Some(hook) = table.hooks.iter().find(|h| h.builtin == builtin) else {
        let decision = NodeDecision {
            verdict: NodeVerdict::NotFiltered,
            by: None,
            audit_would_drop: Vec::new(),
        };
        return (decision, arrived_marked);
    };
    let (verdict, by) = match walker.walk(&hook.target, 0) {
        Flow::Final(v, by) => (v, Some(by)),
        Flow::Return { allowed: Some(by) } => (NodeVerdict::Accept, Some(by)),
        Flow::Return { allowed: None } => (NodeVerdict::AuditAccept, None),
    };
    let decision = NodeDecision {
        verdict,
        by,
        audit_would_drop: walker.audit,
    };
    (decision, walker.mark)
}

/// How a walk through one chain ended.
enum Flow {
    /// A terminal verdict (ACCEPT or DROP) and the rule that gave it.
    Final(NodeVerdict, DecidingRule),
    /// Back to the caller: `allowed` names the allow whose RETURN sent it
    /// there; `None` when the chain simply ran out of rules.
    Return { allowed: Option<DecidingRule> },
}

struct Walker<'a> {
    ruleset: &'a NodeRuleset,
    family: IpFamily,
    probe: &'a Probe,
    audit: Vec<String>,
    /// The borrowed mark bit.
    mark: bool,
    /// The policy rule whose allow flipped the mark bit, until the
    /// dispatch chain's check sees it.
    allowed_by: Option<DecidingRule>,
}

impl Walker<'_> {
    fn walk(&mut self, chain: &str, depth: usize) -> Flow {
        // Palisade's paths are a handful of chains long; the bound only
        // guards a malformed input.
        if depth > 64 {
            return Flow::Return { allowed: None };
        }
        let Some(chain) = self.ruleset.family(self.family).chain(chain) else {
            return Flow::Return { allowed: None };
        };
        let by = |rule: &NodeRule| DecidingRule {
            chain: chain.name.clone(),
            rule: rule.clone(),
        };
        for rule in &chain.rules {
            if !rule_matches(self.ruleset, &rule.matches, self.probe, self.mark) {
                continue;
            }
            match &rule.action {
                NodeAction::Accept => return Flow::Final(NodeVerdict::Accept, by(rule)),
                NodeAction::Drop => return Flow::Final(NodeVerdict::Drop, by(rule)),
                NodeAction::Return => {
                    return Flow::Return {
                        allowed: Some(by(rule)),
                    };
                }
                NodeAction::Jump { chain } => {
                    // A jump's RETURN resumes here, allowed or not.
                    if let Flow::Final(v, r) = self.walk(chain, depth + 1) {
                        return Flow::Final(v, r);
                    }
                }
                NodeAction::Goto { chain } => {
                    if matches!(rule.origin, RuleOrigin::Rule { .. }) {
                        // An Enforce policy's allow, through the flip chain.
                        self.allowed_by = Some(by(rule));
                    }
                    let flow = self.walk(chain, depth + 1);
                    if matches!(rule.origin, RuleOrigin::Allowed { .. })
                        && let Flow::Return { allowed: None } = flow
                    {
                        // The dispatch chain saw the flip: the allow it
                        // stands for is the policy rule's.
                        return Flow::Return {
                            allowed: Some(self.allowed_by.take().unwrap_or_else(|| by(rule))),
                        };
                    }
                    return flow;
                }
                NodeAction::FlipMark => self.mark = !self.mark,
                NodeAction::Count => {
                    if let RuleOrigin::WouldDrop { policy } = &rule.origin
                        && !self.audit.contains(policy)
                    {
                        self.audit.push(policy.clone());
                    }
                }
                NodeAction::Log { .. } => {}
                NodeAction::AllowUnderLimit { allow, .. } if !self.probe.over_rate => {
                    return match allow {
                        AllowTarget::Return => Flow::Return {
                            allowed: Some(by(rule)),
                        },
                        AllowTarget::Accept => Flow::Final(NodeVerdict::Accept, by(rule)),
                        AllowTarget::Flip { chain } => {
                            self.allowed_by = Some(by(rule));
                            self.walk(chain, depth + 1)
                        }
                    };
                }
                NodeAction::AllowUnderLimit { .. } => {}
            }
        }
        Flow::Return { allowed: None }
    }
}

fn rule_matches(ruleset: &NodeRuleset, m: &NodeMatch, probe: &Probe, mark: bool) -> bool {
    if m.interface.is_some() {
        return false;
    }
    if m.mark.is_some_and(|want| want != mark) {
        return false;
    }
    if !m.ct_states.is_empty() && !m.ct_states.contains(&super::node::CtState::New) {
        return false;
    }
    let (l4, port, icmp) = match probe.protocol {
        ProbeProtocol::Tcp { port } => (Some(L4Protocol::Tcp), Some(port), None),
        ProbeProtocol::Udp { port } => (Some(L4Protocol::Udp), Some(port), None),
        ProbeProtocol::Icmp { icmp_type, code } => {
            (Some(L4Protocol::Icmp), None, Some((icmp_type, code)))
        }
        ProbeProtocol::Icmpv6 { icmp_type, code } => {
            (Some(L4Protocol::Icmpv6), None, Some((icmp_type, code)))
        }
        ProbeProtocol::Other(_) => (None, None, None),
    };
    if m.protocol.is_some() && m.protocol != l4 {
        return false;
    }
    if let Some(span) = m.dports
        && !port.is_some_and(|p| span.contains(p))
    {
        return false;
    }
    if let Some(want) = m.icmp
        && !icmp.is_some_and(|(t, c)| t == want.icmp_type && want.code.is_none_or(|wc| wc == c))
    {
        return false;
    }
    if let Some(peer) = &m.peer {
        let remote = match probe.direction {
            Direction::Ingress => AddrSide::Source,
            Direction::Egress => AddrSide::Destination,
        };
        if peer.side != remote {
            return false;
        }
        let hit = match &peer.address {
            Address::Cidr(n) => n.contains(&probe.peer),
            Address::Set(name) => ruleset
                .set(name)
                .is_some_and(|s| s.entries.iter().any(|n| n.contains(&probe.peer))),
        };
        if !hit {
            return false;
        }
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policy::testing::*;
    use crate::policy::{compile_node, plan_cloud, validate};

    fn tcp_in(peer: &str, port: u16) -> Probe {
        Probe {
            direction: Direction::Ingress,
            peer: peer.parse().unwrap(),
            protocol: ProbeProtocol::Tcp { port },
            over_rate: false,
        }
    }

    #[test]
    fn seed_jump_host_effective_access_is_the_intersection() {
        let facts = facts_with_nodes();
        let p = validate(&jump_host_policy()).unwrap();
        let plan = plan_cloud(&p, &facts).unwrap();
        let rs = compile_node("web-1", &[p], &facts).unwrap();
        let both = |probe: &Probe| {
            cloud_permits(&plan, probe, &facts) == Some(true)
                && node_verdict(&rs, probe) == NodeVerdict::Accept
        };
        assert!(both(&tcp_in("203.0.113.10", 22)), "the jump host gets in");
        assert!(
            !both(&tcp_in("203.0.113.11", 22)),
            "the rest of the office does not"
        );
        assert_eq!(
            cloud_permits(&plan, &tcp_in("203.0.113.11", 22), &facts),
            Some(true)
        );
        assert_eq!(
            node_verdict(&rs, &tcp_in("203.0.113.11", 22)),
            NodeVerdict::Drop
        );
        assert_eq!(
            node_verdict(&rs, &tcp_in("10.0.2.10", 10250)),
            NodeVerdict::Accept,
            "failsafe kubelet, from another node of the cluster"
        );
        assert_eq!(
            node_verdict(&rs, &tcp_in("198.51.100.1", 10250)),
            NodeVerdict::Drop,
            "the failsafe is scoped: not from outside the cluster"
        );
        let out = Probe {
            direction: Direction::Egress,
            ..tcp_in("198.51.100.1", 443)
        };
        assert_eq!(node_verdict(&rs, &out), NodeVerdict::NotFiltered);
        assert_eq!(cloud_permits(&plan, &out, &facts), None);
    }

    #[test]
    fn the_deciding_rule_is_named() {
        let facts = facts_with_nodes();
        let mut audit = web_policy();
        audit.metadata.name = Some("trial".into());
        audit.spec.mode = crate::api::PolicyMode::Audit;
        let policies = [
            validate(&jump_host_policy()).unwrap(),
            validate(&audit).unwrap(),
        ];
        let rs = compile_node("web-1", &policies, &facts).unwrap();
        let origin = |probe: &Probe| {
            let d = node_decision(&rs, probe);
            assert_eq!(d.verdict, node_verdict(&rs, probe));
            (d.verdict, d.by.map(|b| b.rule.origin.to_string()))
        };
        assert_eq!(
            origin(&tcp_in("203.0.113.10", 22)),
            (NodeVerdict::Accept, Some("bastion/ingress/ssh-jump".into()))
        );
        assert_eq!(
            origin(&tcp_in("10.0.2.10", 10250)),
            (NodeVerdict::Accept, Some("failsafe/kubelet".into()))
        );
        assert_eq!(
            origin(&tcp_in("198.51.100.1", 10250)),
            (NodeVerdict::Drop, Some("default-drop".into()))
        );
        // Dropped by the Enforce policy, and counted by the Audit one.
        let d = node_decision(&rs, &tcp_in("198.51.100.1", 5432));
        assert_eq!(d.verdict, NodeVerdict::Drop);
        assert_eq!(d.audit_would_drop, vec!["trial".to_string()]);
    }

    #[test]
    fn a_packet_leaves_with_the_mark_it_came_with_and_the_same_verdict() {
        let facts = facts_with_nodes();
        let mut audit = web_policy();
        audit.metadata.name = Some("trial".into());
        audit.spec.mode = crate::api::PolicyMode::Audit;
        let policies = [
            validate(&jump_host_policy()).unwrap(),
            validate(&web_policy()).unwrap(),
            validate(&audit).unwrap(),
        ];
        let rs = compile_node("web-1", &policies, &facts).unwrap();
        for probe in [
            tcp_in("203.0.113.10", 22),
            tcp_in("203.0.113.11", 22),
            tcp_in("198.51.100.1", 443),
            tcp_in("198.51.100.1", 5432),
            tcp_in("10.0.2.10", 10250),
            tcp_in("2001:db8::99", 443),
        ] {
            let (plain, left_plain) = node_decision_marked(&rs, &probe, false);
            let (marked, left_marked) = node_decision_marked(&rs, &probe, true);
            assert_eq!(plain, marked, "{probe:?}");
            if plain.verdict != NodeVerdict::Drop {
                assert!(!left_plain && left_marked, "{probe:?}: mark not restored");
            }
        }
        // The deciding rule of an allow is the policy's, not the dispatch
        // chain's check.
        let d = node_decision(&rs, &tcp_in("198.51.100.1", 443));
        assert_eq!(d.verdict, NodeVerdict::Accept);
        assert_eq!(
            d.by.map(|b| b.rule.origin.to_string()),
            Some("web/ingress/http".into())
        );
    }

    #[test]
    fn seed_web_server() {
        let facts = facts_with_nodes();
        let p = validate(&web_policy()).unwrap();
        let rs = compile_node("web-1", &[p], &facts).unwrap();
        assert_eq!(
            node_verdict(&rs, &tcp_in("2001:db8::99", 443)),
            NodeVerdict::Accept
        );
        assert_eq!(
            node_verdict(&rs, &tcp_in("2001:db8::99", 22)),
            NodeVerdict::Drop
        );
        assert_eq!(
            node_verdict(&rs, &tcp_in("203.0.113.99", 22)),
            NodeVerdict::Accept
        );
        let nd = Probe {
            direction: Direction::Ingress,
            peer: "fe80::1".parse().unwrap(),
            protocol: ProbeProtocol::Icmpv6 {
                icmp_type: 135,
                code: 0,
            },
            over_rate: false,
        };
        assert_eq!(
            node_verdict(&rs, &nd),
            NodeVerdict::Accept,
            "neighbour solicitation is failsafe"
        );
    }
}
