//! Polling a future only when something woke it.
//!
//! A relayed connection is one task: its two directions (`tokio::join!`) and its shutdown
//! signal (`tokio::select!`) are polled together whenever any of them is woken. On an
//! interactive connection only one of them has anything to do per wake-up, yet each poll of
//! the others walked their whole stack down to the reactor or a cancellation token (whose every
//! poll takes two locks) and back: about a third of the relay's user-space instructions per
//! message, and each message's latency pays for them (`docs/performance.md`, round eight).
//! [`OnWake`] hands its future a waker of its own and polls it again only once that waker was
//! used — or when the task's waker changed (a connection moved to another relay thread is
//! polled by a new task there), or when its relay thread asks for every part of the task to be
//! polled (`crate::threads::polling_all`: the poll after its streams joined that thread's
//! reactor, which one direction does in its own poll, maybe after the other had waited again
//! on the old reactor). Every wait is then made again where the connection now is.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

pin_project_lite::pin_project! {
    /// `inner`, polled only when its own waker was woken since the last poll, on the first
    /// poll, whenever the task's waker is not the one it saw last, and when the relay thread
    /// asks for all (`crate::threads::polling_all`).
    #[derive(Debug)]
    pub struct OnWake<F> {
        #[pin]
        inner: F,
        flag: Arc<Flag>,
        waker: Waker,
    }
}

/// What the inner future's waker sets, and the task to wake with it.
#[derive(Debug)]
struct Flag {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(task) = &*self.task.lock().unwrap_or_else(PoisonError::into_inner) {
            task.wake_by_ref();
        }
    }
}

impl<F: Future> OnWake<F> {
    pub fn new(inner: F) -> Self {
        let flag = Arc::new(Flag { woken: AtomicBool::new(true), task: Mutex::new(None) });
        OnWake { inner, waker: Waker::from(flag.clone()), flag }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let moved = {
            let mut task = this.flag.task.lock().unwrap_or_else(PoisonError::into_inner);
            let same = task.as_ref().is_some_and(|t| t.will_wake(cx.waker()));
            if !same {
                *task = Some(cx.waker().clone());
            }
            !same
        };
        // Taken before polling: a wake during the poll sets it again, and the task is woken.
        let woken = this.flag.woken.swap(false, Ordering::AcqRel);
        if !(woken || moved || crate::threads::polling_all()) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `open` is set, else stores the waker it was given.
    struct Probe {
        polls: Arc<AtomicUsize>,
        open: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.open.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// A task waker that counts its wakes.
    struct Counter(AtomicUsize);
    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn polls_the_inner_future_only_when_woken_or_when_the_task_changes() {
        let (polls, open, stored) = Default::default();
        let probe = Probe { polls: Arc::clone(&polls), open: Arc::clone(&open), waker: Arc::clone(&stored) };
        let mut f = Box::pin(OnWake::new(probe));
        let task = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        let polls_now = || polls.load(Ordering::SeqCst);

        // The first poll reaches the inner future; later ones without a wake do not.
        assert!(f.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls_now(), 1);
        for _ in 0..3 {
            assert!(f.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls_now(), 1, "polled again without a wake");

        // Its waker wakes the task, and the next poll reaches it.
        stored.lock().unwrap().take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was not woken");
        assert!(f.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls_now(), 2);

        // Polled from another task (the connection moved): reached without a wake, so it can
        // wait anew there.
        let other = Waker::from(Arc::new(Counter(AtomicUsize::new(0))));
        assert!(f.as_mut().poll(&mut Context::from_waker(&other)).is_pending());
        assert_eq!(polls_now(), 3);

        // Ready comes through once woken.
        open.store(true, Ordering::SeqCst);
        assert!(f.as_mut().poll(&mut Context::from_waker(&other)).is_pending(), "ready without a wake");
        stored.lock().unwrap().take().unwrap().wake_by_ref();
        assert!(f.as_mut().poll(&mut Context::from_waker(&other)).is_ready());
    }
}
