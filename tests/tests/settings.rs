//! Settings, the live toggle, the admin API and the status CLI, end to end through the demo.
//! Needs root (network namespaces).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use hostnet_tests::*;

fn addr(s: &str, port: u16) -> SocketAddr {
    SocketAddr::new(s.parse().unwrap(), port)
}

/// The `to_guest` forward of `guest_port` in `status --json`.
fn forward(demo: &Demo, proto: &str, guest_port: u16) -> Option<serde_json::Value> {
    demo.status()["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["direction"] == "to_guest" && f["proto"] == proto && f["guest_port"] == guest_port)
        .cloned()
}

fn write_settings(demo: &Demo, text: &str) {
    std::fs::create_dir_all(demo.config.parent().unwrap()).unwrap();
    // Replace, as editors do.
    let tmp = demo.config.with_extension("edit");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &demo.config).unwrap();
}

/// Local addresses `ss` shows listening on TCP `port`, one per line.
fn listening_addresses(port: u16) -> String {
    let out = Command::new("ss").args(["-ltnH", &format!("sport = :{port}")]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().filter_map(|l| l.split_whitespace().nth(3)).map(|a| format!("{a}\n")).collect()
}

#[test]
fn the_toggle_works_both_ways_from_the_cli_and_closes_connections() {
    let demo = Demo::start();
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    let (mut open_conn, _) = connect_when_forwarded(loopback(false, port));
    let live = forward(&demo, "tcp", port).unwrap();
    assert_eq!(live["connections_active"], 1, "{live}");
    assert!(
        live["bytes_to_guest"].as_u64().unwrap() >= 1 && live["bytes_from_guest"].as_u64().unwrap() >= 1,
        "{live}"
    );
    // A desktop server, so guest→host rules exist to be removed.
    let host_port = free_port();
    let _host = GuestServer::serve(TcpListener::bind(loopback(false, host_port)).unwrap(), echo);
    let table = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &demo.netns, "nft", "list", "tables"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("hostnet")
    };
    wait_until("guest→host rules are in place", table);

    let out = demo.cli(&["disable"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let off = wait_until("the host port closes", || refused(loopback(false, port)));
    eprintln!("disable → port closed: {off:?}");
    wait_until("guest-side redirects are removed", || !table());
    open_conn.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 8];
    let r = open_conn.read(&mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "the open connection is closed: {r:?}");
    assert_eq!(demo.status()["enabled"], false);
    assert_eq!(forward(&demo, "tcp", port).unwrap()["state"], "disabled");
    assert!(std::fs::read_to_string(&demo.config).unwrap().contains("enabled = false"), "persisted");

    assert!(demo.cli(&["enable"]).status.success());
    connect_when_forwarded(loopback(false, port));
    wait_until("guest→host rules are back", table);
    assert_eq!(forward(&demo, "tcp", port).unwrap()["state"], "forwarding");
}

#[test]
fn editing_the_file_toggles_and_a_bad_edit_keeps_forwarding() {
    let demo = Demo::start();
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    connect_when_forwarded(loopback(false, port));

    write_settings(&demo, "# switched off by hand\nenabled = false\n");
    wait_until("the host port closes", || refused(loopback(false, port)));
    write_settings(&demo, "enabled = true\n");
    connect_when_forwarded(loopback(false, port));

    write_settings(&demo, "enabled = maybe\n");
    wait_until("the error is in status", || {
        demo.status()["errors"].as_array().unwrap().iter().any(|e| e.as_str().unwrap().contains("enabled"))
    });
    let (c, _) = connect_when_forwarded(loopback(false, port));
    assert_eq!(echo_round_trip(c, b"still forwarding"), b"still forwarding");
    write_settings(&demo, "enabled = true\n");
    wait_until("the error clears", || demo.status()["errors"].as_array().unwrap().is_empty());
}

#[test]
fn a_conflict_is_reported_with_its_holder_and_heals_when_the_settings_say_so() {
    let demo = Demo::start();
    let (port, held) = hold_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    // The holder is named a moment later, off the accept path.
    wait_until("status shows the conflict and its holder", || {
        forward(&demo, "tcp", port).is_some_and(|f| {
            f["state"] == "conflict"
                && f["reason"].as_str().is_some_and(|r| r.contains(&format!("pid {}", std::process::id())))
        })
    });
    let reason = forward(&demo, "tcp", port).unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("already in use") && reason.contains(&format!("pid {}", std::process::id())),
        "{reason}"
    );
    let human = String::from_utf8_lossy(&demo.cli(&["status"]).stdout).into_owned();
    assert!(human.contains("conflict") && human.contains("already in use"), "{human}");
    assert!(reason.contains("take_freed_ports"), "status says what would take the port: {reason}");
    write_settings(&demo, "take_freed_ports = true\n");
    wait_until("the setting applies", || demo.log_text().contains("settings changed"));
    drop(held);
    connect_when_forwarded(loopback(false, port));
    assert_eq!(forward(&demo, "tcp", port).unwrap()["state"], "forwarding");
}

