//! [`TestEnv`]: etcd, kube-apiserver and moto on loopback.

use super::cloud::SimCloud;
use super::pki::{CertFiles, Pki};
use super::process::{Component, moto_server, testbin};
use super::{Error, Result, block_on, reaper};
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long the components may take to become ready: 60 s, or
/// `PALISADE_TESTENV_START_SECONDS` (a machine shared with other builds
/// and benches can take longer).
fn start_timeout() -> Duration {
    std::env::var("PALISADE_TESTENV_START_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs)
}
/// Start attempts when a picked port was taken in the meantime.
const START_ATTEMPTS: usize = 3;
/// The `kubernetes` Service's range and address (first of the range).
const SERVICE_RANGE: &str = "10.0.0.0/24";
const SERVICE_IP: &str = "10.0.0.1";
/// Issuer (and audience) of service-account tokens.
const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Dummy AWS credentials and region moto accepts.
const AWS_ACCESS_KEY_ID: &str = "testing";
const AWS_SECRET_ACCESS_KEY: &str = "testing";
/// The apiserver's audit log, in the environment's dir.
const AUDIT_LOG: &str = "audit.log";
/// The region every EC2 client of the environment uses.
pub const AWS_REGION: &str = "us-east-1";

/// How [`TestEnv::start_with`] sets the environment up.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// Pods will run on real kubelets ([`super::KubeletNode`]): the
    /// ServiceAccount admission plugin stays on, so pods get their tokens
    /// (start kube-controller-manager too: it creates the `default`
    /// ServiceAccounts).
    pub real_pods: bool,
    /// An audit policy (YAML): the apiserver then writes its audit log,
    /// one JSON event a line, to [`TestEnv::audit_log_path`]. Benchmarks
    /// count requests there, by verb, resource and user, as the apiserver
    /// saw them.
    pub audit_policy: Option<&'static str>,
}

/// A running etcd + kube-apiserver + moto EC2 server on loopback.
///
/// Start one with [`TestEnv::start`] (stopped and its temp dir removed when
/// dropped) or share one across a test binary with [`TestEnv::shared`].
/// Clients are made fresh per call ([`TestEnv::client`],
/// [`TestEnv::ec2_client`]) because every `#[tokio::test]` has its own
/// runtime and a connection pool bound to another, finished runtime breaks.
pub struct TestEnv {
    // Field order is drop order: components stop before the dir goes.
    components: Mutex<Vec<Component>>,
    pki: Pki,
    apiserver_port: u16,
    moto_port: u16,
    kubeconfig: PathBuf,
    cloud: tokio::sync::OnceCell<SimCloud>,
    minted: AtomicU32,
    started_in: Duration,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for TestEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestEnv")
            .field("apiserver", &self.apiserver_url())
            .field("moto", &self.ec2_endpoint())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// Reserves a free loopback port; the listener holds it until dropped, so
/// ports reserved together are distinct.
pub(crate) fn reserve_port() -> Result<(TcpListener, u16)> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(Error::io("reserving a loopback port"))?;
    let port = listener
        .local_addr()
        .map_err(Error::io("reading a reserved port"))?
        .port();
    Ok((listener, port))
}

/// Kubeconfig credentials.
pub(crate) enum Auth<'a> {
    Cert(&'a CertFiles),
    Token(&'a str),
}

/// Writes a one-context kubeconfig for `user` at `path`.
pub(crate) fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    user: &str,
    auth: Auth<'_>,
) -> Result<()> {
    let credentials = match auth {
        Auth::Cert(files) => serde_json::json!({
            "client-certificate": files.cert,
            "client-key": files.key,
        }),
        Auth::Token(token) => serde_json::json!({ "token": token }),
    };
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "palisade-testenv", "cluster": { "server": server, "certificate-authority": ca } }],
        "users": [{ "name": user, "user": credentials }],
        "contexts": [{ "name": "palisade-testenv", "context": { "cluster": "palisade-testenv", "user": user } }],
        "current-context": "palisade-testenv",
    });
    let yaml = serde_yaml::to_string(&doc)
        .map_err(|e| Error::Manifest(format!("serialising a kubeconfig: {e}")))?;
    std::fs::write(path, yaml).map_err(Error::io(format!("writing {}", path.display())))
}

/// A fresh client for the kubeconfig at `path`.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    super::install_crypto_provider();
    let kubeconfig = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
        path: path.to_path_buf(),
        source,
    })?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| Error::Kubeconfig {
            path: path.to_path_buf(),
            source,
        })?;
    Client::try_from(config).map_err(Error::kube(format!("client for {}", path.display())))
}

