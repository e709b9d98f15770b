//! Reading back what Palisade owns from `iptables-save`, `iptables -S
//! <chain>` and `ipset save` output. Pure.
//!
//! Only `PALISADE-*` / `PAL-*` chains, Palisade's hook rules in `INPUT` /
//! `OUTPUT` and `PAL-*` sets are read; rules are known by the ids in their
//! comments, never by parsing their matches.

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::dataplane::DataplaneError;
use crate::policy::node::{
    BuiltinChain, Hook, INPUT_CHAIN, OUTPUT_CHAIN, is_palisade_chain, is_palisade_set,
    rule_id_from_comment,
};
use crate::policy::{IpFamily, NodeState, SetState, TableState};

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
    pub(crate) fn hooks(&self, family: IpFamily) -> &[HookRule] {
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
pub(crate) fn known_hooks() -> [Hook; 2] {
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
pub fn parse_sets(save: &str) -> Result<BTreeMap<String, SetState>, DataplaneError> {
    let mut sets = BTreeMap::new();
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

/// Whether `id` is the id of a hook Palisade writes.
pub fn is_hook_id(id: &str) -> bool {
    known_hooks().iter().any(|h| h.id() == id)
}

/// The rule ids of `chain` in `iptables -S <chain>` output (`-N` and `-A`
/// lines); `None` when it lists no such chain. Rules without a Palisade id
/// are `?`.
pub fn parse_chain_listing(listing: &str, chain: &str) -> Option<Vec<String>> {
    let mut found = false;
    let mut ids = Vec::new();
    for line in listing.lines() {
        if line.strip_prefix("-N ").map(str::trim) == Some(chain)
            || line.strip_prefix("-P ").and_then(|l| l.split(' ').next()) == Some(chain)
        {
            found = true;
            continue;
        }
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let w = words(rest);
        if w.first().map(String::as_str) != Some(chain) {
            continue;
        }
        found = true;
        ids.push(
            comment_of(&w)
                .and_then(rule_id_from_comment)
                .unwrap_or("?")
                .to_string(),
        );
    }
    found.then_some(ids)
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

    #[test]
    fn chain_listing_gives_ids_in_order() {
        let listing = "-N PAL-I-0123456789\n-A PAL-I-0123456789 -s 10.0.0.1/32 -m comment --comment \"palisade:0123456789abcdef x\" -j RETURN\n-A PAL-I-0123456789 -j ACCEPT\n";
        assert_eq!(
            parse_chain_listing(listing, "PAL-I-0123456789").unwrap(),
            ["0123456789abcdef", "?"]
        );
        assert_eq!(parse_chain_listing("", "PAL-I-0123456789"), None);
        let input = "-P INPUT ACCEPT\n-A INPUT -j X\n";
        assert_eq!(parse_chain_listing(input, "INPUT").unwrap(), ["?"]);
    }
}
