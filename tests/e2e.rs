//! End to end as users install it: the Helm chart in a real kube-apiserver
//! (CRDs, RBAC, admission policies), the real `palisade-controller` on the
//! host with the chart's controller service-account token, a real
//! `palisade-agent` inside each simulated node's network namespace with a
//! token bound to a pod on that node (as the DaemonSet's pods get), moto for
//! EC2 — then a policy applied, enforced with real packets, read as Flux and
//! Argo CD read it, and deleted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, PostParams};
use palisade::api::{FirewallNode, FirewallPolicy, conditions};
use palisade::testenv::gitops::{argocd_health, kstatus};
use palisade::testenv::{Reach, SimNet, SimNode, TestEnv};
use tokio::process::{Child, Command};

const NS: &str = "palisade-system";

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ready(p: &FirewallPolicy) -> bool {
    let Some(status) = &p.status else {
        return false;
    };
    status.observed_generation == p.metadata.generation
        && status
            .conditions
            .iter()
            .any(|c| c.type_ == conditions::READY && c.status == "True")
}

#[tokio::test]
async fn helm_install_then_controller_and_agents_enforce_a_policy() {
    let env = TestEnv::shared().unwrap();
    let client = env.client().await.unwrap();
    env.helm_install("palisade", NS, &["clusterName=e2e"])
        .await
        .unwrap();
    let policies = Api::<FirewallPolicy>::all(client.clone());
    eventually("the chart's CRDs", Duration::from_secs(20), || {
        let policies = policies.clone();
        async move { policies.list(&Default::default()).await.is_ok() }
    })
    .await;

    let net = SimNet::new().unwrap();
    let web1 = SimNode::create(env, &net, "e2e-web-1", [("role", "web")])
        .await
        .unwrap();
    let web2 = SimNode::create(env, &net, "e2e-web-2", [("role", "web")])
        .await
        .unwrap();
    let office = net.add_host("office").unwrap();
    office
        .add_address("203.0.113.10/24".parse().unwrap())
        .unwrap();
    let outside = net.add_host("outside").unwrap();
    outside
        .add_address("198.51.100.7/24".parse().unwrap())
        .unwrap();
    let _ssh = web1.host().listen_tcp(22).unwrap();
    let _http = web1.host().listen_tcp(80).unwrap();

    // The processes, each with the identity the chart gives it.
    let controller_kubeconfig = env
        .service_account_kubeconfig(NS, "palisade-controller")
        .await
        .unwrap();
    let mut processes: Vec<Child> = vec![
        Command::new(env!("CARGO_BIN_EXE_palisade-controller"))
            .envs(env.aws_env())
            .env("KUBECONFIG", &controller_kubeconfig)
            .env("POD_NAMESPACE", NS)
            .args([
                "--cluster-name",
                "e2e",
                "--metrics-address",
                "127.0.0.1:0",
                "--identity",
                "e2e",
            ])
            .stdout(std::fs::File::create(env.dir().join("e2e-controller.log")).unwrap())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap(),
    ];
    for node in [&web1, &web2] {
        let kubeconfig = env
            .agent_pod_kubeconfig(NS, "palisade-agent", node.name())
            .await
            .unwrap();
        processes.push(
            node.host()
                .tokio_command(env!("CARGO_BIN_EXE_palisade-agent"))
                .env("KUBECONFIG", &kubeconfig)
                .env("NODE_NAME", node.name())
                .args([
                    "--metrics-address",
                    "127.0.0.1:9901",
                    "--admin-cidr",
                    "192.0.2.0/24",
                ])
                .stdout(
                    std::fs::File::create(env.dir().join(format!("e2e-agent-{}.log", node.name())))
                        .unwrap(),
                )
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
    }

    let mut policy: FirewallPolicy =
        serde_yaml::from_str(include_str!("../deploy/examples/web-server.yaml")).unwrap();
    policy.metadata.name = Some("e2e-web".into());
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let logs = env.dir().to_path_buf();
    eventually(
        &format!("the policy to be Ready (logs in {})", logs.display()),
        Duration::from_secs(60),
        || {
            let policies = policies.clone();
            async move { policies.get("e2e-web").await.is_ok_and(|p| ready(&p)) }
        },
    )
    .await;
    let applied = policies.get("e2e-web").await.unwrap();
    let status = applied.status.clone().unwrap();
    assert_eq!(
        status.nodes.as_ref().map(|n| (n.selected, n.synced)),
        Some((2, 2))
    );
    let sg = status.security_group.clone().expect("a Security Group");
    assert!(sg.owned);
    assert_eq!(sg.attached as usize, 2);

    // Each agent wrote its own node's FirewallNode, through the admission policy.
    let fwn = Api::<FirewallNode>::all(client.clone());
    for node in [&web1, &web2] {
        let reported = fwn.get(node.name()).await.unwrap().status.unwrap();
        assert_eq!(
            reported
                .policies
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["e2e-web"]
        );
    }

    // GitOps tools read it as applied.
    let object = serde_json::to_value(&applied).unwrap();
    assert_eq!(kstatus(&object).unwrap().status, "Current");
    let lua = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/argocd/palisade.dev/FirewallPolicy/health.lua");
    assert_eq!(argocd_health(&lua, &object).unwrap().status, "Healthy");

    // Real packets: SSH only from the office, HTTP from anywhere.
    let probe = |host: &palisade::testenv::SimHost, src: &str, port: u16| {
        let to = std::net::SocketAddr::new(web1.host().ipv4().into(), port);
        host.probe_tcp_from(src.parse().unwrap(), to, Duration::from_millis(700))
            .unwrap()
    };
    assert_eq!(probe(&office, "203.0.113.10", 22), Reach::Open);
    assert_eq!(probe(&office, "203.0.113.10", 80), Reach::Open);
    assert_eq!(probe(&outside, "198.51.100.7", 80), Reach::Open);
    assert_ne!(probe(&outside, "198.51.100.7", 22), Reach::Open);

    // Deletion: agents remove their rules, the controller deletes the group,
    // then the policy goes.
    policies
        .delete("e2e-web", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the policy to be gone", Duration::from_secs(60), || {
        let policies = policies.clone();
        async move { matches!(policies.get_opt("e2e-web").await, Ok(None)) }
    })
    .await;
    let groups = env
        .ec2_client()
        .describe_security_groups()
        .group_ids(&sg.id)
        .send()
        .await;
    assert!(
        groups.is_err() || groups.unwrap().security_groups().is_empty(),
        "{} still exists",
        sg.id
    );
    assert_eq!(
        probe(&outside, "198.51.100.7", 22),
        Reach::Open,
        "rules left on the node"
    );
    drop(processes);
}
