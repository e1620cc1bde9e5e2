//! `cargo xtask bench`: the same workloads through direct TCP, every konduit
//! frontend × data plane, and (with `--peers`) other tunnels and relays, on
//! loopback, with ratios to direct from the same run.
//!
//! Owns the run: the plan, the order of measurements (warm-up, then
//! repetitions with the configurations interleaved round-robin), CPU and
//! memory sampling around each workload, and writing `results/<timestamp>/`.
//! It must never leave a process running (every child is guarded, also on
//! Ctrl-C), never send traffic off loopback, and never report a number it did
//! not measure: a configuration that cannot start is reported with its reason.

mod backends;
mod deploy;
mod gateway;
mod pattern;
mod peers;
mod pki;
mod process;
mod procfs;
mod report;
mod stats;
mod svg;
mod workloads;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};

use backends::{Backends, Direction};
use deploy::{Config, Deployment, Env};
use report::{ConfigResult, LoadReport, Metric, Report, Settings, Status};
use stats::{percentile_nearest_rank, summarize};

/// `cargo xtask bench` (run as root).
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// About two minutes: 3 repetitions and shorter runs of every workload.
    #[arg(long)]
    pub quick: bool,
    /// Also measure an OpenSSH reverse tunnel, rathole, haproxy and socat (installs them when missing).
    #[arg(long)]
    pub peers: bool,
    /// Repetitions of every measurement (default: 3 with --quick, else 5).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Only configurations whose id starts with one of these (comma-separated); direct always runs.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// The konduit binary to measure (default: build and use target/release/konduit).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Report directory (default: results/<UTC timestamp>/ in the workspace).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// How long and how often each workload runs.
#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    reps: usize,
    /// Each bulk transfer is sized (in the warm-up) to take about this long.
    bulk_seconds: f64,
    rr_count: usize,
    rr_warmup: usize,
    tunnel_seconds: f64,
    held_levels: Vec<usize>,
}

const RR_BYTES: usize = 64;
const PARALLEL_STREAMS: usize = 8;
const GIB: f64 = (1u64 << 30) as f64;
const MIB: u64 = 1 << 20;

impl Plan {
    fn new(args: &BenchArgs) -> Self {
        if args.quick {
            Plan {
                quick: true,
                reps: args.reps.unwrap_or(3).max(1),
                bulk_seconds: 0.4,
                rr_count: 10_000,
                rr_warmup: 500,
                tunnel_seconds: 0.4,
                // The 10,000-tunnel level takes about half a minute: full runs only.
                held_levels: vec![1_000],
            }
        } else {
            Plan {
                quick: false,
                reps: args.reps.unwrap_or(5).max(1),
                bulk_seconds: 1.5,
                rr_count: 20_000,
                rr_warmup: 2_000,
                tunnel_seconds: 2.0,
                held_levels: vec![1_000, 10_000],
            }
        }
    }

    fn settings(&self) -> Settings {
        Settings {
            mode: if self.quick { "quick" } else { "full" }.into(),
            repetitions: self.reps,
            bulk_seconds: self.bulk_seconds,
            rr_round_trips: self.rr_count,
            rr_warmup: self.rr_warmup,
            rr_message_bytes: RR_BYTES,
            tunnel_seconds: self.tunnel_seconds,
            held_levels: self.held_levels.clone(),
        }
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        // Leaving `bench` early drops every guard: children are killed, the scratch directory removed.
        tokio::select! {
            result = bench(args) => result,
            _ = tokio::signal::ctrl_c() => bail!("interrupted: stopped every process the bench had started"),
            _ = terminate.recv() => bail!("terminated: stopped every process the bench had started"),
        }
    })
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// A scratch directory (PKI, unix sockets, peer configs), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("konduit-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the run says while it works: a progress bar on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Progress {
    fn new() -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(1);
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress { bar, started: Instant::now() }
    }

    fn set_steps(&self, steps: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(steps);
        }
    }

    fn step(&self, message: &str) {
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                bar.set_message(message.to_owned());
            }
            None => eprintln!("[{:>5.1}s] {message}", self.started.elapsed().as_secs_f64()),
        }
    }

    fn say(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => eprintln!("[{:>5.1}s] {message}", self.started.elapsed().as_secs_f64()),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Sizes of one configuration's bulk transfers, set in the warm-up.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    upload: u64,
    download: u64,
    parallel: u64,
}

