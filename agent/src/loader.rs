//! Loads the kernel programs, hands them the tracepoint offsets of this kernel, attaches them, and
//! gives typed access to their maps.
//!
//! Maps and links are pinned under a bpffs directory (default `/sys/fs/bpf/draingate`): when the
//! agent stops, the programs keep counting into the pinned maps, and the next agent picks both up,
//! so a restart loses no counts and no open-connection state.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues, RingBuf},
    programs::{
        ProgramError, SchedClassifier, TracePoint,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcHandle},
        trace_point::TracePointLinkId,
    },
    util::nr_cpus,
};
use draingate_common::{
    ADDR_BUCKETS, ADDR_PROBE_BUCKETS, AddrBucket, AddrKey, LossCounters, MAP_LAYOUT, MAX_SLOTS,
    SOCKET_BUCKETS, SlotCounters, addr_home, addr_words,
};

use crate::tracefs::{self, TracefsError, TracepointFormat};

mod floor;

pub use floor::{FLOOR_OBJECT, FloorProbe, TcFloor};

/// The eBPF object built by `build.rs`, embedded so the binary is self-contained. The
/// benchmark's empty programs are another object, not embedded ([`FLOOR_OBJECT`]).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/draingate"));

/// Offset value the programs read as "this kernel has no such field".
const ABSENT: u64 = u64::MAX;

/// Whether a tracepoint field must exist on this kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    Required,
    /// Some kernels only (e.g. `tcp_send_reset.reason`, 6.10+; `tcp_receive_reset.family`);
    /// absent, the program takes the fact from elsewhere or leaves it unknown.
    Optional,
}

/// A field of a record layout a program is compiled against: its tracefs name, offset and size.
type LayoutField = (&'static str, usize, usize);

/// A field a program reads at an offset from tracefs: the program global that gets the
/// offset, the field's tracefs name, its size in bytes (a field of another size is another
/// layout, which the program cannot read), and whether it must exist.
type Global = (&'static str, &'static str, u64, Need);

/// A kernel program and the tracepoint it attaches to, with the record fields it reads: each
/// field's offset becomes the program global of the given name.
struct Hook {
    program: &'static str,
    category: &'static str,
    name: &'static str,
    globals: &'static [Global],
    /// The program compiled against one record layout (each field's name, offset and size),
    /// which reads the record in place: loaded instead where tracefs shows exactly that layout.
    fixed: Option<(&'static str, &'static [LayoutField])>,
}

use Need::{Optional, Required};

/// The hook of `tcp:tcp_send_reset`, which [`ResetSource`] may replace.
const SEND_RESET: &str = "tcp_send_reset";

const HOOKS: &[Hook] = &[
    Hook {
        program: "inet_sock_set_state",
        category: "sock",
        name: "inet_sock_set_state",
        globals: &[
            ("SSS_SKADDR", "skaddr", 8, Required),
            ("SSS_OLDSTATE", "oldstate", 4, Required),
            ("SSS_NEWSTATE", "newstate", 4, Required),
            ("SSS_SPORT", "sport", 2, Required),
            ("SSS_DPORT", "dport", 2, Required),
            ("SSS_FAMILY", "family", 2, Required),
            ("SSS_PROTOCOL", "protocol", 2, Required),
            ("SSS_SADDR", "saddr", 4, Required),
            ("SSS_DADDR", "daddr", 4, Required),
            ("SSS_SADDR_V6", "saddr_v6", 16, Required),
            ("SSS_DADDR_V6", "daddr_v6", 16, Required),
        ],
        fixed: Some((
            "inet_sock_set_state_fixed",
            &draingate_common::set_state_layout::FIELDS,
        )),
    },
    Hook {
        program: SEND_RESET,
        category: "tcp",
        name: "tcp_send_reset",
        // The layout of 6.10+, which fires for every reset the kernel sends, with or without a
        // socket; earlier kernels' records (4-byte addresses) come from a tracepoint that misses
        // refusals, and the packets are read instead (`ResetSource::Packets`).
        globals: &[
            ("RST_SKADDR", "skaddr", 8, Required),
            ("RST_STATE", "state", 4, Required),
            ("RST_REASON", "reason", 4, Optional),
            ("RST_SADDR", "saddr", 28, Required),
            ("RST_DADDR", "daddr", 28, Required),
        ],
        fixed: None,
    },
    Hook {
        program: "tcp_receive_reset",
        category: "tcp",
        name: "tcp_receive_reset",
        globals: &[
            ("RCV_SKADDR", "skaddr", 8, Required),
            ("RCV_SPORT", "sport", 2, Required),
            ("RCV_DPORT", "dport", 2, Required),
            // Absent on older kernels: the IPv6 fields hold IPv4 addresses mapped.
            ("RCV_FAMILY", "family", 2, Optional),
            ("RCV_SADDR", "saddr", 4, Required),
            ("RCV_DADDR", "daddr", 4, Required),
            ("RCV_SADDR_V6", "saddr_v6", 16, Required),
            ("RCV_DADDR_V6", "daddr_v6", 16, Required),
        ],
        fixed: None,
    },
    Hook {
        program: "signal_generate",
        category: "signal",
        name: "signal_generate",
        globals: &[
            ("SIG_SIG", "sig", 4, Required),
            ("SIG_PID", "pid", 4, Required),
        ],
        fixed: Some((
            "signal_generate_fixed",
            &draingate_common::signal_layout::FIELDS,
        )),
    },
    Hook {
        program: "sched_process_exit",
        category: "sched",
        name: "sched_process_exit",
        // 6.16+; before, the process's live thread count is read at offsets from BTF.
        globals: &[("EXIT_GROUP_DEAD", "group_dead", 1, Optional)],
        fixed: Some((
            "sched_process_exit_fixed",
            &draingate_common::exit_layout::FIELDS,
        )),
    },
];

/// Where the resets a pod sends are counted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetSource {
    /// `tcp:tcp_send_reset` (6.10+), which fires for every reset the kernel sends.
    Tracepoint,
    /// The packets leaving each pod, read by the TC program `pod_egress` on its interface:
    /// on kernels before 6.10, whose tracepoint misses every refusal.
    Packets,
}

/// The oldest kernel the programs load on: `bpf_map_lookup_percpu_elem` (5.19); BPF atomic
/// compare-and-exchange (5.12) and pinnable tracepoint links (5.15) come before it.
pub const MIN_KERNEL: (u32, u32) = (5, 19);

