//! A fault-injecting HTTP proxy in front of the moto EC2 server.
//!
//! moto never throttles and never fails; real EC2 does both. Tests point the
//! code under test at [`FaultProxy::endpoint`] and choose, at any time, what
//! share of calls is answered with `RequestLimitExceeded` (HTTP 503, as EC2
//! sends it) or a bare 503, and how long each call is delayed. Every call is
//! recorded with its EC2 action and outcome, which is also how benchmarks
//! count EC2 calls per scenario.
//!
//! The proxy runs on its own thread and tokio runtime, so it outlives any
//! one `#[tokio::test]` runtime and can be shared by a whole test binary.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// What the proxy does to the calls it sees. The default forwards everything.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    /// Share of calls (0.0-1.0) answered with `RequestLimitExceeded`.
    pub throttle_ratio: f64,
    /// Share of calls (0.0-1.0) answered with a bare 503 Service Unavailable.
    pub unavailable_ratio: f64,
    /// Delay added before every call is answered.
    pub delay: Duration,
    /// Only calls whose EC2 action is listed get faults (all when empty).
    pub actions: Vec<String>,
    /// Seed of the fault dice, so a failing run can be replayed.
    pub seed: u64,
    /// Scripted errors, answered before any dice are rolled: the next
    /// `times` calls of `action` get this EC2 error code (e.g.
    /// `DependencyViolation` for `DeleteSecurityGroup` while an interface
    /// still holds the group, which moto never says).
    pub scripted: Vec<ScriptedError>,
}

/// An error the proxy answers a given number of times for one action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptedError {
    /// The EC2 action.
    pub action: String,
    /// The EC2 error code.
    pub code: String,
    /// How many calls still get it.
    pub times: u32,
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self {
            throttle_ratio: 0.0,
            unavailable_ratio: 0.0,
            delay: Duration::ZERO,
            actions: Vec::new(),
            seed: 1,
            scripted: Vec::new(),
        }
    }
}

/// What happened to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded to moto, which answered with this HTTP status.
    Forwarded(u16),
    /// Answered with `RequestLimitExceeded`.
    Throttled,
    /// Answered with 503 Service Unavailable.
    Unavailable,
    /// moto could not be reached.
    UpstreamError,
    /// Answered with a scripted EC2 error (HTTP 400).
    Scripted,
}

/// One call through the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The EC2 action (`DescribeSecurityGroups`, ...), or `?` if the body
    /// carried none.
    pub action: String,
    /// The longest list of values the call carried in one parameter: the
    /// values of one `Filter.N`, or the members of a list such as
    /// `InstanceId.N` (EC2 refuses more than 200 filter values).
    pub values: usize,
    /// What the proxy did.
    pub outcome: Outcome,
}

impl Call {
    /// Whether the action changes state in AWS (anything but Describe*/Get*).
    pub fn is_mutating(&self) -> bool {
        !(self.action.starts_with("Describe") || self.action.starts_with("Get"))
    }
}

#[derive(Debug)]
struct State {
    plan: FaultPlan,
    rng: fastrand::Rng,
    calls: Vec<Call>,
}

/// A running proxy. Dropping it stops it.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum FaultProxyError {
    /// Binding the listening socket or starting the runtime failed.
    #[error("starting the fault proxy: {0}")]
    Io(#[from] std::io::Error),
    /// The upstream URL is not usable.
    #[error("upstream {0:?} must be an http:// URL")]
    Upstream(String),
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave State inconsistent (every
    // update is a single push or assignment), so a poisoned lock is usable.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `upstream`
    /// (`http://127.0.0.1:PORT` of moto).
    pub fn start(upstream: &str) -> Result<Self, FaultProxyError> {
        let upstream: hyper::Uri = upstream
            .parse()
            .map_err(|_| FaultProxyError::Upstream(upstream.to_owned()))?;
        if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
            return Err(FaultProxyError::Upstream(upstream.to_string()));
        }
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            plan: FaultPlan::default(),
            rng: fastrand::Rng::with_seed(1),
            calls: Vec::new(),
        }));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let serve_state = state.clone();
        std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                runtime.block_on(serve(std_listener, upstream, serve_state, stop_rx));
            })?;
        Ok(Self {
            addr,
            state,
            stop: Some(stop_tx),
        })
    }

    /// The URL to give the code under test (`AWS_ENDPOINT_URL_EC2`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the fault plan; the dice are reseeded from `plan.seed`.
    pub fn set_plan(&self, plan: FaultPlan) {
        let mut s = lock(&self.state);
        s.rng = fastrand::Rng::with_seed(plan.seed);
        s.plan = plan;
    }

    /// Every call seen since the last [`FaultProxy::take_calls`].
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.state).calls.clone()
    }

    /// Returns the calls seen so far and starts a new record.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut lock(&self.state).calls)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    upstream: hyper::Uri,
    state: Arc<Mutex<State>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let (client, upstream, state) = (client.clone(), upstream.clone(), state.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                handle(req, client.clone(), upstream.clone(), state.clone())
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The longest value list in a Query-protocol body: `Filter.3.Value.17`
/// counts toward `Filter.3`; `InstanceId.5` toward `InstanceId`.
fn values_of(body: &[u8]) -> usize {
    let text = String::from_utf8_lossy(body);
    let mut lists: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for kv in text.split('&') {
        let key = kv.split('=').next().unwrap_or_default();
        let parts: Vec<&str> = key.split('.').collect();
        let list = match parts.as_slice() {
            ["Filter", n, "Value", _] => format!("Filter.{n}"),
            [name, index] if index.parse::<u32>().is_ok() => (*name).to_string(),
            _ => continue,
        };
        *lists.entry(list).or_default() += 1;
    }
    lists.into_values().max().unwrap_or(0)
}

/// The EC2 Query protocol carries the action as a form field of the body.
fn action_of(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .map(str::to_owned)
        .unwrap_or_else(|| "?".to_owned())
}

fn ec2_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>palisade-fault-proxy</RequestID></Response>"
    );
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

