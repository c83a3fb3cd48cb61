//! `cargo xtask vm-test`: boots Debian's own kernel packages (6.1, 6.12, 5.10) under QEMU with
//! virtme-ng, the host's root shared read-only, runs a command in each and reports per kernel.
//!
//! Kernels are downloaded with `apt-get download` through a private apt configuration (the host's
//! sources stay as they are), extracted with `dpkg-deb -x`, never installed, and cached under
//! `~/.cache/draingate/kernels` (or `$DRAINGATE_VM_CACHE`): a second run downloads nothing.
//! The guest writes its results (`xtask/vm/guest.sh`) into `target/vm-test/<uname -r>/`, which the
//! host reads; virtme-run's own exit code is not trusted (255 after clean runs).
//! Fetching and caching the kernels is in `kernels`, one kernel's boot and run in `boot`.
//!
//! QEMU runs the software CPU (TCG) by default: the nested KVM of the machines this was built on
//! cannot boot stock kernels (`KVM internal error. Suberror: 1` at SLUB's `lock cmpxchg16b`).
//! `DRAINGATE_VM_ACCEL=kvm` uses KVM on hosts where it works.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    command::{cargo, is_root, run_checked, stdout, workspace_root},
    setup,
};

mod boot;
mod kernels;

use boot::{boot, shell_quote};
pub(crate) use kernels::host_mirrors;
use kernels::{PrivateApt, prepare_kernel, sbin_path};

/// The virtme-ng release this runner was written against (its options and guest protocol).
const VIRTME_NG_VERSION: &str = "1.42";
/// Debian packages the VMs need, with a file each installs (checked with `dpkg-query`).
/// busybox-static: virtme-ng's initramfs, which loads the 9p modules of Debian's `-amd64` kernels.
const VM_PACKAGES: [&str; 3] = ["qemu-system-x86", "kmod", "busybox-static"];
/// Guest memory and CPUs.
const MEMORY: &str = "2G";
const CPUS: &str = "2";
/// How much of a failed run's log is printed.
const TAIL_LINES: usize = 40;
/// How long virtme-run may take to stop QEMU after the guest wrote its exit code.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// What QEMU prints when this host's KVM cannot run the guest (nested KVM and stock kernels).
const KVM_FAILURE: &str = "KVM internal error";
/// Exit code guest.sh writes when the VM could not be prepared for the command.
const GUEST_NOT_PREPARED: i32 = 125;

/// One line of Debian kernels: the newest `linux-image-<line>.*-amd64` the suites carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KernelLine {
    /// `6.1`, `6.12` or `5.10`: the meta package's version starts with this and a dot.
    pub(crate) line: &'static str,
    /// Where Debian ships it (for messages; the private sources list carries all suites).
    pub(crate) suites: &'static str,
    /// What the guest runs there by default.
    pub(crate) suite: Suite,
}

/// The kernel tests a line runs. A VM runs them under QEMU's software CPU, about 20 times
/// slower than the host: each line runs what only it can prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Suite {
    /// Everything in [`KERNEL_TESTS`]: the oldest supported line, whose tracepoints and reset
    /// path (from packets, before 6.10) differ most from the host's.
    Full,
    /// Only the tests that read this kernel's record layouts and count through them
    /// ([`LAYOUT_TESTS`]): its reset path is the host's (6.10+), which runs the rest.
    Layouts,
    /// Below the minimum (5.19): the agent must refuse to start, in one line
    /// (`xtask/vm/too-old.sh`).
    Refused,
}

/// The kernel lines, in the order they run by default: the agent's main target first.
pub(crate) const KERNEL_LINES: [KernelLine; 3] = [
    KernelLine {
        line: "6.1",
        suites: "bookworm, bookworm-security",
        suite: Suite::Full,
    },
    KernelLine {
        line: "6.12",
        suites: "bookworm-backports",
        suite: Suite::Layouts,
    },
    KernelLine {
        line: "5.10",
        suites: "bullseye, bullseye-security",
        suite: Suite::Refused,
    },
];

impl KernelLine {
    pub(crate) fn parse(line: &str) -> anyhow::Result<Self> {
        KERNEL_LINES
            .into_iter()
            .find(|k| k.line == line)
            .with_context(|| {
                let known: Vec<&str> = KERNEL_LINES.iter().map(|k| k.line).collect();
                format!("unknown kernel line {line:?}; known: {}", known.join(", "))
            })
    }
}

