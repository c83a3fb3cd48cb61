//! What can go wrong loading and attaching the programs ([`LoaderError`]), and how a kernel's
//! refusal is told apart: missing privileges, the verifier's rejection, anything else.

use std::{io, net::IpAddr, path::PathBuf};

use aya::{maps::MapError, programs::ProgramError};
use draingate_common::{MAX_SLOTS, SOCKET_BUCKETS};

use super::{Hook, MIN_KERNEL};
use crate::tracefs::TracefsError;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(
        "not permitted to {action}: the agent needs CAP_BPF and CAP_PERFMON (or root) to load, \
         attach and pin its tracepoint programs, CAP_NET_ADMIN for its TC program (the HTTP \
         responses pods send, and their resets before 6.10), and a seccomp profile that lets bpf() and \
         perf_event_open() through (runtime default profiles refuse them without CAP_SYS_ADMIN \
         before containerd 1.6.9, Docker 23.0 and CRI-O 1.35.1: deploy/overlays/seccomp runs the \
         agent under its own profile)"
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
    #[error(
        "attaching the packet program (HTTP responses, resets) to interface {interface} failed"
    )]
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

/// A program the kernel would not load: the verifier's rejection in one line (the whole log
/// at debug level), anything else as an attach error.
pub(super) fn load_error(program: &'static str, hook: &Hook, source: ProgramError) -> LoaderError {
    verifier_error(program, source).unwrap_or_else(|other| attach_error(hook, other))
}

/// The verifier's rejection of `program` as [`LoaderError::Verifier`]; any other error back.
pub(super) fn verifier_error(
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
pub(super) fn verifier_summary(log: &str, io_error: &io::Error) -> String {
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

pub(super) fn attach_error(hook: &Hook, source: ProgramError) -> LoaderError {
    LoaderError::Attach {
        program: hook.program,
        tracepoint: format!("{}:{}", hook.category, hook.name),
        source: Box::new(source),
    }
}

/// A kernel answer of EPERM anywhere in the error's chain means missing privileges, which
/// deserves its own message naming the capabilities. Anything else keeps its own error; EACCES
/// from a program load is the verifier rejecting the program, with its log.
pub(super) fn classify<E>(
    err: E,
    action: &'static str,
    other: impl FnOnce(E) -> LoaderError,
) -> LoaderError
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
