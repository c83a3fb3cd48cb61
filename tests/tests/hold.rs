//! The readiness gate holding a plain Deployment's rolling update, with every part real but the
//! kubelet: kube-apiserver and kube-controller-manager 1.20 (built from Debian's source by
//! `cargo xtask kube`) with etcd, the agent as the DaemonSet runs it (`--source kubernetes`,
//! watching that API server), and `draingate gate serve --hold` authenticated as the
//! `ServiceAccount` of `deploy/overlays/hold` with only that overlay's RBAC. This test plays the
//! kubelet of
//! node `node-a`: each pod it is given becomes a real network namespace with the test server in
//! it and a client beside it; a pod's `Ready` condition is `True` only when its readiness gate's
//! condition is (as the kubelet computes it); a deleted pod's server gets SIGTERM, and once it
//! exited its containers are reported terminated and the pod is removed.
//!
//! The Deployment controller does the rest, for real: with `maxSurge: 1, maxUnavailable: 0` it
//! deletes an old pod only when a new one is Ready, so a new pod the gate holds stops the rollout.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use draingate_tests::{
    ChildGuard, Family, Link, PinDir, draingate_bin, free_port, http_request,
    kube_cluster::KubeCluster, require_root,
};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const SERVER: &str = env!("CARGO_BIN_EXE_draingate-test-server");
const CONDITION: &str = "draingate.io/predecessors-drained";
const NAMESPACE: &str = "shop";
const PORT: u16 = 8080;

/// One request on a keep-alive connection: whether a full response came back.
fn request(conn: &mut TcpStream) -> bool {
    if conn
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
        }
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n")
            && response.len() >= end + 4 + 2
        {
            return true;
        }
    }
}

/// A pod this kubelet runs: its namespaces, its server, and the keep-alive connections its
/// client holds (only for servers that exit without draining: a graceful server would wait for
/// them).
struct Sandbox {
    _link: Link,
    server: ChildGuard,
    held: Vec<TcpStream>,
    signaled: bool,
}

/// What the clients saw, per pod: the ground truth.
#[derive(Debug, Default)]
struct Clients {
    failures: HashMap<String, u64>,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn condition<'a>(pod: &'a Pod, kind: &str) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
}

/// The kubelet's rule: Ready when the containers are and every readiness gate is True.
fn gates_true(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .is_none_or(|gates| {
            gates
                .iter()
                .all(|g| condition(pod, &g.condition_type).is_some_and(|c| c.status == "True"))
        })
}

/// The test's kubelet for node `node-a`, one pass over the namespace's pods.
struct Kubelet {
    runtime: tokio::runtime::Runtime,
    pods: Api<Pod>,
    sandboxes: HashMap<String, Sandbox>,
    clients: Clients,
}

