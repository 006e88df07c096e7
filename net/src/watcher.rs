//! The listener watcher, used by both sides: a thread that reads this machine's listening
//! sockets (TCP listeners and bound UDP sockets) on a tick and publishes the forwardable set
//! whenever it changes. Where the sockets come from is a [`ListenerSource`]: netlink
//! `sock_diag` on Linux (the agent always; a Linux desktop for guest→host).
//!
//! Other desktops, by design (not built yet): macOS through `proc_pidinfo(PROC_PIDFDSOCKETINFO)`
//! over its processes or the `net.inet.tcp.pcblist_n` / `net.inet.udp.pcblist_n` sysctls;
//! Windows through `GetExtendedTcpTable` / `GetExtendedUdpTable` (IPv4 and IPv6, with owning
//! PIDs, which also tell the proxy its own sockets).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hostnet_protocol::{Listener, ListenerSet, Proto};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// One socket a [`ListenerSource`] reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub listener: Listener,
    /// Socket inode, to recognise sockets of our own process.
    pub inode: u32,
    pub uid: u32,
    /// A UDP socket with a peer (`connect`ed): a client's, unless it was listed as a server
    /// before it connected (see [`ServersConnected`]).
    pub connected: bool,
}

/// Where this machine's listening sockets come from.
pub trait ListenerSource: Send + 'static {
    /// Appends every TCP socket in LISTEN state and every bound UDP socket (connected ones
    /// marked so).
    fn read(&mut self, out: &mut Vec<Found>) -> io::Result<()>;
}

#[cfg(target_os = "linux")]
impl ListenerSource for crate::discovery::SockDiag {
    fn read(&mut self, out: &mut Vec<Found>) -> io::Result<()> {
        self.tcp_listeners(out)?;
        self.udp_bound(out)
    }
}

/// This platform's source of listening sockets.
pub fn platform_source() -> io::Result<Box<dyn ListenerSource>> {
    #[cfg(target_os = "linux")]
    {
        Ok(Box::new(crate::discovery::SockDiag::open()?))
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "listener discovery is not implemented on this platform yet",
        ))
    }
}

/// Default period between two reads of the listener table when polling (no kernel events): a
/// new listener is usable from the host within about this long (`../shared/notes/discovery.md`:
/// ~2 % of a core at this rate with few sockets; measured ~1 %).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// With kernel events, the table is still read this often, as the source of truth.
pub const EVENT_RESYNC: Duration = Duration::from_secs(1);
/// Close events (a listener leaving LISTEN, a UDP socket released) fire just before the kernel
/// unhashes the socket, which a busy machine may delay by a time slice: when an event finds the
/// table unchanged, it is read again after each of these delays until it shows a change (a new
/// event cuts a delay short and starts them over), so a close is seen within milliseconds even
/// then, not at the next full read.
const CONFIRM_AFTER_EVENT: [Duration; 3] =
    [Duration::from_micros(500), Duration::from_millis(4), Duration::from_millis(32)];
/// Back-off after a failed read of the table.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// How the watcher learns that the table may have changed.
#[derive(Debug)]
pub enum Trigger {
    /// Read it every so often.
    Poll(Duration),
    /// Read it when the kernel reports a listener change, and every `resync` regardless.
    Events { events: Box<crate::events::ListenerEvents>, resync: Duration },
}

impl Trigger {
    /// Kernel events where this build and the kernel allow them, else polling every `poll`.
    /// Says which it chose, and why not events.
    pub fn best(poll: Duration) -> Trigger {
        match crate::events::ListenerEvents::load() {
            Ok(events) => {
                info!("listener discovery: kernel events (eBPF), full read every {EVENT_RESYNC:?}");
                Trigger::Events { events: Box::new(events), resync: EVENT_RESYNC }
            }
            Err(e) => {
                info!("listener discovery: polling every {poll:?} (no kernel events: {e})");
                Trigger::Poll(poll)
            }
        }
    }

