//! A stream socket the reactor watches for reading, and for writing only while a writer waits:
//! the Unix transport streams (the stand-in, a VMM's hybrid vsock, macOS' per-port sockets),
//! AF_VSOCK streams (the guest's side of a real VM) and, on Linux, the relays' local TCP
//! connections (`crate::local`).
//!
//! Why not tokio's `UnixStream`: it registers every socket for both readiness kinds, and a Unix
//! stream socket reports "writable" each time its peer reads (the kernel wakes the writer's
//! waiters whenever queued bytes are freed). On a relayed connection that is one more wake-up
//! of the process per message the far side takes — an `epoll_wait` that returns only
//! `EPOLLOUT`, on an interactive connection as often as the messages themselves (a 1-byte round
//! trip through the stand-in woke each relay three times instead of two). Here the socket is
//! registered for reading; a writer that finds it full registers a duplicate of the descriptor
//! for writing, and that registration is dropped again after [`QUIET_WRITES`] writes that did
//! not have to wait (a bulk transfer keeps it, an interactive one sheds it).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, ready};

use socket2::Socket;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::transport::raw::{self, RawStream};

/// Writes in a row that went through without waiting, after which a stream stops watching for
/// writability (until a write has to wait again).
pub const QUIET_WRITES: u32 = 64;

/// Registers `inner` with the reactor for `interest`.
pub(crate) fn register<T: AsRawFd>(inner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its fd, which stays open and unchanged until the `AsyncFd` that
    // takes ownership of `inner` drops it.
    Ok(unsafe { AsyncFd::register_with_interest(inner, interest) }?)
}

/// A connected, non-blocking stream socket (Unix or vsock); see the module's notes.
#[derive(Debug)]
pub struct FdStream {
    read: AsyncFd<Socket>,
    write: WriteWatch,
    family: Family,
}

/// Watching a socket for writability only while a writer waits (see the module's notes): a
/// duplicate of the descriptor registered for writing, from the first write that finds the
/// socket full until [`QUIET_WRITES`] writes in a row have not had to wait. The socket's own
/// registration is for reading only.
///
/// Dropping the registration forgets, without waking, a writer waiting on it (tokio clears the
/// wakers of a registration that goes), so a watch that lets go ([`WriteWatch::default`]) is
/// for a socket with one writer at a time — a stream, written by one direction of one relay.
/// A socket several tasks send on keeps its registration once it has one
/// ([`WriteWatch::kept`]).
#[derive(Debug, Default)]
pub struct WriteWatch {
    watcher: Mutex<Option<AsyncFd<OwnedFd>>>,
    /// Writes since the last one that had to wait.
    quiet: AtomicU32,
    /// Never let the registration go once made.
    keep: bool,
}

impl WriteWatch {
    /// A watch that keeps its registration once made (see the type's notes).
    pub fn kept() -> WriteWatch {
        WriteWatch { keep: true, ..WriteWatch::default() }
    }

    fn watcher(&self) -> std::sync::MutexGuard<'_, Option<AsyncFd<OwnedFd>>> {
        self.watcher.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a write registration is in place now.
    pub fn watching(&self) -> bool {
        self.watcher().is_some()
    }

    /// Runs the non-blocking write `f` on the socket this watches. With a write registration in
    /// place, through it (a `WouldBlock` clears its readiness); without one, straight to the
    /// socket: nothing is watching, so nothing is to be cleared, and the next wait registers
    /// afresh.
    pub fn write_with<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        let mut watcher = self.watcher();
        let mut f = Some(f);
        let mut once = || f.take().map_or_else(|| Err(io::ErrorKind::WouldBlock.into()), |f| f());
        let result = match watcher.as_ref() {
            // Not run by `try_io`: the registration has not seen the socket writable since it
            // last waited. Tried anyway (readiness can lag the socket); a `WouldBlock` then
            // leaves the registration's readiness as it was, so no wake-up is lost.
            Some(w) => match w.try_io(Interest::WRITABLE, |_| once()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => once(),
                r => r,
            },
            None => once(),
        };
        match &result {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.quiet.store(0, Ordering::Relaxed),
            // Counted only while there is a watch to let go of; the count restarts at each
            // `WouldBlock` and when a watch is made.
            _ if self.keep || watcher.is_none() => {}
            _ => {
                if self.quiet.fetch_add(1, Ordering::Relaxed) >= QUIET_WRITES - 1 {
                    *watcher = None;
                }
            }
        }
        result
    }

    /// Ready once `fd` (the socket this watches) is writable; registers for writing first if
    /// nothing is watching.
    pub fn poll_write_ready(&self, fd: BorrowedFd<'_>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut watcher = self.watcher();
        if watcher.is_none() {
            *watcher = Some(register(fd.try_clone_to_owned()?, Interest::WRITABLE)?);
            self.quiet.store(0, Ordering::Relaxed);
        }
        let Some(w) = watcher.as_ref() else { return Poll::Ready(Err(io::ErrorKind::Other.into())) };
        let mut guard = ready!(w.poll_write_ready(cx))?;
        guard.retain_ready();
        Poll::Ready(Ok(()))
    }
}

