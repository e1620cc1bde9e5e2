//! One running `konduit server` or `konduit agent`: finding the binary,
//! spawning it with stdout/stderr in a log file, signals, exit, and probes of
//! its health port. The process is killed when the value is dropped, and its
//! log is printed if that happens while a test is panicking (or always, with
//! `KONDUIT_E2E_LOGS=1`). Never builds the binary itself: `cargo xtask test` does.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::probe::{HttpResponse, http_get_on};

/// Which konduit subcommand runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `konduit server` (proxy-server).
    Server,
    /// `konduit agent` (proxy-agent).
    Agent,
}

impl Role {
    fn subcommand(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Agent => "agent",
        }
    }
}

/// The konduit binary the tests run: `$KONDUIT_BIN`, else `$CARGO_TARGET_DIR/debug/konduit`,
/// else `<workspace>/target/debug/konduit`. Panics with instructions if it does not exist.
pub fn konduit_binary() -> PathBuf {
    let path = if let Some(bin) = std::env::var_os("KONDUIT_BIN") {
        PathBuf::from(bin)
    } else if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        PathBuf::from(target).join("debug/konduit")
    } else {
        workspace_root().join("target/debug/konduit")
    };
    if !path.is_file() {
        panic!(
            "konduit binary not found at {}: run `cargo xtask test` (builds it, then runs every test) \
             or `cargo build -p konduit --bin konduit` first, or point KONDUIT_BIN at a binary",
            path.display()
        );
    }
    path
}

/// The cargo workspace this crate belongs to.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// How to start one konduit process.
#[derive(Debug, Clone)]
pub struct Launch {
    role: Role,
    name: String,
    log_dir: PathBuf,
    args: Vec<String>,
    health_port: u16,
    admin_port: u16,
    netns: Option<String>,
    binary: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl Launch {
    /// A `konduit <role>` named `name` (used for its log file, `<log_dir>/<name>.log`).
    pub fn new(role: Role, name: &str, log_dir: &Path) -> Self {
        Launch {
            role,
            name: name.to_owned(),
            log_dir: log_dir.to_path_buf(),
            args: Vec::new(),
            health_port: 0,
            admin_port: 0,
            netns: None,
            binary: None,
            env: Vec::new(),
        }
    }

    /// Adds command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The health port the process listens on (the caller passes the matching flag);
    /// [`Konduit::wait_ready`] and [`Konduit::get`] use it.
    pub fn health_port(mut self, port: u16) -> Self {
        self.health_port = port;
        self
    }

    /// The admin port the process listens on (for [`Konduit::admin_get`]).
    pub fn admin_port(mut self, port: u16) -> Self {
        self.admin_port = port;
        self
    }

    /// Runs the process inside network namespace `name` (`ip netns exec`); probes then
    /// connect from inside that namespace too.
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// Runs this binary instead of [`konduit_binary`].
    pub fn binary(mut self, path: &Path) -> Self {
        self.binary = Some(path.to_path_buf());
        self
    }

    /// Sets an environment variable for the process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Starts the process. Panics if it cannot be spawned.
    pub fn spawn(self) -> Konduit {
        let binary = self.binary.clone().unwrap_or_else(konduit_binary);
        let log_path = self.log_dir.join(format!("{}.log", self.name));
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        command.arg(self.role.subcommand()).args(&self.args);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let command_line = format!("{:?}", command);
        let log = File::create(&log_path).unwrap_or_else(|e| panic!("create log {}: {e}", log_path.display()));
        {
            use std::io::Write;
            let mut header = &log;
            let _ = writeln!(header, "# {command_line}");
        }
        let stderr = log.try_clone().expect("clone log file handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command_line}: {e}"));
        Konduit {
            role: self.role,
            name: self.name,
            health_port: self.health_port,
            admin_port: self.admin_port,
            netns: self.netns,
            log_path,
            child,
            exit: None,
        }
    }
}

/// A running konduit process; killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct Konduit {
    /// Server or agent.
    pub role: Role,
    /// Name given at launch (log file name).
    pub name: String,
    /// Health port (`/healthz`, `/readyz`, `/metrics`), 0 if unknown.
    pub health_port: u16,
    /// Admin port (`/metrics`), 0 if unknown.
    pub admin_port: u16,
    netns: Option<String>,
    log_path: PathBuf,
    child: Child,
    exit: Option<ExitStatus>,
}

impl Konduit {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file (stdout and stderr together).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn signal(&mut self, signal: Signal) {
        if self.try_exit().is_none() {
            // The pid is ours and not yet reaped, so it cannot name another process.
            let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
        }
    }

    /// SIGTERM: an agent drains, then exits within its grace period.
    pub fn sigterm(&mut self) {
        self.signal(Signal::SIGTERM);
    }

    /// SIGINT: fast exit.
    pub fn sigint(&mut self) {
        self.signal(Signal::SIGINT);
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        if self.exit.is_none() {
            self.exit = self.child.wait().ok();
        }
    }

    /// The exit status if the process has exited (reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn connect(&self, port: u16) -> io::Result<tokio::net::TcpStream> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        match &self.netns {
            Some(ns) => crate::netns::connect_in(ns, addr).await,
            None => tokio::net::TcpStream::connect(addr).await,
        }
    }

    async fn get_on(&self, port: u16, path: &str) -> io::Result<HttpResponse> {
        let exchange = async {
            let stream = self.connect(port).await?;
            http_get_on(stream, &format!("127.0.0.1:{port}"), path).await
        };
        tokio::time::timeout(Duration::from_secs(2), exchange)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("GET :{port}{path} timed out")))?
    }

    /// `GET path` on the health port.
    pub async fn get(&self, path: &str) -> io::Result<HttpResponse> {
        self.get_on(self.health_port, path).await
    }

    /// `GET path` on the admin port.
    pub async fn admin_get(&self, path: &str) -> io::Result<HttpResponse> {
        self.get_on(self.admin_port, path).await
    }

    /// The health port's `/metrics` text (empty if unreachable).
    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.map(|r| r.body).unwrap_or_default()
    }

    /// Polls `/readyz` on the health port until 200. Fails early, with the exit status,
    /// if the process exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        self.wait_status("/readyz", 200, timeout).await
    }

    /// Polls `GET path` on the health port until it answers `status`.
    pub async fn wait_status(&mut self, path: &str, status: u16, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.try_exit() {
                return Err(format!("{} exited ({exit}) before {path} answered {status}", self.name));
            }
            let last = match self.get(path).await {
                Ok(r) if r.status == status => return Ok(()),
                Ok(r) => format!("{} {}", r.status, r.body.trim()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "{}: GET :{}{path} did not answer {status} within {timeout:?}; last: {last}",
                    self.name, self.health_port
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Prints the log to stderr (captured by the test harness, shown on failure).
    pub fn print_log(&self) {
        eprintln!("----- {} log ({}) -----", self.name, self.log_path.display());
        eprintln!("{}", self.log().trim_end());
        eprintln!("----- end of {} log -----", self.name);
    }
}

impl Drop for Konduit {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() || std::env::var_os("KONDUIT_E2E_LOGS").is_some() {
            self.print_log();
        }
    }
}
