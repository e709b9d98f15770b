//! The node dataplane with real packets: simulated hosts (network
//! namespaces on a bridge), rules applied by the dataplane straight from
//! `compile_node` output, probes from peers inside and outside the allowed
//! CIDRs. Every iptables/ipset command runs inside a namespace made here.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use palisade::api::FirewallPolicy;
use palisade::node::backend::Backend;
use palisade::node::dataplane::{Dataplane, plan};
use palisade::policy::{Facts, IpFamily, NodeRuleset, PrefixListFacts};
use palisade::testenv::{DataplaneNode, Reach, SimHost, SimNet};

const OPEN: Duration = Duration::from_secs(2);
const DROP: Duration = Duration::from_millis(300);

fn policy(yaml: &str) -> FirewallPolicy {
    serde_yaml::from_str(yaml).unwrap()
}

fn ingress_policy(name: &str, rules: &str) -> FirewallPolicy {
    policy(&format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata:\n  name: {name}\nspec:\n  policyTypes: [Ingress]\n  ingress:\n{rules}"
    ))
}

/// A node host, its dataplane and the facts naming it.
struct Node(DataplaneNode);

impl std::ops::Deref for Node {
    type Target = DataplaneNode;
    fn deref(&self) -> &DataplaneNode {
        &self.0
    }
}

impl std::ops::DerefMut for Node {
    fn deref_mut(&mut self) -> &mut DataplaneNode {
        &mut self.0
    }
}

impl Node {
    fn new(net: &SimNet, name: &str, admin: Option<&SimHost>) -> Node {
        Node(DataplaneNode::new(net, name, admin).unwrap())
    }

    fn compile(&self, policies: &[FirewallPolicy]) -> NodeRuleset {
        self.0.compile(policies).unwrap()
    }

    fn apply(&self, policies: &[FirewallPolicy]) -> NodeRuleset {
        self.0.apply(policies).unwrap()
    }

    fn save(&self) -> String {
        self.0.save().unwrap()
    }

    /// A pretend kube-proxy chain and a user's own INPUT rule.
    fn add_foreign_rules(&self) {
        for tool in ["iptables-nft", "ip6tables-nft"] {
            self.host.exec(&[tool, "-N", "KUBE-SERVICES"]).unwrap();
            self.host
                .exec(&[
                    tool,
                    "-A",
                    "KUBE-SERVICES",
                    "-p",
                    "tcp",
                    "--dport",
                    "31000",
                    "-j",
                    "RETURN",
                ])
                .unwrap();
            self.host
                .exec(&[
                    tool, "-A", "INPUT", "-p", "tcp", "--dport", "7777", "-j", "ACCEPT",
                ])
                .unwrap();
            self.host
                .exec(&[tool, "-A", "INPUT", "-j", "KUBE-SERVICES"])
                .unwrap();
        }
    }

    fn assert_foreign_rules_intact(&self) {
        let save = self.save();
        for line in [
            "-A KUBE-SERVICES -p tcp -m tcp --dport 31000 -j RETURN",
            "-A INPUT -p tcp -m tcp --dport 7777 -j ACCEPT",
            "-A INPUT -j KUBE-SERVICES",
        ] {
            assert_eq!(save.matches(line).count(), 2, "{line} in\n{save}");
        }
    }
}

fn tcp(from: &SimHost, src: Option<IpAddr>, to: SocketAddr, timeout: Duration) -> Reach {
    match src {
        Some(s) => from.probe_tcp_from(s, to, timeout).unwrap(),
        None => from.probe_tcp(to, timeout).unwrap(),
    }
}

fn udp(from: &SimHost, src: Option<IpAddr>, to: SocketAddr, timeout: Duration) -> Reach {
    match src {
        Some(s) => from.probe_udp_from(s, to, timeout).unwrap(),
        None => from.probe_udp(to, timeout).unwrap(),
    }
}

