//! A rehearsal's outcome: per pod, the agent's verdict and counts beside what the clients saw,
//! and whether they agree. A disagreement is a defect of draingate and is reported as such.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    RehearseConfig, SimTimeline,
    load::{FailureNote, Outcome, RequestRecord},
    since,
};
use crate::drain::{PodDrain, Verdict};

/// Whether a pod was replaced or is a replacement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PodRole {
    /// Of the deployed version: terminated by the rollout.
    Old,
    /// Of the new version: started by the rollout.
    New,
}

/// What the agent said of a pod.
#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    pub verdict: &'static str,
    pub reason: String,
    /// Errors inside the termination window.
    pub errors: u64,
    /// Over the pod's life.
    pub resets_sent: u64,
    pub resets_received: u64,
    pub refused: u64,
    /// HTTP requests the pod closed connections on without answering (a client's `closed`).
    pub requests_cut: u64,
    pub accepted: u64,
    pub open_at_exit: Option<u64>,
    /// Seconds since the rehearsal started.
    pub terminating_since: Option<f64>,
    pub drained_at: Option<f64>,
    pub exited_at: Option<f64>,
    pub sigkill_at: Option<f64>,
    /// Resets and refusals outside the termination window: a new pod's fail the rollout.
    pub startup_errors: u64,
    /// Of those, before the pod was ready.
    pub startup_errors_before_ready: u64,
    /// Why they fail the rollout, for people; empty without any.
    pub startup_reason: String,
    /// The last of them (seconds since the rehearsal started): an old pod's fail the rollout
    /// when it comes after the rollout's first deletion.
    pub startup_last_error: Option<f64>,
    /// Resets and refusals with the node's own addresses (the simulated kubelet's probes):
    /// never errors.
    pub from_node: u64,
    /// Clients' connects to it that got no answer inside its window (the peer view).
    pub peer_failures: u64,
    /// HTTP answers to the node's own addresses (the simulated kubelet's probes), any status:
    /// never errors.
    pub http_from_node: u64,
}

/// One pod's line in the report.
#[derive(Debug, Clone, Serialize)]
pub struct PodReport {
    pub name: String,
    pub role: PodRole,
    /// `None` when the agent never saw the pod (a defect).
    pub agent: Option<AgentView>,
    /// Failures the clients saw on connections to this pod, by kind.
    pub client_failures: BTreeMap<&'static str, u64>,
    /// Of those, the ones after the pod's deletion began.
    pub client_failures_terminating: u64,
    /// Readiness probes the pod refused while starting: the agent counts them too.
    pub probe_refusals: u64,
    /// Resets and refusals: the agent's count (less probe refusals), and the clients'.
    pub agent_connection_errors: u64,
    pub client_connection_errors: u64,
    /// Client failures on connections the pod's exit closed with a FIN, not a reset (its
    /// process had read the request and died before answering): no reset to count, but the
    /// agent counts those connections in `open_at_exit`, which fails the pod.
    pub cut_at_exit: u64,
    /// Connects that got no answer (timeouts, unreachable): the clients' count, and the
    /// agent's (its peer view, through the node's connection tracking).
    pub client_no_answer: u64,
    pub agent_no_answer: u64,
    /// HTTP 5xx answers: the clients' count, and the agent's (read from the pod's packets,
    /// probes left out).
    pub client_http_5xx: u64,
    pub agent_http_5xx: u64,
    /// Requests that timed out on a connection the pod's kernel reset or refused (counted in
    /// `client_connection_errors`): a handshake whose last ACK met a full accept queue, whose
    /// late answer met the client's closed socket. Other request timeouts are stalls no
    /// packet of the pod's shows.
    pub client_timeouts_seen_by_pod: u64,
    pub agrees: bool,
    /// Why it does or does not agree, when there is something to say.
    pub note: String,
    /// When the simulator did things to it, in seconds since the start.
    pub timeline: BTreeMap<&'static str, f64>,
}

