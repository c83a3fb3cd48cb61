//! The readiness-gate controller (`draingate gate serve --hold`): it holds a plain Deployment's
//! rollout by keeping each new pod's `draingate.io/predecessors-drained` condition `False`
//! until the old pods deleted before it drained clean ([`hold::decide`] is the rule; this module
//! finds the pods and writes the condition; what it writes to the API server is in `writer`).
//!
//! What it watches: every pod through one watch (no polling of the API server). A pod is held
//! when its `spec.readinessGates` names the condition, it is not being deleted and the condition
//! is not `True` yet. Its predecessors are the pods of the same Deployment with another
//! `pod-template-hash` whose deletion was asked for since its version's rollout began (the
//! creation of the oldest live pod with its hash), up to now: the Deployment controller may
//! create a new pod a moment before it deletes the old one it replaces, so "deleted before the
//! new pod was created" would race. Times are in whole seconds, and a deletion in the second the
//! rollout began counts: the hold errs on waiting. A deletion is remembered for [`REMEMBER`]
//! after it is seen, so a predecessor that exited and left the API server before the new pod was
//! looked at still counts.
//!
//! The evidence is the gate's own: one round of the agents' answers, the rollout's judgement
//! (with the peer view from other nodes) where the agents name the Deployment, and each agent's
//! own verdict for the pod otherwise. An agent that cannot be asked leaves a predecessor it could
//! have seen `NoEvidence`, never released.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use draingate_serve::telemetry::chain;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    runtime::{
        WatchStreamExt as _,
        events::{Recorder, Reporter},
        watcher,
    },
};
use tokio_stream::StreamExt as _;

use crate::{
    Gate, Kind, Query,
    hold::{self, CONDITION_TYPE, Evidence, Hold, HoldReason, Predecessor},
    judge,
};

mod writer;

use writer::Writer;

/// How long a deletion is remembered after it was seen.
pub const REMEMBER: Duration = Duration::from_hours(1);

/// Most deletions remembered; the oldest are forgotten first beyond this (bounded memory on a
/// cluster that deletes many pods an hour).
pub const MAX_REMEMBERED: usize = 100_000;

/// What the controller does to a Deployment when one of its old pods failed its drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFail {
    /// Only hold (the new pod stays unready) and record the Events.
    #[default]
    None,
    /// Also pause the Deployment (`spec.paused`): the controller creates no more pods for it
    /// until a person resumes it (`kubectl rollout resume`), even if the held pod were deleted.
    Pause,
}

/// The oldest round of the agents' answers a decision is made from.
const FRESH: Duration = Duration::from_millis(100);

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct HoldConfig {
    /// How often the held pods are looked at again.
    pub interval: Duration,
    /// What a failed drain does to the Deployment.
    pub on_fail: OnFail,
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("the pod watch ended")]
    WatchEnded,
}

/// A pod whose deletion was asked for.
#[derive(Debug, Clone)]
struct Deleted {
    pod: Predecessor,
    /// The Deployment it belongs to, and its template hash.
    workload: Option<(String, String)>,
    asked_at: SystemTime,
    seen: Instant,
}

/// The pods the watch delivered, and the deletions seen.
#[derive(Debug, Default)]
struct Pods {
    live: HashMap<String, Pod>,
    relisting: Option<HashMap<String, Pod>>,
    deleted: BTreeMap<String, Deleted>,
}

