//! The agent's counts against two witnesses it does not control: the pod's own kernel counters
//! (`nstat` in the pod's network namespace: `TcpPassiveOpens`, `TcpOutRsts`) and what the
//! clients saw. This is the test the kernel matrix (`cargo xtask vm-test`) runs first on every
//! kernel: each count comes from another source there (tracepoint or TC program), and both
//! witnesses stay the same.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use draingate::loader::{KernelProbes, ResetSource, SlotTotals};
use draingate_tests::{Family, Link, PinDir, require_root};

const POD_SLOT: u32 = 21;
const PORT: u16 = 8080;
const CLOSED_PORT: u16 = 8081;
/// Served and closed cleanly.
const SERVED: u64 = 20;
/// Connects to a closed port.
const REFUSED: u64 = 5;
/// Accepted, then aborted by the server (`SO_LINGER` 0): one reset each, sent by the pod.
const SERVER_ABORTS: u64 = 3;
/// Accepted, then aborted by the client: one reset each, received by the pod.
const CLIENT_ABORTS: u64 = 4;

/// `nstat` counters of the namespace `ns`, absolute.
fn nstat(ns: &str, names: &[&str]) -> Vec<u64> {
    let output = Command::new("ip")
        .args(["netns", "exec", ns, "nstat", "-asz"])
        .args(names)
        .output()
        .expect("run nstat (iproute2)");
    assert!(output.status.success(), "nstat failed: {output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    names
        .iter()
        .map(|name| {
            text.lines()
                .find_map(|line| {
                    let mut words = line.split_whitespace();
                    (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
                })
                .unwrap_or_else(|| panic!("nstat has no {name}: {text}"))
        })
        .collect()
}

fn wait_for(probes: &KernelProbes, done: impl Fn(&SlotTotals) -> bool) -> SlotTotals {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let totals = probes.slot_totals(POD_SLOT).expect("read counters");
        if done(&totals) || Instant::now() > deadline {
            return totals;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn linger_zero(conn: &TcpStream) {
    socket2::SockRef::from(conn)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
}

fn counts_equal_the_pods_own_kernel_counters(family: Family, resets: Option<ResetSource>) {
    require_root();
    let mut pins = PinDir::new();
    pins.config.reset_source = resets;
    let mut probes = KernelProbes::load(&pins.config).expect("load and attach the programs");
    let link = Link::new("truth", family);
    probes.watch(link.b_addr, POD_SLOT).expect("watch the pod");
    probes.apply_addresses().expect("apply");
    probes
        .watch_pod_interfaces(&link.b.path())
        .expect("the reset program where the kernel needs it");
    let pod = link.b.name().to_owned();
    let before = nstat(&pod, &["TcpPassiveOpens", "TcpOutRsts"]);

    let listen = SocketAddr::new(link.b_addr, PORT);
    let listener = link.b.run(|| TcpListener::bind(listen).expect("bind"));
    let connect = || link.a.run(|| TcpStream::connect(listen).expect("connect"));
    // What the clients saw.
    let (mut clean, mut refused, mut reset_by_server) = (0u64, 0u64, 0u64);
    for _ in 0..SERVED {
        let mut client = connect();
        let (mut server, _) = listener.accept().expect("accept");
        client.write_all(b"?").expect("request");
        let mut byte = [0u8; 1];
        server.read_exact(&mut byte).expect("read request");
        server.write_all(b"ok").expect("response");
        drop(server);
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).expect("response");
        clean += u64::from(reply == b"ok");
    }
    for _ in 0..REFUSED {
        let target = SocketAddr::new(link.b_addr, CLOSED_PORT);
        if let Err(err) = link.a.run(|| TcpStream::connect(target)) {
            refused += u64::from(err.kind() == std::io::ErrorKind::ConnectionRefused);
        }
    }
    for _ in 0..SERVER_ABORTS {
        let mut client = connect();
        let (server, _) = listener.accept().expect("accept");
        linger_zero(&server);
        drop(server);
        let mut buf = [0u8; 8];
        if let Err(err) = client.read(&mut buf) {
            reset_by_server += u64::from(err.kind() == std::io::ErrorKind::ConnectionReset);
        }
    }
    for _ in 0..CLIENT_ABORTS {
        let client = connect();
        let (mut server, _) = listener.accept().expect("accept");
        linger_zero(&client);
        drop(client);
        let mut buf = [0u8; 8];
        // The server sees the reset: its read fails (or ends, if it raced the close).
        let _ = server.read(&mut buf);
    }
    drop(listener);
    assert_eq!(
        (clean, refused, reset_by_server),
        (SERVED, REFUSED, SERVER_ABORTS),
        "the clients' view"
    );

    let accepted = SERVED + SERVER_ABORTS + CLIENT_ABORTS;
    let totals = wait_for(&probes, |t| {
        t.accepted == accepted
            && t.refused == REFUSED
            && t.resets_sent == SERVER_ABORTS
            && t.resets_received == CLIENT_ABORTS
            && t.open == 0
    });
    let after = nstat(&pod, &["TcpPassiveOpens", "TcpOutRsts"]);
    let (passive_opens, out_rsts) = (after[0] - before[0], after[1] - before[1]);
    // The pod's own kernel: every accepted connection, and one reset per refusal and abort.
    assert_eq!(
        (totals.accepted, totals.refused + totals.resets_sent),
        (passive_opens, out_rsts),
        "agent {totals:?} against nstat in the pod: TcpPassiveOpens {passive_opens}, TcpOutRsts \
         {out_rsts} (resets from {:?})",
        probes.reset_source
    );
    assert_eq!(
        (
            totals.accepted,
            totals.refused,
            totals.resets_sent,
            totals.resets_received,
            totals.open
        ),
        (accepted, REFUSED, SERVER_ABORTS, CLIENT_ABORTS, 0),
        "{totals:?}"
    );
    assert_eq!(
        probes.loss().expect("loss"),
        draingate_common::LossCounters::default()
    );
}

#[test]
fn ipv4_counts_equal_the_pods_own_kernel_counters() {
    counts_equal_the_pods_own_kernel_counters(Family::V4, None);
}

#[test]
fn ipv6_counts_equal_the_pods_own_kernel_counters() {
    counts_equal_the_pods_own_kernel_counters(Family::V6, None);
}

/// The packet source on any kernel (the only one before 6.10): the same counts.
#[test]
fn ipv4_counts_from_packets_equal_the_pods_own_kernel_counters() {
    counts_equal_the_pods_own_kernel_counters(Family::V4, Some(ResetSource::Packets));
}
