//! The rollout gate: every node's evidence turned into one verdict per rollout (docs/verdict.md,
//! "Per rollout"). [`judge`] is the whole rule, over what the agents answered; [`pool`] asks the
//! agents; [`History`] keeps final verdicts after the agents forgot the pods; [`http`] and
//! [`api`] are the faces (docs/rollout-tools.md has the contracts).
//!
//! The rule, in order: a rollout `fail`s when any of its terminated pods failed (a known failure
//! is conclusive even with a node missing); it is `unknown` when an agent could not be asked or
//! a pod's evidence is incomplete (never `pass`); `pending` while a pod still drains or none has
//! started terminating; `pass` when every terminated pod passed.
//!
//! Before the rule, each pod gets the peer view from the other nodes (`PeerIndex`): connects
//! to its addresses by clients there that got no answer inside its window fail it, and a node
//! that dropped such evidence from that time makes it `unknown`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use draingate_proto::v1 as pb;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

pub mod api;
pub mod check;
pub mod http;
pub mod pool;

/// Default address of the gate's HTTP face (rollout tools).
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:8080";
/// Default address of the gate's gRPC face (`draingate gate check`).
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:9562";
/// Longest `wait` a check may ask for.
pub const MAX_WAIT: Duration = Duration::from_mins(10);

/// `wait` when it is within [`MAX_WAIT`]; both faces take their waits through this.
pub fn check_wait(wait: Duration) -> Result<Duration, QueryError> {
    if wait > MAX_WAIT {
        return Err(QueryError(format!(
            "wait {} is longer than the gate's limit of {}",
            humantime::format_duration(wait),
            humantime::format_duration(MAX_WAIT)
        )));
    }
    Ok(wait)
}

/// The workload kinds whose pods the agents report with an owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Deployment,
    /// Argo Rollouts' `Rollout`.
    Rollout,
}

impl Kind {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deployment => "Deployment",
            Self::Rollout => "Rollout",
        }
    }

    /// `Deployment`, `deployment`, `deploy`, `Rollout`, `rollout`, `ro` (kubectl's short names).
    pub fn parse(s: &str) -> Result<Self, QueryError> {
        match s.to_ascii_lowercase().as_str() {
            "deployment" | "deployments" | "deploy" => Ok(Self::Deployment),
            "rollout" | "rollouts" | "ro" => Ok(Self::Rollout),
            _ => Err(QueryError(format!(
                "unknown workload kind {}: use Deployment or Rollout",
                draingate_serve::telemetry::quoted(s)
            ))),
        }
    }
}

/// A malformed question; the message says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// What is asked: one workload's rollout, optionally narrowed to the old pods' hash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Query {
    pub namespace: String,
    pub kind: Kind,
    pub name: String,
    /// Judge only pods with this pod-template-hash.
    pub old: Option<String>,
    /// Never judge pods with this pod-template-hash (the new version).
    pub new: Option<String>,
}

/// Kubernetes' limit for a name (DNS-1123 subdomain).
const MAX_NAME: usize = 253;

fn check_name(what: &str, value: &str, max: usize) -> Result<(), QueryError> {
    let valid = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !value.starts_with(['-', '.'])
        && !value.ends_with(['-', '.']);
    if valid {
        Ok(())
    } else {
        Err(QueryError(format!(
            "invalid {what} {}: a Kubernetes name is 1 to {max} lower-case letters, digits, '-' \
             or '.', starting and ending with a letter or digit",
            draingate_serve::telemetry::quoted(value)
        )))
    }
}

impl Query {
    /// A query from its parts as people write them: `workload` is `deploy/NAME`,
    /// `rollout/NAME`, or `NAME` with `kind` (Deployment when absent).
    pub fn new(
        namespace: &str,
        workload: &str,
        kind: Option<&str>,
        old: Option<&str>,
        new: Option<&str>,
    ) -> Result<Self, QueryError> {
        let (kind, name) = match workload.split_once('/') {
            Some((k, name)) => {
                let parsed = Kind::parse(k)?;
                if let Some(kind) = kind
                    && Kind::parse(kind)? != parsed
                {
                    return Err(QueryError(format!(
                        "kind {} contradicts workload {}",
                        draingate_serve::telemetry::quoted(kind),
                        draingate_serve::telemetry::quoted(workload)
                    )));
                }
                (parsed, name)
            }
            None => (kind.map_or(Ok(Kind::Deployment), Kind::parse)?, workload),
        };
        check_name("namespace", namespace, 63)?;
        check_name("workload name", name, MAX_NAME)?;
        let hash = |what: &str, h: Option<&str>| -> Result<Option<String>, QueryError> {
            match h.filter(|h| !h.is_empty()) {
                None => Ok(None),
                Some(h) => {
                    check_name(what, h, 63)?;
                    Ok(Some(h.to_owned()))
                }
            }
        };
        let query = Self {
            namespace: namespace.to_owned(),
            kind,
            name: name.to_owned(),
            old: hash("old pod-template-hash", old)?,
            new: hash("new pod-template-hash", new)?,
        };
        if query.old.is_some() && query.old == query.new {
            return Err(QueryError(
                "old and new pod-template-hash are the same".into(),
            ));
        }
        Ok(query)
    }

