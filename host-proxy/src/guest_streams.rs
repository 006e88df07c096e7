//! Guest→host: the desktop's own listeners are advertised to the agent, and the streams the
//! agent opens for intercepted guest connections are served here — only to loopback ports
//! that are advertised right now.
//!
//! What is advertised is what the guest→host policy ([`crate::policy`]) allows: this user's
//! listeners on `127.0.0.1`/`::1`/wildcards, unprivileged ports, the allow and deny lists.
//! Every stream is checked against that set, so a guest process that speaks the protocol
//! itself (vsock is not namespaced in the VM) reaches nothing more than the agent would.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hostnet_net::accept::next_accepted;
use hostnet_net::connect::connect_tcp;
use hostnet_net::discovery::own::OwnSockets;
use hostnet_net::discovery::{source, watcher};
use hostnet_net::relay::open::{answer_and_relay, refuse};
use hostnet_net::relay::udp;
use hostnet_net::tally::Tally;
use hostnet_net::threads::RelayThreads;
use hostnet_net::transport::handshake::{self, FrameReader};
use hostnet_net::transport::hyperv::{self, Guid};
use hostnet_net::{Acceptor, TransportSpec, TransportStream};
use hostnet_protocol::{Listener, ListenerSet, Open, Proto, ShowPeer};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, info, info_span, warn};

use crate::HOST_POLL_INTERVAL;
use crate::policy::{self, Decision, Withheld};
use crate::serving::ForwardStats;
use crate::settings::Settings;

/// What the guest→host side shares with `status`.
#[derive(Debug, Clone)]
pub struct ToHost {
    /// The desktop listeners the guest may reach: what is advertised and served.
    pub advertised: watch::Receiver<Arc<ListenerSet>>,
    /// The desktop listeners it may not, each with why.
    pub withheld: watch::Receiver<Arc<BTreeMap<Listener, Withheld>>>,
    /// Streams closed at once because [`crate::limits::MAX_GUEST_STREAMS`] (or the configured limit) were open.
    pub streams_refused: Arc<Tally>,
    /// Streams refused because they came from a peer other than the VM.
    pub foreign_refused: Arc<Tally>,
    /// The VM, when the transport tells peers apart.
    pub guest_vm: Option<VmIdentity>,
    /// The limit in force.
    pub max_streams: usize,
}

impl ToHost {
    /// Guest→host off: nothing advertised, nothing withheld.
    pub fn off() -> ToHost {
        ToHost {
            advertised: watch::channel(Arc::new(ListenerSet::new())).1,
            withheld: watch::channel(Arc::default()).1,
            streams_refused: Arc::default(),
            foreign_refused: Arc::default(),
            guest_vm: None,
            max_streams: 0,
        }
    }
}

/// The VM the proxy serves, as a transport that tells peers apart names it: where the agent is
/// reached (`--transport`) says which VM guest→host streams (`--listen`) may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmIdentity {
    /// `vsock:CID:PORT`: the VM's context id.
    VsockCid(u32),
    /// `hyperv:VMID:PORT`: the VM's Hyper-V id.
    HyperV(Guid),
}

