//! The `draingate` binary: the command line (clap) and, per subcommand, the wiring of the
//! libraries that do the work. `main` only dispatches; each module holds a subcommand's flags
//! and its wiring.

mod agent;
mod gate;
mod node;
mod rehearse;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use draingate::{api, cli::AgentAddr, telemetry};

use crate::{
    agent::{AgentArgs, run_agent},
    gate::{GateCommand, gate_check, gate_serve},
    node::{events, pods, top, wait_drained},
    rehearse::{RehearseArgs, rehearse},
};

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

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
