//! The agent drops the privileges it does not need once it has started: only `CAP_NET_ADMIN`
//! (guest→host) is left, in every thread, `no_new_privs` is set, and forwarding and guest→host
//! (whose rules `nft` installs after the drop) still work. Started as root with `--user` (as
//! the demo, the VM image and the service files start it) it becomes that unprivileged user,
//! with no supplementary groups. Without root it starts all the same, and as a non-root user
//! given `CAP_NET_ADMIN` its `nft` still gets it.
//!
//! Needs root (network namespaces, `setpriv` to become another user).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use hostnet_tests::*;

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_MODULE: u32 = 16;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The capability masks and `NoNewPrivs` of every thread of `pid`, from
/// `/proc/<pid>/task/<tid>/status`: thread id → field → value.
fn thread_caps(pid: i32) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut threads = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap();
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        let mut fields = BTreeMap::new();
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            let parsed = match key {
                "CapInh" | "CapPrm" | "CapEff" | "CapBnd" | "CapAmb" => u64::from_str_radix(value, 16).ok(),
                "NoNewPrivs" => value.parse().ok(),
                _ => None,
            };
            if let Some(v) = parsed {
                fields.insert(key.to_owned(), v);
            }
        }
        threads.insert(task.file_name().to_string_lossy().into_owned(), fields);
    }
    assert!(!threads.is_empty(), "no threads found for {pid}");
    threads
}

fn bit(cap: u32) -> u64 {
    1 << cap
}

#[test]
fn the_demo_agent_keeps_only_net_admin_and_still_forwards_both_ways() {
    let demo = Demo::start();
    let agent = demo.agent_pid();
    let threads = thread_caps(agent);
    eprintln!("agent {agent}: {} threads, {:x?}", threads.len(), threads.values().next().unwrap());
    assert!(threads.len() > 1, "the agent runs its async runtime's threads: {threads:?}");
    for (tid, caps) in &threads {
        for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"] {
            let mask = caps[set];
            for (name, cap) in [
                ("CAP_SYS_ADMIN", CAP_SYS_ADMIN),
                ("CAP_SYS_MODULE", CAP_SYS_MODULE),
                ("CAP_DAC_OVERRIDE", CAP_DAC_OVERRIDE),
                ("CAP_SYS_PTRACE", CAP_SYS_PTRACE),
                ("CAP_SETUID", CAP_SETUID),
                ("CAP_SETPCAP", CAP_SETPCAP),
                ("CAP_NET_RAW", CAP_NET_RAW),
                ("CAP_BPF", CAP_BPF),
                ("CAP_PERFMON", CAP_PERFMON),
            ] {
                assert_eq!(mask & bit(cap), 0, "thread {tid} still has {name} in {set} ({mask:#x})");
            }
            // Exactly what guest→host needs, nothing else.
            assert_eq!(mask, bit(CAP_NET_ADMIN), "thread {tid}: {set} is {mask:#x}");
        }
        assert_eq!(caps["NoNewPrivs"], 1, "thread {tid} has no_new_privs");
    }
    let log = demo.log_text();
    assert!(log.contains("privileges: dropped") && log.contains("kept: CAP_NET_ADMIN;"), "{log}");

    // Host → guest forwarding works.
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(loopback(false, port), false), echo);
    let (c, _) = connect_when_forwarded(loopback(false, port));
    assert_eq!(echo_round_trip(c, b"after the drop"), b"after the drop");

    // Guest → host: the port is added to the rules now, by an `nft` the reduced agent runs.
    let desktop = std::net::TcpListener::bind(loopback(false, 0)).unwrap();
    let desktop_port = desktop.local_addr().unwrap().port();
    let _desktop = GuestServer::serve(desktop, echo);
    wait_until("the desktop port is intercepted in the guest", || {
        demo.nft_set("tcp_ports").contains(&desktop_port.to_string())
    });
    let echoed =
        demo.in_netns(|| echo_round_trip(TcpStream::connect(loopback(false, desktop_port)).unwrap(), b"tcp"));
    assert_eq!(echoed, b"tcp");
    // UDP: each new flow gets a transparent socket of its own, opened now, after the drop.
    let udp_port = free_port();
    let _udp = UdpEcho::start_here(loopback(false, udp_port));
    let target = loopback(false, udp_port);
    wait_until("the UDP port is intercepted in the guest", || {
        demo.nft_set("udp_ports").contains(&udp_port.to_string())
    });
    let answered = demo.in_netns(move || udp_echo(&udp_client(target), b"udp"));
    assert_eq!(answered.as_deref(), Some(&b"udp"[..]));
    let log = demo.log_text();
    assert!(!log.contains("updating guest→host ports failed"), "{log}");
    assert!(!demo.panicked(), "{log}");
}

