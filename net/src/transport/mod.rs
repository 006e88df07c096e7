//! Transports: how the proxy reaches the agent, and how the agent waits for it.
//!
//! Everything above this module is transport-blind: it asks a [`Connector`] for a new stream
//! (one per TCP connection, plus the control stream) or an [`Acceptor`] for the next one, and
//! gets a [`TransportStream`] either way.
//!
//! One-way, bottom up: [`raw`] (the readiness-based stream trait) ← `vsock`, [`hyperv`] (the
//! sockets Linux and Windows give) ← [`stream`] (the one stream type) ← this module (specs,
//! connectors, acceptors) ← [`handshake`] (the frames at a stream's start).

#[cfg(unix)]
pub mod fd;
pub mod handshake;
pub mod hyperv;
pub mod raw;
pub mod roaming;
pub mod spare;
pub mod stream;
#[cfg(target_os = "linux")]
pub mod vsock;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
#[cfg(unix)]
use std::path::Path;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

#[cfg(unix)]
use crate::transport::fd::FdStream;
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};

use crate::discovery::own::OwnSockets;
use crate::transport::hyperv::Guid;
use crate::transport::stream::TransportStream;

/// A boxed, sendable future, as the transport traits return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens new streams to the far side (the proxy's view of the agent).
pub trait Connector: Send + Sync + fmt::Debug + fmt::Display {
    fn connect(&self) -> BoxFuture<'_, Result<TransportStream, TransportError>>;

    /// Takes back a stream whose connection ended cleanly, for another connection to use
    /// (`spare::Spares` keeps it); by default it is closed.
    fn give_back(&self, stream: TransportStream) {
        drop(stream);
    }

    /// The streams held for connections to come, if this connector holds any.
    fn pool(&self) -> Option<spare::SpareCounts> {
        None
    }
}

/// Yields streams the far side opened (the agent's view of the proxy).
pub trait Acceptor: Send + Sync + fmt::Debug {
    /// The next stream and a description of its peer, for logs.
    fn accept(&self) -> BoxFuture<'_, io::Result<(TransportStream, String)>>;
}

/// Why a transport could not be set up or a stream opened; each says what to check.
#[derive(Debug, Error)]
pub enum TransportError {
    #[error(
        "transport spec {0:?} not understood; use unix:PATH, tcp:ADDR:PORT, vsock:CID:PORT, \
         hybrid:PATH:PORT or hyperv:VMID:PORT"
    )]
    BadSpec(String),
    #[error("cannot reach {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{target}: the VM's vsock socket answered {answer:?} instead of OK — is hostnet-agent \
         running in the VM and listening on that port?"
    )]
    HybridRefused { target: String, answer: String },
    #[error("cannot listen on {target}: {source}")]
    Bind {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("{target} is not available on this platform")]
    Unsupported { target: String },
}

/// `VMADDR_CID_ANY`: listen on every CID this machine has (`vsock:any:PORT`).
pub const VSOCK_CID_ANY: u32 = u32::MAX;

/// A parsed `--transport` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportSpec {
    /// `unix:PATH` — a Unix stream socket; the netns stand-in uses this.
    Unix(PathBuf),
    /// `tcp:ADDR:PORT` — plain TCP, for tests and debugging.
    Tcp(SocketAddr),
    /// `vsock:CID:PORT` — AF_VSOCK; `CID` may be `any` when listening.
    Vsock { cid: u32, port: u32 },
    /// `hybrid:PATH:PORT` — a VMM's Unix socket that speaks `CONNECT <port>\n` / `OK …\n`
    /// (Firecracker, Cloud Hypervisor, vhost-device-vsock).
    Hybrid { path: PathBuf, port: u32 },
    /// `hyperv:VMID:PORT` — a Hyper-V socket to the VM `VMID` (a GUID) and the service id of
    /// vsock port `PORT` (see [`crate::transport::hyperv`]); Windows hosts only. Listening, `VMID` may be
    /// `any` (`HV_GUID_WILDCARD`: every VM).
    HyperV { vm_id: Guid, port: u32 },
}

