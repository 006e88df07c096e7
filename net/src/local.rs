//! The relays' own ends of local TCP connections — the desktop client the proxy accepted, the
//! guest server the agent connected to, and the same two the other way round (guest → host) —
//! and the listeners that accept them.
//!
//! On Linux (the agent everywhere, the proxy on a Linux desktop) a [`LocalTcp`] is an
//! [`FdStream`] registered for urgent data as well as for reading: a read that comes back short
//! then means the socket is drained — unless urgent data or the peer's FIN has been reported,
//! when the relay reads on — so each message a relay passes on costs one `read(2)` instead of
//! two (the second could only answer `EAGAIN`). Elsewhere it is tokio's `TcpStream`, read until
//! `WouldBlock`: macOS' kqueue does not report urgent data, Windows has no `FdStream`.

use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use crate::sys::{AsSock, BorrowedSock};
use crate::threads::Movable;
use crate::transport::raw::RawStream;

#[cfg(any(target_os = "linux", target_os = "android"))]
use crate::transport::fd::FdStream;

#[cfg(any(target_os = "linux", target_os = "android"))]
type Stream = FdStream;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
type Stream = tokio::net::TcpStream;

/// A relay's end of a local TCP connection (see the module's notes).
#[derive(Debug)]
pub struct LocalTcp(Stream);

impl LocalTcp {
    /// Takes a connected, non-blocking TCP socket and registers it with this thread's reactor.
    pub fn from_socket(socket: socket2::Socket) -> io::Result<LocalTcp> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            FdStream::tcp(socket).map(LocalTcp)
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            tokio::net::TcpStream::from_std(socket.into()).map(LocalTcp)
        }
    }

    /// Takes a tokio `TcpStream` (Windows' connect makes one).
    #[cfg(not(unix))]
    pub fn from_tokio(stream: tokio::net::TcpStream) -> io::Result<LocalTcp> {
        Ok(LocalTcp(stream))
    }

    /// This connection as a tokio `TcpStream` (registered anew, on Linux): for code that
    /// wants tokio's `AsyncRead` and `AsyncWrite`.
    pub fn into_tokio(self) -> io::Result<tokio::net::TcpStream> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            tokio::net::TcpStream::from_std(self.0.into_socket().into())
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            Ok(self.0)
        }
    }

    fn sock(&self) -> socket2::SockRef<'_> {
        socket2::SockRef::from(self)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock().local_addr()?.as_socket().ok_or_else(|| io::Error::other("not an IP socket"))
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.sock().set_tcp_nodelay(on)
    }

    pub fn nodelay(&self) -> io::Result<bool> {
        self.sock().tcp_nodelay()
    }

    /// The socket's pending error (`SO_ERROR`), taken.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        self.sock().take_error()
    }
}

/// A [`LocalTcp`] between two relay threads: registered with no reactor.
#[derive(Debug)]
pub struct DetachedTcp(<Stream as Movable>::Detached);

impl Movable for LocalTcp {
    type Detached = DetachedTcp;
    fn detach(self) -> io::Result<DetachedTcp> {
        Movable::detach(self.0).map(DetachedTcp)
    }
    fn attach(detached: DetachedTcp) -> io::Result<LocalTcp> {
        <Stream as Movable>::attach(detached.0).map(LocalTcp)
    }
}

impl RawStream for LocalTcp {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        RawStream::poll_read_ready(&self.0, cx)
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        RawStream::poll_write_ready(&self.0, cx)
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        RawStream::try_read(&self.0, buf)
    }
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        RawStream::try_write(&self.0, buf)
    }
    fn try_io_raw(
        &self,
        interest: tokio::io::Interest,
        f: &mut dyn FnMut() -> io::Result<usize>,
    ) -> Option<io::Result<usize>> {
        RawStream::try_io_raw(&self.0, interest, f)
    }
}

#[cfg(unix)]
impl std::os::fd::AsFd for LocalTcp {
    fn as_fd(&self) -> BorrowedSock<'_> {
        self.0.as_sock()
    }
}

#[cfg(windows)]
impl std::os::windows::io::AsSocket for LocalTcp {
    fn as_socket(&self) -> BorrowedSock<'_> {
        self.0.as_sock()
    }
}

/// A listening TCP socket whose connections come as [`LocalTcp`]s.
#[derive(Debug)]
pub struct LocalListener(Listener);

#[cfg(any(target_os = "linux", target_os = "android"))]
type Listener = tokio::io::unix::AsyncFd<std::net::TcpListener>;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
type Listener = tokio::net::TcpListener;