impl Kubelet {
    fn patch_status(&self, name: &str, status: &Value) {
        let patch = json!({ "status": status.clone() });
        let result = self.runtime.block_on(self.pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        ));
        if let Err(err) = result {
            // The pod may be gone already.
            eprintln!("kubelet: cannot patch {name}'s status: {err}");
        }
    }

    fn start(&mut self, pod: &Pod) {
        let name = pod.metadata.name.clone().expect("a name");
        let mode = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("draingate.test/mode"))
            .cloned()
            .unwrap_or_else(|| "graceful".into());
        let link = Link::new("hold", Family::V4);
        let addr = SocketAddr::new(link.b_addr, PORT);
        let listen = addr.to_string();
        let server = ChildGuard::spawn_in(&link.b, SERVER, &["--listen", &listen, "--mode", &mode]);
        let connect = || {
            link.a
                .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while connect().is_err() {
            assert!(Instant::now() < deadline, "{name}'s server never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Clients: a few requests on their own connections, and for a server that does not
        // drain, two keep-alive connections that stay open.
        for _ in 0..3 {
            let mut conn = connect().expect("connect");
            assert!(request(&mut conn), "a request to {name}");
        }
        let held = if mode == "abrupt" {
            (0..2)
                .map(|_| {
                    let mut conn = connect().expect("connect");
                    assert!(request(&mut conn), "a request to {name}");
                    conn
                })
                .collect()
        } else {
            Vec::new()
        };
        let ip = link.b_addr.to_string();
        let now = now_rfc3339();
        let ready = if gates_true(pod) { "True" } else { "False" };
        self.patch_status(
            &name,
            &json!({
                "phase": "Running",
                "hostIP": "127.0.0.1",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": now,
                "conditions": [
                    {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                    {"type": "Ready", "status": ready, "lastTransitionTime": now},
                ],
                "containerStatuses": [{
                    "name": "web", "ready": true, "started": true, "restartCount": 0,
                    "image": "draingate-test-server", "imageID": "",
                    "state": {"running": {"startedAt": now}}
                }]
            }),
        );
        self.sandboxes.insert(
            name,
            Sandbox {
                _link: link,
                server,
                held,
                signaled: false,
            },
        );
    }

    /// A deleted pod: SIGTERM, then once its server exited, the clients' next requests (the
    /// failures users see), its containers terminated, and the pod removed.
    fn stop(&mut self, pod: &Pod) {
        let name = pod.metadata.name.clone().expect("a name");
        let Some(sandbox) = self.sandboxes.get_mut(&name) else {
            self.remove(pod);
            return;
        };
        if !sandbox.signaled {
            sandbox.server.signal(Signal::SIGTERM);
            sandbox.signaled = true;
        }
        if !matches!(sandbox.server.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let mut failed = 0;
        for conn in &mut sandbox.held {
            if !request(conn) {
                failed += 1;
            }
        }
        *self.clients.failures.entry(name.clone()).or_default() += failed;
        let now = now_rfc3339();
        self.patch_status(
            &name,
            &json!({
                "conditions": [
                    {"type": "ContainersReady", "status": "False", "lastTransitionTime": now},
                    {"type": "Ready", "status": "False", "lastTransitionTime": now},
                ],
                "containerStatuses": [{
                    "name": "web", "ready": false, "started": false, "restartCount": 0,
                    "image": "draingate-test-server", "imageID": "",
                    "state": {"running": null, "terminated": {
                        "exitCode": 0, "startedAt": now, "finishedAt": now}}
                }]
            }),
        );
        // The agent reads the exit from the API server before the pod goes.
        std::thread::sleep(Duration::from_millis(300));
        self.remove(pod);
        self.sandboxes.remove(&name);
    }

    fn remove(&self, pod: &Pod) {
        let name = pod.metadata.name.as_deref().expect("a name");
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        if let Err(err) = self.runtime.block_on(self.pods.delete(name, &params)) {
            eprintln!("kubelet: cannot remove {name}: {err}");
        }
    }

    fn step(&mut self) {
        let list = match self
            .runtime
            .block_on(self.pods.list(&ListParams::default()))
        {
            Ok(list) => list.items,
            Err(err) => {
                eprintln!("kubelet: cannot list pods: {err}");
                return;
            }
        };
        for pod in &list {
            let name = pod.metadata.name.as_deref().expect("a name");
            if pod.metadata.deletion_timestamp.is_some() {
                self.stop(pod);
            } else if !self.sandboxes.contains_key(name) {
                self.start(pod);
            } else {
                let ready = gates_true(pod);
                let reported = condition(pod, "Ready").is_some_and(|c| c.status == "True");
                if ready != reported {
                    let status = if ready { "True" } else { "False" };
                    self.patch_status(
                        name,
                        &json!({"conditions": [{"type": "Ready", "status": status,
                            "lastTransitionTime": now_rfc3339()}]}),
                    );
                }
            }
        }
    }
}

/// Creates what `deploy/overlays/hold` declares (its namespace first), as the admin: the RBAC
/// of `rbac.yaml` as it is, and the webhook configuration of `webhook.yaml` calling `webhook`
/// by URL (no Service reaches a process on loopback without kube-proxy).
fn apply_the_overlay(
    runtime: &tokio::runtime::Runtime,
    client: &kube::Client,
    webhook: SocketAddr,
) {
    use k8s_openapi::api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        core::v1::{Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    };
    use serde::Deserialize as _;
    let post = PostParams::default();
    runtime
        .block_on(Api::<Namespace>::all(client.clone()).create(
            &post,
            &serde_json::from_value(json!({"metadata": {"name": "draingate"}})).unwrap(),
        ))
        .expect("create namespace draingate");
    for file in ["rbac.yaml", "webhook.yaml"] {
        let path = format!(
            "{}/../deploy/overlays/hold/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let mut doc = Value::deserialize(doc).expect("a YAML document");
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            let namespaced = |doc: &Value| {
                doc["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("draingate")
                    .to_owned()
            };
            let created = runtime.block_on(async {
                match kind.as_str() {
                    "ServiceAccount" => {
                        Api::<ServiceAccount>::namespaced(client.clone(), &namespaced(&doc))
                            .create(
                                &post,
                                &serde_json::from_value(doc).expect("a ServiceAccount"),
                            )
                            .await
                            .map(|_| ())
                    }
                    "ClusterRole" => Api::<ClusterRole>::all(client.clone())
                        .create(&post, &serde_json::from_value(doc).expect("a ClusterRole"))
                        .await
                        .map(|_| ()),
                    "ClusterRoleBinding" => Api::<ClusterRoleBinding>::all(client.clone())
                        .create(
                            &post,
                            &serde_json::from_value(doc).expect("a ClusterRoleBinding"),
                        )
                        .await
                        .map(|_| ()),
                    "Role" => Api::<Role>::namespaced(client.clone(), &namespaced(&doc))
                        .create(&post, &serde_json::from_value(doc).expect("a Role"))
                        .await
                        .map(|_| ()),
                    "RoleBinding" => {
                        Api::<RoleBinding>::namespaced(client.clone(), &namespaced(&doc))
                            .create(&post, &serde_json::from_value(doc).expect("a RoleBinding"))
                            .await
                            .map(|_| ())
                    }
                    "MutatingWebhookConfiguration" => {
                        for hook in doc["webhooks"].as_array_mut().expect("webhooks") {
                            hook["clientConfig"] =
                                json!({"url": format!("https://{webhook}/mutate")});
                        }
                        Api::<MutatingWebhookConfiguration>::all(client.clone())
                            .create(
                                &post,
                                &serde_json::from_value(doc).expect("a configuration"),
                            )
                            .await
                            .map(|_| ())
                    }
                    // The webhook's Service: nothing routes it here.
                    "Service" => Ok(()),
                    other => panic!("{path}: give this test kind {other:?}"),
                }
            });
            created.unwrap_or_else(|err| panic!("create the overlay's {kind}: {err}"));
        }
    }
}

/// A `draingate gate serve --hold` replica.
struct GateProcess {
    name: String,
    http: String,
    webhook: SocketAddr,
    log: std::path::PathBuf,
    process: Option<ChildGuard>,
}

impl GateProcess {
    fn start(
        name: &str,
        agent_grpc: &str,
        kubeconfig: &std::path::Path,
        logs: &std::path::Path,
        on_fail: &str,
        webhook: SocketAddr,
    ) -> Self {
        let http = format!("127.0.0.1:{}", free_port());
        let log = logs.join(format!("{name}.log"));
        let process = ChildGuard(
            Command::new(draingate_bin())
                .args(["gate", "serve", "--agents", agent_grpc, "--hold"])
                .args(["--hold-interval", "200ms", "--agent-timeout", "1s"])
                .args(["--on-fail", on_fail])
                .args(["--http-addr", &http])
                .args(["--grpc-addr", &format!("127.0.0.1:{}", free_port())])
                .args(["--webhook-addr", &webhook.to_string()])
                .args(["--webhook-names", "127.0.0.1"])
                // As the overlay's ServiceAccount, with only its RBAC: least privilege works.
                .env("KUBECONFIG", kubeconfig)
                .env("POD_NAME", name)
                .env("POD_NAMESPACE", "draingate")
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log"))
                .spawn()
                .expect("run draingate gate serve"),
        );
        Self {
            name: name.to_owned(),
            http,
            webhook,
            log,
            process: Some(process),
        }
    }
}

/// How a test sets the rig up.
struct Setup {
    /// Gate replicas.
    gates: usize,
    /// `--on-fail`.
    on_fail: &'static str,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            gates: 1,
            on_fail: "none",
        }
    }
}

/// The cluster, the agent and the gates, and this kubelet.
struct Rig {
    cluster: KubeCluster,
    agent_grpc: String,
    on_fail: &'static str,
    admin: kube::Client,
    kubelet: Kubelet,
    deployments: Api<Deployment>,
    agent: Option<ChildGuard>,
    gates: Vec<GateProcess>,
    _pins: PinDir,
    logs: std::path::PathBuf,
}

/// The logs stay for a failed test, to read; a passed one's go.
impl Drop for Rig {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.logs);
        }
    }
}

