//! Relay threads: each relayed connection lives on a thread that runs a single-threaded runtime
//! of its own — the thread that accepted it, unless that thread has been busy for most of the
//! last few milliseconds ([`BUSY`]) and another much less so; then it goes to the least busy
//! one. It may move once more, when it turns to bulk (below).
//!
//! Why (`docs/performance.md`, round six): on tokio's work-stealing runtime a worker that
//! finds two tasks ready wakes a sibling to steal one. With two workers each side paid about
//! one context switch and one `futex` wake more per connection — 23 % of the relays' CPU per
//! connection on two virtual CPUs — and a connection's tasks wandered between the workers.
//! Here a connection is placed when it is accepted: on the accepting thread (nobody else
//! is woken), or, when that thread is saturated, on the least busy one — its socket leaves this
//! thread's reactor and joins that one's, one wake-up paid only then. Placing by the number of
//! connections instead was tried and measured: four clients' short connections kept crossing
//! over, which cost more than it saved. Listeners' accept loops are spread over the threads in
//! turn ([`RelayThreads::spawn_loop`]).
//!
//! A connection accepted with others at once starts with them, on one thread. When it turns to
//! bulk — its first large read, or a write the far side could not take at once — it may move
//! once more ([`spread_bulk`]): to the thread with the fewest bulk connections, if that has
//! fewer than this one's. So a burst of parallel transfers on one port spreads over the
//! threads (one per CPU), while short and interactive connections, which never turn to bulk,
//! never move. It moves between two polls of its task: the task ends on the old thread and
//! goes on, the same future, on the new one, where its sockets
//! ([`crate::transport::roaming::Roaming`]) leave the old thread's reactor for the new one's.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, RuntimeMetrics};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, warn};

/// The share of the last [`WINDOW`]–2×[`WINDOW`] a thread spent running (not parked) from
/// which it counts as saturated: a new connection accepted there goes to the least busy thread
/// if that one is [`MARGIN`] less busy.
pub const BUSY: f64 = 0.75;
/// See [`BUSY`].
pub const MARGIN: f64 = 0.25;
/// See [`BUSY`].
pub const WINDOW: Duration = Duration::from_millis(10);

/// The environment variable that sets how many relay threads a side starts
/// ([`RelayThreads::default_count`]).
pub const RELAY_THREADS_ENV: &str = "HOSTNET_RELAY_THREADS";

thread_local! {
    /// On a relay thread: its set's id and its index there.
    static CURRENT: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
    /// While a connection's task ([`Placed`]) is polled: what [`spread_bulk`] may do, and what
    /// it asked.
    static ROAM: Cell<Roam> = const { Cell::new(Roam::Off) };
    /// While a connection's task is polled: whether every part of it that is polled only when
    /// woken (`crate::relay::woken::OnWake`) is polled anyway — its streams joined this
    /// thread's reactor during the poll before, and a wait made before that is lost.
    static POLL_ALL: Cell<bool> = const { Cell::new(false) };
}

/// Whether the task being polled must poll every part of it, woken or not ([`POLL_ALL`]): the
/// poll after its connection's streams moved to this thread's reactor.
pub fn polling_all() -> bool {
    POLL_ALL.get()
}

/// A connection's standing with its task, for [`spread_bulk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Roam {
    /// Not a connection placed on relay threads (or between polls).
    Off,
    /// Placed, not bulk yet: may move when it turns to bulk.
    Light,
    /// Counted as bulk already: stays.
    Heavy,
    /// Turned to bulk during this poll: its task places it again.
    Turned,
    /// Its streams joined this thread's reactor during this poll: the next poll polls all of
    /// the task ([`POLL_ALL`]), so every wait is made again here.
    Rehomed,
}

/// Ids of sets, so a thread knows whether it belongs to the set it is asked about (a proxy and
/// an agent in one test process each have theirs).
static NEXT_SET: AtomicUsize = AtomicUsize::new(0);

