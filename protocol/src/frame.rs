//! Length-prefixed JSON frames: a big-endian `u32` body length, then that many bytes of JSON.
//!
//! The control stream is a sequence of [`ProxyFrame`]s one way and [`AgentFrame`]s the other. A data stream starts with one
//! [`Open`] frame from the side that opened it and one [`OpenReply`] frame back.

use std::net::{IpAddr, SocketAddr};

use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thiserror::Error;

use crate::listener::{Listener, Proto};

/// Largest frame body accepted or sent. A snapshot of ~10 000 listeners fits; more than that is
/// refused rather than buffered.
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// Largest opening frame accepted: the first frame of a stream (`Open`, `OpenReply`, the
/// control stream's `Hello`) is ~100 bytes; only the control stream's later frames
/// (snapshots) need [`MAX_FRAME_LEN`]. So a peer that opens many streams and announces big
/// openings makes the other side buffer at most this much per stream, not a megabyte.
pub const MAX_OPENING_LEN: usize = 4096;
/// Bytes of the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// Which end of the link a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `hostnet-proxy`, on the desktop.
    Proxy,
    /// `hostnet-agent`, in the VM.
    Agent,
}

/// Frames the agent sends on the long-lived control stream. The proxy decodes only these: a
/// frame meant for the other direction (`host_snapshot` from the agent) is a protocol error,
/// not something to ignore. The JSON is the same as when one enum carried both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentFrame {
    /// First frame of the agent's side.
    Hello { role: Role, software: String },
    /// The complete set of guest listeners. Sent once after `Hello`; replaces whatever the
    /// proxy believed before (the resync after a reconnect). A set of more than
    /// [`LISTENERS_PER_FRAME`] goes as several frames, each but the last with `more: true`
    /// (see [`AgentFrame::snapshot_frames`]); `more` is left out when false, so a snapshot that
    /// fits one frame is byte for byte what it was before `more` existed.
    Snapshot {
        listeners: Vec<Listener>,
        #[serde(default, skip_serializing_if = "is_false")]
        more: bool,
    },
    /// Listeners that appeared since the last snapshot or delta.
    Added { listeners: Vec<Listener> },
    /// Listeners that went away.
    Removed { listeners: Vec<Listener> },
    /// Liveness probe. The receiver answers with `HeartbeatAck` carrying `seq`.
    Heartbeat { seq: u64 },
    /// Answer to the proxy's `Heartbeat`.
    HeartbeatAck { seq: u64 },
    /// A fatal problem the proxy should log before the stream closes.
    Error { message: String },
}

