use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use serde_json::json;

use super::{Pods, Tracker, deletion_asked, deployment_of, held_once_held, held_pods};
use crate::hold::{CONDITION_TYPE, Hold, HoldReason};

/// A pod of Deployment `web` with template hash `hash`, created at `created`.
fn pod(name: &str, hash: &str, created: &str) -> serde_json::Value {
    json!({
        "metadata": {
            "name": name, "namespace": "shop", "uid": format!("uid-{name}"),
            "creationTimestamp": created,
            "labels": {"app": "web", "pod-template-hash": hash},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("web-{hash}"), "uid": "rs", "controller": true}]
        },
        "spec": {"containers": [{"name": "web"}],
                 "readinessGates": [{"conditionType": CONDITION_TYPE}]}
    })
}

fn parsed(value: serde_json::Value) -> Pod {
    serde_json::from_value(value).expect("a Pod")
}

fn deleting(mut value: serde_json::Value, asked: &str, grace: i64) -> Pod {
    let asked: SystemTime = humantime::parse_rfc3339(asked).unwrap();
    let ends = asked + Duration::from_secs(grace.unsigned_abs());
    value["metadata"]["deletionTimestamp"] =
        json!(humantime::format_rfc3339_seconds(ends).to_string());
    value["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
    parsed(value)
}

#[test]
fn a_deletion_was_asked_for_a_grace_period_before_its_timestamp() {
    let old = deleting(
        pod("web-a-1", "a", "2026-12-03T10:00:00Z"),
        "2026-12-03T10:01:00Z",
        30,
    );
    assert_eq!(
        deletion_asked(&old),
        Some(humantime::parse_rfc3339("2026-12-03T10:01:00Z").unwrap())
    );
    assert_eq!(
        deployment_of(&old),
        Some(("web".to_owned(), "a".to_owned()))
    );
    // A bare ReplicaSet (its name does not end in the hash) is no Deployment's.
    let mut bare = pod("handmade-x", "a", "2026-12-03T10:00:00Z");
    bare["metadata"]["ownerReferences"][0]["name"] = json!("handmade");
    assert_eq!(deployment_of(&parsed(bare)), None);
}

#[test]
#[expect(clippy::large_stack_arrays, reason = "seven pods in a test")]
fn predecessors_are_the_other_versions_pods_deleted_since_the_new_versions_rollout_began() {
    let mut pods = Pods::default();
    for event in [
        // Deleted in an earlier rollout, before the new version's first pod: not one.
        deleting(
            pod("web-a-0", "a", "2026-12-03T09:00:00Z"),
            "2026-12-03T10:01:00Z",
            30,
        ),
        // Deleted in the second the first new pod was created, and a minute later (after the
        // second new pod was created: the Deployment controller may create first).
        deleting(
            pod("web-a-1", "a", "2026-12-03T10:00:00Z"),
            "2026-12-03T10:02:00Z",
            30,
        ),
        deleting(
            pod("web-a-2", "a", "2026-12-03T10:00:00Z"),
            "2026-12-03T10:03:00Z",
            30,
        ),
        parsed(pod("web-a-3", "a", "2026-12-03T10:00:00Z")),
        // Another Deployment's pod, deleted in the rollout: not one.
        deleting(
            {
                let mut p = pod("api-a-1", "a", "2026-12-03T10:00:00Z");
                p["metadata"]["ownerReferences"][0]["name"] = json!("api-a");
                p
            },
            "2026-12-03T10:02:30Z",
            30,
        ),
        parsed(pod("web-b-1", "b", "2026-12-03T10:02:00Z")),
        parsed(pod("web-b-2", "b", "2026-12-03T10:02:40Z")),
    ] {
        pods.apply(watcher::Event::Apply(event));
    }
    // The first old pod is gone from the API server by the time the new ones are looked at.
    pods.apply(watcher::Event::Delete(parsed(pod(
        "web-a-1",
        "a",
        "2026-12-03T10:00:00Z",
    ))));
    let held = held_pods(&pods, &Tracker::default());
    let names: Vec<&str> = held.iter().map(|h| h.name.as_str()).collect();
    // Every pod with the gate that is not being deleted waits for a decision.
    assert_eq!(names, ["web-a-3", "web-b-1", "web-b-2"]);
    for new in &held[1..] {
        let predecessors: Vec<&str> = new.predecessors.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(predecessors, ["web-a-1", "web-a-2"], "{new:?}");
    }
    // The old version's own pods have no predecessors: web-a-0 has their hash.
    assert!(held[0].predecessors.is_empty(), "{:?}", held[0]);
}

#[test]
fn a_pod_already_released_or_without_the_gate_is_left_alone() {
    let mut pods = Pods::default();
    let mut released = pod("web-b-1", "b", "2026-12-03T10:02:00Z");
    released["status"] = json!({"conditions": [{"type": CONDITION_TYPE, "status": "True"}]});
    let mut ungated = pod("web-b-2", "b", "2026-12-03T10:02:00Z");
    ungated["spec"]["readinessGates"] = json!([]);
    let mut held = pod("web-b-3", "b", "2026-12-03T10:02:00Z");
    held["status"] = json!({"conditions": [{"type": CONDITION_TYPE, "status": "False",
        "reason": "Draining", "message": "waiting"}]});
    for p in [released, ungated, held] {
        pods.apply(watcher::Event::Apply(parsed(p)));
    }
    let waiting = held_pods(&pods, &Tracker::default());
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].name, "web-b-3");
    assert_eq!(
        waiting[0].current,
        Some((false, "Draining".to_owned(), "waiting".to_owned()))
    );
}

