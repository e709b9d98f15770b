//! Property tests of the compiler, against a direct reading of the spec.
//!
//! Random valid policies over small address, port and label pools (so that
//! random probes hit rules often), fixed facts (three nodes, resolved and
//! unresolved references), and:
//! - compilation is deterministic under any order of policies, rules,
//!   peers and ports (outputs and hashes equal);
//! - canonicalisation is idempotent and does not change what compiles;
//! - for random probes, each layer allows a probe iff the spec allows it on
//!   that layer (the evaluators in [`super::eval`] read the compiled
//!   values; [`spec_cloud`] and [`spec_node`] read the policies directly);
//! - the SG diff applied to current yields desired and never revokes a
//!   foreign rule; the node diff applied to current yields desired.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use proptest::sample::select;

use super::eval::{NodeVerdict, Probe, ProbeProtocol, cloud_permits, node_verdict};
use super::facts::{Facts, FailsafeScope, NodeFacts, PrefixListFacts, SgQuota};
use super::node::{is_palisade_chain, is_palisade_set, normalize_set_entries};
use super::testing::node;
use super::*;
use crate::api::{
    FirewallPolicy, FirewallPolicySpec, FirewallRule, IcmpMatch, Layer, NodeSelector,
    NodeSelectorRequirement, Peer, PolicyMode, PolicyType, PortRange, Protocol, RateLimit,
    RatePeriod,
};

// ---------------------------------------------------------------- facts

const SG_RESOLVED: &str = "sg-0000000a";
const SG_UNRESOLVED: &str = "sg-0000000b";
const PL_RESOLVED: &str = "pl-0000000c";
const PL_UNRESOLVED: &str = "pl-0000000d";

fn facts() -> Facts {
    let mut f = Facts {
        nodes: vec![
            node(
                "n1",
                &[("role", "web"), ("zone", "a")],
                &["10.0.1.5", "2001:db8:0:1::5"],
            ),
            node(
                "n2",
                &[("role", "db"), ("zone", "b")],
                &["10.0.2.6", "2001:db8:0:2::6"],
            ),
            node("n3", &[("role", "web"), ("zone", "b")], &["10.1.3.7"]),
        ]
        .into(),
        quota: SgQuota {
            rules_per_direction: 10_000,
            ..SgQuota::default()
        },
        ..Default::default()
    };
    f.security_groups.insert(
        SG_RESOLVED.into(),
        vec![
            "10.1.0.0/16".parse().unwrap(),
            "2001:db8:1::/48".parse().unwrap(),
            "192.0.2.9/32".parse().unwrap(),
        ],
    );
    f.prefix_lists.insert(
        PL_RESOLVED.into(),
        PrefixListFacts {
            family: IpFamily::V4,
            cidrs: vec![
                "192.0.2.0/25".parse().unwrap(),
                "198.51.100.0/24".parse().unwrap(),
            ],
            max_entries: 5,
        },
    );
    // Five admin CIDRs: the failsafe SSH rule goes through a set.
    f.failsafe.admin_cidrs = [
        "203.0.113.0/28",
        "203.0.113.64/28",
        "198.51.100.7/32",
        "10.9.0.0/16",
        "192.0.2.128/25",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    // The failsafe's scopes: some probe addresses are in them, most not.
    f.failsafe.cluster_cidrs = vec!["10.1.2.0/24".parse().unwrap()];
    f.api_servers = vec!["10.0.0.200".parse().unwrap()];
    f.nameservers = vec!["192.0.2.200".parse().unwrap(), "fd00::5".parse().unwrap()];
    f
}

// ---------------------------------------------------------------- generators

fn arb_v4() -> impl Strategy<Value = String> {
    let bases = vec![
        [10, 0, 0, 0],
        [10, 0, 1, 0],
        [10, 1, 0, 0],
        [192, 0, 2, 0],
        [203, 0, 113, 0],
        [198, 51, 100, 0],
    ];
    (
        select(bases),
        select(vec![0u8, 8, 16, 24, 25, 28, 32]),
        select(vec![0u8, 5, 7, 9, 10, 200]),
    )
        .prop_map(|(b, len, last)| {
            Ipv4Net::new(Ipv4Addr::new(b[0], b[1], b[2], last), len)
                .unwrap()
                .trunc()
                .to_string()
        })
}

fn arb_v6() -> impl Strategy<Value = String> {
    let bases: Vec<[u16; 4]> = vec![
        [0x2001, 0xdb8, 0, 1],
        [0x2001, 0xdb8, 0, 2],
        [0x2001, 0xdb8, 1, 0],
        [0xfd00, 0, 0, 0],
    ];
    (
        select(bases),
        select(vec![0u8, 32, 48, 64, 120, 128]),
        select(vec![0u16, 5, 6, 0x99]),
    )
        .prop_map(|(b, len, last)| {
            let a = Ipv6Addr::new(b[0], b[1], b[2], b[3], 0, 0, 0, last);
            Ipv6Net::new(a, len).unwrap().trunc().to_string()
        })
}

fn selectors() -> Vec<NodeSelector> {
    let expr = |key: &str, op: &str, values: &[&str]| NodeSelectorRequirement {
        key: key.into(),
        operator: op.into(),
        values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
    };
    let labels = |k: &str, v: &str| Some(BTreeMap::from([(k.to_string(), v.to_string())]));
    vec![
        NodeSelector::default(),
        NodeSelector {
            match_labels: labels("role", "web"),
            match_expressions: None,
        },
        NodeSelector {
            match_labels: labels("role", "db"),
            match_expressions: None,
        },
        NodeSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("zone", "In", &["a", "c"])]),
        },
        NodeSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("role", "NotIn", &["db"])]),
        },
        NodeSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("zone", "Exists", &[])]),
        },
        NodeSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("gpu", "DoesNotExist", &[])]),
        },
        NodeSelector {
            match_labels: labels("role", "none"),
            match_expressions: None,
        },
    ]
}