/// A set of relay threads; they stop when it is dropped (what still runs on them is dropped).
#[derive(Debug)]
pub struct RelayThreads {
    id: usize,
    /// What the threads' clocks count from.
    epoch: Instant,
    /// Shared with the connections' tasks (which move between them), not the set: they do
    /// not keep the threads running.
    threads: Arc<[Thread]>,
    next_loop: AtomicUsize,
    stop: CancellationToken,
}

#[derive(Debug)]
struct Thread {
    handle: Handle,
    /// Its runtime's counters (kept: `Handle::metrics` clones the handle on every call).
    metrics: RuntimeMetrics,
    /// Connections placed here and not finished.
    live: Arc<AtomicUsize>,
    /// Of those, the ones that turned to bulk ([`spread_bulk`]).
    bulk: Arc<AtomicUsize>,
    busy: Busy,
}

/// How busy a thread has been lately, from its runtime's own count of the time it spent
/// running tasks (`worker_total_busy_duration`, which tokio keeps whatever we do, brought up to
/// date each time the thread turns its reactor — before any I/O can wake an accept loop) —
/// rather than hooks of our own on every park and unpark, which read the clock twice more per
/// wake-up (~550 user instructions per relayed round trip in each process, round nine).
#[derive(Debug, Default)]
struct Busy {
    /// Two samples (when, busy until then; nanoseconds since the set's epoch) the share is
    /// measured between: the older first.
    samples: [[AtomicU64; 2]; 2],
}

impl Busy {
    /// The share of the time since the older sample spent running, `busy` the running time
    /// until `now` (a window of one to two [`WINDOW`]s; the samples move on once the newer is a
    /// window old).
    fn share(&self, now: u64, busy: u64) -> f64 {
        let [older, newer] = &self.samples;
        let window = WINDOW.as_nanos() as u64;
        if now.saturating_sub(newer[0].load(Ordering::Relaxed)) >= window {
            older[0].store(newer[0].load(Ordering::Relaxed), Ordering::Relaxed);
            older[1].store(newer[1].load(Ordering::Relaxed), Ordering::Relaxed);
            newer[0].store(now, Ordering::Relaxed);
            newer[1].store(busy, Ordering::Relaxed);
        }
        let (from, busy_then) = (older[0].load(Ordering::Relaxed), older[1].load(Ordering::Relaxed));
        let span = now.saturating_sub(from);
        if span == 0 { 0.0 } else { (busy.saturating_sub(busy_then) as f64 / span as f64).min(1.0) }
    }
}

impl Thread {
    /// [`Busy::share`] now.
    fn share(&self, now: u64) -> f64 {
        let busy = self.metrics.worker_total_busy_duration(0).as_nanos();
        self.busy.share(now, u64::try_from(busy).unwrap_or(u64::MAX))
    }
}

/// Where a connection accepted on thread `here` (`None`: not on one of them) goes, given each
/// thread's [`Busy::share`] and connections: here unless it is saturated and another is much
/// less busy; else the least busy (fewest connections among equals).
fn choose(here: Option<usize>, shares: &[f64], live: &[usize]) -> Option<usize> {
    let key = |i: usize| (shares.get(i).copied().unwrap_or(1.0), live.get(i).copied().unwrap_or(usize::MAX));
    let least = (0..shares.len()).min_by(|&a, &b| {
        let ((sa, la), (sb, lb)) = (key(a), key(b));
        sa.total_cmp(&sb).then(la.cmp(&lb))
    })?;
    match here {
        Some(h) if h < shares.len() => {
            let (mine, theirs) = (key(h).0, key(least).0);
            Some(if mine >= BUSY && mine - theirs >= MARGIN { least } else { h })
        }
        _ => Some(least),
    }
}

/// Where a connection that turned to bulk on thread `here` goes, given each thread's bulk
/// connections (not counting it): to the one with the fewest if that has fewer than here; else
/// it stays (`None`).
fn spread(here: usize, bulk: &[usize]) -> Option<usize> {
    let least = (0..bulk.len()).min_by_key(|&i| bulk.get(i).copied().unwrap_or(usize::MAX))?;
    (*bulk.get(here)? > *bulk.get(least)?).then_some(least)
}

/// Each thread's bulk connections now.
fn bulk_counts(threads: &[Thread]) -> Vec<usize> {
    threads.iter().map(|t| t.bulk.load(Ordering::Relaxed)).collect()
}

