//! Tracepoint records: the field offsets user space sets from tracefs, the copy of a record
//! read at those offsets ([`Record`]) and the record read in place at a layout compiled in
//! ([`FixedLayout`]).

use aya_ebpf::{EbpfContext as _, macros::map, maps::PerCpuArray, programs::TracePointContext};
use draingate_common::set_state_layout;

pub(crate) const AF_INET: u16 = 2;
pub(crate) const AF_INET6: u16 = 10;
pub(crate) const IPPROTO_TCP: u16 = 6;

/// Offset global value of a field this kernel does not have.
pub(crate) const ABSENT: u64 = u64::MAX;

/// Field offsets, set by user space at load time from tracefs.
macro_rules! offsets {
    ($($name:ident),* $(,)?) => {
        $(
            #[unsafe(no_mangle)]
            pub(crate) static $name: u64 = 0;
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

/// A global set by user space. The volatile read keeps the compiler from folding the zero
/// initialiser into the code; the loader rewrites `.rodata` before the verifier sees it.
#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "the reference is what makes the read volatile"
)]
pub(crate) fn global(value: &'static u64) -> u64 {
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
pub(crate) struct Record(&'static [u8; RECORD_BYTES]);

/// Per-CPU scratch space for [`Record`]; programs do not migrate or nest on a CPU while running.
#[map]
static SCRATCH: PerCpuArray<[u8; RECORD_BYTES]> = PerCpuArray::with_max_entries(1, 0);

impl Record {
    pub(crate) fn read(ctx: &TracePointContext) -> Result<Self, i32> {
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
    pub(crate) fn get<T: Copy>(&self, offset: &'static u64) -> Result<T, i32> {
        let offset = global(offset) as usize;
        if offset + size_of::<T>() > RECORD_BYTES {
            return Err(-1);
        }
        // SAFETY: bounds checked above; read_unaligned makes no alignment assumption.
        Ok(unsafe { self.0.as_ptr().add(offset).cast::<T>().read_unaligned() })
    }
}

/// A field of the `sock:inet_sock_set_state` record.
#[derive(Clone, Copy)]
pub(crate) enum Sss {
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
pub(crate) trait SetStateFields {
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
pub(crate) struct FixedLayout<'a>(pub(crate) &'a TracePointContext);

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
pub(crate) trait Fields {
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
