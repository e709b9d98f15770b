//! Locating the component binaries and running them as supervised children.

use super::{Error, Result, reaper};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Where the Kubernetes and etcd binaries live (`PALISADE_TESTBIN`).
pub(crate) const TESTBIN_VAR: &str = "PALISADE_TESTBIN";
/// Where the moto server lives (`PALISADE_MOTO`).
pub(crate) const MOTO_VAR: &str = "PALISADE_MOTO";

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("palisade")
}

fn require(what: &str, path: PathBuf, var: &'static str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingBinary {
            what: what.to_string(),
            path,
            var,
        })
    }
}

/// Path of a cached Kubernetes/etcd binary (`etcd`, `kube-apiserver`,
/// `kubectl`, …) in `$PALISADE_TESTBIN`; fails telling to run `make testbin`
/// when it is missing.
pub fn testbin(name: &str) -> Result<PathBuf> {
    let dir = std::env::var_os(TESTBIN_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("bin"));
    require(name, dir.join(name), TESTBIN_VAR)
}

/// Path of the `moto_server` executable.
pub(crate) fn moto_server() -> Result<PathBuf> {
    let path = std::env::var_os(MOTO_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("venv/bin/moto_server"));
    require("moto_server", path, MOTO_VAR)
}

/// A running component: killed on drop, and by the watchdog if this process
/// dies first. Output goes to `<dir>/<name>.log`.
pub(crate) struct Component {
    pub(crate) name: String,
    pub(crate) log: PathBuf,
    child: Child,
}

impl Component {
    /// Starts `program args…` with working directory `dir`.
    pub(crate) fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)
            .map_err(Error::io(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(Error::io(format!("duplicating {}", log.display())))?;
        // Register before spawning so no child can exist unknown to the watchdog.
        reaper::ensure_started();
        let child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env_remove("KUBECONFIG")
            .spawn()
            .map_err(Error::io(format!("starting {}", program.display())))?;
        reaper::watch_pid(child.id());
        Ok(Component {
            name: name.to_string(),
            log,
            child,
        })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub(crate) fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(err) => Some(format!("unknown ({err})")),
        }
    }

    /// A start-up failure with the end of this component's log.
    pub(crate) fn failed(&self, reason: impl Into<String>) -> Error {
        Error::ComponentStart {
            component: self.name.clone(),
            reason: reason.into(),
            log: self.log.clone(),
            tail: log_tail(&self.log, 40),
        }
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        reaper::forget_pid(self.child.id());
    }
}

/// The last `lines` lines of a log file (empty if unreadable).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_says_how_to_get_it() {
        let err = require("etcd", PathBuf::from("/nonexistent/etcd"), TESTBIN_VAR).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("make testbin"), "{msg}");
        assert!(msg.contains("PALISADE_TESTBIN"), "{msg}");
        assert!(msg.contains("/nonexistent/etcd"), "{msg}");
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        std::fs::write(&log, "1\n2\n3\n").unwrap();
        assert_eq!(log_tail(&log, 2), "2\n3");
        assert_eq!(log_tail(&dir.path().join("missing"), 2), "");
    }
}
