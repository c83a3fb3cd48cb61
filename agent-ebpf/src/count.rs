//! What the programs count into the maps: per pod slot ([`count`], the socket gauges), what
//! could not be counted ([`loss`]), and the clock they stamp counts and events with.

use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use draingate_common::{LossCounters, SlotCounters};

use crate::{
    maps::{LOSS, SLOT_COUNTERS, WINDOWS},
    record::global,
};

pub(crate) fn now() -> u64 {
    // SAFETY: no preconditions. Boot time keeps counting during suspend, like wall time.
    unsafe { bpf_ktime_get_boot_ns() }
}

pub(crate) fn loss(update: impl FnOnce(&mut LossCounters)) {
    if let Some(loss) = LOSS.get_ptr_mut(0) {
        // SAFETY: per-CPU entry, and programs do not migrate between CPUs while running.
        update(unsafe { &mut *loss });
    }
}

/// Updates `slot`'s counters; `update` learns whether the termination window is open.
pub(crate) fn count(slot: u32, update: impl FnOnce(&mut SlotCounters, bool)) {
    let in_window = WINDOWS.get(slot).is_some_and(|&since| since != 0);
    if let Some(counters) = SLOT_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU entry, and programs do not migrate between CPUs while running.
        update(unsafe { &mut *counters }, in_window);
    }
}

/// How a socket moves through the socket table's counts (see [`SlotCounters`]).
#[derive(Clone, Copy)]
pub(crate) enum SocketCount {
    /// It entered the table.
    Tracked,
    /// It left the table (reached `CLOSE`) while its process still held it.
    Untracked,
    /// Its process closed it, or shut it down for sending.
    Released,
    /// It left the table after its process had released it.
    ReleasedClosed,
}

/// Counts a socket of `slot` moving as `how`, on this CPU: the gauges are differences of sums
/// over CPUs. Per CPU, so that no cache line bounces between CPUs (a shared gauge updated
/// atomically cost about 35 ns per run here).
pub(crate) fn count_socket(slot: u32, how: SocketCount) {
    if let Some(counters) = SLOT_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU entry, and programs do not migrate between CPUs while running.
        let counters = unsafe { &mut *counters };
        match how {
            SocketCount::Tracked => counters.sockets_tracked += 1,
            SocketCount::Untracked => counters.sockets_untracked += 1,
            SocketCount::Released => counters.sockets_released += 1,
            SocketCount::ReleasedClosed => counters.released_closed += 1,
        }
    }
}

/// Most CPUs [`held_now`] sums over; user space sets [`NR_CPUS`] to this machine's number of
/// possible CPUs.
const MAX_CPUS: u32 = 4096;

/// This machine's number of possible CPUs, set by user space at load time.
#[unsafe(no_mangle)]
static NR_CPUS: u64 = 0;

/// The connections `slot`'s processes hold now (tracked, and neither closed nor released): its
/// per-CPU socket counts summed over every CPU (rare: at a pod process's exit).
pub(crate) fn held_now(slot: u32) -> u64 {
    let cpus = global(&NR_CPUS).min(u64::from(MAX_CPUS)) as u32;
    let map = core::ptr::from_ref(&SLOT_COUNTERS)
        .cast_mut()
        .cast::<core::ffi::c_void>();
    let (mut tracked, mut gone) = (0u64, 0u64);
    for cpu in 0..MAX_CPUS {
        if cpu >= cpus {
            break;
        }
        // SAFETY: the map pointer is the map's definition, which the loader relocates; the
        // helper returns null for a CPU or key out of range.
        let counters = unsafe {
            aya_ebpf::helpers::bpf_map_lookup_percpu_elem(
                map,
                core::ptr::from_ref(&slot).cast(),
                cpu,
            )
        }
        .cast::<SlotCounters>();
        if counters.is_null() {
            continue;
        }
        // SAFETY: a per-CPU map value, read while another CPU may count into it: the totals
        // can be off by a socket in flight, never torn (aligned 64-bit loads).
        unsafe {
            tracked = tracked.wrapping_add(core::ptr::read_volatile(
                &raw const (*counters).sockets_tracked,
            ));
            gone = gone
                .wrapping_add(core::ptr::read_volatile(
                    &raw const (*counters).sockets_untracked,
                ))
                .wrapping_add(core::ptr::read_volatile(
                    &raw const (*counters).sockets_released,
                ));
        }
    }
    tracked.saturating_sub(gone)
}

/// `1` inside the window, `0` outside: added to the window counters.
pub(crate) fn w(in_window: bool) -> u64 {
    u64::from(in_window)
}

/// Runs a program body; a failed field read is counted, never silent.
pub(crate) fn run(result: Result<(), i32>) -> u32 {
    if result.is_err() {
        loss(|l| l.read_errors += 1);
    }
    0
}
