//! The programs' hooks: which program attaches to which tracepoint, the record fields each
//! reads (their offsets come from tracefs at load time), and the kernels they load on.

/// Offset value the programs read as "this kernel has no such field".
pub(super) const ABSENT: u64 = u64::MAX;

/// Whether a tracepoint field must exist on this kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    Required,
    /// Some kernels only (e.g. `tcp_send_reset.reason`, 6.10+; `tcp_receive_reset.family`);
    /// absent, the program takes the fact from elsewhere or leaves it unknown.
    Optional,
}

/// A field of a record layout a program is compiled against: its tracefs name, offset and size.
pub(super) type LayoutField = (&'static str, usize, usize);

/// A field a program reads at an offset from tracefs: the program global that gets the
/// offset, the field's tracefs name, its size in bytes (a field of another size is another
/// layout, which the program cannot read), and whether it must exist.
pub(super) type Global = (&'static str, &'static str, u64, Need);

/// A kernel program and the tracepoint it attaches to, with the record fields it reads: each
/// field's offset becomes the program global of the given name.
pub(super) struct Hook {
    pub(super) program: &'static str,
    pub(super) category: &'static str,
    pub(super) name: &'static str,
    pub(super) globals: &'static [Global],
    /// The program compiled against one record layout (each field's name, offset and size),
    /// which reads the record in place: loaded instead where tracefs shows exactly that layout.
    pub(super) fixed: Option<(&'static str, &'static [LayoutField])>,
}

pub(super) use Need::{Optional, Required};

/// The hook of `tcp:tcp_send_reset`, which [`ResetSource`] may replace.
pub(super) const SEND_RESET: &str = "tcp_send_reset";

pub(super) const HOOKS: &[Hook] = &[
    Hook {
        program: "inet_sock_set_state",
        category: "sock",
        name: "inet_sock_set_state",
        globals: &[
            ("SSS_SKADDR", "skaddr", 8, Required),
            ("SSS_OLDSTATE", "oldstate", 4, Required),
            ("SSS_NEWSTATE", "newstate", 4, Required),
            ("SSS_SPORT", "sport", 2, Required),
            ("SSS_DPORT", "dport", 2, Required),
            ("SSS_FAMILY", "family", 2, Required),
            ("SSS_PROTOCOL", "protocol", 2, Required),
            ("SSS_SADDR", "saddr", 4, Required),
            ("SSS_DADDR", "daddr", 4, Required),
            ("SSS_SADDR_V6", "saddr_v6", 16, Required),
            ("SSS_DADDR_V6", "daddr_v6", 16, Required),
        ],
        fixed: Some((
            "inet_sock_set_state_fixed",
            &draingate_common::set_state_layout::FIELDS,
        )),
    },
    Hook {
        program: SEND_RESET,
        category: "tcp",
        name: "tcp_send_reset",
        // The layout of 6.10+, which fires for every reset the kernel sends, with or without a
        // socket; earlier kernels' records (4-byte addresses) come from a tracepoint that misses
        // refusals, and the packets are read instead (`ResetSource::Packets`).
        globals: &[
            ("RST_SKADDR", "skaddr", 8, Required),
            ("RST_STATE", "state", 4, Required),
            ("RST_REASON", "reason", 4, Optional),
            ("RST_SADDR", "saddr", 28, Required),
            ("RST_DADDR", "daddr", 28, Required),
        ],
        fixed: None,
    },
    Hook {
        program: "tcp_receive_reset",
        category: "tcp",
        name: "tcp_receive_reset",
        globals: &[
            ("RCV_SKADDR", "skaddr", 8, Required),
            ("RCV_SPORT", "sport", 2, Required),
            ("RCV_DPORT", "dport", 2, Required),
            // Absent on older kernels: the IPv6 fields hold IPv4 addresses mapped.
            ("RCV_FAMILY", "family", 2, Optional),
            ("RCV_SADDR", "saddr", 4, Required),
            ("RCV_DADDR", "daddr", 4, Required),
            ("RCV_SADDR_V6", "saddr_v6", 16, Required),
            ("RCV_DADDR_V6", "daddr_v6", 16, Required),
        ],
        fixed: None,
    },
    Hook {
        program: "signal_generate",
        category: "signal",
        name: "signal_generate",
        globals: &[
            ("SIG_SIG", "sig", 4, Required),
            ("SIG_PID", "pid", 4, Required),
        ],
        fixed: Some((
            "signal_generate_fixed",
            &draingate_common::signal_layout::FIELDS,
        )),
    },
    Hook {
        program: "sched_process_exit",
        category: "sched",
        name: "sched_process_exit",
        // 6.16+; before, the process's live thread count is read at offsets from BTF.
        globals: &[("EXIT_GROUP_DEAD", "group_dead", 1, Optional)],
        fixed: Some((
            "sched_process_exit_fixed",
            &draingate_common::exit_layout::FIELDS,
        )),
    },
];

/// Where the resets a pod sends are counted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetSource {
    /// `tcp:tcp_send_reset` (6.10+), which fires for every reset the kernel sends.
    Tracepoint,
    /// The packets leaving each pod, read by the TC program `pod_egress` on its interface:
    /// on kernels before 6.10, whose tracepoint misses every refusal.
    Packets,
}

/// The oldest kernel the programs load on: `bpf_map_lookup_percpu_elem` (5.19); BPF atomic
/// compare-and-exchange (5.12) and pinnable tracepoint links (5.15) come before it.
pub const MIN_KERNEL: (u32, u32) = (5, 19);

/// The running kernel's release (`uname -r`) and its major and minor version.
pub(super) fn kernel_release() -> (String, Option<(u32, u32)>) {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    let version = match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Some((major, minor)),
        _ => None,
    };
    (release, version)
}
