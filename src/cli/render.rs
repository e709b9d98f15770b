//! `palisade render`: what a set of policies does to one node, offline —
//! a summary of what is open on each layer (the default on a terminal),
//! the Security Group permissions of every policy selecting it and the
//! exact `ipset restore` / `iptables-restore` / `ip6tables-restore` input
//! the agent would write on an empty node (`--output rules`), or all of it
//! as JSON for tools. What a reviewer reads in a GitOps pull request
//! before anything is applied.

use std::io::Write;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use super::{Error, read_documents};
use crate::api::FirewallPolicy;
use crate::node::render::render_ruleset;
use crate::policy::{AllowVerdict, Direction, Facts, compile_node, plan_cloud, validate};

/// What `render` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// What is open, to whom, on which layer, and the risks (the default on
    /// a terminal).
    Summary,
    /// The summary, the Security Group permissions and the exact restore
    /// input (the default elsewhere).
    #[default]
    Rules,
    /// Everything as one JSON document.
    Json,
}

/// What the agent is told besides the policies, for `render`.
#[derive(Debug, Clone, Default)]
pub struct AgentSettings {
    /// Failsafe SSH sources (`--admin-cidr`).
    pub admin_cidrs: Vec<IpNet>,
    /// The cluster failsafe scope's CIDRs (`--cluster-cidr`).
    pub cluster_cidrs: Vec<IpNet>,
    /// What allows do (`--allow-verdict`).
    pub allow: AllowVerdict,
}

