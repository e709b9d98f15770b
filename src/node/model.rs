//! The cached model of what Palisade last wrote, and the rule-level edits
//! that take it to a new [`NodeRuleset`]. Pure.
//!
//! The dataplane trusts the model between verifications (see
//! [`super::dataplane`]): a sync compares the desired ruleset with the
//! model, not with the kernel, so a no-op sync reads nothing and spawns no
//! process, and a change writes only the difference:
//!
//! - a rule added to or removed from an existing chain is one
//!   `-I CHAIN <pos>` / `-A CHAIN` / `-D CHAIN <spec>` line; an existing
//!   chain is never redeclared (`:CHAIN` under `--noflush` flushes it and
//!   costs as much as a large write on the nft backend) unless most of it
//!   changes;
//! - a set's membership changes by `add` then `del` lines: the set is a
//!   superset of old and new while the change is written;
//! - deletes are by rule text, never by number, so a rule the model has
//!   wrong is not taken for another: the transaction fails and the
//!   dataplane falls back to a full read and rewrite.
//!
//! Positions: within one transaction every delete comes first; the
//! chain then holds the kept rules in their desired relative order, and
//! each missing rule is inserted, in ascending desired position, at the
//! position it has in the desired chain.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use ipnet::IpNet;

use super::render::rule_spec;
use crate::policy::node::{FamilyRuleset, Hook, IpSet, NodeChain, NodeRuleset};
use crate::policy::{IpFamily, NodeState, SetState};

/// One family's chains as last written: name → (rule id, rule text) in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableModel {
    /// Chain name → its rules in order: (id, specification without `-A CHAIN`).
    pub chains: BTreeMap<String, Vec<(String, String)>>,
    /// Hooks at the head of their built-in chain.
    pub hooks: BTreeSet<Hook>,
}

/// The (id, specification) of `chain`'s rules, each specification taken
/// from `known` (the chain's rules as last written) when it has the id,
/// rendered otherwise. An id determines its rule's specification (it is a
/// hash of the family, chain, matches, action and origin), so a rule
/// already written is never rendered again: a change to a chain of 1,000
/// rules renders only the rules it adds.
pub fn chain_specs(
    chain: &NodeChain,
    family: IpFamily,
    known: Option<&[(String, String)]>,
) -> Vec<(String, String)> {
    let Some(known) = known.filter(|k| !k.is_empty()) else {
        return chain
            .rules
            .iter()
            .map(|r| (r.id.clone(), rule_spec(r, family)))
            .collect();
    };
    if known.len() == chain.rules.len()
        && known
            .iter()
            .zip(&chain.rules)
            .all(|((id, _), r)| *id == r.id)
    {
        return known.to_vec();
    }
    let by_id: HashMap<&str, &str> = known
        .iter()
        .map(|(id, spec)| (id.as_str(), spec.as_str()))
        .collect();
    chain
        .rules
        .iter()
        .map(|r| {
            let spec = match by_id.get(r.id.as_str()) {
                Some(spec) => spec.to_string(),
                None => rule_spec(r, family),
            };
            (r.id.clone(), spec)
        })
        .collect()
}

impl TableModel {
    fn of(family: &FamilyRuleset, known: Option<&TableModel>) -> TableModel {
        TableModel {
            chains: family
                .chains
                .iter()
                .map(|c| {
                    let known = known.and_then(|k| k.chains.get(&c.name));
                    let rules = chain_specs(c, family.family, known.map(Vec::as_slice));
                    (c.name.clone(), rules)
                })
                .collect(),
            hooks: family.hooks.iter().cloned().collect(),
        }
    }

    /// The rule ids of `chain`, as the model has them.
    pub fn ids(&self, chain: &str) -> Option<Vec<&str>> {
        self.chains
            .get(chain)
            .map(|rules| rules.iter().map(|(id, _)| id.as_str()).collect())
    }
}

/// Id of a rule the model does not know (found by a listing after drift).
pub const UNKNOWN_RULE: &str = "?";

/// The model of a chain whose content is not known: it is written whole
/// (declared, which flushes it, and filled), or deleted, by the next plan.
pub fn unknown_chain() -> Vec<(String, String)> {
    vec![(UNKNOWN_RULE.to_string(), String::new())]
}

