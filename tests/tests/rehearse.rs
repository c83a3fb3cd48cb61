//! The accuracy suite: whole rolling updates rehearsed by the real `draingate rehearse` (real
//! namespaces, iptables DNAT, eBPF agent, load generator, the project's test server), one per
//! shutdown behaviour. In every one the agent's resets and refusals must equal the clients'
//! connection failures exactly, pod by pod, and its verdict must say what the clients lived
//! through. Rehearsals run one at a time: each one is a node's worth of load on two cores.

use std::{
    process::{Command, Output},
    sync::Mutex,
};

use draingate_tests::{build_bin, draingate_bin, require_root};
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `draingate rehearse ARGS -o json -- draingate-test-server SERVER_ARGS` and returns its
/// exit code and report.
fn rehearse(args: &[&str], server: &[&str]) -> (i32, Value) {
    require_root();
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let server_bin = build_bin("draingate-test-server");
    let output = Command::new(draingate_bin())
        .arg("rehearse")
        .args(["--replicas", "3", "--rate", "1000", "--clients", "16"])
        .args(args)
        .args(["-o", "json", "--"])
        .arg(&server_bin)
        .args(server)
        .output()
        .expect("run draingate rehearse");
    let code = output.status.code().unwrap_or(-1);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "no JSON report ({err}), exit {code}; stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (code, report)
}

