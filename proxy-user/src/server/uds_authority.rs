//! Makes gRPC over a unix socket work for Go clients (kube-apiserver's
//! egress selector): grpc-go sends the percent-encoded socket path as
//! `:authority`, which the `http` crate under h2 rejects as malformed
//! (hyperium/h2#442), resetting every stream. This module sits between the
//! accepted socket and the gRPC server and rewrites an invalid `:authority`
//! in the client's header blocks to `localhost`; every other byte passes
//! unchanged.
//!
//! It owns the HTTP/2 framing and HPACK state of the client-to-server
//! direction of one connection; the server-to-client direction is copied as is.

use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

/// The client connection preface.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Every HTTP/2 peer accepts frames of this size (the protocol minimum for the maximum).
const SAFE_FRAME_LEN: usize = 16_384;
/// Largest header block we buffer (h2's own default header list limit is 16 MiB;
/// gRPC requests carry a few hundred bytes).
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// What an invalid authority becomes (as grpc-go itself now sends for unix sockets).
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("client i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("client did not send the HTTP/2 preface")]
    BadPreface,
    #[error("client header block is malformed: {0}")]
    Malformed(&'static str),
    #[error("client header block cannot be decoded: {0:?}")]
    Hpack(loona_hpack::decoder::DecoderError),
}

/// Re-encodes header blocks with `:authority` made valid.
struct HeaderRewriter<'a> {
    decoder: Decoder<'a>,
    encoder: Encoder<'a>,
}

impl HeaderRewriter<'_> {
    fn new() -> Self {
        HeaderRewriter { decoder: Decoder::new(), encoder: Encoder::new() }
    }

    /// Decodes a whole header block and encodes it again, fixing `:authority`.
    /// Every block is re-encoded (not only the fixed ones) so that the server's
    /// HPACK table follows our encoder rather than the client's.
    fn rewrite(&mut self, block: &[u8]) -> Result<Vec<u8>, RewriteError> {
        let mut headers = self.decoder.decode(block).map_err(RewriteError::Hpack)?;
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                *value = REPLACEMENT_AUTHORITY.to_vec();
            }
        }
        Ok(self.encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice()))))
    }
}

fn frame_header(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; FRAME_HEADER_LEN] {
    let l = (len as u32).to_be_bytes();
    let s = stream.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
}

/// Writes a header block as HEADERS plus CONTINUATION frames.
async fn write_header_block<W: AsyncWrite + Unpin>(
    out: &mut W,
    stream: u32,
    end_stream: bool,
    block: &[u8],
) -> std::io::Result<()> {
    let mut chunks = block.chunks(SAFE_FRAME_LEN).peekable();
    let mut first = true;
    if block.is_empty() {
        let flags = FLAG_END_HEADERS | if end_stream { FLAG_END_STREAM } else { 0 };
        return out.write_all(&frame_header(0, TYPE_HEADERS, flags, stream)).await;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let (kind, mut flags) = if first { (TYPE_HEADERS, 0) } else { (TYPE_CONTINUATION, 0) };
        if first && end_stream {
            flags |= FLAG_END_STREAM;
        }
        if last {
            flags |= FLAG_END_HEADERS;
        }
        out.write_all(&frame_header(chunk.len(), kind, flags, stream)).await?;
        out.write_all(chunk).await?;
        first = false;
    }
    Ok(())
}

/// Strips padding and priority from a HEADERS payload, leaving the block fragment.
fn headers_fragment(flags: u8, payload: &[u8]) -> Result<&[u8], RewriteError> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & FLAG_PADDED != 0 {
        let pad = *payload.first().ok_or(RewriteError::Malformed("padded HEADERS without pad length"))? as usize;
        start = 1;
        end = end.checked_sub(pad).ok_or(RewriteError::Malformed("padding longer than the frame"))?;
    }
    if flags & FLAG_PRIORITY != 0 {
        start += 5;
    }
    payload.get(start..end).ok_or(RewriteError::Malformed("HEADERS frame too short"))
}

/// Copies client → server, rewriting header blocks, until the client closes.
async fn pump_client<R, W>(mut client: R, server: &mut W) -> Result<(), RewriteError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    client.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(RewriteError::BadPreface);
    }
    server.write_all(&preface).await?;
    let mut rewriter = HeaderRewriter::new();
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut payload = Vec::new();
    loop {
        match client.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        if kind != TYPE_HEADERS {
            // Everything else (DATA, SETTINGS, WINDOW_UPDATE, …) passes unchanged.
            server.write_all(&header).await?;
            let copied = tokio::io::copy(&mut (&mut client).take(len as u64), server).await?;
            if copied < len as u64 {
                break;
            }
            continue;
        }
        payload.resize(len, 0);
        client.read_exact(&mut payload).await?;
        let mut block = headers_fragment(flags, &payload)?.to_vec();
        let mut end_headers = flags & FLAG_END_HEADERS != 0;
        while !end_headers {
            client.read_exact(&mut header).await?;
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            if header[3] != TYPE_CONTINUATION {
                return Err(RewriteError::Malformed("HEADERS not followed by CONTINUATION"));
            }
            if block.len() + len > MAX_HEADER_BLOCK {
                return Err(RewriteError::Malformed("header block too large"));
            }
            end_headers = header[4] & FLAG_END_HEADERS != 0;
            let start = block.len();
            block.resize(start + len, 0);
            client.read_exact(&mut block[start..]).await?;
        }
        let rewritten = rewriter.rewrite(&block)?;
        write_header_block(server, stream, flags & FLAG_END_STREAM != 0, &rewritten).await?;
    }
    Ok(())
}

