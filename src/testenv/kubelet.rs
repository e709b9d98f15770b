//! [`KubeletNode`]: a real Kubernetes node — containerd and the kubelet —
//! inside a [`SimHost`]'s network namespace, registered with the
//! environment's apiserver, backed by a moto EC2 instance
//! (`spec.providerID`), running real pods from locally built images.
//!
//! The node's processes run in a private mount namespace set up by
//! `hack/e2e/node.sh`, which keeps the kubelet from changing the machine
//! (host-wide sysctls, `/var/lib/kubelet`, `/run`, …; see that script). The
//! node's cgroup root (`/palisade-<pid>-<node>` in every hierarchy) is
//! removed when the node is dropped, and by the watchdog if the test process
//! dies first.
//!
//! Pods reach the apiserver at the `kubernetes` Service address
//! (`10.0.0.1:443`, inside the node's namespace) and the kubelet at
//! `127.0.0.1:<port>`: both are forwarded to the apiserver on the test
//! process's loopback, as `10.0.0.1:<moto port>` is to moto. Host-network
//! pods (the agent) share the node's namespace; other pods (the controller)
//! get an address from the node's own pod range (`10.244.<k>.0/24`) on a
//! bridge whose gateway is the node, so they reach those forwarders too, but
//! not other nodes' pods (there is no pod network between nodes).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams};

use super::net::{SimHost, SimNet};
use super::process::{log_tail, testbin};
use super::{Error, Result, TestEnv, netns, reaper};

/// The `kubernetes` Service's address as pods see it.
const SERVICE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// How long a node may take from start to Ready (image imports included).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A real kubelet + containerd node; stopped, and its cgroups removed, when
/// dropped.
pub struct KubeletNode {
    // Field order is drop order: the holder and the host go first.
    holder: Option<Child>,
    host: SimHost,
    name: String,
    provider_id: String,
    dir: PathBuf,
    cgroup_root: String,
}

impl std::fmt::Debug for KubeletNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletNode")
            .field("name", &self.name)
            .field("provider_id", &self.provider_id)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// `hack/e2e/node.sh` of this checkout.
fn node_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/e2e/node.sh")
}

impl KubeletNode {
    /// Starts a node named `name` with `labels` on `net`, imports `images`
    /// (docker archives) into its containerd, and waits until the Node is
    /// Ready (its start-up taint lifted, as the node-lifecycle controller
    /// would). Needs an environment started with
    /// [`super::StartOptions::real_pods`] and kube-controller-manager and
    /// kube-scheduler running.
    pub async fn start(
        env: &TestEnv,
        net: &SimNet,
        name: &str,
        labels: &[(&str, &str)],
        images: &[PathBuf],
    ) -> Result<KubeletNode> {
        let started = Instant::now();
        let kubelet = testbin("kubelet")?;
        let host = net.add_host(name)?;
        host.forward_loopback(env.apiserver_port())?;
        netns::ip(&[
            "-n",
            host.netns(),
            "addr",
            "add",
            &format!("{SERVICE_ADDR}/32"),
            "dev",
            "lo",
        ])?;
        host.forward_to_loopback(
            SocketAddr::new(SERVICE_ADDR.into(), 443),
            env.apiserver_port(),
        )?;
        host.forward_to_loopback(
            SocketAddr::new(SERVICE_ADDR.into(), env.moto_port()),
            env.moto_port(),
        )?;
        static NEXT_POD_RANGE: AtomicU8 = AtomicU8::new(1);
        let pod_cidr = format!(
            "10.244.{}.0/24",
            NEXT_POD_RANGE.fetch_add(1, Ordering::Relaxed)
        );
        let ec2 = env.ec2_client();
        let instance = env
            .sim_cloud()
            .await?
            .run_instance(&ec2, name, host.ipv4())
            .await?;
        let provider_id = format!(
            "aws:///{}/{}",
            instance.availability_zone, instance.instance_id
        );

        let dir = env.dir().join(format!("node-{name}"));
        std::fs::create_dir_all(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let cgroup_root = format!("/{}{name}", reaper::netns_prefix());
        reaper::watch_cgroup(&cgroup_root);
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let images = images
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" ");
        let node_env: BTreeMap<&str, String> = [
            ("NODE", name.to_string()),
            ("NODE_IP", host.ipv4().to_string()),
            ("POD_CIDR", pod_cidr),
            ("PROVIDER_ID", provider_id.clone()),
            ("LABELS", labels),
            ("CGROUP_ROOT", cgroup_root.clone()),
            (
                "KUBECONFIG_FILE",
                env.kubeconfig_path().display().to_string(),
            ),
            ("KUBELET", kubelet.display().to_string()),
            ("IMAGES", images),
        ]
        .into_iter()
        .collect();
        let text: String = node_env
            .iter()
            .map(|(k, v)| format!("{k}='{v}'\n"))
            .collect();
        std::fs::write(dir.join("node.env"), text)
            .map_err(Error::io(format!("writing {}/node.env", dir.display())))?;

        let log =
            std::fs::File::create(dir.join("node.log")).map_err(Error::io("creating node.log"))?;
        let err = log.try_clone().map_err(Error::io("duplicating node.log"))?;
        reaper::ensure_started();
        let holder = Command::new("nsenter")
            .arg(format!("--net={}", netns::handle(host.netns())))
            .args([
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "bash",
            ])
            .arg(node_script())
            .arg(&dir)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(Error::io("starting hack/e2e/node.sh"))?;
        reaper::watch_pid(holder.id());
        let mut node = KubeletNode {
            holder: Some(holder),
            host,
            name: name.to_string(),
            provider_id,
            dir,
            cgroup_root,
        };
        node.wait_ready(env, started).await?;
        Ok(node)
    }

