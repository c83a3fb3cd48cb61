//! gRPC faces of the agent: `draingate.v1.Agent`, grpc.health.v1 and reflection, on TCP and on a
//! unix socket. The tonic impl only maps domain state to messages and errors to `Status`.

use std::{path::PathBuf, pin::Pin, sync::Arc, time::Duration};

use draingate_common::connect_failure;
use draingate_proto::v1::{
    self as pb,
    agent_server::{Agent as AgentService, AgentServer},
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::{
    agent::{AgentHandle, AgentState},
    drain::{EventKind, Phase, PodDrain, PodEvent, Verdict},
};

/// Default TCP address of the agent's gRPC API.
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:9560";
/// Default unix socket of the agent's gRPC API (what the CLI uses).
pub const DEFAULT_SOCKET: &str = "/run/draingate/agent.sock";
/// Longest wait a `WaitDrained` call may ask for.
pub const MAX_WAIT: Duration = Duration::from_hours(1);

/// The `draingate.v1.Agent` service over a running agent.
#[derive(Debug, Clone)]
pub struct AgentApi {
    handle: AgentHandle,
    /// The event backlog as of its fingerprint, shared by every `StreamEvents` that starts while
    /// it is current; held (weakly here) only as long as some stream still replays it.
    backlog: Arc<std::sync::Mutex<Option<SharedBacklog>>>,
}

/// A backlog's fingerprint (see [`backlog_fingerprint`]) and the backlog, while some stream holds it.
type SharedBacklog = (u64, std::sync::Weak<[PodEvent]>);

/// What changes when any pod's events change: events are only ever appended to a pod (the
/// oldest dropped, and counted, when it has too many), and pods come and go.
fn backlog_fingerprint(state: &AgentState) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for pod in state.pods.values() {
        pod.id.uid.hash(&mut hasher);
        pod.events.len().hash(&mut hasher);
        pod.events_dropped.hash(&mut hasher);
        pod.events.back().map(|e| e.time).hash(&mut hasher);
    }
    hasher.finish()
}

impl AgentApi {
    #[must_use]
    pub fn new(handle: AgentHandle) -> Self {
        Self {
            handle,
            backlog: Arc::default(),
        }
    }

    /// Every pod's events, oldest first: one copy shared by all the streams that replay it, not
    /// one per stream.
    fn backlog(&self) -> Arc<[PodEvent]> {
        let state = self.state();
        let fingerprint = backlog_fingerprint(&state);
        let mut cache = self
            .backlog
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((cached, weak)) = &*cache
            && *cached == fingerprint
            && let Some(events) = weak.upgrade()
        {
            return events;
        }
        let mut events: Vec<PodEvent> = state
            .pods
            .values()
            .flat_map(|p| p.events.iter().cloned())
            .collect();
        events.sort_by_key(|e| e.time);
        let events: Arc<[PodEvent]> = events.into();
        *cache = Some((fingerprint, Arc::downgrade(&events)));
        events
    }

    /// A permit for one more stream, held until the stream ends; refused (`RESOURCE_EXHAUSTED`)
    /// when [`crate::agent::MAX_STREAMS`] are open.
    fn stream_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        Arc::clone(&self.handle.streams)
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "{} streams are open on this agent, its most; try again when one ends",
                    crate::agent::MAX_STREAMS
                ))
            })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, AgentState> {
        self.handle
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn find(&self, pod: Option<&pb::PodRef>) -> Result<pb::Pod, Status> {
        let pod = pod.ok_or_else(|| Status::invalid_argument("pod is required"))?;
        if pod.uid.is_empty() && pod.name.is_empty() {
            return Err(Status::invalid_argument("pod needs a uid or a name"));
        }
        let state = self.state();
        state
            .find(&pod.namespace, &pod.name, &pod.uid)
            .map(|p| pod_message(p, &state.node))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no pod {}{}{} on this node (see `draingate pods`)",
                    if pod.namespace.is_empty() {
                        String::new()
                    } else {
                        crate::telemetry::quoted(&pod.namespace)
                    },
                    if pod.namespace.is_empty() { "" } else { "/" },
                    crate::telemetry::quoted(if pod.uid.is_empty() {
                        &pod.name
                    } else {
                        &pod.uid
                    }),
                ))
            })
    }
}

