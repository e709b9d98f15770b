//! Effective exposure: per node, what the whole internet (`0.0.0.0/0`,
//! `::/0`) and the VPC (`--vpc-cidr`) can reach inbound after both layers,
//! the union of every Security Group on its interface intersected with its
//! node layer ([`crate::policy::effective::exposure`]).
//!
//! A pass runs once per resync interval, from what the controller already
//! holds: the instances its full syncs described (their interfaces'
//! groups), the groups it read (cached in [`super::effective::GroupCache`];
//! a group not yet read is read once), Nodes from the watch cache and
//! policies from the controller's own store. No LIST. Each node's result is
//! written to its `FirewallNode` (`status.exposure`, this controller's field
//! manager, only when it changed); each policy's status summarises its
//! selected nodes at its next reconcile.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use serde_json::json;

use crate::api::{FirewallNode, FirewallPolicy, Layer, PolicyMode};
use crate::cloud::Ec2;
use crate::policy::effective::{Exposed, Intent, exposure};
use crate::policy::{Direction, Facts, SgPermission, compile_policy};

use super::{Context, lock};

/// Field manager of the `status.exposure` writes.
pub const FIELD_MANAGER: &str = "palisade-controller-exposure";

/// Most entries a policy's status lists.
pub const POLICY_EXPOSURE: usize = 10;

/// The ranges exposure is computed for: anywhere, and the VPC.
pub fn scopes(vpc: &[IpNet]) -> Vec<IpNet> {
    let mut s: Vec<IpNet> = vec![IpNet::V4(Default::default()), IpNet::V6(Default::default())];
    s.extend(vpc.iter().copied());
    s.dedup();
    s
}

/// One node's exposure, as text (`tcp/443 from 0.0.0.0/0`), plus how many
/// entries were left out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeExposure {
    /// Entries, sorted.
    pub open: Vec<String>,
    /// Entries left out (over the bound).
    pub more: usize,
}

impl NodeExposure {
    /// The list written to `FirewallNode.status.exposure`.
    pub fn lines(&self) -> Vec<String> {
        let mut out = self.open.clone();
        if self.more > 0 {
            out.push(format!("... and {} more", self.more));
        }
        out
    }
}

/// Computes every node's exposure from what the controller holds; nodes
/// whose interface is unknown (not on EC2, or never described) are left
/// out. Reads a group from EC2 only when the cache lacks it.
pub(crate) async fn compute<E: Ec2>(
    ctx: &Context<E>,
    policies: &[Arc<FirewallPolicy>],
) -> BTreeMap<String, NodeExposure> {
    let nodes = ctx.cache.nodes();
    let facts = Facts {
        nodes: nodes.clone(),
        quota: ctx.config.quota,
        ..Default::default()
    };
    // Node-layer inbound intent per node: the union of the Enforce
    // policies governing its inbound traffic (None: no such policy). Each
    // policy's list once, and per node the indices of its policies' lists:
    // a copy of each list for every node it selects held one copy per
    // (node, policy) pair at once (5 MB of the 21 MB heap peak at 1,000
    // nodes × 200 policies, heaptrack; ≈ 25 times that at 5,000 × 1,000).
    // Each node's union is put together when it is judged.
    let mut lists: Vec<Vec<SgPermission>> = Vec::new();
    let mut node_intent: HashMap<String, Vec<usize>> = HashMap::new();
    for policy in policies {
        if policy.metadata.deletion_timestamp.is_some() || policy.spec.mode != PolicyMode::Enforce {
            continue;
        }
        let Ok(compiled) = compile_policy(policy, &facts) else {
            continue;
        };
        let intent = Intent::of(&compiled.policy, &facts, Layer::Node);
        let Some(ingress) = intent.direction(Direction::Ingress) else {
            continue;
        };
        lists.push(ingress.to_vec());
        for node in &compiled.selected_nodes {
            node_intent
                .entry(node.clone())
                .or_default()
                .push(lists.len() - 1);
        }
    }
    let instances = lock(&ctx.instances).clone();
    let wanted: BTreeSet<String> = nodes
        .iter()
        .filter_map(|n| instances.get(n.instance_id()?))
        .flat_map(|i| i.eni_groups.iter().cloned())
        .collect();
    let missing: Vec<String> = wanted
        .into_iter()
        .filter(|g| !ctx.groups.holds(g))
        .collect();
    if !missing.is_empty()
        && let Err(e) = super::effective::read_groups(
            ctx.ec2.as_ref(),
            &ctx.groups,
            &ctx.config.cluster_name,
            &missing,
        )
        .await
    {
        tracing::warn!(error = %e, "reading Security Groups for exposure failed");
    }
    let scopes = scopes(&ctx.config.vpc_cidrs);
    let mut out = BTreeMap::new();
    for node in nodes.iter() {
        let Some(instance) = node.instance_id().and_then(|id| instances.get(id)) else {
            continue;
        };
        let Some(union) = ctx.groups.ingress_union(&instance.eni_groups) else {
            continue;
        };
        let intent: Option<Vec<SgPermission>> = node_intent
            .get(&node.name)
            .map(|ix| ix.iter().flat_map(|&i| lists[i].iter().cloned()).collect());
        let (open, more) = exposure(&union, intent.as_deref(), &scopes);
        out.insert(
            node.name.clone(),
            NodeExposure {
                open: open.iter().map(Exposed::to_string).collect(),
                more,
            },
        );
    }
    out
}

