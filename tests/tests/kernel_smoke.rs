//! Kernel tests of the counting itself: the real programs in the real kernel count, per pod
//! address, exactly the connections, refusals and open connections that the test made, IPv4 and
//! IPv6, nothing for addresses nobody asked about, and nothing is lost across an agent restart.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use draingate::{
    events,
    loader::{KernelProbes, ResetSource, SlotTotals},
};
use draingate_common::{NO_SLOT, NotableEvent, event_kind};
use draingate_tests::{Family, Link, PinDir, require_root};

const CONNECTIONS: u64 = 7;
const PORT: u16 = 8080;
const CLOSED_PORT: u16 = 8081;
const SERVER_SLOT: u32 = 11;
const CLIENT_SLOT: u32 = 12;

/// Server in namespace `b`, client in namespace `a`: `n` request/response exchanges, each on a
/// new connection that the server closes first.
fn exchange(link: &Link, n: u64) {
    let listen = SocketAddr::new(link.b_addr, PORT);
    let listener = link
        .b
        .run(|| TcpListener::bind(listen).expect("bind in server namespace"));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for _ in 0..n {
                let (mut conn, _) = listener.accept().expect("accept");
                let mut byte = [0u8; 1];
                conn.read_exact(&mut byte).expect("read request");
                conn.write_all(b"ok").expect("write response");
            }
        });
        for _ in 0..n {
            let mut conn = link.a.run(|| TcpStream::connect(listen).expect("connect"));
            conn.write_all(b"?").expect("write request");
            let mut reply = Vec::new();
            conn.read_to_end(&mut reply).expect("read response");
            assert_eq!(reply, b"ok");
        }
    });
}

