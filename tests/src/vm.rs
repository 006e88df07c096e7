//! The real VM: hostnet's guest image booted under QEMU (KVM where the machine has hardware
//! virtualization, else TCG: [`Vm::accel`]) with virtio-vsock, the agent
//! started by the image's init, `hostnet-proxy run` on the host over hybrid vsock — driven
//! through `installer/run-vm`, exactly as a person would. Used by `tests/vm.rs` and by the
//! benchmark's `vm` workload (hostnet against the raw vsock link it runs on).
//!
//! Needs root, QEMU and vhost-device-vsock (`installer/vm-tools`) and the guest image
//! (`installer/build-guest-image`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{
    DEADLINE, bin, bulk_download, bulk_serve, bulk_upload, free_port, loopback, require_root, wait_until,
};

/// Booting under TCG takes seconds; give it room on a loaded machine.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(180);
/// The image's echo service (TCP and UDP).
pub const GUEST_ECHO_PORT: u16 = 8007;
/// The same echo service on a vsock port: the raw link's side of round trips and new
/// connections.
pub const GUEST_ECHO_VSOCK_PORT: u32 = 1103;
/// The image's bulk-transfer service: TCP (reached through hostnet) and vsock (the raw link).
pub const GUEST_BULK_PORT: u16 = 8008;
pub const GUEST_BULK_VSOCK_PORT: u32 = 1101;
/// The host vsock port a guest program reaches the desktop's bulk service on over the raw link
/// (hybrid vsock hands it to `<socket>_1102`); through hostnet it is `127.0.0.1:P` instead.
pub const HOST_BULK_VSOCK_PORT: u32 = 1102;
/// The host vsock port a guest program reaches the desktop's echo service on over the raw link
/// (`<socket>_1104`); through hostnet it is `127.0.0.1:P`.
pub const HOST_ECHO_VSOCK_PORT: u32 = 1104;
/// Bytes per timed transfer.
pub const BULK_BYTES: u64 = 32 << 20;

/// The repository's root (the guest image and the tools live in its `target/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// `installer/run-vm` with this build's proxy, as a person runs it.
pub fn run_vm() -> Command {
    let mut cmd = Command::new(root().join("installer/run-vm"));
    cmd.env("HOSTNET_PROXY", bin("hostnet-proxy")).stdin(Stdio::null());
    cmd
}

/// Why the VM cannot boot here, if it cannot: the guest image or the vsock backend missing.
pub fn missing() -> Option<String> {
    let root = root();
    if !root.join("target/guest-image/initrd.img").is_file() {
        return Some("the guest image is missing: run installer/build-guest-image".into());
    }
    if !root.join("target/tools/bin/vhost-device-vsock").is_file() {
        return Some("vhost-device-vsock is missing: run installer/vm-tools".into());
    }
    None
}

/// A booted VM with hostnet's proxy forwarding its ports; dropping it stops both.
#[derive(Debug)]
pub struct Vm {
    child: Option<Child>,
    pub run: PathBuf,
}

impl Vm {
    /// Boots the VM with `hostnet-proxy` of this build; returns once a port is forwarded, and
    /// how long that took. What `run-vm` and the proxy print goes to this process's stderr.
    pub fn start() -> (Vm, Duration) {
        Self::start_with(false)
    }

    /// [`Vm::start`], keeping what `run-vm` and the proxy print in `run-vm.log` of the run
    /// directory (shown only if the caller panics) — for the benchmark's table.
    pub fn start_quiet() -> (Vm, Duration) {
        Self::start_with(true)
    }

