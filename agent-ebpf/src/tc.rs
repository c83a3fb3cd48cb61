//! The TC classifiers `pod_egress` and `pod_ingress`: what a pod sends and receives, read from
//! its packets: the status of each HTTP/1.x response and the requests its closes cut (every
//! kernel), and the resets it sends (kernels whose `tcp:tcp_send_reset` misses refusals).

use aya_ebpf::{macros::classifier, programs::TcContext};
use draingate_common::{
    AddrKey, ConnKey, HTTP2, HttpConn, NotableEvent, addr_words_v4, event_kind,
};

use crate::{
    addr::{is_node, pod_of},
    count::{count, loss, w},
    event::{Wake, conn_event, emit},
    maps::HTTP_CONNS,
    record::global,
    tcp_reset::reset_sent,
};

/// `TC_ACT_UNSPEC` (and tcx's `TCX_NEXT`): the packet goes on to the next program or filter
/// on the interface (a CNI's) exactly as it came.
const TC_ACT_UNSPEC: i32 = -1;

/// Set by user space at load time: non-zero where the resets a pod sends are counted from its
/// packets (kernels before 6.10, whose `tcp:tcp_send_reset` misses refusals), so that each
/// reset has one source.
#[unsafe(no_mangle)]
static RESETS_FROM_PACKETS: u64 = 0;

/// Every packet leaving a pod: the HTTP/1.x responses it sends, by status, the requests its
/// FINs leave unanswered (cut), and, where the kernel's `tcp:tcp_send_reset` misses some
/// (before 6.10 it fires only for resets of a socket's own, never for a refusal: a SYN to a
/// closed port), every reset it sends. Attached where the pod's packets leave it: on the pod's
/// side of its interface (egress) or on the node's side (ingress). It never changes or drops a
/// packet.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the classifier macro fixes the signature"
)]
fn pod_egress(ctx: TcContext) -> i32 {
    if pod_packet(&ctx).is_err() {
        loss(|l| l.read_errors += 1);
    }
    TC_ACT_UNSPEC
}

/// Every packet reaching a pod: the HTTP/1.x requests clients send it (a request line that
/// starts a segment), which `pod_egress` then sees answered or cut, and the resets clients
/// send (which end a connection's requests). Attached opposite `pod_egress`. It never changes
/// or drops a packet.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the classifier macro fixes the signature"
)]
fn pod_ingress(ctx: TcContext) -> i32 {
    if client_packet(&ctx).is_err() {
        loss(|l| l.read_errors += 1);
    }
    TC_ACT_UNSPEC
}

/// TCP flags.
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP_U8: u8 = 6;
/// Bytes of a response's status line read: `HTTP/1.1 503`.
const STATUS_LINE: usize = 12;
/// [`read_status`]'s tag of an HTTP/2 `RST_STREAM` frame (its error code in the low 16 bits).
const H2_RST_TAG: u32 = 1 << 31;
/// [`read_status`]'s tag of an HTTP/2 GOAWAY frame (its error code in the low 16 bits).
const H2_GOAWAY_TAG: u32 = 1 << 30;
/// HTTP/2 error codes (RFC 9113, section 7).
const H2_NO_ERROR: u32 = 0;
const H2_REFUSED_STREAM: u32 = 7;

/// Where the TCP header of an IPv4 or IPv6 TCP packet starts, with its ethertype; `None` for
/// anything else.
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "one copy per program: its two values stay in registers"
)]
fn tcp_at(ctx: &TcContext) -> Result<Option<(u16, usize)>, i64> {
    let ethertype = u16::from_be(ctx.load::<u16>(12)?);
    Ok(match ethertype {
        ETH_P_IP => {
            // Version and header length, then the protocol.
            let [vihl, _]: [u8; 2] = ctx.load(ETH_HLEN)?;
            if ctx.load::<u8>(ETH_HLEN + 9)? != IPPROTO_TCP_U8 {
                return Ok(None);
            }
            Some((ethertype, ETH_HLEN + usize::from(vihl & 0x0f) * 4))
        }
        // Extension headers before TCP are not followed: HTTP and resets carry none.
        ETH_P_IPV6 if ctx.load::<u8>(ETH_HLEN + 6)? == IPPROTO_TCP_U8 => {
            Some((ethertype, ETH_HLEN + 40))
        }
        _ => None,
    })
}

/// The packet's source and destination addresses, as words (see [`key`]).
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "one copy per program, after its cheap tests"
)]
fn addresses(ctx: &TcContext, ethertype: u16) -> Result<(AddrKey, AddrKey), i64> {
    // As words, never byte by byte: bytes kept across a call are spilled one stack slot each.
    let (source, destination) = if ethertype == ETH_P_IP {
        let raw: [u32; 2] = ctx.load(ETH_HLEN + 12)?;
        (addr_words_v4(raw[0]), addr_words_v4(raw[1]))
    } else {
        let raw: [u64; 4] = ctx.load(ETH_HLEN + 8)?;
        ([raw[0], raw[1]], [raw[2], raw[3]])
    };
    Ok((key(source), key(destination)))
}

