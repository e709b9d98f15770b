//! `palisade`: the CLI. Offline, it prints the CRDs, validates policy files
//! with the same CEL rules the apiserver applies at admission, and renders
//! what policies do to a node; against a live cluster, read-only, `plan`
//! shows what manifests would change and `explain` why a packet passes or
//! not.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use palisade::cli;

/// Palisade's CLI: offline tools (crd, validate, render), and the read-only
/// `plan` and `explain` against a live cluster and AWS.
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
    /// Show what applying FirewallPolicy manifests would change on the live
    /// cluster (Security Group rules and attachments, node rules, effective
    /// exposure), without writing anything. Uses the kubeconfig and the
    /// standard AWS credential chain (read-only calls; AWS_ENDPOINT_URL_EC2
    /// overrides the endpoint).
    ///
    /// Exit codes: 0 success, 1 error; with --detailed-exitcode: 0 no
    /// change, 2 changes, 3 changes that widen what the whole of 0.0.0.0/0
    /// or ::/0 reaches on some node.
    Plan {
        /// Files or directories (their *.yaml) with FirewallPolicy manifests.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Exit 2 when something would change, 3 when exposure to the whole
        /// internet widens (0 when nothing changes).
        #[arg(long)]
        detailed_exitcode: bool,
        /// The VPC's CIDRs: exposure is also computed for the whole of
        /// each (besides 0.0.0.0/0 and ::/0), as the controller's
        /// `--vpc-cidr`.
        #[arg(long = "vpc-cidr", value_delimiter = ',')]
        scopes: Vec<ipnet::IpNet>,
        #[command(flatten)]
        live: LiveArgs,
    },
    /// Explain whether a packet reaches (--from) or leaves (--to) a node,
    /// on each layer, and which rule of which Security Group or policy
    /// decided, from the live cluster and EC2. Reads only.
    ///
    /// Exit codes: 0 it gets through both layers, 2 a layer drops it, 1 error.
    Explain {
        /// The node.
        #[arg(long)]
        node: String,
        /// Inbound: the source address.
        #[arg(long, conflicts_with = "to", required_unless_present = "to")]
        from: Option<std::net::IpAddr>,
        /// Outbound: the destination address.
        #[arg(long)]
        to: Option<std::net::IpAddr>,
        /// The traffic: PORT/tcp, PORT/udp, icmp/TYPE[/CODE],
        /// icmpv6/TYPE[/CODE] or proto/NUMBER.
        #[arg(long = "to-port", alias = "port")]
        to_port: String,
        #[command(flatten)]
        live: LiveArgs,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LiveOutput {
    Text,
    Json,
}

/// How `plan` and `explain` reach the cluster and what the agents are
/// told (give the agent's own values for exact failsafe verdicts).
#[derive(clap::Args)]
struct LiveArgs {
    /// AWS region (default: the SDK's chain, e.g. AWS_REGION).
    #[arg(long, env = "PALISADE_REGION")]
    region: Option<String>,
    /// The agent's failsafe SSH sources (`--admin-cidr`).
    #[arg(long = "admin-cidr", value_delimiter = ',')]
    admin_cidrs: Vec<ipnet::IpNet>,
    /// The agent's cluster failsafe CIDRs (`--cluster-cidr`).
    #[arg(long = "cluster-cidr", value_delimiter = ',')]
    cluster_cidrs: Vec<ipnet::IpNet>,
    /// The agent's failsafe file (`--failsafe-file`).
    #[arg(long)]
    failsafe_file: Option<PathBuf>,
    /// The agent's extra API server addresses (`--api-server-address`).
    #[arg(long = "api-server-address", value_delimiter = ',')]
    api_servers: Vec<std::net::IpAddr>,
    /// The node's nameservers (its resolv.conf).
    #[arg(long = "nameserver", value_delimiter = ',')]
    nameservers: Vec<std::net::IpAddr>,
    /// The agents run with `--allow-verdict=accept`.
    #[arg(long)]
    accept: bool,
    /// `text` (the default) or `json`.
    #[arg(long, short, default_value = "text")]
    output: LiveOutput,
}

impl LiveArgs {
    fn settings(&self) -> Result<cli::NodeSettings, cli::Error> {
        let mut failsafe = match &self.failsafe_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| cli::Error::Read {
                    path: path.clone(),
                    source,
                })?;
                serde_yaml::from_str(&text)?
            }
            None => palisade::policy::Failsafe::default(),
        };
        failsafe
            .admin_cidrs
            .extend(self.admin_cidrs.iter().copied());
        failsafe
            .cluster_cidrs
            .extend(self.cluster_cidrs.iter().copied());
        failsafe
            .validate()
            .map_err(|e| cli::Error::Render(e.to_string()))?;
        Ok(cli::NodeSettings {
            failsafe,
            allow: if self.accept {
                palisade::policy::AllowVerdict::Accept
            } else {
                palisade::policy::AllowVerdict::Return
            },
            api_servers: self.api_servers.clone(),
            nameservers: self.nameservers.clone(),
        })
    }

    /// Runs `f` with a Kubernetes client and a read-only EC2 client.
    fn run<T>(
        &self,
        f: impl AsyncFnOnce(&kube::Client, &palisade::cloud::AwsEc2) -> Result<T, cli::Error>,
    ) -> Result<T, cli::Error> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(cli::Error::Write)?;
        // kube's TLS needs a process-wide crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        rt.block_on(async {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| cli::Error::Live(format!("connecting to the Kubernetes API: {e}")))?;
            let ec2 = palisade::cloud::AwsEc2::from_env(
                self.region.clone(),
                palisade::cloud::RetryPolicy::default(),
            )
            .await;
            f(&client, &ec2).await
        })
    }
}

/// Exit code of a run whose result is an exit code.
fn coded(result: Result<u8, cli::Error>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("palisade: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Plan {
            files,
            detailed_exitcode,
            scopes,
            live,
        } => {
            return coded(live.settings().and_then(|node| {
                let settings = cli::plan::PlanSettings {
                    node,
                    extra_scopes: scopes,
                };
                live.run(async |client, ec2| {
                    let o = cli::plan_live(
                        client,
                        ec2,
                        &files,
                        &settings,
                        live.output == LiveOutput::Json,
                        &mut std::io::stdout(),
                    )
                    .await?;
                    Ok(match (detailed_exitcode, o.changes, o.internet_widened) {
                        (false, _, _) | (true, false, _) => 0,
                        (true, true, false) => 2,
                        (true, true, true) => 3,
                    })
                })
            }));
        }
        Command::Explain {
            node,
            from,
            to,
            to_port,
            live,
        } => {
            let question = cli::explain::parse_traffic(&to_port)
                .map_err(cli::Error::Render)
                .and_then(|protocol| {
                    let (direction, peer) = match (from, to) {
                        (Some(a), None) => (palisade::policy::Direction::Ingress, a),
                        (None, Some(a)) => (palisade::policy::Direction::Egress, a),
                        _ => {
                            return Err(cli::Error::Render(
                                "give exactly one of --from (inbound) and --to (outbound)".into(),
                            ));
                        }
                    };
                    Ok(cli::explain::Question {
                        node,
                        direction,
                        peer,
                        protocol,
                    })
                });
            return coded(question.and_then(|q| {
                let settings = live.settings()?;
                live.run(async |client, ec2| {
                    let reaches = cli::explain_live(
                        client,
                        ec2,
                        &q,
                        &settings,
                        live.output == LiveOutput::Json,
                        &mut std::io::stdout(),
                    )
                    .await?;
                    Ok(if reaches { 0 } else { 2 })
                })
            }));
        }
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
