//! Relays one TCP connection over one data stream, both ways, with FIN and RST carried in-band
//! as chunk headers (see `hostnet_protocol::chunk`).
//!
//! Both sides run the same code: the proxy with the desktop client as `local`, the agent with
//! the guest server as `local`.
//!
//! Buffers: bytes are read into a per-thread scratch buffer and written on at once, in the
//! same synchronous step; while the far side keeps up (interactive traffic, new connections)
//! a connection owns no buffer at all — no allocation, no zeroing, no timer. Only when a write
//! would block does a direction take a buffer of its own for what is left, and keep it for the
//! bulk transfer that follows until [`IDLE_BUFFER_RELEASE`] of silence gives it back.

use std::future::poll_fn;
use std::io;
use std::pin::pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use hostnet_protocol::chunk::{self, CHUNK_HEADER_LEN, ChunkDecoder, ChunkEvent, FIN, RST};
use tokio_util::sync::CancellationToken;

use crate::relay::splice::Pipe;
use crate::relay::woken::OnWake;
use crate::tally::Tally;
use crate::transport::raw::{self, RawStream};
use tokio::io::Interest;

/// Bytes moved per read: the largest chunk, so a bulk transfer takes few system calls (1 MiB
/// against 256 KiB before: proxy + agent system calls per GiB through the buffer gear fell from
/// ~26 000 to ~7 000, their CPU per GiB by a quarter). A bulk direction's buffer holds at most
/// this much, and only while its far side is slower (see the module's notes).
pub const RELAY_BUF_LEN: usize = chunk::MAX_CHUNK_LEN;
/// A bulk direction's pipe: the splice gear moves up to this much per chunk. The kernel's pipe
/// pages are taken only as bytes pass (`fs.pipe-max-size`, 1 MiB by default, caps it; a
/// smaller pipe just means smaller chunks).
pub const PIPE_LEN: usize = chunk::MAX_CHUNK_LEN;
/// A direction silent this long gives its buffer back.
pub const IDLE_BUFFER_RELEASE: Duration = Duration::from_millis(500);
/// A read this large means a bulk transfer even while the far side keeps up: the direction
/// takes its pipe (or buffer) at once, so the bytes stop being copied through user space.
pub use crate::transport::raw::BULK_READ;

const _: () = assert!(RELAY_BUF_LEN <= chunk::MAX_CHUNK_LEN);

/// Whether bulk transfers may use the splice gear (on by default where it exists).
static SPLICE: AtomicBool = AtomicBool::new(true);

/// Turns the splice gear on or off for this process: off, every bulk byte takes the buffer
/// gear, as it does over vsock and on macOS and Windows (`--no-splice`, to measure that path
/// on Linux).
pub fn set_splice(on: bool) {
    SPLICE.store(on, Ordering::Relaxed);
}

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions ended with FIN.
    Closed,
    /// The local socket was reset or failed; the peer was told with RST.
    LocalReset,
    /// The peer's connection was reset; the local socket was reset too.
    PeerReset,
    /// The data stream ended or broke without FIN or RST: the far side went away.
    PeerVanished,
    /// The peer broke the chunk protocol; the local socket was reset.
    ProtocolError,
    /// Shutdown: the local socket was closed.
    Cancelled,
}

/// How a relayed connection ended, and where its stream is.
#[derive(Debug)]
pub struct Ended {
    pub outcome: Outcome,
    /// Each side has sent its FIN and read the other's, so another connection may follow on
    /// the stream (`docs/protocol.md`, section 3): the connection closed, or this side reset
    /// it after its FIN and then read the peer's FIN.
    pub at_boundary: bool,
    /// Bytes read from the peer past its FIN: the start of what the stream carries next — the
    /// peer's RST that crossed our FIN, if any, then the next connection's opening.
    pub after: BytesMut,
}

/// What the peer's direction left past its FIN, and whether ours is over.
struct Tail {
    after: Mutex<BytesMut>,
    /// Our direction has sent its FIN.
    up_done: CancellationToken,
}

impl Tail {
    /// After the peer's FIN, what follows it in `rest`: kept for what the stream carries next
    /// (`true`: stop decoding) — unless it is an RST while our direction still runs (the
    /// peer reset after its half-close), which is decoded as usual. An RST after our FIN too
    /// crossed it: the connection is over both ways, and the next read of the stream skips it.
    fn keep_after_fin(&self, rest: &[u8]) -> bool {
        match rest.first() {
            None => false,
            Some(&0xFF) if !self.up_done.is_cancelled() => false,
            Some(_) => {
                self.after.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(rest);
                true
            }
        }
    }
}

/// Live byte counts of one relayed connection.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Bytes read from the local socket and sent to the peer.
    pub to_peer: AtomicU64,
    /// Bytes received from the peer and written to the local socket.
    pub from_peer: AtomicU64,
}

