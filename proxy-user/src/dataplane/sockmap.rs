//! The kernel mechanics of the sockmap engine: loads konduit's eBPF program
//! (built from `proxy-ebpf/` and embedded at build time), and puts pairs of
//! established sockets into its SockHash and takes them out again, with a
//! byte counter per direction.
//!
//! It never reads or writes payload (rule 4) and does not decide when a pair
//! is done: watching for EOF and errors, draining, half-close and abort
//! (rules 1, 2) belong to the caller, which removes the pair at the end.
//! Rule numbers are those of SOCKMAP-NOTES.md.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Mutex, PoisonError};

use aya::maps::{HashMap, MapData, MapError, SockHash};
use aya::programs::{ProgramError, SkSkb};
use aya::{Ebpf, EbpfError};
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};

/// The object `build.rs` produced from `proxy-ebpf/`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/konduit-ebpf.o"));

/// Names in the object (proxy-ebpf/src/main.rs).
const PROGRAM: &str = "splice_verdict";
const PEERS_MAP: &str = "PEERS";
const BYTES_MAP: &str = "SPLICED_BYTES";

/// Why the sockmap engine could not load or could not take a pair.
#[derive(Debug, thiserror::Error)]
pub enum SockmapError {
    /// The object did not load (typically: no CAP_BPF/CAP_NET_ADMIN, or a
    /// kernel without sockmap). Connections then use the userspace engine.
    #[error("loading the eBPF object (needs CAP_BPF and CAP_NET_ADMIN): {0}")]
    Load(#[source] Box<EbpfError>),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("loading or attaching the stream verdict: {0}")]
    Program(#[from] ProgramError),
    #[error("reading SO_COOKIE: {0}")]
    Cookie(#[source] io::Error),
    /// Rule 6: only ESTABLISHED sockets can enter the map (one that already
    /// got a FIN is refused). Move this connection in userspace instead.
    #[error("socket is not ESTABLISHED (the kernel refuses it in the sockmap)")]
    NotEstablished,
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> SockmapError {
    move |source| SockmapError::Map { map, source }
}

/// The sockets of one spliced pair, by socket cookie. Returned by
/// [`SockmapDataplane::insert_pair`]; give it back to
/// [`SockmapDataplane::remove_pair`] exactly once.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a pair stays in the map until it is passed to remove_pair"]
pub struct PairHandle {
    a: u64,
    b: u64,
}

impl PairHandle {
    /// Cookie of `a`; its counter holds the bytes moved from `a` to `b`.
    pub fn a_cookie(&self) -> u64 {
        self.a
    }

    /// Cookie of `b`; its counter holds the bytes moved from `b` to `a`.
    pub fn b_cookie(&self) -> u64 {
        self.b
    }
}

/// Bytes the kernel redirected between the sockets of a pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairBytes {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// How many entries the maps hold (both return to zero when every pair is removed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapOccupancy {
    pub sockets: usize,
    pub counters: usize,
}

struct Maps {
    /// Each socket under its peer's cookie (see proxy-ebpf/src/main.rs).
    peers: SockHash<MapData, u64>,
    /// Socket cookie → bytes redirected away from that socket.
    bytes: HashMap<MapData, u64, u64>,
}

/// The loaded program and its maps. Holding it keeps the program attached;
/// dropping it detaches the program (SOCKMAP-NOTES, "Toolchain").
pub struct SockmapDataplane {
    maps: Mutex<Maps>,
    _ebpf: Ebpf,
}

impl std::fmt::Debug for SockmapDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SockmapDataplane").finish_non_exhaustive()
    }
}

impl SockmapDataplane {
    /// Loads the embedded object and attaches its stream verdict to the SockHash.
    pub fn load() -> Result<Self, SockmapError> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(|e| SockmapError::Load(Box::new(e)))?;
        let peers: SockHash<MapData, u64> = ebpf
            .take_map(PEERS_MAP)
            .ok_or(SockmapError::Missing("map PEERS"))?
            .try_into()
            .map_err(map_err(PEERS_MAP))?;
        let bytes: HashMap<MapData, u64, u64> = ebpf
            .take_map(BYTES_MAP)
            .ok_or(SockmapError::Missing("map SPLICED_BYTES"))?
            .try_into()
            .map_err(map_err(BYTES_MAP))?;
        let verdict: &mut SkSkb =
            ebpf.program_mut(PROGRAM).ok_or(SockmapError::Missing("program splice_verdict"))?.try_into()?;
        verdict.load()?;
        verdict.attach(peers.fd())?;
        Ok(SockmapDataplane { maps: Mutex::new(Maps { peers, bytes }), _ebpf: ebpf })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        // A panic while holding the lock leaves the maps consistent: each update is one syscall.
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Joins `a` and `b`: from now on the kernel redirects every byte either
    /// receives to the other. `b` enters the map first, so pass as `b` the side
    /// that does not speak first (the backend): payload `b` received before `a`
    /// is in would find no peer and be dropped. Both sockets must be
    /// ESTABLISHED ([`SockmapError::NotEstablished`] otherwise, rule 6); on any
    /// error nothing stays in the maps and the caller moves the connection in
    /// userspace.
    pub fn insert_pair(&self, a: &impl AsFd, b: &impl AsFd) -> Result<PairHandle, SockmapError> {
        let cookie = |s: &dyn AsFd| socket2::SockRef::from(&s.as_fd()).cookie().map_err(SockmapError::Cookie);
        let pair = PairHandle { a: cookie(a)?, b: cookie(b)? };
        {
            let mut maps = self.maps();
            // Counters exist before the sockets enter the map: the program only adds to existing entries.
            for key in [pair.a, pair.b] {
                if let Err(e) = maps.bytes.insert(key, 0, 0) {
                    remove_all(&mut maps, &pair);
                    return Err(map_err(BYTES_MAP)(e));
                }
            }
            // Each socket goes under its peer's cookie; the backend first.
            for (key, socket) in [(pair.a, b.as_fd()), (pair.b, a.as_fd())] {
                if let Err(e) = maps.peers.insert(key, socket, 0) {
                    remove_all(&mut maps, &pair);
                    return Err(if is_errno(&e, Errno::EOPNOTSUPP) {
                        SockmapError::NotEstablished
                    } else {
                        map_err(PEERS_MAP)(e)
                    });
                }
            }
        }
        // Rule 5: bytes queued before the insert wait until more data arrives,
        // which may never happen (full window). One non-blocking receive makes
        // the kernel run them through the verdict, in order. MSG_PEEK keeps even
        // that call from taking a byte (rule 4); it normally answers EAGAIN.
        // Its other errors (a reset) are left for the caller's watcher.
        for socket in [a.as_fd(), b.as_fd()] {
            let _ = recv(socket.as_raw_fd(), &mut [0u8; 1], MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK);
        }
        Ok(pair)
    }

