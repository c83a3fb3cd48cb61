//! The gate's HTTP face, for rollout tools (docs/rollout-tools.md has the contracts):
//! - `GET /v1/verdict?namespace=&workload=&kind=&old=&new=&wait=`: always 200 with the verdict
//!   in the body (Argo Rollouts' `web` metric provider counts a non-2xx as an error and aborts
//!   after a few); 400 for a malformed query, 404 for a workload no agent knows;
//! - `POST /flagger/gate`: 200 when clean, 412 otherwise (Flagger retries neither);
//! - `POST /flagger/rollback`: 200 when the rollout failed (a 2xx makes Flagger roll back);
//! - `POST /flagger/events`: 200, logged;
//! - `/metrics` (Prometheus), `/healthz`.
//!
//! Nothing here changes state: the POSTs are questions (Flagger only speaks POST). Bodies are
//! limited to [`MAX_BODY`].

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Query as QueryParams, State, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use draingate_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use super::{Face, Gate, JudgeError, Judgement, Query, QueryError, verdict_name};

/// Largest request body accepted (Flagger's payloads are a few hundred bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// The query of `GET /v1/verdict`. `ns` and `namespace` are one; `rollout=NAME` is
/// `workload=NAME&kind=Rollout`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerdictParams {
    #[serde(alias = "ns")]
    namespace: Option<String>,
    workload: Option<String>,
    rollout: Option<String>,
    kind: Option<String>,
    old: Option<String>,
    new: Option<String>,
    /// `30s`, `2m`, or plain seconds.
    wait: Option<String>,
}

fn parse_wait(wait: Option<&str>) -> Result<Duration, QueryError> {
    let Some(wait) = wait.filter(|w| !w.is_empty()) else {
        return Ok(Duration::ZERO);
    };
    let parsed = wait.parse::<u64>().map(Duration::from_secs).or_else(|_| {
        humantime::parse_duration(wait)
            .map_err(|e| QueryError(format!("invalid wait {wait:?}: {e}")))
    })?;
    super::check_wait(parsed)
}

impl VerdictParams {
    fn query(&self) -> Result<(Query, Duration), QueryError> {
        let namespace = self
            .namespace
            .as_deref()
            .ok_or_else(|| QueryError("namespace (or ns) is required".into()))?;
        let (workload, kind) = match (&self.workload, &self.rollout) {
            (Some(w), None) => (w.as_str(), self.kind.as_deref()),
            (None, Some(r)) => (r.as_str(), Some(self.kind.as_deref().unwrap_or("Rollout"))),
            (Some(_), Some(_)) => {
                return Err(QueryError("give workload or rollout, not both".into()));
            }
            (None, None) => return Err(QueryError("workload (or rollout) is required".into())),
        };
        let query = Query::new(
            namespace,
            workload,
            kind,
            self.old.as_deref(),
            self.new.as_deref(),
        )?;
        Ok((query, parse_wait(self.wait.as_deref())?))
    }
}

/// One pod as the verdict body lists it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PodBody {
    namespace: String,
    name: String,
    uid: String,
    node: String,
    pod_template_hash: String,
    verdict: &'static str,
    reason: String,
    errors: u64,
    open: u64,
    open_at_exit: u64,
    resets: u64,
    refused: u64,
}

/// The body of `GET /v1/verdict` (its fields are listed in docs/rollout-tools.md).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerdictBody {
    verdict: &'static str,
    reason: String,
    namespace: String,
    kind: &'static str,
    workload: String,
    old: Option<String>,
    new: Option<String>,
    terminating_pods: u32,
    drained_pods: u32,
    inflight_at_kill: u64,
    rsts: u64,
    failed_requests: u64,
    unreachable_nodes: Vec<String>,
    agents: u32,
    agents_answered: u32,
    checked_at: String,
    from_history: bool,
    pods: Vec<PodBody>,
}

