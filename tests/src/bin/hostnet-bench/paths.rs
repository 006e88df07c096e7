//! The three paths every TCP workload runs over, each ending at a server the harness runs:
//!
//! - **direct**: the server listens on this machine's loopback — the limit.
//! - **hostnet**: the server listens inside the stand-in's namespace ("the VM"); the desktop
//!   reaches it at the same port on its loopback through `hostnet-proxy` and `hostnet-agent`.
//! - **socat**: the peer to beat, with hostnet's topology: `socat TCP-LISTEN` on loopback →
//!   a Unix socket → `socat UNIX-LISTEN` inside the namespace → TCP to the server there.
//! - **bare**: the same chain with the bare relay (`bare.rs`) in socat's place: what the
//!   topology itself costs, with nothing of hostnet or socat in it; for bulk transfers the
//!   bare relay in its bulk form (`--bulk`, [`Via::BareBulk`]).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use hostnet_tests::{DEADLINE, Demo, GuestServer, free_port, loopback};

use crate::bare;
use crate::procs::{self, Hostnet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Direct,
    Hostnet,
    Socat,
    Bare,
    /// The bare chain with its relays in their bulk form (`bare::run_bulk`): splicing or copying.
    BareBulk(bare::Bulk),
}

/// How the harness's server runs its handler.
#[derive(Debug, Clone, Copy)]
pub enum Server {
    /// A thread per connection: any number of connections at once.
    PerConnection(fn(TcpStream)),
    /// A fixed pool of threads, each handling one connection at a time: for connection-rate
    /// workloads, whose figures would otherwise include a thread start per connection.
    Pooled(fn(TcpStream), usize),
}

impl Server {
    pub fn start(self, listener: TcpListener) -> GuestServer {
        match self {
            Server::PerConnection(handler) => GuestServer::serve(listener, handler),
            Server::Pooled(handler, threads) => GuestServer::serve_pooled(listener, handler, threads),
        }
    }
}

/// A server on one path and the address the desktop connects to; dropping it stops both.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The socat or bare relay chain, on those paths.
    pub chain: Option<Chain>,
    /// hostnet's processes, on the hostnet path.
    hostnet: Option<Hostnet>,
    _server: GuestServer,
}

impl Endpoint {
    /// CPU-seconds the relay on this path has used so far: hostnet's proxy + agent, the socat
    /// or bare chain (with socat's reaped per-connection children), nothing for direct.
    pub fn relay_cpu_seconds(&self) -> f64 {
        match (&self.hostnet, &self.chain) {
            (Some(hn), _) => hn.cpu_seconds(),
            (_, Some(chain)) => chain.cpu_seconds(),
            _ => 0.0,
        }
    }

    /// hostnet's relays' page faults and context switches so far (`None` on the other paths).
    pub fn relay_faults_and_switches(&self) -> Option<(u64, u64)> {
        self.hostnet.map(|hn| hn.faults_and_switches())
    }

    /// Waits until the relay has accounted for the connections so far (socat's
    /// per-connection children have exited and been reaped).
    pub fn settle(&self) {
        if let Some(chain) = &self.chain {
            chain.wait_children_gone();
        }
    }
}

/// Starts `server` behind `via` and waits until the desktop can connect to it.
pub fn endpoint(via: Via, demo: &Demo, socat: &Socat, server: Server) -> Endpoint {
    let port = free_port();
    let listener = match via {
        Via::Direct => TcpListener::bind(loopback(false, port)).unwrap(),
        Via::Hostnet | Via::Socat | Via::Bare | Via::BareBulk(_) => {
            demo.listen(SocketAddr::from(([0, 0, 0, 0], port)), false)
        }
    };
    let server = server.start(listener);
    match via {
        Via::Direct => Endpoint { addr: loopback(false, port), chain: None, hostnet: None, _server: server },
        Via::Hostnet => {
            let addr = loopback(false, port);
            wait_accepting(addr);
            Endpoint { addr, chain: None, hostnet: Some(Hostnet::find(demo)), _server: server }
        }
        Via::Socat | Via::Bare | Via::BareBulk(_) => {
            let relay = match via {
                Via::Socat => Relay::Socat,
                Via::BareBulk(bulk) => Relay::BareBulk(bulk),
                _ => Relay::Bare,
            };
            let chain = socat.chain(demo, port, relay);
            Endpoint { addr: chain.addr, chain: Some(chain), hostnet: None, _server: server }
        }
    }
}

/// Runs `f` on a fresh `server` reached `via` (kept alive meanwhile); `None` for the socat
/// path when socat is not available.
pub fn measure<T>(
    via: Via,
    demo: &Demo,
    socat: &Socat,
    server: Server,
    f: impl FnOnce(&Endpoint) -> T,
) -> Option<T> {
    (via != Via::Socat || socat.ok()).then(|| {
        let ep = endpoint(via, demo, socat, server);
        f(&ep)
    })
}

