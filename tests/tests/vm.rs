//! The real VM: hostnet's guest image booted under QEMU (KVM or TCG, as `installer/run-vm` finds)
//! with virtio-vsock, the agent
//! started by the image's init, `hostnet-proxy run` on the host over hybrid vsock — driven
//! through `installer/run-vm`, exactly as a person would.
//!
//! Needs root, QEMU and vhost-device-vsock (`installer/vm-tools`) and the guest image
//! (`installer/build-guest-image`); the README's test command provides all three.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::process::Command;
use std::time::Instant;

use hostnet_tests::vm::{self, BULK_BYTES, Transfers, Vm};
use hostnet_tests::*;

/// Rounds of each timed transfer (the median is reported).
const BULK_ROUNDS: usize = 3;

fn report_round(what: &str, round: usize, t: &Transfers) {
    let [a, b, c, d] = t.last();
    eprintln!(
        "throughput round {round}, {what}: host → guest raw {a:.1} / hostnet {b:.1} MiB/s; guest → host raw {c:.1} / hostnet {d:.1} MiB/s"
    );
}

fn report(vm: &Vm, what: &str, t: &Transfers) {
    let [raw_in, net_in, raw_out, net_out] = t.medians();
    eprintln!(
        "throughput over the real VM ({}), {what}, {} MiB per transfer, median of {BULK_ROUNDS}:",
        vm.accel(),
        BULK_BYTES >> 20
    );
    eprintln!(
        "  host → guest: raw vsock {raw_in:.1} MiB/s, hostnet {net_in:.1} MiB/s, hostnet/raw {:.2}",
        net_in / raw_in
    );
    eprintln!(
        "  guest → host: raw vsock {raw_out:.1} MiB/s, hostnet {net_out:.1} MiB/s, hostnet/raw {:.2}",
        net_out / raw_out
    );
}

