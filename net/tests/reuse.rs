//! A data stream carrying one TCP connection after another (`docs/protocol.md`, section 3):
//! where each side's relay leaves the stream, what it keeps of what follows, and two
//! connections in a row over one stream, in process.

#![cfg(unix)] // the data stream is a Unix socket pair
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::time::Duration;

use bytes::BytesMut;
use hostnet_net::TransportStream;
use hostnet_net::relay::open::{answer_and_relay, open_and_relay};
use hostnet_net::relay::tcp::{Ended, Outcome, RelayCounters, relay_answering};
use hostnet_net::transport::fd::FdStream;
use hostnet_net::transport::handshake::{FrameReader, preface_and};
use hostnet_protocol::Open;
use hostnet_protocol::chunk::{FIN, RST};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The answering side's relay, its answer `A`, in a task of its own between a server and a data
/// stream: the server, the opener's end of the stream (driven by the test), and the task.
async fn spawn_answering() -> (TcpStream, UnixStream, JoinHandle<Ended>) {
    let (server, local) = local_pair().await;
    let (stream, opener) = unix_pair_driven();
    let answering = tokio::spawn(async move {
        let counters = RelayCounters::default();
        relay_answering(&local, &stream, BytesMut::new(), b"A".to_vec(), &counters, &CancellationToken::new())
            .await
    });
    (server, opener, answering)
}

/// The server says `hi` and half-closes; the driven opener reads the answer, those bytes and
/// the FIN: the answering side's direction is over.
async fn server_finishes_first(server: &mut TcpStream, opener: &mut UnixStream) {
    server.write_all(b"hi").await.unwrap();
    server.shutdown().await.unwrap();
    let mut got = [0u8; 11];
    within(opener.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"A\0\0\0\x02hi\0\0\0\0");
}

/// A data chunk of three bytes, as the opener sends it.
const DATA: [u8; 7] = [0, 0, 0, 3, b'a', b'b', b'c'];

/// The server resets its socket and goes while the opener sends data: the relay's write to it
/// fails and its RST comes back (the first writes may still be taken by the server's kernel).
async fn server_vanishes_while_the_opener_sends(server: TcpStream, opener: &mut UnixStream) {
    socket2::SockRef::from(&server).set_linger(Some(Duration::ZERO)).unwrap();
    drop(server);
    let mut rst = [0u8; 4];
    for sent in 0.. {
        assert!(sent < 100, "no RST came back");
        opener.write_all(&DATA).await.unwrap();
        if let Ok(read) = tokio::time::timeout(Duration::from_millis(20), opener.read_exact(&mut rst)).await {
            read.unwrap();
            break;
        }
    }
    assert_eq!(rst, RST);
}

fn opening() -> Vec<u8> {
    let open = Open::Tcp { addr: "127.0.0.1".parse().unwrap(), port: 8000, peer: None };
    preface_and(&open).unwrap()
}

/// The opener's FIN and its next opening arrive in one read: the connection ends cleanly, and
/// the opening is kept for the next one, not taken for data after FIN.
#[tokio::test]
async fn the_next_opening_read_with_the_fin_is_kept_for_the_next_connection() {
    let (mut server, mut opener, answering) = spawn_answering().await;
    server_finishes_first(&mut server, &mut opener).await;
    opener.write_all(&[&FIN[..], &opening()].concat()).await.unwrap();
    let ended = within(answering).await.unwrap();
    assert_eq!(ended.outcome, Outcome::Closed);
    assert!(ended.at_boundary);
    assert_eq!(&ended.after[..], &opening()[..], "the next opening, whole");
    let reader = FrameReader::after(ended.after);
    assert!(!reader.read_nothing(), "an opening has begun");
}

/// An RST right behind the opener's FIN, once our own FIN has gone: it crossed our FIN (both
/// directions are over), so it is kept with what follows, and the next opening's read skips
/// it.
#[tokio::test]
async fn a_reset_that_crossed_our_fin_is_skipped_before_the_next_opening() {
    let (mut server, mut opener, answering) = spawn_answering().await;
    server_finishes_first(&mut server, &mut opener).await;
    opener.write_all(&[&FIN[..], &RST, &opening()].concat()).await.unwrap();
    let ended = within(answering).await.unwrap();
    assert_eq!((ended.outcome, ended.at_boundary), (Outcome::Closed, true));
    assert_eq!(&ended.after[..4], &RST);
    // The stream itself is gone with the task; what was read past the FIN is all the reader
    // needs here.
    let (ours, _theirs) = FdStream::pair().unwrap();
    let mut reader = FrameReader::after(ended.after);
    let open: Open = within(reader.read_opening(&ours)).await.unwrap();
    assert!(matches!(open, Open::Tcp { port: 8000, .. }));
}