fn pod_packet(ctx: &TcContext) -> Result<(), i64> {
    // Most packets are neither resets, FINs nor the start of a response: they cost the loads
    // up to the TCP header, and a segment with data the first bytes of its data.
    let Some((ethertype, tcp_at)) = tcp_at(ctx)? else {
        return Ok(());
    };
    // Ports, sequence number, acknowledgement number, data offset and flags.
    let head: [u8; 14] = ctx.load(tcp_at)?;
    let flags = head[13];
    // Only these outlive the address lookups below (a byte array kept across a call is spilled
    // byte by byte, and the verifier of 6.1 adds up a chain of calls' frames: at most 512).
    let local_port = u16::from_be_bytes([head[0], head[1]]);
    let remote_port = u16::from_be_bytes([head[2], head[3]]);
    let seq = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let reset = flags & TCP_RST != 0;
    let fin = flags & TCP_FIN != 0;
    // Counted so that user space knows the program sees the pod's packets at all.
    let synack = flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    let status = if reset || synack {
        0
    } else {
        let data_at = tcp_at + usize::from(head[12] >> 4) * 4;
        let status = if (ctx.len() as usize) < data_at + STATUS_LINE {
            0
        } else {
            read_status(ctx, data_at)?
        };
        // A FIN may cut a request even without a response.
        if status == 0 && !fin {
            return Ok(());
        }
        status
    };
    let (local, remote) = addresses(ctx, ethertype)?;
    let Some(slot) = pod_of(&local) else {
        return Ok(());
    };
    let conn = ConnKey {
        local,
        remote,
        local_port,
        remote_port,
    };
    if reset {
        // The connection's requests end with it: one cut by a reset is counted as the reset.
        forget_conn(&conn);
        if global(&RESETS_FROM_PACKETS) == 0 {
            return Ok(());
        }
        // The kernel answers a segment that matched no socket and carried no ACK (a SYN) with
        // a reset that acknowledges it and has sequence number 0; a connection's own reset
        // carries its sequence number, and the answer to any other stray segment carries no
        // ACK.
        let refused = flags & TCP_ACK != 0 && seq == 0;
        reset_sent(slot, 0, 0, &conn, refused);
    } else if synack {
        count_synack(slot);
    } else {
        if status >= H2_GOAWAY_TAG {
            h2_frame(slot, &conn, status, seq);
        } else if status != 0 {
            // Looked up here, not in `http_response`: the verifier of 6.1 adds up the frames
            // of a chain of calls (at most 512 bytes), and that one's is the largest.
            let from_node = is_node(&conn.remote);
            let mut request = 0u64;
            if answer(&conn, seq, status, &mut request) {
                http_response(slot, status, &conn, from_node, request);
            }
        }
        if fin {
            closed_by_pod(slot, &conn);
        }
    }
    Ok(())
}

/// Requests begin with a method and a space: the methods of RFC 9110 and `PATCH`, by their
/// first four bytes (`GET ` and `PUT ` include the space).
const METHODS: [[u8; 4]; 8] = [
    *b"GET ", *b"POST", *b"PUT ", *b"HEAD", *b"DELE", *b"PATC", *b"OPTI", *b"CONN",
];

fn client_packet(ctx: &TcContext) -> Result<(), i64> {
    let Some((ethertype, tcp_at)) = tcp_at(ctx)? else {
        return Ok(());
    };
    let head: [u8; 14] = ctx.load(tcp_at)?;
    let flags = head[13];
    let reset = flags & TCP_RST != 0;
    if !reset {
        // Pure ACKs, the bulk of what clients send while they download, stop here.
        let data_at = tcp_at + usize::from(head[12] >> 4) * 4;
        if flags & TCP_SYN != 0 || (ctx.len() as usize) < data_at + 4 {
            return Ok(());
        }
        let first: [u8; 4] = ctx.load(data_at)?;
        if !METHODS.contains(&first) && first != *PREFACE {
            return Ok(());
        }
    }
    let (remote, local) = addresses(ctx, ethertype)?;
    if pod_of(&local).is_none() {
        return Ok(());
    }
    let conn = ConnKey {
        local,
        remote,
        local_port: u16::from_be_bytes([head[2], head[3]]),
        remote_port: u16::from_be_bytes([head[0], head[1]]),
    };
    if reset {
        // The client gave up the connection, and any request on it.
        forget_conn(&conn);
    } else if !is_node(&conn.remote) {
        // Probes from the node are not clients' requests: never cut.
        let seq = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        // The first bytes again, as a word (a byte array kept across the calls above would be
        // spilled byte by byte): a method and the start of the path, or the HTTP/2 preface.
        let data_at = tcp_at + usize::from(head[12] >> 4) * 4;
        let line: u64 = if (ctx.len() as usize) >= data_at + 8 {
            ctx.load(data_at)?
        } else {
            u64::from(ctx.load::<u32>(data_at)?)
        };
        if line as u32 == u32::from_ne_bytes(*PREFACE) {
            http2(&conn);
        } else {
            request(&conn, seq, line);
        }
    }
    Ok(())
}

