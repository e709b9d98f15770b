//! What the compiler needs to know besides the policies: the nodes, the
//! addresses behind Security Group and prefix-list references, the node
//! layer's failsafe list and the Security Group quota.
//!
//! The controller and the agent gather these (kube watches, EC2 describes);
//! the compiler only reads them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::api::{IcmpMatch, PortRange, Protocol, ResolvedPeer};

use super::{IpFamily, PolicyError};

/// Everything the compiler reads besides the policies themselves.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    /// The cluster's nodes (targets of policies and of `nodeSelector`
    /// peers). Shared: the controller hands every reconcile the same
    /// snapshot of its watch cache rather than a copy of every node each.
    #[serde(default)]
    pub nodes: std::sync::Arc<Vec<NodeFacts>>,
    /// Security Group id → private addresses of the interfaces in it, as
    /// resolved by the controller. An id missing here is "unresolved".
    #[serde(default)]
    pub security_groups: BTreeMap<String, Vec<IpNet>>,
    /// Prefix-list id → its entries and size, as resolved by the controller.
    #[serde(default)]
    pub prefix_lists: BTreeMap<String, PrefixListFacts>,
    /// Traffic the node layer always allows, ahead of any policy.
    #[serde(default)]
    pub failsafe: Failsafe,
    /// Security Group rule quota.
    #[serde(default)]
    pub quota: SgQuota,
    /// Addresses of the nodes a `nodeSelector` peer stands for, keyed by
    /// the selector's canonical text (`<all>` for every node), as the
    /// controller publishes them in FirewallPeerSlices. A selector found
    /// here is not evaluated against `nodes` (the agent knows only its own
    /// Node); one missing here is.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_peers: BTreeMap<String, Vec<IpAddr>>,
    /// The API server's endpoint addresses (the `ApiServer` failsafe scope).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_servers: Vec<IpAddr>,
    /// The node's nameservers (the `Nameservers` failsafe scope).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<IpAddr>,
    /// What the node layer's allows do (default: hand back to the host).
    #[serde(default)]
    pub allow: AllowVerdict,
}

/// What a node-layer allow does with a packet.
///
/// `Return` (the default) hands it back to the built-in chain, so the
/// host's own rules and other tools' chains (kube-proxy's `KUBE-FIREWALL`,
/// a user's INPUT rules) still decide: Palisade only ever removes access.
/// `Accept` ends the walk at Palisade's allow, making Palisade the node's
/// only firewall for the directions an Enforce policy governs; it overrides
/// every rule after Palisade's hook, which is why it is opt-in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub enum AllowVerdict {
    /// `-j RETURN`.
    #[default]
    Return,
    /// `-j ACCEPT`.
    Accept,
}

/// One Kubernetes node, as far as the compiler cares.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeFacts {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    #[serde(default)]
    pub labels: Labels,
    /// The node's `InternalIP` addresses (IPv4 and IPv6).
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// `spec.providerID` (`aws:///<az>/<instance-id>`), when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
}

impl NodeFacts {
    /// Reads a Node object: name, labels, every `InternalIP` address that
    /// parses (others are skipped: an unparsable address cannot be matched
    /// on either layer), and `providerID`.
    pub fn from_node(node: &k8s_openapi::api::core::v1::Node) -> Self {
        let mut addresses: Vec<IpAddr> = node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        addresses.sort();
        addresses.dedup();
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default().into(),
            addresses,
            provider_id: node.spec.as_ref().and_then(|s| s.provider_id.clone()),
        }
    }

    /// The EC2 instance id from `providerID` (`aws:///us-east-1a/i-0abc...`),
    /// or `None` when the node is not an EC2 instance.
    pub fn instance_id(&self) -> Option<&str> {
        let id = self
            .provider_id
            .as_deref()?
            .strip_prefix("aws://")?
            .rsplit('/')
            .next()?;
        id.starts_with("i-").then_some(id)
    }
}

/// A node's labels, shared between copies of its [`NodeFacts`]: the
/// controller's snapshot of every node (rebuilt after each node change,
/// while reconciles may still hold the previous one) copies each node's
/// facts, and the labels are most of them (≈ 3 KB of an EKS node's 21).
/// Reads as the map (`Deref`); built from one like it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Labels(std::sync::Arc<BTreeMap<String, String>>);

impl std::ops::Deref for Labels {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        Labels(std::sync::Arc::new(map))
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Self {
        BTreeMap::from(pairs).into()
    }
}

impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        iter.into_iter().collect::<BTreeMap<_, _>>().into()
    }
}

