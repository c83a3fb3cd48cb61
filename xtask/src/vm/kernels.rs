//! The kernels `vm-test` boots: Debian's packages, fetched with a private apt configuration
//! (the host's stays as it is), extracted, never installed, and cached; older builds of a line
//! are removed.

use std::{
    env,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{KernelImage, KernelLine};
use crate::command::{output, run_checked, stdout};

/// apt with its own sources, lists and cache under the kernel cache: the suites of the three
/// kernel lines from the host's own mirror, without touching the host's apt configuration.
pub(super) struct PrivateApt {
    config: PathBuf,
    lists: PathBuf,
}

impl PrivateApt {
    pub(super) fn new(cache: &Path) -> anyhow::Result<Self> {
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

    pub(super) fn has_lists(&self) -> bool {
        fs::read_dir(&self.lists).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
    }

    pub(super) fn update(&self) -> anyhow::Result<()> {
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

pub(super) fn write_if_changed(path: &Path, text: &str) -> anyhow::Result<()> {
    if fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The newest image package of `line`, through the meta package `linux-image-amd64` (the
/// `-amd64` flavour: `-cloud-amd64` kernels have no 9p, which virtme-run shares the root over).
/// Returns the image package and its version.
pub(super) fn newest_image(
    apt: &PrivateApt,
    line: KernelLine,
) -> anyhow::Result<Option<(String, String)>> {
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
pub(super) fn prepare_kernel(
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
pub(super) fn download_and_extract(
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
pub(super) fn sbin_path() -> String {
    let path = env::var("PATH").unwrap_or_default();
    format!("{path}:/usr/sbin:/sbin")
}

/// The one `lib/modules/<release>` of an extracted kernel package.
pub(super) fn modules_release(tree: &Path) -> anyhow::Result<String> {
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
pub(super) fn remove_older_images(images: &Path, line: KernelLine, current: &Path) {
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
