//! `cargo xtask bench`: what the agent costs, measured side by side with a baseline.
//!
//! - New connections per second through a pod namespace (connect, one HTTP request, close) at a
//!   target rate, alternating rounds without and with `draingate agent` running: throughput and
//!   p99 latency ratios (agent / baseline).
//! - Kernel time per program run, from the kernel's BPF statistics (`kernel.bpf_stats_enabled`).
//! - The agent's resident memory with 110 pods (network namespaces with an address each).
//!
//! With `--against DRAINGATE`, only this: kernel time per `inet_sock_set_state` run of this
//! build's agent against another build's, both attached at once under the same load.
//!
//! Prints a Markdown report (and writes it to `--out`).
//!
//! Over 800 lines for one reason: it is one program whose three measurements share the set-up
//! (pod namespaces, the agent under test, the load loop and its rounds) and one report; each
//! measurement alone would repeat that set-up.
#![expect(
    clippy::cast_precision_loss,
    reason = "statistics over counts and durations far below 2^52"
)]

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use clap::Parser;
use draingate_tests::{ChildGuard, Family, Link, Netns, build_bin, draingate_bin, require_root};

/// Measures the agent's overhead against a baseline run side by side.
#[derive(Debug, Parser)]
struct Args {
    /// Target new connections per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds per measured run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds of (baseline, agent) runs; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Pods (network namespaces) for the memory measurement.
    #[arg(long, default_value_t = 110)]
    pods: usize,
    /// Where to write the Markdown report.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Instead of the above, compare kernel time per run with another build's agent (the path
    /// of its `draingate` binary): both agents run at once, in both attach orders, for
    /// `--rounds` pairs of runs. For changes smaller than the run-to-run noise of the overhead
    /// rounds (about 15 ns here).
    #[arg(long, value_name = "DRAINGATE")]
    against: Option<PathBuf>,
    /// What to call the other build in the report (a commit, say); its path by default.
    #[arg(long, requires = "against")]
    against_label: Option<String>,
    /// Only the packet source's part (the TC program of kernels before 6.10).
    #[arg(long, conflicts_with = "against")]
    only_packets: bool,
    /// Target requests per second over keep-alive connections for the HTTP part (the TC
    /// program reading each response's status).
    #[arg(long, default_value_t = 10_000)]
    http_rate: u64,
    /// Only the HTTP part.
    #[arg(long, conflicts_with_all = ["against", "only_packets"])]
    only_http: bool,
}

/// One load run's outcome.
#[derive(Debug, Clone, Copy)]
struct Run {
    per_second: f64,
    p99_us: f64,
    failures: u64,
}

const WORKERS: u64 = 8;

/// Open-loop load: `WORKERS` threads in the client namespace, each pacing its share of `rate`
/// new connections per second for `seconds`.
fn load(link: &Link, target: SocketAddr, rate: u64, seconds: u64) -> Run {
    paced_load(link, rate, seconds, || move || one_request(target))
}

