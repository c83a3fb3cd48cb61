//! draingate's kernel programs.
//!
//! Tracepoint record layouts change between kernels, so no field offset is compiled in: user space
//! reads each from tracefs (`events/<category>/<name>/format`) and sets the globals below before
//! loading. Identity is by address (a map kept by user space) or by socket (the socket table),
//! never by the current task: state changes and resets often run in softirq context. The one
//! exception is process exit, which runs in the exiting task.
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

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_boot_ns},
    macros::{classifier, map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{TcContext, TracePointContext},
};
use draingate_common::{
    ADDR_BUCKET_CELLS, ADDR_BUCKETS, ADDR_PROBE_BUCKETS, AddrKey, AddrTable, ConnKey,
    EVENT_FROM_NODE, EVENTS_RING_BYTES, LossCounters, MAX_ADDRS, MAX_SLOTS, MAX_TASKS, NO_SLOT,
    NODE_SLOT, NotableEvent, RESET_BUCKET_CELLS, RESET_BUCKETS, RESET_SEED_INDEX, ResetBucket,
    SOCKET_BUCKET_CELLS, SOCKET_BUCKETS, SOCKET_PROBE_BUCKETS, SlotCounters, SlotId, SocketBucket,
    addr_home, addr_words, addr_words_v4, conn_hash, connect_failure, event_kind, exit_layout,
    reset_home, set_state_layout, signal_layout, socket_bucket, socket_home, tcp_state,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const SIGKILL: u32 = 9;
const SIGTERM: u32 = 15;
/// `BPF_F_MMAPABLE`: an array map whose values start on a page boundary, so that each 64-byte
/// bucket is one cache line (a plain array's values start 8-byte aligned, after its header, and
/// a bucket would straddle two).
const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Offset global value of a field this kernel does not have.
const ABSENT: u64 = u64::MAX;

/// Field offsets, set by user space at load time from tracefs.
macro_rules! offsets {
    ($($name:ident),* $(,)?) => {
        $(
            #[unsafe(no_mangle)]
            static $name: u64 = 0;
        )*
    };
}

offsets!(
    // sock:inet_sock_set_state
    SSS_SKADDR,
    SSS_OLDSTATE,
    SSS_NEWSTATE,
    SSS_SPORT,
    SSS_DPORT,
    SSS_FAMILY,
    SSS_PROTOCOL,
    SSS_SADDR,
    SSS_DADDR,
    SSS_SADDR_V6,
    SSS_DADDR_V6,
    // tcp:tcp_send_reset (saddr and daddr are sockaddr_in6-sized unions)
    RST_SKADDR,
    RST_STATE,
    RST_REASON,
    RST_SADDR,
    RST_DADDR,
    // tcp:tcp_receive_reset
    RCV_SKADDR,
    RCV_SPORT,
    RCV_DPORT,
    RCV_FAMILY,
    RCV_SADDR,
    RCV_DADDR,
    RCV_SADDR_V6,
    RCV_DADDR_V6,
    // signal:signal_generate
    SIG_SIG,
    SIG_PID,
    // sched:sched_process_exit (`group_dead` since 6.16)
    EXIT_GROUP_DEAD,
    // Kernel struct offsets from the kernel's own BTF, for kernels whose exit record has no
    // `group_dead`: `task_struct.signal` and `signal_struct.live`.
    TASK_SIGNAL,
    SIGNAL_LIVE,
);

/// Address → pod slot, kept by user space: the record of what is watched. The programs read
/// [`ADDR_TABLE`], which user space builds from it.
#[map]
static POD_ADDRS: HashMap<AddrKey, u32> = HashMap::pinned(MAX_ADDRS, 0);

/// Address → pod slot as the programs read it: two generations of [`AddrTable`], the current
/// one named by [`ADDR_GEN`] (its low bit).
#[map]
static ADDR_TABLE: Array<AddrTable> = Array::pinned(2, BPF_F_MMAPABLE);

/// Entry 0: the generation of [`ADDR_TABLE`] to read, counted up by user space at each
/// rebuild. Entry 1: the layout of the pinned maps ([`draingate_common::MAP_LAYOUT`]), written
/// by user space, so that an agent of another layout refuses the pins instead of misreading
/// them. Entry 2 ([`RESET_SEED_INDEX`]): the reset table's hash seed, written by user space.
#[map]
static ADDR_GEN: Array<u64> = Array::pinned(3, 0);

/// Process (tgid) → pod slot, kept by user space, for exit events.
#[map]
static POD_TASKS: HashMap<u32, u32> = HashMap::pinned(MAX_TASKS, 0);

/// Pod sockets not yet closed, by kernel socket address: the open-connection gauge's socket
/// table (see [`SocketBucket`]).
#[map]
static SOCKET_TABLE: Array<SocketBucket> = Array::pinned(SOCKET_BUCKETS, BPF_F_MMAPABLE);

/// 4-tuples reset lately, with when (see [`ResetBucket`]). A full bucket forgets its oldest
/// entry: that only risks counting a late repeat of it, never losing a first reset, and one
/// under a second old is counted (`LossCounters::reset_table_full`).
#[map]
static RESET_TABLE: Array<ResetBucket> = Array::pinned(RESET_BUCKETS, BPF_F_MMAPABLE);

/// Resets of one 4-tuple this close together are one failure (late segments of the connection
/// answered again); later ones are a new connection that reused the tuple (a client port picked
/// again) failing anew.
const RESET_REPEAT_NS: u64 = 1_000_000_000;

/// The low bit of a [`RESET_TABLE`] time marks a refusal (a reset for a segment that matched no
/// socket) rather than a reset of a connection. A refusal never hides a later refusal (a client
/// may connect from the same port again at once and be refused again: a new failure), only a
/// connection's reset that follows it within [`REFUSAL_RACE_NS`]: the reset of a connection
/// whose socket was just unhashed (a listener closing with connections in its accept queue)
/// while another CPU already answered the peer's next segment as matching no socket.
const REFUSAL_MARK: u64 = 1;

/// How soon after a refusal a reset of the same 4-tuple is that race, not a new failure.
const REFUSAL_RACE_NS: u64 = 10_000_000;

/// A [`RESET_TABLE`] time for a connection's reset (low bit clear).
fn reset_time(time_ns: u64) -> u64 {
    time_ns & !REFUSAL_MARK
}

/// Per pod slot, its pod's identity, kept by user space for its successors (see [`SlotId`]);
/// no program reads it.
#[map]
static SLOT_IDS: Array<SlotId> = Array::pinned(MAX_SLOTS, 0);

/// Per pod slot: when its termination window opened (boot-clock ns), 0 while none is open.
/// Opened here on SIGTERM/SIGKILL to a known pod process, or by user space.
#[map]
static WINDOWS: Array<u64> = Array::pinned(MAX_SLOTS, 0);

/// Per pod slot, per CPU counters.
#[map]
static SLOT_COUNTERS: PerCpuArray<SlotCounters> = PerCpuArray::pinned(MAX_SLOTS, 0);

/// What could not be counted, per CPU (one entry).
#[map]
static LOSS: PerCpuArray<LossCounters> = PerCpuArray::pinned(1, 0);

/// Notable events for user space.
#[map]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

/// A global set by user space. The volatile read keeps the compiler from folding the zero
/// initialiser into the code; the loader rewrites `.rodata` before the verifier sees it.
#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "the reference is what makes the read volatile"
)]
fn global(value: &'static u64) -> u64 {
    // SAFETY: `value` is a valid, aligned static.
    unsafe { core::ptr::read_volatile(value) }
}

