//! The one stream type every transport yields.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use hostnet_protocol::chunk::RST;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::sys::{AsSock, BorrowedSock};
use crate::transport::raw::{RawStream, poll_read, poll_write};

/// The stream every transport yields. An enum, not a trait object: the relay stays
/// monomorphic and each variant keeps its raw fd for `splice(2)`.
#[derive(Debug)]
pub enum TransportStream {
    #[cfg(unix)]
    Unix(crate::transport::fd::FdStream),
    Tcp(TcpStream),
    #[cfg(target_os = "linux")]
    Vsock(crate::transport::fd::FdStream),
}

macro_rules! each_variant {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            #[cfg(unix)]
            TransportStream::Unix($s) => $e,
            TransportStream::Tcp($s) => $e,
            #[cfg(target_os = "linux")]
            TransportStream::Vsock($s) => $e,
        }
    };
}

#[cfg(unix)]
impl std::os::fd::AsFd for TransportStream {
    fn as_fd(&self) -> BorrowedSock<'_> {
        each_variant!(self, s => s.as_sock())
    }
}

#[cfg(windows)]
impl std::os::windows::io::AsSocket for TransportStream {
    fn as_socket(&self) -> BorrowedSock<'_> {
        each_variant!(self, s => s.as_sock())
    }
}

/// A [`TransportStream`] between two relay threads (`crate::threads`).
#[derive(Debug)]
pub enum DetachedStream {
    #[cfg(unix)]
    Unix(crate::transport::fd::DetachedFd),
    Tcp(std::net::TcpStream),
    #[cfg(target_os = "linux")]
    Vsock(crate::transport::fd::DetachedFd),
}

impl TransportStream {
    /// Whether nothing waits to be read and the far side has not closed: a stream held for a
    /// connection to come (`crate::transport::spare`) that is still fit to be handed out.
    /// Asked with a non-blocking peek, which answers "would block" only then. An RST word
    /// alone — the last connection's reset that crossed our FIN (`docs/protocol.md`, section
    /// 3) — is read out of the way.
    pub fn quiet(&self) -> bool {
        use std::io::Read;
        let sock = socket2::SockRef::from(self);
        let mut peek = [std::mem::MaybeUninit::uninit(); RST.len() + 1];
        match sock.peek(&mut peek) {
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            Ok(n) if n == RST.len() => {
                let mut word = [0u8; RST.len()];
                matches!((&*sock).read(&mut word), Ok(n) if n == RST.len()) && word == RST
            }
            Ok(_) => false,
        }
    }
}

impl crate::threads::Movable for TransportStream {
    type Detached = DetachedStream;
    fn detach(self) -> io::Result<DetachedStream> {
        Ok(match self {
            #[cfg(unix)]
            TransportStream::Unix(s) => DetachedStream::Unix(s.detach()),
            TransportStream::Tcp(s) => DetachedStream::Tcp(s.into_std()?),
            #[cfg(target_os = "linux")]
            TransportStream::Vsock(s) => DetachedStream::Vsock(s.detach()),
        })
    }
    fn attach(detached: DetachedStream) -> io::Result<Self> {
        #[cfg(unix)]
        use crate::transport::fd::FdStream;
        Ok(match detached {
            #[cfg(unix)]
            DetachedStream::Unix(s) => TransportStream::Unix(FdStream::attach(s)?),
            DetachedStream::Tcp(s) => TransportStream::Tcp(TcpStream::from_std(s)?),
            #[cfg(target_os = "linux")]
            DetachedStream::Vsock(s) => TransportStream::Vsock(FdStream::attach(s)?),
        })
    }
}

impl RawStream for TransportStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_variant!(self, s => RawStream::poll_read_ready(s, cx))
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_variant!(self, s => RawStream::poll_write_ready(s, cx))
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        each_variant!(self, s => RawStream::try_read(s, buf))
    }
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        each_variant!(self, s => RawStream::try_write(s, buf))
    }
    fn try_io_raw(
        &self,
        interest: tokio::io::Interest,
        f: &mut dyn FnMut() -> io::Result<usize>,
    ) -> Option<io::Result<usize>> {
        each_variant!(self, s => RawStream::try_io_raw(s, interest, f))
    }
}

impl AsyncRead for TransportStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = ready!(poll_read(&*self, cx, buf.initialize_unfilled()))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TransportStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        poll_write(&*self, cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.shutdown_write())
    }
}
