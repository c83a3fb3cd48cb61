//! `cargo xtask image`: draingate's OCI image, written as an OCI image layout by this step (no
//! Dockerfile, no base image, no builder). One image for every role: the `draingate` binary is
//! the agent, the gate and the CLI.
//!
//! One layer holds the binary and exactly the shared libraries it loads (as `ldd` resolves
//! them), with their loader, at the paths the binary looks for them; nothing else: no shell, no
//! package manager, no `/etc`. It runs as uid 65532 by default; the agent's DaemonSet runs it as
//! uid 0 with three capabilities (`deploy/base/agent.yaml`), which a label repeats.
//!
//! Reproducible: the same binary and libraries at the same commit give the same bytes, so the
//! same digest. Entries are sorted, owned by 0:0, with fixed modes and one mtime (the commit's
//! time, or `SOURCE_DATE_EPOCH`); the gzip header has no time or name; the config's `created`
//! is that same time.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::command::{cargo, run_checked, stdout, workspace_root};

/// Where the binary is in the image (the image's entrypoint).
const BINARY_PATH: &str = "usr/local/bin/draingate";
/// The default user: not root (65532, "nonroot" in distroless images). The gate and the CLI need
/// nothing more; the agent's DaemonSet sets uid 0 and its capabilities.
const USER: &str = "65532:65532";
/// The name podman gives the debug image that `cargo xtask test` builds and the kernel tests run
/// (tests/tests/image.rs says the same).
pub(crate) const DEBUG_TAG: &str = "localhost/draingate:debug";
/// What the agent needs beyond the default user, as a label (the reasons are in
/// deploy/base/agent.yaml).
const AGENT_NEEDS: &str = "uid 0; capabilities BPF, PERFMON, NET_ADMIN (all others dropped); \
                           seccomp RuntimeDefault (or deploy/seccomp/draingate-agent.json); \
                           host network; /sys/kernel/tracing (read-only), \
                           /sys/fs/bpf/draingate and /run/draingate from the host; see \
                           deploy/base/agent.yaml";
/// gzip level of the layer: the default, a fixed input of the digest.
const GZIP_LEVEL: u32 = 6;

/// Which build goes into the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Profile {
    /// `cargo build --release --package draingate`: the image users run.
    Release,
    /// The debug binary the kernel tests run (`cargo build --workspace --bins`), its debug
    /// information stripped: what `cargo xtask test` puts under podman, so that the test needs
    /// no second (release) build of the workspace.
    Debug,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Debug => "debug",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Options {
    pub(crate) profile: Profile,
    /// The name podman gives the image (default: `localhost/draingate:<version>`, or
    /// [`DEBUG_TAG`] for the debug build).
    pub(crate) tag: Option<String>,
    /// Load it into podman (else only the layout and its archive are written).
    pub(crate) load: bool,
}

/// `cargo xtask image`, after setup: build, write the layout, load it into podman, say what it
/// is.
pub(crate) fn run(options: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let binary = build_binary(options.profile)?;
    let tag = options
        .tag
        .clone()
        .unwrap_or_else(|| match options.profile {
            Profile::Release => format!("localhost/draingate:{}", env!("CARGO_PKG_VERSION")),
            Profile::Debug => DEBUG_TAG.to_owned(),
        });
    let target = binary
        .parent()
        .and_then(Path::parent)
        .context("the binary is not in a target directory")?;
    let out = target.join("image");
    let source = source_info()?;
    let image = write_image(&binary, options.profile, &source, &tag, &out)?;
    println!(
        "image: draingate {} ({} build of {}{})",
        env!("CARGO_PKG_VERSION"),
        options.profile.name(),
        &source.revision[..12.min(source.revision.len())],
        if source.dirty {
            ", with uncommitted changes"
        } else {
            ""
        }
    );
    println!(
        "  digest  {} (the manifest's: what a registry serves and `digest:` pins)",
        image.manifest_digest
    );
    println!(
        "  size    {} compressed (one layer), {} unpacked: the binary {}, libraries {} ({})",
        mib(image.compressed_size),
        mib(image.unpacked_size),
        mib(image.binary_size),
        mib(image.unpacked_size - image.binary_size),
        image.libraries.join(", ")
    );
    println!("  layout  {}", image.layout.display());
    println!("  archive {}", image.archive.display());
    if options.load {
        load(&image, &tag)?;
        println!(
            "  podman  {tag} (image ID {})",
            image.config_digest.trim_start_matches("sha256:")
        );
    }
    println!("image: done in {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn mib(bytes: u64) -> String {
    #[expect(
        clippy::cast_precision_loss,
        reason = "sizes of tens of MB are exact in f64"
    )]
    let mib = bytes as f64 / (1024.0 * 1024.0);
    format!("{mib:.1} MiB")
}

