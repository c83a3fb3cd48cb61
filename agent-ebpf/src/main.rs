//! draingate's kernel programs.
//!
//! Tracepoint record layouts change between kernels, so no field offset is compiled in: user space
//! reads each from tracefs (`events/<category>/<name>/format`) and sets the globals below before
//! loading. Identity is by address (a map kept by user space), never by the current task: state
//! changes often run in softirq context.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
};
use draingate_common::{
    AddrKey, LossCounters, MAX_ADDRS, MAX_SLOTS, SlotCounters, TCP_STATE_COUNT,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;

// Offsets of the fields of `sock:inet_sock_set_state`, set by user space at load time.
#[unsafe(no_mangle)]
static SSS_NEWSTATE: u64 = 0;
#[unsafe(no_mangle)]
static SSS_FAMILY: u64 = 0;
#[unsafe(no_mangle)]
static SSS_PROTOCOL: u64 = 0;
#[unsafe(no_mangle)]
static SSS_SADDR: u64 = 0;
#[unsafe(no_mangle)]
static SSS_SADDR_V6: u64 = 0;

/// Address → pod slot, kept by user space.
#[map]
static POD_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_ADDRS, 0);

/// Per pod slot, per CPU counters.
#[map]
static SLOT_COUNTERS: PerCpuArray<SlotCounters> = PerCpuArray::with_max_entries(MAX_SLOTS, 0);

/// What could not be counted, per CPU (one entry).
#[map]
static LOSS: PerCpuArray<LossCounters> = PerCpuArray::with_max_entries(1, 0);

/// A global set by user space. The volatile read keeps the compiler from folding the zero
/// initialiser into the code; the loader rewrites `.rodata` before the verifier sees it.
#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "the reference is what makes the read volatile"
)]
fn global(value: &'static u64) -> usize {
    // SAFETY: `value` is a valid, aligned static.
    unsafe { core::ptr::read_volatile(value) as usize }
}

#[tracepoint]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the tracepoint macro fixes the signature"
)]
fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if try_inet_sock_set_state(&ctx).is_err() {
        count_read_error();
    }
    0
}

fn count_read_error() {
    if let Some(loss) = LOSS.get_ptr_mut(0) {
        // SAFETY: per-CPU entry, and programs do not migrate between CPUs while running.
        unsafe { (*loss).read_errors += 1 };
    }
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: offsets come from the tracepoint's own format description.
    let protocol: u16 = unsafe { ctx.read_at(global(&SSS_PROTOCOL))? };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    // SAFETY: as above.
    let family: u16 = unsafe { ctx.read_at(global(&SSS_FAMILY))? };
    let local = match family {
        // SAFETY: as above.
        AF_INET => AddrKey::v4(unsafe { ctx.read_at(global(&SSS_SADDR))? }),
        // SAFETY: as above.
        AF_INET6 => AddrKey::v6(unsafe { ctx.read_at(global(&SSS_SADDR_V6))? }),
        _ => return Ok(()),
    };
    // SAFETY: the map is only read here; a concurrent update by user space is atomic per entry.
    let Some(&slot) = (unsafe { POD_ADDRS.get(local) }) else {
        return Ok(());
    };
    // SAFETY: as above.
    // `int newstate`, read unsigned: real states are small and positive, and the mask below bounds
    // anything else.
    let new_state: u32 = unsafe { ctx.read_at(global(&SSS_NEWSTATE))? };
    if let Some(counters) = SLOT_COUNTERS.get_ptr_mut(slot) {
        // The mask bounds the index for the verifier; real states are 1..=12.
        let index = new_state as usize & (TCP_STATE_COUNT - 1);
        // SAFETY: per-CPU entry, and programs do not migrate between CPUs while running.
        unsafe { (*counters).state_entered[index] += 1 };
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any path that could reach here; it exists only to satisfy no_std.
    loop {}
}
