//! The zero-gap check: seeded random policy edits (rules, sets, both
//! families) programmed through the real dataplane while a peer probes the
//! node without pause over IPv4 and IPv6. Every version allows the peer's
//! flows, each time by other means (an inline rule, a rule's own set, a
//! prefix list's set) among other rules and policies that come and go; so a
//! probe that is not answered is a flow allowed before and after an edit
//! that was dropped while it was written. Used by `tests/node_packets.rs`
//! (a size CI affords) and `palisade-bench-node` (1,000 edits).
//!
//! Probes are single-shot: a TCP connect given less time than the first
//! SYN retransmission (1 s), so a SYN dropped in a gap is not hidden by
//! the retry.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::net::{Reach, SimNet};
use super::{DataplaneNode, Error, Result};
use crate::api::FirewallPolicy;
use crate::node::backend::Backend;
use crate::node::dataplane::Dataplane;
use crate::policy::{
    Facts, IpFamily, NodeAction, NodeRuleset, PrefixListFacts, compile_node, validate,
};

/// A probe that was not answered: its family, what came back, and when
/// (ms since the edits started).
pub type LostProbe = (IpFamily, Reach, u128);

/// What one run saw.
#[derive(Debug, Clone, Default)]
pub struct ZeroGapReport {
    /// Edits programmed (each one sync that wrote).
    pub edits: usize,
    /// Probes sent while editing.
    pub probes: usize,
    /// Probes not answered.
    pub lost: Vec<LostProbe>,
    /// How long each edit's sync took.
    pub edit_times: Vec<Duration>,
    /// Syncs that read everything back (the first one only, when the model
    /// held throughout).
    pub full_reads: usize,
    /// Full reads made to check the model (every 25 edits and at the end)
    /// that found something to write: the model was wrong.
    pub model_mismatches: usize,
    /// Edits checked by their `nft monitor` echo rather than by listing
    /// the chains they edited (nft: the monitor is followed throughout).
    pub echo_checks: usize,
    /// Whether a port no version allows stayed closed at the end (and its
    /// dropped probe was counted by a DROP rule).
    pub enforced: bool,
    /// Packets Palisade's DROP rules (the default-drop and the INVALID
    /// drop, whose chains no edit rewrites) counted while the edits ran,
    /// read from the kernel's counters before the closed-port probe. The
    /// peer sends nothing but probes of allowed flows then, so this is the
    /// exact count of allowed packets dropped in a gap; a lost probe with
    /// none counted was lost to the machine's load (a connect not answered
    /// within its single-shot timeout), not to Palisade.
    pub gap_drops: u64,
}

const PORT: u16 = 8080;
const CLOSED_PORT: u16 = 7070;
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
const PL4: &str = "pl-00000000000000004";
const PL6: &str = "pl-00000000000000006";

/// How one version lets the peer in, per family.
#[derive(Debug, Clone, Copy)]
enum Via {
    Inline,
    RuleSet,
    PrefixList,
}

fn random_net(rng: &mut fastrand::Rng, family: IpFamily) -> IpNet {
    match family {
        IpFamily::V4 => IpNet::from(IpAddr::from([10, rng.u8(0..200), rng.u8(..), rng.u8(..)])),
        IpFamily::V6 => {
            let a: u128 = 0x2001_0db8_7000_u128 << 80 | u128::from(rng.u32(..));
            IpNet::from(IpAddr::from(a.to_be_bytes()))
        }
    }
}

