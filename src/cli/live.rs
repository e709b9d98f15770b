//! What `plan` and `explain` read from a live cluster and account, and
//! nothing else: Kubernetes lists and EC2 `Describe*` calls only. Nothing
//! here writes anywhere (the IAM policy in `deploy/iam/cli-readonly-policy.json`
//! allows exactly these calls).
//!
//! Reads:
//! - Kubernetes: every Node, FirewallPolicy and FirewallPeerSlice, and the
//!   `kubernetes` EndpointSlice (the agent's `ApiServer` failsafe scope);
//! - EC2: the instances behind the nodes (`DescribeInstances`), every group
//!   on their primary interfaces and every group a policy names
//!   (`DescribeSecurityGroups`, `DescribeSecurityGroupRules`), and the
//!   addresses behind Security Group and prefix-list peers the cluster's
//!   status does not resolve already (`DescribeNetworkInterfaces`,
//!   `GetManagedPrefixListEntries`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use super::Error;
use crate::api::{FirewallPeerSlice, FirewallPolicy};
use crate::cloud::{Ec2, EniInfo, GroupInfo, InstanceInfo};
use crate::policy::{
    AllowVerdict, CurrentSgRule, Direction, Facts, Failsafe, NodeFacts, NodeRuleset, PeerRef,
    ValidPolicy, compile_node, validate,
};

/// What the agent is configured with besides the cluster's state: the
/// same flags as `palisade-agent` (`--admin-cidr`, `--cluster-cidr`,
/// `--failsafe-file`, `--allow-verdict`, `--api-server-address`) and the
/// node's nameservers. The CLI cannot read them off the node; give the
/// values of the chart (`agent.failsafe`) for exact failsafe verdicts.
#[derive(Debug, Clone, Default)]
pub struct NodeSettings {
    /// The failsafe list.
    pub failsafe: Failsafe,
    /// What allows do.
    pub allow: AllowVerdict,
    /// API server addresses besides the `kubernetes` EndpointSlice's.
    pub api_servers: Vec<IpAddr>,
    /// The node's nameservers.
    pub nameservers: Vec<IpAddr>,
}

/// A Security Group as read, with its rules.
#[derive(Debug, Clone, Default)]
pub struct LiveGroup {
    /// Id, name, VPC, tags.
    pub info: GroupInfo,
    /// Every rule, both directions.
    pub rules: Vec<CurrentSgRule>,
}

/// The cluster's and the cloud's state, as read once.
#[derive(Debug, Clone, Default)]
pub struct Live {
    /// Every node.
    pub nodes: Vec<NodeFacts>,
    /// Every policy (those being deleted included; see [`Live::active`]).
    pub policies: Vec<FirewallPolicy>,
    /// Node addresses the controller publishes per selector.
    pub node_peers: BTreeMap<String, Vec<IpAddr>>,
    /// The `kubernetes` EndpointSlice's addresses.
    pub api_endpoints: Vec<IpAddr>,
    /// Instances behind the nodes, by id.
    pub instances: BTreeMap<String, InstanceInfo>,
    /// Groups read, by id.
    pub groups: BTreeMap<String, LiveGroup>,
    /// The interfaces carrying a group, for the groups whose attachments
    /// `plan` looks at (`DescribeNetworkInterfaces`).
    pub carrying: BTreeMap<String, Vec<EniInfo>>,
    /// Security Group and prefix-list peers resolved from EC2 (those the
    /// policies' status did not resolve).
    pub references: Facts,
}

fn kube_err(what: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |e| Error::Live(format!("listing {what}: {e}"))
}

