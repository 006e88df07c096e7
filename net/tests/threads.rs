//! Connections on relay threads that turn to bulk: they spread over the threads and go on
//! relaying both ways after the move (`hostnet_net::threads`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::future::{Future, poll_fn};
use std::io::{Read, Write};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hostnet_net::TransportStream;
use hostnet_net::relay::tcp::{RelayCounters, relay};
use hostnet_net::threads::{RelayThreads, spread_bulk};
use hostnet_net::transport::raw::{self, RawStream};
use hostnet_net::transport::roaming::Roaming;
use hostnet_protocol::chunk::{ChunkDecoder, ChunkEvent, data_header};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The relay's side of a new TCP connection (non-blocking) and its far end.
fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let far = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (near, _) = l.accept().unwrap();
    near.set_nonblocking(true).unwrap();
    far.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (near, far)
}

/// Reads `want` bytes of chunk data from a relay's data stream.
fn read_chunks(far: &mut std::net::TcpStream, want: usize) -> Vec<u8> {
    let (mut decoder, mut got, mut buf) = (ChunkDecoder::new(), Vec::new(), vec![0u8; 64 << 10]);
    while got.len() < want {
        let n = far.read(&mut buf).expect("relayed in time");
        assert!(n > 0, "the relay ended the data stream");
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let (used, event) = decoder.decode(rest).unwrap();
            rest = &rest[used..];
            if let Some(ChunkEvent::Data(d)) = event {
                got.extend_from_slice(d);
            }
        }
    }
    got
}

/// Runs `serve` for each of `conns` as connections accepted on the set's first thread (its
/// first accept loop goes there), and waits until all are placed.
fn accept_on_first<F, Fut>(
    threads: &Arc<RelayThreads>,
    tracker: &TaskTracker,
    conns: Vec<std::net::TcpStream>,
    serve: F,
) where
    F: Fn(usize, tokio::net::TcpStream) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (t, tr) = (threads.clone(), tracker.clone());
    let (placed_tx, placed) = std::sync::mpsc::channel();
    threads.spawn_loop(async move {
        assert_eq!(t.current(), Some(0), "the first accept loop runs on the first thread");
        for (i, c) in conns.into_iter().enumerate() {
            let serve = serve.clone();
            t.spawn_connection(tokio::net::TcpStream::from_std(c).unwrap(), &tr, move |c| serve(i, c));
        }
        placed_tx.send(()).unwrap();
    });
    placed.recv_timeout(Duration::from_secs(10)).unwrap();
}

#[test]
fn connections_turning_to_bulk_spread_over_the_threads_and_go_on_relaying_both_ways() {
    spread_then_relay_both_ways(Towards::Peer);
}

/// The same with the bulk bytes flowing from the data stream to the client: the direction
/// that moves the connection is then the one polled second, after the other has waited again
/// on the old thread's reactor.
#[test]
fn connections_turning_to_bulk_towards_the_client_spread_and_go_on_relaying_both_ways() {
    spread_then_relay_both_ways(Towards::Client);
}

/// Which way a test's bulk transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Towards {
    /// Client → relay → data stream.
    Peer,
    /// Data stream → relay → client.
    Client,
}