    /// `namespace/Kind/name`, with the hashes when given.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut s = format!("{}/{}/{}", self.namespace, self.kind.as_str(), self.name);
        if let Some(old) = &self.old {
            let _ = write!(s, " old {old}");
        }
        if let Some(new) = &self.new {
            let _ = write!(s, " new {new}");
        }
        s
    }

    fn owns(&self, pod: &pb::Pod) -> bool {
        pod.pod
            .as_ref()
            .is_some_and(|r| r.namespace == self.namespace)
            && pod.owner_kind == self.kind.as_str()
            && pod.owner_name == self.name
    }

    /// Whether `pod` is of the rollout's new version: its hash is `new`, or, without `new`, it
    /// has a hash and it is neither `old` nor one of the terminating pods' (`old_hashes`).
    fn is_new(&self, pod: &pb::Pod, old_hashes: &BTreeSet<&str>) -> bool {
        let hash = pod.pod_template_hash.as_str();
        if hash.is_empty() {
            return false;
        }
        match (&self.new, &self.old) {
            (Some(new), _) => hash == new,
            (None, Some(old)) => hash != old && !old_hashes.contains(hash),
            (None, None) => !old_hashes.contains(hash),
        }
    }

    fn judges(&self, pod: &pb::Pod) -> bool {
        self.old
            .as_ref()
            .is_none_or(|old| &pod.pod_template_hash == old)
            && self
                .new
                .as_ref()
                .is_none_or(|new| &pod.pod_template_hash != new)
    }
}

/// What one agent answered, or why it could not be asked.
#[derive(Debug, Clone)]
pub struct AgentAnswer {
    /// The agent's address.
    pub target: String,
    /// The node it watches, from this or an earlier answer.
    pub node: Option<String>,
    /// The agent's pods whose termination window opened (the others are never judged).
    pub result: Result<pb::ListPodsResponse, String>,
    /// Every workload with a pod on the node, terminating or not: (namespace, kind, name).
    pub workloads: std::collections::HashSet<(String, String, String)>,
    /// The node's clients' connects that got no answer from an address not on that node.
    pub peer_failures: Vec<PeerFailure>,
    /// The agent dropped older peer failures: its list is complete only from this time on.
    pub peer_failures_complete_since: Option<SystemTime>,
    /// Addresses whose failures the agent kept only from some time on.
    pub peer_gaps: Vec<(IpAddr, SystemTime)>,
}

/// Most peer failures one round keeps across all agents (about 72 bytes each); an agent whose
/// failures no longer fit counts as having dropped them all, so pods it could have seen fail
/// are `unknown`, never `pass`.
pub const MAX_PEER_FAILURES_PER_ROUND: usize = 262_144;

/// A client's connect that got no answer, kept small (a round may hold many).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerFailure {
    pub time: SystemTime,
    /// The address it connected to.
    pub remote: IpAddr,
    /// The client's address and port.
    pub client: SocketAddr,
}

impl PeerFailure {
    /// From an agent's event; `None` for one that is malformed (never trusted to parse).
    fn from_event(event: &pb::Event) -> Option<Self> {
        Some(Self {
            time: SystemTime::try_from(event.time?).ok()?,
            remote: event.remote_address.parse().ok()?,
            client: SocketAddr::new(
                event.local_address.parse().ok()?,
                u16::try_from(event.local_port).ok()?,
            ),
        })
    }
}

impl AgentAnswer {
    /// An agent's answer, kept small: running pods without startup errors only leave their
    /// workload's name.
    #[must_use]
    pub fn answered(target: String, node: Option<String>, list: pb::ListPodsResponse) -> Self {
        Self::answered_within(
            target,
            node,
            list,
            &std::sync::atomic::AtomicUsize::new(usize::MAX),
        )
    }

