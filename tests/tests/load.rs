//! Load, through the netns stand-in: a connection storm past the proxy's limit, thousands of
//! concurrent connections, a slow reader facing a flood (memory must stay bounded), and
//! thousands of UDP flows past the flow limit.
//!
//! Needs root (network namespaces, and raising the open-file hard limit); `.ci/run` runs as
//! root.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hostnet_tests::*;

fn any_v4(port: u16) -> SocketAddr {
    SocketAddr::new("0.0.0.0".parse().unwrap(), port)
}

/// How many lines of the demo's log contain `needle`.
fn log_lines(demo: &Demo, needle: &str) -> usize {
    demo.log_text().lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn a_connection_storm_past_the_limit_is_refused_cleanly_and_counted() {
    const LIMIT: usize = 50;
    const STORM: usize = 2_000;
    let mut demo = Demo::start_with(&["--max-connections", &LIMIT.to_string()]);
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(any_v4(port), false), echo);
    drop(connect_when_forwarded(loopback(false, port)));
    wait_until("the probe's connection is closed", || {
        demo.forward_count("tcp", port, "connections_active") == 0
    });

    // Fill the limit with live connections, each proven end to end.
    let held: Vec<TcpStream> = (0..LIMIT)
        .map(|i| {
            let mut c = TcpStream::connect(loopback(false, port)).unwrap();
            c.set_read_timeout(Some(DEADLINE)).unwrap();
            let mut b = [0u8; 1];
            c.write_all(&[i as u8]).unwrap();
            c.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i as u8);
            c
        })
        .collect();
    assert_eq!(demo.forward_count("tcp", port, "connections_active"), LIMIT as u64);

    // The storm: every further connection is closed at once, never left hanging.
    let started = Instant::now();
    let slowest = std::sync::Mutex::new(Duration::ZERO);
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < STORM {
                    let t = Instant::now();
                    let ended = match TcpStream::connect(loopback(false, port)) {
                        Ok(mut c) => {
                            let _ = c.write_all(b"let me in");
                            read_until_closed(&mut c)
                        }
                        // The refusal's reset can reach the socket before `connect` returns
                        // (the handshake is done; a blocking connect then reports the reset).
                        Err(e) if e.kind() == ErrorKind::ConnectionReset => Err(e),
                        Err(e) => panic!("connecting to the forwarded port failed: {e}"),
                    };
                    assert!(
                        matches!(&ended, Ok(0))
                            || matches!(&ended, Err(e) if e.kind() == ErrorKind::ConnectionReset),
                        "a refused connection is reset or closed, with nothing relayed: {ended:?}"
                    );
                    let mut m = slowest.lock().unwrap();
                    *m = (*m).max(t.elapsed());
                }
            });
        }
    });
    let took = started.elapsed();
    eprintln!(
        "{STORM} connections past a limit of {LIMIT}: all refused in {took:?}, slowest refusal {:?}",
        slowest.lock().unwrap()
    );
    wait_until("status counts every refusal", || {
        demo.forward_count("tcp", port, "connections_refused") == STORM as u64
    });
    let logged = log_lines(&demo, "the limit: resetting new ones");
    assert!(
        (1..=12).contains(&logged),
        "refusals are logged, rate-limited (at 1, 2, 4, …): {logged} lines for {STORM}"
    );

    // The held connections were never disturbed, and freeing them lets new ones in.
    for (i, mut c) in held.into_iter().enumerate() {
        let mut b = [0u8; 1];
        c.write_all(&[i as u8 ^ 0xff]).unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(b[0], i as u8 ^ 0xff);
    }
    wait_until("the held connections are closed", || {
        demo.forward_count("tcp", port, "connections_active") == 0
    });
    let c = TcpStream::connect(loopback(false, port)).unwrap();
    assert_eq!(echo_round_trip(c, b"room again"), b"room again");
    assert!(demo.alive());
    assert!(!demo.panicked());
}

/// How many connections to hold open at once (about 10 s on two cores).
const CONCURRENT: usize = 10_000;
/// Most memory the proxy and the agent may hold per open connection while all are busy: two
/// lazily taken relay buffers, of which only the pages the data touched are resident, plus
/// sockets' and tasks' state. Measured: 3–6 KiB. (Before the allocator was tuned, freed relay
/// buffers stayed resident: ~170 KiB per connection, busy or idle.)
const RSS_PER_CONNECTION_BOUND_KIB: u64 = 32;

/// Taken by the tests that use thousands of fds in this process, so they do not share the
/// open-file limit.
static FD_HUNGRY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Fds each process needs besides its connections' (runtimes, logs, listeners, the admin API).
const FD_SLACK: u64 = 300;

