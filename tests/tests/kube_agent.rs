//! The agent as the DaemonSet runs it (`deploy/base/agent.yaml`): `--source kubernetes`, as uid 0
//! with every capability gone but the ones the DaemonSet adds, read from the manifest itself
//! (`CAP_BPF`, `CAP_PERFMON`, `CAP_NET_ADMIN`), against a local server answering in the
//! API server's JSON (`draingate_tests::kube_api`). The pod it lists has the address of a real
//! network namespace, as a CNI would have set it up; the kernel programs must count that pod's
//! refusals under its Kubernetes name, and its deletionTimestamp must open its window. When the
//! API server goes away, `/readyz` must say so while the kernel keeps counting.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use draingate_tests::{
    ChildGuard, Family, Link, NodeLink, PinDir, draingate_bin, free_port, http_request,
    kube_api::{FakeKubeApi, pod},
    pod_json, require_root,
};
use serde_json::{Value, json};

fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, "").ok()
}

fn wait_for(what: &str, mut check: impl FnMut() -> Option<Value>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "never saw {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The capabilities `deploy/base/agent.yaml` adds to the agent's container, each with its
/// number.
fn daemonset_capabilities() -> Vec<(String, u32)> {
    use serde::Deserialize as _;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/agent.yaml");
    let text = std::fs::read_to_string(path).expect("deploy/base/agent.yaml");
    let daemonset = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("a YAML document"))
        .find(|doc| doc["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let added = &daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
        ["add"];
    added
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|name| {
            let name = name.as_str().expect("a name").to_owned();
            let number = match name.as_str() {
                "NET_ADMIN" => 12,
                "PERFMON" => 38,
                "BPF" => 39,
                other => panic!("{path} adds {other}: give this test its number"),
            };
            (name, number)
        })
        .collect()
}

/// Where the pod's client is, and where the agent counts the resets the pod sends from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// A client in a namespace beside the pod's; resets from the kernel's choice of source.
    BesidePod,
    /// The pod's veth peer in the node's namespace, as a CNI sets it up, the client on the
    /// node, and resets counted from the packets (as on kernels before 6.10): the agent puts
    /// its TC program on the node's side of the pod's interface. A client on the node is the
    /// kubelet's probe: its refusals are counted `from_node`, never as errors, which proves the
    /// agent reads the node's addresses with only the DaemonSet's capabilities.
    NodeSidePackets,
}

#[test]
fn the_kubernetes_agent_counts_a_pods_failures_with_only_the_daemonsets_capabilities() {
    kubernetes_agent_counts_a_pods_failures(Setup::BesidePod);
}

#[test]
fn the_kubernetes_agent_counts_refusals_from_packets_on_the_nodes_side_of_the_pod() {
    kubernetes_agent_counts_a_pods_failures(Setup::NodeSidePackets);
}

/// A connect to the pod's closed port from the client, refused.
struct Client {
    beside: Option<Link>,
    node: Option<NodeLink>,
}

impl Client {
    fn pod_addr(&self) -> std::net::IpAddr {
        self.beside
            .as_ref()
            .map_or_else(|| self.node.as_ref().expect("one").pod_addr, |l| l.b_addr)
    }

    fn refused(&self, port: u16) -> bool {
        let closed = std::net::SocketAddr::new(self.pod_addr(), port);
        match &self.beside {
            Some(link) => link.a.run(|| std::net::TcpStream::connect(closed)).is_err(),
            None => std::net::TcpStream::connect_timeout(&closed, Duration::from_secs(2))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        }
    }
}

