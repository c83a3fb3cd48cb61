//! `#[repr(C)]` types shared by the eBPF programs and user space.
//!
//! Every type here crosses the kernel boundary through a map or the ring buffer, so its layout is
//! part of the contract between the two sides: fields are ordered to leave no implicit padding,
//! and sizes are checked at compile time.
#![no_std]

/// Most pod slots tracked at once. Kubernetes allows 110 pods per node by default; the rest is
/// room for deleted pods, which keep their slot while their termination window lingers. Per-CPU
/// arrays are sized slots × CPUs, so this is kept modest.
pub const MAX_SLOTS: u32 = 512;

/// Most addresses mapped to pods at once (a pod usually has one IPv4 and maybe one IPv6 address).
pub const MAX_ADDRS: u32 = 4 * MAX_SLOTS;

/// Buckets of one generation of the address table (a power of two): with at most
/// [`MAX_ADDRS`] addresses, three cells per bucket, it is never more than a third full.
pub const ADDR_BUCKETS: u32 = 2 * MAX_ADDRS;

/// Cells per bucket of the address table.
pub const ADDR_BUCKET_CELLS: usize = 3;

/// Buckets an address may live in: the one it hashes to (its home) and the ones after it.
pub const ADDR_PROBE_BUCKETS: u32 = 8;

/// A bucket of the address table (64 bytes, one cache line).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AddrBucket {
    /// Each cell's address, as [`addr_words`] gives it; all zero marks an empty cell (`::` is
    /// never a pod's address).
    pub addr: [[u64; 2]; ADDR_BUCKET_CELLS],
    /// Each cell's pod slot.
    pub slot: [u32; ADDR_BUCKET_CELLS],
    /// Buckets a lookup of an address whose home is this bucket scans, this one first: 0 when
    /// no watched address has this home.
    pub probes: u32,
}

/// Address → pod slot, one generation: built whole by user space from the watched addresses,
/// read by the programs with no lock and no key hashing by the kernel. User space writes the
/// generation the programs are not reading, then flips the `ADDR_GEN` map's value, then
/// waits for the programs still running on the old one before it ever writes that one again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrTable {
    pub buckets: [AddrBucket; ADDR_BUCKETS as usize],
}

/// An address as the address table stores and compares it: its 16 bytes as two native-endian
/// words.
#[must_use]
pub const fn addr_words(addr: &AddrKey) -> [u64; 2] {
    let a = &addr.addr;
    [
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    ]
}

/// [`addr_words`] of the IPv4 address whose four octets, in network order, are `raw`'s bytes in
/// memory (a `u32` loaded from a tracepoint record), without going through the bytes.
#[must_use]
pub const fn addr_words_v4(raw: u32) -> [u64; 2] {
    // The mapped address `::ffff:a.b.c.d`: the second word's bytes are 0 0 ff ff a b c d.
    #[cfg(target_endian = "little")]
    let second = 0xffff_0000 | ((raw as u64) << 32);
    #[cfg(target_endian = "big")]
    let second = 0xffff_0000_0000 | raw as u64;
    [0, second]
}

/// The home bucket of an address in the address table.
#[must_use]
pub const fn addr_home(words: [u64; 2]) -> u32 {
    let mixed = words[0].wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ words[1];
    (mixed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - ADDR_BUCKETS.trailing_zeros())) as u32
}

/// Most pod processes tracked for exit events.
pub const MAX_TASKS: u32 = 16_384;

/// Most TCP sockets of pods tracked at once (the open-connection gauge): the socket table's
/// cells. A socket that finds no free cell in its [`SOCKET_PROBE_BUCKETS`] buckets is not
/// tracked, and `LossCounters::socket_table_full` says so.
pub const MAX_SOCKETS: u32 = 262_144;

/// Cells per bucket of the socket table (one 64-byte cache line).
pub const SOCKET_BUCKET_CELLS: usize = 4;

/// Buckets of the socket table (a power of two).
pub const SOCKET_BUCKETS: u32 = MAX_SOCKETS / SOCKET_BUCKET_CELLS as u32;

/// Buckets a socket may live in: the one its address hashes to (its home) and the ones after it.
pub const SOCKET_PROBE_BUCKETS: u32 = 8;

/// The home bucket of the socket at kernel address `sk` (Fibonacci hashing: socket addresses
/// are slab-aligned, so their low bits say little).
#[must_use]
pub const fn socket_home(sk: u64) -> u32 {
    (sk.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SOCKET_BUCKETS.trailing_zeros())) as u32
}

