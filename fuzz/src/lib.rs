//! What each fuzz target checks, as plain functions: the `afl` binaries call them on every
//! input, and `cargo test` replays the committed seeds and any saved crash through them.
//!
//! Beyond "never panics", each checks what must hold for every input: decoders always make
//! progress, what decodes re-encodes to the same value, and the chunk decoder gives the same
//! events however the input is split.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fmt::Debug;
use std::path::Path;

use bytes::BytesMut;
use hostnet_protocol::datagram::{MAX_DATAGRAM_LEN, decode_datagram};
use hostnet_protocol::{
    AgentFrame, ChunkDecoder, ChunkError, ChunkEvent, FrameDecoder, FrameError, Open, OpenReply, PREFACE_LEN,
    Preface, ProxyFrame, encode_frame,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Control frames (either direction's) and opening frames, back to back, as the control stream
/// and data streams carry them.
pub fn frames(data: &[u8]) {
    decode_all::<AgentFrame>(data);
    decode_all::<ProxyFrame>(data);
    decode_all::<Open>(data);
    decode_all::<OpenReply>(data);
    sessions(data);
}

/// The frames that decode, fed to both sides' control sessions as if each arrived a second
/// after the last: neither machine panics, and each stays bounded.
fn sessions(data: &[u8]) {
    use hostnet_protocol::ListenerSet;
    use hostnet_protocol::frame::MAX_SNAPSHOT_LISTENERS;
    use hostnet_protocol::session::{AgentSession, ProxySession};
    use std::time::{Duration, Instant};

    let t = Instant::now();
    let mut proxy = ProxySession::new("fuzz".into());
    proxy.connected(ListenerSet::new());
    let mut buf = BytesMut::from(data);
    let mut now = t;
    while let Ok(Some(frame)) = FrameDecoder.decode::<AgentFrame>(&mut buf) {
        now += Duration::from_secs(1);
        let _ = proxy.handle_timeout(now);
        if proxy.handle_frame(frame, now).is_err() {
            proxy.disconnected(now);
            proxy.connected(ListenerSet::new());
        }
        while proxy.poll_action().is_some() {}
        assert!(proxy.agent_listeners() <= MAX_SNAPSHOT_LISTENERS);
    }
    let mut agent = AgentSession::new("fuzz".into(), ListenerSet::new(), t);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = FrameDecoder.decode::<ProxyFrame>(&mut buf) {
        if agent.handle_frame(frame, t).is_err() {
            agent = AgentSession::new("fuzz".into(), ListenerSet::new(), t);
        }
        while agent.poll_action().is_some() {}
    }
}

fn decode_all<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match FrameDecoder.decode::<T>(&mut buf) {
            Ok(Some(msg)) => {
                assert!(buf.len() < before, "a frame consumed nothing");
                round_trip(&msg);
            }
            Ok(None) | Err(_) => break,
        }
    }
}

/// What decodes, encodes, and decodes back to the same value.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(msg: &T) {
    let mut out = BytesMut::new();
    match encode_frame(msg, &mut out) {
        Ok(()) => {}
        // Defaults written out in full can take a frame that was just under the limit over it.
        Err(FrameError::TooLong { .. }) => return,
        Err(e) => panic!("{msg:?} decoded but does not encode: {e}"),
    }
    let again: T = FrameDecoder.decode(&mut out).expect("re-decodes").expect("whole");
    assert_eq!(&again, msg);
    assert!(out.is_empty());
}

/// A data stream's chunks. The first byte picks how the rest is cut into reads.
pub fn chunks(data: &[u8]) {
    let Some((&split, input)) = data.split_first() else { return };
    let whole = decode_chunks(input, input.len().max(1));
    let cut = decode_chunks(input, usize::from(split).max(1));
    assert_eq!(whole, cut, "the events depend on how the input was split ({split})");
}

#[derive(Debug, PartialEq, Eq)]
enum Ev {
    Data(Vec<u8>),
    Fin,
    Reset,
}

fn decode_chunks(input: &[u8], piece: usize) -> (Vec<Ev>, Option<ChunkError>) {
    let mut decoder = ChunkDecoder::new();
    let mut events: Vec<Ev> = Vec::new();
    for read in input.chunks(piece) {
        let mut at = 0;
        while at < read.len() {
            let rest = &read[at..];
            match decoder.decode(rest) {
                Ok((n, event)) => {
                    assert!(n > 0 && n <= rest.len(), "consumed {n} of {} bytes", rest.len());
                    at += n;
                    match event {
                        // Split reads split data events: compare the bytes, not the events.
                        Some(ChunkEvent::Data(d)) => match events.last_mut() {
                            Some(Ev::Data(prev)) => prev.extend_from_slice(d),
                            _ => events.push(Ev::Data(d.to_vec())),
                        },
                        Some(ChunkEvent::Fin) => events.push(Ev::Fin),
                        Some(ChunkEvent::Reset) => events.push(Ev::Reset),
                        None => {}
                    }
                }
                Err(e) => return (events, Some(e)),
            }
        }
    }
    (events, None)
}

/// The opening of a stream: the preface, then the opening frame (or, on a UDP data stream,
/// datagrams).
pub fn handshake(data: &[u8]) {
    let Some(preface) = data.get(..PREFACE_LEN) else { return };
    let preface: [u8; PREFACE_LEN] = preface.try_into().unwrap();
    if let Ok(p) = Preface::check(preface) {
        assert_eq!(Preface::parse(p.to_bytes()).unwrap(), p);
    }
    let rest = &data[PREFACE_LEN..];
    decode_all::<Open>(rest);
    let mut buf = BytesMut::from(rest);
    while let Some(d) = decode_datagram(&mut buf) {
        assert!(d.len() <= MAX_DATAGRAM_LEN);
    }
    assert!(buf.len() < 2 + MAX_DATAGRAM_LEN, "a datagram buffer past its bound");
}

/// The settings file, and a line of the admin API.
pub fn settings(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(s) = host_proxy::settings::Settings::parse(text, Path::new("settings.toml")) {
        assert!(s.validate().is_ok(), "accepted settings validate: {s:?}");
        let saved = toml::to_string(&s).expect("accepted settings serialize");
        let back = host_proxy::settings::Settings::parse(&saved, Path::new("settings.toml")).expect("reload");
        assert_eq!(back, s, "round trip of {saved}");
    }
    if let Ok(r) = serde_json::from_str::<host_proxy::admin::Request>(text) {
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<host_proxy::admin::Request>(&line).unwrap(), r);
    }
    let _ = text.parse::<host_proxy::settings::PortRange>();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed seed and saved crash, through its target.
    #[test]
    fn seeds_and_saved_crashes_pass() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        type Check = fn(&[u8]);
        let targets: [(&str, Check); 4] =
            [("frames", frames), ("chunks", chunks), ("handshake", handshake), ("settings", settings)];
        let mut n = 0;
        for (name, check) in targets {
            for dir in [root.join("seeds").join(name), root.join("crashes").join(name)] {
                let Ok(entries) = std::fs::read_dir(&dir) else { continue };
                for entry in entries {
                    let path = entry.unwrap().path();
                    check(&std::fs::read(&path).unwrap());
                    n += 1;
                }
            }
        }
        assert!(n >= 4, "the seeds are missing ({n} inputs)");
    }
}
