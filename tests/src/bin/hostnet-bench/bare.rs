//! The bare relay: what hostnet's topology costs with nothing of hostnet in it. One thread
//! (tokio's `current_thread` runtime), a task per connection that connects on and runs
//! `copy_bidirectional` — no protocol, no limits, no logging, no second thread. Two of them
//! make the bench's "bare" path, the same chain as socat's: a TCP listener on this machine's
//! loopback → a Unix socket → a Unix listener inside the namespace → TCP to the server there.
//! `hostnet-bench bare-relay LISTEN TO` runs one; LISTEN and TO are [`End`]s.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Where a bare relay listens or connects: `tcp:ADDR` or `unix:PATH` on its command line,
/// parsed once when it starts (the relay's per-connection work is what the bench measures).
#[derive(Debug, Clone)]
pub enum End {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for End {
    type Err = String;

    fn from_str(s: &str) -> Result<End, String> {
        match (s.strip_prefix("tcp:"), s.strip_prefix("unix:")) {
            (Some(addr), _) => addr.parse().map(End::Tcp).map_err(|e| format!("{s}: {e}")),
            (_, Some(path)) => Ok(End::Unix(path.into())),
            _ => Err(format!("{s}: expected tcp:ADDR or unix:PATH")),
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Tcp(addr) => write!(f, "tcp:{addr}"),
            End::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// A TCP listener as a server would make it (reused address, backlog 4096, `TCP_NODELAY`
    /// for what it accepts), or a Unix one.
    fn bind(at: &End) -> Listener {
        match at {
            End::Tcp(addr) => {
                let s =
                    socket2::Socket::new(socket2::Domain::for_address(*addr), socket2::Type::STREAM, None)
                        .unwrap();
                s.set_reuse_address(true).unwrap();
                s.bind(&(*addr).into()).unwrap();
                s.listen(4096).unwrap();
                s.set_nonblocking(true).unwrap();
                Listener::Tcp(TcpListener::from_std(s.into()).unwrap())
            }
            End::Unix(path) => {
                let _ = std::fs::remove_file(path);
                Listener::Unix(UnixListener::bind(path).unwrap())
            }
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

async fn connect(to: &End) -> std::io::Result<Box<dyn Io>> {
    Ok(match to {
        End::Tcp(addr) => {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        End::Unix(path) => Box::new(UnixStream::connect(path).await?),
    })
}

/// Relays every connection accepted on `listen` to a new connection to `to`, until killed.
pub fn run(listen: &End, to: &End) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    rt.block_on(async {
        let listener = Listener::bind(listen);
        let to = Arc::new(to.clone());
        loop {
            let Ok(mut client) = listener.accept().await else { continue };
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
}
