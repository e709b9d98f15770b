//! The node layer: every policy selecting a node, compiled into one
//! abstract, ordered ruleset per address family (the `filter` table of
//! iptables and ip6tables) plus the ipsets its rules match.
//!
//! The node module renders it 1:1 — one [`NodeRule`] is one iptables rule,
//! one [`IpSet`] one `hash:net` set — and writes [`NodeRule::comment`] into
//! each rule so that reading the ids back finds drift without parsing
//! rules. See the [module docs](super) for the shape of the chains.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

use crate::api::{IcmpMatch, Layer, PolicyMode, Protocol, RatePeriod};

use super::facts::{AllowVerdict, Facts, FailsafeScope};
use super::hash::{digest, short_hash};
use super::validate::{PeerRef, PortSpan, ValidPolicy, ValidRule, policies_for_node};
use super::warnings::{Covers, Produced, Warning, lint};
use super::{Direction, IpFamily, PolicyError};

/// Top chain for inbound traffic, jumped to from `INPUT`.
pub const INPUT_CHAIN: &str = "PALISADE-INPUT";
/// Top chain for outbound traffic, jumped to from `OUTPUT`.
pub const OUTPUT_CHAIN: &str = "PALISADE-OUTPUT";
/// Failsafe chain for inbound traffic.
pub const FAILSAFE_IN_CHAIN: &str = "PALISADE-FS-IN";
/// Failsafe chain for outbound traffic.
pub const FAILSAFE_OUT_CHAIN: &str = "PALISADE-FS-OUT";
/// Dispatch chain for inbound traffic: a jump to every Enforce policy's
/// chain in turn, each followed by a check of the borrowed mark bit
/// ([`MARK_BIT`]); entered when the bit is clear on arrival.
pub const DISPATCH_IN_CHAIN: &str = "PALISADE-POL-IN";
/// Dispatch chain for outbound traffic (bit clear on arrival).
pub const DISPATCH_OUT_CHAIN: &str = "PALISADE-POL-OUT";
/// Dispatch chain for inbound traffic that arrives with [`MARK_BIT`] set
/// (by another tool): the same jumps, the check inverted.
pub const DISPATCH_MARKED_IN_CHAIN: &str = "PALISADE-POLM-IN";
/// Dispatch chain for outbound traffic arriving with [`MARK_BIT`] set.
pub const DISPATCH_MARKED_OUT_CHAIN: &str = "PALISADE-POLM-OUT";
/// One rule flipping [`MARK_BIT`] (inbound): an Enforce policy's allow
/// goes here (so the dispatch chain sees the bit changed), and so does the
/// dispatch chain's check (flipping it back before leaving).
pub const FLIP_IN_CHAIN: &str = "PALISADE-FLIP-IN";
/// [`FLIP_IN_CHAIN`] for outbound traffic.
pub const FLIP_OUT_CHAIN: &str = "PALISADE-FLIP-OUT";
/// The packet-mark bit the dispatch chains borrow to learn that a policy
/// chain allowed a packet. Borrowed, not owned: it is flipped, never set,
/// and flipped back before the packet leaves Palisade's chains, so every
/// packet leaves with the mark it came with, whoever else uses the bit.
pub const MARK_BIT: u32 = 0x0100_0000;
/// Last chain for inbound traffic: the Audit policies' accounting, then
/// the default-drop.
pub const END_IN_CHAIN: &str = "PALISADE-END-IN";
/// Last chain for outbound traffic.
pub const END_OUT_CHAIN: &str = "PALISADE-END-OUT";
/// Prefix of every chain Palisade owns besides the `PALISADE-` ones: a
/// policy chain is `PAL-I-<10 hex>` or `PAL-O-<10 hex>`.
pub const POLICY_CHAIN_PREFIX: &str = "PAL-";
/// Prefix of every ipset Palisade owns: `PAL-<16 hex>-4` or `-6`.
pub const SET_PREFIX: &str = "PAL-";
/// Longest chain name iptables accepts.
pub const MAX_CHAIN_NAME: usize = 28;
/// Longest ipset name.
pub const MAX_SET_NAME: usize = 31;
/// Longest LOG prefix iptables accepts.
pub const MAX_LOG_PREFIX: usize = 29;
/// Longest hashlimit name (the kernel's IFNAMSIZ - 1 for older revisions).
pub const MAX_HASHLIMIT_NAME: usize = 15;
/// A rule's literal CIDRs of one family are matched one rule per CIDR up to
/// this many; beyond it, through one set.
pub const SET_THRESHOLD: usize = 4;
/// Prefix of the comment of every rule Palisade writes; the rule id follows.
pub const COMMENT_PREFIX: &str = "palisade:";
/// Rate of every LOG rule (per rule, not per peer): enough to see what
/// happens, not enough to flood the journal.
pub const LOG_LIMIT: LogLimit = LogLimit {
    count: 10,
    per: RateUnit::Second,
    burst: 20,
};
/// Burst of a rate limit that does not set one.
pub const DEFAULT_BURST: u32 = 5;

/// Whether a chain name is one Palisade owns (and may rewrite or delete).
pub fn is_palisade_chain(name: &str) -> bool {
    name.starts_with("PALISADE-") || name.starts_with(POLICY_CHAIN_PREFIX)
}

/// Whether an ipset name is one Palisade owns.
pub fn is_palisade_set(name: &str) -> bool {
    name.starts_with(SET_PREFIX)
}

/// The policy chain of `policy` for `direction`: `PAL-I-` / `PAL-O-` and
/// the first 10 hex digits of SHA-256 of the policy name. Stable across
/// rule changes, so an edit rewrites the chain in place.
pub fn policy_chain_name(policy: &str, direction: Direction) -> String {
    let d = match direction {
        Direction::Ingress => 'I',
        Direction::Egress => 'O',
    };
    format!(
        "{POLICY_CHAIN_PREFIX}{d}-{}",
        &short_hash(&["chain", policy])[..10]
    )
}

/// A built-in chain Palisade hooks into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum BuiltinChain {
    /// `INPUT`.
    Input,
    /// `OUTPUT`.
    Output,
}

impl BuiltinChain {
    /// The chain name in iptables.
    pub fn name(&self) -> &'static str {
        match self {
            BuiltinChain::Input => "INPUT",
            BuiltinChain::Output => "OUTPUT",
        }
    }
}

/// A jump from a built-in chain to a Palisade top chain, inserted as the
/// first rule of the built-in chain (`-I INPUT 1 -j PALISADE-INPUT`) so no
/// other rule can accept traffic a policy denies. What Palisade allows
/// returns to the next rule of the built-in chain (see [`AllowVerdict`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Hook {
    /// Where the jump is.
    pub builtin: BuiltinChain,
    /// The Palisade chain it jumps to.
    pub target: String,
}

impl Hook {
    /// Stable id of the hook rule (16 hex), for its comment.
    pub fn id(&self) -> String {
        short_hash(&["hook", self.builtin.name(), &self.target])
    }
    /// The comment to write on the hook rule.
    pub fn comment(&self) -> String {
        format!("{COMMENT_PREFIX}{} hook", self.id())
    }
}

/// Reads back the id Palisade wrote into a rule comment
/// (`palisade:<16 hex> ...`); `None` for anything else.
pub fn rule_id_from_comment(comment: &str) -> Option<&str> {
    let id = comment.strip_prefix(COMMENT_PREFIX)?.split(' ').next()?;
    (id.len() == 16 && id.bytes().all(|c| c.is_ascii_hexdigit())).then_some(id)
}

/// A conntrack state (`-m conntrack --ctstate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum CtState {
    /// `NEW` (and, for Palisade's purposes, untracked first packets).
    New,
    /// `ESTABLISHED`.
    Established,
    /// `RELATED`.
    Related,
    /// `INVALID`.
    Invalid,
}

impl CtState {
    /// The name iptables uses.
    pub fn name(&self) -> &'static str {
        match self {
            CtState::New => "NEW",
            CtState::Established => "ESTABLISHED",
            CtState::Related => "RELATED",
            CtState::Invalid => "INVALID",
        }
    }
}

/// A layer-4 protocol match (`-p`). `All` is the absence of a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum L4Protocol {
    /// `-p tcp`.
    Tcp,
    /// `-p udp`.
    Udp,
    /// `-p icmp` (iptables only).
    Icmp,
    /// `-p ipv6-icmp` (ip6tables only).
    Icmpv6,
}

impl L4Protocol {
    /// The name iptables uses.
    pub fn name(&self) -> &'static str {
        match self {
            L4Protocol::Tcp => "tcp",
            L4Protocol::Udp => "udp",
            L4Protocol::Icmp => "icmp",
            L4Protocol::Icmpv6 => "ipv6-icmp",
        }
    }
}

/// Which address of the packet a match or a rate limit looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum AddrSide {
    /// Source (`-s`, `match-set ... src`, `--hashlimit-mode srcip`): the peer of ingress rules.
    Source,
    /// Destination (`-d`, `match-set ... dst`, `--hashlimit-mode dstip`): the peer of egress rules.
    Destination,
}

impl AddrSide {
    fn of(direction: Direction) -> AddrSide {
        match direction {
            Direction::Ingress => AddrSide::Source,
            Direction::Egress => AddrSide::Destination,
        }
    }
    fn short(&self) -> &'static str {
        match self {
            AddrSide::Source => "src",
            AddrSide::Destination => "dst",
        }
    }
}

/// An address match: one CIDR, or membership of an ipset.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Address {
    /// `-s` / `-d` with a CIDR of the table's family (never `/0`: that is no match).
    Cidr(IpNet),
    /// `-m set --match-set <name> src|dst`.
    Set(String),
}

/// The peer match of a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerMatch {
    /// Which address of the packet.
    pub side: AddrSide,
    /// What it must be.
    pub address: Address,
}

/// An interface match.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum InterfaceMatch {
    /// `-i <name>`.
    In(String),
    /// `-o <name>`.
    Out(String),
}

/// Everything a rule matches on; absent parts match every packet. Render
/// in field order: interface, conntrack, protocol, port, ICMP type, peer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeMatch {
    /// `-i lo` / `-o lo`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<InterfaceMatch>,
    /// `-m conntrack --ctstate A,B` (empty: no conntrack match).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ct_states: Vec<CtState>,
    /// `-p`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<L4Protocol>,
    /// `--dport first[:last]` (TCP/UDP only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dports: Option<PortSpan>,
    /// `--icmp-type t[/c]` or `--icmpv6-type t[/c]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpTypeMatch>,
    /// The peer address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerMatch>,
    /// `-m mark --mark B/B` (`Some(true)`) or `--mark 0x0/B` (`Some(false)`):
    /// the state of the borrowed [`MARK_BIT`]. Rendered right after the
    /// interface.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mark: Option<bool>,
}

