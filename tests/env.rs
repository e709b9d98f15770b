//! The test environment itself: real etcd + kube-apiserver + moto, simulated
//! nodes in network namespaces, identities, and cleanup after a panic.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use palisade::api::{FirewallNode, FirewallPolicy};
use palisade::testenv::{Reach, SimNet, SimNode, TestEnv, testbin};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

const CRDS: &str = include_str!("../crds/palisade.dev.yaml");
const PROBE: Duration = Duration::from_millis(1500);

fn env() -> &'static TestEnv {
    TestEnv::shared().unwrap()
}

async fn whoami(client: Client) -> (String, Vec<String>) {
    let review = Api::<SelfSubjectReview>::all(client)
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .unwrap();
    let user = review.status.unwrap().user_info.unwrap();
    (user.username.unwrap(), user.groups.unwrap_or_default())
}

fn is_forbidden(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 403)
}

#[tokio::test]
async fn apiserver_is_v1_37_2_and_kubectl_works() {
    let env = env();
    assert!(
        env.started_in() < Duration::from_secs(15),
        "start-up took {:?}",
        env.started_in()
    );
    let version = env
        .client()
        .await
        .unwrap()
        .apiserver_version()
        .await
        .unwrap();
    assert_eq!(version.git_version, "v1.37.2");

    let out = env
        .kubectl()
        .unwrap()
        .args([
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "palisade-admin");
}

#[tokio::test]
async fn project_crds_install_and_are_served() {
    let env = env();
    let names = env.install_crds(CRDS).await.unwrap();
    assert_eq!(
        names,
        [
            "firewallpolicies.palisade.dev",
            "firewallnodes.palisade.dev",
            "firewallpeerslices.palisade.dev"
        ]
    );
    // Idempotent, and the kinds are usable right away.
    env.install_crds(CRDS).await.unwrap();
    let client = env.client().await.unwrap();
    Api::<FirewallPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    Api::<FirewallNode>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn apply_yaml_creates_objects_of_any_kind() {
    let env = env();
    let objs = env
        .apply_yaml(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apply-yaml\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm\n  namespace: apply-yaml\ndata:\n  k: v\n",
        )
        .await
        .unwrap();
    assert_eq!(objs.len(), 2);
    assert_eq!(objs[1].data["data"]["k"], "v");
}

#[tokio::test]
async fn moto_answers_describe_vpcs() {
    let env = env();
    let vpcs = env.ec2_client().describe_vpcs().send().await.unwrap();
    assert!(!vpcs.vpcs().is_empty(), "moto has a default VPC");
    let vars: Vec<_> = env.aws_env().into_iter().map(|(k, _)| k).collect();
    for var in [
        "AWS_ENDPOINT_URL_EC2",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
    ] {
        assert!(vars.contains(&var), "{var} missing");
    }
}

#[tokio::test]
async fn identities_are_authenticated_and_subject_to_rbac() {
    let env = env();
    // A client certificate with user and two groups.
    let user = env
        .user_client("alice", &["ops", "auditors"])
        .await
        .unwrap();
    let (name, groups) = whoami(user.clone()).await;
    assert_eq!(name, "alice");
    assert!(
        groups.contains(&"ops".to_string()) && groups.contains(&"auditors".to_string()),
        "{groups:?}"
    );
    let err = Api::<Node>::all(user)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(is_forbidden(&err), "{err:?}");

    // A ServiceAccount token, then RBAC granting it something.
    env.apply_yaml(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: identities\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: agent\n  namespace: identities\n",
    )
    .await
    .unwrap();
    let sa = env
        .service_account_client("identities", "agent")
        .await
        .unwrap();
    let (name, _) = whoami(sa.clone()).await;
    assert_eq!(name, "system:serviceaccount:identities:agent");
    let err = Api::<Node>::all(sa.clone())
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(is_forbidden(&err), "{err:?}");
    env.apply_yaml(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: identities-nodes\n\
         rules:\n- apiGroups: [\"\"]\n  resources: [nodes]\n  verbs: [list]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: identities-nodes\n\
         roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: identities-nodes\n\
         subjects:\n- kind: ServiceAccount\n  name: agent\n  namespace: identities\n",
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(err) = Api::<Node>::all(sa.clone())
        .list(&ListParams::default())
        .await
    {
        assert!(
            Instant::now() < deadline,
            "RBAC grant never took effect: {err:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sim_nodes_are_nodes_and_instances_and_reach_each_other() {
    let env = env();
    let net = SimNet::new().unwrap();
    let a = SimNode::create(env, &net, "reach-a", [("palisade.dev/role", "web")])
        .await
        .unwrap();
    let b = SimNode::create(env, &net, "reach-b", [("palisade.dev/role", "db")])
        .await
        .unwrap();
    let outsider = net.add_host("reach-outsider").unwrap();

    // Node objects: labels, providerID of a moto instance, both InternalIPs.
    let nodes: Api<Node> = Api::all(env.client().await.unwrap());
    for sim in [&a, &b] {
        let node = nodes.get(sim.name()).await.unwrap();
        let provider = node.spec.unwrap().provider_id.unwrap();
        assert_eq!(provider, format!("aws:///us-east-1a/{}", sim.instance_id()));
        assert_eq!(provider, sim.provider_id());
        let addrs: Vec<String> = node
            .status
            .unwrap()
            .addresses
            .unwrap()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP")
            .map(|a| a.address)
            .collect();
        assert_eq!(
            addrs,
            [sim.host().ipv4().to_string(), sim.host().ipv6().to_string()]
        );
        let described = env
            .ec2_client()
            .describe_instances()
            .instance_ids(sim.instance_id())
            .send()
            .await
            .unwrap();
        let instance = &described.reservations()[0].instances()[0];
        assert_eq!(
            instance.private_ip_address(),
            Some(sim.host().ipv4().to_string().as_str())
        );
        assert_eq!(
            instance.network_interfaces()[0].network_interface_id(),
            Some(sim.eni_id())
        );
    }
    let web = nodes
        .list(&ListParams::default().labels("palisade.dev/role=web"))
        .await
        .unwrap();
    assert_eq!(web.items.len(), 1);

    // Both directions, both families, both protocols.
    for (from, to) in [(&a, &b), (&b, &a)] {
        let tcp = to.host().listen_tcp(0).unwrap();
        let udp = to.host().listen_udp(0).unwrap();
        for ip in [IpAddr::V4(to.host().ipv4()), IpAddr::V6(to.host().ipv6())] {
            let reach = from.host().probe_tcp((ip, tcp.port()), PROBE).unwrap();
            assert_eq!(
                reach,
                Reach::Open,
                "TCP {} -> {ip}:{}",
                from.name(),
                tcp.port()
            );
            let reach = from.host().probe_udp((ip, udp.port()), PROBE).unwrap();
            assert_eq!(
                reach,
                Reach::Open,
                "UDP {} -> {ip}:{}",
                from.name(),
                udp.port()
            );
        }
    }

    // A third host reaches nothing on a closed port.
    let closed: SocketAddr = (b.host().ipv4(), 9).into();
    assert_eq!(outsider.probe_tcp(closed, PROBE).unwrap(), Reach::Refused);
    assert_eq!(outsider.probe_udp(closed, PROBE).unwrap(), Reach::Refused);
    let closed6: SocketAddr = (b.host().ipv6(), 9).into();
    assert_eq!(outsider.probe_tcp(closed6, PROBE).unwrap(), Reach::Refused);

    // Filtering in a host is seen by the probes: DROP times out, REJECT
    // is refused, on both families; the host's sysctls are its own.
    let tcp = b.host().listen_tcp(0).unwrap();
    let port = tcp.port().to_string();
    for (tool, ip) in [
        ("iptables", IpAddr::V4(b.host().ipv4())),
        ("ip6tables", IpAddr::V6(b.host().ipv6())),
    ] {
        let rule = |action: &str, target: &str| {
            b.host()
                .exec(&[
                    tool, action, "INPUT", "-p", "tcp", "--dport", &port, "-j", target,
                ])
                .unwrap();
        };
        rule("-I", "DROP");
        let reach = a
            .host()
            .probe_tcp((ip, tcp.port()), Duration::from_millis(300))
            .unwrap();
        assert_eq!(reach, Reach::TimedOut, "{tool} DROP");
        rule("-D", "DROP");
        rule("-I", "REJECT");
        assert_eq!(
            a.host().probe_tcp((ip, tcp.port()), PROBE).unwrap(),
            Reach::Refused,
            "{tool} REJECT"
        );
        rule("-D", "REJECT");
        assert_eq!(
            a.host().probe_tcp((ip, tcp.port()), PROBE).unwrap(),
            Reach::Open
        );
    }
    let dad = b
        .host()
        .exec(&["sysctl", "-n", "net.ipv6.conf.eth0.accept_dad"])
        .unwrap();
    assert_eq!(dad.trim(), "0");

    // An extra address outside the net, used as a probe's source.
    outsider
        .add_address("203.0.113.7/24".parse().unwrap())
        .unwrap();
    let tcp = a.host().listen_tcp(0).unwrap();
    let from = "203.0.113.7".parse().unwrap();
    let reach = outsider
        .probe_tcp_from(from, (a.host().ipv4(), tcp.port()), PROBE)
        .unwrap();
    assert_eq!(reach, Reach::Open);
    let udp = b.host().listen_udp(0).unwrap();
    let reach = a.host().probe_udp(
        ("203.0.113.7".parse::<IpAddr>().unwrap(), udp.port()),
        PROBE,
    );
    assert_eq!(
        reach.unwrap(),
        Reach::Refused,
        "nothing listens on the outsider"
    );

    // Inside a node, the apiserver is at the same URL as outside.
    let out = a
        .host()
        .command(testbin("kubectl").unwrap())
        .arg("--kubeconfig")
        .arg(env.kubeconfig_path())
        .args(["get", "node", "reach-a", "-o", "name"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "node/reach-a");

    // Dropping a node deletes its Node object and namespace.
    let ns = a.host().netns().to_string();
    drop(a);
    assert!(nodes.get_opt("reach-a").await.unwrap().is_none());
    assert!(!std::path::Path::new("/run/netns").join(ns).exists());
}

#[tokio::test]
async fn controller_manager_and_scheduler_run_pods_onto_sim_nodes() {
    let env = env();
    env.start_controller_manager().await.unwrap();
    env.start_scheduler().await.unwrap();
    env.start_scheduler().await.unwrap(); // idempotent
    let net = SimNet::new().unwrap();
    let node = SimNode::create(env, &net, "sched-a", [("palisade.dev/sched", "yes")])
        .await
        .unwrap();
    env.apply_yaml(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: sched}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: sched}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      nodeSelector: {palisade.dev/sched: "yes"}
      containers: [{name: web, image: example.invalid/web}]
"#,
    )
    .await
    .unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(env.client().await.unwrap(), "sched");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let bound = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|p| p.spec.and_then(|s| s.node_name))
            .collect::<Vec<_>>();
        if bound == [node.name()] {
            break;
        }
        assert!(Instant::now() < deadline, "pod never bound: {bound:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn a_private_env_stops_on_drop() {
    if std::env::var_os(CHILD_VAR).is_some() {
        return;
    }
    let env = TestEnv::start().unwrap();
    let pids = env.component_pids();
    let dir = env.dir().to_path_buf();
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|(_, pid)| !gone(&pid.to_string())));
    drop(env);
    // Dropping waits for the processes: they are gone (not even zombies).
    for (name, pid) in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{name} survived"
        );
    }
    assert!(!dir.exists());
}

/// Environment variable that turns [`panicking_child`] on.
const CHILD_VAR: &str = "PALISADE_TESTENV_PANIC_CHILD";

/// Runs only inside the child process of [`a_panicking_test_leaves_nothing_behind`]:
/// starts everything, reports what it started, and panics.
#[tokio::test]
async fn panicking_child() {
    if std::env::var_os(CHILD_VAR).is_none() {
        return;
    }
    let env = env();
    let net = SimNet::new().unwrap();
    let node = SimNode::create(env, &net, "doomed", [("x", "y")])
        .await
        .unwrap();
    let _listener = node.host().listen_tcp(0).unwrap();
    let pids: Vec<String> = env
        .component_pids()
        .into_iter()
        .map(|(_, p)| p.to_string())
        .collect();
    println!("CHILD-PIDS {}", pids.join(" "));
    println!("CHILD-DIR {}", env.dir().display());
    println!("CHILD-NETNS {} {}", net.fabric_netns(), node.host().netns());
    std::mem::forget(node);
    panic!("deliberate panic with everything running");
}

fn gone(pid: &str) -> bool {
    // A killed process whose parent is gone may linger as a zombie until
    // init reaps it; it no longer runs either way.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    if std::env::var_os(CHILD_VAR).is_some() {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "panicking_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VAR, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the child must fail:\n{stdout}");
    let field = |key: &str| -> Vec<String> {
        stdout
            .lines()
            .find_map(|l| l.split_once(key).map(|(_, rest)| rest))
            .unwrap_or_else(|| {
                panic!(
                    "{key} not reported:\n{stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let pids = field("CHILD-PIDS ");
    let dir = field("CHILD-DIR ").join(" ");
    let netns = field("CHILD-NETNS ");
    assert_eq!(pids.len(), 3);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<&String> = pids.iter().filter(|p| !gone(p)).collect();
        let spaces: Vec<&String> = netns
            .iter()
            .filter(|n| std::path::Path::new("/run/netns").join(n).exists())
            .collect();
        let dir_left = std::path::Path::new(&dir).exists();
        if alive.is_empty() && spaces.is_empty() && !dir_left {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: pids {alive:?}, namespaces {spaces:?}, dir {dir} exists: {dir_left}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