    /// Blocks until the table should be read — at the latest after `confirm` when events are
    /// on; `true` if an event (not a timer) says so.
    fn wait(&mut self, confirm: Option<Duration>) -> bool {
        match self {
            Trigger::Poll(interval) => {
                std::thread::sleep(*interval);
                false
            }
            Trigger::Events { events, resync } => match events.wait(confirm.unwrap_or(*resync)) {
                Ok(n) => {
                    tracing::trace!(events = n, "woken");
                    n > 0
                }
                Err(e) => {
                    warn!("listener events failed ({e}); polling every {DEFAULT_POLL_INTERVAL:?} instead");
                    *self = Trigger::Poll(DEFAULT_POLL_INTERVAL);
                    false
                }
            },
        }
    }
}

/// Starts a watcher on `source`, woken by `trigger`. The first read happens before this
/// returns, so the first snapshot a peer gets is already the truth.
pub fn spawn(
    mut diag: Box<dyn ListenerSource>,
    mut trigger: Trigger,
    ignore_ports: BTreeSet<u16>,
    shutdown: CancellationToken,
) -> io::Result<watch::Receiver<Arc<ListenerSet>>> {
    let mut own = OwnSockets::default();
    let mut servers = ServersConnected::default();
    let mut found = Vec::new();
    let first = read_set(&mut diag, &mut found, &ignore_ports, &mut own, &mut servers)?;
    let (tx, rx) = watch::channel(Arc::new(first));
    std::thread::Builder::new().name("hostnet-listeners".into()).spawn(move || {
        // Reads the table and publishes it; `Some(changed)`, or `None` after a failed read.
        let mut update = || match read_set(&mut diag, &mut found, &ignore_ports, &mut own, &mut servers) {
            Ok(set) => Some(tx.send_if_modified(|current| {
                if **current == set {
                    return false;
                }
                debug!(listeners = set.len(), "listeners changed");
                *current = Arc::new(set);
                true
            })),
            Err(e) => {
                warn!("reading the listening sockets failed: {e}; retrying");
                std::thread::sleep(RETRY_AFTER_ERROR);
                None
            }
        };
        // Which of the confirming reads after the last event comes next.
        let mut confirming: Option<usize> = None;
        while !shutdown.is_cancelled() && !tx.is_closed() {
            let delay = confirming.and_then(|i| CONFIRM_AFTER_EVENT.get(i).copied());
            let event = trigger.wait(delay);
            let unchanged = update() == Some(false);
            confirming = match (event, unchanged, confirming) {
                // The change was seen.
                (_, false, _) => None,
                // An event the table does not show yet: its socket may still be unhashing.
                (true, true, _) => Some(0),
                (false, true, Some(i)) if i + 1 < CONFIRM_AFTER_EVENT.len() => Some(i + 1),
                (false, true, _) => None,
            };
        }
    })?;
    Ok(rx)
}

fn read_set(
    diag: &mut Box<dyn ListenerSource>,
    found: &mut Vec<Found>,
    ignore_ports: &BTreeSet<u16>,
    own: &mut OwnSockets,
    servers: &mut ServersConnected,
) -> io::Result<ListenerSet> {
    found.clear();
    diag.read(found)?;
    servers.forget_gone(found);
    // Connected UDP sockets never listed as servers are clients' (a desktop has hundreds:
    // QUIC): out before anything else looks at them — a new inode costs `own` a pass over
    // `/proc/self/fd`.
    found.retain(|f| !f.connected || servers.was_listed(f.inode));
    own.learn(found);
    let set = found
        .iter()
        .filter(|f| !own.contains(f.inode))
        .filter_map(|f| servers.keep(f))
        .filter(|l| l.is_forwardable() && !ignore_ports.contains(&l.port))
        .collect();
    Ok(set)
}

/// UDP servers that `connect` their socket to their first client (`nc -ul` does): the socket
/// then has a peer, like a client's, yet it is the same server, still talking through the
/// forward. A UDP socket listed as a server keeps its listing, by inode, for as long as it
/// exists; a socket that had a peer before it was ever seen is a client's and is not listed.
#[derive(Debug, Default)]
struct ServersConnected(HashMap<u32, Listener>);

impl ServersConnected {
    /// Drops what the latest read no longer shows.
    fn forget_gone(&mut self, found: &[Found]) {
        if !self.0.is_empty() {
            keep_only_seen(&mut self.0, found);
        }
    }

