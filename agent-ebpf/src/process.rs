//! `signal:signal_generate` and `sched:sched_process_exit`: a pod process sent SIGTERM or
//! SIGKILL (its pod's termination window opens) and a pod process's exit, with the connections
//! it still held.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use draingate_common::{NO_SLOT, NotableEvent, event_kind, exit_layout, signal_layout};

use crate::{
    count::{held_now, now, run},
    event::{Wake, emit},
    maps::{POD_TASKS, WINDOWS},
    record::{
        ABSENT, EXIT_GROUP_DEAD, Fields, FixedLayout, Record, SIG_PID, SIG_SIG, SIGNAL_LIVE,
        TASK_SIGNAL, global,
    },
};

const SIGKILL: u32 = 9;
const SIGTERM: u32 = 15;

#[tracepoint]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the tracepoint macro fixes the signature"
)]
fn signal_generate(ctx: TracePointContext) -> u32 {
    run(Record::read(&ctx).and_then(|rec| try_signal_generate(&rec)))
}

/// The same program for the layout in [`signal_layout`]: most signals on a node (SIGCHLD,
/// the Go runtime's SIGURG, ...) cost it one load from the record.
#[tracepoint]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the tracepoint macro fixes the signature"
)]
fn signal_generate_fixed(ctx: TracePointContext) -> u32 {
    run(try_signal_generate(&FixedLayout(&ctx)))
}

fn try_signal_generate<F: Fields>(rec: &F) -> Result<(), i32> {
    let signal: u32 = rec.read(&SIG_SIG, signal_layout::SIG)?;
    if signal != SIGTERM && signal != SIGKILL {
        return Ok(());
    }
    let pid: u32 = rec.read(&SIG_PID, signal_layout::PID)?;
    // SAFETY: the value is copied out at once.
    let slot = unsafe { POD_TASKS.get(pid) }.copied().unwrap_or(NO_SLOT);
    let time_ns = now();
    // The window opens right here, so that every failure after the signal counts, whenever
    // user space reads. A racing second signal at worst moves the start a few ns later.
    if let Some(since) = WINDOWS.get_ptr_mut(slot)
        // SAFETY: a plain u64 map value.
        && unsafe { *since } == 0
    {
        // SAFETY: as above.
        unsafe { *since = time_ns };
    }
    // Sent for every SIGTERM/SIGKILL (rare): user space resolves processes it did not know yet.
    emit(
        &NotableEvent {
            time_ns,
            slot,
            pid,
            kind: event_kind::SIGNAL,
            signal: signal as u8,
            ..NotableEvent::default()
        },
        Wake::Now,
    );
    Ok(())
}

#[tracepoint]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the tracepoint macro fixes the signature"
)]
fn sched_process_exit(ctx: TracePointContext) -> u32 {
    if global(&EXIT_GROUP_DEAD) == ABSENT {
        return run(exit_by_live_count());
    }
    run(Record::read(&ctx).and_then(|rec| try_sched_process_exit(&rec)))
}

/// Process exit on kernels whose record has no `group_dead` (before 6.16): the exiting task's
/// `signal->live`, the count of its process's live threads, which `do_exit` decrements before
/// this tracepoint, read at the offsets user space took from the kernel's BTF. Two threads can
/// both find it at 0 (each decremented it before the later one got here): the one that removes
/// the process from [`POD_TASKS`] reports the exit, once.
fn exit_by_live_count() -> Result<(), i32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the value is copied out at once.
    let Some(&slot) = (unsafe { POD_TASKS.get(tgid) }) else {
        return Ok(());
    };
    // SAFETY: no preconditions; the pointer is only read through bpf_probe_read_kernel.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() } as usize;
    // SAFETY: bpf_probe_read_kernel reads kernel memory safely, failing on a bad address.
    let signal = unsafe {
        aya_ebpf::helpers::bpf_probe_read_kernel(
            (task + global(&TASK_SIGNAL) as usize) as *const u64,
        )
    }
    .map_err(|_| -1)?;
    // SAFETY: as above.
    let live = unsafe {
        aya_ebpf::helpers::bpf_probe_read_kernel(
            (signal as usize + global(&SIGNAL_LIVE) as usize) as *const i32,
        )
    }
    .map_err(|_| -1)?;
    if live != 0 || POD_TASKS.remove(tgid).is_err() {
        return Ok(());
    }
    emit_exit(slot, tgid);
    Ok(())
}

/// Reports the exit of process `tgid`, pod `slot`'s, with the connections its processes
/// still held.
fn emit_exit(slot: u32, tgid: u32) {
    emit(
        &NotableEvent {
            time_ns: now(),
            slot,
            pid: tgid,
            held: held_now(slot).min(u64::from(u32::MAX)) as u32,
            kind: event_kind::EXIT,
            ..NotableEvent::default()
        },
        Wake::Now,
    );
}

/// The same program for the layout in [`exit_layout`]: a thread's exit costs it one load.
#[tracepoint]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the tracepoint macro fixes the signature"
)]
fn sched_process_exit_fixed(ctx: TracePointContext) -> u32 {
    run(try_sched_process_exit(&FixedLayout(&ctx)))
}

fn try_sched_process_exit<F: Fields>(rec: &F) -> Result<(), i32> {
    // Only the last thread of a process matters.
    if rec.read::<u8>(&EXIT_GROUP_DEAD, exit_layout::GROUP_DEAD)? == 0 {
        return Ok(());
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the value is copied out at once.
    let Some(&slot) = (unsafe { POD_TASKS.get(tgid) }) else {
        return Ok(());
    };
    emit_exit(slot, tgid);
    Ok(())
}
