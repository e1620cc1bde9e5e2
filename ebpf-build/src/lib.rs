//! Builds konduit's kernel half: sets up the toolchain that compiles
//! `proxy-ebpf/` and runs that build, for `proxy-user/build.rs` (so a plain
//! `cargo build` of konduit embeds a current object, also on a fresh clone) and
//! for `cargo xtask`. One implementation, so both use the same command, flags
//! and directories and never undo each other's caches.
//!
//! The eBPF crate needs the nightly with `rust-src` (`-Z build-std=core`) and a
//! `bpf-linker` whose LLVM major is the nightly's. Distribution LLVM is too old,
//! so bpf-linker is built from crates.io against the nightly's own `libLLVM`
//! (SOCKMAP-NOTES, "Toolchain") and stamped with the nightly's commit; a
//! changed nightly rebuilds it. Everything lands under the target directory
//! (`tools/`, `ebpf/`) except the nightly's `rust-src` component. It never
//! installs a toolchain: a missing nightly is an error naming the command.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The rustup toolchain that builds the eBPF crate.
pub const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// bpf-linker 0.13.0 links against LLVM 21–23 (feature `llvm-NN`).
const BPF_LINKER_LLVM_MAJORS: std::ops::RangeInclusive<u32> = 21..=23;
/// The eBPF target and the name of the crate's program binary.
const BPF_TARGET: &str = "bpfel-unknown-none";
const EBPF_BIN: &str = "konduit-ebpf";

/// Where tools and outputs live, all inside one cargo target directory.
#[derive(Debug, Clone)]
pub struct Layout {
    target: PathBuf,
}

impl Layout {
    /// Uses `target` (the workspace's target directory).
    pub fn new(target: impl Into<PathBuf>) -> Self {
        Layout { target: target.into() }
    }

    /// For a build script: the target directory that holds `out_dir` (the
    /// ancestor cargo marked with `CACHEDIR.TAG`), else `fallback`.
    pub fn from_out_dir(out_dir: &Path, fallback: &Path) -> Self {
        let target = out_dir.ancestors().find(|d| d.join("CACHEDIR.TAG").is_file()).unwrap_or(fallback);
        Layout::new(target)
    }

    /// `cargo install --root` of bpf-linker (`bin/bpf-linker`), its stamp and LLVM prefix.
    pub fn tools(&self) -> PathBuf {
        self.target.join("tools")
    }

    pub fn bpf_linker(&self) -> PathBuf {
        self.tools().join("bin").join("bpf-linker")
    }

    fn stamp(&self) -> PathBuf {
        self.tools().join("bpf-linker.stamp")
    }

    fn llvm_prefix(&self) -> PathBuf {
        self.tools().join("llvm")
    }

    /// Target directory of the nested nightly build. Never the workspace's own
    /// profile directories: a build script's cargo would wait on its parent's lock.
    pub fn build_dir(&self) -> PathBuf {
        self.target.join("ebpf")
    }

    /// The object konduit embeds, at a fixed path.
    pub fn object(&self) -> PathBuf {
        self.build_dir().join("konduit-ebpf.o")
    }

    /// Serialises concurrent set-ups and builds (two profiles, two terminals).
    fn lock(&self) -> anyhow::Result<File> {
        fs::create_dir_all(&self.target).with_context(|| format!("creating {}", self.target.display()))?;
        let path = self.target.join("ebpf-build.lock");
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        file.lock().with_context(|| format!("locking {}", path.display()))?;
        Ok(file)
    }
}

/// Who is watching: a terminal (`cargo xtask`: tools print their progress) or
/// cargo running a build script (output captured, shown only on failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Console {
    Terminal,
    BuildScript,
}

impl Console {
    fn note(self, message: &str) {
        match self {
            Console::Terminal => eprintln!("ebpf: {message}"),
            Console::BuildScript => println!("cargo:warning={message}"),
        }
    }

