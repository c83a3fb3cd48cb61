//! Test support shared by the end-to-end tests: network namespaces that clean up after themselves,
//! addresses from the benchmarking ranges that no two tests share, and the root check.
//!
//! Only 198.18.0.0/15 (RFC 2544) and `2001:2::/48` (RFC 5180), and only inside namespaces a test
//! made itself: tests never touch the host's own network.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use nix::sched::{CloneFlags, setns};

pub mod kube_api;
pub mod kube_cluster;

/// Panics, with the reason and the fix, unless the test runs as root. Kernel tests never skip
/// silently: a run without root fails loudly.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "kernel tests load eBPF programs and create network namespaces: they need root; \
         run them with `sudo cargo xtask test`"
    );
}

/// A sequence number unique within this process, combined with the pid for names and addresses
/// that no two concurrently running tests share.
fn next_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A network namespace made for one test, removed on drop (also when the test panics).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a uniquely named namespace `dg-<prefix>-<pid>-<n>` with loopback up.
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        let name = format!("dg-{prefix}-{}-{}", std::process::id(), next_id());
        run("ip", &["netns", "add", &name]);
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    /// The namespace's bind mount, as `ip netns` keeps it.
    #[must_use]
    pub fn path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/netns").join(self.name())
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <this namespace> ARGS`, panicking with its output when it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    /// Makes TCP connects to `port` here answer "host unreachable" (an iptables REJECT), as a
    /// node answers for the address of a pod whose sandbox is gone: the connect gets no answer
    /// from any socket.
    pub fn unreachable_port(&self, port: u16) {
        self.iptables(&[
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "REJECT",
            "--reject-with",
            "icmp-host-unreachable",
        ]);
    }

    /// Runs `iptables ARGS` (IPv4) in this namespace, panicking with its output when it fails.
    pub fn iptables(&self, args: &[&str]) {
        let mut full = vec!["netns", "exec", self.name.as_str(), "iptables"];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    /// Runs `f` on a thread that has entered this namespace, and returns its result. Sockets made
    /// inside keep belonging to the namespace wherever they are used afterwards.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = File::open(&path).unwrap_or_else(|err| panic!("open {path}: {err}"));
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|err| panic!("setns {path}: {err}"));
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace also deletes the veth ends inside it and their peers.
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: could not delete network namespace {}", self.name);
        }
    }
}

/// Two namespaces joined by a veth pair (`eth0` in each), with one address each.
#[derive(Debug)]
pub struct Link {
    pub a: Netns,
    pub b: Netns,
    pub a_addr: IpAddr,
    pub b_addr: IpAddr,
}

/// A pod namespace whose veth peer is in the node's (the test's own) namespace, as a CNI sets
/// one up: the node's side has the first address of a /30 of 198.18.0.0/15, the pod the
/// second. Deleting the namespace deletes both ends.
#[derive(Debug)]
pub struct NodeLink {
    pub pod: Netns,
    /// The node's side of the pod's interface.
    pub node_if: String,
    pub node_addr: IpAddr,
    pub pod_addr: IpAddr,
}

impl NodeLink {
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        let pod = Netns::new(prefix);
        // Interface names are at most 15 bytes.
        let node_if = format!("dgn{}", next_id() + (std::process::id() % 10_000) * 1000);
        run(
            "ip",
            &[
                "link",
                "add",
                &node_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod.name(),
            ],
        );
        let (node_addr, pod_addr, prefix_len) = unique_pair(Family::V4);
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{node_addr}/{prefix_len}"),
                "dev",
                &node_if,
            ],
        );
        run("ip", &["link", "set", &node_if, "up"]);
        pod.ip(&[
            "addr",
            "add",
            &format!("{pod_addr}/{prefix_len}"),
            "dev",
            "eth0",
        ]);
        pod.ip(&["link", "set", "eth0", "up"]);
        Self {
            pod,
            node_if,
            node_addr,
            pod_addr,
        }
    }
}

/// Address family of a [`Link`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Link {
    #[must_use]
    pub fn new(prefix: &str, family: Family) -> Self {
        let a = Netns::new(&format!("{prefix}a"));
        let b = Netns::new(&format!("{prefix}b"));
        a.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            b.name(),
        ]);
        let (a_addr, b_addr, prefix_len) = unique_pair(family);
        for (ns, addr) in [(&a, a_addr), (&b, b_addr)] {
            let cidr = format!("{addr}/{prefix_len}");
            match family {
                // No duplicate address detection: the address is usable at once.
                Family::V6 => ns.ip(&["addr", "add", &cidr, "dev", "eth0", "nodad"]),
                Family::V4 => ns.ip(&["addr", "add", &cidr, "dev", "eth0"]),
            }
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        Self {
            a,
            b,
            a_addr,
            b_addr,
        }
    }
}

/// A point-to-point pair of addresses that no other link of any running test uses: a /30 out of
/// 198.18.0.0/15 or a /64 out of `2001:2::/48`, chosen by pid and sequence number.
fn unique_pair(family: Family) -> (IpAddr, IpAddr, u8) {
    // 15 bits of pid and sequence: 2^15 /30 subnets fill the /15 exactly.
    let id = (std::process::id() << 7 | (next_id() & 0x7f)) & 0x7fff;
    match family {
        Family::V4 => {
            let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) | (id << 2);
            (
                IpAddr::V4(Ipv4Addr::from(base + 1)),
                IpAddr::V4(Ipv4Addr::from(base + 2)),
                30,
            )
        }
        Family::V6 => {
            let subnet = u16::try_from(id).expect("15 bits");
            (
                IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, subnet, 0, 0, 0, 1)),
                IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, subnet, 0, 0, 0, 2)),
                64,
            )
        }
    }
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    assert!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// A bpffs pin directory of one test, whose pinned programs and maps are removed on drop, so
/// tests neither share counts with each other nor leave programs attached.
#[derive(Debug)]
pub struct PinDir {
    pub config: draingate::loader::ProbeConfig,
}

impl PinDir {
    #[must_use]
    pub fn new() -> Self {
        let pin_dir = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/draingate-test-{}-{}",
            std::process::id(),
            next_id()
        ));
        Self {
            config: draingate::loader::ProbeConfig {
                // As the agent's `--reset-source packets`: every kernel test can run the packet
                // source of older kernels on this one (`DRAINGATE_RESET_SOURCE=packets`).
                reset_source: std::env::var("DRAINGATE_RESET_SOURCE")
                    .is_ok_and(|v| v == "packets")
                    .then_some(draingate::loader::ResetSource::Packets),
                ..draingate::loader::ProbeConfig::at(pin_dir)
            },
        }
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(err) = draingate::loader::KernelProbes::remove_pins(&self.config.pin_dir) {
            eprintln!(
                "warning: could not remove {}: {err}",
                self.config.pin_dir.display()
            );
        }
    }
}

/// A draingate agent running in this test process on its own pins, socket and port, with the
/// `local` inventory and a fast resync. Stops (and removes its pins) on drop.
pub struct TestAgent {
    pub socket: std::path::PathBuf,
    /// Where its HTTP endpoints (/metrics, /healthz, /readyz) listen.
    pub http: std::net::SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    stop: tokio::sync::watch::Sender<bool>,
    pins: PinDir,
}

impl std::fmt::Debug for TestAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestAgent")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl TestAgent {
    #[must_use]
    pub fn start() -> Self {
        Self::start_with(PinDir::new())
    }

    /// Stops this agent (its programs stay attached, its maps pinned, the kernel counting on)
    /// and returns its pins, for [`Self::start_with`] later: an agent that is down a while.
    #[must_use]
    pub fn stop(mut self) -> PinDir {
        // The placeholder's directory never exists, so dropping `self` removes nothing.
        let pins = std::mem::take(&mut self.pins);
        drop(self);
        pins
    }

    /// Stops this agent (its programs stay attached, its maps pinned) and starts a new one on
    /// the same pins, as a node agent restart does.
    #[must_use]
    pub fn restart(mut self) -> Self {
        // The placeholder's directory never exists, so dropping `self` removes nothing.
        let pins = std::mem::take(&mut self.pins);
        drop(self);
        Self::start_with(pins)
    }

    /// An agent on `pins` (and their configuration: a small socket table, say).
    #[must_use]
    pub fn start_with(pins: PinDir) -> Self {
        let socket = std::env::temp_dir().join(format!(
            "draingate-test-{}-{}.sock",
            std::process::id(),
            next_id()
        ));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let config = draingate::agent::AgentConfig {
            probes: pins.config.clone(),
            resync: std::time::Duration::from_millis(200),
            ..Default::default()
        };
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let listen = draingate::api::ListenConfig {
            grpc_addr: "127.0.0.1:0".parse().expect("address"),
            socket: socket.clone(),
            tls: None,
        };
        let http = runtime.block_on(async {
            let (agent, handle) = draingate::agent::Agent::new(
                config,
                Box::new(draingate::inventory::LocalSource::default()),
            )
            .expect("start the agent");
            let mut agent_stop = stop_rx.clone();
            tokio::spawn(agent.run(async move {
                let _ = agent_stop.wait_for(|s| *s).await;
            }));
            let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind HTTP");
            let http = http_listener.local_addr().expect("HTTP address");
            let mut http_stop = stop_rx.clone();
            let http_handle = handle.clone();
            tokio::spawn(async move {
                draingate::http::serve(http_handle, http_listener, async move {
                    let _ = http_stop.wait_for(|s| *s).await;
                })
                .await
                .expect("serve HTTP");
            });
            let mut api_stop = stop_rx;
            tokio::spawn(async move {
                draingate::api::serve(handle, &listen, async move {
                    let _ = api_stop.wait_for(|s| *s).await;
                })
                .await
                .expect("serve the API");
            });
            http
        });
        Self {
            socket,
            http,
            runtime: Some(runtime),
            stop,
            pins,
        }
    }

    /// Runs `f` with a gRPC client connected over the agent's unix socket, as the CLI does.
    pub fn with_client<R>(
        &self,
        f: impl AsyncFnOnce(
            &mut draingate_proto::v1::agent_client::AgentClient<tonic::transport::Channel>,
        ) -> R,
    ) -> R {
        let runtime = self.runtime.as_ref().expect("running");
        runtime.block_on(async {
            let addr = draingate::cli::AgentAddr::Unix(self.socket.clone());
            // The API starts serving shortly after the agent: retry for a while.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut client = loop {
                match draingate::cli::connect(&addr).await {
                    Ok(client) => break client,
                    Err(err) if tokio::time::Instant::now() > deadline => {
                        panic!("connect to the test agent: {:?}", anyhow_chain(&err))
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                }
            };
            f(&mut client).await
        })
    }

    /// `GET path` on the agent's HTTP endpoints: status code and body.
    #[must_use]
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_request(self.http, "GET", path, "").expect("HTTP request to the agent")
    }

    /// Polls the pod named `name` until `done` holds, and returns it as the API shows it; panics
    /// with the pod's state when it does not within 15 s (the deadline only bounds a failing run).
    pub fn wait_for_pod(
        &self,
        name: &str,
        done: impl Fn(&draingate_proto::v1::Pod) -> bool,
    ) -> draingate_proto::v1::Pod {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let pod = self.with_client(async |client| {
                client
                    .get_pod(draingate_proto::v1::GetPodRequest {
                        pod: Some(draingate_proto::v1::PodRef {
                            name: name.to_owned(),
                            ..Default::default()
                        }),
                    })
                    .await
                    .map(tonic::Response::into_inner)
            });
            match pod {
                Ok(pod) if done(&pod) => return pod,
                Ok(pod) if std::time::Instant::now() > deadline => {
                    panic!("pod {name} never reached the expected state: {pod:#?}")
                }
                Err(status) if std::time::Instant::now() > deadline => {
                    panic!("pod {name} never appeared: {status}")
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(std::time::Duration::from_secs(2));
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A child process that is killed (SIGKILL) and reaped on drop, unless it already exited.
#[derive(Debug)]
pub struct ChildGuard(pub std::process::Child);

impl ChildGuard {
    /// Runs `program ARGS` inside namespace `ns` (`ip netns exec` execs it: same pid).
    #[must_use]
    pub fn spawn_in(ns: &Netns, program: &str, args: &[&str]) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), program])
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {program} in {}: {err}", ns.name()));
        Self(child)
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).expect("pid"));
        nix::sys::signal::kill(pid, signal).expect("signal the child");
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A loopback port free now, for a process this test starts to listen on.
///
/// Taken below the kernel's ephemeral range (32768 and up by default): a port the kernel
/// handed out could be given again, between this check and the child's `bind`, to any
/// outgoing connection (the API server's, a client's), and the child would then fail with
/// "address in use" (seen in CI: 3 agents in 209 hold-test runs). Below the range only
/// another `free_port` could take it: each process walks its own stretch, from an offset
/// its pid chooses, and skips ports that are bound now.
#[must_use]
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000; // up to 31,999
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        let port = u16::try_from(FIRST + offset).expect("below 32,000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free loopback port between {FIRST} and {}",
        FIRST + SPAN - 1
    )
}

/// One HTTP/1.1 request (`body` sent as JSON when not empty) on a new connection: the status
/// code and the body.
pub fn http_request(
    addr: impl std::net::ToSocketAddrs,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut conn = std::net::TcpStream::connect(addr)?;
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: draingate\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The `draingate` binary of this build. `cargo xtask test` builds it before the tests run.
#[must_use]
pub fn draingate_bin() -> std::path::PathBuf {
    build_bin("draingate")
}

/// `draingate pods --agent AGENT -o json` (a socket path or HOST:PORT): the pod named `name`,
/// `None` while the agent does not answer or lists no such pod.
#[must_use]
pub fn pod_json(agent: impl AsRef<std::ffi::OsStr>, name: &str) -> Option<serde_json::Value> {
    let output = Command::new(draingate_bin())
        .arg("pods")
        .arg("--agent")
        .arg(agent)
        .args(["-o", "json"])
        .output()
        .ok()?;
    let all: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    all["pods"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
}

/// A binary of this build by name: beside the running executable (a binary) or one directory
/// up (a test, which runs from `deps/`).
#[must_use]
pub fn build_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable directory");
    [dir, dir.parent().unwrap_or(dir)]
        .iter()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "{name} is missing next to {}: build it with `cargo build --workspace --bins` \
                 (cargo xtask test does)",
                exe.display()
            )
        })
}

/// An error and all its sources, for panic messages.
fn anyhow_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(current) = source {
        text.push_str(": ");
        text.push_str(&current.to_string());
        source = current.source();
    }
    text
}

/// Writes `section` (Markdown starting with `## {heading}`) into the file at `path`: in place of
/// that section's earlier version (up to the next `## ` heading), or appended. The benchmarks
/// each own one section of BENCHMARKS.md.
pub fn write_section(path: &std::path::Path, heading: &str, section: &str) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let marker = format!("## {heading}");
    let start = if text.starts_with(&marker) {
        Some(0)
    } else {
        text.find(&format!("\n{marker}")).map(|at| at + 1)
    };
    let section = format!("{}\n", section.trim_matches('\n'));
    let updated = match start {
        Some(start) => {
            let end = text[start + marker.len()..]
                .find("\n## ")
                .map_or(text.len(), |at| start + marker.len() + at + 1);
            format!(
                "{}{section}{}",
                &text[..start],
                if end < text.len() {
                    format!("\n{}", &text[end..])
                } else {
                    String::new()
                }
            )
        }
        None if text.is_empty() => section,
        None => format!("{}\n\n{section}", text.trim_end_matches('\n')),
    };
    std::fs::write(path, updated).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    eprintln!("section \"{heading}\" written to {}", path.display());
}

#[cfg(test)]
mod tests {
    #[test]
    fn sections_are_replaced_in_place_or_appended() {
        let dir = tempfile_dir();
        let path = dir.join("BENCH.md");
        super::write_section(&path, "A", "## A\n\none\n");
        super::write_section(&path, "B", "## B\n\ntwo\n");
        super::write_section(&path, "C", "## C\n\nthree\n");
        super::write_section(&path, "B", "## B\n\nTWO\n");
        super::write_section(&path, "A", "## A\n\nONE\n");
        super::write_section(&path, "C", "## C\n\nTHREE\n");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "## A\n\nONE\n\n## B\n\nTWO\n\n## C\n\nTHREE\n");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("draingate-section-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
