//! Rendering, pure: a [`NodeRuleset`] or a [`NodeDiff`] → the exact text fed
//! to `iptables-restore --noflush` / `ip6tables-restore --noflush` (filter
//! table) and to `ipset restore`.
//!
//! Contract of a table script (one transaction per family):
//! - every chain written or deleted is declared `:NAME - [0:0]`, which in
//!   `--noflush` mode creates it if missing and flushes it otherwise;
//! - hooks to remove are deleted by their full rule text (`-D INPUT <spec>`),
//!   never by number, before the chains they jump to go away;
//! - written chains are filled with `-A`;
//! - hooks to add are inserted at position 1 (`-I INPUT 1 <spec>`);
//! - deleted chains are removed with `-X` last, once flushed and no longer
//!   referenced.
//!
//! Contract of a set script: a new set is created directly (`-exist`) and
//! filled; a set whose content changes is built under a temporary name
//! ([`temporary_set_name`]), swapped in and the temporary destroyed, so the
//! live set is never empty. Destroying sets is a separate script run after
//! the tables no longer reference them.

use std::fmt::Write as _;

use super::model::{ChainEdit, Model, NodeEdits, SetChange, TableEdits, TableModel};
use crate::policy::node::{
    AddrSide, Address, AllowTarget, Hook, IpSet, L4Protocol, MARK_BIT, NodeAction, NodeChain,
    NodeRule, NodeRuleset,
};
use crate::policy::{FamilyRuleset, IpFamily, TableDiff};

/// Suffix of the temporary set a new content is built in before the swap.
pub const TEMPORARY_SET_SUFFIX: &str = "-new";

/// The largest number of entries a Palisade set accepts.
pub const SET_MAXELEM: usize = 1 << 20;

/// The temporary name a set's new content is built under (still a
/// `PAL-` name, so a leftover from a crash is cleaned up as stale).
pub fn temporary_set_name(set: &str) -> String {
    format!("{set}{TEMPORARY_SET_SUFFIX}")
}

/// Whether `word` goes to iptables-restore as it is.
fn plain(word: &str) -> bool {
    !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:,=@+".contains(&b))
}

