//! Checks of the harness itself, without konduit: if these fail, fix the harness
//! before believing any end-to-end result.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use konduit_e2e::backends::{Backend, KUBELET_BODY};
use konduit_e2e::clients::{fetch_from_source, https_get, tls_connect};
use konduit_e2e::data::{pattern, sha256};
use konduit_e2e::netns::{NetNs, Veth};
use konduit_e2e::ports::free_port;
use konduit_e2e::{Pki, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn pki_identities_complete_mutual_tls_and_the_rogue_client_is_refused() {
    let dir = TempDir::new("harness-pki");
    let pki = Pki::generate(dir.path(), &["10.1.0.1"]);
    for file in ["ca.crt", "server.crt", "server.key", "agent.crt", "frontend.crt", "rogue-ca.crt", "rogue-client.key"]
    {
        assert!(dir.join(file).is_file(), "{file} is written");
    }
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.mtls_server_config(&pki.server)));
    let server = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.expect("accept");
            let outcome = match acceptor.accept(tcp).await {
                Ok(mut tls) => tls.write_all(b"welcome").await.is_ok(),
                Err(_) => false,
            };
            outcomes.push(outcome);
        }
        outcomes
    });
    let mut good = tls_connect(addr, &pki, Some(&pki.frontend), &[]).await.expect("handshake");
    let mut greeting = [0u8; 7];
    good.read_exact(&mut greeting).await.expect("read");
    assert_eq!(&greeting, b"welcome");
    // With TLS 1.3 the client learns of the refusal on its first read.
    let refused = async {
        let mut rogue = tls_connect(addr, &pki, Some(&pki.rogue_client), &[]).await?;
        rogue.read_exact(&mut greeting).await
    };
    assert!(refused.await.is_err(), "a certificate from another CA is refused");
    assert_eq!(server.await.expect("server task"), vec![true, false]);
}

#[tokio::test]
async fn backends_behave_as_documented_over_direct_tcp() {
    let dir = TempDir::new("harness-backends");
    let pki = Pki::generate(dir.path(), &[]);

    let echo = Backend::echo();
    let mut s = TcpStream::connect(echo.addr).await.expect("connect echo");
    s.write_all(b"ping").await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.expect("read");
    assert_eq!(back, b"ping");

    let sink = Backend::sha256_sink();
    let data = pattern(3, 300_000);
    let mut s = TcpStream::connect(sink.addr).await.expect("connect sink");
    s.write_all(&data).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut digest = Vec::new();
    s.read_to_end(&mut digest).await.expect("read");
    assert_eq!(digest, sha256(&data));

    let source = Backend::source();
    let mut s = TcpStream::connect(source.addr).await.expect("connect source");
    fetch_from_source(&mut s, 1_000_003).await.expect("source sends the pattern");

    let kubelet = Backend::https(&pki);
    let s = TcpStream::connect(kubelet.addr).await.expect("connect kubelet");
    let response = https_get(s, &pki, kubelet.addr.ip(), "/").await.expect("HTTPS GET");
    assert_eq!((response.status, response.body.as_str()), (200, KUBELET_BODY));

    let talker = Backend::speaks_first(b"SSH-2.0-banner\r\n");
    let mut s = TcpStream::connect(talker.addr).await.expect("connect");
    let mut banner = [0u8; 16];
    s.read_exact(&mut banner).await.expect("banner arrives unasked");
    assert_eq!(&banner, b"SSH-2.0-banner\r\n");

    assert_eq!(echo.accepted(), 1);
    assert_eq!(sink.accepted(), 1);
}

#[test]
fn free_ports_are_distinct_and_below_the_ephemeral_range() {
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    let mut unique = ports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ports.len());
    assert!(ports.iter().all(|p| (20000..45000).contains(p)));
}

#[tokio::test]
async fn netns_guards_join_namespaces_by_veth_and_remove_them_on_drop() {
    let names;
    {
        let control = NetNs::new("cp");
        let node = NetNs::new("node");
        Veth::connect(&control, "10.201.0.1/24", &node, "10.201.0.2/24");
        names = [control.name().to_owned(), node.name().to_owned()];
        let addr = SocketAddr::from(([10, 201, 0, 2], 8000));
        let echo = Backend::start_on(node.bind(addr), konduit_e2e::backends::Kind::Echo);
        let mut s = control.connect(echo.addr).await.expect("connect across the veth");
        s.write_all(b"across").await.expect("write");
        let mut back = [0u8; 6];
        s.read_exact(&mut back).await.expect("read");
        assert_eq!(&back, b"across");
        // The host namespace cannot reach the node's echo (some sandboxes accept every
        // outgoing connect, so the check is that nothing echoes back).
        let from_host = async {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"x").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.map(|_| b)
        };
        let reached = tokio::time::timeout(std::time::Duration::from_millis(300), from_host).await;
        assert!(!matches!(reached, Ok(Ok([b'x']))), "the host reached the node namespace's echo");
        let addrs = control.command("ip").args(["-o", "addr"]).output().expect("run ip inside");
        let addrs = String::from_utf8_lossy(&addrs.stdout);
        assert!(addrs.contains("10.201.0.1/24"), "commands run inside the namespace:\n{addrs}");
    }
    let list = std::process::Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let list = String::from_utf8_lossy(&list.stdout);
    for name in names {
        assert!(!list.contains(&name), "{name} is removed on drop");
    }
}