/// The running kernel's release (`uname -r`) and its major and minor version.
fn kernel_release() -> (String, Option<(u32, u32)>) {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    let version = match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Some((major, minor)),
        _ => None,
    };
    (release, version)
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(
        "not permitted to {action}: the agent needs CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (or \
         root) to load, attach and pin its tracepoint programs"
    )]
    PermissionDenied {
        action: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot prepare the pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "loading the eBPF object failed; if maps pinned by another draingate version are in the \
         way, remove them with `rm -r {pin_dir}`"
    )]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error(
        "cannot read the benchmark's eBPF object {path}: it is built with the agent (`cargo \
         build -p draingate`), and the benchmark runs on the machine that built it"
    )]
    FloorMissing {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("loading the benchmark's eBPF object {path} failed")]
    FloorLoad {
        path: &'static str,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("eBPF program `{0}` is missing from the object (build mismatch)")]
    MissingProgram(&'static str),
    #[error("eBPF map `{0}` is missing from the object (build mismatch)")]
    MissingMap(&'static str),
    #[error(
        "Linux {release} is too old for draingate: it needs {min_major}.{min_minor} or newer \
         (BPF helpers and links its programs use; tested on 6.1, 6.12 and 6.18)",
        min_major = MIN_KERNEL.0,
        min_minor = MIN_KERNEL.1
    )]
    KernelTooOld { release: String },
    #[error(
        "tracepoint {tracepoint} has field `{field}` of {size} bytes on this kernel, not the \
         {expected} bytes draingate reads: a record layout it does not know"
    )]
    FieldSize {
        tracepoint: String,
        field: &'static str,
        size: u64,
        expected: u64,
    },
    #[error(transparent)]
    Btf(#[from] crate::btf::BtfError),
    #[error("the kernel's verifier rejected program {program}: {first_line}")]
    Verifier {
        program: &'static str,
        first_line: String,
        /// The whole verifier log, for `RUST_LOG=debug`.
        log: String,
    },
    #[error(
        "another draingate agent{} holds {}: two agents on one pin directory would reset each \
         other's counts. Stop it, or give this one its own --pin-dir",
        holder.map_or_else(String::new, |pid| format!(" (pid {pid})")),
        pin_dir.display()
    )]
    PinDirInUse {
        pin_dir: PathBuf,
        holder: Option<u32>,
    },
    #[error("attaching the reset program to interface {interface} failed")]
    Tc {
        interface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("entering network namespace {path} failed")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("attaching program {program} to tracepoint {tracepoint} failed")]
    Attach {
        program: &'static str,
        tracepoint: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("pinning the link of {program} at {path} failed: {message}")]
    PinLink {
        program: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("eBPF map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("pod slot {slot} is out of range (at most {max})", max = MAX_SLOTS - 1)]
    SlotOutOfRange { slot: u32 },
    #[error(
        "address {addr} finds no free cell in the kernel's address table near its hash; it is \
         not watched"
    )]
    AddressTableFull { addr: IpAddr },
    #[error("waiting for running kernel programs to finish (membarrier) failed")]
    Membarrier(#[source] io::Error),
    #[error("reading this machine's possible CPUs failed")]
    PossibleCpus(#[source] io::Error),
    #[error("socket table buckets must be a power of two of at most {SOCKET_BUCKETS}, not {0}")]
    SocketBuckets(u32),
    #[error(
        "the maps pinned under {} have another layout ({}) than this agent's ({expected}): an \
         agent of another version pinned them. Stop every draingate agent on this node, then \
         `rm -r {}` (its counts are lost) and start this one",
        pin_dir.display(),
        pinned.map_or_else(|| "older".to_owned(), |v| v.to_string()),
        pin_dir.display()
    )]
    PinnedLayout {
        pin_dir: PathBuf,
        pinned: Option<u64>,
        expected: u64,
    },
}

/// Holds `pin_dir` for as long as the returned lock lives (an exclusive `flock` on the
/// directory; the kernel drops it when the process ends, however it ends). A second agent on
/// the same pins would zero slots the first still reads and turn its failing pods into passes:
/// it is refused, with the first one's pid.
fn lock_pin_dir(pin_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, LoaderError> {
    use std::os::unix::fs::MetadataExt as _;
    let dir = std::fs::File::open(pin_dir).map_err(|source| LoaderError::PinDir {
        path: pin_dir.to_owned(),
        source,
    })?;
    let inode = dir.metadata().map_or(0, |m| m.ino());
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                LoaderError::PinDirInUse {
                    pin_dir: pin_dir.to_owned(),
                    holder: lock_holder(inode),
                }
            } else {
                LoaderError::PinDir {
                    path: pin_dir.to_owned(),
                    source: errno.into(),
                }
            }
        },
    )
}

/// The pid holding an `flock` on inode `inode`, from `/proc/locks`
/// (`1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF`).
fn lock_holder(inode: u64) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (kind, pid, file) = (words.get(1)?, words.get(4)?, words.get(5)?);
        (*kind == "FLOCK" && file.rsplit(':').next()?.parse::<u64>().ok()? == inode)
            .then(|| pid.parse().ok())?
    })
}

/// Refuses maps pinned under `pin_dir` by an agent of another [`MAP_LAYOUT`]; nothing pinned
/// is fine.
fn check_pinned_layout(pin_dir: &Path) -> Result<(), LoaderError> {
    let pinned_gen = pin_dir.join("ADDR_GEN");
    if !pin_dir.join("SLOT_COUNTERS").exists() && !pinned_gen.exists() {
        return Ok(());
    }
    // Layouts before the stamp had a one-entry ADDR_GEN (or none): reading entry 1 fails.
    let pinned = MapData::from_pin(&pinned_gen)
        .ok()
        .and_then(|data| Array::<_, u64>::try_from(Map::Array(data)).ok())
        .and_then(|array| array.get(&1, 0).ok())
        .filter(|&layout| layout != 0);
    if pinned == Some(MAP_LAYOUT) {
        Ok(())
    } else {
        Err(LoaderError::PinnedLayout {
            pin_dir: pin_dir.to_owned(),
            pinned,
            expected: MAP_LAYOUT,
        })
    }
}

/// A random, non-zero seed for the reset table's hash, from the standard library's randomly
/// keyed hasher (seeded by the OS).
fn reset_seed() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        .max(1)
}

/// A pod slot's counters summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotTotals {
    pub accepted: u64,
    pub opened: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub refused: u64,
    pub failed_connects: u64,
    /// Connections in any state but LISTEN and CLOSE, now.
    pub open: u64,
    /// Boot-clock time of the last accepted connection, 0 when none.
    pub last_accept_ns: u64,
    /// Counted by the kernel only while the termination window was open.
    pub win_accepted: u64,
    pub win_resets_sent: u64,
    pub win_resets_received: u64,
    pub win_refused: u64,
    pub win_failed_connects: u64,
    /// Resets and refusals with the node's own addresses (kubelet probes): not errors.
    pub from_node: u64,
    pub win_from_node: u64,
}