    fn start_with(quiet: bool) -> (Vm, Duration) {
        require_root();
        let root = root();
        assert!(
            root.join("target/guest-image/initrd.img").is_file(),
            "the guest image is missing: run installer/build-guest-image (the README's test command does)"
        );
        let run = std::env::temp_dir().join(format!("hostnet-vm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).unwrap();
        let log = run.join("run-vm.log");
        let stderr = if quiet { Stdio::from(std::fs::File::create(&log).unwrap()) } else { Stdio::inherit() };
        let started = Instant::now();
        let mut child =
            run_vm().env("HOSTNET_VM_RUN", &run).stdout(Stdio::piped()).stderr(stderr).spawn().unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !quiet {
                    eprintln!("run-vm: {line}");
                }
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

    /// How QEMU runs the guest, as `run-vm` chose (`HOSTNET_VM_ACCEL`): `KVM` or `TCG`. Under
    /// TCG the emulated guest is the slow end of every path; the figures compare paths on one
    /// accelerator, never across.
    pub fn accel(&self) -> String {
        let chosen = std::fs::read_to_string(self.run.join("accel")).unwrap_or_default();
        match chosen.trim() {
            "" => "an unknown accelerator".to_owned(),
            a => a.to_uppercase(),
        }
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.run.join("console.log")).unwrap_or_default()
    }

    /// The pid of `run-vm` (its children: the proxy, QEMU and the vsock backend).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// CPU-seconds QEMU has used so far: the guest's whole work (under KVM its virtual CPUs'
    /// time counts as QEMU's too), which a
    /// transfer's share of shows what it costs the guest, less bent by this machine's load
    /// than its rate.
    pub fn guest_cpu_seconds(&self) -> f64 {
        let Some(qemu) = self.pid().and_then(|p| {
            descendants(p).into_iter().find(|&c| {
                std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|n| n.starts_with("qemu-system"))
            })
        }) else {
            return 0.0;
        };
        let stat = std::fs::read_to_string(format!("/proc/{qemu}/stat")).unwrap_or_default();
        // After the `(comm)`: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest.split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
        let ticks = f.get(14 - 4).copied().unwrap_or(0) + f.get(15 - 4).copied().unwrap_or(0);
        // SAFETY: sysconf reads a constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
        ticks as f64 / hz as f64
    }

    /// A raw hybrid-vsock connection to guest vsock port `port`: `CONNECT`, then `OK …`.
    pub fn vsock(&self, port: u32) -> UnixStream {
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
    pub fn guest(&self, cmd: &str) -> (i32, String) {
        let mut s = self.vsock(1100);
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let (body, code) = out.rsplit_once("EXIT ").unwrap_or((&out, "-1"));
        (code.trim().parse().unwrap_or(-1), body.to_owned())
    }

    /// One timed bulk transfer of [`BULK_BYTES`] by a program in the guest to a desktop server
    /// at `to` (`tcp:…` or `vsock:…`), `upload` meaning guest → desktop; the guest's own timing.
    pub fn guest_transfer(&self, to: &str, upload: bool) -> Duration {
        let dir = if upload { "upload" } else { "download" };
        let (code, out) =
            self.guest(&format!("hostnet-guest-helper bulk-client --to {to} --{dir} --bytes {BULK_BYTES}"));
        assert_eq!(code, 0, "guest {dir} over {to}: {out}");
        let words: Vec<&str> = out.split_whitespace().collect();
        let [_, bytes, _, _, nanos, _] = words.as_slice() else { panic!("guest {dir} over {to}: {out}") };
        assert_eq!(bytes.parse::<u64>().unwrap(), BULK_BYTES, "guest {dir} over {to}: bytes accounted for");
        Duration::from_nanos(nanos.parse().unwrap())
    }

    /// Records the guest kernel's trace `events` (tracefs names, space-separated, e.g.
    /// `sched:sched_switch sched:sched_waking vsock:*`) while `f` runs; returns what `f` did and
    /// the trace's text. How a real VM path's time is found from the inside: the guest has
    /// tracefs but no `perf` (`docs/performance.md`, round eleven: a sleeping vsock `accept`).
    pub fn guest_trace<T>(&self, events: &str, f: impl FnOnce() -> T) -> (T, String) {
        let (code, out) = self.guest(&format!(
            "grep -q ' /sys/kernel/tracing ' /proc/mounts || mount -t tracefs nodev /sys/kernel/tracing; \
             cd /sys/kernel/tracing && echo 0 > tracing_on && echo 16384 > buffer_size_kb && echo > trace \
             && echo '{events}' > set_event && echo 1 > tracing_on"
        ));
        assert_eq!(code, 0, "starting the guest's trace of {events:?}: {out}");
        let done = f();
        let (code, trace) =
            self.guest("cd /sys/kernel/tracing && echo 0 > tracing_on && cat trace && echo > set_event");
        assert_eq!(code, 0, "reading the guest's trace: {trace}");
        (done, trace)
    }

    /// `count` timed one-byte exchanges with the guest's echo service through hostnet (TCP
    /// 8007): each on a new connection, or with `round_trips` all on one; the latencies.
    pub fn echo_latencies(&self, count: usize, round_trips: bool) -> Vec<Duration> {
        let connect = echo_through_hostnet();
        let mut open = round_trips.then(&connect);
        (0..count)
            .map(|_| {
                let t = Instant::now();
                match open.as_mut() {
                    Some(c) => one_byte_round_trip(c),
                    None => one_byte_round_trip(&mut connect()),
                }
                t.elapsed()
            })
            .collect()
    }

    /// `hostnet-proxy status --json` of the VM's proxy.
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(bin("hostnet-proxy"))
            .arg("--admin-socket")
            .arg(self.run.join("admin").join("admin.sock"))
            .args(["status", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// Bulk transfers between a desktop client and the guest's bulk service, through hostnet
    /// and over the raw vsock link, `rounds` times each, interleaved.
    pub fn desktop_client_transfers(
        &self,
        rounds: usize,
        mut each: impl FnMut(usize, &Transfers),
    ) -> Transfers {
        let bulk = loopback(false, GUEST_BULK_PORT);
        wait_until("the bulk port is forwarded", || TcpStream::connect_timeout(&bulk, DEADLINE).is_ok());
        let through_hostnet = || {
            let c = TcpStream::connect(bulk).unwrap();
            c.set_read_timeout(Some(DEADLINE)).unwrap();
            c
        };
        let raw = || self.vsock(GUEST_BULK_VSOCK_PORT);
        let mut t = Transfers::default();
        for round in 1..=rounds {
            t.raw_in.push(
                self.costed(&mut t.guest_cpu[0], || timed_transfer("raw vsock, host → guest", raw, true)),
            );
            t.hostnet_in.push(self.costed(&mut t.guest_cpu[1], || {
                timed_transfer("hostnet, host → guest", through_hostnet, true)
            }));
            t.raw_out.push(
                self.costed(&mut t.guest_cpu[2], || timed_transfer("raw vsock, guest → host", raw, false)),
            );
            t.hostnet_out.push(self.costed(&mut t.guest_cpu[3], || {
                timed_transfer("hostnet, guest → host", through_hostnet, false)
            }));
            each(round, &t);
        }
        t
    }

    /// A desktop bulk service (TCP on `127.0.0.1`, and the raw link's host vsock port
    /// [`HOST_BULK_VSOCK_PORT`]), serving for as long as this process runs; returns the
    /// `bulk-client --to` targets `(through hostnet, raw vsock)`.
    pub fn serve_desktop_bulk(&self) -> (String, String) {
        let port = free_port();
        let desktop = TcpListener::bind(("127.0.0.1", port)).unwrap();
        serve_forever(move || desktop.accept().map(|(c, _)| c), bulk_serve);
        let desktop_vsock =
            UnixListener::bind(self.run.join(format!("vm.vsock_{HOST_BULK_VSOCK_PORT}"))).unwrap();
        serve_forever(move || desktop_vsock.accept().map(|(c, _)| c), bulk_serve);
        (format!("tcp:127.0.0.1:{port}"), format!("vsock:2:{HOST_BULK_VSOCK_PORT}"))
    }

    /// A desktop echo service (TCP on `127.0.0.1`, and the raw link's host vsock port
    /// [`HOST_ECHO_VSOCK_PORT`]), serving for as long as this process runs, once a guest program
    /// reaches it through hostnet; returns the `conn-client --to` targets `(through hostnet, raw
    /// vsock)`.
    pub fn serve_desktop_echo(&self) -> (String, String) {
        let port = free_port();
        let desktop = TcpListener::bind(("127.0.0.1", port)).unwrap();
        serve_forever(move || desktop.accept().map(|(c, _)| c), crate::echo);
        let desktop_vsock =
            UnixListener::bind(self.run.join(format!("vm.vsock_{HOST_ECHO_VSOCK_PORT}"))).unwrap();
        serve_forever(move || desktop_vsock.accept().map(|(c, _)| c), crate::echo);
        let through_hostnet = format!("tcp:127.0.0.1:{port}");
        wait_until("the guest reaches the desktop's echo service", || {
            self.guest(&format!("hostnet-guest-helper conn-client --to {through_hostnet} --count 1")).0 == 0
        });
        (through_hostnet, format!("vsock:2:{HOST_ECHO_VSOCK_PORT}"))
    }

    /// New connections from a guest program to a desktop echo service ([`Vm::serve_desktop_echo`])
    /// — connect, a 1-byte request, its answer, close — `per_round` on each path in each of
    /// `rounds` rounds that alternate them; `[raw, hostnet]`, timed on the guest's clock.
    pub fn guest_client_connections(
        &self,
        (through_hostnet, raw): &(String, String),
        per_round: usize,
        rounds: usize,
    ) -> [Vec<Duration>; 2] {
        let mut out: [Vec<Duration>; 2] = Default::default();
        for _ in 0..rounds.max(1) {
            out[0].extend(self.guest_connections(raw, per_round));
            out[1].extend(self.guest_connections(through_hostnet, per_round));
        }
        out
    }

    /// `count` new connections from a guest program to the echo service at `to` (`tcp:…`,
    /// `vsock:…`), one after another; each one's time on the guest's clock.
    pub fn guest_connections(&self, to: &str, count: usize) -> Vec<Duration> {
        let (code, out) = self.guest(&format!("hostnet-guest-helper conn-client --to {to} --count {count}"));
        assert_eq!(code, 0, "guest connections to {to}: {out}");
        let line = out.lines().find_map(|l| l.strip_prefix("conn-client: ")).unwrap_or_default();
        let times: Vec<Duration> =
            line.split_whitespace().map(|us| Duration::from_micros(us.parse().unwrap())).collect();
        assert_eq!(times.len(), count, "guest connections to {to}: {out}");
        times
    }

    /// Bulk transfers between a guest program and a desktop service ([`Vm::serve_desktop_bulk`]),
    /// through hostnet and over the raw vsock link, `rounds` times each, interleaved; timed on
    /// the guest's clock.
    pub fn guest_client_transfers(
        &self,
        (through_hostnet, raw): &(String, String),
        rounds: usize,
        mut each: impl FnMut(usize, &Transfers),
    ) -> Transfers {
        wait_until("the guest reaches the desktop's bulk service", || {
            self.guest(&format!("hostnet-guest-helper bulk-client --to {through_hostnet} --upload --bytes 1"))
                .0
                == 0
        });
        let mut t = Transfers::default();
        for round in 1..=rounds {
            t.raw_in.push(self.costed(&mut t.guest_cpu[0], || self.guest_transfer(raw, false)));
            t.hostnet_in
                .push(self.costed(&mut t.guest_cpu[1], || self.guest_transfer(through_hostnet, false)));
            t.raw_out.push(self.costed(&mut t.guest_cpu[2], || self.guest_transfer(raw, true)));
            t.hostnet_out
                .push(self.costed(&mut t.guest_cpu[3], || self.guest_transfer(through_hostnet, true)));
            each(round, &t);
        }
        t
    }
}

/// Round trips and new connections between a desktop client and the guest's echo service,
/// through hostnet and over the raw vsock link: `[raw, hostnet]` each.
#[derive(Debug, Default)]
pub struct Interactive {
    /// One-byte round trips on one open connection.
    pub trips: [Vec<Duration>; 2],
    /// New connections: connect (for the raw link, hybrid vsock's `CONNECT`), a 1-byte request,
    /// its answer, close.
    pub connections: [Vec<Duration>; 2],
    /// Guest CPU-seconds (QEMU's) over all of each path's new connections.
    pub connection_cpu: [f64; 2],
}

impl Interactive {
    /// The median round trip and new connection, and the guest's CPU per connection, as
    /// `[raw, hostnet]` pairs (µs, µs, µs).
    pub fn medians(&self) -> [[f64; 2]; 3] {
        let us = |v: &Vec<Duration>| median(v).as_secs_f64() * 1e6;
        let per = |i: usize| self.connection_cpu[i] * 1e6 / self.connections[i].len().max(1) as f64;
        [self.trips.each_ref().map(us), self.connections.each_ref().map(us), [per(0), per(1)]]
    }
}

impl Vm {
    /// `trips` one-byte round trips and `connections` new connections to the guest's echo
    /// service on each path, in `rounds` rounds that alternate the paths (each byte checked).
    pub fn desktop_client_interactive(&self, trips: usize, connections: usize, rounds: usize) -> Interactive {
        let connect = echo_through_hostnet();
        let through_hostnet = || -> Box<dyn ReadWrite> { Box::new(connect()) };
        let raw = || -> Box<dyn ReadWrite> { Box::new(self.vsock(GUEST_ECHO_VSOCK_PORT)) };
        let paths: [&dyn Fn() -> Box<dyn ReadWrite>; 2] = [&raw, &through_hostnet];
        let mut open = paths.map(|p| p());
        for s in &mut open {
            for _ in 0..20 {
                one_byte_round_trip(s.as_mut());
            }
        }
        let mut out = Interactive::default();
        let rounds = rounds.max(1);
        for _ in 0..rounds {
            for (i, s) in open.iter_mut().enumerate() {
                for _ in 0..trips / rounds {
                    let t = Instant::now();
                    one_byte_round_trip(s.as_mut());
                    out.trips[i].push(t.elapsed());
                }
            }
            for (i, path) in paths.iter().enumerate() {
                let mut cpu = 0.0;
                let made = self.costed(&mut cpu, || {
                    (0..connections / rounds)
                        .map(|_| {
                            let t = Instant::now();
                            one_byte_round_trip(path().as_mut());
                            t.elapsed()
                        })
                        .collect::<Vec<_>>()
                });
                out.connections[i].extend(made);
                out.connection_cpu[i] += cpu;
            }
        }
        out
    }

    /// Runs `f`, adding the guest CPU-seconds it took to `cpu`.
    fn costed<T>(&self, cpu: &mut f64, f: impl FnOnce() -> T) -> T {
        let before = self.guest_cpu_seconds();
        let out = f();
        *cpu += self.guest_cpu_seconds() - before;
        out
    }
}

/// Once the guest's echo port is forwarded: a connector to it through hostnet (`TCP_NODELAY`,
/// reads bounded by [`DEADLINE`]).
fn echo_through_hostnet() -> impl Fn() -> TcpStream {
    let echo = loopback(false, GUEST_ECHO_PORT);
    wait_until("the echo port is forwarded", || TcpStream::connect_timeout(&echo, DEADLINE).is_ok());
    move || {
        let c = TcpStream::connect(echo).unwrap();
        c.set_nodelay(true).unwrap();
        c.set_read_timeout(Some(DEADLINE)).unwrap();
        c
    }
}

/// Every process below `pid` (through every thread's `children` list).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for t in std::fs::read_dir(format!("/proc/{p}/task")).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in text.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
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
                let log = std::fs::read_to_string(self.run.join("run-vm.log")).unwrap_or_default();
                eprintln!("--- run-vm (quiet) ---\n{log}\n--- guest console ---\n{}", self.console());
            }
        }
        let _ = std::fs::remove_dir_all(&self.run);
    }
}

