//! konduit's one error type: which side of a tunnel failed, what kind of
//! failure it was, and whether trying again can help. Logs and metrics read
//! [`Side`] and [`ErrorKind`] so that every failure names who was at fault.

use std::fmt;

/// The party whose behaviour caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// kube-apiserver or another client of the server's frontends.
    Frontend,
    /// A proxy-agent, seen from the server.
    Agent,
    /// A proxy-server, seen from the agent.
    Server,
    /// The destination an agent dials (kubelet, pod, service).
    Backend,
    /// konduit itself: configuration, local resources.
    Local,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Frontend => "frontend",
            Side::Agent => "agent",
            Side::Server => "server",
            Side::Backend => "backend",
            Side::Local => "local",
        })
    }
}

/// What went wrong, independent of who did it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Reading or writing a socket failed.
    Io,
    /// A TLS handshake or certificate check failed.
    Tls,
    /// A peer sent bytes that break the protocol.
    Protocol,
    /// A deadline passed.
    Timeout,
    /// No agent can serve the dial.
    NoAgent,
    /// A peer refused: dial error, bad credentials.
    Refused,
    /// Configuration is invalid or a file cannot be read.
    Config,
    /// The connection was closed before the operation finished.
    Closed,
}

impl ErrorKind {
    /// Whether the same operation may succeed if tried again later.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorKind::Io | ErrorKind::Timeout | ErrorKind::NoAgent | ErrorKind::Closed)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Io => "i/o error",
            ErrorKind::Tls => "tls error",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::NoAgent => "no agent available",
            ErrorKind::Refused => "refused",
            ErrorKind::Config => "configuration error",
            ErrorKind::Closed => "closed",
        })
    }
}

type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A failure with its side, kind, context and cause chain.
#[derive(Debug, thiserror::Error)]
#[error("{side} {kind}: {context}")]
pub struct Error {
    pub side: Side,
    pub kind: ErrorKind,
    context: String,
    #[source]
    cause: Option<Cause>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(side: Side, kind: ErrorKind, context: impl Into<String>) -> Self {
        Error { side, kind, context: context.into(), cause: None }
    }

    /// Attaches the underlying error.
    pub fn because(mut self, cause: impl Into<Cause>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    pub fn retryable(&self) -> bool {
        self.kind.retryable()
    }

    pub fn context(&self) -> &str {
        &self.context
    }

    /// Configuration errors are always the operator's (local) side.
    pub fn config(context: impl Into<String>) -> Self {
        Error::new(Side::Local, ErrorKind::Config, context)
    }

    /// An I/O failure attributed to `side`, classified as timeout where it is one.
    pub fn io(side: Side, context: impl Into<String>, err: std::io::Error) -> Self {
        let kind = if err.kind() == std::io::ErrorKind::TimedOut { ErrorKind::Timeout } else { ErrorKind::Io };
        Error::new(side, kind, context).because(err)
    }

    /// The message followed by every cause, `a: b: c`, as logs and DIAL_RSP errors carry it.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            out.push_str(": ");
            out.push_str(&s.to_string());
            source = s.source();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_side_kind_and_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline");
        let err = Error::io(Side::Backend, "dial 10.0.0.1:10250", io);
        assert_eq!(err.kind, ErrorKind::Timeout);
        assert!(err.retryable());
        assert_eq!(err.chain(), "backend timeout: dial 10.0.0.1:10250: deadline");
        assert!(!Error::config("bad flag").retryable());
    }
}