async fn handle(
    req: Request<Incoming>,
    client: Client<HttpConnector, Full<Bytes>>,
    upstream: hyper::Uri,
    state: Arc<Mutex<State>>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (mut parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let action = action_of(&body);
    let values = values_of(&body);
    let (delay, fault, scripted) = {
        let mut s = lock(&state);
        let scripted = s
            .plan
            .scripted
            .iter_mut()
            .find(|e| e.action == action && e.times > 0)
            .map(|e| {
                e.times -= 1;
                e.code.clone()
            });
        let applies = s.plan.actions.is_empty() || s.plan.actions.contains(&action);
        let roll = s.rng.f64();
        let fault = if !applies {
            None
        } else if roll < s.plan.throttle_ratio {
            Some(Outcome::Throttled)
        } else if roll < s.plan.throttle_ratio + s.plan.unavailable_ratio {
            Some(Outcome::Unavailable)
        } else {
            None
        };
        (s.plan.delay, fault, scripted)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let record = |outcome| {
        lock(&state).calls.push(Call {
            action: action.clone(),
            values,
            outcome,
        })
    };
    if let Some(code) = scripted {
        record(Outcome::Scripted);
        return Ok(ec2_error(
            StatusCode::BAD_REQUEST,
            &code,
            "scripted by the fault proxy",
        ));
    }
    match fault {
        Some(Outcome::Throttled) => {
            record(Outcome::Throttled);
            return Ok(ec2_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "RequestLimitExceeded",
                "Request limit exceeded.",
            ));
        }
        Some(_) => {
            record(Outcome::Unavailable);
            return Ok(ec2_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                "The service is unavailable.",
            ));
        }
        None => {}
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri = format!(
        "{}://{}{}",
        "http",
        upstream.authority().map(|a| a.as_str()).unwrap_or_default(),
        path
    );
    parts.uri = match uri.parse() {
        Ok(u) => u,
        Err(_) => {
            record(Outcome::UpstreamError);
            return Ok(ec2_error(
                StatusCode::BAD_GATEWAY,
                "ProxyError",
                "bad upstream URI",
            ));
        }
    };
    match client
        .request(Request::from_parts(parts, Full::new(body)))
        .await
    {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            record(Outcome::Forwarded(parts.status.as_u16()));
            Ok(Response::from_parts(parts, Full::new(body)))
        }
        Err(e) => {
            record(Outcome::UpstreamError);
            Ok(ec2_error(
                StatusCode::BAD_GATEWAY,
                "ProxyError",
                &e.to_string(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_is_read_from_the_form_body() {
        assert_eq!(
            action_of(b"Action=DescribeSecurityGroups&Version=2016-11-15"),
            "DescribeSecurityGroups"
        );
        assert_eq!(
            action_of(b"Version=2016-11-15&Action=AuthorizeSecurityGroupIngress"),
            "AuthorizeSecurityGroupIngress"
        );
        assert_eq!(action_of(b""), "?");
    }

    #[test]
    fn value_lists_are_measured() {
        assert_eq!(
            values_of(b"Action=DescribeInstances&Filter.1.Name=instance-id&Filter.1.Value.1=i-a&Filter.1.Value.2=i-b&Filter.2.Name=x&Filter.2.Value.1=y"),
            2
        );
        assert_eq!(
            values_of(
                b"Action=DescribeInstances&InstanceId.1=i-a&InstanceId.2=i-b&InstanceId.3=i-c"
            ),
            3
        );
        assert_eq!(values_of(b"Action=DescribeVpcs"), 0);
    }

    #[test]
    fn mutating_calls_are_told_apart() {
        let call = |a: &str| Call {
            action: a.into(),
            values: 0,
            outcome: Outcome::Forwarded(200),
        };
        assert!(!call("DescribeSecurityGroupRules").is_mutating());
        assert!(call("RevokeSecurityGroupIngress").is_mutating());
    }
}
