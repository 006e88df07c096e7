//! hostnet's benchmark harness: the same workloads over direct loopback (the limit) and through
//! hostnet's netns stand-in, side by side in one run, printed with ratios.
//!
//! Needs root (it starts `hostnet-proxy demo`). Build in release first:
//! `cargo build --release --workspace && sudo target/release/hostnet-bench [--quick] [--json PATH]`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::print_stdout)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hostnet_tests::{
    Demo, GuestServer, UdpEcho, connect_when_forwarded, echo, free_port, loopback, percentile,
};

struct Opts {
    quick: bool,
    json: Option<String>,
}

fn parse_args() -> Opts {
    let mut opts = Opts { quick: false, json: None };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--json" => opts.json = Some(args.next().expect("--json needs a path")),
            "-h" | "--help" => {
                println!(
                    "usage: hostnet-bench [--quick] [--json PATH]\n\nRuns each workload over direct loopback and through hostnet's netns stand-in (needs root)."
                );
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown argument {other:?}; see --help");
                std::process::exit(2);
            }
        }
    }
    opts
}

/// One measured figure, for the table and the JSON.
struct Row {
    workload: &'static str,
    unit: &'static str,
    direct: f64,
    hostnet: f64,
}

fn main() {
    let opts = parse_args();
    let demo = Demo::start();
    let mut rows = Vec::new();

    let bytes: u64 = if opts.quick { 256 << 20 } else { 2 << 30 };
    for (workload, streams) in [("TCP throughput, 1 stream", 1), ("TCP throughput, 8 streams", 8)] {
        rows.push(Row {
            workload,
            unit: "GiB/s",
            direct: tcp_throughput(|| TcpListener::bind("127.0.0.1:0").unwrap(), bytes, streams),
            hostnet: tcp_throughput(
                || demo.listen(SocketAddr::from(([0, 0, 0, 0], free_port())), false),
                bytes,
                streams,
            ),
        });
    }

    let (direct_echo_addr, _direct_srv) = echo_target(None);
    let (hostnet_echo_addr, _hostnet_srv) = echo_target(Some(&demo));
    let trips = if opts.quick { 2_000 } else { 20_000 };
    let (d50, d99) = rtt_micros(direct_echo_addr, trips);
    let (h50, h99) = rtt_micros(hostnet_echo_addr, trips);
    rows.push(Row { workload: "RTT 1 B ping-pong, p50", unit: "µs", direct: d50, hostnet: h50 });
    rows.push(Row { workload: "RTT 1 B ping-pong, p99", unit: "µs", direct: d99, hostnet: h99 });
    let window = Duration::from_secs_f64(if opts.quick { 0.5 } else { 2.0 });
    rows.push(Row {
        workload: "new connections (1 request)",
        unit: "conn/s",
        direct: connections_per_second(direct_echo_addr, window),
        hostnet: connections_per_second(hostnet_echo_addr, window),
    });

    let seconds = if opts.quick { 0.3 } else { 1.0 };
    let direct_port = free_port();
    let direct_echo = UdpEcho::start_here(loopback(false, direct_port));
    let hostnet_port = free_port();
    let _hostnet_echo = UdpEcho::start(&demo, SocketAddr::from(([0, 0, 0, 0], hostnet_port)));
    for size in [64usize, 1400] {
        rows.push(Row {
            workload: if size == 64 { "UDP lossless rate, 64 B" } else { "UDP lossless rate, 1400 B" },
            unit: "datagrams/s",
            direct: udp_lossless_rate(loopback(false, direct_port), size, seconds),
            hostnet: udp_lossless_rate(loopback(false, hostnet_port), size, seconds),
        });
    }
    drop(direct_echo);

    println!("\n{:<28} {:>14} {:>14} {:>9}  unit", "workload", "direct", "hostnet", "ratio");
    for r in &rows {
        println!(
            "{:<28} {:>14.2} {:>14.2} {:>8.2}×  {}",
            r.workload,
            r.direct,
            r.hostnet,
            r.hostnet / r.direct,
            r.unit
        );
    }
    if let Some(path) = opts.json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"workload\":{:?},\"unit\":{:?},\"direct\":{},\"hostnet\":{},\"ratio\":{}}}",
                    r.workload,
                    r.unit,
                    r.direct,
                    r.hostnet,
                    r.hostnet / r.direct
                )
            })
            .collect();
        std::fs::write(&path, format!("{{\"quick\":{},\"results\":[{}]}}\n", opts.quick, items.join(",")))
            .unwrap();
        println!("\nJSON written to {path}");
    }
    demo.stop();
}