/// Polls until `done` holds: the closing handshake finishes in softirq context shortly after
/// the sockets are dropped. The deadline only bounds a failing run.
fn wait_for(probes: &KernelProbes, slot: u32, done: impl Fn(&SlotTotals) -> bool) -> SlotTotals {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let totals = probes.slot_totals(slot).expect("read counters");
        if done(&totals) || Instant::now() > deadline {
            return totals;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The events in the ring, but for SIGTERMs and SIGKILLs to processes of no pod: the programs
/// report those from anywhere on the host (another test stopping its processes, say).
fn drain_events(probes: &mut KernelProbes) -> Vec<NotableEvent> {
    drain_all_events(probes)
        .into_iter()
        .filter(|e| !(e.kind == event_kind::SIGNAL && e.slot == NO_SLOT))
        .collect()
}

fn drain_all_events(probes: &mut KernelProbes) -> Vec<NotableEvent> {
    let mut ring = probes.take_events().expect("events reader");
    let mut events = Vec::new();
    while let Some(record) = ring.next() {
        events.push(events::decode(&record).expect("well-formed event"));
    }
    events
}

/// The reset program in both namespaces of `link`, where this kernel (or
/// `DRAINGATE_RESET_SOURCE=packets`) counts resets from packets; nothing otherwise.
fn attach_where_needed(probes: &mut KernelProbes, link: &Link) {
    for ns in [&link.a, &link.b] {
        probes
            .watch_pod_interfaces(&ns.path())
            .expect("attach the reset program");
    }
}

/// The programs loaded with maps of their own, and an IPv4 link whose server side (`b`) is
/// watched as `SERVER_SLOT`.
fn watched_server(tag: &str) -> (PinDir, KernelProbes, Link) {
    require_root();
    let pins = PinDir::new();
    let mut probes = KernelProbes::load(&pins.config).expect("load and attach the programs");
    let link = Link::new(tag, Family::V4);
    attach_where_needed(&mut probes, &link);
    probes
        .watch(link.b_addr, SERVER_SLOT)
        .expect("watch server");
    probes
        .apply_addresses()
        .expect("hand the addresses to the kernel");
    (pins, probes, link)
}

/// `fixed`: the program that reads this kernel's record layout in place (the default here), or
/// the one that takes every offset from tracefs (any other kernel's choice): both must count
/// the same.
fn counts_connections_per_pod_address(family: Family, fixed: bool) {
    require_root();
    let mut pins = PinDir::new();
    pins.config.fixed_layout = fixed;
    let mut probes = KernelProbes::load(&pins.config).expect("load and attach the programs");
    assert!(!probes.resumed);
    assert_eq!(
        probes.set_state_program(),
        if fixed {
            "inet_sock_set_state_fixed"
        } else {
            "inet_sock_set_state"
        }
    );
    let watched = Link::new("smoke", family);
    // A second link with the same traffic whose addresses are not watched: it counts nowhere.
    let unwatched = Link::new("other", family);
    attach_where_needed(&mut probes, &watched);
    attach_where_needed(&mut probes, &unwatched);
    probes
        .watch(watched.b_addr, SERVER_SLOT)
        .expect("watch server");
    probes
        .watch(watched.a_addr, CLIENT_SLOT)
        .expect("watch client");
    probes
        .apply_addresses()
        .expect("hand the addresses to the kernel");

    // Open connections are counted while open, on both sides; the listener is not a connection.
    let listen = SocketAddr::new(watched.b_addr, PORT);
    let listener = watched.b.run(|| TcpListener::bind(listen).expect("bind"));
    let held: Vec<_> = (0..3)
        .map(|_| {
            let client = watched
                .a
                .run(|| TcpStream::connect(listen).expect("connect"));
            let server = listener.accept().expect("accept").0;
            (client, server)
        })
        .collect();
    let server = wait_for(&probes, SERVER_SLOT, |t| t.open == 3);
    assert_eq!((server.open, server.accepted), (3, 3), "{server:?}");
    let client = wait_for(&probes, CLIENT_SLOT, |t| t.open == 3);
    assert_eq!((client.open, client.opened), (3, 3), "{client:?}");
    assert_ne!(server.last_accept_ns, 0);
    drop(held);
    drop(listener);
    // The held connections close back to 0 open. Waiting for it also lets their server
    // sockets leave the states (FIN_WAIT1, CLOSING, LAST_ACK) in which port 8080 cannot be
    // bound again, even with SO_REUSEADDR.
    wait_for(&probes, SERVER_SLOT, |t| t.open == 0);

    exchange(&watched, CONNECTIONS);
    exchange(&unwatched, CONNECTIONS);

    let server = wait_for(&probes, SERVER_SLOT, |t| t.open == 0);
    let client = wait_for(&probes, CLIENT_SLOT, |t| t.open == 0);
    let total = CONNECTIONS + 3;
    assert_eq!(
        server,
        SlotTotals {
            accepted: total,
            last_accept_ns: server.last_accept_ns,
            // The TC program on the pod's interface saw each connection's SYN-ACK.
            synacks_seen: total,
            ..SlotTotals::default()
        }
    );
    assert_eq!(
        client,
        SlotTotals {
            opened: total,
            ..SlotTotals::default()
        }
    );
    // Every other slot stayed at zero: the unwatched link's identical traffic counted nowhere.
    for slot in (0..draingate_common::MAX_SLOTS).filter(|s| ![SERVER_SLOT, CLIENT_SLOT].contains(s))
    {
        let totals = probes.slot_totals(slot).expect("read counters");
        assert_eq!(totals, SlotTotals::default(), "slot {slot} counted traffic");
    }
    assert_eq!(
        probes.loss().expect("loss"),
        draingate_common::LossCounters::default()
    );
    assert!(
        drain_events(&mut probes).is_empty(),
        "clean traffic made events"
    );

    // After unwatch, new connections are no longer counted for that address.
    probes.unwatch(watched.b_addr).expect("unwatch");
    probes
        .apply_addresses()
        .expect("hand the addresses to the kernel");
    exchange(&watched, CONNECTIONS);
    let client = wait_for(&probes, CLIENT_SLOT, |t| t.opened == total + CONNECTIONS);
    assert_eq!(client.opened, total + CONNECTIONS);
    assert_eq!(
        probes.slot_totals(SERVER_SLOT).expect("read").accepted,
        total
    );
}

#[test]
fn counts_ipv4_connections_per_pod_address() {
    counts_connections_per_pod_address(Family::V4, true);
}

#[test]
fn counts_ipv6_connections_per_pod_address() {
    counts_connections_per_pod_address(Family::V6, true);
}

#[test]
fn counts_ipv4_connections_with_offsets_from_tracefs() {
    counts_connections_per_pod_address(Family::V4, false);
}

#[test]
fn counts_ipv6_connections_with_offsets_from_tracefs() {
    counts_connections_per_pod_address(Family::V6, false);
}

/// Where the refusals are counted from: the kernel's choice here, or the packets (the TC
/// program, which kernels before 6.10 use) forced.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resets {
    KernelChoice,
    Packets,
}

fn counts_refused_connections(family: Family, fixed: bool) {
    counts_refused_connections_from(family, fixed, Resets::KernelChoice);
}

fn counts_refused_connections_from(family: Family, fixed: bool, resets: Resets) {
    require_root();
    let mut pins = PinDir::new();
    pins.config.fixed_layout = fixed;
    if resets == Resets::Packets {
        // As on the oldest kernels: no `tcp_send_reset` for refusals, no `family` in
        // `tcp_receive_reset` (the client's side of each refusal).
        pins.config.reset_source = Some(ResetSource::Packets);
        pins.config
            .hide_fields
            .push(("tcp_receive_reset", "family"));
    }
    let mut probes = KernelProbes::load(&pins.config).expect("load and attach the programs");
    let link = Link::new("refuse", family);
    if probes.reset_source == ResetSource::Packets {
        let attached = probes
            .watch_pod_interfaces(&link.b.path())
            .expect("attach the reset program in the server's namespace");
        assert_eq!(attached, 1, "one interface besides loopback");
        probes
            .watch_pod_interfaces(&link.a.path())
            .expect("attach the reset program in the client's namespace");
    }
    probes
        .watch(link.b_addr, SERVER_SLOT)
        .expect("watch server");
    probes
        .watch(link.a_addr, CLIENT_SLOT)
        .expect("watch client");
    probes
        .apply_addresses()
        .expect("hand the addresses to the kernel");

    let target = SocketAddr::new(link.b_addr, CLOSED_PORT);
    for _ in 0..CONNECTIONS {
        let err = link
            .a
            .run(|| TcpStream::connect(target))
            .expect_err("nobody listens on the closed port");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    let server = wait_for(&probes, SERVER_SLOT, |t| t.refused == CONNECTIONS);
    assert_eq!(
        server,
        SlotTotals {
            refused: CONNECTIONS,
            ..SlotTotals::default()
        }
    );
    let client = wait_for(&probes, CLIENT_SLOT, |t| t.failed_connects == CONNECTIONS);
    assert_eq!(
        client,
        SlotTotals {
            failed_connects: CONNECTIONS,
            ..SlotTotals::default()
        }
    );

    let events = drain_events(&mut probes);
    let refusals: Vec<_> = events
        .iter()
        .filter(|e| e.kind == event_kind::REFUSED)
        .collect();
    assert_eq!(refusals.len() as u64, CONNECTIONS, "{events:?}");
    for event in &refusals {
        assert_eq!(event.slot, SERVER_SLOT);
        assert_eq!(std::net::IpAddr::from(event.local), link.b_addr);
        assert_eq!(event.local_port, CLOSED_PORT);
        assert_eq!(std::net::IpAddr::from(event.remote), link.a_addr);
    }
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e.kind == event_kind::CONNECT_FAILED && e.slot == CLIENT_SLOT)
        .collect();
    assert_eq!(failed.len() as u64, CONNECTIONS, "{events:?}");
    // Each says the address answered (refused, counted there), so none is a peer's failure.
    for event in &failed {
        assert_eq!(
            event.reason,
            draingate_common::connect_failure::RESET,
            "{event:?}"
        );
        assert_eq!(std::net::IpAddr::from(event.local), link.a_addr);
        assert_eq!(std::net::IpAddr::from(event.remote), link.b_addr);
        assert_eq!(event.remote_port, CLOSED_PORT);
    }
    assert_eq!(events.len() as u64, 2 * CONNECTIONS, "{events:?}");
}

#[test]
fn counts_ipv4_refused_connections_from_packets() {
    counts_refused_connections_from(Family::V4, true, Resets::Packets);
}

#[test]
fn counts_ipv6_refused_connections_from_packets() {
    counts_refused_connections_from(Family::V6, false, Resets::Packets);
}

#[test]
fn counts_ipv4_refused_connections_with_events() {
    counts_refused_connections(Family::V4, true);
}

#[test]
fn counts_ipv4_refused_connections_with_offsets_from_tracefs() {
    counts_refused_connections(Family::V4, false);
}

#[test]
fn counts_ipv6_refused_connections_with_events() {
    counts_refused_connections(Family::V6, true);
}

#[test]
fn counts_ipv6_refused_connections_with_offsets_from_tracefs() {
    counts_refused_connections(Family::V6, false);
}

#[test]
fn an_agent_restart_loses_no_counts_and_no_open_connections() {
    require_root();
    let pins = PinDir::new();
    let link = Link::new("restart", Family::V4);
    let listen = SocketAddr::new(link.b_addr, PORT);
    let listener = link.b.run(|| TcpListener::bind(listen).expect("bind"));

    let mut first = KernelProbes::load(&pins.config).expect("first agent");
    attach_where_needed(&mut first, &link);
    first.watch(link.b_addr, SERVER_SLOT).expect("watch");
    first
        .apply_addresses()
        .expect("hand the addresses to the kernel");
    let before = link.a.run(|| TcpStream::connect(listen).expect("connect"));
    let accepted_before = listener.accept().expect("accept");
    wait_for(&first, SERVER_SLOT, |t| t.open == 1);
    drop(first);

    // The agent is down: the pinned programs keep counting.
    let during = link.a.run(|| TcpStream::connect(listen).expect("connect"));
    let accepted_during = listener.accept().expect("accept");

    let second = KernelProbes::load(&pins.config).expect("second agent");
    assert!(
        second.resumed,
        "the second agent took over the pinned programs"
    );
    assert_eq!(
        second.watched().expect("watched"),
        vec![(link.b_addr, SERVER_SLOT)]
    );
    let totals = wait_for(&second, SERVER_SLOT, |t| t.open == 2);
    assert_eq!((totals.accepted, totals.open), (2, 2), "{totals:?}");
    drop((before, during, accepted_before, accepted_during));
    let totals = wait_for(&second, SERVER_SLOT, |t| t.open == 0);
    assert_eq!((totals.accepted, totals.open), (2, 0), "{totals:?}");
}

/// Two agents on one pin directory would reset each other's slots (a failing pod turned into a
/// pass): the second is refused, naming the first one's pid, and the first keeps its counts;
/// once the first is gone, the next one takes the pins over.
#[test]
fn a_second_agent_on_the_same_pins_is_refused_and_the_first_keeps_its_counts() {
    let (pins, probes, link) = watched_server("twice");
    let target = SocketAddr::new(link.b_addr, CLOSED_PORT);
    for _ in 0..3 {
        assert!(link.a.run(|| TcpStream::connect(target)).is_err());
    }
    wait_for(&probes, SERVER_SLOT, |t| t.refused == 3);
    match KernelProbes::load(&pins.config) {
        Err(draingate::loader::LoaderError::PinDirInUse { holder, .. }) => {
            assert_eq!(holder, Some(std::process::id()), "the holder is named");
        }
        other => panic!("a second agent on the same pins: {:?}", other.map(|_| ())),
    }
    let message = KernelProbes::load(&pins.config)
        .map(|_| ())
        .expect_err("still refused")
        .to_string();
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    assert_eq!(
        probes.slot_totals(SERVER_SLOT).expect("read").refused,
        3,
        "the first agent's counts are untouched"
    );
    drop(probes);
    let next = KernelProbes::load(&pins.config).expect("the pins are free again");
    assert_eq!(next.slot_totals(SERVER_SLOT).expect("read").refused, 3);
}

/// The reset program's filters outlive the agent (they keep counting into the pins across a
/// restart); an uninstall removes them, only its own, and the pins. Refused while an agent
/// holds the pins.
#[test]
fn an_uninstall_removes_the_filters_and_the_pins_and_nothing_else() {
    require_root();
    let mut pins = PinDir::new();
    pins.config.reset_source = Some(ResetSource::Packets);
    let mut probes = KernelProbes::load(&pins.config).expect("load and attach the programs");
    let link = Link::new("uninst", Family::V4);
    probes
        .watch_pod_interfaces(&link.b.path())
        .expect("attach the reset program");
    // Another agent's filter on the same interface (its own pins: another handle).
    let mut other_pins = PinDir::new();
    other_pins.config.reset_source = Some(ResetSource::Packets);
    let mut other = KernelProbes::load(&other_pins.config).expect("another agent");
    other
        .watch_pod_interfaces(&link.b.path())
        .expect("attach the other reset program");
    let filters = || {
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", link.b.name()])
            .args(["tc", "filter", "show", "dev", "eth0", "egress"])
            .output()
            .expect("tc filter show");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|l| l.contains("pod_egress"))
            .count()
    };
    assert_eq!(filters(), 2, "both agents' filters");
    assert!(matches!(
        KernelProbes::uninstall(&pins.config.pin_dir),
        Err(draingate::loader::LoaderError::PinDirInUse { .. })
    ));
    drop(probes);
    assert_eq!(filters(), 2, "the filters outlive the agent");
    let removed = KernelProbes::uninstall(&pins.config.pin_dir).expect("uninstall");
    // Its two filters on the interface: `pod_egress` on egress, `pod_ingress` on ingress.
    assert_eq!(removed, 2);
    assert_eq!(filters(), 1, "the other agent's filter stays");
    assert!(!pins.config.pin_dir.exists(), "the pins are gone");
    drop(other);
}

