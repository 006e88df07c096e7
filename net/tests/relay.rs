//! In-process integration tests of the relay: a client ↔ relay ↔ data stream ↔ relay ↔ server
//! chain on loopback and a Unix socket pair, no binaries, no namespaces.

#![cfg(unix)] // the data stream is a Unix socket pair; Windows runs the relay in the Wine end-to-end test
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::time::Duration;

use bytes::BytesMut;
use hostnet_net::relay::tcp::{Outcome, RelayCounters, relay};
use hostnet_net::transport::fd::FdStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A connected Unix pair, each end as a relay's data stream.
fn unix_pair() -> (FdStream, FdStream) {
    FdStream::pair().unwrap()
}

/// `relay` between `local` and `peer` in a task of its own, with fresh counters and no
/// shutdown.
fn spawn_relay<L, P>(local: L, peer: P) -> JoinHandle<Outcome>
where
    L: hostnet_net::RawStream + 'static,
    P: hostnet_net::RawStream + 'static,
{
    tokio::spawn(async move {
        relay(&local, &peer, BytesMut::new(), &RelayCounters::default(), &CancellationToken::new()).await
    })
}

struct Chain {
    client: TcpStream,
    server: TcpStream,
    host_side: JoinHandle<Outcome>,
    guest_side: JoinHandle<Outcome>,
}

/// client ⇄ [host relay] ⇄ unix pair ⇄ [guest relay] ⇄ server
async fn chain() -> Chain {
    chain_with_buffers(None).await
}

/// [`chain`], with every socket's kernel buffers shrunk to about `small` bytes if given, so
/// writes block early and often.
async fn chain_with_buffers(small: Option<usize>) -> Chain {
    let (client, host_local) = local_pair().await;
    let (guest_local, server) = local_pair_connecting().await;
    if let Some(size) = small {
        let ends = [&client, &server].map(socket2::SockRef::from);
        for s in ends.iter().chain(&[&host_local, &guest_local].map(socket2::SockRef::from)) {
            s.set_send_buffer_size(size).unwrap();
            s.set_recv_buffer_size(size).unwrap();
        }
    }
    let (t1, t2) = unix_pair();
    if let Some(size) = small {
        for s in [&t1, &t2] {
            let s = s.socket();
            s.set_send_buffer_size(size).unwrap();
            s.set_recv_buffer_size(size).unwrap();
        }
    }
    Chain { client, server, host_side: spawn_relay(host_local, t1), guest_side: spawn_relay(guest_local, t2) }
}

/// The client's side of a transfer: sends `payload`, half-closes, and reads the answer to EOF.
fn send_then_read_reply(mut client: TcpStream, payload: Vec<u8>) -> JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        reply
    })
}

/// Bytes queued behind a TCP urgent mark reach the server without the client sending more
/// (telnet's interrupt, FTP's abort: the client then waits for an answer). A TCP read stops
/// short at the mark with those bytes behind it, which is why a short TCP read is taken for
/// "drained" only while no urgent data has been reported (`hostnet_net::local`). The urgent
/// byte itself is not carried.
#[tokio::test]
async fn bytes_behind_an_urgent_mark_are_relayed_without_more_arriving() {
    let (client, host_local) = local_pair().await;
    let (guest_local, mut server) = local_pair_connecting().await;
    client.set_nodelay(true).unwrap();
    let c = socket2::SockRef::from(&client);
    c.send(b"abc").unwrap();
    c.send_out_of_band(b"!").unwrap();
    c.send(b"def").unwrap();
    // All of it queued at the host relay's socket before the relay first reads: the client's
    // unacknowledged bytes (SIOCOUTQ) fall to 0 once the far socket has taken them all.
    let unacked = || {
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int to `n`.
        let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&client), libc::TIOCOUTQ, &mut n) };
        if r == 0 { n } else { -1 }
    };
    within(async {
        while unacked() != 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let (t1, t2) = unix_pair();
    let _host_side = spawn_relay(host_local, t1);
    let _guest_side = spawn_relay(guest_local, t2);
    let mut got = [0u8; 6];
    within(server.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"abcdef");
}

#[tokio::test]
async fn bytes_flow_both_ways_and_fin_closes_cleanly() {
    let Chain { client, mut server, host_side, guest_side } = chain().await;
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let writer = send_then_read_reply(client, payload.clone());
    let mut got = Vec::new();
    within(server.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "bytes differ");
    // Half-closed by the client, the server can still answer.
    server.write_all(b"thanks").await.unwrap();
    server.shutdown().await.unwrap();
    assert_eq!(within(writer).await.unwrap(), b"thanks");
    assert_eq!(within(host_side).await.unwrap(), Outcome::Closed);
    assert_eq!(within(guest_side).await.unwrap(), Outcome::Closed);
}

#[tokio::test]
async fn a_reset_travels_end_to_end() {
    let Chain { client, mut server, host_side, guest_side } = chain().await;
    socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
    drop(client);
    let mut buf = [0u8; 16];
    let r = within(server.read(&mut buf)).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "server should see a reset, got {r:?}"
    );
    assert_eq!(within(host_side).await.unwrap(), Outcome::LocalReset);
    assert_eq!(within(guest_side).await.unwrap(), Outcome::PeerReset);
}

