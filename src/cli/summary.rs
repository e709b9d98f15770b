//! What a reviewer reads first: per node and layer, what is open, from or
//! to where, and by which policy and rule — as `ufw status` shows a host —
//! with openings that are risky to the whole internet flagged (pure).

use serde::Serialize;

use crate::api::Protocol;
use crate::policy::{Direction, PeerRef, ValidPolicy, ValidRule};

/// One line of the summary: one rule of one selected policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Opening {
    /// `in` or `out`.
    pub direction: Direction,
    /// `tcp/22`, `udp/53`, `tcp/8000-8080`, `icmp type 8`, `all`.
    pub traffic: String,
    /// Sources (in) or destinations (out), comma-separated.
    pub peers: String,
    /// `cloud+node`, `cloud` or `node`.
    pub layers: String,
    /// `policy/rule`.
    pub rule: String,
    /// `Audit` when the policy only reports.
    pub audit: bool,
}

/// An opening to the whole internet of a port attackers look for first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Risk {
    /// `policy/rule`.
    pub rule: String,
    /// What is exposed, e.g. `tcp/22 (SSH) from 0.0.0.0/0`.
    pub what: String,
}

/// Ports that should never face the internet, by name.
const RISKY: &[(u16, &str)] = &[
    (22, "SSH"),
    (23, "Telnet"),
    (3389, "RDP"),
    (5900, "VNC"),
    (3306, "MySQL"),
    (5432, "PostgreSQL"),
    (1433, "SQL Server"),
    (1521, "Oracle"),
    (27017, "MongoDB"),
    (6379, "Redis"),
    (9200, "Elasticsearch"),
    (11211, "memcached"),
    (2379, "etcd"),
    (10250, "kubelet"),
    (6443, "Kubernetes API"),
];

fn traffic(rule: &ValidRule) -> Vec<String> {
    let proto = match rule.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Icmp => "icmp",
        Protocol::Icmpv6 => "icmpv6",
        Protocol::All => return vec!["all".into()],
    };
    if let Some(i) = rule.icmp {
        return vec![match i.code {
            Some(c) => format!("{proto} type {} code {c}", i.icmp_type),
            None => format!("{proto} type {}", i.icmp_type),
        }];
    }
    if rule.ports.is_empty() {
        return vec![format!("{proto}/any")];
    }
    rule.ports
        .iter()
        .map(|p| {
            if p.first == p.last {
                format!("{proto}/{}", p.first)
            } else {
                format!("{proto}/{}-{}", p.first, p.last)
            }
        })
        .collect()
}

fn peer(p: &PeerRef) -> String {
    match p {
        PeerRef::Cidr(n) => n.to_string(),
        PeerRef::SecurityGroup(id) | PeerRef::PrefixList(id) => id.clone(),
        PeerRef::Nodes(sel) => format!("nodes({sel})"),
    }
}

/// Every opening of the `selected` policies, in policy, direction and
/// rule order.
pub fn openings(selected: &[&ValidPolicy]) -> Vec<Opening> {
    let mut out = Vec::new();
    for p in selected {
        for direction in [Direction::Ingress, Direction::Egress] {
            for rule in p.rules(direction).unwrap_or_default() {
                let layers = match (rule.cloud, rule.node) {
                    (true, true) => "cloud+node",
                    (true, false) => "cloud",
                    _ => "node",
                };
                let peers: Vec<String> = rule.peers.iter().map(peer).collect();
                for t in traffic(rule) {
                    out.push(Opening {
                        direction,
                        traffic: t,
                        peers: peers.join(", "),
                        layers: layers.into(),
                        rule: format!("{}/{}", p.name(), rule.name),
                        audit: p.mode() == crate::api::PolicyMode::Audit,
                    });
                }
            }
        }
    }
    out
}