/// Bytes of a tracepoint record copied at once: enough for every field the programs read on
/// kernels seen so far (the largest, `tcp_send_reset`, ends at 88).
const RECORD_BYTES: usize = 96;

/// A tracepoint record copied with one `bpf_probe_read_kernel` into a per-CPU scratch buffer
/// (the 512-byte stack is too small to hold it beside an event): one helper call per run instead
/// of one per field. (Reading the context directly is not possible: the verifier wants context
/// offsets as instruction immediates, and these are load-time globals.)
struct Record(&'static [u8; RECORD_BYTES]);

/// Per-CPU scratch space for [`Record`]; programs do not migrate or nest on a CPU while running.
#[map]
static SCRATCH: PerCpuArray<[u8; RECORD_BYTES]> = PerCpuArray::with_max_entries(1, 0);

impl Record {
    fn read(ctx: &TracePointContext) -> Result<Self, i32> {
        let buf = SCRATCH.get_ptr_mut(0).ok_or(-1)?;
        // SAFETY: the per-CPU buffer is ours for this run; bpf_probe_read_kernel fails cleanly if
        // the record is shorter than the copy.
        unsafe {
            aya_ebpf::helpers::bpf_probe_read_kernel_buf(
                ctx.as_ptr().cast::<u8>(),
                (&mut *buf).as_mut_slice(),
            )?;
            Ok(Self(&*buf))
        }
    }

    /// The field at the offset in `offset`; an offset beyond the copy is a read error.
    fn get<T: Copy>(&self, offset: &'static u64) -> Result<T, i32> {
        let offset = global(offset) as usize;
        if offset + size_of::<T>() > RECORD_BYTES {
            return Err(-1);
        }
        // SAFETY: bounds checked above; read_unaligned makes no alignment assumption.
        Ok(unsafe { self.0.as_ptr().add(offset).cast::<T>().read_unaligned() })
    }
}

fn now() -> u64 {
    // SAFETY: no preconditions. Boot time keeps counting during suspend, like wall time.
    unsafe { bpf_ktime_get_boot_ns() }
}

fn loss(update: impl FnOnce(&mut LossCounters)) {
    if let Some(loss) = LOSS.get_ptr_mut(0) {
        // SAFETY: per-CPU entry, and programs do not migrate between CPUs while running.
        update(unsafe { &mut *loss });
    }
}

/// Updates `slot`'s counters; `update` learns whether the termination window is open.
fn count(slot: u32, update: impl FnOnce(&mut SlotCounters, bool)) {
    let in_window = WINDOWS.get(slot).is_some_and(|&since| since != 0);
    if let Some(counters) = SLOT_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU entry, and programs do not migrate between CPUs while running.
        update(unsafe { &mut *counters }, in_window);
    }
}

/// How a socket moves through the socket table's counts (see [`SlotCounters`]).
#[derive(Clone, Copy)]
enum SocketCount {
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
fn count_socket(slot: u32, how: SocketCount) {
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

/// Whether a tracked socket's recorded state says its process released it.
fn released(state: u32) -> bool {
    matches!(state, tcp_state::FIN_WAIT1 | tcp_state::LAST_ACK)
}

/// Most CPUs [`held_now`] sums over; user space sets [`NR_CPUS`] to this machine's number of
/// possible CPUs.
const MAX_CPUS: u32 = 4096;

/// This machine's number of possible CPUs, set by user space at load time.
#[unsafe(no_mangle)]
static NR_CPUS: u64 = 0;

/// The connections `slot`'s processes hold now (tracked, and neither closed nor released): its
/// per-CPU socket counts summed over every CPU (rare: at a pod process's exit).
fn held_now(slot: u32) -> u64 {
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
fn w(in_window: bool) -> u64 {
    u64::from(in_window)
}

/// The pod slot of a watched address.
fn pod_of(addr: &AddrKey) -> Option<u32> {
    pod_of_words(addr_words(addr))
}

/// Whether `addr` is one of the node's own addresses (where kubelet probes come from).
fn is_node(addr: &AddrKey) -> bool {
    table_slot(addr_words(addr)) == Some(NODE_SLOT)
}

/// The pod slot of a watched address given as [`addr_words`]: a pod's, never the node's.
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "saves a BPF-to-BPF call and its return (through the return thunk of CPUs with \
              SRSO mitigations) at every connection start"
)]
fn pod_of_words(words: [u64; 2]) -> Option<u32> {
    table_slot(words).filter(|&slot| slot < MAX_SLOTS)
}

/// The address table's slot for an address given as [`addr_words`]: a pod's, or
/// [`NODE_SLOT`]. The kernel inlines both array lookups; a watched address costs one bucket (one
/// cache line) unless its home bucket overflowed when user space built the table.
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "inlined into `pod_of_words`, which every connection start runs"
)]
fn table_slot(words: [u64; 2]) -> Option<u32> {
    let generation = ADDR_GEN.get_ptr(0)?;
    // SAFETY: an aligned u64 map value; user space replaces it whole.
    let generation = unsafe { core::ptr::read_volatile(generation) };
    let table = ADDR_TABLE.get_ptr((generation & 1) as u32)?;
    let home = addr_home(words);
    let mask = ADDR_BUCKETS as usize - 1;
    // SAFETY: the generation being read is not written until every program that could have
    // started on it has finished (user space waits for that, see `AddrTable`); the masked index
    // is in bounds.
    let probes = unsafe { (*table).buckets[home as usize & mask].probes };
    for probe in 0..ADDR_PROBE_BUCKETS {
        if probe >= probes {
            return None;
        }
        // SAFETY: as above.
        let bucket = unsafe { &(*table).buckets[(home + probe) as usize & mask] };
        for index in 0..ADDR_BUCKET_CELLS {
            if bucket.addr[index] == words {
                return Some(bucket.slot[index]);
            }
        }
    }
    None
}

