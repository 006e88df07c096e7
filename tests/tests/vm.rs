//! The real VM: hostnet's guest image booted under QEMU (TCG) with virtio-vsock, the agent
//! started by the image's init, `hostnet-proxy run` on the host over hybrid vsock — driven
//! through `installer/run-vm`, exactly as a person would.
//!
//! Needs root, QEMU and vhost-device-vsock (`installer/vm-tools`) and the guest image
//! (`installer/build-guest-image`); the README's test command provides all three.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hostnet_tests::*;

/// Booting under TCG takes seconds; give it room on a loaded machine.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
const GUEST_ECHO_PORT: u16 = 8007;
/// The image's bulk-transfer service: TCP (reached through hostnet) and vsock (the raw link).
const GUEST_BULK_PORT: u16 = 8008;
const GUEST_BULK_VSOCK_PORT: u32 = 1101;
/// The host vsock port a guest program reaches the desktop's bulk service on over the raw link
/// (hybrid vsock hands it to `<socket>_1102`); through hostnet it is `127.0.0.1:P` instead.
const HOST_BULK_VSOCK_PORT: u32 = 1102;
/// Bytes per timed transfer, and how many rounds of each (the median is reported).
const BULK_BYTES: u64 = 32 << 20;
const BULK_ROUNDS: usize = 3;

struct Vm {
    child: Option<Child>,
    run: PathBuf,
}

impl Vm {
    fn start() -> (Vm, Duration) {
        require_root();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
        assert!(
            root.join("target/guest-image/initrd.img").is_file(),
            "the guest image is missing: run installer/build-guest-image (the README's test command does)"
        );
        let run = std::env::temp_dir().join(format!("hostnet-vm-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let started = Instant::now();
        let mut child = Command::new(root.join("installer/run-vm"))
            .env("HOSTNET_VM_RUN", &run)
            .env("HOSTNET_PROXY", bin("hostnet-proxy"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("run-vm: {line}");
                let _ = tx.send(line);
            }
        });
        let vm = Vm { child: Some(child), run };
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.contains("ready") => break,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("run-vm exited before ready:\n{}", vm.console())
                }
            }
            assert!(
                started.elapsed() < BOOT_DEADLINE,
                "no `ready` within {BOOT_DEADLINE:?}:\n{}",
                vm.console()
            );
        }
        (vm, started.elapsed())
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.run.join("console.log")).unwrap_or_default()
    }

    /// A raw hybrid-vsock connection to guest vsock port `port`: `CONNECT`, then `OK …`.
    fn vsock(&self, port: u32) -> UnixStream {
        let mut s = UnixStream::connect(self.run.join("vm.vsock")).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        // Byte by byte: whatever follows the line is the guest's.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < 64 && s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        assert!(line.starts_with(b"OK "), "guest vsock port {port}: {:?}", String::from_utf8_lossy(&line));
        s
    }

    /// Runs a shell command in the guest through the test image's vsock command channel.
    fn guest(&self, cmd: &str) -> (i32, String) {
        let mut s = self.vsock(1100);
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let (body, code) = out.rsplit_once("EXIT ").unwrap_or((&out, "-1"));
        (code.trim().parse().unwrap_or(-1), body.to_owned())
    }

    /// One timed bulk transfer of [`BULK_BYTES`] by a program in the guest to a desktop server
    /// at `to` (`tcp:…` or `vsock:…`), `upload` meaning guest → desktop; the guest's own timing.
    fn guest_transfer(&self, to: &str, upload: bool) -> Duration {
        let dir = if upload { "upload" } else { "download" };
        let (code, out) =
            self.guest(&format!("hostnet-guest-helper bulk-client --to {to} --{dir} --bytes {BULK_BYTES}"));
        assert_eq!(code, 0, "guest {dir} over {to}: {out}");
        let words: Vec<&str> = out.split_whitespace().collect();
        let [_, bytes, _, _, nanos, _] = words.as_slice() else { panic!("guest {dir} over {to}: {out}") };
        assert_eq!(bytes.parse::<u64>().unwrap(), BULK_BYTES, "guest {dir} over {to}: bytes accounted for");
        Duration::from_nanos(nanos.parse().unwrap())
    }

    /// `hostnet-proxy status --json` of the VM's proxy.
    fn status(&self) -> serde_json::Value {
        let out = Command::new(bin("hostnet-proxy"))
            .arg("--admin-socket")
            .arg(self.run.join("admin").join("admin.sock"))
            .args(["status", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let start = Instant::now();
            while start.elapsed() < DEADLINE && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            if std::thread::panicking() {
                eprintln!("--- guest console ---\n{}", self.console());
            }
        }
        let _ = std::fs::remove_dir_all(&self.run);
    }
}