fn node_ips(host: &SimHost) -> [IpAddr; 2] {
    [IpAddr::V4(host.ipv4()), IpAddr::V6(host.ipv6())]
}

#[test]
fn only_the_allowed_flows_pass_and_failsafe_ssh_always_works() {
    let net = SimNet::new().unwrap();
    let admin = net.add_host("admin").unwrap();
    let node = Node::new(&net, "node", Some(&admin));
    let peer = net.add_host("peer").unwrap();
    let inside4: IpAddr = "203.0.113.10".parse().unwrap();
    let inside6: IpAddr = "2001:db8:100::10".parse().unwrap();
    peer.add_address("203.0.113.10/24".parse().unwrap())
        .unwrap();
    peer.add_address("2001:db8:100::10/64".parse().unwrap())
        .unwrap();
    node.add_foreign_rules();

    let tcp_ok = node.host.listen_tcp(8080).unwrap();
    let tcp_other = node.host.listen_tcp(9090).unwrap();
    let udp_ok = node.host.listen_udp(5353).unwrap();
    let udp_other = node.host.listen_udp(5454).unwrap();
    let ssh = node.host.listen_tcp(22).unwrap();
    let p = ingress_policy(
        "matrix",
        "    - name: web\n      protocol: TCP\n      ports: [{port: 8080}]\n      peers: [{cidr: 203.0.113.0/24}, {cidr: '2001:db8:100::/64'}]\n    - name: dns\n      protocol: UDP\n      ports: [{port: 5353}]\n      peers: [{cidr: 203.0.113.0/24}, {cidr: '2001:db8:100::/64'}]\n",
    );
    node.apply(&[p]);

    let mut table = Vec::new();
    for ip in node_ips(&node.host) {
        let inside = if ip.is_ipv4() { inside4 } else { inside6 };
        for (src_name, src) in [("inside", Some(inside)), ("outside", None)] {
            for (proto, port, allowed_port) in [
                ("tcp", tcp_ok.port(), true),
                ("tcp", tcp_other.port(), false),
                ("udp", udp_ok.port(), true),
                ("udp", udp_other.port(), false),
            ] {
                let expect_open = allowed_port && src.is_some();
                let timeout = if expect_open { OPEN } else { DROP };
                let to = SocketAddr::new(ip, port);
                let reach = if proto == "tcp" {
                    tcp(&peer, src, to, timeout)
                } else {
                    udp(&peer, src, to, timeout)
                };
                table.push(format!("{proto} {to} from {src_name}: {reach:?}"));
                let want = if expect_open {
                    Reach::Open
                } else {
                    Reach::TimedOut
                };
                assert_eq!(reach, want, "{proto} {to} from {src_name}");
            }
        }
    }
    println!("{}", table.join("\n"));
    // Failsafe SSH from the admin host; nobody else.
    let ssh_to = SocketAddr::new(IpAddr::V4(node.host.ipv4()), ssh.port());
    assert_eq!(admin.probe_tcp(ssh_to, OPEN).unwrap(), Reach::Open);
    assert_eq!(peer.probe_tcp(ssh_to, DROP).unwrap(), Reach::TimedOut);
    // The hook sits above the user's rule; foreign rules untouched.
    let save = node.save();
    let first_input = save.lines().find(|l| l.starts_with("-A INPUT")).unwrap();
    assert!(first_input.contains("-j PALISADE-INPUT"), "{save}");
    node.assert_foreign_rules_intact();
    // Removing the policy removes every rule and set, and nothing else.
    node.apply(&[]);
    let save = node.save();
    assert!(
        !save.contains("PALISADE") && !save.contains("PAL-"),
        "{save}"
    );
    node.assert_foreign_rules_intact();
    let to = SocketAddr::new(IpAddr::V4(node.host.ipv4()), tcp_other.port());
    assert_eq!(peer.probe_tcp(to, OPEN).unwrap(), Reach::Open);
}

