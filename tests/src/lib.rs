//! A small harness for black-box tests: it drives the real `hostnet-proxy demo` (which starts
//! the real `hostnet-agent`) and plays both the "container" (sockets opened inside the demo's
//! network namespace) and the "desktop" (plain sockets on this machine's loopback).
//!
//! Every wait has a deadline; nothing sleeps and hopes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::print_stdout)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, SockRef, Socket, Type};

pub mod vm;

/// The longest any single condition is waited for.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Path of a binary of this workspace, built by `cargo build` into the same target dir.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test-binary>, or target/<profile>/<harness binary>
    let mut dir = exe.parent().unwrap();
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (`cargo build --workspace`; the README's test command does this)",
        path.display()
    );
    path
}

/// These tests create network namespaces: they need root, and say so.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it creates network namespaces); run the README's test command as root"
    );
}

/// A port number no other test of this run uses and that is free on the host right now.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 80) as u16 * 100,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_000, "ran out of test ports");
        let v4 = can_bind(SocketAddr::from(([127, 0, 0, 1], port)));
        let v6 = can_bind(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))) || !has_ipv6();
        if v4 && v6 {
            return port;
        }
    }
}

/// A free port and listeners holding it on this machine's `127.0.0.1` (and `::1`), as
/// "another program" would. Tries further ports if one is taken between check and bind.
pub fn hold_port() -> (u16, Vec<TcpListener>) {
    loop {
        let port = free_port();
        let mut held = Vec::new();
        let families: &[bool] = if has_ipv6() { &[false, true] } else { &[false] };
        for &v6 in families {
            if let Ok(l) = TcpListener::bind(loopback(v6, port)) {
                held.push(l);
            }
        }
        if held.len() == families.len() {
            return (port, held);
        }
    }
}

/// Whether this machine has an IPv6 loopback.
pub fn has_ipv6() -> bool {
    can_bind(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)))
}

/// Whether a TCP socket can be bound to `addr` now (as `TcpListener::bind` would, with
/// `SO_REUSEADDR`), asked with a socket that never listens: a listener, even for a moment, is a
/// desktop server to the proxy under test — it watches every listener on the machine — and
/// would be offered to its guest until the proxy saw it gone (a containment test once found a
/// port offered that way under load).
fn can_bind(addr: SocketAddr) -> bool {
    let Ok(s) = Socket::new(Domain::for_address(addr), Type::STREAM, None) else { return false };
    let _ = s.set_reuse_address(true);
    s.bind(&addr.into()).is_ok()
}

/// Waits for `cond` to hold, polling every millisecond, for at most [`DEADLINE`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out after {DEADLINE:?} waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
    start.elapsed()
}

/// The Windows build of `hostnet-proxy` (x86_64-pc-windows-gnu) and how Wine runs it: what
/// `demo --windows` puts on the desktop side.
#[derive(Debug, Clone)]
pub struct WindowsProxy {
    pub exe: PathBuf,
    /// A Wine prefix kept in the target directory (made once, ~10 s; later starts ~2 s).
    pub prefix: PathBuf,
}

impl WindowsProxy {
    /// The debug build next to this run's binaries; it must be there (`./dev.sh test` builds
    /// it, with the DLL Wine 8 needs beside it).
    pub fn built() -> WindowsProxy {
        let target = bin("hostnet-proxy").parent().unwrap().parent().unwrap().to_owned();
        let exe = target.join("x86_64-pc-windows-gnu/debug/hostnet-proxy.exe");
        assert!(
            exe.is_file() && exe.with_file_name("bcryptprimitives.dll").is_file(),
            "{} (and bcryptprimitives.dll beside it) is missing: the README's test command builds the \
             Windows proxy (./dev.sh test: build_windows)",
            exe.display()
        );
        WindowsProxy { exe, prefix: target.join("wine-prefix") }
    }

    /// `wine64 hostnet-proxy.exe` in this prefix, quiet.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("/usr/lib/wine/wine64");
        cmd.arg(&self.exe).env("WINEPREFIX", &self.prefix).env("WINEDEBUG", "-all");
        cmd
    }
}

/// A Linux path as a Windows program under Wine sees it (drive `Z:` is `/`).
pub fn windows_path(p: &Path) -> String {
    format!("Z:{}", p.display()).replace('/', "\\")
}

/// A running `hostnet-proxy demo`.
#[derive(Debug)]
pub struct Demo {
    pub netns: String,
    /// This demo's admin socket and settings file (in a directory of its own); with
    /// [`Demo::start_windows`], the admin API is a named pipe of this name.
    pub admin_socket: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// The desktop half is the Windows build under Wine.
    windows: Option<WindowsProxy>,
}

