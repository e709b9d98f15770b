//! `palisade-bench-node`: the node dataplane's benchmark, on simulated
//! hosts (network namespaces; run as root, `--features testenv`, built in
//! release by `make bench-node`).
//!
//! For the nft and the legacy backend, each figure is printed beside a
//! raw-tool baseline measured in the same run on the same text: the exact
//! `ipset restore` / `iptables-restore --noflush` / `ip6tables-restore
//! --noflush` input the dataplane wrote, fed to the same tools directly.
//! Both sides run as an agent does on its node: the measuring thread
//! enters the simulated node's network namespace once, and every tool,
//! ours and raw, is spawned straight from it (no `ip netns exec` per call,
//! which costs a few milliseconds of its own). Figures: a 1-rule change
//! with 10k rules present (until the kernel holds it, and with the check
//! of the chain edited after it), a 1-entry change in a 100k-entry set,
//! programming 10k rules from empty, a no-op sync (time and processes
//! spawned; the raw baseline is the read-back a sync without a model
//! needs), drift repair (p50), the process's RSS holding 10k rules, then
//! the zero-gap check at full size and the per-connection round trip with
//! 10k CIDRs in a set vs 10k linear rules.
//!
//! Last, one table: every figure the issue sets a target for, ours beside
//! raw with the ratio, for both backends side by side. The agent's RSS is
//! measured in a child process that does what the agent's dataplane does
//! (compile the 10k-rule ruleset, program it, hold it and the model); its
//! raw baseline is the peak RSS of the restore tools that programmed it.
//!
//! Environment: `PALISADE_BENCH_REPEAT` (samples per median, default 15),
//! `PALISADE_BENCH_PROBES` (connects per RTT figure, default 2000),
//! `PALISADE_ZERO_GAP_EDITS` (default 1000), `PALISADE_ZERO_GAP_SEED`.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use palisade::api::{FirewallPolicy, FirewallPolicySpec, FirewallRule, Peer, PortRange, Protocol};
use palisade::node::backend::{Backend, Family};
use palisade::node::dataplane::{Dataplane, Plan};
use palisade::node::render::ApplyScripts;
use palisade::policy::{
    Facts, IpFamily, NodeFacts, NodeRuleset, PrefixListFacts, compile_node, validate,
};
use palisade::testenv::zero_gap::zero_gap;
use palisade::testenv::{FollowedMonitor, SimHost, SimNet};

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Runs `f` on a thread that has entered network namespace `netns`: every
/// process it spawns starts there, as the agent's do on its node.
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> BenchResult<T> + Send) -> BenchResult<T> {
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            f()
        })
        .join()
        .map_err(|_| -> Box<dyn std::error::Error + Send + Sync> {
            "measuring thread panicked".into()
        })?
    })
}

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

/// Ports of each linear rule: with 4 inline CIDRs, 12 iptables rules per
/// policy rule, so 10k iptables rules are 9 policies of at most 100 rules
/// (nf_tables refuses a path of more than 15 chains through jumps and
/// gotos, and Enforce policies' chains are linked by gotos).
const LINEAR_PORTS: [u16; 3] = [PORT, PORT + 1, PORT + 2];

