//! The local bridge: a desktop server that holds a port on one loopback family keeps the whole
//! port, and gets the other family too.
//!
//! When a guest TCP port's host port is held on the desktop (a `conflict`: the port is the
//! desktop's, nothing of it goes to the guest) and the holder is a server of this user on
//! exactly one family — `python3 -m http.server 8080 --bind 127.0.0.1` — the proxy listens on
//! the other family's loopback address (`[::1]:8080`) and relays each connection there to the
//! desktop server (`127.0.0.1:8080`). So `localhost`, `127.0.0.1` and `[::1]` all reach the
//! desktop server while the guest listens on the same port, whichever family a client tries
//! first and whether or not it falls back to the other.
//!
//! The bridge is the desktop's: it never opens a stream to the guest, its socket is one of the
//! proxy's own (never advertised to the guest), and it goes as soon as a read of the desktop's
//! listeners no longer shows the server (every [`CHECK_INTERVAL`]), or with the forward (the
//! guest's port gone, the settings changed). Only TCP: a UDP client that picked `::1` gets
//! "port unreachable", as it would without hostnet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hostnet_net::RawStream;
use hostnet_net::accept::next_accepted;
use hostnet_net::discovery::own::OwnSockets;
use hostnet_net::discovery::source::{Found, ListenerSource, Table};
use hostnet_net::discovery::watcher;
use hostnet_protocol::Proto;
use socket2::Type;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span};

use crate::serving::Serving;

/// How often the desktop's listeners on a conflicting port are read: how long a bridge may
/// outlive the desktop server it extends (a server restarting on the bridged family within
/// this window finds that address taken), and how soon one starts.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Backlog of a bridge's listening socket.
const BRIDGE_BACKLOG: i32 = 128;

/// Where a bridge listens and the desktop server it relays to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub at: SocketAddr,
    pub to: SocketAddr,
}

/// The bridge of one conflicting port as `status` sees it: its own lock, set by the bridge's
/// task and read by `status`, never held across anything.
#[derive(Debug, Default)]
pub struct Note(Mutex<Option<Route>>);

impl Note {
    /// The bridge listening now, if one is.
    pub fn route(&self) -> Option<Route> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, route: Option<Route>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = route;
    }

    /// The sentence `status` adds to the conflict's reason while the bridge listens.
    pub fn describe(&self) -> Option<String> {
        self.route().map(|r| {
            format!(
                "{} is bridged to the desktop's server on {} (localhost reaches it on both \
                 families; the bridge goes when that server stops)",
                r.at, r.to
            )
        })
    }
}

/// A listener on the desktop as [`choose`] sees it: its address and whether it is this user's
/// (`None`: the system does not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub addr: IpAddr,
    pub this_users: Option<bool>,
}

impl Holder {
    fn of(found: &Found) -> Holder {
        Holder { addr: found.listener.addr, this_users: found.is_this_users() }
    }
}

/// The bridge `port` needs, from the desktop's TCP listeners on it (the proxy's own left out):
/// one when servers of this user hold it on exactly one family, on that family's loopback or
/// wildcard address, and nothing of another owner (or an unknown one) holds it. The bridge
/// listens on the other family's loopback and relays to the held family's. Pure: tested
/// without sockets.
pub fn choose(port: u16, holders: &[Holder]) -> Option<Route> {
    if holders.is_empty() || holders.iter().any(|h| h.this_users != Some(true)) {
        return None;
    }
    if !holders.iter().all(|h| h.addr.is_loopback() || h.addr.is_unspecified()) {
        return None;
    }
    let v4: IpAddr = Ipv4Addr::LOCALHOST.into();
    let v6: IpAddr = Ipv6Addr::LOCALHOST.into();
    let held_v4 = holders.iter().any(|h| h.addr.is_ipv4());
    let held_v6 = holders.iter().any(|h| h.addr.is_ipv6());
    let (at, to) = match (held_v4, held_v6) {
        (true, false) => (v6, v4),
        (false, true) => (v4, v6),
        _ => return None,
    };
    Some(Route { at: SocketAddr::new(at, port), to: SocketAddr::new(to, port) })
}

