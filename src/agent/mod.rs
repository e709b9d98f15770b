//! The agent: one per node. Watches every `FirewallPolicy` and its own
//! `Node` (field selector `metadata.name=<node>`), compiles the node's
//! [`NodeRuleset`], programs it through the [`Dataplane`] and reports in
//! its `FirewallNode`.
//!
//! Contract of one sync (read → plan, pure → apply → status):
//! 1. nothing is written before both watches delivered their initial list
//!    (no half view after a restart);
//! 2. the desired ruleset is compiled from the policies selecting the node
//!    (policies being deleted are left out, so their rules go first and the
//!    controller may release them), the node's labels and addresses, the
//!    peers the controller resolved (`status.resolvedPeers`), the node
//!    addresses the controller publishes per `nodeSelector` in
//!    FirewallPeerSlices (watched, only those of the node's policies and
//!    failsafe: see [`slices`]; the agent never lists Nodes), the API
//!    server's endpoints (flags, then the `kubernetes` EndpointSlice), the
//!    node's nameservers, and the failsafe list from the flags; a policy
//!    edited into something invalid keeps its last valid version (reported
//!    at that generation) instead of losing its rules;
//! 3. the dataplane compares it with its cached model of what it last
//!    wrote, writes only the difference as rule-level edits and set
//!    `add`/`del` (nothing, and no process, on a no-op) and reads back
//!    only what it wrote; it reads everything back and rewrites what
//!    differs when the model is not trusted (first sync, an `nft monitor`
//!    event from another process, the verification period, a failed
//!    write) — see [`crate::node::dataplane`];
//! 4. a write while the desired ruleset is the one already applied is a
//!    drift repair, counted;
//! 5. after a write, flows the new ruleset no longer admits are cut in the
//!    directions a selected policy asks for it (`existingConnections: Cut`);
//! 6. the `FirewallNode` status is written when anything but the time of
//!    the sync changed; the Audit policies' would-be drops are read from
//!    rule counters on their own timer and reported with it.
//!
//! Triggers: watch events, the resync timer (the backstop; at least once a
//! verification period), and on the nft backend every `nft monitor`
//! generation another process committed that touched a Palisade chain or
//! the INPUT/OUTPUT hooks ([`crate::node::monitor`]). A failed sync is retried with backoff (the previous
//! ruleset stays in force: restores are atomic).
//!
//! Drift repairs and refused restores are also Events on the node's
//! `FirewallNode` ([`events`]).

pub mod events;
pub mod metrics;
pub mod policies;
pub mod slices;
pub mod wake;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tracing::{info, warn};

use crate::api::{
    AppliedPolicy, FirewallNode, FirewallNodeStatus, FirewallPeerSlice, FirewallPolicy, PolicyMode,
    SyncResult, WouldDrop,
};
use crate::node::backend::{self, Backend};
use crate::node::conntrack;
use crate::node::dataplane::{Dataplane, DataplaneError};
use crate::node::monitor::{MonitorParser, note_generation};
use crate::policy::node::{NodeAction, RuleOrigin};
use crate::policy::{
    AllowVerdict, Direction, Facts, Failsafe, NodeFacts, NodeRuleset, PolicyError, compile_node,
    validate,
};

use metrics::Metrics;

/// Field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "palisade-agent";

/// What can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The iptables backend could not be chosen.
    #[error("detecting the iptables backend: {0}")]
    Backend(#[from] backend::DetectError),
    /// Reading or writing iptables/ipset failed.
    #[error("dataplane: {0}")]
    Dataplane(#[from] DataplaneError),
    /// The policies could not be compiled for this node.
    #[error("compiling the node ruleset: {0}")]
    Compile(#[from] PolicyError),
    /// The node's own Node object is not there.
    #[error("Node {0} not found")]
    NodeMissing(String),
    /// The API server refused or failed a request.
    #[error("{context}: {source}")]
    Kube {
        /// What the agent was doing.
        context: String,
        /// The cause.
        source: kube::Error,
    },
    /// A watch ended.
    #[error("watch of {0} ended")]
    WatchEnded(&'static str),
    /// After a write, the read-back still differs from the desired ruleset.
    #[error("read-back after write still differs: {0}")]
    NotConverged(String),
    /// A blocking task panicked or was cancelled.
    #[error("dataplane task: {0}")]
    Task(String),
}

impl AgentError {
    /// True when the kernel refused a restore (iptables, ip6tables, ipset).
    pub fn is_restore_failure(&self) -> bool {
        matches!(self, AgentError::Dataplane(e) if e.is_restore_failure())
    }
}

fn kube_err(context: impl Into<String>) -> impl FnOnce(kube::Error) -> AgentError {
    let context = context.into();
    move |source| AgentError::Kube { context, source }
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name (`NODE_NAME`).
    pub node_name: String,
    /// Resync period: sync at least this often (from the cached model:
    /// nothing is read or run unless something changed).
    pub resync: Duration,
    /// Verification period: read everything back and repair drift at
    /// least this often (`nft monitor` events verify at once).
    pub verify: Duration,
    /// Traffic always allowed, ahead of any policy.
    pub failsafe: Failsafe,
    /// Where `/metrics` and `/healthz` are served; `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// Force a backend instead of detecting it.
    pub backend: Option<Backend>,
    /// On the nft backend, follow `nft monitor` to repair drift at once.
    pub nft_monitor: bool,
    /// API server addresses known from the configuration (the configured
    /// server, the in-cluster service host); the `kubernetes` EndpointSlice
    /// adds its endpoints. The `ApiServer` failsafe scope.
    pub api_servers: Vec<IpAddr>,
    /// The node's nameservers (resolv.conf): the `Nameservers` scope.
    pub nameservers: Vec<IpAddr>,
    /// What the node layer's allows do.
    pub allow: AllowVerdict,
    /// How often the Audit policies' rule counters are read.
    pub audit_report: Duration,
}

/// The nameservers of a resolv.conf text (pure): every `nameserver`
/// line's address that parses.
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next()?.split('%').next()?.parse().ok())
                .flatten()
        })
        .collect()
}

/// The node addresses the controller published, by selector (pure).
pub fn node_peers(slices: &[Arc<FirewallPeerSlice>]) -> BTreeMap<String, Vec<IpAddr>> {
    let mut out: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    for slice in slices {
        let entry = out.entry(slice.spec.selector.clone()).or_default();
        for node in &slice.spec.nodes {
            entry.extend(
                node.addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok()),
            );
        }
    }
    out.into_iter()
        .map(|(k, v)| (k, v.into_iter().collect()))
        .collect()
}

