//! Shared groups: policies that select their nodes with the same
//! `nodeSelector` share one Security Group.
//!
//! AWS allows 5 groups per network interface by default, so one group per
//! policy caps a node at about four policies. Policies whose node selectors
//! are identical always select the same nodes, so one group holding the
//! union of their cloud rules (each permission once) admits exactly what
//! their separate groups would (groups on an interface are a union): a node
//! selected by 20 such policies carries one Palisade group.
//!
//! Policies with *different* selectors over the same nodes are composed the
//! same way, per node: see `compose`, which builds on the classes,
//! plans and tags here (a class of one selector is the class below).
//!
//! Contract:
//! - **Who shares.** A policy is *composable* when Palisade creates its
//!   group with nothing of its own to keep apart: `Enforce`, no
//!   `spec.securityGroup` `id`, `name`, `vpcId` or `tags`, attached to the
//!   nodes, `deletionPolicy: Delete`, and at least one cloud-layer rule
//!   (without one it has no group at all, [`no_group`]). Composable
//!   policies with the same selector form a *class* ([`key`]). A class of two or more members uses
//!   one shared group; a lone policy keeps its own group (nothing changes
//!   for it) unless its class already has a shared group (it stays there
//!   rather than move back and forth).
//! - **One writer per group.** Every change to a shared group (rules,
//!   attachments, deletion) runs under one lock per class.
//! - **Rules.** The group holds the union of the members' plans
//!   ([`crate::policy::union_plan`]); a permission several members plan is
//!   described by the first member by name, so descriptions never flap. A
//!   member whose plan cannot be compiled keeps the rules carrying its
//!   marker. Anything else in the group is drift and is revoked.
//! - **Moving in.** The shared group is made and filled first; each
//!   interface then takes it and drops the members' own groups in one
//!   `ModifyNetworkInterfaceAttribute` call with the whole new list, so a
//!   flow allowed before and after is never dropped; the members' own
//!   groups are then deleted.
//! - **Moving out.** A member that leaves (deleted, or edited out of the
//!   class) first has its new group in place; then the class's group is
//!   planned again without it (its rules revoked), or detached and deleted
//!   when no member is left.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::{Context, Error, lock};
use crate::api::{DeletionPolicy, FirewallPolicy, PolicyMode};
use crate::cloud::{Ec2, ErrorKind, GroupInfo, tags};
use crate::policy::{
    CloudPlan, CurrentSgRule, Direction, Facts, GroupOwnership, PlannedPermission, compile_policy,
    diff_security_group, marker, union_plan,
};

/// Whether `policy` may share its group (see the module docs): a policy
/// with no cloud-layer rule has no group at all ([`no_group`]), so it is no
/// member of any class.
pub(crate) fn composable(policy: &FirewallPolicy) -> bool {
    policy.metadata.deletion_timestamp.is_none()
        && composable_spec(policy)
        && has_cloud_rules(policy)
}

/// Whether the policy has a rule the cloud layer enforces (a rule without
/// `layers`, or naming `Cloud`), in either direction.
pub(crate) fn has_cloud_rules(policy: &FirewallPolicy) -> bool {
    crate::policy::validate(policy).is_ok_and(|v| {
        [Direction::Ingress, Direction::Egress]
            .into_iter()
            .any(|d| v.rules(d).unwrap_or_default().iter().any(|r| r.cloud))
    })
}

/// Whether Palisade creates no group for `policy`: a group it would create
/// only for this policy (nothing of its own to keep: no `id`, `name`,
/// `vpcId` or `tags`, `Enforce`, `deletionPolicy: Delete`) that would hold
/// no permission, since the policy has no cloud-layer rule. Such a group
/// admits nothing: attached, it would only take one of the interface's few
/// group slots; unattached (`attachToNodes: false`), it would serve
/// nothing at all, yet cost a group and its reads at every sync. A
/// direction the policy does not govern is left to the node's other
/// groups, as it is for every policy (the default egress rule a new group
/// is born with is not the policy's).
pub(crate) fn no_group(policy: &FirewallPolicy) -> bool {
    plain_spec(policy) && !has_cloud_rules(policy)
}