/// An ICMP or ICMPv6 type match (`--icmp-type t[/c]`, `--icmpv6-type t[/c]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IcmpTypeMatch {
    /// Type.
    #[serde(rename = "type")]
    pub icmp_type: u8,
    /// Code; `None`: every code of the type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u8>,
}

impl From<IcmpMatch> for IcmpTypeMatch {
    fn from(m: IcmpMatch) -> Self {
        IcmpTypeMatch {
            icmp_type: m.icmp_type,
            code: m.code,
        }
    }
}

/// The unit of a rate, as iptables spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RateUnit {
    /// `/second`.
    Second,
    /// `/minute`.
    Minute,
    /// `/hour`.
    Hour,
}

impl RateUnit {
    /// `second`, `minute` or `hour`.
    pub fn name(&self) -> &'static str {
        match self {
            RateUnit::Second => "second",
            RateUnit::Minute => "minute",
            RateUnit::Hour => "hour",
        }
    }
}

impl From<RatePeriod> for RateUnit {
    fn from(p: RatePeriod) -> Self {
        match p {
            RatePeriod::Second => RateUnit::Second,
            RatePeriod::Minute => RateUnit::Minute,
            RatePeriod::Hour => RateUnit::Hour,
        }
    }
}

/// A LOG rate (`-m limit --limit <count>/<per> --limit-burst <burst>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LogLimit {
    /// Entries per period.
    pub count: u32,
    /// The period.
    pub per: RateUnit,
    /// Burst.
    pub burst: u32,
}

/// A per-peer rate limit (`-m hashlimit --hashlimit-upto <count>/<per>
/// --hashlimit-burst <burst> --hashlimit-mode srcip|dstip --hashlimit-name <name>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HashLimit {
    /// `--hashlimit-name`, at most 15 characters, one per policy rule and
    /// family (all the rule's iptables rules share the bucket).
    pub name: String,
    /// New connections per period, per peer address.
    pub count: u32,
    /// The period.
    pub per: RateUnit,
    /// Burst.
    pub burst: u32,
    /// Which address is the key: the peer's.
    pub per_address: AddrSide,
}

/// What a rule does with a matching packet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "verdict", rename_all = "camelCase")]
pub enum NodeAction {
    /// `-j ACCEPT`: only with [`AllowVerdict::Accept`].
    Accept,
    /// `-j RETURN`: an allow. The top and failsafe chains are entered by
    /// one jump from the built-in chain and gotos, so a RETURN there resumes
    /// the built-in chain after Palisade's hook; inside an Audit policy's
    /// chain (entered by a jump from the end chain) it resumes the end
    /// chain. An Enforce policy's chain (jumped to from a dispatch chain)
    /// allows through [`AllowTarget::Flip`] instead.
    Return,
    /// `-j DROP`.
    Drop,
    /// `-j <chain>`; an unmatched packet returns and goes on.
    Jump {
        /// The target chain.
        chain: String,
    },
    /// `-g <chain>`: continue in `chain`; when it returns, return from
    /// this chain too.
    Goto {
        /// The target chain.
        chain: String,
    },
    /// `-j MARK --xor-mark B`: flips the borrowed [`MARK_BIT`] and goes on.
    FlipMark,
    /// No target: the rule only counts the packets reaching it (an Audit
    /// policy's would-be drops).
    Count,
    /// `-m limit ... -j LOG --log-prefix <prefix>`: logs and goes on.
    Log {
        /// At most 29 characters, ending in a space.
        prefix: String,
        /// Log rate.
        limit: LogLimit,
    },
    /// `-m hashlimit --hashlimit-upto ... -j RETURN|ACCEPT`: allows while
    /// the peer is under its rate; above it, the packet goes on to the next
    /// rule (so another rule may still allow it, as the union of allows
    /// requires) and, if none does, to the end chain — dropped, or counted
    /// as an Audit policy's would-be drop.
    AllowUnderLimit {
        /// The limit.
        limit: HashLimit,
        /// What the allow does.
        allow: AllowTarget,
    },
}

/// What an allow does: the target of an allow rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "target", rename_all = "camelCase")]
pub enum AllowTarget {
    /// `-j RETURN`: back to the built-in chain (or, in an Audit policy's
    /// chain, to the end chain).
    Return,
    /// `-j ACCEPT` ([`AllowVerdict::Accept`]).
    Accept,
    /// `-g <flip chain>`: an Enforce policy's allow under
    /// [`AllowVerdict::Return`]; the flip chain flips [`MARK_BIT`] and
    /// returns to the dispatch chain, which sees the bit changed and leaves
    /// for the built-in chain.
    Flip {
        /// The flip chain.
        chain: String,
    },
}

impl AllowTarget {
    fn of(verdict: AllowVerdict) -> AllowTarget {
        match verdict {
            AllowVerdict::Return => AllowTarget::Return,
            AllowVerdict::Accept => AllowTarget::Accept,
        }
    }

    fn action(&self) -> NodeAction {
        match self {
            AllowTarget::Return => NodeAction::Return,
            AllowTarget::Accept => NodeAction::Accept,
            AllowTarget::Flip { chain } => NodeAction::Goto {
                chain: chain.clone(),
            },
        }
    }
}

impl NodeAction {
    fn allow(verdict: AllowVerdict) -> NodeAction {
        AllowTarget::of(verdict).action()
    }
}

/// Why a rule exists; written after the id in its comment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum RuleOrigin {
    /// Loopback accept.
    Loopback,
    /// ESTABLISHED,RELATED accept.
    Established,
    /// INVALID drop.
    Invalid,
    /// Jump to the failsafe chain.
    FailsafeJump,
    /// A failsafe entry (`kubelet`, `icmp`, `ssh`, ...).
    Failsafe {
        /// The entry name.
        name: String,
    },
    /// Jump to a policy's chain.
    PolicyJump {
        /// The policy.
        policy: String,
    },
    /// The dispatch chain's check, after the jump to a policy's chain,
    /// that the policy allowed the packet (the borrowed mark bit flipped).
    Allowed {
        /// The policy.
        policy: String,
    },
    /// The flip of the borrowed mark bit.
    Flip,
    /// The goto from a chain of the allow path to the next one.
    Next,
    /// An Audit policy's LOG and count of what it would drop.
    WouldDrop {
        /// The policy.
        policy: String,
    },
    /// A policy rule (its LOG or its allow).
    Rule {
        /// The policy.
        policy: String,
        /// The direction.
        direction: Direction,
        /// The rule name.
        rule: String,
    },
    /// The end chain's default when an Enforce policy governs the
    /// direction: DROP.
    DefaultDrop,
}

impl fmt::Display for RuleOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleOrigin::Loopback => f.write_str("loopback"),
            RuleOrigin::Established => f.write_str("established"),
            RuleOrigin::Invalid => f.write_str("invalid"),
            RuleOrigin::FailsafeJump => f.write_str("failsafe"),
            RuleOrigin::Failsafe { name } => write!(f, "failsafe/{name}"),
            RuleOrigin::PolicyJump { policy } => write!(f, "policy/{policy}"),
            RuleOrigin::Allowed { policy } => write!(f, "allowed/{policy}"),
            RuleOrigin::Flip => f.write_str("flip"),
            RuleOrigin::Rule {
                policy,
                direction,
                rule,
            } => write!(f, "{policy}/{direction}/{rule}"),
            RuleOrigin::Next => f.write_str("next"),
            RuleOrigin::WouldDrop { policy } => write!(f, "audit/{policy}"),
            RuleOrigin::DefaultDrop => f.write_str("default-drop"),
        }
    }
}

/// One rule of a chain: one line of `iptables-restore` input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRule {
    /// 16 hex digits of SHA-256 over the family, chain, matches, action and
    /// origin: equal ids mean equal rules.
    pub id: String,
    /// Why the rule exists.
    pub origin: RuleOrigin,
    /// What it matches.
    pub matches: NodeMatch,
    /// What it does.
    pub action: NodeAction,
}

impl NodeRule {
    fn new(
        family: IpFamily,
        chain: &str,
        origin: RuleOrigin,
        matches: NodeMatch,
        action: NodeAction,
    ) -> Self {
        let id = short_hash(&[
            "rule",
            family.suffix(),
            chain,
            &canonical_match(&matches),
            &canonical_action(&action),
            &origin.to_string(),
        ]);
        NodeRule {
            id,
            origin,
            matches,
            action,
        }
    }

    /// The comment to write on the rule (`-m comment --comment`):
    /// `palisade:<id> <origin>`, at most 256 characters, no quotes.
    pub fn comment(&self) -> String {
        let mut c = format!("{COMMENT_PREFIX}{} {}", self.id, self.origin);
        c.truncate(256);
        c
    }
}

/// A chain Palisade owns, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeChain {
    /// Chain name (at most 28 characters).
    pub name: String,
    /// Its rules, in order.
    pub rules: Vec<NodeRule>,
}

impl NodeChain {
    /// The rule ids, in order: what the agent compares with what it reads back.
    pub fn rule_ids(&self) -> Vec<String> {
        self.rules.iter().map(|r| r.id.clone()).collect()
    }
}

/// The rules of one family (one `filter` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FamilyRuleset {
    /// IPv4 (iptables) or IPv6 (ip6tables).
    pub family: IpFamily,
    /// Jumps from built-in chains, sorted.
    pub hooks: Vec<Hook>,
    /// Chains: top chains, failsafe chains, then policy chains by name.
    pub chains: Vec<NodeChain>,
}

impl FamilyRuleset {
    /// The chain named `name`.
    pub fn chain(&self, name: &str) -> Option<&NodeChain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

/// An ipset of type `hash:net` (`create <name> hash:net family inet|inet6`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IpSet {
    /// `PAL-<16 hex>-4|6`, derived from the owner, so new content is swapped
    /// in under the same name and the rules matching it do not change.
    pub name: String,
    /// The set's family.
    pub family: IpFamily,
    /// What the set stands for: `sg:<id>`, `pl:<id>`, `nodes:<selector>`,
    /// `rule:<policy>/<direction>/<rule>` or `failsafe:ssh`.
    pub owner: String,
    /// Entries, canonical, sorted, with covered entries removed and `/0`
    /// split in two halves (`hash:net` refuses `/0`). May be empty.
    pub entries: Vec<IpNet>,
}

