//! AF_VSOCK streams on Linux, through `socket2` and tokio's `AsyncFd`: [`FdStream`]s, as Unix
//! transport streams are.
//!
//! Not `tokio-vsock`: its stream offers no `&self` readiness, which the relay needs to read
//! and write one socket at once and to hold no buffer while idle.

use std::future::poll_fn;
use std::io;

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::transport::fd::{FdStream, register};
use crate::transport::raw::RawStream;

/// Connects to `port` on `cid`; the stream is an [`FdStream`] (see there for how it waits).
pub async fn connect(cid: u32, port: u32) -> io::Result<FdStream> {
    let socket = Socket::new(Domain::VSOCK, Type::STREAM.cloexec(), None)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&SockAddr::vsock(cid, port)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = FdStream::vsock(socket)?;
    poll_fn(|cx| stream.poll_write_ready(cx)).await?;
    if let Some(e) = stream.socket().take_error()? {
        return Err(e);
    }
    Ok(stream)
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
        Ok(VsockListener(register(socket, Interest::READABLE)?))
    }

    pub async fn accept(&self) -> io::Result<(FdStream, String)> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|s| s.get_ref().accept()) {
                Ok(Ok((socket, addr))) => {
                    socket.set_nonblocking(true)?;
                    let peer = match addr.as_vsock_address() {
                        Some((cid, port)) => format!("vsock:{cid}:{port}"),
                        None => "vsock:?".to_owned(),
                    };
                    return Ok((FdStream::vsock(socket)?, peer));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}
