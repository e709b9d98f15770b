//! `palisade`: the offline CLI. Prints the CRDs and validates policy files
//! without a cluster, with the same CEL rules the apiserver applies at
//! admission.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use palisade::cli;

/// Palisade's offline tools: nothing here talks to a cluster or to AWS.
#[derive(Parser)]
#[command(name = "palisade", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputArg {
    Summary,
    Rules,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (the YAML committed in crds/).
    Crd,
    /// Validate FirewallPolicy manifests (YAML, several documents per file
    /// allowed) with the CRD's admission rules, offline.
    Validate {
        /// Files or directories (their *.yaml) to check; `-` reads standard input.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print, offline, what policies do to one node: the Security Group
    /// permissions and the exact ipset / iptables-restore input.
    Render {
        /// A Node manifest (labels, InternalIP addresses); further Nodes in
        /// the file are the other nodes `nodeSelector` peers may match.
        #[arg(long)]
        node: PathBuf,
        /// Failsafe SSH sources the agent is given (`--admin-cidr`).
        #[arg(long = "admin-cidr", value_delimiter = ',')]
        admin_cidrs: Vec<ipnet::IpNet>,
        /// Control-plane/VPC CIDRs of the failsafe's cluster scope the agent
        /// is given (`--cluster-cidr`).
        #[arg(long = "cluster-cidr", value_delimiter = ',')]
        cluster_cidrs: Vec<ipnet::IpNet>,
        /// Render allows as ACCEPT, as an agent run with
        /// `--allow-verdict=accept` programs them (default: RETURN).
        #[arg(long)]
        accept: bool,
        /// `summary` (what is open, to whom, on which layer, and risks; the
        /// default on a terminal), `rules` (the summary, the Security Group
        /// permissions and the exact restore input; the default otherwise)
        /// or `json`.
        #[arg(long, short)]
        output: Option<OutputArg>,
        /// FirewallPolicy manifests.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Crd => palisade::api::crds_yaml()
            .map(|y| print!("{y}"))
            .map_err(cli::Error::from),
        Command::Validate { files } => cli::validate_files(&files, &mut std::io::stdout()),
        Command::Render {
            node,
            admin_cidrs,
            cluster_cidrs,
            accept,
            output,
            files,
        } => {
            use std::io::IsTerminal;
            let format = match output {
                Some(OutputArg::Summary) => cli::OutputFormat::Summary,
                Some(OutputArg::Rules) => cli::OutputFormat::Rules,
                Some(OutputArg::Json) => cli::OutputFormat::Json,
                None if std::io::stdout().is_terminal() => cli::OutputFormat::Summary,
                None => cli::OutputFormat::Rules,
            };
            let settings = cli::AgentSettings {
                admin_cidrs,
                cluster_cidrs,
                allow: if accept {
                    palisade::policy::AllowVerdict::Accept
                } else {
                    palisade::policy::AllowVerdict::Return
                },
            };
            cli::render_files(&node, &files, &settings, format, &mut std::io::stdout())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palisade: {e}");
            ExitCode::FAILURE
        }
    }
}
