//! Prometheus metrics of the controller (`/metrics`).
//!
//! Error reasons are the controller's [`super::Error::reason`] strings and
//! EC2 outcomes the [`crate::cloud::ErrorKind::label`]s, so a dashboard's
//! labels are the same words as the conditions and logs.
//!
//! Per-policy series (`policy` label) exist for the policies this replica
//! reconciles (the leader), and go with the policy: at the end of its
//! cleanup, or when it leaves the watch cache without one (see
//! [`Metrics::retain_policies`]). Their number is bounded by the number of
//! policies.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::status::PolicyState;
use crate::api::FirewallPolicyStatus;
use crate::cloud::CallObserver;

/// Label of a reconcile outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok`, `stalled` or `error`.
    pub result: String,
}

/// Label of an error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The error's reason.
    pub reason: String,
}

/// Label of the policies-by-state gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// `ready`, `reconciling` or `stalled` ([`PolicyState::label`]).
    pub state: String,
}

/// Label of a per-policy series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    /// The policy's name.
    pub policy: String,
}

/// Labels of a policy's node counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyNodesLabel {
    /// The policy's name.
    pub policy: String,
    /// `selected`, `synced` or `failed`.
    pub state: String,
}

/// The `state` labels of [`Metrics::policy_nodes`].
const NODE_STATES: [&str; 3] = ["selected", "synced", "failed"];

/// Labels of one EC2 attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Ec2Label {
    /// The EC2 action.
    pub operation: String,
    /// `ok` or the error class.
    pub outcome: String,
}