impl Labels {
    /// Whether `other` is this very copy (not only equal).
    pub fn shares(&self, other: &Labels) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A managed prefix list as the controller resolved it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrefixListFacts {
    /// Address family of the list (AWS fixes it at creation).
    pub family: IpFamily,
    /// Its current entries.
    #[serde(default)]
    pub cidrs: Vec<IpNet>,
    /// Its `MaxEntries`: what a reference to it counts against the quota.
    pub max_entries: u32,
}

/// The Security Group rule quota (per group, per direction, per family).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SgQuota {
    /// Rules per direction per group, counted apart for IPv4 and IPv6.
    /// AWS's default is 60; accounts may have it raised up to 1000.
    pub rules_per_direction: u32,
    /// Security Groups per network interface. AWS's default is 5 (16 with
    /// a quota raise): a node whose primary interface is full cannot take
    /// one more policy's group.
    pub groups_per_interface: u32,
}

impl Default for SgQuota {
    fn default() -> Self {
        SgQuota {
            rules_per_direction: 60,
            groups_per_interface: 5,
        }
    }
}

/// Who a failsafe entry admits (inbound: sources; outbound: destinations).
/// An entry's peers are the union of its scopes and its CIDRs; an entry
/// with neither admits nobody. Nothing here can be `0.0.0.0/0` or `::/0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FailsafeScope {
    /// The cluster: every node's InternalIP (kept current by the agent)
    /// and [`Failsafe::cluster_cidrs`] (control plane, VPC).
    Cluster,
    /// The API server's endpoints (the `kubernetes` EndpointSlice, the
    /// in-cluster service address, the agent's configured server).
    ApiServer,
    /// The nameservers of the node's resolv.conf.
    Nameservers,
}

/// One port (range) the node layer always allows, to or from its scope only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailsafePort {
    /// Short name written into the rule comment (`kubelet`, `vxlan`, ...).
    pub name: String,
    /// `TCP` or `UDP`.
    pub protocol: Protocol,
    /// The destination port or range.
    pub ports: PortRange,
    /// Scopes whose addresses the entry admits (default: `[Cluster]` when
    /// `cidrs` is empty too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scope: Vec<FailsafeScope>,
    /// Fixed addresses the entry admits (canonical CIDRs, never `/0`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<IpNet>,
}

impl FailsafePort {
    fn new(name: &str, protocol: Protocol, port: u16, end_port: Option<u16>) -> Self {
        FailsafePort {
            name: name.to_string(),
            protocol,
            ports: PortRange { port, end_port },
            scope: vec![FailsafeScope::Cluster],
            cidrs: Vec::new(),
        }
    }

    fn to(mut self, scope: &[FailsafeScope], cidrs: &[&str]) -> Self {
        self.scope = scope.to_vec();
        self.cidrs = cidrs.iter().filter_map(|c| c.parse().ok()).collect();
        self
    }

    /// The scopes the entry admits: `[Cluster]` when neither scope nor
    /// CIDRs are given (a file that names only ports stays scoped).
    pub fn scopes(&self) -> Vec<FailsafeScope> {
        if self.scope.is_empty() && self.cidrs.is_empty() {
            vec![FailsafeScope::Cluster]
        } else {
            self.scope.clone()
        }
    }
}

/// The EC2 instance metadata service (IMDS), IPv4 and IPv6 (Nitro).
pub const EC2_METADATA: [&str; 2] = ["169.254.169.254/32", "fd00:ec2::254/128"];
/// The VPC DNS resolver (Route 53 Resolver at the link-local address).
pub const EC2_DNS: [&str; 2] = ["169.254.169.253/32", "fd00:ec2::253/128"];
/// The Amazon Time Sync Service.
pub const EC2_TIME: [&str; 2] = ["169.254.169.123/32", "fd00:ec2::123/128"];

