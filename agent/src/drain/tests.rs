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
        from_node: false,
        service: None,
        request: None,
    };
    for _ in 0..super::EVENTS_PER_POD + 5 {
        pod.push_event(event.clone());
    }
    assert_eq!(pod.events.len(), super::EVENTS_PER_POD);
    assert_eq!(pod.events_dropped, 5);
}

fn refusal(secs: u64, from_node: bool, in_window: bool) -> super::PodEvent {
    super::PodEvent {
        pod: pod().id,
        kind: super::EventKind::Refused,
        time: t(secs),
        local: "198.18.0.1".parse().unwrap(),
        local_port: 80,
        remote: "198.18.0.2".parse().unwrap(),
        remote_port: 4000,
        tcp_state: "NONE",
        reason: 0,
        in_window,
        from_node,
        service: None,
        request: None,
    }
}

#[test]
fn startup_errors_are_the_ones_outside_the_window_split_at_readiness() {
    let mut pod = pod();
    // Two refusals before it was ready, one after; a probe's refusal (the node's) is no error.
    pod.push_event(refusal(1, false, false));
    pod.push_event(refusal(2, false, false));
    pod.push_event(refusal(2, true, false));
    pod.ready(t(3));
    pod.push_event(refusal(4, false, false));
    pod.update_totals(
        SlotTotals {
            refused: 3,
            from_node: 1,
            ..SlotTotals::default()
        },
        t(5),
    );
    let startup = pod.startup();
    assert_eq!((startup.errors(), startup.before_ready), (3, 2));
    assert_eq!(startup.first_error_at, Some(t(1)));
    let reason = startup.reason("web-v2-1");
    assert!(
        reason.starts_with("web-v2-1 refused 3 connections") && reason.contains("readiness probe"),
        "{reason}"
    );
    // The termination window's errors are its drain's, not its start's.
    pod.open_window(t(6));
    pod.push_event(refusal(7, false, true));
    pod.update_totals(
        SlotTotals {
            refused: 4,
            win_refused: 1,
            ..SlotTotals::default()
        },
        t(8),
    );
    assert_eq!(pod.startup().errors(), 3);
    assert_eq!(pod.errors(), 1);
    // Errors the events missed (lost) count as before readiness: never fewer than counted.
    let mut lossy = self::pod();
    lossy.update_totals(
        SlotTotals {
            refused: 5,
            ..SlotTotals::default()
        },
        t(1),
    );
    assert_eq!(
        (lossy.startup().errors(), lossy.startup().before_ready),
        (5, 5)
    );
    assert_eq!(super::Startup::default().reason("x"), "");
}

#[test]
fn an_exit_before_the_window_is_forgotten_when_processes_come_back() {
    // A short command in the pod's namespace exited before the server started: not the pod's
    // end, and its real exit must still be recorded.
    let mut pod = pod();
    pod.exited_with_open(t(1), 0);
    pod.running_again();
    assert_eq!((pod.timeline.exited_at, pod.open_at_exit), (None, None));
    pod.open_window(t(5));
    pod.exited_with_open(t(6), 2);
    pod.running_again();
    assert_eq!(
        pod.timeline.exited_at,
        Some(t(6)),
        "inside the window an exit stands"
    );
    assert_eq!(pod.verdict(), Verdict::Fail);
}