    /// [`Self::answered`], taking its peer failures out of the round's `budget`.
    #[must_use]
    pub fn answered_within(
        target: String,
        node: Option<String>,
        mut list: pb::ListPodsResponse,
        budget: &std::sync::atomic::AtomicUsize,
    ) -> Self {
        let workloads = list
            .pods
            .iter()
            .filter(|p| !p.owner_name.is_empty())
            .filter_map(|p| {
                let r = p.pod.as_ref()?;
                Some((
                    r.namespace.clone(),
                    p.owner_kind.clone(),
                    p.owner_name.clone(),
                ))
            })
            .collect();
        // Kept: pods that are terminating, and running ones with startup errors (a rollout's
        // new pod may fail it).
        list.pods
            .retain(|p| pod_verdict(p) != pb::Verdict::None || startup(p).errors > 0);
        list.pods.shrink_to_fit();
        let events = std::mem::take(&mut list.peer_failures);
        let mut peer_failures_complete_since = list
            .peer_failures_complete_since
            .take()
            .map(|t| SystemTime::try_from(t).unwrap_or(SystemTime::UNIX_EPOCH));
        let wanted = events.len();
        let granted = budget
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |left| Some(left.saturating_sub(wanted)),
            )
            .map_or(0, |left| left.min(wanted));
        let peer_failures = if granted < wanted {
            // Over the round's bound: this node's evidence is incomplete for every window.
            peer_failures_complete_since = Some(SystemTime::now());
            Vec::new()
        } else {
            events.iter().filter_map(PeerFailure::from_event).collect()
        };
        let peer_gaps = std::mem::take(&mut list.peer_gaps)
            .iter()
            .filter_map(|gap| {
                Some((
                    gap.address.parse().ok()?,
                    SystemTime::try_from(gap.complete_since?).ok()?,
                ))
            })
            .collect();
        Self {
            target,
            node,
            result: Ok(list),
            workloads,
            peer_failures,
            peer_failures_complete_since,
            peer_gaps,
        }
    }

    /// An agent that could not be asked.
    #[must_use]
    pub fn unreachable(target: String, node: Option<String>, error: String) -> Self {
        Self {
            target,
            node,
            result: Err(error),
            workloads: std::collections::HashSet::new(),
            peer_failures: Vec::new(),
            peer_failures_complete_since: None,
            peer_gaps: Vec::new(),
        }
    }

    fn who(&self) -> String {
        match &self.node {
            Some(node) => format!("node {node} (agent {})", self.target),
            None => format!("agent {}", self.target),
        }
    }
}

/// The gate's answer for one rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub verdict: pb::Verdict,
    pub reason: String,
    pub terminating_pods: u32,
    pub drained_pods: u32,
    pub inflight_at_kill: u64,
    pub resets: u64,
    pub failed_requests: u64,
    /// The pods judged.
    pub pods: Vec<pb::Pod>,
    /// Agents not asked, named by node when known.
    pub unreachable: Vec<String>,
    pub agents: u32,
    pub agents_answered: u32,
    pub checked_at: SystemTime,
    pub from_history: bool,
}

impl Judgement {
    /// Pass and fail are final; pending and unknown may still change.
    #[must_use]
    pub fn is_final(&self) -> bool {
        matches!(self.verdict, pb::Verdict::Pass | pb::Verdict::Fail)
    }
}

/// The verdict name used in JSON and tables.
#[must_use]
pub fn verdict_name(verdict: pb::Verdict) -> &'static str {
    match verdict {
        pb::Verdict::Pass => "pass",
        pb::Verdict::Fail => "fail",
        pb::Verdict::Pending => "pending",
        pb::Verdict::None => "none",
        pb::Verdict::Unknown | pb::Verdict::Unspecified => "unknown",
    }
}

/// A pod's verdict as its agent sent it; anything unexpected is unknown.
fn pod_verdict(pod: &pb::Pod) -> pb::Verdict {
    match pb::Verdict::try_from(pod.verdict) {
        Ok(pb::Verdict::Unspecified) | Err(_) => pb::Verdict::Unknown,
        Ok(v) => v,
    }
}

fn pod_name(pod: &pb::Pod) -> String {
    let name = pod.pod.as_ref().map_or("?", |r| r.name.as_str());
    if pod.node.is_empty() {
        name.to_owned()
    } else {
        format!("{name} on {}", pod.node)
    }
}

/// Why the workload cannot be judged at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JudgeError {
    #[error(
        "no agent knows a pod of {0} (check the namespace, the kind and the name; \
         the agents keep finished pods for 15 minutes, the gate's history longer)"
    )]
    UnknownWorkload(String),
    #[error("the gate has no agents to ask")]
    NoAgents,
}

