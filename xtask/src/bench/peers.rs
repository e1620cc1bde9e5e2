//! Other ways to carry the same traffic, for context (`--peers`): an OpenSSH
//! reverse tunnel and rathole (reverse tunnels like konduit: the node side
//! dials out), haproxy in TCP mode and socat (single relays, no tunnel).
//! Installs what is missing with the machine's package managers, and says
//! which peers were skipped and why. Everything listens on loopback only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use super::deploy::{Deployment, Env, Unavailable, probe, wait_until};
use super::gateway::{Gateway, Targets};
use super::process::{ChildGuard, Ports};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Ssh,
    Rathole,
    Haproxy,
    Socat,
}

impl Peer {
    pub const ALL: [Peer; 4] = [Peer::Ssh, Peer::Rathole, Peer::Haproxy, Peer::Socat];

    pub fn name(self) -> &'static str {
        match self {
            Peer::Ssh => "ssh -R",
            Peer::Rathole => "rathole",
            Peer::Haproxy => "haproxy",
            Peer::Socat => "socat",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Peer::Ssh => "OpenSSH reverse tunnel (ssh -R to an sshd on loopback), default cipher",
            Peer::Rathole => "rathole reverse tunnel, plain TCP transport",
            Peer::Haproxy => "haproxy in TCP mode: a single relay, not a tunnel",
            Peer::Socat => "socat TCP-LISTEN,fork: a single relay forking per connection, not a tunnel",
        }
    }

    /// The most tunnels the memory test holds open through it.
    pub fn max_held(self) -> Option<(usize, &'static str)> {
        match self {
            Peer::Socat => Some((1_000, "socat forks a process per connection")),
            _ => None,
        }
    }
}

/// Where each peer's programs are, or why it is skipped.
pub struct Installed {
    pub sshd: Result<(PathBuf, PathBuf), String>,
    pub rathole: Result<PathBuf, String>,
    pub haproxy: Result<PathBuf, String>,
    pub socat: Result<PathBuf, String>,
}

impl Installed {
    pub fn skipped(&self, peer: Peer) -> Option<&str> {
        match peer {
            Peer::Ssh => self.sshd.as_ref().err(),
            Peer::Rathole => self.rathole.as_ref().err(),
            Peer::Haproxy => self.haproxy.as_ref().err(),
            Peer::Socat => self.socat.as_ref().err(),
        }
        .map(String::as_str)
    }
}

fn find(program: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(program)).chain(extra.iter().map(PathBuf::from)).find(|p| p.is_file())
}

fn run_logged(mut command: Command, log: &Path) -> anyhow::Result<()> {
    let out = std::fs::File::options().create(true).append(true).open(log)?;
    let status = command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("run {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{:?} failed ({status}); see {}", command.get_program(), log.display());
    }
    Ok(())
}

/// Installs the missing peers: Debian packages for OpenSSH, haproxy and socat,
/// `cargo install rathole` for rathole (a few minutes of compiling).
pub fn install(log: &Path, say: &dyn Fn(&str)) -> Installed {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cargo_rathole = format!("{home}/.cargo/bin/rathole");
    let lookup = |log_err: &str| -> Installed {
        let or = |found: Option<PathBuf>, what: &str| found.ok_or_else(|| format!("{what} not installed{log_err}"));
        Installed {
            sshd: or(find("sshd", &["/usr/sbin/sshd"]), "sshd")
                .and_then(|sshd| or(find("ssh", &[]), "ssh").map(|ssh| (sshd, ssh))),
            rathole: or(find("rathole", &[&cargo_rathole]), "rathole"),
            haproxy: or(find("haproxy", &["/usr/sbin/haproxy"]), "haproxy"),
            socat: or(find("socat", &[]), "socat"),
        }
    };
    let before = lookup("");
    let mut packages = Vec::new();
    if before.sshd.is_err() {
        packages.extend(["openssh-server", "openssh-client"]);
    }
    if before.haproxy.is_err() {
        packages.push("haproxy");
    }
    if before.socat.is_err() {
        packages.push("socat");
    }
    let mut apt_error = String::new();
    if !packages.is_empty() {
        say(&format!("installing {} with apt-get", packages.join(" ")));
        if let Err(e) = apt_install(&packages, log) {
            apt_error = format!(" (apt-get install failed: {e:#})");
        }
    }
    let mut cargo_error = String::new();
    if before.rathole.is_err() {
        say("installing rathole with cargo install (compiles for a few minutes)");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        // Not --locked: rathole 0.5.0's lock file pins a `time` that no longer compiles.
        command.args(["install", "rathole"]);
        if let Err(e) = run_logged(command, log) {
            cargo_error = format!(" (cargo install rathole failed: {e:#})");
        }
    }
    let after = lookup(&apt_error);
    Installed { rathole: after.rathole.map_err(|e| format!("{e}{cargo_error}")), ..after }
}

fn apt_install(packages: &[&str], log: &Path) -> anyhow::Result<()> {
    // Package scripts must not start system-wide daemons (sshd on :22, haproxy):
    // the bench starts its own on loopback. policy-rc.d is removed afterwards.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let result = (|| {
        let mut update = Command::new("apt-get");
        update.args(["update", "-q"]);
        run_logged(update, log)?;
        let mut install = Command::new("apt-get");
        install.args(["install", "-y", "-q", "--no-install-recommends"]).args(packages);
        run_logged(install, log)
    })();
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    result
}

/// Loopback ports a peer listens on, one per backend.
fn forwarded(ports: &mut Ports) -> anyhow::Result<Targets> {
    let mut addr = || -> anyhow::Result<SocketAddr> { Ok(SocketAddr::from(([127, 0, 0, 1], ports.take()?))) };
    Ok(Targets { bulk: addr()?, echo: addr()?, one_byte: addr()? })
}

