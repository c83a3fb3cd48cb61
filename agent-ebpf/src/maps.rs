//! The maps the programs share with user space, which pins them so that a restarted agent
//! resumes every count and every open socket (`agent/src/loader.rs` opens them by name).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use draingate_common::{
    AddrKey, AddrTable, ConnKey, EVENTS_RING_BYTES, HttpConn, LossCounters, MAX_ADDRS,
    MAX_HTTP_CONNS, MAX_SLOTS, MAX_TASKS, RESET_BUCKETS, ResetBucket, SOCKET_BUCKETS, SlotCounters,
    SlotId, SocketBucket,
};

/// `BPF_F_MMAPABLE`: an array map whose values start on a page boundary, so that each 64-byte
/// bucket is one cache line (a plain array's values start 8-byte aligned, after its header, and
/// a bucket would straddle two).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Address → pod slot, kept by user space: the record of what is watched. The programs read
/// [`ADDR_TABLE`], which user space builds from it.
#[map]
static POD_ADDRS: HashMap<AddrKey, u32> = HashMap::pinned(MAX_ADDRS, 0);

/// Address → pod slot as the programs read it: two generations of [`AddrTable`], the current
/// one named by [`ADDR_GEN`] (its low bit).
#[map]
pub(crate) static ADDR_TABLE: Array<AddrTable> = Array::pinned(2, BPF_F_MMAPABLE);

/// Entry 0: the generation of [`ADDR_TABLE`] to read, counted up by user space at each
/// rebuild. Entry 1: the layout of the pinned maps ([`draingate_common::MAP_LAYOUT`]), written
/// by user space, so that an agent of another layout refuses the pins instead of misreading
/// them. Entry 2 ([`RESET_SEED_INDEX`]): the reset table's hash seed, written by user space.
#[map]
pub(crate) static ADDR_GEN: Array<u64> = Array::pinned(3, 0);

/// Process (tgid) → pod slot, kept by user space, for exit events.
#[map]
pub(crate) static POD_TASKS: HashMap<u32, u32> = HashMap::pinned(MAX_TASKS, 0);

/// Pod sockets not yet closed, by kernel socket address: the open-connection gauge's socket
/// table (see [`SocketBucket`]).
#[map]
pub(crate) static SOCKET_TABLE: Array<SocketBucket> = Array::pinned(SOCKET_BUCKETS, BPF_F_MMAPABLE);

/// 4-tuples reset lately, with when (see [`ResetBucket`]). A full bucket forgets its oldest
/// entry: that only risks counting a late repeat of it, never losing a first reset, and one
/// under a second old is counted (`LossCounters::reset_table_full`).
#[map]
pub(crate) static RESET_TABLE: Array<ResetBucket> = Array::pinned(RESET_BUCKETS, BPF_F_MMAPABLE);

/// The HTTP/1.x connections of pods whose requests the packet programs follow, by 4-tuple as
/// the pod sees it: a request line to the pod marks its request outstanding, a final response
/// from it answers it, and the pod's FIN with one outstanding cuts it. An LRU table: only
/// connections that carried a request enter it, and forgetting one can only miss a cut.
#[map]
pub(crate) static HTTP_CONNS: LruHashMap<ConnKey, HttpConn> = LruHashMap::pinned(MAX_HTTP_CONNS, 0);

/// Per pod slot, its pod's identity, kept by user space for its successors (see [`SlotId`]);
/// no program reads it.
#[map]
static SLOT_IDS: Array<SlotId> = Array::pinned(MAX_SLOTS, 0);

/// Per pod slot: when its termination window opened (boot-clock ns), 0 while none is open.
/// Opened here on SIGTERM/SIGKILL to a known pod process, or by user space.
#[map]
pub(crate) static WINDOWS: Array<u64> = Array::pinned(MAX_SLOTS, 0);

/// Per pod slot, per CPU counters.
#[map]
pub(crate) static SLOT_COUNTERS: PerCpuArray<SlotCounters> = PerCpuArray::pinned(MAX_SLOTS, 0);

/// What could not be counted, per CPU (one entry).
#[map]
pub(crate) static LOSS: PerCpuArray<LossCounters> = PerCpuArray::pinned(1, 0);

/// Notable events for user space.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);