impl Rig {
    fn start(test: &str, setup: &Setup) -> Self {
        require_root();
        let cluster = KubeCluster::start();
        cluster.create_node("node-a");
        let runtime = draingate_tests::kube_api::runtime();
        let client = {
            let _entered = runtime.enter();
            cluster.client()
        };
        let logs =
            std::env::temp_dir().join(format!("draingate-hold-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&logs).expect("log directory");
        let pins = PinDir::new();
        let agent_grpc = format!("127.0.0.1:{}", free_port());
        let agent_http = format!("127.0.0.1:{}", free_port());
        let agent = ChildGuard(
            Command::new(draingate_bin())
                .args(["agent", "--source", "kubernetes", "--node-name", "node-a"])
                .args(["--grpc-addr", &agent_grpc, "--http-addr", &agent_http])
                .arg("--socket")
                .arg(logs.join("agent.sock"))
                .arg("--pin-dir")
                .arg(&pins.config.pin_dir)
                .env("KUBECONFIG", cluster.kubeconfig_path())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(logs.join("agent.log")).expect("log"))
                .spawn()
                .expect("run the agent"),
        );
        let webhooks: Vec<SocketAddr> = (0..setup.gates)
            .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
            .collect();
        // The API server calls the first replica's webhook.
        apply_the_overlay(&runtime, &client, webhooks[0]);
        let gates: Vec<GateProcess> = webhooks
            .iter()
            .enumerate()
            .map(|(i, webhook)| {
                GateProcess::start(
                    &format!("gate-{i}"),
                    &agent_grpc,
                    &cluster.gate_kubeconfig_path(),
                    &logs,
                    setup.on_fail,
                    *webhook,
                )
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut faces = vec![(agent_http.clone(), "/readyz", logs.join("agent.log"))];
        faces.extend(
            gates
                .iter()
                .map(|g| (g.http.clone(), "/healthz", g.log.clone())),
        );
        for (addr, path, log) in faces {
            loop {
                let answer = http_request(addr.as_str(), "GET", path, "");
                if answer.as_ref().is_ok_and(|r| r.0 == 200) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{addr}{path} never answered 200 (last: {answer:?}); {}:\n{}",
                    log.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // The gate wrote its CA into the webhook configuration, and its webhook listens.
        let configurations: Api<
            k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
        > = Api::all(client.clone());
        loop {
            let configuration = runtime
                .block_on(configurations.get("draingate-gate"))
                .expect("the webhook configuration");
            let bundled = configuration.webhooks.iter().flatten().all(|w| {
                w.client_config
                    .ca_bundle
                    .as_ref()
                    .is_some_and(|b| b.0.starts_with(b"-----BEGIN CERTIFICATE"))
            });
            if bundled && TcpStream::connect(gates[0].webhook).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the gate never wrote the webhook's caBundle: {}",
                std::fs::read_to_string(&gates[0].log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // The user's one step: the namespace opts in.
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        runtime
            .block_on(
                namespaces.create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": NAMESPACE,
                    "labels": {"draingate.io/hold": "enabled"}}}))
                    .unwrap(),
                ),
            )
            .expect("create the namespace");
        let kubelet = Kubelet {
            pods: Api::namespaced(client.clone(), NAMESPACE),
            runtime,
            sandboxes: HashMap::new(),
            clients: Clients::default(),
        };
        Self {
            deployments: Api::namespaced(client.clone(), NAMESPACE),
            admin: client,
            cluster,
            agent_grpc,
            on_fail: setup.on_fail,
            kubelet,
            agent: Some(agent),
            gates,
            _pins: pins,
            logs,
        }
    }

    fn logs(&self) -> String {
        let mut files = vec![self.logs.join("agent.log")];
        files.extend(self.gates.iter().map(|g| g.log.clone()));
        files
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(f).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                format!(
                    "--- {} (last lines)\n{}",
                    f.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn deployment(&self) -> Deployment {
        self.kubelet
            .runtime
            .block_on(self.deployments.get("web"))
            .expect("get the Deployment")
    }

    fn pods(&self) -> Vec<Pod> {
        self.kubelet
            .runtime
            .block_on(self.kubelet.pods.list(&ListParams::default()))
            .expect("list pods")
            .items
    }

    /// Runs the kubelet for `duration`, whatever happens.
    fn keep_running(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.kubelet.step();
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs the kubelet until `done` holds, at most `within`.
    fn run_until(&mut self, what: &str, within: Duration, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            self.kubelet.step();
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never {what}: {:#?}\n{}",
                self.deployment().status,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Creates Deployment `web`: `replicas`, `maxSurge: 1, maxUnavailable: 0`, servers in
    /// `mode`, and no readiness gate in its template: the webhook adds it to each pod.
    fn create(&mut self, mode: &str, replicas: i32) {
        let deployment = json!({
            "metadata": {"name": "web"},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "web"}},
                "strategy": {"type": "RollingUpdate",
                             "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {
                    "metadata": {"labels": {"app": "web"},
                                 "annotations": {"draingate.test/mode": mode}},
                    "spec": {
                        "nodeName": "node-a",
                        "terminationGracePeriodSeconds": 30,
                        "containers": [{"name": "web", "image": "draingate-test-server"}]
                    }
                }
            }
        });
        self.kubelet
            .runtime
            .block_on(self.deployments.create(
                &PostParams::default(),
                &serde_json::from_value(deployment).unwrap(),
            ))
            .expect("create the Deployment");
        self.run_until("every pod ready", Duration::from_mins(1), |rig| {
            rig.deployment()
                .status
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0)
                == replicas
        });
        // Pods serve a while before a rollout replaces them: the agent watches them (a pod it
        // first sees already deleted is `unknown`, never judged).
        self.run_until(
            "the agent watching every pod",
            Duration::from_secs(30),
            |rig| {
                let listed: Value = serde_json::from_str(&rig.agent_pods()).unwrap_or_default();
                let names: Vec<&str> = listed["pods"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["name"].as_str())
                    .collect();
                rig.pods()
                    .iter()
                    .all(|p| names.contains(&p.metadata.name.as_deref().unwrap_or_default()))
            },
        );
    }

    /// Scales the Deployment to `replicas`.
    fn scale(&self, replicas: i32) {
        let patch = json!({"spec": {"replicas": replicas}});
        self.kubelet
            .runtime
            .block_on(
                self.deployments
                    .patch("web", &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .expect("scale the Deployment");
    }

    /// Whether the rollout to the current template is done: every replica updated and ready,
    /// no pod of `old_hash` left.
    fn rolled_out(&self, replicas: i32, old_hash: &str) -> bool {
        let d = self.deployment();
        let (generation, status) = (d.metadata.generation, d.status.unwrap_or_default());
        status.observed_generation == generation
            && status.updated_replicas == Some(replicas)
            && status.ready_replicas == Some(replicas)
            && status.replicas == Some(replicas)
            && self.pods().iter().all(|p| hash(p) != old_hash)
    }

    /// Makes the API server call gate replica `index`'s webhook.
    fn point_webhook_at(&self, index: usize) {
        let configurations: Api<
            k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
        > = Api::all(self.admin.clone());
        let url = format!("https://{}/mutate", self.gates[index].webhook);
        let patch =
            json!({"webhooks": [{"name": "hold.draingate.io", "clientConfig": {"url": url}}]});
        self.kubelet
            .runtime
            .block_on(configurations.patch(
                "draingate-gate",
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            ))
            .expect("point the webhook at another replica");
    }

    /// Stops gate replica `index` with SIGTERM (it gives its Lease up) and starts a new process
    /// in its place, as a restarted pod: a new name, the same addresses.
    fn restart_gate(&mut self, index: usize) {
        let old = &mut self.gates[index];
        if let Some(mut process) = old.process.take() {
            process.signal(Signal::SIGTERM);
            let _ = process.0.wait();
        }
        let name = format!("{}-restarted", old.name);
        let webhook = old.webhook;
        let restarted = GateProcess::start(
            &name,
            &self.agent_grpc,
            &self.cluster.gate_kubeconfig_path(),
            &self.logs,
            self.on_fail,
            webhook,
        );
        self.gates[index] = restarted;
    }

    /// What the agent says of every pod (`draingate pods -o json`), for failure messages.
    fn agent_pods(&self) -> String {
        let output = Command::new(draingate_bin())
            .args(["pods", "--agent"])
            .arg(self.logs.join("agent.sock"))
            .args(["-o", "json"])
            .output();
        output.map_or_else(
            |e| e.to_string(),
            |o| String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    }

    /// The Lease's holder.
    fn leader(&self) -> Option<String> {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.admin.clone(), "draingate");
        self.kubelet
            .runtime
            .block_on(leases.get_opt("draingate-gate"))
            .expect("read the Lease")
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    }

    /// Rolls the Deployment out to servers in `mode`.
    fn update(&self, mode: &str) {
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {
            "draingate.test/mode": mode, "draingate.test/version": "2"}}}}});
        self.kubelet
            .runtime
            .block_on(
                self.deployments
                    .patch("web", &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .expect("update the Deployment");
    }

    /// The Events with `reason` in the namespace: (the kind they are about, their note).
    fn events(&self, reason: &str) -> Vec<(String, String)> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.kubelet.pods.clone().into_client(), NAMESPACE);
        self.kubelet
            .runtime
            .block_on(api.list(&ListParams::default()))
            .expect("list Events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .map(|e| {
                (
                    e.regarding.and_then(|r| r.kind).unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect()
    }

    /// The rollout's verdict from the gate's HTTP face.
    fn verdict(&self) -> Value {
        let (status, body) = http_request(
            self.gates[0].http.as_str(),
            "GET",
            &format!("/v1/verdict?namespace={NAMESPACE}&workload=web"),
            "",
        )
        .expect("ask the gate");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("a JSON verdict")
    }
}

fn hash(pod: &Pod) -> String {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"))
        .cloned()
        .unwrap_or_default()
}

/// The gate's conditions that hold their pods (`False`): (status, reason, message).
fn held<'a>(pods: impl Iterator<Item = &'a Pod>) -> Vec<(String, String, String)> {
    pods.filter_map(gate_reason)
        .filter(|(status, _, _)| status == "False")
        .collect()
}

fn gate_reason(pod: &Pod) -> Option<(String, String, String)> {
    condition(pod, CONDITION).map(|c| {
        (
            c.status.clone(),
            c.reason.clone().unwrap_or_default(),
            c.message.clone().unwrap_or_default(),
        )
    })
}

fn has_the_gate(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.condition_type == CONDITION))
}