impl FromStr for TransportSpec {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TransportError::BadSpec(s.to_owned());
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "unix" if !rest.is_empty() => Ok(TransportSpec::Unix(rest.into())),
            "tcp" => rest.parse().map(TransportSpec::Tcp).map_err(|_| bad()),
            "vsock" => {
                let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
                let cid = match cid {
                    "any" => VSOCK_CID_ANY,
                    n => n.parse().map_err(|_| bad())?,
                };
                Ok(TransportSpec::Vsock { cid, port: port.parse().map_err(|_| bad())? })
            }
            "hybrid" => {
                let (path, port) = rest.rsplit_once(':').ok_or_else(bad)?;
                if path.is_empty() {
                    return Err(bad());
                }
                Ok(TransportSpec::Hybrid { path: path.into(), port: port.parse().map_err(|_| bad())? })
            }
            "hyperv" => {
                let (vm_id, port) = rest.rsplit_once(':').ok_or_else(bad)?;
                Ok(TransportSpec::HyperV {
                    vm_id: match vm_id {
                        "any" => hyperv::WILDCARD,
                        id => id.parse().map_err(|_| bad())?,
                    },
                    port: port.parse().map_err(|_| bad())?,
                })
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for TransportSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            TransportSpec::Tcp(a) => write!(f, "tcp:{a}"),
            TransportSpec::Vsock { cid: VSOCK_CID_ANY, port } => write!(f, "vsock:any:{port}"),
            TransportSpec::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            TransportSpec::Hybrid { path, port } => write!(f, "hybrid:{}:{port}", path.display()),
            TransportSpec::HyperV { vm_id: hyperv::WILDCARD, port } => write!(f, "hyperv:any:{port}"),
            TransportSpec::HyperV { vm_id, port } => write!(f, "hyperv:{vm_id}:{port}"),
        }
    }
}

impl TransportSpec {
    /// The connector for this spec (proxy side).
    pub fn connector(&self) -> Arc<dyn Connector> {
        Arc::new(SpecConnector(self.clone()))
    }

    /// Streams kept opened ahead of need by default ([`spare::Spares`]): for a VM's transports,
    /// where a stream's set-up is a round trip through the VMM and the guest; none where it is
    /// a local `connect` (`unix:`, `tcp:`).
    pub fn default_spare_streams(&self) -> usize {
        match self {
            TransportSpec::Vsock { .. } | TransportSpec::Hybrid { .. } | TransportSpec::HyperV { .. } => {
                spare::VM_SPARES
            }
            TransportSpec::Unix(_) | TransportSpec::Tcp(_) => 0,
        }
    }

    /// Starts listening (agent side). A `tcp:` listener is registered in `own`, so the side's
    /// watcher never advertises it.
    pub async fn bind(&self, own: &OwnSockets) -> Result<Box<dyn Acceptor>, TransportError> {
        let bind_err = |source| TransportError::Bind { target: self.to_string(), source };
        match self {
            #[cfg(unix)]
            TransportSpec::Unix(path) => {
                remove_stale_socket(path).await;
                let l = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
                l.set_nonblocking(true).map_err(bind_err)?;
                Ok(Box::new(UnixAcceptor(fd::register(l, tokio::io::Interest::READABLE).map_err(bind_err)?)))
            }
            TransportSpec::Tcp(addr) => {
                let l = tcp_listener(*addr, own).map_err(bind_err)?;
                Ok(Box::new(TcpAcceptor(l)))
            }
            #[cfg(target_os = "linux")]
            TransportSpec::Vsock { cid, port } => {
                let l = crate::transport::vsock::VsockListener::bind(*cid, *port).map_err(bind_err)?;
                Ok(Box::new(VsockAcceptor(l)))
            }
            #[cfg(windows)]
            TransportSpec::HyperV { vm_id, port } => {
                let l =
                    hyperv::HyperVListener::bind(&hyperv::HvAddr::vsock(*vm_id, *port)).map_err(bind_err)?;
                Ok(Box::new(HyperVAcceptor(l)))
            }
            #[cfg(not(windows))]
            TransportSpec::HyperV { .. } => Err(TransportError::Unsupported {
                target: format!("listening on {self} (Hyper-V sockets are Windows only)"),
            }),
            _ => Err(TransportError::Unsupported { target: format!("listening on {self}") }),
        }
    }
}

