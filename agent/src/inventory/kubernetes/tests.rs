use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use super::observe;

fn pod(extra: serde_json::Value) -> Pod {
    let mut base = json!({
        "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {}},
        "spec": {"containers": [{"name": "c"}]},
        "status": {}
    });
    merge(&mut base, extra);
    serde_json::from_value(base).expect("a Pod")
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    match (into, from) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

fn owner(kind: &str, name: &str) -> serde_json::Value {
    json!([{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "o", "controller": true}])
}

#[test]
fn dual_stack_pods_have_both_addresses_and_pending_pods_none() {
    let p = observe(&pod(json!({"status": {"podIP": "10.1.0.1",
        "podIPs": [{"ip": "10.1.0.1"}, {"ip": "fd00::1"}]}})))
    .unwrap();
    assert_eq!(p.addresses.len(), 2);
    let pending = observe(&pod(json!({"status": {"phase": "Pending"}}))).unwrap();
    assert!(pending.addresses.is_empty());
    assert!(
        observe(&pod(json!({"metadata": {"uid": null}}))).is_none(),
        "no uid, no pod"
    );
}

#[test]
fn owners_come_from_the_controller_reference_and_the_hash_label() {
    let deployment = observe(&pod(json!({"metadata": {
        "ownerReferences": owner("ReplicaSet", "web-5d8f9c7b6"),
        "labels": {"pod-template-hash": "5d8f9c7b6"}}})))
    .unwrap();
    assert_eq!(
        (
            deployment.meta.owner_kind.as_str(),
            deployment.meta.owner_name.as_str()
        ),
        ("Deployment", "web")
    );
    // A bare ReplicaSet (its name does not end in the hash) stays a ReplicaSet.
    let bare = observe(&pod(json!({"metadata": {
        "ownerReferences": owner("ReplicaSet", "handmade"),
        "labels": {"pod-template-hash": "5d8f9c7b6"}}})))
    .unwrap();
    assert_eq!(bare.meta.owner_kind, "ReplicaSet");
    let sts = observe(&pod(json!({"metadata": {
        "ownerReferences": owner("StatefulSet", "db"),
        "labels": {"controller-revision-hash": "db-7f9"}}})))
    .unwrap();
    assert_eq!(
        (
            sts.meta.owner_kind.as_str(),
            sts.meta.owner_name.as_str(),
            sts.meta.pod_template_hash.as_str()
        ),
        ("StatefulSet", "db", "db-7f9")
    );
    let orphan = observe(&pod(json!({}))).unwrap();
    assert_eq!(orphan.meta, super::PodMeta::default());
}

#[test]
fn a_pod_exits_only_when_deleted_and_every_container_terminated() {
    let terminated = json!({"containerStatuses": [
        {"name": "a", "ready": false, "restartCount": 0, "image": "", "imageID": "",
         "state": {"terminated": {"exitCode": 0, "finishedAt": "2026-11-23T10:00:05Z"}}},
        {"name": "b", "ready": false, "restartCount": 0, "image": "", "imageID": "",
         "state": {"running": {}}}
    ]});
    let running_b = observe(&pod(json!({"status": terminated.clone(),
        "metadata": {"deletionTimestamp": "2026-11-23T10:00:00Z"}})))
    .unwrap();
    assert_eq!(running_b.exited_at, None);
    let mut both = terminated;
    both["containerStatuses"][1]["state"] =
        json!({"terminated": {"exitCode": 137, "finishedAt": "2026-11-23T10:00:30Z"}});
    let done = observe(&pod(json!({"status": both.clone(),
        "metadata": {"deletionTimestamp": "2026-11-23T10:00:00Z"}})))
    .unwrap();
    let at = done.exited_at.unwrap();
    assert_eq!(
        at.duration_since(done.deleting_since.unwrap())
            .unwrap()
            .as_secs(),
        30,
        "the last exit"
    );
    // A Job's finished pod that is not being deleted has not exited for the agent's purpose.
    assert_eq!(
        observe(&pod(json!({"status": both}))).unwrap().exited_at,
        None
    );
}

#[test]
fn the_window_opens_when_the_deletion_was_asked_for_not_when_its_grace_period_ends() {
    // `kubectl delete` at 10:00:00 with a 30 s grace period: the API server writes 10:00:30.
    let deleted = observe(&pod(json!({"metadata": {
        "deletionTimestamp": "2026-11-23T10:00:30Z",
        "deletionGracePeriodSeconds": 30}})))
    .unwrap();
    let asked: std::time::SystemTime = humantime::parse_rfc3339("2026-11-23T10:00:00Z").unwrap();
    assert_eq!(deleted.deleting_since, Some(asked));
    assert_eq!(
        deleted.grace_period,
        Some(std::time::Duration::from_secs(30))
    );
    // Without a grace period (a force delete), the timestamp is the request's time.
    let forced = observe(&pod(
        json!({"metadata": {"deletionTimestamp": "2026-11-23T10:00:00Z"}}),
    ))
    .unwrap();
    assert_eq!(forced.deleting_since, Some(asked));
}