/// Frames the proxy sends on the long-lived control stream (see [`AgentFrame`] for the other
/// direction).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProxyFrame {
    /// First frame of the proxy's control stream, after its `Open::Control`.
    Hello { role: Role, software: String },
    /// The complete set of the desktop's own listeners (never its mirrors of guest ports) that
    /// guest processes may reach as `localhost:PORT`. Sent after the agent's snapshot; replaces
    /// the agent's previous view. Split like [`AgentFrame::Snapshot`].
    HostSnapshot {
        listeners: Vec<Listener>,
        #[serde(default, skip_serializing_if = "is_false")]
        more: bool,
    },
    /// Desktop listeners that appeared.
    HostAdded { listeners: Vec<Listener> },
    /// Desktop listeners that went away.
    HostRemoved { listeners: Vec<Listener> },
    /// Liveness probe. The receiver answers with `HeartbeatAck` carrying `seq`.
    Heartbeat { seq: u64 },
    /// Answer to the agent's `Heartbeat`.
    HeartbeatAck { seq: u64 },
    /// A fatal problem the agent should log.
    Error { message: String },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Most listeners one frame carries: a listener takes at most ~70 bytes of JSON (a full IPv6
/// address), so a frame of them stays under half of [`MAX_FRAME_LEN`]. Larger sets and deltas
/// go as several frames: a guest listening on every port no longer breaks the link.
pub const LISTENERS_PER_FRAME: usize = 8192;

/// Most listeners a split snapshot may add up to before its last part: every TCP and UDP
/// port on a handful of addresses. A peer announcing more is refused, not buffered.
pub const MAX_SNAPSHOT_LISTENERS: usize = 4 * 2 * 65_536;

/// `listeners` in pieces of at most [`LISTENERS_PER_FRAME`]; at least one piece, maybe empty.
pub fn listener_chunks(listeners: Vec<Listener>) -> Vec<Vec<Listener>> {
    if listeners.len() <= LISTENERS_PER_FRAME {
        return vec![listeners];
    }
    listeners.chunks(LISTENERS_PER_FRAME).map(<[Listener]>::to_vec).collect()
}

/// `listeners` as frames of a split snapshot: every part but the last says `more`.
fn split_snapshot<F>(listeners: Vec<Listener>, frame: impl Fn(Vec<Listener>, bool) -> F) -> Vec<F> {
    let parts = listener_chunks(listeners);
    let last = parts.len().saturating_sub(1);
    parts.into_iter().enumerate().map(|(i, listeners)| frame(listeners, i < last)).collect()
}

impl AgentFrame {
    /// A snapshot as frames: every part but the last says `more`.
    pub fn snapshot_frames(listeners: Vec<Listener>) -> Vec<AgentFrame> {
        split_snapshot(listeners, |listeners, more| AgentFrame::Snapshot { listeners, more })
    }

    /// The frame's `type` on the wire, for sentences about it.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentFrame::Hello { .. } => "hello",
            AgentFrame::Snapshot { .. } => "snapshot",
            AgentFrame::Added { .. } => "added",
            AgentFrame::Removed { .. } => "removed",
            AgentFrame::Heartbeat { .. } => "heartbeat",
            AgentFrame::HeartbeatAck { .. } => "heartbeat_ack",
            AgentFrame::Error { .. } => "error",
        }
    }
}

impl ProxyFrame {
    /// The desktop's listeners as `host_snapshot` frames, split like
    /// [`AgentFrame::snapshot_frames`].
    pub fn host_snapshot_frames(listeners: Vec<Listener>) -> Vec<ProxyFrame> {
        split_snapshot(listeners, |listeners, more| ProxyFrame::HostSnapshot { listeners, more })
    }
}

/// Gathers the parts of a split snapshot.
#[derive(Debug, Default)]
pub struct SnapshotParts(Vec<Listener>);

/// A split snapshot grew past [`MAX_SNAPSHOT_LISTENERS`].
#[derive(Debug, Error, PartialEq, Eq)]
#[error("the peer's snapshot has more than {MAX_SNAPSHOT_LISTENERS} listeners")]
pub struct SnapshotTooLarge;

impl SnapshotParts {
    /// Adds one part; the whole snapshot once its last part (`more: false`) arrived.
    pub fn push(
        &mut self,
        listeners: Vec<Listener>,
        more: bool,
    ) -> Result<Option<Vec<Listener>>, SnapshotTooLarge> {
        if self.0.len() + listeners.len() > MAX_SNAPSHOT_LISTENERS {
            self.0 = Vec::new();
            return Err(SnapshotTooLarge);
        }
        self.0.extend(listeners);
        Ok((!more).then(|| std::mem::take(&mut self.0)))
    }
}

/// First frame on a data stream, from the side that opened it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Open {
    /// This stream is the control stream. (An empty struct variant, not a unit one, so that
    /// `deny_unknown_fields` refuses `{"type":"control","x":1}` as it does for every other frame.)
    Control {},
    /// Relay one TCP connection to `addr:port` on the far side. `peer` is the client's address,
    /// for logs only.
    Tcp { addr: IpAddr, port: u16, peer: Option<SocketAddr> },
    /// Relay one UDP flow (one desktop client address) to `addr:port` on the far side.
    Udp { addr: IpAddr, port: u16, peer: Option<SocketAddr> },
}

impl Open {
    /// The protocol this stream relays, if it is a data stream.
    pub fn proto(&self) -> Option<Proto> {
        match self {
            Open::Control {} => None,
            Open::Tcp { .. } => Some(Proto::Tcp),
            Open::Udp { .. } => Some(Proto::Udp),
        }
    }
}