fn timestamp(time: Option<std::time::SystemTime>) -> Option<prost_types::Timestamp> {
    time.map(prost_types::Timestamp::from)
}

fn counters(t: &crate::loader::SlotTotals) -> pb::Counters {
    pb::Counters {
        accepted: t.accepted,
        opened: t.opened,
        resets_sent: t.resets_sent,
        resets_received: t.resets_received,
        refused: t.refused,
        failed_connects: t.failed_connects,
        http_ok: t.http_ok,
        http_4xx: t.http_4xx,
        http_5xx: t.http_5xx,
        requests_cut: t.requests_cut,
        http2_goaways: t.h2_goaways,
        http2_refused_streams: t.h2_resets_refused,
        http2_resets: t.h2_resets,
    }
}

/// The API's view of a pod.
#[must_use]
pub fn pod_message(pod: &PodDrain, node: &str) -> pb::Pod {
    let (verdict, reason) = pod.verdict_and_reason();
    let t = &pod.timeline;
    pb::Pod {
        pod: Some(pb::PodRef {
            namespace: pod.id.namespace.clone(),
            name: pod.id.name.clone(),
            uid: pod.id.uid.clone(),
        }),
        addresses: pod.addresses.iter().map(ToString::to_string).collect(),
        phase: match pod.phase() {
            Phase::Running => pb::Phase::Running,
            Phase::Terminating => pb::Phase::Terminating,
            Phase::Exited => pb::Phase::Exited,
        }
        .into(),
        open: pod.totals.open,
        total: Some(counters(&pod.totals)),
        window: Some(counters(&pod.window())),
        errors: pod.errors(),
        open_at_exit: pod.open_at_exit.unwrap_or(0),
        verdict: match verdict {
            Verdict::None => pb::Verdict::None,
            Verdict::Pending => pb::Verdict::Pending,
            Verdict::Pass => pb::Verdict::Pass,
            Verdict::Fail => pb::Verdict::Fail,
            Verdict::Unknown => pb::Verdict::Unknown,
        }
        .into(),
        reason,
        timeline: Some(pb::Timeline {
            terminating_since: timestamp(t.terminating_since),
            last_accepted: timestamp(t.last_accepted),
            left_endpoints: timestamp(t.left_endpoints),
            drained_at: timestamp(t.drained_at),
            exited_at: timestamp(t.exited_at),
            sigkill_at: timestamp(t.sigkill_at),
            window_closed_at: timestamp(t.window_closed_at),
        }),
        owner_kind: pod.meta.owner_kind.clone(),
        owner_name: pod.meta.owner_name.clone(),
        pod_template_hash: pod.meta.pod_template_hash.clone(),
        node: node.to_owned(),
        in_service: pod.in_service,
        grace_period_seconds: pod
            .grace_period
            .map_or(0, |g| u32::try_from(g.as_secs()).unwrap_or(u32::MAX)),
        peer_failures: pod.peer_failures,
        pids: pod.pids.clone(),
        startup: Some({
            let startup = pod.startup();
            pb::Startup {
                errors: startup.errors(),
                errors_before_ready: startup.before_ready,
                first_error_at: timestamp(startup.first_error_at),
                last_error_at: timestamp(startup.last_error_at),
                ready_at: timestamp(pod.timeline.ready_at),
                reason: startup.reason(&pod.id.name),
            }
        }),
        from_node: pod.totals.from_node,
        http_from_node: pod.totals.http_from_node,
    }
}

