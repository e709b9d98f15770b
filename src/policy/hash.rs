//! The one hash scheme of the node layer: SHA-256, hex, truncated to 16
//! digits (64 bits). Inputs are length-prefixed so `["ab", "c"]` and
//! `["a", "bc"]` differ.

use sha2::{Digest, Sha256};

/// 16 hex digits of SHA-256 over the length-prefixed `parts`.
pub(crate) fn short_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    let mut hex = hex::encode(h.finalize());
    hex.truncate(16);
    hex
}

/// 16 hex digits over lines of canonical text (order matters).
pub(crate) fn digest(lines: &[String]) -> String {
    let parts: Vec<&str> = lines.iter().map(String::as_str).collect();
    short_hash(&parts)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn short_hash_is_stable_and_unambiguous() {
        assert_eq!(short_hash(&["ab", "c"]).len(), 16);
        assert_ne!(short_hash(&["ab", "c"]), short_hash(&["a", "bc"]));
        // Pinned (and reproducible outside Rust: SHA-256 over u64 big-endian
        // length + bytes of each part): a change here renames every chain
        // and rewrites every rule on every node.
        assert_eq!(short_hash(&["chain", "web"]), "d143f861ec32144e");
        assert_eq!(
            crate::policy::node::policy_chain_name("web", crate::policy::Direction::Ingress),
            "PAL-I-d143f861ec"
        );
    }
}
