//! The `kubernetes` source: a kube-rs watch of the pods bound to this node (field selector
//! `spec.nodeName`), and of the `EndpointSlices` that route to them.
//!
//! - Each pod gives its namespace, name, uid, IPs (`status.podIPs`), owner (its controlling
//!   `ReplicaSet`'s Deployment, or Argo Rollout, named from the `ReplicaSet`'s name and the pod's
//!   `pod-template-hash` / `rollouts-pod-template-hash` label, so no read access to `ReplicaSets` is
//!   needed), its deletion (deletionTimestamp less the grace period: it opens the termination window) and whether all its
//!   containers terminated (its exit, as seen without hostPID).
//! - `EndpointSlices` say when a pod stopped taking new connections from its Services: the first
//!   time one of its endpoints is no longer `ready` (terminating endpoints stay listed with
//!   `ready: false`), or is removed, after it had been ready.
//!   The agent watches `discovery.k8s.io/v1` where the server serves it (Kubernetes 1.21 and
//!   later) and `v1beta1` otherwise (1.17 to 1.20), asking the server's API group list once.
//! - Pods on the host network are left out: their address is the node's.
//!
//! The watches retry with backoff when the API server is unreachable; meanwhile the last known
//! pods stay, the kernel keeps counting, and [`KubeStatus`] says what is wrong (for /readyz and
//! the logs).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use k8s_openapi::{
    api::{core::v1::Pod, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio_stream::StreamExt as _;

use super::{InventoryError, InventorySource, ObservedPod, PodId, PodMeta};

/// How the API connection is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeStatus {
    /// The pod list was read at least once.
    pub synced: bool,
    /// The last watch request failed and is being retried.
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    pods: BTreeMap<String, ObservedPod>,
    /// Pods being listed again after a (re)connect; they replace `pods` at the list's end.
    relisting: Option<BTreeMap<String, ObservedPod>>,
    /// Pods (by uid) with a ready endpoint in some `EndpointSlice` now, by slice.
    ready_in: HashMap<String, HashSet<String>>,
    /// When each pod left its Services' endpoints.
    left_endpoints: HashMap<String, SystemTime>,
    /// Pods the API server deleted since the last snapshot, as deleted and exited: a pod that
    /// was deleted and gone between two snapshots (a fast exit, a force delete) still has its
    /// termination seen once, its window opened at its deletion, not only its disappearance.
    departed: BTreeMap<String, ObservedPod>,
    status: KubeStatus,
}

/// Most departed pods kept between two snapshots (a snapshot is taken every second).
const MAX_DEPARTED: usize = 4096;

/// `pod` as it left the API server at `now`: deleted (when it was asked for, or now) and
/// exited (its containers' end, or now).
fn departed(pod: &Pod, now: SystemTime) -> Option<ObservedPod> {
    let mut observed = observe(pod)?;
    let deleting = *observed.deleting_since.get_or_insert(now);
    observed.exited_at = Some(observed.exited_at.unwrap_or(now).max(deleting));
    Some(observed)
}

/// The pods of this node as the API server describes them.
#[derive(Debug, Clone)]
pub struct KubernetesSource {
    shared: Arc<Mutex<Shared>>,
}

impl KubernetesSource {
    /// Starts watching the pods bound to `node`, and the `EndpointSlices`, through `client`.
    #[must_use]
    pub fn start(client: &Client, node: &str) -> Self {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let pods: Api<Pod> = Api::all(client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let pod_shared = Arc::clone(&shared);
        let node_name = node.to_owned();
        tokio::spawn(async move {
            let mut stream = Box::pin(watcher(pods, config).default_backoff());
            while let Some(event) = stream.next().await {
                let mut shared = lock(&pod_shared);
                match event {
                    Ok(event) => {
                        shared.status.error = None;
                        apply_pod_event(&mut shared, event);
                    }
                    Err(err) => {
                        let message = format!("watching the pods of node {node_name}: {err}");
                        if shared.status.error.as_deref() != Some(message.as_str()) {
                            tracing::warn!(error = %message, "Kubernetes API unreachable; retrying with backoff, the kernel keeps counting");
                        }
                        shared.status.error = Some(message);
                    }
                }
            }
        });
        let slice_shared = Arc::clone(&shared);
        let slice_client = client.clone();
        let slice_node = node.to_owned();
        tokio::spawn(async move {
            let version = slice_version(&slice_client).await;
            tracing::info!(
                version = version.api_version(),
                "watching EndpointSlices (when pods leave their Services)"
            );
            match version {
                SliceVersion::V1 => {
                    let api: Api<EndpointSlice> = Api::all(slice_client);
                    watch_slices(api, Some, &slice_shared, &slice_node).await;
                }
                SliceVersion::V1beta1 => {
                    let api: Api<DynamicObject> =
                        Api::all_with(slice_client, &SliceVersion::V1beta1.resource());
                    watch_slices(api, from_v1beta1, &slice_shared, &slice_node).await;
                }
            }
        });
        Self { shared }
    }

    /// How the API connection is doing.
    #[must_use]
    pub fn status(&self) -> KubeStatus {
        lock(&self.shared).status.clone()
    }
}

/// The `EndpointSlice` API version a server serves: `discovery.k8s.io/v1` since Kubernetes
/// 1.21, only `v1beta1` before (1.17 to 1.20). The agent watches `v1` when the server has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceVersion {
    V1,
    V1beta1,
}

