//! `palisade plan` and `palisade explain` against the real local
//! environment: kube-apiserver + etcd, moto behind the recording fault
//! proxy, simulated nodes (network namespaces with Node objects and moto
//! instances), the real controller and agent, and real packets.
//!
//! - `plan`: its output (the binary's, ids normalised) equals
//!   `tests/golden/plan-*.txt`, its exit code says what changes, and it
//!   makes no EC2 write and changes no Kubernetes object.
//! - `explain`: its node-layer verdict equals what real packets do on a
//!   node programmed by the real agent, across a traffic matrix; its cloud
//!   verdict equals the union of the interface's groups as moto holds them,
//!   evaluated here from the raw EC2 answer.
//! - exposure: a node's `status.exposure`, written by the real controller,
//!   lists exactly the probes that real packets get through on the node
//!   and the union of its interface's groups admits.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use palisade::api::{FirewallNode, FirewallNodeStatus, FirewallPeerSlice, FirewallPolicy};
use palisade::cli::NodeSettings;
use palisade::cli::explain::{CloudAnswer, Question, explain, read_for};
use palisade::cloud::{AwsEc2, Ec2, RetryPolicy};
use palisade::controller::{self, Config, Metrics};
use palisade::policy::eval::{NodeVerdict, ProbeProtocol};
use palisade::policy::{Direction, Failsafe, SgQuota};
use palisade::testenv::fault_proxy::FaultProxy;
use palisade::testenv::{Reach, SimHost, SimNet, SimNode, TestEnv};

const CRDS: &str = include_str!("../crds/palisade.dev.yaml");
const TEST_LABEL: &str = "palisade.dev/test";

async fn env() -> &'static TestEnv {
    let env = TestEnv::shared().unwrap();
    env.install_crds(CRDS).await.unwrap();
    env
}

fn direct(env: &TestEnv) -> AwsEc2 {
    palisade::testenv::aws_ec2_for(&env.ec2_endpoint(), RetryPolicy::default())
}

fn policy(yaml: &str) -> FirewallPolicy {
    serde_yaml::from_str(yaml).unwrap()
}

async fn eventually<F, Fut, T>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A simulated node `name` of test `test` with label `role`.
async fn node_of(env: &TestEnv, net: &SimNet, test: &str, name: &str, role: &str) -> SimNode {
    SimNode::create(env, net, name, [(TEST_LABEL, test), ("role", role)])
        .await
        .unwrap()
}

/// A group not Palisade's in the test VPC, with TCP ingress `rules`
/// (port, CIDR, description), added to the interface of `node` beside the
/// groups it has.
async fn foreign_group(
    env: &TestEnv,
    node: &SimNode,
    name: &str,
    rules: &[(i32, &str, &str)],
) -> String {
    let id = env.foreign_group(name, rules).await.unwrap();
    let ec2 = direct(env);
    let mut groups = ec2.eni_groups(node.eni_id()).await.unwrap();
    groups.push(id.clone());
    ec2.set_eni_groups(node.eni_id(), &groups).await.unwrap();
    id
}

/// Every object `plan` could have touched, by kind and name, with its
/// resourceVersion (but the explain test's, which runs beside it).
async fn snapshot(client: &Client) -> BTreeMap<String, String> {
    let mut all = snapshot_all(client).await;
    all.retain(|k, _| !k.contains("cli-exp"));
    all
}

async fn snapshot_all(client: &Client) -> BTreeMap<String, String> {
    let lp = ListParams::default();
    let mut out = BTreeMap::new();
    for p in Api::<FirewallPolicy>::all(client.clone())
        .list(&lp)
        .await
        .unwrap()
    {
        out.insert(
            format!("fwp/{}", p.name_any()),
            p.resource_version().unwrap(),
        );
    }
    for n in Api::<Node>::all(client.clone()).list(&lp).await.unwrap() {
        out.insert(
            format!("node/{}", n.name_any()),
            n.resource_version().unwrap(),
        );
    }
    for n in Api::<FirewallNode>::all(client.clone())
        .list(&lp)
        .await
        .unwrap()
    {
        out.insert(
            format!("fwn/{}", n.name_any()),
            n.resource_version().unwrap(),
        );
    }
    for s in Api::<FirewallPeerSlice>::all(client.clone())
        .list(&lp)
        .await
        .unwrap()
    {
        out.insert(
            format!("fwps/{}", s.name_any()),
            s.resource_version().unwrap(),
        );
    }
    out
}

