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
    rehearse::{self, RehearseConfig, load::ConnectionMode, spec::RolloutSpec},
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
    /// Rehearse a rolling update of your own server on this machine (root): CMD runs as the
    /// replicas, each in its own pod network namespace behind a Service IP balanced by iptables
    /// as kube-proxy does; a load generator drives it while every replica is replaced in
    /// Kubernetes' order (surge, readiness, endpoint removal, preStop, SIGTERM, grace period,
    /// SIGKILL). Reports per pod the agent's verdict beside what the clients saw.
    ///
    /// Usage: `draingate rehearse [-f deploy.yaml] [FLAGS] -- CMD [ARGS...] [--next [--] CMD2
    /// [ARGS...]]`. The port reaches CMD as $PORT and as `{port}` in ARGS. Exit 0: every pod
    /// drained clean and no client failed; 1: failures (the agent and the clients agree);
    /// 3: the rehearsal could not run; 4: the agent disagrees with the clients (a draingate
    /// defect, please report it).
    #[command(verbatim_doc_comment)]
    Rehearse(Box<RehearseArgs>),
    /// Check Deployments and Argo Rollouts against the practices that keep a rolling update from
    /// losing requests: maxUnavailable 0 with a surge, a readiness probe, a preStop that covers
    /// endpoint propagation and does not signal the app, a grace period longer than the preStop
    /// plus the drain, a pod disruption budget. Each finding has its line, why it loses requests,
    /// and the fix. Exit 0: no error (warnings allowed); 1: an error finding; 3: a file could
    /// not be read or is not Kubernetes YAML.
    Lint {
        /// Manifests (multi-document YAML); `-` reads standard input. Budgets in one file cover
        /// workloads in another.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = EventsOutput::Text)]
        output: EventsOutput,
    },
    /// The rollout gate: one verdict per rollout from every node's agent, for Argo Rollouts,
    /// Flagger and CI pipelines (`gate serve`), and the question a pipeline asks (`gate check`).
    #[command(subcommand)]
    Gate(GateCommand),
    /// Write a new set of certificates for mutual TLS between the gate and the agents: a CA
    /// (its key is not kept), the agents' server certificate (name `draingate-agent`) and the
    /// gate's client certificate, with their keys (mode 0600). For a Secret:
    /// `kubectl -n draingate create secret generic draingate-tls --from-file=DIR`.
    TlsCerts {
        /// Directory to write into (made if missing; an existing set is never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// How long the certificates are valid.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        valid: Duration,
    },
    /// Block until a pod's open connections reach zero. Exit 0: drained clean; 1: drained with
    /// errors; 2: timed out; 3: could not ask (no agent, unknown pod).
    ///
    /// With --self, for a preStop exec hook in place of `sleep N`: the pod is the one this runs
    /// in (`POD_NAME` and `POD_NAMESPACE` from the downward API), the agent is reached through the
    /// node's socket (mount the host's /run/draingate), and it also waits until the pod is no
    /// longer a ready endpoint of any Service. It logs why it returned.
    #[command(verbatim_doc_comment)]
    WaitDrained {
        #[command(flatten)]
        agent: AgentFlag,
        /// The pod (name, or uid).
        #[arg(long, required_unless_present = "self_", conflicts_with = "self_")]
        pod: Option<String>,
        /// Namespace of --pod.
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// This pod (`POD_NAME`, `POD_NAMESPACE`), once out of the Service endpoints: for preStop.
        #[arg(long = "self", id = "self_")]
        self_: bool,
        /// Give up after this long, e.g. `30s`, `2m` (at most 1h).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum GateCommand {
    /// Serve the gate: asks every agent over gRPC (with a deadline each, a bounded number at
    /// once) and answers per rollout. HTTP: `GET /v1/verdict` (always 200, the verdict in the
    /// body, for Argo Rollouts' web metric provider), `POST /flagger/gate` (200 clean, 412
    /// dirty), `POST /flagger/rollback` (200 when dirty), `POST /flagger/events`, `/metrics`,
    /// `/healthz`. gRPC: `draingate.v1.Gate` (Check, Watch), health and reflection. An agent
    /// that cannot be asked makes the verdict unknown, never pass.
    Serve(Box<GateServeArgs>),
    /// Ask the gate about one rollout, for CI. Exit 0: pass (every terminated pod drained with no
    /// error); 1: fail; 2: still pending at the deadline; 3: unknown (an agent could not be
    /// asked, evidence lost) or no answer from the gate.
    Check(GateCheckArgs),
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("discovery").required(true).args(["agents", "agents_file", "agents_dns"])))]
struct GateServeArgs {
    /// The agents, as HOST:PORT (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    agents: Vec<String>,
    /// A file with one agent HOST:PORT per line (`#` starts a comment).
    #[arg(long)]
    agents_file: Option<PathBuf>,
    /// Find the agents through DNS: HOST:PORT of the agents' headless Service, e.g.
    /// `draingate-agent.draingate.svc.cluster.local:9560` (one address per node), resolved
    /// again every round.
    #[arg(long)]
    agents_dns: Option<String>,
    /// HTTP address (rollout tools, /metrics, /healthz).
    #[arg(long, default_value = draingate::gate::DEFAULT_HTTP_ADDR, value_parser = draingate::parse_listen_addr)]
    http_addr: SocketAddr,
    /// gRPC address (`draingate gate check`).
    #[arg(long, default_value = draingate::gate::DEFAULT_GRPC_ADDR, value_parser = draingate::parse_listen_addr)]
    grpc_addr: SocketAddr,
    /// Each agent must answer within this.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    agent_timeout: Duration,
    /// Ask the agents over mutual TLS with the set in DIR (`ca.crt`, `gate.crt`, `gate.key`,
    /// as `draingate tls-certs` writes them): agents must run with `--tls` from the same set.
    #[arg(long, env = "DRAINGATE_AGENT_TLS", value_name = "DIR")]
    agent_tls: Option<PathBuf>,
    /// Agents asked at once.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: u32,
    /// How often every rollout's verdict is refreshed into the history and the metrics.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    poll: Duration,
    /// Final verdicts kept after the agents forgot the pods.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    history_size: u32,
    /// How long a final verdict is kept.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    history_age: Duration,
}

