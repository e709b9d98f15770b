//! The security contract of the node layer, with real packets between
//! network namespaces made here (nothing on the test machine changes):
//! Palisade never admits what the host's own firewall drops, Audit changes
//! no verdict, the failsafe opens nothing beyond its scope, ICMP rules
//! match exactly the type written, and `existingConnections: Cut` cuts.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use palisade::api::{FirewallPolicy, PolicyMode};
use palisade::node::conntrack;
use palisade::policy::node::{NodeAction, RuleOrigin};
use palisade::policy::{Direction, NodeFacts, NodeRuleset};
use palisade::testenv::{DataplaneNode, Reach, SimHost, SimNet};

/// How long a probe expected to get through may take: generous, as the
/// suite runs on 2 shared cores; a probe that gets through returns at once.
const OPEN: Duration = Duration::from_secs(10);
const DROP: Duration = Duration::from_millis(500);

fn policy(yaml: &str) -> FirewallPolicy {
    serde_yaml::from_str(yaml).unwrap()
}

fn spec(name: &str, mode: &str, body: &str) -> FirewallPolicy {
    policy(&format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata:\n  name: {name}\nspec:\n  mode: {mode}\n{body}"
    ))
}

/// What one probe is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp(u16),
    Udp(u16),
    /// ICMP echo request (ICMPv6 for IPv6 targets).
    Echo,
}

/// Whether `proto` from `from` reaches `to` (the listeners are up).
fn reaches(host: &SimHost, from: &SimHost, to: IpAddr, proto: Proto, expect_open: bool) -> bool {
    let timeout = if expect_open { OPEN } else { DROP };
    match proto {
        Proto::Tcp(port) => {
            from.probe_tcp(SocketAddr::new(to, port), timeout).unwrap() == Reach::Open
        }
        Proto::Udp(port) => {
            from.probe_udp(SocketAddr::new(to, port), timeout).unwrap() == Reach::Open
        }
        Proto::Echo => {
            let t = if to.is_ipv4() { 8 } else { 128 };
            host.icmp_arrives(from, to, t, 0, timeout).unwrap()
        }
    }
}

/// The host's own firewall: INPUT and OUTPUT policy DROP but for
/// established flows, loopback and TCP 80; in INPUT first a
/// `KUBE-FIREWALL` chain with kube-proxy's localnet drop (CVE-2020-8558:
/// 127.0.0.0/8 from off the node) and a drop of TCP 8443 from anywhere but
/// loopback, ahead of the host's own allow of 8443; plus ICMPv6 (IPv6
/// needs neighbour discovery).
fn host_firewall(host: &SimHost) {
    for tool in ["iptables-nft", "ip6tables-nft"] {
        let run = |rule: &str| {
            let mut a = vec![tool];
            a.extend(rule.split_whitespace());
            host.exec(&a).unwrap();
        };
        run("-N KUBE-FIREWALL");
        if tool == "iptables-nft" {
            run(
                "-A KUBE-FIREWALL -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
            );
        }
        run("-A KUBE-FIREWALL -p tcp --dport 8443 ! -i lo -j DROP");
        run("-A INPUT -j KUBE-FIREWALL");
        for (chain, lo) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            run(&format!(
                "-A {chain} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
            ));
            run(&format!("-A {chain} {lo} lo -j ACCEPT"));
            run(&format!("-A {chain} -p tcp --dport 80 -j ACCEPT"));
            run(&format!("-A {chain} -p tcp --dport 8443 -j ACCEPT"));
            if tool == "ip6tables-nft" {
                run(&format!("-A {chain} -p ipv6-icmp -j ACCEPT"));
            }
            run(&format!("-P {chain} DROP"));
        }
    }
}