/// A count as a float, for rates and quantiles (exact below 2^53, far beyond any count here).
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "counts stay far below 2^53")]
pub fn as_f64(n: u64) -> f64 {
    n as f64
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// What the clients and the simulator know of one pod.
#[derive(Debug, Clone, Copy)]
pub struct ClientEvidence<'a> {
    /// The clients' failures on connections to the pod.
    pub failures: &'a [FailureNote],
    /// Readiness probes the pod refused.
    pub probe_refusals: u64,
    /// The clients' address, which the agent sees as the remote end.
    pub client: std::net::Ipv4Addr,
}

impl PodReport {
    #[must_use]
    pub fn new(
        name: &str,
        role: PodRole,
        agent: Option<&PodDrain>,
        sim: &SimTimeline,
        evidence: &ClientEvidence<'_>,
        started: Instant,
    ) -> Self {
        let ClientEvidence {
            failures,
            probe_refusals,
            client,
        } = *evidence;
        let mut client_failures = BTreeMap::new();
        for f in failures {
            *client_failures.entry(f.outcome.as_str()).or_default() += 1;
        }
        let client_failures_terminating = sim.deleted.map_or(0, |deleted| {
            failures.iter().filter(|f| f.at >= deleted).count() as u64
        });
        // What a pod's kernel can see: resets and refusals, and requests that timed out on a
        // connection it then reset. A connect timeout or an unreachable address has no packet
        // from the pod to count.
        let client_timeouts_seen_by_pod =
            agent.map_or(0, |pod| timeouts_seen_by_pod(pod, failures, client));
        let client_connection_errors = failures.iter().filter(|f| f.outcome.seen_by_pod()).count()
            as u64
            + client_timeouts_seen_by_pod;
        // Of those, connects that got no answer: the agent counts them from the client's side.
        let invisible = failures
            .iter()
            .filter(|f| f.outcome.connect_unanswered())
            .count();
        let client_http_5xx = failures
            .iter()
            .filter(|f| f.outcome == Outcome::Http5xx)
            .count() as u64;
        let agent_http_5xx = agent.map_or(0, |pod| pod.totals.http_5xx);
        let at = |t: Option<std::time::SystemTime>| t.and_then(|t| since(started, t)).map(secs);
        let agent_view = agent.map(|pod| {
            let (verdict, reason) = pod.verdict_and_reason();
            let startup = pod.startup();
            AgentView {
                verdict: verdict.as_str(),
                reason,
                errors: pod.errors(),
                resets_sent: pod.totals.resets_sent,
                resets_received: pod.totals.resets_received,
                refused: pod.totals.refused,
                requests_cut: pod.totals.requests_cut,
                accepted: pod.totals.accepted,
                open_at_exit: pod.open_at_exit,
                terminating_since: at(pod.timeline.terminating_since),
                drained_at: at(pod.timeline.drained_at),
                exited_at: at(pod.timeline.exited_at),
                sigkill_at: at(pod.timeline.sigkill_at),
                startup_errors: startup.errors(),
                startup_errors_before_ready: startup.before_ready,
                startup_reason: startup.reason(name),
                startup_last_error: at(startup.last_error_at),
                from_node: pod.totals.from_node,
                peer_failures: pod.peer_failures,
                http_from_node: pod.totals.http_from_node,
            }
        });
        // Probes come from the node's addresses, which the agent leaves out of its counts.
        // A request cut by the pod's FIN is a client's `closed`, as a reset is its `reset`.
        let agent_connection_errors = agent.map_or(0, |pod| {
            pod.totals.resets_sent
                + pod.totals.resets_received
                + pod.totals.refused
                + pod.totals.requests_cut
        });
        // Requests cut by the exit without a reset: closed (EOF) in the termination window,
        // at most as many as connections were open at the exit.
        let closed_terminating = sim.deleted.map_or(0, |deleted| {
            failures
                .iter()
                .filter(|f| f.outcome == Outcome::Closed && f.at >= deleted)
                .count() as u64
        });
        let open_at_exit = agent.and_then(|p| p.open_at_exit).unwrap_or(0);
        let missing = client_connection_errors.saturating_sub(agent_connection_errors);
        let cut_at_exit = if missing <= closed_terminating.min(open_at_exit) {
            missing
        } else {
            0
        };
        let (mut agrees, mut note) = judge(
            role,
            agent,
            agent_connection_errors + cut_at_exit,
            client_connection_errors,
            client_failures_terminating,
            invisible,
            client_http_5xx,
        );
        if agent.is_some() && agent_http_5xx != client_http_5xx {
            agrees = false;
            if !note.is_empty() {
                note.push_str("; ");
            }
            let _ = write!(
                note,
                "the clients saw {client_http_5xx} HTTP 5xx answers, the agent counted \
                 {agent_http_5xx}"
            );
        }
        if cut_at_exit > 0 {
            if !note.is_empty() {
                note.push_str("; ");
            }
            let _ = write!(
                note,
                "{cut_at_exit} requests died with connections the exit closed without a reset \
                 (counted in open_at_exit)"
            );
        }
        if agent_connection_errors != client_connection_errors
            && let Some(pod) = agent
        {
            note.push_str(&unmatched(pod, failures, client));
        }
        let mut timeline = BTreeMap::new();
        for (key, value) in [
            ("started", sim.started),
            ("ready", sim.ready),
            ("deleted", sim.deleted),
            ("endpoint_removed", sim.endpoint_removed),
            ("pre_stop_started", sim.pre_stop_started),
            ("sigterm", sim.sigterm),
            ("sigkill", sim.sigkill),
            ("exited", sim.exited),
            ("removed", sim.removed),
        ] {
            if let Some(v) = value {
                timeline.insert(key, secs(v));
            }
        }
        Self {
            name: name.to_owned(),
            role,
            agent: agent_view,
            client_failures,
            client_failures_terminating,
            probe_refusals,
            agent_connection_errors,
            client_connection_errors,
            cut_at_exit,
            client_no_answer: invisible as u64,
            agent_no_answer: agent.map_or(0, PodDrain::no_answer),
            client_http_5xx,
            agent_http_5xx,
            client_timeouts_seen_by_pod,
            agrees,
            note,
            timeline,
        }
    }
}

