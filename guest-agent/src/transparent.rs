//! The sockets the agent opens to intercept guest→host traffic: transparent (`IP_TRANSPARENT`,
//! so TPROXY can hand them traffic for addresses they were not bound to), and carrying
//! [`AGENT_MARK`], like every socket of the agent's own, so the rules never catch the agent.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use hostnet_net::discovery::own::OwnSockets;
use hostnet_net::relay::socket::UdpSocket;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt};
use socket2::{Socket, Type};

/// `SO_MARK` on every socket the agent opens itself, so its own traffic is never intercepted.
pub const AGENT_MARK: u32 = 0x686e_6574; // "hnet"

/// The transparent TCP listener TPROXY hands new connections to.
/// Non-blocking, not yet registered with a reactor: its accept loop runs on a relay thread.
pub fn tcp_listener(addr: SocketAddr, own: &OwnSockets) -> io::Result<std::net::TcpListener> {
    let s = own.socket(addr, Type::STREAM)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
    }
    s.set_mark(AGENT_MARK)?;
    // Accepted sockets inherit it: their local address is the original destination
    // (127.0.0.1:P), and without SO_REUSEADDR they, or their TIME_WAIT, would stop a guest
    // server from binding P later.
    s.set_reuse_address(true)?;
    // Every accepted connection inherits it: no system call per intercepted connection.
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// The transparent socket TPROXY sends new flows to.
pub fn udp_catch_all(addr: SocketAddr, own: &OwnSockets) -> io::Result<UdpSocket> {
    let s = udp_socket(addr, own)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        setsockopt(&s, sockopt::Ipv6OrigDstAddr, &true)?;
    } else {
        setsockopt(&s, sockopt::Ipv4OrigDstAddr, &true)?;
    }
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

fn udp_socket(addr: SocketAddr, own: &OwnSockets) -> io::Result<Socket> {
    let s = own.socket(addr, Type::DGRAM)?;
    if addr.is_ipv6() {
        s.set_ip_transparent_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
    }
    s.set_mark(AGENT_MARK)?;
    s.set_reuse_address(true)?;
    hostnet_net::relay::udp::size_receive_buffer(socket2::SockRef::from(&s));
    Ok(s)
}

/// A flow's own socket: bound to the address the client sent to, connected to the client.
pub fn udp_flow_socket(original: SocketAddr, client: SocketAddr, own: &OwnSockets) -> io::Result<UdpSocket> {
    let s = udp_socket(original, own)?;
    if original.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&original.into())?;
    s.connect(&client.into())?;
    UdpSocket::from_std(s.into())
}

/// Receives one datagram with its original destination.
pub fn recv_with_original(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, SocketAddr)> {
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
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
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
    let original = original.ok_or_else(|| io::Error::other("datagram without its original destination"))?;
    Ok((msg.bytes, from, original))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root (`IP_TRANSPARENT` and `SO_MARK` need CAP_NET_ADMIN), as the README's test
    /// command runs.
    #[test]
    fn intercepted_connections_inherit_nodelay_from_the_transparent_listener() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (a transparent socket); run the README's test command as root"
        );
        let listener = tcp_listener("127.0.0.1:0".parse().unwrap(), &OwnSockets::new()).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap(), "an accepted connection without TCP_NODELAY");
    }
}