/// Open-loop load over keep-alive connections: `WORKERS` threads in the client namespace, each
/// on one connection (a new one after a failure), pacing its share of `rate` requests per
/// second for `seconds`.
fn load_keep_alive(link: &Link, target: SocketAddr, rate: u64, seconds: u64) -> Run {
    paced_load(link, rate, seconds, || {
        let mut conn: Option<TcpStream> = None;
        move || {
            if conn.is_none() {
                conn = connect(target).inspect(|c| {
                    let _ = c.set_nodelay(true);
                });
            }
            let ok = conn
                .as_mut()
                .is_some_and(|c| exchange(c, b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"));
            if !ok {
                conn = None;
            }
            ok
        }
    })
}

/// `WORKERS` threads in the client namespace, each with its own `request` (made by
/// `worker`), pacing its share of `rate` calls per second for `seconds`: the rate, the p99
/// latency of the requests that succeeded, and how many failed.
fn paced_load<R: FnMut() -> bool>(
    link: &Link,
    rate: u64,
    seconds: u64,
    worker: impl Fn() -> R + Sync,
) -> Run {
    let started = Instant::now();
    let results: Vec<(Vec<u32>, u64)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                scope.spawn(|| {
                    link.a.run(|| {
                        let interval = Duration::from_secs_f64(WORKERS as f64 / rate as f64);
                        let mut request = worker();
                        let mut latencies = Vec::new();
                        let failures = paced(interval, seconds, || {
                            let begin = Instant::now();
                            let ok = request();
                            if ok {
                                latencies.push(begin.elapsed().as_micros() as u32);
                            }
                            !ok
                        });
                        (latencies, failures)
                    })
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies: Vec<u32> = results
        .iter()
        .flat_map(|(l, _)| l.iter().copied())
        .collect();
    let failures = results.iter().map(|(_, f)| f).sum();
    latencies.sort_unstable();
    let p99 = latencies
        .get(latencies.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or(0);
    Run {
        per_second: latencies.len() as f64 / elapsed,
        p99_us: f64::from(p99),
        failures,
    }
}

/// A connection to `target` with a 1 s read timeout, or `None` when the connect failed.
fn connect(target: SocketAddr) -> Option<TcpStream> {
    let conn = TcpStream::connect_timeout(&target, Duration::from_secs(1)).ok()?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    Some(conn)
}

/// Sends `request` on `conn` and reads the test server's answer (its body is `ok`).
fn exchange(conn: &mut TcpStream, request: &[u8]) -> bool {
    if conn.write_all(request).is_err() {
        return false;
    }
    let mut response = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
        }
        if response.ends_with(b"ok") {
            return true;
        }
    }
}

/// One request on a new connection.
fn one_request(target: SocketAddr) -> bool {
    connect(target).is_some_and(|mut conn| {
        exchange(
            &mut conn,
            b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
        )
    })
}

/// A `draingate agent` process on its own pins and ports; stopped and its pins removed on drop,
/// so that baseline runs have no programs attached.
struct AgentProcess {
    child: Child,
    pins: PathBuf,
    http: SocketAddr,
}

impl AgentProcess {
    fn start(tag: &str) -> Self {
        Self::start_binary(&draingate_bin(), tag, 0)
    }

    /// This build's agent counting resets from packets (`--reset-source packets`: the TC
    /// program of kernels before 6.10) on any kernel.
    fn start_packets(tag: &str) -> Self {
        Self::start_with(&draingate_bin(), tag, 0, &["--reset-source", "packets"])
    }

    /// Starts `binary`'s agent on pins of its own and on ports 19560 + 2 × `index` (gRPC) and
    /// the next one (HTTP), so that agents of different indexes can run at once.
    fn start_binary(binary: &std::path::Path, tag: &str, index: u16) -> Self {
        Self::start_with(binary, tag, index, &[])
    }

    fn start_with(binary: &std::path::Path, tag: &str, index: u16, extra: &[&str]) -> Self {
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/draingate-bench-{}-{tag}",
            std::process::id()
        ));
        let socket = format!("/tmp/draingate-bench-{}-{tag}.sock", std::process::id());
        let grpc = SocketAddr::from(([127, 0, 0, 1], 19_560 + 2 * index));
        let http = SocketAddr::from(([127, 0, 0, 1], 19_561 + 2 * index));
        let child = Command::new(binary)
            .args([
                "agent",
                "--grpc-addr",
                &grpc.to_string(),
                "--http-addr",
                &http.to_string(),
            ])
            .args(["--socket", &socket, "--pin-dir"])
            .arg(&pins)
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("start {} agent: {err}", binary.display()));
        let agent = Self { child, pins, http };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !agent.ready() {
            assert!(Instant::now() < deadline, "the agent never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    fn ready(&self) -> bool {
        draingate_tests::http_request(self.http, "GET", "/readyz", "")
            .is_ok_and(|(status, _)| status == 200)
    }

    fn pods(&self) -> usize {
        draingate_tests::http_request(self.http, "GET", "/metrics", "").map_or(0, |(_, m)| {
            m.lines()
                .filter(|l| l.starts_with("draingate_pod_open_connections{"))
                .count()
        })
    }

    /// CPU time the agent used so far (user + system), from `/proc/<pid>/stat`.
    fn cpu(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at ")".
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
            .sum();
        // USER_HZ is 100 on Linux.
        Duration::from_millis(ticks * 10)
    }

    /// Resident and peak resident memory in KiB.
    fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id().cast_signed());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = draingate::loader::KernelProbes::remove_pins(&self.pins);
    }
}

/// The agent's programs, by the hook each runs on (the name of the pinned link).
const PROGRAMS: [&str; 5] = [
    "inet_sock_set_state",
    "tcp_send_reset",
    "tcp_receive_reset",
    "signal_generate",
    "sched_process_exit",
];

/// Run time and count of each of the agent's programs now, by hook (the kernel keeps names
/// truncated to 15 bytes; `inet_sock_set_state_fixed` counts as `inet_sock_set_state`).
fn program_stats() -> Vec<(String, Duration, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| {
            let name = p.name_as_str()?.to_owned();
            let full = PROGRAMS
                .iter()
                .find(|n| !name.is_empty() && n.starts_with(&name))?;
            Some(((*full).to_owned(), p.run_time(), p.run_count()))
        })
        .collect()
}

/// Run time and count of each program since `before` (a [`program_stats`] reading).
fn program_stats_since(before: &[(String, Duration, u64)]) -> Vec<(String, Duration, u64)> {
    program_stats()
        .into_iter()
        .map(|(name, time, count)| {
            let (t0, c0) = before
                .iter()
                .find(|(n, ..)| *n == name)
                .map_or((Duration::ZERO, 0), |(_, t, c)| (*t, *c));
            (name, time.saturating_sub(t0), count.saturating_sub(c0))
        })
        .collect()
}

/// Nanoseconds per run, 0 without runs.
fn average(time: Duration, count: u64) -> f64 {
    if count == 0 {
        0.0
    } else {
        time.as_nanos() as f64 / count as f64
    }
}

/// One agent round's `inet_sock_set_state` program and the floor beside it: (run time, runs).
struct Paired {
    program: (Duration, u64),
    floor: (Duration, u64),
}

impl Paired {
    fn program_ns(&self) -> f64 {
        average(self.program.0, self.program.1)
    }

    fn floor_ns(&self) -> f64 {
        average(self.floor.0, self.floor.1)
    }