/// A policy's share of a ruleset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDigest {
    /// Policy name.
    pub name: String,
    /// Its mode.
    pub mode: PolicyMode,
    /// 16 hex digits over its chains (names and rule ids, both families)
    /// and the content of the sets they match: what the agent reports as
    /// "policy X at generation G, hash H".
    pub hash: String,
    /// Directions whose established flows the policy asks to cut when the
    /// node layer narrows (`existingConnections: Cut`, Enforce only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cut_established: Vec<Direction>,
}

/// Everything the node layer enforces on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRuleset {
    /// The node.
    pub node: String,
    /// iptables.
    pub ipv4: FamilyRuleset,
    /// ip6tables.
    pub ipv6: FamilyRuleset,
    /// Every set the rules match, sorted by name.
    pub sets: Vec<IpSet>,
    /// The policies selecting the node, by name.
    pub policies: Vec<PolicyDigest>,
    /// Node-layer warnings of those policies (unresolved references,
    /// peers matching nobody, shadowed or duplicate rules).
    pub warnings: Vec<Warning>,
}

impl NodeRuleset {
    /// The rules of one family.
    pub fn family(&self, family: IpFamily) -> &FamilyRuleset {
        match family {
            IpFamily::V4 => &self.ipv4,
            IpFamily::V6 => &self.ipv6,
        }
    }

    /// The set named `name`.
    pub fn set(&self, name: &str) -> Option<&IpSet> {
        self.sets.iter().find(|s| s.name == name)
    }

    /// The hash of a selected policy's share.
    pub fn policy_hash(&self, policy: &str) -> Option<&str> {
        self.policies
            .iter()
            .find(|p| p.name == policy)
            .map(|p| p.hash.as_str())
    }

    /// 16 hex digits over everything the agent writes (hooks, chains with
    /// their rule ids, sets with their entries): equal hashes, nothing to do.
    pub fn hash(&self) -> String {
        let mut lines = Vec::new();
        for fam in [&self.ipv4, &self.ipv6] {
            for h in &fam.hooks {
                lines.push(format!("{} hook {}", fam.family.suffix(), h.id()));
            }
            for c in &fam.chains {
                lines.push(format!(
                    "{} chain {} {}",
                    fam.family.suffix(),
                    c.name,
                    c.rule_ids().join(",")
                ));
            }
        }
        for s in &self.sets {
            lines.push(set_line(s));
        }
        digest(&lines)
    }

    /// Number of iptables + ip6tables rules (hooks included).
    pub fn rule_count(&self) -> usize {
        [&self.ipv4, &self.ipv6]
            .iter()
            .map(|f| f.hooks.len() + f.chains.iter().map(|c| c.rules.len()).sum::<usize>())
            .sum()
    }

    /// Number of entries across the sets.
    pub fn set_entries(&self) -> usize {
        self.sets.iter().map(|s| s.entries.len()).sum()
    }
}

fn set_line(s: &IpSet) -> String {
    let entries: Vec<String> = s.entries.iter().map(ToString::to_string).collect();
    format!("set {} {} {}", s.name, s.family.suffix(), entries.join(","))
}

fn canonical_match(m: &NodeMatch) -> String {
    let mut parts = Vec::new();
    match &m.interface {
        Some(InterfaceMatch::In(i)) => parts.push(format!("in={i}")),
        Some(InterfaceMatch::Out(i)) => parts.push(format!("out={i}")),
        None => {}
    }
    if !m.ct_states.is_empty() {
        let states: Vec<&str> = m.ct_states.iter().map(CtState::name).collect();
        parts.push(format!("ct={}", states.join(",")));
    }
    if let Some(p) = m.protocol {
        parts.push(format!("p={}", p.name()));
    }
    if let Some(d) = m.dports {
        parts.push(format!("dport={}-{}", d.first, d.last));
    }
    if let Some(i) = m.icmp {
        match i.code {
            Some(c) => parts.push(format!("icmp={}/{c}", i.icmp_type)),
            None => parts.push(format!("icmp={}", i.icmp_type)),
        }
    }
    if let Some(p) = &m.peer {
        match &p.address {
            Address::Cidr(net) => parts.push(format!("{}={net}", p.side.short())),
            Address::Set(name) => parts.push(format!("{}-set={name}", p.side.short())),
        }
    }
    if let Some(set) = m.mark {
        parts.push(format!("mark={}", if set { "set" } else { "clear" }));
    }
    parts.join(" ")
}

fn canonical_action(a: &NodeAction) -> String {
    match a {
        NodeAction::Accept => "accept".into(),
        NodeAction::Return => "return".into(),
        NodeAction::Drop => "drop".into(),
        NodeAction::Jump { chain } => format!("jump {chain}"),
        NodeAction::Goto { chain } => format!("goto {chain}"),
        NodeAction::FlipMark => format!("flip-mark {MARK_BIT:#x}"),
        NodeAction::Count => "count".into(),
        NodeAction::Log { prefix, limit } => {
            format!(
                "log {prefix:?} {}/{} burst {}",
                limit.count,
                limit.per.name(),
                limit.burst
            )
        }
        NodeAction::AllowUnderLimit { limit, allow } => format!(
            "{} {} {}/{} burst {} per {}",
            match allow {
                AllowTarget::Return => "return-under".to_string(),
                AllowTarget::Accept => "accept-under".to_string(),
                AllowTarget::Flip { chain } => format!("flip-under {chain}"),
            },
            limit.name,
            limit.count,
            limit.per.name(),
            limit.burst,
            limit.per_address.short()
        ),
    }
}

/// Canonical set entries: truncated, sorted, covered entries removed, `/0`
/// split into two `/1` halves. Idempotent.
pub fn normalize_set_entries(entries: impl IntoIterator<Item = IpNet>) -> Vec<IpNet> {
    // ipset's hash:net cannot hold a /0: split it into its two /1 halves.
    normalize_literals(entries.into_iter().flat_map(|n| match n.trunc() {
        IpNet::V4(v4) if v4.prefix_len() == 0 => {
            halves_v4().into_iter().map(IpNet::V4).collect::<Vec<_>>()
        }
        IpNet::V6(v6) if v6.prefix_len() == 0 => halves_v6().into_iter().map(IpNet::V6).collect(),
        other => vec![other],
    }))
}

fn halves_v4() -> [Ipv4Net; 2] {
    [
        Ipv4Net::new_assert([0, 0, 0, 0].into(), 1),
        Ipv4Net::new_assert([128, 0, 0, 0].into(), 1),
    ]
}

fn halves_v6() -> [Ipv6Net; 2] {
    [
        Ipv6Net::new_assert(std::net::Ipv6Addr::UNSPECIFIED, 1),
        Ipv6Net::new_assert(std::net::Ipv6Addr::new(0x8000, 0, 0, 0, 0, 0, 0, 0), 1),
    ]
}

/// Literal CIDRs of one rule: sorted, covered ones dropped (no halving).
fn normalize_literals(nets: impl IntoIterator<Item = IpNet>) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = nets.into_iter().map(|n| n.trunc()).collect();
    nets.sort();
    nets.dedup();
    // Networks are nested or disjoint and sort parents first, so a net is
    // covered iff the last kept one contains it.
    let mut kept: Vec<IpNet> = Vec::with_capacity(nets.len());
    for n in nets {
        if !kept.last().is_some_and(|k| k.contains(&n)) {
            kept.push(n);
        }
    }
    kept
}

/// Names handed out during one compilation, checked for hash collisions.
#[derive(Default)]
struct Names {
    owners: BTreeMap<String, String>,
    sets: BTreeMap<String, IpSet>,
}

impl Names {
    fn claim(&mut self, name: &str, owner: &str) -> Result<(), PolicyError> {
        match self.owners.get(name) {
            Some(first) if first != owner => Err(PolicyError::NameCollision {
                name: name.to_string(),
                first: first.clone(),
                second: owner.to_string(),
            }),
            Some(_) => Ok(()),
            None => {
                self.owners.insert(name.to_string(), owner.to_string());
                Ok(())
            }
        }
    }

    /// Registers the set of `owner` for `family` and returns its name.
    fn set(
        &mut self,
        owner: &str,
        family: IpFamily,
        entries: Vec<IpNet>,
    ) -> Result<String, PolicyError> {
        let name = format!(
            "{SET_PREFIX}{}-{}",
            short_hash(&["set", owner]),
            family.suffix()
        );
        self.claim(&name, &format!("set {owner}"))?;
        self.sets.entry(name.clone()).or_insert_with(|| IpSet {
            name: name.clone(),
            family,
            owner: owner.to_string(),
            entries: normalize_set_entries(entries),
        });
        Ok(name)
    }
}

