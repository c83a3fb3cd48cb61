//! The readiness-gate controller (`draingate gate serve --hold`): it holds a plain Deployment's
//! rollout by keeping each new pod's `draingate.io/predecessors-drained` condition `False`
//! until the old pods deleted before it drained clean ([`hold::decide`] is the rule; this module
//! finds the pods and writes the condition).
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

use draingate_proto::v1 as pb;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ObjectReference, Pod},
};
use kube::{
    Api, Resource as _,
    api::{Patch, PatchParams},
    runtime::{
        WatchStreamExt as _,
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
};
use tokio_stream::StreamExt as _;

use crate::{
    Gate, Judgement, Kind, Query,
    hold::{self, CONDITION_TYPE, Hold, Predecessor},
    judge,
};

/// How long a deletion is remembered after it was seen.
pub const REMEMBER: Duration = Duration::from_hours(1);

/// Most deletions remembered; the oldest are forgotten first beyond this (bounded memory on a
/// cluster that deletes many pods an hour).
pub const MAX_REMEMBERED: usize = 100_000;

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct HoldConfig {
    /// How often the held pods are looked at again.
    pub interval: Duration,
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

fn gated(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .spec
            .as_ref()
            .and_then(|s| s.readiness_gates.as_ref())
            .is_some_and(|gates| gates.iter().any(|g| g.condition_type == CONDITION_TYPE))
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
}

/// The pods waiting for a decision, each with its predecessors.
fn held_pods(pods: &Pods) -> Vec<Held> {
    let mut held = Vec::new();
    // When each version's rollout began: its oldest live pod's creation.
    let mut began: HashMap<(String, String, String), SystemTime> = HashMap::new();
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
    for pod in pods.live.values().filter(|p| gated(p)) {
        let current = current_condition(pod);
        if current.as_ref().is_some_and(|c| c.0) {
            continue;
        }
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let workload = deployment_of(pod);
        let mut predecessors: Vec<Predecessor> = match &workload {
            None => Vec::new(),
            Some((deployment, hash)) => {
                let since = began
                    .get(&(namespace.clone(), deployment.clone(), hash.clone()))
                    .copied()
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                pods.deleted
                    .values()
                    .filter(|d| {
                        d.pod.namespace == namespace
                            && d.asked_at >= since
                            && d.workload
                                .as_ref()
                                .is_some_and(|(dep, h)| dep == deployment && h != hash)
                    })
                    .map(|d| d.pod.clone())
                    .collect()
            }
        };
        predecessors.sort_by(|a, b| a.name.cmp(&b.name));
        held.push(Held {
            namespace,
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            current,
            workload,
            predecessors,
        });
    }
    held.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    held
}

/// The evidence for one Deployment's rollout: its judgement where the agents name it, with
/// every agent's own terminating pods added (a pod its agent cannot attribute to the Deployment
/// is still found by uid or name), and the agents that could not be asked.
fn evidence(
    round: &crate::pool::Round,
    namespace: &str,
    deployment: &str,
    new_hash: &str,
) -> Judgement {
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
    Judgement {
        verdict: pb::Verdict::Pending,
        reason: String::new(),
        terminating_pods: 0,
        drained_pods: 0,
        inflight_at_kill: 0,
        resets: 0,
        failed_requests: 0,
        pods,
        unreachable,
        agents: u32::try_from(round.answers.len()).unwrap_or(u32::MAX),
        agents_answered: 0,
        checked_at: round.at,
        from_history: false,
    }
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
    let watch = tokio::spawn(async move {
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => watched
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .apply(event),
                Err(err) => tracing::warn!(error = %err, "the pod watch failed; retrying"),
            }
        }
    });
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "draingate-gate".into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(
        condition = CONDITION_TYPE,
        "holding rollouts through the readiness gate"
    );
    loop {
        ticker.tick().await;
        if watch.is_finished() {
            return Err(HoldError::WatchEnded);
        }
        let held = {
            let mut pods = pods
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            pods.forget_old(Instant::now());
            held_pods(&pods)
        };
        if held.is_empty() {
            continue;
        }
        let round = if held.iter().any(|h| !h.predecessors.is_empty()) {
            Some(gate.round().await)
        } else {
            None
        };
        for pod in held {
            let judgement = match (&round, &pod.workload) {
                (Some(round), Some((deployment, hash))) => {
                    Some(evidence(round, &pod.namespace, deployment, hash))
                }
                _ => None,
            };
            let decision = hold::decide(&pod.predecessors, judgement.as_ref());
            if let Some(changed) = set_condition(&client, &pod, decision).await {
                record(&client, &recorder, &pod, &changed).await;
            }
        }
    }
}

