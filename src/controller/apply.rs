//! The two branches of the finalizer: [`apply`] and [`cleanup`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;

use super::effective::Effective;
use super::placement::{self, Slot};
use super::status::{self, CloudState};
use super::{Context, Error, SyncMemory, lock};
use super::{compose, shared};
use crate::api::{
    DeletionPolicy, FirewallPolicy, FirewallPolicyStatus, GroupShare, Layer, PolicyMode,
    SecurityGroupStatus, SecurityGroupTarget,
};
use crate::cloud::{
    CloudError, Ec2, ErrorKind, GroupInfo, InstanceInfo, MAX_FILTER_VALUES, NewGroup, tags,
};
use crate::policy::effective::{Intent, widenings};
use crate::policy::{
    CompiledPolicy, CurrentSgRule, Direction, Facts, GroupOwnership, PeerRef, PlannedPermission,
    SgDiff, SgPeer, compile_policy, diff_security_group, marker, owns_rule, resolved_peers,
};

const DIRECTIONS: [Direction; 2] = [Direction::Ingress, Direction::Egress];

/// What a full cloud sync found and did.
#[derive(Debug, Clone)]
struct CloudReport {
    /// `None`: the policy has no group ([`shared::no_group`]).
    group: Option<SecurityGroupStatus>,
    /// The sync found the group changed out of band and repaired it.
    drift_repaired: bool,
    /// What other groups on the selected interfaces admit beyond the policy.
    effective: Effective,
    /// The group is the shared group of the policy's class.
    shared: bool,
}

fn target(policy: &FirewallPolicy) -> SecurityGroupTarget {
    policy.spec.security_group.clone().unwrap_or_default()
}

fn group_tags<E: Ec2>(policy: &FirewallPolicy, ctx: &Context<E>) -> BTreeMap<String, String> {
    let mut t = BTreeMap::new();
    t.insert(tags::CLUSTER.to_string(), ctx.config.cluster_name.clone());
    t.insert(tags::POLICY.to_string(), policy.name_any());
    t.insert(
        tags::POLICY_UID.to_string(),
        policy.uid().unwrap_or_default(),
    );
    t.insert(tags::MANAGED_BY.to_string(), tags::MANAGER.to_string());
    t
}

/// The tags that identify the group created for this very policy object.
pub(super) fn identity_tags<E: Ec2>(
    policy: &FirewallPolicy,
    ctx: &Context<E>,
) -> BTreeMap<String, String> {
    let mut t = group_tags(policy, ctx);
    t.remove(tags::POLICY);
    t.remove(tags::MANAGED_BY);
    t
}

fn referenced_ids(compiled: &CompiledPolicy) -> (Vec<String>, Vec<String>) {
    let mut sgs = BTreeSet::new();
    let mut pls = BTreeSet::new();
    for direction in DIRECTIONS {
        for rule in compiled.policy.rules(direction).unwrap_or_default() {
            for peer in &rule.peers {
                match peer {
                    PeerRef::SecurityGroup(id) => {
                        sgs.insert(id.clone());
                    }
                    PeerRef::PrefixList(id) => {
                        pls.insert(id.clone());
                    }
                    _ => {}
                }
            }
        }
    }
    (sgs.into_iter().collect(), pls.into_iter().collect())
}

