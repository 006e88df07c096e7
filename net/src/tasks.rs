//! The end of a side's `run`: every task it started belongs to one `TaskTracker`, and `run`
//! returns after they drained.

use std::time::Duration;

use tokio_util::task::TaskTracker;
use tracing::warn;

/// How long a side's shutdown waits for its tasks (connections finishing, the watcher thread's
/// last wait) once the shutdown token fired.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Closes `tracker` and waits for its tasks, at most [`DRAIN_TIMEOUT`]. Returns how many were
/// still running then, and says so in the log: they all watch the same shutdown token and end at
/// their next step, but `run` does not wait longer for them.
pub async fn drain(tracker: &TaskTracker, side: &str) -> usize {
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait()).await.is_ok() {
        return 0;
    }
    let left = tracker.len();
    warn!("{side}: {left} task(s) still running {DRAIN_TIMEOUT:?} after shutdown; not waiting for them");
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_tasks_and_for_threads_holding_a_token_but_not_forever() {
        let tracker = TaskTracker::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tracker.spawn(async move {
            let _ = rx.await;
        });
        let token = tracker.token();
        let thread = std::thread::spawn(move || drop(token));
        thread.join().unwrap();
        // One task never finishes on its own: the drain gives up after the bound, and counts it.
        assert_eq!(drain(&tracker, "test").await, 1);
        drop(tx);
        tracker.wait().await;
        assert_eq!(drain(&tracker, "test").await, 0);
    }
}
