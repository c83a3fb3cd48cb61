//! `cargo xtask test` and `cargo xtask lint`: the project's checks in order, failing fast, with a
//! one-line summary at the end.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{
    command::{cargo, is_root, run_checked as run_cmd, workspace_root},
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
        step("kernel tests", &mut || {
            cargo_test(&["--package", "draingate-tests"]).map(Some)
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
    let mut cmd = cargo(None);
    cmd.args(["test", "--locked"]).args(args);
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
        let mut cmd = Command::new(root.join("target/release/draingate-bench"));
        cmd.arg("--out").arg(root.join("BENCHMARKS.md")).args(args);
        run_cmd(&mut cmd)?;
    }
    // Each binary writes (or replaces) its own section of BENCHMARKS.md.
    for (part, binary) in [
        ("accuracy", "draingate-accuracy"),
        ("gate", "draingate-gate-bench"),
    ] {
        if runs(part) {
            let mut cmd = Command::new(root.join("target/release").join(binary));
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