/// Inbound openings of risky ports (or every port) to `0.0.0.0/0` or `::/0`.
pub fn risks(selected: &[&ValidPolicy]) -> Vec<Risk> {
    let mut out = Vec::new();
    for p in selected {
        for rule in p.rules(Direction::Ingress).unwrap_or_default() {
            let world: Vec<String> = rule
                .peers
                .iter()
                .filter_map(|x| match x {
                    PeerRef::Cidr(n) if n.prefix_len() == 0 => Some(n.to_string()),
                    _ => None,
                })
                .collect();
            if world.is_empty() || !matches!(rule.protocol, Protocol::Tcp | Protocol::All) {
                continue;
            }
            for (port, name) in RISKY {
                let open = rule.protocol == Protocol::All
                    || rule.ports.is_empty()
                    || rule.ports.iter().any(|s| s.contains(*port));
                if open {
                    out.push(Risk {
                        rule: format!("{}/{}", p.name(), rule.name),
                        what: format!("tcp/{port} ({name}) from {}", world.join(" and ")),
                    });
                }
            }
        }
    }
    out
}

/// The summary as text: one table per direction, then the risks.
pub fn summary_text(node: &str, selected: &[&ValidPolicy]) -> String {
    let mut out = String::new();
    let rows = openings(selected);
    for direction in [Direction::Ingress, Direction::Egress] {
        let governed: Vec<&str> = selected
            .iter()
            .filter(|p| p.rules(direction).is_some())
            .map(|p| p.name())
            .collect();
        let (title, who, way) = match direction {
            Direction::Ingress => ("Inbound", "From", "to"),
            Direction::Egress => ("Outbound", "To", "from"),
        };
        if governed.is_empty() {
            out.push_str(&format!(
                "{title} {way} {node}: not governed by any policy (left as it is)\n\n"
            ));
            continue;
        }
        out.push_str(&format!(
            "{title} ({}): default deny, apart from the failsafe and:\n",
            governed.join(", ")
        ));
        let lines: Vec<[String; 4]> = rows
            .iter()
            .filter(|r| r.direction == direction)
            .map(|r| {
                [
                    r.traffic.clone(),
                    r.peers.clone(),
                    r.layers.clone(),
                    if r.audit {
                        format!("{} (Audit: not enforced)", r.rule)
                    } else {
                        r.rule.clone()
                    },
                ]
            })
            .collect();
        let head = [
            "Traffic".to_string(),
            who.to_string(),
            "Layers".to_string(),
            "Policy/rule".to_string(),
        ];
        let mut width = [0usize; 4];
        for l in std::iter::once(&head).chain(&lines) {
            for (w, c) in width.iter_mut().zip(l) {
                *w = (*w).max(c.chars().count());
            }
        }
        for l in std::iter::once(&head).chain(&lines) {
            let cells: Vec<String> = l
                .iter()
                .zip(width)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(&format!("  {}\n", cells.join("  ").trim_end()));
        }
        if lines.is_empty() {
            out.push_str("  (nothing: deny-all)\n");
        }
        out.push('\n');
    }
    for r in risks(selected) {
        out.push_str(&format!(
            "RISK {}: {} is open to the internet\n",
            r.rule, r.what
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policy::testing::{jump_host_policy, web_policy};
    use crate::policy::validate;

    #[test]
    fn the_web_server_reads_like_ufw_status_and_its_world_ssh_is_flagged() {
        let mut web = web_policy();
        // SSH to the world: the seed's classic mistake.
        for r in web.spec.ingress.as_mut().unwrap() {
            if r.name == "ssh" {
                r.peers[0].cidr = Some("0.0.0.0/0".into());
            }
        }
        let v = validate(&web).unwrap();
        let text = summary_text("web-1", &[&v]);
        assert!(text.contains("Inbound (web): default deny"), "{text}");
        assert!(text.contains("tcp/80"), "{text}");
        assert!(text.contains("Outbound from web-1: not governed"), "{text}");
        assert!(
            text.contains("RISK web/ssh: tcp/22 (SSH) from 0.0.0.0/0 is open to the internet"),
            "{text}"
        );
        let jump = validate(&jump_host_policy()).unwrap();
        assert!(risks(&[&jump]).is_empty(), "SSH from one address is fine");
    }
}
