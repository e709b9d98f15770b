//! `palisade-bench-controller`: EC2 calls and apply→Security-Group-correct latency
//! of the controller, per scenario, on the local environment (real
//! kube-apiserver + moto, every EC2 call counted by the fault proxy).
//!
//! Run with `make bench-controller` (or
//! `cargo run --features testenv --bin palisade-bench-controller`; a debug build, as
//! the tests use, so latencies are pessimistic).
//! Scenarios: create, no-op resync, change of 1 rule, change of 50 rules,
//! resync of 100 policies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use palisade::api::{
    FirewallPolicy, FirewallPolicySpec, FirewallRule, NodeSelector, Peer, PortRange, Protocol,
    SecurityGroupTarget,
};
use palisade::cloud::{AwsEc2, Ec2, RetryPolicy};
use palisade::controller::{self, Config, Metrics};
use palisade::policy::{Facts, SgQuota, compile_policy};
use palisade::testenv::TestEnv;
use palisade::testenv::fault_proxy::{Call, FaultPlan, FaultProxy, Outcome};

const LABEL: &str = "palisade.dev/bench";

fn ec2_for(endpoint: &str) -> AwsEc2 {
    palisade::testenv::aws_ec2_for(endpoint, RetryPolicy::default())
}

fn rule(name: &str, port: u16) -> FirewallRule {
    FirewallRule {
        name: name.into(),
        protocol: Protocol::Tcp,
        ports: Some(vec![PortRange {
            port,
            end_port: None,
        }]),
        peers: vec![Peer {
            cidr: Some("10.0.0.0/8".into()),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn policy(name: &str, vpc: &str, ports: &[u16]) -> FirewallPolicy {
    let mut p = FirewallPolicy::new(
        name,
        FirewallPolicySpec {
            node_selector: Some(NodeSelector {
                match_labels: Some(BTreeMap::from([(LABEL.into(), "none".into())])),
                match_expressions: None,
            }),
            policy_types: vec![palisade::api::PolicyType::Ingress],
            ingress: Some(ports.iter().map(|p| rule(&format!("p{p}"), *p)).collect()),
            security_group: Some(SecurityGroupTarget {
                vpc_id: Some(vpc.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    p.metadata.labels = Some(BTreeMap::from([(LABEL.into(), "run".into())]));
    p
}

/// Waits until the group of `name` holds exactly its plan (read from moto
/// directly, not through the proxy) and the status reports the current
/// generation; returns the group id.
async fn wait_correct(client: &Client, direct: &AwsEc2, name: &str) -> anyhow::Result<String> {
    let api: Api<FirewallPolicy> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = api.get(name).await?;
        if let Some(group) = p
            .status
            .as_ref()
            .filter(|s| s.observed_generation == p.metadata.generation)
            .and_then(|s| s.security_group.as_ref())
        {
            let plan = compile_policy(&p, &Facts::default())?.cloud;
            let want: Vec<_> = plan
                .ingress
                .iter()
                .flatten()
                .map(|x| x.permission.clone())
                .collect();
            let mut have: Vec<_> = direct
                .describe_rules(&group.id)
                .await?
                .into_iter()
                .filter(|r| r.direction == palisade::policy::Direction::Ingress)
                .map(|r| r.permission)
                .collect();
            have.sort();
            if have == want {
                return Ok(group.id.clone());
            }
        }
        if Instant::now() > deadline {
            bail!("{name} never converged: {:?}", p.status);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no EC2 call has been made for `quiet`.
async fn settle(proxy: &FaultProxy, quiet: Duration) -> Vec<Call> {
    let mut seen = proxy.calls().len();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = proxy.calls().len();
        if n != seen {
            seen = n;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return proxy.take_calls();
        }
    }
}

fn tally(calls: &[Call]) -> String {
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for c in calls {
        *by.entry(c.action.as_str()).or_default() += 1;
    }
    by.iter()
        .map(|(a, n)| format!("{a}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn row(scenario: &str, calls: &[Call], latency: Option<Duration>) {
    let mutating = calls.iter().filter(|c| c.is_mutating()).count();
    println!(
        "{scenario:<36} {:>5} {:>8} {:>10}  {}",
        calls.len(),
        mutating,
        latency.map_or("-".into(), |l| format!("{} ms", l.as_millis())),
        tally(calls)
    );
}

async fn touch(api: &Api<FirewallPolicy>, name: &str, n: usize) -> anyhow::Result<()> {
    let patch = serde_json::json!({"metadata": {"annotations": {"bench/touch": n.to_string()}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

async fn bench(env: &'static TestEnv) -> anyhow::Result<()> {
    env.install_crds(include_str!("../../crds/palisade.dev.yaml"))
        .await?;
    let client = env.client().await?;
    let vpc = env.sim_cloud().await?.vpc_id.clone();
    let proxy = Arc::new(FaultProxy::start(&env.ec2_endpoint())?);
    let direct = ec2_for(&env.ec2_endpoint());
    let metrics = Arc::new(Metrics::default());
    let config = Config {
        cluster_name: "bench".into(),
        resync: Duration::from_secs(3600),
        concurrency: 8,
        quota: SgQuota {
            rules_per_direction: 60,
            ..SgQuota::default()
        },
        policy_selector: Some(format!("{LABEL}=run")),
        ..Config::default()
    };
    let ctx = controller::context(
        client.clone(),
        Arc::new(ec2_for(&proxy.endpoint()).with_observer(metrics.ec2_observer())),
        config,
        metrics,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller::run(ctx.clone(), async move {
        let _ = stopped.await;
    }));
    let api: Api<FirewallPolicy> = Api::all(client.clone());
    println!(
        "{:<36} {:>5} {:>8} {:>10}  by action",
        "scenario", "calls", "mutating", "latency"
    );

    // Warm-up (first watch events, connections), not reported.
    api.create(&PostParams::default(), &policy("bench-warm", &vpc, &[999]))
        .await?;
    wait_correct(&client, &direct, "bench-warm").await?;
    settle(&proxy, Duration::from_millis(500)).await;

    // Create: 10 rules.
    let ports: Vec<u16> = (1000..1010).collect();
    let started = Instant::now();
    api.create(&PostParams::default(), &policy("bench-one", &vpc, &ports))
        .await?;
    wait_correct(&client, &direct, "bench-one").await?;
    let latency = started.elapsed();
    row(
        "create (10 rules)",
        &settle(&proxy, Duration::from_millis(500)).await,
        Some(latency),
    );

    // No-op resync.
    ctx.expire_sync_memory();
    touch(&api, "bench-one", 1).await?;
    row(
        "no-op resync",
        &settle(&proxy, Duration::from_millis(500)).await,
        None,
    );

    // Change of 1 rule.
    let mut p = api.get("bench-one").await?;
    let mut changed = ports.clone();
    changed[0] = 2000;
    p.spec.ingress = policy("x", &vpc, &changed).spec.ingress;
    let started = Instant::now();
    api.replace("bench-one", &PostParams::default(), &p).await?;
    wait_correct(&client, &direct, "bench-one").await?;
    let latency = started.elapsed();
    row(
        "change 1 rule",
        &settle(&proxy, Duration::from_millis(500)).await,
        Some(latency),
    );

    // Change of 25 rules: 25 → 25 others (old and new fit the quota of 60
    // side by side).
    let twenty_five: Vec<u16> = (6000..6025).collect();
    api.create(
        &PostParams::default(),
        &policy("bench-25", &vpc, &twenty_five),
    )
    .await?;
    wait_correct(&client, &direct, "bench-25").await?;
    settle(&proxy, Duration::from_millis(500)).await;
    let mut p = api.get("bench-25").await?;
    let other: Vec<u16> = (7000..7025).collect();
    p.spec.ingress = policy("x", &vpc, &other).spec.ingress;
    let started = Instant::now();
    api.replace("bench-25", &PostParams::default(), &p).await?;
    wait_correct(&client, &direct, "bench-25").await?;
    let latency = started.elapsed();
    row(
        "change 25 rules",
        &settle(&proxy, Duration::from_millis(500)).await,
        Some(latency),
    );

    // Create under 30 % RequestLimitExceeded.
    proxy.set_plan(FaultPlan {
        throttle_ratio: 0.3,
        seed: 7,
        ..FaultPlan::default()
    });
    let started = Instant::now();
    api.create(
        &PostParams::default(),
        &policy("bench-throttled", &vpc, &(8000..8010).collect::<Vec<u16>>()),
    )
    .await?;
    wait_correct(&client, &direct, "bench-throttled").await?;
    let latency = started.elapsed();
    let calls = settle(&proxy, Duration::from_millis(500)).await;
    proxy.set_plan(FaultPlan::default());
    let throttled = calls
        .iter()
        .filter(|c| c.outcome == Outcome::Throttled)
        .count();
    row(
        &format!("create, 30% throttled ({throttled} throttled)"),
        &calls,
        Some(latency),
    );

    // Change of 50 rules: 50 → 50 others.
    let fifty: Vec<u16> = (3000..3050).collect();
    api.create(&PostParams::default(), &policy("bench-fifty", &vpc, &fifty))
        .await?;
    wait_correct(&client, &direct, "bench-fifty").await?;
    settle(&proxy, Duration::from_millis(500)).await;
    let mut p = api.get("bench-fifty").await?;
    let other: Vec<u16> = (4000..4050).collect();
    p.spec.ingress = policy("x", &vpc, &other).spec.ingress;
    let started = Instant::now();
    api.replace("bench-fifty", &PostParams::default(), &p)
        .await?;
    wait_correct(&client, &direct, "bench-fifty").await?;
    let latency = started.elapsed();
    row(
        "change 50 rules",
        &settle(&proxy, Duration::from_millis(500)).await,
        Some(latency),
    );

    // 100 policies: create, then one resync of all.
    let started = Instant::now();
    for i in 0..100 {
        let ports: Vec<u16> = (5000..5003).map(|p| p + i).collect();
        api.create(
            &PostParams::default(),
            &policy(&format!("bench-many-{i}"), &vpc, &ports),
        )
        .await?;
    }
    for i in 0..100 {
        wait_correct(&client, &direct, &format!("bench-many-{i}")).await?;
    }
    let latency = started.elapsed();
    row(
        "create 100 policies",
        &settle(&proxy, Duration::from_secs(1)).await,
        Some(latency),
    );
    ctx.expire_sync_memory();
    let started = Instant::now();
    for i in 0..100 {
        touch(&api, &format!("bench-many-{i}"), 1).await?;
    }
    let calls = settle(&proxy, Duration::from_secs(1)).await;
    let latency = started.elapsed();
    row("resync 100 policies", &calls, Some(latency));
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let env = TestEnv::shared().context("starting the local environment")?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(env))
}