/// A client may pick the same source port again: a new connection on a 4-tuple that was reset
/// before fails anew and counts anew, while resets of one connection count once.
#[test]
fn a_reused_four_tuple_that_fails_again_counts_again() {
    use socket2::{Domain, SockAddr, Socket, Type};

    let (_pins, mut probes, link) = watched_server("reuse4");
    let listen = SocketAddr::new(link.b_addr, PORT);
    let listener = link.b.run(|| TcpListener::bind(listen).expect("bind"));
    let client_port = 40_123;
    // Connect from the same client port, and have the server abort the connection (a reset).
    let fail_once = || {
        let client = link.a.run(|| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
            socket.set_reuse_address(true).expect("SO_REUSEADDR");
            socket
                .bind(&SockAddr::from(SocketAddr::new(link.a_addr, client_port)))
                .expect("bind the client port");
            socket.connect(&SockAddr::from(listen)).expect("connect");
            socket
        });
        let (accepted, _) = listener.accept().expect("accept");
        let accepted = Socket::from(accepted);
        accepted
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER 0");
        drop(accepted);
        let mut byte = [0u8; 1];
        let err = TcpStream::from(client)
            .read(&mut byte)
            .expect_err("the server reset the connection");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    };
    fail_once();
    wait_for(&probes, SERVER_SLOT, |t| t.resets_sent == 1);
    std::thread::sleep(Duration::from_millis(1200));
    fail_once();
    let totals = wait_for(&probes, SERVER_SLOT, |t| t.resets_sent == 2);
    assert_eq!(
        (totals.resets_sent, totals.resets_received),
        (2, 0),
        "{totals:?}"
    );
    let resets = drain_events(&mut probes)
        .iter()
        .filter(|e| e.kind == event_kind::RESET_SENT && e.remote_port == client_port)
        .count();
    assert_eq!(resets, 2);
}

