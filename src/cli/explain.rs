//! `palisade explain`: would this packet reach (or leave) this node, on
//! each layer, and which rule of which group or policy decided — computed
//! from the live state: the policies and nodes in the cluster, the Security
//! Groups on the node's primary interface in EC2.
//!
//! - Cloud layer: every group on the interface is a union; the answer
//!   names every rule that admits the packet (none: dropped). Computed from
//!   the rules as read: no packet is sent.
//! - Node layer: the node's ruleset compiled as its agent compiles it, and
//!   walked as iptables walks it ([`crate::policy::eval::node_decision`]),
//!   naming the deciding chain and rule (failsafe entry, policy rule or the
//!   default drop).
//!
//! The question is about the first packet of a new connection; replies
//! are allowed on both layers (both are stateful).

use std::io::Write;
use std::net::IpAddr;

use serde::Serialize;

use super::Error;
use super::live::{Live, NodeSettings, ruleset};
use crate::api::PolicyMode;
use crate::cloud::Ec2;
use crate::policy::Direction;
use crate::policy::effective::traffic;
use crate::policy::eval::{
    NodeDecision, NodeVerdict, Probe, ProbeProtocol, node_decision, permission_matches,
};
use crate::policy::node::RuleOrigin;

/// What `explain` is asked.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Question {
    /// The node.
    pub node: String,
    /// Into the node (`--from`) or out of it (`--to`).
    pub direction: Direction,
    /// The remote address.
    pub peer: IpAddr,
    /// Protocol and port or ICMP type.
    pub protocol: ProbeProtocol,
}

/// Parses `443/tcp`, `53/udp`, `icmp/8`, `icmp/3/4`, `icmpv6/128` or
/// `proto/47` (any IP protocol by number).
pub fn parse_traffic(text: &str) -> Result<ProbeProtocol, String> {
    let parts: Vec<&str> = text.split('/').collect();
    let num = |s: &str| -> Result<u8, String> {
        s.parse()
            .map_err(|_| format!("{s:?} in {text:?} is not a number from 0 to 255"))
    };
    let lower: Vec<String> = parts.iter().map(|p| p.to_ascii_lowercase()).collect();
    match lower
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [port, "tcp"] | [port, "udp"] => {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("{port:?} in {text:?} is not a port (0-65535)"))?;
            Ok(if lower[1] == "tcp" {
                ProbeProtocol::Tcp { port }
            } else {
                ProbeProtocol::Udp { port }
            })
        }
        ["icmp", t] | ["icmp", t, _] | ["icmpv6", t] | ["icmpv6", t, _] => {
            let icmp_type = num(t)?;
            let code = match lower.get(2) {
                Some(c) => num(c)?,
                None => 0,
            };
            Ok(if lower[0] == "icmp" {
                ProbeProtocol::Icmp { icmp_type, code }
            } else {
                ProbeProtocol::Icmpv6 { icmp_type, code }
            })
        }
        ["proto", n] => Ok(ProbeProtocol::Other(num(n)?)),
        _ => Err(format!(
            "{text:?}: write PORT/tcp, PORT/udp, icmp/TYPE[/CODE], icmpv6/TYPE[/CODE] or proto/NUMBER"
        )),
    }
}

fn protocol_text(p: &ProbeProtocol) -> String {
    match p {
        ProbeProtocol::Tcp { port } => format!("tcp/{port}"),
        ProbeProtocol::Udp { port } => format!("udp/{port}"),
        ProbeProtocol::Icmp { icmp_type, code } => format!("icmp type {icmp_type} code {code}"),
        ProbeProtocol::Icmpv6 { icmp_type, code } => {
            format!("icmpv6 type {icmp_type} code {code}")
        }
        ProbeProtocol::Other(n) => format!("protocol {n}"),
    }
}

/// A group rule that admits the packet.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudMatch {
    /// `sg-...`.
    pub group_id: String,
    /// The group's name.
    pub group_name: String,
    /// `sgr-...`.
    pub rule_id: String,
    /// `tcp/22 from 0.0.0.0/0`.
    pub rule: String,
    /// The rule's description.
    pub description: Option<String>,
}

/// The cloud layer's answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase", tag = "verdict")]
pub enum CloudAnswer {
    /// Some rule of some group on the interface admits it.
    Allowed {
        /// The groups on the interface.
        groups: Vec<String>,
        /// Every rule admitting it.
        by: Vec<CloudMatch>,
    },
    /// No rule of any group on the interface admits it.
    Dropped {
        /// The groups on the interface.
        groups: Vec<String>,
    },
    /// Not known (the node is not an EC2 instance, or it was not found).
    Unknown {
        /// Why.
        why: String,
    },
}

