//! Pure status building: conditions with kstatus polarity and node counts
//! aggregated from the agents' `FirewallNode` objects.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::conditions::{self, reason};
use std::sync::Arc;

use super::cache::Report;
use crate::api::{Condition, FirewallPolicy, FirewallPolicyStatus, NodeCounts};

/// Where the cloud layer of a policy stands after a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudState {
    /// The group holds exactly the plan.
    Synced,
    /// The policy has no cloud-layer rule: it has no group.
    NoGroup,
    /// Progress impossible until something changes (reason, message).
    Stalled(&'static str, String),
    /// A transient failure; retrying (message).
    Retrying(String),
}

/// Where a policy stands, read from its conditions as kstatus reads them:
/// what `kubectl get fwp` shows and `palisade_controller_policies{state}`
/// counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyState {
    /// `Ready=True`: applied on both layers.
    Ready,
    /// Neither ready nor stalled: progressing, retrying, or not reconciled
    /// yet.
    Reconciling,
    /// `Stalled=True`: no progress until the policy or its environment
    /// changes.
    Stalled,
}

impl PolicyState {
    /// Every state, in label order.
    pub const ALL: [PolicyState; 3] = [
        PolicyState::Ready,
        PolicyState::Reconciling,
        PolicyState::Stalled,
    ];

    /// The state of a policy with these conditions. `Stalled` wins over
    /// `Ready` (they never hold together in a status this controller
    /// wrote); no conditions at all is `Reconciling`.
    pub fn of(conditions: &[Condition]) -> PolicyState {
        let holds = |t: &str| {
            conditions
                .iter()
                .any(|c| c.type_ == t && c.status == "True")
        };
        if holds(conditions::STALLED) {
            PolicyState::Stalled
        } else if holds(conditions::READY) {
            PolicyState::Ready
        } else {
            PolicyState::Reconciling
        }
    }

    /// The metric label: `ready`, `reconciling` or `stalled`.
    pub fn label(self) -> &'static str {
        match self {
            PolicyState::Ready => "ready",
            PolicyState::Reconciling => "reconciling",
            PolicyState::Stalled => "stalled",
        }
    }
}

/// Counts the selected nodes whose agent reports `policy` at its current
/// generation (synced) or reports a failed last sync (failed).
pub fn node_counts(
    policy: &FirewallPolicy,
    selected: &[String],
    reports: &[Arc<Report>],
) -> NodeCounts {
    let name = policy.metadata.name.as_deref().unwrap_or_default();
    let uid = policy.metadata.uid.as_deref();
    let generation = policy.metadata.generation.unwrap_or_default();
    let mut synced = 0;
    let mut failed = 0;
    // By name, once: a search per selected node made this N² (measured by
    // `make bench-scale`).
    let by_name: std::collections::HashMap<&str, &Report> = reports
        .iter()
        .map(|r| (r.name.as_str(), r.as_ref()))
        .collect();
    for node in selected {
        let Some(report) = by_name.get(node.as_str()) else {
            continue;
        };
        if report.lists(name, uid, Some(generation)) {
            synced += 1;
        } else if report.failed {
            failed += 1;
        }
    }
    let selected = i32::try_from(selected.len()).unwrap_or(i32::MAX);
    NodeCounts {
        selected,
        synced,
        failed,
        summary: format!("{synced}/{selected}"),
    }
}

/// Nodes whose agent still lists `policy` (by name, and uid when both
/// know it): the finalizer stays until this is empty.
pub fn nodes_still_enforcing(policy: &FirewallPolicy, reports: &[Arc<Report>]) -> Vec<String> {
    let name = policy.metadata.name.as_deref().unwrap_or_default();
    let uid = policy.metadata.uid.as_deref();
    let mut nodes: Vec<String> = reports
        .iter()
        .filter(|r| r.lists(name, uid, None))
        .map(|r| r.name.clone())
        .collect();
    nodes.sort();
    nodes
}

fn condition(type_: &str, ok: bool, reason: &str, message: String, generation: i64) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: Some(generation),
        last_transition_time: Some(now_as_stored()),
    }
}