/// An extracted kernel package, ready to boot.
#[derive(Debug, Clone)]
pub(crate) struct KernelImage {
    pub(crate) line: KernelLine,
    /// `linux-image-6.1.0-57-amd64`
    pub(crate) package: String,
    /// `6.1.192-3`
    pub(crate) version: String,
    /// `6.1.0-57-amd64`: `uname -r` in the guest, and the name of its modules directory.
    pub(crate) release: String,
    /// The `dpkg-deb -x` tree: `boot/vmlinuz-<release>`, `lib/modules/<release>/`.
    pub(crate) dir: PathBuf,
}

impl KernelImage {
    fn vmlinuz(&self) -> PathBuf {
        self.dir
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }
}

/// What runs in each guest, from the workspace root, after guest.sh prepared the VM.
#[derive(Debug, Clone)]
pub(crate) enum GuestCommand {
    /// `xtask/vm/kernel-tests.sh`: each test binary (with its filters) listed in the string, one
    /// per line or separated by `;`. Given to the guest as `$DRAINGATE_VM_TESTS`.
    KernelTests(String),
    /// A shell command line.
    Shell(String),
}

impl GuestCommand {
    /// The command line `vm-test` runs: the arguments after `--` (one argument is a shell
    /// command line, several are a program and its arguments), or by default the kernel tests
    /// listed in `$DRAINGATE_VM_TESTS`.
    pub(crate) fn from_args(args: &[String]) -> anyhow::Result<Self> {
        match args {
            [] => {
                let tests = env::var("DRAINGATE_VM_TESTS").unwrap_or_default();
                if tests.trim().is_empty() {
                    bail!(
                        "nothing to run: set DRAINGATE_VM_TESTS to the test binaries (with \
                         filters) to run in each kernel, or give a command after `--`"
                    );
                }
                Ok(Self::KernelTests(tests))
            }
            [line] => Ok(Self::Shell(line.clone())),
            words => Ok(Self::Shell(
                words
                    .iter()
                    .map(|arg| shell_quote(arg))
                    .collect::<Vec<_>>()
                    .join(" "),
            )),
        }
    }

    /// The body of `command.sh` after the exports.
    fn script(&self, workspace: &Path) -> String {
        match self {
            Self::KernelTests(tests) => format!(
                "export DRAINGATE_VM_TESTS={}\nexec bash {}\n",
                shell_quote(tests),
                shell_quote(&workspace.join("xtask/vm/kernel-tests.sh").to_string_lossy())
            ),
            Self::Shell(line) => format!("{line}\n"),
        }
    }
}

/// How the VMs run.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Per kernel, boot to power-off.
    pub(crate) timeout: Duration,
    /// Show virtme-run's and the kernel's boot console (in the console log).
    pub(crate) verbose: bool,
    /// Print the guest's log as it runs (each line prefixed with the kernel's release).
    pub(crate) follow: bool,
    /// Re-read the mirror's package lists before picking kernels.
    pub(crate) refresh: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeout: Duration::from_mins(15),
            verbose: false,
            follow: true,
            refresh: false,
        }
    }
}

/// How one kernel's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The command exited 0.
    Passed,
    /// The command (or the guest's preparation, code 125) exited non-zero.
    Failed { exit_code: i32 },
    /// No sign of the guest script: the kernel did not boot or virtme-run failed.
    NoBoot,
    /// The guest booted but wrote no exit code (crash, panic, power-off mid-run).
    NoResult,
    /// Killed after the timeout.
    TimedOut,
    /// The guest ran another kernel than the one asked for (its `uname -r`).
    WrongKernel { booted: String },
}

/// One kernel's run.
#[derive(Debug, Clone)]
pub(crate) struct KernelResult {
    pub(crate) kernel: KernelImage,
    pub(crate) outcome: Outcome,
    /// From starting virtme-run to the guest script's first line, when it got there.
    pub(crate) boot: Option<Duration>,
    /// From starting virtme-run to its exit.
    pub(crate) elapsed: Duration,
    /// `target/vm-test/<release>/`: guest.log, console.log, command.sh and the guest's files.
    pub(crate) out_dir: PathBuf,
    /// The end of guest.log (or of console.log when the guest wrote no log).
    pub(crate) log_tail: String,
}

