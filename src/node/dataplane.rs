//! The effects at the edge: writing what Palisade wants to the kernel with
//! `ipset restore` and `iptables-restore --noflush` /
//! `ip6tables-restore --noflush`, from a cached model of what it last
//! wrote, and reading back to verify.
//!
//! ## The model, and when it is trusted
//!
//! The dataplane keeps a [`Model`] of what it last wrote (rule ids and
//! texts per chain, hooks, set entries). Between verifications a sync
//! compares the desired ruleset with the model only: a no-op sync reads
//! nothing and spawns no process; a change is written as rule-level edits
//! and set `add`/`del` lines ([`super::model`]), and afterwards only the
//! chains edited rule by rule are checked (see below): their result
//! depends on the model being right. A chain written whole (declared,
//! which creates or flushes it, and filled in the same transaction) holds
//! exactly what was written whatever it held before, so it is not read
//! again. Nothing is read on the way in. A set write checks itself: `add`
//! of a present entry and `del` of an absent one fail it.
//!
//! ## The check after a write
//!
//! An edit (`-I CHAIN <pos>`, `-D CHAIN <spec>`) gives the desired chain
//! when the chain held what the model says as it was applied. Two ways to
//! know it:
//! - **the `nft monitor` echo** (nft backend, while the agent follows the
//!   monitor: [`Dataplane::monitor_started`]): the monitor reports every
//!   committed generation in commit order, with the process that
//!   committed it. When the generation of each restore that edited a
//!   chain has been reported with exactly the rules it added and deleted
//!   per chain, and no other process's change to those chains (nor one
//!   that invalidates the model) was reported before it, every change the
//!   write was made on top of is known, and there was none: the check
//!   passes without running anything. It needs the monitor to have been
//!   listening since before the model was last verified by a full read,
//!   and waits for the echo at most [`ECHO_WAIT`] (it comes within a
//!   millisecond or so); otherwise
//! - **the listing**: `iptables -S <chain>` of each chain edited on nft,
//!   one `iptables-save` on legacy (where listing one chain costs as much).
//!
//! Either way drift is found as before: another process's change committed
//! before the write makes the check list the chain; one committed after it
//! is reported after the echo and repaired by the next sync.
//!
//! The model stops being trusted, and the next sync reads everything back
//! (`iptables-save`, `ip6tables-save`, `ipset save`), diffs against the
//! read-back and rewrites whole every chain that differs (the transactional
//! full path), when:
//! - there is none yet (first sync, after a restart);
//! - [`Dataplane::invalidate`] was called: the agent does so on an
//!   `nft monitor` generation another process committed that touched
//!   Palisade's tables in a way not about named chains (see
//!   [`super::monitor`]);
//! - the verification period has passed ([`Dataplane::with_verify_period`],
//!   about a minute by default): the backstop for the legacy backend and
//!   for ipsets, which `nft monitor` does not see;
//! - a write failed or did not read back as written (a rule the model had
//!   was gone, an entry it lacked was there): the full path runs at once,
//!   in the same sync.
//!
//! In between, [`Dataplane::suspect`] names a chain another process changed
//! (the agent calls it for each chain an `nft monitor` generation names):
//! the next sync lists just that chain and rewrites it whole if it differs
//! from the model (not reading it again after), so drift is repaired
//! without reading 10k rules back. A
//! Palisade hook out of place in `INPUT`/`OUTPUT`, or a Palisade chain the
//! model does not know, makes it read everything back.
//!
//! ## Apply order, and why no allowed flow is dropped
//!
//! 1. `ipset restore`: leftover temporary sets destroyed, new sets created
//!    and filled, entries added to existing sets;
//! 2. `iptables-restore --noflush` (IPv4), one kernel transaction;
//! 3. `ip6tables-restore --noflush` (IPv6), one kernel transaction;
//! 4. `ipset restore`: entries deleted, unused sets destroyed.
//!
//! When neither table is written, steps 1 and 4 are one `ipset restore`:
//! every add, then every delete and destroy. It stops at its first failing
//! line, so nothing is deleted unless every add went in.
//!
//! A flow is of one family, so it is decided by one table and the sets of
//! its family. Through steps 1–4 it meets, in turn: the old table with
//! every set a superset of old and new; the new table with the same
//! supersets; the new table with the new sets. A flow both the old and the
//! new ruleset allow is allowed at each step; the two families' tables
//! being two transactions changes nothing, as no flow is decided by both.
//! Each table transaction is atomic: when it fails, the previous ruleset of
//! that table stays in force and the error carries the tool's message.
//!
//! Hooks: a Palisade hook rule that is not the first rule of its built-in
//! chain (something was inserted above it), or a duplicate, is deleted by
//! its full text as read back and the wanted hooks are inserted again at
//! position 1, in the same transaction.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::backend::{Backend, Family};
use super::model::{Model, NodeEdits, SetChange, edit_node, set_delta};
use super::monitor::Generation;
pub use super::readback::{
    HookRule, Readback, parse_chain_listing, parse_counters, parse_sets, parse_table,
};
use super::render::{
    ApplyScripts, TEMPORARY_SET_SUFFIX, render_node_edits_with, render_set_adds,
    render_set_removals, render_table_with,
};
use crate::policy::node::BuiltinChain;
use crate::policy::{
    FamilyRuleset, IpFamily, NodeDiff, NodeRuleset, NodeState, TableDiff, diff_node,
};