impl SlotTotals {
    fn sum(per_cpu: &PerCpuValues<SlotCounters>) -> Self {
        let mut totals = Self::default();
        let (mut tracked, mut gone) = (0u64, 0u64);
        for cpu in per_cpu.iter() {
            totals.accepted += cpu.accepted;
            totals.opened += cpu.opened;
            totals.resets_sent += cpu.resets_sent;
            totals.resets_received += cpu.resets_received;
            totals.refused += cpu.refused;
            totals.failed_connects += cpu.failed_connects;
            totals.last_accept_ns = totals.last_accept_ns.max(cpu.last_accept_ns);
            totals.win_accepted += cpu.win_accepted;
            totals.win_resets_sent += cpu.win_resets_sent;
            totals.win_resets_received += cpu.win_resets_received;
            totals.win_refused += cpu.win_refused;
            totals.win_failed_connects += cpu.win_failed_connects;
            totals.from_node += cpu.from_node;
            totals.win_from_node += cpu.win_from_node;
            tracked = tracked.wrapping_add(cpu.sockets_tracked);
            // Sockets leave the table untracked, or closed after their process released them.
            gone = gone
                .wrapping_add(cpu.sockets_untracked)
                .wrapping_add(cpu.released_closed);
        }
        // Never negative unless a close was counted without its open (a bug); show 0 then.
        totals.open = tracked.saturating_sub(gone);
        totals
    }
}

/// Where the probes keep their pinned maps and links.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub pin_dir: PathBuf,
    /// Use the programs compiled against the usual record layouts (`inet_sock_set_state`,
    /// `signal_generate`, `sched_process_exit`) where tracefs shows exactly that layout (they
    /// read the record in place); otherwise, or when false, the ones that take every offset
    /// from tracefs and copy the record first.
    pub fixed_layout: bool,
    /// Buckets of the socket table the programs use (four sockets each): a power of two, at
    /// most (and by default) `SOCKET_BUCKETS`. Tests use a few to fill the table.
    pub socket_buckets: u32,
    /// Where resets pods send are counted from; `None` (the default): the tracepoint where
    /// this kernel's fires for every reset (6.10+), else the packets. Tests force the packets
    /// to prove both agree on a kernel that has both.
    pub reset_source: Option<ResetSource>,
    /// Tracepoint fields (`tracepoint name`, `field`) taken as absent, as older kernels lack
    /// them: tests run the programs' paths for those kernels on this one. Empty by default.
    pub hide_fields: Vec<(&'static str, &'static str)>,
}

impl ProbeConfig {
    /// The probes pinned under `pin_dir`, with the defaults otherwise.
    #[must_use]
    pub fn at(pin_dir: PathBuf) -> Self {
        Self {
            pin_dir,
            fixed_layout: true,
            socket_buckets: SOCKET_BUCKETS,
            reset_source: None,
            hide_fields: Vec::new(),
        }
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self::at(PathBuf::from(draingate_common::DEFAULT_PIN_DIR))
    }
}

/// The loaded and attached kernel programs and their maps. Dropping it leaves the programs
/// attached and the maps pinned (see the module documentation); [`KernelProbes::remove_pins`]
/// detaches and frees them.
pub struct KernelProbes {
    // Owns the programs; the maps were taken out of it below.
    ebpf: Ebpf,
    /// The interfaces the reset program is attached to, by network namespace inode and
    /// interface index ([`ResetSource::Packets`] only).
    tc_attached: BTreeSet<(u64, u32)>,
    /// The reset program's filter handle (see [`tc_handle`]).
    tc_handle: TcHandle,
    /// The pin directory, held for this agent's life (see [`lock_pin_dir`]).
    _pin_lock: nix::fcntl::Flock<std::fs::File>,
    _links: Vec<PinnedLink>,
    pod_addrs: HashMap<MapData, AddrKey, u32>,
    addr_table: Array<MapData, AddrTableValue>,
    addr_gen: Array<MapData, u64>,
    /// The watched addresses, as in `pod_addrs`; the address table is built from this.
    watched: BTreeMap<AddrKey, u32>,
    /// The node's own addresses (kubelet probes' sources), in the table under `NODE_SLOT`;
    /// not pinned: each agent sets them at its first resync.
    node_addrs: BTreeSet<AddrKey>,
    /// Whether `watched` or `node_addrs` changed since the address table was last built.
    addrs_changed: bool,
    pod_tasks: HashMap<MapData, u32, u32>,
    slot_counters: PerCpuArray<MapData, SlotCounters>,
    windows: Array<MapData, u64>,
    slot_ids: Array<MapData, draingate_common::SlotId>,
    loss: PerCpuArray<MapData, LossCounters>,
    events: Option<RingBuf<MapData>>,
    /// Whether the programs were already attached by an earlier agent (a restart).
    pub resumed: bool,
    /// Where the resets pods send are counted from on this kernel.
    pub reset_source: ResetSource,
    /// Every program this agent loaded, by name (`signal_generate_fixed`, ...); empty when it
    /// took over an earlier agent's.
    pub programs: Vec<&'static str>,
}

impl std::fmt::Debug for KernelProbes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelProbes")
            .field("resumed", &self.resumed)
            .finish_non_exhaustive()
    }
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> LoaderError {
    move |source| LoaderError::Map {
        map,
        source: Box::new(source),
    }
}