impl KernelResult {
    pub(crate) fn passed(&self) -> bool {
        self.outcome == Outcome::Passed
    }

    /// `vm-test: 6.1.0-57-amd64 (6.1.192-3): PASSED in 45s (boot 20s)`
    pub(crate) fn summary(&self) -> String {
        let verdict = match &self.outcome {
            Outcome::Passed => "PASSED".to_owned(),
            Outcome::Failed { exit_code } if *exit_code == GUEST_NOT_PREPARED => {
                "FAILED (the guest could not be prepared)".to_owned()
            }
            Outcome::Failed { exit_code } => format!("FAILED (exit code {exit_code})"),
            Outcome::NoBoot => "FAILED (the kernel did not boot: no guest output)".to_owned(),
            Outcome::NoResult => "FAILED (the guest wrote no result)".to_owned(),
            Outcome::TimedOut if self.boot.is_none() => {
                "FAILED (timed out before the kernel booted)".to_owned()
            }
            Outcome::TimedOut => "FAILED (timed out)".to_owned(),
            Outcome::WrongKernel { booted } => format!("FAILED (the guest ran {booted})"),
        };
        let boot = self
            .boot
            .map(|boot| format!(" (boot {:.0}s)", boot.as_secs_f64()))
            .unwrap_or_default();
        format!(
            "vm-test: {} ({}): {verdict} in {:.0}s{boot}",
            self.kernel.release,
            self.kernel.version,
            self.elapsed.as_secs_f64()
        )
    }
}

