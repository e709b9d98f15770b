//! The controller's view of the cluster: Nodes (trimmed to the facts
//! Palisade uses) and the agents' FirewallNodes, kept by watches, and the
//! reconcile triggers derived from them.
//!
//! Contract:
//! - **No LIST per reconcile.** Each resource is listed once by its watch
//!   (at start and after a failover or an expired watch), then followed by
//!   events; a reconcile reads [`ClusterCache::nodes`] and
//!   [`ClusterCache::reports`].
//! - **Never older than the trigger.** A trigger for a policy is sent by the
//!   task that updates the cache, after the update: a reconcile woken by a
//!   Node or FirewallNode change always sees that change. Reconciles wait
//!   for [`ClusterCache::ready`] (both initial lists in), so a restart never
//!   plans with a half view (which could detach a group from nodes not yet
//!   seen).
//! - **Heartbeats wake nothing.** A Node is kept as [`NodeFacts`] (name,
//!   labels, InternalIPs, providerID); an event that leaves those equal —
//!   status conditions, images, resourceVersion — triggers no reconcile. A
//!   Node change wakes the policies that select it before or after, that
//!   match it as a peer before or after (a policy whose group is on a node
//!   it no longer selects selected it before: it is woken and detaches).
//!   A FirewallNode wakes the policies it lists (before or after), and
//!   those still waiting on nodes only when its sync turned failed or
//!   recovered.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{Notify, watch};
use tracing::warn;

use crate::api::{FirewallNode, FirewallPolicy};
use crate::policy::{NodeFacts, PeerRef, Selector, validate};

/// Nodes and agent reports, as the watches last delivered them.
#[derive(Debug)]
pub struct ClusterCache {
    nodes: RwLock<Table<NodeFacts>>,
    /// Every node's facts as one shared list, rebuilt on the first read
    /// after a fact changed (`None`): reconciles share it instead of each
    /// copying every node (at 500 nodes, those copies were the largest
    /// peak of the controller's heap).
    snapshot: RwLock<Option<Arc<Vec<NodeFacts>>>>,
    reports: RwLock<Table<Arc<Report>>>,
    /// Policy names and uids shared by the reports.
    names: std::sync::Mutex<Names>,
    ready: watch::Sender<[bool; 2]>,
    /// Woken when a node fact changes (the peer-slice publisher waits on it).
    pub(crate) nodes_changed: Notify,
}

impl Default for ClusterCache {
    fn default() -> Self {
        ClusterCache {
            nodes: RwLock::default(),
            snapshot: RwLock::default(),
            reports: RwLock::default(),
            names: std::sync::Mutex::default(),
            ready: watch::channel([false; 2]).0,
            nodes_changed: Notify::new(),
        }
    }
}

/// One object before and after a change (`None`: absent).
type Change<T> = (Option<T>, Option<T>);

/// One resource's objects, and during a (re-)list the names seen so far:
/// when the list is done, objects it did not deliver are gone.
#[derive(Debug)]
struct Table<T> {
    items: BTreeMap<String, T>,
    listing: Option<BTreeSet<String>>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            items: BTreeMap::new(),
            listing: None,
        }
    }
}

impl<T: Clone> Table<T> {
    /// Applies one watch event with `same` deciding whether a new version
    /// changes anything; returns the (old, new) pairs that changed.
    fn apply(
        &mut self,
        event: watcher::Event<(String, T)>,
        same: impl Fn(&T, &T) -> bool,
    ) -> Vec<Change<T>> {
        match event {
            watcher::Event::Init => {
                self.listing = Some(BTreeSet::new());
                vec![]
            }
            watcher::Event::InitApply((name, item)) | watcher::Event::Apply((name, item)) => {
                if let Some(seen) = &mut self.listing {
                    seen.insert(name.clone());
                }
                // An unchanged object (a heartbeat) keeps the stored copy:
                // the snapshot of node facts shares its labels, and a copy
                // replaced by an equal one would be held twice.
                match self.items.get(&name) {
                    Some(o) if same(o, &item) => vec![],
                    _ => {
                        let old = self.items.insert(name, item.clone());
                        vec![(old, Some(item))]
                    }
                }
            }
            watcher::Event::Delete((name, _)) => match self.items.remove(&name) {
                Some(o) => vec![(Some(o), None)],
                None => vec![],
            },
            watcher::Event::InitDone => {
                let seen = self.listing.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .items
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                gone.into_iter()
                    .filter_map(|k| self.items.remove(&k))
                    .map(|o| (Some(o), None))
                    .collect()
            }
        }
    }
}

