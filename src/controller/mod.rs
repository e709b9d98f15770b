//! The controller: every `FirewallPolicy` into an AWS Security Group.
//!
//! One kube-runtime [`Controller`] over FirewallPolicies, also woken by
//! Nodes (mapped to the policies selecting them, or that attached their
//! instance, or that match nodes as peers) and by the agents'
//! FirewallNode objects. Each reconcile is one [`finalizer`] call:
//!
//! - **Apply** ([`apply`]): read (nodes, references) → plan (pure,
//!   [`crate::policy::compile_policy`]) → apply to the group
//!   (full sync: find/create, authorize → re-describe → revoke, attach) →
//!   status.
//! - **Shared groups** (`shared`): composable policies with one node
//!   selector share one group holding the union of their rules, so a node
//!   selected by many policies stays within AWS's groups per interface;
//!   [`placement`] checks that quota for every node before any write.
//! - **Cleanup** ([`cleanup`]): detach and delete the owned group (or
//!   keep it, `deletionPolicy: Retain`), revoke only our rules in an
//!   adopted group, and let the finalizer go only once no agent still
//!   lists the policy.
//!
//! # Cost on EC2
//!
//! A full cloud sync reads the group's rules once (paginated) and the
//! selected instances once, and writes nothing when nothing differs. A
//! reconcile whose inputs (generation, plan, instances) did not change
//! since the last full sync, less than a resync interval ago, makes no EC2
//! call at all: status writes and agent reports cost nothing on AWS. The
//! next full sync of each policy falls at random in the last quarter of
//! the resync interval (`Context::next_due`), so policies synced together
//! resync spread out; a full sync that finds nothing changed writes no
//! status (it is compared as the apiserver stores it, times to the
//! second). A policy without cloud rules has no group and makes no EC2
//! call once nothing of an earlier spec can be left.
//!
//! When the quota leaves no room for old and new rules side by side, the
//! new rules that do not fit are authorized right after the revoke (a
//! second authorize call; see `split_for_quota`): still no traffic
//! allowed before and after the change is ever dropped.
//!
//! # Reads from Kubernetes
//!
//! Nodes and FirewallNodes come from one watch each ([`cache`]): listed once
//! at start (and on a failover or an expired watch), then followed. The
//! task that updates the cache is also what wakes policies (kube's
//! `reconcile_on`), after the update, so a reconcile woken by a Node or
//! agent change always sees that change; Node heartbeats change no fact
//! Palisade uses and wake nothing. No reconcile lists anything.
//!
//! # Permissions
//!
//! Kubernetes: `firewallpolicies` get/list/watch/patch/update,
//! `firewallpolicies/status` patch, `firewallnodes` get/list/watch, `nodes`
//! get/list/watch, `events.k8s.io` events create/patch, and
//! `coordination.k8s.io` leases get/create/update in the lease namespace.
//! AWS (IAM): `ec2:DescribeSecurityGroups`, `DescribeSecurityGroupRules`,
//! `DescribeInstances`, `DescribeNetworkInterfaces`,
//! `DescribeManagedPrefixLists`, `GetManagedPrefixListEntries`,
//! `CreateSecurityGroup`, `DeleteSecurityGroup`, `CreateTags`,
//! `AuthorizeSecurityGroupIngress/Egress`, `RevokeSecurityGroupIngress/Egress`,
//! `ModifySecurityGroupRules`, `ModifyNetworkInterfaceAttribute`.

mod apply;
pub mod cache;
mod classes;
mod compose;
pub mod effective;
pub mod exposure;
pub mod leader;
pub mod metrics;
pub mod peers;
pub mod placement;
pub mod release;
mod shared;
pub mod status;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};

use crate::api::FirewallPolicy;
use crate::cloud::{CloudError, Ec2, ErrorKind};
use crate::policy::{NodeFacts, PolicyError, SgQuota};

pub use apply::{apply, cleanup};
pub use metrics::Metrics;

/// The finalizer the controller puts on every policy.
pub const FINALIZER: &str = "palisade.dev/cleanup";
/// The field manager of status writes and the Event reporter.
pub const MANAGER: &str = "palisade-controller";

