//! hostnet's benchmark harness: the same workloads over direct loopback (the limit), through
//! hostnet's netns stand-in, and through a socat relay chain with hostnet's topology (the peer
//! to beat), side by side in one run, printed with ratios and the performance targets. The
//! connection and round-trip workloads also run over a bare relay chain of the same topology
//! (`bare.rs`): what any relay pays there.
//!
//! Needs root (it starts `hostnet-proxy demo`). Build in release first:
//! `cargo build --release -p host-proxy -p guest-agent -p hostnet-tests`, then
//! `sudo target/release/hostnet-bench [--quick] [--json PATH] [--only WORKLOAD,…]`.
//!
//! Figures are measured, never asserted: a slow machine gives slow figures, and the ratios
//! taken in one run are what compares.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::print_stdout)]

mod bare;
mod bare_udp;
mod g2h;
mod paths;
mod ports;
mod procs;
mod report;
mod tcp;
mod udp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use hostnet_tests::{Demo, UdpEcho, count_then_reply, echo, free_port, loopback};

use crate::paths::{Relay, Server, Socat, Via, endpoint, measure, tcp_listening};
use crate::procs::Hostnet;
use crate::report::{Goal, Paths, Row};
use crate::tcp::Holder;

/// Runs each workload over direct loopback, hostnet's netns stand-in and a socat relay chain
/// (host TCP → Unix socket → TCP in the namespace), and prints the figures with the ratios
/// hostnet/direct and hostnet/socat. Needs root.
#[derive(Debug, Parser)]
#[command(version)]
struct Opts {
    /// A short run (well under two minutes; what CI runs): smaller transfers, shorter windows,
    /// fewer listeners.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to PATH.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Run only these workloads (comma-separated or repeated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Workload>,
    /// socat's relay buffer per direction (`socat -b`); socat's own default is 8192.
    #[arg(long, value_name = "BYTES", default_value_t = 8192)]
    socat_buffer: usize,
    /// An extra argument for `hostnet-proxy demo` (repeat for several), e.g.
    /// `--demo-arg=--poll-interval-ms=5`: to measure a setting's effect.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    demo_arg: Vec<String>,
    /// Idle connections for the memory workload [default: 10000].
    #[arg(long, value_name = "N")]
    connections: Option<usize>,
    #[command(subcommand)]
    internal: Option<Internal>,
}

/// What the harness runs of itself, and tools beside the workloads.
#[derive(Debug, Subcommand)]
enum Internal {
    /// One relay of the bare chain: LISTEN and TO are `tcp:ADDR` or `unix:PATH` (`bare.rs`).
    #[command(hide = true)]
    BareRelay {
        listen: bare::End,
        to: bare::End,
        /// Relay bulk transfers the plain way instead, splicing or copying (the throughput rows).
        #[arg(long, value_enum)]
        bulk: Option<bare::Bulk>,
    },
    /// One relay of the bare UDP chain: `udp:ADDR unix:PATH` or `unix:PATH udp:ADDR`
    /// (`bare_udp.rs`).
    #[command(hide = true)]
    BareUdpRelay { listen: String, to: String },
    /// Boots the real VM and records the guest kernel's trace (tracefs) around one-byte
    /// exchanges with its echo service through hostnet: each on a new connection, or all on one
    /// with `--round-trips`; with `--guest-client`, new connections from a guest program to a
    /// desktop echo service instead. Prints each exchange's latency; writes the trace to OUT.
    TraceVm {
        /// The trace file to write.
        out: PathBuf,
        /// Exchanges to trace.
        #[arg(long, default_value_t = 30)]
        count: usize,
        /// All on one connection (round trips) instead of a new connection each.
        #[arg(long, conflicts_with = "guest_client")]
        round_trips: bool,
        /// New connections the other way: a guest program to a desktop echo at localhost:PORT.
        #[arg(long)]
        guest_client: bool,
        /// tracefs events, space-separated.
        #[arg(long, default_value = "sched:sched_switch sched:sched_waking vsock:* irq:irq_handler_entry")]
        events: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// TCP throughput, 1 and 8 streams, and CPU-seconds per GiB.
    Throughput,
    /// Guest listen() → usable host port, and close → refused.
    Listen,
    /// 1000 forwarded ports: bring-up, idle agent CPU, release.
    Ports,
    /// 1-byte ping-pong round trips.
    Rtt,
    /// UDP lossless datagram rate, 64 B and 1400 B.
    Udp,
    /// New connections per second.
    Connect,
    /// Guest → host: a client in the VM reaching a desktop server at localhost (throughput,
    /// round trips, new connections), against the same client on the desktop.
    GuestToHost,
    /// Guest → host UDP: the lossless rate and relay CPU per datagram of a client in the VM
    /// reaching a desktop echo server at localhost, against the same client on the desktop.
    GuestToHostUdp,
    /// Memory per idle connection.
    Memory,
    /// The real VM (QEMU, KVM or TCG as `installer/run-vm` finds; virtio-vsock): hostnet against
    /// the raw vsock link, both ways.
    /// Needs the guest image and the vsock backend (skipped, and said so, without them).
    Vm,
}

/// Sizes of one run.
#[derive(Debug)]
struct Params {
    bytes: u64,
    trips: usize,
    connect_window: Duration,
    udp_seconds: f64,
    udp_cpu_seconds: f64,
    listeners: usize,
    ports: usize,
    idle_window: Duration,
    connections: usize,
    socat_connections: usize,
}

impl Params {
    fn new(opts: &Opts) -> Params {
        let quick = opts.quick;
        Params {
            bytes: if quick { 512 << 20 } else { 2 << 30 },
            trips: if quick { 5_000 } else { 20_000 },
            connect_window: Duration::from_secs_f64(if quick { 1.0 } else { 3.0 }),
            udp_seconds: if quick { 0.3 } else { 1.0 },
            udp_cpu_seconds: if quick { 1.0 } else { 3.0 },
            listeners: if quick { 50 } else { 200 },
            ports: 1000,
            idle_window: Duration::from_secs(if quick { 3 } else { 10 }),
            connections: opts.connections.unwrap_or(10_000).max(1),
            // socat forks two processes per connection: fewer of them.
            socat_connections: if quick { 200 } else { 1000 },
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "tcp_bytes": self.bytes,
            "rtt_trips": self.trips,
            "connect_window_s": self.connect_window.as_secs_f64(),
            "udp_seconds_per_rate": self.udp_seconds,
            "udp_cpu_seconds": self.udp_cpu_seconds,
            "listeners": self.listeners,
            "ports": self.ports,
            "idle_window_s": self.idle_window.as_secs_f64(),
            "idle_connections": self.connections,
            "socat_idle_connections": self.socat_connections,
        })
    }
}

