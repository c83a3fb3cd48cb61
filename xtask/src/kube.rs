//! `cargo xtask kube`: a real Kubernetes control plane for the tests: `kube-apiserver` and
//! `kube-controller-manager` v1.20.2, built from Debian bookworm's `kubernetes` source package
//! (upstream v1.20.2 with its full `vendor/`) with Debian's own Go, and Debian's `etcd`.
//!
//! No Kubernetes release can be downloaded on the machines this runs on and no Go module proxy
//! is reachable, so the source comes through the host's Debian mirror: `apt-get source` with a
//! private apt configuration whose only sources are `deb-src` lines (the host's apt sources stay
//! as they are), unpacked with `dpkg-source -x`. Go builds it in GOPATH mode from `vendor/`
//! (`-mod=vendor` fails on that tree), after generating the API definitions the tarball does
//! not ship. Everything lives under `~/.cache/draingate/kube/v1.20.2` (or `$XDG_CACHE_HOME`); the
//! binaries are renamed into `bin/` only once built, so an interrupted build never looks done.
//! A second run finds them and returns at once; `tests/src/kube_cluster.rs` starts them.

use std::{
    collections::BTreeSet,
    env,
    ffi::OsStr,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{
    command::{run_checked, stdout},
    setup,
};

/// The upstream release the binaries are built as (what `/version` reports).
const KUBE_VERSION: &str = "v1.20.2";
/// Its minor version, for the version ldflags.
const KUBE_MINOR: &str = "20";
/// Debian bookworm's source package of Kubernetes and the version holding upstream v1.20.2.
const SOURCE_PACKAGE: &str = "kubernetes";
const SOURCE_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
/// The suites of the host's mirror that carry [`SOURCE_VERSION`].
const SOURCE_SUITES: [&str; 2] = ["bookworm", "bookworm-updates"];
/// The two binaries built, each from `k8s.io/kubernetes/cmd/<name>`.
const BINARIES: [&str; 2] = ["kube-apiserver", "kube-controller-manager"];
/// The Debian package of the etcd the API server stores its objects in, with the file it
/// installs.
const ETCD_PACKAGE: (&str, &str) = ("etcd-server", "/usr/bin/etcd");
/// Debian's reflect2 1.0.2: the vendored 1.0.1 iterates maps through a runtime function whose
/// signature Go 1.18 changed, so an API server built with Go 1.19 segfaults the first time it
/// encodes a map through json-iterator (a mutating webhook's patch audit annotation does:
/// json-iterator/go#612). 1.0.2 is the same API with the fix; the build uses Debian's copy.
const REFLECT2: (&str, &str) = (
    "golang-github-modern-go-reflect2-dev",
    "/usr/share/gocode/src/github.com/modern-go/reflect2",
);
/// Debian packages, with a file each installs: Go to build, `dpkg-source` to unpack the source,
/// reflect2 1.0.2, and etcd.
const BUILD_PACKAGES: [(&str, &str); 4] = [
    ("golang-go", "/usr/lib/go/bin/go"),
    ("dpkg-dev", "/usr/bin/dpkg-source"),
    REFLECT2,
    ETCD_PACKAGE,
];
/// What a finished build writes into `bin/BUILD`: a cache built otherwise (before reflect2 was
/// replaced) is built again.
const BUILD_STAMP: &str = "v1.20.2 reflect2-1.0.2";
/// Debian's Go (1.19 in bookworm), by its own path: another `go` on `PATH` may be a newer one
/// that refuses GOPATH mode's assumptions.
const GO: &str = "/usr/lib/go/bin/go";
/// The Go import path the source tree is built as.
const IMPORT_PATH: &str = "k8s.io/kubernetes";

/// The directory holding `kube-apiserver` and `kube-controller-manager` v1.20.2, built when
/// missing (minutes, once), and with `etcd` installed. Cached: returns within a fraction of a
/// second when both binaries are there and report the right version.
pub(crate) fn ensure() -> anyhow::Result<PathBuf> {
    let started = Instant::now();
    let root = cache_dir()?;
    let bin = root.join("bin");
    if let Some(why_not) = cached_binaries_mismatch(&bin) {
        println!("kube: building the control plane {KUBE_VERSION}: {why_not}");
        install_packages(&BUILD_PACKAGES)?;
        build(&root, &bin)?;
        if let Some(still) = cached_binaries_mismatch(&bin) {
            bail!("kube: the binaries were built but are still not usable: {still}");
        }
        println!(
            "kube: control plane {KUBE_VERSION} built in {:.0}s into {}",
            started.elapsed().as_secs_f64(),
            bin.display()
        );
    } else {
        // etcd comes from a package, not from the cache: it may have been removed since.
        install_packages(&[ETCD_PACKAGE])?;
        println!(
            "kube: kube-apiserver and kube-controller-manager {KUBE_VERSION} cached in {} \
             ({:.2}s)",
            bin.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(bin)
}

/// `$XDG_CACHE_HOME/draingate/kube/v1.20.2`, or `~/.cache/draingate/kube/v1.20.2`: beside
/// `vm-test`'s kernels in `~/.cache/draingate/kernels`. The tests look in the same place
/// (`tests/src/kube_cluster.rs`) when `$DRAINGATE_KUBE_BIN` is not set.
fn cache_dir() -> anyhow::Result<PathBuf> {
    let cache = match env::var_os("XDG_CACHE_HOME").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?)
                .join(".cache")
        }
    };
    let dir = cache.join("draingate/kube").join(KUBE_VERSION);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Go and apt get absolute paths.
    dir.canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))
}