/// The instance ids of the selected nodes (nodes not on EC2 left out).
fn selected_instances(compiled: &CompiledPolicy, facts: &Facts) -> Vec<String> {
    let mut ids: Vec<String> = compiled
        .selected_nodes
        .iter()
        .filter_map(|n| facts.node(n)?.instance_id().map(str::to_string))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// **Apply**: brings the policy's Security Group to its plan and writes
/// the status.
///
/// Contract:
/// - Read: Nodes and FirewallNodes from the watch caches; Security Group
///   and prefix-list references from EC2 (at a full sync only).
/// - Plan: pure ([`compile_policy`]). An invalid policy or a plan over the
///   rule quota is reported as `Stalled` before any EC2 call.
/// - Apply (the full sync): only at a full sync, i.e. when the inputs
///   (generation, plan, selected instances, group settings) changed or the
///   last full sync is older than the resync interval.
/// - Status: written only when it changed.
///
/// Idempotent: running it twice in a row makes no EC2 write the second
/// time. Permanent errors set `Stalled` and are returned (the error policy
/// then waits for a change); transient ones set `Reconciling` (reason
/// `Retrying`) and are returned for a backoff.
pub async fn apply<E: Ec2>(
    policy: Arc<FirewallPolicy>,
    ctx: Arc<Context<E>>,
) -> Result<Action, Error> {
    match apply_inner(&policy, &ctx).await {
        Ok(action) => Ok(action),
        Err(e) => {
            let previous = policy.status.clone().unwrap_or_default();
            let state = if e.is_permanent() {
                CloudState::Stalled(e.reason(), e.advice())
            } else {
                // Already retrying at this generation: leave the status be.
                // A message that differs per attempt would otherwise make
                // each failure a status write, whose watch event cuts the
                // backoff short.
                let retrying = previous.observed_generation == policy.metadata.generation
                    && previous.conditions.iter().any(|c| {
                        c.type_ == crate::api::conditions::CLOUD_SYNCED
                            && c.reason == crate::api::conditions::reason::RETRYING
                    });
                if retrying {
                    ctx.metrics.observe_status(&policy.name_any(), &previous);
                    return Err(e);
                }
                CloudState::Retrying(e.to_string())
            };
            let nodes = previous.nodes.clone().unwrap_or_default();
            let mut next = previous.clone();
            next.observed_generation = policy.metadata.generation;
            next.conditions = status::conditions(
                &previous.conditions,
                policy.metadata.generation.unwrap_or_default(),
                &state,
                &nodes,
            );
            next.conditions.extend(
                previous
                    .conditions
                    .iter()
                    .filter(|c| c.type_ == crate::api::conditions::EFFECTIVE_ACCESS)
                    .cloned(),
            );
            // Nodes over the groups-per-interface quota: named, with their
            // numbers, among the warnings too (a bounded sample).
            next.warnings
                .retain(|w| !w.starts_with(placement::WARNING_PREFIX));
            if let Error::InterfaceFull { nodes, .. } = &e {
                next.warnings.extend(
                    nodes
                        .iter()
                        .map(|n| format!("{}{n}", placement::WARNING_PREFIX)),
                );
            }
            if write_status(&policy, &ctx, &previous, next).await? && e.is_permanent() {
                ctx.publish(&policy, true, e.reason(), "Reconcile", e.advice())
                    .await;
            }
            Err(e)
        }
    }
}

async fn apply_inner<E: Ec2>(policy: &FirewallPolicy, ctx: &Context<E>) -> Result<Action, Error> {
    let name = policy.name_any();
    let uid = policy.uid().ok_or(Error::Metadata("uid"))?;
    let generation = policy.metadata.generation.unwrap_or_default();
    let mut facts = Facts {
        nodes: ctx.node_facts().await?,
        quota: ctx.config.quota,
        ..Default::default()
    };
    let memory = lock(&ctx.memory).get(&uid).cloned();
    if let Some(m) = &memory {
        facts.security_groups = m.references.security_groups.clone();
        facts.prefix_lists = m.references.prefix_lists.clone();
    }
    // Pure: an invalid policy or a plan over quota stops here, before EC2.
    let mut compiled = compile_policy(policy, &facts)?;
    let mut inputs = sync_inputs(policy, &compiled, &facts);
    let fresh = memory.as_ref().is_some_and(|m| {
        m.generation == generation
            && m.inputs == inputs
            // (A timer that fires a hair early still finds it due.)
            && m.due.is_some_and(|due| {
                due.saturating_duration_since(Instant::now()) > Duration::from_millis(100)
            })
    });

    let previous = policy.status.clone().unwrap_or_default();
    // This controller's memory when it has one (its "no group" included),
    // else the status.
    let last_group = match &memory {
        Some(m) if m.cloud_sync.is_some() => m.group.clone(),
        _ => previous.security_group.clone(),
    };
    let last_sync = memory
        .as_ref()
        .and_then(|m| m.cloud_sync.clone())
        .or_else(|| previous.cloud_sync.clone());
    let (group, cloud_sync, effective) = if fresh {
        let effective = memory
            .as_ref()
            .map_or(Effective::NotAttached, |m| m.effective.clone());
        (last_group, last_sync, effective)
    } else {
        // Resolve references, then plan again with their real sizes.
        let (sgs, pls) = referenced_ids(&compiled);
        if !sgs.is_empty() {
            let found = ctx.ec2.describe_groups(&sgs).await?;
            if let Some(missing) = sgs.iter().find(|id| !found.iter().any(|g| &g.id == *id)) {
                return Err(CloudError::new(
                    "DescribeSecurityGroups",
                    ErrorKind::NotFound {
                        what: "InvalidGroup.NotFound".into(),
                    },
                    format!("the Security Group {missing} referenced by a peer does not exist"),
                )
                .into());
            }
            facts.security_groups = ctx.ec2.group_members(&sgs).await?;
        }
        if !pls.is_empty() {
            facts.prefix_lists = ctx.ec2.prefix_lists(&pls).await?;
            if let Some(missing) = pls.iter().find(|id| !facts.prefix_lists.contains_key(*id)) {
                return Err(CloudError::new(
                    "DescribeManagedPrefixLists",
                    ErrorKind::NotFound {
                        what: "InvalidPrefixListID.NotFound".into(),
                    },
                    format!("the prefix list {missing} referenced by a peer does not exist"),
                )
                .into());
            }
        }
        compiled = compile_policy(policy, &facts)?;
        inputs = sync_inputs(policy, &compiled, &facts);
        // Drift is a difference found when nothing we apply changed since
        // the last full sync: known from memory, or — after a restart —
        // from the record that sync left in the status.
        let inputs_hash = inputs.clone();
        let drift_possible = memory
            .as_ref()
            .is_some_and(|m| m.generation == generation && m.inputs == inputs)
            || last_sync
                .as_ref()
                .is_some_and(|c| c.generation == generation && c.inputs == inputs_hash);
        let previous_shared = memory.as_ref().map(|m| m.shared);
        // Nothing of an earlier spec can be left on AWS: no group is
        // recorded (memory, else status), and the policy was never edited
        // or a full sync of this very generation completed (this
        // process's, or the one its status records), which tidied what
        // earlier generations left. A policy without cloud rules then
        // costs no EC2 call at all. (A recorded group: an older
        // controller gave node-layer policies with `attachToNodes: false`
        // an empty group of their own; the first sync deletes it.)
        let nothing_left = last_group.is_none()
            && (policy.metadata.generation == Some(1)
                || memory.as_ref().is_some_and(|m| m.generation == generation)
                || last_sync
                    .as_ref()
                    .is_some_and(|c| c.generation == generation));
        let report = if shared::no_group(policy) && nothing_left {
            CloudReport {
                group: None,
                drift_repaired: false,
                effective: Effective::NotAttached,
                shared: false,
            }
        } else if shared::no_group(policy) {
            drop_groups(policy, ctx).await?
        } else {
            sync_group(
                policy,
                ctx,
                &compiled,
                &facts,
                last_group.as_ref(),
                previous_shared,
                drift_possible,
            )
            .await?
        };
        // Moved out of a shared group (edited out of its class): the
        // class's group is planned again without this policy, now that
        // its new group is in place.
        if let Some(prev) = last_group
            .as_ref()
            .filter(|g| g.owned && report.group.as_ref().is_none_or(|now| g.id != now.id))
            && let Ok(found) = ctx
                .ec2
                .describe_groups(std::slice::from_ref(&prev.id))
                .await
            && let Some(g) = found.first()
            && let Some(k) = g.tags.get(tags::SHARED)
            // A group of several selectors is `compose`'s to tidy.
            && shared::class_of_group(g).is_some_and(|c| c.len() == 1)
        {
            shared::leave(ctx, policy, k, &prev.id).await?;
        }
        // Out of the classes of the selector it had (edited to another,
        // out of composability, deleted): their groups are planned again
        // without it, or go. Unknown after a restart: once then.
        let now = shared::composable(policy).then(|| shared::key(policy));
        let before = match &memory {
            Some(m) => m.selector.clone(),
            None if now.is_none() && shared::composable_spec(policy) && !nothing_left => {
                Some(shared::key(policy))
            }
            None => None,
        };
        if let Some(old) = before.filter(|old| now.as_ref() != Some(old)) {
            compose::leave(ctx, policy, &old, &facts).await?;
        }
        let rules = report.group.as_ref().map_or(0, |g| {
            i64::from(g.ingress_rules) + i64::from(g.egress_rules)
        });
        let cloud_sync = cloud_sync_record(
            last_sync.as_ref(),
            generation,
            inputs_hash,
            report.drift_repaired,
        );
        lock(&ctx.memory).insert(
            uid.clone(),
            SyncMemory {
                generation,
                inputs: inputs.clone(),
                due: Some(ctx.next_due()),
                references: Facts {
                    security_groups: facts.security_groups.clone(),
                    prefix_lists: facts.prefix_lists.clone(),
                    ..Default::default()
                },
                rules,
                group: report.group.clone(),
                cloud_sync: Some(cloud_sync.clone()),
                effective: report.effective.clone(),
                shared: report.shared,
                selector: now,
            },
        );
        ctx.set_rules_managed();
        ctx.metrics.synced(&name, SystemTime::now());
        (report.group, Some(cloud_sync), report.effective)
    };
    ctx.metrics
        .widened(&name, super::effective::count(&effective));

    let reports = ctx.reports().await?;
    let nodes = status::node_counts(policy, &compiled.selected_nodes, &reports);
    let cloud_state = if shared::no_group(policy) {
        CloudState::NoGroup
    } else {
        CloudState::Synced
    };
    let mut conditions = status::conditions(&previous.conditions, generation, &cloud_state, &nodes);
    conditions.push(super::effective::condition(
        &previous.conditions,
        generation,
        &effective,
    ));
    let next = FirewallPolicyStatus {
        observed_generation: Some(generation),
        conditions,
        security_group: group,
        nodes: Some(nodes),
        resolved_peers: resolved_peers(&compiled.policy, &facts),
        warnings: compiled
            .warnings
            .iter()
            .map(ToString::to_string)
            .chain(audit_note(&compiled))
            .chain(super::effective::warnings(&effective))
            .collect(),
        cloud_sync,
        exposure: {
            // Not computed yet for any selected node (a restarted
            // controller before its first exposure pass): keep what the
            // status says rather than write it away and back.
            let exposure = lock(&ctx.exposure);
            if compiled
                .selected_nodes
                .iter()
                .any(|n| exposure.contains_key(n))
            {
                super::exposure::summary(&compiled.selected_nodes, &exposure)
            } else {
                previous.exposure.clone()
            }
        },
    };
    write_status(policy, ctx, &previous, next).await?;
    tracing::debug!(policy = %name, full_sync = !fresh, "reconciled");
    // Next when its full sync is due (spread: see `Context::next_due`).
    let wait = lock(&ctx.memory)
        .get(&uid)
        .and_then(|m| m.due)
        .map_or(ctx.config.resync, |due| {
            due.saturating_duration_since(Instant::now())
        });
    Ok(Action::requeue(wait.max(Duration::from_secs(1))))
}

/// The status record of a full sync that found (or made) the group as
/// planned. Its time is when the group first held this plan: a later full
/// sync of the same generation and inputs that repaired nothing keeps the
/// previous record as it is, so a periodic resync, or a restart, writes no
/// status when nothing changed (the last read-back is the
/// `palisade_controller_last_successful_sync_timestamp_seconds` metric).
fn cloud_sync_record(
    last: Option<&crate::api::CloudSync>,
    generation: i64,
    inputs: String,
    drift_repaired: bool,
) -> crate::api::CloudSync {
    match last {
        Some(l) if l.generation == generation && l.inputs == inputs && !drift_repaired => l.clone(),
        _ => crate::api::CloudSync {
            generation,
            inputs,
            time: status::now_as_stored(),
            drift_repairs: last.map_or(0, |c| c.drift_repairs) + i64::from(drift_repaired),
        },
    }
}

/// Most interfaces one attach or detach Event names.
pub(super) const EVENT_SAMPLE: usize = 5;

/// `items` as text: all of them when one, else how many and the first
/// `limit` (`3 interfaces: a, b, c`, `40 interfaces: a, … and 35 more`).
pub(super) fn sample_list(items: &[String], limit: usize) -> String {
    match items {
        [one] => one.clone(),
        _ => {
            let shown: Vec<&str> = items.iter().take(limit).map(String::as_str).collect();
            let more = items.len().saturating_sub(limit);
            let tail = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            format!("{} interfaces: {}{tail}", items.len(), shown.join(", "))
        }
    }
}

/// What an Audit policy's status says of its cloud layer.
fn audit_note(compiled: &CompiledPolicy) -> Option<String> {
    (compiled.cloud.mode == PolicyMode::Audit).then(|| {
        format!(
            "Audit: the cloud layer is a dry run: {} Security Group permissions planned, none authorized, the group attached to no node (switch to Enforce to apply them; `palisade render` shows them)",
            compiled.cloud.planned()
        )
    })
}

/// A fingerprint of everything a full sync depends on: 16 hex digits
/// (what the controller remembers per policy, and `status.cloudSync.inputs`;
/// the text it hashes lists every selected instance).
fn sync_inputs(policy: &FirewallPolicy, compiled: &CompiledPolicy, facts: &Facts) -> String {
    let instances = selected_instances(compiled, facts);
    let text = serde_json::json!({
        "plan": compiled.cloud,
        "instances": instances,
        "target": policy.spec.security_group,
    })
    .to_string();
    crate::policy::short_hash(&[&text])
}

/// Writes `next` when it differs from `previous` (transition times
/// aside), and feeds the per-policy gauges from it either way. Returns
/// whether it wrote.
/// Every field of `FirewallPolicyStatus`, as serialized.
const STATUS_FIELDS: [&str; 8] = [
    "observedGeneration",
    "conditions",
    "securityGroup",
    "nodes",
    "resolvedPeers",
    "warnings",
    "cloudSync",
    "exposure",
];

async fn write_status<E: Ec2>(
    policy: &FirewallPolicy,
    ctx: &Context<E>,
    previous: &FirewallPolicyStatus,
    next: FirewallPolicyStatus,
) -> Result<bool, Error> {
    ctx.metrics.observe_status(&policy.name_any(), &next);
    // Compared as the apiserver would store it (times in whole seconds, an
    // empty list as none): a field that does not survive the round trip
    // would otherwise differ at every reconcile and make each one a patch
    // that changes nothing.
    let next = status::as_stored(next);
    let same = previous.observed_generation == next.observed_generation
        && previous.security_group == next.security_group
        && previous.nodes == next.nodes
        && previous.resolved_peers == next.resolved_peers
        && previous.warnings == next.warnings
        && previous.cloud_sync == next.cloud_sync
        && previous.exposure == next.exposure
        && status::same_conditions(&previous.conditions, &next.conditions);
    if same {
        return Ok(false);
    }
    let api: Api<FirewallPolicy> = Api::all(ctx.client.clone());
    // A merge patch leaves out what serializes to nothing (an empty list,
    // a `None`): name each such field as null, or a warning that went away
    // would stay in the status for ever.
    let mut body = match serde_json::to_value(&next) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(policy = %policy.name_any(), error = %e, "the status does not serialize");
            return Ok(false);
        }
    };
    if let Some(fields) = body.as_object_mut() {
        for key in STATUS_FIELDS {
            fields.entry(key).or_insert(serde_json::Value::Null);
        }
    }
    let patch = serde_json::json!({ "status": body });
    api.patch_status(
        &policy.name_any(),
        &PatchParams::apply(super::MANAGER),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(Error::kube(format!(
        "writing the status of FirewallPolicy {}",
        policy.name_any()
    )))?;
    Ok(true)
}