/// Relays until both directions have finished, either side resets, or `shutdown` fires.
/// `pending` holds bytes already read from `peer` after its header frame. On any abnormal end
/// the local socket is set to reset on close; the caller then drops both.
pub async fn relay<L: RawStream, P: RawStream>(
    local: &L,
    peer: &P,
    pending: BytesMut,
    counters: &RelayCounters,
    shutdown: &CancellationToken,
) -> Outcome {
    let lead = Lead::new(Vec::new(), true);
    relay_both(local, peer, async { Ok(pending) }, &lead, counters, shutdown, false).await.outcome
}

/// [`relay`] on a stream whose far side has not answered yet: the local side's bytes start
/// flowing at once, while `answer` reads what leads the peer's direction (the agent's reply
/// to `open`) and yields the bytes read past it — or the outcome that ends the connection
/// (a refusal: [`Outcome::PeerReset`], the local socket is reset). Saves a round trip per
/// new connection. The local side is a client that has just connected, and clients mostly
/// speak first: its first bytes are read at once, before the reactor reports them, and go out
/// in one write with `opening` (our preface and `open`); if none has arrived, `opening` goes
/// alone at once (the far side must connect even to a server that speaks first).
pub async fn relay_after<L: RawStream, P: RawStream>(
    local: &L,
    peer: &P,
    opening: Vec<u8>,
    answer: impl std::future::Future<Output = Result<BytesMut, Outcome>>,
    counters: &RelayCounters,
    shutdown: &CancellationToken,
) -> Ended {
    let lead = Lead::new(opening, false);
    relay_both(local, peer, answer, &lead, counters, shutdown, true).await
}

/// [`relay`] for the side that answers an `open`: `answer` (our preface and `connected`) goes
/// out in the same write as the local side's first bytes, or its FIN or RST — not in a write
/// (and a wake-up of the far side) of its own. The opener reads it only to let the local
/// side's bytes through ([`relay_after`]), so it loses nothing by waiting for them.
pub async fn relay_answering<L: RawStream, P: RawStream>(
    local: &L,
    peer: &P,
    pending: BytesMut,
    answer: Vec<u8>,
    counters: &RelayCounters,
    shutdown: &CancellationToken,
) -> Ended {
    let lead = Lead::new(answer, true);
    relay_both(local, peer, async { Ok(pending) }, &lead, counters, shutdown, false).await
}

/// Bytes that must precede whatever the up direction writes first (an opening or an answer),
/// so they share its system call. Taken once.
struct Lead {
    bytes: Mutex<Vec<u8>>,
    /// `false`: if the local side has nothing at once, the lead goes out alone.
    may_wait: bool,
}

