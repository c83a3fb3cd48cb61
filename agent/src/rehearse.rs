//! `draingate rehearse`: a whole rolling update of the user's own server on one machine, with the
//! agent's verdict held against what the clients saw.
//!
//! Pods are network namespaces on a simulated node ([`node`]), the Service is kube-proxy's DNAT
//! chain, the clients are [`load`]'s, and the rolling update follows the Deployment controller and
//! the kubelet: surge, readiness, endpoint removal (after a propagation delay), preStop, SIGTERM,
//! grace period, SIGKILL, sandbox teardown ([`pod`] leads each pod through it). An agent runs
//! embedded, on pins of its own.

pub mod conntrack;
pub mod load;
pub mod node;
mod pod;
pub mod report;
pub mod spec;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use pod::{start_pod, terminate_pod};
use tokio::{
    sync::{Mutex, mpsc, watch},
    task::JoinSet,
};

use self::{
    load::{ConnectionMode, FailureNote, LoadConfig, LoadGenerator, RequestRecord},
    node::{Node, NodeError, PodCommand},
    report::{ClientTotals, PodReport, PodRole, Report},
    spec::RolloutSpec,
};
use crate::{
    agent::{Agent, AgentConfig, AgentError, AgentHandle},
    drain::PodDrain,
    inventory::{LocalPodInfo, LocalPods, LocalSource},
    loader::ProbeConfig,
};

/// How long after a failure its connection is looked up among conntrack's events.
const ATTRIBUTION_DELAY: Duration = Duration::from_millis(200);

/// Everything a rehearsal needs.
#[derive(Debug, Clone)]
pub struct RehearseConfig {
    pub spec: RolloutSpec,
    /// The server, version 1: program and arguments (`{port}` is replaced).
    pub command: Vec<String>,
    /// Version 2; the same command when `None`.
    pub next_command: Option<Vec<String>>,
    /// The port the server listens on in its pod.
    pub port: u16,
    pub rate: u32,
    pub clients: u32,
    pub mode: ConnectionMode,
    pub path: String,
    /// How long endpoint changes take to reach the node's Service rules (endpoints controller
    /// plus kube-proxy).
    pub propagation: Duration,
    /// Load before the rollout starts and after the last old pod is gone.
    pub settle: Duration,
    /// The whole rollout may take at most this long.
    pub timeout: Duration,
    pub request_timeout: Duration,
    /// Where the pods' output goes.
    pub log_dir: PathBuf,
    /// The embedded agent's gRPC unix socket, for `draingate pods --agent` meanwhile.
    pub agent_socket: PathBuf,
    /// Where to write every request's outcome as CSV, if anywhere.
    pub requests_out: Option<PathBuf>,
    /// Also serve the embedded agent's gRPC API on this TCP address (for a rollout gate).
    pub agent_listen: Option<std::net::SocketAddr>,
    /// Keep the embedded agent (and the new pods) up this long after the report, so that a gate
    /// can be asked about the finished rollout.
    pub hold: Duration,
}

