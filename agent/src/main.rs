//! The `draingate` binary: command-line parsing only; the work is in the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use draingate::{
    agent::{Agent, AgentConfig},
    api::{self, ListenConfig},
    cli::{self, AgentAddr},
    inventory::LocalSource,
    loader::ProbeConfig,
    telemetry,
};
use draingate_proto::v1 as pb;

/// draingate proves that a rolling update lost no request: it counts, per pod, the TCP
/// connections still open and every reset and refused connection while the pod terminates.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent: load the eBPF programs, watch every pod (network namespace) on this
    /// host, and serve the gRPC API on TCP and a unix socket. Stops cleanly on SIGTERM or
    /// Ctrl-C, leaving the programs attached and the maps pinned for the next agent.
    Agent(AgentArgs),
    /// List the pods the agent knows, with their open connections, errors and verdict.
    Pods {
        #[command(flatten)]
        agent: AgentFlag,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = PodsOutput::Table)]
        output: PodsOutput,
    },
    /// A live table of the pods, refreshed every second, terminating and failing pods first.
    /// Ctrl-C quits.
    Top {
        #[command(flatten)]
        agent: AgentFlag,
    },
    /// Show notable events (resets, refused connections, failed connects), oldest first.
    Events {
        #[command(flatten)]
        agent: AgentFlag,
        /// Only events of this pod (name, or uid).
        #[arg(long)]
        pod: Option<String>,
        /// Namespace of --pod.
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Keep running and print new events as they happen.
        #[arg(long, short)]
        follow: bool,
        /// Output format: one line per event, or one JSON object per line.
        #[arg(short, long, value_enum, default_value_t = EventsOutput::Text)]
        output: EventsOutput,
    },
    /// Block until a pod's open connections reach zero. Exit 0: drained clean; 1: drained with
    /// errors; 2: timed out; 3: could not ask (no agent, unknown pod).
    WaitDrained {
        #[command(flatten)]
        agent: AgentFlag,
        /// The pod (name, or uid).
        #[arg(long)]
        pod: String,
        /// Namespace of --pod.
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Give up after this long, e.g. `30s`, `2m` (at most 1h).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, clap::Args)]
struct AgentFlag {
    /// The agent to ask: a unix socket path or `unix://PATH`, or `HOST:PORT`.
    #[arg(long, env = "DRAINGATE_AGENT", default_value = api::DEFAULT_SOCKET)]
    agent: AgentAddr,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PodsOutput {
    Table,
    Wide,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EventsOutput {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// Where to find pods: `local` (every network namespace on this host is a pod).
    #[arg(long, value_enum, default_value_t = Source::Local)]
    source: Source,
    /// gRPC address (TCP).
    #[arg(long, default_value = api::DEFAULT_GRPC_ADDR)]
    grpc_addr: SocketAddr,
    /// HTTP address for /metrics (Prometheus), /healthz and /readyz.
    #[arg(long, default_value = draingate::http::DEFAULT_HTTP_ADDR)]
    http_addr: SocketAddr,
    /// gRPC unix socket, used by the CLI.
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// bpffs directory for the pinned maps and links.
    #[arg(long, default_value = draingate_common::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// How long a gone pod's window stays open for late failures seen by peers.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    linger: Duration,
    /// How long finished pods are kept with their final totals.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    retention: Duration,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Source {
    Local,
}

fn main() -> ExitCode {
    telemetry::init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("draingate: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Agent(args) => run_agent(args).await.map(|()| ExitCode::SUCCESS),
            Command::Pods { agent, output } => pods(&agent.agent, output).await,
            Command::Top { agent } => top(&agent.agent).await,
            Command::Events {
                agent,
                pod,
                namespace,
                follow,
                output,
            } => events(&agent.agent, pod, namespace, follow, output).await,
            Command::WaitDrained {
                agent,
                pod,
                namespace,
                timeout,
            } => wait_drained(&agent.agent, pod, namespace, timeout).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("draingate: {err:#}");
            ExitCode::from(3)
        }
    }
}

async fn shutdown_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(err) => {
                tracing::error!(error = %err, "cannot install the SIGTERM handler");
                std::future::pending::<()>().await;
                return;
            }
        };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
    }
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let Source::Local = args.source;
    let config = AgentConfig {
        probes: ProbeConfig {
            pin_dir: args.pin_dir,
        },
        linger: args.linger,
        retention: args.retention,
        ..AgentConfig::default()
    };
    let (agent, handle) = Agent::new(config, Box::new(LocalSource::default()))?;
    let listen = ListenConfig {
        grpc_addr: args.grpc_addr,
        socket: args.socket,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http_listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} (HTTP)", args.http_addr))?;
    {
        let handle = handle.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(err) = draingate::http::serve(handle, http_listener, shutdown).await {
                tracing::error!(error = %err, "HTTP server failed");
            }
        });
    }
    let mut server = {
        let handle = handle.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            api::serve(handle, &listen, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        })
    };
    tracing::info!(grpc = %args.grpc_addr, http = %args.http_addr, "draingate agent running");
    let mut stop = stop_rx;
    let agent_task = tokio::spawn(agent.run(async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    tokio::select! {
        () = shutdown_signal() => {}
        done = &mut server => {
            let _ = stop_tx.send(true);
            done.context("API task")?.context("serving the API")?;
            anyhow::bail!("the API server stopped unexpectedly");
        }
    }
    let _ = stop_tx.send(true);
    agent_task.await.context("agent task")??;
    Ok(())
}

async fn pods(addr: &AgentAddr, output: PodsOutput) -> anyhow::Result<ExitCode> {
    let mut client = cli::connect(addr).await?;
    let response = client
        .list_pods(pb::ListPodsRequest {})
        .await
        .map_err(cli::CliError::from)?
        .into_inner();
    match output {
        PodsOutput::Json => {
            let pods: Vec<_> = response.pods.iter().map(cli::pod_json).collect();
            let doc = serde_json::json!({ "pods": pods, "lost_events": response.lost_events });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        PodsOutput::Table | PodsOutput::Wide => {
            print!(
                "{}",
                cli::pods_table(&response.pods, matches!(output, PodsOutput::Wide))
            );
            if response.lost_events > 0 {
                eprintln!(
                    "warning: the kernel lost {} events; verdicts of pods terminating meanwhile are unknown",
                    response.lost_events
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn top(addr: &AgentAddr) -> anyhow::Result<ExitCode> {
    let mut client = cli::connect(addr).await?;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
        let response = client
            .list_pods(pb::ListPodsRequest {})
            .await
            .map_err(cli::CliError::from)?
            .into_inner();
        // Clear the screen and go home, then draw.
        print!(
            "\x1b[2J\x1b[Hdraingate top  {}  ({} pods, lost events: {})\n\n{}",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
            response.pods.len(),
            response.lost_events,
            cli::pods_table(&response.pods, true)
        );
    }
}

fn pod_ref(pod: Option<String>, namespace: Option<String>) -> Option<pb::PodRef> {
    pod.map(|pod| {
        let is_uid = pod.starts_with("netns-");
        pb::PodRef {
            namespace: namespace.unwrap_or_default(),
            name: if is_uid { String::new() } else { pod.clone() },
            uid: if is_uid { pod } else { String::new() },
        }
    })
}

async fn events(
    addr: &AgentAddr,
    pod: Option<String>,
    namespace: Option<String>,
    follow: bool,
    output: EventsOutput,
) -> anyhow::Result<ExitCode> {
    let mut client = cli::connect(addr).await?;
    let mut stream = client
        .stream_events(pb::StreamEventsRequest {
            pod: pod_ref(pod, namespace),
            follow,
        })
        .await
        .map_err(cli::CliError::from)?
        .into_inner();
    loop {
        let next = tokio::select! {
            next = stream.message() => next.map_err(cli::CliError::from)?,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(event) = next else { break };
        match output {
            EventsOutput::Text => println!("{}", cli::event_line(&event)),
            EventsOutput::Json => println!("{}", cli::event_json(&event)),
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn wait_drained(
    addr: &AgentAddr,
    pod: String,
    namespace: Option<String>,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    if timeout > api::MAX_WAIT {
        anyhow::bail!("--timeout must be at most 1h");
    }
    let mut client = cli::connect(addr).await?;
    let response = client
        .wait_drained(pb::WaitDrainedRequest {
            pod: pod_ref(Some(pod), namespace),
            timeout: prost_types::Duration::try_from(timeout).ok(),
        })
        .await
        .map_err(cli::CliError::from)?
        .into_inner();
    let pod = response.pod.unwrap_or_default();
    let name = pod.pod.clone().unwrap_or_default().name;
    match pb::DrainOutcome::try_from(response.outcome).unwrap_or(pb::DrainOutcome::Unspecified) {
        pb::DrainOutcome::DrainedClean => {
            println!("{name}: drained clean (errors 0)");
            Ok(ExitCode::SUCCESS)
        }
        pb::DrainOutcome::DrainedDirty => {
            println!("{name}: drained with {} errors: {}", pod.errors, pod.reason);
            Ok(ExitCode::from(1))
        }
        _ => {
            println!(
                "{name}: timed out after {} with {} connections open",
                humantime::format_duration(timeout),
                pod.open
            );
            Ok(ExitCode::from(2))
        }
    }
}