/// Marks a chain of the model as not known (a listing after drift found
/// it otherwise): the next plan writes it whole, or deletes it. Its rules
/// as last written stay, after the mark, for their specifications to be
/// reused ([`chain_specs`]).
pub fn mark_unknown(rules: &mut Vec<(String, String)>) {
    if rules.first().is_none_or(|(id, _)| id != UNKNOWN_RULE) {
        rules.insert(0, (UNKNOWN_RULE.to_string(), String::new()));
    }
}

/// What Palisade last wrote to a node (both families and the sets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// iptables.
    pub ipv4: TableModel,
    /// ip6tables.
    pub ipv6: TableModel,
    /// Set name → family and entries (sorted, as written).
    pub sets: BTreeMap<String, SetState>,
}

impl Model {
    /// The model of a node on which `ruleset` is fully programmed.
    pub fn of(ruleset: &NodeRuleset) -> Model {
        Model::of_with(ruleset, None)
    }

    /// [`Model::of`], taking the specifications of rules `known` has
    /// (a previous model) from it instead of rendering them again.
    pub fn of_with(ruleset: &NodeRuleset, known: Option<&Model>) -> Model {
        Model {
            ipv4: TableModel::of(&ruleset.ipv4, known.map(|k| &k.ipv4)),
            ipv6: TableModel::of(&ruleset.ipv6, known.map(|k| &k.ipv6)),
            sets: ruleset
                .sets
                .iter()
                .map(|s| {
                    let mut entries = s.entries.clone();
                    entries.sort();
                    (
                        s.name.clone(),
                        SetState {
                            family: s.family,
                            entries,
                        },
                    )
                })
                .collect(),
        }
    }

    /// Takes `edits` (planned from this model towards `desired`, and
    /// written) into the model: O(what changed), not O(ruleset), so a small
    /// change costs little whatever the size of the ruleset.
    pub fn update(&mut self, desired: &NodeRuleset, edits: &NodeEdits) {
        for (table, want, e) in [
            (&mut self.ipv4, &desired.ipv4, &edits.ipv4),
            (&mut self.ipv6, &desired.ipv6, &edits.ipv6),
        ] {
            for name in e.chains_written() {
                if let Some(chain) = want.chain(name) {
                    let known = table.chains.get(name).map(Vec::as_slice);
                    let rules = chain_specs(chain, want.family, known);
                    table.chains.insert(name.to_string(), rules);
                }
            }
            for name in &e.delete_chains {
                table.chains.remove(name);
            }
            for h in &e.remove_hooks {
                table.hooks.remove(h);
            }
            table.hooks.extend(e.add_hooks.iter().cloned());
        }
        let changed = edits
            .create_sets
            .iter()
            .map(|s| s.name.as_str())
            .chain(edits.set_changes.iter().map(|c| c.name.as_str()));
        for name in changed {
            if let Some(s) = desired.set(name) {
                let mut entries = s.entries.clone();
                entries.sort();
                self.sets.insert(
                    name.to_string(),
                    SetState {
                        family: s.family,
                        entries,
                    },
                );
            }
        }
        for name in &edits.destroy_sets {
            self.sets.remove(name);
        }
    }

    /// The table of `family`.
    pub fn table(&self, family: IpFamily) -> &TableModel {
        match family {
            IpFamily::V4 => &self.ipv4,
            IpFamily::V6 => &self.ipv6,
        }
    }

    /// The table of `family`, to change.
    pub fn table_mut(&mut self, family: IpFamily) -> &mut TableModel {
        match family {
            IpFamily::V4 => &mut self.ipv4,
            IpFamily::V6 => &mut self.ipv6,
        }
    }

    /// The model as a [`NodeState`] (ids only), e.g. to compare with a read-back.
    pub fn state(&self) -> NodeState {
        let table = |t: &TableModel| crate::policy::TableState {
            chains: t
                .chains
                .iter()
                .map(|(name, rules)| {
                    (
                        name.clone(),
                        rules.iter().map(|(id, _)| id.clone()).collect(),
                    )
                })
                .collect(),
            hooks: t.hooks.clone(),
        };
        NodeState {
            ipv4: table(&self.ipv4),
            ipv6: table(&self.ipv6),
            sets: self.sets.clone(),
        }
    }
}

