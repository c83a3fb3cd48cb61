use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use super::{AgentState, process_alive};
use crate::{
    drain::{EventKind, PodDrain, PodEvent},
    inventory::PodId,
};

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

fn id(name: &str) -> PodId {
    PodId {
        namespace: "default".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

/// A connect by `client` (10.0.0.1) to `to` at `secs` that got no answer.
fn no_answer(to: &str, secs: u64) -> PodEvent {
    PodEvent {
        pod: id("client"),
        kind: EventKind::ConnectFailed,
        time: t(secs),
        local: IpAddr::from([10, 0, 0, 1]),
        local_port: 40_000,
        remote: to.parse().unwrap(),
        remote_port: 8080,
        tcp_state: "SYN_SENT",
        reason: 0,
        in_window: false,
        from_node: false,
        service: None,
        request: None,
    }
}

#[test]
fn a_connect_to_a_pod_here_that_got_no_answer_is_that_pods_failure_in_its_window() {
    let mut state = AgentState::default();
    let mut server = PodDrain::new(id("server"), 1, t(0));
    server.addresses = vec!["10.0.0.2".parse().unwrap()];
    state.pods.insert("uid-server".into(), server);

    // Running: not its drain's failure but one of its startup errors, and not the gate's
    // (the pod is here).
    let early = state.peer_failure(&no_answer("10.0.0.2", 10)).unwrap();
    assert!(!early.in_window);
    assert!(state.peer_failures.is_empty());
    let running = &state.pods["uid-server"];
    assert_eq!((running.peer_failures, running.errors()), (0, 0));
    let startup = running.startup();
    assert_eq!((startup.no_answer, startup.errors()), (1, 1));
    assert!(
        startup
            .reason("server")
            .contains("1 client connects got no answer"),
        "{}",
        startup.reason("server")
    );

    state.pods.get_mut("uid-server").unwrap().open_window(t(20));
    let seen = state.peer_failure(&no_answer("10.0.0.2", 30)).unwrap();
    assert_eq!(seen.kind, EventKind::PeerConnectFailed);
    assert_eq!(
        (seen.local, seen.remote),
        (
            "10.0.0.2".parse::<IpAddr>().unwrap(),
            IpAddr::from([10, 0, 0, 1])
        )
    );
    let server = &state.pods["uid-server"];
    assert_eq!((server.peer_failures, server.errors()), (1, 1));
    assert_eq!(server.events.len(), 2);
    // The window's failure is not a startup error.
    assert_eq!(server.startup().no_answer, 1);
    assert!(
        server
            .verdict_and_reason()
            .1
            .contains("1 connects to it got no answer")
    );
    assert!(state.peer_failures.is_empty());
}

#[test]
fn connects_to_other_addresses_are_kept_for_the_gate_bounded_per_address() {
    use crate::peers::{MAX_ADDRESSES, PER_ADDRESS};
    let mut state = AgentState::default();
    // One client hammers a dead address; another address failed once, earlier.
    assert!(state.peer_failure(&no_answer("10.8.0.1", 0)).is_none());
    for i in 1..=PER_ADDRESS as u64 + 2 {
        assert!(state.peer_failure(&no_answer("10.9.0.1", i)).is_none());
    }
    let log = &state.peer_failures;
    assert_eq!(log.len(), PER_ADDRESS + 1);
    // The hammered address lost its two oldest, and says from when it is whole; the other
    // address's record is untouched and whole.
    let gaps: Vec<_> = log.gaps().collect();
    assert_eq!(gaps, [("10.9.0.1".parse().unwrap(), t(2))]);
    assert!(log.events().any(|e| e.remote.to_string() == "10.8.0.1"));
    assert_eq!(log.complete_since, None);

    // Too many addresses: the one whose newest failure is oldest goes, and every address's
    // record is then whole only after that failure.
    for i in 0..MAX_ADDRESSES as u64 {
        let to = format!("10.7.{}.{}", i / 250, i % 250 + 1);
        state.peer_failure(&no_answer(&to, 100 + i));
    }
    // Both earlier addresses went; the newest failure lost with them is 10.9.0.1's last.
    let log = &state.peer_failures;
    assert_eq!(log.len(), MAX_ADDRESSES);
    assert!(
        !log.events()
            .any(|e| e.remote.to_string().starts_with("10.8."))
    );
    assert_eq!(log.complete_since, Some(t(PER_ADDRESS as u64 + 2)));

    // Kept as long as finished pods: older ones expire, and their addresses with them.
    state.peer_failures.expire(t(100));
    assert!(state.peer_failures.events().all(|e| e.time >= t(100)));
}

#[test]
fn a_process_is_alive_until_it_exits() {
    assert!(process_alive(std::process::id()));
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("spawn sleep");
    let pid = child.id();
    assert!(process_alive(pid));
    child.kill().expect("kill");
    // Killed but not yet reaped: a zombie, which is not alive.
    std::thread::sleep(Duration::from_millis(100));
    assert!(!process_alive(pid));
    child.wait().expect("reap");
    assert!(!process_alive(pid));
}
