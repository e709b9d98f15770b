//! Placement classes of nodes (see `compose`), computed once per snapshot
//! of node facts and set of selectors instead of once per node, policy and
//! reconcile.
//!
//! A node's class is the set of selector keys ([`shared::key`]) of the
//! composable policies selecting it ([`shared::class_of`], the reference).
//! Policies with one key have the same selector, so a [`ClassTable`]
//! evaluates each *distinct* selector once per node: N × S label matches
//! (S distinct selectors) to build, where computing each node's class from
//! every candidate costs N × P in every reconcile of a policy over N nodes.
//! A table then serves every reconcile until a node fact changes (a new
//! snapshot of node facts, see `cache`) or the set of selectors does: at
//! 5,000 nodes × 1,000 policies a scale-up or a resync builds it once, not
//! once per policy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Weak};

use super::shared::Candidate;
use super::{Context, lock};
use crate::cloud::Ec2;
use crate::policy::NodeFacts;

/// The class of every node of one snapshot, for one set of selectors.
#[derive(Debug)]
pub(crate) struct ClassTable {
    /// The snapshot it was built from (held weakly: a table never keeps an
    /// old snapshot alive, and a snapshot freed cannot be mistaken for a
    /// new one at the same address while this is held).
    nodes: Weak<Vec<NodeFacts>>,
    /// The distinct selector keys it evaluated, sorted.
    selectors: Vec<String>,
    /// Each distinct class once.
    classes: Vec<BTreeSet<String>>,
    /// Node name → its class (an index into `classes`).
    by_node: HashMap<String, usize>,
    /// The class of a node not in the snapshot.
    none: BTreeSet<String>,
}

/// The distinct selectors among `candidates`, by key (one policy each:
/// policies with one key select the same nodes).
fn distinct(candidates: &[Candidate]) -> BTreeMap<&str, &Candidate> {
    let mut out = BTreeMap::new();
    for c in candidates {
        out.entry(c.selector.as_str()).or_insert(c);
    }
    out
}

impl ClassTable {
    /// Every node's class among `nodes`, each distinct selector of
    /// `candidates` evaluated once per node.
    pub(crate) fn build(nodes: &Arc<Vec<NodeFacts>>, candidates: &[Candidate]) -> Self {
        let selectors = distinct(candidates);
        let mut classes: Vec<BTreeSet<String>> = Vec::new();
        let mut index: HashMap<BTreeSet<String>, usize> = HashMap::new();
        let mut by_node = HashMap::with_capacity(nodes.len());
        for node in nodes.iter() {
            let class: BTreeSet<String> = selectors
                .iter()
                .filter(|(_, c)| c.valid.selects(node))
                .map(|(k, _)| (*k).to_string())
                .collect();
            let at = match index.get(&class) {
                Some(at) => *at,
                None => {
                    classes.push(class.clone());
                    index.insert(class, classes.len() - 1);
                    classes.len() - 1
                }
            };
            by_node.insert(node.name.clone(), at);
        }
        ClassTable {
            nodes: Arc::downgrade(nodes),
            selectors: selectors.keys().map(|k| (*k).to_string()).collect(),
            classes,
            by_node,
            none: BTreeSet::new(),
        }
    }

    /// The class of node `name` (empty: no composable policy selects it,
    /// or it is not in the snapshot).
    pub(crate) fn class(&self, name: &str) -> &BTreeSet<String> {
        self.by_node
            .get(name)
            .and_then(|at| self.classes.get(*at))
            .unwrap_or(&self.none)
    }

    /// Every distinct class some node of the snapshot is in.
    pub(crate) fn live(&self) -> impl Iterator<Item = &BTreeSet<String>> {
        self.classes.iter()
    }

    /// Whether it was built from `nodes` for the selectors of `candidates`.
    fn serves(&self, nodes: &Arc<Vec<NodeFacts>>, candidates: &[Candidate]) -> bool {
        Weak::ptr_eq(&self.nodes, &Arc::downgrade(nodes))
            && self
                .selectors
                .iter()
                .map(String::as_str)
                .eq(distinct(candidates).into_keys())
    }
}

