//! The image `cargo xtask image` builds, run by podman as the manifests run it.
//!
//! The agent runs as `deploy/overlays/seccomp` runs its DaemonSet: `deploy/base/agent.yaml`'s,
//! under draingate's own seccomp profile (`deploy/seccomp/draingate-agent.json`) in place of the
//! runtime's default. The podman flags are translated from the manifest itself, and any field
//! the translation does not know stops the test: host network, uid 0, every capability dropped
//! but the ones it adds, the Localhost seccomp profile, no privilege escalation, a read-only root
//! filesystem, the memory limit, tracefs read-only, bpffs and the socket directory from the host,
//! the TLS Secret, its args and env. It must count a pod's connections and a refusal exactly, and
//! the CLI on the host reads them through the socket. A probe under the same options shows the
//! profile refuses what it should (mount, unshare, setns, ptrace, keyctl, `AF_ALG` sockets: each
//! gets through unconfined) and lets `bpf()` and `perf_event_open()` through. Then the gate runs
//! as `deploy/base/gate.yaml`'s Deployment runs it: uid 65532, no capabilities, the runtime's
//! default seccomp profile, a read-only root. It has a network namespace of its own in place of
//! the pod network, and asks the containerised agent over mutual TLS; `gate check` from the host
//! must give the agent's verdict.
//!
//! No cluster runs here, so some parts stand in:
//! - the agent's API server is `kube_api`, with a kubeconfig mounted in place of the service
//!   account token;
//! - the node is `node-a`;
//! - the gate finds the agent by `--agents`, not the headless Service's DNS name;
//! - the agent listens on free ports, not the manifest's (the host's may be taken);
//! - the agent pins into a test directory of the host's bpffs, mounted where the DaemonSet mounts
//!   its own pin directory;
//! - the socket's host directory is a temporary one, not `/run/draingate`.
//!
//! The image is the one `cargo xtask test` builds just before the kernel tests: the debug binary
//! the other kernel tests run (stripped of its debug information), with the libraries and
//! settings of the release image.

