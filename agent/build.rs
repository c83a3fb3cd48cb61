//! Builds the eBPF programs (crate `draingate-ebpf`) with the nightly toolchain through aya-build:
//! each of its binaries becomes an object in `OUT_DIR`, named after it. `loader` embeds the
//! agent's (`draingate`); the benchmark loads its empty programs' (`draingate-floor`) from there.

use anyhow::{Context as _, anyhow};
use cargo_metadata::MetadataCommand;

fn main() -> anyhow::Result<()> {
    let metadata = MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "draingate-ebpf")
        .ok_or_else(|| anyhow!("package draingate-ebpf is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs failed; `cargo xtask setup` installs what they need")
}
