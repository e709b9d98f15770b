//! Node diff: what the agent read back from the kernel vs the
//! [`NodeRuleset`] it wants → which chains to (re)write or delete, which
//! hooks to add or remove, which sets to create, swap or destroy. Pure.
//!
//! The agent reads only what Palisade owns ([`is_palisade_chain`],
//! [`is_palisade_set`]; the diff ignores anything else it is given) and
//! reads rule ids from comments ([`super::node::rule_id_from_comment`]; a
//! rule without one is recorded under any id that is not 16 hex digits, so
//! its chain is rewritten). A hook is present only when it is the first
//! rule of its built-in chain.
//!
//! ## Apply order (the contract for the node module)
//!
//! 1. `create_sets`, then `swap_sets` (fill a temporary set, `ipset swap`,
//!    destroy the temporary): rules about to reference a set find it filled;
//! 2. per family, one `iptables-restore --noflush` transaction: declare and
//!    fill every chain in `write_chains` (a declared chain is flushed), add
//!    `add_hooks` at position 1, delete `remove_hooks`, then flush and
//!    delete `delete_chains` (nothing references them once the chains that
//!    jumped to them are rewritten in the same transaction);
//! 3. `destroy_sets`, once no rule matches them.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::Serialize;

use super::IpFamily;
use super::node::{
    FamilyRuleset, Hook, IpSet, NodeChain, NodeRuleset, is_palisade_chain, is_palisade_set,
    normalize_set_entries,
};

/// An ipset as read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SetState {
    /// Its family.
    pub family: IpFamily,
    /// Its entries, in any order.
    pub entries: Vec<IpNet>,
}

/// One family's Palisade chains and hooks as read back.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TableState {
    /// Chain name → rule ids in order.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Hooks present at the head of their built-in chain.
    pub hooks: BTreeSet<Hook>,
}

/// What Palisade owns on a node, as read back (or as last written).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    /// iptables.
    pub ipv4: TableState,
    /// ip6tables.
    pub ipv6: TableState,
    /// Set name → content.
    pub sets: BTreeMap<String, SetState>,
}

/// Changes to one family's table.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TableDiff {
    /// Chains to declare (flushing them) and fill, whole.
    pub write_chains: Vec<NodeChain>,
    /// Chains to flush and delete.
    pub delete_chains: Vec<String>,
    /// Hooks to insert at the head of their built-in chain.
    pub add_hooks: Vec<Hook>,
    /// Hooks to delete.
    pub remove_hooks: Vec<Hook>,
}

impl TableDiff {
    /// True when the table needs no write.
    pub fn is_empty(&self) -> bool {
        self.write_chains.is_empty()
            && self.delete_chains.is_empty()
            && self.add_hooks.is_empty()
            && self.remove_hooks.is_empty()
    }
}

/// Changes to a node, in the documented apply order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDiff {
    /// Sets to create and fill.
    pub create_sets: Vec<IpSet>,
    /// Existing sets whose content changes (swap in the new content).
    pub swap_sets: Vec<IpSet>,
    /// iptables changes.
    pub ipv4: TableDiff,
    /// ip6tables changes.
    pub ipv6: TableDiff,
    /// Sets to destroy, last.
    pub destroy_sets: Vec<String>,
}

impl NodeDiff {
    /// True on a no-op sync: nothing to write.
    pub fn is_empty(&self) -> bool {
        self.create_sets.is_empty()
            && self.swap_sets.is_empty()
            && self.destroy_sets.is_empty()
            && self.ipv4.is_empty()
            && self.ipv6.is_empty()
    }
}

