//! `palisade-controller`: reconciles every FirewallPolicy into an AWS
//! Security Group. Leader-elected, JSON logs, `/metrics`, `/healthz`,
//! `/readyz`; stops gracefully on SIGTERM.
//!
//! Kubernetes credentials: in-cluster or `KUBECONFIG`. AWS: the SDK's
//! standard chain (IRSA, EKS Pod Identity, instance profile, environment;
//! `AWS_ENDPOINT_URL_EC2` overrides the endpoint).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use palisade::cloud::{AwsEc2, RetryPolicy};
use palisade::controller::leader::{LeaderElector, LeaseSettings};
use palisade::controller::metrics::ControllerEndpoints;
use palisade::controller::{self, Config, Metrics};
use palisade::policy::SgQuota;
use palisade::removal::{Owner, Verdict, Workload};
use palisade::telemetry;

/// Reconciles FirewallPolicies into AWS Security Groups.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Cluster name, written into the tags of every Security Group created.
    #[arg(long, env = "PALISADE_CLUSTER_NAME", default_value = "default")]
    cluster_name: String,
    /// AWS region (default: the SDK's chain, e.g. AWS_REGION).
    #[arg(long, env = "PALISADE_REGION")]
    region: Option<String>,
    /// Seconds between full reads of each policy's group (drift repair).
    #[arg(long, env = "PALISADE_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Seconds before a stalled policy is looked at again without a change.
    #[arg(long, env = "PALISADE_STALLED_RETRY_SECONDS", default_value_t = 1800)]
    stalled_retry_seconds: u64,
    /// Policies reconciled at once.
    #[arg(long, env = "PALISADE_CONCURRENCY", default_value_t = 4)]
    concurrency: u16,
    /// Security Group rules per direction and family the account allows.
    #[arg(long, env = "PALISADE_SG_RULES_PER_DIRECTION", default_value_t = 60)]
    sg_rules_per_direction: u32,
    /// Security Groups per network interface the account allows (AWS's
    /// default 5): a node that cannot take one more is reported, not tried.
    #[arg(long, env = "PALISADE_GROUPS_PER_INTERFACE", default_value_t = 5)]
    groups_per_interface: u32,
    /// The VPC's CIDRs: each node's and policy's exposure is reported from
    /// them as well as from anywhere (comma-separated).
    #[arg(long = "vpc-cidr", env = "PALISADE_VPC_CIDRS", value_delimiter = ',')]
    vpc_cidrs: Vec<ipnet::IpNet>,
    /// Only reconcile policies with these labels (`k=v,...`).
    #[arg(long, env = "PALISADE_POLICY_SELECTOR")]
    policy_selector: Option<String>,
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    #[arg(long, env = "PALISADE_METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    metrics_address: SocketAddr,
    /// Elect a leader among replicas through a Lease.
    #[arg(long, env = "PALISADE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the Lease.
    #[arg(
        long,
        env = "PALISADE_LEASE_NAME",
        default_value = "palisade-controller"
    )]
    lease_name: String,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "palisade-system")]
    lease_namespace: String,
    /// This replica's identity in the Lease and in Events.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Instead of reconciling: delete every FirewallPolicy, wait until the
    /// controller and the agents have released them (Security Groups
    /// deleted, node rules removed), then exit. The chart's pre-delete hook
    /// runs this, so `helm uninstall` leaves no node firewalled.
    #[arg(long)]
    uninstall: bool,
    /// How long `--uninstall` waits for the policies to go.
    #[arg(long, default_value_t = 300)]
    uninstall_timeout_seconds: u64,
    /// The controller's own Deployment, NAMESPACE/NAME (the chart sets
    /// it). On SIGTERM the leader reads it: deleted or being deleted (an
    /// uninstall or GitOps prune that ran no hook), it releases every
    /// policy first (their Security Groups deleted, finalizers removed);
    /// still there (a restart, a rollout), everything stays. Unset: always
    /// stays.
    #[arg(long, env = "PALISADE_DEPLOYMENT")]
    deployment: Option<String>,
    /// How long that release may spend on EC2 before it reports what it
    /// left (keep it under the pod's termination grace period).
    #[arg(long, env = "PALISADE_RELEASE_TIMEOUT_SECONDS", default_value_t = 20)]
    release_timeout_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_process();
    let args = Args::parse();
    if args.uninstall {
        return uninstall(Duration::from_secs(args.uninstall_timeout_seconds)).await;
    }
    // The cluster name scopes every group the controller creates, finds and
    // deletes (and the IAM policy's conditions): an empty one is refused
    // rather than guessed.
    if args.cluster_name.trim().is_empty() {
        anyhow::bail!(
            "--cluster-name (PALISADE_CLUSTER_NAME, the chart's clusterName) is empty: set it to the name the IAM policy was rendered with"
        );
    }

    let identity = args.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| format!("palisade-controller-{}", std::process::id()))
    });
    let deployment = args
        .deployment
        .as_deref()
        .map(str::parse::<Workload>)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--deployment {e}"))?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let owner = deployment.map(|w| Owner::<Deployment>::follow(client.clone(), w));
    let metrics = Arc::new(Metrics::default());
    let ec2 = AwsEc2::from_env(args.region.clone(), RetryPolicy::default())
        .await
        .with_observer(metrics.ec2_observer());
    let ready = Arc::new(AtomicBool::new(false));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopping = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    tokio::spawn(async move {
        telemetry::terminated().await;
        tracing::info!("SIGTERM: shutting down");
        let _ = stop_tx.send(true);
    });

    let listener = tokio::net::TcpListener::bind(args.metrics_address)
        .await
        .with_context(|| format!("binding {}", args.metrics_address))?;
    let endpoints = ControllerEndpoints {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    tokio::spawn(telemetry::serve(
        listener,
        Arc::new(endpoints),
        stopping.clone()(),
    ));

    let elector = args.leader_election.then(|| {
        LeaderElector::new(
            client.clone(),
            LeaseSettings {
                name: args.lease_name.clone(),
                namespace: args.lease_namespace.clone(),
                identity: identity.clone(),
                lease_duration: Duration::from_secs(15),
                renew_every: Duration::from_secs(5),
            },
        )
    });
    // Ready once connected: a standby replica waiting for the lease is
    // healthy too (it must not block a rolling update).
    ready.store(true, Ordering::Relaxed);
    if let Some(elector) = &elector {
        tokio::select! {
            _ = elector.acquire() => {},
            _ = stopping.clone()() => return Ok(()),
        }
    }

    let config = Config {
        cluster_name: args.cluster_name.clone(),
        resync: Duration::from_secs(args.resync_seconds.max(1)),
        stalled_retry: Duration::from_secs(args.stalled_retry_seconds.max(1)),
        concurrency: args.concurrency.max(1),
        quota: SgQuota {
            rules_per_direction: args.sg_rules_per_direction,
            groups_per_interface: args.groups_per_interface,
        },
        policy_selector: args.policy_selector.clone(),
        instance: Some(identity),
        vpc_cidrs: args.vpc_cidrs.clone(),
    };
    let ctx = controller::context(client, Arc::new(ec2), config, metrics);
    let release_ctx = ctx.clone();

    let lost = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    {
        let elector = elector.clone();
        let lost = lost.clone();
        let stop = stopping.clone()();
        tokio::spawn(async move {
            match elector {
                Some(elector) => tokio::select! {
                    _ = stop => {},
                    _ = elector.hold() => lost.store(true, Ordering::Relaxed),
                },
                None => stop.await,
            }
            let _ = done_tx.send(());
        });
    }
    controller::run(ctx, async move {
        let _ = done_rx.await;
    })
    .await;
    ready.store(false, Ordering::Relaxed);
    // Still the leader, stopped by SIGTERM: if the Deployment is going, no
    // controller will finish the policies' deletion; release them now.
    if !lost.load(Ordering::Relaxed)
        && let Some(owner) = &owner
    {
        match owner.decide().await {
            Verdict::Stays => {
                tracing::info!(deployment = %owner.workload(), "the Deployment stays (a restart or rollout); Security Groups and finalizers stay");
            }
            Verdict::Unknown(why) => {
                tracing::warn!(%why, "cannot tell whether the Deployment is being deleted: Security Groups and finalizers stay; if the release was deleted, see the README, \"Removing Palisade\"");
            }
            Verdict::Removed(why) => {
                tracing::info!(%why, "the Deployment is being deleted: releasing every policy");
                let done = controller::release::release(
                    release_ctx,
                    Duration::from_secs(args.release_timeout_seconds),
                )
                .await;
                tracing::info!(
                    released = ?done.released,
                    left = ?done.left,
                    held = ?done.held,
                    "release done"
                );
            }
        }
    }
    if let Some(elector) = &elector {
        elector.release().await;
    }
    if lost.load(Ordering::Relaxed) {
        anyhow::bail!("leadership lost; exiting so a fresh replica can campaign");
    }
    tracing::info!("stopped");
    Ok(())
}

