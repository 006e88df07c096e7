//! One scratch buffer per thread, for the synchronous reads of the relay, the frame reader and
//! the UDP batches.

thread_local! {
    /// This thread's scratch buffer, for the synchronous reads of the relay, the frame reader
    /// and the UDP batches: borrowed only inside one synchronous step (never across an
    /// `.await`), so tasks sharing a thread never see each other's bytes. It only grows, to the
    /// largest length asked for on this thread, and is allocated zeroed rather than filled, so
    /// its pages become resident only as reads touch them.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with `len` bytes of this thread's scratch buffer (what they hold is unspecified).
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|b| match b.try_borrow_mut() {
        Ok(mut b) => {
            if b.len() < len {
                // What it held does not matter: a fresh zeroed allocation, not a fill.
                *b = vec![0u8; len];
            }
            f(b.get_mut(..len).unwrap_or_default())
        }
        // Not reachable (no step runs inside another), but never worth a panic.
        Err(_) => f(&mut vec![0u8; len]),
    })
}
