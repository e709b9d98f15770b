//! The FirewallPeerSlices an agent watches: only those its ruleset reads.
//!
//! A slice lists the addresses of the nodes one `nodeSelector` stands for
//! ([`crate::api::FirewallPeerSlice`]). An agent needs the slices of the
//! selectors named by the node-layer `nodeSelector` peers of the policies
//! selecting its node, plus `<all>` when its failsafe admits the cluster —
//! its *scope*. It watches those alone, by the slices'
//! [`SELECTOR_HASH_LABEL`] (`palisade.dev/selector-hash in (…)`), so a
//! write of any other slice reaches it not at all: no watch event, no
//! sync, no bytes.
//!
//! Contract:
//! - **Who sets the scope:** the sync, from the policies it compiles
//!   ([`Scope::want`]). A scope that changed restarts the watch with the
//!   new label selector: one LIST of the scope's slices (only those), then
//!   a watch. That happens when a policy starts or stops selecting the
//!   node, or one selecting it adds or drops a selector; never in steady
//!   state.
//! - **No half view:** until the watch of the scope the sync wants has
//!   delivered its list ([`Scope::listed`]), the sync programs nothing
//!   (a missing slice would make a selector stand for the node alone), and
//!   the list's end wakes it. So a policy that starts selecting the node
//!   gets its peers' addresses with its first programmed rules.
//! - **Bounded selector:** past [`MAX_SCOPED`] selectors the label
//!   selector would grow long; the agent then watches every slice and
//!   wakes only for those in scope.

use std::collections::BTreeSet;

use futures::StreamExt;
use kube::runtime::reflector::store::Writer;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{FirewallPeerSlice, SELECTOR_HASH_LABEL, selector_hash};
use crate::policy::{Failsafe, FailsafeScope, Selector};

use super::AgentError;

/// Most selectors watched by label; past this, every slice is watched.
pub const MAX_SCOPED: usize = 100;

/// The selectors (canonical text) whose slices the agent needs.
pub type Selectors = BTreeSet<String>;

/// The sync's side of the scope: what it wants and what is listed.
pub struct Scope {
    want: watch::Sender<Option<Selectors>>,
    listed: watch::Receiver<Option<Selectors>>,
    cluster: bool,
}

/// The watch task's side of the scope.
pub struct ScopeFollower {
    want: watch::Receiver<Option<Selectors>>,
    listed: watch::Sender<Option<Selectors>>,
}

/// A scope (nothing wanted yet) and the watch task's end of it.
pub fn scope(failsafe: &Failsafe) -> (Scope, ScopeFollower) {
    let (want_tx, want_rx) = watch::channel(None);
    let (listed_tx, listed_rx) = watch::channel(None);
    (
        Scope {
            want: want_tx,
            listed: listed_rx,
            cluster: uses_cluster(failsafe),
        },
        ScopeFollower {
            want: want_rx,
            listed: listed_tx,
        },
    )
}

/// Whether the failsafe admits the `Cluster` scope (every node: the
/// `<all>` slices).
pub fn uses_cluster(failsafe: &Failsafe) -> bool {
    failsafe
        .inbound
        .iter()
        .chain(&failsafe.outbound)
        .any(|p| p.scopes().contains(&FailsafeScope::Cluster))
}

impl Scope {
    /// The scope listed so far (read it *before* reading the store: the
    /// store then holds at least that list).
    pub fn listed(&self) -> Option<Selectors> {
        self.listed.borrow().clone()
    }

    /// Asks for the slices of `peer_selectors` (and `<all>` when the
    /// failsafe needs it); returns the full scope wanted.
    pub fn want(&self, peer_selectors: &Selectors) -> Selectors {
        let mut scope = peer_selectors.clone();
        if self.cluster {
            scope.insert(Selector::everything().to_string());
        }
        self.want.send_if_modified(|w| {
            if w.as_ref() == Some(&scope) {
                false
            } else {
                *w = Some(scope.clone());
                true
            }
        });
        scope
    }
}

/// The label selector of a scope (pure): `None` when every slice is to be
/// watched (more than [`MAX_SCOPED`] selectors).
pub fn label_selector(scope: &Selectors) -> Option<String> {
    if scope.len() > MAX_SCOPED {
        return None;
    }
    let hashes: Vec<String> = scope.iter().map(|s| selector_hash(s)).collect();
    Some(format!("{SELECTOR_HASH_LABEL} in ({})", hashes.join(",")))
}

/// Whether a slice watch event concerns `scope` (pure): its selector is in
/// it, or it is a list's start or end.
pub fn in_scope(scope: &Selectors, event: &watcher::Event<FirewallPeerSlice>) -> bool {
    match event {
        watcher::Event::Apply(s) | watcher::Event::Delete(s) => scope.contains(&s.spec.selector),
        watcher::Event::InitApply(_) | watcher::Event::Init => false,
        watcher::Event::InitDone => true,
    }
}

/// What the agent keeps of a slice: its selector and addresses (the node
/// names, labels and bookkeeping are read by nothing on a node).
pub fn trim_slice(s: &mut FirewallPeerSlice) {
    crate::api::trim_bookkeeping(&mut s.metadata);
    s.metadata.labels = None;
    for n in &mut s.spec.nodes {
        n.name = String::new();
    }
}

