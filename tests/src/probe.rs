//! Probing konduit's health and admin ports: a tiny HTTP/1.1 GET over a plain
//! stream (no HTTP client library), readiness polling, and a reader for the
//! Prometheus text format. Read-only: never changes konduit's state.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: status code and body (chunked encoding already removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Response headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body as text (lossy).
    pub body: String,
}

impl HttpResponse {
    /// The first header named `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// `GET path` on `127.0.0.1:port`, with a 2 s bound on the whole exchange.
pub async fn http_get(port: u16, path: &str) -> io::Result<HttpResponse> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let exchange = async {
        let stream = TcpStream::connect(addr).await?;
        http_get_on(stream, &addr.to_string(), path).await
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("GET {addr}{path} timed out")))?
}

/// `GET path` over an already connected stream (e.g. one opened inside a netns).
pub async fn http_get_on<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    host: &str,
    path: &str,
) -> io::Result<HttpResponse> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    parse_response(&raw)
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Parses a complete HTTP/1.1 response (read to EOF).
pub fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad(format!("no header end in {:?}", String::from_utf8_lossy(raw))))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(HttpResponse { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

fn dechunk(mut input: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = input.windows(2).position(|w| w == b"\r\n").ok_or_else(|| bad("truncated chunk size".into()))?;
        let size_text = String::from_utf8_lossy(&input[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad(format!("bad chunk size {size_text:?}")))?;
        input = &input[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if input.len() < size {
            return Err(bad("truncated chunk".into()));
        }
        out.extend_from_slice(&input[..size]);
        input = input.get(size + 2..).unwrap_or_default();
    }
}

/// Polls `GET /readyz` on `127.0.0.1:health_port` until it answers 200. Returns the last
/// answer (or connection error) as the error when `timeout` passes first.
pub async fn wait_ready(health_port: u16, timeout: Duration) -> Result<(), String> {
    wait_status(health_port, "/readyz", 200, timeout).await
}

/// Polls `GET path` until it answers `status`.
pub async fn wait_status(port: u16, path: &str, status: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match http_get(port, path).await {
            Ok(r) if r.status == status => return Ok(()),
            Ok(r) => format!("{} {}", r.status, r.body.trim()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(format!("GET 127.0.0.1:{port}{path} did not answer {status} within {timeout:?}; last: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the sample `name{labels…}` in Prometheus text; `labels` must all match
/// (other labels of the sample are ignored). With several matching samples, their sum.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let matches =
            labels.iter().all(|(k, v)| series_labels.split(',').any(|pair| pair.trim() == format!("{k}=\"{v}\"")));
        if let (true, Ok(v)) = (matches, value.trim().parse::<f64>()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_and_plain_responses() {
        let plain = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").expect("parses");
        assert_eq!((plain.status, plain.body.as_str()), (200, "ok"));
        let chunked = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .expect("parses");
        assert_eq!((chunked.status, chunked.body.as_str()), (503, "abcde"));
    }

    #[test]
    fn reads_samples_with_and_without_labels() {
        let text = "# HELP g gauge\n# TYPE g gauge\ng 3\nc{a=\"x\",b=\"y\"} 2\nc{a=\"z\",b=\"y\"} 5\n";
        assert_eq!(metric(text, "g", &[]), Some(3.0));
        assert_eq!(metric(text, "c", &[("a", "x")]), Some(2.0));
        assert_eq!(metric(text, "c", &[("b", "y")]), Some(7.0));
        assert_eq!(metric(text, "missing", &[]), None);
    }
}