/// Unread bytes in [`EVENTS`] from which an event wakes the agent at once: a quarter of the
/// ring, so that a burst is read long before the ring is full.
const WAKE_AT_BYTES: u64 = EVENTS_RING_BYTES as u64 / 4;

/// How an event tells the agent it is there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
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

fn emit(event: &NotableEvent, wake: Wake) {
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

/// Runs a program body; a failed field read is counted, never silent.
fn run(result: Result<(), i32>) -> u32 {
    if result.is_err() {
        loss(|l| l.read_errors += 1);
    }
    0
}

/// Does nothing: what one program run costs on this kernel before any work (the tracepoint's
/// call into BPF, and the BPF statistics' own clock reads). The agent never attaches it;
/// `cargo xtask bench` runs it alone on `sock:inet_sock_set_state` as the floor under the
/// programs' kernel time.
#[tracepoint]
fn floor(_ctx: TracePointContext) -> u32 {
    0
}

/// A field of the `sock:inet_sock_set_state` record.
#[derive(Clone, Copy)]
enum Sss {
    Skaddr,
    OldState,
    NewState,
    Sport,
    Dport,
    Family,
    Protocol,
    Saddr,
    Daddr,
    SaddrV6,
    DaddrV6,
}

/// How a program reads the record's fields.
trait SetStateFields {
    fn field<T: Copy>(&self, field: Sss) -> Result<T, i32>;
}

impl SetStateFields for Record {
    fn field<T: Copy>(&self, field: Sss) -> Result<T, i32> {
        let offset = match field {
            Sss::Skaddr => &SSS_SKADDR,
            Sss::OldState => &SSS_OLDSTATE,
            Sss::NewState => &SSS_NEWSTATE,
            Sss::Sport => &SSS_SPORT,
            Sss::Dport => &SSS_DPORT,
            Sss::Family => &SSS_FAMILY,
            Sss::Protocol => &SSS_PROTOCOL,
            Sss::Saddr => &SSS_SADDR,
            Sss::Daddr => &SSS_DADDR,
            Sss::SaddrV6 => &SSS_SADDR_V6,
            Sss::DaddrV6 => &SSS_DADDR_V6,
        };
        Self::get(self, offset)
    }
}

/// A record read in place at the offsets of a layout compiled in ([`set_state_layout`],
/// [`signal_layout`], [`exit_layout`]): compile-time constants, which the verifier accepts for
/// context loads (an offset from a global it does not). No copy, no helper call.
struct FixedLayout<'a>(&'a TracePointContext);

impl SetStateFields for FixedLayout<'_> {
    // Inlined, the offset becomes an immediate of the load, which is what the verifier accepts.
    #[inline(always)]
    fn field<T: Copy>(&self, field: Sss) -> Result<T, i32> {
        use set_state_layout as l;
        self.at(match field {
            Sss::Skaddr => l::SKADDR,
            Sss::OldState => l::OLDSTATE,
            Sss::NewState => l::NEWSTATE,
            Sss::Sport => l::SPORT,
            Sss::Dport => l::DPORT,
            Sss::Family => l::FAMILY,
            Sss::Protocol => l::PROTOCOL,
            Sss::Saddr => l::SADDR,
            Sss::Daddr => l::DADDR,
            Sss::SaddrV6 => l::SADDR_V6,
            Sss::DaddrV6 => l::DADDR_V6,
        })
    }
}

impl FixedLayout<'_> {
    /// The field of `T`'s size at `offset`, a compile-time constant once inlined.
    #[inline(always)]
    #[expect(
        clippy::inline_always,
        reason = "inlined, the offset becomes an immediate of the load, the only form the \
                  verifier accepts for a context load"
    )]
    fn at<T: Copy>(&self, offset: usize) -> Result<T, i32> {
        #[expect(
            clippy::cast_ptr_alignment,
            reason = "the record is 8-byte aligned and each field aligned for its size"
        )]
        let load = |at: usize| -> u64 {
            // SAFETY: the loader attaches a fixed program only where tracefs shows its layout,
            // so the field is at this offset inside the record (aligned for its size); the
            // verifier checks the bounds. Volatile keeps each load whole, at an immediate
            // offset from the context, which is the only form the verifier accepts.
            unsafe {
                let at = self.0.as_ptr().cast::<u8>().add(at);
                match size_of::<T>() {
                    1 => u64::from(core::ptr::read_volatile(at)),
                    2 => u64::from(core::ptr::read_volatile(at.cast::<u16>())),
                    4 => u64::from(core::ptr::read_volatile(at.cast::<u32>())),
                    _ => core::ptr::read_volatile(at.cast::<u64>()),
                }
            }
        };
        let mut bytes = [0u8; 16];
        match size_of::<T>() {
            1 | 2 | 4 | 8 => bytes[..8].copy_from_slice(&load(offset).to_ne_bytes()),
            16 => {
                bytes[..8].copy_from_slice(&load(offset).to_ne_bytes());
                bytes[8..].copy_from_slice(&load(offset + 8).to_ne_bytes());
            }
            _ => return Err(-1),
        }
        // SAFETY: `bytes` holds at least `size_of::<T>()` bytes of the field, in memory order
        // (little-endian values keep their low bytes first), and every field type is plain data.
        Ok(unsafe { core::mem::transmute_copy(&bytes) })
    }
}

