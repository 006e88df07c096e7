//! The in-process tier: `host_proxy::run` and the agent in one process and one tokio runtime,
//! joined by an in-process transport (socket pairs), the agent's listeners scripted by the
//! test. No root, no network namespace, no nftables: these run in seconds under
//! `capsh --drop=cap_net_admin,cap_sys_admin,cap_bpf` and are where forwarding behaviour is
//! tested first; the end-to-end suites then prove it on the real binaries.
//!
//! Both sides share this machine's loopback. A "guest" server is a real server on a free
//! loopback port P; the script says the guest listens on P, and the agent relays to it there.
//! The proxy's mirror of P would collide with that server, so every test remaps P to a free
//! host port (the proxy's own settings key), or holds the host port itself (the conflict).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hostnet_admin::settings::{PortRange, Settings};
use hostnet_admin::{AgentLink, Direction, Endpoint, ForwardState, ForwardStatus, Request, Response, Status};
use hostnet_net::discovery::source::{Found, ListenerSource, Table};
use hostnet_net::discovery::watcher::Trigger;
use hostnet_protocol::{Listener, Proto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest any condition is waited for (the agent-loss test waits `STALE_AFTER` on top).
const DEADLINE: Duration = Duration::from_secs(10);

/// The guest's listening sockets as the test says they are; the agent's watcher reads them.
#[derive(Clone, Default)]
struct Script(Arc<Mutex<Vec<Found>>>);

/// Inodes far above any real socket's, so none is taken for one of this process's own.
static NEXT_INODE: AtomicU32 = AtomicU32::new(4_000_000_001);

impl Script {
    fn listen(&self, proto: Proto, port: u16) {
        let found = Found {
            listener: Listener { proto, addr: IpAddr::V4(Ipv4Addr::LOCALHOST), port },
            inode: NEXT_INODE.fetch_add(1, Ordering::Relaxed),
            uid: None,
            pid: None,
            connected: false,
        };
        self.0.lock().unwrap().push(found);
    }
}

impl ListenerSource for Script {
    fn read(&mut self, table: Table, out: &mut Vec<Found>) -> std::io::Result<()> {
        let listening = self.0.lock().unwrap();
        out.extend(
            listening
                .iter()
                .filter(|f| f.listener.proto == table.proto && f.listener.addr.is_ipv6() == table.v6),
        );
        Ok(())
    }
}

/// A proxy and an agent running in this process.
struct Pair {
    _dir: tempfile::TempDir,
    admin: Endpoint,
    guest: Script,
    proxy_stop: CancellationToken,
    proxy: JoinHandle<()>,
    agent_stop: CancellationToken,
    agent: Option<JoinHandle<Result<(), guest_agent::AgentError>>>,
}

impl Pair {
    /// Starts both, then applies `settings` through the admin API.
    async fn start(settings: Settings) -> Pair {
        Pair::start_with(settings, false).await
    }

    /// Like [`Pair::start`]; with `to_host`, the proxy also watches this machine's listeners
    /// (sock_diag: no privilege needed) and serves guest→host streams on a Unix socket.
    async fn start_with(settings: Settings, to_host: bool) -> Pair {
        // Logs with RUST_LOG (e.g. `RUST_LOG=debug cargo test --test inproc -- --nocapture`).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        // The admin socket's directory must be the user's alone.
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let admin = Endpoint::Socket(run.join("admin.sock"));
        let (connector, acceptor) = hostnet_net::transport::in_process("agent");
        let guest = Script::default();
        let agent_stop = CancellationToken::new();
        let agent_config = guest_agent::AgentConfig::new("unix:/in-process".parse().unwrap());
        let discovery =
            guest_agent::Discovery::new(Box::new(guest.clone()), Trigger::Poll(Duration::from_millis(5)));
        let agent = tokio::spawn(guest_agent::serve(agent_config, discovery, acceptor, agent_stop.clone()));

        let settings_path = dir.path().join("settings.toml");
        let mut config = host_proxy::ProxyConfig::new(&"unix:/in-process".parse().unwrap());
        config.connector = connector;
        config.settings_path = settings_path;
        config.admin_socket = Some(admin.clone());
        config.guest_vm = None;
        config.guest_listen = to_host.then(|| hostnet_net::TransportSpec::Unix(run.join("host.sock")));
        let proxy_stop = CancellationToken::new();
        let (state, _) = tokio::sync::watch::channel(host_proxy::LinkState::Connecting);
        let proxy = tokio::spawn(host_proxy::run(config, proxy_stop.clone(), state));
        let pair = Pair { _dir: dir, admin, guest, proxy_stop, proxy, agent_stop, agent: Some(agent) };
        pair.wait_for("the admin API and the agent", |s| s.agent == AgentLink::Connected).await;
        pair.apply(settings).await;
        pair
    }

    async fn request(&self, req: Request) -> Response {
        hostnet_admin::request(&self.admin, &req).await.unwrap_or_else(|e| panic!("{req:?}: {e}"))
    }

    async fn status(&self) -> Option<Status> {
        match hostnet_admin::request(&self.admin, &Request::Status {}).await {
            Ok(Response::Status(s)) => Some(*s),
            // Not up yet (or an answer that is not a status: the caller's wait fails).
            _ => None,
        }
    }

    async fn apply(&self, settings: Settings) {
        match self.request(Request::UpdateSettings { settings }).await {
            Response::Status(_) => {}
            other => panic!("settings refused: {other:?}"),
        }
    }

    async fn set_enabled(&self, enabled: bool) {
        match self.request(Request::SetEnabled { enabled }).await {
            Response::Status(s) => assert_eq!(s.enabled, enabled),
            other => panic!("set_enabled refused: {other:?}"),
        }
    }

    /// Waits until the status satisfies `ok`; fails naming `what` and the last status.
    async fn wait_for(&self, what: &str, ok: impl Fn(&Status) -> bool) -> Status {
        let start = tokio::time::Instant::now();
        let mut last = None;
        while start.elapsed() < DEADLINE {
            if let Some(s) = self.status().await {
                if ok(&s) {
                    return s;
                }
                last = Some(s);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("waited {DEADLINE:?} for {what}; last status: {last:#?}");
    }

    /// Waits for the forward of guest `port` over `proto` to be in `state`.
    async fn wait_forward(&self, proto: Proto, port: u16, state: ForwardState) -> ForwardStatus {
        let s = self
            .wait_for(&format!("{proto}/{port} {}", state.as_str()), |s| {
                forward(s, proto, port).is_some_and(|f| f.state == state)
            })
            .await;
        forward(&s, proto, port).unwrap().clone()
    }

    /// Stops the agent as a VM going away would, and waits until it has stopped.
    async fn lose_agent(&mut self) {
        self.agent_stop.cancel();
        let agent = self.agent.take().unwrap();
        tokio::time::timeout(DEADLINE, agent).await.expect("the agent stops").unwrap().unwrap();
    }

    async fn stop(self) {
        self.agent_stop.cancel();
        self.proxy_stop.cancel();
        tokio::time::timeout(DEADLINE, self.proxy).await.expect("the proxy stops").unwrap();
        if let Some(agent) = self.agent {
            tokio::time::timeout(DEADLINE, agent).await.expect("the agent stops").unwrap().unwrap();
        }
    }
}

fn offered(s: &Status, proto: Proto, port: u16) -> bool {
    s.forwards.iter().any(|f| f.direction == Direction::ToHost && f.proto == proto && f.host_port == port)
}

fn forward(s: &Status, proto: Proto, port: u16) -> Option<&ForwardStatus> {
    s.forwards.iter().find(|f| f.direction == Direction::ToGuest && f.proto == proto && f.guest_port == port)
}

/// A TCP echo server on a free loopback port: the guest's server.
async fn tcp_echo() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// A UDP echo server on a free loopback port.
async fn udp_echo() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    port
}

/// A port free on both loopback addresses for `proto` when asked (another program may take it
/// after; the tests' ports are the kernel's ephemeral ones, which nothing here binds by number).
fn free_port(proto: Proto) -> u16 {
    for _ in 0..100 {
        let port = match proto {
            Proto::Tcp => std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(),
            Proto::Udp => std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(),
        };
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
        let free6 = match proto {
            Proto::Tcp => std::net::TcpListener::bind(v6).is_ok(),
            Proto::Udp => std::net::UdpSocket::bind(v6).is_ok(),
        };
        if free6 || !ipv6_loopback() {
            return port;
        }
    }
    panic!("no loopback port free on both families");
}

fn ipv6_loopback() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

fn remapped(pairs: &[(u16, u16)]) -> Settings {
    Settings {
        // Guest→host needs the proxy's guest listener, which these tests do not start.
        guest_to_host: false,
        remap: pairs.iter().map(|(g, h)| (g.to_string(), *h)).collect(),
        ..Settings::default()
    }
}

/// Sends `msg` through 127.0.0.1:`port` and expects it back.
async fn tcp_round_trip(port: u16, msg: &[u8]) {
    let mut c = tokio::time::timeout(DEADLINE, TcpStream::connect(("127.0.0.1", port)))
        .await
        .expect("connect in time")
        .unwrap_or_else(|e| panic!("connecting to the host port {port}: {e}"));
    c.write_all(msg).await.unwrap();
    c.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, c.read_to_end(&mut got)).await.expect("echo in time").unwrap();
    assert_eq!(got, msg, "the echo through host port {port}");
}

/// Whether anything listens for TCP on 127.0.0.1:`port`: a connection that is not refused
/// (a mirror whose agent is gone accepts, then resets at once — the connect may see either).
async fn tcp_open(port: u16) -> bool {
    match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::ConnectionRefused,
    }
}

