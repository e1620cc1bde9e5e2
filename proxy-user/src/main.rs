//! The `konduit` binary: `konduit server …` / `konduit agent …`, also
//! started as `proxy-server` / `proxy-agent` (argv[0]) so stock manifests
//! run it unchanged.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, bail};
use konduit::config::{self, AgentArgs, ServerArgs};
use konduit::shutdown::{self, Phase};

enum Role {
    Server,
    Agent,
}

fn role_and_args() -> anyhow::Result<(Role, Vec<OsString>)> {
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    let program = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match program.as_str() {
        "proxy-server" => return Ok((Role::Server, argv)),
        "proxy-agent" => return Ok((Role::Agent, argv)),
        _ => {}
    }
    let sub = argv.get(1).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let role = match sub.as_str() {
        "server" | "proxy-server" => Role::Server,
        "agent" | "proxy-agent" => Role::Agent,
        "--version" | "-V" => {
            println!("konduit {}", env!("CARGO_PKG_VERSION"));
            std::process::exit(0);
        }
        _ => bail!(
            "usage: konduit server [flags] | konduit agent [flags]  (or run as proxy-server / proxy-agent); \
             `konduit server --help` lists the flags"
        ),
    };
    // Drop the subcommand so flags parse as they would for proxy-server/proxy-agent.
    let name = if matches!(role, Role::Server) { "proxy-server" } else { "proxy-agent" };
    argv.remove(1);
    argv[0] = OsString::from(name);
    Ok((role, argv))
}

fn main() -> anyhow::Result<()> {
    let (role, argv) = role_and_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start tokio runtime")?;
    runtime.block_on(async move {
        let (trigger, shutdown) = shutdown::channel();
        let result = match role {
            Role::Server => {
                let args: ServerArgs = config::parse_with_file(argv)?;
                args.klog.init_logging();
                shutdown::install_signal_handlers(trigger.clone()).context("install signal handlers")?;
                tokio::select! {
                    r = konduit::server::run(args, shutdown.clone()) => r,
                    // SIGINT: do not wait for anything.
                    _ = shutdown.reached(Phase::Stopping) => Ok(()),
                }
            }
            Role::Agent => {
                let args: AgentArgs = config::parse_with_file(argv)?;
                args.klog.init_logging();
                shutdown::install_signal_handlers(trigger.clone()).context("install signal handlers")?;
                tokio::select! {
                    r = konduit::agent::run(args, shutdown.clone()) => r,
                    _ = shutdown.reached(Phase::Stopping) => Ok(()),
                }
            }
        };
        result.map_err(|e| anyhow::anyhow!(e.chain()))
    })?;
    // Open connections are not waited for: the process is done.
    runtime.shutdown_background();
    Ok(())
}
