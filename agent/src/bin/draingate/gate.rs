//! `draingate gate serve` and `draingate gate check`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Subcommand;

use crate::{EventsOutput, shutdown_signal};

#[derive(Debug, Subcommand)]
pub(crate) enum GateCommand {
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
pub(crate) struct GateServeArgs {
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
    /// Hold plain Deployments' rollouts: set the readiness gate condition
    /// `draingate.io/predecessors-drained` on each new pod that has it in `spec.readinessGates`,
    /// `True` once the old pods deleted in its rollout drained clean, `False` with a reason
    /// (draining, drain failed, no evidence) until then. Needs the Kubernetes API (in the cluster, or
    /// $KUBECONFIG) with pods get/list/watch and pods/status patch.
    #[arg(long)]
    hold: bool,
    /// How often --hold looks at the held pods again: a held pod is released at most this
    /// long (plus one round of the agents) after its last predecessor passed.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration, requires = "hold")]
    hold_interval: Duration,
    /// What --hold does to a Deployment whose old pod failed its drain, beyond holding its new
    /// pod and recording Events: `pause` also sets its `spec.paused` (needs deployments patch).
    #[arg(long, value_enum, default_value_t = OnFail::None, requires = "hold")]
    on_fail: OnFail,
    /// The namespace of the gate's Lease (leader election among replicas) and webhook Secret.
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "draingate",
        requires = "hold"
    )]
    namespace: String,
    /// The Lease through which replicas elect the one that writes conditions and Events.
    #[arg(long, default_value = "draingate-gate", requires = "hold")]
    lease: String,
    /// Serve the mutating admission webhook (HTTPS) on this address: it adds the readiness gate
    /// to the pods of Deployments in namespaces labelled `draingate.io/hold=enabled`.
    #[arg(long, value_parser = draingate::parse_listen_addr, requires = "hold")]
    webhook_addr: Option<SocketAddr>,
    /// The webhook's certificate from DIR (`tls.crt`, `tls.key`: a `kubernetes.io/tls` Secret,
    /// e.g. cert-manager's, which also injects the caBundle). Without it the gate makes its own
    /// CA and certificate, keeps them in --webhook-secret and writes the CA into
    /// --webhook-configuration's caBundle.
    #[arg(long, value_name = "DIR", requires = "webhook_addr")]
    webhook_tls_dir: Option<PathBuf>,
    /// The Secret (in --namespace) that keeps the certificate the gate made.
    #[arg(
        long,
        default_value = "draingate-gate-webhook",
        requires = "webhook_addr"
    )]
    webhook_secret: String,
    /// The DNS names or IP addresses of the certificate the gate makes (the webhook Service's).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "draingate-gate-webhook.draingate.svc",
        requires = "webhook_addr"
    )]
    webhook_names: Vec<String>,
    /// The mutating webhook configuration whose caBundle the gate writes.
    #[arg(long, default_value = "draingate-gate", requires = "webhook_addr")]
    webhook_configuration: String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum OnFail {
    /// Hold the new pod and record Events only.
    None,
    /// Also pause the Deployment.
    Pause,
}

#[derive(Debug, clap::Args)]
pub(crate) struct GateCheckArgs {
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

pub(crate) async fn gate_serve(args: GateServeArgs) -> anyhow::Result<ExitCode> {
    use draingate::gate::{self, pool};
    let discovery = if let Some(dns) = &args.agents_dns {
        pool::Discovery::dns(dns).map_err(|e| anyhow::anyhow!("--agents-dns {e}"))?
    } else {
        let file = match &args.agents_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --agents-file {}", path.display()))?,
            ),
            None => None,
        };
        pool::Discovery::listed(&args.agents, file.as_deref())?
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
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut stop = stop_rx.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    };
    let hold = if args.hold {
        Some(start_hold(&args, std::sync::Arc::clone(&gate), &stopped).await?)
    } else {
        None
    };
    let listen = gate::GateListen {
        http: args.http_addr,
        grpc: args.grpc_addr,
    };
    let signal = tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    gate::serve(gate, &listen, stopped()).await?;
    signal.abort();
    if let Some(hold) = hold {
        for task in hold {
            // The controller gives its Lease up; the webhook finishes its requests.
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts `--hold`: the webhook (when asked for) and the controller under leader election.
async fn start_hold<S, F>(
    args: &GateServeArgs,
    gate: std::sync::Arc<draingate::gate::Gate>,
    stopped: &S,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>>
where
    S: Fn() -> F,
    F: Future<Output = ()> + Send + 'static,
{
    use draingate::gate::{controller, lease, webhook};
    let client = kube::Client::try_default()
        .await
        .context("--hold needs the Kubernetes API (in a cluster, or $KUBECONFIG)")?;
    let mut tasks = Vec::new();
    if let Some(addr) = args.webhook_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on --webhook-addr {addr}"))?;
        let tls = match &args.webhook_tls_dir {
            Some(dir) => webhook::WebhookTls::Mounted(
                draingate::tls::https_config_from_dir(dir)
                    .with_context(|| format!("--webhook-tls-dir {}", dir.display()))?,
            ),
            None => webhook::WebhookTls::SelfMade {
                namespace: args.namespace.clone(),
                secret: args.webhook_secret.clone(),
                names: args.webhook_names.clone(),
                configuration: args.webhook_configuration.clone(),
            },
        };
        tasks.push(tokio::spawn(webhook::serve(
            client.clone(),
            listener,
            tls,
            stopped(),
        )));
    }
    let config = controller::HoldConfig {
        interval: args.hold_interval,
        on_fail: match args.on_fail {
            OnFail::None => controller::OnFail::None,
            OnFail::Pause => controller::OnFail::Pause,
        },
    };
    let lease_config = lease::LeaseConfig::new(&args.namespace, &args.lease, &lease::identity());
    let elector = lease::Elector::new(client.clone(), lease_config);
    let shutdown = stopped();
    tasks.push(tokio::spawn(async move {
        let run = || controller::run(std::sync::Arc::clone(&gate), client.clone(), config.clone());
        // Standing by forever would leave held pods unready.
        if let Err(err) = lease::lead(elector, run, shutdown).await {
            tracing::error!(error = %err, "the readiness gate stopped; exiting to be restarted");
            std::process::exit(1);
        }
    }));
    Ok(tasks)
}

pub(crate) async fn gate_check(args: GateCheckArgs) -> anyhow::Result<ExitCode> {
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
