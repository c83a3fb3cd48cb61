//! The agent end to end, on the real kernel: a real server process in its own namespace, real
//! clients in another, termination by real signals, and the verdict read over gRPC exactly as
//! `draingate pods` reads it. The clients' own record is the ground truth.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use draingate_proto::v1::{Pod, Verdict};
use draingate_tests::{ChildGuard, Family, Link, PinDir, TestAgent, require_root};
use nix::sys::signal::Signal;

const SERVER: &str = env!("CARGO_BIN_EXE_draingate-test-server");
const PORT: u16 = 8080;
const CLIENTS: usize = 4;

/// What one request on a keep-alive connection came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok { close: bool },
    Failed,
}

/// Sends one GET and reads the response (`Content-Length: 2`).
fn request(conn: &mut TcpStream) -> Outcome {
    request_status(conn).map_or(Outcome::Failed, |(_, close)| Outcome::Ok { close })
}

/// Sends one GET (`Content-Length: 2` answers) and returns the response's status and whether the
/// server closes the connection after it; `None` when the request failed.
fn request_status(conn: &mut TcpStream) -> Option<(u16, bool)> {
    conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").ok()?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
        }
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n")
            && response.len() >= end + 4 + 2
        {
            let head = String::from_utf8_lossy(&response[..end]);
            let status = head.get(9..12)?.parse().ok()?;
            return Some((status, head.contains("Connection: close")));
        }
    }
}

/// Every event the agent keeps of the pod named `pod` (of every pod: `None`).
fn events_of(agent: &TestAgent, pod: Option<&str>) -> Vec<draingate_proto::v1::Event> {
    agent.with_client(async |client| {
        let mut stream = client
            .stream_events(draingate_proto::v1::StreamEventsRequest {
                pod: pod.map(|name| draingate_proto::v1::PodRef {
                    name: name.to_owned(),
                    ..Default::default()
                }),
                follow: false,
            })
            .await
            .expect("stream events")
            .into_inner();
        let mut events = Vec::new();
        while let Some(event) = stream.message().await.expect("event") {
            events.push(event);
        }
        events
    })
}

fn connect(link: &Link, addr: SocketAddr) -> std::io::Result<TcpStream> {
    link.a
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
}

/// Starts the test server in namespace `b` and waits until it accepts connections. The agent
/// watches the pod's address first, so it counts every connection, the readiness probe's too
/// (a connection accepted and closed before the agent knew the pod is not in its totals).
fn start_server(agent: &TestAgent, link: &Link, mode: &str) -> (ChildGuard, SocketAddr) {
    start_server_with(agent, link, &["--mode", mode])
}

