//! The node layer's dataplane: detecting the iptables backend, rendering a
//! `NodeRuleset` to iptables-restore / ipset input, applying it, reading it
//! back and finding drift.

pub mod backend;
pub mod dataplane;
pub mod render;