/// An EC2 client for moto at `endpoint`.
/// Palisade's own EC2 layer ([`crate::cloud::AwsEc2`]) against `endpoint`
/// (moto, or a fault proxy in front of it), with `retry`: what the
/// controller uses, as tests and benchmarks run it in-process.
pub fn aws_ec2_for(endpoint: &str, retry: crate::cloud::RetryPolicy) -> crate::cloud::AwsEc2 {
    super::install_crypto_provider();
    let config = aws_config::SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(AWS_REGION))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::SharedCredentialsProvider::new(
            Credentials::new(
                AWS_ACCESS_KEY_ID,
                AWS_SECRET_ACCESS_KEY,
                None,
                None,
                "palisade-testenv",
            ),
        ))
        .build();
    crate::cloud::AwsEc2::from_sdk_config(&config, retry)
}

pub(crate) fn ec2_client_for(endpoint: &str, retries: bool) -> aws_sdk_ec2::Client {
    super::install_crypto_provider();
    let mut config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new(AWS_REGION))
        .credentials_provider(Credentials::new(
            AWS_ACCESS_KEY_ID,
            AWS_SECRET_ACCESS_KEY,
            None,
            None,
            "palisade-testenv",
        ));
    if !retries {
        config = config.retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled());
    }
    aws_sdk_ec2::Client::from_conf(config.build())
}