    fn run(self, cmd: &mut Command) -> anyhow::Result<()> {
        match self {
            Console::Terminal => {
                let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
                if !status.success() {
                    bail!("{} failed ({status})", describe(cmd));
                }
            }
            Console::BuildScript => {
                let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
                if !out.status.success() {
                    bail!(
                        "{} failed ({}):\n{}{}",
                        describe(cmd),
                        out.status,
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        Ok(())
    }
}

fn describe(cmd: &Command) -> String {
    let args: Vec<_> = cmd.get_args().map(OsStr::to_string_lossy).collect();
    format!("`{} {}`", cmd.get_program().to_string_lossy(), args.join(" "))
}

/// A command that runs `program` from the nightly, with nothing of the
/// calling cargo's toolchain or build-script environment leaking into it.
fn nightly_command(program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", NIGHTLY, program]);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let leaks = key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("RUSTC")
            || matches!(
                &*key,
                "RUSTUP_TOOLCHAIN"
                    | "RUSTDOC"
                    | "RUSTFLAGS"
                    | "CARGO_ENCODED_RUSTFLAGS"
                    | "CARGO_BUILD_RUSTFLAGS"
                    | "CARGO_TARGET_DIR"
                    | "CARGO_BUILD_TARGET"
                    | "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "OUT_DIR"
                    | "TARGET"
                    | "HOST"
                    | "PROFILE"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "NUM_JOBS"
            );
        if leaks {
            cmd.env_remove(&*key);
        }
    }
    cmd
}

/// The installed nightly, from `rustc -vV` and `--print sysroot`.
struct Nightly {
    commit: String,
    llvm_major: u32,
    sysroot: PathBuf,
}

fn stdout_of(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {}", describe(cmd)))?;
    if !out.status.success() {
        bail!("{} failed ({}): {}", describe(cmd), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly() -> anyhow::Result<Nightly> {
    let missing = || {
        format!(
            "the `{NIGHTLY}` toolchain, which builds konduit's eBPF program, is not usable: \
             run `rustup toolchain install {NIGHTLY} --component rust-src`"
        )
    };
    let vv = stdout_of(nightly_command("rustc").arg("-vV")).with_context(missing)?;
    let field = |name: &str| vv.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned());
    let commit = field("commit-hash:").with_context(missing)?;
    let llvm_major =
        field("LLVM version:").and_then(|v| v.split('.').next().and_then(|m| m.parse().ok())).with_context(missing)?;
    let sysroot = PathBuf::from(stdout_of(nightly_command("rustc").args(["--print", "sysroot"]))?.trim());
    Ok(Nightly { commit, llvm_major, sysroot })
}

fn stamp_text(nightly: &Nightly) -> String {
    format!("bpf-linker {BPF_LINKER_VERSION} llvm-{} nightly {}\n", nightly.llvm_major, nightly.commit)
}

/// Installs what the eBPF build needs unless it is there: the nightly's
/// `rust-src`, and bpf-linker built against the nightly's LLVM (about a
/// minute, once per nightly). Quick when all is in place.
pub fn ensure_toolchain(layout: &Layout, console: Console) -> anyhow::Result<()> {
    let _lock = layout.lock()?;
    ensure_toolchain_locked(layout, console)
}

fn ensure_toolchain_locked(layout: &Layout, console: Console) -> anyhow::Result<()> {
    let nightly = nightly()?;
    let components =
        stdout_of(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        console.note(&format!("adding rust-src to the {NIGHTLY} toolchain"));
        console
            .run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
            .with_context(|| format!("run `rustup component add rust-src --toolchain {NIGHTLY}`"))?;
    }

    if !BPF_LINKER_LLVM_MAJORS.contains(&nightly.llvm_major) {
        bail!(
            "the `{NIGHTLY}` toolchain uses LLVM {}, but bpf-linker {BPF_LINKER_VERSION} supports LLVM {}–{}: \
             install a nightly with a supported LLVM (`rustup toolchain install nightly-YYYY-MM-DD` and point \
             NIGHTLY in ebpf-build/src/lib.rs at it) or move BPF_LINKER_VERSION",
            nightly.llvm_major,
            BPF_LINKER_LLVM_MAJORS.start(),
            BPF_LINKER_LLVM_MAJORS.end()
        );
    }
    let want = stamp_text(&nightly);
    if layout.bpf_linker().is_file() && fs::read_to_string(layout.stamp()).is_ok_and(|s| s == want) {
        return Ok(());
    }
    let _ = fs::remove_file(layout.stamp());
    install_bpf_linker(layout, &nightly, console).with_context(|| {
        format!(
            "could not build bpf-linker into {}; fix the cause above, then run `cargo xtask build-ebpf`",
            layout.tools().display()
        )
    })?;
    fs::write(layout.stamp(), want).context("writing the bpf-linker stamp")?;
    Ok(())
}

/// Builds bpf-linker with no system LLVM: an LLVM "prefix" whose `lib/` holds
/// only symlinks to the nightly's `libLLVM.so.NN…`. bpf-linker's build script
/// links that dynamically and records the prefix's `lib/` as rpath, so the
/// prefix must stay where it is.
fn install_bpf_linker(layout: &Layout, nightly: &Nightly, console: Console) -> anyhow::Result<()> {
    let sys_lib = nightly.sysroot.join("lib");
    let libllvm = fs::read_dir(&sys_lib)
        .with_context(|| format!("listing {}", sys_lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // The library itself is `libLLVM.so.NN.M-rust-…`; `libLLVM-NN-rust-….so` is a linker script.
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", sys_lib.display()))?;
    let prefix_lib = layout.llvm_prefix().join("lib");
    if prefix_lib.exists() {
        fs::remove_dir_all(&prefix_lib).with_context(|| format!("removing {}", prefix_lib.display()))?;
    }
    fs::create_dir_all(&prefix_lib).with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        std::os::unix::fs::symlink(sys_lib.join(&libllvm), prefix_lib.join(name))
            .with_context(|| format!("linking {name} in {}", prefix_lib.display()))?;
    }

    console.note(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the {NIGHTLY}'s LLVM {} into {} (about a minute, once)",
        nightly.llvm_major,
        layout.tools().display()
    ));
    // Built by the stable toolchain that runs us; it only needs the nightly's libLLVM.
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--force"])
        .args(["--no-default-features", "--features", &format!("llvm-{}", nightly.llvm_major)])
        .arg("--root")
        .arg(layout.tools())
        .env("LLVM_PREFIX", layout.llvm_prefix());
    for key in ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "RUSTC_WRAPPER"] {
        cmd.env_remove(key);
    }
    console.run(&mut cmd)
}

/// Sets up the toolchain if needed, builds `proxy-ebpf/` (at `crate_dir`) and
/// returns the object, copied to [`Layout::object`].
pub fn build(layout: &Layout, crate_dir: &Path, console: Console) -> anyhow::Result<PathBuf> {
    let _lock = layout.lock()?;
    ensure_toolchain_locked(layout, console)?;
    // Target, build-std and linker flags live in `proxy-ebpf/.cargo/config.toml`,
    // which cargo reads because it runs in that directory; only the linker's
    // absolute path is added here.
    let mut cmd = nightly_command("cargo");
    cmd.args(["build", "--release"])
        .current_dir(crate_dir)
        .arg("--target-dir")
        .arg(layout.build_dir())
        .arg("--config")
        .arg(format!("target.{BPF_TARGET}.linker={:?}", layout.bpf_linker().display().to_string()));
    console.run(&mut cmd).context("building the eBPF program in proxy-ebpf/")?;
    let built = layout.build_dir().join(BPF_TARGET).join("release").join(EBPF_BIN);
    let object = layout.object();
    fs::copy(&built, &object).with_context(|| format!("copying {} to {}", built.display(), object.display()))?;
    Ok(object)
}