impl Lead {
    fn new(bytes: Vec<u8>, may_wait: bool) -> Self {
        Lead { bytes: Mutex::new(bytes), may_wait }
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.bytes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The lead followed by `then`, in one write.
    async fn write_with<P: RawStream>(&self, peer: &P, then: &[u8]) -> io::Result<()> {
        let mut lead = self.take();
        if lead.is_empty() {
            return raw::write_all(peer, then).await;
        }
        lead.extend_from_slice(then);
        write_all_direct(peer, &lead).await
    }
}

/// Writes all of `buf`, the first write straight to the socket (a new stream: see
/// [`raw::write_direct`]).
async fn write_all_direct<P: RawStream>(peer: &P, buf: &[u8]) -> io::Result<()> {
    let n = match raw::write_direct(peer, buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    raw::write_all(peer, buf.get(n..).unwrap_or_default()).await
}

/// Both directions; with `client_first`, the local side is read once before waiting for it.
async fn relay_both<L: RawStream, P: RawStream>(
    local: &L,
    peer: &P,
    answer: impl std::future::Future<Output = Result<BytesMut, Outcome>>,
    lead: &Lead,
    counters: &RelayCounters,
    shutdown: &CancellationToken,
    client_first: bool,
) -> Ended {
    let tail = Tail { after: Mutex::new(BytesMut::new()), up_done: CancellationToken::new() };
    let up_done = &tail.up_done;
    let mid_chunk = AtomicBool::new(false);
    let mut decoder = ChunkDecoder::new();
    let (mut up_end, mut down_end) = (None, None);
    let outcome = {
        // Each direction, and the shutdown signal, polled only when something woke it
        // ([`OnWake`]): a message one way does not walk the other way's stack, nor take the
        // shutdown token's locks.
        let up = pin!(OnWake::new(pump_up(local, peer, lead, counters, &mid_chunk, client_first)));
        let down = pin!(OnWake::new(async {
            match answer.await {
                Ok(pending) => pump_down(peer, local, pending, counters, &mut decoder, &tail).await,
                Err(end) => end,
            }
        }));
        let cancelled = pin!(OnWake::new(shutdown.cancelled()));
        let mut ends = (Some(up), Some(down), cancelled);
        poll_fn(|cx| {
            let (up, down, cancelled) = &mut ends;
            if let Some(Poll::Ready(end)) = up.as_mut().map(|f| f.as_mut().poll(cx)) {
                *up = None;
                up_end = Some(end);
                if end == Outcome::Closed {
                    // The down direction may be waiting for this after the peer's FIN.
                    up_done.cancel();
                }
            }
            if let Some(Poll::Ready(end)) = down.as_mut().map(|f| f.as_mut().poll(cx)) {
                *down = None;
                down_end = Some(end);
            }
            match (up_end, down_end) {
                (Some(Outcome::Closed), Some(Outcome::Closed)) => return Poll::Ready(Outcome::Closed),
                // The first direction to fail decides; the other is dropped unfinished.
                (Some(e), _) if e != Outcome::Closed => return Poll::Ready(e),
                (_, Some(e)) if e != Outcome::Closed => return Poll::Ready(e),
                _ => {}
            }
            cancelled.as_mut().poll(cx).map(|()| Outcome::Cancelled)
        })
        .await
    };
    let mut at_boundary = outcome == Outcome::Closed;
    if outcome == Outcome::LocalReset && !mid_chunk.load(Ordering::Relaxed) {
        // A failed write to the local socket (seen by the down direction) still owes the peer
        // its RST. Skipped mid-chunk: the peer then sees a cut stream, which it resets too.
        let sent = lead.write_with(peer, &RST).await.is_ok();
        // After our FIN: the peer may have finished too, its FIN crossing our RST — then the
        // stream is read to that FIN, and another connection may follow.
        if sent && up_end == Some(Outcome::Closed) && down_end == Some(Outcome::LocalReset) {
            // Boxed: a rare path, kept out of every connection's future.
            at_boundary = Box::pin(drain_to_fin(peer, &mut decoder, &tail)).await;
        }
    }
    if !matches!(outcome, Outcome::Closed | Outcome::Cancelled) {
        let _ = local.set_reset_on_close();
    }
    Ended { outcome, at_boundary, after: tail.after.into_inner().unwrap_or_else(|p| p.into_inner()) }
}

/// Reads the peer's direction up to its FIN, dropping its data (our local side is gone), within
/// [`crate::transport::handshake::HANDSHAKE_TIMEOUT`]: `true` at the FIN, with what follows
/// it kept in `tail`; `false` at an RST, the end of the stream, or the time limit (a peer that
/// saw our RST before finishing resets and closes the stream instead).
async fn drain_to_fin<P: RawStream>(peer: &P, decoder: &mut ChunkDecoder, tail: &Tail) -> bool {
    let drained = async {
        loop {
            if decoder.is_finished() {
                return true;
            }
            if raw::readable(peer).await.is_err() {
                return false;
            }
            let step = with_scratch(|b| match peer.try_read(b) {
                Ok(0) => Some(false),
                Ok(n) => {
                    let mut bytes = b.get(..n).unwrap_or_default();
                    while !bytes.is_empty() {
                        let Ok((used, event)) = decoder.decode(bytes) else { return Some(false) };
                        bytes = bytes.get(used..).unwrap_or_default();
                        match event {
                            Some(ChunkEvent::Fin) => {
                                // Our FIN has gone: whatever follows is kept, a crossing RST too.
                                tail.keep_after_fin(bytes);
                                return Some(true);
                            }
                            Some(ChunkEvent::Reset) => return Some(false),
                            Some(ChunkEvent::Data(_)) | None => {}
                        }
                    }
                    None
                }
                Err(e) if !is_reset_like(&e) => None,
                Err(_) => Some(false),
            });
            if let Some(end) = step {
                return end;
            }
        }
    };
    crate::deadline::within(crate::transport::handshake::HANDSHAKE_TIMEOUT, drained).await.unwrap_or(false)
}

/// Bytes of full-size ([`RELAY_BUF_LEN`]) bulk buffers this process holds at once, at most.
/// Past it a bulk direction gets a [`SMALL_BUF_LEN`] buffer, as every direction did before
/// reads grew to 1 MiB: a guest that keeps thousands of streams busy (each up to
/// `MAX_GUEST_STREAMS` or the connection limit) costs the desktop no more than it could then,
/// plus this.
pub const LARGE_BUFFERS_BUDGET: usize = 256 << 20;
/// A bulk buffer once [`LARGE_BUFFERS_BUDGET`] is spent.
pub const SMALL_BUF_LEN: usize = 256 * 1024;
/// Bytes of full-size bulk buffers held now.
static LARGE_HELD: AtomicUsize = AtomicUsize::new(0);
/// Bulk buffers given [`SMALL_BUF_LEN`] because the budget was spent.
static OVER_BUDGET: Tally = Tally::new();

/// How many bulk buffers this process gave [`SMALL_BUF_LEN`] bytes instead of [`RELAY_BUF_LEN`]
/// because [`LARGE_BUFFERS_BUDGET`] was in use: for `status`.
pub fn buffers_over_budget() -> u64 {
    OVER_BUDGET.get()
}

/// A bulk direction's own buffer (room for a chunk header, then the data); a full-size one
/// counts against [`LARGE_BUFFERS_BUDGET`] until it is dropped.
struct BulkBuffer {
    buf: Box<[u8]>,
    counted: bool,
}

impl Drop for BulkBuffer {
    fn drop(&mut self) {
        if self.counted {
            LARGE_HELD.fetch_sub(self.buf.len(), Ordering::Relaxed);
        }
    }
}

fn new_buffer() -> BulkBuffer {
    let large = CHUNK_HEADER_LEN + RELAY_BUF_LEN;
    let counted = LARGE_HELD
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
            (held + large <= LARGE_BUFFERS_BUDGET).then_some(held + large)
        })
        .is_ok();
    if let Some(n) = (!counted).then(|| OVER_BUDGET.one_more()).flatten() {
        tracing::warn!(
            "{} MiB of 1 MiB relay buffers in use, the limit: bulk transfers get 256 KiB buffers ({n} so far)",
            LARGE_BUFFERS_BUDGET >> 20
        );
    }
    let len = if counted { large } else { CHUNK_HEADER_LEN + SMALL_BUF_LEN };
    BulkBuffer { buf: vec![0u8; len].into_boxed_slice(), counted }
}