/// How the signal and exit programs read a record's field: at the offset tracefs gave
/// (`global`, from a copy of the record) or in place at the one the fixed program is compiled
/// for (`fixed`).
trait Fields {
    #[expect(
        clippy::trivially_copy_pass_by_ref,
        reason = "the reference is what makes the global's read volatile"
    )]
    fn read<T: Copy>(&self, global: &'static u64, fixed: usize) -> Result<T, i32>;
}

impl Fields for Record {
    fn read<T: Copy>(&self, global: &'static u64, _fixed: usize) -> Result<T, i32> {
        self.get(global)
    }
}

impl Fields for FixedLayout<'_> {
    #[inline(always)]
    #[expect(clippy::inline_always, reason = "as in `FixedLayout::at`")]
    fn read<T: Copy>(&self, _global: &'static u64, fixed: usize) -> Result<T, i32> {
        self.at(fixed)
    }
}

/// Offsets from tracefs, on any kernel: the record is copied once, then read from the copy.
#[tracepoint]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the tracepoint macro fixes the signature"
)]
fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    run(Record::read(&ctx).and_then(|rec| set_state(&rec)))
}

/// The same program for the layout in [`set_state_layout`] (kernels since 4.16): the loader's
/// choice when tracefs shows exactly that layout.
#[tracepoint]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the tracepoint macro fixes the signature"
)]
fn inet_sock_set_state_fixed(ctx: TracePointContext) -> u32 {
    run(set_state(&FixedLayout(&ctx)))
}

fn set_state<F: SetStateFields>(rec: &F) -> Result<(), i32> {
    let new: u32 = rec.field(Sss::NewState)?;
    // The rest of the closing handshake changes nothing that is counted: the socket stays open
    // until it reaches CLOSE. Many transitions of a connection are these, so they cost only
    // this test.
    if matches!(
        new,
        tcp_state::FIN_WAIT2 | tcp_state::CLOSE_WAIT | tcp_state::CLOSING | tcp_state::TIME_WAIT
    ) {
        return Ok(());
    }
    if rec.field::<u16>(Sss::Protocol)? != IPPROTO_TCP {
        return Ok(());
    }
    let sk: u64 = rec.field(Sss::Skaddr)?;
    // The process closed the socket (or shut it down for sending), first or after its peer:
    // it no longer holds the connection, so an exit from here on cuts nothing, though the
    // connection stays open until the kernel ends its closing handshake. The cell keeps this
    // state until CLOSE (it also names the state of a reset while closing).
    if matches!(new, tcp_state::FIN_WAIT1 | tcp_state::LAST_ACK) {
        let cell = find_socket(sk);
        if cell.found() && !released(cell.state()) {
            cell.set_state(new);
            count_socket(cell.slot(), SocketCount::Released);
        }
        return Ok(());
    }
    let old: u32 = rec.field(Sss::OldState)?;
    // A connect starting or a connection being accepted is a socket not in the table yet (a
    // socket leaves it on reaching CLOSE): straight to the address lookup. The clock is read
    // only where a time is kept.
    let starting = matches!(
        (old, new),
        (tcp_state::CLOSE, tcp_state::SYN_SENT) | (tcp_state::LISTEN, tcp_state::SYN_RECV)
    );
    let tracked = if starting {
        SocketCell::MISSING
    } else {
        find_socket(sk)
    };
    let slot = if tracked.found() {
        if new != tcp_state::CLOSE {
            tracked.set_state(new);
        }
        tracked.slot()
    } else {
        // Listeners and closed sockets are not connections; nothing to start tracking.
        if new == tcp_state::CLOSE || new == tcp_state::LISTEN {
            return Ok(());
        }
        // The address straight from the record's words, as the address table stores it.
        let family: u16 = rec.field(Sss::Family)?;
        let local = match family {
            AF_INET => addr_words_v4(rec.field(Sss::Saddr)?),
            AF_INET6 => rec.field(Sss::SaddrV6)?,
            _ => return Ok(()),
        };
        let Some(slot) = pod_of_words(local) else {
            return Ok(());
        };
        if track_socket(sk, slot, new) {
            count_socket(slot, SocketCount::Tracked);
        } else {
            loss(|l| l.socket_table_full += 1);
        }
        slot
    };

    match (old, new) {
        (tcp_state::SYN_RECV, tcp_state::ESTABLISHED) => count(slot, |c, win| {
            c.accepted += 1;
            c.win_accepted += w(win);
            c.last_accept_ns = now();
        }),
        (tcp_state::SYN_SENT, tcp_state::ESTABLISHED) => {
            // No window counter: the window's own connects are not its failures.
            if let Some(counters) = SLOT_COUNTERS.get_ptr_mut(slot) {
                // SAFETY: per-CPU entry, and programs do not migrate between CPUs while running.
                unsafe { (*counters).opened += 1 };
            }
        }
        (tcp_state::SYN_SENT, tcp_state::CLOSE) => {
            count(slot, |c, win| {
                c.failed_connects += 1;
                c.win_failed_connects += w(win);
            });
            emit_set_state_event(rec, slot, old, now())?;
        }
        _ => {}
    }

    // A new cell was claimed with this state, a tracked one updated above; only a close
    // remains to do.
    if new == tcp_state::CLOSE && tracked.found() {
        let how = if released(tracked.state()) {
            SocketCount::ReleasedClosed
        } else {
            SocketCount::Untracked
        };
        tracked.free();
        count_socket(slot, how);
    }
    Ok(())
}

/// A tracked socket's cell in [`SOCKET_TABLE`], or [`SocketCell::MISSING`]. Not an `Option`:
/// every field is defined on every path, so that LLVM never spills an undefined register (the
/// `None` of an `Option` leaves its payload undefined), which the verifier rejects once the
/// table code is inlined.
struct SocketCell {
    /// Null for no cell.
    bucket: *mut SocketBucket,
    index: usize,
    /// Its home bucket when it lives in a later one, else null.
    spilled_from: *mut SocketBucket,
}

impl SocketCell {
    const MISSING: Self = Self {
        bucket: core::ptr::null_mut(),
        index: 0,
        spilled_from: core::ptr::null_mut(),
    };

    fn found(&self) -> bool {
        !self.bucket.is_null()
    }