#[test]
fn hostnet_across_a_real_virtio_vsock_link() {
    let (vm, boot) = Vm::start();
    eprintln!("VM start → first forwarded port ready: {boot:?}");

    // Desktop → guest TCP: the image's echo service.
    let (c, _) = connect_when_forwarded(loopback(false, vm::GUEST_ECHO_PORT));
    let data = pattern(4 << 20, 8007);
    let t = Instant::now();
    assert!(echo_round_trip(c, &data) == data, "4 MiB echoed byte-exact over the real VM");
    eprintln!("4 MiB TCP echo through the VM: {:?}", t.elapsed());

    // Desktop → guest UDP.
    wait_until("the UDP port is forwarded", || udp_port_taken(loopback(false, vm::GUEST_ECHO_PORT)));
    let u = udp_client(loopback(false, vm::GUEST_ECHO_PORT));
    for len in [1, 1400, 9000] {
        let d = pattern(len, len as u64);
        assert_eq!(udp_echo(&u, &d), Some(d), "{len}-byte datagram");
    }

    // Throughput: the same bytes through hostnet and over the raw vsock link, the same guest
    // service behind both, the same clock. Figures are printed, not asserted (TCG is no perf
    // bed, KVM on a shared machine hardly one; the benchmark's `vm` workload reports them); only the byte counts are checked.
    let what = "desktop client ↔ guest server";
    let t = vm.desktop_client_transfers(BULK_ROUNDS, |round, t| report_round(what, round, t));
    report(&vm, what, &t);

    // One-byte round trips and new connections, through hostnet and over the raw vsock link
    // (the image's echo on vsock port 1103): every echo checked, the figures printed.
    let i = vm.desktop_client_interactive(100, 10, 2);
    assert_eq!(i.trips.each_ref().map(Vec::len), [100, 100], "round trips on both paths");
    assert_eq!(i.connections.each_ref().map(Vec::len), [10, 10], "new connections on both paths");
    let [trip, conn, cpu] = i.medians();
    eprintln!(
        "real VM ({}), raw vsock / hostnet: round trip p50 {:.0} / {:.0} µs, new connection p50 {:.0} / {:.0} µs, guest CPU per connection {:.0} / {:.0} µs",
        vm.accel(),
        trip[0],
        trip[1],
        conn[0],
        conn[1],
        cpu[0],
        cpu[1]
    );

    // The guest's kernel trace around new connections (`hostnet-bench trace-vm`): each
    // connection's opening reaches the agent — on a stream of its own (a vsock request) or on
    // one a finished connection left (protocol version 3) — whose relay thread is then woken.
    let (took, trace) =
        vm.guest_trace("sched:sched_waking vsock:virtio_transport_recv_pkt", || vm.echo_latencies(3, false));
    assert_eq!(took.len(), 3, "three traced connections");
    let packets = |op: &'static str| {
        trace.lines().filter(move |l| l.contains("virtio_transport_recv_pkt") && l.contains(op))
    };
    // An opening (preface, `open` with the client's address, the first byte) is ~85 bytes; the
    // other packets of a connection carry a byte, a FIN chunk or nothing.
    let openings = packets("op=RW")
        .filter(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("len="))
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n > 40)
        })
        .count();
    assert!(openings >= 3, "the trace shows each connection's opening: {openings}\n{trace}");
    eprintln!("traced: 3 connections, {} vsock stream request(s)", packets("op=REQUEST").count());
    assert!(trace.contains("comm=hostnet-relay"), "the trace shows the agent's relay thread woken:\n{trace}");

    // Guest → desktop TCP: a desktop web server fetched from inside the guest.
    let port = free_port();
    let mut server = desktop_web_server(port);
    let fetch = format!("wget -q -O - http://127.0.0.1:{port}/Cargo.toml");
    wait_until("the guest fetches from the desktop", || {
        let (code, body) = vm.guest(&fetch);
        code == 0 && body.contains("hostnet-tests")
    });
    let _ = server.kill();
    let _ = server.wait();
    // It did so through an agent that runs as the image's unprivileged hostnet user (uid 999),
    // with no supplementary groups and only CAP_NET_ADMIN.
    let (code, status) =
        vm.guest("grep -E '^(Uid|Gid|Groups|CapEff|CapPrm|CapAmb):' /proc/$(pidof hostnet-agent)/status");
    assert_eq!(code, 0, "{status}");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    assert_eq!(field("Uid:").as_deref(), Some("999 999 999 999"), "{status}");
    assert_eq!(field("Gid:").as_deref(), Some("999 999 999 999"), "{status}");
    assert_eq!(field("Groups:").as_deref(), Some(""), "{status}");
    for set in ["CapEff:", "CapPrm:", "CapAmb:"] {
        assert_eq!(field(set).as_deref(), Some("0000000000001000"), "{set} only CAP_NET_ADMIN: {status}");
    }

    // Throughput the other way round: a program in the guest connects to a desktop server,
    // through hostnet (`127.0.0.1:P` in the guest: nftables TPROXY → agent → vsock port 1025 →
    // proxy → desktop 127.0.0.1:P) and over the raw vsock link (host vsock port 1102, which
    // hybrid vsock hands to `<socket>_1102`); the same desktop service behind both, the same
    // guest client, timed on the guest's clock from before its connect to the last byte.
    let targets = vm.serve_desktop_bulk();
    let what = "guest client ↔ desktop server";
    let t = vm.guest_client_transfers(&targets, BULK_ROUNDS, |round, t| report_round(what, round, t));
    report(&vm, what, &t);

    // A listener appearing and disappearing in the guest.
    let extra = 9107;
    let (code, out) = vm.guest(&format!(
        "setsid sh -c 'echo $$ > /tmp/extra.pid; exec hostnet-guest-helper echo --tcp {extra} --udp {extra}' </dev/null >/dev/null 2>&1 &"
    ));
    assert_eq!(code, 0, "{out}");
    let (c, appeared) = connect_when_forwarded(loopback(false, extra));
    eprintln!("guest listen → usable on the host (under {}): {appeared:?}", vm.accel());
    assert_eq!(echo_round_trip(c, b"new listener"), b"new listener");
    wait_until("the extra server wrote its pid", || vm.guest("test -s /tmp/extra.pid").0 == 0);
    assert_eq!(vm.guest("kill $(cat /tmp/extra.pid)").0, 0);
    wait_until("the host port closes", || refused(loopback(false, extra)));

    // The agent restarting inside the VM (its init restarts it): forwards resync.
    assert_eq!(vm.guest("killall hostnet-agent").0, 0);
    let killed = Instant::now();
    wait_until("the proxy sees the agent go", || vm.status()["agent"] != "connected");
    let (c, _) = connect_when_forwarded(loopback(false, vm::GUEST_ECHO_PORT));
    eprintln!("agent killed → forwarding again: {:?}", killed.elapsed());
    assert_eq!(echo_round_trip(c, b"after restart"), b"after restart");

    // The VM going away: the proxy stays up and says so.
    let qemu = format!("qemu-system-x86_64 .*{}/vhu.sock", vm.run.display());
    assert!(Command::new("pkill").args(["-f", &qemu]).status().unwrap().success(), "QEMU was running");
    wait_until("the proxy reports the agent gone", || vm.status()["agent"] == "disconnected");
    wait_until("forwarded ports close", || refused(loopback(false, vm::GUEST_ECHO_PORT)));
    assert!(vm.status()["enabled"] == true, "the proxy still answers");
}

/// `installer/run-vm` refuses an accelerator it does not know, before it starts anything.
#[test]
fn run_vm_refuses_an_unknown_accelerator() {
    hostnet_tests::require_root();
    let out = vm::run_vm().env("HOSTNET_VM_ACCEL", "bogus").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("HOSTNET_VM_ACCEL=bogus: expected kvm, tcg or auto"), "{stderr}");
    assert!(!stderr.contains("starting the vsock backend"), "nothing is started: {stderr}");
}