/// Writes `word` for iptables-restore, quoted when it needs it (spaces,
/// quotes).
fn push_quoted(out: &mut String, word: &str) {
    if plain(word) {
        out.push_str(word);
        return;
    }
    out.reserve(word.len() + 2);
    out.push('"');
    for c in word.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Quotes a word for iptables-restore when it needs it (spaces, quotes).
fn quote(word: &str) -> String {
    let mut out = String::with_capacity(word.len() + 2);
    push_quoted(&mut out, word);
    out
}

/// The rule specification (everything after `-A <chain> `) of a rule.
/// Order: interface, conntrack, protocol and port or ICMP type, peer,
/// comment, then the limit match and the target.
///
/// Written into one string, word by word: 10k rules are rendered in
/// milliseconds when a node is programmed from empty.
pub fn rule_spec(rule: &NodeRule, family: IpFamily) -> String {
    let mut out = String::with_capacity(160);
    // Writing to a String cannot fail.
    let _ = write_rule_spec(&mut out, rule, family);
    out
}

fn write_rule_spec(out: &mut String, rule: &NodeRule, family: IpFamily) -> std::fmt::Result {
    let m = &rule.matches;
    // Separates the parts: a space before each but the first.
    let sep = |out: &mut String| {
        if !out.is_empty() {
            out.push(' ');
        }
    };
    match &m.interface {
        Some(crate::policy::InterfaceMatch::In(i)) => {
            out.push_str("-i ");
            push_quoted(out, i);
        }
        Some(crate::policy::InterfaceMatch::Out(i)) => {
            out.push_str("-o ");
            push_quoted(out, i);
        }
        None => {}
    }
    if let Some(set) = m.mark {
        let value = if set { MARK_BIT } else { 0 };
        sep(out);
        write!(out, "-m mark --mark {value:#x}/{MARK_BIT:#x}")?;
    }
    if !m.ct_states.is_empty() {
        sep(out);
        out.push_str("-m conntrack --ctstate ");
        for (i, s) in m.ct_states.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(s.name());
        }
    }
    if let Some(p) = m.protocol {
        sep(out);
        out.push_str("-p ");
        out.push_str(p.name());
        match p {
            L4Protocol::Tcp | L4Protocol::Udp => {
                if let Some(d) = m.dports {
                    write!(out, " -m {} --dport {}", p.name(), d.first)?;
                    if d.first != d.last {
                        write!(out, ":{}", d.last)?;
                    }
                }
            }
            L4Protocol::Icmp | L4Protocol::Icmpv6 => {
                if let Some(i) = m.icmp {
                    if family == IpFamily::V6 || p == L4Protocol::Icmpv6 {
                        write!(out, " -m icmp6 --icmpv6-type {}", i.icmp_type)?;
                    } else {
                        write!(out, " -m icmp --icmp-type {}", i.icmp_type)?;
                    }
                    if let Some(c) = i.code {
                        write!(out, "/{c}")?;
                    }
                }
            }
        }
    }
    if let Some(peer) = &m.peer {
        sep(out);
        match (&peer.address, peer.side) {
            (Address::Cidr(net), AddrSide::Source) => write!(out, "-s {net}")?,
            (Address::Cidr(net), AddrSide::Destination) => write!(out, "-d {net}")?,
            (Address::Set(name), side) => {
                out.push_str("-m set --match-set ");
                push_quoted(out, name);
                out.push_str(match side {
                    AddrSide::Source => " src",
                    AddrSide::Destination => " dst",
                });
            }
        }
    }
    sep(out);
    out.push_str("-m comment --comment ");
    push_quoted(out, &rule.comment());
    match &rule.action {
        NodeAction::Accept => out.push_str(" -j ACCEPT"),
        NodeAction::Return => out.push_str(" -j RETURN"),
        NodeAction::Drop => out.push_str(" -j DROP"),
        NodeAction::Jump { chain } => {
            out.push_str(" -j ");
            push_quoted(out, chain);
        }
        NodeAction::Goto { chain } => {
            out.push_str(" -g ");
            push_quoted(out, chain);
        }
        NodeAction::FlipMark => write!(out, " -j MARK --xor-mark {MARK_BIT:#x}")?,
        NodeAction::Count => {}
        NodeAction::Log { prefix, limit } => {
            write!(
                out,
                " -m limit --limit {}/{} --limit-burst {} -j LOG --log-prefix ",
                limit.count,
                limit.per.name(),
                limit.burst
            )?;
            push_quoted(out, prefix);
        }
        NodeAction::AllowUnderLimit { limit, allow } => {
            write!(
                out,
                " -m hashlimit --hashlimit-upto {}/{} --hashlimit-burst {} --hashlimit-mode {} --hashlimit-name ",
                limit.count,
                limit.per.name(),
                limit.burst,
                match limit.per_address {
                    AddrSide::Source => "srcip",
                    AddrSide::Destination => "dstip",
                },
            )?;
            push_quoted(out, &limit.name);
            match allow {
                AllowTarget::Return => out.push_str(" -j RETURN"),
                AllowTarget::Accept => out.push_str(" -j ACCEPT"),
                AllowTarget::Flip { chain } => {
                    out.push_str(" -g ");
                    push_quoted(out, chain);
                }
            }
        }
    }
    Ok(())
}

/// The rule specification of a hook (`<builtin> -m comment ... -j <target>`
/// without the `-A`/`-I`/`-D` verb).
pub fn hook_spec(hook: &Hook) -> String {
    format!(
        "{} -m comment --comment {} -j {}",
        hook.builtin.name(),
        quote(&hook.comment()),
        hook.target
    )
}

/// Appends `-A` lines filling `chain`, taking each rule's specification
/// from `specs` (a model's rules of the same chain) when it has the rule's
/// id, rendering it otherwise: a chain programmed from empty is rendered
/// once (into the model), a chain rewritten after drift not at all.
fn push_chain(out: &mut String, chain: &NodeChain, family: IpFamily, specs: Option<&TableModel>) {
    let known = specs
        .and_then(|m| m.chains.get(&chain.name))
        .filter(|rules| !rules.is_empty());
    let Some(known) = known else {
        for r in &chain.rules {
            let _ = writeln!(out, "-A {} {}", chain.name, rule_spec(r, family));
        }
        return;
    };
    if known.len() == chain.rules.len()
        && known
            .iter()
            .zip(&chain.rules)
            .all(|((id, _), r)| *id == r.id)
    {
        for (_, spec) in known {
            let _ = writeln!(out, "-A {} {spec}", chain.name);
        }
        return;
    }
    let by_id: std::collections::HashMap<&str, &str> = known
        .iter()
        .map(|(id, spec)| (id.as_str(), spec.as_str()))
        .collect();
    for r in &chain.rules {
        match by_id.get(r.id.as_str()) {
            Some(spec) => {
                let _ = writeln!(out, "-A {} {spec}", chain.name);
            }
            None => {
                let _ = writeln!(out, "-A {} {}", chain.name, rule_spec(r, family));
            }
        }
    }
}