impl SliceVersion {
    /// Its `apiVersion`.
    #[must_use]
    pub fn api_version(self) -> &'static str {
        match self {
            Self::V1 => "discovery.k8s.io/v1",
            Self::V1beta1 => "discovery.k8s.io/v1beta1",
        }
    }

    /// The newest version of `discovery.k8s.io` this agent reads, of those a server lists in
    /// its API group list; `None` when it lists neither.
    #[must_use]
    pub fn newest_of<'a>(served: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let served: Vec<&str> = served.into_iter().collect();
        [Self::V1, Self::V1beta1]
            .into_iter()
            .find(|v| served.contains(&v.api_version()))
    }

    fn resource(self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(
                "discovery.k8s.io",
                self.api_version().trim_start_matches("discovery.k8s.io/"),
                "EndpointSlice",
            ),
            "endpointslices",
        )
    }
}

/// Asks the server which `EndpointSlice` version it serves, retrying (1 s doubling to 30 s)
/// while it cannot be asked. A server that lists neither gets `v1`, whose watch then says why
/// in the logs.
async fn slice_version(client: &Client) -> SliceVersion {
    let mut delay = std::time::Duration::from_secs(1);
    loop {
        match client.list_api_groups().await {
            Ok(groups) => {
                let served = groups
                    .groups
                    .iter()
                    .filter(|g| g.name == "discovery.k8s.io")
                    .flat_map(|g| g.versions.iter().map(|v| v.group_version.as_str()));
                return SliceVersion::newest_of(served).unwrap_or(SliceVersion::V1);
            }
            Err(err) => {
                tracing::debug!(error = %crate::telemetry::chain(&err), "listing API groups for EndpointSlices; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(30));
            }
        }
    }
}

/// Follows the `EndpointSlices` of `api`, each turned into a `v1` one by `convert`, until the
/// watch ends (never, with backoff).
async fn watch_slices<K>(
    api: Api<K>,
    convert: fn(K) -> Option<EndpointSlice>,
    shared: &Mutex<Shared>,
    node: &str,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut stream = Box::pin(watcher(api, watcher::Config::default()).default_backoff());
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                tracing::debug!(error = %crate::telemetry::chain(&err), "watching EndpointSlices; retrying");
                continue;
            }
        };
        let event = match event {
            watcher::Event::Init => watcher::Event::Init,
            watcher::Event::InitDone => watcher::Event::InitDone,
            watcher::Event::InitApply(o) => match convert(o) {
                Some(s) => watcher::Event::InitApply(s),
                None => continue,
            },
            watcher::Event::Apply(o) => match convert(o) {
                Some(s) => watcher::Event::Apply(s),
                None => continue,
            },
            watcher::Event::Delete(o) => match convert(o) {
                Some(s) => watcher::Event::Delete(s),
                None => continue,
            },
        };
        apply_slice_event(&mut lock(shared), node, event, SystemTime::now());
    }
}

