//! Test environment: the real parts Palisade runs against, on one machine.
//!
//! - [`TestEnv`]: etcd + kube-apiserver (RBAC on, client-cert admin, generated
//!   CA, service-account issuer) and the moto EC2 server, each on a random free
//!   loopback port, with a kubeconfig on disk and fresh clients on demand.
//!   [`TestEnv::shared`] is the one instance every test of a test binary uses.
//! - [`SimNet`] / [`SimHost`]: simulated hosts, each a network namespace on a
//!   bridge in a private "fabric" namespace, with documentation-range IPv4 and
//!   IPv6 addresses; TCP/UDP echo listeners and reachability probes.
//! - [`SimNode`]: a [`SimHost`] that is also a Kubernetes `Node` backed by a
//!   moto EC2 instance (`spec.providerID`, primary ENI).
//!
//! # Contract
//!
//! - Nothing here touches the root network namespace beyond loopback: hosts
//!   live in namespaces this module creates, and only their addresses (and
//!   127.0.0.1) are ever a network target.
//! - Nothing outlives the test process: every component and namespace is
//!   registered with a watchdog (see [`reaper`]) that kills and deletes them
//!   when the process is gone, however it ended. Leftovers of a run that was
//!   killed harder than that (the watchdog itself `SIGKILL`ed) are swept at
//!   the next start.
//! - Binaries come from `PALISADE_TESTBIN` (default
//!   `${XDG_CACHE_HOME:-$HOME/.cache}/palisade/bin`) and `PALISADE_MOTO`
//!   (default `…/palisade/venv/bin/moto_server`); `make testbin` builds them.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), palisade::testenv::Error> {
//! use palisade::testenv::{SimNet, SimNode, TestEnv};
//! use std::time::Duration;
//!
//! let env = TestEnv::shared()?;
//! env.install_crds(include_str!("../../crds/palisade.dev.yaml")).await?;
//! let net = SimNet::new()?;
//! let a = SimNode::create(env, &net, "demo-a", [("role", "web")]).await?;
//! let b = SimNode::create(env, &net, "demo-b", [("role", "db")]).await?;
//! let _echo = b.host().listen_tcp(5432)?;
//! let reach = a.host().probe_tcp((b.host().ipv6(), 5432), Duration::from_millis(500))?;
//! assert!(reach.is_open());
//! # Ok(()) }
//! ```

mod cloud;
mod control_plane;
mod dataplane_node;
mod env;
pub mod fault_proxy;
pub mod gitops;
mod install;
mod kubelet;
mod manifests;
mod net;
mod netns;
mod node;
mod pki;
mod process;
pub mod reaper;
pub mod reports;
pub mod zero_gap;

pub use cloud::{AVAILABILITY_ZONE, SimCloud, VPC_CIDR};
pub use dataplane_node::{DataplaneNode, FollowedMonitor};
pub use env::{AWS_REGION, StartOptions, TestEnv, aws_ec2_for, client_from_kubeconfig};
pub use install::chart_dir;
pub use kubelet::KubeletNode;
pub use net::{EchoListener, Reach, SimHost, SimNet};
pub use node::SimNode;
pub use process::testbin;

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while building or using the test environment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A test binary is not where it is looked for.
    #[error(
        "{what} not found at {path} (set by {var}): run `make testbin` \
         (or `bash hack/testbin.sh`) to build and cache the test binaries"
    )]
    MissingBinary {
        /// Which component.
        what: String,
        /// Where it was looked for.
        path: PathBuf,
        /// The environment variable that overrides the location.
        var: &'static str,
    },
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A component did not come up.
    #[error("{component} did not start: {reason}\n--- last lines of {} ---\n{tail}", log.display())]
    ComponentStart {
        /// Which component.
        component: String,
        /// Why it is considered failed.
        reason: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// Generating a key or certificate failed.
    #[error("generating {what}: {source}")]
    Pki {
        /// Which key or certificate.
        what: String,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// A Kubernetes API call failed.
    #[error("{context}: {source}")]
    Kube {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: kube::Error,
    },
    /// A kubeconfig could not be read or turned into a client config.
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// An EC2 (moto) call failed.
    #[error("EC2 {operation}: {message}")]
    Ec2 {
        /// The EC2 operation.
        operation: &'static str,
        /// The error as the SDK reports it.
        message: String,
    },
    /// An external command (`ip`, …) failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its standard error.
        stderr: String,
    },
    /// A manifest could not be parsed or applied.
    #[error("manifest: {0}")]
    Manifest(String),
    /// A wait ran out of time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        after: Duration,
    },
    /// A name or argument is not usable.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The shared environment failed to start in an earlier call.
    #[error("the shared test environment failed to start: {0}")]
    SharedStartFailed(String),
}

/// The result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub(crate) fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let context = context.into();
        move |source| Error::Kube { context, source }
    }

    pub(crate) fn pki(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> Error {
        let what = what.into();
        move |source| Error::Pki { what, source }
    }

    pub(crate) fn ec2<E: std::fmt::Debug>(operation: &'static str) -> impl FnOnce(E) -> Error {
        // The SDK's Display is terse ("service error"); Debug carries the code.
        move |err| Error::Ec2 {
            operation,
            message: format!("{err:?}"),
        }
    }
}

/// Runs `fut` to completion on a fresh current-thread runtime in a scoped
/// thread, so synchronous code (start-up, `Drop`) can call async APIs without
/// belonging to — or blocking inside — any test's runtime.
pub(crate) fn block_on<F>(fut: F) -> Result<F::Output>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(Error::io("building a tokio runtime"))?;
                Ok(rt.block_on(fut))
            })
            .join()
            .unwrap_or_else(|payload| {
                Err(Error::Invalid(format!(
                    "helper thread panicked: {}",
                    panic_message(&payload)
                )))
            })
    })
}

/// The message of a caught panic.
pub(crate) fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// Both rustls back-ends are linked (kube uses ring, the AWS SDK aws-lc), so
/// rustls cannot pick one by itself: choose ring for the whole process, once.
pub(crate) fn install_crypto_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // Err means some other code installed one first, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
