//! Notable events for user space, through the [`EVENTS`] ring, and when they wake the agent.

use draingate_common::{ConnKey, EVENTS_RING_BYTES, NotableEvent};

use crate::{
    count::{loss, now},
    maps::EVENTS,
};

/// Unread bytes in [`EVENTS`] from which an event wakes the agent at once: a quarter of the
/// ring, so that a burst is read long before the ring is full.
const WAKE_AT_BYTES: u64 = EVENTS_RING_BYTES as u64 / 4;

/// How an event tells the agent it is there.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// At once, whatever the agent has not read yet: a termination signal (whose process user
    /// space may have to look up while it exists) and a pod process's exit, the turns of a
    /// pod's life that users and gates wait on. Both are rare, a few per pod.
    Now,
    /// With the next batch: the agent reads the ring every `EVENT_POLL` (100 ms) and in each
    /// resync anyway, and a quarter-full ring wakes it. A wakeup is an interrupt and a task
    /// wakeup inside the program's run (about 8 µs per event measured in a VM, where the
    /// interrupt exits to the hypervisor), which a storm of resets would otherwise pay for
    /// each one. Every event carries its kernel time and the counts are in the kernel's maps,
    /// so waiting changes no result.
    Batched,
}

pub(crate) fn emit(event: &NotableEvent, wake: Wake) {
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    const BPF_RB_AVAIL_DATA: u64 = 0;
    // Without a flag, the ring buffer wakes the reader only when it had read everything
    // before: behind batched events, that would be no wakeup at all.
    let flags = match wake {
        Wake::Now => BPF_RB_FORCE_WAKEUP,
        Wake::Batched if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKE_AT_BYTES => BPF_RB_FORCE_WAKEUP,
        Wake::Batched => BPF_RB_NO_WAKEUP,
    };
    if EVENTS.output::<NotableEvent>(event, flags).is_err() {
        loss(|l| l.ring_full += 1);
    }
}

/// An event of `kind` about pod `slot`'s connection `conn`, now, with its `reason` (a status,
/// an error code); the caller sets what else it knows (the request, the TCP state). Inlined:
/// the event is built in the caller's frame, which the callers keep off their own callers'
/// (the verifier of 6.1 adds up a chain of calls' frames: at most 512 bytes).
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "one event on the stack, in the one frame that emits it"
)]
pub(crate) fn conn_event(slot: u32, kind: u8, reason: u32, conn: &ConnKey) -> NotableEvent {
    NotableEvent {
        time_ns: now(),
        slot,
        reason,
        kind,
        local_port: conn.local_port,
        remote_port: conn.remote_port,
        local: conn.local,
        remote: conn.remote,
        ..NotableEvent::default()
    }
}
