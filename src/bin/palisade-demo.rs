//! `make demo`: Palisade end to end on the local environment — a real
//! etcd + kube-apiserver, the moto EC2 server, two simulated nodes (network
//! namespaces with Node objects and moto instances), the controller on the
//! host and an agent inside each node — printing what a person would look
//! at on a real cluster: the policy's status, the Security Group, each
//! node's iptables, and which flows get through.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::api::{Api, DeleteParams};
use palisade::api::{FirewallNode, FirewallPolicy, conditions};
use palisade::testenv::{Reach, SimHost, SimNet, SimNode, TestEnv};
use tokio::process::{Child, Command};

const NS: &str = "palisade-system";
const RELEASE: &str = "palisade";
const EXAMPLE: &str = include_str!("../../deploy/examples/web-server.yaml");
const INVALID: &str = include_str!("../../tests/fixtures/invalid/host-bits-ipv4.yaml");
/// The admin network of the agents' failsafe list.
const ADMIN: &str = "192.0.2.0/24";

fn step(title: &str) {
    println!("\n=== {title}");
}

/// A sibling binary of this one (`cargo build --bins` builds them together).
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .map(|d| d.join(name))
        .context("locating the binaries")?;
    if !path.exists() {
        bail!(
            "{} not found: build with `cargo build --features testenv --bins`",
            path.display()
        );
    }
    Ok(path)
}

fn log_file(env: &TestEnv, name: &str) -> Result<std::fs::File> {
    Ok(std::fs::File::create(
        env.dir().join(format!("{name}.log")),
    )?)
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(start.elapsed())
}

