//! The agent binary on simulated nodes: two SimNodes (network namespaces
//! with Node objects) against a real kube-apiserver, `palisade-agent`
//! started inside each node's namespace, real packets.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use palisade::api::{FirewallNode, FirewallPolicy};
use palisade::testenv::reports::wait_reported;
use palisade::testenv::{Reach, SimHost, SimNet, SimNode, TestEnv};
use serde_json::json;
use tokio::process::Child;

const CRDS: &str = include_str!("../crds/palisade.dev.yaml");
const OPEN: Duration = Duration::from_secs(2);
const DROP: Duration = Duration::from_millis(300);

fn start_agent(env: &TestEnv, node: &SimNode) -> Child {
    start_agent_with(env, node, &[])
}

fn start_agent_with(env: &TestEnv, node: &SimNode, extra: &[&str]) -> Child {
    node.host()
        .tokio_command(env!("CARGO_BIN_EXE_palisade-agent"))
        .env("KUBECONFIG", env.kubeconfig_path())
        .env("NODE_NAME", node.name())
        .env("RUST_LOG", "info")
        .args(["--metrics-address", "127.0.0.1:9901", "--backend", "nft"])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_for<F: Fn() -> bool>(what: &str, timeout: Duration, f: F) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn probe(from: &SimHost, to: &SimNode, port: u16) -> Reach {
    let addr = SocketAddr::new(IpAddr::V4(to.host().ipv4()), port);
    from.probe_tcp(addr, OPEN.min(DROP * 4)).unwrap()
}

/// GET on the agent's metrics server, from inside the node's namespace.
fn http_get(node: &SimNode, path: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/9901; printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    );
    node.host().exec(&["bash", "-c", &script]).unwrap()
}