#[test]
fn egress_lockdown_keeps_return_traffic() {
    let net = SimNet::new().unwrap();
    let node = Node::new(&net, "node", None);
    let peer = net.add_host("peer").unwrap();
    let allowed = peer.listen_tcp(8080).unwrap();
    let other = peer.listen_tcp(9090).unwrap();
    let inbound = node.host.listen_tcp(7070).unwrap();
    let p = policy(&format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata:\n  name: out\nspec:\n  policyTypes: [Egress]\n  egress:\n    - name: app\n      protocol: TCP\n      ports: [{{port: 8080}}]\n      peers: [{{cidr: {}/32}}]\n",
        peer.ipv4()
    ));
    node.apply(&[p]);
    let to = |port| SocketAddr::new(IpAddr::V4(peer.ipv4()), port);
    // The echo comes back: return traffic of an outbound connection passes.
    assert_eq!(
        node.host.probe_tcp(to(allowed.port()), OPEN).unwrap(),
        Reach::Open
    );
    let blocked = node.host.probe_tcp(to(other.port()), DROP).unwrap();
    assert_ne!(blocked, Reach::Open);
    // Ingress is not spoken for: left open.
    let back = SocketAddr::new(IpAddr::V4(node.host.ipv4()), inbound.port());
    assert_eq!(peer.probe_tcp(back, OPEN).unwrap(), Reach::Open);
}

#[test]
fn audit_drops_nothing() {
    let net = SimNet::new().unwrap();
    let node = Node::new(&net, "node", None);
    let peer = net.add_host("peer").unwrap();
    let other = node.host.listen_tcp(9090).unwrap();
    let mut p = ingress_policy(
        "audit",
        "    - name: web\n      protocol: TCP\n      ports: [{port: 8080}]\n      peers: [{cidr: 203.0.113.0/24}]\n",
    );
    p.spec.mode = palisade::api::PolicyMode::Audit;
    node.apply(&[p]);
    for ip in node_ips(&node.host) {
        assert_eq!(
            peer.probe_tcp(SocketAddr::new(ip, other.port()), OPEN)
                .unwrap(),
            Reach::Open
        );
    }
    // It logs and counts: its would-be drops reached its LOG and counter.
    let chain =
        palisade::policy::node::policy_chain_name("audit", palisade::policy::Direction::Ingress);
    let listing = node
        .host
        .exec(&["iptables-nft", "-L", &chain, "-v", "-x", "-n"])
        .unwrap();
    let log = listing
        .lines()
        .find(|l| l.contains("LOG") && l.contains("pal-audit:audit"))
        .unwrap();
    let packets: u64 = log.split_whitespace().next().unwrap().parse().unwrap();
    assert!(packets >= 1, "{listing}");
}

#[test]
fn rate_limit_drops_above_the_rate() {
    let net = SimNet::new().unwrap();
    let node = Node::new(&net, "node", None);
    let peer = net.add_host("peer").unwrap();
    let svc = node.host.listen_tcp(2222).unwrap();
    let p = ingress_policy(
        "limited",
        "    - name: ssh\n      protocol: TCP\n      ports: [{port: 2222}]\n      rateLimit: {count: 6, per: Minute, burst: 3}\n      peers: [{cidr: 0.0.0.0/0}]\n",
    );
    node.apply(&[p]);
    let to = SocketAddr::new(IpAddr::V4(node.host.ipv4()), svc.port());
    let opens = (0..8)
        .filter(|_| peer.probe_tcp(to, DROP).unwrap() == Reach::Open)
        .count();
    assert_eq!(opens, 3, "the burst passes, the rest drop");
}