/// A transport inside this process: each `connect` makes a connected pair of Unix sockets and
/// hands one end to the acceptor. The in-process tests run the proxy and the agent over it; it
/// needs no file, no port and no privilege. Once the acceptor is gone, `connect` fails as a
/// transport to a stopped agent does.
#[cfg(unix)]
pub fn in_process(name: &str) -> (Arc<dyn Connector>, Box<dyn Acceptor>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (
        Arc::new(PairConnector { name: name.to_owned(), tx }),
        Box::new(PairAcceptor { rx: tokio::sync::Mutex::new(rx) }),
    )
}

#[cfg(unix)]
#[derive(Debug)]
struct PairConnector {
    name: String,
    tx: tokio::sync::mpsc::UnboundedSender<FdStream>,
}

#[cfg(unix)]
impl fmt::Display for PairConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "in-process:{}", self.name)
    }
}

#[cfg(unix)]
impl Connector for PairConnector {
    fn connect(&self) -> BoxFuture<'_, Result<TransportStream, TransportError>> {
        Box::pin(async move {
            let connect_err = |source| TransportError::Connect { target: self.to_string(), source };
            let (ours, theirs) = FdStream::pair().map_err(connect_err)?;
            self.tx.send(theirs).map_err(|_| connect_err(io::ErrorKind::ConnectionRefused.into()))?;
            Ok(TransportStream::Unix(ours))
        })
    }
}

#[cfg(unix)]
#[derive(Debug)]
struct PairAcceptor {
    rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<FdStream>>,
}

#[cfg(unix)]
impl Acceptor for PairAcceptor {
    fn accept(&self) -> BoxFuture<'_, io::Result<(TransportStream, String)>> {
        Box::pin(async move {
            match self.rx.lock().await.recv().await {
                Some(s) => Ok((TransportStream::Unix(s), "in-process peer".to_owned())),
                // Every connector is gone: nothing will ever come.
                None => std::future::pending().await,
            }
        })
    }
}

/// A socket file left behind by a process that died is removed; a live one is kept (and the
/// bind then fails with "address in use", which is the truth).
#[cfg(unix)]
async fn remove_stale_socket(path: &Path) {
    if tokio::fs::symlink_metadata(path).await.is_ok() && tokio::net::UnixStream::connect(path).await.is_err()
    {
        let _ = tokio::fs::remove_file(path).await;
    }
}

#[derive(Debug)]
struct SpecConnector(TransportSpec);

