//! Test environment.
pub mod fault_proxy;
