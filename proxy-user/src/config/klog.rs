//! klog-style logging flags, accepted so that stock manifests start, and
//! mapped onto tracing.

use clap::{ArgAction, Args};

/// The klog flags stock binaries accept. Only `-v` and `--vmodule`-free
/// verbosity change konduit's behaviour; the rest are accepted for
/// compatibility (konduit always logs to stderr).
#[derive(Debug, Clone, Args)]
pub struct KlogFlags {
    /// Log verbosity (klog levels; stock default 4). 5+ = debug, 7+ = trace.
    #[arg(short = 'v', long = "v", default_value_t = 4)]
    pub v: u8,
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub logtostderr: bool,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub alsologtostderr: bool,
    #[arg(long, default_value = "")]
    pub log_dir: String,
    #[arg(long, default_value = "")]
    pub log_file: String,
    #[arg(long, default_value_t = 1800)]
    pub log_file_max_size: u64,
    #[arg(long, default_value = "")]
    pub vmodule: String,
    #[arg(long, default_value = "")]
    pub stderrthreshold: String,
    #[arg(long, default_value = "")]
    pub alsologtostderrthreshold: String,
    #[arg(long, default_value = "")]
    pub log_backtrace_at: String,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub add_dir_header: bool,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub skip_headers: bool,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub skip_log_headers: bool,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub one_output: bool,
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub legacy_stderr_threshold_behavior: bool,
}

impl KlogFlags {
    /// The tracing filter for this verbosity; `RUST_LOG` overrides it.
    pub fn default_filter(&self) -> &'static str {
        match self.v {
            0..=4 => "info",
            5..=6 => "konduit=debug,info",
            _ => "konduit=trace,debug",
        }
    }

    /// Installs the global tracing subscriber (stderr).
    pub fn init_logging(&self) {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(self.default_filter()));
        let _ =
            tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).try_init();
        if !self.log_file.is_empty() || !self.log_dir.is_empty() {
            tracing::warn!("--log-file/--log-dir are accepted for compatibility; konduit logs to stderr");
        }
    }
}
