//! Prometheus metrics of the controller (`/metrics`).
//!
//! Error reasons are the controller's [`super::Error::reason`] strings and
//! EC2 outcomes the [`crate::cloud::ErrorKind::label`]s, so a dashboard's
//! labels are the same words as the conditions and logs.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
        Metrics {
            registry,
            reconciles,
            reconcile_duration,
            errors,
            ec2_calls,
            throttles,
            drift_corrections,
            rules_managed,
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
}
