//! The readiness condition that holds a plain Deployment's rollout: a new pod's
//! `draingate.io/predecessors-drained` condition, from the old pods it waits for (its
//! predecessors, which [`crate::controller`] chooses from the API server's pods) and the gate's
//! judgement of that rollout.
//!
//! The rule, in order:
//! - no predecessors (a scale-up, a crash replacement, the first surge pod): `True` at once;
//! - a predecessor failed its drain: `False`, `DrainFailed`, naming it and its reason;
//! - a predecessor the agents cannot vouch for (its verdict unknown, or absent while an agent
//!   could not be asked): `False`, `NoEvidence`, naming the unreachable agents;
//! - a predecessor still draining, or not yet seen terminating: `False`, `Draining`;
//! - every predecessor passed: `True`.
//!
//! Unknown never passes, as in the gate's rule. A condition that was `True` stays `True`
//! ([`Hold::after`]): the Deployment controller has already counted the pod available.

use draingate_proto::v1 as pb;

/// The condition type the webhook adds to `spec.readinessGates`.
pub const CONDITION_TYPE: &str = "draingate.io/predecessors-drained";

/// A predecessor, as the API server names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Predecessor {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Why a pod is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldReason {
    Draining,
    DrainFailed,
    NoEvidence,
}

impl HoldReason {
    /// The condition's `reason`, as `kubectl describe` shows it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draining => "Draining",
            Self::DrainFailed => "DrainFailed",
            Self::NoEvidence => "NoEvidence",
        }
    }
}

/// The condition to set on the new pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// `True`: the pod may become Ready.
    Release {
        reason: &'static str,
        message: String,
    },
    /// `False`: the pod stays unready, so a Deployment with `maxUnavailable: 0` deletes no more
    /// old pods.
    Held { reason: HoldReason, message: String },
}

impl Hold {
    /// The condition's `status`.
    #[must_use]
    pub fn status(&self) -> &'static str {
        match self {
            Self::Release { .. } => "True",
            Self::Held { .. } => "False",
        }
    }

    /// What to set, given what the pod has now (`Some(true)`: the condition is already `True`):
    /// a released pod is never held again.
    #[must_use]
    pub fn after(self, current: Option<bool>) -> Option<Self> {
        (current != Some(true)).then_some(self)
    }
}

/// What the agents said about a rollout's pods, in one round.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evidence {
    /// Every pod the agents judged (with the peer view applied where the rollout is named).
    pub pods: Vec<pb::Pod>,
    /// The agents that could not be asked.
    pub unreachable: Vec<String>,
}

