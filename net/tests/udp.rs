//! The UDP relay between a data stream and a `connect`ed socket (`relay_connected`), in
//! process: a Unix socket pair as the data stream, two loopback UDP sockets.

#![cfg(unix)] // the data stream is a Unix socket pair; Windows runs UDP in the Wine end-to-end test
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use bytes::Bytes;
use hostnet_net::relay::socket::UdpSocket;
use hostnet_net::relay::udp::relay_connected;
use hostnet_net::transport::fd::FdStream;
use hostnet_net::transport::handshake::FrameReader;
use hostnet_net::transport::raw;
use hostnet_protocol::datagram::datagram_header;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The next datagram framed on `stream`, as text.
async fn next(reader: &mut FrameReader, stream: &FdStream) -> String {
    let d = within(reader.read_datagram(stream)).await.unwrap().expect("the stream ended");
    String::from_utf8(d.to_vec()).unwrap()
}

/// A relay's socket (non-blocking, registered) and its peer (blocking, 10 s timeout), each
/// connected to the other.
fn udp_pair() -> (UdpSocket, std::net::UdpSocket) {
    let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    a.connect(b.local_addr().unwrap()).unwrap();
    b.connect(a.local_addr().unwrap()).unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_read_timeout(Some(DEADLINE)).unwrap();
    (UdpSocket::from_std(a).unwrap(), b)
}

/// Early datagrams (the agent's catch-all got them before the flow's socket existed) reach the
/// stream first, then the socket's; the stream's reach the socket's peer; dropping the early
/// queue's sender does not end the relay; shutdown does, with every datagram counted.
#[tokio::test]
async fn early_datagrams_go_first_and_the_relay_outlives_their_queue() {
    let (relay_end, far_end) = FdStream::pair().unwrap();
    let (socket, peer) = udp_pair();
    let (tx, rx) = mpsc::channel(8);
    for d in [&b"early 1"[..], b"early 2"] {
        tx.try_send(Bytes::from_static(d)).unwrap();
    }
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let mut reader = FrameReader::new();
            relay_connected(&relay_end, &mut reader, &socket, None, Some(rx), &shutdown).await
        }
    });

    let mut reader = FrameReader::new();
    assert_eq!(next(&mut reader, &far_end).await, "early 1");
    assert_eq!(next(&mut reader, &far_end).await, "early 2");
    peer.send(b"from the socket").unwrap();
    assert_eq!(next(&mut reader, &far_end).await, "from the socket");
    tx.try_send(Bytes::from_static(b"early 3")).unwrap();
    assert_eq!(next(&mut reader, &far_end).await, "early 3");
    drop(tx);
    peer.send(b"after the queue closed").unwrap();
    assert_eq!(next(&mut reader, &far_end).await, "after the queue closed");

    // The other way: a frame on the stream becomes a datagram to the peer.
    let mut frame = datagram_header(5).unwrap().to_vec();
    frame.extend_from_slice(b"reply");
    within(raw::write_all(&far_end, &frame)).await.unwrap();
    let mut buf = [0u8; 64];
    let n =
        tokio::task::spawn_blocking(move || peer.recv(&mut buf).map(|n| buf[..n].to_vec())).await.unwrap();
    assert_eq!(n.unwrap(), b"reply");

    shutdown.cancel();
    let stats = within(relay).await.unwrap();
    assert_eq!((stats.from_socket, stats.to_socket), (5, 1), "{stats:?}");
}
