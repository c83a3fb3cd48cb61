//! `cargo xtask setup`: from a fresh machine of this kind to everything builds and tests need.
//! Each step checks first and changes nothing when its piece is present, so a second run takes
//! seconds. When a step cannot be done, it stops with the reason and the fix.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::command::{is_root, output, run_checked, stdout};

/// The bpf-linker release line known to work with aya 0.14 (docs/architecture.md, Build).
const BPF_LINKER_VERSION: &str = "0.13";
/// LLVM majors that bpf-linker 0.13 has a feature for.
const BPF_LINKER_LLVM_MAJORS: [u32; 3] = [21, 22, 23];
/// Nightly components: rust-src for `-Z build-std=core`, rustfmt for the unstable import options,
/// clippy for the eBPF crate.
const NIGHTLY_COMPONENTS: [&str; 3] = ["rust-src", "rustfmt", "clippy"];
/// Debian packages the tests use, with a command each provides (what the tests actually run).
const DEBIAN_PACKAGES: [(&str, &str); 5] = [
    ("iproute2", "ip"),
    // The rehearsal's Service: kube-proxy-style DNAT rules written with iptables-restore.
    ("iptables", "iptables-restore"),
    // conntrack -E: which pod each client connection was sent to.
    ("conntrack", "conntrack"),
    // `cargo xtask image` loads the image into podman; a kernel test runs it there as the
    // DaemonSet and the gate's Deployment run it (tests/tests/image.rs).
    ("podman", "podman"),
    // The runtime that test runs the image with: containerd's default, and, unlike crun,
    // podman's default here, it runs containers on hybrid cgroup hierarchies.
    ("runc", "runc"),
];

/// What one run did: steps that changed the machine.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) changed: Vec<String>,
}

pub(crate) fn run() -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut report = Report::default();
    nightly_components(&mut report)?;
    bpf_linker(&mut report)?;
    debian_packages(&mut report)?;
    mounts(&mut report)?;
    let changed = if report.changed.is_empty() {
        "nothing changed".to_owned()
    } else {
        format!("changed: {}", report.changed.join(", "))
    };
    println!(
        "setup: ready in {:.1}s ({changed})",
        started.elapsed().as_secs_f64()
    );
    Ok(report)
}

fn step_ok(what: &str, detail: &str) {
    println!("setup: {what}: {detail}");
}

