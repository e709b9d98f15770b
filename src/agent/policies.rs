//! The policies an agent keeps: in full those that can select its node, a
//! stub of the rest.
//!
//! With 1,000 policies most select other nodes. The agent still watches
//! every policy (a policy edited to select its node must reach it), but
//! stores a valid policy whose `nodeSelector` does not match the node's
//! labels as a stub: its name, uid, generation and `nodeSelector`, no
//! rules, no status ([`trim_for`]). A stub is never compiled.
//!
//! Contract:
//! - **Which labels:** the node's, as its own Node watch last delivered
//!   them. No policy watch runs before they are known (the initial list is
//!   stored trimmed).
//! - **Labels change:** a stub may now select the node, and its rules are
//!   not in the store. The policy watch restarts (one LIST of policies,
//!   stored for the new labels); until that list is in, a sync that meets
//!   a stub selecting the node programs nothing (see `desired`), and the
//!   list's end wakes it. A node's labels rarely change: no LIST in steady
//!   state.
//! - **Wake-ups:** each event goes through [`super::spec_event`] with the
//!   labels of the moment: only a change a policy selecting the node
//!   before or after it makes wakes the sync.

use std::collections::BTreeMap;

use futures::StreamExt;
use kube::runtime::reflector::store::Writer;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{FirewallPolicy, FirewallPolicySpec};
use crate::policy::{Selector, validate};

use super::{AgentError, SeenPolicy, spec_event, trim_policy};

/// A node's labels.
pub type Labels = BTreeMap<String, String>;

/// The annotation marking a stub in the agent's store (never written to
/// the API: a stored policy has no other annotation).
pub const STUB: &str = "palisade.dev/agent-stub";

/// Whether the stored policy is a stub.
pub fn is_stub(p: &FirewallPolicy) -> bool {
    p.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(STUB))
}

/// What the store keeps of `p` on a node with `labels` (see the module
/// docs): [`trim_policy`], and for a valid policy whose `nodeSelector` does
/// not select the node, a stub. An invalid policy is kept whole (the sync
/// keeps the last valid version of a policy that applied here).
pub fn trim_for(p: &mut FirewallPolicy, labels: &Labels) {
    trim_policy(p);
    let elsewhere = p.spec.node_selector.as_ref().is_some_and(|sel| {
        Selector::parse(sel, "spec.nodeSelector").is_ok_and(|s| !s.matches(labels))
    });
    if !elsewhere || p.metadata.deletion_timestamp.is_some() || validate(p).is_err() {
        return;
    }
    p.spec = FirewallPolicySpec {
        node_selector: p.spec.node_selector.take(),
        ..Default::default()
    };
    p.status = None;
    p.metadata.annotations = Some([(STUB.to_string(), String::new())].into());
}

/// Runs the policy watch for the node's labels (`labels`: sent by the Node
/// watch), storing into `writer` and waking `trigger` for what changes the
/// node's rules; restarted with a fresh list when the labels change.
pub async fn follow(
    client: Client,
    mut writer: Writer<FirewallPolicy>,
    mut labels: watch::Receiver<Option<Labels>>,
    trigger: super::wake::Wake,
) -> AgentError {
    let api: Api<FirewallPolicy> = Api::all(client);
    let mut seen: BTreeMap<String, SeenPolicy> = BTreeMap::new();
    loop {
        let current = labels.borrow_and_update().clone();
        let Some(current) = current else {
            if labels.changed().await.is_err() {
                return AgentError::WatchEnded("node labels");
            }
            continue;
        };
        info!(labels = current.len(), "watching FirewallPolicies");
        let for_labels = current.clone();
        let events = watcher(api.clone(), watcher::Config::default())
            .modify(move |p| trim_for(p, &for_labels))
            .default_backoff();
        let mut events = std::pin::pin!(events);
        loop {
            tokio::select! {
                changed = labels.changed() => {
                    if changed.is_err() {
                        return AgentError::WatchEnded("node labels");
                    }
                    if labels.borrow().as_ref().is_some_and(|l| *l != current) {
                        // Re-list: stubs may select the node now.
                        break;
                    }
                }
                event = events.next() => match event {
                    Some(Ok(event)) => {
                        writer.apply_watcher_event(&event);
                        if spec_event(&mut seen, Some(&current), &event) {
                            trigger.wake(super::wake::Source::Policy);
                        }
                    }
                    Some(Err(e)) => warn!(error = %e, "FirewallPolicies watch error; retrying"),
                    None => return AgentError::WatchEnded("FirewallPolicies"),
                },
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn policy(role: &str, cidr: &str) -> FirewallPolicy {
        serde_yaml::from_str(&format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {{name: p, uid: u1, generation: 4}}\nspec:\n  policyTypes: [Ingress]\n  nodeSelector: {{matchLabels: {{role: {role}}}}}\n  ingress:\n    - {{name: r, protocol: TCP, ports: [{{port: 80}}], peers: [{{cidr: {cidr}}}]}}\nstatus:\n  resolvedPeers: [{{id: sg-1, cidrs: [10.0.0.1/32]}}]\n"
        ))
        .unwrap()
    }

    #[test]
    fn policies_of_other_nodes_are_kept_as_stubs_and_the_rest_whole() {
        let web: Labels = [("role".to_string(), "web".to_string())].into();
        let mut mine = policy("web", "10.0.0.0/8");
        trim_for(&mut mine, &web);
        assert!(!is_stub(&mine));
        assert!(mine.spec.ingress.is_some() && mine.status.is_some());

        let mut other = policy("db", "10.0.0.0/8");
        trim_for(&mut other, &web);
        assert!(is_stub(&other));
        assert!(other.spec.ingress.is_none() && other.status.is_none());
        assert_eq!(
            other.spec.node_selector,
            policy("db", "x").spec.node_selector
        );
        assert_eq!(
            (other.metadata.uid.as_deref(), other.metadata.generation),
            (Some("u1"), Some(4))
        );

        // Invalid: kept whole, so an earlier valid version can be kept.
        let mut broken = policy("db", "10.0.0.1/8");
        trim_for(&mut broken, &web);
        assert!(!is_stub(&broken) && broken.spec.ingress.is_some());
    }
}