impl TestEnv {
    /// The environment shared by every test of this test binary, started on
    /// first use (synchronously, outside any tokio runtime) and stopped by
    /// the watchdog when the process exits. A failed start is reported to
    /// every caller.
    pub fn shared() -> Result<&'static TestEnv> {
        static SHARED: OnceLock<std::result::Result<TestEnv, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                TestEnv::start().map_err(|err| {
                    // Once, readable: callers' `unwrap` shows only Debug.
                    eprintln!("palisade testenv: start-up failed: {err}");
                    err.to_string()
                })
            })
            .as_ref()
            .map_err(|e| Error::SharedStartFailed(e.clone()))
    }

    /// Starts a private environment: etcd, kube-apiserver and moto on random
    /// free loopback ports, blocking until the apiserver's `/readyz` and
    /// moto answer. Prints how long that took. Dropping it stops everything
    /// and removes its temp dir.
    pub fn start() -> Result<TestEnv> {
        Self::start_with(StartOptions::default())
    }

    /// [`TestEnv::start`] with `options`.
    pub fn start_with(options: StartOptions) -> Result<TestEnv> {
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            match Self::start_once(started, options) {
                Ok(env) => {
                    eprintln!(
                        "palisade testenv: etcd + kube-apiserver + moto ready in {:.2}s \
                         (apiserver {}, moto {}, kubeconfig {})",
                        env.started_in.as_secs_f64(),
                        env.apiserver_url(),
                        env.ec2_endpoint(),
                        env.kubeconfig.display(),
                    );
                    return Ok(env);
                }
                Err(err)
                    if attempt < START_ATTEMPTS
                        && err.to_string().contains("address already in use") =>
                {
                    eprintln!("palisade testenv: a port was taken meanwhile, retrying: {err}");
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    fn start_once(started: Instant, options: StartOptions) -> Result<TestEnv> {
        let etcd_bin = testbin("etcd")?;
        let apiserver_bin = testbin("kube-apiserver")?;
        let moto_bin = moto_server()?;

        reaper::ensure_started();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}{}-", reaper::DIR_PREFIX, std::process::id()))
            .tempdir()
            .map_err(Error::io("creating the environment's temp dir"))?;
        reaper::watch_dir(dir.path());
        let root = dir.path();

        let pki = Pki::new(&root.join("pki"))?;
        let serving = pki.serving_cert(SERVICE_IP)?;
        let admin = pki.client_cert("admin", "palisade-admin", &["system:masters"])?;
        let sa = pki.service_account_keys()?;

        let reserved = [
            reserve_port()?,
            reserve_port()?,
            reserve_port()?,
            reserve_port()?,
        ];
        let [etcd_port, peer_port, apiserver_port, moto_port] =
            reserved.each_ref().map(|(_, port)| *port);
        drop(reserved);

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args = vec![
            "--name=default".to_string(),
            format!("--data-dir={}", root.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync=true".to_string(),
        ];
        let mut apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=127.0.0.1".to_string(),
            format!("--secure-port={apiserver_port}"),
            format!("--cert-dir={}", pki.dir.display()),
            format!("--tls-cert-file={}", serving.cert.display()),
            format!("--tls-private-key-file={}", serving.key.display()),
            format!("--client-ca-file={}", pki.ca_cert.display()),
            "--authorization-mode=RBAC".to_string(),
            format!("--service-account-issuer={SA_ISSUER}"),
            format!("--service-account-key-file={}", sa.cert.display()),
            format!("--service-account-signing-key-file={}", sa.key.display()),
            format!("--service-cluster-ip-range={SERVICE_RANGE}"),
            "--allow-privileged=true".to_string(),
            // Its bootstrap post-start hook is the slowest part of start-up.
            "--enable-priority-and-fairness=false".to_string(),
            "--profiling=false".to_string(),
            // The endpoint reconcilers refuse a loopback advertise address;
            // nothing in-cluster needs the `kubernetes` Service's endpoints.
            "--endpoint-reconciler-type=none".to_string(),
        ];
        if !options.real_pods {
            // As envtest: without kube-controller-manager nobody creates the
            // `default` ServiceAccount, so this plugin would reject every Pod.
            apiserver_args.push("--disable-admission-plugins=ServiceAccount".to_string());
        }
        if let Some(policy) = options.audit_policy {
            let path = root.join("audit-policy.yaml");
            std::fs::write(&path, policy)
                .map_err(Error::io(format!("writing {}", path.display())))?;
            apiserver_args.extend([
                format!("--audit-policy-file={}", path.display()),
                format!("--audit-log-path={}", root.join(AUDIT_LOG).display()),
                "--audit-log-format=json".to_string(),
                // Buffered: the log costs the apiserver little at 1,000s of
                // requests a second, and no request waits on the disk.
                "--audit-log-mode=batch".to_string(),
                "--audit-log-batch-max-wait=1s".to_string(),
            ]);
        }
        let moto_args = vec![
            "-H".to_string(),
            "127.0.0.1".to_string(),
            "-p".to_string(),
            moto_port.to_string(),
        ];

        let mut components = vec![
            Component::spawn("etcd", &etcd_bin, &etcd_args, root)?,
            Component::spawn("moto", &moto_bin, &moto_args, root)?,
            Component::spawn("kube-apiserver", &apiserver_bin, &apiserver_args, root)?,
        ];

        let kubeconfig = root.join("admin.kubeconfig");
        let server = format!("https://127.0.0.1:{apiserver_port}");
        write_kubeconfig(
            &kubeconfig,
            &server,
            &pki.ca_cert,
            "palisade-admin",
            Auth::Cert(&admin),
        )?;

        let moto_url = format!("http://127.0.0.1:{moto_port}");
        wait_ready(&mut components, &kubeconfig, &moto_url)?;

        Ok(TestEnv {
            components: Mutex::new(components),
            pki,
            apiserver_port,
            moto_port,
            kubeconfig,
            cloud: tokio::sync::OnceCell::new(),
            minted: AtomicU32::new(0),
            started_in: started.elapsed(),
            dir,
        })
    }

    /// How long start-up took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The environment's temp dir (logs, PKI, kubeconfigs, etcd data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The apiserver's audit log (written only when started with
    /// [`StartOptions::audit_policy`]).
    pub fn audit_log_path(&self) -> PathBuf {
        self.dir.path().join(AUDIT_LOG)
    }

    /// The log file of a component (`etcd`, `kube-apiserver`, `moto`).
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.dir.path().join(format!("{component}.log"))
    }

    pub(crate) fn components(&self) -> MutexGuard<'_, Vec<Component>> {
        match self.components.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub(crate) fn pki(&self) -> &Pki {
        &self.pki
    }

    /// Process ids of the running components, by name (for tests of the
    /// cleanup).
    pub fn component_pids(&self) -> Vec<(String, u32)> {
        self.components()
            .iter()
            .map(|c| (c.name.clone(), c.pid()))
            .collect()
    }

    /// A `kubectl --kubeconfig <admin kubeconfig>` command (the cached
    /// kubectl of the same Kubernetes version); add arguments and run it.
    pub fn kubectl(&self) -> Result<std::process::Command> {
        let mut cmd = std::process::Command::new(testbin("kubectl")?);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        Ok(cmd)
    }

    /// The admin kubeconfig (user `palisade-admin`, group `system:masters`),
    /// usable with `kubectl --kubeconfig`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The apiserver's URL, `https://127.0.0.1:<port>`.
    pub fn apiserver_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    /// The apiserver's port on 127.0.0.1.
    pub fn apiserver_port(&self) -> u16 {
        self.apiserver_port
    }

    /// The CA certificate that signed the apiserver's serving certificate.
    pub fn ca_cert_path(&self) -> &Path {
        &self.pki.ca_cert
    }

    /// A fresh admin client, bound to the calling runtime.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// moto's EC2 endpoint, `http://127.0.0.1:<port>`.
    pub fn ec2_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.moto_port)
    }

    /// moto's port on 127.0.0.1.
    pub fn moto_port(&self) -> u16 {
        self.moto_port
    }

    /// A fresh EC2 client for moto (static dummy credentials, `us-east-1`).
    pub fn ec2_client(&self) -> aws_sdk_ec2::Client {
        ec2_client_for(&self.ec2_endpoint(), true)
    }

    /// The environment variables a child process needs to reach moto with
    /// the AWS SDK: `AWS_ENDPOINT_URL_EC2`, static credentials, the region,
    /// and no instance-metadata lookups.
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL_EC2", self.ec2_endpoint()),
            ("AWS_ACCESS_KEY_ID", AWS_ACCESS_KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", AWS_SECRET_ACCESS_KEY.to_string()),
            ("AWS_REGION", AWS_REGION.to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ]
    }

    /// The VPC, subnet and image simulated nodes' instances use, created in
    /// moto on first call.
    pub async fn sim_cloud(&self) -> Result<&SimCloud> {
        self.cloud
            .get_or_try_init(|| SimCloud::create(self.ec2_client()))
            .await
    }

    /// A group not Palisade's, `name`, in the simulated VPC, with TCP
    /// ingress `rules` (port, IPv4 or IPv6 CIDR, description): what an EKS
    /// node group or the cluster group is to Palisade.
    pub async fn foreign_group(&self, name: &str, rules: &[(i32, &str, &str)]) -> Result<String> {
        use crate::cloud::Ec2;
        use crate::policy::{Direction, PlannedPermission, SgPeer, SgPermission, SgProtocol};
        let invalid =
            |what: &str, e: &dyn std::fmt::Display| Error::Invalid(format!("{what}: {e}"));
        let vpc = self.sim_cloud().await?.vpc_id.clone();
        let id = self
            .ec2_client()
            .create_security_group()
            .group_name(name)
            .description("not Palisade's")
            .vpc_id(&vpc)
            .send()
            .await
            .map_err(|e| {
                invalid(
                    "CreateSecurityGroup",
                    &aws_sdk_ec2::error::DisplayErrorContext(e),
                )
            })?
            .group_id()
            .unwrap_or_default()
            .to_string();
        let mut permissions = Vec::new();
        for (port, cidr, description) in rules {
            let peer = match cidr.parse::<ipnet::IpNet>() {
                Ok(ipnet::IpNet::V4(n)) => SgPeer::Ipv4(n),
                Ok(ipnet::IpNet::V6(n)) => SgPeer::Ipv6(n),
                Err(e) => return Err(invalid(cidr, &e)),
            };
            permissions.push(PlannedPermission {
                permission: SgPermission {
                    protocol: SgProtocol::Tcp,
                    from_port: *port,
                    to_port: *port,
                    peer,
                },
                description: description.to_string(),
                rules: Vec::new(),
            });
        }
        aws_ec2_for(&self.ec2_endpoint(), crate::cloud::RetryPolicy::default())
            .authorize(&id, Direction::Ingress, &permissions, "none")
            .await
            .map_err(|e| invalid("AuthorizeSecurityGroupIngress", &e))?;
        Ok(id)
    }

    fn mint_path(&self, stem: &str) -> PathBuf {
        let n = self.minted.fetch_add(1, Ordering::Relaxed);
        self.dir.path().join(format!("{stem}-{n}.kubeconfig"))
    }

    /// Writes a kubeconfig authenticating as `user` in `groups` with a
    /// client certificate signed by the environment's CA (at most two
    /// groups). Authorization is then whatever RBAC grants that identity.
    pub fn user_kubeconfig(&self, user: &str, groups: &[&str]) -> Result<PathBuf> {
        let path = self.mint_path("user");
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "user".to_string());
        let files = self.pki.client_cert(&stem, user, groups)?;
        write_kubeconfig(
            &path,
            &self.apiserver_url(),
            &self.pki.ca_cert,
            user,
            Auth::Cert(&files),
        )?;
        Ok(path)
    }

    /// A fresh client authenticating as `user` in `groups` (see
    /// [`TestEnv::user_kubeconfig`]).
    pub async fn user_client(&self, user: &str, groups: &[&str]) -> Result<Client> {
        let path = self.user_kubeconfig(user, groups)?;
        client_from_kubeconfig(&path).await
    }

    /// Writes a kubeconfig for ServiceAccount `namespace/name` with a token
    /// from the TokenRequest API (valid 24 h). The ServiceAccount must exist.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        self.issue_service_account_kubeconfig(namespace, name, None)
            .await
    }

    /// A kubeconfig for ServiceAccount `namespace/name` with a token bound to
    /// Pod `namespace/pod`, as a kubelet mounts it: the apiserver adds the
    /// pod's node (`authentication.kubernetes.io/node-name`) to the token's
    /// user info when the pod is bound to one, which admission policies
    /// read. The Pod must exist (it need not run).
    pub async fn pod_service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        pod: &str,
    ) -> Result<PathBuf> {
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.client().await?, namespace);
        let found = pods
            .get(pod)
            .await
            .map_err(Error::kube(format!("reading Pod {namespace}/{pod}")))?;
        let bound = k8s_openapi::api::authentication::v1::BoundObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.into()),
            uid: found.metadata.uid,
        };
        self.issue_service_account_kubeconfig(namespace, name, Some(bound))
            .await
    }

    async fn issue_service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        bound: Option<k8s_openapi::api::authentication::v1::BoundObjectReference>,
    ) -> Result<PathBuf> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client().await?, namespace);
        let pod = bound.as_ref().and_then(|b| b.name.clone());
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![SA_ISSUER.to_string()],
                expiration_seconds: Some(24 * 3600),
                bound_object_ref: bound,
            },
            ..Default::default()
        };
        let issued = api
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .map_err(Error::kube(format!(
                "requesting a token for ServiceAccount {namespace}/{name}"
            )))?;
        let token = issued.status.map(|s| s.token).ok_or_else(|| {
            Error::Invalid(format!(
                "TokenRequest for {namespace}/{name} returned no token"
            ))
        })?;
        let path = match &pod {
            Some(pod) => self.mint_path(&format!("sa-{namespace}-{name}-{pod}")),
            None => self.mint_path(&format!("sa-{namespace}-{name}")),
        };
        let user = format!("system:serviceaccount:{namespace}:{name}");
        write_kubeconfig(
            &path,
            &self.apiserver_url(),
            &self.pki.ca_cert,
            &user,
            Auth::Token(&token),
        )?;
        Ok(path)
    }

    /// A fresh client authenticating as ServiceAccount `namespace/name`.
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> Result<Client> {
        let path = self.service_account_kubeconfig(namespace, name).await?;
        client_from_kubeconfig(&path).await
    }
}