#[test]
fn errors_before_the_agent_learned_of_the_deletion_are_the_windows() {
    // Deleted at 10; the agent learned of it at 12, when the kernel began counting the window.
    let mut pod = pod();
    pod.pids.clear();
    pod.push_event(refusal(9, false, false));
    pod.push_event(refusal(11, false, false));
    pod.push_event(refusal(11, true, false));
    pod.open_window_late(t(10), t(12));
    assert_eq!(
        pod.errors(),
        1,
        "the refusal at 11, not the one at 9 nor the probe's"
    );
    // One at 11.5 read from the ring after the window opened: in the window, not in the
    // kernel's counters either. One at 13 is in the counters.
    pod.push_event(refusal(11, false, true));
    pod.push_event(refusal(13, false, true));
    // The kernel's totals: the four clients' refusals, the one at 13 in its window.
    pod.update_totals(
        SlotTotals {
            refused: 4,
            win_refused: 1,
            ..SlotTotals::default()
        },
        t(14),
    );
    pod.exited(t(14));
    let (verdict, reason) = pod.verdict_and_reason();
    assert_eq!((verdict, pod.errors()), (Verdict::Fail, 3), "{reason}");
    assert!(reason.contains("2 before the agent learned"), "{reason}");
    // And the startup errors keep only the one before the window.
    assert_eq!(pod.startup().errors(), 1);
    assert_eq!(
        (pod.startup().first_error_at, pod.startup().last_error_at),
        (Some(t(9)), Some(t(9)))
    );
}

#[test]
fn connects_without_answer_are_counted_once_whether_the_window_was_learned_late_or_not() {
    // Clients' connects to the pod that got no answer, at 9, 11 and 13; deleted at 10, learned
    // at 12: the one at 11 moves from its startup to its window, and none is lost on the way.
    let no_answer = |secs, in_window| super::PodEvent {
        kind: super::EventKind::PeerConnectFailed,
        ..refusal(secs, false, in_window)
    };
    let mut pod = pod();
    pod.push_event(no_answer(9, false));
    pod.push_event(no_answer(11, false));
    assert_eq!((pod.no_answer(), pod.startup().no_answer), (2, 2));
    pod.open_window_late(t(10), t(12));
    assert_eq!((pod.no_answer(), pod.startup().no_answer), (2, 1));
    // One in the window, as the agent counts it (`peer_failures`, then the event).
    pod.peer_failures += 1;
    pod.push_event(no_answer(13, true));
    assert_eq!((pod.no_answer(), pod.startup().no_answer), (3, 1));
    assert_eq!(
        pod.errors(),
        2,
        "the window's: the one at 11 and the one at 13"
    );
}

#[test]
fn a_drained_pod_passes_only_once_it_exited() {
    // No processes known (Kubernetes without hostPID): drained is not done.
    let mut pod = pod();
    pod.pids.clear();
    pod.open_window(t(2));
    pod.update_totals(totals(0, 0, 0), t(3));
    assert_eq!(pod.verdict(), Verdict::Pending);
    pod.exited(t(4));
    assert_eq!(pod.verdict(), Verdict::Pass);
}

fn http_5xx(secs: u64, in_window: bool) -> super::PodEvent {
    super::PodEvent {
        kind: super::EventKind::Http5xx,
        reason: 503,
        tcp_state: "NONE",
        ..refusal(secs, false, in_window)
    }
}

#[test]
fn http_5xx_answers_are_errors_in_the_window_and_at_startup_and_late_ones_are_the_windows() {
    let mut pod = pod();
    // A new pod's 503 before it was ready, and a 404 (no error: counted by class only).
    pod.push_event(http_5xx(1, false));
    pod.update_totals(
        SlotTotals {
            http_ok: 40,
            http_4xx: 1,
            http_5xx: 1,
            ..SlotTotals::default()
        },
        t(2),
    );
    let startup = pod.startup();
    assert_eq!((startup.errors(), startup.http_5xx), (1, 1));
    assert!(
        startup.reason("web").contains("1 HTTP 5xx"),
        "{}",
        startup.reason("web")
    );
    // Deleted at 10, learned at 12: the 503 at 11 is the window's, from its event; the two at
    // 13 are in the kernel's window count.
    pod.push_event(http_5xx(11, false));
    pod.open_window_late(t(10), t(12));
    pod.push_event(http_5xx(13, true));
    pod.push_event(http_5xx(13, true));
    pod.update_totals(
        SlotTotals {
            http_ok: 50,
            http_5xx: 4,
            win_http_5xx: 2,
            ..SlotTotals::default()
        },
        t(14),
    );
    pod.exited(t(14));
    let (verdict, reason) = pod.verdict_and_reason();
    assert_eq!((verdict, pod.errors()), (Verdict::Fail, 3), "{reason}");
    assert!(reason.contains("2 HTTP 5xx responses"), "{reason}");
    assert_eq!(pod.startup().http_5xx, 1, "only the one before the window");
    // The same answers to the node's addresses (probes) are counted apart by the kernel and
    // are no events: a pod whose only 5xx went to probes passes.
    let mut probed = self::pod();
    probed.open_window(t(1));
    probed.update_totals(
        SlotTotals {
            http_from_node: 5,
            ..SlotTotals::default()
        },
        t(2),
    );
    probed.exited(t(2));
    assert_eq!(probed.verdict(), Verdict::Pass);
}

