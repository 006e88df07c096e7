//! This process's own IP sockets that can show up in a listener table — listeners and bound
//! UDP sockets — registered where hostnet creates them, so the listener watcher never
//! advertises them: the agent its `tcp:` transport listener and interception sockets, the
//! proxy its mirrors of guest ports (never mirror a mirror) and its UDP flow sockets.
//!
//! Each is registered right after it is created, before `bind`, so no read of the table can
//! see it unregistered. Learning them instead from `/proc/self/fd` costs one `fstat` per open
//! descriptor for every new listener anywhere — 50 ms per new guest listener for an agent
//! relaying 10 000 connections. Builds with debug assertions (the tests') still make that pass
//! and stop at any socket of ours that was not registered.
//!
//! Entries go when the watcher's full read no longer shows their socket, some time after it was
//! registered (a socket is registered before it is bound, so a fresh one may not show yet).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a registered socket may stay out of the table before its entry goes.
const GRACE: Duration = Duration::from_secs(10);

/// Inode → when it was registered.
static OWN: Mutex<Option<HashMap<u32, Instant>>> = Mutex::new(None);

fn with<T>(f: impl FnOnce(&mut HashMap<u32, Instant>) -> T) -> T {
    let mut own = OWN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    f(own.get_or_insert_with(HashMap::new))
}

/// A non-blocking, close-on-exec socket of `ty` for `addr`'s family, registered as this
/// process's own before anything can bind it: how hostnet makes every IP socket it binds.
pub fn socket(addr: std::net::SocketAddr, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    let s = crate::sys::new_socket(socket2::Domain::for_address(addr), ty)?;
    register(&s);
    Ok(s)
}

/// Registers `socket` as this process's own: call it right after creating an IP socket that
/// will be bound (before `bind`).
#[cfg(target_os = "linux")]
pub fn register<S: std::os::fd::AsRawFd>(socket: &S) {
    if let Some(inode) = socket_inode(socket.as_raw_fd()) {
        with(|own| own.insert(inode, Instant::now()));
    }
}

/// Registers `socket` as this process's own. Listener tables by inode are Linux's; elsewhere
/// there is nothing to register.
#[cfg(not(target_os = "linux"))]
pub fn register<S>(_socket: &S) {}

/// The inode of a socket descriptor, the one `sock_diag` reports for it; `None` for anything
/// else, or a descriptor not open.
#[cfg(target_os = "linux")]
pub(crate) fn socket_inode(fd: std::os::fd::RawFd) -> Option<u32> {
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

/// Whether `inode` is a registered socket of this process.
pub(crate) fn is_own(inode: u32) -> bool {
    with(|own| own.contains_key(&inode))
}

/// Forgets the sockets a full read of the tables did not show (`shown` false) and that were
/// registered more than [`GRACE`] ago: closed ones.
pub(crate) fn forget_unshown(shown: impl Fn(u32) -> bool) {
    let now = Instant::now();
    with(|own| own.retain(|inode, at| shown(*inode) || now.duration_since(*at) < GRACE));
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_registered_socket_is_own_until_it_is_gone_from_the_tables_past_the_grace() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inode = socket_inode(std::os::fd::AsRawFd::as_raw_fd(&socket)).unwrap();
        assert!(!is_own(inode));
        register(&socket);
        assert!(is_own(inode));
        forget_unshown(|_| false);
        assert!(is_own(inode), "within the grace a socket that does not show yet stays");
        with(|own| own.insert(inode, Instant::now() - GRACE));
        forget_unshown(|i| i == inode);
        assert!(is_own(inode), "a socket the tables show stays");
        forget_unshown(|_| false);
        assert!(!is_own(inode), "gone from the tables past the grace: forgotten");
    }
}
