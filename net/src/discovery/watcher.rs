//! The listener watcher, used by both sides: a thread that reads this machine's listening
//! sockets (TCP listeners and bound UDP sockets) on a tick and publishes the forwardable set
//! whenever it changes. Where the sockets come from is a [`ListenerSource`], one per OS
//! ([`crate::discovery::platform`]): netlink `sock_diag` on Linux (the agent always; a Linux desktop for
//! guest→host); on macOS the socket descriptors of the user's processes
//! (`proc_pidfdinfo(PROC_PIDFDSOCKETINFO)`); on Windows `GetExtendedTcpTable` /
//! `GetExtendedUdpTable` (IPv4 and IPv6, with owning pids).
//!
//! The side's own sockets are never published ([`crate::discovery::own`]): known by inode on Linux, by
//! owning pid where the OS gives one, by bound address where it gives neither (Wine).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hostnet_protocol::{Listener, ListenerSet, Proto};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::discovery::own::OwnSockets;
use crate::discovery::source::{Found, ListenerSource, Table, Tables};

/// This platform's source of listening sockets (see [`crate::discovery::platform::source`]).
pub fn platform_source() -> io::Result<Box<dyn ListenerSource>> {
    crate::discovery::platform::source()
}

/// Default period between two reads of the listener table when polling (no kernel events): a
/// new listener is usable from the host within about this long (`../shared/notes/discovery.md`:
/// ~2 % of a core at this rate with few sockets; measured ~1 %).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// With kernel events, the table is still read this often, as the source of truth.
pub const EVENT_RESYNC: Duration = Duration::from_secs(1);
/// Close events (a listener leaving LISTEN, a UDP socket released) fire just before the kernel
/// unhashes the socket — and the woken watcher may even run first, preempting the closing
/// thread on its CPU until it sleeps. So when an event finds the tables unchanged, they are
/// read again after each of these delays until they show a change (a new event cuts a delay
/// short and starts them over): a close is seen within about twice the time the kernel took,
/// not at the next full read. Each read is of the event's tables only.
const CONFIRM_AFTER_EVENT: [Duration; 10] = [
    Duration::from_micros(25),
    Duration::from_micros(50),
    Duration::from_micros(100),
    Duration::from_micros(200),
    Duration::from_micros(400),
    Duration::from_micros(800),
    Duration::from_micros(1_600),
    Duration::from_micros(3_200),
    Duration::from_micros(6_400),
    Duration::from_micros(12_800),
];
/// Timer slack of the watcher thread, so its short waits are short (Linux's default is 50 µs,
/// twice the first of the delays above).
#[cfg(target_os = "linux")]
const TIMER_SLACK_NS: libc::c_ulong = 5_000;
/// Back-off after a failed read of the table.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// How the watcher learns that the table may have changed.
#[derive(Debug)]
pub enum Trigger {
    /// Read it every so often.
    Poll(Duration),
    /// Read it when the kernel reports a listener change, and every `resync` regardless.
    Events { events: Box<crate::discovery::events::ListenerEvents>, resync: Duration },
}