/// The endpoint addresses of the `kubernetes` EndpointSlices (pure).
fn api_endpoints(slices: &[Arc<EndpointSlice>]) -> Vec<IpAddr> {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse().ok())
        .collect()
}

/// The Audit policies' would-be drop counters in `ruleset`: rule id →
/// (policy, direction).
fn audit_counters(ruleset: &NodeRuleset) -> BTreeMap<String, (String, Direction)> {
    let mut out = BTreeMap::new();
    for fam in [&ruleset.ipv4, &ruleset.ipv6] {
        for chain in &fam.chains {
            for rule in &chain.rules {
                if let (RuleOrigin::WouldDrop { policy }, NodeAction::Count) =
                    (&rule.origin, &rule.action)
                {
                    let ingress =
                        crate::policy::node::policy_chain_name(policy, Direction::Ingress);
                    let direction = if chain.name == ingress {
                        Direction::Ingress
                    } else {
                        Direction::Egress
                    };
                    out.insert(rule.id.clone(), (policy.clone(), direction));
                }
            }
        }
    }
    out
}

/// What the agent compiled from the cluster's state.
struct Desired {
    ruleset: NodeRuleset,
    applied: Vec<AppliedPolicy>,
    problems: Vec<String>,
    /// The policy versions used, by name (the next sync's last good).
    good: BTreeMap<String, Arc<FirewallPolicy>>,
    /// The `nodeSelector` peers of the policies selecting the node, by
    /// canonical text: the FirewallPeerSlices the ruleset reads.
    peer_selectors: BTreeSet<String>,
    /// A stored stub selects the node (its labels changed): its rules come
    /// with the policy watch's new list; nothing is to be programmed yet.
    stale: bool,
}

/// Compiles the desired ruleset from the policies and Nodes (pure).
///
/// A policy that no longer validates keeps its last valid version (same
/// uid) rather than losing its rules — dropping them could open a
/// direction no other policy speaks for — and is reported at that older
/// generation, so the controller sees the node as not synced. Only the
/// policies selecting the node are validated and compiled (an invalid one
/// that applied at the last sync too); the others are not reported.
fn desired(
    node_name: &str,
    policies: &[Arc<FirewallPolicy>],
    mut facts: Facts,
    last_good: &BTreeMap<String, Arc<FirewallPolicy>>,
) -> Result<Desired, AgentError> {
    let mut valid = Vec::new();
    let mut problems = Vec::new();
    let mut meta = BTreeMap::new();
    let mut good = BTreeMap::new();
    let mut peer_selectors = BTreeSet::new();
    let mut stale = false;
    let me = facts
        .node(node_name)
        .cloned()
        .ok_or_else(|| AgentError::NodeMissing(node_name.to_string()))?;
    for p in policies {
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = p.name_any();
        // A policy selecting other nodes is not even validated (with 1,000
        // policies, most of them) unless it applied here at the last sync
        // (an invalid edit keeps its last valid version: see below).
        let elsewhere = p.spec.node_selector.as_ref().is_some_and(|sel| {
            crate::policy::Selector::parse(sel, "spec.nodeSelector")
                .is_ok_and(|s| !s.matches(&me.labels))
        });
        if policies::is_stub(p) {
            stale |= !elsewhere;
            continue;
        }
        if elsewhere && !last_good.contains_key(&name) {
            continue;
        }
        let (used, v) = match validate(p) {
            Ok(v) => (p.clone(), v),
            Err(e) => {
                let kept = last_good
                    .get(&name)
                    .filter(|old| old.uid() == p.uid())
                    .and_then(|old| validate(old).ok().map(|v| (old.clone(), v)));
                let Some((old, v)) = kept else {
                    problems.push(format!("policy {name} skipped: {e}"));
                    continue;
                };
                problems.push(format!(
                    "policy {name} generation {} is invalid, keeping generation {}: {e}",
                    p.metadata.generation.unwrap_or_default(),
                    old.metadata.generation.unwrap_or_default()
                ));
                (old, v)
            }
        };
        // What a policy not selecting the node says matters nothing here:
        // its slices are not watched, its resolved peers not read (so its
        // status writes cannot change this ruleset), its version not kept.
        if !v.selects(&me) {
            continue;
        }
        peer_selectors.extend(v.node_peer_selectors().map(ToString::to_string));
        if let Some(status) = &p.status
            && let Err(e) = facts.add_resolved_peers(&status.resolved_peers)
        {
            problems.push(format!("policy {name}: {e}"));
        }
        valid.push(v);
        meta.insert(
            name.clone(),
            (used.uid(), used.metadata.generation.unwrap_or_default()),
        );
        good.insert(name, used);
    }
    let ruleset = compile_node(node_name, &valid, &facts)?;
    let applied = ruleset
        .policies
        .iter()
        .map(|d| {
            let (uid, generation) = meta.get(&d.name).cloned().unwrap_or_default();
            AppliedPolicy {
                name: d.name.clone(),
                uid,
                generation,
                hash: d.hash.clone(),
                mode: Some(d.mode),
                would_drop: None,
            }
        })
        .collect();
    Ok(Desired {
        ruleset,
        applied,
        problems,
        good,
        peer_selectors,
        stale,
    })
}

/// The running agent's state between syncs.
struct Agent {
    client: Client,
    config: AgentConfig,
    dataplane: Dataplane,
    metrics: Arc<Metrics>,
    policies: Store<FirewallPolicy>,
    nodes: Store<Node>,
    peer_slices: Store<FirewallPeerSlice>,
    /// Which FirewallPeerSlices are watched (those the ruleset reads).
    slice_scope: slices::Scope,
    api_slices: Store<EndpointSlice>,
    /// The ruleset last applied successfully.
    last_ruleset: Option<NodeRuleset>,
    /// Would-be drops of the Audit policies, as last read.
    would_drop: BTreeMap<String, WouldDrop>,
    /// Hash of the ruleset last applied successfully.
    last_hash: Option<String>,
    drift_repairs: i64,
    /// Last status written, without the sync time.
    last_status: Option<FirewallNodeStatus>,
    /// The policy versions last applied, by name.
    last_good: BTreeMap<String, Arc<FirewallPolicy>>,
    /// The uid of this node's Node: the FirewallNode's owner, so it is
    /// garbage-collected with the Node.
    node_uid: Option<String>,
    /// The owner the FirewallNode object was last applied with: it is
    /// applied again only when that changes or the object is gone, so a
    /// sync that reports costs one write, its status.
    object_owner: Option<Option<String>>,
    /// Events on this node's FirewallNode.
    events: events::NodeEvents,
}

