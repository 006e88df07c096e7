//! The bare relay: what hostnet's topology costs with nothing of hostnet in it. One thread
//! (tokio's `current_thread` runtime), a task per connection that connects on and runs
//! `copy_bidirectional` — no protocol, no limits, no logging, no second thread. Two of them
//! make the bench's "bare" path, the same chain as socat's: a TCP listener on this machine's
//! loopback → a Unix socket → a Unix listener inside the namespace → TCP to the server there.
//! `hostnet-bench bare-relay LISTEN TO` runs one; LISTEN and TO are `tcp:ADDR` or `unix:PATH`.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// A TCP listener as a server would make it (reused address, backlog 4096, `TCP_NODELAY`
    /// for what it accepts), or a Unix one.
    fn bind(spec: &str) -> Listener {
        if let Some(addr) = spec.strip_prefix("tcp:") {
            let addr: SocketAddr = addr.parse().unwrap();
            let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)
                .unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&addr.into()).unwrap();
            s.listen(4096).unwrap();
            s.set_nonblocking(true).unwrap();
            Listener::Tcp(TcpListener::from_std(s.into()).unwrap())
        } else {
            let path = spec.strip_prefix("unix:").expect("tcp:ADDR or unix:PATH");
            let _ = std::fs::remove_file(path);
            Listener::Unix(UnixListener::bind(path).unwrap())
        }
    }

    async fn accept(&self) -> std::io::Result<Box<dyn Io>> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Listener::Unix(l) => Box::new(l.accept().await?.0),
        })
    }
}

async fn connect(spec: &str) -> std::io::Result<Box<dyn Io>> {
    Ok(match spec.strip_prefix("tcp:") {
        Some(addr) => {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        None => {
            Box::new(UnixStream::connect(spec.strip_prefix("unix:").expect("tcp:ADDR or unix:PATH")).await?)
        }
    })
}

/// Relays every connection accepted on `listen` to a new connection to `to`, until killed.
pub fn run(listen: &str, to: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    rt.block_on(async {
        let listener = Listener::bind(listen);
        loop {
            let Ok(mut client) = listener.accept().await else { continue };
            let to = to.to_owned();
            tokio::spawn(async move {
                if let Ok(mut server) = connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
}
