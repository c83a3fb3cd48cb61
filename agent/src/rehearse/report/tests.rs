use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant, SystemTime},
};

use super::*;
use crate::{
    drain::{EventKind, PodDrain, PodEvent},
    inventory::PodId,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// A replaced pod as the agent ends up seeing it: terminated at `start + 5 s`, with these
/// counts and this many connections open at its exit.
fn terminated_pod(resets_sent: u64, refused: u64, open_at_exit: u64) -> PodDrain {
    let now = SystemTime::now();
    let mut pod = PodDrain::new(
        PodId {
            namespace: "local".into(),
            name: "dgr1-0-app-v1-0".into(),
            uid: "netns-1".into(),
        },
        0,
        now,
    );
    pod.open_window(now);
    pod.totals.resets_sent = resets_sent;
    pod.totals.refused = refused;
    pod.totals.win_resets_sent = resets_sent;
    pod.totals.win_refused = refused;
    pod.exited_with_open(now, open_at_exit);
    for port in 0..resets_sent {
        pod.push_event(PodEvent {
            pod: pod.id.clone(),
            kind: EventKind::ResetSent,
            time: now,
            local: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10)),
            local_port: 8080,
            remote: IpAddr::V4(CLIENT),
            remote_port: 40000 + port as u16,
            tcp_state: "ESTABLISHED",
            reason: 0,
            in_window: true,
            from_node: false,
            service: None,
            request: None,
        });
    }
    pod
}

fn failure(outcome: Outcome, port: u16, at_secs: u64) -> FailureNote {
    FailureNote {
        at: Duration::from_secs(at_secs),
        outcome,
        client_port: port,
    }
}

fn deleted_at(secs: u64) -> SimTimeline {
    SimTimeline {
        deleted: Some(Duration::from_secs(secs)),
        ..SimTimeline::default()
    }
}

fn report(agent: &PodDrain, failures: &[FailureNote]) -> PodReport {
    PodReport::new(
        "app-v1-0",
        PodRole::Old,
        Some(agent),
        &deleted_at(5),
        &ClientEvidence {
            failures,
            probe_refusals: 0,
            client: CLIENT,
        },
        Instant::now(),
    )
}

#[test]
fn equal_counts_and_a_fail_verdict_agree() {
    let pod = terminated_pod(2, 1, 0);
    let failures = [
        failure(Outcome::Reset, 40000, 6),
        failure(Outcome::Closed, 40001, 6),
        failure(Outcome::Refused, 41000, 7),
    ];
    let r = report(&pod, &failures);
    assert!(r.agrees, "{}", r.note);
    assert_eq!(
        (r.agent_connection_errors, r.client_connection_errors),
        (3, 3)
    );
    assert_eq!(r.client_failures_terminating, 3);
    assert_eq!(r.agent.as_ref().unwrap().verdict, "fail");
}

#[test]
fn a_pass_while_clients_failed_is_a_false_pass_and_named() {
    // The agent saw nothing, the clients a reset: a false pass, with the unmatched port.
    let pod = terminated_pod(0, 0, 0);
    let r = report(&pod, &[failure(Outcome::Reset, 40321, 6)]);
    assert!(!r.agrees);
    assert!(r.note.contains("says pass"), "{}", r.note);
    assert!(
        r.note.contains("only the clients: [40321 (reset)]"),
        "{}",
        r.note
    );
}

#[test]
fn a_fail_without_any_client_failure_is_a_false_fail() {
    let pod = terminated_pod(1, 0, 0);
    let r = report(&pod, &[]);
    assert!(!r.agrees);
    assert!(r.note.contains("clients saw no failure"), "{}", r.note);
    assert!(
        r.note
            .contains("only the agent counted: [40000 (reset_sent)]"),
        "{}",
        r.note
    );
}

#[test]
fn connections_cut_at_exit_while_idle_agree_with_no_client_failure() {
    let pod = terminated_pod(0, 0, 3);
    let r = report(&pod, &[]);
    assert!(r.agrees, "{}", r.note);
    assert!(r.note.contains("cut at exit"), "{}", r.note);
}

