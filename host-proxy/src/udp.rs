//! UDP forwarding on the host: each desktop client address is a flow with a data stream of
//! its own, so the guest sees one socket per flow and its replies reach exactly that client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hostnet_net::relay::mmsg::{self, MMSG_BATCH};
use hostnet_net::relay::socket::UdpSocket;
use hostnet_net::relay::udp::{Activity, DatagramBatch};
use hostnet_net::tally::Tally;
use hostnet_net::transport::handshake::{self, OpenError};
use hostnet_protocol::{Open, Proto};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::limits::{FLOW_QUEUE_BYTES, FLOW_QUEUE_LEN, UDP_IDLE_TIMEOUT, UDP_QUEUED_BYTES};
use crate::serving::{ForwardStats, Serving};

/// How often finished flows are swept from a port's table.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The receive loop's handle on a flow.
struct FlowHandle {
    tx: mpsc::Sender<Bytes>,
    queue: Arc<QueueStats>,
}

/// Bytes queued in every desktop→guest flow of this process together (see
/// [`UDP_QUEUED_BYTES`]).
static QUEUED: AtomicUsize = AtomicUsize::new(0);
/// Datagrams dropped because a flow's queue, or all of them together, were full.
static QUEUE_DROPS: Tally = Tally::new();

/// How many datagrams this process dropped because a flow's queue was full
/// ([`FLOW_QUEUE_LEN`] datagrams or [`FLOW_QUEUE_BYTES`]) or all flows' queues together held
/// [`UDP_QUEUED_BYTES`]: for `status`.
pub fn datagrams_dropped() -> u64 {
    QUEUE_DROPS.get()
}

/// Shared between the receive loop and one flow: what its queue holds, counted in the flow's
/// bound and the process's. What is still counted when both ends are gone is given back.
#[derive(Debug, Default)]
struct QueueStats {
    bytes: AtomicUsize,
    dropped: Tally,
}

impl QueueStats {
    /// Counts `n` more bytes queued, if the flow's bound and the process's allow them.
    fn charge(&self, n: usize) -> bool {
        let within = |limit: usize| move |held: usize| (held + n <= limit).then_some(held + n);
        if QUEUED.fetch_update(Ordering::Relaxed, Ordering::Relaxed, within(UDP_QUEUED_BYTES)).is_err() {
            return false;
        }
        if self.bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, within(FLOW_QUEUE_BYTES)).is_err() {
            QUEUED.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// `n` bytes left the queue (or never entered it).
    fn release(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
        QUEUED.fetch_sub(n, Ordering::Relaxed);
    }

    /// Queues `payload` on `tx` within the bounds; `false` when it did not fit, counted in
    /// [`datagrams_dropped`].
    fn offer(&self, tx: &mpsc::Sender<Bytes>, payload: &[u8]) -> bool {
        let n = payload.len();
        if self.charge(n) {
            if tx.try_send(Bytes::copy_from_slice(payload)).is_ok() {
                return true;
            }
            self.release(n);
        }
        QUEUE_DROPS.one_more();
        false
    }
}

impl Drop for QueueStats {
    fn drop(&mut self) {
        QUEUED.fetch_sub(*self.bytes.get_mut(), Ordering::Relaxed);
    }
}

/// Serves one bound host UDP socket until `stop`.
pub(crate) async fn serve(
    serving: Serving,
    socket: UdpSocket,
    port: u16,
    stop: CancellationToken,
    stats: Arc<ForwardStats>,
) {
    let socket = Arc::new(socket);
    let client_v6 = socket.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
    let mut port_flows =
        PortFlows { serving, socket: socket.clone(), port, client_v6, stats, flows: HashMap::new() };
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = sweep.tick() => {
                port_flows.flows.retain(|_, f| !f.tx.is_closed());
                continue;
            }
            r = socket.readable() => if let Err(e) = r {
                warn!(port, "udp socket failed: {e}");
                return;
            },
        }
        // One batch per turn: between batches the loop sees `stop` and the sweep, and every
        // datagram of a batch goes to its own flow's queue, so a busy client fills only its own.
        match mmsg::try_recv_batch(&socket, MMSG_BATCH, |d, peer| {
            if let Some(peer) = peer {
                port_flows.dispatch(d, peer);
            }
        }) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // ICMP errors from earlier sends surface here; they concern one client only.
            Err(e) => debug!(port, "udp receive: {e}"),
        }
    }
}