/// Every metric the controller exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles by result.
    pub reconciles: Family<ResultLabel, Counter>,
    /// Reconcile duration, seconds.
    pub reconcile_duration: Histogram,
    /// Failed reconciles by reason.
    pub errors: Family<ReasonLabel, Counter>,
    /// EC2 attempts by operation and outcome.
    pub ec2_calls: Family<Ec2Label, Counter>,
    /// EC2 attempts answered with throttling.
    pub throttles: Counter,
    /// Out-of-band changes repaired.
    pub drift_corrections: Counter,
    /// Security Group rules the controller manages, over all policies
    /// (as of each policy's last sync).
    pub rules_managed: Gauge,
    /// Policies by state (ready, reconciling, stalled), as of each one's
    /// last reconcile.
    pub policies: Family<StateLabel, Gauge>,
    /// Per policy, its selected nodes and those whose agent applied the
    /// current generation (synced) or failed its last sync (failed).
    pub policy_nodes: Family<PolicyNodesLabel, Gauge>,
    /// Per policy, the Unix time of the last full sync that left its
    /// Security Group holding exactly the plan; 0 until the first.
    pub last_successful_sync: Family<PolicyLabel, Gauge<f64, AtomicU64>>,
    /// Per policy, the rules of other Security Groups on its selected
    /// nodes' interfaces that admit traffic it does not (as of its last
    /// full sync).
    pub policy_widening_rules: Family<PolicyLabel, Gauge>,
    /// Each policy's state, from which `policies` is counted.
    states: Mutex<BTreeMap<String, PolicyState>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("palisade_controller");
        let reconciles = Family::<ResultLabel, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        let errors = Family::<ReasonLabel, Counter>::default();
        let ec2_calls = Family::<Ec2Label, Counter>::default();
        let throttles = Counter::default();
        let drift_corrections = Counter::default();
        let rules_managed = Gauge::default();
        let policies = Family::<StateLabel, Gauge>::default();
        let policy_nodes = Family::<PolicyNodesLabel, Gauge>::default();
        let last_successful_sync = Family::<PolicyLabel, Gauge<f64, AtomicU64>>::default();
        let policy_widening_rules = Family::<PolicyLabel, Gauge>::default();
        registry.register("reconciles", "Reconciles by result", reconciles.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            reconcile_duration.clone(),
        );
        registry.register("errors", "Failed reconciles by reason", errors.clone());
        registry.register(
            "ec2_calls",
            "EC2 API attempts by operation and outcome",
            ec2_calls.clone(),
        );
        registry.register(
            "ec2_throttles",
            "EC2 attempts answered with RequestLimitExceeded or another throttling code",
            throttles.clone(),
        );
        registry.register(
            "drift_corrections",
            "Out-of-band Security Group changes repaired",
            drift_corrections.clone(),
        );
        registry.register(
            "rules_managed",
            "Security Group rules managed, over all policies",
            rules_managed.clone(),
        );
        registry.register(
            "policies",
            "Policies by state (ready, reconciling, stalled), as of each one's last reconcile",
            policies.clone(),
        );
        registry.register(
            "policy_nodes",
            "Nodes a policy selects, and of those the ones whose agent applied its current generation (synced) or failed its last sync (failed)",
            policy_nodes.clone(),
        );
        registry.register(
            "last_successful_sync_timestamp_seconds",
            "Unix time of the last full sync that left the policy's Security Group holding exactly its plan (0: none yet)",
            last_successful_sync.clone(),
        );
        registry.register(
            "policy_widening_rules",
            "Rules of other Security Groups on a policy's selected nodes' interfaces that admit traffic the policy does not (groups on an interface are a union)",
            policy_widening_rules.clone(),
        );
        // Every state has a series from the start: an alert on `stalled`
        // reads 0, not nothing, before any policy is reconciled.
        for state in PolicyState::ALL {
            policies
                .get_or_create(&StateLabel {
                    state: state.label().to_string(),
                })
                .set(0);
        }
        Metrics {
            registry,
            reconciles,
            reconcile_duration,
            errors,
            ec2_calls,
            throttles,
            drift_corrections,
            rules_managed,
            policies,
            policy_nodes,
            last_successful_sync,
            policy_widening_rules,
            states: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Records one reconcile.
    pub fn reconciled(&self, result: &str, took: Duration) {
        self.reconciles
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    /// Records one failed reconcile.
    pub fn failed(&self, reason: &str) {
        self.errors
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Records where a policy stands, from the status a reconcile computed
    /// (whether or not it was written): its state and node counts. Its
    /// sync timestamp series appears too, at 0 until its first full sync.
    pub fn observe_status(&self, policy: &str, status: &FirewallPolicyStatus) {
        let state = PolicyState::of(&status.conditions);
        let nodes = status.nodes.clone().unwrap_or_default();
        // Under the states lock, so a concurrent forget cannot interleave.
        let mut states = super::lock(&self.states);
        for (label, n) in NODE_STATES
            .iter()
            .zip([nodes.selected, nodes.synced, nodes.failed])
        {
            self.policy_nodes
                .get_or_create(&PolicyNodesLabel {
                    policy: policy.to_string(),
                    state: label.to_string(),
                })
                .set(i64::from(n));
        }
        let _created = self.last_successful_sync.get_or_create_owned(&PolicyLabel {
            policy: policy.to_string(),
        });
        states.insert(policy.to_string(), state);
        self.count_states(&states);
    }

    /// Records a full sync of `policy` that left its group holding exactly
    /// the plan, finished `at`.
    pub fn synced(&self, policy: &str, at: SystemTime) {
        let seconds = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_successful_sync
            .get_or_create(&PolicyLabel {
                policy: policy.to_string(),
            })
            .set(seconds);
    }

    /// Records how many rules of other groups widen `policy`'s access.
    pub fn widened(&self, policy: &str, rules: usize) {
        self.policy_widening_rules
            .get_or_create(&PolicyLabel {
                policy: policy.to_string(),
            })
            .set(i64::try_from(rules).unwrap_or(i64::MAX));
    }

    /// Forgets a policy: removes every series labelled with it and stops
    /// counting it by state. At the end of its cleanup.
    pub fn forget_policy(&self, policy: &str) {
        let mut states = super::lock(&self.states);
        self.remove_series(policy);
        states.remove(policy);
        self.count_states(&states);
    }

    /// Forgets every policy for which `exists` is false: those deleted
    /// without a cleanup (finalizer removed by hand) or moved out of this
    /// controller's `policySelector`.
    pub fn retain_policies(&self, exists: impl Fn(&str) -> bool) {
        let mut states = super::lock(&self.states);
        let gone: Vec<String> = states.keys().filter(|p| !exists(p)).cloned().collect();
        for policy in &gone {
            self.remove_series(policy);
            states.remove(policy);
        }
        self.count_states(&states);
    }

    fn remove_series(&self, policy: &str) {
        for state in NODE_STATES {
            self.policy_nodes.remove(&PolicyNodesLabel {
                policy: policy.to_string(),
                state: state.to_string(),
            });
        }
        self.last_successful_sync.remove(&PolicyLabel {
            policy: policy.to_string(),
        });
        self.policy_widening_rules.remove(&PolicyLabel {
            policy: policy.to_string(),
        });
    }

    fn count_states(&self, states: &BTreeMap<String, PolicyState>) {
        for state in PolicyState::ALL {
            let n = states.values().filter(|s| **s == state).count();
            self.policies
                .get_or_create(&StateLabel {
                    state: state.label().to_string(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// An observer of EC2 attempts feeding `ec2_calls` and `throttles`.
    pub fn ec2_observer(self: &Arc<Self>) -> CallObserver {
        let metrics = self.clone();
        Arc::new(move |operation, outcome| {
            metrics
                .ec2_calls
                .get_or_create(&Ec2Label {
                    operation: operation.to_string(),
                    outcome: outcome.to_string(),
                })
                .inc();
            if outcome == "throttled" {
                metrics.throttles.inc();
            }
        })
    }
}

/// The controller's `/metrics`, `/healthz` and `/readyz`: ready once
/// connected to the apiserver (leader or standby), until shutdown.
pub struct ControllerEndpoints {
    /// The registry.
    pub metrics: std::sync::Arc<Metrics>,
    /// Set by the binary.
    pub ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl crate::telemetry::Endpoints for ControllerEndpoints {
    fn metrics(&self) -> String {
        self.metrics.encode()
    }
    fn ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let m = Arc::new(Metrics::default());
        m.reconciled("ok", Duration::from_millis(20));
        m.failed("QuotaExceeded");
        (m.ec2_observer())("DescribeSecurityGroupRules", "throttled");
        let text = m.encode();
        for name in [
            "palisade_controller_reconciles_total{result=\"ok\"} 1",
            "palisade_controller_errors_total{reason=\"QuotaExceeded\"} 1",
            "palisade_controller_ec2_calls_total{operation=\"DescribeSecurityGroupRules\",outcome=\"throttled\"} 1",
            "palisade_controller_ec2_throttles_total 1",
            "palisade_controller_reconcile_duration_seconds",
            "palisade_controller_rules_managed",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    /// The status a reconcile computes for these counts: ready when every
    /// selected node is synced, unless the cloud layer is stalled.
    fn status(stalled: bool, selected: i32, synced: i32) -> FirewallPolicyStatus {
        use super::super::status::{CloudState, conditions};
        let nodes = crate::api::NodeCounts {
            selected,
            synced,
            ..Default::default()
        };
        let cloud = if stalled {
            CloudState::Stalled("QuotaExceeded", "x".into())
        } else {
            CloudState::Synced
        };
        FirewallPolicyStatus {
            conditions: conditions(&[], 1, &cloud, &nodes),
            nodes: Some(nodes),
            ..Default::default()
        }
    }

    #[test]
    fn policies_are_counted_by_state_and_forgotten() {
        let m = Metrics::default();
        let text = m.encode();
        for state in ["ready", "reconciling", "stalled"] {
            let line = format!("palisade_controller_policies{{state=\"{state}\"}} 0");
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        m.observe_status("web", &status(false, 3, 3));
        m.observe_status("db", &status(false, 2, 1));
        m.observe_status("bad", &status(true, 1, 0));
        m.synced(
            "web",
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        );
        let text = m.encode();
        for line in [
            "palisade_controller_policies{state=\"ready\"} 1",
            "palisade_controller_policies{state=\"reconciling\"} 1",
            "palisade_controller_policies{state=\"stalled\"} 1",
            "palisade_controller_policy_nodes{policy=\"web\",state=\"selected\"} 3",
            "palisade_controller_policy_nodes{policy=\"db\",state=\"synced\"} 1",
            "palisade_controller_policy_nodes{policy=\"bad\",state=\"failed\"} 0",
            "palisade_controller_last_successful_sync_timestamp_seconds{policy=\"web\"} 1700000000",
            "palisade_controller_last_successful_sync_timestamp_seconds{policy=\"db\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }

        // A policy changing state moves between the counts.
        m.observe_status("db", &status(false, 2, 2));
        assert!(
            m.encode()
                .contains("palisade_controller_policies{state=\"ready\"} 2")
        );

        m.forget_policy("web");
        m.retain_policies(|p| p != "bad");
        let text = m.encode();
        assert!(!text.contains("policy=\"web\""), "{text}");
        assert!(!text.contains("policy=\"bad\""), "{text}");
        assert!(text.contains("policy=\"db\""), "{text}");
        for line in [
            "palisade_controller_policies{state=\"ready\"} 1",
            "palisade_controller_policies{state=\"stalled\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
