//! Cutting established flows a narrowed ruleset no longer allows
//! (`existingConnections: Cut`).
//!
//! Pure: [`parse_flows`] reads `conntrack -L -o extended` output,
//! [`flows_to_cut`] decides with the same reference walk the CLI and the
//! tests use ([`node_verdict`]) and [`delete_args`] gives the `conntrack -D`
//! arguments that delete exactly one flow. The agent runs them only after
//! the narrower ruleset is programmed, so a flow cut cannot come back in
//! through the old rules.

use std::net::IpAddr;

use crate::policy::eval::{NodeVerdict, Probe, ProbeProtocol, node_verdict};
use crate::policy::{Direction, NodeRuleset};

/// One conntrack entry, as its original direction saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// `tcp`, `udp`, `icmp` or `icmpv6`.
    pub protocol: String,
    /// Original source.
    pub src: IpAddr,
    /// Original destination.
    pub dst: IpAddr,
    /// Original source port (TCP/UDP).
    pub sport: Option<u16>,
    /// Original destination port (TCP/UDP).
    pub dport: Option<u16>,
    /// ICMP type and code.
    pub icmp: Option<(u8, u8)>,
    /// ICMP id.
    pub icmp_id: Option<u16>,
}

fn field<'a>(words: &[&'a str], key: &str) -> Option<&'a str> {
    words
        .iter()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Reads `conntrack -L -o extended` lines (`ipv4 2 tcp 6 431999 ESTABLISHED
/// src=… dst=… sport=… dport=… src=… …`). Only the first (original)
/// tuple is read; lines of other protocols or that do not parse are skipped.
pub fn parse_flows(text: &str) -> Vec<Flow> {
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let protocol = ["tcp", "udp", "icmp", "icmpv6"]
                .into_iter()
                .find(|p| words.get(2) == Some(p) || words.first() == Some(p))?;
            // The first src=/dst= pair is the original direction.
            let src = field(&words, "src")?.parse().ok()?;
            let dst = field(&words, "dst")?.parse().ok()?;
            let port = |k| field(&words, k).and_then(|v| v.parse().ok());
            let icmp = match (port("type"), port("code")) {
                (Some(t), Some(c)) => u8::try_from(t).ok().zip(u8::try_from(c).ok()),
                _ => None,
            };
            Some(Flow {
                protocol: protocol.to_string(),
                src,
                dst,
                sport: port("sport"),
                dport: port("dport"),
                icmp,
                icmp_id: port("id"),
            })
        })
        .collect()
}

/// The probe a flow's first packet was, seen from the node: ingress when it
/// was addressed to one of `local`, egress when it came from one of them.
pub fn probe_of(flow: &Flow, local: &[IpAddr]) -> Option<Probe> {
    let (direction, peer) = if local.contains(&flow.dst) {
        (Direction::Ingress, flow.src)
    } else if local.contains(&flow.src) {
        (Direction::Egress, flow.dst)
    } else {
        return None;
    };
    if peer.is_loopback() || local.contains(&peer) {
        return None;
    }
    let protocol = match flow.protocol.as_str() {
        "tcp" => ProbeProtocol::Tcp { port: flow.dport? },
        "udp" => ProbeProtocol::Udp { port: flow.dport? },
        "icmp" => {
            let (icmp_type, code) = flow.icmp?;
            ProbeProtocol::Icmp { icmp_type, code }
        }
        "icmpv6" => {
            let (icmp_type, code) = flow.icmp?;
            ProbeProtocol::Icmpv6 { icmp_type, code }
        }
        _ => return None,
    };
    Some(Probe {
        direction,
        peer,
        protocol,
        over_rate: false,
    })
}

/// The flows `ruleset` would drop as new connections, in the `directions`
/// where a policy asks for established flows to be cut.
pub fn flows_to_cut(
    flows: &[Flow],
    ruleset: &NodeRuleset,
    local: &[IpAddr],
    directions: &[Direction],
) -> Vec<Flow> {
    flows
        .iter()
        .filter(|f| {
            probe_of(f, local).is_some_and(|p| {
                directions.contains(&p.direction) && node_verdict(ruleset, &p) == NodeVerdict::Drop
            })
        })
        .cloned()
        .collect()
}

