//! Golden restore scripts: what the renderer writes for representative
//! rulesets. `UPDATE_GOLDEN=1 cargo test --test node_render` rewrites the
//! files in `tests/golden/`; review the diff like any other change.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use palisade::api::FirewallPolicy;
use palisade::node::model::{Model, edit_node};
use palisade::node::render::{render_node_edits, render_ruleset};
use palisade::policy::{
    Facts, IpFamily, NodeFacts, NodeRuleset, NodeState, PrefixListFacts, ValidPolicy, compile_node,
    diff_node, validate,
};

fn example(name: &str) -> FirewallPolicy {
    let path = format!("{}/deploy/examples/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn parse(yaml: &str) -> FirewallPolicy {
    serde_yaml::from_str(yaml).unwrap()
}

/// One node carrying every label the examples select on; a small failsafe
/// list so the goldens stay readable.
fn facts() -> Facts {
    let mut facts = Facts {
        nodes: vec![
            NodeFacts {
                name: "node-1".into(),
                labels: [
                    ("role", "web"),
                    ("tier", "app"),
                    ("palisade.dev/egress", "restricted"),
                ]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
                addresses: vec![
                    "10.0.1.10".parse().unwrap(),
                    "2001:db8::1:10".parse().unwrap(),
                ],
                provider_id: None,
            },
            NodeFacts {
                name: "node-2".into(),
                labels: [("role", "web")]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                addresses: vec!["10.0.1.11".parse().unwrap()],
                provider_id: None,
            },
        ]
        .into(),
        ..Default::default()
    };
    facts.failsafe.admin_cidrs = vec!["192.0.2.0/24".parse().unwrap()];
    facts.failsafe.inbound.truncate(1);
    facts.failsafe.outbound.truncate(1);
    facts.failsafe.icmp.truncate(1);
    facts.failsafe.icmpv6.truncate(2);
    facts
}

fn compile(policies: &[FirewallPolicy]) -> NodeRuleset {
    let valid: Vec<ValidPolicy> = policies.iter().map(|p| validate(p).unwrap()).collect();
    compile_node("node-1", &valid, &facts()).unwrap()
}

fn check(name: &str, text: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    pretty_assertions::assert_eq!(want, text, "golden {name} differs");
}

fn golden_ruleset(name: &str, policies: &[FirewallPolicy]) -> NodeRuleset {
    let rs = compile(policies);
    check(name, &render_ruleset(&rs).to_string());
    rs
}

#[test]
fn seed_web_server() {
    let rs = golden_ruleset("web-server", &[example("web-server")]);
    // One admin CIDR and few peers: all inline; the only sets are the
    // failsafe's cluster scope (the nodes' addresses).
    assert!(
        rs.sets.iter().all(|s| s.owner == "failsafe:cluster"),
        "{:?}",
        rs.sets
    );
}

#[test]
fn jump_host_narrowing_with_log() {
    golden_ruleset("ssh-jump-host", &[example("ssh-jump-host")]);
}

#[test]
fn rate_limit() {
    let mut p = example("rate-limited-ssh");
    p.spec.node_selector = None;
    golden_ruleset("rate-limited-ssh", &[p]);
}

#[test]
fn audit_mode() {
    golden_ruleset("audit-rollout", &[example("audit-rollout")]);
}

#[test]
fn egress_lockdown() {
    golden_ruleset("egress-lockdown", &[example("egress-lockdown")]);
}

#[test]
fn large_cidr_list_goes_through_a_set() {
    // 50 peers at most per rule: long lists come from a prefix list.
    let p = parse(
        "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata:\n  name: partners\nspec:\n  policyTypes: [Ingress]\n  ingress:\n    - name: api\n      protocol: TCP\n      ports: [{port: 8443}]\n      peers:\n        - prefixListId: pl-0123456789abcdef0\n",
    );
    let mut facts = facts();
    facts.prefix_lists.insert(
        "pl-0123456789abcdef0".into(),
        PrefixListFacts {
            family: IpFamily::V4,
            cidrs: (0..200)
                .map(|i| {
                    format!("10.{}.{}.0/24", 100 + i / 100, i % 100)
                        .parse()
                        .unwrap()
                })
                .collect(),
            max_entries: 200,
        },
    );
    let rs = compile_node("node-1", &[validate(&p).unwrap()], &facts).unwrap();
    check("large-cidr-set", &render_ruleset(&rs).to_string());
    assert!(rs.sets.iter().any(|s| s.entries.len() == 200));
}

#[test]
fn one_rule_change_edits_one_rule_per_family() {
    let before = compile(&[example("web-server"), example("egress-lockdown")]);
    let mut edited = example("web-server");
    edited.spec.ingress.as_mut().unwrap()[0]
        .ports
        .as_mut()
        .unwrap()[0]
        .port = 8080;
    let after = compile(&[edited, example("egress-lockdown")]);
    let diff = diff_node(&NodeState::of(&before), &after);
    assert_eq!(diff.ipv4.write_chains.len(), 1);
    assert_eq!(diff.ipv6.write_chains.len(), 1);
    assert!(diff.create_sets.is_empty() && diff.swap_sets.is_empty());
    // From the model: the changed rules only, no chain redeclared.
    let edits = edit_node(&Model::of(&before), &after);
    assert!(edits.ipv4.whole.is_empty() && edits.ipv6.whole.is_empty());
    assert_eq!(edits.ipv4.edits.len(), 1);
    let scripts = render_node_edits(&edits);
    assert!(!scripts.to_string().contains("\n:"), "{scripts}");
    check("one-rule-change", &scripts.to_string());
    // Once applied, nothing more to write.
    assert!(render_node_edits(&edit_node(&Model::of(&after), &after)).is_empty());
}

#[test]
fn removing_every_policy_deletes_hooks_then_chains() {
    let before = compile(&[example("web-server")]);
    let after = compile(&[]);
    check(
        "remove-all",
        &render_node_edits(&edit_node(&Model::of(&before), &after)).to_string(),
    );
}

#[test]
fn cli_render_prints_both_layers_for_a_node_manifest() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    palisade::cli::render_files(
        &dir.join("tests/fixtures/node-web-1.yaml"),
        &[
            dir.join("deploy/examples/web-server.yaml"),
            dir.join("deploy/examples/ssh-jump-host.yaml"),
            dir.join("deploy/examples/egress-lockdown.yaml"),
        ],
        &palisade::cli::AgentSettings {
            admin_cidrs: vec!["192.0.2.0/24".parse().unwrap()],
            ..Default::default()
        },
        palisade::cli::OutputFormat::Rules,
        &mut out,
    )
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("#   selected by: ssh-jump-host (Enforce"),
        "{text}"
    );
    assert!(!text.contains("egress-lockdown"), "not selected: {text}");
    assert!(text.contains("tcp 22 203.0.113.0/24  \"palisade:web-server/ssh-office"));
    assert!(text.contains("# iptables-restore --noflush\n*filter\n"));
    assert!(text.contains("-s 192.0.2.0/24 -m comment --comment \"palisade:"));
    assert!(text.contains("-I INPUT 1 -m comment"));
    // Palisade only removes access: its allows hand back to the host.
    assert!(!text.contains("-j ACCEPT"), "{text}");
    assert!(text.contains("-j RETURN"), "{text}");
}