/// Rule-level changes to one existing chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainEdit {
    /// The chain.
    pub chain: String,
    /// Rules to delete, by their full specification (`-D CHAIN <spec>`).
    pub deletes: Vec<String>,
    /// Rules to insert, in ascending position: (1-based position, spec);
    /// `None` position appends (`-A`).
    pub inserts: Vec<(Option<usize>, String)>,
}

/// Changes to one family's table, as rule-level edits where they are cheap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableEdits {
    /// Chains to declare and fill whole: new ones, and existing ones most
    /// of which change (declaring flushes them).
    pub whole: Vec<NodeChain>,
    /// Rule-level edits of existing chains.
    pub edits: Vec<ChainEdit>,
    /// Chains to flush and delete, last.
    pub delete_chains: Vec<String>,
    /// Hooks to insert at position 1.
    pub add_hooks: Vec<Hook>,
    /// Hooks to delete by their text.
    pub remove_hooks: Vec<Hook>,
}

impl TableEdits {
    /// True when the table needs no write.
    pub fn is_empty(&self) -> bool {
        self.whole.is_empty()
            && self.edits.is_empty()
            && self.delete_chains.is_empty()
            && self.add_hooks.is_empty()
            && self.remove_hooks.is_empty()
    }

    /// The chains written (whole or edited): what a write is checked by.
    pub fn chains_written(&self) -> Vec<&str> {
        self.whole
            .iter()
            .map(|c| c.name.as_str())
            .chain(self.edits.iter().map(|e| e.chain.as_str()))
            .collect()
    }

    /// Number of rule lines written (appends, inserts and deletes).
    pub fn rule_lines(&self) -> usize {
        self.whole.iter().map(|c| c.rules.len()).sum::<usize>()
            + self
                .edits
                .iter()
                .map(|e| e.deletes.len() + e.inserts.len())
                .sum::<usize>()
    }
}

/// Membership changes of one existing set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetChange {
    /// The set.
    pub name: String,
    /// Entries to add (written before any table change).
    pub add: Vec<IpNet>,
    /// Entries to delete (written after the tables no longer need them).
    pub del: Vec<IpNet>,
}

/// Everything a sync changes, relative to the model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeEdits {
    /// Sets to create and fill.
    pub create_sets: Vec<IpSet>,
    /// Membership changes.
    pub set_changes: Vec<SetChange>,
    /// iptables.
    pub ipv4: TableEdits,
    /// ip6tables.
    pub ipv6: TableEdits,
    /// Sets to destroy, last.
    pub destroy_sets: Vec<String>,
}

impl NodeEdits {
    /// True on a no-op.
    pub fn is_empty(&self) -> bool {
        self.create_sets.is_empty()
            && self.set_changes.is_empty()
            && self.destroy_sets.is_empty()
            && self.ipv4.is_empty()
            && self.ipv6.is_empty()
    }
}

/// Longest strictly increasing subsequence of `seq`: the indices into
/// `seq` of its members (O(n log n)).
fn longest_increasing(seq: &[usize]) -> Vec<usize> {
    // tails[k]: index into seq of the smallest tail of an increasing run of length k+1.
    let mut tails: Vec<usize> = Vec::new();
    let mut prev: Vec<Option<usize>> = vec![None; seq.len()];
    for (i, &v) in seq.iter().enumerate() {
        let k = tails.partition_point(|&t| seq[t] < v);
        if k > 0 {
            prev[i] = Some(tails[k - 1]);
        }
        if k == tails.len() {
            tails.push(i);
        } else {
            tails[k] = i;
        }
    }
    let mut out = Vec::with_capacity(tails.len());
    let mut cur = tails.last().copied();
    while let Some(i) = cur {
        out.push(i);
        cur = prev[i];
    }
    out.reverse();
    out
}

