//! A hostile guest: a fake agent that speaks just enough of the protocol to be connected to,
//! then sends what a compromised VM could. The real `hostnet-proxy run` must stay up, keep
//! answering its admin API, bind nothing but loopback, and never crash.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use hostnet_tests::*;

fn frame(json: &str) -> Vec<u8> {
    let mut v = (json.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(json.as_bytes());
    v
}

const PREFACE: &[u8] = b"HNET\x00\x03";

struct Proxy {
    child: Child,
    dir: PathBuf,
}

impl Proxy {
    fn start(name: &str) -> (Proxy, UnixListener) {
        let dir = std::env::temp_dir().join(format!("hostnet-hostile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let agent = UnixListener::bind(dir.join("agent.sock")).unwrap();
        let child = Command::new(bin("hostnet-proxy"))
            .arg("--admin-socket")
            .arg(dir.join("admin").join("admin.sock"))
            .arg("--config")
            .arg(dir.join("settings.toml"))
            .arg("run")
            .arg("--transport")
            .arg(format!("unix:{}", dir.join("agent.sock").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        (Proxy { child, dir }, agent)
    }

    fn alive_and_answering(&mut self) -> bool {
        if self.child.try_wait().unwrap().is_some() {
            return false;
        }
        let out = Command::new(bin("hostnet-proxy"))
            .arg("--admin-socket")
            .arg(self.dir.join("admin").join("admin.sock"))
            .args(["status", "--json"])
            .output()
            .unwrap();
        out.status.success()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Accepts the proxy's control stream and completes the handshake; returns the stream.
/// Data streams the proxy opens meanwhile (a probe connecting to a forwarded port makes one)
/// arrive on the same socket: they are closed and skipped.
fn accept_control(agent: &UnixListener) -> UnixStream {
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "the proxy did not reconnect its control stream");
        let (mut s, _) = agent.accept().unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        // The proxy's preface, then its `open` frame: control or a data stream.
        let mut preface = [0u8; PREFACE.len()];
        let mut len = [0u8; 4];
        if s.read_exact(&mut preface).is_err() || s.read_exact(&mut len).is_err() {
            continue;
        }
        let mut open = vec![0u8; u32::from_be_bytes(len) as usize];
        if s.read_exact(&mut open).is_err() || !String::from_utf8_lossy(&open).contains("\"control\"") {
            continue;
        }
        s.write_all(PREFACE).unwrap();
        s.write_all(&frame(r#"{"type":"hello","role":"agent","software":"evil"}"#)).unwrap();
        return s;
    }
}

#[test]
fn hostile_control_frames_never_crash_the_proxy_or_widen_its_binds() {
    let (mut proxy, agent) = Proxy::start("frames");
    let (port, other) = (free_port(), free_port());
    let mut s = accept_control(&agent);
    // Listeners on addresses and ports a real agent never reports.
    let snapshot = format!(
        r#"{{"type":"snapshot","listeners":[{{"proto":"tcp","addr":"0.0.0.0","port":{port}}},{{"proto":"tcp","addr":"10.1.2.3","port":{other}}},{{"proto":"tcp","addr":"0.0.0.0","port":0}}]}}"#
    );
    s.write_all(&frame(&snapshot)).unwrap();
    wait_until("the proxy forwards the one legitimate port", || {
        TcpStream::connect(loopback(false, port)).is_ok()
    });
    let listening =
        Command::new("ss").args(["-ltnH", &format!("sport = :{port} or sport = :{other}")]).output().unwrap();
    let listening = String::from_utf8_lossy(&listening.stdout).into_owned();
    for line in listening.lines() {
        let local = line.split_whitespace().nth(3).unwrap_or_default();
        assert!(
            local.starts_with("127.0.0.1:") || local.starts_with("[::1]:"),
            "bound beyond loopback: {listening}"
        );
        assert!(
            !local.ends_with(&format!(":{other}")),
            "a non-loopback guest address was mirrored: {listening}"
        );
    }

    // Garbage after a good start: every kind must end only this stream.
    let hostile: [&[u8]; 5] = [
        &frame(r#"{"type":"snapshot","listeners":"all of them"}"#),
        &(u32::MAX).to_be_bytes(),
        &frame(r#"{"type":"added","listeners":[{"proto":"sctp","addr":"::","port":1}]}"#),
        &frame("\u{0}\u{1}not json"),
        &frame(r#"{"type":"error","message":"bye"}"#),
    ];
    for bytes in hostile {
        let _ = s.write_all(bytes);
        drop(s);
        s = accept_control(&agent); // the proxy reconnects
        s.write_all(&frame(&snapshot)).unwrap();
        assert!(
            proxy.alive_and_answering(),
            "proxy died or stopped answering after {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
}

#[test]
fn endless_added_frames_end_the_link_instead_of_growing_the_proxy() {
    let (mut proxy, agent) = Proxy::start("added");
    let mut s = accept_control(&agent);
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    s.write_all(&frame(r#"{"type":"snapshot","listeners":[]}"#)).unwrap();
    let started = Instant::now();
    // 600 000 distinct guest listeners (loopback addresses × 4 ports), 8 192 a frame: more
    // than any snapshot may hold (524 288).
    let ports = [free_port(), free_port(), free_port(), free_port()];
    let mut n = 0u32;
    for _ in 0..74 {
        let listeners: Vec<String> = (0..8192)
            .map(|_| {
                n += 1;
                let [_, a, b, c] = n.to_be_bytes();
                let port = ports[(n % 4) as usize];
                format!(r#"{{"proto":"tcp","addr":"127.{a}.{b}.{c}","port":{port}}}"#)
            })
            .collect();
        let added = format!(r#"{{"type":"added","listeners":[{}]}}"#, listeners.join(","));
        if s.write_all(&frame(&added)).is_err() {
            break; // the proxy dropped the link (or stopped reading for 20 s)
        }
    }
    eprintln!("added frames sent or refused in {:?}", started.elapsed());
    // Answer heartbeats from now on: only the listener limit may end this link.
    keep_alive(s);
    // The proxy drops the link and opens a new control stream (nothing else connects here).
    agent.set_nonblocking(true).unwrap();
    wait_until("the proxy drops the link and reconnects", || agent.accept().is_ok());
    assert!(proxy.alive_and_answering(), "the proxy is alive and its admin API answers");
}

/// Answers the proxy's heartbeats on `control` so the link stays up, until it closes.
fn keep_alive(control: UnixStream) {
    std::thread::spawn(move || {
        let mut control = control;
        loop {
            let mut len = [0u8; 4];
            if control.read_exact(&mut len).is_err() {
                return;
            }
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            if control.read_exact(&mut body).is_err() {
                return;
            }
            let body = String::from_utf8_lossy(&body).into_owned();
            if let Some(seq) =
                body.strip_prefix(r#"{"type":"heartbeat","seq":"#).and_then(|r| r.strip_suffix('}'))
            {
                let ack = format!(r#"{{"type":"heartbeat_ack","seq":{seq}}}"#);
                if control.write_all(&frame(&ack)).is_err() {
                    return;
                }
            }
        }
    });
}

#[test]
fn a_data_stream_answered_with_garbage_resets_only_that_client() {
    let (mut proxy, agent) = Proxy::start("data");
    let port = free_port();
    let mut control = accept_control(&agent);
    let snapshot =
        format!(r#"{{"type":"snapshot","listeners":[{{"proto":"tcp","addr":"127.0.0.1","port":{port}}}]}}"#);
    control.write_all(&frame(&snapshot)).unwrap();
    keep_alive(control);
    wait_until("the port is forwarded", || {
        let _ = agent.set_nonblocking(true);
        // Drain the probe connections' data streams while waiting.
        while let Ok((_s, _)) = agent.accept() {}
        TcpStream::connect(loopback(false, port)).is_ok()
    });
    agent.set_nonblocking(false).unwrap();
    // The successful probe's own data stream is still on its way: take it off the queue, so
    // each client below meets its own stream.
    drop(agent.accept().unwrap());
    for answer in [
        &b"HNET\x00\x03\x7f\xff\xff\xff"[..],
        b"GARBAGE GARBAGE",
        b"HNET\x00\x03\x00\x00\x00\x16{\"type\":\"connected\"}\xfe\xff\xff\xff",
    ] {
        let mut client = TcpStream::connect(loopback(false, port)).unwrap();
        client.set_read_timeout(Some(DEADLINE)).unwrap();
        client.write_all(b"hello").unwrap();
        let (mut stream, _) = agent.accept().unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut head = [0u8; 64];
        let _ = stream.read(&mut head);
        let _ = stream.write_all(answer);
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let r = client.read(&mut buf);
        assert!(matches!(r, Ok(0) | Err(_)), "the client is closed or reset, never left hanging: {r:?}");
        eprintln!("garbage answer → client closed in {:?}", started.elapsed());
        drop(stream);
        assert!(proxy.alive_and_answering());
    }
}

use std::net::TcpStream;
