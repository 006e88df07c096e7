//! The start of every stream: each side sends its [`Preface`], the opener sends an [`Open`]
//! frame, a data stream's responder answers with an [`OpenReply`].
//!
//! [`FrameReader`] keeps whatever it read past the frame it returned, because on a data stream
//! those bytes are already the first chunks of the relayed connection.

use std::future::Future;
use std::io;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use hostnet_protocol::chunk::RST;
use hostnet_protocol::datagram::{self, DATAGRAM_HEADER_LEN, MAX_DATAGRAM_LEN};
use hostnet_protocol::{
    FrameDecoder, FrameError, MAX_FRAME_LEN, MAX_OPENING_LEN, PREFACE_LEN, Preface, PrefaceError,
};
use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::transport::raw::{self, RawStream};

/// How long a peer may take to send its preface and first frame.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read at a time while waiting for a frame.
const READ_CHUNK: usize = 4096;

/// Why a stream could not be opened or continued.
#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Preface(#[from] PrefaceError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the peer closed the stream")]
    Closed,
    #[error("the peer sent nothing for {0:?}")]
    TimedOut(Duration),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Our preface followed by one frame, in one write.
pub async fn send_preface_and<S: RawStream, T: Serialize>(s: &S, msg: &T) -> Result<(), HandshakeError> {
    let mut out = BytesMut::with_capacity(256);
    out.extend_from_slice(&Preface::OURS.to_bytes());
    hostnet_protocol::encode_frame(msg, &mut out)?;
    raw::write_all(s, &out).await?;
    Ok(())
}

/// Our preface followed by one frame, as bytes: an opening (or an answer) that goes out in the
/// same write as the first relayed bytes (`relay::relay_after`, `relay::relay_answering`).
pub fn preface_and<T: Serialize>(msg: &T) -> Result<Vec<u8>, HandshakeError> {
    let mut out = BytesMut::with_capacity(128);
    out.extend_from_slice(&Preface::OURS.to_bytes());
    hostnet_protocol::encode_frame(msg, &mut out)?;
    Ok(out.to_vec())
}

/// One frame.
pub async fn send_frame<S: RawStream, T: Serialize>(s: &S, msg: &T) -> Result<(), HandshakeError> {
    let mut out = BytesMut::with_capacity(256);
    hostnet_protocol::encode_frame(msg, &mut out)?;
    raw::write_all(s, &out).await?;
    Ok(())
}