/// Edits of one existing chain from `current` (id, spec) to `desired`, or
/// `None` when writing the chain whole is cheaper (most of it changes).
pub fn edit_chain(
    current: &[(String, String)],
    desired: &NodeChain,
    family: IpFamily,
) -> Option<ChainEdit> {
    // Deletes are by text: with two copies of one rule, which one goes
    // would be ambiguous. Palisade never writes copies; a whole write
    // settles whatever did.
    if !unique(current.iter().map(|(id, _)| id.as_str()))
        || !unique(desired.rules.iter().map(|r| r.id.as_str()))
    {
        return None;
    }
    let specs = chain_specs(desired, family, Some(current));
    let want: Vec<(&str, String)> = specs
        .into_iter()
        .zip(&desired.rules)
        .map(|((_, spec), r)| (r.id.as_str(), spec))
        .collect();
    let (edit, kept) = edit_rules(&desired.name, current, &want);
    let changed = edit.deletes.len() + edit.inserts.len();
    (changed <= 64 || changed <= kept).then_some(edit)
}

fn unique<'a>(mut ids: impl Iterator<Item = &'a str>) -> bool {
    let mut seen = std::collections::HashSet::new();
    ids.all(|id| seen.insert(id))
}

/// The edit taking `current` to `want` (both (id, spec) in order) and the
/// number of rules it keeps: the longest run of rules common to both in
/// the same order stays, everything else is deleted or inserted.
fn edit_rules(
    chain: &str,
    current: &[(String, String)],
    want: &[(&str, String)],
) -> (ChainEdit, usize) {
    // Match the k-th occurrence of an id in `want` with its k-th in `current`.
    let mut positions: HashMap<&str, VecDeque<usize>> = HashMap::new();
    for (i, (id, _)) in current.iter().enumerate() {
        positions.entry(id.as_str()).or_default().push_back(i);
    }
    let matched: Vec<(usize, usize)> = want
        .iter()
        .enumerate()
        .filter_map(|(j, (id, _))| Some((j, positions.get_mut(id)?.pop_front()?)))
        .collect();
    let seq: Vec<usize> = matched.iter().map(|&(_, i)| i).collect();
    let keep = longest_increasing(&seq);
    let kept_want: BTreeSet<usize> = keep.iter().map(|&k| matched[k].0).collect();
    let kept_current: BTreeSet<usize> = keep.iter().map(|&k| matched[k].1).collect();
    let deletes = current
        .iter()
        .enumerate()
        .filter(|(i, _)| !kept_current.contains(i))
        .map(|(_, (_, spec))| spec.clone())
        .collect();
    let mut len = kept_current.len();
    let mut inserts = Vec::new();
    for (j, (_, spec)) in want.iter().enumerate() {
        if kept_want.contains(&j) {
            continue;
        }
        inserts.push(((j < len).then_some(j + 1), spec.clone()));
        len += 1;
    }
    let edit = ChainEdit {
        chain: chain.to_string(),
        deletes,
        inserts,
    };
    (edit, keep.len())
}

/// The table edits from `current` to `desired` (pure).
pub fn edit_table(current: &TableModel, desired: &FamilyRuleset) -> TableEdits {
    let mut out = TableEdits::default();
    for chain in &desired.chains {
        match current.chains.get(&chain.name) {
            None => out.whole.push(chain.clone()),
            Some(have)
                if have.len() == chain.rules.len()
                    && have
                        .iter()
                        .zip(&chain.rules)
                        .all(|((id, _), r)| *id == r.id) => {}
            Some(have) if have.iter().any(|(id, _)| id == UNKNOWN_RULE) => {
                out.whole.push(chain.clone())
            }
            Some(have) => match edit_chain(have, chain, desired.family) {
                Some(edit) => out.edits.push(edit),
                None => out.whole.push(chain.clone()),
            },
        }
    }
    let wanted: BTreeSet<&str> = desired.chains.iter().map(|c| c.name.as_str()).collect();
    out.delete_chains = current
        .chains
        .keys()
        .filter(|n| !wanted.contains(n.as_str()))
        .cloned()
        .collect();
    out.add_hooks = desired
        .hooks
        .iter()
        .filter(|h| !current.hooks.contains(h))
        .cloned()
        .collect();
    let want_hooks: BTreeSet<&Hook> = desired.hooks.iter().collect();
    out.remove_hooks = current
        .hooks
        .iter()
        .filter(|h| !want_hooks.contains(h))
        .cloned()
        .collect();
    out
}

