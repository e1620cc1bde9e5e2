//! Chooses the engine for each spliced connection: the sockmap engine when
//! the eBPF program is loaded and the pair qualifies, the userspace engine
//! otherwise, with the reason counted. Owns the `--dataplane` policy.

use std::sync::Arc;

use tokio::net::TcpStream;

use super::kernel_splice::{self, NotSpliced};
use super::sockmap::SockmapDataplane;
use super::valve::ValveSettings;
use super::{EngineKind, SpliceEngine, SpliceSocket, SpliceStats, UserspaceEngine};
use crate::error::{Error, Result};

/// `--dataplane`: which engine spliced connections use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DataplaneMode {
    /// sockmap when the eBPF program loads, else userspace (with a warning).
    Auto,
    /// sockmap, or refuse to start.
    Sockmap,
    /// Always userspace.
    Userspace,
}

/// Why one connection did not get the sockmap engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The engine is not loaded (mode userspace, or auto without BPF).
    NotLoaded,
    /// The relay is TLS: its bytes are not the tunnelled bytes.
    Encrypted,
    /// The pair did not qualify right now.
    Pair(NotSpliced),
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::NotLoaded => "not_loaded",
            Fallback::Encrypted => "tls_relay",
            Fallback::Pair(p) => p.as_str(),
        }
    }
}

/// The engines of this process.
#[derive(Debug, Clone)]
pub struct Dataplane {
    sockmap: Option<Arc<SockmapDataplane>>,
}

impl Dataplane {
    /// Loads the sockmap engine as `mode` asks, with `valve`'s limits (rule 7).
    pub fn start(mode: DataplaneMode, valve: ValveSettings) -> Result<Self> {
        let sockmap = match mode {
            DataplaneMode::Userspace => None,
            DataplaneMode::Sockmap => Some(Arc::new(
                SockmapDataplane::load_with(valve)
                    .map_err(|e| Error::config("--dataplane=sockmap: the eBPF program did not load").because(e))?,
            )),
            DataplaneMode::Auto => match SockmapDataplane::load_with(valve) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    tracing::warn!(error = %e, "sockmap engine unavailable; spliced connections use the userspace engine");
                    None
                }
            },
        };
        if sockmap.is_some() {
            tracing::info!("sockmap engine loaded: relay sockets are spliced in the kernel");
        }
        Ok(Dataplane { sockmap })
    }

    /// A data plane without the kernel engine (tests, or stock-only peers).
    pub fn userspace() -> Self {
        Dataplane { sockmap: None }
    }

    /// The engine plaintext TCP pairs get.
    pub fn preferred(&self) -> EngineKind {
        if self.sockmap.is_some() { EngineKind::Sockmap } else { EngineKind::Userspace }
    }

    /// The loaded kernel engine, for leak checks and metrics.
    pub fn sockmap(&self) -> Option<&Arc<SockmapDataplane>> {
        self.sockmap.as_ref()
    }

    /// Prepares to join two plaintext TCP sockets: in the kernel when it can
    /// (inserted now, so the caller answers the dial only afterwards), else in
    /// userspace. `backend` enters the map first.
    pub fn prepare(&self, relay: TcpStream, backend: TcpStream) -> PreparedSplice {
        let Some(map) = &self.sockmap else {
            return PreparedSplice::Userspace(relay, backend, Fallback::NotLoaded);
        };
        if let Err(reason) = kernel_splice::spliceable(&relay, &backend) {
            return PreparedSplice::Userspace(relay, backend, Fallback::Pair(reason));
        }
        match kernel_splice::join(map, relay, backend) {
            Ok(joined) => PreparedSplice::Kernel(Box::new(joined)),
            Err((reason, relay, backend)) => PreparedSplice::Userspace(relay, backend, Fallback::Pair(reason)),
        }
    }
}

/// A splice decided and, for the kernel engine, already in the map.
pub enum PreparedSplice {
    Kernel(Box<kernel_splice::Joined<SockmapDataplane>>),
    Userspace(TcpStream, TcpStream, Fallback),
}

impl PreparedSplice {
    pub fn engine(&self) -> EngineKind {
        match self {
            PreparedSplice::Kernel(_) => EngineKind::Sockmap,
            PreparedSplice::Userspace(..) => EngineKind::Userspace,
        }
    }

    pub fn fallback(&self) -> Option<Fallback> {
        match self {
            PreparedSplice::Kernel(_) => None,
            PreparedSplice::Userspace(_, _, f) => Some(*f),
        }
    }

    /// Moves bytes until both directions are done.
    pub async fn run(self) -> SpliceStats {
        match self {
            PreparedSplice::Kernel(joined) => joined.run().await,
            PreparedSplice::Userspace(relay, backend, _) => userspace(Box::new(relay), Box::new(backend)).await,
        }
    }
}

/// Joins any two stream sockets in userspace.
pub async fn userspace(a: Box<dyn SpliceSocket>, b: Box<dyn SpliceSocket>) -> SpliceStats {
    UserspaceEngine.splice(a, b).await
}