/// How often the model is verified by a full read when nothing else asks
/// for it.
pub const DEFAULT_VERIFY_PERIOD: Duration = Duration::from_secs(60);

/// How many of its own processes' ids the dataplane remembers, for
/// `nft monitor` to tell its writes from others'.
const OWN_PIDS: usize = 64;

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
    /// After a write, what was written does not read back as written.
    #[error("not converged after writing: {0}")]
    NotConverged(String),
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
    /// The whole-chain diff of a read-back vs desired (full path; empty
    /// when the plan was made from the model, see `edits`).
    pub diff: NodeDiff,
    /// The rule-level edits of the model vs desired (model path).
    pub edits: Option<NodeEdits>,
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

    /// The chains written (whole or edited) per family.
    pub fn chains_written(&self, family: IpFamily) -> Vec<&str> {
        let (diff, edits) = match family {
            IpFamily::V4 => (&self.diff.ipv4, self.edits.as_ref().map(|e| &e.ipv4)),
            IpFamily::V6 => (&self.diff.ipv6, self.edits.as_ref().map(|e| &e.ipv6)),
        };
        let mut out: Vec<&str> = diff.write_chains.iter().map(|c| c.name.as_str()).collect();
        if let Some(e) = edits {
            out.extend(e.chains_written());
        }
        out
    }

    /// The chains edited rule by rule (model path) per family: the only
    /// chains whose result depends on the model being right, so the only
    /// ones a write is checked by. A chain written whole is declared
    /// (created or flushed) and filled in one transaction: it holds
    /// exactly what was written whatever it held before.
    pub fn chains_edited(&self, family: IpFamily) -> Vec<&str> {
        let edits = match family {
            IpFamily::V4 => self.edits.as_ref().map(|e| &e.ipv4),
            IpFamily::V6 => self.edits.as_ref().map(|e| &e.ipv6),
        };
        edits.map_or_else(Vec::new, |e| {
            e.edits.iter().map(|c| c.chain.as_str()).collect()
        })
    }

    /// Hook rules added or removed in `family`.
    pub fn hooks_changed(&self, family: IpFamily) -> usize {
        let (diff, edits) = match family {
            IpFamily::V4 => (&self.diff.ipv4, self.edits.as_ref().map(|e| &e.ipv4)),
            IpFamily::V6 => (&self.diff.ipv6, self.edits.as_ref().map(|e| &e.ipv6)),
        };
        diff.add_hooks.len()
            + diff.remove_hooks.len()
            + edits.map_or(0, |e| e.add_hooks.len() + e.remove_hooks.len())
    }

    /// Chains deleted in `family`.
    pub fn chains_deleted(&self, family: IpFamily) -> usize {
        let (diff, edits) = match family {
            IpFamily::V4 => (&self.diff.ipv4, self.edits.as_ref().map(|e| &e.ipv4)),
            IpFamily::V6 => (&self.diff.ipv6, self.edits.as_ref().map(|e| &e.ipv6)),
        };
        diff.delete_chains.len() + edits.map_or(0, |e| e.delete_chains.len())
    }

    fn hooks_written(&self, family: IpFamily) -> bool {
        self.hooks_changed(family) > 0
    }

    /// Sets created, changed and destroyed.
    pub fn set_counts(&self) -> (usize, usize, usize) {
        match &self.edits {
            Some(e) => (
                e.create_sets.len(),
                e.set_changes.len(),
                e.destroy_sets.len(),
            ),
            None => (
                self.diff.create_sets.len(),
                self.diff.swap_sets.len(),
                self.diff.destroy_sets.len(),
            ),
        }
    }
}

/// Membership changes of the sets `diff` swaps, from what was read back;
/// sets whose family changed (never so written by Palisade) are rebuilt
/// and swapped instead, returned apart.
fn set_changes(
    current: &NodeState,
    diff: &NodeDiff,
) -> (Vec<SetChange>, Vec<crate::policy::node::IpSet>) {
    let mut changes = Vec::new();
    let mut swaps = Vec::new();
    for s in &diff.swap_sets {
        match current.sets.get(&s.name) {
            Some(have) if have.family == s.family => {
                let mut have = have.entries.clone();
                have.sort();
                have.dedup();
                let mut want = s.entries.clone();
                want.sort();
                let (add, del) = set_delta(&have, &want);
                changes.push(SetChange {
                    name: s.name.clone(),
                    add,
                    del,
                });
            }
            _ => swaps.push(s.clone()),
        }
    }
    (changes, swaps)
}

/// Plans the writes that take the node from `current` to `desired` (pure).
pub fn plan(current: &Readback, desired: &NodeRuleset) -> Plan {
    plan_with(current, desired, None)
}

