//! `palisade-bench-node`: the node dataplane's benchmark, on simulated
//! hosts (network namespaces; run as root, `--features testenv`).
//!
//! Prints: time to program 100, 1k and 10k rules from empty; time to apply
//! a one-rule change with 10k rules present (and how many chains were
//! written); time to load 100k CIDRs through an ipset and to swap in a
//! changed copy; and the per-connection round trip (TCP connect, each a new
//! flow so its SYN walks the chains) with 10k CIDRs matched through an
//! ipset vs 10k linear rules, against no rules at all.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use palisade::api::{FirewallPolicy, FirewallPolicySpec, FirewallRule, Peer, PortRange, Protocol};
use palisade::node::backend::Backend;
use palisade::node::dataplane::{Dataplane, plan};
use palisade::policy::{
    Facts, IpFamily, NodeFacts, NodeRuleset, PrefixListFacts, compile_node, validate,
};
use palisade::testenv::{SimHost, SimNet};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

const PORT: u16 = 8080;
const PREFIX_LIST: &str = "pl-0123456789abcdef0";

fn rule(name: String, peers: Vec<Peer>) -> FirewallRule {
    FirewallRule {
        name,
        protocol: Protocol::Tcp,
        ports: Some(vec![PortRange {
            port: PORT,
            end_port: None,
        }]),
        peers,
        ..Default::default()
    }
}

fn cidr_peer(net: String) -> Peer {
    Peer {
        cidr: Some(net),
        ..Default::default()
    }
}

fn policy(name: &str, rules: Vec<FirewallRule>) -> FirewallPolicy {
    FirewallPolicy::new(
        name,
        FirewallPolicySpec {
            policy_types: vec![palisade::api::PolicyType::Ingress],
            ingress: Some(rules),
            ..Default::default()
        },
    )
}

/// About `n` linear iptables rules: policies of 100 rules of 4 host CIDRs
/// (inline: at most 4 per rule stay out of sets). `salt` changes one CIDR.
fn linear_policies(n: usize, salt: Option<usize>) -> Vec<FirewallPolicy> {
    let rules = n.div_ceil(4);
    let mut policies = Vec::new();
    for p in 0..rules.div_ceil(100) {
        let count = (rules - p * 100).min(100);
        let rs = (0..count)
            .map(|k| {
                let peers = (0..4)
                    .map(|j| {
                        let last = if salt == Some(p * 100 + k) && j == 0 {
                            200
                        } else {
                            j
                        };
                        cidr_peer(format!("10.{p}.{k}.{last}/32"))
                    })
                    .collect();
                rule(format!("r{k}"), peers)
            })
            .collect();
        policies.push(policy(&format!("lin-{p:03}"), rs));
    }
    policies
}

fn set_policy() -> FirewallPolicy {
    policy(
        "set",
        vec![rule(
            "many".into(),
            vec![Peer {
                prefix_list_id: Some(PREFIX_LIST.into()),
                ..Default::default()
            }],
        )],
    )
}

fn host_cidrs(n: usize, extra: Option<IpAddr>) -> Vec<IpNet> {
    let mut v: Vec<IpNet> = (0..n)
        .map(|i| {
            let i = i as u32 + 1;
            IpNet::from(IpAddr::from([11, (i >> 16) as u8, (i >> 8) as u8, i as u8]))
        })
        .collect();
    if let Some(a) = extra {
        v.pop();
        v.push(IpNet::from(a));
    }
    v
}

struct Bench {
    node: SimHost,
    peer: SimHost,
    dataplane: Dataplane,
    facts: Facts,
}

impl Bench {
    fn compile(&self, policies: &[FirewallPolicy]) -> BenchResult<NodeRuleset> {
        let valid = policies
            .iter()
            .map(validate)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(compile_node("node", &valid, &self.facts)?)
    }

    fn with_prefix_list(&mut self, cidrs: Vec<IpNet>) {
        self.facts.prefix_lists.insert(
            PREFIX_LIST.into(),
            PrefixListFacts {
                family: IpFamily::V4,
                max_entries: cidrs.len() as u32,
                cidrs,
            },
        );
    }

    /// Syncs and returns (time, chains written).
    fn sync(&self, rs: &NodeRuleset) -> BenchResult<(Duration, usize)> {
        let start = Instant::now();
        let report = self.dataplane.sync(rs)?;
        Ok((start.elapsed(), report.chains_written))
    }

    fn clean(&self) -> BenchResult<()> {
        self.dataplane.cleanup()?;
        Ok(())
    }