impl VerdictBody {
    #[must_use]
    pub fn new(query: &Query, j: &Judgement) -> Self {
        Self {
            verdict: verdict_name(j.verdict),
            reason: j.reason.clone(),
            namespace: query.namespace.clone(),
            kind: query.kind.as_str(),
            workload: query.name.clone(),
            old: query.old.clone(),
            new: query.new.clone(),
            terminating_pods: j.terminating_pods,
            drained_pods: j.drained_pods,
            inflight_at_kill: j.inflight_at_kill,
            rsts: j.resets,
            failed_requests: j.failed_requests,
            unreachable_nodes: j.unreachable.clone(),
            agents: j.agents,
            agents_answered: j.agents_answered,
            checked_at: humantime::format_rfc3339_millis(j.checked_at).to_string(),
            from_history: j.from_history,
            pods: j.pods.iter().map(pod_body).collect(),
        }
    }
}

fn pod_body(p: &pb::Pod) -> PodBody {
    let r = p.pod.clone().unwrap_or_default();
    let w = p.window.unwrap_or_default();
    PodBody {
        namespace: r.namespace,
        name: r.name,
        uid: r.uid,
        node: p.node.clone(),
        pod_template_hash: p.pod_template_hash.clone(),
        verdict: verdict_name(pb::Verdict::try_from(p.verdict).unwrap_or(pb::Verdict::Unknown)),
        reason: p.reason.clone(),
        errors: p.errors,
        open: p.open,
        open_at_exit: p.open_at_exit,
        resets: w.resets_sent + w.resets_received,
        refused: w.refused,
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn judge_error(err: &JudgeError) -> Response {
    match err {
        JudgeError::UnknownWorkload(_) => error(StatusCode::NOT_FOUND, err.to_string()),
        // The gate itself is broken: the one case rollout tools should see as an error.
        JudgeError::NoAgents => error(StatusCode::SERVICE_UNAVAILABLE, err.to_string()),
    }
}

async fn verdict(
    State(gate): State<Arc<Gate>>,
    params: Result<QueryParams<VerdictParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let params = match params {
        Ok(QueryParams(p)) => p,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("malformed query: {}", rejection.body_text()),
            );
        }
    };
    let (query, wait) = match params.query() {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.0),
    };
    match gate
        .check_until_final(&query, wait, Face::Http, |_| {})
        .await
    {
        Ok(j) => Json(VerdictBody::new(&query, &j)).into_response(),
        Err(e) => judge_error(&e),
    }
}

/// Flagger's webhook payload.
#[derive(Debug, Deserialize)]
struct FlaggerHook {
    name: String,
    namespace: String,
    #[serde(default)]
    phase: String,
    #[serde(default)]
    metadata: std::collections::BTreeMap<String, String>,
}

impl FlaggerHook {
    /// The workload judged: `metadata.workload` (`deploy/NAME`, `rollout/NAME`), else the
    /// Deployment named like the canary; `metadata.old` / `metadata.new` narrow it.
    fn query(&self) -> Result<Query, QueryError> {
        let workload = self.metadata.get("workload").unwrap_or(&self.name);
        Query::new(
            &self.namespace,
            workload,
            self.metadata.get("kind").map(String::as_str),
            self.metadata.get("old").map(String::as_str),
            self.metadata.get("new").map(String::as_str),
        )
    }
}

fn flagger_body(
    body: Result<Json<FlaggerHook>, JsonRejection>,
) -> Result<(FlaggerHook, Query), Box<Response>> {
    let Json(hook) = body.map_err(|rejection| {
        let status = rejection.status();
        Box::new(error(
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                status
            } else {
                StatusCode::BAD_REQUEST
            },
            format!("malformed Flagger payload: {}", rejection.body_text()),
        ))
    })?;
    let query = hook
        .query()
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, e.0)))?;
    Ok((hook, query))
}

/// Answers a Flagger webhook: 200 when `yes` holds for the judgement, 412 (which Flagger does not
/// retry) otherwise or when the gate cannot judge; the verdict body either way.
async fn flagger_answer(
    gate: &Gate,
    body: Result<Json<FlaggerHook>, JsonRejection>,
    hook_type: &'static str,
    yes: fn(&Judgement) -> bool,
) -> Response {
    let (hook, query) = match flagger_body(body) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    let (answer, body) = match &gate.check(&query, Face::Flagger).await {
        Ok(j) => (
            yes(j),
            serde_json::to_value(VerdictBody::new(&query, j)).unwrap_or_default(),
        ),
        Err(e) => (false, serde_json::json!({ "error": e.to_string() })),
    };
    tracing::info!(canary = %hook.name, namespace = %hook.namespace, phase = %hook.phase, hook_type, answer, "flagger webhook");
    let status = if answer {
        StatusCode::OK
    } else {
        StatusCode::PRECONDITION_FAILED
    };
    (status, Json(body)).into_response()
}

