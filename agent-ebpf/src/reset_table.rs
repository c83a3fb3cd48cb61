//! The reset table: the 4-tuples reset or refused lately, with when, so that a connection's
//! failure is counted once however many resets its two ends exchange.

use draingate_common::{
    ConnKey, RESET_BUCKET_CELLS, RESET_SEED_INDEX, ResetBucket, conn_hash, reset_home,
};

use crate::{
    count::loss,
    maps::{ADDR_GEN, RESET_TABLE},
};

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
pub(crate) const REFUSAL_MARK: u64 = 1;

/// How soon after a refusal a reset of the same 4-tuple is that race, not a new failure.
const REFUSAL_RACE_NS: u64 = 10_000_000;

/// A [`RESET_TABLE`] time for a connection's reset (low bit clear).
pub(crate) fn reset_time(time_ns: u64) -> u64 {
    time_ns & !REFUSAL_MARK
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
pub(crate) fn reset_hash(conn: &ConnKey) -> u64 {
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
pub(crate) fn mark_reset(hash: u64, stamp: u64, time_ns: u64) {
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
pub(crate) fn first_reset(hash: u64, time_ns: u64) -> bool {
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
pub(crate) fn recently_reset(hash: u64, time_ns: u64) -> bool {
    find_reset(hash).is_some_and(|cell| {
        let at = cell.time();
        at & REFUSAL_MARK == 0 && time_ns.saturating_sub(at) <= RESET_REPEAT_NS
    })
}
