//! `palisade-agent`: the node agent (a DaemonSet pod, hostNetwork,
//! NET_ADMIN/NET_RAW). `run` (the default) programs the node's iptables
//! from the FirewallPolicies selecting it; `cleanup` removes everything
//! Palisade wrote on the node, for uninstall.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use palisade::agent::{self, AgentConfig};
use palisade::node::backend::Backend;
use palisade::policy::{AllowVerdict, Failsafe};
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
    let client = kube::Client::try_from(kube_config)
        .map_err(|e| format!("connecting to the API server: {e}"))?;
    // SIGTERM (a pod stopped, a rolling update) stops the watches and leaves
    // the node's rules in place: they must outlive a restart. `cleanup` is
    // the explicit removal.
    tokio::select! {
        result = agent::run(client, config) => result.map_err(|e| e.to_string()),
        _ = palisade::telemetry::terminated() => {
            tracing::info!("terminated: stopping; the node's rules stay in force");
            Ok(())
        }
    }
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