impl Pods {
    fn apply(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => self.relisting = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                self.remember_deletion(&pod, false);
                if let (Some(relisting), Some(uid)) =
                    (self.relisting.as_mut(), pod.metadata.uid.clone())
                {
                    relisting.insert(uid, pod);
                }
            }
            watcher::Event::InitDone => {
                if let Some(relisted) = self.relisting.take() {
                    // A pod that was live and is missing from the relist left while the watch
                    // was down (its deletion was never seen): it is a deletion all the same,
                    // or a predecessor would be missed and its successor released unheld.
                    let vanished: Vec<Pod> = self
                        .live
                        .iter()
                        .filter(|(uid, _)| !relisted.contains_key(*uid))
                        .map(|(_, pod)| pod.clone())
                        .collect();
                    for pod in &vanished {
                        self.remember_deletion(pod, true);
                    }
                    self.live = relisted;
                }
            }
            watcher::Event::Apply(pod) => {
                self.remember_deletion(&pod, false);
                if let Some(uid) = pod.metadata.uid.clone() {
                    self.live.insert(uid, pod);
                }
            }
            watcher::Event::Delete(pod) => {
                self.remember_deletion(&pod, true);
                if let Some(uid) = &pod.metadata.uid {
                    self.live.remove(uid);
                }
            }
        }
    }

    /// Remembers `pod` if its deletion was asked for (`gone`: it left the API server, perhaps
    /// force-deleted without a deletionTimestamp).
    fn remember_deletion(&mut self, pod: &Pod, gone: bool) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        if self.deleted.contains_key(&uid) {
            return;
        }
        let Some(asked_at) = deletion_asked(pod).or_else(|| gone.then(SystemTime::now)) else {
            return;
        };
        if self.deleted.len() >= MAX_REMEMBERED
            && let Some(oldest) = self
                .deleted
                .iter()
                .min_by_key(|(_, d)| d.seen)
                .map(|(uid, _)| uid.clone())
        {
            self.deleted.remove(&oldest);
        }
        self.deleted.insert(
            uid.clone(),
            Deleted {
                pod: Predecessor {
                    namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                    name: pod.metadata.name.clone().unwrap_or_default(),
                    uid,
                },
                workload: deployment_of(pod),
                asked_at,
                seen: Instant::now(),
            },
        );
    }

    fn forget_old(&mut self, now: Instant) {
        self.deleted
            .retain(|_, d| now.duration_since(d.seen) < REMEMBER);
    }
}

/// When a pod's deletion was asked for: its deletionTimestamp less its grace period (the API
/// server sets the timestamp to when the grace period ends).
fn deletion_asked(pod: &Pod) -> Option<SystemTime> {
    let ends = SystemTime::from(pod.metadata.deletion_timestamp.as_ref()?.0);
    let grace = pod
        .metadata
        .deletion_grace_period_seconds
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(0);
    Some(ends.checked_sub(Duration::from_secs(grace)).unwrap_or(ends))
}

/// The pod's Deployment and template hash, from its controlling ReplicaSet's name
/// (`<deployment>-<pod-template-hash>`), so no read access to `ReplicaSets` is needed.
fn deployment_of(pod: &Pod) -> Option<(String, String)> {
    let hash = pod.metadata.labels.as_ref()?.get("pod-template-hash")?;
    let owner = pod
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "ReplicaSet")?;
    let deployment = owner.name.strip_suffix(&format!("-{hash}"))?;
    Some((deployment.to_owned(), hash.clone()))
}

