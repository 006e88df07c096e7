//! Guest→host end to end through the netns stand-in: processes in the "VM" reach servers on
//! this machine as localhost:PORT. Needs root (network namespaces, nftables).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::Command;

use hostnet_tests::*;

fn addr(s: &str, port: u16) -> SocketAddr {
    SocketAddr::new(s.parse().unwrap(), port)
}

/// Connects from inside the "VM" to `target` and runs an echo round trip.
fn guest_echo(demo: &Demo, target: SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
    let data = data.to_vec();
    demo.in_netns(move || {
        let c = TcpStream::connect_timeout(&target, std::time::Duration::from_secs(2)).ok()?;
        Some(echo_round_trip(c, &data))
    })
}

/// Reads what a server says first, from inside the "VM".
fn guest_greeting(demo: &Demo, target: SocketAddr) -> Option<String> {
    demo.in_netns(move || {
        let mut c = TcpStream::connect_timeout(&target, std::time::Duration::from_secs(2)).ok()?;
        c.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).ok()?;
        Some(s)
    })
}

fn say_host(mut c: TcpStream) {
    let _ = c.write_all(b"host");
}

fn say_guest(mut c: TcpStream) {
    let _ = c.write_all(b"guest");
}

/// The tcp_ports set of the agent's nftables table, as text.
fn intercepted_ports(demo: &Demo) -> String {
    demo.nft_set("tcp_ports")
}

#[test]
fn curl_in_the_guest_reaches_a_desktop_web_server() {
    let demo = Demo::start();
    let port = free_port();
    let mut server = desktop_web_server(port);
    wait_until("the desktop server listens", || TcpStream::connect(loopback(false, port)).is_ok());
    let url = format!("http://localhost:{port}/Cargo.toml");
    let mut body = String::new();
    wait_until("curl in the guest gets the page", || {
        let out = Command::new("ip")
            .args(["netns", "exec", &demo.netns, "curl", "-sf", "-m", "5", &url])
            .output()
            .expect("curl is needed; the README's setup installs it");
        body = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status.success()
    });
    assert!(body.contains("name = \"hostnet-tests\""), "got the file served by the desktop: {body}");
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn tcp_echo_from_the_guest_over_v4_v6_and_localhost() {
    let demo = Demo::start();
    let port = free_port();
    // A desktop server on 127.0.0.1 only: [::1] in the guest still reaches it.
    let _srv = GuestServer::serve(TcpListener::bind(loopback(false, port)).unwrap(), echo);
    wait_until("the port is intercepted in the guest", || {
        intercepted_ports(&demo).contains(&port.to_string())
    });
    let mut targets = vec![addr("127.0.0.1", port)];
    if has_ipv6() {
        targets.push(addr("::1", port));
    }
    for t in targets {
        let data = pattern(3 << 20, t.port() as u64);
        assert_eq!(guest_echo(&demo, t, &data).as_deref(), Some(&data[..]), "echo via {t}");
    }
    // Status counts the traffic of this direction too.
    let status = demo.status();
    let f = status["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["direction"] == "to_host" && f["host_port"] == port)
        .cloned()
        .unwrap_or_else(|| panic!("no to_host forward for {port} in {status}"));
    assert!(f["connections_total"].as_u64().unwrap() >= 1, "{f}");
    assert!(f["bytes_from_guest"].as_u64().unwrap() >= 3 << 20, "{f}");
    assert!(f["bytes_to_guest"].as_u64().unwrap() >= 3 << 20, "{f}");
    let by_name: Vec<SocketAddr> =
        demo.in_netns(|| format!("localhost:{port}").to_socket_addrs().unwrap().collect());
    let got = demo.in_netns(|| {
        let c = TcpStream::connect(&by_name[..]).unwrap();
        echo_round_trip(c, b"by name")
    });
    assert_eq!(got, b"by name");
}

#[test]
fn a_port_both_sides_listen_on_stays_with_each_side() {
    let demo = Demo::start();
    let port = free_port();
    let host = TcpListener::bind(loopback(false, port)).unwrap_or_else(|e| panic!("binding {port}: {e}"));
    let _host = GuestServer::serve(host, say_host);
    wait_until("the port is intercepted in the guest", || {
        intercepted_ports(&demo).contains(&port.to_string())
    });
    assert_eq!(guest_greeting(&demo, addr("127.0.0.1", port)).as_deref(), Some("host"));
    // Now a guest server takes the same port: inside the guest it wins by itself.
    let _guest = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), say_guest);
    assert_eq!(guest_greeting(&demo, addr("127.0.0.1", port)).as_deref(), Some("guest"));
    // And the desktop keeps its own server (the mirror is a conflict, not a takeover).
    let mut c = TcpStream::connect(loopback(false, port)).unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    assert_eq!(s, "host");
}