impl NodeState {
    /// The state a node is in once `ruleset` is fully applied.
    pub fn of(ruleset: &NodeRuleset) -> NodeState {
        let table = |f: &FamilyRuleset| TableState {
            chains: f
                .chains
                .iter()
                .map(|c| (c.name.clone(), c.rule_ids()))
                .collect(),
            hooks: f.hooks.iter().cloned().collect(),
        };
        NodeState {
            ipv4: table(&ruleset.ipv4),
            ipv6: table(&ruleset.ipv6),
            sets: ruleset
                .sets
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        SetState {
                            family: s.family,
                            entries: s.entries.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Applies `diff` to this model of the node, in the documented order
    /// (for tests and dry runs).
    pub fn apply(&mut self, diff: &NodeDiff) {
        for s in diff.create_sets.iter().chain(&diff.swap_sets) {
            self.sets.insert(
                s.name.clone(),
                SetState {
                    family: s.family,
                    entries: s.entries.clone(),
                },
            );
        }
        for (table, d) in [(&mut self.ipv4, &diff.ipv4), (&mut self.ipv6, &diff.ipv6)] {
            for c in &d.write_chains {
                table.chains.insert(c.name.clone(), c.rule_ids());
            }
            for h in &d.add_hooks {
                table.hooks.insert(h.clone());
            }
            for h in &d.remove_hooks {
                table.hooks.remove(h);
            }
            for c in &d.delete_chains {
                table.chains.remove(c);
            }
        }
        for s in &diff.destroy_sets {
            self.sets.remove(s);
        }
    }
}

fn diff_table(current: &TableState, desired: &FamilyRuleset) -> TableDiff {
    let write_chains = desired
        .chains
        .iter()
        .filter(|c| {
            current.chains.get(&c.name).is_none_or(|ids| {
                ids.len() != c.rules.len() || ids.iter().zip(&c.rules).any(|(id, r)| *id != r.id)
            })
        })
        .cloned()
        .collect();
    let wanted: BTreeSet<&str> = desired.chains.iter().map(|c| c.name.as_str()).collect();
    let delete_chains = current
        .chains
        .keys()
        .filter(|name| is_palisade_chain(name) && !wanted.contains(name.as_str()))
        .cloned()
        .collect();
    let want_hooks: BTreeSet<&Hook> = desired.hooks.iter().collect();
    TableDiff {
        write_chains,
        delete_chains,
        add_hooks: desired
            .hooks
            .iter()
            .filter(|h| !current.hooks.contains(h))
            .cloned()
            .collect(),
        remove_hooks: current
            .hooks
            .iter()
            .filter(|h| !want_hooks.contains(h))
            .cloned()
            .collect(),
    }
}

/// Compares what the agent read back (`current`) with `desired`.
///
/// Contract: `current.apply(&diff_node(current, desired))` equals
/// `NodeState::of(desired)` for the Palisade-owned part of `current`; the
/// diff of a node already in the desired state is empty (nothing written on
/// a no-op sync); only chains and sets with Palisade's name prefixes are
/// ever deleted or destroyed. A chain is rewritten whole when its rule-id
/// list differs in any way; a set is swapped when its entries differ as
/// sets (order and covered duplicates do not count).
pub fn diff_node(current: &NodeState, desired: &NodeRuleset) -> NodeDiff {
    let mut diff = NodeDiff {
        ipv4: diff_table(&current.ipv4, &desired.ipv4),
        ipv6: diff_table(&current.ipv6, &desired.ipv6),
        ..Default::default()
    };
    for s in &desired.sets {
        match current.sets.get(&s.name) {
            None => diff.create_sets.push(s.clone()),
            Some(have)
                if have.family != s.family
                    || normalize_set_entries(have.entries.iter().copied()) != s.entries =>
            {
                diff.swap_sets.push(s.clone())
            }
            Some(_) => {}
        }
    }
    let wanted: BTreeSet<&str> = desired.sets.iter().map(|s| s.name.as_str()).collect();
    diff.destroy_sets = current
        .sets
        .keys()
        .filter(|n| is_palisade_set(n) && !wanted.contains(n.as_str()))
        .cloned()
        .collect();
    diff
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::api::Protocol;
    use crate::policy::node::{
        DISPATCH_IN_CHAIN, DISPATCH_MARKED_IN_CHAIN, INPUT_CHAIN, compile_node, policy_chain_name,
    };
    use crate::policy::testing::*;
    use crate::policy::{Direction, validate};

    fn ruleset(policies: &[crate::api::FirewallPolicy]) -> NodeRuleset {
        let valid: Vec<_> = policies.iter().map(|p| validate(p).unwrap()).collect();
        compile_node("web-1", &valid, &facts_with_nodes()).unwrap()
    }

    #[test]
    fn fresh_node_gets_everything_then_nothing() {
        let desired = ruleset(&[web_policy()]);
        let diff = diff_node(&NodeState::default(), &desired);
        // Top, failsafe, the two dispatch chains, flip, end, the policy's.
        assert_eq!(diff.ipv4.write_chains.len(), 7);
        assert_eq!(diff.ipv4.add_hooks, desired.ipv4.hooks);
        let mut state = NodeState::default();
        state.apply(&diff);
        assert_eq!(state, NodeState::of(&desired));
        assert!(diff_node(&state, &desired).is_empty());
    }

    #[test]
    fn changed_policy_rewrites_its_chain_only() {
        let before = ruleset(&[web_policy()]);
        let mut changed = web_policy();
        changed.spec.ingress.as_mut().unwrap()[1].peers[0].cidr = Some("198.51.100.0/24".into());
        let after = ruleset(&[changed]);
        let diff = diff_node(&NodeState::of(&before), &after);
        let written: Vec<&str> = diff
            .ipv4
            .write_chains
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(written, [policy_chain_name("web", Direction::Ingress)]);
        assert!(diff.ipv6.is_empty(), "the SSH rule is IPv4 only");
    }

    #[test]
    fn removed_policy_deletes_chains_hooks_and_sets() {
        let mut r = rule("db", Protocol::Tcp, &[5432], &[]);
        r.peers.push(node_peer(&[("role", "db")]));
        let before = ruleset(&[web_policy(), policy("db", vec![r], None)]);
        // nodes:role=db and failsafe:cluster, each family.
        assert_eq!(before.sets.len(), 4);
        let after = ruleset(&[web_policy()]);
        let diff = diff_node(&NodeState::of(&before), &after);
        assert_eq!(
            diff.ipv4.delete_chains,
            [policy_chain_name("db", Direction::Ingress)]
        );
        assert_eq!(
            diff.ipv4
                .write_chains
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            // The dispatch chains lose their jump to the db policy's chain;
            // the failsafe chain is untouched.
            [DISPATCH_IN_CHAIN, DISPATCH_MARKED_IN_CHAIN]
        );
        assert_eq!(diff.destroy_sets.len(), 2);
        let nothing = ruleset(&[]);
        let diff = diff_node(&NodeState::of(&after), &nothing);
        assert_eq!(diff.ipv4.remove_hooks, after.ipv4.hooks);
        assert_eq!(diff.ipv4.delete_chains.len(), 7);
    }

    #[test]
    fn foreign_chains_and_sets_are_never_touched() {
        let desired = ruleset(&[web_policy()]);
        let mut current = NodeState::of(&desired);
        current
            .ipv4
            .chains
            .insert("KUBE-SERVICES".into(), vec!["x".into()]);
        current.sets.insert(
            "cali40all-hosts".into(),
            SetState {
                family: IpFamily::V4,
                entries: vec![],
            },
        );
        assert!(diff_node(&current, &desired).is_empty());
    }

    #[test]
    fn drifted_rule_and_reordered_set_entries() {
        let r = rule(
            "many",
            Protocol::Tcp,
            &[22],
            &[
                "10.0.1.0/24",
                "10.0.2.0/24",
                "10.0.3.0/24",
                "10.0.4.0/24",
                "10.0.5.0/24",
            ],
        );
        let desired = ruleset(&[policy("p", vec![r], None)]);
        let mut current = NodeState::of(&desired);
        for s in current.sets.values_mut() {
            s.entries.reverse();
        }
        assert!(
            diff_node(&current, &desired).is_empty(),
            "entry order does not matter"
        );
        current
            .ipv4
            .chains
            .get_mut(INPUT_CHAIN)
            .unwrap()
            .insert(0, "inserted-by-hand".into());
        let diff = diff_node(&current, &desired);
        assert_eq!(
            diff.ipv4
                .write_chains
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            [INPUT_CHAIN]
        );
        current.apply(&diff);
        assert_eq!(current.ipv4, NodeState::of(&desired).ipv4);
    }
}