#[test]
fn requests_cut_at_exit_without_a_reset_are_bounded_by_open_at_exit() {
    // Two requests died on FIN-closed connections; two connections were open at the exit.
    let pod = terminated_pod(1, 0, 2);
    let failures = [
        failure(Outcome::Reset, 40000, 6),
        failure(Outcome::Closed, 40001, 6),
        failure(Outcome::Closed, 40002, 6),
    ];
    let r = report(&pod, &failures);
    assert!(r.agrees, "{}", r.note);
    assert_eq!(r.cut_at_exit, 2);
    // One open connection cannot explain two lost requests.
    let pod = terminated_pod(1, 0, 1);
    let r = report(&pod, &failures);
    assert!(!r.agrees);
    assert_eq!(r.cut_at_exit, 0);
    // Nor can a closed connection before the deletion began.
    let pod = terminated_pod(0, 0, 1);
    let r = report(&pod, &[failure(Outcome::Closed, 40001, 1)]);
    assert!(!r.agrees, "{}", r.note);
}

#[test]
fn requests_the_pod_cut_match_the_clients_closed_ones_one_by_one() {
    // The agent counted both FIN-cut requests: no connection open at the exit is needed to
    // explain them, and the report's column shows them.
    let mut pod = terminated_pod(1, 0, 0);
    pod.totals.requests_cut = 2;
    pod.totals.win_requests_cut = 2;
    let failures = [
        failure(Outcome::Reset, 40000, 6),
        failure(Outcome::Closed, 40001, 6),
        failure(Outcome::Closed, 40002, 6),
    ];
    let r = report(&pod, &failures);
    assert!(r.agrees, "{}", r.note);
    assert_eq!((r.cut_at_exit, r.client_connection_errors), (0, 3));
    assert_eq!(r.agent.as_ref().map(|a| a.requests_cut), Some(2));
    // One cut the agent did not see is a disagreement.
    pod.totals.requests_cut = 1;
    pod.totals.win_requests_cut = 1;
    assert!(!report(&pod, &failures).agrees);
}

#[test]
fn unanswered_connects_must_be_counted_from_the_clients_side() {
    // A connect to the pod's address timed out after its deletion: no packet of the pod's.
    let failures = [failure(Outcome::ConnectTimeout, 40000, 6)];
    let mut pod = terminated_pod(0, 0, 0);
    let r = report(&pod, &failures);
    assert_eq!((r.client_connection_errors, r.client_no_answer), (0, 1));
    assert!(!r.agrees, "uncounted, it is a disagreement: {}", r.note);
    assert!(
        r.note.contains(
            "the clients saw 1 timeouts or unreachable errors, the agent counted 0 connects"
        ),
        "{}",
        r.note
    );
    // The agent's peer view counted it in the pod's window: it fails the pod, and agrees.
    pod.peer_failures = 1;
    let r = report(&pod, &failures);
    assert_eq!(r.agent_no_answer, 1);
    assert!(r.agrees, "{}", r.note);
    assert_eq!(r.agent.as_ref().map(|a| a.verdict), Some("fail"));
    assert!(
        r.note.contains("counted from the clients' side"),
        "{}",
        r.note
    );
}

#[test]
fn a_pod_the_agent_never_saw_is_a_disagreement() {
    let r = PodReport::new(
        "app-v1-0",
        PodRole::Old,
        None,
        &deleted_at(5),
        &ClientEvidence {
            failures: &[],
            probe_refusals: 0,
            client: CLIENT,
        },
        Instant::now(),
    );
    assert!(!r.agrees);
    assert_eq!(r.note, "the agent never saw this pod");
}