#[test]
fn two_policies_give_the_union() {
    let net = SimNet::new().unwrap();
    let node = Node::new(&net, "node", None);
    let peer = net.add_host("peer").unwrap();
    let a = node.host.listen_tcp(8081).unwrap();
    let b = node.host.listen_tcp(8082).unwrap();
    let c = node.host.listen_tcp(8083).unwrap();
    let pa = ingress_policy(
        "a",
        "    - name: a\n      protocol: TCP\n      ports: [{port: 8081}]\n      peers: [{cidr: 0.0.0.0/0}]\n",
    );
    let pb = ingress_policy(
        "b",
        "    - name: b\n      protocol: TCP\n      ports: [{port: 8082}]\n      peers: [{cidr: 0.0.0.0/0}]\n",
    );
    node.apply(&[pa, pb]);
    let to = |port| SocketAddr::new(IpAddr::V4(node.host.ipv4()), port);
    assert_eq!(peer.probe_tcp(to(a.port()), OPEN).unwrap(), Reach::Open);
    assert_eq!(peer.probe_tcp(to(b.port()), OPEN).unwrap(), Reach::Open);
    assert_eq!(peer.probe_tcp(to(c.port()), DROP).unwrap(), Reach::TimedOut);
}

#[test]
fn edits_under_continuous_traffic_lose_nothing_both_versions_allow() {
    let net = SimNet::new().unwrap();
    let node = Node::new(&net, "node", None);
    let peer = net.add_host("peer").unwrap();
    let svc = node.host.listen_tcp(8080).unwrap();
    let udp_svc = node.host.listen_udp(8080).unwrap();
    let cidrs: Vec<String> = (0..40).map(|i| format!("10.{i}.0.0/16")).collect();
    let version = |n: usize| {
        // Both versions allow the peer (through a set of many CIDRs: the
        // set is swapped, never emptied); they differ in other rules.
        let mut peers: Vec<String> = cidrs.iter().take(10 + n % 5).cloned().collect();
        peers.push(format!("{}/32", peer.ipv4()));
        let list: String = peers.iter().map(|c| format!("{{cidr: {c}}}, ")).collect();
        ingress_policy(
            "edit",
            &format!(
                "    - name: app\n      protocol: TCP\n      ports: [{{port: 8080}}]\n      peers: [{list}]\n    - name: app-udp\n      protocol: UDP\n      ports: [{{port: 8080}}]\n      peers: [{list}]\n    - name: extra\n      protocol: TCP\n      ports: [{{port: {}}}]\n      peers: [{{cidr: 0.0.0.0/0}}]\n",
                9000 + n
            ),
        )
    };
    node.apply(&[version(0)]);
    let stop = AtomicBool::new(false);
    let (probes, lost) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let to = SocketAddr::new(IpAddr::V4(node.host.ipv4()), svc.port());
    let to_udp = SocketAddr::new(IpAddr::V4(node.host.ipv4()), udp_svc.port());
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                for reach in [
                    peer.probe_tcp(to, OPEN).unwrap(),
                    peer.probe_udp(to_udp, OPEN).unwrap(),
                ] {
                    probes.fetch_add(1, Ordering::Relaxed);
                    if reach != Reach::Open {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        let start = Instant::now();
        for n in 1..=30 {
            let report = node.dataplane.sync(&node.compile(&[version(n)])).unwrap();
            assert!(report.wrote());
            std::thread::sleep(Duration::from_millis(20));
        }
        println!("30 edits in {:?}", start.elapsed());
        stop.store(true, Ordering::Relaxed);
    });
    let (probes, lost) = (probes.into_inner(), lost.into_inner());
    println!("{probes} probes during the edits, {lost} lost");
    assert!(probes > 30);
    assert_eq!(lost, 0);
}

