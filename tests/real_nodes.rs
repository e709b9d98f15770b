//! The chart on real nodes (`make e2e`): the images `make images` built,
//! run by real kubelets with containerd (`KubeletNode`), installed with Helm
//! from `charts/palisade` unmodified apart from values. The agent pods
//! program, repair and report; packets are checked between namespaces;
//! `helm upgrade` rolls the agents while the rules stay in force; the agents'
//! metrics are scraped from another host while policies are enforced; and
//! `helm uninstall` with a policy still present leaves the nodes bare, and
//! so does Argo CD pruning the whole release without running any hook (a
//! stand-in for Argo CD's deletion: see the test). The machine is checked
//! to be as it was before.
//!
//! The controller runs in its pod too, on a third node (`role=system`),
//! against moto through the node's forwarder; so does the uninstall hook.
//!
//! Ignored by plain `cargo test`: it needs the image archives `make e2e`
//! writes (`PALISADE_E2E_IMAGES`, default `<cache>/e2e-images`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams, TypeMeta,
};
use kube::discovery::Scope;
use palisade::api::{FirewallNode, FirewallPolicy, conditions};
use palisade::testenv::{KubeletNode, Reach, SimHost, SimNet, StartOptions, TestEnv};
use serde::Deserialize;
use tokio::process::Command;

const NS: &str = "palisade-system";
const RELEASE: &str = "palisade";

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

/// Records and prints one timing of the run.
fn note(timings: &mut Vec<(&'static str, Duration)>, what: &'static str, took: Duration) {
    eprintln!("e2e timing: {what:<45} {:>6.1}s", took.as_secs_f64());
    timings.push((what, took));
}

fn ready(p: &FirewallPolicy) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.observed_generation == p.metadata.generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == conditions::READY && c.status == "True")
    })
}

/// What must be the same after the test as before: host-wide sysctls the
/// kubelet wants to change, the top-level cgroups, the host firewall and
/// the paths a kubelet and containerd write by default.
fn machine_state() -> BTreeMap<String, String> {
    let mut state = BTreeMap::new();
    for key in [
        "vm/overcommit_memory",
        "vm/panic_on_oom",
        "kernel/panic",
        "kernel/panic_on_oops",
        "kernel/keys/root_maxkeys",
        "kernel/keys/root_maxbytes",
        "net/ipv4/ip_forward",
    ] {
        let value = std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap_or_default();
        state.insert(format!("sysctl {key}"), value.trim().to_string());
    }
    let mut cgroups = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        if let Ok(entries) = std::fs::read_dir(h.path()) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    cgroups.push(e.path().display().to_string());
                }
            }
        }
    }
    cgroups.sort();
    state.insert("cgroups".into(), cgroups.join("\n"));
    for (name, cmd) in [
        ("iptables-save", "iptables-save"),
        ("ip6tables-save", "ip6tables-save"),
        ("nft", "nft list ruleset"),
        ("mounts", "findmnt -rn -o TARGET,FSTYPE"),
    ] {
        let out = std::process::Command::new("sh")
            .args(["-c", cmd])
            .output()
            .unwrap();
        // Counters change with traffic; the rules must not. Other work on
        // the machine mounts network namespaces and podman layers meanwhile.
        let text = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                !l.starts_with("/run/netns/")
                    && !l.contains("/containers/storage/")
                    && !l.contains("/podman/storage/")
            })
            .map(|l| l.split(" [").next().unwrap_or(l).to_string())
            .collect::<Vec<_>>()
            .join("\n");
        state.insert(name.into(), text);
    }
    for path in [
        "/var/lib/kubelet",
        "/var/log/containers",
        "/var/log/pods",
        "/run/containerd",
        "/var/lib/containerd",
        "/run/xtables.lock",
        "/usr/lib/modules",
        "/etc/kubernetes",
    ] {
        state.insert(
            format!("exists {path}"),
            std::path::Path::new(path).exists().to_string(),
        );
    }
    state
}

fn images_dir() -> PathBuf {
    std::env::var_os("PALISADE_E2E_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"));
            cache.join("palisade/e2e-images")
        })
}

