//! Discovery workloads: how fast a guest's `listen()` becomes a usable host port and a closed
//! listener a refused one, bringing up many ports at once, and what the agent costs while
//! idle with many ports forwarded.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use hostnet_tests::{DEADLINE, Demo, GuestServer, echo, free_port, loopback, percentile};
use socket2::{Domain, Socket, Type};

use crate::procs::{self, Hostnet};

/// A listener inside the namespace and the instant `listen()` returned.
fn guest_listen(demo: &Demo, port: u16, backlog: i32) -> (TcpListener, Instant) {
    demo.in_netns(|| {
        let addr = SocketAddr::from(([0, 0, 0, 0], port));
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(backlog).unwrap();
        (s.into(), Instant::now())
    })
}

/// How long a close probe waits for its SYN to be answered. Over loopback the kernel answers
/// (SYN-ACK from a listener, RST from a free port) within microseconds; a SYN that arrives in
/// the instant a listener closes is dropped without an answer (Linux drops it as `TCP_CLOSE`
/// in `tcp_rcv_state_process`, for any listener, hostnet's or not), and a client would resend
/// it only after its 1 s initial retransmission timeout. The probe gives up sooner and sends a
/// fresh SYN, so the release time is measured, not the client's retransmission timer — nor
/// the probe's: an unanswered SYN followed by a refused one dates the release at the former.
const PROBE_TIMEOUT: Duration = Duration::from_millis(10);

/// Figures of the listen/close workload, each in milliseconds.
pub struct ListenClose {
    /// From `listen()` returning in the guest to the first host connect that succeeds.
    pub bound: (f64, f64),
    /// From `listen()` to that connection's one-byte echo answered through hostnet.
    pub usable: (f64, f64),
    /// From the guest closing its listener to a fresh connect being refused on the host.
    pub refused: (f64, f64),
    /// Close probes whose SYN went unanswered for [`PROBE_TIMEOUT`] and were sent again.
    pub unanswered: usize,
    /// Close probes in all.
    pub probes: usize,
}

/// For `n` guest listeners one after the other: the time from `listen()` returning in the
/// guest to the host port accepting and then to the first successful connect + echo from the
/// host, and from the guest closing its listener to the host port refusing connections
/// (p50, p99 of each).
pub fn listen_close(demo: &Demo, n: usize) -> ListenClose {
    let mut up = Vec::with_capacity(n);
    let mut bound = Vec::with_capacity(n);
    let mut down = Vec::with_capacity(n);
    let (mut unanswered, mut probes) = (0, 0);
    for _ in 0..n {
        let port = free_port();
        let addr = loopback(false, port);
        let (listener, listened) = guest_listen(demo, port, 128);
        let server = GuestServer::serve(listener, echo);
        let mut accepted = None;
        loop {
            let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
                assert!(listened.elapsed() < DEADLINE, "{addr} never became usable");
                std::thread::sleep(Duration::from_micros(100));
                continue;
            };
            accepted.get_or_insert_with(|| listened.elapsed());
            if echoes(&mut c) {
                break;
            }
            assert!(listened.elapsed() < DEADLINE, "{addr} never became usable");
        }
        up.push(listened.elapsed());
        bound.push(accepted.expect("a connection was accepted"));
        server.close();
        let closed = Instant::now();
        // When a probe's SYN went unanswered and the next one is refused, the listener closed
        // as that SYN arrived: the port was released when it was sent, not when the probe's
        // own timer ran out.
        let mut dropped_at = None;
        let released = loop {
            assert!(closed.elapsed() < DEADLINE, "{addr} was never released");
            probes += 1;
            let sent = closed.elapsed();
            match TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    break dropped_at.unwrap_or_else(|| closed.elapsed());
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    unanswered += 1;
                    dropped_at = Some(sent);
                    continue;
                }
                _ => std::thread::sleep(Duration::from_micros(200)),
            }
            dropped_at = None;
        };
        down.push(released);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p50_99 = |v: &mut Vec<Duration>| (ms(percentile(v, 50)), ms(percentile(v, 99)));
    ListenClose {
        usable: p50_99(&mut up),
        bound: p50_99(&mut bound),
        refused: p50_99(&mut down),
        unanswered,
        probes,
    }
}

