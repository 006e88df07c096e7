//! Platforms hostnet has no listener source for: guest→host stays off there.

use std::io;
use std::net::SocketAddr;

use hostnet_protocol::Proto;

use crate::discovery::source::{Found, ListenerSource};

pub(super) fn source() -> io::Result<Box<dyn ListenerSource>> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "listener discovery is not implemented on this platform"))
}

pub(super) fn is_this_users(_found: &Found) -> Option<bool> {
    None
}

pub(super) fn port_holder(_proto: Proto, _port: u16) -> Option<String> {
    None
}

pub(super) fn explain_bind_error(_proto: Proto, _addr: SocketAddr, _e: &io::Error) -> Option<String> {
    None
}