impl Demo {
    /// Starts a demo in a namespace of its own and waits for its `ready` line.
    pub fn start() -> Demo {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Demo {
        require_root();
        static N: AtomicU32 = AtomicU32::new(0);
        let netns = format!("hn-t{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        Self::start_named(&netns, extra).unwrap_or_else(|e| panic!("demo did not start: {e}"))
    }

    /// Starts a demo on `netns`; `Err` carries its log if it exited instead of becoming ready.
    pub fn start_named(netns: &str, extra: &[&str]) -> Result<Demo, String> {
        let mut args: Vec<std::ffi::OsString> = vec!["demo".into(), "--netns".into(), netns.into()];
        args.extend(extra.iter().map(Into::into));
        Self::launch(netns, "demo", args)
    }

    /// Starts `demo --windows` in a namespace of its own: the desktop half is `proxy` under
    /// Wine, its admin API a named pipe (`\\.\pipe\hostnet-test-<netns>`), reached by
    /// [`Demo::cli`] through the Windows build too.
    pub fn start_windows(proxy: &WindowsProxy, extra: &[&str]) -> Demo {
        require_root();
        static N: AtomicU32 = AtomicU32::new(0);
        let netns = format!("hn-w{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let mut args: Vec<std::ffi::OsString> = vec![
            "demo".into(),
            "--netns".into(),
            netns.clone().into(),
            "--windows".into(),
            "--windows-exe".into(),
            proxy.exe.clone().into(),
            "--wine-prefix".into(),
            proxy.prefix.clone().into(),
        ];
        args.extend(extra.iter().map(Into::into));
        let pipe = PathBuf::from(format!(r"\\.\pipe\hostnet-test-{netns}"));
        Self::launch_as(&netns, "demo", args, Some(proxy.clone()), Some(pipe))
            .unwrap_or_else(|e| panic!("demo --windows did not start: {e}"))
    }

    /// Starts a plain `hostnet-proxy run` against the agent a demo left running in `netns`
    /// (after [`Demo::kill`]): the proxy restarting while the "VM" lives on. The result is a
    /// `Demo` in all but name: status, the namespace's sockets and so on work the same.
    pub fn run_against(netns: &str) -> Demo {
        let dir = Path::new("/run/hostnet").join(netns);
        let args: Vec<std::ffi::OsString> = vec![
            "run".into(),
            "--transport".into(),
            format!("unix:{}", dir.join("agent.sock").display()).into(),
            "--listen".into(),
            format!("unix:{}", dir.join("host.sock").display()).into(),
        ];
        Self::launch(netns, "run", args).unwrap_or_else(|e| panic!("the proxy did not start: {e}"))
    }

    /// Spawns `hostnet-proxy` with this demo's admin socket and settings file and `args`,
    /// and waits for its `ready` line.
    fn launch(netns: &str, what: &str, args: Vec<std::ffi::OsString>) -> Result<Demo, String> {
        Self::launch_as(netns, what, args, None, None)
    }

    fn launch_as(
        netns: &str,
        what: &str,
        args: Vec<std::ffi::OsString>,
        windows: Option<WindowsProxy>,
        admin: Option<PathBuf>,
    ) -> Result<Demo, String> {
        let log = std::env::temp_dir().join(format!("hostnet-{netns}-{what}.log"));
        let dir = std::env::temp_dir().join(format!("hostnet-{netns}"));
        std::fs::create_dir_all(&dir).unwrap();
        let admin_socket = admin.unwrap_or_else(|| dir.join("admin").join("admin.sock"));
        let config = dir.join("config").join("settings.toml");
        let mut child = Command::new(bin("hostnet-proxy"))
            .arg("--admin-socket")
            .arg(&admin_socket)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Drained to the end even once nobody listens, so the proxy's stdout never breaks.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut demo =
            Demo { netns: netns.to_owned(), admin_socket, config, child: Some(child), log, windows };
        let start = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(line) if line.contains("ready") => return Ok(demo),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = demo.child.as_mut().unwrap().wait().unwrap();
                    demo.child = None;
                    return Err(format!("{what} exited ({status}) without `ready`:\n{}", demo.log_text()));
                }
            }
            if start.elapsed() > DEADLINE {
                return Err(format!("no `ready` within {DEADLINE:?}:\n{}", demo.log_text()));
            }
        }
    }

    /// Runs `hostnet-proxy ARGS` against this demo's admin socket and settings file (the
    /// Windows build under Wine for a [`Demo::start_windows`]).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = match &self.windows {
            None => {
                let mut cmd = Command::new(bin("hostnet-proxy"));
                cmd.arg("--admin-socket").arg(&self.admin_socket).arg("--config").arg(&self.config);
                cmd
            }
            Some(w) => {
                let mut cmd = w.command();
                cmd.arg("--admin-socket")
                    .arg(&self.admin_socket)
                    .arg("--config")
                    .arg(windows_path(&self.config));
                cmd
            }
        };
        cmd.args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The `to_guest` forward of guest port `port` (`proto` "tcp" or "udp") in `status`.
    pub fn forward_status(&self, proto: &str, port: u16) -> Option<serde_json::Value> {
        let status = self.status();
        status["forwards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["direction"] == "to_guest" && f["guest_port"] == port && f["proto"] == proto)
            .cloned()
    }

    /// A number in the `to_guest` forward of `port` in `status` (0 while there is none).
    pub fn forward_count(&self, proto: &str, port: u16, key: &str) -> u64 {
        self.forward_status(proto, port).and_then(|f| f[key].as_u64()).unwrap_or(0)
    }

    /// The demo's log so far (its stderr).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        terminate(&mut child)
            .unwrap_or_else(|| panic!("demo did not stop within {DEADLINE:?}:\n{}", self.log_text()))
    }

    /// Runs `f` on a thread that has entered the demo's network namespace: sockets it creates
    /// live in the "VM".
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(Path::new("/run/netns").join(&self.netns)).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// A listening socket inside the "VM" at `addr` (`v6only` for IPv6-only binds).
    pub fn listen(&self, addr: SocketAddr, v6only: bool) -> TcpListener {
        self.try_listen(addr, v6only).unwrap_or_else(|e| panic!("listening on {addr} in the VM: {e}"))
    }

    /// [`Demo::listen`], or why not (a port something in the "VM" holds already: the agent's
    /// catch-all interception listeners take an ephemeral port each).
    pub fn try_listen(&self, addr: SocketAddr, v6only: bool) -> std::io::Result<TcpListener> {
        self.in_netns(|| {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            if addr.is_ipv6() {
                s.set_only_v6(v6only)?;
            }
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(4096)?;
            Ok(s.into())
        })
    }

    /// Speaks the protocol to the proxy's guest→host endpoint as any process in the VM could
    /// (not the agent): one data stream opening TCP `addr:port`; returns the proxy's reply
    /// bytes, as text, once it closes the stream.
    pub fn raw_guest_to_host_open(&self, addr: &str, port: u16) -> String {
        let mut s = std::os::unix::net::UnixStream::connect(self.guest_to_host_socket()).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(&opening(addr, port)).unwrap();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    }

    /// The agent's transport socket, where the proxy opens its streams.
    pub fn agent_socket(&self) -> std::path::PathBuf {
        Path::new("/run/hostnet").join(&self.netns).join("agent.sock")
    }

    /// The proxy's guest→host endpoint, where the agent opens its streams.
    pub fn guest_to_host_socket(&self) -> std::path::PathBuf {
        Path::new("/run/hostnet").join(&self.netns).join("host.sock")
    }

    /// PIDs of processes in the demo's namespace (the agent).
    pub fn netns_pids(&self) -> Vec<i32> {
        let out = Command::new("ip").args(["netns", "pids", &self.netns]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
    }

    /// The agent's PID: the one process in the namespace (waits for it to be there).
    pub fn agent_pid(&self) -> i32 {
        let mut pids = Vec::new();
        wait_until("the agent runs in the namespace", || {
            pids = self.netns_pids();
            pids.len() == 1
        });
        pids[0]
    }

    /// Whether the proxy process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// The proxy's PID.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// `nft list tables` inside the namespace.
    pub fn nft_tables(&self) -> String {
        nft_tables(&self.netns)
    }

    /// A set of the agent's nftables table (`tcp_ports`, `udp_ports`) inside the namespace, as
    /// text; empty while the table is not installed.
    pub fn nft_set(&self, set: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns, "nft", "list", "set", "inet", "hostnet", set])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether the proxy's log (and the agent's, which shares it) shows a panic.
    pub fn panicked(&self) -> bool {
        self.log_text().contains("panicked")
    }

    /// SIGKILLs the proxy, as a crash would: nothing is cleaned up, and the agent lives on in
    /// the namespace (as in a VM). The returned guard removes what was left behind.
    pub fn kill(mut self) -> LeftBehind {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        LeftBehind { netns: self.netns.clone() }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if terminate(&mut child).is_none() {
                let _ = child.kill();
                let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
            }
            if std::thread::panicking() {
                eprintln!("--- demo log ({}) ---\n{}", self.netns, self.log_text());
            }
        }
    }
}

