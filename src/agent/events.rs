//! Events the agent raises on its node's `FirewallNode`, so
//! `kubectl describe fwn <node>` shows what happened to the node's rules:
//!
//! - `DriftRepaired` (Warning): something else changed Palisade's chains,
//!   hooks or sets, and the agent wrote them back;
//! - `RestoreFailed` (Warning): the kernel refused an `iptables-restore`,
//!   `ip6tables-restore` or `ipset restore`; the previous ruleset stays in
//!   force.
//!
//! At most one Event per reason a minute, whatever the rate ([`Throttle`]):
//! a fight with another iptables writer repairs at every change, and must
//! not become an API write per repair. The note of the next Event counts
//! the ones held back. kube's recorder also folds repeats within a few
//! minutes into one Event's `series`.
//!
//! A `FirewallNode` is cluster-scoped: its Events live in the `default`
//! namespace, where the agent may `create` and `patch` `events.k8s.io`
//! Events (and nowhere else).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::warn;

use crate::node::dataplane::Plan;
use crate::policy::IpFamily;

/// Reason of the Event of a drift repair.
pub const DRIFT_REPAIRED: &str = "DriftRepaired";
/// Reason of the Event of a restore the kernel refused.
pub const RESTORE_FAILED: &str = "RestoreFailed";
/// The shortest time between two Events of one reason.
pub const MIN_INTERVAL: Duration = Duration::from_secs(60);

/// Lets one Event per reason through per interval, and counts the rest
/// (pure: the time is passed in).
#[derive(Debug, Clone)]
pub struct Throttle {
    interval: Duration,
    /// Per reason: when the last one went out, and how many were held
    /// back since.
    last: BTreeMap<&'static str, (Instant, u64)>,
}

impl Throttle {
    /// A throttle letting one Event per reason through per `interval`.
    pub fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            last: BTreeMap::new(),
        }
    }

    /// Whether an Event of `reason` may go out `now`: `Some(held back since
    /// the last one)`, or `None` (counted, to be reported with the next).
    pub fn admit(&mut self, reason: &'static str, now: Instant) -> Option<u64> {
        match self.last.get_mut(reason) {
            Some((at, held)) if now.saturating_duration_since(*at) < self.interval => {
                *held = held.saturating_add(1);
                None
            }
            Some((at, held)) => {
                let n = *held;
                *at = now;
                *held = 0;
                Some(n)
            }
            None => {
                self.last.insert(reason, (now, 0));
                Some(0)
            }
        }
    }
}

/// What a drift repair wrote back, for a person (pure): the chains
/// rewritten and deleted per family, hooks and sets restored.
pub fn drift_note(plan: &Plan) -> String {
    let mut parts = Vec::new();
    for (family, name) in [(IpFamily::V4, "IPv4"), (IpFamily::V6, "IPv6")] {
        let written = plan.chains_written(family);
        if !written.is_empty() {
            let names: Vec<&str> = written.iter().take(5).copied().collect();
            let more = written.len().saturating_sub(names.len());
            parts.push(format!(
                "{name}: rewrote {} chain(s) {}{}",
                written.len(),
                names.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ));
        }
        let deleted = plan.chains_deleted(family);
        if deleted > 0 {
            parts.push(format!("{name}: deleted {deleted} stray chain(s)"));
        }
        let hooks = plan.hooks_changed(family);
        if hooks > 0 {
            parts.push(format!(
                "{name}: fixed {hooks} hook rule(s) in INPUT/OUTPUT"
            ));
        }
    }
    let (created, changed, destroyed) = plan.set_counts();
    let sets = created + changed + destroyed;
    if sets > 0 {
        parts.push(format!("restored {sets} ipset(s)"));
    }
    if parts.is_empty() {
        "the node's rules changed out of band and were written back".to_string()
    } else {
        format!(
            "the node's rules changed out of band and were written back: {}",
            parts.join("; ")
        )
    }
}

/// The agent's Events about its `FirewallNode`.
pub struct NodeEvents {
    recorder: Recorder,
    reference: ObjectReference,
    throttle: Throttle,
}

impl std::fmt::Debug for NodeEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeEvents")
            .field("reference", &self.reference)
            .finish()
    }
}

impl NodeEvents {
    /// Events about the FirewallNode of `node`, reported by
    /// `palisade-agent` from instance `node`.
    pub fn new(client: Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: super::FIELD_MANAGER.into(),
            instance: Some(node.to_string()),
        };
        NodeEvents {
            recorder: Recorder::new(client, reporter),
            reference: ObjectReference {
                api_version: Some("palisade.dev/v1alpha1".into()),
                kind: Some("FirewallNode".into()),
                name: Some(node.to_string()),
                ..Default::default()
            },
            throttle: Throttle::new(MIN_INTERVAL),
        }
    }

    /// Sets the FirewallNode's uid once known (after the agent's first
    /// write): `kubectl describe` matches Events by it.
    pub fn set_uid(&mut self, uid: Option<String>) {
        if uid.is_some() {
            self.reference.uid = uid;
        }
    }

    /// Publishes a Warning of `reason`, unless one of that reason went out
    /// less than [`MIN_INTERVAL`] ago. A refused Event is logged, never an
    /// error of the sync.
    pub async fn warn(&mut self, reason: &'static str, action: &str, note: &str) {
        let Some(held) = self.throttle.admit(reason, Instant::now()) else {
            return;
        };
        let note = if held > 0 {
            format!("{note} ({held} more since the last Event)")
        } else {
            note.to_string()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_string(),
            // The API refuses notes over 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &self.reference).await {
            warn!(error = %e, reason, "publishing an Event on the FirewallNode failed");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policy::{NodeDiff, TableDiff};

    #[test]
    fn one_event_per_reason_per_interval() {
        let mut t = Throttle::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(t.admit(DRIFT_REPAIRED, t0), Some(0));
        assert_eq!(t.admit(DRIFT_REPAIRED, t0 + Duration::from_secs(1)), None);
        assert_eq!(t.admit(DRIFT_REPAIRED, t0 + Duration::from_secs(59)), None);
        // Another reason is not held back by the first.
        assert_eq!(
            t.admit(RESTORE_FAILED, t0 + Duration::from_secs(2)),
            Some(0)
        );
        assert_eq!(
            t.admit(DRIFT_REPAIRED, t0 + Duration::from_secs(60)),
            Some(2)
        );
        assert_eq!(t.admit(DRIFT_REPAIRED, t0 + Duration::from_secs(61)), None);
        assert_eq!(
            t.admit(DRIFT_REPAIRED, t0 + Duration::from_secs(200)),
            Some(1)
        );
    }

    #[test]
    fn drift_note_names_what_was_written_back() {
        assert!(drift_note(&Plan::default()).contains("written back"));
        let plan = Plan {
            diff: NodeDiff {
                ipv4: TableDiff {
                    delete_chains: vec!["PAL-X".into()],
                    ..Default::default()
                },
                destroy_sets: vec!["pal-x".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let note = drift_note(&plan);
        assert!(note.contains("IPv4: deleted 1 stray chain(s)"), "{note}");
        assert!(note.contains("restored 1 ipset(s)"), "{note}");
        assert!(!note.contains("IPv6"), "{note}");
    }
}