/// Runs `f` with the thread's scratch buffer, a chunk header and [`RELAY_BUF_LEN`] long.
fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    crate::scratch::with_scratch(CHUNK_HEADER_LEN + RELAY_BUF_LEN, f)
}

/// Writes as much of `buf` as `s` takes right now; `Ok(written)`.
fn write_now<S: RawStream>(s: &S, mut buf: &[u8]) -> io::Result<usize> {
    let total = buf.len();
    while !buf.is_empty() {
        match s.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(total - buf.len())
}

/// [`write_now`] straight to the socket once ([`raw::write_direct`]), then as usual.
fn write_direct_now<S: RawStream>(s: &S, buf: &[u8]) -> io::Result<usize> {
    match raw::write_direct(s, buf) {
        Ok(n) if n == buf.len() => Ok(n),
        Ok(n) => Ok(n + write_now(s, buf.get(n..).unwrap_or_default())?),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => write_now(s, buf),
        Err(e) => Err(e),
    }
}

/// Waits for `s` to be readable. With a buffer in hand it waits only so long before giving
/// the buffer back and waiting on without one.
async fn wait_readable<S: RawStream, T>(s: &S, held: &mut Option<T>) -> io::Result<()> {
    if held.is_some() {
        match tokio::time::timeout(IDLE_BUFFER_RELEASE, raw::readable(s)).await {
            Ok(r) => return r,
            Err(_) => *held = None,
        }
    }
    raw::readable(s).await
}

/// What a direction holds while a bulk transfer goes on: a pipe where both sockets can
/// `splice(2)` (the bytes never enter user space), else a buffer of its own.
enum Bulk {
    Buffer(BulkBuffer),
    Pipe(Pipe),
}

/// A direction turning to bulk, with nothing in hand: its connection may first move to a less
/// crowded relay thread (`crate::threads::spread_bulk`), then takes its bulk gear there.
async fn turn_to_bulk<F: RawStream, T: RawStream>(from: &F, to: &T) -> Bulk {
    let roams = from.roams() && to.roams();
    crate::threads::spread_bulk(roams, || from.rehome().and_then(|()| to.rehome())).await;
    bulk_for(from, to)
}

/// The bulk gear for bytes moving `from` → `to`.
fn bulk_for<F: RawStream, T: RawStream>(from: &F, to: &T) -> Bulk {
    let can = |s: &dyn RawStream, interest| s.try_io_raw(interest, &mut || Ok(0)).is_some();
    if SPLICE.load(Ordering::Relaxed) && can(from, Interest::READABLE) && can(to, Interest::WRITABLE) {
        if let Ok(pipe) = Pipe::new(PIPE_LEN) {
            return Bulk::Pipe(pipe);
        }
    }
    Bulk::Buffer(new_buffer())
}

/// One bulk step without user-space copies: local → pipe, chunk header, pipe → peer.
async fn splice_up<L: RawStream, P: RawStream>(
    local: &L,
    peer: &P,
    pipe: &mut Pipe,
    mid_chunk: &AtomicBool,
) -> Step {
    let filled = local.try_io_raw(Interest::READABLE, &mut || pipe.fill_from(local.as_sock(), usize::MAX));
    let n = match filled {
        Some(Ok(0)) => return Step::Eof(Vec::new()),
        Some(Ok(n)) => n,
        Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => return Step::Again(Vec::new()),
        // This kernel or socket does not splice: copy instead.
        Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => return Step::NoSplice,
        _ => return Step::LocalFailed(Vec::new()),
    };
    mid_chunk.store(true, Ordering::Relaxed);
    if raw::write_all(peer, &chunk::data_header(n)).await.is_err() {
        return Step::PeerFailed;
    }
    if drain_pipe(pipe, peer).await.is_err() {
        return Step::PeerFailed;
    }
    mid_chunk.store(false, Ordering::Relaxed);
    Step::Sent(n)
}

/// Splices everything in `pipe` out to `to`, waiting while `to` is full.
async fn drain_pipe<S: RawStream>(pipe: &mut Pipe, to: &S) -> io::Result<()> {
    // Tried first, waited for only when full (a stream may watch for room only while a writer
    // waits).
    while pipe.pending > 0 {
        match to.try_io_raw(Interest::WRITABLE, &mut || pipe.drain_to(to.as_sock())) {
            Some(Ok(_)) => {}
            Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                std::future::poll_fn(|cx| to.poll_write_ready(cx)).await?;
            }
            Some(Err(e)) => return Err(e),
            None => return Err(io::ErrorKind::Unsupported.into()),
        }
    }
    Ok(())
}

