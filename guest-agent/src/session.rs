//! One stream from the proxy: the control stream, or one relayed TCP connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::intercept::{AGENT_MARK, Interceptor};
use hostnet_net::TransportStream;
use hostnet_net::connect::connect_tcp;
use hostnet_net::handshake::{self, FrameReader, HandshakeError};
use hostnet_net::relay::{self, RelayCounters};
use hostnet_net::udp;
use hostnet_protocol::{Control, ListenerSet, Open, PrefaceError, Role, SnapshotParts, listener_chunks};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// A control stream silent this long (the proxy heartbeats every couple of seconds) is dead.
const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// State shared by every stream the agent serves.
#[derive(Debug, Clone)]
pub struct Sessions {
    listeners: watch::Receiver<Arc<ListenerSet>>,
    /// Guest→host interception, when it is on.
    interceptor: Option<Interceptor>,
    /// `SO_MARK` for the agent's own connections while interception is on.
    mark: Option<u32>,
    shutdown: CancellationToken,
    /// The live control session; a new one replaces it (the proxy restarted or reconnected).
    control: Arc<Mutex<CancellationToken>>,
}

impl Sessions {
    pub fn new(
        listeners: watch::Receiver<Arc<ListenerSet>>,
        interceptor: Option<Interceptor>,
        shutdown: CancellationToken,
    ) -> Self {
        let mark = interceptor.as_ref().map(|_| AGENT_MARK);
        Sessions {
            listeners,
            interceptor,
            mark,
            shutdown,
            control: Arc::new(Mutex::new(CancellationToken::new())),
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

    pub async fn handle(&self, stream: TransportStream, peer: String) {
        let mut reader = FrameReader::new();
        let open = match reader.read_opening::<_, Open>(&stream).await {
            Ok(open) => open,
            Err(e) => {
                if let HandshakeError::Preface(PrefaceError::VersionMismatch { .. }) = e {
                    // Tell the proxy in words too; it also sees our version in our preface.
                    let msg = Control::Error { message: format!("hostnet-agent: {e}") };
                    let _ = handshake::send_preface_and(&stream, &msg).await;
                }
                warn!(%peer, "rejected a stream: {e}");
                return;
            }
        };
        match open {
            Open::Control {} if !control_peer_allowed(&peer) => {
                // Any process in the VM can open AF_VSOCK to the agent's port: only the host
                // may take the control stream (and with it the session of the real proxy).
                let msg = Control::Error {
                    message: "hostnet-agent: control streams are taken only from the host".to_owned(),
                };
                let _ = handshake::send_preface_and(&stream, &msg).await;
                warn!(%peer, "refused a control stream from a peer that is not the host");
            }
            Open::Control {} => {
                info!(%peer, "control stream from the proxy");
                self.control(stream, reader).await
            }
            Open::Tcp { addr, port, peer } => {
                let span =
                    info_span!("tcp", %port, client = %peer.map(|p| p.to_string()).unwrap_or_default());
                self.tcp(stream, reader, addr, port).instrument(span).await
            }
            Open::Udp { addr, port, peer } => {
                let span =
                    info_span!("udp", %port, client = %peer.map(|p| p.to_string()).unwrap_or_default());
                self.udp(stream, reader, addr, port).instrument(span).await
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
    ) -> Result<(), HandshakeError> {
        let hello = Control::Hello { role: Role::Agent, software: software() };
        handshake::send_preface_and(stream, &hello).await?;
        let mut listeners = self.listeners.clone();
        let mut sent = (**listeners.borrow_and_update()).clone();
        for frame in Control::snapshot_frames(sent.iter().copied().collect()) {
            handshake::send_frame(stream, &frame).await?;
        }
        debug!(listeners = sent.len(), "snapshot sent");
        let mut host_parts = SnapshotParts::default();
        loop {
            tokio::select! {
                _ = token.cancelled() => return Ok(()),
                changed = listeners.changed() => {
                    if changed.is_err() {
                        return Ok(()); // discovery stopped: shutting down
                    }
                    let now = (**listeners.borrow_and_update()).clone();
                    let (added, removed) = sent.diff(&now);
                    if !removed.is_empty() {
                        debug!(?removed, "listeners removed");
                        for listeners in listener_chunks(removed) {
                            handshake::send_frame(stream, &Control::Removed { listeners }).await?;
                        }
                    }
                    if !added.is_empty() {
                        debug!(?added, "listeners added");
                        for listeners in listener_chunks(added) {
                            handshake::send_frame(stream, &Control::Added { listeners }).await?;
                        }
                    }
                    sent = now;
                }
                frame = tokio::time::timeout(CONTROL_IDLE_TIMEOUT, reader.read_frame::<_, Control>(stream)) => {
                    match frame.map_err(|_| HandshakeError::TimedOut(CONTROL_IDLE_TIMEOUT))?? {
                        Control::Heartbeat { seq } => {
                            handshake::send_frame(stream, &Control::HeartbeatAck { seq }).await?;
                        }
                        Control::Hello { software, .. } => info!(%software, "proxy said hello"),
                        Control::HostSnapshot { listeners, more } => {
                            let whole = host_parts.push(listeners, more).map_err(|e| {
                                HandshakeError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
                            })?;
                            if let Some(listeners) = whole {
                                self.update_host(|s| *s = listeners.into_iter().filter(|l| l.is_forwardable()).collect());
                            }
                        }
                        Control::HostAdded { listeners } => {
                            self.update_host(|s| s.extend(listeners.into_iter().filter(|l| l.is_forwardable())));
                        }
                        Control::HostRemoved { listeners } => {
                            self.update_host(|s| listeners.iter().for_each(|l| { s.remove(l); }));
                        }
                        Control::Error { message } => warn!("proxy reported: {message}"),
                        other => debug!(?other, "ignoring a frame the agent does not act on"),
                    }
                }
            }
        }
    }

    async fn tcp(&self, stream: TransportStream, reader: FrameReader, addr: IpAddr, port: u16) {
        // The proxy may only reach guest loopback: never use the agent to go elsewhere.
        let server = if !addr.is_loopback() {
            Err(format!("{addr} is not a guest loopback address"))
        } else {
            connect_tcp(SocketAddr::new(addr, port), self.mark, "in the guest").await
        };
        if !handshake::answer_open(&stream, &server).await {
            return;
        }
        let Ok(server) = server else { return };
        let counters = RelayCounters::default();
        let outcome = relay::relay(&server, &stream, reader.into_leftover(), &counters, &self.shutdown).await;
        debug!(?outcome, ?counters, "relay finished");
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
            udp::connected_socket(target, self.mark)
                .await
                .map_err(|e| format!("opening a UDP socket to {target} in the guest failed: {e}"))
        };
        if !handshake::answer_open(&stream, &socket).await {
            return;
        }
        let Ok(socket) = socket else { return };
        let stats = udp::relay_connected(&stream, &mut reader, &socket, None, &self.shutdown).await;
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