/// The `iptables-restore --noflush` input for one family's [`TableDiff`]
/// (whole chains), or `None` when there is nothing to write.
/// `extra_deletes` are full rule specifications (`INPUT -m comment ... -j
/// X`) to delete before anything else, e.g. hook copies found away from
/// position 1.
pub fn render_table(
    diff: &TableDiff,
    family: IpFamily,
    extra_deletes: &[String],
) -> Option<String> {
    render_table_with(diff, family, extra_deletes, None)
}

/// [`render_table`], taking the rules' specifications from `specs` (the
/// model of the desired table) where it has them.
pub fn render_table_with(
    diff: &TableDiff,
    family: IpFamily,
    extra_deletes: &[String],
    specs: Option<&TableModel>,
) -> Option<String> {
    let write = TableWrite {
        whole: &diff.write_chains,
        edits: &[],
        delete_chains: &diff.delete_chains,
        add_hooks: &diff.add_hooks,
        remove_hooks: &diff.remove_hooks,
    };
    render_write(&write, family, extra_deletes, specs)
}

/// The `iptables-restore --noflush` input for one family's
/// [`TableEdits`], or `None` when there is nothing to write. One
/// transaction, in this order: declare new, rewritten and doomed chains;
/// delete `extra_deletes` and removed hooks by their text; per edited
/// chain, its deletes (by text) then its inserts (ascending positions) and
/// appends; fill whole chains; insert added hooks at position 1; delete
/// doomed chains.
pub fn render_edits(
    edits: &TableEdits,
    family: IpFamily,
    extra_deletes: &[String],
) -> Option<String> {
    render_edits_with(edits, family, extra_deletes, None)
}

/// [`render_edits`], taking the specifications of rules written whole
/// from `specs` (the model the edits were planned from) where it has them.
pub fn render_edits_with(
    edits: &TableEdits,
    family: IpFamily,
    extra_deletes: &[String],
    specs: Option<&TableModel>,
) -> Option<String> {
    let write = TableWrite {
        whole: &edits.whole,
        edits: &edits.edits,
        delete_chains: &edits.delete_chains,
        add_hooks: &edits.add_hooks,
        remove_hooks: &edits.remove_hooks,
    };
    render_write(&write, family, extra_deletes, specs)
}

/// What one table script writes, borrowed (from a [`TableDiff`] or
/// [`TableEdits`]: 10k rules are not copied to be rendered).
struct TableWrite<'a> {
    whole: &'a [NodeChain],
    edits: &'a [ChainEdit],
    delete_chains: &'a [String],
    add_hooks: &'a [Hook],
    remove_hooks: &'a [Hook],
}