impl Agent {
    /// One sync; `None` when it waits for the FirewallPeerSlices its
    /// policies need (the end of their list wakes it again).
    async fn sync(&mut self) -> Result<Option<(FirewallNodeStatus, Vec<String>)>, AgentError> {
        // Before the store is read: the store holds at least this list.
        let listed = self.slice_scope.listed();
        let me = self
            .nodes
            .get(&ObjectRef::new(&self.config.node_name))
            .ok_or_else(|| AgentError::NodeMissing(self.config.node_name.clone()))?;
        let policies = self.policies.state();
        self.node_uid = me.uid();
        let me = NodeFacts::from_node(&me);
        let local = me.addresses.clone();
        let mut api_servers = self.config.api_servers.clone();
        api_servers.extend(api_endpoints(&self.api_slices.state()));
        api_servers.sort();
        api_servers.dedup();
        let facts = Facts {
            nodes: vec![me].into(),
            failsafe: self.config.failsafe.clone(),
            node_peers: node_peers(&self.peer_slices.state()),
            api_servers,
            nameservers: self.config.nameservers.clone(),
            allow: self.config.allow,
            ..Default::default()
        };
        let want = desired(&self.config.node_name, &policies, facts, &self.last_good)?;
        if want.stale {
            return Ok(None);
        }
        let scope = self.slice_scope.want(&want.peer_selectors);
        if listed.as_ref() != Some(&scope) {
            return Ok(None);
        }
        let hash = want.ruleset.hash();
        let dataplane = self.dataplane.clone();
        let ruleset = want.ruleset.clone();
        let report = tokio::task::spawn_blocking(move || dataplane.sync(&ruleset))
            .await
            .map_err(|e| AgentError::Task(e.to_string()))?
            .inspect_err(|e| {
                if e.is_restore_failure() {
                    self.metrics.restore_failures.inc();
                }
            });
        let report = match report {
            Err(DataplaneError::NotConverged(what)) => return Err(AgentError::NotConverged(what)),
            other => other?,
        };
        if report.wrote() {
            if self.last_hash.as_deref() == Some(hash.as_str()) {
                self.drift_repairs += 1;
                self.metrics.drift_repairs.inc();
                warn!(
                    chains = report.chains_written,
                    "repaired out-of-band changes to the node's rules"
                );
                let note = events::drift_note(&report.plan);
                self.events
                    .warn(events::DRIFT_REPAIRED, "Repair", &note)
                    .await;
            } else {
                let (created, changed, destroyed) = report.plan.set_counts();
                info!(
                    chains = report.chains_written,
                    sets_created = created,
                    sets_changed = changed,
                    sets_destroyed = destroyed,
                    full_read = report.full_read,
                    hash,
                    "applied node ruleset"
                );
            }
        }
        let cut: Vec<Direction> = want
            .ruleset
            .policies
            .iter()
            .flat_map(|p| p.cut_established.iter().copied())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if report.wrote() && !cut.is_empty() {
            self.cut_flows(&want.ruleset, local, cut).await;
        }
        self.last_hash = Some(hash);
        self.last_ruleset = Some(want.ruleset.clone());
        self.last_good = want.good;
        self.metrics.rules.set(want.ruleset.rule_count() as i64);
        self.metrics
            .set_entries
            .set(want.ruleset.set_entries() as i64);
        let status = FirewallNodeStatus {
            backend: Some(self.dataplane.backend().to_string()),
            policy_count: want.applied.len() as i32,
            policies: want.applied,
            rule_count: want.ruleset.rule_count() as i32,
            set_count: want.ruleset.sets.len() as i32,
            set_entries: want.ruleset.set_entries() as i64,
            drift_repairs: self.drift_repairs,
            last_sync: None,
            conditions: Vec::new(),
            // The controller's field (its own field manager): never sent here.
            exposure: Vec::new(),
        };
        Ok(Some((self.with_audit(status), want.problems)))
    }

