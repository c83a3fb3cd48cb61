//! Kernel smoke test: the real programs in the real kernel count, per local address, exactly the
//! TCP state changes that the test's own connections made, IPv4 and IPv6, and nothing for
//! addresses nobody asked about.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use draingate::loader::KernelProbes;
use draingate_common::{SlotCounters, TCP_STATE_COUNT, tcp_state};
use draingate_tests::{Family, Link, require_root};

const CONNECTIONS: u64 = 7;
const PORT: u16 = 8080;
const SERVER_SLOT: u32 = 11;
const CLIENT_SLOT: u32 = 12;

fn entered(counters: &SlotCounters, state: u32) -> u64 {
    counters.state_entered[state as usize % TCP_STATE_COUNT]
}

/// Server in namespace `b`, client in namespace `a`: `CONNECTIONS` request/response exchanges,
/// each on a new connection that the server closes first.
fn exchange(link: &Link) {
    let listen = SocketAddr::new(link.b_addr, PORT);
    let listener = link
        .b
        .run(|| TcpListener::bind(listen).expect("bind in server namespace"));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for _ in 0..CONNECTIONS {
                let (mut conn, _) = listener.accept().expect("accept");
                let mut byte = [0u8; 1];
                conn.read_exact(&mut byte).expect("read request");
                conn.write_all(b"ok").expect("write response");
            }
        });
        for _ in 0..CONNECTIONS {
            let mut conn = link.a.run(|| TcpStream::connect(listen).expect("connect"));
            conn.write_all(b"?").expect("write request");
            let mut reply = Vec::new();
            conn.read_to_end(&mut reply).expect("read response");
            assert_eq!(reply, b"ok");
        }
    });
    drop(listener);
}

/// Polls until `done` holds: state changes of the closing handshake finish in softirq context
/// shortly after the sockets are dropped. The deadline only bounds a failing run.
fn wait_for(
    probes: &KernelProbes,
    slot: u32,
    done: impl Fn(&SlotCounters) -> bool,
) -> SlotCounters {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counters = probes.slot_counters(slot).expect("read counters");
        if done(&counters) || Instant::now() > deadline {
            return counters;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn counts_state_changes_per_local_address(family: Family) {
    require_root();
    let mut probes = KernelProbes::load().expect("load and attach the eBPF programs");
    let watched = Link::new("smoke", family);
    // A second link with the same traffic whose addresses are not watched: it must count nowhere.
    let unwatched = Link::new("other", family);
    probes
        .watch(watched.b_addr, SERVER_SLOT)
        .expect("watch server address");
    probes
        .watch(watched.a_addr, CLIENT_SLOT)
        .expect("watch client address");

    exchange(&watched);
    exchange(&unwatched);

    // The listener is bound to the server address too: it enters LISTEN, and CLOSE when dropped.
    let server = wait_for(&probes, SERVER_SLOT, |c| {
        entered(c, tcp_state::CLOSE) > CONNECTIONS
    });
    let client = wait_for(&probes, CLIENT_SLOT, |c| {
        entered(c, tcp_state::CLOSE) >= CONNECTIONS
    });

    // Passive side: each connection was born in SYN_RECV, established, closed first by the server
    // (FIN_WAIT1 → FIN_WAIT2 → CLOSE when it enters TIME_WAIT). Nothing was opened from here.
    assert_eq!(
        entered(&server, tcp_state::SYN_RECV),
        CONNECTIONS,
        "{server:?}"
    );
    assert_eq!(
        entered(&server, tcp_state::ESTABLISHED),
        CONNECTIONS,
        "{server:?}"
    );
    assert_eq!(
        entered(&server, tcp_state::FIN_WAIT1),
        CONNECTIONS,
        "{server:?}"
    );
    assert_eq!(
        entered(&server, tcp_state::CLOSE),
        CONNECTIONS + 1,
        "{server:?}"
    );
    assert_eq!(entered(&server, tcp_state::LISTEN), 1, "{server:?}");
    assert_eq!(entered(&server, tcp_state::SYN_SENT), 0, "{server:?}");
    assert_eq!(entered(&server, tcp_state::CLOSE_WAIT), 0, "{server:?}");

    // Active side: SYN_SENT → ESTABLISHED, then the server's FIN: CLOSE_WAIT → LAST_ACK → CLOSE.
    assert_eq!(
        entered(&client, tcp_state::SYN_SENT),
        CONNECTIONS,
        "{client:?}"
    );
    assert_eq!(
        entered(&client, tcp_state::ESTABLISHED),
        CONNECTIONS,
        "{client:?}"
    );
    assert_eq!(
        entered(&client, tcp_state::CLOSE_WAIT),
        CONNECTIONS,
        "{client:?}"
    );
    assert_eq!(
        entered(&client, tcp_state::LAST_ACK),
        CONNECTIONS,
        "{client:?}"
    );
    assert_eq!(
        entered(&client, tcp_state::CLOSE),
        CONNECTIONS,
        "{client:?}"
    );
    assert_eq!(entered(&client, tcp_state::SYN_RECV), 0, "{client:?}");

    // Every other slot stayed at zero: the unwatched link's identical traffic counted nowhere.
    for slot in (0..draingate_common::MAX_SLOTS).filter(|s| ![SERVER_SLOT, CLIENT_SLOT].contains(s))
    {
        let counters = probes.slot_counters(slot).expect("read counters");
        assert_eq!(
            counters,
            SlotCounters::default(),
            "slot {slot} counted traffic"
        );
    }
    assert_eq!(probes.loss().expect("read loss").read_errors, 0);

    // After unwatch, new connections are no longer counted.
    probes.unwatch(watched.b_addr).expect("unwatch");
    let before = probes.slot_counters(SERVER_SLOT).expect("read counters");
    exchange(&watched);
    let _ = wait_for(&probes, CLIENT_SLOT, |c| {
        entered(c, tcp_state::CLOSE) >= 2 * CONNECTIONS
    });
    assert_eq!(
        probes.slot_counters(SERVER_SLOT).expect("read counters"),
        before
    );
}

#[test]
fn counts_ipv4_state_changes_per_local_address() {
    counts_state_changes_per_local_address(Family::V4);
}

#[test]
fn counts_ipv6_state_changes_per_local_address() {
    counts_state_changes_per_local_address(Family::V6);
}