/// About `n` linear iptables rules: policies of 100 rules, each of 3 ports
/// and 4 host CIDRs (inline: at most 4 per rule stay out of sets).
/// `salted` adds one rule of one port and one CIDR to the last policy: one
/// iptables rule more, inserted among the others (sorted by content).
fn linear_policies(n: usize, salted: bool) -> Vec<FirewallPolicy> {
    let per_rule = 4 * LINEAR_PORTS.len();
    let rules = n.div_ceil(per_rule);
    let mut policies = Vec::new();
    for p in 0..rules.div_ceil(100) {
        let count = (rules - p * 100).min(100);
        let mut rs: Vec<FirewallRule> = (0..count)
            .map(|k| {
                let peers = (0..4)
                    .map(|j| cidr_peer(format!("10.{p}.{k}.{j}/32")))
                    .collect();
                let mut r = rule(format!("r{k}"), peers);
                r.ports = Some(
                    LINEAR_PORTS
                        .iter()
                        .map(|&port| PortRange {
                            port,
                            end_port: None,
                        })
                        .collect(),
                );
                r
            })
            .collect();
        if salted && count < 100 {
            let mut extra = rule(
                "salt".into(),
                vec![cidr_peer(format!("10.{p}.{}.9/32", count / 2))],
            );
            extra.ports = Some(vec![PortRange {
                port: PORT,
                end_port: None,
            }]);
            rs.push(extra);
        }
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

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// A figure of the final table.
#[derive(Clone, Copy)]
enum Val {
    Time(Duration),
    Count(f64),
    MiB(f64),
    /// Does not apply to this backend.
    None,
}

impl Val {
    fn number(self) -> f64 {
        match self {
            Val::Time(d) => d.as_secs_f64() * 1e3,
            Val::Count(n) | Val::MiB(n) => n,
            Val::None => 0.0,
        }
    }

    fn text(self) -> String {
        match self {
            Val::Time(d) => ms(d),
            Val::Count(n) => format!("{n:.0}"),
            Val::MiB(m) => format!("{m:.1} MiB"),
            Val::None => "-".to_string(),
        }
    }
}

/// One row of the final table: a figure of one backend and its baseline.
struct Figure {
    what: &'static str,
    target: &'static str,
    ours: Val,
    raw: Val,
}

fn ratio(ours: f64, raw: f64) -> String {
    if raw == 0.0 {
        "-".to_string()
    } else {
        format!("{:.2}×", ours / raw)
    }
}

/// The table of the issue: each figure, ours / raw / ratio per backend.
fn print_table(results: &[(Backend, Vec<Figure>)]) {
    println!();
    println!(
        "summary (ours / raw / ratio; the machine is shared: absolute times are noisy, ratios measured in one run are what count)"
    );
    let mut head = format!("  {:<36} {:<24}", "figure", "target");
    for (b, _) in results {
        head.push_str(&format!(
            " | {:>10} {:>10} {:>7}",
            format!("{b} ours"),
            "raw",
            "ratio"
        ));
    }
    println!("{head}");
    let Some((_, first)) = results.first() else {
        return;
    };
    for (i, f) in first.iter().enumerate() {
        let mut line = format!("  {:<36} {:<24}", f.what, f.target);
        for (_, figs) in results {
            if let Some(g) = figs.get(i) {
                line.push_str(&format!(
                    " | {:>10} {:>10} {:>7}",
                    g.ours.text(),
                    g.raw.text(),
                    ratio(g.ours.number(), g.raw.number())
                ));
            }
        }
        println!("{line}");
    }
}

/// The child process measuring what the agent's dataplane holds at 10k
/// rules: `palisade-bench-node --rss <netns> <nft|legacy>`. Prints
/// `rss <KiB> hwm <KiB> tools <KiB>` (tools: the peak RSS of the processes
/// it ran, the restore tools among them) and cleans up after itself.
fn rss_child(netns: &str, backend: &str) -> BenchResult<()> {
    let backend = match backend {
        "legacy" => Backend::Legacy,
        _ => Backend::Nft,
    };
    let facts = Facts {
        nodes: vec![NodeFacts {
            name: "node".into(),
            ..Default::default()
        }]
        .into(),
        ..Default::default()
    };
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let dataplane = Dataplane::new(backend, None);
    let rs = {
        let valid = linear_policies(10_000, false)
            .iter()
            .map(validate)
            .collect::<Result<Vec<_>, _>>()?;
        compile_node("node", &valid, &facts)?
    };
    dataplane.sync(&rs)?;
    // Steady state: the ruleset and the model held, a no-op sync done.
    dataplane.sync(&rs)?;
    let (rss, hwm) = rss_kib();
    let tools =
        nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?.max_rss();
    dataplane.cleanup()?;
    println!("rss {rss} hwm {hwm} tools {tools}");
    Ok(())
}

/// Runs [`rss_child`] and parses its line: (RSS, peak, tools' peak) in MiB.
fn agent_rss(netns: &str, backend: Backend) -> BenchResult<(f64, f64, f64)> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--rss", netns, &backend.to_string()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "rss child: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    let field = |k: &str| -> BenchResult<f64> {
        let i = words
            .iter()
            .position(|w| *w == k)
            .ok_or_else(|| format!("rss child printed {text:?}"))?;
        let kib: f64 = words.get(i + 1).ok_or("rss child: no value")?.parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("rss")?, field("hwm")?, field("tools")?))
}