/// `cargo xtask vm-test`: setup, then the matrix; one line per kernel, the log's tail for
/// failures, and an error when any kernel failed.
pub(crate) fn run(lines: &[String], args: &[String], options: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let lines = if lines.is_empty() {
        KERNEL_LINES.to_vec()
    } else {
        lines
            .iter()
            .map(|line| KernelLine::parse(line))
            .collect::<anyhow::Result<_>>()?
    };
    setup::run()?;
    let results = if args.is_empty() && env::var_os("DRAINGATE_VM_TESTS").is_none() {
        // The project's kernel tests where the agent runs, its refusal where it does not.
        let commands = default_commands()?;
        let mut results = Vec::new();
        for line in lines {
            let guest = match line.suite {
                Suite::Full => &commands.full,
                Suite::Layouts => &commands.layouts,
                Suite::Refused => &commands.refusal,
            };
            results.extend(run_matrix_with(&[line], guest, options)?);
        }
        results
    } else {
        run_matrix_with(&lines, &GuestCommand::from_args(args)?, options)?
    };
    println!();
    for result in &results {
        println!("{}", result.summary());
        if !result.passed() {
            println!(
                "vm-test:   logs in {}; the end of the log:",
                result.out_dir.display()
            );
            for line in result.log_tail.lines() {
                println!("vm-test:   | {line}");
            }
        }
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.kernel.release.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "vm-test FAILED on {} of {} kernels: {}",
            failed.len(),
            results.len(),
            failed.join(", ")
        );
    }
    println!(
        "vm-test: PASSED on {} kernels in {:.0}s",
        results.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The kernel tests that prove counting, each test binary with its filters: the agent's counts
/// against the pod's own kernel counters and the clients (`ground_truth`), every program's
/// counting (`kernel_smoke`: connections, refusals, resets, restart, exits), whole pods through
/// the agent (`agent_drain`: graceful and abrupt terminations, a connection held at exit, an
/// agent restart), the agent binary's start (no warning), and one short rehearsal.
const KERNEL_TESTS: &[(&str, &str)] = &[
    ("ground_truth", ""),
    ("kernel_smoke", ""),
    ("agent_drain", ""),
    (
        "cli",
        "the_agent_starts_without_warnings_and_names_its_programs --exact",
    ),
    (
        "rehearse",
        "abrupt_exit_with_keep_alive_clients_fails_and_counts_match --exact",
    ),
];

/// The part of [`KERNEL_TESTS`] that reads the kernel's record layouts and counts through them:
/// the agent's counts against the pod's own kernel counters, each tracepoint program's counting
/// (not the packet path, which reads no layout: 6.1 runs it), signals and exits, and the
/// agent's start. Test names, exact (a filter matches anywhere in a name).
const LAYOUT_TESTS: &[(&str, &str)] = &[
    ("ground_truth", ""),
    (
        "kernel_smoke",
        "--exact \
         counts_ipv4_connections_per_pod_address \
         counts_ipv6_connections_per_pod_address \
         counts_ipv4_connections_with_offsets_from_tracefs \
         counts_ipv6_connections_with_offsets_from_tracefs \
         counts_ipv4_refused_connections_with_events \
         counts_ipv6_refused_connections_with_events \
         counts_ipv4_refused_connections_with_offsets_from_tracefs \
         counts_ipv6_refused_connections_with_offsets_from_tracefs \
         reports_signals_and_exits_of_pod_processes_reading_records_in_place \
         reports_signals_and_exits_of_pod_processes_with_offsets_from_tracefs \
         reports_exits_of_pod_processes_from_the_live_thread_count_without_group_dead",
    ),
    (
        "cli",
        "the_agent_starts_without_warnings_and_names_its_programs --exact",
    ),
];

/// The guest commands of the default matrix, one per [`Suite`].
struct DefaultCommands {
    full: GuestCommand,
    layouts: GuestCommand,
    refusal: GuestCommand,
}

/// Builds the binaries and test binaries the guests run, and returns the guest commands: the
/// kernel tests (all, or the layout part), and the check that a kernel below the minimum is
/// refused.
fn default_commands() -> anyhow::Result<DefaultCommands> {
    let root = workspace_root();
    run_checked(
        cargo(None)
            .args(["build", "--locked"])
            .args(crate::command::TEST_BINARIES),
    )?;
    let mut build = cargo(None);
    build.args([
        "test",
        "--locked",
        "--package",
        "draingate-tests",
        "--no-run",
        "--message-format=json",
    ]);
    for (test, _) in KERNEL_TESTS {
        build.args(["--test", test]);
    }
    let messages = stdout(&mut build)?;
    let entries = |tests: &[(&str, &str)]| -> anyhow::Result<String> {
        let mut entries = Vec::new();
        for (test, filter) in tests {
            let executable = messages
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .find(|m| {
                    m["reason"] == "compiler-artifact"
                        && m["target"]["name"] == *test
                        && m["target"]["kind"][0] == "test"
                })
                .and_then(|m| m["executable"].as_str().map(str::to_owned))
                .with_context(|| format!("cargo built no test binary `{test}`"))?;
            // One test at a time: the guest has two slow CPUs, and the tests' timing bounds
            // are for a loaded host, not a software CPU shared by several tests.
            entries.push(format!("{executable} --test-threads=1 {filter}"));
        }
        Ok(entries.join(";"))
    };
    let too_old = format!(
        "bash {} {}",
        shell_quote(&root.join("xtask/vm/too-old.sh").to_string_lossy()),
        shell_quote(
            &crate::command::target_dir()
                .join("debug/draingate")
                .to_string_lossy()
        )
    );
    Ok(DefaultCommands {
        full: GuestCommand::KernelTests(entries(KERNEL_TESTS)?),
        layouts: GuestCommand::KernelTests(entries(LAYOUT_TESTS)?),
        refusal: GuestCommand::Shell(too_old),
    })
}

/// Boots each kernel line in turn (one VM at a time), runs `guest` in it and returns how each
/// run ended. Installs the VM tools and downloads kernels when missing. An error means the
/// matrix could not run at all (tools, downloads); a kernel that fails, does not boot or writes
/// no result is a result whose outcome says so.
#[expect(dead_code, reason = "for other xtask code; `run` uses run_matrix_with")]
pub(crate) fn run_matrix(
    kernels: &[KernelLine],
    guest_command: &GuestCommand,
) -> anyhow::Result<Vec<KernelResult>> {
    run_matrix_with(kernels, guest_command, &Options::default())
}

/// [`run_matrix`] with explicit options.
pub(crate) fn run_matrix_with(
    kernels: &[KernelLine],
    guest_command: &GuestCommand,
    options: &Options,
) -> anyhow::Result<Vec<KernelResult>> {
    if kernels.is_empty() {
        bail!("no kernel to run");
    }
    let accel = Accel::from_env()?;
    let cache = cache_dir()?;
    let virtme_run = vm_tools(&cache)?;
    let apt = PrivateApt::new(&cache)?;
    // Lists once, when asked or missing: with cached lists and kernels nothing is downloaded.
    let fresh_lists = options.refresh || !apt.has_lists();
    if fresh_lists {
        apt.update()?;
    }
    let mut images = Vec::new();
    for &line in kernels {
        images.push(prepare_kernel(&apt, &cache, line, fresh_lists)?);
    }
    let mut results = Vec::new();
    for image in images {
        println!(
            "vm-test: {}: booting {} ({} {}, {}) and running {}",
            image.line.line,
            image.release,
            image.package,
            image.version,
            accel.describe(),
            match guest_command {
                GuestCommand::KernelTests(_) => "the kernel tests in $DRAINGATE_VM_TESTS",
                GuestCommand::Shell(line) => line.as_str(),
            }
        );
        let result = boot(&virtme_run, &image, guest_command, accel, options)?;
        println!("{}", result.summary());
        results.push(result);
    }
    Ok(results)
}

/// QEMU's CPU: software (TCG) unless `DRAINGATE_VM_ACCEL=kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    fn from_env() -> anyhow::Result<Self> {
        match env::var("DRAINGATE_VM_ACCEL").as_deref() {
            Err(_) | Ok("" | "tcg") => Ok(Self::Tcg),
            Ok("kvm") => Ok(Self::Kvm),
            Ok(other) => bail!("DRAINGATE_VM_ACCEL={other:?}: use `tcg` (default) or `kvm`"),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Tcg => "QEMU TCG",
            Self::Kvm => "QEMU KVM",
        }
    }
}