/// Lists the node's flows (both families), and deletes those `ruleset`
/// (already programmed) would drop as new connections in `directions`;
/// returns how many were cut.
pub fn cut_flows(
    dataplane: &super::dataplane::Dataplane,
    ruleset: &NodeRuleset,
    local: &[IpAddr],
    directions: &[Direction],
) -> Result<usize, super::dataplane::DataplaneError> {
    let mut flows = Vec::new();
    for family in ["ipv4", "ipv6"] {
        let text = dataplane.conntrack(&["-L", "-f", family, "-o", "extended"])?;
        flows.extend(parse_flows(&text));
    }
    let doomed = flows_to_cut(&flows, ruleset, local, directions);
    for flow in &doomed {
        let args = delete_args(flow);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        dataplane.conntrack(&args)?;
    }
    Ok(doomed.len())
}

/// `conntrack -D` arguments deleting exactly `flow` (its original tuple).
pub fn delete_args(flow: &Flow) -> Vec<String> {
    let family = if flow.src.is_ipv4() { "ipv4" } else { "ipv6" };
    let mut a = vec![
        "-D".to_string(),
        "-f".into(),
        family.into(),
        "-p".into(),
        flow.protocol.clone(),
        "--orig-src".into(),
        flow.src.to_string(),
        "--orig-dst".into(),
        flow.dst.to_string(),
    ];
    if let (Some(s), Some(d)) = (flow.sport, flow.dport) {
        a.extend([
            "--orig-port-src".into(),
            s.to_string(),
            "--orig-port-dst".into(),
            d.to_string(),
        ]);
    }
    if let Some((t, c)) = flow.icmp {
        a.extend([
            "--icmp-type".into(),
            t.to_string(),
            "--icmp-code".into(),
            c.to_string(),
        ]);
        if let Some(id) = flow.icmp_id {
            a.extend(["--icmp-id".into(), id.to_string()]);
        }
    }
    a
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const LISTING: &str = "\
ipv4     2 tcp      6 431995 ESTABLISHED src=10.0.0.2 dst=10.0.0.1 sport=40000 dport=22 src=10.0.0.1 dst=10.0.0.2 sport=22 dport=40000 [ASSURED] mark=0 use=1
ipv4     2 udp      17 20 src=10.0.0.1 dst=169.254.169.253 sport=5353 dport=53 src=169.254.169.253 dst=10.0.0.1 sport=53 dport=5353 mark=0 use=1
ipv6     10 tcp      6 300 ESTABLISHED src=fd00::2 dst=fd00::1 sport=5000 dport=8080 src=fd00::1 dst=fd00::2 sport=8080 dport=5000 [ASSURED] mark=0 use=1
ipv4     2 icmp     1 29 src=10.0.0.2 dst=10.0.0.1 type=8 code=0 id=77 src=10.0.0.1 dst=10.0.0.2 type=0 code=0 id=77 mark=0 use=1
conntrack v1.4.7 (conntrack-tools): 4 flow entries have been shown.
";

    #[test]
    fn flows_parse_with_their_original_tuple() {
        let flows = parse_flows(LISTING);
        assert_eq!(flows.len(), 4);
        assert_eq!(flows[0].src, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(flows[0].dport, Some(22));
        assert_eq!(flows[2].protocol, "tcp");
        assert_eq!(flows[3].icmp, Some((8, 0)));
        assert_eq!(flows[3].icmp_id, Some(77));
        let local: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        let p = probe_of(&flows[0], &local).unwrap();
        assert_eq!(p.direction, Direction::Ingress);
        let p = probe_of(&flows[1], &local).unwrap();
        assert_eq!(p.direction, Direction::Egress);
        assert_eq!(p.protocol, ProbeProtocol::Udp { port: 53 });
    }

    #[test]
    fn delete_names_exactly_one_flow() {
        let flows = parse_flows(LISTING);
        assert_eq!(
            delete_args(&flows[0]).join(" "),
            "-D -f ipv4 -p tcp --orig-src 10.0.0.2 --orig-dst 10.0.0.1 --orig-port-src 40000 --orig-port-dst 22"
        );
        assert_eq!(
            delete_args(&flows[3]).join(" "),
            "-D -f ipv4 -p icmp --orig-src 10.0.0.2 --orig-dst 10.0.0.1 --icmp-type 8 --icmp-code 0 --icmp-id 77"
        );
    }
}
