//! A local server that answers as the Kubernetes API server does, in its exact JSON, for the
//! requests the agent's `kubernetes` source makes: `GET /apis` (which versions it serves),
//! `GET /api/v1/pods` and `GET /apis/discovery.k8s.io/v1/endpointslices` (or `v1beta1`), each as a list (a `PodList` /
//! `EndpointSliceList`) and then as a watch (one `{"type":…,"object":…}` line per event). No API
//! server can run on this machine; the objects are written in the API's wire format, as
//! `kubectl get --raw` prints it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Body,
    extract::{Query, State},
    response::Response,
    routing::get,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

type Watch = Mutex<Option<mpsc::UnboundedReceiver<Value>>>;

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<(String, HashMap<String, String>)>>,
    pods: Vec<Value>,
    slices: Vec<Value>,
    pod_watch: Watch,
    slice_watch: Watch,
    /// The `discovery.k8s.io` version served: `v1`, or `v1beta1` as Kubernetes 1.20 does.
    slice_version: &'static str,
}

/// The running fake API server. Its first pod watch and first `EndpointSlice` watch stream what
/// is sent through [`FakeKubeApi::pod_event`] and [`FakeKubeApi::slice_event`]; later watches
/// stay open and silent.
pub struct FakeKubeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    pod_tx: mpsc::UnboundedSender<Value>,
    slice_tx: mpsc::UnboundedSender<Value>,
}

impl std::fmt::Debug for FakeKubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKubeApi")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeKubeApi {
    /// Serves `pods` and `slices` (list items, without kind) on a loopback port, on the current
    /// tokio runtime.
    pub async fn start(pods: Vec<Value>, slices: Vec<Value>) -> Self {
        Self::start_serving(pods, slices, "v1").await
    }

    /// As [`FakeKubeApi::start`], with `EndpointSlices` served as `discovery.k8s.io/<version>`
    /// only (`v1`, or `v1beta1` as Kubernetes 1.17 to 1.20), as `/apis` says.
    pub async fn start_serving(
        pods: Vec<Value>,
        slices: Vec<Value>,
        slice_version: &'static str,
    ) -> Self {
        let (pod_tx, pod_rx) = mpsc::unbounded_channel();
        let (slice_tx, slice_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            pods,
            slices,
            pod_watch: Mutex::new(Some(pod_rx)),
            slice_watch: Mutex::new(Some(slice_rx)),
            slice_version,
            ..Shared::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("address");
        let app = Router::new()
            .route("/api/v1/pods", get(pods_handler))
            .route("/apis", get(groups_handler))
            .route(
                &format!("/apis/discovery.k8s.io/{slice_version}/endpointslices"),
                get(slices_handler),
            )
            .with_state(Arc::clone(&shared));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            addr,
            shared,
            pod_tx,
            slice_tx,
        }
    }

    /// Streams a pod watch event: `kind` is ADDED, MODIFIED or DELETED.
    pub fn pod_event(&self, kind: &str, pod: &Value) {
        let mut object = pod.clone();
        object["kind"] = json!("Pod");
        object["apiVersion"] = json!("v1");
        let _ = self.pod_tx.send(json!({"type": kind, "object": object}));
    }

    /// Streams an `EndpointSlice` watch event.
    pub fn slice_event(&self, kind: &str, slice: &Value) {
        let _ = self.slice_tx.send(json!({"type": kind, "object": slice}));
    }

    /// Every request so far: path (`apis`, `pods` or `endpointslices.<version>`) and query.
    #[must_use]
    pub fn requests(&self) -> Vec<(String, HashMap<String, String>)> {
        self.shared.requests.lock().expect("requests").clone()
    }

    /// A kubeconfig file in `dir` that points a client at this server.
    #[must_use]
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n\
             users:\n- name: fake\n  user: {{}}\n",
            self.addr
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }
}

async fn pods_handler(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let list = json!({
        "kind": "PodList", "apiVersion": "v1",
        "metadata": {"resourceVersion": "1001"},
        "items": shared.pods,
    });
    answer(&shared, "pods", query, &list, &shared.pod_watch)
}

/// The API group list (`kubectl get --raw /apis`), with the one `discovery.k8s.io` version.
async fn groups_handler(State(shared): State<Arc<Shared>>) -> Response {
    let version = json!({
        "groupVersion": format!("discovery.k8s.io/{}", shared.slice_version),
        "version": shared.slice_version,
    });
    let list = json!({
        "kind": "APIGroupList", "apiVersion": "v1",
        "groups": [
            {"name": "apps", "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
             "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"}},
            {"name": "discovery.k8s.io", "versions": [version], "preferredVersion": version}
        ]
    });
    shared
        .requests
        .lock()
        .expect("requests")
        .push(("apis".to_owned(), HashMap::new()));
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(list.to_string()))
        .expect("response")
}

async fn slices_handler(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let list = json!({
        "kind": "EndpointSliceList",
        "apiVersion": format!("discovery.k8s.io/{}", shared.slice_version),
        "metadata": {"resourceVersion": "2001"},
        "items": shared.slices,
    });
    let path = format!("endpointslices.{}", shared.slice_version);
    answer(&shared, &path, query, &list, &shared.slice_watch)
}

fn answer(
    shared: &Shared,
    path: &str,
    query: HashMap<String, String>,
    list: &Value,
    watch: &Watch,
) -> Response {
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    shared
        .requests
        .lock()
        .expect("requests")
        .push((path.to_owned(), query));
    let body = if watching {
        let receiver = watch.lock().expect("watch").take();
        let (tx, rx) = mpsc::unbounded_channel::<Result<String, std::io::Error>>();
        tokio::spawn(async move {
            if let Some(mut receiver) = receiver {
                while let Some(event) = receiver.recv().await {
                    if tx.send(Ok(format!("{event}\n"))).is_err() {
                        return;
                    }
                }
            }
            // Open until the client goes.
            tx.closed().await;
        });
        Body::from_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
    } else {
        Body::from(list.to_string())
    };
    Response::builder()
        .header("content-type", "application/json")
        .body(body)
        .expect("response")
}

/// A runtime for a [`FakeKubeApi`] to serve on while the test itself blocks (one worker).
#[must_use]
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A running pod of node `node-a` in namespace `shop`, as the API lists it; `owner` is its
/// controlling ReplicaSet with the hash label name and value.
#[must_use]
pub fn pod(name: &str, uid: &str, ip: &str, owner: Option<(&str, &str, &str)>) -> Value {
    let mut labels = json!({"app": "web"});
    let mut owners = json!([]);
    if let Some((rs, hash_label, hash)) = owner {
        labels[hash_label] = json!(hash);
        owners = json!([{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
            "uid": format!("rs-{uid}"), "controller": true, "blockOwnerDeletion": true
        }]);
    }
    json!({
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": uid,
            "resourceVersion": "1001",
            "creationTimestamp": "2026-11-23T10:00:00Z",
            "labels": labels,
            "ownerReferences": owners
        },
        "spec": {
            "nodeName": "node-a",
            "containers": [{"name": "web", "image": "registry.example/web:1",
                            "ports": [{"containerPort": 8080, "protocol": "TCP"}]}],
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