/// One timed bulk transfer of [`BULK_BYTES`]: the clock runs from before the connect (and the
/// hybrid-vsock handshake) until the last byte is accounted for, on every path alike.
fn timed_transfer<S: Read + Write>(what: &str, open: impl FnOnce() -> S, upload: bool) -> Duration {
    let t = Instant::now();
    let mut s = open();
    let got = if upload { bulk_upload(&mut s, BULK_BYTES) } else { bulk_download(&mut s, BULK_BYTES) };
    let elapsed = t.elapsed();
    assert_eq!(got, BULK_BYTES, "{what}: bytes accounted for");
    elapsed
}

fn mib_per_s(d: Duration) -> f64 {
    BULK_BYTES as f64 / f64::from(1u32 << 20) / d.as_secs_f64()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Every connection `accept` yields (TCP or Unix) gets [`bulk_serve`], for the rest of the test.
fn serve_bulk_forever<S: Read + Write + Send + 'static>(
    accept: impl Fn() -> std::io::Result<S> + Send + 'static,
) {
    std::thread::spawn(move || {
        while let Ok(c) = accept() {
            std::thread::spawn(move || bulk_serve(c));
        }
    });
}

/// Timings are `[raw host → guest, hostnet host → guest, raw guest → host, hostnet guest → host]`.
fn report_round(what: &str, round: usize, times: &[Vec<Duration>; 4]) {
    let [a, b, c, d] = times.each_ref().map(|t| mib_per_s(*t.last().unwrap()));
    eprintln!(
        "throughput round {round}, {what}: host → guest raw {a:.1} / hostnet {b:.1} MiB/s; guest → host raw {c:.1} / hostnet {d:.1} MiB/s"
    );
}