fn start_server_with(agent: &TestAgent, link: &Link, args: &[&str]) -> (ChildGuard, SocketAddr) {
    agent.wait_for_pod(link.b.name(), |p| !p.addresses.is_empty());
    let addr = SocketAddr::new(link.b_addr, PORT);
    let listen = addr.to_string();
    let mut all = vec!["--listen", listen.as_str()];
    all.extend_from_slice(args);
    let server = ChildGuard::spawn_in(&link.b, SERVER, &all);
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect(link, addr).is_err() {
        assert!(Instant::now() < deadline, "the test server never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, addr)
}

/// Waits until the agent knows the server's pod: its address, and its process, whose signals
/// and exit it traces from then on.
fn wait_for_server(agent: &TestAgent, pod_name: &str) {
    agent.wait_for_pod(pod_name, |p| !p.addresses.is_empty() && !p.pids.is_empty());
}

fn verdict(pod: &Pod) -> Verdict {
    Verdict::try_from(pod.verdict).unwrap_or(Verdict::Unspecified)
}

#[test]
fn graceful_drain_under_load_passes() {
    require_root();
    let link = Link::new("grace", Family::V4);
    let agent = TestAgent::start();
    let (mut server, addr) = start_server(&agent, &link, "graceful");
    let pod_name = link.b.name().to_owned();
    wait_for_server(&agent, &pod_name);

    // Clients send back to back on keep-alive connections until the server says it closes.
    let (successes, failures) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let mut conn = connect(&link, addr).expect("connect");
                scope.spawn(move || {
                    let (mut ok, mut failed) = (0u64, 0u64);
                    loop {
                        match request(&mut conn) {
                            Outcome::Ok { close } => {
                                ok += 1;
                                if close {
                                    break;
                                }
                            }
                            Outcome::Failed => {
                                failed += 1;
                                break;
                            }
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        server.signal(Signal::SIGTERM);
        clients
            .into_iter()
            .map(|c| c.join().expect("client"))
            .fold((0, 0), |(a, b), (ok, failed)| (a + ok, b + failed))
    });
    let status = server.0.wait().expect("server exit");
    assert!(status.success(), "graceful server exit: {status}");
    assert!(successes > CLIENTS as u64, "the clients made load");
    assert_eq!(failures, 0, "a graceful drain loses nothing");

    // The agent learns of the exit from the kernel's event a moment later: wait for a final
    // verdict (before the SIGTERM is seen it is "none", which is not one).
    let pod = agent.wait_for_pod(&pod_name, |p| {
        matches!(verdict(p), Verdict::Pass | Verdict::Fail)
    });
    assert_eq!(verdict(&pod), Verdict::Pass, "{pod:#?}");
    assert_eq!(pod.errors, 0);
    assert_eq!(pod.open, 0);
    assert_eq!(pod.open_at_exit, 0);
    let timeline = pod.timeline.expect("timeline");
    assert!(timeline.drained_at.is_some() && timeline.exited_at.is_some());
    assert!(timeline.terminating_since.is_some());
    // The server closed every connection itself (open_at_exit 0 above); the last closing
    // handshakes may end just after the exit, so drained_at is not compared with exited_at.
    assert_eq!(pod.total.expect("totals").accepted, CLIENTS as u64 + 1);
}

#[test]
fn abrupt_exit_fails_with_resets_equal_to_client_failures() {
    abrupt_exit(Family::V4, false);
}

#[test]
fn an_agent_restart_mid_rollout_loses_no_counts_ipv6() {
    abrupt_exit(Family::V6, true);
}

/// Keep-alive clients, then SIGKILL: every failure the clients see is counted, exactly. With
/// `restart`, the agent restarts between the clients' connections and the kill.
fn abrupt_exit(family: Family, restart: bool) {
    require_root();
    let link = Link::new("abrupt", family);
    let mut agent = TestAgent::start();
    let (server, addr) = start_server(&agent, &link, "abrupt");
    let pod_name = link.b.name().to_owned();
    wait_for_server(&agent, &pod_name);

    // Keep-alive clients that have been served, each with its connection open.
    let mut conns: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| {
            let mut conn = connect(&link, addr).expect("connect");
            for _ in 0..3 {
                assert_eq!(request(&mut conn), Outcome::Ok { close: false });
            }
            conn
        })
        .collect();
    agent.wait_for_pod(&pod_name, |p| p.open == CLIENTS as u64);
    if restart {
        agent = agent.restart();
        let pod = agent.wait_for_pod(&pod_name, |p| p.open == CLIENTS as u64);
        assert_eq!(
            pod.total.expect("totals").accepted,
            CLIENTS as u64 + 1,
            "{pod:#?}"
        );
    }

    // SIGKILL: no drain at all. Then the clients go on sending, and reconnect once.
    server.signal(Signal::SIGKILL);
    let mut server = server;
    server.0.wait().expect("server exit");
    let mut failures = 0u64;
    for conn in &mut conns {
        if request(conn) == Outcome::Failed {
            failures += 1;
        }
        if connect(&link, addr).is_err() {
            failures += 1;
        }
    }
    drop(conns);
    assert_eq!(
        failures,
        2 * CLIENTS as u64,
        "every client saw its request and reconnect fail"
    );

    let pod = agent.wait_for_pod(&pod_name, |p| p.errors >= failures);
    assert_eq!(verdict(&pod), Verdict::Fail, "{pod:#?}");
    assert_eq!(
        pod.errors, failures,
        "agent errors == client failures: {pod:#?}"
    );
    let window = pod.window.expect("window counters");
    assert_eq!(window.resets_sent, CLIENTS as u64, "{window:?}");
    assert_eq!(window.refused, CLIENTS as u64, "{window:?}");
    assert_eq!(pod.open_at_exit, CLIENTS as u64);
    assert!(pod.timeline.expect("timeline").sigkill_at.is_some());

    // Each error keeps its event.
    let events = events_of(&agent, Some(&pod_name));
    let in_window = events.iter().filter(|e| e.in_window).count() as u64;
    assert_eq!(in_window, failures, "{events:#?}");

    // And Prometheus sees the same. (Not `refused_total`: it is a lifetime counter, and the
    // readiness probe in `start_server` may have been refused before the server listened.)
    let (status, metrics) = agent.http_get("/metrics");
    assert_eq!(status, 200);
    let uid = pod.pod.expect("pod ref").uid;
    let labels = format!("{{namespace=\"local\",pod=\"{pod_name}\",uid=\"{uid}\"}}");
    for expected in [
        format!("draingate_pod_resets_sent_total{labels} {CLIENTS}"),
        format!("draingate_pod_drain_errors{labels} {failures}"),
        format!("draingate_pod_open_at_exit{labels} {CLIENTS}"),
    ] {
        assert!(
            metrics.lines().any(|l| l == expected),
            "missing {expected:?} in:\n{metrics}"
        );
    }
    assert_eq!(agent.http_get("/readyz").0, 200);
    assert_eq!(agent.http_get("/healthz").0, 200);
}

/// A server that exits on SIGTERM while requests are in flight (read, not yet answered) closes
/// their keep-alive connections with a FIN: no reset, and the clients read end of file where
/// their answer should be. Each such request is cut, counted one by one with its event; the
/// idle connections closed the same way carried no request and are not.
#[test]
fn requests_in_flight_when_the_server_closes_are_cut_and_each_is_counted() {
    require_root();
    let link = Link::new("cut", Family::V4);
    let agent = TestAgent::start();
    let (mut server, addr) = start_server_with(
        &agent,
        &link,
        &["--mode", "abrupt", "--request-time", "800ms"],
    );
    let pod_name = link.b.name().to_owned();
    wait_for_server(&agent, &pod_name);
    // Two idle keep-alive connections (one answered request each), three with a request in
    // flight.
    let mut idle: Vec<TcpStream> = (0..2)
        .map(|_| connect(&link, addr).expect("connect"))
        .collect();
    for conn in &mut idle {
        assert_eq!(request(conn), Outcome::Ok { close: false });
    }
    let (ports, outcomes): (Vec<u16>, Vec<Outcome>) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let mut conn = connect(&link, addr).expect("connect");
                let port = conn.local_addr().expect("client address").port();
                (port, scope.spawn(move || request(&mut conn)))
            })
            .collect();
        // Long enough for the server to have read each request; well inside its 800 ms.
        std::thread::sleep(Duration::from_millis(300));
        server.signal(Signal::SIGTERM);
        clients
            .into_iter()
            .map(|(port, client)| (port, client.join().expect("client")))
            .unzip()
    });
    let _ = server.0.wait();
    assert_eq!(
        outcomes,
        vec![Outcome::Failed; 3],
        "every in-flight request failed"
    );
    // The exit closes the connections after the agent saw it: wait for their FINs' counts.
    let pod = agent.wait_for_pod(&pod_name, |p| {
        verdict(p) == Verdict::Fail
            && p.errors >= 3
            && p.window.is_some_and(|w| w.requests_cut >= 3)
    });
    let total = pod.total.expect("totals");
    let window = pod.window.expect("window counters");
    assert_eq!(total.requests_cut, 3, "each cut request counted: {pod:#?}");
    assert_eq!(window.requests_cut, 3, "{pod:#?}");
    assert_eq!(
        (window.resets_sent, window.refused),
        (0, 0),
        "closed, not reset: {pod:#?}"
    );
    assert_eq!(pod.errors, 3, "the cut requests are its errors: {pod:#?}");
    assert!(pod.reason.contains("requests cut"), "{}", pod.reason);
    let cut_events: Vec<_> = events_of(&agent, Some(&pod_name))
        .into_iter()
        .filter(|e| e.kind == draingate_proto::v1::EventKind::RequestCut as i32)
        .collect();
    assert!(
        cut_events.iter().all(|e| e.request == "GET /"),
        "each names its request: {cut_events:#?}"
    );
    let mut cut: Vec<u16> = cut_events.iter().map(|e| e.remote_port as u16).collect();
    cut.sort_unstable();
    let mut expected = ports.clone();
    expected.sort_unstable();
    assert_eq!(cut, expected, "one request_cut event per in-flight client");
    let (_, metrics) = agent.http_get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("draingate_pod_requests_cut_total{")
                && l.contains(&pod_name)
                && l.ends_with(" 3")),
        "{metrics}"
    );
    drop(idle);
}

