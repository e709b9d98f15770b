//! The chart on a cluster with nodes: kube-controller-manager and
//! kube-scheduler beside the apiserver, kwok playing the kubelets of a node
//! of each kind an EKS cluster has: Linux, Windows, Fargate and a tainted
//! (dedicated) Linux node. A `helm install` with the default values gets
//! the controller's two replicas scheduled and running, and an agent on
//! every Linux node, tainted or not, but none on Windows or Fargate. Then
//! `agent.tolerations` narrowed to the taints the agent should tolerate
//! keeps it off the tainted node too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use palisade::testenv::{TestEnv, reaper, testbin};

const NS: &str = "palisade-system";
/// The kinds of node, as kwok fakes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Linux,
    Windows,
    /// An EKS Fargate node: labelled and tainted as EKS does.
    Fargate,
    /// A Linux node dedicated to some workload by a NoExecute taint.
    Tainted,
}

const NODES: [(&str, Kind); 5] = [
    ("kwok-a", Kind::Linux),
    ("kwok-b", Kind::Linux),
    ("kwok-windows", Kind::Windows),
    ("kwok-fargate", Kind::Fargate),
    ("kwok-tainted", Kind::Tainted),
];

/// kwok runs for the test only (the reaper covers a panic).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kwok_node(name: &str, kind: Kind) -> Node {
    let mut taints = vec![
        serde_json::json!({"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}),
    ];
    let mut labels = serde_json::json!({
        "type": "kwok",
        "kubernetes.io/os": "linux",
        "kubernetes.io/hostname": name,
    });
    match kind {
        Kind::Linux => {}
        Kind::Windows => labels["kubernetes.io/os"] = "windows".into(),
        Kind::Fargate => {
            labels["eks.amazonaws.com/compute-type"] = "fargate".into();
            taints.push(serde_json::json!({"key": "eks.amazonaws.com/compute-type", "value": "fargate", "effect": "NoSchedule"}));
        }
        Kind::Tainted => {
            taints.push(
                serde_json::json!({"key": "dedicated", "value": "gpu", "effect": "NoExecute"}),
            );
        }
    }
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": labels
        },
        "spec": {"taints": taints},
        "status": {
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"}
        }
    }))
    .unwrap()
}

/// `helm install` (or `upgrade`) of the chart with `values` beyond the
/// cluster name and the controller's toleration of the fake nodes' taint.
fn helm(env: &TestEnv, action: &str, values: &[&str]) {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/palisade");
    let mut cmd = Command::new(testbin("helm").unwrap());
    cmd.env("KUBECONFIG", env.kubeconfig_path())
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("palisade-helm-cache"),
        )
        .arg(action)
        .arg("palisade")
        .arg(&chart)
        .args(["--namespace", NS, "--set", "clusterName=kwok"])
        // The controller tolerates the fake nodes' taint like any other.
        .args([
            "--set",
            "controller.tolerations[0].key=kwok.x-k8s.io/node",
            "--set",
            "controller.tolerations[0].operator=Exists",
        ]);
    for v in values {
        cmd.args(["--set", v]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the controller has two ready replicas and the agent's
/// DaemonSet, rolled out, runs a ready pod on exactly the `want` nodes;
/// returns the nodes the agents run on.
async fn agents_settle(env: &TestEnv, client: &kube::Client, want: &[&str]) -> Vec<String> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), NS);
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), NS);
    let pods = Api::<Pod>::namespaced(client.clone(), NS);
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let d = deployments.get("palisade-controller").await.unwrap();
        let ds = daemonsets.get("palisade-agent").await.unwrap();
        let ready = d
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        let status = ds.status.clone().unwrap_or_default();
        let rolled_out = status.observed_generation == ds.metadata.generation
            && status.desired_number_scheduled == want.len() as i32
            && status.updated_number_scheduled == Some(want.len() as i32)
            && status.number_ready == want.len() as i32;
        let mut on: Vec<String> = pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
            .await
            .unwrap()
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        on.sort();
        if ready == 2 && rolled_out && on == want {
            return on;
        }
        if Instant::now() > deadline {
            let state = env
                .kubectl()
                .unwrap()
                .args(["-n", NS, "get", "ds,rs,pods,events", "-o", "wide"])
                .output()
                .unwrap();
            panic!(
                "controller ready {ready}/2, agents on {on:?} (want {want:?}), DaemonSet status {status:?}:\n{}",
                String::from_utf8_lossy(&state.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn chart_pods_land_on_the_nodes_they_can_run_on() {
    let env = TestEnv::shared().unwrap();
    env.start_controller_manager().await.unwrap();
    env.start_scheduler().await.unwrap();
    let client = env.client().await.unwrap();

    let log = std::fs::File::create(env.dir().join("kwok.log")).unwrap();
    let stages = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kwok-stages.yaml");
    let kwok = KillOnDrop(
        Command::new(testbin("kwok").unwrap())
            .arg("--kubeconfig")
            .arg(env.kubeconfig_path())
            .arg("--config")
            .arg(&stages)
            .args([
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--server-address=127.0.0.1:0",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    reaper::watch_pid(kwok.0.id());

    let nodes = Api::<Node>::all(client.clone());
    for (name, kind) in NODES {
        let node = kwok_node(name, kind);
        nodes.create(&PostParams::default(), &node).await.unwrap();
        // The apiserver taints every new Node not-ready; the node lifecycle
        // controller (off here: no real kubelets) would lift it. Restore ours.
        let taints = serde_json::json!({"spec": {"taints": node.spec.unwrap().taints}});
        nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(&taints))
            .await
            .unwrap();
    }
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": NS}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();

    // Default values: every Linux node, the tainted one included; never
    // Windows (no image, no iptables) or Fargate (a DaemonSet pod never
    // runs there).
    helm(env, "install", &[]);
    let on = agents_settle(env, &client, &["kwok-a", "kwok-b", "kwok-tainted"]).await;
    println!("default values: agents on {on:?}");

    // Tolerations narrowed to the taints the agent should tolerate: the
    // dedicated node gets no agent (its NoExecute taint evicts the one it
    // had), the others keep theirs.
    helm(
        env,
        "upgrade",
        &[
            "agent.tolerations[0].key=kwok.x-k8s.io/node",
            "agent.tolerations[0].operator=Exists",
        ],
    );
    let on = agents_settle(env, &client, &["kwok-a", "kwok-b"]).await;
    println!("agent.tolerations narrowed: agents on {on:?}");
    drop(kwok);
}
