//! The controller against the real local environment: kube-apiserver +
//! etcd + moto, simulated nodes backed by moto instances, and the fault
//! proxy in front of moto (which also records every EC2 call).
//!
//! Each test runs its own controller in-process, restricted by a label
//! selector to the policies the test creates, so tests sharing the one
//! apiserver and moto do not see each other's policies.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use palisade::api::{
    AppliedPolicy, DeletionPolicy, FirewallNode, FirewallNodeSpec, FirewallPolicy,
    FirewallPolicySpec, FirewallRule, NodeSelector, Peer, PortRange, Protocol, SecurityGroupTarget,
};
use palisade::cloud::{AwsEc2, Ec2, RetryPolicy, tags};
use palisade::controller::{self, Config, Context, Metrics};
use palisade::policy::{Facts, GroupOwnership, SgPermission, SgQuota, compile_policy};
use palisade::testenv::fault_proxy::{FaultPlan, FaultProxy, Outcome, ScriptedError};
use palisade::testenv::{SimNet, SimNode, TestEnv};

const CRDS: &str = include_str!("../crds/palisade.dev.yaml");
const TEST_LABEL: &str = "palisade.dev/test";

async fn env() -> &'static TestEnv {
    let env = TestEnv::shared().unwrap();
    env.install_crds(CRDS).await.unwrap();
    env
}

fn ec2_for(endpoint: &str, retry: RetryPolicy) -> AwsEc2 {
    palisade::testenv::aws_ec2_for(endpoint, retry)
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 12,
        base: Duration::from_millis(10),
        cap: Duration::from_millis(200),
        ..RetryPolicy::default()
    }
}

/// One in-process controller for one test, behind its own fault proxy.
struct Running {
    ctx: Arc<Context<AwsEc2>>,
    proxy: Arc<FaultProxy>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    async fn start(test: &str, resync: Duration, quota: u32) -> Running {
        let proxy = Arc::new(FaultProxy::start(&env().await.ec2_endpoint()).unwrap());
        Running::start_with(test, resync, quota, proxy).await
    }

