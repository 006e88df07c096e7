//! End-to-end tests through the netns stand-in: the real `hostnet-proxy demo` and
//! `hostnet-agent`, a "container" listening inside the demo's namespace, the "desktop"
//! connecting on this machine's loopback.
//!
//! Needs root (network namespaces); `.ci/run` runs as root.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use hostnet_tests::*;

fn addr(s: &str, port: u16) -> SocketAddr {
    SocketAddr::new(s.parse().unwrap(), port)
}

#[test]
fn nc_workflow_typing_flows_both_ways() {
    let demo = Demo::start();
    let port = free_port();
    // The "container": real nc listening inside the VM stand-in; the "desktop": real nc.
    let server =
        spawn_piped("ip", &["netns", "exec", &demo.netns, "nc", "-lk", "0.0.0.0", &port.to_string()]);
    wait_until("the host port is bound", || TcpStream::connect(loopback(false, port)).is_ok());
    let client = spawn_piped("nc", &["localhost", &port.to_string()]);
    assert_typing_flows_both_ways(server, client);
}

#[test]
fn multi_megabyte_transfers_are_byte_exact_over_v4_and_v6() {
    let demo = Demo::start();
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(addr("::", port), false), echo);
    let families: &[bool] = if has_ipv6() { &[false, true] } else { &[false] };
    for &v6 in families {
        let (c, _) = connect_when_forwarded(loopback(v6, port));
        let data = pattern(24 << 20, if v6 { 6 } else { 4 });
        let got = echo_round_trip(c, &data);
        assert_eq!(got.len(), data.len(), "length over {}", loopback(v6, port));
        assert!(got == data, "bytes differ over {}", loopback(v6, port));
    }
}

#[test]
fn a_half_closed_client_still_receives_the_reply() {
    let demo = Demo::start();
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), count_then_reply);
    wait_until("the host port is bound", || TcpStream::connect(loopback(false, port)).is_ok());
    let mut c = TcpStream::connect(loopback(false, port)).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    let body = pattern(1 << 20, 9);
    c.write_all(&body).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, format!("got {} bytes", body.len()));
}

#[test]
fn ipv6_only_guest_listener_serves_both_host_families() {
    if !has_ipv6() {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    let demo = Demo::start();
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(addr("::", port), true), echo);
    for v6 in [true, false] {
        let (c, _) = connect_when_forwarded(loopback(v6, port));
        assert_eq!(echo_round_trip(c, b"dual"), b"dual");
    }
}

#[test]
fn loopback_bound_guest_listeners_are_forwarded() {
    let demo = Demo::start();
    let p4 = free_port();
    let _s4 = GuestServer::serve(demo.listen(addr("127.0.0.1", p4), false), echo);
    let (c, _) = connect_when_forwarded(loopback(false, p4));
    assert_eq!(echo_round_trip(c, b"v4 loopback"), b"v4 loopback");
    if has_ipv6() {
        let p6 = free_port();
        let _s6 = GuestServer::serve(demo.listen(addr("::1", p6), false), echo);
        // A client on the host's 127.0.0.1 reaches the guest's ::1-only server too.
        let (c, _) = connect_when_forwarded(loopback(false, p6));
        assert_eq!(echo_round_trip(c, b"v6 loopback"), b"v6 loopback");
    }
}

#[test]
fn a_hundred_concurrent_connections() {
    let demo = Demo::start();
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    connect_when_forwarded(loopback(false, port));
    // All connected before any data moves, so they are truly open at once.
    let conns: Vec<TcpStream> =
        (0..100).map(|_| TcpStream::connect(loopback(false, port)).unwrap()).collect();
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            std::thread::spawn(move || {
                let data = pattern(64 * 1024, i as u64 + 100);
                echo_round_trip(c, &data) == data
            })
        })
        .collect();
    let ok = threads.into_iter().map(|t| t.join().unwrap()).filter(|&ok| ok).count();
    assert_eq!(ok, 100, "every connection echoes its own bytes");
}

#[test]
fn the_host_port_closes_soon_after_the_guest_server_exits() {
    let demo = Demo::start();
    let port = free_port();
    let srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    connect_when_forwarded(loopback(false, port));
    let closed_at = Instant::now();
    srv.close();
    wait_until("the host port is refused", || refused(loopback(false, port)));
    eprintln!("close → host port refused: {:?}", closed_at.elapsed());
    if has_ipv6() {
        // Each address's socket is closed by its own accept task: the two may close in either
        // order, microseconds apart.
        wait_until("[::1] is refused too", || refused(loopback(true, port)));
    }
}

