//! `palisade-bench-scale`: Palisade at cluster scale on the local environment,
//! counted where it counts.
//!
//! Run with `make bench-scale` (debug builds, as the tests use; `--quick` for
//! a smoke run of a few minutes). What runs:
//!
//! - **Apiserver and cloud:** the real kube-apiserver + etcd with its audit log
//!   on (level Metadata; the bench driver's own requests are not logged), and
//!   moto, behind the fault proxy that sees every EC2 call.
//! - **Nodes:** N `Node` objects shaped as an EKS node's (≈7.5 KB of JSON:
//!   EKS labels and annotations, four conditions, 18 container images, node
//!   info; the size is printed), each backed by a moto instance (its
//!   `providerID`, its primary interface, its private IP as `InternalIP`).
//!   Three of them are real: network namespaces running the real
//!   `palisade-agent`; for every other node the driver writes the node's
//!   `FirewallNode` as its agent would (every policy that selects it, at its
//!   generation and uid, after each change).
//! - **Heartbeats:** every node's status (its four conditions'
//!   `lastHeartbeatTime`) is patched once per `--heartbeat-seconds` (default
//!   60 s; a kubelet does it every 5 min when nothing changes and renews a
//!   Lease every 10 s, which no Palisade component watches — Leases are not
//!   simulated). The rate reached is printed.
//! - **Policies:** P policies: one selecting every node and one per pool (20
//!   label pools) with a cloud rule (so every node carries 2 Security
//!   Groups, within AWS's default 5 per interface), the rest node-layer:
//!   1 in 20 selecting every node, 2 in 20 a pool with a `nodeSelector` peer
//!   (another pool), the others a pool.
//! - **Controller:** the real `palisade-controller` binary (leader election
//!   off), so its RSS and CPU are its own in `/proc`.
//!
//! Requests are counted in the apiserver's audit log by user (each component
//! has its own client certificate) and by verb and resource. Bytes are
//! counted by a TCP relay in front of the apiserver, one per component: the
//! TLS bytes on the wire after gzip, as the apiserver sent and received them
//! (the audit log does not carry sizes).
//!
//! Steps: each adds nodes or policies to the previous one; then a steady
//! window of heartbeats only, then a controller restart. A closing table
//! extrapolates to 5,000 nodes × 1,000 policies from the per-event costs
//! measured, beside the targets of issue 8.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read as _, Seek as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::{StreamExt as _, stream};
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use palisade::api::{
    AppliedPolicy, FirewallNode, FirewallNodeSpec, FirewallPolicy, FirewallPolicySpec,
    FirewallRule, Layer, NodeSelector, Peer, PolicyType, PortRange, Protocol, SecurityGroupTarget,
};
use palisade::testenv::fault_proxy::{Call, FaultProxy};
use palisade::testenv::{SimNet, SimNode, StartOptions, TestEnv};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};

/// Label pools nodes are spread over (node j is in pool j % POOLS).
const POOLS: usize = 20;
/// Container images a node lists in its status (sets the Node's size).
const IMAGES: usize = 18;
/// Nodes running the real agent, in network namespaces.
const REAL_AGENTS: usize = 3;
/// EC2's token buckets (AWS's documented defaults for an account):
/// mutating actions 200 tokens refilled at 5/s, non-mutating (Describe*)
/// 100 tokens at 20/s.
const MUTATING_BURST: f64 = 200.0;
const MUTATING_REFILL: f64 = 5.0;
const DESCRIBE_BURST: f64 = 100.0;
const DESCRIBE_REFILL: f64 = 20.0;
/// Issue 8's targets.
const TARGET_AGENT_RSS_MB: f64 = 40.0;
const TARGET_CONTROLLER_RSS_MB: f64 = 300.0;
const TARGET_SCALE_UP_RATIO: f64 = 1.5;

/// The driver's requests (user `palisade-admin`) and the apiserver's own
/// are not logged: only Palisade's components are counted.
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: None
  users: ["palisade-admin", "system:apiserver"]
- level: None
  nonResourceURLs: ["/healthz*", "/readyz*", "/livez*", "/version", "/metrics"]
- level: Metadata
"#;

/// Palisade at N nodes × P policies on the local environment (see the
/// module docs).
#[derive(Debug, Parser)]
struct Args {
    /// Node counts, one step each (each step adds nodes to the last).
    #[arg(long, value_delimiter = ',', default_value = "1000,2000")]
    nodes: Vec<usize>,
    /// Policy counts: the first with every node step, then one step each at
    /// the last node count.
    #[arg(long, value_delimiter = ',', default_value = "200,1000")]
    policies: Vec<usize>,
    /// Seconds of the steady-state window after each step.
    #[arg(long, default_value_t = 60)]
    window: u64,
    /// Seconds between two status heartbeats of one node.
    #[arg(long, default_value_t = 60)]
    heartbeat_seconds: u64,
    /// Seconds a step may take to converge.
    #[arg(long, default_value_t = 1200)]
    timeout: u64,
    /// Leave `attachToNodes` unset on node-layer-only policies (by
    /// default it is `false`, as in the recorded runs); either way such a
    /// policy has no group.
    #[arg(long)]
    attach_all: bool,
    /// The agents' iptables backend. The recorded runs (docs/scale.md)
    /// used `legacy`, when `nft` still refused more than ~13 policies on a
    /// node; the default stays `legacy` so new runs compare with them.
    #[arg(long, default_value = "legacy")]
    backend: String,
    /// Smoke run: 100 then 200 nodes, 40 then 80 policies, 20 s windows.
    #[arg(long)]
    quick: bool,
    /// Run the controller and agents from this directory instead of the
    /// bench's own (e.g. `$CARGO_TARGET_DIR/release`, for the RSS of what
    /// users run: a debug binary's mapped code alone is tens of MB).
    #[arg(long)]
    binaries: Option<PathBuf>,
    /// An environment variable for the controller process (`KEY=VALUE`,
    /// repeatable), e.g. `MALLOC_ARENA_MAX=2`, or `LD_PRELOAD` of a heap
    /// profiler.
    #[arg(long = "controller-env", value_parser = key_value)]
    controller_env: Vec<(String, String)>,
    /// An environment variable for every agent process (`KEY=VALUE`,
    /// repeatable).
    #[arg(long = "agent-env", value_parser = key_value)]
    agent_env: Vec<(String, String)>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

// ---------------------------------------------------------------------------
// The workload.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    All,
    Pool(usize),
}

/// Policy number `i`: its name, whom it selects, whether it has a cloud
/// rule, and the pool its `nodeSelector` peer selects.
#[derive(Debug, Clone)]
struct Shape {
    name: String,
    scope: Scope,
    cloud: bool,
    peer_pool: Option<usize>,
}

fn shape(i: usize) -> Shape {
    let pool = (i + i / 20) % POOLS;
    let (name, scope, cloud, peer_pool) = if i == 0 {
        ("bench-all-cloud".to_string(), Scope::All, true, None)
    } else if i <= POOLS {
        (
            format!("bench-pool-cloud-{}", i - 1),
            Scope::Pool(i - 1),
            true,
            None,
        )
    } else {
        match i % 20 {
            0 => (format!("bench-all-{i}"), Scope::All, false, None),
            1 | 2 => (
                format!("bench-peer-{i}"),
                Scope::Pool(pool),
                false,
                Some((pool + 1) % POOLS),
            ),
            _ => (format!("bench-pool-{i}"), Scope::Pool(pool), false, None),
        }
    };
    Shape {
        name,
        scope,
        cloud,
        peer_pool,
    }
}

fn pool_label(pool: usize) -> String {
    format!("p{pool:02}")
}

fn selects(scope: Scope, node: usize) -> bool {
    match scope {
        Scope::All => true,
        Scope::Pool(p) => node % POOLS == p,
    }
}

