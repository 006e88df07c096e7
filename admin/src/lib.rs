//! hostnet's admin API (`docs/admin-api.md`): how `hostnet-proxy status|enable|disable` and
//! the settings window talk to a running proxy.
//!
//! Without features this crate does no I/O: the [`Request`] and [`Response`] types, the
//! [`Status`] the proxy reports, the user's [`Settings`](settings::Settings) with their
//! validation, and the choice of [`Endpoint`] from given inputs. Feature `client` adds
//! [`request`] (what the command line and the settings window use); feature `server` adds
//! [`serve`] (what the proxy runs). The endpoint is a Unix socket (`0600` in a `0700`
//! directory) on Linux and macOS, a named pipe only the user's account can open on Windows.
//!
//! At most [`MAX_CLIENTS`] connections are served at once; one more is answered "busy" and
//! closed, and [`request`] tries again until its deadline. A connection that sends no complete
//! request for [`IDLE_TIMEOUT`] (silent, or trickling a line byte by byte) or does not take an
//! answer within it is closed, so a crowd of silent connections holds the API for at most that
//! long.

use std::time::Duration;

pub mod api;
pub mod endpoint;
pub mod settings;

#[cfg(feature = "client")]
mod client;
#[cfg(feature = "server")]
mod server;
#[cfg(all(unix, any(feature = "client", feature = "server")))]
mod unix;
#[cfg(all(windows, any(feature = "client", feature = "server")))]
mod windows;

pub use api::{
    AgentLink, Direction, ErrorReply, ForwardState, ForwardStatus, Request, Response, Status, StreamPool,
};
#[cfg(feature = "client")]
pub use client::{ClientError, request};
#[cfg(any(feature = "client", feature = "server"))]
pub use endpoint::default_endpoint;
pub use endpoint::{Endpoint, EndpointError};
#[cfg(feature = "server")]
pub use server::{Handler, ServeError, serve};

/// Longest request line accepted.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// Longest answer line a client reads (a status with thousands of forwards fits easily).
pub const MAX_ANSWER_LEN: usize = 16 << 20;
/// Most admin connections served at once.
pub const MAX_CLIENTS: usize = 64;
/// How long a client has, from connecting or from its last answer, to send one complete
/// request line, and how long it has to take each answer. The CLI and the settings window
/// write their request as soon as they connect and read the answer at once (milliseconds), so
/// 10 s is ample even on a loaded machine — the transport handshake allows the same — while a
/// connection left open and silent, or trickling bytes, frees its place within 10 s.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`request`] keeps trying while the API is busy or slow: a busy API frees a place
/// within [`IDLE_TIMEOUT`], then the request itself takes milliseconds.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(IDLE_TIMEOUT.as_secs() + 5);
/// The variable that overrides the endpoint, for every client and server of this crate.
pub const ENDPOINT_ENV: &str = "HOSTNET_ADMIN_SOCKET";