fn report(what: &str, times: &[Vec<Duration>; 4]) {
    let [raw_in, net_in, raw_out, net_out] = times.clone().map(|t| mib_per_s(median(t)));
    eprintln!(
        "throughput over the real VM (TCG), {what}, {} MiB per transfer, median of {BULK_ROUNDS}:",
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
    let (c, _) = connect_when_forwarded(loopback(false, GUEST_ECHO_PORT));
    let data = pattern(4 << 20, 8007);
    let t = Instant::now();
    assert!(echo_round_trip(c, &data) == data, "4 MiB echoed byte-exact over the real VM");
    eprintln!("4 MiB TCP echo through the VM: {:?}", t.elapsed());

    // Desktop → guest UDP.
    wait_until("the UDP port is forwarded", || udp_port_taken(loopback(false, GUEST_ECHO_PORT)));
    let u = udp_client(loopback(false, GUEST_ECHO_PORT));
    for len in [1, 1400, 9000] {
        let d = pattern(len, len as u64);
        assert_eq!(udp_echo(&u, &d), Some(d), "{len}-byte datagram");
    }

    // Throughput: the same bytes through hostnet and over the raw vsock link, the same guest
    // service behind both, the same clock. Figures are printed, not asserted (TCG is no perf
    // bed); only the byte counts are checked.
    let bulk = loopback(false, GUEST_BULK_PORT);
    wait_until("the bulk port is forwarded", || TcpStream::connect_timeout(&bulk, DEADLINE).is_ok());
    let through_hostnet = || {
        let c = TcpStream::connect(bulk).unwrap();
        c.set_read_timeout(Some(DEADLINE)).unwrap();
        c
    };
    let raw = || vm.vsock(GUEST_BULK_VSOCK_PORT);
    let mut times: [Vec<Duration>; 4] = Default::default();
    for round in 1..=BULK_ROUNDS {
        times[0].push(timed_transfer("raw vsock, host → guest", raw, true));
        times[1].push(timed_transfer("hostnet, host → guest", through_hostnet, true));
        times[2].push(timed_transfer("raw vsock, guest → host", raw, false));
        times[3].push(timed_transfer("hostnet, guest → host", through_hostnet, false));
        report_round("desktop client ↔ guest server", round, &times);
    }
    report("desktop client ↔ guest server", &times);

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
    let port = free_port();
    let desktop = TcpListener::bind(("127.0.0.1", port)).unwrap();
    serve_bulk_forever(move || desktop.accept().map(|(c, _)| c));
    let desktop_vsock = UnixListener::bind(vm.run.join(format!("vm.vsock_{HOST_BULK_VSOCK_PORT}"))).unwrap();
    serve_bulk_forever(move || desktop_vsock.accept().map(|(c, _)| c));
    let through_hostnet = format!("tcp:127.0.0.1:{port}");
    let raw = format!("vsock:2:{HOST_BULK_VSOCK_PORT}");
    wait_until("the guest reaches the desktop's bulk service", || {
        vm.guest(&format!("hostnet-guest-helper bulk-client --to {through_hostnet} --upload --bytes 1")).0
            == 0
    });
    let mut times: [Vec<Duration>; 4] = Default::default();
    for round in 1..=BULK_ROUNDS {
        times[0].push(vm.guest_transfer(&raw, false));
        times[1].push(vm.guest_transfer(&through_hostnet, false));
        times[2].push(vm.guest_transfer(&raw, true));
        times[3].push(vm.guest_transfer(&through_hostnet, true));
        report_round("guest client ↔ desktop server", round, &times);
    }
    report("guest client ↔ desktop server", &times);

    // A listener appearing and disappearing in the guest.
    let extra = 9107;
    let (code, out) = vm.guest(&format!(
        "setsid sh -c 'echo $$ > /tmp/extra.pid; exec hostnet-guest-helper echo --tcp {extra} --udp {extra}' </dev/null >/dev/null 2>&1 &"
    ));
    assert_eq!(code, 0, "{out}");
    let (c, appeared) = connect_when_forwarded(loopback(false, extra));
    eprintln!("guest listen → usable on the host (under TCG): {appeared:?}");
    assert_eq!(echo_round_trip(c, b"new listener"), b"new listener");
    wait_until("the extra server wrote its pid", || vm.guest("test -s /tmp/extra.pid").0 == 0);
    assert_eq!(vm.guest("kill $(cat /tmp/extra.pid)").0, 0);
    wait_until("the host port closes", || refused(loopback(false, extra)));

    // The agent restarting inside the VM (its init restarts it): forwards resync.
    assert_eq!(vm.guest("killall hostnet-agent").0, 0);
    let killed = Instant::now();
    wait_until("the proxy sees the agent go", || vm.status()["agent"] != "connected");
    let (c, _) = connect_when_forwarded(loopback(false, GUEST_ECHO_PORT));
    eprintln!("agent killed → forwarding again: {:?}", killed.elapsed());
    assert_eq!(echo_round_trip(c, b"after restart"), b"after restart");

    // The VM going away: the proxy stays up and says so.
    let qemu = format!("qemu-system-x86_64 .*{}/vhu.sock", vm.run.display());
    assert!(Command::new("pkill").args(["-f", &qemu]).status().unwrap().success(), "QEMU was running");
    wait_until("the proxy reports the agent gone", || vm.status()["agent"] == "disconnected");
    wait_until("forwarded ports close", || refused(loopback(false, GUEST_ECHO_PORT)));
    assert!(vm.status()["enabled"] == true, "the proxy still answers");
}