/// A `discovery.k8s.io/v1beta1` `EndpointSlice` as the `v1` one it reads the same as: the
/// fields the agent uses (`addresses`, `conditions.ready`, `targetRef`) kept their meaning; an
/// endpoint's node, a `topology` label in `v1beta1` (`kubernetes.io/hostname`), becomes
/// `nodeName` where it has none. `None` for an object that is no `EndpointSlice` at all.
#[must_use]
pub fn from_v1beta1(object: DynamicObject) -> Option<EndpointSlice> {
    let mut value = serde_json::to_value(object).ok()?;
    value["apiVersion"] = "discovery.k8s.io/v1".into();
    value["kind"] = "EndpointSlice".into();
    if let Some(endpoints) = value
        .get_mut("endpoints")
        .and_then(serde_json::Value::as_array_mut)
    {
        for fields in endpoints
            .iter_mut()
            .filter_map(serde_json::Value::as_object_mut)
        {
            let host = fields.remove("topology").and_then(|mut t| {
                t.get_mut("kubernetes.io/hostname")
                    .map(serde_json::Value::take)
            });
            if let Some(host) = host {
                fields.entry("nodeName").or_insert(host);
            }
        }
    }
    serde_json::from_value(value)
        .inspect_err(|err| tracing::debug!(error = %crate::telemetry::chain(err), "an EndpointSlice (v1beta1) not read"))
        .ok()
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn apply_pod_event(shared: &mut Shared, event: watcher::Event<Pod>) {
    match event {
        watcher::Event::Init => shared.relisting = Some(BTreeMap::new()),
        watcher::Event::InitApply(pod) => {
            if let Some(observed) = observe(&pod) {
                shared
                    .relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(observed.id.uid.clone(), observed);
            }
        }
        watcher::Event::InitDone => {
            if let Some(listed) = shared.relisting.take() {
                shared.pods = listed;
            }
            shared.status.synced = true;
        }
        watcher::Event::Apply(pod) => match observe(&pod) {
            Some(observed) => {
                shared.pods.insert(observed.id.uid.clone(), observed);
            }
            None => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    shared.pods.remove(uid);
                }
            }
        },
        watcher::Event::Delete(pod) => {
            if let Some(uid) = pod.metadata.uid.as_deref() {
                shared.pods.remove(uid);
            }
            if shared.departed.len() < MAX_DEPARTED
                && let Some(observed) = departed(&pod, SystemTime::now())
            {
                shared.departed.insert(observed.id.uid.clone(), observed);
            }
        }
    }
}

/// Records, per pod of `node`, when its last ready endpoint went away. Endpoints of other
/// nodes are left out, so the state stays the size of this node's pods, not the cluster's.
fn apply_slice_event(
    shared: &mut Shared,
    node: &str,
    event: watcher::Event<EndpointSlice>,
    now: SystemTime,
) {
    let (slice, deleted) = match event {
        watcher::Event::Apply(s) | watcher::Event::InitApply(s) => (s, false),
        watcher::Event::Delete(s) => (s, true),
        watcher::Event::Init | watcher::Event::InitDone => return,
    };
    let key = format!(
        "{}/{}",
        slice.metadata.namespace.as_deref().unwrap_or_default(),
        slice.metadata.name.as_deref().unwrap_or_default()
    );
    let ready_now: HashSet<String> = if deleted {
        HashSet::new()
    } else {
        slice
            .endpoints
            .iter()
            .flatten()
            .filter(|e| e.node_name.as_deref().is_none_or(|n| n == node))
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .filter_map(|e| e.target_ref.as_ref())
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .filter_map(|r| r.uid.clone())
            .collect()
    };
    for (uid, slices) in &mut shared.ready_in {
        if slices.contains(&key) && !ready_now.contains(uid) {
            slices.remove(&key);
            if slices.is_empty() {
                shared.left_endpoints.entry(uid.clone()).or_insert(now);
            }
        }
    }
    for uid in ready_now {
        shared
            .ready_in
            .entry(uid.clone())
            .or_default()
            .insert(key.clone());
        // Ready again (a pod that was not terminating after all): it has not left.
        shared.left_endpoints.remove(&uid);
    }
    // Forget pods that neither exist nor have endpoints any more.
    let pods = &shared.pods;
    shared
        .ready_in
        .retain(|uid, slices| !slices.is_empty() || pods.contains_key(uid));
    if shared.left_endpoints.len() > 4 * pods.len() + 1024 {
        shared
            .left_endpoints
            .retain(|uid, _| pods.contains_key(uid));
    }
}