    /// Deletes the conntrack entries of flows `ruleset` no longer admits in
    /// `directions` (it is programmed already, so they cannot come back).
    async fn cut_flows(
        &self,
        ruleset: &NodeRuleset,
        local: Vec<IpAddr>,
        directions: Vec<Direction>,
    ) {
        let dataplane = self.dataplane.clone();
        let ruleset = ruleset.clone();
        let cut = tokio::task::spawn_blocking(move || {
            conntrack::cut_flows(&dataplane, &ruleset, &local, &directions)
        })
        .await;
        match cut {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                self.metrics.flows_cut.inc_by(n as u64);
                info!(
                    flows = n,
                    "cut established flows the narrowed ruleset no longer allows"
                );
            }
            Ok(Err(e)) => warn!(error = %e, "cutting established flows"),
            Err(e) => warn!(error = %e, "cutting established flows"),
        }
    }

    /// Reads the Audit policies' would-be drop counters; true when they
    /// changed.
    async fn refresh_audit(&mut self) -> bool {
        let Some(ruleset) = &self.last_ruleset else {
            return false;
        };
        let counters = audit_counters(ruleset);
        if counters.is_empty() {
            let changed = !self.would_drop.is_empty();
            for policy in self.would_drop.keys() {
                self.metrics.forget_audit(policy);
            }
            self.would_drop.clear();
            return changed;
        }
        let dataplane = self.dataplane.clone();
        let read = tokio::task::spawn_blocking(move || dataplane.read_counters()).await;
        let packets = match read {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                warn!(error = %e, "reading Audit counters");
                return false;
            }
            Err(e) => {
                warn!(error = %e, "reading Audit counters");
                return false;
            }
        };
        let mut fresh: BTreeMap<String, WouldDrop> = BTreeMap::new();
        for (id, (policy, direction)) in counters {
            let n = i64::try_from(packets.get(&id).copied().unwrap_or(0)).unwrap_or(i64::MAX);
            let entry = fresh.entry(policy).or_default();
            match direction {
                Direction::Ingress => entry.ingress = entry.ingress.saturating_add(n),
                Direction::Egress => entry.egress = entry.egress.saturating_add(n),
            }
        }
        for (policy, w) in &fresh {
            for (direction, n) in [("ingress", w.ingress), ("egress", w.egress)] {
                self.metrics
                    .audit_would_drop
                    .get_or_create(&metrics::AuditLabels {
                        policy: policy.clone(),
                        direction: direction.into(),
                    })
                    .set(n);
            }
        }
        for policy in self.would_drop.keys() {
            if !fresh.contains_key(policy) {
                self.metrics.forget_audit(policy);
            }
        }
        let changed = fresh != self.would_drop;
        self.would_drop = fresh;
        changed
    }

    /// `status` with the Audit policies' would-be drops filled in.
    fn with_audit(&self, mut status: FirewallNodeStatus) -> FirewallNodeStatus {
        for p in &mut status.policies {
            p.would_drop = (p.mode == Some(PolicyMode::Audit))
                .then(|| self.would_drop.get(&p.name).cloned().unwrap_or_default());
        }
        status
    }

    fn condition(&mut self, ok: bool, message: &str) -> Condition {
        let status = if ok { "True" } else { "False" };
        let previous = self
            .last_status
            .as_ref()
            .and_then(|s| s.conditions.first())
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone());
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let since = previous.unwrap_or_else(|| now.clone());
        Condition {
            type_: crate::api::conditions::READY.into(),
            status: status.into(),
            reason: if ok {
                crate::api::conditions::reason::SYNCED.into()
            } else {
                crate::api::conditions::reason::RETRYING.into()
            },
            message: message.into(),
            last_transition_time: since,
            observed_generation: None,
        }
    }

    /// Writes the FirewallNode status when it changed (ignoring the time).
    async fn report(&mut self, mut status: FirewallNodeStatus, error: Option<String>) {
        let ok = error.is_none();
        let message = error
            .clone()
            .unwrap_or_else(|| "node ruleset applied".into());
        status.conditions = vec![self.condition(ok, &message)];
        if let Some(last) = &self.last_status
            && *last == status
        {
            return;
        }
        let mut written = status.clone();
        written.last_sync = Some(SyncResult {
            time: Time(k8s_openapi::jiff::Timestamp::now()),
            result: if ok { "Success" } else { "Failed" }.into(),
            message: error,
        });
        match self.write_status(&written).await {
            Ok(()) => self.last_status = Some(status),
            Err(e) => warn!(error = %e, "writing FirewallNode status"),
        }
    }

    async fn write_status(&mut self, status: &FirewallNodeStatus) -> Result<(), AgentError> {
        let api: Api<FirewallNode> = Api::all(self.client.clone());
        let name = self.config.node_name.clone();
        if self.object_owner.as_ref() != Some(&self.node_uid) {
            self.apply_object(&api).await?;
        }
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let patch = Patch::Apply(json!({
            "apiVersion": "palisade.dev/v1alpha1",
            "kind": "FirewallNode",
            "status": status,
        }));
        let context = || format!("writing FirewallNode {name} status");
        match api.patch_status(&name, &pp, &patch).await {
            Ok(written) => {
                self.events.set_uid(written.metadata.uid);
                Ok(())
            }
            // Deleted since it was applied (by a user, or with its Node):
            // made again.
            Err(kube::Error::Api(e)) if e.code == 404 => {
                self.apply_object(&api).await?;
                api.patch_status(&name, &pp, &patch)
                    .await
                    .map(|_| ())
                    .map_err(kube_err(context()))
            }
            Err(e) => Err(kube_err(context())(e)),
        }
    }

    /// Creates this node's FirewallNode, or sets its owner: the Node.
    async fn apply_object(&mut self, api: &Api<FirewallNode>) -> Result<(), AgentError> {
        let name = &self.config.node_name;
        let mut metadata = json!({"name": name});
        if let Some(uid) = &self.node_uid {
            metadata["ownerReferences"] = json!([{
                "apiVersion": "v1",
                "kind": "Node",
                "name": name,
                "uid": uid,
            }]);
        }
        let written = api
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(json!({
                    "apiVersion": "palisade.dev/v1alpha1",
                    "kind": "FirewallNode",
                    "metadata": metadata,
                    "spec": {"nodeName": name},
                })),
            )
            .await
            .map_err(kube_err(format!("creating FirewallNode {name}")))?;
        self.events.set_uid(written.metadata.uid);
        self.object_owner = Some(self.node_uid.clone());
        Ok(())
    }
}

/// What the agent remembers of a policy between its watch events: a hash
/// of what its ruleset depends on, and its `nodeSelector` (`None` when it
/// does not parse: taken as selecting the node).
#[derive(Debug, Clone, PartialEq)]
struct SeenPolicy {
    fingerprint: String,
    selector: Option<crate::policy::Selector>,
}

impl SeenPolicy {
    fn of(p: &FirewallPolicy) -> Self {
        let selector = match &p.spec.node_selector {
            Some(sel) => crate::policy::Selector::parse(sel, "spec.nodeSelector").ok(),
            None => Some(crate::policy::Selector::everything()),
        };
        SeenPolicy {
            fingerprint: policy_fingerprint(p),
            selector,
        }
    }

    /// Whether it selects the node of `labels` (yes when either is
    /// unknown).
    fn selects(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        match (&self.selector, labels) {
            (Some(sel), Some(labels)) => sel.matches(labels),
            _ => true,
        }
    }
}

/// Whether a policy watch event can change what the agent enforces on
/// `node`: a policy that selects the node before or after the event, whose
/// spec, generation, deletion or resolved peers changed. kube's reflector
/// has already stored it; a status-only write of the controller (node
/// counts, conditions) wakes nothing, and neither does any write of a
/// policy selecting other nodes only (with 1,000 policies, most of them).
/// A change of the node's own labels wakes the sync by itself
/// ([`node_event`]). Conservative: an event it cannot compare wakes it.
fn spec_event(
    seen: &mut BTreeMap<String, SeenPolicy>,
    node: Option<&BTreeMap<String, String>>,
    event: &watcher::Event<FirewallPolicy>,
) -> bool {
    match event {
        watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
            let now = SeenPolicy::of(p);
            let before = seen.insert(p.name_any(), now.clone());
            match before {
                Some(before) if before.fingerprint == now.fingerprint => false,
                Some(before) => before.selects(node) || now.selects(node),
                None => now.selects(node),
            }
        }
        watcher::Event::Delete(p) => seen
            .remove(&p.name_any())
            .is_none_or(|before| before.selects(node)),
        _ => true,
    }
}