/// 200 when the rollout is clean so far (pass, or nothing terminated yet); 412 otherwise.
async fn flagger_gate(
    State(gate): State<Arc<Gate>>,
    body: Result<Json<FlaggerHook>, JsonRejection>,
) -> Response {
    flagger_answer(&gate, body, "gate", |j| {
        j.verdict == pb::Verdict::Pass
            || (j.verdict == pb::Verdict::Pending && j.terminating_pods == 0)
    })
    .await
}

/// 200 (roll back) only when the rollout failed; 412 otherwise.
async fn flagger_rollback(
    State(gate): State<Arc<Gate>>,
    body: Result<Json<FlaggerHook>, JsonRejection>,
) -> Response {
    flagger_answer(&gate, body, "rollback", |j| j.verdict == pb::Verdict::Fail).await
}

/// Flagger's events, logged; always 200.
async fn flagger_events(body: Result<Json<FlaggerHook>, JsonRejection>) -> Response {
    match body {
        Ok(Json(hook)) => {
            let message = hook.metadata.get("eventMessage").map_or("", String::as_str);
            tracing::info!(canary = %hook.name, namespace = %hook.namespace, phase = %hook.phase, message, "flagger event");
        }
        Err(rejection) => {
            tracing::debug!(error = %rejection.body_text(), "unreadable flagger event");
        }
    }
    StatusCode::OK.into_response()
}

async fn metrics(State(gate): State<Arc<Gate>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        gate.render_metrics(),
    )
        .into_response()
}

/// The gate's HTTP routes.
pub fn router(gate: Arc<Gate>) -> Router {
    Router::new()
        .route("/v1/verdict", get(verdict))
        .route("/flagger/gate", post(flagger_gate))
        .route("/flagger/rollback", post(flagger_rollback))
        .route("/flagger/events", post(flagger_events))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(gate)
}

#[cfg(test)]
mod tests {
    use super::{VerdictParams, parse_wait};

    fn params(q: &str) -> Result<VerdictParams, String> {
        let uri: axum::http::Uri = format!("/v1/verdict?{q}").parse().unwrap();
        axum::extract::Query::<VerdictParams>::try_from_uri(&uri)
            .map(|p| p.0)
            .map_err(|e| e.body_text())
    }

    #[test]
    fn verdict_queries_parse_as_rollout_tools_write_them() {
        let (q, wait) = params("ns=shop&rollout=web&old=abc12&new=def34&wait=30s")
            .unwrap()
            .query()
            .unwrap();
        assert_eq!(q.describe(), "shop/Rollout/web old abc12 new def34");
        assert_eq!(wait.as_secs(), 30);
        let (q, _) = params("namespace=shop&workload=deploy/web")
            .unwrap()
            .query()
            .unwrap();
        assert_eq!(q.describe(), "shop/Deployment/web");
        assert_eq!(parse_wait(Some("15")).unwrap().as_secs(), 15);
    }

    #[test]
    fn malformed_verdict_queries_say_what_is_wrong() {
        assert!(params("namespace=a&workload=b&colour=red").is_err());
        for (q, expect) in [
            ("workload=web", "namespace"),
            ("namespace=shop", "workload"),
            ("namespace=shop&workload=web&rollout=web", "not both"),
            ("namespace=Shop&workload=web", "invalid namespace"),
            (
                "namespace=shop&workload=statefulset/web",
                "unknown workload kind",
            ),
            ("namespace=shop&workload=web&wait=soon", "invalid wait"),
            ("namespace=shop&workload=web&wait=2h", "limit"),
            ("namespace=shop&workload=web&old=a&new=a", "same"),
        ] {
            let err = params(q).unwrap().query().unwrap_err();
            assert!(err.0.contains(expect), "{q}: {err}");
        }
    }
}
