//! The effects at the edge: reading back what Palisade owns from the
//! kernel and applying a [`NodeDiff`] with `ipset restore` and
//! `iptables-restore --noflush` / `ip6tables-restore --noflush`.
//!
//! Read-back looks only at `PALISADE-*` / `PAL-*` chains, at Palisade's
//! hook rules in `INPUT` / `OUTPUT` and at `PAL-*` sets; rules are known by
//! the ids in their comments, never by parsing their matches.
//!
//! Apply order (see [`crate::policy::NodeDiff`]): leftover temporary sets
//! are destroyed and sets created or swapped; then one restore per family
//! whose table changes; then sets no longer referenced are destroyed. Each
//! restore is one kernel transaction: when it fails, the previous ruleset
//! of that table stays in force and the error carries the tool's message.
//! Nothing is run on a no-op.
//!
//! Hooks: a Palisade hook rule that is not the first rule of its built-in
//! chain (something was inserted above it), or a duplicate, is deleted by
//! its full text as read back and the wanted hooks are inserted again at
//! position 1, in the same transaction.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::IpNet;

use super::backend::{Backend, Family};
use super::render::{ApplyScripts, TEMPORARY_SET_SUFFIX, render_diff};
use crate::policy::node::{
    BuiltinChain, Hook, INPUT_CHAIN, OUTPUT_CHAIN, is_palisade_chain, is_palisade_set,
    rule_id_from_comment,
};
use crate::policy::{
    FamilyRuleset, IpFamily, NodeDiff, NodeRuleset, NodeState, SetState, TableDiff, TableState,
    diff_node,
};

/// What can go wrong reading or writing the dataplane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// A tool could not be started.
    #[error("starting {command}: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A tool exited non-zero; for a restore, the previous ruleset of that
    /// table is still in force.
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        /// The command.
        command: String,
        /// Its exit status.
        status: String,
        /// What it said.
        stderr: String,
    },
    /// `ipset save` printed an entry that is not a network.
    #[error("unreadable ipset entry {entry:?} in set {set}")]
    SetEntry {
        /// The set.
        set: String,
        /// The entry.
        entry: String,
    },
}

impl DataplaneError {
    /// Whether the failure came from a restore being refused (a bad script
    /// or a missing kernel module) rather than from a missing tool.
    pub fn is_restore_failure(&self) -> bool {
        matches!(self, DataplaneError::Failed { command, .. } if command.contains("restore"))
    }
}

/// A Palisade hook rule found in `INPUT` or `OUTPUT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRule {
    /// Position in its built-in chain, from 0.
    pub position: usize,
    /// The rule as read back, without `-A ` (`INPUT -m comment ... -j X`):
    /// what deletes it.
    pub spec: String,
    /// The hook it is, when its id is one Palisade writes.
    pub hook: Option<Hook>,
}

/// Everything Palisade owns on the node, as read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readback {
    /// What the diff takes.
    pub state: NodeState,
    /// Every Palisade hook rule of iptables, in order.
    pub hooks_v4: Vec<HookRule>,
    /// Every Palisade hook rule of ip6tables, in order.
    pub hooks_v6: Vec<HookRule>,
}

impl Readback {
    fn hooks(&self, family: IpFamily) -> &[HookRule] {
        match family {
            IpFamily::V4 => &self.hooks_v4,
            IpFamily::V6 => &self.hooks_v6,
        }
    }
}

/// Splits a line of `iptables-save` output into words, honouring double
/// quotes and backslash escapes as iptables-restore does.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

fn comment_of(words: &[String]) -> Option<&str> {
    words
        .windows(2)
        .find(|w| w[0] == "--comment")
        .map(|w| w[1].as_str())
}

/// The hooks Palisade may write, by id.
fn known_hooks() -> [Hook; 2] {
    [
        Hook {
            builtin: BuiltinChain::Input,
            target: INPUT_CHAIN.into(),
        },
        Hook {
            builtin: BuiltinChain::Output,
            target: OUTPUT_CHAIN.into(),
        },
    ]
}

/// The packet counters of Palisade's rules in `iptables-save -c` output
/// (`[packets:bytes] -A CHAIN ... --comment "palisade:<id> ..."`), by id
/// (pure). Rules without a Palisade id are skipped.
pub fn parse_counters(save: &str) -> Vec<(String, u64)> {
    save.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix('[')?;
            let (counters, rule) = rest.split_once("] ")?;
            let packets: u64 = counters.split(':').next()?.parse().ok()?;
            let w = words(rule.strip_prefix("-A ")?);
            let id = comment_of(&w).and_then(rule_id_from_comment)?;
            Some((id.to_string(), packets))
        })
        .collect()
}

