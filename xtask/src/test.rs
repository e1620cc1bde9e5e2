//! `cargo xtask test`: lints, builds the binary the end-to-end tests run,
//! and runs every test in the workspace.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and `cargo clippy` (for quick local iterations).
    #[arg(long)]
    no_lint: bool,
    /// Extra arguments for the test runner (e.g. a test name filter).
    #[arg(trailing_var_arg = true)]
    filter: Vec<String>,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Where cargo puts build output: `CARGO_TARGET_DIR` if set, else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// The release build of the konduit binary (see [`target_dir`]).
pub fn release_binary() -> PathBuf {
    target_dir().join("release/konduit")
}

pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn run(args: TestArgs) -> anyhow::Result<()> {
    if !args.no_lint {
        cargo(&["fmt", "--all", "--", "--check"]).context("formatting differs: run `cargo fmt --all`")?;
        cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    }
    // The eBPF toolchain and object first, with progress shown (build.rs would
    // do the same silently); a toolchain that cannot be set up fails loudly here.
    crate::ebpf::ensure_toolchain()?;
    crate::ebpf::build_ebpf()?;
    // The end-to-end tests run the real binary, built with the test profile's settings.
    cargo(&["build", "--package", "konduit", "--bin", "konduit"])?;
    let mut test_args = vec!["test", "--workspace", "--no-fail-fast"];
    if !args.filter.is_empty() {
        test_args.push("--");
        test_args.extend(args.filter.iter().map(String::as_str));
    }
    cargo(&test_args)
}
