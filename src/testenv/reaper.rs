//! The watchdog that cleans up after the test process, however it ends.
//!
//! Statics are never dropped, a test may panic while holding anything, and a
//! test binary may be killed; `unsafe_code = "forbid"` rules out
//! `prctl(PR_SET_PDEATHSIG)` in the children. So the first use starts one
//! small `sh` process per test process, in its own process group and
//! ignoring `SIGINT`/`SIGTERM`/`SIGHUP`, whose standard input is a pipe only
//! this process holds (Rust opens every pipe close-on-exec, so no other child
//! inherits it). This process writes one line per thing to clean up:
//!
//! - `pid N` — kill process N (`unpid N` when it was reaped normally);
//! - `dir PATH` — remove that directory;
//! - `cgroup PATH` — kill every process in cgroup `PATH` (and below it) and
//!   remove those cgroups, in every hierarchy under `/sys/fs/cgroup` (a real
//!   kubelet's node creates one; its pods may live in other namespaces).
//!
//! When the test process exits — normally, by panic, by signal — the kernel
//! closes the pipe, `read` sees end-of-file, and the watchdog `SIGKILL`s every
//! registered process, kills every process inside and deletes every network
//! namespace named with this process's [`netns_prefix`], and removes the
//! registered directories. The test harness does not wait for it: cleanup
//! finishes within about a second after the test binary is gone.
//!
//! If the watchdog itself is `SIGKILL`ed, [`sweep_stale`] (run at every
//! start) removes what a dead test process left: namespaces and temp dirs
//! whose owner pid is gone, and processes whose working directory is such a
//! temp dir.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// Prefix of every temp dir the environment creates (`<prefix><pid>-…`).
pub(crate) const DIR_PREFIX: &str = "palisade-testenv-";

/// Prefix of every network namespace this crate creates (`<prefix><pid>-…`).
const NETNS_PREFIX: &str = "palisade-";

const SCRIPT: &str = r#"
trap '' INT TERM HUP PIPE
prefix="$1"
pids=" "
dirs=""
cgroups=""
while IFS= read -r line; do
  case "$line" in
    "pid "*) pids="$pids${line#pid } " ;;
    "unpid "*) pids=$(printf '%s' "$pids" | sed "s/ ${line#unpid } / /") ;;
    "dir "*) dirs="$dirs${line#dir }
" ;;
    "cgroup "*) cgroups="$cgroups${line#cgroup }
" ;;
  esac
done
for p in $pids; do kill -KILL "$p" 2>/dev/null; done
for ns in $(ip netns list 2>/dev/null | cut -d' ' -f1); do
  case "$ns" in
    "$prefix"*)
      for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
      ip netns delete "$ns" 2>/dev/null ;;
  esac
done
printf '%s' "$cgroups" | while IFS= read -r c; do
  [ -n "$c" ] || continue
  for try in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    left=""
    for h in /sys/fs/cgroup/*/; do
      [ -d "$h$c" ] || continue
      find "$h$c" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null
      find "$h$c" -depth -type d -exec rmdir {} \; 2>/dev/null
      [ -d "$h$c" ] && left=1
    done
    [ -z "$left" ] && break
    sleep 0.5
  done
done
printf '%s' "$dirs" | while IFS= read -r d; do [ -n "$d" ] && rm -rf -- "$d"; done
"#;

struct Watchdog {
    stdin: Option<ChildStdin>,
}

fn watchdog() -> &'static Mutex<Watchdog> {
    static WATCHDOG: OnceLock<Mutex<Watchdog>> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        sweep_stale();
        let stdin = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("palisade-testenv-watchdog")
            .arg(netns_prefix())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ok()
            .and_then(|mut child| child.stdin.take());
        if stdin.is_none() {
            eprintln!("palisade testenv: could not start the cleanup watchdog; leftovers are swept at the next start");
        }
        Mutex::new(Watchdog { stdin })
    })
}

use std::os::unix::process::CommandExt as _;

fn tell(line: &str) {
    let mut dog = match watchdog().lock() {
        Ok(dog) => dog,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(stdin) = dog.stdin.as_mut()
        && writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .is_err()
    {
        dog.stdin = None;
    }
}

/// Starts the watchdog now (it otherwise starts on first registration).
pub fn ensure_started() {
    let _ = watchdog();
}

/// Kill process `pid` when the test process is gone.
pub fn watch_pid(pid: u32) {
    tell(&format!("pid {pid}"));
}

/// Forget `pid` (it was reaped normally, and its number may be reused).
pub fn forget_pid(pid: u32) {
    tell(&format!("unpid {pid}"));
}

/// Remove directory `path` when the test process is gone.
pub fn watch_dir(path: &Path) {
    tell(&format!("dir {}", path.display()));
}

/// Remove cgroup `path` (absolute within each hierarchy, e.g.
/// `/palisade-1234-node-a`) from every hierarchy when the test process is
/// gone.
pub fn watch_cgroup(path: &str) {
    tell(&format!("cgroup {path}"));
}

/// The prefix of every network namespace this process creates; the watchdog
/// deletes them all.
pub fn netns_prefix() -> String {
    format!("{NETNS_PREFIX}{}-", std::process::id())
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The owner pid encoded in a name `<prefix><pid>-…`.
fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

/// Removes what dead test processes left behind: network namespaces and temp
/// dirs named with a pid that no longer runs, and processes working in such a
/// dir. Runs once per process, before the watchdog starts.
pub fn sweep_stale() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        sweep_netns();
        sweep_dirs();
        sweep_cgroups();
    });
}

fn sweep_netns() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name, NETNS_PREFIX) else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
            for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", p]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "delete", &name]).status();
    }
}

fn sweep_cgroups() {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for hierarchy in hierarchies.flatten() {
        let Ok(entries) = std::fs::read_dir(hierarchy.path()) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_pid(&name, NETNS_PREFIX).is_some_and(|pid| !pid_alive(pid)) {
                let _ = Command::new("sh")
                    .arg("-c")
                    .arg(
                        "find \"$1\" -name cgroup.procs -exec cat {} + | xargs -r kill -KILL; \
                         sleep 0.5; find \"$1\" -depth -type d -exec rmdir {} \\;",
                    )
                    .arg("sweep")
                    .arg(entry.path())
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
}

fn sweep_dirs() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    let stale: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            owner_pid(&name, DIR_PREFIX).is_some_and(|pid| !pid_alive(pid))
        })
        .map(|e| e.path())
        .collect();
    if stale.is_empty() {
        return;
    }
    // Components run with their env's temp dir as working directory.
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for proc_entry in procs.flatten() {
            let Ok(pid) = proc_entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cwd) = std::fs::read_link(proc_entry.path().join("cwd")) else {
                continue;
            };
            if stale.iter().any(|dir| cwd.starts_with(dir)) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
    for dir in stale {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_prefixed_names() {
        assert_eq!(owner_pid("palisade-123-4-fabric", NETNS_PREFIX), Some(123));
        assert_eq!(owner_pid("palisade-testenv-77-abc", DIR_PREFIX), Some(77));
        assert_eq!(owner_pid("palisade-x-1", NETNS_PREFIX), None);
        assert_eq!(owner_pid("other-1", NETNS_PREFIX), None);
    }
}
