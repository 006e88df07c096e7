//! TCP workloads: throughput (with the CPU it costs), 1-byte round trips, new connections per
//! second, and memory per idle connection.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hostnet_tests::{DEADLINE, percentile};
use socket2::{Domain, SockRef, Socket, Type};

use crate::procs;

const GIB: f64 = (1u64 << 30) as f64;

/// One bulk transfer: its rate and the CPU it cost.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub gib_per_s: f64,
    /// CPU-seconds per GiB of the whole path: the client and server (this process) plus the
    /// relay processes.
    pub cpu_per_gib: f64,
    /// CPU-seconds per GiB of the relay processes alone (zero for the direct path).
    pub relay_cpu_per_gib: f64,
    /// The relay's page faults and context switches per GiB, where `relay_events` counts them.
    pub relay_faults_switches_per_gib: Option<(f64, f64)>,
}

/// Sends `bytes` (split over `streams` connections) to a server that counts them and answers
/// `got N bytes`; the rate runs from the first byte written to the last answer read.
/// `relay_cpu` reads the relay's CPU-seconds, `relay_events` its page faults and context
/// switches (`None`: not counted); `settle` waits until the relay has accounted for the
/// transfer (socat's per-connection children have exited).
pub fn transfer(
    addr: SocketAddr,
    bytes: u64,
    streams: usize,
    relay_cpu: &dyn Fn() -> f64,
    relay_events: &dyn Fn() -> Option<(u64, u64)>,
    settle: &dyn Fn(),
) -> Transfer {
    let conns: Vec<TcpStream> = (0..streams).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let per_stream = bytes / streams as u64;
    let (own0, relay0, events0) = (procs::own_cpu_seconds(), relay_cpu(), relay_events());
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
                c.shutdown(Shutdown::Write).unwrap();
                c.set_read_timeout(Some(DEADLINE)).unwrap();
                let mut answer = String::new();
                c.read_to_string(&mut answer).unwrap();
                assert_eq!(answer, format!("got {sent} bytes"), "the server got every byte");
                sent
            })
        })
        .collect();
    let sent: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let secs = start.elapsed().as_secs_f64();
    settle();
    let own = procs::own_cpu_seconds() - own0;
    let relay = relay_cpu() - relay0;
    let gib = sent as f64 / GIB;
    Transfer {
        gib_per_s: gib / secs,
        cpu_per_gib: (own + relay) / gib,
        relay_cpu_per_gib: relay / gib,
        relay_faults_switches_per_gib: events0.zip(relay_events()).map(|((f0, s0), (f1, s1))| {
            (f1.saturating_sub(f0) as f64 / gib, s1.saturating_sub(s0) as f64 / gib)
        }),
    }
}

/// Rounds the round trips of [`rtt_rounds`] are split into, the paths taking turns.
const RTT_ROUNDS: usize = 10;

/// One path's 1-byte round trips.
#[derive(Debug, Clone, Copy)]
pub struct Rtt {
    /// Median, µs.
    pub p50: f64,
    /// 99th percentile, µs.
    pub p99: f64,
    /// CPU-µs its relay used per round trip over the timed trips (0 where nothing is counted).
    pub relay_cpu_us: f64,
}

/// A round-trip client connected to `addr` (in the namespace of the thread that calls it).
pub fn rtt_client(addr: SocketAddr) -> TcpStream {
    let c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    c
}