/// Whether the spec of `policy` lets it share its group (being deleted or
/// not).
pub(crate) fn composable_spec(policy: &FirewallPolicy) -> bool {
    plain_spec(policy)
        && policy
            .spec
            .security_group
            .clone()
            .unwrap_or_default()
            .attaches()
}

/// Whether the group of `policy` would be Palisade's own with nothing of
/// the policy's to keep apart (see [`no_group`]), attached or not.
fn plain_spec(policy: &FirewallPolicy) -> bool {
    let spec = policy.spec.security_group.clone().unwrap_or_default();
    policy.spec.mode == PolicyMode::Enforce
        && spec.id.is_none()
        && spec.name.is_none()
        && spec.vpc_id.is_none()
        && spec.tags.as_ref().is_none_or(BTreeMap::is_empty)
        && spec.deletion_policy == DeletionPolicy::Delete
        && crate::policy::validate(policy).is_ok()
}

/// The class of a policy: a digest of its node selector as written.
pub(crate) fn key(policy: &FirewallPolicy) -> String {
    let selector = serde_json::to_string(&policy.spec.node_selector).unwrap_or_default();
    crate::policy::short_hash(&["shared-selector", &selector])
}

/// The tags that find the shared group of class `key`.
pub(crate) fn group_tags(cluster: &str, key: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (tags::CLUSTER.to_string(), cluster.to_string()),
        (tags::SHARED.to_string(), key.to_string()),
        (tags::MANAGED_BY.to_string(), tags::MANAGER.to_string()),
    ])
}

/// Most tags AWS allows on one resource (user tags).
pub(crate) const MAX_TAGS: usize = 50;

/// The tags a shared group is created with: [`group_tags`] and one
/// [`selector_tag`] per selector of its class (so at most
/// [`MAX_TAGS`] − 3 selectors per class).
pub(crate) fn creation_tags(
    cluster: &str,
    selectors: &BTreeSet<String>,
) -> BTreeMap<String, String> {
    let mut t = group_tags(cluster, &class_key(selectors));
    for s in selectors {
        t.insert(selector_tag(s), "1".to_string());
    }
    t
}

/// The tag that marks a shared group as holding the policies of selector
/// `selector` (a [`key`]).
pub(crate) fn selector_tag(selector: &str) -> String {
    format!("{}{selector}", tags::SELECTOR_PREFIX)
}

/// The name of the lock every writer of class `key`'s group holds (one
/// writer per shared group).
pub(crate) fn lock_name(key: &str) -> String {
    format!("shared/{key}")
}

/// The lock of class `selectors` (see [`lock_name`]).
pub(crate) fn class_lock_key(selectors: &BTreeSet<String>) -> String {
    lock_name(&class_key(selectors))
}

/// The key of a placement class (the selectors of the composable policies
/// selecting a node): the selector's own key when there is one, as for the
/// groups of policies with the same selector, else a digest of them all.
pub(crate) fn class_key(selectors: &BTreeSet<String>) -> String {
    match selectors.len() {
        1 => selectors.iter().next().cloned().unwrap_or_default(),
        _ => {
            let parts: Vec<&str> = std::iter::once("placement")
                .chain(selectors.iter().map(String::as_str))
                .collect();
            crate::policy::short_hash(&parts)
        }
    }
}

/// The class a shared group was made for, from its tags: its selectors
/// (a group made before selector tags held one selector: its key).
pub(crate) fn class_of_group(group: &GroupInfo) -> Option<BTreeSet<String>> {
    let key = group.tags.get(tags::SHARED)?;
    let selectors: BTreeSet<String> = group
        .tags
        .keys()
        .filter_map(|k| k.strip_prefix(tags::SELECTOR_PREFIX))
        .map(str::to_string)
        .collect();
    Some(if selectors.is_empty() {
        BTreeSet::from([key.clone()])
    } else {
        selectors
    })
}

