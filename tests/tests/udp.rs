//! UDP forwarding end to end through the netns stand-in. Needs root (network namespaces).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hostnet_tests::*;

fn addr(s: &str, port: u16) -> SocketAddr {
    SocketAddr::new(s.parse().unwrap(), port)
}

/// Waits until hostnet holds the UDP port on the host, then until an echo comes back.
fn udp_forwarded(v6: bool, port: u16) -> std::net::UdpSocket {
    wait_until("hostnet binds the UDP port", || udp_port_taken(loopback(v6, port)));
    let c = udp_client(loopback(v6, port));
    c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // The first datagram opens the flow; retry in case the guest side was still settling.
    wait_until("a UDP echo comes back", || udp_echo(&c, b"probe").is_some_and(|r| r == b"probe"));
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c
}

#[test]
fn nc_udp_workflow_typing_flows_both_ways() {
    let demo = Demo::start();
    let port = free_port();
    // `nc -ul` (not `-ulk`: netcat-openbsd only answers the peer it locked on to without -k).
    let server =
        spawn_piped("ip", &["netns", "exec", &demo.netns, "nc", "-ul", "0.0.0.0", &port.to_string()]);
    // `localhost` may be tried as ::1 first: wait for both families.
    wait_until("hostnet binds the UDP port", || {
        udp_port_taken(loopback(false, port)) && (!has_ipv6() || udp_port_taken(loopback(true, port)))
    });
    let client = spawn_piped("nc", &["-u", "localhost", &port.to_string()]);
    // `nc -ul` connects its socket to its first client: the forward must outlast the agent's
    // next full read of the socket table (once a second), not just the first exchange.
    let past_a_full_read = Duration::from_millis(1_500);
    assert_conversation(server, client, &[past_a_full_read]);
}

#[test]
fn datagrams_from_one_byte_to_the_maximum_are_echoed_exactly() {
    let demo = Demo::start();
    let port = free_port();
    let _echo = UdpEcho::start(&demo, addr("::", port));
    let families: &[bool] = if has_ipv6() { &[false, true] } else { &[false] };
    for &v6 in families {
        let c = udp_forwarded(v6, port);
        // Largest UDP payload: 65 507 bytes over IPv4, 65 527 over IPv6.
        let max = if v6 { 65_527 } else { 65_507 };
        for len in [0, 1, 2, 100, 1_472, 1_500, 9_000, 32_768, max - 1, max] {
            let data = pattern(len, len as u64 + 1);
            let got = udp_echo(&c, &data)
                .unwrap_or_else(|| panic!("no echo for {len} bytes over {}", loopback(v6, port)));
            assert_eq!(got.len(), len, "datagram length over {}", loopback(v6, port));
            assert!(got == data, "{len}-byte datagram differs");
        }
    }
}

#[test]
fn several_clients_each_get_only_their_own_replies() {
    let demo = Demo::start();
    let port = free_port();
    let _echo = UdpEcho::start(&demo, addr("0.0.0.0", port));
    udp_forwarded(false, port);
    let clients: Vec<_> = (0..8).map(|_| udp_client(loopback(false, port))).collect();
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            std::thread::spawn(move || {
                let mut own = 0;
                for j in 0..50 {
                    let msg = format!("client {i} message {j}");
                    match udp_echo(&c, msg.as_bytes()) {
                        Some(r) if r == msg.as_bytes() => own += 1,
                        Some(r) => {
                            panic!("client {i} got someone else's reply: {}", String::from_utf8_lossy(&r))
                        }
                        None => {}
                    }
                }
                own
            })
        })
        .collect();
    let counts: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(counts.iter().all(|&n| n == 50), "every client gets all its replies: {counts:?}");
}

/// One client flooding its flow (batches of datagrams for that flow alone, its queue full)
/// must not keep another client's datagrams from the guest and back.
#[test]
fn a_flooding_client_does_not_starve_another() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let demo = Demo::start();
    let port = free_port();
    let _echo = UdpEcho::start(&demo, addr("0.0.0.0", port));
    let quiet = udp_forwarded(false, port);
    quiet.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let flood = udp_client(loopback(false, port));
    let (stop, flooded) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let flooder = {
        let (stop, flooded) = (stop.clone(), flooded.clone());
        std::thread::spawn(move || {
            let d = [0x5au8; 1400];
            while !stop.load(Ordering::Relaxed) {
                // Its replies are never read: they pile up and drop at its own socket.
                let _ = flood.send(&d);
                flooded.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    wait_until("the flood is under way", || flooded.load(Ordering::Relaxed) > 10_000);
    let mut buf = [0u8; 2048];
    for i in 0..20 {
        let msg = format!("quiet client, message {i}");
        let start = Instant::now();
        // UDP may drop (the port's socket is shared with the flood): resend until answered.
        'answered: loop {
            assert!(
                start.elapsed() < DEADLINE,
                "message {i} of the quiet client got no answer during the flood"
            );
            quiet.send(msg.as_bytes()).unwrap();
            while let Ok(n) = quiet.recv(&mut buf) {
                if &buf[..n] == msg.as_bytes() {
                    break 'answered;
                }
            }
        }
    }
    let sent = flooded.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
    eprintln!("quiet client answered 20 times while the flood sent {sent} datagrams");
}

#[test]
fn a_burst_of_thousands_of_datagrams_is_counted() {
    let demo = Demo::start();
    let port = free_port();
    let _echo = UdpEcho::start(&demo, addr("0.0.0.0", port));
    let c = udp_forwarded(false, port);
    let socket2 = socket2::SockRef::from(&c);
    let _ = socket2.set_recv_buffer_size(8 << 20);
    const N: usize = 20_000;
    let receiver = c.try_clone().unwrap();
    receiver.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let counter = std::thread::spawn(move || {
        let mut buf = [0u8; 128];
        let mut got = 0usize;
        // Counts until the echoes stop coming for 500 ms (or all arrived).
        while got < N && receiver.recv(&mut buf).is_ok() {
            got += 1;
        }
        got
    });
    let start = Instant::now();
    for i in 0..N {
        let mut d = [0u8; 64];
        d[..8].copy_from_slice(&(i as u64).to_be_bytes());
        c.send(&d).unwrap();
    }
    let sent_in = start.elapsed();
    let got = counter.join().unwrap();
    // The proxy logs its queue drops at 1, 2, 4, 8, … so the largest figure is a floor.
    let hostnet_drops: u64 = demo
        .log_text()
        .lines()
        .filter_map(|l| l.split("dropped=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    eprintln!(
        "UDP burst: {N} × 64 B sent in {sent_in:?} ({:.0}/s), {got} echoed, {} lost ({:.2} %), hostnet reports at least {hostnet_drops} dropped in its flow queue",
        N as f64 / sent_in.as_secs_f64(),
        N - got,
        (N - got) as f64 * 100.0 / N as f64
    );
    assert!(got > 0, "some of the burst must come back");
}

#[test]
fn the_host_udp_port_is_freed_after_the_guest_socket_closes() {
    let demo = Demo::start();
    let port = free_port();
    let echo = UdpEcho::start(&demo, addr("0.0.0.0", port));
    udp_forwarded(false, port);
    let closed = Instant::now();
    echo.close();
    wait_until("the host UDP port is free", || !udp_port_taken(loopback(false, port)));
    eprintln!("guest UDP socket closed → host port free: {:?}", closed.elapsed());
    if has_ipv6() {
        wait_until("the host UDP port on ::1 is free", || !udp_port_taken(loopback(true, port)));
    }
}
