//! A real Kubernetes control plane for one test: etcd, kube-apiserver and
//! kube-controller-manager v1.20.2 (built by `cargo xtask kube`), on loopback ports only, with
//! their data, certificates and logs in a directory under `/dev/shm`. There is no kubelet and no
//! scheduler: a test creates its Node ([`KubeCluster::create_node`]), gives its pods a
//! `nodeName`, and plays the kubelet by patching pod status itself.
//!
//! The controller-manager runs the controllers a rollout needs (deployment, replicaset,
//! endpoint, endpointslice, endpointslicemirroring, garbagecollector, namespace, serviceaccount,
//! disruption) and not node lifecycle, so a Node no kubelet heartbeats for stays Ready. Both
//! servers run with `EndpointSliceTerminatingCondition`, so a terminating pod stays in its
//! `EndpointSlice` (served as `discovery.k8s.io/v1beta1` in 1.20) until it is deleted.

use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

use crate::ChildGuard;

/// The release `cargo xtask kube` builds, as `/version` reports it.
pub const KUBE_VERSION: &str = "v1.20.2";
/// The environment variable naming the directory of `kube-apiserver` and
/// `kube-controller-manager` (`cargo xtask test` sets it).
pub const KUBE_BIN_ENV: &str = "DRAINGATE_KUBE_BIN";
/// How long the three processes may take to come up (about 5 s on an idle machine).
const START_TIMEOUT: Duration = Duration::from_mins(1);
/// Lines of each log shown when start-up fails or a test panics.
const LOG_TAIL_LINES: usize = 25;
/// The controllers started: those of Deployments, their pods and Services; no node lifecycle.
const CONTROLLERS: &str = "deployment,replicaset,endpoint,endpointslice,endpointslicemirroring,\
                           garbagecollector,namespace,serviceaccount,disruption";
/// On both servers: terminating pods stay in `EndpointSlices` (as not ready, serving).
const FEATURE_GATES: &str = "EndpointSliceTerminatingCondition=true";
/// Service cluster IPs: a range never routed (RFC 2544's 198.18.0.0/15, the half the network
/// tests do not use).
const SERVICE_CLUSTER_IP_RANGE: &str = "198.19.0.0/16";
/// The address the Node reports, from the benchmarking range.
const NODE_ADDRESS: &str = "198.18.0.1";

/// The user name of `ServiceAccount` `draingate/draingate-gate`, which
/// [`KubeCluster::gate_kubeconfig_path`] authenticates as.
pub const GATE_USER: &str = "system:serviceaccount:draingate:draingate-gate";

/// A running control plane; dropping it stops the three processes and removes its directory.

#[derive(Debug)]
pub struct KubeCluster {
    /// etcd, kube-apiserver, kube-controller-manager, in start order (stopped in reverse).
    processes: Vec<(&'static str, ChildGuard)>,
    /// Everything of this cluster: certificates, keys, token file, kubeconfig, etcd's data,
    /// logs (`<process>.log`).
    dir: PathBuf,
    url: String,
    token: String,
    ca_pem: String,
    ca_der: Vec<u8>,
    kubeconfig: PathBuf,
    /// Whether a panic message already showed the logs' tails (Drop shows them otherwise).
    tails_shown: bool,
}

impl KubeCluster {
    /// Starts etcd, kube-apiserver and kube-controller-manager on free loopback ports and waits
    /// until the API server is ready and the controller-manager works (the `default`
    /// `ServiceAccount` exists). Panics, with the end of each log, when that takes over a minute.
    /// Blocking; may be called from a test's tokio runtime.
    #[must_use]
    pub fn start() -> Self {
        let started = Instant::now();
        let bin = kube_bin();
        let dir = Path::new("/dev/shm").join(format!(
            "draingate-kube-{}-{}",
            std::process::id(),
            crate::next_id()
        ));
        fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("create {}: {err}", dir.display()));
        let (etcd_client, etcd_peer, port) =
            (crate::free_port(), crate::free_port(), crate::free_port());
        let mut cluster = Self {
            processes: Vec::new(),
            url: format!("https://127.0.0.1:{port}"),
            token: format!(
                "draingate-{}-{}",
                std::process::id(),
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
            ),
            ca_pem: String::new(),
            ca_der: Vec::new(),
            tails_shown: false,
            kubeconfig: dir.join("admin.kubeconfig"),
            dir,
        };
        let pki = cluster.write_pki();
        let deadline = started + START_TIMEOUT;

        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        cluster.spawn(
            "etcd",
            Command::new("etcd")
                .arg("--name=draingate")
                .arg(format!("--data-dir={}", cluster.dir.join("etcd").display()))
                .arg(format!("--listen-client-urls={etcd_url}"))
                .arg(format!("--advertise-client-urls={etcd_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=draingate={peer_url}")),
        );
        cluster.wait_until(deadline, "etcd /health", || {
            crate::http_request(("127.0.0.1", etcd_client), "GET", "/health", "")
                .is_ok_and(|(status, body)| status == 200 && body.contains("true"))
        });
        let etcd_ready = started.elapsed();