/// One bound port's flows, as its receive loop sees them.
struct PortFlows {
    serving: Serving,
    socket: Arc<UdpSocket>,
    port: u16,
    client_v6: bool,
    stats: Arc<ForwardStats>,
    flows: HashMap<SocketAddr, FlowHandle>,
}

impl PortFlows {
    /// Queues a datagram from `peer` on its flow, opening the flow if it is new.
    fn dispatch(&mut self, payload: &[u8], peer: SocketAddr) {
        let port = self.port;
        if let Some(flow) = self.flows.get(&peer).filter(|f| !f.tx.is_closed()) {
            if !flow.queue.offer(&flow.tx, payload) {
                // Queue full: UDP may drop, but never silently.
                if let Some(dropped) = flow.queue.dropped.one_more() {
                    warn!(
                        port, %peer, dropped,
                        "udp flow queue full ({FLOW_QUEUE_LEN} datagrams or {FLOW_QUEUE_BYTES} bytes; \
                         {UDP_QUEUED_BYTES} bytes in all flows): dropping"
                    );
                }
            }
            return;
        }
        let Ok(permit) = self.serving.udp_flows.clone().try_acquire_owned() else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(refused) = self.serving.count_refused() {
                let limit = self.serving.limits.udp_flows;
                warn!(port, %peer, "{limit} UDP flows open, the limit: dropping datagrams from new clients ({refused} refused so far)");
            }
            return;
        };
        let (tx, rx) = mpsc::channel(FLOW_QUEUE_LEN);
        let queue = Arc::new(QueueStats::default());
        // Counted if it does not fit (the process-wide bound may be reached).
        queue.offer(&tx, payload);
        self.flows.insert(peer, FlowHandle { tx, queue: queue.clone() });
        let flow = Flow {
            serving: self.serving.clone(),
            socket: self.socket.clone(),
            peer,
            port,
            client_v6: self.client_v6,
            queue,
            stats: self.stats.clone(),
            token: self.serving.connection_token(),
        };
        self.serving.tracker.spawn(flow.run(rx, permit).instrument(info_span!("udp", port, %peer)));
    }
}

/// One desktop client's flow: datagrams from the queue go to the guest on its data stream,
/// datagrams from the stream go back to the client from the port's socket.
struct Flow {
    serving: Serving,
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    port: u16,
    client_v6: bool,
    queue: Arc<QueueStats>,
    stats: Arc<ForwardStats>,
    /// Closes the flow when host networking is switched off.
    token: CancellationToken,
}

