//! The chart on a cluster with nodes: kube-controller-manager and
//! kube-scheduler beside the apiserver, kwok playing the kubelets of three
//! nodes (one of them tainted). A `helm install` gets the controller's two
//! replicas scheduled and running, and one agent on every node, taints or
//! not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use palisade::testenv::{TestEnv, reaper, testbin};

const NS: &str = "palisade-system";
const NODES: [&str; 3] = ["kwok-a", "kwok-b", "kwok-tainted"];

/// kwok runs for the test only (the reaper covers a panic).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kwok_node(name: &str) -> Node {
    let mut taints = vec![
        serde_json::json!({"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}),
    ];
    if name.ends_with("tainted") {
        taints.push(serde_json::json!({"key": "dedicated", "value": "gpu", "effect": "NoExecute"}));
    }
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {"type": "kwok", "kubernetes.io/os": "linux", "kubernetes.io/hostname": name}
        },
        "spec": {"taints": taints},
        "status": {
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"}
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn chart_pods_are_scheduled_and_run_on_kwok_nodes() {
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
    for name in NODES {
        let node = kwok_node(name);
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

    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/palisade");
    let out = Command::new(testbin("helm").unwrap())
        .env("KUBECONFIG", env.kubeconfig_path())
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("palisade-helm-cache"),
        )
        .arg("install")
        .arg("palisade")
        .arg(&chart)
        .args(["--namespace", NS, "--set", "clusterName=kwok"])
        // The controller tolerates the fake nodes' taint like any other.
        .args([
            "--set",
            "controller.tolerations[0].key=kwok.x-k8s.io/node",
            "--set",
            "controller.tolerations[0].operator=Exists",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let deployments = Api::<Deployment>::namespaced(client.clone(), NS);
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), NS);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let d = deployments.get("palisade-controller").await.unwrap();
        let ds = daemonsets.get("palisade-agent").await.unwrap();
        let ready = d
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        let agents = ds.status.as_ref().map(|s| s.number_ready).unwrap_or(0);
        if ready == 2 && agents == NODES.len() as i32 {
            break;
        }
        if Instant::now() > deadline {
            let state = env
                .kubectl()
                .unwrap()
                .args(["-n", NS, "get", "rs,pods,events", "-o", "wide"])
                .output()
                .unwrap();
            panic!(
                "controller ready {ready}/2, agents ready {agents}/{}:\n{}",
                NODES.len(),
                String::from_utf8_lossy(&state.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // One agent per node, the tainted one included.
    let pods = Api::<Pod>::namespaced(client, NS)
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await
        .unwrap();
    let mut on: Vec<_> = pods
        .items
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    on.sort();
    assert_eq!(on, NODES.iter().map(|s| s.to_string()).collect::<Vec<_>>());
}
