//! What the in-process integration tests of `net` share: a deadline for every wait, and the
//! socket pairs a relay runs between.

#![allow(dead_code)] // each test file uses its own share

use std::time::Duration;

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

/// A connected Unix pair: one end as a relay's data stream, the other a plain tokio stream
/// the test drives.
pub fn unix_pair_driven() -> (FdStream, UnixStream) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let a = FdStream::new(socket2::Socket::from(std::os::fd::OwnedFd::from(a))).unwrap();
    (a, UnixStream::from_std(b).unwrap())
}