/// The pod as the agent tracks it, or `None` for a pod it does not (host network).
#[must_use]
pub fn observe(pod: &Pod) -> Option<ObservedPod> {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return None;
    }
    let meta = &pod.metadata;
    let status = pod.status.as_ref();
    let mut addresses: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect())
        .unwrap_or_default();
    if addresses.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
    {
        addresses.push(ip);
    }
    addresses.sort_unstable();
    addresses.dedup();
    let statuses = status
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
    let exited_at = if !statuses.is_empty()
        && statuses
            .iter()
            .all(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()))
        && meta.deletion_timestamp.is_some()
    {
        statuses
            .iter()
            .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
            .map(|t| SystemTime::from(t.0))
            .max()
            .or_else(|| Some(SystemTime::now()))
    } else {
        None
    };
    Some(ObservedPod {
        id: PodId {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone()?,
        },
        addresses,
        pids: Vec::new(),
        deleting_since: deletion_requested(meta),
        meta: owner(pod),
        exited_at,
        left_endpoints: None,
        in_service: false,
        ready_since: None,
        grace_period: meta
            .deletion_grace_period_seconds
            .or_else(|| spec.and_then(|s| s.termination_grace_period_seconds))
            .and_then(|s| u64::try_from(s).ok())
            .map(std::time::Duration::from_secs),
        netns: None,
    })
}

/// When the pod's deletion was asked for: its `deletionTimestamp` is not that, but the time the
/// grace period ends (the API server sets it to the request's time plus
/// `deletionGracePeriodSeconds`), so the window opens that many seconds before it. Both are in
/// whole seconds: the window may open up to a second early, never late.
fn deletion_requested(meta: &ObjectMeta) -> Option<SystemTime> {
    let ends = SystemTime::from(meta.deletion_timestamp.as_ref()?.0);
    let grace = meta
        .deletion_grace_period_seconds
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(0);
    Some(
        ends.checked_sub(std::time::Duration::from_secs(grace))
            .unwrap_or(ends),
    )
}

/// The pod's top owner and template hash.
fn owner(pod: &Pod) -> PodMeta {
    let labels = pod.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).cloned();
    let Some(controller) = pod
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|r| r.controller == Some(true))
    else {
        return PodMeta::default();
    };
    if controller.kind == "ReplicaSet" {
        // Argo Rollouts labels its pods with its own hash label.
        let (kind, hash) = match (
            label("rollouts-pod-template-hash"),
            label("pod-template-hash"),
        ) {
            (Some(hash), _) => ("Rollout", hash),
            (None, Some(hash)) => ("Deployment", hash),
            (None, None) => {
                return PodMeta {
                    owner_kind: "ReplicaSet".into(),
                    owner_name: controller.name.clone(),
                    pod_template_hash: String::new(),
                };
            }
        };
        // A Deployment's (or Rollout's) `ReplicaSet` is named `<owner>-<hash>`.
        if let Some(name) = controller.name.strip_suffix(&format!("-{hash}")) {
            return PodMeta {
                owner_kind: kind.into(),
                owner_name: name.into(),
                pod_template_hash: hash,
            };
        }
        return PodMeta {
            owner_kind: "ReplicaSet".into(),
            owner_name: controller.name.clone(),
            pod_template_hash: hash,
        };
    }
    PodMeta {
        owner_kind: controller.kind.clone(),
        owner_name: controller.name.clone(),
        pod_template_hash: label("controller-revision-hash").unwrap_or_default(),
    }
}

impl InventorySource for KubernetesSource {
    fn problem(&self) -> Option<String> {
        let status = self.status();
        match (status.synced, status.error) {
            (_, Some(error)) => Some(error),
            (false, None) => Some("the pods of this node were not listed yet".into()),
            (true, None) => None,
        }
    }

    fn snapshot(&mut self) -> Result<Vec<ObservedPod>, InventoryError> {
        let mut shared = lock(&self.shared);
        let departed = std::mem::take(&mut shared.departed);
        Ok(shared
            .pods
            .values()
            .chain(
                departed
                    .values()
                    .filter(|p| !shared.pods.contains_key(&p.id.uid)),
            )
            .map(|pod| ObservedPod {
                left_endpoints: shared.left_endpoints.get(&pod.id.uid).copied(),
                in_service: shared
                    .ready_in
                    .get(&pod.id.uid)
                    .is_some_and(|slices| !slices.is_empty()),
                ..pod.clone()
            })
            .collect())
    }
}

#[cfg(test)]
mod tests;
