//! `palisade-agent`: the node agent (a DaemonSet pod, hostNetwork,
//! NET_ADMIN/NET_RAW). `run` (the default) programs the node's iptables
//! from the FirewallPolicies selecting it; `cleanup` removes everything
//! Palisade wrote on the node, for uninstall.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use palisade::agent::{self, AgentConfig};
use palisade::node::backend::Backend;
use palisade::policy::Failsafe;
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
    /// Re-read and repair drift at least this often, in seconds.
    #[arg(long, env = "PALISADE_RESYNC_SECONDS", default_value_t = 10.0)]
    resync_seconds: f64,
    /// CIDRs always allowed to reach SSH (repeat or comma-separate).
    #[arg(
        long = "admin-cidr",
        env = "PALISADE_ADMIN_CIDRS",
        value_delimiter = ','
    )]
    admin_cidrs: Vec<IpNet>,
    /// A YAML/JSON file with the whole failsafe list (see `Failsafe`);
    /// `--admin-cidr` adds to its adminCidrs.
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
    let config = AgentConfig {
        node_name,
        resync: Duration::from_secs_f64(args.resync_seconds.max(0.1)),
        failsafe: failsafe(&args)?,
        metrics_addr,
        backend: args.backend.map(Backend::from),
        nft_monitor: !args.no_nft_monitor,
    };
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("connecting to the API server: {e}"))?;
    agent::run(client, config).await.map_err(|e| e.to_string())
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
