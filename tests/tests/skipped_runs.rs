//! Program runs the kernel skipped are lost events, never a pass: a tracing program does not
//! run while another BPF program (or a `bpf()` map syscall) holds the CPU's `bpf_prog_active`,
//! and kernels from 6.7 on count such skips per program (`recursion_misses`). The agent reads
//! them; a pod whose window was open when one happened is `unknown`.
//!
//! The skip is made deterministic here: a tracepoint program of this test sends this process
//! a signal with `bpf_send_signal`, so the kernel generates the signal inside a BPF program
//! run, and skips the agent's `signal:signal_generate` program for it. That is what an
//! unlucky interrupt during another tool's program, or during the agent's own map reads, does.
//!
//! Alone in its test binary: every agent on the machine has a program on that tracepoint, and
//! each would count the skips.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use draingate_proto::v1::{Pod, Verdict};
use draingate_tests::{ChildGuard, Family, Link, TestAgent, require_root};
use nix::sys::signal::{SigHandler, Signal};

const SERVER: &str = env!("CARGO_BIN_EXE_draingate-test-server");
const PORT: u16 = 8080;
/// Signals generated inside the test's program: the agent's program runs skipped.
const SKIPS: u64 = 5;

/// One eBPF instruction: opcode, registers, offset, immediate (`struct bpf_insn`).
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64)
        | (((dst | (src << 4)) as u64) << 8)
        | ((off.cast_unsigned() as u64) << 16)
        | ((imm.cast_unsigned() as u64) << 32)
}

/// A tracepoint program on `syscalls:sys_enter_getppid`: when this process calls `getppid`,
/// it sends itself SIGUSR1 (which it ignores) with `bpf_send_signal`. Detached on drop.
struct SignalOnGetppid {
    /// The program, whose fdinfo says whether the kernel counts skipped runs.
    program: OwnedFd,
    _event: OwnedFd,
}

impl SignalOnGetppid {
    fn attach() -> Self {
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
        const GET_CURRENT_PID_TGID: i32 = 14;
        const SEND_SIGNAL: i32 = 109;
        const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
        const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
        const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
        let tgid = i32::try_from(std::process::id()).expect("a pid fits an i32");
        let program = [
            insn(0x85, 0, 0, 0, GET_CURRENT_PID_TGID), // call bpf_get_current_pid_tgid
            insn(0x77, 0, 0, 0, 32),                   // r0 >>= 32 (the tgid)
            insn(0x55, 0, 0, 2, tgid),                 // if r0 != tgid goto +2
            insn(0xb7, 1, 0, 0, libc::SIGUSR1),        // r1 = SIGUSR1
            insn(0x85, 0, 0, 0, SEND_SIGNAL),          // call bpf_send_signal
            insn(0xb7, 0, 0, 0, 0),                    // r0 = 0
            insn(0x95, 0, 0, 0, 0),                    // exit
        ];
        let license = c"GPL";
        let mut log = vec![0u8; 1 << 16];
        // `union bpf_attr` for BPF_PROG_LOAD, the fields up to the log buffer.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_TRACEPOINT.to_ne_bytes());
        attr[4..8].copy_from_slice(&u32::try_from(program.len()).unwrap().to_ne_bytes());
        attr[8..16].copy_from_slice(&(program.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[24..28].copy_from_slice(&1u32.to_ne_bytes());
        attr[28..32].copy_from_slice(&u32::try_from(log.len()).unwrap().to_ne_bytes());
        attr[32..40].copy_from_slice(&(log.as_mut_ptr() as u64).to_ne_bytes());
        // SAFETY: `attr` is a valid `bpf_attr` prefix whose pointers outlive the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                attr.as_ptr(),
                attr.len() as u32,
            )
        };
        assert!(
            fd >= 0,
            "load the test's tracepoint program: {}\n{}",
            std::io::Error::last_os_error(),
            String::from_utf8_lossy(&log).trim_end_matches('\0')
        );
        // SAFETY: a new file descriptor this process owns.
        let program = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) };

        let id: u64 = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .find_map(|root| {
                std::fs::read_to_string(format!("{root}/events/syscalls/sys_enter_getppid/id")).ok()
            })
            .expect("tracepoint syscalls:sys_enter_getppid (CONFIG_FTRACE_SYSCALLS)")
            .trim()
            .parse()
            .expect("a tracepoint id");
        // `struct perf_event_attr` (PERF_ATTR_SIZE_VER5): a tracepoint event, every hit sampled.
        let mut attr = [0u8; 112];
        attr[0..4].copy_from_slice(&2u32.to_ne_bytes()); // PERF_TYPE_TRACEPOINT
        attr[4..8].copy_from_slice(&112u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&id.to_ne_bytes());
        attr[16..24].copy_from_slice(&1u64.to_ne_bytes()); // sample_period
        attr[24..32].copy_from_slice(&(1u64 << 10).to_ne_bytes()); // PERF_SAMPLE_RAW
        attr[48..52].copy_from_slice(&1u32.to_ne_bytes()); // wakeup_events
        // SAFETY: `attr` is a valid `perf_event_attr` of the size it says.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                attr.as_ptr(),
                -1,
                0,
                -1,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        assert!(
            fd >= 0,
            "open the getppid tracepoint: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a new file descriptor this process owns.
        let event = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) };
        for (request, arg) in [
            (PERF_EVENT_IOC_SET_BPF, program.as_raw_fd()),
            (PERF_EVENT_IOC_ENABLE, 0),
        ] {
            // SAFETY: perf event ioctls on the event's descriptor with an integer argument.
            let done = unsafe { libc::ioctl(event.as_raw_fd(), request, arg) };
            assert_eq!(
                done,
                0,
                "ioctl {request:#x}: {}",
                std::io::Error::last_os_error()
            );
        }
        Self {
            program,
            _event: event,
        }
    }

    /// Whether the kernel counts skipped runs of tracepoint programs: from 6.7 on
    /// (`recursion_misses` is in a program's fdinfo from 5.12, but counts only other program
    /// types' skips before 6.7).
    fn kernel_counts_skips(&self) -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u32>().ok());
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        let counted = version >= (6, 7);
        if counted {
            // Where it counts them, the program's fdinfo has the field.
            let info =
                std::fs::read_to_string(format!("/proc/self/fdinfo/{}", self.program.as_raw_fd()))
                    .unwrap_or_default();
            assert!(info.contains("recursion_misses:"), "{release}: {info}");
        }
        counted
    }

    /// Runs the program `n` times (it is attached while `self` lives): each run generates a
    /// signal inside it.
    #[expect(clippy::unused_self, reason = "only while the program is attached")]
    fn fire(&self, n: u64) {
        for _ in 0..n {
            // SAFETY: getppid has no arguments and cannot fail.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
    }
}