fn keyed<K: kube::Resource, T>(
    event: watcher::Event<K>,
    f: impl FnOnce(K) -> T,
) -> watcher::Event<(String, T)> {
    let pair = |k: K| (k.name_any(), f(k));
    match event {
        watcher::Event::Apply(k) => watcher::Event::Apply(pair(k)),
        watcher::Event::InitApply(k) => watcher::Event::InitApply(pair(k)),
        watcher::Event::Delete(k) => watcher::Event::Delete(pair(k)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ClusterCache {
    /// Every node's facts, by name: one shared snapshot until a fact
    /// changes.
    pub fn nodes(&self) -> Arc<Vec<NodeFacts>> {
        if let Some(s) = read(&self.snapshot).as_ref() {
            return s.clone();
        }
        // Built under the table's read lock and stored only if no change
        // came in meanwhile (a change clears the snapshot under the
        // table's write lock, which this read lock excludes).
        let table = read(&self.nodes);
        let fresh = Arc::new(table.items.values().cloned().collect::<Vec<_>>());
        *write(&self.snapshot) = Some(fresh.clone());
        fresh
    }

    /// Every agent report.
    pub fn reports(&self) -> Vec<Arc<Report>> {
        read(&self.reports).items.values().cloned().collect()
    }

    /// Completes once both initial lists are in.
    pub async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| r.iter().all(|x| *x)).await;
    }

    /// Whether both initial lists are in.
    pub fn is_ready(&self) -> bool {
        self.ready.borrow().iter().all(|x| *x)
    }

    fn set_ready(&self, which: usize) {
        self.ready.send_modify(|r| r[which] = true);
    }

    /// Folds a Node event in; returns the (old, new) facts of each node
    /// whose facts Palisade uses changed.
    fn node_event(
        &self,
        event: watcher::Event<NodeView>,
    ) -> Vec<(Option<NodeFacts>, Option<NodeFacts>)> {
        let event = keyed(event, |n| n.facts());
        let mut table = write(&self.nodes);
        let changes = table.apply(event, |a, b| a == b);
        if !changes.is_empty() {
            *write(&self.snapshot) = None;
        }
        changes
    }

    /// Folds a FirewallNode event in; returns the (old, new) reports whose
    /// status changed.
    fn report_event(&self, event: watcher::Event<FirewallNode>) -> Vec<Change<Arc<Report>>> {
        let event = {
            let mut names = self
                .names
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            keyed(event, |r| Arc::new(Report::new(r, &mut names)))
        };
        write(&self.reports).apply(event, |a, b| a == b)
    }
}

/// What the controller keeps of an agent report: the node's name, the
/// policies applied (name, uid, generation), whether the last sync failed,
/// and the exposure the controller wrote. The rest — managedFields,
/// labels, annotations, conditions, counts, rule hashes, Audit counters,
/// the sync's time and message — is read by nothing in the controller, and
/// a change only there wakes no policy.
///
/// A node lists every policy selecting it (≈ 100 at 5,000 nodes × 1,000
/// policies in `make bench-scale`), so this is the controller's largest
/// per-node × per-policy store: each applied policy is 40 bytes, its name
/// and uid shared between every report that lists it (see [`Names`]),
/// where the trimmed `FirewallNode` took ≈ 220 (the whole `AppliedPolicy`
/// with the list's spare capacity, and the name and uid copied per node).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// The node (the `FirewallNode`'s name).
    pub name: String,
    /// The policies the agent applied, as it lists them.
    pub applied: Box<[Applied]>,
    /// The agent's last sync failed.
    pub failed: bool,
    /// `status.exposure`, as last written (by this controller).
    pub exposure: Vec<String>,
}

/// One policy an agent reports applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The policy's name.
    pub name: Arc<str>,
    /// Its uid, when the agent knew it.
    pub uid: Option<Arc<str>>,
    /// The generation applied.
    pub generation: i64,
}

impl Report {
    /// Keeps what the controller reads of `report` (see [`Report`]),
    /// sharing policy names and uids through `names`.
    pub fn new(report: FirewallNode, names: &mut Names) -> Self {
        let status = report.status.unwrap_or_default();
        Report {
            name: report.metadata.name.unwrap_or_default(),
            applied: status
                .policies
                .iter()
                .map(|p| Applied {
                    name: names.get(&p.name),
                    uid: p.uid.as_deref().map(|u| names.get(u)),
                    generation: p.generation,
                })
                .collect(),
            failed: status.last_sync.is_some_and(|s| s.result == "Failed"),
            exposure: status.exposure,
        }
    }

