//! The platform boundary for sockets: what differs between Unix (Linux, macOS) and Windows
//! sockets, so the rest of `net` is written once.
//!
//! - [`AsSock`] / [`BorrowedSock`]: a borrowed socket — a file descriptor on Unix, a
//!   `SOCKET` on Windows — which is all the relay, the splice gear and `socket2` need.
//! - [`new_socket`]: a non-blocking, close-on-exec (non-inheritable) socket in one call where
//!   the platform has one (Linux's `SOCK_NONBLOCK | SOCK_CLOEXEC`), two elsewhere.

use std::io;

use socket2::{Domain, Socket, Type};

#[cfg(unix)]
pub use std::os::fd::BorrowedFd as BorrowedSock;
#[cfg(windows)]
pub use std::os::windows::io::BorrowedSocket as BorrowedSock;

/// A type that can lend its socket: [`std::os::fd::AsFd`] on Unix,
/// [`std::os::windows::io::AsSocket`] on Windows, under one name.
pub trait AsSock {
    fn as_sock(&self) -> BorrowedSock<'_>;
}

#[cfg(unix)]
impl<T: std::os::fd::AsFd + ?Sized> AsSock for T {
    fn as_sock(&self) -> BorrowedSock<'_> {
        self.as_fd()
    }
}

#[cfg(windows)]
impl<T: std::os::windows::io::AsSocket + ?Sized> AsSock for T {
    fn as_sock(&self) -> BorrowedSock<'_> {
        self.as_socket()
    }
}

/// A non-blocking socket of `ty` in `domain`, not inherited by child processes.
pub fn new_socket(domain: Domain, ty: Type) -> io::Result<Socket> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        Socket::new(domain, ty.nonblocking().cloexec(), None)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        // socket2 already sets close-on-exec (Unix) / no-inherit (Windows) here, and
        // SO_NOSIGPIPE on Apple platforms.
        let s = Socket::new(domain, ty, None)?;
        s.set_nonblocking(true)?;
        Ok(s)
    }
}