/// Whether an event of the agent's own Node can change what it enforces:
/// its uid, labels, InternalIPs or providerID changed (the kubelet's status
/// heartbeats change none of them), or the watch re-listed.
fn node_event(
    last: &mut Option<(Option<String>, NodeFacts)>,
    event: &watcher::Event<Node>,
) -> bool {
    match event {
        watcher::Event::Apply(n) | watcher::Event::InitApply(n) => {
            let now = (n.uid(), NodeFacts::from_node(n));
            let changed = last.as_ref() != Some(&now);
            *last = Some(now);
            changed
        }
        watcher::Event::Delete(_) => {
            *last = None;
            true
        }
        watcher::Event::Init => false,
        watcher::Event::InitDone => true,
    }
}

/// What the agent's policy store keeps of a policy: of the metadata its
/// name, uid, generation, resourceVersion and deletion (labels,
/// annotations, finalizers, managedFields are read by nothing on a node),
/// the spec, and of the status only `resolvedPeers` (the controller's
/// conditions, counts and samples are not read either).
pub fn trim_policy(p: &mut FirewallPolicy) {
    let meta = std::mem::take(&mut p.metadata);
    p.metadata = kube::api::ObjectMeta {
        name: meta.name,
        uid: meta.uid,
        generation: meta.generation,
        resource_version: meta.resource_version,
        deletion_timestamp: meta.deletion_timestamp,
        ..Default::default()
    };
    if let Some(status) = p.status.take() {
        p.status = Some(crate::api::FirewallPolicyStatus {
            resolved_peers: status.resolved_peers,
            ..Default::default()
        });
    }
}

/// What the agent keeps of its own Node: name, uid, labels, providerID and
/// addresses (the facts it compiles with); images, conditions, node info
/// and capacity — most of an EKS node's 7.5 KB — go.
pub fn trim_node(n: &mut Node) {
    crate::api::trim_bookkeeping(&mut n.metadata);
    n.metadata.annotations = None;
    if let Some(spec) = n.spec.as_mut() {
        *spec = k8s_openapi::api::core::v1::NodeSpec {
            provider_id: spec.provider_id.take(),
            ..Default::default()
        };
    }
    if let Some(status) = n.status.as_mut() {
        *status = k8s_openapi::api::core::v1::NodeStatus {
            addresses: status.addresses.take(),
            ..Default::default()
        };
    }
}

/// What of a policy the agent's ruleset depends on: a hash of it (the
/// agent keeps one per policy).
fn policy_fingerprint(p: &FirewallPolicy) -> String {
    let resolved = p
        .status
        .as_ref()
        .map(|s| s.resolved_peers.as_slice())
        .unwrap_or_default();
    let text = serde_json::to_string(&(
        p.uid(),
        p.metadata.generation,
        p.metadata.deletion_timestamp.is_some(),
        &p.spec,
        resolved,
    ))
    .unwrap_or_default();
    crate::policy::short_hash(&[&text])
}

