//! The bare relay: what hostnet's topology costs with nothing of hostnet in it. One thread
//! (tokio's `current_thread` runtime), a task per connection that connects on and runs
//! `copy_bidirectional` — no protocol, no limits, no logging, no second thread. Two of them
//! make the bench's "bare" path, the same chain as socat's: a TCP listener on this machine's
//! loopback → a Unix socket → a Unix listener inside the namespace → TCP to the server there.
//! `hostnet-bench bare-relay LISTEN TO` runs one; LISTEN and TO are [`End`]s.
//!
//! For the throughput rows, `--bulk splice` or `--bulk copy` runs it as the bulk relay one
//! would write first instead ([`run_bulk`]): blocking sockets, a thread per direction (no
//! reactor), moving the bytes with `splice(2)` through a 1 MiB pipe (the analogue of hostnet's
//! splice gear) or `read`/`write` through a 1 MiB buffer (of its buffer gear) —
//! `copy_bidirectional`'s 8 KiB buffers would say little about bulk transfers. Not a bound:
//! hostnet's relays, one thread for both directions on readiness, measured cheaper per GiB.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
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

/// How a bulk bare relay moves the bytes (`--bulk`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Bulk {
    /// `splice(2)` socket → pipe → socket: never through user space, as hostnet's splice gear.
    Splice,
    /// `read`/`write` through a buffer, as hostnet's buffer gear.
    Copy,
}

/// The bulk relay's pipe and buffer: hostnet's largest chunk (`RELAY_BUF_LEN`, `PIPE_LEN`).
const BULK_LEN: usize = 1 << 20;

fn socket_for(at: &End) -> io::Result<(socket2::Socket, socket2::SockAddr)> {
    let (domain, addr) = match at {
        End::Tcp(addr) => (socket2::Domain::for_address(*addr), socket2::SockAddr::from(*addr)),
        End::Unix(path) => (socket2::Domain::UNIX, socket2::SockAddr::unix(path)?),
    };
    Ok((socket2::Socket::new(domain, socket2::Type::STREAM, None)?, addr))
}

/// Relays every connection accepted on `listen` to a new connection to `to`, a thread per
/// direction moving the bytes as `bulk` says, until killed.
pub fn run_bulk(listen: &End, to: &End, bulk: Bulk) {
    if let End::Unix(path) = listen {
        let _ = std::fs::remove_file(path);
    }
    let (listener, addr) = socket_for(listen).unwrap();
    if let End::Tcp(_) = listen {
        listener.set_reuse_address(true).unwrap();
    }
    listener.bind(&addr).unwrap();
    listener.listen(4096).unwrap();
    loop {
        let Ok((client, _)) = listener.accept() else { continue };
        let to = to.clone();
        std::thread::spawn(move || {
            let Ok((server, addr)) = socket_for(&to) else { return };
            if server.connect(&addr).is_err() {
                return;
            }
            for s in [&client, &server] {
                let _ = s.set_tcp_nodelay(true); // the Unix end refuses it: it has no Nagle to turn off
            }
            let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) else { return };
            let up = std::thread::spawn(move || pump(&c, &s, bulk));
            pump(&server, &client, bulk);
            let _ = up.join();
        });
    }
}

/// Moves `from`'s bytes to `to` until `from`'s end, then passes the end on.
fn pump(from: &socket2::Socket, to: &socket2::Socket, bulk: Bulk) {
    let _ = match bulk {
        Bulk::Splice => splice_all(from, to),
        Bulk::Copy => copy_all(from, to),
    };
    let _ = to.shutdown(Shutdown::Write);
}

fn copy_all(mut from: &socket2::Socket, mut to: &socket2::Socket) -> io::Result<()> {
    let mut buf = vec![0u8; BULK_LEN];
    loop {
        let n = from.read(&mut buf)?;
        let Some(bytes) = buf.get(..n).filter(|b| !b.is_empty()) else { return Ok(()) };
        to.write_all(bytes)?;
    }
}

fn splice_all(from: &socket2::Socket, to: &socket2::Socket) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(BULK_LEN as libc::c_int));
    loop {
        let n = splice(from, None, &write, None, BULK_LEN, SpliceFFlags::SPLICE_F_MOVE)?;
        if n == 0 {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            left -= splice(&read, None, to, None, left, SpliceFFlags::SPLICE_F_MOVE)?;
        }
    }
}
