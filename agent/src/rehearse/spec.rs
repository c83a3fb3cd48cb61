//! What a rehearsal rolls out: the rolling-update parameters of a Deployment, from flags or from a
//! manifest. Parsed into k8s-openapi's own types, so a manifest means here what it means to the
//! API server; every setting that the simulator cannot reproduce is named, never dropped silently.

use std::time::Duration;

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Container, LifecycleHandler, Probe},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

/// How a new pod is judged ready: an HTTP GET (or a TCP connect) to its port, as the kubelet does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadinessProbe {
    /// `None`: a TCP connect (tcpSocket); `Some(path)`: an HTTP GET.
    pub http_path: Option<String>,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Default for ReadinessProbe {
    /// The Kubernetes defaults, with a 1 s period (the API's default of 10 s makes rehearsals slow
    /// for no insight; a manifest's own period is always honoured).
    fn default() -> Self {
        Self {
            http_path: Some("/".into()),
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 3,
        }
    }
}

/// The rolling update to rehearse, with every value resolved (percentages turned into pods).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutSpec {
    /// The workload's name, for pod names and reports.
    pub name: String,
    /// Its Kubernetes namespace, as the agent reports the rehearsal's pods (`default` when the
    /// manifest names none).
    pub namespace: String,
    pub replicas: u32,
    pub max_surge: u32,
    pub max_unavailable: u32,
    /// maxSurge and maxUnavailable as written (`25%` or a number), to resolve them again when
    /// the replicas change.
    pub surge_spec: IntOrString,
    pub unavailable_spec: IntOrString,
    pub readiness: Option<ReadinessProbe>,
    /// The preStop hook's sleep (exec `sleep N` or the native sleep action).
    pub pre_stop: Option<Duration>,
    /// Any other exec preStop hook: run in the pod's network namespace, as the kubelet runs it
    /// in the container's (never together with `pre_stop`).
    pub pre_stop_exec: Option<Vec<String>>,
    /// The signal that stops the container (`lifecycle.stopSignal`; SIGTERM by default).
    pub stop_signal: nix::sys::signal::Signal,
    pub grace_period: Duration,
    pub min_ready: Duration,
    /// Settings found in the manifest that the simulator does not reproduce, each with why.
    pub not_simulated: Vec<String>,
}