/// A refusal marks its 4-tuple only against the race of a connection's reset that another CPU
/// answered as a refusal a moment before: a client refused again from the same port is a new
/// failure, and so is a later connection of that tuple that is reset.
#[test]
fn a_four_tuple_refused_again_counts_again_and_so_does_its_later_reset() {
    use socket2::{Domain, SockAddr, Socket, Type};

    let (_pins, mut probes, link) = watched_server("refuse4");
    let target = SocketAddr::new(link.b_addr, CLOSED_PORT);
    let client_port = 40_321;
    let socket_from_port = || {
        link.a.run(|| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
            socket.set_reuse_address(true).expect("SO_REUSEADDR");
            socket
                .bind(&SockAddr::from(SocketAddr::new(link.a_addr, client_port)))
                .expect("bind the client port");
            socket
        })
    };
    for _ in 0..2 {
        let err = socket_from_port()
            .connect(&SockAddr::from(target))
            .expect_err("nothing listens");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
    wait_for(&probes, SERVER_SLOT, |t| t.refused == 2);

    // Well past the race's 10 ms: the same tuple connects and is reset.
    std::thread::sleep(Duration::from_millis(50));
    let listener = link.b.run(|| TcpListener::bind(target).expect("bind"));
    let client = socket_from_port();
    client.connect(&SockAddr::from(target)).expect("connect");
    let (accepted, _) = listener.accept().expect("accept");
    let accepted = Socket::from(accepted);
    accepted
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(accepted);
    let mut byte = [0u8; 1];
    let err = TcpStream::from(client)
        .read(&mut byte)
        .expect_err("the server reset the connection");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    let totals = wait_for(&probes, SERVER_SLOT, |t| t.resets_sent == 1);
    assert_eq!((totals.refused, totals.resets_sent), (2, 1), "{totals:?}");
    let events = drain_events(&mut probes);
    let of_port = |kind| {
        events
            .iter()
            .filter(|e| e.kind == kind && e.remote_port == client_port)
            .count()
    };
    assert_eq!(
        (
            of_port(event_kind::REFUSED),
            of_port(event_kind::RESET_SENT)
        ),
        (2, 1)
    );
}

