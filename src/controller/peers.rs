//! Publishes the node addresses behind every `nodeSelector` peer as
//! [`FirewallPeerSlice`]s, so that agents never list or watch Nodes.
//!
//! Contract:
//! - **What:** one set of slices per selector used by a valid policy's
//!   node-layer rule, plus `<all>` (every node: the agents' `Cluster`
//!   failsafe scope). Each slice lists at most [`MAX_PEER_SLICE_NODES`]
//!   nodes with their InternalIPs; nodes without one are left out.
//! - **When:** only when a fact it publishes changes — a node joins, leaves,
//!   changes labels or addresses; a policy adds or drops a selector. Node
//!   heartbeats (status conditions, images) change none of them and cost
//!   a comparison, no write. Nothing is written before the initial lists of
//!   Nodes, policies and slices are in, so a restart never deletes a live
//!   slice.
//! - **How much:** [`plan_slices`] keeps every node in the slice it is in,
//!   fills free room before creating a slice, and rewrites only slices whose
//!   content changed: a node joining rewrites one small object, and each
//!   agent receives that object alone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{debug, warn};

use crate::api::{
    FirewallPeerSlice, FirewallPeerSliceSpec, FirewallPolicy, Layer, MAX_PEER_SLICE_NODES,
    PeerNode, SELECTOR_HASH_LABEL,
};
use crate::policy::{Direction, NodeFacts, PeerRef, Selector, validate};

use super::MANAGER;
use super::cache::ClusterCache;

/// Slices to write and to delete.
#[derive(Debug, Default)]
pub struct SlicePlan {
    /// Slices created or whose content changed (complete objects to apply).
    pub apply: Vec<FirewallPeerSlice>,
    /// Names of slices to delete.
    pub delete: Vec<String>,
}

pub use crate::api::selector_hash;

/// The selectors of a policy's node-layer `nodeSelector` peers, by their
/// canonical text (none for an invalid or deleted policy).
pub fn peer_selectors(policy: &FirewallPolicy) -> BTreeMap<String, Selector> {
    let mut out = BTreeMap::new();
    if policy.metadata.deletion_timestamp.is_some() {
        return out;
    }
    let Ok(valid) = validate(policy) else {
        return out;
    };
    for direction in [Direction::Ingress, Direction::Egress] {
        for rule in valid.rules(direction).unwrap_or_default() {
            if !rule.on(Layer::Node) {
                continue;
            }
            for peer in &rule.peers {
                if let PeerRef::Nodes(sel) = peer {
                    out.insert(sel.to_string(), sel.clone());
                }
            }
        }
    }
    out
}

/// Selector text → node name → addresses: what the slices should say.
pub type Wanted = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// What every selector stands for over `nodes` (`<all>` always included).
pub fn wanted(selectors: &BTreeMap<String, Selector>, nodes: &[NodeFacts]) -> Wanted {
    let mut all = selectors.clone();
    let everything = Selector::everything();
    all.insert(everything.to_string(), everything);
    all.into_iter()
        .map(|(text, sel)| {
            let members = sel
                .select(nodes)
                .into_iter()
                .filter(|n| !n.addresses.is_empty())
                .map(|n| {
                    let addrs = n.addresses.iter().map(ToString::to_string).collect();
                    (n.name.clone(), addrs)
                })
                .collect();
            (text, members)
        })
        .collect()
}

fn slice(name: String, hash: &str, selector: &str, nodes: Vec<PeerNode>) -> FirewallPeerSlice {
    let mut s = FirewallPeerSlice::new(
        &name,
        FirewallPeerSliceSpec {
            selector: selector.to_string(),
            nodes,
        },
    );
    s.metadata.labels = Some(
        [
            (SELECTOR_HASH_LABEL.to_string(), hash.to_string()),
            (
                "app.kubernetes.io/managed-by".to_string(),
                MANAGER.to_string(),
            ),
        ]
        .into_iter()
        .collect(),
    );
    s
}