/// The first four bytes of the HTTP/2 client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`),
/// with which a cleartext HTTP/2 connection with prior knowledge (gRPC's) begins.
const PREFACE: &[u8; 4] = b"PRI ";

/// `conn` began with the HTTP/2 preface: its frames are HTTP/2's, its requests are never
/// outstanding (a segment that starts with a method inside it is data). Not inlined (see
/// [`request`]).
#[inline(never)]
fn http2(conn: &ConnKey) {
    let state = HttpConn {
        request_seq: 0,
        response_seq: 0,
        outstanding: 0,
        protocol: HTTP2,
        request: 0,
    };
    let _ = HTTP_CONNS.insert(conn, state, 0);
}

/// An HTTP/2 frame that starts a segment pod `slot` sent on `conn` ([`read_status`]'s tag and
/// error code), if `conn` began with the HTTP/2 preface: a GOAWAY, or a `RST_STREAM` by its
/// error code, in the segment with sequence number `seq`. Not inlined (see [`request`]).
#[inline(never)]
fn h2_frame(slot: u32, conn: &ConnKey, frame: u32, seq: u32) {
    let Some(known) = HTTP_CONNS.get_ptr_mut(conn) else {
        return;
    };
    // SAFETY: as in `request`. A retransmission of the segment (its sequence number again) is
    // not counted again.
    unsafe {
        if (*known).protocol != HTTP2 || (*known).response_seq == seq {
            return;
        }
        (*known).response_seq = seq;
    }
    let code = frame & 0xffff;
    let kind = if frame & H2_RST_TAG != 0 {
        match code {
            H2_NO_ERROR => return,
            H2_REFUSED_STREAM => {
                count(slot, |c, _| c.h2_resets_refused += 1);
                return;
            }
            _ => {
                count(slot, |c, win| {
                    c.h2_resets += 1;
                    c.win_h2_resets += w(win);
                });
                event_kind::H2_RESET
            }
        }
    } else {
        count(slot, |c, _| c.h2_goaways += 1);
        event_kind::H2_GOAWAY
    };
    emit(&conn_event(slot, kind, code, conn), Wake::Batched);
}

/// A request on `conn` in the segment with sequence number `seq`, whose first 8 bytes are
/// `line` (memory order): outstanding until answered. A retransmission of the last request's
/// segment is not a new request. Not inlined, to keep the map's key and value out of the
/// caller's frame.
#[inline(never)]
fn request(conn: &ConnKey, seq: u32, line: u64) {
    if let Some(known) = HTTP_CONNS.get_ptr_mut(conn) {
        // SAFETY: a hash map value, which the kernel keeps alive while the program runs; only
        // this connection's packets write it, and they do not race.
        unsafe {
            if (*known).protocol != HTTP2 && (*known).request_seq != seq {
                (*known).request_seq = seq;
                (*known).outstanding = 1;
                (*known).request = line;
            }
        }
        return;
    }
    let state = HttpConn {
        request_seq: seq,
        response_seq: 0,
        outstanding: 1,
        protocol: 0,
        request: line,
    };
    // A full table forgets its least recently used connection (the insert does not fail).
    let _ = HTTP_CONNS.insert(conn, state, 0);
}

/// A response with `status` starting the segment with sequence number `seq` that the pod sent
/// on `conn`: a final one (200 or more) answers the outstanding request, whose first bytes it
/// leaves in `request` (0 when no request was seen). False for a retransmission of the last
/// response, which is not counted again. Not inlined (see [`request`]).
#[inline(never)]
fn answer(conn: &ConnKey, seq: u32, status: u32, request: &mut u64) -> bool {
    let Some(known) = HTTP_CONNS.get_ptr_mut(conn) else {
        return true;
    };
    // SAFETY: as in `request`.
    unsafe {
        if (*known).response_seq == seq && (*known).outstanding == 0 {
            return false;
        }
        if (*known).outstanding != 0 {
            *request = (*known).request;
        }
        (*known).response_seq = seq;
        if status >= 200 {
            (*known).outstanding = 0;
        }
    }
    if status == 101 {
        // Switching protocols: what follows is not HTTP/1.x.
        forget_conn(conn);
    }
    true
}