impl LocalListener {
    /// Takes a non-blocking listening socket and registers it with this thread's reactor.
    pub fn from_std(listener: std::net::TcpListener) -> io::Result<LocalListener> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            crate::transport::fd::register(listener, tokio::io::Interest::READABLE).map(LocalListener)
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            tokio::net::TcpListener::from_std(listener).map(LocalListener)
        }
    }

    /// The next connection and its peer's address (on Linux `TCP_NODELAY` comes with it from
    /// the listener).
    pub async fn accept(&self) -> io::Result<(LocalTcp, SocketAddr)> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let (socket, peer) =
                self.0.async_io(tokio::io::Interest::READABLE, crate::sys::accept_nonblocking_from).await?;
            let peer = peer.as_socket().ok_or_else(|| io::Error::other("not an IP peer"))?;
            Ok((LocalTcp::from_socket(socket)?, peer))
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let (stream, peer) = self.0.accept().await?;
            Ok((LocalTcp(stream), peer))
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            self.0.get_ref().local_addr()
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            self.0.local_addr()
        }
    }
}

#[cfg(test)]
#[cfg(any(target_os = "linux", target_os = "android"))]
mod tests {
    use super::*;
    use crate::transport::raw;
    use std::io::Write;
    use std::time::Duration;

    const DEADLINE: Duration = Duration::from_secs(10);

    /// A plain client socket and the relay's end of its connection.
    async fn pair() -> (std::net::TcpStream, LocalTcp) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let listener = LocalListener::from_std(l).unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_nodelay(true).unwrap();
        let (local, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        (client, local)
    }

    /// Bytes the client has sent that the relay's socket has not acknowledged yet (`SIOCOUTQ`).
    fn unacked(client: &std::net::TcpStream) -> i32 {
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int to `n`.
        let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(client), libc::TIOCOUTQ, &mut n) };
        if r == 0 { n } else { -1 }
    }

    /// Waits until everything the client sent is queued at `local`, then lets the reactor take
    /// its events (a timer's wait parks the runtime, which polls the reactor first).
    async fn all_arrived(client: &std::net::TcpStream) {
        tokio::time::timeout(DEADLINE, async {
            while unacked(client) != 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the client's bytes did not arrive");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    /// A short read is taken for "drained": the read that would follow is not made (bytes sent
    /// after it are not seen until the reactor reports them), and those bytes still wake the
    /// reader.
    #[tokio::test(flavor = "current_thread")]
    async fn a_short_tcp_read_clears_readiness_and_a_later_message_still_wakes() {
        let (mut client, local) = pair().await;
        let mut buf = [0u8; 64];
        for round in 0..50u8 {
            client.write_all(&[round; 3]).unwrap();
            let n = tokio::time::timeout(DEADLINE, raw::read(&local, &mut buf))
                .await
                .expect("a message did not wake the reader")
                .unwrap();
            assert_eq!(buf.get(..n), Some(&[round; 3][..]));
            // Sent now, with no turn of the reactor since the short read: not read yet.
            client.write_all(b"more").unwrap();
            let next = local.try_read(&mut buf);
            assert!(
                matches!(&next, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
                "a short read did not clear readiness: {next:?}"
            );
            let n = tokio::time::timeout(DEADLINE, raw::read(&local, &mut buf)).await.unwrap().unwrap();
            assert_eq!(buf.get(..n), Some(&b"more"[..]));
        }
    }

    /// A TCP read stops short at an urgent mark with bytes queued behind it; with the urgent
    /// data reported those bytes are read on at once, without the peer sending more (a
    /// telnet-style client waiting for an answer would otherwise wait for ever).
    #[tokio::test(flavor = "current_thread")]
    async fn bytes_behind_an_urgent_mark_are_read_without_more_arriving() {
        let (mut client, local) = pair().await;
        client.write_all(b"abc").unwrap();
        socket2::SockRef::from(&client).send_out_of_band(b"!").unwrap();
        client.write_all(b"def").unwrap();
        all_arrived(&client).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < 6 {
            let n = tokio::time::timeout(DEADLINE, raw::read(&local, &mut buf))
                .await
                .expect("bytes behind the urgent mark were left waiting")
                .unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"abcdef", "the urgent byte is not inline");
    }

    /// A short read with the peer's FIN behind it leaves readiness alone: the end is read at
    /// once, as the relay needs to send a connection's last bytes and its end together.
    #[tokio::test(flavor = "current_thread")]
    async fn the_fin_behind_a_short_read_is_read_at_once() {
        let (mut client, local) = pair().await;
        client.write_all(b"ok").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        all_arrived(&client).await;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(DEADLINE, raw::read(&local, &mut buf)).await.unwrap().unwrap();
        assert_eq!(buf.get(..n), Some(&b"ok"[..]));
        assert_eq!(local.try_read(&mut buf).unwrap(), 0, "the FIN right behind the bytes");
    }
}