/// What a killed demo leaves behind: its namespace with the agent still running, and its run
/// directory. Dropping it ends the agent (SIGTERM, so it removes its nftables table) and
/// removes both.
#[derive(Debug)]
pub struct LeftBehind {
    pub netns: String,
}

impl Drop for LeftBehind {
    fn drop(&mut self) {
        let out = Command::new("ip").args(["netns", "pids", &self.netns]).output();
        let pids = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
            signal(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            let out = Command::new("ip").args(["netns", "pids", &self.netns]).output();
            if out.map(|o| o.stdout.iter().all(u8::is_ascii_whitespace)).unwrap_or(true) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
        let _ = std::fs::remove_dir_all(Path::new("/run/hostnet").join(&self.netns));
    }
}

/// A process's resident memory (`VmRSS` in `/proc/<pid>/status`), in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Raises this test process's open-file limit towards `n` and returns the limit in force. Above
/// the hard limit this needs `CAP_SYS_RESOURCE`; without it the soft limit goes up to the hard
/// one. The demo started afterwards inherits the limits.
pub fn raise_fd_limit(n: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    if lim.rlim_cur >= n {
        return lim.rlim_cur;
    }
    for want in [
        libc::rlimit { rlim_cur: n, rlim_max: lim.rlim_max.max(n) },
        libc::rlimit { rlim_cur: n.min(lim.rlim_max), rlim_max: lim.rlim_max },
    ] {
        // SAFETY: `want` is a valid rlimit; the call only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return want.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// `nft list tables` inside network namespace `netns`.
pub fn nft_tables(netns: &str) -> String {
    let out = Command::new("ip").args(["netns", "exec", netns, "nft", "list", "tables"]).output().unwrap();
    assert!(out.status.success(), "nft list tables: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends `sig` to process `pid` (ignoring a process that is already gone).
pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

fn terminate(child: &mut Child) -> Option<ExitStatus> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// A guest server: serves each connection on its own thread until [`GuestServer::close`].
#[derive(Debug)]
pub struct GuestServer {
    pub port: u16,
    listener: TcpListener,
    threads: Vec<JoinHandle<()>>,
}

impl GuestServer {
    /// Serves `listener` with `handler` per connection, each on a thread of its own.
    pub fn serve(listener: TcpListener, handler: fn(TcpStream)) -> GuestServer {
        let port = listener.local_addr().unwrap().port();
        let l = listener.try_clone().unwrap();
        let thread = std::thread::spawn(move || {
            for conn in l.incoming() {
                match conn {
                    Ok(c) => {
                        std::thread::spawn(move || handler(c));
                    }
                    Err(_) => break, // closed by `close`
                }
            }
        });
        GuestServer { port, listener, threads: vec![thread] }
    }

    /// Serves `listener` from `threads` threads that each accept one connection and handle it
    /// before taking the next (a pre-threaded server, as busy servers are): no thread is
    /// started per connection, so a connection-rate benchmark measures the path to the server
    /// rather than thread creation.
    pub fn serve_pooled(listener: TcpListener, handler: fn(TcpStream), threads: usize) -> GuestServer {
        let port = listener.local_addr().unwrap().port();
        let threads = (0..threads.max(1))
            .map(|_| {
                let l = listener.try_clone().unwrap();
                std::thread::spawn(move || {
                    for conn in l.incoming() {
                        match conn {
                            Ok(c) => handler(c),
                            Err(_) => break, // closed by `close`
                        }
                    }
                })
            })
            .collect();
        GuestServer { port, listener, threads }
    }

    /// Stops accepting and closes the listening socket (the guest server "exits").
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // shutdown(2) on a listening socket wakes a blocked accept on Linux.
        let _ = SockRef::from(&self.listener).shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for GuestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Echoes everything, then half-closes when the client does (a TCP or vsock stream).
pub fn echo<S: Read + Write + std::os::fd::AsFd>(mut c: S) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = SockRef::from(&c).shutdown(Shutdown::Write);
}

/// Reads until the client half-closes, then answers `got N bytes` and closes.
pub fn count_then_reply(mut c: TcpStream) {
    let mut n = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return,
        }
    }
    let _ = c.write_all(format!("got {n} bytes").as_bytes());
}

/// Sends an endless pseudo-random stream until the client goes away.
pub fn flood(mut c: TcpStream) {
    let chunk = pattern(64 * 1024, 77);
    while c.write_all(&chunk).is_ok() {}
}

/// Reads slowly — 1 KiB every 10 ms, about 100 KiB/s — until the client goes away.
pub fn slow_read(mut c: TcpStream) {
    let mut buf = [0u8; 1024];
    while matches!(c.read(&mut buf), Ok(n) if n > 0) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads everything until the client goes away, answering nothing.
pub fn sink(mut c: TcpStream) {
    let _ = std::io::copy(&mut c, &mut std::io::sink());
}

/// Buffer size of both ends of a bulk transfer.
const BULK_CHUNK: usize = 256 * 1024;

/// Serves one bulk-transfer request on `c`, the same way over any stream (TCP through hostnet,
/// raw vsock): one byte `U` or `D`, then a length N as 8 bytes big-endian.
///
/// - `U` (upload): reads N bytes (or until the stream ends), then answers how many it read, as
///   8 bytes big-endian.
/// - `D` (download): writes N bytes.
///
/// Then it waits for the client to close: the client decides when the transfer is over, so no
/// byte is lost to a transport that cannot carry a half-close.
pub fn bulk_serve<S: Read + Write>(mut c: S) {
    let mut head = [0u8; 9];
    if c.read_exact(&mut head).is_err() {
        return;
    }
    let n = u64::from_be_bytes(head[1..].try_into().unwrap());
    let mut buf = vec![0u8; BULK_CHUNK];
    match head[0] {
        b'U' => {
            let mut got = 0u64;
            while got < n {
                let want = (n - got).min(BULK_CHUNK as u64) as usize;
                match c.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got += k as u64,
                }
            }
            if c.write_all(&got.to_be_bytes()).is_err() {
                return;
            }
        }
        b'D' => {
            buf.copy_from_slice(&pattern(BULK_CHUNK, 11));
            let mut sent = 0u64;
            while sent < n {
                let k = (n - sent).min(BULK_CHUNK as u64) as usize;
                if c.write_all(&buf[..k]).is_err() {
                    return;
                }
                sent += k as u64;
            }
        }
        _ => return,
    }
    while matches!(c.read(&mut buf), Ok(k) if k > 0) {}
}

/// The client side of a `U` request: sends `n` bytes, returns the count the server read.
pub fn bulk_upload<S: Read + Write>(c: &mut S, n: u64) -> u64 {
    let mut head = [b'U'; 9];
    head[1..].copy_from_slice(&n.to_be_bytes());
    c.write_all(&head).unwrap();
    let chunk = pattern(BULK_CHUNK, 12);
    let mut sent = 0u64;
    while sent < n {
        let k = (n - sent).min(BULK_CHUNK as u64) as usize;
        c.write_all(&chunk[..k]).expect("bulk upload: write failed");
        sent += k as u64;
    }
    let mut answer = [0u8; 8];
    c.read_exact(&mut answer).expect("bulk upload: no count from the server");
    u64::from_be_bytes(answer)
}

/// The client side of a `D` request: asks for `n` bytes, returns how many arrived before the
/// server stopped sending (reads at most `n`).
pub fn bulk_download<S: Read + Write>(c: &mut S, n: u64) -> u64 {
    let mut head = [b'D'; 9];
    head[1..].copy_from_slice(&n.to_be_bytes());
    c.write_all(&head).unwrap();
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut got = 0u64;
    while got < n {
        let want = (n - got).min(BULK_CHUNK as u64) as usize;
        match c.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(k) => got += k as u64,
            Err(e) => panic!("bulk download: read failed after {got} bytes: {e}"),
        }
    }
    got
}

/// Reads from `c` until it ends; `Ok(bytes)` on EOF, `Err` on a reset or other error. A
/// connection still open after [`DEADLINE`] fails the test: a client must never hang.
pub fn read_until_closed(c: &mut TcpStream) -> Result<usize, std::io::Error> {
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match c.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("the connection hung: still open and silent after {DEADLINE:?}")
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connects to `addr` on the host, retrying until it is accepted and an echo round trip
/// works (the forward is live end to end). Returns the connection and the time it took.
pub fn connect_when_forwarded(addr: SocketAddr) -> (TcpStream, Duration) {
    let start = Instant::now();
    loop {
        if let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 1];
            if c.write_all(b"?").is_ok() && c.read_exact(&mut b).is_ok() && &b == b"?" {
                return (c, start.elapsed());
            }
        }
        assert!(start.elapsed() < DEADLINE, "{addr} never became usable within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether a connect to `addr` on the host is refused (nothing listens).
pub fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect_timeout(&addr, Duration::from_secs(2)), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// Deterministic pseudo-random bytes (xorshift), so a failure can be replayed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` through an echo connection from one thread while reading it back on another;
/// returns what came back.
pub fn echo_round_trip(c: TcpStream, data: &[u8]) -> Vec<u8> {
    let mut reader = c.try_clone().unwrap();
    reader.set_read_timeout(Some(DEADLINE)).unwrap();
    let expected = data.len();
    let collect = std::thread::spawn(move || {
        let mut got = Vec::with_capacity(expected);
        reader.read_to_end(&mut got).map(|_| got)
    });
    let mut w = c;
    w.write_all(data).unwrap();
    w.shutdown(Shutdown::Write).unwrap();
    collect.join().unwrap().expect("reading the echo failed")
}

/// `127.0.0.1:port` or `[::1]:port`.
pub fn loopback(v6: bool, port: u16) -> SocketAddr {
    let ip: IpAddr = if v6 { "::1".parse().unwrap() } else { "127.0.0.1".parse().unwrap() };
    SocketAddr::new(ip, port)
}

/// p-th percentile (0–100) of `samples`.
pub fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort();
    let i = (samples.len().saturating_sub(1) * p).div_ceil(100);
    samples[i.min(samples.len() - 1)]
}

/// A UDP echo server inside the "VM": answers every datagram to its sender, byte for byte.
#[derive(Debug)]
pub struct UdpEcho {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    /// An echo server inside the demo's "VM".
    pub fn start(demo: &Demo, addr: SocketAddr) -> UdpEcho {
        Self::serve(demo.in_netns(|| udp_bind(addr)))
    }

    /// An echo server on this machine (the direct path benchmarks compare with).
    pub fn start_here(addr: SocketAddr) -> UdpEcho {
        Self::serve(udp_bind(addr))
    }

    fn serve(socket: std::net::UdpSocket) -> UdpEcho {
        // Short receive timeout: only so the thread notices `close`.
        socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let port = socket.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut batch = EchoBatch::new();
            while !flag.load(Ordering::SeqCst) {
                batch.echo(&socket);
            }
        });
        UdpEcho { port, stop, thread: Some(thread) }
    }

    /// Stops and closes the socket (the guest server "exits").
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How the echo server answers: what has arrived, up to [`EchoBatch::MAX`] datagrams, with one
/// `recvmmsg(2)`, then the answers with one `sendmmsg(2)` — as a server built for datagram
/// rates does (one `recv_from`/`send_to` per datagram made this server the first to drop
/// datagrams on every path of the benchmark). Plain datagrams out, no GSO: the server is the
/// same on every path, and the one of the two ends a user's server could be.
struct EchoBatch {
    slots: Vec<Vec<u8>>,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl EchoBatch {
    const MAX: usize = 32;

    fn new() -> EchoBatch {
        // SAFETY: plain C data, all zeroes valid (null pointers, zero lengths).
        let (name, header) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        EchoBatch {
            slots: vec![vec![0u8; 65_536]; Self::MAX],
            names: vec![name; Self::MAX],
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; Self::MAX],
            headers: vec![header; Self::MAX],
        }
    }

    /// Waits (up to the socket's read timeout) for datagrams and answers them, each to its
    /// sender, byte for byte.
    fn echo(&mut self, socket: &std::net::UdpSocket) {
        use std::os::fd::AsRawFd;
        let fd = socket.as_raw_fd();
        for (((slot, name), iov), header) in
            self.slots.iter_mut().zip(&mut self.names).zip(&mut self.iovs).zip(&mut self.headers)
        {
            *iov = libc::iovec { iov_base: slot.as_mut_ptr().cast(), iov_len: slot.len() };
            header.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
            header.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: each header points at its own iovec over its own slot and at its own name
        // buffer, all living in `self` for the call; the kernel writes within the lengths given.
        // MSG_WAITFORONE: wait (up to the read timeout) for the first, take what else waits.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                Self::MAX as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let Ok(n) = usize::try_from(n) else { return };
        for header in &mut self.headers[..n] {
            // The answer: the bytes received, to the address they came from.
            // SAFETY: `msg_iov` points at this header's iovec (set above).
            unsafe { (*header.msg_hdr.msg_iov).iov_len = header.msg_len as usize };
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: as above; the kernel only reads the datagrams and names.
            let r = unsafe {
                libc::sendmmsg(fd, self.headers[sent..n].as_mut_ptr(), (n - sent) as libc::c_uint, 0)
            };
            match usize::try_from(r) {
                Ok(k) => sent += k.max(1),
                // Refused (the sender is gone): skip that one, as a server would.
                Err(_) => sent += 1,
            }
        }
    }
}

fn udp_bind(addr: SocketAddr) -> std::net::UdpSocket {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None).unwrap();
    if addr.is_ipv6() {
        s.set_only_v6(false).unwrap();
    }
    // Room for a burst, so the loss a test measures is hostnet's, not this server's.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.bind(&addr.into()).unwrap();
    std::net::UdpSocket::from(s)
}

/// Whether something on this machine holds UDP `addr` (hostnet's mirror, once forwarded):
/// a socket bound to it, or to the wildcard of its family, on its port. Read from
/// `/proc/net/udp{,6}`, not by binding the port to see: a probe that binds is a desktop program
/// holding the port for a moment, and hostnet leaves a port the desktop held to the desktop.
pub fn udp_port_taken(addr: SocketAddr) -> bool {
    let (file, hex) = match addr.ip() {
        std::net::IpAddr::V4(ip) => ("/proc/net/udp", format!("{:08X}", u32::from_le_bytes(ip.octets()))),
        std::net::IpAddr::V6(ip) => {
            let o = ip.octets();
            let words: String = o
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
                .collect();
            ("/proc/net/udp6", words)
        }
    };
    let wildcard = "0".repeat(hex.len());
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)).any(|local| {
        local.split_once(':').is_some_and(|(a, p)| {
            u16::from_str_radix(p, 16).ok() == Some(addr.port()) && (a == hex || a == wildcard)
        })
    })
}

