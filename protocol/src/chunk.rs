//! Chunked bytes of a relayed TCP connection, one direction of a data stream.
//!
//! Each chunk starts with a big-endian `u32` word:
//!
//! | word | meaning |
//! |---|---|
//! | `1..=MAX_CHUNK_LEN` | that many bytes of connection data follow |
//! | `0` | FIN: the sender's side of the connection half-closed; no more data in this direction |
//! | `0xFFFF_FFFF` | RST: the connection was reset; both directions end now |
//!
//! FIN and RST travel in-band because some transports (vhost-device-vsock, for one) cannot carry
//! a half-close. After FIN only RST may follow; after RST nothing may.

use thiserror::Error;

/// Largest data chunk. Senders cut bigger reads; receivers refuse bigger headers.
pub const MAX_CHUNK_LEN: usize = 1 << 20;
/// Bytes of a chunk header.
pub const CHUNK_HEADER_LEN: usize = 4;
/// The chunk header that says "no more data in this direction".
pub const FIN: [u8; CHUNK_HEADER_LEN] = 0u32.to_be_bytes();
/// The chunk header that says "the connection was reset".
pub const RST: [u8; CHUNK_HEADER_LEN] = u32::MAX.to_be_bytes();

/// Header for a data chunk of `len` bytes (`1..=MAX_CHUNK_LEN`).
pub fn data_header(len: usize) -> [u8; CHUNK_HEADER_LEN] {
    debug_assert!((1..=MAX_CHUNK_LEN).contains(&len));
    // Cannot truncate: MAX_CHUNK_LEN < u32::MAX.
    (len as u32).to_be_bytes()
}

/// What the decoder found.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkEvent<'a> {
    /// Connection bytes, borrowed from the input.
    Data(&'a [u8]),
    /// The peer half-closed.
    Fin,
    /// The peer's connection was reset.
    Reset,
}

/// A protocol violation; the stream must be closed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("chunk header announces {0} bytes, over the limit of {MAX_CHUNK_LEN}")]
    TooLong(u32),
    #[error("data after FIN")]
    DataAfterFin,
    #[error("bytes after RST")]
    AfterReset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    #[default]
    Open,
    Finished,
    Reset,
}

/// Incremental decoder for one direction of a data stream. Holds no buffer of its own: data is
/// handed out as slices of the caller's input, whatever the chunk length.
#[derive(Debug, Default)]
pub struct ChunkDecoder {
    header: [u8; CHUNK_HEADER_LEN],
    header_len: usize,
    remaining: usize,
    phase: Phase,
}

