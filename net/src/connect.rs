//! Outgoing TCP connections to local servers, as both sides make them.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Type};
use tokio::net::{TcpSocket, TcpStream};

/// How long a local server may take to accept a relayed connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `addr` with `TCP_NODELAY`; with `mark`, the socket carries that `SO_MARK` first
/// (the agent's own connections must not be caught by its own interception rules). Errors are
/// sentences naming `addr` and `where_` ("in the guest", "on the host").
pub async fn connect_tcp(addr: SocketAddr, mark: Option<u32>, where_: &str) -> Result<TcpStream, String> {
    let attempt = async {
        let socket = crate::sys::new_socket(Domain::for_address(addr), Type::STREAM)?;
        #[cfg(target_os = "linux")]
        if let Some(mark) = mark {
            socket.set_mark(mark)?;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = mark;
        let stream: std::net::TcpStream = socket.into();
        let s = TcpSocket::from_std_stream(stream).connect(addr).await?;
        let _ = s.set_nodelay(true);
        Ok::<_, std::io::Error>(s)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("connecting to {addr} {where_} failed: {e}")),
        Err(_) => Err(format!("connecting to {addr} {where_} timed out after {CONNECT_TIMEOUT:?}")),
    }
}
