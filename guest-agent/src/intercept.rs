//! Guest→host: connections that guest processes make to `127.0.0.1:P` / `[::1]:P` for a port P
//! the desktop advertises reach the agent, which relays them to the proxy.
//!
//! One nftables table (`inet hostnet`) in prerouting on `lo` (`../shared/notes/guest-to-host.md`):
//! a `socket` lookup lets an existing guest listener on P win by itself; otherwise TPROXY hands
//! the connection to the agent's transparent listener, whose accepted socket's local address is
//! the original destination. Only the set of ports changes at run time. The agent's own sockets
//! carry [`AGENT_MARK`] (see [`crate::transparent`]) and are never caught. The table is removed when the agent stops.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;

use hostnet_net::Connector;
use hostnet_net::accept::next_accepted;
use hostnet_net::discovery::own::OwnSockets;
use hostnet_net::local::{LocalListener, LocalTcp};
use hostnet_net::relay::open::open_and_relay;
use hostnet_net::relay::tcp::RelayCounters;
use hostnet_net::threads::RelayThreads;
use hostnet_net::transport::handshake::OpenError;
use hostnet_protocol::{ListenerSet, Open, Proto};
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::transparent::AGENT_MARK;

/// The nftables table the agent owns (family `inet`).
pub const TABLE: &str = "hostnet";

#[derive(Debug, Error)]
pub enum InterceptError {
    #[error("cannot open the transparent listener on {0}: {1} (needs CAP_NET_ADMIN)")]
    Listener(SocketAddr, std::io::Error),
    #[error("cannot run `nft` (Debian: apt-get install nftables): {0}")]
    NftMissing(std::io::Error),
    #[error("nft rejected hostnet's rules: {0}")]
    Nft(String),
}

/// A running interception: feed it the desktop's advertised listeners.
#[derive(Debug, Clone)]
pub struct Interceptor {
    host: watch::Sender<Arc<ListenerSet>>,
}

impl Interceptor {
    /// Replaces the set of desktop listeners guest processes may reach.
    pub fn set_host_listeners(&self, set: ListenerSet) {
        self.host.send_if_modified(|cur| {
            if **cur == set {
                return false;
            }
            *cur = Arc::new(set);
            true
        });
    }

    pub fn host_listeners(&self) -> Arc<ListenerSet> {
        self.host.borrow().clone()
    }
}