impl fmt::Display for SpecConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Connector for SpecConnector {
    fn connect(&self) -> BoxFuture<'_, Result<TransportStream, TransportError>> {
        Box::pin(async move {
            let connect_err = |source| TransportError::Connect { target: self.0.to_string(), source };
            match &self.0 {
                #[cfg(unix)]
                TransportSpec::Unix(path) => unix_connect(path).await.map(unix_stream).map_err(connect_err),
                TransportSpec::Tcp(addr) => {
                    let s = TcpStream::connect(addr).await.map_err(connect_err)?;
                    let _ = s.set_nodelay(true);
                    Ok(TransportStream::Tcp(s))
                }
                #[cfg(target_os = "linux")]
                TransportSpec::Vsock { cid, port } => crate::transport::vsock::connect(*cid, *port)
                    .await
                    .map(TransportStream::Vsock)
                    .map_err(connect_err),
                #[cfg(not(target_os = "linux"))]
                TransportSpec::Vsock { .. } => {
                    Err(TransportError::Unsupported { target: self.0.to_string() })
                }
                #[cfg(unix)]
                TransportSpec::Hybrid { path, port } => hybrid_connect(path, *port, &self.0).await,
                #[cfg(not(unix))]
                TransportSpec::Unix(_) | TransportSpec::Hybrid { .. } => Err(TransportError::Unsupported {
                    target: format!(
                        "{} (Unix sockets: macOS and Linux; on Windows use hyperv: or tcp:)",
                        self.0
                    ),
                }),
                #[cfg(windows)]
                TransportSpec::HyperV { vm_id, port } => {
                    let addr = hyperv::HvAddr::vsock(*vm_id, *port);
                    let std = tokio::task::spawn_blocking(move || hyperv::sys::connect(&addr))
                        .await
                        .map_err(io::Error::other)
                        .and_then(|r| r)
                        .map_err(connect_err)?;
                    std.set_nonblocking(true).map_err(connect_err)?;
                    TcpStream::from_std(std).map(TransportStream::Tcp).map_err(connect_err)
                }
                #[cfg(not(windows))]
                TransportSpec::HyperV { .. } => Err(TransportError::Unsupported {
                    target: format!("{} (Hyper-V sockets are Windows only)", self.0),
                }),
            }
        })
    }
}

/// Send buffer of a Unix transport stream (the unix: stand-in, hybrid vsock). Linux's default
/// (`net.core.wmem_default`, 208 KiB) is less than one relay chunk (up to 1 MiB and its
/// header), so every bulk chunk took several writes and a wake-up of the writer between them.
/// The kernel doubles the value and caps it at twice `net.core.wmem_max` (416 KiB where that
/// is left at its default); it bounds what one stream holds queued in the kernel, nothing is
/// allocated up front.
#[cfg(unix)]
pub const UNIX_SEND_BUFFER: usize = 1024 * 1024;

/// A Unix transport stream with its send buffer set ([`UNIX_SEND_BUFFER`]; best effort).
#[cfg(unix)]
fn unix_stream(s: FdStream) -> TransportStream {
    let _ = s.socket().set_send_buffer_size(UNIX_SEND_BUFFER);
    TransportStream::Unix(s)
}

/// Connects a Unix stream socket. A connect to a listening Unix socket completes at once unless
/// its backlog is full, so the stream is taken as it is, not after waiting for the reactor to
/// report it writable (tokio's `UnixStream::connect` does: a trip through the reactor and a
/// `getsockopt` per new relayed connection). A full backlog — the far side accepting slower
/// than connections come, in a burst of thousands — answers `EAGAIN` at once (tokio's connect
/// would fail the same way): the connect is tried again, 1 ms later and doubling to 50 ms,
/// for at most [`BACKLOG_WAIT`], as a blocking connect would wait.
#[cfg(unix)]
async fn unix_connect(path: &Path) -> io::Result<FdStream> {
    use backon::{ExponentialBuilder, Retryable};
    use socket2::{Domain, SockAddr, Type};
    let address = SockAddr::unix(path)?;
    let once = || async {
        let socket = crate::sys::new_socket(Domain::UNIX, Type::STREAM)?;
        socket.connect(&address)?;
        FdStream::new(socket)
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(1))
        .with_max_delay(std::time::Duration::from_millis(50))
        .without_max_times()
        .with_total_delay(Some(BACKLOG_WAIT));
    once.retry(backoff).when(|e: &io::Error| e.kind() == io::ErrorKind::WouldBlock).await
}

/// How long a Unix transport connect waits for room in the far side's full backlog before it
/// fails: the opening of a relayed connection waits that long at most, as long as a TCP connect
/// to a local server may take (`crate::connect::CONNECT_TIMEOUT`, which checks they agree).
#[cfg(unix)]
pub const BACKLOG_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest answer line accepted from a hybrid-vsock socket.
#[cfg(unix)]
const MAX_HYBRID_LINE: usize = 64;

