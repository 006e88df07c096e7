//! Many relayed connections over one transport stream (yamux), beside the default of one
//! transport stream per connection — the multiplexing experiment of `docs/performance.md`.
//!
//! The proxy opens one transport stream with `Open::Mux`; from then on each desktop connection
//! is a yamux stream inside it that starts exactly as a transport stream does (preface,
//! `open`, chunks; the agent answers with its preface and `connected`). Per-stream flow
//! control is yamux's (a receive window per stream), so a slow reader stalls only its own
//! stream. What the guest can make the desktop hold is bounded by [`MUX_STREAM_WINDOW`] per
//! stream and the proxy's connection limit (the stream count).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::BytesMut;
use hostnet_protocol::chunk::{self, CHUNK_HEADER_LEN, ChunkDecoder, FIN, RST};
use hostnet_protocol::{FrameDecoder, MAX_OPENING_LEN, PREFACE_LEN, Preface};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use crate::handshake::{HANDSHAKE_TIMEOUT, HandshakeError};
use crate::relay::{Outcome, RELAY_BUF_LEN, RelayCounters};
use crate::stream::{self, RawStream, TransportStream};
use crate::{Connector, TransportError};

/// A yamux stream's receive window (yamux's own, the least it allows): the most a peer may
/// send on one stream before its reader takes it.
pub const MUX_STREAM_WINDOW: usize = yamux::DEFAULT_CREDIT as usize;

/// One relayed connection inside the multiplexed transport stream.
pub type MuxStream = Compat<yamux::Stream>;

/// The transport under the session, buffered both ways: yamux reads a frame's 12-byte header
/// and its body with separate reads, and writes them with separate writes, and flushes after
/// each batch of frames — unbuffered, each of those is a system call.
type Socket = Compat<tokio::io::BufStream<Rewound>>;

/// The session's read and write buffers (one pair per session, not per stream).
const SESSION_BUF: usize = 64 * 1024;

fn buffered(transport: TransportStream, read_ahead: BytesMut) -> Socket {
    let rewound = Rewound { ahead: read_ahead, inner: transport };
    tokio::io::BufStream::with_capacity(SESSION_BUF, SESSION_BUF, rewound).compat()
}

/// A transport stream whose first bytes were read already (with its opening): they are read
/// again first.
struct Rewound {
    ahead: BytesMut,
    inner: TransportStream,
}

