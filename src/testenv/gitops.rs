//! How GitOps tools read an object's health, by the real implementations:
//! Flux's kstatus (sigs.k8s.io/cli-utils) and an Argo CD Lua health script
//! run in gopher-lua, Argo CD's Lua runtime. Both run in `gitops-check`
//! (hack/gitops-check, built by `make testbin`).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde::Deserialize;

use super::{Error, Result, testbin};

/// A tool's verdict on one object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Verdict {
    /// kstatus: `Current`, `InProgress`, `Failed`, ...; Argo CD: `Healthy`,
    /// `Progressing`, `Degraded`, ...
    pub status: String,
    /// The tool's message.
    pub message: String,
}

fn run(args: &[&std::ffi::OsStr], object: &serde_json::Value) -> Result<Verdict> {
    let bin = testbin("gitops-check")?;
    let io = |context: &str| {
        let context = context.to_owned();
        move |source| Error::Io { context, source }
    };
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("starting gitops-check"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(object.to_string().as_bytes())
            .map_err(io("writing to gitops-check"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io("running gitops-check"))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("gitops-check {args:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| Error::Io {
        context: "reading gitops-check output".into(),
        source: std::io::Error::other(e),
    })
}

/// The status Flux's kstatus computes for `object`.
pub fn kstatus(object: &serde_json::Value) -> Result<Verdict> {
    run(&["kstatus".as_ref()], object)
}

/// The health the Argo CD Lua `script` gives `object`.
pub fn argocd_health(script: &Path, object: &serde_json::Value) -> Result<Verdict> {
    run(&["argocd-health".as_ref(), script.as_os_str()], object)
}