/// The `probe`-th bucket (0 is home) of a socket whose home is `home`, in a table of
/// `mask + 1` buckets (the programs' table is [`SOCKET_BUCKETS`]; tests shrink it to fill it).
#[must_use]
pub const fn socket_bucket(home: u32, probe: u32, mask: u32) -> u32 {
    (home & mask).wrapping_add(probe) & mask
}

/// Ring buffer size for notable events, in bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

/// The layout of the pinned maps: bump it whenever a pinned map's key, value or size changes,
/// so that an agent refuses maps pinned by one of another layout (it would misread them, and
/// their still-attached programs would count in the old layout) instead of taking them over.
/// 2: `SlotCounters` of 128 bytes (with the released-socket counts), the socket and address
/// array tables. 3: the reset table (`ResetBucket`), its seed in `ADDR_GEN`, and
/// `LossCounters::reset_table_full`.
/// 4: `SLOT_IDS`, each slot's pod identity, so that a restarted agent can report a pod that
/// went away while it was down. 5: `SlotCounters::from_node` (144 bytes), and the node's own
/// addresses in the address table under [`NODE_SLOT`]. 6: `SlotCounters`' HTTP responses
/// and the SYN-ACKs seen (192 bytes). 7: `SlotCounters::requests_cut` and the HTTP/2 frames
/// (240 bytes), the HTTP connection table (`HTTP_CONNS`), and the request line in
/// `NotableEvent` (72 bytes).
pub const MAP_LAYOUT: u64 = 7;

/// A pod slot's identity as user space keeps it in the pinned `SLOT_IDS` map: its namespace,
/// name and uid, each NUL-padded (longer ones cut). The kernel programs never read it; it lets
/// a restarted agent name a pod that went away while no agent ran.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotId {
    pub namespace: [u8; 64],
    pub name: [u8; 128],
    pub uid: [u8; 64],
}

impl Default for SlotId {
    fn default() -> Self {
        Self {
            namespace: [0; 64],
            name: [0; 128],
            uid: [0; 64],
        }
    }
}

/// Where the maps are pinned so that an agent restart loses no counts and no socket state.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/draingate";

/// An IP address as the kernel programs see it: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so
/// one map serves both families and a dual-stack socket's IPv4-mapped address matches its pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct AddrKey {
    /// The address in network byte order.
    pub addr: [u8; 16],
}

impl AddrKey {
    /// The key of an IPv4 address given as its four octets.
    #[must_use]
    pub const fn v4(octets: [u8; 4]) -> Self {
        let [a, b, c, d] = octets;
        Self {
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
        }
    }

    /// The key of an IPv6 address given as its sixteen octets.
    #[must_use]
    pub const fn v6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }
}

impl From<core::net::IpAddr> for AddrKey {
    fn from(addr: core::net::IpAddr) -> Self {
        match addr {
            core::net::IpAddr::V4(v4) => Self::v4(v4.octets()),
            core::net::IpAddr::V6(v6) => Self::v6(v6.octets()),
        }
    }
}

impl From<AddrKey> for core::net::IpAddr {
    /// IPv4-mapped addresses come back as IPv4, the family user space gave them in.
    fn from(key: AddrKey) -> Self {
        let v6 = core::net::Ipv6Addr::from(key.addr);
        match v6.to_ipv4_mapped() {
            Some(v4) => Self::V4(v4),
            None => Self::V6(v6),
        }
    }
}

