//! Whether the Security Groups Palisade puts on a node fit its interface.
//!
//! AWS allows a few groups per network interface (5 by default, up to 16
//! with a quota raise). A node selected by several policies carries one
//! Palisade group for all its composable policies (their composed group,
//! see `compose`: one [`Slot::Shared`]) and one per other policy that
//! attaches a group of its own, next to the groups it had before Palisade
//! (its *foreign* groups). Before any EC2 write, a full
//! sync counts, for each node that would take its group, the groups that
//! node's interface would carry once every policy selecting it is applied;
//! a node over the quota takes no new group, and the policy says so in its
//! status, naming the node and the numbers (see [`InterfaceFit`]).
//!
//! Pure: the controller gathers the inputs (the interface's groups as last
//! described, and the groups the policies selecting the node need).

use std::collections::BTreeSet;
use std::fmt;

/// How the status warnings about nodes over the quota begin.
pub const WARNING_PREFIX: &str = "groups per interface: ";

/// One group a policy puts on the interfaces of the nodes it selects.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    /// A group that exists (`sg-...`): an owned group already created, or
    /// an adopted one (`spec.securityGroup.id`).
    Group(String),
    /// The group of a policy (by uid) that has not been created yet.
    Pending(String),
    /// The composed group of the node's composable policies (one slot
    /// however many; the key is empty: one node has one class).
    Shared(String),
}

/// How a node's interface would look with every Palisade group it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceFit {
    /// The node.
    pub node: String,
    /// Groups on the interface that no policy selecting the node needs and
    /// Palisade did not create: they stay.
    pub foreign: usize,
    /// The Palisade groups the node needs (one per distinct group of the
    /// policies selecting it).
    pub palisade: usize,
    /// The groups-per-interface quota.
    pub limit: u32,
}

impl InterfaceFit {
    /// Groups the interface would carry.
    pub fn total(&self) -> usize {
        self.foreign + self.palisade
    }

    /// Whether they fit the quota.
    pub fn fits(&self) -> bool {
        self.total() <= self.limit as usize
    }
}

impl fmt::Display for InterfaceFit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node {} would carry {} groups ({} foreign + {} Palisade); the interface quota is {} groups",
            self.node,
            self.total(),
            self.foreign,
            self.palisade,
            self.limit
        )
    }
}

/// Counts the groups `node`'s interface would carry: those it carries now
/// that are neither `needed` nor Palisade's own (`palisade`: every group
/// Palisade created, wherever it is attached, since a Palisade group a
/// policy no longer needs here is detached by that policy), plus one per
/// `needed` slot.
pub fn fit(
    node: &str,
    eni_groups: &[String],
    needed: &BTreeSet<Slot>,
    palisade: &BTreeSet<String>,
    limit: u32,
) -> InterfaceFit {
    let foreign = eni_groups
        .iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|g| !palisade.contains(*g) && !needed.contains(&Slot::Group((*g).clone())))
        .count();
    InterfaceFit {
        node: node.to_string(),
        foreign,
        palisade: needed.len(),
        limit,
    }
}

/// The message for the nodes that do not fit: at most `sample` of them
/// named, then how many more.
pub fn describe(unfit: &[InterfaceFit], sample: usize) -> Vec<String> {
    let mut lines: Vec<String> = unfit.iter().take(sample).map(ToString::to_string).collect();
    if unfit.len() > sample {
        lines.push(format!(
            "and {} more node(s) over the interface quota",
            unfit.len() - sample
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn foreign_groups_and_needed_groups_add_up() {
        let needed: BTreeSet<Slot> = [
            Slot::Group("sg-a".into()),
            Slot::Group("sg-b".into()),
            Slot::Pending("uid-c".into()),
        ]
        .into();
        let palisade: BTreeSet<String> = ["sg-a".into(), "sg-b".into(), "sg-old".into()].into();
        // Two foreign groups, one of ours already there, one old group of
        // ours (going away): 2 foreign + 3 Palisade.
        let f = fit(
            "ip-10-0-1-5",
            &s(&["sg-node", "sg-extra", "sg-a", "sg-old"]),
            &needed,
            &palisade,
            5,
        );
        assert_eq!((f.foreign, f.palisade, f.total()), (2, 3, 5));
        assert!(f.fits());
        let f = fit(
            "ip-10-0-1-5",
            &s(&["sg-node", "sg-extra", "sg-x", "sg-a"]),
            &needed,
            &palisade,
            5,
        );
        assert!(!f.fits());
        assert_eq!(
            f.to_string(),
            "node ip-10-0-1-5 would carry 6 groups (3 foreign + 3 Palisade); the interface quota is 5 groups"
        );
        // An adopted group already on the interface is needed, not foreign.
        let adopted: BTreeSet<Slot> = [Slot::Group("sg-node".into())].into();
        let f = fit("n", &s(&["sg-node"]), &adopted, &BTreeSet::new(), 5);
        assert_eq!((f.foreign, f.palisade), (0, 1));
    }

    #[test]
    fn the_message_is_bounded() {
        let unfit: Vec<InterfaceFit> = (0..12)
            .map(|i| InterfaceFit {
                node: format!("n{i}"),
                foreign: 5,
                palisade: 1,
                limit: 5,
            })
            .collect();
        let lines = describe(&unfit, 10);
        assert_eq!(lines.len(), 11);
        assert_eq!(lines[10], "and 2 more node(s) over the interface quota");
        assert_eq!(describe(&unfit[..1], 10).len(), 1);
    }
}