impl Live {
    /// Reads the cluster's state.
    pub async fn read_cluster(client: &Client) -> Result<Live, Error> {
        let lp = ListParams::default();
        let nodes = Api::<Node>::all(client.clone())
            .list(&lp)
            .await
            .map_err(kube_err("nodes"))?
            .items
            .iter()
            .map(NodeFacts::from_node)
            .collect();
        let policies = Api::<FirewallPolicy>::all(client.clone())
            .list(&lp)
            .await
            .map_err(kube_err("FirewallPolicies"))?
            .items;
        let slices: Vec<std::sync::Arc<FirewallPeerSlice>> =
            Api::<FirewallPeerSlice>::all(client.clone())
                .list(&lp)
                .await
                .map_err(kube_err("FirewallPeerSlices"))?
                .items
                .into_iter()
                .map(std::sync::Arc::new)
                .collect();
        let api_endpoints = Api::<EndpointSlice>::namespaced(client.clone(), "default")
            .list(&ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
            .await
            .map_err(kube_err("the kubernetes EndpointSlice"))?
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .flat_map(|e| e.addresses.iter())
            .filter_map(|a| a.parse().ok())
            .collect();
        Ok(Live {
            nodes,
            policies,
            node_peers: crate::agent::node_peers(&slices),
            api_endpoints,
            ..Default::default()
        })
    }

    /// Reads from EC2 the instances behind `nodes` (names; all nodes when
    /// `None`), every group on their primary interfaces, the groups in
    /// `extra_groups`, and the references of `policies` no status resolves.
    pub async fn read_cloud<E: Ec2>(
        &mut self,
        ec2: &E,
        nodes: Option<&[String]>,
        extra_groups: &[String],
        policies: &[ValidPolicy],
    ) -> Result<(), Error> {
        let ids: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| nodes.is_none_or(|want| want.contains(&n.name)))
            .filter_map(|n| n.instance_id().map(str::to_string))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !ids.is_empty() {
            for i in ec2.describe_instances(&ids).await? {
                self.instances.insert(i.id.clone(), i);
            }
        }
        let groups: BTreeSet<String> = self
            .instances
            .values()
            .flat_map(|i| i.eni_groups.iter().cloned())
            .chain(extra_groups.iter().cloned())
            .filter(|g| !self.groups.contains_key(g))
            .collect();
        let groups: Vec<String> = groups.into_iter().collect();
        if !groups.is_empty() {
            for info in ec2.describe_groups(&groups).await? {
                let rules = ec2.describe_rules(&info.id).await?;
                self.groups
                    .insert(info.id.clone(), LiveGroup { info, rules });
            }
        }
        let resolved = self.status_references();
        let (mut sgs, mut pls) = (BTreeSet::new(), BTreeSet::new());
        for p in policies {
            for direction in [Direction::Ingress, Direction::Egress] {
                for rule in p.rules(direction).unwrap_or_default() {
                    for peer in &rule.peers {
                        match peer {
                            PeerRef::SecurityGroup(id)
                                if !resolved.security_groups.contains_key(id) =>
                            {
                                sgs.insert(id.clone());
                            }
                            PeerRef::PrefixList(id) if !resolved.prefix_lists.contains_key(id) => {
                                pls.insert(id.clone());
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        // Group references in the rules of the groups read: what the
        // cloud layer admits from them.
        for g in self.groups.values() {
            for r in &g.rules {
                if let crate::policy::SgPeer::SecurityGroup(id) = &r.permission.peer
                    && !resolved.security_groups.contains_key(id)
                {
                    sgs.insert(id.clone());
                }
            }
        }
        if !sgs.is_empty() {
            let sgs: Vec<String> = sgs.into_iter().collect();
            self.references.security_groups = ec2.group_members(&sgs).await?;
        }
        if !pls.is_empty() {
            let pls: Vec<String> = pls.into_iter().collect();
            self.references.prefix_lists = ec2.prefix_lists(&pls).await?;
        }
        Ok(())
    }

    /// The peers the policies' status resolves (what agents use).
    fn status_references(&self) -> Facts {
        let mut facts = Facts::default();
        for p in &self.policies {
            if let Some(s) = &p.status {
                // A malformed status entry resolves nothing (as on the agent,
                // which reports it).
                let _ = facts.add_resolved_peers(&s.resolved_peers);
            }
        }
        facts
    }

    /// The policies in force: not being deleted, valid (an invalid one is
    /// reported in `problems` and left out).
    pub fn active(&self, problems: &mut Vec<String>) -> Vec<ValidPolicy> {
        let mut out = Vec::new();
        for p in &self.policies {
            if p.metadata.deletion_timestamp.is_some() {
                continue;
            }
            match validate(p) {
                Ok(v) => out.push(v),
                Err(e) => problems.push(format!("live policy {} left out: {e}", p.name_any())),
            }
        }
        out
    }

    /// The live policy named `name`.
    pub fn policy(&self, name: &str) -> Option<&FirewallPolicy> {
        self.policies.iter().find(|p| p.name_any() == name)
    }

    /// The facts the compiler is given: every node, the published node
    /// peers, the references resolved in status and from EC2, and the
    /// agent's `settings`.
    pub fn facts(&self, settings: &NodeSettings) -> Facts {
        let mut facts = self.status_references();
        for (id, nets) in &self.references.security_groups {
            facts
                .security_groups
                .entry(id.clone())
                .or_insert_with(|| nets.clone());
        }
        for (id, pl) in &self.references.prefix_lists {
            facts
                .prefix_lists
                .entry(id.clone())
                .or_insert_with(|| pl.clone());
        }
        let mut api_servers = settings.api_servers.clone();
        api_servers.extend(self.api_endpoints.iter().copied());
        api_servers.sort();
        api_servers.dedup();
        Facts {
            nodes: self.nodes.clone().into(),
            failsafe: settings.failsafe.clone(),
            node_peers: self.node_peers.clone(),
            api_servers,
            nameservers: settings.nameservers.clone(),
            allow: settings.allow,
            ..facts
        }
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Result<&NodeFacts, Error> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| Error::Live(format!("no node named {name} in the cluster")))
    }

    /// The instance behind node `name`, when it is on EC2 and was read.
    pub fn instance(&self, name: &str) -> Option<&InstanceInfo> {
        let id = self.nodes.iter().find(|n| n.name == name)?.instance_id()?;
        self.instances.get(id)
    }
}

/// The node ruleset of `node` from `policies`, as its agent compiles it.
pub fn ruleset(node: &str, policies: &[ValidPolicy], facts: &Facts) -> Result<NodeRuleset, Error> {
    compile_node(node, policies, facts).map_err(|e| Error::Render(format!("node {node}: {e}")))
}