fn policy_object(i: usize, attach_all: bool) -> FirewallPolicy {
    let s = shape(i);
    let mut labels = BTreeMap::from([("palisade.dev/bench".to_string(), "node".to_string())]);
    if let Scope::Pool(p) = s.scope {
        labels = BTreeMap::from([("palisade.dev/pool".to_string(), pool_label(p))]);
    }
    let peer = match s.peer_pool {
        Some(p) => Peer {
            node_selector: Some(NodeSelector {
                match_labels: Some(BTreeMap::from([(
                    "palisade.dev/pool".to_string(),
                    pool_label(p),
                )])),
                match_expressions: None,
            }),
            ..Default::default()
        },
        None => Peer {
            cidr: Some("10.0.0.0/8".into()),
            ..Default::default()
        },
    };
    let port = 20000 + u16::try_from(i % 40000).unwrap_or(0);
    FirewallPolicy::new(
        &s.name,
        FirewallPolicySpec {
            node_selector: Some(NodeSelector {
                match_labels: Some(labels),
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
                peers: vec![peer],
                layers: (!s.cloud).then(|| vec![Layer::Node]),
                ..Default::default()
            }]),
            // Kept as the recorded runs had it (docs/scale.md): a policy
            // without cloud rules once got its own (empty) group, and
            // attached, ~5 % + 4.5 % of P of them per node would have
            // exceeded AWS's 5 groups per interface. Such a policy now has
            // no group, attached or not (`--attach-all` changes nothing
            // the interfaces carry).
            security_group: (!s.cloud && !attach_all).then(|| SecurityGroupTarget {
                attach_to_nodes: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
}

fn node_name(j: usize) -> String {
    if j < REAL_AGENTS {
        format!("bench-real-{j}")
    } else {
        format!("bench-node-{j:05}")
    }
}

fn conditions(now: &str) -> serde_json::Value {
    let c = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": "2026-11-01T08:00:00Z"})
    };
    json!([
        c(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available"
        ),
        c(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure"
        ),
        c(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available"
        ),
        c(
            "Ready",
            "True",
            "KubeletReady",
            "kubelet is posting ready status"
        ),
    ])
}

/// A Node as EKS registers one (labels, annotations, conditions, images,
/// node info), ≈7.5 KB of JSON.
fn eks_node(j: usize, instance: &str, ip: &str) -> serde_json::Value {
    let name = node_name(j);
    let dns = format!("ip-{}.ec2.internal", ip.replace('.', "-"));
    let images: Vec<serde_json::Value> = (0..IMAGES)
        .map(|k| {
            let repo = format!(
                "602401143452.dkr.ecr.us-east-1.amazonaws.com/eks/workload-{k:02}"
            );
            let digest = format!("{:064x}", (k as u128 + 1) * 0x9e37_79b9_7f4a_7c15);
            json!({"names": [format!("{repo}@sha256:{digest}"), format!("{repo}:v1.{k}.0-eksbuild.1")],
                   "sizeBytes": 10_000_000 + k * 1_234_567})
        })
        .collect();
    json!({
        "metadata": {
            "name": name,
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/instance-type": "m5.large",
                "beta.kubernetes.io/os": "linux",
                "eks.amazonaws.com/capacityType": "ON_DEMAND",
                "eks.amazonaws.com/nodegroup": format!("ng-{}", pool_label(j % POOLS)),
                "eks.amazonaws.com/nodegroup-image": "ami-0123456789abcdef0",
                "eks.amazonaws.com/sourceLaunchTemplateId": "lt-0123456789abcdef0",
                "eks.amazonaws.com/sourceLaunchTemplateVersion": "1",
                "failure-domain.beta.kubernetes.io/region": "us-east-1",
                "failure-domain.beta.kubernetes.io/zone": "us-east-1a",
                "k8s.io/cloud-provider-aws": "0123456789abcdef0123456789abcdef",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": dns,
                "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": "m5.large",
                "topology.ebs.csi.aws.com/zone": "us-east-1a",
                "topology.k8s.aws/zone-id": "use1-az1",
                "topology.kubernetes.io/region": "us-east-1",
                "topology.kubernetes.io/zone": "us-east-1a",
                "palisade.dev/bench": "node",
                "palisade.dev/pool": pool_label(j % POOLS),
            },
            "annotations": {
                "alpha.kubernetes.io/provided-node-ip": ip,
                "csi.volume.kubernetes.io/nodeid": format!("{{\"ebs.csi.aws.com\":\"{instance}\"}}"),
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        },
        "spec": {"providerID": format!("aws:///us-east-1a/{instance}")},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": ip},
                {"type": "InternalDNS", "address": dns},
                {"type": "Hostname", "address": dns},
            ],
            "allocatable": {"cpu": "1930m", "ephemeral-storage": "76224326324", "hugepages-1Gi": "0",
                            "hugepages-2Mi": "0", "memory": "7291992Ki", "pods": "29"},
            "capacity": {"cpu": "2", "ephemeral-storage": "83873772Ki", "hugepages-1Gi": "0",
                         "hugepages-2Mi": "0", "memory": "7941720Ki", "pods": "29"},
            "conditions": conditions("2026-11-29T00:00:00Z"),
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "images": images,
            "nodeInfo": {
                "architecture": "amd64", "bootID": format!("{:032x}", j as u128 * 7919),
                "containerRuntimeVersion": "containerd://1.7.27", "kernelVersion": "6.1.134-152.225.amzn2023.x86_64",
                "kubeProxyVersion": "", "kubeletVersion": "v1.33.0-eks-802817d",
                "machineID": format!("ec2{:029x}", j), "operatingSystem": "linux",
                "osImage": "Amazon Linux 2023.7.20250512", "systemUUID": format!("ec2{:029x}", j),
            },
        },
    })
}

// ---------------------------------------------------------------------------
// Measuring.

/// A TCP relay in front of the apiserver counting bytes each way.
#[derive(Debug, Clone, Default)]
struct Relay {
    port: u16,
    /// Apiserver → component.
    down: Arc<AtomicU64>,
    /// Component → apiserver.
    up: Arc<AtomicU64>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::Relaxed);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

async fn relay(target: u16) -> anyhow::Result<Relay> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let r = Relay {
        port: listener.local_addr()?.port(),
        ..Relay::default()
    };
    let (down, up) = (r.down.clone(), r.up.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, up.clone()));
            tokio::spawn(pump(sr, cw, down.clone()));
        }
    });
    Ok(r)
}

