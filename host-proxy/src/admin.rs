//! The proxy's side of the admin API (`docs/admin-api.md`): answers each request from the
//! forwarding table, the link to the agent and the settings. The types, the endpoint, the
//! serving loop and its limits are `hostnet_admin`'s, shared with the command line and the
//! settings window.

use std::sync::Arc;

use hostnet_protocol::{ListenerSet, Proto};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

pub use hostnet_admin::{
    AgentLink, Direction, Endpoint, ForwardState, ForwardStatus, IDLE_TIMEOUT, MAX_CLIENTS, MAX_REQUEST_LEN,
    REQUEST_TIMEOUT, Request, Response, ServeError, Status, StreamPool, default_endpoint,
};
use hostnet_net::transport::Connector;

use crate::LinkState;
use crate::forward::Forwards;
use crate::guest_streams::{ToHost, ToHostStats};
use crate::serving::ForwardStats;
use crate::settings::SettingsHandle;

/// What the API serves from.
#[derive(Debug, Clone)]
pub struct Admin {
    pub forwards: Forwards,
    pub settings: SettingsHandle,
    pub link: watch::Receiver<LinkState>,
    pub host: watch::Receiver<Arc<ListenerSet>>,
    pub to_host: ToHost,
    pub to_host_stats: ToHostStats,
    /// The streams to the agent (its pool of held streams shows in `status`).
    pub connector: Arc<dyn Connector>,
}

impl Admin {
    pub fn status(&self) -> Status {
        let settings = self.settings.current();
        let (agent, agent_error) = match &*self.link.borrow() {
            LinkState::Connected { .. } => (AgentLink::Connected, None),
            LinkState::Connecting => (AgentLink::Connecting, None),
            LinkState::Disconnected { error } => (AgentLink::Disconnected, Some(error.clone())),
        };
        let mut forwards: Vec<ForwardStatus> = self.forwards.status();
        let host = self.host.borrow().clone();
        let stats = self.to_host_stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (proto, port) in host.ports() {
            let addrs = host
                .iter()
                .filter(|l| l.proto == proto && l.port == port)
                .map(|l| l.connect_addr())
                .collect();
            let counts = stats.get(&(proto, port)).cloned().unwrap_or_default();
            forwards.push(to_host_status(proto, port, addrs, &counts));
        }
        // Desktop listeners the guest may not reach, and why (the guest→host policy).
        let withheld = self.to_host.withheld.borrow().clone();
        for (l, why) in withheld.iter() {
            forwards.push(ForwardStatus {
                state: ForwardState::NotOffered,
                reason: Some(format!("{}: {why}", std::net::SocketAddr::new(l.addr, l.port))),
                ..to_host_status(l.proto, l.port, Vec::new(), &ForwardStats::default())
            });
        }
        let mut limits = Vec::new();
        let limited: Vec<String> = forwards
            .iter()
            .filter(|f| f.state == ForwardState::Limited)
            .map(|f| format!("{}/{}", f.proto, f.guest_port))
            .collect();
        if let (Some(first), Some(last)) = (limited.first(), limited.last()) {
            limits.push(format!(
                "{} guest port(s) not forwarded over the limits on host ports ({first} … {last}; each forward says which limit)",
                limited.len()
            ));
        }
        let foreign = self.to_host.foreign_refused.get();
        if let (true, Some(vm)) = (foreign > 0, self.to_host.guest_vm) {
            limits
                .push(format!("{foreign} guest→host stream(s) refused from peers other than the VM ({vm})"));
        }
        let refused = self.to_host.streams_refused.get();
        if refused > 0 {
            limits.push(format!(
                "{refused} guest→host stream(s) closed at once: {} were open, the limit (--max-guest-streams)",
                self.to_host.max_streams
            ));
        }
        let dropped = crate::udp::datagrams_dropped();
        if dropped > 0 {
            limits.push(format!(
                "{dropped} UDP datagram(s) to the guest dropped: a flow's queue was full ({} batches or {} MiB), or all flows' queues held {} MiB",
                crate::limits::FLOW_QUEUE_LEN,
                crate::limits::FLOW_QUEUE_BYTES >> 20,
                crate::limits::UDP_QUEUED_BYTES >> 20
            ));
        }
        let over_budget = hostnet_net::relay::tcp::buffers_over_budget();
        if over_budget > 0 {
            limits.push(format!(
                "{over_budget} bulk transfer(s) relayed with 256 KiB buffers: {} MiB of 1 MiB buffers were in use, the limit",
                hostnet_net::relay::tcp::LARGE_BUFFERS_BUDGET >> 20
            ));
        }
        Status {
            enabled: settings.enabled,
            agent,
            agent_error,
            settings_path: self.settings.path.clone(),
            errors: self.settings.error().into_iter().collect(),
            forwards,
            limits,
            streams: self.connector.pool().map(|p| StreamPool {
                held: p.ready,
                limit: p.limit,
                taken: p.taken,
                kept: p.kept,
                dropped: p.dropped,
            }),
        }
    }

    /// The answer to one request.
    pub fn answer(&self, request: Request) -> Response {
        let status = |this: &Self| Response::Status(Box::new(this.status()));
        match request {
            Request::Status {} => status(self),
            Request::GetSettings {} => Response::Settings {
                settings: (*self.settings.current()).clone(),
                path: self.settings.path.clone(),
            },
            Request::SetEnabled { enabled } => match self.settings.update(|s| s.enabled = enabled) {
                Ok(_) => {
                    info!(
                        "host networking {} through the admin API",
                        if enabled { "enabled" } else { "disabled" }
                    );
                    status(self)
                }
                Err(e) => Response::field_error(e.to_string(), e.key()),
            },
            Request::UpdateSettings { settings } => match self.settings.update(|s| *s = settings) {
                Ok(_) => status(self),
                Err(e) => Response::field_error(e.to_string(), e.key()),
            },
        }
    }
}

fn to_host_status(
    proto: Proto,
    port: u16,
    host_addresses: Vec<std::net::IpAddr>,
    counts: &ForwardStats,
) -> ForwardStatus {
    use std::sync::atomic::Ordering::Relaxed;
    ForwardStatus {
        proto,
        direction: Direction::ToHost,
        guest_port: port,
        host_port: port,
        state: ForwardState::Forwarding,
        reason: None,
        host_addresses,
        connections_active: counts.active.load(Relaxed),
        connections_total: counts.total.load(Relaxed),
        connections_refused: counts.refused.load(Relaxed),
        bytes_to_guest: counts.bytes.to_peer.load(Relaxed),
        bytes_from_guest: counts.bytes.from_peer.load(Relaxed),
    }
}

/// Serves the admin API at `endpoint` until `shutdown` (see `hostnet_admin::serve`).
pub fn serve(
    endpoint: &Endpoint,
    api: Admin,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), ServeError> {
    hostnet_admin::serve(endpoint, move |r| api.answer(r), tracker, shutdown)
}