fn save(node: &SimNode) -> String {
    node.host()
        .exec(&["iptables-nft-save", "-t", "filter"])
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_filter_follow_labels_repair_drift_and_converge_after_restart() {
    let env = TestEnv::shared().unwrap();
    env.install_crds(CRDS).await.unwrap();
    let client = env.client().await.unwrap();
    let net = SimNet::new().unwrap();
    let n1 = SimNode::create(env, &net, "agent-n1", [("role", "web")])
        .await
        .unwrap();
    let n2 = SimNode::create(env, &net, "agent-n2", [("role", "db")])
        .await
        .unwrap();
    let peer = net.add_host("agent-peer").unwrap();
    let _l1 = [
        n1.host().listen_tcp(8080).unwrap(),
        n1.host().listen_tcp(9090).unwrap(),
    ];
    let _l2 = [
        n2.host().listen_tcp(8080).unwrap(),
        n2.host().listen_tcp(9090).unwrap(),
    ];
    let mut agents = [start_agent(env, &n1), start_agent(env, &n2)];

    // Both agents report an empty node before any policy exists.
    wait_reported(&client, "agent-n1", &[]).await;
    wait_reported(&client, "agent-n2", &[]).await;

    let policies: Api<FirewallPolicy> = Api::all(client.clone());
    env.apply_yaml(
        "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata:\n  name: agent-web\nspec:\n  policyTypes: [Ingress]\n  nodeSelector:\n    matchLabels: {role: web}\n  ingress:\n    - name: http\n      protocol: TCP\n      ports: [{port: 8080}]\n      peers: [{cidr: 0.0.0.0/0}, {cidr: '::/0'}]\n",
    )
    .await
    .unwrap();
    wait_reported(&client, "agent-n1", &[("agent-web", 1)]).await;
    wait_reported(&client, "agent-n2", &[]).await;
    assert_eq!(probe(&peer, &n1, 8080), Reach::Open);
    assert_eq!(probe(&peer, &n1, 9090), Reach::TimedOut);
    assert_eq!(probe(&peer, &n2, 9090), Reach::Open);
    let fwn = Api::<FirewallNode>::all(client.clone())
        .get("agent-n1")
        .await
        .unwrap();
    let status = fwn.status.unwrap();
    assert_eq!(status.backend.as_deref(), Some("nft"));
    let owner = &fwn.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Node", "agent-n1")
    );
    assert!(status.rule_count > 0);

    // Relabel: the rules move.
    let nodes: Api<Node> = Api::all(client.clone());
    for (name, role) in [("agent-n1", "db"), ("agent-n2", "web")] {
        nodes
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"role": role}}})),
            )
            .await
            .unwrap();
    }
    wait_reported(&client, "agent-n1", &[]).await;
    wait_reported(&client, "agent-n2", &[("agent-web", 1)]).await;
    assert_eq!(probe(&peer, &n1, 9090), Reach::Open);
    assert_eq!(probe(&peer, &n2, 9090), Reach::TimedOut);
    assert_eq!(probe(&peer, &n2, 8080), Reach::Open);
    assert!(!save(&n1).contains("PALISADE"), "{}", save(&n1));

    // Its FirewallNode deleted under the running agent (the agent applies
    // the object once, then writes only its status): the next report
    // makes it again, owned by the Node.
    let fwns = Api::<FirewallNode>::all(client.clone());
    fwns.delete("agent-n1", &DeleteParams::default())
        .await
        .unwrap();
    let start = Instant::now();
    while fwns.get_opt("agent-n1").await.unwrap().is_some() {
        assert!(start.elapsed() < Duration::from_secs(15), "not deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let relabel = |role: &'static str| {
        let nodes = nodes.clone();
        async move {
            nodes
                .patch(
                    "agent-n1",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"role": role}}})),
                )
                .await
                .unwrap();
        }
    };
    relabel("web").await;
    wait_reported(&client, "agent-n1", &[("agent-web", 1)]).await;
    let again = fwns.get("agent-n1").await.unwrap();
    assert_eq!(
        again.metadata.owner_references.as_ref().unwrap()[0].name,
        "agent-n1"
    );
    relabel("db").await;
    wait_reported(&client, "agent-n1", &[]).await;

    // Drift: a flushed chain is repaired (nft monitor; the 10 s timer is the backstop).
    let before = save(&n2);
    n2.host()
        .exec(&["iptables-nft", "-F", "PALISADE-INPUT"])
        .unwrap();
    let took = wait_for("repair of PALISADE-INPUT", Duration::from_secs(15), || {
        save(&n2).matches("-A PALISADE-INPUT").count()
            == before.matches("-A PALISADE-INPUT").count()
    })
    .await;
    println!("flushed PALISADE-INPUT repaired in {took:?}");
    assert!(took < Duration::from_secs(3), "repair took {took:?}");
    // A deleted hook too.
    let hook = before
        .lines()
        .find(|l| l.starts_with("-A INPUT"))
        .unwrap()
        .replacen("-A", "-D", 1);
    n2.host()
        .exec(&["sh", "-c", &format!("iptables-nft {hook}")])
        .unwrap();
    let took = wait_for("hook restored", Duration::from_secs(15), || {
        save(&n2)
            .lines()
            .find(|l| l.starts_with("-A INPUT"))
            .is_some_and(|l| l.contains("PALISADE-INPUT"))
    })
    .await;
    println!("deleted hook repaired in {took:?}");
    let fwn = Api::<FirewallNode>::all(client.clone())
        .get("agent-n2")
        .await
        .unwrap();
    let repairs = fwn.status.unwrap().drift_repairs;
    assert!(repairs >= 1, "drift repairs counted: {repairs}");
    let metrics = http_get(&n2, "/metrics");
    assert!(
        metrics.contains("palisade_agent_drift_repairs_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("palisade_agent_sync_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(http_get(&n2, "/healthz").starts_with("HTTP/1.0 200"));
    assert!(http_get(&n2, "/readyz").starts_with("HTTP/1.0 200"));

    // Agent killed; the policy changes meanwhile; restarted, it converges.
    agents[1].kill().await.unwrap();
    policies
        .patch(
            "agent-web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ingress": [
                {"name": "http", "protocol": "TCP", "ports": [{"port": 8080}, {"port": 9090}], "peers": [{"cidr": "0.0.0.0/0"}]}
            ]}})),
        )
        .await
        .unwrap();
    assert_eq!(
        probe(&peer, &n2, 9090),
        Reach::TimedOut,
        "old ruleset stays while the agent is down"
    );
    agents[1] = start_agent(env, &n2);
    wait_reported(&client, "agent-n2", &[("agent-web", 2)]).await;
    assert_eq!(probe(&peer, &n2, 9090), Reach::Open);

    // Delete: every rule and set goes.
    policies
        .delete("agent-web", &DeleteParams::default())
        .await
        .unwrap();
    wait_reported(&client, "agent-n2", &[]).await;
    let s = save(&n2);
    assert!(!s.contains("PALISADE") && !s.contains("PAL-"), "{s}");

    for a in &mut agents {
        let _ = a.kill().await;
    }
    // Uninstall: cleanup removes nothing when nothing is left, and succeeds.
    let out = n2
        .host()
        .command(env!("CARGO_BIN_EXE_palisade-agent"))
        .args(["--backend", "nft", "cleanup"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = Api::<FirewallNode>::all(client.clone())
        .delete("agent-n1", &DeleteParams::default())
        .await;
    let _ = Api::<FirewallNode>::all(client.clone())
        .delete("agent-n2", &DeleteParams::default())
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_selector_peers_follow_other_nodes_labels() {
    let env = TestEnv::shared().unwrap();
    env.install_crds(CRDS).await.unwrap();
    let client = env.client().await.unwrap();
    let net = SimNet::new().unwrap();
    let app = SimNode::create(env, &net, "agent-sel-app", [("role", "sel-app")])
        .await
        .unwrap();
    let client_node = SimNode::create(env, &net, "agent-sel-client", [("role", "sel-client")])
        .await
        .unwrap();
    let outsider = net.add_host("agent-sel-out").unwrap();
    let _l = app.host().listen_tcp(9090).unwrap();
    // The controller's publisher of node addresses (FirewallPeerSlices):
    // the agent watches those and never lists Nodes.
    let publisher = tokio::spawn(palisade::controller::peers::publish(client.clone()));
    let mut agent = start_agent_with(env, &app, &["--resync-seconds", "30"]);
    env.apply_yaml(
        "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata:\n  name: agent-sel\nspec:\n  policyTypes: [Ingress]\n  nodeSelector:\n    matchLabels: {role: sel-app}\n  ingress:\n    - name: from-clients\n      protocol: TCP\n      ports: [{port: 9090}]\n      peers:\n        - nodeSelector:\n            matchLabels: {role: sel-client}\n",
    )
    .await
    .unwrap();
    wait_reported(&client, "agent-sel-app", &[("agent-sel", 1)]).await;
    // The peer set follows the published slice, which may land just after
    // the policy itself.
    let start = Instant::now();
    while probe(client_node.host(), &app, 9090) != Reach::Open {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "client not allowed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(probe(&outsider, &app, 9090), Reach::TimedOut);
    // A status-only write of the policy (what the controller does on every
    // node count change) changes nothing the agent enforces: it wakes
    // nothing. Counted by the agent's wake-ups from policy events (other
    // tests of this binary change Nodes meanwhile, which may wake it by
    // other sources).
    let metric = |prefix: &str| {
        http_get(&app, "/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let syncs = || metric("palisade_agent_sync_duration_seconds_count ");
    let policy_wakeups = || metric("palisade_agent_wakeups_total{source=\"policy\"} ");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, woken_before) = (syncs(), policy_wakeups());
    // Were they to wake the agent, 30 writes 100 ms apart would be 30
    // wake-ups.
    let writes = 30;
    for i in 0..writes {
        Api::<FirewallPolicy>::all(client.clone())
            .patch_status(
                "agent-sel",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"warnings": [format!("status write {i}")]}})),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let woken = policy_wakeups() - woken_before;
    println!(
        "{writes} status-only writes: {woken} wake-ups by policy events, {} agent syncs in all",
        syncs() - before
    );
    assert_eq!(woken, 0, "status-only writes woke the agent");
    // The policy's own edit is counted: the counter is not stuck at 0.
    Api::<FirewallPolicy>::all(client.clone())
        .patch(
            "agent-sel",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ingress": [{"name": "from-clients", "protocol": "TCP", "ports": [{"port": 9090}, {"port": 9091}], "peers": [{"nodeSelector": {"matchLabels": {"role": "sel-client"}}}]}]}})),
        )
        .await
        .unwrap();
    let start = Instant::now();
    while policy_wakeups() == woken_before {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "a spec edit did not wake the agent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The client node stops being a client: its address leaves the set as
    // soon as the published slice changes (the resync period is 30 s).
    Api::<Node>::all(client.clone())
        .patch(
            "agent-sel-client",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"role": "sel-other"}}})),
        )
        .await
        .unwrap();
    let start = Instant::now();
    while probe(client_node.host(), &app, 9090) == Reach::Open {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "client still allowed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("relabelled peer node dropped after {:?}", start.elapsed());
    publisher.abort();
    Api::<FirewallPolicy>::all(client.clone())
        .delete("agent-sel", &DeleteParams::default())
        .await
        .unwrap();
    wait_reported(&client, "agent-sel-app", &[]).await;
    let _ = agent.kill().await;
    let _ = Api::<FirewallNode>::all(client.clone())
        .delete("agent-sel-app", &DeleteParams::default())
        .await;
}
