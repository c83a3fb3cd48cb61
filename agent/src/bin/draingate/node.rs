//! The node-level CLI: `pods`, `top`, `events` and `wait-drained`, each a client of the agent.

use std::{process::ExitCode, time::Duration};

use anyhow::Context as _;
use draingate::{
    api,
    cli::{self, AgentAddr},
};
use draingate_proto::v1 as pb;

use crate::{EventsOutput, PodsOutput};

pub(crate) async fn pods(addr: &AgentAddr, output: PodsOutput) -> anyhow::Result<ExitCode> {
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

pub(crate) async fn top(addr: &AgentAddr) -> anyhow::Result<ExitCode> {
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

pub(crate) async fn events(
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

pub(crate) async fn wait_drained(
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