impl AsyncRead for Rewound {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.ahead.is_empty() {
            let n = self.ahead.len().min(buf.remaining());
            buf.put_slice(&self.ahead.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rewound {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
type OpenRequest = oneshot::Sender<yamux::Result<yamux::Stream>>;

fn config(max_streams: usize) -> yamux::Config {
    let mut cfg = yamux::Config::default();
    // Windows never grow past the first (yamux grows them toward the bandwidth-delay product;
    // on a local link that gains nothing and lets a peer make each stream hold more).
    cfg.set_max_connection_receive_window(Some(max_streams.max(1) * MUX_STREAM_WINDOW));
    cfg.set_max_num_streams(max_streams.max(1));
    cfg.set_split_send_size(RELAY_BUF_LEN.min(64 * 1024));
    cfg
}

/// The proxy's side: opens streams over one multiplexed transport stream, set up on first use
/// and again after it broke.
#[derive(Debug)]
pub struct MuxConnector {
    inner: Arc<dyn Connector>,
    max_streams: usize,
    session: tokio::sync::Mutex<Option<mpsc::UnboundedSender<OpenRequest>>>,
}

impl MuxConnector {
    /// At most `max_streams` streams at once (the proxy's connection limit: yamux closes the
    /// whole session on one more).
    pub fn new(inner: Arc<dyn Connector>, max_streams: usize) -> Self {
        MuxConnector { inner, max_streams, session: tokio::sync::Mutex::new(None) }
    }

    /// A new stream to the agent.
    pub async fn open(&self) -> Result<MuxStream, TransportError> {
        let failed =
            |e: io::Error| TransportError::Connect { target: format!("mux over {}", self.inner), source: e };
        let requests = {
            let mut session = self.session.lock().await;
            match &*session {
                Some(tx) if !tx.is_closed() => tx.clone(),
                _ => {
                    let transport = self.inner.connect().await?;
                    crate::handshake::send_preface_and(&transport, &hostnet_protocol::Open::Mux {})
                        .await
                        .map_err(|e| failed(io::Error::other(e.to_string())))?;
                    let (tx, rx) = mpsc::unbounded_channel();
                    let conn = yamux::Connection::new(
                        buffered(transport, BytesMut::new()),
                        config(self.max_streams),
                        yamux::Mode::Client,
                    );
                    tokio::spawn(drive_client(conn, rx));
                    *session = Some(tx.clone());
                    tx
                }
            }
        };
        let (tx, rx) = oneshot::channel();
        requests.send(tx).map_err(|_| failed(io::ErrorKind::BrokenPipe.into()))?;
        match rx.await {
            Ok(Ok(s)) => Ok(s.compat()),
            Ok(Err(e)) => Err(failed(io::Error::other(e))),
            Err(_) => Err(failed(io::ErrorKind::BrokenPipe.into())),
        }
    }
}

/// Drives the proxy's session: opens the streams asked for, moves every stream's frames, and
/// refuses streams the agent opens (only the proxy opens streams).
async fn drive_client(
    mut conn: yamux::Connection<Socket>,
    mut requests: mpsc::UnboundedReceiver<OpenRequest>,
) {
    let mut waiting: std::collections::VecDeque<OpenRequest> = Default::default();
    let mut open = true;
    poll_fn(|cx| {
        while open {
            match requests.poll_recv(cx) {
                Poll::Ready(Some(r)) => waiting.push_back(r),
                Poll::Ready(None) => open = false,
                Poll::Pending => break,
            }
        }
        while !waiting.is_empty() {
            match conn.poll_new_outbound(cx) {
                Poll::Ready(r) => {
                    let failed = r.is_err();
                    if let Some(w) = waiting.pop_front() {
                        let _ = w.send(r);
                    }
                    if failed {
                        return Poll::Ready(());
                    }
                }
                Poll::Pending => break,
            }
        }
        loop {
            match conn.poll_next_inbound(cx) {
                // The agent may not open streams: dropped (yamux resets it).
                Poll::Ready(Some(Ok(s))) => drop(s),
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!("the multiplexed stream to the agent broke: {e}");
                    return Poll::Ready(());
                }
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    requests.close();
}

/// The agent's side: serves the streams the proxy opens inside `transport` with `handle`, until
/// the session ends or `shutdown` fires. `read_ahead`: what was read past the opening.
pub async fn serve<F, Fut>(
    transport: TransportStream,
    read_ahead: BytesMut,
    max_streams: usize,
    shutdown: &CancellationToken,
    handle: F,
) where
    F: Fn(MuxStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut conn =
        yamux::Connection::new(buffered(transport, read_ahead), config(max_streams), yamux::Mode::Server);
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = poll_fn(|cx| conn.poll_next_inbound(cx)) => next,
        };
        match next {
            Some(Ok(s)) => {
                tokio::spawn(handle(s.compat()));
            }
            Some(Err(e)) => return tracing::warn!("the multiplexed stream from the proxy broke: {e}"),
            None => return,
        }
    }
}

/// Reads a preface and one frame of at most [`MAX_OPENING_LEN`] bytes from a mux stream, within
/// [`HANDSHAKE_TIMEOUT`] when `timed`; returns it and the bytes read past it.
pub async fn read_opening<T: DeserializeOwned>(
    s: &mut (impl AsyncRead + Unpin),
    timed: bool,
) -> Result<(T, BytesMut), HandshakeError> {
    let read = async {
        let mut buf = BytesMut::with_capacity(256);
        while buf.len() < PREFACE_LEN {
            if s.read_buf(&mut buf).await? == 0 {
                return Err(HandshakeError::Closed);
            }
        }
        let head = buf.split_to(PREFACE_LEN);
        let mut bytes = [0u8; PREFACE_LEN];
        bytes.copy_from_slice(&head);
        Preface::check(bytes)?;
        loop {
            if let Some(frame) = FrameDecoder.decode_at_most(&mut buf, MAX_OPENING_LEN)? {
                return Ok((frame, buf));
            }
            if s.read_buf(&mut buf).await? == 0 {
                return Err(HandshakeError::Closed);
            }
        }
    };
    if !timed {
        return read.await;
    }
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| HandshakeError::TimedOut(HANDSHAKE_TIMEOUT))?
}

/// Relays `local` over a mux stream until both directions finished, as `relay::relay` does
/// over a transport stream (the same chunks, FIN and RST in-band). `lead` goes out first, with
/// the local side's first bytes when they have arrived (the proxy's opening; the agent's
/// answer). With `answer`, the peer's direction starts with its preface and `OpenReply`.
pub async fn relay<L: RawStream>(
    local: &L,
    remote: MuxStream,
    lead: Vec<u8>,
    pending: BytesMut,
    answer: bool,
    counters: &RelayCounters,
    shutdown: &CancellationToken,
) -> Outcome {
    let (mut rd, mut wr) = tokio::io::split(remote);
    let abort = CancellationToken::new();
    let up_done = CancellationToken::new();
    let up = async {
        let end = tokio::select! {
            biased;
            _ = abort.cancelled() => None,
            end = mux_up(local, &mut wr, lead, counters) => Some(end),
        };
        match end {
            Some(Outcome::Closed) => up_done.cancel(),
            Some(_) => abort.cancel(),
            None => {}
        }
        end
    };
    let down = async {
        let end = tokio::select! {
            biased;
            _ = abort.cancelled() => None,
            end = mux_down(&mut rd, local, pending, answer, counters, &up_done) => Some(end),
        };
        if end.is_some_and(|e| e != Outcome::Closed) {
            abort.cancel();
        }
        end
    };
    let outcome = tokio::select! {
        (up, down) = async { tokio::join!(up, down) } => match (up, down) {
            (Some(Outcome::Closed), Some(Outcome::Closed)) => Outcome::Closed,
            (Some(e), _) if e != Outcome::Closed => e,
            (_, Some(e)) => e,
            _ => Outcome::PeerVanished,
        },
        _ = shutdown.cancelled() => Outcome::Cancelled,
    };
    if outcome == Outcome::LocalReset {
        let _ = wr.write_all(&RST).await;
    }
    let _ = wr.shutdown().await;
    if !matches!(outcome, Outcome::Closed | Outcome::Cancelled) {
        let _ = local.set_reset_on_close();
    }
    outcome
}

async fn mux_up<L: RawStream>(
    local: &L,
    wr: &mut tokio::io::WriteHalf<MuxStream>,
    mut lead: Vec<u8>,
    counters: &RelayCounters,
) -> Outcome {
    let mut first = true;
    loop {
        let arrived = std::mem::take(&mut first);
        if !arrived && stream::readable(local).await.is_err() {
            lead.extend_from_slice(&RST);
            let _ = wr.write_all(&lead).await;
            return Outcome::LocalReset;
        }
        // Read into the thread's scratch buffer; what goes out is copied into yamux's frame.
        let read = stream::with_scratch(CHUNK_HEADER_LEN + RELAY_BUF_LEN, |b| {
            let (header, body) = b.split_at_mut(CHUNK_HEADER_LEN);
            let n = if arrived { stream::read_arrived(local, body) } else { local.try_read(body) };
            match n {
                Ok(0) => Ok(None),
                Ok(n) => {
                    header.copy_from_slice(&chunk::data_header(n));
                    let mut out = std::mem::take(&mut lead);
                    out.extend_from_slice(b.get(..CHUNK_HEADER_LEN + n).unwrap_or_default());
                    Ok(Some((n, out)))
                }
                Err(e) => Err(e),
            }
        });
        let (n, out) = match read {
            Ok(Some(sent)) => sent,
            Ok(None) => {
                lead.extend_from_slice(&FIN);
                return match wr.write_all(&lead).await {
                    Ok(()) => Outcome::Closed,
                    Err(_) => Outcome::PeerVanished,
                };
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing yet: the proxy's opening goes alone now (the agent must connect).
                if !lead.is_empty() && wr.write_all(&std::mem::take(&mut lead)).await.is_err() {
                    return Outcome::PeerVanished;
                }
                continue;
            }
            Err(_) => {
                lead.extend_from_slice(&RST);
                let _ = wr.write_all(&lead).await;
                return Outcome::LocalReset;
            }
        };
        if wr.write_all(&out).await.is_err() {
            return Outcome::PeerVanished;
        }
        counters.to_peer.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn mux_down<L: RawStream>(
    rd: &mut tokio::io::ReadHalf<MuxStream>,
    local: &L,
    mut pending: BytesMut,
    answer: bool,
    counters: &RelayCounters,
    up_done: &CancellationToken,
) -> Outcome {
    if answer {
        match read_opening::<hostnet_protocol::OpenReply>(rd, false).await {
            Ok((hostnet_protocol::OpenReply::Connected {}, rest)) => pending = rest,
            Ok((hostnet_protocol::OpenReply::Refused { .. }, _)) => return Outcome::PeerReset,
            Err(_) => return Outcome::PeerVanished,
        }
    }
    let mut decoder = ChunkDecoder::new();
    if let Err(end) = crate::relay::deliver_all(&mut decoder, &pending, local, counters).await {
        return end;
    }
    drop(pending);
    loop {
        if decoder.is_finished() {
            up_done.cancelled().await;
            return Outcome::Closed;
        }
        let step = poll_fn(|cx| {
            stream::with_scratch(RELAY_BUF_LEN, |b| {
                let mut rb = ReadBuf::new(b);
                match Pin::new(&mut *rd).poll_read(cx, &mut rb) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(_)) => Poll::Ready(Err(Outcome::PeerVanished)),
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(Err(Outcome::PeerVanished)),
                    Poll::Ready(Ok(())) => {
                        Poll::Ready(crate::relay::deliver_some(&mut decoder, rb.filled(), local, counters))
                    }
                }
            })
        })
        .await;
        match step {
            Ok(None) => {}
            Ok(Some(left)) => {
                if let Err(end) = crate::relay::finish_leftover(&mut decoder, left, local, counters).await {
                    return end;
                }
            }
            Err(end) => return end,
        }
    }
}
