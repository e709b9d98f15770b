//! Low-level network-namespace plumbing: `ip` commands, and running a
//! closure on a thread that has entered a namespace.
//!
//! A socket belongs to the namespace of the thread that created it, for its
//! whole life. So listeners and probes are created on a short-lived thread
//! that `setns`es into the host's namespace, and then used from ordinary
//! threads; nothing in the process ever changes namespace for longer.

use super::{Error, Result};
use std::process::Command;

/// Runs `ip args…` and fails with its stderr when it fails.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

/// Runs `program args…` and fails with its stderr when it fails.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(Error::io(format!("running {program}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Path of a named namespace's handle.
pub(crate) fn handle(name: &str) -> String {
    format!("/run/netns/{name}")
}

/// Runs `f` on a fresh thread inside namespace `name` and returns its result.
pub(crate) fn in_netns<T, F>(name: &str, f: F) -> Result<T>
where
    F: FnOnce() -> std::io::Result<T> + Send,
    T: Send,
{
    let path = handle(name);
    let ns = std::fs::File::open(&path).map_err(Error::io(format!("opening {path}")))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|errno| Error::io(format!("entering {name}"))(errno.into()))?;
                f().map_err(Error::io(format!("in network namespace {name}")))
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Invalid(format!("thread in {name} panicked"))))
    })
}

/// Writes a sysctl of namespace `name` (path below `/proc/sys/`).
pub(crate) fn sysctl(name: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    in_netns(name, || std::fs::write(&path, value))
}

/// Kills every process inside namespace `name`, then deletes it.
pub(crate) fn delete(name: &str) {
    kill_all(name);
    let _ = Command::new("ip").args(["netns", "delete", name]).status();
}

/// `SIGKILL`s every process inside namespace `name`.
pub(crate) fn kill_all(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
}