fn request_cut(secs: u64, in_window: bool) -> super::PodEvent {
    super::PodEvent {
        kind: super::EventKind::RequestCut,
        reason: 0,
        tcp_state: "NONE",
        ..refusal(secs, false, in_window)
    }
}

#[test]
fn requests_cut_are_errors_in_the_window_and_at_startup_and_late_ones_are_the_windows() {
    let mut pod = pod();
    // Before the window: a startup error.
    pod.push_event(request_cut(1, false));
    pod.update_totals(
        SlotTotals {
            http_ok: 10,
            requests_cut: 1,
            ..SlotTotals::default()
        },
        t(2),
    );
    let startup = pod.startup();
    assert_eq!((startup.errors(), startup.requests_cut), (1, 1));
    assert!(
        startup.reason("web").contains("1 HTTP requests cut"),
        "{}",
        startup.reason("web")
    );
    // Deleted at 10, learned at 12: the cut at 11 is the window's, from its event; the one at
    // 13 is in the kernel's window count.
    pod.push_event(request_cut(11, false));
    pod.open_window_late(t(10), t(12));
    pod.push_event(request_cut(13, true));
    pod.update_totals(
        SlotTotals {
            http_ok: 12,
            requests_cut: 3,
            win_requests_cut: 1,
            ..SlotTotals::default()
        },
        t(14),
    );
    pod.exited(t(14));
    let (verdict, reason) = pod.verdict_and_reason();
    assert_eq!((verdict, pod.errors()), (Verdict::Fail, 2), "{reason}");
    assert!(reason.contains("1 HTTP requests cut"), "{reason}");
    assert_eq!(
        pod.startup().requests_cut,
        1,
        "only the one before the window"
    );
}

#[test]
fn a_pod_whose_packets_the_tc_program_never_saw_is_unknown_not_pass() {
    let mut pod = pod();
    pod.open_window(t(1));
    pod.update_totals(
        SlotTotals {
            accepted: 20,
            ..SlotTotals::default()
        },
        t(2),
    );
    pod.charge_unseen_packets();
    pod.exited(t(3));
    let (verdict, reason) = pod.verdict_and_reason();
    assert_eq!(verdict, Verdict::Unknown, "{reason}");
    assert!(reason.contains("bypass the TC filter"), "{reason}");
    // Seen: nothing to say.
    let mut seen = self::pod();
    seen.open_window(t(1));
    seen.update_totals(
        SlotTotals {
            accepted: 20,
            synacks_seen: 20,
            ..SlotTotals::default()
        },
        t(2),
    );
    seen.charge_unseen_packets();
    seen.exited(t(3));
    assert_eq!(seen.verdict(), Verdict::Pass);
}

#[test]
fn a_request_line_is_cut_at_its_version_and_kept_printable() {
    use super::request_line;
    assert_eq!(request_line(*b"GET / HT").as_deref(), Some("GET /"));
    assert_eq!(request_line(*b"GET /api").as_deref(), Some("GET /api"));
    assert_eq!(request_line(*b"POST /v1").as_deref(), Some("POST /v1"));
    assert_eq!(request_line(*b"GET\r\n\0\0\0").as_deref(), Some("GET"));
    assert_eq!(
        request_line(*b"GET /\x01\xff\0").as_deref(),
        Some("GET /??")
    );
    assert_eq!(request_line([0; 8]), None);
}
