//! Finding the agents and asking them all: one `ListPods` per agent per round, with a deadline
//! each and at most `concurrency` in flight. Rounds younger than `reuse` are shared, so a burst
//! of checks costs one round.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use draingate_proto::v1::{self as pb, agent_client::AgentClient};
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

use super::AgentAnswer;

/// Largest `ListPods` answer accepted from an agent (about 40,000 pods).
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Where the agents are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// A fixed list of `HOST:PORT`.
    Static(Vec<String>),
    /// Every address a name resolves to, at `port`: a headless Service of the agent DaemonSet
    /// (`draingate-agent.draingate.svc.cluster.local`) resolves to one address per node.
    Dns { host: String, port: u16 },
}

/// Why a fixed list of agents was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListError {
    #[error("agent {0:?} is not HOST:PORT")]
    NotHostPort(String),
    #[error("no agents given: use --agents, --agents-file or --agents-dns")]
    Empty,
}

impl Discovery {
    /// `HOST:PORT` for DNS discovery.
    pub fn dns(spec: &str) -> Result<Self, String> {
        let (host, port) = spec
            .rsplit_once(':')
            .ok_or_else(|| format!("{spec:?}: expected HOST:PORT"))?;
        let port = port
            .parse()
            .map_err(|_| format!("{spec:?}: {port:?} is not a port"))?;
        if host.is_empty() {
            return Err(format!("{spec:?}: no host"));
        }
        Ok(Self::Dns {
            host: host.to_owned(),
            port,
        })
    }

    /// A fixed list: the `--agents` values, then the lines of an `--agents-file` (`#` starts a
    /// comment; blank lines are skipped), each `HOST:PORT`, sorted, without duplicates.
    ///
    /// # Errors
    /// An entry that is not `HOST:PORT` (named), or no agent at all.
    pub fn listed(agents: &[String], file: Option<&str>) -> Result<Self, ListError> {
        let mut list: Vec<String> = agents
            .iter()
            .map(|a| a.trim())
            .chain(
                file.unwrap_or_default()
                    .lines()
                    .map(|l| l.split('#').next().unwrap_or_default().trim()),
            )
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(bad) = list.iter().find(|a| {
            a.rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        }) {
            return Err(ListError::NotHostPort(bad.clone()));
        }
        list.sort();
        list.dedup();
        if list.is_empty() {
            return Err(ListError::Empty);
        }
        Ok(Self::Static(list))
    }

    async fn targets(&self) -> Result<Vec<String>, String> {
        match self {
            Self::Static(list) => Ok(list.clone()),
            Self::Dns { host, port } => {
                let mut found: Vec<String> = tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .map_err(|e| format!("cannot resolve {host}: {e}"))?
                    .map(|a| a.to_string())
                    .collect();
                found.sort();
                found.dedup();
                Ok(found)
            }
        }
    }
}

/// How the pool asks.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub discovery: Discovery,
    /// Each agent's answer must come within this.
    pub timeout: Duration,
    /// Agents asked at once.
    pub concurrency: usize,
    /// A round younger than this answers a new check too.
    pub reuse: Duration,
    /// Mutual TLS to the agents (`--agent-tls`); plain HTTP/2 when `None`.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// One round: every agent's answer, and when it was gathered.
#[derive(Debug)]
pub struct Round {
    pub at: SystemTime,
    pub started: Instant,
    pub took: Duration,
    pub answers: Vec<AgentAnswer>,
}

/// The agents, the nodes they named, and the last round.
#[derive(Debug)]
pub struct AgentPool {
    config: PoolConfig,
    /// Node names agents gave, by address: an agent that stops answering is still named by node.
    nodes: Mutex<HashMap<String, String>>,
    last: tokio::sync::Mutex<Option<Arc<Round>>>,
    limit: Arc<Semaphore>,
}

impl AgentPool {
    #[must_use]
    pub fn new(config: PoolConfig) -> Self {
        let limit = Arc::new(Semaphore::new(config.concurrency.max(1)));
        Self {
            config,
            nodes: Mutex::new(HashMap::new()),
            last: tokio::sync::Mutex::new(None),
            limit,
        }
    }

    /// A round of answers no older than the `reuse` setting; concurrent callers share one.
    /// The flag is true for the caller whose call asked the agents (a new round).
    pub async fn round(&self) -> (Arc<Round>, bool) {
        self.round_within(self.config.reuse).await
    }

    /// [`Self::round`], reusing a round only when it is younger than `max_age` too (the
    /// readiness gate wants fresh answers: a stale round delays each release by its age).
    pub async fn round_within(&self, max_age: Duration) -> (Arc<Round>, bool) {
        let mut last = self.last.lock().await;
        if let Some(round) = last.as_ref()
            && round.started.elapsed() < self.config.reuse.min(max_age)
        {
            return (Arc::clone(round), false);
        }
        let round = Arc::new(self.ask_all().await);
        *last = Some(Arc::clone(&round));
        (round, true)
    }

