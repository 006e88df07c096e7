//! A program's own IP sockets that can show up in a listener table — listeners and bound UDP
//! sockets — registered where hostnet creates them, so the listener watcher never advertises
//! them: the agent its `tcp:` transport listener and interception sockets, the proxy its
//! mirrors of guest ports (never mirror a mirror) and its UDP flow sockets.
//!
//! The registry is a handle, [`OwnSockets`], that each side makes once and passes to its
//! watcher and to every place that creates such a socket: the proxy and the agent can then run
//! in one process (the in-process tests) without either taking the other's sockets for its
//! own. Each socket is registered right after it is created, before `bind`, so no read of the
//! table can see it unregistered. Learning them instead from `/proc/self/fd` costs one `fstat`
//! per open descriptor for every new listener anywhere — 50 ms per new guest listener for an
//! agent relaying 10 000 connections.
//!
//! Entries go when the watcher's full read no longer shows their socket, some time after it was
//! registered (a socket is registered before it is bound, so a fresh one may not show yet).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hostnet_protocol::Proto;

use crate::discovery::source::Found;

/// How long a registered socket may stay out of the table before its entry goes.
const GRACE: Duration = Duration::from_secs(10);

/// One side's own sockets (see the module). Clones share the registry: make one per proxy or
/// agent and hand clones to everything of that side that creates sockets or reads the tables.
#[derive(Debug, Clone, Default)]
pub struct OwnSockets(Arc<Registry>);

