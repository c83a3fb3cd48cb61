//! Loads the kernel programs, hands them the tracepoint offsets of this kernel, attaches them, and
//! gives typed access to their maps.

use std::{io, net::IpAddr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, TracePoint},
};
use draingate_common::{AddrKey, LossCounters, MAX_SLOTS, SlotCounters};

use crate::tracefs::{self, TracefsError, TracepointFormat};

/// The eBPF object built by `build.rs`, embedded so the binary is self-contained.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/draingate"));

/// A kernel program and the tracepoint it attaches to, with the record fields it reads: each
/// field's offset becomes the program global of the given name.
struct Hook {
    program: &'static str,
    category: &'static str,
    name: &'static str,
    globals: &'static [(&'static str, &'static str)],
}

const HOOKS: &[Hook] = &[Hook {
    program: "inet_sock_set_state",
    category: "sock",
    name: "inet_sock_set_state",
    globals: &[
        ("SSS_NEWSTATE", "newstate"),
        ("SSS_FAMILY", "family"),
        ("SSS_PROTOCOL", "protocol"),
        ("SSS_SADDR", "saddr"),
        ("SSS_SADDR_V6", "saddr_v6"),
    ],
}];

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(
        "not permitted to {action}: the agent needs CAP_BPF and CAP_PERFMON (or root) to load \
         and attach tracepoint programs"
    )]
    PermissionDenied {
        action: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("loading the eBPF object failed")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program `{0}` is missing from the object (build mismatch)")]
    MissingProgram(&'static str),
    #[error("eBPF map `{0}` is missing from the object (build mismatch)")]
    MissingMap(&'static str),
    #[error("attaching program {program} to tracepoint {tracepoint} failed")]
    Attach {
        program: &'static str,
        tracepoint: String,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("pod slot {slot} is out of range (at most {max})", max = MAX_SLOTS - 1)]
    SlotOutOfRange { slot: u32 },
}

/// The loaded and attached kernel programs and their maps. Dropping it detaches the programs.
pub struct KernelProbes {
    // Owns the programs and their links; the maps were taken out of it below.
    _ebpf: Ebpf,
    pod_addrs: HashMap<MapData, AddrKey, u32>,
    slot_counters: PerCpuArray<MapData, SlotCounters>,
    loss: PerCpuArray<MapData, LossCounters>,
}

impl std::fmt::Debug for KernelProbes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelProbes").finish_non_exhaustive()
    }
}

impl KernelProbes {
    /// Reads this kernel's tracepoint layouts, loads the programs with them and attaches them.
    pub fn load() -> Result<Self, LoaderError> {
        let root = tracefs::root()?;
        let mut offsets = Vec::new();
        for hook in HOOKS {
            let format = TracepointFormat::read(&root, hook.category, hook.name)?;
            for &(global, field) in hook.globals {
                offsets.push((global, format.offset(field)?));
            }
        }

        let mut loader = EbpfLoader::new();
        for (global, offset) in &offsets {
            loader.override_global(global, offset, true);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|err| classify(err, "create eBPF maps", LoaderError::Load))?;

        for hook in HOOKS {
            let program: &mut TracePoint = ebpf
                .program_mut(hook.program)
                .ok_or(LoaderError::MissingProgram(hook.program))?
                .try_into()
                .map_err(|source| attach_error(hook, source))?;
            program.load().map_err(|err| {
                classify(err, "load eBPF programs", |source| {
                    attach_error(hook, source)
                })
            })?;
            program.attach(hook.category, hook.name).map_err(|err| {
                classify(err, "attach to tracepoints", |source| {
                    attach_error(hook, source)
                })
            })?;
        }

        Ok(Self {
            pod_addrs: take_map(&mut ebpf, "POD_ADDRS")?,
            slot_counters: take_map(&mut ebpf, "SLOT_COUNTERS")?,
            loss: take_map(&mut ebpf, "LOSS")?,
            _ebpf: ebpf,
        })
    }

    /// Counts sockets whose local address is `addr` under pod `slot` from now on.
    pub fn watch(&mut self, addr: IpAddr, slot: u32) -> Result<(), LoaderError> {
        if slot >= MAX_SLOTS {
            return Err(LoaderError::SlotOutOfRange { slot });
        }
        self.pod_addrs
            .insert(AddrKey::from(addr), slot, 0)
            .map_err(|source| LoaderError::Map {
                map: "POD_ADDRS",
                source,
            })
    }

    /// Stops counting `addr`. An address that was not watched is not an error.
    pub fn unwatch(&mut self, addr: IpAddr) -> Result<(), LoaderError> {
        match self.pod_addrs.remove(&AddrKey::from(addr)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(LoaderError::Map {
                map: "POD_ADDRS",
                source,
            }),
        }
    }

    /// The counters of pod `slot`, summed over CPUs.
    pub fn slot_counters(&self, slot: u32) -> Result<SlotCounters, LoaderError> {
        if slot >= MAX_SLOTS {
            return Err(LoaderError::SlotOutOfRange { slot });
        }
        let per_cpu = self
            .slot_counters
            .get(&slot, 0)
            .map_err(|source| LoaderError::Map {
                map: "SLOT_COUNTERS",
                source,
            })?;
        let mut total = SlotCounters::default();
        for cpu in per_cpu.iter() {
            for (sum, value) in total.state_entered.iter_mut().zip(cpu.state_entered) {
                *sum += value;
            }
        }
        Ok(total)
    }

    /// What the kernel programs could not count, summed over CPUs.
    pub fn loss(&self) -> Result<LossCounters, LoaderError> {
        let per_cpu = self.loss.get(&0, 0).map_err(|source| LoaderError::Map {
            map: "LOSS",
            source,
        })?;
        Ok(LossCounters {
            read_errors: per_cpu.iter().map(|cpu| cpu.read_errors).sum(),
        })
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoaderError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoaderError::MissingMap(name))?;
    T::try_from(map).map_err(|source| LoaderError::Map { map: name, source })
}

fn attach_error(hook: &Hook, source: ProgramError) -> LoaderError {
    LoaderError::Attach {
        program: hook.program,
        tracepoint: format!("{}:{}", hook.category, hook.name),
        source,
    }
}

/// A kernel answer of EPERM or EACCES anywhere in the error's chain means missing privileges,
/// which deserves its own message naming the capabilities; anything else keeps its own error.
fn classify<E>(err: E, action: &'static str, other: impl FnOnce(E) -> LoaderError) -> LoaderError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
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
