//! Guest→host: the desktop's own listeners are advertised to the agent, and the streams the
//! agent opens for intercepted guest connections are served here — only to loopback ports
//! that are advertised right now.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hostnet_net::connect::connect_tcp;
use hostnet_net::handshake::{self, FrameReader};
use hostnet_net::relay;
use hostnet_net::udp;
use hostnet_net::{TransportSpec, TransportStream, watcher};
use hostnet_protocol::{ListenerSet, Open, Proto};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::HOST_POLL_INTERVAL;
use crate::forward::ForwardStats;
use crate::settings::Settings;

/// Starts watching the desktop's listeners and serving the agent's guest→host streams.
/// Returns the set to advertise: the desktop's listeners while the settings allow guest→host,
/// else empty (and always empty if either part cannot start).
pub async fn start(
    listen: &TransportSpec,
    settings: watch::Receiver<Arc<Settings>>,
    stats: ToHostStats,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> watch::Receiver<Arc<ListenerSet>> {
    let off = || watch::channel(Arc::new(ListenerSet::new())).1;
    let raw = match watcher::platform_source().and_then(|src| {
        watcher::spawn(src, watcher::Trigger::best(HOST_POLL_INTERVAL), BTreeSet::new(), shutdown.clone())
    }) {
        Ok(rx) => rx,
        Err(e) => {
            warn!("guest→host is off: cannot read this machine's listening sockets: {e}");
            return off();
        }
    };
    let acceptor = match listen.bind().await {
        Ok(a) => a,
        Err(e) => {
            warn!("guest→host is off: {e}");
            return off();
        }
    };
    info!(%listen, "serving guest→host connections");
    let host = advertised(raw, settings, tracker, shutdown);
    let (host2, shutdown2, tracker2) = (host.clone(), shutdown.clone(), tracker.clone());
    tracker.spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown2.cancelled() => return,
                a = acceptor.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    let (host, shutdown, stats) = (host2.clone(), shutdown2.clone(), stats.clone());
                    tracker2.spawn(async move { serve(stream, host, stats, shutdown).await });
                }
                Err(e) => {
                    warn!("accepting a guest→host stream failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    host
}

/// Live counts of guest→host traffic per desktop port, for `status`.
pub type ToHostStats = Arc<Mutex<HashMap<(Proto, u16), Arc<ForwardStats>>>>;

fn stats_for(stats: &ToHostStats, proto: Proto, port: u16) -> Arc<ForwardStats> {
    stats.lock().unwrap_or_else(|p| p.into_inner()).entry((proto, port)).or_default().clone()
}

/// The desktop's listeners as far as the settings let the guest reach them.
fn advertised(
    mut raw: watch::Receiver<Arc<ListenerSet>>,
    mut settings: watch::Receiver<Arc<Settings>>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> watch::Receiver<Arc<ListenerSet>> {
    let compute = |raw: &Arc<ListenerSet>, s: &Settings| {
        if s.enabled && s.guest_to_host { raw.clone() } else { Arc::new(ListenerSet::new()) }
    };
    let (tx, rx) = watch::channel(compute(&raw.borrow_and_update(), &settings.borrow_and_update()));
    let stop = shutdown.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = raw.changed() => if r.is_err() { return },
                r = settings.changed() => if r.is_err() { return },
            }
            let next = compute(&raw.borrow_and_update(), &settings.borrow_and_update());
            tx.send_if_modified(|cur| {
                let changed = **cur != *next;
                *cur = next;
                changed
            });
        }
    });
    rx
}

/// One guest connection: connect to the advertised desktop port, relay.
async fn serve(
    stream: TransportStream,
    host: watch::Receiver<Arc<ListenerSet>>,
    stats: ToHostStats,
    shutdown: CancellationToken,
) {
    let mut reader = FrameReader::new();
    let open = match reader.read_opening::<_, Open>(&stream).await {
        Ok(o) => o,
        Err(e) => return warn!("rejected a guest→host stream: {e}"),
    };
    let (addr, port, peer) = match open {
        Open::Tcp { addr, port, peer } => (addr, port, peer),
        Open::Udp { addr, port, peer } => {
            let span =
                info_span!("guest→host udp", port, client = %peer.map(|p| p.to_string()).unwrap_or_default());
            let stats = stats_for(&stats, Proto::Udp, port);
            return serve_udp(stream, reader, host, addr.is_ipv6(), port, stats, shutdown)
                .instrument(span)
                .await;
        }
        Open::Control {} => return warn!("rejected a control stream on the guest→host socket"),
    };
    let span = info_span!("guest→host", port, client = %peer.map(|p| p.to_string()).unwrap_or_default());
    async move {
        // Only a port the desktop advertises, and only on the desktop's loopback: the guest
        // cannot steer the proxy anywhere else, whatever `addr` it sends.
        let target = host.borrow().target_for(Proto::Tcp, port, addr.is_ipv6());
        let server = match target {
            None => Err(format!("host port {port} is not advertised to the guest")),
            Some(ip) => connect_tcp(SocketAddr::new(ip, port), None, "on the host").await,
        };
        if !handshake::answer_open(&stream, &server).await {
            return;
        }
        let Ok(server) = server else { return };
        let stats = stats_for(&stats, Proto::Tcp, port);
        let _active = stats.open();
        let outcome = relay::relay(&server, &stream, reader.into_leftover(), &stats.bytes, &shutdown).await;
        debug!(?outcome, "guest→host connection finished");
    }
    .instrument(span)
    .await
}

/// One guest UDP flow: a socket of its own on the desktop's loopback, connected to the
/// advertised desktop port.
async fn serve_udp(
    stream: TransportStream,
    mut reader: FrameReader,
    host: watch::Receiver<Arc<ListenerSet>>,
    prefer_v6: bool,
    port: u16,
    stats: Arc<ForwardStats>,
    shutdown: CancellationToken,
) {
    let target = host.borrow().target_for(Proto::Udp, port, prefer_v6);
    let socket = match target {
        None => Err(format!("host UDP port {port} is not advertised to the guest")),
        Some(ip) => udp::connected_socket(SocketAddr::new(ip, port), None)
            .await
            .map_err(|e| format!("opening a UDP socket to {ip}:{port} on the host failed: {e}")),
    };
    if !handshake::answer_open(&stream, &socket).await {
        return;
    }
    let Ok(socket) = socket else { return };
    let _active = stats.open();
    // The agent closes idle flows; twice its timeout here bounds a flow whose agent went quiet.
    let idle = Some(crate::udp::UDP_IDLE_TIMEOUT * 2);
    let stats = udp::relay_connected(&stream, &mut reader, &socket, idle, &shutdown).await;
    debug!(?stats, "guest→host udp flow finished");
}
