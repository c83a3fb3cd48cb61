//! The node-level CLI against a running agent: connecting, and rendering pods and events for
//! people (tables) and scripts (`-o json`).

use std::{path::PathBuf, time::SystemTime};

use draingate_proto::v1::{self as pb, agent_client::AgentClient};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::drain::{EventKind, Phase, Verdict};

/// Where to reach the agent: `unix:///run/draingate/agent.sock` or `http://host:9560`.
#[derive(Debug, Clone)]
pub enum AgentAddr {
    Unix(PathBuf),
    Tcp(String),
}

impl std::str::FromStr for AgentAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix://") {
            Ok(Self::Unix(PathBuf::from(path)))
        } else if s.starts_with('/') {
            Ok(Self::Unix(PathBuf::from(s)))
        } else if s.starts_with("http://") {
            Ok(Self::Tcp(s.to_owned()))
        } else if s.contains(':') {
            Ok(Self::Tcp(format!("http://{s}")))
        } else {
            Err(format!(
                "expected unix:///path/to/agent.sock, /path/to/agent.sock, host:port or \
                 http://host:port, got {s:?}"
            ))
        }
    }
}

impl std::fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Tcp(url) => f.write_str(url),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "no draingate agent answers at {addr}; start one with `sudo draingate agent`, or point \
         --agent at a running one"
    )]
    NoAgent {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{}", .0.message())]
    Rpc(#[from] tonic::Status),
}

/// Connects to the agent, failing fast with how to start one.
pub async fn connect(addr: &AgentAddr) -> Result<AgentClient<Channel>, CliError> {
    let no_agent = |source| CliError::NoAgent {
        addr: addr.to_string(),
        source,
    };
    let channel = match addr {
        AgentAddr::Tcp(url) => Endpoint::from_shared(url.clone())
            .map_err(no_agent)?
            .connect_timeout(std::time::Duration::from_secs(3))
            .connect()
            .await
            .map_err(no_agent)?,
        AgentAddr::Unix(path) => {
            let path = path.clone();
            // The URI is required by the API but unused: the connector dials the socket.
            Endpoint::from_static("http://agent.sock")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(no_agent)?
        }
    };
    Ok(AgentClient::new(channel))
}

fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.and_then(|ts| SystemTime::try_from(*ts).ok())
        .map_or(Value::Null, |t| {
            Value::String(humantime::format_rfc3339_millis(t).to_string())
        })
}

/// The names below are the domain enums' own (`drain::…::as_str`), so the CLI, the metrics and
/// the agent's logs say the same words.
#[must_use]
pub fn verdict_name(verdict: i32) -> &'static str {
    match pb::Verdict::try_from(verdict).unwrap_or(pb::Verdict::Unspecified) {
        pb::Verdict::None | pb::Verdict::Unspecified => Verdict::None,
        pb::Verdict::Pending => Verdict::Pending,
        pb::Verdict::Pass => Verdict::Pass,
        pb::Verdict::Fail => Verdict::Fail,
        pb::Verdict::Unknown => Verdict::Unknown,
    }
    .as_str()
}

#[must_use]
pub fn phase_name(phase: i32) -> &'static str {
    match pb::Phase::try_from(phase).unwrap_or(pb::Phase::Unspecified) {
        pb::Phase::Running | pb::Phase::Unspecified => Phase::Running,
        pb::Phase::Terminating => Phase::Terminating,
        pb::Phase::Exited => Phase::Exited,
    }
    .as_str()
}