/// Settings of one controller.
#[derive(Debug, Clone)]
pub struct Config {
    /// Written into the tags of every group created (`palisade.dev/cluster`).
    pub cluster_name: String,
    /// How often a policy's group is read back in full to repair drift.
    pub resync: Duration,
    /// How long a stalled policy waits before being looked at again
    /// without any change.
    pub stalled_retry: Duration,
    /// Reconciles run at once.
    pub concurrency: u16,
    /// The Security Group rule quota the compiler plans with.
    pub quota: SgQuota,
    /// Only policies with these labels (`k=v,k2=v2`), for sharding and tests.
    pub policy_selector: Option<String>,
    /// Name of this instance in Events.
    pub instance: Option<String>,
    /// The VPC's CIDRs: exposure is reported from them as well as from
    /// anywhere (`--vpc-cidr`).
    pub vpc_cidrs: Vec<ipnet::IpNet>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster_name: "default".into(),
            resync: Duration::from_secs(300),
            stalled_retry: Duration::from_secs(1800),
            concurrency: 4,
            quota: SgQuota::default(),
            policy_selector: None,
            instance: None,
            vpc_cidrs: Vec::new(),
        }
    }
}

/// Everything that stops one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The apiserver refused or failed a call.
    #[error("{context}: {source}")]
    Kube {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
    /// An EC2 call failed after retries.
    #[error("{0}")]
    Cloud(#[from] CloudError),
    /// The policy cannot be compiled or its plan exceeds the quota.
    #[error("{0}")]
    Policy(#[from] PolicyError),
    /// No VPC to create the group in.
    #[error(
        "no VPC for the Security Group of policy {policy}: set spec.securityGroup.vpcId, or select at least one node running on EC2 (spec.providerID aws:///<zone>/<instance-id>)"
    )]
    NoVpc {
        /// The policy.
        policy: String,
    },
    /// The selected nodes' instances are in different VPCs.
    #[error(
        "the nodes selected by policy {policy} are in several VPCs ({vpcs}); a Security Group lives in one VPC: narrow spec.nodeSelector or set spec.securityGroup.vpcId"
    )]
    SeveralVpcs {
        /// The policy.
        policy: String,
        /// The VPCs, comma-separated.
        vpcs: String,
    },
    /// A group named as the owned group exists without our tags.
    #[error(
        "a Security Group named {name} already exists in {vpc} and was not created by Palisade for this policy: set spec.securityGroup.name to another name, or adopt it with spec.securityGroup.id"
    )]
    GroupNameTaken {
        /// The group name.
        name: String,
        /// The VPC.
        vpc: String,
    },
    /// Selected nodes whose interface would carry more groups than the
    /// account allows once every policy selecting them is applied: found
    /// before any EC2 write.
    #[error(
        "{count} node(s) selected by policy {policy} cannot take its Security Group within the groups-per-interface quota ({limit}): {}; attach fewer groups to them (narrow a nodeSelector, or adopt one shared group with spec.securityGroup.id), or raise the 'Security groups per network interface' quota and --groups-per-interface", nodes.join("; ")
    )]
    InterfaceFull {
        /// The policy.
        policy: String,
        /// The limit.
        limit: u32,
        /// How many nodes do not fit.
        count: usize,
        /// A bounded sample: one line per node, with its numbers.
        nodes: Vec<String>,
    },
    /// The union of the rules of the policies sharing one group exceeds the
    /// rule quota: found before any EC2 write.
    #[error(
        "the policies sharing a Security Group with {policy} ({}{}) need {used} {direction} {family} rules together, over the quota of {limit} per group; split their rules, give one of them its own group (spec.securityGroup.name), or raise the quota and --sg-rules-per-direction", members.join(", "), if node.is_empty() { String::from("; same nodeSelector") } else { format!("; together on node {node}") }
    )]
    SharedOverQuota {
        /// The policy.
        policy: String,
        /// A node they select together (empty: they share one selector).
        node: String,
        /// Every member of the class.
        members: Vec<String>,
        /// The direction over quota.
        direction: crate::policy::Direction,
        /// The address family over quota.
        family: crate::policy::IpFamily,
        /// Rules needed.
        used: u32,
        /// The quota.
        limit: u32,
    },
    /// The composable policies selecting a node have more distinct
    /// selectors than the tags AWS allows on their composed group hold.
    #[error(
        "node {node} is selected by composable policies with {selectors} different nodeSelectors (among them {policy}); their composed Security Group would carry {tags} tags, over AWS's {limit} per resource (at most {} selectors per node); give some of them a group of their own (spec.securityGroup.name) or share selectors", limit - (tags - selectors)
    )]
    ClassTooLarge {
        /// The policy.
        policy: String,
        /// A node of the class.
        node: String,
        /// Distinct selectors in the class.
        selectors: usize,
        /// Tags its group would carry.
        tags: usize,
        /// AWS's tags per resource.
        limit: usize,
    },
    /// The policy object has no uid or name (never from the apiserver).
    #[error("the policy object lacks metadata.{0}")]
    Metadata(&'static str),
    /// Cleanup done on AWS; agents still enforce the policy.
    #[error("waiting for the agents of {} node(s) to remove the policy's rules: {}", nodes.len(), nodes.join(", "))]
    WaitingForAgents {
        /// Nodes whose FirewallNode still lists the policy.
        nodes: Vec<String>,
    },
    /// The finalizer helper failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    pub(crate) fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let context = context.into();
        move |source| Error::Kube { context, source }
    }

    /// The reason this error is reported under: a condition reason for
    /// permanent errors, a short word otherwise. Doubles as a metric label.
    pub fn reason(&self) -> &'static str {
        use crate::api::conditions::reason;
        match self {
            Error::Kube { .. } => "KubeError",
            Error::Cloud(e) => match e.kind {
                ErrorKind::Auth => reason::AUTH_FAILED,
                ErrorKind::NotFound { .. } => reason::INVALID_REFERENCE,
                ErrorKind::QuotaExceeded => reason::QUOTA_EXCEEDED,
                ErrorKind::Invalid => "Ec2Invalid",
                ErrorKind::Throttled => "Ec2Throttled",
                ErrorKind::Transient => "Ec2Unavailable",
                ErrorKind::Duplicate => "Ec2Duplicate",
                ErrorKind::DependencyViolation => "Ec2DependencyViolation",
            },
            Error::Policy(e) => e.reason(),
            Error::NoVpc { .. } | Error::SeveralVpcs { .. } | Error::GroupNameTaken { .. } => {
                reason::INVALID_REFERENCE
            }
            Error::InterfaceFull { .. }
            | Error::SharedOverQuota { .. }
            | Error::ClassTooLarge { .. } => reason::QUOTA_EXCEEDED,
            Error::Metadata(_) => reason::INVALID_POLICY,
            Error::WaitingForAgents { .. } => "WaitingForAgents",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.reason(),
                _ => "FinalizerError",
            },
        }
    }

    /// The message for a person: the error, and for AWS refusals what to
    /// check.
    pub fn advice(&self) -> String {
        let hint = match self.cloud_kind() {
            Some(ErrorKind::Auth) => {
                " (check the controller's AWS identity: IRSA / EKS Pod Identity / instance profile, and that its IAM policy allows ec2:Describe*, ec2:CreateSecurityGroup, ec2:DeleteSecurityGroup, ec2:AuthorizeSecurityGroup*, ec2:RevokeSecurityGroup*, ec2:ModifySecurityGroupRules, ec2:ModifyNetworkInterfaceAttribute, ec2:CreateTags)"
            }
            _ => "",
        };
        format!("{self}{hint}")
    }

    fn cloud_kind(&self) -> Option<ErrorKind> {
        match self {
            Error::Cloud(e) => Some(e.kind.clone()),
            Error::Finalizer(f) => match f.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.cloud_kind(),
                _ => None,
            },
            _ => None,
        }
    }

    /// True when retrying cannot help until the policy or the environment
    /// changes: reported as `Stalled`, looked at again only on a change or
    /// after a long interval.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Cloud(e) => matches!(
                e.kind,
                ErrorKind::Auth
                    | ErrorKind::NotFound { .. }
                    | ErrorKind::QuotaExceeded
                    | ErrorKind::Invalid
            ),
            Error::Policy(_)
            | Error::NoVpc { .. }
            | Error::SeveralVpcs { .. }
            | Error::GroupNameTaken { .. }
            | Error::InterfaceFull { .. }
            | Error::SharedOverQuota { .. }
            | Error::ClassTooLarge { .. }
            | Error::Metadata(_) => true,
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.is_permanent(),
                _ => false,
            },
            Error::Kube { .. } | Error::WaitingForAgents { .. } => false,
        }
    }
}