/// The pod's condition of [`CONDITION_TYPE`]: (`status == "True"`, reason, message).
fn current_condition(pod: &Pod) -> Option<(bool, String, String)> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION_TYPE)
        .map(|c| {
            (
                c.status == "True",
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

/// Whether `pod` waits for a decision: it names the readiness gate and is not being deleted.
fn gated(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && pod_has_gate(pod)
}

/// A pod to decide for.
#[derive(Debug)]
struct Held {
    namespace: String,
    name: String,
    uid: String,
    current: Option<(bool, String, String)>,
    workload: Option<(String, String)>,
    predecessors: Vec<Predecessor>,
    /// From when the deletions it waits for count (`None`: it waits for none).
    since: Option<SystemTime>,
}

/// A version of a Deployment: (namespace, Deployment, pod-template-hash).
type Version = (String, String, String);

/// A Deployment: (namespace, name).
type DeploymentKey = (String, String);

/// When each version's rollout began: the creation of its oldest live pod.
fn rollout_starts(pods: &Pods) -> HashMap<Version, SystemTime> {
    let mut began: HashMap<Version, SystemTime> = HashMap::new();
    for pod in pods.live.values() {
        if let (Some((deployment, hash)), Some(created)) =
            (deployment_of(pod), pod.metadata.creation_timestamp.as_ref())
        {
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            let created = SystemTime::from(created.0);
            began
                .entry((namespace, deployment, hash))
                .and_modify(|t| *t = (*t).min(created))
                .or_insert(created);
        }
    }
    began
}

/// The pods `version` replaced: those of its Deployment with another hash whose deletion was
/// asked for at or after `since` (whole seconds), sorted by name.
fn replaced_by(pods: &Pods, version: &Version, since: SystemTime) -> Vec<Predecessor> {
    let (namespace, deployment, hash) = version;
    let since = whole_seconds(since);
    let mut replaced: Vec<Predecessor> = pods
        .deleted
        .values()
        .filter(|d| {
            &d.pod.namespace == namespace
                && d.asked_at >= since
                && d.workload
                    .as_ref()
                    .is_some_and(|(dep, h)| dep == deployment && h != hash)
        })
        .map(|d| d.pod.clone())
        .collect();
    replaced.sort_by(|a, b| a.name.cmp(&b.name));
    replaced
}

fn whole_seconds(at: SystemTime) -> SystemTime {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs())
}

/// What the controller saw of one Deployment's rollouts, tick by tick.
#[derive(Debug, Clone, Default)]
struct Rollouts {
    /// The last tick it ran one version with nothing terminating.
    stable_at: Option<SystemTime>,
    /// While it runs more than one version or terminates pods: from when deletions count.
    rolling: Option<RollingSince>,
    /// The last rollout that finished: its version's hash, from when its deletions counted, and
    /// when it was seen finished. Its pods created before then still wait for its old pods.
    last: Option<(String, Option<SystemTime>, SystemTime)>,
}

/// From when a rollout's deletions count: the last stable tick before it (`None`: unknown, the
/// gate came up mid-rollout).
#[derive(Debug, Clone, Copy)]
struct RollingSince(Option<SystemTime>);

/// A rollout whose Deployment runs only its new version now (no old pod left, none
/// terminating), for the final verdict over the pods it replaced.
#[derive(Debug, Clone)]
struct Finished {
    version: Version,
    replaced: Vec<Predecessor>,
    seen: Instant,
}

/// Every Deployment's rollouts, and the finished ones whose verdict is not recorded yet.
#[derive(Debug, Default)]
struct Tracker {
    deployments: HashMap<DeploymentKey, Rollouts>,
    pending: Vec<Finished>,
}

impl Tracker {
    /// Notes what each Deployment with live pods runs at `now`; a rollout seen finishing is
    /// queued for its final verdict (only where the readiness gate holds the Deployment).
    fn observe(&mut self, pods: &Pods, now: SystemTime) {
        // Per Deployment: its live hashes, whether a pod terminates, whether one is gated.
        let mut seen: HashMap<DeploymentKey, (Vec<String>, bool, bool)> = HashMap::new();
        for pod in pods.live.values() {
            let Some((deployment, hash)) = deployment_of(pod) else {
                continue;
            };
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            let entry = seen.entry((namespace, deployment)).or_default();
            if !entry.0.contains(&hash) {
                entry.0.push(hash);
            }
            entry.1 |= pod.metadata.deletion_timestamp.is_some();
            entry.2 |= pod_has_gate(pod);
        }
        let began = rollout_starts(pods);
        // A Deployment without pods has nothing to hold.
        self.deployments.retain(|key, _| seen.contains_key(key));
        for (key, (hashes, terminating, gated)) in seen {
            let state = self.deployments.entry(key.clone()).or_default();
            let stable = hashes.len() == 1 && !terminating;
            if !stable {
                if state.rolling.is_none() {
                    state.rolling = Some(RollingSince(state.stable_at));
                }
                continue;
            }
            let hash = hashes.into_iter().next().unwrap_or_default();
            if let Some(RollingSince(since)) = state.rolling.take() {
                let version = (key.0.clone(), key.1.clone(), hash.clone());
                let from = since.unwrap_or_else(|| {
                    began
                        .get(&version)
                        .copied()
                        .unwrap_or(SystemTime::UNIX_EPOCH)
                });
                let replaced = replaced_by(pods, &version, from);
                if gated && !replaced.is_empty() {
                    if self.pending.len() >= MAX_REMEMBERED {
                        self.pending.remove(0);
                    }
                    self.pending.push(Finished {
                        version,
                        replaced,
                        seen: Instant::now(),
                    });
                }
                state.last = Some((hash, since, now));
            }
            state.stable_at = Some(now);
        }
        self.pending.retain(|f| f.seen.elapsed() < REMEMBER);
    }

    /// From when the deletions that `pod` (of `version`, created at `created`) waits for count;
    /// `None`: it waits for none (created after its version's rollout finished, or outside any).
    fn since(
        &self,
        version: &Version,
        created: Option<SystemTime>,
        began: &HashMap<Version, SystemTime>,
    ) -> Option<SystemTime> {
        let fallback = || began.get(version).copied().or(Some(SystemTime::UNIX_EPOCH));
        let Some(state) = self
            .deployments
            .get(&(version.0.clone(), version.1.clone()))
        else {
            return fallback();
        };
        if let Some(RollingSince(since)) = state.rolling {
            return since.or_else(fallback);
        }
        match (&state.last, created) {
            // A pod of the last rollout's version created before it was seen finished (in the
            // same second counts: creation times are whole seconds) was part of it.
            (Some((hash, since, ended)), Some(created))
                if *hash == version.2 && created <= whole_seconds(*ended) =>
            {
                since.or_else(fallback)
            }
            (_, None) => fallback(),
            // Outside a rollout: a scale-up, a crash replacement.
            _ => None,
        }
    }
}

/// Whether `pod` names the readiness gate (being deleted or not).
fn pod_has_gate(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .is_some_and(|gates| gates.iter().any(|g| g.condition_type == CONDITION_TYPE))
}

/// The pods waiting for a decision, each with its predecessors.
fn held_pods(pods: &Pods, tracker: &Tracker) -> Vec<Held> {
    let mut held = Vec::new();
    let began = rollout_starts(pods);
    for pod in pods.live.values().filter(|p| gated(p)) {
        let current = current_condition(pod);
        if current.as_ref().is_some_and(|c| c.0) {
            continue;
        }
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let workload = deployment_of(pod);
        let created = pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| SystemTime::from(t.0));
        let since = workload.as_ref().and_then(|(deployment, hash)| {
            tracker.since(
                &(namespace.clone(), deployment.clone(), hash.clone()),
                created,
                &began,
            )
        });
        let predecessors = match (&workload, since) {
            (Some((deployment, hash)), Some(since)) => replaced_by(
                pods,
                &(namespace.clone(), deployment.clone(), hash.clone()),
                since,
            ),
            _ => Vec::new(),
        };
        held.push(Held {
            namespace,
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            current,
            workload,
            predecessors,
            since,
        });
    }
    held.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    held
}

/// The evidence for one Deployment's rollout: its judgement's pods where the agents name it,
/// with every agent's own terminating pods added (a pod its agent cannot attribute to the
/// Deployment is still found by uid or name), and the agents that could not be asked.
fn evidence(
    round: &crate::pool::Round,
    namespace: &str,
    deployment: &str,
    new_hash: &str,
) -> Evidence {
    let query = Query {
        namespace: namespace.to_owned(),
        kind: Kind::Deployment,
        name: deployment.to_owned(),
        old: None,
        new: Some(new_hash.to_owned()),
    };
    let mut pods = judge(&query, &round.answers, round.at)
        .map(|j| j.pods)
        .unwrap_or_default();
    let mut unreachable = Vec::new();
    for answer in &round.answers {
        match &answer.result {
            Ok(list) => {
                for pod in &list.pods {
                    let uid = pod.pod.as_ref().map(|r| r.uid.as_str());
                    if !pods
                        .iter()
                        .any(|p| p.pod.as_ref().map(|r| r.uid.as_str()) == uid)
                    {
                        pods.push(pod.clone());
                    }
                }
            }
            Err(_) => unreachable.push(answer.who()),
        }
    }
    Evidence { pods, unreachable }
}

/// Runs the controller until the watch ends (it retries with backoff on its own, so only at
/// shutdown).
pub async fn run(
    gate: Arc<Gate>,
    client: kube::Client,
    config: HoldConfig,
) -> Result<(), HoldError> {
    let pods = Arc::new(Mutex::new(Pods::default()));
    let watched = Arc::clone(&pods);
    let api: Api<Pod> = Api::all(client.clone());
    let mut stream = Box::pin(watcher(api, watcher::Config::default()).default_backoff());
    // The watch stops with the controller (an aborted `run` leaves no watch behind).
    let watch = AbortOnDrop(tokio::spawn(async move {
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => watched
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .apply(event),
                Err(err) => {
                    tracing::warn!(error = %chain(&err), "the pod watch failed; retrying");
                }
            }
        }
    }));
    let writer = Writer {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "draingate-gate".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        client,
        on_fail: config.on_fail,
    };
    let mut tracker = Tracker::default();
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(
        condition = CONDITION_TYPE,
        on_fail = ?config.on_fail,
        "holding rollouts through the readiness gate"
    );
    loop {
        ticker.tick().await;
        if watch.0.is_finished() {
            return Err(HoldError::WatchEnded);
        }
        let held = {
            let mut pods = pods
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            pods.forget_old(Instant::now());
            tracker.observe(&pods, SystemTime::now());
            held_pods(&pods, &tracker)
        };
        if held.is_empty() && tracker.pending.is_empty() {
            continue;
        }
        let round = if held.iter().any(|h| h.since.is_some()) || !tracker.pending.is_empty() {
            // Fresh answers: a round shared with a rollout tool's check may be up to the pool's
            // reuse age old, which would delay the release by as much.
            Some(gate.round_within(FRESH).await)
        } else {
            None
        };
        for mut pod in held {
            let evidence = match (&round, &pod.workload) {
                (Some(round), Some((deployment, hash))) => {
                    Some(evidence(round, &pod.namespace, deployment, hash))
                }
                _ => None,
            };
            if let (Some(evidence), Some((deployment, hash)), Some(since)) =
                (&evidence, &pod.workload, pod.since)
            {
                let version = (pod.namespace.clone(), deployment.clone(), hash.clone());
                add_agent_predecessors(&mut pod.predecessors, evidence, &version, since);
            }
            let decision = held_once_held(
                hold::decide(&pod.predecessors, evidence.as_ref()),
                pod.current.as_ref(),
            );
            if let Some(changed) = writer.set_condition(&pod, decision).await {
                writer.record(&pod, &changed).await;
            }
        }
        if let Some(round) = &round {
            let mut recorded = Vec::new();
            for (i, rollout) in tracker.pending.iter().enumerate() {
                let (namespace, deployment, hash) = &rollout.version;
                let evidence = evidence(round, namespace, deployment, hash);
                if writer
                    .record_rollout(rollout, hold::decide(&rollout.replaced, Some(&evidence)))
                    .await
                {
                    recorded.push(i);
                }
            }
            for i in recorded.into_iter().rev() {
                tracker.pending.remove(i);
            }
        }
    }
}