impl Flow {
    async fn run(self, mut rx: mpsc::Receiver<Bytes>, _permit: OwnedSemaphorePermit) {
        let _active = self.stats.open();
        let Some(target) = self.serving.target_for(Proto::Udp, self.port, self.client_v6) else {
            debug!("no guest socket any more");
            return;
        };
        let open = Open::Udp { addr: target, port: self.port, peer: Some(self.peer) };
        let (stream, mut reader) = match handshake::open_stream(&*self.serving.connector, &open).await {
            Ok(opened) => opened,
            Err(e @ OpenError::Refused(_)) => return debug!("agent {e}"),
            Err(e) => return warn!("cannot open a flow to the agent: {e}"),
        };
        // The two directions run side by side: a blocked write one way must never stop the
        // other way from draining, or both ends could wait on each other's writes.
        let activity = Activity::new();
        let (to_guest, from_guest) = (AtomicU64::new(0), AtomicU64::new(0));
        let up = async {
            let mut batch = DatagramBatch::default();
            while let Some(d) = rx.recv().await {
                let mut taken = d.len();
                batch.push(&d);
                while !batch.is_full() {
                    let Ok(d) = rx.try_recv() else { break };
                    taken += d.len();
                    batch.push(&d);
                }
                self.queue.release(taken);
                self.stats.bytes.to_peer.fetch_add(taken as u64, Ordering::Relaxed);
                to_guest.fetch_add(batch.len() as u64, Ordering::Relaxed);
                activity.touch();
                if batch.flush(&stream).await.is_err() {
                    return "agent stream closed";
                }
            }
            "port closed"
        };
        let down = async {
            let mut burst = Vec::with_capacity(MMSG_BATCH);
            loop {
                // The whole burst already read goes to the client in one system call.
                match reader.read_burst(&stream, &mut burst, MMSG_BATCH).await {
                    Ok(true) => {}
                    Ok(false) => return "agent closed the flow",
                    Err(e) => {
                        debug!("flow stream failed: {e}");
                        return "agent stream failed";
                    }
                }
                // A full socket buffer on the desktop side drops, as UDP does; so does any
                // other refusal, one datagram at a time.
                let _ = mmsg::send_batch(&self.socket, &burst, Some(self.peer), |_| true).await;
                let bytes: usize = burst.iter().map(|d| d.len()).sum();
                from_guest.fetch_add(burst.len() as u64, Ordering::Relaxed);
                self.stats.bytes.from_peer.fetch_add(bytes as u64, Ordering::Relaxed);
                activity.touch();
                burst.clear();
            }
        };
        let end = tokio::select! {
            _ = self.token.cancelled() => "closed (shutdown or host networking off)",
            _ = activity.idle_for(UDP_IDLE_TIMEOUT) => "idle",
            end = up => end,
            end = down => end,
        };
        let (to_guest, from_guest) = (to_guest.into_inner(), from_guest.into_inner());
        let dropped = self.queue.dropped.get();
        if dropped > 0 {
            warn!(
                to_guest,
                from_guest,
                dropped,
                "udp flow ended ({end}); {dropped} datagram(s) dropped because the flow's queue was full"
            );
        } else {
            debug!(to_guest, from_guest, "udp flow ended ({end})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test that queues: the process-wide count is not shared with another test.
    #[test]
    fn queues_are_bounded_per_flow_and_all_together_and_give_back_what_they_held() {
        let before = QUEUED.load(Ordering::Relaxed);
        let datagram = vec![0u8; 64 * 1024];
        let fill = |q: &QueueStats, tx: &mpsc::Sender<Bytes>| {
            let mut queued = 0;
            while q.offer(tx, &datagram) {
                queued += 1;
            }
            queued
        };
        let flows: Vec<_> = (0..UDP_QUEUED_BYTES / FLOW_QUEUE_BYTES)
            .map(|_| {
                let (tx, rx) = mpsc::channel(FLOW_QUEUE_LEN);
                let q = QueueStats::default();
                assert_eq!(fill(&q, &tx), FLOW_QUEUE_BYTES / datagram.len(), "one flow's bytes bound");
                (q, tx, rx)
            })
            .collect();
        assert_eq!(QUEUED.load(Ordering::Relaxed), before + UDP_QUEUED_BYTES);
        // One more flow: nothing fits, all flows together are at the bound.
        let (tx, _rx) = mpsc::channel(FLOW_QUEUE_LEN);
        let late = QueueStats::default();
        assert!(!late.offer(&tx, b"x"), "the process-wide bound");

        // A flow takes from its queue: room again, for anyone.
        let (q, _, mut rx) = flows.into_iter().next().unwrap();
        let taken = rx.try_recv().unwrap().len();
        q.release(taken);
        assert!(late.offer(&tx, b"x"));
        // Flows that end with datagrams still queued give their bytes back.
        drop((q, rx, late));
        assert_eq!(QUEUED.load(Ordering::Relaxed), before, "every byte given back");
    }
}
