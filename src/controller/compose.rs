//! Composed groups: every node carries one Palisade group for all the
//! composable policies that select it, whatever their selectors.
//!
//! AWS allows 5 groups per network interface by default. One group per
//! selector caps a node at four or five selectors: an all-nodes policy plus
//! a few label pools, or 20 policies with different label selectors all
//! matching one node, would not fit. Groups on an interface are a union, so
//! one group holding the union of the cloud rules of every composable
//! policy selecting a node admits exactly what their separate groups
//! would.
//!
//! Contract:
//! - **Classes.** A node's *placement class* is the set of selectors (see
//!   [`shared::key`]) of the composable policies selecting it
//!   ([`shared::class_of`]). Its members are every composable policy with
//!   one of those selectors. Nodes of one class carry one group: the
//!   member's own group when the class is one policy alone (as ever), else
//!   the class's shared group, tagged with the class key and one tag per
//!   selector ([`shared::creation_tags`]). A class of one selector keeps
//!   the key it always had, so policies with the same selector share the
//!   group they shared before.
//! - **When.** A composable policy takes this path when a node it selects
//!   is in a class of several selectors, or when a group of several
//!   selectors holding its own exists; otherwise its sync is the plain one
//!   (which is this contract for a class of one selector).
//! - **One writer per group.** Every change to a shared group (rules,
//!   creation, deletion) runs under its class's lock; classes are worked
//!   one after another, never nested.
//! - **No gap.** A class's group is created and filled (the union of its
//!   members' plans, authorize before revoke) before any interface takes
//!   it; an interface then moves to it in one
//!   `ModifyNetworkInterfaceAttribute` with its whole new list: the class's
//!   group in, every other Palisade group of composable policies out
//!   (shared groups, and the own groups of composable policies), foreign
//!   groups and the groups of other policies kept. A flow allowed before
//!   and after is allowed by a member of the new class, whose rules the new
//!   group already holds.
//! - **Nothing left behind.** A sync also visits every interface carrying
//!   a group that holds its selector, and moves the nodes no longer in that
//!   group's class to their class; a shared group no node's class maps to
//!   is deleted once no interface carries it; a member that leaves (deleted,
//!   edited, no longer composable) has the groups of its selector re-planned
//!   without it or deleted ([`leave`]). Creation is idempotent by tags
//!   (found before created, under the class's lock), so a crash or a retry
//!   makes no twin; a crash between steps is finished by the next sync of any
//!   member.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kube::ResourceExt;

use super::shared::{self, Candidate};
use super::{Context, Error, lock};
use super::{apply, classes};
use crate::api::FirewallPolicy;
use crate::cloud::{
    CloudError, Ec2, ErrorKind, GroupInfo, InstanceInfo, MAX_FILTER_VALUES, NewGroup, tags,
};
use crate::policy::{
    CloudPlan, CurrentSgRule, Facts, GroupOwnership, NodeFacts, diff_security_group,
};

/// The group the nodes of one class carry, as this sync left it.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The group.
    pub(crate) id: String,
    /// Its VPC.
    pub(crate) vpc: Option<String>,
    /// A shared group (else a policy's own).
    pub(crate) shared: bool,
    /// Its rules after this sync (empty: another policy's own group, not
    /// read).
    pub(crate) rules: Vec<CurrentSgRule>,
    /// The sync repaired a difference found when nothing planned changed.
    pub(crate) repaired: bool,
}

/// What a composed sync of one policy found and did.
#[derive(Debug, Clone)]
pub(crate) struct Placed {
    /// The group of the class holding most of the policy's nodes (the one
    /// its status names), if it selects any.
    pub(crate) main: Option<Target>,
    /// The groups the policy's rules are in (one per class of its
    /// nodes), each with how many of its selected nodes carry it.
    pub(crate) groups: Vec<(String, usize)>,
    /// Every instance read, for the effective-access analysis.
    pub(crate) instances: Vec<InstanceInfo>,
    /// A difference found in a group when nothing planned changed.
    pub(crate) repaired: bool,
}

/// The nodes of `facts`, by instance id.
fn nodes_by_instance(facts: &Facts) -> HashMap<&str, &NodeFacts> {
    facts
        .nodes
        .iter()
        .filter_map(|n| Some((n.instance_id()?, n)))
        .collect()
}

