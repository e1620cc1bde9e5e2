//! `cargo xtask build-ebpf` and the eBPF steps of other commands: the
//! toolchain for `proxy-ebpf/` and the build of its object, done by the
//! `konduit-ebpf-build` crate that `proxy-user/build.rs` also uses (so a plain
//! `cargo build` works too; these entry points only make the step explicit and
//! show the tools' progress).

use std::path::PathBuf;

use konduit_ebpf_build::{Console, Layout};

fn layout() -> Layout {
    Layout::new(crate::test::target_dir())
}

/// Installs the nightly's `rust-src` and builds bpf-linker under
/// `target/tools/` unless they are current; errors name the command to run.
pub fn ensure_toolchain() -> anyhow::Result<()> {
    konduit_ebpf_build::ensure_toolchain(&layout(), Console::Terminal)
}

/// Builds the eBPF object (setting up the toolchain first if needed) and
/// returns its path, `target/ebpf/konduit-ebpf.o`.
pub fn build_ebpf() -> anyhow::Result<PathBuf> {
    let crate_dir = crate::test::workspace_root().join("proxy-ebpf");
    konduit_ebpf_build::build(&layout(), &crate_dir, Console::Terminal)
}