/// The five conditions for `cloud` and `nodes`, keeping each previous
/// `lastTransitionTime` when the status did not flip.
///
/// - `Stalled=True` exactly when the cloud state is stalled;
/// - `Ready=True` when the cloud is synced and every selected node reports
///   the current generation;
/// - `Reconciling=True` whenever neither is the case.
pub fn conditions(
    previous: &[Condition],
    generation: i64,
    cloud: &CloudState,
    nodes: &NodeCounts,
) -> Vec<Condition> {
    let (cloud_ok, cloud_reason, cloud_message) = match cloud {
        CloudState::Synced => (
            true,
            reason::SYNCED,
            "the Security Group holds exactly the planned rules".to_string(),
        ),
        CloudState::NoGroup => (
            true,
            reason::NO_CLOUD_RULES,
            "the policy has no cloud-layer rule: Palisade creates and attaches no Security Group for it (the node layer enforces its rules)".to_string(),
        ),
        CloudState::Stalled(r, m) => (false, *r, m.clone()),
        CloudState::Retrying(m) => (false, reason::RETRYING, m.clone()),
    };
    let nodes_ok = nodes.synced == nodes.selected;
    let (nodes_reason, nodes_message) = if nodes_ok {
        (
            reason::SYNCED,
            format!(
                "{} of {} selected nodes applied generation {generation}",
                nodes.synced, nodes.selected
            ),
        )
    } else if nodes.failed > 0 {
        (
            reason::NODES_FAILED,
            format!(
                "{} of {} selected nodes failed to apply the policy (see their FirewallNode objects)",
                nodes.failed, nodes.selected
            ),
        )
    } else {
        (
            reason::NODES_PENDING,
            format!(
                "{} of {} selected nodes applied generation {generation}",
                nodes.synced, nodes.selected
            ),
        )
    };
    let stalled = matches!(cloud, CloudState::Stalled(..));
    let ready = cloud_ok && nodes_ok;
    let (ready_reason, ready_message) = if ready {
        (reason::SYNCED, "applied on both layers".to_string())
    } else if !cloud_ok {
        (cloud_reason, cloud_message.clone())
    } else {
        (nodes_reason, nodes_message.clone())
    };
    let fresh = vec![
        condition(
            conditions::READY,
            ready,
            ready_reason,
            ready_message.clone(),
            generation,
        ),
        condition(
            conditions::RECONCILING,
            !ready && !stalled,
            if ready || stalled {
                ready_reason
            } else {
                reason::PROGRESSING
            },
            ready_message.clone(),
            generation,
        ),
        condition(
            conditions::STALLED,
            stalled,
            cloud_reason,
            cloud_message.clone(),
            generation,
        ),
        condition(
            conditions::CLOUD_SYNCED,
            cloud_ok,
            cloud_reason,
            cloud_message,
            generation,
        ),
        condition(
            conditions::NODES_SYNCED,
            nodes_ok,
            nodes_reason,
            nodes_message,
            generation,
        ),
    ];
    fresh
        .into_iter()
        .map(|mut c| {
            if let Some(old) = previous.iter().find(|o| o.type_ == c.type_)
                && old.status == c.status
                && old.last_transition_time.is_some()
            {
                c.last_transition_time = old.last_transition_time.clone();
            }
            c
        })
        .collect()
}