pub(super) fn summarize(diff: &SgDiff) -> String {
    let mut parts = Vec::new();
    for direction in DIRECTIONS {
        let d = diff.direction(direction);
        if !d.authorize.is_empty() {
            let shown: Vec<String> = d
                .authorize
                .iter()
                .take(5)
                .map(|p| {
                    format!(
                        "{} {}-{} {}",
                        p.permission.protocol.aws_name(),
                        p.permission.from_port,
                        p.permission.to_port,
                        p.permission.peer
                    )
                })
                .collect();
            parts.push(format!(
                "{direction}: {} missing ({}{})",
                d.authorize.len(),
                shown.join(", "),
                if d.authorize.len() > 5 { ", ..." } else { "" }
            ));
        }
        if !d.revoke.is_empty() {
            parts.push(format!(
                "{direction}: {} extra ({})",
                d.revoke.len(),
                d.revoke.join(", ")
            ));
        }
        if !d.update_descriptions.is_empty() {
            parts.push(format!(
                "{direction}: {} description(s) changed",
                d.update_descriptions.len()
            ));
        }
    }
    parts.join("; ")
}

/// Creates the shared group of class `key`, tagged, in the selected nodes'
/// VPC.
async fn shared_group<E: Ec2>(
    policy: &FirewallPolicy,
    ctx: &Context<E>,
    key: &str,
    instances: &[InstanceInfo],
) -> Result<(String, Option<String>), Error> {
    let vpc = vpc_of(policy, instances)?;
    let new = NewGroup {
        name: shared::group_name(&ctx.config.cluster_name, key),
        description: format!(
            "Palisade: the FirewallPolicies sharing one node selector (class {key}, cluster {})",
            ctx.config.cluster_name
        ),
        vpc_id: vpc,
        tags: shared::group_tags(&ctx.config.cluster_name, key),
    };
    create_group(policy, ctx, new, "shared Security Group").await
}

/// Creates `new` and announces it in an Event on `policy` ("created
/// {what} sg-… (name) in vpc-…"). A name already taken in the VPC is
/// [`Error::GroupNameTaken`].
pub(super) async fn create_group<E: Ec2>(
    policy: &FirewallPolicy,
    ctx: &Context<E>,
    new: NewGroup,
    what: &str,
) -> Result<(String, Option<String>), Error> {
    let (name, vpc) = (new.name.clone(), new.vpc_id.clone());
    let id = match ctx.ec2.create_group(&new).await {
        Ok(id) => id,
        Err(e) if e.kind == ErrorKind::Duplicate => {
            return Err(Error::GroupNameTaken { name, vpc });
        }
        Err(e) => return Err(e.into()),
    };
    ctx.publish(
        policy,
        false,
        "SecurityGroupCreated",
        "CreateSecurityGroup",
        format!("created {what} {id} ({name}) in {vpc}"),
    )
    .await;
    Ok((id, Some(vpc)))
}

/// The one VPC of the selected nodes' instances.
fn vpc_of(policy: &FirewallPolicy, instances: &[InstanceInfo]) -> Result<String, Error> {
    let vpcs: BTreeSet<String> = instances.iter().filter_map(|i| i.vpc_id.clone()).collect();
    match vpcs.len() {
        0 => Err(Error::NoVpc {
            policy: policy.name_any(),
        }),
        1 => Ok(vpcs.into_iter().next().unwrap_or_default()),
        _ => Err(Error::SeveralVpcs {
            policy: policy.name_any(),
            vpcs: vpcs.into_iter().collect::<Vec<_>>().join(", "),
        }),
    }
}

/// Finds the group created for this policy (by its identity tags), or
/// creates it, tagged, in the VPC of the spec or of the selected nodes.
pub(super) async fn owned_group<E: Ec2>(
    policy: &FirewallPolicy,
    ctx: &Context<E>,
    instances: &[InstanceInfo],
) -> Result<(String, Option<String>), Error> {
    let found = ctx.ec2.find_groups(&identity_tags(policy, ctx)).await?;
    if let Some(g) = found.into_iter().min_by(|a, b| a.id.cmp(&b.id)) {
        return Ok((g.id, g.vpc_id));
    }
    let spec = target(policy);
    let vpc = match spec.vpc_id.clone() {
        Some(v) => v,
        None => {
            let vpcs: BTreeSet<String> =
                instances.iter().filter_map(|i| i.vpc_id.clone()).collect();
            match vpcs.len() {
                0 => {
                    return Err(Error::NoVpc {
                        policy: policy.name_any(),
                    });
                }
                1 => vpcs.into_iter().next().unwrap_or_default(),
                _ => {
                    return Err(Error::SeveralVpcs {
                        policy: policy.name_any(),
                        vpcs: vpcs.into_iter().collect::<Vec<_>>().join(", "),
                    });
                }
            }
        }
    };
    let mut all_tags = spec.tags.clone().unwrap_or_default();
    all_tags.extend(group_tags(policy, ctx));
    let name = spec.name.clone().unwrap_or_else(|| {
        format!("palisade-{}-{}", ctx.config.cluster_name, policy.name_any())
            .chars()
            .take(255)
            .collect()
    });
    let new = NewGroup {
        name,
        description: format!(
            "Palisade FirewallPolicy {} (cluster {})",
            policy.name_any(),
            ctx.config.cluster_name
        ),
        vpc_id: vpc,
        tags: all_tags,
    };
    create_group(policy, ctx, new, "Security Group").await
}