    /// Separates the pair and forgets its counters; returns the final counts.
    /// Call it once both directions are done (the caller has drained and
    /// half-closed, rules 1–2): bytes a socket receives after this stay on it.
    pub fn remove_pair(&self, pair: PairHandle) -> Result<PairBytes, SockmapError> {
        let mut maps = self.maps();
        let removed = [pair.a, pair.b].map(|key| maps.peers.remove(&key));
        // Read the final counts after the sockets are out, forget the counters whatever happens.
        let counts = [pair.a, pair.b].map(|key| counter(&maps, key));
        remove_all(&mut maps, &pair);
        let [a_to_b, b_to_a] = counts;
        let bytes = PairBytes { a_to_b: a_to_b?, b_to_a: b_to_a? };
        for r in removed {
            // Already gone is fine: the kernel drops a socket's entry when it closes.
            match r {
                Err(e) if !is_errno(&e, Errno::ENOENT) => return Err(map_err(PEERS_MAP)(e)),
                _ => {}
            }
        }
        Ok(bytes)
    }

    /// Bytes redirected away from the socket with this cookie so far (the
    /// direction that starts at it), or `None` if it is not in a pair.
    pub fn bytes(&self, cookie: u64) -> Result<Option<u64>, SockmapError> {
        match self.maps().bytes.get(&cookie, 0) {
            Ok(n) => Ok(Some(n)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(BYTES_MAP)(e)),
        }
    }