fn main() {
    let opts = Opts::parse();
    match &opts.internal {
        Some(Internal::BareRelay { listen, to, bulk: None }) => return bare::run(listen, to),
        Some(Internal::BareRelay { listen, to, bulk: Some(bulk) }) => {
            return bare::run_bulk(listen, to, *bulk);
        }
        Some(Internal::BareUdpRelay { listen, to }) => return bare_udp::run(listen, to),
        Some(Internal::TraceVm { out, count, round_trips, guest_client, events }) => {
            return trace_vm(out, *count, *round_trips, *guest_client, events);
        }
        None => {}
    }
    let started = Instant::now();
    let mut machine = procs::machine();
    let steal_at_start = procs::steal_seconds();
    let p = Params::new(&opts);
    let run = |w: Workload| opts.only.is_empty() || opts.only.contains(&w);
    // Each idle connection costs two descriptors here (client and server) and two in each of
    // the proxy and the agent, which inherit this limit through the demo.
    let nofile = procs::raise_nofile((p.connections as u64 * 2 + 4096).max(65_536));
    let wanted_connections = p.connections;
    // Without CAP_SYS_RESOURCE the hard limit caps the open files; leave room for the rest.
    let p = Params { connections: p.connections.min((nofile.saturating_sub(512) / 2) as usize), ..p };
    let socat = Socat::prepare(opts.socat_buffer);
    let demo = Demo::start_with(&opts.demo_arg.iter().map(String::as_str).collect::<Vec<_>>());
    println!(
        "hostnet-bench{}: direct loopback vs hostnet (netns stand-in; h buffer: the buffer gear alone) vs socat chain ({}, -b {}); bare: a relay with nothing in it, same topology",
        if opts.quick { " --quick" } else { "" },
        socat.available.as_deref().unwrap_or("unavailable"),
        socat.buffer
    );
    let mut rows = Vec::new();
    let mut failed = false;

    // Discovery workloads first: they read the kernel's socket table, which the connection
    // workloads below fill with TIME_WAIT entries.
    if run(Workload::Throughput) {
        guard("throughput", &mut rows, &mut failed, |rows| {
            step("TCP throughput and CPU per GiB");
            let buffer_demo = buffer_gear_demo(&opts);
            throughput(&demo, buffer_demo.as_ref(), &socat, &p, rows);
            stop_buffer_gear_demo(buffer_demo);
        });
    }
    if run(Workload::Listen) {
        guard("listen", &mut rows, &mut failed, |rows| {
            step(&format!("guest listen() → usable host port, {} listeners", p.listeners));
            let m = ports::listen_close(&demo, p.listeners);
            let note =
                format!("{} listeners one after the other; the first host connect accepted", p.listeners);
            rows.push(Row::new("listen() → host connect succeeds, p50", "ms").hostnet(m.bound.0).note(note));
            rows.push(
                Row::new("listen() → host connect succeeds, p99", "ms")
                    .hostnet(m.bound.1)
                    .goal(Goal::AtMost(2.0)),
            );
            rows.push(
                Row::new("listen() → first echo, p50", "ms")
                    .hostnet(m.usable.0)
                    .note("that connection's 1-byte echo answered: discovery + one relayed connection"),
            );
            rows.push(Row::new("listen() → first echo, p99", "ms").hostnet(m.usable.1));
            rows.push(Row::new("close → host port refused, p50", "ms").hostnet(m.refused.0));
            let mut row =
                Row::new("close → host port refused, p99", "ms").hostnet(m.refused.1).goal(Goal::AtMost(2.0));
            if m.unanswered > 0 {
                row = row.note(format!(
                    "{} of {} probe SYNs unanswered for 10 ms and sent again: dropped by the kernel \
                     as a listener closed (a client would wait 1 s to resend); the release is dated \
                     at the dropped SYN when the next one is refused",
                    m.unanswered, m.probes
                ));
            }
            rows.push(row);
        });
    }
    if run(Workload::Ports) {
        guard("ports", &mut rows, &mut failed, |rows| {
            step(&format!("{} forwarded ports: bring-up, idle CPU, release", p.ports));
            let m = ports::many_ports(&demo, p.ports, p.idle_window);
            let n = p.ports;
            rows.push(
                Row::new(format!("bring up {n} ports (last listen → all)"), "s")
                    .hostnet(m.bring_up_s)
                    .goal(Goal::AtMost(1.0))
                    .note(format!("from the first listen(): {:.3} s", m.from_first_s)),
            );
            rows.push(
                Row::new(format!("agent CPU idle, {n} ports forwarded"), "% of a core")
                    .hostnet(m.agent_idle_pct)
                    .goal(Goal::AtMost(1.0))
                    .note(format!(
                        "over {:?}; before the {n} ports existed: agent {:.2} %, proxy {:.2} %",
                        p.idle_window, m.agent_base_pct, m.proxy_base_pct
                    )),
            );
            rows.push(
                Row::new(format!("proxy CPU idle, {n} ports forwarded"), "% of a core")
                    .hostnet(m.proxy_idle_pct),
            );
            rows.push(Row::new(format!("release {n} ports (close → all gone)"), "s").hostnet(m.release_s));
        });
    }
    if run(Workload::Rtt) {
        guard("rtt", &mut rows, &mut failed, |rows| {
            step("1-byte round trips");
            let buffer_demo = buffer_gear_demo(&opts);
            // Every path's server at once: the paths take turns (`tcp::rtt_micros`).
            let at = |via, demo: &Demo| endpoint(via, demo, &socat, Server::PerConnection(echo));
            let mut eps = vec![at(Via::Direct, &demo), at(Via::Hostnet, &demo), at(Via::Bare, &demo)];
            if socat.ok() {
                eps.push(at(Via::Socat, &demo));
            }
            if let Some(bd) = &buffer_demo {
                eps.push(at(Via::Hostnet, bd));
            }
            let mut conns: Vec<_> = eps.iter().map(|ep| tcp::rtt_client(ep.addr)).collect();
            let readers: Vec<Box<dyn Fn() -> f64 + '_>> = eps
                .iter()
                .map(|ep| Box::new(move || ep.relay_cpu_seconds()) as Box<dyn Fn() -> f64>)
                .collect();
            let relay_cpu: Vec<&dyn Fn() -> f64> = readers.iter().map(|r| r.as_ref()).collect();
            // The paths in `eps`' order: direct, hostnet, bare, then socat and the buffer gear
            // where they run.
            let split = |got: Vec<tcp::Rtt>| {
                let mut got = got.into_iter();
                let (direct, hostnet, bare) = (got.next().unwrap(), got.next().unwrap(), got.next().unwrap());
                let socat = if socat.ok() { got.next() } else { None };
                let buffer = buffer_demo.as_ref().and_then(|_| got.next());
                Paths { direct, hostnet, buffer, socat, bare }
            };
            let spread = split(tcp::rtt_rounds(&mut conns, p.trips, &relay_cpu));
            // Again with every process on one CPU: what the paths cost without the machine's
            // wake-ups from one CPU to the other (see the row's note).
            let (cpu, pinned) = procs::on_one_cpu(|| tcp::rtt_rounds(&mut conns, p.trips, &relay_cpu));
            let pinned = split(pinned);
            drop(conns);
            drop(relay_cpu);
            drop(readers);
            drop(eps);
            stop_buffer_gear_demo(buffer_demo);
            let added = spread.hostnet.p50 - spread.direct.p50;
            rows.push(
                spread
                    .row(Row::new("RTT 1 B ping-pong, p50", "µs"), |r| r.p50)
                    .goal(Goal::AtMostSocat)
                    .note(format!("added by hostnet: {added:.1} µs")),
            );
            rows.push(spread.row(Row::new("RTT 1 B ping-pong, p99", "µs"), |r| r.p99));
            rows.push(
                spread
                    .relays(Row::new("relay CPU per round trip", "CPU-µs"), |r| r.relay_cpu_us)
                    .note("user + system over the timed trips of the p50 row; hostnet: proxy + agent; socat: both listeners and the connection's two children; bare: both relays"),
            );
            let one_cpu_cost = |r: &Option<tcp::Rtt>| {
                r.as_ref().map_or("–".to_owned(), |r| format!("{:.1}", r.relay_cpu_us))
            };
            rows.push(
                pinned
                    .row(Row::new("RTT 1 B ping-pong, p50, every process on one CPU", "µs"), |r| r.p50)
                    .note(format!(
                        "a diagnostic, no target: the same connections again with every process of the run pinned to CPU {cpu}, so no wake-up crosses CPUs — \
                         on this kind of VM one that does costs several times a same-CPU one; relay CPU per round trip there: hostnet {:.1}, socat {}, bare {:.1} µs",
                        pinned.hostnet.relay_cpu_us,
                        one_cpu_cost(&pinned.socat),
                        pinned.bare.relay_cpu_us
                    )),
            );
        });
    }
    if run(Workload::Udp) {
        guard("udp", &mut rows, &mut failed, |rows| {
            step("UDP lossless rate");
            let direct_port = free_port();
            let _direct_echo = UdpEcho::start_here(loopback(false, direct_port));
            let hostnet_port = free_port();
            let _hostnet_echo = UdpEcho::start(&demo, SocketAddr::from(([0, 0, 0, 0], hostnet_port)));
            let bare_port = free_port();
            let _bare_echo = UdpEcho::start(&demo, SocketAddr::from(([0, 0, 0, 0], bare_port)));
            let bare = socat.udp_chain(&demo, bare_port);
            let bare_listen = bare.addr.port();
            // Where a step lost datagrams: the drop counter of each socket on the path, by role
            // (the client's socket is the one the ladder receives echoes on).
            let sum = udp::drops_where;
            let direct_drops = |client: u16| {
                let host = udp::socket_drops();
                vec![
                    ("client", sum(&host, &|s| s.local_port == client)),
                    ("echo server", sum(&host, &|s| s.local_port == direct_port && s.remote_port == 0)),
                ]
            };
            // A relay chain: the client, the relay's socket on the desktop (at `listen`), the
            // echo server in the namespace (at `echo`) and the relay's flow socket there.
            let chain_drops = |client: u16, listen: u16, echo: u16, [front, flow]: [&'static str; 2]| {
                let host = udp::socket_drops();
                let guest = demo.in_netns(udp::socket_drops);
                vec![
                    ("client", sum(&host, &|s| s.local_port == client)),
                    (front, sum(&host, &|s| s.local_port == listen)),
                    ("echo server", sum(&guest, &|s| s.local_port == echo && s.remote_port == 0)),
                    (flow, sum(&guest, &|s| s.remote_port == echo)),
                ]
            };
            let hostnet_drops = |client: u16| {
                chain_drops(
                    client,
                    hostnet_port,
                    hostnet_port,
                    ["proxy's mirror socket", "agent's flow socket"],
                )
            };
            let bare_drops = |client: u16| {
                chain_drops(
                    client,
                    bare_listen,
                    bare_port,
                    ["bare relay's socket", "bare relay's flow socket"],
                )
            };
            let lossless = |size| {
                (
                    udp::lossless_rate(loopback(false, direct_port), size, p.udp_seconds, &direct_drops),
                    udp::lossless_rate(loopback(false, hostnet_port), size, p.udp_seconds, &hostnet_drops),
                    Some(udp::lossless_rate(bare.addr, size, p.udp_seconds, &bare_drops)),
                )
            };
            rows.extend(udp::lossless_rows("", &p, &lossless, Some(Goal::VsDirect(0.8))));
            // Relay CPU per datagram at one rate every path sustains (steadier than the ladder).
            let hn = Hostnet::find(&demo);
            let cpu = |size| {
                let h = udp::relay_cpu_per_datagram(
                    loopback(false, hostnet_port),
                    size,
                    p.udp_cpu_seconds,
                    &|| hn.cpu_seconds(),
                );
                let b =
                    udp::relay_cpu_per_datagram(bare.addr, size, p.udp_cpu_seconds, &|| bare.cpu_seconds());
                (h, Some(b))
            };
            rows.extend(udp::cpu_rows("", &p, &cpu));
        });
    }
    if run(Workload::Connect) {
        guard("connect", &mut rows, &mut failed, |rows| {
            step("new connections per second");
            for clients in [1, CONNECT_CLIENTS] {
                let rate = |via| connect_rate(via, &demo, &socat, p.connect_window, clients);
                let paths = Paths {
                    direct: rate(Via::Direct).unwrap(),
                    hostnet: rate(Via::Hostnet).unwrap(),
                    socat: rate(Via::Socat),
                    buffer: None,
                    bare: rate(Via::Bare).unwrap(),
                };
                let row = if clients == 1 {
                    Row::new("new connections (1 request)", "conn/s")
                        .note(format!("one client, sequential, {:?}", p.connect_window))
                } else {
                    Row::new(format!("new connections (1 request), {clients} clients"), "conn/s")
                        .goal(Goal::VsDirect(0.4))
                        .note(format!("{clients} clients at once, each sequential, {:?}", p.connect_window))
                };
                rows.push(paths.row(row, |c| c.per_s));
                if clients == CONNECT_CLIENTS {
                    rows.push(
                        paths
                            .row(
                                Row::new(format!("CPU per new connection, whole path ({clients} clients)"), "CPU-µs"),
                                |c| c.cpu_us,
                            )
                            .goal(Goal::AtMostVsDirect(2.5))
                            .note(format!(
                                "clients + server + relay processes, user + system; the bare relay: {:.2}× direct, \
                                 what this topology costs with no protocol and one thread per relay",
                                paths.bare.cpu_us / paths.direct.cpu_us
                            )),
                    );
                    rows.push(
                        paths
                            .relays(
                                Row::new(
                                    format!("CPU per new connection, relay only ({clients} clients)"),
                                    "CPU-µs",
                                ),
                                |c| c.relay_cpu_us,
                            )
                            .note(
                                "hostnet: proxy + agent; socat: both listeners and their forked children; \
                                 bare: both relays",
                            ),
                    );
                }
            }
        });
    }
    if run(Workload::GuestToHost) {
        guard("guest-to-host", &mut rows, &mut failed, |rows| {
            step("guest → host: throughput, round trips, new connections");
            g2h::rows(&demo, &p, rows);
        });
    }
    if run(Workload::GuestToHostUdp) {
        guard("guest-to-host-udp", &mut rows, &mut failed, |rows| {
            step("guest → host UDP: lossless rate, relay CPU per datagram");
            g2h::udp_rows(&demo, &p, rows);
        });
    }
    if run(Workload::Memory) {
        guard("memory", &mut rows, &mut failed, |rows| {
            step(&format!("memory per idle connection ({} connections)", p.connections));
            let ([proxy, agent], busy) = idle_memory(&demo, None, p.connections);
            let socat_kib = socat.ok().then(|| idle_memory(&demo, Some(&socat), p.socat_connections).0[0]);
            let mut note = format!(
                "hostnet: RSS growth of proxy ({proxy:.1} KiB) + agent ({agent:.1} KiB) over {} connections idle for 1 s; socat: PSS growth of all its processes over {} (it forks two per connection); kernel socket buffers not included",
                p.connections, p.socat_connections
            );
            if p.connections < wanted_connections {
                note.push_str(&format!(
                    "; {} instead of {wanted_connections}: the open-file limit is {nofile} (each connection holds two descriptors in the proxy, the agent and this harness)",
                    p.connections
                ));
            }
            rows.push(
                Row::new("memory per idle connection", "KiB")
                    .hostnet(proxy + agent)
                    .socat(socat_kib)
                    .goal(Goal::AtMost(16.0))
                    .note(note),
            );
            if let Some(m) = busy {
                rows.push(
                    Row::new(format!("listen() → host connect succeeds, {} open, p50", p.connections), "ms")
                        .hostnet(m.bound.0)
                        .note(format!(
                            "{LISTENERS_WHILE_BUSY} listeners while the connections above are held"
                        )),
                );
                rows.push(
                    Row::new(format!("listen() → host connect succeeds, {} open, p99", p.connections), "ms")
                        .hostnet(m.bound.1),
                );
            }
        });
    }

    if run(Workload::Vm) {
        guard("vm", &mut rows, &mut failed, |rows| {
            step("the real VM (QEMU): hostnet vs the raw vsock link");
            real_vm(rows);
        });
    }

    report::print_table(&rows);
    let total = started.elapsed();
    let stolen = procs::steal_seconds() - steal_at_start;
    machine["cpu_steal_seconds_during_run"] = serde_json::json!((stolen * 100.0).round() / 100.0);
    println!("\n{} rows in {:.1} s", rows.len(), total.as_secs_f64());
    println!(
        "machine: load average {} at the start, {} TCP sockets in TIME_WAIT, {stolen:.2} CPU-s taken by the hypervisor during the run, {}",
        machine["load_average_1min_at_start"],
        machine["tcp_time_wait_at_start"],
        procs::idle_words(&machine["idle"])
    );
    if let Some(path) = &opts.json {
        let doc = serde_json::json!({
            "harness": "hostnet-bench",
            "quick": opts.quick,
            "machine": machine,
            "params": p.json(),
            "demo_args": opts.demo_arg,
            "socat": {
                "version": socat.available.as_ref().ok(),
                "buffer": socat.buffer,
                "topology": "TCP-LISTEN on 127.0.0.1 → UNIX-CONNECT → (netns) UNIX-LISTEN,fork → TCP:127.0.0.1:PORT",
            },
            "bare_relay": {
                "what": "hostnet-bench bare-relay: one thread (tokio current_thread), accept → connect → copy_bidirectional; no protocol, limits or logging",
                "bulk": "hostnet-bench bare-relay --bulk splice|copy (throughput rows): blocking sockets, a thread per direction, splice(2) through a 1 MiB pipe (the bare column) or read/write through a 1 MiB buffer (the notes)",
                "topology": "TCP listener on 127.0.0.1 → Unix socket → (netns) Unix listener → TCP to 127.0.0.1:PORT",
                "workloads": ["throughput", "rtt", "connect"],
            },
            "bare_udp_relay": {
                "what": "hostnet-bench bare-udp-relay: one thread (tokio current_thread), one datagram per system call, a Unix SOCK_SEQPACKET connection per client address; no protocol, batching, limits or logging",
                "topology": "UDP socket on 127.0.0.1 → Unix SOCK_SEQPACKET per client → (netns) listener → UDP connected to 127.0.0.1:PORT",
                "workloads": ["udp"],
            },
            "seconds": total.as_secs_f64(),
            "results": rows.iter().map(Row::json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();
        println!("JSON written to {}", path.display());
    }
    demo.stop();
    if failed {
        std::process::exit(1);
    }
}

/// Runs one workload; if it fails (a deadline passed, a connection broke), the run goes on with
/// the next one and the table says which did not complete.
fn guard(name: &str, rows: &mut Vec<Row>, failed: &mut bool, f: impl FnOnce(&mut Vec<Row>)) {
    let mut got = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut got)));
    rows.append(&mut got);
    if let Err(e) = result {
        let why = e
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| e.downcast_ref::<&str>().copied())
            .unwrap_or("panicked");
        rows.push(Row::new(format!("{name}: did not complete"), "").note(why.to_owned()));
        *failed = true;
    }
}