/// Replaces AWS ids (`sg-`, `sgr-`, `i-`, `eni-` and 8+ hex digits) with
/// `sg-1`, `sgr-1`, ... in order of appearance, and the given literals with
/// their placeholders.
fn normalise(text: &str, literals: &[(String, &str)]) -> String {
    let mut text = text.to_string();
    for (literal, placeholder) in literals {
        text = text.replace(literal.as_str(), placeholder);
    }
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut out = String::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    'outer: while i < text.len() {
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'-');
        if boundary {
            for prefix in ["sgr-", "sg-", "eni-", "i-"] {
                if text[i..].starts_with(prefix) {
                    let rest = &text[i + prefix.len()..];
                    let hex = rest.bytes().take_while(u8::is_ascii_hexdigit).count();
                    if hex >= 8 {
                        let id = &text[i..i + prefix.len() + hex];
                        let name = seen.entry(id.to_string()).or_insert_with(|| {
                            let c = counts.entry(prefix).or_default();
                            *c += 1;
                            format!("{prefix}{c}")
                        });
                        out.push_str(name);
                        i += prefix.len() + hex;
                        continue 'outer;
                    }
                }
            }
        }
        let ch = text[i..].chars().next().unwrap();
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn check_golden(name: &str, text: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    pretty_assertions::assert_eq!(want, text, "golden {name} differs");
}

/// Runs the `palisade` binary with the env's kubeconfig and `ec2` as the
/// EC2 endpoint.
fn palisade(env: &TestEnv, ec2: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"));
    cmd.env("KUBECONFIG", env.kubeconfig_path());
    for (k, v) in env.aws_env() {
        cmd.env(k, v);
    }
    cmd.env("AWS_ENDPOINT_URL_EC2", ec2);
    let out = cmd.args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Every EC2 action among `calls` is granted by the documented read-only
/// IAM policy.
fn assert_documented(calls: &[palisade::testenv::fault_proxy::Call]) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let policy: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/iam/cli-readonly-policy.json")).unwrap(),
    )
    .unwrap();
    let allowed: Vec<String> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["Action"].as_array().unwrap().iter())
        .map(|a| a.as_str().unwrap().trim_start_matches("ec2:").to_string())
        .collect();
    for c in calls {
        assert!(
            allowed.contains(&c.action),
            "{} is not in deploy/iam/cli-readonly-policy.json",
            c.action
        );
    }
}

/// The in-process controller of test `test` (its policies only).
fn controller_config(test: &str) -> Config {
    Config {
        cluster_name: "cli-tests".into(),
        resync: Duration::from_secs(60),
        stalled_retry: Duration::from_secs(600),
        concurrency: 2,
        quota: SgQuota::default(),
        policy_selector: Some(format!("{TEST_LABEL}={test}")),
        instance: Some("test-cli".into()),
        vpc_cidrs: Vec::new(),
    }
}