/// The API's view of an event.
#[must_use]
pub fn event_message(event: &PodEvent) -> pb::Event {
    pb::Event {
        pod: Some(pb::PodRef {
            namespace: event.pod.namespace.clone(),
            name: event.pod.name.clone(),
            uid: event.pod.uid.clone(),
        }),
        kind: match event.kind {
            EventKind::ResetSent => pb::EventKind::ResetSent,
            EventKind::ResetReceived => pb::EventKind::ResetReceived,
            EventKind::Refused => pb::EventKind::Refused,
            EventKind::ConnectFailed => pb::EventKind::ConnectFailed,
            EventKind::PeerConnectFailed => pb::EventKind::PeerConnectFailed,
            EventKind::Http5xx => pb::EventKind::Http5xx,
            EventKind::RequestCut => pb::EventKind::RequestCut,
            EventKind::H2Goaway => pb::EventKind::Http2Goaway,
            EventKind::H2Reset => pb::EventKind::Http2Reset,
        }
        .into(),
        time: Some(prost_types::Timestamp::from(event.time)),
        local_address: event.local.to_string(),
        local_port: event.local_port.into(),
        remote_address: event.remote.to_string(),
        remote_port: event.remote_port.into(),
        tcp_state: event.tcp_state.to_owned(),
        reason: match event.kind {
            EventKind::ConnectFailed | EventKind::PeerConnectFailed => {
                if event.reason == connect_failure::RESET {
                    "reset".into()
                } else {
                    "no answer".into()
                }
            }
            EventKind::H2Goaway | EventKind::H2Reset => h2_error_name(event.reason),
            _ if event.reason == 0 => String::new(),
            _ => event.reason.to_string(),
        },
        in_window: event.in_window,
        service_address: event
            .service
            .map(|s| s.ip().to_string())
            .unwrap_or_default(),
        service_port: event.service.map_or(0, |s| s.port().into()),
        request: event.request.clone().unwrap_or_default(),
    }
}