fn step(what: &str) {
    println!("==> {what}");
}

/// Clients of the parallel connection-rate workload.
const CONNECT_CLIENTS: usize = 4;

/// One connection-rate measurement: the rate and the CPU each connection cost.
struct ConnRate {
    per_s: f64,
    /// Clients, server and relay, per connection.
    cpu_us: f64,
    /// The relay alone, per connection.
    relay_cpu_us: f64,
}

/// `clients` clients connecting over `via` for `window`, against a pre-threaded server with a
/// thread per client.
fn connect_rate(via: Via, demo: &Demo, socat: &Socat, window: Duration, clients: usize) -> Option<ConnRate> {
    measure(via, demo, socat, Server::Pooled(tcp::pong, clients), |ep| {
        ep.settle();
        let (own0, relay0) = (procs::own_cpu_seconds(), ep.relay_cpu_seconds());
        let (n, secs) = tcp::connections(ep.addr, window, clients);
        ep.settle();
        let (own, relay) = (procs::own_cpu_seconds() - own0, ep.relay_cpu_seconds() - relay0);
        let per = |cpu: f64| cpu / n.max(1) as f64 * 1e6;
        ConnRate { per_s: n as f64 / secs, cpu_us: per(own + relay), relay_cpu_us: per(relay) }
    })
}

