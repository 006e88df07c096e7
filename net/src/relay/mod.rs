//! Moving bytes: one TCP connection over one data stream ([`tcp`], with the `splice(2)` gear
//! in [`splice`] on Linux), datagrams over a stream ([`udp`], batched by [`mmsg`]).

pub mod mmsg;
pub mod splice;
pub mod tcp;
pub mod udp;