    /// Both directions of a pair so far.
    pub fn pair_bytes(&self, pair: &PairHandle) -> Result<PairBytes, SockmapError> {
        let maps = self.maps();
        Ok(PairBytes { a_to_b: counter(&maps, pair.a)?, b_to_a: counter(&maps, pair.b)? })
    }

    /// Entries in the maps, for leak checks.
    pub fn occupancy(&self) -> Result<MapOccupancy, SockmapError> {
        let maps = self.maps();
        let sockets = maps.peers.keys().collect::<Result<Vec<_>, _>>().map_err(map_err(PEERS_MAP))?.len();
        let counters = maps.bytes.keys().collect::<Result<Vec<_>, _>>().map_err(map_err(BYTES_MAP))?.len();
        Ok(MapOccupancy { sockets, counters })
    }
}

/// The map of the sockmap engine ([`super::kernel_splice`]): `b`, the
/// backend side, enters first.
impl super::kernel_splice::PairMap for SockmapDataplane {
    type Pair = PairHandle;

    fn insert(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Result<PairHandle, String> {
        self.insert_pair(&a, &b).map_err(|e| e.to_string())
    }

    fn remove(&self, pair: PairHandle) {
        if let Err(e) = self.remove_pair(pair) {
            tracing::warn!(error = %e, "removing a spliced pair from the sockmap");
        }
    }
}

fn counter(maps: &Maps, cookie: u64) -> Result<u64, SockmapError> {
    match maps.bytes.get(&cookie, 0) {
        Ok(n) => Ok(n),
        Err(MapError::KeyNotFound) => Ok(0),
        Err(e) => Err(map_err(BYTES_MAP)(e)),
    }
}

/// Best-effort removal of every entry of `pair` (rollback and final clean-up).
fn remove_all(maps: &mut Maps, pair: &PairHandle) {
    for key in [pair.a, pair.b] {
        let _ = maps.peers.remove(&key);
        let _ = maps.bytes.remove(&key);
    }
}

fn is_errno(e: &MapError, errno: Errno) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(errno as i32))
}

#[cfg(test)]
mod tests {
    //! Need root (CAP_BPF + CAP_NET_ADMIN); they fail, never skip, without it.

    use super::*;
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    const MIB: usize = 1 << 20;

    fn load() -> SockmapDataplane {
        SockmapDataplane::load().unwrap_or_else(|e| {
            panic!(
                "the sockmap program must load for this test (run as root, kernel with sockmap): {}",
                error_chain(&e)
            )
        })
    }