impl Trigger {
    /// Kernel events where this build and the kernel allow them, else polling every `poll`.
    /// Says which it chose, and why not events.
    pub fn best(poll: Duration) -> Trigger {
        match crate::discovery::events::ListenerEvents::load() {
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

    /// Blocks until the tables should be read — at the latest after `confirm` when events
    /// are on. Returns the tables an event says changed; none when a timer woke it.
    fn wait(&mut self, confirm: Option<Duration>) -> Tables {
        match self {
            Trigger::Poll(interval) => {
                std::thread::sleep(*interval);
                Tables::NONE
            }
            Trigger::Events { events, resync } => match events.wait(confirm.unwrap_or(*resync)) {
                Ok(tables) => {
                    tracing::trace!(?tables, "woken");
                    tables
                }
                Err(e) => {
                    warn!("listener events failed ({e}); polling every {DEFAULT_POLL_INTERVAL:?} instead");
                    *self = Trigger::Poll(DEFAULT_POLL_INTERVAL);
                    Tables::NONE
                }
            },
        }
    }
}

/// Starts a watcher on `source`, woken by `trigger`, that leaves out the sockets `own` has. The
/// first read happens before this returns, so the first snapshot a peer gets is already the
/// truth. The thread counts as one of `tasks` until it ends: within one wait of `shutdown`
/// (at most [`EVENT_RESYNC`], or the poll interval), or when every receiver is gone.
pub fn spawn(
    diag: Box<dyn ListenerSource>,
    trigger: Trigger,
    ignore_ports: BTreeSet<u16>,
    own: OwnSockets,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> io::Result<watch::Receiver<Arc<ListenerSet>>> {
    spawn_publishing(diag, trigger, ignore_ports, own, tasks, shutdown, |set, _| set)
}

/// Like [`spawn`], but publishes each forwardable socket as the source reported it, owner
/// included (ordered by listener): what the proxy's guest→host policy decides on.
pub fn spawn_found(
    diag: Box<dyn ListenerSource>,
    trigger: Trigger,
    own: OwnSockets,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> io::Result<watch::Receiver<Arc<Vec<Found>>>> {
    spawn_publishing(diag, trigger, BTreeSet::new(), own, tasks, shutdown, |_, found| found.to_vec())
}

fn spawn_publishing<T: PartialEq + Send + Sync + 'static>(
    diag: Box<dyn ListenerSource>,
    mut trigger: Trigger,
    ignore_ports: BTreeSet<u16>,
    own: OwnSockets,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
    publish: fn(ListenerSet, &[Found]) -> T,
) -> io::Result<watch::Receiver<Arc<T>>> {
    let mut reader = Reader::new(diag, ignore_ports, own);
    let (first, _) = reader.read(Tables::ALL)?;
    let first = publish(first, &reader.forwardable);
    let (tx, rx) = watch::channel(Arc::new(first));
    let running = tasks.token();
    std::thread::Builder::new().name("hostnet-listeners".into()).spawn(move || {
        // The owner's drain waits for this thread until it returns.
        let _running = running;
        // SAFETY: sets this thread's timer slack; no pointers.
        #[cfg(target_os = "linux")]
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, TIMER_SLACK_NS);
        }
        // Reads `tables` and publishes the set; `Some(whether the tables changed)` — any socket,
        // ours or not forwardable too —, or `None` after a failed read.
        let mut update = |tables| match reader.read(tables) {
            Ok((set, tables_changed)) => {
                let listeners = set.len();
                let set = publish(set, &reader.forwardable);
                tx.send_if_modified(|current| {
                    if **current == set {
                        return false;
                    }
                    debug!(listeners, "listeners changed");
                    *current = Arc::new(set);
                    true
                });
                Some(tables_changed)
            }
            Err(e) => {
                warn!("reading the listening sockets failed: {e}; retrying");
                std::thread::sleep(RETRY_AFTER_ERROR);
                None
            }
        };
        // Which of the confirming reads after the last events comes next, and of which tables.
        let mut confirming: Option<(usize, Tables)> = None;
        while !shutdown.is_cancelled() && !tx.is_closed() {
            let delay = confirming.and_then(|(i, _)| CONFIRM_AFTER_EVENT.get(i).copied());
            let events = trigger.wait(delay);
            let pending = events | confirming.map_or(Tables::NONE, |(_, tables)| tables);
            // A timer with nothing pending: the periodic full read (polling, or the resync).
            let tables = if pending.is_empty() { Tables::ALL } else { pending };
            // An event's change shows in the tables (a socket came or went), whether or not it
            // changes what is forwarded.
            let unchanged = update(tables) == Some(false);
            confirming = match (!events.is_empty(), unchanged, confirming) {
                // The change was seen.
                (_, false, _) => None,
                // An event the tables do not show yet: its socket may still be unhashing.
                (true, true, _) => Some((0, tables)),
                (false, true, Some((i, t))) if i + 1 < CONFIRM_AFTER_EVENT.len() => Some((i + 1, t)),
                (false, true, _) => None,
            };
        }
    })?;
    Ok(rx)
}

/// Reads the tables and makes the forwardable set of them.
struct Reader {
    diag: Box<dyn ListenerSource>,
    /// The latest read of each table (in [`Table::ALL`]'s order), kept so a read of one table
    /// leaves the others as they were.
    tables: [Vec<Found>; 4],
    /// Where a table is read into, to compare with its previous read.
    scratch: Vec<Found>,
    /// Tables whose latest read failed part-way: read again next time, whatever is asked.
    stale: Tables,
    found: Vec<Found>,
    /// The sockets of the latest set, as found (owner included), ordered by listener.
    forwardable: Vec<Found>,
    ignore_ports: BTreeSet<u16>,
    servers: ServersConnected,
    own: OwnSockets,
}

impl Reader {
    fn new(diag: Box<dyn ListenerSource>, ignore_ports: BTreeSet<u16>, own: OwnSockets) -> Self {
        Reader {
            diag,
            tables: Default::default(),
            scratch: Vec::new(),
            stale: Tables::NONE,
            found: Vec::new(),
            forwardable: Vec::new(),
            ignore_ports,
            servers: ServersConnected::default(),
            own,
        }
    }

