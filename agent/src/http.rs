//! The agent's HTTP face: Prometheus `/metrics` (prefix `draingate_`, labels namespace, pod,
//! uid), `/healthz` (the process answers) and `/readyz` (programs attached and the inventory
//! read at least once). Read-only: there is nothing to write here.

use std::fmt::Write as _;

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::agent::{AgentHandle, AgentState};

/// Default address of the agent's HTTP endpoints.
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:9561";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    pod: String,
    uid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    namespace: String,
    pod: String,
    uid: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    namespace: String,
    pod: String,
    uid: String,
    verdict: String,
}

/// The metrics text for the current state. Built per scrape: pods come and go, and a finished
/// pod's series stay (with final totals) as long as the agent keeps the pod.
#[must_use]
pub fn render_metrics(state: &AgentState) -> String {
    let mut registry = Registry::with_prefix("draingate");
    let open = Family::<PodLabels, Gauge>::default();
    let errors = Family::<PodLabels, Gauge>::default();
    let open_at_exit = Family::<PodLabels, Gauge>::default();
    let verdict = Family::<VerdictLabels, Gauge>::default();
    let http = Family::<HttpLabels, Counter>::default();
    let counters: [(&str, &str, Family<PodLabels, Counter>); 14] = [
        (
            "accepted",
            "Connections the pod accepted",
            Family::default(),
        ),
        ("opened", "Connections the pod opened", Family::default()),
        (
            "resets_sent",
            "Resets the pod sent on its connections",
            Family::default(),
        ),
        (
            "resets_received",
            "Resets the pod received on its connections",
            Family::default(),
        ),
        (
            "refused",
            "Connections the pod refused (reset answering a segment with no socket)",
            Family::default(),
        ),
        (
            "failed_connects",
            "Connects by the pod that were never established",
            Family::default(),
        ),
        (
            "peer_failures",
            "Connects to the pod by clients on this node that got no answer, inside its window",
            Family::default(),
        ),
        (
            "from_node",
            "Resets and refusals with the node's own addresses (kubelet probes): not errors",
            Family::default(),
        ),
        (
            "startup_errors",
            "Errors outside the termination window (a new pod's fail a rollout)",
            Family::default(),
        ),
        (
            "http_from_node",
            "HTTP responses to the node's own addresses (kubelet probes), any status: not errors",
            Family::default(),
        ),
        (
            "requests_cut",
            "HTTP/1.x requests the pod closed connections on without answering (a FIN with the \
             request outstanding): errors inside the window",
            Family::default(),
        ),
        (
            "http2_goaways",
            "HTTP/2 GOAWAY frames the pod sent (its drain signal): not errors",
            Family::default(),
        ),
        (
            "http2_refused_streams",
            "HTTP/2 streams the pod reset with REFUSED_STREAM (the client may retry): not errors",
            Family::default(),
        ),
        (
            "http2_resets",
            "HTTP/2 streams the pod reset with an error (not NO_ERROR, not REFUSED_STREAM): \
             errors inside the window",
            Family::default(),
        ),
    ];
    for pod in state.pods.values() {
        let labels = PodLabels {
            namespace: pod.id.namespace.clone(),
            pod: pod.id.name.clone(),
            uid: pod.id.uid.clone(),
        };
        let t = pod.totals;
        open.get_or_create(&labels)
            .set(i64::try_from(t.open).unwrap_or(i64::MAX));
        errors
            .get_or_create(&labels)
            .set(i64::try_from(pod.errors()).unwrap_or(i64::MAX));
        open_at_exit.get_or_create(&labels).set(
            pod.open_at_exit
                .map_or(-1, |o| i64::try_from(o).unwrap_or(i64::MAX)),
        );
        for ((_, _, family), value) in counters.iter().zip([
            t.accepted,
            t.opened,
            t.resets_sent,
            t.resets_received,
            t.refused,
            t.failed_connects,
            pod.peer_failures,
            t.from_node,
            pod.startup().errors(),
            t.http_from_node,
            t.requests_cut,
            t.h2_goaways,
            t.h2_resets_refused,
            t.h2_resets,
        ]) {
            family.get_or_create(&labels).inc_by(value);
        }
        for (class, value) in [("ok", t.http_ok), ("4xx", t.http_4xx), ("5xx", t.http_5xx)] {
            http.get_or_create(&HttpLabels {
                namespace: labels.namespace.clone(),
                pod: labels.pod.clone(),
                uid: labels.uid.clone(),
                class,
            })
            .inc_by(value);
        }
        verdict
            .get_or_create(&VerdictLabels {
                namespace: labels.namespace,
                pod: labels.pod,
                uid: labels.uid,
                verdict: pod.verdict().as_str().to_owned(),
            })
            .set(1);
    }
    registry.register(
        "pod_open_connections",
        "Connections open now (any state but LISTEN and CLOSE)",
        open,
    );
    registry.register(
        "pod_drain_errors",
        "Errors inside the termination window (resets, refusals, connects without answer, \
         HTTP 5xx)",
        errors,
    );
    registry.register(
        "pod_http_responses",
        "HTTP/1.x responses the pod sent to clients, by status class (ok: 1xx to 3xx)",
        http,
    );
    registry.register(
        "pod_open_at_exit",
        "Connections open when the last process exited (-1: not exited)",
        open_at_exit,
    );
    registry.register(
        "pod_verdict",
        "1 for the pod's current verdict (none, pending, pass, fail, unknown)",
        verdict,
    );
    for (name, help, family) in counters {
        registry.register(format!("pod_{name}"), help, family);
    }
    let lost = Counter::<u64>::default();
    lost.inc_by(state.lost_events);
    registry.register(
        "lost_events",
        "Kernel events not counted (overflow, failed reads); non-zero makes verdicts unknown",
        lost,
    );
    let forgotten = Counter::<u64>::default();
    forgotten.inc_by(state.resets_forgotten);
    registry.register(
        "resets_forgotten",
        "Resets under a second old the full reset table forgot: a late repeat of one may count \
         as a new failure (never a failure missed)",
        forgotten,
    );
    let mut text = String::new();
    if encode(&mut text, &registry).is_err() {
        let _ = writeln!(text, "# encoding failed");
    }
    text
}

async fn metrics(State(handle): State<AgentHandle>) -> impl IntoResponse {
    let text = {
        let state = handle
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        render_metrics(&state)
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

async fn readyz(State(handle): State<AgentHandle>) -> impl IntoResponse {
    if !*handle.ready.borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: inventory not read yet\n".to_owned(),
        );
    }
    let problem = handle
        .state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .inventory_problem
        .clone();
    match problem {
        // The kernel keeps counting meanwhile; the pods' names may be stale.
        Some(problem) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {problem}\n"),
        ),
        None => (StatusCode::OK, "ready\n".to_owned()),
    }
}

/// The HTTP endpoints' router.
pub fn router(handle: AgentHandle) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(handle)
}

/// Serves the HTTP endpoints on `listener` until `shutdown` resolves, within the agent HTTP
/// face's limits (see [`crate::limits`]).
pub async fn serve(
    handle: AgentHandle,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let [_, _, limits] = crate::limits::agent_faces();
    crate::limits::serve_http(listener, limits, router(handle), shutdown).await;
    Ok(())
}
