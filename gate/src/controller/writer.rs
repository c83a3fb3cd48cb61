//! What the readiness-gate controller writes to the API server: the pods' condition (through
//! `pods/status`), the Events that explain it, and the pause of a Deployment whose old pod
//! failed its drain.

use std::time::SystemTime;

use draingate_serve::telemetry::chain;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ObjectReference, Pod},
};
use kube::{
    Api, Resource as _,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder},
};

use super::{Finished, Held, OnFail};
use crate::hold::{CONDITION_TYPE, Hold, HoldReason};

/// A condition the controller set: its status, reason and message.
#[derive(Debug)]
pub(super) struct Changed {
    released: bool,
    reason: String,
    message: String,
}

/// What the controller writes to the API server.
pub(super) struct Writer {
    pub(super) client: kube::Client,
    pub(super) recorder: Recorder,
    pub(super) on_fail: OnFail,
}

impl Writer {
    /// Writes the condition through `pods/status` when it changed; what it set.
    pub(super) async fn set_condition(&self, pod: &Held, decision: Hold) -> Option<Changed> {
        let decision = decision.after(pod.current.as_ref().map(|c| c.0))?;
        let (reason, message) = match &decision {
            Hold::Release { reason, message } => ((*reason).to_owned(), message.clone()),
            Hold::Held { reason, message } => (reason.as_str().to_owned(), message.clone()),
        };
        let status = decision.status();
        // A bounded message: the API server keeps it in every pod's status.
        let message: String = message.chars().take(1024).collect();
        if pod.current.as_ref().is_some_and(|(is_true, r, m)| {
            (*is_true, r.as_str(), m.as_str())
                == (status == "True", reason.as_str(), message.as_str())
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
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
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
                    error = %chain(&err),
                    "cannot set the readiness gate condition"
                );
                None
            }
        }
    }

    /// The Deployment's reference for its Events (`kubectl describe deploy` finds Events by
    /// its uid).
    async fn deployment_ref(&self, namespace: &str, name: &str) -> Option<ObjectReference> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        match api.get(name).await {
            Ok(d) => Some(d.object_ref(&())),
            Err(err) => {
                tracing::warn!(
                    deployment = %format!("{namespace}/{name}"),
                    error = %chain(&err),
                    "cannot name the Deployment in its Event"
                );
                None
            }
        }
    }

    /// Publishes `event` on each of `references`; whether every one was recorded.
    async fn publish(&self, event: &Event, references: &[ObjectReference]) -> bool {
        let mut all = true;
        for reference in references {
            if let Err(err) = self.recorder.publish(event, reference).await {
                tracing::warn!(error = %chain(&err), "cannot record the Event");
                all = false;
            }
        }
        all
    }

    /// Records the decision as Kubernetes Events, so that it outlives the gate and
    /// `kubectl describe` shows it: on the pod for every release after predecessors and every
    /// failed drain, and on its Deployment for a failed drain (the rollout is held), which
    /// `--on-fail pause` also pauses.
    pub(super) async fn record(&self, pod: &Held, changed: &Changed) {
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
        let deployment = match (&pod.workload, changed.released) {
            (Some((deployment, _)), false) => self.deployment_ref(&pod.namespace, deployment).await,
            _ => None,
        };
        references.extend(deployment.clone());
        let _ = self.publish(&event, &references).await;
        if let (Some(reference), OnFail::Pause) = (deployment, self.on_fail) {
            self.pause(&reference, &changed.message).await;
        }
    }

    /// Pauses the Deployment (`spec.paused`), with an Event that says why.
    async fn pause(&self, deployment: &ObjectReference, why: &str) {
        let (Some(namespace), Some(name)) = (&deployment.namespace, &deployment.name) else {
            return;
        };
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({"spec": {"paused": true}});
        if let Err(err) = api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(
                deployment = %format!("{namespace}/{name}"),
                error = %chain(&err),
                "cannot pause the Deployment"
            );
            return;
        }
        tracing::warn!(deployment = %format!("{namespace}/{name}"), "paused the Deployment");
        let event = Event {
            type_: EventType::Warning,
            reason: "RolloutPaused".into(),
            note: Some(
                format!(
                    "paused by draingate (--on-fail pause): {why}; `kubectl rollout resume` \
                     once fixed"
                )
                .chars()
                .take(1024)
                .collect(),
            ),
            action: "Pause".into(),
            secondary: None,
        };
        let _ = self.publish(&event, std::slice::from_ref(deployment)).await;
    }

    /// Records a finished rollout's final verdict over the pods it replaced as an Event on its
    /// Deployment: `RolloutDrained` (every replaced pod passed) or `RolloutDrainFailed`. Whether
    /// it is final (an outcome still unknown or draining is recorded later).
    pub(super) async fn record_rollout(&self, rollout: &Finished, decision: Hold) -> bool {
        let (namespace, deployment, hash) = &rollout.version;
        let names: Vec<&str> = rollout.replaced.iter().map(|p| p.name.as_str()).collect();
        let (type_, reason, note) = match decision {
            Hold::Release { .. } => (
                EventType::Normal,
                "RolloutDrained",
                format!(
                    "rollout to {hash}: all {} replaced pods drained with no error ({})",
                    names.len(),
                    names.join(", ")
                ),
            ),
            Hold::Held {
                reason: HoldReason::DrainFailed,
                message,
            } => (
                EventType::Warning,
                "RolloutDrainFailed",
                format!(
                    "rollout to {hash}: of {} replaced pods, failed: {message}",
                    names.len()
                ),
            ),
            Hold::Held { .. } => return false,
        };
        let Some(reference) = self.deployment_ref(namespace, deployment).await else {
            return false;
        };
        tracing::info!(
            deployment = %format!("{namespace}/{deployment}"),
            reason,
            note,
            "rollout verdict"
        );
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1024).collect()),
            action: "Verdict".into(),
            secondary: None,
        };
        // Not recorded: tried again next time.
        self.publish(&event, &[reference]).await
    }
}