/// `CONNECT <port>\n`, then expects `OK <port>\n` (vhost-device-vsock echoes the guest port,
/// Firecracker sends a host port: either is fine). Nothing may follow the `CONNECT` line before
/// the answer: vhost-device-vsock 0.3 reads the line through a buffered reader and drops what
/// came with it, so the opening waits for `OK` (Firecracker reads byte by byte).
#[cfg(unix)]
async fn hybrid_connect(
    path: &Path,
    port: u32,
    spec: &TransportSpec,
) -> Result<TransportStream, TransportError> {
    let target = spec.to_string();
    let io_err = |source| TransportError::Connect { target: target.clone(), source };
    let s = unix_connect(path).await.map_err(io_err)?;
    // The VMM hangs up on a CONNECT to a port nobody listens on in the VM (the agent is not
    // running, or restarting): say that, not "broken pipe".
    let hung_up = |e: io::Error| match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
            TransportError::HybridRefused { target: target.clone(), answer: "<closed>".to_owned() }
        }
        _ => io_err(e),
    };
    raw::write_all(&s, format!("CONNECT {port}\n").as_bytes()).await.map_err(hung_up)?;
    // Never a byte past the newline: whatever follows it already belongs to the agent. What has
    // arrived is peeked at first, so a whole line is taken in one read (not one per byte);
    // without a newline in sight, one byte is read, waiting for it as any read does.
    let mut line = Vec::with_capacity(16);
    let mut buf = [0u8; MAX_HYBRID_LINE + 1];
    loop {
        let want = line_in_sight(&s, &mut buf).unwrap_or(1);
        let n = raw::read(&s, buf.get_mut(..want).unwrap_or_default()).await.map_err(hung_up)?;
        let got = buf.get(..n).unwrap_or_default();
        let (text, ended) = match got.split_last() {
            Some((b'\n', text)) => (text, true),
            _ => (got, false),
        };
        line.extend_from_slice(text);
        if ended {
            break;
        }
        if n == 0 || line.len() >= MAX_HYBRID_LINE {
            let answer = String::from_utf8_lossy(&line).into_owned();
            return Err(TransportError::HybridRefused {
                target,
                answer: if n == 0 { format!("{answer}<closed>") } else { answer },
            });
        }
    }
    match line.strip_prefix(b"OK ") {
        Some(rest) if !rest.is_empty() && rest.iter().all(u8::is_ascii_digit) => Ok(unix_stream(s)),
        _ => {
            Err(TransportError::HybridRefused { target, answer: String::from_utf8_lossy(&line).into_owned() })
        }
    }
}

/// How many bytes of what `s` holds now make up a line, its newline included (a peek: nothing
/// is taken, readiness is left as it was); `None` if no newline has arrived.
#[cfg(unix)]
fn line_in_sight(s: &FdStream, buf: &mut [u8]) -> Option<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `buf` is valid for `buf.len()` bytes; the socket is non-blocking.
    let n = unsafe {
        libc::recv(
            s.socket().as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    let n = usize::try_from(n).ok()?;
    Some(buf.get(..n)?.iter().position(|&b| b == b'\n')? + 1)
}

#[cfg(unix)]
#[derive(Debug)]
struct UnixAcceptor(tokio::io::unix::AsyncFd<std::os::unix::net::UnixListener>);

#[cfg(unix)]
impl Acceptor for UnixAcceptor {
    fn accept(&self) -> BoxFuture<'_, io::Result<(TransportStream, String)>> {
        Box::pin(async move {
            let s = self.0.async_io(tokio::io::Interest::READABLE, crate::sys::accept_nonblocking).await?;
            let stream = FdStream::new(s)?;
            Ok((unix_stream(stream), "unix peer".to_owned()))
        })
    }
}

#[derive(Debug)]
struct TcpAcceptor(TcpListener);

