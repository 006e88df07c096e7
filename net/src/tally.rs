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
}
