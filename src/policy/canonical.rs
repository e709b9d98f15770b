//! Canonical form of a policy spec: the same policy written the same way,
//! for `palisade fmt`-style output and for comparing two specs by meaning.

use crate::api::NodeSelector;

use crate::api::{FirewallPolicySpec, FirewallRule, Layer, Peer, PortRange};

/// The canonical form of `spec`: rules sorted by name, ports and peers
/// sorted and de-duplicated, a single port written without `endPort`, the
/// default `layers` (both) and `log: false` omitted, selectors with sorted
/// expressions and values, empty selectors omitted.
///
/// Contract: idempotent (`canonicalize_spec(&canonicalize_spec(s)) ==
/// canonicalize_spec(s)`), and a valid spec compiles to the same plan and
/// ruleset as its canonical form. Values are not repaired (a non-canonical
/// CIDR stays as written, for validation to report).
pub fn canonicalize_spec(spec: &FirewallPolicySpec) -> FirewallPolicySpec {
    let mut out = spec.clone();
    out.node_selector = canonical_selector(spec.node_selector.as_ref());
    out.policy_types.sort();
    out.policy_types.dedup();
    for rules in [&mut out.ingress, &mut out.egress].into_iter().flatten() {
        for rule in rules.iter_mut() {
            canonical_rule(rule);
        }
        rules.sort_by(|a, b| a.name.cmp(&b.name));
    }
    out
}

fn canonical_rule(rule: &mut FirewallRule) {
    if let Some(ports) = &mut rule.ports {
        for p in ports.iter_mut() {
            if p.end_port == Some(p.port) {
                p.end_port = None;
            }
        }
        ports.sort_by_key(|p: &PortRange| (p.port, p.end_port));
        ports.dedup();
    }
    for peer in &mut rule.peers {
        if peer.node_selector.is_some() {
            // An empty selector is meaningful for a peer (every node): keep it.
            peer.node_selector =
                Some(canonical_selector(peer.node_selector.as_ref()).unwrap_or_default());
        }
    }
    rule.peers.sort_by_key(peer_key);
    rule.peers.dedup();
    if let Some(layers) = &mut rule.layers {
        layers.sort();
        layers.dedup();
        if layers.as_slice() == [Layer::Cloud, Layer::Node] {
            rule.layers = None;
        }
    }
    if rule.log == Some(false) {
        rule.log = None;
    }
}

fn peer_key(p: &Peer) -> String {
    serde_json::to_string(p).unwrap_or_default()
}

fn canonical_selector(sel: Option<&NodeSelector>) -> Option<NodeSelector> {
    let sel = sel?;
    let match_labels = sel.match_labels.clone().filter(|m| !m.is_empty());
    let match_expressions = sel
        .match_expressions
        .clone()
        .map(|mut exprs| {
            for e in exprs.iter_mut() {
                if let Some(v) = &mut e.values {
                    v.sort();
                    v.dedup();
                }
                if e.values.as_ref().is_some_and(Vec::is_empty) {
                    e.values = None;
                }
            }
            exprs.sort_by(|a, b| {
                (&a.key, &a.operator, &a.values).cmp(&(&b.key, &b.operator, &b.values))
            });
            exprs.dedup();
            exprs
        })
        .filter(|e| !e.is_empty());
    (match_labels.is_some() || match_expressions.is_some()).then_some(NodeSelector {
        match_labels,
        match_expressions,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::api::Protocol;
    use crate::policy::testing::*;

    #[test]
    fn canonical_form_sorts_and_drops_defaults() {
        let mut a = rule("b", Protocol::Tcp, &[443, 80, 80], &["::/0", "0.0.0.0/0"]);
        a.layers = Some(vec![Layer::Node, Layer::Cloud]);
        a.log = Some(false);
        let b = rule("a", Protocol::Udp, &[53], &["10.0.0.2/32"]);
        let p = policy("p", vec![a, b], None);
        let c = canonicalize_spec(&p.spec);
        let ingress = c.ingress.as_ref().unwrap();
        assert_eq!(ingress[0].name, "a");
        assert_eq!(
            ingress[1]
                .ports
                .as_ref()
                .unwrap()
                .iter()
                .map(|p| p.port)
                .collect::<Vec<_>>(),
            [80, 443]
        );
        assert_eq!(ingress[1].peers[0].cidr.as_deref(), Some("0.0.0.0/0"));
        assert_eq!((ingress[1].layers.clone(), ingress[1].log), (None, None));
        assert_eq!(canonicalize_spec(&c), c);
    }
}
