//! The Helm chart: lint, a values matrix, a render with no flags as CI runs
//! it, and install / upgrade / uninstall into a real kube-apiserver, with
//! least-privilege RBAC (the agent's Events included) checked by
//! `kubectl auth can-i` as each service account and the admission policies
//! refusing what they must.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use palisade::api::{FirewallNode, FirewallNodeSpec, FirewallPolicy};
use palisade::testenv::{TestEnv, client_from_kubeconfig, testbin};

const NS: &str = "palisade-system";
const RELEASE: &str = "palisade";

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/palisade")
}

fn helm(env: Option<&TestEnv>, args: &[&str]) -> Output {
    let mut cmd = Command::new(testbin("helm").unwrap());
    cmd.args(args).env(
        "HELM_CACHE_HOME",
        std::env::temp_dir().join("palisade-helm-cache"),
    );
    if let Some(env) = env {
        cmd.env("KUBECONFIG", env.kubeconfig_path());
    }
    cmd.output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn chart_crds_are_the_generated_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chart =
        std::fs::read_to_string(root.join("charts/palisade/crds/palisade.dev.yaml")).unwrap();
    assert!(
        chart == palisade::api::crds_yaml().unwrap(),
        "charts/palisade/crds is stale: run `make crds`"
    );
}

#[test]
fn lint_and_values_matrix() {
    let c = chart();
    let c = c.to_str().unwrap();
    ok(helm(
        None,
        &["lint", "--strict", c, "--set", "clusterName=test"],
    ));
    let matrix: &[&[&str]] = &[
        &["clusterName=a"],
        &[
            "clusterName=a",
            "controller.podDisruptionBudget.enabled=true",
            "metrics.serviceMonitor.enabled=true",
        ],
        &[
            "clusterName=a",
            "metrics.prometheusRule.enabled=true",
            "metrics.prometheusRule.labels.release=kube-prometheus-stack",
            "metrics.prometheusRule.alertLabels.team=platform",
        ],
        &[
            "clusterName=a",
            "agent.adminCidrs={203.0.113.0/24,2001:db8::/32}",
            "agent.backend=legacy",
        ],
        &[
            "clusterName=a",
            "admissionPolicies.enabled=false",
            "metrics.service.enabled=false",
        ],
        &[
            "clusterName=a",
            "controller.serviceAccount.create=false",
            "controller.serviceAccount.name=existing",
        ],
        &[
            "clusterName=a",
            "controller.serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/p",
        ],
    ];
    for values in matrix {
        let mut args = vec![
            "template",
            RELEASE,
            c,
            "--kube-version",
            "1.37.2",
            "--namespace",
            NS,
        ];
        for v in *values {
            args.extend(["--set", v]);
        }
        let rendered = ok(helm(None, &args));
        for doc in serde_yaml::Deserializer::from_str(&rendered) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            if v.is_null() {
                continue;
            }
            let labels = &v["metadata"]["labels"];
            assert_eq!(
                labels["app.kubernetes.io/name"], "palisade",
                "{values:?}: {}",
                v["kind"]
            );
        }
        let pdb = values.iter().any(|v| v.contains("podDisruptionBudget"));
        assert_eq!(
            rendered.contains("kind: PodDisruptionBudget"),
            pdb,
            "{values:?}"
        );
        let rule = values
            .iter()
            .any(|v| v.contains("prometheusRule.enabled=true"));
        assert_eq!(
            rendered.contains("kind: PrometheusRule"),
            rule,
            "{values:?}"
        );
        let vap = !values
            .iter()
            .any(|v| v.contains("admissionPolicies.enabled=false"));
        assert_eq!(
            rendered.contains("kind: ValidatingAdmissionPolicy\n"),
            vap,
            "{values:?}"
        );
    }
    // The schema refuses what would not work.
    for bad in [
        &["agent.backend=iptables"][..],
        &["clusterName="][..],
        &["controller.replicas=0", "clusterName=a"][..],
        &["metrics.prometheusRule.runbookUrl=docs/runbook.md"][..],
    ] {
        let mut args = vec!["template", RELEASE, c, "--kube-version", "1.37.2"];
        for v in bad {
            args.extend(["--set", v]);
        }
        let out = helm(None, &args);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("schema"),
            "{bad:?}"
        );
    }
}