/// Whether `policy` (composable) needs the composed path: a node it
/// selects is in a class of several selectors, or a group of several
/// selectors holding its selector exists.
pub(crate) async fn needed<E: Ec2>(
    ctx: &Context<E>,
    policy: &FirewallPolicy,
    facts: &Facts,
    selected: &[String],
) -> Result<bool, Error> {
    let all = shared::all_policies(ctx).await;
    let candidates = shared::candidates(&all, Some(policy));
    let table = classes::table(ctx, &facts.nodes, &candidates);
    let nodes = nodes_by_instance(facts);
    let overlapping = selected.iter().any(|i| {
        nodes
            .get(i.as_str())
            .is_some_and(|n| table.class(&n.name).len() >= 2)
    });
    if overlapping {
        return Ok(true);
    }
    Ok(selector_groups(ctx, &shared::key(policy))
        .await?
        .iter()
        .any(|g| shared::class_of_group(g).is_some_and(|c| c.len() >= 2)))
}

/// The shared groups holding selector `selector`: tagged with it, and the
/// group of the one-selector class (made before selector tags).
async fn selector_groups<E: Ec2>(
    ctx: &Context<E>,
    selector: &str,
) -> Result<Vec<GroupInfo>, Error> {
    let mut found = tagged(ctx, selector).await?;
    if let Some(g) = shared::find(ctx, selector).await?
        && !found.iter().any(|f| f.id == g.id)
    {
        found.push(g);
    }
    found.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(found)
}

/// The groups tagged as holding selector `selector` (one read).
async fn tagged<E: Ec2>(ctx: &Context<E>, selector: &str) -> Result<Vec<GroupInfo>, Error> {
    let wanted = BTreeMap::from([
        (tags::CLUSTER.to_string(), ctx.config.cluster_name.clone()),
        (shared::selector_tag(selector), "1".to_string()),
        (tags::MANAGED_BY.to_string(), tags::MANAGER.to_string()),
    ]);
    Ok(ctx.ec2.find_groups(&wanted).await?)
}

/// **Composed sync** of `policy` (composable): every node it selects
/// carries the group of its class, complete, in one call per interface;
/// every interface carrying a group of its selector whose node is in
/// another class now moves to that class's group; groups of its selector
/// (and its own group) that no node needs any more are deleted.
pub(crate) async fn sync<E: Ec2>(
    ctx: &Context<E>,
    policy: &FirewallPolicy,
    own_plan: &CloudPlan,
    facts: &Facts,
    selected: &[String],
    drift_possible: bool,
) -> Result<Placed, Error> {
    let selector = shared::key(policy);
    // The groups holding its selector (the group of its one-selector
    // class is found with the classes' groups, in `place`), and its own.
    let mut tidy = tagged(ctx, &selector).await?;
    for g in ctx
        .ec2
        .find_groups(&apply::identity_tags(policy, ctx))
        .await?
    {
        if !tidy.iter().any(|t| t.id == g.id) {
            tidy.push(g);
        }
    }
    place(
        ctx,
        policy,
        Some(own_plan),
        facts,
        selected,
        &tidy,
        Some(&selector),
        drift_possible,
    )
    .await
    .map_err(raced)
}

/// A group found by its tags or on an interface that is gone at the next
/// call was deleted meanwhile (another member's sync or cleanup retired
/// it; an instance terminated): the sync is retried with fresh reads, not
/// stalled on as a wrong reference would be.
pub(crate) fn raced(e: Error) -> Error {
    match e {
        Error::Cloud(c) if matches!(c.kind, ErrorKind::NotFound { .. }) => {
            Error::Cloud(CloudError {
                kind: ErrorKind::Transient,
                ..c
            })
        }
        e => e,
    }
}

/// `policy` no longer holds selector `selector` in any class (deleted,
/// edited to another selector or out of composability, or without cloud
/// rules): the interfaces carrying a group of that selector move to their
/// class's group (planned without it), groups still some node's class are
/// planned again without it, and the others are deleted once no interface
/// carries them. Its own group is the caller's.
pub(crate) async fn leave<E: Ec2>(
    ctx: &Context<E>,
    policy: &FirewallPolicy,
    selector: &str,
    facts: &Facts,
) -> Result<(), Error> {
    let tidy: Vec<GroupInfo> = selector_groups(ctx, selector)
        .await?
        .into_iter()
        .filter(|g| shared::class_of_group(g).is_some_and(|c| c.len() >= 2))
        .collect();
    if tidy.is_empty() {
        return Ok(());
    }
    place(ctx, policy, None, facts, &[], &tidy, None, false)
        .await
        .map_err(raced)?;
    Ok(())
}