/// One bulk step the other way without user-space copies: the chunk headers are read (4
/// bytes at a time at most), the data between them goes peer → pipe → local. `Ok(false)`:
/// `splice(2)` is refused here (nothing was moved), use a buffer.
async fn splice_down<P: RawStream, L: RawStream>(
    peer: &P,
    local: &L,
    pipe: &mut Pipe,
    decoder: &mut ChunkDecoder,
    counters: &RelayCounters,
    tail: &Tail,
) -> Result<bool, Outcome> {
    let remaining = decoder.data_remaining();
    if remaining == 0 {
        let mut header = [0u8; CHUNK_HEADER_LEN];
        let need = decoder.header_needed().min(CHUNK_HEADER_LEN);
        return match peer.try_read(header.get_mut(..need).unwrap_or_default()) {
            Ok(0) => Err(Outcome::PeerVanished),
            Ok(k) => deliver(decoder, header.get(..k).unwrap_or_default(), local, counters, tail)
                .await
                .map(|()| true),
            Err(e) if !is_reset_like(&e) => Ok(true),
            Err(_) => Err(Outcome::PeerVanished),
        };
    }
    let n = match peer.try_io_raw(Interest::READABLE, &mut || pipe.fill_from(peer.as_sock(), remaining)) {
        Some(Ok(0)) => return Err(Outcome::PeerVanished),
        Some(Ok(n)) => n,
        Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
        Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
        _ => return Err(Outcome::PeerVanished),
    };
    decoder.skip_data(n);
    drain_pipe(pipe, local).await.map_err(|_| Outcome::LocalReset)?;
    counters.from_peer.fetch_add(n as u64, Ordering::Relaxed);
    Ok(true)
}

fn is_reset_like(e: &io::Error) -> bool {
    e.kind() != io::ErrorKind::WouldBlock
}

/// What one synchronous read-and-forward step did.
enum Step {
    /// `n` bytes read and all of them passed on.
    Sent(usize),
    /// `n` bytes read and passed on with the FIN (`Closed`) or RST (`LocalReset`) that followed
    /// them at once — `rest`, what the peer has not taken yet, still to go: this direction is
    /// over.
    Ended(usize, Vec<u8>, Outcome),
    /// `n` bytes read; `rest` (the tail of the chunk) still to be written.
    Blocked(usize, Vec<u8>),
    /// Nothing to read after all. Each of these three carries the lead not sent yet.
    Again(Vec<u8>),
    /// The local socket reached EOF.
    Eof(Vec<u8>),
    /// The local socket failed.
    LocalFailed(Vec<u8>),
    /// The peer could not be written.
    PeerFailed,
    /// `splice(2)` is refused here: use a buffer.
    NoSplice,
}