fn kubernetes_agent_counts_a_pods_failures(setup: Setup) {
    require_root();
    let runtime = draingate_tests::kube_api::runtime();
    let client = match setup {
        // The pod's network namespace (b), and a client beside it (a).
        Setup::BesidePod => Client {
            beside: Some(Link::new("dgka", Family::V4)),
            node: None,
        },
        Setup::NodeSidePackets => Client {
            beside: None,
            node: Some(NodeLink::new("dgkn")),
        },
    };
    let name = "web-7c9d5b8f4-x2kqz";
    let listed = pod(
        name,
        "uid-kube-1",
        &client.pod_addr().to_string(),
        Some(("web-7c9d5b8f4", "pod-template-hash", "7c9d5b8f4")),
    );
    let api = runtime.block_on(FakeKubeApi::start(vec![listed.clone()], vec![]));
    let dir = std::env::temp_dir().join(format!(
        "draingate-kube-agent-{}-{}",
        std::process::id(),
        setup as u8
    ));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let kubeconfig = api.kubeconfig(&dir);
    let pins = PinDir::new();
    let socket = dir.join("agent.sock").display().to_string();
    let http = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join("agent.log")).expect("log");
    let capabilities = daemonset_capabilities();
    let bounding: String = capabilities.iter().fold(String::new(), |all, (name, _)| {
        all + ",+" + &name.to_lowercase()
    });
    let mut agent = ChildGuard(
        Command::new("setpriv")
            // uid 0 keeps only what the bounding set allows across exec: the DaemonSet's.
            .arg(format!("--bounding-set=-all{bounding}"))
            .arg("--inh-caps=-all")
            .arg(draingate_bin())
            .args(["agent", "--source", "kubernetes", "--node-name", "node-a"])
            .args(["--grpc-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--http-addr", &http, "--socket", &socket])
            .arg("--pin-dir")
            .arg(&pins.config.pin_dir)
            .env("KUBECONFIG", &kubeconfig)
            .env(
                "DRAINGATE_RESET_SOURCE",
                if setup == Setup::NodeSidePackets {
                    "packets"
                } else {
                    "auto"
                },
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run the agent"),
    );
    let agent_log = || std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&http, "/readyz").map(|r| r.0) != Some(200) {
        if let Ok(Some(status)) = agent.0.try_wait() {
            panic!("the agent exited ({status}):\n{}", agent_log());
        }
        assert!(
            Instant::now() < deadline,
            "the agent never became ready: {:?}\n{}",
            get(&http, "/readyz"),
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its capabilities really are the DaemonSet's.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.0.id())).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        effective,
        capabilities.iter().map(|(_, n)| 1u64 << n).sum::<u64>(),
        "exactly {capabilities:?}"
    );

    // Listed under its Kubernetes identity, with its owner.
    let seen = wait_for("the pod", || pod_json(&socket, name));
    assert_eq!(seen["namespace"], "shop", "{seen:#}");
    assert_eq!(
        (
            &seen["owner_kind"],
            &seen["owner_name"],
            &seen["pod_template_hash"],
            &seen["node"]
        ),
        (
            &json!("Deployment"),
            &json!("web"),
            &json!("7c9d5b8f4"),
            &json!("node-a")
        ),
        "{seen:#}"
    );
    assert_eq!(seen["phase"], "running", "{seen:#}");
    assert_eq!(seen["addresses"][0], client.pod_addr().to_string());

    // A refused connection to it is counted in the kernel: a client's as a refusal, a probe's
    // (from the node's own address) apart.
    let (counted_as, other) = match setup {
        Setup::BesidePod => ("refused", "from_node"),
        Setup::NodeSidePackets => ("from_node", "refused"),
    };
    assert!(client.refused(9));
    let first = wait_for("the refusal", || {
        pod_json(&socket, name).filter(|p| p[counted_as] == 1)
    });
    assert_eq!(first[other], 0, "{first:#}");

    // Deleted: the deletionTimestamp opens its window; a refusal now is an error and fails it.
    // Kubernetes' timestamps have whole seconds: wait for the next second, so the deletion's
    // (truncated) timestamp is not before the first refusal, which would put it in the window.
    let since_second = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .subsec_nanos();
    std::thread::sleep(
        Duration::from_nanos(u64::from(1_000_000_000 - since_second)) + Duration::from_millis(20),
    );
    let mut deleting = listed;
    deleting["metadata"]["deletionTimestamp"] =
        json!(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
    deleting["metadata"]["resourceVersion"] = json!("1002");
    api.pod_event("MODIFIED", &deleting);
    wait_for("the termination", || {
        pod_json(&socket, name).filter(|p| p["phase"] == "terminating")
    });
    std::thread::sleep(Duration::from_millis(1100));
    assert!(client.refused(9));
    let in_window = wait_for("the refusal in the window", || {
        pod_json(&socket, name).filter(|p| p[counted_as] == 2)
    });
    // A client's refusal is an error and fails the pod; a probe's is not.
    let errors = u64::from(setup == Setup::BesidePod);
    assert_eq!(in_window["errors"], errors, "{in_window:#}");
    assert_eq!(in_window[other], 0, "{in_window:#}");
    if setup == Setup::BesidePod {
        assert_eq!(in_window["verdict"], "fail", "{in_window:#}");
    } else {
        assert_ne!(in_window["verdict"], "fail", "{in_window:#}");
    }
    // Only this node's pods were asked for.
    assert!(
        api.requests()
            .iter()
            .filter(|(path, _)| path == "pods")
            .all(
                |(_, q)| q.get("fieldSelector").map(String::as_str) == Some("spec.nodeName=node-a")
            )
    );

    // The API server goes away: /readyz says so, and the kernel keeps counting meanwhile.
    drop(api);
    runtime.shutdown_timeout(Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = get(&http, "/readyz");
        if let Some((503, reason)) = &ready
            && reason.contains("node-a")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never reported the lost API server: {ready:?}\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(client.refused(9));
    let counted = wait_for("a refusal while the API is gone", || {
        pod_json(&socket, name).filter(|p| p[counted_as] == 3)
    });
    assert_eq!(counted["errors"], 2 * errors, "{counted:#}");
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = agent.0.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