fn old_pods(report: &Value) -> Vec<&Value> {
    report["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter(|p| p["role"] == "old")
        .collect()
}

fn n(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a count: {value}"))
}

/// What every rehearsal must show, whatever the scenario: the agent agrees with the clients on
/// every pod, and every client failure was attributed to a pod.
fn assert_agent_matches_clients(report: &Value) {
    let stalled = assert_counts_agree(report);
    assert_eq!(stalled, 0, "{report:#}");
}

/// The agent agrees with the clients on every pod, and every client failure but the requests
/// that stalled on an open connection without a packet of the pod's to show it is on some pod's
/// account. Returns how many stalled.
fn assert_counts_agree(report: &Value) -> u64 {
    assert_eq!(
        report["disagreements"],
        Value::Array(vec![]),
        "the agent disagrees with the clients: {report:#}"
    );
    let mut agent = 0;
    let mut clients = 0;
    for pod in report["pods"].as_array().expect("pods") {
        assert_eq!(pod["agrees"], true, "{pod:#}");
        assert_eq!(
            n(&pod["agent_connection_errors"]) + n(&pod["cut_at_exit"]),
            n(&pod["client_connection_errors"]),
            "{pod:#}"
        );
        // Connects that got no answer (a removed pod's address, a full accept queue): no
        // packet of the pod's, counted from the clients' side through conntrack.
        assert_eq!(
            n(&pod["agent_no_answer"]),
            n(&pod["client_no_answer"]),
            "{pod:#}"
        );
        // HTTP 5xx answers: read from the pod's packets, probes left out.
        assert_eq!(
            n(&pod["agent_http_5xx"]),
            n(&pod["client_http_5xx"]),
            "{pod:#}"
        );
        agent += n(&pod["agent_connection_errors"])
            + n(&pod["cut_at_exit"])
            + n(&pod["agent_no_answer"])
            + n(&pod["agent_http_5xx"]);
        clients += n(&pod["client_connection_errors"])
            + n(&pod["client_no_answer"])
            + n(&pod["client_http_5xx"]);
    }
    assert_eq!(agent, clients);
    // Every failure the clients saw is counted against some pod: only a request that timed out
    // on an open connection the pod never reset has no count.
    let seen: u64 = pod_sum(report, "client_timeouts_seen_by_pod");
    let stalled = report["clients"]["outcomes"]["timeout"]
        .as_u64()
        .unwrap_or(0)
        - seen;
    assert_eq!(
        n(&report["clients"]["failed"]),
        clients + stalled,
        "{report:#}"
    );
    assert_eq!(old_pods(report).len(), 3);
    stalled
}

/// `field` summed over every pod of the report.
fn pod_sum(report: &Value, field: &str) -> u64 {
    report["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .map(|p| n(&p[field]))
        .sum()
}

fn assert_verdicts(report: &Value, verdict: &str) {
    for pod in old_pods(report) {
        assert_eq!(pod["agent"]["verdict"], verdict, "{pod:#}");
    }
    assert_eq!(report["verdict"], verdict, "{report:#}");
}

#[test]
fn graceful_drain_with_a_pre_stop_passes_with_zero_failures() {
    let csv = std::env::temp_dir().join(format!("dg-requests-{}.csv", std::process::id()));
    let (code, report) = rehearse(
        &[
            "--pre-stop",
            "2s",
            "--requests",
            csv.to_str().expect("utf-8 path"),
            // The test server's readiness answers 503 once SIGTERM came: the recommended
            // practice, and no client's failure.
            "--readiness-path",
            "/health/ready",
            "--readiness-period",
            "200ms",
        ],
        &["--mode", "graceful"],
    );
    // Every request is on record, one line each.
    let lines = std::fs::read_to_string(&csv).expect("the requests file");
    let _ = std::fs::remove_file(&csv);
    assert_eq!(
        lines
            .lines()
            .skip(1)
            .filter(|l| l.contains(",ok,200,"))
            .count() as u64,
        n(&report["clients"]["requests"])
    );
    assert_agent_matches_clients(&report);
    assert_verdicts(&report, "pass");
    assert_eq!(n(&report["clients"]["failed"]), 0, "{report:#}");
    assert!(
        n(&report["clients"]["requests"]) > 5000,
        "the clients made load"
    );
    for pod in old_pods(&report) {
        let agent = &pod["agent"];
        assert_eq!(agent["open_at_exit"], 0);
        // The probes' answers are counted apart from the clients'.
        assert!(n(&agent["http_from_node"]) > 0, "{pod:#}");
        // The window opened at the deletion (as at a deletionTimestamp), 2 s before the SIGTERM
        // that ends the preStop; drained no later than the exit.
        let since = agent["terminating_since"].as_f64().expect("window opened");
        let deleted = pod["timeline"]["deleted"].as_f64().expect("deleted");
        let sigterm = pod["timeline"]["sigterm"].as_f64().expect("SIGTERM sent");
        assert!(
            (since - deleted).abs() < 0.1,
            "window at {since}, deleted at {deleted}"
        );
        assert!(
            sigterm - since > 1.9,
            "window at {since}, SIGTERM at {sigterm}"
        );
        assert!(agent["drained_at"].as_f64() <= agent["exited_at"].as_f64());
    }
    assert_eq!(code, 0, "exit 0: clean");
}

#[test]
fn abrupt_exit_with_keep_alive_clients_fails_and_counts_match() {
    let (code, report) = rehearse(&[], &["--mode", "abrupt"]);
    assert_agent_matches_clients(&report);
    assert_verdicts(&report, "fail");
    assert!(n(&report["clients"]["failed"]) > 0, "{report:#}");
    assert_eq!(code, 1, "exit 1: failures, agent and clients agree");
}

#[test]
fn requests_in_flight_when_the_server_exits_at_once_are_each_counted() {
    // Each request takes 30 ms, so at SIGTERM most keep-alive connections have one in flight:
    // the exit cuts them (a reset when the request was unread, a close when it was read), and
    // each client failure is on the agent's account of that pod, as a reset or as a connection
    // open at the exit.
    let (code, report) = rehearse(&[], &["--mode", "abrupt", "--request-time", "30ms"]);
    assert_agent_matches_clients(&report);
    assert_verdicts(&report, "fail");
    let cut: u64 = old_pods(&report)
        .iter()
        .map(|p| n(&p["client_connection_errors"]))
        .sum();
    assert!(cut > 0, "no request was cut: {report:#}");
    assert_eq!(code, 1, "exit 1: failures, agent and clients agree");
}

#[test]
fn clients_sent_to_a_removed_pod_through_the_service_ip_fail_the_rollout_and_are_counted() {
    // The server exits at once on SIGTERM and the kubelet removes its sandbox half a second
    // later, but the endpoint removal takes 3 s to reach the node: until then the Service's
    // DNAT sends new connections to an address nobody has. The clients' connects get no answer
    // (or "unreachable"); only the clients' side sees them, through conntrack.
    let (code, report) = rehearse(
        &["--connections", "new-connection", "--propagation", "3s"],
        &["--mode", "abrupt"],
    );
    assert_agent_matches_clients(&report);
    assert_verdicts(&report, "fail");
    let unanswered: u64 = old_pods(&report)
        .iter()
        .map(|p| n(&p["client_no_answer"]))
        .sum();
    assert!(unanswered > 0, "no connect went unanswered: {report:#}");
    for pod in old_pods(&report) {
        assert_eq!(
            n(&pod["agent"]["peer_failures"]),
            n(&pod["client_no_answer"]),
            "{pod:#}"
        );
    }
    assert_eq!(code, 1, "exit 1: failures, agent and clients agree");
}

#[test]
fn no_pre_stop_so_new_connections_arrive_after_sigterm_and_are_refused() {
    // A graceful server, but SIGTERM comes while the endpoint is still in the Service: every
    // new connection in that second is refused.
    let (code, report) = rehearse(
        &["--connections", "new-connection"],
        &["--mode", "graceful"],
    );
    assert_agent_matches_clients(&report);
    assert_verdicts(&report, "fail");
    // The old pods' refusals, as the clients saw them (a new pod may refuse one too).
    let refused: u64 = old_pods(&report)
        .iter()
        .map(|p| p["client_failures"]["refused"].as_u64().unwrap_or(0))
        .sum();
    assert!(refused > 0, "{report:#}");
    // Probes come from the node's addresses: the agent leaves them out of its counts.
    let agent_refused: u64 = old_pods(&report)
        .iter()
        .map(|p| n(&p["agent"]["refused"]))
        .sum();
    assert_eq!(agent_refused, refused);
    assert_eq!(code, 1);
}

fn new_pods(report: &Value) -> Vec<&Value> {
    report["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter(|p| p["role"] == "new")
        .collect()
}

#[test]
fn new_pods_without_a_readiness_probe_refuse_clients_and_fail_the_rollout() {
    // The old pods drain well (a preStop covers the endpoint removal), but the new ones take
    // traffic a second before their server listens: the rollout fails on them alone.
    let (code, report) = rehearse(
        &[
            "--connections",
            "new-connection",
            "--pre-stop",
            "2s",
            "--no-readiness",
        ],
        &["--mode", "graceful", "--startup-delay", "2s"],
    );
    assert_agent_matches_clients(&report);
    for pod in old_pods(&report) {
        assert_eq!(pod["agent"]["verdict"], "pass", "{pod:#}");
    }
    assert_eq!(report["verdict"], "fail", "{report:#}");
    let client_refused: u64 = new_pods(&report)
        .iter()
        .map(|p| p["client_failures"]["refused"].as_u64().unwrap_or(0))
        .sum();
    let agent_startup: u64 = new_pods(&report)
        .iter()
        .map(|p| n(&p["agent"]["startup_errors"]))
        .sum();
    assert!(client_refused > 0, "{report:#}");
    assert_eq!(agent_startup, client_refused, "{report:#}");
    // Each failing new pod is named, with what it did.
    let reasons = report["reasons"].to_string();
    assert!(
        reasons.contains("app-v2-")
            && reasons.contains("refused")
            && reasons.contains("readiness probe"),
        "{reasons}"
    );
    assert_eq!(code, 1, "exit 1: failures, agent and clients agree");
}

#[test]
fn a_server_whose_accept_queue_overflows_fails_and_each_dropped_connect_is_counted() {
    // A server that accepts 10 connections a second with a backlog of 2 (3 pods queue fewer than
    // the 16 clients), behind a readiness
    // probe and a preStop: the kernel drops the SYNs its full accept queue cannot take, so
    // clients' connects time out, on old pods and new ones alike. No packet of the pod's says
    // so: the agent counts each from the clients' side, through the Service's conntrack entry.
    let (code, report) = rehearse(
        &["--connections", "new-connection", "--pre-stop", "2s"],
        &[
            "--mode",
            "graceful",
            "--backlog",
            "2",
            "--accept-pause",
            "100ms",
        ],
    );
    // With 16 clients and room for 2, some handshakes pass the SYN check and then meet a full
    // accept queue at their last ACK: the client sends its request on a connection the server
    // does not have yet. Those whose answer came after the client gave up are on the pod's
    // account (its kernel got the client's reset); one the server never took before it stopped
    // listening is a stall no packet of the pod's shows, left out of the counts (the rollout
    // fails on the rest anyway, and rehearse calls a pass with such a stall a defect).
    let stalled = assert_counts_agree(&report);
    eprintln!("requests stalled in a half-open handshake: {stalled}");
    let no_answer: u64 = pod_sum(&report, "client_no_answer");
    assert!(no_answer > 0, "no connect timed out: {report:#}");
    assert_eq!(report["verdict"], "fail", "{report:#}");
    let reasons = report["reasons"].to_string();
    assert!(
        reasons.contains("got no answer") && reasons.contains("accept queue"),
        "{reasons}"
    );
    assert_eq!(code, 1, "exit 1: failures, agent and clients agree");
}

#[test]
fn the_same_new_pods_behind_a_readiness_probe_pass_and_probes_are_not_errors() {
    // The readiness probe (from the node's address, as the kubelet's) is refused until the
    // server listens: those refusals are the node's, never the pod's errors.
    let (code, report) = rehearse(
        &[
            "--connections",
            "new-connection",
            "--pre-stop",
            "2s",
            "--readiness-path",
            "/",
            "--readiness-period",
            "200ms",
        ],
        &["--mode", "graceful", "--startup-delay", "2s"],
    );
    assert_agent_matches_clients(&report);
    assert_verdicts(&report, "pass");
    let mut probes = 0;
    for pod in new_pods(&report) {
        assert_eq!(n(&pod["agent"]["startup_errors"]), 0, "{pod:#}");
        // Every refused probe is the agent's `from_node`, one for one.
        assert_eq!(
            n(&pod["agent"]["from_node"]),
            n(&pod["probe_refusals"]),
            "{pod:#}"
        );
        probes += n(&pod["probe_refusals"]);
    }
    assert!(
        probes > 0,
        "the probes were refused while the server started: {report:#}"
    );
    assert_eq!(code, 0);
}

#[test]
fn an_exec_pre_stop_hook_runs_in_the_pod_before_the_stop_signal() {
    // Not a plain sleep: the rehearsal runs the hook itself, in the pod's network namespace,
    // and sends SIGTERM only once it returned.
    let manifest = std::env::temp_dir().join(format!("dg-exec-hook-{}.yaml", std::process::id()));
    std::fs::write(
        &manifest,
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: hook}
spec:
  replicas: 3
  strategy: {rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}
  selector: {matchLabels: {app: hook}}
  template:
    metadata: {labels: {app: hook}}
    spec:
      containers:
      - name: hook
        readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
        lifecycle:
          preStop:
            exec: {command: ["sh", "-c", "sleep 2 && ip -brief address show eth0 && echo hook-done"]}
"#,
    )
    .expect("write the manifest");
    let (code, report) = rehearse(
        &["-f", manifest.to_str().expect("utf-8 path")],
        &["--mode", "graceful"],
    );
    let _ = std::fs::remove_file(&manifest);
    assert_agent_matches_clients(&report);
    assert_verdicts(&report, "pass");
    assert!(
        report["settings"]["pre_stop"]
            .as_str()
            .is_some_and(|s| s.starts_with("exec sh -c")),
        "{report:#}"
    );
    let logs = std::path::PathBuf::from(report["logs"].as_str().expect("log dir"));
    for pod in old_pods(&report) {
        let deleted = pod["timeline"]["deleted"].as_f64().expect("deleted");
        let hook = pod["timeline"]["pre_stop_started"]
            .as_f64()
            .expect("hook ran");
        let sigterm = pod["timeline"]["sigterm"].as_f64().expect("SIGTERM");
        assert!(hook >= deleted && sigterm - hook > 1.9, "{pod:#}");
        // It ran in the pod's network namespace: it saw the pod's own interface.
        let name = pod["name"].as_str().expect("name");
        let log =
            std::fs::read_to_string(logs.join(format!("{name}.pre-stop.log"))).unwrap_or_default();
        assert!(
            log.contains("hook-done") && log.contains("eth0"),
            "{name}: {log}"
        );
    }
    assert_eq!(code, 0, "{report:#}");
}

#[test]
fn new_connection_per_request_with_a_pre_stop_passes() {
    let (code, report) = rehearse(
        &["--connections", "new-connection", "--pre-stop", "2s"],
        &["--mode", "graceful"],
    );
    assert_agent_matches_clients(&report);
    assert_verdicts(&report, "pass");
    assert_eq!(code, 0);
}

#[test]
fn a_drain_slower_than_the_grace_period_is_killed_and_fails() {
    let (code, report) = rehearse(
        &["--pre-stop", "1500ms", "--grace-period", "3s"],
        &["--mode", "slow", "--drain-time", "20s"],
    );
    assert_agent_matches_clients(&report);
    assert_verdicts(&report, "fail");
    for pod in old_pods(&report) {
        assert!(pod["timeline"]["sigkill"].is_number(), "{pod:#}");
        assert!(pod["agent"]["sigkill_at"].is_number(), "{pod:#}");
        // Keep-alive connections were still open when SIGKILL came.
        assert!(n(&pod["agent"]["open_at_exit"]) > 0, "{pod:#}");
    }
    assert_eq!(code, 1);
}

#[test]
fn a_server_that_ignores_sigterm_is_killed_with_connections_open() {
    let (code, report) = rehearse(
        &["--pre-stop", "1500ms", "--grace-period", "3s"],
        &["--mode", "ignore"],
    );
    assert_agent_matches_clients(&report);
    assert_verdicts(&report, "fail");
    assert_eq!(code, 1);
}

#[test]
fn an_app_that_keeps_accepting_until_the_endpoints_are_gone_passes_without_pre_stop() {
    let (code, report) = rehearse(&[], &["--mode", "late-close", "--drain-time", "2500ms"]);
    assert_agent_matches_clients(&report);
    assert_verdicts(&report, "pass");
    assert_eq!(code, 0);
}

#[test]
fn a_server_that_answers_503_after_sigterm_fails_and_each_5xx_is_counted() {
    // The app keeps accepting for 2.5 s after SIGTERM (no preStop: clients still come) but
    // answers every request 503 meanwhile, then drains cleanly: no reset, no refusal, only
    // failed requests. Its readiness probe answers 503 too, which is no client's failure: the
    // agent leaves the node's (the simulated kubelet's) requests out.
    let (code, report) = rehearse(
        &[],
        &[
            "--mode",
            "late-close",
            "--drain-time",
            "2500ms",
            "--status-after-term",
            "503",
        ],
    );
    assert_agent_matches_clients(&report);
    assert_verdicts(&report, "fail");
    for pod in old_pods(&report) {
        assert!(n(&pod["client_http_5xx"]) > 0, "{pod:#}");
        assert_eq!(n(&pod["client_connection_errors"]), 0, "{pod:#}");
        assert_eq!(
            n(&pod["agent"]["errors"]),
            n(&pod["client_http_5xx"]),
            "every 5xx in the window is an error: {pod:#}"
        );
    }
    assert_eq!(code, 1, "exit 1: failures, agent and clients agree");
}

#[test]
fn a_manifest_drives_the_rollout_and_unsupported_settings_are_named() {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/senior.yaml");
    let (code, report) = rehearse(&["-f", manifest], &["--mode", "graceful"]);
    assert_agent_matches_clients(&report);
    assert_verdicts(&report, "pass");
    assert_eq!(report["settings"]["max_unavailable"], "0");
    assert_eq!(report["settings"]["pre_stop"], "sleep 5");
    assert!(
        report["not_simulated"]
            .as_array()
            .expect("list")
            .iter()
            .any(|s| s.as_str().is_some_and(|s| s.contains("livenessProbe"))),
        "{report:#}"
    );
    assert_eq!(code, 0);
}

fn draingate(args: &[&str]) -> Output {
    Command::new(draingate_bin())
        .args(args)
        .output()
        .expect("run draingate")
}

#[test]
fn bad_rehearsal_input_is_a_clear_error() {
    let output = draingate(&["rehearse", "--replicas", "3"]);
    assert_eq!(output.status.code(), Some(2), "clap usage error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("<CMD>"), "{stderr}");

    let output = draingate(&["rehearse", "-f", "/nonexistent.yaml", "--", "true"]);
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot read /nonexistent.yaml"), "{stderr}");

    let output = draingate(&[
        "rehearse",
        "--max-surge",
        "0",
        "--max-unavailable",
        "0",
        "--",
        "true",
    ]);
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("both are 0"), "{stderr}");

    // Without root: a clear refusal before anything is made.
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(draingate_bin())
        .args(["rehearse", "--", "true"])
        .output()
        .expect("run setpriv");
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("it needs root"), "{stderr}");
}

/// A rehearsal of 3 replicas with a long preStop, started in the background.
fn rehearsal_in_background() -> std::process::Child {
    Command::new(draingate_bin())
        .args([
            "rehearse",
            "--replicas",
            "3",
            "--rate",
            "200",
            "--pre-stop",
            "5s",
            "--",
        ])
        .arg(build_bin("draingate-test-server"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start draingate rehearse")
}

/// The namespaces and the pin directories of the rehearsals of process `pid`.
fn left_by(pid: u32) -> (Vec<String>, Vec<String>) {
    let prefix = format!("dgr{pid}-");
    let names = |dir: &str, start: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| name.starts_with(start))
                    .collect()
            })
            .unwrap_or_default()
    };
    (
        names("/run/netns", &prefix),
        names("/sys/fs/bpf", &format!("draingate-rehearse-{prefix}")),
    )
}

