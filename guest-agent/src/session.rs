//! One stream from the proxy: the control stream, or one relayed TCP connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use crate::intercept::Interceptor;
use crate::transparent::AGENT_MARK;
use hostnet_net::TransportStream;
use hostnet_net::connect::connect_tcp;
use hostnet_net::discovery::own::OwnSockets;
use hostnet_net::relay::open::{answer_and_relay, refuse};
use hostnet_net::relay::tcp::RelayCounters;
use hostnet_net::relay::udp;
use hostnet_net::transport::handshake::{self, FrameReader, HandshakeError};
use hostnet_protocol::session::{AgentAction, AgentSession, AgentSessionError};
use hostnet_protocol::{AgentFrame, ListenerSet, Open, PrefaceError, ProxyFrame, ShowPeer};
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, info, info_span, warn};

/// Why a control stream ended.
#[derive(Debug, Error)]
enum ControlError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Session(#[from] AgentSessionError),
}

/// The time handed to the control session (tokio's clock, so paused-time tests hold).
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// State shared by every stream the agent serves.
#[derive(Debug, Clone)]
pub struct Sessions {
    listeners: watch::Receiver<Arc<ListenerSet>>,
    /// Guest→host interception, when it is on.
    interceptor: Option<Interceptor>,
    /// `SO_MARK` for the agent's own connections while interception is on.
    mark: Option<u32>,
    /// The agent's own sockets (its UDP flow sockets are registered here).
    own: OwnSockets,
    shutdown: CancellationToken,
    /// The live control session; a new one replaces it (the proxy restarted or reconnected).
    control: Arc<Mutex<CancellationToken>>,
}

impl Sessions {
    pub fn new(
        listeners: watch::Receiver<Arc<ListenerSet>>,
        interceptor: Option<Interceptor>,
        own: OwnSockets,
        shutdown: CancellationToken,
    ) -> Self {
        let mark = interceptor.as_ref().map(|_| AGENT_MARK);
        Sessions {
            listeners,
            interceptor,
            mark,
            own,
            shutdown,
            // No live control stream yet: the slot holds a stream that has ended.
            control: Arc::new(Mutex::new({
                let none = CancellationToken::new();
                none.cancel();
                none
            })),
        }
    }

    /// Applies a change to the desktop's advertised listeners.
    fn update_host(&self, f: impl FnOnce(&mut ListenerSet)) {
        if let Some(i) = &self.interceptor {
            let mut set = (*i.host_listeners()).clone();
            f(&mut set);
            i.set_host_listeners(set);
        }
    }

    /// Serves one stream: its opening, and on a stream whose TCP connection ended cleanly the
    /// next opening, until the proxy closes it.
    pub async fn handle(&self, stream: TransportStream, peer: String) {
        let (mut stream, mut reader) = (stream, FrameReader::new());
        while let Some(next) = self.serve(stream, reader, &peer).await {
            (stream, reader) = next;
        }
    }

    /// One opening on `stream`; the stream back if another may follow.
    async fn serve(
        &self,
        stream: TransportStream,
        mut reader: FrameReader,
        peer: &str,
    ) -> Option<(TransportStream, FrameReader)> {
        let open = match reader.read_opening_until::<_, Open>(&stream, &self.shutdown).await? {
            Ok(open) => open,
            Err(e) if reader.ended_between(&e) => {
                // A stream the proxy opened ahead of need, or kept after a connection, and
                // closed unused.
                debug!(%peer, "a stream closed before its opening: the proxy let it go");
                return None;
            }
            Err(e) => {
                if let HandshakeError::Preface(PrefaceError::VersionMismatch { .. }) = e {
                    // Tell the proxy in words too; it also sees our version in our preface.
                    let msg = AgentFrame::Error { message: format!("hostnet-agent: {e}") };
                    let _ = handshake::send_preface_and(&stream, &msg).await;
                }
                warn!(%peer, "rejected a stream: {e}");
                return None;
            }
        };
        match open {
            Open::Control {} if !control_peer_allowed(peer) => {
                // Any process in the VM can open AF_VSOCK to the agent's port: only the host
                // may take the control stream (and with it the session of the real proxy).
                let msg = AgentFrame::Error {
                    message: "hostnet-agent: control streams are taken only from the host".to_owned(),
                };
                let _ = handshake::send_preface_and(&stream, &msg).await;
                warn!(%peer, "refused a control stream from a peer that is not the host");
                None
            }
            Open::Control {} => {
                info!(%peer, "control stream from the proxy");
                self.control(stream, reader).await;
                None
            }
            Open::Tcp { addr, port, peer } => {
                // At debug level, as the proxy's connection spans (`host-proxy/src/forward.rs`).
                let span = debug_span!("tcp", %port, client = %ShowPeer(peer));
                self.tcp(stream, reader, addr, port).instrument(span).await
            }
            Open::Udp { addr, port, peer } => {
                let span = info_span!("udp", %port, client = %ShowPeer(peer));
                self.udp(stream, reader, addr, port).instrument(span).await;
                None
            }
        }
    }

    async fn control(&self, stream: TransportStream, mut reader: FrameReader) {
        let token = self.shutdown.child_token();
        {
            let mut current = self.control.lock().unwrap_or_else(|p| p.into_inner());
            if !current.is_cancelled() {
                warn!("a new control stream replaces the live one (the proxy reconnected)");
            }
            current.cancel();
            *current = token.clone();
        }
        info!("proxy connected: control stream up");
        let result = self.control_loop(&stream, &mut reader, &token).await;
        if !token.is_cancelled() {
            // No proxy any more: guest connections to desktop ports would only fail.
            self.update_host(|s| *s = ListenerSet::new());
        }
        // Ended: the next control stream replaces nothing live.
        token.cancel();
        match result {
            Ok(()) => info!("control stream closed"),
            Err(e) => warn!("control stream ended: {e}"),
        }
    }

