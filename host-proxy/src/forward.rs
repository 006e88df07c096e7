//! The host's mirror of the guest's listeners: for every guest TCP port, listening sockets on
//! the host's `127.0.0.1` and `::1`, and one data stream to the agent per accepted connection.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use hostnet_net::handshake::{self, FrameReader};
use hostnet_net::relay::{self, Outcome, RelayCounters};
use hostnet_net::{Connector, RawStream};
use hostnet_protocol::{Listener, ListenerSet, Open, OpenReply, Proto};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

/// Most relayed connections open at once; past it new ones are reset, counted and logged.
pub const MAX_CONNECTIONS: usize = 16_384;
/// Backlog of each mirrored listening socket.
const LISTEN_BACKLOG: i32 = 1024;

/// Where a host port stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortState {
    /// Bound on the host and relaying.
    Forwarding,
    /// Could not be bound (another program holds it); retried.
    Conflict(String),
}

struct PortForward {
    state: PortState,
    /// Stops this port's accept loops (and so closes its listening sockets).
    stop: CancellationToken,
}

#[derive(Default)]
struct Table {
    guest: ListenerSet,
    ports: BTreeMap<(Proto, u16), PortForward>,
}

/// The forwarding table and what it needs to serve connections.
#[derive(Clone)]
pub struct Forwards {
    table: Arc<Mutex<Table>>,
    pub(crate) connector: Arc<dyn Connector>,
    pub(crate) tracker: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    connections: Arc<Semaphore>,
    pub(crate) udp_flows: Arc<Semaphore>,
}

impl std::fmt::Debug for Forwards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwards").field("connector", &self.connector.to_string()).finish()
    }
}