/// The condition of a new pod whose predecessors are `predecessors`, from `evidence`, the
/// agents' answers in one round (`None`: not asked, as when it has none).
#[must_use]
pub fn decide(predecessors: &[Predecessor], judgement: Option<&Evidence>) -> Hold {
    if predecessors.is_empty() {
        return Hold::Release {
            reason: "NoPredecessors",
            message: "no old pod was deleted before this one was created".into(),
        };
    }
    let unreachable = judgement.map_or_else(Vec::new, |j| j.unreachable.clone());
    let mut failed = Vec::new();
    let mut unknown = Vec::new();
    let mut draining = Vec::new();
    for predecessor in predecessors {
        let pod = judgement.and_then(|j| {
            j.pods.iter().find(|p| {
                p.pod.as_ref().is_some_and(|r| {
                    r.uid == predecessor.uid
                        || (r.namespace == predecessor.namespace && r.name == predecessor.name)
                })
            })
        });
        let verdict = pod.map_or(pb::Verdict::None, |p| {
            pb::Verdict::try_from(p.verdict).unwrap_or(pb::Verdict::Unknown)
        });
        match verdict {
            pb::Verdict::Pass => {}
            pb::Verdict::Fail => failed.push(format!(
                "{} {}",
                predecessor.name,
                pod.map_or("", |p| p.reason.as_str())
            )),
            pb::Verdict::Unknown | pb::Verdict::Unspecified => {
                unknown.push(predecessor.name.clone());
            }
            // Not seen terminating: by no agent that answered, or by one that did not.
            pb::Verdict::None if !unreachable.is_empty() => unknown.push(predecessor.name.clone()),
            pb::Verdict::None | pb::Verdict::Pending => draining.push(predecessor.name.clone()),
        }
    }
    if !failed.is_empty() {
        return Hold::Held {
            reason: HoldReason::DrainFailed,
            message: failed.join("; "),
        };
    }
    if !unknown.is_empty() {
        let why = if unreachable.is_empty() {
            "its evidence is incomplete".to_owned()
        } else {
            format!("{} unreachable", unreachable.join(", "))
        };
        return Hold::Held {
            reason: HoldReason::NoEvidence,
            message: format!("{}: {why}", unknown.join(", ")),
        };
    }
    if !draining.is_empty() {
        return Hold::Held {
            reason: HoldReason::Draining,
            message: format!("waiting for {} to drain", draining.join(", ")),
        };
    }
    Hold::Release {
        reason: "PredecessorsDrained",
        message: format!(
            "{} predecessor(s) drained with no error",
            predecessors.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use draingate_proto::v1 as pb;

    use super::{Evidence, Hold, HoldReason, Predecessor, decide};

    fn predecessor(name: &str) -> Predecessor {
        Predecessor {
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    fn pod(name: &str, verdict: pb::Verdict, reason: &str) -> pb::Pod {
        pb::Pod {
            pod: Some(pb::PodRef {
                namespace: "shop".into(),
                name: name.into(),
                uid: format!("uid-{name}"),
            }),
            verdict: verdict.into(),
            reason: reason.into(),
            ..pb::Pod::default()
        }
    }

    fn judgement(pods: Vec<pb::Pod>, unreachable: &[&str]) -> Evidence {
        Evidence {
            pods,
            unreachable: unreachable.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn reason(hold: &Hold) -> &str {
        match hold {
            Hold::Release { reason, .. } => reason,
            Hold::Held { reason, .. } => reason.as_str(),
        }
    }

    #[test]
    fn a_pod_with_no_predecessor_is_released_at_once() {
        let hold = decide(&[], None);
        assert_eq!((hold.status(), reason(&hold)), ("True", "NoPredecessors"));
    }

    #[test]
    fn every_predecessor_must_pass_and_a_failure_is_named() {
        let both = [predecessor("web-1"), predecessor("web-2")];
        let pass = |n| pod(n, pb::Verdict::Pass, "drained");
        let hold = decide(
            &both,
            Some(&judgement(vec![pass("web-1"), pass("web-2")], &[])),
        );
        assert_eq!(
            (hold.status(), reason(&hold)),
            ("True", "PredecessorsDrained")
        );

        let draining = pod("web-2", pb::Verdict::Pending, "");
        let hold = decide(&both, Some(&judgement(vec![pass("web-1"), draining], &[])));
        assert_eq!((hold.status(), reason(&hold)), ("False", "Draining"));

        // Not yet seen terminating by any agent, all of them asked: still draining.
        let hold = decide(&both, Some(&judgement(vec![pass("web-1")], &[])));
        assert_eq!(reason(&hold), "Draining");

        let failed = pod("web-2", pb::Verdict::Fail, "reset 4 connections");
        let unknown = pod("web-1", pb::Verdict::Unknown, "events lost");
        let hold = decide(&both, Some(&judgement(vec![unknown, failed], &["node-b"])));
        assert_eq!(
            hold,
            Hold::Held {
                reason: HoldReason::DrainFailed,
                message: "web-2 reset 4 connections".into()
            },
            "a known failure comes first"
        );
    }

    #[test]
    fn a_predecessor_nobody_can_vouch_for_is_no_evidence_never_a_release() {
        let one = [predecessor("web-1")];
        let hold = decide(
            &one,
            Some(&judgement(vec![], &["node-b (agent 10.0.0.6:9560)"])),
        );
        assert_eq!(
            hold,
            Hold::Held {
                reason: HoldReason::NoEvidence,
                message: "web-1: node-b (agent 10.0.0.6:9560) unreachable".into()
            }
        );
        let unknown = pod("web-1", pb::Verdict::Unknown, "events lost");
        let hold = decide(&one, Some(&judgement(vec![unknown], &[])));
        assert_eq!(reason(&hold), "NoEvidence");
        // The gate not asked at all: nothing is known yet.
        assert_eq!(decide(&one, None).status(), "False");
    }

    #[test]
    fn a_released_pod_is_never_held_again() {
        let held = decide(&[predecessor("web-1")], None);
        assert_eq!(held.clone().after(Some(true)), None);
        assert_eq!(held.clone().after(Some(false)), Some(held.clone()));
        assert_eq!(held.clone().after(None), Some(held));
    }
}