/// Why the binaries in `bin` cannot be used as they are, or `None` when they can.
fn cached_binaries_mismatch(bin: &Path) -> Option<String> {
    if let Some(missing) = BINARIES.iter().find(|name| !bin.join(name).is_file()) {
        return Some(format!("{missing} is not in {}", bin.display()));
    }
    let stamp = fs::read_to_string(bin.join("BUILD")).unwrap_or_default();
    if stamp.trim() != BUILD_STAMP {
        return Some(format!(
            "{} says {:?}, not {BUILD_STAMP:?}",
            bin.join("BUILD").display(),
            stamp.trim()
        ));
    }
    let apiserver = bin.join(BINARIES[0]);
    match stdout(Command::new(&apiserver).arg("--version")) {
        // "Kubernetes v1.20.2"
        Ok(version) if version.split_whitespace().any(|word| word == KUBE_VERSION) => None,
        Ok(version) => Some(format!(
            "{} --version says {:?}, not {KUBE_VERSION}",
            apiserver.display(),
            version.trim()
        )),
        Err(err) => Some(format!("{} does not run: {err:#}", apiserver.display())),
    }
}

/// Installs those of `packages` whose file is missing.
fn install_packages(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    setup::apt_install(&missing, "the Kubernetes control plane")
}

/// Fetches and unpacks the source when needed, generates the `OpenAPI` definitions, builds both
/// binaries and moves them into `bin`.
fn build(root: &Path, bin: &Path) -> anyhow::Result<()> {
    let work = root.join("work");
    let source = source_tree(root, &work)?;
    replace_reflect2(&source)?;
    let gopath = work.join("gopath");
    let link_dir = gopath.join("src/k8s.io");
    fs::create_dir_all(&link_dir).with_context(|| format!("creating {}", link_dir.display()))?;
    let link = link_dir.join("kubernetes");
    if fs::read_link(&link).ok().as_deref() != Some(source.as_path()) {
        remove_if_present(&link)?;
        std::os::unix::fs::symlink(&source, &link)
            .with_context(|| format!("linking {} to {}", link.display(), source.display()))?;
    }
    let go = GoBuild {
        gopath,
        cache: work.join("gocache"),
        package_dir: link,
    };

    let started = Instant::now();
    println!("kube: generating the OpenAPI definitions (about 20 seconds cold)...");
    generate_openapi(&go, &work)?;
    println!(
        "kube: OpenAPI definitions generated in {:.0}s",
        started.elapsed().as_secs_f64()
    );

    let out = work.join("out");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    fs::create_dir_all(bin).with_context(|| format!("creating {}", bin.display()))?;
    for (name, estimate) in BINARIES.into_iter().zip(["4 minutes", "1 minute"]) {
        let started = Instant::now();
        println!("kube: building {name} (about {estimate} cold)...");
        let built = out.join(name);
        remove_if_present(&built)?;
        run_checked(
            go.command()
                .args(["build", "-ldflags", &version_ldflags(), "-o"])
                .arg(&built)
                .arg(format!("{IMPORT_PATH}/cmd/{name}")),
        )
        .with_context(|| format!("building {name} failed; Go's output is above"))?;
        println!(
            "kube: {name} built in {:.0}s",
            started.elapsed().as_secs_f64()
        );
    }
    // Only now, and each by a rename on the same file system: a bin/ with both binaries is a
    // finished build.
    for name in BINARIES {
        fs::rename(out.join(name), bin.join(name))
            .with_context(|| format!("moving {name} into {}", bin.display()))?;
    }
    fs::write(bin.join("BUILD"), format!("{BUILD_STAMP}\n"))
        .with_context(|| format!("writing {}", bin.join("BUILD").display()))?;
    Ok(())
}

