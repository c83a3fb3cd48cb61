//! The `kubernetes` inventory source against a local server that answers as the API server does,
//! in its exact JSON: a PodList and an EndpointSliceList for the list requests, then a watch
//! stream (`{"type":"MODIFIED","object":{…}}` lines) that deletes a pod step by step. The client
//! is the real kube-rs client and watcher; no API server can run on this machine, so the
//! responses are written here in the API's wire format (as `kubectl get --raw` prints it).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Router,
    body::Body,
    extract::{Query, State},
    response::Response,
    routing::get,
};
use draingate::inventory::{InventorySource, ObservedPod, kubernetes::KubernetesSource};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// What the fake API server serves and saw.
#[derive(Default)]
struct Api {
    /// Query strings of every request, by path.
    requests: Mutex<Vec<(String, HashMap<String, String>)>>,
    /// The first watch of pods streams what the test sends here; later watches stay silent.
    pod_watch: Mutex<Option<mpsc::UnboundedReceiver<Value>>>,
    slice_watch: Mutex<Option<mpsc::UnboundedReceiver<Value>>>,
}

fn pod(name: &str, uid: &str, ip: &str, owner_rs: Option<(&str, &str, &str)>) -> Value {
    let mut labels = json!({"app": "web"});
    let mut owners = json!([]);
    if let Some((rs, hash_label, hash)) = owner_rs {
        labels[hash_label] = json!(hash);
        owners = json!([{
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "name": rs,
            "uid": format!("rs-{uid}"),
            "controller": true,
            "blockOwnerDeletion": true
        }]);
    }
    json!({
        "metadata": {
            "name": name,
            "generateName": format!("{}-", name.rsplit_once('-').map_or(name, |(a, _)| a)),
            "namespace": "shop",
            "uid": uid,
            "resourceVersion": "1001",
            "creationTimestamp": "2026-11-23T10:00:00Z",
            "labels": labels,
            "ownerReferences": owners
        },
        "spec": {
            "nodeName": "node-a",
            "containers": [{"name": "web", "image": "registry.example/web:1", "ports": [{"containerPort": 8080, "protocol": "TCP"}]}],
            "terminationGracePeriodSeconds": 30,
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst"
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "10.0.0.5",
            "containerStatuses": [{
                "name": "web", "ready": true, "restartCount": 0,
                "image": "registry.example/web:1", "imageID": "", "containerID": "containerd://abc",
                "started": true,
                "state": {"running": {"startedAt": "2026-11-23T10:00:01Z"}}
            }]
        }
    })
}

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

async fn list_or_watch(
    api: &Api,
    path: &str,
    query: HashMap<String, String>,
    list: Value,
    watch: &Mutex<Option<mpsc::UnboundedReceiver<Value>>>,
) -> Response {
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    api.requests.lock().unwrap().push((path.to_owned(), query));
    if !watching {
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(list.to_string()))
            .unwrap();
    }
    let receiver = watch.lock().unwrap().take();
    let stream = async_stream(receiver);
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// The watch body: one JSON event per line as the test sends them; silent (but open) when this
/// is not the first watch.
fn async_stream(
    receiver: Option<mpsc::UnboundedReceiver<Value>>,
) -> impl tokio_stream::Stream<Item = Result<String, std::io::Error>> {
    let (tx, rx) = mpsc::unbounded_channel::<Result<String, std::io::Error>>();
    tokio::spawn(async move {
        if let Some(mut receiver) = receiver {
            while let Some(event) = receiver.recv().await {
                if tx.send(Ok(format!("{event}\n"))).is_err() {
                    return;
                }
            }
        }
        // Hold the stream open until the client goes.
        tx.closed().await;
    });
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
}