/// 1-byte round trips over each of `conns` (one per path, made with [`rtt_client`]): a warm-up,
/// then `trips` each, taken in [`RTT_ROUNDS`] rounds in which every path takes its turn (the
/// first path of each round rotating), so that a busy moment of this shared machine falls on
/// all of them alike instead of on whichever path ran then. `relay_cpu[i]`, where given, reads
/// the CPU-seconds path `i`'s relay has used so far; it is read around that path's turns only.
pub fn rtt_rounds(conns: &mut [TcpStream], trips: usize, relay_cpu: &[&dyn Fn() -> f64]) -> Vec<Rtt> {
    // Warm up: the first trips pay for lazy set-up along each path.
    for c in conns.iter_mut() {
        round_trips(c, (trips / 10).max(10));
    }
    let mut samples: Vec<Vec<Duration>> = conns.iter().map(|_| Vec::with_capacity(trips)).collect();
    let mut cpu = vec![0.0; conns.len()];
    let per_round = trips.div_ceil(RTT_ROUNDS);
    for round in 0..RTT_ROUNDS {
        for k in 0..conns.len() {
            let i = (round + k) % conns.len();
            let relay = relay_cpu.get(i);
            let before = relay.map_or(0.0, |f| f());
            samples[i].extend(round_trips(&mut conns[i], per_round));
            cpu[i] += relay.map_or(0.0, |f| f()) - before;
        }
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    samples
        .iter_mut()
        .zip(cpu)
        .map(|(s, cpu)| Rtt {
            p50: us(percentile(s, 50)),
            p99: us(percentile(s, 99)),
            relay_cpu_us: cpu * 1e6 / s.len().max(1) as f64,
        })
        .collect()
}

/// `n` 1-byte round trips on `c`, each one's duration.
fn round_trips(c: &mut TcpStream, n: usize) -> Vec<Duration> {
    let mut b = [0u8; 1];
    (0..n)
        .map(|_| {
            let t = Instant::now();
            c.write_all(b"x").unwrap();
            c.read_exact(&mut b).unwrap();
            t.elapsed()
        })
        .collect()
}

/// Connect, one 1-byte request and its answer, close (after the server: [`pong`]) — from
/// `clients` threads at once, each one connection after another, for `window`: the rate a busy
/// desktop (a browser, a test suite) asks of the path. Returns the connections made and the
/// seconds they took.
pub fn connections(addr: SocketAddr, window: Duration, clients: usize) -> (u64, f64) {
    let start = Instant::now();
    let counts: Vec<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..clients.max(1))
            .map(|_| {
                s.spawn(move || {
                    let mut n = 0u64;
                    let mut b = [0u8; 1];
                    while start.elapsed() < window {
                        let mut c =
                            TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr} #{n}: {e}"));
                        c.set_nodelay(true).unwrap();
                        c.write_all(b"x").unwrap();
                        c.read_exact(&mut b).unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    (counts.iter().sum(), start.elapsed().as_secs_f64())
}

/// The connection-rate server's handler: answers the 1-byte request and closes, first (as an
/// HTTP/1.0 server does), so each connection's TIME_WAIT stays on the server's side. When the
/// client closed first, its TIME_WAITs held the ephemeral ports: at direct's rate they ran out
/// within the quick run's second, every later `connect` searched for a free port, and direct
/// cost ~134 CPU-µs per connection instead of ~40 — or ~40 when the machine's TIME_WAIT table
/// happened to be full (then no TIME_WAIT is kept) — so the ratio depended on earlier runs.
pub fn pong(mut c: TcpStream) {
    let mut b = [0u8; 1];
    if c.read_exact(&mut b).is_ok() {
        let _ = c.write_all(&b);
    }
}

/// A server that accepts connections and keeps them open, idle, until dropped.
#[derive(Debug)]
pub struct Holder {
    pub accepted: Arc<AtomicUsize>,
    listener: TcpListener,
    thread: Option<JoinHandle<()>>,
}

impl Holder {
    /// Listens on `addr` (call it inside the namespace for a guest server) with a backlog
    /// deep enough for connections opened back to back.
    pub fn bind(addr: SocketAddr) -> TcpListener {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(4096).unwrap();
        s.into()
    }

    pub fn serve(listener: TcpListener) -> Holder {
        let accepted = Arc::new(AtomicUsize::new(0));
        let (l, count) = (listener.try_clone().unwrap(), accepted.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while let Ok((c, _)) = l.accept() {
                held.push(c);
                count.fetch_add(1, Ordering::SeqCst);
            }
        });
        Holder { accepted, listener, thread: Some(thread) }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = SockRef::from(&self.listener).shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens `n` connections to `addr` and keeps them until the returned vector is dropped; never
/// more than `ahead` connections ahead of the server's accepts (so no backlog overflows
/// into SYN retries). Returns once the server holds all of them.
pub fn open_idle(addr: SocketAddr, n: usize, accepted: &AtomicUsize, ahead: usize) -> Vec<TcpStream> {
    let base = accepted.load(Ordering::SeqCst);
    let mut conns = Vec::with_capacity(n);
    let start = Instant::now();
    while conns.len() < n {
        while conns.len() >= accepted.load(Ordering::SeqCst) - base + ahead {
            assert!(start.elapsed() < DEADLINE * 6, "the server stopped accepting at {}", conns.len());
            std::thread::sleep(Duration::from_micros(200));
        }
        conns.push(
            TcpStream::connect(addr).unwrap_or_else(|e| panic!("connection {} to {addr}: {e}", conns.len())),
        );
    }
    let start = Instant::now();
    while accepted.load(Ordering::SeqCst) - base < n {
        assert!(
            start.elapsed() < DEADLINE,
            "the server got {} of {n} connections",
            accepted.load(Ordering::SeqCst) - base
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    conns
}