/// The fields of `/proc/<pid>/status` (the main thread), as text.
fn status_fields(pid: i32) -> BTreeMap<String, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// Real, effective, saved and filesystem ids of a `Uid:` or `Gid:` line.
fn ids(field: &str) -> Vec<u32> {
    field.split_whitespace().map(|id| id.parse().unwrap()).collect()
}

/// `nobody`'s uid and gid on this machine: the demo's agent user by default.
fn nobody() -> (u32, u32) {
    let user = nix::unistd::User::from_name("nobody").unwrap().expect("this machine has a user `nobody`");
    (user.uid.as_raw(), user.gid.as_raw())
}

fn owner(path: &std::path::Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

#[test]
fn the_demo_agent_runs_as_an_unprivileged_user_with_only_net_admin_and_reaches_the_desktop() {
    let demo = Demo::start();
    let agent = demo.agent_pid();
    let (uid, gid) = nobody();
    assert!(uid != 0 && gid != 0);
    wait_until("the agent has switched to its user", || {
        ids(&status_fields(agent)["Uid"]) != [0, 0, 0, 0] && demo.log_text().contains("running as")
    });
    let status = status_fields(agent);
    assert_eq!(ids(&status["Uid"]), [uid; 4], "real, effective, saved, fs uid: {status:?}");
    assert_eq!(ids(&status["Gid"]), [gid; 4], "real, effective, saved, fs gid: {status:?}");
    assert_eq!(status["Groups"], "", "no supplementary groups");
    for (tid, caps) in thread_caps(agent) {
        for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
            assert_eq!(caps[set], bit(CAP_NET_ADMIN), "thread {tid}: {set} is {:#x}", caps[set]);
        }
        assert_eq!(caps["NoNewPrivs"], 1, "thread {tid}");
    }
    let log = demo.log_text();
    assert!(log.contains(&format!("running as nobody (uid {uid}, gid {gid}) with CAP_NET_ADMIN")), "{log}");
    // Its run directory is its own and private; both sockets in it are its to use.
    let run_dir = std::path::Path::new("/run/hostnet").join(&demo.netns);
    assert_eq!(owner(&run_dir), (uid, gid, 0o700), "{}", run_dir.display());
    assert_eq!(owner(&run_dir.join("agent.sock")).0, uid, "the agent made its socket as itself");
    assert_eq!(owner(&run_dir.join("host.sock")).0, uid, "the proxy's socket was handed to the agent");

    // Host → guest forwarding works.
    let port = free_port();
    let _srv = GuestServer::serve(demo.listen(loopback(false, port), false), echo);
    let (c, _) = connect_when_forwarded(loopback(false, port));
    assert_eq!(echo_round_trip(c, b"as nobody"), b"as nobody");
    // Guest → host: `nft` run by the unprivileged agent installs the rules, and the agent, not
    // root, opens the stream on the proxy's socket.
    let desktop = std::net::TcpListener::bind(loopback(false, 0)).unwrap();
    let desktop_port = desktop.local_addr().unwrap().port();
    let _desktop = GuestServer::serve(desktop, echo);
    wait_until("the desktop port is intercepted in the guest", || {
        demo.nft_set("tcp_ports").contains(&desktop_port.to_string())
    });
    let echoed = demo.in_netns(|| {
        echo_round_trip(TcpStream::connect(loopback(false, desktop_port)).unwrap(), b"to the desktop")
    });
    assert_eq!(echoed, b"to the desktop");
    let log = demo.log_text();
    assert!(!log.contains("updating guest→host ports failed"), "{log}");
    assert!(!log.contains("Permission denied"), "{log}");
    assert!(!demo.panicked(), "{log}");
}

#[test]
fn the_demo_agent_user_can_be_chosen_and_an_unknown_one_is_refused() {
    let demo = Demo::start_with(&["--agent-user", "4242:4243"]);
    let agent = demo.agent_pid();
    wait_until("the agent logs who it became", || demo.log_text().contains("running as uid 4242, gid 4243"));
    let status = status_fields(agent);
    assert_eq!(ids(&status["Uid"]), [4242; 4], "{status:?}");
    assert_eq!(ids(&status["Gid"]), [4243; 4], "{status:?}");
    drop(demo);

    let pid = std::process::id();
    let Err(refused) = Demo::start_named(&format!("hn-pu{pid}"), &["--agent-user", "no-such-hostnet-user"])
    else {
        panic!("the demo refuses a user that does not exist");
    };
    assert!(refused.contains("no such user"), "{refused}");
    let Err(refused) = Demo::start_named(&format!("hn-pr{pid}"), &["--agent-user", "root"]) else {
        panic!("the demo refuses to run the agent as root");
    };
    assert!(refused.contains("is root"), "{refused}");
}

