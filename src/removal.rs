//! Whether this process's own workload is being removed — the agent's
//! DaemonSet, the controller's Deployment — as opposed to restarted or
//! rolled.
//!
//! `helm uninstall` runs the chart's pre-delete hook, which deletes the
//! policies while the controller and agents still run. A GitOps tool
//! pruning the whole release may run no hook at all (Argo CD before v3.3
//! ignores Helm's `pre-delete`; Flux's kustomize-controller runs none), so
//! the workloads must notice on their own: on SIGTERM each reads its
//! owner. Deleted, or marked for deletion, means the release is going and
//! the process undoes what it did (the agent removes the node's rules,
//! the controller its Security Groups and finalizers); present means a
//! restart or rolling update and everything stays in force.
//!
//! The owner is also watched from start-up, so a deletion seen before the
//! signal still counts when the final read fails (the pruner may delete
//! the ServiceAccount and RBAC in the same pass: an established watch
//! keeps delivering, a new request is refused).

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

/// A namespaced workload: `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl FromStr for Workload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Workload {
                    namespace: ns.into(),
                    name: name.into(),
                })
            }
            _ => Err(format!("{s:?}: expected NAMESPACE/NAME")),
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What one look at the workload found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Seen {
    /// Not looked at yet (or the watch has not listed yet).
    #[default]
    Nothing,
    /// There, not being deleted.
    Present,
    /// There, with a deletionTimestamp (foreground deletion: its pods go
    /// first).
    Deleting,
    /// Not there.
    Gone,
}

/// The final read, on SIGTERM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// The read succeeded (`Gone` for a 404).
    Found(Seen),
    /// 401: the process's own ServiceAccount token was refused — its
    /// ServiceAccount was deleted.
    Unauthorized,
    /// Anything else (403, the API server unreachable, ...).
    Failed(String),
}

/// What to do with what the process wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The workload is being removed: undo. The reason, for the log.
    Removed(String),
    /// A restart or rolling update: leave everything in force.
    Stays,
    /// Cannot tell: leave everything in force, and say so.
    Unknown(String),
}

/// Decides from the final read and what the watch saw last. A successful
/// read wins (a DaemonSet re-created under the same name adopts the pods,
/// whatever was seen before); a failed one falls back on the watch.
pub fn verdict(workload: &Workload, read: &Read, watched: Seen) -> Verdict {
    let from = |seen: Seen, how: &str| match seen {
        Seen::Deleting => Some(Verdict::Removed(format!(
            "{workload} is being deleted ({how})"
        ))),
        Seen::Gone => Some(Verdict::Removed(format!("{workload} is gone ({how})"))),
        Seen::Present => Some(Verdict::Stays),
        Seen::Nothing => None,
    };
    match read {
        Read::Found(seen) => from(*seen, "read on SIGTERM").unwrap_or(Verdict::Stays),
        Read::Unauthorized => match from(watched, "watched") {
            Some(v @ Verdict::Removed(_)) => v,
            _ => Verdict::Removed(format!(
                "the ServiceAccount's token was refused: the release of {workload} is being deleted"
            )),
        },
        Read::Failed(e) => match from(watched, "watched") {
            Some(v @ Verdict::Removed(_)) => v,
            _ => Verdict::Unknown(format!("reading {workload}: {e}")),
        },
    }
}

fn seen<K: Resource>(object: &K) -> Seen {
    if object.meta().deletion_timestamp.is_some() {
        Seen::Deleting
    } else {
        Seen::Present
    }
}