/// The node layer's answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeAnswer {
    /// The policies selecting the node, with their mode.
    pub policies: Vec<(String, PolicyMode)>,
    /// The verdict and the rule that gave it.
    pub decision: NodeDecision,
}

/// The whole answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// The question.
    pub question: Question,
    /// The cloud layer.
    pub cloud: CloudAnswer,
    /// The node layer.
    pub node: NodeAnswer,
    /// Problems met on the way (invalid live policies left out).
    pub problems: Vec<String>,
}

impl Explanation {
    /// Whether the packet gets through both layers (an unknown cloud layer
    /// counts as allowing: only the node layer is then judged).
    pub fn reaches(&self) -> bool {
        !matches!(self.cloud, CloudAnswer::Dropped { .. })
            && matches!(
                self.node.decision.verdict,
                NodeVerdict::Accept | NodeVerdict::AuditAccept | NodeVerdict::NotFiltered
            )
    }
}

/// Answers `q` from `live` (read with [`read_for`]) and the agent's
/// `settings` (pure).
pub fn explain(live: &Live, settings: &NodeSettings, q: &Question) -> Result<Explanation, Error> {
    let me = live.node(&q.node)?;
    let mut problems = Vec::new();
    let policies = live.active(&mut problems);
    let facts = live.facts(settings);
    let rs = ruleset(&q.node, &policies, &facts)?;
    let probe = Probe {
        direction: q.direction,
        peer: q.peer,
        protocol: q.protocol,
        over_rate: false,
    };
    let node = NodeAnswer {
        policies: rs
            .policies
            .iter()
            .map(|p| (p.name.clone(), p.mode))
            .collect(),
        decision: node_decision(&rs, &probe),
    };
    let cloud = match (me.instance_id(), live.instance(&q.node)) {
        (None, _) => CloudAnswer::Unknown {
            why: format!("node {} has no EC2 providerID", q.node),
        },
        (Some(id), None) => CloudAnswer::Unknown {
            why: format!("instance {id} of node {} was not found in EC2", q.node),
        },
        (Some(_), Some(instance)) => {
            let mut groups = Vec::new();
            let mut by = Vec::new();
            for id in &instance.eni_groups {
                let Some(g) = live.groups.get(id) else {
                    // Gone between the two reads: it admits nothing.
                    continue;
                };
                groups.push(format!("{} ({})", g.info.id, g.info.name));
                for r in g.rules.iter().filter(|r| r.direction == q.direction) {
                    if permission_matches(&r.permission, &probe, &facts) {
                        let way = match q.direction {
                            Direction::Ingress => "from",
                            Direction::Egress => "to",
                        };
                        by.push(CloudMatch {
                            group_id: g.info.id.clone(),
                            group_name: g.info.name.clone(),
                            rule_id: r.rule_id.clone(),
                            rule: format!("{} {way} {}", traffic(&r.permission), r.permission.peer),
                            description: r.description.clone(),
                        });
                    }
                }
            }
            if by.is_empty() {
                CloudAnswer::Dropped { groups }
            } else {
                CloudAnswer::Allowed { groups, by }
            }
        }
    };
    Ok(Explanation {
        question: q.clone(),
        cloud,
        node,
        problems,
    })
}

/// Reads what [`explain`] needs for `node`.
pub async fn read_for<E: Ec2>(client: &kube::Client, ec2: &E, node: &str) -> Result<Live, Error> {
    let mut live = Live::read_cluster(client).await?;
    live.node(node)?;
    let mut problems = Vec::new();
    let active = live.active(&mut problems);
    live.read_cloud(ec2, Some(&[node.to_string()]), &[], &active)
        .await?;
    Ok(live)
}

/// How a node-layer rule reads in the answer.
fn origin_text(origin: &RuleOrigin) -> String {
    match origin {
        RuleOrigin::Rule {
            policy,
            direction,
            rule,
        } => format!("policy {policy}, {direction} rule {rule}"),
        RuleOrigin::Failsafe { name } => format!("failsafe entry {name}"),
        RuleOrigin::DefaultDrop => {
            "the default drop (no rule of an Enforce policy governing this direction allows it)"
                .into()
        }
        other => other.to_string(),
    }
}