fn config() -> RehearseConfig {
    RehearseConfig {
        spec: crate::rehearse::spec::RolloutSpec::default(),
        command: vec!["server".into()],
        next_command: None,
        port: 8080,
        rate: 100,
        clients: 1,
        mode: crate::rehearse::load::ConnectionMode::KeepAlive,
        path: "/".into(),
        propagation: Duration::from_secs(1),
        settle: Duration::from_secs(1),
        timeout: Duration::from_mins(1),
        request_timeout: Duration::from_secs(1),
        log_dir: "/tmp/x".into(),
        agent_socket: "/tmp/x.sock".into(),
        requests_out: None,
        agent_listen: None,
        hold: Duration::ZERO,
    }
}

#[test]
fn template_hashes_differ_by_version_and_look_like_kubernetes() {
    let config = config();
    let (old, new) = (config.template_hash(1), config.template_hash(2));
    assert_ne!(old, new, "the same command is still a new version");
    assert_eq!(old, config.template_hash(1), "stable");
    for hash in [&old, &new] {
        assert!(
            (8..=10).contains(&hash.len())
                && hash
                    .bytes()
                    .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b)),
            "{hash}"
        );
    }
}

#[test]
fn exit_codes_say_clean_dirty_or_defect() {
    let clean = report(&terminated_pod(0, 0, 0), &[]);
    let dirty_failures = [failure(Outcome::Reset, 40000, 6)];
    let dirty = report(&terminated_pod(1, 0, 0), &dirty_failures);
    let wrong = report(&terminated_pod(0, 0, 0), &dirty_failures);
    let clients = |failed| ClientTotals {
        requests: 10,
        failed,
        ..ClientTotals::default()
    };
    let clean_report = Report::new(&config(), vec![clean], clients(0), &[], Duration::ZERO);
    assert_eq!((clean_report.verdict, clean_report.exit_code), ("pass", 0));
    let dirty_report = Report::new(&config(), vec![dirty], clients(1), &[], Duration::ZERO);
    assert_eq!((dirty_report.verdict, dirty_report.exit_code), ("fail", 1));
    let defect = Report::new(&config(), vec![wrong], clients(1), &[], Duration::ZERO);
    assert_eq!(defect.exit_code, 4);
    // The pod's counts disagree, and a pass while clients failed is a defect of its own.
    assert_eq!(defect.disagreements.len(), 2, "{:?}", defect.disagreements);
    assert!(defect.disagreements[1].contains("verdict is pass"));
    assert!(defect.render().contains("DEFECT"));
    // A failure no pod can be named for is a defect of the attribution, said so.
    let unattributed = Report::new(
        &config(),
        vec![report(&terminated_pod(0, 0, 0), &[])],
        clients(1),
        &[failure(Outcome::Refused, 1, 3)],
        Duration::ZERO,
    );
    assert_eq!(unattributed.exit_code, 4);
    assert!(unattributed.disagreements[0].contains("could not be attributed"));
}

#[test]
fn a_rate_far_below_the_target_is_a_warning() {
    let clients = |rate| ClientTotals {
        requests: 1000,
        rate,
        ..ClientTotals::default()
    };
    let config = config();
    let target = f64::from(config.rate);
    let low = Report::new(&config, vec![], clients(target * 0.5), &[], Duration::ZERO);
    let warning = low.load_warning.clone().expect("warned");
    assert!(warning.contains("50%"), "{warning}");
    assert!(low.render().contains("warning: the clients made"));
    let fine = Report::new(&config, vec![], clients(target * 0.95), &[], Duration::ZERO);
    assert_eq!(fine.load_warning, None);
}