/// One random version: policies and the prefix lists' contents.
fn version(rng: &mut fastrand::Rng, peer: [IpAddr; 2]) -> Result<(Vec<FirewallPolicy>, Facts)> {
    let mut facts = Facts::default();
    let mut rules = String::new();
    let mut peer_rule = |name: &str, cidrs: Vec<IpNet>| {
        let list: String = cidrs.iter().map(|c| format!("{{cidr: '{c}'}}, ")).collect();
        rules.push_str(&format!(
            "    - name: {name}\n      protocol: TCP\n      ports: [{{port: {PORT}}}]\n      peers: [{list}]\n"
        ));
    };
    for (family, addr, pl) in [(IpFamily::V4, peer[0], PL4), (IpFamily::V6, peer[1], PL6)] {
        let via = [Via::Inline, Via::RuleSet, Via::PrefixList][rng.usize(..3)];
        let others = |rng: &mut fastrand::Rng, range: std::ops::Range<usize>| -> Vec<IpNet> {
            let n = rng.usize(range);
            (0..n).map(|_| random_net(rng, family)).collect()
        };
        let mut list = match via {
            Via::Inline => others(rng, 0..3),
            Via::RuleSet => others(rng, 5..12),
            Via::PrefixList => Vec::new(),
        };
        if !matches!(via, Via::PrefixList) {
            list.push(IpNet::from(addr));
            peer_rule(&format!("peer-{}", rng.u16(..)), list);
        }
        let mut cidrs = others(rng, 1..40);
        if matches!(via, Via::PrefixList) {
            cidrs.push(IpNet::from(addr));
        }
        facts.prefix_lists.insert(
            pl.into(),
            PrefixListFacts {
                family,
                max_entries: 64,
                cidrs,
            },
        );
    }
    rules.push_str(&format!(
        "    - name: lists\n      protocol: TCP\n      ports: [{{port: {PORT}}}]\n      peers: [{{prefixListId: {PL4}}}, {{prefixListId: {PL6}}}]\n"
    ));
    for k in 0..rng.usize(0..12) {
        let family = if rng.bool() {
            IpFamily::V4
        } else {
            IpFamily::V6
        };
        let net = random_net(rng, family);
        rules.push_str(&format!(
            "    - name: extra-{k}\n      protocol: TCP\n      ports: [{{port: {}}}]\n      peers: [{{cidr: '{net}'}}]\n",
            9000 + rng.u16(0..100)
        ));
    }
    let mut policies = vec![ingress("app", &rules)?];
    // Policies that come and go, named to sort before and after `app`, so
    // the chain the failsafe goes to and the links between chains change.
    for name in ["aa-noise", "zz-noise"] {
        if rng.bool() {
            let port = 9100 + rng.u16(0..100);
            policies.push(ingress(
                name,
                &format!(
                    "    - name: n\n      protocol: UDP\n      ports: [{{port: {port}}}]\n      peers: [{{cidr: 192.0.2.0/24}}, {{cidr: '2001:db8:99::/64'}}]\n"
                ),
            )?);
        }
    }
    Ok((policies, facts))
}

fn ingress(name: &str, rules: &str) -> Result<FirewallPolicy> {
    let yaml = format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata:\n  name: {name}\nspec:\n  policyTypes: [Ingress]\n  ingress:\n{rules}"
    );
    serde_yaml::from_str(&yaml)
        .map_err(|e| Error::Invalid(format!("zero-gap policy {name}: {e}\n{yaml}")))
}

fn dataplane_error(e: crate::node::dataplane::DataplaneError) -> Error {
    Error::Invalid(format!("dataplane: {e}"))
}

fn compile(
    node: &DataplaneNode,
    policies: &[FirewallPolicy],
    lists: &Facts,
) -> Result<NodeRuleset> {
    let mut facts = node.facts.clone();
    facts.prefix_lists = lists.prefix_lists.clone();
    let valid = policies
        .iter()
        .map(validate)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid(e.to_string()))?;
    compile_node("node", &valid, &facts).map_err(|e| Error::Invalid(e.to_string()))
}

