//! The rule: every agent's answer about one rollout turned into its verdict ([`judge`]), with
//! the peer view across nodes (`PeerIndex`).

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use draingate_proto::v1 as pb;

use crate::{Kind, Query};

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

    pub(crate) fn who(&self) -> String {
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
    let failed_before = failed_before_termination(query, &pods, &others);
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
    let (verdict, reason) = if !failed.is_empty()
        || !failed_new.is_empty()
        || !failed_before.is_empty()
    {
        let mut reasons = Vec::new();
        if !failed.is_empty() {
            reasons.push(format!(
                "{} of {} terminated pods failed: {}",
                failed.len(),
                pods.len(),
                list(&failed)
            ));
        }
        // Pods failed on their errors outside a window: how many, what, and each one's reason.
        for (outside, what) in [
            (&failed_new, "new pods had errors"),
            (
                &failed_before,
                "old pods had errors before their termination, after the rollout's first deletion",
            ),
        ] {
            if !outside.is_empty() {
                let each: Vec<&str> = outside.iter().map(|p| startup(p).reason.as_str()).collect();
                reasons.push(format!("{} {what}: {}", outside.len(), each.join("; ")));
            }
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
    let before_errors: u64 = failed_before.iter().map(|p| startup(p).errors).sum();
    let failed_requests = pods.iter().map(|p| p.errors).sum::<u64>() + new_errors + before_errors;
    pods.extend(failed_new);
    // Running old pods that failed before their termination join the list; terminating ones
    // are in it.
    pods.extend(
        failed_before
            .into_iter()
            .filter(|p| pod_verdict(p) == pb::Verdict::None),
    );
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
        last_error_at: None,
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

/// The rollout's old pods (terminating or still running) whose errors outside their own
/// termination window went on after the rollout's first deletion (the first old pod's window
/// opening): clients failed while pods were replaced, though not inside any window (an old
/// pod overloaded once a replaced one stopped taking traffic). Errors are dated by their last
/// event; a pod whose errors have no event (an agent restart since) is not counted.
fn failed_before_termination(query: &Query, old: &[pb::Pod], others: &[pb::Pod]) -> Vec<pb::Pod> {
    let Some(start) = old
        .iter()
        .filter_map(|p| {
            time(
                p.timeline
                    .as_ref()
                    .and_then(|t| t.terminating_since.as_ref()),
            )
        })
        .min()
    else {
        return Vec::new();
    };
    let old_hashes: BTreeSet<&str> = old.iter().map(|p| p.pod_template_hash.as_str()).collect();
    let mut failed: Vec<pb::Pod> = old
        .iter()
        .chain(
            others
                .iter()
                .filter(|p| query.judges(p) && !query.is_new(p, &old_hashes)),
        )
        .filter(|p| {
            let s = startup(p);
            s.errors > 0 && time(s.last_error_at.as_ref()).is_some_and(|last| last >= start)
        })
        .cloned()
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