/// Waits until a connect to `addr` succeeds (for hostnet: the port is forwarded). The probe
/// connection is closed at once.
pub fn wait_accepting(addr: SocketAddr) -> Duration {
    let start = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            return start.elapsed();
        }
        assert!(start.elapsed() < DEADLINE, "{addr} never accepted within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How to run socat, or why it cannot run; also where both relay chains (socat's and the bare
/// relay's, [`Socat::chain`]) keep their Unix sockets.
#[derive(Debug)]
pub struct Socat {
    pub available: Result<String, String>,
    /// socat's `-b`: the relay buffer size per direction (socat's default: 8192).
    pub buffer: usize,
    dir: PathBuf,
}

impl Socat {
    /// Finds socat, installing it with apt-get if it is missing.
    pub fn prepare(buffer: usize) -> Socat {
        let dir = std::env::temp_dir().join(format!("hostnet-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let version = || {
            Command::new("socat").arg("-V").stderr(Stdio::null()).output().ok().and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.lines()
                    .find_map(|l| l.strip_prefix("socat version ")?.split_whitespace().next())
                    .map(|v| format!("socat {v}"))
            })
        };
        let available = match version() {
            Some(v) => Ok(v),
            None => {
                println!("socat is missing: installing it (apt-get install socat)");
                let ok = Command::new("apt-get")
                    .args(["install", "-y", "-qq", "--no-install-recommends", "socat"])
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                match version() {
                    Some(v) => Ok(v),
                    None if ok => Err("socat installed but does not run".into()),
                    None => Err("socat is not installed and apt-get could not install it".into()),
                }
            }
        };
        if let Err(e) = &available {
            println!("WARNING: {e}; the socat column stays empty");
        }
        Socat { available, buffer, dir }
    }

    pub fn ok(&self) -> bool {
        self.available.is_ok()
    }

    /// Starts a chain of `relay` to `guest_port` inside the demo's namespace; returns once
    /// both ends listen.
    pub fn chain(&self, demo: &Demo, guest_port: u16, relay: Relay) -> Chain {
        let host_port = free_port();
        let file = match relay {
            Relay::Socat => "socat",
            Relay::Bare => "bare",
            Relay::BareBulk(_) => "bare-bulk",
        };
        let sock = self.dir.join(format!("{file}-{guest_port}.sock"));
        let (program, inner) = self.argv(relay, End::Unix(&sock), End::Tcp(guest_port));
        let (_, outer) = self.argv(relay, End::Tcp(host_port), End::Unix(&sock));
        start_chain(demo, relay.name(), &program, [inner, outer], sock, host_port, &|| {
            tcp_listening(host_port)
        })
    }

    /// Starts the bare UDP relay chain (`bare_udp.rs`) to a UDP echo at `guest_port` inside the
    /// demo's namespace; returns once both ends are bound.
    pub fn udp_chain(&self, demo: &Demo, guest_port: u16) -> Chain {
        let host_port = free_port();
        let sock = crate::bare_udp::socket_path(&self.dir, guest_port);
        let unix = format!("unix:{}", sock.display());
        let inner =
            vec!["bare-udp-relay".to_owned(), unix.clone(), format!("udp:{}", loopback(false, guest_port))];
        let outer = vec!["bare-udp-relay".to_owned(), format!("udp:{}", loopback(false, host_port)), unix];
        let bound = || crate::udp::socket_drops().iter().any(|s| s.local_port == host_port);
        let me = std::env::current_exe().unwrap();
        start_chain(demo, "the bare UDP relay", &me, [inner, outer], sock, host_port, &bound)
    }

    /// The program and arguments of one relay of a chain, listening on `listen` (on
    /// 127.0.0.1 for TCP) and connecting each client on to `to`.
    fn argv(&self, relay: Relay, listen: End, to: End) -> (PathBuf, Vec<String>) {
        match relay {
            Relay::Socat => {
                let backlog = "backlog=4096";
                let listen = match listen {
                    End::Tcp(port) => format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,{backlog}"),
                    End::Unix(path) => format!("UNIX-LISTEN:{},fork,{backlog}", path.display()),
                };
                let to = match to {
                    End::Tcp(port) => format!("TCP:127.0.0.1:{port}"),
                    End::Unix(path) => format!("UNIX-CONNECT:{}", path.display()),
                };
                ("socat".into(), vec!["-b".into(), self.buffer.to_string(), listen, to])
            }
            Relay::Bare | Relay::BareBulk(_) => {
                // Written as the bare relay parses it (`bare::End`'s `Display`).
                let spec = |end| match end {
                    End::Tcp(port) => bare::End::Tcp(loopback(false, port)).to_string(),
                    End::Unix(path) => bare::End::Unix(path.to_owned()).to_string(),
                };
                let me = std::env::current_exe().unwrap();
                let mut args = vec!["bare-relay".into(), spec(listen), spec(to)];
                if let Relay::BareBulk(bulk) = relay {
                    let bulk = bulk.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default();
                    args.extend(["--bulk".into(), bulk]);
                }
                (me, args)
            }
        }
    }
}