/// Builds the binary and returns its path, from cargo's own report of what it built.
fn build_binary(profile: Profile) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo(None);
    cmd.args(["build", "--locked"]);
    match profile {
        Profile::Release => cmd.args(["--release", "--package", "draingate", "--bin", "draingate"]),
        // Exactly `cargo xtask test`'s build (the same packages, so the same features): this
        // finds that build's binary instead of making another.
        Profile::Debug => cmd.args(crate::command::TEST_BINARIES),
    };
    cmd.arg("--message-format=json-render-diagnostics");
    println!("image: building draingate ({})", profile.name());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start cargo build")?;
    let mut executable = None;
    let reader = BufReader::new(child.stdout.take().context("cargo build's stdout")?);
    for line in reader.lines() {
        let line = line.context("reading cargo build's messages")?;
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact"
            && message["target"]["name"] == "draingate"
            && let Some(path) = message["executable"].as_str()
        {
            executable = Some(PathBuf::from(path));
        }
    }
    let status = child.wait().context("waiting for cargo build")?;
    if !status.success() {
        bail!("cargo build failed ({status}); its output is above");
    }
    executable.context("cargo build did not report the draingate binary")
}

/// What the labels say about the source, and the time every entry and `created` carry.
#[derive(Debug, Clone)]
pub(crate) struct SourceInfo {
    pub(crate) revision: String,
    pub(crate) dirty: bool,
    /// Seconds since the epoch: `SOURCE_DATE_EPOCH`, else the commit's time.
    pub(crate) epoch: u64,
}

fn source_info() -> anyhow::Result<SourceInfo> {
    let root = workspace_root();
    let git = |args: &[&str]| {
        stdout(Command::new("git").arg("-C").arg(&root).args(args))
            .map(|out| out.trim().to_owned())
            .context(
                "the image's labels name its commit: run `cargo xtask image` in a git clone of \
                 draingate, with git installed",
            )
    };
    let revision = git(&["rev-parse", "HEAD"])?;
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty();
    let epoch = if let Ok(value) = std::env::var("SOURCE_DATE_EPOCH") {
        value.trim().parse().with_context(|| {
            format!("SOURCE_DATE_EPOCH must be seconds since 1970, not {value:?}")
        })?
    } else {
        let time = git(&["log", "-1", "--format=%ct", "HEAD"])?;
        time.parse()
            .with_context(|| format!("git gave {time:?} as the commit's time"))?
    };
    if dirty {
        println!(
            "image: warning: the tree has uncommitted changes; the revision label names HEAD \
             ({revision}), which is not all of what is built"
        );
    }
    Ok(SourceInfo {
        revision,
        dirty,
        epoch,
    })
}

/// A file of the layer: where it goes, its bytes and its mode.
#[derive(Debug)]
pub(crate) struct LayerFile {
    /// Relative to `/`, without a leading slash.
    pub(crate) path: String,
    pub(crate) data: Vec<u8>,
    pub(crate) mode: u32,
}

/// What was written.
#[derive(Debug)]
pub(crate) struct Image {
    pub(crate) manifest_digest: String,
    pub(crate) config_digest: String,
    pub(crate) compressed_size: u64,
    pub(crate) unpacked_size: u64,
    pub(crate) binary_size: u64,
    pub(crate) libraries: Vec<String>,
    pub(crate) layout: PathBuf,
    pub(crate) archive: PathBuf,
}