/// Puts Debian's reflect2 1.0.2 ([`REFLECT2`]) in place of the vendored 1.0.1, once.
fn replace_reflect2(source: &Path) -> anyhow::Result<()> {
    let vendored = source.join("vendor/github.com/modern-go/reflect2");
    let debian = Path::new(REFLECT2.1);
    if vendored.join("go_above_118.go").is_file() {
        return Ok(());
    }
    println!("kube: replacing the vendored reflect2 1.0.1 with Debian's 1.0.2 (Go 1.18+ maps)");
    remove_if_present(&vendored)?;
    fs::create_dir_all(&vendored).with_context(|| format!("creating {}", vendored.display()))?;
    for entry in fs::read_dir(debian).with_context(|| format!("reading {}", debian.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        // Sources only: the module file would make Go treat the directory as a module.
        if Path::new(&name)
            .extension()
            .is_some_and(|e| e == "go" || e == "s")
        {
            fs::copy(entry.path(), vendored.join(&name))
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// `go` in GOPATH mode, from the vendored tree only, at the lowest priority.
struct GoBuild {
    gopath: PathBuf,
    cache: PathBuf,
    /// `$GOPATH/src/k8s.io/kubernetes`: where Go sees the source tree (a symlink to it).
    package_dir: PathBuf,
}

impl GoBuild {
    /// `nice -n 19 go` in the package directory, with the environment of a GOPATH build that
    /// never reaches for the network.
    fn command(&self) -> Command {
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "19", GO]);
        self.in_package_dir(&mut cmd)
            .env("GOCACHE", &self.cache)
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("CGO_ENABLED", "0");
        cmd
    }

    /// Runs `cmd` in the package directory as GOPATH mode sees it: through the symlink, also
    /// in `$PWD`, which Go's `os.Getwd` prefers to the resolved path (the source tree outside
    /// the GOPATH, where no import path resolves).
    fn in_package_dir<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.current_dir(&self.package_dir)
            .env("PWD", &self.package_dir)
            .env("GOPATH", &self.gopath)
            .env("GO111MODULE", "off")
    }
}

/// `-X` flags that stamp the version where the binaries read it: the vendored packages' paths,
/// since in GOPATH mode `k8s.io/component-base` is `k8s.io/kubernetes/vendor/k8s.io/...`
/// (with the plain paths `/version` says v0.0.0-master). `-s -w`: no symbols, no DWARF.
fn version_ldflags() -> String {
    let mut flags = vec!["-s".to_owned(), "-w".to_owned()];
    for package in ["component-base/version", "client-go/pkg/version"] {
        for (var, value) in [
            ("gitVersion", KUBE_VERSION),
            ("gitMajor", "1"),
            ("gitMinor", KUBE_MINOR),
            ("gitTreeState", "clean"),
        ] {
            flags.push("-X".to_owned());
            flags.push(format!(
                "{IMPORT_PATH}/vendor/k8s.io/{package}.{var}={value}"
            ));
        }
    }
    flags.join(" ")
}

/// The unpacked source tree (`work/src`): fetched with `apt-get source` and unpacked with
/// `dpkg-source -x` when missing. Unpacked beside it and renamed, so a present `src` is whole.
fn source_tree(root: &Path, work: &Path) -> anyhow::Result<PathBuf> {
    let source = work.join("src");
    if source.join("cmd/kube-apiserver").is_dir() && source.join("vendor").is_dir() {
        println!("kube: source tree present in {}", source.display());
        return Ok(source);
    }
    let apt = SourceApt::new(&root.join("apt"))?;
    let download = work.join("download");
    fs::create_dir_all(&download).with_context(|| format!("creating {}", download.display()))?;
    let dsc = download.join(format!(
        "{SOURCE_PACKAGE}_{}.dsc",
        SOURCE_VERSION
            .split_once(':')
            .map_or(SOURCE_VERSION, |(_, v)| v)
    ));
    if !dsc.is_file() {
        println!(
            "kube: fetching Debian's source package {SOURCE_PACKAGE} {SOURCE_VERSION} (34 MB) \
             with a private apt configuration"
        );
        apt.update()?;
        run_checked(
            apt.command("apt-get")
                .args(["source", "--download-only", "-q"])
                .arg(format!("{SOURCE_PACKAGE}={SOURCE_VERSION}"))
                .current_dir(&download),
        )
        .context("apt-get source failed; its output is above")?;
    }
    let unpacking = work.join("src.unpacking");
    remove_if_present(&unpacking)?;
    println!("kube: unpacking {}", dsc.display());
    run_checked(
        Command::new("dpkg-source")
            .args(["-x", "--no-check"])
            .arg(&dsc)
            .arg(&unpacking),
    )
    .context("dpkg-source -x failed; its output is above")?;
    remove_if_present(&source)?;
    fs::rename(&unpacking, &source)
        .with_context(|| format!("moving {} to {}", unpacking.display(), source.display()))?;
    Ok(source)
}

/// Removes a file, symlink or directory tree at `path`, if there is one.
fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    let result = match fs::symlink_metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => Err(err),
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    result.with_context(|| format!("removing {}", path.display()))
}

