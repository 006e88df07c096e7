//! Both ends of a data stream around the TCP relay: the side that opens it (the proxy for a
//! desktop client, the agent for an intercepted guest client) and the side that answers (the
//! agent connecting to the guest server, the proxy to the desktop server). Neither waits a
//! round trip before the first byte: the opening goes out in the same write as the client's
//! first bytes, and `connected` in the same write as the server's (`docs/protocol.md`,
//! sections 3 and 5).

use bytes::BytesMut;
use hostnet_protocol::chunk::RST;
use hostnet_protocol::{Open, OpenReply};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::local::LocalTcp;
use crate::relay::tcp::{Outcome, RelayCounters, relay_after, relay_answering};
use crate::transport::handshake::{self, FrameReader, OpenError};
use crate::transport::raw::RawStream;
use crate::transport::roaming::Roaming;
use crate::transport::stream::TransportStream;

/// How a connection relayed over a data stream ended, and the stream if another connection
/// may follow on it (both directions ended with FIN: `docs/protocol.md`, section 3).
#[derive(Debug)]
pub struct Relayed {
    pub outcome: Outcome,
    /// The stream at a clean boundary, and a reader for its next opening holding what was
    /// already read of it (an opener's holds nothing: the far side sends nothing until our
    /// next opening).
    pub reusable: Option<(TransportStream, FrameReader)>,
}

impl Relayed {
    fn ended(outcome: Outcome) -> Relayed {
        Relayed { outcome, reusable: None }
    }
}

/// Relays `client` over `stream`, just connected for it: our preface and `open` go out with
/// the client's first bytes, and the far side's answer is read beside them ([`relay_after`]).
/// A refusal resets the client; an answer that is neither `connected` nor `refused` goes to
/// `broken` first. Both streams may follow the connection to a less crowded relay thread when
/// it turns to bulk.
pub async fn open_and_relay(
    client: LocalTcp,
    stream: TransportStream,
    open: &Open,
    broken: impl FnOnce(&OpenError),
    counters: &RelayCounters,
    shutdown: &CancellationToken,
) -> Relayed {
    let opening = match handshake::preface_and(open) {
        Ok(bytes) => bytes,
        Err(e) => {
            warn!("cannot encode the opening: {e}");
            let _ = client.set_reset_on_close();
            return Relayed::ended(Outcome::LocalReset);
        }
    };
    let (client, stream) = (Roaming::new(client), Roaming::new(stream));
    let answer = async {
        let mut reader = FrameReader::new();
        match handshake::read_tcp_answer(&stream, &mut reader).await {
            Ok(()) => Ok(reader.into_leftover()),
            Err(e @ OpenError::Refused(_)) => {
                debug!("the far side {e}");
                Err(Outcome::PeerReset)
            }
            Err(e) => {
                broken(&e);
                Err(Outcome::PeerVanished)
            }
        }
    };
    let ended = relay_after(&client, &stream, opening, answer, counters, shutdown).await;
    // The far side sends nothing past its FIN (but an RST that crossed ours) until our next
    // opening: anything else there leaves the stream unfit for another connection.
    let quiet_after = ended.after.is_empty() || ended.after[..] == RST;
    let reusable = match ended.at_boundary && quiet_after {
        true => stream.into_inner().map(|s| (s, FrameReader::new())),
        false => None,
    };
    Relayed { outcome: ended.outcome, reusable }
}

/// Answers an opening read from `stream` with `refused` and why, at once.
pub async fn refuse(stream: &TransportStream, reason: String) {
    handshake::answer_open::<_, ()>(stream, &Err(reason)).await;
}

/// Answers an opening read from `stream` (`reader` holds what arrived past it) for `server`,
/// the connection to the local server: it is relayed with `connected` in the same write as its
/// first bytes ([`relay_answering`]), both streams free to follow the connection to a less
/// crowded relay thread. `None`: the answer could not be encoded, nothing was relayed.
pub async fn answer_and_relay(
    stream: TransportStream,
    reader: FrameReader,
    server: LocalTcp,
    counters: &RelayCounters,
    shutdown: &CancellationToken,
) -> Option<Relayed> {
    let connected = match handshake::preface_and(&OpenReply::Connected {}) {
        Ok(bytes) => bytes,
        Err(e) => {
            warn!("cannot encode the answer: {e}");
            return None;
        }
    };
    let pending: BytesMut = reader.into_leftover();
    let (server, stream) = (Roaming::new(server), Roaming::new(stream));
    let ended = relay_answering(&server, &stream, pending, connected, counters, shutdown).await;
    let reusable = match ended.at_boundary {
        true => stream.into_inner().map(|s| (s, FrameReader::after(ended.after))),
        false => None,
    };
    Some(Relayed { outcome: ended.outcome, reusable })
}
