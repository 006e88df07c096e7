//! I/O shared by `hostnet-proxy` and `hostnet-agent`.
//!
//! - [`stream`]: the readiness-based stream trait the relay is written against, and the one
//!   transport stream type every transport yields.
//! - [`transport`]: transport specs (`unix:`, `tcp:`, `vsock:`, `hybrid:`, `hyperv:`) and the
//!   [`Connector`](transport::Connector) / [`Acceptor`](transport::Acceptor) traits.
//! - [`hyperv`]: Hyper-V sockets on Windows hosts: the vsock port → service GUID mapping.
//! - [`handshake`]: preface and header frames at the start of a stream.
//! - [`relay`]: one TCP connection ↔ one data stream, FIN and RST carried in-band.
//! - [`discovery`]: listening sockets through netlink `sock_diag` (Linux).
//! - [`events`]: kernel listener events (eBPF) that wake the watcher at once.
//! - [`watcher`]: the thread both sides run over a listener source, woken by events or a tick.
//! - [`platform`]: each OS's listener source (sock_diag, macOS `proc_pidfdinfo`, Windows IP
//!   Helper tables), socket owners, port holders and bind errors explained.

pub mod accept;
pub mod cli;
pub mod connect;
#[cfg(target_os = "linux")]
pub mod discovery;
pub mod events;
pub mod handshake;
pub mod hyperv;
pub mod mmsg;
pub mod own;
pub mod platform;
pub mod relay;
pub mod splice;
pub mod stream;
pub mod sys;
pub mod transport;
pub mod udp;
#[cfg(target_os = "linux")]
mod vsock;
pub mod watcher;

pub use stream::{RawStream, TransportStream};
pub use transport::{Acceptor, Connector, TransportError, TransportSpec};