#[test]
fn time_from_listen_to_usable_and_from_close_to_released() {
    let demo = Demo::start();
    let mut up = Vec::new();
    let mut down = Vec::new();
    for _ in 0..20 {
        let port = free_port();
        let listener = demo.listen(addr("0.0.0.0", port), false);
        let listened = Instant::now();
        let srv = GuestServer::serve(listener, echo);
        let (c, _) = connect_when_forwarded(loopback(false, port));
        up.push(listened.elapsed());
        drop(c);
        let closed = Instant::now();
        srv.close();
        wait_until("the host port is released", || refused(loopback(false, port)));
        down.push(closed.elapsed());
    }
    eprintln!(
        "listen() → usable from the host: p50 {:?}, p99 {:?}; close → released: p50 {:?}, p99 {:?} (20 listeners)",
        percentile(&mut up, 50),
        percentile(&mut up, 99),
        percentile(&mut down, 50),
        percentile(&mut down, 99)
    );
}

#[test]
fn the_namespace_is_gone_after_the_demo_stops() {
    let demo = Demo::start();
    let netns = demo.netns.clone();
    assert!(Path::new("/run/netns").join(&netns).exists());
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    connect_when_forwarded(loopback(false, port));
    let status = demo.stop();
    assert!(status.success(), "demo exits cleanly on SIGTERM: {status}");
    assert!(!Path::new("/run/netns").join(&netns).exists(), "netns {netns} removed");
    assert!(!Path::new("/run/hostnet").join(&netns).exists(), "run dir removed");
    assert!(refused(loopback(false, port)), "host port closed");
}

#[test]
fn an_existing_namespace_is_refused_unless_reused() {
    require_root();
    let netns = format!("hn-t{}-existing", std::process::id());
    assert!(Command::new("ip").args(["netns", "add", &netns]).status().unwrap().success());
    let err = match Demo::start_named(&netns, &[]) {
        Err(e) => e,
        Ok(d) => {
            d.stop();
            panic!("demo must refuse an existing namespace");
        }
    };
    assert!(err.contains("already exists") && err.contains("--reuse"), "{err}");
    assert!(Path::new("/run/netns").join(&netns).exists(), "the user's namespace is left alone");

    let demo = Demo::start_named(&netns, &["--reuse"]).unwrap();
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    connect_when_forwarded(loopback(false, port));
    assert!(demo.stop().success());
    assert!(Path::new("/run/netns").join(&netns).exists(), "a reused namespace stays");
    assert!(Command::new("ip").args(["netns", "del", &netns]).status().unwrap().success());
}

#[test]
fn the_demo_without_root_says_what_it_needs() {
    require_root(); // to drop to another user
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("hostnet-proxy"))
        .args(["demo", "--netns", "hn-never-created"])
        .output()
        .expect("setpriv (util-linux) runs the proxy as an unprivileged user");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("needs root") && stderr.contains("sudo"), "{stderr}");
    assert!(!Path::new("/run/netns/hn-never-created").exists());
}

#[test]
fn the_agent_restarting_resyncs_the_forwards() {
    let demo = Demo::start();
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    connect_when_forwarded(loopback(false, port));
    let pids = demo.netns_pids();
    assert!(!pids.is_empty(), "the agent runs inside the namespace");
    for pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    let killed = Instant::now();
    // The demo restarts the agent (as a guest init would); the forward must work again.
    wait_until("the agent is back", || !demo.netns_pids().is_empty());
    let (c, _) = connect_when_forwarded(loopback(false, port));
    eprintln!("agent killed → forward usable again: {:?}", killed.elapsed());
    assert_eq!(echo_round_trip(c, b"after restart"), b"after restart");
    // A listener opened after the restart is picked up too.
    let port2 = free_port();
    let _srv2 = GuestServer::serve(demo.listen(addr("0.0.0.0", port2), false), echo);
    connect_when_forwarded(loopback(false, port2));
}

