//! Streams that can follow their connection to another relay thread (`crate::threads`): the
//! relay threads move a connection when it turns to bulk, and its sockets must then leave the
//! old thread's reactor for the new one's.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};

use crate::sys::{AsSock, BorrowedSock};
use crate::threads::Movable;
use crate::transport::raw::RawStream;

/// A stream whose registration can follow its connection to another relay thread
/// ([`RawStream::rehome`]): the stream itself behind a lock (taken by its one task, never
/// contended), its socket's handle beside it for [`AsSock`] — the same descriptor on every
/// thread. Should a move lose the socket (the new reactor refused it), the stream answers
/// every call with an error, and its handle becomes a placeholder socket of this process's,
/// so nothing borrows a descriptor that is no longer its.
#[derive(Debug)]
pub struct Roaming<S> {
    held: Mutex<Option<S>>,
    raw: AtomicRaw,
}

#[cfg(unix)]
type AtomicRaw = std::sync::atomic::AtomicI32;
#[cfg(windows)]
type AtomicRaw = std::sync::atomic::AtomicU64;

#[cfg(unix)]
fn raw_of(s: &BorrowedSock<'_>) -> std::os::fd::RawFd {
    std::os::fd::AsRawFd::as_raw_fd(s)
}
#[cfg(windows)]
fn raw_of(s: &BorrowedSock<'_>) -> std::os::windows::io::RawSocket {
    std::os::windows::io::AsRawSocket::as_raw_socket(s)
}

/// An unconnected UDP socket, open for the life of the process: the handle of a [`Roaming`]
/// stream that lost its own. `None` while it cannot be made (then streams do not roam; tried
/// again next time).
fn placeholder() -> Option<&'static socket2::Socket> {
    static PLACEHOLDER: OnceLock<socket2::Socket> = OnceLock::new();
    if let Some(p) = PLACEHOLDER.get() {
        return Some(p);
    }
    let made = crate::sys::new_socket(socket2::Domain::IPV4, socket2::Type::DGRAM).ok()?;
    // Another thread may have set it meanwhile: then this one is closed.
    let _ = PLACEHOLDER.set(made);
    PLACEHOLDER.get()
}

fn lost() -> io::Error {
    io::Error::other("the connection's socket was lost moving to another relay thread")
}

impl<S: Movable + RawStream> Roaming<S> {
    pub fn new(stream: S) -> Roaming<S> {
        let raw = AtomicRaw::new(raw_of(&stream.as_sock()));
        Roaming { held: Mutex::new(Some(stream)), raw }
    }

    /// The stream, registered where its connection runs now; `None` if a move lost it.
    pub fn into_inner(self) -> Option<S> {
        self.held.into_inner().unwrap_or_else(PoisonError::into_inner)
    }

    fn with<R>(&self, f: impl FnOnce(&S) -> R, gone: impl FnOnce() -> R) -> R {
        match &*self.held.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(s) => f(s),
            None => gone(),
        }
    }
}

impl<S: Movable + RawStream> RawStream for Roaming<S> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_read_ready(cx), || Poll::Ready(Err(lost())))
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_write_ready(cx), || Poll::Ready(Err(lost())))
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.with(|s| s.try_read(buf), || Err(lost()))
    }
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.with(|s| s.try_write(buf), || Err(lost()))
    }
    fn try_io_raw(
        &self,
        interest: tokio::io::Interest,
        f: &mut dyn FnMut() -> io::Result<usize>,
    ) -> Option<io::Result<usize>> {
        self.with(|s| s.try_io_raw(interest, f), || Some(Err(lost())))
    }
    fn roams(&self) -> bool {
        placeholder().is_some()
    }
    fn rehome(&self) -> io::Result<()> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(stream) = held.take() else { return Err(lost()) };
        match stream.detach().and_then(S::attach) {
            Ok(stream) => {
                *held = Some(stream);
                Ok(())
            }
            Err(e) => {
                if let Some(p) = placeholder() {
                    self.raw.store(raw_of(&p.as_sock()), Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }
}

#[cfg(unix)]
impl<S> std::os::fd::AsFd for Roaming<S> {
    fn as_fd(&self) -> BorrowedSock<'_> {
        // SAFETY: the descriptor is the stream's, open while it is held (a move keeps it), or
        // once lost the placeholder's, open for the life of the process.
        unsafe { BorrowedSock::borrow_raw(self.raw.load(Ordering::Relaxed)) }
    }
}

#[cfg(windows)]
impl<S> std::os::windows::io::AsSocket for Roaming<S> {
    fn as_socket(&self) -> BorrowedSock<'_> {
        // SAFETY: as on Unix: the stream's socket while it is held, else the placeholder's.
        unsafe { BorrowedSock::borrow_raw(self.raw.load(Ordering::Relaxed)) }
    }
}
