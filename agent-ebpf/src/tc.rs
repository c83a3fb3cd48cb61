//! The TC classifier `pod_egress`: the resets a pod sends, read from its packets, for kernels
//! whose `tcp:tcp_send_reset` misses refusals.

use aya_ebpf::{macros::classifier, programs::TcContext};
use draingate_common::{AddrKey, ConnKey};

use crate::{addr::pod_of, count::loss, tcp_reset::reset_sent};

/// `TC_ACT_UNSPEC` (and tcx's `TCX_NEXT`): the packet goes on to the next program or filter
/// on the interface (a CNI's) exactly as it came.
const TC_ACT_UNSPEC: i32 = -1;

/// Every reset a pod sends, seen as a packet leaving it, for kernels whose `tcp:tcp_send_reset`
/// misses some (before 6.10 it fires only for resets of a socket's own, never for a refusal:
/// a SYN to a closed port). The loader attaches it instead of that tracepoint's program, so
/// each reset has one source. Attached where the pod's packets leave it: on the pod's side of
/// its interface (egress) or on the node's side (ingress). It never changes or drops a packet.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the classifier macro fixes the signature"
)]
fn pod_egress(ctx: TcContext) -> i32 {
    if pod_packet_reset(&ctx).is_err() {
        loss(|l| l.read_errors += 1);
    }
    TC_ACT_UNSPEC
}

/// TCP flags.
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP_U8: u8 = 6;

fn pod_packet_reset(ctx: &TcContext) -> Result<(), i64> {
    // Most packets are not TCP resets: they cost the loads up to the TCP flags.
    let ethertype = u16::from_be(ctx.load::<u16>(12)?);
    let tcp_at = match ethertype {
        ETH_P_IP => {
            // Version and header length, then the protocol.
            let [vihl, _]: [u8; 2] = ctx.load(ETH_HLEN)?;
            if ctx.load::<u8>(ETH_HLEN + 9)? != IPPROTO_TCP_U8 {
                return Ok(());
            }
            ETH_HLEN + usize::from(vihl & 0x0f) * 4
        }
        // Extension headers before TCP are not followed: resets carry none.
        ETH_P_IPV6 if ctx.load::<u8>(ETH_HLEN + 6)? == IPPROTO_TCP_U8 => ETH_HLEN + 40,
        _ => return Ok(()),
    };
    let flags: u8 = ctx.load(tcp_at + 13)?;
    if flags & TCP_RST == 0 {
        return Ok(());
    }
    let (local, remote) = if ethertype == ETH_P_IP {
        let addrs: [u8; 8] = ctx.load(ETH_HLEN + 12)?;
        (
            AddrKey::v4([addrs[0], addrs[1], addrs[2], addrs[3]]),
            AddrKey::v4([addrs[4], addrs[5], addrs[6], addrs[7]]),
        )
    } else {
        let addrs: [u8; 32] = ctx.load(ETH_HLEN + 8)?;
        let (mut local, mut remote) = ([0u8; 16], [0u8; 16]);
        local.copy_from_slice(&addrs[..16]);
        remote.copy_from_slice(&addrs[16..]);
        (AddrKey::v6(local), AddrKey::v6(remote))
    };
    let Some(slot) = pod_of(&local) else {
        return Ok(());
    };
    // Ports, then the sequence number.
    let head: [u8; 8] = ctx.load(tcp_at)?;
    let conn = ConnKey {
        local,
        remote,
        local_port: u16::from_be_bytes([head[0], head[1]]),
        remote_port: u16::from_be_bytes([head[2], head[3]]),
    };
    // The kernel answers a segment that matched no socket and carried no ACK (a SYN) with a
    // reset that acknowledges it and has sequence number 0; a connection's own reset carries
    // its sequence number, and the answer to any other stray segment carries no ACK.
    let refused = flags & TCP_ACK != 0 && head[4..8] == [0, 0, 0, 0];
    reset_sent(slot, 0, 0, &conn, refused);
    Ok(())
}
