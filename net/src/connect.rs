//! Outgoing TCP connections to local servers, as both sides make them.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Type};
#[cfg(not(unix))]
use tokio::net::TcpSocket;

use crate::local::LocalTcp;
#[cfg(unix)]
use crate::transport::raw::RawStream;

/// How long a local server may take to accept a relayed connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
// A relayed connection's opening waits as long for a full transport backlog.
#[cfg(unix)]
const _: () = assert!(CONNECT_TIMEOUT.as_nanos() == crate::transport::BACKLOG_WAIT.as_nanos());

/// Connects to `addr` with `TCP_NODELAY`; with `mark`, the socket carries that `SO_MARK` first
/// (the agent's own connections must not be caught by its own interception rules). Errors are
/// sentences naming `addr` and `where_` ("in the guest", "on the host"). The connection comes
/// as the relay's end of it ([`LocalTcp`]).
pub async fn connect_tcp(addr: SocketAddr, mark: Option<u32>, where_: &str) -> Result<LocalTcp, String> {
    let failed = |e: std::io::Error| format!("connecting to {addr} {where_} failed: {e}");
    let socket = crate::sys::new_socket(Domain::for_address(addr), Type::STREAM).map_err(failed)?;
    #[cfg(target_os = "linux")]
    if let Some(mark) = mark {
        socket.set_mark(mark).map_err(failed)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = mark;
    let _ = socket.set_tcp_nodelay(true);
    #[cfg(unix)]
    let attempt = async {
        let done = connect_at_once(&socket, addr);
        let stream = LocalTcp::from_socket(socket)?;
        match done {
            Some(result) => result.map(|()| stream),
            None => tokio::time::timeout(CONNECT_TIMEOUT, async {
                std::future::poll_fn(|cx| stream.poll_write_ready(cx)).await?;
                match stream.take_error()? {
                    Some(e) => Err(e),
                    None => Ok(stream),
                }
            })
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
        }
    };
    #[cfg(not(unix))]
    let attempt = async {
        let connect = TcpSocket::from_std_stream(socket.into()).connect(addr);
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            .and_then(LocalTcp::from_tokio)
    };
    match attempt.await {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            Err(format!("connecting to {addr} {where_} timed out after {CONNECT_TIMEOUT:?}"))
        }
        Err(e) => Err(failed(e)),
    }
}

/// Connects `socket` if that finishes at once: to a local server the handshake completes (or is
/// refused) within `connect(2)` itself, though a non-blocking socket still answers
/// `EINPROGRESS`; a zero-timeout `poll(2)` then tells (and `SO_ERROR` why, if it failed).
/// `None`: still in progress (the reactor says when it is done, under the timeout). Saves, per
/// relayed connection, a trip through the reactor and arming and cancelling the connect timer
/// (which wakes the runtime's timer).
#[cfg(unix)]
fn connect_at_once(socket: &socket2::Socket, addr: SocketAddr) -> Option<std::io::Result<()>> {
    match socket.connect(&addr.into()) {
        Ok(()) => return Some(Ok(())),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Some(Err(e)),
    }
    let revents = crate::sys::poll_now(socket, libc::POLLOUT).ok().filter(|&r| r != 0)?;
    // Writable alone: connected. With an error or hang-up, ask which (a refusal, mostly).
    if revents & (libc::POLLERR | libc::POLLHUP) == 0 {
        return Some(Ok(()));
    }
    match socket.take_error() {
        Ok(None) => Some(Ok(())),
        Ok(Some(e)) | Err(e) => Some(Err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_server_is_connected_with_nodelay_and_a_closed_port_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s = connect_tcp(addr, None, "here").await.unwrap();
        assert!(s.nodelay().unwrap());
        let (accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, s.local_addr().unwrap());
        drop((accepted, listener));
        let err = connect_tcp(addr, None, "here").await.unwrap_err();
        assert!(err.contains(&format!("connecting to {addr} here failed")), "{err}");
    }
}