/// Reads the Palisade part of one family's `iptables-save -t filter`
/// output (pure). Rules without a Palisade id are recorded as `?`, so
/// their chain is rewritten.
pub fn parse_table(save: &str) -> (TableState, Vec<HookRule>) {
    let mut state = TableState::default();
    let mut hooks = Vec::new();
    let mut positions = [0usize; 2];
    let known = known_hooks();
    let mut in_filter = false;
    for line in save.lines() {
        if let Some(table) = line.strip_prefix('*') {
            in_filter = table.trim() == "filter";
            continue;
        }
        if !in_filter {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split(' ').next().unwrap_or_default();
            if is_palisade_chain(name) {
                state.chains.entry(name.to_string()).or_default();
            }
            continue;
        }
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let w = words(rest);
        let Some(chain) = w.first() else { continue };
        let id = comment_of(&w).and_then(rule_id_from_comment);
        if is_palisade_chain(chain) {
            state
                .chains
                .entry(chain.clone())
                .or_default()
                .push(id.unwrap_or("?").to_string());
            continue;
        }
        let slot = match chain.as_str() {
            "INPUT" => 0,
            "OUTPUT" => 1,
            _ => continue,
        };
        let position = positions[slot];
        positions[slot] += 1;
        let Some(id) = id else { continue };
        let hook = known
            .iter()
            .find(|h| h.id() == id && h.builtin.name() == chain)
            .cloned();
        if position == 0
            && let Some(h) = &hook
        {
            state.hooks.insert(h.clone());
        }
        hooks.push(HookRule {
            position,
            spec: rest.to_string(),
            hook,
        });
    }
    (state, hooks)
}

/// Reads the Palisade sets of `ipset save` output (pure). Entries without
/// a prefix length are host addresses.
pub fn parse_sets(
    save: &str,
) -> Result<std::collections::BTreeMap<String, SetState>, DataplaneError> {
    let mut sets = std::collections::BTreeMap::new();
    for line in save.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["create", name, _type, rest @ ..] if is_palisade_set(name) => {
                let family = if rest.windows(2).any(|p| p == ["family", "inet6"]) {
                    IpFamily::V6
                } else {
                    IpFamily::V4
                };
                sets.insert(
                    name.to_string(),
                    SetState {
                        family,
                        entries: Vec::new(),
                    },
                );
            }
            ["add", name, entry, ..] if is_palisade_set(name) => {
                let net: IpNet = entry
                    .parse()
                    .or_else(|_| entry.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| DataplaneError::SetEntry {
                        set: name.to_string(),
                        entry: entry.to_string(),
                    })?;
                if let Some(s) = sets.get_mut(*name) {
                    s.entries.push(net);
                }
            }
            _ => {}
        }
    }
    Ok(sets)
}

/// Stray hook rules (away from position 1, duplicates, unknown ids): when
/// there are any, every hook rule is deleted by its text and the wanted
/// ones inserted again.
fn repair_hooks(diff: &mut TableDiff, found: &[HookRule], desired: &FamilyRuleset) -> Vec<String> {
    let clean = found.iter().all(|h| h.position == 0 && h.hook.is_some());
    if clean {
        return Vec::new();
    }
    diff.remove_hooks.clear();
    diff.add_hooks = desired.hooks.clone();
    found.iter().map(|h| h.spec.clone()).collect()
}

/// What a sync would write: the diff and the exact scripts (pure).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The diff of read-back vs desired.
    pub diff: NodeDiff,
    /// Leftover temporary sets to destroy first.
    pub leftover_temporaries: Vec<String>,
    /// The scripts, in apply order.
    pub scripts: ApplyScripts,
}

impl Plan {
    /// True when nothing would be written.
    pub fn is_empty(&self) -> bool {
        self.scripts.is_empty() && self.leftover_temporaries.is_empty()
    }
}