    /// The forwardable set after reading `tables`, and whether any of them changed.
    fn read(&mut self, tables: Tables) -> io::Result<(ListenerSet, bool)> {
        let tables = tables | std::mem::take(&mut self.stale);
        let mut changed = false;
        for (table, found) in Table::ALL.into_iter().zip(&mut self.tables) {
            if tables.contains(table) {
                self.scratch.clear();
                if let Err(e) = self.diag.read(table, &mut self.scratch) {
                    self.stale = tables;
                    return Err(e);
                }
                if *found != self.scratch {
                    changed = true;
                    std::mem::swap(found, &mut self.scratch);
                }
            }
        }
        self.found.clear();
        for found in &self.tables {
            self.found.extend_from_slice(found);
        }
        let found = &mut self.found;
        if tables == Tables::ALL {
            let shown: BTreeSet<u32> = found.iter().map(|f| f.inode).collect();
            self.own.forget_unshown(|inode| shown.contains(&inode));
            self.own.forget_unshown_addresses(found);
        }
        self.servers.forget_gone(found);
        // Connected UDP sockets never listed as servers are clients' (a desktop has hundreds:
        // QUIC): out before anything else looks at them.
        found.retain(|f| !f.connected || self.servers.was_listed(f.inode));
        self.forwardable.clear();
        for f in found.iter().filter(|f| !self.own.is_own_found(f)) {
            match self.servers.keep(f) {
                Some(listener)
                    if listener.is_forwardable() && !self.ignore_ports.contains(&listener.port) =>
                {
                    self.forwardable.push(Found { listener, ..*f })
                }
                _ => {}
            }
        }
        self.forwardable.sort_by_key(|f| (f.listener, f.inode));
        let set = self.forwardable.iter().map(|f| f.listener).collect();
        Ok((set, changed))
    }
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

/// Drops the entries of sockets `found` no longer shows.
fn keep_only_seen<V>(by_inode: &mut HashMap<u32, V>, found: &[Found]) {
    let seen: BTreeSet<u32> = found.iter().map(|f| f.inode).collect();
    by_inode.retain(|inode, _| seen.contains(inode));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Hands out scripted tables: each read of a table takes its next entry (`None`: the read
    /// fails); a table with nothing scripted reads empty. Counts the reads of each table.
    #[derive(Default)]
    struct Script {
        next: HashMap<u8, VecDeque<Option<Vec<Found>>>>,
        reads: Arc<std::sync::Mutex<HashMap<u8, usize>>>,
    }

    impl Script {
        fn then(mut self, table: Table, found: Option<Vec<Found>>) -> Self {
            self.next.entry(table.bit()).or_default().push_back(found);
            self
        }
    }

    impl ListenerSource for Script {
        fn read(&mut self, table: Table, out: &mut Vec<Found>) -> io::Result<()> {
            *self.reads.lock().unwrap().entry(table.bit()).or_default() += 1;
            match self.next.get_mut(&table.bit()).and_then(VecDeque::pop_front) {
                Some(None) => Err(io::Error::other("scripted failure")),
                Some(Some(found)) => {
                    out.extend(found);
                    Ok(())
                }
                None => Ok(()),
            }
        }
    }

    const TCP4: Table = Table::ALL[0];
    const UDP4: Table = Table::ALL[2];

    fn found(proto: Proto, addr: &str, port: u16, inode: u32, connected: bool) -> Found {
        Found {
            listener: Listener { proto, addr: addr.parse().unwrap(), port },
            inode,
            uid: Some(0),
            pid: None,
            connected,
        }
    }

    fn listed(reader: &mut Reader, tables: Tables) -> Vec<(Proto, u16)> {
        reader.read(tables).unwrap().0.iter().map(|l| (l.proto, l.port)).collect()
    }

    // Inodes far above any this test process holds, so none counts as our own.
    const INODE: u32 = 4_000_000_001;

    #[test]
    fn a_udp_server_that_takes_a_peer_stays_listed_until_it_closes_and_clients_never_are() {
        let (server, client) = (INODE, INODE + 1);
        let udp = |addr, port, inode, connected| found(Proto::Udp, addr, port, inode, connected);
        let script = Script::default()
            .then(UDP4, Some(vec![udp("0.0.0.0", 5353, server, false)]))
            // `nc -ul` after its first datagram: connected, bound to the address it was reached on.
            .then(UDP4, Some(vec![udp("127.0.0.1", 5353, server, true)]))
            // The server closed; a client socket (connected from the start) is not a server.
            .then(UDP4, Some(vec![udp("127.0.0.1", 40_000, client, true)]));
        let mut reader = Reader::new(Box::new(script), BTreeSet::new(), OwnSockets::new());
        let server = vec![(Proto::Udp, 5353)];
        assert_eq!(listed(&mut reader, Tables::ALL), server, "the server, unconnected");
        assert_eq!(
            listed(&mut reader, Tables::ALL),
            server,
            "the same server, connected to its first client: still listed as it was"
        );
        assert_eq!(listed(&mut reader, Tables::ALL), vec![], "server gone; a client is never listed");
    }

    #[test]
    fn reading_some_tables_keeps_the_others_and_a_failed_table_is_read_again_next_time() {
        let tcp = || Some(vec![found(Proto::Tcp, "0.0.0.0", 80, INODE, false)]);
        let script = Script::default()
            .then(TCP4, tcp())
            .then(TCP4, tcp())
            .then(UDP4, Some(vec![found(Proto::Udp, "0.0.0.0", 53, INODE + 1, false)]))
            .then(UDP4, None)
            .then(UDP4, Some(vec![]));
        let reads = script.reads.clone();
        let mut reader = Reader::new(Box::new(script), BTreeSet::new(), OwnSockets::new());
        assert_eq!(listed(&mut reader, Tables::ALL), vec![(Proto::Tcp, 80), (Proto::Udp, 53)]);
        // A UDP event: the TCP table is not read again, and its listener stays.
        assert!(reader.read(Tables::of(Some(Proto::Udp), true, false)).is_err(), "the scripted failure");
        assert_eq!(reads.lock().unwrap()[&TCP4.bit()], 1);
        // A TCP event next: the UDP table that failed is read too (now empty).
        assert_eq!(listed(&mut reader, Tables::of(Some(Proto::Tcp), true, false)), vec![(Proto::Tcp, 80)]);
        let reads = reads.lock().unwrap();
        assert_eq!((reads[&TCP4.bit()], reads[&UDP4.bit()]), (2, 3));
        assert_eq!(reads[&Table::ALL[1].bit()], 1, "TCP over IPv6 read only in the first full read");
    }

    #[test]
    fn a_read_says_whether_the_tables_changed_even_when_the_forwardable_set_did_not() {
        let not_forwardable = || Some(vec![found(Proto::Tcp, "10.1.2.3", 80, INODE, false)]);
        let script = Script::default()
            .then(TCP4, Some(vec![]))
            .then(TCP4, not_forwardable())
            .then(TCP4, not_forwardable());
        let mut reader = Reader::new(Box::new(script), BTreeSet::new(), OwnSockets::new());
        let tcp4 = Tables::of(Some(Proto::Tcp), true, false);
        assert!(!reader.read(tcp4).unwrap().1, "empty, as before");
        let (set, changed) = reader.read(tcp4).unwrap();
        assert!(changed && set.is_empty(), "a socket came that is not forwarded: {set:?}");
        assert!(!reader.read(tcp4).unwrap().1, "the same again");
    }

    #[test]
    fn tables_of_a_protocol_and_family() {
        assert_eq!(Tables::of(None, true, true), Tables::ALL);
        assert_eq!(
            Tables::of(Some(Proto::Tcp), true, true) | Tables::of(Some(Proto::Udp), true, true),
            Tables::ALL
        );
        let tcp6 = Tables::of(Some(Proto::Tcp), false, true);
        assert_eq!(
            Table::ALL.iter().filter(|t| tcp6.contains(**t)).collect::<Vec<_>>(),
            vec![&Table::ALL[1]]
        );
        assert!(Tables::of(Some(Proto::Udp), false, false).is_empty());
    }

    #[test]
    fn sockets_of_this_process_are_never_listed_where_the_os_gives_pids() {
        let with_pid = |port, pid| Found { pid: Some(pid), ..found(Proto::Tcp, "127.0.0.1", port, 0, false) };
        let me = std::process::id();
        let script =
            Script::default().then(TCP4, Some(vec![with_pid(8000, me), with_pid(8001, me.wrapping_add(1))]));
        let mut reader = Reader::new(Box::new(script), BTreeSet::new(), OwnSockets::new());
        assert_eq!(listed(&mut reader, Tables::ALL), vec![(Proto::Tcp, 8001)], "only the other process's");
    }

    /// Windows under Wine: every pid is 0, no inodes; our sockets are known by the address
    /// `own::socket` was made for.
    #[test]
    #[cfg(not(target_os = "linux"))]
    fn without_pids_our_sockets_are_known_by_the_address_they_were_bound_to() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let own = OwnSockets::new();
        let ours = own.socket(free, socket2::Type::STREAM).unwrap();
        ours.bind(&free.into()).unwrap();
        ours.listen(8).unwrap();
        let other = free.port().wrapping_add(1).max(1024);
        let script = Script::default().then(
            TCP4,
            Some(vec![
                found(Proto::Tcp, "127.0.0.1", free.port(), 0, false),
                found(Proto::Tcp, "127.0.0.1", other, 0, false),
            ]),
        );
        let mut reader = Reader::new(Box::new(script), BTreeSet::new(), own);
        assert_eq!(listed(&mut reader, Tables::ALL), vec![(Proto::Tcp, other)], "ours left out");
    }
}