/// The part of the resync interval by which a policy's next full sync is
/// brought forward at random (see [`Context::next_due`]).
pub(crate) const RESYNC_SPREAD: f64 = 0.25;

/// What the last full cloud sync of one policy saw, so reconciles with the
/// same inputs skip EC2 until the next resync.
#[derive(Debug, Clone)]
pub(crate) struct SyncMemory {
    pub(crate) generation: i64,
    /// The fingerprint of that sync's inputs (16 hex digits, not the text:
    /// that lists every selected instance).
    pub(crate) inputs: String,
    /// When the next full sync is due (`None`: at the next reconcile; see
    /// [`Context::next_due`]).
    pub(crate) due: Option<Instant>,
    pub(crate) references: crate::policy::Facts,
    pub(crate) rules: i64,
    /// The group as that sync left it (newer than a status read from a
    /// watch cache that may lag behind our own write).
    pub(crate) group: Option<crate::api::SecurityGroupStatus>,
    /// The status record of that sync (same reason).
    pub(crate) cloud_sync: Option<crate::api::CloudSync>,
    /// What the other groups on the selected nodes' interfaces admit
    /// beyond the policy, as of that sync.
    pub(crate) effective: effective::Effective,
    /// The group of that sync was a shared group (see `shared`).
    pub(crate) shared: bool,
    /// The policy's selector key when that sync found it composable (see
    /// `compose::leave`).
    pub(crate) selector: Option<String>,
}

