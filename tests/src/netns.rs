//! Network namespaces for end-to-end topologies (a control-plane namespace
//! and node namespaces joined by veth): creating them with `ip netns`, wiring
//! veth pairs with addresses, running commands and opening sockets inside,
//! and removing everything on drop, also when a test panics. Needs root;
//! without it the guard panics with instructions (tests never silently skip).
//! Never touches the host's own namespace beyond creating and deleting names.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test creates network namespaces and needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN): \
             run it as root, e.g. `sudo -E cargo xtask test`"
        );
    }
}

/// Runs `ip <args>`, panicking with its stderr if it fails.
pub fn ip(args: &[&str]) -> Output {
    let output = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run `ip {}` (is iproute2 installed?): {e}", args.join(" ")));
    if !output.status.success() {
        panic!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    output
}

/// A named network namespace with `lo` up; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `konduit-<pid>-<n>-<tag>` and brings its loopback up. Panics when not root.
    pub fn new(tag: &str) -> Self {
        require_root();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("konduit-{}-{n}-{tag}", std::process::id());
        // A leftover from a crashed run with a recycled pid.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name (for `ip netns exec` and [`crate::process::Launch::netns`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the handle `setns(2)` takes.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <name> <args>`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a fresh thread that has entered the namespace. Sockets created by `f`
    /// stay in the namespace after it returns, so this is how the test process opens
    /// listeners and connections inside.
    pub fn run<R, F>(&self, f: F) -> R
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        run_in(&self.name, f).unwrap_or_else(|e| panic!("enter netns {}: {e}", self.name))
    }

    /// A std listener bound to `addr` inside the namespace (e.g. for a backend).
    pub fn bind(&self, addr: SocketAddr) -> std::net::TcpListener {
        self.run(move || std::net::TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr} in netns: {e}"))
    }

    /// A TCP connection to `addr` opened from inside the namespace.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        connect_in(&self.name, addr).await
    }

    /// Adds `addr` (CIDR form, e.g. `10.1.0.1/24`) to `dev` and brings `dev` up.
    pub fn add_address(&self, dev: &str, addr: &str) {
        self.ip(&["addr", "add", addr, "dev", dev]);
        self.ip(&["link", "set", dev, "up"]);
    }

    /// Adds a route: `ip route add <dest> via <gateway>` inside the namespace.
    pub fn add_route(&self, dest: &str, gateway: &str) {
        self.ip(&["route", "add", dest, "via", gateway]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends inside it.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A veth pair joining two namespaces; removed with the namespaces.
#[derive(Debug, Clone)]
pub struct Veth {
    /// Interface name inside the first namespace.
    pub a: String,
    /// Interface name inside the second namespace.
    pub b: String,
}

impl Veth {
    /// Creates a veth pair with one end in `a` (address `a_addr`, CIDR form) and the other
    /// in `b` (`b_addr`), both up.
    pub fn connect(a: &NetNs, a_addr: &str, b: &NetNs, b_addr: &str) -> Veth {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Interface names are at most 15 bytes and both ends are briefly named on the host.
        let base = format!("kd{:x}{n}", std::process::id() % 0xffff);
        let veth = Veth { a: format!("{base}a"), b: format!("{base}b") };
        ip(&["link", "add", &veth.a, "netns", a.name(), "type", "veth", "peer", "name", &veth.b, "netns", b.name()]);
        a.add_address(&veth.a, a_addr);
        b.add_address(&veth.b, b_addr);
        veth
    }
}

fn run_in<R, F>(name: &str, f: F) -> io::Result<R>
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    let path = PathBuf::from("/run/netns").join(name);
    let handle = std::thread::spawn(move || -> io::Result<R> {
        let file = std::fs::File::open(&path)?;
        // setns(2) moves only this thread, which ends right after `f`.
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        Ok(f())
    });
    handle.join().map_err(|_| io::Error::other("netns thread panicked"))?
}

/// A TCP connection to `addr` opened from inside namespace `name`.
pub async fn connect_in(name: &str, addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let name = name.to_owned();
    let std_stream = tokio::task::spawn_blocking(move || {
        run_in(&name, move || {
            let s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
            s.set_nonblocking(true)?;
            Ok::<_, io::Error>(s)
        })
    })
    .await
    .map_err(io::Error::other)???;
    tokio::net::TcpStream::from_std(std_stream)
}
