//! draingate's developer commands. `cargo xtask setup` prepares a fresh machine; the others call
//! it first, so each works from a clean clone.

mod command;
mod demo;
mod image;
mod kube;
mod setup;
mod test;
mod vm;

use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

/// Developer commands for draingate. Every command runs `setup` first.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what builds and tests need, when missing: nightly's rust-src, rustfmt and clippy,
    /// bpf-linker built against nightly's own LLVM, Debian packages, tracefs and bpffs mounts.
    /// Idempotent: a second run changes nothing.
    Setup,
    /// Setup, then formatting, clippy (user space and eBPF), unit tests and the kernel tests
    /// (root). Ends with a one-line summary; exits non-zero on the first failure.
    Test,
    /// The main job (root): setup, a release build, then `draingate rehearse` of the project's
    /// test server at 10,000 requests per second, as examples/junior.yaml and as
    /// examples/senior.yaml deploy it, with the two outcomes side by side.
    Demo {
        /// Requests per second for each rehearsal.
        #[arg(long, default_value_t = 10_000)]
        rate: u32,
        /// Replicas (default: the manifests' 20, or 5 per core on smaller machines).
        #[arg(long)]
        replicas: Option<u32>,
    },
    /// Setup, then formatting and clippy only.
    Lint,
    /// A real Kubernetes control plane for the tests: builds kube-apiserver and
    /// kube-controller-manager v1.20.2 from Debian bookworm's `kubernetes` source package with
    /// Debian's Go (about 5 minutes, once; fetched through a private apt configuration with a
    /// deb-src line, the host's sources untouched), installs Debian's etcd, and prints the
    /// directory of the binaries (`~/.cache/draingate/kube/v1.20.2/bin`, or under
    /// `$XDG_CACHE_HOME`). Cached: a second run returns at once. `cargo xtask test` does this
    /// before the kernel tests and gives them the directory as `$DRAINGATE_KUBE_BIN`. Runs no
    /// `setup`: it needs none of it.
    Kube,
    /// Setup, then draingate's OCI image (agent, gate and CLI: one binary): a release build, and
    /// one layer with the binary and exactly the shared libraries it loads (no shell, no package
    /// manager), user 65532, OCI labels; reproducible (same commit and build, same digest).
    /// Writes the OCI layout to `target/image/draingate-release/` and its archive beside it,
    /// loads it into podman, and prints its size and digest. See docs/install.md.
    Image {
        /// The debug build the kernel tests run (its debug information stripped) instead of a
        /// release build; `cargo xtask test` builds this one, tagged localhost/draingate:debug.
        #[arg(long)]
        debug: bool,
        /// The name podman gives it (default: localhost/draingate:VERSION, or
        /// localhost/draingate:debug with --debug).
        #[arg(long)]
        tag: Option<String>,
        /// Only write the layout and its archive; do not load them into podman.
        #[arg(long)]
        no_load: bool,
    },
    /// Setup, then measure the agent against a baseline run side by side (root): connections/s
    /// and p99 latency with and without the agent, kernel time per program run, agent memory
    /// with 110 pods; then the verdict's accuracy over repeated rehearsals of every shutdown
    /// scenario (false passes, false fails); then one gate check across 1,000 simulated agents
    /// (latency against the bare fan-out, gate memory); then the readiness gate's release
    /// latency on the real control plane. Writes BENCHMARKS.md.
    Bench {
        /// Run only one part: `overhead` (draingate-bench), `accuracy` (draingate-accuracy),
        /// `gate` (draingate-gate-bench) or `hold` (draingate-hold-bench: the readiness gate's
        /// release latency on the real control plane).
        #[arg(long, value_parser = ["overhead", "accuracy", "gate", "hold"])]
        only: Option<String>,
        /// Arguments after `--` for the part's binary (see its `--help`): draingate-bench, or the
        /// one chosen with --only.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, then boot Debian's own kernels (6.1, 6.12, 5.10) one after the other under QEMU
    /// with virtme-ng, the host's root shared read-only, and run a command in each as root; one
    /// line per kernel. Installs QEMU and virtme-ng and downloads the kernels when missing
    /// (cached in `~/.cache/draingate/kernels` or `$DRAINGATE_VM_CACHE`). QEMU's software CPU
    /// unless `DRAINGATE_VM_ACCEL=kvm`. Logs: `target/vm-test/<uname -r>/`.
    VmTest {
        /// Kernel line to boot (repeatable, or comma-separated): 6.1, 6.12 or 5.10. Default: all
        /// three, in that order.
        #[arg(long = "kernel", value_name = "LINE", value_delimiter = ',')]
        kernels: Vec<String>,
        /// Per-kernel limit in seconds, boot to power-off.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
        /// Keep virtme-run's and the kernel's boot console in
        /// `target/vm-test/<uname -r>/console.log`.
        #[arg(long)]
        verbose: bool,
        /// Do not print the guest's log as it runs (failures still show its end).
        #[arg(long)]
        quiet: bool,
        /// Re-read the kernel suites' package lists first, to pick up newer kernels.
        #[arg(long)]
        refresh: bool,
        /// The command to run in each guest, from the workspace root: one argument is a shell
        /// command line, several a program and its arguments. Default: the test binaries (with
        /// filters) listed in `$DRAINGATE_VM_TESTS`, one per line or separated by `;`.
        #[arg(last = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run().map(|_| ()),
        Command::Test => test::run(test::Scope::All),
        Command::Lint => test::run(test::Scope::LintOnly),
        Command::Kube => kube::run(),
        Command::Demo { rate, replicas } => demo::run(rate, replicas),
        Command::Image {
            debug,
            tag,
            no_load,
        } => setup::run().and_then(|_| {
            image::run(&image::Options {
                profile: if debug {
                    image::Profile::Debug
                } else {
                    image::Profile::Release
                },
                tag,
                load: !no_load,
            })
        }),
        Command::Bench { only, args } => test::bench(only.as_deref(), &args),
        Command::VmTest {
            kernels,
            timeout,
            verbose,
            quiet,
            refresh,
            command,
        } => vm::run(
            &kernels,
            &command,
            &vm::Options {
                timeout: Duration::from_secs(timeout),
                verbose,
                follow: !quiet,
                refresh,
            },
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}
