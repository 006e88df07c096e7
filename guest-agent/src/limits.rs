//! What the agent lets guest processes make it spend, in one place: each limit with why it
//! differs from the proxy's counterpart (`host-proxy/src/limits.rs`). The proxy holds the
//! limits that protect the desktop — a hostile guest can run its own agent, so no limit here
//! protects the desktop; these keep an honest agent within what the proxy will take and keep
//! its flows from getting in a guest server's way.

use std::time::Duration;

/// Most guest→host UDP flows at once; datagrams of new flows beyond it are dropped and counted.
/// A quarter of the proxy's `MAX_GUEST_STREAMS` (4096), which every guest→host flow and TCP
/// connection counts against: UDP alone cannot fill it and leave TCP none. The proxy's 4096
/// desktop→guest flows are a different budget (streams it opens itself).
pub const MAX_FLOWS: usize = 1024;

/// A guest→host UDP flow with no datagram either way for this long is closed. Half the proxy's
/// 60 s for desktop→guest flows: a flow's socket here is bound to `127.0.0.1:P` in the guest,
/// so while it is open a guest server starting later cannot bind P; the proxy's flows hold no
/// port and can wait longer.
pub const FLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Datagrams that reached the catch-all socket for a flow whose own socket was not yet in
/// place, queued for it. Far fewer than the proxy's 8192: after the first moments TPROXY hands
/// a flow's datagrams to its own socket and this queue is empty, while the proxy's queue is on
/// the path of every datagram.
pub const FLOW_QUEUE_LEN: usize = 256;
