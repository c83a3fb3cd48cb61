//! A pod slot's counters as the agent reads them: the kernel's per-CPU counts summed.

use aya::maps::PerCpuValues;
use draingate_common::SlotCounters;

/// A pod slot's counters summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotTotals {
    pub accepted: u64,
    pub opened: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub refused: u64,
    pub failed_connects: u64,
    /// Connections in any state but LISTEN and CLOSE, now.
    pub open: u64,
    /// Boot-clock time of the last accepted connection, 0 when none.
    pub last_accept_ns: u64,
    /// Counted by the kernel only while the termination window was open.
    pub win_accepted: u64,
    pub win_resets_sent: u64,
    pub win_resets_received: u64,
    pub win_refused: u64,
    pub win_failed_connects: u64,
    /// Resets and refusals with the node's own addresses (kubelet probes): not errors.
    pub from_node: u64,
    pub win_from_node: u64,
    /// HTTP/1.x responses to clients by status class (1xx to 3xx, 4xx, 5xx), the 5xx inside
    /// the window, and responses to the node's own addresses (kubelet probes, any status).
    pub http_ok: u64,
    pub http_4xx: u64,
    pub http_5xx: u64,
    pub win_http_5xx: u64,
    pub http_from_node: u64,
    /// SYN-ACKs the pod sent that the packet program saw (see [`SlotCounters::synacks_seen`]).
    pub synacks_seen: u64,
    /// HTTP/1.x requests the pod's FIN left unanswered (see [`SlotCounters::requests_cut`]),
    /// and of those inside the window.
    pub requests_cut: u64,
    pub win_requests_cut: u64,
    /// HTTP/2 frames the pod sent (see [`SlotCounters::h2_goaways`]): GOAWAYs, streams
    /// refused (`REFUSED_STREAM`), streams reset with an error, and of those inside the window.
    pub h2_goaways: u64,
    pub h2_resets_refused: u64,
    pub h2_resets: u64,
    pub win_h2_resets: u64,
}

impl SlotTotals {
    pub(super) fn sum(per_cpu: &PerCpuValues<SlotCounters>) -> Self {
        let mut totals = Self::default();
        let (mut tracked, mut gone) = (0u64, 0u64);
        for cpu in per_cpu.iter() {
            totals.accepted += cpu.accepted;
            totals.opened += cpu.opened;
            totals.resets_sent += cpu.resets_sent;
            totals.resets_received += cpu.resets_received;
            totals.refused += cpu.refused;
            totals.failed_connects += cpu.failed_connects;
            totals.last_accept_ns = totals.last_accept_ns.max(cpu.last_accept_ns);
            totals.win_accepted += cpu.win_accepted;
            totals.win_resets_sent += cpu.win_resets_sent;
            totals.win_resets_received += cpu.win_resets_received;
            totals.win_refused += cpu.win_refused;
            totals.win_failed_connects += cpu.win_failed_connects;
            totals.from_node += cpu.from_node;
            totals.win_from_node += cpu.win_from_node;
            totals.http_ok += cpu.http_ok;
            totals.http_4xx += cpu.http_4xx;
            totals.http_5xx += cpu.http_5xx;
            totals.win_http_5xx += cpu.win_http_5xx;
            totals.http_from_node += cpu.http_from_node;
            totals.synacks_seen += cpu.synacks_seen;
            totals.requests_cut += cpu.requests_cut;
            totals.win_requests_cut += cpu.win_requests_cut;
            totals.h2_goaways += cpu.h2_goaways;
            totals.h2_resets_refused += cpu.h2_resets_refused;
            totals.h2_resets += cpu.h2_resets;
            totals.win_h2_resets += cpu.win_h2_resets;
            tracked = tracked.wrapping_add(cpu.sockets_tracked);
            // Sockets leave the table untracked, or closed after their process released them.
            gone = gone
                .wrapping_add(cpu.sockets_untracked)
                .wrapping_add(cpu.released_closed);
        }
        // Never negative unless a close was counted without its open (a bug); show 0 then.
        totals.open = tracked.saturating_sub(gone);
        totals
    }
}