impl KernelProbes {
    /// Reads this kernel's tracepoint layouts, loads the programs with them, and attaches them,
    /// or takes over the programs, links and maps that an earlier agent pinned.
    pub fn load(config: &ProbeConfig) -> Result<Self, LoaderError> {
        let (release, version) = kernel_release();
        if version.is_some_and(|version| version < MIN_KERNEL) {
            return Err(LoaderError::KernelTooOld { release });
        }
        let root = tracefs::root()?;
        let mut offsets: Vec<(&'static str, u64)> = Vec::new();
        // The hooks attached, each with the program it loads.
        let mut programs: Vec<(&'static Hook, &'static str)> = Vec::new();
        let mut reset_source = ResetSource::Tracepoint;
        for hook in HOOKS {
            let mut format = TracepointFormat::read(&root, hook.category, hook.name)?;
            format.fields.retain(|field| {
                !config
                    .hide_fields
                    .iter()
                    .any(|&(hidden_in, hidden)| hidden_in == hook.name && hidden == field.name)
            });
            if hook.program == SEND_RESET
                && (config.reset_source == Some(ResetSource::Packets)
                    || !["saddr", "daddr"]
                        .iter()
                        .all(|name| format.field(name).is_some_and(|f| f.size == 28)))
            {
                reset_source = ResetSource::Packets;
                offsets.extend(hook.globals.iter().map(|&(global, ..)| (global, ABSENT)));
                continue;
            }
            programs.push((
                hook,
                match hook.fixed {
                    Some((fixed, layout)) if config.fixed_layout && format.has_layout(layout) => {
                        fixed
                    }
                    _ => hook.program,
                },
            ));
            for &(global, field, size, need) in hook.globals {
                let offset = match (format.field(field), need) {
                    (Some(found), _) if found.size == size => found.offset,
                    (Some(found), _) => {
                        return Err(LoaderError::FieldSize {
                            tracepoint: format.tracepoint.clone(),
                            field,
                            size: found.size,
                            expected: size,
                        });
                    }
                    (None, Optional) => ABSENT,
                    (None, Required) => return Err(format.offset(field).unwrap_err().into()),
                };
                offsets.push((global, offset));
            }
        }
        // No `group_dead` in the exit record (before 6.16): the programs read the exiting
        // process's live thread count at offsets from the kernel's BTF instead.
        if offsets.contains(&("EXIT_GROUP_DEAD", ABSENT)) {
            let btf = crate::btf::Btf::vmlinux()?;
            offsets.push(("TASK_SIGNAL", btf.member_offset("task_struct", "signal")?));
            offsets.push(("SIGNAL_LIVE", btf.member_offset("signal_struct", "live")?));
        }

        let links_dir = config.pin_dir.join("links");
        std::fs::create_dir_all(&links_dir).map_err(|source| {
            if source.kind() == io::ErrorKind::PermissionDenied {
                LoaderError::PermissionDenied {
                    action: "create the pin directory",
                    source: Box::new(source),
                }
            } else {
                LoaderError::PinDir {
                    path: links_dir.clone(),
                    source,
                }
            }
        })?;

        let pin_lock = lock_pin_dir(&config.pin_dir)?;
        check_pinned_layout(&config.pin_dir)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&config.pin_dir);
        for (global, offset) in &offsets {
            loader.override_global(global, offset, true);
        }
        // What `sched_process_exit` sums the per-CPU socket counts over.
        let possible_cpus = nr_cpus().map_err(|(_, err)| LoaderError::PossibleCpus(err))? as u64;
        loader.override_global("NR_CPUS", &possible_cpus, true);
        if !config.socket_buckets.is_power_of_two() || config.socket_buckets > SOCKET_BUCKETS {
            return Err(LoaderError::SocketBuckets(config.socket_buckets));
        }
        let socket_mask = u64::from(config.socket_buckets - 1);
        loader.override_global("SOCKET_MASK", &socket_mask, true);
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|err| {
            classify(err, "create eBPF maps", |source| LoaderError::Load {
                pin_dir: config.pin_dir.clone(),
                source: Box::new(source),
            })
        })?;
        // Stamp the layout at once, before anything can fail and leave the maps pinned unstamped.
        let mut addr_gen: Array<MapData, u64> = take_map(&mut ebpf, "ADDR_GEN")?;
        addr_gen
            .set(1, MAP_LAYOUT, 0)
            .map_err(map_err("ADDR_GEN"))?;
        // The reset table's seed: kept if these maps have one (their table was filled with it).
        let seed_index = draingate_common::RESET_SEED_INDEX;
        if addr_gen.get(&seed_index, 0).map_err(map_err("ADDR_GEN"))? == 0 {
            addr_gen
                .set(seed_index, reset_seed(), 0)
                .map_err(map_err("ADDR_GEN"))?;
        }

        let mut links = Vec::new();
        let mut resumed = 0;
        let mut loaded_programs = Vec::new();
        for &(hook, name) in &programs {
            let pin = links_dir.join(hook.program);
            if let Ok(link) = PinnedLink::from_pin(&pin) {
                // An earlier agent's program is still attached and counting into the same pinned
                // maps: keep it, so that no event is missed or counted twice.
                links.push(link);
                resumed += 1;
                continue;
            }
            tracing::debug!(hook = hook.program, program = name, "loading");
            loaded_programs.push(name);
            let (program, link_id) = load_and_attach(&mut ebpf, name, hook)?;
            let link = program
                .take_link(link_id)
                .map_err(|source| attach_error(hook, source))?;
            let pin_error = |message: String| LoaderError::PinLink {
                program: hook.program,
                path: pin.clone(),
                message,
            };
            let fd_link = FdLink::try_from(link).map_err(|err| pin_error(err.to_string()))?;
            links.push(
                fd_link
                    .pin(&pin)
                    .map_err(|err| pin_error(err.to_string()))?,
            );
        }

        if reset_source == ResetSource::Packets {
            classifier(&mut ebpf, RESET_PROGRAM)?
                .load()
                .map_err(|err| {
                    classify(err, "load eBPF programs", |source| {
                        verifier_error(RESET_PROGRAM, source).unwrap_or_else(|other| {
                            LoaderError::Tc {
                                interface: String::new(),
                                source: Box::new(other),
                            }
                        })
                    })
                })?;
            loaded_programs.push(RESET_PROGRAM);
        }