/// The predecessors the agents still report that the API server no longer shows (a gate that
/// restarted or took over mid-rollout never saw their deletion): pods of the same Deployment with
/// another hash whose window opened at or after `since` (whole seconds). Added to `known`, never
/// taken away: they can only make a pod wait longer.
fn add_agent_predecessors(
    known: &mut Vec<Predecessor>,
    evidence: &Evidence,
    version: &Version,
    since: SystemTime,
) {
    let (namespace, deployment, hash) = version;
    let since = whole_seconds(since);
    for pod in &evidence.pods {
        let Some(id) = pod.pod.as_ref() else {
            continue;
        };
        let opened = pod
            .timeline
            .as_ref()
            .and_then(|t| t.terminating_since)
            .and_then(|t| SystemTime::try_from(t).ok());
        if pod.owner_kind == "Deployment"
            && &pod.owner_name == deployment
            && &id.namespace == namespace
            && &pod.pod_template_hash != hash
            && opened.is_some_and(|t| t >= since)
            && !known.iter().any(|k| k.uid == id.uid)
        {
            known.push(Predecessor {
                namespace: id.namespace.clone(),
                name: id.name.clone(),
                uid: id.uid.clone(),
            });
        }
    }
    known.sort_by(|a, b| a.name.cmp(&b.name));
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A pod the gate holds (`False`) is released only after its predecessors passed: if they are
/// no longer known (the gate restarted, a new leader took over, or they were forgotten after
/// [`REMEMBER`]), "no predecessors" would release a pod held for a failed drain. It stays held,
/// `NoEvidence`, saying what to do.
fn held_once_held(decision: Hold, current: Option<&(bool, String, String)>) -> Hold {
    match (&decision, current) {
        (Hold::Release { reason, .. }, Some((false, _, _))) if *reason == "NoPredecessors" => {
            Hold::Held {
                reason: HoldReason::NoEvidence,
                message: "the old pods this pod waited for are no longer known (the gate \
                          restarted or forgot them): delete this pod to decide afresh, or roll \
                          back"
                    .into(),
            }
        }
        _ => decision,
    }
}

#[cfg(test)]
mod tests;
