//! Linux: sockets from netlink `sock_diag` (`crate::discovery`), owners by uid, holders
//! through `/proc`.

use std::io;
use std::net::SocketAddr;

use hostnet_protocol::Proto;

use super::bind_errors;
use crate::discovery::source::{Found, ListenerSource};

pub(super) fn source() -> io::Result<Box<dyn ListenerSource>> {
    Ok(Box::new(crate::discovery::sock_diag::SockDiag::open()?))
}

pub(super) fn is_this_users(found: &Found) -> Option<bool> {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    found.uid.map(|uid| uid == euid)
}

pub(super) fn port_holder(proto: Proto, port: u16) -> Option<String> {
    crate::discovery::sock_diag::port_holder(proto, port)
}

pub(super) fn explain_bind_error(_proto: Proto, addr: SocketAddr, e: &io::Error) -> Option<String> {
    if e.raw_os_error() != Some(libc::EACCES) {
        return None;
    }
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    bind_errors::linux_low_port(addr, start)
}