#[test]
fn garbage_on_the_agent_socket_harms_nothing_else() {
    let demo = Demo::start();
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    connect_when_forwarded(loopback(false, port));
    let sock = Path::new("/run/hostnet").join(&demo.netns).join("agent.sock");
    let hostile: [&[u8]; 5] = [
        b"GET / HTTP/1.1\r\n\r\n",
        b"HNET\x00\x03\xff\xff\xff\xff",      // a 4 GiB frame
        b"HNET\x00\x03\x00\x00\x00\x05{{{{{", // malformed JSON
        b"HNET\x00\x63\x00\x00\x00\x02{}",    // protocol version 99
        b"HNET\x00\x03\x00\x00\x00\x2a{\"type\":\"tcp\",\"addr\":\"10.0.0.1\",\"port\":22}", // not loopback
    ];
    for bytes in hostile {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let _ = s.write_all(bytes);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink); // the agent ends the stream
    }
    let c = TcpStream::connect(loopback(false, port)).unwrap();
    assert_eq!(echo_round_trip(c, b"still fine"), b"still fine");
    assert!(demo.log_text().contains("rejected a stream"), "the agent logs what it rejected");
}

#[test]
fn a_host_port_held_by_another_program_forwards_once_it_frees_up_when_the_settings_say_so() {
    let demo = Demo::start();
    std::fs::create_dir_all(demo.config.parent().unwrap()).unwrap();
    std::fs::write(&demo.config, "take_freed_ports = true\n").unwrap();
    wait_until("the setting applies", || demo.log_text().contains("settings changed"));
    let (port, held) = hold_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    wait_until("the demo reports the conflict", || {
        demo.log_text().contains(&format!("port {port} is already in use"))
    });
    drop(held);
    let (c, waited) = connect_when_forwarded(loopback(false, port));
    eprintln!("port freed → forwarding: {waited:?}");
    assert_eq!(echo_round_trip(c, b"healed"), b"healed");
    assert!(demo.log_text().contains(&format!("host port {port} is free now")));
}

#[test]
fn a_host_address_held_by_another_program_keeps_the_whole_port_off_the_guest() {
    if !has_ipv6() {
        eprintln!("skipped: no IPv6 loopback here, so no second address to be held");
        return;
    }
    let demo = Demo::start();
    // Another program holds the port on 127.0.0.1 only: the port is that program's, so
    // nothing is bound on ::1 either (`localhost` clients try ::1 first).
    let (port, mut held) = hold_port();
    let v4 = held.remove(0);
    drop(held);
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    wait_until("status shows the conflict", || {
        demo.forward_status("tcp", port).is_some_and(|f| f["state"] == "conflict")
    });
    let status = demo.forward_status("tcp", port).expect("the forward is in status");
    assert!(
        status["reason"].as_str().is_some_and(|r| r.contains("already in use") && r.contains("127.0.0.1")),
        "status says which address is taken: {status}"
    );
    // ::1 is bridged to the program's 127.0.0.1 (the desktop's on both families), not the guest.
    wait_until("::1 is bridged to the program on 127.0.0.1", || {
        status_of(&demo, port).contains("is bridged to the desktop's server on 127.0.0.1")
    });
    let mut c = TcpStream::connect(loopback(true, port)).expect("the bridge on ::1 accepts");
    v4.set_nonblocking(false).unwrap();
    let (mut held_side, _) = v4.accept().expect("the program on 127.0.0.1 gets the connection");
    c.write_all(b"to the desktop").unwrap();
    let mut got = [0u8; 14];
    held_side.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"to the desktop");
    assert_eq!(demo.forward_count("tcp", port, "connections_total"), 0, "nothing went to the guest");
    drop((c, held_side, v4));
    wait_until("the bridge goes with the program", || refused(loopback(true, port)));
}

fn status_of(demo: &Demo, port: u16) -> String {
    demo.forward_status("tcp", port).map(|f| f["reason"].to_string()).unwrap_or_default()
}

/// One stream from the proxy's side carries one connection after another (protocol version 3):
/// the agent reads the next opening where the last connection ended, and connects anew.
#[test]
fn the_agent_serves_one_connection_after_another_on_one_stream() {
    let demo = Demo::start();
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    let answers = exchanges_on_one_stream(
        &demo.agent_socket(),
        &[("127.0.0.1", port, b"first"), ("127.0.0.1", port, b"second"), ("127.0.0.1", port, b"third")],
    );
    let want: Vec<Result<Vec<u8>, String>> =
        vec![Ok(b"first".to_vec()), Ok(b"second".to_vec()), Ok(b"third".to_vec())];
    assert_eq!(answers, want);
}

/// Connections one after another from a few clients, ending every way — closed by either side
/// first, reset by the server, by the client, by a server that left the request unread: the
/// streams they leave carry the next connections (protocol version 3), and every echo among
/// them comes back whole and its own, with nothing logged as broken.
#[test]
fn connections_ending_every_way_in_a_row_never_cross() {
    let demo = Demo::start();
    connections_ending_every_way(&demo, 4, 160);
}
