//! Pieces of the UDP relay both sides share: socket sizing and batching datagrams onto a
//! data stream.

use crate::relay::socket::UdpSocket;
use bytes::Bytes;
use hostnet_protocol::datagram::datagram_header;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::relay::mmsg::{self, MMSG_BATCH};
use crate::transport::handshake::FrameReader;

use crate::transport::raw::{self, RawStream};

/// Socket receive buffer asked for on relay sockets: a burst of small datagrams must fit while
/// the relay task is busy. The kernel caps it at `net.core.rmem_max` unless the process may
/// go beyond (see [`size_receive_buffer`]).
pub const UDP_SOCKET_BUFFER: usize = 4 << 20;

/// Gives a relay socket a receive buffer of [`UDP_SOCKET_BUFFER`]. On Linux the kernel caps
/// what a process asks for at `net.core.rmem_max` — 208 KiB on most distributions, where a
/// 64-byte datagram takes ~1 KiB of buffer, so a few hundred datagrams — unless the process
/// has `CAP_NET_ADMIN` (`SO_RCVBUFFORCE`): the agent when it intercepts guest→host traffic, or
/// anything run as root. When the buffer is capped below what was asked, it says so once per
/// process (a burst beyond it is dropped by the kernel, counted in `/proc/net/udp`).
pub fn size_receive_buffer(s: socket2::SockRef<'_>) {
    #[cfg(target_os = "linux")]
    if nix::sys::socket::setsockopt(&*s, nix::sys::socket::sockopt::RcvBufForce, &UDP_SOCKET_BUFFER).is_ok() {
        return;
    }
    let _ = s.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    // Linux reports twice what it grants (the other half is its bookkeeping).
    let granted = s.recv_buffer_size().unwrap_or(0) / if cfg!(target_os = "linux") { 2 } else { 1 };
    static TOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if granted < UDP_SOCKET_BUFFER && !TOLD.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::info!(
            "UDP receive buffers are capped at {granted} bytes (asked for {UDP_SOCKET_BUFFER}): a burst of \
             datagrams beyond that is dropped by the kernel; on Linux, raise net.core.rmem_max for bursty \
             UDP traffic"
        );
    }
}

/// Bytes of datagrams gathered into one write to the stream.
pub const BATCH_BYTES: usize = 256 * 1024;

/// Datagrams gathered for one write to a data stream: a burst costs one system call, not one
/// per datagram.
#[derive(Debug, Default)]
pub struct DatagramBatch {
    out: Vec<u8>,
    count: usize,
}

impl DatagramBatch {
    /// Appends one datagram. Payloads the framing cannot carry are refused (`false`).
    pub fn push(&mut self, payload: &[u8]) -> bool {
        let Some(header) = datagram_header(payload.len()) else {
            return false;
        };
        self.out.extend_from_slice(&header);
        self.out.extend_from_slice(payload);
        self.count += 1;
        true
    }

    /// Whether another datagram should wait for the next batch.
    pub fn is_full(&self) -> bool {
        self.out.len() >= BATCH_BYTES
    }

    /// Datagrams in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The framed datagrams so far.
    pub fn bytes(&self) -> &[u8] {
        &self.out
    }

    /// Empties the batch, keeping at most `capacity` bytes of its buffer.
    pub fn clear(&mut self, capacity: usize) {
        self.out.clear();
        self.out.shrink_to(capacity);
        self.count = 0;
    }

    /// Writes the batch to `s` and empties it (its buffer kept for the next).
    pub async fn flush<S: RawStream>(&mut self, s: &S) -> std::io::Result<()> {
        let r = raw::write_all(s, &self.out).await;
        self.clear(usize::MAX);
        r
    }
}

/// When a flow last moved a datagram, shared by its two directions.
#[derive(Debug)]
pub struct Activity {
    start: tokio::time::Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    pub fn new() -> Self {
        Activity { start: tokio::time::Instant::now(), last_ms: std::sync::atomic::AtomicU64::new(0) }
    }

