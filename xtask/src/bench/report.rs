//! The bench's results and what is said about them: the metrics, their
//! summaries and ratios to direct, the targets met or missed, and the
//! markdown report. Pure: results in, text out; the caller writes files.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::procfs::MachineFacts;
use super::stats::{Summary, ratio, summarize};

/// Everything measured, per configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    BulkUpload,
    BulkDownload,
    Parallel8,
    RrP50,
    RrP99,
    RrPinnedP50,
    RrPinnedP99,
    TunnelsSequential,
    Tunnels16,
    CpuMachine,
    CpuOurs,
    CpuServer,
    CpuAgent,
    RssServerIdle,
    RssAgentIdle,
    RssServer1k,
    RssAgent1k,
    RssServerMany,
    RssAgentMany,
}

impl Metric {
    pub const ALL: [Metric; 19] = [
        Metric::BulkUpload,
        Metric::BulkDownload,
        Metric::Parallel8,
        Metric::RrP50,
        Metric::RrP99,
        Metric::RrPinnedP50,
        Metric::RrPinnedP99,
        Metric::TunnelsSequential,
        Metric::Tunnels16,
        Metric::CpuMachine,
        Metric::CpuOurs,
        Metric::CpuServer,
        Metric::CpuAgent,
        Metric::RssServerIdle,
        Metric::RssAgentIdle,
        Metric::RssServer1k,
        Metric::RssAgent1k,
        Metric::RssServerMany,
        Metric::RssAgentMany,
    ];

    /// The JSON key.
    pub fn key(self) -> &'static str {
        match self {
            Metric::BulkUpload => "bulk_upload_mb_s",
            Metric::BulkDownload => "bulk_download_mb_s",
            Metric::Parallel8 => "parallel8_mb_s",
            Metric::RrP50 => "rr64_p50_us",
            Metric::RrP99 => "rr64_p99_us",
            Metric::RrPinnedP50 => "rr64_pinned_p50_us",
            Metric::RrPinnedP99 => "rr64_pinned_p99_us",
            Metric::TunnelsSequential => "tunnels_sequential_per_s",
            Metric::Tunnels16 => "tunnels_16way_per_s",
            Metric::CpuMachine => "cpu_machine_s_per_gib",
            Metric::CpuOurs => "cpu_ours_s_per_gib",
            Metric::CpuServer => "cpu_server_s_per_gib",
            Metric::CpuAgent => "cpu_agent_s_per_gib",
            Metric::RssServerIdle => "rss_server_idle_mib",
            Metric::RssAgentIdle => "rss_agent_idle_mib",
            Metric::RssServer1k => "rss_server_1k_mib",
            Metric::RssAgent1k => "rss_agent_1k_mib",
            Metric::RssServerMany => "rss_server_many_mib",
            Metric::RssAgentMany => "rss_agent_many_mib",
        }
    }

    /// Whether a ratio to direct means something for this metric.
    pub fn compares_to_direct(self) -> bool {
        matches!(
            self,
            Metric::BulkUpload
                | Metric::BulkDownload
                | Metric::Parallel8
                | Metric::RrP50
                | Metric::RrP99
                | Metric::RrPinnedP50
                | Metric::RrPinnedP99
                | Metric::TunnelsSequential
                | Metric::Tunnels16
                | Metric::CpuMachine
                | Metric::CpuOurs
        )
    }

    /// Decimal places in tables.
    fn digits(self) -> usize {
        match self {
            Metric::RrP50 | Metric::RrP99 | Metric::RrPinnedP50 | Metric::RrPinnedP99 => 1,
            Metric::CpuMachine | Metric::CpuOurs | Metric::CpuServer | Metric::CpuAgent => 2,
            Metric::RssServerIdle
            | Metric::RssAgentIdle
            | Metric::RssServer1k
            | Metric::RssAgent1k
            | Metric::RssServerMany
            | Metric::RssAgentMany => 1,
            _ => 0,
        }
    }
}

/// Whether a configuration was measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum Status {
    Measured,
    /// It could not start (e.g. this build does not have the data plane): its own words.
    NotAvailable(String),
    /// It started but broke during the run.
    Failed(String),
}

