use std::time::{Duration, SystemTime};

use super::{PodDrain, Verdict};
use crate::{inventory::PodId, loader::SlotTotals};

fn pod() -> PodDrain {
    let id = PodId {
        namespace: "local".into(),
        name: "web".into(),
        uid: "netns-1".into(),
    };
    let mut pod = PodDrain::new(id, 3, SystemTime::UNIX_EPOCH);
    pod.pids = vec![42];
    pod
}

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// Counters as the kernel reports them: `resets_sent` and `refused` inside the window, on top of
/// 7 resets before it.
fn totals(open: u64, resets_sent: u64, refused: u64) -> SlotTotals {
    SlotTotals {
        accepted: 100,
        open,
        resets_sent: 7 + resets_sent,
        refused,
        win_resets_sent: resets_sent,
        win_refused: refused,
        ..SlotTotals::default()
    }
}

#[test]
fn no_window_no_verdict() {
    let mut pod = pod();
    pod.update_totals(totals(5, 3, 0), t(1));
    assert_eq!(pod.verdict(), Verdict::None);
    assert_eq!(pod.errors(), 0, "errors before the window do not count");
}

#[test]
fn pending_while_open_then_pass_when_drained_and_exited() {
    let mut pod = pod();
    pod.update_totals(totals(4, 0, 0), t(1));
    pod.open_window(t(2));
    assert_eq!(pod.verdict(), Verdict::Pending);
    pod.update_totals(totals(0, 0, 0), t(3));
    assert_eq!(pod.timeline.drained_at, Some(t(3)));
    assert_eq!(pod.verdict(), Verdict::Pending, "process still alive");
    pod.pids.clear();
    pod.exited(t(4));
    assert_eq!(pod.open_at_exit, Some(0));
    assert_eq!(pod.verdict_and_reason().0, Verdict::Pass);
}

#[test]
fn a_reset_or_refusal_inside_the_window_fails() {
    let mut pod = pod();
    pod.open_window(t(1));
    pod.update_totals(totals(0, 1, 0), t(2));
    assert_eq!(pod.verdict(), Verdict::Fail);
    let mut pod = self::pod();
    pod.open_window(t(1));
    pod.update_totals(totals(0, 0, 2), t(2));
    assert_eq!(pod.errors(), 2);
    assert_eq!(pod.verdict(), Verdict::Fail);
}

#[test]
fn connections_open_at_exit_fail() {
    let mut pod = pod();
    pod.open_window(t(1));
    pod.update_totals(totals(3, 0, 0), t(2));
    pod.pids.clear();
    pod.exited(t(3));
    assert_eq!(pod.open_at_exit, Some(3));
    // Even once the kernel has closed them all afterwards.
    pod.update_totals(totals(0, 0, 0), t(4));
    let (verdict, reason) = pod.verdict_and_reason();
    assert_eq!(verdict, Verdict::Fail);
    assert!(reason.contains("3 connections still open"), "{reason}");
}

#[test]
fn lost_data_is_unknown_never_pass() {
    let mut pod = pod();
    pod.open_window(t(1));
    pod.pids.clear();
    pod.exited(t(2));
    pod.lost = Some("ring buffer full".into());
    assert_eq!(pod.verdict(), Verdict::Unknown);
}

#[test]
fn totals_freeze_when_the_window_closes() {
    let mut pod = pod();
    pod.open_window(t(1));
    pod.update_totals(totals(0, 0, 0), t(2));
    pod.timeline.window_closed_at = Some(t(3));
    pod.update_totals(totals(0, 9, 9), t(3));
    assert_eq!(pod.errors(), 0);
}

#[test]
fn the_event_log_is_bounded() {
    let mut pod = pod();
    let event = super::PodEvent {
        pod: pod.id.clone(),
        kind: super::EventKind::Refused,
        time: t(1),
        local: "198.18.0.1".parse().unwrap(),
        local_port: 80,
        remote: "198.18.0.2".parse().unwrap(),
        remote_port: 4000,
        tcp_state: "NONE",
        reason: 0,
        in_window: false,
    };
    for _ in 0..super::EVENTS_PER_POD + 5 {
        pod.push_event(event.clone());
    }
    assert_eq!(pod.events.len(), super::EVENTS_PER_POD);
    assert_eq!(pod.events_dropped, 5);
}
