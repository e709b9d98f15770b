//! Readable fixtures for the compiler's tests.

use std::collections::BTreeMap;

use crate::api::NodeSelector;

use crate::api::{
    FirewallPolicy, FirewallPolicySpec, FirewallRule, Layer, Peer, PolicyType, PortRange, Protocol,
};

use super::facts::{Facts, NodeFacts};

/// A policy named `name` with the given rules (Enforce, every node).
pub fn policy(
    name: &str,
    ingress: Vec<FirewallRule>,
    egress: Option<Vec<FirewallRule>>,
) -> FirewallPolicy {
    FirewallPolicy::new(
        name,
        FirewallPolicySpec {
            policy_types: if egress.is_some() {
                vec![PolicyType::Ingress, PolicyType::Egress]
            } else {
                vec![PolicyType::Ingress]
            },
            ingress: Some(ingress),
            egress,
            ..Default::default()
        },
    )
}

/// A rule on both layers; `ports` empty = no ports field.
pub fn rule(name: &str, protocol: Protocol, ports: &[u16], cidrs: &[&str]) -> FirewallRule {
    FirewallRule {
        name: name.into(),
        protocol,
        ports: (!ports.is_empty()).then(|| {
            ports
                .iter()
                .map(|p| PortRange {
                    port: *p,
                    end_port: None,
                })
                .collect()
        }),
        peers: cidrs
            .iter()
            .map(|c| Peer {
                cidr: Some(c.to_string()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// SEED: a web server, 80/443 from anywhere and SSH from the office, on both layers.
pub fn web_policy() -> FirewallPolicy {
    policy(
        "web",
        vec![
            rule("http", Protocol::Tcp, &[80, 443], &["0.0.0.0/0", "::/0"]),
            rule("ssh", Protocol::Tcp, &[22], &["203.0.113.0/24"]),
        ],
        None,
    )
}

/// SEED: the Security Group lets SSH in from the office; the node layer
/// narrows it to the jump host.
pub fn jump_host_policy() -> FirewallPolicy {
    let mut office = rule("ssh-office", Protocol::Tcp, &[22], &["203.0.113.0/24"]);
    office.layers = Some(vec![Layer::Cloud]);
    let mut jump = rule("ssh-jump", Protocol::Tcp, &[22], &["203.0.113.10/32"]);
    jump.layers = Some(vec![Layer::Node]);
    policy("bastion", vec![office, jump], None)
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn selector(pairs: &[(&str, &str)]) -> NodeSelector {
    NodeSelector {
        match_labels: Some(labels(pairs)),
        match_expressions: None,
    }
}

pub fn node(name: &str, pairs: &[(&str, &str)], addrs: &[&str]) -> NodeFacts {
    NodeFacts {
        name: name.into(),
        labels: labels(pairs).into(),
        addresses: addrs.iter().map(|a| a.parse().expect("address")).collect(),
        provider_id: Some(format!("aws:///eu-west-1a/i-{:017x}", name.len())),
    }
}

/// Two nodes: web-1 (role=web) and db-1 (role=db), dual-stack; default failsafe.
pub fn facts_with_nodes() -> Facts {
    Facts {
        nodes: vec![
            node(
                "web-1",
                &[("role", "web")],
                &["10.0.1.10", "2001:db8::1:10"],
            ),
            node("db-1", &[("role", "db")], &["10.0.2.10", "2001:db8::2:10"]),
        ]
        .into(),
        ..Default::default()
    }
}

pub fn sg_peer(id: &str) -> Peer {
    Peer {
        security_group_id: Some(id.into()),
        ..Default::default()
    }
}

pub fn pl_peer(id: &str) -> Peer {
    Peer {
        prefix_list_id: Some(id.into()),
        ..Default::default()
    }
}

pub fn node_peer(pairs: &[(&str, &str)]) -> Peer {
    Peer {
        node_selector: Some(selector(pairs)),
        ..Default::default()
    }
}
