//! Which iptables backend the host uses: `nft` (iptables-nft, rules kept in
//! nftables) or `legacy` (the x_tables kernel interface).
//!
//! Both can hold rules at once and the kernel evaluates both, so writing to
//! the one the rest of the host (kubelet, kube-proxy, the CNI) does not use
//! leaves a firewall that nobody sees in `iptables-save`. We decide as
//! kube-proxy's and Calico's detection do: the kubelet's hint chain
//! (`KUBE-IPTABLES-HINT` in the mangle table) wins; failing that, the
//! backend holding more rules; failing that, nft (the default of every
//! current distribution). Once chosen, every command names its backend
//! explicitly (`iptables-nft-restore`, never the `iptables` alternative).

use std::fmt;
use std::process::Command;

/// An iptables backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// iptables-nft: the iptables API over nftables.
    Nft,
    /// iptables-legacy: the x_tables kernel interface.
    Legacy,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        })
    }
}

/// An IP family's userspace tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// iptables.
    V4,
    /// ip6tables.
    V6,
}

impl Backend {
    /// The command for `tool` (`save`, `restore`, or `""` for the plain
    /// command) of this backend and family, e.g. `ip6tables-nft-restore`.
    pub fn command(self, family: Family, tool: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        if tool.is_empty() {
            format!("{base}-{self}")
        } else {
            format!("{base}-{self}-{tool}")
        }
    }
}

/// What one backend's `iptables-save` showed, as far as detection cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SaveSummary {
    /// The tools of this backend are installed.
    pub available: bool,
    /// The kubelet's `KUBE-IPTABLES-HINT` chain exists.
    pub has_kubelet_hint: bool,
    /// Number of rules (`-A` lines).
    pub rules: usize,
}

impl SaveSummary {
    /// Summarises `iptables-save` output.
    pub fn from_save_output(available: bool, text: &str) -> Self {
        let mut s = Self {
            available,
            ..Self::default()
        };
        for line in text.lines() {
            if line.starts_with("-A ") {
                s.rules += 1;
            } else if line.starts_with(":KUBE-IPTABLES-HINT ") {
                s.has_kubelet_hint = true;
            }
        }
        s
    }
}

/// Why the backend cannot be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetectError {
    /// Neither backend's tools are installed.
    #[error("neither iptables-nft nor iptables-legacy is installed")]
    NoTools,
    /// Reading the rules failed.
    #[error("running {command}: {message}")]
    Command {
        /// The command.
        command: String,
        /// What went wrong.
        message: String,
    },
}

/// Chooses a backend from what each one holds (pure; see the module docs).
pub fn choose(nft: SaveSummary, legacy: SaveSummary) -> Result<Backend, DetectError> {
    match (nft.available, legacy.available) {
        (false, false) => return Err(DetectError::NoTools),
        (true, false) => return Ok(Backend::Nft),
        (false, true) => return Ok(Backend::Legacy),
        (true, true) => {}
    }
    Ok(match (nft.has_kubelet_hint, legacy.has_kubelet_hint) {
        (true, false) => Backend::Nft,
        (false, true) => Backend::Legacy,
        _ if legacy.rules > nft.rules => Backend::Legacy,
        _ => Backend::Nft,
    })
}

/// Detects the backend of the current network namespace by reading both
/// backends' IPv4 rules (mangle table for the hint, then every table).
pub fn detect() -> Result<Backend, DetectError> {
    let summary = |backend: Backend| -> Result<SaveSummary, DetectError> {
        let cmd = backend.command(Family::V4, "save");
        match Command::new(&cmd).output() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SaveSummary::default()),
            Err(e) => Err(DetectError::Command {
                command: cmd,
                message: e.to_string(),
            }),
            Ok(out) if !out.status.success() => Err(DetectError::Command {
                command: cmd,
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            }),
            Ok(out) => Ok(SaveSummary::from_save_output(
                true,
                &String::from_utf8_lossy(&out.stdout),
            )),
        }
    };
    choose(summary(Backend::Nft)?, summary(Backend::Legacy)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(hint: bool, rules: usize) -> SaveSummary {
        SaveSummary {
            available: true,
            has_kubelet_hint: hint,
            rules,
        }
    }

    #[test]
    fn kubelet_hint_wins_over_rule_counts() {
        assert_eq!(choose(s(false, 100), s(true, 0)), Ok(Backend::Legacy));
        assert_eq!(choose(s(true, 0), s(false, 100)), Ok(Backend::Nft));
    }

    #[test]
    fn more_rules_wins_and_ties_go_to_nft() {
        assert_eq!(choose(s(false, 3), s(false, 40)), Ok(Backend::Legacy));
        assert_eq!(choose(s(false, 40), s(false, 3)), Ok(Backend::Nft));
        assert_eq!(choose(s(false, 0), s(false, 0)), Ok(Backend::Nft));
        assert_eq!(choose(s(true, 0), s(true, 9)), Ok(Backend::Legacy));
    }

    #[test]
    fn missing_tools_decide_or_fail() {
        let none = SaveSummary::default();
        assert_eq!(choose(none, none), Err(DetectError::NoTools));
        assert_eq!(choose(none, s(false, 0)), Ok(Backend::Legacy));
    }

    #[test]
    fn save_output_is_summarised() {
        let text = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -i lo -j ACCEPT\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n";
        assert_eq!(SaveSummary::from_save_output(true, text), s(true, 2));
    }

    #[test]
    fn commands_name_their_backend() {
        assert_eq!(
            Backend::Nft.command(Family::V6, "restore"),
            "ip6tables-nft-restore"
        );
        assert_eq!(Backend::Legacy.command(Family::V4, ""), "iptables-legacy");
    }
}
