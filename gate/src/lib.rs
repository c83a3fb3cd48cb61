//! The rollout gate: every node's evidence turned into one verdict per rollout (docs/verdict.md,
//! "Per rollout"). [`judge`] is the whole rule, over what the agents answered; [`pool`] asks the
//! agents; [`History`] keeps final verdicts after the agents forgot the pods; [`http`] and
//! [`api`] are the faces (docs/rollout-tools.md has the contracts).
//!
//! The rule, in order: a rollout `fail`s when any of its terminated pods failed (a known failure
//! is conclusive even with a node missing); it is `unknown` when an agent could not be asked or
//! a pod's evidence is incomplete (never `pass`); `pending` while a pod still drains or none has
//! started terminating; `pass` when every terminated pod passed.
//!
//! Before the rule, each pod gets the peer view from the other nodes (`PeerIndex`): connects
//! to its addresses by clients there that got no answer inside its window fail it, and a node
//! that dropped such evidence from that time makes it `unknown`.

use std::{net::SocketAddr, sync::Mutex, time::Duration};

use draingate_proto::v1 as pb;
use draingate_serve::telemetry::chain;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

pub mod api;
pub mod check;
pub mod controller;
mod history;
pub mod hold;
pub mod http;
pub mod lease;
pub mod pool;
mod query;
mod rule;
pub mod webhook;

pub use history::History;
pub use query::{Kind, Query, QueryError, check_wait};
pub use rule::{
    AgentAnswer, JudgeError, Judgement, MAX_PEER_FAILURES_PER_ROUND, PeerFailure, judge,
    rollouts_in, verdict_name,
};

/// Default address of the gate's HTTP face (rollout tools).
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:8080";
/// Default address of the gate's gRPC face (`draingate gate check`).
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:9562";
/// Longest `wait` a check may ask for.
pub const MAX_WAIT: Duration = Duration::from_mins(10);

/// The gate's Prometheus series.
#[derive(Debug)]
struct GateMetrics {
    checks: Family<CheckLabels, Counter>,
    agents: Family<AgentLabels, Gauge>,
    rounds: Histogram,
    rollouts: Family<RolloutLabels, Gauge>,
    rollout_errors: Family<RolloutLabels, Gauge>,
    history: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    face: &'static str,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabels {
    namespace: String,
    kind: &'static str,
    workload: String,
    pod_template_hash: String,
    verdict: &'static str,
}

fn round_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0])
}

/// How a gate runs; the defaults are what `draingate gate serve` uses.
#[derive(Debug, Clone)]
pub struct GateConfig {
    pub pool: pool::PoolConfig,
    /// How often every rollout's verdict is refreshed into the history and the metrics.
    pub poll: Duration,
    pub history_size: usize,
    pub history_age: Duration,
}

/// The gate: the agents, the history and the metrics behind every face.
#[derive(Debug)]
pub struct Gate {
    pool: pool::AgentPool,
    history: Mutex<History>,
    metrics: GateMetrics,
    poll: Duration,
}

/// Which face asked, for the metrics.
#[derive(Debug, Clone, Copy)]
pub enum Face {
    Http,
    Grpc,
    Flagger,
}

impl Gate {
    #[must_use]
    pub fn new(config: GateConfig) -> Self {
        Self {
            pool: pool::AgentPool::new(config.pool),
            history: Mutex::new(History::new(config.history_size, config.history_age)),
            metrics: GateMetrics {
                checks: Family::default(),
                agents: Family::default(),
                rounds: round_histogram(),
                rollouts: Family::default(),
                rollout_errors: Family::default(),
                history: Gauge::default(),
            },
            poll: config.poll,
        }
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The verdict now, from a fresh round of the agents' answers (or one shared with a
    /// concurrent check), falling back to the history when the agents no longer know the pods.
    pub async fn check(&self, query: &Query, face: Face) -> Result<Judgement, JudgeError> {
        let round = self.round().await;
        let judged = judge(query, &round.answers, round.at);
        let result = match judged {
            Ok(j) if j.terminating_pods == 0 && j.verdict == pb::Verdict::Pending => {
                Ok(self.history().lookup(query, round.at).unwrap_or(j))
            }
            Ok(j) => {
                self.history().record(query, &j);
                Ok(j)
            }
            Err(JudgeError::UnknownWorkload(w)) => self
                .history()
                .lookup(query, round.at)
                .ok_or(JudgeError::UnknownWorkload(w)),
            Err(e) => Err(e),
        };
        let verdict = result.as_ref().map_or("error", |j| verdict_name(j.verdict));
        self.metrics
            .checks
            .get_or_create(&CheckLabels {
                face: match face {
                    Face::Http => "http",
                    Face::Grpc => "grpc",
                    Face::Flagger => "flagger",
                },
                verdict,
            })
            .inc();
        result
    }

    /// Checks until the verdict is final (pass or fail) or `wait` (capped at [`MAX_WAIT`]) has
    /// passed; `on_each` sees every answer. A workload nobody knows is an error at once.
    pub async fn check_until_final(
        &self,
        query: &Query,
        wait: Duration,
        face: Face,
        mut on_each: impl FnMut(&Judgement),
    ) -> Result<Judgement, JudgeError> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        loop {
            let judgement = self.check(query, face).await?;
            on_each(&judgement);
            let now = tokio::time::Instant::now();
            if judgement.is_final() || now >= deadline {
                return Ok(judgement);
            }
            tokio::time::sleep((deadline - now).min(Duration::from_secs(1))).await;
        }
    }

