//! Reads and sets the TCP socket state the kernel data plane steers by:
//! byte counters from `TCP_INFO`, queue depths (`SIOCINQ`/`SIOCOUTQ`),
//! pending errors, the receive buffer, and abortive close. Each
//! syscall sits in a small function with its safety argument; nothing here
//! reads or writes payload bytes.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// Counters of one TCP socket, from `TCP_INFO`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Bytes the peer acknowledged (for an actively opened socket this counts the SYN).
    pub bytes_acked: u64,
    /// Bytes received from the peer (a FIN counts one).
    pub bytes_received: u64,
    /// `TCP_ESTABLISHED` and friends (`libc::TCP_*` state numbers).
    pub state: u8,
}

/// The kernel's ESTABLISHED state number.
pub const TCP_ESTABLISHED: u8 = 1;
/// The kernel's CLOSE state number (after a reset, or fully closed).
pub const TCP_CLOSE: u8 = 7;

pub fn counters(fd: BorrowedFd<'_>) -> io::Result<TcpCounters> {
    // SAFETY: tcp_info is plain old data; zeroed is a valid value, and the
    // kernel writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: fd is a live socket (borrowed); info/len point to owned, sized memory.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &raw mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpCounters {
        bytes_acked: info.tcpi_bytes_acked,
        bytes_received: info.tcpi_bytes_received,
        state: info.tcpi_state,
    })
}

fn ioctl_int(fd: BorrowedFd<'_>, request: libc::c_ulong) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    // SAFETY: both requests used here write one c_int to the pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, &raw mut value) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(value).unwrap_or(0))
}

/// Bytes queued to send and not yet acknowledged (`SIOCOUTQ`).
pub fn unacked_send_queue(fd: BorrowedFd<'_>) -> io::Result<usize> {
    ioctl_int(fd, libc::TIOCOUTQ)
}

/// Bytes waiting to be read (`SIOCINQ`). For a socket in the sockmap this
/// reports only the psock queue (SOCKMAP-NOTES rule 8).
pub fn readable_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    ioctl_int(fd, libc::FIONREAD)
}

/// The pending socket error (`SO_ERROR`), which reading clears.
pub fn take_error(fd: impl AsFd) -> io::Result<Option<io::Error>> {
    nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SocketError)
        .map(|code| (code != 0).then(|| io::Error::from_raw_os_error(code)))
        .map_err(io::Error::from)
}

/// Half-closes the write side (sends FIN once queued data has gone).
pub fn shutdown_write(fd: impl AsFd) -> io::Result<()> {
    nix::sys::socket::shutdown(fd.as_fd().as_raw_fd(), nix::sys::socket::Shutdown::Write).map_err(io::Error::from)
}

/// Makes the next close send RST instead of FIN (propagating an abort).
pub fn abort_on_close(fd: impl AsFd) -> io::Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::Linger, &linger).map_err(io::Error::from)
}

/// Undoes [`abort_on_close`]: the next close sends FIN again.
pub fn close_gracefully(fd: impl AsFd) -> io::Result<()> {
    let linger = libc::linger { l_onoff: 0, l_linger: 0 };
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::Linger, &linger).map_err(io::Error::from)
}

/// Fixes the socket's receive buffer at `bytes` and turns off its autotuning
/// (`SO_RCVBUFFORCE`, which needs CAP_NET_ADMIN; without it `SO_RCVBUF`,
/// which the kernel caps at `net.core.rmem_max`). The kernel doubles what it
/// is given to cover skb overhead, so half of `bytes` is asked for (at most
/// `i32::MAX / 2`, the kernel's own cap: larger values would wrap to a
/// negative `int` and leave the smallest buffer). Returns the buffer the
/// kernel reports afterwards.
pub fn fix_receive_buffer(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<usize> {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let asked = (bytes / 2).min(i32::MAX as usize / 2);
    if setsockopt(&fd, sockopt::RcvBufForce, &asked).is_err() {
        setsockopt(&fd, sockopt::RcvBuf, &asked).map_err(io::Error::from)?;
    }
    getsockopt(&fd, sockopt::RcvBuf).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn counters_and_queues_follow_a_loopback_transfer() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        let before = counters(server.as_fd()).expect("info");
        assert_eq!(before.state, TCP_ESTABLISHED);
        client.write_all(&[7u8; 1000]).expect("write");
        // Wait until the kernel has the bytes on the server side.
        while readable_bytes(server.as_fd()).expect("inq") < 1000 {
            std::thread::yield_now();
        }
        let after = counters(server.as_fd()).expect("info");
        assert_eq!(after.bytes_received - before.bytes_received, 1000);
        let mut buf = [0u8; 1000];
        server.read_exact(&mut buf).expect("read");
        assert_eq!(readable_bytes(server.as_fd()).expect("inq"), 0);
        assert!(unacked_send_queue(client.as_fd()).expect("outq") <= 1000);
        assert!(take_error(&client).expect("so_error").is_none());
        assert_eq!(fix_receive_buffer(server.as_fd(), 256 * 1024).expect("rcvbuf"), 256 * 1024);
        assert!(fix_receive_buffer(client.as_fd(), usize::MAX).expect("rcvbuf") >= 1 << 30, "huge means huge");
        shutdown_write(&client).expect("shutdown");
        assert_eq!(server.read(&mut buf).expect("eof"), 0);
    }

    #[test]
    fn abort_on_close_sends_a_reset() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        abort_on_close(&client).expect("linger");
        drop(client);
        let mut buf = [0u8; 1];
        let err = server.read(&mut buf).expect_err("reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}