fn write_image(
    binary: &Path,
    profile: Profile,
    source: &SourceInfo,
    tag: &str,
    out: &Path,
) -> anyhow::Result<Image> {
    let built = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let binary_sha256 = hex(&Sha256::digest(&built));
    let program = match profile {
        Profile::Release => built,
        // Debug information is 3/4 of a debug binary (296 MB of which 71 MB is code and
        // symbols); the image needs none of it.
        Profile::Debug => strip_debug(binary, out)?,
    };
    let mut files = vec![LayerFile {
        path: BINARY_PATH.to_owned(),
        data: program,
        mode: 0o755,
    }];
    let libraries = shared_libraries(binary)?;
    let mut names = Vec::new();
    for library in &libraries {
        let data = fs::read(&library.path)
            .with_context(|| format!("reading {}", library.path.display()))?;
        let path = library.path.to_string_lossy();
        files.push(LayerFile {
            path: path.trim_start_matches('/').to_owned(),
            data,
            mode: if library.loader { 0o755 } else { 0o644 },
        });
        names.push(
            library
                .path
                .file_name()
                .map_or_else(|| path.to_string(), |n| n.to_string_lossy().into_owned()),
        );
    }
    let binary_size = files[0].data.len() as u64;
    let unpacked_size = files.iter().map(|f| f.data.len() as u64).sum();

    let labels = labels(source, profile, &binary_sha256);
    let layout = out.join(format!("draingate-{}", profile.name()));
    let ref_name = tag.rsplit_once(':').map_or("latest", |(_, t)| t);
    let written = write_layout(&layout, &files, source.epoch, &labels, ref_name)?;
    let archive = out.join(format!("draingate-{}.oci.tar", profile.name()));
    write_archive(&layout, &archive, source.epoch)?;
    Ok(Image {
        manifest_digest: written.manifest_digest,
        config_digest: written.config_digest,
        compressed_size: written.layer_size,
        unpacked_size,
        binary_size,
        libraries: names,
        layout,
        archive,
    })
}

fn labels(source: &SourceInfo, profile: Profile, binary_sha256: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut label = |key: &str, value: &str| labels.insert(key.to_owned(), value.to_owned());
    label("org.opencontainers.image.title", "draingate");
    label(
        "org.opencontainers.image.description",
        "draingate: proves that a rolling update lost no request (agent, gate and CLI; \
         entrypoint /usr/local/bin/draingate)",
    );
    label(
        "org.opencontainers.image.version",
        env!("CARGO_PKG_VERSION"),
    );
    label(
        "org.opencontainers.image.source",
        env!("CARGO_PKG_REPOSITORY"),
    );
    label("org.opencontainers.image.revision", &source.revision);
    label(
        "org.opencontainers.image.licenses",
        env!("CARGO_PKG_LICENSE"),
    );
    label("org.opencontainers.image.created", &rfc3339(source.epoch));
    label("io.github.draingate.agent-needs", AGENT_NEEDS);
    label("io.github.draingate.build", profile.name());
    // The sha256 of the binary cargo built (before any strip): the tests check that the image
    // holds the binary they test.
    label("io.github.draingate.binary-sha256", binary_sha256);
    labels
}

fn rfc3339(epoch: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(epoch))
        .to_string()
}

/// The debug binary without its debug sections (`objcopy --strip-debug`, binutils, which the
/// build's C compiler comes with).
fn strip_debug(binary: &Path, out: &Path) -> anyhow::Result<Vec<u8>> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let stripped = out.join("draingate-debug.stripped");
    run_checked(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(binary)
            .arg(&stripped),
    )
    .context("stripping the debug binary's debug information needs objcopy (Debian: binutils)")?;
    let data = fs::read(&stripped).with_context(|| format!("reading {}", stripped.display()))?;
    fs::remove_file(&stripped).with_context(|| format!("removing {}", stripped.display()))?;
    Ok(data)
}