#[derive(Debug, Default)]
struct Registry {
    /// Inode → when it was registered.
    inodes: Mutex<HashMap<u32, Instant>>,
    /// Where the tables give neither inode nor pid (Wine): by protocol and bound address.
    bound: Mutex<Bound>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl OwnSockets {
    /// An empty registry.
    pub fn new() -> Self {
        OwnSockets::default()
    }

    /// A non-blocking, close-on-exec socket of `ty` for `addr`'s family, registered as this
    /// side's own before anything can bind it: how hostnet makes every IP socket it binds.
    pub fn socket(&self, addr: SocketAddr, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
        let s = crate::sys::new_socket(socket2::Domain::for_address(addr), ty)?;
        self.register(&s);
        self.register_address(addr, ty);
        Ok(s)
    }

    /// Registers `socket` as this side's own: call it right after creating an IP socket that
    /// will be bound (before `bind`).
    #[cfg(target_os = "linux")]
    pub fn register<S: std::os::fd::AsRawFd>(&self, socket: &S) {
        if let Some(inode) = socket_inode(socket.as_raw_fd()) {
            lock(&self.0.inodes).insert(inode, Instant::now());
        }
    }

    /// Registers `socket` as this side's own. Listener tables by inode are Linux's; elsewhere
    /// there is nothing to register.
    #[cfg(not(target_os = "linux"))]
    pub fn register<S>(&self, _socket: &S) {}

    /// Whether `inode` is a registered socket of this side.
    pub(crate) fn is_own(&self, inode: u32) -> bool {
        lock(&self.0.inodes).contains_key(&inode)
    }

    /// Forgets the sockets a full read of the tables did not show (`shown` false) and that were
    /// registered more than [`GRACE`] ago: closed ones.
    pub(crate) fn forget_unshown(&self, shown: impl Fn(u32) -> bool) {
        let now = Instant::now();
        lock(&self.0.inodes).retain(|inode, at| shown(*inode) || now.duration_since(*at) < GRACE);
    }

    /// Where the listener tables give no inode (macOS, Windows), a socket of ours is known by
    /// its owning pid; where they give no pid either (Windows under Wine, which reports pid 0
    /// for every socket), by its protocol and the address it is bound to, registered here by
    /// [`OwnSockets::socket`] before the bind (or by [`OwnSockets::register_local`] after it,
    /// for port 0).
    #[cfg(not(target_os = "linux"))]
    fn register_address(&self, addr: SocketAddr, ty: socket2::Type) {
        if addr.port() != 0 {
            lock(&self.0.bound).insert(proto_of(ty), addr, Instant::now());
        }
    }

    #[cfg(target_os = "linux")]
    fn register_address(&self, _addr: SocketAddr, _ty: socket2::Type) {}

    /// Registers a socket that was bound to port 0 by the address it got (see
    /// `register_address`); call it right after the bind. Nothing to do on Linux (the inode,
    /// registered by [`OwnSockets::socket`], tells).
    #[cfg(not(target_os = "linux"))]
    pub fn register_local(&self, socket: &socket2::Socket) {
        if let (Some(addr), Ok(ty)) = (socket.local_addr().ok().and_then(|a| a.as_socket()), socket.r#type())
        {
            self.register_address(addr, ty);
        }
    }

    /// Registers a socket that was bound to port 0; nothing to do on Linux (the inode tells).
    #[cfg(target_os = "linux")]
    pub fn register_local(&self, _socket: &socket2::Socket) {}

    /// Whether `found` is one of this side's sockets: by its owning pid when the table gives
    /// one (macOS, Windows), else by inode (Linux) or by bound address (Wine).
    pub fn is_own_found(&self, found: &Found) -> bool {
        is_own_by(
            found,
            std::process::id(),
            |inode| self.is_own(inode),
            |proto, addr| lock(&self.0.bound).contains(proto, addr),
        )
    }

    /// After a full read of the tables (`shown`: every socket in them): forgets the registered
    /// addresses gone from them.
    pub(crate) fn forget_unshown_addresses(&self, shown: &[Found]) {
        let mut bound = lock(&self.0.bound);
        if bound.0.is_empty() {
            return;
        }
        let shown: std::collections::HashSet<(Proto, SocketAddr)> = shown
            .iter()
            .map(|f| (f.listener.proto, SocketAddr::new(f.listener.addr, f.listener.port)))
            .collect();
        bound.forget_unshown(|proto, addr| shown.contains(&(proto, addr)), Instant::now());
    }
}

/// The inode of a socket descriptor, the one `sock_diag` reports for it; `None` for anything
/// else, or a descriptor not open.
#[cfg(target_os = "linux")]
fn socket_inode(fd: std::os::fd::RawFd) -> Option<u32> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `fstat` writes a whole `stat` on success and only reads the descriptor's number:
    // one that is not open fails with EBADF.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: initialised by the successful `fstat`.
    let st = unsafe { st.assume_init() };
    (st.st_mode & libc::S_IFMT == libc::S_IFSOCK).then(|| u32::try_from(st.st_ino).ok())?
}

#[cfg(not(target_os = "linux"))]
fn proto_of(ty: socket2::Type) -> Proto {
    if ty == socket2::Type::DGRAM { Proto::Udp } else { Proto::Tcp }
}

fn is_own_by(
    found: &Found,
    our_pid: u32,
    by_inode: impl Fn(u32) -> bool,
    by_address: impl Fn(Proto, SocketAddr) -> bool,
) -> bool {
    match found.pid {
        Some(pid) => pid == our_pid,
        None => {
            by_inode(found.inode)
                || by_address(found.listener.proto, SocketAddr::new(found.listener.addr, found.listener.port))
        }
    }
}

/// A side's sockets by (protocol, bound address): when each was registered and whether
/// a read of the tables has shown it since.
#[derive(Debug, Default)]
struct Bound(HashMap<(Proto, SocketAddr), (Instant, bool)>);

impl Bound {
    #[cfg_attr(target_os = "linux", allow(dead_code))]
    fn insert(&mut self, proto: Proto, addr: SocketAddr, now: Instant) {
        self.0.insert((proto, addr), (now, false));
    }

    fn contains(&self, proto: Proto, addr: SocketAddr) -> bool {
        self.0.contains_key(&(proto, addr))
    }

