//! What the in-process integration tests of `net` share: a deadline for every wait, and the
//! socket pairs a relay runs between.

#![allow(dead_code)] // each test file uses its own share

use std::time::Duration;

use hostnet_net::local::{LocalListener, LocalTcp};
use hostnet_net::transport::fd::FdStream;
use tokio::net::{TcpListener, TcpStream, UnixStream};

/// How long any wait of a test may take.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// `f`, or a panic once [`DEADLINE`] has passed.
pub async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f).await.expect("deadline passed")
}

/// A connected TCP pair on loopback.
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

/// A connected TCP pair on loopback: the test's end, and the relay's as hostnet makes it
/// ([`LocalTcp`], accepted by a [`LocalListener`]).
pub async fn local_pair() -> (TcpStream, LocalTcp) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let listener = LocalListener::from_std(l).unwrap();
    let a = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (b, _) = listener.accept().await.unwrap();
    (a, b)
}

/// A connected TCP pair on loopback with the relay's end connecting, as the agent connects to
/// a guest server: the relay's end ([`LocalTcp`], from `connect_tcp`) and the server's.
pub async fn local_pair_connecting() -> (LocalTcp, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = hostnet_net::connect::connect_tcp(l.local_addr().unwrap(), None, "here").await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

/// A connected Unix pair: one end as a relay's data stream, the other a plain tokio stream
/// the test drives.
pub fn unix_pair_driven() -> (FdStream, UnixStream) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let a = FdStream::new(socket2::Socket::from(std::os::fd::OwnedFd::from(a))).unwrap();
    (a, UnixStream::from_std(b).unwrap())
}

/// Waits until at least `n` bytes are queued on the non-blocking socket `s`, reading none.
pub async fn queued(s: &impl std::os::fd::AsFd, n: usize) {
    let mut buf = vec![std::mem::MaybeUninit::uninit(); n];
    within(async {
        while !matches!(socket2::SockRef::from(s).peek(&mut buf), Ok(k) if k >= n) {
            tokio::task::yield_now().await;
        }
    })
    .await;
}
