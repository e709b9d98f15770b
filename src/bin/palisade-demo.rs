//! `make demo`: Palisade end to end on the local environment — a real
//! etcd + kube-apiserver, the moto EC2 server and simulated nodes in network
//! namespaces — printing what a person would look at on a real cluster.
#![allow(clippy::print_stdout)]

use std::time::Instant;

use anyhow::{Context, Result, bail};
use kube::api::{Api, ListParams};
use palisade::api::FirewallPolicy;
use palisade::policy::{Facts, NodeFacts, compile_node, compile_policy, validate};
use palisade::testenv::{SimNet, SimNode, TestEnv};

const CRDS: &str = include_str!("../../crds/palisade.dev.yaml");
const EXAMPLE: &str = include_str!("../../deploy/examples/web-server.yaml");
const INVALID: &str = include_str!("../../tests/fixtures/invalid/host-bits-ipv4.yaml");

fn step(title: &str) {
    println!("\n=== {title}");
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

    step("Installing the CRDs");
    for name in env.install_crds(CRDS).await? {
        println!("established: {name}");
    }

    step("Creating two simulated nodes (network namespaces + Node objects + moto instances)");
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

    step("Applying deploy/examples/web-server.yaml");
    env.apply_yaml(EXAMPLE).await?;
    let out = env
        .kubectl()?
        .args(["get", "firewallpolicies", "-o", "wide"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step("A mistake is refused at admission, with what to write instead");
    let path = env.dir().join("invalid.yaml");
    std::fs::write(&path, INVALID)?;
    let out = env.kubectl()?.arg("apply").arg("-f").arg(&path).output()?;
    if out.status.success() {
        bail!("the apiserver accepted an invalid policy");
    }
    print!("{}", String::from_utf8_lossy(&out.stderr));

    step("What the policy compiles to (pure plan, as the controller and agents compute it)");
    let client = env.client().await?;
    let policies = Api::<FirewallPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let node_objects = Api::<k8s_openapi::api::core::v1::Node>::all(client)
        .list(&ListParams::default())
        .await?
        .items;
    let facts = Facts {
        nodes: node_objects.iter().map(NodeFacts::from_node).collect(),
        ..Facts::default()
    };
    for policy in &policies {
        let compiled = compile_policy(policy, &facts)?;
        println!(
            "policy {}: selects {:?}",
            compiled.policy.name(),
            compiled.selected_nodes
        );
        for (direction, perms) in [
            ("ingress", &compiled.cloud.ingress),
            ("egress", &compiled.cloud.egress),
        ] {
            for p in perms.iter().flatten() {
                println!("  SG {direction}: {}  ({})", p.permission, p.description);
            }
        }
    }
    let valid: Vec<_> = policies.iter().map(validate).collect::<Result<_, _>>()?;
    if let Some(node) = facts.nodes.first() {
        let ruleset = compile_node(&node.name, &valid, &facts)?;
        println!(
            "node {}: {} iptables/ip6tables rules, {} sets, hash {}",
            node.name,
            ruleset.rule_count(),
            ruleset.sets.len(),
            ruleset.hash()
        );
        for chain in &ruleset.ipv4.chains {
            println!("  {} ({} rules)", chain.name, chain.rules.len());
        }
    }

    step("Tearing down");
    for node in nodes {
        node.delete().await?;
    }
    drop(net);
    drop(env);
    println!("demo finished in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