/// An HTTP/2 frame: its header (length, type, flags, stream) and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Reads HTTP/2 frames until one of type `kind` (its stream and payload); `None` at the end.
fn h2_read_until(conn: &mut TcpStream, kind: u8) -> Option<(u32, Vec<u8>)> {
    loop {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head).ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).ok()?;
        if head[3] == kind {
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
            return Some((stream, payload));
        }
    }
}

/// A gRPC-like HTTP/2 server (cleartext, prior knowledge) that sends GOAWAY on SIGTERM and
/// resets the streams that come after it with `code`: the GOAWAY is counted (never an error),
/// each reset by its code; returns the pod once its verdict is in.
fn h2_rollout(prefix: &str, code: u32) -> Pod {
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    let link = Link::new(prefix, Family::V4);
    let agent = TestAgent::start();
    let code_arg = code.to_string();
    let (mut server, addr) = start_server_with(
        &agent,
        &link,
        &["--mode", "graceful", "--h2-reset-code", &code_arg],
    );
    let pod_name = link.b.name().to_owned();
    wait_for_server(&agent, &pod_name);
    let mut conn = connect(&link, addr).expect("connect");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2_frame(SETTINGS, 0, 0, &[]));
    conn.write_all(&hello).expect("preface");
    // HPACK-encoded `GET / http` (static table entries): the server does not decode it.
    let request = |stream: u32| h2_frame(HEADERS, 0x5, stream, &[0x82, 0x84, 0x86]);
    conn.write_all(&request(1)).expect("request");
    assert_eq!(h2_read_until(&mut conn, HEADERS).map(|f| f.0), Some(1));
    server.signal(Signal::SIGTERM);
    let (_, goaway) = h2_read_until(&mut conn, GOAWAY).expect("GOAWAY");
    assert_eq!(goaway[..4], 1u32.to_be_bytes(), "last stream 1");
    for stream in [3, 5] {
        conn.write_all(&request(stream)).expect("request");
        let (id, payload) = h2_read_until(&mut conn, RST_STREAM).expect("RST_STREAM");
        assert_eq!((id, payload), (stream, code.to_be_bytes().to_vec()));
    }
    drop(conn);
    assert!(server.0.wait().expect("server exit").success());
    let pod = agent.wait_for_pod(&pod_name, |p| {
        matches!(verdict(p), Verdict::Pass | Verdict::Fail)
            && p.total.is_some_and(|t| t.http2_goaways == 1)
    });
    let events = events_of(&agent, Some(&pod_name));
    let kinds = |kind: draingate_proto::v1::EventKind| {
        events
            .iter()
            .filter(|e| e.kind == kind as i32)
            .map(|e| e.reason.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        kinds(draingate_proto::v1::EventKind::Http2Goaway),
        ["NO_ERROR"],
        "the GOAWAY is on the timeline: {events:#?}"
    );
    let resets = kinds(draingate_proto::v1::EventKind::Http2Reset);
    if code == 7 {
        assert!(resets.is_empty(), "{events:#?}");
    } else {
        assert_eq!(resets, ["INTERNAL_ERROR"; 2], "{events:#?}");
    }
    pod
}