    async fn control_loop(
        &self,
        stream: &TransportStream,
        reader: &mut FrameReader,
        token: &CancellationToken,
    ) -> Result<(), ControlError> {
        let mut listeners = self.listeners.clone();
        let initial = (**listeners.borrow_and_update()).clone();
        let count = initial.len();
        let mut session = AgentSession::new(software(), initial, now());
        // Our preface goes out with the hello, in one write.
        self.apply(&mut session, stream, true).await?;
        debug!(listeners = count, "snapshot sent");
        loop {
            tokio::select! {
                _ = token.cancelled() => return Ok(()),
                changed = listeners.changed() => {
                    if changed.is_err() {
                        return Ok(()); // discovery stopped: shutting down
                    }
                    session.listeners_changed((**listeners.borrow_and_update()).clone());
                }
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(session.poll_timeout())) => {
                    session.handle_timeout(now())?;
                }
                frame = reader.read_frame::<_, ProxyFrame>(stream) => {
                    session.handle_frame(frame?, now())?;
                }
            }
            self.apply(&mut session, stream, false).await?;
        }
    }

    /// Carries out what the control session asked for, in order.
    async fn apply(
        &self,
        session: &mut AgentSession,
        stream: &TransportStream,
        mut preface: bool,
    ) -> Result<(), HandshakeError> {
        while let Some(action) = session.poll_action() {
            match action {
                AgentAction::Send(frame) => {
                    match &frame {
                        AgentFrame::Removed { listeners } => {
                            debug!(removed = ?listeners, "listeners removed")
                        }
                        AgentFrame::Added { listeners } => debug!(added = ?listeners, "listeners added"),
                        _ => {}
                    }
                    if std::mem::take(&mut preface) {
                        handshake::send_preface_and(stream, &frame).await?;
                    } else {
                        handshake::send_frame(stream, &frame).await?;
                    }
                }
                AgentAction::ProxyHello { software } => info!(%software, "proxy said hello"),
                AgentAction::SetHost(listeners) => self.update_host(|s| *s = listeners),
                AgentAction::ProxyReported(message) => warn!("proxy reported: {message}"),
            }
        }
        Ok(())
    }

    /// One TCP connection; the stream back, with what was read past it, if it ended cleanly.
    async fn tcp(
        &self,
        stream: TransportStream,
        reader: FrameReader,
        addr: IpAddr,
        port: u16,
    ) -> Option<(TransportStream, FrameReader)> {
        // The proxy may only reach guest loopback: never use the agent to go elsewhere.
        let server = if !addr.is_loopback() {
            Err(format!("{addr} is not a guest loopback address"))
        } else {
            connect_tcp(SocketAddr::new(addr, port), self.mark, "in the guest").await
        };
        let server = match server {
            Ok(server) => server,
            Err(reason) => {
                refuse(&stream, reason).await;
                return None;
            }
        };
        // `connected` goes out with the server's first bytes (or its FIN): one write, and one
        // wake-up of the proxy, instead of two.
        let counters = RelayCounters::default();
        let relayed = answer_and_relay(stream, reader, server, &counters, &self.shutdown).await?;
        debug!(outcome = ?relayed.outcome, ?counters, "relay finished");
        relayed.reusable
    }
}

impl Sessions {
    /// One UDP flow: a socket of its own, connected to the guest server, so the server's
    /// replies come back to exactly this flow.
    async fn udp(&self, stream: TransportStream, mut reader: FrameReader, addr: IpAddr, port: u16) {
        let target = SocketAddr::new(addr, port);
        let socket = if !addr.is_loopback() {
            Err(format!("{addr} is not a guest loopback address"))
        } else {
            udp::connected_socket(target, self.mark, &self.own)
                .await
                .map_err(|e| format!("opening a UDP socket to {target} in the guest failed: {e}"))
        };
        if !handshake::answer_open(&stream, &socket).await {
            return;
        }
        let Ok(socket) = socket else { return };
        let stats = udp::relay_connected(&stream, &mut reader, &socket, None, None, &self.shutdown).await;
        debug!(?stats, "udp flow finished");
    }
}

fn software() -> String {
    format!("hostnet-agent {}", env!("CARGO_PKG_VERSION"))
}

/// `VMADDR_CID_HOST`: the vsock address of the host, where the proxy runs.
const VSOCK_CID_HOST: u32 = 2;

/// Whether a control stream may come from `peer` (as the transport names it): over vsock only
/// from the host; other transports (the stand-in's Unix socket, a VMM's hybrid vsock, whose
/// streams reach the agent from the host side only) do not tell, and are the host's.
fn control_peer_allowed(peer: &str) -> bool {
    match peer.strip_prefix("vsock:") {
        Some(rest) => rest.split(':').next().and_then(|cid| cid.parse::<u32>().ok()) == Some(VSOCK_CID_HOST),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_takes_the_control_stream_over_vsock() {
        assert!(control_peer_allowed("vsock:2:1029"));
        for peer in ["vsock:1:5000", "vsock:3:5000", "vsock:4294967295:1", "vsock:?"] {
            assert!(!control_peer_allowed(peer), "{peer}");
        }
        assert!(control_peer_allowed("unix peer"));
    }
}
