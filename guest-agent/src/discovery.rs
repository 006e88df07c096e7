//! The listener watcher: a thread that polls `sock_diag` (TCP listeners and bound UDP
//! sockets) and publishes the forwardable set
//! whenever it changes.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hostnet_net::discovery::{Found, SockDiag};
use hostnet_protocol::ListenerSet;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Default period between two reads of the listener table: a new listener is usable from the
/// host within about this long (`../shared/notes/discovery.md`: ~2 % of a core at this rate).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Back-off after a failed read of the table.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// Starts the watcher. The first read happens before this returns, so the first snapshot a
/// proxy gets is already the truth.
pub fn spawn(
    interval: Duration,
    ignore_ports: BTreeSet<u16>,
    shutdown: CancellationToken,
) -> io::Result<watch::Receiver<Arc<ListenerSet>>> {
    let mut diag = SockDiag::open()?;
    let mut own = OwnSockets::default();
    let mut found = Vec::new();
    let first = read_set(&mut diag, &mut found, &ignore_ports, &mut own)?;
    let (tx, rx) = watch::channel(Arc::new(first));
    std::thread::Builder::new().name("hostnet-discovery".into()).spawn(move || {
        while !shutdown.is_cancelled() && !tx.is_closed() {
            std::thread::sleep(interval);
            match read_set(&mut diag, &mut found, &ignore_ports, &mut own) {
                Ok(set) => {
                    tx.send_if_modified(|current| {
                        if **current == set {
                            return false;
                        }
                        debug!(listeners = set.len(), "guest listeners changed");
                        *current = Arc::new(set);
                        true
                    });
                }
                Err(e) => {
                    warn!("reading the guest's listening sockets failed: {e}; retrying");
                    std::thread::sleep(RETRY_AFTER_ERROR);
                }
            }
        }
    })?;
    Ok(rx)
}

fn read_set(
    diag: &mut SockDiag,
    found: &mut Vec<Found>,
    ignore_ports: &BTreeSet<u16>,
    own: &mut OwnSockets,
) -> io::Result<ListenerSet> {
    found.clear();
    diag.tcp_listeners(found)?;
    diag.udp_bound(found)?;
    let set = found
        .iter()
        .filter(|f| f.listener.is_forwardable() && !ignore_ports.contains(&f.listener.port))
        .filter(|f| !own.contains(f.inode))
        .map(|f| f.listener)
        .collect();
    own.retain_seen(found);
    Ok(set)
}

/// Which socket inodes belong to this process, so the agent never advertises its own sockets
/// (a `tcp:` transport listener, say). Looked up once per new inode.
#[derive(Debug, Default)]
struct OwnSockets(HashMap<u32, bool>);

impl OwnSockets {
    fn contains(&mut self, inode: u32) -> bool {
        *self.0.entry(inode).or_insert_with(|| is_own_socket(inode))
    }

    fn retain_seen(&mut self, found: &[Found]) {
        if self.0.len() > found.len() {
            let seen: BTreeSet<u32> = found.iter().map(|f| f.inode).collect();
            self.0.retain(|inode, _| seen.contains(inode));
        }
    }
}

fn is_own_socket(inode: u32) -> bool {
    let want = format!("socket:[{inode}]");
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return false;
    };
    dir.flatten().any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == want.as_str()))
}