    /// The cell's index, visibly in bounds: to the compiler (no bounds check, whose panic path
    /// the verifier rejects) and to the verifier (the mask bounds the register).
    fn index(&self) -> usize {
        self.index % SOCKET_BUCKET_CELLS
    }

    fn slot(&self) -> u32 {
        // SAFETY: a pointer into an array map value, which lives as long as the map; the cell
        // is this socket's, and its transitions do not race.
        unsafe { (*self.bucket).slot[self.index()] }
    }

    fn state(&self) -> u32 {
        // SAFETY: as in `slot`.
        u32::from(unsafe { (*self.bucket).state[self.index()] })
    }

    fn set_state(&self, state: u32) {
        // SAFETY: as in `slot`.
        unsafe { (*self.bucket).state[self.index()] = state as u8 };
    }

    /// Frees the cell: the socket is gone.
    fn free(self) {
        if !self.spilled_from.is_null() {
            // SAFETY: as in `slot`; `spilled` is only ever changed by atomic adds.
            unsafe { atomic_add(&raw mut (*self.spilled_from).spilled, u64::MAX) };
        }
        // SAFETY: as in `slot`; an aligned 64-bit store is not torn, and the next claim of the
        // cell is a compare-and-exchange against this 0.
        unsafe { core::ptr::write_volatile(&raw mut (*self.bucket).sk[self.index()], 0) };
    }
}

/// Adds `delta` (wrapping: `u64::MAX` is -1) to `*target`, atomically.
///
/// # Safety
/// `target` is valid and aligned, and every write to it is an atomic operation.
unsafe fn atomic_add(target: *mut u64, delta: u64) {
    // SAFETY: the caller's promise.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            target, delta,
        );
    }
}

/// Buckets of the socket table in use, minus one, set by user space at load time: all of them
/// ([`SOCKET_BUCKETS`]), except in tests that fill a small table.
#[unsafe(no_mangle)]
static SOCKET_MASK: u64 = 0;

fn socket_mask() -> u32 {
    global(&SOCKET_MASK) as u32 & (SOCKET_BUCKETS - 1)
}

/// The cell of socket `sk`, or [`SocketCell::MISSING`] if it is not tracked. A miss costs one
/// bucket (one cache line) unless sockets spilled from that bucket into the next ones.
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "saves a BPF-to-BPF call and its return (through the return thunk of CPUs with \
              SRSO mitigations) at most runs"
)]
fn find_socket(sk: u64) -> SocketCell {
    if sk == 0 {
        return SocketCell::MISSING;
    }
    let mask = socket_mask();
    let home_index = socket_bucket(socket_home(sk), 0, mask);
    let Some(home) = SOCKET_TABLE.get_ptr_mut(home_index) else {
        return SocketCell::MISSING;
    };
    for probe in 0..SOCKET_PROBE_BUCKETS {
        let bucket = if probe == 0 {
            home
        } else {
            match SOCKET_TABLE.get_ptr_mut(socket_bucket(home_index, probe, mask)) {
                Some(bucket) => bucket,
                None => return SocketCell::MISSING,
            }
        };
        for index in 0..SOCKET_BUCKET_CELLS {
            // SAFETY: an array map value; another CPU may be claiming or freeing a cell, and an
            // aligned 64-bit load is not torn.
            if unsafe { core::ptr::read_volatile(&raw const (*bucket).sk[index]) } == sk {
                return SocketCell {
                    bucket,
                    index,
                    spilled_from: if probe == 0 {
                        core::ptr::null_mut()
                    } else {
                        home
                    },
                };
            }
        }
        // SAFETY: as above.
        if probe == 0 && unsafe { core::ptr::read_volatile(&raw const (*home).spilled) } == 0 {
            return SocketCell::MISSING;
        }
    }
    SocketCell::MISSING
}

/// Claims a free cell for socket `sk` in its home bucket or the next ones; false when all are
/// taken. Two CPUs can race for a cell: the compare-and-exchange lets one win and sends the
/// other on to the next cell.
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "saves a BPF-to-BPF call and its return at every connection start"
)]
fn track_socket(sk: u64, slot: u32, state: u32) -> bool {
    let mask = socket_mask();
    let home_index = socket_bucket(socket_home(sk), 0, mask);
    for probe in 0..SOCKET_PROBE_BUCKETS {
        let Some(bucket) = SOCKET_TABLE.get_ptr_mut(socket_bucket(home_index, probe, mask)) else {
            return false;
        };
        for index in 0..SOCKET_BUCKET_CELLS {
            // SAFETY: an array map value; cells are claimed only by this compare-and-exchange.
            let won = unsafe {
                let cell = &raw mut (*bucket).sk[index];
                core::ptr::read_volatile(cell) == 0
                    && core::intrinsics::atomic_cxchg::<
                        u64,
                        { core::intrinsics::AtomicOrdering::Relaxed },
                        { core::intrinsics::AtomicOrdering::Relaxed },
                    >(cell, 0, sk)
                    .1
            };
            if won {
                // SAFETY: the cell is ours now.
                unsafe {
                    (*bucket).slot[index] = slot;
                    (*bucket).state[index] = state as u8;
                }
                if probe != 0
                    && let Some(home) = SOCKET_TABLE.get_ptr_mut(home_index)
                {
                    // SAFETY: `spilled` is only ever changed by atomic adds.
                    unsafe { atomic_add(&raw mut (*home).spilled, 1) };
                }
                return true;
            }
        }
    }
    false
}

fn emit_set_state_event<F: SetStateFields>(
    rec: &F,
    slot: u32,
    old: u32,
    time_ns: u64,
) -> Result<(), i32> {
    let family: u16 = rec.field(Sss::Family)?;
    let (local, remote) = match family {
        AF_INET => (
            AddrKey::v4(rec.field(Sss::Saddr)?),
            AddrKey::v4(rec.field(Sss::Daddr)?),
        ),
        _ => (
            AddrKey::v6(rec.field(Sss::SaddrV6)?),
            AddrKey::v6(rec.field(Sss::DaddrV6)?),
        ),
    };
    let conn = ConnKey {
        local,
        remote,
        local_port: rec.field(Sss::Sport)?,
        remote_port: rec.field(Sss::Dport)?,
    };
    // tcp_receive_reset marked the tuple if the SYN was answered with a reset.
    let reason = if recently_reset(reset_hash(&conn), time_ns) {
        connect_failure::RESET
    } else {
        connect_failure::NO_ANSWER
    };
    emit(
        &NotableEvent {
            time_ns,
            slot,
            reason,
            kind: event_kind::CONNECT_FAILED,
            tcp_state: old as u8,
            local_port: conn.local_port,
            remote_port: conn.remote_port,
            local,
            remote,
            ..NotableEvent::default()
        },
        Wake::Batched,
    );
    Ok(())
}