/// Images pinned by digest (as the release workflow packages the chart),
/// and the uninstall hook: a pre-delete (and Argo CD PreDelete) Job running
/// the controller image with `--uninstall`, off with
/// `uninstall.deletePolicies=false`, and never in the plain manifests (where
/// `kubectl apply` would run it at once).
#[test]
fn image_digests_and_the_uninstall_hook() {
    let c = chart();
    let c = c.to_str().unwrap();
    let digest = format!("sha256:{}", "ab".repeat(32));
    let agent = format!("agent.image.digest={digest}");
    let rendered = ok(helm(
        None,
        &[
            "template",
            RELEASE,
            c,
            "--set",
            "clusterName=a",
            "--set",
            &agent,
            "--set",
            "image.registry=registry.example/team",
        ],
    ));
    assert!(
        rendered.contains(&format!(
            "image: registry.example/team/palisade/agent@{digest}\n"
        )),
        "{rendered}"
    );
    assert!(rendered.contains("image: registry.example/team/palisade/controller:"));
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect();
    let job = docs
        .iter()
        .find(|d| d["kind"] == "Job")
        .expect("the uninstall hook Job");
    assert_eq!(job["metadata"]["annotations"]["helm.sh/hook"], "pre-delete");
    assert_eq!(
        job["metadata"]["annotations"]["argocd.argoproj.io/hook"],
        "PreDelete"
    );
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert!(
        container["image"]
            .as_str()
            .unwrap()
            .contains("/palisade/controller:")
    );
    assert_eq!(container["args"][0], "--uninstall");
    // Every object of the hook is a hook, so none is applied on install.
    for d in docs
        .iter()
        .filter(|d| d["metadata"]["name"] == format!("{RELEASE}-uninstall"))
    {
        assert_eq!(
            d["metadata"]["annotations"]["helm.sh/hook"], "pre-delete",
            "{d}"
        );
    }
    let off = ok(helm(
        None,
        &[
            "template",
            RELEASE,
            c,
            "--set",
            "clusterName=a",
            "--set",
            "uninstall.deletePolicies=false",
        ],
    ));
    assert!(!off.contains("kind: Job"));
    let manifests = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/manifests/palisade.yaml"),
    )
    .unwrap();
    assert!(!manifests.contains("kind: Job"));
    assert!(!manifests.contains("helm.sh/hook"));
}

/// `helm template charts/palisade` as a CI pipeline runs it: no release
/// name, no values, no `--kube-version` (Helm then assumes an old
/// Kubernetes, which a `kubeVersion:` constraint would refuse).
#[test]
fn renders_with_no_flags_as_ci_would() {
    let out = Command::new(testbin("helm").unwrap())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("palisade-helm-cache"),
        )
        .args(["template", "charts/palisade"])
        .output()
        .unwrap();
    let rendered = ok(out);
    let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|doc| {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            v["kind"].as_str().unwrap_or_default().to_string()
        })
        .filter(|k| !k.is_empty())
        .collect();
    for kind in [
        "Deployment",
        "DaemonSet",
        "ClusterRole",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
    // The prometheus-operator objects are opt-in: a cluster without its
    // CRDs installs the defaults.
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        assert!(!kinds.iter().any(|k| k == kind), "{kind} by default");
    }
}

fn can_i(env: &TestEnv, sa: &str, verb: &str, resource: &str) -> bool {
    can_i_in(env, NS, sa, verb, resource)
}

