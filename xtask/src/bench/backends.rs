//! The destinations every tunnel dials, served by the bench process itself on
//! loopback: a bulk sink/source (checks or produces the [`Pattern`] stream), an
//! echo server for request/response, and a one-byte server for tunnel set-up.
//! They never speak first (kube-apiserver's rule for tunnelled connections).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

use super::pattern::{Pattern, describe_origins};

/// Size of the request that opens a bulk transfer.
pub const BULK_HEADER_LEN: usize = 24;
const BULK_MAGIC: &[u8; 4] = b"KBN1";
/// Size of the sink's verdict after an upload.
pub const VERDICT_LEN: usize = 9;
/// Chunk size of pattern reads and writes.
pub const CHUNK: usize = 64 * 1024;

/// Which way a bulk transfer's bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → backend (the sink checks every byte).
    Upload,
    /// Backend → client (the client checks every byte).
    Download,
}

/// The request that opens a bulk transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkRequest {
    pub direction: Direction,
    pub len: u64,
    pub seed: u64,
}

impl BulkRequest {
    pub fn encode(&self) -> [u8; BULK_HEADER_LEN] {
        let mut out = [0u8; BULK_HEADER_LEN];
        out[..4].copy_from_slice(BULK_MAGIC);
        out[4] = match self.direction {
            Direction::Upload => 1,
            Direction::Download => 2,
        };
        out[8..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..24].copy_from_slice(&self.seed.to_le_bytes());
        out
    }

    pub fn decode(raw: &[u8; BULK_HEADER_LEN]) -> anyhow::Result<Self> {
        if &raw[..4] != BULK_MAGIC {
            bail!("bulk request has a bad magic {:?}", &raw[..4]);
        }
        let direction = match raw[4] {
            1 => Direction::Upload,
            2 => Direction::Download,
            other => bail!("bulk request has an unknown direction {other}"),
        };
        let word = |r: std::ops::Range<usize>| u64::from_le_bytes(raw[r].try_into().unwrap_or_default());
        Ok(BulkRequest { direction, len: word(8..16), seed: word(16..24) })
    }
}

/// The sink's answer after an upload: every byte matched, or where the first did not.
pub fn encode_verdict(result: Result<(), u64>) -> [u8; VERDICT_LEN] {
    let mut out = [0u8; VERDICT_LEN];
    if let Err(at) = result {
        out[0] = 1;
        out[1..].copy_from_slice(&at.to_le_bytes());
    }
    out
}

pub fn decode_verdict(raw: &[u8; VERDICT_LEN]) -> Result<(), u64> {
    match raw[0] {
        0 => Ok(()),
        _ => Err(u64::from_le_bytes(raw[1..].try_into().unwrap_or_default())),
    }
}

/// Received bytes from the first wrong one on, kept to say where they came from.
#[derive(Default)]
pub struct Evidence {
    start: u64,
    bytes: Vec<u8>,
}

impl Evidence {
    /// Enough to see a repeated or skipped segment and what follows it.
    const KEEP: usize = 4 << 20;

    /// Keeps the part of `chunk` (received at `offset`) from stream offset `bad` on.
    pub fn keep(&mut self, bad: u64, offset: u64, chunk: &[u8]) {
        if self.bytes.is_empty() {
            self.start = bad;
        }
        let skip = usize::try_from(bad.saturating_sub(offset)).unwrap_or(usize::MAX).min(chunk.len());
        let room = Self::KEEP - self.bytes.len();
        let take = &chunk[skip..];
        self.bytes.extend_from_slice(&take[..take.len().min(room)]);
    }

    pub fn is_full(&self) -> bool {
        self.bytes.len() >= Self::KEEP
    }

    /// Where the kept bytes come from in the stream, as one line.
    pub fn describe(&self, pattern: &Pattern) -> String {
        let runs = pattern.origins(self.start, &self.bytes);
        format!("received from {} on: {}", self.start, describe_origins(&runs, 8))
    }
}

/// What upload sinks found wrong, by seed, for the client's error message.
static UPLOAD_EVIDENCE: std::sync::Mutex<Vec<(u64, String)>> = std::sync::Mutex::new(Vec::new());

fn record_upload_evidence(seed: u64, description: String) {
    UPLOAD_EVIDENCE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((seed, description));
}