/// One configuration's results.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigResult {
    pub id: String,
    pub description: String,
    pub is_konduit: bool,
    pub status: Status,
    pub notes: Vec<String>,
    /// Per metric key: one sample per repetition (memory: one sample).
    pub samples: BTreeMap<String, Vec<f64>>,
    /// Per metric key: why it has no samples although the configuration ran.
    pub not_measured: BTreeMap<String, String>,
    /// Filled by [`Report::finish`].
    pub summaries: BTreeMap<String, Summary>,
    /// Median over direct's median, filled by [`Report::finish`].
    pub ratio_to_direct: BTreeMap<String, f64>,
}

impl ConfigResult {
    pub fn new(id: String, description: String, is_konduit: bool) -> Self {
        ConfigResult {
            id,
            description,
            is_konduit,
            status: Status::Measured,
            notes: vec![],
            samples: BTreeMap::new(),
            not_measured: BTreeMap::new(),
            summaries: BTreeMap::new(),
            ratio_to_direct: BTreeMap::new(),
        }
    }

    pub fn record(&mut self, metric: Metric, value: f64) {
        self.samples.entry(metric.key().to_owned()).or_default().push(value);
    }

    pub fn summary(&self, metric: Metric) -> Option<&Summary> {
        self.summaries.get(metric.key())
    }

    pub fn ratio(&self, metric: Metric) -> Option<f64> {
        self.ratio_to_direct.get(metric.key()).copied()
    }
}

/// Load on the machine that the bench did not cause.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    pub loadavg_start: [f64; 3],
    pub loadavg_end: [f64; 3],
    /// Cores busy (user+system+steal) outside the bench and the processes it
    /// measures, per measurement window.
    pub foreign_cores: Option<Summary>,
    /// Cores busy in interrupts and soft interrupts (mostly our own loopback traffic).
    pub interrupt_cores: Option<Summary>,
}

/// How the run was sized.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub mode: String,
    pub repetitions: usize,
    pub bulk_seconds: f64,
    pub rr_round_trips: usize,
    pub rr_warmup: usize,
    pub rr_message_bytes: usize,
    pub tunnel_seconds: f64,
    pub held_levels: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Met,
    Missed,
    NotMeasured,
}

/// One target checked against one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub target: String,
    pub config: String,
    pub value: Option<f64>,
    /// The value as the table shows it, with what it was compared against.
    pub shown: String,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_utc: String,
    pub duration_s: f64,
    pub konduit_version: String,
    pub git_revision: String,
    pub machine: MachineFacts,
    pub load: LoadReport,
    pub settings: Settings,
    pub configs: Vec<ConfigResult>,
    pub targets: Vec<TargetCheck>,
    /// Set when the run stopped early (a wrong byte, a harness error).
    pub failure: Option<String>,
    pub notes: Vec<String>,
}

impl Report {
    /// Computes summaries, ratios to direct and the target checks.
    pub fn finish(&mut self) {
        for config in &mut self.configs {
            config.summaries =
                config.samples.iter().filter_map(|(k, v)| summarize(v).map(|s| (k.clone(), s))).collect();
        }
        let direct = self.configs.iter().find(|c| c.id == "direct").map(|c| c.summaries.clone()).unwrap_or_default();
        for config in &mut self.configs {
            config.ratio_to_direct = Metric::ALL
                .iter()
                .filter(|m| m.compares_to_direct())
                .filter_map(|m| {
                    let value = config.summaries.get(m.key())?.median;
                    let base = direct.get(m.key())?.median;
                    Some((m.key().to_owned(), ratio(value, base)?))
                })
                .collect();
        }
        self.targets = evaluate_targets(&self.configs);
    }
}

fn config_ids(configs: &[ConfigResult], pick: impl Fn(&ConfigResult) -> bool) -> Vec<&ConfigResult> {
    configs.iter().filter(|c| pick(c)).collect()
}

fn check(
    target: &str,
    config: &ConfigResult,
    value: Option<f64>,
    shown: impl Fn(f64) -> String,
    met: impl Fn(f64) -> bool,
) -> TargetCheck {
    let (verdict, shown) = match (&config.status, value) {
        (_, Some(v)) => (if met(v) { Verdict::Met } else { Verdict::Missed }, shown(v)),
        (Status::NotAvailable(why), None) => (Verdict::NotMeasured, format!("not available in this build: {why}")),
        (Status::Failed(why), None) => (Verdict::NotMeasured, format!("failed: {why}")),
        (Status::Measured, None) => (Verdict::NotMeasured, "no samples".to_owned()),
    };
    TargetCheck { target: target.to_owned(), config: config.id.clone(), value, shown, verdict }
}