#[test]
fn http2_goaway_is_counted_and_streams_reset_with_an_error_fail_the_pod() {
    require_root();
    // INTERNAL_ERROR: the two streams after the GOAWAY failed.
    let pod = h2_rollout("h2err", 2);
    let (total, window) = (pod.total.expect("totals"), pod.window.expect("window"));
    assert_eq!(verdict(&pod), Verdict::Fail, "{pod:#?}");
    assert_eq!(
        (
            total.http2_goaways,
            total.http2_resets,
            total.http2_refused_streams
        ),
        (1, 2, 0),
        "{pod:#?}"
    );
    assert_eq!((window.http2_resets, pod.errors), (2, 2), "{pod:#?}");
    assert!(
        pod.reason.contains("HTTP/2 streams reset"),
        "{}",
        pod.reason
    );
    // REFUSED_STREAM: the client may retry them elsewhere; the pod drained cleanly.
    let pod = h2_rollout("h2ref", 7);
    let total = pod.total.expect("totals");
    assert_eq!(verdict(&pod), Verdict::Pass, "{pod:#?}");
    assert_eq!(
        (
            total.http2_goaways,
            total.http2_resets,
            total.http2_refused_streams
        ),
        (1, 0, 2),
        "{pod:#?}"
    );
    assert_eq!(pod.errors, 0);
}

#[test]
fn http_503_answers_after_sigterm_fail_the_pod_and_each_is_counted_ipv6() {
    // A server that keeps serving for 1.5 s after SIGTERM but answers every request 503 (a
    // framework refusing work while it shuts down), then drains cleanly: no reset, no refusal,
    // nothing open at its exit. Only the status lines it sends show the failed requests.
    require_root();
    http_5xx_after_sigterm("http5xx", Family::V6, 503);
}

#[test]
fn http_502_answers_of_a_proxy_whose_upstream_is_gone_fail_the_pod_and_each_is_counted() {
    // A proxy pod (nginx, Envoy) whose upstream went away first answers 502 Bad Gateway while it
    // still serves: the same status path, another class member.
    require_root();
    http_5xx_after_sigterm("http502", Family::V4, 502);
}

