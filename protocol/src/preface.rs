//! The preface every side of every stream sends first: 4 magic bytes and a big-endian `u16`
//! protocol version.

use thiserror::Error;

/// Magic bytes that open every stream.
pub const MAGIC: [u8; 4] = *b"HNET";
/// The protocol version this build speaks. Bump it on any incompatible change (the history is
/// in docs/protocol.md).
pub const VERSION: u16 = 3;
/// Length of the preface on the wire.
pub const PREFACE_LEN: usize = 6;

/// The first bytes on each side of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preface {
    pub version: u16,
}

/// Why a peer's preface was not accepted.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PrefaceError {
    #[error(
        "the peer is not speaking the hostnet protocol (expected magic {expected:?}, got {got:?}); \
         check that the transport points at a hostnet agent or proxy"
    )]
    BadMagic { expected: [u8; 4], got: [u8; 4] },
    #[error(
        "the peer speaks hostnet protocol version {peer}, this side speaks version {ours}; \
         install the same hostnet release on the host and in the VM"
    )]
    VersionMismatch { peer: u16, ours: u16 },
}

impl Preface {
    /// This build's preface.
    pub const OURS: Preface = Preface { version: VERSION };

    /// The bytes to send.
    pub fn to_bytes(self) -> [u8; PREFACE_LEN] {
        let v = self.version.to_be_bytes();
        [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], v[0], v[1]]
    }

    /// Parses a peer's preface; does not judge the version.
    pub fn parse(bytes: [u8; PREFACE_LEN]) -> Result<Preface, PrefaceError> {
        let [m0, m1, m2, m3, v0, v1] = bytes;
        let got = [m0, m1, m2, m3];
        if got != MAGIC {
            return Err(PrefaceError::BadMagic { expected: MAGIC, got });
        }
        Ok(Preface { version: u16::from_be_bytes([v0, v1]) })
    }

    /// Parses a peer's preface and checks that it speaks our version.
    pub fn check(bytes: [u8; PREFACE_LEN]) -> Result<Preface, PrefaceError> {
        let peer = Self::parse(bytes)?;
        if peer.version != VERSION {
            return Err(PrefaceError::VersionMismatch { peer: peer.version, ours: VERSION });
        }
        Ok(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        assert_eq!(Preface::check(Preface::OURS.to_bytes()), Ok(Preface::OURS));
    }

    #[test]
    fn wrong_magic_is_named() {
        let err = Preface::check(*b"GET / ").unwrap_err();
        assert!(matches!(err, PrefaceError::BadMagic { .. }));
        assert!(err.to_string().contains("not speaking the hostnet protocol"));
    }

    #[test]
    fn version_mismatch_says_what_to_do() {
        let mut bytes = Preface::OURS.to_bytes();
        bytes[5] = bytes[5].wrapping_add(1);
        let err = Preface::check(bytes).unwrap_err();
        assert_eq!(err, PrefaceError::VersionMismatch { peer: VERSION + 1, ours: VERSION });
        assert!(err.to_string().contains("install the same hostnet release"));
    }

    proptest::proptest! {
        #[test]
        fn any_six_bytes_parse_without_panic(bytes: [u8; PREFACE_LEN]) {
            let _ = Preface::check(bytes);
        }
    }
}