/// Runs `edits` seeded random edits on the `backend` while probing; see
/// the module docs.
pub fn zero_gap(edits: usize, seed: u64, backend: Backend) -> Result<ZeroGapReport> {
    let net = SimNet::new()?;
    let mut node = DataplaneNode::new(&net, "zg-node", None)?;
    // An echo late on a loaded machine is waited for: the run checks the
    // writes the echo checks (every 25 edits, a full read).
    node.dataplane = Dataplane::new(backend, Some(node.host.netns().to_string()))
        .with_echo_wait(Duration::from_secs(5));
    let peer = net.add_host("zg-peer")?;
    let _svc = node.host.listen_tcp(PORT)?;
    let _closed = node.host.listen_tcp(CLOSED_PORT)?;
    let peer_addrs = [IpAddr::V4(peer.ipv4()), IpAddr::V6(peer.ipv6())];
    let targets = [
        (
            IpFamily::V4,
            SocketAddr::new(IpAddr::V4(node.host.ipv4()), PORT),
        ),
        (
            IpFamily::V6,
            SocketAddr::new(IpAddr::V6(node.host.ipv6()), PORT),
        ),
    ];
    let mut rng = fastrand::Rng::with_seed(seed);
    let (policies, lists) = version(&mut rng, peer_addrs)?;
    let mut last = compile(&node, &policies, &lists)?;
    // On nft the monitor is followed as the agent follows it: writes are
    // checked by their echo once it is live and a full read came after.
    let monitor = match backend {
        Backend::Nft => Some(super::FollowedMonitor::start(
            &node.dataplane,
            Some(node.host.netns()),
        )?),
        Backend::Legacy => None,
    };
    let first = node.dataplane.sync(&last).map_err(dataplane_error)?;
    if let Some(m) = &monitor
        && !m.wait_live(Duration::from_secs(10))
    {
        return Err(Error::Invalid("nft monitor reported nothing".into()));
    }
    node.dataplane.verify(&last).map_err(dataplane_error)?;
    let mut report = ZeroGapReport {
        full_reads: usize::from(first.full_read),
        ..Default::default()
    };
    // Neighbour resolution and the listener, before the clock starts.
    for (_, to) in targets {
        peer.probe_tcp(to, Duration::from_secs(3))?;
    }
    let stop = AtomicBool::new(false);
    let seen: Mutex<(usize, Vec<LostProbe>)> = Mutex::default();
    let start = Instant::now();
    let outcome = std::thread::scope(|s| -> Result<()> {
        let prober = s.spawn(|| -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                for (family, to) in targets {
                    let reach = peer.probe_tcp(to, PROBE_TIMEOUT)?;
                    let mut seen = seen.lock().map_err(|_| Error::Invalid("poisoned".into()))?;
                    seen.0 += 1;
                    if reach != Reach::Open {
                        seen.1.push((family, reach, start.elapsed().as_millis()));
                    }
                }
            }
            Ok(())
        });
        let result = (|| -> Result<()> {
            for n in 0..edits {
                let (policies, lists) = version(&mut rng, peer_addrs)?;
                let rs = compile(&node, &policies, &lists)?;
                let t = Instant::now();
                let sync = node.dataplane.sync(&rs).map_err(dataplane_error)?;
                if sync.wrote() {
                    report.edits += 1;
                    report.edit_times.push(t.elapsed());
                }
                report.full_reads += usize::from(sync.full_read);
                report.echo_checks += usize::from(sync.checked_by_echo);
                let check = (n + 1) % 25 == 0 || n + 1 == edits;
                if check && node.dataplane.verify(&rs).map_err(dataplane_error)?.wrote() {
                    report.model_mismatches += 1;
                }
                last = rs;
                std::thread::sleep(Duration::from_millis(rng.u64(1..8)));
            }
            Ok(())
        })();
        // Let the probes overlap the last edit.
        std::thread::sleep(PROBE_TIMEOUT);
        stop.store(true, Ordering::Relaxed);
        let probed = prober
            .join()
            .map_err(|_| Error::Invalid("prober panicked".into()))?;
        result.and(probed)
    });
    outcome?;
    let (probes, lost) = seen
        .into_inner()
        .map_err(|_| Error::Invalid("poisoned".into()))?;
    report.probes = probes;
    report.lost = lost;
    let drops = || -> Result<u64> {
        let counters = node.dataplane.read_counters().map_err(dataplane_error)?;
        Ok([&last.ipv4, &last.ipv6]
            .iter()
            .flat_map(|f| f.chains.iter().flat_map(|c| c.rules.iter()))
            .filter(|r| r.action == NodeAction::Drop)
            .filter_map(|r| counters.get(&r.id))
            .sum())
    };
    report.gap_drops = drops()?;
    // The closed port stays closed, and its probe is counted: the
    // counters `gap_drops` reads do see drops.
    report.enforced = peer.probe_tcp(
        SocketAddr::new(IpAddr::V4(node.host.ipv4()), CLOSED_PORT),
        Duration::from_millis(300),
    )? == Reach::TimedOut
        && drops()? > report.gap_drops;
    Ok(report)
}