/// An RST behind the opener's FIN while the server still sends: the opener's client reset
/// after its half-close, and the server must hear of it.
#[tokio::test]
async fn a_reset_behind_the_fin_while_our_direction_runs_resets_the_server() {
    let (mut server, mut opener, answering) = spawn_answering().await;
    server.write_all(b"hi").await.unwrap();
    let mut got = [0u8; 7];
    within(opener.read_exact(&mut got)).await.unwrap();
    opener.write_all(&[&FIN[..], &RST].concat()).await.unwrap();
    let ended = within(answering).await.unwrap();
    assert_eq!((ended.outcome, ended.at_boundary), (Outcome::PeerReset, false));
    // The server read the FIN; its socket is then reset, which its writes find.
    let failed = within(async {
        loop {
            if server.write_all(b"more").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(failed, "the server sees a reset");
}

/// Our FIN has gone, then the server vanishes while the opener still sends: our RST goes to
/// the opener, and the stream is read on to the opener's FIN (it crossed our RST) — the stream
/// is then at a boundary, fit for another connection.
#[tokio::test]
async fn after_a_reset_behind_our_fin_the_stream_is_read_to_the_openers_fin() {
    let (mut server, mut opener, answering) = spawn_answering().await;
    server_finishes_first(&mut server, &mut opener).await;
    server_vanishes_while_the_opener_sends(server, &mut opener).await;
    assert!(!answering.is_finished(), "the relay waits for the opener's FIN");
    opener.write_all(&[&DATA[..], &FIN].concat()).await.unwrap();
    let ended = within(answering).await.unwrap();
    assert_eq!((ended.outcome, ended.at_boundary), (Outcome::LocalReset, true));
    assert!(ended.after.is_empty());
}

/// As above, but the opener closes the stream instead of finishing: not at a boundary.
#[tokio::test]
async fn after_a_reset_behind_our_fin_a_closed_stream_is_not_reused() {
    let (mut server, mut opener, answering) = spawn_answering().await;
    server_finishes_first(&mut server, &mut opener).await;
    server_vanishes_while_the_opener_sends(server, &mut opener).await;
    drop(opener);
    let ended = within(answering).await.unwrap();
    assert_eq!((ended.outcome, ended.at_boundary), (Outcome::LocalReset, false));
}

/// Two connections, one after the other, over one data stream: the opener's relay gives the
/// stream back and the answering side reads the next opening on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_in_a_row_share_one_data_stream() {
    let (a, b) = FdStream::pair().unwrap();
    let (mut ours, mut theirs) = (TransportStream::Unix(a), TransportStream::Unix(b));
    let mut reader = FrameReader::new();
    for round in 0..3u8 {
        let (mut client, host_local) = local_pair().await;
        let (guest_local, mut server) = local_pair_connecting().await;
        let open = Open::Tcp { addr: "127.0.0.1".parse().unwrap(), port: 8000, peer: None };
        let opener = tokio::spawn(async move {
            let counters = RelayCounters::default();
            open_and_relay(host_local, ours, &open, |e| panic!("{e}"), &counters, &CancellationToken::new())
                .await
        });
        let answering = tokio::spawn(async move {
            let open: Open = reader.read_opening(&theirs).await.unwrap();
            assert!(matches!(open, Open::Tcp { port: 8000, .. }));
            let counters = RelayCounters::default();
            answer_and_relay(theirs, reader, guest_local, &counters, &CancellationToken::new()).await.unwrap()
        });
        client.write_all(&[b'p', round]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut asked = Vec::new();
        within(server.read_to_end(&mut asked)).await.unwrap();
        assert_eq!(asked, [b'p', round]);
        server.write_all(&[b'a', round]).await.unwrap();
        server.shutdown().await.unwrap();
        let mut answer = Vec::new();
        within(client.read_to_end(&mut answer)).await.unwrap();
        assert_eq!(answer, [b'a', round]);
        let (opened, answered) = (within(opener).await.unwrap(), within(answering).await.unwrap());
        assert_eq!((opened.outcome, answered.outcome), (Outcome::Closed, Outcome::Closed), "round {round}");
        let (stream, next) = opened.reusable.expect("the opener keeps the stream");
        assert!(next.read_nothing(), "nothing read past the answering side's FIN");
        ours = stream;
        (theirs, reader) = answered.reusable.expect("the answering side keeps the stream");
    }
}
