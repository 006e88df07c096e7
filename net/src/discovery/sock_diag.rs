//! Listening sockets of this network namespace, through netlink `sock_diag` (`INET_DIAG`).
//!
//! One dump per family, asking only for sockets in the LISTEN state, so established
//! connections cost nothing (`../shared/notes/discovery.md` has the measurements). The kernel
//! answers for the namespace the netlink socket was created in.

use std::io;

use hostnet_protocol::{Listener, Proto};

use crate::discovery::source::{Found, ListenerSource, Table};
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// Receive buffer for dump replies; the kernel fills up to this much per `recv`.
const RECV_BUF_LEN: usize = 64 * 1024;

/// A `sock_diag` netlink socket, reused for every dump.
#[derive(Debug)]
pub struct SockDiag {
    socket: Socket,
    buf: Vec<u8>,
    seq: u32,
}

impl SockDiag {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(SockDiag { socket, buf: vec![0; RECV_BUF_LEN], seq: 0 })
    }

    /// Appends every TCP socket in LISTEN state, IPv4 and IPv6, to `out`.
    pub fn tcp_listeners(&mut self, out: &mut Vec<Found>) -> io::Result<()> {
        self.tables(Proto::Tcp, out)
    }

    /// Appends every UDP socket bound to a port, IPv4 and IPv6, to `out`: unconnected ones
    /// (a server's) and connected ones, marked `connected` (a client's — or a server's that
    /// took a peer, see the watcher).
    pub fn udp_bound(&mut self, out: &mut Vec<Found>) -> io::Result<()> {
        self.tables(Proto::Udp, out)
    }

    fn tables(&mut self, proto: Proto, out: &mut Vec<Found>) -> io::Result<()> {
        for table in Table::ALL.into_iter().filter(|t| t.proto == proto) {
            self.table(table, out)?;
        }
        Ok(())
    }

    /// Appends the sockets of one table to `out`: TCP listeners, or bound UDP sockets.
    pub fn table(&mut self, table: Table, out: &mut Vec<Found>) -> io::Result<()> {
        let family = if table.v6 { AF_INET6 } else { AF_INET };
        match table.proto {
            Proto::Tcp => self.dump(family, IPPROTO_TCP, StateFlags::LISTEN, out),
            // An unconnected UDP socket sits in TCP_CLOSE; a connected one in TCP_ESTABLISHED.
            Proto::Udp => self.dump(family, IPPROTO_UDP, StateFlags::CLOSE | StateFlags::ESTABLISHED, out),
        }
    }

    fn dump(&mut self, family: u8, protocol: u8, states: StateFlags, out: &mut Vec<Found>) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol,
                extensions: ExtensionFlags::empty(),
                states,
                socket_id,
            })
            .into(),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;

        let proto = if protocol == IPPROTO_TCP { Proto::Tcp } else { Proto::Udp };
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let bytes = self.buf.get(offset..n).unwrap_or_default();
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(bytes).map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag reply: {e}"))
                })?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => return Err(e.to_io()),
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r))
                        if msg.header.sequence_number == self.seq
                            && (proto == Proto::Udp || r.header.socket_id.destination_port == 0) =>
                    {
                        out.push(Found {
                            listener: Listener {
                                proto,
                                addr: r.header.socket_id.source_address,
                                port: r.header.socket_id.source_port,
                            },
                            inode: r.header.inode,
                            uid: Some(r.header.uid),
                            pid: None,
                            connected: r.header.socket_id.destination_port != 0,
                        });
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}

/// Which program holds `port` for `proto` on this machine: `"name (pid N)"`, when the kernel
/// and `/proc` tell (a program of another user may not be visible). Walks `/proc`: call it
/// once per conflict, not on a tick.
pub fn port_holder(proto: Proto, port: u16) -> Option<String> {
    let mut diag = SockDiag::open().ok()?;
    let mut found = Vec::new();
    match proto {
        Proto::Tcp => diag.tcp_listeners(&mut found).ok()?,
        Proto::Udp => diag.udp_bound(&mut found).ok()?,
    }
    let inodes: std::collections::HashSet<String> = found
        .iter()
        .filter(|f| f.listener.port == port && f.inode != 0)
        .map(|f| format!("socket:[{}]", f.inode))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = proc_entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            if target.to_str().is_some_and(|t| inodes.contains(t)) {
                let comm = std::fs::read_to_string(proc_entry.path().join("comm")).unwrap_or_default();
                return Some(format!("{} (pid {pid})", comm.trim()));
            }
        }
    }
    None
}

impl ListenerSource for SockDiag {
    fn read(&mut self, table: Table, out: &mut Vec<Found>) -> io::Result<()> {
        self.table(table, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv6Addr, TcpListener};

    fn listeners() -> Vec<Found> {
        let mut out = Vec::new();
        SockDiag::open().unwrap().tcp_listeners(&mut out).unwrap();
        out
    }

    #[test]
    fn sees_a_new_listener_and_its_close() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let want = Listener { proto: Proto::Tcp, addr: "127.0.0.1".parse().unwrap(), port };
        assert!(listeners().iter().any(|f| f.listener == want), "listener on {port} not reported");
        drop(l);
        assert!(!listeners().iter().any(|f| f.listener == want), "closed listener still reported");
    }

    #[test]
    fn sees_ipv6_listeners() {
        let Ok(l) = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) else {
            return; // No IPv6 on this machine: nothing to see.
        };
        let port = l.local_addr().unwrap().port();
        assert!(
            listeners().iter().any(|f| f.listener.port == port && f.listener.addr == Ipv6Addr::LOCALHOST)
        );
    }

    #[test]
    fn sees_bound_udp_sockets_and_marks_connected_ones() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let server_port = server.local_addr().unwrap().port();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        let client_port = client.local_addr().unwrap().port();
        let mut out = Vec::new();
        SockDiag::open().unwrap().udp_bound(&mut out).unwrap();
        let want = Listener { proto: Proto::Udp, addr: "127.0.0.1".parse().unwrap(), port: server_port };
        assert!(
            out.iter().any(|f| f.listener == want && !f.connected),
            "bound UDP socket {server_port} not reported as unconnected"
        );
        let client_found: Vec<_> = out.iter().filter(|f| f.listener.port == client_port).collect();
        assert!(
            !client_found.is_empty() && client_found.iter().all(|f| f.connected),
            "connected client not reported as connected: {client_found:?}"
        );
        drop(server);
        out.clear();
        SockDiag::open().unwrap().udp_bound(&mut out).unwrap();
        assert!(!out.iter().any(|f| f.listener == want), "closed UDP socket still reported");
    }

    #[test]
    fn names_the_program_holding_a_port() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let holder = port_holder(Proto::Tcp, port).expect("our own listener is found");
        assert!(holder.contains(&format!("pid {}", std::process::id())), "{holder}");
        drop(l);
        assert_eq!(port_holder(Proto::Tcp, port), None);
    }

    #[test]
    fn connected_sockets_are_not_listeners() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let c = std::net::TcpStream::connect(addr).unwrap();
        let client_port = c.local_addr().unwrap().port();
        assert!(!listeners().iter().any(|f| f.listener.port == client_port));
    }
}