/// The processes (pid and command) in the named network namespaces `names` (of /run/netns).
fn processes_in(names: &[String]) -> Vec<(u32, String)> {
    use std::os::unix::fs::MetadataExt as _;
    let inodes: Vec<u64> = names
        .iter()
        .filter_map(|name| std::fs::metadata(format!("/run/netns/{name}")).ok())
        .map(|m| m.ino())
        .collect();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| inodes.contains(&m.ino()))
        })
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, comm.trim().to_owned())
        })
        // A zombie waits for its reaper, no longer runs.
        .filter(|(pid, _)| {
            !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
        })
        .collect()
}

/// Waits until the rehearsal of `child` has its node, client and three pods, mid-rehearsal.
fn wait_mid_rehearsal(child: &std::process::Child) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while left_by(child.id()).0.len() < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the rehearsal never set up its pods"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        left_by(child.id()).1.len(),
        1,
        "the embedded agent's pins exist meanwhile"
    );
}

#[test]
fn an_interrupted_rehearsal_removes_everything_it_made() {
    require_root();
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut child = rehearsal_in_background();
    wait_mid_rehearsal(&child);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("interrupt");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "exit 130 after an interrupt");
    assert_eq!(left_by(child.id()), (vec![], vec![]), "left behind");
}

#[test]
fn what_a_killed_rehearsal_left_the_next_one_removes() {
    // SIGKILL leaves its namespaces and its agent's pins, whose programs stay attached to every
    // TCP state change of the host, until the next rehearsal starts.
    let mut child = {
        require_root();
        let _one = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut child = rehearsal_in_background();
        wait_mid_rehearsal(&child);
        child.kill().expect("SIGKILL");
        child
    };
    child.wait().expect("wait");
    let (namespaces, pins) = left_by(child.id());
    assert!(
        !namespaces.is_empty() && pins.len() == 1,
        "{namespaces:?} {pins:?}"
    );
    // Its children die with it: no pod server and no `conntrack` keeps running in its
    // namespaces (they get SIGKILL when it dies).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let running = processes_in(&namespaces);
        if running.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running in its namespaces: {running:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (code, _) = rehearse(&["--pre-stop", "2s"], &["--mode", "graceful"]);
    assert_eq!(code, 0);
    assert_eq!(left_by(child.id()), (vec![], vec![]), "left behind");
}