    fn own_ns(&self) -> f64 {
        self.program_ns() - self.floor_ns()
    }

    fn ratio(&self) -> f64 {
        let floor = self.floor_ns();
        if floor > 0.0 {
            self.program_ns() / floor
        } else {
            0.0
        }
    }
}

/// Ids of the loaded `inet_sock_set_state` programs.
fn set_state_program_ids() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            p.name_as_str()
                .is_some_and(|n| !n.is_empty() && "inet_sock_set_state".starts_with(n))
        })
        .map(|p| p.id())
        .collect()
}

/// Run time and count of the programs with these ids, summed.
fn stats_of(ids: &[u32]) -> (Duration, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .fold((Duration::ZERO, 0), |(t, c), p| {
            (t + p.run_time(), c + p.run_count())
        })
}

/// Kernel time and runs, added up.
fn total(parts: impl IntoIterator<Item = (Duration, u64)>) -> (Duration, u64) {
    parts
        .into_iter()
        .fold((Duration::ZERO, 0), |(time, runs), (t, r)| {
            (time + t, runs + r)
        })
}

/// A row of the rare-paths table: a program (or all of them) beside its floor.
fn program_row(name: &str, p: &Paired) -> String {
    if p.program.1 == 0 {
        return format!("| {name} | 0 | - | - | - | - | <= 150 |");
    }
    format!(
        "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.2} | <= 150 |",
        p.program.1,
        p.program_ns(),
        p.floor_ns(),
        p.own_ns(),
        p.ratio()
    )
}