/// Requests that timed out on a connection (by its client port) on which the pod's kernel
/// then sent or received a reset, or refused a segment: the pod saw that failure too. With a
/// full accept queue the kernel drops a handshake's last ACK and the request after it; the
/// client believes it is connected, gives the request up, and when the server answers at
/// last, the client's kernel resets the connection (or the listener's close resets it, or
/// refuses the client's late segments). Each agent event explains one failure at most, and
/// the resets and refusals the clients saw themselves come first. The agent keeps the latest
/// events only, so this can undercount (never overcount) on a long rehearsal.
fn timeouts_seen_by_pod(
    pod: &PodDrain,
    failures: &[FailureNote],
    client: std::net::Ipv4Addr,
) -> u64 {
    use crate::drain::EventKind;
    let mut ports: Vec<u16> = pod
        .events
        .iter()
        .filter(|e| {
            e.remote == std::net::IpAddr::V4(client)
                && !e.from_node
                && matches!(
                    e.kind,
                    EventKind::ResetSent | EventKind::ResetReceived | EventKind::Refused
                )
        })
        .map(|e| e.remote_port)
        .collect();
    let mut take = |port: u16| {
        ports
            .iter()
            .position(|&p| p == port)
            .map(|i| ports.swap_remove(i))
            .is_some()
    };
    for f in failures.iter().filter(|f| f.outcome.seen_by_pod()) {
        take(f.client_port);
    }
    failures
        .iter()
        .filter(|f| f.outcome == Outcome::Timeout && take(f.client_port))
        .count() as u64
}