/// Starts a chain's two relays, `program` with `args` each: the first in the demo's namespace,
/// waited for until it listens on the Unix socket `sock`; then the second on this machine,
/// waited for until `bound()` says it has taken 127.0.0.1:`host_port`.
fn start_chain(
    demo: &Demo,
    name: &str,
    program: &Path,
    [inner_args, outer_args]: [Vec<String>; 2],
    sock: PathBuf,
    host_port: u16,
    bound: &dyn Fn() -> bool,
) -> Chain {
    let _ = std::fs::remove_file(&sock);
    let quiet = |mut cmd: Command| {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
    };
    let mut in_netns = Command::new("ip");
    in_netns.args(["netns", "exec", &demo.netns]).arg(program).args(inner_args);
    let inner = quiet(in_netns);
    let start = Instant::now();
    while !unix_listening(inner.id(), &sock) {
        assert!(start.elapsed() < DEADLINE, "{name} in the namespace never listened on {}", sock.display());
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut here = Command::new(program);
    here.args(outer_args);
    let chain = Chain { addr: loopback(false, host_port), outer: quiet(here), inner, sock };
    let start = Instant::now();
    while !bound() {
        assert!(start.elapsed() < DEADLINE, "{name} never took 127.0.0.1:{host_port}");
        std::thread::sleep(Duration::from_millis(1));
    }
    chain
}

/// Which relay runs a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    Socat,
    /// `hostnet-bench bare-relay` (`bare.rs`).
    Bare,
    /// `hostnet-bench bare-relay --bulk …`.
    BareBulk(bare::Bulk),
}

impl Relay {
    fn name(self) -> &'static str {
        match self {
            Relay::Socat => "socat",
            Relay::Bare => "the bare relay",
            Relay::BareBulk(_) => "the bare bulk relay",
        }
    }
}

/// One end of a chain's relay: a TCP port on 127.0.0.1, or a Unix socket.
#[derive(Debug, Clone, Copy)]
enum End<'a> {
    Tcp(u16),
    Unix(&'a Path),
}

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running relay chain: `outer` on this machine, `inner` in the namespace.
#[derive(Debug)]
pub struct Chain {
    pub addr: SocketAddr,
    outer: Child,
    inner: Child,
    sock: PathBuf,
}

impl Chain {
    /// The two listening relay processes.
    pub fn parents(&self) -> [u32; 2] {
        [self.outer.id(), self.inner.id()]
    }

    /// Every process of the chain: both listeners and socat's per-connection children.
    pub fn all_pids(&self) -> Vec<u32> {
        let mut pids = self.parents().to_vec();
        for p in self.parents() {
            pids.extend(procs::children(p));
        }
        pids
    }

    /// CPU-seconds of the chain: both listeners and their per-connection children, those
    /// still running and those reaped (counted in their parent's). Read while the connections
    /// are open or after [`Chain::wait_children_gone`]: a child reaped between the two reads
    /// would be missed once.
    pub fn cpu_seconds(&self) -> f64 {
        let live = |p: u32| procs::children(p).iter().map(|&c| procs::cpu_seconds(c, false)).sum::<f64>();
        self.parents().iter().map(|&p| procs::cpu_seconds(p, true) + live(p)).sum()
    }

    /// Waits until every per-connection child has exited and been reaped (so its CPU time is
    /// counted in its parent's).
    pub fn wait_children_gone(&self) {
        let start = Instant::now();
        while self.parents().iter().any(|&p| !procs::children(p).is_empty()) {
            assert!(start.elapsed() < DEADLINE, "relay children did not exit within {DEADLINE:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        for c in [&mut self.outer, &mut self.inner] {
            // SIGTERM reaches the listener; socat's children exit as their connections close.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// Whether `pid`'s network namespace has a listening Unix socket at `path`.
fn unix_listening(pid: u32, path: &Path) -> bool {
    let want = path.to_string_lossy();
    std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default().lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening.
        f.len() >= 8 && f[3] == "00010000" && f[7] == want
    })
}

/// Whether something listens on TCP 127.0.0.1:`port` in this namespace.
pub fn tcp_listening(port: u16) -> bool {
    // The address is printed as the in-memory (network order) u32 in host-order hex.
    let local = format!("{:08X}:{port:04X}", u32::from_ne_bytes([127, 0, 0, 1]));
    std::fs::read_to_string("/proc/net/tcp").unwrap_or_default().lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1] == local && f[3] == "0A"
    })
}
