use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use serde_json::json;

use super::{Pods, Recorded, deletion_asked, deployment_of, finished_rollouts, held_pods};
use crate::hold::CONDITION_TYPE;

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
    let held = held_pods(&pods, &std::collections::HashMap::new());
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
    let waiting = held_pods(&pods, &std::collections::HashMap::new());
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
    let held = held_pods(&pods, &std::collections::HashMap::new());
    assert_eq!(held[0].predecessors[0].name, "web-a-1");
}

/// A rollout is finished, for its final Event, when its Deployment runs only the new version
/// (no old pod left, none terminating), and it names every pod it replaced; once recorded it is
/// not offered again.
#[test]
fn a_rollout_is_finished_when_only_its_version_is_left() {
    let mut pods = Pods::default();
    let old = [
        pod("web-a-1", "a", "2026-12-03T10:00:00Z"),
        pod("web-a-2", "a", "2026-12-03T10:00:00Z"),
    ];
    for (p, asked) in old
        .iter()
        .zip(["2026-12-03T10:02:10Z", "2026-12-03T10:03:10Z"])
    {
        pods.apply(watcher::Event::Apply(parsed(p.clone())));
        pods.apply(watcher::Event::Apply(parsed(pod(
            "web-b-x",
            "b",
            "2026-12-03T10:02:00Z",
        ))));
        pods.apply(watcher::Event::Apply(deleting(p.clone(), asked, 30)));
    }
    pods.apply(watcher::Event::Apply(parsed(pod(
        "web-b-y",
        "b",
        "2026-12-03T10:03:00Z",
    ))));
    let mut recorded = std::collections::HashMap::new();
    // Old pods still terminating: not finished.
    assert!(finished_rollouts(&pods, &recorded).is_empty());
    for p in &old {
        pods.apply(watcher::Event::Delete(parsed(p.clone())));
    }
    let finished = finished_rollouts(&pods, &recorded);
    assert_eq!(finished.len(), 1, "{finished:?}");
    let version = ("shop".to_owned(), "web".to_owned(), "b".to_owned());
    assert_eq!(finished[0].version, version);
    let replaced: Vec<&str> = finished[0]
        .replaced
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(replaced, ["web-a-1", "web-a-2"]);
    recorded.insert(
        version,
        Recorded {
            seen: std::time::Instant::now(),
            at: humantime::parse_rfc3339("2026-12-03T10:05:00Z").unwrap(),
        },
    );
    assert!(finished_rollouts(&pods, &recorded).is_empty());
    // Now a pod of the version created after that (a scale-up) waits for nothing; one created
    // during the rollout still names the pods it replaced.
    pods.apply(watcher::Event::Apply(parsed(pod(
        "web-b-z",
        "b",
        "2026-12-03T10:06:00Z",
    ))));
    let held = held_pods(&pods, &recorded);
    let predecessors = |name: &str| {
        held.iter()
            .find(|h| h.name == name)
            .map(|h| h.predecessors.len())
    };
    assert_eq!(predecessors("web-b-z"), Some(0));
    assert_eq!(predecessors("web-b-y"), Some(2));
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
    let held = held_pods(&pods, &std::collections::HashMap::new());
    assert_eq!(held.len(), 1);
    let predecessors: Vec<&str> = held[0]
        .predecessors
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(predecessors, ["web-a-1"]);
}
