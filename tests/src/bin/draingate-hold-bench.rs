//! `cargo xtask bench --only hold`: how soon the readiness gate releases a held pod once the
//! last old pod it waits for has passed.
//!
//! Real parts: kube-apiserver and kube-controller-manager 1.20 (`cargo xtask kube`), the
//! Deployment controller driving rolling updates (`maxSurge: 1, maxUnavailable: 0`), and the
//! real `draingate gate serve --hold`. Simulated: the node. This process is the kubelet (a pod
//! is Running at once, Ready when its readiness gates are `True`; a deleted pod is removed once
//! its agent said pass) and the agent (a tonic server answering `ListPods` with the terminating
//! pods, each `pending` until a random moment, then `pass`: that moment is when the verdict
//! became pass, known exactly).
//!
//! Measured per old pod: from its verdict turning pass to this process seeing the condition of
//! the new pod that waited for it `True` (polled every 10 ms). Side by side, the baseline: the
//! API server's own round trip, this process patching a pod's status and polling until it sees
//! it, at the same moments. Target: every release within 1 s.
use std::{
    collections::HashMap,
    fmt::Write as _,
    path::PathBuf,
    pin::Pin,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use clap::Parser;
use draingate_proto::v1::{
    self as pb,
    agent_server::{Agent, AgentServer},
};
use draingate_tests::{ChildGuard, draingate_bin, free_port, kube_cluster::KubeCluster};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

const CONDITION: &str = "draingate.io/predecessors-drained";
const NAMESPACE: &str = "bench";

/// Measures the readiness gate's release latency.
#[derive(Debug, Parser)]
struct Args {
    /// Replicas of the Deployment: each rollout releases replicas - 1 pods after predecessors.
    #[arg(long, default_value_t = 6)]
    replicas: i32,
    /// Rolling updates.
    #[arg(long, default_value_t = 5)]
    rollouts: usize,
    /// The gate's `--hold-interval` (its default when not given).
    #[arg(long)]
    hold_interval: Option<String>,
    /// Where to write the Markdown section.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The node's agent: the pods it reports (terminating and exited ones).
#[derive(Debug, Clone, Default)]
struct SimAgent {
    pods: Arc<Mutex<HashMap<String, pb::Pod>>>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Agent for SimAgent {
    async fn list_pods(
        &self,
        _: Request<pb::ListPodsRequest>,
    ) -> Result<Response<pb::ListPodsResponse>, Status> {
        let pods = self
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        Ok(Response::new(pb::ListPodsResponse {
            pods,
            node: "node-a".into(),
            ..pb::ListPodsResponse::default()
        }))
    }

    async fn get_pod(&self, _: Request<pb::GetPodRequest>) -> Result<Response<pb::Pod>, Status> {
        Err(Status::unimplemented("not simulated"))
    }

    type WatchPodsStream = BoxStream<pb::PodUpdate>;

    async fn watch_pods(
        &self,
        _: Request<pb::WatchPodsRequest>,
    ) -> Result<Response<Self::WatchPodsStream>, Status> {
        Err(Status::unimplemented("not simulated"))
    }

    type StreamEventsStream = BoxStream<pb::Event>;

    async fn stream_events(
        &self,
        _: Request<pb::StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        Err(Status::unimplemented("not simulated"))
    }

    async fn wait_drained(
        &self,
        _: Request<pb::WaitDrainedRequest>,
    ) -> Result<Response<pb::WaitDrainedResponse>, Status> {
        Err(Status::unimplemented("not simulated"))
    }
}

impl SimAgent {
    /// Reports `pod` terminating (`pending`), or drained and exited (`pass`).
    fn report(&self, pod: &Pod, verdict: pb::Verdict) {
        let now = Some(prost_types::Timestamp::from(SystemTime::now()));
        let meta = &pod.metadata;
        let uid = meta.uid.clone().unwrap_or_default();
        let passed = verdict == pb::Verdict::Pass;
        let reported = pb::Pod {
            pod: Some(pb::PodRef {
                namespace: NAMESPACE.into(),
                name: meta.name.clone().unwrap_or_default(),
                uid: uid.clone(),
            }),
            phase: if passed {
                pb::Phase::Exited
            } else {
                pb::Phase::Terminating
            }
            .into(),
            verdict: verdict.into(),
            reason: if passed {
                "drained: no open connection, no error in the window".into()
            } else {
                String::new()
            },
            total: Some(pb::Counters::default()),
            window: Some(pb::Counters::default()),
            timeline: Some(pb::Timeline {
                terminating_since: now,
                drained_at: if passed { now } else { None },
                exited_at: if passed { now } else { None },
                ..pb::Timeline::default()
            }),
            owner_kind: "Deployment".into(),
            owner_name: "web".into(),
            pod_template_hash: hash(pod),
            node: "node-a".into(),
            ..pb::Pod::default()
        };
        self.pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(uid, reported);
    }
}

fn hash(pod: &Pod) -> String {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"))
        .cloned()
        .unwrap_or_default()
}

fn condition_true(pod: &Pod, kind: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"))
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The nearest-rank percentile `p` (in per cent) of sorted samples.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn main() {
    let args = Args::parse();
    let cluster = KubeCluster::start();
    cluster.create_node("node-a");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let client = {
        let _entered = runtime.enter();
        cluster.client()
    };
    runtime.block_on(run(&args, &cluster, client));
}

/// The pods, and the gate's releases seen: the kubelet's loop.
struct Node {
    pods: Api<Pod>,
    agent: SimAgent,
    /// Deleted pods not yet removed: when their verdict turns pass.
    passing: HashMap<String, Instant>,
    /// Pods reported pass, by uid: when.
    passed: HashMap<String, Instant>,
}

impl Node {
    /// One pass: new pods Running (Ready as the kubelet computes it), deleted pods reported
    /// terminating, passed at their moment, then removed.
    async fn step(&mut self) -> Vec<Pod> {
        let pods = self
            .pods
            .list(&ListParams::default())
            .await
            .expect("list pods")
            .items;
        for pod in &pods {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if pod.metadata.deletion_timestamp.is_some() {
                if self.passed.contains_key(&uid) {
                    // Reported pass a moment ago: the pod goes now.
                    let params = DeleteParams {
                        grace_period_seconds: Some(0),
                        ..DeleteParams::default()
                    };
                    let _ = self.pods.delete(&name, &params).await;
                    continue;
                }
                let drains = self.passing.len() as u64;
                let at = *self.passing.entry(uid.clone()).or_insert_with(|| {
                    self.agent.report(pod, pb::Verdict::Pending);
                    // A drain of 100 to 600 ms, stepping through the gate's tick by 137 ms
                    // from one old pod to the next: the deletion came right after a release,
                    // so a clock-derived delay would stay in step with the ticks.
                    Instant::now() + Duration::from_millis(100 + (drains * 137) % 500)
                });
                if Instant::now() >= at {
                    self.agent.report(pod, pb::Verdict::Pass);
                    self.passed.insert(uid, Instant::now());
                }
                continue;
            }
            let gates_true = pod
                .spec
                .as_ref()
                .and_then(|s| s.readiness_gates.as_ref())
                .is_none_or(|g| g.iter().all(|g| condition_true(pod, &g.condition_type)));
            let ready = condition_true(pod, "Ready");
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            if !running || ready != gates_true {
                let now = now_rfc3339();
                let ready = if gates_true { "True" } else { "False" };
                let status = json!({"status": {
                    "phase": "Running", "hostIP": "127.0.0.1", "podIP": "198.18.0.2",
                    "startTime": now,
                    "conditions": [
                        {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                        {"type": "Ready", "status": ready, "lastTransitionTime": now}],
                    "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0,
                        "image": "web", "imageID": "", "state": {"running": {"startedAt": now}}}]
                }});
                let _ = self
                    .pods
                    .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&status))
                    .await;
            }
        }
        pods
    }
}

/// The baseline: one status write and the poll that sees it.
async fn api_round_trip(pods: &Api<Pod>, name: &str, n: usize) -> Duration {
    let started = Instant::now();
    let marker = format!("bench-{n}");
    let patch = json!({"status": {"conditions": [
        {"type": "example.com/bench", "status": "True", "reason": marker}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .expect("patch a status");
    loop {
        let pod = pods.get(name).await.expect("get the pod");
        let seen = pod
            .status
            .and_then(|s| s.conditions)
            .is_some_and(|c| c.iter().any(|c| c.reason.as_deref() == Some(&marker)));
        if seen {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[expect(clippy::too_many_lines, reason = "one measurement, in order")]
async fn run(args: &Args, cluster: &KubeCluster, client: kube::Client) {
    let agent = SimAgent::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the agent");
    let agent_addr = listener.local_addr().expect("address").to_string();
    let service = AgentServer::new(agent.clone());
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    let mut gate = Command::new(draingate_bin());
    gate.args(["gate", "serve", "--agents", &agent_addr, "--hold"])
        .args(["--http-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--grpc-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--namespace", "default"])
        .env("KUBECONFIG", cluster.kubeconfig_path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    if let Some(interval) = &args.hold_interval {
        gate.args(["--hold-interval", interval]);
    }
    let _gate = ChildGuard(gate.spawn().expect("run draingate gate serve"));
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).unwrap(),
        )
        .await
        .expect("create the namespace");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let deployment = json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": args.replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": "web"}, "annotations": {"version": "0"}},
                "spec": {
                    "nodeName": "node-a",
                    "readinessGates": [{"conditionType": CONDITION}],
                    "containers": [{"name": "web", "image": "web"}]
                }
            }
        }
    });
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(deployment).unwrap(),
        )
        .await
        .expect("create the Deployment");
    let mut node = Node {
        pods: Api::namespaced(client.clone(), NAMESPACE),
        agent,
        passing: HashMap::new(),
        passed: HashMap::new(),
    };
    let ready = |d: &Deployment, hash_done: bool| {
        let status = d.status.clone().unwrap_or_default();
        status.observed_generation == d.metadata.generation
            && status.ready_replicas == Some(args.replicas)
            && status.updated_replicas == Some(args.replicas)
            && status.replicas == Some(args.replicas)
            && hash_done
    };
    let mut releases: Vec<Duration> = Vec::new();
    // The releases after predecessors already seen, by pod uid.
    let mut seen_released: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut floors: Vec<Duration> = Vec::new();
    for rollout in 0..=args.rollouts {
        if rollout > 0 {
            let patch = json!({"spec": {"template": {"metadata": {"annotations": {
                "version": rollout.to_string()}}}}});
            deployments
                .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("roll out");
        }
        eprintln!("rollout {rollout} of {}", args.rollouts);
        let deadline = Instant::now() + Duration::from_mins(3);
        loop {
            let pods = node.step().await;
            // A new pod released after its predecessors: the latest pass before it is the one
            // it waited for last.
            for pod in &pods {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                let after_predecessors = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| {
                        c.iter().any(|c| {
                            c.type_ == CONDITION
                                && c.status == "True"
                                && c.reason.as_deref() == Some("PredecessorsDrained")
                        })
                    });
                if rollout > 0
                    && after_predecessors
                    && seen_released.insert(uid)
                    && let Some(last_pass) = node.passed.values().max()
                {
                    releases.push(last_pass.elapsed());
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    floors.push(api_round_trip(&node.pods, &name, floors.len()).await);
                }
            }
            let d = deployments.get("web").await.expect("get the Deployment");
            let one_version = pods
                .iter()
                .map(hash)
                .collect::<std::collections::HashSet<_>>()
                .len()
                == 1;
            if ready(&d, one_version) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "rollout {rollout} did not finish: {:#?}",
                d.status
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    releases.sort();
    floors.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (r50, r99, rmax) = (
        percentile(&releases, 50),
        percentile(&releases, 99),
        *releases.last().expect("samples"),
    );
    let (f50, f99) = (percentile(&floors, 50), percentile(&floors, 99));
    let interval = args.hold_interval.as_deref().unwrap_or("default");
    let mut report = String::new();
    let _ = writeln!(
        report,
        "## Readiness gate: release after the last predecessor passed\n\nReproduce: `sudo -E \
         cargo xtask bench --only hold` (draingate-hold-bench --replicas {} --rollouts {}, \
         --hold-interval {interval})\n",
        args.replicas, args.rollouts
    );
    let _ = writeln!(
        report,
        "The real 1.20 API server and Deployment controller roll a Deployment of {} replicas \
         ({} rolling updates, `maxSurge: 1, maxUnavailable: 0`) under the real `draingate gate \
         serve --hold`; this process plays the node (kubelet and agent), so it knows the \
         moment each old pod's verdict turned pass. A sample is from that moment to this \
         process seeing the new pod that waited for it released (polled every 10 ms), {} \
         samples. Baseline, side by side: the API server's own round trip (a status patch, then \
         polls until it is seen).\n",
        args.replicas,
        args.rollouts,
        releases.len()
    );
    let _ = writeln!(
        report,
        "| | p50 | p99 | max | target |\n|---|---|---|---|---|"
    );
    let _ = writeln!(
        report,
        "| pass to release | {:.0} ms | {:.0} ms | {:.0} ms | <= 1000 ms |",
        ms(r50),
        ms(r99),
        ms(rmax)
    );
    let _ = writeln!(
        report,
        "| API round trip (baseline) | {:.0} ms | {:.0} ms | | |",
        ms(f50),
        ms(f99)
    );
    let _ = writeln!(
        report,
        "| ratio release / baseline | {:.1} | {:.1} | | |",
        ms(r50) / ms(f50).max(0.001),
        ms(r99) / ms(f99).max(0.001)
    );
    print!("{report}");
    if let Some(out) = &args.out {
        draingate_tests::write_section(
            out,
            "Readiness gate: release after the last predecessor passed",
            &report,
        );
    }
}