#[tokio::test]
async fn a_vanished_peer_resets_the_client() {
    let (mut client, host_local) = local_pair().await;
    let (t1, t2) = unix_pair();
    let host_side = spawn_relay(host_local, t1);
    drop(t2); // The agent died without a word.
    let mut buf = [0u8; 16];
    let r = within(client.read(&mut buf)).await;
    assert!(matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset), "got {r:?}");
    assert_eq!(within(host_side).await.unwrap(), Outcome::PeerVanished);
}

#[tokio::test]
async fn garbage_from_the_peer_ends_only_that_connection() {
    let (mut client, host_local) = local_pair().await;
    let (t1, t2) = unix_pair_driven();
    let host_side = spawn_relay(host_local, t1);
    let mut t2 = t2;
    t2.write_all(&[0x7f, 0xff, 0xff, 0xfe]).await.unwrap(); // announces a 2 GiB chunk
    let mut buf = [0u8; 16];
    let r = within(client.read(&mut buf)).await;
    assert!(r.is_err() || r.as_ref().is_ok_and(|n| *n == 0), "client must not hang: {r:?}");
    assert_eq!(within(host_side).await.unwrap(), Outcome::ProtocolError);
}

#[tokio::test]
async fn shutdown_cancels_an_idle_relay() {
    let (_client, host_local) = local_pair().await;
    let (t1, _t2) = unix_pair();
    let token = CancellationToken::new();
    let t = token.clone();
    let host_side =
        tokio::spawn(
            async move { relay(&host_local, &t1, BytesMut::new(), &RelayCounters::default(), &t).await },
        );
    token.cancel();
    assert_eq!(within(host_side).await.unwrap(), Outcome::Cancelled);
}

/// Many connections on few threads share each thread's scratch buffer; slow readers on both
/// ends force the partial-write path (a direction's own buffer) again and again. Every byte
/// must arrive, in order, on the right connection.
///
/// Its pace is the kernel's, not the relay's: with 4 KiB socket buffers loopback TCP moves a
/// window per delayed ACK (~40 ms), so 256 KiB each way over one plain TCP pair took 4.6 s on a
/// 2-vCPU machine and this chain of two TCP hops 8.8 s — a CI run once crossed the common
/// 10 s deadline. 64 KiB each way is still sixteen times every buffer on the way; the deadline
/// is the transfer's own, with room for a busy machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_and_many_connections_keep_every_byte_in_place() {
    const CONNECTIONS: u32 = 8;
    const LEN: usize = 1 << 16;
    const TRANSFER_DEADLINE: Duration = Duration::from_secs(60);
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        tasks.push(tokio::spawn(async move {
            let Chain { client, server, host_side, guest_side } = chain_with_buffers(Some(4096)).await;
            let pattern = move |seed: u32| -> Vec<u8> {
                (0..LEN as u32).map(|i| (i.wrapping_mul(31).wrapping_add(seed * 7)) as u8).collect()
            };
            // Both directions at once, each read back slowly, a few bytes at a time. Returns
            // what `s` received.
            let pump = |mut s: TcpStream, seed: u32| async move {
                let out = pattern(seed);
                let (mut r, mut w) = s.split();
                let send = async {
                    w.write_all(&out).await.unwrap();
                    w.shutdown().await.unwrap();
                };
                let recv = async {
                    let mut got = Vec::with_capacity(LEN);
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = r.read(&mut buf[..1 + got.len() % 4096]).await.unwrap();
                        if n == 0 {
                            break got;
                        }
                        got.extend_from_slice(&buf[..n]);
                        if got.len() % 7 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                };
                let ((), got) = tokio::join!(send, recv);
                got
            };
            let (at_client, at_server) = tokio::join!(pump(client, c), pump(server, c + 1000));
            assert!(at_server == pattern(c), "connection {c}: the server did not get the client's bytes");
            assert!(
                at_client == pattern(c + 1000),
                "connection {c}: the client did not get the server's bytes"
            );
            assert_eq!(host_side.await.unwrap(), Outcome::Closed);
            assert_eq!(guest_side.await.unwrap(), Outcome::Closed);
        }));
    }
    for t in tasks {
        tokio::time::timeout(TRANSFER_DEADLINE, t).await.expect("deadline passed").unwrap();
    }
}

