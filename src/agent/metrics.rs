//! The agent's metrics (`/metrics`, Prometheus text format), served with
//! `/healthz` and `/readyz` (ready once the first sync succeeded) by
//! [`crate::telemetry`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Everything the agent measures.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Seconds per sync (read back, diff, apply, re-read).
    pub sync_duration: Histogram,
    /// iptables + ip6tables rules Palisade has programmed.
    pub rules: Gauge,
    /// Entries across Palisade's ipsets.
    pub set_entries: Gauge,
    /// Restores (iptables, ip6tables, ipset) the kernel refused.
    pub restore_failures: Counter,
    /// Out-of-band changes found and repaired.
    pub drift_repairs: Counter,
    /// Syncs that failed, whatever the cause.
    pub sync_failures: Counter,
    /// Packets each Audit policy would have dropped, per direction, since
    /// its rules were last programmed (read from rule counters).
    pub audit_would_drop: Family<AuditLabels, Gauge>,
    /// Established flows cut after a narrowing (`existingConnections: Cut`).
    pub flows_cut: Counter,
    /// Unix time of the last sync that left the node holding exactly its
    /// ruleset; 0 until the first.
    pub last_successful_sync: Gauge<f64, AtomicU64>,
    /// Wake-ups of the sync loop, by source (see [`super::wake`]).
    pub wakeups: Family<super::wake::WakeLabels, Counter>,
    /// Set once the agent has seen every policy and its Node and synced.
    pub ready: AtomicBool,
}

/// Labels of an Audit policy's would-be drops.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    /// The policy.
    pub policy: String,
    /// `ingress` or `egress`.
    pub direction: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("palisade_agent");
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let rules = Gauge::default();
        let set_entries = Gauge::default();
        let restore_failures = Counter::default();
        let drift_repairs = Counter::default();
        let sync_failures = Counter::default();
        registry.register(
            "sync_duration_seconds",
            "Duration of one sync: read back, diff, apply, re-read",
            sync_duration.clone(),
        );
        registry.register(
            "rules",
            "iptables and ip6tables rules programmed",
            rules.clone(),
        );
        registry.register(
            "set_entries",
            "Entries across the ipsets programmed",
            set_entries.clone(),
        );
        registry.register(
            "restore_failures",
            "iptables-restore, ip6tables-restore or ipset restore runs refused",
            restore_failures.clone(),
        );
        registry.register(
            "drift_repairs",
            "Out-of-band changes found and repaired",
            drift_repairs.clone(),
        );
        registry.register("sync_failures", "Syncs that failed", sync_failures.clone());
        let audit_would_drop = Family::<AuditLabels, Gauge>::default();
        registry.register(
            "audit_would_drop_packets",
            "Packets an Audit policy would have dropped had it been in Enforce",
            audit_would_drop.clone(),
        );
        let flows_cut = Counter::default();
        registry.register(
            "flows_cut",
            "Established flows cut after a narrowing (existingConnections: Cut)",
            flows_cut.clone(),
        );
        let last_successful_sync = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_successful_sync_timestamp_seconds",
            "Unix time of the last sync that left the node holding exactly its ruleset (0: none yet)",
            last_successful_sync.clone(),
        );
        let wakeups = Family::<super::wake::WakeLabels, Counter>::default();
        registry.register(
            "wakeups",
            "Wake-ups of the sync loop by an event, by source (policy, node, peer_slice, endpoints, nft_monitor); the resync timer is not counted",
            wakeups.clone(),
        );
        Metrics {
            wakeups,
            audit_would_drop,
            flows_cut,
            last_successful_sync,
            registry,
            sync_duration,
            rules,
            set_entries,
            restore_failures,
            drift_repairs,
            sync_failures,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Records a successful sync, finished `at`.
    pub fn synced(&self, at: SystemTime) {
        let seconds = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_successful_sync.set(seconds);
    }

    /// Removes the would-be-drop series of a policy no longer in Audit on
    /// this node (edited to Enforce, deselected or deleted).
    pub fn forget_audit(&self, policy: &str) {
        for direction in ["ingress", "egress"] {
            self.audit_would_drop.remove(&AuditLabels {
                policy: policy.to_string(),
                direction: direction.to_string(),
            });
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl crate::telemetry::Endpoints for Metrics {
    fn metrics(&self) -> String {
        self.render()
    }
    /// Ready once the first sync succeeded.
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_named_for_the_agent() {
        let m = Metrics::default();
        m.drift_repairs.inc();
        m.rules.set(42);
        m.sync_duration.observe(0.01);
        let text = m.render();
        for name in [
            "palisade_agent_drift_repairs_total 1",
            "palisade_agent_rules 42",
            "palisade_agent_set_entries 0",
            "palisade_agent_restore_failures_total 0",
            "palisade_agent_sync_duration_seconds_count 1",
            "palisade_agent_last_successful_sync_timestamp_seconds 0",
        ] {
            assert!(text.contains(name), "{name} in {text}");
        }
    }

    #[test]
    fn sync_time_and_audit_series() {
        let m = Metrics::default();
        m.synced(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_500));
        for direction in ["ingress", "egress"] {
            m.audit_would_drop
                .get_or_create(&AuditLabels {
                    policy: "audit".into(),
                    direction: direction.into(),
                })
                .set(3);
        }
        let text = m.render();
        assert!(
            text.contains("palisade_agent_last_successful_sync_timestamp_seconds 1700000000.5"),
            "{text}"
        );
        assert!(text.contains("policy=\"audit\""), "{text}");
        m.forget_audit("audit");
        assert!(!m.render().contains("policy=\"audit\""));
    }
}
