//! What the bench reads from /proc: machine CPU time (/proc/stat), a process
//! tree's CPU time (/proc/PID/stat) and resident memory (/proc/PID/status),
//! load average and machine facts. The parsers are pure and tested; the
//! readers only open files. Never writes to /proc.

use std::collections::HashMap;

use anyhow::{Context, anyhow};
use serde::Serialize;

/// The aggregate `cpu` line of /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineCpu {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl MachineCpu {
    /// Every tick not spent idle (guest time is already inside user).
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq + self.steal
    }

    /// Busy ticks that processes are charged for (user and system time), plus
    /// steal (another guest on the host): what "foreign load" is computed from.
    /// Interrupt time is left out because our own traffic causes most of it.
    pub fn process_busy(&self) -> u64 {
        self.user + self.nice + self.system + self.steal
    }

    /// Interrupt and soft-interrupt ticks (loopback networking lands here).
    pub fn interrupts(&self) -> u64 {
        self.irq + self.softirq
    }

    /// Element-wise difference (saturating, so a counter reset reads as zero).
    pub fn since(&self, earlier: &MachineCpu) -> MachineCpu {
        MachineCpu {
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }
}

/// Parses the first (`cpu `) line of /proc/stat.
pub fn parse_proc_stat(text: &str) -> anyhow::Result<MachineCpu> {
    let line = text.lines().find(|l| l.starts_with("cpu ")).ok_or_else(|| anyhow!("/proc/stat has no `cpu` line"))?;
    let fields: Vec<u64> =
        line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>().context("/proc/stat `cpu` line")?;
    if fields.len() < 4 {
        return Err(anyhow!("/proc/stat `cpu` line has {} fields, expected at least 4", fields.len()));
    }
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    Ok(MachineCpu {
        user: at(0),
        nice: at(1),
        system: at(2),
        idle: at(3),
        iowait: at(4),
        irq: at(5),
        softirq: at(6),
        steal: at(7),
    })
}

/// The fields of /proc/PID/stat the bench uses, CPU times in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessCpu {
    pub ppid: u32,
    pub utime: u64,
    pub stime: u64,
    /// CPU time of children that exited and were reaped (fork-per-connection relays).
    pub cutime: u64,
    pub cstime: u64,
}

impl ProcessCpu {
    /// Own and reaped children's CPU time.
    pub fn total(&self) -> u64 {
        self.utime + self.stime + self.cutime + self.cstime
    }
}

/// Parses /proc/PID/stat. The command name (field 2) may contain spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_pid_stat(text: &str) -> anyhow::Result<ProcessCpu> {
    let close = text.rfind(')').ok_or_else(|| anyhow!("/proc/PID/stat without `)`"))?;
    // After ")": state(3) ppid(4) pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt
    // utime(14) stime(15) cutime(16) cstime(17).
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        let s = rest.get(n - 3).ok_or_else(|| anyhow!("/proc/PID/stat has no field {n}"))?;
        s.parse::<i64>().map(|v| v.max(0) as u64).with_context(|| format!("/proc/PID/stat field {n} = {s:?}"))
    };
    Ok(ProcessCpu {
        ppid: field(4)? as u32,
        utime: field(14)?,
        stime: field(15)?,
        cutime: field(16)?,
        cstime: field(17)?,
    })
}

/// `VmRSS` of /proc/PID/status, in KiB.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `Pss` (proportional set size) of /proc/PID/smaps_rollup, in KiB.
pub fn parse_pss_kib(smaps_rollup: &str) -> Option<u64> {
    smaps_rollup.lines().find_map(|l| l.strip_prefix("Pss:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The three load averages of /proc/loadavg.
pub fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    Some([it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?])
}

/// `MemTotal` of /proc/meminfo, in KiB.
pub fn parse_mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The first `model name` of /proc/cpuinfo.
pub fn parse_cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

/// Every descendant of `root` in a pid → parent map (not including `root`).
pub fn descendants(parents: &HashMap<u32, u32>, root: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&child, &parent) in parents {
            if parent == p && child != root && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out.sort_unstable();
    out
}

// ---- readers -------------------------------------------------------------------------------

/// Clock ticks per second (`USER_HZ`), the unit of /proc CPU times.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a constant of the C library.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as u64 } else { 100 }
}

/// The machine's CPU counters now.
pub fn machine_cpu() -> anyhow::Result<MachineCpu> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").context("read /proc/stat")?)
}

/// CPU counters of one process, `None` once it is gone.
pub fn process_cpu(pid: u32) -> Option<ProcessCpu> {
    parse_pid_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?).ok()
}

