//! The Windows build of the desktop half, for real: `hostnet-proxy demo --windows` runs the
//! x86_64-pc-windows-gnu `hostnet-proxy.exe` under Wine against the netns stand-in and its
//! Linux agent. Wine's sockets are this machine's, so a Linux client here is a Windows desktop
//! client there; the admin API is a named pipe, reached by the Windows CLI under Wine.
//!
//! Needs root (network namespaces), Wine (`wine64`) and the Windows build with the DLL Wine 8
//! lacks beside it; the README's test command provides all three. These tests fail — they do
//! not skip — when the Windows build is missing or broken.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::OnceLock;

use hostnet_tests::*;

fn addr(s: &str, port: u16) -> SocketAddr {
    SocketAddr::new(s.parse().unwrap(), port)
}

/// The Windows proxy, with its Wine prefix made once for all tests of this run (a first start
/// creates it, ~10 s; tests starting at once would each wait on that).
fn windows_proxy() -> &'static WindowsProxy {
    static PROXY: OnceLock<WindowsProxy> = OnceLock::new();
    PROXY.get_or_init(|| {
        let proxy = WindowsProxy::built();
        let out =
            proxy.command().arg("--version").output().expect("wine64 is needed (./dev.sh setup installs it)");
        let version = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && version.contains("host-proxy"),
            "the Windows proxy does not start under Wine ({}): {version}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        proxy
    })
}

fn forward(demo: &Demo, proto: &str, guest_port: u16) -> Option<serde_json::Value> {
    demo.forward_status(proto, guest_port)
}

fn write_settings(demo: &Demo, text: &str) {
    std::fs::create_dir_all(demo.config.parent().unwrap()).unwrap();
    let tmp = demo.config.with_extension("edit");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &demo.config).unwrap();
}

#[test]
fn tcp_and_udp_reach_the_guest_through_the_windows_proxy() {
    let demo = Demo::start_windows(windows_proxy(), &[]);
    let port = free_port();
    let srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    // Byte-exact both ways, over both loopback families the Windows proxy binds.
    for (v6, seed) in [(false, 1), (true, 2)] {
        if v6 && !has_ipv6() {
            continue;
        }
        let (c, _) = connect_when_forwarded(loopback(v6, port));
        let data = pattern(4 << 20, seed);
        let got = echo_round_trip(c, &data);
        assert!(got == data, "4 MiB echoed through the Windows proxy came back different (v6: {v6})");
    }
    let f = forward(&demo, "tcp", port).expect("status over the named pipe lists the forward");
    assert_eq!(f["state"], "forwarding", "{f}");
    assert!(f["bytes_to_guest"].as_u64().unwrap() >= 4 << 20, "{f}");

    // The guest server goes away: the Windows proxy releases the desktop port.
    srv.close();
    wait_until("the desktop port is released", || {
        refused(loopback(false, port)) && refused(loopback(true, port))
    });

    // UDP: datagram boundaries kept, up to the largest IPv4 datagram.
    let uport = free_port();
    let echo_srv = UdpEcho::start(&demo, addr("::", uport));
    for target in [loopback(false, uport), loopback(true, uport)] {
        let c = udp_client(target);
        let mut answered = None;
        wait_until("a UDP datagram is answered through the Windows proxy", || {
            answered = udp_echo(&c, b"ping");
            answered.is_some()
        });
        assert_eq!(answered.unwrap(), b"ping");
        for len in [0, 1, 1400, 65_507] {
            let data = pattern(len, len as u64 + 7);
            assert_eq!(
                udp_echo(&c, &data).as_deref(),
                Some(&data[..]),
                "datagram of {len} bytes to {target}"
            );
        }
    }
    echo_srv.close();
    wait_until("the UDP port is released", || !udp_port_taken(loopback(false, uport)));
    assert!(!demo.panicked(), "{}", demo.log_text());
}

/// The Windows build's relay (tokio on Windows' readiness, no `splice`) keeps streams between
/// connections too: connections ending every way in a row through it never cross.
#[test]
fn connections_ending_every_way_in_a_row_never_cross_through_the_windows_proxy() {
    let demo = Demo::start_windows(windows_proxy(), &[]);
    connections_ending_every_way(&demo, 4, 40);
    assert!(!demo.panicked(), "{}", demo.log_text());
}

