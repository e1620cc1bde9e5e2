//! The HTTP-CONNECT frontend's request parser and response texts. Pure:
//! bytes in, a request or an error out; the server owns the socket.

/// A complete CONNECT request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// `host:port` from the request line.
    pub authority: String,
    /// Bytes the header took; anything after them is tunnel payload.
    pub header_len: usize,
}

/// Why a request header was refused; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("this proxy only supports CONNECT passthrough (got {0})")]
    MethodNotAllowed(String),
    #[error("request header exceeds {0} bytes")]
    TooLarge(usize),
    #[error("malformed request header: {0}")]
    Malformed(String),
}

impl RequestError {
    /// Status line (code and reason phrase) for this error.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            RequestError::MethodNotAllowed(_) => (405, "Method Not Allowed"),
            RequestError::TooLarge(_) => (431, "Request Header Fields Too Large"),
            RequestError::Malformed(_) => (400, "Bad Request"),
        }
    }
}

/// Most headers a CONNECT request may carry.
const MAX_HEADERS: usize = 64;

/// Parses `buf`; `Ok(None)` means the header is not complete yet.
pub fn parse_request(buf: &[u8], max_len: usize) -> Result<Option<ConnectRequest>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = req.parse(buf).map_err(|e| match e {
        httparse::Error::TooManyHeaders => RequestError::TooLarge(max_len),
        other => RequestError::Malformed(other.to_string()),
    })?;
    let header_len = match status {
        httparse::Status::Complete(n) if n <= max_len => n,
        httparse::Status::Complete(_) => return Err(RequestError::TooLarge(max_len)),
        httparse::Status::Partial if buf.len() >= max_len => {
            return Err(RequestError::TooLarge(max_len));
        }
        httparse::Status::Partial => return Ok(None),
    };
    let method = req.method.unwrap_or_default();
    if method != "CONNECT" {
        return Err(RequestError::MethodNotAllowed(method.to_owned()));
    }
    let authority = req.path.unwrap_or_default();
    if !valid_authority(authority) {
        return Err(RequestError::Malformed(format!("CONNECT target {authority:?} is not host:port")));
    }
    Ok(Some(ConnectRequest { authority: authority.to_owned(), header_len }))
}

fn valid_authority(a: &str) -> bool {
    let Some((host, port)) = a.rsplit_once(':') else {
        return false;
    };
    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
}

/// The success reply, exactly as stock sends it.
pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

/// A complete error response with a plain-text body; the connection closes after it.
pub fn error_response(code: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Status for an agent's dial error, classified by its text as stock does.
pub fn dial_error_status(error: &str) -> (u16, &'static str) {
    let lower = error.to_ascii_lowercase();
    if lower.contains("timeout") || lower.contains("deadline exceeded") || lower.contains("timed out") {
        (504, "Gateway Timeout")
    } else if lower.contains("too many open files") {
        (503, "Service Unavailable")
    } else {
        (502, "Bad Gateway")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_connect_request_reports_target_and_header_length() {
        let raw = b"CONNECT 10.0.0.1:10250 HTTP/1.1\r\nHost: 10.0.0.1:10250\r\n\r\nEXTRA";
        let req = parse_request(raw, 1024).expect("valid").expect("complete");
        assert_eq!(req.authority, "10.0.0.1:10250");
        assert_eq!(&raw[req.header_len..], b"EXTRA");
    }

    #[test]
    fn partial_header_waits_and_oversized_header_is_refused() {
        assert_eq!(parse_request(b"CONNECT a:1 HTTP/1.1\r\nHost:", 1024), Ok(None));
        let mut big = b"CONNECT a:1 HTTP/1.1\r\nX-Pad: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 2000));
        assert_eq!(parse_request(&big, 1024), Err(RequestError::TooLarge(1024)));
        assert_eq!(RequestError::TooLarge(1).status().0, 431);
    }

    #[test]
    fn other_methods_and_garbage_are_refused_with_their_status() {
        let get = parse_request(b"GET / HTTP/1.1\r\n\r\n", 1024).expect_err("refused");
        assert_eq!(get.status().0, 405);
        let garbage = parse_request(b"\x16\x03\x01\x02\x00\x01\x00", 1024).expect_err("refused");
        assert_eq!(garbage.status().0, 400);
        let no_port = parse_request(b"CONNECT host HTTP/1.1\r\n\r\n", 1024).expect_err("refused");
        assert_eq!(no_port.status().0, 400);
    }

    #[test]
    fn dial_errors_map_to_stock_statuses() {
        assert_eq!(dial_error_status("dial tcp 1.2.3.4:5: i/o timeout").0, 504);
        assert_eq!(dial_error_status("dial tcp: too many open files").0, 503);
        assert_eq!(dial_error_status("dial tcp 127.0.0.1:1: connect: connection refused").0, 502);
        let resp = String::from_utf8(error_response(502, "Bad Gateway", "boom")).expect("utf8");
        assert!(resp.starts_with("HTTP/1.1 502 Bad Gateway\r\n") && resp.ends_with("\r\n\r\nboom"));
    }
}
