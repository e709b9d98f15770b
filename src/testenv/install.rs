//! Installing Palisade the way users do, for tests and the demo: the Helm
//! chart into the environment's apiserver, and the identities the chart
//! gives the controller and the agents.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, PostParams};

use super::{Error, Result, TestEnv, testbin};

/// The chart in this checkout.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/palisade")
}

impl TestEnv {
    /// Runs `helm` against this environment with `args`; returns stdout.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(testbin("helm")?)
            .env("KUBECONFIG", self.kubeconfig_path())
            .env("HELM_CACHE_HOME", self.dir().join("helm-cache"))
            .env("HELM_CONFIG_HOME", self.dir().join("helm-config"))
            .args(args)
            .output()
            .map_err(|source| Error::Io {
                context: "running helm".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(Error::Command {
                command: format!("helm {}", args.join(" ")),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates `namespace` (if missing) and `helm install`s the chart there
    /// as `release`, with `--set` values.
    pub async fn helm_install(
        &self,
        release: &str,
        namespace: &str,
        values: &[&str],
    ) -> Result<()> {
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}}))
                .map_err(|e| Error::Manifest(e.to_string()))?;
        let namespaces = Api::<Namespace>::all(self.client().await?);
        if namespaces
            .get_opt(namespace)
            .await
            .map_err(Error::kube("reading the namespace"))?
            .is_none()
        {
            namespaces
                .create(&PostParams::default(), &ns)
                .await
                .map_err(Error::kube("creating the namespace"))?;
        }
        let chart = chart_dir();
        let chart = chart.to_string_lossy();
        let mut args = vec!["install", release, chart.as_ref(), "--namespace", namespace];
        for v in values {
            args.extend(["--set", v]);
        }
        self.helm(&args).map(|_| ())
    }

    /// A kubeconfig for the agent ServiceAccount `namespace/sa` as its
    /// DaemonSet pod on `node` gets it: a Pod bound to the node is created
    /// (nothing runs it) and the token is bound to that Pod, so the
    /// apiserver knows which node the agent speaks for.
    pub async fn agent_pod_kubeconfig(
        &self,
        namespace: &str,
        sa: &str,
        node: &str,
    ) -> Result<PathBuf> {
        let name = format!("{sa}-{node}");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node, "serviceAccountName": sa,
                     "containers": [{"name": "agent", "image": "palisade/agent:local"}]}
        }))
        .map_err(|e| Error::Manifest(e.to_string()))?;
        Api::<Pod>::namespaced(self.client().await?, namespace)
            .create(&PostParams::default(), &pod)
            .await
            .map_err(Error::kube(format!("creating Pod {namespace}/{name}")))?;
        self.pod_service_account_kubeconfig(namespace, sa, &name)
            .await
    }
}
