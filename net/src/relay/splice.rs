//! A pipe for moving a bulk transfer's bytes socket → pipe → socket with `splice(2)`, so the
//! relay never copies them through user space. Linux only; elsewhere [`Pipe::new`] fails and
//! the relay copies.

use std::io;
#[cfg(target_os = "linux")]
use std::os::fd::{AsFd, OwnedFd};

#[cfg(target_os = "linux")]
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl};

use crate::sys::BorrowedSock;

/// A non-blocking pipe and how many bytes sit in it.
#[derive(Debug)]
pub struct Pipe {
    #[cfg(target_os = "linux")]
    read: OwnedFd,
    #[cfg(target_os = "linux")]
    write: OwnedFd,
    /// Bytes spliced in and not yet spliced out.
    pub pending: usize,
    #[cfg(target_os = "linux")]
    capacity: usize,
}

impl Pipe {
    /// A pipe of about `capacity` bytes (the kernel may give less).
    #[cfg(target_os = "linux")]
    pub fn new(capacity: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let wanted = libc::c_int::try_from(capacity).unwrap_or(libc::c_int::MAX);
        // Failing (the user's pipe limits) keeps the default 64 KiB.
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(wanted))
            .ok()
            .and_then(|got| usize::try_from(got).ok())
            .unwrap_or(64 * 1024);
        Ok(Pipe { read, write, pending: 0, capacity })
    }

    /// Not available here.
    #[cfg(not(target_os = "linux"))]
    pub fn new(_capacity: usize) -> io::Result<Pipe> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Moves up to `max` bytes (and the pipe's free room) from `from` into the pipe; `Ok(0)`
    /// at EOF.
    #[cfg(target_os = "linux")]
    pub fn fill_from(&mut self, from: BorrowedSock<'_>, max: usize) -> io::Result<usize> {
        let room = self.capacity.saturating_sub(self.pending).max(1).min(max);
        let n = splice(from, &self.write, room)?;
        self.pending += n;
        Ok(n)
    }

    /// Moves what the pipe holds (as much as `to` takes now) out to `to`.
    #[cfg(target_os = "linux")]
    pub fn drain_to(&mut self, to: BorrowedSock<'_>) -> io::Result<usize> {
        let n = splice(&self.read, to, self.pending)?;
        self.pending -= n.min(self.pending);
        Ok(n)
    }

    /// Not available here (no pipe is ever made).
    #[cfg(not(target_os = "linux"))]
    pub fn fill_from(&mut self, _from: BorrowedSock<'_>, _max: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Not available here (no pipe is ever made).
    #[cfg(not(target_os = "linux"))]
    pub fn drain_to(&mut self, _to: BorrowedSock<'_>) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

#[cfg(target_os = "linux")]
fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    Ok(nix::fcntl::splice(from, None, to, None, len, flags)?)
}
