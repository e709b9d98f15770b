//! The agent's metrics (`/metrics`, Prometheus text format) and `/healthz`,
//! served by a small hyper server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

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
    /// Set once the agent has seen every policy and its Node and synced.
    pub ready: AtomicBool,
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
        Metrics {
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
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/metrics" => (StatusCode::OK, metrics.render()),
        "/healthz" if metrics.ready.load(Ordering::Relaxed) => (StatusCode::OK, "ok\n".into()),
        "/healthz" => (StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n".into()),
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

/// Serves `/metrics` and `/healthz` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&metrics, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
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
        ] {
            assert!(text.contains(name), "{name} in {text}");
        }
    }
}
