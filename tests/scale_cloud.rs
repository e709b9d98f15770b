//! The cloud layer at a size real AWS limits matter: a policy selecting 450
//! EC2 nodes (more than the 200 values EC2 accepts in one filter), then 500
//! nodes joining a running cluster. Counted at the fault proxy in front of
//! moto, which sees every EC2 call: what the call carried, not what the
//! client meant to send. One test in this binary, so its moto serves
//! nobody else.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use palisade::api::{
    FirewallPolicy, FirewallPolicySpec, FirewallRule, Layer, NodeSelector, Peer, PolicyType,
    PortRange, Protocol,
};
use palisade::cloud::{MAX_FILTER_VALUES, RetryPolicy};
use palisade::controller::{self, Config, Metrics};
use palisade::policy::SgQuota;
use palisade::testenv::TestEnv;
use palisade::testenv::fault_proxy::{Call, FaultProxy};
use serde_json::json;

const CRDS: &str = include_str!("../crds/palisade.dev.yaml");

/// Runs `count` instances in the simulated subnet, in batches as an
/// autoscaling group would; returns (instance id, private IP).
async fn run_instances(env: &TestEnv, count: usize) -> Vec<(String, String)> {
    let cloud = env.sim_cloud().await.unwrap();
    let ec2 = env.ec2_client();
    let mut out = Vec::new();
    while out.len() < count {
        let n = (count - out.len()).min(100);
        let run = ec2
            .run_instances()
            .image_id(&cloud.image_id)
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
            .min_count(n as i32)
            .max_count(n as i32)
            .subnet_id(&cloud.subnet_id)
            .send()
            .await
            .unwrap();
        for i in run.instances() {
            out.push((
                i.instance_id().unwrap().to_string(),
                i.private_ip_address().unwrap().to_string(),
            ));
        }
    }
    out
}

/// A Node for each instance, as the AWS cloud provider registers them.
async fn register(api: &Api<Node>, instances: &[(String, String)], first: usize) {
    for (k, (id, ip)) in instances.iter().enumerate() {
        let name = format!("fleet-{}", first + k);
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"role": "fleet"}},
            "spec": {"providerID": format!("aws:///us-east-1a/{id}")},
        }))
        .unwrap();
        api.create(&PostParams::default(), &node).await.unwrap();
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}}),
            ),
        )
        .await
        .unwrap();
    }
}

async fn attached(api: &Api<FirewallPolicy>, name: &str) -> i32 {
    api.get(name)
        .await
        .unwrap()
        .status
        .and_then(|s| s.security_group)
        .map_or(0, |g| g.attached)
}