/// [`plan`], rendering whole chains from `model` (of `desired`) where it
/// has their rules' specifications.
fn plan_with(current: &Readback, desired: &NodeRuleset, model: Option<&Model>) -> Plan {
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
    let (changes, swaps) = set_changes(&current.state, &diff);
    let mut scripts = ApplyScripts {
        sets: render_set_adds(&diff.create_sets, &changes, &swaps),
        ipv4: render_table_with(&diff.ipv4, IpFamily::V4, &extra_v4, model.map(|m| &m.ipv4)),
        ipv6: render_table_with(&diff.ipv6, IpFamily::V6, &extra_v6, model.map(|m| &m.ipv6)),
        set_removals: render_set_removals(&changes, &diff.destroy_sets),
    };
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
        edits: None,
        leftover_temporaries,
        scripts: scripts.with_one_set_batch(),
    }
}

/// Plans the writes that take the node from what `model` says to
/// `desired`: rule-level edits and set membership changes (pure).
pub fn plan_from_model(model: &Model, desired: &NodeRuleset) -> Plan {
    let edits = edit_node(model, desired);
    let scripts = render_node_edits_with(&edits, Some(model));
    Plan {
        diff: NodeDiff::default(),
        edits: Some(edits),
        leftover_temporaries: Vec::new(),
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
    /// Whether everything was read back (the model was not trusted).
    pub full_read: bool,
    /// Whether a write from the model failed or read back wrong, so the
    /// full path ran after it.
    pub fell_back: bool,
    /// From the start of the sync until its last write returned (the
    /// kernel holds the change): zero when nothing was written.
    pub to_kernel: Duration,
    /// Time spent in the restore tools (spawn to exit).
    pub writing: Duration,
    /// Time spent reading back: the full read, the listings of suspect
    /// chains and the check of the chains edited (or the wait for its
    /// `nft monitor` echo).
    pub reading: Duration,
    /// Time spent planning and rendering in process.
    pub planning: Duration,
    /// Whether the write was checked by its `nft monitor` echo rather than
    /// by listing the chains it edited.
    pub checked_by_echo: bool,
}

impl SyncReport {
    /// Whether anything was written.
    pub fn wrote(&self) -> bool {
        !self.plan.is_empty()
    }
}

/// The model and when it was last verified, shared by every clone of a
/// [`Dataplane`]; locked for the whole of a sync.
#[derive(Debug, Default)]
struct Cache {
    model: Option<Model>,
    verified: Option<Instant>,
}

/// What the `nft monitor` follower tells the dataplane, under a lock of
/// its own: the follower never waits for a sync to end, and a sync can
/// wait for its write's echo.
#[derive(Debug, Default)]
struct Signals {
    /// Chains another process changed since (see [`Dataplane::suspect`]).
    suspects: Vec<(IpFamily, String)>,
    /// The next sync reads everything back ([`Dataplane::invalidate`]).
    invalidated: bool,
    /// The `nft monitor` being followed, if any.
    monitor: Option<MonitorLink>,
    /// The latest generations the dataplane's own processes committed.
    echoes: VecDeque<Generation>,
}

/// A followed `nft monitor`.
#[derive(Debug, Default)]
struct MonitorLink {
    /// When it first reported a generation: it was listening before then.
    live_since: Option<Instant>,
    /// An echo did not come in time: writes are checked by listing until
    /// one does.
    lagging: bool,
}

/// How long a sync waits for its write's echo before checking it by
/// listing instead (it usually comes within a millisecond): the default of
/// [`Dataplane::with_echo_wait`].
pub const ECHO_WAIT: Duration = Duration::from_millis(100);

/// The iptables/ipset dataplane of one network namespace. Clones share the
/// model, the spawn counter and the record of their own processes.
#[derive(Debug, Clone)]
pub struct Dataplane {
    backend: Backend,
    netns: Option<String>,
    verify_period: Duration,
    echo_wait: Duration,
    cache: Arc<Mutex<Cache>>,
    signals: Arc<(Mutex<Signals>, Condvar)>,
    spawns: Arc<AtomicU64>,
    own_pids: Arc<Mutex<VecDeque<u32>>>,
}

impl Dataplane {
    /// The dataplane of the current namespace (the agent's), or of the named
    /// one (`ip netns exec <netns>`: tests and benchmarks). No model yet:
    /// the first sync reads everything back.
    pub fn new(backend: Backend, netns: Option<String>) -> Self {
        Dataplane {
            backend,
            netns,
            verify_period: DEFAULT_VERIFY_PERIOD,
            echo_wait: ECHO_WAIT,
            cache: Arc::default(),
            signals: Arc::default(),
            spawns: Arc::default(),
            own_pids: Arc::default(),
        }
    }

    /// Verifies the model by a full read at least this often.
    pub fn with_verify_period(mut self, period: Duration) -> Self {
        self.verify_period = period;
        self
    }

    /// Waits at most this long for a write's `nft monitor` echo before
    /// checking the write by listing ([`ECHO_WAIT`] by default).
    pub fn with_echo_wait(mut self, wait: Duration) -> Self {
        self.echo_wait = wait;
        self
    }

    /// The backend every command names.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Processes spawned so far (every tool run, by every clone).
    pub fn processes_spawned(&self) -> u64 {
        self.spawns.load(Ordering::Relaxed)
    }

    /// Whether `pid` is one of the dataplane's own recent processes (so an
    /// `nft monitor` generation committed by it is no drift).
    pub fn is_own_process(&self, pid: u32) -> bool {
        self.own_pids
            .lock()
            .map(|p| p.contains(&pid))
            .unwrap_or(false)
    }

    fn signals(&self) -> MutexGuard<'_, Signals> {
        self.signals.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops trusting the model of one chain (a Palisade chain, or
    /// `INPUT` / `OUTPUT` for the hooks): the next sync lists it, and a
    /// chain that differs from the model is rewritten whole (a hook out of
    /// place makes it read everything back).
    pub fn suspect(&self, family: IpFamily, chain: &str) {
        let mut signals = self.signals();
        let key = (family, chain.to_string());
        if !signals.suspects.contains(&key) {
            signals.suspects.push(key);
        }
    }

    /// Stops trusting the model: the next sync reads everything back.
    pub fn invalidate(&self) {
        self.signals().invalidated = true;
    }

    /// Whether the next sync would trust the model.
    pub fn model_trusted(&self) -> bool {
        let invalidated = self.signals().invalidated;
        !invalidated
            && self
                .cache
                .lock()
                .map(|c| {
                    c.model.is_some()
                        && c.verified.is_some_and(|t| t.elapsed() < self.verify_period)
                })
                .unwrap_or(false)
    }

    /// An `nft monitor` is (re)started and will be followed: its
    /// generations are passed to [`super::monitor::note_generation`] in
    /// order. Until it has reported one, and a full read has happened
    /// since, writes are still checked by listing.
    pub fn monitor_started(&self) {
        let mut signals = self.signals();
        signals.monitor = Some(MonitorLink::default());
        signals.echoes.clear();
    }

    /// Whether a followed `nft monitor` has reported a generation (so it
    /// is listening).
    pub fn monitor_live(&self) -> bool {
        self.signals()
            .monitor
            .as_ref()
            .is_some_and(|m| m.live_since.is_some())
    }

    /// The followed `nft monitor` ended: writes are checked by listing.
    pub fn monitor_stopped(&self) {
        let mut signals = self.signals();
        signals.monitor = None;
        signals.echoes.clear();
        self.signals.1.notify_all();
    }

    /// Takes one generation reported by the followed `nft monitor` (in
    /// order); true when one of the dataplane's own processes committed it
    /// (the echo of its write: kept for the check of that write).
    pub fn echo(&self, generation: &Generation) -> bool {
        let own = generation.pid.is_some_and(|p| self.is_own_process(p));
        let mut signals = self.signals();
        if let Some(link) = signals.monitor.as_mut() {
            link.live_since.get_or_insert_with(Instant::now);
            if own {
                link.lagging = false;
            }
        }
        if own && signals.monitor.is_some() {
            if signals.echoes.len() == OWN_PIDS {
                signals.echoes.pop_front();
            }
            signals.echoes.push_back(generation.clone());
            self.signals.1.notify_all();
        }
        own
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
        self.run_tracked(program, args, input).map(|(out, _)| out)
    }

    /// [`Dataplane::run`], returning the process id too.
    fn run_tracked(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<(String, u32), DataplaneError> {
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
        self.spawns.fetch_add(1, Ordering::Relaxed);
        let mut child = cmd.spawn().map_err(|source| DataplaneError::Spawn {
            command: command.clone(),
            source,
        })?;
        // Recorded before the tool reads its input, so before it can commit.
        let pid = child.id();
        if let Ok(mut pids) = self.own_pids.lock() {
            if pids.len() == OWN_PIDS {
                pids.pop_front();
            }
            pids.push_back(pid);
        }
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
            Ok((String::from_utf8_lossy(&out.stdout).into_owned(), pid))
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

    /// Reads back everything Palisade owns (three processes).
    ///
    /// The three are independent: they run at once, each output parsed on
    /// the thread that read it, so a read costs about its slowest part.
    pub fn read(&self) -> Result<Readback, DataplaneError> {
        let join = |h: std::thread::ScopedJoinHandle<'_, _>| {
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        };
        let (v4, v6, sets) = std::thread::scope(|s| {
            let v4 = s.spawn(|| self.save(Family::V4).map(|t| parse_table(&t)));
            let v6 = s.spawn(|| self.save(Family::V6).map(|t| parse_table(&t)));
            let sets = self
                .run("ipset", &["save"], None)
                .and_then(|t| parse_sets(&t));
            (join(v4), join(v6), sets)
        });
        let ((ipv4, hooks_v4), (ipv6, hooks_v6), sets) = (v4?, v6?, sets?);
        Ok(Readback {
            state: NodeState { ipv4, ipv6, sets },
            hooks_v4,
            hooks_v6,
        })
    }

    /// Runs the scripts of a plan in order; stops at the first failure.
    pub fn apply(&self, plan: &Plan) -> Result<(), DataplaneError> {
        self.apply_tracked(plan).map(|_| ())
    }

    /// [`Dataplane::apply`], returning the process id of each table's
    /// restore (one kernel transaction each).
    fn apply_tracked(&self, plan: &Plan) -> Result<Vec<(IpFamily, u32)>, DataplaneError> {
        let mut restores = Vec::new();
        if let Some(text) = &plan.scripts.sets {
            self.run("ipset", &["restore"], Some(text))?;
        }
        for (family, tools, text) in [
            (IpFamily::V4, Family::V4, &plan.scripts.ipv4),
            (IpFamily::V6, Family::V6, &plan.scripts.ipv6),
        ] {
            if let Some(text) = text {
                let (_, pid) = self.run_tracked(
                    &self.backend.command(tools, "restore"),
                    &["-w", "5", "--noflush"],
                    Some(text),
                )?;
                restores.push((family, pid));
            }
        }
        if let Some(text) = &plan.scripts.set_removals {
            self.run("ipset", &["restore"], Some(text))?;
        }
        Ok(restores)
    }

    /// The chains a write from the model is checked by in `family`: those
    /// edited rule by rule (see [`Plan::chains_edited`]), and `INPUT` /
    /// `OUTPUT` when hooks changed.
    fn chains_to_check(plan: &Plan, family: IpFamily) -> Vec<&str> {
        let mut names: Vec<&str> = plan.chains_edited(family);
        if plan.hooks_written(family) {
            names.extend([BuiltinChain::Input.name(), BuiltinChain::Output.name()]);
        }
        names
    }

    /// Reads back the chains `plan` edited rule by rule and compares them
    /// with `desired`: each such chain (`iptables -S <chain>` on nft, one
    /// `iptables-save` on legacy, where a listing costs as much), and the
    /// built-in chains' heads when hooks changed. Chains written whole are
    /// not read: their transaction set their whole content (see
    /// [`Plan::chains_edited`]). Set writes check themselves: an `add` of a
    /// present entry or a `del` of an absent one fails the batch.
    /// `Err(NotConverged)` names the first difference.
    pub fn check_written(&self, plan: &Plan, desired: &NodeRuleset) -> Result<(), DataplaneError> {
        for (family, tool_family) in [(IpFamily::V4, Family::V4), (IpFamily::V6, Family::V6)] {
            let want = desired.family(family);
            let names = Self::chains_to_check(plan, family);
            if names.is_empty() {
                continue;
            }
            // Listing one chain costs as much as saving the table on
            // legacy; on nft, a few listings are cheaper than one save.
            let save = match self.backend {
                Backend::Nft if names.len() <= 4 => None,
                _ => Some(self.save(tool_family)?),
            };
            for name in names {
                let listing = match &save {
                    Some(text) => legacy_listing(text, name),
                    None => {
                        let tool = self.backend.command(tool_family, "");
                        self.run(&tool, &["-w", "5", "-S", name], None)?
                    }
                };
                let got = parse_chain_listing(&listing, name).unwrap_or_default();
                check_chain(want, name, &got)?;
            }
        }
        Ok(())
    }

    /// Checks a write from the model by its `nft monitor` echo instead of
    /// listing the chains it edited; false when the echo cannot tell and
    /// the listing must run. True only when:
    /// - a monitor is followed, has reported a generation since before the
    ///   model was last verified by a full read (`verified`), so it has
    ///   reported every change made since, and is not lagging;
    /// - within the echo wait ([`ECHO_WAIT`]), the generation of each restore that edited a
    ///   chain was reported, with exactly the rules added and deleted in
    ///   each edited chain that the plan wrote;
    /// - no change by another process to an edited chain (nor one that
    ///   invalidates the model) was reported before it: generations come
    ///   in commit order, so any change the write was made on top of is
    ///   known by now.
    ///
    /// Then each edited chain held what the model says when the edit was
    /// applied, and so holds the desired rules after it. A change by
    /// another process committed after the write is reported after the
    /// echo, and repaired by the next sync as any drift.
    fn check_by_echo(
        &self,
        plan: &Plan,
        restores: &[(IpFamily, u32)],
        verified: Option<Instant>,
    ) -> bool {
        let Some(edits) = &plan.edits else {
            return false;
        };
        let wanted: Vec<(IpFamily, u32)> = restores
            .iter()
            .copied()
            .filter(|(family, _)| !Self::chains_to_check(plan, *family).is_empty())
            .collect();
        let deadline = Instant::now() + self.echo_wait;
        let (_, ready) = &*self.signals;
        let mut signals = self.signals();
        let echoes: Vec<(IpFamily, Generation)> = loop {
            let Some(link) = signals.monitor.as_mut() else {
                return false;
            };
            let live_before_read =
                matches!((link.live_since, verified), (Some(l), Some(v)) if l <= v);
            if link.lagging || !live_before_read {
                return false;
            }
            let found: Option<Vec<(IpFamily, Generation)>> = wanted
                .iter()
                .map(|(family, pid)| {
                    signals
                        .echoes
                        .iter()
                        .rev()
                        .find(|g| g.pid == Some(*pid))
                        .map(|g| (*family, g.clone()))
                })
                .collect();
            if let Some(found) = found {
                break found;
            }
            let now = Instant::now();
            if now >= deadline {
                if let Some(link) = signals.monitor.as_mut() {
                    link.lagging = true;
                }
                tracing::warn!(
                    wait = ?self.echo_wait,
                    "no nft monitor echo of a write in time; checking writes by listing until one comes"
                );
                return false;
            }
            signals = ready
                .wait_timeout(signals, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        };
        if signals.invalidated {
            return false;
        }
        for (family, generation) in &echoes {
            let table = match family {
                IpFamily::V4 => &edits.ipv4,
                IpFamily::V6 => &edits.ipv6,
            };
            let mut expected: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
            for e in &table.edits {
                let n = expected.entry(e.chain.as_str()).or_default();
                n.0 += e.inserts.len();
                n.1 += e.deletes.len();
            }
            for h in &table.add_hooks {
                expected.entry(h.builtin.name()).or_default().0 += 1;
            }
            for h in &table.remove_hooks {
                expected.entry(h.builtin.name()).or_default().1 += 1;
            }
            for (chain, lines) in expected {
                let key = (*family, chain.to_string());
                if generation.rule_lines.get(&key).copied().unwrap_or_default() != lines
                    || signals.suspects.contains(&key)
                {
                    return false;
                }
            }
        }
        true
    }

    /// Takes the node to `desired`, writing only the difference.
    ///
    /// With a trusted model: plans from the model (nothing is run when
    /// nothing differs), writes the edits, checks what was written (by its
    /// `nft monitor` echo when it can, else by listing), and updates the
    /// model. Without one, or when that write fails or reads back wrong:
    /// reads everything back, rewrites whole every chain that differs (one
    /// transaction per table, not read again), and trusts the new model
    /// from then on. See the module docs.
    pub fn sync(&self, desired: &NodeRuleset) -> Result<SyncReport, DataplaneError> {
        let started = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (suspects, invalidated) = {
            let mut signals = self.signals();
            (
                std::mem::take(&mut signals.suspects),
                std::mem::take(&mut signals.invalidated),
            )
        };
        let mut trusted = !invalidated
            && cache
                .verified
                .is_some_and(|t| t.elapsed() < self.verify_period);
        let mut reading = Duration::ZERO;
        if let (true, Some(model), false) = (trusted, cache.model.as_mut(), suspects.is_empty()) {
            let listing = Instant::now();
            trusted = self.recheck(model, &suspects);
            reading += listing.elapsed();
        }
        let mut fell_back = false;
        if let (true, Some(model)) = (trusted, &cache.model) {
            let planning = Instant::now();
            let plan = plan_from_model(model, desired);
            let planning = planning.elapsed();
            if plan.is_empty() {
                return Ok(SyncReport {
                    reading,
                    planning,
                    ..SyncReport::default()
                });
            }
            let write = Instant::now();
            let written = self
                .apply_tracked(&plan)
                .map(|restores| (started.elapsed(), restores));
            let writing = write.elapsed();
            let checking = Instant::now();
            let verified = cache.verified;
            let checked = written.and_then(|(at, restores)| {
                if self.backend == Backend::Nft && self.check_by_echo(&plan, &restores, verified) {
                    return Ok((at, true));
                }
                self.check_written(&plan, desired).map(|()| (at, false))
            });
            match checked {
                Ok((to_kernel, checked_by_echo)) => {
                    reading += checking.elapsed();
                    if let (Some(model), Some(edits)) = (cache.model.as_mut(), &plan.edits) {
                        model.update(desired, edits);
                    }
                    return Ok(SyncReport {
                        chains_written: plan.chains_written(IpFamily::V4).len()
                            + plan.chains_written(IpFamily::V6).len(),
                        plan,
                        full_read: false,
                        fell_back: false,
                        checked_by_echo,
                        to_kernel,
                        writing,
                        reading,
                        planning,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "write from the cached model failed; reading everything back");
                    fell_back = true;
                }
            }
        }
        cache.verified = None;
        let previous = cache.model.take();
        let read_at = Instant::now();
        // The model of what is about to be written (its rules rendered
        // once for both, those the previous model has not at all) is made
        // while the tools read back: it does not depend on what they find.
        let (current, (model, modelling)) = std::thread::scope(|s| {
            let model = s.spawn(|| {
                let start = Instant::now();
                let model = Model::of_with(desired, previous.as_ref());
                (model, start.elapsed())
            });
            let current = self.read();
            let read = read_at.elapsed();
            let model = model
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (current.map(|c| (c, read)), model)
        });
        let (current, read) = current?;
        reading += read;
        let planning = Instant::now();
        let plan = plan_with(&current, desired, Some(&model));
        // Wall time: the model was made while the tools read back.
        let planning = planning.elapsed() + modelling.saturating_sub(read);
        let mut to_kernel = Duration::ZERO;
        let mut writing = Duration::ZERO;
        if !plan.is_empty() {
            let write = Instant::now();
            // Planned from what was just read, written as whole chains in
            // one transaction per table: no check after it (on 10k rules
            // it would cost as much as the write). A change made meanwhile
            // by someone else is theirs to announce: the monitor sees it.
            self.apply(&plan)?;
            writing = write.elapsed();
            to_kernel = started.elapsed();
        }
        cache.model = Some(model);
        cache.verified = Some(read_at);
        Ok(SyncReport {
            chains_written: plan.chains_written(IpFamily::V4).len()
                + plan.chains_written(IpFamily::V6).len(),
            plan,
            full_read: true,
            fell_back,
            checked_by_echo: false,
            to_kernel,
            writing,
            reading,
            planning,
        })
    }

    /// Lists the `suspects` and takes what differs out of `model`, so the
    /// plan rewrites it whole. False when only a full read can tell (a
    /// hook out of place, a chain the model does not know, a tool failing).
    fn recheck(&self, model: &mut Model, suspects: &[(IpFamily, String)]) -> bool {
        for (family, chain) in suspects {
            let tool_family = match family {
                IpFamily::V4 => Family::V4,
                IpFamily::V6 => Family::V6,
            };
            let tool = self.backend.command(tool_family, "");
            let listed = match self.run(&tool, &["-w", "5", "-S", chain], None) {
                Ok(text) => parse_chain_listing(&text, chain),
                // A chain deleted out of band cannot be listed.
                Err(DataplaneError::Failed { .. }) => None,
                Err(_) => return false,
            };
            let table = model.table_mut(*family);
            if chain == BuiltinChain::Input.name() || chain == BuiltinChain::Output.name() {
                let want: Vec<String> = table
                    .hooks
                    .iter()
                    .filter(|h| h.builtin.name() == chain)
                    .map(|h| h.id())
                    .collect();
                let got = listed.unwrap_or_default();
                let ours = got
                    .iter()
                    .filter(|id| super::readback::is_hook_id(id))
                    .count();
                if got.len() < want.len() || got[..want.len()] != want[..] || ours != want.len() {
                    return false;
                }
                continue;
            }
            let have: Option<Vec<&str>> = table.ids(chain);
            let got: Option<Vec<&str>> = listed
                .as_ref()
                .map(|l| l.iter().map(String::as_str).collect());
            match (have, got) {
                (a, b) if a == b => {}
                (Some(_), _) => {
                    if let Some(rules) = table.chains.get_mut(chain) {
                        super::model::mark_unknown(rules);
                    }
                }
                (None, Some(_)) => return false,
                (None, None) => {}
            }
        }
        true
    }

    /// Reads everything back now and repairs what differs from `desired`
    /// (what a monitor event or the verification period leads to).
    pub fn verify(&self, desired: &NodeRuleset) -> Result<SyncReport, DataplaneError> {
        self.invalidate();
        self.sync(desired)
    }

    /// Removes everything Palisade ever wrote (hooks, chains, sets) and
    /// nothing else, from a full read.
    pub fn cleanup(&self) -> Result<SyncReport, DataplaneError> {
        self.verify(&empty_ruleset(""))
    }
}

/// The `iptables -S <chain>`-like lines of `chain` in `iptables-save`
/// output (pure).
fn legacy_listing(save: &str, chain: &str) -> String {
    let prefix = format!("-A {chain} ");
    let mut out = String::new();
    for line in save.lines() {
        if line.starts_with(':') && line[1..].split(' ').next() == Some(chain) {
            out.push_str(&format!("-N {chain}\n"));
        } else if line.starts_with(&prefix) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Compares one chain as listed after a write with what `desired` has for
/// it: a Palisade chain must hold exactly its rule ids (or be gone when
/// not desired); a built-in chain must start with the desired hooks.
fn check_chain(desired: &FamilyRuleset, name: &str, got: &[String]) -> Result<(), DataplaneError> {
    let family = desired.family;
    let differs = |what: String| {
        Err(DataplaneError::NotConverged(format!(
            "{family:?} {name}: {what}"
        )))
    };
    if name == BuiltinChain::Input.name() || name == BuiltinChain::Output.name() {
        let want: Vec<String> = desired
            .hooks
            .iter()
            .filter(|h| h.builtin.name() == name)
            .map(|h| h.id())
            .collect();
        let ours = got
            .iter()
            .filter(|id| super::readback::is_hook_id(id))
            .count();
        if got.len() < want.len() || got[..want.len()] != want[..] || ours != want.len() {
            return differs(format!(
                "hooks {want:?}, head of chain {:?}",
                &got[..got.len().min(3)]
            ));
        }
        return Ok(());
    }
    match desired.chain(name) {
        Some(c)
            if c.rules.len() == got.len() && c.rules.iter().zip(got).all(|(r, g)| r.id == *g) =>
        {
            Ok(())
        }
        Some(c) => differs(format!(
            "{} rules written, {} read back",
            c.rules.len(),
            got.len()
        )),
        None if got.is_empty() => Ok(()),
        None => differs(format!("{} rules left in a chain to delete", got.len())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::node::readback::known_hooks;

    /// A plan from the model editing one chain of IPv4 (one insert, one
    /// delete) and the echo a restore with process id `pid` would give it.
    fn edit_plan(pid: u32, added: usize, deleted: usize) -> (Plan, Generation) {
        let edits = NodeEdits {
            ipv4: super::super::model::TableEdits {
                edits: vec![super::super::model::ChainEdit {
                    chain: "PAL-I-0123456789".into(),
                    deletes: vec!["-s 10.0.0.1/32 -j RETURN".into()],
                    inserts: vec![(Some(1), "-s 10.0.0.2/32 -j RETURN".into())],
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        let plan = Plan {
            edits: Some(edits),
            ..Default::default()
        };
        let echo = Generation {
            pid: Some(pid),
            touches_palisade: true,
            chains: vec![(IpFamily::V4, "PAL-I-0123456789".into())],
            unknown: false,
            rule_lines: [((IpFamily::V4, "PAL-I-0123456789".into()), (added, deleted))].into(),
        };
        (plan, echo)
    }

    fn own(dp: &Dataplane, pid: u32) {
        dp.own_pids.lock().unwrap().push_back(pid);
    }

    #[test]
    fn a_write_is_checked_by_its_echo_only_when_the_monitor_saw_everything_before_it() {
        let dp = Dataplane::new(Backend::Nft, None);
        let (plan, echo) = edit_plan(41, 1, 1);
        let restores = [(IpFamily::V4, 41)];
        own(&dp, 41);
        // No monitor followed: the listing checks.
        assert!(!dp.check_by_echo(&plan, &restores, Some(Instant::now())));
        dp.monitor_started();
        let verified_before_live = Instant::now();
        std::thread::sleep(Duration::from_millis(1));
        assert!(dp.echo(&echo), "own generation");
        assert!(dp.monitor_live());
        // Live only after the last full read: a change made between the
        // read and the monitor's start would have been missed.
        assert!(!dp.check_by_echo(&plan, &restores, Some(verified_before_live)));
        let verified = Instant::now();
        assert!(dp.check_by_echo(&plan, &restores, Some(verified)));
        // Rules written and echoed differ: list.
        let (plan2, echo2) = edit_plan(42, 2, 1);
        own(&dp, 42);
        dp.echo(&echo2);
        assert!(!dp.check_by_echo(&plan2, &[(IpFamily::V4, 42)], Some(verified)));
        // Another process changed the edited chain before the write.
        let (plan3, echo3) = edit_plan(43, 1, 1);
        own(&dp, 43);
        dp.suspect(IpFamily::V4, "PAL-I-0123456789");
        dp.echo(&echo3);
        assert!(!dp.check_by_echo(&plan3, &[(IpFamily::V4, 43)], Some(verified)));
        dp.signals().suspects.clear();
        assert!(dp.check_by_echo(&plan3, &[(IpFamily::V4, 43)], Some(verified)));
        // A foreign generation is no echo.
        let mut foreign = echo3.clone();
        foreign.pid = Some(7);
        assert!(!dp.echo(&foreign));
    }

    #[test]
    fn a_missing_echo_is_waited_for_then_the_listing_checks_until_one_comes() {
        let dp = Dataplane::new(Backend::Nft, None);
        let (plan, echo) = edit_plan(51, 1, 1);
        own(&dp, 51);
        dp.monitor_started();
        let mut other = echo.clone();
        other.pid = Some(9);
        dp.echo(&other);
        let verified = Instant::now();
        // The echo comes from another thread while the check waits.
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(10));
                dp.echo(&echo);
            });
            assert!(dp.check_by_echo(&plan, &[(IpFamily::V4, 51)], Some(verified)));
        });
        // None comes: after the wait the listing checks, and goes on
        // checking without waiting until an echo comes again.
        let (plan, echo) = edit_plan(52, 1, 1);
        own(&dp, 52);
        let start = Instant::now();
        assert!(!dp.check_by_echo(&plan, &[(IpFamily::V4, 52)], Some(verified)));
        assert!(start.elapsed() >= ECHO_WAIT);
        dp.echo(&echo);
        assert!(dp.check_by_echo(&plan, &[(IpFamily::V4, 52)], Some(verified)));
        dp.monitor_stopped();
        assert!(!dp.check_by_echo(&plan, &[(IpFamily::V4, 52)], Some(verified)));
    }

    #[test]
    fn whole_chains_rendered_from_the_model_are_the_same_text() {
        use crate::policy::testing::*;
        use crate::policy::{compile_node, validate};
        let valid = vec![validate(&web_policy()).unwrap()];
        let rs = compile_node("web-1", &valid, &facts_with_nodes()).unwrap();
        let model = Model::of(&rs);
        let empty = Readback::default();
        let with = plan_with(&empty, &rs, Some(&model));
        assert_eq!(with, plan(&empty, &rs));
        assert!(with.scripts.ipv4.is_some_and(|t| t.contains("-A PAL")));
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
}