/// Plans the writes that take the node from `current` to `desired` (pure).
pub fn plan(current: &Readback, desired: &NodeRuleset) -> Plan {
    let mut diff = diff_node(&current.state, desired);
    let leftover_temporaries: Vec<String> = current
        .state
        .sets
        .keys()
        .filter(|n| n.ends_with(TEMPORARY_SET_SUFFIX))
        .cloned()
        .collect();
    diff.destroy_sets
        .retain(|n| !leftover_temporaries.contains(n));
    let extra_v4 = repair_hooks(&mut diff.ipv4, current.hooks(IpFamily::V4), &desired.ipv4);
    let extra_v6 = repair_hooks(&mut diff.ipv6, current.hooks(IpFamily::V6), &desired.ipv6);
    let mut scripts = render_diff(&diff, &extra_v4, &extra_v6);
    if !leftover_temporaries.is_empty() {
        let mut text: String = leftover_temporaries
            .iter()
            .map(|n| format!("destroy {n}\n"))
            .collect();
        text.push_str(scripts.sets.as_deref().unwrap_or_default());
        scripts.sets = Some(text);
    }
    Plan {
        diff,
        leftover_temporaries,
        scripts,
    }
}

/// A ruleset with nothing in it: what `cleanup` converges to.
pub fn empty_ruleset(node: &str) -> NodeRuleset {
    let family = |family| FamilyRuleset {
        family,
        hooks: Vec::new(),
        chains: Vec::new(),
    };
    NodeRuleset {
        node: node.to_string(),
        ipv4: family(IpFamily::V4),
        ipv6: family(IpFamily::V6),
        sets: Vec::new(),
        policies: Vec::new(),
        warnings: Vec::new(),
    }
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// The plan that was applied (empty on a no-op).
    pub plan: Plan,
    /// Chains written across both families.
    pub chains_written: usize,
}

impl SyncReport {
    /// Whether anything was written.
    pub fn wrote(&self) -> bool {
        !self.plan.is_empty()
    }
}

/// The iptables/ipset dataplane of one network namespace.
#[derive(Debug, Clone)]
pub struct Dataplane {
    backend: Backend,
    netns: Option<String>,
}

impl Dataplane {
    /// The dataplane of the current namespace (the agent's), or of the named
    /// one (`ip netns exec <netns>`: tests and benchmarks).
    pub fn new(backend: Backend, netns: Option<String>) -> Self {
        Dataplane { backend, netns }
    }