/// `$DRAINGATE_VM_CACHE`, or `~/.cache/draingate/kernels`.
fn cache_dir() -> anyhow::Result<PathBuf> {
    let dir = if let Some(dir) = env::var_os("DRAINGATE_VM_CACHE") {
        PathBuf::from(dir)
    } else {
        let home = env::var_os("HOME").context("HOME is not set (or set DRAINGATE_VM_CACHE)")?;
        PathBuf::from(home).join(".cache/draingate/kernels")
    };
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // virtme-run and apt get absolute paths; the guest sees the host's paths as they are.
    dir.canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))
}

/// Installs what the VMs need when missing: QEMU, kmod and busybox-static from Debian, and
/// virtme-ng in a virtualenv of its own under the cache. Returns virtme-run's path.
fn vm_tools(cache: &Path) -> anyhow::Result<PathBuf> {
    let missing: Vec<&str> = VM_PACKAGES
        .into_iter()
        .filter(|package| !setup::debian_package_installed(package))
        .collect();
    if missing.is_empty() {
        println!("vm-test: {} present", VM_PACKAGES.join(", "));
    } else {
        setup::apt_install(&missing, "the kernel VMs")?;
    }

    let venv = cache.join(format!("virtme-ng-{VIRTME_NG_VERSION}"));
    let virtme_run = venv.join("bin/virtme-run");
    let pip = venv.join("bin/pip");
    if installed_virtme_ng(&pip).as_deref() == Some(VIRTME_NG_VERSION) && virtme_run.exists() {
        println!("vm-test: virtme-ng {VIRTME_NG_VERSION} present");
        return Ok(virtme_run);
    }
    println!(
        "vm-test: installing virtme-ng {VIRTME_NG_VERSION} into {}",
        venv.display()
    );
    if run_checked(Command::new("python3").arg("-m").arg("venv").arg(&venv)).is_err() {
        // Debian's own python3 has no venv module without python3-venv.
        if !is_root() {
            bail!(
                "python3 cannot create a virtualenv for virtme-ng; install python3-venv with \
                 `sudo apt-get install python3-venv`"
            );
        }
        setup::apt_install(&["python3-venv"], "virtme-ng's virtualenv")?;
        run_checked(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    run_checked(
        Command::new(&pip)
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
    )
    .context("installing virtme-ng with pip")?;
    if installed_virtme_ng(&pip).as_deref() != Some(VIRTME_NG_VERSION) || !virtme_run.exists() {
        bail!(
            "virtme-ng {VIRTME_NG_VERSION} was installed but {} is missing",
            virtme_run.display()
        );
    }
    Ok(virtme_run)
}

/// The virtme-ng version in the virtualenv of `pip`, if any.
fn installed_virtme_ng(pip: &Path) -> Option<String> {
    if !pip.exists() {
        return None;
    }
    let shown = stdout(Command::new(pip).args(["show", "virtme-ng"])).ok()?;
    shown
        .lines()
        .find_map(|line| line.strip_prefix("Version: "))
        .map(|version| version.trim().to_owned())
}