/// apt with `deb-src` lines of the host's own mirror as its only sources, and lists and cache of
/// its own under `dir`: the host's apt configuration stays as it is.
struct SourceApt {
    config: PathBuf,
}

impl SourceApt {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        let lists = dir.join("lists");
        for sub in [
            lists.join("partial"),
            dir.join("cache/archives/partial"),
            dir.join("preferences.d"),
        ] {
            fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
        }
        let (mirror, _) = crate::vm::host_mirrors();
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let mut sources = String::from("# Written by cargo xtask kube (xtask/src/kube.rs).\n");
        for suite in SOURCE_SUITES {
            writeln!(
                sources,
                "deb-src [signed-by={keyring}] {mirror} {suite} main"
            )?;
        }
        let sources_list = dir.join("sources.list");
        fs::write(&sources_list, sources)
            .with_context(|| format!("writing {}", sources_list.display()))?;
        let config = dir.join("apt.conf");
        let conf = format!(
            "// Written by cargo xtask kube: the host's apt sources stay as they are.\n\
             Dir::Etc::SourceList \"{sources}\";\n\
             Dir::Etc::SourceParts \"/dev/null\";\n\
             Dir::Etc::Preferences \"{dir}/preferences\";\n\
             Dir::Etc::PreferencesParts \"{dir}/preferences.d\";\n\
             Dir::State::Lists \"{lists}\";\n\
             Dir::Cache \"{dir}/cache\";\n\
             // The cache is the caller's: downloading as _apt could not write there.\n\
             APT::Sandbox::User \"root\";\n",
            sources = sources_list.display(),
            dir = dir.display(),
            lists = lists.display(),
        );
        fs::write(&config, conf).with_context(|| format!("writing {}", config.display()))?;
        Ok(Self { config })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", &self.config)
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    fn update(&self) -> anyhow::Result<()> {
        run_checked(self.command("apt-get").args(["update", "-q"]))
            .context("apt-get update with the private deb-src sources failed")
    }
}