impl Forwards {
    pub fn new(connector: Arc<dyn Connector>, tracker: TaskTracker, shutdown: CancellationToken) -> Self {
        Forwards {
            table: Arc::default(),
            connector,
            tracker,
            shutdown,
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            udp_flows: Arc::new(Semaphore::new(crate::udp::MAX_UDP_FLOWS)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The agent's full set (a snapshot): forward exactly these.
    pub fn replace_all(&self, guest: ListenerSet) {
        let mut t = self.lock();
        t.guest = guest;
        self.reconcile(&mut t);
    }

    pub fn add(&self, listeners: &[Listener]) {
        let mut t = self.lock();
        t.guest.extend(listeners.iter().copied());
        self.reconcile(&mut t);
    }

    pub fn remove(&self, listeners: &[Listener]) {
        let mut t = self.lock();
        for l in listeners {
            t.guest.remove(l);
        }
        self.reconcile(&mut t);
    }

    /// The guest address a client of the given family is relayed to, if anything listens.
    pub(crate) fn target_for(&self, proto: Proto, port: u16, client_v6: bool) -> Option<IpAddr> {
        self.lock().guest.target_for(proto, port, client_v6)
    }

    /// Number of guest listeners known and host ports forwarding.
    pub fn counts(&self) -> (usize, usize) {
        let t = self.lock();
        let forwarding = t.ports.values().filter(|p| p.state == PortState::Forwarding).count();
        (t.guest.len(), forwarding)
    }

    /// Tries again to bind ports that were held by another program; says so when one frees up
    /// or its reason changes, and stays quiet otherwise.
    pub fn retry_conflicts(&self) {
        let mut t = self.lock();
        let conflicted: Vec<_> = t
            .ports
            .iter()
            .filter_map(|(k, p)| match &p.state {
                PortState::Conflict(reason) => Some((*k, reason.clone())),
                PortState::Forwarding => None,
            })
            .collect();
        for ((proto, port), old_reason) in conflicted {
            let fwd = self.start_port(proto, port);
            match &fwd.state {
                PortState::Forwarding => info!(port, "host port {port} is free now"),
                PortState::Conflict(reason) if *reason != old_reason => warn!(port, "{reason}"),
                PortState::Conflict(_) => {}
            }
            t.ports.insert((proto, port), fwd);
        }
    }

    /// Brings the host sockets in line with the guest set.
    fn reconcile(&self, t: &mut Table) {
        let wanted = t.guest.ports();
        t.ports.retain(|key, fwd| {
            let keep = wanted.contains(key);
            if !keep {
                fwd.stop.cancel();
                info!(proto = %key.0, port = key.1, "guest listener gone: host port closed");
            }
            keep
        });
        for key in wanted {
            if t.ports.contains_key(&key) {
                continue;
            }
            let (proto, port) = key;
            let fwd = self.start_port(proto, port);
            if let PortState::Conflict(reason) = &fwd.state {
                warn!(port, "{reason}");
            }
            t.ports.insert(key, fwd);
        }
    }

    /// Binds `port` on both loopbacks and starts serving it.
    fn start_port(&self, proto: Proto, port: u16) -> PortForward {
        let stop = self.shutdown.child_token();
        let mut bound = Vec::new();
        let mut errors = Vec::new();
        for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
            match bind(proto, SocketAddr::new(ip, port)) {
                Ok(l) => bound.push(l),
                Err(e) if ip.is_ipv6() && e.kind() == io::ErrorKind::AddrNotAvailable => {
                    debug!(port, "no IPv6 loopback on this host; forwarding on 127.0.0.1 only");
                }
                Err(e) => errors.push(describe_bind_error(proto, ip, port, &e)),
            }
        }
        if bound.is_empty() {
            return PortForward { state: PortState::Conflict(errors.join("; ")), stop };
        }
        for e in &errors {
            warn!(port, "{e}"); // One family failed, the other forwards.
        }
        info!(port, "forwarding host {proto} port {port} → guest port {port}");
        for socket in bound {
            let this = self.clone();
            let stop = stop.clone();
            match socket {
                Bound::Tcp(l) => self.tracker.spawn(async move { this.accept_loop(l, port, stop).await }),
                Bound::Udp(s) => {
                    self.tracker.spawn(async move { crate::udp::serve(this, s, port, stop).await })
                }
            };
        }
        PortForward { state: PortState::Forwarding, stop }
    }

    async fn accept_loop(self, listener: TcpListener, port: u16, stop: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let (client, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // fd exhaustion and the like: pause instead of spinning.
                    warn!(port, "accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                warn!(port, %peer, "over {MAX_CONNECTIONS} connections: refusing this one");
                let _ = client.set_reset_on_close();
                continue;
            };
            let this = self.clone();
            let span = info_span!("conn", port, %peer);
            self.tracker.spawn(
                async move {
                    this.serve(client, peer, port).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }

    /// One host client: open a data stream, ask the agent to connect, relay.
    async fn serve(&self, client: TcpStream, peer: SocketAddr, port: u16) {
        let _ = client.set_nodelay(true);
        let client_v6 = client.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
        let Some(target) = self.target_for(Proto::Tcp, port, client_v6) else {
            debug!("no guest listener any more: resetting");
            let _ = client.set_reset_on_close();
            return;
        };
        let stream = match self.connector.connect().await {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot open a stream to the agent: {e}");
                let _ = client.set_reset_on_close();
                return;
            }
        };
        let open = Open::Tcp { addr: target, port, peer: Some(peer) };
        let mut reader = FrameReader::new();
        let reply = async {
            handshake::send_preface_and(&stream, &open).await?;
            reader.read_opening::<_, OpenReply>(&stream).await
        };
        match reply.await {
            Ok(OpenReply::Connected) => {}
            Ok(OpenReply::Refused { reason }) => {
                debug!("agent refused: {reason}");
                let _ = client.set_reset_on_close();
                return;
            }
            Err(e) => {
                warn!("agent did not open the connection: {e}");
                let _ = client.set_reset_on_close();
                return;
            }
        }
        let counters = RelayCounters::default();
        let outcome = relay::relay(&client, &stream, reader.into_leftover(), &counters, &self.shutdown).await;
        match outcome {
            Outcome::ProtocolError => warn!(?counters, "agent broke the stream protocol; connection reset"),
            _ => debug!(?outcome, ?counters, "connection finished"),
        }
    }
}

/// A host socket serving one forwarded port on one address.
enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// A socket like any server's: IPv6 sockets IPv6-only (the IPv4 one is separate); TCP with
/// `SO_REUSEADDR` (so TIME_WAIT does not block a rebind); UDP with a large receive buffer.
fn bind(proto: Proto, addr: SocketAddr) -> io::Result<Bound> {
    let ty = match proto {
        Proto::Tcp => Type::STREAM,
        Proto::Udp => Type::DGRAM,
    };
    let socket = Socket::new(Domain::for_address(addr), ty.nonblocking().cloexec(), None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    match proto {
        Proto::Tcp => {
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(LISTEN_BACKLOG)?;
            Ok(Bound::Tcp(TcpListener::from_std(socket.into())?))
        }
        Proto::Udp => {
            let _ = socket.set_recv_buffer_size(hostnet_net::udp::UDP_SOCKET_BUFFER);
            socket.bind(&addr.into())?;
            Ok(Bound::Udp(UdpSocket::from_std(socket.into())?))
        }
    }
}

fn describe_bind_error(proto: Proto, ip: IpAddr, port: u16, e: &io::Error) -> String {
    let at = SocketAddr::new(ip, port);
    match e.kind() {
        io::ErrorKind::AddrInUse => format!(
            "{proto} port {port} is already in use on the host ({at}) by another program; the forward will start when it frees up"
        ),
        io::ErrorKind::PermissionDenied => format!(
            "binding {at} needs privileges on this host (ports below 1024 are restricted); the forward is not active"
        ),
        _ => format!("cannot listen on {at}: {e}"),
    }
}