impl VmIdentity {
    /// The VM `agent` (the `--transport` spec) names, if it names one.
    pub fn of(agent: &TransportSpec) -> Option<VmIdentity> {
        match agent {
            TransportSpec::Vsock { cid, .. } if *cid != hostnet_net::transport::VSOCK_CID_ANY => {
                Some(VmIdentity::VsockCid(*cid))
            }
            TransportSpec::HyperV { vm_id, .. } if *vm_id != hyperv::WILDCARD => {
                Some(VmIdentity::HyperV(*vm_id))
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for VmIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmIdentity::VsockCid(cid) => write!(f, "vsock CID {cid}"),
            VmIdentity::HyperV(id) => write!(f, "Hyper-V VM {id}"),
        }
    }
}

/// Whether a stream from `peer` (as the transport names it: `vsock:CID:PORT`,
/// `hyperv:VMID:PORT`) may be the VM's: only from the VM's CID or VM id (`vsock:any:PORT` and
/// `hyperv:any:PORT` listen for every VM, and vsock for the host's own processes too); other
/// transports do not tell peers apart.
fn from_the_vm(peer: &str, vm: Option<VmIdentity>) -> bool {
    let first = |rest: &str| rest.split(':').next().map(str::to_owned);
    match vm {
        Some(VmIdentity::VsockCid(cid)) => match peer.strip_prefix("vsock:") {
            Some(rest) => first(rest).and_then(|c| c.parse::<u32>().ok()) == Some(cid),
            None => !peer.starts_with("hyperv:"),
        },
        Some(VmIdentity::HyperV(id)) => match peer.strip_prefix("hyperv:") {
            // A GUID has no ':' in it.
            Some(rest) => first(rest).and_then(|g| g.parse::<Guid>().ok()) == Some(id),
            None => !peer.starts_with("vsock:"),
        },
        None => true,
    }
}

/// Refuses a guest→host endpoint other machines could reach: `tcp:` beyond loopback only
/// when `beyond_loopback` says the user asked for it (`--listen-beyond-loopback`).
pub fn check_listen(spec: &TransportSpec, beyond_loopback: bool) -> Result<(), String> {
    match spec {
        TransportSpec::Tcp(addr) if !addr.ip().is_loopback() && !beyond_loopback => Err(format!(
            "--listen {spec} would let other machines on the network open guest→host streams to \
             this desktop's servers; use a loopback address (tcp:127.0.0.1:PORT), a vsock or Unix \
             socket, or add --listen-beyond-loopback if that is what you want"
        )),
        _ => Ok(()),
    }
}

/// Starts watching the desktop's listeners and serving the agent's guest→host streams.
/// Advertises the desktop's listeners the policy allows while the settings allow guest→host,
/// else nothing (and nothing if either part cannot start). `own` is the proxy's registry of its
/// own sockets (the mirrors): the watch of the desktop leaves them out.
#[expect(clippy::too_many_arguments, reason = "each is a separate part of the proxy this joins")]
pub async fn start(
    listen: &TransportSpec,
    settings: watch::Receiver<Arc<Settings>>,
    stats: ToHostStats,
    max_streams: usize,
    guest_vm: Option<VmIdentity>,
    own: &OwnSockets,
    relay: &Arc<RelayThreads>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> ToHost {
    let raw = match watcher::platform_source().and_then(|src| {
        watcher::spawn_found(
            src,
            watcher::Trigger::best(HOST_POLL_INTERVAL),
            own.clone(),
            tracker,
            shutdown.clone(),
        )
    }) {
        Ok(rx) => rx,
        Err(e) => {
            warn!("guest→host is off: cannot read this machine's listening sockets: {e}");
            return ToHost::off();
        }
    };
    // The acceptor is bound on the relay thread that runs its loop (so that thread's reactor
    // wakes it, and the streams it accepts are relayed there: `hostnet_net::threads`); the loop
    // waits for what it checks streams against.
    let bind = {
        let (listen, own) = (listen.clone(), own.clone());
        async move { listen.bind(&own).await }
    };
    let shutdown_for_loop = shutdown.clone();
    let start = match relay
        .bind_loop(tracker, bind, move |acceptor, serve: AcceptLoop| async move {
            serve.run(acceptor, &shutdown_for_loop).await;
        })
        .await
    {
        Ok(start) => start,
        Err(e) => {
            warn!("guest→host is off: {e}");
            return ToHost::off();
        }
    };
    info!(%listen, "serving guest→host connections");
    let (advertised, withheld) = advertised(raw, settings, tracker, shutdown);
    let to_host = ToHost {
        advertised,
        withheld,
        streams_refused: Arc::default(),
        foreign_refused: Arc::default(),
        guest_vm,
        max_streams: max_streams.max(1),
    };
    let _ = start.send(AcceptLoop {
        streams: Arc::new(Semaphore::new(to_host.max_streams)),
        max_streams,
        host: to_host.advertised.clone(),
        refused: to_host.streams_refused.clone(),
        foreign: to_host.foreign_refused.clone(),
        guest_vm,
        stats,
        own: own.clone(),
        relay: relay.clone(),
        tracker: tracker.clone(),
    });
    to_host
}

/// What the guest→host accept loop checks each stream against and serves it with.
struct AcceptLoop {
    streams: Arc<Semaphore>,
    max_streams: usize,
    host: watch::Receiver<Arc<ListenerSet>>,
    refused: Arc<Tally>,
    foreign: Arc<Tally>,
    guest_vm: Option<VmIdentity>,
    stats: ToHostStats,
    own: OwnSockets,
    relay: Arc<RelayThreads>,
    tracker: TaskTracker,
}

impl AcceptLoop {
    async fn run(self, acceptor: Box<dyn Acceptor>, shutdown: &CancellationToken) {
        while let Some((stream, peer)) =
            next_accepted(|| acceptor.accept(), shutdown, "a guest→host stream").await
        {
            if !from_the_vm(&peer, self.guest_vm) {
                if let Some(n) = self.foreign.one_more() {
                    warn!(%peer, "refused a guest→host stream from a peer that is not the VM ({n} so far)");
                }
                continue;
            }
            let Ok(permit) = self.streams.clone().try_acquire_owned() else {
                // Closed at once (the drop), counted; logged at 1, 2, 4, 8…
                if let Some(n) = self.refused.one_more() {
                    warn!(
                        "{} guest→host streams open, the limit: closing new ones ({n} so far)",
                        self.max_streams
                    );
                }
                continue;
            };
            let (host, shutdown, stats, own) =
                (self.host.clone(), shutdown.clone(), self.stats.clone(), self.own.clone());
            self.relay.spawn_connection(stream, &self.tracker, move |stream| async move {
                serve(stream, host, stats, own, shutdown).await;
                drop(permit);
            });
        }
    }
}

/// Live counts of guest→host traffic per desktop port, for `status`.
pub type ToHostStats = Arc<Mutex<HashMap<(Proto, u16), Arc<ForwardStats>>>>;

fn stats_for(stats: &ToHostStats, proto: Proto, port: u16) -> Arc<ForwardStats> {
    stats.lock().unwrap_or_else(|p| p.into_inner()).entry((proto, port)).or_default().clone()
}

/// The policy applied to the desktop's listeners: what the guest may reach, and the rest with
/// why. Nothing at all while host networking or guest→host is off.
pub fn offer(found: &[source::Found], settings: &Settings) -> (ListenerSet, BTreeMap<Listener, Withheld>) {
    let mut offered = BTreeSet::new();
    let mut withheld = BTreeMap::new();
    if !(settings.enabled && settings.guest_to_host) {
        return (ListenerSet::new(), withheld);
    }
    for f in found {
        match policy::decide(&f.listener, f.is_this_users(), &settings.guest_to_host_policy) {
            Decision::Allowed => {
                offered.insert(f.listener);
            }
            Decision::Denied(why) => {
                withheld.insert(f.listener, why);
            }
        }
    }
    // A listener allowed once (two sockets on one address, one of them ours to offer) is offered.
    withheld.retain(|l, _| !offered.contains(l));
    (offered.into_iter().collect(), withheld)
}

/// The desktop's listeners as far as the settings let the guest reach them, and the others.
#[allow(clippy::type_complexity)]
fn advertised(
    mut raw: watch::Receiver<Arc<Vec<source::Found>>>,
    mut settings: watch::Receiver<Arc<Settings>>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> (watch::Receiver<Arc<ListenerSet>>, watch::Receiver<Arc<BTreeMap<Listener, Withheld>>>) {
    let (set, why) = offer(&raw.borrow_and_update(), &settings.borrow_and_update());
    let (tx, rx) = watch::channel(Arc::new(set));
    let (why_tx, why_rx) = watch::channel(Arc::new(why));
    let stop = shutdown.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = raw.changed() => if r.is_err() { return },
                r = settings.changed() => if r.is_err() { return },
            }
            let (next, why) = offer(&raw.borrow_and_update(), &settings.borrow_and_update());
            tx.send_if_modified(|cur| {
                let changed = **cur != next;
                if changed {
                    *cur = Arc::new(next);
                }
                changed
            });
            why_tx.send_if_modified(|cur| {
                let changed = **cur != why;
                if changed {
                    *cur = Arc::new(why);
                }
                changed
            });
        }
    });
    (rx, why_rx)
}