/// A condition the controller set: its status, reason and message.
#[derive(Debug)]
struct Changed {
    released: bool,
    reason: String,
    message: String,
}

/// Writes the condition through `pods/status` when it changed; what it set.
async fn set_condition(client: &kube::Client, pod: &Held, decision: Hold) -> Option<Changed> {
    let decision = decision.after(pod.current.as_ref().map(|c| c.0))?;
    let (reason, message) = match &decision {
        Hold::Release { reason, message } => ((*reason).to_owned(), message.clone()),
        Hold::Held { reason, message } => (reason.as_str().to_owned(), message.clone()),
    };
    let status = decision.status();
    // A bounded message: the API server keeps it in every pod's status.
    let message: String = message.chars().take(1024).collect();
    if pod.current.as_ref().is_some_and(|(is_true, r, m)| {
        (*is_true, r.as_str(), m.as_str()) == (status == "True", reason.as_str(), message.as_str())
    }) {
        return None;
    }
    let mut condition = serde_json::json!({
        "type": CONDITION_TYPE,
        "status": status,
        "reason": reason,
        "message": message,
    });
    // The transition time changes only with the status.
    if pod
        .current
        .as_ref()
        .is_none_or(|c| c.0 != (status == "True"))
    {
        condition["lastTransitionTime"] = humantime::format_rfc3339_seconds(SystemTime::now())
            .to_string()
            .into();
    }
    let patch = serde_json::json!({"status": {"conditions": [condition]}});
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    match api
        .patch_status(
            &pod.name,
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(
                pod = %format!("{}/{}", pod.namespace, pod.name),
                status,
                reason,
                message,
                "readiness gate condition set"
            );
            Some(Changed {
                released: status == "True",
                reason,
                message,
            })
        }
        Err(err) => {
            tracing::warn!(
                pod = %format!("{}/{}", pod.namespace, pod.name),
                error = %err,
                "cannot set the readiness gate condition"
            );
            None
        }
    }
}

/// Records the decision as Kubernetes Events, so that it outlives the gate and
/// `kubectl describe` shows it: on the pod for every release after predecessors and every
/// failed drain, and on its Deployment for a failed drain (the rollout is held).
async fn record(client: &kube::Client, recorder: &Recorder, pod: &Held, changed: &Changed) {
    let (type_, action) = match (changed.released, changed.reason.as_str()) {
        (true, "PredecessorsDrained") => (EventType::Normal, "Release"),
        (false, "DrainFailed") => (EventType::Warning, "Hold"),
        _ => return,
    };
    let event = Event {
        type_,
        reason: changed.reason.clone(),
        note: Some(changed.message.chars().take(1024).collect()),
        action: action.into(),
        secondary: None,
    };
    let mut references = vec![ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(pod.namespace.clone()),
        name: Some(pod.name.clone()),
        uid: Some(pod.uid.clone()),
        ..ObjectReference::default()
    }];
    if !changed.released
        && let Some((deployment, _)) = &pod.workload
    {
        // `kubectl describe deploy` finds Events by the Deployment's uid.
        let api: Api<Deployment> = Api::namespaced(client.clone(), &pod.namespace);
        match api.get(deployment).await {
            Ok(d) => references.push(d.object_ref(&())),
            Err(err) => tracing::warn!(
                deployment = %format!("{}/{deployment}", pod.namespace),
                error = %err,
                "cannot name the Deployment in its Event"
            ),
        }
    }
    for reference in &references {
        if let Err(err) = recorder.publish(&event, reference).await {
            tracing::warn!(error = %err, "cannot record the Event");
        }
    }
}

#[cfg(test)]
mod tests;
