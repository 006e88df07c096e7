//! A pipe for moving a bulk transfer's bytes socket → pipe → socket with `splice(2)`, so the
//! relay never copies them through user space. Linux only; elsewhere [`Pipe::new`] fails and
//! the relay copies.

use std::io;
#[cfg(target_os = "linux")]
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both are open descriptors owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let wanted = libc::c_int::try_from(capacity).unwrap_or(libc::c_int::MAX);
        // SAFETY: a valid pipe fd; F_SETPIPE_SZ takes an int. Failing (limits) keeps 64 KiB.
        let got = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, wanted) };
        let capacity = usize::try_from(got).unwrap_or(64 * 1024);
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
        let n = splice(from.as_raw_fd(), self.write.as_raw_fd(), room)?;
        self.pending += n;
        Ok(n)
    }

    /// Moves what the pipe holds (as much as `to` takes now) out to `to`.
    #[cfg(target_os = "linux")]
    pub fn drain_to(&mut self, to: BorrowedSock<'_>) -> io::Result<usize> {
        let n = splice(self.read.as_raw_fd(), to.as_raw_fd(), self.pending)?;
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
fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors, no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
