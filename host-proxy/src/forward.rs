//! The host's mirror of the guest's listeners: for every guest port, host sockets on the
//! settings' bind addresses (`127.0.0.1` and `::1` unless the user opted in to all), and one
//! data stream to the agent per accepted connection or UDP flow. The settings decide which
//! guest ports are forwarded, to which host port, and whether anything is forwarded at all.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use hostnet_admin::{Direction, ForwardState};
use hostnet_net::RawStream;
use hostnet_net::accept::next_accepted;
use hostnet_net::discovery::own::OwnSockets;
use hostnet_net::local::{LocalListener, LocalTcp};
use hostnet_net::relay::open::open_and_relay;
use hostnet_net::relay::socket::UdpSocket;
use hostnet_net::relay::tcp::Outcome;
use hostnet_net::transport::handshake::OpenError;
use hostnet_protocol::{Listener, ListenerSet, Open, Proto};
use socket2::Type;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::serving::{ForwardStats, Serving};
use crate::settings::{BindScope, Settings};

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
    /// Not forwarded: a limit on what the guest may take on the desktop (`[limits]`).
    Limited(String),
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
            PortState::Limited(r) => (ForwardState::Limited, Some(r.clone())),
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
    /// Its TCP listeners (a second descriptor of each; their accept loops, on the relay
    /// threads, have the first): when the port closes they stop listening at once, without
    /// waiting for those tasks to run.
    listeners: Vec<std::net::TcpListener>,
    stats: Arc<ForwardStats>,
    /// Host addresses listening now.
    bound: Vec<IpAddr>,
    /// Addresses of the scope another program holds, and why (only while binding: a port
    /// held on any address is not forwarded at all).
    missing: Vec<(IpAddr, String)>,
    /// A TCP conflict's bridge ([`crate::bridge`]): the desktop server's other loopback family.
    bridge: Option<Arc<crate::bridge::Note>>,
}

/// What the settings want for one guest port.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wanted {
    Forward { host_port: u16, bind: BindScope },
    Ignored,
    Disabled(String),
    Limited(String),
}

struct Table {
    guest: ListenerSet,
    settings: Arc<Settings>,
    ports: BTreeMap<(Proto, u16), PortForward>,
    /// The desktop's ephemeral port range (where its outgoing connections get their ports).
    ephemeral: RangeInclusive<u16>,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            guest: ListenerSet::new(),
            settings: Arc::default(),
            ports: BTreeMap::new(),
            ephemeral: ephemeral_port_range(),
        }
    }
}

impl Table {
    /// What the settings and limits want for every guest port. Ports that hold a host port
    /// now (forwarding, or in conflict) keep their place under the limits.
    fn wanted(&self) -> BTreeMap<(Proto, u16), Wanted> {
        let holding: BTreeSet<(Proto, u16)> = self
            .ports
            .iter()
            .filter(|(_, f)| matches!(f.state, PortState::Forwarding | PortState::Conflict(_)))
            .map(|(k, _)| *k)
            .collect();
        plan(&self.guest.ports(), &self.settings, self.ephemeral.clone(), &holding)
    }

    /// Every forward as [`actions`] sees it.
    fn shapes(&self) -> BTreeMap<(Proto, u16), Shape<'_>> {
        self.ports.iter().map(|(k, f)| (*k, f.shape())).collect()
    }
}

/// The desktop's ephemeral port range: Linux's `ip_local_port_range` (default 32768–60999),
/// elsewhere the IANA range macOS and Windows use, 49152–65535.
pub fn ephemeral_port_range() -> RangeInclusive<u16> {
    const IANA: RangeInclusive<u16> = 49152..=65535;
    #[cfg(target_os = "linux")]
    {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
        let mut nums = text.split_whitespace().filter_map(|n| n.parse::<u16>().ok());
        match (nums.next(), nums.next()) {
            (Some(first), Some(last)) if first <= last => first..=last,
            _ => IANA,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        IANA
    }
}

/// The ports ([`Forwards::name_holders`]) waiting for their holder's name: `(guest key, host port)`.
#[derive(Debug, Default)]
struct Naming {
    waiting: BTreeSet<((Proto, u16), u16)>,
    running: bool,
}

/// How long closing a forward may take before its replacement binds anyway.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// The forwarding table; what its ports' servers share is [`Serving`].
#[derive(Clone)]
pub struct Forwards {
    table: Arc<Mutex<Table>>,
    /// Held for a whole reconcile: the settings task and the link task never reconcile at once.
    reconciling: Arc<tokio::sync::Mutex<()>>,
    /// Conflicting ports whose holder is still to be named, and whether a task is naming them.
    naming: Arc<Mutex<Naming>>,
    pub(crate) serving: Serving,
}

impl std::fmt::Debug for Forwards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwards").field("connector", &self.serving.connector.to_string()).finish()
    }
}