/// The two families differ in how the relay reads them, by measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// A Unix stream: spliced in bulk, and a short read clears readiness (nothing stops a Unix
    /// stream read short but an empty queue).
    Unix,
    /// AF_VSOCK: moved through a buffer, and read until `EAGAIN`. Measured in the guest of a
    /// real VM (QEMU TCG), against a build that did both as for Unix: Linux splices a vsock
    /// socket by copying into pipe pages (it has no splice of its own), and splicing between
    /// vsock and the guest server's TCP socket cost the guest ~40 % more CPU per MiB from the
    /// desktop and ~20 % more towards it; a short vsock read taken as "drained" cost ~15–20 % more
    /// per MiB from the desktop — by the time the agent has written a read on, the host has
    /// usually sent more, and the reactor's round trip costs more than the read that finds it.
    Vsock,
    /// TCP on Linux (`crate::local`): registered for urgent data too (`EPOLLPRI`), so a short
    /// read of a message (less than `BULK_READ`) clears readiness as for Unix unless urgent
    /// data or the peer's FIN has been reported — a TCP read also stops short at an urgent
    /// mark with bytes queued behind it, and one with the FIN queued is followed by the read
    /// that finds it, so a connection's last bytes and its end go on together. A bulk read
    /// reads on until `EAGAIN`: as for vsock, by the time it has been written on more has
    /// usually arrived (taken for "drained", the buffer gear's relays took 0.96 CPU-s per GiB
    /// instead of 0.78, median of five alternated runs on the stand-in).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    Tcp,
}

/// An [`FdStream::detach`]ed socket: registered with no reactor, on its way to another
/// thread's.
#[derive(Debug)]
pub struct DetachedFd(Socket, Family);

impl FdStream {
    /// Takes a connected, non-blocking socket and registers it for reading.
    pub fn new(socket: Socket) -> io::Result<FdStream> {
        FdStream::of(socket, Family::Unix)
    }

    /// [`FdStream::new`] for an AF_VSOCK socket (see [`Family::Vsock`]).
    pub fn vsock(socket: Socket) -> io::Result<FdStream> {
        FdStream::of(socket, Family::Vsock)
    }

    /// [`FdStream::new`] for a connected TCP socket, also registered for urgent data (see
    /// [`Family::Tcp`]).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub fn tcp(socket: Socket) -> io::Result<FdStream> {
        FdStream::of(socket, Family::Tcp)
    }

    /// `socket` registered for what `family` reads on: urgent data too for TCP.
    fn of(socket: Socket, family: Family) -> io::Result<FdStream> {
        let interest = match family {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Family::Tcp => Interest::READABLE | Interest::PRIORITY,
            _ => Interest::READABLE,
        };
        Ok(FdStream { read: register(socket, interest)?, write: WriteWatch::default(), family })
    }

    /// A connected pair of Unix stream sockets.
    pub fn pair() -> io::Result<(FdStream, FdStream)> {
        let (a, b) = Socket::pair(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
        a.set_nonblocking(true)?;
        b.set_nonblocking(true)?;
        Ok((FdStream::new(a)?, FdStream::new(b)?))
    }

    /// The socket itself (options, addresses).
    pub fn socket(&self) -> &Socket {
        self.read.get_ref()
    }

    /// The socket, registered with no reactor any more (to move it to another thread's):
    /// [`FdStream::attach`] takes it back.
    pub fn detach(self) -> DetachedFd {
        DetachedFd(self.read.into_inner(), self.family)
    }

    /// The socket, registered with no reactor any more, for good.
    pub fn into_socket(self) -> Socket {
        self.read.into_inner()
    }

    /// An [`FdStream::detach`]ed socket, registered with this thread's reactor.
    pub fn attach(DetachedFd(socket, family): DetachedFd) -> io::Result<FdStream> {
        FdStream::of(socket, family)
    }

    /// Urgent data or the peer's FIN has been reported on a TCP stream: a short read may have
    /// stopped at an urgent mark, or left the FIN for the next read.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn urgent_or_closed(&self) -> bool {
        // PRIORITY's readiness includes READ_CLOSED; `Ok` leaves the readiness as it was.
        self.read.try_io(Interest::PRIORITY, |_| Ok(())).is_ok()
    }
}