/// A pod as `pods -o json` prints it.
#[must_use]
pub fn pod_json(pod: &pb::Pod) -> Value {
    let id = pod.pod.clone().unwrap_or_default();
    let total = pod.total.unwrap_or_default();
    let window = pod.window.unwrap_or_default();
    let t = pod.timeline.unwrap_or_default();
    json!({
        "namespace": id.namespace,
        "name": id.name,
        "uid": id.uid,
        "addresses": pod.addresses,
        "phase": phase_name(pod.phase),
        "open": pod.open,
        "accepted": total.accepted,
        "opened": total.opened,
        "resets_sent": total.resets_sent,
        "resets_received": total.resets_received,
        "refused": total.refused,
        "failed_connects": total.failed_connects,
        "http": {
            "ok": total.http_ok,
            "4xx": total.http_4xx,
            "5xx": total.http_5xx,
            "from_node": pod.http_from_node,
            "requests_cut": total.requests_cut,
            "http2_goaways": total.http2_goaways,
            "http2_refused_streams": total.http2_refused_streams,
            "http2_resets": total.http2_resets,
        },
        "window": {
            "accepted": window.accepted,
            "resets_sent": window.resets_sent,
            "resets_received": window.resets_received,
            "refused": window.refused,
            "failed_connects": window.failed_connects,
            "http_5xx": window.http_5xx,
            "requests_cut": window.requests_cut,
            "http2_resets": window.http2_resets,
        },
        "peer_failures": pod.peer_failures,
        "from_node": pod.from_node,
        "startup": pod.startup.as_ref().map(|s| json!({
            "errors": s.errors,
            "errors_before_ready": s.errors_before_ready,
            "first_error_at": rfc3339(s.first_error_at.as_ref()),
            "last_error_at": rfc3339(s.last_error_at.as_ref()),
            "ready_at": rfc3339(s.ready_at.as_ref()),
            "reason": s.reason,
        })),
        "errors": pod.errors,
        "open_at_exit": pod.open_at_exit,
        "verdict": verdict_name(pod.verdict),
        "reason": pod.reason,
        "owner_kind": pod.owner_kind,
        "owner_name": pod.owner_name,
        "pod_template_hash": pod.pod_template_hash,
        "node": pod.node,
        "in_service": pod.in_service,
        "grace_period_seconds": pod.grace_period_seconds,
        "pids": pod.pids,
        "timeline": {
            "terminating_since": rfc3339(t.terminating_since.as_ref()),
            "last_accepted": rfc3339(t.last_accepted.as_ref()),
            "left_endpoints": rfc3339(t.left_endpoints.as_ref()),
            "drained_at": rfc3339(t.drained_at.as_ref()),
            "exited_at": rfc3339(t.exited_at.as_ref()),
            "sigkill_at": rfc3339(t.sigkill_at.as_ref()),
            "window_closed_at": rfc3339(t.window_closed_at.as_ref()),
        },
    })
}

/// An event as `events -o json` prints it (one object per line).
#[must_use]
pub fn event_json(event: &pb::Event) -> Value {
    let id = event.pod.clone().unwrap_or_default();
    json!({
        "namespace": id.namespace,
        "pod": id.name,
        "uid": id.uid,
        "kind": event_kind_name(event.kind),
        "time": rfc3339(event.time.as_ref()),
        "local": format!("{}:{}", bracket(&event.local_address), event.local_port),
        "remote": format!("{}:{}", bracket(&event.remote_address), event.remote_port),
        "tcp_state": event.tcp_state,
        "reason": event.reason,
        "in_window": event.in_window,
        "request": (!event.request.is_empty()).then_some(&event.request),
        "service": (!event.service_address.is_empty())
            .then(|| format!("{}:{}", bracket(&event.service_address), event.service_port)),
    })
}

fn bracket(addr: &str) -> String {
    if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_owned()
    }
}

#[must_use]
pub fn event_kind_name(kind: i32) -> &'static str {
    let kind = match pb::EventKind::try_from(kind).unwrap_or(pb::EventKind::Unspecified) {
        pb::EventKind::ResetSent => EventKind::ResetSent,
        pb::EventKind::ResetReceived => EventKind::ResetReceived,
        pb::EventKind::Refused => EventKind::Refused,
        pb::EventKind::ConnectFailed => EventKind::ConnectFailed,
        pb::EventKind::PeerConnectFailed => EventKind::PeerConnectFailed,
        pb::EventKind::Http5xx => EventKind::Http5xx,
        pb::EventKind::RequestCut => EventKind::RequestCut,
        pb::EventKind::Http2Goaway => EventKind::H2Goaway,
        pb::EventKind::Http2Reset => EventKind::H2Reset,
        pb::EventKind::Unspecified => return "unknown",
    };
    kind.as_str()
}

