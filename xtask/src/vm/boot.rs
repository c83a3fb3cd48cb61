//! One kernel's run: virtme-run boots it under QEMU, the guest runs the command through
//! guest.sh and writes its results to the shared directory, which this reads back.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use super::{
    Accel, CPUS, GuestCommand, KVM_FAILURE, KernelImage, KernelResult, MEMORY, Options, Outcome,
    SHUTDOWN_GRACE, TAIL_LINES, sbin_path,
};
use crate::command::workspace_root;

/// Boots `image` with virtme-run, runs `guest` through guest.sh and reads what it wrote back.
pub(super) fn boot(
    virtme_run: &Path,
    image: &KernelImage,
    guest: &GuestCommand,
    accel: Accel,
    options: &Options,
) -> anyhow::Result<KernelResult> {
    let workspace = workspace_root();
    let out_dir = workspace.join("target/vm-test").join(&image.release);
    if out_dir.exists() {
        fs::remove_dir_all(&out_dir).with_context(|| format!("removing {}", out_dir.display()))?;
    }
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out_dir = out_dir.canonicalize()?;
    let command_sh = format!(
        "# Written by cargo xtask vm-test (xtask/src/vm.rs); run by xtask/vm/guest.sh.\n\
         export DRAINGATE_VM_OUT={out}\n\
         export DRAINGATE_VM_KERNEL={release}\n\
         export DRAINGATE_VM_KERNEL_DIR={dir}\n\
         cd {workspace} || exit 125\n{script}",
        out = shell_quote(&out_dir.to_string_lossy()),
        release = shell_quote(&image.release),
        dir = shell_quote(&image.dir.to_string_lossy()),
        workspace = shell_quote(&workspace.to_string_lossy()),
        script = guest.script(&workspace),
    );
    fs::write(out_dir.join("command.sh"), command_sh)?;
    let guest_sh = workspace.join("xtask/vm/guest.sh");
    let console = out_dir.join("console.log");
    let console_file =
        fs::File::create(&console).with_context(|| format!("creating {}", console.display()))?;

    let mut cmd = Command::new(virtme_run);
    cmd.arg("--kimg")
        .arg(image.vmlinuz())
        .args([
            "--mods",
            "auto",
            "--memory",
            MEMORY,
            "--cpus",
            CPUS,
            // Debian's -amd64 kernels have 9p (as modules, loaded from virtme's initramfs).
            "--force-9p",
        ])
        .arg(format!("--rwdir={}", out_dir.display()))
        .arg("--script-sh")
        .arg(format!(
            "bash {} {} {}",
            shell_quote(&guest_sh.to_string_lossy()),
            shell_quote(&out_dir.to_string_lossy()),
            shell_quote(&image.dir.to_string_lossy())
        ));
    if accel == Accel::Tcg {
        cmd.arg("--disable-kvm");
    }
    if options.verbose {
        cmd.args(["--verbose", "--show-boot-console"]);
    }
    let virtme_bin = virtme_run.parent().context("virtme-run has no directory")?;
    cmd.env("PATH", format!("{}:{}", virtme_bin.display(), sbin_path()))
        .current_dir(&workspace)
        .stdin(Stdio::null())
        .stdout(console_file.try_clone()?)
        .stderr(console_file)
        // Its own process group, so a timeout kills QEMU too, not only virtme-run.
        .process_group(0);

    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", virtme_run.display()))?;
    let mut follower = options.follow.then(|| LogFollower {
        path: out_dir.join("guest.log"),
        prefix: format!("  {} | ", image.release),
        offset: 0,
        partial: Vec::new(),
    });
    let booted_file = out_dir.join("booted");
    let exit_file = out_dir.join("exit-code");
    let mut boot = None;
    let mut finished_at = None;
    let mut timed_out = false;
    loop {
        if boot.is_none() && booted_file.exists() {
            boot = Some(started.elapsed());
            println!(
                "vm-test: {} booted in {:.0}s",
                image.release,
                started.elapsed().as_secs_f64()
            );
        }
        if let Some(follower) = &mut follower {
            follower.poll();
        }
        if child.try_wait()?.is_some() {
            break;
        }
        if finished_at.is_none() && exit_file.exists() {
            finished_at = Some(Instant::now());
        }
        if finished_at.is_some_and(|at| at.elapsed() > SHUTDOWN_GRACE) {
            println!(
                "vm-test: {}: the guest finished but QEMU did not stop within {}s; killing it",
                image.release,
                SHUTDOWN_GRACE.as_secs()
            );
            kill_group(&mut child);
            break;
        }
        // QEMU stays up after a KVM emulation failure: give up at once instead of at the timeout.
        if accel == Accel::Kvm
            && boot.is_none()
            && fs::read_to_string(&console).is_ok_and(|text| text.contains(KVM_FAILURE))
        {
            kill_group(&mut child);
            break;
        }
        if started.elapsed() > options.timeout {
            timed_out = true;
            kill_group(&mut child);
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    let elapsed = started.elapsed();
    if let Some(follower) = &mut follower {
        follower.finish();
    }
    if boot.is_none() && booted_file.exists() {
        boot = Some(elapsed);
    }

    let exit_code = fs::read_to_string(&exit_file)
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok());
    let booted_release = fs::read_to_string(&booted_file).ok();
    let outcome = match (exit_code, &booted_release) {
        (Some(0), _) => Outcome::Passed,
        (Some(exit_code), _) => Outcome::Failed { exit_code },
        (None, _) if timed_out => Outcome::TimedOut,
        (None, Some(_)) => Outcome::NoResult,
        (None, None) => Outcome::NoBoot,
    };
    // The guest must be the kernel asked for, not the host's or another one.
    let outcome = match booted_release.as_deref().and_then(|b| b.split(' ').next()) {
        Some(booted) if booted != image.release => Outcome::WrongKernel {
            booted: booted.to_owned(),
        },
        _ => outcome,
    };
    let mut log_tail = tail(&out_dir.join("guest.log"))
        .or_else(|| tail(&console))
        .unwrap_or_else(|| {
            "(no guest.log and an empty console.log; rerun with --verbose to see the boot \
             console)\n"
                .to_owned()
        });
    if boot.is_none() && log_tail.contains(KVM_FAILURE) {
        log_tail.push_str(
            "vm-test: this host's KVM cannot run this kernel; unset DRAINGATE_VM_ACCEL to use \
             QEMU's software CPU\n",
        );
    }
    Ok(KernelResult {
        kernel: image.clone(),
        outcome,
        boot,
        elapsed,
        out_dir,
        log_tail,
    })
}

/// Prints the lines the guest appends to its log (the 9p share shows them as it writes).
struct LogFollower {
    path: PathBuf,
    prefix: String,
    offset: u64,
    /// The last line, until its newline arrives.
    partial: Vec<u8>,
}

impl LogFollower {
    fn poll(&mut self) {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let Ok(mut file) = fs::File::open(&self.path) else {
            return;
        };
        let mut new = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_err() || file.read_to_end(&mut new).is_err() {
            return;
        }
        self.offset += new.len() as u64;
        self.partial.extend_from_slice(&new);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            println!(
                "{}{}",
                self.prefix,
                String::from_utf8_lossy(&line[..end]).trim_end()
            );
        }
    }

    fn finish(&mut self) {
        self.poll();
        if !self.partial.is_empty() {
            println!("{}{}", self.prefix, String::from_utf8_lossy(&self.partial));
            self.partial.clear();
        }
    }
}

/// SIGTERM to virtme-run's process group (it and QEMU), SIGKILL if it is still there 5 s later.
fn kill_group(child: &mut Child) {
    let Ok(pid) = i32::try_from(child.id()) else {
        return;
    };
    let group = Pid::from_raw(pid);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            // QEMU may outlive virtme-run: the group goes either way.
            let _ = killpg(group, Signal::SIGKILL);
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let _ = killpg(group, Signal::SIGKILL);
    let _ = child.wait();
}

/// The last lines of a file, or `None` when it is missing or empty.
fn tail(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return None;
    }
    let start = lines.len().saturating_sub(TAIL_LINES);
    Some(lines[start..].join("\n") + "\n")
}

/// `text` as one shell word.
pub(super) fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}
