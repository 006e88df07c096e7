//! Datagrams of a relayed UDP flow, one data stream per flow: each datagram is a big-endian
//! `u16` length and that many bytes. A length of 0 is an empty datagram (valid in UDP). The
//! flow ends when the stream closes.

use bytes::{Buf, BytesMut};

/// Largest datagram a frame can carry: more than any UDP payload (65 507 bytes over IPv4,
/// 65 527 over IPv6), so the framing never truncates.
pub const MAX_DATAGRAM_LEN: usize = u16::MAX as usize;
/// Bytes of a datagram header.
pub const DATAGRAM_HEADER_LEN: usize = 2;

/// Header for a datagram of `len` bytes, or `None` if it cannot be framed.
pub fn datagram_header(len: usize) -> Option<[u8; DATAGRAM_HEADER_LEN]> {
    u16::try_from(len).ok().map(u16::to_be_bytes)
}

/// Takes one whole datagram off the front of `buf`, or `None` if more bytes are needed.
/// Every `u16` is a valid length, so there is nothing to reject; the buffer never needs more
/// than `DATAGRAM_HEADER_LEN + MAX_DATAGRAM_LEN` bytes.
pub fn decode_datagram(buf: &mut BytesMut) -> Option<BytesMut> {
    let &[a, b] = buf.get(..DATAGRAM_HEADER_LEN)? else {
        return None;
    };
    let len = u16::from_be_bytes([a, b]) as usize;
    if buf.len() < DATAGRAM_HEADER_LEN + len {
        return None;
    }
    buf.advance(DATAGRAM_HEADER_LEN);
    Some(buf.split_to(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_and_largest_datagrams() {
        let mut buf = BytesMut::new();
        for len in [0, 1, MAX_DATAGRAM_LEN] {
            buf.extend_from_slice(&datagram_header(len).unwrap());
            buf.extend_from_slice(&vec![7u8; len]);
        }
        for len in [0, 1, MAX_DATAGRAM_LEN] {
            assert_eq!(decode_datagram(&mut buf).unwrap().len(), len);
        }
        assert!(decode_datagram(&mut buf).is_none());
        assert_eq!(datagram_header(MAX_DATAGRAM_LEN + 1), None);
    }

    proptest! {
        #[test]
        fn boundaries_survive_any_split(dgrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..20), cut in 1usize..97) {
            let mut wire = Vec::new();
            for d in &dgrams {
                wire.extend_from_slice(&datagram_header(d.len()).unwrap());
                wire.extend_from_slice(d);
            }
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(cut) {
                buf.extend_from_slice(piece);
                while let Some(d) = decode_datagram(&mut buf) {
                    got.push(d.to_vec());
                }
            }
            prop_assert_eq!(got, dgrams);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while decode_datagram(&mut buf).is_some() {}
        }
    }
}