/// One guest stream: its opening, and on a stream whose TCP connection ended cleanly the next
/// one, each checked as the first (`serve_one`), until the agent closes it.
async fn serve(
    stream: TransportStream,
    host: watch::Receiver<Arc<ListenerSet>>,
    stats: ToHostStats,
    own: OwnSockets,
    shutdown: CancellationToken,
) {
    let (mut stream, mut reader) = (stream, FrameReader::new());
    while let Some(next) = serve_one(stream, reader, &host, &stats, &own, &shutdown).await {
        (stream, reader) = next;
    }
}

/// One guest connection: connect to the advertised desktop port, relay; the stream back if
/// another connection may follow on it.
async fn serve_one(
    stream: TransportStream,
    mut reader: FrameReader,
    host: &watch::Receiver<Arc<ListenerSet>>,
    stats: &ToHostStats,
    own: &OwnSockets,
    shutdown: &CancellationToken,
) -> Option<(TransportStream, FrameReader)> {
    let open = match reader.read_opening_until::<_, Open>(&stream, shutdown).await? {
        Ok(o) => o,
        // A stream the agent opened ahead of need, or kept after a connection, and closed unused.
        Err(e) if reader.ended_between(&e) => {
            debug!("a guest→host stream closed before its opening: the agent let it go");
            return None;
        }
        Err(e) => {
            warn!("rejected a guest→host stream: {e}");
            return None;
        }
    };
    let (addr, port, peer) = match open {
        Open::Tcp { addr, port, peer } => (addr, port, peer),
        Open::Udp { addr, port, peer } => {
            let span = info_span!("guest→host udp", port, client = %ShowPeer(peer));
            let stats = stats_for(stats, Proto::Udp, port);
            // Only a port the desktop advertises, as for TCP below.
            let target = host.borrow().target_for(Proto::Udp, port, addr.is_ipv6());
            serve_udp(stream, reader, target, port, stats, own, shutdown.clone()).instrument(span).await;
            return None;
        }
        Open::Control {} => {
            warn!("rejected a control stream on the guest→host socket");
            return None;
        }
    };
    // At debug level, as the desktop's connection spans (`forward.rs`).
    let span = debug_span!("guest→host", port, client = %ShowPeer(peer));
    async move {
        // Only a port the desktop advertises, and only on the desktop's loopback: the guest
        // cannot steer the proxy anywhere else, whatever `addr` it sends.
        let target = host.borrow().target_for(Proto::Tcp, port, addr.is_ipv6());
        let server = match target {
            None => Err(format!("host port {port} is not advertised to the guest")),
            Some(ip) => connect_tcp(SocketAddr::new(ip, port), None, "on the host").await,
        };
        let server = match server {
            Ok(server) => server,
            Err(reason) => {
                refuse(&stream, reason).await;
                return None;
            }
        };
        // As the agent answers the proxy's opens: `connected` goes out with the desktop
        // server's first bytes (or its FIN), one write and one wake-up of the agent.
        let stats = stats_for(stats, Proto::Tcp, port);
        let _active = stats.open();
        let relayed = answer_and_relay(stream, reader, server, &stats.bytes, shutdown).await?;
        debug!(outcome = ?relayed.outcome, "guest→host connection finished");
        relayed.reusable
    }
    .instrument(span)
    .await
}