/// Reads prefaces and frames from a stream, keeping what it read beyond them.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: BytesMut,
    /// Some byte of an opening (or an answer) has been read.
    read_any: bool,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// A reader for the next opening on a stream whose connection ended cleanly, `after`
    /// the bytes already read past it.
    pub fn after(after: BytesMut) -> Self {
        FrameReader { read_any: !after.is_empty(), buf: after }
    }

    /// Whether `e`, met reading an opening, ended the stream between connections rather than
    /// broke one: it was closed before a byte of an opening came (a stream opened ahead of
    /// need, or kept after a connection, let go; the last connection's crossing RST aside).
    pub fn ended_between(&self, e: &HandshakeError) -> bool {
        matches!(e, HandshakeError::Closed) && !self.read_any
    }

    /// Reads the peer's preface and checks its magic and version. An RST word before it is
    /// skipped: on a stream used again, the last connection's reset that crossed our FIN
    /// (`docs/protocol.md`, section 3; a preface never starts with `0xFF`).
    pub async fn read_preface<S: RawStream>(&mut self, s: &S) -> Result<Preface, HandshakeError> {
        loop {
            if self.buf.starts_with(&RST) {
                let _ = self.buf.split_to(RST.len());
                // Nothing of an opening has been read yet.
                self.read_any = !self.buf.is_empty();
            }
            if self.buf.len() >= PREFACE_LEN {
                break;
            }
            self.fill(s).await?;
        }
        let head = self.buf.split_to(PREFACE_LEN);
        let mut bytes = [0u8; PREFACE_LEN];
        bytes.copy_from_slice(&head);
        Ok(Preface::check(bytes)?)
    }

    /// Reads the next frame. Cancel-safe: bytes read before a cancellation stay buffered.
    pub async fn read_frame<S: RawStream, T: DeserializeOwned>(
        &mut self,
        s: &S,
    ) -> Result<T, HandshakeError> {
        self.read_frame_at_most(s, MAX_FRAME_LEN).await
    }

    async fn read_frame_at_most<S: RawStream, T: DeserializeOwned>(
        &mut self,
        s: &S,
        limit: usize,
    ) -> Result<T, HandshakeError> {
        loop {
            if let Some(frame) = FrameDecoder.decode_at_most(&mut self.buf, limit)? {
                return Ok(frame);
            }
            self.fill(s).await?;
        }
    }

    /// [`Self::read_preface`] then one frame of at most [`MAX_OPENING_LEN`] bytes (an opening
    /// is small: a peer opening many streams cannot make each hold a megabyte), within
    /// [`HANDSHAKE_TIMEOUT`].
    ///
    /// An opener sends its preface and frame as soon as it connects, so on an accepted stream
    /// they have usually arrived already: taken at once, they cost no trip through the reactor
    /// and no deadline. The deadline starts only if the opening has to be waited for, and is
    /// one of [`crate::deadline`]'s (it may end up to one `SLOT` late).
    pub async fn read_opening<S: RawStream, T: DeserializeOwned>(
        &mut self,
        s: &S,
    ) -> Result<T, HandshakeError> {
        self.take_arrived(s)?;
        let opening = async {
            self.read_preface(s).await?;
            self.read_frame_at_most(s, MAX_OPENING_LEN).await
        };
        let mut opening = std::pin::pin!(opening);
        let first = std::future::poll_fn(|cx| Poll::Ready(opening.as_mut().poll(cx))).await;
        if let Poll::Ready(done) = first {
            return done;
        }
        // Not tokio's `timeout`: arming a timer of its own per stream woke the runtime's
        // driver on every such connection (`crate::deadline`).
        crate::deadline::within(HANDSHAKE_TIMEOUT, opening)
            .await
            .map_err(|_| HandshakeError::TimedOut(HANDSHAKE_TIMEOUT))?
    }

    /// [`Self::read_opening`], unless `shutdown` fires first (`None`): for a stream that waits
    /// between connections, where nothing is lost if it just closes.
    pub async fn read_opening_until<S: RawStream, T: DeserializeOwned>(
        &mut self,
        s: &S,
        shutdown: &CancellationToken,
    ) -> Option<Result<T, HandshakeError>> {
        tokio::select! {
            // The opening first: usually there already, taken without a look at the token.
            biased;
            open = self.read_opening(s) => Some(open),
            () = shutdown.cancelled() => None,
        }
    }

    /// Buffers what the stream holds already, without waiting.
    fn take_arrived<S: RawStream>(&mut self, s: &S) -> Result<(), HandshakeError> {
        match self.read_kept(READ_CHUNK, |into| raw::read_arrived(s, into)) {
            // EOF: the reads that follow see it too, and say so.
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the next datagram of a UDP data stream; `None` when the peer closed the stream
    /// between datagrams. Cancel-safe like [`Self::read_frame`].
    pub async fn read_datagram<S: RawStream>(&mut self, s: &S) -> Result<Option<BytesMut>, HandshakeError> {
        loop {
            if let Some(d) = datagram::decode_datagram(&mut self.buf) {
                return Ok(Some(d));
            }
            match self.fill_up_to(s, DATAGRAM_HEADER_LEN + MAX_DATAGRAM_LEN).await {
                Err(HandshakeError::Closed) if self.buf.is_empty() => return Ok(None),
                Err(e) => return Err(e),
                Ok(()) => {}
            }
        }
    }

    /// Reads the next datagram (waiting for it), then whatever else of its burst is already
    /// read whole, up to `max` in all, into `burst`: how a relay sends a burst in one system
    /// call. `false` when the peer closed the stream between datagrams. Cancel-safe like
    /// [`Self::read_datagram`].
    pub async fn read_burst<S: RawStream>(
        &mut self,
        s: &S,
        burst: &mut Vec<BytesMut>,
        max: usize,
    ) -> Result<bool, HandshakeError> {
        let Some(first) = self.read_datagram(s).await? else { return Ok(false) };
        burst.push(first);
        while burst.len() < max {
            let Some(d) = datagram::decode_datagram(&mut self.buf) else { break };
            burst.push(d);
        }
        Ok(true)
    }

    /// Whether the stream has given nothing yet: a peer that closes such a stream opened it
    /// ahead of need and let it go (`crate::transport::spare`).
    pub fn read_nothing(&self) -> bool {
        !self.read_any
    }

    /// The bytes read past the last frame.
    pub fn into_leftover(self) -> BytesMut {
        self.buf
    }

    async fn fill<S: RawStream>(&mut self, s: &S) -> Result<(), HandshakeError> {
        self.fill_up_to(s, READ_CHUNK).await
    }

    async fn fill_up_to<S: RawStream>(&mut self, s: &S, max: usize) -> Result<(), HandshakeError> {
        loop {
            raw::readable(s).await?;
            match self.read_kept(max, |into| s.try_read(into)) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Runs `read` (up to `max` bytes) into a per-thread scratch buffer and keeps the bytes
    /// read: resizing the frame buffer to `max` zeroed up to 64 KiB per read (a UDP flow reads
    /// after every burst, often of one datagram), and a stack array would be paid in every
    /// connection task's future. Synchronous, so a cancelled read leaves the buffer as it was.
    fn read_kept(
        &mut self,
        max: usize,
        read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        crate::scratch::with_scratch(max, |into| {
            let n = read(into)?;
            self.read_any |= n > 0;
            self.buf.extend_from_slice(into.get(..n).unwrap_or_default());
            Ok(n)
        })
    }
}

/// Why a data stream could not be opened.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The far side answered `refused` (nothing listens there, not advertised, …): expected,
    /// worth a debug line.
    #[error("refused: {0}")]
    Refused(String),
    /// The transport or the handshake failed: worth a warning.
    #[error("{0}")]
    Failed(String),
}

/// Opens a data stream: connects, sends our preface and `open`, waits for the reply. On
/// success returns the stream and the reader holding any bytes read past the reply.
pub async fn open_stream(
    connector: &dyn crate::transport::Connector,
    open: &hostnet_protocol::Open,
) -> Result<(crate::transport::stream::TransportStream, FrameReader), OpenError> {
    let stream = send_open(connector, open).await?;
    let mut reader = FrameReader::new();
    read_answer(&stream, &mut reader).await?;
    Ok((stream, reader))
}

/// The first half of [`open_stream`]: connects and sends our preface and `open`, without
/// waiting for the answer (the caller may send data behind it, then [`read_answer`]).
pub async fn send_open(
    connector: &dyn crate::transport::Connector,
    open: &hostnet_protocol::Open,
) -> Result<crate::transport::stream::TransportStream, OpenError> {
    let stream = connector.connect().await.map_err(|e| OpenError::Failed(e.to_string()))?;
    send_preface_and(&stream, open).await.map_err(|e| OpenError::Failed(e.to_string()))?;
    Ok(stream)
}

/// The second half of [`open_stream`]: reads the far side's preface and answer; `reader` then
/// holds any bytes read past it.
pub async fn read_answer<S: RawStream>(stream: &S, reader: &mut FrameReader) -> Result<(), OpenError> {
    match reader.read_opening::<_, hostnet_protocol::OpenReply>(stream).await {
        Ok(hostnet_protocol::OpenReply::Connected {}) => Ok(()),
        Ok(hostnet_protocol::OpenReply::Refused { reason }) => Err(OpenError::Refused(reason)),
        Err(e) => Err(OpenError::Failed(e.to_string())),
    }
}

/// [`read_answer`] for a TCP data stream the proxy opened: the agent sends `connected` with
/// the guest server's first bytes (or its FIN), so the answer is waited for as long as the
/// server may take to speak — without [`HANDSHAKE_TIMEOUT`]. A refusal comes at once.
pub async fn read_tcp_answer<S: RawStream>(stream: &S, reader: &mut FrameReader) -> Result<(), OpenError> {
    let answer = async {
        reader.read_preface(stream).await?;
        reader.read_frame_at_most(stream, MAX_OPENING_LEN).await
    };
    match answer.await {
        Ok(hostnet_protocol::OpenReply::Connected {}) => Ok(()),
        Ok(hostnet_protocol::OpenReply::Refused { reason }) => Err(OpenError::Refused(reason)),
        Err(e) => Err(OpenError::Failed(e.to_string())),
    }
}

/// Answers an `Open` from the far side: `connected` when `outcome` is `Ok`, else `refused`
/// with the reason. Returns whether the stream can go on (connected and the answer sent).
pub async fn answer_open<S: RawStream, T>(stream: &S, outcome: &Result<T, String>) -> bool {
    match outcome {
        Ok(_) => send_preface_and(stream, &hostnet_protocol::OpenReply::Connected {}).await.is_ok(),
        Err(reason) => {
            tracing::debug!("refused: {reason}");
            let reply = hostnet_protocol::OpenReply::Refused { reason: reason.clone() };
            let _ = send_preface_and(stream, &reply).await;
            false
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::transport::fd::FdStream;

    /// A stream closed before its first byte is told apart from one closed mid-opening: the
    /// first is a spare the proxy let go (the agent says nothing), the second a broken peer.
    #[tokio::test]
    async fn a_stream_closed_before_any_byte_read_nothing() {
        let (ours, theirs) = FdStream::pair().unwrap();
        drop(theirs);
        let mut reader = FrameReader::new();
        let e = reader.read_opening::<_, hostnet_protocol::Open>(&ours).await.unwrap_err();
        assert!(matches!(e, HandshakeError::Closed), "{e}");
        assert!(reader.read_nothing());

        let (ours, theirs) = FdStream::pair().unwrap();
        raw::write_all(&theirs, &Preface::OURS.to_bytes()[..3]).await.unwrap();
        drop(theirs);
        let mut reader = FrameReader::new();
        let e = reader.read_opening::<_, hostnet_protocol::Open>(&ours).await.unwrap_err();
        assert!(matches!(e, HandshakeError::Closed), "{e}");
        assert!(!reader.read_nothing(), "three bytes of a preface were read");
    }
}
