//! Processes the bench starts (konduit, relay peers): each in its own process
//! group, killed with the bench (parent-death signal) and by its guard's drop,
//! so an error, a panic or Ctrl-C leaves nothing running. Also CPU pinning of
//! whole processes, the fd limit, and free loopback ports. Never signals a
//! process it did not start.

use std::collections::HashSet;
use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// A started process; dropping it kills its whole process group.
pub struct ChildGuard {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl ChildGuard {
    /// Starts `command` in a new process group with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> anyhow::Result<Self> {
        let out = File::options().create(true).append(true).open(log).with_context(|| format!("{}", log.display()))?;
        command.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).process_group(0);
        // Measured as deployed: no backtrace capture on every error (and no backtraces hiding the cause in logs).
        command.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // Dies with the bench even when the bench is killed outright.
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().with_context(|| format!("start {name} ({:?})", command.get_program()))?;
        Ok(ChildGuard { name: name.to_owned(), child, log: log.to_owned() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last meaningful line of its log: why it exited.
    pub fn last_words(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        last_error_line(&text).unwrap_or_else(|| "exited without a message".into())
    }

    /// SIGINT (konduit: exit at once), then SIGKILL after `grace`.
    pub fn stop(mut self, grace: Duration) {
        let group = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(group, Signal::SIGINT);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Drop kills the rest of the group and reaps.
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The most telling line of a log: the last that says "error" (clap and
/// konduit put the cause there), else the last non-empty one; without the
/// leading "Error: … error:" labels.
pub fn last_error_line(log: &str) -> Option<String> {
    // A backtrace (RUST_BACKTRACE) follows the message; it never is the reason.
    let log = log.split("\nStack backtrace:").next().unwrap_or_default();
    let lines: Vec<&str> = log.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let line = lines.iter().rev().find(|l| l.to_ascii_lowercase().contains("error")).or(lines.last())?;
    let mut rest: &str = line;
    while let Some((label, tail)) = rest.split_once(": ") {
        if !label.to_ascii_lowercase().ends_with("error") || tail.trim().is_empty() {
            break;
        }
        rest = tail;
    }
    Some(rest.chars().take(300).collect())
}

/// Pins every thread of each process (`None`: allows every CPU again).
pub fn pin_processes(pids: &[u32], cpu: Option<usize>) -> anyhow::Result<()> {
    use nix::sched::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    match cpu {
        Some(c) => set.set(c)?,
        None => {
            for c in 0..online_cpus() {
                set.set(c)?;
            }
        }
    }
    for &pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for task in tasks.flatten() {
            if let Some(tid) = task.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                // A thread that has just exited is not an error.
                let _ = sched_setaffinity(Pid::from_raw(tid), &set);
            }
        }
    }
    Ok(())
}

/// CPUs online (not the ones this thread may use, which pinning changes).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf only reads a value of the C library.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 { n as usize } else { 1 }
}

/// Raises RLIMIT_NOFILE (soft and hard) for the bench and what it starts, so
/// 10,000 open tunnels fit; returns the new soft limit.
pub fn raise_fd_limit() -> anyhow::Result<u64> {
    let nr_open: u64 =
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20);
    let want = nr_open.min(1 << 20);
    let limit = libc::rlimit { rlim_cur: want, rlim_max: want };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into the struct we pass.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) };
        let raised = libc::rlimit { rlim_cur: current.rlim_max, rlim_max: current.rlim_max };
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
        return Ok(current.rlim_max);
    }
    Ok(want)
}

/// Hands out loopback TCP ports that are free now, never the same one twice,
/// below the ephemeral range (konduit refuses ports above 49151).
#[derive(Default)]
pub struct Ports {
    given: HashSet<u16>,
    next: u16,
}

impl Ports {
    pub fn new() -> Self {
        // Start somewhere different each run, so parallel runs rarely collide.
        let seed = std::process::id() as u16;
        Ports { given: HashSet::new(), next: 20_000 + seed % 8_000 }
    }

    pub fn take(&mut self) -> anyhow::Result<u16> {
        for _ in 0..10_000 {
            let port = self.next;
            self.next = if self.next >= 31_999 { 20_000 } else { self.next + 1 };
            if self.given.contains(&port) {
                continue;
            }
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                self.given.insert(port);
                return Ok(port);
            }
        }
        anyhow::bail!("no free loopback port in 20000..32000")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_line_explains_an_exit() {
        let log = "I1122 starting\nError: local configuration error: error: unexpected argument '--dataplane' found\n\n  \
                   tip: use '-- --dataplane'\n\nUsage: proxy-server [OPTIONS]\n\nStack backtrace:\n  16: {closure#0}<core::result::Result<(), anyhow::Error>>\n";
        assert_eq!(last_error_line(log).as_deref(), Some("unexpected argument '--dataplane' found"));
        assert_eq!(
            last_error_line("Error: sockmap: load program: permission denied").as_deref(),
            Some("sockmap: load program: permission denied")
        );
        assert_eq!(last_error_line("one\ntwo\n\n").as_deref(), Some("two"));
        assert_eq!(last_error_line(""), None);
    }

    #[test]
    fn ports_are_unique_and_in_range() {
        let mut ports = Ports::new();
        let a = ports.take().expect("port");
        let b = ports.take().expect("port");
        assert_ne!(a, b);
        assert!((20_000..32_000).contains(&a));
    }
}