/// Whether a one-byte echo over `c` comes back.
fn echoes(c: &mut TcpStream) -> bool {
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let mut b = [0u8; 1];
    c.write_all(b"?").is_ok() && c.read_exact(&mut b).is_ok()
}

/// Figures of the many-ports workload.
#[derive(Debug, Clone, Copy)]
pub struct ManyPorts {
    /// From the last guest `listen()` to every host port listening, in seconds.
    pub bring_up_s: f64,
    /// From the first guest `listen()` to every host port listening, in seconds.
    pub from_first_s: f64,
    /// Agent and proxy CPU while idle with every port forwarded, in % of one core.
    pub agent_idle_pct: f64,
    pub proxy_idle_pct: f64,
    /// The same before any of the ports exist.
    pub agent_base_pct: f64,
    pub proxy_base_pct: f64,
    /// From closing every guest listener to every host port gone, in seconds.
    pub release_s: f64,
}

/// Opens `n` guest listeners at once, waits for all to be forwarded, measures the agent's and
/// proxy's CPU over `idle` with nothing happening, then closes them all.
pub fn many_ports(demo: &Demo, n: usize, idle: Duration) -> ManyPorts {
    let hn = Hostnet::find(demo);
    let (agent_base_pct, proxy_base_pct) = idle_cpu(hn, idle);
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let mut first = None;
    let mut listeners = Vec::with_capacity(n);
    let mut last = Instant::now();
    demo.in_netns(|| {
        for &p in &ports {
            let addr = SocketAddr::from(([0, 0, 0, 0], p));
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&addr.into()).unwrap();
            s.listen(16).unwrap();
            last = Instant::now();
            first.get_or_insert(last);
            listeners.push(TcpListener::from(s));
        }
    });
    let first = first.unwrap();
    let want: BTreeSet<u16> = ports.iter().copied().collect();
    // Host listeners are read from the kernel's table rather than probed with connects, so the
    // measurement does not load the proxy and agent it measures.
    while !want.is_subset(&host_listening_ports()) {
        assert!(last.elapsed() < DEADLINE, "not all {n} ports were forwarded within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
    let bring_up_s = last.elapsed().as_secs_f64();
    let from_first_s = first.elapsed().as_secs_f64();
    let (agent_idle_pct, proxy_idle_pct) = idle_cpu(Hostnet::find(demo), idle);

    // Listening is accepting: check that on every port once (not timed).
    for &p in &ports {
        let addr = loopback(false, p);
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok(),
            "{addr} listens but refused"
        );
    }

    drop(listeners);
    let closed = Instant::now();
    while !want.is_disjoint(&host_listening_ports()) {
        assert!(closed.elapsed() < DEADLINE, "not all {n} ports were released within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
    ManyPorts {
        bring_up_s,
        from_first_s,
        agent_idle_pct,
        proxy_idle_pct,
        agent_base_pct,
        proxy_base_pct,
        release_s: closed.elapsed().as_secs_f64(),
    }
}

/// CPU of the agent and of the proxy over `window` (a measurement window: nothing else
/// happens), in % of one core.
fn idle_cpu(hn: Hostnet, window: Duration) -> (f64, f64) {
    let (a0, p0) = (procs::cpu_seconds(hn.agent, false), procs::cpu_seconds(hn.proxy, false));
    let t0 = Instant::now();
    std::thread::sleep(window);
    let secs = t0.elapsed().as_secs_f64();
    (
        (procs::cpu_seconds(hn.agent, false) - a0) / secs * 100.0,
        (procs::cpu_seconds(hn.proxy, false) - p0) / secs * 100.0,
    )
}

/// TCP ports listening on 127.0.0.1 in this machine's namespace.
fn host_listening_ports() -> BTreeSet<u16> {
    let local = format!("{:08X}", u32::from_ne_bytes([127, 0, 0, 1]));
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, port) = f.get(1)?.split_once(':')?;
            (addr == local && *f.get(3)? == "0A").then(|| u16::from_str_radix(port, 16).ok()).flatten()
        })
        .collect()
}