fn can_i_in(env: &TestEnv, namespace: &str, sa: &str, verb: &str, resource: &str) -> bool {
    let out = env
        .kubectl()
        .unwrap()
        .args([
            "auth",
            "can-i",
            "-n",
            namespace,
            verb,
            resource,
            "--as",
            &format!("system:serviceaccount:{NS}:{sa}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

async fn node(env: &TestEnv, name: &str) {
    let node: Node =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    Api::<Node>::all(env.client().await.unwrap())
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
}

/// A pod of the agent's DaemonSet as the scheduler would bind it to `node`.
async fn agent_pod(env: &TestEnv, name: &str, node: &str) {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {"nodeName": node, "serviceAccountName": format!("{RELEASE}-agent"),
                 "containers": [{"name": "agent", "image": "palisade/agent:test"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(env.client().await.unwrap(), NS)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
}

fn firewall_node(name: &str) -> FirewallNode {
    FirewallNode::new(
        name,
        FirewallNodeSpec {
            node_name: name.into(),
        },
    )
}

#[tokio::test]
async fn install_upgrade_uninstall_with_least_privilege() {
    let env = TestEnv::shared().unwrap();
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": NS}})).unwrap();
    Api::<Namespace>::all(env.client().await.unwrap())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let c = chart();
    let c = c.to_str().unwrap();
    ok(helm(
        Some(env),
        &[
            "install",
            RELEASE,
            c,
            "--namespace",
            NS,
            "--set",
            "clusterName=local",
        ],
    ));

    // The chart's crds/ are installed and served.
    let policies = Api::<FirewallPolicy>::all(env.client().await.unwrap());
    for _ in 0..50 {
        if policies.list(&Default::default()).await.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    policies.list(&Default::default()).await.unwrap();

    // RBAC: each identity can do its job and nothing more.
    let (agent, controller) = (format!("{RELEASE}-agent"), format!("{RELEASE}-controller"));
    assert!(can_i(env, &agent, "watch", "firewallpolicies.palisade.dev"));
    assert!(can_i(env, &agent, "create", "firewallnodes.palisade.dev"));
    assert!(can_i(
        env,
        &agent,
        "patch",
        "firewallnodes.palisade.dev/status"
    ));
    assert!(!can_i(
        env,
        &agent,
        "update",
        "firewallpolicies.palisade.dev"
    ));
    assert!(!can_i(
        env,
        &agent,
        "patch",
        "firewallpolicies.palisade.dev/status"
    ));
    assert!(!can_i(env, &agent, "update", "nodes"));
    assert!(!can_i(env, &agent, "get", "secrets"));
    // Events about its FirewallNode (cluster-scoped: they go to `default`),
    // and nowhere else.
    for verb in ["create", "patch"] {
        assert!(can_i_in(
            env,
            "default",
            &agent,
            verb,
            "events.events.k8s.io"
        ));
    }
    assert!(!can_i(env, &agent, "create", "events.events.k8s.io"));
    assert!(!can_i_in(
        env,
        "default",
        &agent,
        "delete",
        "events.events.k8s.io"
    ));
    assert!(can_i(
        env,
        &controller,
        "patch",
        "firewallpolicies.palisade.dev/status"
    ));
    assert!(can_i(
        env,
        &controller,
        "update",
        "firewallpolicies.palisade.dev/finalizers"
    ));
    assert!(can_i(
        env,
        &controller,
        "watch",
        "firewallnodes.palisade.dev"
    ));
    assert!(can_i(env, &controller, "create", "events.events.k8s.io"));
    assert!(can_i(
        env,
        &controller,
        "update",
        "leases.coordination.k8s.io"
    ));
    assert!(!can_i(
        env,
        &controller,
        "create",
        "firewallnodes.palisade.dev"
    ));
    assert!(!can_i(env, &controller, "update", "nodes"));
    assert!(!can_i(env, &controller, "get", "secrets"));

    // The agent's pod-bound token may write its own node's FirewallNode only.
    node(env, "chart-node-a").await;
    node(env, "chart-node-b").await;
    agent_pod(env, "agent-a", "chart-node-a").await;
    let kubeconfig = env
        .pod_service_account_kubeconfig(NS, &agent, "agent-a")
        .await
        .unwrap();
    let as_agent = Api::<FirewallNode>::all(client_from_kubeconfig(&kubeconfig).await.unwrap());
    // ValidatingAdmissionPolicies take a moment to be loaded after creation.
    let mut own = Err(None);
    for _ in 0..50 {
        match as_agent
            .create(&PostParams::default(), &firewall_node("chart-node-a"))
            .await
        {
            Ok(o) => {
                own = Ok(o);
                break;
            }
            Err(e) => own = Err(Some(e)),
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    own.expect("the agent may create its own node's FirewallNode");
    let mut refused = None;
    for _ in 0..50 {
        match as_agent
            .create(&PostParams::default(), &firewall_node("chart-node-b"))
            .await
        {
            Ok(_) => {
                // The policy was not loaded yet: undo and try again.
                Api::<FirewallNode>::all(env.client().await.unwrap())
                    .delete("chart-node-b", &Default::default())
                    .await
                    .unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let refused = refused.expect("another node's FirewallNode must be refused");
    assert!(
        refused.contains("may only write the FirewallNode of the node it runs on"),
        "{refused}"
    );

    // Nobody but the controller writes policy status, not even an admin.
    let mut policy: FirewallPolicy =
        serde_yaml::from_str(include_str!("../deploy/examples/web-server.yaml")).unwrap();
    policy.metadata.name = Some("chart-status".into());
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let status = serde_json::json!({"status": {"warnings": ["forged"]}});
    let err = policies
        .patch_status(
            "chart-status",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .expect_err("an admin wrote policy status");
    assert!(
        err.to_string()
            .contains("only the Palisade controller writes FirewallPolicy status"),
        "{err}"
    );

    // Upgrade changes values in place; uninstall removes the release.
    ok(helm(
        Some(env),
        &[
            "upgrade",
            RELEASE,
            c,
            "--namespace",
            NS,
            "--set",
            "clusterName=local",
            "--set",
            "controller.replicas=3",
        ],
    ));
    let deploy = ok(env
        .kubectl()
        .unwrap()
        .args([
            "-n",
            NS,
            "get",
            "deploy",
            &format!("{RELEASE}-controller"),
            "-o",
            "jsonpath={.spec.replicas}",
        ])
        .output()
        .unwrap());
    assert_eq!(deploy, "3");
    // No kubelet here to run the pre-delete hook's Job (it would wait out
    // Helm's timeout): tests/real_nodes.rs runs the hook on real nodes.
    ok(helm(
        Some(env),
        &["uninstall", RELEASE, "--namespace", NS, "--no-hooks"],
    ));
    let left = env
        .kubectl()
        .unwrap()
        .args(["-n", NS, "get", "deploy,ds,sa", "-o", "name"])
        .output()
        .unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains("palisade"), "left behind: {left}");

    // The same install without Helm: the generated kustomize base.
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let out = env
        .kubectl()
        .unwrap()
        .arg("apply")
        .arg("--server-side")
        .arg("-k")
        .arg(&deploy)
        .output()
        .unwrap();
    ok(out);
    let names = ok(env
        .kubectl()
        .unwrap()
        .args(["-n", NS, "get", "deploy,ds", "-o", "name"])
        .output()
        .unwrap());
    assert!(
        names.contains("deployment.apps/palisade-controller"),
        "{names}"
    );
    assert!(names.contains("daemonset.apps/palisade-agent"), "{names}");
}
