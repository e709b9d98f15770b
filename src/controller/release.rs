//! Releasing every policy when the controller's own Deployment is being
//! deleted: an uninstall or a GitOps prune of the whole release that ran no
//! pre-delete hook (see [`crate::removal`]).
//!
//! Nothing will reconcile the policies after this process, so waiting for
//! them to be deleted would wedge: when the pruner deletes the CRDs, each
//! policy's finalizer would hold the CRD deletion forever. So, for each
//! policy carrying the finalizer, within a deadline: undo what it put in
//! EC2 (as a deletion would: the owned group detached and deleted, an
//! adopted group's marked rules revoked), then drop the finalizer. The
//! agents are not waited for: their DaemonSet is going too, and each agent
//! removes its node's rules on its own way out.
//!
//! A group that could not be deleted in time is never left silently: a
//! Warning Event on the policy (`SecurityGroupLeft`) and the log name it
//! and say how to delete it; the finalizer goes anyway, so nothing wedges.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{Context, FINALIZER, apply::undo_cloud};
use crate::api::FirewallPolicy;
use crate::cloud::Ec2;

/// What [`release`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Released {
    /// Policies whose EC2 side was undone and finalizer dropped.
    pub released: Vec<String>,
    /// `policy: group (why)` for each group that may be left in EC2.
    pub left: Vec<String>,
    /// Policies still holding the finalizer (the API refused the patch).
    pub held: Vec<String>,
}

/// Releases every policy this controller holds (see the module doc),
/// giving up on EC2 after `deadline`.
pub async fn release<E: Ec2>(ctx: Arc<Context<E>>, deadline: Duration) -> Released {
    let started = Instant::now();
    let api: Api<FirewallPolicy> = Api::all(ctx.client.clone());
    let mut params = ListParams::default();
    if let Some(selector) = &ctx.config.policy_selector {
        params = params.labels(selector);
    }
    let mut out = Released::default();
    let policies = match api.list(&params).await {
        Ok(list) => list.items,
        Err(e) => {
            tracing::error!(error = %e, "release: cannot list FirewallPolicies; any left keep their finalizer and Security Group: see the README, \"Removing Palisade\"");
            return out;
        }
    };
    let held: Vec<FirewallPolicy> = policies
        .into_iter()
        .filter(|p| p.finalizers().iter().any(|f| f == FINALIZER))
        .collect();
    let results: Vec<(String, Result<(), String>, bool)> =
        futures::stream::iter(held.into_iter().map(|policy| {
            let ctx = ctx.clone();
            let api = api.clone();
            async move {
                let left = deadline.saturating_sub(started.elapsed());
                let cloud = match tokio::time::timeout(left, undo_cloud(&policy, &ctx)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("not done within {}s", deadline.as_secs())),
                };
                let name = policy.name_any();
                match &cloud {
                    Ok(()) => {
                        ctx.publish(
                            &policy,
                            false,
                            "Released",
                            "Release",
                            "the controller's Deployment is being deleted: removed what this policy put in EC2 and released it".into(),
                        )
                        .await;
                    }
                    Err(why) => {
                        let group = policy
                            .status
                            .as_ref()
                            .and_then(|s| s.security_group.as_ref())
                            .map(|g| g.id.clone())
                            .unwrap_or_else(|| "its Security Group".into());
                        tracing::error!(policy = %name, %group, %why, "release: the Security Group may be left in EC2; delete it with `aws ec2 delete-security-group --group-id {group}` once it is detached");
                        ctx.publish(
                            &policy,
                            true,
                            "SecurityGroupLeft",
                            "Release",
                            format!("the controller's Deployment is being deleted and {group} could not be removed ({why}); the policy is released anyway so nothing waits on it. Delete the group by hand: `aws ec2 delete-security-group --group-id {group}` (find every group Palisade made with the tag palisade.dev/cluster)"),
                        )
                        .await;
                    }
                }
                let dropped = drop_finalizer(&api, &policy).await;
                if let Err(e) = &dropped {
                    tracing::error!(policy = %name, error = %e, "release: cannot remove the finalizer; remove it by hand (see the README, \"Removing Palisade\")");
                }
                (name, cloud, dropped.is_ok())
            }
        }))
        .buffer_unordered(usize::from(ctx.config.concurrency.max(1)))
        .collect()
        .await;
    for (name, cloud, dropped) in results {
        match cloud {
            Ok(()) => out.released.push(name.clone()),
            Err(why) => out.left.push(format!("{name}: {why}")),
        }
        if !dropped {
            out.held.push(name);
        }
    }
    out.released.sort();
    out.left.sort();
    out.held.sort();
    out
}

/// Removes [`FINALIZER`] from `policy`, keeping any other (a merge patch
/// pinned to the resourceVersion read; re-read on a conflict).
async fn drop_finalizer(api: &Api<FirewallPolicy>, policy: &FirewallPolicy) -> Result<(), String> {
    let name = policy.name_any();
    let mut current = policy.clone();
    for _ in 0..3 {
        let keep: Vec<&String> = current
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .collect();
        if keep.len() == current.finalizers().len() {
            return Ok(());
        }
        let patch = json!({"metadata": {
            "finalizers": keep,
            "resourceVersion": current.meta().resource_version,
        }});
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                match api.get_opt(&name).await.map_err(|e| e.to_string())? {
                    Some(p) => current = p,
                    None => return Ok(()),
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!(
        "FirewallPolicy {name} kept changing (three conflicts)"
    ))
}
