//! Optional control-plane components, for the tests that need them:
//! kube-controller-manager (garbage collection, service-account tokens,
//! Deployments → ReplicaSets → Pods, …) and kube-scheduler.

use super::env::reserve_port;
use super::process::{Component, testbin};
use super::{Error, Result, TestEnv};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use std::time::{Duration, Instant};

/// How long a component may take to take its leader Lease.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

impl TestEnv {
    /// Starts kube-controller-manager (once; later calls return at once) and
    /// waits until it holds its leader Lease. The node-lifecycle controller
    /// is off: simulated nodes have no kubelet, and it would taint them
    /// unreachable. It signs CSRs with the environment's CA.
    pub async fn start_controller_manager(&self) -> Result<()> {
        let pki = self.pki();
        let args = |port: u16| {
            let mut args = self.component_kubeconfig_args(port, "kube-controller-manager");
            args.extend([
                "--controllers=*,-nodelifecycle".to_string(),
                format!(
                    "--service-account-private-key-file={}",
                    pki.dir.join("sa.key").display()
                ),
                format!("--root-ca-file={}", pki.ca_cert.display()),
                format!("--cluster-signing-cert-file={}", pki.ca_cert.display()),
                format!("--cluster-signing-key-file={}", pki.ca_key_file.display()),
            ]);
            args
        };
        self.start_leader_elected("kube-controller-manager", args)
            .await
    }

    /// Starts kube-scheduler (once; later calls return at once) and waits
    /// until it holds its leader Lease. Pods are then bound to Nodes — to
    /// simulated ones too, though nothing runs them.
    pub async fn start_scheduler(&self) -> Result<()> {
        let args = |port: u16| self.component_kubeconfig_args(port, "kube-scheduler");
        self.start_leader_elected("kube-scheduler", args).await
    }

    fn component_kubeconfig_args(&self, port: u16, name: &str) -> Vec<String> {
        let kubeconfig = self.kubeconfig_path().display().to_string();
        vec![
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--bind-address=127.0.0.1".to_string(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", self.dir().join(name).display()),
            "--leader-elect=true".to_string(),
            // Their own HTTPS port needs no front-proxy client CA.
            "--authentication-skip-lookup=true".to_string(),
        ]
    }

    async fn start_leader_elected(
        &self,
        name: &str,
        args: impl FnOnce(u16) -> Vec<String>,
    ) -> Result<()> {
        let program = testbin(name)?;
        let pid = {
            let mut components = self.components();
            if components.iter().any(|c| c.name == name) {
                return Ok(());
            }
            let (reserved, port) = reserve_port()?;
            drop(reserved);
            let component = Component::spawn(name, &program, &args(port), self.dir())?;
            let pid = component.pid();
            components.push(component);
            pid
        };
        let leases: Api<Lease> = Api::namespaced(self.client().await?, "kube-system");
        let started = Instant::now();
        loop {
            let held = leases
                .get_opt(name)
                .await
                .ok()
                .flatten()
                .and_then(|lease| lease.spec)
                .and_then(|spec| spec.holder_identity)
                .is_some_and(|holder| !holder.is_empty());
            if held {
                eprintln!(
                    "palisade testenv: {name} ready in {:.2}s",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            let failure = {
                let mut components = self.components();
                components
                    .iter_mut()
                    .find(|c| c.pid() == pid)
                    .and_then(|c| {
                        c.exited()
                            .map(|status| c.failed(format!("exited ({status})")))
                    })
            };
            if let Some(err) = failure {
                self.components().retain(|c| c.pid() != pid);
                return Err(err);
            }
            if started.elapsed() > READY_TIMEOUT {
                let err = self
                    .components()
                    .iter()
                    .find(|c| c.pid() == pid)
                    .map(|c| c.failed(format!("no leader Lease after {READY_TIMEOUT:?}")))
                    .unwrap_or(Error::Timeout {
                        what: format!("{name} leader Lease"),
                        after: READY_TIMEOUT,
                    });
                self.components().retain(|c| c.pid() != pid);
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
