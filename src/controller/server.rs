//! The small HTTP server of the controller: `/metrics`, `/healthz`,
//! `/readyz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::Metrics;

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
fn route(path: &str, metrics: &Metrics, ready: &AtomicBool) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => respond(
            StatusCode::OK,
            metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/healthz" => respond(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" if ready.load(Ordering::Relaxed) => {
            respond(StatusCode::OK, "ready\n".into(), "text/plain")
        }
        "/readyz" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready\n".into(),
            "text/plain",
        ),
        _ => respond(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

/// Serves on `listener` until `shutdown` completes. `ready` answers
/// `/readyz` (the binary sets it once connected to the apiserver, leader
/// or standby, and clears it on shutdown).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
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
        let metrics = metrics.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = route(req.uri().path(), &metrics, &ready);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds `addr` (loopback or the pod's address).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let m = Metrics::default();
        let ready = AtomicBool::new(false);
        assert_eq!(route("/healthz", &m, &ready).status(), StatusCode::OK);
        assert_eq!(
            route("/readyz", &m, &ready).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        ready.store(true, Ordering::Relaxed);
        assert_eq!(route("/readyz", &m, &ready).status(), StatusCode::OK);
        assert_eq!(route("/metrics", &m, &ready).status(), StatusCode::OK);
        assert_eq!(route("/nope", &m, &ready).status(), StatusCode::NOT_FOUND);
    }
}