fn arb_peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        4 => arb_v4().prop_map(|c| Peer { cidr: Some(c), ..Default::default() }),
        3 => arb_v6().prop_map(|c| Peer { cidr: Some(c), ..Default::default() }),
        1 => select(vec![SG_RESOLVED, SG_UNRESOLVED]).prop_map(|id| Peer { security_group_id: Some(id.into()), ..Default::default() }),
        1 => select(vec![PL_RESOLVED, PL_UNRESOLVED]).prop_map(|id| Peer { prefix_list_id: Some(id.into()), ..Default::default() }),
        1 => select(selectors()).prop_map(|s| Peer { node_selector: Some(s), ..Default::default() }),
    ]
}

fn arb_ports() -> impl Strategy<Value = Option<Vec<PortRange>>> {
    let pool = vec![
        (22, None),
        (80, None),
        (443, None),
        (8080, Some(8090)),
        (1, Some(65535)),
        (53, None),
        (10250, None),
    ];
    proptest::option::weighted(
        0.7,
        prop::collection::vec(
            select(pool).prop_map(|(port, end_port)| PortRange { port, end_port }),
            1..4,
        ),
    )
}

fn arb_icmp(v6: bool) -> impl Strategy<Value = Option<IcmpMatch>> {
    let types = if v6 {
        vec![2u8, 128, 135]
    } else {
        vec![3u8, 8, 11]
    };
    proptest::option::of(
        (select(types), proptest::option::of(select(vec![0u8, 4])))
            .prop_map(|(icmp_type, code)| IcmpMatch { icmp_type, code }),
    )
}