    fn error_chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            s.push_str(&format!(": {c}"));
            cause = c.source();
        }
        s
    }

    /// A connected loopback pair: (the side that connected, the side that accepted).
    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let connected = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        (connected, accepted)
    }

    /// Deterministic, non-repeating-looking bytes, so a reordering shows in the hash.
    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn send_all(mut s: TcpStream, data: Vec<u8>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || s.write_all(&data).expect("write"))
    }

    fn receive_exactly(mut s: TcpStream, len: usize) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
            let mut got = vec![0u8; len];
            s.read_exact(&mut got).expect("every byte arrives in time");
            got
        })
    }

    fn sha256(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b).into()
    }

    #[test]
    fn sockmap_splices_two_tcp_pairs_byte_exact_both_ways_and_counts_every_byte() {
        let dataplane = load();
        let (client1, relay_a) = tcp_pair();
        let (relay_b, server2) = tcp_pair();
        assert_eq!(dataplane.occupancy().expect("occupancy"), MapOccupancy::default());

        let up = pattern(16 * MIB, 1);
        let down = pattern(16 * MIB, 2);
        // Rule 5: bytes already queued on relay_a when it enters the map must
        // still arrive, first and in order.
        let early = 64 * 1024;
        (&client1).write_all(&up[..early]).expect("early write");
        let deadline = Instant::now() + Duration::from_secs(5);
        while relay_a.peek(&mut vec![0u8; early]).expect("peek") < early {
            assert!(Instant::now() < deadline, "early bytes reached relay_a");
            std::thread::sleep(Duration::from_millis(1));
        }

        let pair = dataplane.insert_pair(&relay_a, &relay_b).expect("insert the pair");
        assert_eq!(dataplane.occupancy().expect("occupancy"), MapOccupancy { sockets: 2, counters: 2 });

        // They arrive with no further traffic to push them (the rule-5 kick).
        let mut at_server = receive_exactly(server2.try_clone().expect("clone"), early).join().expect("early bytes");
        let server_gets = receive_exactly(server2.try_clone().expect("clone"), up.len() - early);
        let client_gets = receive_exactly(client1.try_clone().expect("clone"), down.len());
        let up_sender = send_all(client1.try_clone().expect("clone"), up[early..].to_vec());
        let down_sender = send_all(server2.try_clone().expect("clone"), down.clone());
        up_sender.join().expect("client sends");
        down_sender.join().expect("server sends");
        at_server.extend(server_gets.join().expect("server receives"));
        let at_client = client_gets.join().expect("client receives");
        assert_eq!(sha256(&at_server), sha256(&up), "client → server stream is byte-exact");
        assert_eq!(sha256(&at_client), sha256(&down), "server → client stream is byte-exact");

        let counted = PairBytes { a_to_b: up.len() as u64, b_to_a: down.len() as u64 };
        assert_eq!(dataplane.pair_bytes(&pair).expect("counters"), counted);
        assert_eq!(dataplane.bytes(pair.a_cookie()).expect("counter"), Some(counted.a_to_b));
        assert_eq!(dataplane.remove_pair(pair).expect("remove"), counted);
        assert_eq!(dataplane.occupancy().expect("occupancy"), MapOccupancy::default(), "no entry left");
        drop((relay_a, relay_b, client1, server2));
    }

    #[tokio::test]
    async fn sockmap_engine_half_closes_only_after_every_byte_went_through_the_kernel() {
        use super::super::kernel_splice::{splice, spliceable};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        async fn tokio_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let connected =
                tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
            (connected, listener.accept().await.expect("accept").0)
        }

        let dataplane = std::sync::Arc::new(load());
        let (mut client, a) = tokio_pair().await;
        let (b, mut server) = tokio_pair().await;
        spliceable(&a, &b).expect("fresh pairs are spliceable");
        let map = dataplane.clone();
        let spliced = tokio::spawn(async move { splice(&map, a, b).await });
        while dataplane.occupancy().expect("occupancy").sockets < 2 {
            tokio::task::yield_now().await;
        }
        let up = pattern(8 * MIB, 3);
        client.write_all(&up).await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut at_server = Vec::new();
        server.read_to_end(&mut at_server).await.expect("read to EOF");
        assert_eq!(sha256(&at_server), sha256(&up), "EOF arrives after every byte, in order");
        server.write_all(b"reply after half-close").await.expect("write back");
        server.shutdown().await.expect("close");
        let mut at_client = Vec::new();
        client.read_to_end(&mut at_client).await.expect("read");
        assert_eq!(at_client, b"reply after half-close");
        let stats = spliced.await.expect("joins").map_err(|(reason, _, _)| reason).expect("spliced");
        assert_eq!((stats.a_to_b, stats.b_to_a, stats.error), (up.len() as u64, 22, None));
        assert_eq!(dataplane.occupancy().expect("occupancy"), MapOccupancy::default(), "no entry left");
    }

    #[test]
    fn sockmap_refuses_a_socket_that_got_fin_as_not_established_and_leaves_nothing() {
        let dataplane = load();
        let (client1, relay_a) = tcp_pair();
        let (relay_b, _server2) = tcp_pair();
        client1.shutdown(Shutdown::Write).expect("FIN");
        let deadline = Instant::now() + Duration::from_secs(5);
        // relay_a reads EOF (peek, not read) once the FIN is in: it is in CLOSE_WAIT now.
        while relay_a.peek(&mut [0u8; 1]).expect("peek") != 0 {
            assert!(Instant::now() < deadline);
        }
        // Rule 6: relay_b (the backend side) goes in first and must be rolled back.
        match dataplane.insert_pair(&relay_a, &relay_b) {
            Err(SockmapError::NotEstablished) => {}
            other => panic!("expected NotEstablished, got {other:?}"),
        }
        assert_eq!(dataplane.occupancy().expect("occupancy"), MapOccupancy::default());
    }
}