/// Shared state of every reconcile.
pub struct Context<E: Ec2> {
    /// Kubernetes client.
    pub client: Client,
    /// EC2.
    pub ec2: Arc<E>,
    /// Settings.
    pub config: Config,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    pub(crate) recorder: Recorder,
    pub(crate) memory: Mutex<HashMap<String, SyncMemory>>,
    pub(crate) failures: Mutex<HashMap<String, u32>>,
    pub(crate) eni_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Nodes and agent reports, from watches.
    pub cache: Arc<cache::ClusterCache>,
    /// Security Groups on the selected nodes' interfaces, as last read.
    pub groups: effective::GroupCache,
    /// Instances as the last full syncs described them (interfaces and
    /// their groups), by instance id.
    pub(crate) instances: Mutex<HashMap<String, crate::cloud::InstanceInfo>>,
    /// The rules of shared groups as a sync last read or wrote them under
    /// the class's lock, and when (see [`Context::remembered_rules`]).
    pub(crate) class_rules: Mutex<HashMap<String, (Instant, Vec<crate::policy::CurrentSgRule>)>>,
    /// Who the groups met on interfaces belong to (see `compose::Owner`).
    pub(crate) group_owners: Mutex<HashMap<String, compose::Owner>>,
    /// The placement classes of the newest snapshot of node facts (see
    /// `classes`).
    pub(crate) classes: Mutex<Option<Arc<classes::ClassTable>>>,
    /// Each node's exposure, as last computed.
    pub(crate) exposure: Mutex<HashMap<String, exposure::NodeExposure>>,
    /// Every policy this controller reconciles, from its watch (set by
    /// [`run`]): what the groups-per-interface check counts.
    pub(crate) policies: std::sync::OnceLock<Store<FirewallPolicy>>,
    /// Wakes a policy (set by [`run`]): a member of a shared group wakes
    /// the others when it changed the group for them.
    pub(crate) wake: std::sync::OnceLock<
        futures::channel::mpsc::UnboundedSender<
            kube::runtime::reflector::ObjectRef<FirewallPolicy>,
        >,
    >,
}

impl<E: Ec2> std::fmt::Debug for Context<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish()
    }
}

impl<E: Ec2> Context<E> {
    /// Forgets every policy's last full sync, so the next reconcile of each
    /// reads its group back from EC2 (what the resync timer does).
    pub fn expire_sync_memory(&self) {
        for m in lock(&self.memory).values_mut() {
            m.due = None;
        }
        self.groups.clear();
        lock(&self.class_rules).clear();
        lock(&self.group_owners).clear();
    }

