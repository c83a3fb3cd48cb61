//! The gate's gRPC face, `draingate.v1.Gate`: `Check` (optionally waiting for a final verdict)
//! and `Watch` (every change until final), for `draingate gate check` and automation.

use std::{pin::Pin, sync::Arc, time::Duration};

use draingate_proto::v1::{self as pb, gate_server::Gate as GateService};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::{Face, Gate, JudgeError, Judgement, MAX_WAIT, Query};

/// The `draingate.v1.Gate` service over a gate.
#[derive(Debug, Clone)]
pub struct GateApi {
    gate: Arc<Gate>,
}

impl GateApi {
    #[must_use]
    pub fn new(gate: Arc<Gate>) -> Self {
        Self { gate }
    }
}

fn parse(request: &pb::CheckRequest) -> Result<(Query, Duration), Status> {
    let w = request
        .workload
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("workload is required"))?;
    let kind = (!w.kind.is_empty()).then_some(w.kind.as_str());
    let query = Query::new(
        &w.namespace,
        &w.name,
        kind,
        Some(&request.old_hash),
        Some(&request.new_hash),
    )
    .map_err(|e| Status::invalid_argument(e.0))?;
    let wait = match request.wait {
        None => Duration::ZERO,
        Some(d) => Duration::try_from(d)
            .map_err(|_| Status::invalid_argument("wait must not be negative"))?,
    };
    let wait = super::check_wait(wait).map_err(|e| Status::invalid_argument(e.0))?;
    Ok((query, wait))
}

fn status(err: &JudgeError) -> Status {
    match err {
        JudgeError::UnknownWorkload(_) => Status::not_found(err.to_string()),
        JudgeError::NoAgents => Status::unavailable(err.to_string()),
    }
}

/// The API's view of a judgement.
#[must_use]
pub fn response(query: &Query, j: &Judgement) -> pb::CheckResponse {
    pb::CheckResponse {
        verdict: j.verdict.into(),
        reason: j.reason.clone(),
        terminating_pods: j.terminating_pods,
        drained_pods: j.drained_pods,
        inflight_at_kill: j.inflight_at_kill,
        resets: j.resets,
        failed_requests: j.failed_requests,
        pods: j.pods.clone(),
        unreachable_nodes: j.unreachable.clone(),
        workload: Some(pb::WorkloadRef {
            namespace: query.namespace.clone(),
            kind: query.kind.as_str().into(),
            name: query.name.clone(),
        }),
        agents: j.agents,
        agents_answered: j.agents_answered,
        checked_at: Some(j.checked_at.into()),
        from_history: j.from_history,
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl GateService for GateApi {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let (query, wait) = parse(request.get_ref())?;
        let judgement = self
            .gate
            .check_until_final(&query, wait, Face::Grpc, |_| {})
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(response(&query, &judgement)))
    }

    type WatchStream = BoxStream<pb::CheckResponse>;

    async fn watch(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (query, wait) = parse(request.get_ref())?;
        // The first answer comes at once, so a bad workload is an error, not an empty stream.
        let first = self
            .gate
            .check(&query, Face::Grpc)
            .await
            .map_err(|e| status(&e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let gate = Arc::clone(&self.gate);
        let _ = tx.send(Ok(response(&query, &first))).await;
        if !first.is_final() {
            let wait = if wait.is_zero() { MAX_WAIT } else { wait };
            let deadline = tokio::time::Instant::now() + wait;
            tokio::spawn(async move {
                let mut last = first;
                loop {
                    tokio::select! {
                        // The client left.
                        () = tx.closed() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    let judgement = match gate.check(&query, Face::Grpc).await {
                        Ok(j) => j,
                        Err(err) => {
                            let _ = tx.send(Err(status(&err))).await;
                            return;
                        }
                    };
                    // Only changes are sent; the time of the check is not a change.
                    let changed = Judgement {
                        checked_at: last.checked_at,
                        ..judgement.clone()
                    } != last;
                    if changed && tx.send(Ok(response(&query, &judgement))).await.is_err() {
                        return;
                    }
                    if judgement.is_final() || tokio::time::Instant::now() >= deadline {
                        return;
                    }
                    last = judgement;
                }
            });
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