fn pairs(front: &Targets, back: &Targets) -> [(SocketAddr, SocketAddr, &'static str); 3] {
    [(front.bulk, back.bulk, "bulk"), (front.echo, back.echo, "echo"), (front.one_byte, back.one_byte, "onebyte")]
}

/// Starts `peer` and waits until a tunnel through it works; anything that
/// goes wrong makes the peer unavailable (with the reason), not the run fail.
pub async fn start(
    env: &Env<'_>,
    ports: &mut Ports,
    installed: &Installed,
    peer: Peer,
) -> anyhow::Result<Result<Deployment, Unavailable>> {
    if let Some(reason) = installed.skipped(peer) {
        return Ok(Err(reason.to_owned()));
    }
    Ok(start_installed(env, ports, installed, peer).await.unwrap_or_else(|e| Err(format!("{e:#}"))))
}

async fn start_installed(
    env: &Env<'_>,
    ports: &mut Ports,
    installed: &Installed,
    peer: Peer,
) -> anyhow::Result<Result<Deployment, Unavailable>> {
    let front = forwarded(ports)?;
    let back = env.backend_targets();
    // Fresh keys and configs on every start (the memory test restarts each peer).
    let dir = env.scratch.join(peer.name().replace(' ', "_"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = env.log(peer.name());
    let mut deployment = Deployment { gateway: Gateway::Tcp(front), server: vec![], agent: vec![], note: None };
    match peer {
        Peer::Ssh => {
            let (sshd, ssh) = installed.sshd.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
            let keygen = |file: &str| -> anyhow::Result<()> {
                let status = Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(dir.join(file))
                    .stdout(Stdio::null())
                    .status()?;
                anyhow::ensure!(status.success(), "ssh-keygen failed");
                Ok(())
            };
            keygen("host_key")?;
            keygen("client_key")?;
            std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
            let port = ports.take()?;
            let config = format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 AllowTcpForwarding yes\nGatewayPorts no\nMaxStartups 100\nLogLevel ERROR\n",
                d = dir.display()
            );
            std::fs::write(dir.join("sshd_config"), config)?;
            // sshd's privilege-separation directory.
            std::fs::create_dir_all("/run/sshd")?;
            let mut server = Command::new(sshd);
            server.args(["-D", "-e", "-f"]).arg(dir.join("sshd_config"));
            deployment.server.push(ChildGuard::spawn("sshd", server, &log)?);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut client = Command::new(ssh);
            client.args(["-N", "-T", "-p", &port.to_string(), "-i"]).arg(dir.join("client_key")).args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "LogLevel=ERROR",
            ]);
            for (f, b, _) in pairs(&front, &back) {
                client.arg("-R").arg(format!("{f}:{b}"));
            }
            client.arg("root@127.0.0.1");
            deployment.agent.push(ChildGuard::spawn("ssh", client, &log)?);
        }
        Peer::Rathole => {
            let rathole = installed.rathole.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
            let control = ports.take()?;
            let mut server = format!("[server]\nbind_addr = \"127.0.0.1:{control}\"\n");
            let mut client = format!("[client]\nremote_addr = \"127.0.0.1:{control}\"\n");
            for (f, b, name) in pairs(&front, &back) {
                server.push_str(&format!("[server.services.{name}]\ntoken = \"bench\"\nbind_addr = \"{f}\"\n"));
                client.push_str(&format!("[client.services.{name}]\ntoken = \"bench\"\nlocal_addr = \"{b}\"\n"));
            }
            std::fs::write(dir.join("server.toml"), server)?;
            std::fs::write(dir.join("client.toml"), client)?;
            let mut s = Command::new(rathole);
            s.arg("--server").arg(dir.join("server.toml"));
            deployment.server.push(ChildGuard::spawn("rathole server", s, &log)?);
            let mut c = Command::new(rathole);
            c.arg("--client").arg(dir.join("client.toml"));
            deployment.agent.push(ChildGuard::spawn("rathole client", c, &log)?);
        }
        Peer::Haproxy => {
            let haproxy = installed.haproxy.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
            // Two fds per connection must fit the fd limit, or haproxy refuses to start.
            let maxconn = env.fd_limit.saturating_sub(1_000) / 2;
            let mut config = format!(
                "global\n  maxconn {maxconn}\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
                 timeout client 1h\n  timeout server 1h\n"
            );
            for (f, b, name) in pairs(&front, &back) {
                config.push_str(&format!(
                    "frontend {name}\n  bind {f}\n  default_backend {name}_be\nbackend {name}_be\n  server s {b}\n"
                ));
            }
            std::fs::write(dir.join("haproxy.cfg"), config)?;
            let mut command = Command::new(haproxy);
            command.args(["-db", "-f"]).arg(dir.join("haproxy.cfg"));
            deployment.server.push(ChildGuard::spawn("haproxy", command, &log)?);
        }
        Peer::Socat => {
            let socat = installed.socat.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
            for (f, b, name) in pairs(&front, &back) {
                let mut command = Command::new(socat);
                command.args([
                    format!("TCP-LISTEN:{},bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay", f.port()),
                    format!("TCP:{b},nodelay"),
                ]);
                deployment.server.push(ChildGuard::spawn(&format!("socat {name}"), command, &log)?);
            }
        }
    }
    let ready = wait_until(Duration::from_secs(20), &mut deployment, |g| {
        let g = g.clone();
        async move { probe(&g).await.is_ok() }
    })
    .await;
    Ok(match ready {
        Ok(()) => Ok(deployment),
        Err(e) => Err(format!("{e:#}")),
    })
}