impl ChunkDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of the current data chunk still to come (0 between chunks). A caller that moves
    /// them without [`Self::decode`] (`splice(2)`) reports them with [`Self::skip_data`].
    pub fn data_remaining(&self) -> usize {
        self.remaining
    }

    /// Records `n` bytes of the current data chunk as moved elsewhere.
    pub fn skip_data(&mut self, n: usize) {
        self.remaining -= n.min(self.remaining);
    }

    /// Header bytes still needed before the next chunk's header is complete.
    pub fn header_needed(&self) -> usize {
        CHUNK_HEADER_LEN - self.header_len
    }

    /// Whether a FIN has been seen (only RST may follow).
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// Decodes from the front of `input`: returns how many bytes were consumed and the event
    /// they completed, or `None` when all of `input` went into a partial header.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> Result<(usize, Option<ChunkEvent<'a>>), ChunkError> {
        let mut consumed = 0;
        loop {
            let rest = input.get(consumed..).unwrap_or_default();
            if self.remaining > 0 {
                let n = self.remaining.min(rest.len());
                if n == 0 {
                    return Ok((consumed, None));
                }
                self.remaining -= n;
                let data = rest.get(..n).unwrap_or_default();
                return Ok((consumed + n, Some(ChunkEvent::Data(data))));
            }
            if self.phase == Phase::Reset {
                return if rest.is_empty() { Ok((consumed, None)) } else { Err(ChunkError::AfterReset) };
            }
            let want = CHUNK_HEADER_LEN - self.header_len;
            let take = want.min(rest.len());
            if let (Some(dst), Some(src)) =
                (self.header.get_mut(self.header_len..self.header_len + take), rest.get(..take))
            {
                dst.copy_from_slice(src);
            }
            self.header_len += take;
            consumed += take;
            if self.header_len < CHUNK_HEADER_LEN {
                return Ok((consumed, None));
            }
            self.header_len = 0;
            let word = u32::from_be_bytes(self.header);
            if self.header == RST {
                self.phase = Phase::Reset;
                return Ok((consumed, Some(ChunkEvent::Reset)));
            }
            if self.phase == Phase::Finished {
                return Err(ChunkError::DataAfterFin);
            }
            if self.header == FIN {
                self.phase = Phase::Finished;
                return Ok((consumed, Some(ChunkEvent::Fin)));
            }
            if word as usize > MAX_CHUNK_LEN {
                return Err(ChunkError::TooLong(word));
            }
            self.remaining = word as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        Data(Vec<u8>),
        Fin,
        Reset,
    }

    fn encode(events: &[Ev]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            match e {
                Ev::Data(d) => {
                    out.extend_from_slice(&data_header(d.len()));
                    out.extend_from_slice(d);
                }
                Ev::Fin => out.extend_from_slice(&FIN),
                Ev::Reset => out.extend_from_slice(&RST),
            }
        }
        out
    }

    /// Feeds `wire` in pieces of the given sizes; returns the data seen and the control events.
    fn decode_in_pieces(wire: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, Vec<Ev>), ChunkError> {
        let mut dec = ChunkDecoder::new();
        let mut data = Vec::new();
        let mut events = Vec::new();
        let mut pos = 0;
        let mut cut = cuts.iter().cycle();
        while pos < wire.len() {
            let end = (pos + cut.next().copied().unwrap_or(1).max(1)).min(wire.len());
            let mut piece = &wire[pos..end];
            while !piece.is_empty() {
                let (n, ev) = dec.decode(piece)?;
                assert!(n > 0 || ev.is_some(), "decoder made no progress");
                match ev {
                    Some(ChunkEvent::Data(d)) => data.extend_from_slice(d),
                    Some(ChunkEvent::Fin) => events.push(Ev::Fin),
                    Some(ChunkEvent::Reset) => events.push(Ev::Reset),
                    None => {}
                }
                piece = &piece[n..];
            }
            pos = end;
        }
        Ok((data, events))
    }

    #[test]
    fn data_fin_reset_in_order() {
        let wire = encode(&[Ev::Data(b"hello".to_vec()), Ev::Fin, Ev::Reset]);
        let (data, events) = decode_in_pieces(&wire, &[3]).unwrap();
        assert_eq!(data, b"hello");
        assert_eq!(events, vec![Ev::Fin, Ev::Reset]);
    }

    #[test]
    fn violations_are_errors() {
        let mut dec = ChunkDecoder::new();
        assert_eq!(
            dec.decode(&(MAX_CHUNK_LEN as u32 + 1).to_be_bytes()),
            Err(ChunkError::TooLong(MAX_CHUNK_LEN as u32 + 1))
        );
        let wire = encode(&[Ev::Fin, Ev::Data(b"x".to_vec())]);
        assert_eq!(decode_in_pieces(&wire, &[64]), Err(ChunkError::DataAfterFin));
        let wire = encode(&[Ev::Reset, Ev::Fin]);
        assert_eq!(decode_in_pieces(&wire, &[64]), Err(ChunkError::AfterReset));
    }

    #[test]
    fn max_chunk_is_accepted_without_buffering() {
        let mut dec = ChunkDecoder::new();
        let header = data_header(MAX_CHUNK_LEN);
        let (n, ev) = dec.decode(&header).unwrap();
        assert_eq!((n, ev), (4, None));
        let (n, ev) = dec.decode(&[7; 10]).unwrap();
        assert_eq!((n, ev), (10, Some(ChunkEvent::Data(&[7; 10]))));
    }

    fn events() -> impl Strategy<Value = Vec<Ev>> {
        let data = proptest::collection::vec(any::<u8>(), 1..300).prop_map(Ev::Data);
        (proptest::collection::vec(data, 0..20), 0u8..3).prop_map(|(mut v, tail)| {
            match tail {
                1 => v.push(Ev::Fin),
                2 => {
                    v.push(Ev::Fin);
                    v.push(Ev::Reset)
                }
                _ => {}
            }
            v
        })
    }

    proptest! {
        #[test]
        fn round_trip_any_split(evs in events(), cuts in proptest::collection::vec(1usize..50, 1..8)) {
            let wire = encode(&evs);
            let (data, ctl) = decode_in_pieces(&wire, &cuts).unwrap();
            let want: Vec<u8> = evs.iter().filter_map(|e| match e { Ev::Data(d) => Some(d.clone()), _ => None }).flatten().collect();
            let want_ctl: Vec<Ev> = evs.into_iter().filter(|e| !matches!(e, Ev::Data(_))).collect();
            prop_assert_eq!(data, want);
            prop_assert_eq!(ctl, want_ctl);
        }

        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), cuts in proptest::collection::vec(1usize..64, 1..4)) {
            let _ = decode_in_pieces(&bytes, &cuts);
        }
    }
}
