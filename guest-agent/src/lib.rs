//! `hostnet-agent`: runs inside the VM. Watches the guest's listening sockets, advertises them
//! to the proxy on the control stream, and relays each data stream the proxy opens to the guest
//! server it names.

use std::collections::BTreeSet;
use std::time::Duration;

use hostnet_net::TransportSpec;
use hostnet_net::accept::next_accepted;
use hostnet_net::discovery::own::OwnSockets;
use hostnet_net::discovery::{source, watcher};
use hostnet_net::threads::{BindLoopError, RelayThreads};
use hostnet_net::transport::spare;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub mod intercept;
mod intercept_udp;
pub mod limits;
pub mod privileges;
mod session;
mod transparent;
pub mod user;

pub use hostnet_net::discovery::watcher::DEFAULT_POLL_INTERVAL;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where to wait for the proxy.
    pub transport: TransportSpec,
    /// How often the listener table is read when kernel events are not available (or off).
    pub poll_interval: Duration,
    /// Use kernel listener events (eBPF) where the kernel allows them.
    pub listener_events: bool,
    /// Guest ports never advertised (the VM's own services).
    pub ignore_ports: BTreeSet<u16>,
    /// Where to reach the proxy for guest→host connections (`None`: guest→host off).
    pub host_transport: Option<TransportSpec>,
    /// Streams to the proxy for guest→host kept opened ahead of need (`None`: the transport's
    /// default, `TransportSpec::default_spare_streams`).
    pub spare_streams: Option<usize>,
    /// Guest→host streams whose connection ended cleanly kept for the next ones, at most.
    pub reuse_streams: usize,
    /// Threads the proxy's streams live on ([`hostnet_net::threads`]).
    pub relay_threads: usize,
}

impl AgentConfig {
    pub fn new(transport: TransportSpec) -> Self {
        AgentConfig {
            transport,
            poll_interval: DEFAULT_POLL_INTERVAL,
            listener_events: true,
            ignore_ports: BTreeSet::new(),
            host_transport: None,
            spare_streams: None,
            reuse_streams: spare::REUSED_STREAMS,
            relay_threads: RelayThreads::default_count(),
        }
    }
}

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Transport(#[from] hostnet_net::TransportError),
    #[error("cannot read the guest's listening sockets through netlink sock_diag: {0}")]
    Discovery(std::io::Error),
    #[error("cannot start the relay threads: {0}")]
    Threads(std::io::Error),
}

/// What the agent opens before it drops its privileges ([`privileges`]): the listener table
/// and, where allowed, the kernel's listener events (loading BPF needs `CAP_BPF` +
/// `CAP_PERFMON`). Opening it starts no thread.
pub struct Discovery {
    source: Box<dyn source::ListenerSource>,
    trigger: watcher::Trigger,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery").field("trigger", &self.trigger).finish_non_exhaustive()
    }
}

impl Discovery {
    pub fn open(config: &AgentConfig) -> Result<Self, AgentError> {
        let source = watcher::platform_source().map_err(AgentError::Discovery)?;
        let trigger = if config.listener_events {
            watcher::Trigger::best(config.poll_interval)
        } else {
            watcher::Trigger::Poll(config.poll_interval)
        };
        Ok(Discovery { source, trigger })
    }

    /// Discovery over a source of listening sockets of the caller's choosing (a scripted one in
    /// the in-process tests), woken by `trigger`.
    pub fn new(source: Box<dyn source::ListenerSource>, trigger: watcher::Trigger) -> Self {
        Discovery { source, trigger }
    }
}

/// Runs until `shutdown` fires. Returns an error only if it cannot start.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let discovery = Discovery::open(&config)?;
    run_with(config, discovery, shutdown).await
}

/// [`run`] with discovery already open (`hostnet-agent` opens it, then drops privileges).
pub async fn run_with(
    config: AgentConfig,
    discovery: Discovery,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let own = OwnSockets::new();
    let transport = config.transport.clone();
    serve_on(config, discovery, Listen::Bind(transport), own, shutdown).await
}

/// [`run_with`] on streams from `acceptor` instead of `config.transport` (then only a name):
/// how the in-process tests give the agent one end of a socket pair. The agent's own sockets
/// are its alone, so a proxy in the same process is not taken for part of it, nor the other
/// way round.
pub async fn serve(
    config: AgentConfig,
    discovery: Discovery,
    acceptor: Box<dyn hostnet_net::Acceptor>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    serve_on(config, discovery, Listen::Given(acceptor), OwnSockets::new(), shutdown).await
}

/// Where the proxy's streams come from.
enum Listen {
    /// Listen on the transport.
    Bind(TransportSpec),
    /// A caller's acceptor.
    Given(Box<dyn hostnet_net::Acceptor>),
}

async fn serve_on(
    config: AgentConfig,
    discovery: Discovery,
    listen: Listen,
    own: OwnSockets,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let relay = RelayThreads::start("hostnet-relay", config.relay_threads).map_err(AgentError::Threads)?;
    let tracker = TaskTracker::new();
    // The transport's listener is made on the relay thread that accepts on it, before anything
    // else starts; its loop waits for the sessions.
    let bind = {
        let own = own.clone();
        async move {
            match listen {
                Listen::Given(acceptor) => Ok(acceptor),
                Listen::Bind(transport) => transport.bind(&own).await.inspect(|_| {
                    info!(%transport, "hostnet-agent listening for the proxy");
                }),
            }
        }
    };
    let (shutdown_for_loop, relay_for_loop, tracker_for_loop) =
        (shutdown.clone(), relay.clone(), tracker.clone());
    let start = relay
        .bind_loop(&tracker, bind, move |acceptor, sessions: session::Sessions| async move {
            while let Some((stream, peer)) =
                next_accepted(|| acceptor.accept(), &shutdown_for_loop, "a stream").await
            {
                let sessions = sessions.clone();
                relay_for_loop.spawn_connection(stream, &tracker_for_loop, move |stream| async move {
                    sessions.handle(stream, peer).await
                });
            }
        })
        .await
        .map_err(|e| match e {
            BindLoopError::Bind(e) => AgentError::from(e),
            BindLoopError::Stopped => AgentError::Threads(std::io::Error::other(e.to_string())),
        })?;
    let Discovery { source, trigger } = discovery;
    let listeners =
        watcher::spawn(source, trigger, config.ignore_ports.clone(), own.clone(), &tracker, shutdown.clone())
            .map_err(AgentError::Discovery)?;
    let interceptor = match &config.host_transport {
        Some(spec) => match intercept::start(
            // With spares where the transport's set-up is a round trip through the VMM.
            spare::with_spares(
                spec.connector(),
                config.spare_streams.unwrap_or(spec.default_spare_streams()),
                config.reuse_streams,
            ),
            &own,
            &relay,
            &tracker,
            &shutdown,
        )
        .await
        {
            Ok(i) => Some(i),
            Err(e) => {
                warn!("guest→host is off: {e}");
                None
            }
        },
        None => None,
    };
    let sessions = session::Sessions::new(listeners, interceptor, own, shutdown.clone());
    let _ = start.send(sessions);
    shutdown.cancelled().await;
    hostnet_net::tasks::drain(&tracker, "hostnet-agent").await;
    info!("hostnet-agent stopped");
    Ok(())
}