/// A rollout of 4 replicas whose old pods drain cleanly goes on to the end, with two gate
/// replicas of which one leads: the webhook gave every pod the readiness gate, each new pod
/// that replaced an old one became Ready only after that old pod's pass, the finished
/// rollout's verdict is one Event on the Deployment, and a pod added after the rollout (a
/// scale-up) is Ready at once.
#[test]
fn a_clean_rollout_goes_on_and_each_new_pod_waited_for_the_old_ones_it_replaced() {
    let mut rig = Rig::start(
        "clean",
        &Setup {
            gates: 2,
            ..Setup::default()
        },
    );
    rig.create("graceful", 4);
    let leader = rig.leader().expect("a replica leads");
    assert!(["gate-0", "gate-1"].contains(&leader.as_str()), "{leader}");
    let old_hash = hash(&rig.pods()[0]);
    rig.update("graceful");
    rig.run_until("the rollout done", Duration::from_mins(2), |rig| {
        rig.rolled_out(4, &old_hash)
    });
    let pods = rig.pods();
    let mut reasons: Vec<String> = pods
        .iter()
        .map(|p| {
            assert!(
                has_the_gate(p),
                "the webhook gave {:?} the gate",
                p.metadata.name
            );
            let (status, reason, message) = gate_reason(p).expect("the gate's condition");
            assert_eq!(status, "True", "{message}");
            reason
        })
        .collect();
    reasons.sort();
    // The surge pod came before any old pod was deleted; the other three replaced one each.
    assert_eq!(
        reasons,
        [
            "NoPredecessors",
            "PredecessorsDrained",
            "PredecessorsDrained",
            "PredecessorsDrained"
        ],
        "{}",
        rig.logs()
    );
    assert!(rig.kubelet.clients.failures.values().all(|&f| f == 0));
    // Each release after predecessors is an Event on the pod, written by the leader alone.
    let events = rig.events("PredecessorsDrained");
    assert_eq!(
        events.iter().filter(|(kind, _)| kind == "Pod").count(),
        3,
        "{events:?}"
    );
    // The final verdict, the last old pod's included (no new pod waited for it).
    rig.run_until(
        "the rollout's verdict recorded",
        Duration::from_secs(20),
        |rig| !rig.events("RolloutDrained").is_empty(),
    );
    let verdicts = rig.events("RolloutDrained");
    assert_eq!(verdicts.len(), 1, "{verdicts:?}");
    assert_eq!(verdicts[0].0, "Deployment");
    assert!(
        verdicts[0].1.contains("all 4 replaced pods"),
        "{verdicts:?}"
    );
    let verdict = rig.verdict();
    assert_eq!(verdict["verdict"], "pass", "{verdict:#}");
    // Outside a rollout a new pod waits for nothing. (Creation times are whole seconds: a pod
    // created in the second its version's rollout was seen finished counts as the rollout's, and
    // waits for its old pods, which passed: a scale-up comes later than that.)
    rig.keep_running(Duration::from_millis(1100));
    rig.scale(5);
    rig.run_until("the fifth pod ready", Duration::from_secs(30), |rig| {
        rig.deployment().status.and_then(|s| s.ready_replicas) == Some(5)
    });
    let reasons: Vec<String> = rig
        .pods()
        .iter()
        .filter_map(gate_reason)
        .map(|(_, reason, _)| reason)
        .filter(|r| r == "NoPredecessors")
        .collect();
    assert_eq!(
        reasons.len(),
        2,
        "the surge pod and the scale-up: {reasons:?}"
    );
    let led: Vec<&str> = rig
        .gates
        .iter()
        .filter(|g| {
            std::fs::read_to_string(&g.log)
                .unwrap_or_default()
                .contains("readiness gate condition set")
        })
        .map(|g| g.name.as_str())
        .collect();
    assert_eq!(led, [leader.as_str()], "only the leader writes");
}