fn matches(filter: Option<&pb::PodRef>, event: &PodEvent) -> bool {
    filter.is_none_or(|f| {
        (f.uid.is_empty() || f.uid == event.pod.uid)
            && (f.name.is_empty() || f.name == event.pod.name)
            && (f.namespace.is_empty() || f.namespace == event.pod.namespace)
    })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn list_pods(
        &self,
        request: Request<pb::ListPodsRequest>,
    ) -> Result<Response<pb::ListPodsResponse>, Status> {
        let state = self.state();
        let with_peers = request.get_ref().peer_failures;
        Ok(Response::new(pb::ListPodsResponse {
            pods: state
                .pods
                .values()
                .map(|p| pod_message(p, &state.node))
                .collect(),
            lost_events: state.lost_events,
            resets_forgotten: state.resets_forgotten,
            node: state.node.clone(),
            peer_failures: if with_peers {
                state.peer_failures.events().map(event_message).collect()
            } else {
                Vec::new()
            },
            peer_failures_complete_since: timestamp(
                state.peer_failures.complete_since.filter(|_| with_peers),
            ),
            peer_gaps: if with_peers {
                state
                    .peer_failures
                    .gaps()
                    .map(|(address, since)| pb::PeerGap {
                        address: address.to_string(),
                        complete_since: timestamp(Some(since)),
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }))
    }

    async fn get_pod(
        &self,
        request: Request<pb::GetPodRequest>,
    ) -> Result<Response<pb::Pod>, Status> {
        self.find(request.get_ref().pod.as_ref()).map(Response::new)
    }

    type WatchPodsStream = BoxStream<pb::PodUpdate>;

    async fn watch_pods(
        &self,
        _request: Request<pb::WatchPodsRequest>,
    ) -> Result<Response<Self::WatchPodsStream>, Status> {
        let permit = self.stream_permit()?;
        let (tx, rx) = mpsc::channel(64);
        let api = self.clone();
        let mut changed = self.handle.changed.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut sent = std::collections::BTreeMap::<String, pb::Pod>::new();
            loop {
                let pods: Vec<pb::Pod> = {
                    let state = api.state();
                    state
                        .pods
                        .values()
                        .map(|p| pod_message(p, &state.node))
                        .collect()
                };
                let mut updates = Vec::new();
                let current: std::collections::BTreeSet<String> = pods
                    .iter()
                    .filter_map(|p| p.pod.as_ref().map(|r| r.uid.clone()))
                    .collect();
                for pod in pods {
                    let uid = pod.pod.as_ref().map(|r| r.uid.clone()).unwrap_or_default();
                    if sent.get(&uid) != Some(&pod) {
                        sent.insert(uid, pod.clone());
                        updates.push(pb::pod_update::Change::Upserted(pod));
                    }
                }
                let removed: Vec<String> = sent
                    .keys()
                    .filter(|k| !current.contains(*k))
                    .cloned()
                    .collect();
                for uid in removed {
                    if let Some(pod) = sent.remove(&uid) {
                        updates.push(pb::pod_update::Change::Removed(pod.pod.unwrap_or_default()));
                    }
                }
                for change in updates {
                    if tx
                        .send(Ok(pb::PodUpdate {
                            change: Some(change),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                // A client that went away frees its stream at once, not at the next change.
                tokio::select! {
                    () = tx.closed() => return,
                    result = changed.changed() => {
                        if result.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type StreamEventsStream = BoxStream<pb::Event>;

    async fn stream_events(
        &self,
        request: Request<pb::StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        let request = request.into_inner();
        let filter = request.pod.clone();
        if let Some(pod) = &filter
            && (!pod.uid.is_empty() || !pod.name.is_empty())
        {
            self.find(Some(pod))?;
        }
        let permit = self.stream_permit()?;
        // Subscribe before reading the backlog, so nothing falls between the two.
        let mut live = self.handle.events.subscribe();
        let backlog = self.backlog();
        // Small: what a stream holds of its own is this queue (and the connection's buffers);
        // the backlog it replays is shared.
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let _permit = permit;
            let mut last = None;
            for event in backlog.iter().filter(|e| matches(filter.as_ref(), e)) {
                last = Some(event.time);
                if tx.send(Ok(event_message(event))).await.is_err() {
                    return;
                }
            }
            drop(backlog);
            if !request.follow {
                return;
            }
            loop {
                // A client that went away frees its stream at once, not at the next event.
                let received = tokio::select! {
                    () = tx.closed() => return,
                    received = live.recv() => received,
                };
                match received {
                    Ok(event) => {
                        if last.is_some_and(|t| event.time <= t)
                            || !matches(filter.as_ref(), &event)
                        {
                            continue;
                        }
                        if tx.send(Ok(event_message(&event))).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let status = Status::data_loss(format!(
                            "the client fell behind; {n} events skipped"
                        ));
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn wait_drained(
        &self,
        request: Request<pb::WaitDrainedRequest>,
    ) -> Result<Response<pb::WaitDrainedResponse>, Status> {
        let request = request.into_inner();
        let timeout = match request.timeout {
            Some(d) => Duration::try_from(d)
                .map_err(|_| Status::invalid_argument("timeout must not be negative"))?,
            None => Duration::from_mins(1),
        }
        .min(MAX_WAIT);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changed = self.handle.changed.clone();
        loop {
            let pod = self.find(request.pod.as_ref())?;
            if pod.open == 0 && !(request.until_left_endpoints && pod.in_service) {
                let outcome = if pod.errors == 0 && pod.verdict != i32::from(pb::Verdict::Fail) {
                    pb::DrainOutcome::DrainedClean
                } else {
                    pb::DrainOutcome::DrainedDirty
                };
                return Ok(Response::new(pb::WaitDrainedResponse {
                    outcome: outcome.into(),
                    pod: Some(pod),
                }));
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Status::unavailable("the agent is shutting down")),
                Err(_) => {
                    return Ok(Response::new(pb::WaitDrainedResponse {
                        outcome: pb::DrainOutcome::TimedOut.into(),
                        pod: Some(pod),
                    }));
                }
            }
        }
    }
}

/// Where the gRPC API listens.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    pub grpc_addr: std::net::SocketAddr,
    pub socket: PathBuf,
    /// Mutual TLS on the TCP face (`--tls`): only clients with a certificate of the set's CA.
    /// The unix socket stays plain.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

pub use draingate_serve::ServeError;

/// Makes way for this agent's socket at `path`: a socket nobody answers on (left by an agent
/// that died) is removed; a socket someone serves, or a file that is not a socket, is refused.
fn claim_socket(path: &std::path::Path) -> Result<(), ServeError> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::SocketInUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(|source| ServeError::Listen {
                what: path.display().to_string(),
                source,
            })
        }
        Ok(_) => Err(ServeError::NotASocket {
            path: path.to_owned(),
        }),
    }
}

/// The device and inode of the file at `path`.
fn socket_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()))
}

/// Serves the agent API on TCP and the unix socket until `shutdown` resolves.
pub async fn serve(
    handle: AgentHandle,
    listen: &ListenConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tcp = tokio::net::TcpListener::bind(listen.grpc_addr)
        .await
        .map_err(|source| ServeError::Listen {
            what: listen.grpc_addr.to_string(),
            source,
        })?;
    if let Some(dir) = listen.socket.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::Listen {
            what: dir.display().to_string(),
            source,
        })?;
    }
    claim_socket(&listen.socket)?;
    let unix =
        tokio::net::UnixListener::bind(&listen.socket).map_err(|source| ServeError::Listen {
            what: listen.socket.display().to_string(),
            source,
        })?;
    // Readable and writable by every user: the preStop hook `wait-drained --self` runs as the
    // app's user, most often not root. Every method on it reads (the API has no write); what it
    // shows is what the TCP face shows to the pod network anyway.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&listen.socket, std::fs::Permissions::from_mode(0o666)).map_err(
            |source| ServeError::Listen {
                what: listen.socket.display().to_string(),
                source,
            },
        )?;
    }
    let ours = socket_identity(&listen.socket);

    let (shutdown_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let api = AgentApi::new(handle.clone());
    let make_router = |tls: Option<tonic::transport::ServerTlsConfig>| -> Result<tonic::transport::server::Router, ServeError> {
        let (health_reporter, health) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(draingate_proto::v1::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let service = AgentServer::new(api.clone());
        tokio::spawn(async move {
            health_reporter.set_serving::<AgentServer<AgentApi>>().await;
        });
        let mut server = crate::limits::grpc_server();
        if let Some(tls) = tls {
            server = server.tls_config(tls)?;
        }
        Ok(server
            .add_service(health)
            .add_service(reflection)
            .add_service(service))
    };
    let [tcp_limits, unix_limits, _] = crate::limits::agent_faces();
    let mut tcp_stop = shutdown_tx.subscribe();
    let mut unix_stop = shutdown_tx.subscribe();
    let tcp_server = make_router(listen.tls.clone())?.serve_with_incoming_shutdown(
        crate::limits::Incoming::new(tcp, tcp_limits),
        async move {
            let _ = tcp_stop.recv().await;
        },
    );
    let unix_server = make_router(None)?.serve_with_incoming_shutdown(
        crate::limits::Incoming::new(unix, unix_limits),
        async move {
            let _ = unix_stop.recv().await;
        },
    );
    tokio::spawn(async move {
        shutdown.await;
        let _ = shutdown_tx.send(());
    });
    let (a, b) = tokio::join!(tcp_server, unix_server);
    // Only our own socket: another agent may have replaced a stale one meanwhile.
    if ours.is_some() && socket_identity(&listen.socket) == ours {
        let _ = std::fs::remove_file(&listen.socket);
    }
    a?;
    b?;
    Ok(())
}

/// An HTTP/2 error code's name (RFC 9113, section 7), or its number for codes it does not
/// define.
fn h2_error_name(code: u32) -> String {
    const NAMES: [&str; 14] = [
        "NO_ERROR",
        "PROTOCOL_ERROR",
        "INTERNAL_ERROR",
        "FLOW_CONTROL_ERROR",
        "SETTINGS_TIMEOUT",
        "STREAM_CLOSED",
        "FRAME_SIZE_ERROR",
        "REFUSED_STREAM",
        "CANCEL",
        "COMPRESSION_ERROR",
        "CONNECT_ERROR",
        "ENHANCE_YOUR_CALM",
        "INADEQUATE_SECURITY",
        "HTTP_1_1_REQUIRED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .map_or_else(|| code.to_string(), |name| (*name).to_owned())
}
