//! draingate's kernel programs.
//!
//! Tracepoint record layouts change between kernels, so no field offset is compiled in: user space
//! reads each from tracefs (`events/<category>/<name>/format`) and sets the globals of [`record`]
//! before loading. Identity is by address (a map kept by user space) or by socket (the socket
//! table), never by the current task: state changes and resets often run in softirq context. The
//! one exception is process exit, which runs in the exiting task.
//!
//! One module per concern: the maps ([`maps`]), the records and their fields ([`record`]), the
//! counts and events ([`count`], [`event`]), the address table's lookups ([`addr`]), the socket
//! table ([`socket_table`]) and the reset table ([`reset_table`]), then one module per hook
//! family, which holds its programs: [`set_state`], [`tcp_reset`], [`tc`] and [`process`]. The
//! benchmark's empty programs are another object (`src/bin/floor.rs`).
#![no_std]
#![no_main]
// Rust's bpf target declares no compare-and-swap, so `AtomicU64` offers neither `fetch_add`
// nor `compare_exchange`; the intrinsics lower to the BPF atomic instructions (add, and the
// compare-and-exchange of kernels since 5.12).
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomics on bpf, whose Rust target declares no compare-and-swap"
)]

mod addr;
mod count;
mod event;
mod maps;
mod process;
mod record;
mod reset_table;
mod set_state;
mod socket_table;
mod tc;
mod tcp_reset;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any path that could reach here; it exists only to satisfy no_std.
    loop {}
}
