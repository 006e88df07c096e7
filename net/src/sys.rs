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

/// Accepts a connection on a non-blocking listener; the new socket is non-blocking and
/// close-on-exec (on Linux in the one `accept4(2)`).
#[cfg(unix)]
pub fn accept_nonblocking(listener: &impl std::os::fd::AsRawFd) -> io::Result<Socket> {
    accept_nonblocking_from(listener).map(|(s, _)| s)
}

/// [`accept_nonblocking`], with the peer's address.
#[cfg(unix)]
pub fn accept_nonblocking_from(
    listener: &impl std::os::fd::AsRawFd,
) -> io::Result<(Socket, socket2::SockAddr)> {
    use std::os::fd::FromRawFd;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let fd = listener.as_raw_fd();
        // SAFETY: `try_init` hands a zeroed address buffer and its length, which `accept4`
        // fills in; the descriptor it returns is new and owned by nothing else.
        unsafe {
            socket2::SockAddr::try_init(|addr, len| {
                match libc::accept4(fd, addr.cast(), len, libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) {
                    -1 => Err(io::Error::last_os_error()),
                    new => Ok(Socket::from_raw_fd(new)),
                }
            })
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        // SAFETY: the fd is borrowed for the call only; `ManuallyDrop` never closes it.
        let listener = std::mem::ManuallyDrop::new(unsafe { Socket::from_raw_fd(listener.as_raw_fd()) });
        let (s, peer) = listener.accept()?;
        s.set_nonblocking(true)?;
        Ok((s, peer))
    }
}

/// `poll(2)` of one socket for `events`, without waiting: the events it reports now (0: none).
#[cfg(unix)]
pub fn poll_now(socket: &impl std::os::fd::AsRawFd, events: libc::c_short) -> io::Result<libc::c_short> {
    let mut fd = libc::pollfd { fd: socket.as_raw_fd(), events, revents: 0 };
    // SAFETY: one valid `pollfd` that lives across the call; a zero timeout.
    if unsafe { libc::poll(&raw mut fd, 1, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd.revents)
}

/// Readies a listening socket the way a server's should be on this platform, before `bind`.
///
/// Unix: `SO_REUSEADDR`, so a port whose earlier connections linger in TIME_WAIT can be bound
/// again (it never lets two live sockets share a port there). Windows: **not** `SO_REUSEADDR`,
/// which on Windows lets a socket bind a port another program is using and take its
/// connections; `SO_EXCLUSIVEADDRUSE` instead, so nobody can do that to ours either.
pub fn prepare_listener(socket: &Socket) -> io::Result<()> {
    #[cfg(unix)]
    {
        socket.set_reuse_address(true)
    }
    #[cfg(windows)]
    {
        use std::os::windows::io::AsRawSocket;
        use windows_sys::Win32::Networking::WinSock::{SO_EXCLUSIVEADDRUSE, SOCKET, SOL_SOCKET, setsockopt};
        let on: i32 = 1;
        // SAFETY: a valid socket; `on` lives across the call and its size is passed.
        let r = unsafe {
            setsockopt(
                socket.as_raw_socket() as SOCKET,
                SOL_SOCKET,
                SO_EXCLUSIVEADDRUSE,
                (&raw const on).cast(),
                std::mem::size_of::<i32>() as i32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Readies a UDP socket that serves many peers (the proxy's mirror of a guest UDP port).
///
/// Windows: turns off `SIO_UDP_CONNRESET`. There, an ICMP "port unreachable" for a datagram
/// sent to one peer (a desktop client that went away) makes the socket's next receive fail
/// with `WSAECONNRESET`, which is a fault of one peer, not of the socket every other client
/// shares. Elsewhere a receive never reports another peer's ICMP on an unconnected socket.
pub fn prepare_udp_server(socket: &Socket) -> io::Result<()> {
    #[cfg(windows)]
    {
        use std::os::windows::io::AsRawSocket;
        use windows_sys::Win32::Networking::WinSock::{SIO_UDP_CONNRESET, SOCKET, WSAIoctl};
        let off: u32 = 0;
        let mut returned: u32 = 0;
        // SAFETY: a valid socket; the input buffer is `off`, alive across the call, and its size
        // is passed; no output buffer; a synchronous call (no OVERLAPPED, no routine).
        let r = unsafe {
            WSAIoctl(
                socket.as_raw_socket() as SOCKET,
                SIO_UDP_CONNRESET,
                (&raw const off).cast(),
                std::mem::size_of::<u32>() as u32,
                std::ptr::null_mut(),
                0,
                &raw mut returned,
                std::ptr::null_mut(),
                None,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let _ = socket;
    Ok(())
}