    pub(crate) async fn publish(
        &self,
        policy: &FirewallPolicy,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: action.to_string(),
            secondary: None,
        };
        // Without the resourceVersion (which every status write moves), so
        // a repeated Event joins its series instead of making a new object.
        let mut reference = policy.object_ref(&());
        reference.resource_version = None;
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(policy = %policy.name_any(), error = %e, "publishing an Event failed");
        }
    }

    /// Every Node's facts, by name, from the watch cache (once its initial
    /// list is in: never a half view).
    pub(crate) async fn node_facts(&self) -> Result<Arc<Vec<NodeFacts>>, Error> {
        self.cache.ready().await;
        Ok(self.cache.nodes())
    }

    /// Every agent report, from the watch cache.
    pub(crate) async fn reports(&self) -> Result<Vec<Arc<cache::Report>>, Error> {
        self.cache.ready().await;
        Ok(self.cache.reports())
    }

    pub(crate) fn eni_lock(&self, eni: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.eni_locks)
            .entry(eni.to_string())
            .or_default()
            .clone()
    }

    /// The rules of shared group `id` as a sync of this controller last
    /// read or wrote them, under the class's lock, less than 90 % of a
    /// resync ago. A sync whose difference could be drift reads the group
    /// from EC2 instead; one that finds the union already there in these
    /// rules writes nothing and reads nothing, and one that would write
    /// reads the group from EC2 first (rule ids of rules just authorized
    /// are not known here). Every write to a group's rules forgets them
    /// ([`apply::apply_diff`]), as does its deletion. So a change made
    /// out of band is found at the next resync of any member (every resync
    /// interval), not at every node joining.
    pub(crate) fn remembered_rules(&self, id: &str) -> Option<Vec<crate::policy::CurrentSgRule>> {
        let ttl = self.fresh_for();
        lock(&self.class_rules)
            .get(id)
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, r)| r.clone())
    }

    /// When a full sync made now is next due: the resync interval less a
    /// random part of up to [`RESYNC_SPREAD`] of it, so policies synced
    /// together (a restart, a burst of new policies, a scale-up) are read
    /// back spread over time, not in one burst every interval.
    pub(crate) fn next_due(&self) -> Instant {
        let cut = self.config.resync.mul_f64(RESYNC_SPREAD * fastrand::f64());
        Instant::now() + self.config.resync.saturating_sub(cut)
    }

    /// How long what a sync read from EC2 (a shared group's rules, the
    /// other groups on the nodes' interfaces) is used again instead of
    /// read: less than the earliest a full sync can be due
    /// ([`Context::next_due`]), so every resync reads what it checks for
    /// drift.
    pub(crate) fn fresh_for(&self) -> Duration {
        self.config.resync.mul_f64(0.95 * (1.0 - RESYNC_SPREAD))
    }

    /// Records the rules of shared group `id` as just read or written
    /// under its class's lock.
    pub(crate) fn remember_rules(&self, id: &str, rules: &[crate::policy::CurrentSgRule]) {
        lock(&self.class_rules).insert(id.to_string(), (Instant::now(), rules.to_vec()));
    }

    /// Forgets the rules of group `id` (written, or deleted).
    pub(crate) fn forget_rules(&self, id: &str) {
        lock(&self.class_rules).remove(id);
    }

    /// Takes the locks of interfaces `enis`, then reads their groups: the
    /// fresh read every change to an interface's group list is made on
    /// (so concurrent reconciles never drop each other's group), in one
    /// `DescribeNetworkInterfaces` per [`crate::cloud::MAX_FILTER_VALUES`]
    /// interfaces instead of one per interface. An interface missing from
    /// the answer is gone.
    ///
    /// The locks are taken each once, in order, so two callers with
    /// overlapping sets never wait on each other in a cycle; interface
    /// locks are always the last taken (after a class's lock, never
    /// before one). They are held until the guards are dropped.
    pub(crate) async fn lock_interfaces(&self, enis: &[&str]) -> Result<InterfacesHeld, Error> {
        let ids: std::collections::BTreeSet<&str> = enis.iter().copied().collect();
        let mut guards = Vec::with_capacity(ids.len());
        for id in &ids {
            guards.push(self.eni_lock(id).lock_owned().await);
        }
        let ids: Vec<String> = ids.into_iter().map(str::to_string).collect();
        let groups = self.ec2.groups_of_enis(&ids).await?;
        Ok(InterfacesHeld {
            _guards: guards,
            groups,
        })
    }

    pub(crate) fn set_rules_managed(&self) {
        let total: i64 = lock(&self.memory).values().map(|m| m.rules).sum();
        self.metrics.rules_managed.set(total);
    }
}