/// An old pod that exits with connections still open (its clients' next requests fail) holds
/// the new pod that replaced it: `False`, `DrainFailed`, naming the pod; the Deployment
/// controller deletes no other old pod; and with `--on-fail pause` the Deployment is paused.
#[test]
fn an_old_pod_that_drops_its_clients_holds_the_rollout_where_it_stands() {
    let mut rig = Rig::start(
        "dirty",
        &Setup {
            on_fail: "pause",
            ..Setup::default()
        },
    );
    rig.create("abrupt", 3);
    let old_hash = hash(&rig.pods()[0]);
    rig.update("graceful");
    // The first old pod replaced, and its clients' failures seen.
    rig.run_until("a new pod held", Duration::from_mins(1), |rig| {
        held(rig.pods().iter())
            .iter()
            .any(|(_, reason, _)| reason == "DrainFailed")
    });
    let ungated: Vec<Option<String>> = rig
        .pods()
        .iter()
        .filter(|p| !has_the_gate(p))
        .map(|p| p.metadata.name.clone())
        .collect();
    assert!(
        ungated.is_empty(),
        "the webhook gave these no gate: {ungated:?}\n{}",
        rig.logs()
    );
    let failed: Vec<(&String, &u64)> = rig
        .kubelet
        .clients
        .failures
        .iter()
        .filter(|(_, f)| **f > 0)
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "one old pod failed its clients: {failed:?}\nconditions: {:?}\nagent: {}\n{}",
        rig.pods()
            .iter()
            .map(|p| (p.metadata.name.clone(), gate_reason(p)))
            .collect::<Vec<_>>(),
        rig.agent_pods(),
        rig.logs()
    );
    let (dropped, _) = failed[0];
    let dropped = dropped.clone();

    // It stays that way: the rollout does not go on.
    rig.keep_running(Duration::from_secs(8));
    let pods = rig.pods();
    let old: Vec<&Pod> = pods.iter().filter(|p| hash(p) == old_hash).collect();
    assert_eq!(old.len(), 2, "two old pods still serve: {pods:#?}");
    assert!(old.iter().all(|p| p.metadata.deletion_timestamp.is_none()));
    let held = held(pods.iter().filter(|p| hash(p) != old_hash));
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].1, "DrainFailed");
    assert!(held[0].2.contains(&dropped), "{held:?} names {dropped}");
    let deployment = rig.deployment();
    let status = deployment.status.clone().unwrap_or_default();
    assert_eq!(status.ready_replicas, Some(3), "{status:#?}");
    // --on-fail pause: the Deployment controller will create no more pods for it.
    assert_eq!(deployment.spec.paused, Some(true), "{}", rig.logs());
    // `kubectl describe` shows it: a Warning Event on the Deployment and on the held pod.
    let events = rig.events("DrainFailed");
    for kind in ["Deployment", "Pod"] {
        assert!(
            events
                .iter()
                .any(|(k, note)| k == kind && note.contains(&dropped)),
            "no DrainFailed Event on the {kind} naming {dropped}: {events:?}"
        );
    }
    let paused = rig.events("RolloutPaused");
    assert!(
        paused
            .iter()
            .any(|(k, note)| k == "Deployment" && note.contains(&dropped)),
        "{paused:?}"
    );
    let verdict = rig.verdict();
    assert_eq!(verdict["verdict"], "fail", "{verdict:#}");
    // A restarted gate never saw the failed pod's deletion (it is gone from the API server):
    // the agent still reports it, so the pod stays held for it, never released.
    rig.restart_gate(0);
    rig.keep_running(Duration::from_secs(5));
    let pods = rig.pods();
    let still = self::held(pods.iter().filter(|p| hash(p) != old_hash));
    assert_eq!(
        still.len(),
        1,
        "still held after a restart: {still:?}\n{}",
        rig.logs()
    );
    assert_eq!(still[0].1, "DrainFailed", "{still:?}");
    assert_eq!(
        pods.iter().filter(|p| hash(p) == old_hash).count(),
        2,
        "no more old pods deleted"
    );
}