        let pod_addrs: HashMap<MapData, AddrKey, u32> = take_map(&mut ebpf, "POD_ADDRS")?;
        let watched = pod_addrs
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("POD_ADDRS"))?;
        let mut probes = Self {
            pod_addrs,
            addr_table: take_map(&mut ebpf, "ADDR_TABLE")?,
            addr_gen,
            watched,
            node_addrs: BTreeSet::new(),
            // Built afresh from the record: a table pinned by an older agent may predate it.
            addrs_changed: true,
            pod_tasks: take_map(&mut ebpf, "POD_TASKS")?,
            slot_counters: take_map(&mut ebpf, "SLOT_COUNTERS")?,
            windows: take_map(&mut ebpf, "WINDOWS")?,
            slot_ids: take_map(&mut ebpf, "SLOT_IDS")?,
            loss: take_map(&mut ebpf, "LOSS")?,
            events: Some(take_map(&mut ebpf, "EVENTS")?),
            ebpf,
            tc_attached: BTreeSet::new(),
            tc_handle: tc_handle(&config.pin_dir),
            _pin_lock: pin_lock,
            _links: links,
            resumed: resumed == programs.len(),
            reset_source,
            programs: loaded_programs,
        };
        probes.apply_addresses()?;
        Ok(probes)
    }

    /// Removes what an agent on `pin_dir` leaves behind when it stops, for good (an uninstall):
    /// its reset program's TC filters (found by their handle, so no one else's) on every
    /// interface of the agent's network namespace and of every other one on the host, then its
    /// pinned maps and links, which detaches its tracepoint programs. Refused while an agent
    /// holds the pins. Returns how many filters were removed.
    pub fn uninstall(pin_dir: &Path) -> Result<usize, LoaderError> {
        use std::os::unix::fs::MetadataExt as _;
        let _lock = if pin_dir.exists() {
            Some(lock_pin_dir(pin_dir)?)
        } else {
            None
        };
        let handle = tc_handle(pin_dir);
        let mut removed = detach_reset_filters(handle);
        let own = std::fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino());
        let mut seen = BTreeSet::from([own]);
        let named = std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|entry| entry.path());
        let held = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
            .map(|entry| entry.path().join("ns/net"));
        for path in named.chain(held) {
            let Ok(file) = std::fs::File::open(&path) else {
                continue;
            };
            if !file.metadata().is_ok_and(|m| seen.insert(m.ino())) {
                continue;
            }
            removed += crate::netns::run_in(&file, || detach_reset_filters(handle)).unwrap_or(0);
        }
        Self::remove_pins(pin_dir).map_err(|source| LoaderError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        Ok(removed)
    }

    /// Detaches the programs and frees the maps pinned under `pin_dir` (once no agent holds
    /// them). Missing pins are not an error.
    pub fn remove_pins(pin_dir: &Path) -> io::Result<()> {
        match std::fs::remove_dir_all(pin_dir) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Attaches the reset program ([`ResetSource::Packets`]) to every interface but loopback
    /// of the network namespace at `netns` (a pod's: local mode), on egress, where the pod's
    /// packets leave it. Interfaces it is on already are skipped; returns how many were new.
    /// Does nothing where the kernel's tracepoint counts resets.
    pub fn watch_pod_interfaces(&mut self, netns: &Path) -> Result<usize, LoaderError> {
        if self.reset_source != ResetSource::Packets {
            return Ok(0);
        }
        let file = match std::fs::File::open(netns) {
            Ok(file) => file,
            // The namespace went away since the inventory saw it: the pod is gone, and so are
            // its interfaces; nothing to attach to.
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(LoaderError::Netns {
                    path: netns.to_owned(),
                    source,
                });
            }
        };
        let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata().map_err(|source| {
            LoaderError::Netns {
                path: netns.to_owned(),
                source,
            }
        })?);
        let handle = self.tc_handle;
        let program = classifier(&mut self.ebpf, RESET_PROGRAM)?;
        let attached = &mut self.tc_attached;
        crate::netns::run_in(&file, || {
            let interfaces = interfaces(|name| name != "lo");
            attach_reset_program(
                program,
                handle,
                inode,
                &interfaces,
                TcAttachType::Egress,
                attached,
            )
        })
        .map_err(|source| LoaderError::Netns {
            path: netns.to_owned(),
            source,
        })?
    }

    /// Attaches the reset program ([`ResetSource::Packets`]) to the node's side of every pod
    /// interface in the agent's own network namespace (Kubernetes mode, `hostNetwork`): each
    /// interface with a peer (a veth), on ingress, where the pod's packets arrive. The program
    /// only counts packets from a watched pod address. Returns how many were new.
    pub fn watch_node_interfaces(&mut self) -> Result<usize, LoaderError> {
        if self.reset_source != ResetSource::Packets {
            return Ok(0);
        }
        let inode = std::fs::metadata("/proc/self/ns/net")
            .map_or(0, |meta| std::os::unix::fs::MetadataExt::ino(&meta));
        let program = classifier(&mut self.ebpf, RESET_PROGRAM)?;
        let interfaces = interfaces(has_peer);
        attach_reset_program(
            program,
            self.tc_handle,
            inode,
            &interfaces,
            TcAttachType::Ingress,
            &mut self.tc_attached,
        )
    }

    /// Counts sockets whose local address is `addr` under pod `slot`, from the next
    /// [`Self::apply_addresses`] on.
    pub fn watch(&mut self, addr: IpAddr, slot: u32) -> Result<(), LoaderError> {
        check_slot(slot)?;
        let key = AddrKey::from(addr);
        self.pod_addrs
            .insert(key, slot, 0)
            .map_err(map_err("POD_ADDRS"))?;
        if self.watched.insert(key, slot) != Some(slot) {
            self.addrs_changed = true;
        }
        Ok(())
    }

    /// Stops counting new sockets of `addr`, from the next [`Self::apply_addresses`] on. An
    /// address that was not watched is not an error.
    pub fn unwatch(&mut self, addr: IpAddr) -> Result<(), LoaderError> {
        let key = AddrKey::from(addr);
        match self.pod_addrs.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(map_err("POD_ADDRS")(source)),
        }
        if self.watched.remove(&key).is_some() {
            self.addrs_changed = true;
        }
        Ok(())
    }

    /// Sets the node's own addresses, from the next [`Self::apply_addresses`] on: resets and
    /// refusals between a pod and one of them (kubelet probes) count as `from_node`, not as
    /// the pod's errors. At most [`MAX_NODE_ADDRS`]; the rest are left out (and said).
    pub fn set_node_addresses(&mut self, addrs: &[IpAddr]) -> usize {
        let node: BTreeSet<AddrKey> = addrs
            .iter()
            .map(|addr| AddrKey::from(*addr))
            .take(MAX_NODE_ADDRS)
            .collect();
        if node != self.node_addrs {
            tracing::debug!(addresses = ?addrs, "the node's addresses changed");
            self.node_addrs = node;
            self.addrs_changed = true;
        }
        addrs.len().saturating_sub(MAX_NODE_ADDRS)
    }

    /// Hands the programs the addresses watched now, if they changed: builds the address table
    /// whole into the generation the programs are not reading, makes it current, and waits
    /// until no program still runs on the old one (so that the next change may rewrite it).
    /// One call per batch of changes: the wait is one RCU grace period (about 8 ms here).
    pub fn apply_addresses(&mut self) -> Result<(), LoaderError> {
        if !self.addrs_changed {
            return Ok(());
        }
        let table = build_addr_table(&self.watched, &self.node_addrs)?;
        let current = self.addr_gen.get(&0, 0).map_err(map_err("ADDR_GEN"))?;
        let next = current.wrapping_add(1);
        self.addr_table
            .set((next & 1) as u32, table, 0)
            .map_err(map_err("ADDR_TABLE"))?;
        self.addr_gen.set(0, next, 0).map_err(map_err("ADDR_GEN"))?;
        wait_for_running_programs()?;
        self.addrs_changed = false;
        Ok(())
    }

    /// The watched addresses and their slots (after a restart: what the last agent set).
    pub fn watched(&self) -> Result<Vec<(IpAddr, u32)>, LoaderError> {
        self.pod_addrs
            .iter()
            .map(|entry| {
                entry
                    .map(|(key, slot)| (IpAddr::from(key), slot))
                    .map_err(map_err("POD_ADDRS"))
            })
            .collect()
    }

    /// Reports the exit of process `pid` (a tgid) as pod `slot`'s.
    pub fn track_task(&mut self, pid: u32, slot: u32) -> Result<(), LoaderError> {
        check_slot(slot)?;
        self.pod_tasks
            .insert(pid, slot, 0)
            .map_err(map_err("POD_TASKS"))
    }

    /// Forgets process `pid`. A process that was not tracked is not an error.
    pub fn untrack_task(&mut self, pid: u32) -> Result<(), LoaderError> {
        match self.pod_tasks.remove(&pid) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(map_err("POD_TASKS")(source)),
        }
    }

    /// The tracked processes and their slots.
    pub fn tracked_tasks(&self) -> Result<Vec<(u32, u32)>, LoaderError> {
        self.pod_tasks
            .iter()
            .map(|entry| entry.map_err(map_err("POD_TASKS")))
            .collect()
    }

    /// The counters of pod `slot`, summed over CPUs.
    pub fn slot_totals(&self, slot: u32) -> Result<SlotTotals, LoaderError> {
        check_slot(slot)?;
        let per_cpu = self
            .slot_counters
            .get(&slot, 0)
            .map_err(map_err("SLOT_COUNTERS"))?;
        Ok(SlotTotals::sum(&per_cpu))
    }

    /// Zeroes pod `slot`'s counters, before the slot is given to a new pod.
    pub fn reset_slot(&mut self, slot: u32) -> Result<(), LoaderError> {
        check_slot(slot)?;
        let syscall = |call: &'static str| {
            move |io_error| {
                map_err("SLOT_COUNTERS")(MapError::SyscallError(aya::sys::SyscallError {
                    call,
                    io_error,
                }))
            }
        };
        let cpus = nr_cpus().map_err(|(_, err)| syscall("nr_cpus")(err))?;
        let zeros = PerCpuValues::try_from(vec![SlotCounters::default(); cpus])
            .map_err(syscall("per-cpu values"))?;
        self.slot_counters
            .set(slot, zeros, 0)
            .map_err(map_err("SLOT_COUNTERS"))?;
        self.slot_ids
            .set(slot, draingate_common::SlotId::default(), 0)
            .map_err(map_err("SLOT_IDS"))?;
        self.windows.set(slot, 0, 0).map_err(map_err("WINDOWS"))
    }

    /// Records pod `slot`'s identity in the pins (names longer than the record are cut), so
    /// that a later agent can name the pod if it goes away while no agent runs.
    pub fn set_slot_id(
        &mut self,
        slot: u32,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<(), LoaderError> {
        check_slot(slot)?;
        let id = draingate_common::SlotId {
            namespace: nul_padded(namespace),
            name: nul_padded(name),
            uid: nul_padded(uid),
        };
        self.slot_ids.set(slot, id, 0).map_err(map_err("SLOT_IDS"))
    }

    /// Pod `slot`'s identity as an agent recorded it (namespace, name, uid); `None` when none
    /// was.
    pub fn slot_id(&self, slot: u32) -> Result<Option<(String, String, String)>, LoaderError> {
        check_slot(slot)?;
        let id = self.slot_ids.get(&slot, 0).map_err(map_err("SLOT_IDS"))?;
        let text = |bytes: &[u8]| {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        };
        let (namespace, name, uid) = (text(&id.namespace), text(&id.name), text(&id.uid));
        Ok((!uid.is_empty()).then_some((namespace, name, uid)))
    }

    /// When pod `slot`'s termination window opened (boot clock), if it has.
    pub fn window_since(&self, slot: u32) -> Result<Option<u64>, LoaderError> {
        check_slot(slot)?;
        let since = self.windows.get(&slot, 0).map_err(map_err("WINDOWS"))?;
        Ok((since != 0).then_some(since))
    }

    /// Opens pod `slot`'s window at `boot_ns` unless it is open already (the kernel opens it
    /// itself on a signal to a process it knew; this is for processes it did not know yet).
    pub fn open_window(&mut self, slot: u32, boot_ns: u64) -> Result<(), LoaderError> {
        if self.window_since(slot)?.is_none() {
            self.windows
                .set(slot, boot_ns.max(1), 0)
                .map_err(map_err("WINDOWS"))?;
        }
        Ok(())
    }

    /// The `inet_sock_set_state` program this agent loaded (`inet_sock_set_state_fixed` or
    /// `inet_sock_set_state`); empty when it took over an earlier agent's.
    #[must_use]
    pub fn set_state_program(&self) -> &'static str {
        self.programs
            .iter()
            .copied()
            .find(|name| name.starts_with("inet_sock_set_state"))
            .unwrap_or("")
    }

    /// The seed of the reset table's hash (`draingate_common::conn_hash`), which the maps keep.
    pub fn reset_seed(&self) -> Result<u64, LoaderError> {
        self.addr_gen
            .get(&draingate_common::RESET_SEED_INDEX, 0)
            .map_err(map_err("ADDR_GEN"))
    }

    /// What the kernel programs could not count, summed over CPUs.
    pub fn loss(&self) -> Result<LossCounters, LoaderError> {
        let per_cpu = self.loss.get(&0, 0).map_err(map_err("LOSS"))?;
        let mut total = LossCounters::default();
        for cpu in per_cpu.iter() {
            total.read_errors += cpu.read_errors;
            total.socket_table_full += cpu.socket_table_full;
            total.ring_full += cpu.ring_full;
            total.reset_table_full += cpu.reset_table_full;
        }
        Ok(total)
    }

    /// The ring buffer of notable events, for one reader. `None` after the first call.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }
}

