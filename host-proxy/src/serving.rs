//! What the servers of the forwarded ports share — the mirrors' TCP accept loops
//! (`forward.rs`), UDP (`udp.rs`) and the local bridges (`bridge.rs`): the agent connector, the
//! task tracker and shutdown, the permits of the limits, the proxy's own sockets, the guest's
//! listeners (a connection's target), the token that closes the connections of the moment, the
//! refusal counts; and each forward's live counts. The forwarding table (`forward.rs`) starts
//! and stops the servers; it is the one that changes what is forwarded.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hostnet_net::Connector;
use hostnet_net::discovery::own::OwnSockets;
use hostnet_net::relay::tcp::RelayCounters;
use hostnet_net::tally::Tally;
use hostnet_protocol::{ListenerSet, Proto};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::limits::Limits;

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

/// What every port's server shares (cheap to clone: handles).
#[derive(Clone)]
pub struct Serving {
    pub(crate) connector: Arc<dyn Connector>,
    pub(crate) tracker: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    pub(crate) connections: Arc<Semaphore>,
    pub(crate) udp_flows: Arc<Semaphore>,
    pub(crate) limits: Limits,
    /// The proxy's own sockets: every mirror and bridge is registered here, so its watch of the
    /// desktop never offers one to the guest (never mirror a mirror).
    pub(crate) own: OwnSockets,
    /// The guest's listeners, for the accept path: its own lock, held only for a lookup or to
    /// apply a delta, so a connection never waits on the table (binds, reconciles, the naming
    /// of a conflict's holder) to learn its target.
    targets: Arc<Mutex<ListenerSet>>,
    /// Cancelled (and replaced) when host networking is switched off: closes open connections.
    generation: Arc<Mutex<CancellationToken>>,
    /// Everything refused over the limits, and agent streams that could not be opened: logs
    /// about them are rate-limited on these counts.
    refused: Arc<Tally>,
    open_failures: Arc<Tally>,
    /// Where the mirrors' accept loops and their connections run.
    pub(crate) relay: Arc<hostnet_net::threads::RelayThreads>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving").field("connector", &self.connector.to_string()).finish_non_exhaustive()
    }
}

impl Serving {
    pub fn new(
        connector: Arc<dyn Connector>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        limits: Limits,
        own: OwnSockets,
        relay: Arc<hostnet_net::threads::RelayThreads>,
    ) -> Self {
        Serving {
            connector,
            tracker,
            generation: Arc::new(Mutex::new(shutdown.child_token())),
            shutdown,
            connections: Arc::new(Semaphore::new(limits.connections)),
            udp_flows: Arc::new(Semaphore::new(limits.udp_flows)),
            limits,
            own,
            targets: Arc::default(),
            refused: Arc::default(),
            open_failures: Arc::default(),
            relay,
        }
    }

    /// Closes the connections open now (host networking was switched off); later ones get a
    /// new token.
    pub(crate) fn close_connections(&self) {
        let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        g.cancel();
        *g = self.shutdown.child_token();
    }

    /// Counts one more thing refused over a limit (all ports); `Some(count so far)` when it
    /// should be logged.
    pub(crate) fn count_refused(&self) -> Option<u64> {
        self.refused.one_more()
    }

    /// The token connections opened now are closed by.
    pub(crate) fn connection_token(&self) -> CancellationToken {
        self.generation.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The accept path's copy of the guest's listeners, changed along with the table's (under
    /// the table's lock, so the two never disagree for long) and read without it.
    pub(crate) fn targets(&self) -> MutexGuard<'_, ListenerSet> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The guest address a client of the given family is relayed to, if anything listens.
    pub(crate) fn target_for(&self, proto: Proto, port: u16, client_v6: bool) -> Option<IpAddr> {
        self.targets().target_for(proto, port, client_v6)
    }

    /// While the agent restarts every client fails the same way: say it at 1, 2, 4, 8…
    /// failures rather than once per client.
    pub(crate) fn open_failed(&self, e: &dyn std::fmt::Display) {
        if let Some(failures) = self.open_failures.one_more() {
            warn!("cannot open a stream to the agent: {e} ({failures} so far)");
        } else {
            debug!("cannot open a stream to the agent: {e}");
        }
    }
}