    /// Median and p99 of `n` sequential TCP connects from the peer to the
    /// node (each a new flow).
    fn connect_rtt(&self, n: usize) -> BenchResult<(Duration, Duration)> {
        let target = SocketAddr::new(IpAddr::V4(self.node.ipv4()), PORT);
        let ns = std::fs::File::open(format!("/run/netns/{}", self.peer.netns()))?;
        let mut samples = std::thread::scope(|s| {
            s.spawn(move || -> std::io::Result<Vec<Duration>> {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                // Warm up (neighbour resolution, caches).
                for _ in 0..50 {
                    drop(TcpStream::connect_timeout(&target, Duration::from_secs(2))?);
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let start = Instant::now();
                    let stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
                    v.push(start.elapsed());
                    drop(stream);
                }
                Ok(v)
            })
            .join()
            .map_err(|_| std::io::Error::other("probe thread panicked"))
        })??;
        samples.sort();
        let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
        Ok((at(0.5), at(0.99)))
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn main() -> BenchResult<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let probes: usize = std::env::var("PALISADE_BENCH_PROBES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let net = SimNet::new()?;
    let node = net.add_host("bench-node")?;
    let peer = net.add_host("bench-peer")?;
    let _listener = node.listen_tcp(PORT)?;
    let dataplane = Dataplane::new(Backend::Nft, Some(node.netns().to_string()));
    let facts = Facts {
        nodes: vec![NodeFacts {
            name: "node".into(),
            addresses: node.addresses(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut bench = Bench {
        node,
        peer,
        dataplane,
        facts,
    };
    println!("palisade node dataplane benchmark (iptables-nft, ipset, one network namespace)");
    println!();
    println!("program from empty (read back + diff + one restore per family):");
    for n in [100, 1_000, 10_000] {
        let rs = bench.compile(&linear_policies(n, None))?;
        let (t, chains) = bench.sync(&rs)?;
        println!(
            "  {:>6} policy rules ({} iptables+ip6tables rules, {chains} chains): {}",
            n,
            rs.rule_count(),
            ms(t)
        );
        if n != 10_000 {
            bench.clean()?;
        }
    }
    let rs = bench.compile(&linear_policies(10_000, None))?;
    let (noop, _) = bench.sync(&rs)?;
    println!(
        "  no-op sync with 10k rules present (read back, nothing written): {}",
        ms(noop)
    );
    let changed = bench.compile(&linear_policies(10_000, Some(1234)))?;
    let start = Instant::now();
    let current = bench.dataplane.read()?;
    let read = start.elapsed();
    let start = Instant::now();
    let change = plan(&current, &changed);
    let planned = start.elapsed();
    let start = Instant::now();
    bench.dataplane.apply(&change)?;
    let applied = start.elapsed();
    let chains = change.diff.ipv4.write_chains.len() + change.diff.ipv6.write_chains.len();
    let size: usize = change
        .diff
        .ipv4
        .write_chains
        .iter()
        .map(|c| c.rules.len())
        .sum();
    println!(
        "  1-rule change with 10k rules present: {} = read back {} + diff {} + restore {} ({chains} chain written, {size} rules in it)",
        ms(read + planned + applied),
        ms(read),
        ms(planned),
        ms(applied)
    );
    let start = Instant::now();
    bench.clean()?;
    println!("  cleanup of 10k rules: {}", ms(start.elapsed()));
    println!();

    println!("ipset:");
    bench.with_prefix_list(host_cidrs(100_000, None));
    let rs = bench.compile(&[set_policy()])?;
    let (t, _) = bench.sync(&rs)?;
    println!("  load 100k CIDRs through one set, from empty: {}", ms(t));
    let mut cidrs = host_cidrs(100_000, None);
    cidrs[0] = "12.0.0.0/24".parse()?;
    bench.with_prefix_list(cidrs);
    let rs = bench.compile(&[set_policy()])?;
    let (t, chains) = bench.sync(&rs)?;
    println!(
        "  swap in a copy with one entry changed: {} ({chains} chains written)",
        ms(t)
    );
    bench.clean()?;
    println!();

    println!("per-connection round trip, {probes} sequential TCP connects (median / p99):");
    let (m, p) = bench.connect_rtt(probes)?;
    println!(
        "  no rules:                      {:>7} / {:>7}",
        us(m),
        us(p)
    );
    let peer_addr = IpAddr::V4(bench.peer.ipv4());
    bench.with_prefix_list(host_cidrs(10_000, Some(peer_addr)));
    let rs = bench.compile(&[set_policy()])?;
    bench.sync(&rs)?;
    let (m, p) = bench.connect_rtt(probes)?;
    println!(
        "  10k CIDRs through an ipset:    {:>7} / {:>7}",
        us(m),
        us(p)
    );
    bench.clean()?;
    let mut policies = linear_policies(10_000, None);
    policies.push(policy(
        "zz-peer",
        vec![rule(
            "peer".into(),
            vec![cidr_peer(format!("{peer_addr}/32"))],
        )],
    ));
    let rs = bench.compile(&policies)?;
    bench.sync(&rs)?;
    let (m, p) = bench.connect_rtt(probes)?;
    println!(
        "  10k linear rules (match last): {:>7} / {:>7}",
        us(m),
        us(p)
    );
    bench.clean()?;
    Ok(())
}
