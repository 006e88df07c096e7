//! Guest→host UDP: datagrams guest processes send to `127.0.0.1:P` / `[::1]:P` for an advertised
//! desktop UDP port P.
//!
//! TPROXY hands the first datagram of a flow to the agent's transparent socket, whose
//! `IP_RECVORIGDSTADDR` control message tells P. The agent then opens a socket of the flow's
//! own: transparent, bound to the original destination and `connect`ed to the guest client.
//! TPROXY's established-socket lookup delivers the flow's later datagrams straight to it, and
//! replies sent from it reach the client from `127.0.0.1:P`, as the client expects. Flow
//! sockets close after [`FLOW_IDLE_TIMEOUT`], so they do not keep P bound against a guest
//! server that starts later.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hostnet_net::Connector;
use hostnet_net::handshake::{self, OpenError};
use hostnet_net::own::OwnSockets;
use hostnet_net::udp::{Activity, DatagramBatch};
use hostnet_protocol::Open;
use hostnet_protocol::datagram::MAX_DATAGRAM_LEN;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt};
use socket2::{Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::intercept::AGENT_MARK;

/// A guest→host UDP flow with no datagram either way for this long is closed.
pub const FLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most guest→host UDP flows at once; datagrams of new flows beyond it are dropped and counted.
pub const MAX_FLOWS: usize = 1024;
/// Datagrams that reached the catch-all socket for a flow whose own socket was not yet in
/// place, queued for it.
const FLOW_QUEUE_LEN: usize = 256;

/// The transparent socket TPROXY sends new flows to.
pub fn catch_all(addr: SocketAddr, own: &OwnSockets) -> std::io::Result<UdpSocket> {
    let s = transparent_udp(addr, own)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        setsockopt(&s, sockopt::Ipv6OrigDstAddr, &true)?;
    } else {
        setsockopt(&s, sockopt::Ipv4OrigDstAddr, &true)?;
    }
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

fn transparent_udp(addr: SocketAddr, own: &OwnSockets) -> std::io::Result<Socket> {
    let s = own.socket(addr, Type::DGRAM)?;
    if addr.is_ipv6() {
        s.set_ip_transparent_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
    }
    s.set_mark(AGENT_MARK)?;
    s.set_reuse_address(true)?;
    hostnet_net::udp::size_receive_buffer(socket2::SockRef::from(&s));
    Ok(s)
}

/// A flow's own socket: bound to the address the client sent to, connected to the client.
fn flow_socket(original: SocketAddr, client: SocketAddr, own: &OwnSockets) -> std::io::Result<UdpSocket> {
    let s = transparent_udp(original, own)?;
    if original.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&original.into())?;
    s.connect(&client.into())?;
    UdpSocket::from_std(s.into())
}

/// Receives one datagram with its original destination.
fn recv_with_original(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, SocketAddr)> {
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(socket.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())?;
    let from = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::V4((*v4).into()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
        })
        .ok_or_else(|| std::io::Error::other("datagram without a source address"))?;
    let mut original = None;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                original = Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                original = Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(a.sin6_port), 0, 0)));
            }
            _ => {}
        }
    }
    let original =
        original.ok_or_else(|| std::io::Error::other("datagram without its original destination"))?;
    Ok((msg.bytes, from, original))
}

/// Serves one catch-all socket until `shutdown`.
pub async fn serve(
    socket: UdpSocket,
    to_host: Arc<dyn Connector>,
    own: OwnSockets,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut flows: HashMap<(SocketAddr, SocketAddr), mpsc::Sender<Bytes>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
    let mut dropped = 0u64;
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.async_io(Interest::READABLE, || recv_with_original(&socket, &mut buf)) => r,
        };
        let (n, client, original) = match received {
            Ok(r) => r,
            Err(e) => {
                debug!("guest→host udp receive: {e}");
                continue;
            }
        };
        let datagram = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
        let key = (client, original);
        if let Some(tx) = flows.get(&key).filter(|tx| !tx.is_closed()) {
            if tx.try_send(datagram).is_err() {
                dropped += 1;
                if dropped.is_power_of_two() {
                    warn!(%client, %original, dropped, "guest→host udp queue full: dropping");
                }
            }
            continue;
        }
        flows.retain(|_, tx| !tx.is_closed());
        if flows.len() >= MAX_FLOWS {
            dropped += 1;
            if dropped.is_power_of_two() {
                warn!(dropped, "over {MAX_FLOWS} guest→host UDP flows: dropping datagrams of new flows");
            }
            continue;
        }
        let socket = match flow_socket(original, client, &own) {
            Ok(s) => s,
            Err(e) => {
                warn!(%client, %original, "cannot open the flow's socket: {e}");
                continue;
            }
        };
        let (tx, rx) = mpsc::channel(FLOW_QUEUE_LEN);
        let _ = tx.try_send(datagram);
        flows.insert(key, tx);
        let span = info_span!("guest→host udp", port = original.port(), %client);
        tracker.spawn(flow(socket, rx, original, client, to_host.clone(), shutdown.clone()).instrument(span));
    }
}

/// One flow: its socket and the datagrams queued for it ⇄ a data stream to the proxy.
async fn flow(
    socket: UdpSocket,
    mut queued: mpsc::Receiver<Bytes>,
    original: SocketAddr,
    client: SocketAddr,
    to_host: Arc<dyn Connector>,
    shutdown: CancellationToken,
) {
    let open = Open::Udp { addr: original.ip(), port: original.port(), peer: Some(client) };
    let (stream, mut reader) = match handshake::open_stream(&*to_host, &open).await {
        Ok(opened) => opened,
        Err(e @ OpenError::Refused(_)) => return debug!("proxy {e}"),
        Err(e) => return warn!("cannot reach the proxy for guest→host: {e}"),
    };
    let activity = Activity::new();
    // Guest client → host: from the queue (datagrams that beat the flow socket) and the socket.
    let up = async {
        let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
        let mut batch = DatagramBatch::default();
        loop {
            tokio::select! {
                d = queued.recv(), if !queued.is_closed() => match d {
                    Some(d) => { batch.push(&d); }
                    None => continue,
                },
                r = socket.recv(&mut buf) => match r {
                    Ok(n) => { batch.push(buf.get(..n).unwrap_or_default()); }
                    Err(_) => continue,
                },
            }
            activity.touch();
            if batch.flush(&stream).await.is_err() {
                return;
            }
        }
    };
    // Host → guest client, from the original destination's address.
    let down = async {
        while let Ok(Some(d)) = reader.read_datagram(&stream).await {
            let _ = socket.send(&d).await;
            activity.touch();
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = activity.idle_for(FLOW_IDLE_TIMEOUT) => debug!("idle: flow closed"),
        _ = up => {}
        _ = down => {}
    }
}