impl Acceptor for TcpAcceptor {
    fn accept(&self) -> BoxFuture<'_, io::Result<(TransportStream, String)>> {
        Box::pin(async move {
            let (s, peer) = self.0.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((TransportStream::Tcp(s), peer.to_string()))
        })
    }
}

#[cfg(windows)]
#[derive(Debug)]
struct HyperVAcceptor(hyperv::HyperVListener);

#[cfg(windows)]
impl Acceptor for HyperVAcceptor {
    fn accept(&self) -> BoxFuture<'_, io::Result<(TransportStream, String)>> {
        Box::pin(async move {
            let (s, peer) = self.0.accept().await?;
            Ok((TransportStream::Tcp(s), peer))
        })
    }
}

#[cfg(target_os = "linux")]
#[derive(Debug)]
struct VsockAcceptor(crate::transport::vsock::VsockListener);

#[cfg(target_os = "linux")]
impl Acceptor for VsockAcceptor {
    fn accept(&self) -> BoxFuture<'_, io::Result<(TransportStream, String)>> {
        Box::pin(async move {
            let (s, peer) = self.0.accept().await?;
            Ok((TransportStream::Vsock(s), peer))
        })
    }
}

/// A TCP listener as `TcpListener::bind` makes one (`SO_REUSEADDR`), registered in `own`
/// before it is bound, so the side's listener watcher never forwards it.
fn tcp_listener(addr: std::net::SocketAddr, own: &OwnSockets) -> io::Result<TcpListener> {
    let s = own.socket(addr, socket2::Type::STREAM)?;
    crate::sys::prepare_listener(&s)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(unix)]
    use crate::transport::raw::RawStream;

    #[test]
    fn specs_parse_and_print_back() {
        for s in [
            "unix:/run/hostnet/agent.sock",
            "tcp:127.0.0.1:5000",
            "tcp:[::1]:5000",
            "vsock:3:1024",
            "vsock:any:1024",
            "hybrid:/run/vm.vsock:1024",
            "hybrid:/odd:path/v.sock:7",
            "hyperv:A42E7CDA-D03F-480C-9CC2-A4DE20ABB878:1024",
            "hyperv:any:1025",
        ] {
            let spec: TransportSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        assert_eq!(
            "hybrid:/a:b/c:9".parse::<TransportSpec>().unwrap(),
            TransportSpec::Hybrid { path: "/a:b/c".into(), port: 9 }
        );
    }

    #[test]
    fn hyperv_specs_take_any_guid_spelling() {
        let spec: TransportSpec = "hyperv:{a42e7cda-d03f-480c-9cc2-a4de20abb878}:1024".parse().unwrap();
        let TransportSpec::HyperV { vm_id, port } = &spec else { panic!("{spec:?}") };
        assert_eq!(*port, 1024);
        assert_eq!(vm_id.to_string(), "A42E7CDA-D03F-480C-9CC2-A4DE20ABB878");
        assert_eq!(spec.to_string(), "hyperv:A42E7CDA-D03F-480C-9CC2-A4DE20ABB878:1024");
    }

    #[test]
    fn hyperv_any_is_the_wildcard_vm_id() {
        let spec: TransportSpec = "hyperv:any:1025".parse().unwrap();
        assert_eq!(spec, TransportSpec::HyperV { vm_id: hyperv::WILDCARD, port: 1025 });
        let zeros: TransportSpec = "hyperv:00000000-0000-0000-0000-000000000000:1025".parse().unwrap();
        assert_eq!(zeros.to_string(), "hyperv:any:1025");
    }

    #[cfg(not(windows))]
    #[tokio::test]
    async fn hyperv_elsewhere_says_it_is_windows_only() {
        let spec: TransportSpec = "hyperv:a42e7cda-d03f-480c-9cc2-a4de20abb878:1024".parse().unwrap();
        let err = spec.connector().connect().await.unwrap_err();
        assert!(matches!(err, TransportError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("Windows only"), "{err}");
        let listen: TransportSpec = "hyperv:any:1025".parse().unwrap();
        let err = listen.bind(&OwnSockets::new()).await.unwrap_err();
        assert!(matches!(err, TransportError::Unsupported { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "listening on hyperv:any:1025 (Hyper-V sockets are Windows only) is not available on this platform"
        );
    }

    #[test]
    fn bad_specs_explain_the_syntax() {
        for s in [
            "",
            "unix:",
            "vsock:3",
            "vsock:x:1",
            "hybrid:/p",
            "hybrid::5",
            "tcp:nope",
            "ftp:x",
            "hyperv:1024",
            "hyperv:myvm:1024",
            "hyperv:a42e7cda-d03f-480c-9cc2-a4de20abb878:",
            "hyperv:a42e7cda-d03f-480c-9cc2-a4de20abb878:port",
        ] {
            let err = s.parse::<TransportSpec>().unwrap_err();
            assert!(err.to_string().contains("unix:PATH, tcp:ADDR:PORT"), "{s}: {err}");
        }
    }

    /// A Unix stream tokio accepted, as the relay's stream type.
    #[cfg(unix)]
    fn fd_stream(s: tokio::net::UnixStream) -> FdStream {
        FdStream::new(socket2::Socket::from(std::os::fd::OwnedFd::from(s.into_std().unwrap()))).unwrap()
    }

    #[cfg(unix)]
    /// A stand-in for a VMM's hybrid-vsock socket: answers `CONNECT` with `answer`, then echoes.
    async fn fake_vmm(answer: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        fake_vmm_in_parts(vec![answer]).await
    }

    #[cfg(unix)]
    /// [`fake_vmm`] whose answer goes out in `parts`, 20 ms apart; every connection is served.
    async fn fake_vmm_in_parts(parts: Vec<&'static [u8]>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            loop {
                let s = fd_stream(listener.accept().await.unwrap().0);
                let parts = parts.clone();
                tokio::spawn(async move {
                    assert_eq!(read_exactly(&s, 13).await, b"CONNECT 1024\n");
                    for (i, part) in parts.into_iter().enumerate() {
                        if i > 0 {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                        raw::write_all(&s, part).await.unwrap();
                    }
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = raw::read(&s, &mut buf).await {
                        raw::write_all(&s, &buf[..n]).await.unwrap();
                    }
                });
            }
        });
        (dir, path)
    }

    /// The next `n` bytes of `s`, waiting for them.
    #[cfg(unix)]
    async fn read_exactly<S: RawStream>(s: &S, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        let mut filled = 0;
        while filled < n {
            filled += raw::read(s, &mut buf[filled..]).await.unwrap();
        }
        buf
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn hybrid_connect_accepts_ok_and_keeps_following_bytes() {
        // The agent's first bytes arrive glued to the OK line: they must not be swallowed.
        let (_dir, path) = fake_vmm(b"OK 1024\nHNET").await;
        let spec = TransportSpec::Hybrid { path, port: 1024 };
        let s = spec.connector().connect().await.unwrap();
        assert_eq!(read_exactly(&s, 4).await, b"HNET");
        let mut buf = [0u8; 4];
        raw::write_all(&s, b"ping").await.unwrap();
        let n = raw::read(&s, &mut buf).await.unwrap();
        assert_eq!(&buf[..n], &b"ping"[..n]);
        s.shutdown_write().unwrap();
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_hybrid_stream_opened_ahead_of_need_is_handed_out_and_carries_bytes() {
        let (_dir, path) = fake_vmm(b"OK 1024\n").await;
        let spec = TransportSpec::Hybrid { path, port: 1024 };
        assert_eq!(spec.default_spare_streams(), spare::VM_SPARES);
        assert_eq!(TransportSpec::Unix("/x".into()).default_spare_streams(), 0);
        let spares = spare::Spares::new(spec.connector(), 1);
        let _first = spares.connect().await.unwrap();
        spare::tests::until("a spare", || spares.counts().ready == 1).await;
        // Handed out past its `OK` line, registered again on this thread: bytes go both ways.
        let s = spares.connect().await.unwrap();
        assert_eq!(spares.counts().taken, 1);
        raw::write_all(&s, b"ping").await.unwrap();
        assert_eq!(read_exactly(&s, 4).await, b"ping");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn hybrid_connect_reads_an_ok_line_that_comes_in_pieces_and_nothing_past_it() {
        let (_dir, path) = fake_vmm_in_parts(vec![b"OK 10", b"24\nHN", b"ET"]).await;
        let s = TransportSpec::Hybrid { path, port: 1024 }.connector().connect().await.unwrap();
        assert_eq!(read_exactly(&s, 4).await, b"HNET");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_hybrid_answer_line_without_end_is_refused() {
        let long: &'static [u8] = &[b'A'; 200];
        let (_dir, path) = fake_vmm(long).await;
        let err = TransportSpec::Hybrid { path, port: 1024 }.connector().connect().await.unwrap_err();
        assert!(
            matches!(&err, TransportError::HybridRefused { answer, .. } if answer.len() == MAX_HYBRID_LINE),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn hybrid_refusal_is_a_sentence() {
        let (_dir, path) = fake_vmm(b"NOPE\n").await;
        let err = TransportSpec::Hybrid { path, port: 1024 }.connector().connect().await.unwrap_err();
        assert!(matches!(err, TransportError::HybridRefused { .. }), "{err}");
        assert!(err.to_string().contains("is hostnet-agent running"), "{err}");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_vmm_hanging_up_on_connect_is_a_refusal_not_a_broken_pipe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // Like a VMM that hangs up at once (nothing listens on the port): our `CONNECT` line
        // then meets a closed socket (EPIPE) or is left unread, which resets us (ECONNRESET).
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                drop(s);
            }
        });
        for _ in 0..20 {
            let err = TransportSpec::Hybrid { path: path.clone(), port: 1024 }
                .connector()
                .connect()
                .await
                .unwrap_err();
            assert!(matches!(err, TransportError::HybridRefused { .. }), "{err}");
            assert!(err.to_string().contains("is hostnet-agent running"), "{err}");
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn unix_connect_to_nothing_names_the_target() {
        let err =
            TransportSpec::Unix("/nonexistent/hostnet.sock".into()).connector().connect().await.unwrap_err();
        assert!(err.to_string().contains("unix:/nonexistent/hostnet.sock"), "{err}");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn vsock_without_a_peer_fails_cleanly() {
        // No vsock loopback exists on most CI machines; either way this must be an error or a
        // stream, never a panic or a hang.
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            TransportSpec::Vsock { cid: 1, port: 1 }.connector().connect(),
        )
        .await;
        if let Ok(Err(e)) = r {
            assert!(e.to_string().contains("vsock:1:1"), "{e}");
        }
    }

    /// A burst that fills the far side's backlog waits for room instead of failing with
    /// `EAGAIN` (seen as resets in the load test's 10 000 connections).
    #[cfg(unix)]
    #[tokio::test]
    async fn a_unix_connect_waits_for_room_in_a_full_backlog() {
        use socket2::{Domain, SockAddr, Socket, Type};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.sock");
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        listener.listen(1).unwrap();
        let mut pending = Vec::new();
        loop {
            let s = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            match s.connect(&SockAddr::unix(&path).unwrap()) {
                Ok(()) => pending.push(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(pending.len() < 64, "the backlog never filled");
        }
        let p = path.clone();
        let connecting = tokio::spawn(async move { unix_connect(&p).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!connecting.is_finished(), "it waits while the backlog is full");
        let _room = listener.accept().unwrap();
        let connected = tokio::time::timeout(std::time::Duration::from_secs(10), connecting).await;
        assert!(connected.unwrap().unwrap().is_ok(), "connected once there was room");
    }
}
