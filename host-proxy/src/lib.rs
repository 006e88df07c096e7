//! `hostnet-proxy`: the desktop side of hostnet.
//!
//! [`run`] keeps a control link to the agent ([`link`]) and mirrors every guest listener it
//! reports as listening sockets on the host's loopback ([`forward`]). [`demo`] stands up the
//! netns stand-in for a VM and runs the same thing against it.

use std::sync::Arc;
use std::time::Duration;

use hostnet_net::{Connector, TransportSpec};
use hostnet_protocol::ListenerSet;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod demo;
pub mod forward;
pub mod settings;
mod guest_streams;
mod link;
pub mod udp;

/// How long shutdown waits for connections to finish closing.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the desktop's own listeners are read for guest→host.
pub const HOST_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How the proxy runs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// How to reach the agent.
    pub connector: Arc<dyn Connector>,
    /// Where the agent opens streams for guest→host connections (`None`: guest→host off).
    pub guest_listen: Option<TransportSpec>,
}

impl ProxyConfig {
    pub fn new(agent: &TransportSpec) -> Self {
        ProxyConfig { connector: agent.connector(), guest_listen: None }
    }
}

/// The state of the link to the agent, for status and the `ready` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Trying to reach the agent.
    Connecting,
    /// Snapshot applied: `forwarding` host ports are live for `listeners` guest listeners.
    Connected { listeners: usize, forwarding: usize },
    /// The last attempt failed; retrying.
    Disconnected { error: String },
}

/// Runs until `shutdown` fires, then closes every forwarded port and drains connections.
pub async fn run(config: ProxyConfig, shutdown: CancellationToken, state: watch::Sender<LinkState>) {
    let tracker = TaskTracker::new();
    let forwards = forward::Forwards::new(config.connector.clone(), tracker.clone(), shutdown.clone());
    let host = match &config.guest_listen {
        Some(spec) => guest_streams::start(spec, &tracker, &shutdown).await,
        None => watch::channel(Arc::new(ListenerSet::new())).1,
    };
    link::maintain(config.connector, forwards, host, state, shutdown.clone()).await;
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait()).await.is_err() {
        tracing::warn!("some connections did not close within {DRAIN_TIMEOUT:?}");
    }
}