/// A UDP client on the host, connected to `addr`, that waits for each answer.
pub fn udp_client(addr: SocketAddr) -> std::net::UdpSocket {
    let local: SocketAddr =
        if addr.is_ipv6() { "[::1]:0".parse().unwrap() } else { "127.0.0.1:0".parse().unwrap() };
    let c = std::net::UdpSocket::bind(local).unwrap();
    c.connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c
}

/// Sends `data` and waits for the echo; `None` if nothing came back in time.
pub fn udp_echo(c: &std::net::UdpSocket, data: &[u8]) -> Option<Vec<u8>> {
    c.send(data).unwrap();
    let mut buf = vec![0u8; 65_536];
    c.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

/// Runs a program with its standard input and output piped (stderr discarded).
pub fn spawn_piped(program: &str, args: &[&str]) -> Child {
    Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} is needed ({e}); the README's setup installs it"))
}

/// Two `nc` processes already connected through hostnet: a line typed into each shows up on
/// the other. Kills both afterwards.
pub fn assert_typing_flows_both_ways(server: Child, client: Child) {
    assert_conversation(server, client, &[]);
}

/// [`assert_typing_flows_both_ways`], then again after each pause in `pauses`: the
/// conversation outlasts them.
pub fn assert_conversation(mut server: Child, mut client: Child, pauses: &[Duration]) {
    let server_out = lines_of(server.stdout.take().unwrap());
    let client_out = lines_of(client.stdout.take().unwrap());
    let mut server_in = server.stdin.take().unwrap();
    let mut client_in = client.stdin.take().unwrap();
    for pause in std::iter::once(&Duration::ZERO).chain(pauses) {
        std::thread::sleep(*pause);
        for (input, output, text) in [
            (&mut client_in, &server_out, "hello from the desktop\n"),
            (&mut server_in, &client_out, "hello from the container\n"),
        ] {
            input.write_all(text.as_bytes()).unwrap();
            input.flush().unwrap();
            let line = output.recv_timeout(DEADLINE).unwrap_or_else(|_| {
                panic!("{text:?} did not come through within {DEADLINE:?} (after a {pause:?} pause)")
            });
            assert_eq!(line, text);
        }
    }
    for p in [&mut client, &mut server] {
        let _ = p.kill();
        let _ = p.wait();
    }
}

