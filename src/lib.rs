//! Palisade: one `FirewallPolicy`, enforced on both layers that protect an
//! EC2 node — the AWS Security Group and the node's own iptables.
//!
//! Layout (see README.md):
//! - [`api`]: the CRD types and their admission (CEL) rules. No I/O.
//! - [`policy`]: pure compilation of policies into a `CloudPlan` and a
//!   `NodeRuleset`, and pure diffs of current vs desired.
//! - [`cli`]: the offline commands of the `palisade` binary.
//! - [`node`]: the node dataplane (iptables backend, rendering, applying).
//! - [`agent`]: the node agent's sync loop, status and metrics.
//! - [`cloud`]: EC2 behind a small trait, with our retry and error classes.
//! - [`controller`]: the reconcile loop of policies into Security Groups.
//! - [`removal`]: whether the process's own DaemonSet/Deployment is being
//!   deleted (uninstall or a GitOps prune) rather than restarted.
//! - [`telemetry`]: process start-up and the `/metrics` `/healthz` `/readyz` server.

pub mod agent;
pub mod api;
pub mod cli;
pub mod cloud;
pub mod controller;
pub mod node;
pub mod policy;
pub mod removal;
pub mod telemetry;
#[cfg(feature = "testenv")]
pub mod testenv;