    /// Whether the agent lists the policy `name` (and `uid`, when both
    /// know it), at `generation` if given.
    pub fn lists(&self, name: &str, uid: Option<&str>, generation: Option<i64>) -> bool {
        self.applied.iter().any(|p| {
            *p.name == *name
                && generation.is_none_or(|g| g == p.generation)
                && (p.uid.is_none() || uid.is_none() || p.uid.as_deref() == uid)
        })
    }
}

impl From<FirewallNode> for Report {
    fn from(report: FirewallNode) -> Self {
        Report::new(report, &mut Names::default())
    }
}

/// Policy names and uids, one copy each however many reports list them.
/// Strings no report holds any more are dropped once the set has doubled
/// since the last sweep, so it stays within twice the names in use.
#[derive(Debug, Default)]
pub struct Names {
    set: std::collections::HashSet<Arc<str>>,
    swept: usize,
}

impl Names {
    /// The shared copy of `s`.
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        if self.set.len() >= 2 * self.swept.max(64) {
            self.set.retain(|a| Arc::strong_count(a) > 1);
            self.swept = self.set.len();
        }
        let a: Arc<str> = Arc::from(s);
        self.set.insert(a.clone());
        a
    }

    /// How many strings are held.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// A Node as the controller's watch decodes it: only what [`NodeFacts`]
/// reads (name, labels, `providerID`, addresses) and what the watch itself
/// needs (uid, resourceVersion). The rest of an EKS node's 7.5 KB —
/// `managedFields` (decoded as untyped JSON maps), images, conditions,
/// node info, capacity — is skipped while parsing instead of allocated and
/// dropped: a page of 500 full Nodes of the initial list was the largest
/// peak of the controller's heap at a restart (≈ 25 of its 36 MB at 1,000
/// nodes, heaptrack), and every heartbeat decoded a whole Node.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(from = "RawNode")]
pub struct NodeView(Node);

impl NodeView {
    /// The facts Palisade uses.
    pub fn facts(&self) -> NodeFacts {
        NodeFacts::from_node(&self.0)
    }
}

impl From<Node> for NodeView {
    /// Keeps of `node` what the watch would have decoded.
    fn from(node: Node) -> Self {
        RawNode {
            metadata: RawMeta {
                name: node.metadata.name,
                uid: node.metadata.uid,
                resource_version: node.metadata.resource_version,
                labels: node.metadata.labels,
            },
            spec: node.spec.map(|s| RawSpec {
                provider_id: s.provider_id,
            }),
            status: node.status.map(|s| RawStatus {
                addresses: s.addresses,
            }),
        }
        .into()
    }
}

#[derive(serde::Deserialize)]
struct RawNode {
    metadata: RawMeta,
    spec: Option<RawSpec>,
    status: Option<RawStatus>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMeta {
    name: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

#[derive(serde::Deserialize)]
struct RawSpec {
    #[serde(rename = "providerID")]
    provider_id: Option<String>,
}

#[derive(serde::Deserialize)]
struct RawStatus {
    addresses: Option<Vec<k8s_openapi::api::core::v1::NodeAddress>>,
}

impl From<RawNode> for NodeView {
    fn from(raw: RawNode) -> Self {
        use k8s_openapi::api::core::v1::{NodeSpec, NodeStatus};
        NodeView(Node {
            metadata: kube::api::ObjectMeta {
                name: raw.metadata.name,
                uid: raw.metadata.uid,
                resource_version: raw.metadata.resource_version,
                labels: raw.metadata.labels,
                ..Default::default()
            },
            spec: raw.spec.map(|s| NodeSpec {
                provider_id: s.provider_id,
                ..Default::default()
            }),
            status: raw.status.map(|s| NodeStatus {
                addresses: s.addresses,
                ..Default::default()
            }),
        })
    }
}

impl kube::Resource for NodeView {
    type DynamicType = ();
    type Scope = <Node as kube::Resource>::Scope;

    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        <Node as kube::Resource>::kind(dt)
    }
    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        <Node as kube::Resource>::group(dt)
    }
    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        <Node as kube::Resource>::version(dt)
    }
    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        <Node as kube::Resource>::plural(dt)
    }
    fn meta(&self) -> &kube::api::ObjectMeta {
        &self.0.metadata
    }
    fn meta_mut(&mut self) -> &mut kube::api::ObjectMeta {
        &mut self.0.metadata
    }
}

