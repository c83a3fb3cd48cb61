//! `draingate agent`: its flags and the wiring of loader, inventory, agent and API.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::ValueEnum;
use draingate::{
    agent::{Agent, AgentConfig},
    api::{self, ListenConfig},
    inventory::LocalSource,
    loader::ProbeConfig,
};

use crate::shutdown_signal;

#[derive(Debug, clap::Args)]
pub(crate) struct AgentArgs {
    /// Where to find pods.
    #[arg(long, value_enum, default_value_t = Source::Local)]
    source: Source,
    /// This node's name, for `--source kubernetes` (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// gRPC address (TCP).
    #[arg(long, default_value = api::DEFAULT_GRPC_ADDR, value_parser = draingate::parse_listen_addr)]
    grpc_addr: SocketAddr,
    /// HTTP address for /metrics (Prometheus), /healthz and /readyz.
    #[arg(long, default_value = draingate::http::DEFAULT_HTTP_ADDR, value_parser = draingate::parse_listen_addr)]
    http_addr: SocketAddr,
    /// gRPC unix socket, used by the CLI.
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Serve the TCP face over mutual TLS with the set in DIR (`ca.crt`, `agent.crt`,
    /// `agent.key`, as `draingate tls-certs` writes them): only clients with a certificate of
    /// that CA (the gate) are served. The unix socket stays plain.
    #[arg(long, env = "DRAINGATE_TLS", value_name = "DIR")]
    tls: Option<PathBuf>,
    /// bpffs directory for the pinned maps and links.
    #[arg(long, default_value = draingate_common::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// How long a gone pod's window stays open for late failures seen by peers.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    linger: Duration,
    /// How long finished pods are kept with their final totals.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// Where the resets pods send are counted from: `auto` takes the kernel's `tcp_send_reset`
    /// tracepoint where it sees every reset (6.10+) and each pod's packets (a TC program on
    /// its interface) before; `packets` takes the packets on any kernel.
    #[arg(long, value_enum, default_value_t = ResetSourceArg::Auto, env = "DRAINGATE_RESET_SOURCE")]
    reset_source: ResetSourceArg,
    /// Instead of running: remove what an agent on --pin-dir leaves behind when it stops (its
    /// TC filters on the pods' interfaces, its pinned maps and programs), then exit. For
    /// uninstalling, after the agent has stopped; refused while one runs.
    #[arg(long)]
    uninstall: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ResetSourceArg {
    Auto,
    Packets,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Source {
    /// Every network namespace on this host is a pod.
    Local,
    /// The pods the API server binds to this node (--node-name), watched with the pod's
    /// service account (get, list, watch on pods and endpointslices).
    Kubernetes,
}

pub(crate) async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    if args.uninstall {
        let filters = draingate::loader::KernelProbes::uninstall(&args.pin_dir)?;
        println!(
            "draingate: removed {filters} TC filters and the pins under {}",
            args.pin_dir.display()
        );
        return Ok(());
    }
    // Every face's connection cap is fitted to this limit, keeping descriptors free for the
    // inventory (it opens /proc and netns files on every resync).
    let open_files = draingate::limits::raise_open_files_limit();
    tracing::debug!(open_files, "open-files limit");
    let mut config = AgentConfig {
        probes: ProbeConfig {
            reset_source: (args.reset_source == ResetSourceArg::Packets)
                .then_some(draingate::loader::ResetSource::Packets),
            ..ProbeConfig::at(args.pin_dir)
        },
        linger: args.linger,
        retention: args.retention,
        ..AgentConfig::default()
    };
    let source: Box<dyn draingate::inventory::InventorySource> = match args.source {
        Source::Local => Box::new(LocalSource::default()),
        Source::Kubernetes => {
            let node = args.node_name.clone().context(
                "--source kubernetes needs this node's name: --node-name, or NODE_NAME from the \
                 downward API (spec.nodeName)",
            )?;
            // In a pod: the service account; elsewhere: KUBECONFIG or ~/.kube/config.
            let client = kube::Client::try_default()
                .await
                .context("cannot configure the Kubernetes client")?;
            tracing::info!(node, "watching the pods bound to this node");
            config.node.clone_from(&node);
            // hostNetwork: the agent's namespace is the node's, where kubelet probes come from.
            config.node_addresses = draingate::agent::NodeAddresses::Own;
            Box::new(draingate::inventory::kubernetes::KubernetesSource::start(
                &client, &node,
            ))
        }
    };
    let (agent, handle) = Agent::new(config, source)?;
    let listen = ListenConfig {
        grpc_addr: args.grpc_addr,
        socket: args.socket,
        tls: args
            .tls
            .as_deref()
            .map(draingate::tls::server_config)
            .transpose()?,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http_listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} (HTTP)", args.http_addr))?;
    {
        let handle = handle.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(err) = draingate::http::serve(handle, http_listener, shutdown).await {
                tracing::error!(error = %draingate::telemetry::chain(&err), "HTTP server failed");
            }
        });
    }
    let mut server = {
        let handle = handle.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            api::serve(handle, &listen, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        })
    };
    tracing::info!(grpc = %args.grpc_addr, http = %args.http_addr, "draingate agent running");
    let mut stop = stop_rx;
    let agent_task = tokio::spawn(agent.run(async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    tokio::select! {
        () = shutdown_signal() => {}
        done = &mut server => {
            let _ = stop_tx.send(true);
            done.context("API task")?.context("serving the API")?;
            anyhow::bail!("the API server stopped unexpectedly");
        }
    }
    let _ = stop_tx.send(true);
    agent_task.await.context("agent task")??;
    Ok(())
}