/// The targets, each against every configuration it applies to.
pub fn evaluate_targets(configs: &[ConfigResult]) -> Vec<TargetCheck> {
    let mut out = Vec::new();
    let lower_bulk = |c: &ConfigResult| -> Option<f64> {
        let up = c.ratio(Metric::BulkUpload)?;
        let down = c.ratio(Metric::BulkDownload)?;
        Some(up.min(down))
    };
    let times = |v: f64| format!("{v:.2}× direct (slower direction)");
    for c in config_ids(configs, |c| c.id == "connect-uds/sockmap") {
        out.push(check("bulk ≥ 0.60× direct, HTTP-CONNECT spliced both ends", c, lower_bulk(c), times, |v| {
            v >= 0.60
        }));
    }
    for c in config_ids(configs, |c| c.id.starts_with("grpc-uds/")) {
        out.push(check("bulk ≥ 0.35× direct, gRPC frontend", c, lower_bulk(c), times, |v| v >= 0.35));
    }
    for c in config_ids(configs, |c| c.is_konduit && c.id.ends_with("/sockmap")) {
        let v = c.summary(Metric::CpuAgent).map(|s| s.median);
        out.push(check("agent ≤ 0.3 CPU-s/GiB, sockmap", c, v, |v| format!("{v:.2} CPU-s/GiB"), |v| v <= 0.3));
    }
    for c in config_ids(configs, |c| c.is_konduit) {
        let v = c.ratio(Metric::RrP50);
        out.push(check("64 B req/resp p50 ≤ 3× direct", c, v, |v| format!("{v:.2}× direct"), |v| v <= 3.0));
    }
    for c in config_ids(configs, |c| c.is_konduit) {
        let v = c.summary(Metric::Tunnels16).map(|s| s.median);
        out.push(check("≥ 3,000 new tunnels/s (16-way)", c, v, |v| format!("{v:.0}/s"), |v| v >= 3000.0));
    }
    for c in config_ids(configs, |c| c.is_konduit) {
        let v = c.summary(Metric::RssAgent1k).map(|s| s.median);
        out.push(check("agent RSS ≤ 12 MiB with 1,000 open tunnels", c, v, |v| format!("{v:.1} MiB"), |v| v <= 12.0));
    }
    out
}

// ---- markdown ------------------------------------------------------------------------------

/// "median (min–max)", or just the value for a single sample.
pub fn cell(summary: Option<&Summary>, digits: usize) -> String {
    match summary {
        None => "—".into(),
        Some(s) if s.n == 1 || s.min == s.max => format!("{:.*}", digits, s.median),
        Some(s) => format!("{:.*} ({:.*}–{:.*})", digits, s.median, digits, s.min, digits, s.max),
    }
}

fn ratio_cell(config: &ConfigResult, metric: Metric) -> String {
    match config.ratio(metric) {
        Some(r) if config.id != "direct" => format!("{r:.2}×"),
        _ => "—".into(),
    }
}

fn table(out: &mut String, header: &[&str], rows: Vec<Vec<String>>) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", header.iter().map(|_| "---|").collect::<String>());
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out.push('\n');
}

/// Rows for the measured configurations: `(config, cells)`; a configuration
/// that did not run gets one row saying why.
fn rows(configs: &[ConfigResult], columns: &[Column]) -> Vec<Vec<String>> {
    configs
        .iter()
        .map(|c| {
            let mut row = vec![format!("`{}`", c.id)];
            match &c.status {
                Status::NotAvailable(_) => {
                    row.push("not available in this build (see Configurations)".into());
                    row.extend(columns.iter().skip(1).map(|_| String::new()));
                }
                _ => row.extend(columns.iter().map(|col| match col {
                    Column::Value(m) => match (c.summary(*m), c.not_measured.get(m.key())) {
                        (None, Some(why)) => format!("— ({})", escape(why)),
                        (s, _) => cell(s, m.digits()),
                    },
                    Column::Ratio(m) => ratio_cell(c, *m),
                })),
            }
            row
        })
        .collect()
}