/// Throughput rows (1 and 8 streams) and the CPU each GiB costs on each path; `buffer_demo`
/// is hostnet with the splice gear off.
fn throughput(demo: &Demo, buffer_demo: Option<&Demo>, socat: &Socat, p: &Params, rows: &mut Vec<Row>) {
    let over = |via: Via, demo: &Demo, streams: usize| -> Option<tcp::Transfer> {
        if via == Via::Socat && !socat.ok() {
            return None;
        }
        let ep = endpoint(via, demo, socat, Server::PerConnection(count_then_reply));
        let relay_cpu = || ep.relay_cpu_seconds();
        let relay_events = || ep.relay_faults_and_switches();
        let settle = || ep.settle();
        Some(tcp::transfer(ep.addr, p.bytes, streams, &relay_cpu, &relay_events, &settle))
    };
    let mut one = None;
    for streams in [1, 8] {
        let paths = Paths {
            direct: over(Via::Direct, demo, streams).unwrap(),
            hostnet: over(Via::Hostnet, demo, streams).unwrap(),
            socat: over(Via::Socat, demo, streams),
            buffer: buffer_demo.map(|bd| over(Via::Hostnet, bd, streams).unwrap()),
            bare: over(Via::BareBulk(bare::Bulk::Splice), demo, streams).unwrap(),
        };
        let name = format!("TCP throughput, {streams} stream{}", if streams > 1 { "s" } else { "" });
        let mut row = paths.row(Row::new(name, "GiB/s"), |t| t.gib_per_s);
        if streams == 1 {
            // The buffer gear's analogue, for its floor: in the note, the column is the splice's.
            let copy = over(Via::BareBulk(bare::Bulk::Copy), demo, streams).unwrap();
            row = row.goal(Goal::Ratios { direct: 0.7, socat: 2.0, buffer: 0.5 }).note(format!(
                "{} MiB per path; h buffer: hostnet with the splice gear off (demo --no-splice), \
                 every byte through the buffer gear as over vsock and on macOS and Windows; bare: \
                 the bare relay splicing through 1 MiB pipes, a blocking thread per direction (the bulk \
                 relay one would write first); copying through 1 MiB buffers instead {:.2} GiB/s, {:.2}× direct",
                p.bytes >> 20,
                copy.gib_per_s,
                copy.gib_per_s / paths.direct.gib_per_s
            ));
            one = Some((paths, copy));
        }
        rows.push(row);
    }
    let (paths, copy) = one.unwrap();
    rows.push(
        paths.row(Row::new("CPU per GiB moved, whole path (1 stream)", "CPU-s/GiB"), |t| t.cpu_per_gib).note(
            format!(
                "client + server + relay processes, user + system; the bare relay copying: {:.2}",
                copy.cpu_per_gib
            ),
        ),
    );
    rows.push(
        paths
            .relays(Row::new("CPU per GiB moved, relay only (1 stream)", "CPU-s/GiB"), |t| {
                t.relay_cpu_per_gib
            })
            .note(format!(
                "hostnet: proxy + agent; socat: both listeners and their forked children; bare: both \
                 bulk relays splicing (copying: {:.2}); hostnet's relays' page faults and context \
                 switches per GiB: {}, h buffer {}",
                copy.relay_cpu_per_gib,
                faults_switches(paths.hostnet.relay_faults_switches_per_gib),
                faults_switches(paths.buffer.as_ref().and_then(|b| b.relay_faults_switches_per_gib)),
            )),
    );
}

