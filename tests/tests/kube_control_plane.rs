//! The real control plane the readiness-gate tests run against (`draingate_tests::kube_cluster`):
//! etcd, kube-apiserver and kube-controller-manager v1.20.2 from `cargo xtask kube`. No kernel
//! features and no root: three processes on loopback ports.

use std::time::{Duration, Instant};

use draingate_tests::kube_cluster::{KUBE_VERSION, KubeCluster};
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::{Namespace, Pod},
};
use kube::{
    Api, Config,
    api::{ListParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;

const NAMESPACE: &str = "shop";
const NODE: &str = "node-a";

/// Polls `check` every 100 ms until it returns `Some`, panicking with `what` after `limit`.
async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not within {}s",
            limit.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_gets_its_replica_set_and_pods_from_the_real_controller_manager() {
    let cluster = KubeCluster::start();
    let client = cluster.client();

    let version = client.apiserver_version().await.expect("GET /version");
    assert_eq!(version.git_version, KUBE_VERSION, "/version: {version:?}");
    // The kubeconfig other processes get (`--kubeconfig`, `KUBECONFIG`) reaches the same server.
    let kubeconfig = Kubeconfig::read_from(cluster.kubeconfig_path()).expect("read the kubeconfig");
    let from_file = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a config from the kubeconfig");
    let version = kube::Client::try_from(from_file)
        .expect("a client from the kubeconfig")
        .apiserver_version()
        .await
        .expect("GET /version with the kubeconfig");
    assert_eq!(version.git_version, KUBE_VERSION);

    cluster.create_node(NODE);
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).expect("a Namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create the namespace");
    // No scheduler: the pods name their node themselves.
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "nodeName": NODE,
                    "containers": [{"name": "web", "image": "example/web:1",
                                    "ports": [{"containerPort": 8080}]}]
                }
            }
        }
    }))
    .expect("a Deployment");
    Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create the deployment");

    let limit = Duration::from_secs(30);
    let replica_sets = Api::<ReplicaSet>::namespaced(client.clone(), NAMESPACE);
    let replica_set = eventually(
        "the deployment controller creates a ReplicaSet",
        limit,
        || {
            let replica_sets = replica_sets.clone();
            async move {
                let list = replica_sets.list(&ListParams::default()).await.ok()?;
                list.items.into_iter().next()
            }
        },
    )
    .await;
    let owner = replica_set
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default();
    assert!(
        owner
            .iter()
            .any(|o| o.kind == "Deployment" && o.name == "web"),
        "the ReplicaSet is owned by the Deployment: {owner:?}"
    );
    assert_eq!(replica_set.spec.replicas, Some(2));

    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let made = eventually("the replicaset controller creates 2 pods", limit, || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default()).await.ok()?;
            (list.items.len() == 2).then_some(list.items)
        }
    })
    .await;
    let replica_set_name = replica_set.metadata.name.as_deref();
    for pod in &made {
        let spec = pod.spec.as_ref().expect("a pod spec");
        assert_eq!(spec.node_name.as_deref(), Some(NODE));
        let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
        assert!(
            owners
                .iter()
                .any(|o| o.kind == "ReplicaSet" && Some(o.name.as_str()) == replica_set_name),
            "pod {:?} is owned by the ReplicaSet: {owners:?}",
            pod.metadata.name
        );
    }
}