/// Generates `pkg/generated/openapi/zz_generated.openapi.go`, which the source tarball lacks
/// (upstream's `make` generates it): `openapi-gen` built from `vendor/`, over every package
/// marked `+k8s:openapi-gen=` in `pkg`, `cmd`, `plugin` and `vendor/k8s.io`, as
/// `Makefile.generated_files` does for the main API server.
fn generate_openapi(go: &GoBuild, work: &Path) -> anyhow::Result<()> {
    let generator = work.join("openapi-gen");
    run_checked(
        go.command()
            .args(["build", "-o"])
            .arg(&generator)
            .arg(format!(
                "{IMPORT_PATH}/vendor/k8s.io/kube-openapi/cmd/openapi-gen"
            )),
    )
    .context("building openapi-gen failed; Go's output is above")?;

    let tree = &go.package_dir;
    let mut dirs = BTreeSet::new();
    for top in ["pkg", "cmd", "plugin"] {
        marked_packages(tree, Path::new(top), false, &mut dirs)?;
    }
    // vendor/k8s.io/* are symlinks into staging/: followed there.
    let vendor = Path::new("vendor/k8s.io");
    for entry in fs::read_dir(tree.join(vendor))
        .with_context(|| format!("reading {}", tree.join(vendor).display()))?
    {
        let name = entry?.file_name();
        if name == OsStr::new("code-generator") || name == OsStr::new("sample-apiserver") {
            continue;
        }
        marked_packages(tree, &vendor.join(name), true, &mut dirs)?;
    }
    if dirs.is_empty() {
        bail!(
            "no package in {} is marked +k8s:openapi-gen; is it a Kubernetes source tree?",
            tree.display()
        );
    }
    let inputs: Vec<String> = dirs
        .iter()
        .map(|dir| format!("{IMPORT_PATH}/{dir}"))
        .collect();
    println!("kube: openapi-gen over {} packages", inputs.len());
    let mut gen_cmd = Command::new("nice");
    gen_cmd
        .args(["-n", "19"])
        .arg(&generator)
        .args(["--logtostderr", "-i"])
        .arg(inputs.join(","))
        .args([
            "-p",
            &format!("{IMPORT_PATH}/pkg/generated/openapi"),
            "-O",
            "zz_generated.openapi",
            "-h",
            "vendor/k8s.io/code-generator/hack/boilerplate.go.txt",
            "-r",
        ])
        .arg(work.join("openapi-violations.report"));
    run_checked(go.in_package_dir(&mut gen_cmd))
        .context("openapi-gen failed; its output is above")?;
    let generated = tree.join("pkg/generated/openapi/zz_generated.openapi.go");
    if !generated.is_file() {
        bail!("openapi-gen ran but wrote no {}", generated.display());
    }
    Ok(())
}

/// Adds to `dirs` each directory under `tree/dir` (relative to `tree`) holding a `.go` file with
/// a `// +k8s:openapi-gen=` line. Symlinks are followed only when `follow` is set.
fn marked_packages(
    tree: &Path,
    dir: &Path,
    follow: bool,
    dirs: &mut BTreeSet<String>,
) -> anyhow::Result<()> {
    let full = tree.join(dir);
    let entries = match fs::read_dir(&full) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("reading {}", full.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", full.display()))?;
        let path = entry.path();
        let meta = if follow {
            fs::metadata(&path)
        } else {
            fs::symlink_metadata(&path)
        };
        // A dangling symlink is skipped, as `find -L -type f` skips it.
        let Ok(meta) = meta else { continue };
        let relative = dir.join(entry.file_name());
        if meta.is_dir() {
            marked_packages(tree, &relative, follow, dirs)?;
        } else if meta.is_file()
            && path.extension() == Some(OsStr::new("go"))
            && has_openapi_marker(&path)?
        {
            dirs.insert(dir.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// Whether a line of the file starts with `//`, spaces and `+k8s:openapi-gen=`.
fn has_openapi_marker(path: &Path) -> anyhow::Result<bool> {
    let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    for line in BufReader::new(file).split(b'\n') {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if let Some(rest) = line.strip_prefix(b"//")
            && rest
                .iter()
                .position(|byte| *byte != b' ')
                .is_some_and(|start| rest[start..].starts_with(b"+k8s:openapi-gen="))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `cargo xtask kube`: builds (or finds) the control plane and prints its directory.
pub(crate) fn run() -> anyhow::Result<()> {
    let bin = ensure()?;
    println!("{}", bin.display());
    Ok(())
}