/// Polls until the apiserver's `/readyz` says ok and moto answers
/// DescribeVpcs, failing early (with the log tail) when a component exits.
fn wait_ready(components: &mut [Component], kubeconfig: &Path, moto_url: &str) -> Result<()> {
    let start_timeout = start_timeout();
    let deadline = Instant::now() + start_timeout;
    let ec2 = moto_url.to_string();
    block_on(async move {
        let mut apiserver_ready = false;
        let mut moto_ready = false;
        let mut last_apiserver = String::from("not polled yet");
        let mut last_moto = String::from("not polled yet");
        let moto = ec2_client_for(&ec2, false);
        loop {
            for component in components.iter_mut() {
                if let Some(status) = component.exited() {
                    return Err(component.failed(format!("exited during start-up ({status})")));
                }
            }
            if !apiserver_ready {
                match readyz(kubeconfig).await {
                    Ok(()) => apiserver_ready = true,
                    Err(e) => last_apiserver = e.to_string(),
                }
            }
            if !moto_ready {
                match moto.describe_vpcs().send().await {
                    Ok(_) => moto_ready = true,
                    Err(e) => last_moto = format!("{e:?}"),
                }
            }
            if apiserver_ready && moto_ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                let (name, last) = if apiserver_ready {
                    ("moto", last_moto)
                } else {
                    ("kube-apiserver", last_apiserver)
                };
                let reason = format!("not ready after {start_timeout:?}; last answer: {last}");
                return Err(components
                    .iter()
                    .find(|c| c.name == name)
                    .map(|c| c.failed(reason.clone()))
                    .unwrap_or(Error::Timeout {
                        what: name.to_string(),
                        after: start_timeout,
                    }));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })?
}

async fn readyz(kubeconfig: &Path) -> Result<()> {
    let client = client_from_kubeconfig(kubeconfig).await?;
    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .map_err(|e| Error::Invalid(format!("building /readyz request: {e}")))?;
    let body = client
        .request_text(request)
        .await
        .map_err(Error::kube("GET /readyz"))?;
    if body.trim() == "ok" {
        Ok(())
    } else {
        Err(Error::Invalid(format!("/readyz answered {body:?}")))
    }
}