/// Waits for 127.0.0.1:`port` to accept (`true`) or refuse (`false`) connections.
async fn wait_tcp(port: u16, open: bool) {
    let start = tokio::time::Instant::now();
    while tcp_open(port).await != open {
        assert!(
            start.elapsed() < DEADLINE,
            "host port {port} still {}",
            if open { "closed" } else { "open" }
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_tcp_server_answers_through_its_remapped_host_port_and_udp_too() {
    let (guest_tcp, guest_udp) = (tcp_echo().await, udp_echo().await);
    let (host_tcp, host_udp) = (free_port(Proto::Tcp), free_port(Proto::Udp));
    let pair = Pair::start(remapped(&[(guest_tcp, host_tcp), (guest_udp, host_udp)])).await;
    pair.guest.listen(Proto::Tcp, guest_tcp);
    pair.guest.listen(Proto::Udp, guest_udp);

    let tcp = pair.wait_forward(Proto::Tcp, guest_tcp, ForwardState::Forwarding).await;
    assert_eq!(tcp.host_port, host_tcp, "the remapped host port");
    tcp_round_trip(host_tcp, b"hello through the mirror").await;
    tcp_round_trip(host_tcp, &vec![7u8; 1 << 20]).await;

    let udp = pair.wait_forward(Proto::Udp, guest_udp, ForwardState::Forwarding).await;
    assert_eq!(udp.host_port, host_udp);
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(("127.0.0.1", host_udp)).await.unwrap();
    client.send(b"datagram").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(DEADLINE, client.recv(&mut buf)).await.expect("the echo in time").unwrap();
    assert_eq!(&buf[..n], b"datagram");

    let s = pair
        .wait_for("the counters", |s| {
            forward(s, Proto::Tcp, guest_tcp).is_some_and(|f| f.connections_total >= 2)
        })
        .await;
    let f = forward(&s, Proto::Tcp, guest_tcp).unwrap();
    assert!(f.bytes_to_guest >= 1 << 20 && f.bytes_from_guest >= 1 << 20, "{f:?}");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_host_networking_off_closes_the_host_port_and_on_opens_it_again() {
    let guest = tcp_echo().await;
    let host = free_port(Proto::Tcp);
    let pair = Pair::start(remapped(&[(guest, host)])).await;
    pair.guest.listen(Proto::Tcp, guest);
    pair.wait_forward(Proto::Tcp, guest, ForwardState::Forwarding).await;
    tcp_round_trip(host, b"on").await;

    pair.set_enabled(false).await;
    pair.wait_forward(Proto::Tcp, guest, ForwardState::Disabled).await;
    wait_tcp(host, false).await;

    pair.set_enabled(true).await;
    pair.wait_forward(Proto::Tcp, guest, ForwardState::Forwarding).await;
    tcp_round_trip(host, b"on again").await;
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ignored_guest_port_is_not_forwarded_and_a_new_remap_moves_the_host_port() {
    let guest = tcp_echo().await;
    let (first, second) = (free_port(Proto::Tcp), free_port(Proto::Tcp));
    let mut settings = remapped(&[(guest, first)]);
    settings.ignore_ports = vec![PortRange { first: guest, last: guest }];
    let pair = Pair::start(settings).await;
    pair.guest.listen(Proto::Tcp, guest);
    pair.wait_forward(Proto::Tcp, guest, ForwardState::Ignored).await;
    assert!(!tcp_open(first).await, "an ignored port's host port is not bound");

    pair.apply(remapped(&[(guest, first)])).await;
    pair.wait_forward(Proto::Tcp, guest, ForwardState::Forwarding).await;
    tcp_round_trip(first, b"no longer ignored").await;

    pair.apply(remapped(&[(guest, second)])).await;
    let f = pair
        .wait_for("the new host port", |s| {
            forward(s, Proto::Tcp, guest)
                .is_some_and(|f| f.host_port == second && f.state == ForwardState::Forwarding)
        })
        .await;
    assert!(forward(&f, Proto::Tcp, guest).is_some());
    wait_tcp(first, false).await;
    tcp_round_trip(second, b"moved").await;
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_port_held_by_a_desktop_program_is_a_conflict_until_it_is_freed() {
    let guest = tcp_echo().await;
    let host = free_port(Proto::Tcp);
    // The desktop program holds the host port on both loopback families.
    let held_v4 = std::net::TcpListener::bind(("127.0.0.1", host)).unwrap();
    let held_v6 = ipv6_loopback().then(|| std::net::TcpListener::bind(("::1", host)).unwrap());
    let mut settings = remapped(&[(guest, host)]);
    settings.take_freed_ports = true;
    let pair = Pair::start(settings).await;
    pair.guest.listen(Proto::Tcp, guest);
    let f = pair.wait_forward(Proto::Tcp, guest, ForwardState::Conflict).await;
    assert!(f.reason.is_some(), "a conflict says why: {f:?}");

    drop(held_v4);
    drop(held_v6);
    pair.wait_forward(Proto::Tcp, guest, ForwardState::Forwarding).await;
    tcp_round_trip(host, b"taken over").await;
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_listener_that_closes_closes_its_host_port() {
    let guest = tcp_echo().await;
    let host = free_port(Proto::Tcp);
    let pair = Pair::start(remapped(&[(guest, host)])).await;
    pair.guest.listen(Proto::Tcp, guest);
    pair.wait_forward(Proto::Tcp, guest, ForwardState::Forwarding).await;
    pair.guest.0.lock().unwrap().clear();
    pair.wait_for("the forward gone", |s| forward(s, Proto::Tcp, guest).is_none()).await;
    wait_tcp(host, false).await;
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_agent_is_lost_its_ports_stay_a_while_then_close() {
    let guest = tcp_echo().await;
    let host = free_port(Proto::Tcp);
    let mut pair = Pair::start(remapped(&[(guest, host)])).await;
    pair.guest.listen(Proto::Tcp, guest);
    pair.wait_forward(Proto::Tcp, guest, ForwardState::Forwarding).await;

    let lost = tokio::time::Instant::now();
    pair.lose_agent().await;
    pair.wait_for("the link down", |s| s.agent != AgentLink::Connected).await;
    // Within STALE_AFTER of the loss, the port is still there (an agent restarting keeps it).
    if lost.elapsed() < hostnet_protocol::session::STALE_AFTER - Duration::from_secs(1) {
        assert!(tcp_open(host).await, "the host port closed before STALE_AFTER");
    }
    let start = tokio::time::Instant::now();
    while tcp_open(host).await {
        assert!(
            start.elapsed() < hostnet_protocol::session::STALE_AFTER + DEADLINE,
            "the host port still open long after STALE_AFTER"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(lost.elapsed() >= hostnet_protocol::session::STALE_AFTER, "closed before STALE_AFTER");
    pair.stop().await;
}

/// Never mirror a mirror: the proxy's watch of this machine offers the guest the desktop's
/// servers, never the proxy's own mirror of a guest port — its registry of own sockets holds
/// every mirror. (The agent in the same process has a registry of its own.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_offers_the_guest_desktop_servers_but_never_its_own_mirrors() {
    let guest = tcp_echo().await;
    let host = free_port(Proto::Tcp);
    let settings = Settings { guest_to_host: true, ..remapped(&[(guest, host)]) };
    let pair = Pair::start_with(settings, true).await;
    pair.guest.listen(Proto::Tcp, guest);
    pair.wait_forward(Proto::Tcp, guest, ForwardState::Forwarding).await;
    // A desktop server that comes after the mirror: once it is offered, the watch has read the
    // tables with the mirror in them.
    let desktop = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let desktop = desktop.local_addr().unwrap().port();
    let s = pair.wait_for("the desktop server offered", |s| offered(s, Proto::Tcp, desktop)).await;
    assert!(!offered(&s, Proto::Tcp, host), "the mirror on {host} was offered back to the guest: {s:#?}");
    tcp_round_trip(host, b"still forwarding").await;
    pair.stop().await;
}