#[test]
fn a_mirrored_guest_port_is_never_advertised_back() {
    let demo = Demo::start();
    let port = free_port();
    let srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    connect_when_forwarded(loopback(false, port));
    // The proxy's mirror on the desktop is not a desktop server: no loop through it.
    let other = free_port();
    let _host = GuestServer::serve(TcpListener::bind(loopback(false, other)).unwrap(), echo);
    wait_until("a real desktop port is advertised", || intercepted_ports(&demo).contains(&other.to_string()));
    assert!(
        !intercepted_ports(&demo).contains(&port.to_string()),
        "mirror advertised back: {}",
        intercepted_ports(&demo)
    );
    srv.close();
    wait_until("the mirror is gone", || refused(loopback(false, port)));
    let looped = demo.in_netns(|| TcpStream::connect(addr("127.0.0.1", port)));
    assert!(looped.is_err(), "connecting to the closed guest port is refused, not looped");
}

#[test]
fn the_guest_cannot_steer_the_proxy_to_unadvertised_ports() {
    // Taken before the demo starts: `free_port` tries the port with a listener for a moment,
    // which a running proxy may see — and advertise until it sees it close.
    let unadvertised = free_port();
    let demo = Demo::start();
    let reply = demo.raw_guest_to_host_open("10.9.8.7", unadvertised);
    assert!(reply.contains("refused") && reply.contains("not advertised"), "{reply}");
}

/// A guest stream may carry one connection after another (protocol version 3); each opening is
/// checked as the first: one for a port not advertised is refused, and the stream ends there.
#[test]
fn each_opening_on_a_reused_guest_stream_is_checked_as_the_first() {
    let unadvertised = free_port();
    let demo = Demo::start();
    let port = free_port();
    let _srv = GuestServer::serve(TcpListener::bind(loopback(false, port)).unwrap(), echo);
    wait_until("the port is intercepted in the guest", || {
        intercepted_ports(&demo).contains(&port.to_string())
    });
    let answers = exchanges_on_one_stream(
        &demo.guest_to_host_socket(),
        &[
            ("127.0.0.1", port, b"one"),
            ("127.0.0.1", port, b"two"),
            ("127.0.0.1", unadvertised, b"three"),
            ("127.0.0.1", port, b"four"),
        ],
    );
    assert_eq!(answers.len(), 3, "the stream ends at the refusal: {answers:?}");
    assert_eq!(answers[..2], [Ok(b"one".to_vec()), Ok(b"two".to_vec())]);
    let refused = answers[2].as_ref().unwrap_err();
    assert!(refused.contains("refused") && refused.contains("not advertised"), "{refused}");
}

#[test]
fn the_rules_are_gone_after_the_demo_stops() {
    require_root();
    let netns = format!("hn-t{}-rules", std::process::id());
    assert!(Command::new("ip").args(["netns", "add", &netns]).status().unwrap().success());
    let demo = Demo::start_named(&netns, &["--reuse"]).unwrap();
    let port = free_port();
    let _host = GuestServer::serve(TcpListener::bind(loopback(false, port)).unwrap(), echo);
    wait_until("the table is installed", || intercepted_ports(&demo).contains(&port.to_string()));
    assert!(demo.stop().success());
    let out = Command::new("ip").args(["netns", "exec", &netns, "nft", "list", "tables"]).output().unwrap();
    let tables = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    assert!(!tables.contains("hostnet"), "table left behind: {tables}");
}

#[test]
fn udp_echo_from_the_guest_over_v4_and_v6() {
    let demo = Demo::start();
    let port = free_port();
    // A desktop UDP server on 127.0.0.1 only: [::1] in the guest still reaches it.
    let _echo = UdpEcho::start_here(addr("127.0.0.1", port));
    wait_until("the UDP port is intercepted in the guest", || {
        demo.nft_set("udp_ports").contains(&port.to_string())
    });
    let mut targets = vec![addr("127.0.0.1", port)];
    if has_ipv6() {
        targets.push(addr("::1", port));
    }
    // And whatever `localhost` resolves to inside the guest.
    targets
        .extend(demo.in_netns(|| format!("localhost:{port}").to_socket_addrs().unwrap().collect::<Vec<_>>()));
    for target in targets {
        // Two guest clients at once, many datagrams each, sizes up to the IPv4 maximum.
        let results: Vec<Vec<bool>> = demo.in_netns(move || {
            let clients: Vec<_> = (0..2).map(|_| udp_client(target)).collect();
            clients
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    [1usize, 100, 1400, 9000, 65_507]
                        .iter()
                        .map(|&len| {
                            let data = pattern(len, (i * 7 + len) as u64);
                            udp_echo(c, &data).is_some_and(|r| r == data)
                        })
                        .collect()
                })
                .collect()
        });
        assert!(results.iter().flatten().all(|&ok| ok), "every datagram echoed via {target}: {results:?}");
    }
}