impl Default for RolloutSpec {
    /// Kubernetes' defaults for a Deployment of 3 replicas.
    fn default() -> Self {
        Self {
            name: "app".into(),
            namespace: "default".into(),
            replicas: 3,
            max_surge: 1,
            max_unavailable: 0,
            surge_spec: IntOrString::Int(1),
            unavailable_spec: IntOrString::Int(0),
            readiness: None,
            pre_stop: None,
            pre_stop_exec: None,
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            grace_period: Duration::from_secs(30),
            min_ready: Duration::ZERO,
            not_simulated: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: not valid YAML for a Kubernetes object")]
    Yaml {
        path: String,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("{path}: no Deployment found (kinds seen: {kinds}); rehearse needs a Deployment")]
    NoDeployment { path: String, kinds: String },
    #[error("{path}: {count} Deployments found; keep one per file for a rehearsal")]
    ManyDeployments { path: String, count: usize },
    #[error("{path}: invalid Deployment")]
    Invalid {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid {field}: {reason}")]
    Value { field: String, reason: String },
}

fn value_error(field: &str, reason: impl Into<String>) -> SpecError {
    SpecError::Value {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Resolves `maxSurge`/`maxUnavailable` against `replicas` as the Deployment controller does:
/// a percentage of surge rounds up, of unavailability down.
pub fn resolve_int_or_percent(
    field: &str,
    value: &IntOrString,
    replicas: u32,
    round_up: bool,
) -> Result<u32, SpecError> {
    match value {
        IntOrString::Int(n) => {
            u32::try_from(*n).map_err(|_| value_error(field, format!("{n} is negative")))
        }
        IntOrString::String(s) => {
            let percent: u32 = s
                .strip_suffix('%')
                .and_then(|p| p.trim().parse().ok())
                .ok_or_else(|| {
                    value_error(field, format!("{s:?} is neither a number nor a percentage"))
                })?;
            let scaled = u64::from(replicas) * u64::from(percent);
            let pods = if round_up {
                scaled.div_ceil(100)
            } else {
                scaled / 100
            };
            u32::try_from(pods).map_err(|_| value_error(field, format!("{s} is too large")))
        }
    }
}

/// Parses a `maxSurge`-style flag: `2` or `25%`.
pub fn parse_int_or_percent(s: &str) -> Result<IntOrString, String> {
    if s.ends_with('%') {
        Ok(IntOrString::String(s.to_owned()))
    } else {
        s.parse()
            .map(IntOrString::Int)
            .map_err(|_| format!("{s:?} is neither a number nor a percentage such as 25%"))
    }
}

fn seconds(field: &str, value: Option<i32>, default: u64) -> Result<Duration, SpecError> {
    match value {
        None => Ok(Duration::from_secs(default)),
        Some(n) => u64::try_from(n)
            .map(Duration::from_secs)
            .map_err(|_| value_error(field, format!("{n} is negative"))),
    }
}

fn threshold(field: &str, value: Option<i32>, default: u32) -> Result<u32, SpecError> {
    match value {
        None => Ok(default),
        Some(n) if n >= 1 => Ok(n.unsigned_abs()),
        Some(n) => Err(value_error(field, format!("{n} must be at least 1"))),
    }
}

impl RolloutSpec {
    /// Turns maxSurge and maxUnavailable into pods for the current replicas.
    pub fn resolve_strategy(&mut self) -> Result<(), SpecError> {
        self.max_surge = resolve_int_or_percent("maxSurge", &self.surge_spec, self.replicas, true)?;
        self.max_unavailable = resolve_int_or_percent(
            "maxUnavailable",
            &self.unavailable_spec,
            self.replicas,
            false,
        )?;
        Ok(())
    }

    /// Checks what the Deployment controller would reject.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.replicas == 0 {
            return Err(value_error("replicas", "there is nothing to roll with 0"));
        }
        if self.replicas > MAX_REPLICAS {
            return Err(value_error(
                "replicas",
                format!(
                    "{} is more than this one-machine rehearsal runs (at most {MAX_REPLICAS})",
                    self.replicas
                ),
            ));
        }
        if self.max_surge == 0 && self.max_unavailable == 0 {
            return Err(value_error(
                "maxSurge/maxUnavailable",
                "both are 0: the rollout could never make progress (Kubernetes rejects this too)",
            ));
        }
        Ok(())
    }

    /// Reads the one Deployment of a (multi-document) manifest.
    pub fn from_manifest(path: &str, text: &str) -> Result<Self, SpecError> {
        let mut deployments = Vec::new();
        let mut kinds = Vec::new();
        for document in serde_yaml_ng::Deserializer::from_str(text) {
            let value: serde_json::Value =
                serde::Deserialize::deserialize(document).map_err(|source| SpecError::Yaml {
                    path: path.into(),
                    source,
                })?;
            if value.is_null() {
                continue;
            }
            let kind = value
                .get("kind")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("<no kind>")
                .to_owned();
            if kind == "Deployment" {
                let deployment: Deployment =
                    serde_json::from_value(value).map_err(|source| SpecError::Invalid {
                        path: path.into(),
                        source,
                    })?;
                deployments.push(deployment);
            }
            kinds.push(kind);
        }
        match deployments.len() {
            0 => Err(SpecError::NoDeployment {
                path: path.into(),
                kinds: if kinds.is_empty() {
                    "none".into()
                } else {
                    kinds.join(", ")
                },
            }),
            1 => Self::from_deployment(&deployments[0]),
            count => Err(SpecError::ManyDeployments {
                path: path.into(),
                count,
            }),
        }
    }

    /// The rollout a Deployment describes; its first container is the one rehearsed.
    pub fn from_deployment(deployment: &Deployment) -> Result<Self, SpecError> {
        let mut spec = Self {
            name: deployment
                .metadata
                .name
                .clone()
                .unwrap_or_else(|| "app".into()),
            namespace: deployment
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            ..Self::default()
        };
        let dspec = &deployment.spec;
        spec.replicas = match dspec.replicas {
            None => 1,
            Some(n) => u32::try_from(n)
                .map_err(|_| value_error("spec.replicas", format!("{n} is negative")))?,
        };
        spec.min_ready = seconds("spec.minReadySeconds", dspec.min_ready_seconds, 0)?;
        let quarter = IntOrString::String("25%".into());
        let strategy = dspec.strategy.as_ref();
        match strategy.and_then(|s| s.type_.as_deref()) {
            None | Some("RollingUpdate") => {}
            Some(other) => {
                return Err(value_error(
                    "spec.strategy.type",
                    format!("{other}: only RollingUpdate is rehearsed"),
                ));
            }
        }
        let rolling = strategy.and_then(|s| s.rolling_update.as_ref());
        spec.surge_spec = rolling
            .and_then(|r| r.max_surge.clone())
            .unwrap_or_else(|| quarter.clone());
        spec.unavailable_spec = rolling
            .and_then(|r| r.max_unavailable.clone())
            .unwrap_or(quarter);
        spec.resolve_strategy()?;
        let pod = dspec.template.spec.as_ref();
        spec.grace_period = match pod.and_then(|p| p.termination_grace_period_seconds) {
            None => Duration::from_secs(30),
            Some(n) => u64::try_from(n).map(Duration::from_secs).map_err(|_| {
                value_error(
                    "spec.template.spec.terminationGracePeriodSeconds",
                    format!("{n} is negative"),
                )
            })?,
        };
        let containers = pod.map(|p| p.containers.as_slice()).unwrap_or_default();
        let Some(container) = containers.first() else {
            return Err(value_error(
                "spec.template.spec.containers",
                "the Deployment has no container",
            ));
        };
        if containers.len() > 1 {
            spec.not_simulated.push(format!(
                "containers other than the first ({}): only one process runs per pod",
                containers[1..]
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if pod.is_some_and(|p| p.init_containers.as_ref().is_some_and(|c| !c.is_empty())) {
            spec.not_simulated
                .push("initContainers: they do not run in a rehearsal".into());
        }
        spec.read_container(container)?;
        spec.validate()?;
        Ok(spec)
    }

    fn read_container(&mut self, container: &Container) -> Result<(), SpecError> {
        let name = &container.name;
        if let Some(probe) = &container.readiness_probe {
            self.readiness =
                self.read_probe(&format!("container {name}: readinessProbe"), probe)?;
        }
        if container.liveness_probe.is_some() {
            self.not_simulated.push(format!(
                "container {name}: livenessProbe: not run; a rollout does not wait for it"
            ));
        }
        if container.startup_probe.is_some() {
            self.not_simulated.push(format!(
                "container {name}: startupProbe: not run; readiness is probed from the start"
            ));
        }
        if container.image.is_some() || container.command.is_some() || container.args.is_some() {
            self.not_simulated.push(format!(
                "container {name}: image/command/args: the command after `--` runs instead"
            ));
        }
        if let Some(lifecycle) = &container.lifecycle {
            if let Some(pre_stop) = &lifecycle.pre_stop {
                self.pre_stop = self.read_pre_stop(name, pre_stop);
            }
            if let Some(signal) = &lifecycle.stop_signal {
                self.stop_signal = signal.parse().map_err(|_| {
                    value_error(
                        &format!("container {name}: lifecycle.stopSignal"),
                        format!(
                            "{}: not a signal name such as SIGQUIT",
                            crate::telemetry::quoted(signal)
                        ),
                    )
                })?;
            }
            if lifecycle.post_start.is_some() {
                self.not_simulated
                    .push(format!("container {name}: postStart: not run"));
            }
        }
        Ok(())
    }

    fn read_probe(
        &mut self,
        field: &str,
        probe: &Probe,
    ) -> Result<Option<ReadinessProbe>, SpecError> {
        let http_path = if let Some(http) = &probe.http_get {
            if http.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                self.not_simulated.push(format!(
                    "{field}: scheme {}: probed over plain HTTP",
                    http.scheme.as_deref().unwrap_or_default()
                ));
            }
            if http.host.is_some() || http.http_headers.is_some() {
                self.not_simulated
                    .push(format!("{field}: host and headers: not sent"));
            }
            if let IntOrString::Int(port) = &http.port {
                self.not_simulated.push(format!(
                    "{field}: port {port}: the probe goes to the pod's PORT"
                ));
            }
            Some(http.path.clone().unwrap_or_else(|| "/".into()))
        } else if probe.tcp_socket.is_some() {
            None
        } else {
            self.not_simulated.push(format!(
                "{field}: only httpGet and tcpSocket probes run; the pod counts as ready once started"
            ));
            return Ok(None);
        };
        Ok(Some(ReadinessProbe {
            http_path,
            initial_delay: seconds(
                &format!("{field}.initialDelaySeconds"),
                probe.initial_delay_seconds,
                0,
            )?,
            period: seconds(&format!("{field}.periodSeconds"), probe.period_seconds, 10)?,
            timeout: seconds(&format!("{field}.timeoutSeconds"), probe.timeout_seconds, 1)?,
            success_threshold: threshold(
                &format!("{field}.successThreshold"),
                probe.success_threshold,
                1,
            )?,
            failure_threshold: threshold(
                &format!("{field}.failureThreshold"),
                probe.failure_threshold,
                3,
            )?,
        }))
    }

    fn read_pre_stop(&mut self, container: &str, handler: &LifecycleHandler) -> Option<Duration> {
        let field = format!("container {container}: preStop");
        if let Some(sleep) = &handler.sleep {
            return u64::try_from(sleep.seconds).ok().map(Duration::from_secs);
        }
        if let Some(exec) = &handler.exec {
            let command = exec.command.clone().unwrap_or_default();
            if let Some(seconds) = sleep_seconds(&command) {
                return Some(seconds);
            }
            if command.is_empty() {
                self.not_simulated
                    .push(format!("{field}: exec without a command: not run"));
                return None;
            }
            // Run as the kubelet would, in the pod's network namespace (on this host's files).
            self.not_simulated.push(format!(
                "{field}: exec {command:?}: runs in the pod's network namespace and a PID \
                 namespace of its own, so it cannot signal the server (`kill 1` reaches nothing)"
            ));
            self.pre_stop_exec = Some(command);
            return None;
        }
        self.not_simulated.push(format!(
            "{field}: only exec `sleep N` and the native sleep action are simulated"
        ));
        None
    }
}

/// The most replicas a rehearsal runs on one machine.
pub const MAX_REPLICAS: u32 = 100;

/// `["sleep", "15"]`, `["/bin/sleep", "15"]` or `["sh", "-c", "sleep 15"]`: the sleep.
fn sleep_seconds(command: &[String]) -> Option<Duration> {
    let words: Vec<&str> = match command {
        [shell, flag, script] if shell.ends_with("sh") && flag == "-c" => {
            script.split_whitespace().collect()
        }
        words => words.iter().map(String::as_str).collect(),
    };
    match words.as_slice() {
        [sleep, n] if sleep.rsplit('/').next() == Some("sleep") => {
            let n = n.trim_end_matches('s');
            // A sleep too long for a duration (`infinity`, `1e300`) is no sleep a rehearsal
            // can run.
            n.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