/// Writes each node's exposure to its `FirewallNode` when it differs from
/// what the object says (from the watch cache: a restarted controller
/// rewrites nothing that is already right; nodes without a `FirewallNode`
/// are skipped: their agent creates it).
pub(crate) async fn publish<E: Ec2>(ctx: &Context<E>, computed: &BTreeMap<String, NodeExposure>) {
    let reports: HashMap<String, Vec<String>> = ctx
        .cache
        .reports()
        .iter()
        .map(|r| (r.name.clone(), r.exposure.clone()))
        .collect();
    let api: Api<FirewallNode> = Api::all(ctx.client.clone());
    for (node, exposure) in computed {
        let Some(written) = reports.get(node) else {
            continue;
        };
        let lines = exposure.lines();
        if *written == lines {
            continue;
        }
        let patch = Patch::Apply(json!({
            "apiVersion": "palisade.dev/v1alpha1",
            "kind": "FirewallNode",
            "status": {"exposure": lines},
        }));
        if let Err(e) = api
            .patch_status(node, &PatchParams::apply(FIELD_MANAGER).force(), &patch)
            .await
        {
            tracing::warn!(node, error = %e, "writing FirewallNode exposure failed");
        }
    }
}

/// A policy's exposure summary: each entry found on its selected nodes,
/// with how many of them expose it. Bounded by [`POLICY_EXPOSURE`].
pub fn summary(selected: &[String], exposures: &HashMap<String, NodeExposure>) -> Vec<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut known = 0;
    for node in selected {
        if let Some(e) = exposures.get(node) {
            known += 1;
            for line in &e.open {
                *counts.entry(line.as_str()).or_default() += 1;
            }
        }
    }
    let mut out: Vec<String> = counts
        .iter()
        .take(POLICY_EXPOSURE)
        .map(|(line, n)| format!("{line} on {n} of {known} nodes"))
        .collect();
    if counts.len() > POLICY_EXPOSURE {
        out.push(format!("... and {} more", counts.len() - POLICY_EXPOSURE));
    }
    out
}

/// The pass, once per `every`, for as long as the controller runs.
pub(crate) async fn run<E: Ec2>(
    ctx: Arc<Context<E>>,
    policies: Store<FirewallPolicy>,
    every: Duration,
) {
    if policies.wait_until_ready().await.is_err() {
        return std::future::pending::<()>().await;
    }
    ctx.cache.ready().await;
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = policies.state();
        let computed = compute(&ctx, &state).await;
        *lock(&ctx.exposure) = computed.clone().into_iter().collect();
        publish(&ctx, &computed).await;
    }
}