/// A server that answers `status` for 1.5 s after SIGTERM, then drains: the pod fails, and each
/// answer is counted by class, with its event and in the metric.
fn http_5xx_after_sigterm(prefix: &str, family: Family, status: u16) {
    let link = Link::new(prefix, family);
    let agent = TestAgent::start();
    let status_arg = status.to_string();
    let (mut server, addr) = start_server_with(
        &agent,
        &link,
        &[
            "--mode",
            "late-close",
            "--drain-time",
            "1500ms",
            "--status-after-term",
            &status_arg,
        ],
    );
    let pod_name = link.b.name().to_owned();
    wait_for_server(&agent, &pod_name);
    let statuses = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let mut conn = connect(&link, addr).expect("connect");
                scope.spawn(move || {
                    let mut seen = Vec::new();
                    while let Some((status, close)) = request_status(&mut conn) {
                        seen.push(status);
                        if close {
                            break;
                        }
                        // Some hundreds of requests: each 5xx keeps its event (at most
                        // `EVENTS_PER_POD` are kept per pod).
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    seen
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        server.signal(Signal::SIGTERM);
        clients
            .into_iter()
            .flat_map(|c| c.join().expect("client"))
            .collect::<Vec<u16>>()
    });
    assert!(server.0.wait().expect("server exit").success());
    let ok = statuses.iter().filter(|&&s| s == 200).count() as u64;
    let unavailable = statuses.iter().filter(|&&s| s == status).count() as u64;
    assert_eq!(ok + unavailable, statuses.len() as u64, "{statuses:?}");
    assert!(ok > 0 && unavailable > 0, "{statuses:?}");

    let pod = agent.wait_for_pod(&pod_name, |p| {
        matches!(verdict(p), Verdict::Pass | Verdict::Fail)
    });
    assert_eq!(verdict(&pod), Verdict::Fail, "{pod:#?}");
    let total = pod.total.expect("totals");
    let window = pod.window.expect("window counters");
    assert_eq!(
        (total.http_ok, total.http_4xx, total.http_5xx),
        (ok, 0, unavailable),
        "every answer counted by class: {pod:#?}"
    );
    assert_eq!(window.http_5xx, unavailable, "{pod:#?}");
    assert_eq!(
        pod.errors, unavailable,
        "the 5xx answers are its only errors: {pod:#?}"
    );
    // (Not the lifetime `refused`: `start_server`'s first connects may come before it listens.)
    assert_eq!(
        (window.resets_sent, window.refused, pod.open_at_exit),
        (0, 0, 0)
    );
    assert!(pod.reason.contains("HTTP 5xx"), "{}", pod.reason);

    // Each with its event: the status, the client's port.
    let events = events_of(&agent, Some(&pod_name));
    let http: Vec<_> = events
        .iter()
        .filter(|e| e.kind == draingate_proto::v1::EventKind::Http5xx as i32)
        .collect();
    assert_eq!(http.len() as u64, unavailable);
    assert!(
        http.iter().all(|e| e.reason == status_arg
            && e.request == "GET /"
            && e.in_window
            && e.local_port == u32::from(PORT)),
        "{http:#?}"
    );
    let (_, metrics) = agent.http_get("/metrics");
    let uid = pod.pod.expect("pod ref").uid;
    let expected = format!(
        "draingate_pod_http_responses_total{{namespace=\"local\",pod=\"{pod_name}\",uid=\"{uid}\",class=\"5xx\"}} {unavailable}"
    );
    assert!(
        metrics.lines().any(|l| l == expected),
        "missing {expected:?} in:\n{metrics}"
    );
}

/// The kernel gives a new network namespace the inode number of one just destroyed, and local
/// pods are named by that inode: a new pod must still be a new pod, and the old one keep its
/// record.
#[test]
fn a_new_pod_that_reuses_a_gone_pods_namespace_inode_is_a_new_pod() {
    use std::os::unix::fs::MetadataExt as _;

    use draingate_tests::Netns;
    require_root();
    let agent = TestAgent::start();
    let inode = |ns: &Netns| {
        std::fs::metadata(format!("/run/netns/{}", ns.name()))
            .expect("netns file")
            .ino()
    };
    // Other tests make namespaces concurrently and may take a freed inode first: cycle until a
    // new namespace lands on the inode of one this test saw go.
    let mut gone: Vec<(String, u64)> = Vec::new();
    let mut current = Netns::new("reuse");
    let mut reused = None;
    for _ in 0..50 {
        let pod = agent.wait_for_pod(current.name(), |_| true);
        assert_eq!(pod.pod.expect("pod ref").name, current.name());
        if let Some((old_name, old_inode)) = gone.iter().find(|(_, i)| *i == inode(&current)) {
            reused = Some((old_name.clone(), *old_inode));
            break;
        }
        let (name, ino) = (current.name().to_owned(), inode(&current));
        drop(current);
        agent.wait_for_pod(&name, |p| {
            p.timeline.as_ref().is_some_and(|t| t.exited_at.is_some())
        });
        gone.push((name, ino));
        current = Netns::new("reuse");
    }
    let (old_name, old_inode) =
        reused.expect("the kernel never reused an inode: the test proves nothing");
    // The old pod is still there, under its own uid, and the new one has the inode's uid.
    let old = agent.wait_for_pod(&old_name, |_| true);
    let old_uid = old.pod.expect("pod ref").uid;
    assert!(
        old_uid.starts_with(&format!("netns-{old_inode}@")),
        "{old_uid}"
    );
    let new = agent.wait_for_pod(current.name(), |_| true);
    assert_eq!(new.pod.expect("pod ref").uid, format!("netns-{old_inode}"));
}

/// The peer view on one node: after a pod drained and exited, a client here connects to its
/// address and gets no answer (its node now answers "host unreachable", as for a sandbox that
/// is gone). The pod never saw that connect; the client's kernel did, and the pod fails for it.
/// A connect the pod refused with a reset is counted once, by the pod, not again as a peer's.
#[test]
fn a_connect_that_gets_no_answer_from_a_terminated_pod_fails_it_and_a_refusal_counts_once() {
    require_root();
    let link = Link::new("peer", Family::V4);
    let agent = TestAgent::start();
    // It stops listening at SIGTERM and exits a second later.
    let (mut server, addr) =
        start_server_with(&agent, &link, &["--mode", "slow", "--drain-time", "1s"]);
    let (pod_name, client_name) = (link.b.name().to_owned(), link.a.name().to_owned());
    wait_for_server(&agent, &pod_name);
    agent.wait_for_pod(&client_name, |p| !p.addresses.is_empty());
    server.signal(Signal::SIGTERM);
    assert!(server.0.wait().expect("server exit").success());
    let pod = agent.wait_for_pod(&pod_name, |p| {
        !matches!(verdict(p), Verdict::None | Verdict::Pending)
    });
    assert_eq!(verdict(&pod), Verdict::Pass, "{pod:#?}");

    // (Connects made before the server listened failed too.)
    let failed_before = agent
        .wait_for_pod(&client_name, |_| true)
        .total
        .expect("totals")
        .failed_connects;
    link.b.unreachable_port(PORT);
    let unanswered = connect(&link, addr).expect_err("no answer from the pod");
    assert_eq!(
        unanswered.raw_os_error(),
        Some(libc::EHOSTUNREACH),
        "{unanswered}"
    );
    let refused = connect(&link, SocketAddr::new(link.b_addr, 9)).expect_err("refused");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    let pod = agent.wait_for_pod(&pod_name, |p| p.errors >= 2);
    assert_eq!(verdict(&pod), Verdict::Fail, "{pod:#?}");
    let window = pod.window.expect("window");
    assert_eq!(
        (pod.errors, pod.peer_failures, window.refused),
        (2, 1, 1),
        "{pod:#?}"
    );
    assert!(
        pod.reason.contains("1 connects to it got no answer"),
        "{}",
        pod.reason
    );
    // Both were the client's own failed connects too.
    let client = agent.wait_for_pod(&client_name, |p| {
        p.total
            .is_some_and(|t| t.failed_connects == failed_before + 2)
    });
    assert_eq!(client.errors, 0, "{client:#?}");

    // The events say which was which. (A refusal's reason is the kernel's reset reason, which
    // differs between kernels.)
    let expected = [
        (&pod_name, "peer_connect_failed", Some("no answer")),
        (&pod_name, "refused", None),
        (&client_name, "connect_failed", Some("no answer")),
        (&client_name, "connect_failed", Some("reset")),
    ];
    let ours = [link.a_addr.to_string(), link.b_addr.to_string()];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let events = events_of(&agent, None);
        let seen: Vec<(String, String, String)> = events
            .iter()
            .filter(|e| ours.contains(&e.remote_address))
            .map(|e| {
                (
                    e.pod.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
                    draingate::cli::event_kind_name(e.kind).to_owned(),
                    e.reason.clone(),
                )
            })
            .collect();
        let missing: Vec<_> = expected
            .iter()
            .filter(|(pod, kind, reason)| {
                !seen.iter().any(|(p, k, r)| {
                    p == *pod && k == kind && reason.is_none_or(|reason| reason == r)
                })
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "no {missing:?} in {seen:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server that closed its last connection and exited before the peer's final ACK arrived cut
/// nothing: the connection was the kernel's to finish (`LAST_ACK`), not the process's. It stays
/// open until the handshake ends, but it is not open at exit, and the pod passes once the ACK
/// gets through. The peer's ACKs are held back by a real iptables rule for as long as it takes
/// to see that, so the race is not left to timing.
///
/// Known on 6.1 (about 1 run in 15 under QEMU, never on 6.12 or 6.18): the kernel now and then
/// skips the tracepoint program at the server's close (a tracing program does not run while
/// another holds the CPU's `bpf_prog_active`, and 6.1 does not count such misses), so the
/// agent reports the connection held at the exit: a false fail, never a false pass. The test
/// tries three times and prints each such run, so that a regression (every run) still fails.
#[test]
fn a_connection_closed_by_the_server_but_not_yet_acked_at_its_exit_is_not_cut() {
    require_root();
    for attempt in 1..=3 {
        match closed_but_not_acked_at_exit(attempt) {
            Ok(()) => return,
            Err(pod) => eprintln!(
                "attempt {attempt}: the server's close was not seen before its exit \
                 (open_at_exit {}): {pod:#?}",
                pod.open_at_exit
            ),
        }
    }
    panic!("3 of 3 runs held a connection the server had closed at its exit");
}

fn closed_but_not_acked_at_exit(attempt: u32) -> Result<(), Box<Pod>> {
    let link = Link::new(&format!("lack{attempt}"), Family::V4);
    let agent = TestAgent::start();
    let (mut server, addr) = start_server(&agent, &link, "graceful");
    let pod_name = link.b.name().to_owned();
    wait_for_server(&agent, &pod_name);
    let mut conn = connect(&link, addr).expect("connect");
    assert_eq!(request(&mut conn), Outcome::Ok { close: false });

    // From here the pod drops the client's pure ACKs (the FIN, which carries ACK too, passes).
    let client = link.a_addr.to_string();
    let rule = [
        "INPUT",
        "-p",
        "tcp",
        "-s",
        &client,
        "--tcp-flags",
        "ALL",
        "ACK",
        "-j",
        "DROP",
    ];
    link.b.iptables(&[&["-I"], &rule[..]].concat());
    // The client closes first; the server closes in turn and sits in LAST_ACK, waiting for an
    // ACK that is dropped, while its process finishes draining and exits.
    conn.shutdown(std::net::Shutdown::Both)
        .expect("client close");
    drop(conn);
    server.signal(Signal::SIGTERM);
    assert!(server.0.wait().expect("server exit").success());

    let pod = agent.wait_for_pod(&pod_name, |p| {
        p.timeline.as_ref().is_some_and(|t| t.exited_at.is_some())
    });
    if pod.open_at_exit != 0 {
        link.b.iptables(&[&["-D"], &rule[..]].concat());
        return Err(Box::new(pod));
    }
    assert_eq!(pod.open, 1, "still in the closing handshake: {pod:#?}");
    assert_eq!(verdict(&pod), Verdict::Pending, "{pod:#?}");

    link.b.iptables(&[&["-D"], &rule[..]].concat());
    let pod = agent.wait_for_pod(&pod_name, |p| verdict(p) != Verdict::Pending);
    assert_eq!(verdict(&pod), Verdict::Pass, "{pod:#?}");
    assert_eq!((pod.open, pod.errors, pod.open_at_exit), (0, 0, 0));
    Ok(())
}

/// The converse: connections the process still holds when it exits are cut, and counted.
#[test]
fn connections_a_killed_server_still_held_are_open_at_exit() {
    require_root();
    let link = Link::new("held", Family::V4);
    let agent = TestAgent::start();
    let (mut server, addr) = start_server(&agent, &link, "ignore");
    let pod_name = link.b.name().to_owned();
    wait_for_server(&agent, &pod_name);
    let mut conns: Vec<TcpStream> = (0..3)
        .map(|_| connect(&link, addr).expect("connect"))
        .collect();
    for conn in &mut conns {
        assert_eq!(request(conn), Outcome::Ok { close: false });
    }
    // One of them the client closes first: the server closes it in turn, so it is not held.
    let closed = conns.pop().expect("a connection");
    closed
        .shutdown(std::net::Shutdown::Both)
        .expect("client close");
    agent.wait_for_pod(&pod_name, |p| p.open == 2);
    server.signal(Signal::SIGKILL);
    let _ = server.0.wait();
    let pod = agent.wait_for_pod(&pod_name, |p| verdict(p) == Verdict::Fail);
    assert_eq!(pod.open_at_exit, 2, "{pod:#?}");
}

/// Connections the kernel could not track (the socket table was full) are never in a pod's open
/// count, so its exit cannot show them cut: a pod that held only such connections when it was
/// killed (SIGKILL) must not pass, whether the table filled before its window or in it.
#[test]
fn a_pod_whose_connections_the_full_socket_table_missed_is_unknown_not_pass() {
    require_root();
    let mut pins = PinDir::new();
    // One bucket: four sockets in the whole table.
    pins.config.socket_buckets = 1;
    let agent = TestAgent::start_with(pins);
    // Another pod pair fills the table first: two held connections, four sockets.
    let filler = Link::new("fill", Family::V4);
    let (_filler_server, filler_addr) = start_server(&agent, &filler, "ignore");
    let filler_name = filler.b.name().to_owned();
    wait_for_server(&agent, &filler_name);
    // (Other tests' pods, which this agent watches too, may take cells as well: the table is
    // full either way.)
    let held_elsewhere: Vec<TcpStream> = (0..2)
        .map(|_| connect(&filler, filler_addr).expect("connect"))
        .collect();

    let link = Link::new("untrk", Family::V4);
    let (mut server, addr) = start_server(&agent, &link, "ignore");
    let pod_name = link.b.name().to_owned();
    wait_for_server(&agent, &pod_name);
    let mut conns: Vec<TcpStream> = (0..3)
        .map(|_| connect(&link, addr).expect("connect"))
        .collect();
    for conn in &mut conns {
        assert_eq!(request(conn), Outcome::Ok { close: false });
    }
    server.signal(Signal::SIGKILL);
    let _ = server.0.wait();
    let pod = agent.wait_for_pod(&pod_name, |p| {
        !matches!(verdict(p), Verdict::None | Verdict::Pending)
    });
    // Three connections were cut, whatever the table could track of them: never a pass. (A
    // cell freed by another test's pod may have taken one: then it is counted, and fails.)
    assert_ne!(verdict(&pod), Verdict::Pass, "{pod:#?}");
    if pod.open_at_exit == 0 {
        assert_eq!(verdict(&pod), Verdict::Unknown, "{pod:#?}");
        // Either loss rule may see the table's misses first (the one for losses while
        // terminating says it with the kernel's counter): both name the socket table.
        assert!(
            pod.reason.contains("could not be tracked") || pod.reason.contains("socket_table_full"),
            "{}",
            pod.reason
        );
    }
    drop((conns, held_elsewhere));
}

/// Pods that fail and go away while no agent runs (an OOM kill, an upgrade) are not lost: the
/// next agent reports them from the kernel's record. One refused connections in its window and
/// its namespace was deleted: `fail` with the kernel's counts. Another went away cleanly: what
/// happened cannot all be checked, so `unknown`, never absent and never a pass.
#[test]
fn pods_that_went_away_while_no_agent_ran_are_reported_fail_or_unknown() {
    require_root();
    let agent = TestAgent::start();
    let failing = Link::new("downf", Family::V4);
    let clean = Link::new("downc", Family::V4);
    let (mut server, _) = start_server(&agent, &failing, "ignore");
    let (mut clean_server, _) = start_server(&agent, &clean, "graceful");
    let (failing_name, clean_name) = (failing.b.name().to_owned(), clean.b.name().to_owned());
    wait_for_server(&agent, &failing_name);
    wait_for_server(&agent, &clean_name);
    let pins = agent.stop();

    // While no agent runs: SIGTERM (the kernel opens the window), five refused connects, the
    // process killed and the namespace deleted; the other pod ends cleanly.
    server.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    let closed = SocketAddr::new(failing.b_addr, 9);
    for _ in 0..5 {
        assert!(connect(&failing, closed).is_err());
    }
    server.signal(Signal::SIGKILL);
    let _ = server.0.wait();
    clean_server.signal(Signal::SIGTERM);
    let _ = clean_server.0.wait();
    let Link { a: _client, b, .. } = failing;
    drop(b);
    let Link {
        a: _clean_client,
        b: clean_b,
        ..
    } = clean;
    drop(clean_b);

    let agent = TestAgent::start_with(pins);
    let pod = agent.wait_for_pod(&failing_name, |p| verdict(p) == Verdict::Fail);
    let window = pod.window.expect("window");
    assert_eq!((pod.errors, window.refused), (5, 5), "{pod:#?}");
    let pod = agent.wait_for_pod(&clean_name, |p| {
        !matches!(verdict(p), Verdict::None | Verdict::Pending)
    });
    assert_eq!(verdict(&pod), Verdict::Unknown, "{pod:#?}");
    assert!(pod.reason.contains("while no agent ran"), "{}", pod.reason);
}