/// A connection that can leave one thread's reactor and join another's.
pub trait Movable: Sized + Send + 'static {
    /// The connection between the two: registered with no reactor.
    type Detached: Send + 'static;
    fn detach(self) -> io::Result<Self::Detached>;
    /// Registers with the reactor of the thread this runs on.
    fn attach(detached: Self::Detached) -> io::Result<Self>;
}

/// A task with no socket of its own yet: nothing to move.
struct NoSockets;

impl Movable for NoSockets {
    type Detached = ();
    fn detach(self) -> io::Result<()> {
        Ok(())
    }
    fn attach((): ()) -> io::Result<Self> {
        Ok(NoSockets)
    }
}

impl Movable for tokio::net::TcpStream {
    type Detached = std::net::TcpStream;
    fn detach(self) -> io::Result<std::net::TcpStream> {
        self.into_std()
    }
    fn attach(detached: std::net::TcpStream) -> io::Result<Self> {
        tokio::net::TcpStream::from_std(detached)
    }
}

/// One connection counted on its thread (in `live` or `bulk`) until it ends or moves.
#[derive(Debug)]
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(count: &Arc<AtomicUsize>) -> Counted {
        count.fetch_add(1, Ordering::Relaxed);
        Counted(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's task on a relay thread: polls the connection and, when it has turned to bulk
/// ([`spread_bulk`]), places it again — here, counted as bulk, or on another thread, where
/// the same future goes on in a task of its own and this one ends.
struct Placed {
    conn: Pin<Box<dyn Future<Output = ()> + Send>>,
    threads: Arc<[Thread]>,
    here: usize,
    /// Counts it on its thread while it is there.
    _live: Counted,
    bulk: Option<Counted>,
    /// Keeps the connection's tracker waiting for it, wherever it runs.
    token: TaskTrackerToken,
    /// The next poll is to poll all of the connection ([`POLL_ALL`]).
    poll_all: bool,
}

impl Future for Placed {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let before = ROAM.replace(if this.bulk.is_some() { Roam::Heavy } else { Roam::Light });
        let all_before = POLL_ALL.replace(std::mem::take(&mut this.poll_all));
        let polled = this.conn.as_mut().poll(cx);
        POLL_ALL.set(all_before);
        let asked = ROAM.replace(before);
        if asked == Roam::Rehomed {
            // `spread_bulk` woke the task: its next poll makes every wait again.
            this.poll_all = true;
        }
        if polled.is_ready() || asked != Roam::Turned {
            return polled;
        }
        let threads = this.threads.clone();
        let Some((to, there)) =
            spread(this.here, &bulk_counts(&threads)).and_then(|to| Some((to, threads.get(to)?)))
        else {
            if let Some(t) = threads.get(this.here) {
                this.bulk = Some(Counted::new(&t.bulk));
            }
            // `spread_bulk` woke the task: it goes on here.
            return Poll::Pending;
        };
        let moved = Placed {
            conn: std::mem::replace(&mut this.conn, Box::pin(std::future::ready(()))),
            here: to,
            _live: Counted::new(&there.live),
            bulk: Some(Counted::new(&there.bulk)),
            token: this.token.clone(),
            threads: threads.clone(),
            poll_all: true,
        };
        there.handle.spawn(moved);
        Poll::Ready(())
    }
}

/// Called by a relay when its connection turns to bulk, with nothing in hand: on a relay
/// thread, if its streams can follow (`roams`) and this is its first bulk turn, its task may
/// move it to the thread with the fewest bulk connections ([`spread`]). After a move `rehome`
/// takes the streams to the new thread's reactor, and the task is polled once more, all of it
/// ([`polling_all`]), so a wait the other direction began on the old reactor is made again on
/// the new one. Elsewhere, or once the connection counts as bulk, it returns at once.
pub async fn spread_bulk(roams: bool, rehome: impl FnOnce() -> io::Result<()>) {
    if !roams || ROAM.get() != Roam::Light {
        return;
    }
    let from = CURRENT.get();
    ROAM.set(Roam::Turned);
    yield_once().await;
    if CURRENT.get() == from {
        return;
    }
    if let Err(e) = rehome() {
        // The stream that could not join reports it at its next use: the relay ends there.
        debug!("a connection moved to another relay thread lost its socket: {e}");
    }
    ROAM.set(Roam::Rehomed);
    yield_once().await;
}

/// Pending once, woken at once.
async fn yield_once() {
    let mut yielded = false;
    poll_fn(|cx| {
        if std::mem::replace(&mut yielded, true) {
            return Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Why [`RelayThreads::bind_loop`] has no listener.
#[derive(Debug)]
pub enum BindLoopError<E> {
    /// The bind failed.
    Bind(E),
    /// The relay threads stopped before it ran.
    Stopped,
}

impl<E: std::fmt::Display> std::fmt::Display for BindLoopError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindLoopError::Bind(e) => e.fmt(f),
            BindLoopError::Stopped => f.write_str("the relay thread stopped"),
        }
    }
}

impl RelayThreads {
    /// `HOSTNET_RELAY_THREADS` when it is a number from 1 to 1024, else one per CPU this process
    /// may use.
    pub fn default_count() -> usize {
        std::env::var(RELAY_THREADS_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|n| (1..=1024).contains(n))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Starts `count` threads (at least one), named `{name}-0`, `{name}-1`, …
    pub fn start(name: &str, count: usize) -> io::Result<Arc<RelayThreads>> {
        let id = NEXT_SET.fetch_add(1, Ordering::Relaxed);
        let epoch = Instant::now();
        let stop = CancellationToken::new();
        let mut threads = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            threads.push(Thread {
                handle: runtime.handle().clone(),
                metrics: runtime.metrics(),
                live: Arc::default(),
                bulk: Arc::default(),
                busy: Busy::default(),
            });
            let stop = stop.clone();
            std::thread::Builder::new().name(format!("{name}-{index}")).spawn(move || {
                CURRENT.set(Some((id, index)));
                runtime.block_on(stop.cancelled());
            })?;
        }
        Ok(Arc::new(RelayThreads {
            id,
            epoch,
            threads: threads.into(),
            next_loop: AtomicUsize::new(0),
            stop,
        }))
    }

    /// How busy each thread has been lately (0 to 1; see [`BUSY`]).
    pub fn shares(&self) -> Vec<f64> {
        let now = nanos_since(self.epoch);
        self.threads.iter().map(|t| t.share(now)).collect()
    }

    /// Connections on each thread now.
    pub fn live(&self) -> Vec<usize> {
        self.threads.iter().map(|t| t.live.load(Ordering::Relaxed)).collect()
    }

    /// Of those, the ones that turned to bulk ([`spread_bulk`]).
    pub fn bulk(&self) -> Vec<usize> {
        bulk_counts(&self.threads)
    }

    /// This thread's index, if it is one of these.
    pub fn current(&self) -> Option<usize> {
        CURRENT.get().filter(|&(set, _)| set == self.id).map(|(_, index)| index)
    }

    /// Runs a listener's accept loop on the next thread in turn. The listener must be made
    /// inside `accept_loop` (so it registers with that thread's reactor), or its readiness
    /// would come from another thread's.
    pub fn spawn_loop(&self, accept_loop: impl Future<Output = ()> + Send + 'static) {
        let turn = self.next_loop.fetch_add(1, Ordering::Relaxed) % self.threads.len().max(1);
        if let Some(t) = self.threads.get(turn) {
            t.handle.spawn(accept_loop);
        }
    }

    /// Makes a listener with `bind` on the next thread in turn ([`Self::spawn_loop`]: so that
    /// thread's reactor wakes it, and the streams it accepts start there) and tells whether it
    /// was made, before the caller starts anything that depends on it. Its accept loop,
    /// `serve(listener, needs)`, runs there once the returned sender is sent what the loop
    /// needs — made after the bind, as what it needs usually is; dropping the sender ends the
    /// loop before it begins. Tracked by `tracker`.
    pub async fn bind_loop<L, E, N, Fut>(
        &self,
        tracker: &TaskTracker,
        bind: impl Future<Output = Result<L, E>> + Send + 'static,
        serve: impl FnOnce(L, N) -> Fut + Send + 'static,
    ) -> Result<oneshot::Sender<N>, BindLoopError<E>>
    where
        L: Send + 'static,
        E: Send + 'static,
        N: Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let (bound_tx, bound) = oneshot::channel();
        let (start, started) = oneshot::channel::<N>();
        self.spawn_loop(tracker.track_future(async move {
            let listener = match bind.await {
                Ok(l) => l,
                Err(e) => return drop(bound_tx.send(Err(e))),
            };
            let _ = bound_tx.send(Ok(()));
            let Ok(needs) = started.await else { return };
            serve(listener, needs).await;
        }));
        match bound.await {
            Ok(Ok(())) => Ok(start),
            Ok(Err(e)) => Err(BindLoopError::Bind(e)),
            Err(_) => Err(BindLoopError::Stopped),
        }
    }

    /// Runs `serve(conn)` for a connection just accepted, tracked by `tracker`: on this thread
    /// if it is one of these and not saturated ([`BUSY`]), else on the least busy one, `conn`
    /// moved there. It may move once more when it turns to bulk ([`spread_bulk`]). Boxed: a
    /// connection's future is several KiB, and tokio copies an unboxed one into the task and
    /// again over its finished stage (and a moving one must keep its place in memory).
    pub fn spawn_connection<C, F, Fut>(&self, conn: C, tracker: &TaskTracker, serve: F)
    where
        C: Movable,
        F: FnOnce(C) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let here = self.current();
        let Some((index, live)) = self.place(here) else { return };
        let placed = |conn: Pin<Box<dyn Future<Output = ()> + Send>>| Placed {
            conn,
            threads: self.threads.clone(),
            here: index,
            _live: live,
            bulk: None,
            token: tracker.token(),
            poll_all: false,
        };
        if here == Some(index) {
            tokio::spawn(placed(Box::pin(serve(conn))));
            return;
        }
        let detached = match conn.detach() {
            Ok(d) => d,
            Err(e) => return warn!("cannot hand a connection to relay thread {index}: {e}"),
        };
        let Some(thread) = self.threads.get(index) else { return };
        thread.handle.spawn(placed(Box::pin(async move {
            match C::attach(detached) {
                Ok(conn) => serve(conn).await,
                Err(e) => warn!("cannot take a connection on relay thread {index}: {e}"),
            }
        })));
    }

    /// Runs `task`, which makes its sockets itself (a UDP flow opening its stream), tracked by
    /// `tracker` and placed as a connection is: on this thread unless it is saturated, else on
    /// the least busy one.
    pub fn spawn_task(&self, tracker: &TaskTracker, task: impl Future<Output = ()> + Send + 'static) {
        self.spawn_connection(NoSockets, tracker, |NoSockets| task);
    }

    /// Chooses the thread of a new connection and counts it there. The common case — here,
    /// not saturated, which [`choose`] would answer with here — reads only this thread's
    /// clock; the others are read only when this one is saturated.
    fn place(&self, here: Option<usize>) -> Option<(usize, Counted)> {
        let now = nanos_since(self.epoch);
        let keep = here.filter(|&h| self.threads.get(h).is_some_and(|t| t.share(now) < BUSY));
        let chosen = match keep {
            Some(h) => h,
            None => choose(here, &self.shares(), &self.live())?,
        };
        Some((chosen, Counted::new(&self.threads.get(chosen)?.live)))
    }
}