    async fn wait_ready(&mut self, env: &TestEnv, started: Instant) -> Result<()> {
        let nodes: Api<Node> = Api::all(env.client().await?);
        loop {
            let ready = nodes
                .get_opt(&self.name)
                .await
                .ok()
                .flatten()
                .and_then(|n| n.status)
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if ready {
                break;
            }
            if let Some(holder) = self.holder.as_mut()
                && let Ok(Some(status)) = holder.try_wait()
            {
                return Err(self.failed(format!("node.sh exited ({status})")));
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(self.failed(format!("not Ready after {READY_TIMEOUT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Admission taints every new Node `not-ready:NoSchedule`; the
        // node-lifecycle controller (off in this environment) would lift it.
        let untaint = serde_json::json!({ "spec": { "taints": null } });
        nodes
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&untaint))
            .await
            .map_err(Error::kube(format!(
                "lifting the taints of Node {}",
                self.name
            )))?;
        eprintln!(
            "palisade testenv: node {} Ready in {:.2}s",
            self.name,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn failed(&self, reason: String) -> Error {
        let tail = ["node.log", "containerd.log", "kubelet.log"]
            .iter()
            .map(|f| format!("--- {f} ---\n{}", log_tail(&self.dir.join(f), 15)))
            .collect::<Vec<_>>()
            .join("\n");
        Error::ComponentStart {
            component: format!("node {}", self.name),
            reason,
            log: self.dir.clone(),
            tail,
        }
    }

    /// The host (network namespace) the node runs in.
    pub fn host(&self) -> &SimHost {
        &self.host
    }

    /// The Node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `aws:///<zone>/<instance id>`.
    pub fn provider_id(&self) -> &str {
        &self.provider_id
    }

    /// Where the node's configuration and logs (`kubelet.log`,
    /// `containerd.log`, `node.log`) are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// moto's EC2 endpoint as this node's pods reach it.
    pub fn ec2_endpoint_for_pods(env: &TestEnv) -> String {
        format!("http://{SERVICE_ADDR}:{}", env.moto_port())
    }

    /// The node's cgroup root, in every hierarchy.
    pub fn cgroup_root(&self) -> &str {
        &self.cgroup_root
    }
}

impl Drop for KubeletNode {
    fn drop(&mut self) {
        let started = Instant::now();
        if let Some(mut holder) = self.holder.take() {
            let _ = holder.kill();
            let _ = holder.wait();
            reaper::forget_pid(holder.id());
        }
        // The node's processes (containerd, shims, the kubelet,
        // host-network pods) live in its network namespace; other pods in
        // their own, but all in its cgroup (killed there).
        netns::kill_all(self.host.netns());
        remove_cgroup(&self.cgroup_root, Duration::from_secs(10));
        eprintln!(
            "palisade testenv: node {} stopped in {:.2}s",
            self.name,
            started.elapsed().as_secs_f64()
        );
    }
}

/// `SIGKILL`s every process in cgroup directory `dir` and below: pods with
/// their own network namespace are not found by the node's.
fn kill_cgroup_tasks(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            kill_cgroup_tasks(&path);
        } else if entry.file_name() == "cgroup.procs" {
            for pid in std::fs::read_to_string(&path)
                .unwrap_or_default()
                .split_whitespace()
            {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
    }
}

/// Kills what is left in cgroup `root` and removes it and everything below
/// it from every hierarchy, retrying while killed processes are leaving.
fn remove_cgroup(root: &str, patience: Duration) {
    let started = Instant::now();
    loop {
        let mut left = false;
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                let path = h.path().join(root.trim_start_matches('/'));
                if !path.is_dir() {
                    continue;
                }
                kill_cgroup_tasks(&path);
                let _ = Command::new("find")
                    .arg(&path)
                    .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                    .stderr(Stdio::null())
                    .status();
                left |= path.is_dir();
            }
        }
        if !left || started.elapsed() > patience {
            if left {
                eprintln!("palisade testenv: cgroup {root} still busy; the watchdog retries");
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