/// Interfaces locked by [`Context::lock_interfaces`], with their groups as
/// read under the locks.
pub(crate) struct InterfacesHeld {
    _guards: Vec<tokio::sync::OwnedMutexGuard<()>>,
    /// The groups of each interface, by id (an interface gone is absent).
    pub(crate) groups: std::collections::BTreeMap<String, Vec<String>>,
}

impl InterfacesHeld {
    /// The groups of `eni` as read under its lock; `NotFound` when it is
    /// gone.
    pub(crate) fn of(&self, eni: &str) -> Result<&[String], crate::cloud::CloudError> {
        self.groups.get(eni).map(Vec::as_slice).ok_or_else(|| {
            crate::cloud::CloudError::new(
                "DescribeNetworkInterfaces",
                crate::cloud::ErrorKind::NotFound {
                    what: "InvalidNetworkInterfaceID.NotFound".into(),
                },
                format!("network interface {eni} not found"),
            )
        })
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One reconcile of one policy: the finalizer's Apply or Cleanup.
pub async fn reconcile<E: Ec2>(
    policy: Arc<FirewallPolicy>,
    ctx: Arc<Context<E>>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let api: Api<FirewallPolicy> = Api::all(ctx.client.clone());
    let key = policy.name_any();
    let result = finalizer(&api, FINALIZER, policy, |event| async {
        match event {
            Finalizer::Apply(p) => apply(p, ctx.clone()).await,
            Finalizer::Cleanup(p) => cleanup(p, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) if e.is_permanent() => "stalled",
        Err(_) => "error",
    };
    if result.is_ok() {
        lock(&ctx.failures).remove(&key);
    }
    ctx.metrics.reconciled(outcome, started.elapsed());
    result
}

/// After a failed reconcile: permanent errors wait for a change (or the
/// long `stalled_retry`); others back off exponentially with jitter,
/// per policy, from 1 s up to 5 min.
pub fn error_policy<E: Ec2>(
    policy: Arc<FirewallPolicy>,
    error: &Error,
    ctx: Arc<Context<E>>,
) -> Action {
    ctx.metrics.failed(error.reason());
    if error.is_permanent() {
        tracing::warn!(policy = %policy.name_any(), error = %error, "policy stalled");
        return Action::requeue(ctx.config.stalled_retry);
    }
    let n = {
        let mut failures = lock(&ctx.failures);
        let n = failures.entry(policy.name_any()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let ceiling = Duration::from_secs(1)
        .saturating_mul(2u32.saturating_pow(n.min(9)))
        .min(Duration::from_secs(300));
    let wait = Duration::from_millis(fastrand::u64(
        500..=u64::try_from(ceiling.as_millis())
            .unwrap_or(300_000)
            .max(500),
    ));
    tracing::info!(policy = %policy.name_any(), error = %error, retry_in = ?wait, "reconcile failed; retrying");
    Action::requeue(wait)
}

/// Builds the context: the Event recorder, metrics and settings.
pub fn context<E: Ec2>(
    client: Client,
    ec2: Arc<E>,
    config: Config,
    metrics: Arc<Metrics>,
) -> Arc<Context<E>> {
    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: config.instance.clone(),
    };
    Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        ec2,
        config,
        metrics,
        memory: Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
        eni_locks: Mutex::new(HashMap::new()),
        cache: Arc::default(),
        groups: effective::GroupCache::default(),
        instances: Mutex::new(HashMap::new()),
        classes: Mutex::new(None),
        group_owners: Mutex::new(HashMap::new()),
        class_rules: Mutex::new(HashMap::new()),
        exposure: Mutex::new(HashMap::new()),
        policies: std::sync::OnceLock::new(),
        wake: std::sync::OnceLock::new(),
    })
}

/// Runs the controller until `shutdown` completes (then finishes the
/// reconciles in flight and returns).
pub async fn run<E: Ec2>(
    ctx: Arc<Context<E>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ctx_metrics = ctx.metrics.clone();
    let ctx_exposure = ctx.clone();
    let ctx_publisher = ctx.cache.clone();
    let resync = ctx.config.resync;
    let mut policy_watch = watcher::Config::default();
    if let Some(selector) = &ctx.config.policy_selector {
        policy_watch = policy_watch.labels(selector);
    }
    // One policy watch (one LIST at start and failover) feeds the
    // controller's store, trimmed, and the peer-slice publisher.
    let (policies, writer) = reflector::store();
    let (to_publisher, policy_events) = futures::channel::mpsc::unbounded();
    let shared_watch = ctx.config.policy_selector.is_none();
    let stream = watcher(Api::<FirewallPolicy>::all(client.clone()), policy_watch)
        .default_backoff()
        .modify(trim_policy)
        .reflect(writer)
        .inspect_ok(move |e| {
            if shared_watch {
                let _ = to_publisher.unbounded_send(peers::policy_event(e));
            }
        })
        .applied_objects();
    let controller = Controller::for_stream(stream, policies.clone());
    let _ = ctx.policies.set(policies.clone());
    // Nodes and agent reports: one watch each, into the cache; the same
    // task wakes the policies a change concerns, after the cache has it.
    let (wake, woken) = futures::channel::mpsc::unbounded();
    let _ = ctx.wake.set(wake.clone());
    let follower = cache::follow(client.clone(), ctx.cache.clone(), policies.clone(), wake);
    // Node addresses for the agents' nodeSelector peers and failsafe,
    // published while this instance leads. Slices serve every policy: a
    // controller that reconciles only some (`--policy-selector`) has the
    // publisher watch all of them.
    let publisher = async move {
        if shared_watch {
            peers::publish_from(client, ctx_publisher, policy_events).await;
        } else {
            let own = peers::own_policy_watch(client.clone());
            peers::publish_from(client, ctx_publisher, own).await;
        }
    };
    let reconciles = controller
        .with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.config.concurrency),
        )
        .reconcile_on(woken)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile trigger failed");
            }
        });
    let exposures = exposure::run(ctx_exposure, policies.clone(), resync);
    let pruner = prune_policy_series(ctx_metrics, policies);
    tokio::select! {
        _ = exposures => {}
        _ = reconciles => {}
        _ = follower => {}
        _ = publisher => {}
        _ = pruner => {}
    }
}