/// Resident memory of one process in KiB, `None` once it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    parse_vm_rss_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Every live process's parent.
pub fn parent_map() -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return map };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if let Some(cpu) = process_cpu(pid) {
            map.insert(pid, cpu.ppid);
        }
    }
    map
}

/// The roots and all their live descendants.
pub fn process_trees(roots: &[u32]) -> Vec<u32> {
    let parents = parent_map();
    let mut all: Vec<u32> = roots.to_vec();
    for &root in roots {
        all.extend(descendants(&parents, root));
    }
    all.sort_unstable();
    all.dedup();
    all
}

/// CPU ticks used so far by `roots` and their descendants (live ones, and
/// reaped ones through their parents' cutime/cstime).
pub fn tree_cpu_ticks(roots: &[u32]) -> u64 {
    process_trees(roots).into_iter().filter_map(process_cpu).map(|c| c.total()).sum()
}

/// Memory of `roots` and their descendants, KiB: VmRSS for a single process;
/// for several (fork-per-connection relays) the sum of their PSS, so pages the
/// forks share are not counted once per process. The flag says which.
pub fn tree_memory_kib(roots: &[u32]) -> (u64, bool) {
    let pids = process_trees(roots);
    if pids.len() <= 1 {
        return (pids.into_iter().filter_map(rss_kib).sum(), false);
    }
    let pss = |pid: u32| parse_pss_kib(&std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?);
    (pids.into_iter().filter_map(pss).sum(), true)
}

/// The facts about this machine a reader needs to judge the numbers.
#[derive(Debug, Clone, Serialize)]
pub struct MachineFacts {
    pub kernel: String,
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub clock_ticks_per_s: u64,
}

pub fn machine_facts() -> MachineFacts {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    MachineFacts {
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        cpu_model: parse_cpu_model(&read("/proc/cpuinfo")).unwrap_or_else(|| "unknown".into()),
        cores: super::process::online_cpus(),
        memory_gib: parse_mem_total_kib(&read("/proc/meminfo")).unwrap_or(0) as f64 / (1024.0 * 1024.0),
        clock_ticks_per_s: clock_ticks(),
    }
}

/// The load averages now.
pub fn loadavg() -> [f64; 3] {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").unwrap_or_default()).unwrap_or([0.0; 3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_cpu_line() {
        let text = "cpu  100 2 30 4000 5 6 7 8 0 0\ncpu0 50 1 15 2000 2 3 3 4 0 0\nintr 1 2\n";
        let cpu = parse_proc_stat(text).expect("parses");
        assert_eq!(cpu.busy(), 100 + 2 + 30 + 6 + 7 + 8);
        assert_eq!(cpu.process_busy(), 100 + 2 + 30 + 8);
        assert_eq!(cpu.interrupts(), 13);
        let later = MachineCpu { user: 150, ..cpu };
        assert_eq!(later.since(&cpu).busy(), 50);
        assert!(parse_proc_stat("intr 1\n").is_err());
    }

    #[test]
    fn pid_stat_with_a_hostile_command_name() {
        let text = "4242 (we ird) (name) S 1 4242 4242 0 -1 4194560 100 0 0 0 25 7 3 1 20 0 4 0 12345 0 0";
        let cpu = parse_pid_stat(text).expect("parses");
        assert_eq!(cpu, ProcessCpu { ppid: 1, utime: 25, stime: 7, cutime: 3, cstime: 1 });
        assert_eq!(cpu.total(), 36);
        assert!(parse_pid_stat("1 (x) S 0").is_err());
    }

    #[test]
    fn status_rss_loadavg_meminfo_cpuinfo() {
        assert_eq!(parse_vm_rss_kib("Name:\tkonduit\nVmRSS:\t    8192 kB\nThreads: 3\n"), Some(8192));
        assert_eq!(parse_vm_rss_kib("Name: zombie\n"), None);
        assert_eq!(parse_pss_kib("Rss:   900 kB\nPss:   300 kB\nPss_Anon: 100 kB\n"), Some(300));
        assert_eq!(parse_loadavg("0.52 0.31 0.20 1/123 4567\n"), Some([0.52, 0.31, 0.20]));
        assert_eq!(parse_mem_total_kib("MemTotal:       24684000 kB\nMemFree: 1 kB\n"), Some(24_684_000));
        assert_eq!(parse_cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n").as_deref(), Some("AMD EPYC 7B13"));
    }

    #[test]
    fn descendants_follow_the_whole_tree() {
        let parents: HashMap<u32, u32> = [(10, 1), (11, 10), (12, 11), (13, 10), (20, 1)].into_iter().collect();
        assert_eq!(descendants(&parents, 10), vec![11, 12, 13]);
        assert!(descendants(&parents, 20).is_empty());
    }
}