/// Places `selected` (instances) and every interface carrying one of
/// `tidy` (with the group of `selector`'s one-selector class, if any) in
/// their classes (see the module docs); then `tidy` groups no class used
/// are planned again (a class some node still has) or deleted (none, and
/// no interface carries them). `own_plan` is the plan of `policy` when it
/// is a member (else it is leaving).
///
/// Reads, whatever the number of classes: the groups of the selected
/// nodes' classes in one call, the interfaces carrying the groups to tidy
/// in one, the instances, and the tags of the groups on their interfaces
/// in one (per 200 values each); then per class its group's rules, and
/// the interfaces to move in one fresh read per 200.
#[allow(clippy::too_many_arguments)]
async fn place<E: Ec2>(
    ctx: &Context<E>,
    policy: &FirewallPolicy,
    own_plan: Option<&CloudPlan>,
    facts: &Facts,
    selected: &[String],
    tidy: &[GroupInfo],
    selector: Option<&str>,
    drift_possible: bool,
) -> Result<Placed, Error> {
    let all = shared::all_policies(ctx).await;
    // The reconciled copy is the newest: leaving, it is no candidate.
    let candidates = shared::candidates(&all, Some(policy));
    let table = classes::table(ctx, &facts.nodes, &candidates);
    let nodes = nodes_by_instance(facts);
    // The groups of the selected nodes' classes (and of `selector`'s
    // one-selector class), in one read: a class's group found here is
    // not looked up again; one not found is, under the class's lock.
    let mut keys: BTreeSet<String> = selected
        .iter()
        .filter_map(|i| nodes.get(i.as_str()))
        .map(|n| table.class(&n.name))
        .filter(|c| !c.is_empty())
        .map(shared::class_key)
        .collect();
    keys.extend(selector.map(str::to_string));
    let known = shared::find_many(ctx, &keys).await?;
    let mut tidy: Vec<GroupInfo> = tidy.to_vec();
    if let Some(g) = selector.and_then(|s| known.get(s))
        && !tidy.iter().any(|t| t.id == g.id)
    {
        tidy.push(g.clone());
    }
    // The interfaces carrying the groups to tidy.
    let mut wanted: BTreeSet<String> = selected.iter().cloned().collect();
    let tidy_ids: Vec<String> = tidy.iter().map(|g| g.id.clone()).collect();
    for eni in ctx.ec2.enis_in_groups(&tidy_ids).await? {
        wanted.extend(eni.instance_id);
    }
    let wanted: Vec<String> = wanted.into_iter().collect();
    let instances = if wanted.is_empty() {
        Vec::new()
    } else {
        ctx.ec2.describe_instances(&wanted).await?
    };
    {
        let mut known = lock(&ctx.instances);
        for i in &instances {
            known.insert(i.id.clone(), i.clone());
        }
    }
    let mut classes: BTreeMap<BTreeSet<String>, Vec<&InstanceInfo>> = BTreeMap::new();
    for i in instances.iter().filter(|i| i.primary_eni.is_some()) {
        let class = nodes
            .get(i.id.as_str())
            .map(|n| table.class(&n.name).clone())
            .unwrap_or_default();
        classes.entry(class).or_default().push(i);
    }
    // Before any write: every shared class's group can carry its tags,
    // and its union fits the rule quota.
    for (class, members_on) in &classes {
        let node = || {
            members_on
                .first()
                .and_then(|i| nodes.get(i.id.as_str()))
                .map_or_else(String::new, |n| n.name.clone())
        };
        tags_fit(policy, class, node)?;
        let members = shared::class_members(&candidates, class);
        if members.len() < 2 {
            continue;
        }
        let union = shared::plan(ctx, &shared::class_key(class), &members, facts, &[]).await?;
        if let Some((direction, family, used)) = union.over_quota() {
            return Err(Error::SharedOverQuota {
                policy: policy.name_any(),
                node: node(),
                members: members.iter().map(ResourceExt::name_any).collect(),
                direction,
                family,
                used,
                limit: union.quota.limit,
            });
        }
    }
    if own_plan.is_some() {
        // Groups-per-interface, before any write, for the selected nodes
        // whose interface lacks their class's group as it exists now.
        let mut existing: BTreeSet<String> = tidy.iter().map(|g| g.id.clone()).collect();
        let mut waiting = Vec::new();
        for (class, on) in classes.iter().filter(|(c, _)| !c.is_empty()) {
            // Every selected node's class was looked up above.
            let found = match known.get(&shared::class_key(class)) {
                Some(g) => Some(g.id.clone()),
                None => match shared::class_members(&candidates, class).as_slice() {
                    [only] => ctx
                        .ec2
                        .find_groups(&apply::identity_tags(only, ctx))
                        .await?
                        .into_iter()
                        .map(|g| g.id)
                        .min(),
                    _ => None,
                },
            };
            for i in on.iter().filter(|i| selected.contains(&i.id)) {
                if found.as_ref().is_none_or(|g| !i.eni_groups.contains(g)) {
                    waiting.push(i.id.clone());
                }
            }
            existing.extend(found);
        }
        apply::check_interfaces(policy, ctx, facts, &instances, &waiting, None, &existing).await?;
    }

    let uids: BTreeSet<String> = candidates.iter().filter_map(|c| c.policy.uid()).collect();
    let mut kinds: HashMap<String, bool> = HashMap::new();
    for g in tidy.iter().chain(known.values()) {
        kinds.insert(g.id.clone(), true);
    }
    // The other groups on the interfaces, in one read.
    let on_interfaces: BTreeSet<String> = instances
        .iter()
        .flat_map(|i| i.eni_groups.iter().cloned())
        .collect();
    classify(ctx, &on_interfaces, &uids, &mut kinds).await?;
    let mut used: BTreeSet<String> = BTreeSet::new();
    let mut main: Option<(usize, Target)> = None;
    let mut groups: Vec<(String, usize)> = Vec::new();
    let mut repaired = false;
    let mine = policy.uid();
    // Classes whose interfaces changed, and the groups that left them.
    let mut moved: Vec<BTreeSet<String>> = Vec::new();
    let mut removed: BTreeSet<String> = BTreeSet::new();
    for (class, on) in &classes {
        // The class's lock is held from finding its group to the last
        // interface moved onto it: a member leaving concurrently cannot
        // delete the group in between (it finds it on an interface).
        let class_lock = (!class.is_empty()).then(|| ctx.eni_lock(&shared::class_lock_key(class)));
        let _class_held = match &class_lock {
            Some(l) => Some(l.lock().await),
            None => None,
        };
        let target = if class.is_empty() {
            None
        } else {
            let t = ensure(
                ctx,
                policy,
                own_plan,
                class,
                &candidates,
                facts,
                on,
                known.get(&shared::class_key(class)),
                drift_possible,
            )
            .await?;
            repaired |= t.repaired;
            used.insert(t.id.clone());
            Some(t)
        };
        let out = swap(
            ctx,
            policy,
            on,
            target.as_ref().map(|t| t.id.as_str()),
            &uids,
            &mut kinds,
        )
        .await?;
        if !out.is_empty()
            || on.iter().any(|i| {
                target
                    .as_ref()
                    .is_some_and(|t| !i.eni_groups.contains(&t.id))
            })
        {
            moved.push(class.clone());
        }
        removed.extend(out);
        // The policy's own classes: those it selects the nodes of.
        let holds = shared::class_members(&candidates, class)
            .iter()
            .any(|m| m.uid() == mine);
        if let Some(t) = target.filter(|_| holds && own_plan.is_some()) {
            let here = on.iter().filter(|i| selected.contains(&i.id)).count();
            groups.push((t.id.clone(), here));
            if main
                .as_ref()
                .is_none_or(|(n, m)| here > *n || (here == *n && t.id < m.id))
            {
                main = Some((here, t));
            }
        }
    }

    // The groups that left an interface here are tidied too (whoever
    // moved the interface), shared ones and this policy's own.
    let extra: Vec<String> = removed
        .iter()
        .filter(|g| !used.contains(*g) && !tidy.iter().any(|t| &t.id == *g))
        .cloned()
        .collect();
    if !extra.is_empty() {
        match ctx.ec2.describe_groups(&extra).await {
            Ok(found) => tidy.extend(found.into_iter().filter(|g| {
                g.tags.contains_key(tags::SHARED)
                    || (own_plan.is_some()
                        && g.tags.get(tags::POLICY_UID) == mine.as_ref()
                        && mine.is_some())
            })),
            Err(e) if matches!(e.kind, ErrorKind::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Their members' statuses follow (their next reconcile is a full
    // sync).
    let mut woken: Vec<FirewallPolicy> = Vec::new();
    for class in moved.iter().cloned().chain(
        tidy.iter()
            .filter(|g| removed.contains(&g.id))
            .filter_map(shared::class_of_group),
    ) {
        for m in shared::class_members(&candidates, &class) {
            if m.uid() != mine && !woken.iter().any(|w| w.uid() == m.uid()) {
                woken.push(m);
            }
        }
    }
    shared::wake(ctx, &woken);
    // The groups to tidy no class took: planned again while some node is
    // in their class, else deleted once they are on no interface.
    for g in tidy.iter().filter(|g| !used.contains(&g.id)) {
        match shared::class_of_group(g) {
            Some(class) => {
                let class_lock = ctx.eni_lock(&shared::class_lock_key(&class));
                let _held = class_lock.lock().await;
                if table.live().any(|c| c == &class)
                    && !shared::class_members(&candidates, &class).is_empty()
                {
                    ensure(
                        ctx,
                        policy,
                        None,
                        &class,
                        &candidates,
                        facts,
                        &[],
                        None,
                        false,
                    )
                    .await?;
                } else {
                    if ctx.ec2.enis_in_group(&g.id).await?.is_empty() {
                        apply::retire_group(ctx, policy, &g.id).await?;
                    }
                }
            }
            // The policy's own group, no longer any class's.
            None => {
                if own_plan.is_some() && ctx.ec2.enis_in_group(&g.id).await?.is_empty() {
                    apply::retire_group(ctx, policy, &g.id).await?;
                }
            }
        }
    }
    Ok(Placed {
        main: main.map(|(_, t)| t),
        groups,
        instances,
        repaired,
    })
}

/// Refuses a class of several selectors whose group would carry more tags
/// than AWS allows on a resource (one per selector, plus the class's
/// own), naming a node of it (`node`) and the numbers: before any write,
/// rather than a `CreateSecurityGroup` refused half-way through a sync.
fn tags_fit(
    policy: &FirewallPolicy,
    class: &BTreeSet<String>,
    node: impl FnOnce() -> String,
) -> Result<(), Error> {
    if class.len() < 2 {
        return Ok(());
    }
    let tags = shared::creation_tags("", class).len();
    if tags <= shared::MAX_TAGS {
        return Ok(());
    }
    Err(Error::ClassTooLarge {
        policy: policy.name_any(),
        node: node(),
        selectors: class.len(),
        tags,
        limit: shared::MAX_TAGS,
    })
}

/// The group of class `class`, complete: found by its tags (or made), and
/// holding the union of its members' plans. The caller holds the class's
/// lock ([`shared::class_lock_key`]). `known` is the class's group as
/// found before the lock was taken: a group exists until its class's
/// lock is held to delete it (so none is looked up again); when none was
/// found, it is looked up under the lock, before any is made (no twin).
/// A class of one policy alone uses that policy's own group: `policy`'s
/// (found or made, and planned with `own_plan`), or another's as it keeps
/// it (a shared group is made for it if it has none yet; it moves there at
/// its next sync).
#[allow(clippy::too_many_arguments)]
async fn ensure<E: Ec2>(
    ctx: &Context<E>,
    policy: &FirewallPolicy,
    own_plan: Option<&CloudPlan>,
    class: &BTreeSet<String>,
    candidates: &[Candidate],
    facts: &Facts,
    on: &[&InstanceInfo],
    known: Option<&GroupInfo>,
    drift_possible: bool,
) -> Result<Target, Error> {
    let key = shared::class_key(class);
    let members = shared::class_members(candidates, class);
    let found = match known {
        Some(g) => Some(g.clone()),
        None => shared::find(ctx, &key).await?,
    };
    let instances: Vec<InstanceInfo> = on.iter().map(|i| (*i).clone()).collect();
    if found.is_none()
        && let [only] = members.as_slice()
    {
        if let Some(plan) = own_plan.filter(|_| only.uid() == policy.uid()) {
            let (id, vpc) = apply::owned_group(policy, ctx, &instances).await?;
            let current = ctx.ec2.describe_rules(&id).await?;
            let (rules, repaired) =
                write_rules(ctx, policy, &id, plan, &current, drift_possible).await?;
            return Ok(Target {
                id,
                vpc,
                shared: false,
                rules,
                repaired,
            });
        }
        if let Some(g) = ctx
            .ec2
            .find_groups(&apply::identity_tags(only, ctx))
            .await?
            .into_iter()
            .min_by(|a, b| a.id.cmp(&b.id))
        {
            return Ok(Target {
                id: g.id,
                vpc: g.vpc_id,
                shared: false,
                rules: Vec::new(),
                repaired: false,
            });
        }
    }
    // The group's rules as this controller last read or wrote them under
    // the class's lock, unless a difference there could be drift; read
    // from EC2 when that would change anything.
    let remembered = found
        .as_ref()
        .filter(|_| !drift_possible)
        .and_then(|g| ctx.remembered_rules(&g.id));
    let mut current = match (&found, &remembered) {
        (Some(_), Some(r)) => r.clone(),
        (Some(g), None) => ctx.ec2.describe_rules(&g.id).await?,
        (None, _) => Vec::new(),
    };
    let mut union = shared::plan(ctx, &key, &members, facts, &current).await?;
    if let Some(g) = found.as_ref().filter(|_| remembered.is_some())
        && !diff_security_group(&union, &current, GroupOwnership::Created).is_empty()
    {
        current = ctx.ec2.describe_rules(&g.id).await?;
        union = shared::plan(ctx, &key, &members, facts, &current).await?;
    }
    let (id, vpc, created) = match found {
        Some(g) => (g.id, g.vpc_id, false),
        None => {
            let vpcs: BTreeSet<String> = on.iter().filter_map(|i| i.vpc_id.clone()).collect();
            let Some(vpc) = vpcs.iter().next().filter(|_| vpcs.len() == 1).cloned() else {
                return Err(Error::NoVpc {
                    policy: policy.name_any(),
                });
            };
            let names: Vec<String> = members.iter().map(ResourceExt::name_any).collect();
            let new = NewGroup {
                name: shared::group_name(&ctx.config.cluster_name, &key),
                description: format!(
                    "Palisade: the FirewallPolicies selecting the same nodes (class {key}, cluster {})",
                    ctx.config.cluster_name
                ),
                vpc_id: vpc,
                tags: shared::creation_tags(&ctx.config.cluster_name, class),
            };
            let (id, vpc) = apply::create_group(policy, ctx, new, "shared Security Group").await?;
            tracing::info!(group = %id, class = %key, members = ?names, "created a shared group");
            (id, vpc, true)
        }
    };
    let current = if created {
        ctx.ec2.describe_rules(&id).await?
    } else {
        current
    };
    let (rules, repaired) = write_rules(ctx, policy, &id, &union, &current, drift_possible).await?;
    ctx.remember_rules(&id, &rules);
    if created || rules != current {
        let others: Vec<FirewallPolicy> = members
            .iter()
            .filter(|m| m.uid() != policy.uid())
            .cloned()
            .collect();
        shared::wake(ctx, &others);
    }
    Ok(Target {
        id,
        vpc,
        shared: true,
        rules,
        repaired,
    })
}

/// Brings group `id` from `current` to `plan` (a group Palisade created);
/// returns its rules after, and whether a difference was drift.
async fn write_rules<E: Ec2>(
    ctx: &Context<E>,
    policy: &FirewallPolicy,
    id: &str,
    plan: &CloudPlan,
    current: &[CurrentSgRule],
    drift_possible: bool,
) -> Result<(Vec<CurrentSgRule>, bool), Error> {
    let diff = diff_security_group(plan, current, GroupOwnership::Created);
    if diff.is_empty() {
        return Ok((current.to_vec(), false));
    }
    let summary = apply::summarize(&diff);
    if drift_possible {
        ctx.metrics.drift_corrections.inc();
        ctx.publish(
            policy,
            true,
            "DriftCorrected",
            "Resync",
            format!("Security Group {id} changed out of band; repairing: {summary}"),
        )
        .await;
    }
    apply::apply_diff(policy, ctx, id, &diff, current).await?;
    ctx.publish(
        policy,
        false,
        "SecurityGroupUpdated",
        "ModifySecurityGroupRules",
        format!("Security Group {id}: {summary}"),
    )
    .await;
    Ok((diff.apply_to(current), drift_possible))
}

/// Who a group on an interface belongs to, from its tags (set when the
/// group is made and never changed by Palisade): kept between syncs, so
/// the groups on the nodes' interfaces are described once, not in every
/// sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owner {
    /// Not a group of this cluster's Palisade.
    Foreign,
    /// A shared group of this cluster.
    Shared,
    /// The own group of the policy with this uid.
    Policy(String),
}

impl Owner {
    fn of(group: &GroupInfo, cluster: &str) -> Self {
        if group.tags.get(tags::CLUSTER).map(String::as_str) != Some(cluster) {
            return Owner::Foreign;
        }
        if group.tags.contains_key(tags::SHARED) {
            return Owner::Shared;
        }
        match group.tags.get(tags::POLICY_UID) {
            Some(uid) => Owner::Policy(uid.clone()),
            None => Owner::Foreign,
        }
    }

    /// A placement group: a shared group, or the own group of a
    /// composable policy (one of `uids`).
    fn places(&self, uids: &BTreeSet<String>) -> bool {
        match self {
            Owner::Foreign => false,
            Owner::Shared => true,
            Owner::Policy(uid) => uids.contains(uid),
        }
    }
}

/// Whether each group of `ids` not in `kinds` yet is a placement group
/// (a shared group of this cluster, or the own group of a composable
/// policy: one of `uids`): from the owners known, the others read in one
/// describe.
async fn classify<E: Ec2>(
    ctx: &Context<E>,
    ids: &BTreeSet<String>,
    uids: &BTreeSet<String>,
    kinds: &mut HashMap<String, bool>,
) -> Result<(), Error> {
    let mut unknown: Vec<String> = Vec::new();
    {
        let owners = lock(&ctx.group_owners);
        let new: Vec<&String> = ids.iter().filter(|g| !kinds.contains_key(*g)).collect();
        for g in new {
            match owners.get(g) {
                Some(o) => {
                    kinds.insert(g.clone(), o.places(uids));
                }
                None => unknown.push(g.clone()),
            }
        }
    }
    if unknown.is_empty() {
        return Ok(());
    }
    let found = match ctx.ec2.describe_groups(&unknown).await {
        Ok(f) => f,
        // A group gone since the interface was read (not ours to move):
        // the others one by one.
        Err(e) if matches!(e.kind, ErrorKind::NotFound { .. }) => {
            let mut found = Vec::new();
            for g in &unknown {
                match ctx.ec2.describe_groups(std::slice::from_ref(g)).await {
                    Ok(f) => found.extend(f),
                    Err(e) if matches!(e.kind, ErrorKind::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            found
        }
        Err(e) => return Err(e.into()),
    };
    for g in &unknown {
        kinds.insert(g.clone(), false);
    }
    let mut owners = lock(&ctx.group_owners);
    for g in found {
        let owner = Owner::of(&g, &ctx.config.cluster_name);
        kinds.insert(g.id.clone(), owner.places(uids));
        owners.insert(g.id, owner);
    }
    Ok(())
}

/// Moves each interface of `on` to `target` in one call with its whole new
/// list: `target` in, every other placement group out, the rest kept (an
/// interface is never left without a group). Under the interfaces' locks,
/// on a fresh read of them (one call per 200, [`Context::lock_interfaces`]).
async fn swap<E: Ec2>(
    ctx: &Context<E>,
    policy: &FirewallPolicy,
    on: &[&InstanceInfo],
    target: Option<&str>,
    uids: &BTreeSet<String>,
    kinds: &mut HashMap<String, bool>,
) -> Result<BTreeSet<String>, Error> {
    let ids: BTreeSet<String> = on
        .iter()
        .flat_map(|i| i.eni_groups.iter().cloned())
        .collect();
    classify(ctx, &ids, uids, kinds).await?;
    if let Some(t) = target {
        kinds.insert(t.to_string(), true);
    }
    let kinds: &HashMap<String, bool> = kinds;
    let placement =
        |g: &String| kinds.get(g).copied().unwrap_or(false) && Some(g.as_str()) != target;
    let pending: Vec<&InstanceInfo> = on
        .iter()
        .copied()
        .filter(|i| {
            target.is_some_and(|t| !i.eni_groups.iter().any(|g| g == t))
                || i.eni_groups.iter().any(placement)
        })
        .collect();
    let mut results = Vec::with_capacity(pending.len());
    for batch in pending.chunks(MAX_FILTER_VALUES) {
        let enis: Vec<&str> = batch
            .iter()
            .filter_map(|i| i.primary_eni.as_deref())
            .collect();
        let held = ctx.lock_interfaces(&enis).await?;
        let held = &held;
        let placement = &placement;
        results.extend(
            futures::future::join_all(batch.iter().map(|i| async move {
                let Some(eni) = i.primary_eni.as_deref() else {
                    return Ok::<_, Error>(None);
                };
                let before = held.of(eni)?.to_vec();
                let mut after: Vec<String> =
                    before.iter().filter(|g| !placement(g)).cloned().collect();
                if let Some(t) = target
                    && !after.iter().any(|g| g == t)
                {
                    after.push(t.to_string());
                }
                if after.is_empty() {
                    tracing::warn!(eni, "not removing the last group of an interface");
                    return Ok(None);
                }
                if after == before {
                    return Ok(None);
                }
                ctx.ec2.set_eni_groups(eni, &after).await?;
                if let Some(known) = lock(&ctx.instances).get_mut(i.id.as_str()) {
                    known.eni_groups = after.clone();
                }
                Ok(Some((i.id.clone(), eni.to_string(), before, after)))
            }))
            .await,
        );
    }
    let mut removed = BTreeSet::new();
    let mut moved: Vec<String> = Vec::new();
    for r in results {
        let Some((instance, eni, before, after)) = r? else {
            continue;
        };
        let out: Vec<&str> = before
            .iter()
            .filter(|g| !after.contains(g))
            .map(String::as_str)
            .collect();
        removed.extend(out.iter().map(|g| (*g).to_string()));
        moved.push(match (target, out.is_empty()) {
            (Some(_), true) => format!("{eni} of instance {instance}"),
            (Some(_), false) => {
                format!(
                    "{eni} of instance {instance} (replacing {})",
                    out.join(", ")
                )
            }
            (None, _) => format!("{eni} of instance {instance} ({})", out.join(", ")),
        });
    }
    // One Event per class and sync, naming a bounded sample.
    if !moved.is_empty() {
        let (reason, note) = match target {
            Some(t) => (
                "Attached",
                format!(
                    "attached {t}, in one call each, to {}",
                    apply::sample_list(&moved, apply::EVENT_SAMPLE)
                ),
            ),
            None => (
                "Detached",
                format!(
                    "detached placement groups from {}",
                    apply::sample_list(&moved, apply::EVENT_SAMPLE)
                ),
            ),
        };
        ctx.publish(
            policy,
            false,
            reason,
            "ModifyNetworkInterfaceAttribute",
            note,
        )
        .await;
    }
    Ok(removed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::controller::shared::MAX_TAGS;

    #[test]
    fn a_class_whose_group_cannot_carry_its_tags_is_refused_naming_a_node() {
        let p = crate::policy::testing::policy("web", Vec::new(), None);
        let class =
            |n: usize| -> BTreeSet<String> { (0..n).map(|i| format!("{i:016x}")).collect() };
        let fixed = shared::creation_tags("c", &class(2)).len() - 2;
        let most = MAX_TAGS - fixed;
        assert_eq!(shared::creation_tags("c", &class(most)).len(), MAX_TAGS);
        assert!(tags_fit(&p, &class(most), || unreachable!()).is_ok());
        assert!(tags_fit(&p, &class(1), || unreachable!()).is_ok());
        let err = tags_fit(&p, &class(most + 1), || "ip-10-0-1-5".to_string()).unwrap_err();
        assert_eq!(err.reason(), crate::api::conditions::reason::QUOTA_EXCEEDED);
        assert!(err.is_permanent());
        assert_eq!(
            err.to_string(),
            format!(
                "node ip-10-0-1-5 is selected by composable policies with {} different nodeSelectors (among them web); their composed Security Group would carry {} tags, over AWS's 50 per resource (at most {most} selectors per node); give some of them a group of their own (spec.securityGroup.name) or share selectors",
                most + 1,
                MAX_TAGS + 1
            )
        );
    }
}