impl RehearseConfig {
    /// The `pod-template-hash` of version 1 or 2: like Kubernetes' (a 32-bit FNV-1a of the
    /// template, written in its vowel-free alphabet), over the version and its command.
    #[must_use]
    pub fn template_hash(&self, version: u8) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let argv = match (version, &self.next_command) {
            (2, Some(next)) => next,
            _ => &self.command,
        };
        let mut hash: u32 = 0x811c_9dc5;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                hash ^= u32::from(*b);
                hash = hash.wrapping_mul(0x0100_0193);
            }
        };
        feed(self.spec.name.as_bytes());
        feed(&[0, version]);
        for arg in argv {
            feed(arg.as_bytes());
            feed(&[0]);
        }
        // Kubernetes' SafeEncodeString of the decimal hash: each byte picks a letter.
        hash.to_string()
            .bytes()
            .map(|b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()]))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RehearseError {
    #[error(
        "rehearse makes network namespaces, iptables rules and loads eBPF programs: it needs root \
         (try `sudo -E draingate rehearse …`)"
    )]
    NotRoot,
    #[error("the embedded agent cannot start")]
    Agent(#[from] AgentError),
    #[error("the node simulator failed")]
    Node(#[from] NodeError),
    #[error("the load generator failed")]
    Load(#[from] load::LoadError),
    #[error("{0}")]
    Setup(String),
    #[error("pod {pod}: {reason} (its output: {log})")]
    PodFailed {
        pod: String,
        reason: String,
        log: String,
    },
    #[error("the rollout did not finish within {0:?}")]
    Timeout(Duration),
}

/// What changed in the rollout, as pod tasks report it.
#[derive(Debug)]
enum PodEvent {
    /// A new pod passed its readiness probe and is in the endpoints.
    Ready(String),
    /// A pod's termination finished: its namespace is gone.
    Gone(String),
    Failed(RehearseError),
}

/// When the simulator did things to a pod.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SimTimeline {
    pub started: Option<Duration>,
    pub ready: Option<Duration>,
    pub deleted: Option<Duration>,
    pub endpoint_removed: Option<Duration>,
    /// An exec preStop hook started.
    pub pre_stop_started: Option<Duration>,
    /// The stop signal (SIGTERM, or `lifecycle.stopSignal`).
    pub sigterm: Option<Duration>,
    pub sigkill: Option<Duration>,
    pub exited: Option<Duration>,
    pub removed: Option<Duration>,
}

/// Shared between the pod tasks and the controller.
struct Shared {
    node: Mutex<Node>,
    agent: AgentHandle,
    config: RehearseConfig,
    started: Instant,
    timelines: std::sync::Mutex<BTreeMap<String, SimTimeline>>,
    /// What the API server would say about each pod (namespace, owner, pod-template-hash,
    /// deletionTimestamp), by namespace name, as the embedded agent's inventory reads it.
    known: LocalPods,
    /// Readiness probes refused per pod: the agent counts them apart (`from_node`).
    probe_refusals: std::sync::Mutex<HashMap<String, u64>>,
    events: mpsc::UnboundedSender<PodEvent>,
}

impl Shared {
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn mark(&self, pod: &str, f: impl FnOnce(&mut SimTimeline, Duration)) {
        let now = self.now();
        let mut timelines = self
            .timelines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(timelines.entry(pod.to_owned()).or_default(), now);
    }

    /// Tells the embedded agent something the API server would about the pod living in
    /// namespace `netns` (its inventory reads it at its next resync).
    fn tell_agent(&self, netns: &str, f: impl FnOnce(&mut LocalPodInfo)) {
        f(self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(netns.to_owned())
            .or_default());
    }

    fn log_path(&self, pod: &str) -> String {
        self.config
            .log_dir
            .join(format!("{pod}.log"))
            .display()
            .to_string()
    }
}

/// A line of progress, about once a second.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub elapsed: Duration,
    pub phase: &'static str,
    pub new_ready: u32,
    pub replicas: u32,
    pub old_left: u32,
    pub terminating: u32,
    pub requests: u64,
    pub failed: u64,
    pub rate: f64,
}

/// The agent running inside a rehearsal, on pins of its own; stopped and unpinned on drop.
struct EmbeddedAgent {
    handle: AgentHandle,
    stop: watch::Sender<bool>,
    pins: PathBuf,
    socket: PathBuf,
}