fn print_command(host: &SimHost, args: &[&str]) -> Result<()> {
    let out = host.exec(args)?;
    for line in out
        .lines()
        .filter(|l| l.contains("PAL") || l.starts_with('*') || l.starts_with("COMMIT"))
    {
        println!("  {line}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let started = Instant::now();
    step("Starting etcd, kube-apiserver and moto on loopback");
    let env =
        TestEnv::start().context("starting the local environment (did `make testbin` run?)")?;
    println!(
        "ready in {:.1}s; kubeconfig: {}",
        env.started_in().as_secs_f64(),
        env.kubeconfig_path().display()
    );
    let client = env.client().await?;

    step(
        "helm install charts/palisade (CRDs, RBAC, admission policies, controller, agent DaemonSet)",
    );
    env.helm_install(
        RELEASE,
        NS,
        &["clusterName=demo", &format!("agent.adminCidrs={{{ADMIN}}}")],
    )
    .await?;
    print!("{}", env.helm(&["list", "--namespace", NS])?);
    let crds = Api::<FirewallPolicy>::all(client.clone());
    wait_until(
        "the chart's CRDs to be served",
        Duration::from_secs(30),
        || {
            let crds = crds.clone();
            async move { crds.list(&Default::default()).await.is_ok() }
        },
    )
    .await?;

    step(
        "Simulated nodes (network namespaces + Node objects + moto instances) and two outside hosts",
    );
    let net = SimNet::new()?;
    let mut nodes = Vec::new();
    for name in ["demo-web-1", "demo-web-2"] {
        let node = SimNode::create(&env, &net, name, [("role", "web")]).await?;
        println!(
            "{name}: {} / {}  instance {}  eni {}",
            node.host().ipv4(),
            node.host().ipv6(),
            node.instance_id(),
            node.eni_id()
        );
        nodes.push(node);
    }
    let office = net.add_host("office")?;
    office.add_address("203.0.113.10/24".parse()?)?;
    let internet = net.add_host("internet")?;
    internet.add_address("198.51.100.7/24".parse()?)?;
    println!("office: 203.0.113.10 (the policy's SSH network); internet: 198.51.100.7");

    step(
        "Starting the controller (host) and an agent in each node, with the chart's service accounts",
    );
    // No kubelet runs the chart's pods here: the binaries run as processes
    // with the identities (and so the RBAC and admission policies) the
    // chart gives them; each agent's token is bound to a pod on its node.
    let mut processes: Vec<Child> = Vec::new();
    let controller_kubeconfig = env
        .service_account_kubeconfig(NS, &format!("{RELEASE}-controller"))
        .await?;
    processes.push(
        Command::new(sibling("palisade-controller")?)
            .envs(env.aws_env())
            .env("KUBECONFIG", &controller_kubeconfig)
            .env("POD_NAMESPACE", NS)
            .args([
                "--cluster-name",
                "demo",
                "--identity",
                "demo",
                "--metrics-address",
                "127.0.0.1:0",
            ])
            .stdout(log_file(&env, "controller")?)
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?,
    );
    for node in &nodes {
        let kubeconfig = env
            .agent_pod_kubeconfig(NS, &format!("{RELEASE}-agent"), node.name())
            .await?;
        processes.push(
            node.host()
                .tokio_command(sibling("palisade-agent")?)
                .env("KUBECONFIG", &kubeconfig)
                .env("NODE_NAME", node.name())
                .args(["--admin-cidr", ADMIN, "--metrics-address", "127.0.0.1:9901"])
                .stdout(log_file(&env, &format!("agent-{}", node.name()))?)
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()?,
        );
    }
    println!("logs in {}", env.dir().display());
    let mut listeners = Vec::new();
    for node in &nodes {
        for port in [22, 80, 443, 8080] {
            listeners.push(node.host().listen_tcp(port)?);
        }
    }

    step("A mistake is refused at admission, with what to write instead");
    let path = env.dir().join("invalid.yaml");
    std::fs::write(&path, INVALID)?;
    let out = env.kubectl()?.arg("apply").arg("-f").arg(&path).output()?;
    if out.status.success() {
        bail!("the apiserver accepted an invalid policy");
    }
    print!("{}", String::from_utf8_lossy(&out.stderr));

    step("Applying deploy/examples/web-server.yaml");
    let applied = Instant::now();
    env.apply_yaml(EXAMPLE).await?;
    let policies = Api::<FirewallPolicy>::all(client.clone());
    let ready = wait_until("the policy to be Ready", Duration::from_secs(60), || {
        let policies = policies.clone();
        async move {
            let Ok(p) = policies.get("web-server").await else {
                return false;
            };
            let generation = p.metadata.generation;
            p.status.is_some_and(|s| {
                s.observed_generation == generation
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == conditions::READY && c.status == "True")
            })
        }
    })
    .await;
    match ready {
        Ok(_) => println!(
            "Ready on both layers {:.1}s after apply",
            applied.elapsed().as_secs_f64()
        ),
        Err(e) => bail!("not Ready: {e} (logs in {})", env.dir().display()),
    }
    let out = env
        .kubectl()?
        .args(["get", "firewallpolicies,firewallnodes", "-o", "wide"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step("The cloud layer: the Security Group in moto");
    let policy = policies.get("web-server").await?;
    let status = policy.status.unwrap_or_default();
    if let Some(sg) = &status.security_group {
        println!(
            "{} (vpc {:?}, owned: {}), attached to {:?}",
            sg.id, sg.vpc_id, sg.owned, sg.attached_sample
        );
        let rules = env
            .ec2_client()
            .describe_security_group_rules()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("group-id")
                    .values(&sg.id)
                    .build(),
            )
            .send()
            .await?;
        let mut lines: Vec<String> = rules
            .security_group_rules()
            .iter()
            .map(|r| {
                let peer = r.cidr_ipv4().or(r.cidr_ipv6()).unwrap_or("-");
                let dir = if r.is_egress() == Some(true) {
                    "egress "
                } else {
                    "ingress"
                };
                format!(
                    "  {dir} {:>4} {:>5}-{:<5} {:<16} {}",
                    r.ip_protocol().unwrap_or("?"),
                    r.from_port().unwrap_or(-1),
                    r.to_port().unwrap_or(-1),
                    peer,
                    r.description().unwrap_or("")
                )
            })
            .collect();
        lines.sort();
        println!("{}", lines.join("\n"));
    }
    for w in &status.warnings {
        println!("warning: {w}");
    }

    step("The node layer: each node's iptables (Palisade's chains)");
    for node in &nodes {
        println!("--- {} (iptables-nft-save -t filter)", node.name());
        print_command(node.host(), &["iptables-nft-save", "-t", "filter"])?;
    }

    step(
        "Traffic check (node layer, real packets; moto does not filter packets, so the Security Group is shown above)",
    );
    let target = &nodes[0];
    println!(
        "to {} ({}):        22/ssh   80/http  443/https  8080",
        target.name(),
        target.host().ipv4()
    );
    for (who, host, source) in [
        ("office", &office, "203.0.113.10"),
        ("internet", &internet, "198.51.100.7"),
    ] {
        let mut row = format!("from {who:<9} {source:<13}");
        for port in [22, 80, 443, 8080] {
            let to = std::net::SocketAddr::new(target.host().ipv4().into(), port);
            let reach = host.probe_tcp_from(source.parse()?, to, Duration::from_millis(700))?;
            row.push_str(if reach == Reach::Open {
                "  allowed"
            } else {
                "  blocked"
            });
        }
        println!("{row}");
    }

    step("palisade explain: one packet, both layers, from the live state (read-only)");
    let cli = |args: &[&str]| -> Result<()> {
        let mut cmd =
            std::process::Command::new(std::env::current_exe()?.with_file_name("palisade"));
        cmd.env("KUBECONFIG", env.kubeconfig_path())
            .env("AWS_ENDPOINT_URL_EC2", env.ec2_endpoint());
        for (k, v) in env.aws_env() {
            cmd.env(k, v);
        }
        let out = cmd.args(args).output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        println!("(exit {})", out.status.code().unwrap_or(-1));
        Ok(())
    };
    for source in ["198.51.100.7", "203.0.113.10"] {
        cli(&[
            "explain",
            "--node",
            target.name(),
            "--from",
            source,
            "--to-port",
            "22/tcp",
        ])?;
    }
    step("palisade plan: what a change to the policy would do, before it is applied (read-only)");
    let example = std::fs::read_to_string("deploy/examples/web-server.yaml")?;
    let changed = example.replace(
        "    - name: ssh-office",
        "    - name: admin-ui\n      protocol: TCP\n      ports: [{port: 8080}]\n      peers:\n        - cidr: 0.0.0.0/0\n    - name: ssh-office",
    );
    let manifest =
        std::env::temp_dir().join(format!("palisade-demo-plan-{}.yaml", std::process::id()));
    std::fs::write(&manifest, changed)?;
    let planned = cli(&[
        "plan",
        "-f",
        &manifest.to_string_lossy(),
        "--detailed-exitcode",
    ]);
    let _ = std::fs::remove_file(&manifest);
    planned?;

    step("Deleting the policy: agents remove their rules, the controller deletes the group");
    policies
        .delete("web-server", &DeleteParams::default())
        .await?;
    let gone = wait_until("the policy to be gone", Duration::from_secs(60), || {
        let policies = policies.clone();
        async move { matches!(policies.get_opt("web-server").await, Ok(None)) }
    })
    .await;
    println!("policy gone after {:.1}s", gone?.as_secs_f64());
    let fwn = Api::<FirewallNode>::all(client.clone())
        .list(&Default::default())
        .await?;
    for n in fwn.items {
        let s = n.status.unwrap_or_default();
        println!(
            "{}: {} policies, {} rules",
            n.metadata.name.unwrap_or_default(),
            s.policy_count,
            s.rule_count
        );
    }

    // The local environment runs no pods (its nodes are simulated), so
    // the chart's pre-delete hook Job, which deletes remaining policies on
    // a real cluster, cannot run here; the policy was deleted above.
    step("helm uninstall (--no-hooks: the local environment runs no Jobs)");
    print!(
        "{}",
        env.helm(&["uninstall", RELEASE, "--namespace", NS, "--no-hooks"])?
    );

    step("Tearing down");
    drop(processes);
    drop(listeners);
    for node in nodes {
        node.delete().await?;
    }
    drop((office, internet, net));
    let dir: &Path = env.dir();
    println!("(component logs were in {})", dir.display());
    drop(env);
    println!("demo finished in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