/// "F faults, S switches" per GiB, or "–".
fn faults_switches(per_gib: Option<(f64, f64)>) -> String {
    per_gib.map_or_else(|| "–".to_owned(), |(f, s)| format!("{f:.0} faults, {s:.0} switches"))
}

/// A second demo with the splice gear off (`--no-splice`), for the "h buffer" column: started
/// for the workload that uses it and stopped after, so it does not load the others. `None`
/// (an empty column) if it does not start.
fn buffer_gear_demo(opts: &Opts) -> Option<Demo> {
    let mut args: Vec<&str> = opts.demo_arg.iter().map(String::as_str).collect();
    args.push("--no-splice");
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let netns =
        format!("hn-bench{}-buf{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    match Demo::start_named(&netns, &args) {
        Ok(d) => Some(d),
        Err(e) => {
            println!(
                "WARNING: the buffer-gear demo (--no-splice) did not start; its column stays empty: {e}"
            );
            None
        }
    }
}

fn stop_buffer_gear_demo(demo: Option<Demo>) {
    if let Some(d) = demo {
        d.stop();
    }
}

/// Rounds of each real-VM transfer (the median is reported).
const VM_ROUNDS: usize = 3;
/// Real-VM round trips and new connections per path, in rounds alternating the paths.
const VM_TRIPS: usize = 1_000;
const VM_CONNECTIONS: usize = 100;
const VM_INTERACTIVE_ROUNDS: usize = 5;

