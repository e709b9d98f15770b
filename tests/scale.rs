//! The controller at rest on watches, counted where it counts: LISTs and
//! status writes by the kube-apiserver's own `apiserver_request_total`,
//! reconciles by the controller's metrics. One test in this binary, so its
//! apiserver serves nobody else while it counts: heartbeats, then a
//! restart of the controller.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use palisade::api::FirewallPolicy;
use palisade::cloud::{AwsEc2, RetryPolicy};
use palisade::controller::{self, Config, Metrics};
use palisade::policy::SgQuota;
use palisade::testenv::TestEnv;
use serde_json::json;

const CRDS: &str = include_str!("../crds/palisade.dev.yaml");

fn ec2_for(endpoint: &str) -> AwsEc2 {
    palisade::testenv::aws_ec2_for(endpoint, RetryPolicy::default())
}

/// `apiserver_request_total` summed over the series with these labels.
async fn requests(client: &kube::Client, verb: &str, resource: &str) -> u64 {
    requests_of(client, verb, resource, None).await
}

/// `apiserver_request_total` of one verb and resource, and of one
/// subresource when given.
async fn requests_of(
    client: &kube::Client,
    verb: &str,
    resource: &str,
    subresource: Option<&str>,
) -> u64 {
    let text = client
        .request_text(http::Request::get("/metrics").body(Vec::new()).unwrap())
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            l.contains(&format!("verb=\"{verb}\""))
                && l.contains(&format!("resource=\"{resource}\""))
                && subresource.is_none_or(|s| l.contains(&format!("subresource=\"{s}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The resources the controller watches.
const WATCHED: [&str; 4] = [
    "firewallpolicies",
    "nodes",
    "firewallnodes",
    "firewallpeerslices",
];

/// LISTs of each watched resource, and status writes of policies, so far.
async fn restart_counts(client: &kube::Client) -> (Vec<u64>, u64) {
    let mut lists = Vec::new();
    for r in WATCHED {
        lists.push(requests(client, "LIST", r).await);
    }
    let writes = requests_of(client, "PATCH", "firewallpolicies", Some("status")).await
        + requests_of(client, "PUT", "firewallpolicies", Some("status")).await;
    (lists, writes)
}

/// Waits until `metrics` counts at least `at_least` reconciles and then
/// none for 3 s (bounded: 60 s).
async fn settle(metrics: &Metrics, at_least: u64) {
    let mut last = u64::MAX;
    let mut still = 0;
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = reconciles(metrics);
        still = if now == last && now >= at_least {
            still + 1
        } else {
            0
        };
        if still >= 6 {
            return;
        }
        last = now;
    }
}

fn scale_config() -> Config {
    resync_every(Duration::from_secs(300))
}

fn resync_every(resync: Duration) -> Config {
    Config {
        cluster_name: "scale".into(),
        resync,
        stalled_retry: Duration::from_secs(600),
        concurrency: 4,
        quota: SgQuota::default(),
        policy_selector: None,
        instance: Some("scale".into()),
        vpc_cidrs: Vec::new(),
    }
}

fn reconciles(metrics: &Metrics) -> u64 {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("palisade_controller_reconciles_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn node(api: &Api<Node>, i: usize, role: &str) {
    let name = format!("scale-n{i}");
    let n: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"role": role}},
    }))
    .unwrap();
    api.create(&PostParams::default(), &n).await.unwrap();
    heartbeat(api, &name, &format!("10.77.0.{}", i + 1)).await;
}

