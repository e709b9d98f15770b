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
                    Some(c) if !self.pending.chains.contains(&c) => self.pending.chains.push(c),
                    Some(_) => {}
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

use super::dataplane::Dataplane;
use crate::policy::IpFamily;

/// Tells `dataplane` what a generation means for its model: nothing when
/// it did not touch Palisade or the dataplane's own process committed it;
/// otherwise the chains it touched are suspect, or the whole model when
/// the change is not about named chains. True when the dataplane should
/// sync (drift).
pub fn note_generation(dataplane: &Dataplane, generation: &Generation) -> bool {
    if !generation.touches_palisade || generation.pid.is_some_and(|p| dataplane.is_own_process(p)) {
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
            })
        );
        p.line("delete table ip filter");
        let g = p.line("# new generation 21 by process 9 (nft)").unwrap();
        assert!(g.unknown && g.chains.is_empty());
    }
}