/// `hostnet-bench trace-vm`: see [`Internal::TraceVm`].
fn trace_vm(out: &std::path::Path, count: usize, round_trips: bool, guest_client: bool, events: &str) {
    if let Some(why) = hostnet_tests::vm::missing() {
        eprintln!("hostnet-bench trace-vm: {why}");
        std::process::exit(1);
    }
    let (vm, boot) = hostnet_tests::vm::Vm::start_quiet();
    eprintln!("VM up in {boot:.1?}; warming up");
    let desktop_echo = guest_client.then(|| vm.serve_desktop_echo().0);
    let exchanges = || match &desktop_echo {
        Some(to) => vm.guest_connections(to, count),
        None => vm.echo_latencies(count, round_trips),
    };
    exchanges();
    let (took, trace) = vm.guest_trace(events, exchanges);
    if let Err(e) = std::fs::write(out, &trace) {
        eprintln!("hostnet-bench trace-vm: writing {}: {e}", out.display());
        std::process::exit(1);
    }
    let what = match (round_trips, guest_client) {
        (true, _) => "round trips on one connection",
        (_, true) => "new connections from a guest program",
        _ => "new connections",
    };
    let micros: Vec<u128> = took.iter().map(Duration::as_micros).collect();
    println!("{count} {what}, latencies in µs: {micros:?}");
    println!("guest trace ({} lines) in {}", trace.lines().count(), out.display());
}

