//! The host's mirror of the guest's listeners: for every guest port, host sockets on the
//! settings' bind addresses (`127.0.0.1` and `::1` unless the user opted in to all), and one
//! data stream to the agent per accepted connection or UDP flow. The settings decide which
//! guest ports are forwarded, to which host port, and whether anything is forwarded at all.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hostnet_admin::{Direction, ForwardState};
use hostnet_net::handshake::{self, FrameReader, OpenError};
use hostnet_net::relay::{self, Outcome, RelayCounters};
use hostnet_net::{Connector, RawStream};
use hostnet_protocol::{Listener, ListenerSet, Open, Proto};
use socket2::Type;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::settings::{BindScope, Settings};

/// Most relayed connections open at once (all ports together), unless `--max-connections`
/// says otherwise; past it new ones are reset at once, counted in `status` and logged.
pub const MAX_CONNECTIONS: usize = 16_384;

/// How many connections and flows the proxy serves at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Relayed TCP connections open at once.
    pub connections: usize,
    /// UDP flows open at once.
    pub udp_flows: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { connections: MAX_CONNECTIONS, udp_flows: crate::udp::MAX_UDP_FLOWS }
    }
}
/// Backlog of each mirrored listening socket.
const LISTEN_BACKLOG: i32 = 1024;

/// Where a forward stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortState {
    /// Bound on the host and relaying.
    Forwarding,
    /// Could not be bound (another program holds it, or privileges); retried.
    Conflict(String),
    /// The settings' `ignore_ports` names it.
    Ignored,
    /// Host networking (or UDP forwarding) is off in the settings.
    Disabled(String),
}

/// Live counts of one forward, shared by its connections.
#[derive(Debug, Default)]
pub struct ForwardStats {
    pub active: AtomicU64,
    pub total: AtomicU64,
    /// TCP connections reset, or UDP datagrams of new clients dropped, because a limit was
    /// reached.
    pub refused: AtomicU64,
    /// `to_peer`: bytes towards the far side; `from_peer`: bytes back.
    pub bytes: RelayCounters,
}

impl ForwardStats {
    /// Counts a connection for as long as the guard lives.
    pub fn open(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }
}

/// Decrements the active count when dropped.
#[derive(Debug)]
pub struct ActiveGuard(Arc<ForwardStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One forward as `status` shows it (the admin API's type).
pub use hostnet_admin::ForwardStatus;

impl PortState {
    pub fn label(&self) -> (ForwardState, Option<String>) {
        match self {
            PortState::Forwarding => (ForwardState::Forwarding, None),
            PortState::Conflict(r) => (ForwardState::Conflict, Some(r.clone())),
            PortState::Ignored => (ForwardState::Ignored, Some("listed in ignore_ports".to_owned())),
            PortState::Disabled(r) => (ForwardState::Disabled, Some(r.clone())),
        }
    }
}

struct PortForward {
    host_port: u16,
    bind: BindScope,
    state: PortState,
    /// Stops this port's accept loops (and so closes its listening sockets).
    stop: CancellationToken,
    /// This port's accept loops, to know when its sockets are closed.
    tasks: TaskTracker,
    /// Its TCP listeners, shared with their accept loops: when the port closes they stop
    /// listening at once, without waiting for those tasks to run.
    listeners: Vec<Arc<TcpListener>>,
    stats: Arc<ForwardStats>,
    /// Host addresses listening now.
    bound: Vec<IpAddr>,
    /// Addresses of the scope another program holds, and why: a forward live on one family
    /// keeps trying the other (`retry_conflicts`) until it frees up.
    missing: Vec<(IpAddr, String)>,
}

/// What the settings want for one guest port.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wanted {
    Forward { host_port: u16, bind: BindScope },
    Ignored,
    Disabled(String),
}

#[derive(Default)]
struct Table {
    guest: ListenerSet,
    settings: Arc<Settings>,
    ports: BTreeMap<(Proto, u16), PortForward>,
}

impl Table {
    /// What the settings want for every guest port.
    fn wanted(&self) -> BTreeMap<(Proto, u16), Wanted> {
        self.guest.ports().into_iter().map(|key| (key, wanted(&self.settings, key))).collect()
    }
}

/// How long closing a forward may take before its replacement binds anyway.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// The forwarding table and what it needs to serve connections.
#[derive(Clone)]
pub struct Forwards {
    table: Arc<Mutex<Table>>,
    /// Cancelled (and replaced) when host networking is switched off: closes open connections.
    generation: Arc<Mutex<CancellationToken>>,
    pub(crate) connector: Arc<dyn Connector>,
    pub(crate) tracker: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    connections: Arc<Semaphore>,
    pub(crate) udp_flows: Arc<Semaphore>,
    pub(crate) limits: Limits,
    /// Everything refused over the limits, and agent streams that could not be opened: logs
    /// about them are rate-limited on these counts.
    refused: Arc<AtomicU64>,
    open_failures: Arc<AtomicU64>,
}

impl std::fmt::Debug for Forwards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwards").field("connector", &self.connector.to_string()).finish()
    }
}