/// Now, as a status stores it: `metav1.Time` is written in whole seconds,
/// so a time kept with its fraction would never equal its stored copy.
pub fn now_as_stored() -> Time {
    let now = k8s_openapi::jiff::Timestamp::now();
    Time(k8s_openapi::jiff::Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// `status` as the apiserver stores and returns it: what a reconcile
/// compares with the status it read, so a status that survives the round
/// trip is written once, never again while nothing changes (times lose
/// their fraction of a second; an empty list and an absent one read back
/// alike).
pub fn as_stored(status: FirewallPolicyStatus) -> FirewallPolicyStatus {
    serde_json::to_value(&status)
        .and_then(serde_json::from_value)
        .unwrap_or(status)
}

/// Conditions equal but for their transition times.
pub fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
                && x.observed_generation == y.observed_generation
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::api::{AppliedPolicy, FirewallNode, FirewallNodeSpec, FirewallNodeStatus};

    fn report(node: &str, policy: &str, generation: i64) -> Arc<Report> {
        let mut n = FirewallNode::new(
            node,
            FirewallNodeSpec {
                node_name: node.into(),
            },
        );
        n.status = Some(FirewallNodeStatus {
            policies: vec![AppliedPolicy {
                name: policy.into(),
                uid: None,
                generation,
                hash: "h".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        Arc::new(Report::from(n))
    }

    fn get<'a>(c: &'a [Condition], t: &str) -> &'a Condition {
        c.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn kstatus_polarity() {
        let mut p = FirewallPolicy::new("p", Default::default());
        p.metadata.generation = Some(3);
        let reports = vec![report("a", "p", 3), report("b", "p", 2)];
        let counts = node_counts(&p, &["a".into(), "b".into()], &reports);
        assert_eq!(
            (counts.selected, counts.synced, counts.summary.as_str()),
            (2, 1, "1/2")
        );
        let c = conditions(&[], 3, &CloudState::Synced, &counts);
        assert_eq!(get(&c, "Ready").status, "False");
        assert_eq!(get(&c, "Reconciling").status, "True");
        assert_eq!(get(&c, "Stalled").status, "False");
        assert_eq!(get(&c, "CloudSynced").status, "True");

        let counts = node_counts(&p, &["a".into()], &reports);
        let c = conditions(&c, 3, &CloudState::Synced, &counts);
        assert_eq!(get(&c, "Ready").status, "True");
        assert_eq!(get(&c, "Reconciling").status, "False");

        let c = conditions(
            &c,
            3,
            &CloudState::Stalled("QuotaExceeded", "too many".into()),
            &counts,
        );
        assert_eq!(get(&c, "Ready").status, "False");
        assert_eq!(get(&c, "Reconciling").status, "False");
        assert_eq!(get(&c, "Stalled").status, "True");
        assert_eq!(get(&c, "Stalled").reason, "QuotaExceeded");
        assert_eq!(nodes_still_enforcing(&p, &reports), ["a", "b"]);
    }

    #[test]
    fn policy_state_follows_the_conditions() {
        let counts = |synced| NodeCounts {
            selected: 2,
            synced,
            ..Default::default()
        };
        assert_eq!(PolicyState::of(&[]), PolicyState::Reconciling);
        let ready = conditions(&[], 1, &CloudState::Synced, &counts(2));
        assert_eq!(PolicyState::of(&ready), PolicyState::Ready);
        let pending = conditions(&ready, 1, &CloudState::Synced, &counts(1));
        assert_eq!(PolicyState::of(&pending), PolicyState::Reconciling);
        let retrying = conditions(&[], 1, &CloudState::Retrying("x".into()), &counts(2));
        assert_eq!(PolicyState::of(&retrying), PolicyState::Reconciling);
        let stalled = conditions(
            &[],
            1,
            &CloudState::Stalled("QuotaExceeded", "x".into()),
            &counts(2),
        );
        assert_eq!(PolicyState::of(&stalled), PolicyState::Stalled);
        let labels: Vec<_> = PolicyState::ALL.iter().map(|s| s.label()).collect();
        assert_eq!(labels, ["ready", "reconciling", "stalled"]);
    }

    #[test]
    fn a_status_compares_as_the_apiserver_stores_it() {
        // A time with a fraction of a second reads back without it: kept
        // as is, a record never equals its stored copy.
        let fine =
            Time(k8s_openapi::jiff::Timestamp::from_nanosecond(1_700_000_000_123_456_789).unwrap());
        let status = FirewallPolicyStatus {
            cloud_sync: Some(crate::api::CloudSync {
                generation: 1,
                inputs: "x".into(),
                time: fine.clone(),
                drift_repairs: 0,
            }),
            ..Default::default()
        };
        let stored: FirewallPolicyStatus =
            serde_json::from_value(serde_json::to_value(&status).unwrap()).unwrap();
        assert_ne!(stored, status, "the fraction is lost on the way");
        assert_eq!(as_stored(status.clone()), stored);
        assert_eq!(as_stored(stored.clone()), stored);
        assert_eq!(now_as_stored().0.subsec_nanosecond(), 0);
    }
}
