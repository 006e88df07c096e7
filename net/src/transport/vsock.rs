//! AF_VSOCK streams on Linux, through `socket2` and tokio's `AsyncFd`.
//!
//! Not `tokio-vsock`: its stream offers no `&self` readiness, which the relay needs to read
//! and write one socket at once and to hold no buffer while idle.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::task::{Context, Poll, ready};

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::transport::raw::RawStream;

/// Registers a socket with the reactor.
fn register(socket: Socket) -> io::Result<AsyncFd<Socket>> {
    // SAFETY: `socket` owns its fd, which stays open and unchanged until the `AsyncFd` that
    // takes ownership of the `Socket` drops it.
    Ok(unsafe { AsyncFd::register(socket) }?)
}

#[derive(Debug)]
pub struct VsockStream(AsyncFd<Socket>);

impl VsockStream {
    pub async fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let socket = Socket::new(Domain::VSOCK, Type::STREAM.cloexec(), None)?;
        socket.set_nonblocking(true)?;
        match socket.connect(&SockAddr::vsock(cid, port)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let fd = register(socket)?;
        let _ = fd.writable().await?;
        if let Some(e) = fd.get_ref().take_error()? {
            return Err(e);
        }
        Ok(VsockStream(fd))
    }
}

impl AsFd for VsockStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }
}

impl RawStream for VsockStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut guard = ready!(self.0.poll_read_ready(cx))?;
        guard.retain_ready();
        Poll::Ready(Ok(()))
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut guard = ready!(self.0.poll_write_ready(cx))?;
        guard.retain_ready();
        Poll::Ready(Ok(()))
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_io(Interest::READABLE, |mut s: &Socket| s.read(buf))
    }
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_io(Interest::WRITABLE, |mut s: &Socket| s.write(buf))
    }
}

/// A listening AF_VSOCK socket (the agent's side).
#[derive(Debug)]
pub struct VsockListener(AsyncFd<Socket>);

impl VsockListener {
    pub fn bind(cid: u32, port: u32) -> io::Result<Self> {
        let socket = Socket::new(Domain::VSOCK, Type::STREAM.cloexec(), None)?;
        socket.bind(&SockAddr::vsock(cid, port))?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        Ok(VsockListener(register(socket)?))
    }

    pub async fn accept(&self) -> io::Result<(VsockStream, String)> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|s| s.get_ref().accept()) {
                Ok(Ok((socket, addr))) => {
                    socket.set_nonblocking(true)?;
                    let peer = match addr.as_vsock_address() {
                        Some((cid, port)) => format!("vsock:{cid}:{port}"),
                        None => "vsock:?".to_owned(),
                    };
                    return Ok((VsockStream(register(socket)?), peer));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}