/// CPU counters at the start of a measurement window.
struct Snapshot {
    at: Instant,
    machine: procfs::MachineCpu,
    me: u64,
    server: u64,
    agent: u64,
}

/// CPU used in one window, seconds (cores for the load figures).
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    machine: f64,
    /// The bench, the tunnel processes and interrupts: the machine less foreign load.
    ours: f64,
    server: f64,
    agent: f64,
    foreign_cores: f64,
    interrupt_cores: f64,
}

fn snapshot(deployment: &Deployment) -> Snapshot {
    Snapshot {
        at: Instant::now(),
        machine: procfs::machine_cpu().unwrap_or_default(),
        me: procfs::process_cpu(std::process::id()).map(|c| c.total()).unwrap_or(0),
        server: procfs::tree_cpu_ticks(&deployment.server_pids()),
        agent: procfs::tree_cpu_ticks(&deployment.agent_pids()),
    }
}

fn usage_since(start: &Snapshot, deployment: &Deployment, hz: f64) -> Usage {
    let end = snapshot(deployment);
    let wall = end.at.duration_since(start.at).as_secs_f64().max(1e-9);
    let machine = end.machine.since(&start.machine);
    let me = end.me.saturating_sub(start.me);
    let server = end.server.saturating_sub(start.server);
    let agent = end.agent.saturating_sub(start.agent);
    let foreign = machine.process_busy().saturating_sub(me + server + agent);
    Usage {
        machine: machine.busy() as f64 / hz,
        ours: (me + server + agent + machine.interrupts()) as f64 / hz,
        server: server as f64 / hz,
        agent: agent as f64 / hz,
        foreign_cores: foreign as f64 / hz / wall,
        interrupt_cores: machine.interrupts() as f64 / hz / wall,
    }
}

/// One measurement of one configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    BulkUpload,
    BulkDownload,
    Parallel,
    RequestResponse,
    RequestResponsePinned,
    TunnelsSequential,
    Tunnels16,
}

impl Step {
    const ALL: [Step; 7] = [
        Step::BulkUpload,
        Step::BulkDownload,
        Step::Parallel,
        Step::RequestResponse,
        Step::RequestResponsePinned,
        Step::TunnelsSequential,
        Step::Tunnels16,
    ];

    fn name(self) -> &'static str {
        match self {
            Step::BulkUpload => "bulk upload",
            Step::BulkDownload => "bulk download",
            Step::Parallel => "8 streams",
            Step::RequestResponse => "64 B req/resp",
            Step::RequestResponsePinned => "64 B req/resp pinned to CPU 0",
            Step::TunnelsSequential => "new tunnels, sequential",
            Step::Tunnels16 => "new tunnels, 16-way",
        }
    }
}

