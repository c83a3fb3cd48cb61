//! A pod's life in the rehearsal, as the kubelet leads it: created, started, probed until ready
//! and put into the Service; then taken out of it, its preStop hook run, SIGTERM, the grace
//! period, SIGKILL and the sandbox's teardown.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use super::{
    PodEvent, RehearseError, Shared, agent_pod,
    node::{self, PodCommand},
    spec::ReadinessProbe,
};
use crate::inventory::{LocalPodInfo, PodMeta};

/// Creates a pod, waits until the agent watches it, starts its process, probes it until ready,
/// and puts it into the Service (after the propagation delay, or at once for the first version).
pub(super) async fn start_pod(shared: Arc<Shared>, name: String, command: PodCommand, version: u8) {
    if let Err(err) = try_start_pod(&shared, &name, &command, version).await {
        let _ = shared.events.send(PodEvent::Failed(err));
    }
}

async fn try_start_pod(
    shared: &Shared,
    name: &str,
    command: &PodCommand,
    version: u8,
) -> Result<(), RehearseError> {
    let initial = version == 1;
    let (netns, addr) = {
        let mut node = shared.node.lock().await;
        // The agent learns the pod's owner before it sees its namespace, as the API server
        // would tell it.
        let info = LocalPodInfo {
            namespace: Some(shared.config.spec.namespace.clone()),
            meta: PodMeta {
                owner_kind: "Deployment".into(),
                owner_name: shared.config.spec.name.clone(),
                pod_template_hash: shared.config.template_hash(version),
            },
            deleting_since: None,
            ready_since: None,
        };
        shared
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(format!("{}{name}", node.prefix), info);
        let pod = node.add_pod(name).await?;
        (pod.netns_name().unwrap_or_default().to_owned(), pod.addr)
    };
    // Connections the agent did not see open are not in its socket table: watch first.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let watched = agent_pod(&shared.agent, &netns, |p| {
            p.addresses.contains(&IpAddr::V4(addr))
        });
        if watched == Some(true) {
            break;
        }
        if Instant::now() > deadline {
            return Err(RehearseError::Setup(format!(
                "the agent did not see pod {name} ({netns}) within 10 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shared.node.lock().await.start_pod(name, command)?;
    shared.mark(name, |t, now| t.started = Some(now));
    if let Some(probe) = &shared.config.spec.readiness {
        wait_ready(shared, name, addr, probe).await?;
    } else if initial {
        // The deployed version has long been serving when a rollout starts: wait until it
        // listens, so the warm-up does not count its start-up.
        let listening = ReadinessProbe {
            http_path: None,
            period: Duration::from_millis(100),
            ..ReadinessProbe::default()
        };
        wait_ready(shared, name, addr, &listening).await?;
    }
    shared.mark(name, |t, now| t.ready = Some(now));
    // The agent learns the readiness as it would from the pod's status.
    shared.tell_agent(&netns, |info| info.ready_since = Some(SystemTime::now()));
    if !initial {
        tokio::time::sleep(shared.config.spec.min_ready + shared.config.propagation).await;
    }
    shared.node.lock().await.add_endpoint(name).await?;
    let _ = shared.events.send(PodEvent::Ready(name.to_owned()));
    Ok(())
}

/// Whether the pod's process has exited.
async fn pod_exited(shared: &Shared, name: &str) -> bool {
    shared
        .node
        .lock()
        .await
        .pods
        .get_mut(name)
        .is_some_and(node::SimPod::exited)
}

/// Probes as the kubelet does: after the initial delay, every period, ready after
/// `success_threshold` successes in a row. A pod whose process exits fails the rehearsal.
async fn wait_ready(
    shared: &Shared,
    name: &str,
    addr: Ipv4Addr,
    probe: &ReadinessProbe,
) -> Result<(), RehearseError> {
    tokio::time::sleep(probe.initial_delay).await;
    let netns = shared.node.lock().await.node.open()?;
    let target = std::net::SocketAddr::from((addr, shared.config.port));
    let mut successes = 0;
    loop {
        if pod_exited(shared, name).await {
            return Err(RehearseError::PodFailed {
                pod: name.to_owned(),
                reason: "its process exited before it became ready".into(),
                log: shared.log_path(name),
            });
        }
        let path = probe.http_path.clone();
        let timeout = probe.timeout;
        let ns = netns
            .try_clone()
            .map_err(|e| RehearseError::Setup(e.to_string()))?;
        let result =
            tokio::task::spawn_blocking(move || probe_once(&ns, target, path.as_deref(), timeout))
                .await
                .unwrap_or(ProbeResult::Failed);
        match result {
            ProbeResult::Ready => {
                successes += 1;
                if successes >= probe.success_threshold {
                    return Ok(());
                }
            }
            ProbeResult::Refused => {
                successes = 0;
                *shared
                    .probe_refusals
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(name.to_owned())
                    .or_default() += 1;
            }
            ProbeResult::Failed => successes = 0,
        }
        tokio::time::sleep(probe.period).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeResult {
    Ready,
    Refused,
    Failed,
}

/// One probe from the node's namespace (where the kubelet runs): a TCP connect, or an HTTP GET
/// that must answer 200–399.
fn probe_once(
    netns: &std::fs::File,
    target: std::net::SocketAddr,
    path: Option<&str>,
    timeout: Duration,
) -> ProbeResult {
    use std::{
        io::{Read as _, Write as _},
        os::fd::AsFd as _,
    };
    if nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
        return ProbeResult::Failed;
    }
    let mut conn = match std::net::TcpStream::connect_timeout(&target, timeout) {
        Ok(conn) => conn,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return ProbeResult::Refused,
        Err(_) => return ProbeResult::Failed,
    };
    let Some(path) = path else {
        return ProbeResult::Ready;
    };
    let _ = conn.set_read_timeout(Some(timeout));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: kube-probe/draingate\r\nConnection: close\r\n\r\n"
    );
    if conn.write_all(request.as_bytes()).is_err() {
        return ProbeResult::Failed;
    }
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        match conn.read(&mut head[len..]) {
            Ok(0) | Err(_) => return ProbeResult::Failed,
            Ok(n) => len += n,
        }
    }
    // Read to the end, so the server's close is not answered by our reset.
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    let status: u16 = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if (200..400).contains(&status) {
        ProbeResult::Ready
    } else {
        ProbeResult::Failed
    }
}

/// Terminates a pod in the kubelet's order: the endpoint removal starts (and lands after the
/// propagation delay) while the preStop hook runs; then SIGTERM; SIGKILL at the end of the grace
/// period (counted from the deletion); the sandbox goes once the process has exited, even while
/// the endpoint removal has not landed yet.
pub(super) async fn terminate_pod(shared: Arc<Shared>, name: String) {
    if let Err(err) = try_terminate_pod(&shared, &name).await {
        let _ = shared.events.send(PodEvent::Failed(err));
    }
}

async fn try_terminate_pod(shared: &Arc<Shared>, name: &str) -> Result<(), RehearseError> {
    let spec = &shared.config.spec;
    let deleted = tokio::time::Instant::now();
    shared.mark(name, |t, now| t.deleted = Some(now));
    if let Some(netns) = shared.node.lock().await.pods[name].netns_name() {
        shared.tell_agent(netns, |info| info.deleting_since = Some(SystemTime::now()));
    }
    let endpoint = {
        let shared = Arc::clone(shared);
        let name = name.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(shared.config.propagation).await;
            let result = shared.node.lock().await.remove_endpoint(&name).await;
            shared.mark(&name, |t, now| t.endpoint_removed = Some(now));
            result
        })
    };
    let grace_end = deleted + spec.grace_period;
    if let Some(pre_stop) = spec.pre_stop {
        // The hook counts against the grace period.
        tokio::time::sleep_until((deleted + pre_stop).min(grace_end)).await;
    }
    if let Some(command) = &spec.pre_stop_exec {
        run_pre_stop(shared, name, command, grace_end).await;
    }
    shared.node.lock().await.pods[name].signal(spec.stop_signal);
    shared.mark(name, |t, now| t.sigterm = Some(now));
    let exited = loop {
        if pod_exited(shared, name).await {
            break true;
        }
        if tokio::time::Instant::now() >= grace_end {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if !exited {
        let mut node = shared.node.lock().await;
        node.pods[name].kill_all();
        shared.mark(name, |t, now| t.sigkill = Some(now));
        if let Some(pod) = node.pods.get_mut(name) {
            let _ = tokio::time::timeout(Duration::from_secs(5), pod.wait()).await;
        }
    }
    shared.mark(name, |t, now| t.exited = Some(now));
    // The kubelet tears the sandbox down once the containers have exited, whether or not the
    // Services still send to the pod: until the endpoint removal lands, clients DNATed to it
    // find no one there (no route, or no answer), the failure only the client side sees.
    tokio::time::sleep(node::SANDBOX_TEARDOWN).await;
    shared.node.lock().await.remove_pod(name);
    shared.mark(name, |t, now| t.removed = Some(now));
    endpoint
        .await
        .map_err(|e| RehearseError::Setup(e.to_string()))??;
    let _ = shared.events.send(PodEvent::Gone(name.to_owned()));
    Ok(())
}

/// Runs an exec preStop hook as the kubelet does: in the pod's network namespace (the pod's
/// files are this host's), with the pod's `PORT` and the rehearsal's agent as `DRAINGATE_AGENT`
/// (so that `draingate wait-drained --self` works), until it exits or the grace period ends.
/// It runs in a PID namespace of its own: the pods here share the host's, where PID 1 is the
/// host's init, so a hook's `kill -TERM 1` must reach nothing.
/// Its output goes to `<pod>.pre-stop.log`; a failed hook is logged, and the stop signal follows
/// either way, as in Kubernetes.
async fn run_pre_stop(
    shared: &Shared,
    name: &str,
    command: &[String],
    grace_end: tokio::time::Instant,
) {
    let Some(netns) = shared.node.lock().await.pods[name]
        .netns_name()
        .map(str::to_owned)
    else {
        return;
    };
    // Its own file: the server writes its log at its own offset.
    let log = std::fs::File::create(shared.log_path(&format!("{name}.pre-stop")));
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &netns,
        "unshare",
        "--pid",
        "--fork",
        "--kill-child",
        "--",
    ])
    .args(command)
    .env("PORT", shared.config.port.to_string())
    .env("DRAINGATE_AGENT", &shared.config.agent_socket)
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    // SAFETY: only prctl(2) between fork and exec. `unshare --kill-child` passes the SIGKILL on
    // to the hook.
    unsafe {
        cmd.pre_exec(node::die_with_parent);
    }
    if let Ok(log) = log
        && let Ok(err) = log.try_clone()
    {
        cmd.stdout(log).stderr(err);
    }
    shared.mark(name, |t, now| t.pre_stop_started = Some(now));
    match cmd.spawn() {
        Ok(mut child) => match tokio::time::timeout_at(grace_end, child.wait()).await {
            Ok(Ok(status)) if !status.success() => {
                tracing::warn!(pod = name, %status, "the preStop hook failed");
            }
            Ok(_) => {}
            Err(_) => tracing::warn!(pod = name, "the preStop hook ran out of the grace period"),
        },
        Err(err) => {
            tracing::warn!(pod = name, error = %crate::telemetry::chain(&err), "cannot run the preStop hook");
        }
    }
}
