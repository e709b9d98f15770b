//! The node layer's dataplane: detecting the iptables backend, rendering a
//! `NodeRuleset` to iptables-restore / ipset input, applying it, reading it
//! back and finding drift.
//!
//! - [`backend`]: nft or legacy, detected as kube-proxy and Calico do.
//! - [`render`]: pure; a ruleset or a diff → the exact restore input.
//! - [`dataplane`]: the effects; read back what Palisade owns (ids from
//!   comments), plan (pure), apply in the documented order.

pub mod backend;
pub mod conntrack;
pub mod dataplane;
pub mod model;
pub mod monitor;
pub mod readback;
pub mod render;
