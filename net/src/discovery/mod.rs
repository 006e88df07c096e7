//! Listener discovery: which sockets listen on this machine, read from each OS's source and
//! published as the forwardable set.
//!
//! One-way, bottom up: [`source`] (what a source reports) ← [`platform`] and [`sock_diag`]
//! (the sources), [`events`] (kernel listener events, eBPF), [`own`] (the side's own sockets,
//! never published) ← [`watcher`] (the thread that reads a source and publishes the set).

pub mod events;
pub mod own;
pub mod platform;
#[cfg(target_os = "linux")]
pub mod sock_diag;
pub mod source;
pub mod watcher;
