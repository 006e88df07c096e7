//! The UDP socket every UDP relay uses: tokio's `UdpSocket` on Windows; on Unix a socket the
//! reactor watches for reading, and for writing only once a send has had to wait (the
//! [`WriteWatch`] the Unix transport streams use, kept once made: a port's socket has many
//! senders).
//!
//! Why: a UDP socket registered for writing is woken each time a datagram it sent leaves its
//! send buffer — on loopback, during the very `sendmmsg` that sent it — so every send was
//! followed by an `epoll_wait` that returned only `EPOLLOUT` (three `epoll_wait`s per
//! datagram's round trip in each relay, where two have work). The methods are tokio's, for the
//! ones the relays call, so the code above is the same on every platform.

#[cfg(not(unix))]
pub use tokio::net::UdpSocket;

#[cfg(unix)]
pub use unix::UdpSocket;

#[cfg(unix)]
mod unix {
    use std::future::poll_fn;
    use std::io;
    use std::net::SocketAddr;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;

    use crate::transport::fd::{WriteWatch, register};

    /// A non-blocking UDP socket; see the module's notes.
    #[derive(Debug)]
    pub struct UdpSocket {
        io: AsyncFd<std::net::UdpSocket>,
        write: WriteWatch,
    }

    impl UdpSocket {
        /// Takes a non-blocking socket (as tokio's `from_std` does) and registers it for reading.
        pub fn from_std(socket: std::net::UdpSocket) -> io::Result<UdpSocket> {
            // Kept: a port's socket is sent on by all its flows.
            Ok(UdpSocket { io: register(socket, Interest::READABLE)?, write: WriteWatch::kept() })
        }

        /// Binds a new socket to `addr`.
        pub async fn bind(addr: impl std::net::ToSocketAddrs) -> io::Result<UdpSocket> {
            let socket = std::net::UdpSocket::bind(addr)?;
            socket.set_nonblocking(true)?;
            UdpSocket::from_std(socket)
        }

        pub fn local_addr(&self) -> io::Result<SocketAddr> {
            self.io.get_ref().local_addr()
        }

        /// Sets the peer (a UDP connect completes at once).
        pub async fn connect(&self, addr: SocketAddr) -> io::Result<()> {
            self.io.get_ref().connect(addr)
        }

        /// Waits until a receive would not block.
        pub async fn readable(&self) -> io::Result<()> {
            self.io.readable().await?.retain_ready();
            Ok(())
        }

        /// Waits until a send would not block.
        pub async fn writable(&self) -> io::Result<()> {
            poll_fn(|cx| self.write.poll_write_ready(self.io.get_ref().as_fd(), cx)).await
        }

        /// Runs the non-blocking operation `f`; `WouldBlock` clears the readiness for
        /// `interest`.
        pub fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
            if interest.is_writable() { self.write.write_with(f) } else { self.io.try_io(interest, |_| f()) }
        }

        /// Runs `f` until it does not block, waiting for `interest` between tries (reads
        /// through tokio's own loop; writes tried first, then waited for through the watch).
        pub async fn async_io<R>(
            &self,
            interest: Interest,
            mut f: impl FnMut() -> io::Result<R>,
        ) -> io::Result<R> {
            if !interest.is_writable() {
                return self.io.async_io(interest, |_| f()).await;
            }
            loop {
                match self.write.write_with(&mut f) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                    r => return r,
                }
            }
        }

        pub fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
            self.write.write_with(|| self.io.get_ref().send(buf))
        }

        pub fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
            self.write.write_with(|| self.io.get_ref().send_to(buf, to))
        }

        pub fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
            self.io.try_io(Interest::READABLE, |s| s.recv_from(buf))
        }

        /// Sends to the connected peer, waiting while the send buffer is full.
        pub async fn send(&self, buf: &[u8]) -> io::Result<usize> {
            self.async_io(Interest::WRITABLE, || self.io.get_ref().send(buf)).await
        }

        /// Receives from the connected peer.
        pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
            self.io.async_io(Interest::READABLE, |s| s.recv(buf)).await
        }
    }

    impl AsRawFd for UdpSocket {
        fn as_raw_fd(&self) -> RawFd {
            self.io.get_ref().as_raw_fd()
        }
    }

    impl AsFd for UdpSocket {
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.io.get_ref().as_fd()
        }
    }

    #[cfg(test)]
    #[allow(clippy::unwrap_used, clippy::expect_used)]
    mod tests {
        use super::*;
        use std::time::Duration;

        /// Sends never register for writing while the socket takes them; a full socket makes
        /// the sender wait, and it is woken when there is room.
        #[tokio::test]
        async fn a_sender_registers_for_writing_only_when_the_socket_is_full() {
            let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            a.connect(b.local_addr().unwrap()).await.unwrap();
            for _ in 0..100 {
                a.send(&[1u8; 64]).await.unwrap();
            }
            assert!(!a.write.watching(), "sends that fit never register for writing");
            let mut buf = [0u8; 128];
            let mut got = 0;
            while got < 100 {
                tokio::time::timeout(Duration::from_secs(10), b.recv(&mut buf)).await.unwrap().unwrap();
                got += 1;
            }
            // Fill the send side: tiny send buffer, large datagrams, until the kernel says wait.
            socket2::SockRef::from(&a).set_send_buffer_size(4096).unwrap();
            let big = vec![2u8; 60_000];
            let mut blocked = false;
            for _ in 0..10_000 {
                match a.try_send(&big) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        blocked = true;
                        break;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            if blocked {
                tokio::time::timeout(Duration::from_secs(10), a.writable())
                    .await
                    .expect("a sender waiting for room was never woken")
                    .unwrap();
                assert!(a.write.watching(), "waiting registers for writing");
            }
        }
    }
}