impl EmbeddedAgent {
    async fn start(
        socket: PathBuf,
        id: &str,
        known: LocalPods,
        listen: Option<std::net::SocketAddr>,
        node_netns: PathBuf,
    ) -> Result<Self, RehearseError> {
        let pins = node::pin_dir(id);
        let config = AgentConfig {
            probes: ProbeConfig {
                // As `draingate agent --reset-source packets`: the accuracy suite runs the
                // packet source of older kernels on any kernel with it.
                reset_source: std::env::var("DRAINGATE_RESET_SOURCE")
                    .is_ok_and(|v| v == "packets")
                    .then_some(crate::loader::ResetSource::Packets),
                ..ProbeConfig::at(pins.clone())
            },
            // New pods must be watched before their first connection: resync often.
            resync: Duration::from_millis(100),
            // The simulated kubelet probes from the node's namespace.
            node_addresses: crate::agent::NodeAddresses::Netns(node_netns.clone()),
            ..AgentConfig::default()
        };
        let source = LocalSource::with_known(known).with_node(node_netns);
        let (agent, handle) = Agent::new(config, Box::new(source))?;
        let (stop, stop_rx) = watch::channel(false);
        let mut agent_stop = stop_rx.clone();
        tokio::spawn(agent.run(async move {
            let _ = agent_stop.wait_for(|s| *s).await;
        }));
        let listen = crate::api::ListenConfig {
            grpc_addr: listen.unwrap_or_else(|| "127.0.0.1:0".parse().expect("valid address")),
            socket: socket.clone(),
            tls: None,
        };
        let api_handle = handle.clone();
        let mut api_stop = stop_rx;
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = api_stop.wait_for(|s| *s).await;
            };
            if let Err(err) = crate::api::serve(api_handle, &listen, shutdown).await {
                tracing::warn!(error = %crate::telemetry::chain(&err), "the rehearsal's agent API is not served");
            }
        });
        let mut ready = handle.ready.clone();
        tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
            .await
            .map_err(|_| RehearseError::Setup("the embedded agent never became ready".into()))?
            .map_err(|_| RehearseError::Setup("the embedded agent stopped".into()))?;
        Ok(Self {
            handle,
            stop,
            pins,
            socket,
        })
    }

    /// The agent's record of the pod living in namespace `netns`.
    fn pod(&self, netns: &str) -> Option<PodDrain> {
        agent_pod(&self.handle, netns, Clone::clone)
    }
}