/// The peer matches of one rule for one family (`None` = any address).
/// Literal CIDRs are matched one by one up to [`SET_THRESHOLD`], through a
/// set beyond; every reference (group, prefix list, node selector) through
/// its own set, present even when empty or unresolved, so that a change of
/// membership is a set swap and never a chain rewrite.
fn peer_matches(
    peers: &[PeerRef],
    family: IpFamily,
    side: AddrSide,
    literal_owner: &str,
    facts: &Facts,
    names: &mut Names,
) -> Result<Vec<Option<PeerMatch>>, PolicyError> {
    let literals = normalize_literals(peers.iter().filter_map(|p| match p {
        PeerRef::Cidr(n) if IpFamily::of_net(n) == family => Some(*n),
        _ => None,
    }));
    if literals.iter().any(|n| n.prefix_len() == 0) {
        return Ok(vec![None]);
    }
    let mut out = Vec::new();
    if literals.len() > SET_THRESHOLD {
        let name = names.set(literal_owner, family, literals)?;
        out.push(Some(PeerMatch {
            side,
            address: Address::Set(name),
        }));
    } else {
        out.extend(literals.into_iter().map(|n| {
            Some(PeerMatch {
                side,
                address: Address::Cidr(n),
            })
        }));
    }
    for peer in peers {
        let (owner, entries) = match peer {
            PeerRef::Cidr(_) => continue,
            PeerRef::SecurityGroup(id) => (
                format!("sg:{id}"),
                facts
                    .security_groups
                    .get(id)
                    .into_iter()
                    .flatten()
                    .filter(|n| IpFamily::of_net(n) == family)
                    .copied()
                    .collect(),
            ),
            PeerRef::PrefixList(id) => (
                format!("pl:{id}"),
                facts
                    .prefix_lists
                    .get(id)
                    .into_iter()
                    .flat_map(|pl| pl.cidrs.iter())
                    .filter(|n| IpFamily::of_net(n) == family)
                    .copied()
                    .collect(),
            ),
            PeerRef::Nodes(selector) => (
                format!("nodes:{selector}"),
                facts
                    .selected_addresses(selector)
                    .iter()
                    .filter(|a| IpFamily::of_addr(a) == family)
                    .map(|a| IpNet::from(*a))
                    .collect(),
            ),
        };
        let name = names.set(&owner, family, entries)?;
        out.push(Some(PeerMatch {
            side,
            address: Address::Set(name),
        }));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// LOG prefix of a policy rule: `pal-in:<policy>/<rule> ` (or `pal-out:`),
/// shortened to `<first 14>~<6 hex>` when too long for iptables' 29.
fn log_prefix(policy: &str, direction: Direction, rule: &str) -> String {
    let head = match direction {
        Direction::Ingress => "pal-in:",
        Direction::Egress => "pal-out:",
    };
    let full = format!("{policy}/{rule}");
    let room = MAX_LOG_PREFIX - head.len() - 1;
    if full.len() <= room {
        format!("{head}{full} ")
    } else {
        let keep: String = full.chars().take(room - 7).collect();
        format!("{head}{keep}~{} ", &short_hash(&["log", &full])[..6])
    }
}

/// LOG prefix of an Audit policy's would-be drops: `pal-audit:<policy> `
/// (shortened like [`log_prefix`] when too long).
fn audit_prefix(policy: &str) -> String {
    let head = "pal-audit:";
    let room = MAX_LOG_PREFIX - head.len() - 1;
    if policy.len() <= room {
        format!("{head}{policy} ")
    } else {
        let keep: String = policy.chars().take(room - 7).collect();
        format!("{head}{keep}~{} ", &short_hash(&["audit", policy])[..6])
    }
}

/// The (protocol, port, icmp) triples a rule becomes in one family.
fn traffic(
    rule: &ValidRule,
    family: IpFamily,
) -> Vec<(Option<L4Protocol>, Option<PortSpan>, Option<IcmpTypeMatch>)> {
    match (rule.protocol, family) {
        (Protocol::Tcp | Protocol::Udp, _) => {
            let p = if rule.protocol == Protocol::Tcp {
                L4Protocol::Tcp
            } else {
                L4Protocol::Udp
            };
            if rule.ports.is_empty() {
                vec![(Some(p), None, None)]
            } else {
                rule.ports
                    .iter()
                    .map(|s| (Some(p), Some(*s), None))
                    .collect()
            }
        }
        (Protocol::Icmp, IpFamily::V4) => {
            vec![(Some(L4Protocol::Icmp), None, rule.icmp.map(Into::into))]
        }
        (Protocol::Icmpv6, IpFamily::V6) => {
            vec![(Some(L4Protocol::Icmpv6), None, rule.icmp.map(Into::into))]
        }
        (Protocol::All, _) => vec![(None, None, None)],
        _ => vec![],
    }
}

/// A policy rule's iptables rules before ids: an optional LOG and the accept.
type Block = (
    Option<(NodeMatch, NodeAction)>,
    NodeMatch,
    NodeAction,
    RuleOrigin,
);

/// What a policy's chain is on the path.
#[derive(Clone)]
enum PolicyRole {
    /// An Enforce policy's chain, jumped to from the dispatch chains: its
    /// allows do this; what falls through returns to the dispatch chain.
    Enforce(AllowTarget),
    /// An Audit policy's chain, jumped to from the end chain: its allows
    /// return there; it counts (and logs) what falls through.
    Audit,
}

/// A goto leaving a chain of the allow path: taken when the borrowed mark
/// bit is in the given state (`None`: whatever its state).
type Exit<'a> = (Option<bool>, &'a str);

fn policy_chain(
    policy: &ValidPolicy,
    direction: Direction,
    family: IpFamily,
    chain: &str,
    role: PolicyRole,
    facts: &Facts,
    names: &mut Names,
) -> Result<NodeChain, PolicyError> {
    let allow = match &role {
        PolicyRole::Enforce(allow) => allow.clone(),
        PolicyRole::Audit => AllowTarget::Return,
    };
    let side = AddrSide::of(direction);
    let mut blocks: Vec<Block> = Vec::new();
    for rule in policy
        .rules(direction)
        .unwrap_or_default()
        .iter()
        .filter(|r| r.on(Layer::Node))
    {
        let owner = format!("{}/{direction}/{}", policy.name(), rule.name);
        let peers = peer_matches(
            &rule.peers,
            family,
            side,
            &format!("rule:{owner}"),
            facts,
            names,
        )?;
        let action = match rule.rate_limit {
            Some(rl) => {
                let name = format!(
                    "pl{}-{}",
                    family.suffix(),
                    &short_hash(&["hashlimit", &owner])[..10]
                );
                names.claim(&name, &format!("hashlimit {owner}"))?;
                NodeAction::AllowUnderLimit {
                    limit: HashLimit {
                        name,
                        count: rl.count,
                        per: rl.per.into(),
                        burst: rl.burst.unwrap_or(DEFAULT_BURST),
                        per_address: side,
                    },
                    allow: allow.clone(),
                }
            }
            None => allow.action(),
        };
        // Rate limits and logs count new connections only.
        let ct_states = if rule.rate_limit.is_some() {
            vec![CtState::New]
        } else {
            vec![]
        };
        let origin = RuleOrigin::Rule {
            policy: policy.name().to_string(),
            direction,
            rule: rule.name.clone(),
        };
        for (protocol, dports, icmp) in traffic(rule, family) {
            for peer in &peers {
                let m = NodeMatch {
                    interface: None,
                    ct_states: ct_states.clone(),
                    protocol,
                    dports,
                    icmp,
                    peer: peer.clone(),
                    mark: None,
                };
                let log = rule.log.then(|| {
                    let lm = NodeMatch {
                        ct_states: vec![CtState::New],
                        ..m.clone()
                    };
                    (
                        lm,
                        NodeAction::Log {
                            prefix: log_prefix(policy.name(), direction, &rule.name),
                            limit: LOG_LIMIT,
                        },
                    )
                });
                blocks.push((log, m, action.clone(), origin.clone()));
            }
        }
    }
    // Order-independent: sort by content, then drop blocks equal in content
    // (keeping the first origin by name); duplicates are linted elsewhere.
    blocks.sort();
    blocks.dedup_by(|b, a| a.0 == b.0 && a.1 == b.1 && a.2 == b.2);
    let mut rules = Vec::with_capacity(blocks.len() + 2);
    for (log, m, action, origin) in blocks {
        if let Some((lm, la)) = log {
            rules.push(NodeRule::new(family, chain, origin.clone(), lm, la));
        }
        rules.push(NodeRule::new(family, chain, origin, m, action));
    }
    let mut push = |origin, action| {
        rules.push(NodeRule::new(
            family,
            chain,
            origin,
            NodeMatch::default(),
            action,
        ))
    };
    match role {
        // Falling through returns to the dispatch chain, which tries the
        // next policy.
        PolicyRole::Enforce(_) => {}
        PolicyRole::Audit => {
            let origin = RuleOrigin::WouldDrop {
                policy: policy.name().to_string(),
            };
            push(
                origin.clone(),
                NodeAction::Log {
                    prefix: audit_prefix(policy.name()),
                    limit: LOG_LIMIT,
                },
            );
            push(origin, NodeAction::Count);
        }
    }
    Ok(NodeChain {
        name: chain.to_string(),
        rules,
    })
}

/// The addresses of one failsafe scope, as set entries of `family`.
fn scope_entries(scope: FailsafeScope, family: IpFamily, facts: &Facts) -> Vec<IpNet> {
    let addrs: Vec<std::net::IpAddr> = match scope {
        FailsafeScope::Cluster => {
            let mut a = facts.selected_addresses(&super::Selector::everything());
            a.extend(facts.nodes.iter().flat_map(|n| n.addresses.iter().copied()));
            return a
                .into_iter()
                .map(IpNet::from)
                .chain(facts.failsafe.cluster_cidrs.iter().copied())
                .filter(|n| IpFamily::of_net(n) == family)
                .collect();
        }
        FailsafeScope::ApiServer => facts.api_servers.clone(),
        FailsafeScope::Nameservers => facts.nameservers.clone(),
    };
    addrs
        .into_iter()
        .filter(|a| IpFamily::of_addr(a) == family)
        .map(IpNet::from)
        .collect()
}

/// The peer matches of one failsafe entry: each scope through its own set
/// (`failsafe:cluster`, `failsafe:apiserver`, `failsafe:nameservers`; the
/// membership changes as nodes come and go, so it is a set update, never a
/// chain rewrite), fixed CIDRs inline. Never "any address".
fn failsafe_peers(
    entry: &crate::policy::FailsafePort,
    family: IpFamily,
    side: AddrSide,
    facts: &Facts,
    names: &mut Names,
) -> Result<Vec<PeerMatch>, PolicyError> {
    let mut out = Vec::new();
    for scope in entry.scopes() {
        let owner = match scope {
            FailsafeScope::Cluster => "failsafe:cluster",
            FailsafeScope::ApiServer => "failsafe:apiserver",
            FailsafeScope::Nameservers => "failsafe:nameservers",
        };
        let name = names.set(owner, family, scope_entries(scope, family, facts))?;
        out.push(PeerMatch {
            side,
            address: Address::Set(name),
        });
    }
    for net in normalize_literals(
        entry
            .cidrs
            .iter()
            .copied()
            .filter(|n| IpFamily::of_net(n) == family && n.prefix_len() > 0),
    ) {
        out.push(PeerMatch {
            side,
            address: Address::Cidr(net),
        });
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn failsafe_chain(
    direction: Direction,
    family: IpFamily,
    verdict: AllowVerdict,
    exits: &[Exit<'_>],
    invalid_drop: bool,
    facts: &Facts,
    names: &mut Names,
) -> Result<NodeChain, PolicyError> {
    let (chain, ports) = match direction {
        Direction::Ingress => (FAILSAFE_IN_CHAIN, &facts.failsafe.inbound),
        Direction::Egress => (FAILSAFE_OUT_CHAIN, &facts.failsafe.outbound),
    };
    let side = AddrSide::of(direction);
    let fs = &facts.failsafe;
    let allow = NodeAction::allow(verdict);
    let mut rules = Vec::new();
    let mut push = |origin: RuleOrigin, m: NodeMatch, action: NodeAction| {
        rules.push(NodeRule::new(family, chain, origin, m, action));
    };
    let entry = |name: &str| RuleOrigin::Failsafe {
        name: name.to_string(),
    };
    let (l4, icmps) = match family {
        IpFamily::V4 => (L4Protocol::Icmp, &fs.icmp),
        IpFamily::V6 => (L4Protocol::Icmpv6, &fs.icmpv6),
    };
    for icmp in icmps {
        push(
            entry("icmp"),
            NodeMatch {
                protocol: Some(l4),
                icmp: Some((*icmp).into()),
                ..Default::default()
            },
            allow.clone(),
        );
    }
    if direction == Direction::Ingress && fs.ssh_port != 0 {
        let admins: Vec<PeerRef> = fs
            .admin_cidrs
            .iter()
            .filter(|n| n.prefix_len() > 0)
            .map(|n| PeerRef::Cidr(*n))
            .collect();
        let dports = Some(PortSpan {
            first: fs.ssh_port,
            last: fs.ssh_port,
        });
        if admins.iter().any(|p| match p {
            PeerRef::Cidr(n) => IpFamily::of_net(n) == family,
            _ => false,
        }) {
            for peer in peer_matches(&admins, family, side, "failsafe:ssh", facts, names)? {
                push(
                    entry("ssh"),
                    NodeMatch {
                        protocol: Some(L4Protocol::Tcp),
                        dports,
                        peer,
                        ..Default::default()
                    },
                    allow.clone(),
                );
            }
        }
    }
    for p in ports {
        let protocol = match p.protocol {
            Protocol::Tcp => L4Protocol::Tcp,
            Protocol::Udp => L4Protocol::Udp,
            _ => continue, // Failsafe::validate refuses these.
        };
        let dports = Some(PortSpan {
            first: p.ports.port,
            last: p.ports.end_port.unwrap_or(p.ports.port),
        });
        for peer in failsafe_peers(p, family, side, facts, names)? {
            push(
                entry(&p.name),
                NodeMatch {
                    protocol: Some(protocol),
                    dports,
                    peer: Some(peer),
                    ..Default::default()
                },
                allow.clone(),
            );
        }
    }
    if invalid_drop {
        // After the failsafe (ND and unsolicited ICMP errors can be INVALID
        // to conntrack), before any policy allow.
        push(
            RuleOrigin::Invalid,
            NodeMatch {
                ct_states: vec![CtState::Invalid],
                ..Default::default()
            },
            NodeAction::Drop,
        );
    }
    for (mark, next) in exits {
        push(
            RuleOrigin::Next,
            NodeMatch {
                mark: *mark,
                ..Default::default()
            },
            NodeAction::Goto {
                chain: next.to_string(),
            },
        );
    }
    Ok(NodeChain {
        name: chain.to_string(),
        rules,
    })
}

fn top_chain(direction: Direction, family: IpFamily, verdict: AllowVerdict) -> NodeChain {
    let (name, fs, lo) = match direction {
        Direction::Ingress => (
            INPUT_CHAIN,
            FAILSAFE_IN_CHAIN,
            InterfaceMatch::In("lo".into()),
        ),
        Direction::Egress => (
            OUTPUT_CHAIN,
            FAILSAFE_OUT_CHAIN,
            InterfaceMatch::Out("lo".into()),
        ),
    };
    let mut rules = Vec::new();
    let mut push =
        |origin, matches, action| rules.push(NodeRule::new(family, name, origin, matches, action));
    push(
        RuleOrigin::Loopback,
        NodeMatch {
            interface: Some(lo),
            ..Default::default()
        },
        NodeAction::allow(verdict),
    );
    push(
        RuleOrigin::Established,
        NodeMatch {
            ct_states: vec![CtState::Established, CtState::Related],
            ..Default::default()
        },
        NodeAction::allow(verdict),
    );
    push(
        RuleOrigin::FailsafeJump,
        NodeMatch::default(),
        NodeAction::Goto {
            chain: fs.to_string(),
        },
    );
    NodeChain {
        name: name.to_string(),
        rules,
    }
}

/// The end chain: every Audit policy's chain by a jump (each counts what it
/// would drop and returns), then the default-drop when an Enforce policy
/// governs the direction. With Audit policies alone, the packet returns to
/// the built-in chain as it came: Audit changes no verdict.
fn end_chain(
    direction: Direction,
    family: IpFamily,
    audits: &[&ValidPolicy],
    enforce: bool,
) -> NodeChain {
    let name = match direction {
        Direction::Ingress => END_IN_CHAIN,
        Direction::Egress => END_OUT_CHAIN,
    };
    let mut rules = Vec::new();
    for p in audits {
        rules.push(NodeRule::new(
            family,
            name,
            RuleOrigin::PolicyJump {
                policy: p.name().to_string(),
            },
            NodeMatch::default(),
            NodeAction::Jump {
                chain: policy_chain_name(p.name(), direction),
            },
        ));
    }
    if enforce {
        rules.push(NodeRule::new(
            family,
            name,
            RuleOrigin::DefaultDrop,
            NodeMatch::default(),
            NodeAction::Drop,
        ));
    }
    NodeChain {
        name: name.to_string(),
        rules,
    }
}

/// A dispatch chain: per Enforce policy (by name), a jump to its chain
/// and, under [`AllowVerdict::Return`], a check that the policy flipped
/// the borrowed mark bit away from `arrived` (then a goto to the flip
/// chain, which flips it back and, having been reached by gotos only,
/// returns to the built-in chain); then the end chain. A jump and a check
/// per policy keep the longest path through the chains at a fixed length
/// however many policies there are (nf_tables refuses paths of more than
/// 16 chains; linking the policies' chains by gotos did not scale).
fn dispatch_chain(
    name: &str,
    family: IpFamily,
    enforcing: &[(&ValidPolicy, String)],
    check: Option<(bool, &str)>,
    end: &str,
) -> NodeChain {
    let mut rules = Vec::with_capacity(enforcing.len() * 2 + 1);
    for (p, chain) in enforcing {
        let policy = p.name().to_string();
        rules.push(NodeRule::new(
            family,
            name,
            RuleOrigin::PolicyJump {
                policy: policy.clone(),
            },
            NodeMatch::default(),
            NodeAction::Jump {
                chain: chain.clone(),
            },
        ));
        if let Some((arrived, flip)) = check {
            rules.push(NodeRule::new(
                family,
                name,
                RuleOrigin::Allowed { policy },
                NodeMatch {
                    mark: Some(!arrived),
                    ..Default::default()
                },
                NodeAction::Goto {
                    chain: flip.to_string(),
                },
            ));
        }
    }
    rules.push(NodeRule::new(
        family,
        name,
        RuleOrigin::Next,
        NodeMatch::default(),
        NodeAction::Goto {
            chain: end.to_string(),
        },
    ));
    NodeChain {
        name: name.to_string(),
        rules,
    }
}

/// The flip chain: one rule flipping the borrowed mark bit.
fn flip_chain(name: &str, family: IpFamily) -> NodeChain {
    NodeChain {
        name: name.to_string(),
        rules: vec![NodeRule::new(
            family,
            name,
            RuleOrigin::Flip,
            NodeMatch::default(),
            NodeAction::FlipMark,
        )],
    }
}

/// One family's hooks and chains, per governed direction: the top chain,
/// the failsafe chain, the dispatch chains (jumping to the Enforce
/// policies' chains) and the flip chain, then the end chain (which jumps
/// to the Audit policies' chains); the policies' chains by name.
fn family_ruleset(
    family: IpFamily,
    selected: &[&ValidPolicy],
    facts: &Facts,
    names: &mut Names,
) -> Result<FamilyRuleset, PolicyError> {
    let (mut hooks, mut spine, mut pols) = (Vec::new(), Vec::new(), Vec::new());
    for (direction, builtin) in [
        (Direction::Ingress, BuiltinChain::Input),
        (Direction::Egress, BuiltinChain::Output),
    ] {
        let speakers: Vec<&ValidPolicy> = selected
            .iter()
            .copied()
            .filter(|p| p.rules(direction).is_some())
            .collect();
        if speakers.is_empty() {
            continue;
        }
        let (enforcing, audits): (Vec<&ValidPolicy>, Vec<&ValidPolicy>) = speakers
            .iter()
            .partition(|p| p.mode() == PolicyMode::Enforce);
        let enforce = !enforcing.is_empty();
        // Accepting outright is for directions Palisade enforces; with
        // Audit alone every allow hands back, so nothing changes.
        let verdict = if enforce {
            facts.allow
        } else {
            AllowVerdict::Return
        };
        let (end, dispatch, marked, flip) = match direction {
            Direction::Ingress => (
                END_IN_CHAIN,
                DISPATCH_IN_CHAIN,
                DISPATCH_MARKED_IN_CHAIN,
                FLIP_IN_CHAIN,
            ),
            Direction::Egress => (
                END_OUT_CHAIN,
                DISPATCH_OUT_CHAIN,
                DISPATCH_MARKED_OUT_CHAIN,
                FLIP_OUT_CHAIN,
            ),
        };
        let enforcing: Vec<(&ValidPolicy, String)> = enforcing
            .iter()
            .map(|p| (*p, policy_chain_name(p.name(), direction)))
            .collect();
        let top = top_chain(direction, family, verdict);
        hooks.push(Hook {
            builtin,
            target: top.name.clone(),
        });
        spine.push(top);
        // Where the failsafe chain goes, and the dispatch chains.
        let (exits, dispatches, allow): (Vec<Exit<'_>>, Vec<NodeChain>, AllowTarget) =
            match (enforce, verdict) {
                (false, _) => (vec![(None, end)], vec![], AllowTarget::Return),
                (true, AllowVerdict::Accept) => (
                    vec![(None, dispatch)],
                    vec![dispatch_chain(dispatch, family, &enforcing, None, end)],
                    AllowTarget::Accept,
                ),
                (true, AllowVerdict::Return) => (
                    vec![(Some(true), marked), (None, dispatch)],
                    vec![
                        dispatch_chain(dispatch, family, &enforcing, Some((false, flip)), end),
                        dispatch_chain(marked, family, &enforcing, Some((true, flip)), end),
                        flip_chain(flip, family),
                    ],
                    AllowTarget::Flip {
                        chain: flip.to_string(),
                    },
                ),
            };
        spine.push(failsafe_chain(
            direction, family, verdict, &exits, enforce, facts, names,
        )?);
        spine.extend(dispatches);
        for (p, chain) in &enforcing {
            names.claim(chain, &format!("chain {}/{direction}", p.name()))?;
            pols.push(policy_chain(
                p,
                direction,
                family,
                chain,
                PolicyRole::Enforce(allow.clone()),
                facts,
                names,
            )?);
        }
        for p in &audits {
            let chain = policy_chain_name(p.name(), direction);
            names.claim(&chain, &format!("chain {}/{direction}", p.name()))?;
            pols.push(policy_chain(
                p,
                direction,
                family,
                &chain,
                PolicyRole::Audit,
                facts,
                names,
            )?);
        }
        spine.push(end_chain(direction, family, &audits, enforce));
    }
    pols.sort_by(|a, b| a.name.cmp(&b.name));
    let chains = spine.into_iter().chain(pols).collect();
    Ok(FamilyRuleset {
        family,
        hooks,
        chains,
    })
}

/// A policy's hash: its chains (both families, both directions) with
/// their rule ids, then the content of every set they match.
fn policy_hash(policy: &str, families: [&FamilyRuleset; 2], sets: &[IpSet]) -> String {
    let mut lines = vec![format!("policy {policy}")];
    let mut used = std::collections::BTreeSet::new();
    for fam in families {
        for direction in [Direction::Ingress, Direction::Egress] {
            let Some(chain) = fam.chain(&policy_chain_name(policy, direction)) else {
                continue;
            };
            // The dispatch chains' jumps are the path's, not the policy's:
            // a neighbour coming or going leaves this hash alone.
            let ids: Vec<&str> = chain.rules.iter().map(|r| r.id.as_str()).collect();
            let ids = ids.join(",");
            lines.push(format!(
                "{} chain {} {ids}",
                fam.family.suffix(),
                chain.name
            ));
            for rule in &chain.rules {
                if let Some(PeerMatch {
                    address: Address::Set(name),
                    ..
                }) = &rule.matches.peer
                {
                    used.insert(name.as_str());
                }
            }
        }
    }
    lines.extend(
        sets.iter()
            .filter(|s| used.contains(s.name.as_str()))
            .map(set_line),
    );
    digest(&lines)
}

/// Compiles the node layer of `node` from every policy in `policies` that
/// selects it.
///
/// Contract: pure and deterministic — the order of `policies`, of their
/// rules, peers and ports does not change the result or its hashes. A
/// direction no selected policy speaks for gets no chain and no hook (it is
/// left as it was); a node no policy selects gets an empty ruleset (the
/// agent then removes everything Palisade wrote). Only rules with `Node`
/// in their layers contribute. Fails on an unknown node, two policies with
/// one name, or a hash collision of chain, set or hashlimit names.
pub fn compile_node(
    node: &str,
    policies: &[ValidPolicy],
    facts: &Facts,
) -> Result<NodeRuleset, PolicyError> {
    let me = facts.node(node).ok_or_else(|| PolicyError::UnknownNode {
        node: node.to_string(),
    })?;
    let selected = policies_for_node(me, policies);
    if let Some(w) = selected.windows(2).find(|w| w[0].name() == w[1].name()) {
        return Err(PolicyError::DuplicatePolicy {
            policy: w[0].name().to_string(),
        });
    }

    let mut names = Names::default();
    let ipv4 = family_ruleset(IpFamily::V4, &selected, facts, &mut names)?;
    let ipv6 = family_ruleset(IpFamily::V6, &selected, facts, &mut names)?;
    let sets: Vec<IpSet> = names.sets.into_values().collect();
    let policies = selected
        .iter()
        .map(|p| PolicyDigest {
            name: p.name().to_string(),
            mode: p.mode(),
            hash: policy_hash(p.name(), [&ipv4, &ipv6], &sets),
            cut_established: [Direction::Ingress, Direction::Egress]
                .into_iter()
                .filter(|d| {
                    p.cuts_established() && p.mode() == PolicyMode::Enforce && p.rules(*d).is_some()
                })
                .collect(),
        })
        .collect();

    let mut warnings: Vec<Warning> = selected
        .iter()
        .flat_map(|p| lint_node_layer(p, facts))
        .collect();
    warnings.sort();
    warnings.dedup();
    Ok(NodeRuleset {
        node: node.to_string(),
        ipv4,
        ipv6,
        sets,
        policies,
        warnings,
    })
}

/// A node-layer match for lint: protocol, port or ICMP, and peer (a CIDR or
/// a reference standing for a set).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct NodeAtom {
    protocol: Protocol,
    ports: Option<PortSpan>,
    icmp: Option<IcmpTypeMatch>,
    peer: AtomPeer,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum AtomPeer {
    Net(IpNet),
    Ref(String),
}

impl Covers for NodeAtom {
    fn covers(&self, o: &Self) -> bool {
        let peer = match (&self.peer, &o.peer) {
            (AtomPeer::Net(a), AtomPeer::Net(b)) => a.contains(b),
            (a, b) => a == b,
        };
        let traffic = match (self.protocol, o.protocol) {
            (Protocol::All, _) => true,
            (a, b) if a != b => false,
            _ => {
                let ports = match (self.ports, o.ports) {
                    (None, _) => true,
                    (Some(a), Some(b)) => a.covers(&b),
                    (Some(_), None) => false,
                };
                let icmp = match (self.icmp, o.icmp) {
                    (None, _) => true,
                    (Some(a), Some(b)) => {
                        a.icmp_type == b.icmp_type && (a.code.is_none() || a.code == b.code)
                    }
                    (Some(_), None) => false,
                };
                ports && icmp
            }
        };
        peer && traffic
    }
}

impl fmt::Display for NodeAtom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.protocol)?;
        if let Some(p) = self.ports {
            if p.first == p.last {
                write!(f, " {}", p.first)?;
            } else {
                write!(f, " {}-{}", p.first, p.last)?;
            }
        }
        if let Some(i) = self.icmp {
            write!(f, " type {}", i.icmp_type)?;
            if let Some(c) = i.code {
                write!(f, " code {c}")?;
            }
        }
        match &self.peer {
            AtomPeer::Net(n) => write!(f, " {n}"),
            AtomPeer::Ref(r) => write!(f, " {r}"),
        }
    }
}

/// Node-layer warnings of one policy: duplicate and shadowed rules (a
/// rate-limited rule allows conditionally, so it shadows nothing but can be
/// shadowed), references with no resolution, `nodeSelector` peers matching
/// no node. Sorted. The same for every node, so the controller can put
/// them in the policy's status.
pub fn lint_node_layer(policy: &ValidPolicy, facts: &Facts) -> Vec<Warning> {
    let mut warnings = Vec::new();
    for direction in [Direction::Ingress, Direction::Egress] {
        let Some(rules) = policy.rules(direction) else {
            continue;
        };
        let mut produced = Vec::new();
        for rule in rules.iter().filter(|r| r.on(Layer::Node)) {
            for peer in &rule.peers {
                let atom_peer = match peer {
                    PeerRef::Cidr(n) => AtomPeer::Net(*n),
                    PeerRef::SecurityGroup(id) | PeerRef::PrefixList(id) => {
                        let resolved = facts.security_groups.contains_key(id)
                            || facts.prefix_lists.contains_key(id);
                        if !resolved {
                            warnings.push(Warning::UnresolvedReference {
                                policy: policy.name().to_string(),
                                direction,
                                rule: rule.name.clone(),
                                id: id.clone(),
                                layer: Layer::Node,
                            });
                        }
                        AtomPeer::Ref(id.clone())
                    }
                    PeerRef::Nodes(sel) => {
                        if sel
                            .select(&facts.nodes)
                            .iter()
                            .all(|n| n.addresses.is_empty())
                        {
                            warnings.push(Warning::EmptyPeer {
                                policy: policy.name().to_string(),
                                direction,
                                rule: rule.name.clone(),
                                selector: sel.to_string(),
                            });
                        }
                        AtomPeer::Ref(format!("nodes {sel}"))
                    }
                };
                let spans: Vec<Option<PortSpan>> = if rule.ports.is_empty() {
                    vec![None]
                } else {
                    rule.ports.iter().copied().map(Some).collect()
                };
                for ports in spans {
                    produced.push(Produced {
                        rule: rule.name.clone(),
                        item: NodeAtom {
                            protocol: rule.protocol,
                            ports,
                            icmp: rule.icmp.map(Into::into),
                            peer: atom_peer.clone(),
                        },
                        unconditional: rule.rate_limit.is_none(),
                    });
                }
            }
        }
        warnings.extend(lint(policy.name(), direction, Layer::Node, &produced));
    }
    warnings.sort();
    warnings.dedup();
    warnings
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::api::{Layer, RateLimit};
    use crate::policy::testing::*;
    use crate::policy::validate;

    /// A readable one-line-per-rule view of a family, for fixtures.
    fn render(rs: &FamilyRuleset) -> Vec<String> {
        let mut out = Vec::new();
        for h in &rs.hooks {
            out.push(format!("{} -> {}", h.builtin.name(), h.target));
        }
        for c in &rs.chains {
            for r in &c.rules {
                let m = canonical_match(&r.matches);
                let sep = if m.is_empty() { "" } else { " " };
                out.push(format!(
                    "{}: {m}{sep}=> {} [{}]",
                    c.name,
                    canonical_action(&r.action),
                    r.origin
                ));
            }
        }
        out
    }

    fn facts_min_failsafe() -> Facts {
        let mut facts = facts_with_nodes();
        facts.failsafe.inbound.truncate(1);
        facts.failsafe.outbound.truncate(1);
        facts.failsafe.icmp.truncate(1);
        facts.failsafe.icmpv6.truncate(1);
        facts
    }

    #[test]
    fn seed_web_server_node_layer() {
        let facts = facts_min_failsafe();
        let rs = compile_node("web-1", &[validate(&web_policy()).unwrap()], &facts).unwrap();
        let chain = policy_chain_name("web", Direction::Ingress);
        let cluster = format!("{SET_PREFIX}{}-4", short_hash(&["set", "failsafe:cluster"]));
        assert_eq!(
            chain,
            "PAL-I-".to_string() + &short_hash(&["chain", "web"])[..10]
        );
        let expected: Vec<String> = [
            "INPUT -> PALISADE-INPUT",
            "PALISADE-INPUT: in=lo => return [loopback]",
            "PALISADE-INPUT: ct=ESTABLISHED,RELATED => return [established]",
            "PALISADE-INPUT: => goto PALISADE-FS-IN [failsafe]",
            "PALISADE-FS-IN: p=icmp icmp=3/4 => return [failsafe/icmp]",
            &format!("PALISADE-FS-IN: p=tcp dport=10250-10250 src-set={cluster} => return [failsafe/kubelet]"),
            "PALISADE-FS-IN: ct=INVALID => drop [invalid]",
            "PALISADE-FS-IN: mark=set => goto PALISADE-POLM-IN [next]",
            "PALISADE-FS-IN: => goto PALISADE-POL-IN [next]",
            &format!("PALISADE-POL-IN: => jump {chain} [policy/web]"),
            "PALISADE-POL-IN: mark=set => goto PALISADE-FLIP-IN [allowed/web]",
            "PALISADE-POL-IN: => goto PALISADE-END-IN [next]",
            &format!("PALISADE-POLM-IN: => jump {chain} [policy/web]"),
            "PALISADE-POLM-IN: mark=clear => goto PALISADE-FLIP-IN [allowed/web]",
            "PALISADE-POLM-IN: => goto PALISADE-END-IN [next]",
            "PALISADE-FLIP-IN: => flip-mark 0x1000000 [flip]",
            "PALISADE-END-IN: => drop [default-drop]",
            &format!("{chain}: p=tcp dport=22-22 src=203.0.113.0/24 => goto PALISADE-FLIP-IN [web/ingress/ssh]"),
            &format!("{chain}: p=tcp dport=80-80 => goto PALISADE-FLIP-IN [web/ingress/http]"),
            &format!("{chain}: p=tcp dport=443-443 => goto PALISADE-FLIP-IN [web/ingress/http]"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(render(&rs.ipv4), expected);
        // IPv6: only the web ports (::/0); SSH is IPv4-only.
        let v6 = render(&rs.ipv6);
        assert!(v6.contains(&format!(
            "{chain}: p=tcp dport=80-80 => goto PALISADE-FLIP-IN [web/ingress/http]"
        )));
        assert!(!v6.iter().any(|l| l.contains("dport=22-22")));
        // One set: the failsafe's cluster scope (every node's address).
        assert_eq!(rs.sets.len(), 2, "{:?}", rs.sets);
        assert!(rs.sets.iter().all(|s| s.owner == "failsafe:cluster"));
        assert_eq!(rs.policies.len(), 1);
        assert!(
            rs.ipv4.chain(OUTPUT_CHAIN).is_none(),
            "no policy speaks for egress"
        );
    }

    #[test]
    fn seed_jump_host_narrows_ssh_on_the_node_only() {
        let facts = facts_min_failsafe();
        let rs = compile_node("web-1", &[validate(&jump_host_policy()).unwrap()], &facts).unwrap();
        let chain = policy_chain_name("bastion", Direction::Ingress);
        let lines: Vec<String> = render(&rs.ipv4)
            .into_iter()
            .filter(|l| l.starts_with(&chain))
            .collect();
        assert_eq!(
            lines,
            [format!(
                "{chain}: p=tcp dport=22-22 src=203.0.113.10/32 => goto PALISADE-FLIP-IN [bastion/ingress/ssh-jump]"
            )]
        );
    }

    #[test]
    fn audit_alone_allows_nothing_drops_nothing_and_counts() {
        let mut p = web_policy();
        p.spec.mode = PolicyMode::Audit;
        let rs = compile_node("web-1", &[validate(&p).unwrap()], &facts_min_failsafe()).unwrap();
        let chain = policy_chain_name("web", Direction::Ingress);
        let lines = render(&rs.ipv4);
        // No drop anywhere, INVALID included; the end chain only jumps to
        // the Audit policy's chain, whose rules return to it.
        assert!(!lines.iter().any(|l| l.contains("=> drop")), "{lines:#?}");
        let end: Vec<&String> = lines
            .iter()
            .filter(|l| l.starts_with("PALISADE-END-IN"))
            .collect();
        assert_eq!(
            end,
            [&format!("PALISADE-END-IN: => jump {chain} [policy/web]")]
        );
        let own: Vec<&String> = lines.iter().filter(|l| l.starts_with(&chain)).collect();
        assert_eq!(
            &own[own.len() - 2..],
            [
                &format!("{chain}: => log \"pal-audit:web \" 10/second burst 20 [audit/web]"),
                &format!("{chain}: => count [audit/web]"),
            ]
        );
        assert!(own[..own.len() - 2].iter().all(|l| l.contains("=> return")));
        assert!(lines.contains(&"PALISADE-FS-IN: => goto PALISADE-END-IN [next]".to_string()));
    }

    #[test]
    fn accept_mode_accepts_only_where_an_enforce_policy_governs() {
        let mut facts = facts_min_failsafe();
        facts.allow = AllowVerdict::Accept;
        let mut audit = web_policy();
        audit.spec.mode = PolicyMode::Audit;
        let rs = compile_node("web-1", &[validate(&audit).unwrap()], &facts).unwrap();
        assert!(!render(&rs.ipv4).iter().any(|l| l.contains("=> accept")));
        let rs = compile_node("web-1", &[validate(&web_policy()).unwrap()], &facts).unwrap();
        let lines = render(&rs.ipv4);
        assert!(lines.contains(&"PALISADE-INPUT: in=lo => accept [loopback]".to_string()));
        assert!(!lines.iter().any(|l| l.contains("=> return")), "{lines:#?}");
        // Allows are terminal: no mark is borrowed, one dispatch chain.
        assert!(
            !lines
                .iter()
                .any(|l| l.contains("mark") || l.contains("POLM") || l.contains("FLIP")),
            "{lines:#?}"
        );
    }

    #[test]
    fn one_enforcing_policy_makes_the_direction_drop() {
        let mut audit = policy(
            "a-audit",
            vec![rule("x", Protocol::Tcp, &[1], &["10.0.0.0/8"])],
            None,
        );
        audit.spec.mode = PolicyMode::Audit;
        let enforce = policy(
            "b-enforce",
            vec![rule("y", Protocol::Tcp, &[2], &["10.0.0.0/8"])],
            None,
        );
        let rs = compile_node(
            "web-1",
            &[validate(&audit).unwrap(), validate(&enforce).unwrap()],
            &facts_min_failsafe(),
        )
        .unwrap();
        let end = rs.ipv4.chain(END_IN_CHAIN).unwrap();
        assert_eq!(end.rules.last().unwrap().action, NodeAction::Drop);
        // Only the Audit policy is jumped to from the end chain; the Enforce
        // one is on the allow path, after the failsafe.
        let jumps: Vec<String> = end
            .rules
            .iter()
            .map(|r| r.origin.to_string())
            .filter(|o| o.starts_with("policy/"))
            .collect();
        assert_eq!(jumps, ["policy/a-audit"]);
        let fs = rs.ipv4.chain(FAILSAFE_IN_CHAIN).unwrap();
        assert_eq!(
            fs.rules.last().unwrap().action,
            NodeAction::Goto {
                chain: DISPATCH_IN_CHAIN.into()
            }
        );
        let dispatch = rs.ipv4.chain(DISPATCH_IN_CHAIN).unwrap();
        assert_eq!(
            dispatch.rules[0].action,
            NodeAction::Jump {
                chain: policy_chain_name("b-enforce", Direction::Ingress)
            }
        );
    }

    #[test]
    fn egress_chain_only_when_spoken_for() {
        let mut p = policy(
            "dns",
            vec![],
            Some(vec![rule("dns", Protocol::Udp, &[53], &["10.0.0.2/32"])]),
        );
        p.spec.ingress = None;
        p.spec.policy_types = vec![crate::api::PolicyType::Egress];
        let rs = compile_node("web-1", &[validate(&p).unwrap()], &facts_with_nodes()).unwrap();
        assert_eq!(
            rs.ipv4.hooks,
            [Hook {
                builtin: BuiltinChain::Output,
                target: OUTPUT_CHAIN.into()
            }]
        );
        assert!(
            rs.ipv4.chain(INPUT_CHAIN).is_none(),
            "ingress is not spoken for"
        );
        let lines = render(&rs.ipv4);
        assert!(lines.contains(&"PALISADE-OUTPUT: out=lo => return [loopback]".to_string()));
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("PALISADE-FS-OUT: p=udp dport=67-67")),
            "{lines:#?}"
        );
    }

    #[test]
    fn unselected_node_gets_an_empty_ruleset() {
        let mut p = web_policy();
        p.spec.node_selector = Some(selector(&[("role", "db")]));
        let rs = compile_node("web-1", &[validate(&p).unwrap()], &facts_with_nodes()).unwrap();
        assert!(rs.ipv4.chains.is_empty() && rs.ipv4.hooks.is_empty() && rs.ipv6.chains.is_empty());
        assert!(rs.policies.is_empty());
        assert_eq!(rs.rule_count(), 0);
    }

    #[test]
    fn long_peer_lists_and_references_use_sets() {
        let cidrs = [
            "10.0.1.0/24",
            "10.0.2.0/24",
            "10.0.3.0/24",
            "10.0.4.0/24",
            "10.0.5.0/24",
        ];
        let mut r = rule("many", Protocol::Tcp, &[22], &cidrs);
        r.peers.push(sg_peer("sg-0123456789abcdef0"));
        r.peers.push(node_peer(&[("role", "db")]));
        let few = rule("few", Protocol::Tcp, &[80], &cidrs[..4]);
        let p = policy("p", vec![r, few], None);
        let mut facts = facts_min_failsafe();
        facts.security_groups.insert(
            "sg-0123456789abcdef0".into(),
            vec!["10.9.0.5/32".parse().unwrap()],
        );
        let rs = compile_node("web-1", &[validate(&p).unwrap()], &facts).unwrap();
        let owners: Vec<(String, IpFamily, usize)> = rs
            .sets
            .iter()
            .map(|s| (s.owner.clone(), s.family, s.entries.len()))
            .collect();
        let mut expected = vec![
            ("rule:p/ingress/many".to_string(), IpFamily::V4, 5),
            ("sg:sg-0123456789abcdef0".to_string(), IpFamily::V4, 1),
            ("sg:sg-0123456789abcdef0".to_string(), IpFamily::V6, 0),
            ("nodes:role=db".to_string(), IpFamily::V4, 1),
            ("nodes:role=db".to_string(), IpFamily::V6, 1),
            // The failsafe's cluster scope: both nodes, each family.
            ("failsafe:cluster".to_string(), IpFamily::V4, 2),
            ("failsafe:cluster".to_string(), IpFamily::V6, 2),
        ];
        let mut got = owners.clone();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
        for s in &rs.sets {
            assert!(
                s.name.len() <= MAX_SET_NAME && s.name.starts_with("PAL-"),
                "{}",
                s.name
            );
            assert!(s.name.ends_with(&format!("-{}", s.family.suffix())));
        }
        let chain = rs
            .ipv4
            .chain(&policy_chain_name("p", Direction::Ingress))
            .unwrap();
        let port80: Vec<_> = chain
            .rules
            .iter()
            .filter(|r| r.matches.dports.is_some_and(|d| d.first == 80))
            .collect();
        assert_eq!(port80.len(), 4, "4 CIDRs stay inline");
        let port22: Vec<_> = chain
            .rules
            .iter()
            .filter(|r| r.matches.dports.is_some_and(|d| d.first == 22))
            .collect();
        assert_eq!(port22.len(), 3, "literal set, SG set, node set");
    }

    #[test]
    fn membership_change_is_a_set_content_change_only() {
        let mut r = rule("db", Protocol::Tcp, &[5432], &[]);
        r.peers.push(node_peer(&[("role", "db")]));
        let p = validate(&policy("p", vec![r], None)).unwrap();
        let facts = facts_with_nodes();
        let before = compile_node("web-1", std::slice::from_ref(&p), &facts).unwrap();
        let mut more = facts.clone();
        std::sync::Arc::make_mut(&mut more.nodes).push(node(
            "db-2",
            &[("role", "db")],
            &["10.0.2.11"],
        ));
        let after = compile_node("web-1", &[p], &more).unwrap();
        assert_eq!(before.ipv4, after.ipv4, "chains unchanged");
        assert_ne!(before.sets, after.sets);
        assert_ne!(before.hash(), after.hash());
        assert_ne!(before.policies[0].hash, after.policies[0].hash);
    }

    #[test]
    fn rate_limit_and_log() {
        let mut r = rule("ssh", Protocol::Tcp, &[22], &["0.0.0.0/0"]);
        r.rate_limit = Some(RateLimit {
            count: 6,
            per: RatePeriod::Minute,
            burst: None,
        });
        r.log = Some(true);
        let name = "a-rather-long-policy-name-for-logging";
        let p = validate(&policy(name, vec![r], None)).unwrap();
        let rs = compile_node("web-1", &[p], &facts_min_failsafe()).unwrap();
        let chain = rs
            .ipv4
            .chain(&policy_chain_name(name, Direction::Ingress))
            .unwrap();
        // The LOG and the allow; what falls through returns to the
        // dispatch chain.
        assert_eq!(chain.rules.len(), 2);
        let NodeAction::Log { prefix, .. } = &chain.rules[0].action else {
            panic!("log first")
        };
        assert!(
            prefix.len() <= MAX_LOG_PREFIX
                && prefix.starts_with("pal-in:a-rather-long-~")
                && prefix.ends_with(' '),
            "{prefix:?}"
        );
        let NodeAction::AllowUnderLimit {
            limit,
            allow: AllowTarget::Flip { chain: flip },
        } = &chain.rules[1].action
        else {
            panic!("then allow, handing back to the host")
        };
        assert_eq!(flip, FLIP_IN_CHAIN);
        assert_eq!(
            (limit.count, limit.per, limit.burst, limit.per_address),
            (6, RateUnit::Minute, 5, AddrSide::Source)
        );
        assert!(limit.name.len() <= MAX_HASHLIMIT_NAME && limit.name.starts_with("pl4-"));
        assert_eq!(chain.rules[1].matches.ct_states, [CtState::New]);
        assert_eq!(
            log_prefix("web", Direction::Egress, "dns"),
            "pal-out:web/dns "
        );
    }

    /// The longest path of jumps and gotos from a built-in chain, counted
    /// in links as nf_tables counts them (it refuses more than 16).
    fn longest_path(rs: &FamilyRuleset) -> usize {
        fn depth(rs: &FamilyRuleset, chain: &str, seen: usize) -> usize {
            assert!(seen < 64, "a loop through {chain}");
            rs.chain(chain)
                .unwrap()
                .rules
                .iter()
                .filter_map(|r| match &r.action {
                    NodeAction::Jump { chain } | NodeAction::Goto { chain } => Some(chain),
                    NodeAction::AllowUnderLimit {
                        allow: AllowTarget::Flip { chain },
                        ..
                    } => Some(chain),
                    _ => None,
                })
                .map(|next| 1 + depth(rs, next, seen + 1))
                .max()
                .unwrap_or(0)
        }
        rs.hooks
            .iter()
            .map(|h| 1 + depth(rs, &h.target, 0))
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn the_chain_path_is_short_whatever_the_number_of_policies() {
        for verdict in [AllowVerdict::Return, AllowVerdict::Accept] {
            let mut facts = facts_min_failsafe();
            facts.allow = verdict;
            let mut depths = Vec::new();
            for n in [1, 12, 13, 40] {
                let policies: Vec<ValidPolicy> = (0..n)
                    .map(|i| {
                        let mut p = policy(
                            &format!("p{i:02}"),
                            vec![rule("r", Protocol::Tcp, &[9000 + i], &["10.0.0.0/8"])],
                            Some(vec![rule("o", Protocol::Tcp, &[443], &["10.0.0.0/8"])]),
                        );
                        if i % 5 == 4 {
                            p.spec.mode = PolicyMode::Audit;
                        }
                        p.spec.policy_types = vec![
                            crate::api::PolicyType::Ingress,
                            crate::api::PolicyType::Egress,
                        ];
                        validate(&p).unwrap()
                    })
                    .collect();
                let rs = compile_node("web-1", &policies, &facts).unwrap();
                depths.push(longest_path(&rs.ipv4));
            }
            // built-in -> top -> failsafe -> dispatch -> policy -> flip
            // (or -> end -> audit policy).
            assert!(depths.iter().all(|d| *d <= 6), "{verdict:?}: {depths:?}");
            assert_eq!(depths[1], depths[3], "{verdict:?}: {depths:?}");
        }
    }

    #[test]
    fn names_and_comments_fit_iptables() {
        let name = "x".repeat(63);
        assert!(policy_chain_name(&name, Direction::Egress).len() <= MAX_CHAIN_NAME);
        for n in [
            INPUT_CHAIN,
            OUTPUT_CHAIN,
            FAILSAFE_IN_CHAIN,
            FAILSAFE_OUT_CHAIN,
        ] {
            assert!(n.len() <= MAX_CHAIN_NAME && is_palisade_chain(n));
        }
        let rs = compile_node(
            "web-1",
            &[validate(&web_policy()).unwrap()],
            &facts_with_nodes(),
        )
        .unwrap();
        for c in &rs.ipv4.chains {
            for r in &c.rules {
                assert_eq!(rule_id_from_comment(&r.comment()), Some(r.id.as_str()));
                assert!(!r.comment().contains('"'));
            }
        }
        assert_eq!(rule_id_from_comment("KUBE-SERVICES"), None);
        assert_eq!(
            rule_id_from_comment(&rs.ipv4.hooks[0].comment()),
            Some(rs.ipv4.hooks[0].id().as_str())
        );
    }

    #[test]
    fn set_entries_are_canonical() {
        let nets: Vec<IpNet> = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "192.0.2.7/32",
            "192.0.2.7/32",
            "::/0",
            "2001:db8::/32",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let norm = normalize_set_entries(nets);
        let text: Vec<String> = norm.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["10.0.0.0/8", "192.0.2.7/32", "::/1", "8000::/1"]);
        assert_eq!(normalize_set_entries(norm.clone()), norm);
    }

    #[test]
    fn cloud_only_rules_stay_off_the_node() {
        let mut r = rule("x", Protocol::Tcp, &[22], &["0.0.0.0/0"]);
        r.layers = Some(vec![Layer::Cloud]);
        let rs = compile_node(
            "web-1",
            &[validate(&policy("p", vec![r], None)).unwrap()],
            &facts_with_nodes(),
        )
        .unwrap();
        // An empty chain: no rule of its own (what falls through returns
        // to the dispatch chain, and on to the default-drop).
        let chain = rs
            .ipv4
            .chain(&policy_chain_name("p", Direction::Ingress))
            .unwrap();
        assert!(chain.rules.is_empty(), "{:?}", chain.rules);
    }

    #[test]
    fn node_lint() {
        let mut limited = rule("limited", Protocol::Tcp, &[22], &["10.0.0.0/24"]);
        limited.rate_limit = Some(RateLimit {
            count: 1,
            ..Default::default()
        });
        let mut r = rule("refs", Protocol::Tcp, &[22], &[]);
        r.peers.push(sg_peer("sg-01234567"));
        r.peers.push(node_peer(&[("role", "nothing")]));
        let wide = rule("wide", Protocol::All, &[], &["10.0.0.0/8"]);
        let p = validate(&policy("p", vec![limited, r, wide], None)).unwrap();
        let text: Vec<String> = lint_node_layer(&p, &facts_with_nodes())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            [
                "policy p: rule ingress/limited is shadowed on the Node layer: ingress/wide already allow all of its traffic",
                "policy p: rule ingress/refs references sg-01234567, which is not resolved to addresses: the node layer matches nobody for it",
                "policy p: rule ingress/refs peer nodeSelector role=nothing matches no node with an address",
            ]
        );
    }

    #[test]
    fn unknown_node_and_duplicate_policies() {
        let p = validate(&web_policy()).unwrap();
        assert_eq!(
            compile_node("nope", &[], &facts_with_nodes()),
            Err(PolicyError::UnknownNode {
                node: "nope".into()
            })
        );
        assert_eq!(
            compile_node("web-1", &[p.clone(), p], &facts_with_nodes()),
            Err(PolicyError::DuplicatePolicy {
                policy: "web".into()
            })
        );
    }
}