/// One generation of the kernel's address table, as user space writes it: the layout of
/// `draingate_common::AddrTable`.
type AddrTableValue = [AddrBucket; ADDR_BUCKETS as usize];

/// Most node addresses the address table holds beside the pods'.
pub const MAX_NODE_ADDRS: usize = 256;

/// Builds the address table for `watched` and the node's addresses (`node`, under
/// `NODE_SLOT`; a pod's address wins where they overlap): each address in the first bucket from
/// its home on with a free cell, and each home bucket records how many buckets its lookups
/// scan.
fn build_addr_table(
    watched: &BTreeMap<AddrKey, u32>,
    node: &BTreeSet<AddrKey>,
) -> Result<Box<AddrTableValue>, LoaderError> {
    let mut table: Box<AddrTableValue> = vec![AddrBucket::default(); ADDR_BUCKETS as usize]
        .into_boxed_slice()
        .try_into()
        .expect("ADDR_BUCKETS buckets");
    let mask = ADDR_BUCKETS - 1;
    let node = node
        .iter()
        .filter(|key| !watched.contains_key(key))
        .map(|key| (key, draingate_common::NODE_SLOT));
    for (key, slot) in watched.iter().map(|(key, &slot)| (key, slot)).chain(node) {
        let words = addr_words(key);
        if words == [0, 0] {
            // `::` marks an empty cell, and is no pod's address.
            continue;
        }
        let home = addr_home(words);
        let placed = (0..ADDR_PROBE_BUCKETS).find_map(|probe| {
            let bucket = &mut table[((home + probe) & mask) as usize];
            let cell = bucket.addr.iter().position(|a| *a == [0, 0])?;
            bucket.addr[cell] = words;
            bucket.slot[cell] = slot;
            Some(probe)
        });
        let Some(probe) = placed else {
            return Err(LoaderError::AddressTableFull {
                addr: IpAddr::from(*key),
            });
        };
        let home = &mut table[home as usize];
        home.probes = home.probes.max(probe + 1);
    }
    Ok(table)
}

/// Returns once every kernel program that was running has finished: `membarrier(2)`
/// `MEMBARRIER_CMD_GLOBAL` waits for an RCU grace period, and tracepoint programs run inside an
/// RCU read-side section. Kernels booted with `nohz_full` refuse that command; there the wait is
/// 100 ms, a thousand times the longest program run, but not a proof.
fn wait_for_running_programs() -> Result<(), LoaderError> {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    let done = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if done == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EINVAL) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "membarrier(MEMBARRIER_CMD_GLOBAL) is refused (nohz_full?); address table \
                 changes wait 100 ms for running programs instead"
            );
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        return Ok(());
    }
    Err(LoaderError::Membarrier(err))
}

