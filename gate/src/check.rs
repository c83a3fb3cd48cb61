//! `draingate gate check`: one question to the gate for a CI pipeline, with an exit code to
//! branch on (0 pass, 1 fail, 2 still pending at the deadline, 3 unknown or no answer).

use std::{fmt::Write as _, time::Duration};

use draingate_proto::v1::{self as pb, gate_client::GateClient};
use tonic::transport::Endpoint;

use super::{Judgement, MAX_WAIT, Query, http::VerdictBody, verdict_name};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(
        "no draingate gate answers at {addr} (start one with `draingate gate serve`, or point \
         --gate at it)"
    )]
    NoGate {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("invalid gate address {0:?}: expected host:port or http://host:port")]
    Address(String),
    #[error("{}", .0.message())]
    Rpc(#[from] tonic::Status),
}

/// Asks the gate at `addr` (`host:port` or `http://host:port`) about `query`; with `wait`, until
/// the verdict is final or `wait` has passed (asking again past the gate's own limit).
pub async fn check(
    addr: &str,
    query: &Query,
    wait: Duration,
) -> Result<pb::CheckResponse, CheckError> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint =
        Endpoint::from_shared(url.clone()).map_err(|_| CheckError::Address(addr.into()))?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|source| CheckError::NoGate { addr: url, source })?;
    let mut client =
        GateClient::new(channel).max_decoding_message_size(super::pool::MAX_ANSWER_BYTES);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let this_wait = left.min(MAX_WAIT);
        let mut request = tonic::Request::new(pb::CheckRequest {
            workload: Some(pb::WorkloadRef {
                namespace: query.namespace.clone(),
                kind: query.kind.as_str().into(),
                name: query.name.clone(),
            }),
            old_hash: query.old.clone().unwrap_or_default(),
            new_hash: query.new.clone().unwrap_or_default(),
            wait: Some(this_wait.try_into().unwrap_or_default()),
        });
        request.set_timeout(this_wait + Duration::from_secs(30));
        let response = client.check(request).await?.into_inner();
        let verdict = pb::Verdict::try_from(response.verdict).unwrap_or(pb::Verdict::Unknown);
        let done = matches!(verdict, pb::Verdict::Pass | pb::Verdict::Fail);
        if done || tokio::time::Instant::now() >= deadline {
            return Ok(response);
        }
    }
}

/// The exit code for a verdict: 0 pass, 1 fail, 2 pending, 3 unknown.
#[must_use]
pub fn exit_code(response: &pb::CheckResponse) -> u8 {
    match pb::Verdict::try_from(response.verdict).unwrap_or(pb::Verdict::Unknown) {
        pb::Verdict::Pass => 0,
        pb::Verdict::Fail => 1,
        pb::Verdict::Pending => 2,
        _ => 3,
    }
}

fn judgement(response: &pb::CheckResponse) -> Judgement {
    Judgement {
        verdict: pb::Verdict::try_from(response.verdict).unwrap_or(pb::Verdict::Unknown),
        reason: response.reason.clone(),
        terminating_pods: response.terminating_pods,
        drained_pods: response.drained_pods,
        inflight_at_kill: response.inflight_at_kill,
        resets: response.resets,
        failed_requests: response.failed_requests,
        pods: response.pods.clone(),
        unreachable: response.unreachable_nodes.clone(),
        agents: response.agents,
        agents_answered: response.agents_answered,
        checked_at: response
            .checked_at
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .unwrap_or(std::time::UNIX_EPOCH),
        from_history: response.from_history,
    }
}

/// The answer as the HTTP face's JSON body.
#[must_use]
pub fn to_json(query: &Query, response: &pb::CheckResponse) -> serde_json::Value {
    serde_json::to_value(VerdictBody::new(query, &judgement(response))).unwrap_or_default()
}

/// The answer for people.
#[must_use]
pub fn render(query: &Query, response: &pb::CheckResponse) -> String {
    let j = judgement(response);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {}{}",
        query.describe(),
        verdict_name(j.verdict).to_uppercase(),
        if j.from_history {
            " (from the gate's history)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "  {}", j.reason);
    let _ = writeln!(
        out,
        "  {} terminated pods, {} drained; {} errors, {} resets, {} connections open at exit; {} of {} agents answered",
        j.terminating_pods,
        j.drained_pods,
        j.failed_requests,
        j.resets,
        j.inflight_at_kill,
        j.agents_answered,
        j.agents
    );
    for node in &j.unreachable {
        let _ = writeln!(out, "  unreachable: {node}");
    }
    if !j.pods.is_empty() {
        let _ = writeln!(
            out,
            "  {:<40} {:<10} {:<8} {:>6} {:>6} {:>8}  NODE",
            "POD", "HASH", "VERDICT", "ERRORS", "OPEN", "AT EXIT"
        );
        for p in &j.pods {
            let name = p.pod.as_ref().map_or("?", |r| r.name.as_str());
            let _ = writeln!(
                out,
                "  {:<40} {:<10} {:<8} {:>6} {:>6} {:>8}  {}",
                name,
                p.pod_template_hash,
                verdict_name(pb::Verdict::try_from(p.verdict).unwrap_or(pb::Verdict::Unknown)),
                p.errors,
                p.open,
                p.open_at_exit,
                p.node
            );
        }
    }
    out
}
