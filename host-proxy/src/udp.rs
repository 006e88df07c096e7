//! UDP forwarding on the host: each desktop client address is a flow with a data stream of
//! its own, so the guest sees one socket per flow and its replies reach exactly that client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hostnet_net::relay::mmsg::{self, MMSG_BATCH};
use hostnet_net::relay::udp::{Activity, DatagramBatch};
use hostnet_net::tally::Tally;
use hostnet_net::transport::handshake::{self, OpenError};
use hostnet_protocol::{Open, Proto};
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::forward::{ForwardStats, Forwards};
use crate::limits::{FLOW_QUEUE_BYTES, FLOW_QUEUE_LEN, UDP_IDLE_TIMEOUT};

/// How often finished flows are swept from a port's table.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The receive loop's handle on a flow.
struct FlowHandle {
    tx: mpsc::Sender<Bytes>,
    queue: Arc<QueueStats>,
}

/// Shared between the receive loop and one flow.
#[derive(Debug, Default)]
struct QueueStats {
    bytes: AtomicUsize,
    dropped: Tally,
}

/// Serves one bound host UDP socket until `stop`.
pub(crate) async fn serve(
    forwards: Forwards,
    socket: UdpSocket,
    port: u16,
    stop: CancellationToken,
    stats: Arc<ForwardStats>,
) {
    let socket = Arc::new(socket);
    let client_v6 = socket.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
    let mut port_flows =
        PortFlows { forwards, socket: socket.clone(), port, client_v6, stats, flows: HashMap::new() };
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
    forwards: Forwards,
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
        let n = payload.len();
        if let Some(flow) = self.flows.get(&peer).filter(|f| !f.tx.is_closed()) {
            let queued = flow.queue.bytes.load(Ordering::Relaxed);
            if queued + n <= FLOW_QUEUE_BYTES && flow.tx.try_send(Bytes::copy_from_slice(payload)).is_ok() {
                flow.queue.bytes.fetch_add(n, Ordering::Relaxed);
            } else {
                // Queue full: UDP may drop, but never silently.
                if let Some(dropped) = flow.queue.dropped.one_more() {
                    warn!(port, %peer, dropped, "udp flow queue full ({FLOW_QUEUE_LEN} datagrams or {FLOW_QUEUE_BYTES} bytes): dropping");
                }
            }
            return;
        }
        let Ok(permit) = self.forwards.udp_flows.clone().try_acquire_owned() else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(refused) = self.forwards.count_refused() {
                let limit = self.forwards.limits.udp_flows;
                warn!(port, %peer, "{limit} UDP flows open, the limit: dropping datagrams from new clients ({refused} refused so far)");
            }
            return;
        };
        let (tx, rx) = mpsc::channel(FLOW_QUEUE_LEN);
        let queue = Arc::new(QueueStats::default());
        if tx.try_send(Bytes::copy_from_slice(payload)).is_ok() {
            queue.bytes.fetch_add(n, Ordering::Relaxed);
        }
        self.flows.insert(peer, FlowHandle { tx, queue: queue.clone() });
        let flow = Flow {
            forwards: self.forwards.clone(),
            socket: self.socket.clone(),
            peer,
            port,
            client_v6: self.client_v6,
            queue,
            stats: self.stats.clone(),
            token: self.forwards.connection_token(),
        };
        self.forwards.tracker.spawn(flow.run(rx, permit).instrument(info_span!("udp", port, %peer)));
    }
}

/// One desktop client's flow: datagrams from the queue go to the guest on its data stream,
/// datagrams from the stream go back to the client from the port's socket.
struct Flow {
    forwards: Forwards,
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
        let Some(target) = self.forwards.target_for(Proto::Udp, self.port, self.client_v6) else {
            debug!("no guest socket any more");
            return;
        };
        let open = Open::Udp { addr: target, port: self.port, peer: Some(self.peer) };
        let (stream, mut reader) = match handshake::open_stream(&*self.forwards.connector, &open).await {
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
                self.queue.bytes.fetch_sub(taken, Ordering::Relaxed);
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