    async fn start_with(
        test: &str,
        resync: Duration,
        quota: u32,
        proxy: Arc<FaultProxy>,
    ) -> Running {
        let env = env().await;
        let metrics = Arc::new(Metrics::default());
        let ec2 = ec2_for(&proxy.endpoint(), fast_retry()).with_observer(metrics.ec2_observer());
        let config = Config {
            cluster_name: "ctrl-tests".into(),
            resync,
            stalled_retry: Duration::from_secs(600),
            concurrency: 4,
            quota: SgQuota {
                rules_per_direction: quota,
                ..SgQuota::default()
            },
            policy_selector: Some(format!("{TEST_LABEL}={test}")),
            instance: Some(format!("test-{test}")),
            vpc_cidrs: Vec::new(),
        };
        let ctx = controller::context(env.client().await.unwrap(), Arc::new(ec2), config, metrics);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(controller::run(ctx.clone(), async move {
            let _ = stopped.await;
        }));
        Running {
            ctx,
            proxy,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Waits until the finalizer let policy `name` go.
async fn wait_gone(name: &str, timeout: Duration) {
    eventually("policy gone", timeout, || async {
        policies()
            .await
            .get_opt(name)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
}

/// Creates policy `p` (as `kubectl create` would).
async fn create_policy(p: &FirewallPolicy) -> FirewallPolicy {
    policies()
        .await
        .create(&PostParams::default(), p)
        .await
        .unwrap()
}

/// Deletes policy `name` and waits until its finalizer let it go.
async fn delete_and_wait(name: &str) {
    policies()
        .await
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(name, Duration::from_secs(30)).await;
}

/// Revokes, behind the controller's back, our ingress rule for `port`.
async fn revoke_out_of_band(ec2: &AwsEc2, group: &str, port: i32) {
    let rule = ec2
        .describe_rules(group)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.permission.from_port == port)
        .unwrap();
    ec2.revoke(group, palisade::policy::Direction::Ingress, &[rule.rule_id])
        .await
        .unwrap();
}

/// The `DriftCorrected` Events of `policy`, once there is one.
async fn drift_corrected(client: &Client, policy: &str) -> Vec<KubeEvent> {
    eventually("DriftCorrected", Duration::from_secs(10), || async {
        let e = events_for(client, policy, "DriftCorrected").await;
        (!e.is_empty()).then_some(e)
    })
    .await
}

/// A simulated node labelled for test `test` with `role`.
async fn sim_node(net: &SimNet, test: &str, name: &str, role: &str) -> SimNode {
    SimNode::create(env().await, net, name, [(TEST_LABEL, test), ("role", role)])
        .await
        .unwrap()
}

async fn eventually<F, Fut, T>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
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

fn tcp(name: &str, ports: &[u16], cidrs: &[&str]) -> FirewallRule {
    FirewallRule {
        name: name.into(),
        protocol: Protocol::Tcp,
        ports: Some(
            ports
                .iter()
                .map(|p| PortRange {
                    port: *p,
                    end_port: None,
                })
                .collect(),
        ),
        peers: cidrs
            .iter()
            .map(|c| Peer {
                cidr: Some(c.to_string()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn policy(test: &str, name: &str, role: &str, ingress: Vec<FirewallRule>) -> FirewallPolicy {
    let mut p = FirewallPolicy::new(
        name,
        FirewallPolicySpec {
            node_selector: Some(NodeSelector {
                match_labels: Some(BTreeMap::from([
                    (TEST_LABEL.to_string(), test.to_string()),
                    ("role".to_string(), role.to_string()),
                ])),
                match_expressions: None,
            }),
            policy_types: vec![palisade::api::PolicyType::Ingress],
            ingress: Some(ingress),
            ..Default::default()
        },
    );
    p.metadata.labels = Some(BTreeMap::from([(TEST_LABEL.to_string(), test.to_string())]));
    p
}

/// Switches policy `name` to `mode` (a spec change: a new generation).
/// A merge patch of the one field, as `kubectl patch` would: no conflict
/// with the controller's status writes.
async fn set_mode(name: &str, mode: palisade::api::PolicyMode) {
    merge_patch(name, serde_json::json!({ "spec": { "mode": mode } }), false).await;
}

/// A merge patch of policy `name`, as `kubectl patch --type merge` would;
/// of its status subresource (what a controller writes) if `status`.
async fn merge_patch(name: &str, patch: serde_json::Value, status: bool) {
    let api = policies().await;
    let (pp, patch) = (PatchParams::default(), Patch::Merge(&patch));
    if status {
        api.patch_status(name, &pp, &patch).await
    } else {
        api.patch(name, &pp, &patch).await
    }
    .unwrap();
}

async fn policies() -> Api<FirewallPolicy> {
    Api::all(env().await.client().await.unwrap())
}

async fn get(name: &str) -> FirewallPolicy {
    policies().await.get(name).await.unwrap()
}

/// How Flux reads a policy: the real kstatus (sigs.k8s.io/cli-utils),
/// `Current`, `InProgress` or `Failed`.
fn kstatus(p: &FirewallPolicy) -> String {
    palisade::testenv::gitops::kstatus(&serde_json::to_value(p).unwrap())
        .unwrap()
        .status
}

fn condition(p: &FirewallPolicy, t: &str) -> Option<(String, String, String)> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The group id once the controller reports the cloud layer synced at the
/// current generation.
async fn wait_cloud_synced(name: &str) -> String {
    eventually(
        &format!("{name} CloudSynced"),
        Duration::from_secs(60),
        || async {
            let p = get(name).await;
            let s = p.status.as_ref()?;
            (s.observed_generation == p.metadata.generation
                && condition(&p, "CloudSynced")?.0 == "True")
                .then(|| s.security_group.as_ref().map(|g| g.id.clone()))
                .flatten()
        },
    )
    .await
}

/// Plays the agent of `node`: reports `policies` as applied at their
/// current generation.
async fn report_applied(client: &Client, node: &str, applied: &[&FirewallPolicy]) {
    let api: Api<FirewallNode> = Api::all(client.clone());
    if api.get_opt(node).await.unwrap().is_none() {
        api.create(
            &PostParams::default(),
            &FirewallNode::new(
                node,
                FirewallNodeSpec {
                    node_name: node.into(),
                },
            ),
        )
        .await
        .unwrap();
    }
    let policies: Vec<AppliedPolicy> = applied
        .iter()
        .map(|p| AppliedPolicy {
            name: p.name_any(),
            uid: p.uid(),
            generation: p.metadata.generation.unwrap(),
            hash: "0123456789abcdef".into(),
            ..Default::default()
        })
        .collect();
    let status = serde_json::json!({ "status": {
        "policies": policies,
        "policyCount": policies.len(),
    }});
    api.patch_status(node, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// The desired permissions of a policy, per the compiler (no references).
fn planned(p: &FirewallPolicy) -> Vec<(bool, SgPermission, String)> {
    let compiled = compile_policy(p, &Facts::default()).unwrap();
    let mut out = Vec::new();
    for (egress, perms) in [
        (false, &compiled.cloud.ingress),
        (true, &compiled.cloud.egress),
    ] {
        for perm in perms.iter().flatten() {
            out.push((egress, perm.permission.clone(), perm.description.clone()));
        }
    }
    out.sort();
    out
}

async fn rules_of(ec2: &AwsEc2, group: &str) -> Vec<(bool, SgPermission, String)> {
    let mut out: Vec<_> = ec2
        .describe_rules(group)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.direction == palisade::policy::Direction::Egress,
                r.permission,
                r.description.unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

async fn eni_groups(node: &SimNode) -> Vec<String> {
    ec2_for(&env().await.ec2_endpoint(), fast_retry())
        .eni_groups(node.eni_id())
        .await
        .unwrap()
}

fn direct() -> AwsEc2 {
    let env = TestEnv::shared().unwrap();
    ec2_for(&env.ec2_endpoint(), fast_retry())
}

async fn relabel(client: &Client, node: &str, role: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = serde_json::json!({ "metadata": { "labels": { "role": role } } });
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn events_for(client: &Client, policy: &str, reason: &str) -> Vec<KubeEvent> {
    let api: Api<KubeEvent> = Api::namespaced(client.clone(), "default");
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(policy)
                && e.reason.as_deref() == Some(reason)
        })
        .collect()
}

fn count(calls: &[palisade::testenv::fault_proxy::Call], action: &str) -> usize {
    calls
        .iter()
        .filter(|c| c.action == action && matches!(c.outcome, Outcome::Forwarded(_)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_create_edit_relabel_delete() {
    let test = "lifecycle";
    let env = env().await;
    let client = env.client().await.unwrap();
    let net = SimNet::new().unwrap();
    let web = sim_node(&net, test, "ctl-life-web", "web").await;
    let db = sim_node(&net, test, "ctl-life-db", "db").await;
    let default_groups = eni_groups(&web).await;
    let ctl = Running::start(test, Duration::from_secs(300), 60).await;

    // Create.
    let p = policy(
        test,
        "ctl-life",
        "web",
        vec![
            tcp("ssh", &[22], &["10.0.0.0/8"]),
            tcp("https", &[443], &["0.0.0.0/0", "::/0"]),
        ],
    );
    create_policy(&p).await;
    let group = wait_cloud_synced("ctl-life").await;
    let ec2 = direct();
    let described = ec2
        .describe_groups(std::slice::from_ref(&group))
        .await
        .unwrap();
    let tags_found = &described[0].tags;
    assert_eq!(tags_found[tags::CLUSTER], "ctrl-tests");
    assert_eq!(tags_found[tags::POLICY], "ctl-life");
    assert_eq!(tags_found[tags::MANAGED_BY], "palisade");
    let created = get("ctl-life").await;
    assert_eq!(tags_found[tags::POLICY_UID], created.uid().unwrap());
    // Exactly the plan: ingress as planned, the default egress kept (no
    // egress rules in the policy).
    let mut expected = planned(&created);
    for perm in SgPermission::default_egress() {
        if let palisade::policy::SgPeer::Ipv4(_) = perm.peer {
            expected.push((true, perm, String::new()));
        }
    }
    expected.sort();
    assert_eq!(rules_of(&ec2, &group).await, expected);
    // Attached to web only, keeping web's other groups.
    let mut want = default_groups.clone();
    want.push(group.clone());
    assert_eq!(eni_groups(&web).await, want);
    assert!(!eni_groups(&db).await.contains(&group));
    // Ready once the agent of web reports the generation.
    assert_eq!(kstatus(&created), "InProgress");
    report_applied(&client, "ctl-life-web", &[&created]).await;
    eventually("Ready", Duration::from_secs(30), || async {
        (kstatus(&get("ctl-life").await) == "Current").then_some(())
    })
    .await;
    let status = get("ctl-life").await.status.unwrap();
    let sg = status.security_group.unwrap();
    assert_eq!(
        (sg.owned, sg.ingress_rules, sg.attached_sample.clone()),
        (true, 3, vec![web.instance_id().to_string()])
    );
    assert_eq!(status.nodes.unwrap().summary, "1/1");

    // Edit: one rule changed (443 → 8443), one added; minimal calls.
    ctl.proxy.take_calls();
    let mut edited = get("ctl-life").await;
    edited.spec.ingress = Some(vec![
        tcp("ssh", &[22], &["10.0.0.0/8"]),
        tcp("https", &[8443], &["0.0.0.0/0", "::/0"]),
        tcp("dns", &[53], &["192.0.2.0/24"]),
    ]);
    let edited = policies()
        .await
        .replace("ctl-life", &PostParams::default(), &edited)
        .await
        .unwrap();
    eventually("the edit applied", Duration::from_secs(60), || async {
        let p = get("ctl-life").await;
        (p.status.as_ref()?.observed_generation == edited.metadata.generation
            && condition(&p, "CloudSynced")?.0 == "True")
            .then_some(())
    })
    .await;
    let calls = ctl.proxy.take_calls();
    assert_eq!(
        count(&calls, "AuthorizeSecurityGroupIngress"),
        1,
        "{calls:?}"
    );
    assert_eq!(count(&calls, "RevokeSecurityGroupIngress"), 1, "{calls:?}");
    assert_eq!(count(&calls, "CreateSecurityGroup"), 0);
    let mut expected = planned(&edited);
    expected.push((
        true,
        SgPermission::default_egress()[0].clone(),
        String::new(),
    ));
    expected.sort();
    assert_eq!(rules_of(&ec2, &group).await, expected);

    // Relabel: db joins, web leaves.
    relabel(&client, "ctl-life-db", "web").await;
    eventually("attached to db", Duration::from_secs(30), || async {
        eni_groups(&db).await.contains(&group).then_some(())
    })
    .await;
    relabel(&client, "ctl-life-web", "db").await;
    eventually("detached from web", Duration::from_secs(30), || async {
        (eni_groups(&web).await == default_groups).then_some(())
    })
    .await;
    eventually("status lists db only", Duration::from_secs(30), || async {
        let s = get("ctl-life").await.status?.security_group?;
        (s.attached_sample == vec![db.instance_id().to_string()] && s.attached == 1).then_some(())
    })
    .await;
    // (The recorder folds repeats of one reason into a series.)
    assert!(!events_for(&client, "ctl-life", "Attached").await.is_empty());
    assert!(!events_for(&client, "ctl-life", "Detached").await.is_empty());
    assert!(
        !events_for(&client, "ctl-life", "SecurityGroupCreated")
            .await
            .is_empty()
    );

    // Delete: detached, deleted; the finalizer waits for web's agent.
    policies()
        .await
        .delete("ctl-life", &DeleteParams::default())
        .await
        .unwrap();
    eventually("group deleted", Duration::from_secs(30), || async {
        let found = direct()
            .find_groups(&BTreeMap::from([(
                tags::POLICY_UID.to_string(),
                created.uid().unwrap(),
            )]))
            .await
            .unwrap();
        found.is_empty().then_some(())
    })
    .await;
    assert!(!eni_groups(&db).await.contains(&group));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        policies()
            .await
            .get_opt("ctl-life")
            .await
            .unwrap()
            .is_some(),
        "the finalizer must stay while an agent lists the policy"
    );
    report_applied(&client, "ctl-life-web", &[]).await;
    wait_gone("ctl-life", Duration::from_secs(30)).await;
    ctl.stop().await;
    let _ = Api::<FirewallNode>::all(client)
        .delete("ctl-life-web", &DeleteParams::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_band_changes_are_repaired_with_an_event() {
    let test = "drift";
    let env = env().await;
    let client = env.client().await.unwrap();
    let net = SimNet::new().unwrap();
    let _node = sim_node(&net, test, "ctl-drift-a", "web").await;
    let ctl = Running::start(test, Duration::from_secs(2), 60).await;
    let p = policy(
        test,
        "ctl-drift",
        "web",
        vec![
            tcp("ssh", &[22], &["10.0.0.0/8"]),
            tcp("web", &[80], &["192.0.2.0/24"]),
        ],
    );
    create_policy(&p).await;
    let group = wait_cloud_synced("ctl-drift").await;
    let ec2 = direct();
    let before = rules_of(&ec2, &group).await;

    // Out of band: revoke one of ours, add a stranger.
    drift_and_wait_repaired(&ec2, &group, 22, &before).await;
    let events = drift_corrected(&client, "ctl-drift").await;
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));
    let note = events[0].note.clone().unwrap_or_default();
    assert!(note.contains("missing") && note.contains("extra"), "{note}");
    assert!(
        ctl.ctx
            .metrics
            .encode()
            .contains("palisade_controller_drift_corrections_total")
    );
    delete_and_wait("ctl-drift").await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_adopted_group_keeps_its_foreign_rules() {
    let test = "adopt";
    let env = env().await;
    let cloud = env.sim_cloud().await.unwrap();
    let sdk = env.ec2_client();
    let group = sdk
        .create_security_group()
        .group_name("ctl-adopt-existing")
        .description("made by hand")
        .vpc_id(&cloud.vpc_id)
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_string();
    // A foreign rule, and one that happens to equal a desired permission.
    for (port, cidr) in [(5432, "198.51.100.0/24"), (22, "10.0.0.0/8")] {
        sdk.authorize_security_group_ingress()
            .group_id(&group)
            .ip_protocol("tcp")
            .from_port(port)
            .to_port(port)
            .cidr_ip(cidr)
            .send()
            .await
            .unwrap();
    }
    let ec2 = direct();
    let foreign = rules_of(&ec2, &group).await;
    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    let mut p = policy(
        test,
        "ctl-adopt",
        "nobody",
        vec![
            tcp("ssh", &[22], &["10.0.0.0/8"]),
            tcp("web", &[443], &["192.0.2.0/24"]),
        ],
    );
    p.spec.security_group = Some(SecurityGroupTarget {
        id: Some(group.clone()),
        ..Default::default()
    });
    create_policy(&p).await;
    assert_eq!(wait_cloud_synced("ctl-adopt").await, group);
    let now = rules_of(&ec2, &group).await;
    for rule in &foreign {
        assert!(now.contains(rule), "foreign rule {rule:?} was touched");
    }
    let ours: Vec<_> = now
        .iter()
        .filter(|r| r.2.starts_with("palisade:ctl-adopt/"))
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "only 443 is new (22 is granted by a foreign rule): {now:?}"
    );
    let sg = get("ctl-adopt")
        .await
        .status
        .unwrap()
        .security_group
        .unwrap();
    assert!(!sg.owned);
    assert_eq!(sg.ingress_rules, 1);

    // Delete: ours revoked, the group and its foreign rules stay.
    delete_and_wait("ctl-adopt").await;
    assert_eq!(rules_of(&ec2, &group).await, foreign);
    let _ = GroupOwnership::Adopted;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_controller_makes_no_twin_and_retain_keeps_the_group() {
    let test = "restart";
    let env = env().await;
    let net = SimNet::new().unwrap();
    let _node = sim_node(&net, test, "ctl-restart-a", "web").await;
    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    let mut p = policy(
        test,
        "ctl-restart",
        "web",
        vec![tcp("ssh", &[22], &["10.0.0.0/8"])],
    );
    p.spec.security_group = Some(SecurityGroupTarget {
        deletion_policy: DeletionPolicy::Retain,
        ..Default::default()
    });
    create_policy(&p).await;
    let group = wait_cloud_synced("ctl-restart").await;
    let ec2 = direct();
    let rules = rules_of(&ec2, &group).await;
    ctl.stop().await;

    // As if the controller died after creating the group but before
    // writing the status.
    merge_patch("ctl-restart", serde_json::json!({ "status": null }), true).await;
    let proxy = Arc::new(FaultProxy::start(&env.ec2_endpoint()).unwrap());
    let ctl = Running::start_with(test, Duration::from_secs(300), 60, proxy.clone()).await;
    assert_eq!(wait_cloud_synced("ctl-restart").await, group);
    let calls = proxy.take_calls();
    assert_eq!(count(&calls, "CreateSecurityGroup"), 0, "{calls:?}");
    assert!(calls.iter().all(|c| !c.is_mutating()), "{calls:?}");
    assert_eq!(rules_of(&ec2, &group).await, rules);
    let uid = get("ctl-restart").await.uid().unwrap();
    let twins = ec2
        .find_groups(&BTreeMap::from([(tags::POLICY_UID.to_string(), uid)]))
        .await
        .unwrap();
    assert_eq!(twins.len(), 1);

    // Retain: the policy goes, the group stays.
    delete_and_wait("ctl-restart").await;
    assert_eq!(
        ec2.describe_groups(std::slice::from_ref(&group))
            .await
            .unwrap()
            .len(),
        1
    );
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_and_invalid_references_stall_without_a_partial_apply() {
    let test = "stall";
    let ctl = Running::start(test, Duration::from_secs(300), 5).await;
    ctl.proxy.take_calls();
    let cidrs: Vec<String> = (0..6).map(|i| format!("192.0.2.{}/32", i)).collect();
    let refs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
    let mut p = policy(test, "ctl-quota", "any", vec![tcp("many", &[22], &refs)]);
    p.spec.security_group = Some(SecurityGroupTarget {
        vpc_id: Some("vpc-0123456789abcdef0".into()),
        ..Default::default()
    });
    create_policy(&p).await;
    let (_, reason, message) = eventually("Stalled", Duration::from_secs(30), || async {
        let p = get("ctl-quota").await;
        condition(&p, "Stalled").filter(|c| c.0 == "True")
    })
    .await;
    assert_eq!(reason, "QuotaExceeded");
    assert!(message.contains("quota"), "{message}");
    assert_eq!(kstatus(&get("ctl-quota").await), "Failed");
    assert!(ctl.proxy.calls().is_empty(), "{:?}", ctl.proxy.calls());

    // Fixed by its owner: it recovers without any restart.
    let mut fixed = get("ctl-quota").await;
    fixed.spec.ingress = Some(vec![tcp("many", &[22], &refs[..5])]);
    fixed.spec.security_group = Some(SecurityGroupTarget {
        vpc_id: Some(env().await.sim_cloud().await.unwrap().vpc_id.clone()),
        ..Default::default()
    });
    policies()
        .await
        .replace("ctl-quota", &PostParams::default(), &fixed)
        .await
        .unwrap();
    eventually("Current after the fix", Duration::from_secs(30), || async {
        (kstatus(&get("ctl-quota").await) == "Current").then_some(())
    })
    .await;
    ctl.proxy.take_calls();

    let mut bad = policy(test, "ctl-badref", "any", vec![]);
    bad.spec.ingress = Some(vec![FirewallRule {
        peers: vec![Peer {
            security_group_id: Some("sg-0123456789abcdef0".into()),
            ..Default::default()
        }],
        ..tcp("from-group", &[22], &[])
    }]);
    create_policy(&bad).await;
    let (_, reason, message) = eventually("Stalled", Duration::from_secs(30), || async {
        let p = get("ctl-badref").await;
        condition(&p, "Stalled").filter(|c| c.0 == "True")
    })
    .await;
    assert_eq!(reason, "InvalidReference");
    assert!(message.contains("sg-0123456789abcdef0"), "{message}");
    assert!(ctl.proxy.calls().iter().all(|c| !c.is_mutating()));

    for name in ["ctl-quota", "ctl-badref"] {
        policies()
            .await
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    for name in ["ctl-quota", "ctl-badref"] {
        wait_gone(name, Duration::from_secs(30)).await;
    }
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throttled_ec2_converges_exactly() {
    let test = "throttle";
    let env = env().await;
    let net = SimNet::new().unwrap();
    let a = sim_node(&net, test, "ctl-throttle-a", "web").await;
    let b = sim_node(&net, test, "ctl-throttle-b", "web").await;
    let proxy = Arc::new(FaultProxy::start(&env.ec2_endpoint()).unwrap());
    proxy.set_plan(FaultPlan {
        throttle_ratio: 0.3,
        unavailable_ratio: 0.05,
        seed: 7,
        ..Default::default()
    });
    let ctl = Running::start_with(test, Duration::from_secs(300), 60, proxy.clone()).await;
    let rules: Vec<FirewallRule> = (0..20)
        .map(|i| {
            tcp(
                &format!("r{i}"),
                &[1000 + i],
                &["10.0.0.0/8", "2001:db8::/32"],
            )
        })
        .collect();
    let p = policy(test, "ctl-throttle", "web", rules);
    create_policy(&p).await;
    let group = wait_cloud_synced("ctl-throttle").await;
    let calls = proxy.calls();
    assert!(
        calls.iter().any(|c| c.outcome == Outcome::Throttled),
        "the proxy throttled nothing"
    );
    proxy.set_plan(FaultPlan::default());
    let ec2 = direct();
    let created = get("ctl-throttle").await;
    let mut expected = planned(&created);
    expected.push((
        true,
        SgPermission::default_egress()[0].clone(),
        String::new(),
    ));
    expected.sort();
    assert_eq!(rules_of(&ec2, &group).await, expected);
    let twins = ec2
        .find_groups(&BTreeMap::from([(
            tags::POLICY_UID.to_string(),
            created.uid().unwrap(),
        )]))
        .await
        .unwrap();
    assert_eq!(twins.len(), 1);
    for node in [&a, &b] {
        let groups = eni_groups(node).await;
        assert_eq!(groups.iter().filter(|g| **g == group).count(), 1);
    }
    delete_and_wait("ctl-throttle").await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_replica_holds_the_lease() {
    use palisade::controller::leader::{LeaderElector, LeaseSettings};
    let env = env().await;
    env.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ctl-lease\n")
        .await
        .unwrap();
    let settings = |identity: &str| LeaseSettings {
        name: "ctl-lease-test".into(),
        namespace: "ctl-lease".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(3),
        renew_every: Duration::from_millis(500),
    };
    let client = env.client().await.unwrap();
    let a = LeaderElector::new(client.clone(), settings("replica-a"));
    let b = LeaderElector::new(client.clone(), settings("replica-b"));
    // Racing for a fresh lease: exactly one wins.
    let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra ^ rb, "a={ra} b={rb}");
    let (leader, follower) = if ra { (a, b) } else { (b, a) };
    assert!(
        leader.try_acquire_or_renew().await.unwrap(),
        "the holder renews"
    );
    assert!(!follower.try_acquire_or_renew().await.unwrap());
    // Released on shutdown: the other takes over at once.
    leader.release().await;
    assert!(follower.try_acquire_or_renew().await.unwrap());
    assert!(!leader.try_acquire_or_renew().await.unwrap());
    // A holder that stops renewing loses the lease after it expires.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(leader.try_acquire_or_renew().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_elects_reconciles_serves_metrics_and_stops_on_sigterm() {
    let test = "binary";
    let env = env().await;
    env.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ctl-binary\n")
        .await
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = controller_binary(test, port)
        .args([
            "--cluster-name",
            "ctl-binary",
            "--lease-namespace",
            "ctl-binary",
            "--identity",
            "binary-test",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut p = policy(
        test,
        "ctl-binary",
        "nobody",
        vec![tcp("ssh", &[22], &["10.0.0.0/8"])],
    );
    p.spec.security_group = Some(SecurityGroupTarget {
        vpc_id: Some(env.sim_cloud().await.unwrap().vpc_id.clone()),
        ..Default::default()
    });
    create_policy(&p).await;
    let group = wait_cloud_synced("ctl-binary").await;
    assert!(group.starts_with("sg-"));

    let get_path = |path: &'static str| async move {
        let out = tokio::process::Command::new("curl")
            .args([
                "-s",
                "-w",
                "\n%{http_code}",
                &format!("http://127.0.0.1:{port}{path}"),
            ])
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(get_path("/healthz").await.ends_with("200"));
    assert!(get_path("/readyz").await.ends_with("200"));
    let metrics = get_path("/metrics").await;
    assert!(
        metrics.contains("palisade_controller_ec2_calls_total{operation=\"CreateSecurityGroup\",outcome=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("palisade_controller_reconciles_total{result=\"ok\"}"));

    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let mut logs = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    assert!(logs.contains("became leader"), "{logs}");
    for line in logs.lines().filter(|l| !l.is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "logs are JSON: {line}"
        );
    }
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
        env.client().await.unwrap(),
        "ctl-binary",
    )
    .get("palisade-controller")
    .await
    .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity,
        None,
        "released on SIGTERM"
    );

    // Clean up with an in-process controller (the finalizer needs one).
    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    delete_and_wait("ctl-binary").await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_and_group_peers_are_resolved_for_both_layers() {
    let test = "peers";
    let env = env().await;
    let net = SimNet::new().unwrap();
    let web = sim_node(&net, test, "ctl-peers-web", "web").await;
    let db = sim_node(&net, test, "ctl-peers-db", "db").await;
    // A group with one member (web's ENI), referenced by a rule.
    let cloud = env.sim_cloud().await.unwrap();
    let sdk = env.ec2_client();
    let members = sdk
        .create_security_group()
        .group_name("ctl-peers-members")
        .description("members")
        .vpc_id(&cloud.vpc_id)
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_string();
    let mut groups = eni_groups(&web).await;
    groups.push(members.clone());
    direct()
        .set_eni_groups(web.eni_id(), &groups)
        .await
        .unwrap();

    let list = sdk
        .create_managed_prefix_list()
        .prefix_list_name("ctl-peers-offices")
        .address_family("IPv4")
        .max_entries(5)
        .entries(
            aws_sdk_ec2::types::AddPrefixListEntry::builder()
                .cidr("203.0.113.0/24")
                .build(),
        )
        .entries(
            aws_sdk_ec2::types::AddPrefixListEntry::builder()
                .cidr("198.51.100.0/24")
                .build(),
        )
        .send()
        .await
        .unwrap()
        .prefix_list
        .unwrap()
        .prefix_list_id
        .unwrap();

    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    let mut p = policy(test, "ctl-peers", "web", vec![]);
    p.spec.ingress = Some(vec![
        FirewallRule {
            peers: vec![Peer {
                node_selector: Some(NodeSelector {
                    match_labels: Some(BTreeMap::from([
                        (TEST_LABEL.to_string(), test.to_string()),
                        ("role".to_string(), "db".to_string()),
                    ])),
                    match_expressions: None,
                }),
                ..Default::default()
            }],
            ..tcp("from-db", &[8080], &[])
        },
        FirewallRule {
            peers: vec![Peer {
                security_group_id: Some(members.clone()),
                ..Default::default()
            }],
            ..tcp("from-members", &[9090], &[])
        },
        FirewallRule {
            peers: vec![Peer {
                prefix_list_id: Some(list.clone()),
                ..Default::default()
            }],
            ..tcp("from-offices", &[7070], &[])
        },
    ]);
    create_policy(&p).await;
    let group = wait_cloud_synced("ctl-peers").await;
    let ec2 = direct();
    let peers_of = |rules: Vec<(bool, SgPermission, String)>, port: i32| -> Vec<String> {
        rules
            .into_iter()
            .filter(|r| r.1.from_port == port)
            .map(|r| r.1.peer.to_string())
            .collect()
    };
    let rules = rules_of(&ec2, &group).await;
    assert_eq!(
        peers_of(rules.clone(), 8080),
        [
            format!("{}/32", db.host().ipv4()),
            format!("{}/128", db.host().ipv6())
        ]
    );
    assert_eq!(peers_of(rules, 9090), vec![members.clone()]);
    // The group reference, resolved to its members for the agents.
    let status = get("ctl-peers").await.status.unwrap();
    let resolved = status
        .resolved_peers
        .iter()
        .find(|r| r.id == members)
        .unwrap();
    assert_eq!(resolved.cidrs, [format!("{}/32", web.host().ipv4())]);
    assert_eq!(
        peers_of(rules_of(&ec2, &group).await, 7070),
        vec![list.clone()]
    );
    let offices = status.resolved_peers.iter().find(|r| r.id == list).unwrap();
    assert_eq!(offices.cidrs, ["198.51.100.0/24", "203.0.113.0/24"]);

    // A second db node joins: the cloud layer follows.
    let db2 = sim_node(&net, test, "ctl-peers-db2", "db").await;
    let want = format!("{}/32", db2.host().ipv4());
    eventually("db2 allowed", Duration::from_secs(30), || async {
        peers_of(rules_of(&ec2, &group).await, 8080)
            .contains(&want)
            .then_some(())
    })
    .await;
    delete_and_wait("ctl-peers").await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deletion_waits_out_dependency_violation() {
    let test = "depviol";
    let env = env().await;
    let net = SimNet::new().unwrap();
    let _node = sim_node(&net, test, "ctl-depviol-a", "web").await;
    let proxy = Arc::new(FaultProxy::start(&env.ec2_endpoint()).unwrap());
    let ctl = Running::start_with(test, Duration::from_secs(300), 60, proxy.clone()).await;
    let p = policy(
        test,
        "ctl-depviol",
        "web",
        vec![tcp("ssh", &[22], &["203.0.113.0/24"])],
    );
    create_policy(&p).await;
    let group = wait_cloud_synced("ctl-depviol").await;

    // EC2 refuses to delete a group an interface still holds for a while
    // after the detach (moto never does): the controller must keep trying.
    proxy.set_plan(FaultPlan {
        scripted: vec![ScriptedError {
            action: "DeleteSecurityGroup".into(),
            code: "DependencyViolation".into(),
            times: 2,
        }],
        ..Default::default()
    });
    proxy.take_calls();
    policies()
        .await
        .delete("ctl-depviol", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone("ctl-depviol", Duration::from_secs(90)).await;
    let deletes: Vec<Outcome> = proxy
        .calls()
        .iter()
        .filter(|c| c.action == "DeleteSecurityGroup")
        .map(|c| c.outcome)
        .collect();
    assert_eq!(
        deletes,
        vec![
            Outcome::Scripted,
            Outcome::Scripted,
            Outcome::Forwarded(200)
        ]
    );
    let left = direct().describe_groups(std::slice::from_ref(&group)).await;
    assert!(
        left.map(|g| g.is_empty()).unwrap_or(true),
        "{group} still exists"
    );
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_is_a_dry_run_on_the_cloud_layer_too() {
    let test = "audit";
    env().await;
    let net = SimNet::new().unwrap();
    let web = sim_node(&net, test, "ctl-audit-web", "web").await;
    let default_groups = eni_groups(&web).await;
    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    let mut p = policy(
        test,
        "ctl-audit",
        "web",
        vec![tcp("ssh", &[22], &["0.0.0.0/0"])],
    );
    p.spec.mode = palisade::api::PolicyMode::Audit;
    create_policy(&p).await;
    let group = wait_cloud_synced("ctl-audit").await;
    let ec2 = direct();
    // The group exists, carries no Palisade permission (only its default
    // egress) and is on no interface: nothing widened.
    let only_default: Vec<_> = rules_of(&ec2, &group)
        .await
        .into_iter()
        .filter(|(_, _, description)| !description.is_empty())
        .collect();
    assert!(only_default.is_empty(), "{only_default:?}");
    assert_eq!(eni_groups(&web).await, default_groups);
    let warnings = get("ctl-audit").await.status.unwrap().warnings;
    assert!(
        warnings.iter().any(|w| w
            .contains("Audit: the cloud layer is a dry run: 1 Security Group permissions planned")),
        "{warnings:?}"
    );
    // Enforce: the permission is authorized and the group attached.
    set_mode("ctl-audit", palisade::api::PolicyMode::Enforce).await;
    eventually("enforced in the group", Duration::from_secs(30), || async {
        let attached = eni_groups(&web).await.contains(&group);
        let rules = rules_of(&ec2, &group).await;
        (attached && rules.iter().any(|(_, _, d)| d.contains("ctl-audit/ssh"))).then_some(())
    })
    .await;
    // Back to Audit: revoked and detached.
    set_mode("ctl-audit", palisade::api::PolicyMode::Audit).await;
    eventually("dry run again", Duration::from_secs(30), || async {
        let attached = eni_groups(&web).await.contains(&group);
        let rules = rules_of(&ec2, &group).await;
        (!attached && !rules.iter().any(|(_, _, d)| d.contains("ctl-audit/ssh"))).then_some(())
    })
    .await;
    delete_and_wait("ctl-audit").await;
    ctl.stop().await;
}

/// Drift out of band on `group` — tcp/`port` revoked, a stranger (tcp/3306
/// from anywhere) added — then waits until the rules are `before` again.
async fn drift_and_wait_repaired(
    ec2: &AwsEc2,
    group: &str,
    port: i32,
    before: &[(bool, SgPermission, String)],
) {
    revoke_out_of_band(ec2, group, port).await;
    env()
        .await
        .ec2_client()
        .authorize_security_group_ingress()
        .group_id(group)
        .ip_protocol("tcp")
        .from_port(3306)
        .to_port(3306)
        .cidr_ip("0.0.0.0/0")
        .send()
        .await
        .unwrap();
    eventually("drift repaired", Duration::from_secs(30), || async {
        (rules_of(ec2, group).await == before).then_some(())
    })
    .await;
}

/// Adds empty foreign groups (`prefix-0`, `prefix-1`, …) to `node`'s
/// interface until it carries `count` groups; returns them all.
async fn fill_interface(node: &SimNode, count: usize, prefix: &str) -> Vec<String> {
    let env = env().await;
    let raw = env.ec2_client();
    let vpc = env.sim_cloud().await.unwrap().vpc_id.clone();
    let mut groups = eni_groups(node).await;
    for i in 0..(count - groups.len()) {
        let g = raw
            .create_security_group()
            .group_name(format!("{prefix}-{i}"))
            .description("filler")
            .vpc_id(&vpc)
            .send()
            .await
            .unwrap();
        groups.push(g.group_id().unwrap().to_string());
    }
    direct()
        .set_eni_groups(node.eni_id(), &groups)
        .await
        .unwrap();
    groups
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_interface_is_reported_before_any_write() {
    let test = "eni-full";
    env().await;
    let net = SimNet::new().unwrap();
    let web = sim_node(&net, test, "ctl-full-web", "web").await;
    // Fill the node's interface to AWS's default of 5 groups.
    let mut groups = fill_interface(&web, 5, "ctl-full-extra").await;
    let ec2 = direct();
    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    ctl.proxy.take_calls();
    create_policy(&policy(
        test,
        "ctl-full",
        "web",
        vec![tcp("ssh", &[22], &["10.0.0.0/8"])],
    ))
    .await;
    let stalled = eventually("Stalled", Duration::from_secs(30), || async {
        let p = get("ctl-full").await;
        condition(&p, "Stalled").filter(|c| c.0 == "True")
    })
    .await;
    assert!(
        stalled.2.contains("ctl-full-web") && stalled.2.contains("5 groups"),
        "{stalled:?}"
    );
    // Nothing was written: no group made, no rule, no interface changed.
    let calls = ctl.proxy.take_calls();
    for write in [
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "ModifyNetworkInterfaceAttribute",
    ] {
        assert_eq!(count(&calls, write), 0, "{write}");
    }
    assert_eq!(eni_groups(&web).await, groups);
    // Room made (a filler group removed) and the policy touched: it converges.
    groups.pop();
    ec2.set_eni_groups(web.eni_id(), &groups).await.unwrap();
    let mut p = get("ctl-full").await;
    p.metadata
        .annotations
        .get_or_insert_default()
        .insert("touch".into(), "1".into());
    policies()
        .await
        .replace("ctl-full", &PostParams::default(), &p)
        .await
        .unwrap();
    let group = wait_cloud_synced("ctl-full").await;
    eventually("attached", Duration::from_secs(30), || async {
        eni_groups(&web).await.contains(&group).then_some(())
    })
    .await;
    delete_and_wait("ctl-full").await;
    ctl.stop().await;
}

/// The controller binary for the policies of test `test`, with metrics on
/// `port`, its other flags to add.
fn controller_binary(test: &str, port: u16) -> tokio::process::Command {
    let env = TestEnv::shared().unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_palisade-controller"));
    command
        .envs(env.aws_env())
        .env("KUBECONFIG", env.kubeconfig_path())
        .args([
            "--metrics-address",
            &format!("127.0.0.1:{port}"),
            "--policy-selector",
            &format!("{TEST_LABEL}={test}"),
        ])
        .kill_on_drop(true)
        .stderr(std::process::Stdio::null());
    command
}

/// The controller binary as the in-process controllers of these tests
/// (their cluster name), without leader election.
fn restartable_controller(test: &str, port: u16) -> tokio::process::Child {
    controller_binary(test, port)
        .args(["--cluster-name", "ctrl-tests", "--leader-election", "false"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn policies_that_cannot_fit_a_node_say_so_before_any_write() {
    let test = "eni-fit";
    env().await;
    let net = SimNet::new().unwrap();
    let web = sim_node(&net, test, "ctl-fit-web", "web").await;
    // Three foreign groups on the interface.
    let groups = fill_interface(&web, 3, "ctl-fit-extra").await;
    // Three policies, each with its own named group, select the node:
    // 3 foreign + 3 Palisade groups is one more than AWS's default 5.
    let names = ["ctl-fit-a", "ctl-fit-b", "ctl-fit-c"];
    for (i, name) in names.iter().enumerate() {
        let mut p = policy(
            test,
            name,
            "web",
            vec![tcp("app", &[8000 + i as u16], &["10.0.0.0/8"])],
        );
        p.spec.security_group = Some(SecurityGroupTarget {
            name: Some(format!("palisade-fit-{name}")),
            ..Default::default()
        });
        create_policy(&p).await;
    }
    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    for name in names {
        let stalled = eventually("Stalled", Duration::from_secs(30), || async {
            let p = get(name).await;
            condition(&p, "Stalled").filter(|c| c.0 == "True")
        })
        .await;
        assert_eq!(stalled.1, "QuotaExceeded", "{stalled:?}");
        let line = "node ctl-fit-web would carry 6 groups (3 foreign + 3 Palisade); the interface quota is 5 groups";
        assert!(stalled.2.contains(line), "{stalled:?}");
        let warnings = get(name).await.status.unwrap().warnings;
        assert!(warnings.iter().any(|w| w.ends_with(line)), "{warnings:?}");
    }
    // No partial attachment: no group made, no rule, the interface as it was.
    let calls = ctl.proxy.take_calls();
    for write in [
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "ModifyNetworkInterfaceAttribute",
    ] {
        assert_eq!(count(&calls, write), 0, "{write}");
    }
    assert_eq!(eni_groups(&web).await, groups);
    // One policy fewer and the others touched: 3 + 2 fit, both converge.
    delete_and_wait("ctl-fit-c").await;
    for name in &names[..2] {
        let mut p = get(name).await;
        p.metadata
            .annotations
            .get_or_insert_default()
            .insert("touch".into(), "1".into());
        policies()
            .await
            .replace(name, &PostParams::default(), &p)
            .await
            .unwrap();
    }
    let a = wait_cloud_synced("ctl-fit-a").await;
    let b = wait_cloud_synced("ctl-fit-b").await;
    let now = eventually("attached", Duration::from_secs(30), || async {
        let now = eni_groups(&web).await;
        (now.contains(&a) && now.contains(&b)).then_some(now)
    })
    .await;
    assert_eq!(now.len(), 5, "{now:?}");
    assert!(
        get("ctl-fit-a")
            .await
            .status
            .unwrap()
            .warnings
            .iter()
            .all(|w| !w.contains("would carry")),
    );
    delete_and_wait("ctl-fit-a").await;
    delete_and_wait("ctl-fit-b").await;
    ctl.stop().await;
}

/// The policy's group id and ingress rule count once its cloud layer is
/// synced at its generation.
async fn synced_group(name: &str) -> Option<(String, i32)> {
    let p = get(name).await;
    let s = p.status.as_ref()?;
    (s.observed_generation == p.metadata.generation && condition(&p, "CloudSynced")?.0 == "True")
        .then(|| {
            s.security_group
                .as_ref()
                .map(|g| (g.id.clone(), g.ingress_rules))
        })
        .flatten()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_selected_by_8_policies_converges_with_default_quotas() {
    let test = "shared";
    let net = SimNet::new().unwrap();
    let web = sim_node(&net, test, "ctl-shared-web", "web").await;
    let web2 = sim_node(&net, test, "ctl-shared-web2", "web").await;
    let db = sim_node(&net, test, "ctl-shared-db", "db").await;
    let default_groups = eni_groups(&web).await;
    let db_groups = eni_groups(&db).await;
    // Default quotas: 5 groups per interface (moto does not enforce it: the
    // test checks it at every poll), 60 rules per direction.
    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    let ec2 = direct();
    let names: Vec<String> = (1..=8).map(|i| format!("ctl-shared-{i}")).collect();
    let make = |i: usize| {
        let mut rules = vec![tcp("app", &[8000 + i as u16], &["10.0.0.0/8"])];
        if i <= 2 {
            // The same permission in two policies: held once.
            rules.push(tcp("https", &[443], &["10.0.0.0/8"]));
        }
        policy(test, &names[i - 1], "web", rules)
    };
    let within_quota = || async {
        for node in [&web, &web2] {
            let groups = eni_groups(node).await;
            assert!(groups.len() <= 5, "{groups:?}");
        }
    };

    // One policy: its own group, as ever.
    create_policy(&make(1)).await;
    let own = wait_cloud_synced(&names[0]).await;
    // A second with the same selector: both move to one shared group, and
    // the first one's own group leaves the interfaces in the same call.
    create_policy(&make(2)).await;
    let shared = eventually("two share a group", Duration::from_secs(60), || async {
        within_quota().await;
        let (a, _) = synced_group(&names[0]).await?;
        let (b, _) = synced_group(&names[1]).await?;
        (a == b && a != own).then_some(a)
    })
    .await;
    let described = ec2
        .describe_groups(std::slice::from_ref(&shared))
        .await
        .unwrap();
    assert_eq!(
        described[0].tags.get(tags::CLUSTER).map(String::as_str),
        Some("ctrl-tests")
    );
    assert!(described[0].tags.contains_key(tags::SHARED));
    eventually("the own group deleted", Duration::from_secs(30), || async {
        ec2.describe_groups(std::slice::from_ref(&own))
            .await
            .map_or(true, |g| g.is_empty())
            .then_some(())
    })
    .await;
    // Six more at once: they join the shared group, no interface changes.
    ctl.proxy.take_calls();
    for i in 3..=8 {
        create_policy(&make(i)).await;
    }
    eventually("eight converge", Duration::from_secs(90), || async {
        within_quota().await;
        for name in &names {
            let (g, _) = synced_group(name).await?;
            if g != shared {
                return None;
            }
        }
        Some(())
    })
    .await;
    let calls = ctl.proxy.take_calls();
    let mut by_action: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &calls {
        *by_action.entry(c.action.as_str()).or_default() += 1;
    }
    eprintln!("EC2 calls while six policies joined the shared group: {by_action:?}");
    assert_eq!(count(&calls, "ModifyNetworkInterfaceAttribute"), 0);
    assert_eq!(count(&calls, "CreateSecurityGroup"), 0);
    for node in [&web, &web2] {
        let mut want = default_groups.clone();
        if node.eni_id() != web.eni_id() {
            want = eni_groups(node).await;
            want.retain(|g| g != &shared);
        }
        want.push(shared.clone());
        assert_eq!(eni_groups(node).await, want);
    }
    assert_eq!(eni_groups(&db).await, db_groups);
    // The union, each permission once: 8 ports + the shared 443, and the
    // default egress (no policy speaks for egress).
    let rules = rules_of(&ec2, &shared).await;
    let ingress: Vec<_> = rules.iter().filter(|r| !r.0).collect();
    assert_eq!(ingress.len(), 9, "{rules:?}");
    assert!(
        ingress
            .iter()
            .all(|r| r.2.starts_with("palisade:ctl-shared-"))
    );
    for (i, name) in names.iter().enumerate() {
        let (_, n) = synced_group(name).await.unwrap();
        assert_eq!(n, if i < 2 { 2 } else { 1 }, "{name}");
    }
    // Deleting six: their rules leave the group, the others' stay.
    ctl.proxy.take_calls();
    for name in &names[2..] {
        policies()
            .await
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    for name in &names[2..] {
        wait_gone(name, Duration::from_secs(60)).await;
    }
    let rules = rules_of(&ec2, &shared).await;
    let ports: Vec<i32> = rules
        .iter()
        .filter(|r| !r.0)
        .map(|r| r.1.from_port)
        .collect();
    assert_eq!(ports, vec![443, 8001, 8002], "{rules:?}");
    assert!(eni_groups(&web).await.contains(&shared));
    let calls = ctl.proxy.take_calls();
    assert_eq!(count(&calls, "ModifyNetworkInterfaceAttribute"), 0);
    // The last two: the group is detached and deleted.
    delete_and_wait(&names[0]).await;
    delete_and_wait(&names[1]).await;
    assert_eq!(eni_groups(&web).await, default_groups);
    assert!(
        ec2.describe_groups(std::slice::from_ref(&shared))
            .await
            .map_or(true, |g| g.is_empty())
    );
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_group_is_repaired_and_a_member_moves_out_without_a_gap() {
    let test = "shared-drift";
    env().await;
    let net = SimNet::new().unwrap();
    let node = sim_node(&net, test, "ctl-sdrift-a", "web").await;
    let ctl = Running::start(test, Duration::from_secs(2), 60).await;
    for (name, port) in [("ctl-sdrift-1", 22), ("ctl-sdrift-2", 80)] {
        create_policy(&policy(
            test,
            name,
            "web",
            vec![tcp("app", &[port], &["10.0.0.0/8"])],
        ))
        .await;
    }
    let group = eventually("shared", Duration::from_secs(60), || async {
        let (a, _) = synced_group("ctl-sdrift-1").await?;
        let (b, _) = synced_group("ctl-sdrift-2").await?;
        (a == b).then_some(a)
    })
    .await;
    let ec2 = direct();
    let before = eventually("both rules", Duration::from_secs(30), || async {
        let r = rules_of(&ec2, &group).await;
        (r.iter().filter(|r| !r.0).count() == 2).then_some(r)
    })
    .await;
    // Out of band: revoke the second policy's rule, add a stranger.
    drift_and_wait_repaired(&ec2, &group, 80, &before).await;
    // The second policy edited out of the class (another selector, the same
    // node): the node's class is now both selectors; it moves to their new
    // group, complete first, in one call, and the old group goes. Both
    // rules are admitted at every poll.
    let patch = serde_json::json!({ "spec": { "nodeSelector": { "matchExpressions": [
        { "key": "role", "operator": "Exists" }
    ] } } });
    merge_patch("ctl-sdrift-2", patch, false).await;
    let both: BTreeSet<i32> = [22, 80].into();
    let composed = eventually("moved", Duration::from_secs(60), || async {
        let (ports, groups) = admitted(&ec2, &node).await;
        assert!(
            both.is_subset(&ports),
            "a gap during the move: {ports:?} on {groups:?}"
        );
        let (a, _) = synced_group("ctl-sdrift-1").await?;
        let (b, n) = synced_group("ctl-sdrift-2").await?;
        (a == b && a != group && n == 1 && groups.contains(&a) && !groups.contains(&group))
            .then_some(a)
    })
    .await;
    eventually("the old group deleted", Duration::from_secs(30), || async {
        ec2.describe_groups(std::slice::from_ref(&group))
            .await
            .map_or(true, |g| g.is_empty())
            .then_some(())
    })
    .await;
    let ports: Vec<i32> = rules_of(&ec2, &composed)
        .await
        .iter()
        .filter(|r| !r.0)
        .map(|r| r.1.from_port)
        .collect();
    assert_eq!(ports, vec![22, 80]);
    delete_and_wait("ctl-sdrift-1").await;
    delete_and_wait("ctl-sdrift-2").await;
    // The last member gone: the group too.
    eventually(
        "the composed group deleted",
        Duration::from_secs(30),
        || async {
            ec2.describe_groups(std::slice::from_ref(&composed))
                .await
                .map_or(true, |g| g.is_empty())
                .then_some(())
        },
    )
    .await;
    ctl.stop().await;
}

/// Drift made while the controller is dead (kill -9: no shutdown, its
/// memory gone) is still known as drift by the next one: one
/// `DriftCorrected` Event, counted in status and in its metric.
#[tokio::test(flavor = "multi_thread")]
async fn drift_made_while_the_controller_is_down_is_known_after_a_restart() {
    let test = "drift-restart";
    let env = env().await;
    let client = env.client().await.unwrap();
    let net = SimNet::new().unwrap();
    let _node = sim_node(&net, test, "ctl-drift-r", "web").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut first = restartable_controller(test, port);
    create_policy(&policy(
        test,
        "ctl-drift-r",
        "web",
        vec![tcp("ssh", &[22], &["10.0.0.0/8"])],
    ))
    .await;
    let group = wait_cloud_synced("ctl-drift-r").await;
    eventually("sync recorded", Duration::from_secs(30), || async {
        get("ctl-drift-r").await.status?.cloud_sync
    })
    .await;
    let ec2 = direct();
    let before = rules_of(&ec2, &group).await;
    // kill -9, then the group is changed while no controller runs.
    first.kill().await.unwrap();
    revoke_out_of_band(&ec2, &group, 22).await;
    assert_ne!(rules_of(&ec2, &group).await, before);
    // A new controller process: it repairs, and knows it was drift.
    let mut second = restartable_controller(test, port);
    eventually("drift repaired", Duration::from_secs(60), || async {
        (rules_of(&ec2, &group).await == before).then_some(())
    })
    .await;
    let events = drift_corrected(&client, "ctl-drift-r").await;
    assert_eq!(events.len(), 1, "{events:?}");
    let repairs = eventually("counted in status", Duration::from_secs(10), || async {
        let c = get("ctl-drift-r").await.status?.cloud_sync?;
        (c.drift_repairs == 1).then_some(c.drift_repairs)
    })
    .await;
    assert_eq!(repairs, 1);
    let metrics = eventually("metrics", Duration::from_secs(10), || async {
        let out = tokio::process::Command::new("curl")
            .args(["-s", &format!("http://127.0.0.1:{port}/metrics")])
            .output()
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (!text.is_empty()).then_some(text)
    })
    .await;
    assert!(
        metrics.contains("palisade_controller_drift_corrections_total 1"),
        "{metrics}"
    );
    // Only once: a later resync of the repaired group finds nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(drift_corrected(&client, "ctl-drift-r").await.len(), 1);
    second.kill().await.unwrap();
    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    delete_and_wait("ctl-drift-r").await;
    ctl.stop().await;
}

/// A foreign group on the selected nodes' interfaces, with `rules` (ingress).
async fn foreign_group(name: &str, rules: &[(i32, &str, &str)]) -> String {
    env().await.foreign_group(name, rules).await.unwrap()
}

/// Two `role=web` nodes of `test` (named `<test>-a`, `<test>-b`) whose
/// interfaces carry one foreign group, `name`, with `rules`, and nothing
/// else.
async fn web_pair_with_group(
    test: &str,
    name: &str,
    rules: &[(i32, &str, &str)],
) -> (SimNet, SimNode, SimNode, String) {
    let net = SimNet::new().unwrap();
    let a = sim_node(&net, test, &format!("ctl-{test}-a"), "web").await;
    let b = sim_node(&net, test, &format!("ctl-{test}-b"), "web").await;
    let group = foreign_group(name, rules).await;
    for node in [&a, &b] {
        direct()
            .set_eni_groups(node.eni_id(), std::slice::from_ref(&group))
            .await
            .unwrap();
    }
    (net, a, b, group)
}

#[tokio::test(flavor = "multi_thread")]
async fn other_groups_that_widen_access_are_reported_and_never_touched() {
    let test = "effective";
    // An EKS-like cluster group on both nodes: SSH from anywhere (wider
    // than the policy), and from one office address (narrower).
    let (_net, a, _b, cluster) = web_pair_with_group(
        test,
        "eks-cluster-sg-eff",
        &[
            (22, "0.0.0.0/0", "ssh anywhere"),
            (22, "203.0.113.7/32", "office host"),
        ],
    )
    .await;
    // A node-group group on one node, equal to the policy: not reported.
    let equal = foreign_group("nodegroup-eff", &[(22, "203.0.113.0/24", "office")]).await;
    let ec2 = direct();
    ec2.set_eni_groups(a.eni_id(), &[cluster.clone(), equal.clone()])
        .await
        .unwrap();
    let before = (rules_of(&ec2, &cluster).await, rules_of(&ec2, &equal).await);

    let ctl = Running::start(test, Duration::from_secs(2), 60).await;
    create_policy(&policy(
        test,
        "ctl-eff",
        "web",
        vec![tcp("ssh", &[22], &["203.0.113.0/24"])],
    ))
    .await;
    let widened = eventually("EffectiveAccess=False", Duration::from_secs(30), || async {
        let p = get("ctl-eff").await;
        condition(&p, "EffectiveAccess")
            .filter(|c| c.0 == "False")
            .map(|c| (c, p))
    })
    .await;
    assert_eq!(widened.0.1, "WidenedByOtherGroups");
    assert!(widened.0.2.contains(&cluster), "{:?}", widened.0);
    let warnings = widened.1.status.clone().unwrap().warnings;
    let wide_rule = ec2
        .describe_rules(&cluster)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.description.as_deref() == Some("ssh anywhere"))
        .unwrap()
        .rule_id;
    let expected = format!(
        "{cluster} (eks-cluster-sg-eff) on 2 nodes allows inbound tcp/22 from 0.0.0.0/0 (rule {wide_rule}); ctl-eff allows it only from 203.0.113.0/24 (the node layer still blocks it)"
    );
    assert!(warnings.contains(&expected), "{warnings:#?}");
    // Only that rule: the narrower one and the equal group are not reported.
    let reported: Vec<&String> = warnings
        .iter()
        .filter(|w| w.contains(" allows inbound "))
        .collect();
    assert_eq!(reported.len(), 1, "{warnings:#?}");
    let gauge = ctl.ctx.metrics.encode();
    assert!(
        gauge.contains("palisade_controller_policy_widening_rules{policy=\"ctl-eff\"} 1"),
        "{gauge}"
    );

    // The wide rule removed out of band: the warning clears at the next
    // full sync, and the condition turns True.
    ec2.revoke(&cluster, palisade::policy::Direction::Ingress, &[wide_rule])
        .await
        .unwrap();
    let cleared = eventually("EffectiveAccess=True", Duration::from_secs(30), || async {
        let p = get("ctl-eff").await;
        condition(&p, "EffectiveAccess")
            .filter(|c| c.0 == "True")
            .map(|_| p)
    })
    .await;
    let warnings = cleared.status.unwrap().warnings;
    assert!(
        !warnings.iter().any(|w| w.contains(" allows inbound ")),
        "{warnings:#?}"
    );
    // The other groups were only read: their rules are as the test left
    // them, and no write named them.
    let after = (rules_of(&ec2, &cluster).await, rules_of(&ec2, &equal).await);
    assert_eq!(after.1, before.1);
    assert_eq!(after.0.len(), before.0.len() - 1);
    // Its group joined the interfaces, which kept the other groups.
    let own = wait_cloud_synced("ctl-eff").await;
    let groups = eni_groups(&a).await;
    assert!(groups.contains(&own) && groups.contains(&cluster) && groups.contains(&equal));
    delete_and_wait("ctl-eff").await;
    ctl.stop().await;
}

async fn exposure_of(client: &Client, node: &str) -> Vec<String> {
    let api: Api<FirewallNode> = Api::all(client.clone());
    api.get(node)
        .await
        .unwrap()
        .status
        .map(|s| s.exposure)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn exposure_is_the_union_of_every_group_cut_by_the_node_layer() {
    let test = "exposure";
    let client = env().await.client().await.unwrap();
    // A foreign group opening SSH, HTTPS and 8080 to anywhere.
    let (_net, a, b, _wide) = web_pair_with_group(
        test,
        "exposure-wide",
        &[
            (22, "0.0.0.0/0", "ssh"),
            (443, "0.0.0.0/0", "https"),
            (8080, "0.0.0.0/0", "alt"),
        ],
    )
    .await;
    for node in [&a, &b] {
        report_applied(&client, node.name(), &[]).await;
    }
    let ctl = Running::start(test, Duration::from_secs(2), 60).await;
    // Enforce: the node layer admits HTTPS from anywhere and SSH from the
    // office only, so of the three only HTTPS is open to the internet.
    let p = create_policy(&policy(
        test,
        "ctl-exp",
        "web",
        vec![
            tcp("https", &[443], &["0.0.0.0/0"]),
            tcp("ssh", &[22], &["203.0.113.0/24"]),
        ],
    ))
    .await;
    for node in [&a, &b] {
        eventually("node exposure", Duration::from_secs(30), || async {
            (exposure_of(&client, node.name()).await == ["tcp/443 from 0.0.0.0/0"]).then_some(())
        })
        .await;
    }
    eventually("policy exposure", Duration::from_secs(30), || async {
        let status = get("ctl-exp").await.status.unwrap_or_default();
        (status.exposure == ["tcp/443 from 0.0.0.0/0 on 2 of 2 nodes"]).then_some(())
    })
    .await;
    // Audit: the node layer drops nothing, so the union alone decides.
    set_mode("ctl-exp", palisade::api::PolicyMode::Audit).await;
    let open = [
        "tcp/22 from 0.0.0.0/0",
        "tcp/443 from 0.0.0.0/0",
        "tcp/8080 from 0.0.0.0/0",
    ];
    eventually("audit exposure", Duration::from_secs(30), || async {
        (exposure_of(&client, a.name()).await == open).then_some(())
    })
    .await;
    drop(p);
    delete_and_wait("ctl-exp").await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adopted_group_is_detached_only_where_palisade_attached_it_even_after_a_restart() {
    let test = "adopt-attach";
    let env = env().await;
    let net = SimNet::new().unwrap();
    let a = sim_node(&net, test, "ctl-aa-a", "web").await;
    let b = sim_node(&net, test, "ctl-aa-b", "web").await;
    // A node that carried the group before Palisade, by hand, and is not
    // selected: never Palisade's to change.
    let by_hand = sim_node(&net, test, "ctl-aa-hand", "db").await;
    let group = foreign_group("ctl-aa-shared", &[(5432, "10.0.0.0/8", "db")]).await;
    let ec2 = direct();
    let mut hand_groups = eni_groups(&by_hand).await;
    hand_groups.push(group.clone());
    ec2.set_eni_groups(by_hand.eni_id(), &hand_groups)
        .await
        .unwrap();

    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    let mut p = policy(
        test,
        "ctl-aa",
        "web",
        vec![tcp("ssh", &[22], &["10.0.0.0/8"])],
    );
    p.spec.security_group = Some(SecurityGroupTarget {
        id: Some(group.clone()),
        attach_to_nodes: Some(true),
        ..Default::default()
    });
    create_policy(&p).await;
    eventually("attached to both", Duration::from_secs(30), || async {
        let sg = get("ctl-aa").await.status?.security_group?;
        (sg.attached == 2).then_some(())
    })
    .await;
    for node in [&a, &b] {
        assert!(eni_groups(node).await.contains(&group));
    }
    let sg = get("ctl-aa").await.status.unwrap().security_group.unwrap();
    let mut both = vec![a.instance_id().to_string(), b.instance_id().to_string()];
    both.sort();
    assert_eq!(sg.attached_sample, both);

    // A restart forgets everything in memory; what Palisade attached is
    // known from the interfaces themselves.
    ctl.stop().await;
    let client = env.client().await.unwrap();
    relabel(&client, b.name(), "gone").await;
    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    eventually("detached from b", Duration::from_secs(30), || async {
        (!eni_groups(&b).await.contains(&group)).then_some(())
    })
    .await;
    assert!(eni_groups(&a).await.contains(&group));
    assert!(
        eni_groups(&by_hand).await.contains(&group),
        "the hand-made attachment was touched"
    );

    // Deleted: off every interface it was put on, the others untouched.
    delete_and_wait("ctl-aa").await;
    assert!(!eni_groups(&a).await.contains(&group));
    assert_eq!(eni_groups(&by_hand).await, hand_groups);
    ctl.stop().await;
}

/// What the controller does when its own Deployment is being deleted (an
/// uninstall or a GitOps prune that ran no pre-delete hook): `release`
/// deletes each policy's group and drops its finalizer without waiting
/// for agents (an agent still lists the policy here); a group EC2 refuses
/// to delete is named by a `SecurityGroupLeft` Warning Event, and the
/// finalizer goes anyway, so a CRD deletion never waits on it.
#[tokio::test(flavor = "multi_thread")]
async fn release_deletes_groups_drops_finalizers_and_names_what_it_left() {
    let test = "release";
    let env = env().await;
    let client = env.client().await.unwrap();
    let net = SimNet::new().unwrap();
    let _node = sim_node(&net, test, "ctl-release-web", "web").await;
    let has_finalizer = |p: &FirewallPolicy| {
        p.finalizers()
            .iter()
            .any(|f| f == palisade::controller::FINALIZER)
    };

    // Released cleanly.
    let proxy = Arc::new(FaultProxy::start(&env.ec2_endpoint()).unwrap());
    let ctl = Running::start_with(test, Duration::from_secs(300), 60, proxy.clone()).await;
    let p = policy(
        test,
        "ctl-release",
        "web",
        vec![tcp("ssh", &[22], &["203.0.113.0/24"])],
    );
    create_policy(&p).await;
    let group = wait_cloud_synced("ctl-release").await;
    report_applied(&client, "ctl-release-web", &[&get("ctl-release").await]).await;
    let ctx = ctl.ctx.clone();
    ctl.stop().await;
    let done = controller::release::release(ctx, Duration::from_secs(20)).await;
    assert_eq!(done.released, ["ctl-release"]);
    assert!(done.left.is_empty() && done.held.is_empty(), "{done:?}");
    let left = direct().describe_groups(std::slice::from_ref(&group)).await;
    assert!(
        left.map(|g| g.is_empty()).unwrap_or(true),
        "{group} still exists"
    );
    assert!(!has_finalizer(&get("ctl-release").await));
    assert!(
        !events_for(&client, "ctl-release", "Released")
            .await
            .is_empty()
    );
    policies()
        .await
        .delete("ctl-release", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone("ctl-release", Duration::from_secs(10)).await;

    // EC2 refuses the deletion: released anyway, and said so.
    let ctl = Running::start_with(test, Duration::from_secs(300), 60, proxy.clone()).await;
    let p = policy(
        test,
        "ctl-release-left",
        "web",
        vec![tcp("ssh", &[22], &["203.0.113.0/24"])],
    );
    create_policy(&p).await;
    let group = wait_cloud_synced("ctl-release-left").await;
    let ctx = ctl.ctx.clone();
    ctl.stop().await;
    proxy.set_plan(FaultPlan {
        scripted: vec![ScriptedError {
            action: "DeleteSecurityGroup".into(),
            code: "UnauthorizedOperation".into(),
            times: 100,
        }],
        ..Default::default()
    });
    let done = controller::release::release(ctx, Duration::from_secs(20)).await;
    proxy.set_plan(FaultPlan::default());
    assert!(done.released.is_empty(), "{done:?}");
    assert_eq!(done.left.len(), 1, "{done:?}");
    assert!(done.left[0].starts_with("ctl-release-left: "), "{done:?}");
    assert!(!has_finalizer(&get("ctl-release-left").await));
    let warnings = events_for(&client, "ctl-release-left", "SecurityGroupLeft").await;
    assert_eq!(warnings.len(), 1);
    let note = warnings[0].note.clone().unwrap_or_default();
    assert!(
        note.contains(&group) && note.contains("aws ec2 delete-security-group"),
        "{note}"
    );
    assert_eq!(warnings[0].type_.as_deref(), Some("Warning"));
    // The group is still there, detached: what the Event tells the user to do.
    direct().delete_group(&group).await.unwrap();
    policies()
        .await
        .delete("ctl-release-left", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone("ctl-release-left", Duration::from_secs(10)).await;
}

/// Sets the ingress rules of policy `name` (a merge patch of the one
/// field, as `kubectl patch` would).
async fn set_ingress(name: &str, ingress: Vec<FirewallRule>) {
    merge_patch(
        name,
        serde_json::json!({ "spec": { "ingress": ingress } }),
        false,
    )
    .await;
}

/// The groups Palisade created for policy `name` alone, found in moto by
/// its identity tag.
async fn own_groups_of(ec2: &AwsEc2, name: &str) -> Vec<String> {
    let uid = get(name).await.metadata.uid.unwrap();
    ec2.find_groups(&BTreeMap::from([(tags::POLICY_UID.to_string(), uid)]))
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_without_cloud_rules_takes_no_slot_and_a_new_node_takes_every_group_in_one_call() {
    let test = "slots";
    env().await;
    let net = SimNet::new().unwrap();
    let web = sim_node(&net, test, "ctl-slots-web", "web").await;
    let default_groups = eni_groups(&web).await;
    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    let ec2 = direct();
    let node_only = || {
        let mut r = tcp("ssh", &[22], &["10.0.0.0/8"]);
        r.layers = Some(vec![palisade::api::Layer::Node]);
        r
    };

    // Node-layer rules only: no group is created or attached, and the
    // status says why; attached or not (`attachToNodes: false`), such a
    // new policy costs no EC2 call at all.
    ctl.proxy.take_calls();
    create_policy(&policy(test, "ctl-slots-node", "web", vec![node_only()])).await;
    let mut unattached = policy(test, "ctl-slots-unattached", "web", vec![node_only()]);
    unattached.spec.security_group = Some(SecurityGroupTarget {
        attach_to_nodes: Some(false),
        ..Default::default()
    });
    create_policy(&unattached).await;
    let no_group_of = |name: &'static str| async move {
        let p = get(name).await;
        let s = p.status.as_ref()?;
        let (status, reason, _) = condition(&p, "CloudSynced")?;
        (s.observed_generation == p.metadata.generation
            && status == "True"
            && reason == "NoCloudRules"
            && s.security_group.is_none())
        .then_some(())
    };
    let no_group = || no_group_of("ctl-slots-node");
    eventually("no group", Duration::from_secs(60), no_group).await;
    eventually("no group, unattached", Duration::from_secs(60), || {
        no_group_of("ctl-slots-unattached")
    })
    .await;
    let calls = ctl.proxy.take_calls();
    assert!(calls.is_empty(), "no EC2 call for them: {calls:?}");
    assert!(own_groups_of(&ec2, "ctl-slots-node").await.is_empty());
    assert!(own_groups_of(&ec2, "ctl-slots-unattached").await.is_empty());
    assert_eq!(eni_groups(&web).await, default_groups);
    delete_and_wait("ctl-slots-unattached").await;

    // A cloud rule added: the group is created, filled and attached.
    set_ingress(
        "ctl-slots-node",
        vec![node_only(), tcp("https", &[443], &["10.0.0.0/8"])],
    )
    .await;
    let group = wait_cloud_synced("ctl-slots-node").await;
    assert!(eni_groups(&web).await.contains(&group));
    assert!(
        rules_of(&ec2, &group)
            .await
            .iter()
            .any(|(_, _, d)| d.contains("ctl-slots-node/https"))
    );
    // Removed again: the group leaves the interface and is deleted.
    set_ingress("ctl-slots-node", vec![node_only()]).await;
    eventually("no group again", Duration::from_secs(60), no_group).await;
    eventually("group deleted", Duration::from_secs(30), || async {
        own_groups_of(&ec2, "ctl-slots-node")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    assert_eq!(eni_groups(&web).await, default_groups);

    // Two policies with different selectors over the web nodes (one pool,
    // one all-nodes), each with a group of its own (named: composable
    // policies would share one, see the composed-group tests).
    let named = |name: &str| SecurityGroupTarget {
        name: Some(format!("palisade-{name}")),
        ..Default::default()
    };
    let mut pool_policy = policy(
        test,
        "ctl-slots-pool",
        "web",
        vec![tcp("app", &[8080], &["10.0.0.0/8"])],
    );
    pool_policy.spec.security_group = Some(named("ctl-slots-pool"));
    create_policy(&pool_policy).await;
    let mut everyone = policy(
        test,
        "ctl-slots-all",
        "web",
        vec![tcp("metrics", &[9100], &["10.0.0.0/8"])],
    );
    everyone.spec.node_selector = Some(NodeSelector {
        match_labels: Some(BTreeMap::from([(TEST_LABEL.to_string(), test.to_string())])),
        match_expressions: None,
    });
    everyone.spec.security_group = Some(named("ctl-slots-all"));
    create_policy(&everyone).await;
    let pool = wait_cloud_synced("ctl-slots-pool").await;
    let all = wait_cloud_synced("ctl-slots-all").await;
    eventually("both on web", Duration::from_secs(30), || async {
        let groups = eni_groups(&web).await;
        (groups.contains(&pool) && groups.contains(&all)).then_some(())
    })
    .await;

    // A node joins: its interface takes both groups in one call (the
    // first of the two reconciles puts the other's group there too), and
    // nothing for the node-only policy.
    ctl.proxy.take_calls();
    let web2 = sim_node(&net, test, "ctl-slots-web2", "web").await;
    // The controller may be quicker than a read here: the simulated nodes
    // all start with the subnet's default group.
    let web2_default = default_groups.clone();
    eventually(
        "the new node carries both",
        Duration::from_secs(60),
        || async {
            let groups = eni_groups(&web2).await;
            (groups.contains(&pool) && groups.contains(&all)).then_some(())
        },
    )
    .await;
    // Both policies report the node (a reconcile of each ran).
    eventually("both count it", Duration::from_secs(30), || async {
        for name in ["ctl-slots-pool", "ctl-slots-all"] {
            let g = get(name).await.status?.security_group?;
            (g.attached == 2).then_some(())?;
        }
        Some(())
    })
    .await;
    let calls = ctl.proxy.take_calls();
    let modify = count(&calls, "ModifyNetworkInterfaceAttribute");
    assert_eq!(modify, 1, "one call for one new interface");
    let mut want = web2_default.clone();
    want.extend([pool.clone(), all.clone()]);
    want.sort();
    let mut have = eni_groups(&web2).await;
    have.sort();
    assert_eq!(have, want);
    for name in ["ctl-slots-node", "ctl-slots-pool", "ctl-slots-all"] {
        delete_and_wait(name).await;
    }
    assert_eq!(eni_groups(&web).await, default_groups);
    assert_eq!(eni_groups(&web2).await, web2_default);
    for g in [&pool, &all] {
        assert!(
            ec2.describe_groups(std::slice::from_ref(g))
                .await
                .map_or(true, |f| f.is_empty())
        );
    }
    ctl.stop().await;
}

/// Upgrading from a controller that gave a node-layer policy with
/// `attachToNodes: false` an empty group of its own: the first sync of the
/// new one deletes that group (its status records it) rather than forget
/// it, though the policy was never edited.
#[tokio::test(flavor = "multi_thread")]
async fn an_empty_group_an_older_controller_made_is_deleted_on_the_first_sync() {
    let test = "oldgroup";
    let env = env().await;
    let ec2 = direct();
    let mut r = tcp("ssh", &[22], &["10.0.0.0/8"]);
    r.layers = Some(vec![palisade::api::Layer::Node]);
    let mut p = policy(test, "ctl-oldgroup", "web", vec![r]);
    p.spec.security_group = Some(SecurityGroupTarget {
        attach_to_nodes: Some(false),
        ..Default::default()
    });
    // No controller runs for this test yet: the older one's work, by hand.
    let created = create_policy(&p).await;
    let uid = created.metadata.uid.clone().unwrap();
    let vpc = env.sim_cloud().await.unwrap().vpc_id.clone();
    let group = foreign_group(&format!("palisade-ctl-oldgroup-{uid}"), &[]).await;
    let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
    env.ec2_client()
        .create_tags()
        .resources(&group)
        .tags(tag(tags::CLUSTER, "ctrl-tests"))
        .tags(tag(tags::POLICY, "ctl-oldgroup"))
        .tags(tag(tags::POLICY_UID, &uid))
        .tags(tag(tags::MANAGED_BY, tags::MANAGER))
        .send()
        .await
        .unwrap();
    let status = serde_json::json!({ "status": {
        "observedGeneration": 1,
        "securityGroup": { "id": group, "vpcId": vpc, "owned": true,
            "ingressRules": 0, "egressRules": 0, "attached": 0 },
    }});
    merge_patch("ctl-oldgroup", status, true).await;
    assert_eq!(
        own_groups_of(&ec2, "ctl-oldgroup").await,
        std::slice::from_ref(&group)
    );

    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    eventually("the old group deleted", Duration::from_secs(60), || async {
        let p = get("ctl-oldgroup").await;
        let (status, reason, _) = condition(&p, "CloudSynced")?;
        (status == "True"
            && reason == "NoCloudRules"
            && p.status.as_ref()?.security_group.is_none())
        .then_some(())
    })
    .await;
    assert!(own_groups_of(&ec2, "ctl-oldgroup").await.is_empty());
    delete_and_wait("ctl-oldgroup").await;
    ctl.stop().await;
}

/// The tcp ports from 10.0.0.0/8 the groups on `node`'s interface admit
/// together, read as one consistent view (read again should a group go
/// between the two reads), and those groups.
async fn admitted(ec2: &AwsEc2, node: &SimNode) -> (BTreeSet<i32>, Vec<String>) {
    'read: loop {
        let groups = eni_groups(node).await;
        let mut ports = BTreeSet::new();
        for g in &groups {
            let Ok(rules) = ec2.describe_rules(g).await else {
                continue 'read;
            };
            for r in rules {
                if r.direction == palisade::policy::Direction::Ingress
                    && r.permission.peer
                        == palisade::policy::SgPeer::Ipv4("10.0.0.0/8".parse().unwrap())
                {
                    ports.insert(r.permission.from_port);
                }
            }
        }
        if eni_groups(node).await == groups {
            return (ports, groups);
        }
    }
}

/// Labels node `name` with `labels` (a merge patch).
async fn label(client: &Client, name: &str, labels: &[(String, String)]) {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels: BTreeMap<&str, &str> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let patch = serde_json::json!({ "metadata": { "labels": labels } });
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_policies_with_different_selectors_compose_into_one_group_per_node() {
    let test = "compose";
    let env = env().await;
    let client = env.client().await.unwrap();
    let net = SimNet::new().unwrap();
    // Node a is in pools 1..=19, node b in pools 1..=10; one policy per
    // pool (19 different selectors) and one selecting every node: a is
    // selected by 20 policies, b by 11.
    let pools = |n: usize| -> Vec<(String, String)> {
        (1..=n)
            .map(|i| (format!("pool-{i}"), "yes".to_string()))
            .collect()
    };
    let node = |name: &'static str, n: usize| {
        let mut labels = pools(n);
        labels.push((TEST_LABEL.to_string(), test.to_string()));
        labels.push(("role".to_string(), "web".to_string()));
        SimNode::create(env, &net, name, labels)
    };
    let a = node("ctl-compose-a", 19).await.unwrap();
    let b = node("ctl-compose-b", 10).await.unwrap();
    let defaults = eni_groups(&a).await;
    let names: Vec<String> = (0..20).map(|i| format!("ctl-compose-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let mut p = policy(
            test,
            name,
            "web",
            vec![tcp("app", &[8000 + i as u16], &["10.0.0.0/8"])],
        );
        let mut labels = BTreeMap::from([(TEST_LABEL.to_string(), test.to_string())]);
        if i > 0 {
            labels.insert(format!("pool-{i}"), "yes".to_string());
        }
        p.spec.node_selector = Some(NodeSelector {
            match_labels: Some(labels),
            match_expressions: None,
        });
        create_policy(&p).await;
    }
    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    let ec2 = direct();
    let ports = |n: usize| -> BTreeSet<i32> { (0..=n as i32).map(|i| 8000 + i).collect() };
    // Every group seen on the interfaces, to check at the end that none is
    // left.
    let seen: std::sync::Mutex<BTreeSet<String>> = Default::default();

    // Converged: each interface carries one Palisade group next to its
    // default, admitting exactly the union of its policies' cloud rules;
    // never more than 5 groups on an interface at any poll.
    let converged = eventually("composed", Duration::from_secs(180), || {
        let (a, b, ec2, defaults, seen) = (&a, &b, &ec2, &defaults, &seen);
        let want_a = ports(19);
        let want_b = ports(10);
        async move {
            let (on_a, groups_a) = admitted(ec2, a).await;
            let (on_b, groups_b) = admitted(ec2, b).await;
            assert!(
                groups_a.len() <= 5 && groups_b.len() <= 5,
                "{groups_a:?} {groups_b:?}"
            );
            seen.lock().unwrap().extend(
                groups_a
                    .iter()
                    .chain(&groups_b)
                    .filter(|g| !defaults.contains(g))
                    .cloned(),
            );
            if groups_a.len() != defaults.len() + 1 || groups_b.len() != defaults.len() + 1 {
                return None;
            }
            (on_a == want_a && on_b == want_b).then_some((groups_a, groups_b))
        }
    })
    .await;
    let group_a = converged
        .0
        .iter()
        .find(|g| !defaults.contains(g))
        .unwrap()
        .clone();
    let group_b = converged
        .1
        .iter()
        .find(|g| !defaults.contains(g))
        .unwrap()
        .clone();
    assert_ne!(group_a, group_b);
    // Every policy reports its cloud layer synced, naming a group that
    // holds its rule.
    for (i, name) in names.iter().enumerate() {
        let group = wait_cloud_synced(name).await;
        assert!(group == group_a || group == group_b, "{name}: {group}");
        let status = get(name).await.status.unwrap().security_group.unwrap();
        assert_eq!(status.ingress_rules, 1, "{name}");
        assert_eq!(
            status.attached,
            if i == 0 || i <= 10 { 2 } else { 1 },
            "{name}"
        );
        // Every group holding its rules is listed, with its nodes there:
        // the policies on both nodes are in two groups (one per class).
        let want: BTreeSet<(String, i32)> = if i <= 10 {
            BTreeSet::from([(group_a.clone(), 1), (group_b.clone(), 1)])
        } else {
            BTreeSet::from([(group_a.clone(), 1)])
        };
        let listed: BTreeSet<(String, i32)> = status
            .groups
            .iter()
            .map(|g| (g.id.clone(), g.nodes))
            .collect();
        assert_eq!(listed, want, "{name}: {status:?}");
        assert_eq!(status.group_count, want.len() as i32, "{name}");
        assert_eq!(status.groups[0].id, status.id, "{name}");
    }

    // b joins pools 11..=19: it moves to a's group in one call; ports
    // 8000..=8010, allowed before and after, are admitted at every poll.
    ctl.proxy.take_calls();
    label(&client, "ctl-compose-b", &pools(19)).await;
    eventually("b moved", Duration::from_secs(60), || {
        let (b, ec2, group_a, group_b, seen) = (&b, &ec2, &group_a, &group_b, &seen);
        let kept = ports(10);
        async move {
            let (on_b, groups_b) = admitted(ec2, b).await;
            assert!(groups_b.len() <= 5, "{groups_b:?}");
            assert!(
                kept.is_subset(&on_b),
                "a gap during the move: {on_b:?} on {groups_b:?}"
            );
            seen.lock().unwrap().extend(groups_b.iter().cloned());
            (groups_b.contains(group_a) && !groups_b.contains(group_b)).then_some(())
        }
    })
    .await;
    eventually("b's old group deleted", Duration::from_secs(60), || async {
        let gone = ec2
            .describe_groups(std::slice::from_ref(&group_b))
            .await
            .map_or(true, |g| g.is_empty());
        let (on_b, groups_b) = admitted(&ec2, &b).await;
        assert!(ports(10).is_subset(&on_b), "{on_b:?}");
        (gone && groups_b.len() == defaults.len() + 1 && on_b == ports(19)).then_some(())
    })
    .await;
    let calls = ctl.proxy.take_calls();
    assert_eq!(
        count(&calls, "ModifyNetworkInterfaceAttribute"),
        1,
        "b's interface moves in one call"
    );
    // The policies on both nodes now name one group, on both.
    eventually("one group in status", Duration::from_secs(60), || async {
        let status = get(&names[1]).await.status?.security_group?;
        let listed: Vec<(String, i32)> = status
            .groups
            .iter()
            .map(|g| (g.id.clone(), g.nodes))
            .collect();
        (status.group_count == 1 && listed == [(group_a.clone(), 2)]).then_some(())
    })
    .await;

    // All deleted: every group they had is gone, the interfaces as they were.
    for name in &names {
        policies()
            .await
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    for name in &names {
        wait_gone(name, Duration::from_secs(120)).await;
    }
    assert_eq!(eni_groups(&a).await, defaults);
    assert_eq!(eni_groups(&b).await, defaults);
    let mut seen = seen.into_inner().unwrap();
    seen.retain(|g| !defaults.contains(g));
    assert!(seen.contains(&group_a) && seen.contains(&group_b));
    for g in &seen {
        assert!(
            ec2.describe_groups(std::slice::from_ref(g))
                .await
                .map_or(true, |f| f.is_empty()),
            "{g} left behind"
        );
    }
    ctl.stop().await;
}

/// The composed groups holding the selector of the policies tagged with
/// `selector_tag` (read from a group's tags), as moto has them.
async fn composed_with(ec2: &AwsEc2, selector_tag: &str) -> Vec<String> {
    ec2.find_groups(&BTreeMap::from([(
        selector_tag.to_string(),
        "1".to_string(),
    )]))
    .await
    .unwrap()
    .into_iter()
    .map(|g| g.id)
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_composition_leaves_no_twin_and_nothing_behind() {
    let test = "compose-kill";
    env().await;
    let net = SimNet::new().unwrap();
    let labels = [
        (TEST_LABEL, test),
        ("role", "web"),
        ("pool-1", "yes"),
        ("pool-2", "yes"),
        ("pool-3", "yes"),
    ];
    let a = SimNode::create(env().await, &net, "ctl-ckill-a", labels)
        .await
        .unwrap();
    let defaults = eni_groups(&a).await;
    let ec2 = direct();
    let make = |i: u16| {
        let mut p = policy(
            test,
            &format!("ctl-ckill-{i}"),
            "web",
            vec![tcp("app", &[9000 + i], &["10.0.0.0/8"])],
        );
        let mut labels = BTreeMap::from([(TEST_LABEL.to_string(), test.to_string())]);
        if i > 0 {
            labels.insert(format!("pool-{i}"), "yes".to_string());
        }
        p.spec.node_selector = Some(NodeSelector {
            match_labels: Some(labels),
            match_expressions: None,
        });
        p
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut controller = restartable_controller(test, port);
    create_policy(&make(0)).await;
    create_policy(&make(1)).await;
    let first = eventually("composed", Duration::from_secs(60), || async {
        let groups = eni_groups(&a).await;
        let ours: Vec<&String> = groups.iter().filter(|g| !defaults.contains(g)).collect();
        let [g] = ours.as_slice() else { return None };
        let described = ec2.describe_groups(std::slice::from_ref(*g)).await.ok()?;
        let tags = &described.first()?.tags;
        (tags
            .keys()
            .filter(|k| k.starts_with("palisade.dev/selector."))
            .count()
            == 2)
            .then(|| (g.to_string(), tags.clone()))
    })
    .await;
    // A selector tag of the first group: the selectors of policies 0 and 1
    // are in every class of this test, so every composed group it makes
    // carries it.
    let c0_tag = first
        .1
        .keys()
        .find(|k| k.starts_with("palisade.dev/selector."))
        .cloned()
        .unwrap();
    assert_eq!(composed_with(&ec2, &c0_tag).await, vec![first.0.clone()]);
    // Each new policy changes the node's class (a new group, an interface
    // move, the old group deleted); the controller is killed (SIGKILL)
    // partway, at a different point each time, and started again.
    for (i, after_ms) in [(2u16, 150u64), (3, 600)] {
        create_policy(&make(i)).await;
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        controller.kill().await.unwrap();
        controller = restartable_controller(test, port);
    }
    let want: BTreeSet<i32> = (9000..=9003).collect();
    let last = eventually(
        "converged after the kills",
        Duration::from_secs(120),
        || async {
            let (ports, groups) = admitted(&ec2, &a).await;
            assert!(groups.len() <= 5, "{groups:?}");
            let ours: Vec<String> = groups
                .into_iter()
                .filter(|g| !defaults.contains(g))
                .collect();
            let composed = composed_with(&ec2, &c0_tag).await;
            (ours.len() == 1 && ports == want && composed == ours).then(|| ours[0].clone())
        },
    )
    .await;
    assert_ne!(last, first.0);
    controller.kill().await.unwrap();
    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    for i in 0..=3 {
        delete_and_wait(&format!("ctl-ckill-{i}")).await;
    }
    assert_eq!(eni_groups(&a).await, defaults);
    assert_eq!(composed_with(&ec2, &c0_tag).await, Vec::<String>::new());
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn policies_whose_union_does_not_fit_one_group_say_so_before_any_write() {
    let test = "compose-quota";
    env().await;
    let net = SimNet::new().unwrap();
    let web = sim_node(&net, test, "ctl-cq-web", "web").await;
    let defaults = eni_groups(&web).await;
    // Two policies with different selectors over one node, 40 rules each:
    // each fits a group, their union (80) does not fit the node's one.
    let cidrs: Vec<String> = (0..40).map(|i| format!("10.1.0.{i}/32")).collect();
    let cidrs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
    let mut pool = policy(
        test,
        "ctl-cq-pool",
        "web",
        vec![tcp("app", &[1000], &cidrs)],
    );
    pool.spec.node_selector.as_mut().unwrap().match_labels = Some(BTreeMap::from([
        (TEST_LABEL.to_string(), test.to_string()),
        ("role".to_string(), "web".to_string()),
    ]));
    let mut everyone = policy(test, "ctl-cq-all", "web", vec![tcp("app", &[2000], &cidrs)]);
    everyone.spec.node_selector = Some(NodeSelector {
        match_labels: Some(BTreeMap::from([(TEST_LABEL.to_string(), test.to_string())])),
        match_expressions: None,
    });
    create_policy(&pool).await;
    create_policy(&everyone).await;
    let ctl = Running::start(test, Duration::from_secs(300), 60).await;
    for name in ["ctl-cq-pool", "ctl-cq-all"] {
        let stalled = eventually("Stalled", Duration::from_secs(60), || async {
            let p = get(name).await;
            condition(&p, "Stalled").filter(|c| c.0 == "True")
        })
        .await;
        assert_eq!(stalled.1, "QuotaExceeded", "{stalled:?}");
        assert!(
            stalled.2.contains("ctl-cq-all, ctl-cq-pool")
                && stalled.2.contains("together on node ctl-cq-web")
                && stalled.2.contains("need 80 ingress"),
            "{stalled:?}"
        );
    }
    let calls = ctl.proxy.take_calls();
    for write in [
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "ModifyNetworkInterfaceAttribute",
    ] {
        assert_eq!(count(&calls, write), 0, "{write}");
    }
    assert_eq!(eni_groups(&web).await, defaults);
    delete_and_wait("ctl-cq-pool").await;
    delete_and_wait("ctl-cq-all").await;
    ctl.stop().await;
}