impl Forwards {
    /// An empty table whose ports will be served with `serving`.
    pub fn new(serving: Serving) -> Self {
        Forwards { table: Arc::default(), reconciling: Arc::default(), naming: Arc::default(), serving }
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
                self.serving.close_connections();
            }
        }
        self.reconcile().await;
    }

    /// Every guest port's forward, for `status`.
    pub fn status(&self) -> Vec<ForwardStatus> {
        let t = self.lock();
        t.ports
            .iter()
            .map(|(&(proto, guest_port), f)| {
                let (state, reason) = f.state.label();
                let reason = reason.or_else(|| f.missing_reason());
                let reason = match (reason, f.bridge.as_ref().and_then(|b| b.describe())) {
                    (Some(r), Some(b)) => Some(format!("{r}; {b}")),
                    (r, b) => r.or(b),
                };
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
        {
            let mut t = self.lock();
            *self.serving.targets() = guest.clone();
            t.guest = guest;
        }
        self.reconcile().await;
    }

    pub async fn add(&self, listeners: &[Listener]) {
        {
            let mut t = self.lock();
            t.guest.extend(listeners.iter().copied());
            self.serving.targets().extend(listeners.iter().copied());
        }
        self.reconcile().await;
    }

    pub async fn remove(&self, listeners: &[Listener]) {
        {
            let mut t = self.lock();
            let mut targets = self.serving.targets();
            for l in listeners {
                t.guest.remove(l);
                targets.remove(l);
            }
        }
        self.reconcile().await;
    }

    /// Number of guest listeners known and host ports forwarding.
    pub fn counts(&self) -> (usize, usize) {
        let t = self.lock();
        let forwarding = t.ports.values().filter(|p| p.state == PortState::Forwarding).count();
        (t.guest.len(), forwarding)
    }

    /// Tries again to bind ports that were held by another program, if the settings say to
    /// (`take_freed_ports`): otherwise a port the desktop held stays the desktop's, so a
    /// desktop server that restarts finds its port free. Says so when one frees up, and stays
    /// quiet otherwise.
    pub fn retry_conflicts(&self) {
        let mut t = self.lock();
        if !t.settings.take_freed_ports {
            return;
        }
        // A bridge listening means the desktop server still holds the port: nothing to retry.
        let conflicted: Vec<_> = t
            .ports
            .iter()
            .filter(|(_, p)| {
                matches!(p.state, PortState::Conflict(_))
                    && p.bridge.as_ref().is_none_or(|b| b.route().is_none())
            })
            .map(|(k, p)| (*k, p.host_port, p.bind, p.stats.clone()))
            .collect();
        for ((proto, guest_port), host_port, bind, stats) in conflicted {
            // Quietly: the reason found the first time stands while the port stays taken (the
            // old forward, with its bridge's watch, stays) — so it is not worked out again
            // (on Windows that would run `netsh` under the table's lock at every retry).
            let fwd = self.start_port(proto, guest_port, host_port, bind, stats, Reason::Quiet);
            if fwd.state == PortState::Forwarding {
                info!(port = host_port, "host port {host_port} is free now");
                if let Some(old) = t.ports.insert((proto, guest_port), fwd) {
                    old.stop.cancel();
                }
            }
        }
    }

    /// Brings the host sockets in line with the guest set and the settings: first closes what
    /// must go and waits for those sockets to be really closed (a forward that moves to another
    /// bind scope would otherwise collide with itself), then opens what is missing.
    async fn reconcile(&self) {
        let _one_at_a_time = self.reconciling.lock().await;
        let closing: Vec<TaskTracker> = {
            let mut t = self.lock();
            let steps = actions(&t.shapes(), &t.wanted());
            let mut closing = Vec::new();
            for step in steps {
                let Action::Close(key) = step else { continue };
                let Some(mut fwd) = t.ports.remove(&key) else { continue };
                fwd.stop.cancel();
                fwd.stop_listening();
                fwd.tasks.close();
                closing.push(fwd.tasks.clone());
                if fwd.state == PortState::Forwarding {
                    info!(proto = %key.0, port = fwd.host_port, "host port closed");
                }
            }
            closing
        };
        for tasks in closing {
            let _ = tokio::time::timeout(CLOSE_WAIT, tasks.wait()).await;
        }
        let mut to_name = Vec::new();
        let mut t = self.lock();
        // The guest or the settings may have moved on while the closes were waited for: what
        // that changed is the next reconcile's (it is queued behind this one).
        let steps = actions(&t.shapes(), &t.wanted());
        for step in steps {
            let Action::Open(key, want) = step else { continue };
            if t.ports.contains_key(&key) {
                continue;
            }
            let (proto, guest_port) = key;
            let stats = Arc::new(ForwardStats::default());
            let take_freed = t.settings.take_freed_ports;
            let fwd = match want {
                Wanted::Forward { host_port, bind } => {
                    let mut fwd = self.start_port(
                        proto,
                        guest_port,
                        host_port,
                        bind,
                        stats,
                        Reason::Full { take_freed },
                    );
                    if proto == Proto::Tcp && matches!(fwd.state, PortState::Conflict(_)) {
                        fwd.bridge = Some(crate::bridge::spawn(
                            &self.serving,
                            host_port,
                            fwd.stop.clone(),
                            &fwd.tasks,
                        ));
                    }
                    if let PortState::Conflict(reason) = &fwd.state {
                        if reason.contains(ANOTHER_PROGRAM) {
                            to_name.push((key, host_port));
                        } else {
                            warn!(port = host_port, "{reason}");
                        }
                    }
                    fwd
                }
                Wanted::Ignored => PortForward::idle(guest_port, PortState::Ignored, stats),
                Wanted::Disabled(why) => PortForward::idle(guest_port, PortState::Disabled(why), stats),
                Wanted::Limited(why) => {
                    debug!(proto = %proto, port = guest_port, "not forwarded: {why}");
                    PortForward::idle(guest_port, PortState::Limited(why), stats)
                }
            };
            t.ports.insert(key, fwd);
        }
        drop(t);
        if !to_name.is_empty() {
            self.name_holders(to_name);
        }
    }

    /// Names the programs holding conflicting host ports, off the table's lock and the
    /// runtime's workers (it walks every process's descriptors), then puts the names in the
    /// ports' reasons and logs them. One walk at a time, by one task, from a set of the ports
    /// waiting: a guest flapping a listener on a held port queues that port once, not a walk
    /// per flap, and a port no longer in conflict when its turn comes is skipped.
    fn name_holders(&self, ports: Vec<((Proto, u16), u16)>) {
        {
            let mut naming = self.naming.lock().unwrap_or_else(|p| p.into_inner());
            naming.waiting.extend(ports);
            if naming.running || naming.waiting.is_empty() {
                return;
            }
            naming.running = true;
        }
        let this = self.clone();
        self.serving.tracker.spawn(async move {
            loop {
                let next = {
                    let mut naming = this.naming.lock().unwrap_or_else(|p| p.into_inner());
                    let next =
                        if this.serving.shutdown.is_cancelled() { None } else { naming.waiting.pop_first() };
                    naming.running = next.is_some();
                    next
                };
                let Some(((proto, guest_port), host_port)) = next else { return };
                let in_conflict = |t: &Table| {
                    t.ports.get(&(proto, guest_port)).is_some_and(|f| {
                        f.host_port == host_port && matches!(f.state, PortState::Conflict(_))
                    })
                };
                if !in_conflict(&this.lock()) {
                    continue;
                }
                let holder = tokio::task::spawn_blocking(move || {
                    hostnet_net::discovery::platform::port_holder(proto, host_port)
                })
                .await
                .ok()
                .flatten();
                let mut t = this.lock();
                if !in_conflict(&t) {
                    continue;
                }
                if let Some(PortForward { state: PortState::Conflict(reason), .. }) =
                    t.ports.get_mut(&(proto, guest_port))
                {
                    if let Some(h) = &holder {
                        *reason = reason.replace(ANOTHER_PROGRAM, &format!("by {h}"));
                    }
                    warn!(port = host_port, "{reason}");
                }
            }
        });
    }

    /// Binds `host_port` on the bind scope's addresses and starts serving it — on all of
    /// them or none: a port the desktop holds on one family is the desktop's (`localhost`
    /// clients try `::1` first; a mirror there would take the desktop's URL to the guest).
    fn start_port(
        &self,
        proto: Proto,
        guest_port: u16,
        host_port: u16,
        bind_scope: BindScope,
        stats: Arc<ForwardStats>,
        reason: Reason,
    ) -> PortForward {
        let stop = self.serving.shutdown.child_token();
        let mut bound = Vec::new();
        let mut missing = Vec::new();
        for ip in bind_addrs(bind_scope) {
            match bind(proto, SocketAddr::new(ip, host_port), &self.serving.own) {
                Ok(l) => bound.push((ip, l)),
                Err(e) if ip.is_ipv6() && e.kind() == io::ErrorKind::AddrNotAvailable => {
                    debug!(port = host_port, "no IPv6 on this host; forwarding on IPv4 only");
                }
                Err(e) => missing.push((
                    ip,
                    describe_bind_error(proto, ip, host_port, &e, matches!(reason, Reason::Full { .. })),
                )),
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
            bridge: None,
        };
        if bound.is_empty() || !fwd.missing.is_empty() {
            // Sockets bound on the other family close here (dropped unserved).
            drop(bound);
            fwd.bound.clear();
            let then = if matches!(reason, Reason::Full { take_freed: true }) {
                "the forward will start when it frees up"
            } else {
                "the port stays this desktop's, so the guest's port is not forwarded on any address \
                 (take_freed_ports = true in the settings forwards it once the desktop frees it)"
            };
            fwd.state = PortState::Conflict(format!("{}; {then}", fwd.missing_reason().unwrap_or_default()));
            fwd.missing.clear();
            return fwd;
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
        // Registered on the relay thread that runs its loop, so that thread's reactor wakes it
        // and what it accepts or receives starts there (a UDP port's flows and their streams
        // too).
        let serve: Pin<Box<dyn Future<Output = ()> + Send>> = match socket {
            Bound::Tcp(l) => {
                match l.try_clone() {
                    Ok(second) => fwd.listeners.push(second),
                    Err(e) => debug!("the listener closes with its accept loop only: {e}"),
                }
                Box::pin(async move {
                    match LocalListener::from_std(l) {
                        Ok(l) => this.accept_loop(l, guest_port, stop, stats).await,
                        Err(e) => warn!(port = guest_port, "cannot serve a listener: {e}"),
                    }
                })
            }
            Bound::Udp(s) => Box::pin(async move {
                match UdpSocket::from_std(s) {
                    Ok(s) => crate::udp::serve(this.serving, s, guest_port, stop, stats).await,
                    Err(e) => warn!(port = guest_port, "cannot serve a UDP socket: {e}"),
                }
            }),
        };
        let tracked = self.serving.tracker.track_future(fwd.tasks.track_future(serve));
        self.serving.relay.spawn_loop(tracked);
    }

    async fn accept_loop(
        self,
        listener: LocalListener,
        port: u16,
        stop: CancellationToken,
        stats: Arc<ForwardStats>,
    ) {
        let what = format!("a connection on port {port}");
        // Until the port closes (its listener shut down, its stop fired).
        while let Some((client, peer)) = next_accepted(|| listener.accept(), &stop, &what).await {
            let Ok(permit) = self.serving.connections.clone().try_acquire_owned() else {
                // Reset at once (the drop closes it), counted; logged at 1, 2, 4, 8… so a
                // storm cannot flood the log.
                let _ = client.set_reset_on_close();
                stats.refused.fetch_add(1, Ordering::Relaxed);
                if let Some(refused) = self.serving.count_refused() {
                    warn!(
                        port,
                        %peer,
                        "{} connections open, the limit: resetting new ones ({refused} refused so far)",
                        self.serving.limits.connections
                    );
                }
                continue;
            };
            let this = self.clone();
            // At debug level: a span at the default level has its fields formatted (a
            // `String` per connection, ~10 % of the proxy's instructions per connection), for
            // events that at that level never come; the few warnings name the port themselves.
            let span = debug_span!("conn", port, %peer);
            let (guard, stats, token) = (stats.open(), stats.clone(), self.serving.connection_token());
            self.serving.relay.spawn_connection(client, &self.serving.tracker, move |client| {
                async move {
                    this.serve(client, peer, port, &stats, &token).await;
                    drop((guard, permit));
                }
                .instrument(span)
            });
        }
    }

    /// One host client: open a data stream, ask the agent to connect, relay.
    async fn serve(
        &self,
        client: LocalTcp,
        peer: SocketAddr,
        port: u16,
        stats: &ForwardStats,
        token: &CancellationToken,
    ) {
        #[cfg(not(target_os = "linux"))]
        let _ = client.set_nodelay(true);
        // The mirror's family (its IPv6 sockets are IPv6-only), without asking the socket.
        let client_v6 = peer.is_ipv6();
        let Some(target) = self.serving.target_for(Proto::Tcp, port, client_v6) else {
            debug!("no guest listener any more: resetting");
            let _ = client.set_reset_on_close();
            return;
        };
        let stream = match self.serving.connector.connect().await {
            Ok(s) => s,
            Err(e) => {
                self.serving.open_failed(&e);
                let _ = client.set_reset_on_close();
                return;
            }
        };
        // Our preface and `open` go out in one write with the client's first bytes; the agent's
        // answer comes with the guest server's first bytes and leads the way back.
        let open = Open::Tcp { addr: target, port, peer: Some(peer) };
        let broken = |e: &OpenError| self.serving.open_failed(e);
        let relayed = open_and_relay(client, stream, &open, broken, &stats.bytes, token).await;
        if let Some((stream, _)) = relayed.reusable {
            // Both directions ended with FIN: the next connection may use it.
            self.serving.connector.give_back(stream);
        }
        match relayed.outcome {
            Outcome::ProtocolError => warn!(port, %peer, "agent broke the stream protocol; connection reset"),
            _ => debug!(outcome = ?relayed.outcome, "connection finished"),
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
            let _ = socket2::SockRef::from(&listener).shutdown(std::net::Shutdown::Read);
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
            bridge: None,
        }
    }

    /// What [`actions`] needs to know of this forward.
    fn shape(&self) -> Shape<'_> {
        Shape { state: &self.state, host_port: self.host_port, bind: self.bind }
    }
}

/// A forward as [`actions`] sees it: no sockets, so the decision is tested without any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape<'a> {
    state: &'a PortState,
    host_port: u16,
    bind: BindScope,
}

impl Shape<'_> {
    /// Whether this forward already is what `want` asks for (a conflict counts: it is the
    /// port's answer until the guest port goes, or is retried with `take_freed_ports`).
    fn matches(&self, want: &Wanted) -> bool {
        match (want, self.state) {
            (Wanted::Forward { host_port, bind }, PortState::Forwarding | PortState::Conflict(_)) => {
                *host_port == self.host_port && *bind == self.bind
            }
            (Wanted::Ignored, PortState::Ignored) => true,
            (Wanted::Disabled(a), PortState::Disabled(b)) | (Wanted::Limited(a), PortState::Limited(b)) => {
                a == b
            }
            _ => false,
        }
    }
}

