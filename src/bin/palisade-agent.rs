//! `palisade-agent`: the node agent (a DaemonSet pod, hostNetwork,
//! NET_ADMIN/NET_RAW). `run` (the default) programs the node's iptables
//! from the FirewallPolicies selecting it; `cleanup` removes everything
//! Palisade wrote on the node, for uninstall. `run` does the same on
//! SIGTERM when its own DaemonSet is being deleted (see `--daemonset`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use k8s_openapi::api::apps::v1::DaemonSet;
use palisade::agent::{self, AgentConfig};
use palisade::node::backend::Backend;
use palisade::policy::{AllowVerdict, Failsafe};
use palisade::removal::{Owner, Verdict, Workload};
use tracing::error;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendArg {
    Nft,
    Legacy,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Nft => Backend::Nft,
            BackendArg::Legacy => Backend::Legacy,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AllowArg {
    /// Allows hand packets back to the host's own rules (default).
    Return,
    /// Allows accept outright: Palisade becomes the node's only firewall
    /// where an Enforce policy governs. Overrides the host's rules and
    /// kube-proxy's KUBE-FIREWALL for what a policy or the failsafe allows.
    Accept,
}

#[derive(Debug, Parser)]
#[command(name = "palisade-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Program this node's iptables from the policies selecting it (default).
    Run,
    /// Remove every hook, PALISADE-*/PAL-* chain and PAL-* set, and nothing else.
    Cleanup,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// This node's name (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Sync at least this often, in seconds (from the cached model of what
    /// was written: nothing is read or run unless something changed).
    #[arg(long, env = "PALISADE_RESYNC_SECONDS", default_value_t = 10.0)]
    resync_seconds: f64,
    /// Read everything back and repair drift at least this often, in
    /// seconds (on the nft backend, `nft monitor` events also verify at
    /// once; ipsets and the legacy backend rely on this period).
    #[arg(long, env = "PALISADE_VERIFY_SECONDS", default_value_t = 60.0)]
    verify_seconds: f64,
    /// CIDRs always allowed to reach SSH (repeat or comma-separate).
    #[arg(
        long = "admin-cidr",
        env = "PALISADE_ADMIN_CIDRS",
        value_delimiter = ','
    )]
    admin_cidrs: Vec<IpNet>,
    /// Control-plane and VPC CIDRs: with every node's address, who the
    /// cluster failsafe entries (kubelet, overlays, ...) admit (repeat or
    /// comma-separate).
    #[arg(
        long = "cluster-cidr",
        env = "PALISADE_CLUSTER_CIDRS",
        value_delimiter = ','
    )]
    cluster_cidrs: Vec<IpNet>,
    /// API server addresses the failsafe lets the node reach, besides the
    /// configured server and the `kubernetes` EndpointSlice's endpoints.
    #[arg(
        long = "api-server-address",
        env = "PALISADE_API_SERVER_ADDRESSES",
        value_delimiter = ','
    )]
    api_server_addresses: Vec<IpAddr>,
    /// The resolv.conf whose nameservers the failsafe lets the node reach.
    #[arg(long, env = "PALISADE_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// What an allow does: `return` to the host's own rules (default), or
    /// `accept` outright (Palisade as the node's only firewall).
    #[arg(
        long,
        env = "PALISADE_ALLOW_VERDICT",
        value_enum,
        default_value = "return"
    )]
    allow_verdict: AllowArg,
    /// How often the Audit policies' would-be drops are read, in seconds.
    #[arg(long, env = "PALISADE_AUDIT_REPORT_SECONDS", default_value_t = 60.0)]
    audit_report_seconds: f64,
    /// A YAML/JSON file with the whole failsafe list (see `Failsafe`);
    /// `--admin-cidr` and `--cluster-cidr` add to it.
    #[arg(long, env = "PALISADE_FAILSAFE_FILE")]
    failsafe_file: Option<PathBuf>,
    /// Address of /metrics and /healthz; "off" to disable.
    #[arg(long, env = "PALISADE_METRICS_ADDRESS", default_value = "0.0.0.0:9901")]
    metrics_address: String,
    /// Use this iptables backend instead of detecting it.
    #[arg(long, env = "PALISADE_BACKEND")]
    backend: Option<BackendArg>,
    /// Do not follow `nft monitor` (rely on the resync timer alone).
    #[arg(long)]
    no_nft_monitor: bool,
    /// The agent's own DaemonSet, NAMESPACE/NAME (the chart sets it). On
    /// SIGTERM the agent reads it: deleted or being deleted (an uninstall,
    /// a GitOps prune) and the agent removes every rule it wrote, as
    /// `cleanup` does; still there (a restart, a rolling update) and the
    /// rules stay in force. Unset: the rules always stay.
    #[arg(long, env = "PALISADE_DAEMONSET")]
    daemonset: Option<String>,
}

fn failsafe(args: &RunArgs) -> Result<Failsafe, String> {
    let mut fs = match &args.failsafe_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => Failsafe::default(),
    };
    fs.admin_cidrs.extend(args.admin_cidrs.iter().copied());
    fs.cluster_cidrs.extend(args.cluster_cidrs.iter().copied());
    fs.validate().map_err(|e| e.to_string())?;
    Ok(fs)
}

