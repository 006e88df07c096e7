//! I/O shared by `hostnet-proxy` and `hostnet-agent`, by concern, imports one way (each folder
//! only uses the ones listed before it):
//!
//! - [`sys`], [`scratch`], [`accept`], [`connect`], [`cli`], [`tasks`], [`tally`], [`threads`]:
//!   the socket boundary (one set of calls for Unix and Windows), the per-thread scratch
//!   buffer, the accept loop, connecting with a deadline, the shutdown signal of a `main`, the
//!   drain at the end of `run`, counts of refusals that log only at each doubling, the relay
//!   threads a connection lives on.
//! - [`discovery`]: which sockets listen on this machine — each OS's source, kernel events,
//!   the side's own sockets, the watcher thread.
//! - [`transport`]: how the two sides reach each other — transport specs (`unix:`, `tcp:`,
//!   `vsock:`, `hybrid:`, `hyperv:`), connectors and acceptors, the one stream type, the
//!   frames at a stream's start.
//! - [`relay`]: moving bytes — one TCP connection over one data stream (FIN and RST in-band,
//!   `splice(2)` on Linux), datagrams over a stream.

pub mod accept;
pub mod cli;
pub mod connect;
pub mod deadline;
pub mod discovery;
pub mod local;
pub mod relay;
pub(crate) mod scratch;
pub mod sys;
pub mod tally;
pub mod tasks;
pub mod threads;
pub mod transport;

pub use transport::raw::RawStream;
pub use transport::stream::TransportStream;
pub use transport::{Acceptor, Connector, TransportError, TransportSpec};
