//! `cargo xtask bench --only gate`: one rollout check across many agents.
//!
//! Simulated agents (each a real tonic server on loopback answering `draingate.v1.Agent`
//! `ListPods` with a node's worth of pods) run in this process; the gate is the real
//! `draingate gate serve`, a process of its own, given their addresses. Each measured check is a
//! gRPC `Check` that makes the gate ask every agent afresh. Side by side, as the baseline, this
//! process asks the same agents itself (the bare fan-out: same concurrency, no aggregation, no
//! gate hop). Reported: check latency (p50, p99, max) against the 2 s target and as a ratio to
//! the bare fan-out, and the gate's memory (`VmRSS`, `VmHWM`) against the 100 MiB target.
#![expect(
    clippy::cast_precision_loss,
    reason = "statistics over counts and durations far below 2^52"
)]

use std::{
    fmt::Write as _,
    path::PathBuf,
    pin::Pin,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use draingate_proto::v1::{
    self as pb,
    agent_client::AgentClient,
    agent_server::{Agent, AgentServer},
    gate_client::GateClient,
};
use draingate_tests::{ChildGuard, draingate_bin};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Measures a gate check across many agents.
#[derive(Debug, Parser)]
struct Args {
    /// Simulated agents (nodes).
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Pods per agent (Kubernetes' default maximum per node is 110).
    #[arg(long, default_value_t = 110)]
    pods: usize,
    /// Failed connects each agent reports for the peer view (to addresses of no pod checked).
    #[arg(long, default_value_t = 32)]
    peer_failures: usize,
    /// Measured checks (each alternated with a bare fan-out).
    #[arg(long, default_value_t = 40)]
    checks: usize,
    /// Agents the gate (and the baseline) ask at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Where to write the Markdown section.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A node's agent that answers `ListPods` with a fixed set of pods.
#[derive(Debug, Clone)]
struct SimAgent {
    pods: Arc<pb::ListPodsResponse>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Agent for SimAgent {
    async fn list_pods(
        &self,
        _: Request<pb::ListPodsRequest>,
    ) -> Result<Response<pb::ListPodsResponse>, Status> {
        Ok(Response::new((*self.pods).clone()))
    }

    async fn get_pod(&self, _: Request<pb::GetPodRequest>) -> Result<Response<pb::Pod>, Status> {
        Err(Status::unimplemented("not simulated"))
    }

    type WatchPodsStream = BoxStream<pb::PodUpdate>;

    async fn watch_pods(
        &self,
        _: Request<pb::WatchPodsRequest>,
    ) -> Result<Response<Self::WatchPodsStream>, Status> {
        Err(Status::unimplemented("not simulated"))
    }

    type StreamEventsStream = BoxStream<pb::Event>;

    async fn stream_events(
        &self,
        _: Request<pb::StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        Err(Status::unimplemented("not simulated"))
    }

    async fn wait_drained(
        &self,
        _: Request<pb::WaitDrainedRequest>,
    ) -> Result<Response<pb::WaitDrainedResponse>, Status> {
        Err(Status::unimplemented("not simulated"))
    }
}

/// Node `node`'s pods: two old pods of the rollout checked (drained clean), the rest running
/// pods of other workloads, as a busy node has them.
fn node_pods(node: usize, pods: usize, peers: usize) -> pb::ListPodsResponse {
    let now = prost_types::Timestamp::from(std::time::SystemTime::now());
    let pod = |i: usize, namespace: &str, owner: &str, hash: &str, verdict: pb::Verdict| pb::Pod {
        pod: Some(pb::PodRef {
            namespace: namespace.into(),
            name: format!("{owner}-{hash}-n{node}p{i}"),
            uid: format!("00000000-0000-4000-8000-{node:06}{i:06}"),
        }),
        addresses: vec![format!("10.{}.{}.{}", node / 256, node % 256, i + 2)],
        phase: if verdict == pb::Verdict::None {
            pb::Phase::Running
        } else {
            pb::Phase::Exited
        }
        .into(),
        total: Some(pb::Counters {
            accepted: 12_345,
            ..pb::Counters::default()
        }),
        window: Some(pb::Counters::default()),
        verdict: verdict.into(),
        reason: if verdict == pb::Verdict::Pass {
            "drained: no open connection, no error in the window".into()
        } else {
            String::new()
        },
        timeline: Some(pb::Timeline {
            terminating_since: (verdict != pb::Verdict::None).then_some(now),
            drained_at: (verdict == pb::Verdict::Pass).then_some(now),
            exited_at: (verdict == pb::Verdict::Pass).then_some(now),
            ..pb::Timeline::default()
        }),
        owner_kind: "Deployment".into(),
        owner_name: owner.into(),
        pod_template_hash: hash.into(),
        node: format!("node-{node}"),
        ..pb::Pod::default()
    };
    let mut list = vec![
        pod(0, "bench", "checkout", "7c9d5b8f4", pb::Verdict::Pass),
        pod(1, "bench", "checkout", "7c9d5b8f4", pb::Verdict::Pass),
    ];
    for i in 2..pods {
        list.push(pod(
            i,
            &format!("team-{}", i % 12),
            &format!("service-{}", i % 40),
            "5f6b7c8d9",
            pb::Verdict::None,
        ));
    }
    // A busy node's clients also failed some connects to addresses that are no pod of the
    // rollout (a peer list the gate must scan).
    let peer_failures = (0..peers)
        .map(|i| pb::Event {
            kind: pb::EventKind::ConnectFailed.into(),
            time: Some(now),
            local_address: format!("10.{}.{}.{}", node / 256, node % 256, i % 100 + 2),
            local_port: 40_000 + u32::try_from(i).unwrap_or(0),
            remote_address: format!("10.250.{}.{}", node % 256, i),
            remote_port: 5432,
            reason: "no answer".into(),
            ..pb::Event::default()
        })
        .collect();
    pb::ListPodsResponse {
        pods: list,
        lost_events: 0,
        node: format!("node-{node}"),
        peer_failures,
        peer_failures_complete_since: None,
        peer_gaps: Vec::new(),
        resets_forgotten: 0,
    }
}

async fn start_agents(count: usize, pods: usize, peers: usize) -> Vec<String> {
    let mut addrs = Vec::with_capacity(count);
    for node in 0..count {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an agent");
        addrs.push(listener.local_addr().expect("address").to_string());
        let service = AgentServer::new(SimAgent {
            pods: Arc::new(node_pods(node, pods, peers)),
        });
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
    }
    addrs
}

/// The baseline: this process asks every agent once, `concurrency` at a time.
async fn bare_fanout(
    channels: &[tonic::transport::Channel],
    concurrency: usize,
) -> (Duration, usize) {
    let started = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for channel in channels {
        let mut client = AgentClient::new(channel.clone()).max_decoding_message_size(16 << 20);
        let limit = Arc::clone(&limit);
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            client
                .list_pods(pb::ListPodsRequest::default())
                .await
                .map_or(0, |r| r.into_inner().pods.len())
        });
    }
    let mut pods = 0;
    while let Some(n) = tasks.join_next().await {
        pods += n.unwrap_or(0);
    }
    (started.elapsed(), pods)
}

/// The nearest-rank percentile `p` (in per cent) of sorted samples.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args = Args::parse();
    // A thousand agents' listeners and their connections.
    draingate::gate::raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    eprintln!(
        "starting {} simulated agents with {} pods each",
        args.agents, args.pods
    );
    let addrs = start_agents(args.agents, args.pods, args.peer_failures).await;
    let dir = std::env::temp_dir().join(format!("draingate-gate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let agents_file = dir.join("agents.txt");
    std::fs::write(&agents_file, addrs.join("\n")).expect("write the agents file");
    let free = || format!("127.0.0.1:{}", draingate_tests::free_port());
    let (http, grpc) = (free(), free());
    let gate = ChildGuard(
        Command::new(draingate_bin())
            .args(["gate", "serve", "--agents-file"])
            .arg(&agents_file)
            .args(["--http-addr", &http, "--grpc-addr", &grpc])
            .args(["--concurrency", &args.concurrency.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("run draingate gate serve"),
    );
    let gate_pid = gate.0.id();
    let channel = loop {
        match tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .expect("endpoint")
            .connect()
            .await
        {
            Ok(channel) => break channel,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut client = GateClient::new(channel).max_decoding_message_size(64 << 20);
    let request = || pb::CheckRequest {
        workload: Some(pb::WorkloadRef {
            namespace: "bench".into(),
            kind: "Deployment".into(),
            name: "checkout".into(),
        }),
        old_hash: "7c9d5b8f4".into(),
        new_hash: String::new(),
        wait: None,
    };
    let channels: Vec<_> = addrs
        .iter()
        .map(|a| {
            tonic::transport::Endpoint::from_shared(format!("http://{a}"))
                .expect("endpoint")
                .connect_lazy()
        })
        .collect();
    // Warm-up: connections opened on both sides.
    let warm = client
        .check(request())
        .await
        .expect("warm-up check")
        .into_inner();
    assert_eq!(
        (
            warm.agents_answered as usize,
            warm.terminating_pods as usize
        ),
        (args.agents, 2 * args.agents),
        "every agent answers and every old pod is judged: {warm:?}"
    );
    bare_fanout(&channels, args.concurrency).await;

    let mut gate_times = Vec::new();
    let mut bare_times = Vec::new();
    for i in 0..args.checks {
        // Past the gate's round reuse (500 ms): every check asks every agent afresh.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let gate_first = i % 2 == 0;
        for gate_turn in [gate_first, !gate_first] {
            if gate_turn {
                let started = Instant::now();
                let answer = client.check(request()).await.expect("check").into_inner();
                gate_times.push(started.elapsed());
                assert_eq!(
                    answer.verdict,
                    i32::from(pb::Verdict::Pass),
                    "{}",
                    answer.reason
                );
                assert_eq!(
                    answer.agents_answered as usize, args.agents,
                    "{}",
                    answer.reason
                );
            } else {
                let (took, pods) = bare_fanout(&channels, args.concurrency).await;
                assert_eq!(pods, args.agents * args.pods);
                bare_times.push(took);
            }
        }
    }
    let (rss, hwm) = (
        status_kib(gate_pid, "VmRSS:"),
        status_kib(gate_pid, "VmHWM:"),
    );
    drop(gate);
    let _ = std::fs::remove_dir_all(&dir);
    gate_times.sort();
    bare_times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (g50, g99, gmax) = (
        percentile(&gate_times, 50),
        percentile(&gate_times, 99),
        *gate_times.last().expect("checks"),
    );
    let (b50, b99) = (percentile(&bare_times, 50), percentile(&bare_times, 99));
    let command = format!(
        "sudo -E cargo xtask bench --only gate (draingate-gate-bench --agents {} --pods {} --peer-failures {} --checks {} --concurrency {})",
        args.agents, args.pods, args.peer_failures, args.checks, args.concurrency
    );
    let mut report = String::new();
    let _ = writeln!(
        report,
        "## Rollout gate: one check across {} agents\n\nReproduce: `{command}`\n",
        args.agents
    );
    let _ = writeln!(
        report,
        "{} simulated agents (real tonic servers on loopback, {} pods each: {} pods, {} of them \
         terminated pods of the rollout checked; each also reports {} failed connects of its \
         clients for the peer view, {} in all, to addresses of no pod checked) and the real \
         `draingate gate serve` on the same 2 cores. Each check makes the gate ask every agent afresh ({} at a time); the baseline, \
         alternated with it, is this process asking the same agents itself over kept \
         connections: the bare gRPC fan-out, without aggregation, the gate hop or connection \
         set-up. The gate opens its connections per round: kept ones cost about 50 KiB each \
         (107 MiB at 1,000 agents, measured), new ones cost the latency ratio below. {} checks.\n",
        args.agents,
        args.pods,
        args.agents * args.pods,
        2 * args.agents,
        args.peer_failures,
        args.peer_failures * args.agents,
        args.concurrency,
        args.checks
    );
    let _ = writeln!(report, "| | p50 | p99 | max | target |");
    let _ = writeln!(report, "|---|---|---|---|---|");
    let _ = writeln!(
        report,
        "| gate check | {:.0} ms | {:.0} ms | {:.0} ms | p99 <= 2000 ms |",
        ms(g50),
        ms(g99),
        ms(gmax)
    );
    let _ = writeln!(
        report,
        "| bare fan-out (baseline) | {:.0} ms | {:.0} ms | | |",
        ms(b50),
        ms(b99)
    );
    let _ = writeln!(
        report,
        "| ratio gate / baseline | {:.2} | {:.2} | | |",
        ms(g50) / ms(b50),
        ms(g99) / ms(b99)
    );
    let _ = writeln!(
        report,
        "\nGate memory after the checks: {:.1} MiB resident (VmRSS), {:.1} MiB peak (VmHWM); \
         target <= 100 MiB.",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    print!("{report}");
    if let Some(out) = &args.out {
        draingate_tests::write_section(
            out,
            &format!("Rollout gate: one check across {} agents", args.agents),
            &report,
        );
    }
}