/// The rollout's verdict from every agent's answer (the rule is in the module docs).
pub fn judge(
    query: &Query,
    answers: &[AgentAnswer],
    checked_at: SystemTime,
) -> Result<Judgement, JudgeError> {
    if answers.is_empty() {
        return Err(JudgeError::NoAgents);
    }
    let mut unreachable = Vec::new();
    let key = (
        query.namespace.clone(),
        query.kind.as_str().to_owned(),
        query.name.clone(),
    );
    let mut known = false;
    let mut pods: Vec<pb::Pod> = Vec::new();
    // Not judged for their termination: maybe the rollout's new pods.
    let mut others: Vec<pb::Pod> = Vec::new();
    for answer in answers {
        match &answer.result {
            Err(err) => unreachable.push((answer.who(), err.clone())),
            Ok(list) => {
                known |= answer.workloads.contains(&key);
                for pod in list.pods.iter().filter(|p| query.owns(p)) {
                    known = true;
                    let mut pod = pod.clone();
                    if pod.node.is_empty() {
                        pod.node.clone_from(&list.node);
                    }
                    if query.judges(&pod) && pod_verdict(&pod) != pb::Verdict::None {
                        pods.push(pod);
                    } else {
                        others.push(pod);
                    }
                }
            }
        }
    }
    let failed_new = failed_new_pods(query, &pods, others);
    if !known && unreachable.is_empty() {
        return Err(JudgeError::UnknownWorkload(query.describe()));
    }
    let peers = PeerIndex::new(answers, &pods);
    for pod in &mut pods {
        peers.apply(pod);
    }
    pods.sort_by_key(pod_name);

    let with =
        |v: pb::Verdict| -> Vec<&pb::Pod> { pods.iter().filter(|p| pod_verdict(p) == v).collect() };
    let list = |pods: &[&pb::Pod]| -> String {
        pods.iter()
            .map(|p| {
                if p.reason.is_empty() {
                    pod_name(p)
                } else {
                    format!("{} ({})", pod_name(p), p.reason)
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let (failed, unknown, pending) = (
        with(pb::Verdict::Fail),
        with(pb::Verdict::Unknown),
        with(pb::Verdict::Pending),
    );
    let unreachable_reason = || {
        unreachable
            .iter()
            .map(|(who, err)| format!("{who}: {err}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let (verdict, reason) = if !failed.is_empty() || !failed_new.is_empty() {
        let mut reasons = Vec::new();
        if !failed.is_empty() {
            reasons.push(format!(
                "{} of {} terminated pods failed: {}",
                failed.len(),
                pods.len(),
                list(&failed)
            ));
        }
        if !failed_new.is_empty() {
            reasons.push(format!(
                "{} new pods had errors: {}",
                failed_new.len(),
                failed_new
                    .iter()
                    .map(|p| startup(p).reason.clone())
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        (pb::Verdict::Fail, reasons.join("; "))
    } else if !unreachable.is_empty() {
        (
            pb::Verdict::Unknown,
            format!(
                "{} agents could not be asked, and pods of the rollout may be on their nodes: {}",
                unreachable.len(),
                unreachable_reason()
            ),
        )
    } else if !unknown.is_empty() {
        (
            pb::Verdict::Unknown,
            format!("evidence incomplete for {}", list(&unknown)),
        )
    } else if !pending.is_empty() {
        (
            pb::Verdict::Pending,
            format!(
                "{} of {} terminating pods still draining: {}",
                pending.len(),
                pods.len(),
                list(&pending)
            ),
        )
    } else if pods.is_empty() {
        (
            pb::Verdict::Pending,
            format!("no pod of {} has started terminating yet", query.describe()),
        )
    } else {
        (
            pb::Verdict::Pass,
            format!(
                "all {} terminated pods drained with no error and no connection open at exit",
                pods.len()
            ),
        )
    };
    let window = |p: &pb::Pod| p.window.unwrap_or_default();
    let new_errors: u64 = failed_new.iter().map(|p| startup(p).errors).sum();
    let terminating_pods = u32::try_from(pods.len()).unwrap_or(u32::MAX);
    let drained_pods = u32::try_from(
        pods.iter()
            .filter(|p| p.timeline.as_ref().is_some_and(|t| t.drained_at.is_some()))
            .count(),
    )
    .unwrap_or(u32::MAX);
    let inflight_at_kill = pods.iter().map(|p| p.open_at_exit).sum();
    let resets = pods
        .iter()
        .map(|p| window(p).resets_sent + window(p).resets_received)
        .sum();
    let failed_requests = pods.iter().map(|p| p.errors).sum::<u64>() + new_errors;
    pods.extend(failed_new);
    Ok(Judgement {
        verdict,
        reason,
        terminating_pods,
        drained_pods,
        inflight_at_kill,
        resets,
        failed_requests,
        pods,
        unreachable: unreachable.into_iter().map(|(who, _)| who).collect(),
        agents: u32::try_from(answers.len()).unwrap_or(u32::MAX),
        agents_answered: u32::try_from(answers.iter().filter(|a| a.result.is_ok()).count())
            .unwrap_or(u32::MAX),
        checked_at,
        from_history: false,
    })
}

/// A pod's startup record (empty from an agent that sends none).
fn startup(pod: &pb::Pod) -> &pb::Startup {
    static NONE: pb::Startup = pb::Startup {
        errors: 0,
        errors_before_ready: 0,
        first_error_at: None,
        ready_at: None,
        reason: String::new(),
    };
    pod.startup.as_ref().unwrap_or(&NONE)
}

/// The rollout's new pods that had errors inside the rollout: outside their own termination
/// window, with the first before the rollout's end (the last terminated pod's window closing;
/// open-ended while any is open). Only once some pod of the rollout has started terminating:
/// before, there is no rollout to speak of.
fn failed_new_pods(query: &Query, old: &[pb::Pod], others: Vec<pb::Pod>) -> Vec<pb::Pod> {
    if old.is_empty() {
        return Vec::new();
    }
    let old_hashes: BTreeSet<&str> = old.iter().map(|p| p.pod_template_hash.as_str()).collect();
    let end = old
        .iter()
        .map(|p| {
            time(
                p.timeline
                    .as_ref()
                    .and_then(|t| t.window_closed_at.as_ref()),
            )
        })
        .collect::<Option<Vec<_>>>()
        .and_then(|closed| closed.into_iter().max());
    let mut failed: Vec<pb::Pod> = others
        .into_iter()
        .filter(|p| query.is_new(p, &old_hashes))
        .filter(|p| {
            let s = startup(p);
            s.errors > 0
                && match (end, time(s.first_error_at.as_ref())) {
                    (Some(end), Some(first)) => first <= end,
                    // Open-ended, or no event to date the first error by: it counts.
                    _ => true,
                }
        })
        .collect();
    failed.sort_by_key(pod_name);
    failed
}

fn time(t: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(*t).ok())
}

/// Every node's clients' failed connects to the judged pods' addresses, by address, gathered
/// in one pass over the round; and which nodes dropped such evidence, from when (for every
/// address, or for one).
struct PeerIndex<'a> {
    by_address: HashMap<IpAddr, Vec<(&'a str, PeerFailure)>>,
    incomplete: Vec<(&'a str, SystemTime)>,
    gaps: HashMap<IpAddr, Vec<(&'a str, SystemTime)>>,
}

impl<'a> PeerIndex<'a> {
    fn new(answers: &'a [AgentAnswer], pods: &[pb::Pod]) -> Self {
        let mut by_address: HashMap<IpAddr, Vec<(&'a str, PeerFailure)>> = pods
            .iter()
            .flat_map(|p| p.addresses.iter().filter_map(|a| a.parse().ok()))
            .map(|a| (a, Vec::new()))
            .collect();
        let mut incomplete = Vec::new();
        let mut gaps: HashMap<IpAddr, Vec<(&'a str, SystemTime)>> = HashMap::new();
        for answer in answers.iter().filter(|a| a.result.is_ok()) {
            let node = answer.node.as_deref().unwrap_or(answer.target.as_str());
            for failure in &answer.peer_failures {
                if let Some(list) = by_address.get_mut(&failure.remote) {
                    list.push((node, *failure));
                }
            }
            if let Some(complete) = answer.peer_failures_complete_since {
                incomplete.push((node, complete));
            }
            for &(address, complete) in &answer.peer_gaps {
                if by_address.contains_key(&address) {
                    gaps.entry(address).or_default().push((node, complete));
                }
            }
        }
        Self {
            by_address,
            incomplete,
            gaps,
        }
    }

    /// The peer view of one judged pod: connects to its addresses by clients on other nodes
    /// that got no answer inside its window (its agent counted its own node's already). Any
    /// such failure fails the pod; a node whose list is incomplete for the window makes a
    /// passing or pending pod `unknown`. Updates the pod's `errors`, `peer_failures`, verdict
    /// and reason.
    fn apply(&self, pod: &mut pb::Pod) {
        let timeline = pod.timeline.unwrap_or_default();
        let Some(since) = time(timeline.terminating_since.as_ref()) else {
            return;
        };
        let until = time(timeline.window_closed_at.as_ref());
        let elsewhere = |node: &str| pod.node.is_empty() || node != pod.node;
        let addresses: Vec<IpAddr> = pod
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let mut count = 0u64;
        let mut first: Option<(&str, PeerFailure)> = None;
        for &address in &addresses {
            for &(node, failure) in self.by_address.get(&address).into_iter().flatten() {
                if elsewhere(node)
                    && failure.time >= since
                    && until.is_none_or(|until| failure.time < until)
                {
                    count += 1;
                    if first.is_none_or(|(_, f)| failure.time < f.time) {
                        first = Some((node, failure));
                    }
                }
            }
        }
        let verdict = pod_verdict(pod);
        if let Some((node, failure)) = first {
            pod.peer_failures += count;
            pod.errors += count;
            let what = format!(
                "{count} connects to it from other nodes got no answer (first: {} on {node} \
                 to {} at {})",
                failure.client,
                failure.remote,
                humantime::format_rfc3339_millis(failure.time)
            );
            if matches!(verdict, pb::Verdict::Unknown | pb::Verdict::Fail) {
                // Lost data stays unknown, as on the agent; a failure adds to the reason.
                pod.reason = format!("{}; {what}", pod.reason);
            } else {
                pod.verdict = pb::Verdict::Fail.into();
                pod.reason = what;
            }
            return;
        }
        let for_its_addresses = addresses.iter().filter_map(|a| self.gaps.get(a)).flatten();
        let incomplete: Vec<String> = self
            .incomplete
            .iter()
            .chain(for_its_addresses)
            .filter(|&&(node, complete)| elsewhere(node) && since < complete)
            .map(|(node, complete)| {
                format!(
                    "{node} dropped failed connects older than {}",
                    humantime::format_rfc3339_millis(*complete)
                )
            })
            .collect();
        if !incomplete.is_empty() && matches!(verdict, pb::Verdict::Pass | pb::Verdict::Pending) {
            pod.verdict = pb::Verdict::Unknown.into();
            pod.reason = format!("peer view incomplete: {}", incomplete.join("; "));
        }
    }
}

/// Every rollout with terminated pods in one round of answers: (namespace, kind, name, hash)
/// for each pod-template-hash whose pods started terminating.
#[must_use]
pub fn rollouts_in(answers: &[AgentAnswer]) -> Vec<Query> {
    let mut found = BTreeSet::new();
    for list in answers.iter().filter_map(|a| a.result.as_ref().ok()) {
        for pod in &list.pods {
            let (Ok(kind), Some(r)) = (Kind::parse(&pod.owner_kind), pod.pod.as_ref()) else {
                continue;
            };
            if pod_verdict(pod) != pb::Verdict::None && !pod.owner_name.is_empty() {
                found.insert(Query {
                    namespace: r.namespace.clone(),
                    kind,
                    name: pod.owner_name.clone(),
                    old: Some(pod.pod_template_hash.clone()).filter(|h| !h.is_empty()),
                    new: None,
                });
            }
        }
    }
    found.into_iter().collect()
}

/// Final verdicts kept after the agents forgot the pods: at most `capacity` entries, none older
/// than `max_age`. Keyed by workload and old pod-template-hash.
#[derive(Debug)]
pub struct History {
    entries: BTreeMap<Query, Judgement>,
    order: VecDeque<(SystemTime, Query)>,
    capacity: usize,
    max_age: Duration,
}

impl History {
    #[must_use]
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        Self {
            entries: BTreeMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            max_age,
        }
    }

    /// Keeps a final verdict of `query` (which must name its old hash); others are ignored.
    pub fn record(&mut self, query: &Query, judgement: &Judgement) {
        if !judgement.is_final() || query.old.is_none() {
            return;
        }
        let key = Query {
            new: None,
            ..query.clone()
        };
        if self.entries.get(&key).is_some_and(|j| j == judgement) {
            return;
        }
        self.entries.insert(key.clone(), judgement.clone());
        self.order.retain(|(_, q)| q != &key);
        self.order.push_back((judgement.checked_at, key));
        while self.order.len() > self.capacity {
            if let Some((_, q)) = self.order.pop_front() {
                self.entries.remove(&q);
            }
        }
    }

    /// The newest kept verdict for `query`: of its old hash, or of any hash but its new one.
    pub fn lookup(&mut self, query: &Query, now: SystemTime) -> Option<Judgement> {
        while let Some((at, q)) = self.order.front() {
            if now.duration_since(*at).unwrap_or_default() <= self.max_age {
                break;
            }
            self.entries.remove(q);
            self.order.pop_front();
        }
        self.order
            .iter()
            .rev()
            .map(|(_, q)| q)
            .find(|q| {
                q.namespace == query.namespace
                    && q.kind == query.kind
                    && q.name == query.name
                    && query
                        .old
                        .as_ref()
                        .is_none_or(|old| q.old.as_ref() == Some(old))
                    && (query.new.is_none() || q.old != query.new)
            })
            .and_then(|q| self.entries.get(q))
            .map(|j| Judgement {
                from_history: true,
                ..j.clone()
            })
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The gate's Prometheus series.
#[derive(Debug)]
struct GateMetrics {
    checks: Family<CheckLabels, Counter>,
    agents: Family<AgentLabels, Gauge>,
    rounds: Histogram,
    rollouts: Family<RolloutLabels, Gauge>,
    rollout_errors: Family<RolloutLabels, Gauge>,
    history: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    face: &'static str,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabels {
    namespace: String,
    kind: &'static str,
    workload: String,
    pod_template_hash: String,
    verdict: &'static str,
}

fn round_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0])
}

/// How a gate runs; the defaults are what `draingate gate serve` uses.
#[derive(Debug, Clone)]
pub struct GateConfig {
    pub pool: pool::PoolConfig,
    /// How often every rollout's verdict is refreshed into the history and the metrics.
    pub poll: Duration,
    pub history_size: usize,
    pub history_age: Duration,
}

/// The gate: the agents, the history and the metrics behind every face.
#[derive(Debug)]
pub struct Gate {
    pool: pool::AgentPool,
    history: Mutex<History>,
    metrics: GateMetrics,
    poll: Duration,
}

/// Which face asked, for the metrics.
#[derive(Debug, Clone, Copy)]
pub enum Face {
    Http,
    Grpc,
    Flagger,
}

impl Gate {
    #[must_use]
    pub fn new(config: GateConfig) -> Self {
        Self {
            pool: pool::AgentPool::new(config.pool),
            history: Mutex::new(History::new(config.history_size, config.history_age)),
            metrics: GateMetrics {
                checks: Family::default(),
                agents: Family::default(),
                rounds: round_histogram(),
                rollouts: Family::default(),
                rollout_errors: Family::default(),
                history: Gauge::default(),
            },
            poll: config.poll,
        }
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The verdict now, from a fresh round of the agents' answers (or one shared with a
    /// concurrent check), falling back to the history when the agents no longer know the pods.
    pub async fn check(&self, query: &Query, face: Face) -> Result<Judgement, JudgeError> {
        let round = self.round().await;
        let judged = judge(query, &round.answers, round.at);
        let result = match judged {
            Ok(j) if j.terminating_pods == 0 && j.verdict == pb::Verdict::Pending => {
                Ok(self.history().lookup(query, round.at).unwrap_or(j))
            }
            Ok(j) => {
                self.history().record(query, &j);
                Ok(j)
            }
            Err(JudgeError::UnknownWorkload(w)) => self
                .history()
                .lookup(query, round.at)
                .ok_or(JudgeError::UnknownWorkload(w)),
            Err(e) => Err(e),
        };
        let verdict = result.as_ref().map_or("error", |j| verdict_name(j.verdict));
        self.metrics
            .checks
            .get_or_create(&CheckLabels {
                face: match face {
                    Face::Http => "http",
                    Face::Grpc => "grpc",
                    Face::Flagger => "flagger",
                },
                verdict,
            })
            .inc();
        result
    }

    /// Checks until the verdict is final (pass or fail) or `wait` (capped at [`MAX_WAIT`]) has
    /// passed; `on_each` sees every answer. A workload nobody knows is an error at once.
    pub async fn check_until_final(
        &self,
        query: &Query,
        wait: Duration,
        face: Face,
        mut on_each: impl FnMut(&Judgement),
    ) -> Result<Judgement, JudgeError> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        loop {
            let judgement = self.check(query, face).await?;
            on_each(&judgement);
            let now = tokio::time::Instant::now();
            if judgement.is_final() || now >= deadline {
                return Ok(judgement);
            }
            tokio::time::sleep((deadline - now).min(Duration::from_secs(1))).await;
        }
    }

    /// Every `poll`: one round, every rollout with terminated pods judged into the history and
    /// the metrics. Runs until dropped.
    pub async fn poll_forever(self: std::sync::Arc<Self>) {
        let mut ticker = tokio::time::interval(self.poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let round = self.round().await;
            self.metrics.rollouts.clear();
            self.metrics.rollout_errors.clear();
            for query in rollouts_in(&round.answers) {
                let Ok(judgement) = judge(&query, &round.answers, round.at) else {
                    continue;
                };
                self.history().record(&query, &judgement);
                let labels = RolloutLabels {
                    namespace: query.namespace.clone(),
                    kind: query.kind.as_str(),
                    workload: query.name.clone(),
                    pod_template_hash: query.old.clone().unwrap_or_default(),
                    verdict: verdict_name(judgement.verdict),
                };
                self.metrics.rollouts.get_or_create(&labels).set(1);
                self.metrics
                    .rollout_errors
                    .get_or_create(&labels)
                    .set(i64::try_from(judgement.failed_requests).unwrap_or(i64::MAX));
            }
            let kept = self.history().len();
            self.metrics
                .history
                .set(i64::try_from(kept).unwrap_or(i64::MAX));
        }
    }

    /// A round of the agents' answers; a new one goes into the metrics once.
    async fn round(&self) -> std::sync::Arc<pool::Round> {
        let (round, new) = self.pool.round().await;
        if new {
            self.observe(&round);
        }
        round
    }

    fn observe(&self, round: &pool::Round) {
        let answered = round.answers.iter().filter(|a| a.result.is_ok()).count();
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics
            .agents
            .get_or_create(&AgentLabels { state: "answered" })
            .set(count(answered));
        self.metrics
            .agents
            .get_or_create(&AgentLabels {
                state: "unreachable",
            })
            .set(count(round.answers.len() - answered));
        self.metrics.rounds.observe(round.took.as_secs_f64());
    }

    /// The Prometheus text of the gate's metrics.
    #[must_use]
    pub fn render_metrics(&self) -> String {
        let mut registry = Registry::with_prefix("draingate_gate");
        registry.register(
            "checks",
            "Verdict checks answered, by face and verdict",
            self.metrics.checks.clone(),
        );
        registry.register(
            "agents",
            "Agents in the last round, answered or unreachable",
            self.metrics.agents.clone(),
        );
        registry.register(
            "round_duration_seconds",
            "Time to ask every agent once",
            self.metrics.rounds.clone(),
        );
        registry.register(
            "rollout_verdict",
            "1 for each rollout (workload and old pod-template-hash) with terminated pods, \
             labelled with its verdict at the last poll",
            self.metrics.rollouts.clone(),
        );
        registry.register(
            "rollout_failed_requests",
            "Errors inside the terminated pods' windows, per rollout, at the last poll",
            self.metrics.rollout_errors.clone(),
        );
        registry.register(
            "history_entries",
            "Final verdicts kept after the agents forgot the pods",
            self.metrics.history.clone(),
        );
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %err, "cannot encode the metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests;

/// One connection per agent in flight: lifts the soft open-files limit to the hard one.
pub fn raise_open_files_limit() {
    let _ = draingate_serve::limits::raise_open_files_limit();
}

/// Where the gate listens.
#[derive(Debug, Clone)]
pub struct GateListen {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

/// Serves both faces, and polls the agents, until `shutdown` resolves.
pub async fn serve(
    gate: std::sync::Arc<Gate>,
    listen: &GateListen,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), draingate_serve::ServeError> {
    use draingate_proto::v1::gate_server::GateServer;
    use draingate_serve::ServeError;
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Listen {
                what: addr.to_string(),
                source,
            })
    };
    let http_listener = bind(listen.http).await?;
    let grpc_listener = bind(listen.grpc).await?;
    tracing::info!(http = %listen.http, grpc = %listen.grpc, "gate serving");
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let poller = tokio::spawn(std::sync::Arc::clone(&gate).poll_forever());

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<GateServer<api::GateApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(draingate_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let mut grpc_stop = stop.subscribe();
    let [http_limits, grpc_limits] = draingate_serve::limits::gate_faces(MAX_WAIT);
    let grpc = draingate_serve::limits::grpc_server()
        .add_service(health)
        .add_service(reflection)
        .add_service(GateServer::new(api::GateApi::new(std::sync::Arc::clone(
            &gate,
        ))))
        .serve_with_incoming_shutdown(
            draingate_serve::limits::Incoming::new(grpc_listener, grpc_limits),
            async move {
                let _ = grpc_stop.recv().await;
            },
        );
    let mut http_stop = stop.subscribe();
    let http = draingate_serve::limits::serve_http(
        http_listener,
        http_limits,
        http::router(gate),
        async move {
            let _ = http_stop.recv().await;
        },
    );
    let stopper = async move {
        shutdown.await;
        let _ = stop.send(());
    };
    let (grpc, http, ()) = tokio::join!(grpc, http, stopper);
    poller.abort();
    let () = http;
    grpc?;
    Ok(())
}
