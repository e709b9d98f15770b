//! Pure policy compilation: `FirewallPolicy` + [`Facts`] → a [`CloudPlan`]
//! (Security Group permissions) and a [`NodeRuleset`] (iptables chains and
//! ipsets), and pure diffs of current vs desired for both layers.
//!
//! No I/O here: no kube client, no AWS types, no processes, no clock. Every
//! output is `Debug + Clone + PartialEq + Serialize`, so the CLI can print
//! it and tests can compare it.
//!
//! # Pipeline
//!
//! ```text
//! FirewallPolicy ──validate──▶ ValidPolicy ──plan_cloud──▶ CloudPlan ──diff_security_group(current SG rules)──▶ SgDiff
//!                                   │
//!            (all policies, Facts) ─┴─compile_node(node)──▶ NodeRuleset ──diff_node(current NodeState)──▶ NodeDiff
//! ```
//!
//! [`compile_policy`] runs validation, the cloud plan and every warning for
//! the controller in one call.
//!
//! # Semantics both layers keep
//!
//! Rules only allow; several rules and several policies on one node are the
//! union of their allows. A direction is default-deny on a node as soon as
//! one selected Enforce policy governs it (`policyTypes` names it, with or
//! without rules); a direction no selected policy governs is left alone. A
//! rule applies on both layers unless `layers` names one; effective access
//! is the intersection.
//!
//! **Palisade only removes access.** On the node an allow hands the packet
//! back to the built-in chain (`RETURN`), so the host's own rules and other
//! tools' chains (kube-proxy's `KUBE-FIREWALL`, a user's INPUT rules) still
//! decide; only Palisade's default-drop is terminal. Effective access = SG
//! union ∩ Palisade ∩ the host's own rules. [`AllowVerdict::Accept`] (opt-in)
//! makes allows terminal where an Enforce policy governs.
//!
//! **Audit is a dry run.** An Audit policy neither allows nor drops: its
//! chain is walked only by packets nothing else allowed, and it counts (and
//! logs, rate-limited) those its own rules would not have allowed either.
//!
//! # The cloud layer
//!
//! One permission per (protocol, port range or ICMP type/code, peer) — see
//! [`SgPermission`] for the canonical form. Descriptions are
//! `palisade:<policy>/<rule>[ <description>]`; the `palisade:<policy>/`
//! prefix is the ownership marker in adopted groups ([`sgdiff`] explains
//! ownership and the apply order: authorize, re-describe, revoke).
//!
//! # The node layer: shape of a [`NodeRuleset`]
//!
//! Per family (iptables for IPv4, ip6tables for IPv6), `filter` table only.
//! "allow" is `RETURN` (default) or `ACCEPT` ([`AllowVerdict`]). The allow
//! path is entered by one jump from the built-in chain and its chains up
//! to the dispatch chain are linked by gotos (`-g`), so a RETURN there
//! resumes the built-in chain right after Palisade's hook. The Enforce
//! policies' chains are jumped to (`-j`) from a dispatch chain, one after
//! the other, so the longest path is six chains whatever the number of
//! policies (nf_tables refuses paths of more than 16 chains, gotos
//! included: linking the policies' chains by gotos failed at 13 policies).
//! A policy chain's allow cannot return two levels at once, so it flips a
//! borrowed mark bit ([`node::MARK_BIT`]) and the dispatch chain, seeing
//! the bit changed, flips it back and returns to the built-in chain. The
//! bit is flipped, never set: every packet leaves with the mark it came
//! with, and a bit another tool set on arrival sends the packet through the
//! second dispatch chain, whose check is inverted.
//!
//! ```text
//! INPUT  ─(rule 1, -j)─▶ PALISADE-INPUT    only when a selected policy governs ingress
//! OUTPUT ─(rule 1, -j)─▶ PALISADE-OUTPUT   only when a selected policy governs egress
//!
//! PALISADE-INPUT / PALISADE-OUTPUT
//!   -i lo / -o lo                          allow
//!   ctstate ESTABLISHED,RELATED            allow
//!   goto PALISADE-FS-IN / PALISADE-FS-OUT
//!
//! PALISADE-FS-IN / -OUT   the failsafe (see [`Failsafe`]), each entry scoped
//!   ICMP/ICMPv6 errors and ND, SSH from admin CIDRs, cluster ports from
//!   the cluster's nodes and CIDRs, the API server, EC2's link-local
//!   services                                allow
//!   ctstate INVALID                        DROP   (Enforce only; after the
//!                                            failsafe: ND and unsolicited ICMP
//!                                            errors may be INVALID)
//!   mark bit set   goto PALISADE-POLM-IN / -OUT  ┐ when an Enforce policy
//!                  goto PALISADE-POL-IN / -OUT   ┘ governs; else the end chain
//!
//! PALISADE-POL-IN / -OUT  (the bit arrived clear; PALISADE-POLM-IN / -OUT:
//!                          it arrived set, and the check below is inverted)
//!   per Enforce policy, by name:
//!     jump PAL-I-<h> / PAL-O-<h>
//!     mark bit set   goto PALISADE-FLIP-IN / -OUT  (the policy allowed: flip
//!                                                  back, return to the built-in chain)
//!   goto the end chain
//!
//! PALISADE-FLIP-IN / -OUT
//!   MARK --xor-mark <bit>                  falls off the end: returns
//!
//! PAL-I-<h> / PAL-O-<h>   an Enforce policy (<h> = 10 hex of SHA-256 of its name)
//!   per Node-layer rule × (protocol, port range or ICMP type) × peer match:
//!     [ctstate NEW, LOG "pal-in:<policy>/<rule> "]      when log: true
//!     goto PALISADE-FLIP-*, or the same under a hashlimit per peer
//!                                                        when rateLimit is set
//!   sorted by content, so the order of rules in the policy does not matter;
//!   what falls through returns to the dispatch chain
//!
//! PALISADE-END-IN / -OUT
//!   jump PAL-I-<h> / PAL-O-<h>             per Audit policy, by name
//!   DROP                                   when an Enforce policy governs
//!                                           the direction; else nothing: the
//!                                           packet returns unchanged
//!
//! PAL-I-<h> / PAL-O-<h>   an Audit policy (entered by a jump from the end chain)
//!   its rules as above, each RETURN (back to the end chain)
//!   LOG "pal-audit:<policy> " (rate-limited), then a counter: would-be drops
//! ```
//!
//! With [`AllowVerdict::Accept`], allows are terminal: the policies' rules
//! `ACCEPT`, no bit is borrowed, and there is one dispatch chain
//! (`PALISADE-POL-IN` / `-OUT`) of jumps.
//!
//! A rule's peers of one family are matched inline (`-s`/`-d`) when they
//! are at most [`node::SET_THRESHOLD`] literal CIDRs, and through a
//! `hash:net` ipset otherwise; a Security Group, prefix list or
//! `nodeSelector` peer always gets its own set (present even when empty or
//! unresolved), so membership changes are set swaps, never chain rewrites.
//! Set names are `PAL-<16 hex of the owner>-4|-6`; owners are `sg:<id>`,
//! `pl:<id>`, `nodes:<selector>`, `rule:<policy>/<direction>/<rule>`,
//! `failsafe:ssh`, `failsafe:cluster`, `failsafe:apiserver` and
//! `failsafe:nameservers`.
//!
//! A rate-limited rule allows while the peer is under its rate; above it,
//! the packet continues to the next rule rather than being dropped on the
//! spot, so that the outcome is the union of allows whatever the order, and
//! the end chain drops it (or counts it, for an Audit policy).
//!
//! # Ids and hashes
//!
//! Every hash is SHA-256 over length-prefixed canonical text, truncated to
//! 16 hex digits. A [`NodeRule`] id covers its family, chain, matches,
//! action and origin, and is written into the rule's comment
//! (`palisade:<id> <origin>`, [`node::rule_id_from_comment`] reads it back):
//! comparing id lists finds drift without parsing rules. A policy's hash
//! ([`PolicyDigest`]) covers its chains and the content of the sets they
//! match; [`NodeRuleset::hash`] covers everything the agent writes.
//!
//! # Known limits
//!
//! The node layer filters the host's own traffic (INPUT/OUTPUT): pod
//! traffic that is forwarded is not affected, hostNetwork pods are.