/// The real VM's rows: bulk transfers through hostnet and over the raw vsock link hostnet runs
/// on (in the "direct" column), both directions, from a desktop client and from a guest program;
/// round trips and new connections from a desktop client; new connections from a guest program.
fn real_vm(rows: &mut Vec<Row>) {
    if let Some(why) = hostnet_tests::vm::missing() {
        println!("skipping the real VM: {why}");
        rows.push(Row::new("real VM: not measured", "").note(why));
        return;
    }
    let (vm, boot) = hostnet_tests::vm::Vm::start_quiet();
    let accel = vm.accel();
    println!("the real VM runs under {accel}");
    rows.push(
        Row::new("real VM: start → first port forwarded", "s")
            .hostnet(boot.as_secs_f64())
            .note(format!("installer/run-vm: vsock backend, QEMU {accel} boot, agent, proxy")),
    );
    let mb = hostnet_tests::vm::BULK_BYTES >> 20;
    let desktop = vm.desktop_client_transfers(VM_ROUNDS, |_, _| {});
    let targets = vm.serve_desktop_bulk();
    let guest = vm.guest_client_transfers(&targets, VM_ROUNDS, |_, _| {});
    let interactive = vm.desktop_client_interactive(VM_TRIPS, VM_CONNECTIONS, VM_INTERACTIVE_ROUNDS);
    let echo_targets = vm.serve_desktop_echo();
    let guest_connections = vm.guest_client_connections(
        &echo_targets,
        VM_CONNECTIONS / VM_INTERACTIVE_ROUNDS,
        VM_INTERACTIVE_ROUNDS,
    );
    for (who, t, clock) in
        [("desktop client", &desktop, "the desktop's clock"), ("guest client", &guest, "the guest's clock")]
    {
        let [raw_in, net_in, raw_out, net_out] = t.medians();
        let [cpu_raw_in, cpu_net_in, cpu_raw_out, cpu_net_out] = t.guest_cpu_ms_per_mib();
        for (dir, raw, net, cpu_raw, cpu_net) in [
            ("host → guest", raw_in, net_in, cpu_raw_in, cpu_net_in),
            ("guest → host", raw_out, net_out, cpu_raw_out, cpu_net_out),
        ] {
            rows.push(
                Row::new(format!("real VM ({who}), {dir}"), "MiB/s")
                    .direct(raw)
                    .hostnet(net)
                    .goal(Goal::VsDirect(0.8))
                    .note(format!(
                        "direct: the raw vsock link hostnet runs on; median of {VM_ROUNDS} × {mb} MiB, {clock}; QEMU {accel}, compare the ratio"
                    )),
            );
            rows.push(
                Row::new(format!("real VM ({who}), {dir}, guest CPU"), "CPU-ms/MiB")
                    .direct(cpu_raw)
                    .hostnet(cpu_net)
                    .note("QEMU's CPU time (the guest's whole work) per MiB moved, all rounds"),
            );
        }
    }
    let [trip, connection, cpu] = interactive.medians();
    let port = hostnet_tests::vm::GUEST_ECHO_VSOCK_PORT;
    rows.push(
        Row::new("real VM (desktop client), RTT 1 B, p50", "µs").direct(trip[0]).hostnet(trip[1]).note(format!(
            "direct: the raw vsock link (the guest's echo on vsock port {port}); one connection each, {VM_TRIPS} trips in {VM_INTERACTIVE_ROUNDS} rounds alternating the paths"
        )),
    );
    rows.push(
        Row::new("real VM (desktop client), new connection, p50", "µs")
            .direct(connection[0])
            .hostnet(connection[1])
            .note(format!(
                "connect (direct: a new hybrid-vsock stream, CONNECT {port}), 1-byte request, answer, close; {VM_CONNECTIONS} each, one after another"
            )),
    );
    rows.push(
        Row::new("real VM (desktop client), new connection, guest CPU", "CPU-µs")
            .direct(cpu[0])
            .hostnet(cpu[1])
            .note("QEMU's CPU time per connection; direct: a vsock stream's whole cost (set-up, echo, close), what a transport stream per connection adds to the guest's TCP connection at most"),
    );
    let [raw, through] =
        guest_connections.each_ref().map(|v| hostnet_tests::vm::median(v).as_secs_f64() * 1e6);
    let host_port = hostnet_tests::vm::HOST_ECHO_VSOCK_PORT;
    rows.push(
        Row::new("real VM (guest client), new connection, p50", "µs").direct(raw).hostnet(through).note(format!(
            "a guest program to a desktop echo at localhost:PORT (direct: vsock 2:{host_port}), 1-byte request, answer, close; {VM_CONNECTIONS} each in {VM_INTERACTIVE_ROUNDS} rounds alternating the paths, the guest's clock"
        )),
    );
    drop(vm);
}

