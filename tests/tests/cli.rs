//! The `draingate` command line as a user meets it: against a live agent, without one, with bad
//! input and without privileges. Exit codes and messages are part of the interface.

use std::process::{Command, Output};

use draingate_tests::{ChildGuard, Family, Link, TestAgent, draingate_bin, require_root};
use nix::sys::signal::Signal;

fn draingate(args: &[&str]) -> Output {
    Command::new(draingate_bin())
        .args(args)
        .output()
        .expect("run draingate")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn without_an_agent_the_cli_says_how_to_start_one() {
    let output = draingate(&["pods", "--agent", "/nonexistent/agent.sock"]);
    assert_eq!(output.status.code(), Some(3));
    let message = stderr(&output);
    assert!(
        message.contains("no draingate agent answers at unix:///nonexistent/agent.sock")
            && message.contains("sudo draingate agent"),
        "{message}"
    );
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let output = draingate(&["wait-drained", "--pod", "x", "--timeout", "soon"]);
    assert_eq!(output.status.code(), Some(2), "clap usage error");
    assert!(stderr(&output).contains("invalid value 'soon' for '--timeout"));
    let output = draingate(&["pods", "--agent", "nonsense"]);
    assert!(stderr(&output).contains("expected unix:///path/to/agent.sock"));
    let output = draingate(&["pods", "-o", "yaml"]);
    assert!(stderr(&output).contains("possible values: table, wide, json"));
}

#[test]
fn an_agent_without_privileges_names_what_it_needs() {
    require_root();
    // `nobody`, with every capability dropped.
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(draingate_bin())
        .args([
            "agent",
            "--pin-dir",
            "/sys/fs/bpf/draingate-nobody",
            "--socket",
            "/tmp/dg-nobody.sock",
        ])
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .output()
        .expect("run setpriv");
    assert_eq!(output.status.code(), Some(3));
    let message = stderr(&output);
    assert!(
        message.contains("CAP_BPF") && message.contains("CAP_PERFMON"),
        "{message}"
    );
}

/// The first thing a user sees: the agent starts with no warning (the kernel takes the
/// object's BTF), and says which programs it loaded and where resets are counted from.
#[test]
fn the_agent_starts_without_warnings_and_names_its_programs() {
    use std::io::BufRead as _;
    require_root();
    let pins = draingate_tests::PinDir::new();
    let socket = std::env::temp_dir().join(format!("dg-quiet-{}.sock", std::process::id()));
    let mut agent = agent_on(&pins, &socket);
    let stderr = agent.0.stderr.take().expect("stderr");
    // Lines until the agent says it runs (or its stderr ends: it failed).
    let lines: Vec<String> = std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .take_while(|line| !line.contains("draingate agent running"))
        .collect();
    agent.signal(Signal::SIGTERM);
    drop(agent);
    let log = lines.join("\n");
    assert!(
        lines
            .iter()
            .all(|l| !l.contains("WARN") && !l.contains("ERROR")),
        "{log}"
    );
    let ready = lines
        .iter()
        .find(|l| l.contains("kernel programs ready"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        ready.contains("inet_sock_set_state") && ready.contains("resets_from="),
        "{ready}"
    );
    let _ = std::fs::remove_file(&socket);
}

/// `draingate agent` on pins of its own and `socket`, its stderr (info level, no colour)
/// captured.
fn agent_on(pins: &draingate_tests::PinDir, socket: &std::path::Path) -> ChildGuard {
    ChildGuard(
        Command::new(draingate_bin())
            .arg("agent")
            .arg("--pin-dir")
            .arg(&pins.config.pin_dir)
            .arg("--socket")
            .arg(socket)
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start an agent"),
    )
}

/// An agent that must refuse to start: its exit code and stderr (killed, and the test failed,
/// if it is still running after 20 s).
fn refused_agent(
    pins: &draingate_tests::PinDir,
    socket: &std::path::Path,
) -> (Option<i32>, String) {
    let mut agent = agent_on(pins, socket);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = agent.0.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut pipe) = agent.0.stderr.take() {
                use std::io::Read as _;
                let _ = pipe.read_to_string(&mut err);
            }
            return (status.code(), err);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent started where it had to refuse"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A second agent on a socket another one serves is refused and the first keeps serving it; a
/// file at the socket's path that is not a socket is never replaced.
#[test]
fn a_second_agent_on_a_served_socket_is_refused_and_files_are_never_replaced() {
    require_root();
    let dir = std::env::temp_dir().join(format!("dg-socket-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let socket = dir.join("agent.sock");
    let (first_pins, second_pins) = (
        draingate_tests::PinDir::new(),
        draingate_tests::PinDir::new(),
    );
    let _first = agent_on(&first_pins, &socket);
    let served = || {
        draingate(&["pods", "--agent", socket.to_str().expect("UTF-8")])
            .status
            .success()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !served() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first agent never served its socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (code, err) = refused_agent(&second_pins, &socket);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("another process serves"), "{err}");
    assert!(served(), "the first agent still serves its socket");

    let file = dir.join("not-a-socket");
    std::fs::write(&file, "keep me").expect("a file");
    let (code, err) = refused_agent(&draingate_tests::PinDir::new(), &file);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&file).expect("still there"),
        "keep me"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Streams are bounded (each holds a queue and connection buffers): one past the cap is refused with
/// `RESOURCE_EXHAUSTED`, and a client that goes away frees its stream at once, though no event
/// comes.
#[test]
fn streams_are_capped_and_a_client_that_goes_away_frees_its_stream() {
    require_root();
    let agent = TestAgent::start();
    let follow = || draingate_proto::v1::StreamEventsRequest {
        follow: true,
        ..Default::default()
    };
    agent.with_client(async |client| {
        let mut open = Vec::new();
        for _ in 0..draingate::agent::MAX_STREAMS {
            let stream = client.stream_events(follow()).await.expect("a stream");
            open.push(stream.into_inner());
        }
        let refused = client
            .stream_events(follow())
            .await
            .expect_err("one stream too many");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        drop(open.pop());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match client.stream_events(follow()).await {
                Ok(stream) => {
                    open.push(stream.into_inner());
                    break;
                }
                Err(status) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the stream was never freed: {status}"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    });
}

#[test]
fn pods_events_and_wait_drained_against_a_live_agent() {
    require_root();
    let link = Link::new("cli", Family::V6);
    let agent = TestAgent::start();
    let socket = agent.socket.to_str().expect("socket path").to_owned();
    let listen = std::net::SocketAddr::new(link.b_addr, 8080).to_string();
    let server = ChildGuard::spawn_in(
        &link.b,
        env!("CARGO_BIN_EXE_draingate-test-server"),
        &["--listen", &listen, "--mode", "graceful"],
    );
    let name = link.b.name().to_owned();
    let _ = agent.wait_for_pod(&name, |p| !p.addresses.is_empty() && !p.pids.is_empty());

    let output = draingate(&["pods", "--agent", &socket, "-o", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let doc: serde_json::Value = serde_json::from_slice(&output.stdout).expect("pods -o json");
    let pod = doc["pods"]
        .as_array()
        .expect("pods array")
        .iter()
        .find(|p| p["name"] == name.as_str())
        .expect("the server's pod is listed");
    assert_eq!(pod["namespace"], "local");
    assert_eq!(pod["phase"], "running");
    assert_eq!(pod["verdict"], "none");
    assert_eq!(pod["addresses"][0], link.b_addr.to_string());
    assert_eq!(pod["pids"], serde_json::json!([server.0.id()]), "{pod:#}");
    for field in [
        "uid",
        "open",
        "accepted",
        "resets_sent",
        "resets_received",
        "refused",
        "failed_connects",
        "errors",
        "open_at_exit",
        "timeline",
    ] {
        assert!(pod.get(field).is_some(), "pods -o json lacks {field}");
    }
    // What the kernel could not count, or forgot: nothing here.
    assert_eq!(
        (&doc["lost_events"], &doc["resets_forgotten"]),
        (&serde_json::json!(0), &serde_json::json!(0)),
        "{doc:#}"
    );

    let output = draingate(&["pods", "--agent", &socket]);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.starts_with("NAMESPACE  NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains(&name) && l.contains("running")),
        "{table}"
    );

    let output = draingate(&["wait-drained", "--agent", &socket, "--pod", "no-such-pod"]);
    assert_eq!(output.status.code(), Some(3));
    assert!(
        stderr(&output).contains("no pod \"no-such-pod\" on this node"),
        "{}",
        stderr(&output)
    );

    // A refused connection shows up in `events -o json`.
    let refused = std::net::SocketAddr::new(link.b_addr, 9);
    assert!(
        link.a
            .run(|| std::net::TcpStream::connect(refused))
            .is_err()
    );
    let _ = agent.wait_for_pod(&name, |p| p.total.is_some_and(|t| t.refused == 1));
    let output = draingate(&["events", "--agent", &socket, "--pod", &name, "-o", "json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["kind"], "refused");
    assert_eq!(lines[0]["local"], format!("[{}]:9", link.b_addr));

    // Idle server, graceful stop: wait-drained exits 0.
    server.signal(Signal::SIGTERM);
    let output = draingate(&[
        "wait-drained",
        "--agent",
        &socket,
        "--pod",
        &name,
        "--timeout",
        "10s",
    ]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    // The same, as a preStop hook asks it: the pod from the downward API's variables.
    let output = Command::new(draingate_bin())
        .args([
            "wait-drained",
            "--self",
            "--agent",
            &socket,
            "--timeout",
            "10s",
        ])
        .env("POD_NAME", &name)
        .env("POD_NAMESPACE", "local")
        .output()
        .expect("run draingate");
    let said = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{said}");
    assert!(
        said.contains(&format!("{name}: drained clean after")),
        "{said}"
    );
    assert!(said.contains("out of the Service endpoints"), "{said}");
    // As most apps run: not root (`nobody`, no capabilities).
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(draingate_bin())
        .args([
            "wait-drained",
            "--self",
            "--agent",
            &socket,
            "--timeout",
            "10s",
        ])
        .env("POD_NAME", &name)
        .env("POD_NAMESPACE", "local")
        .output()
        .expect("run draingate as nobody");
    assert_eq!(
        output.status.code(),
        Some(0),
        "as nobody: {}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr(&output)
    );
    let output = Command::new(draingate_bin())
        .args(["wait-drained", "--self", "--agent", &socket])
        .env_remove("POD_NAME")
        .output()
        .expect("run draingate");
    assert_eq!(output.status.code(), Some(3));
    assert!(
        stderr(&output).contains("--self needs POD_NAME"),
        "{}",
        stderr(&output)
    );
    drop(server);
}

#[test]
fn lint_finds_the_junior_mistakes_and_passes_what_the_project_ships() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let junior = root.join("examples/junior.yaml");
    let output = draingate(&["lint", "-o", "json", junior.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "an error finding exits 1");
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("lint -o json prints JSON");
    let rules: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["rule"].as_str().unwrap())
        .collect();
    assert_eq!(
        rules,
        [
            "pod-disruption-budget",
            "strategy",
            "pre-stop",
            "readiness-probe"
        ],
        "{report:#}"
    );
    assert_eq!(
        (report["errors"].as_u64(), report["warnings"].as_u64()),
        (Some(2), Some(2))
    );
    for f in report["findings"].as_array().unwrap() {
        assert!(f["line"].as_u64() > Some(0) && f["fix"].as_str().is_some_and(|s| !s.is_empty()));
    }

    let mut shipped: Vec<String> = ["deploy", "deploy/base"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(root.join(dir)).unwrap())
        .map(|e| e.unwrap().path())
        // Manifests only: deploy/ also holds the overlays' and the dashboard's directories,
        // and kustomize's kustomization.yaml files, which are kustomize's build files, not
        // Kubernetes objects (agent/tests/kustomize.rs checks what they build).
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .map(|p| p.display().to_string())
        .collect();
    assert!(shipped.len() >= 5, "{shipped:?}");
    shipped.push(root.join("examples/senior.yaml").display().to_string());
    let args: Vec<&str> = std::iter::once("lint")
        .chain(shipped.iter().map(String::as_str))
        .collect();
    let output = draingate(&args);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );

    let output = draingate(&["lint", root.join("Cargo.toml").to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(3));
    assert!(
        stderr(&output).contains("not valid YAML")
            || stderr(&output).contains("not a Kubernetes object"),
        "{}",
        stderr(&output)
    );
}