fn arb_rule() -> impl Strategy<Value = FirewallRule> {
    let protocol = select(vec![
        Protocol::Tcp,
        Protocol::Udp,
        Protocol::Icmp,
        Protocol::Icmpv6,
        Protocol::All,
    ]);
    let layers = select(vec![
        None,
        Some(vec![Layer::Cloud]),
        Some(vec![Layer::Node]),
        Some(vec![Layer::Node, Layer::Cloud]),
    ]);
    let rate = proptest::option::weighted(
        0.25,
        (
            1u32..20,
            select(vec![RatePeriod::Second, RatePeriod::Minute]),
            proptest::option::of(1u32..9),
        )
            .prop_map(|(count, per, burst)| RateLimit { count, per, burst }),
    );
    (
        protocol,
        arb_ports(),
        arb_icmp(false),
        arb_icmp(true),
        prop::collection::vec(arb_peer(), 1..6),
        layers,
        rate,
        any::<bool>(),
    )
        .prop_map(
            |(protocol, ports, icmp4, icmp6, peers, layers, rate_limit, log)| {
                let family_ok = |p: &Peer| match (&p.cidr, protocol) {
                    (Some(c), Protocol::Icmp) => !c.contains(':'),
                    (Some(c), Protocol::Icmpv6) => c.contains(':'),
                    _ => true,
                };
                let mut peers: Vec<Peer> = peers.into_iter().filter(family_ok).collect();
                if peers.is_empty() {
                    let c = if protocol == Protocol::Icmpv6 {
                        "2001:db8::/32"
                    } else {
                        "10.0.0.0/8"
                    };
                    peers.push(Peer {
                        cidr: Some(c.into()),
                        ..Default::default()
                    });
                }
                let node = layers.as_ref().is_none_or(|l| l.contains(&Layer::Node));
                FirewallRule {
                    name: String::new(),
                    description: None,
                    protocol,
                    ports: if matches!(protocol, Protocol::Tcp | Protocol::Udp) {
                        ports
                    } else {
                        None
                    },
                    icmp: match protocol {
                        Protocol::Icmp => icmp4,
                        Protocol::Icmpv6 => icmp6,
                        _ => None,
                    },
                    peers,
                    layers,
                    rate_limit: if node { rate_limit } else { None },
                    log: (node && log).then_some(true),
                }
            },
        )
}

fn named(mut rules: Vec<FirewallRule>, prefix: &str) -> Vec<FirewallRule> {
    for (i, r) in rules.iter_mut().enumerate() {
        r.name = format!("{prefix}{i}");
    }
    rules
}

fn arb_spec() -> impl Strategy<Value = FirewallPolicySpec> {
    (
        select(vec![PolicyMode::Enforce, PolicyMode::Audit]),
        proptest::option::of(select(selectors())),
        proptest::option::weighted(0.8, prop::collection::vec(arb_rule(), 0..5)),
        proptest::option::weighted(0.4, prop::collection::vec(arb_rule(), 0..4)),
    )
        .prop_map(|(mode, node_selector, ingress, egress)| {
            let ingress = match (&ingress, &egress) {
                (None, None) => Some(vec![]),
                _ => ingress,
            };
            FirewallPolicySpec {
                node_selector,
                mode,
                policy_types: [
                    ingress.is_some().then_some(PolicyType::Ingress),
                    egress.is_some().then_some(PolicyType::Egress),
                ]
                .into_iter()
                .flatten()
                .collect(),
                existing_connections: Default::default(),
                ingress: ingress.map(|r| named(r, "in")),
                egress: egress.map(|r| named(r, "out")),
                security_group: None,
            }
        })
}

fn arb_policies() -> impl Strategy<Value = Vec<FirewallPolicy>> {
    prop::collection::vec(arb_spec(), 1..4).prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| FirewallPolicy::new(&format!("pol-{i}"), s))
            .collect()
    })
}

fn arb_probe() -> impl Strategy<Value = Probe> {
    let v4 = vec![
        "10.0.0.1",
        "10.0.0.200",
        "10.0.1.5",
        "10.0.2.6",
        "10.1.3.7",
        "10.1.2.3",
        "192.0.2.9",
        "192.0.2.200",
        "203.0.113.10",
        "198.51.100.7",
        "10.9.1.1",
    ];
    let v6 = vec![
        "2001:db8:0:1::5",
        "2001:db8:0:2::6",
        "2001:db8:1::99",
        "2001:db8:0:1::99",
        "fd00::5",
        "2001:db8:9::1",
    ];
    let ports = vec![
        22u16, 80, 443, 8085, 8095, 53, 10250, 68, 67, 1, 65535, 6443, 123, 9901,
    ];
    let addr = prop_oneof![
        select(v4).prop_map(|a| a.parse::<IpAddr>().unwrap()),
        select(v6).prop_map(|a| a.parse::<IpAddr>().unwrap()),
    ];
    let direction = select(vec![Direction::Ingress, Direction::Egress]);
    (
        direction,
        addr,
        select(ports),
        0u8..4,
        select(vec![2u8, 3, 8, 11, 128, 135]),
        select(vec![0u8, 4]),
        any::<bool>(),
    )
        .prop_map(
            |(direction, peer, port, kind, icmp_type, code, over_rate)| {
                let protocol = match (kind, peer.is_ipv4()) {
                    (0, _) => ProbeProtocol::Tcp { port },
                    (1, _) => ProbeProtocol::Udp { port },
                    (2, true) => ProbeProtocol::Icmp { icmp_type, code },
                    (2, false) => ProbeProtocol::Icmpv6 { icmp_type, code },
                    _ => ProbeProtocol::Other(47),
                };
                Probe {
                    direction,
                    peer,
                    protocol,
                    over_rate,
                }
            },
        )
}