/// Memory per idle connection in KiB: opens `n` connections to a guest server that holds them,
/// through hostnet (`socat: None`) or a socat chain, and divides the relay's memory growth.
/// Returns [proxy, agent] for hostnet, [the whole chain, 0] for socat.
/// RSS growth per connection of proxy and agent (socat: of all its processes) over `n` idle
/// connections; for hostnet, also how fast new listeners are forwarded while they are held
/// (discovery's own-socket check looks at every descriptor the agent holds).
fn idle_memory(demo: &Demo, socat: Option<&Socat>, n: usize) -> ([f64; 2], Option<ports::ListenClose>) {
    let port = free_port();
    let holder = Holder::serve(demo.in_netns(|| Holder::bind(SocketAddr::from(([0, 0, 0, 0], port)))));
    let chain;
    let (addr, memory): (SocketAddr, Box<dyn Fn() -> [u64; 2] + '_>) = match socat {
        None => {
            let start = Instant::now();
            while !tcp_listening(port) {
                assert!(start.elapsed() < hostnet_tests::DEADLINE, "port {port} was never forwarded");
                std::thread::sleep(Duration::from_millis(1));
            }
            let hn = Hostnet::find(demo);
            (
                loopback(false, port),
                Box::new(move || [procs::rss_bytes(hn.proxy), procs::rss_bytes(hn.agent)]),
            )
        }
        Some(s) => {
            chain = s.chain(demo, port, Relay::Socat);
            (chain.addr, Box::new(|| [chain.all_pids().into_iter().map(procs::pss_bytes).sum(), 0]))
        }
    };
    let before = memory();
    let conns = tcp::open_idle(addr, n, &holder.accepted, 256);
    // The measurement window: let the relay settle with every connection idle.
    // hostnet's relay gives an idle direction's buffer back after half a second.
    std::thread::sleep(Duration::from_secs(1));
    let after = memory();
    let busy = socat.is_none().then(|| ports::listen_close(demo, LISTENERS_WHILE_BUSY));
    drop(conns);
    drop(holder);
    let per = |i: usize| after[i].saturating_sub(before[i]) as f64 / 1024.0 / n as f64;
    ([per(0), per(1)], busy)
}

/// Listeners opened one after the other while the memory workload holds its connections.
const LISTENERS_WHILE_BUSY: usize = 20;
