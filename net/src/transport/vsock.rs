//! AF_VSOCK streams on Linux, through `socket2` and tokio's `AsyncFd`: [`FdStream`]s, as Unix
//! transport streams are.
//!
//! Not `tokio-vsock`: its stream offers no `&self` readiness, which the relay needs to read
//! and write one socket at once and to hold no buffer while idle.

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::transport::fd::{FdStream, register};
use crate::transport::raw::RawStream;

/// The credit the agent's vsock streams offer the desktop: bytes a stream may hold unread,
/// which the desktop may send ahead (Linux's default and ceiling: 256 KiB). Measured in the
/// guest of a real VM (QEMU TCG), bulk transfers from the desktop: with 256 KiB the agent's
/// reads averaged ~30 KiB, each one a write to the guest server's TCP socket, and the guest's
/// CPU per MiB was 2.6× the raw link's; with 1 MiB it is ~2.0× (and host → guest 0.36× →
/// 0.45× the raw link's rate); 2 MiB measured the same as 1 (`docs/performance.md`, round
/// ten). A credit, not an allocation: the kernel holds only what has arrived unread — up to
/// this much per stream while its reader waits on a slower local side.
pub const AGENT_CREDIT: u64 = 1 << 20;

/// The credit this process's vsock streams offer; 0: the kernel's default.
static CREDIT: AtomicU64 = AtomicU64::new(0);

/// Makes every vsock stream this process opens or listens for from now on offer `bytes` of
/// credit. The agent sets [`AGENT_CREDIT`]: its peer is the desktop. The proxy keeps the
/// kernel's default: there the peer is the guest, and what a stream's credit lets it queue,
/// times `--max-guest-streams`, is desktop kernel memory a hostile guest could fill.
pub fn set_stream_credit(bytes: u64) {
    CREDIT.store(bytes, Ordering::Relaxed);
}

/// `linux/vm_sockets.h`: options at level `AF_VSOCK` (not in the `libc` crate).
const SO_VM_SOCKETS_BUFFER_SIZE: libc::c_int = 0;
const SO_VM_SOCKETS_BUFFER_MAX_SIZE: libc::c_int = 2;

/// Gives `socket` the credit [`set_stream_credit`] asked for (its ceiling first, which the size
/// may not pass), before it connects or listens: the first packet then offers it, and a
/// listener's connections inherit it. A kernel that refuses keeps its default: the stream
/// still works, with less ahead.
fn size_buffer(socket: &Socket) {
    use std::os::fd::AsRawFd;
    let size = CREDIT.load(Ordering::Relaxed);
    if size == 0 {
        return;
    }
    for option in [SO_VM_SOCKETS_BUFFER_MAX_SIZE, SO_VM_SOCKETS_BUFFER_SIZE] {
        // SAFETY: a valid socket; the value is a u64 living across the call, its size passed.
        let _ = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::AF_VSOCK,
                option,
                (&raw const size).cast(),
                std::mem::size_of::<u64>() as libc::socklen_t,
            )
        };
    }
}

/// Connects to `port` on `cid`; the stream is an [`FdStream`] (see there for how it waits).
pub async fn connect(cid: u32, port: u32) -> io::Result<FdStream> {
    let socket = Socket::new(Domain::VSOCK, Type::STREAM.cloexec(), None)?;
    socket.set_nonblocking(true)?;
    size_buffer(&socket);
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
        size_buffer(&socket);
        socket.bind(&SockAddr::vsock(cid, port))?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        Ok(VsockListener(register(socket, Interest::READABLE)?))
    }

    pub async fn accept(&self) -> io::Result<(FdStream, String)> {
        loop {
            let mut guard = self.0.readable().await?;
            // Never an `accept` with nothing queued (see `queued`): "nothing" is a `WouldBlock`
            // that clears the readiness, as an `EAGAIN` from `accept` would.
            let accepted = guard.try_io(|s| match queued(s.get_ref())? {
                // Non-blocking from the start (`accept4`): one `fcntl` less per stream.
                true => crate::sys::accept_nonblocking_from(s.get_ref()),
                false => Err(io::ErrorKind::WouldBlock.into()),
            });
            match accepted {
                Ok(Ok((socket, addr))) => {
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

/// Whether a connection waits to be accepted (or an error to be reported) on `listener`.
///
/// Asked before each `accept`, because a non-blocking vsock `accept` with nothing queued does
/// not answer `EAGAIN` at once on the kernels guests run (6.1 here): `vsock_accept` sleeps in
/// `schedule_timeout(0)`, until the next timer tick — up to 4 ms at `HZ=250` — and the thread
/// with it, every connection on it included. The agent's accept loop asks once more after each
/// connection, so every connection through a real VM waited there: traced in the guest, the
/// relay thread slept 0.4–3.2 ms in that `accept` while the connection's opening had arrived.
/// `poll` answers from the accept queue without sleeping.
fn queued(listener: &Socket) -> io::Result<bool> {
    Ok(crate::sys::poll_now(listener, libc::POLLIN)? != 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Needs AF_VSOCK (no peer): an empty listener has nothing queued, so `accept` is not
    /// called on it (which could sleep until the next tick on a guest's kernel).
    #[tokio::test]
    async fn an_empty_vsock_listener_has_nothing_queued_and_accept_waits() {
        // Any CID and port: bound, not reached.
        let listener = VsockListener::bind(u32::MAX, u32::MAX).expect("this test needs AF_VSOCK");
        assert!(!queued(listener.0.get_ref()).unwrap(), "nothing is queued on a new listener");
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), listener.accept()).await;
        assert!(waited.is_err(), "accept on an empty listener waits: {waited:?}");
    }
    use std::os::fd::AsRawFd;

    /// `fd`'s vsock buffer, as the kernel reports it.
    fn buffer_of(fd: &impl AsRawFd) -> u64 {
        let mut size: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: `size` and `len` live across the call; the kernel writes at most `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::AF_VSOCK,
                SO_VM_SOCKETS_BUFFER_SIZE,
                (&raw mut size).cast(),
                &raw mut len,
            )
        };
        assert_eq!(r, 0, "getsockopt: {}", io::Error::last_os_error());
        size
    }

    /// Without [`set_stream_credit`] (the proxy) a vsock socket keeps the kernel's 256 KiB;
    /// after it (the agent) the listener (whose connections inherit it) and every connecting
    /// socket offer [`AGENT_CREDIT`]. Needs AF_VSOCK (the `vsock` module, which Linux loads on
    /// first use; no peer is needed). The only test here that sets the credit.
    #[tokio::test]
    async fn the_agents_vsock_sockets_offer_more_credit_and_the_proxys_the_kernels() {
        let socket = Socket::new(Domain::VSOCK, Type::STREAM, None).expect("this test needs AF_VSOCK");
        size_buffer(&socket);
        assert_eq!(buffer_of(&socket), 256 << 10, "the kernel's default: nothing asked");
        set_stream_credit(AGENT_CREDIT);
        size_buffer(&socket);
        assert_eq!(buffer_of(&socket), AGENT_CREDIT);
        // Any CID and port: bound, not reached.
        let listener = VsockListener::bind(u32::MAX, u32::MAX).expect("binding a vsock listener");
        assert_eq!(buffer_of(listener.0.get_ref()), AGENT_CREDIT);
    }
}