    /// A connection to `target` for this round only. Kept connections would cost about
    /// 50 KiB each (HTTP/2 state and buffers): 50 MiB at 1,000 nodes for a request every few
    /// seconds, while a new loopback or pod-network connection costs well under a millisecond.
    fn channel(
        target: &str,
        timeout: Duration,
        tls: Option<&tonic::transport::ClientTlsConfig>,
    ) -> Result<Channel, String> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{target}"))
            .map_err(|e| format!("invalid agent address {target:?}: {e}"))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| format!("TLS to {target}: {e}"))?;
        }
        Ok(endpoint.connect_lazy())
    }

    async fn ask_all(&self) -> Round {
        let started = Instant::now();
        let at = SystemTime::now();
        let targets = match self.config.discovery.targets().await {
            Ok(targets) => targets,
            Err(err) => {
                // Nobody to ask is not a pass: the discovery itself is the unreachable agent.
                return Round {
                    at,
                    started,
                    took: started.elapsed(),
                    answers: vec![AgentAnswer::unreachable(
                        format!("{:?}", self.config.discovery),
                        None,
                        err,
                    )],
                };
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        let budget = Arc::new(std::sync::atomic::AtomicUsize::new(
            super::MAX_PEER_FAILURES_PER_ROUND,
        ));
        for (index, target) in targets.iter().enumerate() {
            let limit = Arc::clone(&self.limit);
            let budget = Arc::clone(&budget);
            let timeout = self.config.timeout;
            let tls = self.config.tls.clone();
            let target = target.clone();
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let result = match Self::channel(&target, timeout, tls.as_ref()) {
                    Ok(channel) => ask(channel, timeout).await,
                    Err(err) => Err(err),
                };
                // Kept small at once: a round of 1,000 full answers would be 100k pods.
                let answer = match result {
                    Ok(list) => AgentAnswer::answered_within(String::new(), None, list, &budget),
                    Err(err) => AgentAnswer::unreachable(String::new(), None, err),
                };
                (index, answer)
            });
        }
        let mut results: Vec<Option<AgentAnswer>> = vec![None; targets.len()];
        while let Some(joined) = tasks.join_next().await {
            if let Ok((index, result)) = joined {
                results[index] = Some(result);
            }
        }
        let mut nodes = self
            .nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let answers = targets
            .into_iter()
            .zip(results)
            .map(|(target, answer)| {
                let mut answer = answer.unwrap_or_else(|| {
                    AgentAnswer::unreachable(String::new(), None, "the request task failed".into())
                });
                if let Ok(list) = &answer.result
                    && !list.node.is_empty()
                {
                    nodes.insert(target.clone(), list.node.clone());
                }
                answer.node = nodes.get(&target).cloned();
                answer.target = target;
                answer
            })
            .collect();
        Round {
            at,
            started,
            took: started.elapsed(),
            answers,
        }
    }
}

async fn ask(channel: Channel, timeout: Duration) -> Result<pb::ListPodsResponse, String> {
    let mut client = AgentClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES);
    let request = tonic::Request::new(pb::ListPodsRequest {
        peer_failures: true,
    });
    match tokio::time::timeout(timeout, client.list_pods(request)).await {
        Err(_) => Err(format!("no answer within {timeout:?}")),
        Ok(Err(status)) => Err(match status.code() {
            tonic::Code::Unavailable => format!("unreachable: {}", status.message()),
            code => format!("{code:?}: {}", status.message()),
        }),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

#[cfg(test)]
mod tests {
    use super::{Discovery, ListError};

    #[test]
    fn a_fixed_list_merges_flags_and_file_and_names_a_bad_entry() {
        let flags = vec![" 10.0.0.6:9560".to_owned(), String::new()];
        let file = "# the agents\n10.0.0.5:9560\n\n10.0.0.6:9560  # again\n[fd00::5]:9560\n";
        assert_eq!(
            Discovery::listed(&flags, Some(file)),
            Ok(Discovery::Static(vec![
                "10.0.0.5:9560".into(),
                "10.0.0.6:9560".into(),
                "[fd00::5]:9560".into(),
            ]))
        );
        for bad in ["10.0.0.5", "10.0.0.5:http", ":9560", "10.0.0.5:70000"] {
            assert_eq!(
                Discovery::listed(&[bad.to_owned()], None),
                Err(ListError::NotHostPort(bad.into()))
            );
        }
        assert_eq!(
            Discovery::listed(&[], Some("# nobody yet\n")),
            Err(ListError::Empty)
        );
    }
}