/// What the controller's policy store keeps of a policy: all but
/// `managedFields` and kubectl's last-applied copy of the object
/// ([`crate::api::trim_bookkeeping`]); the status stays (reconciles
/// compare with it).
pub fn trim_policy(policy: &mut FirewallPolicy) {
    crate::api::trim_bookkeeping(&mut policy.metadata);
}

/// Drops, once a minute, the metric series of policies gone from the watch
/// cache without a cleanup (a finalizer removed by hand, a label moved out
/// of `policySelector`), so a deleted policy never stays counted as
/// stalled. Never completes.
async fn prune_policy_series(metrics: Arc<Metrics>, policies: Store<FirewallPolicy>) {
    if policies.wait_until_ready().await.is_ok() {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let names: BTreeSet<String> = policies.state().iter().map(|p| p.name_any()).collect();
            metrics.retain_policies(|p| names.contains(p));
        }
    }
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_for_conditions_and_backoff() {
        let cloud =
            |kind| Error::Cloud(CloudError::new("AuthorizeSecurityGroupIngress", kind, "x"));
        assert!(cloud(ErrorKind::Auth).is_permanent());
        assert_eq!(cloud(ErrorKind::Auth).reason(), "AuthFailed");
        assert!(cloud(ErrorKind::Auth).advice().contains("IRSA"));
        assert!(!cloud(ErrorKind::Throttled).is_permanent());
        assert!(!cloud(ErrorKind::DependencyViolation).is_permanent());
        assert_eq!(
            cloud(ErrorKind::NotFound {
                what: "InvalidGroup.NotFound".into()
            })
            .reason(),
            "InvalidReference"
        );
        let wrapped = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::ApplyFailed(
            cloud(ErrorKind::QuotaExceeded),
        )));
        assert!(wrapped.is_permanent());
        assert_eq!(wrapped.reason(), "QuotaExceeded");
        assert!(
            !Error::WaitingForAgents {
                nodes: vec!["a".into()]
            }
            .is_permanent()
        );
        assert!(
            Error::NoVpc { policy: "p".into() }
                .to_string()
                .contains("vpcId")
        );
    }
}