/// A composable policy as placement reads it.
pub(crate) struct Candidate {
    /// The policy.
    pub(crate) policy: FirewallPolicy,
    /// It, validated (for `selects`).
    pub(crate) valid: crate::policy::ValidPolicy,
    /// Its selector's [`key`].
    pub(crate) selector: String,
}

/// Every composable policy among `all`, with `fresh` (when given) in place
/// of its older copy.
pub(crate) fn candidates(
    all: &[Arc<FirewallPolicy>],
    fresh: Option<&FirewallPolicy>,
) -> Vec<Candidate> {
    let fresh_uid = fresh.and_then(|p| p.uid());
    all.iter()
        .filter(|p| fresh_uid.is_none() || p.uid() != fresh_uid)
        .map(|p| p.as_ref())
        .chain(fresh)
        .filter(|p| composable(p))
        .filter_map(|p| {
            Some(Candidate {
                valid: crate::policy::validate(p).ok()?,
                selector: key(p),
                policy: p.clone(),
            })
        })
        .collect()
}

/// The placement class of `node`: the selectors of the composable
/// policies selecting it (empty: none does). Every candidate evaluated:
/// the reference the controller's [`super::classes::ClassTable`] is
/// tested against.
#[cfg(test)]
pub(crate) fn class_of(
    candidates: &[Candidate],
    node: &crate::policy::NodeFacts,
) -> BTreeSet<String> {
    candidates
        .iter()
        .filter(|c| c.valid.selects(node))
        .map(|c| c.selector.clone())
        .collect()
}

/// The members of class `selectors`: the composable policies with one of
/// its selectors, sorted by name.
pub(crate) fn class_members(
    candidates: &[Candidate],
    selectors: &BTreeSet<String>,
) -> Vec<FirewallPolicy> {
    let mut out: Vec<FirewallPolicy> = candidates
        .iter()
        .filter(|c| selectors.contains(&c.selector))
        .map(|c| c.policy.clone())
        .collect();
    out.sort_by_key(|p| p.name_any());
    out
}

/// Every policy the controller holds (its watch), waiting for the initial
/// list.
pub(crate) async fn all_policies<E: Ec2>(ctx: &Context<E>) -> Vec<Arc<FirewallPolicy>> {
    match ctx.policies.get() {
        Some(store) => {
            let _ = store.wait_until_ready().await;
            store.state()
        }
        None => Vec::new(),
    }
}

/// The composable members of class `key`, sorted by name: the policies
/// held, with `fresh` (when given) in place of its older copy, and without
/// `leaving` (a uid).
pub(crate) fn members(
    all: &[Arc<FirewallPolicy>],
    key_of_class: &str,
    fresh: Option<&FirewallPolicy>,
    leaving: Option<&str>,
) -> Vec<FirewallPolicy> {
    let fresh_uid = fresh.and_then(|p| p.uid());
    let mut out: Vec<FirewallPolicy> = all
        .iter()
        .filter(|p| p.uid() != fresh_uid || fresh_uid.is_none())
        .map(|p| p.as_ref().clone())
        .chain(fresh.cloned())
        .filter(|p| leaving.is_none_or(|l| p.uid().as_deref() != Some(l)))
        .filter(|p| composable(p) && key(p) == key_of_class)
        .collect();
    out.sort_by_key(|p| p.name_any());
    out.dedup_by_key(|p| p.uid());
    out
}

/// The shared group of class `key`, if it exists (the lowest id, should
/// there ever be two).
pub(crate) async fn find<E: Ec2>(ctx: &Context<E>, key: &str) -> Result<Option<GroupInfo>, Error> {
    let found = ctx
        .ec2
        .find_groups(&group_tags(&ctx.config.cluster_name, key))
        .await?;
    Ok(found.into_iter().min_by(|a, b| a.id.cmp(&b.id)))
}

