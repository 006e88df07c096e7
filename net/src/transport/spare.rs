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
//! of that), by a timer that runs only while spares are held, so an idle proxy goes quiet. A
//! spare whose far side has closed it or sent anything (the agent restarted, the VM went
//! away) is dropped when a connection would take it, and the next one is tried. When opening
//! a spare fails, none is opened again until a connection's own stream has been opened: a
//! stopped agent is not asked for streams on the side.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

use crate::threads::Movable;
use crate::transport::handshake::HANDSHAKE_TIMEOUT;
use crate::transport::stream::{DetachedStream, TransportStream};
use crate::transport::{BoxFuture, Connector, TransportError};

/// How long a spare is kept unused: half the time the agent waits for a stream's opening.
pub const MAX_AGE: Duration = Duration::from_secs(HANDSHAKE_TIMEOUT.as_secs() / 2);

/// Spares kept for a VM's transports (`vsock:`, `hybrid:`, `hyperv:`), where setting up a
/// stream is a round trip through the VMM: enough for a browser's burst of parallel
/// connections to find most of theirs ready. Each is a stream the agent holds open.
pub const VM_SPARES: usize = 4;

/// `inner` with `want` spares ([`Spares`]), or `inner` itself for none.
pub fn with_spares(inner: Arc<dyn Connector>, want: usize) -> Arc<dyn Connector> {
    match want {
        0 => inner,
        n => Arc::new(Spares::new(inner, n)),
    }
}

/// A [`Connector`] that hands out streams opened ahead of need (see the module's notes).
pub struct Spares {
    inner: Arc<dyn Connector>,
    pool: Arc<Pool>,
}

struct Pool {
    want: usize,
    max_age: Duration,
    state: Mutex<State>,
    taken: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Set up and idle, oldest first, each with when it was.
    ready: VecDeque<(Instant, DetachedStream)>,
    /// Being opened now.
    opening: usize,
    /// The timer that closes old spares is running.
    reaping: bool,
    /// The last spare could not be opened: open none until a connection's own stream opens.
    failing: bool,
}

/// What a [`Spares`] has done, for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpareCounts {
    /// Set up and idle now.
    pub ready: usize,
    /// Handed to a connection.
    pub taken: u64,
    /// Closed unused: too old, or its far side closed it or spoke first.
    pub dropped: u64,
}

impl Spares {
    /// Keeps `want` streams of `inner` ready.
    pub fn new(inner: Arc<dyn Connector>, want: usize) -> Spares {
        Spares::with_max_age(inner, want, MAX_AGE)
    }

    /// As [`Spares::new`], closing spares older than `max_age`.
    pub fn with_max_age(inner: Arc<dyn Connector>, want: usize, max_age: Duration) -> Spares {
        let pool = Pool {
            want,
            max_age,
            state: Mutex::new(State::default()),
            taken: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        };
        Spares { inner, pool: Arc::new(pool) }
    }

    pub fn counts(&self) -> SpareCounts {
        SpareCounts {
            ready: self.pool.state().ready.len(),
            taken: self.pool.taken.load(Ordering::Relaxed),
            dropped: self.pool.dropped.load(Ordering::Relaxed),
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
            let spare = self.pool.take();
            refill(&self.inner, &self.pool);
            if let Some(spare) = spare {
                match TransportStream::attach(spare) {
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
}

impl Pool {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The oldest spare that is young enough and still quiet; the others met on the way are
    /// closed.
    fn take(&self) -> Option<DetachedStream> {
        let mut state = self.state();
        while let Some((since, spare)) = state.ready.pop_front() {
            if since.elapsed() < self.max_age && spare.quiet() {
                return Some(spare);
            }
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    /// Closes the spares that have reached `max_age`; when one is left, when the oldest will.
    fn close_old(&self, state: &mut State) -> Option<Instant> {
        while let Some((since, _)) = state.ready.front() {
            if since.elapsed() < self.max_age {
                return Some(*since + self.max_age);
            }
            state.ready.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        None
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
            let opened = match inner.connect().await {
                Ok(stream) => stream.detach().map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let mut state = pool.state();
            state.opening -= 1;
            match opened {
                Ok(spare) => {
                    state.ready.push_back((Instant::now(), spare));
                    if !std::mem::replace(&mut state.reaping, true) {
                        tokio::spawn(close_old(pool.clone()));
                    }
                }
                Err(e) => {
                    state.failing = true;
                    debug!("could not open a spare stream to the agent: {e}");
                }
            }
        });
    }
}

/// Closes spares as they reach their age, until none is left.
async fn close_old(pool: Arc<Pool>) {
    loop {
        let next = {
            let mut state = pool.state();
            match pool.close_old(&mut state) {
                Some(next) => next,
                None => {
                    state.reaping = false;
                    return;
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
        let spares = Spares::with_max_age(c.clone(), 2, Duration::from_secs(5));
        let (_conn, conn_end, spare_ends) = first_connection(&spares, &*acceptor, 2).await;
        let accepted: Vec<_> = spare_ends.into_iter().chain([conn_end]).collect();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(spares.counts().ready, 2, "young spares are kept");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(spares.counts(), SpareCounts { ready: 0, taken: 0, dropped: 2 });
        assert!(!spares.pool.state().reaping, "the timer ended with the last spare");
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
}