/// A shared library the binary loads, where the loader finds it on this machine.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Library {
    pub(crate) path: PathBuf,
    /// The program interpreter (`ld-linux`), which loads the others.
    pub(crate) loader: bool,
}

/// Every shared library `binary` loads, from `ldd` (the loader's own resolution).
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<Library>> {
    let out = Command::new("ldd")
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ldd (Debian: libc-bin) to list the binary's shared libraries")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: ldd says so and fails; it needs no library.
        if String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!(
            "`ldd {}` failed ({}): {}{}",
            binary.display(),
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_ldd(&text)
}

/// Parses `ldd`'s lines: `name => /path (0x…)`, `/path/to/ld.so (0x…)` for the loader, and the
/// vDSO (`linux-vdso.so.1 (0x…)`, in the kernel, no file).
pub(crate) fn parse_ldd(text: &str) -> anyhow::Result<Vec<Library>> {
    let mut libraries = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") {
            continue;
        }
        let (path, loader) = if let Some((name, rest)) = line.split_once(" => ") {
            let path = rest.split(" (").next().unwrap_or_default().trim();
            if path == "not found" || !path.starts_with('/') {
                bail!("the binary needs {name}, which the loader does not find: {line}");
            }
            (path, false)
        } else {
            let path = line.split(" (").next().unwrap_or_default().trim();
            if !path.starts_with('/') {
                // The vDSO.
                continue;
            }
            (path, true)
        };
        libraries.push(Library {
            path: PathBuf::from(path),
            loader,
        });
    }
    Ok(libraries)
}

/// The digests of a written layout.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Written {
    pub(crate) manifest_digest: String,
    pub(crate) config_digest: String,
    pub(crate) layer_size: u64,
}

/// Writes an OCI image layout at `dir` (replacing what was there): `oci-layout`, `index.json`
/// and the blobs (layer, config, manifest) of one image whose one layer holds `files`.
pub(crate) fn write_layout(
    dir: &Path,
    files: &[LayerFile],
    epoch: u64,
    labels: &BTreeMap<String, String>,
    ref_name: &str,
) -> anyhow::Result<Written> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let write_blob = |data: &[u8]| -> anyhow::Result<String> {
        let digest = hex(&Sha256::digest(data));
        let path = blobs.join(&digest);
        fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
        Ok(format!("sha256:{digest}"))
    };

    let tar = layer_tar(files, epoch)?;
    let diff_id = format!("sha256:{}", hex(&Sha256::digest(&tar)));
    let mut gzip = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::new(GZIP_LEVEL));
    gzip.write_all(&tar).context("compressing the layer")?;
    let layer = gzip.finish().context("compressing the layer")?;
    let layer_digest = write_blob(&layer)?;

    let created = rfc3339(epoch);
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = json!({
        "created": created,
        "architecture": architecture,
        "os": "linux",
        "config": {
            "User": USER,
            "Entrypoint": [format!("/{BINARY_PATH}")],
            "Cmd": ["--help"],
            "Env": ["PATH=/usr/local/bin"],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "cargo xtask image"}],
    });
    let config = serde_json::to_vec(&config).context("encoding the image config")?;
    let config_digest = write_blob(&config)?;

    let mut annotations = serde_json::Map::new();
    for key in [
        "org.opencontainers.image.version",
        "org.opencontainers.image.source",
        "org.opencontainers.image.revision",
        "org.opencontainers.image.created",
    ] {
        if let Some(value) = labels.get(key) {
            annotations.insert(key.to_owned(), json!(value));
        }
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer.len(),
        }],
        "annotations": annotations,
    });
    let manifest = serde_json::to_vec(&manifest).context("encoding the image manifest")?;
    let manifest_digest = write_blob(&manifest)?;

    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": architecture, "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": ref_name},
        }],
    });
    let write = |name: &str, value: &Value| -> anyhow::Result<()> {
        let path = dir.join(name);
        fs::write(&path, serde_json::to_vec(value)?)
            .with_context(|| format!("writing {}", path.display()))
    };
    write("index.json", &index)?;
    write("oci-layout", &json!({"imageLayoutVersion": "1.0.0"}))?;
    Ok(Written {
        manifest_digest,
        config_digest,
        layer_size: layer.len() as u64,
    })
}