/// An agent that cannot be asked leaves the gate without evidence: the new pod that replaced an
/// old one stays `False`, `NoEvidence`, naming the agent, and the rollout stops there.
#[test]
fn an_unreachable_agent_holds_the_rollout_as_no_evidence() {
    let mut rig = Rig::start("blind", &Setup::default());
    rig.create("graceful", 3);
    let old_hash = hash(&rig.pods()[0]);
    rig.agent = None;
    rig.update("graceful");
    rig.run_until(
        "a new pod held without evidence",
        Duration::from_mins(1),
        |rig| {
            held(rig.pods().iter())
                .iter()
                .any(|(_, reason, _)| reason == "NoEvidence")
        },
    );
    rig.keep_running(Duration::from_secs(5));
    let pods = rig.pods();
    let serving = pods
        .iter()
        .filter(|p| hash(p) == old_hash && p.metadata.deletion_timestamp.is_none())
        .count();
    assert_eq!(serving, 2, "two old pods still serve: {pods:#?}");
    let held = held(pods.iter());
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].1, "NoEvidence");
    assert!(held[0].2.contains("unreachable"), "{held:?}");
}

/// The gate down (every replica stopped): pods are still created, without the readiness gate
/// (`failurePolicy: Ignore`), and become Ready as usual.
#[test]
fn a_gate_that_is_down_never_blocks_pod_creation() {
    let mut rig = Rig::start("down", &Setup::default());
    rig.create("graceful", 2);
    assert!(rig.pods().iter().all(has_the_gate));
    for gate in &mut rig.gates {
        gate.process = None;
    }
    rig.scale(3);
    rig.run_until("the third pod ready", Duration::from_secs(30), |rig| {
        rig.deployment().status.and_then(|s| s.ready_replicas) == Some(3)
    });
    let ungated: Vec<Pod> = rig
        .pods()
        .into_iter()
        .filter(|p| !has_the_gate(p))
        .collect();
    assert_eq!(ungated.len(), 1, "created without the gate: {ungated:#?}");
}

