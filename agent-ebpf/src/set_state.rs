//! `sock:inet_sock_set_state`: connections starting, opening, failing to open, released by
//! their process and closing; the socket table follows each pod socket until it closes.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use draingate_common::{
    AddrKey, ConnKey, NotableEvent, addr_words_v4, connect_failure, event_kind, tcp_state,
};

use crate::{
    addr::pod_of_words,
    count::{SocketCount, count, count_socket, loss, now, run, w},
    event::{Wake, emit},
    maps::SLOT_COUNTERS,
    record::{AF_INET, AF_INET6, FixedLayout, IPPROTO_TCP, Record, SetStateFields, Sss},
    reset_table::{recently_reset, reset_hash},
    socket_table::{SocketCell, find_socket, released, track_socket},
};

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
