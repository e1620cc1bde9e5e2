//! konduit's end-to-end harness: everything a test needs to run the real
//! `konduit` binary against real sockets, and nothing that belongs in konduit
//! itself.
//!
//! - [`pki`]: throwaway certificate authorities and certificates on disk.
//! - [`ports`]: free TCP ports below the ephemeral range (konduit refuses > 49151).
//! - [`scratch`]: temporary directories removed on drop.
//! - [`process`]: one running `konduit server|agent`, its log, signals and probes.
//! - [`topology`]: a server plus N agents wired together and ready.
//! - [`backends`]: destinations the agents dial (echo, sinks, sources, HTTPS "kubelet").
//! - [`clients`]: the frontends' side: HTTP-CONNECT and gRPC `/ProxyService/Proxy` clients.
//! - [`data`]: deterministic payloads and hashes for byte-exact checks.
//! - [`probe`]: a tiny HTTP/1.1 GET and a Prometheus text reader for health and metrics ports.
//! - [`netns`]: network namespaces and veth pairs (root only) removed on drop.
//!
//! A test reads like this (see `tests/smoke.rs`):
//!
//! ```no_run
//! use konduit_e2e::{Backend, Frontend, GrpcTunnel, Topology};
//! # async fn example() {
//! let echo = Backend::echo();
//! let topology = Topology::builder(Frontend::GrpcUds).agents(2).start().await;
//! let mut client = topology.grpc().await;
//! let mut tunnel = GrpcTunnel::dial(&mut client, &echo.target()).await.expect("dial");
//! tunnel.write(b"hi").await.expect("write");
//! assert_eq!(tunnel.read_exact(2).await.expect("read"), b"hi");
//! # }
//! ```
//!
//! Environment: `KONDUIT_BIN` picks the binary (default `target/debug/konduit`, which
//! `cargo xtask test` builds); `KONDUIT_E2E_LOGS=1` prints every process log even on
//! success; `KONDUIT_E2E_KEEP=1` keeps the temp dirs (PKI, sockets, logs).
//!
//! Set-up failures panic with a message that says what to do; outcomes a test
//! asserts on (a refused dial, a status code) are returned as values.

pub mod backends;
pub mod clients;
pub mod data;
pub mod netns;
pub mod pki;
pub mod ports;
pub mod probe;
pub mod process;
pub mod scratch;
pub mod topology;

pub use backends::Backend;
pub use clients::{ConnectError, DialError, GrpcTunnel};
pub use pki::{Identity, Pki};
pub use process::{Konduit, Role};
pub use scratch::TempDir;
pub use topology::{Frontend, Topology, TopologyBuilder};
