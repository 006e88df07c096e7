//! Kernel listener events (eBPF). Needs root (CAP_BPF + CAP_PERFMON), as CI runs; a build
//! without clang has no program, and that is a failure here too: CI must exercise events.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use hostnet_net::discovery::events::ListenerEvents;
use hostnet_net::discovery::source::{Table, Tables};
use hostnet_protocol::Proto;

const DEADLINE: Duration = Duration::from_secs(10);

/// Waits until an event says `table` changed (other tests' sockets may add other tables).
fn next_event(events: &mut ListenerEvents, table: Table, what: &str) {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if events.wait(Duration::from_millis(100)).unwrap().contains(table) {
            return;
        }
    }
    panic!("no listener event naming {table:?} for {what} within {DEADLINE:?}");
}

fn table(proto: Proto, v6: bool) -> Table {
    Table { proto, v6 }
}

#[test]
fn listen_close_bind_and_unbind_each_wake_the_watcher() {
    let mut events = ListenerEvents::load().expect("loading listener events (run as root)");
    // Whatever happened before (other tests) is drained.
    while events.wait(Duration::from_millis(50)).unwrap() != Tables::NONE {}

    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    next_event(&mut events, table(Proto::Tcp, false), "a TCP listen");
    drop(tcp);
    next_event(&mut events, table(Proto::Tcp, false), "a TCP listener closing");
    let tcp6 = TcpListener::bind("[::1]:0").unwrap();
    next_event(&mut events, table(Proto::Tcp, true), "a TCP listen (IPv6)");
    drop(tcp6);
    let udp4 = UdpSocket::bind("127.0.0.1:0").unwrap();
    next_event(&mut events, table(Proto::Udp, false), "a UDP bind (IPv4)");
    let udp6 = UdpSocket::bind("[::1]:0").unwrap();
    next_event(&mut events, table(Proto::Udp, true), "a UDP bind (IPv6)");
    drop(udp4);
    next_event(&mut events, table(Proto::Udp, false), "a bound UDP socket closing");
    drop(udp6);
    next_event(&mut events, table(Proto::Udp, true), "a bound UDP socket closing (IPv6)");
}

#[test]
fn clients_and_other_namespaces_stay_quiet() {
    let mut events = ListenerEvents::load().expect("loading listener events (run as root)");
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    while events.wait(Duration::from_millis(50)).unwrap() != Tables::NONE {}
    // Clients: a TCP connection, and a UDP socket once it is connected (binding it does wake
    // the watcher: drained below).
    let client = std::net::TcpStream::connect(addr).unwrap();
    let (accepted, _) = server.accept().unwrap();
    let connected = UdpSocket::bind("127.0.0.1:0").unwrap();
    while events.wait(Duration::from_millis(50)).unwrap() != Tables::NONE {}
    connected.connect(addr).unwrap();
    drop(client);
    drop(accepted);
    drop(connected);
    // A listener in another network namespace (another VM's, or the host's in the stand-in).
    std::thread::spawn(|| {
        // SAFETY: moves only this thread into a new network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
        drop(UdpSocket::bind("0.0.0.0:0").unwrap());
        drop(TcpListener::bind("0.0.0.0:0").unwrap());
    })
    .join()
    .unwrap();
    // Another test in this binary may listen meanwhile; only a quiet stretch proves anything,
    // so look for one within the deadline.
    let start = Instant::now();
    loop {
        if events.wait(Duration::from_millis(300)).unwrap() == Tables::NONE {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "client sockets kept waking the watcher");
    }
}
