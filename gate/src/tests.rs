use std::time::{Duration, SystemTime};

use draingate_proto::v1 as pb;

use super::{AgentAnswer, History, JudgeError, Query, judge, rollouts_in};

fn pod(name: &str, hash: &str, verdict: pb::Verdict, errors: u64) -> pb::Pod {
    pb::Pod {
        pod: Some(pb::PodRef {
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }),
        verdict: verdict.into(),
        errors,
        owner_kind: "Deployment".into(),
        owner_name: "web".into(),
        pod_template_hash: hash.into(),
        window: Some(pb::Counters {
            resets_sent: errors,
            ..pb::Counters::default()
        }),
        timeline: Some(pb::Timeline {
            drained_at: (verdict == Pass).then(|| SystemTime::now().into()),
            ..pb::Timeline::default()
        }),
        ..pb::Pod::default()
    }
}

fn answer(node: &str, pods: Vec<pb::Pod>) -> AgentAnswer {
    AgentAnswer::answered(
        format!("{node}:9560"),
        Some(node.into()),
        pb::ListPodsResponse {
            pods,
            lost_events: 0,
            node: node.into(),
            ..pb::ListPodsResponse::default()
        },
    )
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

/// A client's connect on `node` to `to` at `secs` that got no answer.
fn no_answer(client: &str, to: &str, secs: u64) -> pb::Event {
    pb::Event {
        kind: pb::EventKind::ConnectFailed.into(),
        time: Some(at(secs).into()),
        local_address: client.into(),
        local_port: 40_000,
        remote_address: to.into(),
        remote_port: 8080,
        reason: "no answer".into(),
        ..pb::Event::default()
    }
}

fn clients(node: &str, failures: Vec<pb::Event>, complete_since: Option<u64>) -> AgentAnswer {
    AgentAnswer::answered(
        format!("{node}:9560"),
        Some(node.into()),
        pb::ListPodsResponse {
            node: node.into(),
            peer_failures: failures,
            peer_failures_complete_since: complete_since.map(|s| at(s).into()),
            ..pb::ListPodsResponse::default()
        },
    )
}

/// A pod at 10.1.0.5 that passed on n1, its window open from 100 s to 200 s.
fn drained_at_n1() -> AgentAnswer {
    let mut p = pod("web-a-1", "a", Pass, 0);
    p.addresses = vec!["10.1.0.5".into()];
    p.timeline = Some(pb::Timeline {
        terminating_since: Some(at(100).into()),
        drained_at: Some(at(110).into()),
        window_closed_at: Some(at(200).into()),
        ..pb::Timeline::default()
    });
    answer("n1", vec![p])
}

fn down(node: &str) -> AgentAnswer {
    AgentAnswer::unreachable(
        format!("{node}:9560"),
        Some(node.into()),
        "unreachable: connection refused".into(),
    )
}

fn web(old: Option<&str>) -> Query {
    Query::new("shop", "deploy/web", None, old, None).unwrap()
}

fn verdict_of(query: &Query, answers: &[AgentAnswer]) -> pb::Verdict {
    judge(query, answers, SystemTime::now()).unwrap().verdict
}

use pb::Verdict::{Fail, None as NotTerminating, Pass, Pending, Unknown};

#[test]
fn a_rollout_passes_only_when_every_terminated_pod_passed() {
    let answers = [
        answer(
            "n1",
            vec![
                pod("web-a-1", "a", Pass, 0),
                pod("web-b-1", "b", NotTerminating, 0),
            ],
        ),
        answer("n2", vec![pod("web-a-2", "a", Pass, 0)]),
    ];
    let j = judge(&web(Some("a")), &answers, SystemTime::now()).unwrap();
    assert_eq!(j.verdict, Pass, "{}", j.reason);
    assert_eq!(
        (j.terminating_pods, j.drained_pods, j.agents_answered),
        (2, 2, 2)
    );
    // The pods carry the node that reported them.
    assert_eq!(j.pods[0].node, "n1");
}

#[test]
fn one_failed_pod_fails_the_rollout_and_is_named() {
    let answers = [
        answer("n1", vec![pod("web-a-1", "a", Pass, 0)]),
        answer("n2", vec![pod("web-a-2", "a", Fail, 7)]),
    ];
    let j = judge(&web(None), &answers, SystemTime::now()).unwrap();
    assert_eq!(j.verdict, Fail);
    assert_eq!((j.failed_requests, j.resets), (7, 7));
    assert!(j.reason.contains("web-a-2 on n2"), "{}", j.reason);
}

#[test]
fn an_unreachable_agent_makes_the_verdict_unknown_never_pass() {
    let answers = [answer("n1", vec![pod("web-a-1", "a", Pass, 0)]), down("n2")];
    let j = judge(&web(Some("a")), &answers, SystemTime::now()).unwrap();
    assert_eq!(j.verdict, Unknown);
    assert_eq!(j.unreachable, ["node n2 (agent n2:9560)"]);
    assert!(j.reason.contains("n2"), "{}", j.reason);
    // Even when no reachable agent knows the workload: its pods may be on the missing node.
    assert_eq!(verdict_of(&web(None), &[down("n2")]), Unknown);
    // A failure seen elsewhere is conclusive.
    let answers = [answer("n1", vec![pod("web-a-1", "a", Fail, 1)]), down("n2")];
    assert_eq!(verdict_of(&web(None), &answers), Fail);
}

#[test]
fn pending_while_a_pod_drains_or_before_any_terminated() {
    let answers = [answer(
        "n1",
        vec![
            pod("web-a-1", "a", Pass, 0),
            pod("web-a-2", "a", Pending, 0),
        ],
    )];
    assert_eq!(verdict_of(&web(None), &answers), Pending);
    let answers = [answer("n1", vec![pod("web-a-1", "a", NotTerminating, 0)])];
    let j = judge(&web(None), &answers, SystemTime::now()).unwrap();
    assert_eq!((j.verdict, j.terminating_pods), (Pending, 0));
    assert!(j.reason.contains("no pod"), "{}", j.reason);
    // Lost evidence on a pod is unknown.
    let answers = [answer("n1", vec![pod("web-a-1", "a", Unknown, 0)])];
    assert_eq!(verdict_of(&web(None), &answers), Unknown);
}

#[test]
fn hashes_select_the_old_pods_and_never_the_new() {
    let answers = [answer(
        "n1",
        vec![pod("web-a-1", "a", Pass, 0), pod("web-b-1", "b", Fail, 3)],
    )];
    assert_eq!(verdict_of(&web(Some("a")), &answers), Pass);
    assert_eq!(verdict_of(&web(Some("b")), &answers), Fail);
    let not_b = Query::new("shop", "web", None, None, Some("b")).unwrap();
    assert_eq!(verdict_of(&not_b, &answers), Pass);
    assert_eq!(verdict_of(&web(None), &answers), Fail);
}

#[test]
fn other_workloads_kinds_and_namespaces_are_not_mixed_in() {
    let mut other = pod("api-a-1", "a", Fail, 1);
    other.owner_name = "api".into();
    let mut rollout = pod("web-r-1", "a", Fail, 1);
    rollout.owner_kind = "Rollout".into();
    let mut elsewhere = pod("web-x-1", "a", Fail, 1);
    elsewhere.pod.as_mut().unwrap().namespace = "staging".into();
    let answers = [answer(
        "n1",
        vec![pod("web-a-1", "a", Pass, 0), other, rollout, elsewhere],
    )];
    assert_eq!(verdict_of(&web(None), &answers), Pass);
    let ro = Query::new("shop", "rollout/web", None, None, None).unwrap();
    assert_eq!(verdict_of(&ro, &answers), Fail);
}

#[test]
fn unknown_workloads_and_no_agents_are_errors() {
    let answers = [answer("n1", vec![pod("web-a-1", "a", Pass, 0)])];
    let missing = Query::new("shop", "deploy/cart", None, None, None).unwrap();
    assert!(matches!(
        judge(&missing, &answers, SystemTime::now()),
        Err(JudgeError::UnknownWorkload(_))
    ));
    assert_eq!(
        judge(&web(None), &[], SystemTime::now()),
        Err(JudgeError::NoAgents)
    );
}

#[test]
fn whatever_an_agent_sends_never_panics_and_odd_verdicts_are_unknown() {
    let mut odd = pod("web-a-1", "a", Pass, 0);
    odd.verdict = 99;
    odd.window = None;
    odd.timeline = None;
    let mut no_ref = pod("web-a-2", "a", Pass, 0);
    no_ref.pod = None;
    let mut unspecified = pod("web-a-3", "a", Pass, 0);
    unspecified.verdict = 0;
    let answers = [answer("n1", vec![odd, no_ref, unspecified])];
    let j = judge(&web(None), &answers, SystemTime::now()).unwrap();
    assert_eq!(j.verdict, Unknown);
    assert_eq!(j.terminating_pods, 2);
}

#[test]
fn queries_are_validated() {
    for (ns, workload, kind) in [
        ("shop", "", None),
        ("", "web", None),
        ("shop", "deploy/", None),
        ("shop", "daemonset/web", None),
        ("shop", "deploy/web", Some("Rollout")),
        ("shop", "web", Some("Job")),
        ("shop", "Web", None),
    ] {
        assert!(
            Query::new(ns, workload, kind, None, None).is_err(),
            "{ns} {workload} {kind:?}"
        );
    }
    assert!(Query::new("shop", &"w".repeat(254), None, None, None).is_err());
    assert!(Query::new("shop", "web", None, Some("x y"), None).is_err());
    let q = Query::new("shop", "web", Some("rollout"), Some(""), Some("")).unwrap();
    assert_eq!(q.describe(), "shop/Rollout/web");
}

#[test]
fn history_keeps_final_verdicts_bounded_by_size_and_age() {
    let now = SystemTime::now();
    let mut history = History::new(2, Duration::from_mins(1));
    let answers = [answer(
        "n1",
        vec![
            pod("web-a-1", "a", Fail, 2),
            pod("web-b-1", "b", Pass, 0),
            pod("web-c-1", "c", Pending, 0),
        ],
    )];
    let rollouts = rollouts_in(&answers);
    assert_eq!(rollouts.len(), 3);
    for q in &rollouts {
        history.record(q, &judge(q, &answers, now).unwrap());
    }
    // Pending is not kept; a and b are.
    assert_eq!(history.len(), 2);
    let a = history.lookup(&web(Some("a")), now).unwrap();
    assert!(a.from_history);
    assert_eq!(a.verdict, Fail);
    assert!(history.lookup(&web(Some("c")), now).is_none());
    // Without a hash: the newest kept verdict that is not the new version's.
    let not_b = Query::new("shop", "web", None, None, Some("b")).unwrap();
    assert_eq!(history.lookup(&not_b, now).unwrap().verdict, Fail);
    // Size: a third entry pushes out the oldest.
    let mut d = web(Some("d"));
    let judged = judge(&web(Some("b")), &answers, now).unwrap();
    history.record(&d, &judged);
    assert_eq!(history.len(), 2);
    assert!(history.lookup(&web(Some("a")), now).is_none());
    // Age.
    assert!(
        history
            .lookup(&web(Some("b")), now + Duration::from_secs(61))
            .is_none()
    );
    assert!(history.is_empty());
    d.old = None;
    history.record(&d, &judged);
    assert!(history.is_empty(), "a verdict without its hash is not kept");
}

#[test]
fn connects_from_other_nodes_that_got_no_answer_fail_the_pod() {
    let answers = [
        drained_at_n1(),
        clients(
            "n2",
            vec![
                no_answer("10.2.0.9", "10.1.0.5", 50),  // before the window
                no_answer("10.2.0.9", "10.1.0.5", 150), // inside: counts
                no_answer("10.2.0.7", "10.1.0.6", 150), // another address
                no_answer("10.2.0.9", "10.1.0.5", 250), // after it closed
            ],
            None,
        ),
    ];
    let j = judge(&web(None), &answers, SystemTime::now()).unwrap();
    assert_eq!(j.verdict, Fail, "{}", j.reason);
    assert_eq!(j.failed_requests, 1);
    let p = &j.pods[0];
    assert_eq!((p.errors, p.peer_failures), (1, 1));
    assert!(
        p.reason.contains("10.2.0.9:40000 on n2") && p.reason.contains("10.1.0.5"),
        "{}",
        p.reason
    );
    assert!(j.reason.contains("web-a-1 on n1"), "{}", j.reason);
}

#[test]
fn the_pods_own_node_is_not_counted_twice() {
    // n1's agent counted its own clients in the pod's `peer_failures` already.
    let mut own = drained_at_n1();
    own.peer_failures =
        clients("n1", vec![no_answer("10.1.0.9", "10.1.0.5", 150)], None).peer_failures;
    assert_eq!(verdict_of(&web(None), &[own]), Pass);
}

#[test]
fn a_node_that_dropped_peer_evidence_from_the_window_makes_it_unknown() {
    let answers = [drained_at_n1(), clients("n2", Vec::new(), Some(120))];
    let j = judge(&web(None), &answers, SystemTime::now()).unwrap();
    assert_eq!(j.verdict, Unknown, "{}", j.reason);
    assert!(j.reason.contains("n2 dropped"), "{}", j.reason);
    // Dropped before the window opened: the window's evidence is whole.
    let answers = [drained_at_n1(), clients("n2", Vec::new(), Some(90))];
    assert_eq!(verdict_of(&web(None), &answers), Pass);
}

#[test]
fn malformed_peer_failures_are_skipped_not_trusted() {
    let mut no_time = no_answer("10.2.0.9", "10.1.0.5", 150);
    no_time.time = None;
    let answers = [
        drained_at_n1(),
        clients(
            "n2",
            vec![
                no_answer("10.2.0.9", "not an address", 150),
                no_answer("nonsense", "10.1.0.5", 150),
                no_time,
            ],
            None,
        ),
    ];
    assert!(answers[1].peer_failures.is_empty());
    assert_eq!(verdict_of(&web(None), &answers), Pass);
}

#[test]
fn a_gap_in_one_addresses_record_makes_only_its_pod_unknown() {
    let with_gap = |address: &str| {
        let mut answer = clients("n2", Vec::new(), None);
        answer.peer_gaps = vec![(address.parse().unwrap(), at(120))];
        answer
    };
    let j = judge(
        &web(None),
        &[drained_at_n1(), with_gap("10.1.0.5")],
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(j.verdict, Unknown, "{}", j.reason);
    assert!(j.reason.contains("n2 dropped"), "{}", j.reason);
    // A gap for an address that is no pod of the rollout changes nothing.
    assert_eq!(
        verdict_of(&web(None), &[drained_at_n1(), with_gap("10.9.9.9")]),
        Pass
    );
}

#[test]
fn peer_failures_beyond_the_rounds_bound_count_as_dropped_never_as_clean() {
    use std::sync::atomic::AtomicUsize;
    let failures = || pb::ListPodsResponse {
        node: "n2".into(),
        peer_failures: vec![
            no_answer("10.2.0.9", "10.1.0.5", 150),
            no_answer("10.2.0.9", "10.1.0.6", 150),
        ],
        ..pb::ListPodsResponse::default()
    };
    let budget = AtomicUsize::new(3);
    let first = AgentAnswer::answered_within("n2:9560".into(), None, failures(), &budget);
    assert_eq!(first.peer_failures.len(), 2);
    assert_eq!(first.peer_failures_complete_since, None);
    // One left in the round's budget: this node's evidence is dropped and said to be.
    let second = AgentAnswer::answered_within("n3:9560".into(), None, failures(), &budget);
    assert!(second.peer_failures.is_empty());
    assert!(second.peer_failures_complete_since.is_some());
}

/// A new pod (`hash` b) that had `errors` startup errors, the first at `first` seconds.
fn new_pod(name: &str, errors: u64, first: Option<u64>) -> pb::Pod {
    let mut p = pod(name, "b", NotTerminating, 0);
    p.startup = Some(pb::Startup {
        errors,
        errors_before_ready: errors,
        first_error_at: first.map(|s| at(s).into()),
        reason: if errors > 0 {
            format!("{name} refused {errors} connections before it was ready")
        } else {
            String::new()
        },
        ..pb::Startup::default()
    });
    p
}

/// An old pod (`hash` a) that passed, its window closed at `closed` seconds.
fn passed_old(name: &str, closed: u64) -> pb::Pod {
    let mut p = pod(name, "a", Pass, 0);
    p.timeline = Some(pb::Timeline {
        terminating_since: Some(at(closed - 50).into()),
        drained_at: Some(at(closed - 40).into()),
        window_closed_at: Some(at(closed).into()),
        ..pb::Timeline::default()
    });
    p
}

#[test]
fn a_new_pod_that_refused_clients_fails_the_rollout_and_is_named() {
    let answers = [answer(
        "n1",
        vec![
            passed_old("web-a-1", 200),
            new_pod("web-b-1", 12, Some(120)),
        ],
    )];
    for query in [
        Query::new("shop", "web", None, None, None).unwrap(),
        Query::new("shop", "web", None, Some("a"), None).unwrap(),
        Query::new("shop", "web", None, Some("a"), Some("b")).unwrap(),
    ] {
        let j = judge(&query, &answers, at(300)).unwrap();
        assert_eq!(j.verdict, Fail, "{query:?}: {}", j.reason);
        assert!(j.reason.contains("web-b-1 refused 12"), "{}", j.reason);
        assert_eq!(j.failed_requests, 12);
        assert_eq!(j.terminating_pods, 1);
        assert!(
            j.pods
                .iter()
                .any(|p| p.pod.as_ref().unwrap().name == "web-b-1")
        );
    }
}

#[test]
fn old_pods_errors_before_their_termination_fail_the_rollout_once_it_began() {
    // web-a-1's window opened at 150. web-a-2 and web-a-3 were still running (no window):
    // clients' connects to web-a-2 got no answer at 160 (it took web-a-1's share of the load
    // and its accept queue overflowed), web-a-3's one error was at 100, before the rollout.
    let before = |name: &str, errors: u64, last: Option<u64>| {
        let mut p = pod(name, "a", NotTerminating, 0);
        p.startup = Some(pb::Startup {
            errors,
            last_error_at: last.map(|s| at(s).into()),
            reason: format!("{name} had {errors} errors outside its termination window"),
            ..pb::Startup::default()
        });
        p
    };
    let q = Query::new("shop", "web", None, None, None).unwrap();
    let answers = [answer(
        "n1",
        vec![
            passed_old("web-a-1", 200),
            before("web-a-2", 4, Some(160)),
            before("web-a-3", 1, Some(100)),
        ],
    )];
    let j = judge(&q, &answers, at(300)).unwrap();
    assert_eq!(j.verdict, Fail, "{}", j.reason);
    assert!(
        j.reason.contains("web-a-2 had 4 errors") && !j.reason.contains("web-a-3"),
        "{}",
        j.reason
    );
    assert_eq!(j.failed_requests, 4);
    assert!(
        j.pods
            .iter()
            .any(|p| p.pod.as_ref().unwrap().name == "web-a-2")
    );
    // Errors all before the first deletion, or undated ones: not the rollout's.
    let earlier = [answer(
        "n1",
        vec![
            passed_old("web-a-1", 200),
            before("web-a-3", 1, Some(100)),
            before("web-a-4", 2, None),
        ],
    )];
    assert_eq!(judge(&q, &earlier, at(300)).unwrap().verdict, Pass);
    // A terminating old pod's own errors before its window count the same way.
    // (web-a-5's window opened at 210; its errors were at 180, after web-a-1's at 150.)
    let mut terminated = passed_old("web-a-5", 260);
    terminated.startup = before("web-a-5", 2, Some(180)).startup;
    let answers = [answer("n1", vec![passed_old("web-a-1", 200), terminated])];
    let j = judge(&q, &answers, at(300)).unwrap();
    assert_eq!((j.verdict, j.failed_requests), (Fail, 2), "{}", j.reason);
    assert_eq!(j.pods.len(), 2, "each listed once");
}

#[test]
fn new_pods_count_only_inside_the_rollout_and_only_once_it_began() {
    // Errors first seen after the last old pod's window closed are not the rollout's.
    let late = [answer(
        "n1",
        vec![passed_old("web-a-1", 200), new_pod("web-b-1", 3, Some(250))],
    )];
    let q = Query::new("shop", "web", None, None, None).unwrap();
    assert_eq!(judge(&q, &late, at(300)).unwrap().verdict, Pass);
    // While an old pod's window is still open, the rollout has not ended: they count.
    let mut open = passed_old("web-a-2", 200);
    open.timeline.as_mut().unwrap().window_closed_at = None;
    let still = [answer(
        "n1",
        vec![
            passed_old("web-a-1", 200),
            open,
            new_pod("web-b-1", 3, Some(250)),
        ],
    )];
    assert_eq!(judge(&q, &still, at(300)).unwrap().verdict, Fail);
    // Without the first error's time (its event lost), an error counts.
    let undated = [answer(
        "n1",
        vec![passed_old("web-a-1", 200), new_pod("web-b-1", 1, None)],
    )];
    assert_eq!(judge(&q, &undated, at(300)).unwrap().verdict, Fail);
    // No pod terminating: no rollout, so a running pod's errors are no rollout's failure.
    let none = [answer("n1", vec![new_pod("web-b-1", 5, Some(10))])];
    assert_eq!(judge(&q, &none, at(300)).unwrap().verdict, Pending);
    // A clean new pod changes nothing.
    let clean = [answer(
        "n1",
        vec![passed_old("web-a-1", 200), new_pod("web-b-1", 0, None)],
    )];
    assert_eq!(judge(&q, &clean, at(300)).unwrap().verdict, Pass);
}
