//! Loads the kernel programs, hands them the tracepoint offsets of this kernel, attaches them, and
//! gives typed access to their maps.
//!
//! Maps and links are pinned under a bpffs directory (default `/sys/fs/bpf/draingate`): when the
//! agent stops, the programs keep counting into the pinned maps, and the next agent picks both up,
//! so a restart loses no counts and no open-connection state.
//!
//! This file is [`KernelProbes`]: loading and attaching, then one short method per map access
//! the agent makes. The rest is in submodules: the programs' hooks and the record fields they
//! read (`hooks`), the errors and how a kernel refusal is told apart (`error`), the pin
//! directory's lock and layout check (`pins`), the address table (`addr_table`), the reset
//! program's TC filters (`reset_filter`), the summed counters (`totals`) and the benchmark's
//! floor (`floor`).

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
        TracePoint,
        links::{FdLink, PinnedLink},
        tc::{TcAttachType, TcHandle},
        trace_point::TracePointLinkId,
    },
    util::nr_cpus,
};
use draingate_common::{
    AddrKey, LossCounters, MAP_LAYOUT, MAX_SLOTS, SOCKET_BUCKETS, SlotCounters,
};

use crate::tracefs::{self, TracepointFormat};

mod addr_table;
mod error;
mod floor;
mod hooks;
mod pins;
mod reset_filter;
mod totals;

pub use addr_table::MAX_NODE_ADDRS;
use addr_table::{AddrTableValue, build_addr_table};
pub use error::LoaderError;
use error::{attach_error, classify, load_error, verifier_error};
pub use floor::{FLOOR_OBJECT, FloorProbe, TcFloor};
use hooks::{ABSENT, HOOKS, Hook, Optional, Required, SEND_RESET, kernel_release};
pub use hooks::{MIN_KERNEL, ResetSource};
use pins::{check_pinned_layout, lock_pin_dir};
use reset_filter::{
    CLIENT_PROGRAM, PACKET_PROGRAM, TC_PRIORITY, attach_packet_program, classifier,
    detach_packet_filters, has_peer, interfaces, tc_handle,
};
pub use totals::SlotTotals;

/// The eBPF object built by `build.rs`, embedded so the binary is self-contained. The
/// benchmark's empty programs are another object, not embedded ([`FLOOR_OBJECT`]).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/draingate"));

/// A random, non-zero seed for the reset table's hash, from the standard library's randomly
/// keyed hasher (seeded by the OS).
fn reset_seed() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        .max(1)
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
    /// The interfaces the packet program is attached to, by network namespace inode and
    /// interface index.
    tc_attached: BTreeSet<(u64, u32, bool)>,
    /// The packet program's filter handle (see [`tc_handle`]).
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
        let resets_from_packets = u64::from(reset_source == ResetSource::Packets);
        loader.override_global("RESETS_FROM_PACKETS", &resets_from_packets, true);
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

        // On every kernel: they read the HTTP responses pods send and the requests clients send
        // them (and, before 6.10, the resets pods send).
        for name in [PACKET_PROGRAM, CLIENT_PROGRAM] {
            classifier(&mut ebpf, name)?.load().map_err(|err| {
                classify(err, "load the TC programs (CAP_NET_ADMIN)", |source| {
                    verifier_error(name, source).unwrap_or_else(|other| LoaderError::Tc {
                        interface: String::new(),
                        source: Box::new(other),
                    })
                })
            })?;
            loaded_programs.push(name);
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
    /// its packet program's TC filters (found by their handle, so no one else's) on every
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
        let mut removed = detach_packet_filters(handle);
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
            removed += crate::netns::run_in(&file, || detach_packet_filters(handle)).unwrap_or(0);
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

    /// Attaches the packet program `pod_egress` (HTTP responses, and resets where
    /// [`ResetSource::Packets`]) to every interface but loopback of the network namespace at
    /// `netns` (a pod's: local mode), on egress, where the pod's packets leave it. Interfaces it
    /// is on already are skipped; returns how many were new.
    pub fn watch_pod_interfaces(&mut self, netns: &Path) -> Result<usize, LoaderError> {
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
        let ebpf = &mut self.ebpf;
        let attached = &mut self.tc_attached;
        crate::netns::run_in(&file, || {
            let interfaces = interfaces(|name| name != "lo");
            let new = attach_packet_program(
                classifier(ebpf, PACKET_PROGRAM)?,
                handle,
                inode,
                &interfaces,
                TcAttachType::Egress,
                attached,
            )?;
            attach_packet_program(
                classifier(ebpf, CLIENT_PROGRAM)?,
                handle,
                inode,
                &interfaces,
                TcAttachType::Ingress,
                attached,
            )?;
            Ok(new)
        })
        .map_err(|source| LoaderError::Netns {
            path: netns.to_owned(),
            source,
        })?
    }

    /// Attaches the packet program `pod_egress` to the node's side of every pod interface in
    /// the agent's own network namespace (Kubernetes mode, `hostNetwork`): each interface with a
    /// peer (a veth), on ingress, where the pod's packets arrive. The program only counts
    /// packets from a watched pod address. Returns how many were new.
    pub fn watch_node_interfaces(&mut self) -> Result<usize, LoaderError> {
        let inode = std::fs::metadata("/proc/self/ns/net")
            .map_or(0, |meta| std::os::unix::fs::MetadataExt::ino(&meta));
        let interfaces = interfaces(has_peer);
        let new = attach_packet_program(
            classifier(&mut self.ebpf, PACKET_PROGRAM)?,
            self.tc_handle,
            inode,
            &interfaces,
            TcAttachType::Ingress,
            &mut self.tc_attached,
        )?;
        // What reaches the pod leaves the node's side of its interface.
        attach_packet_program(
            classifier(&mut self.ebpf, CLIENT_PROGRAM)?,
            self.tc_handle,
            inode,
            &interfaces,
            TcAttachType::Egress,
            &mut self.tc_attached,
        )?;
        Ok(new)
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

    /// Runs of this agent's programs the kernel skipped: a tracing program does not run while
    /// another BPF program, or a `bpf()` map syscall (user space reading the counters), holds
    /// the CPU's `bpf_prog_active`, which interrupts on that CPU (the receive path's TCP
    /// transitions and resets) meet. Kernels count the skips from 6.7 on (`recursion_misses`
    /// in each program's fdinfo); before, this is 0 and such skips go unseen.
    #[must_use]
    pub fn skipped_runs(&self) -> u64 {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        self.ebpf
            .programs()
            .filter_map(|(_, program)| program.fd().ok())
            .filter_map(|fd| {
                let raw = fd.as_fd().as_raw_fd();
                std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).ok()
            })
            .map(|info| {
                info.lines()
                    .find_map(|line| line.strip_prefix("recursion_misses:"))
                    .and_then(|value| value.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// The ring buffer of notable events, for one reader. `None` after the first call.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }
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

#[cfg(test)]
mod tests;