impl Drop for EmbeddedAgent {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Err(err) = crate::loader::KernelProbes::remove_pins(&self.pins) {
            tracing::warn!(error = %crate::telemetry::chain(&err), pins = %self.pins.display(), "cannot remove the rehearsal's pins");
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// `f` of the agent's newest record of the pod living in namespace `netns` (the local inventory
/// names pods after their namespaces).
fn agent_pod<R>(handle: &AgentHandle, netns: &str, f: impl FnOnce(&PodDrain) -> R) -> Option<R> {
    let state = handle
        .state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    state
        .pods
        .values()
        .filter(|p| p.id.name == netns)
        .max_by_key(|p| p.timeline.first_seen)
        .map(f)
}

/// Runs the rehearsal; `progress` is called about once a second.
///
/// `on_report` gets the report as soon as it is ready; with [`RehearseConfig::hold`], the
/// embedded agent and the new pods then stay up that long before everything is removed.
pub async fn run(
    config: RehearseConfig,
    mut progress: impl FnMut(&Progress),
    on_report: impl FnOnce(&Report),
) -> Result<Report, RehearseError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(RehearseError::NotRoot);
    }
    config
        .spec
        .validate()
        .map_err(|e| RehearseError::Setup(e.to_string()))?;
    if config.command.is_empty() {
        return Err(RehearseError::Setup(
            "no server command given after `--`".into(),
        ));
    }
    std::fs::create_dir_all(&config.log_dir).map_err(|e| {
        RehearseError::Setup(format!("cannot create {}: {e}", config.log_dir.display()))
    })?;
    let node = Node::create(config.port).await?;
    // Deletions reach the agent as a deletionTimestamp would: its window opens then.
    let known = LocalPods::default();
    let agent = EmbeddedAgent::start(
        config.agent_socket.clone(),
        node.prefix.trim_end_matches('-'),
        known.clone(),
        config.agent_listen,
        node.node.path(),
    )
    .await?;
    let service = node.service();
    let (client_addr, vip) = (node.client_addr, node.vip);
    let client_ns = node.client.open()?;
    let conntrack = conntrack::ConntrackWatcher::start(&node.node.name, client_addr, vip).await?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        node: Mutex::new(node),
        agent: agent.handle.clone(),
        config: config.clone(),
        started: Instant::now(),
        timelines: std::sync::Mutex::new(BTreeMap::new()),
        known,
        probe_refusals: std::sync::Mutex::new(HashMap::new()),
        events: events_tx,
    });
    let spec = &config.spec;
    let v1 = PodCommand {
        argv: config.command.clone(),
        port: config.port,
        log_dir: config.log_dir.clone(),
    };
    let v2 = PodCommand {
        argv: config
            .next_command
            .clone()
            .unwrap_or_else(|| config.command.clone()),
        ..v1.clone()
    };
    let mut tasks = JoinSet::new();
    let mut roles: BTreeMap<String, PodRole> = BTreeMap::new();

    // The deployed version: every replica ready and in the Service before the load starts.
    let mut old: VecDeque<String> = VecDeque::new();
    for i in 0..spec.replicas {
        let name = format!("{}-v1-{i}", spec.name);
        roles.insert(name.clone(), PodRole::Old);
        old.push_back(name.clone());
        tasks.spawn(start_pod(Arc::clone(&shared), name, v1.clone(), 1));
    }
    let mut ready = 0;
    let deadline = tokio::time::Instant::now() + config.timeout;
    while ready < spec.replicas {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return Err(RehearseError::Timeout(config.timeout)),
            Ok(None) => return Err(RehearseError::Setup("pod tasks ended".into())),
            Ok(Some(PodEvent::Ready(pod))) => {
                tracing::debug!(%pod, "deployed version ready");
                ready += 1;
            }
            Ok(Some(PodEvent::Failed(err))) => return Err(err),
            Ok(Some(PodEvent::Gone(_))) => {}
        }
    }

    // The load, and failures attributed to pods as they happen.
    let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<FailureNote>();
    let generator = LoadGenerator::start(
        LoadConfig {
            target: service,
            rate: config.rate,
            clients: config.clients,
            mode: config.mode,
            path: config.path.clone(),
            connect_timeout: Duration::from_millis(1500),
            request_timeout: config.request_timeout,
            max_records: 20_000_000,
        },
        client_ns,
        fail_tx,
    )
    .await?;
    let load_started = shared.now();
    let mut attributed: Vec<(FailureNote, Option<Ipv4Addr>)> = Vec::new();
    let mut pending_failures: Vec<FailureNote> = Vec::new();
    // A failure is looked up once conntrack's event for its connection has surely been read.
    let attribute = |pending: &mut Vec<FailureNote>,
                     out: &mut Vec<(FailureNote, Option<Ipv4Addr>)>,
                     now: Duration| {
        pending.retain(|note| {
            if now.saturating_sub(note.at) < ATTRIBUTION_DELAY {
                return true;
            }
            out.push((*note, conntrack.backend(note.client_port)));
            false
        });
    };

    let mut phase = "warm-up";
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let warmup_end = tokio::time::Instant::now() + config.settle;
    let mut new_created = 0u32;
    let mut new_ready = 0u32;
    let mut terminating = 0u32;
    let mut rollout_started = false;
    let mut settle_end: Option<tokio::time::Instant> = None;
    let min_available = spec.replicas.saturating_sub(spec.max_unavailable);
    let mut last_sent = 0u64;
    let mut last_sent_at = Instant::now();
    loop {
        if rollout_started && settle_end.is_none() {
            // The Deployment controller: surge new pods, then scale old ones down while enough
            // pods are available (terminating pods count for neither).
            while new_created < spec.replicas
                && old.len() as u32 + new_created < spec.replicas + spec.max_surge
            {
                let name = format!("{}-v2-{new_created}", spec.name);
                roles.insert(name.clone(), PodRole::New);
                tasks.spawn(start_pod(Arc::clone(&shared), name, v2.clone(), 2));
                new_created += 1;
            }
            while !old.is_empty() && old.len() as u32 + new_ready > min_available {
                let name = old.pop_front().expect("not empty");
                terminating += 1;
                tasks.spawn(terminate_pod(Arc::clone(&shared), name));
            }
            if old.is_empty() && new_ready == spec.replicas && terminating == 0 {
                phase = "settle";
                settle_end = Some(tokio::time::Instant::now() + config.settle);
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            event = events.recv() => match event {
                Some(PodEvent::Ready(pod)) => {
                    tracing::debug!(%pod, "ready and in the Service");
                    new_ready += 1;
                }
                Some(PodEvent::Gone(pod)) => {
                    tracing::debug!(%pod, "terminated and removed");
                    terminating -= 1;
                }
                Some(PodEvent::Failed(err)) => return Err(err),
                None => return Err(RehearseError::Setup("pod tasks ended".into())),
            },
            Some(failure) = fail_rx.recv() => pending_failures.push(failure),
        }
        attribute(&mut pending_failures, &mut attributed, generator.elapsed());
        let now = tokio::time::Instant::now();
        if !rollout_started && now >= warmup_end {
            rollout_started = true;
            phase = "rollout";
        }
        if now >= deadline {
            return Err(RehearseError::Timeout(config.timeout));
        }
        if settle_end.is_some_and(|end| now >= end) {
            break;
        }
        if last_sent_at.elapsed() >= Duration::from_secs(1) {
            let requests = generator
                .live
                .sent
                .load(std::sync::atomic::Ordering::Relaxed);
            let rate = report::as_f64(requests - last_sent) / last_sent_at.elapsed().as_secs_f64();
            (last_sent, last_sent_at) = (requests, Instant::now());
            progress(&Progress {
                elapsed: shared.now(),
                phase,
                new_ready,
                replicas: spec.replicas,
                old_left: old.len() as u32,
                terminating,
                requests,
                failed: generator
                    .live
                    .failed
                    .load(std::sync::atomic::Ordering::Relaxed),
                rate,
            });
        }
    }
    let load_time = generator.elapsed();
    let records = generator.stop().await;
    if let Some(path) = &config.requests_out {
        write_requests(path, &records, load_started)
            .map_err(|e| RehearseError::Setup(format!("cannot write {}: {e}", path.display())))?;
    }
    while let Ok(note) = fail_rx.try_recv() {
        pending_failures.push(note);
    }
    // Let the agent read the last events and counters, and conntrack's last events arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    attribute(&mut pending_failures, &mut attributed, Duration::MAX);
    let conntrack_overruns = conntrack
        .overruns
        .load(std::sync::atomic::Ordering::Relaxed);
    if conntrack_overruns > 0 {
        tracing::warn!(
            conntrack_overruns,
            "conntrack events were lost: some failures may be unattributed"
        );
    }

    let node = shared.node.lock().await;
    let addr_to_pod: HashMap<Ipv4Addr, String> = node
        .pods
        .values()
        .map(|p| (p.addr, p.name.clone()))
        .collect();
    let netns_of: HashMap<String, String> = node
        .pods
        .keys()
        .map(|name| (name.clone(), node_netns_name(&node, name)))
        .collect();
    drop(node);
    let timelines = shared
        .timelines
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let probe_refusals = shared
        .probe_refusals
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut failures_by_pod: BTreeMap<String, Vec<FailureNote>> = BTreeMap::new();
    let mut unattributed = Vec::new();
    for (mut note, backend) in attributed {
        // From the load's clock to the rehearsal's, which the timelines use.
        note.at += load_started;
        match backend.and_then(|b| addr_to_pod.get(&b)) {
            Some(pod) => failures_by_pod.entry(pod.clone()).or_default().push(note),
            None => unattributed.push(note),
        }
    }
    let pods = roles
        .iter()
        .map(|(name, role)| {
            let agent_pod = netns_of.get(name).and_then(|ns| agent.pod(ns));
            let timeline = timelines.get(name).cloned().unwrap_or_default();
            let failures = failures_by_pod.remove(name).unwrap_or_default();
            PodReport::new(
                name,
                *role,
                agent_pod.as_ref(),
                &timeline,
                &report::ClientEvidence {
                    failures: &failures,
                    probe_refusals: probe_refusals.get(name).copied().unwrap_or(0),
                    client: client_addr,
                },
                shared.started,
            )
        })
        .collect();
    drop(tasks);
    let report = Report::new(
        &config,
        pods,
        ClientTotals::from_records(&records, load_time),
        &unattributed,
        load_started,
    );
    on_report(&report);
    if !config.hold.is_zero() {
        tracing::info!(hold = ?config.hold, "holding the embedded agent for a gate");
        tokio::time::sleep(config.hold).await;
    }
    drop(agent);
    Ok(report)
}