/// Before the far side has answered `open`, the client's bytes already flow; a refusal then
/// resets the client.
#[tokio::test]
async fn bytes_flow_before_the_answer_and_a_refusal_resets_the_client() {
    use hostnet_net::relay::tcp::relay_after;
    let (mut client, host_local) = local_pair().await;
    let (t1, mut t2) = unix_pair_driven();
    let (answer_tx, answer_rx) = tokio::sync::oneshot::channel::<Result<BytesMut, Outcome>>();
    let host_side = tokio::spawn(async move {
        let answer = async { answer_rx.await.unwrap_or(Err(Outcome::PeerVanished)) };
        relay_after(
            &host_local,
            &t1,
            Vec::new(),
            answer,
            &RelayCounters::default(),
            &CancellationToken::new(),
        )
        .await
    });
    client.write_all(b"hi").await.unwrap();
    let mut chunk = [0u8; 6];
    within(t2.read_exact(&mut chunk)).await.unwrap();
    assert_eq!(&chunk, b"\0\0\0\x02hi", "the client's bytes did not go out ahead of the answer");
    answer_tx.send(Err(Outcome::PeerReset)).unwrap();
    assert_eq!(within(host_side).await.unwrap().outcome, Outcome::PeerReset);
    let mut buf = [0u8; 1];
    let read = within(client.read(&mut buf)).await;
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client was not reset: {read:?}"
    );
}

/// A client that sent its request and half-closed before the relay began: its bytes are read
/// at once (the reactor has not reported them yet) and go out whole, then its FIN; the answer
/// then flows back and the connection ends cleanly.
#[tokio::test]
async fn a_client_that_spoke_and_half_closed_before_the_relay_began_is_relayed_whole() {
    use hostnet_net::relay::tcp::relay_after;
    let (mut client, host_local) = local_pair().await;
    client.write_all(b"GET /").await.unwrap();
    client.shutdown().await.unwrap();
    // Both the bytes and the FIN are in `host_local` before the relay starts.
    queued(&host_local, 5).await;
    let (t1, mut t2) = unix_pair_driven();
    let host_side = tokio::spawn(async move {
        let answer = async { Ok(BytesMut::new()) };
        relay_after(
            &host_local,
            &t1,
            Vec::new(),
            answer,
            &RelayCounters::default(),
            &CancellationToken::new(),
        )
        .await
    });
    let mut up = [0u8; 13];
    within(t2.read_exact(&mut up)).await.unwrap();
    assert_eq!(&up, b"\0\0\0\x05GET /\0\0\0\0", "request then FIN");
    t2.write_all(b"\0\0\0\x02ok\0\0\0\0").await.unwrap();
    let mut answer = Vec::new();
    within(client.read_to_end(&mut answer)).await.unwrap();
    assert_eq!(answer, b"ok");
    assert_eq!(within(host_side).await.unwrap().outcome, Outcome::Closed);
}

/// A data stream whose bytes cannot be spliced out of it (`splice(2)` into a pipe says
/// `EINVAL`, as some kernels do for some socket families); every other operation is the Unix
/// socket's own.
struct NoSpliceOut(FdStream);

impl std::os::fd::AsFd for NoSpliceOut {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl hostnet_net::RawStream for NoSpliceOut {
    fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        self.0.poll_read_ready(cx)
    }
    fn poll_write_ready(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        self.0.poll_write_ready(cx)
    }
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.try_read(buf)
    }
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.try_write(buf)
    }
    fn try_io_raw(
        &self,
        interest: tokio::io::Interest,
        f: &mut dyn FnMut() -> std::io::Result<usize>,
    ) -> Option<std::io::Result<usize>> {
        if interest == tokio::io::Interest::READABLE {
            // Refused without running it (the relay's probe only asks whether it may try).
            return Some(Err(std::io::Error::from_raw_os_error(libc::EINVAL)));
        }
        self.0.try_io_raw(interest, f)
    }
}

#[tokio::test]
async fn a_data_stream_that_refuses_splice_on_the_way_out_falls_back_to_a_buffer() {
    // client ⇄ [host relay] ⇄ unix pair ⇄ [guest relay] ⇄ server, both ends of the pair
    // refusing to be spliced from: each direction's bulk gear starts as a pipe and must copy
    // instead, without losing or reordering a byte.
    let (client, host_local) = local_pair().await;
    let (guest_local, mut server) = local_pair_connecting().await;
    let (t1, t2) = unix_pair();
    let host_side = spawn_relay(host_local, NoSpliceOut(t1));
    let guest_side = spawn_relay(guest_local, NoSpliceOut(t2));
    let payload: Vec<u8> = (0..8_000_000u32).map(|i| (i % 253) as u8).collect();
    let writer = send_then_read_reply(client, payload.clone());
    let mut got = Vec::new();
    within(server.read_to_end(&mut got)).await.unwrap();
    assert!(got == payload, "host → guest bytes differ ({} of {} arrived)", got.len(), payload.len());
    server.write_all(&payload).await.unwrap();
    server.shutdown().await.unwrap();
    assert!(within(writer).await.unwrap() == payload, "guest → host bytes differ");
    assert_eq!(within(host_side).await.unwrap(), Outcome::Closed);
    assert_eq!(within(guest_side).await.unwrap(), Outcome::Closed);
}