/// Plans the slices for `wanted` given those that exist (pure).
///
/// Stable: a node stays in its slice while it is selected; new nodes fill
/// the existing slices' free room (in name order) before a new slice
/// `peers-<hash>-<n>` (smallest free `n`) is created; a slice left empty is
/// deleted, as is every slice of a selector no longer wanted.
pub fn plan_slices(wanted: &Wanted, existing: &[FirewallPeerSlice]) -> SlicePlan {
    let mut plan = SlicePlan::default();
    let mut by_selector: BTreeMap<&str, Vec<&FirewallPeerSlice>> = BTreeMap::new();
    for s in existing {
        by_selector.entry(&s.spec.selector).or_default().push(s);
    }
    for (selector, slices) in &by_selector {
        if !wanted.contains_key(*selector) {
            plan.delete.extend(slices.iter().map(|s| s.name_any()));
        }
    }
    for (selector, members) in wanted {
        let hash = selector_hash(selector);
        let mut current: Vec<&FirewallPeerSlice> = by_selector
            .get(selector.as_str())
            .cloned()
            .unwrap_or_default();
        current.sort_by_key(|s| s.name_any());
        let mut placed = std::collections::BTreeSet::new();
        let mut next: Vec<(String, Vec<PeerNode>, bool)> = Vec::new();
        for s in &current {
            let kept: Vec<PeerNode> = s
                .spec
                .nodes
                .iter()
                .filter(|n| placed.insert(n.name.clone()))
                .filter_map(|n| {
                    members.get(&n.name).map(|addrs| PeerNode {
                        name: n.name.clone(),
                        addresses: addrs.clone(),
                    })
                })
                .collect();
            let changed = kept != s.spec.nodes;
            next.push((s.name_any(), kept, changed));
        }
        let mut fresh = members
            .iter()
            .filter(|(name, _)| !placed.contains(*name))
            .map(|(name, addrs)| PeerNode {
                name: name.clone(),
                addresses: addrs.clone(),
            });
        for (_, nodes, changed) in &mut next {
            while nodes.len() < MAX_PEER_SLICE_NODES {
                let Some(n) = fresh.next() else { break };
                nodes.push(n);
                *changed = true;
            }
        }
        let mut index = 0usize;
        let taken: std::collections::BTreeSet<String> =
            next.iter().map(|(n, _, _)| n.clone()).collect();
        loop {
            let chunk: Vec<PeerNode> = fresh.by_ref().take(MAX_PEER_SLICE_NODES).collect();
            if chunk.is_empty() {
                break;
            }
            let name = loop {
                let candidate = format!("peers-{hash}-{index}");
                index += 1;
                if !taken.contains(&candidate) {
                    break candidate;
                }
            };
            next.push((name, chunk, true));
        }
        for (name, mut nodes, changed) in next {
            if nodes.is_empty() {
                plan.delete.push(name);
            } else if changed {
                nodes.sort();
                plan.apply.push(slice(name, &hash, selector, nodes));
            }
        }
    }
    plan.delete.sort();
    plan
}