/// A deterministic shuffle driven by `seed`.
fn shuffle<T>(v: &mut [T], seed: &mut u64) {
    for i in (1..v.len()).rev() {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let j = (*seed >> 33) as usize % (i + 1);
        v.swap(i, j);
    }
}

fn reorder(policies: &[FirewallPolicy], mut seed: u64) -> Vec<FirewallPolicy> {
    let mut out = policies.to_vec();
    for p in &mut out {
        for rules in [&mut p.spec.ingress, &mut p.spec.egress]
            .into_iter()
            .flatten()
        {
            for r in rules.iter_mut() {
                shuffle(&mut r.peers, &mut seed);
                if let Some(ports) = &mut r.ports {
                    shuffle(ports, &mut seed);
                }
            }
            shuffle(rules, &mut seed);
        }
    }
    shuffle(&mut out, &mut seed);
    out
}

// ---------------------------------------------------------------- the spec, read directly

fn labels_match(sel: Option<&NodeSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = sel else { return true };
    sel.match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && sel.match_expressions.iter().flatten().all(|e| {
            let values = e.values.clone().unwrap_or_default();
            match e.operator.as_str() {
                "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
                "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
                "Exists" => labels.contains_key(&e.key),
                _ => !labels.contains_key(&e.key),
            }
        })
}

fn peer_contains(peer: &Peer, addr: IpAddr, facts: &Facts) -> bool {
    if let Some(c) = &peer.cidr {
        return c.parse::<IpNet>().unwrap().contains(&addr);
    }
    if let Some(id) = &peer.security_group_id {
        return facts
            .security_groups
            .get(id)
            .is_some_and(|n| n.iter().any(|n| n.contains(&addr)));
    }
    if let Some(id) = &peer.prefix_list_id {
        return facts
            .prefix_lists
            .get(id)
            .is_some_and(|pl| pl.cidrs.iter().any(|n| n.contains(&addr)));
    }
    facts.nodes.iter().any(|n| {
        labels_match(peer.node_selector.as_ref(), &n.labels) && n.addresses.contains(&addr)
    })
}

fn traffic_matches(rule: &FirewallRule, probe: &ProbeProtocol) -> bool {
    let icmp = |t: u8, c: u8| {
        rule.icmp
            .is_none_or(|m| m.icmp_type == t && m.code.is_none_or(|mc| mc == c))
    };
    let port = |p: u16| {
        rule.ports.as_ref().is_none_or(|ps| {
            ps.iter()
                .any(|r| r.port <= p && p <= r.end_port.unwrap_or(r.port))
        })
    };
    match (rule.protocol, *probe) {
        (Protocol::All, _) => true,
        (Protocol::Tcp, ProbeProtocol::Tcp { port: p })
        | (Protocol::Udp, ProbeProtocol::Udp { port: p }) => port(p),
        (Protocol::Icmp, ProbeProtocol::Icmp { icmp_type, code }) => icmp(icmp_type, code),
        (Protocol::Icmpv6, ProbeProtocol::Icmpv6 { icmp_type, code }) => icmp(icmp_type, code),
        _ => false,
    }
}