async fn run(args: RunArgs) -> Result<(), String> {
    let node_name = args
        .node_name
        .clone()
        .ok_or("NODE_NAME (or --node-name) is required")?;
    let metrics_addr = match args.metrics_address.as_str() {
        "off" => None,
        a => Some(
            a.parse::<SocketAddr>()
                .map_err(|e| format!("--metrics-address {a}: {e}"))?,
        ),
    };
    let kube_config = kube::Config::infer()
        .await
        .map_err(|e| format!("reading the Kubernetes client configuration: {e}"))?;
    let mut api_servers = args.api_server_addresses.clone();
    // The configured server and the in-cluster service address (the DNAT
    // target is the EndpointSlice's, which the agent watches).
    let host = kube_config.cluster_url.host().unwrap_or_default();
    api_servers.extend(host.trim_matches(['[', ']']).parse::<IpAddr>().ok());
    api_servers.extend(
        std::env::var("KUBERNETES_SERVICE_HOST")
            .ok()
            .and_then(|h| h.parse::<IpAddr>().ok()),
    );
    let nameservers = match std::fs::read_to_string(&args.resolv_conf) {
        Ok(text) => agent::nameservers(&text),
        Err(e) => {
            tracing::warn!(error = %e, path = %args.resolv_conf.display(), "no nameservers for the DNS failsafe");
            Vec::new()
        }
    };
    let config = AgentConfig {
        node_name,
        resync: Duration::from_secs_f64(args.resync_seconds.max(0.1)),
        verify: Duration::from_secs_f64(args.verify_seconds.max(0.1)),
        failsafe: failsafe(&args)?,
        metrics_addr,
        backend: args.backend.map(Backend::from),
        nft_monitor: !args.no_nft_monitor,
        api_servers,
        nameservers,
        allow: match args.allow_verdict {
            AllowArg::Return => AllowVerdict::Return,
            AllowArg::Accept => AllowVerdict::Accept,
        },
        audit_report: Duration::from_secs_f64(args.audit_report_seconds.max(1.0)),
    };
    let daemonset = args
        .daemonset
        .as_deref()
        .map(str::parse::<Workload>)
        .transpose()
        .map_err(|e| format!("--daemonset {e}"))?;
    let client = kube::Client::try_from(kube_config)
        .map_err(|e| format!("connecting to the API server: {e}"))?;
    let owner = daemonset.map(|w| Owner::<DaemonSet>::follow(client.clone(), w));
    let backend = config.backend;
    let node_name = config.node_name.clone();
    // SIGTERM stops the watches. A pod stopped or rolled leaves the node's
    // rules in place (they must outlive a restart); a pod stopped because
    // its DaemonSet is being deleted removes them, or the node would stay
    // firewalled with no agent to change it.
    tokio::select! {
        result = agent::run(client.clone(), config) => return result.map_err(|e| e.to_string()),
        _ = palisade::telemetry::terminated() => {}
    }
    let Some(owner) = owner else {
        tracing::info!("terminated: stopping; the node's rules stay in force (no --daemonset)");
        return Ok(());
    };
    match owner.decide().await {
        Verdict::Stays => {
            tracing::info!(daemonset = %owner.workload(), "terminated: the DaemonSet stays (a restart or rolling update); the node's rules stay in force");
            Ok(())
        }
        Verdict::Unknown(why) => {
            tracing::warn!(%why, "terminated: cannot tell whether the DaemonSet is being deleted, so the node's rules stay in force; if it was deleted, run `palisade-agent cleanup` on this node");
            Ok(())
        }
        Verdict::Removed(why) => {
            tracing::info!(%why, "terminated and the DaemonSet is being deleted: removing every rule Palisade wrote on this node");
            remove_rules(backend).await?;
            if let Err(e) = agent::report_removed(client, &node_name).await {
                // Expected when the pruner deletes the CRDs too.
                tracing::info!(error = %e, "could not mark the FirewallNode as enforcing nothing");
            }
            Ok(())
        }
    }
}

/// `cleanup`, repeated until it finds nothing: a sync that was in flight
/// when the signal came (its iptables-restore runs on a blocking thread
/// the signal does not stop) may still write once, after the first pass.
async fn remove_rules(backend: Option<Backend>) -> Result<(), String> {
    let mut removed = 0;
    for _ in 0..5 {
        let chains = tokio::task::spawn_blocking(move || agent::cleanup(backend))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        removed += chains;
        if chains == 0 {
            tracing::info!(chains = removed, "removed everything Palisade wrote");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(
        "Palisade's rules came back after five cleanups; run `palisade-agent cleanup` on this node"
            .into(),
    )
}

fn main() -> ExitCode {
    palisade::telemetry::init_process();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Cleanup) => agent::cleanup(cli.run.backend.map(Backend::from))
            .map(|chains| tracing::info!(chains, "removed everything Palisade wrote"))
            .map_err(|e| e.to_string()),
        Some(Command::Run) | None => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(run(cli.run)),
            Err(e) => Err(e.to_string()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "palisade-agent failed");
            ExitCode::FAILURE
        }
    }
}
