//! [`SimNode`]: a simulated host that is also a Kubernetes Node backed by an
//! EC2 instance in moto.

use super::env::{client_from_kubeconfig, ec2_client_for};
use super::net::{SimHost, SimNet};
use super::{Error, Result, TestEnv, block_on};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, api::ObjectMeta};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A [`SimHost`] plus a `Node` object for it and the moto EC2 instance it
/// stands for.
///
/// The Node carries the given labels plus the well-known ones
/// (`kubernetes.io/hostname`, `kubernetes.io/os`,
/// `topology.kubernetes.io/zone`, `node.kubernetes.io/instance-type`),
/// `spec.providerID = aws:///<az>/<instance-id>`, and in its status the
/// host's IPv4 and IPv6 as `InternalIP`, its name as `Hostname`,
/// capacity for 110 Pods, and `Ready=True`. The instance's private IP is the host's IPv4.
/// `127.0.0.1:<apiserver port>` inside the host forwards to the apiserver,
/// so an agent started with [`SimHost::command`] uses the env's kubeconfigs
/// unchanged.
///
/// Node names are cluster-wide: tests sharing an environment must use
/// distinct names. Dropping the `SimNode` deletes the Node, terminates the
/// instance (best effort) and then the host.
pub struct SimNode {
    host: SimHost,
    name: String,
    instance_id: String,
    eni_id: String,
    provider_id: String,
    cleanup: Option<Cleanup>,
}

struct Cleanup {
    kubeconfig: PathBuf,
    ec2_endpoint: String,
}

impl std::fmt::Debug for SimNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNode")
            .field("name", &self.name)
            .field("provider_id", &self.provider_id)
            .field("eni_id", &self.eni_id)
            .field("host", &self.host)
            .finish()
    }
}

impl SimNode {
    /// Creates the host on `net`, the instance in moto and the Node object.
    pub async fn create<I, K, V>(
        env: &TestEnv,
        net: &SimNet,
        name: &str,
        labels: I,
    ) -> Result<SimNode>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let host = net.add_host(name)?;
        host.forward_loopback(env.apiserver_port())?;
        let ec2 = env.ec2_client();
        let cloud = env.sim_cloud().await?;
        let instance = cloud.run_instance(&ec2, name, host.ipv4()).await?;
        let provider_id = format!(
            "aws:///{}/{}",
            instance.availability_zone, instance.instance_id
        );
        let node = SimNode {
            host,
            name: name.to_string(),
            instance_id: instance.instance_id,
            eni_id: instance.eni_id,
            provider_id,
            cleanup: Some(Cleanup {
                kubeconfig: env.kubeconfig_path().to_path_buf(),
                ec2_endpoint: env.ec2_endpoint(),
            }),
        };

        let mut all_labels: BTreeMap<String, String> = [
            ("kubernetes.io/hostname", name),
            ("kubernetes.io/os", "linux"),
            ("kubernetes.io/arch", "amd64"),
            (
                "topology.kubernetes.io/zone",
                instance.availability_zone.as_str(),
            ),
            ("node.kubernetes.io/instance-type", "t3.micro"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        all_labels.extend(labels.into_iter().map(|(k, v)| (k.into(), v.into())));
        let object = Node {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(all_labels),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::NodeSpec {
                provider_id: Some(node.provider_id.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let nodes: Api<Node> = Api::all(env.client().await?);
        nodes
            .create(&PostParams::default(), &object)
            .await
            .map_err(Error::kube(format!("creating Node {name}")))?;
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let status = serde_json::json!({
            "status": {
                "addresses": [
                    { "type": "InternalIP", "address": node.host.ipv4().to_string() },
                    { "type": "InternalIP", "address": node.host.ipv6().to_string() },
                    { "type": "Hostname", "address": name },
                ],
                // Room for Pods, so kube-scheduler (when a test runs it)
                // binds Pods to simulated nodes.
                "capacity": { "cpu": "4", "memory": "8Gi", "pods": "110" },
                "allocatable": { "cpu": "4", "memory": "8Gi", "pods": "110" },
                "conditions": [{
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "simulated by palisade testenv",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }],
            }
        });
        nodes
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(Error::kube(format!("patching the status of Node {name}")))?;
        // Admission taints every new Node `not-ready:NoSchedule`; the
        // node-lifecycle controller would lift it once the kubelet reports
        // Ready. There is no kubelet and that controller stays off, so lift
        // it here, as for a healthy node.
        let untaint = serde_json::json!({ "spec": { "taints": null } });
        nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(&untaint))
            .await
            .map_err(Error::kube(format!(
                "removing the start-up taint of Node {name}"
            )))?;
        Ok(node)
    }

    /// The simulated host.
    pub fn host(&self) -> &SimHost {
        &self.host
    }

    /// The Node's name (also the host's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The moto instance id (`i-…`).
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The instance's primary network interface (`eni-…`), where the
    /// controller attaches security groups.
    pub fn eni_id(&self) -> &str {
        &self.eni_id
    }

    /// `spec.providerID`: `aws:///<az>/<instance-id>`.
    pub fn provider_id(&self) -> &str {
        &self.provider_id
    }

    /// Deletes the Node and terminates the instance now, reporting errors
    /// (dropping does the same silently).
    pub async fn delete(mut self) -> Result<()> {
        match self.cleanup.take() {
            Some(cleanup) => cleanup.run(&self.name, &self.instance_id).await,
            None => Ok(()),
        }
    }
}

impl Cleanup {
    async fn run(&self, name: &str, instance_id: &str) -> Result<()> {
        let nodes: Api<Node> = Api::all(client_from_kubeconfig(&self.kubeconfig).await?);
        let deleted = nodes.delete(name, &DeleteParams::default()).await;
        let ec2 = ec2_client_for(&self.ec2_endpoint, false);
        ec2.terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(Error::ec2("TerminateInstances"))?;
        match deleted {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(err) => Err(Error::kube(format!("deleting Node {name}"))(err)),
        }
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        if let Some(cleanup) = self.cleanup.take() {
            let _ = block_on(cleanup.run(&self.name, &self.instance_id));
        }
    }
}