/// Per pod slot, per CPU. User space sums over CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SlotCounters {
    // The fields every connection changes come first, together: they share a cache line or two
    // (the kernel places per-CPU values 8-byte aligned), the rest are touched only by failures.
    /// Connections the pod accepted (`SYN_RECV` → `ESTABLISHED`).
    pub accepted: u64,
    /// Connections accepted while the pod's termination window was open (`WINDOWS`). The
    /// `win_` counts are counted in the kernel, so that nothing depends on when user space reads.
    pub win_accepted: u64,
    /// Kernel time (`bpf_ktime_get_boot_ns`) of the last accepted connection.
    pub last_accept_ns: u64,
    /// Connections the pod opened (`SYN_SENT` → `ESTABLISHED`).
    pub opened: u64,
    /// Pod sockets that entered the socket table on this CPU.
    pub sockets_tracked: u64,
    /// Pod sockets that left it (closed) on this CPU without the pod's process closing them
    /// first (a reset, an abort). A socket may enter on one CPU and leave on another, so only
    /// sums over all CPUs mean something: the pod's open connections are `sockets_tracked -
    /// sockets_untracked - released_closed`.
    pub sockets_untracked: u64,
    /// Tracked pod sockets that the pod's process closed, or shut down for sending
    /// (`FIN_WAIT1` or `LAST_ACK`): the process no longer holds them. The connections its
    /// processes still hold are `sockets_tracked - sockets_untracked - sockets_released`, the
    /// count an exit cuts.
    pub sockets_released: u64,
    /// Released sockets that then left the table (their closing handshake ended).
    pub released_closed: u64,
    /// Resets the pod sent on its connections.
    pub resets_sent: u64,
    /// Resets the pod received on established connections.
    pub resets_received: u64,
    /// Resets the pod sent for a segment that matched no socket: a SYN to a port nobody listens
    /// on (a refused connection), or a segment of a connection the pod no longer has.
    pub refused: u64,
    /// Connects by the pod that never got established (`SYN_SENT` → `CLOSE`).
    pub failed_connects: u64,
    pub win_resets_sent: u64,
    pub win_resets_received: u64,
    pub win_refused: u64,
    pub win_failed_connects: u64,
    /// Resets and refusals exchanged with the node's own addresses (kubelet probes), over the
    /// pod's life: counted here instead of `resets_sent`, `resets_received` and `refused`, so
    /// that they are never its errors.
    pub from_node: u64,
    /// Of those, inside the termination window.
    pub win_from_node: u64,
    /// HTTP/1.x responses the pod sent to clients (not the node), by status class: 1xx to 3xx,
    /// 4xx and 5xx. Read from the first bytes of the segments leaving the pod (the TC program):
    /// a status line that starts a segment.
    pub http_ok: u64,
    pub http_4xx: u64,
    /// A 5xx is a failed request: inside the window, an error.
    pub http_5xx: u64,
    pub win_http_5xx: u64,
    /// HTTP responses to the node's own addresses (kubelet probes), any status: never errors.
    pub http_from_node: u64,
    /// SYN-ACKs the pod sent, as the TC program saw them: a pod that accepted connections
    /// while the program saw none of its SYN-ACKs has packets that bypass it (an agent without
    /// the node's network namespace, a CNI that redirects them first), so its HTTP answers
    /// (and before 6.10 its resets) are not counted.
    pub synacks_seen: u64,
    /// HTTP/1.x requests cut: a client's request (a request line starting a segment to the
    /// pod) still unanswered when the pod closed the connection (its FIN: the process closed
    /// it, or its exit did). A request cut by a reset is counted as that reset, not here, so
    /// that one failed request is one count.
    pub requests_cut: u64,
    pub win_requests_cut: u64,
    /// HTTP/2 (cleartext, prior knowledge: the connection began with the client preface)
    /// frames the pod sent that start a segment: GOAWAY (the pod's drain signal, never an
    /// error), `RST_STREAM` with `REFUSED_STREAM` (the client may retry it: not an error) and
    /// `RST_STREAM` with any other code but `NO_ERROR` (a failed request: an error in the window).
    pub h2_goaways: u64,
    pub h2_resets_refused: u64,
    pub h2_resets: u64,
    pub win_h2_resets: u64,
}

/// Per CPU: events the kernel programs could not account for. Any non-zero field means counts
/// are incomplete, and user space reports it; nothing is lost silently.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LossCounters {
    /// A tracepoint field could not be read (`bpf_probe_read_kernel` failed).
    pub read_errors: u64,
    /// A pod socket could not be tracked because the socket table was full.
    pub socket_table_full: u64,
    /// A notable event was dropped because the ring buffer was full.
    pub ring_full: u64,
    /// A reset less than a second old was forgotten to remember a newer one (every cell of its
    /// bucket held one): a late repeat of that reset may be counted as a new failure. Never a
    /// failure missed, so it does not make verdicts unknown.
    pub reset_table_full: u64,
}

/// A bucket of the socket table: pod sockets not yet closed, by kernel address. It is an array
/// map's value, so the kernel inlines its lookup: no hashing of a key, no bucket lock, no
/// allocation. A program claims a free cell with an atomic compare-and-exchange on `sk`, then
/// writes the cell's `slot` and `state`; only the socket's own transitions, which the kernel
/// serialises, read or free the cell after that.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SocketBucket {
    /// Each cell's socket kernel address; 0 marks a free cell.
    pub sk: [u64; SOCKET_BUCKET_CELLS],
    /// Each cell's pod slot.
    pub slot: [u32; SOCKET_BUCKET_CELLS],
    /// Each cell's TCP state: the last one it entered before the closing handshake.
    pub state: [u8; SOCKET_BUCKET_CELLS],
    pub pad: u32,
    /// Sockets whose home is this bucket that live in a later one. While it is 0, a lookup that
    /// misses here is done: one cache line. Changed only by atomic adds.
    pub spilled: u64,
}

