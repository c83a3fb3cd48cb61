//! The benchmark's empty programs, an object of their own (`OUT_DIR/draingate-floor`) so that
//! the agent's object does not carry them: `cargo xtask bench` loads it from where the build put
//! it (`draingate::loader::FLOOR_OBJECT`) and attaches its programs beside the agent's, as the
//! floor under their kernel time.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{classifier, tracepoint},
    programs::{TcContext, TracePointContext},
};

/// `TC_ACT_UNSPEC`: the packet goes on to the next program or filter, as `pod_egress` passes
/// it.
const TC_ACT_UNSPEC: i32 = -1;

/// Does nothing: what one program run costs on this kernel before any work (the tracepoint's
/// call into BPF, and the BPF statistics' own clock reads). The agent never attaches it;
/// `cargo xtask bench` runs it alone on `sock:inet_sock_set_state` as the floor under the
/// programs' kernel time.
#[tracepoint]
fn floor(_ctx: TracePointContext) -> u32 {
    0
}

/// Does nothing but pass the packet on: what one run of a TC program costs on this kernel
/// before any work. The agent never attaches it; `cargo xtask bench` attaches it right after
/// `pod_egress` on the same interfaces, as the floor under that program's kernel time.
#[classifier]
fn tc_floor(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any path that could reach here; it exists only to satisfy no_std.
    loop {}
}