#[test]
fn a_relist_replaces_the_live_pods_but_keeps_the_deletions_seen() {
    let mut pods = Pods::default();
    pods.apply(watcher::Event::Apply(deleting(
        pod("web-a-1", "a", "2026-12-03T10:00:00Z"),
        "2026-12-03T10:02:10Z",
        30,
    )));
    pods.apply(watcher::Event::Init);
    pods.apply(watcher::Event::InitApply(parsed(pod(
        "web-b-1",
        "b",
        "2026-12-03T10:02:00Z",
    ))));
    pods.apply(watcher::Event::InitDone);
    assert_eq!(pods.live.len(), 1);
    assert_eq!(pods.deleted.len(), 1);
    let held = held_pods(&pods, &Tracker::default());
    assert_eq!(held[0].predecessors[0].name, "web-a-1");
}

fn at(time: &str) -> SystemTime {
    humantime::parse_rfc3339(time).unwrap()
}

/// The tracker sees a rollout start (two versions), then finish (one version, nothing
/// terminating): the finished rollout names every pod it replaced, the last batch's included;
/// a pod of the version created after that waits for nothing, one created during it still
/// waits for its old pods; and a rollback to an older version waits for the pods it replaces.
#[test]
fn a_rollout_is_tracked_from_its_first_new_pod_to_its_last_old_one() {
    let mut pods = Pods::default();
    let mut tracker = Tracker::default();
    let old = [
        pod("web-a-1", "a", "2026-12-03T09:00:00Z"),
        pod("web-a-2", "a", "2026-12-03T09:00:00Z"),
    ];
    for p in &old {
        pods.apply(watcher::Event::Apply(parsed(p.clone())));
    }
    tracker.observe(&pods, at("2026-12-03T10:00:00Z"));
    // The rollout: b-x surges, a-1 goes, b-y replaces it, a-2 goes.
    pods.apply(watcher::Event::Apply(parsed(pod(
        "web-b-x",
        "b",
        "2026-12-03T10:00:01Z",
    ))));
    tracker.observe(&pods, at("2026-12-03T10:00:01Z"));
    pods.apply(watcher::Event::Apply(deleting(
        old[0].clone(),
        "2026-12-03T10:00:02Z",
        30,
    )));
    pods.apply(watcher::Event::Apply(parsed(pod(
        "web-b-y",
        "b",
        "2026-12-03T10:00:02Z",
    ))));
    tracker.observe(&pods, at("2026-12-03T10:00:02Z"));
    let held = held_pods(&pods, &tracker);
    let waits = |held: &[super::Held], name: &str| {
        held.iter().find(|h| h.name == name).map(|h| {
            h.predecessors
                .iter()
                .map(|p| p.name.clone())
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(waits(&held, "web-b-y"), Some(vec!["web-a-1".to_owned()]));
    pods.apply(watcher::Event::Apply(deleting(
        old[1].clone(),
        "2026-12-03T10:00:03Z",
        30,
    )));
    tracker.observe(&pods, at("2026-12-03T10:00:03Z"));
    assert!(tracker.pending.is_empty(), "old pods still terminating");
    for p in &old {
        pods.apply(watcher::Event::Delete(parsed(p.clone())));
    }
    tracker.observe(&pods, at("2026-12-03T10:00:05Z"));
    assert_eq!(tracker.pending.len(), 1, "{:?}", tracker.pending);
    let replaced: Vec<&str> = tracker.pending[0]
        .replaced
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(replaced, ["web-a-1", "web-a-2"]);
    // Finished: a pod of the rollout still waits for its old pods; a later scale-up waits for
    // nothing.
    pods.apply(watcher::Event::Apply(parsed(pod(
        "web-b-z",
        "b",
        "2026-12-03T10:00:09Z",
    ))));
    tracker.observe(&pods, at("2026-12-03T10:00:10Z"));
    let held = held_pods(&pods, &tracker);
    assert_eq!(
        waits(&held, "web-b-y"),
        Some(vec!["web-a-1".to_owned(), "web-a-2".to_owned()])
    );
    assert_eq!(waits(&held, "web-b-z"), Some(vec![]));
    // A rollback to a: its new pod waits for the b pods deleted since, not for a's own.
    pods.apply(watcher::Event::Apply(parsed(pod(
        "web-a-9",
        "a",
        "2026-12-03T10:01:00Z",
    ))));
    tracker.observe(&pods, at("2026-12-03T10:01:00Z"));
    pods.apply(watcher::Event::Apply(deleting(
        pod("web-b-x", "b", "2026-12-03T10:00:01Z"),
        "2026-12-03T10:01:01Z",
        30,
    )));
    tracker.observe(&pods, at("2026-12-03T10:01:01Z"));
    let held = held_pods(&pods, &tracker);
    assert_eq!(waits(&held, "web-a-9"), Some(vec!["web-b-x".to_owned()]));
}

/// A pod the gate holds is never released because its predecessors were forgotten.
#[test]
fn a_held_pod_whose_predecessors_are_forgotten_stays_held() {
    let release = || Hold::Release {
        reason: "NoPredecessors",
        message: String::new(),
    };
    let held = (
        false,
        "DrainFailed".to_owned(),
        "web-a-1 reset 4".to_owned(),
    );
    assert!(matches!(
        held_once_held(release(), Some(&held)),
        Hold::Held {
            reason: HoldReason::NoEvidence,
            ..
        }
    ));
    // Never decided before (a scale-up): released at once.
    assert_eq!(held_once_held(release(), None), release());
}

/// A pod that left while the watch was down is missing from the relist: it counts as deleted
/// (now, on the real clock: the pods here were created in the past), so the pod that replaced
/// it still waits for it.
#[test]
fn a_pod_gone_during_a_watch_outage_is_a_deletion_all_the_same() {
    let mut pods = Pods::default();
    pods.apply(watcher::Event::Apply(parsed(pod(
        "web-a-1",
        "a",
        "2026-01-01T10:00:00Z",
    ))));
    pods.apply(watcher::Event::Init);
    pods.apply(watcher::Event::InitApply(parsed(pod(
        "web-b-1",
        "b",
        "2026-01-01T10:02:00Z",
    ))));
    pods.apply(watcher::Event::InitDone);
    let held = held_pods(&pods, &Tracker::default());
    assert_eq!(held.len(), 1);
    let predecessors: Vec<&str> = held[0]
        .predecessors
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(predecessors, ["web-a-1"]);
}

/// After a restart, the old pods the agents still report count as predecessors: same
/// Deployment and namespace, another hash, window opened since the rollout began; never a pod of
/// the new version, another Deployment's, or one from an earlier rollout.
#[test]
fn the_agents_old_pods_are_predecessors_the_api_server_no_longer_shows() {
    use draingate_proto::v1 as pb;
    let agent_pod = |name: &str, owner: &str, hash: &str, opened: &str| pb::Pod {
        pod: Some(pb::PodRef {
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }),
        owner_kind: "Deployment".into(),
        owner_name: owner.into(),
        pod_template_hash: hash.into(),
        timeline: Some(pb::Timeline {
            terminating_since: Some(prost_types::Timestamp::from(at(opened))),
            ..pb::Timeline::default()
        }),
        ..pb::Pod::default()
    };
    let evidence = crate::hold::Evidence {
        pods: vec![
            agent_pod("web-a-1", "web", "a", "2026-12-03T10:00:02Z"),
            agent_pod("web-a-0", "web", "a", "2026-12-03T09:00:00Z"),
            agent_pod("web-b-2", "web", "b", "2026-12-03T10:00:03Z"),
            agent_pod("api-a-1", "api", "a", "2026-12-03T10:00:02Z"),
        ],
        unreachable: Vec::new(),
    };
    let mut known = vec![super::Predecessor {
        namespace: "shop".into(),
        name: "web-a-1".into(),
        uid: "uid-web-a-1".into(),
    }];
    let version = ("shop".to_owned(), "web".to_owned(), "b".to_owned());
    super::add_agent_predecessors(&mut known, &evidence, &version, at("2026-12-03T10:00:00Z"));
    let names: Vec<&str> = known.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["web-a-1"], "no duplicate, nothing else");
    let mut known = Vec::new();
    super::add_agent_predecessors(&mut known, &evidence, &version, at("2026-12-03T10:00:00Z"));
    let names: Vec<&str> = known.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["web-a-1"]);
}
