//! UDP forwarding on the host: each desktop client address is a flow with a data stream of
//! its own, so the guest sees one socket per flow and its replies reach exactly that client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use hostnet_net::relay::mmsg::{self, MMSG_BATCH};
use hostnet_net::relay::socket::UdpSocket;
use hostnet_net::relay::udp::{Activity, BATCH_BYTES, DatagramBatch};
use hostnet_net::tally::Tally;
use hostnet_net::transport::handshake::{self, OpenError};
use hostnet_net::transport::raw::{self, RawStream};
use hostnet_net::transport::stream::TransportStream;
use hostnet_protocol::{Open, Proto};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::limits::{FLOW_QUEUE_BYTES, FLOW_QUEUE_LEN, UDP_IDLE_TIMEOUT, UDP_QUEUED_BYTES};
use crate::serving::{ForwardStats, Serving};

/// How often finished flows are swept from a port's table.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Framed datagrams of one client on their way to the guest: what one receive took from it.
struct Chunk {
    frames: Bytes,
    datagrams: u64,
    /// The datagrams' own bytes (the frames' headers left out), for the byte counters.
    payload: u64,
}

/// The receive loop's handle on a flow.
struct FlowHandle {
    tx: mpsc::Sender<Chunk>,
    shared: Arc<FlowShared>,
}

/// Bytes queued in every desktop→guest flow of this process together (see
/// [`UDP_QUEUED_BYTES`]).
static QUEUED: AtomicUsize = AtomicUsize::new(0);
/// Datagrams dropped because a flow's queue, or all of them together, were full.
static QUEUE_DROPS: Tally = Tally::new();

/// How many datagrams this process dropped because a flow's queue was full
/// ([`FLOW_QUEUE_LEN`] batches or [`FLOW_QUEUE_BYTES`]) or all flows' queues together held
/// [`UDP_QUEUED_BYTES`]: for `status`.
pub fn datagrams_dropped() -> u64 {
    QUEUE_DROPS.get()
}

/// What the receive loop and one flow share. While nothing of the flow is queued, the receive
/// loop writes a client's datagrams to the flow's stream itself — one system call, no hand-over
/// to the flow's task and no wake-up of it; only what the stream does not take at once is
/// queued, and then everything behind it too, so the stream carries the datagrams in order.
#[derive(Debug, Default)]
struct FlowShared {
    /// Bytes queued for the flow's task or being written by it, counted in the flow's bound
    /// and the process's; given back once written. Zero: the stream is the receive loop's.
    bytes: AtomicUsize,
    dropped: Tally,
    /// The flow's data stream while the flow runs.
    stream: Mutex<Option<Arc<TransportStream>>>,
    to_guest: AtomicU64,
    activity: Activity,
}