/// Address and port of a `sockaddr_in` / `sockaddr_in6` as the reset tracepoints store them.
fn sockaddr(raw: &[u8; 28]) -> Option<(AddrKey, u16)> {
    let family = u16::from_ne_bytes([raw[0], raw[1]]);
    let port = u16::from_be_bytes([raw[2], raw[3]]);
    match family {
        AF_INET => Some((AddrKey::v4([raw[4], raw[5], raw[6], raw[7]]), port)),
        AF_INET6 => {
            let mut addr = [0u8; 16];
            addr.copy_from_slice(&raw[8..24]);
            Some((AddrKey::v6(addr), port))
        }
        _ => None,
    }
}

#[tracepoint]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the tracepoint macro fixes the signature"
)]
fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    run(try_tcp_send_reset(&ctx))
}

fn try_tcp_send_reset(ctx: &TracePointContext) -> Result<(), i32> {
    let rec = Record::read(ctx)?;
    let sk: u64 = rec.get(&RST_SKADDR)?;
    // `saddr` is the side that sends the reset in both cases: the socket's own address, or,
    // without a socket, the destination of the segment being answered.
    let Some((local, local_port)) = sockaddr(&rec.get(&RST_SADDR)?) else {
        return Ok(());
    };
    let Some((remote, remote_port)) = sockaddr(&rec.get(&RST_DADDR)?) else {
        return Ok(());
    };
    let state: u32 = if sk == 0 { 0 } else { rec.get(&RST_STATE)? };
    let Some((slot, _)) = socket_or_address(sk, &local) else {
        return Ok(());
    };
    let conn = ConnKey {
        local,
        remote,
        local_port,
        remote_port,
    };
    // No socket, or a listener: the segment matched no connection; for a SYN, that is a refused
    // connection.
    let refused = sk == 0 || state == tcp_state::LISTEN;
    let reason = if global(&RST_REASON) == ABSENT {
        0
    } else {
        rec.get(&RST_REASON)?
    };
    reset_sent(slot, state, reason, &conn, refused);
    Ok(())
}

/// Counts a reset that pod `slot` sent on `conn` (a refusal when `refused`), with its event,
/// unless it repeats a failure counted already: a refusal that answers the late segments (its
/// request, its FIN) of a connection reset within the last second, or a connection's second
/// reset.
fn reset_sent(slot: u32, state: u32, reason: u32, conn: &ConnKey, refused: bool) {
    let time_ns = now();
    // One hash for the lookup and the mark below.
    let hash = reset_hash(conn);
    if refused && recently_reset(hash, time_ns) {
        return;
    }
    if !refused && !first_reset(hash, time_ns) {
        return;
    }
    let from_node = is_node(&conn.remote);
    if refused {
        // A full bucket forgets its oldest entry; a lost mark at worst counts a late repeat.
        mark_reset(hash, time_ns | REFUSAL_MARK, time_ns);
    }
    if from_node {
        count_from_node(slot);
    } else if refused {
        count(slot, |c, win| {
            c.refused += 1;
            c.win_refused += w(win);
        });
    } else {
        count(slot, |c, win| {
            c.resets_sent += 1;
            c.win_resets_sent += w(win);
        });
    }
    let kind = if refused {
        event_kind::REFUSED
    } else {
        event_kind::RESET_SENT
    };
    emit_reset(tag(kind, from_node), slot, state, reason, conn);
}

/// An event kind and its flags, as [`emit_reset`] takes them.
fn tag(kind: u8, from_node: bool) -> u16 {
    u16::from_le_bytes([kind, if from_node { EVENT_FROM_NODE } else { 0 }])
}

/// Counts a reset or refusal exchanged with one of the node's own addresses (a kubelet probe):
/// not one of the pod's errors.
fn count_from_node(slot: u32) {
    count(slot, |c, win| {
        c.from_node += 1;
        c.win_from_node += w(win);
    });
}

/// `TC_ACT_UNSPEC` (and tcx's `TCX_NEXT`): the packet goes on to the next program or filter
/// on the interface (a CNI's) exactly as it came.
const TC_ACT_UNSPEC: i32 = -1;

/// Every reset a pod sends, seen as a packet leaving it, for kernels whose `tcp:tcp_send_reset`
/// misses some (before 6.10 it fires only for resets of a socket's own, never for a refusal:
/// a SYN to a closed port). The loader attaches it instead of that tracepoint's program, so
/// each reset has one source. Attached where the pod's packets leave it: on the pod's side of
/// its interface (egress) or on the node's side (ingress). It never changes or drops a packet.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the classifier macro fixes the signature"
)]
fn pod_egress(ctx: TcContext) -> i32 {
    if pod_packet_reset(&ctx).is_err() {
        loss(|l| l.read_errors += 1);
    }
    TC_ACT_UNSPEC
}