/// Follows `nft monitor`: a generation that touched a Palisade chain or
/// the INPUT/OUTPUT chains, committed by a process other than the
/// dataplane's own, makes the dataplane stop trusting its model of those
/// chains (of everything, when the change is not about named chains) and
/// wakes the sync loop, which lists them and rewrites what differs.
/// Restarts `nft monitor` if it exits.
async fn follow_nft_monitor(trigger: wake::Wake, dataplane: Dataplane) {
    let mut restarted = false;
    loop {
        let child = tokio::process::Command::new("nft")
            .arg("monitor")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn();
        match child {
            Ok(mut child) => {
                // Its echoes of the dataplane's writes check them once it
                // has reported anything (see `Dataplane::monitor_started`).
                dataplane.monitor_started();
                if restarted {
                    // Changes made while no monitor ran were seen by
                    // nobody: read everything back once.
                    dataplane.invalidate();
                    trigger.wake(wake::Source::NftMonitor);
                }
                if let Some(out) = child.stdout.take() {
                    let mut lines = tokio::io::BufReader::new(out).lines();
                    let mut parser = MonitorParser::default();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let Some(generation) = parser.line(&line) else {
                            continue;
                        };
                        if note_generation(&dataplane, &generation) {
                            trigger.wake(wake::Source::NftMonitor);
                        }
                    }
                }
                dataplane.monitor_stopped();
                let _ = child.kill().await;
                warn!("nft monitor ended; restarting");
            }
            Err(e) => warn!(error = %e, "starting nft monitor"),
        }
        restarted = true;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Palisade rules in the backend not chosen would be a firewall nobody
/// sees in the chosen backend's `iptables-save`: say so loudly (they are
/// never written to, so the agent does not mix backends).
async fn warn_about_other_backend(chosen: Backend) {
    let other = match chosen {
        Backend::Nft => Backend::Legacy,
        Backend::Legacy => Backend::Nft,
    };
    let found = tokio::task::spawn_blocking(move || {
        Dataplane::new(other, None)
            .read()
            .map(|r| !r.state.ipv4.chains.is_empty() || !r.state.ipv6.chains.is_empty())
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false);
    if found {
        warn!(
            %chosen,
            %other,
            "Palisade chains exist in the other iptables backend; they are not managed: remove them with `palisade-agent --backend {other} cleanup`"
        );
    }
}

/// Runs the agent until a watch fails for good.
pub async fn run(client: Client, config: AgentConfig) -> Result<(), AgentError> {
    let backend = match config.backend {
        Some(b) => b,
        None => tokio::task::spawn_blocking(backend::detect)
            .await
            .map_err(|e| AgentError::Task(e.to_string()))??,
    };
    info!(node = %config.node_name, %backend, "iptables backend");
    warn_about_other_backend(backend).await;
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = config.metrics_addr {
        let m = metrics.clone();
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                tokio::spawn(crate::telemetry::serve(listener, m, std::future::pending()));
            }
            Err(e) => warn!(error = %e, %addr, "cannot serve metrics"),
        }
    }
    let trigger = wake::Wake::new(metrics.wakeups.clone());

    // Every store keeps only what a sync reads (see `trim_policy`,
    // `trim_node`): at 1,000 policies, most of a stored policy was its
    // managedFields and the controller's status.
    // Policies selecting other nodes are kept as stubs, for the node's
    // labels (see `policies`): the watch starts once they are known.
    let policy_writer = reflector::store::Writer::<FirewallPolicy>::default();
    let policies = policy_writer.as_reader();
    let (labels_tx, labels_rx) = tokio::sync::watch::channel(None);
    let policy_watch = policies::follow(client.clone(), policy_writer, labels_rx, trigger.clone());
    let (nodes, node_writer) = reflector::store();
    let node_watch = reflector::reflector(
        node_writer,
        watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={}", config.node_name)),
        )
        .modify(trim_node),
    )
    .default_backoff();
    // The controller's published node addresses: small objects that change
    // only when a selected node joins, leaves or changes address. Only the
    // slices of the selectors this node's policies use are watched (the
    // sync sets which: see `slices`).
    let slice_writer = reflector::store::Writer::<FirewallPeerSlice>::default();
    let peer_slices = slice_writer.as_reader();
    let (slice_scope, scope_follower) = slices::scope(&config.failsafe);
    let slice_watch = slices::follow(
        client.clone(),
        slice_writer,
        scope_follower,
        trigger.clone(),
    );
    // The API server's endpoints (one small object).
    let (api_slices, api_writer) = reflector::store();
    let api_watch = reflector::reflector(
        api_writer,
        watcher(
            Api::<EndpointSlice>::namespaced(client.clone(), "default"),
            watcher::Config::default().labels("kubernetes.io/service-name=kubernetes"),
        ),
    )
    .default_backoff();
    let watches = {
        let trigger = trigger.clone();
        async move {
            let mut policy_watch = std::pin::pin!(policy_watch);
            let mut node_watch = std::pin::pin!(node_watch);
            let mut slice_watch = std::pin::pin!(slice_watch);
            let mut api_watch = std::pin::pin!(api_watch);
            let mut me: Option<(Option<String>, NodeFacts)> = None;
            loop {
                // Only changes wake the sync: a policy's status-only write
                // leaves spec and generation alone, and a policy that
                // selects the node neither before nor after an edit changes
                // nothing here (see `spec_event`, run by `policy_watch`).
                let (what, event) = tokio::select! {
                    e = &mut policy_watch => return e,
                    e = node_watch.next() => (wake::Source::Node, e.map(|r| r.map(|ev| {
                        let changed = node_event(&mut me, &ev);
                        if let Some((_, n)) = &me {
                            labels_tx.send_if_modified(|l| {
                                let new = l.as_ref() != Some(&*n.labels);
                                if new {
                                    *l = Some((*n.labels).clone());
                                }
                                new
                            });
                        }
                        changed
                    }))),
                    e = &mut slice_watch => return e,
                    e = api_watch.next() => (wake::Source::Endpoints, e.map(|r| r.map(|_| true))),
                };
                match event {
                    Some(Ok(true)) => trigger.wake(what),
                    Some(Ok(false)) => {}
                    Some(Err(e)) => {
                        warn!(error = %e, what = what.as_str(), "watch error; retrying")
                    }
                    None => {
                        return AgentError::WatchEnded(match what {
                            wake::Source::Node => "Node",
                            _ => "EndpointSlices",
                        });
                    }
                }
            }
        }
    };
    let dataplane = Dataplane::new(backend, None).with_verify_period(config.verify);
    if backend == Backend::Nft && config.nft_monitor {
        tokio::spawn(follow_nft_monitor(trigger.clone(), dataplane.clone()));
    }

    let mut agent = Agent {
        dataplane,
        metrics: metrics.clone(),
        policies,
        nodes,
        peer_slices,
        slice_scope,
        api_slices,
        last_ruleset: None,
        would_drop: BTreeMap::new(),
        last_hash: None,
        drift_repairs: 0,
        last_status: None,
        last_good: BTreeMap::new(),
        node_uid: None,
        object_owner: None,
        events: events::NodeEvents::new(client.clone(), &config.node_name),
        client,
        config,
    };
    let sync_loop = async move {
        // No half view: wait for the initial list of both watches (the
        // slices' is awaited by the sync, which says which it needs).
        let (a, b) = tokio::join!(
            agent.policies.wait_until_ready(),
            agent.nodes.wait_until_ready(),
        );
        if a.is_err() || b.is_err() {
            return AgentError::WatchEnded("initial list");
        }
        info!(
            policies = agent.policies.state().len(),
            "initial lists received; syncing"
        );
        let mut failures: u32 = 0;
        let mut audit_tick = tokio::time::interval(agent.config.audit_report);
        audit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let started = Instant::now();
            let result = agent.sync().await;
            if !matches!(result, Ok(None)) {
                agent
                    .metrics
                    .sync_duration
                    .observe(started.elapsed().as_secs_f64());
            }
            let wait = match result {
                // Waiting for the peer slices' list, whose end wakes it.
                Ok(None) => agent.config.resync.min(agent.config.verify),
                Ok(Some((status, problems))) => {
                    failures = 0;
                    for p in &problems {
                        warn!(problem = %p, "policy problem");
                    }
                    agent
                        .metrics
                        .ready
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    agent.metrics.synced(SystemTime::now());
                    agent.report(status, None).await;
                    agent.config.resync.min(agent.config.verify)
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    agent.metrics.sync_failures.inc();
                    warn!(error = %e, failures, "sync failed; previous ruleset stays in force");
                    let status = agent.last_status.clone().unwrap_or_default();
                    agent.report(status, Some(e.to_string())).await;
                    // After the report: the FirewallNode the Event is about
                    // exists by then.
                    if e.is_restore_failure() {
                        agent
                            .events
                            .warn(events::RESTORE_FAILED, "Restore", &e.to_string())
                            .await;
                    }
                    let backoff = Duration::from_millis(200)
                        .saturating_mul(1 << failures.min(8))
                        .min(Duration::from_secs(30));
                    backoff.min(agent.config.resync)
                }
            };
            let deadline = tokio::time::sleep(wait);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = trigger.woken() => {
                        // Let a burst of events settle into one sync.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ = &mut deadline => {}
                    _ = audit_tick.tick() => {
                        if agent.refresh_audit().await
                            && let Some(status) = agent.last_status.clone()
                        {
                            let status = agent.with_audit(status);
                            let error = (status.conditions.first().map(|c| c.status.as_str())
                                == Some("False"))
                            .then(|| status.conditions[0].message.clone());
                            agent.report(status, error).await;
                        }
                        continue;
                    }
                }
                break;
            }
        }
    };
    tokio::select! {
        e = watches => Err(e),
        e = sync_loop => Err(e),
    }
}

