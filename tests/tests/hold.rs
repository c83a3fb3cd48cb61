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

/// Creates what `deploy/overlays/hold/rbac.yaml` declares (its namespace first), as the admin.
fn grant_the_overlays_rbac(runtime: &tokio::runtime::Runtime, client: &kube::Client) {
    use k8s_openapi::api::{
        core::v1::{Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    };
    use serde::Deserialize as _;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/overlays/hold/rbac.yaml"
    );
    let text = std::fs::read_to_string(path).expect("deploy/overlays/hold/rbac.yaml");
    let post = PostParams::default();
    runtime.block_on(async {
        Api::<Namespace>::all(client.clone())
            .create(
                &post,
                &serde_json::from_value(json!({"metadata": {"name": "draingate"}})).unwrap(),
            )
            .await
            .expect("create namespace draingate");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let doc = Value::deserialize(doc).expect("a YAML document");
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            let created = match kind.as_str() {
                "ServiceAccount" => Api::<ServiceAccount>::namespaced(client.clone(), "draingate")
                    .create(
                        &post,
                        &serde_json::from_value(doc).expect("a ServiceAccount"),
                    )
                    .await
                    .map(|_| ()),
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
                other => panic!("{path}: give this test kind {other:?}"),
            };
            created.unwrap_or_else(|err| panic!("create the overlay's {kind}: {err}"));
        }
    });
}

/// The cluster, the agent and the gate, and this kubelet.
struct Rig {
    _cluster: KubeCluster,
    kubelet: Kubelet,
    deployments: Api<Deployment>,
    gate_http: String,
    agent: Option<ChildGuard>,
    _gate: ChildGuard,
    _pins: PinDir,
    logs: std::path::PathBuf,
}

impl Rig {
    fn start(test: &str) -> Self {
        require_root();
        let cluster = KubeCluster::start();
        cluster.create_node("node-a");
        let runtime = draingate_tests::kube_api::runtime();
        let client = {
            let _entered = runtime.enter();
            cluster.client()
        };
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        runtime
            .block_on(namespaces.create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).unwrap(),
            ))
            .expect("create the namespace");
        grant_the_overlays_rbac(&runtime, &client);
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
        let gate_http = format!("127.0.0.1:{}", free_port());
        let gate = ChildGuard(
            Command::new(draingate_bin())
                .args(["gate", "serve", "--agents", &agent_grpc, "--hold"])
                .args(["--hold-interval", "200ms", "--agent-timeout", "1s"])
                .args(["--http-addr", &gate_http])
                .args(["--grpc-addr", &format!("127.0.0.1:{}", free_port())])
                // As the overlay's ServiceAccount, with only its RBAC: least privilege works.
                .env("KUBECONFIG", cluster.gate_kubeconfig_path())
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(logs.join("gate.log")).expect("log"))
                .spawn()
                .expect("run draingate gate serve"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for (addr, path) in [(&agent_http, "/readyz"), (&gate_http, "/healthz")] {
            while http_request(addr.as_str(), "GET", path, "")
                .map(|r| r.0)
                .ok()
                != Some(200)
            {
                assert!(Instant::now() < deadline, "{addr}{path} never answered 200");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let kubelet = Kubelet {
            pods: Api::namespaced(client.clone(), NAMESPACE),
            runtime,
            sandboxes: HashMap::new(),
            clients: Clients::default(),
        };
        Self {
            deployments: Api::namespaced(client, NAMESPACE),
            _cluster: cluster,
            kubelet,
            gate_http,
            agent: Some(agent),
            _gate: gate,
            _pins: pins,
            logs,
        }
    }

    fn logs(&self) -> String {
        ["agent.log", "gate.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(self.logs.join(f)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                format!(
                    "--- {f} (last lines)\n{}",
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

    /// Creates Deployment `web`: 3 replicas, `maxSurge: 1, maxUnavailable: 0`, the readiness
    /// gate in its template, and servers in `mode`.
    fn create(&mut self, mode: &str) {
        let deployment = json!({
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"}},
                "strategy": {"type": "RollingUpdate",
                             "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {
                    "metadata": {"labels": {"app": "web"},
                                 "annotations": {"draingate.test/mode": mode}},
                    "spec": {
                        "nodeName": "node-a",
                        "readinessGates": [{"conditionType": CONDITION}],
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
        self.run_until("3 ready pods", Duration::from_mins(1), |rig| {
            rig.deployment()
                .status
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0)
                == 3
        });
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
            self.gate_http.as_str(),
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

/// A rollout whose old pods drain cleanly goes on to the end, and each new pod that replaced an
/// old one became Ready only after that old pod's pass.
#[test]
fn a_clean_rollout_goes_on_and_each_new_pod_waited_for_the_old_ones_it_replaced() {
    let mut rig = Rig::start("clean");
    rig.create("graceful");
    let old_hash = hash(&rig.pods()[0]);
    rig.update("graceful");
    rig.run_until("the rollout done", Duration::from_mins(2), |rig| {
        let d = rig.deployment();
        let (generation, status) = (d.metadata.generation, d.status.unwrap_or_default());
        status.observed_generation == generation
            && status.updated_replicas == Some(3)
            && status.ready_replicas == Some(3)
            && status.replicas == Some(3)
            && rig.pods().iter().all(|p| hash(p) != old_hash)
    });
    let pods = rig.pods();
    let mut reasons: Vec<String> = pods
        .iter()
        .map(|p| {
            let (status, reason, message) = gate_reason(p).expect("the gate's condition");
            assert_eq!(status, "True", "{message}");
            reason
        })
        .collect();
    reasons.sort();
    // The surge pod came before any old pod was deleted; the other two replaced one each.
    assert_eq!(
        reasons,
        [
            "NoPredecessors",
            "PredecessorsDrained",
            "PredecessorsDrained"
        ],
        "{}",
        rig.logs()
    );
    assert!(rig.kubelet.clients.failures.values().all(|&f| f == 0));
    // Each release after predecessors is an Event on the pod.
    let events = rig.events("PredecessorsDrained");
    assert_eq!(
        events.iter().filter(|(kind, _)| kind == "Pod").count(),
        2,
        "{events:?}"
    );
    let verdict = rig.verdict();
    assert_eq!(verdict["verdict"], "pass", "{verdict:#}");
}

/// An old pod that exits with connections still open (its clients' next requests fail) holds
/// the new pod that replaced it: `False`, `DrainFailed`, naming the pod, and the Deployment
/// controller deletes no other old pod.
#[test]
fn an_old_pod_that_drops_its_clients_holds_the_rollout_where_it_stands() {
    let mut rig = Rig::start("dirty");
    rig.create("abrupt");
    let old_hash = hash(&rig.pods()[0]);
    rig.update("graceful");
    // The first old pod replaced, and its clients' failures seen.
    rig.run_until("a new pod held", Duration::from_mins(1), |rig| {
        held(rig.pods().iter())
            .iter()
            .any(|(_, reason, _)| reason == "DrainFailed")
    });
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
        "one old pod failed its clients: {failed:?}"
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
    let status = rig.deployment().status.unwrap_or_default();
    assert_eq!(status.ready_replicas, Some(3), "{status:#?}");
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
    let verdict = rig.verdict();
    assert_eq!(verdict["verdict"], "fail", "{verdict:#}");
}

/// An agent that cannot be asked leaves the gate without evidence: the new pod that replaced an
/// old one stays `False`, `NoEvidence`, naming the agent, and the rollout stops there.
#[test]
fn an_unreachable_agent_holds_the_rollout_as_no_evidence() {
    let mut rig = Rig::start("blind");
    rig.create("graceful");
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
