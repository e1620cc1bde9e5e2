//! konduit's build pipeline: the one entry point for everything beyond a
//! plain `cargo build` (tests with their set-up, the demo, certificates).

mod bench;
mod demo;
mod ebpf;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "konduit build pipeline")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sets up what the tests need, then runs lints and every test (unit, integration, end-to-end).
    Test(test::TestArgs),
    /// Builds konduit, starts two servers with two agents each, and narrates real traffic
    /// through every frontend (curl via HTTPS proxy, gRPC tunnels, a timed bulk transfer).
    Demo(demo::DemoArgs),
    /// Benchmarks direct TCP, every konduit frontend × data plane and (with --peers) other tunnels;
    /// writes results/<timestamp>/.
    Bench(bench::BenchArgs),
    /// Sets up the eBPF toolchain (nightly rust-src, bpf-linker in target/tools) and builds proxy-ebpf.
    BuildEbpf,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Test(args) => test::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BuildEbpf => ebpf::build_ebpf().map(|object| println!("{}", object.display())),
    }
}