#[test]
fn status_and_the_toggle_over_the_named_pipe() {
    let demo = Demo::start_windows(windows_proxy(), &[]);
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    connect_when_forwarded(loopback(false, port));

    let human = demo.cli(&["status"]);
    assert!(human.status.success(), "status: {}", String::from_utf8_lossy(&human.stderr));
    let human = String::from_utf8_lossy(&human.stdout).into_owned();
    assert!(human.contains(&port.to_string()) && human.contains("forwarding"), "{human}");

    let off = demo.cli(&["disable"]);
    assert!(off.status.success(), "disable: {}", String::from_utf8_lossy(&off.stderr));
    wait_until("the desktop port closes", || refused(loopback(false, port)));
    assert_eq!(demo.status()["enabled"], false);
    let on = demo.cli(&["enable"]);
    assert!(on.status.success(), "enable: {}", String::from_utf8_lossy(&on.stderr));
    let (c, _) = connect_when_forwarded(loopback(false, port));
    assert_eq!(echo_round_trip(c, b"back on"), b"back on");
    assert_eq!(demo.status()["enabled"], true);
}

#[test]
fn a_guest_process_reaches_a_desktop_server_through_the_windows_listener_source() {
    let demo = Demo::start_windows(windows_proxy(), &[]);
    let port = free_port();
    // Wine cannot tell a socket's owner: the policy must be told to offer unknown owners' —
    // and, until it is, offers nothing (checked first: the policy holds on Windows too).
    let _srv = GuestServer::serve(TcpListener::bind(loopback(false, port)).unwrap(), echo);
    wait_until("status lists the desktop listener as not offered", || {
        demo.status()["forwards"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["direction"] == "to_host" && f["guest_port"] == port && f["state"] == "not_offered")
    });
    let target = addr("127.0.0.1", port);
    assert!(
        demo.in_netns(move || TcpStream::connect_timeout(&target, std::time::Duration::from_secs(2)))
            .is_err(),
        "a listener of an unknown owner was reachable from the guest"
    );
    write_settings(&demo, "[guest_to_host_policy]\nother_users = true\n");
    // A desktop server (a Linux socket, which Wine's GetExtendedTcpTable lists as Windows'
    // would): the guest reaches it as localhost:PORT.
    let data = pattern(1 << 20, 9);
    let mut got = None;
    wait_until("a guest process reaches the desktop server", || {
        let data = data.clone();
        got = demo.in_netns(move || {
            let c = TcpStream::connect_timeout(&target, std::time::Duration::from_secs(2)).ok()?;
            Some(echo_round_trip(c, &data))
        });
        got.is_some()
    });
    assert!(got.unwrap() == data, "1 MiB from the guest to the desktop came back different");
}

#[test]
fn bad_input_gets_the_same_clear_errors_on_windows() {
    let demo = Demo::start_windows(windows_proxy(), &[]);

    // A desktop port already held by another program: a conflict, said so; the desktop keeps
    // it, and the guest port takes it once freed only when the settings say so.
    let (port, held) = hold_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    wait_until("status shows the conflict", || {
        forward(&demo, "tcp", port).is_some_and(|f| f["state"] == "conflict")
    });
    let reason = forward(&demo, "tcp", port).unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("already in use"), "{reason}");
    write_settings(&demo, "take_freed_ports = true\n");
    drop(held);
    connect_when_forwarded(loopback(false, port));

    // A settings file with a bad value: the last good settings stay, the error shows.
    write_settings(&demo, "enabled = maybe\n");
    wait_until("the bad edit shows in status", || {
        demo.status()["errors"].as_array().unwrap().iter().any(|e| e.as_str().unwrap().contains("enabled"))
    });
    let (c, _) = connect_when_forwarded(loopback(false, port));
    assert_eq!(echo_round_trip(c, b"still forwarding"), b"still forwarding");

    // A second proxy on the same named pipe: told so in its log, the first one unharmed.
    let log = std::env::temp_dir().join(format!("hostnet-{}-second.log", demo.netns));
    let mut second = windows_proxy()
        .command()
        .arg("--admin-socket")
        .arg(&demo.admin_socket)
        .args(["run", "--transport", "tcp:127.0.0.1:9"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until("the second proxy says the pipe is served already", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("already serv")
    });
    let _ = second.kill();
    let _ = second.wait();
    let again = demo.cli(&["status", "--json"]);
    assert!(
        again.status.success(),
        "the first proxy still answers: {}",
        String::from_utf8_lossy(&again.stderr)
    );
}