/// A connection by its 4-tuple, as the pod sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    pub local: AddrKey,
    pub remote: AddrKey,
    pub local_port: u16,
    pub remote_port: u16,
}

/// HTTP/1.x connections whose requests the packet programs follow (an LRU table: the least
/// recently used is forgotten first, which can only miss a cut request, never invent one).
pub const MAX_HTTP_CONNS: u32 = 65_536;

/// An HTTP/1.x connection of a pod, by [`ConnKey`], as the packet programs follow it: the
/// last request that started a segment to the pod, and whether it is still unanswered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HttpConn {
    /// TCP sequence number of the segment that carried the last request (a retransmission of
    /// it is not a new request).
    pub request_seq: u32,
    /// TCP sequence number of the segment that carried the last response (a retransmission
    /// of it is not counted again).
    pub response_seq: u32,
    /// 1 while the last request is unanswered (no final response, status 200 or more, has
    /// started a segment from the pod since).
    pub outstanding: u32,
    /// [`HTTP2`] once the client's first segment was the HTTP/2 preface, else 0.
    pub protocol: u32,
    /// The first 8 bytes of the last request (its method and the start of its path, e.g.
    /// `GET /api`), as loaded from the packet (memory order in a native `u64`).
    pub request: u64,
}

/// [`HttpConn::protocol`] of a connection that began with the HTTP/2 client preface.
pub const HTTP2: u32 = 2;

/// Connections recently reset, remembered so that later resets of the same connection (the peer
/// still sending, or closing, after the first reset destroyed the socket) count once: the reset
/// table's cells.
pub const MAX_RESET_CONNS: u32 = 32_768;

/// Cells per bucket of the reset table (one 64-byte cache line).
pub const RESET_BUCKET_CELLS: usize = 4;

/// Buckets of the reset table (a power of two).
pub const RESET_BUCKETS: u32 = MAX_RESET_CONNS / RESET_BUCKET_CELLS as u32;

/// A bucket of the reset table: 4-tuples reset lately, each by a keyed 64-bit hash of its
/// [`ConnKey`] ([`conn_hash`]), with when. Like the socket table, an array map's value, so that
/// a lookup is one cache line: no key hashing by the kernel, no bucket lock, no allocation. A
/// program claims a cell with an atomic compare-and-exchange on `key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ResetBucket {
    /// Each cell's [`conn_hash`]; 0 marks a free cell.
    pub key: [u64; RESET_BUCKET_CELLS],
    /// Each cell's time (boot-clock ns, with the programs' refusal mark in the low bit).
    pub at: [u64; RESET_BUCKET_CELLS],
}

/// Index of the reset table's hash seed in the `ADDR_GEN` map: random, written by the first
/// agent that creates the maps, and kept with them, so that every program (and every agent
/// after it) hashes alike while no one outside can pick 4-tuples that collide.
pub const RESET_SEED_INDEX: u32 = 2;

/// The reset table's hash of a 4-tuple, keyed by `seed`; never 0 (a free cell).
#[must_use]
pub const fn conn_hash(conn: &ConnKey, seed: u64) -> u64 {
    let [l0, l1] = addr_words(&conn.local);
    let [r0, r1] = addr_words(&conn.remote);
    let ports = ((conn.local_port as u64) << 16) | conn.remote_port as u64;
    let words = [l0, l1, r0, r1, ports];
    let mut hash = seed ^ 0x243F_6A88_85A3_08D3;
    let mut i = 0;
    while i < words.len() {
        hash = (hash ^ words[i]).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        hash ^= hash >> 29;
        i += 1;
    }
    if hash == 0 { 1 } else { hash }
}

/// The home bucket of a [`conn_hash`] in the reset table.
#[must_use]
pub const fn reset_home(hash: u64) -> u32 {
    (hash >> (64 - RESET_BUCKETS.trailing_zeros())) as u32
}

