//! [`DataplaneNode`]: a simulated host whose iptables are programmed
//! straight from `compile_node` output by the real dataplane, without an
//! agent or an apiserver: the node layer alone, with real packets.

use super::net::{SimHost, SimNet};
use super::{Error, Result};
use crate::api::FirewallPolicy;
use crate::node::backend::Backend;
use crate::node::dataplane::Dataplane;
use crate::policy::{Facts, NodeFacts, NodeRuleset, compile_node, validate};

/// A host, its dataplane (nft backend, inside its namespace) and the facts
/// naming it (`node`, with the host's addresses).
pub struct DataplaneNode {
    /// The host.
    pub host: SimHost,
    /// Its dataplane.
    pub dataplane: Dataplane,
    /// What the compiler is told; tests adjust the failsafe and scopes.
    pub facts: Facts,
}

impl DataplaneNode {
    /// A new host named `name` on `net`; `admin`'s IPv4, when given, is the
    /// failsafe SSH source.
    pub fn new(net: &SimNet, name: &str, admin: Option<&SimHost>) -> Result<DataplaneNode> {
        let host = net.add_host(name)?;
        let dataplane = Dataplane::new(Backend::Nft, Some(host.netns().to_string()));
        let mut facts = Facts {
            nodes: vec![NodeFacts {
                name: "node".into(),
                addresses: host.addresses(),
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        };
        if let Some(admin) = admin {
            facts.failsafe.admin_cidrs = vec![std::net::IpAddr::V4(admin.ipv4()).into()];
        }
        Ok(DataplaneNode {
            host,
            dataplane,
            facts,
        })
    }

    /// The ruleset `policies` give this node.
    pub fn compile(&self, policies: &[FirewallPolicy]) -> Result<NodeRuleset> {
        let mut valid = Vec::new();
        for p in policies {
            valid.push(validate(p).map_err(|e| Error::Invalid(e.to_string()))?);
        }
        compile_node("node", &valid, &self.facts).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// Compiles and programs `policies`, then checks that a full read
    /// finds nothing to write (what was written is what the kernel holds).
    pub fn apply(&self, policies: &[FirewallPolicy]) -> Result<NodeRuleset> {
        let rs = self.compile(policies)?;
        self.dataplane
            .sync(&rs)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let again = self
            .dataplane
            .verify(&rs)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        if again.wrote() {
            return Err(Error::Invalid(format!(
                "a full read after the sync found differences: {:?}",
                again.plan
            )));
        }
        Ok(rs)
    }

    /// `iptables-save` then `ip6tables-save` of the filter table, without
    /// the `# Generated ... on <time>` / `# Completed on <time>` comments
    /// and with chain counters zeroed (`:INPUT ACCEPT [0:0]`): two saves of
    /// the same rules compare equal whenever they are taken, whatever
    /// traffic passed between them.
    pub fn save(&self) -> Result<String> {
        let text = self.host.exec(&["iptables-nft-save", "-t", "filter"])?
            + &self.host.exec(&["ip6tables-nft-save", "-t", "filter"])?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match (l.starts_with(':'), l.rsplit_once(" [")) {
                (true, Some((decl, _))) => format!("{decl} [0:0]\n"),
                _ => format!("{l}\n"),
            })
            .collect())
    }
}

/// `nft monitor` followed for a [`Dataplane`], as the agent follows it
/// ([`crate::node::monitor::follow`] on a thread of its own): its echoes
/// check the dataplane's writes, other processes' generations make chains
/// suspect. Killed, and its reader joined, when dropped.
pub struct FollowedMonitor {
    child: std::process::Child,
    reader: Option<std::thread::JoinHandle<()>>,
    drift: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    dataplane: Dataplane,
    netns: Option<String>,
}

impl FollowedMonitor {
    /// Starts `nft monitor` in network namespace `netns` (`ip netns exec`),
    /// or in the calling thread's namespace when `None`, and follows it.
    pub fn start(dataplane: &Dataplane, netns: Option<&str>) -> Result<FollowedMonitor> {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns, "nft", "monitor"]);
                c
            }
            None => {
                let mut c = std::process::Command::new("nft");
                c.arg("monitor");
                c
            }
        };
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| Error::Invalid(format!("starting nft monitor: {e}")))?;
        let Some(out) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Invalid("nft monitor: no stdout".into()));
        };
        let drift = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reader = {
            let (dataplane, drift) = (dataplane.clone(), drift.clone());
            std::thread::spawn(move || {
                crate::node::monitor::follow(&dataplane, std::io::BufReader::new(out), || {
                    drift.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                });
            })
        };
        Ok(FollowedMonitor {
            child,
            reader: Some(reader),
            drift,
            dataplane: dataplane.clone(),
            netns: netns.map(str::to_string),
        })
    }

    /// Generations of other processes that touched Palisade, so far.
    pub fn drift_seen(&self) -> usize {
        self.drift.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until the monitor has reported a generation (it is
    /// listening), at most `timeout`; true when it has. Meanwhile commits
    /// generations that touch nothing (a table added and deleted in one
    /// transaction, in the monitor's namespace) for it to report.
    pub fn wait_live(&self, timeout: std::time::Duration) -> bool {
        let start = std::time::Instant::now();
        let nudge = "add table ip palisade_monitor_probe; delete table ip palisade_monitor_probe";
        while !self.dataplane.monitor_live() {
            if start.elapsed() > timeout {
                return false;
            }
            let mut cmd = match &self.netns {
                Some(ns) => {
                    let mut c = std::process::Command::new("ip");
                    c.args(["netns", "exec", ns, "nft", nudge]);
                    c
                }
                None => {
                    let mut c = std::process::Command::new("nft");
                    c.arg(nudge);
                    c
                }
            };
            let _ = cmd
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            // Not faster: with 10k iptables-nft rules, `nft monitor`
            // spends a few hundred milliseconds per generation (it fetches
            // the ruleset again), and nudges every few milliseconds would
            // keep it behind for good.
            let nudged = std::time::Instant::now();
            while !self.dataplane.monitor_live()
                && nudged.elapsed() < std::time::Duration::from_secs(1)
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        true
    }
}

impl Drop for FollowedMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
