//! What both long-running binaries share at their edges: process start-up
//! (TLS provider, JSON logs) and the small HTTP server of `/metrics`,
//! `/healthz` and `/readyz`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Prepares the process: picks ring as rustls' provider (kube uses ring,
/// the AWS SDK brings aws-lc, and rustls refuses to guess between them) and
/// sends JSON logs to stdout, filtered by `RUST_LOG` (default `info`).
pub fn init_process() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .try_init();
}

/// What the HTTP endpoints report for one component.
pub trait Endpoints: Send + Sync + 'static {
    /// The Prometheus/OpenMetrics text of `/metrics`.
    fn metrics(&self) -> String;
    /// `/readyz`: whether the component does its job (synced, connected).
    fn ready(&self) -> bool;
    /// `/healthz`: whether the process is alive and should not be
    /// restarted. Alive unless a component says otherwise.
    fn healthy(&self) -> bool {
        true
    }
}

fn respond(status: StatusCode, body: String, content_type: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

/// Answers one request.
fn route(path: &str, endpoints: &dyn Endpoints) -> Response<Full<Bytes>> {
    let text = "text/plain; charset=utf-8";
    match path {
        "/metrics" => respond(
            StatusCode::OK,
            endpoints.metrics(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/healthz" if endpoints.healthy() => respond(StatusCode::OK, "ok\n".into(), text),
        "/healthz" => respond(StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n".into(), text),
        "/readyz" if endpoints.ready() => respond(StatusCode::OK, "ready\n".into(), text),
        "/readyz" => respond(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into(), text),
        _ => respond(StatusCode::NOT_FOUND, "not found\n".into(), text),
    }
}

/// Serves the endpoints on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    endpoints: Arc<dyn Endpoints>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = route(req.uri().path(), endpoints.as_ref());
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Completes on SIGTERM (what the kubelet sends a pod being stopped) or
/// SIGINT. Both binaries stop on it instead of waiting out the grace period.
pub async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(bool);
    impl Endpoints for Fixed {
        fn metrics(&self) -> String {
            "# EOF\n".into()
        }
        fn ready(&self) -> bool {
            self.0
        }
    }

    #[test]
    fn routes_answer_by_state() {
        assert_eq!(route("/healthz", &Fixed(false)).status(), StatusCode::OK);
        assert_eq!(
            route("/readyz", &Fixed(false)).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(route("/readyz", &Fixed(true)).status(), StatusCode::OK);
        assert_eq!(route("/metrics", &Fixed(true)).status(), StatusCode::OK);
        assert_eq!(route("/nope", &Fixed(true)).status(), StatusCode::NOT_FOUND);
    }
}
