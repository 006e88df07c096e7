//! Pieces of the UDP relay both sides share: socket sizing and batching datagrams onto a
//! data stream.

use hostnet_protocol::datagram::datagram_header;

use crate::stream::{self, RawStream};

/// Socket receive buffer asked for on relay sockets: a burst of small datagrams must fit while
/// the relay task is busy. The kernel caps it at `net.core.rmem_max`.
pub const UDP_SOCKET_BUFFER: usize = 4 << 20;

/// Bytes of datagrams gathered into one write to the stream.
pub const BATCH_BYTES: usize = 256 * 1024;

/// Datagrams gathered for one write to a data stream: a burst costs one system call, not one
/// per datagram.
#[derive(Debug, Default)]
pub struct DatagramBatch {
    out: Vec<u8>,
    count: usize,
}

impl DatagramBatch {
    /// Appends one datagram. Payloads the framing cannot carry are refused (`false`).
    pub fn push(&mut self, payload: &[u8]) -> bool {
        let Some(header) = datagram_header(payload.len()) else {
            return false;
        };
        self.out.extend_from_slice(&header);
        self.out.extend_from_slice(payload);
        self.count += 1;
        true
    }

    /// Whether another datagram should wait for the next batch.
    pub fn is_full(&self) -> bool {
        self.out.len() >= BATCH_BYTES
    }

    /// Datagrams in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Writes the batch to `s` and empties it.
    pub async fn flush<S: RawStream>(&mut self, s: &S) -> std::io::Result<()> {
        let r = stream::write_all(s, &self.out).await;
        self.out.clear();
        self.count = 0;
        r
    }
}

/// When a flow last moved a datagram, shared by its two directions.
#[derive(Debug)]
pub struct Activity {
    start: tokio::time::Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    pub fn new() -> Self {
        Activity { start: tokio::time::Instant::now(), last_ms: std::sync::atomic::AtomicU64::new(0) }
    }

    /// Records a datagram now.
    pub fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Resolves once no datagram has moved for `limit`.
    pub async fn idle_for(&self, limit: std::time::Duration) {
        loop {
            let last = self.start
                + std::time::Duration::from_millis(self.last_ms.load(std::sync::atomic::Ordering::Relaxed));
            let deadline = last + limit;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}