/// The `sock:inet_sock_set_state` record as kernels since 4.16 lay it out (field, offset): the
/// program compiled against it loads each field straight from the record. The loader uses that
/// program only when tracefs shows exactly this layout, and otherwise the one that takes every
/// offset from tracefs at load time.
pub mod set_state_layout {
    pub const SKADDR: usize = 8;
    pub const OLDSTATE: usize = 16;
    pub const NEWSTATE: usize = 20;
    pub const SPORT: usize = 24;
    pub const DPORT: usize = 26;
    pub const FAMILY: usize = 28;
    pub const PROTOCOL: usize = 30;
    pub const SADDR: usize = 32;
    pub const DADDR: usize = 36;
    pub const SADDR_V6: usize = 40;
    pub const DADDR_V6: usize = 56;

    /// Every field: its tracefs name, offset and size.
    pub const FIELDS: [(&str, usize, usize); 11] = [
        ("skaddr", SKADDR, 8),
        ("oldstate", OLDSTATE, 4),
        ("newstate", NEWSTATE, 4),
        ("sport", SPORT, 2),
        ("dport", DPORT, 2),
        ("family", FAMILY, 2),
        ("protocol", PROTOCOL, 2),
        ("saddr", SADDR, 4),
        ("daddr", DADDR, 4),
        ("saddr_v6", SADDR_V6, 16),
        ("daddr_v6", DADDR_V6, 16),
    ];
}

/// The `signal:signal_generate` record as kernels since 3.13 lay it out: the fixed program loads
/// its fields straight from the record, where tracefs shows exactly this layout.
pub mod signal_layout {
    pub const SIG: usize = 8;
    pub const PID: usize = 36;

    /// Every field the programs read: its tracefs name, offset and size.
    pub const FIELDS: [(&str, usize, usize); 2] = [("sig", SIG, 4), ("pid", PID, 4)];
}

/// The `sched:sched_process_exit` record as this project's kernels lay it out (`group_dead`
/// after `comm`, `pid` and `prio`); the fixed program is used only where tracefs shows it.
pub mod exit_layout {
    pub const GROUP_DEAD: usize = 32;

    /// Every field the programs read: its tracefs name, offset and size.
    pub const FIELDS: [(&str, usize, usize); 1] = [("group_dead", GROUP_DEAD, 1)];
}

/// Kinds of [`NotableEvent`].
pub mod event_kind {
    pub const RESET_SENT: u8 = 1;
    pub const RESET_RECEIVED: u8 = 2;
    pub const REFUSED: u8 = 3;
    pub const CONNECT_FAILED: u8 = 4;
    /// SIGTERM or SIGKILL generated for a process (`signal` holds which); `slot` is unknown
    /// (`NO_SLOT`) unless the process was known, user space resolves `pid`.
    pub const SIGNAL: u8 = 5;
    /// The last thread of a known pod process exited.
    pub const EXIT: u8 = 6;
    /// The pod answered a client's HTTP/1.x request with a 5xx status (`reason` holds it).
    pub const HTTP_5XX: u8 = 7;
    /// The pod closed a connection (FIN) with a client's HTTP/1.x request unanswered.
    pub const REQUEST_CUT: u8 = 8;
    /// The pod sent an HTTP/2 GOAWAY frame (`reason`: its error code): its drain signal.
    pub const H2_GOAWAY: u8 = 9;
    /// The pod reset an HTTP/2 stream with an error (`reason`: the `RST_STREAM` error code, any
    /// but `NO_ERROR` and `REFUSED_STREAM`).
    pub const H2_RESET: u8 = 10;
}

/// `reason` of a `CONNECT_FAILED` event: how the connect ended.
pub mod connect_failure {
    /// No answer from the address: a timeout, an ICMP error, or the client gave up. The address
    /// never saw the connection, so only the client's side can count it (the peer view).
    pub const NO_ANSWER: u32 = 0;
    /// The address answered the SYN with a reset: refused there, and counted there when that
    /// side is a watched pod.
    pub const RESET: u32 = 1;
}

/// `slot` of an event that the kernel could not attribute to a pod.
pub const NO_SLOT: u32 = u32::MAX;

/// The address table's slot for the node's own addresses (where kubelet probes come from): no
/// pod's, so never a socket's slot; a reset or refusal with such a peer counts in
/// `SlotCounters::from_node`, not as an error.
pub const NODE_SLOT: u32 = u32::MAX - 1;

/// `NotableEvent::flags`: the reset's peer is one of the node's own addresses (a probe).
pub const EVENT_FROM_NODE: u8 = 1;