#[derive(Debug, clap::Args)]
struct GateCheckArgs {
    /// The gate's gRPC address.
    #[arg(long, env = "DRAINGATE_GATE", default_value = "127.0.0.1:9562")]
    gate: String,
    /// The workload's namespace.
    #[arg(long, short = 'n')]
    namespace: String,
    /// The workload: `deploy/NAME` or `rollout/NAME` (Argo Rollouts).
    #[arg(long)]
    workload: String,
    /// pod-template-hash of the old pods (default: every pod but --new's).
    #[arg(long)]
    old: Option<String>,
    /// pod-template-hash of the new pods, never judged.
    #[arg(long)]
    new: Option<String>,
    /// Wait until the verdict is pass or fail, at most --timeout.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = EventsOutput::Text)]
    output: EventsOutput,
}

#[derive(Debug, clap::Args)]
struct RehearseArgs {
    /// A manifest with one Deployment: replicas, strategy.rollingUpdate, the first container's
    /// readinessProbe and preStop, terminationGracePeriodSeconds. Settings it cannot simulate
    /// are named in the report. Flags below override it.
    #[arg(short, long)]
    file: Option<PathBuf>,
    /// Number of replicas (default 3 without a manifest).
    #[arg(long)]
    replicas: Option<u32>,
    /// maxSurge: pods above replicas during the rollout, a number or a percentage.
    #[arg(long, value_parser = rehearse::spec::parse_int_or_percent)]
    max_surge: Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    /// maxUnavailable: pods below replicas during the rollout, a number or a percentage.
    #[arg(long, value_parser = rehearse::spec::parse_int_or_percent)]
    max_unavailable: Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    /// An HTTP readiness probe on this path (every --readiness-period).
    #[arg(long)]
    readiness_path: Option<String>,
    /// Period of the readiness probe.
    #[arg(long, value_parser = humantime::parse_duration)]
    readiness_period: Option<Duration>,
    /// No readiness probe, even if the manifest has one.
    #[arg(long, conflicts_with = "readiness_path")]
    no_readiness: bool,
    /// A preStop sleep of this long (`0s` for none).
    #[arg(long, value_parser = humantime::parse_duration)]
    pre_stop: Option<Duration>,
    /// terminationGracePeriodSeconds, e.g. `30s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    grace_period: Option<Duration>,
    /// The workload's name, used in pod names.
    #[arg(long)]
    name: Option<String>,
    /// The port the server listens on inside its pod.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests per second, all clients together.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rate: u32,
    /// Concurrent clients, one connection each.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    clients: u32,
    /// How clients use connections.
    #[arg(long, value_enum, default_value_t = ConnectionMode::KeepAlive)]
    connections: ConnectionMode,
    /// The path clients request.
    #[arg(long, default_value = "/")]
    path: String,
    /// How long an endpoint change takes to reach the node (endpoints controller + kube-proxy).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    propagation: Duration,
    /// Load before the rollout and after its last pod is gone.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Give up when the rollout takes longer.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// A request without an answer for this long has failed.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Where each pod's output goes (default: a new directory under /tmp).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = EventsOutput::Text)]
    output: EventsOutput,
    /// Also write the JSON report to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write every request's outcome to this file as CSV: when it was due, its latency, its
    /// outcome, the HTTP status and the client port.
    #[arg(long)]
    requests: Option<PathBuf>,
    /// Also serve the embedded agent's gRPC API on this TCP address, e.g. `127.0.0.1:9570`, so
    /// that `draingate gate serve --agents` can judge the rehearsed rollout.
    #[arg(long)]
    agent_listen: Option<SocketAddr>,
    /// After the report, keep the embedded agent and the new pods up this long (e.g. `5m`) for
    /// a gate to ask; Ctrl-C ends it sooner.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// The server: `CMD [ARGS...]`, then optionally `--next [--] CMD2 [ARGS...]` for the new
    /// version (by default the same command is rolled).
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
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
    /// Where to find pods.
    #[arg(long, value_enum, default_value_t = Source::Local)]
    source: Source,
    /// This node's name, for `--source kubernetes` (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// gRPC address (TCP).
    #[arg(long, default_value = api::DEFAULT_GRPC_ADDR, value_parser = draingate::parse_listen_addr)]
    grpc_addr: SocketAddr,
    /// HTTP address for /metrics (Prometheus), /healthz and /readyz.
    #[arg(long, default_value = draingate::http::DEFAULT_HTTP_ADDR, value_parser = draingate::parse_listen_addr)]
    http_addr: SocketAddr,
    /// gRPC unix socket, used by the CLI.
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Serve the TCP face over mutual TLS with the set in DIR (`ca.crt`, `agent.crt`,
    /// `agent.key`, as `draingate tls-certs` writes them): only clients with a certificate of
    /// that CA (the gate) are served. The unix socket stays plain.
    #[arg(long, env = "DRAINGATE_TLS", value_name = "DIR")]
    tls: Option<PathBuf>,
    /// bpffs directory for the pinned maps and links.
    #[arg(long, default_value = draingate_common::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// How long a gone pod's window stays open for late failures seen by peers.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    linger: Duration,
    /// How long finished pods are kept with their final totals.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// Where the resets pods send are counted from: `auto` takes the kernel's `tcp_send_reset`
    /// tracepoint where it sees every reset (6.10+) and each pod's packets (a TC program on
    /// its interface) before; `packets` takes the packets on any kernel.
    #[arg(long, value_enum, default_value_t = ResetSourceArg::Auto, env = "DRAINGATE_RESET_SOURCE")]
    reset_source: ResetSourceArg,
    /// Instead of running: remove what an agent on --pin-dir leaves behind when it stops (its
    /// TC filters on the pods' interfaces, its pinned maps and programs), then exit. For
    /// uninstalling, after the agent has stopped; refused while one runs.
    #[arg(long)]
    uninstall: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ResetSourceArg {
    Auto,
    Packets,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Source {
    /// Every network namespace on this host is a pod.
    Local,
    /// The pods the API server binds to this node (--node-name), watched with the pod's
    /// service account (get, list, watch on pods and endpointslices).
    Kubernetes,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A rehearsal's report is its output; the embedded agent's routine logs would drown it.
    telemetry::init_with_default(if matches!(cli.command, Command::Rehearse(_)) {
        "warn"
    } else {
        "info"
    });
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
            Command::Rehearse(args) => rehearse(*args).await,
            Command::Gate(GateCommand::Serve(args)) => gate_serve(*args).await,
            Command::Lint { files, output } => lint(&files, output),
            Command::TlsCerts { out, valid } => {
                for file in draingate::tls::generate(&out, valid)? {
                    println!("{}", file.display());
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Gate(GateCommand::Check(args)) => gate_check(args).await,
            Command::WaitDrained {
                agent,
                pod,
                namespace,
                self_,
                timeout,
            } => wait_drained(&agent.agent, pod, namespace, self_, timeout).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("draingate: {}", telemetry::chain(err.as_ref()));
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

fn lint(files: &[PathBuf], output: EventsOutput) -> anyhow::Result<ExitCode> {
    use draingate::lint;
    let mut texts = Vec::new();
    for file in files {
        // Never more than lint::MAX_INPUT of any input (a huge or endless one is refused).
        let (name, text) = if file.as_os_str() == "-" {
            let name = "<stdin>".to_owned();
            let text = lint::read_bounded(&name, std::io::stdin().lock())?;
            (name, text)
        } else {
            let name = file.display().to_string();
            let opened = std::fs::File::open(file).map_err(|source| lint::LintError::Read {
                file: name.clone(),
                source,
            })?;
            let text = lint::read_bounded(&name, opened)?;
            (name, text)
        };
        texts.push((name, text));
    }
    let findings = lint::lint(&texts)?;
    let errors = findings
        .iter()
        .filter(|f| f.severity == lint::Severity::Error)
        .count();
    match output {
        EventsOutput::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "findings": findings,
                "errors": errors,
                "warnings": findings.len() - errors,
            }))?
        ),
        EventsOutput::Text => print!("{}", lint::render(&findings)),
    }
    Ok(ExitCode::from(u8::from(errors > 0)))
}

async fn gate_serve(args: GateServeArgs) -> anyhow::Result<ExitCode> {
    use draingate::gate::{self, pool};
    let discovery = if let Some(dns) = &args.agents_dns {
        pool::Discovery::dns(dns).map_err(|e| anyhow::anyhow!("--agents-dns {e}"))?
    } else {
        let mut agents: Vec<String> = args
            .agents
            .iter()
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect();
        if let Some(file) = &args.agents_file {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read --agents-file {}", file.display()))?;
            agents.extend(
                text.lines()
                    .map(|l| l.split('#').next().unwrap_or_default().trim().to_owned())
                    .filter(|l| !l.is_empty()),
            );
        }
        for agent in &agents {
            if agent
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
            {
                anyhow::bail!("agent {agent:?} is not HOST:PORT");
            }
        }
        agents.sort();
        agents.dedup();
        if agents.is_empty() {
            anyhow::bail!("no agents given: use --agents, --agents-file or --agents-dns");
        }
        pool::Discovery::Static(agents)
    };
    gate::raise_open_files_limit();
    let gate = std::sync::Arc::new(gate::Gate::new(gate::GateConfig {
        pool: pool::PoolConfig {
            discovery,
            timeout: args.agent_timeout,
            concurrency: args.concurrency as usize,
            reuse: Duration::from_millis(500),
            tls: args
                .agent_tls
                .as_deref()
                .map(draingate::tls::client_config)
                .transpose()?,
        },
        poll: args.poll,
        history_size: args.history_size as usize,
        history_age: args.history_age,
    }));
    let listen = gate::GateListen {
        http: args.http_addr,
        grpc: args.grpc_addr,
    };
    gate::serve(gate, &listen, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn gate_check(args: GateCheckArgs) -> anyhow::Result<ExitCode> {
    use draingate::gate::{Query, check};
    let query = Query::new(
        &args.namespace,
        &args.workload,
        None,
        args.old.as_deref(),
        args.new.as_deref(),
    )?;
    let wait = if args.wait {
        args.timeout
    } else {
        Duration::ZERO
    };
    let response = check::check(&args.gate, &query, wait).await?;
    match args.output {
        EventsOutput::Json => println!(
            "{}",
            serde_json::to_string_pretty(&check::to_json(&query, &response))?
        ),
        EventsOutput::Text => print!("{}", check::render(&query, &response)),
    }
    Ok(ExitCode::from(check::exit_code(&response)))
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    if args.uninstall {
        let filters = draingate::loader::KernelProbes::uninstall(&args.pin_dir)?;
        println!(
            "draingate: removed {filters} TC filters and the pins under {}",
            args.pin_dir.display()
        );
        return Ok(());
    }
    // Every face's connection cap is fitted to this limit, keeping descriptors free for the
    // inventory (it opens /proc and netns files on every resync).
    let open_files = draingate::limits::raise_open_files_limit();
    tracing::debug!(open_files, "open-files limit");
    let mut config = AgentConfig {
        probes: ProbeConfig {
            reset_source: (args.reset_source == ResetSourceArg::Packets)
                .then_some(draingate::loader::ResetSource::Packets),
            ..ProbeConfig::at(args.pin_dir)
        },
        linger: args.linger,
        retention: args.retention,
        ..AgentConfig::default()
    };
    let source: Box<dyn draingate::inventory::InventorySource> = match args.source {
        Source::Local => Box::new(LocalSource::default()),
        Source::Kubernetes => {
            let node = args.node_name.clone().context(
                "--source kubernetes needs this node's name: --node-name, or NODE_NAME from the \
                 downward API (spec.nodeName)",
            )?;
            // In a pod: the service account; elsewhere: KUBECONFIG or ~/.kube/config.
            let client = kube::Client::try_default()
                .await
                .context("cannot configure the Kubernetes client")?;
            tracing::info!(node, "watching the pods bound to this node");
            config.node.clone_from(&node);
            // hostNetwork: the agent's namespace is the node's, where kubelet probes come from.
            config.node_addresses = draingate::agent::NodeAddresses::Own;
            Box::new(draingate::inventory::kubernetes::KubernetesSource::start(
                &client, &node,
            ))
        }
    };
    let (agent, handle) = Agent::new(config, source)?;
    let listen = ListenConfig {
        grpc_addr: args.grpc_addr,
        socket: args.socket,
        tls: args
            .tls
            .as_deref()
            .map(draingate::tls::server_config)
            .transpose()?,
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
        .list_pods(pb::ListPodsRequest::default())
        .await
        .map_err(cli::CliError::from)?
        .into_inner();
    match output {
        PodsOutput::Json => {
            let pods: Vec<_> = response.pods.iter().map(cli::pod_json).collect();
            let doc = serde_json::json!({
                "pods": pods,
                "lost_events": response.lost_events,
                "resets_forgotten": response.resets_forgotten,
            });
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
            if response.resets_forgotten > 0 {
                eprintln!(
                    "warning: the kernel's reset table forgot {} recent resets to remember newer \
                     ones; a late repeat of one may have counted as a new failure",
                    response.resets_forgotten
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
            .list_pods(pb::ListPodsRequest::default())
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
    pod: Option<String>,
    namespace: Option<String>,
    this_pod: bool,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    if timeout > api::MAX_WAIT {
        anyhow::bail!("--timeout must be at most 1h");
    }
    let (pod, namespace) = if this_pod {
        let var =
            |name: &str| {
                std::env::var(name).ok().filter(|v| !v.is_empty()).with_context(|| {
                format!(
                    "--self needs {name}: set POD_NAME and POD_NAMESPACE from the downward API \
                     (env valueFrom fieldRef metadata.name / metadata.namespace)"
                )
            })
            };
        (var("POD_NAME")?, Some(var("POD_NAMESPACE")?))
    } else {
        (pod.context("--pod or --self is required")?, namespace)
    };
    let started = std::time::Instant::now();
    let mut client = cli::connect(addr).await?;
    let response = client
        .wait_drained(pb::WaitDrainedRequest {
            pod: pod_ref(Some(pod), namespace),
            timeout: prost_types::Duration::try_from(timeout).ok(),
            until_left_endpoints: this_pod,
        })
        .await
        .map_err(cli::CliError::from)?
        .into_inner();
    let pod = response.pod.unwrap_or_default();
    let name = pod.pod.clone().unwrap_or_default().name;
    let waited = humantime::format_duration(Duration::from_millis(
        u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    ));
    let service = if this_pod {
        ", out of the Service endpoints"
    } else {
        ""
    };
    match pb::DrainOutcome::try_from(response.outcome).unwrap_or(pb::DrainOutcome::Unspecified) {
        pb::DrainOutcome::DrainedClean => {
            println!(
                "{name}: drained clean after {waited}{service} (0 connections open, 0 errors)"
            );
            Ok(ExitCode::SUCCESS)
        }
        pb::DrainOutcome::DrainedDirty => {
            println!(
                "{name}: drained after {waited}{service}, with {} errors: {}",
                pod.errors, pod.reason
            );
            Ok(ExitCode::from(1))
        }
        _ => {
            let why = if pod.in_service && this_pod {
                format!("still a ready endpoint, {} connections open", pod.open)
            } else {
                format!("{} connections open", pod.open)
            };
            println!(
                "{name}: timed out after {}: {why}",
                humantime::format_duration(timeout)
            );
            Ok(ExitCode::from(2))
        }
    }
}

/// Splits `CMD ARGS --next [--] CMD2 ARGS` into the two commands.
fn split_next(command: Vec<String>) -> (Vec<String>, Option<Vec<String>>) {
    match command.iter().position(|a| a == "--next") {
        None => (command, None),
        Some(i) => {
            let mut first = command;
            let mut next = first.split_off(i);
            next.remove(0);
            if next.first().is_some_and(|a| a == "--") {
                next.remove(0);
            }
            (first, Some(next))
        }
    }
}

fn rollout_spec(args: &RehearseArgs) -> anyhow::Result<RolloutSpec> {
    use rehearse::spec::ReadinessProbe;
    let mut spec = match &args.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            RolloutSpec::from_manifest(&path.display().to_string(), &text)?
        }
        None => RolloutSpec::default(),
    };
    if let Some(name) = &args.name {
        spec.name.clone_from(name);
    }
    if let Some(replicas) = args.replicas {
        spec.replicas = replicas;
    }
    if let Some(surge) = &args.max_surge {
        spec.surge_spec = surge.clone();
    }
    if let Some(unavailable) = &args.max_unavailable {
        spec.unavailable_spec = unavailable.clone();
    }
    // Percentages apply to the final replicas, as the Deployment controller applies them.
    spec.resolve_strategy()?;
    if args.no_readiness {
        spec.readiness = None;
    }
    if let Some(path) = &args.readiness_path {
        spec.readiness = Some(ReadinessProbe {
            http_path: Some(path.clone()),
            ..spec.readiness.take().unwrap_or_default()
        });
    }
    if let (Some(period), Some(probe)) = (args.readiness_period, spec.readiness.as_mut()) {
        probe.period = period;
    }
    if let Some(pre_stop) = args.pre_stop {
        spec.pre_stop = (!pre_stop.is_zero()).then_some(pre_stop);
    }
    if let Some(grace) = args.grace_period {
        spec.grace_period = grace;
    }
    spec.validate()?;
    Ok(spec)
}

async fn rehearse(args: RehearseArgs) -> anyhow::Result<ExitCode> {
    let spec = rollout_spec(&args)?;
    let (command, next_command) = split_next(args.command.clone());
    if command.is_empty() || next_command.as_ref().is_some_and(Vec::is_empty) {
        anyhow::bail!("give the server's command after `--` (and after `--next`, when used)");
    }
    let pid = std::process::id();
    let config = RehearseConfig {
        spec,
        command,
        next_command,
        port: args.port,
        rate: args.rate,
        clients: args.clients,
        mode: args.connections,
        path: args.path.clone(),
        propagation: args.propagation,
        settle: args.settle,
        timeout: args.timeout,
        request_timeout: args.request_timeout,
        log_dir: args
            .log_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("draingate-rehearse-{pid}"))),
        agent_socket: PathBuf::from(format!("/run/draingate/rehearse-{pid}.sock")),
        requests_out: args.requests.clone(),
        agent_listen: args.agent_listen,
        hold: args.hold,
    };
    let json = matches!(args.output, EventsOutput::Json);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if !json {
        eprintln!(
            "rehearsing {} replicas at {} req/s; agent API meanwhile: draingate pods --agent {}",
            config.spec.replicas,
            config.rate,
            config.agent_socket.display()
        );
    }
    let progress = |p: &rehearse::Progress| {
        let line = format!(
            "[{:>6.1}s] {:<8} new {}/{} ready, old {} left, {} terminating | {:.0} req/s, {} requests, {} failed",
            p.elapsed.as_secs_f64(),
            p.phase,
            p.new_ready,
            p.replicas,
            p.old_left,
            p.terminating,
            p.rate,
            p.requests,
            p.failed
        );
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    };
    // The report is shown as soon as it is ready, before a --hold.
    let mut shown: Option<anyhow::Result<u8>> = None;
    let hold = args.hold;
    let on_report = |report: &rehearse::report::Report| {
        if tty {
            eprintln!();
        }
        shown = Some(show_report(report, json, args.report.as_deref()).map(|()| report.exit_code));
        if !hold.is_zero() {
            eprintln!(
                "holding the embedded agent for {}; Ctrl-C ends it",
                humantime::format_duration(hold)
            );
        }
    };
    let outcome = tokio::select! {
        outcome = rehearse::run(config, progress, on_report) => outcome,
        () = shutdown_signal() => {
            rehearse::sweep().await;
            // An interrupted hold still has its report, and its exit code.
            if let Some(shown) = shown {
                return Ok(ExitCode::from(shown?));
            }
            eprintln!("\ninterrupted: removed the rehearsal's namespaces, rules and pods");
            return Ok(ExitCode::from(130));
        }
    };
    outcome?;
    let code = shown.context("the rehearsal ended without a report")??;
    Ok(ExitCode::from(code))
}

fn show_report(
    report: &rehearse::report::Report,
    json: bool,
    file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    if let Some(path) = file {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}