/// **Full cloud sync**: the group exists, holds exactly the plan, and is
/// attached to exactly the selected nodes' primary ENIs.
///
/// Contract: reads the group's rules once (paginated) and the relevant
/// instances once; writes in the order authorize → update descriptions →
/// revoke, one call per group and direction each, and only what differs;
/// attaches/detaches by rewriting an ENI's group list with every other
/// group kept. When `drift_possible` (the plan did not change since the
/// last full sync), any difference is an out-of-band change and is
/// recorded as a `DriftCorrected` Warning Event.
async fn sync_group<E: Ec2>(
    policy: &FirewallPolicy,
    ctx: &Context<E>,
    compiled: &CompiledPolicy,
    facts: &Facts,
    previous: Option<&SecurityGroupStatus>,
    previous_shared: Option<bool>,
    drift_possible: bool,
) -> Result<CloudReport, Error> {
    let spec = target(policy);
    let owned = spec.is_owned();
    // An Audit policy's group carries no permission and is attached to no
    // interface: the cloud side of a dry run changes no verdict.
    let audit = compiled.cloud.mode == PolicyMode::Audit;
    let attaches = spec.attaches() && !audit;
    let previous = previous.cloned();
    let selected = if attaches {
        selected_instances(compiled, facts)
    } else {
        Vec::new()
    };
    // Nodes it selects with policies of other selectors: composed groups.
    if owned
        && attaches
        && shared::composable(policy)
        && compose::needed(ctx, policy, facts, &selected).await?
    {
        return sync_composed(policy, ctx, compiled, facts, &selected, drift_possible).await;
    }
    // The class of a composable policy, under its lock for the whole
    // sync (one writer per shared group); it shares a group when another
    // member exists, or when the class's group already does.
    let class_key = (owned && attaches && shared::composable(policy)).then(|| shared::key(policy));
    let class_lock = class_key
        .as_ref()
        .map(|k| ctx.eni_lock(&shared::lock_name(k)));
    let _class_held = match &class_lock {
        Some(l) => Some(l.lock().await),
        None => None,
    };
    let class: Option<(String, Vec<FirewallPolicy>, Option<GroupInfo>)> = match &class_key {
        Some(k) => {
            let all = shared::all_policies(ctx).await;
            let members = shared::members(&all, k, Some(policy), None);
            let found = shared::find(ctx, k).await?;
            (members.len() >= 2 || found.is_some()).then(|| (k.clone(), members, found))
        }
        None => None,
    };
    // The policy's own group, as last synced: trusted only when known not
    // to be a shared group (else looked up by the policy's identity tags).
    let known_owned = previous
        .as_ref()
        .filter(|g| owned && g.owned && class.is_none() && previous_shared == Some(false))
        .map(|g| (g.id.clone(), g.vpc_id.clone()));
    // The interfaces whose other groups are compared with the policy:
    // every selected node's, in Audit too (what Enforce would meet).
    let analysed = if spec.attaches() {
        selected_instances(compiled, facts)
    } else {
        Vec::new()
    };
    let mut wanted: BTreeSet<String> = selected.iter().chain(&analysed).cloned().collect();
    if owned && known_owned.is_none() && spec.vpc_id.is_none() {
        // The VPC of the new group comes from the selected nodes.
        wanted.extend(selected_instances(compiled, facts));
    }
    let wanted: Vec<String> = wanted.into_iter().collect();
    let instances = ctx.ec2.describe_instances(&wanted).await?;
    {
        let mut known = lock(&ctx.instances);
        for i in &instances {
            known.insert(i.id.clone(), i.clone());
        }
    }
    check_interfaces(
        policy,
        ctx,
        facts,
        &instances,
        &selected,
        previous.as_ref(),
        &BTreeSet::new(),
    )
    .await?;

    // The group.
    let (group_id, vpc_id, current, plan) = if let Some((k, members, found)) = &class {
        let current = match found {
            Some(g) => ctx.ec2.describe_rules(&g.id).await?,
            None => Vec::new(),
        };
        let union = shared::plan(ctx, k, members, facts, &current).await?;
        if let Some((direction, family, used)) = union.over_quota() {
            return Err(Error::SharedOverQuota {
                policy: policy.name_any(),
                node: String::new(),
                members: members.iter().map(ResourceExt::name_any).collect(),
                direction,
                family,
                used,
                limit: union.quota.limit,
            });
        }
        let (id, vpc) = match found {
            Some(g) => (g.id.clone(), g.vpc_id.clone()),
            None => shared_group(policy, ctx, k, &instances).await?,
        };
        (id, vpc, current, union)
    } else if owned {
        match known_owned {
            Some((id, vpc)) => {
                let current = ctx.ec2.describe_rules(&id).await?;
                // No rule at all may mean the group is gone: check once.
                let gone = current.is_empty()
                    && match ctx.ec2.describe_groups(std::slice::from_ref(&id)).await {
                        Ok(found) => found.is_empty(),
                        Err(e) if matches!(e.kind, ErrorKind::NotFound { .. }) => true,
                        Err(e) => return Err(e.into()),
                    };
                if gone {
                    let (id, vpc) = owned_group(policy, ctx, &instances).await?;
                    let current = ctx.ec2.describe_rules(&id).await?;
                    (id, vpc, current, compiled.cloud.applied())
                } else {
                    (id, vpc, current, compiled.cloud.applied())
                }
            }
            None => {
                let (id, vpc) = owned_group(policy, ctx, &instances).await?;
                let current = ctx.ec2.describe_rules(&id).await?;
                (id, vpc, current, compiled.cloud.applied())
            }
        }
    } else {
        let id = spec.id.clone().unwrap_or_default();
        let verified = previous.as_ref().is_some_and(|g| g.id == id && !g.owned);
        let vpc = if verified {
            previous.as_ref().and_then(|g| g.vpc_id.clone())
        } else {
            let found = ctx.ec2.describe_groups(std::slice::from_ref(&id)).await?;
            let Some(g) = found.into_iter().next() else {
                return Err(CloudError::new(
                    "DescribeSecurityGroups",
                    ErrorKind::NotFound {
                        what: "InvalidGroup.NotFound".into(),
                    },
                    format!(
                        "the Security Group {id} named in spec.securityGroup.id does not exist"
                    ),
                )
                .into());
            };
            g.vpc_id
        };
        let current = ctx.ec2.describe_rules(&id).await?;
        (id, vpc, current, compiled.cloud.applied())
    };
    let ownership = if owned {
        GroupOwnership::Created
    } else {
        GroupOwnership::Adopted
    };

    // Rules.
    let is_shared = class.is_some();
    let diff = diff_security_group(&plan, &current, ownership);
    let drift_repaired = drift_possible && !diff.is_empty();
    if !diff.is_empty() {
        let summary = summarize(&diff);
        if drift_possible {
            ctx.metrics.drift_corrections.inc();
            ctx.publish(
                policy,
                true,
                "DriftCorrected",
                "Resync",
                format!("Security Group {group_id} changed out of band; repairing: {summary}"),
            )
            .await;
        }
        apply_diff(policy, ctx, &group_id, &diff, &current).await?;
        ctx.publish(
            policy,
            false,
            "SecurityGroupUpdated",
            "ModifySecurityGroupRules",
            format!("Security Group {group_id}: {summary}"),
        )
        .await;
    }
    let after = diff.apply_to(&current);
    // In a shared group, the policy's rules are those holding a
    // permission it plans (whichever member's description they carry).
    let own_plan = compiled.cloud.applied();
    let count = |direction: Direction| -> i32 {
        let n = after
            .iter()
            .filter(|r| {
                r.direction == direction
                    && if is_shared {
                        own_plan
                            .permissions(direction)
                            .is_some_and(|ps| ps.iter().any(|p| p.permission == r.permission))
                    } else {
                        owns_rule(&compiled.cloud.policy, ownership, r.description.as_deref())
                    }
            })
            .count();
        i32::try_from(n).unwrap_or(i32::MAX)
    };

    // Attachments: on every selected instance's primary interface; off
    // every other interface that carries it where Palisade put it (any, for
    // a group it created; for an adopted group, those tagged when it was
    // attached there). One read of the interfaces carrying the group, then
    // the changes, concurrently (each one call with the interface's whole
    // new group list; the client paces them by its throttle bucket).
    let uid = policy.uid().unwrap_or_default();
    let tag = tags::attached(&group_id, &uid);
    let carrying = ctx.ec2.enis_in_group(&group_id).await?;
    // Moving into a shared group: the members' own groups leave each
    // interface in the same call that puts the shared group there.
    let replaced: Vec<String> = match &class {
        Some((_, members, _)) => own_groups(policy, ctx, members, &group_id).await?,
        None => Vec::new(),
    };
    let mut changes: Vec<(String, String, EniChange)> = Vec::new();
    for instance in &instances {
        let Some(eni) = &instance.primary_eni else {
            continue;
        };
        if selected.contains(&instance.id)
            && (!instance.eni_groups.contains(&group_id)
                || instance.eni_groups.iter().any(|g| replaced.contains(g)))
        {
            changes.push((instance.id.clone(), eni.clone(), EniChange::Attach));
        }
    }
    for eni in &carrying {
        let wanted_here = eni
            .instance_id
            .as_ref()
            .is_some_and(|i| selected.contains(i))
            && instances
                .iter()
                .any(|i| i.primary_eni.as_deref() == Some(eni.id.as_str()));
        if !wanted_here && (owned || eni.tags.contains_key(&tag)) {
            changes.push((
                eni.instance_id.clone().unwrap_or_default(),
                eni.id.clone(),
                EniChange::Detach,
            ));
        }
    }
    // Each interface the group joins takes, in the same call, the groups
    // of the other policies selecting its node that it lacks: one call per
    // new interface, not one per policy.
    let attaching: Vec<&str> = changes
        .iter()
        .filter(|(_, _, c)| *c == EniChange::Attach)
        .map(|(i, _, _)| i.as_str())
        .collect();
    let mut exclude = replaced.clone();
    exclude.push(group_id.clone());
    let companions = if owned {
        companions(ctx, policy, facts, &attaching, &exclude).await
    } else {
        HashMap::new()
    };
    // In batches of at most 200 interfaces: their locks, one fresh read
    // of their groups, then their changes at once.
    let mut results = Vec::with_capacity(changes.len());
    for batch in changes.chunks(MAX_FILTER_VALUES) {
        let enis: Vec<&str> = batch.iter().map(|(_, eni, _)| eni.as_str()).collect();
        let held = ctx.lock_interfaces(&enis).await?;
        let held = &held;
        results.extend(
            futures::future::join_all(batch.iter().map(|(instance, eni, change)| {
                let group_id = &group_id;
                let tag = &tag;
                let replaced = &replaced;
                let along: &[String] = match change {
                    EniChange::Attach => companions.get(instance).map_or(&[], Vec::as_slice),
                    EniChange::Detach => &[],
                };
                async move {
                    let before = held.of(eni)?;
                    let done = set_membership(ctx, eni, before, group_id, *change, replaced, along)
                        .await?;
                    if !owned && done {
                        match change {
                            EniChange::Attach => {
                                ctx.ec2.tag_eni(eni, tag, &policy.name_any()).await?
                            }
                            EniChange::Detach => ctx.ec2.untag_eni(eni, tag).await?,
                        }
                    }
                    Ok::<_, Error>((instance, eni, *change, done, along))
                }
            }))
            .await,
        );
    }
    let mut kept_on = 0usize;
    let mut announced: BTreeMap<EniChange, Vec<String>> = BTreeMap::new();
    for result in results {
        let (instance, eni, change, done, along) = result?;
        if !done {
            // The last group of an interface stays where it is.
            kept_on += 1;
            continue;
        }
        if let Some(known) = lock(&ctx.instances).get_mut(instance.as_str()) {
            match change {
                EniChange::Attach => {
                    known
                        .eni_groups
                        .retain(|g| !replaced.contains(g) && g != &group_id && !along.contains(g));
                    known.eni_groups.push(group_id.clone());
                    known.eni_groups.extend(along.iter().cloned());
                }
                EniChange::Detach => known.eni_groups.retain(|g| g != &group_id),
            }
        }
        let along = if along.is_empty() {
            String::new()
        } else {
            format!(
                " (with {}, the group(s) of other policies selecting the node, in the same call)",
                along.join(", ")
            )
        };
        announced
            .entry(change)
            .or_default()
            .push(format!("{eni} of instance {instance}{along}"));
    }
    // One Event per kind of change and reconcile, naming a bounded sample:
    // one per interface was about two Event writes per node added.
    for (change, interfaces) in announced {
        let (reason, what, word) = match change {
            EniChange::Attach => ("Attached", "attached", "to"),
            EniChange::Detach => ("Detached", "detached", "from"),
        };
        ctx.publish(
            policy,
            false,
            reason,
            "ModifyNetworkInterfaceAttribute",
            format!(
                "{what} {group_id} {word} {}",
                sample_list(&interfaces, EVENT_SAMPLE)
            ),
        )
        .await;
    }
    let mut attached: Vec<String> = instances
        .iter()
        .filter(|i| i.primary_eni.is_some() && selected.contains(&i.id))
        .map(|i| i.id.clone())
        .collect();
    attached.sort();
    if kept_on > 0 {
        tracing::warn!(policy = %policy.name_any(), group = %group_id, interfaces = kept_on, "the group stays on interfaces it is the last group of");
    }
    // The members' own groups, now on no selected interface: gone.
    for old in &replaced {
        retire_group(ctx, policy, old).await?;
    }
    if let Some((_, members, _)) = &class {
        let behind: Vec<FirewallPolicy> = members
            .iter()
            .filter(|m| m.uid() != policy.uid())
            .filter(|m| {
                m.status
                    .as_ref()
                    .and_then(|s| s.security_group.as_ref())
                    .is_none_or(|g| g.id != group_id)
            })
            .cloned()
            .collect();
        shared::wake(ctx, &behind);
    }

    ctx.groups.put(&group_id, "", owned, after.clone());
    let effective = if analysed.is_empty() {
        Effective::NotAttached
    } else {
        // In a shared group, only the rules carrying this policy's marker
        // are its own; the other members' widen like any other group would.
        let own = if is_shared {
            GroupOwnership::Adopted
        } else {
            ownership
        };
        effective_access(
            ctx,
            policy,
            compiled,
            facts,
            (&group_id, &after, own),
            &instances,
            &analysed,
        )
        .await
    };

    let shares = vec![(group_id.clone(), attached.len())];
    Ok(CloudReport {
        group: Some(group_status(
            group_id,
            vpc_id,
            owned,
            (count(Direction::Ingress), count(Direction::Egress)),
            attached,
            shares,
        )),
        drift_repaired,
        effective,
        shared: is_shared,
    })
}