/// Allows TCP 80, 443, 8080, 8443, UDP 5353 and ICMP echo from anywhere.
fn wide_open(name: &str, mode: &str) -> FirewallPolicy {
    spec(
        name,
        mode,
        "  policyTypes: [Ingress, Egress]
  ingress:
    - {name: web, protocol: TCP, ports: [{port: 80}, {port: 443}, {port: 8080}, {port: 8443}], peers: [{cidr: 0.0.0.0/0}, {cidr: '::/0'}]}
    - {name: mdns, protocol: UDP, ports: [{port: 5353}], peers: [{cidr: 0.0.0.0/0}, {cidr: '::/0'}]}
    - {name: ping, protocol: ICMP, icmp: {type: 8}, peers: [{cidr: 0.0.0.0/0}]}
    - {name: ping6, protocol: ICMPv6, icmp: {type: 128}, peers: [{cidr: '::/0'}]}
  egress:
    - {name: web, protocol: TCP, ports: [{port: 80}, {port: 443}, {port: 8080}, {port: 8443}], peers: [{cidr: 0.0.0.0/0}, {cidr: '::/0'}]}
    - {name: mdns, protocol: UDP, ports: [{port: 5353}], peers: [{cidr: 0.0.0.0/0}, {cidr: '::/0'}]}
",
    )
}

const PROBES: [Proto; 7] = [
    Proto::Tcp(80),
    Proto::Tcp(8080),
    Proto::Tcp(8443),
    Proto::Tcp(10250),
    Proto::Udp(5353),
    Proto::Udp(4789),
    Proto::Echo,
];