#[test]
fn thousands_of_concurrent_connections_all_echo() {
    let _fds = FD_HUNGRY.lock().unwrap_or_else(|p| p.into_inner());
    let wanted = CONCURRENT;
    // Each connection is two sockets in this process (desktop client, guest server), and two
    // in the proxy and in the agent each (the client or server, and the transport stream).
    let limit = raise_fd_limit(2 * wanted as u64 + FD_SLACK);
    let n = wanted.min(((limit.saturating_sub(FD_SLACK)) / 2) as usize);
    if n < wanted {
        eprintln!(
            "only {n} connections, not {wanted}: the open-file hard limit is {limit} and raising it \
             needs CAP_SYS_RESOURCE"
        );
    }
    let mut demo = Demo::start();
    let port = free_port();
    let listener = demo.listen(any_v4(port), false);
    let base = (rss_kib(demo.pid()), rss_kib(demo.agent_pid()));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.spawn(serve_echo(listener));
    drop(connect_when_forwarded(loopback(false, port)));

    let echoed = Arc::new(AtomicUsize::new(0));
    let (release, released) = tokio::sync::watch::channel(false);
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let started = Instant::now();
    let mut tasks: Vec<_> = (0..n)
        .map(|i| {
            let (echoed, mut released, connecting) = (echoed.clone(), released.clone(), connecting.clone());
            rt.spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let permit = connecting.acquire_owned().await.unwrap();
                let mut c = tokio::net::TcpStream::connect(loopback(false, port)).await?;
                drop(permit);
                let data = pattern(1024, i as u64 + 1);
                c.write_all(&data).await?;
                let mut got = vec![0u8; data.len()];
                c.read_exact(&mut got).await?;
                assert!(got == data, "connection {i} got someone else's bytes");
                echoed.fetch_add(1, Ordering::SeqCst);
                // Stay open until every connection has echoed: all are open at once.
                let _ = released.wait_for(|r| *r).await;
                c.shutdown().await?;
                let mut rest = Vec::new();
                c.read_to_end(&mut rest).await?;
                assert!(rest.is_empty());
                Ok::<_, std::io::Error>(())
            })
        })
        .collect();
    wait_until("every connection has echoed", || {
        echoed.load(Ordering::SeqCst) == n || tasks.iter().any(|t| t.is_finished())
    });
    if let Some(i) = tasks.iter().position(|t| t.is_finished()) {
        let ended = rt.block_on(tasks.swap_remove(i));
        panic!("connection {i} ended before all {n} were open: {ended:?}");
    }
    let all_open = started.elapsed();
    let active = demo.forward_count("tcp", port, "connections_active");
    let (proxy_rss, agent_rss) = (rss_kib(demo.pid()), rss_kib(demo.agent_pid()));
    release.send_replace(true);
    for t in tasks {
        rt.block_on(t).unwrap().unwrap();
    }
    eprintln!(
        "{n} concurrent connections open and echoed in {all_open:?}, closed after {:?}; with all open: proxy RSS {} → {} MiB, agent RSS {} → {} MiB",
        started.elapsed(),
        base.0 >> 10,
        proxy_rss >> 10,
        base.1 >> 10,
        agent_rss >> 10
    );
    assert_eq!(active, n as u64, "the proxy saw all {n} open at once");
    for (who, before, after) in [("proxy", base.0, proxy_rss), ("agent", base.1, agent_rss)] {
        let per_connection = after.saturating_sub(before) / n as u64;
        assert!(
            per_connection <= RSS_PER_CONNECTION_BOUND_KIB,
            "the {who} holds {per_connection} KiB per open connection ({before} → {after} KiB)"
        );
    }
    wait_until("every connection is closed in the proxy", || {
        demo.forward_count("tcp", port, "connections_active") == 0
    });
    assert!(demo.alive());
    assert!(!demo.panicked());
}

