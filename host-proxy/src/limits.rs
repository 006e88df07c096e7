//! What the proxy lets the guest (and desktop clients) make it spend, in one place: each limit
//! with its flag or setting, and where the agent has a counterpart
//! (`guest-agent/src/limits.rs`), why the two differ. Reaching any of them is counted and shown
//! in `status`; docs/security.md lists them all.
//!
//! The limits on forwarded ports (how many, how many in the ephemeral range) are settings and
//! live with them (`hostnet_admin::settings::ForwardLimits`); the frame and opening sizes the
//! protocol bounds are in `hostnet_protocol::frame`.

use std::time::Duration;

/// Most relayed connections open at once (all ports together), unless `--max-connections`
/// says otherwise; past it new ones are reset at once, counted in `status` and logged. No
/// counterpart in the agent: each of these is one stream the proxy opened to it.
pub const MAX_CONNECTIONS: usize = 16_384;

/// Most guest→host streams served at once — TCP connections, UDP flows and openings not yet
/// complete, together — unless `--max-guest-streams` says otherwise. Past it a new stream is
/// closed at once and counted in `status`: the guest cannot spend the proxy's descriptors
/// (the admin API, and so `hostnet-proxy disable`, keeps working). The agent's own guest→host
/// UDP cap (1024 flows) keeps its UDP to a quarter of this, so TCP always has room.
pub const MAX_GUEST_STREAMS: usize = 4096;

/// Most desktop→guest UDP flows open at once (all ports together), unless `--max-udp-flows`
/// says otherwise; datagrams from new clients beyond it are dropped, counted in `status` and
/// logged. Four times the agent's guest→host cap (1024): a desktop client that takes a new
/// source port per request (a DNS resolver) makes a flow per request, and each stays until
/// [`UDP_IDLE_TIMEOUT`]; a flow here costs the desktop one stream and no bound port.
pub const MAX_UDP_FLOWS: usize = 4096;

/// A desktop→guest flow with no datagram either way for this long is closed. Twice the agent's
/// 30 s for guest→host flows: a flow here holds no port, so it can wait out clients that
/// send a keep-alive every 30 s; the agent's flow sockets are bound to the port in the guest
/// and would keep a guest server from binding it, so they go sooner.
pub const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Batches of datagrams (what one receive took from the flow's client) queued per
/// desktop→guest flow while its stream is busy; beyond either bound they are dropped and
/// counted. The count bounds tiny datagrams, the bytes large ones. Far more
/// than the agent's 256: this queue is on the path of every datagram and absorbs a client's
/// burst while the stream writes, where the agent's only holds what arrived in the moment
/// before a new flow's own socket was in place.
pub const FLOW_QUEUE_LEN: usize = 8192;
/// See [`FLOW_QUEUE_LEN`].
pub const FLOW_QUEUE_BYTES: usize = 4 << 20;
/// Bytes queued in all desktop→guest flows together: without it, [`MAX_UDP_FLOWS`] full
/// queues of [`FLOW_QUEUE_BYTES`] could hold 16 GiB while a guest stops reading its streams.
/// Past it datagrams are dropped and counted in `status`, as at a full flow queue. A burst at
/// the lossless rate queues well under 1 MiB; this leaves room for many busy flows at once.
pub const UDP_QUEUED_BYTES: usize = 64 << 20;

/// A guest→host UDP flow's end in the proxy closes after this long without a datagram. The
/// agent closes idle flows after 30 s and ends the stream; this only bounds a flow whose agent
/// went quiet.
pub const GUEST_FLOW_IDLE_BACKSTOP: Duration = Duration::from_secs(120);

/// How many connections and flows the proxy serves at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Relayed TCP connections open at once.
    pub connections: usize,
    /// UDP flows open at once.
    pub udp_flows: usize,
    /// Guest→host streams (connections, flows, openings) served at once.
    pub guest_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { connections: MAX_CONNECTIONS, udp_flows: MAX_UDP_FLOWS, guest_streams: MAX_GUEST_STREAMS }
    }
}
