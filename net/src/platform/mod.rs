//! What each desktop OS says about its sockets and ports, behind one set of functions: where
//! the listening sockets come from ([`source`]), whose a socket is ([`is_this_users`]), which
//! program holds a port ([`port_holder`]), and why a bind was refused
//! ([`explain_bind_error`]). One module per OS (`linux.rs`, `macos.rs`, `windows.rs`) holds
//! the calls into it; the OS structures are read by pure parsers compiled and tested on every
//! platform ([`win_tables`], [`proc_info`], [`bind_errors`]).

pub mod bind_errors;
pub mod proc_info;
pub mod win_tables;

#[cfg(target_os = "linux")]
#[path = "linux.rs"]
mod os;
#[cfg(target_os = "macos")]
#[path = "macos.rs"]
mod os;
#[cfg(windows)]
#[path = "windows.rs"]
mod os;
#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
#[path = "other.rs"]
mod os;

use std::io;
use std::net::SocketAddr;

use hostnet_protocol::Proto;

use crate::watcher::{Found, ListenerSource};

/// This machine's source of listening sockets: `sock_diag` on Linux, the processes' socket
/// descriptors (`proc_pidfdinfo`) on macOS, `GetExtendedTcpTable`/`GetExtendedUdpTable` on
/// Windows.
pub fn source() -> io::Result<Box<dyn ListenerSource>> {
    os::source()
}

/// Whether `found` belongs to the user this process runs as: its owner uid against our
/// effective uid (Linux, macOS), its owning process's user SID against ours (Windows). `None`
/// when the OS does not say (unknown owner, a process that cannot be opened).
pub fn is_this_users(found: &Found) -> Option<bool> {
    os::is_this_users(found)
}

/// Which program holds `port` for `proto` on this machine, as `"name (pid N)"`, when the OS
/// tells (a program of another user may not be visible; Wine never tells). Reads the whole
/// socket table: call it once per conflict, not on a tick.
pub fn port_holder(proto: Proto, port: u16) -> Option<String> {
    os::port_holder(proto, port)
}

/// Why binding `addr` for `proto` failed with `e`, when this OS has a cause of its own to name
/// (Windows: an excluded port range; Linux and macOS: a privileged port), as a sentence the
/// user can act on. `None`: nothing more to say than the error itself.
pub fn explain_bind_error(proto: Proto, addr: SocketAddr, e: &io::Error) -> Option<String> {
    os::explain_bind_error(proto, addr, e)
}