/// Local socket → peer. Ends `Closed` after sending FIN, `LocalReset` after sending RST,
/// `PeerVanished` if the peer cannot be written.
async fn pump_up<L: RawStream, P: RawStream>(
    local: &L,
    peer: &P,
    lead: &Lead,
    counters: &RelayCounters,
    mid_chunk: &AtomicBool,
    client_first: bool,
) -> Outcome {
    // What this direction holds only while the peer has been slow (bulk): a pipe or a buffer.
    let mut own: Option<Bulk> = None;
    // A client's first bytes have usually arrived by now, but the reactor has not said so yet:
    // read them at once (nothing there: `Again`, and the loop waits as for any read).
    let mut first = client_first;
    loop {
        let arrived = std::mem::take(&mut first);
        if !arrived && wait_readable(local, &mut own).await.is_err() {
            let _ = lead.write_with(peer, &RST).await;
            return Outcome::LocalReset;
        }
        let step = match own.as_mut() {
            Some(Bulk::Pipe(pipe)) => splice_up(local, peer, pipe, mid_chunk).await,
            // Bulk: read into our own buffer, wait for the peer to take all of it.
            Some(Bulk::Buffer(BulkBuffer { buf: b, .. })) => match read_chunk(|body| local.try_read(body), b)
            {
                Ok(0) => Step::Eof(Vec::new()),
                Ok(n) => {
                    mid_chunk.store(true, Ordering::Relaxed);
                    if raw::write_all(peer, b.get(..CHUNK_HEADER_LEN + n).unwrap_or_default()).await.is_err()
                    {
                        return Outcome::PeerVanished;
                    }
                    mid_chunk.store(false, Ordering::Relaxed);
                    Step::Sent(n)
                }
                Err(step) => step,
            },
            None => {
                let ahead = lead.take();
                let read = |body: &mut [u8]| {
                    if arrived { raw::read_arrived(local, body) } else { local.try_read(body) }
                };
                with_scratch(|b| forward_now(read, |body| local.try_read(body), &ahead, peer, b))
            }
        };
        match step {
            Step::Sent(n) => {
                counters.to_peer.fetch_add(n as u64, Ordering::Relaxed);
                if n >= BULK_READ && own.is_none() {
                    own = Some(turn_to_bulk(local, peer).await);
                }
            }
            Step::Blocked(n, rest) => {
                mid_chunk.store(true, Ordering::Relaxed);
                if raw::write_all(peer, &rest).await.is_err() {
                    return Outcome::PeerVanished;
                }
                mid_chunk.store(false, Ordering::Relaxed);
                counters.to_peer.fetch_add(n as u64, Ordering::Relaxed);
                // The peer is slower than the local side: a bulk transfer.
                if own.is_none() {
                    own = Some(turn_to_bulk(local, peer).await);
                }
            }
            Step::NoSplice => own = Some(Bulk::Buffer(new_buffer())),
            Step::Again(ahead) => {
                // Nothing to read after all: the lead waits for what comes, or goes alone now.
                if !ahead.is_empty() {
                    if lead.may_wait {
                        *lead.bytes.lock().unwrap_or_else(|p| p.into_inner()) = ahead;
                    } else if write_all_direct(peer, &ahead).await.is_err() {
                        return Outcome::PeerVanished;
                    }
                }
            }
            Step::Ended(n, rest, end) => {
                if !rest.is_empty() {
                    mid_chunk.store(true, Ordering::Relaxed);
                    if raw::write_all(peer, &rest).await.is_err() {
                        return Outcome::PeerVanished;
                    }
                    mid_chunk.store(false, Ordering::Relaxed);
                }
                counters.to_peer.fetch_add(n as u64, Ordering::Relaxed);
                return end;
            }
            Step::Eof(ahead) => {
                let end = [ahead.as_slice(), &FIN].concat();
                return match write_all_direct(peer, &end).await {
                    Ok(()) => Outcome::Closed,
                    Err(_) => Outcome::PeerVanished,
                };
            }
            Step::LocalFailed(ahead) => {
                let _ = write_all_direct(peer, &[ahead.as_slice(), &RST].concat()).await;
                return Outcome::LocalReset;
            }
            Step::PeerFailed => return Outcome::PeerVanished,
        }
    }
}

/// Reads from `local` into `b` after room for a chunk header, and writes the header.
/// `Ok(n)` (0 at EOF); `Err(Again | LocalFailed)`.
fn read_chunk(read: impl FnOnce(&mut [u8]) -> io::Result<usize>, b: &mut [u8]) -> Result<usize, Step> {
    let Some((header, body)) = b.split_first_chunk_mut::<CHUNK_HEADER_LEN>() else {
        return Err(Step::LocalFailed(Vec::new()));
    };
    match read(body) {
        Ok(0) => Ok(0),
        Ok(n) => {
            *header = chunk::data_header(n);
            Ok(n)
        }
        Err(e) if !is_reset_like(&e) => Err(Step::Again(Vec::new())),
        Err(_) => Err(Step::LocalFailed(Vec::new())),
    }
}