fn nanos_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
}

impl Drop for RelayThreads {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// A connection that records how often it moved.
    struct Conn(u32);
    static MOVES: AtomicUsize = AtomicUsize::new(0);

    impl Movable for Conn {
        type Detached = u32;
        fn detach(self) -> io::Result<u32> {
            Ok(self.0)
        }
        fn attach(n: u32) -> io::Result<Self> {
            MOVES.fetch_add(1, Ordering::Relaxed);
            Ok(Conn(n))
        }
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_connection_stays_here_unless_here_is_saturated_and_another_much_less_busy() {
        // Not saturated: here, however many connections it has.
        assert_eq!(choose(Some(0), &[0.5, 0.0], &[40, 0]), Some(0));
        // Saturated, the other idle: there.
        assert_eq!(choose(Some(0), &[0.9, 0.1], &[1, 5]), Some(1));
        // Saturated, but so is everyone (within the margin): here, no wake-up elsewhere.
        assert_eq!(choose(Some(1), &[0.8, 0.95, 0.75], &[0, 0, 0]), Some(1));
        // Among equally busy ones, the fewest connections.
        assert_eq!(choose(Some(0), &[1.0, 0.2, 0.2], &[9, 3, 1]), Some(2));
        // Accepted elsewhere: the least busy.
        assert_eq!(choose(None, &[0.3, 0.1], &[0, 9]), Some(1));
        assert_eq!(choose(None, &[], &[]), None);
    }