async fn pods(State(api): State<Arc<Api>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let mut host = pod("node-exporter-abcde", "uid-host-1", "10.0.0.5", None);
    host["spec"]["hostNetwork"] = json!(true);
    let list = json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "1001"},
        "items": [
            pod("web-7c9d5b8f4-x2kqz", "uid-web-1", "10.1.0.10", Some(("web-7c9d5b8f4", "pod-template-hash", "7c9d5b8f4"))),
            pod("web-7c9d5b8f4-p8w2m", "uid-web-2", "10.1.0.11", Some(("web-7c9d5b8f4", "pod-template-hash", "7c9d5b8f4"))),
            pod("cart-6b5f8d7c9-q4t7n", "uid-cart-1", "10.1.0.12", Some(("cart-6b5f8d7c9", "rollouts-pod-template-hash", "6b5f8d7c9"))),
            host
        ]
    });
    list_or_watch(&api, "pods", q, list, &api.pod_watch).await
}

async fn slices(State(api): State<Arc<Api>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let list = json!({
        "kind": "EndpointSliceList",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"resourceVersion": "2001"},
        "items": [slice(true, false)]
    });
    list_or_watch(&api, "endpointslices", q, list, &api.slice_watch).await
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
    let (pod_tx, pod_rx) = mpsc::unbounded_channel();
    let (slice_tx, slice_rx) = mpsc::unbounded_channel();
    let api = Arc::new(Api {
        pod_watch: Mutex::new(Some(pod_rx)),
        slice_watch: Mutex::new(Some(slice_rx)),
        ..Api::default()
    });
    let mut source = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/api/v1/pods", get(pods))
            .route("/apis/discovery.k8s.io/v1/endpointslices", get(slices))
            .with_state(Arc::clone(&api));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        KubernetesSource::start(&client, "node-a")
    });

    // The list: three pods (the host-network one is left out), with owners and hashes.
    let pods = snapshot_until(&mut source, "the listed pods", |p| p.len() == 3);
    let web = find(&pods, "uid-web-1").unwrap();
    assert_eq!(
        (web.id.namespace.as_str(), web.id.name.as_str()),
        ("shop", "web-7c9d5b8f4-x2kqz")
    );
    assert_eq!(
        web.addresses,
        ["10.1.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        (
            web.meta.owner_kind.as_str(),
            web.meta.owner_name.as_str(),
            web.meta.pod_template_hash.as_str()
        ),
        ("Deployment", "web", "7c9d5b8f4")
    );
    assert_eq!(web.deleting_since, None);
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
    let requests = api.requests.lock().unwrap().clone();
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

    // Deletion: the API sets deletionTimestamp; the termination window opens there.
    let mut deleting = pod(
        "web-7c9d5b8f4-x2kqz",
        "uid-web-1",
        "10.1.0.10",
        Some(("web-7c9d5b8f4", "pod-template-hash", "7c9d5b8f4")),
    );
    deleting["metadata"]["deletionTimestamp"] = json!("2026-11-23T10:05:00Z");
    deleting["metadata"]["deletionGracePeriodSeconds"] = json!(30);
    deleting["metadata"]["resourceVersion"] = json!("1002");
    pod_tx
        .send(json!({"type": "MODIFIED", "object": with_kind(&deleting)}))
        .unwrap();
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
    slice_tx
        .send(json!({"type": "MODIFIED", "object": slice(false, true)}))
        .unwrap();
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
    pod_tx
        .send(json!({"type": "MODIFIED", "object": with_kind(&exited)}))
        .unwrap();
    let pods = snapshot_until(&mut source, "the exit", |p| {
        find(p, "uid-web-1").is_some_and(|w| w.exited_at.is_some())
    });
    let exited_at = find(&pods, "uid-web-1").unwrap().exited_at.unwrap();
    assert_eq!(
        exited_at.duration_since(since).unwrap(),
        Duration::from_secs(7)
    );

    // DELETED: the pod is gone from the inventory (the agent keeps its record and totals).
    pod_tx
        .send(json!({"type": "DELETED", "object": with_kind(&exited)}))
        .unwrap();
    snapshot_until(&mut source, "the deletion", |p| {
        find(p, "uid-web-1").is_none() && p.len() == 2
    });
    drop(runtime);
}

fn with_kind(pod: &Value) -> Value {
    let mut pod = pod.clone();
    pod["kind"] = json!("Pod");
    pod["apiVersion"] = json!("v1");
    pod
}

#[test]
fn an_unreachable_api_server_is_a_readiness_problem_not_a_crash() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
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
