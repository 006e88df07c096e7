//! The other way, guest → host: a client in the "VM" reaching a server on the desktop at
//! `localhost:PORT` — intercepted in the guest (nftables), relayed by the agent and the proxy —
//! against the same client on the desktop connecting straight to the same server.

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use hostnet_tests::{DEADLINE, Demo, GuestServer, UdpEcho, count_then_reply, echo, free_port, loopback};

use crate::paths::Server;
use crate::procs::{self, Hostnet};
use crate::report::Row;
use crate::tcp;
use crate::udp::{self, desktop_socket_drops, drops_where, socket_drops};
use crate::{CONNECT_CLIENTS, Params};

/// A server on the desktop's loopback that a client in the VM reaches.
struct DesktopServer {
    addr: std::net::SocketAddr,
    _server: GuestServer,
}

impl DesktopServer {
    /// Starts `server` on the desktop and waits until a connect from the VM reaches it (the
    /// agent intercepts the port once the proxy has reported the desktop's listener).
    fn start(demo: &Demo, server: Server) -> DesktopServer {
        let addr = loopback(false, free_port());
        let server = server.start(TcpListener::bind(addr).unwrap());
        let start = Instant::now();
        demo.in_netns(|| {
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                assert!(start.elapsed() < DEADLINE, "{addr} on the desktop never reachable from the VM");
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        DesktopServer { addr, _server: server }
    }
}

/// Throughput (1 and 8 streams), round trips and new connections (from [`CONNECT_CLIENTS`]
/// clients), guest → host, sized as the other way's workloads.
pub fn rows(demo: &Demo, p: &Params, rows: &mut Vec<Row>) {
    let hn = Hostnet::find(demo);
    let note = "a client in the VM → a desktop server at localhost:PORT (intercepted by the agent, \
                relayed by the proxy); direct: the same client on the desktop, the same server";
    for streams in [1, 8] {
        let srv = DesktopServer::start(demo, Server::PerConnection(count_then_reply));
        let d = tcp::transfer(srv.addr, p.bytes, streams, &|| 0.0, &|| None, &|| ());
        let h = demo
            .in_netns(|| tcp::transfer(srv.addr, p.bytes, streams, &|| hn.cpu_seconds(), &|| None, &|| ()));
        let what = if streams == 1 { "1 stream".to_string() } else { format!("{streams} streams") };
        let row = Row::new(format!("guest→host TCP throughput, {what}"), "GiB/s")
            .direct(d.gib_per_s)
            .hostnet(h.gib_per_s);
        if streams > 1 {
            rows.push(row);
        } else {
            rows.push(row.note(note));
            rows.push(
                Row::new("guest→host CPU per GiB moved, whole path (1 stream)", "CPU-s/GiB")
                    .direct(d.cpu_per_gib)
                    .hostnet(h.cpu_per_gib)
                    .note(format!("relay only (proxy + agent): {:.3}", h.relay_cpu_per_gib)),
            );
        }
    }

    let srv = DesktopServer::start(demo, Server::PerConnection(echo));
    let from_vm = demo.in_netns(|| tcp::rtt_client(srv.addr));
    let mut got = tcp::rtt_rounds(&mut [tcp::rtt_client(srv.addr), from_vm], p.trips, &[]).into_iter();
    let (d, h) = (got.next().unwrap(), got.next().unwrap());
    rows.push(Row::new("guest→host RTT 1 B ping-pong, p50", "µs").direct(d.p50).hostnet(h.p50));
    rows.push(Row::new("guest→host RTT 1 B ping-pong, p99", "µs").direct(d.p99).hostnet(h.p99));

    let srv = DesktopServer::start(demo, Server::Pooled(tcp::pong, CONNECT_CLIENTS));
    let rate = |in_vm: bool| {
        let (own0, relay0) = (procs::own_cpu_seconds(), hn.cpu_seconds());
        let (n, secs) = if in_vm {
            demo.in_netns(|| tcp::connections(srv.addr, p.connect_window, CONNECT_CLIENTS))
        } else {
            tcp::connections(srv.addr, p.connect_window, CONNECT_CLIENTS)
        };
        let (own, relay) = (procs::own_cpu_seconds() - own0, hn.cpu_seconds() - relay0);
        let per = |cpu: f64| cpu / n.max(1) as f64 * 1e6;
        // Direct's window still counts the relays' idle CPU: not theirs, left out.
        (n as f64 / secs, per(own + if in_vm { relay } else { 0.0 }), per(relay))
    };
    let (d, h) = (rate(false), rate(true));
    rows.push(
        Row::new(format!("guest→host new connections (1 request), {} clients", CONNECT_CLIENTS), "conn/s")
            .direct(d.0)
            .hostnet(h.0),
    );
    rows.push(
        Row::new(
            format!("guest→host CPU per new connection, whole path ({} clients)", CONNECT_CLIENTS),
            "CPU-µs",
        )
        .direct(d.1)
        .hostnet(h.1)
        .note(format!("relay only (proxy + agent): {:.1} CPU-µs", h.2)),
    );
}

/// UDP, guest → host: the lossless rate and the relays' CPU per datagram of a client in the VM
/// sending to a desktop echo server at `localhost:PORT` (intercepted by the agent's TPROXY
/// rules, a flow socket of its own per client), against the same client on the desktop.
pub fn udp_rows(demo: &Demo, p: &Params, rows: &mut Vec<Row>) {
    let hn = Hostnet::find(demo);
    let port = free_port();
    let target = loopback(false, port);
    let _echo = UdpEcho::start_here(target);
    // Where a step lost datagrams, by role (the client's socket is the ladder's).
    let direct_drops = |client: u16| {
        let host = socket_drops();
        vec![
            ("client", drops_where(&host, &|s| s.local_port == client)),
            ("echo server", drops_where(&host, &|s| s.local_port == port && s.remote_port == 0)),
        ]
    };
    // Called in the VM's namespace (the ladder's client is there).
    let hostnet_drops = |client: u16| {
        let (guest, host) = (socket_drops(), desktop_socket_drops());
        vec![
            ("client", drops_where(&guest, &|s| s.local_port == client)),
            (
                "agent's flow socket",
                drops_where(&guest, &|s| s.local_port == port && s.remote_port == client),
            ),
            ("proxy's socket", drops_where(&host, &|s| s.remote_port == port)),
            ("echo server", drops_where(&host, &|s| s.local_port == port && s.remote_port == 0)),
        ]
    };
    let lossless = |size| {
        (
            udp::lossless_rate(target, size, p.udp_seconds, &direct_drops),
            demo.in_netns(|| udp::lossless_rate(target, size, p.udp_seconds, &hostnet_drops)),
            None,
        )
    };
    rows.extend(udp::lossless_rows("guest→host ", p, &lossless, None));
    let cpu = |size| {
        let h = demo
            .in_netns(|| udp::relay_cpu_per_datagram(target, size, p.udp_cpu_seconds, &|| hn.cpu_seconds()));
        (h, None)
    };
    rows.extend(udp::cpu_rows("guest→host ", p, &cpu));
}