/// The opener's preface and `open` go out in the same write as the client's first bytes; a
/// client that says nothing does not hold them back (the far side must connect to a server
/// that speaks first).
#[tokio::test]
async fn the_opening_goes_with_the_first_bytes_or_alone_at_once() {
    use hostnet_net::relay::tcp::relay_after;
    for speaks in [true, false] {
        let (mut client, host_local) = local_pair().await;
        if speaks {
            client.write_all(b"hi").await.unwrap();
            queued(&host_local, 2).await;
        }
        let (t1, mut t2) = unix_pair_driven();
        let _host_side = tokio::spawn(async move {
            let answer = std::future::pending();
            relay_after(
                &host_local,
                &t1,
                b"OPEN".to_vec(),
                answer,
                &RelayCounters::default(),
                &CancellationToken::new(),
            )
            .await
        });
        let want: &[u8] = if speaks { b"OPEN\0\0\0\x02hi" } else { b"OPEN" };
        let mut got = vec![0u8; want.len()];
        within(t2.read_exact(&mut got)).await.unwrap();
        assert_eq!(got, want, "client spoke first: {speaks}");
    }
}

/// `relay_answering` between `local` and `stream` in a task of its own, its answer `ANSWER`.
fn spawn_answering(local: hostnet_net::local::LocalTcp, stream: FdStream) -> JoinHandle<Outcome> {
    tokio::spawn(async move {
        hostnet_net::relay::tcp::relay_answering(
            &local,
            &stream,
            BytesMut::new(),
            b"ANSWER".to_vec(),
            &RelayCounters::default(),
            &CancellationToken::new(),
        )
        .await
        .outcome
    })
}

/// The answering side holds its answer until the local side's first bytes (or FIN) and sends
/// them in one write: nothing reaches the opener before the server speaks.
#[tokio::test(flavor = "current_thread")]
async fn the_answer_waits_for_the_servers_first_bytes() {
    let (mut server, guest_local) = local_pair().await;
    let (t1, t2) = unix_pair_driven();
    let guest_side = spawn_answering(guest_local, t1);
    // On this one thread the relay runs until it waits for the server.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let mut buf = [0u8; 64];
    let early = t2.try_read(&mut buf);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the answer went out before the server spoke: {early:?}"
    );
    server.write_all(b"ok").await.unwrap();
    server.shutdown().await.unwrap();
    let mut t2 = t2;
    let mut got = [0u8; 16];
    within(t2.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"ANSWER\0\0\0\x02ok\0\0\0\0", "answer, the server's bytes, its FIN");
    t2.write_all(&[0, 0, 0, 0]).await.unwrap();
    assert_eq!(within(guest_side).await.unwrap(), Outcome::Closed);
}

/// A server that answers and closes at once (a short connection's reply): `connected`, its
/// bytes and its FIN leave in one write — one message on a packet socket standing in for the
/// data stream — so the far side is woken once, not twice.
#[tokio::test(flavor = "current_thread")]
async fn an_answer_and_the_close_behind_it_leave_in_one_write() {
    let (mut server, guest_local) = local_pair().await;
    server.write_all(b"ok").await.unwrap();
    server.shutdown().await.unwrap();
    let (a, b) = socket2::Socket::pair(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None).unwrap();
    a.set_nonblocking(true).unwrap();
    let t1 = FdStream::new(a).unwrap();
    let guest_side = spawn_answering(guest_local, t1);
    let first = within(tokio::task::spawn_blocking(move || {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
        let n = b.recv(&mut buf).unwrap();
        // SAFETY: `recv` initialised the first `n` bytes.
        let got: Vec<u8> = buf[..n].iter().map(|x| unsafe { x.assume_init() }).collect();
        b.send(&[0, 0, 0, 0]).unwrap();
        got
    }))
    .await
    .unwrap();
    assert_eq!(first, b"ANSWER\0\0\0\x02ok\0\0\0\0", "answer, the server's bytes and its FIN in one message");
    assert_eq!(within(guest_side).await.unwrap(), Outcome::Closed);
}