/// Serves one accepted unix-socket connection through the rewriter; returns
/// the end the gRPC server reads.
pub fn wrap<S>(client: S) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    tokio::spawn(async move {
        let (client_read, mut client_write) = tokio::io::split(client);
        let (mut server_read, mut server_write) = tokio::io::split(ours);
        let upstream = async {
            let pumped = pump_client(client_read, &mut server_write).await;
            if pumped.is_ok() {
                // The client finished: let the gRPC server see the end too.
                let _ = server_write.shutdown().await;
            }
            pumped
        };
        let downstream = async {
            let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            let _ = client_write.shutdown().await;
        };
        tokio::pin!(upstream, downstream);
        tokio::select! {
            pumped = &mut upstream => match pumped {
                Ok(()) => downstream.await,
                // Not HTTP/2, or a broken header block: returning drops both
                // sockets, so the client is closed and the gRPC server sees EOF.
                Err(e) => tracing::info!(error = %e, "gRPC frontend connection on the unix socket refused"),
            },
            // The gRPC server closed the connection: nothing more to pass on.
            () = &mut downstream => {}
        }
    });
    theirs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(enc: &mut Encoder<'_>, authority: &[u8]) -> Vec<u8> {
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/ProxyService/Proxy"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
        ];
        enc.encode(headers)
    }

    async fn run(input: Vec<u8>) -> Vec<u8> {
        let mut out = Vec::new();
        pump_client(input.as_slice(), &mut out).await.expect("pumps");
        out
    }

    fn decode_frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut frames = Vec::new();
        let mut rest = &bytes[24..];
        while rest.len() >= FRAME_HEADER_LEN {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            frames.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        frames
    }

    #[tokio::test]
    async fn percent_encoded_socket_path_becomes_localhost_and_hpack_state_stays_consistent() {
        let mut client_encoder = Encoder::new();
        let mut input = PREFACE.to_vec();
        for stream in [1u32, 3] {
            let b = block(&mut client_encoder, b"%2Fetc%2Fkubernetes%2Fk.sock");
            input.extend_from_slice(&frame_header(b.len(), TYPE_HEADERS, FLAG_END_HEADERS, stream));
            input.extend_from_slice(&b);
            input.extend_from_slice(&frame_header(3, 0x0, 0, stream));
            input.extend_from_slice(b"abc");
        }
        let out = run(input).await;
        assert_eq!(&out[..24], PREFACE);
        let frames = decode_frames(&out);
        let mut server_decoder = Decoder::new();
        let mut seen = 0;
        for (kind, flags, stream, payload) in frames {
            if kind == TYPE_HEADERS {
                assert_ne!(flags & FLAG_END_HEADERS, 0);
                let headers = server_decoder.decode(&payload).expect("server decodes");
                let authority = headers.iter().find(|(n, _)| n == b":authority").expect("authority");
                assert_eq!(authority.1, b"localhost");
                assert!(stream == 1 || stream == 3);
                seen += 1;
            } else {
                assert_eq!(payload, b"abc");
            }
        }
        assert_eq!(seen, 2);
    }

    #[tokio::test]
    async fn valid_authority_is_kept_and_continuations_are_joined() {
        let mut client_encoder = Encoder::new();
        let b = block(&mut client_encoder, b"localhost:8090");
        let (first, second) = b.split_at(5);
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame_header(first.len() + 1, TYPE_HEADERS, FLAG_PADDED | FLAG_END_STREAM, 1));
        input.push(0); // pad length 0
        input.extend_from_slice(first);
        input.extend_from_slice(&frame_header(second.len(), TYPE_CONTINUATION, FLAG_END_HEADERS, 1));
        input.extend_from_slice(second);
        let frames = decode_frames(&run(input).await);
        assert_eq!(frames.len(), 1);
        let (kind, flags, _, payload) = &frames[0];
        assert_eq!(*kind, TYPE_HEADERS);
        assert_eq!(*flags, FLAG_END_HEADERS | FLAG_END_STREAM);
        let headers = Decoder::new().decode(payload).expect("decodes");
        assert!(headers.iter().any(|(n, v)| n == b":authority" && v == b"localhost:8090"));
    }

    #[tokio::test]
    async fn garbage_instead_of_a_preface_is_refused() {
        let mut out = Vec::new();
        let err = pump_client(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &mut out).await.expect_err("refused");
        assert!(matches!(err, RewriteError::BadPreface));
        assert!(out.is_empty());
    }
}