/// One synchronous step through the scratch buffer: read (with `read`), frame, write what the
/// peer takes — behind `lead` (an opening or an answer not sent yet), in the same write. What
/// ends without a write hands `lead` back in the step.
///
/// Behind a lead (a connection's first message) the local side is read once more (with
/// `more`) before the write: a server that answers and closes at once (the first answer of a
/// short connection, `Connection: close`) then costs one write and one wake-up of the far side
/// — `connected`, the answer and the FIN together — instead of two. The read that finds
/// nothing more is the one that would have followed the write anyway.
fn forward_now<P: RawStream>(
    read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    more: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    lead: &[u8],
    peer: &P,
    b: &mut [u8],
) -> Step {
    match read_chunk(read, b) {
        Ok(0) => Step::Eof(lead.to_vec()),
        Ok(mut n) => {
            let mut end = None;
            if !lead.is_empty() {
                let room = b.get_mut(CHUNK_HEADER_LEN + n..).unwrap_or_default();
                match more(room) {
                    _ if room.is_empty() => {}
                    Ok(0) => end = Some((FIN, Outcome::Closed)),
                    Ok(m) => n += m,
                    Err(e) if !is_reset_like(&e) => {}
                    Err(_) => end = Some((RST, Outcome::LocalReset)),
                }
                if let Some(header) = b.first_chunk_mut::<CHUNK_HEADER_LEN>() {
                    *header = chunk::data_header(n);
                }
            }
            let chunk = b.get(..CHUNK_HEADER_LEN + n).unwrap_or_default();
            let joined;
            let frame = if lead.is_empty() {
                chunk
            } else {
                joined = [lead, chunk, end.as_ref().map_or(&[][..], |(tail, _)| tail)].concat();
                &joined
            };
            // Behind a lead the stream may be new: written to straight away (the reactor may
            // not have reported it writable yet); what it does not take waits as usual.
            let written =
                if lead.is_empty() { write_now(peer, frame) } else { write_direct_now(peer, frame) };
            let rest = |w: usize| frame.get(w..).unwrap_or_default().to_vec();
            match (written, end) {
                (Ok(w), None) if w == frame.len() => Step::Sent(n),
                (Ok(w), None) => Step::Blocked(n, rest(w)),
                (Ok(w), Some((_, outcome))) => Step::Ended(n, rest(w), outcome),
                (Err(_), _) => Step::PeerFailed,
            }
        }
        Err(Step::Again(_)) => Step::Again(lead.to_vec()),
        Err(Step::LocalFailed(_)) => Step::LocalFailed(lead.to_vec()),
        Err(step) => step,
    }
}

/// Peer → local socket. Ends `Closed` once the peer's FIN has been passed on and the other
/// direction is done too; otherwise with what went wrong.
async fn pump_down<P: RawStream, L: RawStream>(
    peer: &P,
    local: &L,
    pending: BytesMut,
    counters: &RelayCounters,
    decoder: &mut ChunkDecoder,
    tail: &Tail,
) -> Outcome {
    let up_done = &tail.up_done;
    // The local socket may have been connected a moment ago (the agent's to the guest server,
    // with the client's first bytes in `pending`): written to straight away, not once the
    // reactor has reported it writable — that report is a trip through `epoll_wait` on every
    // new connection's first request.
    let first = deliver_now(decoder, &pending, local, counters, tail, write_direct_now);
    if let Err(end) = finish_delivery(decoder, first, local, counters, tail).await {
        return end;
    }
    drop(pending);
    // What this direction holds only while the local side has been slow (bulk).
    let mut own: Option<Bulk> = None;
    loop {
        if decoder.is_finished() {
            // Our side of the peer's connection is done; keep listening only for an RST
            // until our own direction finishes.
            tokio::select! {
                biased;
                _ = up_done.cancelled() => return Outcome::Closed,
                r = raw::readable(peer) => if r.is_err() { return Outcome::PeerVanished },
            }
        } else if wait_readable(peer, &mut own).await.is_err() {
            return Outcome::PeerVanished;
        }
        match own.as_mut() {
            Some(Bulk::Pipe(pipe)) if !decoder.is_finished() => {
                match splice_down(peer, local, pipe, decoder, counters, tail).await {
                    Ok(true) => {}
                    // This kernel or socket does not splice: copy instead.
                    Ok(false) => own = Some(Bulk::Buffer(new_buffer())),
                    Err(end) => return end,
                }
                continue;
            }
            Some(Bulk::Buffer(BulkBuffer { buf: b, .. })) => {
                match peer.try_read(b) {
                    Ok(0) => return Outcome::PeerVanished,
                    Ok(n) => {
                        if let Err(end) =
                            deliver(decoder, b.get(..n).unwrap_or_default(), local, counters, tail).await
                        {
                            return end;
                        }
                    }
                    Err(e) if !is_reset_like(&e) => {}
                    Err(_) => return Outcome::PeerVanished,
                }
                continue;
            }
            _ => {}
        }
        let mut read = 0;
        let step = with_scratch(|b| match peer.try_read(b) {
            Ok(0) => Err(Outcome::PeerVanished),
            Ok(n) => {
                read = n;
                deliver_now(decoder, b.get(..n).unwrap_or_default(), local, counters, tail, write_now)
            }
            Err(e) if !is_reset_like(&e) => Ok(None),
            Err(_) => Err(Outcome::PeerVanished),
        });
        match finish_delivery(decoder, step, local, counters, tail).await {
            Ok(false) if read >= BULK_READ && own.is_none() => own = Some(turn_to_bulk(peer, local).await),
            Ok(false) => {}
            // The local side is slower than the peer: a bulk transfer.
            Ok(true) if own.is_none() => own = Some(turn_to_bulk(peer, local).await),
            Ok(true) => {}
            Err(end) => return end,
        }
    }
}

