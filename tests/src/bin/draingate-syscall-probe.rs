//! Asks the kernel for syscalls a seccomp profile allows or refuses, with arguments that make
//! each one fail harmlessly once it reaches the kernel: so EPERM means the filter (or a missing
//! capability) refused it, and any other answer means it got through. `tests/tests/image.rs`
//! runs it as the entrypoint of the agent's image, under the agent's security options, once with
//! the agent's seccomp profile and once unconfined.
//!
//! Prints one line per syscall: its name and `0` or the errno it failed with (`EPERM` is 1).
//! Nothing it calls changes anything: every call is refused or fails on its arguments, except
//! `unshare(0)`, which unshares nothing.

use std::ffi::c_long;

use nix::libc;

/// `syscall(number, args)`: 0 or the errno.
fn errno_of(number: c_long, args: [c_long; 5]) -> i32 {
    // SAFETY: every call below passes null or invalid pointers and descriptors that the kernel
    // checks and refuses (EFAULT, EBADF, ENOENT, ...), or flags that change nothing.
    let ret = unsafe { libc::syscall(number, args[0], args[1], args[2], args[3], args[4]) };
    if ret < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    } else {
        0
    }
}

fn main() {
    let missing = c"/nonexistent-draingate-probe".as_ptr() as c_long;
    let probes: [(&str, c_long, [c_long; 5]); 10] = [
        // Allowed by the profile; with CAP_BPF an unknown command is EINVAL.
        ("bpf", libc::SYS_bpf, [9999, 0, 0, 0, 0]),
        // Allowed; a null attribute pointer is EFAULT.
        (
            "perf_event_open",
            libc::SYS_perf_event_open,
            [0, 0, -1, -1, 0],
        ),
        // Refused: unsharing nothing succeeds without any capability when it gets through.
        ("unshare", libc::SYS_unshare, [0, 0, 0, 0, 0]),
        // Refused: a bad descriptor is EBADF before any capability check.
        ("setns", libc::SYS_setns, [-1, 0, 0, 0, 0]),
        // Refused: a missing mount point is ENOENT before the capability check.
        ("mount", libc::SYS_mount, [missing, missing, 0, 0, 0]),
        // Refused: no such process is ESRCH.
        (
            "ptrace",
            libc::SYS_ptrace,
            [c_long::from(libc::PTRACE_ATTACH), 0x7fff_fff0, 0, 0, 0],
        ),
        // Refused: an unknown keyctl command is EOPNOTSUPP.
        ("keyctl", libc::SYS_keyctl, [9999, 0, 0, 0, 0]),
        // Refused; without CAP_SYS_MODULE it is EPERM either way: listed for the record.
        ("finit_module", libc::SYS_finit_module, [-1, 0, 0, 0, 0]),
        // Refused: AF_ALG (38), the kernel crypto API, needs no capability when it gets through.
        (
            "socket_af_alg",
            libc::SYS_socket,
            [
                c_long::from(libc::AF_ALG),
                c_long::from(libc::SOCK_SEQPACKET),
                0,
                0,
                0,
            ],
        ),
        // Allowed: netlink route, as the agent's TC and address lookups use it.
        (
            "socket_netlink_route",
            libc::SYS_socket,
            [
                c_long::from(libc::AF_NETLINK),
                c_long::from(libc::SOCK_RAW),
                0,
                0,
                0,
            ],
        ),
    ];
    for (name, number, args) in probes {
        println!("{name} {}", errno_of(number, args));
    }
}