/// The layer: `files` and every directory above them, sorted by path, owned by 0:0, all with
/// `mtime`; directories 0755.
pub(crate) fn layer_tar(files: &[LayerFile], mtime: u64) -> anyhow::Result<Vec<u8>> {
    let mut entries: BTreeMap<String, Option<&LayerFile>> = BTreeMap::new();
    for file in files {
        if file.path.starts_with('/') || file.path.split('/').any(|p| p.is_empty() || p == "..") {
            bail!("{:?} is not a plain relative path", file.path);
        }
        let mut parent = String::new();
        let parts: Vec<&str> = file.path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            parent.push_str(part);
            parent.push('/');
            entries.entry(parent.clone()).or_insert(None);
        }
        if entries.insert(file.path.clone(), Some(file)).is_some() {
            bail!("{} is in the layer twice", file.path);
        }
    }
    let mut builder = tar::Builder::new(Vec::new());
    for (path, file) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(mtime);
        match file {
            None => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                builder
                    .append_data(&mut header, &path, std::io::empty())
                    .with_context(|| format!("adding {path} to the layer"))?;
            }
            Some(file) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(file.mode);
                header.set_size(file.data.len() as u64);
                builder
                    .append_data(&mut header, &path, file.data.as_slice())
                    .with_context(|| format!("adding {path} to the layer"))?;
            }
        }
    }
    builder.into_inner().context("finishing the layer")
}

/// The layout as one tar (`oci-archive`, what `podman load` reads), deterministic as the layer.
fn write_archive(layout: &Path, archive: &Path, mtime: u64) -> anyhow::Result<()> {
    let mut files = Vec::new();
    let mut stack = vec![layout.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let relative = path
                    .strip_prefix(layout)
                    .context("a file outside the layout")?
                    .to_string_lossy()
                    .into_owned();
                let data =
                    fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                files.push(LayerFile {
                    path: relative,
                    data,
                    mode: 0o644,
                });
            }
        }
    }
    let tar = layer_tar(&files, mtime)?;
    fs::write(archive, tar).with_context(|| format!("writing {}", archive.display()))
}

/// `podman load` of the archive, then `tag` on its image ID (the config's digest).
fn load(image: &Image, tag: &str) -> anyhow::Result<()> {
    if which::which("podman").is_err() {
        bail!(
            "podman is missing: `cargo xtask setup` installs it as root (Debian package podman); \
             or use --no-load and load {} yourself",
            image.archive.display()
        );
    }
    let id = image.config_digest.trim_start_matches("sha256:");
    let image_id = |name: &str| {
        stdout(podman().args(["image", "inspect", "--format", "{{.Id}}", name]))
            .map(|out| out.trim().to_owned())
    };
    let previous = image_id(tag).ok();
    let loaded = stdout(
        podman()
            .args(["load", "--quiet", "--input"])
            .arg(&image.archive),
    )?;
    run_checked(podman().args(["tag", id, tag]))?;
    // podman names it after the index's ref.name too (`localhost/<tag>:latest`): only `tag`
    // is meant.
    let names = loaded
        .lines()
        .filter_map(|line| line.split_once("Loaded image"))
        .filter_map(|(_, rest)| rest.split_once(": "))
        .flat_map(|(_, names)| names.split(',').map(str::trim));
    for name in names.filter(|n| !n.is_empty() && *n != tag && !n.starts_with("sha256:")) {
        run_checked(podman().args(["untag", id, name]))?;
    }
    let now = image_id(tag)?;
    if now != id {
        bail!(
            "podman's {tag} is {now} after loading image {id} ({})",
            loaded.trim()
        );
    }
    // The image the tag named before, now nameless, would stay on disk with every rebuild.
    if let Some(previous) = previous.filter(|p| p != id) {
        let _ = podman().args(["rmi", &previous]).output();
    }
    Ok(())
}

fn podman() -> Command {
    Command::new("podman")
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

#[cfg(test)]
mod tests;