/// How one policy judges a node change: the policy validated (`None`:
/// invalid, so every node change concerns it and its reconcile says why)
/// and the selectors of its `nodeSelector` peers (either layer).
#[derive(Debug, Clone)]
struct Judge {
    valid: Option<crate::policy::ValidPolicy>,
    peers: Vec<Selector>,
}

impl Judge {
    fn of(policy: &FirewallPolicy) -> Judge {
        let Ok(valid) = validate(policy) else {
            return Judge {
                valid: None,
                peers: Vec::new(),
            };
        };
        let peers = [
            crate::policy::Direction::Ingress,
            crate::policy::Direction::Egress,
        ]
        .into_iter()
        .flat_map(|d| valid.rules(d).unwrap_or_default().to_vec())
        .flat_map(|r| r.peers)
        .filter_map(|p| match p {
            PeerRef::Nodes(sel) => Some(sel),
            _ => None,
        })
        .collect();
        Judge {
            valid: Some(valid),
            peers,
        }
    }

    /// Whether a change between these versions of a node concerns the
    /// policy: it selects the node before or after, or matches it as a
    /// peer before or after.
    fn concerns(&self, versions: &[&NodeFacts]) -> bool {
        let selects = match &self.valid {
            Some(v) => versions.iter().any(|n| v.selects(n)),
            None => true,
        };
        selects
            || self
                .peers
                .iter()
                .any(|sel| versions.iter().any(|n| sel.matches(&n.labels)))
    }
}

/// Each policy's [`Judge`], made once per generation: a node joining a
/// cluster of P policies used to validate all P (twice) on every change.
#[derive(Debug, Default)]
pub struct NodeJudges {
    /// uid → (generation, judge).
    by_uid: std::collections::HashMap<String, (i64, Judge)>,
}

impl NodeJudges {
    /// [`policies_for_node_change`], judging each policy from memory when
    /// its uid and generation are those last judged (a spec edit bumps the
    /// generation; a policy without either is judged afresh).
    pub fn policies_for_node_change(
        &mut self,
        old: Option<&NodeFacts>,
        new: Option<&NodeFacts>,
        policies: &[Arc<FirewallPolicy>],
    ) -> Vec<ObjectRef<FirewallPolicy>> {
        let versions: Vec<&NodeFacts> = old.into_iter().chain(new).collect();
        if self.by_uid.len() > 2 * policies.len() + 16 {
            // Forget deleted policies now and then.
            let live: BTreeSet<&str> = policies
                .iter()
                .filter_map(|p| p.metadata.uid.as_deref())
                .collect();
            self.by_uid.retain(|uid, _| live.contains(uid.as_str()));
        }
        policies
            .iter()
            .filter(|p| {
                let key = p.metadata.uid.as_ref().zip(p.metadata.generation);
                let Some((uid, generation)) = key else {
                    return Judge::of(p).concerns(&versions);
                };
                match self.by_uid.get(uid) {
                    Some((g, judge)) if *g == generation => judge.concerns(&versions),
                    _ => {
                        let judge = Judge::of(p);
                        let concerns = judge.concerns(&versions);
                        self.by_uid.insert(uid.clone(), (generation, judge));
                        concerns
                    }
                }
            })
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect()
    }
}