/// The lines a child writes, read on a thread so a test can wait for one with a deadline.
fn lines_of(out: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = BufReader::new(out);
        loop {
            let mut line = String::new();
            if !matches!(out.read_line(&mut line), Ok(n) if n > 0) || tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// `python3 -m http.server PORT --bind 127.0.0.1` serving the tests crate's directory, which
/// has a `Cargo.toml` naming `hostnet-tests`: a desktop web server for guest→host tests.
pub fn desktop_web_server(port: u16) -> Child {
    Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 is needed; the README's setup installs it")
}

/// The guest server of [`connections_ending_every_way`]: what it does is the request's first
/// byte — `e` echo, `s` answer and half-close first (HTTP/1.0's way: the client closes after),
/// `r` reset at once, `c` answer and close with the request unread (a reset too), anything else
/// read to the end.
fn by_first_byte(mut c: TcpStream) {
    let mut first = [0u8; 1];
    if c.read_exact(&mut first).is_err() {
        return;
    }
    match first[0] {
        b'e' => {
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
            let _ = c.write_all(&[&first[..], &rest].concat());
            let _ = c.shutdown(Shutdown::Write);
        }
        b's' => {
            let _ = c.write_all(b"ok");
            let _ = c.shutdown(Shutdown::Write);
            let _ = c.read_to_end(&mut Vec::new());
        }
        b'r' => {
            let _ = SockRef::from(&c).set_linger(Some(Duration::ZERO));
        }
        b'c' => {
            let _ = c.write_all(b"bye");
        }
        _ => {
            let _ = c.read_to_end(&mut Vec::new());
        }
    }
}

/// `clients` desktop clients at once, each making `per_client` connections one after another
/// to a guest server of `demo`, ending every way in turn — closed by either side first, reset
/// by the server or by the client, a server closing with the request unread. On the desktop
/// half the streams they leave carry the next connections (protocol version 3). Asserts that
/// every echo and answer among them comes back whole and its own, that nothing in the demo's
/// log says a stream broke, and that `status` counts the streams kept for the next connections
/// (five of the eight endings are clean both ways).
pub fn connections_ending_every_way(demo: &Demo, clients: u32, per_client: u32) {
    assert!(per_client % 8 == 0, "each client goes through the eight endings a whole number of times");
    let port = free_port();
    let _srv = GuestServer::serve_pooled(
        demo.listen(SocketAddr::from(([0, 0, 0, 0], port)), false),
        by_first_byte,
        8,
    );
    wait_until("the port is forwarded", || {
        let Ok(mut c) = TcpStream::connect(loopback(false, port)) else { return false };
        c.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut got = Vec::new();
        c.write_all(b"e").is_ok()
            && c.shutdown(Shutdown::Write).is_ok()
            && c.read_to_end(&mut got).is_ok()
            && got == b"e"
    });
    const KINDS: [u8; 8] = [b'e', b's', b'r', b's', b'e', b'c', b's', b'x'];
    let threads: Vec<_> = (0..clients)
        .map(|t| {
            std::thread::spawn(move || {
                let mut echoed = 0;
                for i in 0..per_client {
                    let kind = KINDS[(i % 8) as usize];
                    let mut c = TcpStream::connect(loopback(false, port)).unwrap();
                    c.set_read_timeout(Some(DEADLINE)).unwrap();
                    let msg = format!("{}-{t}-{i}-{}", kind as char, "·".repeat((i % 7) as usize * 100));
                    let _ = c.write_all(msg.as_bytes());
                    match kind {
                        b'e' => {
                            c.shutdown(Shutdown::Write).unwrap();
                            let mut got = Vec::new();
                            c.read_to_end(&mut got).unwrap();
                            assert_eq!(String::from_utf8_lossy(&got), msg, "client {t}, connection {i}");
                            echoed += 1;
                        }
                        b's' => {
                            let mut got = Vec::new();
                            c.read_to_end(&mut got).unwrap();
                            assert_eq!(got, b"ok", "client {t}, connection {i}");
                            drop(c);
                            echoed += 1;
                        }
                        b'x' => {
                            SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
                        }
                        // Resets and early closes: whatever comes, until the end.
                        _ => {
                            let _ = c.read_to_end(&mut Vec::new());
                        }
                    }
                }
                echoed
            })
        })
        .collect();
    let echoed: u32 = threads.into_iter().map(|c| c.join().unwrap()).sum();
    let answered_kinds = KINDS.iter().filter(|k| matches!(k, b'e' | b's')).count() as u32;
    assert_eq!(echoed, clients * per_client / 8 * answered_kinds, "echoes and answers");
    let log = demo.log_text();
    for broken in [
        "rejected a stream",
        "did not answer",
        "broke the stream protocol",
        "cannot open a stream to the agent",
    ] {
        assert!(!log.contains(broken), "{broken} in the log:\n{log}");
    }
    let streams = demo.status()["streams"].clone();
    let count =
        |key: &str| streams[key].as_u64().unwrap_or_else(|| panic!("status has no streams.{key}: {streams}"));
    let connections = u64::from(clients * per_client);
    assert!(count("kept") >= connections / 4, "streams kept for the next connections: {streams}");
    assert!(count("taken") >= count("kept") / 2, "connections that took a held stream: {streams}");
    assert!(count("held") <= count("limit"), "{streams}");
}

/// A data stream's opening for TCP `addr:port`, as any process could write it: our preface and
/// the `open` frame (`docs/protocol.md`, section 3).
pub fn opening(addr: &str, port: u16) -> Vec<u8> {
    let body = format!(r#"{{"type":"tcp","addr":"{addr}","port":{port},"peer":null}}"#);
    let mut wire = hostnet_protocol::Preface::OURS.to_bytes().to_vec();
    wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
    wire.extend_from_slice(body.as_bytes());
    wire
}

/// Speaks the protocol as an opener on one stream to `sock`: for each `(addr, port, request)`
/// in turn, on the same stream, its opening, the request and FIN, then the answer up to the far
/// side's FIN. Each answer: `Ok(the far side's bytes)` after `connected`; `Err(what came
/// instead)` — a refusal's text, a reset, the stream's end — and then no more.
pub fn exchanges_on_one_stream(
    sock: &Path,
    exchanges: &[(&str, u16, &[u8])],
) -> Vec<Result<Vec<u8>, String>> {
    use hostnet_protocol::chunk::{FIN, RST, data_header};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut answers = Vec::new();
    for &(addr, port, request) in exchanges {
        let mut wire = opening(addr, port);
        wire.extend_from_slice(&data_header(request.len()));
        wire.extend_from_slice(request);
        wire.extend_from_slice(&FIN);
        if let Err(e) = s.write_all(&wire) {
            answers.push(Err(format!("writing the opening: {e}")));
            return answers;
        }
        let answer = read_answer(&mut s);
        let ended = answer.is_err();
        answers.push(answer);
        if ended {
            return answers;
        }
    }
    return answers;

    fn read_answer(s: &mut std::os::unix::net::UnixStream) -> Result<Vec<u8>, String> {
        let mut word = [0u8; 4];
        let take = |s: &mut std::os::unix::net::UnixStream, n: usize| -> Result<Vec<u8>, String> {
            let mut b = vec![0u8; n];
            s.read_exact(&mut b).map_err(|e| format!("the stream ended: {e}"))?;
            Ok(b)
        };
        let preface = take(s, 6)?;
        if &preface[..4] != b"HNET" {
            return Err(format!("not a preface: {preface:?}"));
        }
        word.copy_from_slice(&take(s, 4)?);
        let frame = String::from_utf8_lossy(&take(s, u32::from_be_bytes(word) as usize)?).into_owned();
        if !frame.contains(r#""connected""#) {
            return Err(frame);
        }
        let mut data = Vec::new();
        loop {
            word.copy_from_slice(&take(s, 4)?);
            match word {
                FIN => return Ok(data),
                RST => return Err("reset".into()),
                _ => data.extend(take(s, u32::from_be_bytes(word) as usize)?),
            }
        }
    }
}

#[cfg(test)]
mod bulk_tests {
    use super::*;

    /// The bulk protocol the real-VM throughput check relies on, over loopback TCP: counts are
    /// exact both ways, including lengths that are not a multiple of the chunk size.
    #[test]
    fn bulk_transfers_count_every_byte() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || bulk_serve(c));
            }
        });
        for n in [0u64, 1, BULK_CHUNK as u64 + 7, 3 << 20] {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(DEADLINE)).unwrap();
            assert_eq!(bulk_upload(&mut c, n), n, "upload of {n}");
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(DEADLINE)).unwrap();
            assert_eq!(bulk_download(&mut c, n), n, "download of {n}");
        }
    }

    /// A server that stops early is reported as a short count, not hidden.
    #[test]
    fn a_short_upload_is_counted_short() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || bulk_serve(l.accept().unwrap().0));
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut head = [b'U'; 9];
        head[1..].copy_from_slice(&100u64.to_be_bytes());
        c.write_all(&head).unwrap();
        c.write_all(&[7u8; 40]).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut answer = [0u8; 8];
        c.read_exact(&mut answer).unwrap();
        assert_eq!(u64::from_be_bytes(answer), 40);
        drop(c);
        server.join().unwrap();
    }
}