/// The shared groups of classes `keys`, by key (the lowest id of each, as
/// [`find`]), in one read per 200 keys instead of one per class.
pub(crate) async fn find_many<E: Ec2>(
    ctx: &Context<E>,
    keys: &BTreeSet<String>,
) -> Result<HashMap<String, GroupInfo>, Error> {
    let mut fixed = group_tags(&ctx.config.cluster_name, "");
    fixed.remove(tags::SHARED);
    let keys: Vec<String> = keys.iter().cloned().collect();
    let mut out: HashMap<String, GroupInfo> = HashMap::new();
    for g in ctx.ec2.find_groups_any(&fixed, tags::SHARED, &keys).await? {
        let Some(k) = g.tags.get(tags::SHARED).cloned() else {
            continue;
        };
        if out.get(&k).is_none_or(|have| g.id < have.id) {
            out.insert(k, g);
        }
    }
    Ok(out)
}

/// The name of the shared group of class `key`.
pub(crate) fn group_name(cluster: &str, key: &str) -> String {
    format!("palisade-{cluster}-shared-{key}")
        .chars()
        .take(255)
        .collect()
}

/// The plan of a shared group: the union of the members' plans, compiled
/// with `facts` (nodes) and every reference they name resolved (read from
/// EC2 when `facts` lacks it). A member whose plan cannot be compiled
/// keeps the rules of `current` that carry its marker.
pub(crate) async fn plan<E: Ec2>(
    ctx: &Context<E>,
    key: &str,
    members: &[FirewallPolicy],
    facts: &Facts,
    current: &[CurrentSgRule],
) -> Result<CloudPlan, Error> {
    let mut facts = facts.clone();
    let mut missing_sgs = Vec::new();
    let mut missing_pls = Vec::new();
    for m in members {
        let Ok(valid) = crate::policy::validate(m) else {
            continue;
        };
        for direction in [Direction::Ingress, Direction::Egress] {
            for rule in valid.rules(direction).unwrap_or_default() {
                for peer in &rule.peers {
                    match peer {
                        crate::policy::PeerRef::SecurityGroup(id)
                            if !facts.security_groups.contains_key(id) =>
                        {
                            missing_sgs.push(id.clone());
                        }
                        crate::policy::PeerRef::PrefixList(id)
                            if !facts.prefix_lists.contains_key(id) =>
                        {
                            missing_pls.push(id.clone());
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    missing_sgs.sort();
    missing_sgs.dedup();
    missing_pls.sort();
    missing_pls.dedup();
    // A reference that cannot be read leaves its member's rules as they
    // are (below): its own reconcile reports the reference.
    if !missing_sgs.is_empty()
        && let Ok(found) = ctx.ec2.group_members(&missing_sgs).await
    {
        facts.security_groups.extend(found);
    }
    if !missing_pls.is_empty()
        && let Ok(found) = ctx.ec2.prefix_lists(&missing_pls).await
    {
        facts.prefix_lists.extend(found);
    }
    let mut plans = Vec::new();
    let mut kept: BTreeMap<Direction, Vec<PlannedPermission>> = BTreeMap::new();
    for m in members {
        match compile_policy(m, &facts) {
            Ok(c) => plans.push(c.cloud.applied()),
            Err(e) => {
                tracing::warn!(policy = %m.name_any(), error = %e, "a member of a shared group does not compile; its rules there stay as they are");
                let mine = marker(&m.name_any());
                for r in current.iter().filter(|r| {
                    r.description
                        .as_deref()
                        .is_some_and(|d| d.starts_with(&mine))
                }) {
                    kept.entry(r.direction)
                        .or_default()
                        .push(PlannedPermission {
                            permission: r.permission.clone(),
                            description: r.description.clone().unwrap_or_default(),
                            rules: Vec::new(),
                        });
                }
            }
        }
    }
    let name = format!("shared-{key}");
    let kept_plan = CloudPlan {
        policy: name.clone(),
        mode: PolicyMode::Enforce,
        ingress: kept.remove(&Direction::Ingress),
        egress: kept.remove(&Direction::Egress),
        keeps_default_egress: false,
        quota: Default::default(),
        warnings: Vec::new(),
    };
    let mut refs: Vec<&CloudPlan> = plans.iter().collect();
    refs.push(&kept_plan);
    Ok(union_plan(&name, &refs, &facts))
}

/// Re-plans the rules of shared group `group_id` for `members` (those
/// still in the class) and applies the difference. Run under the class's
/// lock.
pub(crate) async fn replan<E: Ec2>(
    ctx: &Context<E>,
    policy: &FirewallPolicy,
    key: &str,
    group_id: &str,
    members: &[FirewallPolicy],
) -> Result<(), Error> {
    let facts = Facts {
        nodes: ctx.node_facts().await?,
        quota: ctx.config.quota,
        ..Default::default()
    };
    let current = match ctx.ec2.describe_rules(group_id).await {
        Ok(c) => c,
        Err(e) if matches!(e.kind, ErrorKind::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let union = plan(ctx, key, members, &facts, &current).await?;
    let diff = diff_security_group(&union, &current, GroupOwnership::Created);
    if !diff.is_empty() {
        super::apply::apply_diff(policy, ctx, group_id, &diff, &current).await?;
    }
    Ok(())
}

/// `policy` leaves class `key`, whose group is `group_id`: the group is
/// planned again for the members left, or detached from every interface
/// and deleted when none is.
pub(crate) async fn leave<E: Ec2>(
    ctx: &Context<E>,
    policy: &FirewallPolicy,
    key: &str,
    group_id: &str,
) -> Result<(), Error> {
    let class_lock = ctx.eni_lock(&lock_name(key));
    let _held = class_lock.lock().await;
    let all = all_policies(ctx).await;
    let uid = policy.uid().unwrap_or_default();
    let left = members(&all, key, None, Some(&uid));
    if left.is_empty() {
        super::apply::retire_group(ctx, policy, group_id).await
    } else {
        replan(ctx, policy, key, group_id, &left).await?;
        wake(ctx, &left);
        Ok(())
    }
}

/// Has the members' next reconcile read their groups back (a full sync),
/// so their statuses follow a change made by another member.
pub(crate) fn wake<E: Ec2>(ctx: &Context<E>, members: &[FirewallPolicy]) {
    let uids: Vec<String> = members.iter().filter_map(|m| m.uid()).collect();
    {
        let mut memory = lock(&ctx.memory);
        for uid in &uids {
            if let Some(m) = memory.get_mut(uid) {
                m.due = None;
            }
        }
    }
    if let Some(tx) = ctx.wake.get() {
        for m in members {
            let _ = tx.unbounded_send(ObjectRef::from_obj(m));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::api::{Protocol, SecurityGroupTarget};
    use crate::policy::NodeFacts;
    use crate::policy::testing::{policy, rule, selector};

    fn store_of(policies: Vec<FirewallPolicy>) -> Vec<Arc<FirewallPolicy>> {
        policies.into_iter().map(Arc::new).collect()
    }

    fn with_uid(mut p: FirewallPolicy, uid: &str) -> FirewallPolicy {
        p.metadata.uid = Some(uid.into());
        p
    }

    #[test]
    fn classes_are_policies_with_one_selector_and_nothing_of_their_own() {
        let r = || vec![rule("ssh", Protocol::Tcp, &[22], &["10.0.0.0/8"])];
        let mut web_a = with_uid(policy("a", r(), None), "1");
        web_a.spec.node_selector = Some(selector(&[("role", "web")]));
        let mut web_b = with_uid(policy("b", r(), None), "2");
        web_b.spec.node_selector = Some(selector(&[("role", "web")]));
        let mut db = with_uid(policy("c", r(), None), "3");
        db.spec.node_selector = Some(selector(&[("role", "db")]));
        let mut named = with_uid(policy("d", r(), None), "4");
        named.spec.node_selector = Some(selector(&[("role", "web")]));
        named.spec.security_group = Some(SecurityGroupTarget {
            name: Some("mine".into()),
            ..Default::default()
        });
        let mut audit = with_uid(policy("e", r(), None), "5");
        audit.spec.node_selector = Some(selector(&[("role", "web")]));
        audit.spec.mode = PolicyMode::Audit;
        assert!(composable(&web_a) && !composable(&named) && !composable(&audit));
        assert_eq!(key(&web_a), key(&web_b));
        assert_ne!(key(&web_a), key(&db));
        let all = store_of(vec![web_a.clone(), web_b.clone(), db.clone(), named, audit]);
        let names = |ms: Vec<FirewallPolicy>| ms.iter().map(|m| m.name_any()).collect::<Vec<_>>();
        assert_eq!(names(members(&all, &key(&web_a), None, None)), ["a", "b"]);
        assert_eq!(names(members(&all, &key(&web_a), None, Some("1"))), ["b"]);
        // A fresher copy replaces the held one.
        let mut moved = web_b.clone();
        moved.spec.node_selector = Some(selector(&[("role", "db")]));
        assert_eq!(
            names(members(&all, &key(&web_a), Some(&moved), None)),
            ["a"]
        );
        assert_eq!(
            names(members(&all, &key(&db), Some(&moved), None)),
            ["b", "c"]
        );
        // Placement: a node labelled web and db (were there one) would be
        // in the class of both selectors; its members are every composable
        // policy with either.
        let cands = candidates(&all, None);
        let node = |labels: &[(&str, &str)]| NodeFacts {
            name: "n".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let web_node = node(&[("role", "web")]);
        assert_eq!(class_of(&cands, &web_node), BTreeSet::from([key(&web_a)]));
        assert_eq!(class_key(&class_of(&cands, &web_node)), key(&web_a));
        let mut everyone = with_uid(policy("f", r(), None), "6");
        everyone.spec.node_selector = None;
        let all = store_of(vec![
            web_a.clone(),
            web_b.clone(),
            db.clone(),
            everyone.clone(),
        ]);
        let cands = candidates(&all, None);
        let class = class_of(&cands, &web_node);
        assert_eq!(class, BTreeSet::from([key(&web_a), key(&everyone)]));
        assert_eq!(names(class_members(&cands, &class)), ["a", "b", "f"]);
        let db_class = class_of(&cands, &node(&[("role", "db")]));
        assert_ne!(class_key(&class), class_key(&db_class));
        assert_eq!(names(class_members(&cands, &db_class)), ["c", "f"]);
        // The tags say the class back.
        let tags = creation_tags("c1", &class);
        let group = GroupInfo {
            id: "sg-1".into(),
            name: String::new(),
            vpc_id: None,
            tags,
        };
        assert_eq!(class_of_group(&group), Some(class.clone()));
        // A policy without cloud rules is in no class.
        let mut node_only = with_uid(policy("g", r(), None), "7");
        node_only.spec.node_selector = None;
        for rule in node_only.spec.ingress.iter_mut().flatten() {
            rule.layers = Some(vec![crate::api::Layer::Node]);
        }
        assert!(no_group(&node_only) && !composable(&node_only));
        // Unattached, it needs no group either.
        let mut unattached = node_only.clone();
        unattached.spec.security_group = Some(SecurityGroupTarget {
            attach_to_nodes: Some(false),
            ..Default::default()
        });
        assert!(no_group(&unattached) && !composable_spec(&unattached));
        let all = store_of(vec![web_a.clone(), node_only]);
        assert_eq!(
            class_of(&candidates(&all, None), &web_node),
            BTreeSet::from([key(&web_a)])
        );
    }
}