/// Echoes every connection on `listener` (a guest socket), on the test's tokio runtime.
async fn serve_echo(listener: std::net::TcpListener) {
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    while let Ok((c, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = c.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// How long a flood runs against a slow reader.
const FLOOD_FOR: Duration = Duration::from_secs(3);
/// Most the proxy and the agent may grow while it does: a relay buffer (256 KiB) per
/// direction plus allocator slack. Buffering the flood instead would grow them by hundreds of
/// MiB a second on loopback.
const RSS_GROWTH_BOUND_KIB: u64 = 16 * 1024;
/// Most bytes that may be in flight between a flooding writer and a slow reader: the kernel's
/// socket buffers along the way (several MiB each on loopback with autotuning) and the relay
/// buffers. Without backpressure the writer would push gigabytes in [`FLOOD_FOR`].
const IN_FLIGHT_BOUND: u64 = 64 << 20;

#[test]
fn a_slow_reader_facing_a_flood_keeps_memory_bounded() {
    let demo = Demo::start();
    let (to_guest, from_guest) = (free_port(), free_port());
    let _slow = GuestServer::serve(demo.listen(any_v4(to_guest), false), slow_read);
    let _flood = GuestServer::serve(demo.listen(any_v4(from_guest), false), flood);
    wait_until("both ports are forwarded", || {
        TcpStream::connect(loopback(false, to_guest)).is_ok()
            && TcpStream::connect(loopback(false, from_guest)).is_ok()
    });
    let (proxy, agent) = (demo.pid(), demo.agent_pid());
    let before = (rss_kib(proxy), rss_kib(agent));

    // Desktop floods, guest reads slowly.
    let mut writer = TcpStream::connect(loopback(false, to_guest)).unwrap();
    writer.set_write_timeout(Some(Duration::from_millis(50))).unwrap();
    // Guest floods, desktop reads slowly.
    let mut reader = TcpStream::connect(loopback(false, from_guest)).unwrap();
    reader.set_read_timeout(Some(DEADLINE)).unwrap();
    let chunk = pattern(256 * 1024, 3);
    let (mut written, mut read, mut peak) = (0u64, 0u64, before);
    let mut buf = [0u8; 1024];
    let start = Instant::now();
    while start.elapsed() < FLOOD_FOR {
        match writer.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("the flooding client failed: {e}"),
        }
        read += reader.read(&mut buf).unwrap() as u64;
        peak = (peak.0.max(rss_kib(proxy)), peak.1.max(rss_kib(agent)));
    }
    let forwarded_to_desktop = demo.forward_count("tcp", from_guest, "bytes_from_guest");
    eprintln!(
        "{FLOOD_FOR:?} of flooding a slow reader: desktop wrote {} MiB; desktop read {} KiB of the guest's flood, the proxy relayed {} MiB of it; \
         proxy RSS {} → peak {} MiB, agent RSS {} → peak {} MiB",
        written >> 20,
        read >> 10,
        forwarded_to_desktop >> 20,
        before.0 >> 10,
        peak.0 >> 10,
        before.1 >> 10,
        peak.1 >> 10
    );
    assert!(
        written < IN_FLIGHT_BOUND,
        "backpressure stops a flooding desktop client: it wrote {written} bytes"
    );
    assert!(
        forwarded_to_desktop < read + IN_FLIGHT_BOUND,
        "backpressure stops a flooding guest: {forwarded_to_desktop} bytes relayed to a reader that took {read}"
    );
    for (who, b, p) in [("proxy", before.0, peak.0), ("agent", before.1, peak.1)] {
        assert!(
            p.saturating_sub(b) < RSS_GROWTH_BOUND_KIB,
            "the {who} grew from {b} KiB to {p} KiB: it buffers instead of pushing back"
        );
    }
}

#[test]
fn thousands_of_udp_flows_past_the_flow_limit_are_dropped_and_counted() {
    const LIMIT: usize = 256;
    const CLIENTS: usize = 3_000;
    let _fds = FD_HUNGRY.lock().unwrap_or_else(|p| p.into_inner());
    assert!(raise_fd_limit(CLIENTS as u64 + FD_SLACK) >= CLIENTS as u64 + FD_SLACK);
    let mut demo = Demo::start_with(&["--max-udp-flows", &LIMIT.to_string()]);
    let port = free_port();
    let _echo = UdpEcho::start(&demo, any_v4(port));
    let target = loopback(false, port);
    wait_until("the UDP port is forwarded", || udp_port_taken(target));

    let clients: Vec<_> = (0..CLIENTS).map(|_| udp_client(target)).collect();
    // The first LIMIT clients each get a flow, proven by an echo.
    for (i, c) in clients.iter().take(LIMIT).enumerate() {
        let data = format!("flow {i}");
        let got =
            udp_echo(c, data.as_bytes()).unwrap_or_else(|| panic!("flow {i} (within the limit) got no echo"));
        assert_eq!(got, data.as_bytes());
    }
    // Every further client is over the limit: its datagram is dropped and counted.
    for (i, c) in clients.iter().enumerate().skip(LIMIT) {
        c.send(format!("flow {i}").as_bytes()).unwrap();
    }
    let over = (CLIENTS - LIMIT) as u64;
    wait_until("status counts every datagram refused", || {
        demo.forward_count("udp", port, "connections_refused") == over
    });
    assert_eq!(demo.forward_count("udp", port, "connections_active"), LIMIT as u64);
    // The flows within the limit still work.
    for (i, c) in clients.iter().take(LIMIT).enumerate().step_by(16) {
        assert_eq!(udp_echo(c, b"still here").as_deref(), Some(&b"still here"[..]), "flow {i}");
    }
    let logged = log_lines(&demo, "UDP flows open, the limit");
    assert!((1..=13).contains(&logged), "refusals are logged, rate-limited: {logged} lines for {over}");
    eprintln!(
        "{CLIENTS} UDP clients, limit {LIMIT}: {LIMIT} flows served, {over} datagrams refused and counted"
    );
    assert!(demo.alive());
    assert!(!demo.panicked());
}
