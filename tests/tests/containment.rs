//! Containment: what a hostile guest may reach and take on the desktop, end to end through the
//! netns stand-in (`docs/security.md` lists which test holds which threat). Needs root
//! (network namespaces, nftables, `setpriv` to run a desktop server as another user).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hostnet_tests::*;

fn addr(s: &str, port: u16) -> SocketAddr {
    SocketAddr::new(s.parse().unwrap(), port)
}

/// `python3 -m http.server PORT --bind 127.0.0.1` serving `/`, run as user `uid` (65534:
/// `nobody`) with `setpriv`: another user's loopback service on the desktop.
fn web_server_as(uid: u32, port: u16, bind: &str) -> KillOnDrop {
    let child = Command::new("setpriv")
        .args([&format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups"])
        .args([
            "/usr/bin/python3",
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            bind,
            "--directory",
            "/",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("setpriv (util-linux) and /usr/bin/python3 are needed");
    KillOnDrop(child)
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `curl` inside the "VM": the body, or `None` when it fails.
fn guest_curl(demo: &Demo, url: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &demo.netns, "curl", "-sf", "-m", "3", url])
        .output()
        .expect("curl is needed");
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `curl` on the desktop: the body, or `None` when it fails.
fn desktop_curl(url: &str) -> Option<String> {
    let out = Command::new("curl").args(["-sf", "-m", "3", "-g", url]).output().expect("curl is needed");
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `to_host` entries of `status` for `port`.
fn to_host(demo: &Demo, port: u16) -> Vec<serde_json::Value> {
    demo.status()["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["direction"] == "to_host" && f["host_port"] == port)
        .cloned()
        .collect()
}

fn write_settings(demo: &Demo, text: &str) {
    std::fs::create_dir_all(demo.config.parent().unwrap()).unwrap();
    let tmp = demo.config.with_extension("edit");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &demo.config).unwrap();
}

/// The TCP ports the guest intercepts (offered desktop ports), from the agent's nftables set.
fn offered(demo: &Demo) -> std::collections::BTreeSet<u16> {
    let set = demo.nft_set("tcp_ports");
    let elements = set.split_once("elements = {").map(|(_, e)| e).unwrap_or_default();
    let elements = elements.split('}').next().unwrap_or_default();
    elements.split(|c: char| c == ',' || c.is_whitespace()).filter_map(|p| p.parse().ok()).collect()
}

/// A desktop server of this user on a fresh port, and the wait until the guest is offered it:
/// proof that the proxy has read the desktop's listeners since everything before it started.
fn offered_marker(demo: &Demo) -> (u16, GuestServer) {
    let port = free_port();
    let srv = GuestServer::serve(TcpListener::bind(loopback(false, port)).unwrap(), echo);
    wait_until("a desktop server of this user is offered to the guest", || offered(demo).contains(&port));
    (port, srv)
}

#[test]
fn a_desktop_listener_of_another_user_is_not_reachable_from_the_guest() {
    let demo = Demo::start();
    let theirs = free_port();
    let _other = web_server_as(65534, theirs, "127.0.0.1");
    wait_until("the other user's server listens", || {
        desktop_curl(&format!("http://127.0.0.1:{theirs}/")).is_some()
    });
    let (_mine, _marker) = offered_marker(&demo);

    assert!(
        !offered(&demo).contains(&theirs),
        "another user's port is not intercepted in the guest: {:?}",
        offered(&demo)
    );
    assert_eq!(guest_curl(&demo, &format!("http://localhost:{theirs}/")), None, "curl in the guest");
    assert_eq!(guest_curl(&demo, &format!("http://127.0.0.1:{theirs}/")), None, "curl in the guest");
    // Whoever speaks the protocol, the proxy serves only what the policy offers.
    let reply = demo.raw_guest_to_host_open("127.0.0.1", theirs);
    assert!(reply.contains("refused") && reply.contains("not advertised"), "{reply}");
    // And status says why.
    let entries = to_host(&demo, theirs);
    assert!(
        entries.iter().any(|f| f["state"] == "not_offered"
            && f["reason"].as_str().is_some_and(|r| r.contains("another user") && r.contains("other_users"))),
        "{entries:?}"
    );
    let human = String::from_utf8_lossy(&demo.cli(&["status"]).stdout).into_owned();
    assert!(human.contains("not_offered") && human.contains("another user"), "{human}");

    // The user can say otherwise, live.
    write_settings(&demo, "[guest_to_host_policy]\nother_users = true\n");
    wait_until("the other user's port is offered once allowed", || offered(&demo).contains(&theirs));
    let body = guest_curl(&demo, &format!("http://localhost:{theirs}/")).unwrap_or_default();
    assert!(body.contains("Directory listing"), "{body}");
}

#[test]
fn system_ports_and_the_rest_of_127_8_are_not_offered_and_the_lists_apply_live() {
    let demo = Demo::start();
    // A system port of this user's (we are root, so we may bind one) and a server on
    // 127.0.0.53 (where the DNS stub lives).
    let low =
        (900..1000).find_map(|p| TcpListener::bind(("127.0.0.1", p)).ok()).expect("a free port below 1000");
    let low_port = low.local_addr().unwrap().port();
    let _low = GuestServer::serve(low, echo);
    let stub_port = free_port();
    let _stub = GuestServer::serve(TcpListener::bind(("127.0.0.53", stub_port)).unwrap(), echo);
    let (mine, _marker) = offered_marker(&demo);
    let ports = offered(&demo);
    assert!(!ports.contains(&low_port), "port {low_port} below 1024 not offered: {ports:?}");
    assert!(!ports.contains(&stub_port), "127.0.0.53:{stub_port} not offered: {ports:?}");
    let reason = |port| {
        to_host(&demo, port)
            .iter()
            .filter_map(|f| f["reason"].as_str().map(str::to_owned))
            .collect::<String>()
    };
    assert!(reason(low_port).contains("below 1024"), "{}", reason(low_port));
    assert!(reason(stub_port).contains("127.0.0.53"), "{}", reason(stub_port));
    assert!(demo.raw_guest_to_host_open("127.0.0.1", low_port).contains("not advertised"));

    // allow_ports offers the system port, deny_ports withdraws this user's port: live.
    write_settings(
        &demo,
        &format!("[guest_to_host_policy]\nallow_ports = [\"{low_port}\"]\ndeny_ports = [\"{mine}\"]\n"),
    );
    wait_until("the lists apply", || {
        let ports = offered(&demo);
        ports.contains(&low_port) && !ports.contains(&mine)
    });
    let echoed = demo.in_netns(|| {
        let c = TcpStream::connect_timeout(&addr("127.0.0.1", low_port), Duration::from_secs(2)).unwrap();
        echo_round_trip(c, b"allowed")
    });
    assert_eq!(echoed, b"allowed");
    assert!(
        demo.raw_guest_to_host_open("127.0.0.1", mine).contains("not advertised"),
        "a denied port is not served either"
    );
    assert!(reason(mine).contains("deny_ports"), "{}", reason(mine));
    // And 127.0.0.53 stays out whatever the lists say.
    write_settings(
        &demo,
        &format!("[guest_to_host_policy]\nallow_ports = [\"{stub_port}\"]\nother_users = true\n"),
    );
    wait_until("the lists apply", || offered(&demo).contains(&mine));
    assert!(!offered(&demo).contains(&stub_port));
}

/// Whether the conflict of `port` says a bridge listens.
fn bridged(demo: &Demo, port: u16) -> bool {
    demo.forward_status("tcp", port).is_some_and(|f| {
        f["reason"].as_str().is_some_and(|r| r.contains("is bridged to the desktop's server"))
    })
}

#[test]
fn a_port_the_desktop_holds_on_one_family_is_the_desktops_on_both_families() {
    let demo = Demo::start();
    let port = free_port();
    // The README's `python3 -m http.server PORT --bind 127.0.0.1`.
    let desktop = desktop_web_server(port);
    let mut desktop = KillOnDrop(desktop);
    let page = format!("http://127.0.0.1:{port}/Cargo.toml");
    wait_until("the desktop server listens", || desktop_curl(&page).is_some());
    let guest = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), |mut c| {
        let _ = c.write_all(b"HTTP/1.0 200 OK\r\n\r\nthe guest");
    });
    wait_until("status shows the conflict", || {
        demo.forward_status("tcp", port).is_some_and(|f| f["state"] == "conflict")
    });
    let v6 = has_ipv6();
    if v6 {
        wait_until("status shows the bridge", || bridged(&demo, port));
    }
    let f = demo.forward_status("tcp", port).unwrap();
    let reason = f["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("127.0.0.1") && reason.contains("not forwarded on any address"), "{f}");
    if v6 {
        assert!(
            reason.contains(&format!("[::1]:{port} is bridged to the desktop's server on 127.0.0.1:{port}")),
            "status says why [::1] answers: {f}"
        );
    }
    assert!(f["host_addresses"].as_array().unwrap().is_empty(), "nothing of the guest's is bound: {f}");
    let mut urls = vec![format!("http://localhost:{port}/Cargo.toml"), page.clone()];
    if v6 {
        urls.push(format!("http://[::1]:{port}/Cargo.toml"));
    }
    for url in &urls {
        let body = desktop_curl(url).unwrap_or_default();
        assert!(body.contains("hostnet-tests"), "{url} reaches the desktop server: {body:?}");
    }
    assert_eq!(demo.forward_count("tcp", port, "connections_total"), 0, "nothing went to the guest");

    // The desktop server stops: the bridge goes with it, and the retry does not take the freed
    // port meanwhile (a restarting desktop server gets it back, on both families).
    let _ = desktop.0.kill();
    let _ = desktop.0.wait();
    let stopped = Instant::now();
    if v6 {
        wait_until("the bridge is gone", || refused(loopback(true, port)) && !bridged(&demo, port));
        eprintln!("bridge gone {:?} after the desktop server stopped", stopped.elapsed());
    }
    let retries_passed = Instant::now() + 3 * Duration::from_secs(2); // three heartbeat retries
    while Instant::now() < retries_passed {
        assert!(
            refused(loopback(false, port)),
            "the freed port was taken while the desktop server restarted"
        );
        assert!(!v6 || refused(loopback(true, port)), "[::1] was taken while the desktop server restarted");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _desktop = KillOnDrop(desktop_web_server(port));
    wait_until("the restarted desktop server has its port back", || desktop_curl(&page).is_some());
    if v6 {
        let ipv6_page = format!("http://[::1]:{port}/Cargo.toml");
        wait_until("[::1] is bridged to the restarted server", || {
            desktop_curl(&ipv6_page).is_some_and(|b| b.contains("hostnet-tests"))
        });
    }
    // The guest's listener goes: so does the bridge.
    guest.close();
    wait_until("the bridge goes with the guest's port", || {
        demo.forward_status("tcp", port).is_none() && (!v6 || refused(loopback(true, port)))
    });
    assert!(desktop_curl(&page).is_some(), "the desktop server keeps 127.0.0.1");
}

#[test]
fn a_guest_on_thousands_of_ephemeral_ports_leaves_the_desktop_its_source_ports() {
    let _alone = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    raise_fd_limit(16_384);
    let demo = Demo::start();
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let first: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    // 2000 guest listeners inside the desktop's ephemeral range (skipping a port the agent's
    // catch-all interception listeners happen to hold in the guest: they take ephemeral ports).
    let (mut ports, mut _held) = (Vec::new(), Vec::new());
    for p in first + 2000..first + 4100 {
        if ports.len() == 2000 {
            break;
        }
        match demo.try_listen(addr("0.0.0.0", p), false) {
            Ok(l) => {
                ports.push(p);
                _held.push(l);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => panic!("listening on {p} in the VM: {e}"),
        }
    }
    assert_eq!(ports.len(), 2000);
    let in_range = |f: &&serde_json::Value| {
        f["direction"] == "to_guest" && f["guest_port"].as_u64().is_some_and(|p| ports.contains(&(p as u16)))
    };
    let mut status = serde_json::Value::Null;
    wait_until("status lists every guest port", || {
        status = demo.status();
        status["forwards"].as_array().unwrap().iter().filter(in_range).count() == ports.len()
    });
    let forwards: Vec<&serde_json::Value> =
        status["forwards"].as_array().unwrap().iter().filter(in_range).collect();
    let taking = forwards.iter().filter(|f| f["state"] == "forwarding" || f["state"] == "conflict").count();
    let limited: Vec<_> = forwards.iter().filter(|f| f["state"] == "limited").collect();
    assert!(taking <= 256, "{taking} host ports taken in the ephemeral range");
    assert!(limited.len() >= ports.len() - 256, "{} limited", limited.len());
    assert!(
        limited[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ephemeral range") && r.contains("limits.ephemeral_ports")),
        "{}",
        limited[0]
    );
    assert!(
        status["limits"].as_array().is_some_and(|l| !l.is_empty()),
        "status names the limit: {}",
        status["limits"]
    );
    let last = *ports.last().unwrap();
    assert!(refused(loopback(false, last)), "a limited port is not bound on the desktop");
    // The desktop still opens outgoing connections (each takes an ephemeral source port).
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    for i in 0..500 {
        let c = TcpStream::connect(server.local_addr().unwrap());
        assert!(c.is_ok(), "outgoing connection {i}: {c:?}");
        let _ = server.accept().unwrap();
    }
}

#[test]
fn a_flood_of_half_sent_openings_leaves_memory_bounded_and_status_answering() {
    let _alone = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    raise_fd_limit(8_192);
    let demo = Demo::start();
    let before = rss_kib(demo.pid());
    let sock = PathBuf::from("/run/hostnet").join(&demo.netns).join("host.sock");
    // Each announces a 1 MiB opening and sends 256 KiB of it, then waits.
    let mut streams = Vec::new();
    for _ in 0..200 {
        let Ok(s) = UnixStream::connect(&sock) else { continue };
        s.set_nonblocking(true).unwrap();
        let mut wire = b"HNET\x00\x03".to_vec();
        wire.extend_from_slice(&(1u32 << 20).to_be_bytes());
        wire.extend_from_slice(&vec![b' '; 256 << 10]);
        let mut sent = 0;
        let until = Instant::now() + Duration::from_millis(200);
        while sent < wire.len() && Instant::now() < until {
            match (&s).write(&wire[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(_) => break,
            }
        }
        streams.push(s);
    }
    let started = Instant::now();
    demo.status();
    assert!(started.elapsed() < Duration::from_secs(2), "status answered in {:?}", started.elapsed());
    let grown = rss_kib(demo.pid()).saturating_sub(before);
    assert!(grown < 24 << 10, "the proxy grew by {grown} KiB for 200 half-sent openings");
    drop(streams);
}

#[test]
fn guest_to_host_streams_past_the_limit_are_closed_at_once_and_counted() {
    let demo = Demo::start_with(&["--max-guest-streams", "8"]);
    let sock = PathBuf::from("/run/hostnet").join(&demo.netns).join("host.sock");
    // Silent streams: each holds a place until the opening times out.
    let silent: Vec<UnixStream> = (0..40).filter_map(|_| UnixStream::connect(&sock).ok()).collect();
    let mut closed = 0;
    for mut s in &silent {
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        if matches!(s.read(&mut [0u8; 1]), Ok(0)) {
            closed += 1;
        }
    }
    assert!(closed >= 40 - 8, "{closed} of 40 streams closed at once");
    let status = demo.status();
    let limits = status["limits"].as_array().cloned().unwrap_or_default();
    assert!(
        limits.iter().any(|l| l.as_str().is_some_and(|l| l.contains("--max-guest-streams"))),
        "status names the stream limit: {status}"
    );
    let human = String::from_utf8_lossy(&demo.cli(&["status"]).stdout).into_owned();
    assert!(human.contains("limit:") && human.contains("guest→host stream"), "{human}");
}

#[test]
fn a_guest_to_host_endpoint_beyond_loopback_is_refused_unless_asked_for() {
    let dir = std::env::temp_dir().join(format!("hostnet-listen-{}", std::process::id()));
    let run = |extra: &[&str]| {
        Command::new(bin("hostnet-proxy"))
            .arg("--admin-socket")
            .arg(dir.join("admin").join("admin.sock"))
            .arg("--config")
            .arg(dir.join("settings.toml"))
            .args(["run", "--transport", "unix:/nonexistent/agent.sock", "--listen", "tcp:0.0.0.0:0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let out = run(&[]).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--listen-beyond-loopback"), "{err}");
    // With the flag it starts (and keeps waiting for its agent until stopped).
    let mut child = run(&["--listen-beyond-loopback"]);
    wait_until("the proxy serves its admin API", || dir.join("admin").join("admin.sock").exists());
    assert!(child.try_wait().unwrap().is_none(), "runs when asked for");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Taken by the tests that load the machine (thousands of sockets) and by the one that
/// measures latency, so they do not run at once within this file.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How long one pass over this process's descriptors takes (`readlink` of each, as naming a
/// port's holder does for every process).
fn fd_walk_time() -> Duration {
    let start = Instant::now();
    let mut n = 0usize;
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        n += usize::from(std::fs::read_link(fd.path()).is_ok());
    }
    assert!(n > 0);
    start.elapsed()
}

#[test]
fn naming_a_conflicts_holder_does_not_delay_connections_on_other_ports() {
    const CONFLICTS: usize = 6;
    let _alone = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    // Many descriptors in this process, the holder's sockets last: naming the holder walks them all.
    let limit = raise_fd_limit(200_000);
    let null = std::fs::File::open("/dev/null").unwrap();
    let count = 120_000.min(limit.saturating_sub(4_000));
    let fds: Vec<std::fs::File> = (0..count).map_while(|_| null.try_clone().ok()).collect();
    let walk = fd_walk_time();
    eprintln!("{} descriptors; one walk over them: {walk:?}", fds.len());
    let demo = Demo::start();
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(addr("0.0.0.0", port), false), echo);
    connect_when_forwarded(loopback(false, port));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut times = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let start = Instant::now();
                let c = TcpStream::connect(loopback(false, port)).unwrap();
                assert_eq!(echo_round_trip(c, b"ping"), b"ping");
                times.push(start.elapsed());
            }
            times
        })
    };
    // Guest listeners on ports this process holds: each a conflict whose holder is named.
    let mut held = Vec::new();
    for _ in 0..CONFLICTS {
        let (conflict, h) = hold_port();
        held.push(h);
        let _guest = demo.listen(addr("0.0.0.0", conflict), false);
        wait_until("the conflict's holder is named", || {
            demo.forward_status("tcp", conflict).is_some_and(|f| {
                f["reason"].as_str().is_some_and(|r| r.contains(&format!("pid {}", std::process::id())))
            })
        });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut times = probe.join().unwrap();
    times.sort();
    // Each walk under the table's lock held up the connections of its moment: one slow probe
    // per conflict. A single slow one is the machine's business (a busy CPU), not a wait.
    let slow: Vec<Duration> = times.iter().copied().filter(|t| *t > walk / 2).collect();
    eprintln!(
        "{} connections meanwhile, slowest {:?}; slower than half a walk: {slow:?}",
        times.len(),
        times.last()
    );
    assert!(
        slow.len() <= 1,
        "connections on another port waited {slow:?} while {CONFLICTS} holders were named (one walk: {walk:?})"
    );
    drop(fds);
}

/// Listens on TCP `first..last` on `0.0.0.0` and (IPv6-only) `::` inside the "VM", from a
/// process of its own (each process has its own descriptor limit); returns once all listen.
fn guest_listener_process(demo: &Demo, first: u16, last: u16) -> KillOnDrop {
    let script = r#"
import socket, sys, time
socks = []
for p in range(int(sys.argv[1]), int(sys.argv[2])):
    for fam, a in ((socket.AF_INET, '0.0.0.0'), (socket.AF_INET6, '::')):
        s = socket.socket(fam)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind((a, p))
        except OSError:
            continue  # taken in the guest already (the agent's own sockets)
        s.listen(1)
        socks.append(s)
print('ready', flush=True)
time.sleep(600)
"#;
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &demo.netns,
            "/usr/bin/python3",
            "-c",
            script,
            &first.to_string(),
            &last.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "the listeners are up");
    KillOnDrop(child)
}

#[test]
fn a_snapshot_larger_than_one_frame_keeps_the_link_up() {
    let _alone = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    let demo = Demo::start();
    let agent = demo.agent_pid();
    // 30 000 guest listeners: one snapshot frame of them would be ~1.4 MB, over the 1 MiB limit.
    let _a = guest_listener_process(&demo, 40_000, 47_500);
    let _b = guest_listener_process(&demo, 47_500, 55_000);
    let guest_ports = |demo: &Demo| {
        demo.status()["forwards"].as_array().unwrap().iter().filter(|f| f["direction"] == "to_guest").count()
    };
    wait_until("the proxy knows every guest port", || guest_ports(&demo) >= 14_000);
    // The agent restarts (as after a crash or a VM resume): it resyncs with a full snapshot.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), nix::sys::signal::Signal::SIGKILL);
    wait_until("the proxy notices", || demo.log_text().contains("lost the agent"));
    wait_until("the link is back with the whole snapshot", || {
        let status = demo.status();
        status["agent"] == "connected"
            && status["forwards"].as_array().unwrap().iter().filter(|f| f["direction"] == "to_guest").count()
                >= 14_000
    });
    assert!(!demo.log_text().contains("exceeds the limit"), "no frame over the limit");
}