/// Traffic the node layer keeps allowed whatever the policies say, so a
/// policy can never cut a node off from its operators, its control plane or
/// its network — and nothing more: every entry is scoped to who needs it,
/// none is open to `0.0.0.0/0` or `::/0`. Evaluated after loopback and
/// established/related traffic and before every policy (and before the
/// INVALID drop, because ND and unsolicited ICMP errors are not tracked by
/// conntrack). An allow here, like every Palisade allow, only hands the
/// packet back to the host's own rules: the failsafe never opens what the
/// host's firewall closes.
///
/// Fields missing when read from a file take their default, so a file
/// may set `adminCidrs` alone.
///
/// The defaults ([`Failsafe::default`]); "cluster" is every node's
/// InternalIP plus `clusterCidrs`:
/// - inbound SSH (22/tcp) from `admin_cidrs` — empty, so no SSH until set;
/// - inbound from the cluster: kubelet 10250/tcp, the agent's metrics
///   9901/tcp, API server 443/tcp and 6443/tcp and etcd 2379-2380/tcp (self-
///   managed control planes), VXLAN 4789/udp and 8472/udp (Flannel,
///   Cilium), Geneve 6081/udp, BGP 179/tcp (Calico), DHCP replies 68/udp;
/// - outbound to the API server's endpoints: 443/tcp and 6443/tcp;
/// - outbound to the cluster: kubelet, etcd, the overlays and BGP as above,
///   DHCP 67/udp (to the cluster and the limited broadcast address);
/// - outbound to EC2's link-local services: instance metadata 80/tcp, DNS
///   53/udp+tcp (the VPC resolver and resolv.conf's nameservers), time
///   123/udp;
/// - ICMP type 3 code 4 (fragmentation needed: PMTU) and type 11 (time
///   exceeded), both directions, from anywhere (they carry no payload of
///   their own and PMTU discovery breaks without them);
/// - ICMPv6 types 1-4 (errors, PMTU: packet too big is 2) and 133-137 (router
///   and neighbour discovery, redirect), both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Failsafe {
    /// Sources allowed to reach `ssh_port`. Empty: no SSH failsafe.
    pub admin_cidrs: Vec<IpNet>,
    /// The SSH port (22).
    pub ssh_port: u16,
    /// Control-plane and VPC CIDRs: with the node addresses, the `Cluster`
    /// scope. Empty: the node addresses alone.
    pub cluster_cidrs: Vec<IpNet>,
    /// Ports allowed in, each from its scope.
    pub inbound: Vec<FailsafePort>,
    /// Ports allowed out, each to its scope.
    pub outbound: Vec<FailsafePort>,
    /// ICMP (IPv4) types/codes allowed both ways.
    pub icmp: Vec<IcmpMatch>,
    /// ICMPv6 types/codes allowed both ways.
    pub icmpv6: Vec<IcmpMatch>,
}

impl Default for Failsafe {
    fn default() -> Self {
        use FailsafeScope::{ApiServer, Cluster, Nameservers};
        use Protocol::{Tcp, Udp};
        let overlay = || {
            vec![
                FailsafePort::new("kubelet", Tcp, 10250, None),
                FailsafePort::new("etcd", Tcp, 2379, Some(2380)),
                FailsafePort::new("vxlan", Udp, 4789, None),
                FailsafePort::new("vxlan", Udp, 8472, None),
                FailsafePort::new("geneve", Udp, 6081, None),
                FailsafePort::new("bgp", Tcp, 179, None),
            ]
        };
        let mut inbound = overlay();
        inbound.extend([
            FailsafePort::new("palisade-metrics", Tcp, 9901, None),
            FailsafePort::new("apiserver", Tcp, 443, None),
            FailsafePort::new("apiserver", Tcp, 6443, None),
            FailsafePort::new("dhcp-client", Udp, 68, None),
        ]);
        let mut outbound = overlay();
        outbound.extend([
            FailsafePort::new("apiserver", Tcp, 443, None).to(&[ApiServer], &[]),
            FailsafePort::new("apiserver", Tcp, 6443, None).to(&[ApiServer], &[]),
            FailsafePort::new("dhcp-server", Udp, 67, None).to(&[Cluster], &["255.255.255.255/32"]),
            FailsafePort::new("ec2-metadata", Tcp, 80, None).to(&[], &EC2_METADATA),
            FailsafePort::new("dns", Udp, 53, None).to(&[Nameservers], &EC2_DNS),
            FailsafePort::new("dns", Tcp, 53, None).to(&[Nameservers], &EC2_DNS),
            FailsafePort::new("ec2-time", Udp, 123, None).to(&[], &EC2_TIME),
        ]);
        let icmp = |icmp_type, code| IcmpMatch { icmp_type, code };
        Failsafe {
            admin_cidrs: Vec::new(),
            ssh_port: 22,
            cluster_cidrs: Vec::new(),
            inbound,
            outbound,
            icmp: vec![icmp(3, Some(4)), icmp(11, None)],
            icmpv6: [1, 2, 3, 4, 133, 134, 135, 136, 137]
                .into_iter()
                .map(|t| icmp(t, None))
                .collect(),
        }
    }
}