    /// Marks the entries the tables show; forgets the others that were shown before (closed)
    /// or registered more than [`GRACE`] ago (never bound). An address is forgotten as soon as
    /// its socket leaves the tables, so a program that binds it next is not taken for ours.
    fn forget_unshown(&mut self, shown: impl Fn(Proto, SocketAddr) -> bool, now: Instant) {
        self.0.retain(|(proto, addr), (at, seen)| {
            if shown(*proto, *addr) {
                *seen = true;
                return true;
            }
            !*seen && now.duration_since(*at) < GRACE
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostnet_protocol::Listener;

    fn found(proto: Proto, addr: &str, pid: Option<u32>, inode: u32) -> Found {
        let addr: SocketAddr = addr.parse().unwrap();
        Found {
            listener: Listener { proto, addr: addr.ip(), port: addr.port() },
            inode,
            uid: None,
            pid,
            connected: false,
        }
    }

    #[test]
    fn own_by_pid_when_the_table_gives_one_else_by_inode_or_address() {
        let mirror: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let by_inode = |inode| inode == 7;
        let by_address = |proto, addr| proto == Proto::Tcp && addr == mirror;
        let own = |f: &Found| is_own_by(f, 100, by_inode, by_address);
        assert!(own(&found(Proto::Tcp, "127.0.0.1:9", Some(100), 0)), "our pid");
        assert!(
            !own(&found(Proto::Tcp, "127.0.0.1:8000", Some(101), 7)),
            "another pid decides, whatever else matches"
        );
        assert!(own(&found(Proto::Tcp, "127.0.0.1:9", None, 7)), "no pid: our inode");
        assert!(own(&found(Proto::Tcp, "127.0.0.1:8000", None, 0)), "no pid (Wine): our bound address");
        assert!(
            !own(&found(Proto::Udp, "127.0.0.1:8000", None, 0)),
            "the same address in the other protocol"
        );
        assert!(!own(&found(Proto::Tcp, "0.0.0.0:8000", None, 0)), "another address on the same port");
    }

    #[test]
    fn a_registered_address_is_forgotten_once_its_socket_leaves_the_tables() {
        let mut bound = Bound::default();
        let t0 = Instant::now();
        let (mirror, never_bound): (SocketAddr, SocketAddr) =
            ("127.0.0.1:8000".parse().unwrap(), "[::1]:8001".parse().unwrap());
        bound.insert(Proto::Tcp, mirror, t0);
        bound.insert(Proto::Udp, never_bound, t0);
        bound.forget_unshown(|_, _| false, t0 + Duration::from_millis(5));
        assert!(bound.contains(Proto::Tcp, mirror), "not bound yet, within the grace: kept");
        bound.forget_unshown(|p, a| p == Proto::Tcp && a == mirror, t0 + Duration::from_millis(10));
        assert!(bound.contains(Proto::Tcp, mirror), "shown: kept");
        bound.forget_unshown(|_, _| false, t0 + Duration::from_millis(20));
        assert!(!bound.contains(Proto::Tcp, mirror), "shown before, gone now (closed): forgotten at once");
        assert!(bound.contains(Proto::Udp, never_bound), "never shown, still within the grace");
        bound.forget_unshown(|_, _| false, t0 + GRACE);
        assert!(!bound.contains(Proto::Udp, never_bound), "never shown past the grace: forgotten");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_registered_socket_is_own_until_it_is_gone_from_the_tables_past_the_grace() {
        let own = OwnSockets::new();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inode = socket_inode(std::os::fd::AsRawFd::as_raw_fd(&socket)).unwrap();
        assert!(!own.is_own(inode));
        own.register(&socket);
        assert!(own.is_own(inode));
        assert!(!OwnSockets::new().is_own(inode), "another side's registry does not have it");
        own.forget_unshown(|_| false);
        assert!(own.is_own(inode), "within the grace a socket that does not show yet stays");
        lock(&own.0.inodes).insert(inode, Instant::now() - GRACE);
        own.forget_unshown(|i| i == inode);
        assert!(own.is_own(inode), "a socket the tables show stays");
        own.forget_unshown(|_| false);
        assert!(!own.is_own(inode), "gone from the tables past the grace: forgotten");
    }
}