/// Two replicas: when the leader dies (SIGKILL: it cannot give its Lease up), the other takes
/// the Lease once it expires and holds the rest of the rollout.
#[test]
fn a_standby_gate_takes_over_when_the_leader_dies() {
    let mut rig = Rig::start(
        "failover",
        &Setup {
            gates: 2,
            ..Setup::default()
        },
    );
    rig.create("graceful", 3);
    let leader = rig.leader().expect("a replica leads");
    let old_hash = hash(&rig.pods()[0]);
    // The standby's webhook (the same certificate: the replicas share it through the Secret).
    let standby = rig
        .gates
        .iter()
        .position(|g| g.name != leader)
        .expect("a standby");
    rig.point_webhook_at(standby);
    for gate in rig.gates.iter_mut().filter(|g| g.name == leader) {
        gate.process = None;
    }
    rig.update("graceful");
    rig.run_until("the rollout done", Duration::from_mins(2), |rig| {
        rig.rolled_out(3, &old_hash)
    });
    let now = rig.leader().expect("a replica leads");
    assert_ne!(now, leader, "{}", rig.logs());
    let mut reasons: Vec<String> = rig
        .pods()
        .iter()
        .filter_map(gate_reason)
        .map(|(status, reason, _)| format!("{status} {reason}"))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "True NoPredecessors",
            "True PredecessorsDrained",
            "True PredecessorsDrained"
        ],
        "{}",
        rig.logs()
    );
}