    #[test]
    fn connections_stay_on_the_accepting_thread_until_it_is_saturated() {
        let threads = RelayThreads::start("test-relay", 2).unwrap();
        let tracker = TaskTracker::new();
        let release = CancellationToken::new();
        // Where each connection ran, by its number.
        let ran: Arc<Mutex<Vec<(u32, usize)>>> = Arc::default();
        let accept = |from: u32, to: u32, busy_first: Duration| {
            let (t, tr, rel, ran) = (threads.clone(), tracker.clone(), release.clone(), ran.clone());
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            threads.threads[0].handle.spawn(async move {
                // Running without a break (a blocking wait counts as running), as a thread
                // saturated by its connections is; then accepting as an accept loop does,
                // woken once its thread turned its reactor (which brings the count of its
                // running time up to date).
                std::thread::sleep(busy_first);
                tokio::task::yield_now().await;
                assert_eq!(t.current(), Some(0));
                for n in from..to {
                    let (t2, rel, ran) = (t.clone(), rel.clone(), ran.clone());
                    t.spawn_connection(Conn(n), &tr, move |c| async move {
                        ran.lock().unwrap().push((c.0, t2.current().expect("on a relay thread")));
                        rel.cancelled().await;
                    });
                }
                done_tx.send((t.live(), t.shares())).unwrap();
            });
            done_rx.recv_timeout(Duration::from_secs(10)).unwrap()
        };
        // Idle threads: eight connections at once all stay where they were accepted.
        let (live, _) = accept(0, 8, Duration::ZERO);
        assert_eq!(live, [8, 0]);
        assert_eq!(MOVES.load(Ordering::Relaxed), 0, "none moved");
        // After 5 windows of running without a break, the next goes to the idle thread.
        let (live, shares) = accept(8, 9, 5 * WINDOW);
        assert!(shares[0] >= BUSY && shares[1] < BUSY - MARGIN, "{shares:?}");
        assert_eq!(live, [8, 1]);
        wait_until("all 9 running", || ran.lock().unwrap().len() == 9);
        let mut ran_on = ran.lock().unwrap().clone();
        ran_on.sort();
        let on: Vec<usize> = ran_on.iter().map(|&(_, i)| i).collect();
        assert_eq!(on, [0, 0, 0, 0, 0, 0, 0, 0, 1], "each ran where it was placed");
        assert_eq!(MOVES.load(Ordering::Relaxed), 1, "only the handed-off one moved");
        assert_eq!(threads.current(), None, "the test's thread is not a relay thread");

        release.cancel();
        wait_until("every connection counted out", || threads.live() == [0, 0]);
        tracker.close();
    }