/// **Composed sync** ([`compose::sync`]): the policy's rules are in the
/// group of each class of the nodes it selects; its status names the group
/// on most of them, with the rules of its own that group holds.
async fn sync_composed<E: Ec2>(
    policy: &FirewallPolicy,
    ctx: &Context<E>,
    compiled: &CompiledPolicy,
    facts: &Facts,
    selected: &[String],
    drift_possible: bool,
) -> Result<CloudReport, Error> {
    let plan = compiled.cloud.applied();
    let placed = compose::sync(ctx, policy, &plan, facts, selected, drift_possible).await?;
    let Some(main) = placed.main else {
        return Ok(CloudReport {
            group: None,
            drift_repaired: placed.repaired,
            effective: Effective::NotAttached,
            shared: false,
        });
    };
    let count = |direction: Direction| -> i32 {
        let n = main
            .rules
            .iter()
            .filter(|r| {
                r.direction == direction
                    && plan
                        .permissions(direction)
                        .is_some_and(|ps| ps.iter().any(|p| p.permission == r.permission))
            })
            .count();
        i32::try_from(n).unwrap_or(i32::MAX)
    };
    let mut attached: Vec<String> = placed
        .instances
        .iter()
        .filter(|i| i.primary_eni.is_some() && selected.contains(&i.id))
        .map(|i| i.id.clone())
        .collect();
    attached.sort();
    ctx.groups.put(&main.id, "", true, main.rules.clone());
    let own = if main.shared {
        GroupOwnership::Adopted
    } else {
        GroupOwnership::Created
    };
    let effective = effective_access(
        ctx,
        policy,
        compiled,
        facts,
        (&main.id, &main.rules, own),
        &placed.instances,
        selected,
    )
    .await;
    tracing::debug!(policy = %policy.name_any(), groups = placed.groups.len(), main = %main.id, "composed sync");
    Ok(CloudReport {
        group: Some(group_status(
            main.id.clone(),
            main.vpc.clone(),
            true,
            (count(Direction::Ingress), count(Direction::Egress)),
            attached,
            placed.groups,
        )),
        drift_repaired: placed.repaired,
        effective,
        shared: main.shared,
    })
}

/// **No group**: a policy with no cloud-layer rule ([`shared::no_group`])
/// keeps none. A group created for it earlier (when it had cloud rules) is
/// detached from every interface and deleted; it held none of the policy's
/// permissions any more, so no flow the policy allows loses a rule. A
/// shared group it was in is left by the caller, as for any move out.
async fn drop_groups<E: Ec2>(
    policy: &FirewallPolicy,
    ctx: &Context<E>,
) -> Result<CloudReport, Error> {
    for group in ctx.ec2.find_groups(&identity_tags(policy, ctx)).await? {
        if !group.tags.contains_key(tags::SHARED) {
            retire_group(ctx, policy, &group.id).await?;
        }
    }
    Ok(CloudReport {
        group: None,
        drift_repaired: false,
        effective: Effective::NotAttached,
        shared: false,
    })
}

