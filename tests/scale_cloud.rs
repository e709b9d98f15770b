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
    FirewallPolicy, FirewallPolicySpec, FirewallRule, NodeSelector, Peer, PolicyType, PortRange,
    Protocol,
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

async fn attached(api: &Api<FirewallPolicy>) -> i32 {
    api.get("fleet")
        .await
        .unwrap()
        .status
        .and_then(|s| s.security_group)
        .map_or(0, |g| g.attached)
}

async fn converge(api: &Api<FirewallPolicy>, want: i32, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if attached(api).await == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{} of {want} nodes carry the group after {timeout:?}",
            attached(api).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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

    let policy = FirewallPolicy::new(
        "fleet",
        FirewallPolicySpec {
            node_selector: Some(NodeSelector {
                match_labels: Some(BTreeMap::from([("role".into(), "fleet".into())])),
                match_expressions: None,
            }),
            policy_types: vec![PolicyType::Ingress],
            ingress: Some(vec![FirewallRule {
                name: "ssh".into(),
                protocol: Protocol::Tcp,
                ports: Some(vec![PortRange {
                    port: 22,
                    end_port: None,
                }]),
                peers: vec![Peer {
                    cidr: Some("10.0.0.0/8".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }]),
            ..Default::default()
        },
    );
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let took = converge(&policies, 450, Duration::from_secs(300)).await;
    let calls = proxy.take_calls();
    within_filter_limit(&calls);
    let counts = by_action(&calls);
    println!("450 nodes converged in {took:.1?}: {counts:?}");
    assert_eq!(counts.get("ModifyNetworkInterfaceAttribute"), Some(&450));
    assert!(
        counts.get("DescribeInstances").copied().unwrap_or(0) >= 3,
        "450 instances need at least 3 DescribeInstances of 200: {counts:?}"
    );

    // 500 nodes join the running cluster: each new interface gets the
    // group in one call, and every Describe stays within the limit.
    let more = run_instances(env, 500).await;
    register(&nodes, &more, 450).await;
    let took = converge(&policies, 950, Duration::from_secs(300)).await;
    let calls = proxy.take_calls();
    within_filter_limit(&calls);
    let counts = by_action(&calls);
    println!("500 more nodes converged in {took:.1?}: {counts:?}");
    assert_eq!(counts.get("ModifyNetworkInterfaceAttribute"), Some(&500));
    assert_eq!(counts.get("CreateSecurityGroup"), None);

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
}