    /// Every `poll`: one round, every rollout with terminated pods judged into the history and
    /// the metrics. Runs until dropped.
    pub async fn poll_forever(self: std::sync::Arc<Self>) {
        let mut ticker = tokio::time::interval(self.poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let round = self.round().await;
            self.metrics.rollouts.clear();
            self.metrics.rollout_errors.clear();
            for query in rollouts_in(&round.answers) {
                let Ok(judgement) = judge(&query, &round.answers, round.at) else {
                    continue;
                };
                self.history().record(&query, &judgement);
                let labels = RolloutLabels {
                    namespace: query.namespace.clone(),
                    kind: query.kind.as_str(),
                    workload: query.name.clone(),
                    pod_template_hash: query.old.clone().unwrap_or_default(),
                    verdict: verdict_name(judgement.verdict),
                };
                self.metrics.rollouts.get_or_create(&labels).set(1);
                self.metrics
                    .rollout_errors
                    .get_or_create(&labels)
                    .set(i64::try_from(judgement.failed_requests).unwrap_or(i64::MAX));
            }
            let kept = self.history().len();
            self.metrics
                .history
                .set(i64::try_from(kept).unwrap_or(i64::MAX));
        }
    }

    /// A round of the agents' answers; a new one goes into the metrics once.
    pub(crate) async fn round(&self) -> std::sync::Arc<pool::Round> {
        self.round_within(Duration::MAX).await
    }

    /// A round no older than `max_age` (nor than the pool's reuse setting).
    pub(crate) async fn round_within(&self, max_age: Duration) -> std::sync::Arc<pool::Round> {
        let (round, new) = self.pool.round_within(max_age).await;
        if new {
            self.observe(&round);
        }
        round
    }

    fn observe(&self, round: &pool::Round) {
        let answered = round.answers.iter().filter(|a| a.result.is_ok()).count();
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics
            .agents
            .get_or_create(&AgentLabels { state: "answered" })
            .set(count(answered));
        self.metrics
            .agents
            .get_or_create(&AgentLabels {
                state: "unreachable",
            })
            .set(count(round.answers.len() - answered));
        self.metrics.rounds.observe(round.took.as_secs_f64());
    }

    /// The Prometheus text of the gate's metrics.
    #[must_use]
    pub fn render_metrics(&self) -> String {
        let mut registry = Registry::with_prefix("draingate_gate");
        registry.register(
            "checks",
            "Verdict checks answered, by face and verdict",
            self.metrics.checks.clone(),
        );
        registry.register(
            "agents",
            "Agents in the last round, answered or unreachable",
            self.metrics.agents.clone(),
        );
        registry.register(
            "round_duration_seconds",
            "Time to ask every agent once",
            self.metrics.rounds.clone(),
        );
        registry.register(
            "rollout_verdict",
            "1 for each rollout (workload and old pod-template-hash) with terminated pods, \
             labelled with its verdict at the last poll",
            self.metrics.rollouts.clone(),
        );
        registry.register(
            "rollout_failed_requests",
            "Errors inside the terminated pods' windows, per rollout, at the last poll",
            self.metrics.rollout_errors.clone(),
        );
        registry.register(
            "history_entries",
            "Final verdicts kept after the agents forgot the pods",
            self.metrics.history.clone(),
        );
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %chain(&err), "cannot encode the metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests;

/// One connection per agent in flight: lifts the soft open-files limit to the hard one.
pub fn raise_open_files_limit() {
    let _ = draingate_serve::limits::raise_open_files_limit();
}

/// Where the gate listens.
#[derive(Debug, Clone)]
pub struct GateListen {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

/// Serves both faces, and polls the agents, until `shutdown` resolves.
pub async fn serve(
    gate: std::sync::Arc<Gate>,
    listen: &GateListen,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), draingate_serve::ServeError> {
    use draingate_proto::v1::gate_server::GateServer;
    use draingate_serve::ServeError;
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Listen {
                what: addr.to_string(),
                source,
            })
    };
    let http_listener = bind(listen.http).await?;
    let grpc_listener = bind(listen.grpc).await?;
    tracing::info!(http = %listen.http, grpc = %listen.grpc, "gate serving");
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let poller = tokio::spawn(std::sync::Arc::clone(&gate).poll_forever());

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<GateServer<api::GateApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(draingate_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let mut grpc_stop = stop.subscribe();
    let [http_limits, grpc_limits] = draingate_serve::limits::gate_faces(MAX_WAIT);
    let grpc = draingate_serve::limits::grpc_server()
        .add_service(health)
        .add_service(reflection)
        .add_service(GateServer::new(api::GateApi::new(std::sync::Arc::clone(
            &gate,
        ))))
        .serve_with_incoming_shutdown(
            draingate_serve::limits::Incoming::new(grpc_listener, grpc_limits),
            async move {
                let _ = grpc_stop.recv().await;
            },
        );
    let mut http_stop = stop.subscribe();
    let http = draingate_serve::limits::serve_http(
        http_listener,
        http_limits,
        http::router(gate),
        async move {
            let _ = http_stop.recv().await;
        },
    );
    let stopper = async move {
        shutdown.await;
        let _ = stop.send(());
    };
    let (grpc, http, ()) = tokio::join!(grpc, http, stopper);
    poller.abort();
    let () = http;
    grpc?;
    Ok(())
}