async fn converge(
    api: &Api<FirewallPolicy>,
    names: &[&str],
    want: i32,
    timeout: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let mut done = true;
        for name in names {
            done &= attached(api, name).await == want;
        }
        if done {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{} of {want} nodes carry the group of {} after {timeout:?}",
            attached(api, names[0]).await,
            names[0]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A policy allowing tcp/`port` from 10.0.0.0/8 on the nodes labelled
/// `role` (every node when `None`), on `layers` (both when `None`).
fn policy(name: &str, role: Option<&str>, port: u16, layers: Option<Vec<Layer>>) -> FirewallPolicy {
    FirewallPolicy::new(
        name,
        FirewallPolicySpec {
            node_selector: role.map(|role| NodeSelector {
                match_labels: Some(BTreeMap::from([("role".into(), role.into())])),
                match_expressions: None,
            }),
            policy_types: vec![PolicyType::Ingress],
            ingress: Some(vec![FirewallRule {
                name: "app".into(),
                protocol: Protocol::Tcp,
                ports: Some(vec![PortRange {
                    port,
                    end_port: None,
                }]),
                peers: vec![Peer {
                    cidr: Some("10.0.0.0/8".into()),
                    ..Default::default()
                }],
                layers,
                ..Default::default()
            }]),
            ..Default::default()
        },
    )
}

fn by_action(calls: &[Call]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for c in calls {
        *out.entry(c.action.clone()).or_default() += 1;
    }
    out
}

fn within_filter_limit(calls: &[Call]) {
    for c in calls {
        assert!(
            c.values <= MAX_FILTER_VALUES,
            "{} carried {} values in one list (EC2 refuses more than {MAX_FILTER_VALUES})",
            c.action,
            c.values
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn four_hundred_fifty_nodes_then_five_hundred_more_converge_within_ec2_limits() {
    let env = TestEnv::shared().unwrap();
    env.install_crds(CRDS).await.unwrap();
    let client = env.client().await.unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    let policies: Api<FirewallPolicy> = Api::all(client.clone());

    let first = run_instances(env, 450).await;
    register(&nodes, &first, 0).await;

    let proxy = Arc::new(FaultProxy::start(&env.ec2_endpoint()).unwrap());
    let metrics = Arc::new(Metrics::default());
    let ec2 = palisade::testenv::aws_ec2_for(&proxy.endpoint(), RetryPolicy::default())
        .with_observer(metrics.ec2_observer());
    let config = Config {
        cluster_name: "scale-cloud".into(),
        resync: Duration::from_secs(3600),
        concurrency: 4,
        quota: SgQuota::default(),
        ..Config::default()
    };
    let ctx = controller::context(client.clone(), Arc::new(ec2), config, metrics);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller::run(ctx, async move {
        let _ = stopped.await;
    }));

    // A label pool's policy, and one whose rules are all node-layer (it
    // takes no group, so no slot on any interface).
    let pool = policy("fleet", Some("fleet"), 22, None);
    let node_only = policy("node-only", Some("fleet"), 2222, Some(vec![Layer::Node]));
    for p in [&pool, &node_only] {
        policies.create(&PostParams::default(), p).await.unwrap();
    }
    let took = converge(&policies, &["fleet"], 450, Duration::from_secs(300)).await;
    let calls = proxy.take_calls();
    within_filter_limit(&calls);
    let counts = by_action(&calls);
    println!("450 nodes converged in {took:.1?}: {counts:?}");
    assert_eq!(counts.get("ModifyNetworkInterfaceAttribute"), Some(&450));
    assert_eq!(counts.get("CreateSecurityGroup"), Some(&1), "{counts:?}");
    assert!(
        counts.get("DescribeInstances").copied().unwrap_or(0) >= 3,
        "450 instances need at least 3 DescribeInstances of 200: {counts:?}"
    );
    let status = policies.get("node-only").await.unwrap().status.unwrap();
    assert!(status.security_group.is_none(), "{status:?}");

    // A policy selecting every node (another selector over the same nodes).
    let everyone = policy("everyone", None, 9100, None);
    policies
        .create(&PostParams::default(), &everyone)
        .await
        .unwrap();
    let took = converge(&policies, &["everyone"], 450, Duration::from_secs(300)).await;
    let counts = by_action(&proxy.take_calls());
    println!("a second policy over the 450 nodes converged in {took:.1?}: {counts:?}");

    // 500 nodes join the running cluster: each new interface gets the
    // group in one call, and every Describe stays within the limit.
    let more = run_instances(env, 500).await;
    register(&nodes, &more, 450).await;
    let took = converge(
        &policies,
        &["fleet", "everyone"],
        950,
        Duration::from_secs(300),
    )
    .await;
    let calls = proxy.take_calls();
    within_filter_limit(&calls);
    let counts = by_action(&calls);
    println!("500 more nodes converged in {took:.1?}: {counts:?}");
    // Two policies with cloud rules select each new node: still one call
    // per new interface, with its whole new group list.
    let modify = counts
        .get("ModifyNetworkInterfaceAttribute")
        .copied()
        .unwrap_or(0);
    assert!(
        modify <= 500,
        "{modify} ModifyNetworkInterfaceAttribute for 500 new interfaces"
    );
    assert_eq!(counts.get("CreateSecurityGroup"), None);
    // The interfaces are read in batches (the fresh read each change is
    // made on, one call per 200 under their locks; those carrying the
    // groups, one call per sync), not one call per interface: 1,063 for
    // these 500 before, about 20 since.
    let enis = counts
        .get("DescribeNetworkInterfaces")
        .copied()
        .unwrap_or(0);
    assert!(
        enis <= 125,
        "{enis} DescribeNetworkInterfaces for 500 new interfaces: {counts:?}"
    );

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
}
