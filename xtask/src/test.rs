//! `cargo xtask test` and `cargo xtask lint`: the project's checks in order, failing fast, with a
//! one-line summary at the end.

use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{
    command::{cargo, is_root, run_checked as run_cmd, target_dir, workspace_root},
    setup,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    All,
    LintOnly,
}

/// One finished step: its name, duration and, for test steps, how many tests passed.
struct Done {
    name: &'static str,
    seconds: f64,
    tests: Option<u64>,
}

pub(crate) fn run(scope: Scope) -> anyhow::Result<()> {
    let started = Instant::now();
    if scope == Scope::All && !is_root() {
        bail!(
            "the kernel tests load eBPF programs and create network namespaces, which needs \
             root: run `sudo -E cargo xtask test` (or `cargo xtask lint` for the checks only)"
        );
    }
    let mut done = Vec::new();
    let mut step = |name: &'static str, f: &mut dyn FnMut() -> anyhow::Result<Option<u64>>| {
        println!("xtask: == {name}");
        let step_started = Instant::now();
        let tests = f().with_context(|| format!("step `{name}` failed"))?;
        done.push(Done {
            name,
            seconds: step_started.elapsed().as_secs_f64(),
            tests,
        });
        anyhow::Ok(())
    };

    step("setup", &mut || setup::run().map(|_| None))?;
    step("fmt", &mut || {
        run_cmd(cargo(Some("nightly")).args(["fmt", "--all", "--", "--check"]))
            .context("formatting differs; run `cargo +nightly fmt --all`")
            .map(|()| None)
    })?;
    step("clippy", &mut || {
        run_cmd(cargo(None).args([
            "clippy",
            "--locked",
            "--workspace",
            "--exclude",
            "draingate-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
        .map(|()| None)
    })?;
    step("stable crates", &mut || stable_crates().map(|()| None))?;
    // The eBPF crate separately, with nightly: it is #![no_std] and has its own panic handler,
    // so it needs panic=abort, also for its (empty) test harness.
    step("clippy-ebpf", &mut || {
        run_cmd(cargo(Some("nightly")).args([
            "clippy",
            "--locked",
            "--package",
            "draingate-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
            "-C",
            "panic=abort",
            "-Zpanic_abort_tests",
        ]))
        .map(|()| None)
    })?;
    if scope == Scope::All {
        step("unit tests", &mut || {
            cargo_test(&[
                "--workspace",
                "--exclude",
                "draingate-ebpf",
                "--exclude",
                "draingate-tests",
            ])
            .map(Some)
        })?;
        // The kernel tests run the `draingate` binary and the test server as real processes.
        step("build binaries", &mut || {
            run_cmd(
                cargo(None)
                    .args(["build", "--locked"])
                    .args(crate::command::TEST_BINARIES),
            )
            .map(|()| None)
        })?;
        // The image of the binary just built (debug: the release build would add minutes),
        // loaded into podman, where a kernel test runs it as the manifests do
        // (tests/tests/image.rs). `cargo xtask image` makes the release image the same way.
        step("image", &mut || {
            crate::image::run(&crate::image::Options {
                profile: crate::image::Profile::Debug,
                tag: None,
                load: true,
            })
            .map(|()| None)
        })?;
        // kube-apiserver and kube-controller-manager for the tests that run a real control
        // plane (tests/src/kube_cluster.rs): built once, minutes; cached afterwards.
        let mut kube_bin = std::path::PathBuf::new();
        step("kube control plane", &mut || {
            kube_bin = crate::kube::ensure()?;
            Ok(None)
        })?;
        step("kernel tests", &mut || {
            cargo_test_with(
                &["--package", "draingate-tests"],
                &[("DRAINGATE_KUBE_BIN", kube_bin.as_os_str())],
            )
            .map(Some)
        })?;
        // The same counting on the kernels users run (Debian's 6.1, 6.12; 5.10 refused), each
        // booted under QEMU: one line per kernel, the guest's log on failure.
        step("kernel matrix", &mut || {
            crate::vm::run(
                &[],
                &[],
                &crate::vm::Options {
                    follow: false,
                    ..crate::vm::Options::default()
                },
            )
            .map(|()| None)
        })?;
    }

    let parts: Vec<String> = done
        .iter()
        .map(|d| match d.tests {
            Some(n) => format!("{} ({n} passed, {:.0}s)", d.name, d.seconds),
            None => format!("{} ({:.0}s)", d.name, d.seconds),
        })
        .collect();
    println!(
        "xtask: PASSED in {:.0}s: {}",
        started.elapsed().as_secs_f64(),
        parts.join(", ")
    );
    Ok(())
}

/// Runs `cargo test --locked ARGS`, echoing its output, and returns how many tests passed.
fn cargo_test(args: &[&str]) -> anyhow::Result<u64> {
    cargo_test_with(args, &[])
}

/// [`cargo_test`] with environment variables `envs` set for cargo and so for the tests.
fn cargo_test_with(args: &[&str], envs: &[(&str, &OsStr)]) -> anyhow::Result<u64> {
    let mut cmd = cargo(None);
    cmd.args(["test", "--locked"]).args(args);
    cmd.envs(envs.iter().copied());
    // Full backtraces of kernel test failures help more than the default one-liner.
    cmd.env("RUST_BACKTRACE", "1");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let mut passed = 0;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        // "test result: ok. 7 passed; 0 failed; ..."
        if let Some(rest) = line.strip_prefix("test result: ok. ") {
            passed += rest
                .split(' ')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() {
        bail!("`cargo test {}` failed ({status})", args.join(" "));
    }
    Ok(passed)
}

/// `cargo xtask bench`: release build, then the benchmark binary, which writes BENCHMARKS.md.
pub(crate) fn bench(only: Option<&str>, args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the benchmark loads eBPF programs and creates network namespaces: run `sudo -E cargo xtask bench`"
        );
    }
    setup::run()?;
    run_cmd(cargo(None).args([
        "build",
        "--locked",
        "--release",
        "--workspace",
        "--exclude",
        "draingate-ebpf",
        "--bins",
    ]))?;
    let root = workspace_root();
    let runs = |part: &str| only.is_none_or(|o| o == part);
    if runs("overhead") {
        let mut cmd = Command::new(target_dir().join("release/draingate-bench"));
        cmd.arg("--out").arg(root.join("BENCHMARKS.md")).args(args);
        run_cmd(&mut cmd)?;
    }
    // Each binary writes (or replaces) its own section of BENCHMARKS.md.
    for (part, binary) in [
        ("accuracy", "draingate-accuracy"),
        ("gate", "draingate-gate-bench"),
        ("hold", "draingate-hold-bench"),
    ] {
        if runs(part) {
            let mut cmd = Command::new(target_dir().join("release").join(binary));
            if part == "hold" {
                // The real control plane, built once and cached.
                cmd.env("DRAINGATE_KUBE_BIN", crate::kube::ensure()?);
            }
            cmd.arg("--out").arg(root.join("BENCHMARKS.md"));
            // Extra arguments go to the one part chosen with --only.
            if only == Some(part) {
                cmd.args(args);
            }
            run_cmd(&mut cmd)?;
        }
    }
    Ok(())
}

/// The crates that build on stable Rust alone: nothing they depend on (to build or to run)
/// builds the eBPF object, so `cargo build -p draingate-gate` needs no nightly and no
/// bpf-linker.
const STABLE_CRATES: [&str; 3] = ["draingate-gate", "draingate-lint", "draingate-serve"];

/// Packages whose presence in a dependency graph means the eBPF toolchain is needed.
const NEEDS_EBPF_TOOLCHAIN: [&str; 3] = ["draingate", "draingate-ebpf", "aya-build"];

/// Fails when a crate of [`STABLE_CRATES`] depends on one of [`NEEDS_EBPF_TOOLCHAIN`].
fn stable_crates() -> anyhow::Result<()> {
    for krate in STABLE_CRATES {
        let output = cargo(None)
            .args(["tree", "--locked", "--offline", "--edges", "normal,build"])
            .args(["--prefix", "none", "--format", "{p}", "--package", krate])
            .stderr(Stdio::inherit())
            .output()
            .context("running cargo tree")?;
        if !output.status.success() {
            bail!("cargo tree --package {krate} failed ({})", output.status);
        }
        let tree = String::from_utf8_lossy(&output.stdout);
        if let Some(bad) = ebpf_toolchain_dependency(&tree) {
            bail!(
                "{krate} depends on {bad}, which needs nightly and bpf-linker to build; \
                 it must build on stable alone (docs/architecture.md, \"Crates\")"
            );
        }
    }
    println!(
        "{} build without the eBPF toolchain",
        STABLE_CRATES.join(", ")
    );
    Ok(())
}

/// The first package of [`NEEDS_EBPF_TOOLCHAIN`] in `cargo tree --prefix none --format {p}`
/// output (one `name vX.Y.Z (path)` per line).
fn ebpf_toolchain_dependency(tree: &str) -> Option<&str> {
    tree.lines()
        .filter_map(|line| line.split_whitespace().next())
        .find(|name| NEEDS_EBPF_TOOLCHAIN.contains(name))
}

#[cfg(test)]
mod stable_tests {
    use super::ebpf_toolchain_dependency;

    #[test]
    fn a_dependency_on_the_agent_or_the_ebpf_build_is_found() {
        let clean = "draingate-gate v0.1.0 (/w/gate)\ndraingate-proto v0.1.0 (/w/proto)\n\
                     tonic v0.14.9\n";
        assert_eq!(ebpf_toolchain_dependency(clean), None);
        let through_agent = format!("{clean}draingate v0.1.0 (/w/agent)\naya-build v0.2.0\n");
        assert_eq!(ebpf_toolchain_dependency(&through_agent), Some("draingate"));
        // A name that only starts like one is not it.
        assert_eq!(ebpf_toolchain_dependency("draingate-serve v0.1.0\n"), None);
    }
}
