//! Reading back what Palisade owns from `iptables-save`, `iptables -S
//! <chain>` and `ipset save` output. Pure.
//!
//! Only `PALISADE-*` / `PAL-*` chains, Palisade's hook rules in `INPUT` /
//! `OUTPUT` and `PAL-*` sets are read; rules are known by the ids in their
//! comments, never by parsing their matches.

use std::borrow::Cow;
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

/// The words of a line of `iptables-save` output, honouring double
/// quotes and backslash escapes as iptables-restore does; lazily, and
/// borrowed from the line unless quoting changed them (a read-back of 10k
/// rules splits 10k lines, but needs only two words of each).
struct Words<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Words<'a> {
    type Item = Cow<'a, str>;

    fn next(&mut self) -> Option<Cow<'a, str>> {
        let s = self.rest.trim_start();
        if s.is_empty() {
            self.rest = s;
            return None;
        }
        let end = s
            .find(|c: char| c.is_whitespace() || c == '"')
            .unwrap_or(s.len());
        if !s[end..].starts_with('"') {
            self.rest = &s[end..];
            return Some(Cow::Borrowed(&s[..end]));
        }
        let mut word = String::new();
        let mut quoted = false;
        let mut consumed = s.len();
        let mut chars = s.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' if quoted => {
                    if let Some((_, n)) = chars.next() {
                        word.push(n);
                    }
                }
                '"' => quoted = !quoted,
                c if c.is_whitespace() && !quoted => {
                    consumed = i;
                    break;
                }
                c => word.push(c),
            }
        }
        self.rest = &s[consumed..];
        Some(Cow::Owned(word))
    }
}

#[cfg(test)]
fn words(line: &str) -> Vec<String> {
    Words { rest: line }.map(Cow::into_owned).collect()
}

/// The first word of a rule (`CHAIN -m ...`: its chain) and the Palisade
/// id in its first comment, if any.
fn chain_and_id(rule: &str) -> Option<(Cow<'_, str>, Option<String>)> {
    let mut words = Words { rest: rule };
    let chain = words.next()?;
    while let Some(word) = words.next() {
        if word == "--comment" {
            let id = words
                .next()
                .and_then(|c| rule_id_from_comment(&c).map(str::to_string));
            return Some((chain, id));
        }
    }
    Some((chain, None))
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
            let (_, id) = chain_and_id(rule.strip_prefix("-A ")?)?;
            Some((id?, packets))
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
        let Some((chain, id)) = chain_and_id(rest) else {
            continue;
        };
        if is_palisade_chain(&chain) {
            let id = id.unwrap_or_else(|| "?".to_string());
            match state.chains.get_mut(chain.as_ref()) {
                Some(ids) => ids.push(id),
                None => {
                    state.chains.insert(chain.into_owned(), vec![id]);
                }
            }
            continue;
        }
        let slot = match chain.as_ref() {
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
        let Some((name, id)) = chain_and_id(rest) else {
            continue;
        };
        if name != chain {
            continue;
        }
        found = true;
        ids.push(id.unwrap_or_else(|| "?".to_string()));
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
        assert_eq!(words("  a\tb  "), ["a", "b"]);
        assert_eq!(words(r#"x"y z"w v"#), ["xy zw", "v"]);
        assert_eq!(
            chain_and_id(
                r#"PAL-I-0 -s 10.0.0.1/32 -m comment --comment "palisade:0123456789abcdef a b" -j RETURN"#
            ),
            Some(("PAL-I-0".into(), Some("0123456789abcdef".to_string())))
        );
        assert_eq!(
            chain_and_id("PAL-I-0 -m comment --comment palisade:0123456789abcdef -j X"),
            Some(("PAL-I-0".into(), Some("0123456789abcdef".to_string())))
        );
        assert_eq!(
            chain_and_id("INPUT -j ACCEPT"),
            Some(("INPUT".into(), None))
        );
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