/// The policies a change of one node's facts concerns (pure): those that
/// select it before or after (an invalid policy counts as selecting, so it
/// is re-judged), or that match it as a peer before or after.
pub fn policies_for_node_change(
    old: Option<&NodeFacts>,
    new: Option<&NodeFacts>,
    policies: &[Arc<FirewallPolicy>],
) -> Vec<ObjectRef<FirewallPolicy>> {
    let versions: Vec<&NodeFacts> = old.into_iter().chain(new).collect();
    policies
        .iter()
        .filter(|p| Judge::of(p).concerns(&versions))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// The policies a change of one agent report concerns (pure): those it
/// lists before or after; and, when the agent's last sync turned failed or
/// back, those still waiting on nodes (a node that failed counts as
/// `failed` for every policy selecting it that its report does not list,
/// see [`crate::controller::status::node_counts`]). Any other change —
/// a new report listing nothing, a heartbeat-like rewrite, the exposure
/// this controller wrote — concerns only the policies it lists.
pub fn policies_for_report_change(
    old: Option<&Report>,
    new: Option<&Report>,
    policies: &[Arc<FirewallPolicy>],
) -> Vec<ObjectRef<FirewallPolicy>> {
    let listed: BTreeSet<&str> = old
        .into_iter()
        .chain(new)
        .flat_map(|r| r.applied.iter().map(|p| &*p.name))
        .collect();
    let failed_flipped = old.is_some_and(|r| r.failed) != new.is_some_and(|r| r.failed);
    policies
        .iter()
        .filter(|p| {
            listed.contains(p.name_any().as_str())
                || (failed_flipped
                    && p.status
                        .as_ref()
                        .and_then(|s| s.nodes.as_ref())
                        .is_none_or(|n| n.synced < n.selected))
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Follows Nodes and FirewallNodes into `cache` and sends the policies each
/// change concerns on `trigger`, after the cache holds the change. Runs
/// until the trigger's receiver is gone.
pub async fn follow(
    client: Client,
    cache: Arc<ClusterCache>,
    policies: Store<FirewallPolicy>,
    trigger: UnboundedSender<ObjectRef<FirewallPolicy>>,
) {
    let nodes = watcher(
        Api::<NodeView>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let reports =
        watcher(Api::<FirewallNode>::all(client), watcher::Config::default()).default_backoff();
    let mut nodes = std::pin::pin!(nodes);
    let mut reports = std::pin::pin!(reports);
    let mut judges = NodeJudges::default();
    loop {
        let wake: Vec<ObjectRef<FirewallPolicy>> = tokio::select! {
            Some(e) = nodes.next() => match e {
                Ok(e) => {
                    let done = matches!(e, watcher::Event::InitDone);
                    let changes = cache.node_event(e);
                    if done {
                        cache.set_ready(0);
                        cache.nodes_changed.notify_one();
                    }
                    if !changes.is_empty() {
                        cache.nodes_changed.notify_one();
                    }
                    let state = policies.state();
                    changes
                        .iter()
                        .flat_map(|(o, n)| judges.policies_for_node_change(o.as_ref(), n.as_ref(), &state))
                        .collect()
                }
                Err(e) => {
                    warn!(error = %e, "Node watch error; retrying");
                    vec![]
                }
            },
            Some(e) = reports.next() => match e {
                Ok(e) => {
                    let done = matches!(e, watcher::Event::InitDone);
                    let changes = cache.report_event(e);
                    if done {
                        cache.set_ready(1);
                    }
                    let state = policies.state();
                    changes
                        .iter()
                        .flat_map(|(o, n)| policies_for_report_change(o.as_deref(), n.as_deref(), &state))
                        .collect()
                }
                Err(e) => {
                    warn!(error = %e, "FirewallNode watch error; retrying");
                    vec![]
                }
            },
            else => return,
        };
        // Before the initial lists are in, reconciles wait anyway; the
        // policy watch's own initial list wakes every policy once.
        if !cache.is_ready() {
            continue;
        }
        let unique: std::collections::HashSet<ObjectRef<FirewallPolicy>> =
            wake.into_iter().collect();
        for r in unique {
            if trigger.unbounded_send(r).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policy::testing::{node_peer, policy, rule, selector};

    fn node(name: &str, role: &str) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            labels: [("role".to_string(), role.to_string())]
                .into_iter()
                .collect(),
            addresses: vec!["10.0.0.1".parse().unwrap()],
            provider_id: Some(format!("aws:///eu-west-1a/i-{name}")),
        }
    }

    fn names(refs: Vec<ObjectRef<FirewallPolicy>>) -> Vec<String> {
        let mut n: Vec<String> = refs.into_iter().map(|r| r.name).collect();
        n.sort();
        n
    }

    #[test]
    fn a_node_change_wakes_only_the_policies_it_concerns() {
        let mut web = policy(
            "web",
            vec![rule(
                "http",
                crate::api::Protocol::Tcp,
                &[80],
                &["0.0.0.0/0"],
            )],
            None,
        );
        web.spec.node_selector = Some(selector(&[("role", "web")]));
        let mut db = policy("db", vec![], None);
        db.spec.node_selector = Some(selector(&[("role", "db")]));
        let mut r = rule("from-web", crate::api::Protocol::Tcp, &[5432], &[]);
        r.peers.push(node_peer(&[("role", "web")]));
        let mut db_peers = policy("db-peers", vec![r], None);
        db_peers.spec.node_selector = Some(selector(&[("role", "db")]));
        let all: Vec<Arc<FirewallPolicy>> = [web, db, db_peers].into_iter().map(Arc::new).collect();

        // A web node joins: the policy selecting it, and the one matching it as a peer.
        let new = node("n1", "web");
        assert_eq!(
            names(policies_for_node_change(None, Some(&new), &all)),
            ["db-peers", "web"]
        );
        // Relabelled web -> db: both the old and the new selectors care.
        let moved = node("n1", "db");
        assert_eq!(
            names(policies_for_node_change(Some(&new), Some(&moved), &all)),
            ["db", "db-peers", "web"]
        );
        // A db node leaves: only db and db-peers (selecting it).
        assert_eq!(
            names(policies_for_node_change(
                Some(&node("n2", "db")),
                None,
                &all
            )),
            ["db", "db-peers"]
        );
    }

    #[test]
    fn judges_remembered_per_generation_wake_what_the_pure_judgement_wakes() {
        let with_meta = |mut p: FirewallPolicy, uid: &str, generation: i64| {
            p.metadata.uid = Some(uid.into());
            p.metadata.generation = Some(generation);
            p
        };
        let mut web = policy("web", vec![], None);
        web.spec.node_selector = Some(selector(&[("role", "web")]));
        let mut r = rule("from-web", crate::api::Protocol::Tcp, &[5432], &[]);
        r.peers.push(node_peer(&[("role", "web")]));
        let mut db = policy("db", vec![r], None);
        db.spec.node_selector = Some(selector(&[("role", "db")]));
        let mut all: Vec<Arc<FirewallPolicy>> = vec![
            Arc::new(with_meta(web.clone(), "u-web", 1)),
            Arc::new(with_meta(db, "u-db", 1)),
            // No uid or generation: judged afresh every time.
            Arc::new(policy("bare", vec![], None)),
        ];
        let mut judges = NodeJudges::default();
        let changes = [
            (None, Some(node("n1", "web"))),
            (Some(node("n1", "web")), Some(node("n1", "db"))),
            (Some(node("n2", "cache")), None),
        ];
        let check = |judges: &mut NodeJudges, all: &[Arc<FirewallPolicy>]| {
            for (old, new) in &changes {
                assert_eq!(
                    names(judges.policies_for_node_change(old.as_ref(), new.as_ref(), all)),
                    names(policies_for_node_change(old.as_ref(), new.as_ref(), all)),
                );
            }
        };
        check(&mut judges, &all);
        assert_eq!(judges.by_uid.len(), 2, "remembered by uid and generation");
        // An edit (next generation) is judged again: web now selects caches.
        web.spec.node_selector = Some(selector(&[("role", "cache")]));
        all[0] = Arc::new(with_meta(web, "u-web", 2));
        check(&mut judges, &all);
        assert_eq!(
            names(judges.policies_for_node_change(Some(&node("n2", "cache")), None, &all)),
            ["bare", "web"]
        );
        // Deleted policies are forgotten once memory outgrows the live set.
        for i in 0..40 {
            let extra = vec![Arc::new(with_meta(
                policy("x", vec![], None),
                &format!("u-{i}"),
                1,
            ))];
            judges.policies_for_node_change(None, Some(&node("n9", "x")), &extra);
        }
        // Pruned above twice the one live policy plus 16, before the next
        // is remembered.
        assert!(judges.by_uid.len() <= 19, "{}", judges.by_uid.len());
    }

    #[test]
    fn a_report_wakes_what_it_lists_and_waiting_policies_only_when_failure_flips() {
        use crate::api::{FirewallPolicyStatus, NodeCounts};
        let with_counts = |name: &str, synced: i32, selected: i32| {
            let mut p = crate::policy::testing::policy(name, vec![], None);
            p.status = Some(FirewallPolicyStatus {
                nodes: Some(NodeCounts {
                    selected,
                    synced,
                    ..NodeCounts::default()
                }),
                ..FirewallPolicyStatus::default()
            });
            Arc::new(p)
        };
        // `web` is listed; `db` waits on nodes; `done` is synced everywhere.
        let policies = vec![
            with_counts("web", 1, 1),
            with_counts("db", 0, 2),
            with_counts("done", 2, 2),
        ];
        let report = |failed: bool, listed: &[&str]| Report {
            name: "n1".into(),
            applied: listed
                .iter()
                .map(|n| Applied {
                    name: Arc::from(*n),
                    uid: None,
                    generation: 1,
                })
                .collect(),
            failed,
            exposure: Vec::new(),
        };
        let ok = report(false, &["web"]);
        let again = report(false, &["web"]);
        let failed = report(true, &["web"]);
        let wake = |o: Option<&Report>, n: Option<&Report>| {
            names(policies_for_report_change(o, n, &policies))
        };
        // A new report, a rewrite, a deletion: the policies it lists.
        assert_eq!(wake(None, Some(&ok)), ["web"]);
        assert_eq!(wake(Some(&ok), Some(&again)), ["web"]);
        assert_eq!(wake(Some(&ok), None), ["web"]);
        // The agent's sync failing, or recovering, changes the `failed`
        // count of the policies still waiting on nodes.
        assert_eq!(wake(Some(&ok), Some(&failed)), ["db", "web"]);
        assert_eq!(wake(Some(&failed), Some(&ok)), ["db", "web"]);
        assert_eq!(wake(Some(&failed), None), ["db", "web"]);
        // A policy not reconciled yet (no counts) waits too.
        let fresh = vec![Arc::new(crate::policy::testing::policy(
            "new",
            vec![],
            None,
        ))];
        assert!(policies_for_report_change(None, Some(&ok), &fresh).is_empty());
        assert_eq!(
            names(policies_for_report_change(None, Some(&failed), &fresh)),
            ["new"]
        );
    }

    #[test]
    fn stored_reports_keep_only_what_the_controller_reads() {
        let full: FirewallNode = serde_json::from_value(serde_json::json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "FirewallNode",
            "metadata": {"name": "n1", "uid": "r-uid", "labels": {"a": "b"},
                "managedFields": [{"manager": "palisade-agent", "operation": "Apply"}]},
            "spec": {"nodeName": "n1"},
            "status": {"backend": "nft", "ruleCount": 40, "policyCount": 1,
                "policies": [{"name": "web", "uid": "p-uid", "generation": 2, "hash": "abc", "mode": "Enforce"}],
                "lastSync": {"time": "2026-01-01T00:00:00Z", "result": "Failed", "message": "long text"},
                "exposure": ["tcp/22 from 0.0.0.0/0"],
                "conditions": [{"type": "Ready", "status": "True", "reason": "Synced", "message": "m",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        let mut names = Names::default();
        let t = Report::new(full.clone(), &mut names);
        assert_eq!(t.name, "n1");
        assert_eq!(t.applied.len(), 1);
        let p = &t.applied[0];
        assert_eq!(
            (&*p.name, p.uid.as_deref(), p.generation),
            ("web", Some("p-uid"), 2)
        );
        assert!(t.failed);
        assert_eq!(t.exposure, ["tcp/22 from 0.0.0.0/0"]);
        // Another node's report shares the policy's name and uid.
        let mut other = full.clone();
        other.metadata.name = Some("n2".into());
        let o = Report::new(other, &mut names);
        assert!(Arc::ptr_eq(&o.applied[0].name, &p.name));
        assert_eq!(names.len(), 2);
        assert!(t.lists("web", Some("p-uid"), Some(2)));
        assert!(t.lists("web", None, Some(2)) && t.lists("web", Some("p-uid"), None));
        assert!(!t.lists("web", Some("other-uid"), Some(2)));
        assert!(!t.lists("web", Some("p-uid"), Some(3)) && !t.lists("db", None, None));
        // What the status counts read gives the same answers.
        let mut policy = crate::policy::testing::policy("web", vec![], None);
        policy.metadata.uid = Some("p-uid".into());
        policy.metadata.generation = Some(2);
        let selected = vec!["n1".to_string()];
        let counts = crate::controller::status::node_counts(&policy, &selected, &[Arc::new(t)]);
        assert_eq!((counts.selected, counts.synced, counts.failed), (1, 1, 0));
        // A change the controller does not read (an agent's rule count)
        // wakes nothing.
        let cache = ClusterCache::default();
        let mut r: FirewallNode = serde_json::from_value(serde_json::json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "FirewallNode",
            "metadata": {"name": "n1"}, "spec": {"nodeName": "n1"},
            "status": {"ruleCount": 1, "policies": [{"name": "web", "generation": 1, "hash": "a"}]}
        }))
        .unwrap();
        assert_eq!(
            cache.report_event(watcher::Event::Apply(r.clone())).len(),
            1
        );
        if let Some(s) = r.status.as_mut() {
            s.rule_count = 2;
            s.policies[0].hash = "b".into();
        }
        assert!(cache.report_event(watcher::Event::Apply(r)).is_empty());
    }

    #[test]
    fn names_no_report_holds_are_dropped() {
        let mut names = Names::default();
        let kept = names.get("kept");
        for i in 0..1000 {
            let _ = names.get(&format!("gone-{i}"));
        }
        // Swept whenever the set doubled: never more than twice the
        // strings in use (here 1) plus the sweep's floor.
        assert!(names.len() <= 128, "{}", names.len());
        assert!(Arc::ptr_eq(&names.get("kept"), &kept));
    }

    #[test]
    fn the_node_watch_decodes_only_the_facts() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "ip-10-0-0-7.ec2.internal", "uid": "n-uid", "resourceVersion": "42",
                "labels": {"kubernetes.io/os": "linux", "palisade.dev/pool": "a"},
                "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
                "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:conditions": {".": {}}}}}]},
            "spec": {"providerID": "aws:///us-east-1a/i-0abc", "podCIDR": "10.1.0.0/24"},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "10.0.0.7"},
                    {"type": "InternalIP", "address": "fd00::7"},
                    {"type": "Hostname", "address": "ip-10-0-0-7.ec2.internal"}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                    "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                "images": [{"names": ["registry/image@sha256:00"], "sizeBytes": 1}],
                "nodeInfo": {"architecture": "amd64", "bootID": "b", "containerRuntimeVersion": "c",
                    "kernelVersion": "k", "kubeProxyVersion": "", "kubeletVersion": "v", "machineID": "m",
                    "operatingSystem": "linux", "osImage": "o", "systemUUID": "s"}
            }
        });
        let full: Node = serde_json::from_value(json.clone()).unwrap();
        let view: NodeView = serde_json::from_value(json).unwrap();
        assert_eq!(view.facts(), NodeFacts::from_node(&full));
        assert_eq!(view.facts().addresses.len(), 2);
        assert_eq!(view.facts().instance_id(), Some("i-0abc"));
        use kube::Resource;
        assert_eq!(view.meta().resource_version.as_deref(), Some("42"));
        assert_eq!(view.meta().uid.as_deref(), Some("n-uid"));
        // What is not read is not kept.
        assert!(view.meta().managed_fields.is_none() && view.meta().annotations.is_none());
        let status = view.0.status.as_ref().unwrap();
        assert!(
            status.images.is_none() && status.conditions.is_none() && status.node_info.is_none()
        );
        // The same view from a Node object (tests and the watch agree).
        assert_eq!(NodeView::from(full).facts(), view.facts());
        assert_eq!(NodeView::url_path(&(), None), "/api/v1/nodes");
    }

    #[test]
    fn heartbeats_change_no_fact() {
        let cache = ClusterCache::default();
        let mut n = Node::default();
        n.metadata.name = Some("n1".into());
        assert_eq!(
            cache
                .node_event(watcher::Event::Apply(n.clone().into()))
                .len(),
            1
        );
        // A heartbeat: conditions and resourceVersion move, the facts do not.
        n.metadata.resource_version = Some("42".into());
        n.status = Some(k8s_openapi::api::core::v1::NodeStatus {
            conditions: Some(vec![Default::default()]),
            ..Default::default()
        });
        let before = cache.nodes();
        assert!(
            cache
                .node_event(watcher::Event::Apply(n.clone().into()))
                .is_empty()
        );
        // The table kept its copy, which the snapshot shares.
        let stored = read(&cache.nodes).items["n1"].labels.clone();
        assert!(stored.shares(&before[0].labels));
        assert!(Arc::ptr_eq(&before, &cache.nodes()));
        n.metadata.labels = Some(
            [("role".to_string(), "web".to_string())]
                .into_iter()
                .collect(),
        );
        assert_eq!(cache.node_event(watcher::Event::Apply(n.into())).len(), 1);
        // A re-list (after a failover or an expired watch) that no longer
        // delivers n1: it is gone, and that is a change.
        assert!(cache.node_event(watcher::Event::Init).is_empty());
        let mut m = Node::default();
        m.metadata.name = Some("n2".into());
        assert_eq!(
            cache.node_event(watcher::Event::InitApply(m.into())).len(),
            1
        );
        let gone = cache.node_event(watcher::Event::InitDone);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0.as_ref().map(|n| n.name.as_str()), Some("n1"));
        assert_eq!(cache.nodes().len(), 1);
    }
}
