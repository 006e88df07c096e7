//! `hostnet-proxy`: the desktop side of hostnet.
//!
//! [`run`] keeps a control link to the agent ([`link`]) and mirrors every guest listener it
//! reports as listening sockets on the host's loopback ([`forward`]). [`demo`] stands up the
//! netns stand-in for a VM and runs the same thing against it.

use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use hostnet_net::{Connector, TransportSpec};
use settings::SettingsHandle;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod admin;
#[cfg(target_os = "linux")]
pub mod demo;
pub mod forward;
pub mod guest_streams;
mod link;
pub mod policy;
pub mod settings;
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
    /// The settings file (watched; created when first saved).
    pub settings_path: PathBuf,
    /// Where the admin API listens: a Unix socket, or a named pipe on Windows (`None`: no
    /// admin API).
    pub admin_socket: Option<admin::Endpoint>,
    /// Connections and UDP flows served at once.
    pub limits: forward::Limits,
    /// The VM's vsock CID when the agent is reached over vsock: guest→host streams from any
    /// other vsock peer are refused (and counted).
    pub guest_cid: Option<u32>,
}

impl ProxyConfig {
    pub fn new(agent: &TransportSpec) -> Self {
        ProxyConfig {
            connector: agent.connector(),
            guest_listen: None,
            // The current directory only when the system names no configuration directory.
            settings_path: settings::default_path().unwrap_or_else(|| PathBuf::from("hostnet-settings.toml")),
            admin_socket: admin::default_endpoint()
                .map_err(|e| tracing::warn!("the admin API is off: {e}"))
                .ok(),
            limits: forward::Limits::default(),
            guest_cid: match agent {
                TransportSpec::Vsock { cid, .. } => Some(*cid),
                _ => None,
            },
        }
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
    let settings = SettingsHandle::load(config.settings_path.clone());
    settings.watch(&tracker, &shutdown);
    let forwards =
        forward::Forwards::new(config.connector.clone(), tracker.clone(), shutdown.clone(), config.limits);
    forwards.apply_settings(settings.current()).await;
    {
        let (forwards, mut changes, stop) = (forwards.clone(), settings.subscribe(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                let next = changes.borrow_and_update().clone();
                forwards.apply_settings(next).await;
            }
        });
    }
    let to_host_stats = guest_streams::ToHostStats::default();
    let to_host = match &config.guest_listen {
        Some(spec) => {
            guest_streams::start(
                spec,
                settings.subscribe(),
                to_host_stats.clone(),
                config.limits.guest_streams,
                config.guest_cid,
                &tracker,
                &shutdown,
            )
            .await
        }
        None => guest_streams::ToHost::off(),
    };
    let host = to_host.advertised.clone();
    if let Some(endpoint) = &config.admin_socket {
        let api = admin::Admin {
            forwards: forwards.clone(),
            settings: settings.clone(),
            link: state.subscribe(),
            host: host.clone(),
            to_host: to_host.clone(),
            to_host_stats,
        };
        if let Err(e) = admin::serve(endpoint, api, &tracker, &shutdown) {
            tracing::warn!("the admin API is off: {e}");
        }
    }
    // On a worker thread: a future driven by the caller's `block_on` is woken across threads
    // for every control frame (the I/O driver lives on the workers).
    let link = tokio::spawn(link::maintain(config.connector, forwards, host, state, shutdown.clone()));
    if let Err(e) = link.await {
        tracing::error!("the link to the agent failed: {e}");
    }
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait()).await.is_err() {
        tracing::warn!("some connections did not close within {DRAIN_TIMEOUT:?}");
    }
}