/// An [`Open`]'s `peer` as a log field: the address, or nothing when the opener did not say.
/// Formats in place, where `peer.map(|p| p.to_string())` allocated a string per connection.
#[derive(Debug, Clone, Copy)]
pub struct ShowPeer(pub Option<SocketAddr>);

impl std::fmt::Display for ShowPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(peer) => peer.fmt(f),
            None => Ok(()),
        }
    }
}

/// Answer to [`Open`] on a data stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum OpenReply {
    /// The far side connected; chunks follow. (Empty struct variant: see [`Open::Control`].)
    Connected {},
    /// The far side could not connect; the stream closes. The opener resets its client.
    Refused { reason: String },
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLong { len: usize, limit: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Appends `msg` as one frame to `out`.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut impl BufMut) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLong { len: body.len(), limit: MAX_FRAME_LEN });
    }
    // Cannot truncate: MAX_FRAME_LEN < u32::MAX.
    out.put_u32(body.len() as u32);
    out.put_slice(&body);
    Ok(())
}

/// Incremental decoder: feed it bytes as they arrive, take frames out.
///
/// It looks at the length prefix before buffering the body, so a hostile length costs nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameDecoder;

impl FrameDecoder {
    /// Takes one whole frame off the front of `buf`, or returns `Ok(None)` if more bytes are
    /// needed. On error the stream is unusable and must be closed.
    pub fn decode<T: DeserializeOwned>(&self, buf: &mut BytesMut) -> Result<Option<T>, FrameError> {
        self.decode_at_most(buf, MAX_FRAME_LEN)
    }

    /// [`Self::decode`] with a lower limit than [`MAX_FRAME_LEN`] (an opening frame's,
    /// [`MAX_OPENING_LEN`]): a longer announced body is refused before anything is reserved.
    pub fn decode_at_most<T: DeserializeOwned>(
        &self,
        buf: &mut BytesMut,
        limit: usize,
    ) -> Result<Option<T>, FrameError> {
        let Some(len) = peek_len(buf, limit.min(MAX_FRAME_LEN))? else {
            return Ok(None);
        };
        let total = FRAME_HEADER_LEN + len;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(FRAME_HEADER_LEN);
        let body = buf.split_to(len);
        Ok(Some(serde_json::from_slice(&body)?))
    }
}

