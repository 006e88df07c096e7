//! Deadlines for waits that are rarely cut short (a stream's opening), without arming a timer
//! per wait.
//!
//! tokio wakes its driver — an `eventfd` write, and one more `epoll_wait` — whenever a timer is
//! armed on a thread whose driver last settled with no timer pending: it must work out again
//! how long to sleep. A relay thread that accepts a stream whose opening has not arrived yet
//! paid that on each new connection (over a real VM's vsock on every one: the proxy writes the
//! opening only once the VMM has answered `OK`). Here the waits that end in the same [`SLOT`]
//! share one deadline, and one timer per thread serves all of them: armed when the first wait
//! starts on a thread with none in flight, then moved from one slot's end to the next. A wait
//! therefore ends between its limit and its limit plus one slot.

use std::collections::BTreeMap;
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How finely deadlines are kept: a wait ends between its limit and its limit plus this.
pub const SLOT: Duration = Duration::from_millis(500);

/// A wait's limit passed ([`within`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `fut` until it finishes or `limit` (rounded up to the next [`SLOT`]) has passed since
/// the first poll.
pub async fn within<F: Future>(limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
    let slot = Deadlines::here().slot_for(limit);
    let mut fut = pin!(fut);
    let mut passed = pin!(slot.notify.notified());
    // Listening before the flag is read: a slot passed in between still wakes this wait.
    passed.as_mut().enable();
    poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if slot.passed.load(Ordering::Acquire) || passed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Elapsed));
        }
        Poll::Pending
    })
    .await
}

/// The waits that end in one slot.
#[derive(Debug, Default)]
struct Slot {
    passed: AtomicBool,
    notify: Notify,
}

/// One thread's slots and the task that ends them.
#[derive(Debug)]
struct Deadlines {
    epoch: Instant,
    state: Mutex<State>,
    /// Told when a slot ending sooner than the one the task sleeps towards is added.
    sooner: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// By slot number: slot `k` ends at `epoch + k × SLOT`.
    slots: BTreeMap<u64, Arc<Slot>>,
    /// Whether this thread's task runs (it stops when no slot is left).
    running: bool,
}

thread_local! {
    static HERE: Arc<Deadlines> = Arc::new(Deadlines {
        epoch: Instant::now(),
        state: Mutex::new(State::default()),
        sooner: Notify::new(),
    });
}

impl Deadlines {
    fn here() -> Arc<Deadlines> {
        HERE.with(Arc::clone)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot a wait of `limit` starting now ends in; starts this thread's task if it is
    /// not running.
    fn slot_for(self: &Arc<Self>, limit: Duration) -> Arc<Slot> {
        let end = Instant::now().saturating_duration_since(self.epoch) + limit;
        let key = u64::try_from(end.as_nanos().div_ceil(SLOT.as_nanos())).unwrap_or(u64::MAX);
        let mut state = self.state();
        let soonest = state.slots.keys().next().copied();
        let slot = Arc::clone(state.slots.entry(key).or_default());
        if !state.running {
            state.running = true;
            drop(state);
            tokio::spawn(Arc::clone(self).run());
        } else if soonest.is_some_and(|s| key < s) {
            self.sooner.notify_one();
        }
        slot
    }

    /// Ends each slot when its time comes, until none is left.
    async fn run(self: Arc<Self>) {
        // The runtime may drop this task (shutting down): the next wait starts another.
        struct Dropped<'a>(&'a Deadlines, bool);
        impl Drop for Dropped<'_> {
            fn drop(&mut self) {
                if self.1 {
                    self.0.state().running = false;
                }
            }
        }
        let mut dropped = Dropped(&self, true);
        loop {
            // Stops under the same lock that finds no slot left, so a wait started meanwhile
            // (on a multi-threaded runtime this task may run beside it) either is found here or
            // finds the task stopped and starts another.
            let next = {
                let mut state = self.state();
                let Some(next) = state.slots.keys().next().copied() else {
                    state.running = false;
                    dropped.1 = false;
                    return;
                };
                next
            };
            let at = self.epoch + SLOT.saturating_mul(u32::try_from(next).unwrap_or(u32::MAX));
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = self.sooner.notified() => continue,
            }
            let now = Instant::now().saturating_duration_since(self.epoch);
            let due = u64::try_from(now.as_nanos() / SLOT.as_nanos()).unwrap_or(u64::MAX);
            let ended = {
                let mut state = self.state();
                let later = state.slots.split_off(&(due.saturating_add(1)));
                std::mem::replace(&mut state.slots, later)
            };
            for slot in ended.into_values() {
                slot.passed.store(true, Ordering::Release);
                slot.notify.notify_waiters();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_wait_ends_at_its_limit_rounded_up_to_a_slot() {
        let started = Instant::now();
        let r = within(Duration::from_secs(10), std::future::pending::<()>()).await;
        assert_eq!(r, Err(Elapsed));
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(10) && took <= Duration::from_secs(10) + SLOT, "{took:?}");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_wait_that_finishes_in_time_gives_its_output() {
        let r = within(Duration::from_secs(10), async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            7
        })
        .await;
        assert_eq!(r, Ok(7));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_shorter_wait_after_a_longer_one_still_ends_on_time() {
        let long = tokio::spawn(within(Duration::from_secs(60), std::future::pending::<()>()));
        tokio::task::yield_now().await;
        let started = Instant::now();
        let short = within(Duration::from_secs(2), std::future::pending::<()>()).await;
        let took = started.elapsed();
        assert_eq!(short, Err(Elapsed));
        assert!(took <= Duration::from_secs(2) + SLOT, "the short wait took {took:?}");
        assert!(!long.is_finished(), "the long wait is still running");
        long.abort();
    }

    /// On a multi-threaded runtime the task that ends the slots may run beside the waits that
    /// add them, and stop and start again between rounds: every wait still ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waits_on_a_multi_threaded_runtime_all_end() {
        for _ in 0..3 {
            let waits: Vec<_> = (0..20)
                .map(|_| tokio::spawn(within(Duration::from_millis(10), std::future::pending::<()>())))
                .collect();
            for w in waits {
                let ended = tokio::time::timeout(Duration::from_secs(10), w).await;
                assert_eq!(ended.expect("a wait never ended").unwrap(), Err(Elapsed));
            }
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn waits_started_together_share_a_slot_and_all_end() {
        let waits: Vec<_> = (0..50)
            .map(|_| tokio::spawn(within(Duration::from_secs(5), std::future::pending::<()>())))
            .collect();
        for w in waits {
            assert_eq!(w.await.unwrap(), Err(Elapsed));
        }
        assert!(Deadlines::here().state().slots.is_empty(), "every slot ended");
    }
}
