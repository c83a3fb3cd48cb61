//! Running child commands with their command line in every error.

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, bail};

/// What `cargo build` builds for the kernel tests: the `draingate` binary and the test crate's
/// binaries (test server, benchmarks). The same packages as `cargo test -p draingate-tests`
/// selects, so that features unify the same way and the tests reuse this build: with
/// `--workspace`, xtask's own dependencies (nix's `mount`, tar's and flate2's) changed shared
/// crates' features, and the kernel-test step rebuilt nix, the agent and its eBPF object.
pub(crate) const TEST_BINARIES: [&str; 5] = [
    "--package",
    "draingate",
    "--package",
    "draingate-tests",
    "--bins",
];

/// The workspace root (this crate's parent directory).
pub(crate) fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or(manifest.clone(), PathBuf::from)
}

/// Where cargo puts what it builds: `CARGO_TARGET_DIR` (relative to the workspace, as cargo
/// takes it) when set, else the workspace's `target`.
pub(crate) fn target_dir() -> PathBuf {
    let root = workspace_root();
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| root.join("target"), |dir| root.join(dir))
}

fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `cmd` with inherited output; an error names the command and its exit status.
pub(crate) fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    let line = describe(cmd);
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` capturing its output; fails with its stderr when it fails.
pub(crate) fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    let line = describe(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// The stdout of `cmd` as text.
pub(crate) fn stdout(cmd: &mut Command) -> anyhow::Result<String> {
    let output = output(cmd)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether the process runs as root.
pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `cargo` in the workspace root, with the given toolchain when not the default one.
pub(crate) fn cargo(toolchain: Option<&str>) -> Command {
    let mut cmd = Command::new("cargo");
    if let Some(toolchain) = toolchain {
        cmd.arg(format!("+{toolchain}"));
    }
    cmd.current_dir(workspace_root());
    cmd
}