/// Follows one workload from start-up; `decide` makes the call on SIGTERM.
#[derive(Debug)]
pub struct Owner<K> {
    workload: Workload,
    api: Api<K>,
    watched: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Owner<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + fmt::Debug
        + Send
        + Sync
        + 'static,
{
    /// Starts watching `workload` (get/list/watch on that one object).
    pub fn follow(client: Client, workload: Workload) -> Self {
        let api: Api<K> = Api::namespaced(client, &workload.namespace);
        let watched = Arc::new(Mutex::new(Seen::Nothing));
        let task = {
            let api = api.clone();
            let watched = watched.clone();
            let config =
                watcher::Config::default().fields(&format!("metadata.name={}", workload.name));
            let what = workload.to_string();
            tokio::spawn(async move {
                let mut events = std::pin::pin!(watcher(api, config).default_backoff());
                let mut listed = false;
                while let Some(event) = events.next().await {
                    let now = match event {
                        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                            listed = true;
                            seen(&o)
                        }
                        Ok(watcher::Event::Delete(_)) => Seen::Gone,
                        Ok(watcher::Event::Init) => {
                            listed = false;
                            continue;
                        }
                        Ok(watcher::Event::InitDone) if !listed => Seen::Gone,
                        Ok(watcher::Event::InitDone) => continue,
                        Err(e) => {
                            tracing::debug!(workload = %what, error = %e, "watching the owner workload");
                            continue;
                        }
                    };
                    *watched.lock().unwrap_or_else(|p| p.into_inner()) = now;
                }
            })
        };
        Owner {
            workload,
            api,
            watched,
            task,
        }
    }

    /// The workload followed.
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    /// Reads the workload once more and decides (then stops watching).
    pub async fn decide(&self) -> Verdict {
        // Bounded: the pod's grace period is running.
        let read = match tokio::time::timeout(
            std::time::Duration::from_secs(5),
            self.api.get_opt(&self.workload.name),
        )
        .await
        {
            Ok(Ok(Some(o))) => Read::Found(seen(&o)),
            Ok(Ok(None)) => Read::Found(Seen::Gone),
            Ok(Err(kube::Error::Api(e))) if e.code == 401 => Read::Unauthorized,
            Ok(Err(e)) => Read::Failed(e.to_string()),
            Err(_) => Read::Failed("no answer within 5s".into()),
        };
        self.task.abort();
        let watched = *self.watched.lock().unwrap_or_else(|p| p.into_inner());
        verdict(&self.workload, &read, watched)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ds() -> Workload {
        "palisade-system/palisade-agent".parse().unwrap()
    }

    #[test]
    fn workloads_parse_as_namespace_slash_name() {
        assert_eq!(
            ds(),
            Workload {
                namespace: "palisade-system".into(),
                name: "palisade-agent".into()
            }
        );
        for bad in ["", "x", "/x", "x/", "a/b/c"] {
            assert!(bad.parse::<Workload>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_fresh_read_wins_over_the_watch() {
        // Re-created under the same name (it adopts the pods): stays.
        assert_eq!(
            verdict(&ds(), &Read::Found(Seen::Present), Seen::Gone),
            Verdict::Stays
        );
        assert!(matches!(
            verdict(&ds(), &Read::Found(Seen::Deleting), Seen::Present),
            Verdict::Removed(_)
        ));
        assert!(matches!(
            verdict(&ds(), &Read::Found(Seen::Gone), Seen::Nothing),
            Verdict::Removed(_)
        ));
    }

    #[test]
    fn a_failed_read_falls_back_on_the_watch() {
        let failed = Read::Failed("403 forbidden".into());
        assert!(matches!(
            verdict(&ds(), &failed, Seen::Deleting),
            Verdict::Removed(_)
        ));
        assert!(matches!(
            verdict(&ds(), &failed, Seen::Gone),
            Verdict::Removed(_)
        ));
        // Never guessed into a removal: the rules stay, and the log says why.
        assert!(matches!(
            verdict(&ds(), &failed, Seen::Present),
            Verdict::Unknown(_)
        ));
        assert!(matches!(
            verdict(&ds(), &failed, Seen::Nothing),
            Verdict::Unknown(_)
        ));
    }

    #[test]
    fn a_refused_token_means_the_release_is_going() {
        assert!(matches!(
            verdict(&ds(), &Read::Unauthorized, Seen::Present),
            Verdict::Removed(r) if r.contains("ServiceAccount")
        ));
        assert!(matches!(
            verdict(&ds(), &Read::Unauthorized, Seen::Deleting),
            Verdict::Removed(r) if r.contains("being deleted")
        ));
    }
}
