//! UDP: the highest datagram rate at which nothing is lost, through an echo server.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hostnet_tests::DEADLINE;

use crate::Params;
use crate::report::{Goal, Row};

/// Paced rates tried in order; the result is the last one with every echo back. Above 100 000
/// no two neighbours are further apart than 0.8× (the target's ratio), so one step of noise
/// cannot by itself decide it.
pub const LADDER: [f64; 17] = [
    10_000.0, 25_000.0, 50_000.0, 75_000.0, 100_000.0, 125_000.0, 150_000.0, 175_000.0, 200_000.0, 250_000.0,
    300_000.0, 350_000.0, 400_000.0, 500_000.0, 600_000.0, 700_000.0, 800_000.0,
];

/// Where the datagrams of the first step that lost some were dropped.
#[derive(Debug, Clone, Default)]
pub struct Losses {
    /// The step's rate.
    pub rate: f64,
    /// Datagrams sent and echoes received.
    pub sent: u64,
    pub got: u64,
    /// Datagrams each socket's receive buffer dropped during the step (the `drops` column of
    /// `/proc/net/udp`), by the socket's role on the path; zero counts are left out.
    pub by: Vec<(&'static str, u64)>,
}

impl Losses {
    /// "at 75 000 /s, 120 of 22 500 lost: echo server 100, agent's flow socket 20".
    pub fn text(&self) -> String {
        let lost = self.sent - self.got;
        let counted: u64 = self.by.iter().map(|(_, n)| n).sum();
        let mut parts: Vec<String> = self.by.iter().map(|(who, n)| format!("{who} {n}")).collect();
        if lost > counted {
            // Not at a socket: a flow's queue in the proxy (its log says so), or in flight.
            parts.push(format!("no socket {}", lost - counted));
        }
        format!(
            "at {} /s, {} of {} lost: {}",
            crate::report::num(self.rate),
            lost,
            self.sent,
            if parts.is_empty() { "none counted".into() } else { parts.join(", ") }
        )
    }
}

/// Drop counters of the path's sockets, by role, given the client socket's port.
pub type DropProbe<'a> = &'a dyn Fn(u16) -> Vec<(&'static str, u64)>;

/// One UDP socket as `/proc/net/udp{,6}` lists it: its ports and the datagrams its receive
/// buffer had no room for.
#[derive(Debug, Clone, Copy)]
pub struct SocketDrops {
    pub local_port: u16,
    pub remote_port: u16,
    pub drops: u64,
}

/// Every UDP socket of the calling thread's network namespace.
pub fn socket_drops() -> Vec<SocketDrops> {
    socket_drops_in("/proc/thread-self/net")
}

/// Every UDP socket in the `udp` and `udp6` tables of `dir`.
fn socket_drops_in(dir: &str) -> Vec<SocketDrops> {
    let mut out = Vec::new();
    for table in ["udp", "udp6"] {
        let text = std::fs::read_to_string(format!("{dir}/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = |a: &str| a.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if let (Some(local_port), Some(remote_port), Some(drops)) =
                (port(f[1]), port(f[2]), f.get(12).and_then(|d| d.parse().ok()))
            {
                out.push(SocketDrops { local_port, remote_port, drops });
            }
        }
    }
    out
}

/// Drops of the sockets in `socks` that `f` picks.
pub fn drops_where(socks: &[SocketDrops], f: &dyn Fn(&SocketDrops) -> bool) -> u64 {
    socks.iter().filter(|s| f(s)).map(|s| s.drops).sum()
}

/// Every UDP socket of this process's first thread's network namespace — the desktop's, when
/// called from a thread that entered the VM's (`Demo::in_netns`).
pub fn desktop_socket_drops() -> Vec<SocketDrops> {
    socket_drops_in("/proc/self/net")
}

/// One path's [`lossless_rate`].
pub type Lossless = (f64, Option<Losses>);

/// The lossless-rate rows, 64 B and 1400 B: `measure(size)` gives direct's, hostnet's and, if
/// it ran, the bare relay's [`lossless_rate`]. `what` leads the rows' names ("" or
/// "guest→host ").
pub fn lossless_rows(
    what: &str,
    p: &Params,
    measure: &dyn Fn(usize) -> (Lossless, Lossless, Option<Lossless>),
    goal: Option<Goal>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for size in SIZES {
        let ((d, d_lost), (h, h_lost), bare) = measure(size);
        let (b, b_lost) = bare.unzip();
        let mut notes = Vec::new();
        if size == SIZES[0] {
            notes.push(format!(
                "paced ladder {}–{} /s, {} s per step; no socat column (its chain is a byte stream)",
                crate::report::num(LADDER[0]),
                crate::report::num(LADDER[LADDER.len() - 1]),
                p.udp_seconds
            ));
        }
        for (path, lost) in [("direct", Some(d_lost)), ("hostnet", Some(h_lost)), ("the bare relay", b_lost)]
        {
            let Some(lost) = lost else { continue };
            match lost {
                Some(lost) => notes.push(format!("{path} {}", lost.text())),
                // The ladder ran out before the path did: its figure is a floor.
                None => notes.push(format!("{path} lost nothing up to the ladder's top: at least that")),
            }
        }
        let mut row =
            Row::new(format!("{what}UDP lossless rate, {size} B"), "datagrams/s").direct(d).hostnet(h);
        if let Some(b) = b {
            row = row.bare(b);
        }
        if let (Some(goal), true) = (goal, size == SIZES[0]) {
            row = row.goal(goal);
        }
        rows.push(row.note(notes.join("; ")));
    }
    rows
}

/// The relay-CPU rows, 64 B and 1400 B: `measure(size)` gives hostnet's and, if it ran, the
/// bare relay's [`relay_cpu_per_datagram`].
pub fn cpu_rows(what: &str, p: &Params, measure: &dyn Fn(usize) -> (f64, Option<f64>)) -> Vec<Row> {
    SIZES
        .into_iter()
        .map(|size| {
            let (h, bare) = measure(size);
            let row = Row::new(format!("{what}UDP relay CPU per echoed datagram, {size} B"), "CPU-µs")
                .hostnet(h)
                .note(format!(
                    "proxy + agent (the bare relay: both its processes), {} /s for {} s, there and back",
                    crate::report::num(CPU_RATE),
                    p.udp_cpu_seconds
                ));
            match bare {
                Some(b) => row.bare(b),
                None => row,
            }
        })
        .collect()
}

/// Datagram sizes measured: the smallest that carries anything, and a full Ethernet payload.
pub const SIZES: [usize; 2] = [64, 1400];

/// The highest rate (of [`LADDER`]) at which every datagram of a paced run comes back, and
/// where the first step that lost datagrams lost them (`None` if none did).
pub fn lossless_rate(
    target: SocketAddr,
    size: usize,
    seconds: f64,
    probe: DropProbe,
) -> (f64, Option<Losses>) {
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    let client_port = c.local_addr().unwrap().port();
    let _ = socket2::SockRef::from(&c).set_recv_buffer_size(8 << 20);
    c.connect(target).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // Warm the path (opens the flow through hostnet) until an echo comes back. Until the path
    // is there, a send or receive may fail at once (ICMP port unreachable): try again shortly.
    let start = Instant::now();
    let mut buf = [0u8; 2048];
    loop {
        let sent = c.send(&[0u8; 8]);
        if sent.is_ok() && c.recv(&mut buf).is_ok() {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "no UDP echo from {target}");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Echoes of earlier tries still on their way would count in the first step.
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    while c.recv(&mut buf).is_ok() {}
    c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut best = 0.0;
    for rate in LADDER {
        let before = probe(client_port);
        let (sent, got) = paced_run(&c, size, rate, seconds);
        if got < sent {
            let after = probe(client_port);
            let by = after
                .into_iter()
                .map(|(who, n)| (who, n - before.iter().find(|(w, _)| *w == who).map_or(0, |(_, b)| *b)))
                .filter(|(_, n)| *n > 0)
                .collect();
            return (best, Some(Losses { rate, sent, got, by }));
        }
        best = rate;
    }
    (best, None)
}

/// Rate of the CPU workload: below every path's lossless rate, so the work done is the same.
pub const CPU_RATE: f64 = 50_000.0;

/// CPU-µs the relay (`relay_cpu` reads its CPU-seconds) spends per echoed datagram — there
/// and back — over a paced run at [`CPU_RATE`]. A steadier figure than the lossless rate,
/// which moves a whole ladder step on one lost datagram.
pub fn relay_cpu_per_datagram(
    target: SocketAddr,
    size: usize,
    seconds: f64,
    relay_cpu: &dyn Fn() -> f64,
) -> f64 {
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = socket2::SockRef::from(&c).set_recv_buffer_size(8 << 20);
    c.connect(target).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // A ladder step that lost datagrams may leave the relay draining a backlog: wait until its
    // CPU time stops moving (less than a clock tick per 100 ms), so that work is not counted.
    let start = Instant::now();
    loop {
        let cpu = relay_cpu();
        std::thread::sleep(Duration::from_millis(100));
        if relay_cpu() - cpu < 0.011 || start.elapsed() > DEADLINE {
            break;
        }
    }
    let before = relay_cpu();
    let (_, got) = paced_run(&c, size, CPU_RATE, seconds);
    (relay_cpu() - before) * 1e6 / got.max(1) as f64
}

/// The sender's pace: it sends what is due, then sleeps this long. A sender spinning between
/// datagrams (as this one did) takes a whole core of the two, which starves the paths with more
/// processes in them — the relay's — far more than direct; no real sender spins.
const PACE_TICK: Duration = Duration::from_micros(100);

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
        std::thread::sleep(PACE_TICK);
    }
    done.store(true, Ordering::SeqCst);
    (sent, counter.join().unwrap())
}