#[test]
fn the_agent_refuses_a_user_that_does_not_exist_before_it_starts() {
    let out = Command::new(bin("hostnet-agent"))
        .args(["--transport", "tcp:127.0.0.1:0", "--no-listener-events", "--user", "no-such-hostnet-user"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("user \"no-such-hostnet-user\" does not exist in /etc/passwd"), "{stderr}");
    assert!(!stderr.contains("listening for the proxy"), "it stopped before serving: {stderr}");
}

/// A directory of this test run's own.
fn dir_for(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hostnet-priv-{}-{name}", std::process::id()))
}

/// An agent started by `setpriv` as user `nobody`; killed (and its namespace removed) on drop.
struct Unprivileged {
    child: Child,
    log: PathBuf,
    dir: PathBuf,
    netns: Option<String>,
}

impl Unprivileged {
    /// `setpriv_args` choose the capabilities it starts with; `netns` runs it in a new
    /// namespace (so its `nft` touches nothing of this machine's).
    fn start(name: &str, setpriv_args: &[&str], netns: bool, agent_args: &[String]) -> Unprivileged {
        require_root();
        let dir = dir_for(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // `nobody` creates its socket there.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let netns = netns.then(|| {
            let ns = format!("hn-priv{}-{name}", std::process::id());
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            assert!(Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success());
            assert!(
                Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]).status().unwrap().success()
            );
            ns
        });
        let log = dir.join("agent.log");
        let mut cmd = match &netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "setpriv"]);
                c
            }
            None => Command::new("setpriv"),
        };
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(setpriv_args)
            .arg(bin("hostnet-agent"))
            .args(agent_args)
            .env("RUST_LOG", "info")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let child = cmd.spawn().expect("setpriv is needed; the README's setup installs it (util-linux)");
        Unprivileged { child, log, dir, netns }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_log(&mut self, line: &str) {
        wait_until(&format!("the agent logs {line:?}"), || {
            let exited = self.child.try_wait().unwrap();
            assert!(exited.is_none(), "the agent exited ({exited:?}):\n{}", self.log_text());
            self.log_text().contains(line)
        });
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGTERM; asserts a clean exit.
    fn stop(mut self) {
        signal(self.pid(), nix::sys::signal::Signal::SIGTERM);
        let mut status = None;
        wait_until("the agent exits", || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        assert!(status.unwrap().success(), "the agent stopped cleanly:\n{}", self.log_text());
    }
}

impl Drop for Unprivileged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log_text());
        }
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn without_capabilities_the_agent_starts_and_serves() {
    let port = free_port();
    let transport = format!("tcp:127.0.0.1:{port}");
    let mut agent = Unprivileged::start("none", &[], false, &["--transport".into(), transport]);
    agent.wait_for_log("hostnet-agent listening for the proxy");
    assert!(agent.log_text().contains("privileges: no capabilities to drop"), "{}", agent.log_text());
    TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).expect("the agent listens");
    for (tid, caps) in thread_caps(agent.pid()) {
        assert_eq!(caps["CapEff"], 0, "thread {tid}");
        assert_eq!(caps["CapPrm"], 0, "thread {tid}");
        assert_eq!(caps["NoNewPrivs"], 1, "thread {tid}");
    }
    agent.stop();
}

#[test]
fn a_non_root_agent_given_net_admin_passes_it_to_nft() {
    // `nobody` with CAP_NET_ADMIN as its only (ambient) capability, as a service manager would
    // start it. `nft` has no file capabilities: it gets CAP_NET_ADMIN only if the agent keeps
    // it ambient.
    let dir = dir_for("ambient");
    let args = [
        "--transport".to_owned(),
        format!("unix:{}", dir.join("agent.sock").display()),
        "--host-transport".to_owned(),
        format!("unix:{}", dir.join("host.sock").display()),
    ];
    let agent =
        Unprivileged::start("ambient", &["--inh-caps=+net_admin", "--ambient-caps=+net_admin"], true, &args);
    // Guest→host starts after the agent listens: wait for the verdict either way.
    wait_until("the agent says whether guest→host is on", || {
        let log = agent.log_text();
        log.contains("guest→host interception ready") || log.contains("guest→host is off")
    });
    let log = agent.log_text();
    assert!(log.contains("kept: CAP_NET_ADMIN"), "{log}");
    assert!(
        log.contains("guest→host interception ready"),
        "nft ran with CAP_NET_ADMIN (its rules checked out):\n{log}"
    );
    assert!(!log.contains("guest→host is off"), "{log}");
    for (tid, caps) in thread_caps(agent.pid()) {
        assert_eq!(caps["CapEff"], bit(CAP_NET_ADMIN), "thread {tid}");
        assert_eq!(caps["CapAmb"], bit(CAP_NET_ADMIN), "thread {tid}");
        assert_eq!(caps["NoNewPrivs"], 1, "thread {tid}");
    }
    agent.stop();
}
