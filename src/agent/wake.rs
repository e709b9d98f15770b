//! What wakes the agent's sync loop: one [`Notify`] shared by every
//! watch, each wake-up counted by its source
//! (`palisade_agent_wakeups_total{source}`), so an operator can see why a
//! node syncs and a test can count exactly which events woke it.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::Notify;

/// Where a wake-up came from.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Source {
    /// A FirewallPolicy event that changes what the node enforces.
    Policy,
    /// The node's own Node object (labels, addresses).
    Node,
    /// A FirewallPeerSlice in the node's scope, or the end of their list.
    PeerSlice,
    /// The API server's endpoints (the failsafe keeps it reachable).
    Endpoints,
    /// `nft monitor`: another process changed the node's tables.
    NftMonitor,
}

impl Source {
    /// The `source` label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Policy => "policy",
            Source::Node => "node",
            Source::PeerSlice => "peer_slice",
            Source::Endpoints => "endpoints",
            Source::NftMonitor => "nft_monitor",
        }
    }
}

impl EncodeLabelValue for Source {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

/// Labels of `palisade_agent_wakeups_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WakeLabels {
    /// The [`Source`].
    pub source: Source,
}

/// The sync loop's trigger; cheap to clone.
#[derive(Clone, Debug)]
pub struct Wake {
    notify: Arc<Notify>,
    counts: Family<WakeLabels, Counter>,
}

impl Wake {
    /// A trigger counting into `counts`.
    pub fn new(counts: Family<WakeLabels, Counter>) -> Self {
        Wake {
            notify: Arc::new(Notify::new()),
            counts,
        }
    }

    /// Wakes the sync loop (one pending wake-up is kept while it runs).
    pub fn wake(&self, source: Source) {
        self.counts.get_or_create(&WakeLabels { source }).inc();
        self.notify.notify_one();
    }

    /// Resolves at the next wake-up.
    pub async fn woken(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wake_up_is_counted_by_source_and_kept_until_awaited() {
        let counts = Family::<WakeLabels, Counter>::default();
        let wake = Wake::new(counts.clone());
        wake.wake(Source::Policy);
        wake.wake(Source::Policy);
        wake.wake(Source::NftMonitor);
        let count = |source| counts.get_or_create(&WakeLabels { source }).get();
        assert_eq!(count(Source::Policy), 2);
        assert_eq!(count(Source::NftMonitor), 1);
        assert_eq!(count(Source::Node), 0);
        // Woken before anyone waited: the wake-up is not lost.
        tokio::time::timeout(std::time::Duration::from_secs(1), wake.woken())
            .await
            .expect("a pending wake-up resolves at once");
    }
}
