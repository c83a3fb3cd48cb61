//! The packet program's TC filters (`pod_egress`: the HTTP responses pods send, and the resets
//! on kernels whose `tcp:tcp_send_reset` misses refusals): on which interfaces, under which
//! handle, and how an uninstall finds them again.

use std::{collections::BTreeSet, io, path::Path};

use aya::{
    Ebpf,
    programs::{
        ProgramError, SchedClassifier,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcHandle},
    },
};

use super::{LoaderError, classify};

/// The TC program that reads what pods send: HTTP responses, the requests their FINs cut, and
/// resets on kernels before 6.10.
pub(super) const PACKET_PROGRAM: &str = "pod_egress";

/// The TC program that reads what clients send pods: HTTP requests, and clients' resets.
pub(super) const CLIENT_PROGRAM: &str = "pod_ingress";

/// The priority of the packet program's filter: the first, so that it sees every packet before
/// a CNI's filters (which may redirect it); it passes each on unchanged.
pub(super) const TC_PRIORITY: u16 = 1;

/// Its filter's handle: major `d6a7`, which no CNI uses, and a minor of the agent's pin
/// directory. A restarted agent (the same pin directory) finds its predecessor's filter by it
/// and replaces the program in place, so that no packet goes uncounted between the two; an agent
/// of other pins (a rehearsal's, a test's) adds its own filter beside it, and each counts into
/// its own maps (each filter passes the packet on to the next).
pub(super) fn tc_handle(pin_dir: &Path) -> TcHandle {
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
pub(super) fn classifier<'a>(
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
pub(super) fn interfaces(keep: impl Fn(&str) -> bool) -> Vec<(u32, String)> {
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
pub(super) fn has_peer(name: &str) -> bool {
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
pub(super) fn attach_packet_program(
    program: &mut SchedClassifier,
    handle: TcHandle,
    netns_inode: u64,
    interfaces: &[(u32, String)],
    direction: TcAttachType,
    attached: &mut BTreeSet<(u64, u32, bool)>,
) -> Result<usize, LoaderError> {
    let mut new = 0;
    let ingress = matches!(direction, TcAttachType::Ingress);
    for (index, name) in interfaces {
        if attached.contains(&(netns_inode, *index, ingress)) {
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
        attached.insert((netns_inode, *index, ingress));
        new += 1;
    }
    Ok(new)
}

/// Deletes the packet program's filter of `handle` from both directions of every interface of
/// the calling thread's network namespace; returns how many there were.
pub(super) fn detach_packet_filters(handle: TcHandle) -> usize {
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
pub(super) fn is_exists(err: &(dyn std::error::Error + 'static)) -> bool {
    has_errno(err, &[libc::EEXIST])
}

/// Whether `err` says the interface no longer exists (its namespace is being torn down).
pub(super) fn is_gone(err: &(dyn std::error::Error + 'static)) -> bool {
    has_errno(err, &[libc::ENODEV, libc::ENOENT, libc::ENXIO])
}

/// Whether an OS error with one of `errnos` is anywhere in `err`'s chain.
pub(super) fn has_errno(err: &(dyn std::error::Error + 'static), errnos: &[i32]) -> bool {
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