/// Does nothing but pass the packet on: what one run of a TC program costs on this kernel
/// before any work. The agent never attaches it; `cargo xtask bench` attaches it right after
/// `pod_egress` on the same interfaces, as the floor under that program's kernel time.
#[classifier]
fn tc_floor(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// TCP flags.
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP_U8: u8 = 6;

fn pod_packet_reset(ctx: &TcContext) -> Result<(), i64> {
    // Most packets are not TCP resets: they cost the loads up to the TCP flags.
    let ethertype = u16::from_be(ctx.load::<u16>(12)?);
    let tcp_at = match ethertype {
        ETH_P_IP => {
            // Version and header length, then the protocol.
            let [vihl, _]: [u8; 2] = ctx.load(ETH_HLEN)?;
            if ctx.load::<u8>(ETH_HLEN + 9)? != IPPROTO_TCP_U8 {
                return Ok(());
            }
            ETH_HLEN + usize::from(vihl & 0x0f) * 4
        }
        // Extension headers before TCP are not followed: resets carry none.
        ETH_P_IPV6 if ctx.load::<u8>(ETH_HLEN + 6)? == IPPROTO_TCP_U8 => ETH_HLEN + 40,
        _ => return Ok(()),
    };
    let flags: u8 = ctx.load(tcp_at + 13)?;
    if flags & TCP_RST == 0 {
        return Ok(());
    }
    let (local, remote) = if ethertype == ETH_P_IP {
        let addrs: [u8; 8] = ctx.load(ETH_HLEN + 12)?;
        (
            AddrKey::v4([addrs[0], addrs[1], addrs[2], addrs[3]]),
            AddrKey::v4([addrs[4], addrs[5], addrs[6], addrs[7]]),
        )
    } else {
        let addrs: [u8; 32] = ctx.load(ETH_HLEN + 8)?;
        let (mut local, mut remote) = ([0u8; 16], [0u8; 16]);
        local.copy_from_slice(&addrs[..16]);
        remote.copy_from_slice(&addrs[16..]);
        (AddrKey::v6(local), AddrKey::v6(remote))
    };
    let Some(slot) = pod_of(&local) else {
        return Ok(());
    };
    // Ports, then the sequence number.
    let head: [u8; 8] = ctx.load(tcp_at)?;
    let conn = ConnKey {
        local,
        remote,
        local_port: u16::from_be_bytes([head[0], head[1]]),
        remote_port: u16::from_be_bytes([head[2], head[3]]),
    };
    // The kernel answers a segment that matched no socket and carried no ACK (a SYN) with a
    // reset that acknowledges it and has sequence number 0; a connection's own reset carries
    // its sequence number, and the answer to any other stray segment carries no ACK.
    let refused = flags & TCP_ACK != 0 && head[4..8] == [0, 0, 0, 0];
    reset_sent(slot, 0, 0, &conn, refused);
    Ok(())
}

/// A cell of the reset table: its bucket and index.
struct ResetCell {
    bucket: *mut ResetBucket,
    index: usize,
}

impl ResetCell {
    /// The cell's [`conn_hash`] (0: free).
    fn key(&self) -> u64 {
        // SAFETY: `index` is below RESET_BUCKET_CELLS (every constructor checks it); another CPU
        // may be claiming the cell, and an aligned 64-bit load is not torn.
        unsafe {
            core::ptr::read_volatile(
                (&raw const (*self.bucket).key)
                    .cast::<u64>()
                    .add(self.index),
            )
        }
    }

    fn at(&self) -> *mut u64 {
        // SAFETY: `index` is below RESET_BUCKET_CELLS (every constructor checks it).
        unsafe { (&raw mut (*self.bucket).at).cast::<u64>().add(self.index) }
    }

    fn time(&self) -> u64 {
        // SAFETY: an aligned 64-bit load from an array map value is not torn.
        unsafe { core::ptr::read_volatile(self.at()) }
    }

    fn set_time(&self, stamp: u64) {
        // SAFETY: as above, for the store.
        unsafe { core::ptr::write_volatile(self.at(), stamp) };
    }
}

/// The reset table's hash of `conn`, with the seed user space wrote.
fn reset_hash(conn: &ConnKey) -> u64 {
    let seed = ADDR_GEN.get(RESET_SEED_INDEX).copied().unwrap_or(0);
    conn_hash(conn, seed)
}

/// The cell holding `hash`, if any.
fn find_reset(hash: u64) -> Option<ResetCell> {
    let bucket = RESET_TABLE.get_ptr_mut(reset_home(hash))?;
    (0..RESET_BUCKET_CELLS)
        .map(|index| ResetCell { bucket, index })
        .find(|cell| cell.key() == hash)
}

/// What [`claim_reset`] found or took. Not an `Option<(ResetCell, bool)>`: the object's BTF
/// would describe that as a union with a member at byte 16 (the `bool`'s niche), which the
/// kernel rejects together with the whole BTF (a warning of a hundred lines at every start).
struct ResetClaim {
    /// The cell; a null `bucket` when there is none.
    cell: ResetCell,
    /// Whether it held the hash already.
    existed: bool,
}

impl ResetClaim {
    const NONE: Self = Self {
        cell: ResetCell {
            bucket: core::ptr::null_mut(),
            index: 0,
        },
        existed: false,
    };

    fn found(&self) -> bool {
        !self.cell.bucket.is_null()
    }
}

/// The cell holding `hash`, and whether it was there already; otherwise a cell claimed for it
/// (its time still the last holder's: the caller sets it): a free one, else the oldest. Two
/// CPUs claiming for one hash race on the same cell, and the compare-and-exchange lets one win;
/// the other then finds it there. None only when other CPUs keep taking the cells.
///
/// Inlined: returned by value from a call, the claim's pointer would pass through the caller's
/// stack byte by byte, and verifiers before 6.18 then no longer know it for a map value
/// pointer ("invalid mem access 'scalar'" on 6.12).
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "a call would return the bucket pointer through memory, which older verifiers reject"
)]
fn claim_reset(hash: u64, time_ns: u64) -> ResetClaim {
    let Some(bucket) = RESET_TABLE.get_ptr_mut(reset_home(hash)) else {
        return ResetClaim::NONE;
    };
    for _attempt in 0..2 {
        let (mut victim, mut victim_key, mut victim_time) = (0, 0, u64::MAX);
        for index in 0..RESET_BUCKET_CELLS {
            let cell = ResetCell { bucket, index };
            let key = cell.key();
            if key == hash {
                return ResetClaim {
                    cell,
                    existed: true,
                };
            }
            let time = if key == 0 { 0 } else { reset_time(cell.time()) };
            if time < victim_time {
                (victim, victim_key, victim_time) = (index, key, time);
            }
        }
        if victim >= RESET_BUCKET_CELLS {
            return ResetClaim::NONE;
        }
        // SAFETY: an aligned u64 in the array map's value; `victim` is below the cell count.
        let won = unsafe {
            let key = (&raw mut (*bucket).key).cast::<u64>().add(victim);
            core::intrinsics::atomic_cxchg::<
                u64,
                { core::intrinsics::AtomicOrdering::Relaxed },
                { core::intrinsics::AtomicOrdering::Relaxed },
            >(key, victim_key, hash)
            .1
        };
        if won {
            if victim_key != 0 && time_ns.saturating_sub(victim_time) <= RESET_REPEAT_NS {
                loss(|l| l.reset_table_full += 1);
            }
            return ResetClaim {
                cell: ResetCell {
                    bucket,
                    index: victim,
                },
                existed: false,
            };
        }
    }
    ResetClaim::NONE
}