/// The rules of a direction the policy governs (`policyTypes`), possibly
/// none; `None` when it does not govern it.
fn rules_of(p: &FirewallPolicy, d: Direction) -> Option<&Vec<FirewallRule>> {
    static NONE: Vec<FirewallRule> = Vec::new();
    let (t, rules) = match d {
        Direction::Ingress => (PolicyType::Ingress, p.spec.ingress.as_ref()),
        Direction::Egress => (PolicyType::Egress, p.spec.egress.as_ref()),
    };
    p.spec.governs(t).then(|| rules.unwrap_or(&NONE))
}

fn rule_allows(rule: &FirewallRule, layer: Layer, probe: &Probe, facts: &Facts) -> bool {
    rule.enforced_on(layer)
        && traffic_matches(rule, &probe.protocol)
        && rule
            .peers
            .iter()
            .any(|p| peer_contains(p, probe.peer, facts))
}

/// The cloud layer as the spec says: `None` when the policy does not speak
/// for the direction, else whether a Cloud rule allows the probe.
fn spec_cloud(p: &FirewallPolicy, probe: &Probe, facts: &Facts) -> Option<bool> {
    let rules = rules_of(p, probe.direction)?;
    Some(
        rules
            .iter()
            .any(|r| rule_allows(r, Layer::Cloud, probe, facts)),
    )
}

fn failsafe_allows(facts: &Facts, probe: &Probe) -> bool {
    let fs = &facts.failsafe;
    let list = match probe.direction {
        Direction::Ingress => &fs.inbound,
        Direction::Egress => &fs.outbound,
    };
    // Who each scope is, read straight off the facts.
    let in_scope = |scope: FailsafeScope| match scope {
        FailsafeScope::Cluster => {
            facts
                .nodes
                .iter()
                .any(|n| n.addresses.contains(&probe.peer))
                || fs.cluster_cidrs.iter().any(|c| c.contains(&probe.peer))
        }
        FailsafeScope::ApiServer => facts.api_servers.contains(&probe.peer),
        FailsafeScope::Nameservers => facts.nameservers.contains(&probe.peer),
    };
    let in_list = |proto: Protocol, port: u16| {
        list.iter().any(|e| {
            e.protocol == proto
                && e.ports.port <= port
                && port <= e.ports.end_port.unwrap_or(e.ports.port)
                && (e.scopes().into_iter().any(in_scope)
                    || e.cidrs.iter().any(|c| c.contains(&probe.peer)))
        })
    };
    let icmp = |l: &[IcmpMatch], t: u8, c: u8| {
        l.iter()
            .any(|m| m.icmp_type == t && m.code.is_none_or(|mc| mc == c))
    };
    match probe.protocol {
        ProbeProtocol::Icmp { icmp_type, code } => icmp(&fs.icmp, icmp_type, code),
        ProbeProtocol::Icmpv6 { icmp_type, code } => icmp(&fs.icmpv6, icmp_type, code),
        ProbeProtocol::Tcp { port } => {
            in_list(Protocol::Tcp, port)
                || (probe.direction == Direction::Ingress
                    && port == fs.ssh_port
                    && fs.admin_cidrs.iter().any(|n| n.contains(&probe.peer)))
        }
        ProbeProtocol::Udp { port } => in_list(Protocol::Udp, port),
        ProbeProtocol::Other(_) => false,
    }
}

/// The node layer of `node` as the spec says.
fn spec_node(
    policies: &[FirewallPolicy],
    node: &NodeFacts,
    probe: &Probe,
    facts: &Facts,
) -> NodeVerdict {
    let speakers: Vec<&FirewallPolicy> = policies
        .iter()
        .filter(|p| labels_match(p.spec.node_selector.as_ref(), &node.labels))
        .filter(|p| rules_of(p, probe.direction).is_some())
        .collect();
    if speakers.is_empty() {
        return NodeVerdict::NotFiltered;
    }
    if failsafe_allows(facts, probe) {
        return NodeVerdict::Accept;
    }
    // Audit policies allow nothing: only Enforce policies' rules count.
    let allowed = speakers
        .iter()
        .filter(|p| p.spec.mode == PolicyMode::Enforce)
        .flat_map(|p| rules_of(p, probe.direction).into_iter().flatten())
        .any(|r| {
            rule_allows(r, Layer::Node, probe, facts)
                && !(r.rate_limit.is_some() && probe.over_rate)
        });
    if allowed {
        NodeVerdict::Accept
    } else if speakers.iter().any(|p| p.spec.mode == PolicyMode::Enforce) {
        NodeVerdict::Drop
    } else {
        NodeVerdict::AuditAccept
    }
}

