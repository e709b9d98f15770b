//! Reading `nft monitor`: which committed generations touched what
//! Palisade owns, and which process committed them. Pure.
//!
//! `nft monitor` prints the changes of each committed transaction, then
//! `# new generation <n> by process <pid> (<name>)`. A generation is
//! drift when one of its lines names a Palisade chain or set (`PALISADE-`,
//! `PAL-`) or the built-in `INPUT` / `OUTPUT` chains its hooks sit in,
//! and its process is not one of the dataplane's own
//! ([`super::dataplane::Dataplane::is_own_process`]): the dataplane checks
//! its own writes itself, so they do not cost a full read.
//!
//! A drifted generation names the chains it touched (`add rule ip filter
//! PAL-I-… …`, `delete rule ip6 filter INPUT handle 7`, `flush chain …`):
//! the dataplane then reads back only those ([`Generation::chains`]).
//! Anything else about Palisade's names (a table flushed or deleted, a line
//! of another shape) leaves `chains` incomplete and sets
//! [`Generation::unknown`]: everything is read back.
//!
//! ipsets are not nftables objects and do not appear here: set drift is
//! found by the periodic full read.
//!
//! A generation the dataplane's own process committed is its write's
//! echo: [`note_generation`] hands it to the dataplane, which takes it as
//! the check of that write (see [`super::dataplane`], "The check after a
//! write"). `nft monitor` prints rules without their comments, so the echo
//! is checked by its rule lines per chain ([`Generation::rule_lines`]).

/// A committed generation, as far as drift detection cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generation {
    /// The process that committed it, when `nft` named it.
    pub pid: Option<u32>,
    /// Whether any of its changes touched what Palisade owns.
    pub touches_palisade: bool,
    /// The filter-table chains of Palisade (and `INPUT` / `OUTPUT`) its
    /// rule and chain changes touched, by family.
    pub chains: Vec<(IpFamily, String)>,
    /// A change touching Palisade that `chains` does not describe.
    pub unknown: bool,
    /// Per chain of [`Generation::chains`]: rules added (`add rule`,
    /// `insert rule`) and deleted (`delete rule`).
    pub rule_lines: BTreeMap<(IpFamily, String), (usize, usize)>,
}

/// Groups `nft monitor` lines into generations.
#[derive(Debug, Default)]
pub struct MonitorParser {
    pending: Generation,
}

/// The (family, chain) of a rule or chain change in the filter table:
/// `<verb> rule|chain ip|ip6 filter <chain> …`.
fn chain_of(line: &str) -> Option<(IpFamily, String)> {
    let w: Vec<&str> = line.split_whitespace().collect();
    match w.as_slice() {
        [verb, "rule" | "chain", family, "filter", chain, ..]
            if ["add", "delete", "flush", "replace", "insert"].contains(verb) =>
        {
            let family = match *family {
                "ip" => IpFamily::V4,
                "ip6" => IpFamily::V6,
                _ => return None,
            };
            Some((family, chain.to_string()))
        }
        _ => None,
    }
}

/// Whether a filter-table line adds (`Some(true)`) or deletes
/// (`Some(false)`) one rule.
fn rule_line(line: &str) -> Option<bool> {
    match line
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["add" | "insert", "rule"] => Some(true),
        ["delete", "rule"] => Some(false),
        _ => None,
    }
}

fn names_palisade(line: &str) -> bool {
    line.contains("PALISADE-")
        || line.contains("PAL-")
        || line.contains(" INPUT")
        || line.contains(" OUTPUT")
        // A filter table flushed or deleted takes Palisade's chains with it.
        || ((line.starts_with("delete table ") || line.starts_with("flush table "))
            && line.trim_end().ends_with(" filter"))
}