#[test]
fn every_accepted_icmp_type_renders_a_rule_for_that_type_only() {
    for (protocol, cidr, flag, family_rules) in [
        ("ICMP", "0.0.0.0/0", "--icmp-type", 4usize),
        ("ICMPv6", "'::/0'", "--icmpv6-type", 6),
    ] {
        for t in 0..=255u16 {
            let p = parse(&format!(
                "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {{name: icmp}}\nspec:\n  policyTypes: [Ingress]\n  ingress:\n    - {{name: t, protocol: {protocol}, icmp: {{type: {t}}}, peers: [{{cidr: {cidr}}}]}}\n"
            ));
            let valid = validate(&p);
            if t == 255 {
                // iptables reads 255 as "every type": refused, never rendered.
                let err = valid.unwrap_err().to_string();
                assert!(err.contains("wildcard"), "{err}");
                continue;
            }
            let rs = compile_node("node-1", &[valid.unwrap()], &facts()).unwrap();
            let text = render_ruleset(&rs).to_string();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("icmp/ingress/t\""))
                .collect();
            assert_eq!(lines.len(), 1, "{protocol} {t}: {lines:?}");
            assert!(
                lines[0].contains(&format!("{flag} {t} ")),
                "{protocol} {t}: {}",
                lines[0]
            );
            let _ = family_rules;
        }
    }
}

#[test]
fn the_egress_lockdown_example_leaves_its_allows_and_the_scoped_failsafe() {
    use palisade::policy::eval::{NodeVerdict, Probe, ProbeProtocol, node_verdict};
    let mut facts = facts();
    facts.failsafe = palisade::policy::Failsafe::default();
    // Outside the example's own 10.0.0.0/16, so only the failsafe can
    // admit them.
    facts.api_servers = vec!["172.20.0.10".parse().unwrap()];
    facts.nameservers = vec!["172.20.0.2".parse().unwrap()];
    std::sync::Arc::make_mut(&mut facts.nodes).push(NodeFacts {
        name: "node-3".into(),
        addresses: vec!["172.21.0.5".parse().unwrap()],
        ..Default::default()
    });
    let valid = validate(&example("egress-lockdown")).unwrap();
    let rs = compile_node("node-1", &[valid], &facts).unwrap();
    let out = |peer: &str, protocol| Probe {
        direction: palisade::policy::Direction::Egress,
        peer: peer.parse().unwrap(),
        protocol,
        over_rate: false,
    };
    let tcp = |port| ProbeProtocol::Tcp { port };
    let udp = |port| ProbeProtocol::Udp { port };
    let cases = [
        // The example's own allows.
        ("198.51.100.7", tcp(443), true),
        ("10.0.0.2", udp(53), true),
        ("10.0.77.1", tcp(5432), true),
        // The scoped failsafe: the API server, the other node, EC2's services.
        ("172.20.0.10", tcp(443), true),
        ("172.20.0.2", udp(53), true),
        ("172.20.0.2", tcp(53), true),
        ("172.21.0.5", tcp(10250), true),
        ("172.21.0.5", udp(8472), true),
        ("172.21.0.5", tcp(443), false),
        ("172.20.0.10", tcp(10250), false),
        ("169.254.169.254", tcp(80), true),
        ("169.254.169.253", udp(53), true),
        ("169.254.169.123", udp(123), true),
        ("fd00:ec2::254", tcp(80), true),
        // Nothing else: no exfiltration on 443, no DNS or time elsewhere.
        ("203.0.113.5", tcp(443), false),
        ("203.0.113.5", tcp(6443), false),
        ("203.0.113.5", udp(53), false),
        ("203.0.113.5", udp(123), false),
        ("203.0.113.5", tcp(10250), false),
        ("203.0.113.5", udp(4789), false),
        ("2001:db8:ffff::1", tcp(443), false),
        ("169.254.169.254", tcp(443), false),
    ];
    for (peer, protocol, allowed) in cases {
        let v = node_verdict(&rs, &out(peer, protocol));
        let want = if allowed {
            NodeVerdict::Accept
        } else {
            NodeVerdict::Drop
        };
        assert_eq!(v, want, "egress {protocol:?} to {peer}");
    }
}