impl Failsafe {
    /// Checks a failsafe list read from flags or a file: canonical CIDRs,
    /// none of them `/0` (the failsafe never opens to the world), TCP or
    /// UDP ports with `1 <= port <= endPort`, ICMP types that match exactly
    /// (type 255 is iptables' wildcard).
    pub fn validate(&self) -> Result<(), PolicyError> {
        let mut errors = Vec::new();
        let check_cidrs = |path: &str, cidrs: &[IpNet], errors: &mut Vec<PolicyError>| {
            for (i, cidr) in cidrs.iter().enumerate() {
                if cidr.trunc() != *cidr {
                    errors.push(PolicyError::NonCanonicalCidr {
                        path: format!("{path}[{i}]"),
                        value: cidr.to_string(),
                        canonical: cidr.trunc().to_string(),
                    });
                } else if cidr.prefix_len() == 0 {
                    errors.push(PolicyError::field(
                        format!("{path}[{i}]"),
                        format!("{cidr} is the whole internet"),
                        "the failsafe never opens to 0.0.0.0/0 or ::/0; name the admin or cluster networks",
                    ));
                }
            }
        };
        check_cidrs("failsafe.adminCidrs", &self.admin_cidrs, &mut errors);
        check_cidrs("failsafe.clusterCidrs", &self.cluster_cidrs, &mut errors);
        if self.ssh_port == 0 {
            errors.push(PolicyError::field(
                "failsafe.sshPort",
                "port 0 is not a port",
                "use 1-65535 (usually 22)",
            ));
        }
        for (list, entries) in [("inbound", &self.inbound), ("outbound", &self.outbound)] {
            for (i, entry) in entries.iter().enumerate() {
                let path = format!("failsafe.{list}[{i}]");
                if !matches!(entry.protocol, Protocol::Tcp | Protocol::Udp) {
                    errors.push(PolicyError::field(
                        format!("{path}.protocol"),
                        "failsafe ports are TCP or UDP",
                        "use protocol TCP or UDP (ICMP goes in failsafe.icmp)",
                    ));
                }
                let end = entry.ports.end_port.unwrap_or(entry.ports.port);
                if entry.ports.port == 0 || end < entry.ports.port {
                    errors.push(PolicyError::field(
                        format!("{path}.ports"),
                        format!("{}-{end} is not a port range", entry.ports.port),
                        "use 1 <= port <= endPort <= 65535",
                    ));
                }
                check_cidrs(&format!("{path}.cidrs"), &entry.cidrs, &mut errors);
            }
        }
        for (list, entries) in [("icmp", &self.icmp), ("icmpv6", &self.icmpv6)] {
            for (i, m) in entries.iter().enumerate() {
                if m.icmp_type == crate::api::ICMP_TYPE_ANY {
                    errors.push(PolicyError::field(
                        format!("failsafe.{list}[{i}].type"),
                        "ICMP type 255 is iptables' wildcard for every type",
                        "name the type to allow (0-254)",
                    ));
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PolicyError::Invalid {
                policy: "<failsafe>".into(),
                errors,
            })
        }
    }
}

impl Facts {
    /// Addresses of the nodes `selector` stands for: the controller's
    /// published list when there is one, else those of `nodes` it selects.
    pub fn selected_addresses(&self, selector: &super::Selector) -> Vec<IpAddr> {
        match self.node_peers.get(&selector.to_string()) {
            Some(published) => published.clone(),
            None => selector
                .select(&self.nodes)
                .iter()
                .flat_map(|n| n.addresses.iter().copied())
                .collect(),
        }
    }