/// What one step measured.
#[derive(Default)]
struct Outcome {
    values: Vec<(Metric, f64)>,
    usage: Usage,
    bytes: u64,
    note: Option<String>,
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

async fn run_step(
    deployment: &Deployment,
    plan: &Plan,
    sizes: Sizes,
    step: Step,
    seed: u64,
    hz: f64,
) -> anyhow::Result<Outcome> {
    let gateway = &deployment.gateway;
    let start = snapshot(deployment);
    let mut outcome = Outcome::default();
    match step {
        Step::BulkUpload | Step::BulkDownload => {
            let (direction, len, metric) = match step {
                Step::BulkUpload => (Direction::Upload, sizes.upload, Metric::BulkUpload),
                _ => (Direction::Download, sizes.download, Metric::BulkDownload),
            };
            let elapsed = workloads::bulk(gateway, direction, len, seed).await?;
            outcome.values.push((metric, mb_per_s(len, elapsed)));
            outcome.bytes = len;
        }
        Step::Parallel => {
            let elapsed = workloads::parallel(gateway, PARALLEL_STREAMS, sizes.parallel, seed).await?;
            outcome.values.push((Metric::Parallel8, mb_per_s(sizes.parallel, elapsed)));
        }
        Step::RequestResponse | Step::RequestResponsePinned => {
            let pinned = step == Step::RequestResponsePinned;
            let pids = if pinned {
                let mut pids = procfs::process_trees(&deployment.all_pids());
                pids.push(std::process::id());
                process::pin_processes(&pids, Some(0))?;
                pids
            } else {
                vec![]
            };
            let result = workloads::request_response(gateway, RR_BYTES, plan.rr_warmup, plan.rr_count).await;
            if pinned {
                process::pin_processes(&pids, None)?;
            }
            let mut samples = result?;
            samples.sort_unstable();
            let us = |p: f64| percentile_nearest_rank(&samples, p).unwrap_or(0) as f64 / 1e3;
            let (p50, p99) =
                if pinned { (Metric::RrPinnedP50, Metric::RrPinnedP99) } else { (Metric::RrP50, Metric::RrP99) };
            outcome.values.extend([(p50, us(50.0)), (p99, us(99.0))]);
        }
        Step::TunnelsSequential | Step::Tunnels16 => {
            let (concurrency, metric) =
                if step == Step::Tunnels16 { (16, Metric::Tunnels16) } else { (1, Metric::TunnelsSequential) };
            let rate =
                workloads::tunnel_rate(gateway, concurrency, Duration::from_secs_f64(plan.tunnel_seconds)).await?;
            let per_second = rate.per_second();
            if rate.completed == 0 {
                bail!("no tunnel completed: {}", rate.first_error.unwrap_or_default());
            }
            if rate.failed > 0 {
                outcome.note = Some(format!(
                    "{}: {} of {} tunnels failed (first: {})",
                    step.name(),
                    rate.failed,
                    rate.failed + rate.completed,
                    rate.first_error.unwrap_or_default()
                ));
            }
            outcome.values.push((metric, per_second));
        }
    }
    outcome.usage = usage_since(&start, deployment, hz);
    Ok(outcome)
}

fn is_integrity_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<workloads::IntegrityError>())
}

/// CPU of the two single-stream bulk transfers of one repetition.
#[derive(Default, Clone, Copy)]
struct CpuTally {
    bytes: u64,
    machine: f64,
    ours: f64,
    server: f64,
    agent: f64,
}

/// The run's state: what is running and what has been measured.
struct Run<'a> {
    env: Env<'a>,
    plan: Plan,
    progress: &'a Progress,
    hz: f64,
    configs: Vec<Config>,
    results: Vec<ConfigResult>,
    deployments: Vec<Option<Deployment>>,
    sizes: Vec<Sizes>,
    foreign: Vec<f64>,
    interrupts: Vec<f64>,
    ports: process::Ports,
    installed: Option<peers::Installed>,
}

