//! Moving bytes: one TCP connection over one data stream ([`tcp`], with the `splice(2)` gear
//! in [`splice`] on Linux; both ends of its opening in [`open`]), datagrams over a stream
//! ([`udp`], batched by [`mmsg`]) from the UDP sockets of [`socket`]. A connection's directions
//! are polled only when woken ([`woken`]).

pub mod mmsg;
pub mod open;
pub mod socket;
pub mod splice;
pub mod tcp;
pub mod udp;
pub mod woken;