    /// The backend every command names.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    fn run(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, DataplaneError> {
        let command = format!("{program} {}", args.join(" "));
        let mut cmd = self.command(program);
        cmd.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| DataplaneError::Spawn {
            command: command.clone(),
            source,
        })?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(text.as_bytes())
                .map_err(|source| DataplaneError::Spawn {
                    command: command.clone(),
                    source,
                })?;
        }
        let out = child
            .wait_with_output()
            .map_err(|source| DataplaneError::Spawn {
                command: command.clone(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(DataplaneError::Failed {
                command,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    fn save(&self, family: Family) -> Result<String, DataplaneError> {
        self.run(
            &self.backend.command(family, "save"),
            &["-t", "filter"],
            None,
        )
    }

    /// Packet counters of Palisade's rules, by rule id, both families
    /// (`iptables-save -c`): how the agent counts an Audit policy's
    /// would-be drops. Spawns two processes; called on its own timer.
    pub fn read_counters(&self) -> Result<BTreeMap<String, u64>, DataplaneError> {
        let mut out = BTreeMap::new();
        for family in [Family::V4, Family::V6] {
            let save = self.run(
                &self.backend.command(family, "save"),
                &["-c", "-t", "filter"],
                None,
            )?;
            for (id, packets) in parse_counters(&save) {
                *out.entry(id).or_insert(0) += packets;
            }
        }
        Ok(out)
    }

    /// Runs `conntrack` with `args` (list or delete flows); a delete of a
    /// flow already gone is not an error.
    pub fn conntrack(&self, args: &[&str]) -> Result<String, DataplaneError> {
        match self.run("conntrack", args, None) {
            Err(DataplaneError::Failed { stderr, .. })
                if args.first() == Some(&"-D") && stderr.contains("0 flow entries") =>
            {
                Ok(String::new())
            }
            other => other,
        }
    }

    /// Reads back what Palisade owns.
    pub fn read(&self) -> Result<Readback, DataplaneError> {
        let (ipv4, hooks_v4) = parse_table(&self.save(Family::V4)?);
        let (ipv6, hooks_v6) = parse_table(&self.save(Family::V6)?);
        let sets = parse_sets(&self.run("ipset", &["save"], None)?)?;
        Ok(Readback {
            state: NodeState { ipv4, ipv6, sets },
            hooks_v4,
            hooks_v6,
        })
    }

    /// Runs the scripts of a plan in order; stops at the first failure.
    pub fn apply(&self, plan: &Plan) -> Result<(), DataplaneError> {
        if let Some(text) = &plan.scripts.sets {
            self.run("ipset", &["restore"], Some(text))?;
        }
        for (family, text) in [
            (Family::V4, &plan.scripts.ipv4),
            (Family::V6, &plan.scripts.ipv6),
        ] {
            if let Some(text) = text {
                self.run(
                    &self.backend.command(family, "restore"),
                    &["-w", "5", "--noflush"],
                    Some(text),
                )?;
            }
        }
        if let Some(text) = &plan.scripts.destroy_sets {
            self.run("ipset", &["restore"], Some(text))?;
        }
        Ok(())
    }

    /// Reads back, diffs against `desired` and writes only the difference.
    pub fn sync(&self, desired: &NodeRuleset) -> Result<SyncReport, DataplaneError> {
        let current = self.read()?;
        let plan = plan(&current, desired);
        if plan.is_empty() {
            return Ok(SyncReport::default());
        }
        self.apply(&plan)?;
        Ok(SyncReport {
            chains_written: plan.diff.ipv4.write_chains.len() + plan.diff.ipv6.write_chains.len(),
            plan,
        })
    }

    /// Removes everything Palisade ever wrote (hooks, chains, sets) and
    /// nothing else.
    pub fn cleanup(&self) -> Result<SyncReport, DataplaneError> {
        self.sync(&empty_ruleset(""))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn words_follow_restore_quoting() {
        assert_eq!(
            words(r#"INPUT -m comment --comment "palisade:00 a b" -j X"#),
            [
                "INPUT",
                "-m",
                "comment",
                "--comment",
                "palisade:00 a b",
                "-j",
                "X"
            ]
        );
        assert_eq!(words(r#"a "q\"x" """#), ["a", "q\"x", ""]);
    }

    #[test]
    fn table_readback_takes_only_palisade_parts() {
        let hook = &known_hooks()[0];
        let save = format!(
            "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:PALISADE-INPUT - [0:0]\n:PAL-I-0123456789 - [0:0]\n\
             -A INPUT -m comment --comment \"{}\" -j PALISADE-INPUT\n\
             -A INPUT -p tcp --dport 22 -j ACCEPT\n\
             -A KUBE-SERVICES -m comment --comment \"palisade:0123456789abcdef fake\" -j ACCEPT\n\
             -A PALISADE-INPUT -m comment --comment \"palisade:0123456789abcdef x\" -j ACCEPT\n\
             -A PALISADE-INPUT -j ACCEPT\nCOMMIT\n",
            hook.comment()
        );
        let (state, hooks) = parse_table(&save);
        assert_eq!(state.hooks.iter().collect::<Vec<_>>(), [hook]);
        assert_eq!(
            state.chains.get("PALISADE-INPUT").unwrap(),
            &["0123456789abcdef".to_string(), "?".into()]
        );
        assert_eq!(state.chains.get("PAL-I-0123456789").unwrap().len(), 0);
        assert!(!state.chains.contains_key("KUBE-SERVICES"));
        assert_eq!(hooks.len(), 1);
    }

    #[test]
    fn hook_below_a_foreign_rule_is_moved_back_to_the_top() {
        let hook = &known_hooks()[0];
        let spec = format!(
            "INPUT -m comment --comment \"{}\" -j PALISADE-INPUT",
            hook.comment()
        );
        let save = format!("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\n-A {spec}\nCOMMIT\n");
        let (state, hooks) = parse_table(&save);
        assert!(state.hooks.is_empty());
        let mut desired = empty_ruleset("n");
        desired.ipv4.hooks.push(hook.clone());
        let current = Readback {
            state: NodeState {
                ipv4: state,
                ..Default::default()
            },
            hooks_v4: hooks,
            hooks_v6: Vec::new(),
        };
        let p = plan(&current, &desired);
        let text = p.scripts.ipv4.unwrap();
        assert!(text.contains(&format!("-D {spec}\n")), "{text}");
        assert!(text.contains("-I INPUT 1 "), "{text}");
    }

    #[test]
    fn set_readback_reads_host_entries() {
        let save = "create PAL-a-6 hash:net family inet6 hashsize 1024 maxelem 65536\nadd PAL-a-6 2001:db8::1\nadd PAL-a-6 2001:db8::/32\ncreate other hash:ip family inet\nadd other 1.2.3.4\n";
        let sets = parse_sets(save).unwrap();
        assert_eq!(sets.len(), 1);
        let s = &sets["PAL-a-6"];
        assert_eq!(s.family, IpFamily::V6);
        assert_eq!(
            s.entries,
            [
                "2001:db8::1/128".parse::<IpNet>().unwrap(),
                "2001:db8::/32".parse().unwrap()
            ]
        );
    }
}