impl Run<'_> {
    async fn start(&mut self, config: Config) -> anyhow::Result<Result<Deployment, String>> {
        match config {
            Config::Direct => Ok(Ok(deploy::direct(&self.env))),
            Config::Konduit(frontend, dataplane) => {
                deploy::konduit(&self.env, &mut self.ports, frontend, dataplane).await
            }
            Config::Peer(peer) => match &self.installed {
                Some(installed) => peers::start(&self.env, &mut self.ports, installed, peer).await,
                None => Ok(Err("peers were not requested".into())),
            },
        }
    }

    fn running(&self) -> Vec<usize> {
        (0..self.configs.len()).filter(|&i| self.deployments[i].is_some()).collect()
    }

    fn fail(&mut self, i: usize, why: String) {
        self.progress.say(&format!("{}: {why}", self.configs[i].id()));
        self.results[i].status = Status::Failed(why);
        if let Some(d) = self.deployments[i].take() {
            tokio::task::block_in_place(|| d.stop());
        }
    }

    fn note(&mut self, i: usize, note: String) {
        let notes = &mut self.results[i].notes;
        if notes.len() < 6 && !notes.contains(&note) {
            notes.push(note);
        }
    }

    async fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.configs.len() {
            let config = self.configs[i];
            self.progress.step(&format!("starting {}", config.id()));
            match self.start(config).await? {
                Ok(deployment) => {
                    if let Some(note) = &deployment.note {
                        self.note(i, note.clone());
                    }
                    self.deployments[i] = Some(deployment);
                }
                Err(reason) => {
                    self.progress.say(&format!("{}: not available: {reason}", config.id()));
                    self.results[i].status = Status::NotAvailable(reason);
                }
            }
        }
        Ok(())
    }

    /// Sizes every running configuration's transfers and warms up its paths.
    async fn warm_up(&mut self) -> anyhow::Result<()> {
        for i in self.running() {
            let id = self.configs[i].id();
            self.progress.step(&format!("warm-up {id}"));
            let Some(deployment) = self.deployments[i].as_ref() else { continue };
            let gateway = deployment.gateway.clone();
            let warm = async {
                let probe_len = 32 * MIB;
                let up = workloads::bulk(&gateway, Direction::Upload, probe_len, 1).await?;
                let down = workloads::bulk(&gateway, Direction::Download, probe_len, 2).await?;
                workloads::request_response(&gateway, RR_BYTES, 0, 500).await?;
                workloads::tunnel_rate(&gateway, 16, Duration::from_millis(200)).await?;
                anyhow::Ok((mb_per_s(probe_len, up), mb_per_s(probe_len, down)))
            };
            match warm.await {
                Ok((up, down)) => {
                    let size = |rate: f64| {
                        let bytes = (rate * 1e6 * self.plan.bulk_seconds) as u64;
                        (bytes / MIB).clamp(16, 16 * 1024) * MIB
                    };
                    let parallel =
                        size((up + down) / 2.0).div_ceil(PARALLEL_STREAMS as u64 * MIB) * PARALLEL_STREAMS as u64 * MIB;
                    self.sizes[i] = Sizes { upload: size(up), download: size(down), parallel };
                }
                Err(e) if is_integrity_error(&e) => return Err(e),
                Err(e) => self.fail(i, format!("warm-up failed: {e:#}")),
            }
        }
        Ok(())
    }

    /// Every repetition runs every configuration once, in a rotated order.
    async fn repetitions(&mut self) -> anyhow::Result<()> {
        for rep in 0..self.plan.reps {
            let running = self.running();
            let n = running.len().max(1);
            let order: Vec<usize> = (0..running.len()).map(|k| running[(k + rep) % n]).collect();
            for i in order {
                let mut tally = CpuTally::default();
                for step in Step::ALL {
                    let id = self.configs[i].id();
                    self.progress.step(&format!("rep {}/{} · {id} · {}", rep + 1, self.plan.reps, step.name()));
                    let Some(deployment) = self.deployments[i].as_mut() else { break };
                    if let Err(e) = deployment.check_alive() {
                        self.fail(i, format!("{e:#}"));
                        break;
                    }
                    let seed = ((rep as u64) << 32) ^ ((i as u64) << 16) ^ step as u64;
                    let Some(deployment) = self.deployments[i].as_ref() else { break };
                    let (has_server, has_agent) = (!deployment.server.is_empty(), !deployment.agent.is_empty());
                    match run_step(deployment, &self.plan, self.sizes[i], step, seed, self.hz).await {
                        Ok(outcome) => {
                            for (metric, value) in &outcome.values {
                                self.results[i].record(*metric, *value);
                            }
                            self.foreign.push(outcome.usage.foreign_cores);
                            self.interrupts.push(outcome.usage.interrupt_cores);
                            if let Some(note) = outcome.note {
                                self.note(i, note);
                            }
                            if matches!(step, Step::BulkUpload | Step::BulkDownload) {
                                tally.bytes += outcome.bytes;
                                tally.machine += outcome.usage.machine;
                                tally.ours += outcome.usage.ours;
                                tally.server += outcome.usage.server;
                                tally.agent += outcome.usage.agent;
                            }
                            if step == Step::BulkDownload && tally.bytes > 0 {
                                let gib = tally.bytes as f64 / GIB;
                                let result = &mut self.results[i];
                                result.record(Metric::CpuMachine, tally.machine / gib);
                                result.record(Metric::CpuOurs, tally.ours / gib);
                                if has_server {
                                    result.record(Metric::CpuServer, tally.server / gib);
                                }
                                if has_agent {
                                    result.record(Metric::CpuAgent, tally.agent / gib);
                                }
                            }
                        }
                        Err(e) if is_integrity_error(&e) => {
                            return Err(e.context(format!("{id}, repetition {}", rep + 1)));
                        }
                        Err(e) => {
                            self.fail(i, format!("{}: {e:#}", step.name()));
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Resident memory of fresh processes: idle, then with tunnels held open.
    async fn memory(&mut self) -> anyhow::Result<()> {
        let rss_metrics = [(Metric::RssServer1k, Metric::RssAgent1k), (Metric::RssServerMany, Metric::RssAgentMany)];
        for i in self.running() {
            let config = self.configs[i];
            if config == Config::Direct {
                continue;
            }
            let id = config.id();
            self.progress.step(&format!("memory · {id} · fresh start"));
            if let Some(old) = self.deployments[i].take() {
                tokio::task::block_in_place(|| old.stop());
            }
            let mut deployment = match self.start(config).await? {
                Ok(d) => d,
                Err(reason) => {
                    for m in [Metric::RssServerIdle, Metric::RssAgentIdle] {
                        self.results[i].not_measured.insert(m.key().into(), format!("restart failed: {reason}"));
                    }
                    continue;
                }
            };
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut used_pss = false;
            let mut rss = |d: &Deployment| {
                let mut mib = |pids: Vec<u32>| {
                    let (kib, pss) = procfs::tree_memory_kib(&pids);
                    used_pss |= pss;
                    kib as f64 / 1024.0
                };
                (mib(d.server_pids()), mib(d.agent_pids()))
            };
            let (server, agent) = rss(&deployment);
            self.results[i].record(Metric::RssServerIdle, server);
            if !deployment.agent.is_empty() {
                self.results[i].record(Metric::RssAgentIdle, agent);
            }
            let mut held = Vec::new();
            let cap = match config {
                Config::Peer(peer) => peer.max_held(),
                _ => None,
            };
            for (server_metric, agent_metric) in rss_metrics.iter().skip(self.plan.held_levels.len()) {
                for m in [server_metric, agent_metric] {
                    self.results[i].not_measured.insert(m.key().into(), "full run only".into());
                }
            }
            for (level, (server_metric, agent_metric)) in self.plan.held_levels.clone().into_iter().zip(rss_metrics) {
                self.progress.step(&format!("memory · {id} · {level} tunnels open"));
                if let Some((max, why)) = cap.filter(|(max, _)| level > *max) {
                    for m in [server_metric, agent_metric] {
                        self.results[i].not_measured.insert(m.key().into(), format!("held only {max}: {why}"));
                    }
                    continue;
                }
                let opened = workloads::hold_open(&deployment.gateway, &mut held, level, 64).await;
                let alive = deployment.check_alive();
                match opened.and(alive) {
                    Ok(()) => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let (server, agent) = rss(&deployment);
                        self.results[i].record(server_metric, server);
                        if !deployment.agent.is_empty() {
                            self.results[i].record(agent_metric, agent);
                        }
                    }
                    Err(e) => {
                        let why = format!("opening {level} tunnels failed after {}: {e:#}", held.len());
                        self.progress.say(&format!("{id}: {why}"));
                        for m in [server_metric, agent_metric] {
                            self.results[i].not_measured.insert(m.key().into(), why.clone());
                        }
                        break;
                    }
                }
            }
            drop(held);
            if used_pss {
                self.note(i, "memory is the PSS sum of its processes (it runs several)".into());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            tokio::task::block_in_place(|| deployment.stop());
        }
        Ok(())
    }

    fn stop_all(&mut self) {
        for d in self.deployments.iter_mut().filter_map(Option::take) {
            tokio::task::block_in_place(|| d.stop());
        }
    }
}

/// The most tunnels (up to 10,000, in steps of 500) that processes holding two
/// fds per tunnel can keep open under `fd_limit`, with room for everything else.
fn held_tunnels_within(fd_limit: u64) -> usize {
    let fit = fd_limit.saturating_sub(1_000) / 2;
    (fit.min(10_000) / 500 * 500).max(500) as usize
}

fn build_release(root: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--package", "konduit", "--bin", "konduit"])
        .current_dir(root)
        .status()
        .context("run cargo build --release")?;
    if !status.success() {
        bail!("cargo build --release -p konduit failed ({status})");
    }
    Ok(crate::test::release_binary())
}

fn command_output(program: &Path, args: &[&str], dir: &Path) -> Option<String> {
    let out = Command::new(program).args(args).current_dir(dir).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn git_revision(root: &Path) -> String {
    let git = Path::new("git");
    let rev = command_output(git, &["rev-parse", "--short", "HEAD"], root).unwrap_or_else(|| "unknown".into());
    let dirty =
        command_output(git, &["status", "--porcelain", "--untracked-files=no"], root).is_some_and(|s| !s.is_empty());
    if dirty { format!("{rev} + uncommitted changes") } else { rev }
}

/// Calendar date and time (UTC) of a Unix time: (year, month, day, hour, minute, second).
fn utc(unix: u64) -> (i64, u32, u32, u32, u32, u32) {
    // Howard Hinnant's civil_from_days.
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, (secs / 3600) as u32, (secs / 60 % 60) as u32, (secs % 60) as u32)
}

/// One SVG chart of the report: which metrics, as which series.
struct ChartSpec<'a> {
    file: &'static str,
    title: &'static str,
    unit: &'static str,
    series: Vec<&'a str>,
    metrics: Vec<Metric>,
    /// Direct has no tunnel processes (memory).
    skip_direct: bool,
}

fn charts(report: &Report, out: &Path) -> anyhow::Result<Vec<&'static str>> {
    use svg::{Chart, bar_chart};
    let many = report.settings.held_levels.get(1).copied().unwrap_or(10_000);
    let (server_many, agent_many) = (format!("server {many}"), format!("agent {many}"));
    let specs = [
        ChartSpec {
            file: "throughput.svg",
            title: "Bulk throughput",
            unit: "MB/s",
            series: vec!["upload", "download", "8 streams"],
            metrics: vec![Metric::BulkUpload, Metric::BulkDownload, Metric::Parallel8],
            skip_direct: false,
        },
        ChartSpec {
            file: "latency.svg",
            title: "64 B request/response",
            unit: "µs",
            series: vec!["p50", "p99", "pinned p50", "pinned p99"],
            metrics: vec![Metric::RrP50, Metric::RrP99, Metric::RrPinnedP50, Metric::RrPinnedP99],
            skip_direct: false,
        },
        ChartSpec {
            file: "cpu.svg",
            title: "CPU per GiB moved",
            unit: "CPU-s/GiB",
            series: vec!["machine", "ours", "server", "agent"],
            metrics: vec![Metric::CpuMachine, Metric::CpuOurs, Metric::CpuServer, Metric::CpuAgent],
            skip_direct: false,
        },
        ChartSpec {
            file: "memory.svg",
            title: "Resident memory",
            unit: "MiB",
            series: vec!["server idle", "agent idle", "server 1,000", "agent 1,000", &server_many, &agent_many],
            metrics: vec![
                Metric::RssServerIdle,
                Metric::RssAgentIdle,
                Metric::RssServer1k,
                Metric::RssAgent1k,
                Metric::RssServerMany,
                Metric::RssAgentMany,
            ],
            skip_direct: true,
        },
    ];
    let mut written = Vec::new();
    for spec in specs {
        let rows = report
            .configs
            .iter()
            .filter(|c| !(spec.skip_direct && c.id == "direct"))
            .map(|c| (c.id.clone(), spec.metrics.iter().map(|m| c.summary(*m).copied()).collect()))
            .collect();
        let chart = Chart { title: spec.title, unit: spec.unit, series: &spec.series, rows };
        std::fs::write(out.join(spec.file), bar_chart(&chart))?;
        written.push(spec.file);
    }
    Ok(written)
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("cargo xtask bench must run as root (CPU pinning, 10,000-connection fd limits, sockmap, peers)");
    }
    let wall = Instant::now();
    let plan = Plan::new(&args);
    let root = workspace_root();
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => tokio::task::block_in_place(|| build_release(&root))?,
    };
    anyhow::ensure!(binary.is_file(), "no konduit binary at {}", binary.display());
    let konduit_version =
        command_output(&binary, &["--version"], &root).unwrap_or_else(|| format!("konduit ({})", binary.display()));
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let (y, mo, d, h, mi, s) = utc(now);
    let started_utc = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z");
    let out = args.out.clone().unwrap_or_else(|| {
        root.join("results")
            .join(format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z{}", if plan.quick { "-quick" } else { "" }))
    });
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;

    let scratch = Scratch::new()?;
    let fd_limit = process::raise_fd_limit()?;
    let mut plan = plan;
    let many = held_tunnels_within(fd_limit);
    if !plan.quick {
        plan.held_levels = vec![1_000, many];
    }
    let pki = pki::Pki::generate(&scratch.0)?;
    let tls = gateway::tls_connector(&pki.ca_der, &pki.client.cert_der, &pki.client.key_der)?;
    let backends = Backends::start().await?;
    let progress = Progress::new();
    let loadavg_start = procfs::loadavg();
    progress.say(&format!(
        "konduit bench ({}): {} → {}",
        if plan.quick { "quick" } else { "full" },
        konduit_version,
        out.display()
    ));

    let installed = if args.peers {
        let say = |m: &str| progress.say(m);
        Some(tokio::task::block_in_place(|| peers::install(&logs.join("install.log"), &say)))
    } else {
        None
    };
    let configs: Vec<Config> = Config::all(args.peers)
        .into_iter()
        .filter(|c| *c == Config::Direct || args.only.is_empty() || args.only.iter().any(|o| c.id().starts_with(o)))
        .collect();
    let results = configs.iter().map(|c| ConfigResult::new(c.id(), c.describe(), c.is_konduit())).collect();
    let n = configs.len();
    let mut run = Run {
        env: deploy::Env {
            binary: &binary,
            pki: &pki,
            scratch: &scratch.0,
            logs: &logs,
            backends: &backends,
            tls,
            fd_limit,
        },
        plan: plan.clone(),
        progress: &progress,
        hz: procfs::clock_ticks() as f64,
        configs,
        results,
        deployments: (0..n).map(|_| None).collect(),
        sizes: vec![Sizes { upload: 64 * MIB, download: 64 * MIB, parallel: 64 * MIB }; n],
        foreign: vec![],
        interrupts: vec![],
        ports: process::Ports::new(),
        installed,
    };
    progress.set_steps(n as u64 * 2);
    run.start_all().await?;
    let running = run.running().len() as u64;
    let memory_steps = running.saturating_sub(1) * (1 + plan.held_levels.len() as u64);
    progress.set_steps(n as u64 + running + running * plan.reps as u64 * Step::ALL.len() as u64 + memory_steps);

    let mut outcome = run.warm_up().await;
    if outcome.is_ok() {
        outcome = run.repetitions().await;
    }
    if outcome.is_ok() {
        outcome = run.memory().await;
    }
    run.stop_all();
    progress.finish();

    let mut notes: Vec<String> = vec![
        "Backends (bulk sink/source, echo, one-byte) run inside the bench process on 127.0.0.1; every bulk byte is \
         checked against a seeded pattern where it lands (a wrong byte fails the run)."
            .into(),
        "Bulk transfers are sized in the warm-up to last about the planned time in each configuration; CPU-s/GiB \
         comes from /proc clock ticks over both single-stream transfers."
            .into(),
        "gRPC tunnels are single-use (a new channel per tunnel, as kube-apiserver's konnectivity client); mTLS \
         tunnels do a full handshake each (no session resumption)."
            .into(),
        format!(
            "Memory: fresh processes after start-up and one probe tunnel (idle), then with tunnels held open (one byte \
             each way); RLIMIT_NOFILE {fd_limit} for the bench and everything it starts."
        ),
    ];
    if let Some(installed) = &run.installed {
        for peer in peers::Peer::ALL {
            if let Some(why) = installed.skipped(peer) {
                notes.push(format!("Peer `{}` skipped: {why}", peer.name()));
            }
        }
    } else {
        notes.push("Peers (ssh -R, rathole, haproxy, socat) not measured: run with --peers.".into());
    }
    if plan.quick {
        notes.push(
            "--quick holds 1,000 tunnels only; the 10,000-tunnel memory level is measured in the full run.".into(),
        );
    } else if many < 10_000 {
        notes.push(format!(
            "Memory with 10,000 open tunnels was measured at {many} instead: the hard RLIMIT_NOFILE here is {fd_limit} and \
             cannot be raised (no CAP_SYS_RESOURCE), and the agent and the server each need two fds per tunnel."
        ));
    }
    let tw_reuse = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_tw_reuse").unwrap_or_default();
    notes.push(format!("net.ipv4.tcp_tw_reuse = {} (tunnel storms leave TIME_WAIT sockets).", tw_reuse.trim()));

    let mut report = Report {
        started_utc,
        duration_s: wall.elapsed().as_secs_f64(),
        konduit_version,
        git_revision: git_revision(&root),
        machine: procfs::machine_facts(),
        load: LoadReport {
            loadavg_start,
            loadavg_end: procfs::loadavg(),
            foreign_cores: summarize(&run.foreign),
            interrupt_cores: summarize(&run.interrupts),
        },
        settings: plan.settings(),
        configs: std::mem::take(&mut run.results),
        targets: vec![],
        failure: outcome.as_ref().err().map(|e| format!("{e:#}")),
        notes,
    };
    report.finish();
    let mut markdown = report::render_markdown(&report);
    let written = charts(&report, &out)?;
    markdown.push_str("## Charts\n\n");
    for file in written {
        markdown.push_str(&format!("![{file}]({file})\n\n"));
    }
    std::fs::write(out.join("report.md"), &markdown)?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&report)?)?;
    println!("{markdown}");
    eprintln!("report: {}", out.join("report.md").display());
    outcome.map_err(|e| anyhow!("{e:#} (partial report written to {})", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_tunnels_fit_the_fd_limit() {
        assert_eq!(held_tunnels_within(1 << 20), 10_000);
        assert_eq!(held_tunnels_within(20_000), 9_500);
        assert_eq!(held_tunnels_within(1_024), 500);
    }

    #[test]
    fn utc_calendar() {
        assert_eq!(utc(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(utc(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(utc(1_735_689_599), (2024, 12, 31, 23, 59, 59));
    }

    #[test]
    fn quick_plan_is_shorter_but_keeps_ten_thousand_round_trips() {
        let args = |quick| BenchArgs { quick, peers: false, reps: None, only: vec![], binary: None, out: None };
        let (quick, full) = (Plan::new(&args(true)), Plan::new(&args(false)));
        assert!(quick.reps < full.reps && quick.bulk_seconds < full.bulk_seconds);
        assert!(quick.rr_count >= 10_000);
    }
}