/// Remembers that the 4-tuple of [`reset_hash`] `hash` was reset (or refused, or answered in
/// `SYN_SENT`) with `stamp`.
fn mark_reset(hash: u64, stamp: u64, time_ns: u64) {
    // No cell: the mark is lost, which at worst counts a late repeat.
    let claim = claim_reset(hash, time_ns);
    if claim.found() {
        claim.cell.set_time(stamp);
    }
}

/// Whether this is the first reset of the connection, in either direction: a connection that
/// is reset is one failure, however many resets its two ends then exchange. Finding the tuple
/// and claiming its cell is one compare-and-exchange, so two CPUs cannot both count it.
/// `hash` is the connection's [`reset_hash`].
fn first_reset(hash: u64, time_ns: u64) -> bool {
    let stamp = reset_time(time_ns);
    let ResetClaim { cell, existed } = claim_reset(hash, time_ns);
    if cell.bucket.is_null() {
        // No cell to remember it in: the reset is not a known repeat.
        return true;
    }
    if !existed {
        cell.set_time(stamp);
        return true;
    }
    // Two CPUs racing on a reused tuple's stale entry could both count it, which needs two new
    // failures of one tuple within nanoseconds.
    let last = cell.time();
    let age = time_ns.saturating_sub(reset_time(last));
    let repeat = if last & REFUSAL_MARK == 0 {
        age <= RESET_REPEAT_NS
    } else {
        age <= REFUSAL_RACE_NS
    };
    if !repeat || last & REFUSAL_MARK != 0 {
        // Now a connection's reset: the peer's late segments are answered as its repeats.
        cell.set_time(stamp);
    }
    !repeat
}

/// Whether the 4-tuple of [`reset_hash`] `hash` was reset within [`RESET_REPEAT_NS`]: a segment
/// answered now is a late part of that failure.
fn recently_reset(hash: u64, time_ns: u64) -> bool {
    find_reset(hash).is_some_and(|cell| {
        let at = cell.time();
        at & REFUSAL_MARK == 0 && time_ns.saturating_sub(at) <= RESET_REPEAT_NS
    })
}

/// The pod of a reset: the tracked socket's, else the local address's, with the socket's last
/// TCP state (0 when untracked).
fn socket_or_address(sk: u64, local: &AddrKey) -> Option<(u32, u32)> {
    let cell = find_socket(sk);
    if cell.found() {
        Some((cell.slot(), cell.state()))
    } else {
        pod_of(local).map(|slot| (slot, 0))
    }
}

/// Not inlined: the event is built in this function's own stack frame, not in its callers'
/// (whose frames, with the reset table's calls below them, must fit the 512 bytes the verifier
/// allows a chain of calls; `tcp_receive_reset` did not on 6.1 and 6.12).
/// `tag` is the event's kind, with its flags (`EVENT_FROM_NODE`) in the high byte: five
/// arguments are all a BPF call takes.
#[inline(never)]
fn emit_reset(tag: u16, slot: u32, state: u32, reason: u32, conn: &ConnKey) {
    let [kind, flags] = tag.to_le_bytes();
    emit(
        &NotableEvent {
            time_ns: now(),
            slot,
            reason,
            kind,
            tcp_state: state as u8,
            flags,
            local_port: conn.local_port,
            remote_port: conn.remote_port,
            local: conn.local,
            remote: conn.remote,
            ..NotableEvent::default()
        },
        Wake::Batched,
    );
}

#[tracepoint]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the tracepoint macro fixes the signature"
)]
fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    run(try_tcp_receive_reset(&ctx))
}

fn try_tcp_receive_reset(ctx: &TracePointContext) -> Result<(), i32> {
    let rec = Record::read(ctx)?;
    let sk: u64 = rec.get(&RCV_SKADDR)?;
    // Kernels before 5.? have no `family` here; their IPv6 fields hold an IPv4 socket's
    // addresses mapped (`::ffff:a.b.c.d`), which is how `AddrKey` keeps IPv4 anyway.
    let family: u16 = if global(&RCV_FAMILY) == ABSENT {
        AF_INET6
    } else {
        rec.get(&RCV_FAMILY)?
    };
    let (local, remote) = match family {
        AF_INET => (
            AddrKey::v4(rec.get(&RCV_SADDR)?),
            AddrKey::v4(rec.get(&RCV_DADDR)?),
        ),
        AF_INET6 => (
            AddrKey::v6(rec.get(&RCV_SADDR_V6)?),
            AddrKey::v6(rec.get(&RCV_DADDR_V6)?),
        ),
        _ => return Ok(()),
    };
    let Some((slot, state)) = socket_or_address(sk, &local) else {
        return Ok(());
    };
    let local_port: u16 = rec.get(&RCV_SPORT)?;
    let remote_port: u16 = rec.get(&RCV_DPORT)?;
    let conn = ConnKey {
        local,
        remote,
        local_port,
        remote_port,
    };
    // A reset answering our SYN is a failed connect, counted once when the socket closes; the
    // mark tells that close the peer answered (refused, and counted there), which a connect
    // that got no answer at all did not.
    if state == tcp_state::SYN_SENT {
        // A mark forgotten before the close (a bucket full within microseconds) makes the
        // connect look unanswered: a peer failure of that address, beside its own refusal,
        // so at worst one failure counted twice, never one missed.
        let time_ns = now();
        mark_reset(reset_hash(&conn), reset_time(time_ns), time_ns);
        return Ok(());
    }
    if !first_reset(reset_hash(&conn), now()) {
        return Ok(());
    }
    let from_node = is_node(&conn.remote);
    if from_node {
        count_from_node(slot);
    } else {
        count(slot, |c, win| {
            c.resets_received += 1;
            c.win_resets_received += w(win);
        });
    }
    emit_reset(
        tag(event_kind::RESET_RECEIVED, from_node),
        slot,
        state,
        0,
        &conn,
    );
    Ok(())
}

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any path that could reach here; it exists only to satisfy no_std.
    loop {}
}