/// Removes everything Palisade wrote on this node (the `cleanup`
/// subcommand) and nothing else.
pub fn cleanup(backend: Option<Backend>) -> Result<usize, AgentError> {
    let backend = match backend {
        Some(b) => b,
        None => backend::detect()?,
    };
    let report = Dataplane::new(backend, None).cleanup()?;
    Ok(report.plan.diff.ipv4.delete_chains.len() + report.plan.diff.ipv6.delete_chains.len())
}

/// After `cleanup` because the agent's DaemonSet is being deleted: writes
/// this node's FirewallNode status as enforcing nothing, so the controller
/// waits for no agent that will not come back.
pub async fn report_removed(client: Client, node_name: &str) -> Result<(), AgentError> {
    let api: Api<FirewallNode> = Api::all(client);
    let status = FirewallNodeStatus {
        conditions: vec![Condition {
            type_: crate::api::conditions::READY.into(),
            status: "False".into(),
            reason: crate::api::conditions::reason::REMOVED.into(),
            message:
                "the agent's DaemonSet was deleted: Palisade's rules were removed from this node"
                    .into(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
            observed_generation: None,
        }],
        ..Default::default()
    };
    api.patch_status(
        node_name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(json!({
            "apiVersion": "palisade.dev/v1alpha1",
            "kind": "FirewallNode",
            "status": status,
        })),
    )
    .await
    .map_err(kube_err(format!("writing FirewallNode {node_name} status")))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn facts(node: &NodeFacts) -> Facts {
        Facts {
            nodes: vec![node.clone()].into(),
            failsafe: Failsafe::default(),
            ..Default::default()
        }
    }

    #[test]
    fn stored_policies_and_node_keep_only_what_a_sync_reads() {
        let mut p: FirewallPolicy = serde_json::from_value(json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "FirewallPolicy",
            "metadata": {"name": "web", "uid": "u1", "generation": 3,
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "team": "a"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]},
            "spec": {"policyTypes": ["Ingress"]},
            "status": {"observedGeneration": 3, "warnings": ["w"],
                "resolvedPeers": [{"id": "sg-1", "cidrs": ["10.0.0.1/32"]}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "Synced", "message": "m",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        let before = policy_fingerprint(&p);
        let spec = p.spec.clone();
        trim_policy(&mut p);
        assert!(p.metadata.managed_fields.unwrap_or_default().is_empty());
        assert!(p.metadata.annotations.is_none());
        assert_eq!(
            (p.metadata.uid.as_deref(), p.metadata.generation),
            (Some("u1"), Some(3))
        );
        assert_eq!(p.spec, spec);
        let status = p.status.unwrap();
        assert_eq!(
            status.resolved_peers.len(),
            1,
            "what the node layer matches"
        );
        assert!(status.conditions.is_empty() && status.warnings.is_empty());
        assert!(status.observed_generation.is_none());
        assert_eq!(before.len(), 16, "a hash is kept per policy, not the spec");

        let mut n: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "uid": "n-uid", "labels": {"role": "web"},
                "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
                "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"providerID": "aws:///eu-west-1a/i-0abc", "podCIDR": "10.1.0.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"}],
                "images": [{"names": ["registry/image:1"], "sizeBytes": 1}],
                "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let facts = NodeFacts::from_node(&n);
        trim_node(&mut n);
        assert_eq!(NodeFacts::from_node(&n), facts, "the facts survive");
        assert_eq!(n.uid().as_deref(), Some("n-uid"));
        let status = n.status.as_ref().unwrap();
        assert!(status.images.is_none() && status.conditions.is_none());
        assert!(n.metadata.managed_fields.is_none() && n.metadata.annotations.is_none());
    }

    #[test]
    fn own_node_heartbeats_wake_no_sync() {
        let mut n: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "uid": "u", "labels": {"role": "web"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"}]}
        }))
        .unwrap();
        let mut last = None;
        assert!(node_event(&mut last, &watcher::Event::Apply(n.clone())));
        n.status.as_mut().unwrap().conditions = Some(vec![Default::default()]);
        n.metadata.resource_version = Some("2".into());
        assert!(!node_event(&mut last, &watcher::Event::Apply(n.clone())));
        n.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("role".into(), "db".into());
        assert!(node_event(&mut last, &watcher::Event::Apply(n)));
    }

    #[test]
    fn audit_counters_name_their_policy_and_direction() {
        let p: FirewallPolicy = serde_yaml::from_str(
            "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {name: trial}\nspec: {mode: Audit, policyTypes: [Ingress, Egress]}\n",
        )
        .unwrap();
        let node = NodeFacts {
            name: "n1".into(),
            ..Default::default()
        };
        let rs = compile_node("n1", &[validate(&p).unwrap()], &facts(&node)).unwrap();
        let mut found: Vec<(String, Direction)> = audit_counters(&rs).into_values().collect();
        found.sort();
        // One counter per family and direction.
        let t = |d| ("trial".to_string(), d);
        assert_eq!(
            found,
            [
                t(Direction::Ingress),
                t(Direction::Ingress),
                t(Direction::Egress),
                t(Direction::Egress)
            ]
        );
    }

    #[test]
    fn nameservers_come_from_resolv_conf() {
        let text = "# generated\nsearch ec2.internal\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bogus\noptions ndots:5\n";
        assert_eq!(
            nameservers(text),
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn status_only_writes_wake_nothing() {
        let p: FirewallPolicy = serde_yaml::from_str(
            "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {name: p, generation: 1, uid: u1}\nspec: {policyTypes: [Ingress]}\n",
        )
        .unwrap();
        let mut seen = BTreeMap::new();
        let me = BTreeMap::new();
        let me = Some(&me);
        assert!(spec_event(&mut seen, me, &watcher::Event::Apply(p.clone())));
        let mut status_only = p.clone();
        status_only.status = Some(crate::api::FirewallPolicyStatus {
            warnings: vec!["x".into()],
            ..Default::default()
        });
        assert!(!spec_event(
            &mut seen,
            me,
            &watcher::Event::Apply(status_only.clone())
        ));
        let mut resolved = status_only.clone();
        if let Some(s) = resolved.status.as_mut() {
            s.resolved_peers = vec![crate::api::ResolvedPeer {
                id: "sg-01234567".into(),
                cidrs: vec!["10.0.0.1/32".into()],
            }];
        }
        assert!(spec_event(&mut seen, me, &watcher::Event::Apply(resolved)));
        let mut edited = p;
        edited.metadata.generation = Some(2);
        assert!(spec_event(&mut seen, me, &watcher::Event::Apply(edited)));
    }

    #[test]
    fn policies_selecting_other_nodes_wake_nothing_until_they_select_this_one() {
        let policy = |generation: i64, role: &str| -> FirewallPolicy {
            serde_yaml::from_str(&format!(
                "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {{name: other, generation: {generation}, uid: u1}}\nspec: {{policyTypes: [Ingress], nodeSelector: {{matchLabels: {{role: {role}}}}}}}\n"
            ))
            .unwrap()
        };
        let me: BTreeMap<String, String> = [("role".to_string(), "web".to_string())].into();
        let me = Some(&me);
        let mut seen = BTreeMap::new();
        assert!(!spec_event(
            &mut seen,
            me,
            &watcher::Event::Apply(policy(1, "db"))
        ));
        assert!(
            !spec_event(&mut seen, me, &watcher::Event::Apply(policy(2, "cache"))),
            "an edit among other nodes"
        );
        assert!(
            spec_event(&mut seen, me, &watcher::Event::Apply(policy(3, "web"))),
            "it now selects this node"
        );
        assert!(
            spec_event(&mut seen, me, &watcher::Event::Apply(policy(4, "db"))),
            "it no longer does: its rules go"
        );
        assert!(!spec_event(
            &mut seen,
            me,
            &watcher::Event::Delete(policy(4, "db"))
        ));
        assert!(
            spec_event(&mut seen, None, &watcher::Event::Apply(policy(5, "db"))),
            "the node not known yet: wake"
        );
    }

    #[test]
    fn policies_selecting_other_nodes_are_neither_compiled_nor_reported() {
        let node = NodeFacts {
            name: "n1".into(),
            labels: [("role".to_string(), "web".to_string())].into(),
            ..Default::default()
        };
        let policy = |name: &str, role: &str, cidr: &str| -> Arc<FirewallPolicy> {
            Arc::new(serde_yaml::from_str(&format!(
                "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {{name: {name}, generation: 1, uid: {name}}}\nspec:\n  policyTypes: [Ingress]\n  nodeSelector: {{matchLabels: {{role: {role}}}}}\n  ingress:\n    - {{name: r, protocol: TCP, ports: [{{port: 80}}], peers: [{{cidr: {cidr}}}, {{nodeSelector: {{matchLabels: {{pool: {name}}}}}}}]}}\n"
            )).unwrap())
        };
        let d = desired(
            "n1",
            &[
                policy("mine", "web", "10.0.0.0/8"),
                policy("elsewhere", "db", "10.0.0.0/8"),
                // Invalid (host bits set), but not this node's business.
                policy("broken-elsewhere", "db", "10.0.0.1/8"),
            ],
            facts(&node),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(d.applied.len(), 1);
        assert_eq!(d.good.keys().collect::<Vec<_>>(), ["mine"]);
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        assert_eq!(
            d.peer_selectors.into_iter().collect::<Vec<_>>(),
            ["pool=mine"],
            "the slices this node reads"
        );
        assert!(!d.stale);

        // Stored as stubs for the node's labels: nothing changes. A stub
        // that selects the node (its labels changed since) makes it wait
        // for the policy watch's new list.
        let db: BTreeMap<String, String> = [("role".to_string(), "db".to_string())].into();
        let web: BTreeMap<String, String> = [("role".to_string(), "web".to_string())].into();
        let stub = |role: &str, labels: &BTreeMap<String, String>| {
            let mut p = (*policy("elsewhere", role, "10.0.0.0/8")).clone();
            policies::trim_for(&mut p, labels);
            assert!(policies::is_stub(&p));
            Arc::new(p)
        };
        let mine = policy("mine", "web", "10.0.0.0/8");
        let d = desired(
            "n1",
            &[mine.clone(), stub("db", &web)],
            facts(&node),
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(!d.stale && d.applied.len() == 1);
        let d = desired(
            "n1",
            &[mine, stub("web", &db)],
            facts(&node),
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(d.stale, "a stub selecting the node is not compiled");
    }

    #[test]
    fn deleted_and_invalid_policies_are_left_out() {
        let node = NodeFacts {
            name: "n1".into(),
            ..Default::default()
        };
        let good: FirewallPolicy = serde_yaml::from_str(
            "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {name: good, generation: 3, uid: u1}\nspec:\n  policyTypes: [Ingress]\n  ingress:\n    - {name: web, protocol: TCP, ports: [{port: 80}], peers: [{cidr: 0.0.0.0/0}]}\n",
        )
        .unwrap();
        let mut gone = good.clone();
        gone.metadata.name = Some("gone".into());
        gone.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        let mut bad = good.clone();
        bad.metadata.name = Some("bad".into());
        if let Some(rules) = bad.spec.ingress.as_mut() {
            rules[0].peers[0].cidr = Some("10.0.0.1/8".into());
        }
        let d = desired(
            "n1",
            &[
                Arc::new(good.clone()),
                Arc::new(gone),
                Arc::new(bad.clone()),
            ],
            facts(&node),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(d.applied.len(), 1);
        assert_eq!(d.applied[0].name, "good");
        assert_eq!(d.applied[0].generation, 3);
        assert_eq!(d.applied[0].uid.as_deref(), Some("u1"));
        assert_eq!(d.problems.len(), 1, "{:?}", d.problems);

        // An edit that no longer validates keeps the last valid version.
        let mut edited = good.clone();
        edited.metadata.generation = Some(4);
        edited.spec = bad.spec.clone();
        let last_good: BTreeMap<String, Arc<FirewallPolicy>> =
            [("good".to_string(), Arc::new(good))].into_iter().collect();
        let d = desired("n1", &[Arc::new(edited)], facts(&node), &last_good).unwrap();
        assert_eq!(d.applied.len(), 1);
        assert_eq!(
            d.applied[0].generation, 3,
            "reported at the kept generation"
        );
        assert!(
            d.problems[0].contains("keeping generation 3"),
            "{:?}",
            d.problems
        );
    }
}