pub mod admission;
mod canonical;
mod cloud;
pub mod effective;
mod error;
pub mod eval;
mod facts;
mod hash;
pub mod node;
mod nodediff;
mod selector;
pub mod sgdiff;
mod validate;
mod warnings;

#[cfg(test)]
mod proptests;
#[cfg(test)]
pub(crate) mod testing;

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::api::{FirewallPolicy, Layer};

pub use canonical::canonicalize_spec;
pub use cloud::{
    CloudPlan, DESCRIPTION_MARKER, FamilyCount, MAX_DESCRIPTION, PlannedPermission, QuotaUsage,
    SgPeer, SgPermission, SgProtocol, marker, plan_cloud, union_plan,
};
pub use error::PolicyError;
pub use facts::{
    AllowVerdict, EC2_DNS, EC2_METADATA, EC2_TIME, Facts, Failsafe, FailsafePort, FailsafeScope,
    Labels, NodeFacts, PrefixListFacts, SgQuota,
};
pub(crate) use hash::short_hash;
pub use node::{
    AddrSide, Address, AllowTarget, BuiltinChain, CtState, FamilyRuleset, HashLimit, Hook,
    IcmpTypeMatch, InterfaceMatch, IpSet, L4Protocol, LogLimit, NodeAction, NodeChain, NodeMatch,
    NodeRule, NodeRuleset, PeerMatch, PolicyDigest, RateUnit, RuleOrigin, compile_node,
    lint_node_layer,
};
pub use nodediff::{NodeDiff, NodeState, SetState, TableDiff, TableState, diff_node};
pub use selector::{Requirement, Selector};
pub use sgdiff::{
    CurrentSgRule, ForeignMatch, GroupOwnership, PermissionDiff, SgDiff, diff_security_group,
    owns_rule,
};
pub use validate::{
    MAX_POLICY_NAME, PeerRef, PortSpan, ValidPolicy, ValidRule, nodes_selected, parse_cidr,
    policies_for_node, validate,
};
pub use warnings::Warning;