/// An in-process controller (the tests' own policies only).
struct InProcess {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcess {
    fn start(env: &TestEnv, client: &Client, config: Config) -> InProcess {
        let metrics = Arc::new(Metrics::default());
        let ctx = controller::context(
            client.clone(),
            Arc::new(direct(env).with_observer(metrics.ec2_observer())),
            config,
            metrics,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(controller::run(ctx, async move {
            let _ = stopped.await;
        }));
        InProcess { stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// Deletes `name` and waits until its finalizer let it go.
async fn delete_and_wait(policies: &Api<FirewallPolicy>, name: &str) {
    policies
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    eventually(&format!("{name} gone"), Duration::from_secs(60), || async {
        policies
            .get_opt(name)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_shows_group_node_and_exposure_changes_and_writes_nothing() {
    let env = env().await;
    let test = "cli-plan";
    let net = SimNet::new().unwrap();
    let a = node_of(env, &net, test, "cli-plan-a", "cli-plan-web").await;
    // An EKS-like node-group group: SSH from anywhere.
    foreign_group(
        env,
        &a,
        "cli-plan-nodegroup",
        &[(22, "0.0.0.0/0", "ssh anywhere")],
    )
    .await;

    // The live policy, applied by the real controller.
    let live = format!(
        "apiVersion: palisade.dev/v1alpha1
kind: FirewallPolicy
metadata:
  name: cli-web
  labels: {{{TEST_LABEL}: {test}}}
spec:
  nodeSelector: {{matchLabels: {{role: cli-plan-web}}}}
  policyTypes: [Ingress]
  ingress:
    - {{name: http, protocol: TCP, ports: [{{port: 80}}], peers: [{{cidr: 0.0.0.0/0}}]}}
    - {{name: admin, protocol: TCP, ports: [{{port: 8080}}], peers: [{{cidr: 10.0.0.0/8}}]}}
"
    );
    let client = env.client().await.unwrap();
    let policies: Api<FirewallPolicy> = Api::all(client.clone());
    policies
        .create(&PostParams::default(), &policy(&live))
        .await
        .unwrap();
    let ctl = InProcess::start(env, &client, controller_config(test));
    let group = eventually("cli-web attached", Duration::from_secs(60), || async {
        let p = policies.get("cli-web").await.ok()?;
        let g = p.status?.security_group?;
        (g.attached > 0).then_some(g.id)
    })
    .await;
    ctl.stop().await;

    // The change under review: 8080 goes, HTTPS from anywhere (both
    // families) comes, and a new policy opens SSH to the world.
    let dir = tempfile::tempdir().unwrap();
    let manifest = write(
        dir.path(),
        "web.yaml",
        &format!(
            "apiVersion: palisade.dev/v1alpha1
kind: FirewallPolicy
metadata:
  name: cli-web
  labels: {{{TEST_LABEL}: {test}}}
spec:
  nodeSelector: {{matchLabels: {{role: cli-plan-web}}}}
  policyTypes: [Ingress]
  ingress:
    - {{name: http, protocol: TCP, ports: [{{port: 80}}], peers: [{{cidr: 0.0.0.0/0}}]}}
    - {{name: https, protocol: TCP, ports: [{{port: 443}}], peers: [{{cidr: 0.0.0.0/0}}, {{cidr: '::/0'}}]}}
---
apiVersion: palisade.dev/v1alpha1
kind: FirewallPolicy
metadata:
  name: cli-ssh
  labels: {{{TEST_LABEL}: {test}}}
spec:
  nodeSelector: {{matchLabels: {{role: cli-plan-web}}}}
  policyTypes: [Ingress]
  ingress:
    - {{name: ssh, protocol: TCP, ports: [{{port: 22}}], peers: [{{cidr: 0.0.0.0/0}}]}}
"
        ),
    );
    let unchanged = write(dir.path(), "live.yaml", &live);

    let proxy = FaultProxy::start(&env.ec2_endpoint()).unwrap();
    let before = snapshot(&client).await;
    let literals = vec![
        (dir.path().display().to_string(), "<dir>"),
        (a.host().ipv4().to_string(), "<node-ipv4>"),
        (a.host().ipv6().to_string(), "<node-ipv6>"),
    ];

    let (code, out, err) = palisade(
        env,
        &proxy.endpoint(),
        &[
            "plan",
            "-f",
            manifest.to_str().unwrap(),
            "--detailed-exitcode",
        ],
    );
    assert_eq!(code, 3, "exposure to the internet widens: {out}\n{err}");
    assert!(
        out.contains(&group),
        "the live policy's group is planned: {out}"
    );
    check_golden("plan-widen", &normalise(&out, &literals));

    // The same as JSON, for tools: the outcome says it widens.
    let (code, out, err) = palisade(
        env,
        &proxy.endpoint(),
        &["plan", "-f", manifest.to_str().unwrap(), "--output", "json"],
    );
    assert_eq!(code, 0, "no --detailed-exitcode: success: {err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["outcome"]["internetWidened"], true, "{out}");
    assert_eq!(doc["plan"]["groups"][1]["attach"][0], "cli-plan-a", "{out}");

    // The live manifest itself: nothing to do, exit 0.
    let (code, out, err) = palisade(
        env,
        &proxy.endpoint(),
        &[
            "plan",
            "-f",
            unchanged.to_str().unwrap(),
            "--detailed-exitcode",
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    check_golden("plan-unchanged", &normalise(&out, &literals));

    // Read-only: every EC2 call a Describe/Get, no Kubernetes object changed.
    let calls = proxy.calls();
    assert!(calls.len() >= 4, "plan read EC2: {calls:?}");
    let writes: Vec<_> = calls.iter().filter(|c| c.is_mutating()).collect();
    assert!(writes.is_empty(), "plan wrote to EC2: {writes:?}");
    assert_documented(&calls);
    assert_eq!(
        snapshot(&client).await,
        before,
        "plan changed a Kubernetes object"
    );

    // An invalid manifest: exit 1, with the problem.
    let bad = write(
        dir.path(),
        "bad.yaml",
        "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {name: bad}\nspec:\n  policyTypes: [Ingress]\n  ingress:\n    - {name: x, protocol: TCP, ports: [{port: 80}], peers: [{cidr: 10.0.0.1/8}]}\n",
    );
    let (code, out, _) = palisade(
        env,
        &proxy.endpoint(),
        &["plan", "-f", bad.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{out}");

    // Clean up: the policy goes with its group (a controller is needed for
    // the finalizer), then the node.
    let ctl = InProcess::start(env, &client, controller_config(test));
    delete_and_wait(&policies, "cli-web").await;
    ctl.stop().await;
    a.delete().await.unwrap();
}

/// What one probe of the matrix is.
#[derive(Clone, Copy, Debug)]
enum Proto {
    Tcp(u16),
    Udp(u16),
    Echo,
}

impl Proto {
    fn probe(self, v6: bool) -> ProbeProtocol {
        match self {
            Proto::Tcp(port) => ProbeProtocol::Tcp { port },
            Proto::Udp(port) => ProbeProtocol::Udp { port },
            Proto::Echo if v6 => ProbeProtocol::Icmpv6 {
                icmp_type: 128,
                code: 0,
            },
            Proto::Echo => ProbeProtocol::Icmp {
                icmp_type: 8,
                code: 0,
            },
        }
    }
}

/// Whether `proto` from `from` reaches `to` (a listener is up there);
/// `receiver` is the host owning `to`.
fn reaches(receiver: &SimHost, from: &SimHost, to: IpAddr, proto: Proto) -> bool {
    let timeout = Duration::from_millis(800);
    match proto {
        Proto::Tcp(port) => {
            from.probe_tcp(SocketAddr::new(to, port), timeout).unwrap() == Reach::Open
        }
        Proto::Udp(port) => {
            from.probe_udp(SocketAddr::new(to, port), timeout).unwrap() == Reach::Open
        }
        Proto::Echo => {
            let t = if to.is_ipv4() { 8 } else { 128 };
            receiver.icmp_arrives(from, to, t, 0, timeout).unwrap()
        }
    }
}

/// The cloud layer computed here, from moto's raw answer: whether some
/// ingress (or egress) permission of some group on the interface admits
/// `proto` from (to) `peer`. Group references admit only the group's
/// members, which the peers of this test are not.
async fn union_admits(
    env: &TestEnv,
    eni: &str,
    direction: Direction,
    peer: IpAddr,
    proto: ProbeProtocol,
) -> bool {
    let ec2 = env.ec2_client();
    let interfaces = ec2
        .describe_network_interfaces()
        .network_interface_ids(eni)
        .send()
        .await
        .unwrap();
    let ids: Vec<String> = interfaces.network_interfaces()[0]
        .groups()
        .iter()
        .filter_map(|g| g.group_id().map(str::to_string))
        .collect();
    let groups = ec2
        .describe_security_groups()
        .set_group_ids(Some(ids))
        .send()
        .await
        .unwrap();
    groups.security_groups().iter().any(|g| {
        let perms = match direction {
            Direction::Ingress => g.ip_permissions(),
            Direction::Egress => g.ip_permissions_egress(),
        };
        perms.iter().any(|p| {
            let from = p.from_port().unwrap_or(-1);
            let to = p.to_port().unwrap_or(-1);
            let traffic = match (p.ip_protocol().unwrap_or_default(), proto) {
                ("-1", _) => true,
                ("tcp", ProbeProtocol::Tcp { port }) | ("udp", ProbeProtocol::Udp { port }) => {
                    from <= i32::from(port) && i32::from(port) <= to
                }
                ("icmp", ProbeProtocol::Icmp { icmp_type, .. })
                | ("icmpv6" | "58", ProbeProtocol::Icmpv6 { icmp_type, .. }) => {
                    from == -1 || from == i32::from(icmp_type)
                }
                _ => false,
            };
            let address = p
                .ip_ranges()
                .iter()
                .filter_map(|r| r.cidr_ip())
                .chain(p.ipv6_ranges().iter().filter_map(|r| r.cidr_ipv6()))
                .any(|c| c.parse::<IpNet>().unwrap().contains(&peer));
            traffic && address
        })
    })
}

/// The real agent (nft backend, no metrics) on `node`, with `extra` flags.
fn start_agent(env: &TestEnv, node: &SimNode, extra: &[&str]) -> tokio::process::Child {
    node.host()
        .tokio_command(env!("CARGO_BIN_EXE_palisade-agent"))
        .env("KUBECONFIG", env.kubeconfig_path())
        .env("NODE_NAME", node.name())
        .args(["--metrics-address", "off", "--backend", "nft"])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The node's report, once its agent applied `policy` successfully.
async fn applied(client: &Client, node: &SimNode, policy: &str) -> FirewallNodeStatus {
    let nodes: Api<FirewallNode> = Api::all(client.clone());
    eventually(
        &format!("the agent applied {policy}"),
        Duration::from_secs(60),
        || async {
            let s = nodes.get_opt(node.name()).await.ok()??.status?;
            (s.last_sync.as_ref()?.result == "Success"
                && s.policies.iter().any(|p| p.name == policy))
            .then_some(s)
        },
    )
    .await
}

/// Listeners on the node for the probes of the traffic matrices: TCP 22,
/// 80, 8080, 9000 and UDP 5353.
fn listeners(node: &SimNode) -> Vec<palisade::testenv::EchoListener> {
    [22, 80, 8080, 9000]
        .into_iter()
        .map(|port| node.host().listen_tcp(port).unwrap())
        .chain([node.host().listen_udp(5353).unwrap()])
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_agrees_with_real_packets_and_with_the_group_union() {
    let env = env().await;
    let test = "cli-explain";
    let net = SimNet::new().unwrap();
    let node = node_of(env, &net, test, "cli-exp-node", "cli-explain").await;
    let admin = net.add_host("cli-exp-admin").unwrap();
    let other = net.add_host("cli-exp-other").unwrap();
    let (admin4, other4) = (admin.ipv4(), other.ipv4());
    // A foreign group: SSH from anywhere, 8080 from the admin host only.
    foreign_group(
        env,
        &node,
        "cli-exp-nodegroup",
        &[
            (22, "0.0.0.0/0", "ssh anywhere"),
            (8080, &format!("{admin4}/32"), "admin ui"),
        ],
    )
    .await;
    let client = env.client().await.unwrap();
    let policies: Api<FirewallPolicy> = Api::all(client.clone());
    let p = policy(&format!(
        "apiVersion: palisade.dev/v1alpha1
kind: FirewallPolicy
metadata:
  name: cli-exp
  labels: {{{TEST_LABEL}: {test}}}
spec:
  nodeSelector: {{matchLabels: {{role: cli-explain}}}}
  policyTypes: [Ingress, Egress]
  ingress:
    - {{name: web, protocol: TCP, ports: [{{port: 80}}], peers: [{{cidr: 0.0.0.0/0}}, {{cidr: '::/0'}}]}}
    - {{name: ssh, protocol: TCP, ports: [{{port: 22}}], peers: [{{cidr: {other4}/32}}]}}
    - {{name: mdns, protocol: UDP, ports: [{{port: 5353}}], peers: [{{cidr: {other4}/32}}]}}
    - {{name: ping, protocol: ICMP, icmp: {{type: 8}}, peers: [{{cidr: {admin4}/32}}]}}
  egress:
    - {{name: web, protocol: TCP, ports: [{{port: 80}}], peers: [{{cidr: {admin4}/32}}]}}
"
    ));
    policies.create(&PostParams::default(), &p).await.unwrap();

    // The real agent on the node, failsafe SSH from the admin host.
    let admin_cidr = format!("{admin4}/32");
    let mut agent = start_agent(env, &node, &["--admin-cidr", &admin_cidr]);
    let reported = applied(&client, &node, "cli-exp").await;

    let mut failsafe = Failsafe::default();
    failsafe.admin_cidrs.push(admin_cidr.parse().unwrap());
    let settings = NodeSettings {
        failsafe,
        ..Default::default()
    };
    let proxy = FaultProxy::start(&env.ec2_endpoint()).unwrap();
    let ec2 = palisade::testenv::aws_ec2_for(&proxy.endpoint(), RetryPolicy::default());
    let live = read_for(&client, &ec2, node.name()).await.unwrap();
    // Compiled as the agent compiled it: the same policy hash.
    let mut problems = Vec::new();
    let rs = palisade::cli::live::ruleset(
        node.name(),
        &live.active(&mut problems),
        &live.facts(&settings),
    )
    .unwrap();
    assert_eq!(
        rs.policy_hash("cli-exp"),
        reported
            .policies
            .iter()
            .find(|p| p.name == "cli-exp")
            .map(|p| p.hash.as_str()),
    );

    let _listeners: Vec<_> = listeners(&node)
        .into_iter()
        .chain([admin.listen_tcp(80).unwrap(), other.listen_tcp(80).unwrap()])
        .collect();

    let mut cases = Vec::new();
    for peer in [&admin, &other] {
        for proto in [
            Proto::Tcp(22),
            Proto::Tcp(80),
            Proto::Tcp(8080),
            Proto::Tcp(9000),
            Proto::Udp(5353),
            Proto::Echo,
        ] {
            cases.push((Direction::Ingress, peer, IpAddr::V4(peer.ipv4()), proto));
        }
        cases.push((
            Direction::Ingress,
            peer,
            IpAddr::V6(peer.ipv6()),
            Proto::Tcp(80),
        ));
        cases.push((
            Direction::Ingress,
            peer,
            IpAddr::V6(peer.ipv6()),
            Proto::Tcp(22),
        ));
        cases.push((
            Direction::Egress,
            peer,
            IpAddr::V4(peer.ipv4()),
            Proto::Tcp(80),
        ));
    }
    let mut verdicts = BTreeMap::new();
    for (direction, peer, addr, proto) in cases {
        let q = Question {
            node: node.name().to_string(),
            direction,
            peer: addr,
            protocol: proto.probe(addr.is_ipv6()),
        };
        let e = explain(&live, &settings, &q).unwrap();
        let node_allows = matches!(
            e.node.decision.verdict,
            NodeVerdict::Accept | NodeVerdict::AuditAccept | NodeVerdict::NotFiltered
        );
        let observed = match direction {
            Direction::Ingress => {
                let to = match addr {
                    IpAddr::V4(_) => IpAddr::V4(node.host().ipv4()),
                    IpAddr::V6(_) => IpAddr::V6(node.host().ipv6()),
                };
                reaches(node.host(), peer, to, proto)
            }
            Direction::Egress => reaches(peer, node.host(), addr, proto),
        };
        let what = format!("{direction} {proto:?} {} {addr}", peer.name());
        assert_eq!(
            node_allows, observed,
            "{what}: explain says {:?}, packets say {observed}",
            e.node.decision
        );
        let union = union_admits(env, node.eni_id(), direction, addr, q.protocol).await;
        let cloud_allows = match &e.cloud {
            CloudAnswer::Allowed { .. } => true,
            CloudAnswer::Dropped { .. } => false,
            CloudAnswer::Unknown { why } => panic!("{what}: cloud unknown: {why}"),
        };
        assert_eq!(cloud_allows, union, "{what}: cloud layer {:?}", e.cloud);
        verdicts.insert(what, (node_allows, cloud_allows));
    }
    // The matrix is not one-sided: each layer allows some and drops some,
    // and the deciding rules are named.
    assert!(
        verdicts.values().any(|v| v.0) && verdicts.values().any(|v| !v.0),
        "{verdicts:#?}"
    );
    assert!(
        verdicts.values().any(|v| v.1) && verdicts.values().any(|v| !v.1),
        "{verdicts:#?}"
    );
    let q = |peer: IpAddr, port| Question {
        node: node.name().to_string(),
        direction: Direction::Ingress,
        peer,
        protocol: ProbeProtocol::Tcp { port },
    };
    let by = |q: Question| {
        explain(&live, &settings, &q)
            .unwrap()
            .node
            .decision
            .by
            .map(|b| b.rule.origin.to_string())
    };
    assert_eq!(
        by(q(IpAddr::V4(admin4), 22)).as_deref(),
        Some("failsafe/ssh")
    );
    assert_eq!(
        by(q(IpAddr::V4(other4), 22)).as_deref(),
        Some("cli-exp/ingress/ssh")
    );
    assert_eq!(
        by(q(IpAddr::V4(other4), 9000)).as_deref(),
        Some("default-drop")
    );

    // The binary: SSH from anywhere is admitted by the foreign group but
    // dropped on the node (exit 2); web from anywhere gets through (exit 0).
    let (code, out, err) = palisade(
        env,
        &proxy.endpoint(),
        &[
            "explain",
            "--node",
            node.name(),
            "--from",
            "198.51.100.7",
            "--to-port",
            "22/tcp",
            "--admin-cidr",
            &admin_cidr,
        ],
    );
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        out.contains("Cloud layer: ALLOWED") && out.contains("ssh anywhere"),
        "{out}"
    );
    assert!(out.contains("Node layer: DROPPED"), "{out}");
    println!("{out}");
    let (code, out, err) = palisade(
        env,
        &proxy.endpoint(),
        &[
            "explain",
            "--node",
            node.name(),
            "--from",
            "198.51.100.7",
            "--to-port",
            "80/tcp",
        ],
    );
    assert_eq!(
        code, 2,
        "the cloud layer drops web (no group admits 80): {out}\n{err}"
    );
    assert!(
        out.contains("Cloud layer: DROPPED") && out.contains("Node layer: ALLOWED"),
        "{out}"
    );
    // SSH from the admin host: the failsafe lets it in, and says so.
    let (code, out, err) = palisade(
        env,
        &proxy.endpoint(),
        &[
            "explain",
            "--node",
            node.name(),
            "--from",
            &admin4.to_string(),
            "--to-port",
            "22/tcp",
            "--admin-cidr",
            &admin_cidr,
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("allowed by failsafe entry ssh"), "{out}");
    println!("{out}");
    let (code, out, err) = palisade(
        env,
        &proxy.endpoint(),
        &[
            "explain",
            "--node",
            node.name(),
            "--to",
            &admin4.to_string(),
            "--to-port",
            "80/tcp",
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("allowed by policy cli-exp, egress rule web"),
        "{out}"
    );
    println!("{out}");
    let calls = proxy.calls();
    let writes: Vec<_> = calls.iter().filter(|c| c.is_mutating()).collect();
    assert!(writes.is_empty(), "explain wrote to EC2: {writes:?}");
    assert_documented(&calls);

    let _ = agent.kill().await;
    policies
        .delete("cli-exp", &DeleteParams::default())
        .await
        .unwrap();
    node.delete().await.unwrap();
}

/// Whether the exposure `lines` of a node list `proto` from the whole of
/// `scope` (entries read as `tcp/80 from 0.0.0.0/0`, `tcp/8000-8100 from …`,
/// `tcp/all ports from …`, `all traffic from …`).
fn listed(lines: &[String], proto: Proto, scope: &str) -> bool {
    let (name, port) = match proto {
        Proto::Tcp(p) => ("tcp", p),
        Proto::Udp(p) => ("udp", p),
        Proto::Echo => return false,
    };
    lines.iter().any(|line| {
        let Some((traffic, from)) = line.split_once(" from ") else {
            return false;
        };
        if from != scope {
            return false;
        }
        if traffic == "all traffic" {
            return true;
        }
        let Some(ports) = traffic.strip_prefix(name).and_then(|t| t.strip_prefix('/')) else {
            return false;
        };
        if ports == "all ports" {
            return true;
        }
        let (a, b) = ports.split_once('-').unwrap_or((ports, ports));
        a.parse::<u16>().unwrap() <= port && port <= b.parse::<u16>().unwrap()
    })
}

/// A node's `status.exposure`, written by the real controller from every
/// group on its interface and the policies' node layer, is what real
/// packets get through on the node programmed by the real agent *and* the
/// union of the interface's groups (as moto holds them) admits: probed
/// from a stranger (the whole internet, both families) and from the VPC
/// (here a one-host VPC range), for traffic that each layer alone admits,
/// both admit, and neither admits.
#[tokio::test(flavor = "multi_thread")]
async fn node_exposure_in_status_matches_real_packets_and_the_group_union() {
    let env = env().await;
    let test = "cli-exposure";
    let net = SimNet::new().unwrap();
    let node = node_of(env, &net, test, "cli-xp-node", "cli-exposure").await;
    let stranger = net.add_host("cli-xp-stranger").unwrap();
    let insider = net.add_host("cli-xp-vpc").unwrap();
    let vpc = format!("{}/32", insider.ipv4());
    // The node group: SSH and 9000 from anywhere, 8080 from the VPC.
    foreign_group(
        env,
        &node,
        "cli-xp-nodegroup",
        &[
            (22, "0.0.0.0/0", "ssh anywhere"),
            (9000, "0.0.0.0/0", "debug anywhere"),
            (8080, &vpc, "vpc ui"),
        ],
    )
    .await;
    let client = env.client().await.unwrap();
    let policies: Api<FirewallPolicy> = Api::all(client.clone());
    let p = policy(&format!(
        "apiVersion: palisade.dev/v1alpha1
kind: FirewallPolicy
metadata:
  name: cli-xp
  labels: {{{TEST_LABEL}: {test}}}
spec:
  nodeSelector: {{matchLabels: {{role: cli-exposure}}}}
  policyTypes: [Ingress]
  ingress:
    - {{name: web, protocol: TCP, ports: [{{port: 80}}], peers: [{{cidr: 0.0.0.0/0}}, {{cidr: '::/0'}}]}}
    - {{name: ssh, protocol: TCP, ports: [{{port: 22}}], peers: [{{cidr: 203.0.113.0/24}}]}}
    - {{name: ui, protocol: TCP, ports: [{{port: 8080}}], layers: [Node], peers: [{{cidr: {vpc}}}]}}
    - {{name: mdns, protocol: UDP, ports: [{{port: 5353}}], layers: [Node], peers: [{{cidr: 0.0.0.0/0}}]}}
"
    ));
    policies.create(&PostParams::default(), &p).await.unwrap();

    let mut agent = start_agent(env, &node, &[]);
    let mut config = controller_config(test);
    config.resync = Duration::from_secs(3);
    config.vpc_cidrs = vec![vpc.parse().unwrap()];
    let ctl = InProcess::start(env, &client, config);
    let nodes: Api<FirewallNode> = Api::all(client.clone());
    // Applied by the agent, attached by the controller, and an exposure
    // pass after both.
    applied(&client, &node, "cli-xp").await;
    eventually("cli-xp attached", Duration::from_secs(60), || async {
        let g = policies.get("cli-xp").await.ok()?.status?.security_group?;
        (g.attached > 0).then_some(())
    })
    .await;
    let exposure = eventually("the node's exposure", Duration::from_secs(30), || async {
        let lines = nodes.get_opt(node.name()).await.ok()??.status?.exposure;
        listed(&lines, Proto::Tcp(80), "0.0.0.0/0").then_some(lines)
    })
    .await;
    println!("exposure of {}: {exposure:#?}", node.name());

    let _listeners = listeners(&node);
    let protos = [
        Proto::Tcp(22),
        Proto::Tcp(80),
        Proto::Tcp(8080),
        Proto::Tcp(9000),
        Proto::Udp(5353),
    ];
    let mut cases = Vec::new();
    for proto in protos {
        cases.push((&stranger, IpAddr::V4(stranger.ipv4()), "0.0.0.0/0", proto));
        cases.push((&insider, IpAddr::V4(insider.ipv4()), vpc.as_str(), proto));
    }
    for proto in [Proto::Tcp(22), Proto::Tcp(80)] {
        cases.push((&stranger, IpAddr::V6(stranger.ipv6()), "::/0", proto));
    }
    let mut seen = BTreeMap::new();
    for (from, addr, scope, proto) in cases {
        let to = match addr {
            IpAddr::V4(_) => IpAddr::V4(node.host().ipv4()),
            IpAddr::V6(_) => IpAddr::V6(node.host().ipv6()),
        };
        let packets = reaches(node.host(), from, to, proto);
        let union = union_admits(
            env,
            node.eni_id(),
            Direction::Ingress,
            addr,
            proto.probe(addr.is_ipv6()),
        )
        .await;
        let status = listed(&exposure, proto, scope);
        let what = format!("{proto:?} from {scope} ({addr})");
        assert_eq!(
            status,
            packets && union,
            "{what}: status lists it: {status}; node layer lets packets in: {packets}; \
             the groups admit it: {union}\n{exposure:#?}"
        );
        seen.insert(what, (packets, union));
    }
    // Every combination of the two layers occurred.
    for combination in [(true, true), (true, false), (false, true), (false, false)] {
        assert!(
            seen.values().any(|v| *v == combination),
            "no case with (node, cloud) = {combination:?}: {seen:#?}"
        );
    }

    delete_and_wait(&policies, "cli-xp").await;
    ctl.stop().await;
    let _ = agent.kill().await;
    node.delete().await.unwrap();
}
