//! The accept loop every listener of hostnet runs: the next connection, or nothing once the
//! listener's stop fires — and, when an accept fails (out of file descriptors, say), a log line
//! and a short pause instead of a loop spinning on the error.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How long to wait after a failed accept before trying again.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The next item `accept` yields, or `None` once `stop` fires (also while pausing after an
/// error). A failed accept is logged as "accepting {what} failed" and tried again after
/// [`ACCEPT_ERROR_PAUSE`]; an error that comes with the stop (a listener shut down) ends it.
pub async fn next_accepted<T, F, Fut>(mut accept: F, stop: &CancellationToken, what: &str) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return None,
            a = accept() => a,
        };
        match accepted {
            Ok(item) => return Some(item),
            Err(_) if stop.is_cancelled() => return None,
            Err(e) => {
                warn!("accepting {what} failed: {e}");
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn errors_pause_and_retry_and_the_stop_ends_it() {
        let stop = CancellationToken::new();
        let mut calls = 0;
        let got = next_accepted(
            || {
                calls += 1;
                let n = calls;
                async move { if n < 3 { Err(io::Error::other("EMFILE")) } else { Ok(n) } }
            },
            &stop,
            "a test connection",
        )
        .await;
        assert_eq!(got, Some(3), "two failures, then the item");
        stop.cancel();
        let never = next_accepted(std::future::pending::<io::Result<()>>, &stop, "nothing").await;
        assert_eq!(never, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_accept_waits_the_pause_before_trying_again() {
        let stop = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let mut first = true;
        let got = next_accepted(
            || {
                let fail = std::mem::replace(&mut first, false);
                async move { if fail { Err(io::Error::other("ENFILE")) } else { Ok(()) } }
            },
            &stop,
            "a test connection",
        )
        .await;
        assert_eq!(got, Some(()));
        assert!(started.elapsed() >= ACCEPT_ERROR_PAUSE, "{:?}", started.elapsed());
    }
}