/// A notable event, sent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NotableEvent {
    /// `bpf_ktime_get_boot_ns` when it happened.
    pub time_ns: u64,
    pub slot: u32,
    /// Process id (tgid) for SIGNAL and EXIT events.
    pub pid: u32,
    /// `sk_rst_reason` of a reset sent, where the kernel gives one (6.10+); 0 otherwise. For
    /// `CONNECT_FAILED`, one of [`connect_failure`]; for `HTTP_5XX`, the status.
    pub reason: u32,
    pub kind: u8,
    /// TCP state of the socket at the time, 0 when there was no socket.
    pub tcp_state: u8,
    /// Signal number for SIGNAL events.
    pub signal: u8,
    /// [`EVENT_FROM_NODE`], or 0.
    pub flags: u8,
    pub local_port: u16,
    pub remote_port: u16,
    /// EXIT: the pod's connections that its processes still held (had not closed) when the
    /// last one exited: the exit cuts them.
    pub held: u32,
    pub local: AddrKey,
    pub remote: AddrKey,
    /// `HTTP_5XX` and `REQUEST_CUT`: the first 8 bytes of the request it answered or cut (the
    /// method and the start of the path), zeros when the request was not seen.
    pub request: [u8; 8],
}

/// Kernel TCP state numbers (`include/net/tcp_states.h`), stable kernel ABI.
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
    pub const NEW_SYN_RECV: u32 = 12;

    /// The kernel's name of a state, as `ss` prints it.
    #[must_use]
    pub const fn name(state: u32) -> &'static str {
        match state {
            ESTABLISHED => "ESTABLISHED",
            SYN_SENT => "SYN_SENT",
            SYN_RECV => "SYN_RECV",
            FIN_WAIT1 => "FIN_WAIT1",
            FIN_WAIT2 => "FIN_WAIT2",
            TIME_WAIT => "TIME_WAIT",
            CLOSE => "CLOSE",
            CLOSE_WAIT => "CLOSE_WAIT",
            LAST_ACK => "LAST_ACK",
            LISTEN => "LISTEN",
            CLOSING => "CLOSING",
            NEW_SYN_RECV => "NEW_SYN_RECV",
            _ => "NONE",
        }
    }
}

const _: () = assert!(size_of::<AddrKey>() == 16);
const _: () = assert!(size_of::<SlotCounters>() == 240);
const _: () = assert!(size_of::<LossCounters>() == 32);
const _: () = assert!(SOCKET_PROBE_BUCKETS <= SOCKET_BUCKETS);
const _: () = assert!(size_of::<SocketBucket>() == 64);
const _: () = assert!(SOCKET_BUCKETS.is_power_of_two());
const _: () = assert!(size_of::<AddrBucket>() == 64);
const _: () = assert!(size_of::<ResetBucket>() == 64);
const _: () = assert!(RESET_BUCKETS.is_power_of_two());
const _: () = assert!(ADDR_BUCKETS.is_power_of_two());
const _: () = assert!(ADDR_PROBE_BUCKETS <= ADDR_BUCKETS);
const _: () = assert!(size_of::<NotableEvent>() == 72);
const _: () = assert!(size_of::<ConnKey>() == 36);
const _: () = assert!(size_of::<HttpConn>() == 24);

#[cfg(test)]
mod tests {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::AddrKey;

    #[test]
    fn ipv4_is_stored_mapped_and_comes_back_as_ipv4() {
        let ip = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 7));
        let key = AddrKey::from(ip);
        assert_eq!(
            key.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 7]
        );
        assert_eq!(IpAddr::from(key), ip);
    }

    #[test]
    fn ipv4_words_from_a_raw_u32_equal_those_from_the_bytes() {
        for octets in [
            [198, 18, 0, 7],
            [10, 244, 3, 200],
            [255, 255, 255, 255],
            [0, 0, 0, 1],
        ] {
            assert_eq!(
                super::addr_words_v4(u32::from_ne_bytes(octets)),
                super::addr_words(&AddrKey::v4(octets)),
                "{octets:?}"
            );
        }
    }

    #[test]
    fn ipv6_round_trips() {
        let ip = IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 9));
        assert_eq!(IpAddr::from(AddrKey::from(ip)), ip);
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` data without implicit padding; every bit pattern is a valid
    // value. The same holds for every type below.
    unsafe impl aya::Pod for super::AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlotCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LossCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SocketBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AddrBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NotableEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
    // SAFETY: plain old data, no padding.
    unsafe impl aya::Pod for super::HttpConn {}
    // SAFETY: as above (byte arrays only).
    unsafe impl aya::Pod for super::SlotId {}
}