/// Installs the table, starts the transparent listeners and the rule updater. On shutdown the
/// table is removed.
pub async fn start(
    to_host: Arc<dyn Connector>,
    own: &OwnSockets,
    relay: &Arc<RelayThreads>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Interceptor, InterceptError> {
    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0);
    let mut targets = Targets::default();
    let mut tcp_listeners = Vec::new();
    for addr in [v4, v6] {
        match crate::transparent::tcp_listener(addr, own).map_err(|e| InterceptError::Listener(addr, e)) {
            Ok(l) => {
                targets.0.push((Proto::Tcp, addr.ip(), l.local_addr().map(|a| a.port()).unwrap_or(0)));
                tcp_listeners.push(l);
            }
            Err(e) if addr.is_ipv4() => return Err(e),
            Err(e) => warn!("guest→host TCP over IPv6 is off: {e}"),
        }
    }
    let mut udp_sockets = Vec::new();
    for addr in [v4, v6] {
        match crate::transparent::udp_catch_all(addr, own) {
            Ok(s) => {
                targets.0.push((Proto::Udp, addr.ip(), s.local_addr().map(|a| a.port()).unwrap_or(0)));
                udp_sockets.push(s);
            }
            Err(e) => warn!("guest→host UDP over {} is off: {e} (needs CAP_NET_ADMIN)", addr.ip()),
        }
    }
    let ruleset = ruleset(&targets);
    let _ = nft(&["-f", "-"], &format!("delete table inet {TABLE}\n")).await; // stale, from a crash
    // Check now that nft takes the rules, so a problem shows at start; they are installed only
    // while there is something to intercept.
    nft(&["-c", "-f", "-"], &ruleset).await?;
    info!("guest→host interception ready (nftables table inet {TABLE} while desktop ports are advertised)");

    let (host, mut desired) = watch::channel(Arc::new(ListenerSet::new()));
    let stop = shutdown.clone();
    tracker.spawn(async move {
        let mut applied = (Vec::new(), Vec::new());
        let mut installed = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                changed = desired.changed() => if changed.is_err() { break },
            }
            let set = desired.borrow_and_update().clone();
            let of = |proto| -> Vec<u16> {
                set.ports().into_iter().filter(|(p, _)| *p == proto).map(|(_, port)| port).collect()
            };
            let ports = (of(Proto::Tcp), of(Proto::Udp));
            if ports == applied {
                continue;
            }
            let empty = ports.0.is_empty() && ports.1.is_empty();
            let script = match (empty, installed) {
                // Nothing to intercept (or guest→host switched off): no rules at all.
                (true, true) => format!("delete table inet {TABLE}\n"),
                (true, false) => String::new(),
                (false, true) => set_elements(&ports.0, &ports.1),
                (false, false) => format!("{ruleset}{}", set_elements(&ports.0, &ports.1)),
            };
            if script.is_empty() {
                applied = ports;
                continue;
            }
            match nft(&["-f", "-"], &script).await {
                Ok(()) => {
                    debug!(?ports, "guest→host ports updated");
                    installed = !empty;
                    applied = ports;
                }
                Err(e) => warn!("updating guest→host ports failed: {e}"),
            }
        }
        if installed {
            match nft(&["-f", "-"], &format!("delete table inet {TABLE}\n")).await {
                Ok(()) => info!("guest→host interception removed"),
                Err(e) => warn!("removing nftables table inet {TABLE} failed: {e}"),
            }
        }
    });
    for socket in udp_sockets {
        let (to_host, stop, tracker2) = (to_host.clone(), shutdown.clone(), tracker.clone());
        tracker.spawn(crate::intercept_udp::serve(socket, to_host, own.clone(), tracker2, stop));
    }
    for listener in tcp_listeners {
        let (to_host, stop, tracker2, relay2) =
            (to_host.clone(), shutdown.clone(), tracker.clone(), relay.clone());
        // On a relay thread, as the proxy's streams are served: the listener registered with
        // its reactor, the connections it accepts relayed there (`hostnet_net::threads`).
        relay.spawn_loop(tracker.track_future(async move {
            let listener = match LocalListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => return warn!("guest→host TCP is off: cannot serve the transparent listener: {e}"),
            };
            while let Some((conn, peer)) =
                next_accepted(|| listener.accept(), &stop, "an intercepted connection").await
            {
                let (to_host, stop) = (to_host.clone(), stop.clone());
                relay2
                    .spawn_connection(conn, &tracker2, move |conn| relay_to_host(conn, peer, to_host, stop));
            }
        }));
    }
    Ok(Interceptor { host })
}

/// One intercepted guest connection → one stream to the proxy.
async fn relay_to_host(
    conn: LocalTcp,
    peer: SocketAddr,
    to_host: Arc<dyn Connector>,
    shutdown: CancellationToken,
) {
    // TPROXY keeps the original destination as the accepted socket's local address.
    let Ok(original) = conn.local_addr() else { return };
    // At debug level, as the proxy's connection spans (`host-proxy/src/forward.rs`).
    let span = debug_span!("guest→host", port = original.port(), client = %peer);
    async move {
        // `TCP_NODELAY` comes from the transparent listener (`transparent::tcp_listener`).
        let stream = match to_host.connect().await {
            Ok(s) => s,
            Err(e) => {
                warn!(port = original.port(), "cannot reach the proxy for guest→host: {e}");
                let _ = hostnet_net::RawStream::set_reset_on_close(&conn);
                return;
            }
        };
        // As the proxy opens streams to us: our preface and `open` go out with the guest
        // client's first bytes, and the proxy's answer leads the way back.
        let open = Open::Tcp { addr: original.ip(), port: original.port(), peer: Some(peer) };
        let broken = |e: &OpenError| {
            warn!(port = original.port(), "the proxy did not answer a guest→host stream: {e}")
        };
        let counters = RelayCounters::default();
        let relayed = open_and_relay(conn, stream, &open, broken, &counters, &shutdown).await;
        if let Some((stream, _)) = relayed.reusable {
            to_host.give_back(stream);
        }
        debug!(outcome = ?relayed.outcome, ?counters, "guest→host connection finished");
    }
    .instrument(span)
    .await
}

/// The agent's transparent sockets the rules point at: (protocol, address) → port.
#[derive(Debug, Default)]
struct Targets(Vec<(Proto, IpAddr, u16)>);