/// Writes what [`deliver_now`] left, waiting for the local socket as long as it takes, then
/// decodes and delivers the rest. `Ok(true)` if it had to wait (the local side is slower).
async fn finish_delivery<L: RawStream>(
    decoder: &mut ChunkDecoder,
    step: Result<Option<Leftover>, Outcome>,
    local: &L,
    counters: &RelayCounters,
    tail: &Tail,
) -> Result<bool, Outcome> {
    let Some(Leftover { data, raw }) = step? else { return Ok(false) };
    raw::write_all(local, &data).await.map_err(|_| Outcome::LocalReset)?;
    counters.from_peer.fetch_add(data.len() as u64, Ordering::Relaxed);
    deliver(decoder, &raw, local, counters, tail).await?;
    Ok(true)
}

/// What [`deliver_now`] could not write without waiting.
struct Leftover {
    /// The rest of the data chunk being written.
    data: Vec<u8>,
    /// Bytes not decoded yet.
    raw: Vec<u8>,
}

/// [`deliver`] without waiting: writes (with `write`: [`write_now`], or [`write_direct_now`]
/// to a socket the reactor may not have reported writable yet) what the local socket takes
/// now and hands back the rest.
fn deliver_now<L: RawStream>(
    decoder: &mut ChunkDecoder,
    mut bytes: &[u8],
    local: &L,
    counters: &RelayCounters,
    tail: &Tail,
    write: fn(&L, &[u8]) -> io::Result<usize>,
) -> Result<Option<Leftover>, Outcome> {
    while !bytes.is_empty() {
        let (used, event) = decoder.decode(bytes).map_err(|_| Outcome::ProtocolError)?;
        bytes = bytes.get(used..).unwrap_or_default();
        match event {
            Some(ChunkEvent::Data(d)) => {
                let w = write(local, d).map_err(|_| Outcome::LocalReset)?;
                counters.from_peer.fetch_add(w as u64, Ordering::Relaxed);
                if w < d.len() {
                    let data = d.get(w..).unwrap_or_default().to_vec();
                    return Ok(Some(Leftover { data, raw: bytes.to_vec() }));
                }
            }
            Some(ChunkEvent::Fin) => {
                // The local peer may already be gone; its reset shows up on the other direction.
                let _ = local.shutdown_write();
                if tail.keep_after_fin(bytes) {
                    break;
                }
            }
            Some(ChunkEvent::Reset) => return Err(Outcome::PeerReset),
            None => {}
        }
    }
    Ok(None)
}

/// Decodes `bytes` and acts on each chunk: data to the local socket, FIN as a half-close.
async fn deliver<L: RawStream>(
    decoder: &mut ChunkDecoder,
    mut bytes: &[u8],
    local: &L,
    counters: &RelayCounters,
    tail: &Tail,
) -> Result<(), Outcome> {
    while !bytes.is_empty() {
        let (used, event) = decoder.decode(bytes).map_err(|_| Outcome::ProtocolError)?;
        bytes = bytes.get(used..).unwrap_or_default();
        match event {
            Some(ChunkEvent::Data(d)) => {
                raw::write_all(local, d).await.map_err(|_| Outcome::LocalReset)?;
                counters.from_peer.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
            Some(ChunkEvent::Fin) => {
                // The local peer may already be gone; its reset shows up on the other direction.
                let _ = local.shutdown_write();
                if tail.keep_after_fin(bytes) {
                    break;
                }
            }
            Some(ChunkEvent::Reset) => return Err(Outcome::PeerReset),
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_size_bulk_buffers_stop_at_the_budget_and_come_back_when_dropped() {
        let large = CHUNK_HEADER_LEN + RELAY_BUF_LEN;
        // Zeroed allocations: address space only, nothing is touched.
        let mut held: Vec<BulkBuffer> = (0..LARGE_BUFFERS_BUDGET / large).map(|_| new_buffer()).collect();
        assert!(held.iter().all(|b| b.counted && b.buf.len() == large), "full-size up to the budget");
        let past = new_buffer();
        assert!(!past.counted, "past the budget");
        assert_eq!(past.buf.len(), CHUNK_HEADER_LEN + SMALL_BUF_LEN, "past the budget: the small size");
        drop(held.pop());
        let again = new_buffer();
        assert!(again.counted && again.buf.len() == large, "a dropped buffer gives its share back");
        drop((held, past, again));
        assert_eq!(LARGE_HELD.load(Ordering::Relaxed), 0, "all given back");
    }
}