use std::{
    collections::HashMap,
    net::{IpAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use draingate_tests::{
    Family, Link, NodeLink, PinDir, draingate_bin, free_port, http_request,
    kube_api::{self, FakeKubeApi},
    pod_json, require_root,
};
use serde::Deserialize as _;
use serde_json::{Value, json};

/// What `cargo xtask test` (step `image`, as `cargo xtask image --debug`) tags.
const IMAGE: &str = "localhost/draingate:debug";
const NODE: &str = "node-a";
/// What a seccomp profile's refusal (and a missing capability's) returns.
const EPERM: i32 = 1;

/// `podman run`'s flags for every container here: the local image only, and open-file and
/// process limits this machine's root may set. podman asks for 1048576 and 4194304, which needs
/// `CAP_SYS_RESOURCE`, and this project's machines run root without it.
const RUN: [&str; 4] = [
    "run",
    "--pull=never",
    "--ulimit=nofile=16384:16384",
    "--ulimit=nproc=16384:16384",
];

/// podman with runc, the runtime containerd (Kubernetes) uses by default. crun, podman's own,
/// refuses hybrid cgroup hierarchies such as this project's machines have.
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.arg("--runtime=runc");
    cmd
}

/// Runs `podman ARGS`; its stdout, or a panic with its stderr.
fn podman_ok(args: &[&str]) -> String {
    let output = podman()
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run podman: {err}"));
    assert!(
        output.status.success(),
        "podman {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Panics, saying how to get them, unless podman and the image are here and the image holds
/// this build's binary. Never skips.
fn require_image() -> Value {
    let version = Command::new("podman").arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|v| v.status.success()),
        "podman is missing ({version:?}): `cargo xtask setup` installs it as root (Debian \
         package podman); this test runs the image under it and does not skip"
    );
    let exists = podman()
        .args(["image", "exists", IMAGE])
        .status()
        .expect("podman image exists");
    assert!(
        exists.success(),
        "podman has no image {IMAGE}: `cargo xtask test` builds it before the kernel tests; \
         alone, `sudo -E cargo xtask image --debug`"
    );
    let inspected: Value =
        serde_json::from_str(&podman_ok(&["image", "inspect", IMAGE])).expect("inspect JSON");
    let image = inspected[0].clone();
    let sha = Command::new("sha256sum")
        .arg(draingate_bin())
        .output()
        .expect("sha256sum");
    let sha = String::from_utf8_lossy(&sha.stdout);
    let sha = sha.split_whitespace().next().expect("a digest");
    assert_eq!(
        image["Config"]["Labels"]["io.github.draingate.binary-sha256"].as_str(),
        Some(sha),
        "{IMAGE} holds another build than {}: rebuild it with `sudo -E cargo xtask image \
         --debug`",
        draingate_bin().display()
    );
    image
}

/// A container of this test, removed (killed) on drop, also when the test fails.
struct Container {
    name: String,
}

impl Container {
    fn run(role: &str, flags: &[String], args: &[String]) -> Self {
        let name = format!("draingate-test-{role}-{}", std::process::id());
        let _ = podman().args(["rm", "--force", &name]).output();
        let mut cmd = podman();
        cmd.args(RUN)
            .args(["--detach", "--name", &name])
            .arg("--log-driver=k8s-file")
            .args(flags)
            .arg(IMAGE)
            .args(args);
        let output = cmd.output().expect("podman run");
        assert!(
            output.status.success(),
            "podman run of the {role} failed ({}): {}\n{cmd:?}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Self { name }
    }

    fn logs(&self) -> String {
        podman()
            .args(["logs", &self.name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    }

    fn running(&self) -> bool {
        podman_ok(&["inspect", "--format", "{{.State.Running}}", &self.name]).trim() == "true"
    }

    /// The containerised process, as the host sees it.
    fn status(&self) -> HashMap<String, String> {
        let pid = podman_ok(&["inspect", "--format", "{{.State.Pid}}", &self.name]);
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))
            .expect("the container's process status");
        let mut fields: HashMap<String, String> = status
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect();
        // Its root filesystem's mount options.
        let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", pid.trim()))
            .expect("the container's mounts");
        let root = mountinfo
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| f.get(4) == Some(&"/"))
            .map(|f| f[5].to_owned())
            .unwrap_or_default();
        fields.insert("root mount".into(), root);
        fields
    }

    /// Waits until `GET http://addr/path` answers 200; panics with the logs if the container
    /// stops or it takes 30 s.
    fn wait_http_ok(&self, addr: &str, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_request(addr, "GET", path, "").is_ok_and(|(code, _)| code == 200) {
                return;
            }
            assert!(
                self.running(),
                "the {} container stopped:\n{}",
                self.name,
                self.logs()
            );
            assert!(
                Instant::now() < deadline,
                "{addr}{path} never answered 200; {}:\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{} logs:\n{}", self.name, self.logs());
        }
        let _ = podman()
            .args(["rm", "--force", "--time", "1", &self.name])
            .output();
    }
}

/// The first document of `kind` in `deploy/base/FILE`.
/// `arg` with each `$(NAME)` replaced by the value `--env=NAME=value` in `flags` gives it, as
/// the kubelet expands a container's args; a name with no value stays as written, as there.
fn expand_env(arg: &str, flags: &[String]) -> String {
    let mut arg = arg.to_owned();
    for (name, value) in flags
        .iter()
        .filter_map(|f| f.strip_prefix("--env=")?.split_once('='))
    {
        arg = arg.replace(&format!("$({name})"), value);
    }
    arg
}

