//! Streams to the agent opened ahead of need: a new connection takes one that is ready instead
//! of waiting for its own stream to be set up.
//!
//! On a VM's transport a stream's set-up is a round trip through the VMM and the guest: a
//! hybrid-vsock `CONNECT` and its `OK`, an AF_VSOCK or Hyper-V socket's request and response.
//! A relayed connection cannot send its opening before that (vhost-device-vsock drops what
//! comes with `CONNECT`, see `hybrid_connect`), so every new connection through a real VM
//! waited for it. [`Spares`] keeps a few streams set up and idle; a connection takes the
//! oldest, and a new one is opened in the background in its place.
//!
//! An idle stream is one the agent has accepted and is waiting on for an opening, which it
//! waits for [`HANDSHAKE_TIMEOUT`] at most: a spare is closed once it is [`MAX_AGE`] old (half
//! of that), by a timer that runs only while spares are held (and one period after the last),
//! so an idle proxy goes quiet. A
//! spare whose far side has closed it or sent anything (the agent restarted, the VM went
//! away) is dropped when a connection would take it, and the next one is tried. When opening
//! a spare fails, none is opened again until a connection's own stream has been opened: a
//! stopped agent is not asked for streams on the side.
//!
//! The same pool keeps streams whose connection ended cleanly (both directions with FIN:
//! protocol version 3, `docs/protocol.md` section 3), given back by the relay
//! ([`Connector::give_back`]), up to `reuse` of them, on every transport: the far side waits on
//! such a stream for the next opening as on a new one, so a new connection costs neither side
//! a stream's set-up or close. Held streams stay registered with the reactor of the thread that
//! gave them back; a connection takes one registered on its own thread first, else moves the
//! oldest to its thread.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

use crate::threads::Movable;
use crate::transport::handshake::HANDSHAKE_TIMEOUT;
use crate::transport::stream::TransportStream;
use crate::transport::{BoxFuture, Connector, TransportError};

/// How long a spare is kept unused: half the time the agent waits for a stream's opening.
pub const MAX_AGE: Duration = Duration::from_secs(HANDSHAKE_TIMEOUT.as_secs() / 2);

/// Spares kept for a VM's transports (`vsock:`, `hybrid:`, `hyperv:`), where setting up a
/// stream is a round trip through the VMM: enough for a browser's burst of parallel
/// connections to find most of theirs ready. Each is a stream the agent holds open.
pub const VM_SPARES: usize = 4;

/// Streams whose connection ended cleanly kept for the next connections, at most: each is a
/// stream the agent holds open, waiting for another opening.
pub const REUSED_STREAMS: usize = 8;

/// `inner` with `want` spares and up to `reuse` streams kept from finished connections
/// ([`Spares`]), or `inner` itself for neither.
pub fn with_spares(inner: Arc<dyn Connector>, want: usize, reuse: usize) -> Arc<dyn Connector> {
    match (want, reuse) {
        (0, 0) => inner,
        _ => Arc::new(Spares::with_max_age(inner, want, reuse, MAX_AGE)),
    }
}

/// A [`Connector`] that hands out streams opened ahead of need (see the module's notes).
pub struct Spares {
    inner: Arc<dyn Connector>,
    pool: Arc<Pool>,
}

struct Pool {
    want: usize,
    /// Streams given back are kept while fewer than this are held.
    keep: usize,
    max_age: Duration,
    state: Mutex<State>,
    taken: AtomicU64,
    dropped: AtomicU64,
    kept: AtomicU64,
}

/// A stream held for a connection to come.
struct Held {
    /// Since when it has been idle.
    since: Instant,
    stream: TransportStream,
    /// The thread whose reactor it is registered with: a connection there takes it as it is.
    thread: ThreadId,
}

#[derive(Default)]
struct State {
    /// Set up and idle, oldest first.
    ready: VecDeque<Held>,
    /// Being opened now.
    opening: usize,
    /// The timer that closes old spares is running.
    reaping: bool,
    /// The last spare could not be opened: open none until a connection's own stream opens.
    failing: bool,
}