fn nightly_components(report: &mut Report) -> anyhow::Result<()> {
    let toolchains = stdout(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs with nightly")?;
    if !toolchains.lines().any(|line| line.starts_with("nightly")) {
        println!("setup: nightly toolchain missing; installing it");
        run_checked(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context(
            "the eBPF programs build with a nightly toolchain; install one with \
                 `rustup toolchain install nightly`",
        )?;
        report.changed.push("nightly toolchain".into());
    }
    let installed = stdout(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    let missing: Vec<&str> = NIGHTLY_COMPONENTS
        .into_iter()
        .filter(|component| !installed.lines().any(|line| line.starts_with(component)))
        .collect();
    if missing.is_empty() {
        step_ok("nightly components", "present");
        return Ok(());
    }
    println!(
        "setup: adding {} to the nightly toolchain",
        missing.join(", ")
    );
    run_checked(
        Command::new("rustup")
            .args(["component", "add", "--toolchain", "nightly"])
            .args(&missing),
    )?;
    report
        .changed
        .extend(missing.iter().map(|c| format!("nightly {c}")));
    Ok(())
}

/// The nightly toolchain's LLVM: its major version and its shared library.
struct NightlyLlvm {
    major: u32,
    library: PathBuf,
}

fn nightly_llvm() -> anyhow::Result<NightlyLlvm> {
    let version = stdout(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` does not name its LLVM version")?;
    let major: u32 = llvm
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .with_context(|| format!("cannot read the LLVM major version from {llvm:?}"))?;
    let sysroot = stdout(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let prefix = format!("libLLVM.so.{major}.");
    let library = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&prefix))
        })
        .with_context(|| {
            format!(
                "the nightly toolchain has no {prefix}* under {}; reinstall it with \
                 `rustup toolchain install nightly --force`",
                lib.display()
            )
        })?;
    Ok(NightlyLlvm { major, library })
}

/// bpf-linker must read exactly the bitcode nightly's rustc writes, so it has to link nightly's
/// own libLLVM. A bpf-linker of another release or linked to another LLVM is rebuilt.
fn bpf_linker(report: &mut Report) -> anyhow::Result<()> {
    let llvm = nightly_llvm()?;
    let library_name = llvm
        .library
        .file_name()
        .and_then(|name| name.to_str())
        .context("non-UTF-8 libLLVM name")?
        .to_owned();
    if let Some(why_not) = bpf_linker_mismatch(&library_name)? {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against {library_name}: {why_not}"
        );
        build_bpf_linker(&llvm)?;
        if let Some(still) = bpf_linker_mismatch(&library_name)? {
            bail!("bpf-linker was built but is still not usable: {still}");
        }
        report.changed.push("bpf-linker".into());
    } else {
        step_ok(
            "bpf-linker",
            &format!("{BPF_LINKER_VERSION} linked to {library_name}"),
        );
    }
    Ok(())
}

/// Why the installed bpf-linker is not the right one, or `None` when it is.
fn bpf_linker_mismatch(library_name: &str) -> anyhow::Result<Option<String>> {
    let Ok(path) = which::which("bpf-linker") else {
        return Ok(Some("not installed".into()));
    };
    let libraries = stdout(Command::new("ldd").arg(&path))?;
    if !libraries.contains(library_name) {
        return Ok(Some(format!("{} links another LLVM", path.display())));
    }
    let version =
        match output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"])) {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(err) => return Ok(Some(format!("it does not run: {err:#}"))),
        };
    if !version
        .trim()
        .starts_with(&format!("bpf-linker {BPF_LINKER_VERSION}."))
    {
        return Ok(Some(format!("found {}", version.trim())));
    }
    Ok(None)
}

fn build_bpf_linker(llvm: &NightlyLlvm) -> anyhow::Result<()> {
    if !BPF_LINKER_LLVM_MAJORS.contains(&llvm.major) {
        bail!(
            "nightly uses LLVM {}, but bpf-linker {BPF_LINKER_VERSION} supports LLVM {:?}; \
             pin a nightly with one of those (rust-toolchain) or update BPF_LINKER_VERSION",
            llvm.major,
            BPF_LINKER_LLVM_MAJORS
        );
    }
    // A prefix that looks like an LLVM install to llvm-sys: an empty llvm-config and a
    // libLLVM.so that is nightly's own library. No system LLVM is needed.
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = cargo_home
        .join("draingate")
        .join(format!("llvm-{}", llvm.major));
    let bin = prefix.join("bin");
    let lib = prefix.join("lib");
    fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let llvm_config = bin.join("llvm-config");
    fs::write(&llvm_config, "#!/bin/sh\n")
        .with_context(|| format!("writing {}", llvm_config.display()))?;
    set_executable(&llvm_config)?;
    let link = lib.join("libLLVM.so");
    match fs::remove_file(&link) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", link.display())),
    }
    std::os::unix::fs::symlink(&llvm.library, &link)
        .with_context(|| format!("linking {} to {}", link.display(), llvm.library.display()))?;

    let started = Instant::now();
    // The rpath lets bpf-linker run outside `rustup run nightly` too.
    let lib_dir = llvm.library.parent().context("libLLVM has no directory")?;
    run_checked(
        Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--version",
                &format!("~{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                &format!("llvm-{}", llvm.major),
            ])
            .env("LLVM_PREFIX", &prefix)
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display()),
            ),
    )
    .context("building bpf-linker failed; its output is above")?;
    println!(
        "setup: bpf-linker built in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn set_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", path.display()))
}

fn debian_packages(report: &mut Report) -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, command)| which::which(command).is_err())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        step_ok("Debian packages", "present");
        return Ok(());
    }
    apt_install(&missing, "the tests")?;
    report
        .changed
        .extend(missing.iter().map(|p| (*p).to_owned()));
    Ok(())
}

/// Whether dpkg has `package` installed.
pub(crate) fn debian_package_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", package]))
        .is_ok_and(|out| out.stdout.ends_with(b" installed"))
}

/// `apt-get install` of `packages` (needed by `what`), with `apt-get update` first when the
/// machine has no package lists yet; without root, an error naming the command to run.
pub(crate) fn apt_install(packages: &[&str], what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{what} need Debian packages {}; install them with `sudo apt-get install {}`",
            packages.join(", "),
            packages.join(" ")
        );
    }
    println!(
        "setup: installing Debian packages {} for {what}",
        packages.join(", ")
    );
    let install = |cmd: &mut Command| {
        run_checked(
            cmd.args(["install", "-y", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install(&mut Command::new("apt-get")).is_err() {
        // A fresh machine may have no package lists yet.
        run_checked(Command::new("apt-get").arg("update"))?;
        install(&mut Command::new("apt-get"))?;
    }
    Ok(())
}

/// tracefs (tracepoint formats and attachment) and bpffs (pinned maps).
fn mounts(report: &mut Report) -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = |fstype: &str, targets: &[&str]| {
        mounts.lines().any(|line| {
            let mut fields = line.split_whitespace();
            let (_, target, kind) = (fields.next(), fields.next(), fields.next());
            kind == Some(fstype) && target.is_some_and(|t| targets.contains(&t))
        })
    };
    for (fstype, targets, target) in [
        (
            "tracefs",
            &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"][..],
            "/sys/kernel/tracing",
        ),
        ("bpf", &["/sys/fs/bpf"][..], "/sys/fs/bpf"),
    ] {
        if mounted(fstype, targets) {
            step_ok(fstype, &format!("mounted at {target}"));
            continue;
        }
        if !is_root() {
            bail!("{fstype} is not mounted; mount it with `sudo mount -t {fstype} none {target}`");
        }
        nix::mount::mount(
            Some("none"),
            target,
            Some(fstype),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting {fstype} at {target}"))?;
        println!("setup: mounted {fstype} at {target}");
        report.changed.push(format!("{fstype} mount"));
    }
    Ok(())
}