/// Five refusals whose 4-tuples share a bucket of the reset table (four cells): each is
/// counted, with its event, and the fifth forgets the first (under a second old), which is
/// counted as such, never silent. The test picks the client ports with the maps' own seed.
#[test]
fn a_full_reset_table_bucket_forgets_its_oldest_reset_and_counts_that() {
    use draingate_common::{AddrKey, ConnKey, conn_hash, reset_home};
    use socket2::{Domain, SockAddr, Socket, Type};

    let (_pins, mut probes, link) = watched_server("rstfull");
    let seed = probes.reset_seed().expect("the reset table's seed");
    assert_ne!(seed, 0, "the loader seeds the reset table");
    // The server's view of each refusal: what its tcp_send_reset program remembers.
    let bucket_of = |client_port: u16| {
        reset_home(conn_hash(
            &ConnKey {
                local: AddrKey::from(link.b_addr),
                remote: AddrKey::from(link.a_addr),
                local_port: CLOSED_PORT,
                remote_port: client_port,
            },
            seed,
        ))
    };
    // About 7.9 ports per bucket (the hash spreads nearby ports evenly): some bucket has five.
    let mut by_bucket = std::collections::HashMap::<u32, Vec<u16>>::new();
    let ports = (1024..=u16::MAX)
        .find_map(|port| {
            let ports = by_bucket.entry(bucket_of(port)).or_default();
            ports.push(port);
            (ports.len() == 5).then(|| ports.clone())
        })
        .expect("five client ports share a bucket");

    let target = SocketAddr::new(link.b_addr, CLOSED_PORT);
    for &port in &ports {
        let socket = link.a.run(|| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
            socket
                .bind(&SockAddr::from(SocketAddr::new(link.a_addr, port)))
                .expect("bind the client port");
            socket
        });
        let err = socket
            .connect(&SockAddr::from(target))
            .expect_err("nothing listens");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
    let totals = wait_for(&probes, SERVER_SLOT, |t| t.refused == 5);
    assert_eq!(totals.refused, 5, "{totals:?}");
    let loss = probes.loss().expect("loss");
    assert_eq!(loss.reset_table_full, 1, "{loss:?}");
    assert_eq!(
        (loss.read_errors, loss.socket_table_full, loss.ring_full),
        (0, 0, 0)
    );
    let events = drain_events(&mut probes);
    let mut refused_ports: Vec<u16> = events
        .iter()
        .filter(|e| e.kind == event_kind::REFUSED && e.local_port == CLOSED_PORT)
        .map(|e| e.remote_port)
        .collect();
    refused_ports.sort_unstable();
    assert_eq!(refused_ports, ports, "{events:?}");
}