/// Applies a plan: server-side apply of each slice, then the deletes.
async fn write(api: &Api<FirewallPeerSlice>, plan: SlicePlan) -> Result<(), kube::Error> {
    let pp = PatchParams::apply(MANAGER).force();
    for s in plan.apply {
        let name = s.name_any();
        let body = json!({
            "apiVersion": "palisade.dev/v1alpha1",
            "kind": "FirewallPeerSlice",
            "metadata": {"name": name, "labels": s.metadata.labels},
            "spec": s.spec,
        });
        api.patch(&name, &pp, &Patch::Apply(body)).await?;
    }
    for name in plan.delete {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One policy watch event reduced to what the publisher reads: the
/// policy's name and its node-layer peer selectors ([`peer_selectors`]).
pub type PolicyEvent = watcher::Event<(String, BTreeMap<String, Selector>)>;

/// Reduces a policy watch event to a [`PolicyEvent`] (pure).
pub fn policy_event(event: &watcher::Event<FirewallPolicy>) -> PolicyEvent {
    let reduce = |p: &FirewallPolicy| (p.name_any(), peer_selectors(p));
    match event {
        watcher::Event::Apply(p) => watcher::Event::Apply(reduce(p)),
        watcher::Event::InitApply(p) => watcher::Event::InitApply(reduce(p)),
        watcher::Event::Delete(p) => watcher::Event::Delete(reduce(p)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// What the publisher knows besides the nodes (which come from the
/// controller's [`ClusterCache`]): each policy's selectors, the slices that
/// exist, and whether each initial list is in.
#[derive(Default)]
struct Known {
    selectors: BTreeMap<String, BTreeMap<String, Selector>>,
    /// During a (re-)list of policies: the names seen so far (the others
    /// are gone once it is done).
    listing: Option<std::collections::BTreeSet<String>>,
    slices: BTreeMap<String, FirewallPeerSlice>,
    ready: [bool; 2],
}

impl Known {
    fn policy(&mut self, event: PolicyEvent) -> bool {
        match event {
            watcher::Event::Apply((name, sel)) | watcher::Event::InitApply((name, sel)) => {
                if let Some(seen) = &mut self.listing {
                    seen.insert(name.clone());
                }
                let old = self.selectors.insert(name, sel.clone());
                old.map(|o| o.keys().cloned().collect::<Vec<_>>())
                    != Some(sel.keys().cloned().collect())
            }
            watcher::Event::Delete((name, _)) => self.selectors.remove(&name).is_some(),
            watcher::Event::Init => {
                self.listing = Some(Default::default());
                false
            }
            watcher::Event::InitDone => {
                let seen = self.listing.take().unwrap_or_default();
                self.selectors.retain(|name, _| seen.contains(name));
                self.ready[0] = true;
                true
            }
        }
    }

    fn slice(&mut self, event: watcher::Event<FirewallPeerSlice>) -> bool {
        match event {
            watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                self.slices.insert(s.name_any(), s);
                false
            }
            watcher::Event::Delete(s) => {
                self.slices.remove(&s.name_any());
                false
            }
            watcher::Event::Init => false,
            watcher::Event::InitDone => {
                self.ready[1] = true;
                true
            }
        }
    }

    fn plan(&self, nodes: &[NodeFacts]) -> SlicePlan {
        let mut selectors = BTreeMap::new();
        for s in self.selectors.values() {
            selectors.extend(s.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let existing: Vec<FirewallPeerSlice> = self.slices.values().cloned().collect();
        plan_slices(&wanted(&selectors, nodes), &existing)
    }
}

/// Runs a publisher with a node cache and a policy watch of its own (for a
/// process that runs no controller, such as a test): forever.
pub async fn publish(client: Client) {
    let cache = Arc::new(ClusterCache::default());
    let (wake, mut woken) = futures::channel::mpsc::unbounded();
    let (policies, _writer) = kube::runtime::reflector::store();
    let follower = super::cache::follow(client.clone(), cache.clone(), policies, wake);
    let drain = async move { while woken.next().await.is_some() {} };
    tokio::select! {
        _ = follower => {}
        _ = drain => {}
        _ = publish_from(client.clone(), cache, own_policy_watch(client)) => {}
    }
}

/// A policy watch of the publisher's own, over every policy: for a process
/// without the controller's, or a controller that watches only some
/// policies (`--policy-selector`) while slices serve every policy.
pub fn own_policy_watch(client: Client) -> impl futures::Stream<Item = PolicyEvent> + Send {
    watcher(
        Api::<FirewallPolicy>::all(client),
        watcher::Config::default(),
    )
    .default_backoff()
    .filter_map(|e| async move {
        match e {
            Ok(e) => Some(policy_event(&e)),
            Err(e) => {
                warn!(error = %e, "policy watch error (peer slices); retrying");
                None
            }
        }
    })
}

/// Runs the publisher over the controller's `cache` and the policy events
/// `policies` (the controller's own watch, reduced: no second LIST of
/// policies) forever; the caller stops it with the controller.
pub async fn publish_from(
    client: Client,
    cache: Arc<ClusterCache>,
    policies: impl futures::Stream<Item = PolicyEvent> + Send,
) {
    let api: Api<FirewallPeerSlice> = Api::all(client.clone());
    let slices = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .modify(|s| crate::api::trim_bookkeeping(&mut s.metadata));
    let mut policies = std::pin::pin!(policies);
    let mut slices = std::pin::pin!(slices);
    let mut known = Known::default();
    let mut dirty = false;
    loop {
        let changed = tokio::select! {
            Some(e) = policies.next() => Ok(known.policy(e)),
            Some(e) = slices.next() => e.map(|e| known.slice(e)),
            _ = cache.nodes_changed.notified() => Ok(true),
            // Let a burst of events settle into one plan.
            _ = tokio::time::sleep(Duration::from_millis(100)), if dirty => Ok(false),
            else => return,
        };
        match changed {
            Ok(true) => {
                dirty = true;
                continue;
            }
            Ok(false) if !dirty => continue,
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, "peer slice watch error; retrying");
                continue;
            }
        }
        if !known.ready.iter().all(|r| *r) || !cache.is_ready() {
            continue;
        }
        dirty = false;
        let plan = known.plan(&cache.nodes());
        if plan.apply.is_empty() && plan.delete.is_empty() {
            continue;
        }
        debug!(
            apply = plan.apply.len(),
            delete = plan.delete.len(),
            "publishing peer slices"
        );
        if let Err(e) = write(&api, plan).await {
            warn!(error = %e, "writing peer slices; retrying");
            dirty = true;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn node(name: &str, role: &str, addr: &str) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            labels: [("role".to_string(), role.to_string())]
                .into_iter()
                .collect(),
            addresses: vec![addr.parse().unwrap()],
            provider_id: None,
        }
    }

    fn apply(existing: &mut Vec<FirewallPeerSlice>, plan: &SlicePlan) {
        existing.retain(|s| !plan.delete.contains(&s.name_any()));
        for s in &plan.apply {
            existing.retain(|e| e.name_any() != s.name_any());
            existing.push(s.clone());
        }
    }

    #[test]
    fn slices_are_bounded_stable_and_rewritten_only_where_changed() {
        let nodes: Vec<NodeFacts> = (0..250)
            .map(|i| {
                node(
                    &format!("n{i:03}"),
                    "web",
                    &format!("10.0.{}.{}", i / 200, i % 200 + 1),
                )
            })
            .collect();
        let selectors = BTreeMap::new();
        let mut existing = Vec::new();
        let plan = plan_slices(&wanted(&selectors, &nodes), &existing);
        assert_eq!(plan.apply.len(), 3, "250 nodes in slices of 100");
        assert!(
            plan.apply
                .iter()
                .all(|s| s.spec.nodes.len() <= MAX_PEER_SLICE_NODES)
        );
        assert!(plan.apply.iter().all(|s| s.spec.selector == "<all>"));
        apply(&mut existing, &plan);
        // Nothing changed: nothing to write.
        let again = plan_slices(&wanted(&selectors, &nodes), &existing);
        assert!(
            again.apply.is_empty() && again.delete.is_empty(),
            "{again:?}"
        );
        // One node joins: exactly one slice is rewritten (the one with room).
        let mut more = nodes.clone();
        more.push(node("zz-new", "web", "10.0.9.9"));
        let plan = plan_slices(&wanted(&selectors, &more), &existing);
        assert_eq!(plan.apply.len(), 1);
        assert!(plan.delete.is_empty());
        assert!(plan.apply[0].spec.nodes.iter().any(|n| n.name == "zz-new"));
        apply(&mut existing, &plan);
        // One node changes address: one slice rewritten.
        let mut moved = more.clone();
        moved[10].addresses = vec!["10.9.9.9".parse().unwrap()];
        let plan = plan_slices(&wanted(&selectors, &moved), &existing);
        assert_eq!(plan.apply.len(), 1);
        assert!(
            plan.apply[0]
                .spec
                .nodes
                .iter()
                .any(|n| n.addresses == ["10.9.9.9"])
        );
    }

    #[test]
    fn a_relist_forgets_policies_deleted_meanwhile() {
        let sel = |text: &str| {
            let s = Selector::everything();
            BTreeMap::from([(text.to_string(), s)])
        };
        let mut known = Known::default();
        assert!(!known.policy(watcher::Event::Init));
        known.policy(watcher::Event::InitApply(("a".into(), sel("x"))));
        known.policy(watcher::Event::InitApply(("b".into(), sel("y"))));
        assert!(known.policy(watcher::Event::InitDone));
        assert_eq!(known.selectors.len(), 2);
        // The watch expired; "b" was deleted before the re-list.
        known.policy(watcher::Event::Init);
        known.policy(watcher::Event::InitApply(("a".into(), sel("x"))));
        assert!(known.policy(watcher::Event::InitDone));
        assert_eq!(known.selectors.keys().collect::<Vec<_>>(), ["a"]);
        // A status-only write (same selectors) changes nothing.
        assert!(!known.policy(watcher::Event::Apply(("a".into(), sel("x")))));
    }

    #[test]
    fn selectors_come_and_go_with_their_slices() {
        let nodes = vec![node("a", "web", "10.0.0.1"), node("b", "db", "10.0.0.2")];
        let sel = Selector::parse(
            &crate::api::NodeSelector {
                match_labels: Some(
                    [("role".to_string(), "db".to_string())]
                        .into_iter()
                        .collect(),
                ),
                match_expressions: None,
            },
            "x",
        )
        .unwrap();
        let selectors: BTreeMap<String, Selector> = [(sel.to_string(), sel)].into_iter().collect();
        let mut existing = Vec::new();
        let plan = plan_slices(&wanted(&selectors, &nodes), &existing);
        assert_eq!(plan.apply.len(), 2);
        let db = plan
            .apply
            .iter()
            .find(|s| s.spec.selector == "role=db")
            .unwrap();
        assert_eq!(db.spec.nodes.len(), 1);
        assert_eq!(db.spec.nodes[0].name, "b");
        assert_eq!(
            db.labels().get(SELECTOR_HASH_LABEL),
            Some(&selector_hash("role=db"))
        );
        apply(&mut existing, &plan);
        let plan = plan_slices(&wanted(&BTreeMap::new(), &nodes), &existing);
        assert!(plan.apply.is_empty());
        assert_eq!(plan.delete, vec![db.name_any()]);
    }
}
