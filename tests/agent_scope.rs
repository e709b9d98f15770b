//! An agent receives and acts on only what its node needs, counted by its
//! own sync counter (`palisade_agent_sync_duration_seconds_count`): writes
//! of the FirewallPeerSlices of a policy that does not select its node, and
//! edits of that policy, cause no sync; once the policy selects the node,
//! the agent gets its slices and admits their nodes (real packets). One
//! test in this binary, so no other test changes Nodes or slices while it
//! counts.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use palisade::api::{FirewallNode, FirewallPeerSlice, FirewallPolicy, SELECTOR_HASH_LABEL};
use palisade::testenv::reports::wait_reported;
use palisade::testenv::{Reach, SimHost, SimNet, SimNode, TestEnv};
use serde_json::json;

const CRDS: &str = include_str!("../crds/palisade.dev.yaml");

/// GET on the agent's metrics server, from inside the node's namespace.
fn http_get(node: &SimNode, path: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/9901; printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    );
    node.host().exec(&["bash", "-c", &script]).unwrap()
}

/// The agent's dataplane syncs so far.
fn syncs(node: &SimNode) -> u64 {
    http_get(node, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix("palisade_agent_sync_duration_seconds_count "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap()
}

fn probe(from: &SimHost, to: &SimNode, port: u16) -> Reach {
    let addr = SocketAddr::new(IpAddr::V4(to.host().ipv4()), port);
    from.probe_tcp(addr, Duration::from_millis(1200)).unwrap()
}

/// The nodes the published slices of `selector` list, sorted, with the
/// slices' resource versions.
async fn published(client: &kube::Client, selector: &str) -> (Vec<String>, Vec<String>) {
    let api: Api<FirewallPeerSlice> = Api::all(client.clone());
    let lp = ListParams::default().labels(&format!(
        "{SELECTOR_HASH_LABEL}={}",
        palisade::api::selector_hash(selector)
    ));
    let list = api.list(&lp).await.unwrap();
    let mut nodes: Vec<String> = list
        .items
        .iter()
        .flat_map(|s| s.spec.nodes.iter().map(|n| n.name.clone()))
        .collect();
    nodes.sort();
    let versions = list
        .items
        .iter()
        .filter_map(|s| s.metadata.resource_version.clone())
        .collect();
    (nodes, versions)
}

/// Waits (bounded) until the slices of `selector` list exactly `want`;
/// returns their resource versions.
async fn wait_published(client: &kube::Client, selector: &str, want: &[String]) -> Vec<String> {
    let start = Instant::now();
    loop {
        let (nodes, versions) = published(client, selector).await;
        if nodes == want {
            return versions;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "slices of {selector} list {nodes:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn relabel(nodes: &Api<Node>, name: &str, role: &str) {
    nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"role": role}}})),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn slices_and_edits_of_policies_elsewhere_cause_no_sync_and_a_policy_moving_here_gets_its_peers()
 {
    let env = TestEnv::shared().unwrap();
    env.install_crds(CRDS).await.unwrap();
    let client = env.client().await.unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    let policies: Api<FirewallPolicy> = Api::all(client.clone());
    let net = SimNet::new().unwrap();
    let app = SimNode::create(env, &net, "scope-app", [("role", "scope-app")])
        .await
        .unwrap();
    let peer = SimNode::create(env, &net, "scope-peer", [("role", "scope-peer")])
        .await
        .unwrap();
    let outsider = net.add_host("scope-out").unwrap();
    let _l = app.host().listen_tcp(9191).unwrap();
    // Nodes that move in and out of the other policy's peer selector:
    // each move rewrites that selector's slice and no other (their
    // addresses stay, so the `<all>` slices stay too).
    let togglers: Vec<String> = (0..3).map(|i| format!("scope-toggle-{i}")).collect();
    for (i, name) in togglers.iter().enumerate() {
        let n: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"role": "scope-idle"}},
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &n).await.unwrap();
        nodes
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"addresses": [
                    {"type": "InternalIP", "address": format!("10.251.0.{}", i + 1)}
                ]}})),
            )
            .await
            .unwrap();
    }
    let publisher = tokio::spawn(palisade::controller::peers::publish(client.clone()));
    let mut agent = app
        .host()
        .tokio_command(env!("CARGO_BIN_EXE_palisade-agent"))
        .env("KUBECONFIG", env.kubeconfig_path())
        .env("NODE_NAME", app.name())
        .env("RUST_LOG", "info")
        .args(["--metrics-address", "127.0.0.1:9901", "--backend", "nft"])
        // No timer sync while counting: only events wake it.
        .args(["--resync-seconds", "600", "--verify-seconds", "600"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    env.apply_yaml(
        "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {name: scope-mine}\nspec:\n  policyTypes: [Ingress]\n  nodeSelector: {matchLabels: {role: scope-app}}\n  ingress:\n    - {name: web, protocol: TCP, ports: [{port: 9090}], peers: [{cidr: 10.252.0.0/16}]}\n",
    )
    .await
    .unwrap();
    let other = |port: u16, role: &str| {
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {{name: scope-other}}\nspec:\n  policyTypes: [Ingress]\n  nodeSelector: {{matchLabels: {{role: {role}}}}}\n  ingress:\n    - name: from-peers\n      protocol: TCP\n      ports: [{{port: {port}}}]\n      peers: [{{nodeSelector: {{matchLabels: {{role: scope-peer}}}}}}]\n"
        )
    };
    env.apply_yaml(&other(9191, "scope-elsewhere"))
        .await
        .unwrap();
    wait_reported(&client, "scope-app", &[("scope-mine", 1)]).await;
    let mut members = vec!["scope-peer".to_string()];
    let mut versions = wait_published(&client, "role=scope-peer", &members).await;
    assert_eq!(
        probe(peer.host(), &app, 9191),
        Reach::TimedOut,
        "scope-mine governs ingress and admits 9090 only"
    );

    // Count: slice writes of the policy selecting other nodes, and edits
    // of it. Before, each of them woke the agent (every agent) once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = syncs(&app);
    let mut slice_writes = 0;
    for round in 0..9 {
        let name = &togglers[round % togglers.len()];
        let joining = !members.contains(name);
        relabel(
            &nodes,
            name,
            if joining { "scope-peer" } else { "scope-idle" },
        )
        .await;
        if joining {
            members.push(name.clone());
        } else {
            members.retain(|m| m != name);
        }
        members.sort();
        let now = wait_published(&client, "role=scope-peer", &members).await;
        if now != versions {
            slice_writes += 1;
        }
        versions = now;
    }
    let edits = 3;
    for i in 0..edits {
        env.apply_yaml(&other(9200 + i, "scope-elsewhere"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let woken = syncs(&app) - before;
    println!(
        "{slice_writes} slice writes and {edits} edits of a policy selecting other nodes: {woken} syncs"
    );
    assert_eq!(slice_writes, 9, "every move rewrote the slice");
    assert_eq!(woken, 0, "nothing the node enforces changed");

    // The policy moves onto this node: the agent fetches the slices of its
    // peer selector and admits exactly their nodes.
    env.apply_yaml(&other(9191, "scope-app")).await.unwrap();
    wait_reported(
        &client,
        "scope-app",
        &[("scope-mine", 1), ("scope-other", 5)],
    )
    .await;
    assert_eq!(probe(peer.host(), &app, 9191), Reach::Open, "peer admitted");
    assert_eq!(probe(&outsider, &app, 9191), Reach::TimedOut);
    let set = app
        .host()
        .exec(&["nft", "list", "ruleset"])
        .unwrap_or_default();
    let ipset = app.host().exec(&["ipset", "list"]).unwrap_or_default();
    for m in &members {
        let i = togglers.iter().position(|t| t == m);
        if let Some(i) = i {
            let addr = format!("10.251.0.{}", i + 1);
            assert!(
                set.contains(&addr) || ipset.contains(&addr),
                "{m}'s address {addr} is programmed"
            );
        }
    }
    // Now its slice writes are this node's business: they wake it.
    let before = syncs(&app);
    let name = &togglers[0];
    let joining = !members.contains(name);
    relabel(
        &nodes,
        name,
        if joining { "scope-peer" } else { "scope-idle" },
    )
    .await;
    let start = Instant::now();
    while syncs(&app) == before {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "a slice of its own policy did not wake the agent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    publisher.abort();
    for p in ["scope-mine", "scope-other"] {
        policies.delete(p, &DeleteParams::default()).await.unwrap();
    }
    wait_reported(&client, "scope-app", &[]).await;
    let _ = agent.kill().await;
    for n in &togglers {
        let _ = nodes.delete(n, &DeleteParams::default()).await;
    }
    let _ = Api::<FirewallNode>::all(client.clone())
        .delete("scope-app", &DeleteParams::default())
        .await;
}