/// Entries of `want` missing from `have` and entries of `have` not in
/// `want`; both inputs sorted (merge walk, O(n)).
pub fn set_delta(have: &[IpNet], want: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    let (mut add, mut del) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < have.len() || j < want.len() {
        match (have.get(i), want.get(j)) {
            (Some(h), Some(w)) if h == w => {
                i += 1;
                j += 1;
            }
            (Some(h), Some(w)) if h < w => {
                del.push(*h);
                i += 1;
            }
            (_, Some(w)) => {
                add.push(*w);
                j += 1;
            }
            (Some(h), None) => {
                del.push(*h);
                i += 1;
            }
            (None, None) => break,
        }
    }
    (add, del)
}

/// Everything that takes a node from `model` to `desired` (pure). Sets
/// whose family changed (never written so by Palisade) are not handled
/// here: the dataplane does a full rewrite for those.
pub fn edit_node(model: &Model, desired: &NodeRuleset) -> NodeEdits {
    let mut out = NodeEdits {
        ipv4: edit_table(&model.ipv4, &desired.ipv4),
        ipv6: edit_table(&model.ipv6, &desired.ipv6),
        ..Default::default()
    };
    for s in &desired.sets {
        match model.sets.get(&s.name) {
            None => out.create_sets.push(s.clone()),
            Some(have) if have.entries == s.entries => {}
            Some(have) => {
                let mut want = s.entries.clone();
                want.sort();
                let (add, del) = set_delta(&have.entries, &want);
                if !add.is_empty() || !del.is_empty() {
                    out.set_changes.push(SetChange {
                        name: s.name.clone(),
                        add,
                        del,
                    });
                }
            }
        }
    }
    let wanted: BTreeSet<&str> = desired.sets.iter().map(|s| s.name.as_str()).collect();
    out.destroy_sets = model
        .sets
        .keys()
        .filter(|n| !wanted.contains(n.as_str()))
        .cloned()
        .collect();
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Applies an edit to a list of ids the way iptables-restore does.
    fn apply(
        current: &[(String, String)],
        edit: &ChainEdit,
        by_spec: &HashMap<String, String>,
    ) -> Vec<String> {
        let mut rules: Vec<(String, String)> = current.to_vec();
        for spec in &edit.deletes {
            let i = rules.iter().position(|(_, s)| s == spec).unwrap();
            rules.remove(i);
        }
        for (pos, spec) in &edit.inserts {
            let r = (by_spec[spec].clone(), spec.clone());
            match pos {
                Some(p) => {
                    assert!(
                        *p >= 1 && *p <= rules.len(),
                        "insert at {p} of {}",
                        rules.len()
                    );
                    rules.insert(p - 1, r)
                }
                None => rules.push(r),
            }
        }
        rules.into_iter().map(|(id, _)| id).collect()
    }

    /// Rules with distinct ids (the first copy of each id is kept).
    fn chain_of(ids: &[u8]) -> (Vec<(String, String)>, Vec<String>) {
        let mut seen = BTreeSet::new();
        let ids: Vec<u8> = ids.iter().copied().filter(|i| seen.insert(*i)).collect();
        let rules = ids
            .iter()
            .map(|i| (format!("{i:016x}"), format!("-s 10.0.0.{i} -j RETURN")))
            .collect();
        (rules, ids.iter().map(|i| format!("{i:016x}")).collect())
    }

    #[test]
    fn lis_finds_a_longest_run() {
        assert_eq!(longest_increasing(&[3, 1, 2, 5, 4, 6]).len(), 4);
        assert!(longest_increasing(&[]).is_empty());
    }

    #[test]
    fn set_delta_merges_sorted_lists() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let have = [n("10.0.0.0/8"), n("10.1.0.0/16"), n("11.0.0.0/8")];
        let want = [n("10.0.0.0/8"), n("12.0.0.0/8")];
        assert_eq!(
            set_delta(&have, &want),
            (
                vec![n("12.0.0.0/8")],
                vec![n("10.1.0.0/16"), n("11.0.0.0/8")]
            )
        );
    }

    #[test]
    fn update_after_edits_equals_the_model_of_the_desired_ruleset() {
        use crate::api::Protocol;
        use crate::policy::node::compile_node;
        use crate::policy::testing::*;
        use crate::policy::validate;
        let compile = |ps: &[crate::api::FirewallPolicy]| {
            let valid: Vec<_> = ps.iter().map(|p| validate(p).unwrap()).collect();
            compile_node("web-1", &valid, &facts_with_nodes()).unwrap()
        };
        let before = compile(&[web_policy()]);
        let mut r = rule("db", Protocol::Tcp, &[5432], &[]);
        r.peers.push(node_peer(&[("role", "db")]));
        let mut changed = web_policy();
        changed.spec.ingress.as_mut().unwrap()[1].peers[0].cidr = Some("198.51.100.0/24".into());
        for after in [
            compile(&[changed, policy("db", vec![r], None)]),
            compile(&[]),
        ] {
            let mut model = Model::of(&before);
            let edits = edit_node(&model, &after);
            model.update(&after, &edits);
            assert_eq!(model, Model::of(&after));
            assert!(edit_node(&model, &after).is_empty());
        }
    }

    #[test]
    fn specs_already_written_are_reused_and_a_chain_marked_unknown_is_written_whole() {
        use crate::api::Protocol;
        use crate::policy::node::compile_node;
        use crate::policy::testing::*;
        use crate::policy::validate;
        let compile = |ps: &[crate::api::FirewallPolicy]| {
            let valid: Vec<_> = ps.iter().map(|p| validate(p).unwrap()).collect();
            compile_node("web-1", &valid, &facts_with_nodes()).unwrap()
        };
        let before = compile(&[web_policy()]);
        let mut changed = web_policy();
        changed.spec.ingress.as_mut().unwrap()[1].peers[0].cidr = Some("198.51.100.0/24".into());
        let mut r = rule("db", Protocol::Tcp, &[5432], &[]);
        r.peers.push(node_peer(&[("role", "db")]));
        let after = compile(&[changed, policy("db", vec![r], None)]);
        let old = Model::of(&before);
        // Reused or rendered, every specification is the rendered one.
        assert_eq!(Model::of_with(&after, Some(&old)), Model::of(&after));
        for c in &after.ipv4.chains {
            let known = old.ipv4.chains.get(&c.name).map(Vec::as_slice);
            let fresh: Vec<_> = c
                .rules
                .iter()
                .map(|r| (r.id.clone(), rule_spec(r, IpFamily::V4)))
                .collect();
            assert_eq!(chain_specs(c, IpFamily::V4, known), fresh);
        }
        // A chain marked unknown (drift) is written whole, and the model
        // after the write is the model of what was written.
        let mut model = old.clone();
        let chain = before.ipv4.chains.last().unwrap().name.clone();
        mark_unknown(model.ipv4.chains.get_mut(&chain).unwrap());
        mark_unknown(model.ipv4.chains.get_mut(&chain).unwrap());
        assert_eq!(
            model.ipv4.chains[&chain].len(),
            old.ipv4.chains[&chain].len() + 1
        );
        let edits = edit_node(&model, &before);
        assert_eq!(edits.ipv4.whole.len(), 1);
        assert_eq!(edits.ipv4.whole[0].name, chain);
        model.update(&before, &edits);
        assert_eq!(model, old);
    }

    proptest! {
        /// Whatever the two chains, the edit turns one into the other and
        /// every insert position is valid at the time it runs.
        #[test]
        fn edits_turn_current_into_desired(
            cur in proptest::collection::vec(0u8..40, 0..30),
            want in proptest::collection::vec(0u8..40, 0..30),
        ) {
            let (current, _) = chain_of(&cur);
            let (desired_rules, want_ids) = chain_of(&want);
            let by_spec: HashMap<String, String> = desired_rules
                .iter()
                .map(|(id, s)| (s.clone(), id.clone()))
                .collect();
            let want: Vec<(&str, String)> = desired_rules
                .iter()
                .map(|(id, s)| (id.as_str(), s.clone()))
                .collect();
            let (edit, kept) = edit_rules("C", &current, &want);
            prop_assert_eq!(edit.deletes.len() + kept, current.len());
            let got = apply(&current, &edit, &by_spec);
            prop_assert_eq!(got, want_ids);
        }
    }
}