#[test]
fn drift_is_found_by_readback_and_repaired() {
    let net = SimNet::new().unwrap();
    let node = Node::new(&net, "node", None);
    let peer = net.add_host("peer").unwrap();
    let svc = node.host.listen_tcp(9090).unwrap();
    node.add_foreign_rules();
    let p = ingress_policy(
        "drift",
        "    - name: web\n      protocol: TCP\n      ports: [{port: 8080}]\n      peers: [{cidr: 0.0.0.0/0}]\n",
    );
    let rs = node.apply(&[p]);
    let to = SocketAddr::new(IpAddr::V4(node.host.ipv4()), svc.port());
    assert_eq!(peer.probe_tcp(to, DROP).unwrap(), Reach::TimedOut);

    // Flushed chain: found, only that chain rewritten.
    node.host
        .exec(&["iptables-nft", "-F", "PALISADE-INPUT"])
        .unwrap();
    let found = plan(&node.dataplane.read().unwrap(), &rs);
    let written: Vec<&str> = found
        .diff
        .ipv4
        .write_chains
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(written, ["PALISADE-INPUT"]);
    assert!(found.diff.ipv6.is_empty());
    node.dataplane.sync(&rs).unwrap();
    assert!(!node.dataplane.sync(&rs).unwrap().wrote());

    // Deleted hook: found and put back at the top.
    let save = node
        .host
        .exec(&["iptables-nft-save", "-t", "filter"])
        .unwrap();
    let hook = save
        .lines()
        .find(|l| l.starts_with("-A INPUT") && l.contains("PALISADE-INPUT"))
        .unwrap();
    let mut args: Vec<String> = vec!["sh".into(), "-c".into()];
    args.push(format!("iptables-nft {}", hook.replacen("-A", "-D", 1)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    node.host.exec(&args).unwrap();
    assert_eq!(
        peer.probe_tcp(to, OPEN).unwrap(),
        Reach::Open,
        "hook gone: open"
    );
    let found = plan(&node.dataplane.read().unwrap(), &rs);
    assert_eq!(found.diff.ipv4.add_hooks.len(), 1);
    node.dataplane.sync(&rs).unwrap();
    assert_eq!(peer.probe_tcp(to, DROP).unwrap(), Reach::TimedOut);

    // A rule inserted above the hook: the hook moves back to the top.
    node.host
        .exec(&[
            "iptables-nft",
            "-I",
            "INPUT",
            "1",
            "-p",
            "tcp",
            "--dport",
            "9090",
            "-j",
            "ACCEPT",
        ])
        .unwrap();
    assert!(node.dataplane.sync(&rs).unwrap().wrote());
    let save = node
        .host
        .exec(&["iptables-nft-save", "-t", "filter"])
        .unwrap();
    let first = save.lines().find(|l| l.starts_with("-A INPUT")).unwrap();
    assert!(first.contains("PALISADE-INPUT"), "{save}");
    assert_eq!(save.matches("-j PALISADE-INPUT").count(), 1, "{save}");
    assert!(!node.dataplane.sync(&rs).unwrap().wrote());
    node.host
        .exec(&[
            "iptables-nft",
            "-D",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            "9090",
            "-j",
            "ACCEPT",
        ])
        .unwrap();
    node.assert_foreign_rules_intact();

    // Cleanup removes exactly what Palisade wrote.
    node.dataplane.cleanup().unwrap();
    let save = node.save();
    assert!(
        !save.contains("PALISADE") && !save.contains("PAL-"),
        "{save}"
    );
    node.assert_foreign_rules_intact();
    assert!(!node.host.exec(&["ipset", "save"]).unwrap().contains("PAL-"));
}

#[test]
fn a_failed_restore_leaves_the_previous_ruleset() {
    let net = SimNet::new().unwrap();
    let node = Node::new(&net, "node", None);
    let p = ingress_policy(
        "keep",
        "    - name: web\n      protocol: TCP\n      ports: [{port: 8080}]\n      peers: [{cidr: 0.0.0.0/0}]\n",
    );
    let rs = node.apply(&[p]);
    let before = node.save();
    let mut bad = plan(
        &node.dataplane.read().unwrap(),
        &palisade::node::dataplane::empty_ruleset("node"),
    );
    let text = bad.scripts.ipv4.take().unwrap();
    bad.scripts.ipv4 = Some(text.replace(
        "COMMIT",
        "-A PALISADE-INPUT -m no-such-match -j ACCEPT\nCOMMIT",
    ));
    bad.scripts.ipv6 = None;
    bad.scripts.destroy_sets = None;
    let err = node.dataplane.apply(&bad).unwrap_err();
    assert!(err.is_restore_failure(), "{err}");
    assert_eq!(node.save(), before);
    assert!(!node.dataplane.sync(&rs).unwrap().wrote());
}

#[test]
fn sets_are_swapped_never_emptied_and_destroyed_when_unused() {
    let net = SimNet::new().unwrap();
    let node = Node::new(&net, "node", None);
    let p = ingress_policy(
        "partners",
        "    - name: api\n      protocol: TCP\n      ports: [{port: 8443}]\n      peers: [{prefixListId: pl-0123456789abcdef0}]\n",
    );
    let mut node = node;
    let with = |n: usize, facts: &mut Facts| {
        facts.prefix_lists.insert(
            "pl-0123456789abcdef0".into(),
            PrefixListFacts {
                family: IpFamily::V4,
                cidrs: (0..n)
                    .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap())
                    .collect(),
                max_entries: n as u32,
            },
        );
    };
    with(1000, &mut node.facts);
    let rs = node.apply(std::slice::from_ref(&p));
    let set = rs
        .sets
        .iter()
        .find(|s| s.entries.len() == 1000)
        .unwrap()
        .name
        .clone();
    with(1500, &mut node.facts);
    let rs2 = node.compile(std::slice::from_ref(&p));
    let report = node.dataplane.sync(&rs2).unwrap();
    assert_eq!(report.plan.diff.swap_sets.len(), 1);
    assert_eq!(
        report.chains_written, 0,
        "membership change: no chain rewritten"
    );
    let script = report.plan.scripts.sets.unwrap();
    assert!(
        script.contains(&format!("swap {set}-new {set}")),
        "{script}"
    );
    let readback = node.dataplane.read().unwrap();
    assert_eq!(readback.state.sets[&set].entries.len(), 1500);
    assert!(!node.dataplane.sync(&rs2).unwrap().wrote());
    node.apply(&[]);
    assert!(!node.host.exec(&["ipset", "save"]).unwrap().contains("PAL-"));
    drop(rs);
}

#[test]
fn legacy_backend_round_trips_too() {
    let net = SimNet::new().unwrap();
    let mut node = Node::new(&net, "node", None);
    node.dataplane = Dataplane::new(Backend::Legacy, Some(node.host.netns().to_string()));
    let peer = net.add_host("peer").unwrap();
    let svc = node.host.listen_tcp(8080).unwrap();
    let other = node.host.listen_tcp(9090).unwrap();
    let p = ingress_policy(
        "legacy",
        "    - name: web\n      protocol: TCP\n      ports: [{port: 8080}]\n      peers: [{cidr: 10.1.0.0/16}, {cidr: 10.2.0.0/16}, {cidr: 10.3.0.0/16}, {cidr: 10.4.0.0/16}, {cidr: 10.5.0.0/16}, {cidr: 0.0.0.0/0}]\n      log: true\n",
    );
    let rs = node.apply(&[p]);
    let to = |port| SocketAddr::new(IpAddr::V4(node.host.ipv4()), port);
    assert_eq!(peer.probe_tcp(to(svc.port()), OPEN).unwrap(), Reach::Open);
    assert_eq!(
        peer.probe_tcp(to(other.port()), DROP).unwrap(),
        Reach::TimedOut
    );
    node.host
        .exec(&["iptables-legacy", "-F", "PALISADE-INPUT"])
        .unwrap();
    assert!(node.dataplane.sync(&rs).unwrap().wrote());
    assert!(!node.dataplane.sync(&rs).unwrap().wrote());
    node.dataplane.cleanup().unwrap();
    let save = node
        .host
        .exec(&["iptables-legacy-save", "-t", "filter"])
        .unwrap();
    assert!(!save.contains("PALISADE"), "{save}");
}
