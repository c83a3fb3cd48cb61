//! The node simulator: a node network namespace, a client namespace and one namespace per pod,
//! joined by veth pairs; a Service virtual IP balanced by iptables DNAT rules with the statistic
//! match, as kube-proxy writes them; pods as real processes.
//!
//! Addresses come only from 198.18.0.0/15 (RFC 2544, benchmarking) and only inside namespaces this
//! module made. Each rehearsal takes one /22 of it under an flock, so concurrent rehearsals (and
//! test runs) never share an address: the agent identifies pods by address.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::{fd::AsFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use nix::{
    fcntl::{Flock, FlockArg},
    sched::{CloneFlags, setns},
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};

/// The Service port clients connect to on the virtual IP.
pub const SERVICE_PORT: u16 = 80;
/// Numbers the rehearsals of this process.
static NEXT_REHEARSAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// How many /22 blocks 198.18.0.0/15 holds.
const BLOCKS: u32 = 128;
/// Pods one rehearsal can create over its life: the /22 less the client link and the VIP.
pub const MAX_PODS: u32 = 254;
/// The prefix of every namespace a rehearsal makes: `dgr<pid>-<n>-…`.
const NETNS_PREFIX: &str = "dgr";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{program}` (is it installed? `cargo xtask setup` installs it)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("all {BLOCKS} address blocks of 198.18.0.0/15 are taken by running rehearsals")]
    NoAddressBlock,
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("this rehearsal already made {MAX_PODS} pods, all its addresses")]
    OutOfAddresses,
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

/// Runs a command to completion; its stderr becomes the error.
pub async fn run(program: &str, args: &[&str]) -> Result<(), NodeError> {
    run_with_input(program, args, None).await
}

async fn run_with_input(
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<(), NodeError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| NodeError::Spawn {
        program: program.into(),
        source,
    })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        use tokio::io::AsyncWriteExt as _;
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(io_error(format!("writing to {program}")))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(io_error(format!("waiting for {program}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NodeError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// One /22 of 198.18.0.0/15, held (flock) for as long as the rehearsal runs.
#[derive(Debug)]
struct AddressBlock {
    base: u32,
    _lock: Flock<File>,
}

impl AddressBlock {
    fn claim() -> Result<Self, NodeError> {
        let dir = Path::new("/run/draingate");
        std::fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
        // Start from the pid, so concurrent rehearsals rarely try the same block first.
        let first = std::process::id() % BLOCKS;
        for i in 0..BLOCKS {
            let block = (first + i) % BLOCKS;
            let path = dir.join(format!("rehearse-block-{block}.lock"));
            let file =
                File::create(&path).map_err(io_error(format!("creating {}", path.display())))?;
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                return Ok(Self {
                    base: u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (block << 10),
                    _lock: lock,
                });
            }
        }
        Err(NodeError::NoAddressBlock)
    }

    fn addr(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.base + offset)
    }
}

/// A network namespace made by the simulator, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    async fn create(name: String) -> Result<Self, NodeError> {
        run("ip", &["netns", "add", &name]).await?;
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"]).await?;
        Ok(netns)
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    pub async fn ip(&self, args: &[&str]) -> Result<(), NodeError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full).await
    }

    /// Runs `program ARGS` inside this namespace (through `ip netns exec`).
    pub async fn exec(&self, program: &str, args: &[&str]) -> Result<(), NodeError> {
        self.exec_with_input(program, args, None).await
    }

    async fn exec_with_input(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<(), NodeError> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run_with_input("ip", &full, input).await
    }

    pub async fn sysctl(&self, key: &str, value: &str) -> Result<(), NodeError> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .await
    }

    /// Opens this namespace, for `setns`.
    pub fn open(&self) -> Result<File, NodeError> {
        File::open(self.path()).map_err(io_error(format!("opening {}", self.path().display())))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Synchronous on purpose: drop also runs while unwinding and on Ctrl-C. Deleting a
        // namespace deletes the veth ends inside it and their peers.
        let ok = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            tracing::warn!(netns = %self.name, "could not delete the network namespace");
        }
    }
}

/// Where the embedded agents pin their maps and programs: `PINS_PREFIX` and the rehearsal's id
/// (`dgr<pid>-<n>`, as its namespaces' names begin).
const BPFFS: &str = "/sys/fs/bpf";
const PINS_PREFIX: &str = "draingate-rehearse-";

/// The pin directory of the embedded agent of rehearsal `id`.
#[must_use]
pub fn pin_dir(id: &str) -> PathBuf {
    Path::new(BPFFS).join(format!("{PINS_PREFIX}{id}"))
}

/// The entries of `dir` named `{prefix}dgr<pid>-...`, with the pid.
fn rehearsal_entries(dir: &str, prefix: &str) -> Vec<(std::fs::DirEntry, i32)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let pid = entry
                .file_name()
                .to_string_lossy()
                .strip_prefix(prefix)?
                .strip_prefix(NETNS_PREFIX)?
                .split('-')
                .next()?
                .parse::<i32>()
                .ok()?;
            Some((entry, pid))
        })
        .collect()
}

/// Deletes every namespace the rehearsals of this process made, and their embedded agents'
/// pins: the last line of defence after an interrupt, which can land between `ip netns add`
/// and the guard that would delete it.
pub fn remove_all_of_this_process() {
    let me = i32::try_from(std::process::id()).unwrap_or_default();
    for (entry, pid) in rehearsal_entries("/run/netns", "") {
        if pid == me {
            drop(Netns {
                name: entry.file_name().to_string_lossy().into_owned(),
            });
        }
    }
    for (entry, pid) in rehearsal_entries(BPFFS, PINS_PREFIX) {
        if pid == me {
            let _ = crate::loader::KernelProbes::remove_pins(&entry.path());
        }
    }
}

/// Deletes what earlier rehearsals left behind when they were killed (their pid is gone): their
/// namespaces, and their embedded agents' pins, whose programs would otherwise stay attached to
/// every TCP state change of the host. A rehearsal killed by `SIGKILL` costs nothing but a few
/// seconds of the next one.
pub async fn reap_stale() {
    let gone = |pid: i32| kill(Pid::from_raw(pid), None).is_err();
    for (entry, pid) in rehearsal_entries("/run/netns", "") {
        if gone(pid) {
            let name = entry.file_name().to_string_lossy().into_owned();
            tracing::info!(netns = %name, "removing a namespace left by a killed rehearsal");
            let _ = run("ip", &["netns", "del", &name]).await;
        }
    }
    for (entry, pid) in rehearsal_entries(BPFFS, PINS_PREFIX) {
        if gone(pid) {
            let path = entry.path();
            tracing::info!(pins = %path.display(), "removing the pins of a killed rehearsal's agent");
            let _ = crate::loader::KernelProbes::remove_pins(&path);
        }
    }
}

/// Joins `inner` to the node with a veth pair, `veth` on the node and `eth0` inside, a /30 each
/// side, and makes the node `inner`'s default route.
/// The node's route for the whole pod network (the /22 at `base`), as a bridge CNI keeps one:
/// a pod's own /30 is more specific while it exists, and once its sandbox is gone, packets to
/// its address still leave the node and are lost, unanswered, rather than refused by routing.
/// So a Service that still sends to a removed pod makes its clients' connects time out, as in a
/// cluster, and the node's conntrack keeps the translation (the packet was routed). The sink is
/// one end of a veth pair whose other end stays down: it has no carrier, and drops all it sends.
/// The Service address itself stays unreachable (what kube-proxy answers for a Service without
/// endpoints), for connects the Service chain did not translate.
async fn pod_network_sink(node: &Netns, base: Ipv4Addr, vip: Ipv4Addr) -> Result<(), NodeError> {
    node.ip(&[
        "link",
        "add",
        "podsink",
        "type",
        "veth",
        "peer",
        "name",
        "podsink-peer",
    ])
    .await?;
    node.ip(&["link", "set", "podsink", "arp", "off", "up"])
        .await?;
    node.ip(&["route", "add", &format!("{base}/22"), "dev", "podsink"])
        .await?;
    node.ip(&["route", "add", "unreachable", &format!("{vip}/32")])
        .await
}

async fn wire(
    node: &Netns,
    veth: &str,
    node_side: Ipv4Addr,
    inner: &Netns,
    inner_addr: Ipv4Addr,
) -> Result<(), NodeError> {
    node.ip(&[
        "link",
        "add",
        veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &inner.name,
    ])
    .await?;
    node.ip(&["addr", "add", &format!("{node_side}/30"), "dev", veth])
        .await?;
    node.ip(&["link", "set", veth, "up"]).await?;
    inner
        .ip(&["addr", "add", &format!("{inner_addr}/30"), "dev", "eth0"])
        .await?;
    inner.ip(&["link", "set", "eth0", "up"]).await?;
    inner
        .ip(&["route", "add", "default", "via", &node_side.to_string()])
        .await
}

/// A pod: its namespace, address and, once started, its process.
#[derive(Debug)]
pub struct SimPod {
    pub name: String,
    pub addr: Ipv4Addr,
    /// The host-side veth in the node namespace.
    veth: String,
    netns: Option<Netns>,
    process: Option<tokio::process::Child>,
    pub pid: Option<u32>,
}

impl SimPod {
    pub fn netns_name(&self) -> Option<&str> {
        self.netns.as_ref().map(|n| n.name.as_str())
    }

    /// Sends `signal` to the pod's main process (SIGTERM, as the kubelet does to PID 1).
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid {
            let _ = kill(Pid::from_raw(pid.cast_signed()), signal);
        }
    }

    /// SIGKILL to every process of the pod (its process group), as the kubelet kills a container.
    pub fn kill_all(&self) {
        if let Some(pid) = self.pid {
            let _ = killpg(Pid::from_raw(pid.cast_signed()), Signal::SIGKILL);
        }
    }

    /// Waits for the main process to exit; `None` when it was never started.
    pub async fn wait(&mut self) -> Option<std::process::ExitStatus> {
        match self.process.as_mut() {
            Some(child) => child.wait().await.ok(),
            None => None,
        }
    }

    /// Whether the main process has exited.
    pub fn exited(&mut self) -> bool {
        self.process
            .as_mut()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// Removes the pod's namespace (the kubelet tearing the sandbox down).
    pub fn remove(&mut self) {
        self.kill_all();
        self.netns = None;
    }
}

impl Drop for SimPod {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// What the command of each pod is.
#[derive(Debug, Clone)]
pub struct PodCommand {
    /// Program and arguments; `{port}` in an argument is replaced by the port.
    pub argv: Vec<String>,
    /// The port the server listens on in its pod (also given as the `PORT` env var).
    pub port: u16,
    /// Where the pods' output goes: `<dir>/<pod>.log`.
    pub log_dir: PathBuf,
}

/// The simulated node: its namespaces, the Service and the pods.
#[derive(Debug)]
pub struct Node {
    block: AddressBlock,
    pub node: Netns,
    pub client: Netns,
    /// The client's address, as conntrack shows it.
    pub client_addr: Ipv4Addr,
    pub vip: Ipv4Addr,
    /// `dgr<pid>-<n>-`: names this rehearsal's namespaces (and its agent's pins).
    pub prefix: String,
    next_pod: u32,
    /// Endpoints now in the Service, in insertion order.
    endpoints: Vec<Ipv4Addr>,
    service_port: u16,
    /// Whether the PREROUTING jump to the Service chain exists.
    service_ready: bool,
    pub pods: BTreeMap<String, SimPod>,
}

impl Node {
    /// Makes the node and client namespaces and the empty Service.
    pub async fn create(service_port: u16) -> Result<Self, NodeError> {
        reap_stale().await;
        let block = AddressBlock::claim()?;
        // Unique per process and per rehearsal in it: `dgr<pid>-<n>-`.
        let n = NEXT_REHEARSAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("{NETNS_PREFIX}{}-{n}-", std::process::id());
        let node = Netns::create(format!("{prefix}node")).await?;
        let client = Netns::create(format!("{prefix}client")).await?;
        let (node_side, client_addr, vip) = (block.addr(1), block.addr(2), block.addr(5));
        wire(&node, "client0", node_side, &client, client_addr).await?;
        node.sysctl("net.ipv4.ip_forward", "1").await?;
        pod_network_sink(&node, block.addr(0), vip).await?;
        // A load generator opening thousands of connections a second needs its ports back.
        client.sysctl("net.ipv4.tcp_tw_reuse", "1").await?;
        client
            .sysctl("net.ipv4.ip_local_port_range", "1024 65000")
            .await?;
        let node = Self {
            block,
            node,
            client,
            client_addr,
            vip,
            prefix,
            next_pod: 0,
            endpoints: Vec::new(),
            service_port,
            service_ready: false,
            pods: BTreeMap::new(),
        };
        let mut node = node;
        node.write_service().await?;
        node.service_ready = true;
        // Conntrack is live now (the NAT rules use it): keep closed connections' entries short,
        // so thousands of new connections a second do not fill the table.
        node.node
            .sysctl("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "10")
            .await?;
        Ok(node)
    }

    /// The Service address clients use.
    #[must_use]
    pub fn service(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.vip, SERVICE_PORT))
    }

    /// Rewrites the Service chain atomically (iptables-restore), as kube-proxy does: endpoint i of
    /// n is chosen with probability 1/(n-i), which spreads new connections evenly.
    async fn write_service(&self) -> Result<(), NodeError> {
        use std::fmt::Write as _;
        let mut rules = String::from("*nat\n:DG-SVC - [0:0]\n");
        let n = self.endpoints.len();
        for (i, ep) in self.endpoints.iter().enumerate() {
            let target = format!("-p tcp -j DNAT --to-destination {ep}:{}", self.service_port);
            if i + 1 < n {
                let probability = 1.0 / f64::from(u32::try_from(n - i).unwrap_or(u32::MAX));
                let _ = writeln!(
                    rules,
                    "-A DG-SVC -m statistic --mode random --probability {probability:.11} {target}"
                );
            } else {
                let _ = writeln!(rules, "-A DG-SVC {target}");
            }
        }
        if !self.service_ready {
            // The jump into the Service chain is written once; later rewrites keep it. With no
            // endpoints nothing is DNATed and the node answers "unreachable", as a Service
            // without endpoints does.
            let _ = writeln!(
                rules,
                "-A PREROUTING -d {}/32 -p tcp --dport {SERVICE_PORT} -j DG-SVC",
                self.vip
            );
        }
        rules.push_str("COMMIT\n");
        self.node
            .exec_with_input("iptables-restore", &["--noflush"], Some(&rules))
            .await
    }

    /// Makes a pod's namespace and address (no process yet).
    pub async fn add_pod(&mut self, name: &str) -> Result<&SimPod, NodeError> {
        if self.next_pod >= MAX_PODS {
            return Err(NodeError::OutOfAddresses);
        }
        let index = self.next_pod;
        self.next_pod += 1;
        let (node_side, pod_addr) = (
            self.block.addr(8 + 4 * index + 1),
            self.block.addr(8 + 4 * index + 2),
        );
        let netns = Netns::create(format!("{}{name}", self.prefix)).await?;
        let veth = format!("pod{index}");
        wire(&self.node, &veth, node_side, &netns, pod_addr).await?;
        let pod = SimPod {
            name: name.to_owned(),
            addr: pod_addr,
            veth,
            netns: Some(netns),
            process: None,
            pid: None,
        };
        self.pods.insert(name.to_owned(), pod);
        Ok(&self.pods[name])
    }

    /// Starts the pod's process inside its namespace, in a process group of its own.
    pub fn start_pod(&mut self, name: &str, command: &PodCommand) -> Result<u32, NodeError> {
        let pod = self.pods.get_mut(name).expect("pod was added");
        let netns = pod.netns.as_ref().expect("pod has a namespace").open()?;
        let port = command.port.to_string();
        let argv: Vec<String> = command
            .argv
            .iter()
            .map(|a| a.replace("{port}", &port))
            .collect();
        let log_path = command.log_dir.join(format!("{name}.log"));
        let log = File::create(&log_path)
            .map_err(io_error(format!("creating {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io_error(format!("opening {}", log_path.display())))?;
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env("PORT", &port)
            .env("POD_NAME", name)
            .env("POD_IP", pod.addr.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        // SAFETY: between fork and exec only async-signal-safe calls: setns(2) on an fd that
        // stays open in the parent until spawn returns, and prctl(2).
        unsafe {
            cmd.pre_exec(move || {
                die_with_parent()?;
                setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| NodeError::Spawn {
                program: argv[0].clone(),
                source,
            })?;
        let pid = child.id().unwrap_or_default();
        pod.pid = Some(pid);
        pod.process = Some(child);
        Ok(pid)
    }

    /// Puts the pod into the Service's endpoints.
    pub async fn add_endpoint(&mut self, name: &str) -> Result<(), NodeError> {
        let addr = self.pods[name].addr;
        if !self.endpoints.contains(&addr) {
            self.endpoints.push(addr);
            self.write_service().await?;
        }
        Ok(())
    }

    /// Takes the pod out of the Service's endpoints (established connections stay, as with
    /// kube-proxy: conntrack keeps them going to the pod).
    pub async fn remove_endpoint(&mut self, name: &str) -> Result<(), NodeError> {
        let addr = self.pods[name].addr;
        if self.endpoints.contains(&addr) {
            self.endpoints.retain(|a| *a != addr);
            self.write_service().await?;
        }
        Ok(())
    }

    /// Removes a pod's namespace and its node-side veth.
    pub fn remove_pod(&mut self, name: &str) {
        if let Some(pod) = self.pods.get_mut(name) {
            pod.remove();
            tracing::debug!(pod = %name, veth = %pod.veth, "pod namespace removed");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Pods first (their processes, then namespaces), then the client and node namespaces.
        self.pods.clear();
    }
}

/// How long the kubelet waits after the last process exits before the sandbox goes.
pub const SANDBOX_TEARDOWN: Duration = Duration::from_millis(500);

/// In a child between fork and exec: the child gets SIGKILL when the rehearsal's thread that
/// started it ends, so that a rehearsal killed outright (SIGKILL, which it cannot clean up
/// after) leaves no pod process or `conntrack` running. The children are started from the
/// runtime's worker threads, which live as long as the rehearsal. Async-signal-safe: prctl(2)
/// only.
pub(super) fn die_with_parent() -> std::io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
}