/// Every probe of the matrix, run at once (each has its own socket and
/// nonce): (direction, family, peer, protocol) → open.
fn matrix(node: &DataplaneNode, peers: &[&SimHost]) -> Vec<(String, bool)> {
    let mut cases = Vec::new();
    for peer in peers {
        for (to_node, to_peer) in [
            (IpAddr::V4(node.host.ipv4()), IpAddr::V4(peer.ipv4())),
            (IpAddr::V6(node.host.ipv6()), IpAddr::V6(peer.ipv6())),
        ] {
            for proto in PROBES {
                cases.push((
                    format!("in {proto:?} {} -> {to_node}", peer.name()),
                    &node.host,
                    *peer,
                    to_node,
                    proto,
                ));
                if proto != Proto::Echo {
                    cases.push((
                        format!("out {proto:?} -> {to_peer}"),
                        *peer,
                        &node.host,
                        to_peer,
                        proto,
                    ));
                }
            }
        }
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .into_iter()
            .map(|(label, host, from, to, proto)| {
                s.spawn(move || (label, reaches(host, from, to, proto, false)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn listen_everywhere(hosts: &[&SimHost]) -> Vec<palisade::testenv::EchoListener> {
    let mut l = Vec::new();
    for h in hosts {
        for proto in PROBES {
            match proto {
                Proto::Tcp(p) => l.push(h.listen_tcp(p).unwrap()),
                Proto::Udp(p) => l.push(h.listen_udp(p).unwrap()),
                Proto::Echo => {}
            }
        }
    }
    l
}

#[test]
fn palisade_never_admits_what_the_host_drops_and_audit_changes_no_verdict() {
    let net = SimNet::new().unwrap();
    let mut node = DataplaneNode::new(&net, "node", None).unwrap();
    let member = net.add_host("member").unwrap();
    let outsider = net.add_host("outsider").unwrap();
    // The member is another node of the cluster: inside the failsafe's scope.
    std::sync::Arc::make_mut(&mut node.facts.nodes).push(NodeFacts {
        name: "member".into(),
        addresses: member.addresses(),
        ..Default::default()
    });
    let _listeners = listen_everywhere(&[&node.host, &member, &outsider]);
    host_firewall(&node.host);
    // The node routes 127.0.0.0/8 from the wire (route_localnet, as kubelets
    // once set it for NodePorts on localhost); the member sends to the
    // node's 127.0.0.2 through it.
    node.host
        .exec(&["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"])
        .unwrap();
    member
        .route_localnet_via(
            "127.0.0.2/32".parse().unwrap(),
            IpAddr::V4(node.host.ipv4()),
        )
        .unwrap();
    let localnet = SocketAddr::new("127.0.0.2".parse().unwrap(), 5353);
    let reaches_localnet = || node.host.udp_arrives(&member, localnet, DROP).unwrap();
    let peers = [&member, &outsider];

    let mut host_only = matrix(&node, &peers);
    host_only.push(("localnet udp 5353 -> 127.0.0.2".into(), reaches_localnet()));
    let mut sent = host_only.len();
    let mut mismatches = Vec::new();
    let mut check = |label: &str, got: &[(String, bool)], same: bool| {
        for ((probe, host), (_, with)) in host_only.iter().zip(got) {
            // Never more than the host allows; Audit alone: exactly it.
            if (*with && !host) || (same && with != host) {
                mismatches.push(format!(
                    "{label}: {probe}: host {host}, with Palisade {with}"
                ));
            }
        }
    };
    for (label, policies, same) in [
        ("enforce", vec![wide_open("wide", "Enforce")], false),
        ("audit", vec![wide_open("wide", "Audit")], true),
        (
            "audit+enforce",
            vec![wide_open("a", "Audit"), wide_open("e", "Enforce")],
            false,
        ),
    ] {
        node.apply(&policies).unwrap();
        let mut got = matrix(&node, &peers);
        got.push(("localnet udp 5353 -> 127.0.0.2".into(), reaches_localnet()));
        sent += got.len();
        check(label, &got, same);
        node.apply(&[]).unwrap();
    }
    println!("probes sent: {sent}, mismatches: {}", mismatches.len());
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    // The host's rules decided: 80 in passes, 8443 (its KUBE-FIREWALL) does
    // not, whatever the policy allowed.
    node.apply(&[wide_open("wide", "Enforce")]).unwrap();
    let to = |p| SocketAddr::new(IpAddr::V4(node.host.ipv4()), p);
    assert_eq!(member.probe_tcp(to(80), OPEN).unwrap(), Reach::Open);
    assert_eq!(member.probe_tcp(to(8443), DROP).unwrap(), Reach::TimedOut);
}

#[test]
fn audit_with_enforce_gives_enforce_verdicts_and_counts_would_be_drops() {
    let net = SimNet::new().unwrap();
    let node = DataplaneNode::new(&net, "node", None).unwrap();
    let peer = net.add_host("peer").unwrap();
    let _l = [8080, 9090, 7070].map(|p| node.host.listen_tcp(p).unwrap());
    let enforce = spec(
        "enforced",
        "Enforce",
        "  policyTypes: [Ingress]\n  ingress:\n    - {name: web, protocol: TCP, ports: [{port: 8080}], peers: [{cidr: 0.0.0.0/0}]}\n",
    );
    let audit = spec(
        "trial",
        "Audit",
        "  policyTypes: [Ingress]\n  ingress:\n    - {name: api, protocol: TCP, ports: [{port: 9090}], peers: [{cidr: 0.0.0.0/0}]}\n",
    );
    let both = node.apply(&[enforce.clone(), audit]).unwrap();
    let alone = node.compile(&[enforce]).unwrap();
    let to = |p| SocketAddr::new(IpAddr::V4(node.host.ipv4()), p);
    for (port, open) in [(8080, true), (9090, false), (7070, false)] {
        let verdict = palisade::policy::eval::node_verdict(
            &alone,
            &palisade::policy::eval::Probe {
                direction: Direction::Ingress,
                peer: IpAddr::V4(peer.ipv4()),
                protocol: palisade::policy::eval::ProbeProtocol::Tcp { port },
                over_rate: false,
            },
        );
        let reach = peer
            .probe_tcp(to(port), if open { OPEN } else { DROP })
            .unwrap();
        assert_eq!(reach.is_open(), open, "port {port}");
        assert_eq!(
            verdict == palisade::policy::eval::NodeVerdict::Accept,
            open,
            "Enforce alone agrees on {port}"
        );
    }
    // 9090 is allowed by the Audit policy: not its would-be drop. 7070 is.
    for _ in 0..3 {
        peer.probe_tcp(to(7070), DROP).unwrap();
    }
    let counters = node.dataplane.read_counters().unwrap();
    let would_drop: u64 = audit_rules(&both)
        .iter()
        .map(|id| counters.get(id).copied().unwrap_or(0))
        .sum();
    // SYN retries of the dropped connects count too: at least one per probe.
    assert!(would_drop >= 4, "would-be drops counted: {would_drop}");
}

fn audit_rules(rs: &NodeRuleset) -> Vec<String> {
    rs.ipv4
        .chains
        .iter()
        .chain(&rs.ipv6.chains)
        .flat_map(|c| &c.rules)
        .filter(|r| {
            matches!(r.origin, RuleOrigin::WouldDrop { .. }) && r.action == NodeAction::Count
        })
        .map(|r| r.id.clone())
        .collect()
}

#[test]
fn icmp_rules_match_exactly_the_type_written() {
    let net = SimNet::new().unwrap();
    let node = DataplaneNode::new(&net, "node", None).unwrap();
    let peer = net.add_host("peer").unwrap();
    let v4 = IpAddr::V4(node.host.ipv4());
    let v6 = IpAddr::V6(node.host.ipv6());
    // The types conntrack lets start a flow (a request); every other type
    // is INVALID to conntrack unless it is a reply or an error about a
    // tracked flow, and the INVALID drop precedes every policy allow.
    for (protocol, to, pairs) in [
        ("ICMP", v4, vec![(8u8, 13u8), (13, 8), (15, 17), (17, 15)]),
        ("ICMPv6", v6, vec![(128u8, 139u8), (139, 128)]),
    ] {
        for (t, other) in pairs {
            let cidr = if to.is_ipv4() { "0.0.0.0/0" } else { "'::/0'" };
            node.apply(&[spec(
                "icmp",
                "Enforce",
                &format!(
                    "  policyTypes: [Ingress]\n  ingress:\n    - {{name: t, protocol: {protocol}, icmp: {{type: {t}}}, peers: [{{cidr: {cidr}}}]}}\n"
                ),
            )])
            .unwrap();
            assert!(
                node.host.icmp_arrives(&peer, to, t, 0, OPEN).unwrap(),
                "{protocol} type {t} allowed"
            );
            assert!(
                !node.host.icmp_arrives(&peer, to, other, 0, DROP).unwrap(),
                "{protocol} type {other} dropped by a rule for type {t}"
            );
        }
    }
}

/// A connection from `peer` to the node's echo server on 8080, checked
/// with one round trip.
fn round_trip(stream: &mut std::net::TcpStream, timeout: Duration) -> bool {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let msg = b"still there?\n";
    if stream.write_all(msg).is_err() {
        return false;
    }
    let mut buf = [0u8; 13];
    stream.read_exact(&mut buf).is_ok() && &buf == msg
}

#[test]
fn narrowing_cuts_established_flows_only_when_asked() {
    for cut in [false, true] {
        let net = SimNet::new().unwrap();
        let node = DataplaneNode::new(&net, "node", None).unwrap();
        let peer = net.add_host("peer").unwrap();
        let _l = node.host.listen_tcp(8080).unwrap();
        let mode = if cut { "Cut" } else { "Keep" };
        let open = spec(
            "web",
            "Enforce",
            &format!(
                "  existingConnections: {mode}\n  policyTypes: [Ingress]\n  ingress:\n    - {{name: web, protocol: TCP, ports: [{{port: 8080}}], peers: [{{cidr: 0.0.0.0/0}}]}}\n"
            ),
        );
        node.apply(&[open]).unwrap();
        let to = SocketAddr::new(IpAddr::V4(node.host.ipv4()), 8080);
        let mut stream = peer.connect_tcp(to, OPEN).unwrap();
        assert!(round_trip(&mut stream, OPEN));
        let narrow = spec(
            "web",
            "Enforce",
            &format!("  existingConnections: {mode}\n  policyTypes: [Ingress]\n"),
        );
        let rs = node.apply(&[narrow]).unwrap();
        let directions = rs
            .policies
            .iter()
            .flat_map(|p| p.cut_established.clone())
            .collect::<Vec<_>>();
        let n = conntrack::cut_flows(&node.dataplane, &rs, &node.host.addresses(), &directions)
            .unwrap();
        assert_eq!(n, usize::from(cut), "flows cut with {mode}");
        // New connections are refused either way; the open one lives on only with Keep.
        assert_ne!(peer.probe_tcp(to, DROP).unwrap(), Reach::Open);
        // A round trip expected to succeed gets the generous timeout; one
        // expected to fail must time out.
        let timeout = if cut { Duration::from_secs(1) } else { OPEN };
        assert_eq!(round_trip(&mut stream, timeout), !cut, "{mode}");
        let _ = PolicyMode::Enforce;
    }
}

/// A node under deny-all both ways (only the failsafe left), and a host in
/// each failsafe scope: another node of the cluster, the API server, the
/// nameserver; plus one outside every scope.
struct Scoped {
    node: DataplaneNode,
    member: SimHost,
    apiserver: SimHost,
    dns: SimHost,
    outsider: SimHost,
}

fn scoped(net: &SimNet, admin: Option<&SimHost>) -> Scoped {
    let mut node = DataplaneNode::new(net, "node", admin).unwrap();
    let member = net.add_host("member").unwrap();
    let apiserver = net.add_host("apiserver").unwrap();
    let dns = net.add_host("dns").unwrap();
    let outsider = net.add_host("outsider").unwrap();
    std::sync::Arc::make_mut(&mut node.facts.nodes).push(NodeFacts {
        name: "member".into(),
        addresses: member.addresses(),
        ..Default::default()
    });
    node.facts.api_servers = vec![IpAddr::V4(apiserver.ipv4())];
    node.facts.nameservers = vec![IpAddr::V4(dns.ipv4())];
    node.apply(&[spec(
        "lockdown",
        "Enforce",
        "  policyTypes: [Ingress, Egress]\n",
    )])
    .unwrap();
    Scoped {
        node,
        member,
        apiserver,
        dns,
        outsider,
    }
}

/// Whether `port` (TCP or UDP) on `to` answers `from`.
fn answers(from: &SimHost, to: IpAddr, tcp: bool, port: u16, expect_open: bool) -> bool {
    let t = if expect_open { OPEN } else { DROP };
    let to = SocketAddr::new(to, port);
    let r = if tcp {
        from.probe_tcp(to, t).unwrap()
    } else {
        from.probe_udp(to, t).unwrap()
    };
    r.is_open()
}

#[test]
fn the_failsafe_admits_its_scope_and_nobody_else() {
    let net = SimNet::new().unwrap();
    let w = scoped(&net, None);
    let node = &w.node.host;
    let _l = (
        [10250, 9901].map(|p| node.listen_tcp(p).unwrap()),
        node.listen_udp(4789).unwrap(),
        [&w.member, &w.apiserver, &w.outsider].map(|h| h.listen_tcp(443).unwrap()),
        [&w.member, &w.outsider].map(|h| h.listen_tcp(10250).unwrap()),
        [&w.dns, &w.outsider].map(|h| h.listen_udp(53).unwrap()),
    );
    let v4 = |h: &SimHost| IpAddr::V4(h.ipv4());
    // (what, from, to, tcp, port, open)
    let cases: [(&str, &SimHost, &SimHost, bool, u16, bool); 13] = [
        ("kubelet from a node", &w.member, node, true, 10250, true),
        (
            "kubelet from outside",
            &w.outsider,
            node,
            true,
            10250,
            false,
        ),
        (
            "agent metrics from a node",
            &w.member,
            node,
            true,
            9901,
            true,
        ),
        (
            "agent metrics from outside",
            &w.outsider,
            node,
            true,
            9901,
            false,
        ),
        ("vxlan from a node", &w.member, node, false, 4789, true),
        ("vxlan from outside", &w.outsider, node, false, 4789, false),
        ("443 to the API server", node, &w.apiserver, true, 443, true),
        ("443 to another node", node, &w.member, true, 443, false),
        ("443 to anywhere else", node, &w.outsider, true, 443, false),
        (
            "kubelet of another node",
            node,
            &w.member,
            true,
            10250,
            true,
        ),
        ("10250 anywhere else", node, &w.outsider, true, 10250, false),
        ("DNS to the nameserver", node, &w.dns, false, 53, true),
        ("DNS anywhere else", node, &w.outsider, false, 53, false),
    ];
    let wrong: Vec<String> = cases
        .iter()
        .filter_map(|&(what, from, to, tcp, port, want)| {
            let got = answers(from, v4(to), tcp, port, want);
            (got != want).then(|| format!("{what}: got {got}, want {want}"))
        })
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn every_default_failsafe_entry_admits_its_scope_and_nobody_else() {
    use palisade::api::Protocol;
    use palisade::policy::{Failsafe, FailsafeScope};
    let net = SimNet::new().unwrap();
    let admin = net.add_host("admin").unwrap();
    let w = scoped(&net, Some(&admin));
    let (node, member, apiserver, dns, outsider) =
        (&w.node, &w.member, &w.apiserver, &w.dns, &w.outsider);
    // EC2's link-local services, stood up on a host of the test's own net.
    let ec2 = net.add_host("ec2").unwrap();
    for a in [
        "169.254.169.254/32",
        "169.254.169.253/32",
        "169.254.169.123/32",
    ] {
        ec2.add_address(a.parse().unwrap()).unwrap();
    }
    let fs = Failsafe::default();
    let mut listeners = std::collections::BTreeMap::new();
    let mut listen = |host: &SimHost, tcp: bool, port: u16| {
        listeners
            .entry((host.name().to_string(), tcp, port))
            .or_insert_with(|| {
                if tcp {
                    host.listen_tcp(port).unwrap()
                } else {
                    host.listen_udp(port).unwrap()
                }
            });
    };
    let mut wrong = Vec::new();
    let mut probes = 0;
    let node_v4 = IpAddr::V4(node.host.ipv4());
    // Inbound: from the scope (a node of the cluster, or the admin host for
    // SSH) and never from outside.
    let mut inbound: Vec<(String, bool, u16, &SimHost)> = fs
        .inbound
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                e.protocol == Protocol::Tcp,
                e.ports.port,
                member,
            )
        })
        .collect();
    inbound.push(("ssh".into(), true, fs.ssh_port, &admin));
    for (name, tcp, port, from) in inbound {
        listen(&node.host, tcp, port);
        for (who, host, want) in [("scope", from, true), ("outside", outsider, false)] {
            probes += 1;
            if answers(host, node_v4, tcp, port, want) != want {
                wrong.push(format!("in {name} {port} from {who}: want {want}"));
            }
        }
    }
    // Outbound: to the scope's address, and to nobody else on that port.
    for e in &fs.outbound {
        let tcp = e.protocol == Protocol::Tcp;
        let port = e.ports.port;
        let target: (&SimHost, IpAddr) = match e.scopes().first() {
            Some(FailsafeScope::Cluster) => (member, IpAddr::V4(member.ipv4())),
            Some(FailsafeScope::ApiServer) => (apiserver, IpAddr::V4(apiserver.ipv4())),
            Some(FailsafeScope::Nameservers) => (dns, IpAddr::V4(dns.ipv4())),
            None => (
                &ec2,
                e.cidrs.iter().find(|c| c.addr().is_ipv4()).unwrap().addr(),
            ),
        };
        listen(target.0, tcp, port);
        listen(outsider, tcp, port);
        for (who, to, want) in [
            ("scope", target.1, true),
            ("outside", IpAddr::V4(outsider.ipv4()), false),
        ] {
            probes += 1;
            if answers(&node.host, to, tcp, port, want) != want {
                wrong.push(format!(
                    "out {} {port} to {who} ({to}): want {want}",
                    e.name
                ));
            }
        }
    }
    println!("failsafe entries: {probes} probes, {} wrong", wrong.len());
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
