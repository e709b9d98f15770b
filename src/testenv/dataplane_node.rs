//! [`DataplaneNode`]: a simulated host whose iptables are programmed
//! straight from `compile_node` output by the real dataplane, without an
//! agent or an apiserver: the node layer alone, with real packets.

use super::net::{SimHost, SimNet};
use super::{Error, Result};
use crate::api::FirewallPolicy;
use crate::node::backend::Backend;
use crate::node::dataplane::Dataplane;
use crate::policy::{Facts, NodeFacts, NodeRuleset, compile_node, validate};

/// A host, its dataplane (nft backend, inside its namespace) and the facts
/// naming it (`node`, with the host's addresses).
pub struct DataplaneNode {
    /// The host.
    pub host: SimHost,
    /// Its dataplane.
    pub dataplane: Dataplane,
    /// What the compiler is told; tests adjust the failsafe and scopes.
    pub facts: Facts,
}

impl DataplaneNode {
    /// A new host named `name` on `net`; `admin`'s IPv4, when given, is the
    /// failsafe SSH source.
    pub fn new(net: &SimNet, name: &str, admin: Option<&SimHost>) -> Result<DataplaneNode> {
        let host = net.add_host(name)?;
        let dataplane = Dataplane::new(Backend::Nft, Some(host.netns().to_string()));
        let mut facts = Facts {
            nodes: vec![NodeFacts {
                name: "node".into(),
                addresses: host.addresses(),
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        };
        if let Some(admin) = admin {
            facts.failsafe.admin_cidrs = vec![std::net::IpAddr::V4(admin.ipv4()).into()];
        }
        Ok(DataplaneNode {
            host,
            dataplane,
            facts,
        })
    }

    /// The ruleset `policies` give this node.
    pub fn compile(&self, policies: &[FirewallPolicy]) -> Result<NodeRuleset> {
        let mut valid = Vec::new();
        for p in policies {
            valid.push(validate(p).map_err(|e| Error::Invalid(e.to_string()))?);
        }
        compile_node("node", &valid, &self.facts).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// Compiles and programs `policies`, then checks that a full read
    /// finds nothing to write (what was written is what the kernel holds).
    pub fn apply(&self, policies: &[FirewallPolicy]) -> Result<NodeRuleset> {
        let rs = self.compile(policies)?;
        self.dataplane
            .sync(&rs)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let again = self
            .dataplane
            .verify(&rs)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        if again.wrote() {
            return Err(Error::Invalid(format!(
                "a full read after the sync found differences: {:?}",
                again.plan
            )));
        }
        Ok(rs)
    }

    /// `iptables-save` then `ip6tables-save` of the filter table, without
    /// the `# Generated ... on <time>` / `# Completed on <time>` comments
    /// and with chain counters zeroed (`:INPUT ACCEPT [0:0]`): two saves of
    /// the same rules compare equal whenever they are taken, whatever
    /// traffic passed between them.
    pub fn save(&self) -> Result<String> {
        let text = self.host.exec(&["iptables-nft-save", "-t", "filter"])?
            + &self.host.exec(&["ip6tables-nft-save", "-t", "filter"])?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match (l.starts_with(':'), l.rsplit_once(" [")) {
                (true, Some((decl, _))) => format!("{decl} [0:0]\n"),
                _ => format!("{l}\n"),
            })
            .collect())
    }
}