/// Palisade's chains and sets on a node (IPv4 and IPv6), one line each.
fn palisade_state(host: &SimHost) -> Vec<String> {
    let mut lines = Vec::new();
    for save in ["iptables-save", "ip6tables-save"] {
        for backend in ["nft", "legacy"] {
            let out = host
                .exec(&[&format!(
                    "{}-{backend}-save",
                    save.trim_end_matches("-save")
                )])
                .unwrap_or_default();
            lines.extend(
                out.lines()
                    .filter(|l| l.contains("PALISADE") || l.contains("PAL-"))
                    .map(|l| format!("{save}/{backend}: {l}")),
            );
        }
    }
    let sets = host.exec(&["ipset", "list", "-n"]).unwrap_or_default();
    lines.extend(
        sets.lines()
            .filter(|l| l.starts_with("PAL-"))
            .map(|l| format!("ipset: {l}")),
    );
    lines
}

fn probe(from: &SimHost, src: &str, to: &KubeletNode, port: u16) -> Reach {
    let to = SocketAddr::new(to.host().ipv4().into(), port);
    from.probe_tcp_from(src.parse().unwrap(), to, Duration::from_millis(700))
        .unwrap()
}

/// GET http://<node>:9901/metrics from `from` (source address `src`).
fn scrape(from: &SimHost, src: &str, node: &KubeletNode) -> Option<String> {
    let url = format!("http://{}:9901/metrics", node.host().ipv4());
    from.exec(&["curl", "-sf", "-m", "3", "--interface", src, &url])
        .ok()
}

async fn daemonset_rolled(ds: &Api<DaemonSet>, name: &str, want: i32) -> bool {
    let Ok(d) = ds.get(name).await else {
        return false;
    };
    let Some(s) = d.status else { return false };
    s.observed_generation == d.metadata.generation
        && s.desired_number_scheduled == want
        && s.updated_number_scheduled == Some(want)
        && s.number_available == Some(want)
        && s.number_unavailable.unwrap_or(0) == 0
}