    #[test]
    fn the_choice_of_a_connection_turning_to_bulk() {
        // Alone in bulk: stays.
        assert_eq!(spread(0, &[0, 0]), None);
        // Another bulk connection here, none there: goes there.
        assert_eq!(spread(0, &[1, 0]), Some(1));
        // Even: stays.
        assert_eq!(spread(1, &[1, 1]), None);
        // To the fewest.
        assert_eq!(spread(0, &[3, 2, 1, 2]), Some(2));
        assert_eq!(spread(5, &[0, 0]), None);
        assert_eq!(spread(0, &[]), None);
    }

    #[tokio::test]
    async fn a_connection_accepted_elsewhere_moves_to_a_relay_thread_and_works_there() {
        let threads = RelayThreads::start("test-relay-outside", 3).unwrap();
        let tracker = TaskTracker::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let t = threads.clone();
        let (listener, stream) = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            (l, c)
        };
        stream.set_nonblocking(true).unwrap();
        let stream = tokio::net::TcpStream::from_std(stream).unwrap();
        threads.spawn_connection(stream, &tracker, move |s| async move {
            // A real socket, moved to and usable on its new thread's reactor.
            let ok = s.writable().await.is_ok();
            let _ = tx.send((ok, t.current()));
        });
        let (writable, on) = rx.await.unwrap();
        assert!(writable);
        assert!(on.is_some(), "moved to a relay thread");
        drop(listener);
        tracker.close();
        tracker.wait().await;
        assert_eq!(threads.live(), [0, 0, 0]);
    }

