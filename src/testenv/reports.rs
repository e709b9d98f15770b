//! What the agents report, read from their `FirewallNode`s: shared by the
//! tests that wait for an agent to have applied a set of policies.

use std::time::{Duration, Instant};

use kube::Api;

use crate::api::FirewallNode;

/// The (name, generation) of every policy the node's agent reports, once
/// its last sync succeeded.
pub async fn reported(client: &kube::Client, node: &str) -> Option<Vec<(String, i64)>> {
    let fwn = Api::<FirewallNode>::all(client.clone())
        .get_opt(node)
        .await
        .ok()??;
    let status = fwn.status?;
    (status.last_sync?.result == "Success").then(|| {
        status
            .policies
            .iter()
            .map(|p| (p.name.clone(), p.generation))
            .collect()
    })
}

/// Waits (up to 30 s, then panics) until the node's agent reports exactly
/// `want`.
pub async fn wait_reported(client: &kube::Client, node: &str, want: &[(&str, i64)]) {
    let want: Vec<(String, i64)> = want.iter().map(|(n, g)| (n.to_string(), *g)).collect();
    let start = Instant::now();
    loop {
        let got = reported(client, node).await;
        if got.as_ref() == Some(&want) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{node} reports {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