fn check_slot(slot: u32) -> Result<(), LoaderError> {
    if slot >= MAX_SLOTS {
        return Err(LoaderError::SlotOutOfRange { slot });
    }
    Ok(())
}

/// `text` NUL-padded into `N` bytes, cut after the last whole character that fits.
fn nul_padded<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let mut len = text.len().min(N);
    while !text.is_char_boundary(len) {
        len -= 1;
    }
    out[..len].copy_from_slice(&text.as_bytes()[..len]);
    out
}

/// The TC program that counts the resets pods send on kernels before 6.10.
const RESET_PROGRAM: &str = "pod_egress";

/// The priority of the reset program's filter: the first, so that it sees every packet before
/// a CNI's filters (which may redirect it); it passes each on unchanged.
const TC_PRIORITY: u16 = 1;

/// Its filter's handle: major `d6a7`, which no CNI uses, and a minor of the agent's pin
/// directory. A restarted agent (the same pin directory) finds its predecessor's filter by it
/// and replaces the program in place, so that no packet goes uncounted between the two; an agent
/// of other pins (a rehearsal's, a test's) adds its own filter beside it, and each counts into
/// its own maps (each filter passes the packet on to the next).
fn tc_handle(pin_dir: &Path) -> TcHandle {
    // FNV-1a: stable across builds and runs, unlike the standard library's hasher.
    let hash = pin_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    TcHandle::new(0xd6a7, (hash % 0xfffe) as u16 + 1)
}

/// The object's TC program `name` (`pod_egress`, or the benchmark's `tc_floor`).
fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoaderError> {
    ebpf.program_mut(name)
        .ok_or(LoaderError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoaderError::Tc {
            interface: String::new(),
            source: Box::new(source),
        })
}