fn spread_then_relay_both_ways(towards: Towards) {
    let threads = RelayThreads::start("test-spread", 2).unwrap();
    let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
    let (mut locals, mut peers, mut ends) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..2 {
        let ((local, client), (peer, far)) = (tcp_pair(), tcp_pair());
        locals.push(local);
        peers.push(Some(peer));
        ends.push((client, far));
    }
    let peers = Arc::new(std::sync::Mutex::new(peers));
    let s = stop.clone();
    accept_on_first(&threads, &tracker, locals, move |i, local| {
        let (peer, stop) = (peers.lock().unwrap()[i].take().unwrap(), s.clone());
        async move {
            let peer = TransportStream::Tcp(tokio::net::TcpStream::from_std(peer).unwrap());
            let (local, peer) = (Roaming::new(local), Roaming::new(peer));
            relay(&local, &peer, BytesMut::new(), &RelayCounters::default(), &stop).await;
        }
    });
    assert_eq!(threads.live(), [2, 0], "both start where they were accepted");
    assert_eq!(threads.bulk(), [0, 0]);

    // A bulk transfer on each: the first stays, the second goes to the other thread.
    let bulk = vec![7u8; 512 << 10];
    for (client, far) in &mut ends {
        if towards == Towards::Peer {
            client.write_all(&bulk).unwrap();
            assert_eq!(read_chunks(far, bulk.len()), bulk);
        } else {
            far.write_all(&[&data_header(bulk.len())[..], &bulk].concat()).unwrap();
            let mut got = vec![0u8; bulk.len()];
            client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            client.read_exact(&mut got).expect("relayed to the client in time");
            assert_eq!(got, bulk);
        }
    }
    // The moved connection is counted on its new thread before its old task is dropped there.
    wait_until("a bulk connection on each thread", || threads.bulk() == [1, 1] && threads.live() == [1, 1]);

    // Both still relay both ways — the moved one's other direction too, which was waiting on
    // the first thread's reactor when it moved.
    for (i, (client, far)) in ends.iter_mut().enumerate() {
        let word = format!("back {i}");
        far.write_all(&[&data_header(word.len())[..], word.as_bytes()].concat()).unwrap();
        let mut got = vec![0u8; word.len()];
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        client.read_exact(&mut got).expect("relayed back in time");
        assert_eq!(got, word.as_bytes());
        client.write_all(b"on").unwrap();
        assert_eq!(read_chunks(far, 2), b"on");
    }

    stop.cancel();
    wait_until("every connection counted out", || threads.live() == [0, 0] && threads.bulk() == [0, 0]);
    tracker.close();
    wait_until("every task ended", || tracker.is_empty());
}

#[test]
fn a_wait_begun_on_the_old_thread_is_woken_on_the_new_one() {
    let threads = RelayThreads::start("test-spread-wait", 2).unwrap();
    let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
    let (moved_tx, moved) = std::sync::mpsc::channel();
    let (woken_tx, woken) = std::sync::mpsc::channel();
    let ((a0, _far_a0), (a1, _far_a1)) = (tcp_pair(), tcp_pair());
    let ((b0, _far_b0), (b1, mut far_b1)) = (tcp_pair(), tcp_pair());
    let bs = Arc::new(std::sync::Mutex::new(vec![Some(b0), Some(b1)]));
    let (t, s) = (threads.clone(), stop.clone());
    accept_on_first(&threads, &tracker, vec![a0, a1], move |i, a| {
        let (b, t, stop) = (bs.lock().unwrap()[i].take().unwrap(), t.clone(), s.clone());
        let (moved_tx, woken_tx) = (moved_tx.clone(), woken_tx.clone());
        async move {
            let b = tokio::net::TcpStream::from_std(b).unwrap();
            let (a, b) = (Roaming::new(a), Roaming::new(b));
            let roams = a.roams() && b.roams();
            let rehome = || a.rehome().and_then(|()| b.rehome());
            if i == 0 {
                // The first turns to bulk and stays.
                spread_bulk(roams, rehome).await;
                return stop.cancelled().await;
            }
            // The second waits for `b` — polled first, so on the first thread's reactor —
            // while it turns to bulk and moves.
            let mut wait = std::pin::pin!(raw::readable(&b));
            let mut turn = std::pin::pin!(spread_bulk(roams, rehome));
            let mut turned = false;
            poll_fn(|cx| {
                if wait.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                if !turned && turn.as_mut().poll(cx).is_ready() {
                    turned = true;
                    moved_tx.send(t.current()).unwrap();
                }
                Poll::Pending
            })
            .await;
            woken_tx.send(()).unwrap();
        }
    });
    assert_eq!(moved.recv_timeout(Duration::from_secs(10)).unwrap(), Some(1), "moved");
    far_b1.write_all(b"x").unwrap();
    woken.recv_timeout(Duration::from_secs(10)).expect("the wait begun before the move was woken");
    stop.cancel();
    tracker.close();
    wait_until("every task ended", || tracker.is_empty());
}
