//! Dialling destinations for the agent: resolution, connect with a deadline,
//! socket options, and error texts in the form stock servers classify
//! (`i/o timeout` → 504, `connection refused` → 502).

use std::time::Duration;

use tokio::net::TcpStream;

/// Dials `address` (`host:port`) over TCP within `timeout`.
pub async fn dial_tcp(protocol: &str, address: &str, timeout: Duration) -> Result<TcpStream, String> {
    if !matches!(protocol, "tcp" | "tcp4" | "tcp6") {
        return Err(format!("dial {protocol} {address}: unknown network {protocol}"));
    }
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Err(_) => Err(format!("dial tcp {address}: i/o timeout")),
        Ok(Err(e)) => Err(format!("dial tcp {address}: {}", describe(&e))),
        Ok(Ok(stream)) => {
            crate::net::tune(&stream);
            Ok(stream)
        }
    }
}

fn describe(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "connect: connection refused".into(),
        K::TimedOut => "i/o timeout".into(),
        K::HostUnreachable => "connect: no route to host".into(),
        K::NetworkUnreachable => "connect: network is unreachable".into(),
        _ if e.raw_os_error() == Some(nix::libc::EMFILE) => "socket: too many open files".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_and_unsupported_dials_say_why_in_stock_words() {
        // Bind then drop to find a port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let err = dial_tcp("tcp", &format!("127.0.0.1:{port}"), Duration::from_secs(1)).await.expect_err("refused");
        assert!(err.ends_with("connect: connection refused"), "{err}");
        let err = dial_tcp("udp", "127.0.0.1:53", Duration::from_secs(1)).await.expect_err("unsupported");
        assert!(err.contains("unknown network"), "{err}");
    }
}