enum Column {
    Value(Metric),
    Ratio(Metric),
}

fn escape(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn verdict_text(v: Verdict) -> &'static str {
    match v {
        Verdict::Met => "✅ met",
        Verdict::Missed => "❌ missed",
        Verdict::NotMeasured => "— not measured",
    }
}

/// Foreign load (cores, median over windows) above which the report warns.
pub const FOREIGN_LOAD_WARNING: f64 = 0.2;

pub fn render_markdown(report: &Report) -> String {
    use Column::{Ratio, Value};
    let mut out = String::new();
    let s = &report.settings;
    let _ = writeln!(out, "# konduit bench — {} ({})\n", report.started_utc, s.mode);
    if let Some(failure) = &report.failure {
        let _ = writeln!(out, "> **RUN FAILED:** {}\n", escape(failure));
    }
    let _ = writeln!(
        out,
        "{} · git {} · {} repetitions, configurations interleaved round-robin after a warm-up · \
         cells are median (min–max) over repetitions · ×direct = median ÷ direct's median in this run · \
         {:.0} s in all.\n",
        report.konduit_version, report.git_revision, s.repetitions, report.duration_s
    );

    if let Some(f) = report.load.foreign_cores.filter(|f| f.median > FOREIGN_LOAD_WARNING) {
        let _ = writeln!(
            out,
            "> **Warning:** other work on this machine used a median of {:.2} cores (worst window {:.2}) while the \
             bench measured; absolute numbers are lower and noisier than on a quiet machine.\n",
            f.median, f.max
        );
    }
    let m = &report.machine;
    let l = &report.load;
    let cores = |s: Option<&Summary>| s.map(|s| format!("{:.2} (max {:.2})", s.median, s.max)).unwrap_or("—".into());
    let _ = writeln!(out, "## Machine and load\n");
    table(
        &mut out,
        &[
            "kernel",
            "CPU",
            "cores",
            "memory",
            "load avg (1/5/15) start → end",
            "foreign CPU, cores",
            "irq+softirq, cores",
        ],
        vec![vec![
            m.kernel.clone(),
            m.cpu_model.clone(),
            m.cores.to_string(),
            format!("{:.1} GiB", m.memory_gib),
            format!(
                "{:.2}/{:.2}/{:.2} → {:.2}/{:.2}/{:.2}",
                l.loadavg_start[0],
                l.loadavg_start[1],
                l.loadavg_start[2],
                l.loadavg_end[0],
                l.loadavg_end[1],
                l.loadavg_end[2]
            ),
            cores(l.foreign_cores.as_ref()),
            cores(l.interrupt_cores.as_ref()),
        ]],
    );
    let _ = writeln!(
        out,
        "Foreign CPU: user+system+steal time of the machine outside the bench process and the measured tunnel \
         processes, per measurement window (median and worst window). Above ~0.2 cores, treat the numbers with care.\n"
    );

    let _ = writeln!(out, "## Configurations\n");
    table(
        &mut out,
        &["config", "what", "status"],
        report
            .configs
            .iter()
            .map(|c| {
                let status = match &c.status {
                    Status::Measured => "measured".to_owned(),
                    Status::NotAvailable(why) => format!("not available in this build: {}", escape(why)),
                    Status::Failed(why) => format!("failed: {}", escape(why)),
                };
                let notes =
                    if c.notes.is_empty() { String::new() } else { format!(" ({})", escape(&c.notes.join("; "))) };
                vec![format!("`{}`", c.id), c.description.clone(), format!("{status}{notes}")]
            })
            .collect(),
    );

    let _ = writeln!(out, "## Throughput, MB/s (single stream each way; 8 streams = 4 up + 4 down at once)\n");
    let cols = [
        Value(Metric::BulkUpload),
        Ratio(Metric::BulkUpload),
        Value(Metric::BulkDownload),
        Ratio(Metric::BulkDownload),
        Value(Metric::Parallel8),
        Ratio(Metric::Parallel8),
    ];
    table(
        &mut out,
        &["config", "upload", "×direct", "download", "×direct", "8 streams", "×direct"],
        rows(&report.configs, &cols),
    );

    let _ = writeln!(
        out,
        "## Request/response, {} B, µs ({} round trips per repetition after {} warm-up; pinned = every process on CPU 0)\n",
        s.rr_message_bytes, s.rr_round_trips, s.rr_warmup
    );
    let cols = [
        Value(Metric::RrP50),
        Value(Metric::RrP99),
        Ratio(Metric::RrP50),
        Value(Metric::RrPinnedP50),
        Value(Metric::RrPinnedP99),
        Ratio(Metric::RrPinnedP50),
    ];
    table(
        &mut out,
        &["config", "p50", "p99", "p50 ×direct", "pinned p50", "pinned p99", "pinned p50 ×direct"],
        rows(&report.configs, &cols),
    );

    let _ = writeln!(out, "## New tunnels per second (open, 1 byte each way, close; {:.1} s each)\n", s.tunnel_seconds);
    let cols = [
        Value(Metric::TunnelsSequential),
        Ratio(Metric::TunnelsSequential),
        Value(Metric::Tunnels16),
        Ratio(Metric::Tunnels16),
    ];
    table(&mut out, &["config", "sequential", "×direct", "16-way", "×direct"], rows(&report.configs, &cols));

    let _ = writeln!(
        out,
        "## CPU seconds per GiB moved (single-stream bulk, both directions)\n\n\
         machine = every CPU's busy time (/proc/stat), foreign load included; ours = the bench process, the \
         tunnel processes and interrupts (machine minus foreign load); server/agent = their processes \
         (/proc/PID/stat utime+stime).\n"
    );
    let cols = [
        Value(Metric::CpuMachine),
        Value(Metric::CpuOurs),
        Ratio(Metric::CpuOurs),
        Value(Metric::CpuServer),
        Value(Metric::CpuAgent),
    ];
    table(&mut out, &["config", "machine", "ours", "ours ×direct", "server", "agent"], rows(&report.configs, &cols));

    let many = s.held_levels.get(1).copied().unwrap_or(10_000);
    let _ = writeln!(
        out,
        "## Resident memory, MiB (VmRSS of fresh processes: idle, then with tunnels held open, 1 byte each way)\n"
    );
    let cols = [
        Value(Metric::RssServerIdle),
        Value(Metric::RssAgentIdle),
        Value(Metric::RssServer1k),
        Value(Metric::RssAgent1k),
        Value(Metric::RssServerMany),
        Value(Metric::RssAgentMany),
    ];
    let memory_configs: Vec<ConfigResult> = report.configs.iter().filter(|c| c.id != "direct").cloned().collect();
    let (server_many, agent_many) = (format!("server {many} open"), format!("agent {many} open"));
    table(
        &mut out,
        &["config", "server idle", "agent idle", "server 1,000 open", "agent 1,000 open", &server_many, &agent_many],
        rows(&memory_configs, &cols),
    );

    let _ = writeln!(out, "## Targets\n");
    table(
        &mut out,
        &["target", "config", "value", "verdict"],
        report
            .targets
            .iter()
            .map(|t| {
                vec![t.target.clone(), format!("`{}`", t.config), escape(&t.shown), verdict_text(t.verdict).into()]
            })
            .collect(),
    );

    if !report.notes.is_empty() {
        let _ = writeln!(out, "## Notes\n");
        for note in &report.notes {
            let _ = writeln!(out, "- {note}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(id: &str, konduit: bool, values: &[(Metric, &[f64])]) -> ConfigResult {
        let mut c = ConfigResult::new(id.into(), format!("{id} config"), konduit);
        for (metric, samples) in values {
            for v in *samples {
                c.record(*metric, *v);
            }
        }
        c
    }

    fn report(configs: Vec<ConfigResult>) -> Report {
        let mut r = Report {
            started_utc: "2025-01-01T00:00:00Z".into(),
            duration_s: 100.0,
            konduit_version: "konduit 0.1.0".into(),
            git_revision: "abc123".into(),
            machine: MachineFacts {
                kernel: "6.1".into(),
                cpu_model: "EPYC".into(),
                cores: 2,
                memory_gib: 24.0,
                clock_ticks_per_s: 100,
            },
            load: LoadReport::default(),
            settings: Settings {
                mode: "quick".into(),
                repetitions: 3,
                bulk_seconds: 0.5,
                rr_round_trips: 10_000,
                rr_warmup: 1_000,
                rr_message_bytes: 64,
                tunnel_seconds: 1.0,
                held_levels: vec![1_000, 10_000],
            },
            configs,
            targets: vec![],
            failure: None,
            notes: vec![],
        };
        r.finish();
        r
    }

    #[test]
    fn ratios_are_medians_over_directs_median() {
        let r = report(vec![
            config("direct", false, &[(Metric::BulkUpload, &[1000.0, 900.0, 1100.0]), (Metric::RrP50, &[20.0])]),
            config(
                "grpc-uds/userspace",
                true,
                &[(Metric::BulkUpload, &[400.0, 300.0, 500.0]), (Metric::RrP50, &[50.0])],
            ),
        ]);
        let grpc = &r.configs[1];
        assert_eq!(grpc.ratio(Metric::BulkUpload), Some(0.4));
        assert_eq!(grpc.ratio(Metric::RrP50), Some(2.5));
        assert_eq!(grpc.summary(Metric::BulkUpload).map(|s| (s.min, s.max)), Some((300.0, 500.0)));
    }

    #[test]
    fn targets_are_met_missed_or_not_measured() {
        let mut sockmap = config("connect-uds/sockmap", true, &[]);
        sockmap.status = Status::NotAvailable("error: unexpected argument '--dataplane' found".into());
        let r = report(vec![
            config("direct", false, &[(Metric::BulkUpload, &[1000.0]), (Metric::BulkDownload, &[1000.0])]),
            config(
                "grpc-uds/userspace",
                true,
                &[
                    (Metric::BulkUpload, &[400.0]),
                    (Metric::BulkDownload, &[300.0]),
                    (Metric::Tunnels16, &[3500.0]),
                    (Metric::RssAgent1k, &[14.0]),
                ],
            ),
            sockmap,
        ]);
        let find = |target: &str, config: &str| {
            r.targets.iter().find(|t| t.target.starts_with(target) && t.config == config).map(|t| t.verdict)
        };
        assert_eq!(find("bulk ≥ 0.35", "grpc-uds/userspace"), Some(Verdict::Missed), "0.30× is the slower way");
        assert_eq!(find("≥ 3,000", "grpc-uds/userspace"), Some(Verdict::Met));
        assert_eq!(find("agent RSS", "grpc-uds/userspace"), Some(Verdict::Missed));
        assert_eq!(find("bulk ≥ 0.60", "connect-uds/sockmap"), Some(Verdict::NotMeasured));
        assert_eq!(find("agent ≤ 0.3", "connect-uds/sockmap"), Some(Verdict::NotMeasured));
        let shown = &r.targets.iter().find(|t| t.config == "connect-uds/sockmap").expect("row").shown;
        assert!(shown.contains("--dataplane"), "the binary's own reason is shown: {shown}");
    }

    #[test]
    fn cells_show_median_and_spread() {
        let s = summarize(&[10.0, 12.0, 11.0]);
        assert_eq!(cell(s.as_ref(), 1), "11.0 (10.0–12.0)");
        assert_eq!(cell(summarize(&[5.0]).as_ref(), 0), "5");
        assert_eq!(cell(None, 0), "—");
    }

    #[test]
    fn markdown_has_every_section_and_marks_unavailable_configs() {
        let mut sockmap = config("connect-uds/sockmap", true, &[]);
        sockmap.status = Status::NotAvailable("no | flag".into());
        let r = report(vec![
            config("direct", false, &[(Metric::BulkUpload, &[1000.0, 1200.0])]),
            config("connect-uds/userspace", true, &[(Metric::BulkUpload, &[700.0, 800.0])]),
            sockmap,
        ]);
        let md = render_markdown(&r);
        for section in [
            "## Machine and load",
            "## Throughput",
            "## Request/response",
            "## New tunnels",
            "## CPU",
            "## Resident memory",
            "## Targets",
        ] {
            assert!(md.contains(section), "missing {section}");
        }
        assert!(md.contains("| `connect-uds/userspace` | 750 (700–800) | 0.68× |"), "{md}");
        assert!(md.contains("not available in this build: no \\| flag"), "the reason is in the configurations table");
        assert!(md.contains("| `connect-uds/sockmap` | not available in this build (see Configurations) |"));
        assert!(!md.contains("| `direct` | 1100 (1000–1200) | 1.00×"), "direct has no ratio to itself");
    }
}
