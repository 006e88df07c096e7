//! hostnet's wire protocol, without I/O.
//!
//! Every transport stream carries, in each direction:
//!
//! 1. a [`Preface`]: magic bytes and the protocol version, so a mismatch is a sentence, not garbage;
//! 2. length-prefixed JSON [frames](frame) — on the control stream for its whole life, on a data
//!    stream just the [`Open`] header (initiator) and the [`OpenReply`] (responder);
//! 3. on a UDP data stream, after the header, length-prefixed [datagrams](datagram);
//! 4. on a TCP data stream, after the header, raw bytes cut into [chunks](chunk) whose 4-byte
//!    header also carries FIN and RST, because some transports cannot carry a half-close.
//!
//! Every decoder here takes hostile bytes: lengths are bounded before anything is allocated,
//! and nothing panics. `docs/protocol.md` describes the bytes.

#![forbid(unsafe_code)]

pub mod chunk;
pub mod datagram;
pub mod frame;
pub mod listener;
pub mod preface;
pub mod session;

pub use chunk::{ChunkDecoder, ChunkError, ChunkEvent, MAX_CHUNK_LEN};
pub use frame::{
    AgentFrame, FrameDecoder, FrameError, LISTENERS_PER_FRAME, MAX_FRAME_LEN, MAX_OPENING_LEN, Open,
    OpenReply, ProxyFrame, Role, ShowPeer, SnapshotParts, encode_frame, listener_chunks,
};
pub use listener::{Listener, ListenerSet, Proto};
pub use preface::{PREFACE_LEN, Preface, PrefaceError, VERSION};