/// One guest UDP flow: a socket of its own on the desktop's loopback, connected to `port` on
/// `target`, the address the desktop advertises it on (`None`: not advertised, refused).
async fn serve_udp(
    stream: TransportStream,
    mut reader: FrameReader,
    target: Option<IpAddr>,
    port: u16,
    stats: Arc<ForwardStats>,
    own: &OwnSockets,
    shutdown: CancellationToken,
) {
    let socket = match target {
        None => Err(format!("host UDP port {port} is not advertised to the guest")),
        Some(ip) => udp::connected_socket(SocketAddr::new(ip, port), None, own)
            .await
            .map_err(|e| format!("opening a UDP socket to {ip}:{port} on the host failed: {e}")),
    };
    if !handshake::answer_open(&stream, &socket).await {
        return;
    }
    let Ok(socket) = socket else { return };
    let _active = stats.open();
    let idle = Some(crate::limits::GUEST_FLOW_IDLE_BACKSTOP);
    let stats = udp::relay_connected(&stream, &mut reader, &socket, idle, None, &shutdown).await;
    debug!(?stats, "guest→host udp flow finished");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_to_host_endpoint_beyond_loopback_needs_the_flag() {
        for spec in ["tcp:0.0.0.0:1025", "tcp:[::]:1025", "tcp:192.168.1.2:1025"] {
            let spec: TransportSpec = spec.parse().unwrap();
            let err = check_listen(&spec, false).unwrap_err();
            assert!(err.contains("--listen-beyond-loopback"), "{err}");
            assert!(check_listen(&spec, true).is_ok());
        }
        for spec in ["tcp:127.0.0.1:1025", "tcp:[::1]:1025", "unix:/run/x.sock", "vsock:any:1025"] {
            assert!(check_listen(&spec.parse().unwrap(), false).is_ok(), "{spec}");
        }
    }

    #[test]
    fn over_vsock_only_the_vms_cid_opens_guest_to_host_streams() {
        let vm = Some(VmIdentity::VsockCid(3));
        assert!(from_the_vm("vsock:3:51234", vm));
        for peer in ["vsock:4:51234", "vsock:1:1", "vsock:2:7", "vsock:?"] {
            assert!(!from_the_vm(peer, vm), "{peer}");
        }
        assert!(from_the_vm("unix peer", vm), "a Unix socket does not tell");
        assert!(from_the_vm("vsock:4:1", None), "no CID known (hybrid vsock): not checked");
    }

    #[test]
    fn over_hyper_v_only_the_vms_id_opens_guest_to_host_streams() {
        let id: Guid = "5B7C2E1A-9D44-4E0B-8F3A-61C2D8E4A917".parse().unwrap();
        let vm = Some(VmIdentity::HyperV(id));
        assert!(from_the_vm("hyperv:5B7C2E1A-9D44-4E0B-8F3A-61C2D8E4A917:1025", vm));
        for peer in [
            "hyperv:A42E7CDA-D03F-480C-9CC2-A4DE20ABB878:1025",
            "hyperv:00000000-0000-0000-0000-000000000000:1025",
            "hyperv:not-a-guid:1025",
            "vsock:3:1025",
        ] {
            assert!(!from_the_vm(peer, vm), "{peer}");
        }
        assert_eq!(VmIdentity::of(&"hyperv:5b7c2e1a-9d44-4e0b-8f3a-61c2d8e4a917:1024".parse().unwrap()), vm);
        assert_eq!(VmIdentity::of(&"hyperv:any:1024".parse().unwrap()), None);
        assert_eq!(VmIdentity::of(&"vsock:3:1024".parse().unwrap()), Some(VmIdentity::VsockCid(3)));
        assert_eq!(VmIdentity::of(&"unix:/run/agent.sock".parse().unwrap()), None);
    }

    #[cfg(unix)]
    fn found(addr: &str, port: u16, uid: u32) -> source::Found {
        source::Found {
            listener: Listener { proto: Proto::Tcp, addr: addr.parse().unwrap(), port },
            inode: 1,
            uid: Some(uid),
            pid: None,
            connected: false,
        }
    }

    #[test]
    #[cfg(unix)]
    fn the_offer_is_the_policys_and_nothing_while_off() {
        let me = nix::unistd::geteuid().as_raw();
        let other = me.wrapping_add(1);
        let desktop =
            [found("127.0.0.1", 8080, me), found("127.0.0.1", 5432, other), found("127.0.0.53", 5353, me)];
        let (offered, withheld) = offer(&desktop, &Settings::default());
        assert_eq!(offered.ports(), [(Proto::Tcp, 8080)].into_iter().collect());
        assert_eq!(withheld.len(), 2, "{withheld:?}");
        let off = Settings { guest_to_host: false, ..Settings::default() };
        assert_eq!(offer(&desktop, &off), (ListenerSet::new(), BTreeMap::new()));
    }
}