    fn was_listed(&self, inode: u32) -> bool {
        self.0.contains_key(&inode)
    }

    /// What `f` is listed as, if anything, remembering UDP servers for the next read.
    fn keep(&mut self, f: &Found) -> Option<Listener> {
        if f.listener.proto != Proto::Udp {
            return Some(f.listener);
        }
        if !f.connected {
            self.0.insert(f.inode, f.listener);
            return Some(f.listener);
        }
        self.0.get(&f.inode).copied()
    }
}

/// Which socket inodes belong to this process, so a side never advertises its own sockets:
/// the agent its `tcp:` transport listener or interception sockets, the proxy the mirrors of
/// guest ports (never mirror a mirror). Learned from one pass over `/proc/self/fd` whenever a
/// read brings inodes not seen before — one pass for a whole burst, so a proxy that opens
/// 2000 mirror sockets at once does 2000 `readlink`s, not 2000 × 2000.
#[derive(Debug, Default)]
struct OwnSockets(HashMap<u32, bool>);

impl OwnSockets {
    fn learn(&mut self, found: &[Found]) {
        if found.iter().all(|f| self.0.contains_key(&f.inode)) {
            if self.0.len() > found.len() {
                keep_only_seen(&mut self.0, found);
            }
            return;
        }
        let mine = own_socket_inodes();
        self.0 = found.iter().map(|f| (f.inode, mine.contains(&f.inode))).collect();
    }

    fn contains(&self, inode: u32) -> bool {
        self.0.get(&inode).copied().unwrap_or(false)
    }
}

/// Drops the entries of sockets `found` no longer shows.
fn keep_only_seen<V>(by_inode: &mut HashMap<u32, V>, found: &[Found]) {
    let seen: BTreeSet<u32> = found.iter().map(|f| f.inode).collect();
    by_inode.retain(|inode, _| seen.contains(inode));
}

/// Inodes of every socket this process holds open.
fn own_socket_inodes() -> BTreeSet<u32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return BTreeSet::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|t| {
            let t = t.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out one scripted table per read.
    struct Script(std::collections::VecDeque<Vec<Found>>);

    impl ListenerSource for Script {
        fn read(&mut self, out: &mut Vec<Found>) -> io::Result<()> {
            out.extend(self.0.pop_front().unwrap_or_default());
            Ok(())
        }
    }

    fn udp(addr: &str, port: u16, inode: u32, connected: bool) -> Found {
        Found {
            listener: Listener { proto: Proto::Udp, addr: addr.parse().unwrap(), port },
            inode,
            uid: 0,
            connected,
        }
    }

    #[test]
    fn a_udp_server_that_takes_a_peer_stays_listed_until_it_closes_and_clients_never_are() {
        // Inodes far above any this test process holds, so none counts as our own.
        let (server, client) = (4_000_000_001, 4_000_000_002);
        let mut source: Box<dyn ListenerSource> = Box::new(Script(
            [
                vec![udp("0.0.0.0", 5353, server, false)],
                // `nc -ul` after its first datagram: connected, bound to the address it was reached on.
                vec![udp("127.0.0.1", 5353, server, true)],
                // The server closed; a client socket (connected from the start) is not a server.
                vec![udp("127.0.0.1", 40_000, client, true)],
            ]
            .into(),
        ));
        let (mut found, ignore, mut own, mut servers) =
            (Vec::new(), BTreeSet::new(), OwnSockets::default(), ServersConnected::default());
        let mut read = || {
            let set = read_set(&mut source, &mut found, &ignore, &mut own, &mut servers).unwrap();
            set.iter().map(|l| (l.addr.to_string(), l.port)).collect::<Vec<_>>()
        };
        let listed = vec![("0.0.0.0".to_owned(), 5353)];
        assert_eq!(read(), listed, "the server, unconnected");
        assert_eq!(read(), listed, "the same server, connected to its first client: still listed as it was");
        assert_eq!(read(), Vec::<(String, u16)>::new(), "server gone; a client is never listed");
    }
}