fn verdict(pod: &Pod) -> Verdict {
    Verdict::try_from(pod.verdict).unwrap_or(Verdict::Unspecified)
}

/// The agent's `draingate_lost_events_total`.
fn lost_events(agent: &TestAgent) -> u64 {
    let (status, text) = agent.http_get("/metrics");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|line| line.strip_prefix("draingate_lost_events_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no draingate_lost_events_total in\n{text}"))
}

/// A server in its own pod, known to the agent (its address and process).
fn start_pod(agent: &TestAgent, link: &Link) -> ChildGuard {
    agent.wait_for_pod(link.b.name(), |p| !p.addresses.is_empty());
    let listen = std::net::SocketAddr::new(link.b_addr, PORT).to_string();
    let server = ChildGuard::spawn_in(&link.b, SERVER, &["--listen", &listen, "--mode", "ignore"]);
    agent.wait_for_pod(link.b.name(), |p| {
        !p.addresses.is_empty() && !p.pids.is_empty()
    });
    server
}

/// SIGTERM (ignored: the window opens, the server stays), then `between`, then SIGKILL: the
/// pod's final verdict.
fn terminate(agent: &TestAgent, mut server: ChildGuard, name: &str, between: impl FnOnce()) -> Pod {
    server.signal(Signal::SIGTERM);
    agent.wait_for_pod(name, |p| verdict(p) == Verdict::Pending);
    between();
    server.signal(Signal::SIGKILL);
    let _ = server.0.wait();
    agent.wait_for_pod(name, |p| {
        !matches!(verdict(p), Verdict::None | Verdict::Pending)
    })
}

#[test]
fn program_runs_the_kernel_skipped_in_a_pods_window_make_it_unknown_never_pass() {
    require_root();
    // The test's program signals this process; it ignores the signal.
    // SAFETY: no handler runs; SIGUSR1 is used by nothing else in this process.
    unsafe { nix::sys::signal::signal(Signal::SIGUSR1, SigHandler::SigIgn) }
        .expect("ignore SIGUSR1");
    let agent = TestAgent::start();
    let link = Link::new("skip", Family::V4);
    let server = start_pod(&agent, &link);
    let name = link.b.name().to_owned();
    let before = lost_events(&agent);

    let mut counted = true;
    let pod = terminate(&agent, server, &name, || {
        let program = SignalOnGetppid::attach();
        counted = program.kernel_counts_skips();
        program.fire(SKIPS);
        drop(program);
        if counted {
            // The next resync reads the programs' counters.
            let deadline = Instant::now() + Duration::from_secs(10);
            while lost_events(&agent) < before + SKIPS {
                assert!(
                    Instant::now() < deadline,
                    "the agent never counted the skipped runs"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    if !counted {
        // Before 6.7 the kernel does not count them: the agent cannot see them, and says so in
        // docs/verdict.md. What it did see was clean.
        eprintln!(
            "NOTE: this kernel does not count skipped program runs (recursion_misses: 6.7+); \
             checked only that the agent's verdict is what it saw"
        );
        assert_eq!(verdict(&pod), Verdict::Pass, "{pod:#?}");
        return;
    }
    // Exactly the runs skipped: one program of the agent's is on signal:signal_generate.
    assert_eq!(lost_events(&agent), before + SKIPS);
    assert_eq!(verdict(&pod), Verdict::Unknown, "{pod:#?}");
    assert!(
        pod.reason
            .contains(&format!("the kernel skipped {SKIPS} program runs")),
        "{}",
        pod.reason
    );
    assert_eq!(pod.errors, 0, "{pod:#?}");

    // A pod whose window saw no skip is judged on what the agent saw: the earlier skips do
    // not make every later pod unknown.
    let link = Link::new("noskip", Family::V4);
    let server = start_pod(&agent, &link);
    let name = link.b.name().to_owned();
    let pod = terminate(&agent, server, &name, || {});
    assert_eq!(verdict(&pod), Verdict::Pass, "{pod:#?}");
}