/// One printed line: ours, the raw baseline, and their ratio.
fn row(what: &str, ours: Duration, raw: Duration, note: &str) {
    let ratio = if raw.is_zero() {
        "-".to_string()
    } else {
        format!("{:.2}×", ours.as_secs_f64() / raw.as_secs_f64())
    };
    println!(
        "  {what:<46} {:>10} {:>10} {:>7}  {note}",
        ms(ours),
        ms(raw),
        ratio
    );
}

/// Medians of one change, ours and raw.
struct Change {
    /// The whole sync: plan, write, check of the chains edited.
    ours: Duration,
    /// The sync until its last write returned: the kernel holds the change.
    to_kernel: Duration,
    /// The same write through the raw tools.
    raw: Duration,
    /// The raw write plus the same check listings.
    raw_checked: Duration,
    /// Chains written.
    chains: usize,
    /// Syncs whose write was checked by its `nft monitor` echo.
    echo_checks: usize,
    /// Planning and rendering in process (median).
    planning: Duration,
}

struct Bench {
    node: SimHost,
    peer: SimHost,
    dataplane: Dataplane,
    backend: Backend,
    facts: Facts,
    repeat: usize,
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

    /// Runs `program args` with `input` as the dataplane does (from the
    /// measuring thread, inside the node's namespace); returns how long it
    /// took.
    fn tool(&self, program: &str, args: &[&str], input: Option<&str>) -> BenchResult<Duration> {
        let start = Instant::now();
        let mut child = Command::new(program)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(format!(
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        Ok(start.elapsed())
    }

    /// Feeds `scripts` to the raw tools in the dataplane's order.
    fn raw(&self, scripts: &ApplyScripts) -> BenchResult<Duration> {
        let mut total = Duration::ZERO;
        if let Some(t) = &scripts.sets {
            total += self.tool("ipset", &["restore"], Some(t))?;
        }
        for (family, text) in [(Family::V4, &scripts.ipv4), (Family::V6, &scripts.ipv6)] {
            if let Some(t) = text {
                let restore = self.backend.command(family, "restore");
                total += self.tool(&restore, &["-w", "5", "--noflush"], Some(t))?;
            }
        }
        if let Some(t) = &scripts.set_removals {
            total += self.tool("ipset", &["restore"], Some(t))?;
        }
        Ok(total)
    }

    /// The read-back a sync without a model needs: both tables and the sets.
    fn raw_read(&self) -> BenchResult<Duration> {
        let mut total = Duration::ZERO;
        for family in [Family::V4, Family::V6] {
            total += self.tool(
                &self.backend.command(family, "save"),
                &["-t", "filter"],
                None,
            )?;
        }
        total += self.tool("ipset", &["save"], None)?;
        Ok(total)
    }

    fn clean(&self) -> BenchResult<()> {
        self.dataplane.cleanup()?;
        Ok(())
    }

    /// The reads `Dataplane::check_written` makes after a write from the
    /// model, through the raw tools: per family, a listing of each chain
    /// edited (nft, up to 4) or one `iptables-save` (legacy).
    fn raw_check(&self, plan: &Plan) -> BenchResult<Duration> {
        let mut total = Duration::ZERO;
        for (family, tools) in [(IpFamily::V4, Family::V4), (IpFamily::V6, Family::V6)] {
            let mut names = plan.chains_edited(family);
            if plan.hooks_changed(family) > 0 {
                names.extend(["INPUT", "OUTPUT"]);
            }
            if names.is_empty() {
                continue;
            }
            if self.backend == Backend::Nft && names.len() <= 4 {
                let tool = self.backend.command(tools, "");
                for name in names {
                    total += self.tool(&tool, &["-w", "5", "-S", name], None)?;
                }
            } else {
                total += self.tool(
                    &self.backend.command(tools, "save"),
                    &["-t", "filter"],
                    None,
                )?;
            }
        }
        Ok(total)
    }

    /// Ours vs raw for the change `a` → `b` (both already compiled, the
    /// node at `a` with a trusted model): medians over `repeat` rounds of
    /// ours a→b, ours b→a, raw a→b, raw b→a (the raw text is what ours
    /// wrote; the raw check is the same listings through the tools). With
    /// a followed `monitor`, the raw writes are other processes' changes
    /// to it: each round ends once it has reported them and an untimed
    /// sync has listed the chain they touched, so the next round starts
    /// with nothing suspect.
    fn change(
        &self,
        a: &NodeRuleset,
        b: &NodeRuleset,
        monitor: Option<&FollowedMonitor>,
    ) -> BenchResult<Change> {
        let (mut ours, mut to_kernel, mut raw, mut raw_checked, mut planning) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut chains, mut echo_checks) = (0, 0);
        for _ in 0..self.repeat {
            let start = Instant::now();
            let forward = self.dataplane.sync(b)?;
            ours.push(start.elapsed());
            to_kernel.push(forward.to_kernel);
            planning.push(forward.planning);
            chains = forward.chains_written;
            echo_checks += usize::from(forward.checked_by_echo);
            if forward.full_read {
                return Err("the change was not written from the model".into());
            }
            let back = self.dataplane.sync(a)?;
            let seen = monitor.map(FollowedMonitor::drift_seen);
            let write = self.raw(&forward.plan.scripts)?;
            raw.push(write);
            raw_checked.push(write + self.raw_check(&forward.plan)?);
            self.raw(&back.plan.scripts)?;
            if let (Some(m), Some(seen)) = (monitor, seen) {
                let wait = Instant::now();
                while m.drift_seen() < seen + 2 {
                    if wait.elapsed() > Duration::from_secs(10) {
                        return Err("nft monitor did not report the raw writes".into());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                if self.dataplane.sync(a)?.wrote() {
                    return Err("the raw writes left the chain unlike the model".into());
                }
            }
        }
        Ok(Change {
            ours: median(ours),
            to_kernel: median(to_kernel),
            raw: median(raw),
            raw_checked: median(raw_checked),
            chains,
            echo_checks,
            planning: median(planning),
        })
    }

    /// Medians of: `chain` flushed out of band, then repaired (after
    /// `suspect`, as on an `nft monitor` event, or after `invalidate`, a
    /// full read); raw: the same reads and repair text through the tools.
    fn drift(
        &self,
        rs: &NodeRuleset,
        chain: &str,
        event: bool,
    ) -> BenchResult<(Duration, Duration)> {
        let iptables = self.backend.command(Family::V4, "");
        let (mut ours, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..self.repeat {
            self.tool(&iptables, &["-F", chain], None)?;
            let start = Instant::now();
            if event {
                self.dataplane.suspect(IpFamily::V4, chain);
            } else {
                self.dataplane.invalidate();
            }
            let report = self.dataplane.sync(rs)?;
            ours.push(start.elapsed());
            if !report.wrote() || report.full_read == event {
                return Err(format!("drift not repaired as expected: {report:?}").into());
            }
            self.tool(&iptables, &["-F", chain], None)?;
            let read = if event {
                self.tool(&iptables, &["-w", "5", "-S", chain], None)?
            } else {
                self.raw_read()?
            };
            raw.push(read + self.raw(&report.plan.scripts)?);
        }
        self.dataplane.verify(rs)?;
        Ok((median(ours), median(raw)))
    }

    fn connect_rtt(&self, n: usize) -> BenchResult<(Duration, Duration)> {
        let target = SocketAddr::new(IpAddr::V4(self.node.ipv4()), PORT);
        let ns = std::fs::File::open(format!("/run/netns/{}", self.peer.netns()))?;
        let mut samples = std::thread::scope(|s| {
            s.spawn(move || -> std::io::Result<Vec<Duration>> {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
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

fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run_backend(net: &SimNet, backend: Backend, probes: usize) -> BenchResult<Vec<Figure>> {
    let node = net.add_host(&format!("bench-node-{backend}"))?;
    let peer = net.add_host(&format!("bench-peer-{backend}"))?;
    let _listener = node.listen_tcp(PORT)?;
    let facts = Facts {
        nodes: vec![NodeFacts {
            name: "node".into(),
            addresses: node.addresses(),
            ..Default::default()
        }]
        .into(),
        ..Default::default()
    };
    let netns = node.netns().to_string();
    let mut bench = Bench {
        dataplane: Dataplane::new(backend, None),
        node,
        peer,
        backend,
        facts,
        repeat: env_num("PALISADE_BENCH_REPEAT", 15) as usize,
    };
    println!();
    println!(
        "backend {backend} (medians of {} unless said)     {:>10} {:>10} {:>7}",
        bench.repeat, "ours", "raw", "ratio"
    );
    let table = in_netns(&netns, || measure(&mut bench, probes))?;
    zero_gap_run(backend)?;
    Ok(table)
}

/// Every figure of one backend, from the thread inside the node's
/// namespace.
fn measure(bench: &mut Bench, probes: usize) -> BenchResult<Vec<Figure>> {
    let backend = bench.backend;
    let mut table = Vec::new();

    // Programming 10k rules from empty (a fresh dataplane: full read first).
    let rs10k = bench.compile(&linear_policies(10_000, false))?;
    let (mut ours, mut raw, mut reading, mut planning, mut writing) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..bench.repeat.min(5) {
        bench.dataplane = Dataplane::new(backend, None);
        let start = Instant::now();
        let report = bench.dataplane.sync(&rs10k)?;
        ours.push(start.elapsed());
        reading.push(report.reading);
        planning.push(report.planning);
        writing.push(report.writing);
        bench.clean()?;
        raw.push(bench.raw(&report.plan.scripts)?);
        bench.clean()?;
    }
    table.push(Figure {
        what: "program 10k rules from empty",
        target: "≤1.2× raw",
        ours: Val::Time(median(ours.clone())),
        raw: Val::Time(median(raw.clone())),
    });
    row(
        "program 10k rules from empty",
        median(ours),
        median(raw),
        &format!(
            "({} iptables+ip6tables rules; ours reads back first: {}, then plans and renders: {}, writes: {})",
            rs10k.rule_count(),
            ms(median(reading)),
            ms(median(planning)),
            ms(median(writing))
        ),
    );
    bench.dataplane = Dataplane::new(backend, None);
    bench.dataplane.sync(&rs10k)?;

    // A one-rule change with 10k rules present: checked by listing the
    // chain edited, and on nft also with the `nft monitor` followed, as
    // the agent does, whose echo of the write is its check.
    let changed = bench.compile(&linear_policies(10_000, true))?;
    let listed = bench.change(&rs10k, &changed, None)?;
    let echoed = match backend {
        Backend::Nft => {
            let monitor = FollowedMonitor::start(&bench.dataplane, Some(bench.node.netns()))?;
            if monitor.wait_live(Duration::from_secs(30)) {
                // The echo checks writes once a full read came after the
                // monitor was live.
                bench.dataplane.verify(&rs10k)?;
                let c = bench.change(&rs10k, &changed, Some(&monitor))?;
                drop(monitor);
                Some(c)
            } else {
                println!("  (nft monitor reported nothing within 30 s: no echo figures)");
                drop(monitor);
                None
            }
        }
        Backend::Legacy => None,
    };
    let c = echoed.as_ref().unwrap_or(&listed);
    table.push(Figure {
        what: "1-rule change at 10k rules, to kernel",
        target: "≤10 ms, ≤2× raw",
        ours: Val::Time(c.to_kernel),
        raw: Val::Time(c.raw),
    });
    table.push(Figure {
        what: "  whole sync, checked by its echo",
        target: "(raw: the write alone)",
        ours: echoed.as_ref().map_or(Val::None, |e| Val::Time(e.ours)),
        raw: echoed.as_ref().map_or(Val::None, |e| Val::Time(e.raw)),
    });
    table.push(Figure {
        what: "  whole sync, checked by listing",
        target: "(raw: + the same listing)",
        ours: Val::Time(listed.ours),
        raw: Val::Time(listed.raw_checked),
    });
    row(
        "1-rule change at 10k rules, to kernel",
        c.to_kernel,
        c.raw,
        &format!(
            "({} chain edited in place; from the sync's start to its restore's exit; planning {})",
            c.chains,
            ms(c.planning)
        ),
    );
    if let Some(e) = &echoed {
        row(
            "1-rule change at 10k rules, checked by its echo",
            e.ours,
            e.raw,
            &format!(
                "(whole sync, nft monitor followed: {} of {} checked by the echo; raw: the write alone)",
                e.echo_checks, bench.repeat
            ),
        );
    }
    row(
        "1-rule change at 10k rules, checked by listing",
        listed.ours,
        listed.raw_checked,
        "(whole sync, + listing the chain edited; raw: the same listing)",
    );

    // No-op sync.
    let before = bench.dataplane.processes_spawned();
    let mut noop = Vec::new();
    for _ in 0..bench.repeat {
        let start = Instant::now();
        bench.dataplane.sync(&rs10k)?;
        noop.push(start.elapsed());
    }
    let spawned = bench.dataplane.processes_spawned() - before;
    let raw_read = median(
        (0..bench.repeat.min(5))
            .map(|_| bench.raw_read())
            .collect::<BenchResult<Vec<_>>>()?,
    );
    table.push(Figure {
        what: "no-op sync: processes spawned",
        target: "0 (raw: a read-back)",
        ours: Val::Count(spawned as f64 / bench.repeat.max(1) as f64),
        // iptables-save, ip6tables-save, ipset save.
        raw: Val::Count(3.0),
    });
    table.push(Figure {
        what: "no-op sync: time",
        target: "(raw: a read-back)",
        ours: Val::Time(median(noop.clone())),
        raw: Val::Time(raw_read),
    });
    row(
        "no-op sync at 10k rules",
        median(noop),
        raw_read,
        &format!(
            "({spawned} processes in {} syncs; raw: the read-back it avoids)",
            bench.repeat
        ),
    );

    // Drift repair: a policy chain flushed out of band, then what an
    // `nft monitor` event leads to (the chain suspected: listed and
    // rewritten), and what the periodic verification does (full read).
    let chain = rs10k
        .ipv4
        .chains
        .iter()
        .find(|c| c.name.starts_with("PAL-I-"))
        .map(|c| c.name.clone())
        .ok_or("no policy chain")?;
    for event in [true, false] {
        let (ours, raw) = bench.drift(&rs10k, &chain, event)?;
        table.push(Figure {
            what: if event {
                "drift repair p50, 10k rules, event"
            } else {
                "drift repair p50, 10k, full read"
            },
            // The full read is the periodic backstop (about once a
            // minute); the target is for drift found by an event.
            target: if event {
                "≤50 ms"
            } else {
                "(periodic backstop)"
            },
            ours: Val::Time(ours),
            raw: Val::Time(raw),
        });
        let what = if event {
            "drift repair at 10k rules, on an event (p50)"
        } else {
            "drift repair at 10k rules, full read (p50)"
        };
        let note = if event {
            "(raw: listing the chain + the same repair text)"
        } else {
            "(raw: the full read + the same repair text)"
        };
        row(what, ours, raw, note);
    }
    let (rss, hwm) = rss_kib();
    println!(
        "  process RSS holding the 10k-rule ruleset and model: {:.1} MiB (peak {:.1} MiB; the bench process, not the agent)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    bench.clean()?;
    let (rss, agent_hwm, tools) = agent_rss(bench.node.netns(), backend)?;
    println!(
        "  agent dataplane RSS at 10k rules (child process): {rss:.1} MiB (peak {agent_hwm:.1} MiB); restore tools' peak {tools:.1} MiB"
    );
    table.push(Figure {
        what: "agent RSS at 10k rules",
        target: "≤30 MiB (raw: tools)",
        ours: Val::MiB(rss),
        raw: Val::MiB(tools),
    });

    // Drift repair on a small ruleset (the agent test's size).
    let small = bench.compile(&linear_policies(40, false))?;
    bench.dataplane.sync(&small)?;
    let chain = small
        .ipv4
        .chains
        .iter()
        .find(|c| c.name.starts_with("PAL-I-"))
        .map(|c| c.name.clone())
        .ok_or("no policy chain")?;
    let (ours, raw) = bench.drift(&small, &chain, true)?;
    table.push(Figure {
        what: "drift repair p50, 48 rules, event",
        target: "≤50 ms",
        ours: Val::Time(ours),
        raw: Val::Time(raw),
    });
    row("drift repair at 48 rules, on an event (p50)", ours, raw, "");
    bench.clean()?;

    // One entry changed in a 100k-entry set.
    bench.with_prefix_list(host_cidrs(100_000, None));
    let set_a = bench.compile(&[set_policy()])?;
    let start = Instant::now();
    let loaded = bench.dataplane.sync(&set_a)?;
    let load = start.elapsed();
    bench.clean()?;
    let load_raw = bench.raw(&loaded.plan.scripts)?;
    bench.clean()?;
    bench.dataplane.sync(&set_a)?;
    row("load a 100k-entry set from empty", load, load_raw, "");
    let mut cidrs = host_cidrs(100_000, None);
    cidrs[0] = "12.0.0.0/24".parse()?;
    bench.with_prefix_list(cidrs);
    let set_b = bench.compile(&[set_policy()])?;
    let c = bench.change(&set_a, &set_b, None)?;
    table.push(Figure {
        what: "1-entry change in a 100k-entry set",
        target: "≤5 ms",
        ours: Val::Time(c.ours),
        raw: Val::Time(c.raw),
    });
    row(
        "1-entry change in a 100k-entry set",
        c.ours,
        c.raw,
        &format!(
            "(add + del in one ipset restore, {} chains written)",
            c.chains
        ),
    );
    bench.clean()?;

    if backend == Backend::Nft && probes > 0 {
        println!("  per-connection round trip, {probes} sequential TCP connects (median / p99):");
        let (m, p) = bench.connect_rtt(probes)?;
        println!(
            "    no rules:                      {:>7} / {:>7}",
            us(m),
            us(p)
        );
        let peer_addr = IpAddr::V4(bench.peer.ipv4());
        bench.with_prefix_list(host_cidrs(10_000, Some(peer_addr)));
        let rs = bench.compile(&[set_policy()])?;
        bench.dataplane.sync(&rs)?;
        let (m, p) = bench.connect_rtt(probes)?;
        println!(
            "    10k CIDRs through an ipset:    {:>7} / {:>7}",
            us(m),
            us(p)
        );
        bench.clean()?;
        let mut policies = linear_policies(10_000, false);
        policies.push(policy(
            "zz-peer",
            vec![rule(
                "peer".into(),
                vec![cidr_peer(format!("{peer_addr}/32"))],
            )],
        ));
        let rs = bench.compile(&policies)?;
        bench.dataplane.sync(&rs)?;
        let (m, p) = bench.connect_rtt(probes)?;
        println!(
            "    10k linear rules (match last): {:>7} / {:>7}",
            us(m),
            us(p)
        );
        bench.clean()?;
    }

    Ok(table)
}

/// The zero-gap check at full size (its own simulated hosts).
fn zero_gap_run(backend: Backend) -> BenchResult<()> {
    let edits = env_num("PALISADE_ZERO_GAP_EDITS", 1000) as usize;
    if edits > 0 {
        let seed = env_num("PALISADE_ZERO_GAP_SEED", 11);
        let start = Instant::now();
        let r = zero_gap(edits, seed, backend)?;
        let p50 = median(r.edit_times.clone());
        println!(
            "  zero-gap (seed {seed}): {} edits in {:.1} s (p50 {} each, {} checked by their nft monitor echo), {} probes, {} lost, {} packets dropped by Palisade, {} full reads, {} model mismatches",
            r.edits,
            start.elapsed().as_secs_f64(),
            ms(p50),
            r.echo_checks,
            r.probes,
            r.lost.len(),
            r.gap_drops,
            r.full_reads,
            r.model_mismatches
        );
        // A probe lost with no drop counted was lost to the machine's load
        // (printed above); a counted drop is a gap.
        if r.gap_drops > 0 || !r.enforced || r.model_mismatches > 0 {
            return Err(format!("zero-gap failed: {r:?}").into());
        }
    }
    Ok(())
}

fn main() -> BenchResult<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, netns, backend] = args.as_slice()
        && flag == "--rss"
    {
        return rss_child(netns, backend);
    }
    let probes = env_num("PALISADE_BENCH_PROBES", 2000) as usize;
    let net = SimNet::new()?;
    println!(
        "palisade node dataplane benchmark (one network namespace per backend; {} build)",
        if cfg!(debug_assertions) {
            "DEBUG: figures not comparable with the targets"
        } else {
            "release"
        }
    );
    println!(
        "ours: Dataplane::sync (plan from the model or a read-back, write, check); raw: the same text through the same tools"
    );
    let mut results = Vec::new();
    for backend in [Backend::Nft, Backend::Legacy] {
        results.push((backend, run_backend(&net, backend, probes)?));
    }
    print_table(&results);
    Ok(())
}