/// The socket table shrunk to 4 buckets (16 cells) and filled: sockets beyond it are not
/// tracked and each miss is counted as a loss, never silent; the tracked ones close back to 0;
/// and the freed cells (and the buckets sockets spilled into) take new sockets again.
#[test]
fn a_full_socket_table_counts_what_it_cannot_track_and_frees_its_cells() {
    require_root();
    let mut pins = PinDir::new();
    pins.config.socket_buckets = 4;
    let mut probes = KernelProbes::load(&pins.config).expect("load and attach the programs");
    let link = Link::new("full", Family::V4);
    attach_where_needed(&mut probes, &link);
    probes
        .watch(link.b_addr, SERVER_SLOT)
        .expect("watch server");
    probes
        .watch(link.a_addr, CLIENT_SLOT)
        .expect("watch client");
    probes
        .apply_addresses()
        .expect("hand the addresses to the kernel");
    let listen = SocketAddr::new(link.b_addr, PORT);
    let listener = link.b.run(|| TcpListener::bind(listen).expect("bind"));
    let open_connections = |n: usize| -> Vec<(TcpStream, TcpStream)> {
        (0..n)
            .map(|_| {
                let client = link.a.run(|| TcpStream::connect(listen).expect("connect"));
                (client, listener.accept().expect("accept").0)
            })
            .collect()
    };

    // 12 connections are 24 pod sockets for 16 cells: the first 8 connections fill the table.
    let held = open_connections(12);
    let server = wait_for(&probes, SERVER_SLOT, |t| t.accepted == 12);
    let client = wait_for(&probes, CLIENT_SLOT, |t| t.opened == 12);
    assert_eq!(
        (server.accepted, client.opened),
        (12, 12),
        "every connection counts"
    );
    assert_eq!(
        server.open + client.open,
        16,
        "one socket per cell: {server:?} {client:?}"
    );
    let lost = probes.loss().expect("loss").socket_table_full;
    // Each of the 8 untracked sockets is a loss at least once (again at each later try).
    assert!(lost >= 8, "sockets not tracked must be counted: {lost}");

    drop(held);
    let server = wait_for(&probes, SERVER_SLOT, |t| t.open == 0);
    let client = wait_for(&probes, CLIENT_SLOT, |t| t.open == 0);
    assert_eq!((server.open, client.open), (0, 0), "tracked sockets closed");

    // The cells are free again: the table is whole.
    let held = open_connections(8);
    let server = wait_for(&probes, SERVER_SLOT, |t| t.open == 8);
    let client = wait_for(&probes, CLIENT_SLOT, |t| t.open == 8);
    assert_eq!((server.open, client.open), (8, 8));
    assert_eq!(
        probes.loss().expect("loss").socket_table_full,
        lost,
        "a table with room loses nothing"
    );
    drop(held);
    let server = wait_for(&probes, SERVER_SLOT, |t| t.open == 0);
    assert_eq!(server.open, 0);
}

