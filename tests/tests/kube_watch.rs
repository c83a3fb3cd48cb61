//! The `kubernetes` inventory source, with the real kube-rs client and watcher, against a local
//! server that answers in the API server's exact JSON (`draingate_tests::kube_api`): a list,
//! then a watch stream that deletes a pod step by step.

use std::{
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use draingate::inventory::{InventorySource, ObservedPod, kubernetes::KubernetesSource};
use draingate_tests::kube_api::{FakeKubeApi, pod};
use serde_json::{Value, json};

fn slice(ready: bool, terminating: bool) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-abcde",
            "namespace": "shop",
            "uid": "slice-1",
            "resourceVersion": "2001",
            "labels": {"kubernetes.io/service-name": "web"}
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.1.0.10"], "conditions": {"ready": ready, "serving": ready, "terminating": terminating},
             "nodeName": "node-a", "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-7c9d5b8f4-x2kqz", "uid": "uid-web-1"}},
            {"addresses": ["10.1.0.11"], "conditions": {"ready": true, "serving": true, "terminating": false},
             "nodeName": "node-a", "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-7c9d5b8f4-p8w2m", "uid": "uid-web-2"}}
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

fn snapshot_until(
    source: &mut KubernetesSource,
    what: &str,
    done: impl Fn(&[ObservedPod]) -> bool,
) -> Vec<ObservedPod> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pods = source.snapshot().expect("snapshot");
        if done(&pods) {
            return pods;
        }
        assert!(Instant::now() < deadline, "never saw {what}: {pods:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn find<'a>(pods: &'a [ObservedPod], uid: &str) -> Option<&'a ObservedPod> {
    pods.iter().find(|p| p.id.uid == uid)
}

#[test]
fn the_watcher_follows_a_pod_from_listing_to_deletion() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut host = pod("node-exporter-abcde", "uid-host-1", "10.0.0.5", None);
    host["spec"]["hostNetwork"] = json!(true);
    let hash = |rs, label, h| Some((rs, label, h));
    let listed = vec![
        pod(
            "web-7c9d5b8f4-x2kqz",
            "uid-web-1",
            "10.1.0.10",
            hash("web-7c9d5b8f4", "pod-template-hash", "7c9d5b8f4"),
        ),
        pod(
            "web-7c9d5b8f4-p8w2m",
            "uid-web-2",
            "10.1.0.11",
            hash("web-7c9d5b8f4", "pod-template-hash", "7c9d5b8f4"),
        ),
        pod(
            "cart-6b5f8d7c9-q4t7n",
            "uid-cart-1",
            "10.1.0.12",
            hash("cart-6b5f8d7c9", "rollouts-pod-template-hash", "6b5f8d7c9"),
        ),
        host,
    ];
    let (api, mut source) = runtime.block_on(async {
        let api = FakeKubeApi::start(listed, vec![slice(true, false)]).await;
        let config = kube::Config::new(format!("http://{}", api.addr).parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let source = KubernetesSource::start(&client, "node-a");
        (api, source)
    });

    // The list: three pods (the host-network one is left out), with owners and hashes.
    let pods = snapshot_until(&mut source, "the listed pods", |p| p.len() == 3);
    let web = find(&pods, "uid-web-1").unwrap();
    assert_eq!(
        (web.id.namespace.as_str(), web.id.name.as_str()),
        ("shop", "web-7c9d5b8f4-x2kqz")
    );
    assert_eq!(web.addresses, ["10.1.0.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        (
            web.meta.owner_kind.as_str(),
            web.meta.owner_name.as_str(),
            web.meta.pod_template_hash.as_str()
        ),
        ("Deployment", "web", "7c9d5b8f4")
    );
    assert_eq!(web.deleting_since, None);
    assert_eq!(web.grace_period, Some(Duration::from_secs(30)));
    let cart = find(&pods, "uid-cart-1").unwrap();
    assert_eq!(
        (cart.meta.owner_kind.as_str(), cart.meta.owner_name.as_str()),
        ("Rollout", "cart")
    );
    assert!(
        find(&pods, "uid-host-1").is_none(),
        "host-network pods are not watched"
    );
    assert_eq!(source.problem(), None);
    // Only this node's pods were asked for.
    let requests = api.requests();
    let pod_requests: Vec<_> = requests.iter().filter(|(p, _)| p == "pods").collect();
    assert!(!pod_requests.is_empty());
    for (_, query) in &pod_requests {
        assert_eq!(
            query.get("fieldSelector").map(String::as_str),
            Some("spec.nodeName=node-a")
        );
    }

    // Both web pods are ready endpoints of the Service.
    let pods = snapshot_until(&mut source, "the endpoints", |p| {
        find(p, "uid-web-1").is_some_and(|w| w.in_service)
    });
    assert!(
        !find(&pods, "uid-cart-1").unwrap().in_service,
        "in no Service"
    );

    // Deletion at 10:05:00 with a 30 s grace period: the API server writes the grace period's
    // end in deletionTimestamp; the termination window opens at the deletion.
    let mut deleting = pod(
        "web-7c9d5b8f4-x2kqz",
        "uid-web-1",
        "10.1.0.10",
        Some(("web-7c9d5b8f4", "pod-template-hash", "7c9d5b8f4")),
    );
    deleting["metadata"]["deletionTimestamp"] = json!("2026-11-23T10:05:30Z");
    deleting["metadata"]["deletionGracePeriodSeconds"] = json!(30);
    deleting["metadata"]["resourceVersion"] = json!("1002");
    api.pod_event("MODIFIED", &deleting);
    let pods = snapshot_until(&mut source, "the deletionTimestamp", |p| {
        find(p, "uid-web-1").is_some_and(|w| w.deleting_since.is_some())
    });
    let since = find(&pods, "uid-web-1").unwrap().deleting_since.unwrap();
    assert_eq!(
        since
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        1_795_428_300,
        "2026-11-23T10:05:00Z"
    );

    // The endpoints controller marks its endpoint terminating (ready false): it left the
    // Service; the other pod did not.
    api.slice_event("MODIFIED", &slice(false, true));
    let pods = snapshot_until(&mut source, "the endpoint removal", |p| {
        find(p, "uid-web-1").is_some_and(|w| w.left_endpoints.is_some())
    });
    assert!(!find(&pods, "uid-web-1").unwrap().in_service);
    let other = find(&pods, "uid-web-2").unwrap();
    assert_eq!((other.left_endpoints, other.in_service), (None, true));

    // Its container terminates: the exit, as seen without hostPID.
    let mut exited = deleting.clone();
    exited["metadata"]["resourceVersion"] = json!("1003");
    exited["status"]["containerStatuses"][0]["state"] = json!({"terminated": {
        "exitCode": 0, "reason": "Completed",
        "startedAt": "2026-11-23T10:00:01Z", "finishedAt": "2026-11-23T10:05:07Z",
        "containerID": "containerd://abc"
    }});
    api.pod_event("MODIFIED", &exited);
    let pods = snapshot_until(&mut source, "the exit", |p| {
        find(p, "uid-web-1").is_some_and(|w| w.exited_at.is_some())
    });
    let exited_at = find(&pods, "uid-web-1").unwrap().exited_at.unwrap();
    assert_eq!(
        exited_at.duration_since(since).unwrap(),
        Duration::from_secs(7)
    );

    // DELETED: the pod is gone from the inventory (the agent keeps its record and totals).
    api.pod_event("DELETED", &exited);
    snapshot_until(&mut source, "the deletion", |p| {
        find(p, "uid-web-1").is_none() && p.len() == 2
    });
    assert!(
        api.requests().iter().any(|(p, _)| p == "endpointslices.v1"),
        "a server that serves discovery.k8s.io/v1 is watched in v1"
    );
    drop(runtime);
}

