//! Address lookups: the pod slot (or the node) of an address, in the address table user space
//! builds.

use draingate_common::{
    ADDR_BUCKET_CELLS, ADDR_BUCKETS, ADDR_PROBE_BUCKETS, AddrKey, MAX_SLOTS, NODE_SLOT, addr_home,
    addr_words,
};

use crate::maps::{ADDR_GEN, ADDR_TABLE};

/// The pod slot of a watched address.
pub(crate) fn pod_of(addr: &AddrKey) -> Option<u32> {
    pod_of_words(addr_words(addr))
}

/// Whether `addr` is one of the node's own addresses (where kubelet probes come from).
pub(crate) fn is_node(addr: &AddrKey) -> bool {
    table_slot(addr_words(addr)) == Some(NODE_SLOT)
}

/// The pod slot of a watched address given as [`addr_words`]: a pod's, never the node's.
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "saves a BPF-to-BPF call and its return (through the return thunk of CPUs with \
              SRSO mitigations) at every connection start"
)]
pub(crate) fn pod_of_words(words: [u64; 2]) -> Option<u32> {
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
