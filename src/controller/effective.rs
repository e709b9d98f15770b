//! Effective cloud access, the controller's side: reads every Security
//! Group on the selected nodes' interfaces (cached, shared between
//! policies) and judges them with [`crate::policy::effective`].
//!
//! Read-only: nothing here writes to EC2. A group is read at most once per
//! resync interval whichever policies share it (an EKS cluster group on
//! every node is one `DescribeSecurityGroups` entry and one
//! `DescribeSecurityGroupRules` call per interval, not one per policy).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::conditions::Condition;

use crate::api::conditions::{self, reason};
use crate::cloud::{Ec2, GroupInfo, InstanceInfo, tags};
use crate::policy::effective::{AttachedGroup, Widening};
use crate::policy::{CurrentSgRule, Direction, SgPermission};

use super::{Error, lock};

/// How many widening rules the status names one by one; the rest are
/// counted.
pub const STATUS_WIDENINGS: usize = 5;

/// A group as last read.
#[derive(Debug, Clone)]
struct Cached {
    at: Instant,
    name: String,
    palisade: bool,
    rules: Arc<Vec<CurrentSgRule>>,
}

/// Groups read from EC2, by id, shared between reconciles.
#[derive(Debug, Default)]
pub struct GroupCache {
    groups: Mutex<HashMap<String, Cached>>,
}

impl GroupCache {
    /// Forgets everything (the next reads go to EC2).
    pub fn clear(&self) {
        lock(&self.groups).clear();
    }

    /// Number of groups held.
    pub fn len(&self) -> usize {
        lock(&self.groups).len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether group `id` has been read (however long ago).
    pub fn holds(&self, id: &str) -> bool {
        lock(&self.groups).contains_key(id)
    }

    /// Records a group as a sync left it (its own group, just written).
    pub fn put(&self, id: &str, name: &str, palisade: bool, rules: Vec<CurrentSgRule>) {
        lock(&self.groups).insert(
            id.to_string(),
            Cached {
                at: Instant::now(),
                name: name.to_string(),
                palisade,
                rules: Arc::new(rules),
            },
        );
    }

    /// Every inbound permission of `ids` together (what the union of those
    /// groups admits); `None` when one of them has not been read.
    pub fn ingress_union(&self, ids: &[String]) -> Option<Vec<SgPermission>> {
        let held = lock(&self.groups);
        let mut out = Vec::new();
        for id in ids {
            let group = held.get(id)?;
            out.extend(
                group
                    .rules
                    .iter()
                    .filter(|r| r.direction == Direction::Ingress)
                    .map(|r| r.permission.clone()),
            );
        }
        Some(out)
    }
}

/// Reads groups `ids` (names, tags, rules) from EC2 into `cache`.
pub(crate) async fn read_groups<E: Ec2>(
    ec2: &E,
    cache: &GroupCache,
    cluster: &str,
    ids: &[String],
) -> Result<(), Error> {
    if ids.is_empty() {
        return Ok(());
    }
    // Chunked within EC2's filter limit by the client.
    for info in ec2.describe_groups(ids).await? {
        let rules = ec2.describe_rules(&info.id).await?;
        cache.put(
            &info.id,
            &info.name,
            created_by_palisade(&info, cluster),
            rules,
        );
    }
    Ok(())
}

/// The outcome of one analysis, kept between full syncs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effective {
    /// The policy's group is not attached to nodes (nothing to compare).
    NotAttached,
    /// Analysed: these rules of other groups widen access.
    Analysed(Vec<Widening>),
    /// The groups could not be read (the message says why).
    Unknown(String),
}