fn manifest(file: &str, kind: &str) -> Value {
    let path = format!("{}/../deploy/base/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("a YAML document"))
        .find(|doc| doc["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {path}"))
}

/// The first document of `kind` that `kubectl kustomize deploy/DIR` prints: what a user who
/// applies that overlay gets. Fails, never skips, without kubectl.
fn kustomized(dir: &str, kind: &str) -> Value {
    let path = format!("{}/../deploy/{dir}", env!("CARGO_MANIFEST_DIR"));
    // As agent/tests/kustomize.rs: kubectl from $KUBECTL or PATH.
    let kubectl = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
    let output = Command::new(&kubectl)
        .args(["kustomize", &path])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{} kustomize {path}` ({e}): put kubectl (1.27 or newer) on PATH or \
                 name it in $KUBECTL",
                kubectl.to_string_lossy()
            )
        });
    assert!(
        output.status.success(),
        "kubectl kustomize {path}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("kubectl prints UTF-8");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("a YAML document"))
        .find(|doc| doc["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/{dir}"))
}

/// A Localhost seccomp profile's file in the repository: deploy/seccomp/ holds what node
/// provisioning installs under the kubelet's seccomp root.
fn seccomp_file(localhost_profile: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/seccomp")
        .join(localhost_profile);
    assert!(
        path.is_file(),
        "seccomp profile {localhost_profile}: no {}",
        path.display()
    );
    path
}

/// `flags` with its seccomp option set to `value` (a profile's path, or `unconfined`).
fn with_seccomp(flags: &[String], value: &str) -> Vec<String> {
    flags
        .iter()
        .map(|f| {
            if f.starts_with("--security-opt=seccomp=") {
                format!("--security-opt=seccomp={value}")
            } else {
                f.clone()
            }
        })
        .collect()
}

/// Runs `draingate-syscall-probe` in the image with `flags` (the agent's, its seccomp option
/// included): each syscall's name and its errno (0: it succeeded).
fn probe_syscalls(flags: &[String]) -> HashMap<String, i32> {
    let probe = env!("CARGO_BIN_EXE_draingate-syscall-probe");
    let output = podman()
        .args(RUN)
        .arg("--rm")
        .args(flags)
        .arg(format!("--volume={probe}:/probe:ro"))
        .args(["--entrypoint=/probe", IMAGE])
        .output()
        .expect("podman run the probe");
    assert!(
        output.status.success(),
        "the probe failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(name, errno)| (name.to_owned(), errno.parse().expect("an errno")))
        .collect()
}

fn keys(object: &Value) -> Vec<&str> {
    object
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

/// What the kubelet would make of pod spec `spec`'s first container, as `podman run` flags.
/// `volumes` gives host directories in place of volumes (every Secret, and hostPaths that must
/// not be the host's own); `network` is the pod network's `--network` for pods without
/// hostNetwork. Security fields it does not know stop the test, naming them.
fn podman_flags(
    spec: &Value,
    volumes: &HashMap<&str, PathBuf>,
    network: &str,
    node_ip: &str,
) -> Vec<String> {
    let container = &spec["containers"][0];
    let mut flags = Vec::new();
    flags.push(if spec["hostNetwork"] == true {
        "--network=host".to_owned()
    } else {
        format!("--network={network}")
    });
    if spec["hostPID"] == true {
        flags.push("--pid=host".into());
    }
    if spec["hostIPC"] == true {
        flags.push("--ipc=host".into());
    }

    let pod_security = &spec["securityContext"];
    for key in keys(pod_security) {
        assert!(
            [
                "runAsUser",
                "runAsGroup",
                "runAsNonRoot",
                "fsGroup",
                "seccompProfile"
            ]
            .contains(&key),
            "the pod's securityContext.{key}: translate it to podman here"
        );
    }
    let security = &container["securityContext"];
    for key in keys(security) {
        assert!(
            [
                "runAsUser",
                "runAsGroup",
                "runAsNonRoot",
                "allowPrivilegeEscalation",
                "readOnlyRootFilesystem",
                "capabilities",
                "seccompProfile",
                "privileged"
            ]
            .contains(&key),
            "the container's securityContext.{key}: translate it to podman here"
        );
    }
    let field = |key: &str| {
        Some(&security[key])
            .filter(|v| !v.is_null())
            .or(Some(&pod_security[key]).filter(|v| !v.is_null()))
    };
    let uid = field("runAsUser").and_then(Value::as_u64);
    if let Some(uid) = uid {
        let user = match field("runAsGroup").and_then(Value::as_u64) {
            Some(gid) => format!("{uid}:{gid}"),
            None => uid.to_string(),
        };
        flags.push(format!("--user={user}"));
    }
    if field("runAsNonRoot") == Some(&json!(true)) {
        // Without runAsUser, the image's user (65532) holds.
        assert_ne!(uid, Some(0), "runAsNonRoot with runAsUser 0");
    }
    if let Some(group) = pod_security["fsGroup"].as_u64() {
        flags.push(format!("--group-add={group}"));
    }
    if security["privileged"] == true {
        flags.push("--privileged".into());
    }
    if security["allowPrivilegeEscalation"] == false {
        flags.push("--security-opt=no-new-privileges".into());
    }
    if security["readOnlyRootFilesystem"] == true {
        // Kubernetes mounts no tmpfs on /tmp or /run; podman would.
        flags.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    for (list, flag) in [("drop", "--cap-drop"), ("add", "--cap-add")] {
        for cap in security["capabilities"][list]
            .as_array()
            .into_iter()
            .flatten()
        {
            flags.push(format!("{flag}={}", cap.as_str().expect("a capability")));
        }
    }
    // The kubelet's default (without --seccomp-default) is Unconfined.
    let seccomp = field("seccompProfile");
    match seccomp.map(|p| p["type"].as_str().expect("seccompProfile.type")) {
        None | Some("Unconfined") => flags.push("--security-opt=seccomp=unconfined".into()),
        Some("RuntimeDefault") => {}
        // The kubelet passes `<seccomp root>/<localhostProfile>` to the runtime; deploy/seccomp/
        // is that root's draingate part, as node provisioning installs it.
        Some("Localhost") => {
            let file = seccomp.and_then(|p| p["localhostProfile"].as_str());
            let file = file.expect("a Localhost seccompProfile names its localhostProfile");
            flags.push(format!(
                "--security-opt=seccomp={}",
                seccomp_file(file).display()
            ));
        }
        Some(other) => panic!("seccompProfile {other}: translate it to podman here"),
    }

    for (key, value) in container["resources"]["limits"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let value = value.as_str().expect("a quantity");
        match key.as_str() {
            "memory" => {
                let mib = value
                    .strip_suffix("Mi")
                    .unwrap_or_else(|| panic!("memory limit {value}: translate it here"));
                flags.push(format!("--memory={mib}m"));
            }
            other => panic!("limits.{other}: translate it to podman here"),
        }
    }

    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().expect("env name");
        let value = if let Some(value) = var["value"].as_str() {
            value.to_owned()
        } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
            NODE.to_owned()
        } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP" {
            node_ip.to_owned()
        } else {
            panic!("env {name}: translate {var} here")
        };
        flags.push(format!("--env={name}={value}"));
    }

    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let name = mount["name"].as_str().expect("volume name");
        let volume = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name} is mounted but not defined"));
        let host = match (volumes.get(name), volume["hostPath"]["path"].as_str()) {
            (Some(dir), _) => dir.clone(),
            (None, Some(path)) => PathBuf::from(path),
            (None, None) => panic!("volume {name} ({volume}): give the test its files"),
        };
        let mut options = Vec::new();
        if mount["readOnly"] == true {
            options.push("ro");
        }
        match mount["mountPropagation"].as_str() {
            None | Some("None") => {}
            Some("HostToContainer") => options.push("rslave"),
            Some("Bidirectional") => options.push("rshared"),
            Some(other) => panic!("mountPropagation {other}: translate it here"),
        }
        let mut flag = format!(
            "--volume={}:{}",
            host.display(),
            mount["mountPath"].as_str().expect("mountPath")
        );
        if !options.is_empty() {
            flag = format!("{flag}:{}", options.join(","));
        }
        flags.push(flag);
    }
    flags
}

/// A Secret volume as the kubelet writes it into `dir`: its items from the files in `source`,
/// with its defaultMode, owned by root and the pod's fsGroup (when it has one).
fn secret_dir(spec: &Value, name: &str, source: &Path, dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let volume = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"));
    let secret = &volume["secret"];
    let mode = u32::try_from(secret["defaultMode"].as_u64().unwrap_or(0o644)).expect("a mode");
    let group = spec["securityContext"]["fsGroup"]
        .as_u64()
        .map(|g| u32::try_from(g).expect("a gid"));
    std::fs::create_dir_all(dir).expect("secret directory");
    for item in secret["items"].as_array().expect("the Secret's items") {
        let key = item["key"].as_str().expect("key");
        let path = dir.join(item["path"].as_str().expect("path"));
        std::fs::copy(source.join(key), &path).unwrap_or_else(|e| panic!("{key}: {e}"));
        std::os::unix::fs::chown(&path, Some(0), Some(group.unwrap_or(0))).expect("chown");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    dir.to_path_buf()
}

fn wait_for(what: &str, agent: &Container, mut check: impl FnMut() -> Option<Value>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what}; the agent:\n{}",
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `draingate gate check` from the host against the containerised gate: exit code and answer.
fn gate_check(gate: &str, extra: &[&str]) -> (i32, Value) {
    let output = Command::new(draingate_bin())
        .args(["gate", "check", "--gate", gate, "--namespace", "shop"])
        .args([
            "--workload",
            "deploy/web",
            "--old",
            "7c9d5b8f4",
            "-o",
            "json",
        ])
        .args(extra)
        .output()
        .expect("run draingate gate check");
    let code = output.status.code().unwrap_or(-1);
    let answer = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "no JSON answer from gate check ({err}), exit {code}: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (code, answer)
}

/// The capability mask of `names` (as the manifests spell them).
fn capability_mask(names: &Value) -> u64 {
    names
        .as_array()
        .into_iter()
        .flatten()
        .map(|name| match name.as_str().expect("a capability") {
            "NET_ADMIN" => 1u64 << 12,
            "PERFMON" => 1 << 38,
            "BPF" => 1 << 39,
            other => panic!("capability {other}: give this test its number"),
        })
        .sum()
}

#[test]
fn the_image_counts_a_pod_under_podman_as_the_daemonset_runs_it_and_the_gate_judges_it() {
    require_root();
    let image = require_image();

    // What a user checks of the image itself: labels, its user, its entrypoint, no shell.
    let config = &image["Config"];
    assert_eq!(config["User"], "65532:65532", "{config:#}");
    let labels = &config["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        labels["org.opencontainers.image.source"],
        "https://github.com/draingate/draingate"
    );
    let head = Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"])
        .output()
        .expect("git rev-parse");
    assert_eq!(
        labels["org.opencontainers.image.revision"],
        String::from_utf8_lossy(&head.stdout).trim(),
        "{IMAGE} was built at another commit: rebuild it with `sudo -E cargo xtask image --debug`"
    );
    let version = podman_ok(&[&RUN[..], &["--rm", IMAGE, "--version"]].concat());
    assert_eq!(
        version.trim(),
        format!("draingate {}", env!("CARGO_PKG_VERSION"))
    );
    let shell = podman()
        .args(RUN)
        .args(["--rm", "--entrypoint=/bin/sh", IMAGE])
        .args(["-c", "true"])
        .output()
        .expect("podman run");
    assert!(!shell.status.success(), "the image has a shell: {shell:?}");

    // The node: a pod (b) with a client beside it (a); a namespace for the gate's pod, whose
    // veth peer is the node's; the API server; the TLS Secret's set.
    let runtime = kube_api::runtime();
    let link = Link::new("dgim", Family::V4);
    let gate_net = NodeLink::new("dgig");
    let name = "web-7c9d5b8f4-im4ge";
    let listed = kube_api::pod(
        name,
        "uid-image-1",
        &link.b_addr.to_string(),
        Some(("web-7c9d5b8f4", "pod-template-hash", "7c9d5b8f4")),
    );
    let api = runtime.block_on(FakeKubeApi::start(vec![listed.clone()], vec![]));
    let dir = std::env::temp_dir().join(format!("draingate-image-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("run")).expect("temporary directory");
    // As the service account's files give it in a cluster, the client has a CA (the image has
    // no system CA store, and the kube client wants one when the kubeconfig names none). The API
    // here is plain HTTP, so the CA (the TLS set's, mounted for the agent) is never used.
    let write_kubeconfig = |file: &str, api: &FakeKubeApi| {
        let path = dir.join(file);
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: \
                 http://{}\n    certificate-authority: /etc/draingate/tls/ca.crt\ncontexts:\n- \
                 name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: \
                 fake\nusers:\n- name: fake\n  user: {{}}\n",
                api.addr
            ),
        )
        .expect("write the kubeconfig");
        path
    };
    let kubeconfig = write_kubeconfig("kubeconfig", &api);
    let certs = dir.join("tls-set");
    let made = Command::new(draingate_bin())
        .args(["tls-certs", "--out"])
        .arg(&certs)
        .output()
        .expect("draingate tls-certs");
    assert!(made.status.success(), "{made:?}");
    let pins = PinDir::new();

    // The agent, as the DaemonSet runs it under the seccomp overlay: draingate's own profile.
    // The base's is the runtime's default, which podman's may not match (an older one refuses
    // bpf() without CAP_SYS_ADMIN); the overlay changes nothing else, so all else is the base's.
    let daemonset = kustomized("overlays/seccomp", "DaemonSet");
    let mut base = manifest("agent.yaml", "DaemonSet");
    let base_seccomp =
        &mut base["spec"]["template"]["spec"]["containers"][0]["securityContext"]["seccompProfile"];
    assert_eq!(base_seccomp["type"], "RuntimeDefault", "{base_seccomp}");
    *base_seccomp =
        daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["seccompProfile"]
            .clone();
    assert_eq!(
        daemonset["spec"], base["spec"],
        "the seccomp overlay changes the agent's seccompProfile only"
    );
    let spec = &daemonset["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    std::fs::create_dir_all(&pins.config.pin_dir).expect("the test's pin directory");
    let volumes = HashMap::from([
        ("run", dir.join("run")),
        // The agent's pin directory: the test's own, mounted where the DaemonSet mounts its own.
        ("pins", pins.config.pin_dir.clone()),
        (
            "tls",
            secret_dir(spec, "tls", &certs, &dir.join("agent-tls")),
        ),
    ]);
    // The node's address, as status.hostIP gives it: the host's end of the gate's link.
    let node_ip = gate_net.node_addr.to_string();
    let mut flags = podman_flags(spec, &volumes, "", &node_ip);
    // In place of the service account: the kubeconfig of the local API server.
    flags.push(format!(
        "--volume={}:/etc/draingate/kubeconfig:ro",
        kubeconfig.display()
    ));
    flags.push("--env=KUBECONFIG=/etc/draingate/kubeconfig".into());
    let (grpc_port, http_port) = (free_port(), free_port());
    let args: Vec<String> = container["args"]
        .as_array()
        .expect("the agent's args")
        .iter()
        .map(|arg| {
            // The kubelet expands `$(NAME)` in args from the container's env.
            let arg = expand_env(arg.as_str().expect("an arg"), &flags);
            // The manifest's address on free ports (the host's own may be taken).
            let (flag, port) = if arg.starts_with("--grpc-addr=") {
                ("--grpc-addr=", grpc_port)
            } else if arg.starts_with("--http-addr=") {
                ("--http-addr=", http_port)
            } else {
                return arg;
            };
            let (host, _) = arg[flag.len()..].rsplit_once(':').expect("HOST:PORT");
            assert_eq!(
                host, node_ip,
                "the agent listens on the node's address only"
            );
            format!("{flag}{host}:{port}")
        })
        .collect();
    // First under a profile that refuses perf_event_open(), as runtime defaults before CRI-O
    // 1.35.1 do: the agent stops at start, exit 3, and says that seccomp may be why.
    let profile_path = flags
        .iter()
        .find_map(|f| f.strip_prefix("--security-opt=seccomp="))
        .expect("the agent's seccomp profile");
    let mut refusing: Value = serde_json::from_str(
        &std::fs::read_to_string(profile_path).expect("the agent's seccomp profile"),
    )
    .expect("the profile is JSON");
    for rule in refusing["syscalls"].as_array_mut().expect("syscalls") {
        if let Some(names) = rule["names"].as_array_mut() {
            names.retain(|n| n != "perf_event_open");
        }
    }
    let refusing_path = dir.join("no-perf-event-open.json");
    std::fs::write(&refusing_path, refusing.to_string()).expect("write the refusing profile");
    // An API server of its own: the fake one streams its events to its first watch only.
    let spare_api = runtime.block_on(FakeKubeApi::start(vec![listed.clone()], vec![]));
    let spare_kubeconfig = write_kubeconfig("kubeconfig-refused", &spare_api);
    let refused_flags: Vec<String> = with_seccomp(&flags, &refusing_path.display().to_string())
        .into_iter()
        .map(|f| {
            f.replace(
                &*kubeconfig.to_string_lossy(),
                &spare_kubeconfig.to_string_lossy(),
            )
        })
        .collect();
    assert_ne!(
        refused_flags,
        with_seccomp(&flags, &refusing_path.display().to_string())
    );
    let refused = Container::run("agent-refused", &refused_flags, &args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while refused.running() {
        assert!(
            Instant::now() < deadline,
            "the agent runs without perf_event_open():\n{}",
            refused.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs = refused.logs();
    assert_eq!(
        podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &refused.name]).trim(),
        "3",
        "{logs}"
    );
    assert!(
        logs.contains("not permitted to attach to tracepoints")
            && logs.contains("a seccomp profile that lets bpf() and perf_event_open() through"),
        "{logs}"
    );
    drop(refused);

    let started = Instant::now();
    let agent = Container::run("agent", &flags, &args);
    agent.wait_http_ok(&format!("{node_ip}:{http_port}"), "/readyz");
    assert!(
        TcpStream::connect(("127.0.0.1", http_port)).is_err(),
        "the agent listens on the node's address, not on every interface"
    );
    eprintln!(
        "the agent's container was ready in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // It runs as the manifest says: uid 0, exactly the added capabilities, no new privileges,
    // a seccomp filter, a read-only root.
    let status = agent.status();
    let security = &container["securityContext"];
    assert!(status["Uid"].starts_with("0\t"), "{status:?}");
    assert_eq!(
        u64::from_str_radix(&status["CapEff"], 16).expect("CapEff"),
        capability_mask(&security["capabilities"]["add"]),
        "{status:?}"
    );
    assert_eq!(status["NoNewPrivs"], "1", "{status:?}");
    assert_eq!(status["Seccomp"], "2", "{status:?}");
    assert!(
        status["root mount"].split(',').any(|o| o == "ro"),
        "{status:?}"
    );

    // The profile is what refuses: under the agent's own options, a probe's syscalls that get
    // through unconfined (each fails harmlessly on its arguments, or does nothing) are EPERM
    // under the profile, and the ones the agent needs are not.
    let under_profile = probe_syscalls(&flags);
    let without_filter = probe_syscalls(&with_seccomp(&flags, "unconfined"));
    for refused in [
        "unshare",
        "setns",
        "mount",
        "ptrace",
        "keyctl",
        "socket_af_alg",
    ] {
        assert_eq!(
            (
                under_profile.get(refused),
                without_filter.get(refused).map(|&e| e == EPERM)
            ),
            (Some(&EPERM), Some(false)),
            "{refused}: refused by the profile only; under it: {under_profile:?}, unconfined: \
             {without_filter:?}"
        );
    }
    for allowed in ["bpf", "perf_event_open", "socket_netlink_route"] {
        assert_eq!(
            under_profile.get(allowed),
            without_filter.get(allowed),
            "{allowed} gets through the profile: {under_profile:?}, unconfined: {without_filter:?}"
        );
        assert_ne!(
            under_profile.get(allowed),
            Some(&EPERM),
            "{under_profile:?}"
        );
    }
    eprintln!("syscalls under the profile: {under_profile:?}; unconfined: {without_filter:?}");

    // A pod's connections: three accepted, open; then one refused. The CLI on the host reads
    // them through the socket the container made.
    let socket = dir.join("run/agent.sock");
    let b_addr = link.b_addr;
    let listener = link
        .b
        .run(|| std::net::TcpListener::bind((b_addr, 8080)))
        .expect("a server in the pod");
    let clients: Vec<TcpStream> = (0..3)
        .map(|_| {
            link.a
                .run(|| TcpStream::connect((b_addr, 8080)))
                .expect("connect to the pod")
        })
        .collect();
    let served: Vec<TcpStream> = (0..3)
        .map(|_| listener.accept().expect("accept").0)
        .collect();
    let seen = wait_for("three open connections", &agent, || {
        pod_json(&socket, name).filter(|p| p["open"] == 3 && p["accepted"] == 3)
    });
    assert_eq!(
        (&seen["namespace"], &seen["owner_name"], &seen["node"]),
        (&json!("shop"), &json!("web"), &json!(NODE)),
        "{seen:#}"
    );
    let refused = |addr: IpAddr| link.a.run(|| TcpStream::connect((addr, 9))).is_err();
    assert!(refused(b_addr));
    let counted = wait_for("the refusal", &agent, || {
        pod_json(&socket, name).filter(|p| p["refused"] == 1)
    });
    assert_eq!(
        (
            &counted["accepted"],
            &counted["open"],
            &counted["refused"],
            &counted["resets_sent"],
            &counted["errors"]
        ),
        (&json!(3), &json!(3), &json!(1), &json!(0), &json!(0)),
        "{counted:#}"
    );
    drop(clients);
    drop(served);
    wait_for("the connections closed", &agent, || {
        pod_json(&socket, name).filter(|p| p["open"] == 0)
    });

    // The gate, as its Deployment runs it, in a namespace of its own, asking the agent at the
    // node's address over mutual TLS.
    let deployment = manifest("gate.yaml", "Deployment");
    let gate_spec = &deployment["spec"]["template"]["spec"];
    let gate_container = &gate_spec["containers"][0];
    let volumes = HashMap::from([(
        "tls",
        secret_dir(gate_spec, "tls", &certs, &dir.join("gate-tls")),
    )]);
    let flags = podman_flags(
        gate_spec,
        &volumes,
        &format!("ns:{}", gate_net.pod.path().display()),
        &node_ip,
    );
    let agent_addr = format!("{}:{grpc_port}", gate_net.node_addr);
    let args: Vec<String> = gate_container["args"]
        .as_array()
        .expect("the gate's args")
        .iter()
        .map(|arg| {
            let arg = arg.as_str().expect("an arg");
            if arg.starts_with("--agents-dns=") {
                format!("--agents={agent_addr}")
            } else {
                arg.to_owned()
            }
        })
        .collect();
    let port = |flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(flag))
            .and_then(|a| a.rsplit_once(':'))
            .map_or_else(|| panic!("the gate's {flag}"), |(_, p)| p.to_owned())
    };
    let gate_http = format!("{}:{}", gate_net.pod_addr, port("--http-addr="));
    let gate_grpc = format!("{}:{}", gate_net.pod_addr, port("--grpc-addr="));
    let gate = Container::run("gate", &flags, &args);
    gate.wait_http_ok(&gate_http, "/healthz");
    let status = gate.status();
    assert!(status["Uid"].starts_with("65532\t"), "{status:?}");
    assert!(status["Gid"].starts_with("65532\t"), "{status:?}");
    assert_eq!(status["CapEff"], "0000000000000000", "{status:?}");
    assert_eq!(status["NoNewPrivs"], "1", "{status:?}");
    assert_eq!(
        status["Seccomp"], "2",
        "the runtime's default filter: {status:?}"
    );

    // The pod is deleted with nothing open and its container exits: it drained clean, and the
    // gate says pass.
    let mut deleting = listed;
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    deleting["metadata"]["deletionTimestamp"] = json!(now);
    deleting["status"]["containerStatuses"][0]["state"] =
        json!({"terminated": {"exitCode": 0, "startedAt": now, "finishedAt": now}});
    deleting["metadata"]["resourceVersion"] = json!("1002");
    api.pod_event("MODIFIED", &deleting);
    wait_for("the exit", &agent, || {
        pod_json(&socket, name).filter(|p| p["phase"] == "exited")
    });
    let (code, answer) = gate_check(&gate_grpc, &["--wait", "--timeout", "30s"]);
    assert_eq!(
        (code, &answer["verdict"]),
        (0, &json!("pass")),
        "{answer:#}\nthe gate:\n{}",
        gate.logs()
    );

    // A refusal inside its termination window: the agent fails the pod, and so does the gate.
    std::thread::sleep(Duration::from_millis(1100));
    assert!(refused(b_addr));
    let failed = wait_for("the error in the window", &agent, || {
        pod_json(&socket, name).filter(|p| p["errors"] == 1)
    });
    assert_eq!(
        (&failed["verdict"], &failed["refused"]),
        (&json!("fail"), &json!(2)),
        "{failed:#}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let (code, answer) = gate_check(&gate_grpc, &[]);
        if code == 1 {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "the gate never failed the rollout: {answer:#}\nthe gate:\n{}",
            gate.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(answer["verdict"], "fail", "{answer:#}");
    assert_eq!(answer["failedRequests"], 1, "{answer:#}");
    assert!(
        answer["reason"].as_str().is_some_and(|r| r.contains(name)),
        "the reason names the pod: {answer:#}"
    );
    drop(gate);
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
