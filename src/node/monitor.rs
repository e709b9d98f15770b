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
//! ipsets are not nftables objects and do not appear here: set drift is
//! found by the periodic full read.

/// A committed generation, as far as drift detection cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The process that committed it, when `nft` named it.
    pub pid: Option<u32>,
    /// Whether any of its changes touched what Palisade owns.
    pub touches_palisade: bool,
}

/// Groups `nft monitor` lines into generations.
#[derive(Debug, Default)]
pub struct MonitorParser {
    touches_palisade: bool,
}

fn names_palisade(line: &str) -> bool {
    line.contains("PALISADE-")
        || line.contains("PAL-")
        || line.contains(" INPUT")
        || line.contains(" OUTPUT")
}

impl MonitorParser {
    /// Feeds one line; returns the generation it completes, if any.
    pub fn line(&mut self, line: &str) -> Option<Generation> {
        let Some(rest) = line.strip_prefix("# new generation ") else {
            if names_palisade(line) {
                self.touches_palisade = true;
            }
            return None;
        };
        let pid = rest
            .split_once(" by process ")
            .and_then(|(_, p)| p.split_whitespace().next())
            .and_then(|p| p.parse().ok());
        Some(Generation {
            pid,
            touches_palisade: std::mem::take(&mut self.touches_palisade),
        })
    }
}

#[cfg(test)]
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
                touches_palisade: true
            })
        );
        p.line("add rule ip filter KUBE-SERVICES counter return");
        assert_eq!(
            p.line("# new generation 19 by process 3 (iptables-nft)"),
            Some(Generation {
                pid: Some(3),
                touches_palisade: false
            })
        );
        p.line("delete rule ip filter INPUT handle 7");
        assert_eq!(
            p.line("# new generation 20"),
            Some(Generation {
                pid: None,
                touches_palisade: true
            })
        );
    }
}