/// The table for `nodes` and `candidates`: the one held when it serves
/// them, else built and held (one table at a time: the newest snapshot).
pub(crate) fn table<E: Ec2>(
    ctx: &Context<E>,
    nodes: &Arc<Vec<NodeFacts>>,
    candidates: &[Candidate],
) -> Arc<ClassTable> {
    if let Some(t) = lock(&ctx.classes)
        .as_ref()
        .filter(|t| t.serves(nodes, candidates))
    {
        return t.clone();
    }
    let built = Arc::new(ClassTable::build(nodes, candidates));
    *lock(&ctx.classes) = Some(built.clone());
    built
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::api::{FirewallPolicy, NodeSelector, Protocol};
    use crate::controller::shared::{candidates, class_of};
    use crate::policy::testing::{policy, rule};
    use proptest::prelude::*;

    /// A composable policy with `labels` as its selector (none: every node).
    fn selecting(i: usize, labels: &[(String, String)]) -> Arc<FirewallPolicy> {
        let mut p = policy(
            &format!("p{i}"),
            vec![rule("ssh", Protocol::Tcp, &[22], &["10.0.0.0/8"])],
            None,
        );
        p.metadata.uid = Some(format!("uid-{i}"));
        p.spec.node_selector = (!labels.is_empty()).then(|| NodeSelector {
            match_labels: Some(labels.iter().cloned().collect()),
            match_expressions: None,
        });
        Arc::new(p)
    }

    fn node(i: usize, labels: &[(String, String)]) -> NodeFacts {
        NodeFacts {
            name: format!("n{i}"),
            labels: labels.iter().cloned().collect(),
            ..Default::default()
        }
    }

    /// Labels over a small alphabet, so selectors repeat and overlap.
    fn labels() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec(
            (0..3u8, 0..2u8).prop_map(|(k, v)| (format!("k{k}"), format!("v{v}"))),
            0..3,
        )
    }

    proptest! {
        /// The table gives every node the class computed from every
        /// candidate one by one (`shared::class_of`), whatever the
        /// selectors (repeated, overlapping, empty) and labels.
        #[test]
        fn the_table_is_the_naive_class_of_every_node(
            selectors in proptest::collection::vec(labels(), 0..12),
            node_labels in proptest::collection::vec(labels(), 0..30),
        ) {
            let all: Vec<Arc<FirewallPolicy>> = selectors
                .iter()
                .enumerate()
                .map(|(i, l)| selecting(i, l))
                .collect();
            let cands = candidates(&all, None);
            let nodes: Arc<Vec<NodeFacts>> = Arc::new(
                node_labels.iter().enumerate().map(|(i, l)| node(i, l)).collect(),
            );
            let table = ClassTable::build(&nodes, &cands);
            for n in nodes.iter() {
                prop_assert_eq!(table.class(&n.name), &class_of(&cands, n));
            }
            prop_assert!(table.class("not-a-node").is_empty());
            let live: BTreeSet<&BTreeSet<String>> = table.live().collect();
            let naive: Vec<BTreeSet<String>> = nodes.iter().map(|n| class_of(&cands, n)).collect();
            let naive: BTreeSet<&BTreeSet<String>> = naive.iter().collect();
            prop_assert_eq!(live, naive);
        }
    }

    #[test]
    fn a_table_serves_its_snapshot_and_selectors_only() {
        let l = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let all = vec![selecting(0, &l("role", "web")), selecting(1, &[])];
        let cands = candidates(&all, None);
        let nodes = Arc::new(vec![node(0, &l("role", "web")), node(1, &l("role", "db"))]);
        let table = ClassTable::build(&nodes, &cands);
        assert!(table.serves(&nodes, &cands));
        assert_eq!(table.class("n0").len(), 2);
        assert_eq!(table.class("n1").len(), 1);
        // Another policy with a selector already there: the same table.
        let more = vec![
            all[0].clone(),
            all[1].clone(),
            selecting(2, &l("role", "web")),
        ];
        assert!(table.serves(&nodes, &candidates(&more, None)));
        // A new selector, or a new snapshot (same content): rebuilt.
        let other = vec![all[0].clone(), selecting(3, &l("role", "db"))];
        assert!(!table.serves(&nodes, &candidates(&other, None)));
        let copy = Arc::new(nodes.as_ref().clone());
        assert!(!table.serves(&copy, &cands));
    }
}