#[test]
fn an_old_pods_errors_before_its_termination_after_the_first_deletion_fail_the_rollout() {
    // app-v1-0 was deleted at 5 s and drained clean; app-v1-1, still running, then took its
    // share of the load and a client's connect to it got no answer at 7 s; it was deleted at
    // 9 s and drained clean too.
    let started = Instant::now();
    let running = |at_secs: u64| {
        let mut pod = PodDrain::new(
            PodId {
                namespace: "local".into(),
                name: "app-v1-1".into(),
                uid: "netns-2".into(),
            },
            1,
            SystemTime::now(),
        );
        pod.push_event(PodEvent {
            pod: pod.id.clone(),
            kind: EventKind::PeerConnectFailed,
            time: SystemTime::now() + Duration::from_secs(at_secs),
            local: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11)),
            local_port: 8080,
            remote: IpAddr::V4(CLIENT),
            remote_port: 40001,
            tcp_state: "SYN_SENT",
            reason: 0,
            in_window: false,
            from_node: false,
            service: None,
            request: None,
        });
        // Deleted at 9 s, it drained clean and exited.
        pod.open_window(SystemTime::now() + Duration::from_secs(9));
        pod.exited_with_open(SystemTime::now() + Duration::from_secs(10), 0);
        pod
    };
    let clients = ClientTotals {
        requests: 10,
        failed: 1,
        ..ClientTotals::default()
    };
    let judged = |at_secs: u64| {
        let agent = running(at_secs);
        let failures = [failure(Outcome::ConnectTimeout, 40001, at_secs)];
        let overloaded = PodReport::new(
            "app-v1-1",
            PodRole::Old,
            Some(&agent),
            &deleted_at(9),
            &ClientEvidence {
                failures: &failures,
                probe_refusals: 0,
                client: CLIENT,
            },
            started,
        );
        let drained = report(&terminated_pod(0, 0, 0), &[]);
        Report::new(
            &config(),
            vec![drained, overloaded],
            clients.clone(),
            &[],
            Duration::ZERO,
        )
    };
    let during = judged(7);
    assert_eq!(
        (during.verdict, during.exit_code),
        ("fail", 1),
        "{during:?}"
    );
    assert!(
        during.reasons[0].starts_with("before its termination: app-v1-1"),
        "{:?}",
        during.reasons
    );
    // At 2 s, before the rollout's first deletion: not the rollout's failure (and a pass
    // while a client failed is then said to be a defect).
    let before = judged(2);
    assert_eq!(
        (before.verdict, before.exit_code),
        ("pass", 4),
        "{before:?}"
    );
}

#[test]
fn a_request_timeout_on_a_connection_the_pod_reset_is_the_pods_failure_once() {
    // The agent counted two resets (ports 40000 and 40001). The clients saw a reset on 40000
    // and a request timeout on 40001 (a handshake whose last ACK met a full accept queue: the
    // server's late answer met the client's closed socket), and one more timeout on 40002, on
    // which the pod's kernel sent nothing: a stall, no one's count.
    let pod = terminated_pod(2, 0, 0);
    let failures = [
        failure(Outcome::Reset, 40000, 6),
        failure(Outcome::Timeout, 40001, 6),
        failure(Outcome::Timeout, 40002, 6),
        // A second timeout on 40000: its reset explains the client's reset, not this one too.
        failure(Outcome::Timeout, 40000, 7),
    ];
    let r = report(&pod, &failures);
    assert_eq!(r.client_timeouts_seen_by_pod, 1);
    assert_eq!(
        (r.agent_connection_errors, r.client_connection_errors),
        (2, 2)
    );
    assert!(r.agrees, "{}", r.note);
}

#[test]
fn http_5xx_answers_must_match_the_agents_count() {
    let mut pod = terminated_pod(0, 0, 0);
    pod.totals.http_5xx = 2;
    pod.totals.win_http_5xx = 2;
    let failures = [
        failure(Outcome::Http5xx, 40000, 6),
        failure(Outcome::Http5xx, 40000, 6),
    ];
    let r = report(&pod, &failures);
    assert_eq!((r.agent_http_5xx, r.client_http_5xx), (2, 2));
    assert!(r.agrees, "{}", r.note);
    assert_eq!(r.agent.as_ref().unwrap().verdict, "fail");
    // One the agent missed is a disagreement, named.
    let r = report(&pod, &[failures[0], failures[0], failures[0]]);
    assert!(!r.agrees);
    assert!(
        r.note
            .contains("saw 3 HTTP 5xx answers, the agent counted 2"),
        "{}",
        r.note
    );
}