/// Follows the scope the sync wants: (re)starts the slice watch with its
/// label selector, applies its events to `writer`, marks the scope listed
/// once its list is in, and wakes the sync for each event in scope.
/// Returns only when the agent is shutting down or the watch ended.
pub async fn follow(
    client: Client,
    mut writer: Writer<FirewallPeerSlice>,
    mut follower: ScopeFollower,
    trigger: super::wake::Wake,
) -> AgentError {
    let api: Api<FirewallPeerSlice> = Api::all(client);
    loop {
        let wanted = follower.want.borrow_and_update().clone();
        let scope = match wanted {
            Some(scope) => scope,
            None => {
                if follower.want.changed().await.is_err() {
                    return AgentError::WatchEnded("FirewallPeerSlice scope");
                }
                continue;
            }
        };
        follower.listed.send_replace(None);
        if scope.is_empty() {
            // Nothing to watch: an empty store is the complete list.
            writer.apply_watcher_event(&watcher::Event::Init);
            writer.apply_watcher_event(&watcher::Event::InitDone);
            follower.listed.send_replace(Some(scope));
            trigger.wake(super::wake::Source::PeerSlice);
            if follower.want.changed().await.is_err() {
                return AgentError::WatchEnded("FirewallPeerSlice scope");
            }
            continue;
        }
        let config = match label_selector(&scope) {
            Some(labels) => watcher::Config::default().labels(&labels),
            None => watcher::Config::default(),
        };
        info!(
            selectors = scope.len(),
            by_label = config.label_selector.is_some(),
            "watching the FirewallPeerSlices of the node's selectors"
        );
        let events = watcher(api.clone(), config)
            .modify(trim_slice)
            .default_backoff();
        let mut events = std::pin::pin!(events);
        loop {
            tokio::select! {
                changed = follower.want.changed() => {
                    if changed.is_err() {
                        return AgentError::WatchEnded("FirewallPeerSlice scope");
                    }
                    // Restart with the new scope (the store keeps the old
                    // list until the new one is in).
                    break;
                }
                event = events.next() => match event {
                    Some(Ok(event)) => {
                        writer.apply_watcher_event(&event);
                        if matches!(event, watcher::Event::InitDone) {
                            follower.listed.send_replace(Some(scope.clone()));
                        }
                        if in_scope(&scope, &event) {
                            trigger.wake(super::wake::Source::PeerSlice);
                        }
                    }
                    Some(Err(e)) => warn!(error = %e, "FirewallPeerSlices watch error; retrying"),
                    None => return AgentError::WatchEnded("FirewallPeerSlices"),
                },
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::api::{FirewallPeerSliceSpec, PeerNode};
    use std::sync::Arc;

    fn slice(selector: &str) -> FirewallPeerSlice {
        FirewallPeerSlice::new(
            "s",
            FirewallPeerSliceSpec {
                selector: selector.into(),
                nodes: vec![PeerNode {
                    name: "n1".into(),
                    addresses: vec!["10.0.0.1".into()],
                }],
            },
        )
    }

    #[test]
    fn the_scope_is_the_selectors_of_the_node_plus_all_when_the_failsafe_needs_it() {
        let (scope, follower) = scope(&Failsafe::default());
        assert!(uses_cluster(&Failsafe::default()), "the default admits it");
        assert_eq!(*follower.want.borrow(), None, "nothing before a sync");
        let mine: Selectors = ["role=db".to_string()].into();
        let want = scope.want(&mine);
        assert_eq!(
            want,
            ["<all>".to_string(), "role=db".to_string()].into(),
            "the selectors of the node, and every node for the failsafe"
        );
        assert_eq!(follower.want.borrow().as_ref(), Some(&want));
        assert_eq!(scope.listed(), None, "not listed until the watch says so");
        let no_cluster = Failsafe {
            inbound: Vec::new(),
            outbound: Vec::new(),
            ..Failsafe::default()
        };
        assert!(!uses_cluster(&no_cluster));
    }

    #[test]
    fn the_label_selector_names_each_selector_hash_and_gives_up_past_the_bound() {
        let scope: Selectors = ["<all>".to_string(), "role=db".to_string()].into();
        let labels = label_selector(&scope).unwrap();
        assert_eq!(
            labels,
            format!(
                "palisade.dev/selector-hash in ({},{})",
                selector_hash("<all>"),
                selector_hash("role=db")
            )
        );
        let big: Selectors = (0..=MAX_SCOPED).map(|i| format!("pool={i}")).collect();
        assert_eq!(label_selector(&big), None, "watch everything instead");
    }

    #[test]
    fn only_slices_in_scope_wake_the_sync_and_a_slice_keeps_only_addresses() {
        let scope: Selectors = ["role=db".to_string()].into();
        assert!(in_scope(&scope, &watcher::Event::Apply(slice("role=db"))));
        assert!(in_scope(&scope, &watcher::Event::Delete(slice("role=db"))));
        assert!(!in_scope(&scope, &watcher::Event::Apply(slice("role=web"))));
        assert!(!in_scope(
            &scope,
            &watcher::Event::Delete(slice("role=web"))
        ));
        assert!(in_scope(&scope, &watcher::Event::InitDone));
        let mut s = slice("role=db");
        s.metadata.labels = Some([(SELECTOR_HASH_LABEL.to_string(), "x".to_string())].into());
        let peers = super::super::node_peers(&[Arc::new(s.clone())]);
        trim_slice(&mut s);
        assert!(s.metadata.labels.is_none() && s.spec.nodes[0].name.is_empty());
        assert_eq!(super::super::node_peers(&[Arc::new(s)]), peers);
    }
}