    /// Records a datagram now.
    pub fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Resolves once no datagram has moved for `limit`.
    pub async fn idle_for(&self, limit: std::time::Duration) {
        loop {
            let last = self.start
                + std::time::Duration::from_millis(self.last_ms.load(std::sync::atomic::Ordering::Relaxed));
            let deadline = last + limit;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// What a UDP relay moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct UdpStats {
    /// Datagrams from the stream sent on the socket.
    pub to_socket: u64,
    /// Datagrams from the socket sent on the stream.
    pub from_socket: u64,
    /// ICMP "port unreachable" seen: nobody listened at the socket's peer at the time.
    pub unreachable: u64,
}

/// Relays datagrams between a data stream and a `connect`ed UDP socket until the stream ends,
/// either side fails, `idle` passes without a datagram, or `shutdown`.
///
/// `early`: datagrams from the socket's peer that reached its owner some other way before the
/// socket existed (the agent's catch-all socket for guest→host flows); they go to the stream as
/// if the socket had received them, until the sender is dropped.
///
/// Both directions run side by side: a blocked write one way must never stall the other, or
/// two relays writing to each other could wait forever.
pub async fn relay_connected<S: RawStream>(
    stream: &S,
    reader: &mut FrameReader,
    socket: &UdpSocket,
    idle: Option<std::time::Duration>,
    early: Option<mpsc::Receiver<Bytes>>,
    shutdown: &CancellationToken,
) -> UdpStats {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let (to_socket, from_socket, unreachable) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let activity = Activity::new();
    // ICMP "port unreachable" after an earlier datagram: UDP gives no other signal that the
    // peer is not there (yet), so count it and carry on.
    let refused = |e: &std::io::Error| {
        let yes = e.kind() == std::io::ErrorKind::ConnectionRefused;
        if yes {
            unreachable.fetch_add(1, Relaxed);
        }
        yes
    };
    let up = async {
        let mut burst = Vec::with_capacity(MMSG_BATCH);
        loop {
            // The whole burst already read goes in one system call.
            match reader.read_burst(stream, &mut burst, MMSG_BATCH).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
            let sent = mmsg::send_batch(socket, &burst, None, &refused).await;
            burst.clear();
            match sent {
                Ok(n) => {
                    to_socket.fetch_add(n as u64, Relaxed);
                    activity.touch();
                }
                Err(_) => return,
            }
        }
    };
    let down = async {
        let mut batch = DatagramBatch::default();
        let mut early = early;
        loop {
            let received = match early.as_mut() {
                Some(queue) => tokio::select! {
                    biased;
                    d = queue.recv() => Err(d),
                    r = mmsg::recv_batch(socket, MMSG_BATCH, |d, _| _ = batch.push(d)) => Ok(r),
                },
                None => Ok(mmsg::recv_batch(socket, MMSG_BATCH, |d, _| _ = batch.push(d)).await),
            };
            let received = match received {
                Ok(r) => r,
                Err(Some(d)) => {
                    // An early datagram: with whatever else is queued, in one write (a batch's
                    // worth at most; the rest in the next turns).
                    batch.push(&d);
                    while !batch.is_full() {
                        let Some(d) = early.as_mut().and_then(|q| q.try_recv().ok()) else { break };
                        batch.push(&d);
                    }
                    from_socket.fetch_add(batch.len() as u64, Relaxed);
                    activity.touch();
                    if batch.flush(stream).await.is_err() {
                        return;
                    }
                    continue;
                }
                Err(None) => {
                    early = None;
                    continue;
                }
            };
            match received {
                Ok(got) => {
                    // Take whatever else already waits, and send it all in one write. A short
                    // batch means the socket was drained: no need to ask again.
                    let mut last = got.taken();
                    while last == MMSG_BATCH && !batch.is_full() {
                        match mmsg::try_recv_batch(socket, MMSG_BATCH, |d, _| _ = batch.push(d)) {
                            Ok(got) => last = got.taken(),
                            Err(e) if refused(&e) => continue,
                            Err(_) => break,
                        };
                    }
                    if batch.is_empty() {
                        continue;
                    }
                    from_socket.fetch_add(batch.len() as u64, Relaxed);
                    activity.touch();
                    if batch.flush(stream).await.is_err() {
                        return;
                    }
                }
                Err(e) if refused(&e) => {}
                Err(_) => return,
            }
        }
    };
    let idle = async {
        match idle {
            Some(limit) => activity.idle_for(limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = idle => {}
        _ = up => {}
        _ = down => {}
    }
    UdpStats {
        to_socket: to_socket.into_inner(),
        from_socket: from_socket.into_inner(),
        unreachable: unreachable.into_inner(),
    }
}

/// A UDP socket on the loopback of `target`'s family, `connect`ed to `target` (so it hears only
/// `target`), with a large receive buffer and, when given, an `SO_MARK`; registered in `own`.
pub async fn connected_socket(
    target: std::net::SocketAddr,
    mark: Option<u32>,
    own: &crate::discovery::own::OwnSockets,
) -> std::io::Result<UdpSocket> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    let local: SocketAddr =
        if target.is_ipv6() { (Ipv6Addr::LOCALHOST, 0).into() } else { (Ipv4Addr::LOCALHOST, 0).into() };
    let s = own.socket(local, socket2::Type::DGRAM)?;
    #[cfg(target_os = "linux")]
    if let Some(mark) = mark {
        s.set_mark(mark)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = mark;
    size_receive_buffer(socket2::SockRef::from(&s));
    s.bind(&local.into())?;
    own.register_local(&s);
    let socket = UdpSocket::from_std(s.into())?;
    socket.connect(target).await?;
    Ok(socket)
}