fn render_write(
    edits: &TableWrite<'_>,
    family: IpFamily,
    extra_deletes: &[String],
    specs: Option<&TableModel>,
) -> Option<String> {
    if edits.whole.is_empty()
        && edits.edits.is_empty()
        && edits.delete_chains.is_empty()
        && edits.add_hooks.is_empty()
        && edits.remove_hooks.is_empty()
        && extra_deletes.is_empty()
    {
        return None;
    }
    let rules: usize = edits.whole.iter().map(|c| c.rules.len()).sum();
    let mut out = String::with_capacity(64 + rules * 160);
    out.push_str("*filter\n");
    for c in edits.whole {
        let _ = writeln!(out, ":{} - [0:0]", c.name);
    }
    for name in edits.delete_chains {
        let _ = writeln!(out, ":{name} - [0:0]");
    }
    for spec in extra_deletes {
        let _ = writeln!(out, "-D {spec}");
    }
    for h in edits.remove_hooks {
        let _ = writeln!(out, "-D {}", hook_spec(h));
    }
    for e in edits.edits {
        for spec in &e.deletes {
            let _ = writeln!(out, "-D {} {spec}", e.chain);
        }
        for (pos, spec) in &e.inserts {
            let _ = match pos {
                Some(p) => writeln!(out, "-I {} {p} {spec}", e.chain),
                None => writeln!(out, "-A {} {spec}", e.chain),
            };
        }
    }
    for c in edits.whole {
        push_chain(&mut out, c, family, specs);
    }
    for h in edits.add_hooks {
        let spec = hook_spec(h);
        let (builtin, rest) = spec.split_once(' ').unwrap_or((spec.as_str(), ""));
        let _ = writeln!(out, "-I {builtin} 1 {rest}");
    }
    for name in edits.delete_chains {
        let _ = writeln!(out, "-X {name}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// The restore input that programs a whole family from empty: what
/// `palisade render` prints and what a reviewer reads.
pub fn render_family(ruleset: &FamilyRuleset) -> Option<String> {
    let diff = TableDiff {
        write_chains: ruleset.chains.clone(),
        add_hooks: ruleset.hooks.clone(),
        ..Default::default()
    };
    render_table(&diff, ruleset.family, &[])
}

fn inet(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "inet",
        IpFamily::V6 => "inet6",
    }
}

fn create_line(out: &mut String, name: &str, set: &IpSet, exist: bool) {
    let hashsize = set.entries.len().max(1024).next_power_of_two();
    let _ = writeln!(
        out,
        "create {name} hash:net family {} hashsize {hashsize} maxelem {SET_MAXELEM}{}",
        inet(set.family),
        if exist { " -exist" } else { "" }
    );
}

fn add_lines(out: &mut String, name: &str, set: &IpSet) {
    for e in &set.entries {
        let _ = writeln!(out, "add {name} {e}");
    }
}

/// The `ipset restore` input run before the tables: sets created
/// (`-exist`) and filled, entries added to existing sets, and sets whose
/// family changed rebuilt under a temporary name and swapped in (a
/// swapped set's temporary must not exist beforehand: the dataplane
/// destroys leftovers). `None` when there is nothing to do. An `add` of an
/// entry already present fails the batch: a model that was wrong is found.
pub fn render_set_adds(create: &[IpSet], changes: &[SetChange], swap: &[IpSet]) -> Option<String> {
    if create.is_empty() && swap.is_empty() && changes.iter().all(|c| c.add.is_empty()) {
        return None;
    }
    let mut out = String::new();
    for s in create {
        create_line(&mut out, &s.name, s, true);
        add_lines(&mut out, &s.name, s);
    }
    for c in changes {
        for e in &c.add {
            let _ = writeln!(out, "add {} {e}", c.name);
        }
    }
    for s in swap {
        let tmp = temporary_set_name(&s.name);
        create_line(&mut out, &tmp, s, false);
        add_lines(&mut out, &tmp, s);
        let _ = writeln!(out, "swap {tmp} {}", s.name);
        let _ = writeln!(out, "destroy {tmp}");
    }
    Some(out)
}

/// The `ipset restore` input run after the tables: entries deleted from
/// sets (once the new rules no longer need them) and sets destroyed (once
/// no rule matches them). `None` when empty.
pub fn render_set_removals(changes: &[SetChange], destroy: &[String]) -> Option<String> {
    if destroy.is_empty() && changes.iter().all(|c| c.del.is_empty()) {
        return None;
    }
    let mut out = String::new();
    for c in changes {
        for e in &c.del {
            let _ = writeln!(out, "del {} {e}", c.name);
        }
    }
    for n in destroy {
        let _ = writeln!(out, "destroy {n}");
    }
    Some(out)
}

/// Everything one sync writes, in the apply order of
/// [`crate::policy::NodeDiff`]: sets, then each family's table, then the
/// sets to destroy. `None` parts are not run at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyScripts {
    /// `ipset restore` input: creates, entry adds (and swaps).
    pub sets: Option<String>,
    /// `iptables-restore --noflush` input.
    pub ipv4: Option<String>,
    /// `ip6tables-restore --noflush` input.
    pub ipv6: Option<String>,
    /// `ipset restore` input: entry deletes and set destroys.
    pub set_removals: Option<String>,
}

impl ApplyScripts {
    /// With no table to write between them, the set removals join the set
    /// script: one `ipset restore` (adds, then deletes and destroys, in
    /// that order within the batch) instead of two. `ipset restore` stops
    /// at its first failing line, so a failed add still deletes nothing.
    pub fn with_one_set_batch(mut self) -> Self {
        if self.ipv4.is_none()
            && self.ipv6.is_none()
            && let Some(removals) = self.set_removals.take()
        {
            let mut text = self.sets.take().unwrap_or_default();
            text.push_str(&removals);
            self.sets = Some(text);
        }
        self
    }

    /// True when nothing would be written.
    pub fn is_empty(&self) -> bool {
        self.sets.is_none()
            && self.ipv4.is_none()
            && self.ipv6.is_none()
            && self.set_removals.is_none()
    }
}

impl std::fmt::Display for ApplyScripts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (title, part) in [
            ("ipset restore", &self.sets),
            ("iptables-restore --noflush", &self.ipv4),
            ("ip6tables-restore --noflush", &self.ipv6),
            ("ipset restore (removals)", &self.set_removals),
        ] {
            if let Some(text) = part {
                writeln!(f, "# {title}")?;
                f.write_str(text)?;
            }
        }
        Ok(())
    }
}

