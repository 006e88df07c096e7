//! Counting what happens in storms — connections refused over a limit, datagrams dropped,
//! streams that could not open — so that `status` shows every one and the log only a few.

use std::sync::atomic::{AtomicU64, Ordering};

/// A count that says when to log: at the 1st, 2nd, 4th, 8th… event, so a storm of refusals
/// costs the log a line per doubling, while the count itself (for `status`) stays exact.
#[derive(Debug, Default)]
pub struct Tally(AtomicU64);

impl Tally {
    /// Zero, for a `static`.
    pub const fn new() -> Self {
        Tally(AtomicU64::new(0))
    }

    /// Counts one more. `Some(total)` when this one should be logged (the total is a power of
    /// two), `None` otherwise.
    pub fn one_more(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        n.is_power_of_two().then_some(n)
    }

    /// Counts `n` more at once (a batch of datagrams dropped together). `Some(total)` when the
    /// count passed a power of two, as [`Self::one_more`] would have said for one of them.
    pub fn more(&self, n: u64) -> Option<u64> {
        if n == 0 {
            return None;
        }
        let before = self.0.fetch_add(n, Ordering::Relaxed);
        let total = before.saturating_add(n);
        let highest_power = 1u64 << (63 - total.leading_zeros());
        (highest_power > before).then_some(total)
    }

    /// How many so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_at_each_doubling_and_counts_every_one() {
        let t = Tally::default();
        let logged: Vec<u64> = (0..100).filter_map(|_| t.one_more()).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(t.get(), 100);
    }

    #[test]
    fn a_batch_logs_when_it_passes_a_doubling() {
        let t = Tally::default();
        assert_eq!(t.more(0), None);
        assert_eq!(t.more(3), Some(3), "passed 1 and 2");
        assert_eq!(t.more(1), Some(4), "reached 4");
        assert_eq!(t.more(3), None, "5..=7");
        assert_eq!(t.more(10), Some(17), "passed 8 and 16");
        assert_eq!(t.one_more(), None);
        assert_eq!(t.get(), 18);
    }
}