/// Which connections (by client port) only the agent, or only the clients, counted: the
/// evidence for a disagreement. The agent keeps the latest events only, so this is a sample.
fn unmatched(pod: &PodDrain, failures: &[FailureNote], client: std::net::Ipv4Addr) -> String {
    use crate::drain::EventKind;
    let agent_ports: Vec<(u16, &'static str)> = pod
        .events
        .iter()
        .filter(|e| e.remote == std::net::IpAddr::V4(client) && e.kind != EventKind::ConnectFailed)
        .map(|e| (e.remote_port, e.kind.as_str()))
        .collect();
    let client_ports: Vec<(u16, &'static str)> = failures
        .iter()
        .filter(|f| f.outcome.seen_by_pod())
        .map(|f| (f.client_port, f.outcome.as_str()))
        .collect();
    // The first few ports of `side` that `other` does not have.
    let only = |side: &[(u16, &'static str)], other: &[(u16, &'static str)]| {
        side.iter()
            .filter(|(port, _)| !other.iter().any(|(p, _)| p == port))
            .take(5)
            .map(|(port, kind)| format!("{port} ({kind})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "; client ports only the agent counted: [{}], only the clients: [{}]",
        only(&agent_ports, &client_ports),
        only(&client_ports, &agent_ports)
    )
}

/// Whether the agent's account of a pod matches the clients': the same number of resets and
/// refusals, and for a replaced pod a verdict that says what the clients lived through.
fn judge(
    role: PodRole,
    agent: Option<&PodDrain>,
    agent_errors: u64,
    client_errors: u64,
    client_terminating: u64,
    invisible: usize,
    client_http_5xx: u64,
) -> (bool, String) {
    let Some(pod) = agent else {
        return (false, "the agent never saw this pod".into());
    };
    let mut notes = Vec::new();
    // Timeouts and unreachable errors leave no packet of the pod's: the agent counts them from
    // the clients' side (the peer view, through the node's connection tracking).
    let agent_no_answer = pod.no_answer();
    let invisible = invisible as u64;
    if invisible != agent_no_answer {
        notes.push(format!(
            "the clients saw {invisible} timeouts or unreachable errors, the agent counted \
             {agent_no_answer} connects that got no answer"
        ));
    } else if invisible > 0 {
        notes.push(format!(
            "{invisible} client timeouts or unreachable errors, counted from the clients' side"
        ));
    }
    let counts = agent_errors == client_errors && invisible == agent_no_answer;
    if !counts {
        notes.push(format!(
            "the agent counted {agent_errors} resets, refusals and connections cut at exit, the \
             clients saw {client_errors}"
        ));
    }
    let verdict_ok = match role {
        // Its startup errors fail the rollout: they must be the clients' failures.
        PodRole::New => {
            let startup = pod.startup().errors();
            if startup > 0 && client_errors + invisible + client_http_5xx == 0 {
                notes.push(format!(
                    "the agent counted {startup} startup errors, but the clients saw none"
                ));
                false
            } else if startup == 0 && client_errors + invisible + client_http_5xx > 0 {
                notes.push(format!(
                    "the clients saw {} failures the agent did not count against the new pod",
                    client_errors + invisible + client_http_5xx
                ));
                false
            } else {
                true
            }
        }
        PodRole::Old => match pod.verdict() {
            Verdict::Pass => client_terminating == 0,
            Verdict::Fail if client_terminating > 0 => true,
            Verdict::Fail if pod.errors() == 0 && pod.open_at_exit.unwrap_or(0) > 0 => {
                notes.push(
                    "connections were cut at exit while their clients happened to be idle".into(),
                );
                true
            }
            Verdict::Fail => {
                notes.push("the agent says fail, but the clients saw no failure".into());
                false
            }
            other => {
                notes.push(format!("no final verdict ({})", other.as_str()));
                false
            }
        },
    };
    if matches!(role, PodRole::Old) && pod.verdict() == Verdict::Pass && client_terminating > 0 {
        notes.push(format!(
            "the agent says pass, but the clients saw {client_terminating} failures"
        ));
    }
    (counts && verdict_ok, notes.join("; "))
}

/// What the clients saw, all requests together.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientTotals {
    pub requests: u64,
    pub outcomes: BTreeMap<&'static str, u64>,
    pub failed: u64,
    pub seconds: f64,
    pub rate: f64,
    pub latency_ms: BTreeMap<&'static str, f64>,
}

impl ClientTotals {
    #[must_use]
    pub fn from_records(records: &[RequestRecord], duration: Duration) -> Self {
        let mut outcomes = BTreeMap::new();
        for r in records {
            *outcomes.entry(r.outcome.as_str()).or_default() += 1;
        }
        let mut ok: Vec<Duration> = records
            .iter()
            .filter(|r| r.outcome == Outcome::Ok)
            .map(|r| r.latency)
            .collect();
        ok.sort_unstable();
        let pick = |q: f64| -> f64 {
            if ok.is_empty() {
                return 0.0;
            }
            // Nearest rank: the index is within the slice and not negative.
            #[expect(
                clippy::cast_sign_loss,
                clippy::cast_possible_truncation,
                reason = "q is in [0, 1], so the rank is in [0, len - 1]"
            )]
            let i = (as_f64(ok.len() as u64 - 1) * q).round() as usize;
            (ok[i].as_secs_f64() * 1e6).round() / 1e3
        };
        let latency_ms = [("p50", pick(0.5)), ("p99", pick(0.99)), ("max", pick(1.0))]
            .into_iter()
            .collect();
        let requests = records.len() as u64;
        let failed = records.iter().filter(|r| r.outcome.is_failure()).count() as u64;
        Self {
            requests,
            outcomes,
            failed,
            seconds: secs(duration),
            rate: (as_f64(requests) / duration.as_secs_f64().max(1e-9)).round(),
            latency_ms,
        }
    }
}

/// The rollout as a whole.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub workload: String,
    /// The namespace and pod-template-hashes the embedded agent reported the pods under: what a
    /// rollout gate is asked about.
    pub namespace: String,
    pub old_hash: String,
    pub new_hash: String,
    pub settings: BTreeMap<&'static str, String>,
    pub not_simulated: Vec<String>,
    /// pass | fail | pending | unknown: the rollout rule, over the replaced pods' verdicts and
    /// the new pods' startup errors.
    pub verdict: &'static str,
    /// Why, when it failed.
    pub reasons: Vec<String>,
    /// Said when the clients made far less load than asked (this machine could not): the
    /// rehearsal then tested a lighter rollout than the one asked for.
    pub load_warning: Option<String>,
    pub clients: ClientTotals,
    pub clients_clean: bool,
    pub unattributed_failures: BTreeMap<&'static str, u64>,
    pub pods: Vec<PodReport>,
    /// Pods where the agent and the clients disagree: defects of draingate.
    pub disagreements: Vec<String>,
    pub load_started: f64,
    pub logs: String,
    pub exit_code: u8,
}