/// A kubeconfig for `user` (group system:masters) whose server is `relay`.
fn kubeconfig_via(env: &TestEnv, user: &str, relay: &Relay) -> anyhow::Result<PathBuf> {
    let path = env.user_kubeconfig(user, &["system:masters"])?;
    let text = std::fs::read_to_string(&path)?.replace(
        &format!("127.0.0.1:{}", env.apiserver_port()),
        &format!("127.0.0.1:{}", relay.port),
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

/// RSS, peak RSS (bytes) and CPU seconds of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
struct ProcStat {
    rss: u64,
    hwm: u64,
    /// Of the RSS: anonymous memory (heap, stacks) and mapped files (the
    /// binary's code and the shared libraries' pages touched).
    anon: u64,
    file: u64,
    cpu: f64,
}

fn proc_stat(pid: u32, ticks: f64) -> ProcStat {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, s)| s).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3; utime 14, stime 15.
    let tick = |k: usize| {
        fields
            .get(k - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    ProcStat {
        rss: kb("VmRSS:"),
        hwm: kb("VmHWM:"),
        anon: kb("RssAnon:"),
        file: kb("RssFile:"),
        cpu: (tick(14) + tick(15)) / ticks,
    }
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

#[derive(Debug, Deserialize)]
struct AuditEvent {
    stage: String,
    verb: String,
    user: AuditUser,
    #[serde(rename = "requestURI", default)]
    request_uri: String,
    #[serde(rename = "objectRef")]
    object_ref: Option<AuditRef>,
}

#[derive(Debug, Deserialize)]
struct AuditUser {
    username: String,
}

#[derive(Debug, Deserialize)]
struct AuditRef {
    resource: Option<String>,
    subresource: Option<String>,
}

/// Requests by component, then by (verb, resource).
type Tally = BTreeMap<String, BTreeMap<(String, String), u64>>;

/// Reads the audit log from where it last stopped.
struct AuditReader {
    path: PathBuf,
    offset: u64,
}

impl AuditReader {
    /// Requests logged since the last call. A watch counts when its
    /// response starts; everything else when it completes.
    fn take(&mut self) -> anyhow::Result<Tally> {
        let mut tally = Tally::new();
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Ok(tally);
        };
        f.seek(std::io::SeekFrom::Start(self.offset))?;
        let mut text = String::new();
        f.read_to_string(&mut text)?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        self.offset += complete as u64;
        for line in text[..complete].lines() {
            let Ok(e) = serde_json::from_str::<AuditEvent>(line) else {
                continue;
            };
            let counted = if e.verb == "watch" {
                e.stage == "ResponseStarted"
            } else {
                e.stage == "ResponseComplete"
            };
            if !counted {
                continue;
            }
            let component = e
                .user
                .username
                .strip_prefix("palisade-bench-")
                .map_or_else(|| format!("other:{}", e.user.username), str::to_string);
            let resource = e.object_ref.map_or_else(
                || "-".to_string(),
                |r| match r.subresource {
                    Some(s) => format!("{}/{s}", r.resource.unwrap_or_default()),
                    None => r.resource.unwrap_or_default(),
                },
            );
            // A paginated LIST (kube's watchers ask for pages of 500) is
            // one LIST: its further pages are counted apart.
            let verb = if e.verb == "list" && e.request_uri.contains("continue=") {
                "list-page".to_string()
            } else {
                e.verb
            };
            *tally
                .entry(component)
                .or_default()
                .entry((verb, resource))
                .or_default() += 1;
        }
        Ok(tally)
    }
}

fn count(tally: &Tally, component: &str, verb: &str) -> u64 {
    tally.get(component).map_or(0, |m| {
        m.iter()
            .filter(|((v, _), _)| v == verb)
            .map(|(_, n)| n)
            .sum()
    })
}

fn count_prefix(tally: &Tally, prefix: &str, verb: &str) -> u64 {
    tally
        .keys()
        .filter(|k| k.starts_with(prefix))
        .map(|k| count(tally, k, verb))
        .sum()
}

/// Watch events the apiserver sent and their bytes (before TLS), by
/// resource, from its own metrics (`apiserver_watch_events_total`,
/// `apiserver_watch_events_sizes_sum`): only Palisade's components watch
/// these resources here.
async fn watch_events(client: &Client) -> BTreeMap<String, (f64, f64)> {
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let Ok(request) = http::Request::get("/metrics").body(Vec::new()) else {
        return out;
    };
    let Ok(text) = client.request_text(request).await else {
        return out;
    };
    for line in text.lines() {
        let total = line.starts_with("apiserver_watch_events_total{");
        let sizes = line.starts_with("apiserver_watch_events_sizes_sum{");
        if !total && !sizes {
            continue;
        }
        let Some(resource) = line
            .split("resource=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        if !WATCHED.contains(&resource) {
            continue;
        }
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        let e = out.entry(resource.to_string()).or_default();
        if total {
            e.0 += value;
        } else {
            e.1 += value;
        }
    }
    out
}

/// The resources Palisade's components watch.
const WATCHED: [&str; 4] = [
    "nodes",
    "firewallpolicies",
    "firewallnodes",
    "firewallpeerslices",
];

fn print_watch_events(before: &BTreeMap<String, (f64, f64)>, after: &BTreeMap<String, (f64, f64)>) {
    let text = after
        .iter()
        .map(|(r, (n, b))| {
            let (n0, b0) = before.get(r).copied().unwrap_or_default();
            format!("{r} {:.0} events {:.2} MB", n - n0, (b - b0) / 1e6)
        })
        .collect::<Vec<_>>()
        .join(", ");
    println!("  watch events sent (apiserver metrics, all watchers, uncompressed): {text}");
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

// ---------------------------------------------------------------------------
// The bench.

struct Component {
    name: String,
    child: Child,
    relay: Relay,
}

impl Component {
    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

/// What one step measured, kept for the closing table.
#[derive(Debug, Clone, Default)]
struct StepFigures {
    label: String,
    nodes: usize,
    policies: usize,
    added_nodes: usize,
    converge: f64,
    controller: ProcStat,
    agents: Vec<ProcStat>,
    ec2_mutating: usize,
    ec2_describe: usize,
    ec2_needed: usize,
    lists: u64,
    /// Policy and slice writes of the controller, and the most bytes one
    /// agent received in the step.
    policy_writes: u64,
    agent_down: u64,
    window_lists: u64,
    window_controller_cpu: f64,
    window_controller_down: u64,
    window_agent_down: u64,
    window_heartbeats: u64,
    window_writes: u64,
    window_seconds: f64,
}

struct Bench {
    env: &'static TestEnv,
    client: Client,
    args: Args,
    ticks: f64,
    proxy: FaultProxy,
    audit: AuditReader,
    controller: Option<Component>,
    controller_relay: Relay,
    controller_kubeconfig: PathBuf,
    controller_metrics: u16,
    agents: Vec<Component>,
    _real: Vec<SimNode>,
    /// (instance id, private IP) of node j.
    instances: Vec<(String, String)>,
    /// Node names the heartbeat task patches.
    beating: Arc<Mutex<Vec<String>>>,
    heartbeats: Arc<AtomicU64>,
    /// Policies created: (name, uid, generation, shape).
    policies: Vec<(String, String, i64, Shape)>,
    /// What each simulated agent last reported.
    reported: HashMap<String, Vec<String>>,
    figures: Vec<StepFigures>,
}

/// The directory of the controller and agent binaries (`--binaries`, else
/// the bench's own).
static BINARIES: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match BINARIES.get() {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .context("locating the binaries")?,
    };
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build with `cargo build --features testenv --bins` (add --release for --binaries .../release)",
            path.display()
        );
    }
    Ok(path)
}

/// The Cargo profile the controller and agents were built with, from
/// their directory's name (`debug`, `release`, `bench-node`).
fn build_kind() -> String {
    let dir = match BINARIES.get() {
        Some(d) => Some(d.clone()),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(PathBuf::from)),
    };
    dir.as_deref().and_then(|d| d.file_name()).map_or_else(
        || "unknown".to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn log_file(env: &TestEnv, name: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::File::create(
        env.dir().join(format!("{name}.log")),
    )?)
}

impl Bench {
    async fn start_controller(&mut self) -> anyhow::Result<()> {
        let mut endpoint_env = self.env.aws_env();
        for (k, v) in &mut endpoint_env {
            if *k == "AWS_ENDPOINT_URL_EC2" {
                *v = self.proxy.endpoint();
            }
        }
        let child = Command::new(sibling("palisade-controller")?)
            .envs(endpoint_env)
            .env("KUBECONFIG", &self.controller_kubeconfig)
            .env("RUST_LOG", "warn")
            // As the chart and manifests run it (docs/scale.md, "What
            // holds the memory"); `--controller-env` overrides it.
            .env("MALLOC_ARENA_MAX", "2")
            .envs(self.args.controller_env.iter().cloned())
            .args([
                "--cluster-name",
                "bench",
                "--identity",
                "bench",
                "--leader-election",
                "false",
                "--metrics-address",
                &format!("127.0.0.1:{}", self.controller_metrics),
            ])
            .stdout(log_file(self.env, "controller")?)
            .stderr(log_file(self.env, "controller.err")?)
            .kill_on_drop(true)
            .spawn()?;
        // Killed by the environment's watchdog if this process dies first.
        if let Some(pid) = child.id() {
            palisade::testenv::reaper::watch_pid(pid);
        }
        self.controller = Some(Component {
            name: "controller".into(),
            child,
            relay: self.controller_relay.clone(),
        });
        Ok(())
    }

    fn controller_stat(&self) -> ProcStat {
        self.controller
            .as_ref()
            .map_or_else(ProcStat::default, |c| proc_stat(c.pid(), self.ticks))
    }

    /// Each real agent's dataplane syncs so far (its
    /// `palisade_agent_sync_duration_seconds_count`, read inside its
    /// namespace); 0 when it cannot be read.
    fn agent_syncs(&self) -> Vec<u64> {
        self._real
            .iter()
            .map(|node| {
                let script = "exec 3<>/dev/tcp/127.0.0.1/9901; printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3";
                node.host()
                    .exec(&["bash", "-c", script])
                    .ok()
                    .and_then(|text| {
                        text.lines()
                            .find_map(|l| {
                                l.strip_prefix("palisade_agent_sync_duration_seconds_count ")
                            })
                            .and_then(|v| v.trim().parse::<u64>().ok())
                    })
                    .unwrap_or(0)
            })
            .collect()
    }

    fn agent_stats(&self) -> Vec<ProcStat> {
        self.agents
            .iter()
            .map(|a| proc_stat(a.pid(), self.ticks))
            .collect()
    }

    async fn reconciles(&self) -> u64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.controller_metrics);
        let Ok(mut s) =
            tokio::net::TcpStream::connect(("127.0.0.1", self.controller_metrics)).await
        else {
            return 0;
        };
        let req = format!("GET /metrics HTTP/1.0\r\nHost: {url}\r\n\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            return 0;
        }
        let mut text = String::new();
        let _ = s.read_to_string(&mut text).await;
        text.lines()
            .filter(|l| l.starts_with("palisade_controller_reconciles_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    fn bytes(&self) -> Vec<(String, u64, u64)> {
        self.controller
            .iter()
            .chain(self.agents.iter())
            .map(|c| {
                (
                    c.name.clone(),
                    c.relay.down.load(Ordering::Relaxed),
                    c.relay.up.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Runs `count` more moto instances (batches of 100, as an autoscaling
    /// group launches them).
    async fn run_instances(&mut self, count: usize) -> anyhow::Result<()> {
        let cloud = self.env.sim_cloud().await?;
        let ec2 = self.env.ec2_client();
        let want = self.instances.len() + count;
        while self.instances.len() < want {
            let n = (want - self.instances.len()).min(100);
            let run = ec2
                .run_instances()
                .image_id(&cloud.image_id)
                .instance_type(aws_sdk_ec2::types::InstanceType::M5Large)
                .min_count(n as i32)
                .max_count(n as i32)
                .subnet_id(&cloud.subnet_id)
                .send()
                .await
                .context("RunInstances")?;
            for i in run.instances() {
                self.instances.push((
                    i.instance_id().unwrap_or_default().to_string(),
                    i.private_ip_address().unwrap_or_default().to_string(),
                ));
            }
        }
        Ok(())
    }

    /// Creates Nodes `from..to` (simulated ones) and their FirewallNodes.
    async fn create_nodes(&mut self, from: usize, to: usize) -> anyhow::Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let fwns: Api<FirewallNode> = Api::all(self.client.clone());
        let objects: Vec<(usize, serde_json::Value)> = (from.max(REAL_AGENTS)..to)
            .map(|j| {
                let (id, ip) = &self.instances[j];
                (j, eks_node(j, id, ip))
            })
            .collect();
        let results: Vec<anyhow::Result<()>> = stream::iter(objects)
            .map(|(j, object)| {
                let nodes = nodes.clone();
                let fwns = fwns.clone();
                async move {
                    let node: Node = serde_json::from_value(object)?;
                    nodes.create(&PostParams::default(), &node).await?;
                    let name = node_name(j);
                    let fwn = FirewallNode::new(
                        &name,
                        FirewallNodeSpec {
                            node_name: name.clone(),
                        },
                    );
                    fwns.create(&PostParams::default(), &fwn).await?;
                    Ok(())
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for r in results {
            r?;
        }
        let mut beating = self
            .beating
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        beating.extend((from.max(REAL_AGENTS)..to).map(node_name));
        Ok(())
    }

    async fn create_policies(&mut self, from: usize, to: usize) -> anyhow::Result<()> {
        let api: Api<FirewallPolicy> = Api::all(self.client.clone());
        let attach_all = self.args.attach_all;
        let created: Vec<anyhow::Result<FirewallPolicy>> = stream::iter(from..to)
            .map(|i| {
                let api = api.clone();
                async move {
                    Ok(api
                        .create(&PostParams::default(), &policy_object(i, attach_all))
                        .await?)
                }
            })
            .buffered(16)
            .collect()
            .await;
        for (i, p) in (from..to).zip(created) {
            let p = p?;
            self.policies.push((
                shape(i).name,
                p.metadata.uid.clone().unwrap_or_default(),
                p.metadata.generation.unwrap_or(1),
                shape(i),
            ));
        }
        Ok(())
    }

    /// Writes the FirewallNode status of every simulated node whose set of
    /// policies changed, as its agent would after a sync.
    async fn report(&mut self, nodes: usize) -> anyhow::Result<usize> {
        let api: Api<FirewallNode> = Api::all(self.client.clone());
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let mut writes = Vec::new();
        for j in REAL_AGENTS..nodes {
            let mine: Vec<&(String, String, i64, Shape)> = self
                .policies
                .iter()
                .filter(|(_, _, _, s)| selects(s.scope, j))
                .collect();
            let names: Vec<String> = mine.iter().map(|p| p.0.clone()).collect();
            let name = node_name(j);
            if self.reported.get(&name) == Some(&names) {
                continue;
            }
            let applied: Vec<AppliedPolicy> = mine
                .iter()
                .map(|(n, uid, generation, _)| AppliedPolicy {
                    name: n.clone(),
                    uid: Some(uid.clone()),
                    generation: *generation,
                    hash: "0000000000000000".into(),
                    ..Default::default()
                })
                .collect();
            let status = json!({"status": {
                "backend": "nft",
                "policies": applied,
                "policyCount": applied.len(),
                "ruleCount": applied.len() * 2,
                "lastSync": {"time": now, "result": "Success"},
            }});
            writes.push((name.clone(), status));
            self.reported.insert(name, names);
        }
        let n = writes.len();
        let results: Vec<Result<FirewallNode, kube::Error>> = stream::iter(writes)
            .map(|(name, status)| {
                let api = api.clone();
                async move {
                    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for r in results {
            r?;
        }
        Ok(n)
    }

    fn expected(&self, shape: &Shape, nodes: usize) -> i32 {
        (0..nodes).filter(|j| selects(shape.scope, *j)).count() as i32
    }

    /// Policies not yet converged at `nodes` (every selected node synced,
    /// the group on every selected interface, Ready): count and a sample.
    async fn unconverged(&self, nodes: usize) -> anyhow::Result<(usize, String)> {
        let api: Api<FirewallPolicy> = Api::all(self.client.clone());
        let list = api.list(&ListParams::default()).await?;
        let by_name: HashMap<String, &FirewallPolicy> = list
            .items
            .iter()
            .filter_map(|p| Some((p.metadata.name.clone()?, p)))
            .collect();
        let mut left = 0;
        let mut sample = String::new();
        for (name, _, _, shape) in &self.policies {
            let want = self.expected(shape, nodes);
            let Some(p) = by_name.get(name) else {
                left += 1;
                continue;
            };
            let status = p.status.clone().unwrap_or_default();
            let counts = status.nodes.clone().unwrap_or_default();
            let ready = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let attached = status.security_group.as_ref().map_or(0, |g| g.attached);
            // A policy without cloud rules has no group to attach.
            let attaches = shape.cloud;
            let ok = status.observed_generation == p.metadata.generation
                && ready
                && counts.selected == want
                && counts.synced == want
                && (!attaches || attached == want);
            if !ok {
                left += 1;
                if sample.is_empty() {
                    sample = format!(
                        "{name}: ready={ready} selected={} synced={} attached={attached} want={want} {:?}",
                        counts.selected,
                        counts.synced,
                        status
                            .conditions
                            .iter()
                            .map(|c| format!("{}={} {}", c.type_, c.status, c.message))
                            .collect::<Vec<_>>()
                    );
                    sample = sample.chars().take(400).collect();
                }
            }
        }
        Ok((left, sample))
    }

    async fn wait_converged(&self, nodes: usize, since: Instant) -> anyhow::Result<f64> {
        let deadline = since + Duration::from_secs(self.args.timeout);
        let mut last_print = Instant::now();
        loop {
            let (left, sample) = self.unconverged(nodes).await?;
            if left == 0 {
                return Ok(since.elapsed().as_secs_f64());
            }
            if Instant::now() > deadline {
                bail!(
                    "{left} policies not converged after {}s; e.g. {sample} (logs in {})",
                    self.args.timeout,
                    self.env.dir().display()
                );
            }
            if last_print.elapsed() > Duration::from_secs(30) {
                eprintln!(
                    "  … {:.0}s: {left} policies to go; e.g. {sample}",
                    since.elapsed().as_secs_f64()
                );
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    fn print_requests(&self, tally: &Tally) {
        for (component, by) in tally {
            let text = by
                .iter()
                .map(|((verb, res), n)| format!("{verb} {res}={n}"))
                .collect::<Vec<_>>()
                .join(", ");
            println!("    {component:<11} {text}");
        }
    }

    /// One step: brings the cluster to `nodes` × `policies` and measures.
    async fn step(&mut self, nodes: usize, policies: usize) -> anyhow::Result<()> {
        let had_nodes = self.instances.len();
        let had_policies = self.policies.len();
        let added_nodes = nodes.saturating_sub(had_nodes);
        let label = format!("N={nodes} P={policies}");
        println!(
            "\n== step {label}: +{added_nodes} nodes, +{} policies",
            policies.saturating_sub(had_policies)
        );
        if added_nodes > 0 {
            let t = Instant::now();
            self.run_instances(added_nodes).await?;
            println!(
                "  moto: {added_nodes} instances run in {:.1}s (not counted below)",
                t.elapsed().as_secs_f64()
            );
        }
        // Settle what came before, then count from here.
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.audit.take()?;
        self.proxy.take_calls();
        let bytes0 = self.bytes();
        let c0 = self.controller_stat();
        let r0 = self.reconciles().await;
        let a0 = self.agent_stats();
        let s0 = self.agent_syncs();
        let w0 = watch_events(&self.client).await;
        let started = Instant::now();
        // Nodes first, as a cluster has them before its policies (a cloud
        // policy selecting no EC2 node yet has no VPC for its group).
        if added_nodes > 0 {
            self.create_nodes(had_nodes, nodes).await?;
        }
        if policies > had_policies {
            self.create_policies(had_policies, policies).await?;
        }
        let reports = self.report(nodes).await?;
        let written = started.elapsed().as_secs_f64();
        let converge = match self.wait_converged(nodes, started).await {
            Ok(t) => t,
            Err(e) => {
                // What the step cost until it gave up.
                let (left, _) = self.unconverged(nodes).await.unwrap_or_default();
                println!(
                    "  not converged after {:.0}s: {} of {} policies converged",
                    started.elapsed().as_secs_f64(),
                    self.policies.len().saturating_sub(left),
                    self.policies.len()
                );
                ec2_line(&self.proxy.calls(), 0);
                return Err(e);
            }
        };
        // Let the tail (status writes, EC2 reads) finish before counting.
        let tail = Instant::now();
        let mut seen = self.proxy.calls().len();
        while tail.elapsed() < Duration::from_secs(120) {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let n = self.proxy.calls().len();
            if n == seen {
                break;
            }
            seen = n;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let tally = self.audit.take()?;
        let calls = self.proxy.take_calls();
        let c1 = self.controller_stat();
        let reconciles = self.reconciles().await.saturating_sub(r0);
        let a1 = self.agent_stats();
        let s1 = self.agent_syncs();
        let bytes1 = self.bytes();
        let w1 = watch_events(&self.client).await;
        let wall = started.elapsed().as_secs_f64();
        println!(
            "  converged in {converge:.1}s (driver's writes: {written:.1}s: Node objects, policies, {reports} FirewallNode reports)"
        );
        println!("  apiserver requests (audit log), by component:");
        self.print_requests(&tally);
        println!(
            "  bytes on the wire (relay in front of the apiserver), apiserver→component / component→apiserver:"
        );
        for ((name, d1, u1), (_, d0, u0)) in bytes1.iter().zip(bytes0.iter()) {
            println!(
                "    {name:<11} {:>9.2} MB / {:>7.2} MB",
                mb(d1 - d0),
                mb(u1 - u0)
            );
        }
        print_watch_events(&w0, &w1);
        println!(
            "  controller: RSS {:.0} MB (peak {:.0} MB; now {:.0} MB anonymous, {:.0} MB mapped files), CPU {:.1}s ({:.0}% of one core over {wall:.0}s), {reconciles} reconciles",
            mb(c1.rss),
            mb(c1.hwm),
            mb(c1.anon),
            mb(c1.file),
            c1.cpu - c0.cpu,
            100.0 * (c1.cpu - c0.cpu) / wall
        );
        for (k, (st1, st0)) in a1.iter().zip(a0.iter()).enumerate() {
            println!(
                "  agent-{k}:    RSS {:.1} MB (peak {:.1} MB; {:.1} MB anonymous, {:.1} MB mapped files), CPU {:.1}s, {} dataplane syncs",
                mb(st1.rss),
                mb(st1.hwm),
                mb(st1.anon),
                mb(st1.file),
                st1.cpu - st0.cpu,
                s1.get(k)
                    .zip(s0.get(k))
                    .map_or(0, |(a, b)| a.saturating_sub(*b))
            );
        }
        let needed = self.ec2_needed(had_nodes, nodes, had_policies, policies);
        let (mutating, describe) = ec2_line(&calls, needed);
        if added_nodes == 0 && policies > had_policies {
            let added = policies - had_policies;
            println!(
                "  per new policy: {:.2} EC2 calls, converged at {:.2} policies/s",
                calls.len() as f64 / added as f64,
                added as f64 / converge.max(0.001)
            );
        }
        let lists = count(&tally, "controller", "list") + count_prefix(&tally, "agent", "list");
        let policy_writes: u64 = tally.get("controller").map_or(0, |m| {
            m.iter()
                .filter(|((v, r), _)| {
                    v == "patch"
                        && (r.starts_with("firewallpolicies")
                            || r.starts_with("firewallpeerslices"))
                })
                .map(|(_, n)| n)
                .sum()
        });
        let agent_down = bytes1
            .iter()
            .zip(bytes0.iter())
            .filter(|((n, _, _), _)| n.starts_with("agent"))
            .map(|((_, d1, _), (_, d0, _))| d1 - d0)
            .max()
            .unwrap_or(0);
        let mut fig = StepFigures {
            policy_writes,
            agent_down,
            label,
            nodes,
            policies,
            added_nodes,
            converge,
            controller: c1,
            agents: a1,
            ec2_mutating: mutating,
            ec2_describe: describe,
            ec2_needed: needed,
            lists,
            ..StepFigures::default()
        };
        self.window(&mut fig).await?;
        self.figures.push(fig);
        Ok(())
    }

    /// Mutating EC2 calls the change needs at least: a group and its rule
    /// per new cloud policy, and one ModifyNetworkInterfaceAttribute per
    /// interface whose group list changes (the whole new list at once).
    fn ec2_needed(&self, had_n: usize, n: usize, had_p: usize, p: usize) -> usize {
        let new_cloud: Vec<Shape> = (had_p..p).map(shape).filter(|s| s.cloud).collect();
        let groups = 2 * new_cloud.len();
        let interfaces = (0..n)
            .filter(|j| *j >= had_n || new_cloud.iter().any(|s| selects(s.scope, *j)))
            .count();
        groups + interfaces
    }

    /// The steady state: heartbeats only, for `--window` seconds.
    async fn window(&mut self, fig: &mut StepFigures) -> anyhow::Result<()> {
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.audit.take()?;
        self.proxy.take_calls();
        let b0 = self.bytes();
        let c0 = self.controller_stat();
        let h0 = self.heartbeats.load(Ordering::Relaxed);
        let r0 = self.reconciles().await;
        let s0 = self.agent_syncs();
        let w0 = watch_events(&self.client).await;
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(self.args.window)).await;
        let s1 = self.agent_syncs();
        let w1 = watch_events(&self.client).await;
        let secs = started.elapsed().as_secs_f64();
        let h = self.heartbeats.load(Ordering::Relaxed) - h0;
        let r = self.reconciles().await.saturating_sub(r0);
        let c1 = self.controller_stat();
        let b1 = self.bytes();
        // The audit log is written in batches of up to 1 s.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let tally = self.audit.take()?;
        let calls = self.proxy.take_calls();
        let lists = count(&tally, "controller", "list")
            + count(&tally, "controller", "list-page")
            + count_prefix(&tally, "agent", "list")
            + count_prefix(&tally, "agent", "list-page");
        let writes: u64 = tally
            .values()
            .flat_map(|m| m.iter())
            .filter(|((v, _), _)| !matches!(v.as_str(), "get" | "list" | "list-page" | "watch"))
            .map(|(_, n)| n)
            .sum();
        println!(
            "  steady {secs:.0}s: {h} Node heartbeats ({:.1}/s); LISTs from every component: {lists}; \
             other requests: {}; writes: {writes}; reconciles: {r}; EC2 calls: {}; controller CPU {:.1}%",
            h as f64 / secs,
            tally
                .values()
                .flat_map(|m| m.values())
                .sum::<u64>()
                .saturating_sub(lists),
            calls.len(),
            100.0 * (c1.cpu - c0.cpu) / secs
        );
        if !tally.is_empty() {
            self.print_requests(&tally);
        }
        let down = |name: &str| {
            let d1 = b1.iter().find(|x| x.0 == name).map_or(0, |x| x.1);
            let d0 = b0.iter().find(|x| x.0 == name).map_or(0, |x| x.1);
            d1 - d0
        };
        let agent_down = (0..self.agents.len())
            .map(|k| down(&format!("agent-{k}")))
            .max()
            .unwrap_or(0);
        println!(
            "    bytes to the controller {:.2} MB ({:.0} B per heartbeat), to one agent ≤{:.3} MB; agent dataplane syncs {:?} (resync timer included)",
            mb(down("controller")),
            down("controller") as f64 / (h.max(1) as f64),
            mb(agent_down),
            s1.iter()
                .zip(&s0)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect::<Vec<_>>()
        );
        print_watch_events(&w0, &w1);
        fig.window_lists = lists;
        fig.window_controller_cpu = c1.cpu - c0.cpu;
        fig.window_controller_down = down("controller");
        fig.window_agent_down = agent_down;
        fig.window_heartbeats = h;
        fig.window_writes = writes;
        fig.window_seconds = secs;
        Ok(())
    }

    /// The controller killed and started again (a crash or a failover):
    /// what it reads to get going, and whether it leaves the cluster as it
    /// was.
    async fn restart(&mut self) -> anyhow::Result<(BTreeMap<String, u64>, f64, usize, u64)> {
        println!("\n== controller restart (SIGKILL, then started again)");
        if let Some(mut c) = self.controller.take() {
            let pid = c.pid();
            c.child.kill().await?;
            palisade::testenv::reaper::forget_pid(pid);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.audit.take()?;
        self.proxy.take_calls();
        let d0 = self.controller_relay.down.load(Ordering::Relaxed);
        let started = Instant::now();
        self.start_controller().await?;
        // Quiet: no controller request but watches, no EC2 call and no
        // reconcile for 15 s (a reconcile that finds nothing changed makes
        // no request: counted from the controller's metrics).
        let mut tally = Tally::new();
        let mut quiet_since = Instant::now();
        let mut last_active = 0.0;
        let mut seen_calls = 0;
        let mut seen_reconciles = 0;
        while quiet_since.elapsed() < Duration::from_secs(15)
            && started.elapsed() < Duration::from_secs(self.args.timeout)
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let t = self.audit.take()?;
            let n_calls = self.proxy.calls().len();
            let n_reconciles = self.reconciles().await;
            let active = t
                .get("controller")
                .is_some_and(|m| m.keys().any(|(v, _)| v != "watch"))
                || n_calls != seen_calls
                || n_reconciles != seen_reconciles;
            seen_calls = n_calls;
            seen_reconciles = n_reconciles;
            if active {
                quiet_since = Instant::now();
                last_active = started.elapsed().as_secs_f64();
            }
            for (c, m) in t {
                for (k, n) in m {
                    *tally.entry(c.clone()).or_default().entry(k).or_default() += n;
                }
            }
        }
        let calls = self.proxy.take_calls();
        let down = self.controller_relay.down.load(Ordering::Relaxed) - d0;
        let nodes = self.instances.len();
        let (left, sample) = self.unconverged(nodes).await?;
        println!(
            "  controller busy for {last_active:.1}s after start ({seen_reconciles} reconciles), then quiet 15s; {} policies still converged{}",
            self.policies.len() - left,
            if left > 0 {
                format!(" (not: {left}; e.g. {sample})")
            } else {
                String::new()
            }
        );
        println!("  apiserver requests (audit log):");
        self.print_requests(&tally);
        let lists: BTreeMap<String, u64> = tally
            .get("controller")
            .map(|m| {
                m.iter()
                    .filter(|((v, _), _)| v == "list")
                    .map(|((_, r), n)| (r.clone(), *n))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "  LISTs by resource (further pages of 500 counted apart, as list-page): {lists:?}; {:.2} MB read",
            mb(down)
        );
        let c = self.controller_stat();
        println!(
            "  controller: RSS {:.0} MB (peak {:.0} MB; {:.0} MB anonymous, {:.0} MB mapped files) after the restart",
            mb(c.rss),
            mb(c.hwm),
            mb(c.anon),
            mb(c.file)
        );
        ec2_line(&calls, 0);
        Ok((lists, last_active, calls.len(), down))
    }
}

/// Prints the EC2 calls of a step beside the lower bound; returns
/// (mutating, describe) counts.
fn ec2_line(calls: &[Call], needed: usize) -> (usize, usize) {
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for c in calls {
        *by.entry(c.action.as_str()).or_default() += 1;
    }
    let mutating = calls.iter().filter(|c| c.is_mutating()).count();
    let describe = calls.len() - mutating;
    let max_values = calls.iter().map(|c| c.values).max().unwrap_or(0);
    let text = by
        .iter()
        .map(|(a, n)| format!("{a}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    println!(
        "  EC2 calls: {} ({mutating} mutating, {describe} describe; largest value list {max_values}): {text}",
        calls.len()
    );
    let lb = bucket_time(needed as f64, MUTATING_BURST, MUTATING_REFILL);
    let projected = bucket_time(mutating as f64, MUTATING_BURST, MUTATING_REFILL).max(bucket_time(
        describe as f64,
        DESCRIBE_BURST,
        DESCRIBE_REFILL,
    ));
    println!(
        "  EC2 lower bound: {needed} mutating calls needed → {lb:.0}s at AWS's bucket (200, +5/s); \
         these calls paced by AWS's buckets: {projected:.0}s ({})",
        if lb > 0.0 {
            format!("{:.2}× the lower bound", projected / lb)
        } else if projected > 0.0 {
            "lower bound 0 s".to_string()
        } else {
            "both 0 s".to_string()
        }
    );
    (mutating, describe)
}

/// Seconds `calls` take through a token bucket of `burst` tokens refilled
/// at `rate`/s, starting full.
fn bucket_time(calls: f64, burst: f64, rate: f64) -> f64 {
    (calls - burst).max(0.0) / rate
}

async fn heartbeat_loop(
    client: Client,
    beating: Arc<Mutex<Vec<String>>>,
    period: Duration,
    sent: Arc<AtomicU64>,
) {
    let api: Api<Node> = Api::all(client);
    let mut next = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut owed = 0.0f64;
    loop {
        tick.tick().await;
        let names: Vec<String> = {
            let Ok(all) = beating.lock() else { return };
            if all.is_empty() {
                continue;
            }
            owed += all.len() as f64 * 0.1 / period.as_secs_f64();
            let n = owed.floor() as usize;
            owed -= n as f64;
            (0..n)
                .map(|k| all[(next + k) % all.len()].clone())
                .collect()
        };
        next = next.wrapping_add(names.len());
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let patch = json!({"status": {"conditions": conditions(&now)}});
        let done: Vec<bool> = stream::iter(names)
            .map(|name| {
                let api = api.clone();
                let patch = patch.clone();
                async move {
                    api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                        .await
                        .is_ok()
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        sent.fetch_add(
            done.iter().filter(|ok| **ok).count() as u64,
            Ordering::Relaxed,
        );
    }
}

fn closing_table(figs: &[StepFigures], restart: &(BTreeMap<String, u64>, f64, usize, u64)) {
    println!("\n== Summary per step");
    println!(
        "{:<16} {:>9} {:>7} {:>9} {:>10} {:>16} {:>13}",
        "step", "converge", "LISTs", "ctl RSS", "agent RSS", "EC2 mut/needed", "steady LISTs"
    );
    for f in figs {
        println!(
            "{:<16} {:>8.1}s {:>7} {:>6.0} MB {:>7.1} MB {:>16} {:>13}",
            f.label,
            f.converge,
            f.lists,
            mb(f.controller.rss),
            f.agents.iter().map(|a| a.rss).max().map_or(0.0, mb),
            format!("{}/{}", f.ec2_mutating, f.ec2_needed),
            f.window_lists
        );
    }
    println!("\n== Extrapolation to 5,000 nodes × 1,000 policies (from the figures above)");
    let (Some(first), Some(last)) = (figs.first(), figs.last()) else {
        return;
    };
    // Controller RSS: per node from the node steps at the first P, per
    // policy from the policy steps at the last N.
    let node_steps: Vec<&StepFigures> = figs
        .iter()
        .filter(|f| f.policies == first.policies)
        .collect();
    let per_node = match (node_steps.first(), node_steps.last()) {
        (Some(a), Some(b)) if b.nodes > a.nodes => {
            (b.controller.rss as f64 - a.controller.rss as f64) / (b.nodes - a.nodes) as f64
        }
        _ => first.controller.rss as f64 / first.nodes as f64,
    };
    let policy_steps: Vec<&StepFigures> = figs.iter().filter(|f| f.nodes == last.nodes).collect();
    let per_policy = match (policy_steps.first(), policy_steps.last()) {
        (Some(a), Some(b)) if b.policies > a.policies => {
            (b.controller.rss as f64 - a.controller.rss as f64) / (b.policies - a.policies) as f64
        }
        _ => 0.0,
    };
    let (n5, p5) = (5000.0, 1000.0);
    let ctl = last.controller.rss as f64
        + per_node.max(0.0) * (n5 - last.nodes as f64)
        + per_policy.max(0.0) * (p5 - last.policies as f64);
    let agent_rss = |f: &StepFigures| f.agents.iter().map(|a| a.rss).max().unwrap_or(0) as f64;
    let agent_per_policy = match (policy_steps.first(), policy_steps.last()) {
        (Some(a), Some(b)) if b.policies > a.policies => {
            (agent_rss(b) - agent_rss(a)) / (b.policies - a.policies) as f64
        }
        _ => 0.0,
    };
    let agent_per_node = match (node_steps.first(), node_steps.last()) {
        (Some(a), Some(b)) if b.nodes > a.nodes => {
            (agent_rss(b) - agent_rss(a)) / (b.nodes - a.nodes) as f64
        }
        _ => 0.0,
    };
    let agent = agent_rss(last)
        + agent_per_policy.max(0.0) * (p5 - last.policies as f64)
        + agent_per_node.max(0.0) * (n5 - last.nodes as f64);
    let window_lists: u64 = figs.iter().map(|f| f.window_lists).sum();
    let window_secs: f64 = figs.iter().map(|f| f.window_seconds).sum();
    // Heartbeat cost in the controller.
    let hb: u64 = figs.iter().map(|f| f.window_heartbeats).sum();
    let hb_cpu: f64 = figs.iter().map(|f| f.window_controller_cpu).sum();
    let hb_bytes: u64 = figs.iter().map(|f| f.window_controller_down).sum();
    let cpu_per_hb = hb_cpu / hb.max(1) as f64;
    let bytes_per_hb = hb_bytes as f64 / hb.max(1) as f64;
    let kubelet_rate = n5 / 300.0;
    // Scale-up: the largest node step after the first.
    let scale = figs
        .iter()
        .skip(1)
        .filter(|f| f.added_nodes > 0)
        .max_by_key(|f| f.added_nodes);
    let restart_lists_max = restart.0.values().copied().max().unwrap_or(0);
    let restart_bytes_per_node = restart.3 as f64 / last.nodes as f64;

    println!(
        "{:<34} {:>14} {:>12}  formula",
        "figure at 5,000 × 1,000", "extrapolated", "target"
    );
    let row = |what: &str, value: String, target: &str, formula: String| {
        println!("{what:<34} {value:>14} {target:>12}  {formula}");
    };
    row(
        "LISTs in steady state",
        format!(
            "{:.0}/min",
            window_lists as f64 * 60.0 / window_secs.max(1.0)
        ),
        "0",
        format!(
            "measured {window_lists} in {window_secs:.0}s of heartbeats over all steps; heartbeats wake no LIST, so independent of N and P"
        ),
    );
    row(
        "controller RSS",
        format!("{:.0} MB", mb(ctl as u64)),
        &format!("≤{TARGET_CONTROLLER_RSS_MB:.0} MB"),
        format!(
            "{:.0} MB at {}×{} + {:.1} KB/node × {} + {:.1} KB/policy × {}",
            mb(last.controller.rss),
            last.nodes,
            last.policies,
            per_node / 1e3,
            5000usize.saturating_sub(last.nodes),
            per_policy / 1e3,
            1000usize.saturating_sub(last.policies)
        ),
    );
    row(
        "agent RSS (largest of 3)",
        format!("{:.1} MB", agent / 1e6),
        &format!("≤{TARGET_AGENT_RSS_MB:.0} MB"),
        format!(
            "{:.1} MB at {}×{} + {:.2} KB/policy × {} + {:.3} KB/node × {}",
            agent_rss(last) / 1e6,
            last.nodes,
            last.policies,
            agent_per_policy / 1e3,
            1000usize.saturating_sub(last.policies),
            agent_per_node / 1e3,
            5000usize.saturating_sub(last.nodes)
        ),
    );
    row(
        "controller CPU for heartbeats",
        format!("{:.1}%", 100.0 * cpu_per_hb * kubelet_rate),
        "-",
        format!(
            "{:.2} ms CPU/heartbeat × 5,000/300 s (kubelet status every 5 min); {:.1}% at one per node every 10 s",
            cpu_per_hb * 1e3,
            100.0 * cpu_per_hb * 500.0
        ),
    );
    row(
        "watch bytes to controller",
        format!("{:.0} KB/s", bytes_per_hb * kubelet_rate / 1e3),
        "-",
        format!(
            "{bytes_per_hb:.0} B/heartbeat (TLS bytes; watch events are not compressed) × 5,000/300 s"
        ),
    );
    if let Some(f) = figs.iter().max_by_key(|f| f.policy_writes) {
        let per_write = f.agent_down as f64 / f.policy_writes.max(1) as f64;
        row(
            "a policy write, to 5,000 agents",
            format!("{:.1} MB", per_write * n5 / 1e6),
            "-",
            format!(
                "{:.0} B to each agent per controller write of a policy or slice ({} writes, {:.2} MB to one agent in step {}) × 5,000 agents",
                per_write,
                f.policy_writes,
                mb(f.agent_down),
                f.label
            ),
        );
    }
    row(
        "restart: LISTs per resource",
        format!("≤{restart_lists_max}"),
        "≤1",
        format!(
            "measured at {} nodes: {:?}; independent of N",
            last.nodes, restart.0
        ),
    );
    row(
        "restart: bytes read",
        format!("{:.0} MB", restart_bytes_per_node * n5 / 1e6),
        "-",
        format!(
            "{:.1} MB at {} nodes = {:.1} KB/node × 5,000",
            mb(restart.3),
            last.nodes,
            restart_bytes_per_node / 1e3
        ),
    );
    if let Some(s) = scale {
        let per_node_calls = s.ec2_mutating as f64 / s.added_nodes as f64;
        let needed_per_node = s.ec2_needed as f64 / s.added_nodes as f64;
        let made = per_node_calls * 1000.0;
        let needed = needed_per_node * 1000.0;
        let lb = bucket_time(needed, MUTATING_BURST, MUTATING_REFILL);
        let paced = bucket_time(made, MUTATING_BURST, MUTATING_REFILL).max(bucket_time(
            s.ec2_describe as f64 / s.added_nodes as f64 * 1000.0,
            DESCRIBE_BURST,
            DESCRIBE_REFILL,
        ));
        let moto_time = s.converge / s.added_nodes as f64 * 1000.0;
        let t = paced.max(moto_time);
        row(
            "1,000-node scale-up vs EC2 bound",
            format!("{:.2}×", t / lb.max(1.0)),
            &format!("≤{TARGET_SCALE_UP_RATIO}×"),
            format!(
                "max(calls paced: ({per_node_calls:.2} mutating/node × 1,000 − 200)/5 = {paced:.0}s, measured {:.1} s/1,000 nodes on moto = {moto_time:.0}s) ÷ lower bound ({needed_per_node:.2}/node × 1,000 − 200)/5 = {lb:.0}s (measured +{} nodes)",
                s.converge / s.added_nodes as f64 * 1000.0,
                s.added_nodes
            ),
        );
    }
}

async fn bench(env: &'static TestEnv, args: Args) -> anyhow::Result<()> {
    env.install_crds(include_str!("../../crds/palisade.dev.yaml"))
        .await?;
    let client = env.client().await?;
    env.sim_cloud().await?;
    let ticks = clock_ticks();

    let proxy = FaultProxy::start(&env.ec2_endpoint())?;
    let controller_relay = relay(env.apiserver_port()).await?;
    let controller_kubeconfig =
        kubeconfig_via(env, "palisade-bench-controller", &controller_relay)?;
    let controller_metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };

    let mut b = Bench {
        env,
        client: client.clone(),
        ticks,
        proxy,
        audit: AuditReader {
            path: env.audit_log_path(),
            offset: 0,
        },
        controller: None,
        controller_relay,
        controller_kubeconfig,
        controller_metrics,
        agents: Vec::new(),
        _real: Vec::new(),
        instances: Vec::new(),
        beating: Arc::new(Mutex::new(Vec::new())),
        heartbeats: Arc::new(AtomicU64::new(0)),
        policies: Vec::new(),
        reported: HashMap::new(),
        figures: Vec::new(),
        args,
    };

    // Three real nodes: network namespaces, moto instances, Node objects,
    // the real agent in each.
    let net = SimNet::new()?;
    for j in 0..REAL_AGENTS {
        let name = node_name(j);
        let node = SimNode::create(
            env,
            &net,
            &name,
            [
                ("palisade.dev/bench", "node".to_string()),
                ("palisade.dev/pool", pool_label(j % POOLS)),
            ],
        )
        .await?;
        b.instances.push((
            node.instance_id().to_string(),
            node.host().ipv4().to_string(),
        ));
        let r = relay(env.apiserver_port()).await?;
        node.host().forward_loopback(r.port)?;
        let kubeconfig = kubeconfig_via(env, &format!("palisade-bench-agent-{j}"), &r)?;
        let child = node
            .host()
            .tokio_command(sibling("palisade-agent")?)
            .env("KUBECONFIG", &kubeconfig)
            .env("NODE_NAME", &name)
            .env("RUST_LOG", "warn")
            .envs(b.args.agent_env.iter().cloned())
            .args([
                "--metrics-address",
                "127.0.0.1:9901",
                "--backend",
                &b.args.backend,
            ])
            .stdout(log_file(env, &format!("agent-{j}"))?)
            .stderr(log_file(env, &format!("agent-{j}.err"))?)
            .kill_on_drop(true)
            .spawn()?;
        if let Some(pid) = child.id() {
            palisade::testenv::reaper::watch_pid(pid);
        }
        b.agents.push(Component {
            name: format!("agent-{j}"),
            child,
            relay: r,
        });
        b._real.push(node);
    }
    b.beating
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .extend((0..REAL_AGENTS).map(node_name));
    b.start_controller().await?;

    // One simulated node's size, as stored.
    let sample = serde_json::to_vec(&eks_node(
        REAL_AGENTS,
        "i-0123456789abcdef0",
        "198.18.100.100",
    ))?;
    println!(
        "Palisade at scale: real kube-apiserver + etcd (audit log on), moto behind the EC2 fault proxy,\n\
         the real controller binary, {REAL_AGENTS} real agents ({}) in network namespaces; {} builds.\n\
         Node objects: {} bytes of JSON each (EKS-shaped: 21 labels, 4 annotations, 4 conditions, {IMAGES} images, node info).\n\
         Heartbeats: every node's status every {}s. Policies: 1 all-nodes + {POOLS} pool policies with a cloud rule\n\
         (2 Security Groups per interface); of the rest, 1/20 all nodes, 2/20 a pool with a nodeSelector peer, 17/20 a pool (node layer).\n\
         Logs and the audit log: {}",
        b.args.backend,
        build_kind(),
        sample.len(),
        b.args.heartbeat_seconds,
        env.dir().display()
    );
    tokio::spawn(heartbeat_loop(
        client.clone(),
        b.beating.clone(),
        Duration::from_secs(b.args.heartbeat_seconds),
        b.heartbeats.clone(),
    ));

    let mut plan: Vec<(usize, usize)> = Vec::new();
    let p0 = b
        .args
        .policies
        .first()
        .copied()
        .unwrap_or(200)
        .max(POOLS + 1);
    for n in &b.args.nodes {
        plan.push(((*n).max(REAL_AGENTS), p0));
    }
    let n_last = plan.last().map_or(REAL_AGENTS, |s| s.0);
    for p in b.args.policies.iter().skip(1) {
        plan.push((n_last, *p));
    }
    for (n, p) in plan {
        b.step(n, p).await?;
    }
    let restart = b.restart().await?;
    let figures = b.figures.clone();
    closing_table(&figures, &restart);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.nodes = vec![100, 200];
        args.policies = vec![40, 80];
        args.window = 20;
    }
    if let Some(dir) = &args.binaries {
        let _ = BINARIES.set(dir.clone());
    }
    let env: &'static TestEnv = Box::leak(Box::new(
        TestEnv::start_with(StartOptions {
            audit_policy: Some(AUDIT_POLICY),
            ..StartOptions::default()
        })
        .context("starting the local environment")?,
    ));
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(env, args))
}