/// The pod closed `conn` (its FIN): a request still outstanding is cut, counted with its
/// event. Not inlined (see [`request`]).
#[inline(never)]
fn closed_by_pod(slot: u32, conn: &ConnKey) {
    let Some(known) = HTTP_CONNS.get_ptr_mut(conn) else {
        return;
    };
    // SAFETY: as in `request`; read before the entry is removed.
    let (outstanding, request) = unsafe { ((*known).outstanding != 0, (*known).request) };
    // Closed either way: its requests end here.
    forget_conn(conn);
    if !outstanding {
        return;
    }
    count(slot, |c, win| {
        c.requests_cut += 1;
        c.win_requests_cut += w(win);
    });
    emit(
        &NotableEvent {
            request: request.to_ne_bytes(),
            ..conn_event(slot, event_kind::REQUEST_CUT, 0, conn)
        },
        Wake::Batched,
    );
}

/// Forgets `conn`'s requests (the connection ended). Not inlined (see [`request`]).
#[inline(never)]
fn forget_conn(conn: &ConnKey) {
    let _ = HTTP_CONNS.remove(conn);
}

/// Counts a SYN-ACK of pod `slot`. Not inlined, to keep `pod_packet`'s frame small.
#[inline(never)]
fn count_synack(slot: u32) {
    count(slot, |c, _| c.synacks_seen += 1);
}

/// The address whose [`draingate_common::addr_words`] are `words`.
fn key(words: [u64; 2]) -> AddrKey {
    // SAFETY: any two u64 are sixteen valid bytes, in memory order, as `addr_words` reads them.
    let addr = unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) };
    AddrKey { addr }
}

/// The status of the HTTP/1.x status line at `data_at`; for an HTTP/2 `RST_STREAM` or GOAWAY
/// frame header there, [`H2_RST_TAG`] or [`H2_GOAWAY_TAG`] with the frame's error code; 0 for
/// anything else. Not inlined: its buffer stays out of the caller's frame (see `pod_packet`'s
/// calls).
#[inline(never)]
fn read_status(ctx: &TcContext, data_at: usize) -> Result<u32, i64> {
    let line: [u8; STATUS_LINE] = ctx.load(data_at)?;
    if let Some(status) = status(&line) {
        return Ok(status);
    }
    // A frame header: a 24-bit length, type, flags, a 31-bit stream id. Only shapes no text
    // begins with: RST_STREAM (3) of length 4 on a stream, GOAWAY (7) of 8 or more on stream 0.
    if line[0] != 0 || line[4] != 0 {
        return Ok(0);
    }
    let stream = u32::from_be_bytes([line[5], line[6], line[7], line[8]]) & 0x7fff_ffff;
    let (tag, code_at) = match line[3] {
        3 if line[1] == 0 && line[2] == 4 && stream != 0 => (H2_RST_TAG, 9),
        7 if (line[1] != 0 || line[2] >= 8) && stream == 0 => (H2_GOAWAY_TAG, 13),
        _ => return Ok(0),
    };
    // A segment too short for the code is no such frame: not a read error.
    let Ok(code) = ctx.load::<[u8; 4]>(data_at + code_at) else {
        return Ok(0);
    };
    Ok(tag | (u32::from_be_bytes(code) & 0xffff))
}

/// The status of an HTTP/1.x status line (`HTTP/1.1 503 ...`), or `None` for anything else:
/// a request, a response's body, another protocol.
fn status(line: &[u8; STATUS_LINE]) -> Option<u32> {
    if line[..7] != *b"HTTP/1." || line[8] != b' ' {
        return None;
    }
    let digit = |b: u8| b.is_ascii_digit().then(|| u32::from(b - b'0'));
    let status = digit(line[9])? * 100 + digit(line[10])? * 10 + digit(line[11])?;
    (100..600).contains(&status).then_some(status)
}

/// Counts a response with `status` that pod `slot` sent on `conn`: by class, a 5xx with its
/// event (with `request`, the first bytes of the request it answered, 0 if unseen); responses
/// to the node's own addresses (`from_node`: kubelet probes) apart, never errors.
#[inline(never)]
fn http_response(slot: u32, status: u32, conn: &ConnKey, from_node: bool, request: u64) {
    if from_node {
        count(slot, |c, _| c.http_from_node += 1);
        return;
    }
    count(slot, |c, win| match status / 100 {
        5 => {
            c.http_5xx += 1;
            c.win_http_5xx += w(win);
        }
        4 => c.http_4xx += 1,
        _ => c.http_ok += 1,
    });
    if status >= 500 {
        emit(
            &NotableEvent {
                request: request.to_ne_bytes(),
                ..conn_event(slot, event_kind::HTTP_5XX, status, conn)
            },
            Wake::Batched,
        );
    }
}