/// Starts watching `port` (a TCP host port in conflict) for a one-family desktop server to
/// bridge, until `stop`. Its tasks join `tasks`, so closing the forward waits for the bridge's
/// socket to close.
pub fn spawn(serving: &Serving, port: u16, stop: CancellationToken, tasks: &TaskTracker) -> Arc<Note> {
    let note = Arc::new(Note::default());
    let (this, task_note, tasks2) = (serving.clone(), note.clone(), tasks.clone());
    serving.tracker.spawn(
        tasks.track_future(
            async move { watch(this, port, stop, task_note, tasks2).await }
                .instrument(info_span!("bridge", port)),
        ),
    );
    note
}

/// A bridge listening: its socket (shared with its accept loop) and the loop's stop.
struct Live {
    route: Route,
    listener: Arc<TcpListener>,
    stop: CancellationToken,
}

impl Live {
    fn close(self) {
        self.stop.cancel();
        // Linux: unhash it now, so the address is the desktop's again at once.
        #[cfg(target_os = "linux")]
        let _ = socket2::SockRef::from(&*self.listener).shutdown(std::net::Shutdown::Read);
        // Elsewhere it closes when its accept loop, stopped above, lets go of it too.
        drop(self.listener);
    }
}

/// The bridge's life: read the desktop's listeners on `port`, listen when [`choose`] says so,
/// close when it no longer does.
async fn watch(serving: Serving, port: u16, stop: CancellationToken, note: Arc<Note>, tasks: TaskTracker) {
    let mut source = match watcher::platform_source() {
        Ok(s) => Some(s),
        Err(e) => {
            debug!("no bridge: cannot read this machine's listening sockets: {e}");
            return;
        }
    };
    let mut live: Option<Live> = None;
    loop {
        // While bridging, only the family bridged to is read (the bridge is the other one).
        let families: Vec<bool> = match &live {
            Some(l) => vec![l.route.to.is_ipv6()],
            None => vec![false, true],
        };
        let Some(src) = source.take() else { break };
        let own = serving.own.clone();
        let Ok((src, read)) = tokio::task::spawn_blocking(move || holders(src, port, &families, &own)).await
        else {
            break;
        };
        source = Some(src);
        let want = match read {
            Ok(h) => choose(port, &h),
            Err(e) => {
                debug!("cannot read the desktop's listeners: {e}");
                live.as_ref().map(|l| l.route)
            }
        };
        if let Some(l) = live.take_if(|l| Some(l.route) != want) {
            info!("{} no longer bridged: the desktop's server on {} is gone", l.route.at, l.route.to);
            l.close();
            note.set(None);
        }
        if stop.is_cancelled() {
            break;
        }
        if let (None, Some(route)) = (&live, want) {
            // A failed bind (the address taken, no IPv6 here) is tried again next time, quietly.
            if let Ok(l) = listen(route.at, &serving.own) {
                info!("{} bridged to the desktop's server on {}", route.at, route.to);
                let l = Arc::new(l);
                let loop_stop = stop.child_token();
                let (this, l2, s2) = (serving.clone(), l.clone(), loop_stop.clone());
                serving.tracker.spawn(tasks.track_future(accept(this, l2, route, s2)));
                live = Some(Live { route, listener: l, stop: loop_stop });
                note.set(Some(route));
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
    }
    if let Some(l) = live.take() {
        l.close();
    }
    note.set(None);
}

/// What one read of the listener tables gives back: the source, for the next read, and the
/// holders found.
type Read = (Box<dyn ListenerSource>, std::io::Result<Vec<Holder>>);

/// The desktop's TCP listeners on `port` in the given families (`true`: IPv6), the proxy's own
/// left out.
fn holders(mut source: Box<dyn ListenerSource>, port: u16, families: &[bool], own: &OwnSockets) -> Read {
    let mut found = Vec::new();
    for &v6 in families {
        if let Err(e) = source.read(Table { proto: Proto::Tcp, v6 }, &mut found) {
            return (source, Err(e));
        }
    }
    let held =
        found.iter().filter(|f| f.listener.port == port && !own.is_own_found(f)).map(Holder::of).collect();
    (source, Ok(held))
}

/// The bridge's listening socket: one of the proxy's own (never advertised to the guest),
/// IPv6-only on `::1`.
fn listen(at: SocketAddr, own: &OwnSockets) -> std::io::Result<TcpListener> {
    let socket = own.socket(at, Type::STREAM)?;
    if at.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    hostnet_net::sys::prepare_listener(&socket)?;
    socket.bind(&at.into())?;
    socket.listen(BRIDGE_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Accepts on the bridge until `stop`, relaying each connection to the desktop server. No lock
/// is taken here: the route is fixed for the bridge's life.
async fn accept(serving: Serving, listener: Arc<TcpListener>, route: Route, stop: CancellationToken) {
    while let Some((client, peer)) = next_accepted(|| listener.accept(), &stop, "a bridged connection").await
    {
        // Bridged connections count against the proxy's connection limit as relayed ones do.
        let Ok(permit) = serving.connections.clone().try_acquire_owned() else {
            let _ = client.set_reset_on_close();
            serving.count_refused();
            continue;
        };
        let shutdown = serving.shutdown.clone();
        serving.tracker.spawn(
            async move {
                relay(client, route.to, &shutdown).await;
                drop(permit);
            }
            .instrument(info_span!("bridged", %peer)),
        );
    }
}

/// One bridged connection: plain local TCP to the desktop server, both ways, until both end
/// (or the proxy stops). It outlives the bridge's socket: a download from the desktop server
/// is not cut because the guest's port went.
async fn relay(mut client: TcpStream, to: SocketAddr, shutdown: &CancellationToken) {
    let _ = client.set_nodelay(true);
    // Plain tokio streams both ways: `copy_bidirectional` reads and writes them.
    let server = hostnet_net::connect::connect_tcp(to, None, "on this desktop")
        .await
        .and_then(|s| s.into_tokio().map_err(|e| format!("taking the connection to {to}: {e}")));
    let mut server = match server {
        Ok(s) => s,
        Err(e) => {
            debug!("{e}; resetting the bridged client");
            let _ = client.set_reset_on_close();
            return;
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut server) => debug!(?r, "bridged connection finished"),
        _ = shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(addr: &str, this_users: Option<bool>) -> Holder {
        Holder { addr: addr.parse().unwrap(), this_users }
    }

    fn route(at: &str, to: &str) -> Option<Route> {
        Some(Route { at: at.parse().unwrap(), to: to.parse().unwrap() })
    }

    #[test]
    fn a_server_of_this_user_on_one_family_gets_the_other_familys_loopback() {
        let mine = Some(true);
        assert_eq!(choose(8080, &[holder("127.0.0.1", mine)]), route("[::1]:8080", "127.0.0.1:8080"));
        assert_eq!(choose(8080, &[holder("0.0.0.0", mine)]), route("[::1]:8080", "127.0.0.1:8080"));
        assert_eq!(choose(8080, &[holder("::1", mine)]), route("127.0.0.1:8080", "[::1]:8080"));
        assert_eq!(choose(8080, &[holder("::", mine)]), route("127.0.0.1:8080", "[::1]:8080"));
        // Two sockets of one family (SO_REUSEPORT workers): still one family.
        assert_eq!(
            choose(8080, &[holder("127.0.0.1", mine), holder("127.0.0.1", mine)]),
            route("[::1]:8080", "127.0.0.1:8080")
        );
    }

    #[test]
    fn nothing_is_bridged_for_both_families_other_users_unknown_owners_or_other_addresses() {
        let mine = Some(true);
        assert_eq!(choose(8080, &[]), None, "nothing holds it: the port is free");
        assert_eq!(choose(8080, &[holder("127.0.0.1", mine), holder("::1", mine)]), None, "both families");
        assert_eq!(choose(8080, &[holder("127.0.0.1", Some(false))]), None, "another user's server");
        assert_eq!(choose(8080, &[holder("127.0.0.1", None)]), None, "an owner the system does not tell");
        assert_eq!(
            choose(8080, &[holder("127.0.0.1", mine), holder("127.0.0.1", Some(false))]),
            None,
            "any other owner on the port"
        );
        assert_eq!(choose(8080, &[holder("192.0.2.7", mine)]), None, "not reachable on loopback");
    }
}