/// Sends `bytes` (split over `streams` connections) into a sink server; GiB/s from the first
/// byte written to the last byte read.
fn tcp_throughput(listen: impl FnOnce() -> TcpListener, bytes: u64, streams: usize) -> f64 {
    let listener = listen();
    let addr = loopback(false, listener.local_addr().unwrap().port());
    let sink = std::thread::spawn(move || {
        let readers: Vec<_> = (0..streams)
            .map(|_| {
                let (mut c, _) = listener.accept().unwrap();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut total = 0u64;
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break total,
                            Ok(n) => total += n as u64,
                        }
                    }
                })
            })
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).sum::<u64>()
    });
    let conns: Vec<TcpStream> = (0..streams).map(|_| connect_retrying(addr)).collect();
    let per_stream = bytes / streams as u64;
    let start = Instant::now();
    let writers: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let chunk = vec![0x5au8; 1 << 20];
                let mut sent = 0u64;
                while sent < per_stream {
                    c.write_all(&chunk).unwrap();
                    sent += chunk.len() as u64;
                }
                c.shutdown(std::net::Shutdown::Write).unwrap();
                sent
            })
        })
        .collect();
    let sent: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let got = sink.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(got, sent, "sink got every byte");
    got as f64 / secs / (1u64 << 30) as f64
}

/// An echo server on this machine (`None`) or in the stand-in's "VM", and where to reach it.
fn echo_target(demo: Option<&Demo>) -> (SocketAddr, GuestServer) {
    let port = free_port();
    let listener = match demo {
        Some(d) => d.listen(SocketAddr::from(([0, 0, 0, 0], port)), false),
        None => TcpListener::bind(loopback(false, port)).unwrap(),
    };
    let server = GuestServer::serve(listener, echo);
    let addr = loopback(false, port);
    connect_when_forwarded(addr);
    (addr, server)
}

/// Median and 99th percentile of 1-byte round trips on one connection, in microseconds.
fn rtt_micros(addr: SocketAddr, trips: usize) -> (f64, f64) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    let mut samples = Vec::with_capacity(trips);
    let mut b = [0u8; 1];
    for _ in 0..trips {
        let t = Instant::now();
        c.write_all(b"x").unwrap();
        c.read_exact(&mut b).unwrap();
        samples.push(t.elapsed());
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(percentile(&mut samples, 50)), us(percentile(&mut samples, 99)))
}

/// Connect, one 1-byte request and its answer, close — as many as fit in `window`.
fn connections_per_second(addr: SocketAddr, window: Duration) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    let mut b = [0u8; 1];
    while start.elapsed() < window {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_nodelay(true).unwrap();
        c.write_all(b"x").unwrap();
        c.read_exact(&mut b).unwrap();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn connect_retrying(addr: SocketAddr) -> TcpStream {
    let start = Instant::now();
    loop {
        if let Ok(c) = TcpStream::connect(addr) {
            return c;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{addr} never accepted");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The highest rate (of a ladder) at which every datagram of a paced run comes back.
fn udp_lossless_rate(target: SocketAddr, size: usize, seconds: f64) -> f64 {
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = socket2::SockRef::from(&c).set_recv_buffer_size(8 << 20);
    c.connect(target).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // Warm the path (opens the flow through hostnet).
    let start = Instant::now();
    let mut buf = [0u8; 2048];
    while c.send(&[0u8; 8]).is_ok() && c.recv(&mut buf).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "no UDP echo from {target}");
    }
    let mut best = 0.0;
    for rate in [10_000.0, 25_000.0, 50_000.0, 100_000.0, 150_000.0, 200_000.0, 300_000.0, 400_000.0] {
        let (sent, got) = paced_run(&c, size, rate, seconds);
        if got < sent {
            break;
        }
        best = rate;
    }
    best
}

/// Sends at `rate` for `seconds`, counting echoes until they stop for 200 ms.
fn paced_run(c: &UdpSocket, size: usize, rate: f64, seconds: f64) -> (u64, u64) {
    let total = (rate * seconds) as u64;
    let receiver = c.try_clone().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let counter = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut got = 0u64;
        loop {
            match receiver.recv(&mut buf) {
                Ok(_) => got += 1,
                Err(_) if done2.load(Ordering::SeqCst) => break got,
                Err(_) => {}
            }
            if got == total {
                break got;
            }
        }
    });
    let data = vec![0xa5u8; size];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while sent < due.min(total) {
            let _ = c.send(&data);
            sent += 1;
        }
        std::hint::spin_loop();
    }
    done.store(true, Ordering::SeqCst);
    (sent, counter.join().unwrap())
}