impl FlowShared {
    /// Counts `n` more bytes queued, if the flow's bound and the process's allow them.
    fn charge(&self, n: usize) -> bool {
        let within = |limit: usize| move |held: usize| (held + n <= limit).then_some(held + n);
        if QUEUED.fetch_update(Ordering::Relaxed, Ordering::Relaxed, within(UDP_QUEUED_BYTES)).is_err() {
            return false;
        }
        if self.bytes.fetch_update(Ordering::AcqRel, Ordering::Acquire, within(FLOW_QUEUE_BYTES)).is_err() {
            QUEUED.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// `n` bytes were written to the stream (or never entered the queue).
    fn release(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
        QUEUED.fetch_sub(n, Ordering::Relaxed);
    }

    /// Counts datagrams that reached the stream.
    fn moved(&self, datagrams: u64, payload: u64, stats: &ForwardStats) {
        self.to_guest.fetch_add(datagrams, Ordering::Relaxed);
        stats.bytes.to_peer.fetch_add(payload, Ordering::Relaxed);
        self.activity.touch();
    }

    /// Counts `n` datagrams dropped, in the flow's count and the process's; the flow's total
    /// when the log should say so (see [`Tally`]).
    fn count_dropped(&self, n: u64) -> Option<u64> {
        QUEUE_DROPS.more(n);
        self.dropped.more(n)
    }

    fn set_stream(&self, stream: Option<Arc<TransportStream>>) {
        *self.stream.lock().unwrap_or_else(PoisonError::into_inner) = stream;
    }

    /// Writes what the stream takes without waiting, if nothing is queued before it: the bytes
    /// written (0 when the stream is not open yet, full, or failed — a failed stream ends the
    /// flow's task, which closes the flow).
    fn write_now(&self, frames: &[u8]) -> usize {
        if self.bytes.load(Ordering::Acquire) != 0 {
            return 0;
        }
        let stream = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        stream.as_ref().and_then(|s| s.try_write(frames).ok()).unwrap_or(0)
    }
}

impl Drop for FlowShared {
    fn drop(&mut self) {
        QUEUED.fetch_sub(*self.bytes.get_mut(), Ordering::Relaxed);
    }
}

impl FlowHandle {
    /// Sends one client's datagrams (framed) towards the guest: written to the stream at once
    /// when nothing waits before them, queued for the flow's task within the bounds otherwise.
    /// The datagrams dropped (queue full, or the flow gone).
    fn send(&self, frames: &[u8], datagrams: u64, payload: u64, stats: &ForwardStats) -> u64 {
        let shared = &self.shared;
        let written = shared.write_now(frames);
        if written == frames.len() {
            shared.moved(datagrams, payload, stats);
            return 0;
        }
        let rest = frames.get(written..).unwrap_or_default();
        // A batch the stream took in part must follow whole, or the stream's framing breaks:
        // it is queued past the flow's bound if need be (by at most one receive's datagrams,
        // and only when nothing else was queued).
        if written > 0 {
            shared.bytes.fetch_add(rest.len(), Ordering::AcqRel);
            QUEUED.fetch_add(rest.len(), Ordering::Relaxed);
        } else if !shared.charge(rest.len()) {
            return datagrams;
        }
        let chunk = Chunk { frames: Bytes::copy_from_slice(rest), datagrams, payload };
        if self.tx.try_send(chunk).is_err() {
            shared.release(rest.len());
            return datagrams;
        }
        0
    }
}

/// What one receive took off a port's socket, framed, in runs of datagrams from one client.
#[derive(Debug, Default)]
struct Turn {
    frames: DatagramBatch,
    runs: Vec<Run>,
}

/// Datagrams from one client, one after another in a [`Turn`].
#[derive(Debug)]
struct Run {
    peer: SocketAddr,
    start: usize,
    datagrams: u64,
    payload: u64,
}

impl Turn {
    fn push(&mut self, payload: &[u8], peer: SocketAddr) {
        let start = self.frames.bytes().len();
        // A payload the framing cannot carry (one byte over the largest) is not relayed.
        if !self.frames.push(payload) {
            return;
        }
        match self.runs.last_mut() {
            Some(run) if run.peer == peer => {
                run.datagrams += 1;
                run.payload += payload.len() as u64;
            }
            _ => self.runs.push(Run { peer, start, datagrams: 1, payload: payload.len() as u64 }),
        }
    }

    /// Each run with its frames, in order.
    fn runs(&self) -> impl Iterator<Item = (&Run, &[u8])> {
        let frames = self.frames.bytes();
        self.runs.iter().enumerate().map(move |(i, run)| {
            let end = self.runs.get(i + 1).map_or(frames.len(), |next| next.start);
            (run, frames.get(run.start..end).unwrap_or_default())
        })
    }

    fn clear(&mut self) {
        // A burst of large datagrams does not keep its megabytes for the port's life.
        self.frames.clear(BATCH_BYTES);
        self.runs.clear();
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
    let mut turn = Turn::default();
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
        // client's datagrams of a batch go to its own flow, so a busy client fills only its own
        // queue.
        match mmsg::try_recv_batch(&socket, MMSG_BATCH, |d, peer| {
            if let Some(peer) = peer {
                turn.push(d, peer);
            }
        }) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // ICMP errors from earlier sends surface here; they concern one client only.
            Err(e) => debug!(port, "udp receive: {e}"),
        }
        for (run, frames) in turn.runs() {
            port_flows.dispatch(run, frames);
        }
        turn.clear();
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
    /// Sends a run of datagrams from one client on its flow, opening the flow if it is new.
    fn dispatch(&mut self, run: &Run, frames: &[u8]) {
        let (port, peer) = (self.port, run.peer);
        if let Some(flow) = self.flows.get(&peer).filter(|f| !f.tx.is_closed()) {
            let dropped = flow.send(frames, run.datagrams, run.payload, &self.stats);
            // Queue full: UDP may drop, but never silently.
            if let Some(dropped) = flow.shared.count_dropped(dropped) {
                warn!(
                    port, %peer, dropped,
                    "udp flow queue full ({FLOW_QUEUE_LEN} batches or {FLOW_QUEUE_BYTES} bytes; \
                     {UDP_QUEUED_BYTES} bytes in all flows): dropping"
                );
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
        let flow = FlowHandle { tx, shared: Arc::new(FlowShared::default()) };
        // Queued (its stream is not open yet); counted if it does not fit (the process-wide
        // bound may be reached).
        let dropped = flow.send(frames, run.datagrams, run.payload, &self.stats);
        flow.shared.count_dropped(dropped);
        let task = Flow {
            serving: self.serving.clone(),
            socket: self.socket.clone(),
            peer,
            port,
            client_v6: self.client_v6,
            shared: flow.shared.clone(),
            stats: self.stats.clone(),
            token: self.serving.connection_token(),
        };
        self.flows.insert(peer, flow);
        // Beside the port's receive loop (a relay thread), unless that thread is saturated.
        let flow = task.run(rx, permit).instrument(info_span!("udp", port, %peer));
        self.serving.relay.spawn_task(&self.serving.tracker, flow);
    }
}

/// One desktop client's flow: datagrams the receive loop queued go to the guest on its data
/// stream, datagrams from the stream go back to the client from the port's socket.
struct Flow {
    serving: Serving,
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    port: u16,
    client_v6: bool,
    shared: Arc<FlowShared>,
    stats: Arc<ForwardStats>,
    /// Closes the flow when host networking is switched off.
    token: CancellationToken,
}

impl Flow {
    async fn run(self, mut rx: mpsc::Receiver<Chunk>, _permit: OwnedSemaphorePermit) {
        let _active = self.stats.open();
        let Some(target) = self.serving.target_for(Proto::Udp, self.port, self.client_v6) else {
            debug!("no guest socket any more");
            return;
        };
        let open = Open::Udp { addr: target, port: self.port, peer: Some(self.peer) };
        let (stream, mut reader) = match handshake::open_stream(&*self.serving.connector, &open).await {
            Ok((stream, reader)) => (Arc::new(stream), reader),
            Err(e @ OpenError::Refused(_)) => return debug!("agent {e}"),
            Err(e) => return warn!("cannot open a flow to the agent: {e}"),
        };
        self.shared.set_stream(Some(stream.clone()));
        let shared = &*self.shared;
        // The two directions run side by side: a blocked write one way must never stop the
        // other way from draining, or both ends could wait on each other's writes.
        let from_guest = AtomicU64::new(0);
        let up = async {
            // What the receive loop queued, in order; several chunks already waiting go in one
            // write.
            let mut joined = Vec::new();
            while let Some(first) = rx.recv().await {
                let (mut datagrams, mut payload) = (first.datagrams, first.payload);
                joined.clear();
                while (if joined.is_empty() { first.frames.len() } else { joined.len() }) < BATCH_BYTES {
                    let Ok(next) = rx.try_recv() else { break };
                    if joined.is_empty() {
                        joined.extend_from_slice(&first.frames);
                    }
                    joined.extend_from_slice(&next.frames);
                    datagrams += next.datagrams;
                    payload += next.payload;
                }
                let frames: &[u8] = if joined.is_empty() { &first.frames } else { &joined };
                let written = raw::write_all(&*stream, frames).await;
                shared.release(frames.len());
                if written.is_err() {
                    return "agent stream closed";
                }
                shared.moved(datagrams, payload, &self.stats);
            }
            "port closed"
        };
        let down = async {
            let mut burst = Vec::with_capacity(MMSG_BATCH);
            loop {
                // The whole burst already read goes to the client in one system call.
                match reader.read_burst(&*stream, &mut burst, MMSG_BATCH).await {
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
                shared.activity.touch();
                burst.clear();
            }
        };
        let end = tokio::select! {
            _ = self.token.cancelled() => "closed (shutdown or host networking off)",
            _ = shared.activity.idle_for(UDP_IDLE_TIMEOUT) => "idle",
            end = up => end,
            end = down => end,
        };
        // The stream closes now, not when the port's table lets go of the flow.
        shared.set_stream(None);
        let (to_guest, from_guest) = (shared.to_guest.load(Ordering::Relaxed), from_guest.into_inner());
        let dropped = shared.dropped.get();
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

    /// The tests that queue take turns: the process-wide count is theirs alone while one runs.
    static QUEUEING: Mutex<()> = Mutex::new(());

    fn flow() -> (FlowHandle, mpsc::Receiver<Chunk>) {
        let (tx, rx) = mpsc::channel(FLOW_QUEUE_LEN);
        (FlowHandle { tx, shared: Arc::new(FlowShared::default()) }, rx)
    }

    #[test]
    fn queues_are_bounded_per_flow_and_all_together_and_give_back_what_they_held() {
        let _turn = QUEUEING.lock().unwrap_or_else(PoisonError::into_inner);
        let stats = ForwardStats::default();
        let before = QUEUED.load(Ordering::Relaxed);
        let frames = vec![0u8; 64 * 1024];
        // No stream yet (a flow opening): everything queues.
        let fill = |f: &FlowHandle| {
            let mut queued = 0;
            while f.send(&frames, 1, 0, &stats) == 0 {
                queued += 1;
            }
            queued
        };
        let flows: Vec<_> = (0..UDP_QUEUED_BYTES / FLOW_QUEUE_BYTES)
            .map(|_| {
                let (f, rx) = flow();
                assert_eq!(fill(&f), FLOW_QUEUE_BYTES / frames.len(), "one flow's bytes bound");
                (f, rx)
            })
            .collect();
        assert_eq!(QUEUED.load(Ordering::Relaxed), before + UDP_QUEUED_BYTES);
        // One more flow: nothing fits, all flows together are at the bound.
        let (late, _late_rx) = flow();
        assert_eq!(late.send(b"x", 1, 1, &stats), 1, "the process-wide bound");

        // A flow writes what was queued: room again, for anyone.
        let (f, mut rx) = flows.into_iter().next().unwrap();
        f.shared.release(rx.try_recv().unwrap().frames.len());
        assert_eq!(late.send(b"x", 1, 1, &stats), 0);
        // Flows that end with datagrams still queued give their bytes back.
        drop((f, rx, late));
        assert_eq!(QUEUED.load(Ordering::Relaxed), before, "every byte given back");
        assert_eq!(stats.bytes.to_peer.load(Ordering::Relaxed), 0, "nothing reached a stream");
    }

    /// On a Unix socket pair, whose buffer takes a known part of a large write (the logic is
    /// the same on every platform).
    #[cfg(unix)]
    #[tokio::test]
    async fn nothing_queued_goes_straight_to_the_stream_and_anything_queued_keeps_its_place() {
        let _turn = QUEUEING.lock().unwrap_or_else(PoisonError::into_inner);
        let stats = ForwardStats::default();
        let before = QUEUED.load(Ordering::Relaxed);
        let (ours, guest) = hostnet_net::transport::fd::FdStream::pair().unwrap();
        let (f, mut rx) = flow();
        f.shared.set_stream(Some(Arc::new(TransportStream::Unix(ours))));
        let read_all = || {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            // The socket itself (non-blocking), not the runtime's idea of its readiness.
            while let Ok(n @ 1..) = std::io::Read::read(&mut guest.socket(), &mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
            got
        };

        // Nothing queued: written at once, nothing for the flow's task.
        assert_eq!(f.send(b"one", 1, 3, &stats), 0);
        assert!(rx.try_recv().is_err());
        assert_eq!(read_all(), b"one");
        assert_eq!(
            (f.shared.to_guest.load(Ordering::Relaxed), stats.bytes.to_peer.load(Ordering::Relaxed)),
            (1, 3)
        );

        // More than the stream takes: the rest follows whole, even past the flow's bound, and
        // while the flow is past it, nothing more is queued.
        let batch = |len: usize| (0..len).map(|i| i as u8).collect::<Vec<u8>>();
        let mut stream = Vec::new();
        let mut big = Vec::new();
        for round in 0..2 {
            big = batch(if round == 0 { 2 * FLOW_QUEUE_BYTES } else { FLOW_QUEUE_BYTES });
            assert_eq!(f.send(&big, 1, 0, &stats), 0);
            let rest = rx.try_recv().expect("the part the stream did not take is queued").frames;
            assert!(!rest.is_empty() && rest.len() < big.len());
            assert_eq!(f.shared.bytes.load(Ordering::Relaxed), rest.len());
            stream.extend(read_all());
            if round == 0 {
                assert!(rest.len() > FLOW_QUEUE_BYTES);
                assert_eq!(f.send(b"two", 1, 3, &stats), 1, "past the flow's bound: dropped");
                // The flow's task writes the queue (here by hand), and gives the bytes back.
                stream.extend_from_slice(&rest);
                f.shared.release(rest.len());
                assert_eq!(stream, big, "the big batch arrives whole");
                stream.clear();
                continue;
            }
            // The stream has room again, but something is still queued: this waits behind it.
            assert_eq!(f.send(b"two", 1, 3, &stats), 0);
            assert_eq!(read_all(), b"", "written ahead of the queued bytes");
            let two = rx.try_recv().expect("queued behind").frames;
            stream.extend_from_slice(&rest);
            stream.extend_from_slice(&two);
            f.shared.release(rest.len() + two.len());
        }
        assert_eq!(&stream[..big.len()], &big[..]);
        assert_eq!(&stream[big.len()..], b"two", "in order");
        assert_eq!(QUEUED.load(Ordering::Relaxed), before);
        assert_eq!(f.send(b"three", 1, 5, &stats), 0);
        assert!(rx.try_recv().is_err());
        assert_eq!(read_all(), b"three", "straight to the stream again");
    }
}