    /// The bind runs on a relay thread and its result comes back before the loop starts; the
    /// loop gets what it was sent, on that thread; a failed bind is the caller's error, and a
    /// dropped sender ends the loop unrun.
    #[tokio::test]
    async fn a_loop_is_bound_on_a_relay_thread_and_starts_when_sent_its_needs() {
        let threads = RelayThreads::start("test-relay-bind", 2).unwrap();
        let tracker = TaskTracker::new();
        let (ran_tx, ran) = oneshot::channel();
        let t = threads.clone();
        let start = threads
            .bind_loop(
                &tracker,
                {
                    let t = threads.clone();
                    async move { Ok::<_, String>(t.current()) }
                },
                move |bound_on, needs: &'static str| async move {
                    let _ = ran_tx.send((bound_on, t.current(), needs));
                },
            )
            .await
            .unwrap();
        start.send("sessions").unwrap();
        let (bound_on, ran_on, needs) = ran.await.unwrap();
        assert!(bound_on.is_some(), "bound off the relay threads");
        assert_eq!(bound_on, ran_on, "the loop ran on another thread than its bind");
        assert_eq!(needs, "sessions");

        let failed =
            threads.bind_loop(&tracker, async { Err::<(), _>("port in use") }, |(), ()| async {}).await;
        assert!(matches!(failed, Err(BindLoopError::Bind("port in use"))), "{failed:?}");

        let (ran_tx, ran) = oneshot::channel::<()>();
        let start = threads
            .bind_loop(&tracker, async { Ok::<_, ()>(()) }, move |(), ()| async move {
                let _ = ran_tx.send(());
            })
            .await
            .unwrap();
        drop(start);
        assert!(ran.await.is_err(), "the loop ran without its needs");
        tracker.close();
        tracker.wait().await;
    }

    /// A task that makes its own sockets runs on a relay thread — beside the spawner when that
    /// is one and not saturated — and counts there while it runs.
    #[tokio::test]
    async fn a_task_is_placed_as_a_connection_is() {
        let threads = RelayThreads::start("test-relay-task", 2).unwrap();
        let tracker = TaskTracker::new();
        let release = CancellationToken::new();
        let (where_tx, mut where_rx) = tokio::sync::mpsc::unbounded_channel();
        // From outside the relay threads: onto one of them.
        let (t, tx, rel) = (threads.clone(), where_tx.clone(), release.clone());
        threads.spawn_task(&tracker, async move {
            let _ = tx.send(t.current());
            rel.cancelled().await;
        });
        let outside = where_rx.recv().await.unwrap();
        assert!(outside.is_some(), "not run on a relay thread");
        // From a relay thread (idle): beside its spawner.
        let (t, tr, rel) = (threads.clone(), tracker.clone(), release.clone());
        threads.threads[1].handle.spawn(async move {
            let t2 = t.clone();
            t.spawn_task(&tr, async move {
                let _ = where_tx.send(t2.current());
                rel.cancelled().await;
            });
        });
        assert_eq!(where_rx.recv().await.unwrap(), Some(1), "not placed beside its spawner");
        assert_eq!(threads.live().iter().sum::<usize>(), 2, "{:?}", threads.live());
        release.cancel();
        tracker.close();
        tracker.wait().await;
        assert_eq!(threads.live(), [0, 0]);
    }
}
