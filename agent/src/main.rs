//! The `draingate` binary: command-line parsing only; the work is in the library.

use std::{net::IpAddr, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use draingate::{
    loader::{KernelProbes, ProbeConfig},
    telemetry,
};

/// draingate proves that a rolling update lost no request: it counts, per pod, the TCP
/// connections still open and every reset and refused connection while the pod terminates.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent: load the eBPF programs and count TCP state changes of the watched
    /// addresses, printing the totals periodically until SIGTERM or Ctrl-C.
    ///
    /// This first cut counts per address given with --watch; pod inventory, the gRPC API and
    /// the verdict come next.
    Agent(AgentArgs),
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// A local IPv4 or IPv6 address to count TCP state changes for (repeatable).
    #[arg(long = "watch", value_name = "ADDR", required = true)]
    watch: Vec<IpAddr>,
    /// How often to print the totals, e.g. `1s`, `500ms`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    interval: Duration,
}

fn main() -> ExitCode {
    telemetry::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => run_agent(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("draingate: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_agent(args: &AgentArgs) -> anyhow::Result<()> {
    if args.interval.is_zero() {
        anyhow::bail!("--interval must be greater than zero");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut probes = KernelProbes::load(&ProbeConfig::default())?;
        for (slot, addr) in (0..).zip(&args.watch) {
            probes.watch(*addr, slot)?;
        }
        tracing::info!(
            addresses = args.watch.len(),
            "eBPF programs attached; counting"
        );
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        let mut ticker = tokio::time::interval(args.interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => print_totals(&probes, &args.watch)?,
                _ = terminate.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        print_totals(&probes, &args.watch)?;
        tracing::info!("shutting down");
        Ok(())
    })
}

fn print_totals(probes: &KernelProbes, watched: &[IpAddr]) -> anyhow::Result<()> {
    for (slot, addr) in (0..).zip(watched) {
        let t = probes.slot_totals(slot)?;
        println!(
            "{addr}\topen={} accepted={} opened={} resets_sent={} resets_received={} refused={} failed_connects={}",
            t.open,
            t.accepted,
            t.opened,
            t.resets_sent,
            t.resets_received,
            t.refused,
            t.failed_connects
        );
    }
    let loss = probes.loss()?;
    if loss != draingate_common::LossCounters::default() {
        println!("WARNING: counts are incomplete: {loss:?}");
    }
    Ok(())
}