/// What a kubelet's status update writes: the Ready condition's heartbeat.
async fn heartbeat(api: &Api<Node>, name: &str, address: &str) {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "addresses": [{"type": "InternalIP", "address": address}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "lastHeartbeatTime": now, "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        }})),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn node_heartbeats_cause_no_list_and_a_restart_one_list_per_resource() {
    let env = TestEnv::shared().unwrap();
    env.install_crds(CRDS).await.unwrap();
    let client = env.client().await.unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    for i in 0..12 {
        node(&nodes, i, if i % 3 == 0 { "db" } else { "web" }).await;
    }
    let metrics = Arc::new(Metrics::default());
    let ctx = controller::context(
        client.clone(),
        Arc::new(ec2_for(&env.ec2_endpoint())),
        scale_config(),
        metrics.clone(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller::run(ctx, async move {
        let _ = stopped.await;
    }));
    // A policy selecting nodes and one with a nodeSelector peer: before,
    // every Node event woke both and each reconcile listed every Node.
    // Their groups live in the simulated VPC (these nodes run on no
    // instance).
    let vpc = env.sim_cloud().await.unwrap().vpc_id.clone();
    for yaml in [
        "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {name: scale-web}\nspec:\n  policyTypes: [Ingress]\n  nodeSelector: {matchLabels: {role: web}}\n  ingress:\n    - {name: http, protocol: TCP, ports: [{port: 80}], peers: [{cidr: 0.0.0.0/0}]}\n",
        "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {name: scale-db}\nspec:\n  policyTypes: [Ingress]\n  nodeSelector: {matchLabels: {role: db}}\n  ingress:\n    - name: from-web\n      protocol: TCP\n      ports: [{port: 5432}]\n      peers: [{nodeSelector: {matchLabels: {role: web}}}]\n",
    ] {
        let mut p: FirewallPolicy = serde_yaml::from_str(yaml).unwrap();
        p.spec.security_group = Some(palisade::api::SecurityGroupTarget {
            vpc_id: Some(vpc.clone()),
            ..Default::default()
        });
        Api::<FirewallPolicy>::all(client.clone())
            .create(&PostParams::default(), &p)
            .await
            .unwrap();
    }
    // Let the first reconciles and slice writes settle.
    let mut last = u64::MAX;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = reconciles(&metrics);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    let (lists_before, reconciles_before) = (
        requests(&client, "LIST", "nodes").await + requests(&client, "LIST", "firewallnodes").await,
        reconciles(&metrics),
    );
    assert!(lists_before > 0, "the watches' initial lists are counted");
    // 20 s of heartbeats: every node, twice a second in all.
    let beats = 40;
    for b in 0..beats {
        let i = b % 12;
        heartbeat(
            &nodes,
            &format!("scale-n{i}"),
            &format!("10.77.0.{}", i + 1),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lists = requests(&client, "LIST", "nodes").await
        + requests(&client, "LIST", "firewallnodes").await
        - lists_before;
    let woken = reconciles(&metrics) - reconciles_before;
    println!("{beats} heartbeats: {lists} LISTs of nodes/firewallnodes, {woken} reconciles");
    assert_eq!(lists, 0, "no LIST in steady state");
    assert_eq!(woken, 0, "heartbeats wake nothing");
    // A fact Palisade uses does wake exactly the policies it concerns.
    nodes
        .patch(
            "scale-n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"role": "db"}}})),
        )
        .await
        .unwrap();
    let mut woken = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        woken = reconciles(&metrics) - reconciles_before;
        if woken >= 2 {
            break;
        }
    }
    assert!(woken >= 2, "a relabel wakes both policies: {woken}");
    settle(&metrics, reconciles_before + 2).await;
    for p in ["scale-web", "scale-db"] {
        let p = Api::<FirewallPolicy>::all(client.clone())
            .get(p)
            .await
            .unwrap();
        let synced = p.status.and_then(|s| s.cloud_sync).is_some();
        assert!(
            synced,
            "{} reached a full cloud sync",
            p.metadata.name.unwrap()
        );
    }
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;

    // A restart (or a failover) with nothing changed: each watched
    // resource is listed once, every policy is reconciled (a full cloud
    // sync: its memory is gone), and no status is written.
    let (lists_before, writes_before) = restart_counts(&client).await;
    let metrics = Arc::new(Metrics::default());
    let ctx = controller::context(
        client.clone(),
        Arc::new(ec2_for(&env.ec2_endpoint())),
        scale_config(),
        metrics.clone(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller::run(ctx, async move {
        let _ = stopped.await;
    }));
    settle(&metrics, 2).await;
    let (lists_after, writes_after) = restart_counts(&client).await;
    let lists: Vec<(&str, u64)> = WATCHED
        .iter()
        .zip(lists_after.iter().zip(&lists_before))
        .map(|(r, (a, b))| (*r, a - b))
        .collect();
    let writes = writes_after - writes_before;
    println!(
        "restart: LISTs {lists:?}, {} reconciles, {writes} policy status writes",
        reconciles(&metrics)
    );
    assert!(reconciles(&metrics) >= 2, "both policies reconciled");
    for (resource, n) in &lists {
        assert_eq!(*n, 1, "one LIST of {resource} on a restart: {lists:?}");
    }
    assert_eq!(writes, 0, "the stored status was already right");
    // And then it is quiet: the restart's reconciles stop (nothing they
    // wrote or read wakes a policy again), through more heartbeats.
    let before = (reconciles(&metrics), restart_counts(&client).await.1);
    beat(&nodes, 12).await;
    let after = (reconciles(&metrics), restart_counts(&client).await.1);
    println!(
        "after the restart: {} reconciles, {} status writes in 12 heartbeats",
        after.0 - before.0,
        after.1 - before.1
    );
    assert_eq!(after.0 - before.0, 0, "no reconcile once a restart settled");
    assert_eq!(
        after.1 - before.1,
        0,
        "no status write once a restart settled"
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;

    // Resyncs that find nothing changed write nothing, also for a status
    // this very process wrote (its times kept to the second the apiserver
    // stores, so they compare equal with what it reads back): a controller
    // resyncing every 4 s, a policy edited under it, then heartbeats for a
    // few resyncs.
    let metrics = Arc::new(Metrics::default());
    let ctx = controller::context(
        client.clone(),
        Arc::new(ec2_for(&env.ec2_endpoint())),
        resync_every(Duration::from_secs(4)),
        metrics.clone(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller::run(ctx, async move {
        let _ = stopped.await;
    }));
    let policies: Api<FirewallPolicy> = Api::all(client.clone());
    let edited = policies
        .patch(
            "scale-web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ingress": [
                {"name": "http", "protocol": "TCP", "ports": [{"port": 80}, {"port": 8080}],
                 "peers": [{"cidr": "0.0.0.0/0"}]}]}})),
        )
        .await
        .unwrap();
    let generation = edited.metadata.generation;
    for _ in 0..60 {
        let p = policies.get("scale-web").await.unwrap();
        if p.status.and_then(|s| s.observed_generation) == generation {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // (No `settle`: resyncs every few seconds never leave 3 s quiet.)
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (lists_before, writes_before) = restart_counts(&client).await;
    let reconciles_before = reconciles(&metrics);
    // 12 heartbeats, 6 s: at least one resync of each policy.
    beat(&nodes, 12).await;
    beat(&nodes, 12).await;
    let (lists_after, writes_after) = restart_counts(&client).await;
    let resynced = reconciles(&metrics) - reconciles_before;
    let writes = writes_after - writes_before;
    let lists: u64 = lists_after.iter().sum::<u64>() - lists_before.iter().sum::<u64>();
    println!("resyncs: {resynced} reconciles, {writes} status writes, {lists} LISTs");
    assert!(resynced >= 2, "each policy resynced: {resynced} reconciles");
    assert_eq!(writes, 0, "a resync that changes nothing writes no status");
    assert_eq!(lists, 0, "no LIST at a resync");
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
}

/// `n` heartbeats, one every 500 ms, round the nodes.
async fn beat(nodes: &Api<Node>, n: usize) {
    for b in 0..n {
        let i = b % 12;
        heartbeat(nodes, &format!("scale-n{i}"), &format!("10.77.0.{}", i + 1)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