/// What a [`Spares`] has done, for `status`, tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpareCounts {
    /// Set up and idle now.
    pub ready: usize,
    /// Held at most: the spares wanted, or the streams kept from finished connections.
    pub limit: usize,
    /// Handed to a connection.
    pub taken: u64,
    /// Closed unused: too old, or its far side closed it or spoke first.
    pub dropped: u64,
    /// Given back by a connection that ended cleanly, and kept.
    pub kept: u64,
}

impl Spares {
    /// Keeps `want` streams of `inner` ready.
    pub fn new(inner: Arc<dyn Connector>, want: usize) -> Spares {
        Spares::with_max_age(inner, want, 0, MAX_AGE)
    }

    /// As [`Spares::new`], keeping up to `reuse` streams given back, closing those held
    /// longer than `max_age`.
    pub fn with_max_age(inner: Arc<dyn Connector>, want: usize, reuse: usize, max_age: Duration) -> Spares {
        let pool = Pool {
            want,
            keep: if reuse == 0 { 0 } else { want.max(reuse) },
            max_age,
            state: Mutex::new(State::default()),
            taken: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            kept: AtomicU64::new(0),
        };
        Spares { inner, pool: Arc::new(pool) }
    }

    pub fn counts(&self) -> SpareCounts {
        SpareCounts {
            ready: self.pool.state().ready.len(),
            limit: self.pool.want.max(self.pool.keep),
            taken: self.pool.taken.load(Ordering::Relaxed),
            dropped: self.pool.dropped.load(Ordering::Relaxed),
            kept: self.pool.kept.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for Spares {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spares")
            .field("inner", &self.inner.to_string())
            .field("counts", &self.counts())
            .finish()
    }
}

impl fmt::Display for Spares {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl Connector for Spares {
    fn connect(&self) -> BoxFuture<'_, Result<TransportStream, TransportError>> {
        Box::pin(async move {
            let here = std::thread::current().id();
            let spare = self.pool.take(here);
            refill(&self.inner, &self.pool);
            if let Some(spare) = spare {
                // Registered with another thread's reactor: moved to this one's.
                let moved = if spare.thread == here {
                    Ok(spare.stream)
                } else {
                    spare.stream.detach().and_then(TransportStream::attach)
                };
                match moved {
                    Ok(stream) => {
                        self.pool.taken.fetch_add(1, Ordering::Relaxed);
                        return Ok(stream);
                    }
                    // The reactor would not take it: open one as if there were none.
                    Err(e) => debug!("a spare stream could not be registered: {e}"),
                }
            }
            let stream = self.inner.connect().await?;
            if std::mem::replace(&mut self.pool.state().failing, false) {
                refill(&self.inner, &self.pool);
            }
            Ok(stream)
        })
    }

    fn give_back(&self, stream: TransportStream) {
        let mut state = self.pool.state();
        if state.ready.len() + state.opening >= self.pool.keep {
            return;
        }
        // Left registered where it is: a connection on this thread takes it without a move.
        self.pool.kept.fetch_add(1, Ordering::Relaxed);
        self.pool.hold(&mut state, stream);
    }

    fn pool(&self) -> Option<SpareCounts> {
        Some(self.counts())
    }
}

impl Pool {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `stream` from now on, and starts the timer that closes old ones if it is not running.
    fn hold(self: &Arc<Self>, state: &mut State, stream: TransportStream) {
        state.ready.push_back(Held { since: Instant::now(), stream, thread: std::thread::current().id() });
        if !std::mem::replace(&mut state.reaping, true) {
            tokio::spawn(close_old(self.clone()));
        }
    }

    /// The oldest stream registered on thread `here`, else the oldest, that is young enough and
    /// still quiet; the others met on the way are closed.
    fn take(&self, here: ThreadId) -> Option<Held> {
        let mut state = self.state();
        loop {
            let at = state.ready.iter().position(|h| h.thread == here).unwrap_or(0);
            let held = state.ready.remove(at)?;
            if held.since.elapsed() < self.max_age && held.stream.quiet() {
                return Some(held);
            }
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes the streams that have reached `max_age`; when one is left, when the oldest will.
    fn close_old(&self, state: &mut State) -> Option<Instant> {
        let mut next = None;
        let before = state.ready.len();
        state.ready.retain(|h| {
            let fresh = h.since.elapsed() < self.max_age;
            if fresh {
                next = Some(next.map_or(h.since, |n: Instant| n.min(h.since)));
            }
            fresh
        });
        self.dropped.fetch_add((before - state.ready.len()) as u64, Ordering::Relaxed);
        next.map(|since| since + self.max_age)
    }
}

/// Starts opening as many spares as are missing (none after a failure; see the module's notes).
fn refill(inner: &Arc<dyn Connector>, pool: &Arc<Pool>) {
    let missing = {
        let mut state = pool.state();
        if state.failing {
            return;
        }
        let missing = pool.want.saturating_sub(state.ready.len() + state.opening);
        state.opening += missing;
        missing
    };
    for _ in 0..missing {
        let (inner, pool) = (inner.clone(), pool.clone());
        tokio::spawn(async move {
            let opened = inner.connect().await;
            let mut state = pool.state();
            state.opening -= 1;
            match opened {
                Ok(spare) => pool.hold(&mut state, spare),
                Err(e) => {
                    state.failing = true;
                    debug!("could not open a spare stream to the agent: {e}");
                }
            }
        });
    }
}

/// Closes held streams as they reach their age; stops once none has been held for a whole
/// `max_age`.
async fn close_old(pool: Arc<Pool>) {
    let mut idle = false;
    loop {
        let next = {
            let mut state = pool.state();
            match pool.close_old(&mut state) {
                Some(next) => {
                    idle = false;
                    next
                }
                None if idle => {
                    state.reaping = false;
                    return;
                }
                // None held now: looked at once more a period later (streams that come and go
                // with each connection do not arm a timer each).
                None => {
                    idle = true;
                    Instant::now() + pool.max_age
                }
            }
        };
        tokio::time::sleep_until(next).await;
    }
}

#[cfg(test)]
#[cfg(unix)]
pub(super) mod tests {
    use super::*;
    use crate::transport::raw;
    use crate::transport::{Acceptor, in_process};
    use std::sync::atomic::AtomicUsize;

    /// An in-process transport that counts the streams it opens.
    #[derive(Debug)]
    struct Counting {
        inner: Arc<dyn Connector>,
        attempts: AtomicUsize,
        opened: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
    }

    impl fmt::Display for Counting {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("counting")
        }
    }

    impl Connector for Counting {
        fn connect(&self) -> BoxFuture<'_, Result<TransportStream, TransportError>> {
            Box::pin(async move {
                self.attempts.fetch_add(1, Ordering::SeqCst);
                if self.fail.load(Ordering::SeqCst) {
                    return Err(TransportError::Connect {
                        target: "counting".into(),
                        source: std::io::ErrorKind::ConnectionRefused.into(),
                    });
                }
                self.opened.fetch_add(1, Ordering::SeqCst);
                self.inner.connect().await
            })
        }
    }

    fn counting() -> (Arc<Counting>, Box<dyn Acceptor>) {
        let (inner, acceptor) = in_process("spares");
        let c = Arc::new(Counting {
            inner,
            attempts: AtomicUsize::new(0),
            opened: AtomicUsize::new(0),
            fail: Default::default(),
        });
        (c, acceptor)
    }

    /// Waits (a deadline, not a guess) until `cond` holds.
    pub(crate) async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Bytes written on `ours` arrive on `theirs`: the two are ends of one stream.
    async fn same_stream(ours: &TransportStream, theirs: &TransportStream) -> bool {
        if raw::write_all(ours, b"which").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 5];
        let read = tokio::time::timeout(Duration::from_millis(200), raw::read(theirs, &mut buf)).await;
        matches!(read, Ok(Ok(5))) && &buf == b"which"
    }

    /// The first connection through `spares` (none are ready yet: it opens its own, and the
    /// spares beside it), once all of them are: the connection, the far end of its stream, and
    /// the far ends of the spares.
    async fn first_connection(
        spares: &Spares,
        acceptor: &dyn Acceptor,
        want: usize,
    ) -> (TransportStream, TransportStream, Vec<TransportStream>) {
        let first = spares.connect().await.unwrap();
        until("the spares", || spares.counts().ready == want).await;
        let (mut first_end, mut spare_ends) = (None, Vec::new());
        for _ in 0..=want {
            let (end, _) = acceptor.accept().await.unwrap();
            // Which accepted stream is which: ask the first connection's.
            if first_end.is_none() && same_stream(&first, &end).await {
                first_end = Some(end);
            } else {
                spare_ends.push(end);
            }
        }
        (first, first_end.expect("the first connection's stream was accepted"), spare_ends)
    }

    #[tokio::test]
    async fn a_connection_takes_the_spare_opened_ahead_and_another_is_opened() {
        let (c, acceptor) = counting();
        let spares = Spares::new(c.clone(), 1);
        let (_first, _first_end, spare_ends) = first_connection(&spares, &*acceptor, 1).await;
        assert_eq!(c.opened.load(Ordering::SeqCst), 2);
        // The second connection is handed the spare, no new stream of its own; a new spare is
        // opened in its place.
        let second = spares.connect().await.unwrap();
        assert_eq!(spares.counts().taken, 1);
        until("the next spare", || spares.counts().ready == 1).await;
        assert_eq!(c.opened.load(Ordering::SeqCst), 3);
        assert!(same_stream(&second, &spare_ends[0]).await, "the second connection got the spare");
    }

    #[tokio::test]
    async fn a_spare_its_far_side_closed_or_spoke_on_is_dropped_for_a_live_one() {
        let (c, acceptor) = counting();
        let spares = Spares::new(c.clone(), 2);
        let (_first, _first_end, mut ends) = first_connection(&spares, &*acceptor, 2).await;
        assert_eq!(ends.len(), 2, "two spares besides the first connection's stream");
        // The far side closes the older spare and writes on the younger: neither may be
        // handed out, so the connection opens a stream of its own.
        let closed = ends.remove(0);
        drop(closed);
        raw::write_all(&ends[0], b"?").await.unwrap();
        let opened = c.opened.load(Ordering::SeqCst);
        let conn = spares.connect().await.unwrap();
        assert_eq!(spares.counts().dropped, 2, "both spares dropped");
        assert_eq!(spares.counts().taken, 0);
        assert!(c.opened.load(Ordering::SeqCst) > opened, "a stream of its own was opened");
        let (own, _) = acceptor.accept().await.unwrap();
        let _ = (own, conn);
    }

    #[tokio::test(start_paused = true)]
    async fn spares_are_closed_at_their_age_and_the_timer_stops() {
        let (c, acceptor) = counting();
        let spares = Spares::with_max_age(c.clone(), 2, 0, Duration::from_secs(5));
        let (_conn, conn_end, spare_ends) = first_connection(&spares, &*acceptor, 2).await;
        let accepted: Vec<_> = spare_ends.into_iter().chain([conn_end]).collect();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(spares.counts().ready, 2, "young spares are kept");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(spares.counts(), SpareCounts { ready: 0, limit: 2, taken: 0, dropped: 2, kept: 0 });
        assert!(spares.pool.state().reaping, "the timer looks once more a period later");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(!spares.pool.state().reaping, "the timer ended a period after the last spare");
        // The far side sees them closed: a read ends.
        let mut ended = 0;
        for s in &accepted {
            let mut b = [0u8; 1];
            if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), raw::read(s, &mut b)).await {
                ended += 1;
            }
        }
        assert_eq!(ended, 2, "both spares closed, the connection's stream open");
    }

    #[tokio::test]
    async fn a_failed_spare_stops_the_opening_of_more_until_a_stream_opens() {
        let (c, _acceptor) = counting();
        let spares = Spares::new(c.clone(), 3);
        c.fail.store(true, Ordering::SeqCst);
        for _ in 0..5 {
            assert!(spares.connect().await.is_err());
            until("the spares' attempts to end", || spares.pool.state().opening == 0).await;
        }
        // The first connection asked for three spares; they failed, and no later connection
        // asked for more: five attempts of the connections' own and three spares', not 5 + 15.
        assert!(spares.pool.state().failing);
        assert_eq!(c.attempts.load(Ordering::SeqCst), 8);
        // The agent is back: the next connection's own stream opens, and spares with it.
        c.fail.store(false, Ordering::SeqCst);
        let _conn = spares.connect().await.unwrap();
        until("three spares", || spares.counts().ready == 3).await;
        assert_eq!(c.opened.load(Ordering::SeqCst), 4);
        assert!(!spares.pool.state().failing);
    }

    /// A pool that opens nothing ahead and keeps up to `keep` streams given back.
    fn reusing(c: &Arc<Counting>, keep: usize) -> Spares {
        Spares::with_max_age(c.clone(), 0, keep, MAX_AGE)
    }

    #[tokio::test]
    async fn a_stream_given_back_serves_the_next_connection_without_a_new_one() {
        let (c, acceptor) = counting();
        let spares = reusing(&c, 2);
        let first = spares.connect().await.unwrap();
        let (far, _) = acceptor.accept().await.unwrap();
        spares.give_back(first);
        assert_eq!(spares.counts().ready, 1);
        let second = spares.connect().await.unwrap();
        assert_eq!(c.opened.load(Ordering::SeqCst), 1, "no second stream opened");
        assert_eq!((spares.counts().kept, spares.counts().taken), (1, 1));
        assert!(same_stream(&second, &far).await, "the second connection runs on the first's stream");
    }

    #[tokio::test]
    async fn streams_given_back_past_the_limit_are_closed() {
        let (c, acceptor) = counting();
        let spares = reusing(&c, 1);
        let (one, two) = (spares.connect().await.unwrap(), spares.connect().await.unwrap());
        let mut far = vec![acceptor.accept().await.unwrap().0, acceptor.accept().await.unwrap().0];
        spares.give_back(one);
        spares.give_back(two);
        assert_eq!((spares.counts().ready, spares.counts().kept), (1, 1), "one kept, the other closed");
        // Exactly one far end sees its stream closed.
        let mut closed = 0;
        for end in far.drain(..) {
            let mut b = [0u8; 1];
            if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(50), raw::read(&end, &mut b)).await
            {
                closed += 1;
            }
        }
        assert_eq!(closed, 1);
    }

    #[tokio::test]
    async fn a_stream_given_back_is_handed_out_past_a_crossing_reset_but_not_past_other_bytes() {
        use hostnet_protocol::chunk::RST;
        let (c, acceptor) = counting();
        let spares = reusing(&c, 2);
        let (a, b) = (spares.connect().await.unwrap(), spares.connect().await.unwrap());
        let (far_a, far_b) = (acceptor.accept().await.unwrap().0, acceptor.accept().await.unwrap().0);
        let (a_end, b_end) = if same_stream(&a, &far_a).await { (far_a, far_b) } else { (far_b, far_a) };
        // The far side of `a` reset its last connection as ours closed (an RST alone); that of
        // `b` wrote something else.
        raw::write_all(&a_end, &RST).await.unwrap();
        raw::write_all(&b_end, b"HNET").await.unwrap();
        spares.give_back(b);
        spares.give_back(a);
        until("both written", || {
            let mut peek = [std::mem::MaybeUninit::uninit(); 8];
            let state = spares.pool.state();
            state.ready.iter().all(|h| matches!(socket2::SockRef::from(&h.stream).peek(&mut peek), Ok(4)))
        })
        .await;
        let next = spares.connect().await.unwrap();
        assert_eq!(spares.counts().dropped, 1, "the stream with other bytes was dropped");
        assert!(same_stream(&next, &a_end).await, "the one with a reset alone was handed out");
        // Its RST was read out of the way: what the far side writes next comes first.
        raw::write_all(&a_end, b"next").await.unwrap();
        let (mut got, mut n) = ([0u8; 4], 0);
        while n < got.len() {
            n += raw::read(&next, &mut got[n..]).await.unwrap();
        }
        assert_eq!(&got, b"next");
        let _ = b_end;
    }
}