/// Renders `policy_files` for the first Node of `node_file` (further Nodes
/// in that file are the other nodes `nodeSelector` peers may match, and
/// the cluster failsafe scope), with the agent's `settings`.
pub fn render_files(
    node_file: &Path,
    policy_files: &[PathBuf],
    settings: &AgentSettings,
    format: OutputFormat,
    out: &mut impl Write,
) -> Result<(), Error> {
    let mut nodes = Vec::new();
    for doc in read_documents(node_file)? {
        let node: Node = serde_json::from_value(doc.value)
            .map_err(|e| Error::Render(format!("{}: not a Node: {e}", doc.origin)))?;
        nodes.push(crate::policy::NodeFacts::from_node(&node));
    }
    let Some(target) = nodes.first().map(|n| n.name.clone()) else {
        return Err(Error::Render(format!(
            "{}: no Node manifest",
            node_file.display()
        )));
    };
    let mut valid = Vec::new();
    for file in policy_files {
        for doc in read_documents(file)? {
            let policy: FirewallPolicy = serde_json::from_value(doc.value)
                .map_err(|e| Error::Render(format!("{}: not a FirewallPolicy: {e}", doc.origin)))?;
            valid.push(
                validate(&policy).map_err(|e| Error::Render(format!("{}: {e}", doc.origin)))?,
            );
        }
    }
    let mut facts = Facts {
        nodes: nodes.into(),
        allow: settings.allow,
        ..Default::default()
    };
    let fs = &mut facts.failsafe;
    fs.admin_cidrs.extend(settings.admin_cidrs.iter().copied());
    fs.cluster_cidrs
        .extend(settings.cluster_cidrs.iter().copied());
    fs.validate().map_err(|e| Error::Render(e.to_string()))?;
    let ruleset =
        compile_node(&target, &valid, &facts).map_err(|e| Error::Render(e.to_string()))?;
    let selected: Vec<&crate::policy::ValidPolicy> = valid
        .iter()
        .filter(|p| ruleset.policies.iter().any(|d| d.name == p.name()))
        .collect();
    if selected.is_empty() {
        let labels: Vec<String> = facts
            .node(&target)
            .map(|n| n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect())
            .unwrap_or_default();
        return Err(Error::Render(format!(
            "no policy given selects node {target} (labels: {}): check the policies' nodeSelector",
            labels.join(", ")
        )));
    }
    if format == OutputFormat::Json {
        let plans: Vec<_> = selected
            .iter()
            .map(|p| plan_cloud(p, &facts).map_err(|e| e.to_string()))
            .collect();
        let doc = serde_json::json!({
            "node": target,
            "openings": super::summary::openings(&selected),
            "risks": super::summary::risks(&selected),
            "cloud": plans,
            "nodeLayer": ruleset,
        });
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| Error::Render(e.to_string()))?
        )?;
        // The document is whole either way; a failed cloud plan (in its
        // `cloud` array) fails the command, as in the other formats.
        let unplannable: Vec<String> = plans.iter().filter_map(|p| p.clone().err()).collect();
        return cloud_verdict(&unplannable);
    }
    write!(out, "{}", super::summary::summary_text(&target, &selected))?;
    // A cloud plan that cannot be applied (a quota exceeded, say) stops
    // nothing here: the node layer is shown all the same, and the failure
    // is explained with its numbers and makes the command fail at the end.
    let unplannable: Vec<String> = selected
        .iter()
        .filter_map(|p| plan_cloud(p, &facts).err().map(|e| e.to_string()))
        .collect();
    if format == OutputFormat::Summary {
        for e in &unplannable {
            writeln!(out, "CLOUD PLAN FAILS: {e}")?;
        }
        return cloud_verdict(&unplannable);
    }
    writeln!(out)?;
    if let Some(me) = facts.node(&target) {
        let labels: Vec<String> = me.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let addrs: Vec<String> = me.addresses.iter().map(ToString::to_string).collect();
        writeln!(out, "# Node {target}")?;
        writeln!(out, "#   labels: {}", labels.join(", "))?;
        writeln!(out, "#   addresses: {}", addrs.join(", "))?;
    }
    let selected: Vec<String> = ruleset
        .policies
        .iter()
        .map(|p| format!("{} ({:?}, hash {})", p.name, p.mode, p.hash))
        .collect();
    writeln!(
        out,
        "#   selected by: {}",
        if selected.is_empty() {
            "no policy".to_string()
        } else {
            selected.join(", ")
        }
    )?;
    writeln!(out, "\n## Cloud layer: Security Group permissions")?;
    for p in valid
        .iter()
        .filter(|p| ruleset.policies.iter().any(|d| d.name == p.name()))
    {
        let plan = match plan_cloud(p, &facts) {
            Ok(plan) => plan,
            Err(e) => {
                writeln!(
                    out,
                    "# policy {}: the cloud plan cannot be applied: {e}",
                    p.name()
                )?;
                continue;
            }
        };
        writeln!(out, "# policy {}", plan.policy)?;
        for direction in [Direction::Ingress, Direction::Egress] {
            match plan.permissions(direction) {
                None => writeln!(out, "{direction}: not managed (left as it is)")?,
                Some(perms) => {
                    writeln!(out, "{direction}:")?;
                    for perm in perms {
                        writeln!(out, "  {}  \"{}\"", perm.permission, perm.description)?;
                    }
                }
            }
        }
        for w in &plan.warnings {
            writeln!(out, "# warning: {w}")?;
        }
    }
    writeln!(
        out,
        "\n## Node layer: {} rules, {} sets ({} entries), ruleset hash {}",
        ruleset.rule_count(),
        ruleset.sets.len(),
        ruleset.set_entries(),
        ruleset.hash()
    )?;
    write!(out, "{}", render_ruleset(&ruleset))?;
    for w in &ruleset.warnings {
        writeln!(out, "# warning: {w}")?;
    }
    cloud_verdict(&unplannable)
}

fn cloud_verdict(unplannable: &[String]) -> Result<(), Error> {
    if unplannable.is_empty() {
        Ok(())
    } else {
        Err(Error::Render(format!(
            "the cloud layer cannot be applied as planned (the controller would report the policy Stalled): {}",
            unplannable.join("; ")
        )))
    }
}
