//! `cargo xtask vm-test`: boots Debian's own kernel packages (6.1, 6.12, 5.10) under QEMU with
//! virtme-ng, the host's root shared read-only, runs a command in each and reports per kernel.
//!
//! Kernels are downloaded with `apt-get download` through a private apt configuration (the host's
//! sources stay as they are), extracted with `dpkg-deb -x`, never installed, and cached under
//! `~/.cache/draingate/kernels` (or `$DRAINGATE_VM_CACHE`): a second run downloads nothing.
//! The guest writes its results (`xtask/vm/guest.sh`) into `target/vm-test/<uname -r>/`, which the
//! host reads; virtme-run's own exit code is not trusted (255 after clean runs).
//!
//! QEMU runs the software CPU (TCG) by default: the nested KVM of the machines this was built on
//! cannot boot stock kernels (`KVM internal error. Suberror: 1` at SLUB's `lock cmpxchg16b`).
//! `DRAINGATE_VM_ACCEL=kvm` uses KVM on hosts where it works.

use std::{
    env,
    fmt::Write as _,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use crate::{
    command::{cargo, is_root, output, run_checked, stdout, workspace_root},
    setup,
};

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

/// apt with its own sources, lists and cache under the kernel cache: the suites of the three
/// kernel lines from the host's own mirror, without touching the host's apt configuration.
struct PrivateApt {
    config: PathBuf,
    lists: PathBuf,
}

impl PrivateApt {
    fn new(cache: &Path) -> anyhow::Result<Self> {
        let root = cache.join("apt");
        let lists = root.join("lists");
        for dir in [
            lists.join("partial"),
            root.join("cache/archives/partial"),
            root.join("preferences.d"),
        ] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let (mirror, security) = host_mirrors();
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let mut sources = String::from("# Written by cargo xtask vm-test (xtask/src/vm.rs).\n");
        for (uri, suite) in [
            (&mirror, "bookworm"),
            (&security, "bookworm-security"),
            (&mirror, "bookworm-backports"),
            (&mirror, "bullseye"),
            (&security, "bullseye-security"),
        ] {
            writeln!(sources, "deb [signed-by={keyring}] {uri} {suite} main")?;
        }
        let sources_list = root.join("sources.list");
        write_if_changed(&sources_list, &sources)?;
        let config = root.join("apt.conf");
        let conf = format!(
            "// Written by cargo xtask vm-test: the host's apt sources stay as they are.\n\
             Dir::Etc::SourceList \"{sources}\";\n\
             Dir::Etc::SourceParts \"/dev/null\";\n\
             Dir::Etc::Preferences \"{root}/preferences\";\n\
             Dir::Etc::PreferencesParts \"{root}/preferences.d\";\n\
             Dir::State::Lists \"{lists}\";\n\
             Dir::Cache \"{root}/cache\";\n\
             // The cache is root's: downloading as _apt could not write there.\n\
             APT::Sandbox::User \"root\";\n\
             // Only the Packages lists are needed, not the host's extra index targets.\n\
             Acquire::IndexTargets::deb::DEP-11::DefaultEnabled \"false\";\n\
             Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled \"false\";\n\
             Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled \"false\";\n\
             Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled \"false\";\n",
            sources = sources_list.display(),
            root = root.display(),
            lists = lists.display(),
        );
        write_if_changed(&config, &conf)?;
        Ok(Self { config, lists })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", &self.config)
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    fn has_lists(&self) -> bool {
        fs::read_dir(&self.lists).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
    }

    fn update(&self) -> anyhow::Result<()> {
        println!("vm-test: reading the kernel suites' package lists (private apt configuration)");
        run_checked(self.command("apt-get").args(["update", "-q"]))
            .context("apt-get update with the private kernel sources failed")
    }
}

/// The host's Debian mirror and security mirror, from its apt sources (deb822 or one-line
/// format); deb.debian.org when none is found. `cargo xtask kube` fetches its source package
/// from the same mirror.
pub(crate) fn host_mirrors() -> (String, String) {
    // In apt's order: sources.list.d by name, then sources.list.
    let mut paths: Vec<PathBuf> = fs::read_dir("/etc/apt/sources.list.d")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| {
                    path.extension()
                        .is_some_and(|ext| ext == "sources" || ext == "list")
                })
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    paths.push("/etc/apt/sources.list".into());
    let texts: Vec<String> = paths
        .iter()
        .filter_map(|path| fs::read_to_string(path).ok())
        .collect();
    let mut uris = Vec::new();
    for text in &texts {
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("URIs:") {
                uris.extend(rest.split_whitespace().map(str::to_owned));
            } else if let Some(rest) = line.strip_prefix("deb ") {
                // deb [options] uri suite components
                let rest = match rest.trim_start().strip_prefix('[') {
                    Some(options) => options.split_once(']').map_or("", |(_, rest)| rest),
                    None => rest,
                };
                uris.extend(rest.split_whitespace().next().map(str::to_owned));
            }
        }
    }
    let debian = |uri: &&String| uri.contains("debian");
    let mirror = uris
        .iter()
        .filter(debian)
        .find(|uri| !uri.contains("security"))
        .cloned()
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned());
    let security = uris
        .iter()
        .filter(debian)
        .find(|uri| uri.contains("security"))
        .cloned()
        .unwrap_or_else(|| "http://deb.debian.org/debian-security".to_owned());
    (mirror, security)
}

