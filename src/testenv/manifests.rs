//! Applying YAML manifests to the environment's apiserver.

use super::{Error, Result, TestEnv};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::discovery::{self, Scope};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;
use std::time::Duration;

/// Field manager of everything applied here.
const FIELD_MANAGER: &str = "palisade-testenv";
/// How long a CRD may take to become Established (and its kind discoverable).
const CRD_TIMEOUT: Duration = Duration::from_secs(30);

/// Splits a multi-document YAML string into its non-empty documents.
fn documents(yaml: &str) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| Error::Manifest(format!("parsing YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(value)
            .map_err(|e| Error::Manifest(format!("converting YAML: {e}")))?;
        out.push(json);
    }
    Ok(out)
}

fn gvk_of(obj: &DynamicObject) -> Result<GroupVersionKind> {
    let types = obj
        .types
        .as_ref()
        .ok_or_else(|| Error::Manifest(format!("{} has no apiVersion/kind", obj.name_any())))?;
    let (group, version) = match types.api_version.split_once('/') {
        Some((group, version)) => (group, version),
        None => ("", types.api_version.as_str()),
    };
    Ok(GroupVersionKind::gvk(group, version, &types.kind))
}

async fn wait_established(client: &Client, name: &str) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    tokio::time::timeout(
        CRD_TIMEOUT,
        await_condition(crds, name, conditions::is_crd_established()),
    )
    .await
    .map_err(|_| Error::Timeout {
        what: format!("CRD {name} to become Established"),
        after: CRD_TIMEOUT,
    })?
    .map_err(|e| Error::Manifest(format!("watching CRD {name}: {e}")))?;
    Ok(())
}

impl TestEnv {
    /// Server-side applies every CustomResourceDefinition in `yaml` (a
    /// multi-document string such as `crds/palisade.dev.yaml`) and waits
    /// until each is `Established`. Returns their names.
    pub async fn install_crds(&self, yaml: &str) -> Result<Vec<String>> {
        let client = self.client().await?;
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let mut names = Vec::new();
        for doc in documents(yaml)? {
            let crd: CustomResourceDefinition = serde_json::from_value(doc)
                .map_err(|e| Error::Manifest(format!("not a CRD: {e}")))?;
            let name = crd.name_any();
            crds.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&crd),
            )
            .await
            .map_err(Error::kube(format!("applying CRD {name}")))?;
            names.push(name);
        }
        for name in &names {
            wait_established(&client, name).await?;
        }
        Ok(names)
    }

    /// Server-side applies every object in `yaml` (multi-document), in
    /// order, finding each kind through discovery. Namespaced objects without
    /// a namespace go to `default`. A CRD is waited on until Established, so
    /// objects of its kind may follow it in the same string. Returns the
    /// objects as the apiserver stored them.
    pub async fn apply_yaml(&self, yaml: &str) -> Result<Vec<DynamicObject>> {
        let client = self.client().await?;
        let mut applied = Vec::new();
        for doc in documents(yaml)? {
            let obj: DynamicObject = serde_json::from_value(doc)
                .map_err(|e| Error::Manifest(format!("not a Kubernetes object: {e}")))?;
            let gvk = gvk_of(&obj)?;
            let name = obj.name_any();
            let (resource, caps) = discover(&client, &gvk).await?;
            let api: Api<DynamicObject> = match caps.scope {
                Scope::Cluster => Api::all_with(client.clone(), &resource),
                Scope::Namespaced => {
                    let ns = obj.namespace().unwrap_or_else(|| "default".to_string());
                    Api::namespaced_with(client.clone(), &ns, &resource)
                }
            };
            let stored = api
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&obj),
                )
                .await
                .map_err(Error::kube(format!("applying {} {name}", gvk.kind)))?;
            if gvk.group == "apiextensions.k8s.io" && gvk.kind == "CustomResourceDefinition" {
                wait_established(&client, &name).await?;
            }
            applied.push(stored);
        }
        Ok(applied)
    }
}

/// Discovery of one kind, retried briefly: a kind whose CRD was just
/// established can take a moment to appear.
async fn discover(
    client: &Client,
    gvk: &GroupVersionKind,
) -> Result<(kube::discovery::ApiResource, discovery::ApiCapabilities)> {
    let deadline = tokio::time::Instant::now() + CRD_TIMEOUT;
    loop {
        match discovery::pinned_kind(client, gvk).await {
            Ok(found) => return Ok(found),
            Err(err) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(?gvk, %err, "kind not discoverable yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => {
                return Err(Error::kube(format!(
                    "discovering {}/{} {}",
                    gvk.group, gvk.version, gvk.kind
                ))(err));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn documents_skip_empty_ones() {
        let docs = documents("# header\n---\na: 1\n---\n---\nb: 2\n").unwrap();
        assert_eq!(docs.len(), 2);
    }
}