/// Maps pinned by an agent of another map layout (here: its stamp rewritten, or missing as with
/// agents from before the stamp) are refused with what to do, never taken over and misread;
/// the same layout is taken over as before.
#[test]
fn maps_pinned_with_another_layout_are_refused_not_misread() {
    use aya::maps::{Array, Map, MapData};
    use draingate::loader::LoaderError;
    require_root();
    let pins = PinDir::new();
    drop(KernelProbes::load(&pins.config).expect("first agent"));
    let stamp = |layout: u64| {
        let data =
            MapData::from_pin(pins.config.pin_dir.join("ADDR_GEN")).expect("pinned ADDR_GEN");
        let mut array: Array<_, u64> = Array::try_from(Map::Array(data)).expect("an array");
        array.set(1, layout, 0).expect("write the stamp");
    };
    for (layout, pinned) in [
        (
            draingate_common::MAP_LAYOUT + 1,
            Some(draingate_common::MAP_LAYOUT + 1),
        ),
        (0, None),
    ] {
        stamp(layout);
        let Err(err) = KernelProbes::load(&pins.config) else {
            panic!("maps of layout {layout} were taken over");
        };
        assert!(
            matches!(&err, LoaderError::PinnedLayout { pinned: p, expected, .. }
                if *p == pinned && *expected == draingate_common::MAP_LAYOUT),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&format!("rm -r {}", pins.config.pin_dir.display())),
            "{message}"
        );
    }
    stamp(draingate_common::MAP_LAYOUT);
    KernelProbes::load(&pins.config).expect("the same layout is taken over");
}