/// Pods for people: terminating and failing ones first, then by name.
#[must_use]
pub fn pods_table(pods: &[pb::Pod], wide: bool) -> String {
    let mut pods: Vec<&pb::Pod> = pods.iter().collect();
    let rank = |p: &pb::Pod| -> u8 {
        match (verdict_name(p.verdict), phase_name(p.phase)) {
            ("fail" | "unknown", _) => 0,
            (_, "terminating") => 1,
            ("pending", _) => 2,
            _ => 3,
        }
    };
    pods.sort_by(|a, b| {
        rank(a).cmp(&rank(b)).then_with(|| {
            let name = |p: &pb::Pod| p.pod.as_ref().map(|r| r.name.clone()).unwrap_or_default();
            name(a).cmp(&name(b))
        })
    });
    let mut rows = vec![if wide {
        vec![
            "NAMESPACE",
            "NAME",
            "PHASE",
            "OPEN",
            "ACCEPTED",
            "RST_SENT",
            "RST_RECV",
            "REFUSED",
            "FAILED_CONN",
            "5XX",
            "PROBES",
            "STARTUP",
            "ERRORS",
            "VERDICT",
            "ADDRESSES",
            "UID",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    } else {
        vec![
            "NAMESPACE",
            "NAME",
            "PHASE",
            "OPEN",
            "ACCEPTED",
            "ERRORS",
            "VERDICT",
        ]
        .into_iter()
        .map(String::from)
        .collect()
    }];
    for pod in pods {
        let id = pod.pod.clone().unwrap_or_default();
        let total = pod.total.unwrap_or_default();
        let mut row = vec![
            id.namespace,
            id.name,
            phase_name(pod.phase).to_owned(),
            pod.open.to_string(),
            total.accepted.to_string(),
        ];
        if wide {
            row.extend([
                total.resets_sent.to_string(),
                total.resets_received.to_string(),
                total.refused.to_string(),
                total.failed_connects.to_string(),
                total.http_5xx.to_string(),
                pod.from_node.to_string(),
                pod.startup.as_ref().map_or(0, |s| s.errors).to_string(),
            ]);
        }
        row.push(pod.errors.to_string());
        row.push(verdict_name(pod.verdict).to_owned());
        if wide {
            row.push(pod.addresses.join(","));
            row.push(id.uid);
        }
        rows.push(row);
    }
    render(&rows)
}

/// Events for people.
#[must_use]
pub fn event_line(event: &pb::Event) -> String {
    let id = event.pod.clone().unwrap_or_default();
    let time = rfc3339(event.time.as_ref());
    format!(
        "{}  {}/{}  {:<14} {}:{} -> {}{}:{}  state={}{}{}{}",
        time.as_str().unwrap_or("-"),
        id.namespace,
        id.name,
        event_kind_name(event.kind),
        bracket(&event.local_address),
        event.local_port,
        if event.service_address.is_empty() {
            String::new()
        } else {
            format!(
                "{}:{} => ",
                bracket(&event.service_address),
                event.service_port
            )
        },
        bracket(&event.remote_address),
        event.remote_port,
        event.tcp_state,
        if event.reason.is_empty() {
            String::new()
        } else {
            format!(" reason={}", event.reason)
        },
        if event.request.is_empty() {
            String::new()
        } else {
            format!(" request={:?}", event.request)
        },
        if event.in_window {
            "  [terminating]"
        } else {
            ""
        },
    )
}

fn render(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