fn write_if_changed(path: &Path, text: &str) -> anyhow::Result<()> {
    if fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The newest image package of `line`, through the meta package `linux-image-amd64` (the
/// `-amd64` flavour: `-cloud-amd64` kernels have no 9p, which virtme-run shares the root over).
/// Returns the image package and its version.
fn newest_image(apt: &PrivateApt, line: KernelLine) -> anyhow::Result<Option<(String, String)>> {
    let shown = stdout(apt.command("apt-cache").args(["show", "linux-image-amd64"]))?;
    let prefix = format!("{}.", line.line);
    let mut best: Option<(String, String, String)> = None;
    for stanza in shown.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        let (Some(meta_version), Some(depends)) = (field("Version:"), field("Depends:")) else {
            continue;
        };
        if !meta_version.starts_with(&prefix) {
            continue;
        }
        // "linux-image-6.1.0-57-amd64 (= 6.1.192-3)"
        let first = depends.split(',').next().unwrap_or_default().trim();
        let Some((package, rest)) = first.split_once(" (= ") else {
            continue;
        };
        let version = rest.trim_end_matches(')').to_owned();
        let newer = match &best {
            None => true,
            Some((best_meta, _, _)) => Command::new("dpkg")
                .args(["--compare-versions", &meta_version, "gt", best_meta])
                .status()
                .is_ok_and(|status| status.success()),
        };
        if newer {
            best = Some((meta_version, package.to_owned(), version));
        }
    }
    Ok(best.map(|(_, package, version)| (package, version)))
}

/// The extracted image of the newest package of `line`: from the cache, or downloaded and
/// extracted. Older extracted versions of the line are removed. `fresh_lists`: the package lists
/// were just read, so a failed download is not theirs being stale.
fn prepare_kernel(
    apt: &PrivateApt,
    cache: &Path,
    line: KernelLine,
    fresh_lists: bool,
) -> anyhow::Result<KernelImage> {
    let resolve = || {
        newest_image(apt, line)?.with_context(|| {
            format!(
                "no linux-image-amd64 {}.* in the private package lists ({}); run with \
                 --refresh to re-read them",
                line.line, line.suites
            )
        })
    };
    let (mut package, mut version) = resolve()?;
    let images = cache.join("images");
    let mut dir = images.join(format!("{package}_{version}"));
    let mut fetched = false;
    if !dir.exists() {
        let downloaded = download_and_extract(apt, cache, &package, &version, &dir);
        if let Err(err) = downloaded {
            if fresh_lists {
                return Err(err);
            }
            // Stale lists: the mirror may have replaced that version since they were read.
            println!(
                "vm-test: downloading {package} {version} failed ({err:#}); re-reading the lists"
            );
            apt.update()?;
            (package, version) = resolve()?;
            dir = images.join(format!("{package}_{version}"));
            if !dir.exists() {
                download_and_extract(apt, cache, &package, &version, &dir)?;
            }
        }
        fetched = true;
    }
    let release = modules_release(&dir)?;
    let image = KernelImage {
        line,
        package,
        version,
        release,
        dir,
    };
    if !image.vmlinuz().exists() {
        bail!(
            "{} has no boot/vmlinuz-{}; remove it to download it again",
            image.dir.display(),
            image.release
        );
    }
    println!(
        "vm-test: kernel {}: {} {} ({})",
        line.line,
        image.package,
        image.version,
        if fetched { "downloaded" } else { "cached" }
    );
    remove_older_images(&images, line, &image.dir);
    Ok(image)
}

/// `apt-get download` into a scratch directory, `dpkg-deb -x`, `depmod` (Debian's packages ship
/// no modules.dep), then a rename: a directory under images/ is always complete.
fn download_and_extract(
    apt: &PrivateApt,
    cache: &Path,
    package: &str,
    version: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    let scratch = cache.join("download");
    if scratch.exists() {
        fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    println!("vm-test: downloading {package} {version}");
    output(
        apt.command("apt-get")
            .args(["download", "-q", &format!("{package}={version}")])
            .current_dir(&scratch),
    )?;
    let deb = fs::read_dir(&scratch)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", scratch.display()))?;
    let tree = scratch.join("tree");
    run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    let release = modules_release(&tree)?;
    run_checked(
        Command::new("depmod")
            .arg("-b")
            .arg(&tree)
            .arg(&release)
            .env("PATH", sbin_path()),
    )?;
    let parent = dir.parent().context("image directory has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    fs::rename(&tree, dir)
        .with_context(|| format!("moving {} to {}", tree.display(), dir.display()))?;
    fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    Ok(())
}

/// depmod lives in /usr/sbin, which a non-root PATH may lack.
fn sbin_path() -> String {
    let path = env::var("PATH").unwrap_or_default();
    format!("{path}:/usr/sbin:/sbin")
}

/// The one `lib/modules/<release>` of an extracted kernel package.
fn modules_release(tree: &Path) -> anyhow::Result<String> {
    let modules = tree.join("lib/modules");
    let mut releases: Vec<String> = fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    match releases.len() {
        1 => Ok(releases.remove(0)),
        _ => bail!(
            "{} should hold one kernel's modules, found {releases:?}",
            modules.display()
        ),
    }
}

/// Extracted packages of `line` other than `current`: left by an earlier, older kernel.
fn remove_older_images(images: &Path, line: KernelLine, current: &Path) {
    let prefix = format!("linux-image-{}.", line.line);
    let Ok(entries) = fs::read_dir(images) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path != current && entry.file_name().to_string_lossy().starts_with(&prefix) {
            println!("vm-test: removing the older {}", path.display());
            if let Err(err) = fs::remove_dir_all(&path) {
                println!("vm-test: cannot remove {}: {err}", path.display());
            }
        }
    }
}

/// Boots `image` with virtme-run, runs `guest` through guest.sh and reads what it wrote back.
fn boot(
    virtme_run: &Path,
    image: &KernelImage,
    guest: &GuestCommand,
    accel: Accel,
    options: &Options,
) -> anyhow::Result<KernelResult> {
    let workspace = workspace_root();
    let out_dir = workspace.join("target/vm-test").join(&image.release);
    if out_dir.exists() {
        fs::remove_dir_all(&out_dir).with_context(|| format!("removing {}", out_dir.display()))?;
    }
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out_dir = out_dir.canonicalize()?;
    let command_sh = format!(
        "# Written by cargo xtask vm-test (xtask/src/vm.rs); run by xtask/vm/guest.sh.\n\
         export DRAINGATE_VM_OUT={out}\n\
         export DRAINGATE_VM_KERNEL={release}\n\
         export DRAINGATE_VM_KERNEL_DIR={dir}\n\
         cd {workspace} || exit 125\n{script}",
        out = shell_quote(&out_dir.to_string_lossy()),
        release = shell_quote(&image.release),
        dir = shell_quote(&image.dir.to_string_lossy()),
        workspace = shell_quote(&workspace.to_string_lossy()),
        script = guest.script(&workspace),
    );
    fs::write(out_dir.join("command.sh"), command_sh)?;
    let guest_sh = workspace.join("xtask/vm/guest.sh");
    let console = out_dir.join("console.log");
    let console_file =
        fs::File::create(&console).with_context(|| format!("creating {}", console.display()))?;

    let mut cmd = Command::new(virtme_run);
    cmd.arg("--kimg")
        .arg(image.vmlinuz())
        .args([
            "--mods",
            "auto",
            "--memory",
            MEMORY,
            "--cpus",
            CPUS,
            // Debian's -amd64 kernels have 9p (as modules, loaded from virtme's initramfs).
            "--force-9p",
        ])
        .arg(format!("--rwdir={}", out_dir.display()))
        .arg("--script-sh")
        .arg(format!(
            "bash {} {} {}",
            shell_quote(&guest_sh.to_string_lossy()),
            shell_quote(&out_dir.to_string_lossy()),
            shell_quote(&image.dir.to_string_lossy())
        ));
    if accel == Accel::Tcg {
        cmd.arg("--disable-kvm");
    }
    if options.verbose {
        cmd.args(["--verbose", "--show-boot-console"]);
    }
    let virtme_bin = virtme_run.parent().context("virtme-run has no directory")?;
    cmd.env("PATH", format!("{}:{}", virtme_bin.display(), sbin_path()))
        .current_dir(&workspace)
        .stdin(Stdio::null())
        .stdout(console_file.try_clone()?)
        .stderr(console_file)
        // Its own process group, so a timeout kills QEMU too, not only virtme-run.
        .process_group(0);

    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", virtme_run.display()))?;
    let mut follower = options.follow.then(|| LogFollower {
        path: out_dir.join("guest.log"),
        prefix: format!("  {} | ", image.release),
        offset: 0,
        partial: Vec::new(),
    });
    let booted_file = out_dir.join("booted");
    let exit_file = out_dir.join("exit-code");
    let mut boot = None;
    let mut finished_at = None;
    let mut timed_out = false;
    loop {
        if boot.is_none() && booted_file.exists() {
            boot = Some(started.elapsed());
            println!(
                "vm-test: {} booted in {:.0}s",
                image.release,
                started.elapsed().as_secs_f64()
            );
        }
        if let Some(follower) = &mut follower {
            follower.poll();
        }
        if child.try_wait()?.is_some() {
            break;
        }
        if finished_at.is_none() && exit_file.exists() {
            finished_at = Some(Instant::now());
        }
        if finished_at.is_some_and(|at| at.elapsed() > SHUTDOWN_GRACE) {
            println!(
                "vm-test: {}: the guest finished but QEMU did not stop within {}s; killing it",
                image.release,
                SHUTDOWN_GRACE.as_secs()
            );
            kill_group(&mut child);
            break;
        }
        // QEMU stays up after a KVM emulation failure: give up at once instead of at the timeout.
        if accel == Accel::Kvm
            && boot.is_none()
            && fs::read_to_string(&console).is_ok_and(|text| text.contains(KVM_FAILURE))
        {
            kill_group(&mut child);
            break;
        }
        if started.elapsed() > options.timeout {
            timed_out = true;
            kill_group(&mut child);
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    let elapsed = started.elapsed();
    if let Some(follower) = &mut follower {
        follower.finish();
    }
    if boot.is_none() && booted_file.exists() {
        boot = Some(elapsed);
    }

    let exit_code = fs::read_to_string(&exit_file)
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok());
    let booted_release = fs::read_to_string(&booted_file).ok();
    let outcome = match (exit_code, &booted_release) {
        (Some(0), _) => Outcome::Passed,
        (Some(exit_code), _) => Outcome::Failed { exit_code },
        (None, _) if timed_out => Outcome::TimedOut,
        (None, Some(_)) => Outcome::NoResult,
        (None, None) => Outcome::NoBoot,
    };
    // The guest must be the kernel asked for, not the host's or another one.
    let outcome = match booted_release.as_deref().and_then(|b| b.split(' ').next()) {
        Some(booted) if booted != image.release => Outcome::WrongKernel {
            booted: booted.to_owned(),
        },
        _ => outcome,
    };
    let mut log_tail = tail(&out_dir.join("guest.log"))
        .or_else(|| tail(&console))
        .unwrap_or_else(|| {
            "(no guest.log and an empty console.log; rerun with --verbose to see the boot \
             console)\n"
                .to_owned()
        });
    if boot.is_none() && log_tail.contains(KVM_FAILURE) {
        log_tail.push_str(
            "vm-test: this host's KVM cannot run this kernel; unset DRAINGATE_VM_ACCEL to use \
             QEMU's software CPU\n",
        );
    }
    Ok(KernelResult {
        kernel: image.clone(),
        outcome,
        boot,
        elapsed,
        out_dir,
        log_tail,
    })
}

/// Prints the lines the guest appends to its log (the 9p share shows them as it writes).
struct LogFollower {
    path: PathBuf,
    prefix: String,
    offset: u64,
    /// The last line, until its newline arrives.
    partial: Vec<u8>,
}

impl LogFollower {
    fn poll(&mut self) {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let Ok(mut file) = fs::File::open(&self.path) else {
            return;
        };
        let mut new = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_err() || file.read_to_end(&mut new).is_err() {
            return;
        }
        self.offset += new.len() as u64;
        self.partial.extend_from_slice(&new);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            println!(
                "{}{}",
                self.prefix,
                String::from_utf8_lossy(&line[..end]).trim_end()
            );
        }
    }

    fn finish(&mut self) {
        self.poll();
        if !self.partial.is_empty() {
            println!("{}{}", self.prefix, String::from_utf8_lossy(&self.partial));
            self.partial.clear();
        }
    }
}

/// SIGTERM to virtme-run's process group (it and QEMU), SIGKILL if it is still there 5 s later.
fn kill_group(child: &mut Child) {
    let Ok(pid) = i32::try_from(child.id()) else {
        return;
    };
    let group = Pid::from_raw(pid);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            // QEMU may outlive virtme-run: the group goes either way.
            let _ = killpg(group, Signal::SIGKILL);
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let _ = killpg(group, Signal::SIGKILL);
    let _ = child.wait();
}

/// The last lines of a file, or `None` when it is missing or empty.
fn tail(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return None;
    }
    let start = lines.len().saturating_sub(TAIL_LINES);
    Some(lines[start..].join("\n") + "\n")
}

/// `text` as one shell word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}