fn node_netns_name(node: &Node, pod: &str) -> String {
    node.pods
        .get(pod)
        .and_then(|p| p.netns_name().map(str::to_owned))
        .unwrap_or_else(|| format!("{}{pod}", node.prefix))
}

/// After an interrupt: removes whatever the rehearsals of this process left (namespaces, and the
/// embedded agents' pins), once the cancelled tasks had a moment to unwind.
pub async fn sweep() {
    tokio::time::sleep(Duration::from_millis(300)).await;
    node::remove_all_of_this_process();
}

/// Every request as a CSV line: when it was due (seconds since the rehearsal started), its
/// latency, outcome, HTTP status and the client port (which names its connection).
fn write_requests(
    path: &std::path::Path,
    records: &[RequestRecord],
    load_started: Duration,
) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "at_s,latency_ms,outcome,status,client_port")?;
    for r in records {
        writeln!(
            out,
            "{:.6},{:.3},{},{},{}",
            (r.at + load_started).as_secs_f64(),
            r.latency.as_secs_f64() * 1e3,
            r.outcome.as_str(),
            r.status,
            r.client_port
        )?;
    }
    out.flush()
}

/// The time of a record relative to the rehearsal's start, for reports.
#[must_use]
pub fn since(start: Instant, at: SystemTime) -> Option<Duration> {
    let now_wall = SystemTime::now();
    let elapsed = start.elapsed();
    let start_wall = now_wall.checked_sub(elapsed)?;
    at.duration_since(start_wall).ok()
}

#[cfg(test)]
mod tests {
    use super::{RehearseError, node::NodeError};

    /// A failed rehearsal's message says each cause once, as `draingate` prints it (its `main`
    /// prints the chain): each error chains its cause and leaves it out of its own message.
    #[test]
    fn a_nested_error_says_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(17);
        let io_text = io.to_string();
        let err: Box<dyn std::error::Error + Send + Sync> =
            Box::new(RehearseError::from(NodeError::Io {
                what: "cannot create netns".to_owned(),
                source: io,
            }));
        let printed = crate::telemetry::chain(err.as_ref());
        assert_eq!(
            printed,
            format!("the node simulator failed: cannot create netns: {io_text}")
        );
        for cause in ["the node simulator failed", "cannot create netns", &io_text] {
            assert_eq!(
                printed.matches(cause).count(),
                1,
                "{cause:?} in {printed:?}"
            );
        }
        // Not thanks to `chain` skipping repeats: no error's message holds its cause's.
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
        while let Some(outer) = current {
            if let Some(inner) = outer.source() {
                assert!(
                    !outer.to_string().contains(&inner.to_string()),
                    "{outer} prints its cause"
                );
            }
            current = outer.source();
        }
    }
}
