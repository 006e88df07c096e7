//! Streams as the relay sees them: readiness plus non-blocking reads and writes through `&self`,
//! so one task can read and write a socket at once without splitting it, and a buffer is only
//! taken once bytes are actually waiting (idle connections hold no buffer).

use std::future::poll_fn;
use std::io;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;

use crate::sys::AsSock;

/// A read this large means a bulk transfer: the relay turns the direction to bulk
/// (`crate::relay::tcp`), and a short TCP read this large is not taken for "drained"
/// (`crate::transport::fd`).
pub const BULK_READ: usize = 32 * 1024;

/// A connected, non-blocking stream socket.
pub trait RawStream: AsSock + Send + Sync {
    /// Ready when a read would not block (data, EOF or an error waiting).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Ready when a write would not block.
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Reads without blocking; `WouldBlock` clears the readiness.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes without blocking; `WouldBlock` clears the readiness.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;

    /// Runs a raw non-blocking operation on this socket's fd (a `splice(2)`); `WouldBlock`
    /// clears the readiness for `interest`. `None` where the stream cannot do that.
    fn try_io_raw(
        &self,
        interest: tokio::io::Interest,
        f: &mut dyn FnMut() -> io::Result<usize>,
    ) -> Option<io::Result<usize>> {
        let _ = (interest, f);
        None
    }

    /// Half-closes: the peer reads EOF, this side can still read.
    fn shutdown_write(&self) -> io::Result<()> {
        SockRef::from(&self.as_sock()).shutdown(std::net::Shutdown::Write)
    }

    /// Arranges for the close of this socket to send a TCP RST (or the transport's abort)
    /// instead of an orderly FIN.
    fn set_reset_on_close(&self) -> io::Result<()> {
        SockRef::from(&self.as_sock()).set_linger(Some(Duration::ZERO))
    }

    /// Whether [`RawStream::rehome`] can move this stream to another thread's reactor (a
    /// [`crate::transport::roaming::Roaming`] stream can).
    fn roams(&self) -> bool {
        false
    }

    /// Registers this stream with the reactor of the thread this runs on, leaving the one it
    /// was registered with; a stream that does not roam stays where it is.
    fn rehome(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Waits until `s` is readable.
pub async fn readable<S: RawStream + ?Sized>(s: &S) -> io::Result<()> {
    poll_fn(|cx| s.poll_read_ready(cx)).await
}

/// Reads at least one byte (or EOF as `0`).
pub fn poll_read<S: RawStream + ?Sized>(
    s: &S,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<io::Result<usize>> {
    loop {
        ready!(s.poll_read_ready(cx))?;
        match s.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return Poll::Ready(other),
        }
    }
}

/// Writes at least one byte.
pub fn poll_write<S: RawStream + ?Sized>(s: &S, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    // Tried first, waited for only when full: a stream may watch for room only while a writer
    // waits (`FdStream`).
    loop {
        match s.try_write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(s.poll_write_ready(cx))?,
            other => return Poll::Ready(other),
        }
    }
}

/// Reads what has already arrived, straight from the socket: the reactor may not have reported
/// it yet (a stream accepted a moment ago usually holds its peer's first bytes already).
/// `WouldBlock` when nothing is there; the reactor's readiness is left as it was.
pub fn read_arrived<S: RawStream + ?Sized>(s: &S, buf: &mut [u8]) -> io::Result<usize> {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: `buf` is valid for `buf.len()` bytes; the socket is non-blocking.
        let n = unsafe { libc::read(s.as_sock().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
    #[cfg(not(unix))]
    {
        s.try_read(buf)
    }
}

/// Writes what the socket takes now, straight to it: a stream connected a moment ago is
/// writable, but the reactor has not said so yet (tokio's `try_write` would answer
/// `WouldBlock` without trying). `WouldBlock` when it takes nothing; readiness is left as it was.
pub fn write_direct<S: RawStream + ?Sized>(s: &S, buf: &[u8]) -> io::Result<usize> {
    // A peer gone is an error, never a signal (Apple sockets have SO_NOSIGPIPE).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let flags = libc::MSG_NOSIGNAL;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let flags = 0;
    SockRef::from(&s.as_sock()).send_with_flags(buf, flags)
}

/// Reads some bytes (`0` at EOF).
pub async fn read<S: RawStream + ?Sized>(s: &S, buf: &mut [u8]) -> io::Result<usize> {
    poll_fn(|cx| poll_read(s, cx, buf)).await
}

/// Writes all of `buf`.
pub async fn write_all<S: RawStream + ?Sized>(s: &S, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = poll_fn(|cx| poll_write(s, cx, buf)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = buf.get(n..).unwrap_or_default();
    }
    Ok(())
}

/// A TCP socket, read until `WouldBlock`: a TCP read also stops short at an urgent mark with
/// bytes queued behind it, so a short read does not mean drained, and clearing readiness there
/// could leave those bytes until the peer sends more (a telnet-style client waiting for an
/// answer). One `EAGAIN` read per message is the price; `net/tests/relay.rs` relays bytes
/// queued behind a mark.
impl RawStream for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::try_read(self, buf)
    }
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, buf)
    }
    fn try_io_raw(
        &self,
        interest: tokio::io::Interest,
        f: &mut dyn FnMut() -> io::Result<usize>,
    ) -> Option<io::Result<usize>> {
        Some(TcpStream::try_io(self, interest, f))
    }
}