impl Report {
    #[must_use]
    pub fn new(
        config: &RehearseConfig,
        pods: Vec<PodReport>,
        clients: ClientTotals,
        unattributed: &[FailureNote],
        load_started: Duration,
    ) -> Self {
        let spec = &config.spec;
        let mut settings = BTreeMap::new();
        settings.insert("replicas", spec.replicas.to_string());
        settings.insert("max_surge", spec.max_surge.to_string());
        settings.insert("max_unavailable", spec.max_unavailable.to_string());
        settings.insert(
            "readiness_probe",
            spec.readiness.as_ref().map_or_else(
                || "none".into(),
                |p| {
                    format!(
                        "{} every {:?}",
                        p.http_path
                            .as_deref()
                            .map_or_else(|| "tcp".to_owned(), |path| format!("GET {path}")),
                        p.period
                    )
                },
            ),
        );
        settings.insert(
            "pre_stop",
            match (&spec.pre_stop, &spec.pre_stop_exec) {
                (Some(d), _) => format!("sleep {}", d.as_secs_f64()),
                (None, Some(command)) => format!("exec {}", command.join(" ")),
                (None, None) => "none".into(),
            },
        );
        settings.insert("stop_signal", spec.stop_signal.as_str().to_owned());
        settings.insert(
            "termination_grace_period",
            format!("{}s", spec.grace_period.as_secs()),
        );
        settings.insert(
            "endpoint_propagation",
            format!("{}s", config.propagation.as_secs_f64()),
        );
        settings.insert("rate", format!("{}/s", config.rate));
        settings.insert("clients", config.clients.to_string());
        settings.insert(
            "connections",
            match config.mode {
                super::load::ConnectionMode::KeepAlive => "keep-alive".into(),
                super::load::ConnectionMode::NewConnection => "new per request".into(),
            },
        );
        let mut unattributed_failures = BTreeMap::new();
        for f in unattributed {
            *unattributed_failures.entry(f.outcome.as_str()).or_default() += 1;
        }
        let old: Vec<&PodReport> = pods.iter().filter(|p| p.role == PodRole::Old).collect();
        let verdict_of = |p: &&PodReport| p.agent.as_ref().map_or("unknown", |a| a.verdict);
        let mut reasons: Vec<String> = old
            .iter()
            .filter(|p| verdict_of(p) == "fail")
            .map(|p| {
                format!(
                    "{}: {}",
                    p.name,
                    p.agent.as_ref().map_or("", |a| a.reason.as_str())
                )
            })
            .collect();
        // Old pods' errors before their termination, after the first deletion: clients failed
        // while pods were replaced (the gate's rule).
        let first_deletion = old
            .iter()
            .filter_map(|p| p.timeline.get("deleted").copied())
            .reduce(f64::min);
        reasons.extend(
            old.iter()
                .filter_map(|p| p.agent.as_ref())
                .filter(|a| {
                    a.startup_errors > 0
                        && first_deletion
                            .zip(a.startup_last_error)
                            .is_some_and(|(first, last)| last >= first)
                })
                .map(|a| format!("before its termination: {}", a.startup_reason)),
        );
        reasons.extend(
            pods.iter()
                .filter(|p| p.role == PodRole::New)
                .filter_map(|p| p.agent.as_ref())
                .filter(|a| a.startup_errors > 0)
                .map(|a| a.startup_reason.clone()),
        );
        let verdict = if !reasons.is_empty() {
            "fail"
        } else if old.iter().any(|p| verdict_of(p) == "pending") {
            "pending"
        } else if old.iter().all(|p| verdict_of(p) == "pass") {
            "pass"
        } else {
            "unknown"
        };
        let mut disagreements: Vec<String> = pods
            .iter()
            .filter(|p| !p.agrees)
            .map(|p| format!("{}: {}", p.name, p.note))
            .collect();
        let unattributed_total: u64 = unattributed_failures.values().sum();
        if unattributed_total > 0 {
            disagreements.push(format!(
                "{unattributed_total} client failures could not be attributed to a pod"
            ));
        }
        let clients_clean = clients.failed == 0;
        if verdict == "pass" && !clients_clean {
            disagreements.push(format!(
                "the rollout verdict is pass, but the clients saw {} failures",
                clients.failed
            ));
        }
        let exit_code = match (disagreements.is_empty(), verdict == "pass" && clients_clean) {
            (false, _) => 4,
            (true, true) => 0,
            (true, false) => 1,
        };
        Self {
            workload: spec.name.clone(),
            namespace: spec.namespace.clone(),
            old_hash: config.template_hash(1),
            new_hash: config.template_hash(2),
            settings,
            not_simulated: spec.not_simulated.clone(),
            verdict,
            reasons,
            load_warning: load_warning(config.rate, &clients),
            clients,
            clients_clean,
            unattributed_failures,
            pods,
            disagreements,
            load_started: secs(load_started),
            logs: config.log_dir.display().to_string(),
            exit_code,
        }
    }