/// Renders rule-level edits (see [`ApplyScripts`]; a change of set
/// membership alone is one `ipset restore`).
pub fn render_node_edits(edits: &NodeEdits) -> ApplyScripts {
    render_node_edits_with(edits, None)
}

/// [`render_node_edits`], taking the specifications of rules written whole
/// from `model` (the one the edits were planned from) where it has them.
pub fn render_node_edits_with(edits: &NodeEdits, model: Option<&Model>) -> ApplyScripts {
    ApplyScripts {
        sets: render_set_adds(&edits.create_sets, &edits.set_changes, &[]),
        ipv4: render_edits_with(&edits.ipv4, IpFamily::V4, &[], model.map(|m| &m.ipv4)),
        ipv6: render_edits_with(&edits.ipv6, IpFamily::V6, &[], model.map(|m| &m.ipv6)),
        set_removals: render_set_removals(&edits.set_changes, &edits.destroy_sets),
    }
    .with_one_set_batch()
}

/// Renders a whole ruleset as programmed on an empty node.
pub fn render_ruleset(ruleset: &NodeRuleset) -> ApplyScripts {
    ApplyScripts {
        sets: render_set_adds(&ruleset.sets, &[], &[]),
        ipv4: render_family(&ruleset.ipv4),
        ipv6: render_family(&ruleset.ipv6),
        set_removals: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("PAL-I-abc"), "PAL-I-abc");
        assert_eq!(
            quote("palisade:00 web/ingress/x"),
            "\"palisade:00 web/ingress/x\""
        );
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(quote(""), "\"\"");
    }

    #[test]
    fn set_changes_alone_are_one_batch_adds_first() {
        use crate::node::model::SetChange;
        let n = |s: &str| s.parse().unwrap();
        let edits = NodeEdits {
            set_changes: vec![SetChange {
                name: "PAL-a".into(),
                add: vec![n("10.0.0.0/8")],
                del: vec![n("11.0.0.0/8")],
            }],
            destroy_sets: vec!["PAL-b".into()],
            ..Default::default()
        };
        let scripts = render_node_edits(&edits);
        assert_eq!(
            scripts.sets.as_deref(),
            Some("add PAL-a 10.0.0.0/8\ndel PAL-a 11.0.0.0/8\ndestroy PAL-b\n")
        );
        assert_eq!(scripts.set_removals, None);
        // With a table written in between, the removals stay apart, after it.
        let mut with_table = edits.clone();
        with_table
            .ipv4
            .delete_chains
            .push("PAL-I-0123456789".into());
        let scripts = render_node_edits(&with_table);
        assert_eq!(scripts.sets.as_deref(), Some("add PAL-a 10.0.0.0/8\n"));
        assert!(scripts.ipv4.is_some());
        assert_eq!(
            scripts.set_removals.as_deref(),
            Some("del PAL-a 11.0.0.0/8\ndestroy PAL-b\n")
        );
    }

    #[test]
    fn empty_edits_write_nothing() {
        assert!(render_node_edits(&NodeEdits::default()).is_empty());
    }
}