/// `--uninstall`: deletes every FirewallPolicy and waits until all are gone.
async fn uninstall(timeout: Duration) -> anyhow::Result<()> {
    use kube::api::{Api, DeleteParams, ListParams};
    use palisade::api::FirewallPolicy;

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let policies: Api<FirewallPolicy> = Api::all(client);
    let names = |list: kube::core::ObjectList<FirewallPolicy>| -> Vec<String> {
        list.items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect()
    };
    let found = names(
        policies
            .list(&ListParams::default())
            .await
            .context("listing FirewallPolicies")?,
    );
    for name in &found {
        match policies.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("deleting FirewallPolicy {name}")),
        }
    }
    tracing::info!(
        count = found.len(),
        "uninstall: deleted every FirewallPolicy; waiting for the controller and agents to release them"
    );
    let started = std::time::Instant::now();
    loop {
        let left = names(
            policies
                .list(&ListParams::default())
                .await
                .context("listing FirewallPolicies")?,
        );
        if left.is_empty() {
            tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                "uninstall: no FirewallPolicy left"
            );
            return Ok(());
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "uninstall: {} FirewallPolicies still held by their finalizers after {}s: {}. \
                 The controller and the agents must be running to release them (Security Groups, \
                 node rules); nothing was uninstalled. Fix that and retry, or remove the rules \
                 with `palisade-agent cleanup` on each node and the finalizers by hand.",
                left.len(),
                timeout.as_secs(),
                left.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