fn valid(policies: &[FirewallPolicy]) -> Vec<ValidPolicy> {
    policies.iter().map(|p| validate(p).unwrap()).collect()
}

// ---------------------------------------------------------------- properties

proptest! {
    // No regression files: failures print their minimal input, which then
    // becomes a unit test next to the code it broke.
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn generated_policies_are_valid(policies in arb_policies()) {
        for p in &policies {
            prop_assert!(validate(p).is_ok(), "{:?}", validate(p).err());
        }
    }

    #[test]
    fn no_policy_cuts_the_failsafe_and_the_failsafe_opens_nothing_beyond_its_scope(
        policies in arb_policies(),
        probe in arb_probe(),
    ) {
        let f = facts();
        let a = valid(&policies);
        for n in f.nodes.iter() {
            let v = node_verdict(&compile_node(&n.name, &a, &f).unwrap(), &probe);
            if failsafe_allows(&f, &probe) {
                prop_assert!(matches!(v, NodeVerdict::Accept | NodeVerdict::NotFiltered), "{v:?}");
            }
            // Whatever Palisade allows, the failsafe or an Enforce rule
            // allowed: an Audit policy never widens, the failsafe never
            // reaches past its scope.
            if v == NodeVerdict::Accept {
                let enforce_allows = policies.iter().any(|p| {
                    p.spec.mode == PolicyMode::Enforce
                        && labels_match(p.spec.node_selector.as_ref(), &n.labels)
                        && rules_of(p, probe.direction).is_some_and(|rules| {
                            rules.iter().any(|r| {
                                rule_allows(r, Layer::Node, &probe, &f)
                                    && !(r.rate_limit.is_some() && probe.over_rate)
                            })
                        })
                });
                prop_assert!(failsafe_allows(&f, &probe) || enforce_allows, "{probe:?}");
            }
        }
    }

    #[test]
    fn compilation_is_deterministic(policies in arb_policies(), seed in any::<u64>()) {
        let f = facts();
        let shuffled = reorder(&policies, seed);
        let (a, b) = (valid(&policies), valid(&shuffled));
        for n in f.nodes.iter() {
            let x = compile_node(&n.name, &a, &f).unwrap();
            let y = compile_node(&n.name, &b, &f).unwrap();
            prop_assert_eq!(x.hash(), y.hash());
            prop_assert_eq!(&x, &y);
        }
        for p in &policies {
            let q = shuffled.iter().find(|q| q.metadata.name == p.metadata.name).unwrap();
            let (x, y) = (compile_policy(p, &f).unwrap(), compile_policy(q, &f).unwrap());
            prop_assert_eq!(x.cloud, y.cloud);
            prop_assert_eq!(x.warnings, y.warnings);
            prop_assert_eq!(x.selected_nodes, y.selected_nodes);
        }
    }

    #[test]
    fn canonicalisation_is_idempotent_and_meaning_preserving(policies in arb_policies()) {
        let f = facts();
        let canon: Vec<FirewallPolicy> = policies
            .iter()
            .map(|p| FirewallPolicy::new(p.metadata.name.as_deref().unwrap_or_default(), canonicalize_spec(&p.spec)))
            .collect();
        // Meaning, not warnings: the canonical form drops repeated peers and
        // ports, and with them the duplicate warnings they caused.
        for (p, c) in policies.iter().zip(&canon) {
            prop_assert_eq!(&canonicalize_spec(&c.spec), &c.spec);
            let (x, y) = (plan_cloud(&validate(p).unwrap(), &f).unwrap(), plan_cloud(&validate(c).unwrap(), &f).unwrap());
            prop_assert_eq!((x.ingress, x.egress, x.quota), (y.ingress, y.egress, y.quota));
        }
        let (a, b) = (valid(&policies), valid(&canon));
        for n in f.nodes.iter() {
            let (x, y) = (compile_node(&n.name, &a, &f).unwrap(), compile_node(&n.name, &b, &f).unwrap());
            prop_assert_eq!((x.ipv4, x.ipv6, x.sets, x.policies), (y.ipv4, y.ipv6, y.sets, y.policies));
        }
    }

    #[test]
    fn set_entries_and_aws_fields_are_canonical(nets in prop::collection::vec(prop_oneof![arb_v4(), arb_v6()], 0..12), policies in arb_policies()) {
        let nets: Vec<IpNet> = nets.iter().map(|n| n.parse().unwrap()).collect();
        let once = normalize_set_entries(nets.clone());
        prop_assert_eq!(normalize_set_entries(once.clone()), once.clone());
        for n in &nets {
            // Normalising never changes which addresses are covered.
            prop_assert!(once.iter().any(|m| m.contains(&n.network())));
        }
        let f = facts();
        for p in valid(&policies) {
            let plan = plan_cloud(&p, &f).unwrap();
            for perm in plan.ingress.iter().chain(plan.egress.iter()).flatten() {
                let perm = &perm.permission;
                let back = SgPermission::from_aws(&perm.protocol.aws_name(), Some(perm.from_port), Some(perm.to_port), perm.peer.clone()).unwrap();
                prop_assert_eq!(&back, perm);
            }
        }
    }

    #[test]
    fn cloud_plan_allows_exactly_what_the_spec_allows(policies in arb_policies(), probes in prop::collection::vec(arb_probe(), 24)) {
        let f = facts();
        for p in &policies {
            let plan = plan_cloud(&validate(p).unwrap(), &f).unwrap();
            for probe in &probes {
                prop_assert_eq!(cloud_permits(&plan, probe, &f), spec_cloud(p, probe, &f), "{:?}", probe);
            }
        }
    }

    #[test]
    fn node_ruleset_allows_exactly_what_the_spec_allows(policies in arb_policies(), probes in prop::collection::vec(arb_probe(), 24)) {
        let f = facts();
        let v = valid(&policies);
        for n in f.nodes.iter() {
            let rs = compile_node(&n.name, &v, &f).unwrap();
            for probe in &probes {
                prop_assert_eq!(node_verdict(&rs, probe), spec_node(&policies, n, probe, &f), "node {} {:?}", n.name, probe);
            }
        }
    }

    #[test]
    fn sg_diff_reaches_desired_and_spares_foreign_rules(
        spec in arb_spec(),
        adopted in any::<bool>(),
        picks in prop::collection::vec((0usize..64, 0u8..6, any::<bool>()), 0..14),
        ) {
        let f = facts();
        let p = validate(&FirewallPolicy::new("pol", spec)).unwrap();
        let plan = plan_cloud(&p, &f).unwrap();
        let ownership = if adopted { GroupOwnership::Adopted } else { GroupOwnership::Created };
        let desired: Vec<(Direction, &PlannedPermission)> = [Direction::Ingress, Direction::Egress]
            .into_iter()
            .flat_map(|d| plan.permissions(d).unwrap_or_default().iter().map(move |x| (d, x)))
            .collect();
        // Build a current group from desired permissions, stale owned ones,
        // foreign ones and the default egress, with assorted descriptions.
        let stale = |i: usize| SgPermission {
            protocol: SgProtocol::Tcp,
            from_port: 1000 + (i as i32 % 7),
            to_port: 1000 + (i as i32 % 7),
            peer: SgPeer::Ipv4("10.0.0.0/8".parse().unwrap()),
        };
        let mut current = Vec::new();
        for (n, (i, kind, egress)) in picks.iter().enumerate() {
            let direction = if *egress { Direction::Egress } else { Direction::Ingress };
            let (direction, permission) = match (kind, desired.get(i % desired.len().max(1))) {
                (0..=2, Some((d, want))) => (*d, want.permission.clone()),
                (3, _) => (direction, SgPermission::default_egress()[i % 2].clone()),
                _ => (direction, stale(*i)),
            };
            let description = match kind % 3 {
                0 => Some(format!("palisade:pol/old-{i}")),
                1 => Some(format!("hand-made {i}")),
                _ => None,
            };
            current.push(CurrentSgRule { rule_id: format!("sgr-{n}"), direction, permission, description });
        }
        let diff = diff_security_group(&plan, &current, ownership);
        for d in [Direction::Ingress, Direction::Egress] {
            for id in &diff.direction(d).revoke {
                let rule = current.iter().find(|r| &r.rule_id == id).unwrap();
                prop_assert!(owns_rule("pol", ownership, rule.description.as_deref()), "revoked foreign {:?}", rule);
            }
        }
        let after = diff.apply_to(&current);
        for r in current.iter().filter(|r| !owns_rule("pol", ownership, r.description.as_deref())) {
            prop_assert!(after.contains(r), "foreign rule changed: {:?}", r);
        }
        let protected = |d: Direction, perm: &SgPermission| {
            d == Direction::Egress && plan.keeps_default_egress && SgPermission::default_egress().contains(perm)
        };
        for d in [Direction::Ingress, Direction::Egress] {
            let owned: Vec<&CurrentSgRule> = after
                .iter()
                .filter(|r| r.direction == d && owns_rule("pol", ownership, r.description.as_deref()))
                .collect();
            match plan.permissions(d) {
                Some(want) => {
                    for w in want {
                        prop_assert!(after.iter().any(|r| r.direction == d && r.permission == w.permission), "missing {}", w.permission);
                    }
                    for r in owned {
                        let w = want.iter().find(|w| w.permission == r.permission);
                        prop_assert!(w.is_some() || protected(d, &r.permission), "stale owned rule {:?}", r);
                        if let Some(w) = w {
                            prop_assert_eq!(r.description.as_deref(), Some(w.description.as_str()));
                        }
                    }
                }
                None => {
                    prop_assert!(owned.iter().all(|r| !r.description.as_deref().unwrap_or_default().starts_with("palisade:pol/") || protected(d, &r.permission)));
                }
            }
        }
        prop_assert!(diff_security_group(&plan, &after, ownership).is_empty(), "not a fixed point");
    }

    #[test]
    fn node_diff_reaches_desired(before in arb_policies(), now in arb_policies(), drift in prop::collection::vec((0usize..32, 0u8..5), 0..6)) {
        let f = facts();
        let old = compile_node("n1", &valid(&before), &f).unwrap();
        let new = compile_node("n1", &valid(&now), &f).unwrap();
        let mut current = NodeState::of(&old);
        // Drift: a rule inserted by hand, a chain or hook gone, a set emptied,
        // foreign chains and sets that must survive.
        for (i, kind) in drift {
            let chains: Vec<String> = current.ipv4.chains.keys().cloned().collect();
            let sets: Vec<String> = current.sets.keys().cloned().collect();
            match kind {
                0 if !chains.is_empty() => { current.ipv4.chains.get_mut(&chains[i % chains.len()]).unwrap().push("by-hand".into()); }
                1 if !chains.is_empty() => { current.ipv4.chains.remove(&chains[i % chains.len()]); }
                2 => { current.ipv6.hooks.clear(); }
                3 if !sets.is_empty() => { current.sets.get_mut(&sets[i % sets.len()]).unwrap().entries.clear(); }
                _ => {
                    current.ipv4.chains.insert(format!("KUBE-{i}"), vec!["x".into()]);
                    current.sets.insert(format!("cali-{i}"), SetState { family: IpFamily::V4, entries: vec![] });
                }
            }
        }
        let diff = diff_node(&current, &new);
        let mut applied = current.clone();
        applied.apply(&diff);
        let mut ours = applied.clone();
        ours.ipv4.chains.retain(|k, _| is_palisade_chain(k));
        ours.ipv6.chains.retain(|k, _| is_palisade_chain(k));
        ours.sets.retain(|k, _| is_palisade_set(k));
        prop_assert_eq!(&ours, &NodeState::of(&new));
        for (k, v) in current.ipv4.chains.iter().filter(|(k, _)| !is_palisade_chain(k)) {
            prop_assert_eq!(applied.ipv4.chains.get(k), Some(v));
        }
        for k in current.sets.keys().filter(|k| !is_palisade_set(k)) {
            prop_assert!(applied.sets.contains_key(k));
        }
        prop_assert!(diff_node(&applied, &new).is_empty());
        prop_assert!(diff_node(&NodeState::of(&new), &new).is_empty());
    }
}
