//! The bare UDP relay: what hostnet's UDP topology costs with nothing of hostnet in it, as
//! `bare.rs` is for TCP. Two of them make the bench's "bare" UDP path: a UDP socket on this
//! machine's loopback → a Unix `SOCK_SEQPACKET` connection per client address (datagram
//! boundaries kept, flow control as on a stream) → a listener inside the namespace → a
//! connected UDP socket per flow to the echo server there. One thread each (tokio's
//! `current_thread` runtime), one datagram per system call, no protocol, batching, limits or
//! logging. `hostnet-bench bare-udp-relay LISTEN TO` runs one: `udp:ADDR unix:PATH` on the
//! desktop, `unix:PATH udp:ADDR` in the namespace.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;

/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_536;

/// A connected `SOCK_SEQPACKET` Unix socket: one datagram per send and per receive.
struct Seq(AsyncFd<Socket>);

impl Seq {
    fn new(socket: Socket) -> io::Result<Seq> {
        socket.set_nonblocking(true)?;
        // SAFETY: `socket` owns its fd, which stays open and unchanged until the `AsyncFd` that
        // takes ownership of it drops it.
        Ok(Seq(unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE | Interest::WRITABLE) }?))
    }

    async fn send(&self, datagram: &[u8]) -> io::Result<usize> {
        self.0.async_io(Interest::WRITABLE, |s| s.send(datagram)).await
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.async_io(Interest::READABLE, |mut s| s.read(buf)).await
    }
}

/// Relays between `listen` and `to` until killed: `udp:ADDR` → `unix:PATH` (the desktop's
/// end) or `unix:PATH` → `udp:ADDR` (the namespace's).
pub fn run(listen: &str, to: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    match (
        listen.strip_prefix("udp:"),
        to.strip_prefix("unix:"),
        listen.strip_prefix("unix:"),
        to.strip_prefix("udp:"),
    ) {
        (Some(addr), Some(path), _, _) => rt.block_on(desktop_end(addr.parse().unwrap(), Path::new(path))),
        (_, _, Some(path), Some(addr)) => rt.block_on(namespace_end(Path::new(path), addr.parse().unwrap())),
        _ => panic!("bare-udp-relay: expected `udp:ADDR unix:PATH` or `unix:PATH udp:ADDR`"),
    }
}

/// Each new client address gets its own connection to `to`; its replies go back to it.
async fn desktop_end(listen: SocketAddr, to: &Path) {
    let udp = Arc::new(UdpSocket::bind(listen).await.unwrap());
    let mut flows: HashMap<SocketAddr, Arc<Seq>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, client)) = udp.recv_from(&mut buf).await else { continue };
        let flow = match flows.get(&client) {
            Some(flow) => flow.clone(),
            None => {
                let socket = Socket::new(Domain::UNIX, Type::SEQPACKET, None).unwrap();
                socket.connect(&SockAddr::unix(to).unwrap()).unwrap();
                let flow = Arc::new(Seq::new(socket).unwrap());
                let (back, udp) = (flow.clone(), udp.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; MAX_DATAGRAM];
                    while let Ok(n) = back.recv(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let _ = udp.send_to(&buf[..n], client).await;
                    }
                });
                flows.insert(client, flow.clone());
                flow
            }
        };
        let _ = flow.send(&buf[..n]).await;
    }
}

/// Each accepted connection is one flow: a UDP socket connected to `to`.
async fn namespace_end(listen: &Path, to: SocketAddr) {
    let _ = std::fs::remove_file(listen);
    let listener = Socket::new(Domain::UNIX, Type::SEQPACKET, None).unwrap();
    listener.bind(&SockAddr::unix(listen).unwrap()).unwrap();
    listener.listen(128).unwrap();
    let listener = Seq::new(listener).unwrap();
    loop {
        let Ok((socket, _)) = listener.0.async_io(Interest::READABLE, |s| s.accept()).await else { continue };
        let Ok(flow) = Seq::new(socket) else { continue };
        let udp = UdpSocket::bind(SocketAddr::new(to.ip(), 0)).await.unwrap();
        udp.connect(to).await.unwrap();
        let (flow, udp) = (Arc::new(flow), Arc::new(udp));
        let (back, from) = (flow.clone(), udp.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok(n) = from.recv(&mut buf).await {
                let _ = back.send(&buf[..n]).await;
            }
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok(n) = flow.recv(&mut buf).await {
                if n == 0 {
                    return;
                }
                let _ = udp.send(&buf[..n]).await;
            }
        });
    }
}

/// The socket path a chain's namespace end listens on (beside the TCP chains' sockets).
pub fn socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!("bare-udp-{port}.sock"))
}