/// A pod process's SIGTERM opens its pod's window in the kernel, and its exit is reported with
/// the connections it still held; a SIGTERM to a process of no pod is reported for user space
/// to resolve, without a pod, and its exit not at all. `fixed`: the programs that read this
/// kernel's record layouts in place (the default here), or the ones that take every offset
/// from tracefs (any other kernel's choice).
/// `group_dead`: whether the exit record's `group_dead` (6.16+) is used, or taken as absent
/// as on older kernels, where the process's live thread count is read at offsets from BTF.
/// The pod's process has five threads, all ending at once: one exit is reported, not five.
fn reports_signals_and_exits_of_pod_processes(fixed: bool, group_dead: bool) {
    use nix::{sys::signal, unistd::Pid};
    require_root();
    let mut pins = PinDir::new();
    pins.config.fixed_layout = fixed;
    if !group_dead {
        pins.config
            .hide_fields
            .push(("sched_process_exit", "group_dead"));
    }
    let mut probes = KernelProbes::load(&pins.config).expect("load and attach the programs");
    // The in-place exit program only where the record has `group_dead` (6.16+).
    let kernel_has_group_dead =
        std::fs::read_to_string("/sys/kernel/tracing/events/sched/sched_process_exit/format")
            .expect("the exit record's format")
            .contains("group_dead");
    let expected = match (fixed, group_dead && kernel_has_group_dead) {
        (true, true) => ["signal_generate_fixed", "sched_process_exit_fixed"],
        (true, false) => ["signal_generate_fixed", "sched_process_exit"],
        (false, _) => ["signal_generate", "sched_process_exit"],
    };
    for program in expected {
        assert!(probes.programs.contains(&program), "{:?}", probes.programs);
    }
    let threads = "import threading, time\n\
                   for _ in range(4): threading.Thread(target=time.sleep, args=(30,)).start()\n\
                   print('ready', flush=True)\n\
                   time.sleep(30)";
    let spawn = || {
        let mut child = std::process::Command::new("python3")
            .args(["-c", threads])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn python3");
        // Every thread started before the test goes on.
        let mut ready = [0u8; 6];
        child
            .stdout
            .as_mut()
            .expect("stdout")
            .read_exact(&mut ready)
            .expect("ready");
        child
    };
    let (mut pod_process, mut stranger) = (spawn(), spawn());
    let (pod_pid, stranger_pid) = (pod_process.id(), stranger.id());
    probes
        .track_task(pod_pid, SERVER_SLOT)
        .expect("track the pod's process");
    assert_eq!(probes.window_since(SERVER_SLOT).expect("window"), None);
    for child in [&mut stranger, &mut pod_process] {
        let pid = Pid::from_raw(child.id().cast_signed());
        signal::kill(pid, signal::Signal::SIGTERM).expect("SIGTERM");
        let _ = child.wait();
    }
    let since = probes
        .window_since(SERVER_SLOT)
        .expect("window")
        .expect("the SIGTERM to the pod's process opened its window");

    let events: Vec<NotableEvent> = drain_all_events(&mut probes)
        .into_iter()
        .filter(|e| e.pid == pod_pid || e.pid == stranger_pid)
        .collect();
    let seen: Vec<(u8, u32, u32, u8)> = events
        .iter()
        .map(|e| (e.kind, e.pid, e.slot, e.signal))
        .collect();
    assert_eq!(
        seen,
        vec![
            (event_kind::SIGNAL, stranger_pid, NO_SLOT, 15),
            (event_kind::SIGNAL, pod_pid, SERVER_SLOT, 15),
            (event_kind::EXIT, pod_pid, SERVER_SLOT, 0),
        ],
        "{events:?}"
    );
    assert_eq!(events[1].time_ns, since, "the window opened at the signal");
    assert_eq!(events[2].held, 0, "the process held no connection");
    assert!(events[2].time_ns >= since);
}

#[test]
fn reports_signals_and_exits_of_pod_processes_reading_records_in_place() {
    reports_signals_and_exits_of_pod_processes(true, true);
}

#[test]
fn reports_exits_of_pod_processes_from_the_live_thread_count_without_group_dead() {
    reports_signals_and_exits_of_pod_processes(true, false);
}

#[test]
fn reports_signals_and_exits_of_pod_processes_with_offsets_from_tracefs() {
    reports_signals_and_exits_of_pod_processes(false, true);
}
