//! `draingate rehearse`: its flags, the rollout they describe, and the report.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use draingate::rehearse::{self, RehearseConfig, load::ConnectionMode, spec::RolloutSpec};

use crate::{EventsOutput, shutdown_signal};

#[derive(Debug, clap::Args)]
pub(crate) struct RehearseArgs {
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

pub(crate) async fn rehearse(args: RehearseArgs) -> anyhow::Result<ExitCode> {
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

#[cfg(test)]
mod tests {
    use super::split_next;

    #[test]
    fn next_splits_the_two_servers_and_drops_its_separator() {
        let words = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            split_next(words("srv --port 1")),
            (words("srv --port 1"), None)
        );
        assert_eq!(
            split_next(words("srv v1 --next -- srv v2")),
            (words("srv v1"), Some(words("srv v2")))
        );
        assert_eq!(
            split_next(words("srv v1 --next srv v2")),
            (words("srv v1"), Some(words("srv v2")))
        );
    }
}