/// Writes `e` as text.
pub fn write_text(e: &Explanation, out: &mut impl Write) -> Result<(), Error> {
    let q = &e.question;
    let (way, dir) = match q.direction {
        Direction::Ingress => ("from", "inbound to"),
        Direction::Egress => ("to", "outbound from"),
    };
    writeln!(
        out,
        "{} {way} {}, {dir} node {} (first packet of a new connection)",
        protocol_text(&q.protocol),
        q.peer,
        q.node
    )?;
    writeln!(out)?;
    match &e.cloud {
        CloudAnswer::Allowed { groups, by } => {
            writeln!(out, "Cloud layer: ALLOWED")?;
            writeln!(
                out,
                "  groups on the interface (a union): {}",
                groups.join(", ")
            )?;
            for m in by {
                let desc = m
                    .description
                    .as_deref()
                    .map(|d| format!(" \"{d}\""))
                    .unwrap_or_default();
                writeln!(
                    out,
                    "  admitted by {} ({}) rule {}: {}{desc}",
                    m.group_id, m.group_name, m.rule_id, m.rule
                )?;
            }
        }
        CloudAnswer::Dropped { groups } => {
            writeln!(out, "Cloud layer: DROPPED")?;
            writeln!(
                out,
                "  groups on the interface (a union): {}",
                groups.join(", ")
            )?;
            writeln!(out, "  no rule of any of them admits it")?;
        }
        CloudAnswer::Unknown { why } => writeln!(out, "Cloud layer: UNKNOWN ({why})")?,
    }
    let policies: Vec<String> = e
        .node
        .policies
        .iter()
        .map(|(n, m)| format!("{n} ({m:?})"))
        .collect();
    let d = &e.node.decision;
    let verdict = match d.verdict {
        NodeVerdict::Accept => "ALLOWED",
        NodeVerdict::Drop => "DROPPED",
        NodeVerdict::AuditAccept => "ALLOWED (no Enforce policy governs this direction)",
        NodeVerdict::NotFiltered => "NOT FILTERED (no policy governs this direction)",
    };
    writeln!(out, "Node layer: {verdict}")?;
    writeln!(
        out,
        "  policies selecting {}: {}",
        q.node,
        if policies.is_empty() {
            "none".to_string()
        } else {
            policies.join(", ")
        }
    )?;
    if let Some(by) = &d.by {
        let word = if d.verdict == NodeVerdict::Drop {
            "dropped"
        } else {
            "allowed"
        };
        writeln!(
            out,
            "  {word} by {} (chain {}, rule palisade:{})",
            origin_text(&by.rule.origin),
            by.chain,
            by.rule.id
        )?;
    }
    if matches!(&d.by, Some(b) if matches!(b.rule.origin, RuleOrigin::Failsafe { .. })) {
        writeln!(
            out,
            "  (the failsafe as given by --admin-cidr, --cluster-cidr and --failsafe-file: give the agent's values)"
        )?;
    }
    for p in &d.audit_would_drop {
        writeln!(out, "  the Audit policy {p} counts it as a would-be drop")?;
    }
    if d.verdict == NodeVerdict::Accept {
        writeln!(
            out,
            "  (an allow hands the packet back to the host's own rules unless the agent runs with --allow-verdict=accept)"
        )?;
    }
    for p in &e.problems {
        writeln!(out, "  note: {p}")?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "Verdict: {}",
        if e.reaches() {
            "REACHES (allowed on both layers)"
        } else {
            "BLOCKED"
        }
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_is_parsed() {
        assert_eq!(
            parse_traffic("443/tcp"),
            Ok(ProbeProtocol::Tcp { port: 443 })
        );
        assert_eq!(parse_traffic("53/UDP"), Ok(ProbeProtocol::Udp { port: 53 }));
        assert_eq!(
            parse_traffic("icmp/8"),
            Ok(ProbeProtocol::Icmp {
                icmp_type: 8,
                code: 0
            })
        );
        assert_eq!(
            parse_traffic("icmpv6/1/4"),
            Ok(ProbeProtocol::Icmpv6 {
                icmp_type: 1,
                code: 4
            })
        );
        assert_eq!(parse_traffic("proto/47"), Ok(ProbeProtocol::Other(47)));
        assert!(parse_traffic("443").is_err());
        assert!(parse_traffic("70000/tcp").is_err());
        assert!(parse_traffic("tcp/443").is_err());
    }
}