/// Every group on the interfaces of `selected` instances with how many
/// carry it; the policy's own group `own` (id, rules as they now are)
/// is taken as given, the others read through `cache` (fresh for `ttl`).
pub(crate) async fn attached_groups<E: Ec2>(
    ec2: &E,
    cache: &GroupCache,
    ttl: Duration,
    cluster: &str,
    own: (&str, &[CurrentSgRule]),
    instances: &[InstanceInfo],
    selected: &[String],
) -> Result<Vec<AttachedGroup>, Error> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for instance in instances.iter().filter(|i| selected.contains(&i.id)) {
        for group in &instance.eni_groups {
            *counts.entry(group.clone()).or_default() += 1;
        }
    }
    let stale: Vec<String> = {
        let held = lock(&cache.groups);
        counts
            .keys()
            .filter(|id| id.as_str() != own.0)
            .filter(|id| held.get(*id).is_none_or(|c| c.at.elapsed() >= ttl))
            .cloned()
            .collect()
    };
    read_groups(ec2, cache, cluster, &stale).await?;
    let held = lock(&cache.groups);
    Ok(counts
        .into_iter()
        .filter_map(|(id, nodes)| {
            if id == own.0 {
                return Some(AttachedGroup {
                    id,
                    name: String::new(),
                    palisade: false,
                    rules: own.1.to_vec(),
                    nodes,
                });
            }
            // A group that vanished between the instance read and ours
            // admits nothing.
            let c = held.get(&id)?;
            Some(AttachedGroup {
                id,
                name: c.name.clone(),
                palisade: c.palisade,
                rules: c.rules.as_ref().clone(),
                nodes,
            })
        })
        .collect())
}

fn created_by_palisade(group: &GroupInfo, cluster: &str) -> bool {
    group.tags.get(tags::MANAGED_BY).map(String::as_str) == Some(tags::MANAGER)
        && group.tags.get(tags::CLUSTER).map(String::as_str) == Some(cluster)
        && group.tags.contains_key(tags::POLICY_UID)
}

/// The status warnings for `effective`: the first [`STATUS_WIDENINGS`]
/// widening rules one by one, then a count.
pub fn warnings(effective: &Effective) -> Vec<String> {
    match effective {
        Effective::NotAttached => Vec::new(),
        Effective::Unknown(why) => vec![format!(
            "effective access unknown: the other Security Groups on the nodes' interfaces could not be read ({why})"
        )],
        Effective::Analysed(w) => {
            let mut out: Vec<String> = w
                .iter()
                .take(STATUS_WIDENINGS)
                .map(ToString::to_string)
                .collect();
            if w.len() > STATUS_WIDENINGS {
                out.push(format!(
                    "... and {} more rules of other Security Groups widen this policy's access",
                    w.len() - STATUS_WIDENINGS
                ));
            }
            out
        }
    }
}

/// Number of widening rules (0 when unknown or not attached).
pub fn count(effective: &Effective) -> usize {
    match effective {
        Effective::Analysed(w) => w.len(),
        _ => 0,
    }
}

/// The `EffectiveAccess` condition: `True` when no other group on the
/// selected nodes' interfaces admits more than the policy, `False`
/// (`WidenedByOtherGroups`) when one does, `Unknown` when they could not be
/// read. Keeps the previous transition time while the status holds.
pub fn condition(previous: &[Condition], generation: i64, effective: &Effective) -> Condition {
    let (status, why, message) = match effective {
        Effective::NotAttached => (
            "True",
            reason::NOT_ATTACHED,
            "the policy's group is attached to no node: nothing to compare".to_string(),
        ),
        Effective::Unknown(m) => ("Unknown", reason::RETRYING, m.clone()),
        Effective::Analysed(w) if w.is_empty() => (
            "True",
            reason::AS_INTENDED,
            "no other Security Group on the selected nodes' interfaces admits more than this policy"
                .to_string(),
        ),
        Effective::Analysed(w) => {
            let groups: std::collections::BTreeSet<&str> =
                w.iter().map(|x| x.group_id.as_str()).collect();
            let groups: Vec<&str> = groups.into_iter().collect();
            (
                "False",
                reason::WIDENED_BY_OTHER_GROUPS,
                format!(
                    "{} rules of {} other Security Groups ({}) admit traffic this policy does not; see status.warnings",
                    w.len(),
                    groups.len(),
                    groups.join(", ")
                ),
            )
        }
    };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == conditions::EFFECTIVE_ACCESS && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(super::status::now_as_stored);
    Condition {
        type_: conditions::EFFECTIVE_ACCESS.to_string(),
        status: status.to_string(),
        reason: why.to_string(),
        message,
        observed_generation: Some(generation),
        last_transition_time: Some(last_transition_time),
    }
}