/// The groups of their own that the members of a shared group still have
/// (found by each member's identity tags, for this policy and for every
/// member whose status or this controller's memory names another group
/// than the shared one): they leave the interfaces the shared group joins,
/// and are deleted. Only groups created for a member itself: another
/// class's shared group a member is moving out of stays for that class.
async fn own_groups<E: Ec2>(
    policy: &FirewallPolicy,
    ctx: &Context<E>,
    members: &[FirewallPolicy],
    shared_id: &str,
) -> Result<Vec<String>, Error> {
    let behind: Vec<&FirewallPolicy> = {
        let memory = lock(&ctx.memory);
        members
            .iter()
            .filter(|m| {
                if m.uid() == policy.uid() {
                    return true;
                }
                let remembered = m
                    .uid()
                    .and_then(|u| memory.get(&u))
                    .and_then(|r| r.group.clone());
                let recorded = m.status.as_ref().and_then(|s| s.security_group.clone());
                remembered
                    .into_iter()
                    .chain(recorded)
                    .any(|g| g.owned && g.id != shared_id)
            })
            .collect()
    };
    let mut ids = BTreeSet::new();
    for m in behind {
        for g in ctx.ec2.find_groups(&identity_tags(m, ctx)).await? {
            if !g.tags.contains_key(tags::SHARED) {
                ids.insert(g.id);
            }
        }
    }
    ids.remove(shared_id);
    Ok(ids.into_iter().collect())
}

