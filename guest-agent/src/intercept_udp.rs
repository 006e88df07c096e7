//! Guest→host UDP: datagrams guest processes send to `127.0.0.1:P` / `[::1]:P` for an advertised
//! desktop UDP port P.
//!
//! TPROXY hands the first datagram of a flow to the agent's transparent socket, whose
//! `IP_RECVORIGDSTADDR` control message tells P. The agent then opens a socket of the flow's
//! own: transparent, bound to the original destination and `connect`ed to the guest client.
//! TPROXY's established-socket lookup delivers the flow's later datagrams straight to it, and
//! replies sent from it reach the client from `127.0.0.1:P`, as the client expects. Flow
//! sockets close after [`FLOW_IDLE_TIMEOUT`](crate::limits::FLOW_IDLE_TIMEOUT), so they do not keep P bound against a guest
//! server that starts later.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hostnet_net::Connector;
use hostnet_net::discovery::own::OwnSockets;
use hostnet_net::relay::socket::UdpSocket;
use hostnet_net::relay::udp;
use hostnet_net::tally::Tally;
use hostnet_net::transport::handshake::{self, OpenError};
use hostnet_protocol::Open;
use hostnet_protocol::datagram::MAX_DATAGRAM_LEN;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::limits::{FLOW_IDLE_TIMEOUT, FLOW_QUEUE_LEN, MAX_FLOWS};
use crate::transparent;

/// Serves one catch-all socket until `shutdown`.
pub async fn serve(
    socket: UdpSocket,
    to_host: Arc<dyn Connector>,
    own: OwnSockets,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut flows: HashMap<(SocketAddr, SocketAddr), mpsc::Sender<Bytes>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
    let dropped = Tally::default();
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.async_io(Interest::READABLE, || transparent::recv_with_original(&socket, &mut buf)) => r,
        };
        let (n, client, original) = match received {
            Ok(r) => r,
            Err(e) => {
                debug!("guest→host udp receive: {e}");
                continue;
            }
        };
        let datagram = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
        let key = (client, original);
        if let Some(tx) = flows.get(&key).filter(|tx| !tx.is_closed()) {
            if tx.try_send(datagram).is_err() {
                if let Some(dropped) = dropped.one_more() {
                    warn!(%client, %original, dropped, "guest→host udp queue full: dropping");
                }
            }
            continue;
        }
        flows.retain(|_, tx| !tx.is_closed());
        if flows.len() >= MAX_FLOWS {
            if let Some(dropped) = dropped.one_more() {
                warn!(dropped, "over {MAX_FLOWS} guest→host UDP flows: dropping datagrams of new flows");
            }
            continue;
        }
        let socket = match transparent::udp_flow_socket(original, client, &own) {
            Ok(s) => s,
            Err(e) => {
                warn!(%client, %original, "cannot open the flow's socket: {e}");
                continue;
            }
        };
        let (tx, rx) = mpsc::channel(FLOW_QUEUE_LEN);
        let _ = tx.try_send(datagram);
        flows.insert(key, tx);
        let span = info_span!("guest→host udp", port = original.port(), %client);
        tracker.spawn(flow(socket, rx, original, client, to_host.clone(), shutdown.clone()).instrument(span));
    }
}

/// One flow: its socket and the datagrams queued for it ⇄ a data stream to the proxy, relayed
/// as the other way's flows are: bursts in one system call each way.
async fn flow(
    socket: UdpSocket,
    queued: mpsc::Receiver<Bytes>,
    original: SocketAddr,
    client: SocketAddr,
    to_host: Arc<dyn Connector>,
    shutdown: CancellationToken,
) {
    let open = Open::Udp { addr: original.ip(), port: original.port(), peer: Some(client) };
    let (stream, mut reader) = match handshake::open_stream(&*to_host, &open).await {
        Ok(opened) => opened,
        Err(e @ OpenError::Refused(_)) => return debug!("proxy {e}"),
        Err(e) => return warn!("cannot reach the proxy for guest→host: {e}"),
    };
    // The queue carries what beat the flow socket to the catch-all; the socket the rest.
    let stats =
        udp::relay_connected(&stream, &mut reader, &socket, Some(FLOW_IDLE_TIMEOUT), Some(queued), &shutdown)
            .await;
    debug!(?stats, "flow finished");
}