impl MonitorParser {
    /// Feeds one line; returns the generation it completes, if any.
    pub fn line(&mut self, line: &str) -> Option<Generation> {
        let Some(rest) = line.strip_prefix("# new generation ") else {
            if names_palisade(line) {
                self.pending.touches_palisade = true;
                match chain_of(line) {
                    Some(c) => {
                        if let Some(added) = rule_line(line) {
                            let n = self.pending.rule_lines.entry(c.clone()).or_default();
                            if added {
                                n.0 += 1;
                            } else {
                                n.1 += 1;
                            }
                        }
                        if !self.pending.chains.contains(&c) {
                            self.pending.chains.push(c);
                        }
                    }
                    None => self.pending.unknown = true,
                }
            }
            return None;
        };
        let mut generation = std::mem::take(&mut self.pending);
        generation.pid = rest
            .split_once(" by process ")
            .and_then(|(_, p)| p.split_whitespace().next())
            .and_then(|p| p.parse().ok());
        Some(generation)
    }
}

use std::collections::BTreeMap;

use super::dataplane::Dataplane;
use crate::policy::IpFamily;

/// Tells `dataplane` what a generation means for its model, in the order
/// `nft monitor` reported them: one its own process committed is the echo
/// of its write (kept for the check of that write, no drift); one that did
/// not touch Palisade means nothing; otherwise the chains it touched are
/// suspect, or the whole model when the change is not about named chains.
/// True when the dataplane should sync (drift).
pub fn note_generation(dataplane: &Dataplane, generation: &Generation) -> bool {
    if dataplane.echo(generation) || !generation.touches_palisade {
        return false;
    }
    if generation.unknown {
        dataplane.invalidate();
    }
    for (family, chain) in &generation.chains {
        dataplane.suspect(*family, chain);
    }
    true
}

/// Reads `nft monitor` output from `out` to its end on the calling thread,
/// telling `dataplane` about each generation ([`note_generation`]) and
/// calling `on_drift` after each that is drift: the blocking counterpart
/// of the agent's follower, for tests and benchmarks. Calls
/// [`Dataplane::monitor_started`] first and [`Dataplane::monitor_stopped`]
/// at the end.
pub fn follow(dataplane: &Dataplane, out: impl std::io::BufRead, mut on_drift: impl FnMut()) {
    dataplane.monitor_started();
    let mut parser = MonitorParser::default();
    for line in out.lines() {
        let Ok(line) = line else { break };
        if let Some(generation) = parser.line(&line)
            && note_generation(dataplane, &generation)
        {
            on_drift();
        }
    }
    dataplane.monitor_stopped();
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn generations_carry_their_process_and_whether_they_touch_palisade() {
        let mut p = MonitorParser::default();
        assert_eq!(
            p.line("add rule ip filter PAL-I-0123456789 ip saddr 10.0.0.1 counter return"),
            None
        );
        assert_eq!(
            p.line("# new generation 18 by process 27529 (iptables-nft-re)"),
            Some(Generation {
                pid: Some(27529),
                touches_palisade: true,
                chains: vec![(IpFamily::V4, "PAL-I-0123456789".into())],
                unknown: false,
                rule_lines: [((IpFamily::V4, "PAL-I-0123456789".into()), (1, 0))].into(),
            })
        );
        p.line("add rule ip filter KUBE-SERVICES counter return");
        assert_eq!(
            p.line("# new generation 19 by process 3 (iptables-nft)"),
            Some(Generation {
                pid: Some(3),
                ..Default::default()
            })
        );
        p.line("delete rule ip6 filter INPUT handle 7");
        p.line("delete rule ip6 filter INPUT handle 8");
        assert_eq!(
            p.line("# new generation 20"),
            Some(Generation {
                pid: None,
                touches_palisade: true,
                chains: vec![(IpFamily::V6, "INPUT".into())],
                unknown: false,
                rule_lines: [((IpFamily::V6, "INPUT".into()), (0, 2))].into(),
            })
        );
        p.line("insert rule ip filter PAL-I-0123456789 ip saddr 10.0.0.3 counter return");
        p.line("add rule ip filter PAL-I-0123456789 ip saddr 10.0.0.4 counter return");
        p.line("delete rule ip filter PAL-I-0123456789 handle 3");
        let g = p
            .line("# new generation 21 by process 8 (iptables-nft-re)")
            .unwrap();
        assert_eq!(
            g.rule_lines,
            [((IpFamily::V4, "PAL-I-0123456789".into()), (2, 1))].into()
        );
        p.line("delete table ip filter");
        let g = p.line("# new generation 21 by process 9 (nft)").unwrap();
        assert!(g.unknown && g.chains.is_empty());
    }
}