/// Argo CD's sync wave of a rendered object (`argocd.argoproj.io/sync-wave`,
/// default 0).
fn sync_wave(object: &serde_json::Value) -> i64 {
    object["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]
        .as_str()
        .and_then(|w| w.parse().ok())
        .unwrap_or(0)
}

/// A hook, not a resource: Argo CD applies and deletes it only in its
/// hook phase.
fn is_hook(object: &serde_json::Value) -> bool {
    let annotations = &object["metadata"]["annotations"];
    !annotations["helm.sh/hook"].is_null() || !annotations["argocd.argoproj.io/hook"].is_null()
}

async fn dynamic_api(client: &kube::Client, object: &serde_json::Value) -> Api<DynamicObject> {
    let types: TypeMeta = serde_json::from_value(object.clone()).unwrap();
    let gvk = GroupVersionKind::try_from(&types).unwrap();
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await.unwrap();
    match (caps.scope, object["metadata"]["namespace"].as_str()) {
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
        (Scope::Namespaced, None) => Api::namespaced_with(client.clone(), NS, &resource),
        (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
    }
}

/// One sync wave of an Argo CD Application's deletion (a stand-in, see
/// `the_chart_on_real_nodes`): every object of the wave deleted in one
/// pass with Argo CD's default propagation (foreground: a workload's pods
/// go before it does), then a wait until all of them are gone — Argo CD
/// starts the next, lower wave only then. Panics, naming what is left,
/// if the wave is wedged.
async fn delete_wave(client: &kube::Client, wave: &[serde_json::Value], timeout: Duration) {
    let mut apis = Vec::new();
    for object in wave {
        let api = dynamic_api(client, object).await;
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        match api.delete(&name, &DeleteParams::foreground()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => panic!("deleting {} {name}: {e}", object["kind"]),
        }
        apis.push((
            format!("{} {name}", object["kind"].as_str().unwrap()),
            api,
            name,
        ));
    }
    let start = Instant::now();
    loop {
        let mut left = Vec::new();
        for (what, api, name) in &apis {
            if api.get_opt(name).await.unwrap().is_some() {
                left.push(what.clone());
            }
        }
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "the prune is wedged: still there after {}s: {}",
            timeout.as_secs(),
            left.join(", ")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the images: run by `make e2e`"]
async fn the_chart_on_real_nodes() {
    let before = machine_state();
    let t0 = Instant::now();
    let mut timings: Vec<(&str, Duration)> = Vec::new();
    let images = ["pause", "agent", "controller"]
        .map(|i| images_dir().join(format!("{i}.tar")))
        .to_vec();
    for i in &images {
        assert!(
            i.is_file(),
            "{} missing: run `make e2e` (it builds the images first)",
            i.display()
        );
    }

    let env = TestEnv::start_with(StartOptions {
        real_pods: true,
        ..StartOptions::default()
    })
    .unwrap();
    env.start_controller_manager().await.unwrap();
    env.start_scheduler().await.unwrap();
    let client = env.client().await.unwrap();
    note(&mut timings, "control plane", t0.elapsed());

    let net = SimNet::new().unwrap();
    let started = Instant::now();
    let (web1, web2, system) = tokio::join!(
        KubeletNode::start(&env, &net, "web-1", &[("role", "web")], &images),
        KubeletNode::start(&env, &net, "web-2", &[("role", "web")], &images),
        KubeletNode::start(&env, &net, "system-1", &[("role", "system")], &images),
    );
    let (web1, web2, system) = (web1.unwrap(), web2.unwrap(), system.unwrap());
    let nodes = [&web1, &web2];
    note(
        &mut timings,
        "3 nodes Ready (images imported)",
        started.elapsed(),
    );

    let office = net.add_host("office").unwrap();
    office
        .add_address("203.0.113.10/24".parse().unwrap())
        .unwrap();
    let outside = net.add_host("outside").unwrap();
    outside
        .add_address("198.51.100.7/24".parse().unwrap())
        .unwrap();
    let monitor = net.add_host("monitor").unwrap();
    let monitor_ip = monitor.ipv4().to_string();
    let _ssh = web1.host().listen_tcp(22).unwrap();
    let _http = web1.host().listen_tcp(80).unwrap();

    // Install as a user would, with values only.
    let started = Instant::now();
    let mut values: Vec<String> = [
        "clusterName=e2e",
        "image.registry=localhost",
        "image.pullPolicy=Never",
        "controller.image.tag=local",
        "agent.image.tag=local",
        "agent.resyncSeconds=2",
        "controller.replicas=1",
        "controller.nodeSelector.role=system",
        "controller.region=us-east-1",
        "uninstall.timeoutSeconds=120",
    ]
    .map(String::from)
    .to_vec();
    values.push(format!("agent.clusterCidrs={{{monitor_ip}/32}}"));
    // moto, through the node's forwarder, for the controller's pod.
    let aws = env
        .aws_env()
        .into_iter()
        .filter(|(name, _)| *name != "AWS_EC2_METADATA_DISABLED");
    for (i, (name, value)) in aws.enumerate() {
        let value = if name == "AWS_ENDPOINT_URL_EC2" {
            KubeletNode::ec2_endpoint_for_pods(&env)
        } else {
            value
        };
        values.push(format!("controller.env[{i}].name={name}"));
        values.push(format!("controller.env[{i}].value={value}"));
    }
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    env.helm_install(RELEASE, NS, &values).await.unwrap();
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    let ds_name = format!("{RELEASE}-agent");
    eventually(
        &format!(
            "the agent DaemonSet Available (node logs in {})",
            web1.dir().display()
        ),
        Duration::from_secs(120),
        || daemonset_rolled(&ds, &ds_name, 3),
    )
    .await;

    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), NS);
    eventually(
        &format!(
            "the controller Deployment Available (node logs in {})",
            system.dir().display()
        ),
        Duration::from_secs(120),
        || async {
            deployments
                .get(&format!("{RELEASE}-controller"))
                .await
                .ok()
                .and_then(|d| d.status)
                .and_then(|s| s.available_replicas)
                == Some(1)
        },
    )
    .await;
    note(
        &mut timings,
        "helm install → agents and controller Available",
        started.elapsed(),
    );

    // A policy: programmed by the real agent pods, reported, enforced.
    let policies = Api::<FirewallPolicy>::all(client.clone());
    let mut policy: FirewallPolicy =
        serde_yaml::from_str(include_str!("../deploy/examples/web-server.yaml")).unwrap();
    policy.metadata.name = Some("web".into());
    let started = Instant::now();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    eventually(
        &format!("the policy Ready (logs in {})", env.dir().display()),
        Duration::from_secs(60),
        || {
            let policies = policies.clone();
            async move { policies.get("web").await.is_ok_and(|p| ready(&p)) }
        },
    )
    .await;
    note(
        &mut timings,
        "policy applied → Ready on 2 nodes",
        started.elapsed(),
    );
    let status = policies.get("web").await.unwrap().status.unwrap();
    assert_eq!(
        status.nodes.as_ref().map(|n| (n.selected, n.synced)),
        Some((2, 2))
    );
    let sg = status.security_group.clone().expect("a Security Group");
    let fwn = Api::<FirewallNode>::all(client.clone());
    for node in nodes {
        let reported = fwn.get(node.name()).await.unwrap().status.unwrap();
        assert_eq!(
            reported
                .policies
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["web"],
            "{}",
            node.name()
        );
        assert!(reported.rule_count > 0);
        assert!(!palisade_state(node.host()).is_empty());
    }
    assert_eq!(probe(&office, "203.0.113.10", &web1, 22), Reach::Open);
    assert_eq!(probe(&outside, "198.51.100.7", &web1, 80), Reach::Open);
    assert_ne!(probe(&outside, "198.51.100.7", &web1, 22), Reach::Open);

    // Metrics from another host while the policy is enforced: the agent's
    // port is in the failsafe for the cluster (here the monitor's address),
    // and closed to everyone else.
    for node in nodes {
        let body = scrape(&monitor, &monitor_ip, node)
            .unwrap_or_else(|| panic!("scraping {} from the monitor host", node.name()));
        assert!(body.contains("palisade_agent_"), "{body}");
    }
    assert_eq!(scrape(&outside, "198.51.100.7", &web1), None);

    // Repair: flush Palisade's input chain behind the agent's back.
    let repairs_before = fwn
        .get(web1.name())
        .await
        .unwrap()
        .status
        .unwrap()
        .drift_repairs;
    let rules_before = palisade_state(web1.host());
    let started = Instant::now();
    let backend = fwn
        .get(web1.name())
        .await
        .unwrap()
        .status
        .unwrap()
        .backend
        .unwrap_or_else(|| "nft".into());
    web1.host()
        .exec(&[&format!("iptables-{backend}"), "-w", "-F", "PALISADE-INPUT"])
        .unwrap();
    // (The agent may already have put it back: `nft monitor` wakes it.)
    eventually(
        "the agent to repair the flushed chain",
        Duration::from_secs(30),
        || {
            let fwn = fwn.clone();
            let node = web1.name().to_string();
            let host = web1.host();
            let rules_before = &rules_before;
            async move {
                palisade_state(host) == *rules_before
                    && fwn
                        .get(&node)
                        .await
                        .ok()
                        .and_then(|n| n.status)
                        .is_some_and(|s| s.drift_repairs > repairs_before)
            }
        },
    )
    .await;
    note(
        &mut timings,
        "chain flushed → repaired and reported",
        started.elapsed(),
    );
    assert_ne!(probe(&outside, "198.51.100.7", &web1, 22), Reach::Open);

    // helm upgrade rolls every agent pod; the rules stay in force meanwhile.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let agent_pods = ListParams::default().labels("app.kubernetes.io/component=agent");
    let old: Vec<String> = pods
        .list(&agent_pods)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.uid)
        .collect();
    let done = AtomicBool::new(false);
    let opened = AtomicUsize::new(0);
    let probes = AtomicUsize::new(0);
    let target = SocketAddr::new(web1.host().ipv4().into(), 22);
    let from = "198.51.100.7".parse().unwrap();
    let chart = palisade::testenv::chart_dir();
    let started = Instant::now();
    let upgrade = async {
        let out = Command::new(palisade::testenv::testbin("helm").unwrap())
            .env("KUBECONFIG", env.kubeconfig_path())
            .env("HELM_CACHE_HOME", env.dir().join("helm-cache"))
            .env("HELM_CONFIG_HOME", env.dir().join("helm-config"))
            .args(["upgrade", RELEASE])
            .arg(&chart)
            .args([
                "--namespace",
                NS,
                "--reuse-values",
                "--set",
                "agent.podAnnotations.rollout=second",
            ])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "helm upgrade: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eventually("the agents rolled", Duration::from_secs(120), || async {
            daemonset_rolled(&ds, &ds_name, 3).await
                && pods.list(&agent_pods).await.is_ok_and(|l| {
                    l.items.len() == 3
                        && l.items
                            .iter()
                            .all(|p| p.metadata.uid.as_ref().is_some_and(|u| !old.contains(u)))
                })
        })
        .await;
        done.store(true, Ordering::Relaxed);
    };
    let watch = async {
        while !done.load(Ordering::Relaxed) {
            if outside
                .probe_tcp_from(from, target, Duration::from_millis(300))
                .unwrap()
                == Reach::Open
            {
                opened.fetch_add(1, Ordering::Relaxed);
            }
            probes.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::join!(upgrade, watch);
    note(
        &mut timings,
        "helm upgrade → 3 agents rolled",
        started.elapsed(),
    );
    assert!(probes.load(Ordering::Relaxed) > 0);
    assert_eq!(
        opened.load(Ordering::Relaxed),
        0,
        "SSH from outside opened during the rollout ({} probes)",
        probes.load(Ordering::Relaxed)
    );
    assert_eq!(probe(&office, "203.0.113.10", &web1, 22), Reach::Open);
    assert_ne!(probe(&outside, "198.51.100.7", &web1, 22), Reach::Open);

    // helm uninstall with the policy still there: the hook deletes it and
    // waits; the nodes end bare and the Security Group is gone.
    let started = Instant::now();
    env.helm(&[
        "uninstall",
        RELEASE,
        "--namespace",
        NS,
        "--wait",
        "--timeout",
        "180s",
    ])
    .unwrap();
    note(
        &mut timings,
        "helm uninstall (hook included)",
        started.elapsed(),
    );
    assert!(
        policies
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    eventually("the agent pods gone", Duration::from_secs(60), || async {
        pods.list(&agent_pods)
            .await
            .is_ok_and(|l| l.items.is_empty())
    })
    .await;
    for node in nodes {
        assert_eq!(
            palisade_state(node.host()),
            Vec::<String>::new(),
            "{} kept Palisade's rules",
            node.name()
        );
    }
    assert_eq!(probe(&outside, "198.51.100.7", &web1, 22), Reach::Open);
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

    // Argo CD pruning the whole release: the chart installed again as an
    // Argo CD Application renders it (`helm template --include-crds`,
    // hooks left out, applied with kubectl), a policy enforced, then the
    // Application deleted with cascade. No hook runs: Argo CD before v3.3
    // ignores Helm's pre-delete hooks, and Flux's kustomize-controller
    // runs none. A STAND-IN for Argo CD's deletion, not Argo CD itself:
    // its engine (github.com/argoproj/argo-cd/gitops-engine) does not
    // build here, so `delete_wave` does what its Application deletion
    // does — reverse sync-wave order, each wave deleted in one pass with
    // foreground propagation and gone before the next. The chart puts the
    // CRDs, ServiceAccounts and RBAC in wave -1, so the workloads stop
    // first, while the policy still exists: only the agents (their
    // DaemonSet being deleted) can leave the nodes bare, and only the
    // controller (its Deployment being deleted) can delete the Security
    // Group and release the finalizer the CRD deletion would wait on.
    let chart_path = chart.to_string_lossy().to_string();
    let mut template = vec![
        "template",
        RELEASE,
        chart_path.as_str(),
        "--namespace",
        NS,
        "--include-crds",
    ];
    for v in &values {
        template.extend(["--set", v]);
    }
    let rendered = env.helm(&template).unwrap();
    let (hooks, objects): (Vec<serde_json::Value>, Vec<serde_json::Value>) =
        serde_yaml::Deserializer::from_str(&rendered)
            .map(|doc| serde_json::Value::deserialize(doc).unwrap())
            .filter(|o| !o.is_null())
            .partition(is_hook);
    assert!(!hooks.is_empty(), "the chart's uninstall hook was rendered");
    let manifest = env.dir().join("argocd-app.yaml");
    std::fs::write(
        &manifest,
        objects
            .iter()
            .map(|o| serde_yaml::to_string(o).unwrap())
            .collect::<Vec<_>>()
            .join("---\n"),
    )
    .unwrap();
    let started = Instant::now();
    let out = env
        .kubectl()
        .unwrap()
        .args(["apply", "--server-side", "--force-conflicts"])
        .args(["--field-manager", "argocd-controller", "-f"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(
        "the agents Available again",
        Duration::from_secs(120),
        || daemonset_rolled(&ds, &ds_name, 3),
    )
    .await;
    eventually(
        "the controller Available again",
        Duration::from_secs(120),
        || async {
            deployments
                .get(&format!("{RELEASE}-controller"))
                .await
                .ok()
                .and_then(|d| d.status)
                .and_then(|s| s.available_replicas)
                == Some(1)
        },
    )
    .await;
    policy.metadata.resource_version = None;
    policy.metadata.uid = None;
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    eventually("the policy Ready again", Duration::from_secs(60), || {
        let policies = policies.clone();
        async move { policies.get("web").await.is_ok_and(|p| ready(&p)) }
    })
    .await;
    note(
        &mut timings,
        "applied as Argo CD would → policy Ready",
        started.elapsed(),
    );
    let sg = policies
        .get("web")
        .await
        .unwrap()
        .status
        .unwrap()
        .security_group
        .expect("a Security Group");
    for node in nodes {
        assert!(!palisade_state(node.host()).is_empty());
    }
    assert_ne!(probe(&outside, "198.51.100.7", &web1, 22), Reach::Open);

    let mut waves: BTreeMap<i64, Vec<serde_json::Value>> = BTreeMap::new();
    for o in objects {
        waves.entry(sync_wave(&o)).or_default().push(o);
    }
    assert_eq!(
        waves.keys().copied().collect::<Vec<_>>(),
        [-1, 0],
        "the chart's waves"
    );
    let started = Instant::now();
    delete_wave(&client, &waves[&0], Duration::from_secs(120)).await;
    note(
        &mut timings,
        "prune wave 0 (workloads) → gone",
        started.elapsed(),
    );
    assert!(
        pods.list(&agent_pods).await.unwrap().items.is_empty(),
        "agent pods left"
    );
    for node in nodes {
        assert_eq!(
            palisade_state(node.host()),
            Vec::<String>::new(),
            "{} kept Palisade's rules after its agent's DaemonSet was pruned",
            node.name()
        );
    }
    assert_eq!(probe(&outside, "198.51.100.7", &web1, 22), Reach::Open);
    let groups = env
        .ec2_client()
        .describe_security_groups()
        .group_ids(&sg.id)
        .send()
        .await;
    assert!(
        groups.is_err() || groups.unwrap().security_groups().is_empty(),
        "{} still exists after the controller's Deployment was pruned",
        sg.id
    );
    let released = policies.get("web").await.unwrap();
    assert!(
        !released
            .metadata
            .finalizers
            .unwrap_or_default()
            .iter()
            .any(|f| f == palisade::controller::FINALIZER),
        "the policy still holds the controller's finalizer"
    );
    let started = Instant::now();
    delete_wave(&client, &waves[&-1], Duration::from_secs(60)).await;
    note(
        &mut timings,
        "prune wave -1 (CRDs, identities) → gone",
        started.elapsed(),
    );

    let started = Instant::now();
    drop(web1);
    drop(web2);
    drop(system);
    note(&mut timings, "3 nodes torn down", started.elapsed());
    drop(env);
    note(&mut timings, "total", t0.elapsed());
    eprintln!("e2e timings:");
    for (what, took) in &timings {
        eprintln!("  {what:<45} {:>6.1}s", took.as_secs_f64());
    }
    let after = machine_state();
    for (key, value) in &before {
        assert_eq!(after.get(key), Some(value), "the machine changed: {key}");
    }
}

/// One node on its own: Ready in seconds, runs a pod with its own network
/// (the pause image only), and leaves nothing behind once dropped — the
/// quick check of `KubeletNode`'s containment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the images: run by `make e2e`"]
async fn a_node_runs_a_pod_and_leaves_no_trace() {
    let before = machine_state();
    let env = TestEnv::start_with(StartOptions {
        real_pods: true,
        ..StartOptions::default()
    })
    .unwrap();
    env.start_controller_manager().await.unwrap();
    env.start_scheduler().await.unwrap();
    let net = SimNet::new().unwrap();
    let images = vec![images_dir().join("pause.tar")];
    let node = KubeletNode::start(&env, &net, "solo-1", &[("role", "web")], &images)
        .await
        .unwrap();
    let client = env.client().await.unwrap();
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), "default");
    eventually(
        "the default ServiceAccount",
        Duration::from_secs(30),
        || async { accounts.get_opt("default").await.ok().flatten().is_some() },
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "sleeper"},
        "spec": {"containers": [{"name": "sleeper", "image": "localhost/palisade/pause:e2e",
                                 "imagePullPolicy": "Never"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let took = eventually(
        &format!("the pod running (logs in {})", node.dir().display()),
        Duration::from_secs(60),
        || async {
            pods.get("sleeper")
                .await
                .ok()
                .and_then(|p| p.status)
                .is_some_and(|s| {
                    s.phase.as_deref() == Some("Running")
                        && s.pod_ip
                            .as_deref()
                            .is_some_and(|ip| ip.starts_with("10.244."))
                })
        },
    )
    .await;
    eprintln!(
        "e2e timing: pod Running with its own address in {:.1}s",
        took.as_secs_f64()
    );
    let cgroup = node.cgroup_root().to_string();
    drop(node);
    drop(env);
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        assert!(!h.path().join(cgroup.trim_start_matches('/')).exists());
    }
    let after = machine_state();
    for (key, value) in &before {
        assert_eq!(after.get(key), Some(value), "the machine changed: {key}");
    }
}