/// One step of a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// Close this guest port's forward: gone from the guest, or no longer what is wanted.
    Close((Proto, u16)),
    /// Give this guest port the forward wanted (after every close is done: a forward moving
    /// to another bind scope would otherwise collide with itself).
    Open((Proto, u16), Wanted),
}

/// The steps from the forwards now to the ones wanted: every close, then every open, each in
/// port order. Pure; the table's one reconcile at a time applies them.
fn actions(now: &BTreeMap<(Proto, u16), Shape<'_>>, wanted: &BTreeMap<(Proto, u16), Wanted>) -> Vec<Action> {
    let closes = now
        .iter()
        .filter(|(key, shape)| wanted.get(*key).is_none_or(|w| !shape.matches(w)))
        .map(|(key, _)| Action::Close(*key));
    let opens = wanted
        .iter()
        .filter(|(key, w)| now.get(*key).is_none_or(|shape| !shape.matches(w)))
        .map(|(key, w)| Action::Open(*key, w.clone()));
    closes.chain(opens).collect()
}

/// What the settings and the limits want for each of the guest's ports — a pure function,
/// tested without sockets. The limits (`[limits]` in the settings) keep the desktop its own:
/// at most `ports` host ports forwarded in all, and at most `ephemeral_ports` per protocol
/// inside the desktop's ephemeral range, so a guest listening on thousands of ports there
/// cannot leave the desktop's outgoing connections without a source port. Ports in `holding`
/// (bound now) keep their place; the others are taken in port order.
fn plan(
    guest: &BTreeSet<(Proto, u16)>,
    settings: &Settings,
    ephemeral: RangeInclusive<u16>,
    holding: &BTreeSet<(Proto, u16)>,
) -> BTreeMap<(Proto, u16), Wanted> {
    let limits = &settings.limits;
    let mut out = BTreeMap::new();
    let mut forward = Vec::new();
    for &key in guest {
        match wanted(settings, key) {
            w @ Wanted::Forward { .. } => forward.push((key, w)),
            other => {
                out.insert(key, other);
            }
        }
    }
    forward.sort_by_key(|(key, _)| (!holding.contains(key), *key));
    let mut total = 0usize;
    let mut in_ephemeral: BTreeMap<Proto, usize> = BTreeMap::new();
    for (key, w) in forward {
        let Wanted::Forward { host_port, .. } = w else { continue };
        if total >= limits.ports {
            out.insert(
                key,
                Wanted::Limited(format!(
                    "{} host ports are forwarded, the limit (limits.ports in the settings)",
                    limits.ports
                )),
            );
            continue;
        }
        if ephemeral.contains(&host_port) {
            let n = in_ephemeral.entry(key.0).or_default();
            if *n >= limits.ephemeral_ports {
                out.insert(key, Wanted::Limited(format!(
                    "host port {host_port} is in this desktop's ephemeral range ({}-{}), which keeps its ports for outgoing connections: {} {} ports there are forwarded, the limit (limits.ephemeral_ports in the settings)",
                    ephemeral.start(), ephemeral.end(), limits.ephemeral_ports, key.0
                )));
                continue;
            }
            *n += 1;
        }
        total += 1;
        out.insert(key, w);
    }
    out
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

/// How a conflict's reason names the holder until [`Forwards::name_holders`] knows better.
const ANOTHER_PROGRAM: &str = "by another program";

/// A host socket serving one forwarded port on one address.
enum Bound {
    /// Non-blocking, registered with no reactor yet: its accept loop's relay thread takes it.
    Tcp(std::net::TcpListener),
    /// The same, its receive loop's relay thread takes it.
    Udp(std::net::UdpSocket),
}

/// A socket like any server's: IPv6 sockets IPv6-only (the IPv4 one is separate); TCP
/// prepared as this platform's servers are (`SO_REUSEADDR` on Unix so TIME_WAIT does not block
/// a rebind, `SO_EXCLUSIVEADDRUSE` on Windows so no program can take the port over); UDP with
/// a large receive buffer.
fn bind(proto: Proto, addr: SocketAddr, own: &OwnSockets) -> io::Result<Bound> {
    let ty = match proto {
        Proto::Tcp => Type::STREAM,
        Proto::Udp => Type::DGRAM,
    };
    let socket = own.socket(addr, ty)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    match proto {
        Proto::Tcp => {
            hostnet_net::sys::prepare_listener(&socket)?;
            // Linux copies TCP_NODELAY to every connection accepted: one system call per port
            // instead of one per connection (elsewhere each connection sets it).
            #[cfg(target_os = "linux")]
            socket.set_tcp_nodelay(true)?;
            socket.bind(&addr.into())?;
            socket.listen(LISTEN_BACKLOG)?;
            socket.set_nonblocking(true)?;
            Ok(Bound::Tcp(socket.into()))
        }
        Proto::Udp => {
            hostnet_net::relay::udp::size_receive_buffer(socket2::SockRef::from(&socket));
            hostnet_net::sys::prepare_udp_server(&socket)?;
            socket.bind(&addr.into())?;
            Ok(Bound::Udp(socket.into()))
        }
    }
}

/// How much a forward that fails to bind works out about why, for `status`.
#[derive(Debug, Clone, Copy)]
enum Reason {
    /// All of it: this OS's explanation of a refusal, and what happens next
    /// (`take_freed_ports`).
    Full { take_freed: bool },
    /// Nothing beyond the bind's error: a retry, whose reason is not shown (the first stands).
    Quiet,
}

/// Why binding `ip:port` failed, as `status` shows it. With `explain`, what this OS says about
/// the cause of a refusal (Windows: an excluded port range, read from `netsh`; low ports).
fn describe_bind_error(proto: Proto, ip: IpAddr, port: u16, e: &io::Error, explain: bool) -> String {
    let at = SocketAddr::new(ip, port);
    // Only for refusals (access errors), so a plain conflict costs nothing here.
    if explain && e.kind() != io::ErrorKind::AddrInUse {
        if let Some(why) = hostnet_net::discovery::platform::explain_bind_error(proto, at, e) {
            return why;
        }
    }
    match e.kind() {
        io::ErrorKind::AddrInUse => {
            // The holder's name comes later, off the accept path (`name_holders`).
            let who = ANOTHER_PROGRAM;
            format!("{proto} port {port} is already in use on the host ({at}) {who}")
        }
        io::ErrorKind::PermissionDenied => {
            format!("binding {at} needs privileges on this host (ports below 1024 are restricted)")
        }
        _ => format!("cannot listen on {at}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relayed connections run without Nagle's delay: on Linux the mirror's listener carries
    /// `TCP_NODELAY` and every accepted connection inherits it (no system call per connection).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn connections_accepted_on_a_mirror_have_nodelay() {
        let Bound::Tcp(listener) =
            bind(Proto::Tcp, "127.0.0.1:0".parse().unwrap(), &OwnSockets::new()).unwrap()
        else {
            panic!("not a TCP listener")
        };
        let listener = LocalListener::from_std(listener).unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    fn tcp_ports(ports: impl IntoIterator<Item = u16>) -> BTreeSet<(Proto, u16)> {
        ports.into_iter().map(|p| (Proto::Tcp, p)).collect()
    }

    fn forwarded(plan: &BTreeMap<(Proto, u16), Wanted>) -> Vec<u16> {
        plan.iter().filter(|(_, w)| matches!(w, Wanted::Forward { .. })).map(|(k, _)| k.1).collect()
    }

    const EPHEMERAL: RangeInclusive<u16> = 32768..=60999;

    #[test]
    fn a_guest_on_thousands_of_ephemeral_ports_gets_only_its_share_of_them() {
        let settings = Settings::default();
        let guest = tcp_ports((40_000..43_000).chain([8080, 9000]));
        let plan = plan(&guest, &settings, EPHEMERAL, &BTreeSet::new());
        let ok = forwarded(&plan);
        assert_eq!(ok.len(), 2 + settings.limits.ephemeral_ports, "two outside the range + the share");
        assert!(ok.contains(&8080) && ok.contains(&9000));
        let limited: Vec<_> = plan
            .values()
            .filter_map(|w| match w {
                Wanted::Limited(why) => Some(why),
                _ => None,
            })
            .collect();
        assert_eq!(limited.len(), 3000 - settings.limits.ephemeral_ports);
        assert!(
            limited
                .iter()
                .all(|w| w.contains("ephemeral range (32768-60999)") && w.contains("limits.ephemeral_ports")),
            "{:?}",
            limited.first()
        );
        // UDP has its own ports, so its own share.
        let udp: BTreeSet<_> = (40_000..40_300).map(|p| (Proto::Udp, p)).collect();
        assert_eq!(forwarded(&plan_for(&udp, &settings)).len(), settings.limits.ephemeral_ports);
    }

    fn plan_for(guest: &BTreeSet<(Proto, u16)>, settings: &Settings) -> BTreeMap<(Proto, u16), Wanted> {
        plan(guest, settings, EPHEMERAL, &BTreeSet::new())
    }

    #[test]
    fn the_total_caps_every_port_and_forwards_that_hold_a_port_keep_their_place() {
        let mut settings = Settings::default();
        settings.limits.ports = 3;
        let guest = tcp_ports([1000, 2000, 3000, 4000, 5000]);
        assert_eq!(forwarded(&plan_for(&guest, &settings)), vec![1000, 2000, 3000]);
        // 4000 and 5000 were forwarding before 1000 and 2000 appeared: they stay.
        let holding = tcp_ports([4000, 5000]);
        assert_eq!(forwarded(&plan(&guest, &settings, EPHEMERAL, &holding)), vec![1000, 4000, 5000]);
        let why = match &plan_for(&guest, &settings)[&(Proto::Tcp, 5000)] {
            Wanted::Limited(why) => why.clone(),
            other => panic!("{other:?}"),
        };
        assert!(why.contains("limits.ports"), "{why}");
    }

    #[test]
    fn actions_close_what_changed_before_opening_and_leave_what_matches() {
        let (fwd, conflict, ignored) =
            (PortState::Forwarding, PortState::Conflict("held".into()), PortState::Ignored);
        let shape = |state, host_port, bind| Shape { state, host_port, bind };
        let key = |p| (Proto::Tcp, p);
        let loopback = |host_port| Wanted::Forward { host_port, bind: BindScope::Loopback };
        let now: BTreeMap<_, _> = [
            (key(1), shape(&fwd, 1, BindScope::Loopback)),      // stays
            (key(2), shape(&conflict, 2, BindScope::Loopback)), // a conflict is its answer: stays
            (key(3), shape(&fwd, 3, BindScope::Loopback)),      // moves to bind = all
            (key(4), shape(&fwd, 4, BindScope::Loopback)),      // the guest closed it
            (key(5), shape(&ignored, 5, BindScope::Loopback)),  // no longer ignored
            (key(6), shape(&fwd, 6, BindScope::Loopback)),      // remapped
        ]
        .into_iter()
        .collect();
        let wanted: BTreeMap<_, _> = [
            (key(1), loopback(1)),
            (key(2), loopback(2)),
            (key(3), Wanted::Forward { host_port: 3, bind: BindScope::All }),
            (key(5), loopback(5)),
            (key(6), loopback(6006)),
            (key(7), Wanted::Limited("over".into())),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            actions(&now, &wanted),
            vec![
                Action::Close(key(3)),
                Action::Close(key(4)),
                Action::Close(key(5)),
                Action::Close(key(6)),
                Action::Open(key(3), Wanted::Forward { host_port: 3, bind: BindScope::All }),
                Action::Open(key(5), loopback(5)),
                Action::Open(key(6), loopback(6006)),
                Action::Open(key(7), Wanted::Limited("over".into())),
            ]
        );
        let settled: BTreeMap<_, _> = [(key(1), shape(&fwd, 1, BindScope::Loopback))].into_iter().collect();
        assert_eq!(actions(&settled, &[(key(1), loopback(1))].into_iter().collect()), vec![]);
    }

    #[test]
    fn remapped_ports_count_where_they_land_and_ignored_ones_take_nothing() {
        let mut settings = Settings::default();
        settings.limits.ephemeral_ports = 1;
        settings.remap.insert("8080".into(), 40_000);
        settings.ignore_ports = vec!["40001".parse().unwrap()];
        let plan = plan_for(&tcp_ports([8080, 40_001, 40_002]), &settings);
        assert_eq!(
            plan[&(Proto::Tcp, 8080)],
            Wanted::Forward { host_port: 40_000, bind: BindScope::Loopback }
        );
        assert_eq!(plan[&(Proto::Tcp, 40_001)], Wanted::Ignored);
        assert!(matches!(plan[&(Proto::Tcp, 40_002)], Wanted::Limited(_)), "{plan:?}");
    }
}