/// An `EndpointSlice` as Kubernetes 1.17 to 1.20 serve it: `discovery.k8s.io/v1beta1`, each
/// endpoint's node a `topology` label instead of `nodeName`.
fn slice_v1beta1(ready: bool, terminating: bool) -> Value {
    let mut slice = slice(ready, terminating);
    slice["apiVersion"] = json!("discovery.k8s.io/v1beta1");
    for endpoint in slice["endpoints"].as_array_mut().unwrap() {
        let node = endpoint
            .as_object_mut()
            .unwrap()
            .remove("nodeName")
            .unwrap();
        endpoint["topology"] =
            json!({"kubernetes.io/hostname": node, "topology.kubernetes.io/zone": "a"});
    }
    slice
}

#[test]
fn a_server_with_endpoint_slices_in_v1beta1_only_is_followed_too() {
    let runtime = draingate_tests::kube_api::runtime();
    let web = |name, uid, ip| {
        pod(
            name,
            uid,
            ip,
            Some(("web-7c9d5b8f4", "pod-template-hash", "7c9d5b8f4")),
        )
    };
    let listed = vec![
        web("web-7c9d5b8f4-x2kqz", "uid-web-1", "10.1.0.10"),
        web("web-7c9d5b8f4-p8w2m", "uid-web-2", "10.1.0.11"),
    ];
    let (api, mut source) = runtime.block_on(async {
        let api =
            FakeKubeApi::start_serving(listed, vec![slice_v1beta1(true, false)], "v1beta1").await;
        let config = kube::Config::new(format!("http://{}", api.addr).parse().unwrap());
        let source = KubernetesSource::start(&kube::Client::try_from(config).unwrap(), "node-a");
        (api, source)
    });
    snapshot_until(&mut source, "both pods in the Service", |p| {
        p.len() == 2 && p.iter().all(|w| w.in_service)
    });
    api.slice_event("MODIFIED", &slice_v1beta1(false, true));
    let pods = snapshot_until(&mut source, "the endpoint removal", |p| {
        find(p, "uid-web-1").is_some_and(|w| w.left_endpoints.is_some())
    });
    let other = find(&pods, "uid-web-2").unwrap();
    assert_eq!((other.left_endpoints, other.in_service), (None, true));
    let paths: Vec<String> = api.requests().into_iter().map(|(p, _)| p).collect();
    assert!(
        paths.iter().any(|p| p == "apis") && paths.iter().any(|p| p == "endpointslices.v1beta1"),
        "asked which version is served, then watched v1beta1: {paths:?}"
    );
    drop(runtime);
}

#[test]
fn an_unreachable_api_server_is_a_readiness_problem_not_a_crash() {
    let runtime = draingate_tests::kube_api::runtime();
    let source = runtime.block_on(async {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
        KubernetesSource::start(&kube::Client::try_from(config).unwrap(), "node-a")
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let problem = source.problem();
        if let Some(problem) = &problem
            && problem.contains("node-a")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no problem reported: {problem:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(runtime);
}