/// Reads with `read(2)` through `try_io` (the socket's own, for READABLE); a read that comes
/// back short of `buf` clears the reactor's readiness as an empty read would, and its bytes are
/// returned. A stream read stops short when the socket's queue is empty, so the read that would
/// follow — each time a message has been taken, on every interactive connection — could only
/// answer `EAGAIN`. The reactor is edge-triggered (epoll, kqueue): bytes that arrive after the
/// read began raise readiness again, and tokio clears only the readiness it saw before the
/// read. tokio's own `AsyncRead` does the same. `drained(n)` tells whether a short read of `n`
/// bytes is taken for "drained": always for Unix; for TCP, whose reads also stop short at an
/// urgent mark, only a message's, while no urgent data (nor FIN) has been reported
/// ([`Family::Tcp`]).
fn read_clearing_when_short(
    fd: std::os::fd::RawFd,
    buf: &mut [u8],
    try_io: impl FnOnce(&mut dyn FnMut() -> io::Result<usize>) -> io::Result<usize>,
    drained: impl Fn(usize) -> bool,
) -> io::Result<usize> {
    let mut short = None;
    let read = try_io(&mut || {
        // SAFETY: `buf` is valid for `buf.len()` bytes; the socket is non-blocking.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        if n > 0 && n < buf.len() && drained(n) {
            short = Some(n);
            // Drained: tokio clears the readiness on `WouldBlock`; the bytes are kept.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    short.map_or(read, Ok)
}

impl crate::threads::Movable for FdStream {
    type Detached = DetachedFd;
    fn detach(self) -> io::Result<DetachedFd> {
        Ok(FdStream::detach(self))
    }
    fn attach(detached: DetachedFd) -> io::Result<FdStream> {
        FdStream::attach(detached)
    }
}

impl AsFd for FdStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.get_ref().as_fd()
    }
}

impl RawStream for FdStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut guard = ready!(self.read.poll_read_ready(cx))?;
        guard.retain_ready();
        Poll::Ready(Ok(()))
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.write.poll_write_ready(self.read.get_ref().as_fd(), cx)
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.family == Family::Vsock {
            use std::io::Read;
            return self.read.try_io(Interest::READABLE, |mut s| s.read(buf));
        }
        let try_io = |f: &mut dyn FnMut() -> io::Result<usize>| self.read.try_io(Interest::READABLE, |_| f());
        let fd = self.read.get_ref().as_raw_fd();
        match self.family {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Family::Tcp => {
                read_clearing_when_short(fd, buf, try_io, |n| n < raw::BULK_READ && !self.urgent_or_closed())
            }
            _ => read_clearing_when_short(fd, buf, try_io, |_| true),
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.write.write_with(|| raw::write_direct(self, buf))
    }

    fn try_io_raw(
        &self,
        interest: Interest,
        f: &mut dyn FnMut() -> io::Result<usize>,
    ) -> Option<io::Result<usize>> {
        if self.family == Family::Vsock {
            return None;
        }
        Some(if interest.is_writable() {
            self.write.write_with(f)
        } else {
            self.read.try_io(interest, |_| f())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::raw;
    use std::time::Duration;

    /// A short read clears readiness; bytes that arrive afterwards must still wake the reader,
    /// and bytes that arrived with the short read are not lost.
    #[tokio::test]
    async fn a_short_unix_read_clears_readiness_without_losing_a_later_wake() {
        let (a, b) = FdStream::pair().unwrap();
        let (a, b) = (&a, &b);
        let mut buf = [0u8; 64];
        for round in 0..100u8 {
            let sent = [round; 3];
            raw::write_all(a, &sent).await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(10), raw::read(b, &mut buf))
                .await
                .expect("a later write did not wake the reader");
            assert_eq!(buf.get(..n.unwrap()), Some(&sent[..]), "round {round}");
        }
        // A full read (not short) keeps readiness: the rest is read without a new wake.
        raw::write_all(a, &[7u8; 100]).await.unwrap();
        let mut total = 0;
        while total < 100 {
            total +=
                tokio::time::timeout(Duration::from_secs(10), raw::read(b, &mut buf)).await.unwrap().unwrap();
        }
        assert_eq!(total, 100);
    }

    /// An idle stream watches for nothing but reading; a writer that fills the socket waits
    /// for room and gets it when the peer reads; after the quiet writes the watch is gone.
    #[tokio::test]
    async fn a_full_socket_wakes_its_writer_and_the_write_watch_comes_and_goes() {
        let (a, b) = FdStream::pair().unwrap();
        assert!(!a.write.watching(), "a new stream watches only for reading");
        let block = vec![5u8; 64 * 1024];
        let total = 8 << 20;
        let writer = async {
            let mut sent = 0;
            while sent < total {
                raw::write_all(&a, &block).await.unwrap();
                sent += block.len();
            }
            sent
        };
        let reader = async {
            let mut got = 0;
            let mut buf = vec![0u8; 256 * 1024];
            while got < total {
                got += raw::read(&b, &mut buf).await.unwrap();
            }
            got
        };
        let (sent, got) =
            tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(writer, reader) })
                .await
                .expect("the writer or the reader was never woken");
        assert_eq!((sent, got), (total, total));
        assert!(a.write.watching(), "8 MiB through a socket of a few hundred KiB must have waited");
        for _ in 0..QUIET_WRITES {
            raw::write_all(&a, b"x").await.unwrap();
        }
        assert!(!a.write.watching(), "{QUIET_WRITES} writes without waiting drop the write watch");
        let mut buf = [0u8; 128];
        let mut got = 0;
        while got < QUIET_WRITES as usize {
            got += raw::read(&b, &mut buf).await.unwrap();
        }
        assert_eq!(got, QUIET_WRITES as usize);
    }
}