/// What the sink of the upload with `seed` found about its wrong bytes.
pub fn take_upload_evidence(seed: u64) -> Option<String> {
    let mut all = UPLOAD_EVIDENCE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let at = all.iter().position(|(s, _)| *s == seed)?;
    Some(all.swap_remove(at).1)
}

/// The three servers; dropping this stops them.
pub struct Backends {
    pub bulk: SocketAddr,
    pub echo: SocketAddr,
    pub tunnel: SocketAddr,
    _tasks: JoinSet<()>,
}

fn listen() -> anyhow::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    // Deep enough for 16-way tunnel storms and for opening 10,000 tunnels.
    socket.listen(4096).context("listen on loopback")
}

impl Backends {
    pub async fn start() -> anyhow::Result<Self> {
        let mut tasks = JoinSet::new();
        let bulk = serve(&mut tasks, |s| async move { bulk_session(s).await })?;
        let echo = serve(&mut tasks, |s| async move { echo_session(s).await })?;
        let tunnel = serve(&mut tasks, |s| async move { one_byte_session(s).await })?;
        Ok(Backends { bulk, echo, tunnel, _tasks: tasks })
    }
}

fn serve<F, Fut>(tasks: &mut JoinSet<()>, session: F) -> anyhow::Result<SocketAddr>
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = listen()?;
    let addr = listener.local_addr()?;
    let session = Arc::new(session);
    tasks.spawn(async move {
        let mut sessions = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        let session = session.clone();
                        // A failed session is the client's to notice (it checks every answer).
                        sessions.spawn(async move { let _ = session(stream).await; });
                    }
                    // Out of fds or similar: back off briefly rather than spin.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
    });
    Ok(addr)
}

async fn bulk_session(mut stream: TcpStream) -> anyhow::Result<()> {
    let mut header = [0u8; BULK_HEADER_LEN];
    stream.read_exact(&mut header).await?;
    let request = BulkRequest::decode(&header)?;
    let pattern = Pattern::new(request.seed);
    let mut buf = vec![0u8; CHUNK];
    match request.direction {
        Direction::Upload => {
            let mut offset = 0u64;
            let mut result = Ok(());
            let mut evidence = Evidence::default();
            while offset < request.len {
                let want = (request.len - offset).min(CHUNK as u64) as usize;
                let n = stream.read(&mut buf[..want]).await?;
                if n == 0 {
                    bail!("upload ended after {offset} of {} bytes", request.len);
                }
                if result.is_ok() {
                    result = pattern.verify(offset, &buf[..n]);
                }
                if let Err(bad) = result {
                    evidence.keep(bad, offset, &buf[..n]);
                }
                offset += n as u64;
            }
            if result.is_err() {
                record_upload_evidence(request.seed, evidence.describe(&pattern));
            }
            stream.write_all(&encode_verdict(result)).await?;
        }
        Direction::Download => {
            let mut offset = 0u64;
            while offset < request.len {
                let n = (request.len - offset).min(CHUNK as u64) as usize;
                pattern.fill(offset, &mut buf[..n]);
                stream.write_all(&buf[..n]).await?;
                offset += n as u64;
            }
        }
    }
    // Wait for the client to close, so the client decides when the connection ends.
    while stream.read(&mut buf).await? != 0 {}
    Ok(())
}

async fn echo_session(mut stream: TcpStream) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}

async fn one_byte_session(mut stream: TcpStream) -> anyhow::Result<()> {
    let mut byte = [0u8; 1];
    if stream.read(&mut byte).await? == 0 {
        return Ok(());
    }
    stream.write_all(&byte).await?;
    // Held open (memory test) or closed by the client (tunnel rate test).
    let mut rest = [0u8; 64];
    while stream.read(&mut rest).await? != 0 {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_request_round_trips() {
        let req = BulkRequest { direction: Direction::Download, len: 5 << 30, seed: 0xdead_beef };
        assert_eq!(BulkRequest::decode(&req.encode()).expect("decodes"), req);
        let mut bad = req.encode();
        bad[0] = b'X';
        assert!(BulkRequest::decode(&bad).is_err());
        bad = req.encode();
        bad[4] = 9;
        assert!(BulkRequest::decode(&bad).is_err());
    }

    #[test]
    fn verdict_round_trips() {
        assert_eq!(decode_verdict(&encode_verdict(Ok(()))), Ok(()));
        assert_eq!(decode_verdict(&encode_verdict(Err(123_456))), Err(123_456));
    }
}