/// Traffic direction, seen from the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Direction {
    /// Into the node (`spec.ingress`, SG inbound rules, INPUT).
    Ingress,
    /// Out of the node (`spec.egress`, SG outbound rules, OUTPUT).
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// IP address family.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub enum IpFamily {
    /// IPv4.
    #[default]
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of a network.
    pub fn of_net(net: &IpNet) -> IpFamily {
        match net {
            IpNet::V4(_) => IpFamily::V4,
            IpNet::V6(_) => IpFamily::V6,
        }
    }
    /// The family of an address.
    pub fn of_addr(addr: &IpAddr) -> IpFamily {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
    /// `4` or `6`, as in set names and hashlimit names.
    pub fn suffix(&self) -> &'static str {
        match self {
            IpFamily::V4 => "4",
            IpFamily::V6 => "6",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// Everything the controller needs about one policy before touching AWS.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledPolicy {
    /// The validated policy (what the node layer compiles from).
    pub policy: ValidPolicy,
    /// The Security Group side.
    pub cloud: CloudPlan,
    /// Names of the nodes the policy selects, sorted.
    pub selected_nodes: Vec<String>,
    /// Every warning for `status.warnings`: the cloud plan's and the node
    /// layer's, sorted and de-duplicated.
    pub warnings: Vec<Warning>,
}

/// Validates `policy`, plans its Security Group and gathers every warning.
///
/// Contract: pure; fails with [`PolicyError::Invalid`] (every problem with
/// its field path) or [`PolicyError::QuotaExceeded`]; on success nothing in
/// the result depends on the order of rules, peers or ports.
pub fn compile_policy(
    policy: &FirewallPolicy,
    facts: &Facts,
) -> Result<CompiledPolicy, PolicyError> {
    let valid = validate(policy)?;
    let cloud = plan_cloud(&valid, facts)?;
    let selected_nodes = nodes_selected(&valid, facts);
    let mut warnings = cloud.warnings.clone();
    warnings.extend(lint_node_layer(&valid, facts));
    warnings.sort();
    warnings.dedup();
    Ok(CompiledPolicy {
        policy: valid,
        cloud,
        selected_nodes,
        warnings,
    })
}

/// The `status.resolvedPeers` a controller publishes for `policy`: for each
/// Security Group and prefix list a Node-layer rule references and `facts`
/// resolve, its CIDRs (canonical, sorted). The agent feeds them back with
/// [`Facts::add_resolved_peers`].
pub fn resolved_peers(policy: &ValidPolicy, facts: &Facts) -> Vec<crate::api::ResolvedPeer> {
    let mut ids = std::collections::BTreeSet::new();
    for direction in [Direction::Ingress, Direction::Egress] {
        for rule in policy
            .rules(direction)
            .unwrap_or_default()
            .iter()
            .filter(|r| r.on(Layer::Node))
        {
            for peer in &rule.peers {
                if let PeerRef::SecurityGroup(id) | PeerRef::PrefixList(id) = peer {
                    ids.insert(id.clone());
                }
            }
        }
    }
    ids.into_iter()
        .filter_map(|id| {
            let cidrs = facts
                .security_groups
                .get(&id)
                .cloned()
                .or_else(|| facts.prefix_lists.get(&id).map(|pl| pl.cidrs.clone()))?;
            let mut cidrs: Vec<IpNet> = cidrs.into_iter().map(|n| n.trunc()).collect();
            cidrs.sort();
            cidrs.dedup();
            Some(crate::api::ResolvedPeer {
                id,
                cidrs: cidrs.iter().map(ToString::to_string).collect(),
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::api::Protocol;

    fn manifests(dir: &str) -> Vec<(String, Result<FirewallPolicy, String>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .map(|p| {
                let text = std::fs::read_to_string(&p).unwrap();
                (
                    p.display().to_string(),
                    serde_yaml::from_str::<FirewallPolicy>(&text).map_err(|e| e.to_string()),
                )
            })
            .collect()
    }

    #[test]
    fn shipped_examples_compile_on_both_layers() {
        let examples = manifests("deploy/examples");
        assert!(examples.len() >= 6);
        let facts = facts_with_nodes();
        let mut valid = Vec::new();
        for (file, policy) in examples {
            let policy = policy.unwrap_or_else(|e| panic!("{file}: {e}"));
            let compiled =
                compile_policy(&policy, &facts).unwrap_or_else(|e| panic!("{file}: {e}"));
            valid.push(compiled.policy);
        }
        for node in facts.nodes.iter() {
            compile_node(&node.name, &valid, &facts).unwrap();
        }
    }

    #[test]
    fn the_invalid_corpus_is_refused() {
        let corpus = manifests("tests/fixtures/invalid");
        assert!(corpus.len() >= 30);
        let accepted: Vec<&str> = corpus
            .iter()
            // Refused by the compiler or by the CRD's CEL: a few checks are
            // admission-only (policyTypes is required on write, while the
            // compiler reads a policy stored before it existed).
            .filter(|(_, p)| {
                p.as_ref()
                    .is_ok_and(|p| validate(p).is_ok() && p.validate_cel().is_ok())
            })
            .map(|(f, _)| f.as_str())
            .collect();
        assert!(accepted.is_empty(), "accepted but invalid: {accepted:#?}");
    }

    #[test]
    fn compile_policy_gathers_everything() {
        let mut r = rule("refs", Protocol::Tcp, &[22], &["10.0.0.0/8"]);
        r.peers.push(sg_peer("sg-0123456789abcdef0"));
        let p = policy("p", vec![r], None);
        let mut facts = facts_with_nodes();
        let compiled = compile_policy(&p, &facts).unwrap();
        assert_eq!(compiled.selected_nodes, ["db-1", "web-1"]);
        assert!(
            compiled
                .warnings
                .iter()
                .any(|w| matches!(w, Warning::UnresolvedReference { .. }))
        );
        assert_eq!(resolved_peers(&compiled.policy, &facts), vec![]);

        facts.security_groups.insert(
            "sg-0123456789abcdef0".into(),
            vec!["10.1.0.7/32".parse().unwrap()],
        );
        let compiled = compile_policy(&p, &facts).unwrap();
        assert!(compiled.warnings.is_empty(), "{:?}", compiled.warnings);
        let published = resolved_peers(&compiled.policy, &facts);
        assert_eq!(
            published,
            [crate::api::ResolvedPeer {
                id: "sg-0123456789abcdef0".into(),
                cidrs: vec!["10.1.0.7/32".into()]
            }]
        );
        let mut agent = Facts::default();
        agent.add_resolved_peers(&published).unwrap();
        assert_eq!(agent.security_groups, facts.security_groups);
    }
}
