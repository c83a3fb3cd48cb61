//! The socket table: the pod sockets not yet closed, by kernel socket address, with their pod
//! slot and last TCP state (see [`SocketBucket`]).

use draingate_common::{
    SOCKET_BUCKET_CELLS, SOCKET_BUCKETS, SOCKET_PROBE_BUCKETS, SocketBucket, socket_bucket,
    socket_home, tcp_state,
};

use crate::{maps::SOCKET_TABLE, record::global};

/// Whether a tracked socket's recorded state says its process released it.
pub(crate) fn released(state: u32) -> bool {
    matches!(state, tcp_state::FIN_WAIT1 | tcp_state::LAST_ACK)
}

/// A tracked socket's cell in [`SOCKET_TABLE`], or [`SocketCell::MISSING`]. Not an `Option`:
/// every field is defined on every path, so that LLVM never spills an undefined register (the
/// `None` of an `Option` leaves its payload undefined), which the verifier rejects once the
/// table code is inlined.
pub(crate) struct SocketCell {
    /// Null for no cell.
    bucket: *mut SocketBucket,
    index: usize,
    /// Its home bucket when it lives in a later one, else null.
    spilled_from: *mut SocketBucket,
}

impl SocketCell {
    pub(crate) const MISSING: Self = Self {
        bucket: core::ptr::null_mut(),
        index: 0,
        spilled_from: core::ptr::null_mut(),
    };

    pub(crate) fn found(&self) -> bool {
        !self.bucket.is_null()
    }

    /// The cell's index, visibly in bounds: to the compiler (no bounds check, whose panic path
    /// the verifier rejects) and to the verifier (the mask bounds the register).
    fn index(&self) -> usize {
        self.index % SOCKET_BUCKET_CELLS
    }

    pub(crate) fn slot(&self) -> u32 {
        // SAFETY: a pointer into an array map value, which lives as long as the map; the cell
        // is this socket's, and its transitions do not race.
        unsafe { (*self.bucket).slot[self.index()] }
    }

    pub(crate) fn state(&self) -> u32 {
        // SAFETY: as in `slot`.
        u32::from(unsafe { (*self.bucket).state[self.index()] })
    }

    pub(crate) fn set_state(&self, state: u32) {
        // SAFETY: as in `slot`.
        unsafe { (*self.bucket).state[self.index()] = state as u8 };
    }

    /// Frees the cell: the socket is gone.
    pub(crate) fn free(self) {
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
pub(crate) fn find_socket(sk: u64) -> SocketCell {
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
pub(crate) fn track_socket(sk: u64, slot: u32, state: u32) -> bool {
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