    /// The node named `name`, if known.
    pub fn node(&self, name: &str) -> Option<&NodeFacts> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Adds the resolutions a controller published in a policy's
    /// `status.resolvedPeers` (how the agent learns what `sg-` and `pl-`
    /// peers stand for). Prefix lists learnt this way get `max_entries` =
    /// their size and the family of their first entry (IPv4 when empty): the
    /// agent does not count quota, so neither matters there.
    ///
    /// Fails on an id that is neither `sg-` nor `pl-` or an unparsable CIDR,
    /// naming `status.resolvedPeers[i]`.
    pub fn add_resolved_peers(&mut self, peers: &[ResolvedPeer]) -> Result<(), PolicyError> {
        for (i, peer) in peers.iter().enumerate() {
            let mut cidrs = Vec::with_capacity(peer.cidrs.len());
            for (j, cidr) in peer.cidrs.iter().enumerate() {
                let net: IpNet = cidr.parse().map_err(|_| {
                    PolicyError::field(
                        format!("status.resolvedPeers[{i}].cidrs[{j}]"),
                        format!("{cidr:?} is not a CIDR"),
                        "the controller publishes canonical CIDRs; re-resolve the reference",
                    )
                })?;
                cidrs.push(net.trunc());
            }
            if peer.id.starts_with("sg-") {
                self.security_groups.insert(peer.id.clone(), cidrs);
            } else if peer.id.starts_with("pl-") {
                let family = cidrs.first().map_or(IpFamily::V4, IpFamily::of_net);
                let max_entries = u32::try_from(cidrs.len()).unwrap_or(u32::MAX);
                self.prefix_lists.insert(
                    peer.id.clone(),
                    PrefixListFacts {
                        family,
                        cidrs,
                        max_entries,
                    },
                );
            } else {
                return Err(PolicyError::field(
                    format!("status.resolvedPeers[{i}].id"),
                    format!(
                        "{:?} is neither a Security Group nor a prefix list id",
                        peer.id
                    ),
                    "use an sg-... or pl-... id",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_failsafe_is_valid_and_has_no_ssh() {
        let fs = Failsafe::default();
        assert!(fs.validate().is_ok());
        assert!(fs.admin_cidrs.is_empty());
        assert!(fs.inbound.iter().any(|p| p.ports.port == 10250));
        assert!(
            fs.inbound
                .iter()
                .any(|p| p.ports.port == 68 && p.protocol == Protocol::Udp)
        );
        assert!(
            fs.outbound
                .iter()
                .any(|p| p.ports.port == 67 && p.protocol == Protocol::Udp)
        );
        assert!(fs.icmp.contains(&IcmpMatch {
            icmp_type: 3,
            code: Some(4)
        }));
        assert_eq!(fs.icmpv6.len(), 9);
    }

    #[test]
    fn failsafe_validation_names_the_field() {
        let fs = Failsafe {
            admin_cidrs: vec!["10.0.0.1/24".parse().unwrap()],
            inbound: vec![FailsafePort::new("x", Protocol::Icmp, 5, Some(4))],
            ..Failsafe::default()
        };
        let err = fs.validate().unwrap_err().to_string();
        assert!(
            err.contains(
                "failsafe.adminCidrs[0]: 10.0.0.1/24 is not a canonical CIDR; write 10.0.0.0/24"
            ),
            "{err}"
        );
        assert!(err.contains("failsafe.inbound[0].protocol"), "{err}");
        assert!(err.contains("failsafe.inbound[0].ports"), "{err}");
    }

    #[test]
    fn facts_read_from_a_file_fill_defaults() {
        let facts: Facts = serde_json::from_str(
            r#"{"nodes":[{"name":"n","addresses":["10.0.0.1"]}],"failsafe":{"adminCidrs":["192.0.2.0/24"]}}"#,
        )
        .unwrap();
        assert_eq!(facts.failsafe.ssh_port, 22);
        assert_eq!(facts.failsafe.inbound, Failsafe::default().inbound);
        assert_eq!(facts.quota.rules_per_direction, 60);
    }

    #[test]
    fn instance_id_from_provider_id() {
        let node = NodeFacts {
            provider_id: Some("aws:///eu-west-1a/i-0123456789abcdef0".into()),
            ..Default::default()
        };
        assert_eq!(node.instance_id(), Some("i-0123456789abcdef0"));
        let kind = NodeFacts {
            provider_id: Some("kind://docker/kind/kind-worker".into()),
            ..Default::default()
        };
        assert_eq!(kind.instance_id(), None);
    }

    #[test]
    fn resolved_peers_become_facts() {
        let mut facts = Facts::default();
        facts
            .add_resolved_peers(&[
                ResolvedPeer {
                    id: "sg-0123456789abcdef0".into(),
                    cidrs: vec!["10.0.1.5/32".into()],
                },
                ResolvedPeer {
                    id: "pl-0123456789abcdef0".into(),
                    cidrs: vec!["2001:db8::/32".into()],
                },
            ])
            .unwrap();
        assert_eq!(
            facts.security_groups["sg-0123456789abcdef0"],
            vec!["10.0.1.5/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            facts.prefix_lists["pl-0123456789abcdef0"].family,
            IpFamily::V6
        );
        let bad = facts.add_resolved_peers(&[ResolvedPeer {
            id: "vpc-1".into(),
            cidrs: vec![],
        }]);
        assert!(bad.is_err());
    }
}