/// The interfaces of the calling thread's network namespace whose names `keep`.
fn interfaces(keep: impl Fn(&str) -> bool) -> Vec<(u32, String)> {
    nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .filter_map(|i| {
                    let name = i.name().to_str().ok()?;
                    keep(name).then(|| (i.index(), name.to_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether interface `name` of the agent's namespace has a peer (a veth, whose `iflink` is
/// the other end's index; other devices name themselves).
fn has_peer(name: &str) -> bool {
    let read = |file: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{name}/{file}"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
    };
    name != "lo" && matches!((read("ifindex"), read("iflink")), (Some(a), Some(b)) if a != b)
}

/// Attaches `program` to each of `interfaces` (of the namespace `netns_inode`, which the
/// calling thread is in) not in `attached` yet, replacing an earlier agent's program in place.
/// The filters are left behind when the agent stops: they keep counting into the pinned maps
/// until the next agent replaces them, and go with their interface.
fn attach_reset_program(
    program: &mut SchedClassifier,
    handle: TcHandle,
    netns_inode: u64,
    interfaces: &[(u32, String)],
    direction: TcAttachType,
    attached: &mut BTreeSet<(u64, u32)>,
) -> Result<usize, LoaderError> {
    let mut new = 0;
    for (index, name) in interfaces {
        if attached.contains(&(netns_inode, *index)) {
            continue;
        }
        let tc_error = |source: ProgramError| LoaderError::Tc {
            interface: name.clone(),
            source: Box::new(source),
        };
        match tc::qdisc_add_clsact(name) {
            Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
            Err(err) if is_exists(&err) => {}
            // The interface went away since it was listed (its pod is going): nothing to do.
            Err(err) if is_gone(&err) => continue,
            Err(err) => return Err(tc_error(ProgramError::from(err))),
        }
        let options = TcAttachOptions::Netlink(NlOptions {
            priority: TC_PRIORITY,
            handle,
            classid: None,
        });
        let link_id = match program.attach_with_options(name, direction, options) {
            Ok(link_id) => link_id,
            Err(err) if is_exists(&err) => {
                let link =
                    SchedClassifierLink::attached(name, direction, TC_PRIORITY, handle, None)
                        .map_err(|err| tc_error(err.into()))?;
                program.attach_to_link(link).map_err(tc_error)?
            }
            Err(err) if is_gone(&err) => continue,
            Err(err) => {
                return Err(classify(err, "attach TC programs", |source| {
                    tc_error(source)
                }));
            }
        };
        // Detached only with the interface or by the next agent: see above.
        std::mem::forget(program.take_link(link_id).map_err(tc_error)?);
        attached.insert((netns_inode, *index));
        new += 1;
    }
    Ok(new)
}

/// Deletes the reset program's filter of `handle` from both directions of every interface of
/// the calling thread's network namespace; returns how many there were.
fn detach_reset_filters(handle: TcHandle) -> usize {
    use aya::programs::links::Link as _;
    let mut removed = 0;
    for (_, name) in interfaces(|name| name != "lo") {
        for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
            if let Ok(link) =
                SchedClassifierLink::attached(&name, direction, TC_PRIORITY, handle, None)
                && link.detach().is_ok()
            {
                removed += 1;
            }
        }
    }
    removed
}

/// Whether `err` is the kernel's EEXIST: a filter at that priority and handle is there.
fn is_exists(err: &(dyn std::error::Error + 'static)) -> bool {
    has_errno(err, &[libc::EEXIST])
}

/// Whether `err` says the interface no longer exists (its namespace is being torn down).
fn is_gone(err: &(dyn std::error::Error + 'static)) -> bool {
    has_errno(err, &[libc::ENODEV, libc::ENOENT, libc::ENXIO])
}

/// Whether an OS error with one of `errnos` is anywhere in `err`'s chain.
fn has_errno(err: &(dyn std::error::Error + 'static), errnos: &[i32]) -> bool {
    let mut source = Some(err);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<io::Error>()
            && io
                .raw_os_error()
                .is_some_and(|errno| errnos.contains(&errno))
        {
            return true;
        }
        source = current.source();
    }
    false
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoaderError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoaderError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// Loads program `name` of the object and attaches it to `hook`'s tracepoint.
fn load_and_attach<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    hook: &Hook,
) -> Result<(&'a mut TracePoint, TracePointLinkId), LoaderError> {
    let program: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or(LoaderError::MissingProgram(name))?
        .try_into()
        .map_err(|source| attach_error(hook, source))?;
    program.load().map_err(|err| {
        classify(err, "load eBPF programs", |source| {
            load_error(name, hook, source)
        })
    })?;
    let link_id = program.attach(hook.category, hook.name).map_err(|err| {
        classify(err, "attach to tracepoints", |source| {
            attach_error(hook, source)
        })
    })?;
    Ok((program, link_id))
}

/// A program the kernel would not load: the verifier's rejection in one line (the whole log
/// at debug level), anything else as an attach error.
fn load_error(program: &'static str, hook: &Hook, source: ProgramError) -> LoaderError {
    verifier_error(program, source).unwrap_or_else(|other| attach_error(hook, other))
}

/// The verifier's rejection of `program` as [`LoaderError::Verifier`]; any other error back.
fn verifier_error(
    program: &'static str,
    source: ProgramError,
) -> Result<LoaderError, ProgramError> {
    match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            tracing::debug!(program, %io_error, "verifier log:\n{log}");
            Ok(LoaderError::Verifier {
                program,
                first_line: verifier_summary(&log, &io_error),
                log,
            })
        }
        other => Err(other),
    }
}

/// The verifier's reason for a rejection: the last line of its log that is not a statistic
/// (the log ends with the error, then the instruction and stack counts), or the error code.
fn verifier_summary(log: &str, io_error: &io::Error) -> String {
    log.lines()
        .map(str::trim)
        .rev()
        .find(|line| {
            !line.is_empty()
                && !line.starts_with("processed ")
                && !line.starts_with("verification time")
                && !line.starts_with("stack depth")
                && !line.starts_with("-- END PROG LOAD LOG --")
        })
        .map_or_else(|| io_error.to_string(), str::to_owned)
}

fn attach_error(hook: &Hook, source: ProgramError) -> LoaderError {
    LoaderError::Attach {
        program: hook.program,
        tracepoint: format!("{}:{}", hook.category, hook.name),
        source: Box::new(source),
    }
}

/// A kernel answer of EPERM anywhere in the error's chain means missing privileges, which
/// deserves its own message naming the capabilities. Anything else keeps its own error; EACCES
/// from a program load is the verifier rejecting the program, with its log.
fn classify<E>(err: E, action: &'static str, other: impl FnOnce(E) -> LoaderError) -> LoaderError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return LoaderError::PermissionDenied {
                action,
                source: Box::new(err),
            };
        }
        source = current.source();
    }
    other(err)
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
    };

    use draingate_common::{
        ADDR_BUCKET_CELLS, ADDR_BUCKETS, ADDR_PROBE_BUCKETS, AddrKey, MAX_ADDRS, addr_home,
        addr_words,
    };

    use super::{AddrTableValue, LoaderError, build_addr_table};

    /// The table of pod addresses only.
    fn build_addr_table_pods(
        watched: &BTreeMap<AddrKey, u32>,
    ) -> Result<Box<AddrTableValue>, LoaderError> {
        build_addr_table(watched, &std::collections::BTreeSet::new())
    }

    /// The programs' lookup (`pod_of` in the eBPF crate), step for step.
    fn lookup(table: &AddrTableValue, addr: IpAddr) -> Option<u32> {
        let words = addr_words(&AddrKey::from(addr));
        let home = addr_home(words);
        let probes = table[home as usize].probes.min(ADDR_PROBE_BUCKETS);
        (0..probes).find_map(|probe| {
            let bucket = &table[((home + probe) & (ADDR_BUCKETS - 1)) as usize];
            (0..ADDR_BUCKET_CELLS)
                .find(|&cell| bucket.addr[cell] == words)
                .map(|cell| bucket.slot[cell])
        })
    }

    fn watched(addrs: impl IntoIterator<Item = (IpAddr, u32)>) -> BTreeMap<AddrKey, u32> {
        addrs
            .into_iter()
            .map(|(addr, slot)| (AddrKey::from(addr), slot))
            .collect()
    }

    #[test]
    fn a_full_node_of_addresses_is_found_and_nothing_else() {
        // As many addresses as the kernel record holds: a pod CIDR's IPv4 addresses in a row
        // and as many IPv6 ones, which is what a dual-stack node hands out.
        let half = MAX_ADDRS / 2;
        let addrs: Vec<(IpAddr, u32)> = (0..half)
            .flat_map(|i| {
                let [_, _, c, d] = i.to_be_bytes();
                [
                    (IpAddr::V4(Ipv4Addr::new(10, 244, c, d)), i % 512),
                    (
                        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, i as u16)),
                        (i + 7) % 512,
                    ),
                ]
            })
            .collect();
        let table = build_addr_table_pods(&watched(addrs.iter().copied())).expect("all placed");
        for &(addr, slot) in &addrs {
            assert_eq!(lookup(&table, addr), Some(slot), "{addr}");
        }
        // Addresses next to the watched ones, and `::`, find nothing.
        for i in half..half + 4096 {
            let [_, _, c, d] = i.to_be_bytes();
            assert_eq!(
                lookup(&table, IpAddr::V4(Ipv4Addr::new(10, 245, c, d))),
                None
            );
        }
        assert_eq!(lookup(&table, IpAddr::V6(Ipv6Addr::UNSPECIFIED)), None);
    }

    #[test]
    fn slot_identities_are_nul_padded_and_cut_between_characters() {
        assert_eq!(super::nul_padded::<6>("web"), *b"web\0\0\0");
        // "é" is two bytes: the cut falls before it, not inside it.
        assert_eq!(super::nul_padded::<4>("abcé"), *b"abc\0");
        assert_eq!(super::nul_padded::<3>("abcdef"), *b"abc");
    }

    #[test]
    fn an_empty_table_finds_nothing_and_the_unspecified_address_is_never_stored() {
        let table = build_addr_table_pods(&watched([(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 3)]))
            .expect("built");
        assert!(table.iter().all(|b| b.probes == 0 && b.addr == [[0; 2]; 3]));
        assert_eq!(lookup(&table, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))), None);
    }

    #[test]
    fn addresses_that_share_a_home_spill_over_and_the_first_that_finds_no_cell_is_named() {
        // Addresses whose home is bucket 0: the table places them in buckets 0..8, three each.
        let colliding: Vec<IpAddr> = (0u32..)
            .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
            .filter(|addr| addr_home(addr_words(&AddrKey::from(*addr))) == 0)
            .take(ADDR_PROBE_BUCKETS as usize * ADDR_BUCKET_CELLS + 1)
            .collect();
        let (fit, over) = colliding.split_at(colliding.len() - 1);
        let table = build_addr_table_pods(&watched(fit.iter().map(|a| (*a, 9))))
            .expect("24 fit in 8 buckets");
        assert_eq!(table[0].probes, ADDR_PROBE_BUCKETS);
        for addr in fit {
            assert_eq!(lookup(&table, *addr), Some(9), "{addr}");
        }
        // The 25th cannot be placed within reach of a lookup: an error naming the address
        // (which one of the 25 that is depends on their order in the map).
        match build_addr_table_pods(&watched(colliding.iter().map(|a| (*a, 9)))) {
            Err(LoaderError::AddressTableFull { addr }) => {
                assert!(colliding.contains(&addr), "{addr}");
                assert_eq!(over.len(), 1);
            }
            other => panic!("expected AddressTableFull, got {:?}", other.map(|_| ())),
        }
    }
}