/// The body length announced at the front of `buf`, checked against `limit`.
fn peek_len(buf: &[u8], limit: usize) -> Result<Option<usize>, FrameError> {
    let Some(&[a, b, c, d]) = buf.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if len > limit {
        return Err(FrameError::TooLong { len, limit });
    }
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv6Addr;

    #[test]
    fn show_peer_is_the_address_or_nothing() {
        let v4: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        let v6: SocketAddr = "[::1]:8000".parse().unwrap();
        assert_eq!(ShowPeer(Some(v4)).to_string(), "127.0.0.1:54321");
        assert_eq!(ShowPeer(Some(v6)).to_string(), "[::1]:8000");
        assert_eq!(ShowPeer(None).to_string(), "");
    }

    fn frames() -> Vec<AgentFrame> {
        let l = Listener { proto: Proto::Tcp, addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED), port: 8000 };
        vec![
            AgentFrame::Hello { role: Role::Agent, software: "hostnet-agent 0.1.0".into() },
            AgentFrame::Snapshot { listeners: vec![l], more: false },
            AgentFrame::Snapshot { listeners: vec![l], more: true },
            AgentFrame::Added { listeners: vec![] },
            AgentFrame::Removed { listeners: vec![l] },
            AgentFrame::Heartbeat { seq: 7 },
            AgentFrame::HeartbeatAck { seq: 7 },
            AgentFrame::Error { message: "bye".into() },
        ]
    }

    fn proxy_frames() -> Vec<ProxyFrame> {
        let l = Listener { proto: Proto::Tcp, addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED), port: 8000 };
        vec![
            ProxyFrame::Hello { role: Role::Proxy, software: "hostnet-proxy 0.1.0".into() },
            ProxyFrame::HostSnapshot { listeners: vec![l], more: false },
            ProxyFrame::HostSnapshot { listeners: vec![l], more: true },
            ProxyFrame::HostAdded { listeners: vec![l] },
            ProxyFrame::HostRemoved { listeners: vec![] },
            ProxyFrame::Heartbeat { seq: 7 },
            ProxyFrame::HeartbeatAck { seq: 7 },
            ProxyFrame::Error { message: "bye".into() },
        ]
    }

    fn body<T: Serialize>(frame: &T) -> String {
        serde_json::to_string(frame).unwrap()
    }

    /// The two directions' frames are the JSON the single `Control` enum used to write, and a
    /// frame of one direction does not decode as the other's.
    #[test]
    fn each_direction_keeps_its_json_and_refuses_the_others() {
        let l = Listener { proto: Proto::Udp, addr: "127.0.0.1".parse().unwrap(), port: 53 };
        assert_eq!(
            body(&ProxyFrame::HostSnapshot { listeners: vec![l], more: true }),
            r#"{"type":"host_snapshot","listeners":[{"proto":"udp","addr":"127.0.0.1","port":53}],"more":true}"#
        );
        assert_eq!(
            body(&ProxyFrame::HostRemoved { listeners: vec![] }),
            r#"{"type":"host_removed","listeners":[]}"#
        );
        assert_eq!(body(&AgentFrame::Added { listeners: vec![] }), r#"{"type":"added","listeners":[]}"#);
        assert_eq!(body(&AgentFrame::HeartbeatAck { seq: 3 }), r#"{"type":"heartbeat_ack","seq":3}"#);
        assert_eq!(body(&ProxyFrame::Error { message: "x".into() }), r#"{"type":"error","message":"x"}"#);
        for frame in [r#"{"type":"host_added","listeners":[]}"#, r#"{"type":"host_snapshot","listeners":[]}"#]
        {
            let err = serde_json::from_str::<AgentFrame>(frame).unwrap_err().to_string();
            assert!(err.contains("unknown variant"), "{err}");
        }
        for frame in [r#"{"type":"added","listeners":[]}"#, r#"{"type":"snapshot","listeners":[]}"#] {
            assert!(serde_json::from_str::<ProxyFrame>(frame).is_err(), "{frame}");
        }
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let mut wire = BytesMut::new();
        for f in frames() {
            encode_frame(&f, &mut wire).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in wire {
            buf.put_u8(byte);
            while let Some(f) = FrameDecoder.decode::<AgentFrame>(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames());
        assert!(buf.is_empty());
        let mut wire = BytesMut::new();
        for f in proxy_frames() {
            encode_frame(&f, &mut wire).unwrap();
        }
        let mut got = Vec::new();
        while let Some(f) = FrameDecoder.decode::<ProxyFrame>(&mut wire).unwrap() {
            got.push(f);
        }
        assert_eq!(got, proxy_frames());
    }

    #[test]
    fn wire_shape_is_documented_json() {
        let mut wire = BytesMut::new();
        encode_frame(&AgentFrame::Heartbeat { seq: 1 }, &mut wire).unwrap();
        assert_eq!(&wire[..], b"\0\0\0\x1c{\"type\":\"heartbeat\",\"seq\":1}");
        let mut wire = BytesMut::new();
        let open = Open::Tcp { addr: "127.0.0.1".parse().unwrap(), port: 80, peer: None };
        encode_frame(&open, &mut wire).unwrap();
        assert_eq!(&wire[4..], br#"{"type":"tcp","addr":"127.0.0.1","port":80,"peer":null}"#);
    }

    /// The example in docs/protocol.md, byte for byte.
    #[test]
    fn documented_example_holds() {
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&crate::Preface::OURS.to_bytes());
        encode_frame(
            &AgentFrame::Hello { role: Role::Agent, software: "hostnet-agent 0.1.0".into() },
            &mut wire,
        )
        .unwrap();
        let l = Listener { proto: Proto::Tcp, addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED), port: 8000 };
        encode_frame(&AgentFrame::Snapshot { listeners: vec![l], more: false }, &mut wire).unwrap();
        let mut want = b"HNET\x00\x03\x00\x00\x00\x40".to_vec();
        want.extend_from_slice(br#"{"type":"hello","role":"agent","software":"hostnet-agent 0.1.0"}"#);
        want.extend_from_slice(b"\x00\x00\x00\x49");
        want.extend_from_slice(
            br#"{"type":"snapshot","listeners":[{"proto":"tcp","addr":"::","port":8000}]}"#,
        );
        assert_eq!(&wire[..], &want[..]);
    }

    #[test]
    fn a_snapshot_of_every_port_goes_in_frames_under_the_limit_and_comes_back_whole() {
        let all: Vec<Listener> = (1..=u16::MAX)
            .flat_map(|port| {
                [
                    Listener {
                        proto: Proto::Tcp,
                        addr: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(),
                        port,
                    },
                    Listener { proto: Proto::Udp, addr: "::".parse().unwrap(), port },
                ]
            })
            .collect();
        // One frame of all of them would exceed the limit: the link used to fail on it.
        assert!(
            encode_frame(&AgentFrame::Snapshot { listeners: all.clone(), more: false }, &mut BytesMut::new())
                .is_err()
        );
        let frames = AgentFrame::snapshot_frames(all.clone());
        assert!(frames.len() > 1);
        let mut wire = BytesMut::new();
        for f in &frames {
            encode_frame(f, &mut wire).unwrap();
        }
        let mut parts = SnapshotParts::default();
        let mut whole = None;
        while let Some(frame) = FrameDecoder.decode::<AgentFrame>(&mut wire).unwrap() {
            let AgentFrame::Snapshot { listeners, more } = frame else { panic!("{frame:?}") };
            assert!(whole.is_none(), "nothing after the last part");
            whole = parts.push(listeners, more).unwrap();
        }
        assert_eq!(whole, Some(all));
    }

    #[test]
    fn a_snapshot_that_fits_one_frame_is_what_older_peers_sent() {
        let l = Listener { proto: Proto::Tcp, addr: "::".parse().unwrap(), port: 8000 };
        let frames = AgentFrame::snapshot_frames(vec![l]);
        assert_eq!(frames, vec![AgentFrame::Snapshot { listeners: vec![l], more: false }]);
        assert_eq!(
            serde_json::to_string(&frames[0]).unwrap(),
            r#"{"type":"snapshot","listeners":[{"proto":"tcp","addr":"::","port":8000}]}"#
        );
        assert_eq!(
            ProxyFrame::host_snapshot_frames(vec![]),
            vec![ProxyFrame::HostSnapshot { listeners: vec![], more: false }]
        );
    }

    #[test]
    fn endless_snapshot_parts_are_refused() {
        let l = Listener { proto: Proto::Tcp, addr: "::".parse().unwrap(), port: 1 };
        let mut parts = SnapshotParts::default();
        let mut pushed = 0;
        let err = loop {
            match parts.push(vec![l; LISTENERS_PER_FRAME], true) {
                Ok(None) => pushed += LISTENERS_PER_FRAME,
                Ok(Some(_)) => panic!("not the last part"),
                Err(e) => break e,
            }
        };
        assert!(pushed <= MAX_SNAPSHOT_LISTENERS, "{pushed}");
        assert!(err.to_string().contains("more than"));
    }

    #[test]
    fn an_opening_is_bounded_far_below_a_control_frame() {
        // A real opening fits; an announced 1 MiB body is refused before a byte is reserved.
        let mut wire = BytesMut::new();
        let open =
            Open::Tcp { addr: "::1".parse().unwrap(), port: 80, peer: Some("[::1]:40000".parse().unwrap()) };
        encode_frame(&open, &mut wire).unwrap();
        assert_eq!(FrameDecoder.decode_at_most::<Open>(&mut wire, MAX_OPENING_LEN).unwrap(), Some(open));
        let mut buf = BytesMut::from(&(MAX_FRAME_LEN as u32).to_be_bytes()[..]);
        let err = FrameDecoder.decode_at_most::<Open>(&mut buf, MAX_OPENING_LEN).unwrap_err();
        assert!(matches!(err, FrameError::TooLong { limit: MAX_OPENING_LEN, .. }), "{err}");
        assert!(buf.capacity() < 1024, "nothing reserved for it");
        let mut buf = BytesMut::from(&(MAX_OPENING_LEN as u32 + 1).to_be_bytes()[..]);
        assert!(FrameDecoder.decode_at_most::<Open>(&mut buf, MAX_OPENING_LEN).is_err());
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        let err = FrameDecoder.decode::<AgentFrame>(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLong { .. }));
        assert!(buf.capacity() < 1024, "no allocation for a hostile length");
    }

    #[test]
    fn unknown_frame_type_and_fields_are_errors() {
        for body in [&br#"{"type":"launch_missiles"}"#[..], br#"{"type":"heartbeat","seq":1,"x":2}"#] {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32);
            buf.put_slice(body);
            assert!(matches!(FrameDecoder.decode::<AgentFrame>(&mut buf), Err(FrameError::Malformed(_))));
        }
    }

    /// Frames without fields: same bytes on the wire as before, and as strict as the others
    /// (serde ignores `deny_unknown_fields` on unit variants of a tagged enum).
    #[test]
    fn field_less_frames_keep_their_wire_shape_and_refuse_unknown_fields() {
        fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<Option<T>, FrameError> {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32);
            buf.put_slice(body);
            FrameDecoder.decode::<T>(&mut buf)
        }
        let mut wire = BytesMut::new();
        encode_frame(&Open::Control {}, &mut wire).unwrap();
        encode_frame(&OpenReply::Connected {}, &mut wire).unwrap();
        assert_eq!(&wire[..], b"\0\0\0\x12{\"type\":\"control\"}\0\0\0\x14{\"type\":\"connected\"}");
        assert_eq!(decode::<Open>(br#"{"type":"control"}"#).unwrap(), Some(Open::Control {}));
        assert_eq!(decode::<OpenReply>(br#"{"type":"connected"}"#).unwrap(), Some(OpenReply::Connected {}));
        assert!(matches!(decode::<Open>(br#"{"type":"control","x":1}"#), Err(FrameError::Malformed(_))));
        assert!(matches!(
            decode::<OpenReply>(br#"{"type":"connected","reason":"x"}"#),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn encoder_refuses_what_decoder_would_refuse() {
        let big = AgentFrame::Error { message: "x".repeat(MAX_FRAME_LEN) };
        assert!(matches!(encode_frame(&big, &mut BytesMut::new()), Err(FrameError::TooLong { .. })));
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = FrameDecoder.decode::<AgentFrame>(&mut buf) {}
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = FrameDecoder.decode::<ProxyFrame>(&mut buf) {}
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = FrameDecoder.decode::<Open>(&mut buf);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = FrameDecoder.decode::<OpenReply>(&mut buf);
        }

        #[test]
        fn bounded_length_prefix_with_any_body(len in 0u32..2048, body in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut buf = BytesMut::new();
            buf.put_u32(len);
            buf.put_slice(&body);
            match FrameDecoder.decode::<AgentFrame>(&mut buf) {
                Ok(None) => prop_assert!(body.len() < len as usize),
                Ok(Some(_)) | Err(FrameError::Malformed(_)) => prop_assert!(body.len() >= len as usize),
                Err(FrameError::TooLong { .. }) => prop_assert!(false, "len {} is under the limit", len),
            }
        }

        #[test]
        fn any_snapshot_round_trips(ports in proptest::collection::vec((any::<bool>(), any::<u16>(), any::<[u8; 16]>()), 0..64)) {
            let listeners: Vec<Listener> = ports.iter().map(|&(v6, port, raw)| Listener {
                proto: Proto::Tcp,
                addr: if v6 { IpAddr::from(raw) } else { IpAddr::from([raw[0], raw[1], raw[2], raw[3]]) },
                port,
            }).collect();
            let frame = AgentFrame::Snapshot { listeners, more: ports.len() % 2 == 1 };
                    let mut buf = BytesMut::new();
            encode_frame(&frame, &mut buf).unwrap();
            prop_assert_eq!(FrameDecoder.decode::<AgentFrame>(&mut buf).unwrap(), Some(frame));
        }
    }
}
