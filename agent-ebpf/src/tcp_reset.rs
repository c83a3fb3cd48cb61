//! `tcp:tcp_send_reset` and `tcp:tcp_receive_reset`: the resets a pod sends and receives, and
//! its refusals, each failure counted once (see [`crate::reset_table`]).

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use draingate_common::{AddrKey, ConnKey, EVENT_FROM_NODE, NotableEvent, event_kind, tcp_state};

use crate::{
    addr::{is_node, pod_of},
    count::{count, now, run, w},
    event::{Wake, conn_event, emit},
    record::{
        ABSENT, AF_INET, AF_INET6, RCV_DADDR, RCV_DADDR_V6, RCV_DPORT, RCV_FAMILY, RCV_SADDR,
        RCV_SADDR_V6, RCV_SKADDR, RCV_SPORT, RST_DADDR, RST_REASON, RST_SADDR, RST_SKADDR,
        RST_STATE, Record, global,
    },
    reset_table::{REFUSAL_MARK, first_reset, mark_reset, recently_reset, reset_hash, reset_time},
    socket_table::find_socket,
};

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
pub(crate) fn reset_sent(slot: u32, state: u32, reason: u32, conn: &ConnKey, refused: bool) {
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
            tcp_state: state as u8,
            flags,
            ..conn_event(slot, kind, reason, conn)
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