/// Each agent program's run time beside the floor on its tracepoint while `work` runs, by hook.
fn measure<R>(
    floor: &draingate::loader::FloorProbe,
    work: impl FnOnce() -> R,
) -> (R, Vec<(&'static str, Paired)>) {
    let floors = |ids: &[(&'static str, u32)]| -> Vec<(Duration, u64)> {
        ids.iter().map(|(_, id)| stats_of(&[*id])).collect()
    };
    let before = program_stats();
    let floors_before = floors(floor.program_ids());
    let result = work();
    let ran = program_stats_since(&before);
    let floors_after = floors(floor.program_ids());
    let hooks = PROGRAMS
        .iter()
        .map(|&hook| {
            let program = total(
                ran.iter()
                    .filter(|(n, ..)| n == hook)
                    .map(|(_, time, count)| (*time, *count)),
            );
            let floor = floor
                .program_ids()
                .iter()
                .position(|(h, _)| *h == hook)
                .map_or((Duration::ZERO, 0), |i| {
                    (
                        floors_after[i].0.saturating_sub(floors_before[i].0),
                        floors_after[i].1.saturating_sub(floors_before[i].1),
                    )
                });
            (hook, Paired { program, floor })
        })
        .collect();
    (result, hooks)
}

/// The rare paths the rare-paths round adds to the connection load, per second each.
const REFUSALS_PER_S: u64 = 500;
const ABORTS_PER_S: u64 = 500;
const SPAWNS_PER_S: u64 = 100;
const SIGTERMS_PER_S: u64 = 20;
/// A port of the server pod where nothing listens.
const CLOSED_PORT: u16 = 8081;

/// The interval of `rate` calls a second.
fn per_second(rate: u64) -> Duration {
    Duration::from_secs_f64(1.0 / rate as f64)
}

/// What the rare-paths side load did.
#[derive(Debug, Default)]
struct RareCounts {
    refused: u64,
    aborted: u64,
    spawned: u64,
    terminated: u64,
}

/// Calls `f` once every `interval` for `seconds` (open loop: a late call does not delay the
/// next ones); returns how often it returned true.
fn paced(interval: Duration, seconds: u64, mut f: impl FnMut() -> bool) -> u64 {
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut next = Instant::now();
    let mut done = 0;
    while Instant::now() < end {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        next += interval;
        done += u64::from(f());
    }
    done
}

/// The rare paths, from the client pod to the server pod and on the host, for `seconds`:
/// connects refused by the server pod (`tcp_send_reset` without a socket, `tcp_receive_reset`
/// in `SYN_SENT`, a failed connect), connections the client resets (`SO_LINGER` 0: a reset sent
/// on a connection and received on the other end), short processes (`sched_process_exit`, and
/// the SIGCHLD of each through `signal_generate`), and processes stopped with SIGTERM (the
/// signal path that reports an event).
fn rare_load(link: &Link, target: SocketAddr, seconds: u64) -> RareCounts {
    let closed = SocketAddr::new(target.ip(), CLOSED_PORT);
    std::thread::scope(|scope| {
        let refused = scope.spawn(|| {
            link.a.run(|| {
                paced(per_second(REFUSALS_PER_S), seconds, || {
                    TcpStream::connect_timeout(&closed, Duration::from_secs(1))
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
                })
            })
        });
        let aborted = scope.spawn(|| {
            link.a.run(|| {
                paced(per_second(ABORTS_PER_S), seconds, || {
                    TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok_and(|c| {
                        socket2::SockRef::from(&c)
                            .set_linger(Some(Duration::ZERO))
                            .is_ok()
                    })
                })
            })
        });
        let spawned = scope.spawn(|| {
            paced(per_second(SPAWNS_PER_S), seconds, || {
                Command::new("true").status().is_ok_and(|s| s.success())
            })
        });
        let terminated = scope.spawn(|| {
            paced(per_second(SIGTERMS_PER_S), seconds, || {
                let Ok(mut child) = Command::new("sleep").arg("30").spawn() else {
                    return false;
                };
                let pid = nix::unistd::Pid::from_raw(child.id().cast_signed());
                let sent = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok();
                let _ = child.wait();
                sent
            })
        });
        RareCounts {
            refused: refused.join().expect("refusals"),
            aborted: aborted.join().expect("aborts"),
            spawned: spawned.join().expect("spawns"),
            terminated: terminated.join().expect("SIGTERMs"),
        }
    })
}

/// One run of the comparison: this build's and the other's `inet_sock_set_state`, ns per run.
struct AbRun {
    this_first: bool,
    this_ns: f64,
    other_ns: f64,
}

/// `--against`: this build's agent and another build's, attached at once so that both programs
/// see the same events at the same moment; the order alternates, since the program attached
/// second runs on caches the first one warmed.
fn against(args: &Args, other: &std::path::Path, link: &Link, target: SocketAddr) -> String {
    let label = args
        .against_label
        .clone()
        .unwrap_or_else(|| other.display().to_string());
    let mut runs = Vec::new();
    for round in 0..args.rounds.max(1) {
        for this_first in [true, false] {
            eprintln!(
                "pair {}/{}: {} attached first",
                round + 1,
                args.rounds.max(1),
                if this_first {
                    "this build"
                } else {
                    "the other"
                }
            );
            let order = if this_first {
                [(draingate_bin(), "this"), (other.to_path_buf(), "other")]
            } else {
                [(other.to_path_buf(), "other"), (draingate_bin(), "this")]
            };
            let mut agents = Vec::new();
            let mut ids: Vec<(&str, Vec<u32>)> = Vec::new();
            for (index, (binary, who)) in order.iter().enumerate() {
                let before = set_state_program_ids();
                let tag = format!("ab{round}{who}");
                agents.push(AgentProcess::start_binary(binary, &tag, index as u16));
                let mine: Vec<u32> = set_state_program_ids()
                    .into_iter()
                    .filter(|id| !before.contains(id))
                    .collect();
                assert!(!mine.is_empty(), "{} attached no program", binary.display());
                ids.push((who, mine));
            }
            let ids_of = |who: &str| {
                ids.iter()
                    .find(|(w, _)| *w == who)
                    .map(|(_, i)| i.clone())
                    .unwrap_or_default()
            };
            let (this_ids, other_ids) = (ids_of("this"), ids_of("other"));
            let (this_before, other_before) = (stats_of(&this_ids), stats_of(&other_ids));
            let run = load(link, target, args.rate, args.seconds);
            let (this_after, other_after) = (stats_of(&this_ids), stats_of(&other_ids));
            drop(agents);
            let ns = |after: (Duration, u64), before: (Duration, u64)| {
                average(after.0.saturating_sub(before.0), after.1 - before.1)
            };
            runs.push(AbRun {
                this_first,
                this_ns: ns(this_after, this_before),
                other_ns: ns(other_after, other_before),
            });
            eprintln!(
                "  {:.0} connections/s; this {:.1} ns, other {:.1} ns per run",
                run.per_second,
                runs.last().map_or(0.0, |r| r.this_ns),
                runs.last().map_or(0.0, |r| r.other_ns)
            );
        }
    }
    ab_report(args, &label, &runs)
}

fn ab_report(args: &Args, label: &str, runs: &[AbRun]) -> String {
    let mut report = String::new();
    let _ = writeln!(
        report,
        "## Kernel time against another build

Reproduce: `sudo cargo xtask bench --only \
         overhead -- --against <other draingate> --against-label {label} --rounds {} --seconds \
         {} --rate {}`
",
        args.rounds, args.seconds, args.rate
    );
    let _ = writeln!(
        report,
        "`sock:inet_sock_set_state`, average ns per run from the kernel's BPF statistics, of \
         this build's agent and of {label}'s, both attached at once under the overhead load, so \
         that both programs see the same events at the same moment. The program attached \
         second runs on caches the first one warmed (20 to 30 ns cheaper here), so each pair \
         runs in both orders and is averaged.\n"
    );
    let _ = writeln!(
        report,
        "| run | attached first | this build | {label} | this - other |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|");
    for (i, r) in runs.iter().enumerate() {
        let _ = writeln!(
            report,
            "| {} | {} | {:.1} | {:.1} | {:+.1} |",
            i + 1,
            if r.this_first { "this" } else { label },
            r.this_ns,
            r.other_ns,
            r.this_ns - r.other_ns
        );
    }
    let pairs: Vec<f64> = runs
        .chunks_exact(2)
        .map(|p| (p[0].this_ns - p[0].other_ns + p[1].this_ns - p[1].other_ns) / 2.0)
        .collect();
    let mean = |f: fn(&AbRun) -> f64| runs.iter().map(f).sum::<f64>() / runs.len().max(1) as f64;
    let (this_mean, other_mean) = (mean(|r| r.this_ns), mean(|r| r.other_ns));
    let _ = writeln!(
        report,
        "| mean | both orders | {this_mean:.1} | {other_mean:.1} | {:+.1} (ratio {:.3}) |",
        this_mean - other_mean,
        if other_mean > 0.0 {
            this_mean / other_mean
        } else {
            0.0
        }
    );
    let listed: Vec<String> = pairs.iter().map(|d| format!("{d:+.1}")).collect();
    let _ = writeln!(
        report,
        "
Difference per pair (both orders averaged), ns per run: {}.",
        listed.join(", ")
    );
    report
}

/// Baseline and agent runs side by side: the medians of their rates and p99 latencies, and
/// the failed requests of all of them.
struct Medians {
    b_rate: f64,
    a_rate: f64,
    b_p99: f64,
    a_p99: f64,
    failures: u64,
}

impl Medians {
    fn of(baseline: &[Run], with_agent: &[Run]) -> Self {
        Self {
            b_rate: median(baseline.iter().map(|r| r.per_second).collect()),
            a_rate: median(with_agent.iter().map(|r| r.per_second).collect()),
            b_p99: median(baseline.iter().map(|r| r.p99_us).collect()),
            a_p99: median(with_agent.iter().map(|r| r.p99_us).collect()),
            failures: baseline.iter().chain(with_agent).map(|r| r.failures).sum(),
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let args = Args::parse();
    if let Some(other) = &args.against
        && !other.is_file()
    {
        eprintln!(
            "--against {}: no such file; give the path of another build's draingate binary",
            other.display()
        );
        std::process::exit(2);
    }
    require_root();
    let mut report = String::new();
    let command = format!(
        "sudo cargo xtask bench (draingate-bench --rate {} --seconds {} --rounds {} --pods {})",
        args.rate, args.seconds, args.rounds, args.pods
    );
    let _ = writeln!(report, "## Node agent overhead\n\nReproduce: `{command}`\n");
    let _ = writeln!(
        report,
        "Machine: {} CPUs, kernel {}. Client, server and agent share the machine.\n",
        std::thread::available_parallelism().map_or(0, usize::from),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );

    // Throughput and latency, side by side.
    let link = Link::new("bench", Family::V4);
    let target = SocketAddr::new(link.b_addr, 8080);
    let listen = target.to_string();
    let _server = ChildGuard::spawn_in(
        &link.b,
        build_bin("draingate-test-server")
            .to_str()
            .expect("UTF-8 path"),
        &["--listen", &listen, "--mode", "graceful"],
    );
    // The client closes each connection first and keeps it in TIME_WAIT: without port reuse, a
    // later run would find fewer free ports than an earlier one and be slower for that alone.
    for setting in [
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65000",
    ] {
        let status = Command::new("ip")
            .args(["netns", "exec", link.a.name(), "sysctl", "-qw", setting])
            .status()
            .expect("run sysctl");
        assert!(
            status.success(),
            "sysctl {setting} in the client namespace failed"
        );
    }
    while link.a.run(|| TcpStream::connect(target)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    // Warm up once, unmeasured.
    let _ = load(&link, target, args.rate, 1);
    if let Some(other) = &args.against {
        let report = against(&args, other, &link, target);
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
        print!("{report}");
        if let Some(out) = &args.out {
            draingate_tests::write_section(out, "Kernel time against another build", &report);
        }
        return;
    }
    if args.only_http {
        let http = tc_section(&args, &link, target, TcPart::Http);
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
        print!("{http}");
        if let Some(out) = &args.out {
            draingate_tests::write_section(out, HTTP_TITLE, &http);
        }
        return;
    }
    let packets = tc_section(&args, &link, target, TcPart::Resets);
    if args.only_packets {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
        print!("{packets}");
        if let Some(out) = &args.out {
            draingate_tests::write_section(out, "Resets from packets (TC)", &packets);
        }
        return;
    }
    let http = tc_section(&args, &link, target, TcPart::Http);
    let (mut baseline, mut with_agent) = (Vec::new(), Vec::new());
    let mut paired: Vec<Paired> = Vec::new();
    let mut agent_cpu = Vec::new();
    for round in 0..args.rounds {
        // ABBA order: any drift over time (TIME_WAIT build-up, thermal) falls on both sides.
        let baseline_first = round % 2 == 0;
        if baseline_first {
            eprintln!("round {}/{}: baseline", round + 1, args.rounds);
            baseline.push(load(&link, target, args.rate, args.seconds));
        }
        eprintln!("round {}/{}: with agent", round + 1, args.rounds);
        let agent = AgentProcess::start(&format!("load{round}"));
        // The floor: an empty program on each tracepoint, attached after the agent's so that
        // it runs right after it on every event.
        let floor_probe =
            draingate::loader::KernelProbes::attach_floor().expect("attach the empty program");
        let cpu_before = agent.cpu();
        let (run, hooks) = measure(&floor_probe, || {
            load(&link, target, args.rate, args.seconds)
        });
        with_agent.push(run);
        agent_cpu.push(agent.cpu().saturating_sub(cpu_before).as_secs_f64() / args.seconds as f64);
        drop(floor_probe);
        paired.extend(
            hooks
                .into_iter()
                .filter(|(hook, _)| *hook == "inet_sock_set_state")
                .map(|(_, p)| p),
        );
        drop(agent);
        if !baseline_first {
            eprintln!("round {}/{}: baseline", round + 1, args.rounds);
            baseline.push(load(&link, target, args.rate, args.seconds));
        }
    }
    // The rare paths, beside the same connection load, with a floor on every tracepoint.
    eprintln!("rare paths: with agent");
    let agent = AgentProcess::start("rare");
    let floor_probe =
        draingate::loader::KernelProbes::attach_floor().expect("attach the empty program");
    let ((rare_run, rare_counts), rare) = measure(&floor_probe, || {
        std::thread::scope(|scope| {
            let side = scope.spawn(|| rare_load(&link, target, args.seconds));
            let run = load(&link, target, args.rate, args.seconds);
            (run, side.join().expect("rare paths"))
        })
    });
    drop(floor_probe);
    drop(agent);
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");

    let Medians {
        b_rate,
        a_rate,
        b_p99,
        a_p99,
        failures,
    } = Medians::of(&baseline, &with_agent);
    let _ = writeln!(
        report,
        "### New connections through a pod (target {} /s, {} rounds of {} s, medians)\n",
        args.rate, args.rounds, args.seconds
    );
    let _ = writeln!(
        report,
        "| | baseline | with agent | ratio (agent / baseline) | target |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|");
    let _ = writeln!(
        report,
        "| connections/s | {b_rate:.0} | {a_rate:.0} | {:.3} | >= 0.98 |",
        a_rate / b_rate
    );
    let _ = writeln!(
        report,
        "| p99 latency (connect + request + close) | {b_p99:.0} us | {a_p99:.0} us | {:.3} (latency: lower is better; throughput-equivalent {:.3}) | >= 0.98 |",
        a_p99 / b_p99,
        b_p99 / a_p99
    );
    let _ = writeln!(
        report,
        "\nAgent process CPU during the load (user + system, median): {:.1}% of one core. \
         Failed requests in all runs: {failures}.\n",
        100.0 * median(agent_cpu)
    );
    let _ = writeln!(
        report,
        "### Kernel time per program run (BPF statistics, during the agent runs)\n"
    );
    let floor_ns = median(paired.iter().map(Paired::floor_ns).collect());
    let own_ns = median(paired.iter().map(Paired::own_ns).collect());
    let ratio = median(paired.iter().map(Paired::ratio).collect());
    let _ = writeln!(
        report,
        "In each agent round an empty program (the floor) is attached to \
         `sock:inet_sock_set_state` after the agent's, so it runs right after it on the same \
         events: its time per run is what the kernel charges any program there before it does \
         anything (the call into BPF and the statistics' own clock reads), under the same load \
         at the same moment. \"Own work\" is the agent's average minus the floor's (the rounds' \
         medians). The with-agent column above carries the floor's cost too.\n"
    );
    let set_state = Paired {
        program: total(paired.iter().map(|p| p.program)),
        floor: (Duration::ZERO, 0),
    };
    let _ = writeln!(
        report,
        "| program | runs | average ns per run | floor ns per run | own work (minus floor) | ratio to floor | target |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|---|---|");
    let _ = writeln!(
        report,
        "| inet_sock_set_state | {} | {:.0} | {floor_ns:.0} | {own_ns:.0} | {ratio:.2} | <= 150 |",
        set_state.program.1,
        set_state.program_ns(),
    );
    let _ = writeln!(
        report,
        "\nThe other programs run on rare events, which this load has none of. A last round with \
         the agent adds them to the same connection load, per second: {REFUSALS_PER_S} connects \
         refused by the server pod (a reset sent without a socket, a reset received in \
         SYN_SENT, a failed connect), {ABORTS_PER_S} connections the client resets (SO_LINGER \
         0: a reset sent on a connection, received at the other end), {SPAWNS_PER_S} short \
         processes (their exits, and each one's SIGCHLD) and {SIGTERMS_PER_S} processes \
         stopped with SIGTERM; an empty program on each tracepoint is its floor. The last row \
         takes every run of every program together: the kernel time per program run over \
         all of them. Done in {} s: \
         {} refused, {} reset, {} processes, {} SIGTERMs; {:.0} connections/s beside them, {} \
         failed.\n",
        args.seconds,
        rare_counts.refused,
        rare_counts.aborted,
        rare_counts.spawned,
        rare_counts.terminated,
        rare_run.per_second,
        rare_run.failures,
    );
    let _ = writeln!(
        report,
        "| program (rare-paths round) | runs | average ns per run | floor ns per run | own work (minus floor) | ratio to floor | target |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|---|---|");
    for (name, p) in &rare {
        let _ = writeln!(report, "{}", program_row(name, p));
    }
    // The measure, taken literally: kernel time over program runs, all programs.
    let all = Paired {
        program: total(rare.iter().map(|(_, p)| p.program)),
        floor: total(rare.iter().map(|(_, p)| p.floor)),
    };
    let _ = writeln!(
        report,
        "{}",
        program_row("all of them (every run of every program)", &all)
    );
    let _ = writeln!(
        report,
        "\n`inet_sock_set_state` beside the floor, round by round:\n"
    );
    let _ = writeln!(
        report,
        "| round | program ns per run | floor ns per run | own work | ratio to floor |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|");
    for (round, p) in paired.iter().enumerate() {
        let _ = writeln!(
            report,
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} |",
            round + 1,
            p.program_ns(),
            p.floor_ns(),
            p.own_ns(),
            p.ratio()
        );
    }
    let _ = writeln!(
        report,
        "| median | | {floor_ns:.0} | {own_ns:.0} | {ratio:.2} |"
    );

    // Memory with many pods.
    eprintln!("memory: creating {} pods", args.pods);
    let pods: Vec<Netns> = (0..args.pods)
        .map(|i| {
            let ns = Netns::new("mem");
            ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
            let addr = format!("198.19.{}.{}/32", i / 250, i % 250 + 1);
            ns.ip(&["addr", "add", &addr, "dev", "d0"]);
            ns.ip(&["link", "set", "d0", "up"]);
            ns
        })
        .collect();
    let agent = AgentProcess::start("mem");
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.pods() < args.pods && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let seen = agent.pods();
    // Let it resync a few times with every pod known.
    std::thread::sleep(Duration::from_secs(5));
    let (rss, hwm) = agent.memory_kib();
    drop(agent);
    drop(pods);
    let _ = writeln!(report, "\n### Agent memory with {} pods\n", args.pods);
    let _ = writeln!(
        report,
        "| pods seen | resident (VmRSS) | peak (VmHWM) | target |"
    );
    let _ = writeln!(report, "|---|---|---|---|");
    let _ = writeln!(
        report,
        "| {seen} | {:.1} MiB | {:.1} MiB | <= 40 MiB |",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );

    print!("{report}{packets}{http}");
    if let Some(out) = args.out {
        draingate_tests::write_section(&out, "Node agent overhead", &report);
        draingate_tests::write_section(&out, "Resets from packets (TC)", &packets);
        draingate_tests::write_section(&out, HTTP_TITLE, &http);
    }
}

/// Ids of the loaded programs named `name`.
fn program_ids(name: &str) -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(name))
        .map(|p| p.id())
        .collect()
}

/// Run time and runs from `before` to `after`.
fn since(before: (Duration, u64), after: (Duration, u64)) -> (Duration, u64) {
    (
        after.0.saturating_sub(before.0),
        after.1.saturating_sub(before.1),
    )
}

/// The title of the HTTP part's section.
const HTTP_TITLE: &str = "HTTP responses at TC (keep-alive)";

/// Which use of the TC program `pod_egress` a [`tc_section`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcPart {
    /// The packet source of resets (kernels before 6.10), under new connections.
    Resets,
    /// The status of each HTTP response, under requests on keep-alive connections.
    Http,
}

/// The TC program `pod_egress` on this kernel: an agent against the baseline in alternating
/// rounds, and the program's kernel time per packet beside an empty TC program's (`tc_floor`,
/// attached after it on the same interfaces, egress of both namespaces of the load). `Resets`:
/// the agent with `--reset-source packets` (what kernels before 6.10 run) under new
/// connections; `Http`: the default agent under requests on keep-alive connections, each
/// response a segment whose status line the program reads.
fn tc_section(args: &Args, link: &Link, target: SocketAddr, part: TcPart) -> String {
    let (label, rate) = match part {
        TcPart::Resets => ("packets", args.rate),
        TcPart::Http => ("http", args.http_rate),
    };
    let run = |rate| match part {
        TcPart::Resets => load(link, target, rate, args.seconds),
        TcPart::Http => load_keep_alive(link, target, rate, args.seconds),
    };
    let (mut baseline, mut with_agent) = (Vec::new(), Vec::new());
    let (mut paired, mut paired_in) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let baseline_first = round % 2 == 0;
        if baseline_first {
            eprintln!("{label} round {}/{}: baseline", round + 1, args.rounds);
            baseline.push(run(rate));
        }
        eprintln!("{label} round {}/{}: with agent", round + 1, args.rounds);
        let tag = format!("{label}{round}");
        let agent = match part {
            TcPart::Resets => AgentProcess::start_packets(&tag),
            TcPart::Http => AgentProcess::start(&tag),
        };
        // The agent attaches its program at its first resync after it saw the namespaces.
        let deadline = Instant::now() + Duration::from_secs(20);
        while program_ids("pod_egress").is_empty() || agent.pods() < 2 {
            assert!(
                Instant::now() < deadline,
                "the agent never loaded pod_egress"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(2));
        let floors: Vec<_> = [&link.a, &link.b]
            .iter()
            .map(|ns| {
                draingate::loader::KernelProbes::attach_tc_floor(&ns.path())
                    .expect("attach the empty TC program")
            })
            .collect();
        let floor_ids: Vec<u32> = floors
            .iter()
            .map(draingate::loader::TcFloor::program_id)
            .collect();
        let ids = program_ids("pod_egress");
        let ids_in = program_ids("pod_ingress");
        let (program_before, floor_before) = (stats_of(&ids), stats_of(&floor_ids));
        let ingress_before = stats_of(&ids_in);
        with_agent.push(run(rate));
        let floor = since(floor_before, stats_of(&floor_ids));
        paired.push(Paired {
            program: since(program_before, stats_of(&ids)),
            floor,
        });
        // The empty program runs on egress only; an empty program costs the same either way.
        paired_in.push(Paired {
            program: since(ingress_before, stats_of(&ids_in)),
            floor,
        });
        drop(floors);
        drop(agent);
        if !baseline_first {
            eprintln!("{label} round {}/{}: baseline", round + 1, args.rounds);
            baseline.push(run(rate));
        }
    }
    let mut report = String::new();
    let (what, unit, agent_label, p99_target) = match part {
        TcPart::Resets => {
            let _ = writeln!(
                report,
                "## Resets from packets (TC)\n\nReproduce: `sudo cargo xtask bench --only overhead -- \
                 --only-packets` (part of `cargo xtask bench`). Kernels before 6.10 count the resets \
                 pods send from the packets: the TC program `pod_egress` on each pod interface sees \
                 every packet a pod sends. Here `draingate agent --reset-source packets` puts it on \
                 this kernel, on egress of both namespaces of the load (client and server pod), in \
                 {} alternating rounds of {} s against no agent at all; an empty TC program \
                 (`tc_floor`) runs right after it on the same packets as its floor.\n",
                args.rounds, args.seconds
            );
            (
                "new connections/s",
                "connections/s",
                "agent, resets from packets",
                "0.98",
            )
        }
        TcPart::Http => {
            let _ = writeln!(
                report,
                "## {HTTP_TITLE}\n\nReproduce: `sudo cargo xtask bench --only overhead -- \
                 --only-http` (part of `cargo xtask bench`). On every kernel the TC program \
                 `pod_egress` reads the status line that starts each segment a pod sends, and \
                 `pod_ingress` the request line that starts each segment sent to it (a hash \
                 table update per request). Here the default agent (resets from the tracepoint) \
                 puts them on both namespaces of the load, whose {WORKERS} clients each send requests on one keep-alive \
                 connection, in {} alternating rounds of {} s against no agent at all; an empty TC \
                 program (`tc_floor`) runs right after it on the same packets as its floor.\n",
                args.rounds, args.seconds
            );
            (
                "requests/s (keep-alive)",
                "requests/s",
                "agent, HTTP from packets",
                "0.95",
            )
        }
    };
    let Medians {
        b_rate,
        a_rate,
        b_p99,
        a_p99,
        failures,
    } = Medians::of(&baseline, &with_agent);
    let _ = writeln!(
        report,
        "| target {rate} {what} | baseline | {agent_label} | ratio | target |\n|---|---|---|---|---|"
    );
    let _ = writeln!(
        report,
        "| {unit} | {b_rate:.0} | {a_rate:.0} | {:.3} | >= 0.98 |",
        a_rate / b_rate
    );
    let _ = writeln!(
        report,
        "| p99 latency | {b_p99:.0} us | {a_p99:.0} us | {:.3} (throughput-equivalent {:.3}) | >= {p99_target} |",
        a_p99 / b_p99,
        b_p99 / a_p99
    );
    let _ = writeln!(report, "\nFailed requests in all runs: {failures}.\n");
    let _ = writeln!(
        report,
        "| program | packets | average ns per packet | floor ns per packet | own work (minus floor) | ratio to floor |\n|---|---|---|---|---|---|"
    );
    let all = Paired {
        program: total(paired.iter().map(|p| p.program)),
        floor: total(paired.iter().map(|p| p.floor)),
    };
    let all_in = Paired {
        program: total(paired_in.iter().map(|p| p.program)),
        floor: total(paired_in.iter().map(|p| p.floor)),
    };
    for (name, all) in [("pod_egress", all), ("pod_ingress", all_in)] {
        let _ = writeln!(
            report,
            "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.2} |",
            all.program.1,
            all.program_ns(),
            all.floor_ns(),
            all.own_ns(),
            all.ratio()
        );
    }
    let _ = writeln!(
        report,
        "
`pod_ingress` (the requests clients send, opposite `pod_egress`) is beside the same \
         floor: the empty program runs on egress only, and costs the same on ingress."
    );
    report
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::{AbRun, Args, ab_report};

    #[test]
    fn the_comparison_averages_both_attach_orders() {
        let args = Args::parse_from(["draingate-bench", "--against", "/x", "--rounds", "2"]);
        let run = |this_first, this_ns, other_ns| AbRun {
            this_first,
            this_ns,
            other_ns,
        };
        // The first-attached program pays 20 ns more; this build costs 5 ns more per run.
        let runs = [
            run(true, 145.0, 120.0),
            run(false, 125.0, 140.0),
            run(true, 147.0, 122.0),
            run(false, 127.0, 142.0),
        ];
        let report = ab_report(&args, "base", &runs);
        assert!(
            report.contains("| mean | both orders | 136.0 | 131.0 | +5.0 (ratio 1.038) |"),
            "{report}"
        );
        assert!(report.contains("ns per run: +5.0, +5.0."), "{report}");
        assert!(
            report.contains("| 2 | base | 125.0 | 140.0 | -15.0 |"),
            "{report}"
        );
    }
}
