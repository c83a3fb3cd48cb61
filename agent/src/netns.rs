//! Work done inside another network namespace: netlink and interface names are per namespace,
//! and entering one is per thread, so the work runs on a thread of its own that enters it; the
//! agent's other threads stay in the host namespace.

use std::{fs::File, io};

/// Runs `f` on a scoped thread that entered the network namespace `netns` (an open
/// `/run/netns/<name>` or `/proc/<pid>/ns/net`), and returns what it returned. An error when
/// the thread cannot enter the namespace (then `f` does not run) or panics.
pub fn run_in<R: Send>(netns: &File, f: impl FnOnce() -> R + Send) -> io::Result<R> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the thread in the namespace panicked")))
    })
}