#[test]
fn ignored_ports_are_not_bound_and_remapped_ports_move() {
    let demo = Demo::start();
    let (ignored, remapped, target) = (free_port(), free_port(), free_port());
    write_settings(&demo, &format!("ignore_ports = [\"{ignored}\"]\n[remap]\n{remapped} = {target}\n"));
    wait_until("the settings are applied", || demo.log_text().contains("settings changed"));
    let _a = GuestServer::serve(demo.listen(addr("0.0.0.0", ignored), false), echo);
    let _b = GuestServer::serve(demo.listen(addr("0.0.0.0", remapped), false), echo);
    let (c, _) = connect_when_forwarded(loopback(false, target));
    assert_eq!(echo_round_trip(c, b"moved"), b"moved");
    wait_until("status shows the ignored port", || {
        forward(&demo, "tcp", ignored).is_some_and(|f| f["state"] == "ignored")
    });
    assert!(refused(loopback(false, ignored)), "an ignored port is not bound");
    assert!(refused(loopback(false, remapped)), "a remapped port is bound on its new number only");
    assert_eq!(forward(&demo, "tcp", remapped).unwrap()["host_port"], target);
}

#[test]
fn bind_all_is_used_only_when_asked() {
    let demo = Demo::start();
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    connect_when_forwarded(loopback(false, port));
    let loopback_only = listening_addresses(port);
    assert!(loopback_only.contains("127.0.0.1:") && !loopback_only.contains("0.0.0.0:"), "{loopback_only}");
    assert!(!loopback_only.contains("*:") && !loopback_only.contains("[::]:"), "{loopback_only}");
    write_settings(&demo, "bind = \"all\"\n");
    wait_until("the port is bound on all addresses", || listening_addresses(port).contains("0.0.0.0:"));
    assert!(!listening_addresses(port).contains("127.0.0.1:"));
    connect_when_forwarded(loopback(false, port));
    let f = forward(&demo, "tcp", port).unwrap();
    assert!(f["host_addresses"].as_array().unwrap().iter().any(|a| a == "0.0.0.0"), "{f}");
}

#[test]
fn the_admin_socket_is_private_and_survives_garbage() {
    let demo = Demo::start();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&demo.admin_socket), 0o600, "socket only for its owner");
    assert_eq!(mode(demo.admin_socket.parent().unwrap()), 0o700, "directory only for its owner");
    for garbage in [&b"not json\n"[..], b"{\"cmd\":\"rm -rf\"}\n", &vec![b'x'; 100_000], b"\xff\xfe\n"] {
        let mut s = std::os::unix::net::UnixStream::connect(&demo.admin_socket).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let _ = std::io::Write::write_all(&mut s, garbage);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        assert!(reply.is_empty() || reply.contains("\"ok\":false"), "{reply}");
    }
    assert_eq!(demo.status()["enabled"], true, "the API still answers");
}

#[test]
fn status_without_a_running_proxy_says_so() {
    let dir = std::env::temp_dir().join(format!("hostnet-nostatus-{}", std::process::id()));
    let out = Command::new(bin("hostnet-proxy"))
        .arg("--admin-socket")
        .arg(dir.join("admin.sock"))
        .args(["status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not running"), "{err}");
}