impl Forwards {
    pub fn new(
        connector: Arc<dyn Connector>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        limits: Limits,
    ) -> Self {
        Forwards {
            table: Arc::default(),
            generation: Arc::new(Mutex::new(shutdown.child_token())),
            connector,
            tracker,
            shutdown,
            connections: Arc::new(Semaphore::new(limits.connections)),
            udp_flows: Arc::new(Semaphore::new(limits.udp_flows)),
            limits,
            refused: Arc::default(),
            open_failures: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies new settings: ports open, close, move or change state as they say. Switching
    /// host networking off also closes the connections in flight.
    pub async fn apply_settings(&self, settings: Arc<Settings>) {
        {
            let mut t = self.lock();
            let was_enabled = t.settings.enabled;
            t.settings = settings;
            if was_enabled && !t.settings.enabled {
                let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
                g.cancel();
                *g = self.shutdown.child_token();
            }
        }
        self.reconcile().await;
    }

    /// Counts one more thing refused over a limit; returns the count so far (all ports).
    pub(crate) fn count_refused(&self) -> u64 {
        self.refused.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The token connections opened now are closed by.
    pub(crate) fn connection_token(&self) -> CancellationToken {
        self.generation.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every guest port's forward, for `status`.
    pub fn status(&self) -> Vec<ForwardStatus> {
        let t = self.lock();
        t.ports
            .iter()
            .map(|(&(proto, guest_port), f)| {
                let (state, reason) = f.state.label();
                let reason = reason.or_else(|| f.missing_reason());
                let host_addresses =
                    if f.state == PortState::Forwarding { f.bound.clone() } else { Vec::new() };
                ForwardStatus {
                    proto,
                    direction: Direction::ToGuest,
                    guest_port,
                    host_port: f.host_port,
                    state,
                    reason,
                    host_addresses,
                    connections_active: f.stats.active.load(Ordering::Relaxed),
                    connections_total: f.stats.total.load(Ordering::Relaxed),
                    connections_refused: f.stats.refused.load(Ordering::Relaxed),
                    bytes_to_guest: f.stats.bytes.to_peer.load(Ordering::Relaxed),
                    bytes_from_guest: f.stats.bytes.from_peer.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// The agent's full set (a snapshot): forward exactly these.
    pub async fn replace_all(&self, guest: ListenerSet) {
        self.lock().guest = guest;
        self.reconcile().await;
    }

    pub async fn add(&self, listeners: &[Listener]) {
        self.lock().guest.extend(listeners.iter().copied());
        self.reconcile().await;
    }

    pub async fn remove(&self, listeners: &[Listener]) {
        {
            let mut t = self.lock();
            for l in listeners {
                t.guest.remove(l);
            }
        }
        self.reconcile().await;
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
                PortState::Conflict(reason) => {
                    Some((*k, p.host_port, p.bind, reason.clone(), p.stats.clone()))
                }
                _ => None,
            })
            .collect();
        for ((proto, guest_port), host_port, bind, old_reason, stats) in conflicted {
            // Quietly: the reason found the first time stands while the port stays taken.
            let mut fwd = self.start_port(proto, guest_port, host_port, bind, stats, false);
            match &fwd.state {
                PortState::Forwarding => info!(port = host_port, "host port {host_port} is free now"),
                _ => fwd.state = PortState::Conflict(old_reason),
            }
            t.ports.insert((proto, guest_port), fwd);
        }
        // Forwards live on one family whose other address was taken.
        for (&(proto, guest_port), fwd) in t.ports.iter_mut() {
            if fwd.state != PortState::Forwarding || fwd.missing.is_empty() {
                continue;
            }
            let missing = std::mem::take(&mut fwd.missing);
            for (ip, reason) in missing {
                match bind(proto, SocketAddr::new(ip, fwd.host_port)) {
                    Ok(socket) => {
                        info!(port = fwd.host_port, "host port {} is free now on {ip} too", fwd.host_port);
                        self.serve_socket(fwd, guest_port, socket);
                        fwd.bound.push(ip);
                    }
                    Err(_) => fwd.missing.push((ip, reason)),
                }
            }
        }
    }

    /// Brings the host sockets in line with the guest set and the settings: first closes what
    /// must go and waits for those sockets to be really closed (a forward that moves to another
    /// bind scope would otherwise collide with itself), then opens what is missing.
    async fn reconcile(&self) {
        let closing: Vec<TaskTracker> = {
            let mut t = self.lock();
            let wanted = t.wanted();
            let mut closing = Vec::new();
            t.ports.retain(|key, fwd| {
                let keep = wanted.get(key).is_some_and(|w| fwd.matches(w));
                if !keep {
                    fwd.stop.cancel();
                    fwd.stop_listening();
                    fwd.tasks.close();
                    closing.push(fwd.tasks.clone());
                    if fwd.state == PortState::Forwarding {
                        info!(proto = %key.0, port = fwd.host_port, "host port closed");
                    }
                }
                keep
            });
            closing
        };
        for tasks in closing {
            let _ = tokio::time::timeout(CLOSE_WAIT, tasks.wait()).await;
        }
        let mut t = self.lock();
        for (key, want) in t.wanted() {
            if t.ports.contains_key(&key) {
                continue;
            }
            let (proto, guest_port) = key;
            let stats = Arc::new(ForwardStats::default());
            let fwd = match want {
                Wanted::Forward { host_port, bind } => {
                    let fwd = self.start_port(proto, guest_port, host_port, bind, stats, true);
                    if let PortState::Conflict(reason) = &fwd.state {
                        warn!(port = host_port, "{reason}");
                    }
                    fwd
                }
                Wanted::Ignored => PortForward::idle(guest_port, PortState::Ignored, stats),
                Wanted::Disabled(why) => PortForward::idle(guest_port, PortState::Disabled(why), stats),
            };
            t.ports.insert(key, fwd);
        }
    }

    /// Binds `host_port` on the bind scope's addresses and starts serving it.
    fn start_port(
        &self,
        proto: Proto,
        guest_port: u16,
        host_port: u16,
        bind_scope: BindScope,
        stats: Arc<ForwardStats>,
        explain: bool,
    ) -> PortForward {
        let stop = self.shutdown.child_token();
        let mut bound = Vec::new();
        let mut missing = Vec::new();
        for ip in bind_addrs(bind_scope) {
            match bind(proto, SocketAddr::new(ip, host_port)) {
                Ok(l) => bound.push((ip, l)),
                Err(e) if ip.is_ipv6() && e.kind() == io::ErrorKind::AddrNotAvailable => {
                    debug!(port = host_port, "no IPv6 on this host; forwarding on IPv4 only");
                }
                // Naming the holder reads the whole socket table: once per port is enough.
                Err(e) => missing
                    .push((ip, describe_bind_error(proto, ip, host_port, &e, explain && missing.is_empty()))),
            }
        }
        let tasks = TaskTracker::new();
        let mut fwd = PortForward {
            host_port,
            bind: bind_scope,
            state: PortState::Forwarding,
            stop,
            tasks,
            listeners: Vec::new(),
            stats,
            bound: bound.iter().map(|(ip, _)| *ip).collect(),
            missing,
        };
        if bound.is_empty() {
            fwd.state = PortState::Conflict(fwd.missing_reason().unwrap_or_default());
            fwd.missing.clear();
            return fwd;
        }
        for (_, e) in &fwd.missing {
            warn!(port = host_port, "{e}"); // One family failed, the other forwards.
        }
        let scope = match bind_scope {
            BindScope::Loopback => "loopback",
            BindScope::All => "ALL addresses (reachable from the network)",
        };
        if bind_scope == BindScope::All {
            warn!(
                port = host_port,
                "forwarding host {proto} port {host_port} on {scope} → guest port {guest_port}"
            );
        } else {
            info!(
                port = host_port,
                "forwarding host {proto} port {host_port} ({scope}) → guest port {guest_port}"
            );
        }
        for (_, socket) in bound {
            self.serve_socket(&mut fwd, guest_port, socket);
        }
        fwd
    }

    /// Serves one bound host socket of `fwd` until the forward stops.
    fn serve_socket(&self, fwd: &mut PortForward, guest_port: u16, socket: Bound) {
        let this = self.clone();
        let (stop, stats) = (fwd.stop.clone(), fwd.stats.clone());
        match socket {
            Bound::Tcp(l) => {
                let l = Arc::new(l);
                fwd.listeners.push(l.clone());
                self.tracker.spawn(
                    fwd.tasks.track_future(async move { this.accept_loop(l, guest_port, stop, stats).await }),
                )
            }
            Bound::Udp(s) => self.tracker.spawn(
                fwd.tasks
                    .track_future(async move { crate::udp::serve(this, s, guest_port, stop, stats).await }),
            ),
        };
    }

    async fn accept_loop(
        self,
        listener: Arc<TcpListener>,
        port: u16,
        stop: CancellationToken,
        stats: Arc<ForwardStats>,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let (client, peer) = match accepted {
                Ok(c) => c,
                // The port closed (its listener was shut down): done.
                Err(_) if stop.is_cancelled() => return,
                Err(e) => {
                    // fd exhaustion and the like: pause instead of spinning.
                    warn!(port, "accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                // Reset at once (the drop closes it), counted; logged at 1, 2, 4, 8… so a
                // storm cannot flood the log.
                let _ = client.set_reset_on_close();
                stats.refused.fetch_add(1, Ordering::Relaxed);
                let refused = self.count_refused();
                if refused.is_power_of_two() {
                    warn!(
                        port,
                        %peer,
                        "{} connections open, the limit: resetting new ones ({refused} refused so far)",
                        self.limits.connections
                    );
                }
                continue;
            };
            let this = self.clone();
            let span = info_span!("conn", port, %peer);
            let (guard, stats, token) = (stats.open(), stats.clone(), self.connection_token());
            self.tracker.spawn(
                async move {
                    this.serve(client, peer, port, &stats, &token).await;
                    drop((guard, permit));
                }
                .instrument(span),
            );
        }
    }

    /// While the agent restarts every client fails the same way: say it at 1, 2, 4, 8…
    /// failures rather than once per client.
    fn open_failed(&self, e: &dyn std::fmt::Display) {
        let failures = self.open_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures.is_power_of_two() {
            warn!("cannot open a stream to the agent: {e} ({failures} so far)");
        } else {
            debug!("cannot open a stream to the agent: {e}");
        }
    }

    /// One host client: open a data stream, ask the agent to connect, relay.
    async fn serve(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        port: u16,
        stats: &ForwardStats,
        token: &CancellationToken,
    ) {
        let _ = client.set_nodelay(true);
        // The mirror's family (its IPv6 sockets are IPv6-only), without asking the socket.
        let client_v6 = peer.is_ipv6();
        let Some(target) = self.target_for(Proto::Tcp, port, client_v6) else {
            debug!("no guest listener any more: resetting");
            let _ = client.set_reset_on_close();
            return;
        };
        let open = Open::Tcp { addr: target, port, peer: Some(peer) };
        let stream = match handshake::send_open(&*self.connector, &open).await {
            Ok(s) => s,
            Err(e) => {
                self.open_failed(&e);
                let _ = client.set_reset_on_close();
                return;
            }
        };
        // The client's first bytes go out right behind `open`; the agent's answer leads the
        // way back.
        let answer = async {
            let mut reader = FrameReader::new();
            match handshake::read_answer(&stream, &mut reader).await {
                Ok(()) => Ok(reader.into_leftover()),
                Err(e @ OpenError::Refused(_)) => {
                    debug!("agent {e}");
                    Err(Outcome::PeerReset)
                }
                Err(e) => {
                    self.open_failed(&e);
                    Err(Outcome::PeerVanished)
                }
            }
        };
        let outcome = relay::relay_after(&client, &stream, answer, &stats.bytes, token).await;
        match outcome {
            Outcome::ProtocolError => warn!("agent broke the stream protocol; connection reset"),
            _ => debug!(?outcome, "connection finished"),
        }
    }
}

impl PortForward {
    /// Makes its TCP listeners refuse new connections now (Linux: `shutdown` of a listening
    /// socket unhashes it at once; its accept loop then ends). Under load the accept loops may
    /// run only milliseconds after their stop, and a desktop client connecting meanwhile would
    /// be accepted and then reset instead of refused. Elsewhere the loops' stop closes them.
    fn stop_listening(&mut self) {
        for listener in self.listeners.drain(..) {
            #[cfg(target_os = "linux")]
            let _ = socket2::SockRef::from(&*listener).shutdown(std::net::Shutdown::Read);
            #[cfg(not(target_os = "linux"))]
            drop(listener);
        }
    }

    /// Why some address of the scope does not listen, if one does not.
    fn missing_reason(&self) -> Option<String> {
        let reasons: Vec<&str> = self.missing.iter().map(|(_, r)| r.as_str()).collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// A forward with no sockets (ignored or disabled).
    fn idle(port: u16, state: PortState, stats: Arc<ForwardStats>) -> Self {
        PortForward {
            host_port: port,
            bind: BindScope::Loopback,
            state,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            listeners: Vec::new(),
            stats,
            bound: Vec::new(),
            missing: Vec::new(),
        }
    }

    /// Whether this forward already is what `want` asks for (a conflict counts: it retries).
    fn matches(&self, want: &Wanted) -> bool {
        match (want, &self.state) {
            (Wanted::Forward { host_port, bind }, PortState::Forwarding | PortState::Conflict(_)) => {
                *host_port == self.host_port && *bind == self.bind
            }
            (Wanted::Ignored, PortState::Ignored) => true,
            (Wanted::Disabled(a), PortState::Disabled(b)) => a == b,
            _ => false,
        }
    }
}

/// What the settings want for a guest port.
fn wanted(settings: &Settings, (proto, guest_port): (Proto, u16)) -> Wanted {
    if !settings.enabled {
        return Wanted::Disabled("host networking is off".to_owned());
    }
    if proto == Proto::Udp && !settings.udp {
        return Wanted::Disabled("UDP forwarding is off".to_owned());
    }
    match settings.host_port_for(guest_port) {
        None => Wanted::Ignored,
        Some(host_port) => Wanted::Forward { host_port, bind: settings.bind },
    }
}

/// The host addresses a bind scope listens on.
pub fn bind_addrs(scope: BindScope) -> [IpAddr; 2] {
    match scope {
        BindScope::Loopback => [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)],
        BindScope::All => [IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
    }
}

/// A host socket serving one forwarded port on one address.
enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// A socket like any server's: IPv6 sockets IPv6-only (the IPv4 one is separate); TCP
/// prepared as this platform's servers are (`SO_REUSEADDR` on Unix so TIME_WAIT does not block
/// a rebind, `SO_EXCLUSIVEADDRUSE` on Windows so no program can take the port over); UDP with
/// a large receive buffer.
fn bind(proto: Proto, addr: SocketAddr) -> io::Result<Bound> {
    let ty = match proto {
        Proto::Tcp => Type::STREAM,
        Proto::Udp => Type::DGRAM,
    };
    let socket = hostnet_net::own::socket(addr, ty)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    match proto {
        Proto::Tcp => {
            hostnet_net::sys::prepare_listener(&socket)?;
            socket.bind(&addr.into())?;
            socket.listen(LISTEN_BACKLOG)?;
            Ok(Bound::Tcp(TcpListener::from_std(socket.into())?))
        }
        Proto::Udp => {
            let _ = socket.set_recv_buffer_size(hostnet_net::udp::UDP_SOCKET_BUFFER);
            hostnet_net::sys::prepare_udp_server(&socket)?;
            socket.bind(&addr.into())?;
            Ok(Bound::Udp(UdpSocket::from_std(socket.into())?))
        }
    }
}

fn describe_bind_error(proto: Proto, ip: IpAddr, port: u16, e: &io::Error, name_holder: bool) -> String {
    let at = SocketAddr::new(ip, port);
    // What this OS says about the cause (Windows: an excluded port range; low ports), once per
    // port: on Windows it asks `netsh`.
    if name_holder {
        if let Some(why) = hostnet_net::platform::explain_bind_error(proto, at, e) {
            return format!("{why}; the forward is not active");
        }
    }
    match e.kind() {
        io::ErrorKind::AddrInUse => {
            let holder = if name_holder { hostnet_net::platform::port_holder(proto, port) } else { None };
            let who = holder.map(|h| format!("by {h}")).unwrap_or_else(|| "by another program".to_owned());
            format!(
                "{proto} port {port} is already in use on the host ({at}) {who}; the forward will start when it frees up"
            )
        }
        io::ErrorKind::PermissionDenied => format!(
            "binding {at} needs privileges on this host (ports below 1024 are restricted); the forward is not active"
        ),
        _ => format!("cannot listen on {at}: {e}"),
    }
}
