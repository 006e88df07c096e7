//! `hostnet-proxy`: the desktop side of hostnet.
//!
//! [`run`] keeps a control link to the agent ([`link`]) and mirrors every guest listener it
//! reports as listening sockets on the host's loopback ([`forward`]). [`demo`] stands up the
//! netns stand-in for a VM and runs the same thing against it.

use std::sync::Arc;
use std::time::Duration;

use hostnet_net::Connector;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod demo;
pub mod forward;
mod link;
pub mod udp;

/// How long shutdown waits for connections to finish closing.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How the proxy runs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// How to reach the agent.
    pub connector: Arc<dyn Connector>,
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
    link::maintain(config.connector, forwards, state, shutdown.clone()).await;
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait()).await.is_err() {
        tracing::warn!("some connections did not close within {DRAIN_TIMEOUT:?}");
    }
}