/// The whole table. Loopback traffic re-enters through `lo`, so in prerouting the `socket`
/// expression really asks "does a guest socket own this?": if so the packet goes on as usual.
///
/// Every packet of the guest's loopback traffic runs this chain, not only hostnet's, so the two
/// rules after `iif` let a packet for a port nobody intercepts go on after one set lookup.
/// Without them it was checked against every rule below (~35 expressions): `perf` put ~11 % of
/// a loopback UDP sender's time in the guest (64-byte datagrams) in `nft_*`, ~0.1 µs a packet;
/// with them ~4–5 %.
fn ruleset(targets: &Targets) -> String {
    let mut rules = String::new();
    for &(proto, ip, port) in &targets.0 {
        let (family, to) = match ip {
            IpAddr::V4(_) => ("ip", format!("{ip}:{port}")),
            IpAddr::V6(_) => ("ip6", format!("[{ip}]:{port}")),
        };
        rules.push_str(&format!(
            "    {family} daddr {ip} {proto} dport @{proto}_ports socket transparent 0 return\n    \
             {family} daddr {ip} {proto} dport @{proto}_ports tproxy {family} to {to}\n"
        ));
    }
    format!(
        "table inet {TABLE} {{\n  \
           set tcp_ports {{ type inet_service; }}\n  \
           set udp_ports {{ type inet_service; }}\n  \
           chain prerouting {{\n    \
             type filter hook prerouting priority mangle; policy accept;\n    \
             iif != \"lo\" return\n    \
             meta l4proto tcp tcp dport != @tcp_ports return\n    \
             meta l4proto udp udp dport != @udp_ports return\n    \
             meta mark {AGENT_MARK:#x} return\n\
         {rules}  }}\n}}\n"
    )
}

/// One transaction that replaces both port sets.
fn set_elements(tcp: &[u16], udp: &[u16]) -> String {
    let mut s = String::new();
    for (name, ports) in [("tcp_ports", tcp), ("udp_ports", udp)] {
        s.push_str(&format!("flush set inet {TABLE} {name}\n"));
        if !ports.is_empty() {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            s.push_str(&format!("add element inet {TABLE} {name} {{ {} }}\n", list.join(", ")));
        }
    }
    s
}

/// Runs `nft ARGS` with `script` on its standard input.
async fn nft(args: &[&str], script: &str) -> Result<(), InterceptError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(InterceptError::NftMissing)?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes()).await;
    }
    let out = child.wait_with_output().await.map_err(InterceptError::NftMissing)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(InterceptError::Nft(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_points_each_protocol_and_family_at_its_socket() {
        let targets = Targets(vec![
            (Proto::Tcp, "127.0.0.1".parse().unwrap(), 41000),
            (Proto::Tcp, "::1".parse().unwrap(), 41001),
            (Proto::Udp, "127.0.0.1".parse().unwrap(), 41002),
        ]);
        let r = ruleset(&targets);
        assert!(r.contains("ip daddr 127.0.0.1 tcp dport @tcp_ports tproxy ip to 127.0.0.1:41000"), "{r}");
        assert!(r.contains("ip6 daddr ::1 tcp dport @tcp_ports tproxy ip6 to [::1]:41001"), "{r}");
        assert!(r.contains("ip daddr 127.0.0.1 udp dport @udp_ports socket transparent 0 return"), "{r}");
        assert!(r.contains("meta mark 0x686e6574 return"));
        let early =
            r.find("tcp dport != @tcp_ports return").expect("a port nobody intercepts returns at once");
        assert!(r.contains("udp dport != @udp_ports return"), "{r}");
        assert!(early < r.find("socket transparent").unwrap(), "before any per-target rule: {r}");
        assert!(!r.contains("ip6 daddr ::1 udp"), "no rule for a socket that is not there");
    }

    #[test]
    fn empty_port_sets_only_flush() {
        assert_eq!(
            set_elements(&[], &[]),
            "flush set inet hostnet tcp_ports\nflush set inet hostnet udp_ports\n"
        );
        assert!(set_elements(&[80, 8080], &[]).contains("add element inet hostnet tcp_ports { 80, 8080 }\n"));
        assert!(set_elements(&[], &[53]).ends_with("add element inet hostnet udp_ports { 53 }\n"));
    }
}