/// Timings of [`BULK_BYTES`] transfers, host → guest ("in") and guest → host ("out"), over the
/// raw vsock link and through hostnet.
#[derive(Debug, Default, Clone)]
pub struct Transfers {
    pub raw_in: Vec<Duration>,
    pub hostnet_in: Vec<Duration>,
    pub raw_out: Vec<Duration>,
    pub hostnet_out: Vec<Duration>,
    /// QEMU's CPU-seconds during all the transfers of each path, in the order of
    /// [`Transfers::medians`].
    pub guest_cpu: [f64; 4],
}

impl Transfers {
    /// MiB/s of the median transfer: `[raw in, hostnet in, raw out, hostnet out]`.
    pub fn medians(&self) -> [f64; 4] {
        [&self.raw_in, &self.hostnet_in, &self.raw_out, &self.hostnet_out].map(|t| mib_per_s(median(t)))
    }

    /// The guest's CPU (QEMU's) per MiB moved, in milliseconds, in the same order.
    pub fn guest_cpu_ms_per_mib(&self) -> [f64; 4] {
        let rounds = self.raw_in.len().max(1) as f64;
        let mib = rounds * BULK_BYTES as f64 / f64::from(1u32 << 20);
        self.guest_cpu.map(|c| c * 1000.0 / mib)
    }

    /// MiB/s of the latest round, in the same order.
    pub fn last(&self) -> [f64; 4] {
        [&self.raw_in, &self.hostnet_in, &self.raw_out, &self.hostnet_out]
            .map(|t| t.last().map_or(0.0, |d| mib_per_s(*d)))
    }
}

/// A TCP or hybrid-vsock stream, boxed alike.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Sends one byte and reads its echo.
fn one_byte_round_trip(s: &mut dyn ReadWrite) {
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x", "the echo");
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

pub fn mib_per_s(d: Duration) -> f64 {
    BULK_BYTES as f64 / f64::from(1u32 << 20) / d.as_secs_f64()
}

/// The middle one of `v` (the upper of the two middle ones for an even count).
pub fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or(Duration::MAX)
}

/// Every connection `accept` yields (TCP or Unix) gets `serve` on a thread of its own, for the
/// rest of the process.
fn serve_forever<S: Read + Write + Send + 'static>(
    accept: impl Fn() -> std::io::Result<S> + Send + 'static,
    serve: fn(S),
) {
    std::thread::spawn(move || {
        while let Ok(c) = accept() {
            std::thread::spawn(move || serve(c));
        }
    });
}