    /// The report for people.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        let s = &self.settings;
        let _ = writeln!(
            out,
            "rehearsal of {}: {} replicas, maxSurge {}, maxUnavailable {}, readiness {}, preStop {}, grace {}",
            self.workload,
            s["replicas"],
            s["max_surge"],
            s["max_unavailable"],
            s["readiness_probe"],
            s["pre_stop"],
            s["termination_grace_period"],
        );
        let _ = writeln!(
            out,
            "load: {} clients, {}, target {}; endpoint propagation {}",
            s["clients"], s["connections"], s["rate"], s["endpoint_propagation"]
        );
        for item in &self.not_simulated {
            let _ = writeln!(out, "not simulated: {item}");
        }
        if let Some(warning) = &self.load_warning {
            let _ = writeln!(out, "warning: {warning}");
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<18} {:<4} {:<8} {:>6} {:>19} {:>6} {:>9} {:>9} {:>16}  {:<5}  TIMELINE (s: window opened > drained > exited)",
            "POD",
            "ROLE",
            "VERDICT",
            "ERRORS",
            "SENT/RECV/REFUS/CUT",
            "5XX",
            "OPEN@EXIT",
            "CLIENT",
            "CLIENT FAILURES",
            "MATCH"
        );
        for p in &self.pods {
            let (verdict, errors, counts, open_at_exit, timeline) = match &p.agent {
                Some(a) => (
                    a.verdict,
                    a.errors.to_string(),
                    format!(
                        "{}/{}/{}/{}",
                        a.resets_sent, a.resets_received, a.refused, a.requests_cut
                    ),
                    a.open_at_exit.map_or_else(|| "-".into(), |o| o.to_string()),
                    if p.role == PodRole::Old {
                        format!(
                            "{} > {} > {}{}",
                            fmt_at(a.terminating_since),
                            fmt_at(a.drained_at),
                            fmt_at(a.exited_at),
                            if a.sigkill_at.is_some() {
                                " (SIGKILL)"
                            } else {
                                ""
                            }
                        )
                    } else {
                        format!("ready at {}", fmt_at(p.timeline.get("ready").copied()))
                    },
                ),
                None => ("-", "-".into(), "-".into(), "-".into(), String::new()),
            };
            let failures = if p.client_failures.is_empty() {
                "0".to_owned()
            } else {
                p.client_failures
                    .iter()
                    .map(|(k, v)| format!("{v} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                out,
                "{:<18} {:<4} {:<8} {:>6} {:>19} {:>6} {:>9} {:>9} {:>16}  {:<5}  {}",
                p.name,
                match p.role {
                    PodRole::Old => "old",
                    PodRole::New => "new",
                },
                verdict,
                errors,
                counts,
                if p.agent.is_some() {
                    p.agent_http_5xx.to_string()
                } else {
                    "-".into()
                },
                open_at_exit,
                p.client_connection_errors,
                failures,
                if p.agrees { "yes" } else { "NO" },
                timeline
            );
        }
        let _ = writeln!(out);
        let c = &self.clients;
        let latency = |q: &str| c.latency_ms.get(q).copied().unwrap_or_default();
        let _ = writeln!(
            out,
            "clients: {} requests in {:.1}s ({}/s), {} failed; latency p50 {} ms, p99 {} ms, max {} ms",
            c.requests,
            c.seconds,
            c.rate,
            c.failed,
            latency("p50"),
            latency("p99"),
            latency("max")
        );
        if c.failed > 0 {
            let kinds: Vec<String> = c
                .outcomes
                .iter()
                .filter(|(k, _)| **k != "ok")
                .map(|(k, v)| format!("{v} {k}"))
                .collect();
            let _ = writeln!(out, "client failures: {}", kinds.join(", "));
        }
        let _ = writeln!(
            out,
            "verdict: {} (agent, over the {} replaced pods and the {} new ones); clients {}",
            self.verdict,
            self.pods.iter().filter(|p| p.role == PodRole::Old).count(),
            self.pods.iter().filter(|p| p.role == PodRole::New).count(),
            if self.clients_clean {
                "saw no failure"
            } else {
                "saw failures"
            }
        );
        for reason in &self.reasons {
            let _ = writeln!(out, "  {reason}");
        }
        if self.disagreements.is_empty() {
            let _ = writeln!(out, "the agent's counts match the clients' for every pod");
        } else {
            let _ = writeln!(
                out,
                "\nDEFECT: the agent disagrees with the clients (please report this):"
            );
            for d in &self.disagreements {
                let _ = writeln!(out, "  {d}");
            }
        }
        let _ = writeln!(
            out,
            "the agent reported the pods as {}/{} (Deployment), old pod-template-hash {}, new {}",
            self.namespace, self.workload, self.old_hash, self.new_hash
        );
        let _ = writeln!(out, "pod output: {}", self.logs);
        out
    }
}

/// Below this share of the target rate, the report warns.
const LOW_RATE: f64 = 0.8;

/// A warning when the clients' rate fell below [`LOW_RATE`] of the target.
fn load_warning(target: u32, clients: &ClientTotals) -> Option<String> {
    let target = f64::from(target);
    (clients.requests > 0 && clients.rate < target * LOW_RATE).then(|| {
        format!(
            "the clients made {:.0} requests/s of the {target:.0} asked ({:.0}%): this machine \
             could not drive more, so the rollout was rehearsed under lighter load",
            clients.rate,
            clients.rate / target * 100.0
        )
    })
}

fn fmt_at(t: Option<f64>) -> String {
    t.map_or_else(|| "-".into(), |t| format!("{t:.1}"))
}

#[cfg(test)]
mod tests;