/// Detaches `group_id` from every interface (other groups kept) and
/// deletes it. A group already gone is success; `DependencyViolation` (an
/// interface AWS still reports, a reference from another group) is
/// retriable.
pub(crate) async fn retire_group<E: Ec2>(
    ctx: &Context<E>,
    policy: &FirewallPolicy,
    group_id: &str,
) -> Result<(), Error> {
    let enis = match ctx.ec2.enis_in_group(group_id).await {
        Ok(e) => e,
        Err(e) if matches!(e.kind, ErrorKind::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let ids: Vec<&str> = enis.iter().map(|e| e.id.as_str()).collect();
    detach(ctx, group_id, &ids).await?;
    ctx.forget_rules(group_id);
    match ctx.ec2.delete_group(group_id).await {
        Ok(()) => {
            ctx.publish(
                policy,
                false,
                "SecurityGroupDeleted",
                "DeleteSecurityGroup",
                format!("deleted Security Group {group_id}"),
            )
            .await;
            Ok(())
        }
        Err(e) if matches!(e.kind, ErrorKind::NotFound { .. }) => Ok(()),
        Err(e) if e.kind == ErrorKind::DependencyViolation => Err(CloudError {
            kind: ErrorKind::Transient,
            ..e
        }
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// The group a policy puts on the interfaces of the nodes it selects, as
/// the groups-per-interface check counts it: `None` when it puts none
/// (Audit, `attachToNodes: false`, being deleted, invalid).
fn slot_of(
    policy: &FirewallPolicy,
    group: Option<&SecurityGroupStatus>,
) -> Option<(crate::policy::ValidPolicy, Slot)> {
    if policy.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let valid = crate::policy::validate(policy).ok()?;
    let spec = target(policy);
    if valid.mode() == PolicyMode::Audit || !spec.attaches() {
        return None;
    }
    let class = shared::composable(policy).then(|| shared::key(policy));
    let slot = match (&spec.id, group) {
        (Some(id), _) => Slot::Group(id.clone()),
        // Composable: every composable policy selecting a node is in the
        // one group of the node's class (see `compose`).
        (None, _) if class.is_some() => Slot::Shared(String::new()),
        (None, Some(g)) if g.owned => Slot::Group(g.id.clone()),
        (None, _) => Slot::Pending(policy.uid().unwrap_or_else(|| policy.name_any())),
    };
    Some((valid, slot))
}

/// Refuses, before any EC2 write, to put the group on an interface that
/// would then carry more groups than the account allows: for each
/// selected node whose interface lacks the group, its foreign groups plus
/// one per group of every policy selecting it (this one included) must
/// fit the quota. Names the nodes that do not (a bounded sample) with
/// their numbers. A node already carrying the group is not judged: the
/// group stays where it is.
pub(super) async fn check_interfaces<E: Ec2>(
    policy: &FirewallPolicy,
    ctx: &Context<E>,
    facts: &Facts,
    instances: &[InstanceInfo],
    selected: &[String],
    group: Option<&SecurityGroupStatus>,
    also_palisade: &BTreeSet<String>,
) -> Result<(), Error> {
    let limit = ctx.config.quota.groups_per_interface;
    let uid = policy.uid().unwrap_or_default();
    let gid = group.map(|g| g.id.clone()).or_else(|| target(policy).id);
    let selected: BTreeSet<&String> = selected.iter().collect();
    let waiting: Vec<&InstanceInfo> = instances
        .iter()
        .filter(|i| selected.contains(&i.id) && i.primary_eni.is_some())
        .filter(|i| gid.as_ref().is_none_or(|g| !i.eni_groups.contains(g)))
        .collect();
    if waiting.is_empty() {
        return Ok(());
    }
    // The policies' initial list in first: at a start, a reconcile may run
    // before the store holds the other policies.
    let all = shared::all_policies(ctx).await;
    let Some((_, own)) = slot_of(policy, group) else {
        return Ok(());
    };
    // Every other policy's group (the newest known: this controller's
    // memory, else the status), and every group Palisade created.
    let remembered: HashMap<String, SecurityGroupStatus> = lock(&ctx.memory)
        .iter()
        .filter_map(|(uid, m)| Some((uid.clone(), m.group.clone()?)))
        .collect();
    let mut palisade: BTreeSet<String> = remembered
        .values()
        .filter(|g| g.owned)
        .map(|g| g.id.clone())
        .chain(also_palisade.iter().cloned())
        .collect();
    let mut others = Vec::new();
    for p in all {
        let puid = p.uid().unwrap_or_default();
        let known = remembered
            .get(&puid)
            .or(p.status.as_ref().and_then(|s| s.security_group.as_ref()));
        if let Some(g) = known.filter(|g| g.owned) {
            palisade.insert(g.id.clone());
        }
        if puid != uid
            && let Some(slot) = slot_of(&p, known)
        {
            others.push(slot);
        }
    }
    let nodes: HashMap<&str, &crate::policy::NodeFacts> = facts
        .nodes
        .iter()
        .filter_map(|n| Some((n.instance_id()?, n)))
        .collect();
    let mut unfit = Vec::new();
    for i in waiting {
        let Some(node) = nodes.get(i.id.as_str()) else {
            continue;
        };
        let mut needed: BTreeSet<Slot> = BTreeSet::from([own.clone()]);
        needed.extend(
            others
                .iter()
                .filter(|(v, _)| v.selects(node))
                .map(|(_, s)| s.clone()),
        );
        let fit = placement::fit(&node.name, &i.eni_groups, &needed, &palisade, limit);
        if !fit.fits() {
            unfit.push(fit);
        }
    }
    if unfit.is_empty() {
        return Ok(());
    }
    unfit.sort_by(|a, b| a.node.cmp(&b.node));
    Err(Error::InterfaceFull {
        policy: policy.name_any(),
        limit,
        count: unfit.len(),
        nodes: placement::describe(&unfit, crate::api::ATTACHED_SAMPLE),
    })
}

/// For each instance in `attaching`, the groups other policies selecting
/// its node put there, in existence now, that are not in `exclude`: the
/// group this controller's last full sync of each such policy left (its
/// memory, never a status a watch may serve late), when it is a group
/// Palisade created for that policy alone (Enforce, attached to nodes, not
/// shared, not composable, not being deleted). Such a group admits only that policy's
/// rules, on nodes it selects; putting it there early makes the policy's
/// own attach a no-op. Adopted groups are left to their policies (they tag
/// the interface), as are shared groups (their class may be moving).
async fn companions<E: Ec2>(
    ctx: &Context<E>,
    policy: &FirewallPolicy,
    facts: &Facts,
    attaching: &[&str],
    exclude: &[String],
) -> HashMap<String, Vec<String>> {
    let mut out = HashMap::new();
    if attaching.is_empty() {
        return out;
    }
    let all = shared::all_policies(ctx).await;
    let groups: HashMap<String, String> = lock(&ctx.memory)
        .iter()
        .filter(|(_, m)| !m.shared)
        .filter_map(|(uid, m)| {
            let g = m.group.as_ref().filter(|g| g.owned)?;
            Some((uid.clone(), g.id.clone()))
        })
        .collect();
    let others: Vec<(crate::policy::ValidPolicy, &String)> = all
        .iter()
        .filter(|p| p.uid() != policy.uid() && p.metadata.deletion_timestamp.is_none())
        // A composable policy's group depends on the node's class
        // (`compose`): its own sync places it.
        .filter(|p| !shared::composable(p))
        .filter(|p| {
            let spec = target(p);
            spec.is_owned() && spec.attaches()
        })
        .filter_map(|p| {
            let id = groups.get(&p.uid()?)?;
            let valid = crate::policy::validate(p).ok()?;
            (valid.mode() == PolicyMode::Enforce && !exclude.contains(id)).then_some((valid, id))
        })
        .collect();
    if others.is_empty() {
        return out;
    }
    let nodes: HashMap<&str, &crate::policy::NodeFacts> = facts
        .nodes
        .iter()
        .filter_map(|n| Some((n.instance_id()?, n)))
        .collect();
    for instance in attaching {
        let Some(node) = nodes.get(instance) else {
            continue;
        };
        let mut ids: Vec<String> = others
            .iter()
            .filter(|(v, _)| v.selects(node))
            .map(|(_, id)| (*id).clone())
            .collect();
        ids.sort();
        ids.dedup();
        if !ids.is_empty() {
            out.insert((*instance).to_string(), ids);
        }
    }
    out
}

/// A policy's group as its status reports it: the instances it is
/// attached to are counted, and a bounded sample of them named; every
/// group holding its rules (`shares`: each with how many of its selected
/// nodes carry it) is counted, and the [`crate::api::GROUPS_SAMPLE`] on
/// most nodes are named (`id` first).
fn group_status(
    id: String,
    vpc_id: Option<String>,
    owned: bool,
    (ingress_rules, egress_rules): (i32, i32),
    attached: Vec<String>,
    shares: Vec<(String, usize)>,
) -> SecurityGroupStatus {
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let mut by_group: BTreeMap<String, usize> = BTreeMap::new();
    for (g, n) in shares {
        *by_group.entry(g).or_default() += n;
    }
    let mut shares: Vec<(String, usize)> = by_group.into_iter().collect();
    shares.sort_by_key(|(g, n)| (*g != id, std::cmp::Reverse(*n), g.clone()));
    SecurityGroupStatus {
        group_count: count(shares.len()),
        groups: shares
            .into_iter()
            .take(crate::api::GROUPS_SAMPLE)
            .map(|(id, nodes)| GroupShare {
                id,
                nodes: count(nodes),
            })
            .collect(),
        id,
        vpc_id,
        owned,
        ingress_rules,
        egress_rules,
        attached: count(attached.len()),
        attached_sample: attached
            .into_iter()
            .take(crate::api::ATTACHED_SAMPLE)
            .collect(),
    }
}

/// What the groups on the selected nodes' interfaces, together with the
/// policy's own group (`own`: its id, rules after this sync and how the
/// policy holds it), admit beyond the policy's intent.
async fn effective_access<E: Ec2>(
    ctx: &Context<E>,
    policy: &FirewallPolicy,
    compiled: &CompiledPolicy,
    facts: &Facts,
    own: (&str, &[CurrentSgRule], GroupOwnership),
    instances: &[InstanceInfo],
    selected: &[String],
) -> Effective {
    let (id, rules, ownership) = own;
    match super::effective::attached_groups(
        ctx.ec2.as_ref(),
        &ctx.groups,
        ctx.fresh_for(),
        &ctx.config.cluster_name,
        (id, rules),
        instances,
        selected,
    )
    .await
    {
        Ok(groups) => Effective::Analysed(widenings(
            &compiled.cloud.policy,
            compiled.cloud.mode,
            &Intent::of(&compiled.policy, facts, Layer::Cloud),
            &Intent::of(&compiled.policy, facts, Layer::Node),
            Some((id, ownership)),
            &groups,
        )),
        Err(e) => {
            tracing::warn!(policy = %policy.name_any(), error = %e, "reading the other groups on the nodes' interfaces failed");
            Effective::Unknown(e.to_string())
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum EniChange {
    Attach,
    Detach,
}

/// Detaches `group` from interfaces `enis` (other groups kept), in
/// batches of at most 200 under their locks on one fresh read each;
/// returns those it left (not an interface gone since, nor one it is the
/// last group of).
async fn detach<E: Ec2>(
    ctx: &Context<E>,
    group: &str,
    enis: &[&str],
) -> Result<Vec<String>, Error> {
    let mut left = Vec::new();
    for batch in enis.chunks(MAX_FILTER_VALUES) {
        let held = ctx.lock_interfaces(batch).await?;
        for eni in batch {
            if let Ok(before) = held.of(eni)
                && set_membership(ctx, eni, before, group, EniChange::Detach, &[], &[]).await?
            {
                left.push((*eni).to_string());
            }
        }
    }
    Ok(left)
}

/// Adds or removes `group` in an ENI's groups (`before`), keeping the
/// others.
///
/// Several policies may select one node: the caller holds the ENI's lock
/// and read `before` under it ([`Context::lock_interfaces`]), so
/// concurrent reconciles never drop each other's group. Returns false
/// when a detach would leave the ENI without any group (AWS requires
/// one): the group then stays.
///
/// An attach also drops `replacing` and adds `along` (the groups of other
/// policies selecting the node, see [`companions`]) in the same call. Should
/// one of `along` be gone by then (its policy moved on), the attach is made
/// again without them: they are that policy's to place.
async fn set_membership<E: Ec2>(
    ctx: &Context<E>,
    eni: &str,
    before: &[String],
    group: &str,
    change: EniChange,
    replacing: &[String],
    along: &[String],
) -> Result<bool, Error> {
    let mut groups = before.to_vec();
    match change {
        EniChange::Attach => {
            // The groups it replaces go in the same call.
            groups.retain(|g| !replacing.contains(g));
            if !groups.iter().any(|g| g == group) {
                groups.push(group.to_string());
            }
            let alone = groups.clone();
            for g in along {
                if !groups.contains(g) && !replacing.contains(g) {
                    groups.push(g.clone());
                }
            }
            if groups != before && groups != alone {
                match ctx.ec2.set_eni_groups(eni, &groups).await {
                    Ok(()) => return Ok(true),
                    Err(e) if matches!(e.kind, ErrorKind::NotFound { .. }) => {
                        tracing::debug!(eni, error = %e, "a companion group is gone; attaching alone");
                        groups = alone;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        EniChange::Detach => {
            groups.retain(|g| g != group);
            if groups.is_empty() {
                tracing::warn!(eni, group, "not detaching the last group of an ENI");
                return Ok(false);
            }
        }
    }
    if groups != before {
        ctx.ec2.set_eni_groups(eni, &groups).await?;
    }
    Ok(true)
}

/// Splits the permissions to authorize in one direction into those that
/// fit the quota next to every rule the group holds now, and the rest.
///
/// Authorize-before-revoke needs room for old and new rules at once. When
/// the quota does not leave it, the rest is authorized after the revoke:
/// traffic allowed before and after the change is never dropped (those
/// rules stay throughout); only permissions that are new wait for the
/// room the revoke makes. The compiler guarantees the final state fits.
pub(crate) fn split_for_quota(
    authorize: &[PlannedPermission],
    current: &[CurrentSgRule],
    direction: Direction,
    limit: u32,
) -> (Vec<PlannedPermission>, Vec<PlannedPermission>) {
    fn families(peer: &SgPeer) -> (u32, u32) {
        match peer {
            SgPeer::Ipv4(_) => (1, 0),
            SgPeer::Ipv6(_) => (0, 1),
            _ => (1, 1),
        }
    }
    let (mut v4, mut v6) = current
        .iter()
        .filter(|r| r.direction == direction)
        .map(|r| families(&r.permission.peer))
        .fold((0u32, 0u32), |(a, b), (x, y)| (a + x, b + y));
    let mut now = Vec::new();
    let mut later = Vec::new();
    for p in authorize {
        let (x, y) = families(&p.permission.peer);
        if v4 + x <= limit && v6 + y <= limit {
            v4 += x;
            v6 += y;
            now.push(p.clone());
        } else {
            later.push(p.clone());
        }
    }
    (now, later)
}

/// Applies a diff in the documented order: authorize (one call per
/// direction), update descriptions (one call), revoke (one call per
/// direction) — plus, only when the quota leaves no room for old and new
/// rules side by side, a second authorize after the revoke
/// ([`split_for_quota`]).
pub(crate) async fn apply_diff<E: Ec2>(
    policy: &FirewallPolicy,
    ctx: &Context<E>,
    group_id: &str,
    diff: &SgDiff,
    current: &[CurrentSgRule],
) -> Result<(), Error> {
    ctx.forget_rules(group_id);
    let name = policy.name_any();
    let mut deferred = Vec::new();
    for direction in DIRECTIONS {
        let d = diff.direction(direction);
        let (now, later) = split_for_quota(
            &d.authorize,
            current,
            direction,
            ctx.config.quota.rules_per_direction,
        );
        if !now.is_empty() {
            ctx.ec2.authorize(group_id, direction, &now, &name).await?;
        }
        if !later.is_empty() {
            deferred.push((direction, later));
        }
    }
    let updates: Vec<(CurrentSgRule, String)> = DIRECTIONS
        .iter()
        .flat_map(|d| diff.direction(*d).update_descriptions.iter())
        .filter_map(|(id, desc)| {
            current
                .iter()
                .find(|r| &r.rule_id == id)
                .map(|r| (r.clone(), desc.clone()))
        })
        .collect();
    if !updates.is_empty() {
        ctx.ec2.update_descriptions(group_id, &updates).await?;
    }
    for direction in DIRECTIONS {
        let d = diff.direction(direction);
        if !d.revoke.is_empty() {
            ctx.ec2.revoke(group_id, direction, &d.revoke).await?;
        }
    }
    for (direction, later) in deferred {
        ctx.ec2
            .authorize(group_id, direction, &later, &name)
            .await?;
    }
    Ok(())
}

/// **Cleanup**: removes what the policy put in AWS, then waits for the
/// agents.
///
/// Contract:
/// - owned group, `deletionPolicy: Delete`: every group carrying this
///   policy's identity tags is detached from every ENI (other groups kept)
///   and deleted; `DependencyViolation` is returned as a retriable error
///   (backoff); a group already gone is success;
/// - owned group, `Retain`: nothing in AWS changes;
/// - adopted group: only rules carrying the policy's marker are revoked,
///   and the group is detached from the instances the policy attached;
/// - the finalizer goes (`Ok`) only when no FirewallNode lists the policy.
///
/// Idempotent, and copes with Apply never having run (nothing found,
/// nothing done).
pub async fn cleanup<E: Ec2>(
    policy: Arc<FirewallPolicy>,
    ctx: Arc<Context<E>>,
) -> Result<Action, Error> {
    undo_cloud(&policy, &ctx).await?;
    let waiting = status::nodes_still_enforcing(&policy, &ctx.reports().await?);
    if !waiting.is_empty() {
        return Err(Error::WaitingForAgents { nodes: waiting });
    }
    if let Some(uid) = policy.uid() {
        lock(&ctx.memory).remove(&uid);
        ctx.set_rules_managed();
    }
    ctx.metrics.forget_policy(&policy.name_any());
    Ok(Action::await_change())
}

/// The EC2 half of [`cleanup`]: everything but waiting for the agents.
pub(crate) async fn undo_cloud<E: Ec2>(
    policy: &FirewallPolicy,
    ctx: &Arc<Context<E>>,
) -> Result<(), Error> {
    let spec = target(policy);
    if spec.is_owned() {
        // A member of a shared group leaves it (the group goes with its
        // last member).
        if shared::composable_spec(policy) {
            if let Some(g) = shared::find(ctx, &shared::key(policy)).await? {
                shared::leave(ctx, policy, &shared::key(policy), &g.id)
                    .await
                    .map_err(compose::raced)?;
            }
            // The groups of several selectors holding its own: their
            // interfaces move to groups planned without it first.
            let facts = Facts {
                nodes: ctx.node_facts().await?,
                quota: ctx.config.quota,
                ..Default::default()
            };
            compose::leave(ctx, policy, &shared::key(policy), &facts).await?;
        }
        if spec.deletion_policy == DeletionPolicy::Delete {
            let groups = ctx.ec2.find_groups(&identity_tags(policy, ctx)).await?;
            for group in groups {
                let enis = ctx.ec2.enis_in_group(&group.id).await?;
                let ids: Vec<&str> = enis.iter().map(|e| e.id.as_str()).collect();
                detach(ctx, &group.id, &ids).await?;
                match ctx.ec2.delete_group(&group.id).await {
                    Ok(()) => {
                        ctx.publish(
                            policy,
                            false,
                            "SecurityGroupDeleted",
                            "DeleteSecurityGroup",
                            format!("deleted Security Group {}", group.id),
                        )
                        .await;
                    }
                    Err(e) if matches!(e.kind, ErrorKind::NotFound { .. }) => {}
                    Err(e) if e.kind == ErrorKind::DependencyViolation => {
                        return Err(CloudError {
                            kind: ErrorKind::Transient,
                            ..e
                        }
                        .into());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    } else if let Some(id) = spec.id.clone() {
        match ctx.ec2.describe_rules(&id).await {
            Ok(rules) => {
                let mine = marker(&policy.name_any());
                for direction in DIRECTIONS {
                    let ids: Vec<String> = rules
                        .iter()
                        .filter(|r| {
                            r.direction == direction
                                && r.description
                                    .as_deref()
                                    .is_some_and(|d| d.starts_with(&mine))
                        })
                        .map(|r| r.rule_id.clone())
                        .collect();
                    if !ids.is_empty() {
                        ctx.ec2.revoke(&id, direction, &ids).await?;
                        ctx.publish(
                            policy,
                            false,
                            "RulesRevoked",
                            "RevokeSecurityGroupRules",
                            format!("revoked {} {direction} rule(s) of {id}", ids.len()),
                        )
                        .await;
                    }
                }
            }
            Err(e) if matches!(e.kind, ErrorKind::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        // Off the interfaces this policy put it on (tagged then), and
        // nowhere else.
        let tag = tags::attached(&id, &policy.uid().unwrap_or_default());
        let enis = ctx.ec2.enis_in_group(&id).await?;
        let tagged: Vec<&str> = enis
            .iter()
            .filter(|e| e.tags.contains_key(&tag))
            .map(|e| e.id.as_str())
            .collect();
        for eni in detach(ctx, &id, &tagged).await? {
            ctx.ec2.untag_eni(&eni, &tag).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policy::{SgPermission, SgProtocol};

    #[test]
    fn interface_events_name_a_bounded_sample() {
        let items: Vec<String> = (0..8).map(|i| format!("eni-{i}")).collect();
        assert_eq!(sample_list(&items[..1], 5), "eni-0");
        assert_eq!(sample_list(&items[..2], 5), "2 interfaces: eni-0, eni-1");
        assert_eq!(
            sample_list(&items, 5),
            "8 interfaces: eni-0, eni-1, eni-2, eni-3, eni-4 and 3 more"
        );
    }

    #[test]
    fn a_resync_that_finds_the_group_as_planned_keeps_the_sync_record() {
        let first = cloud_sync_record(None, 1, "h1".into(), false);
        assert_eq!((first.generation, first.drift_repairs), (1, 0));
        // Same generation and inputs, nothing repaired (a resync, or a
        // restarted controller): the very same record, so no status write.
        assert_eq!(
            cloud_sync_record(Some(&first), 1, "h1".into(), false),
            first
        );
        // Drift repaired: counted.
        let repaired = cloud_sync_record(Some(&first), 1, "h1".into(), true);
        assert_eq!(repaired.drift_repairs, 1);
        // New inputs or generation: a new record, the count kept.
        let moved = cloud_sync_record(Some(&repaired), 1, "h2".into(), false);
        assert_eq!((moved.inputs.as_str(), moved.drift_repairs), ("h2", 1));
        let edited = cloud_sync_record(Some(&moved), 2, "h2".into(), false);
        assert_eq!(edited.generation, 2);
    }

    fn perm(port: i32, v6: bool) -> SgPermission {
        SgPermission {
            protocol: SgProtocol::Tcp,
            from_port: port,
            to_port: port,
            peer: if v6 {
                SgPeer::Ipv6("2001:db8::/32".parse().unwrap())
            } else {
                SgPeer::Ipv4("10.0.0.0/8".parse().unwrap())
            },
        }
    }

    #[test]
    fn authorizations_wait_for_room_only_when_the_quota_is_short() {
        let current: Vec<CurrentSgRule> = (0..50)
            .map(|i| CurrentSgRule {
                rule_id: format!("sgr-{i}"),
                direction: Direction::Ingress,
                permission: perm(i, false),
                description: None,
            })
            .collect();
        let new: Vec<PlannedPermission> = (100..150)
            .map(|i| PlannedPermission {
                permission: perm(i, i % 2 == 0),
                description: "d".into(),
                rules: vec![],
            })
            .collect();
        let (now, later) = split_for_quota(&new, &current, Direction::Ingress, 200);
        assert_eq!((now.len(), later.len()), (50, 0));
        let (now, later) = split_for_quota(&new, &current, Direction::Ingress, 60);
        // 10 IPv4 fit next to the 50 held; every IPv6 fits (none held).
        assert_eq!(now.len(), 25 + 10);
        assert_eq!(later.len(), 15);
        let (now, _) = split_for_quota(&new, &current, Direction::Egress, 60);
        assert_eq!(now.len(), 50);
    }
}