        let file = |name: &str| pki.join(name).display().to_string();
        cluster.spawn(
            "kube-apiserver",
            Command::new(bin.join("kube-apiserver"))
                .arg(format!("--etcd-servers={etcd_url}"))
                .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
                .arg(format!("--secure-port={port}"))
                .arg("--insecure-port=0")
                .arg(format!("--tls-cert-file={}", file("apiserver.crt")))
                .arg(format!("--tls-private-key-file={}", file("apiserver.key")))
                .arg(format!("--token-auth-file={}", file("tokens.csv")))
                .arg("--authorization-mode=RBAC")
                .arg(format!("--service-account-key-file={}", file("sa.pub")))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    file("sa.key")
                ))
                .arg("--service-account-issuer=https://kubernetes.default.svc")
                .arg(format!(
                    "--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"
                ))
                // No kube-apiserver Endpoints for the `kubernetes` Service: nothing routes there.
                .arg("--endpoint-reconciler-type=none")
                // Pods get no service account token volume: there is no token controller.
                .arg("--disable-admission-plugins=ServiceAccount")
                .arg("--allow-privileged=true")
                .arg(format!("--feature-gates={FEATURE_GATES}"))
                .arg("--v=1"),
        );
        let config = cluster.config();
        cluster.wait_until(deadline, "kube-apiserver /readyz", || {
            block_on(config.clone(), |client| async move {
                // A GET of the non-resource path `/readyz?` (built as a list request); an
                // error unless the server answers 200.
                let request = kube::core::Request::new("/readyz")
                    .list(&ListParams::default())
                    .ok()?;
                client.request_text(request).await.ok()
            }) == Some("ok".to_owned())
        });
        let apiserver_ready = started.elapsed();

        cluster.spawn(
            "kube-controller-manager",
            Command::new(bin.join("kube-controller-manager"))
                .arg(format!("--kubeconfig={}", cluster.kubeconfig.display()))
                .args(["--leader-elect=false", "--port=0", "--secure-port=0"])
                .arg(format!("--controllers={CONTROLLERS}"))
                .arg(format!("--feature-gates={FEATURE_GATES}"))
                .arg("--use-service-account-credentials=false")
                .arg("--v=1"),
        );
        cluster.wait_until(deadline, "the default ServiceAccount", || {
            block_on(config.clone(), |client| async move {
                Api::<ServiceAccount>::namespaced(client, "default")
                    .get_opt("default")
                    .await
                    .ok()
                    .flatten()
                    .is_some()
            })
        });
        eprintln!(
            "kube cluster {} ready in {:.1}s (etcd {:.1}s, kube-apiserver {:.1}s, \
             kube-controller-manager {:.1}s); files in {}",
            cluster.url,
            started.elapsed().as_secs_f64(),
            etcd_ready.as_secs_f64(),
            apiserver_ready.saturating_sub(etcd_ready).as_secs_f64(),
            started
                .elapsed()
                .saturating_sub(apiserver_ready)
                .as_secs_f64(),
            cluster.dir.display()
        );
        cluster
    }

    /// A client of the API server as the admin (group `system:masters`). Call it inside a tokio
    /// runtime: the client spawns its connection task there.
    #[must_use]
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("a kube client for the test cluster")
    }

    /// The API server's URL, `https://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The admin's bearer token.
    #[must_use]
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The PEM of the CA that signed the API server's certificate.
    #[must_use]
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A kubeconfig file for other processes (`KUBECONFIG=...`, `--kubeconfig`): this server,
    /// its CA (by path), the admin's token, namespace `default`.
    #[must_use]
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig like [`Self::kubeconfig_path`]'s, as `ServiceAccount`
    /// `draingate/draingate-gate` ([`GATE_USER`]) instead of the admin: it may do only what RBAC
    /// bindings to that `ServiceAccount` allow.
    #[must_use]
    pub fn gate_kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig-gate")
    }

    /// Creates Node `name` and marks it Ready with address 198.18.0.1, as its kubelet would on
    /// registering. Nothing heartbeats afterwards, and nothing needs to: node lifecycle does not
    /// run. Blocking; may be called from a test's tokio runtime.
    pub fn create_node(&self, name: &str) {
        let name = name.to_owned();
        block_on(self.config(), |client| async move {
            let nodes = Api::<Node>::all(client);
            let node: Node = serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            }))
            .expect("a Node");
            nodes
                .create(&PostParams::default(), &node)
                .await
                .unwrap_or_else(|err| panic!("create node {name}: {err}"));
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let status = json!({"status": {
                "conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "kubelet is posting ready status (played by the test)",
                    "lastHeartbeatTime": now, "lastTransitionTime": now,
                }],
                "addresses": [{"type": "InternalIP", "address": NODE_ADDRESS}],
                "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110"},
                "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110"},
            }});
            nodes
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .unwrap_or_else(|err| panic!("mark node {name} Ready: {err}"));
        });
    }

    fn config(&self) -> kube::Config {
        let mut config = kube::Config::new(
            self.url
                .parse()
                .unwrap_or_else(|err| panic!("API server URL {}: {err}", self.url)),
        );
        config.root_cert = Some(vec![self.ca_der.clone()]);
        config.auth_info =
            serde_json::from_value(json!({"token": self.token})).expect("an AuthInfo with a token");
        config
    }

    /// Writes the CA, the API server's serving certificate and key, the service account key pair,
    /// the token file and the kubeconfig; returns the directory of the first four.
    fn write_pki(&mut self) -> PathBuf {
        let pki = self.dir.join("pki");
        fs::create_dir_all(&pki).unwrap_or_else(|err| panic!("create {}: {err}", pki.display()));
        let now = SystemTime::now();
        let dated = |mut params: CertificateParams| {
            params.not_before = (now - Duration::from_mins(5)).into();
            params.not_after = (now + Duration::from_hours(24)).into();
            params
        };
        let mut ca = dated(CertificateParams::new(Vec::<String>::new()).expect("CA params"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name
            .push(DnType::CommonName, "draingate test cluster CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("a CA key");
        let ca_cert = ca.self_signed(&ca_key).expect("the CA certificate");
        let issuer = Issuer::new(ca, ca_key);

        let mut server = dated(
            CertificateParams::new(
                [
                    "127.0.0.1",
                    "localhost",
                    "198.19.0.1",
                    "kubernetes.default.svc",
                ]
                .map(str::to_owned)
                .to_vec(),
            )
            .expect("server certificate params"),
        );
        server
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().expect("a server key");
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .expect("the server certificate");

        // Service account tokens: ES256 (ECDSA P-256), which 1.20 signs and verifies.
        let sa_key = KeyPair::generate().expect("a service account key");
        self.ca_pem = ca_cert.pem();
        self.ca_der = ca_cert.der().to_vec();
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: draingate-test\n  cluster:\n    server: {url}\n    \
             certificate-authority: {ca}\n\
             users:\n- name: admin\n  user:\n    token: {token}\n\
             contexts:\n- name: draingate-test\n  context:\n    cluster: draingate-test\n    \
             user: admin\n    namespace: default\n\
             current-context: draingate-test\n",
            url = self.url,
            ca = pki.join("ca.crt").display(),
            token = self.token,
        );
        // The gate's identity: ServiceAccount draingate/draingate-gate's user name and groups,
        // through a static token (there is no token controller), so RBAC bindings to that
        // ServiceAccount, and only those, apply to it.
        let gate_kubeconfig = kubeconfig.replace(
            &format!("token: {}", self.token),
            &format!("token: {}-gate", self.token),
        );
        for (name, text) in [
            ("ca.crt", self.ca_pem.clone()),
            ("apiserver.crt", server_cert.pem()),
            ("apiserver.key", server_key.serialize_pem()),
            ("sa.key", sa_key.serialize_pem()),
            ("sa.pub", sa_key.public_key_pem()),
            (
                "tokens.csv",
                format!(
                    "{token},admin,admin,system:masters\n\
                     {token}-gate,{GATE_USER},draingate-gate,\"system:serviceaccounts,system:serviceaccounts:draingate\"\n",
                    token = self.token
                ),
            ),
        ] {
            let path = pki.join(name);
            fs::write(&path, text).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
        }
        fs::write(&self.kubeconfig, kubeconfig)
            .unwrap_or_else(|err| panic!("write {}: {err}", self.kubeconfig.display()));
        let gate = self.gate_kubeconfig_path();
        fs::write(&gate, gate_kubeconfig)
            .unwrap_or_else(|err| panic!("write {}: {err}", gate.display()));
        pki
    }

    /// Starts `name`, its output into `<dir>/<name>.log`.
    fn spawn(&mut self, name: &'static str, cmd: &mut Command) {
        let log_path = self.dir.join(format!("{name}.log"));
        let log = fs::File::create(&log_path)
            .unwrap_or_else(|err| panic!("create {}: {err}", log_path.display()));
        let err_log = log.try_clone().expect("a second handle on the log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "start {name} ({}): {err}; `cargo xtask kube` builds the control plane and \
                     installs etcd",
                    cmd.get_program().to_string_lossy()
                )
            });
        self.processes.push((name, ChildGuard(child)));
    }

    /// Polls `ready` every 100 ms until it holds; panics with the logs' tails at `deadline` or
    /// when a process exited.
    fn wait_until(&mut self, deadline: Instant, what: &str, mut ready: impl FnMut() -> bool) {
        loop {
            if ready() {
                return;
            }
            let exited: Vec<String> = self
                .processes
                .iter_mut()
                .filter_map(|(name, child)| match child.0.try_wait() {
                    Ok(Some(status)) => Some(format!("{name} exited ({status})")),
                    _ => None,
                })
                .collect();
            if !exited.is_empty() || Instant::now() >= deadline {
                self.tails_shown = true;
                panic!(
                    "the test cluster did not come up: waiting for {what}{}{}\n{}",
                    if exited.is_empty() { "" } else { "; " },
                    exited.join(", "),
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of each process's log.
    fn log_tails(&self) -> String {
        let mut text = String::new();
        for (name, _) in &self.processes {
            let path = self.dir.join(format!("{name}.log"));
            let _ = writeln!(
                text,
                "--- last lines of {name}'s log ({}):\n{}",
                path.display(),
                tail(&path, LOG_TAIL_LINES)
            );
        }
        text
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.tails_shown {
            eprintln!("kube cluster {}:\n{}", self.url, self.log_tails());
        }
        // Controller-manager first, etcd last: each one's clients go before it.
        while let Some((_, process)) = self.processes.pop() {
            drop(process);
        }
        if let Err(err) = fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {err}", self.dir.display());
        }
    }
}

/// The directory of `kube-apiserver` and `kube-controller-manager`: `$DRAINGATE_KUBE_BIN`, or
/// where `cargo xtask kube` caches them. Panics when neither has them: these tests never skip.
fn kube_bin() -> PathBuf {
    let cached = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .map(|cache| cache.join("draingate/kube").join(KUBE_VERSION).join("bin"));
    let candidates: Vec<PathBuf> = std::env::var_os(KUBE_BIN_ENV)
        .map(PathBuf::from)
        .into_iter()
        .chain(cached)
        .collect();
    candidates
        .iter()
        .find(|dir| {
            ["kube-apiserver", "kube-controller-manager"]
                .iter()
                .all(|name| dir.join(name).is_file())
        })
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no kube-apiserver and kube-controller-manager {KUBE_VERSION} in {}: run \
                 `cargo xtask kube` first (it builds them once and prints their directory, \
                 which ${KUBE_BIN_ENV} may name)",
                candidates
                    .iter()
                    .map(|dir| dir.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )
        })
}

/// Runs `f` with a fresh client on a runtime of its own, on a thread of its own, so that it
/// also works when the caller is inside a tokio runtime.
fn block_on<F, Fut, R>(config: kube::Config, f: F) -> R
where
    F: FnOnce(kube::Client) -> Fut + Send,
    Fut: Future<Output = R>,
    R: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                runtime.block_on(async move {
                    let client =
                        kube::Client::try_from(config).expect("a kube client for the cluster");
                    f(client).await
                })
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The last `lines` lines of the file at `path` (at most its last 64 KiB are read).
fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return "(no log)".to_owned();
    };
    let len = file.metadata().map_or(0, |meta| meta.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
