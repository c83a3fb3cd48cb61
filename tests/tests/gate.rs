//! The rollout gate end to end: real agents as processes on loopback (the embedded agent of a
//! real `draingate rehearse`, serving its API on TCP, and a plain `draingate agent`), a real
//! `draingate gate serve`, and the questions rollout tools and pipelines ask it: `gate check`
//! (exit codes), `GET /v1/verdict` and Flagger's webhooks. The gate's verdict on a rehearsed
//! rollout must be the rehearsal's; an agent killed mid-check must make it unknown.

use std::{
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use draingate_tests::{
    ChildGuard, Family, Link, PinDir, build_bin, draingate_bin, free_port, http_request,
    kube_api::{self, FakeKubeApi},
    require_root,
};
use serde_json::{Value, json};

/// Each test rehearses a rollout: one at a time, as in the accuracy suite.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `METHOD path` with an optional JSON body against `addr`: status and body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    http_request(addr, method, path, body).expect("HTTP request to the gate")
}

/// Waits until `addr` answers `/healthz`.
fn wait_healthy(addr: &str, what: &mut ChildGuard) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() || http(addr, "GET", "/healthz", "").0 != 200
    {
        if let Ok(Some(status)) = what.0.try_wait() {
            panic!("the process serving {addr} exited: {status}");
        }
        assert!(Instant::now() < deadline, "{addr} never became healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A rehearsal whose embedded agent serves on `agent_port` and stays up after its report.
/// Dropping it interrupts the rehearsal, which removes its namespaces, rules and pins.
struct HeldRehearsal {
    child: ChildGuard,
    report: Value,
}

impl Drop for HeldRehearsal {
    fn drop(&mut self) {
        if matches!(self.child.0.try_wait(), Ok(None)) {
            self.child.signal(nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.child.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn rehearse_and_hold(agent_port: u16, server_mode: &str, extra: &[&str]) -> HeldRehearsal {
    rehearse_and_hold_server(agent_port, &["--mode", server_mode], extra)
}

fn rehearse_and_hold_server(agent_port: u16, server: &[&str], extra: &[&str]) -> HeldRehearsal {
    let dir = std::env::temp_dir().join(format!("draingate-gate-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let report_path = dir.join(format!("report-{agent_port}.json"));
    let _ = std::fs::remove_file(&report_path);
    let log_path = dir.join(format!("rehearse-{agent_port}.log"));
    let log = std::fs::File::create(&log_path).expect("log file");
    let child = Command::new(draingate_bin())
        .arg("rehearse")
        .args([
            "--replicas",
            "2",
            "--rate",
            "500",
            "--clients",
            "8",
            "--name",
            "shop-web",
        ])
        .args(["--agent-listen", &format!("127.0.0.1:{agent_port}")])
        .args(["--hold", "300s", "--report"])
        .arg(&report_path)
        .args(extra)
        .args(["-o", "json", "--"])
        .arg(build_bin("draingate-test-server"))
        .args(server)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("run draingate rehearse");
    let mut child = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_mins(3);
    let report = loop {
        if let Ok(text) = std::fs::read_to_string(&report_path)
            && let Ok(report) = serde_json::from_str::<Value>(&text)
        {
            break report;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!(
                "the rehearsal ended without a report: {status}; its output:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the rehearsal took too long; its output is in {}",
            log_path.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    HeldRehearsal { child, report }
}

fn gate_serve(agents: &[String]) -> (ChildGuard, String, String) {
    let (http_addr, grpc_addr) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let child = Command::new(draingate_bin())
        .args(["gate", "serve", "--agents", &agents.join(",")])
        .args(["--http-addr", &http_addr, "--grpc-addr", &grpc_addr])
        .args(["--poll", "1s", "--agent-timeout", "1s"])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("run draingate gate serve");
    let mut child = ChildGuard(child);
    wait_healthy(&http_addr, &mut child);
    (child, http_addr, grpc_addr)
}

/// `draingate gate check ... -o json`: exit code and answer.
fn gate_check(grpc: &str, report: &Value, extra: &[&str]) -> (i32, Value) {
    let output = Command::new(draingate_bin())
        .args(["gate", "check", "--gate", grpc])
        .args([
            "--namespace",
            report["namespace"].as_str().expect("namespace"),
        ])
        .args([
            "--workload",
            &format!("deploy/{}", report["workload"].as_str().expect("workload")),
        ])
        .args(["--old", report["old_hash"].as_str().expect("old hash")])
        .args(extra)
        .args(["-o", "json"])
        .output()
        .expect("run draingate gate check");
    let code = output.status.code().unwrap_or(-1);
    let answer = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "no JSON answer ({err}), exit {code}: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (code, answer)
}

fn old_agent_errors(report: &Value) -> u64 {
    report["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter(|p| p["role"] == "old")
        .map(|p| p["agent"]["errors"].as_u64().expect("errors"))
        .sum()
}

fn verdict_query(report: &Value) -> String {
    format!(
        "/v1/verdict?ns={}&workload={}&old={}",
        report["namespace"].as_str().unwrap(),
        report["workload"].as_str().unwrap(),
        report["old_hash"].as_str().unwrap()
    )
}

fn flagger_payload(report: &Value) -> String {
    serde_json::json!({
        "name": report["workload"],
        "namespace": report["namespace"],
        "phase": "Progressing",
        "checksum": "abc",
        "metadata": {"old": report["old_hash"]},
    })
    .to_string()
}

/// New pods that take traffic before their server listens fail the rollout through the gate
/// too, named, with the clients' count, though every old pod drained clean.
#[test]
fn new_pods_that_refused_clients_fail_the_rollout_through_the_gate() {
    require_root();
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rehearse_port = free_port();
    let held = rehearse_and_hold_server(
        rehearse_port,
        &["--mode", "graceful", "--startup-delay", "2s"],
        &[
            "--pre-stop",
            "2s",
            "--no-readiness",
            "--connections",
            "new-connection",
        ],
    );
    let report = &held.report;
    assert_eq!(report["verdict"], "fail", "{report:#}");
    assert_eq!(old_agent_errors(report), 0, "{report:#}");
    let new_pods: Vec<&Value> = report["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter(|p| p["role"] == "new")
        .collect();
    let startup: u64 = new_pods
        .iter()
        .map(|p| p["agent"]["startup_errors"].as_u64().expect("count"))
        .sum();
    let clients: u64 = new_pods
        .iter()
        .map(|p| p["client_connection_errors"].as_u64().expect("count"))
        .sum();
    assert!(startup > 0 && startup == clients, "{report:#}");
    let (_gate, _http, grpc) = gate_serve(&[format!("127.0.0.1:{rehearse_port}")]);
    let (code, answer) = gate_check(&grpc, report, &["--wait", "--timeout", "30s"]);
    assert_eq!(
        (code, &answer["verdict"]),
        (1, &Value::from("fail")),
        "{answer:#}"
    );
    assert_eq!(
        answer["failedRequests"].as_u64(),
        Some(startup),
        "{answer:#}"
    );
    let reason = answer["reason"].as_str().expect("reason");
    let failing = new_pods
        .iter()
        .filter(|p| p["agent"]["startup_errors"].as_u64() > Some(0))
        .map(|p| p["name"].as_str().expect("name"));
    for name in failing {
        assert!(reason.contains(name), "{name} not named: {reason}");
    }
}

/// An abrupt server loses requests: the gate says fail, with the rehearsal's numbers, on every
/// face; then a second agent is killed and the verdict becomes unknown, naming it.
#[test]
fn a_dirty_rehearsed_rollout_fails_through_the_gate_and_a_killed_agent_makes_it_unknown() {
    require_root();
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rehearse_port = free_port();
    let held = rehearse_and_hold(rehearse_port, "abrupt", &["--pre-stop", "0s"]);
    assert_eq!(held.report["verdict"], "fail", "{:#}", held.report);

    // A second node's agent: a plain `draingate agent` process of its own.
    let pins = PinDir::new();
    let other_port = free_port();
    let other_http = format!("127.0.0.1:{}", free_port());
    let socket = std::env::temp_dir().join(format!("draingate-gate-test-{other_port}.sock"));
    let mut other = ChildGuard(
        Command::new(draingate_bin())
            .arg("agent")
            .args(["--grpc-addr", &format!("127.0.0.1:{other_port}")])
            .args(["--http-addr", &other_http])
            .arg("--socket")
            .arg(&socket)
            .arg("--pin-dir")
            .arg(&pins.config.pin_dir)
            .env("NODE_NAME", "node-b")
            .stderr(Stdio::null())
            .spawn()
            .expect("run draingate agent"),
    );
    wait_healthy(&other_http, &mut other);

    let agents = [
        format!("127.0.0.1:{rehearse_port}"),
        format!("127.0.0.1:{other_port}"),
    ];
    let (_gate, http_addr, grpc) = gate_serve(&agents);
    let report = &held.report.clone();

    let (code, answer) = gate_check(&grpc, report, &["--wait", "--timeout", "30s"]);
    assert_eq!(
        (code, &answer["verdict"]),
        (1, &Value::from("fail")),
        "{answer:#}"
    );
    assert_eq!(answer["terminatingPods"], 2, "{answer:#}");
    assert_eq!(answer["agentsAnswered"], 2, "{answer:#}");
    assert_eq!(
        answer["failedRequests"].as_u64(),
        Some(old_agent_errors(report)),
        "the gate counts what the rehearsal's agent counted: {answer:#}"
    );
    // The abrupt exit failed the pods: with resets when it caught requests in flight, with
    // connections cut at the exit either way (which of the two is up to timing).
    let old_open_at_exit: u64 = report["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter(|p| p["role"] == "old")
        .map(|p| p["agent"]["open_at_exit"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        answer["inflightAtKill"].as_u64(),
        Some(old_open_at_exit),
        "{answer:#}"
    );
    assert!(
        answer["failedRequests"].as_u64().unwrap_or(0) + old_open_at_exit > 0,
        "{answer:#}"
    );

    let (status, body) = http(&http_addr, "GET", &verdict_query(report), "");
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["verdict"], "fail");
    let (status, body) = http(
        &http_addr,
        "POST",
        "/flagger/gate",
        &flagger_payload(report),
    );
    assert_eq!(status, 412, "a dirty rollout holds Flagger: {body}");
    let (status, body) = http(
        &http_addr,
        "POST",
        "/flagger/rollback",
        &flagger_payload(report),
    );
    assert_eq!(
        status, 200,
        "a dirty rollout makes Flagger roll back: {body}"
    );
    assert_eq!(
        http(
            &http_addr,
            "POST",
            "/flagger/events",
            &flagger_payload(report)
        )
        .0,
        200
    );

    // Kill the other node's agent while a check waits (on the new pods, none of which has
    // terminated: pending until the agent dies). The evidence from that node is missing, so
    // the answer is not pass but unknown, naming the node.
    let checker = Command::new(draingate_bin())
        .args([
            "gate",
            "check",
            "--gate",
            &grpc,
            "-o",
            "json",
            "--wait",
            "--timeout",
            "6s",
        ])
        .args(["--namespace", report["namespace"].as_str().unwrap()])
        .args([
            "--workload",
            &format!("deploy/{}", report["workload"].as_str().unwrap()),
        ])
        .args(["--old", report["new_hash"].as_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run gate check");
    std::thread::sleep(Duration::from_secs(2));
    other.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = other.0.wait();
    let output = checker.wait_with_output().expect("gate check");
    let answer: Value = serde_json::from_slice(&output.stdout).expect("JSON answer");
    assert_eq!(
        (output.status.code(), &answer["verdict"]),
        (Some(3), &Value::from("unknown")),
        "{answer:#}"
    );
    assert!(
        answer["unreachableNodes"].to_string().contains("node-b"),
        "{answer:#}"
    );
    assert!(
        answer["reason"].as_str().unwrap().contains("node-b"),
        "{answer:#}"
    );

    let (code, answer) = gate_check(&grpc, report, &[]);
    assert_eq!(
        (code, &answer["verdict"]),
        (1, &Value::from("fail")),
        "a known failure stays conclusive: {answer:#}"
    );
    // The rehearsal's agent is the one that knows the pods; without it the gate cannot judge.
    drop(held);
    // The gate shares a round of answers for 500 ms: one asked just before the rehearsal
    // exited may still be served. Past that, every answer is from after the exit.
    std::thread::sleep(Duration::from_secs(1));
    let (code, answer) = gate_check(&grpc, report, &["--wait", "--timeout", "3s"]);
    assert_eq!(
        (code, &answer["verdict"]),
        (3, &Value::from("unknown")),
        "{answer:#}"
    );
    let unreachable = answer["unreachableNodes"].to_string();
    assert!(
        unreachable.contains("node-b") && unreachable.contains(&rehearse_port.to_string()),
        "{answer:#}"
    );
    let (status, body) = http(&http_addr, "GET", &verdict_query(report), "");
    assert_eq!(
        status, 200,
        "Argo gets 200 with the verdict in the body: {body}"
    );
    assert!(body.contains("\"verdict\":\"unknown\""), "{body}");
    let (status, _) = http(
        &http_addr,
        "POST",
        "/flagger/gate",
        &flagger_payload(report),
    );
    assert_eq!(status, 412, "unknown never passes a Flagger gate");
    let _ = std::fs::remove_file(socket);
}

/// A server that drains (preStop covering the endpoint propagation, graceful shutdown) loses
/// nothing: the gate says pass, as the rehearsal did; bad questions get clear 4xx answers.
#[test]
fn a_clean_rehearsed_rollout_passes_through_the_gate_and_bad_questions_are_4xx() {
    require_root();
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rehearse_port = free_port();
    let held = rehearse_and_hold(rehearse_port, "graceful", &["--pre-stop", "2s"]);
    let report = &held.report;
    assert_eq!(report["verdict"], "pass", "{report:#}");
    let (_gate, http_addr, grpc) = gate_serve(&[format!("127.0.0.1:{rehearse_port}")]);

    let (code, answer) = gate_check(&grpc, report, &["--wait", "--timeout", "30s"]);
    assert_eq!(
        (code, &answer["verdict"]),
        (0, &Value::from("pass")),
        "{answer:#}"
    );
    assert_eq!(
        (
            answer["terminatingPods"].as_u64(),
            answer["drainedPods"].as_u64()
        ),
        (Some(2), Some(2))
    );
    assert_eq!(answer["failedRequests"], 0);
    // The new pods are not judged: asking about them is "nothing terminated yet".
    let new_only = [
        "--namespace",
        report["namespace"].as_str().unwrap(),
        "--workload",
        &format!("deploy/{}", report["workload"].as_str().unwrap()),
        "--old",
        report["new_hash"].as_str().unwrap(),
    ];
    let output = Command::new(draingate_bin())
        .args(["gate", "check", "--gate", &grpc])
        .args(new_only)
        .output()
        .expect("gate check");
    assert_eq!(
        output.status.code(),
        Some(2),
        "pending: {}",
        String::from_utf8_lossy(&output.stdout)
    );

    let (status, body) = http(
        &http_addr,
        "POST",
        "/flagger/gate",
        &flagger_payload(report),
    );
    assert_eq!(status, 200, "{body}");
    let (status, _) = http(
        &http_addr,
        "POST",
        "/flagger/rollback",
        &flagger_payload(report),
    );
    assert_eq!(status, 412, "a clean rollout is not rolled back");

    for (path, status) in [
        ("/v1/verdict?ns=default&workload=nosuchapp", 404),
        ("/v1/verdict?ns=default", 400),
        ("/v1/verdict?ns=default&workload=shop-web&colour=red", 400),
        ("/v1/verdict?ns=default&workload=shop-web&wait=forever", 400),
        ("/v1/verdict?ns=Default&workload=shop-web", 400),
    ] {
        let (got, body) = http(&http_addr, "GET", path, "");
        assert_eq!(got, status, "{path}: {body}");
        assert!(body.contains("\"error\""), "{path}: {body}");
    }
    let (status, _) = http(&http_addr, "POST", "/flagger/gate", "{not json");
    assert_eq!(status, 400);
    let huge = format!("{{\"name\":\"{}\"}}", "x".repeat(100_000));
    assert_eq!(http(&http_addr, "POST", "/flagger/gate", &huge).0, 413);
    let output = Command::new(draingate_bin())
        .args([
            "gate",
            "check",
            "--gate",
            &grpc,
            "-n",
            "default",
            "--workload",
            "deploy/nosuchapp",
        ])
        .output()
        .expect("gate check");
    assert_eq!(output.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no agent knows"),
        "{output:?}"
    );

    let (_, metrics) = http(&http_addr, "GET", "/metrics", "");
    assert!(metrics.contains("draingate_gate_checks_total"), "{metrics}");
    assert!(
        metrics.contains("draingate_gate_agents{state=\"answered\"} 1"),
        "{metrics}"
    );
    drop(held);
}

/// A `draingate agent --source kubernetes` process for node `node`, whose API server is `api`;
/// returns it with its gRPC address once it is ready.
fn kube_agent(
    node: &str,
    api: &FakeKubeApi,
    dir: &std::path::Path,
    pins: &PinDir,
) -> (ChildGuard, String) {
    let grpc = format!("127.0.0.1:{}", free_port());
    let http_addr = format!("127.0.0.1:{}", free_port());
    let mut agent = ChildGuard(
        Command::new(draingate_bin())
            .args(["agent", "--source", "kubernetes", "--node-name", node])
            .args(["--grpc-addr", &grpc, "--http-addr", &http_addr])
            .arg("--socket")
            .arg(dir.join(format!("{node}.sock")))
            .arg("--pin-dir")
            .arg(&pins.config.pin_dir)
            .env("KUBECONFIG", api.kubeconfig(&dir.join(node)))
            .stderr(Stdio::null())
            .spawn()
            .expect("run draingate agent"),
    );
    wait_healthy(&http_addr, &mut agent);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(&http_addr, "GET", "/readyz", "").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the agent of {node} never became ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (agent, grpc)
}

/// The peer view across nodes. A pod of the rollout on node-a drains clean and the gate says
/// pass; then a client pod on node-b connects to the pod's address and gets no answer (as from
/// a sandbox that is gone). Only node-b's kernel saw that; the gate must match it to the pod on
/// node-a and fail the rollout, naming the client and its node. Each node's agent is a real
/// `--source kubernetes` process against its own local API server (`kube_api`: the API's JSON,
/// written by hand; no API server runs here) with its own kernel programs.
#[test]
fn a_failed_connect_seen_only_on_another_node_fails_the_rollout_through_the_gate() {
    require_root();
    let runtime = kube_api::runtime();
    // a: the client pod's namespace (node-b); b: the server pod's (node-a).
    let link = Link::new("dgpx", Family::V4);
    let server = kube_api::pod(
        "web-7c9d5b8f4-p33r",
        "uid-peer-server",
        &link.b_addr.to_string(),
        Some(("web-7c9d5b8f4", "pod-template-hash", "7c9d5b8f4")),
    );
    let mut client = kube_api::pod(
        "shop-client",
        "uid-peer-client",
        &link.a_addr.to_string(),
        None,
    );
    client["spec"]["nodeName"] = json!("node-b");
    let api_a = runtime.block_on(FakeKubeApi::start(vec![server.clone()], vec![]));
    let api_b = runtime.block_on(FakeKubeApi::start(vec![client], vec![]));
    let dir = std::env::temp_dir().join(format!("draingate-gate-peer-{}", std::process::id()));
    for node in ["node-a", "node-b"] {
        std::fs::create_dir_all(dir.join(node)).expect("temporary directory");
    }
    let (pins_a, pins_b) = (PinDir::new(), PinDir::new());
    let (_agent_a, grpc_a) = kube_agent("node-a", &api_a, &dir, &pins_a);
    let (_agent_b, grpc_b) = kube_agent("node-b", &api_b, &dir, &pins_b);
    let (_gate, _http, gate) = gate_serve(&[grpc_a, grpc_b]);
    let rollout = json!({"namespace": "shop", "workload": "web", "old_hash": "7c9d5b8f4"});

    // Deleted with nothing open, and its container exited: it drained clean, and the gate says
    // so (not before the exit: until then it could still fail clients).
    let mut deleting = server;
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    deleting["metadata"]["deletionTimestamp"] = json!(now);
    deleting["status"]["containerStatuses"][0]["state"] =
        json!({"terminated": {"exitCode": 0, "startedAt": now, "finishedAt": now}});
    deleting["metadata"]["resourceVersion"] = json!("1002");
    api_a.pod_event("MODIFIED", &deleting);
    let (code, answer) = gate_check(&gate, &rollout, &["--wait", "--timeout", "30s"]);
    assert_eq!(
        (code, &answer["verdict"]),
        (0, &json!("pass")),
        "{answer:#}"
    );

    // Its address now answers "host unreachable"; the client on node-b tries it.
    link.b.unreachable_port(8080);
    let target = std::net::SocketAddr::new(link.b_addr, 8080);
    let (unanswered, client_port) = link.a.run(|| {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&std::net::SocketAddr::new(link.a_addr, 0).into())
            .expect("bind");
        let port = socket
            .local_addr()
            .expect("address")
            .as_socket()
            .expect("inet")
            .port();
        (
            socket.connect_timeout(&target.into(), Duration::from_secs(2)),
            port,
        )
    });
    let err = unanswered.expect_err("no answer from the pod");
    assert_eq!(err.raw_os_error(), Some(libc::EHOSTUNREACH), "{err}");

    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let (code, answer) = gate_check(&gate, &rollout, &[]);
        if code == 1 {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "the gate never saw the peer's failure: {answer:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(answer["verdict"], "fail", "{answer:#}");
    assert_eq!(answer["failedRequests"], 1, "{answer:#}");
    let reason = answer["reason"].as_str().expect("reason");
    let client = format!("{}:{client_port} on node-b", link.a_addr);
    assert!(
        reason.contains("web-7c9d5b8f4-p33r on node-a") && reason.contains(&client),
        "the reason names the pod and the client that saw it fail: {reason}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mutual TLS between the gate and an agent, with the set `draingate tls-certs` writes: the
/// gate with the gate's certificate is answered; a gate without one, and a client without a
/// certificate, are refused at the handshake (never answered); the unix socket stays plain.
#[test]
fn the_gate_asks_agents_over_mutual_tls_and_clients_without_a_certificate_are_refused() {
    require_root();
    let dir = std::env::temp_dir().join(format!("draingate-tls-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let certs = dir.join("tls");
    let made = Command::new(draingate_bin())
        .args(["tls-certs", "--out"])
        .arg(&certs)
        .output()
        .expect("run draingate tls-certs");
    assert!(made.status.success(), "{made:?}");
    // A set is never overwritten.
    let again = Command::new(draingate_bin())
        .args(["tls-certs", "--out"])
        .arg(&certs)
        .output()
        .expect("run draingate tls-certs");
    assert!(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("exists"),
        "{again:?}"
    );

    let pins = PinDir::new();
    let grpc = format!("127.0.0.1:{}", free_port());
    let http_addr = format!("127.0.0.1:{}", free_port());
    let socket = dir.join("agent.sock");
    let mut agent = ChildGuard(
        Command::new(draingate_bin())
            .args(["agent", "--grpc-addr", &grpc, "--http-addr", &http_addr])
            .arg("--socket")
            .arg(&socket)
            .arg("--pin-dir")
            .arg(&pins.config.pin_dir)
            .arg("--tls")
            .arg(&certs)
            .stderr(Stdio::null())
            .spawn()
            .expect("run draingate agent"),
    );
    wait_healthy(&http_addr, &mut agent);

    let check = |grpc_gate: &str| {
        Command::new(draingate_bin())
            .args(["gate", "check", "--gate", grpc_gate, "-n", "default"])
            .args(["--workload", "deploy/nosuchapp", "-o", "json"])
            .output()
            .expect("gate check")
    };
    // With the gate's certificate: the agent answers (it knows no such workload).
    let (mut with_tls, _http, grpc_gate) = {
        let (http_gate, grpc_gate) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let mut child = ChildGuard(
            Command::new(draingate_bin())
                .args(["gate", "serve", "--agents", &grpc])
                .args(["--http-addr", &http_gate, "--grpc-addr", &grpc_gate])
                .arg("--agent-tls")
                .arg(&certs)
                .env("RUST_LOG", "warn")
                .spawn()
                .expect("run draingate gate serve"),
        );
        wait_healthy(&http_gate, &mut child);
        (child, http_gate, grpc_gate)
    };
    let answered = check(&grpc_gate);
    assert_eq!(answered.status.code(), Some(3), "{answered:?}");
    assert!(
        String::from_utf8_lossy(&answered.stderr).contains("no agent knows"),
        "{answered:?}"
    );
    let _ = with_tls.0.kill();

    // Without it: the agent could not be asked, so the verdict is unknown, naming it.
    let (_plain, _, grpc_plain) = gate_serve(std::slice::from_ref(&grpc));
    let refused = check(&grpc_plain);
    let answer: Value = serde_json::from_slice(&refused.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {refused:?}"));
    assert_eq!(answer["verdict"], "unknown", "{answer:#}");
    assert!(
        answer["reason"].as_str().is_some_and(|r| r.contains(&grpc)),
        "{answer:#}"
    );

    // A client without a certificate is refused on TCP; the unix socket answers.
    let pods = |agent: &str| {
        Command::new(draingate_bin())
            .args(["pods", "--agent", agent])
            .output()
            .expect("draingate pods")
    };
    assert!(!pods(&grpc).status.success());
    let local = pods(socket.to_str().expect("utf-8 path"));
    assert!(local.status.success(), "{local:?}");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
