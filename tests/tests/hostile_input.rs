//! Garbage on the admin socket, against the real proxy: random bytes, a line far over the
//! limit, half lines and vanishing clients, bad lines followed by good ones, unknown fields,
//! a crowd of silent connections, a client trickling its request. The proxy must answer each
//! bad line with an error (or hang up), keep its memory, and keep serving.
//!
//! Needs root (the demo creates a network namespace); `.ci/run` runs as root.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use hostnet_tests::*;

/// `hostnet_admin::IDLE_TIMEOUT`: a connection without a complete request for this long
/// is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// `hostnet_admin::MAX_CLIENTS`.
const MAX_CLIENTS: usize = 64;

fn connect(demo: &Demo) -> UnixStream {
    let s = UnixStream::connect(&demo.admin_socket).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    s
}

/// Reads answer lines until the proxy hangs up; each must be a JSON error.
fn read_errors(s: UnixStream) -> usize {
    let mut n = 0;
    for line in BufReader::new(s).split(b'\n') {
        let line = match line {
            Ok(l) => l,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the proxy neither answered nor hung up: {e}"),
        };
        let v: serde_json::Value = serde_json::from_slice(&line)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {}", String::from_utf8_lossy(&line)));
        assert_eq!(v["ok"], false, "garbage is never accepted: {v}");
        assert!(v["error"].as_str().is_some_and(|e| e.contains("bad request")), "{v}");
        n += 1;
    }
    n
}

#[test]
fn random_bytes_are_answered_with_errors_and_the_api_lives_on() {
    let mut demo = Demo::start();
    let rss_before = rss_kib(demo.pid());
    let mut answered = 0;
    for seed in 0..200u64 {
        // Random bytes, cut into lines now and then so several reach the parser.
        let mut bytes = pattern(2_000 + (seed as usize * 37) % 6_000, seed + 1);
        for (i, b) in bytes.iter_mut().enumerate() {
            if i % 97 == 96 {
                *b = b'\n';
            }
        }
        let mut s = connect(&demo);
        let _ = s.write_all(&bytes); // the proxy may hang up first (not UTF-8)
        let _ = s.shutdown(std::net::Shutdown::Write);
        answered += read_errors(s);
    }
    eprintln!("200 clients of random bytes: {answered} error answers");
    assert!(answered >= 200, "every client got at least one error answer");
    assert!(demo.alive());
    assert_eq!(demo.status()["agent"], "connected");
    let grown = rss_kib(demo.pid()).saturating_sub(rss_before);
    assert!(grown < 8 * 1024, "the proxy grew {grown} KiB on garbage");
    assert!(!demo.panicked());
}

#[test]
fn a_huge_line_is_cut_off_at_the_limit_not_buffered() {
    let mut demo = Demo::start();
    let rss_before = rss_kib(demo.pid());
    // 64 MiB with no newline: the proxy must give up at its 64 KiB line limit.
    const HUGE: usize = 64 << 20;
    let s = connect(&demo);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'{'; 1 << 20];
        let mut sent = 0;
        while sent < HUGE {
            match w.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => return sent,
            }
        }
        sent
    });
    let started = Instant::now();
    let errors = read_errors(s);
    let sent = writer.join().unwrap();
    eprintln!(
        "a {} MiB line: answered {errors} error(s) and hung up after {:?}, having taken {} KiB",
        HUGE >> 20,
        started.elapsed(),
        sent >> 10
    );
    assert_eq!(errors, 1, "one error answer, then the proxy hangs up");
    assert!(sent < HUGE, "the proxy stopped reading long before {HUGE} bytes");
    let grown = rss_kib(demo.pid()).saturating_sub(rss_before);
    assert!(grown < 8 * 1024, "the proxy grew {grown} KiB: it buffered the line");
    assert!(demo.alive());
    assert_eq!(demo.status()["enabled"], true);
}

#[test]
fn half_lines_vanishing_clients_and_bad_lines_before_good_ones() {
    let mut demo = Demo::start();
    // Half a request, then gone — many at once.
    let halves: Vec<UnixStream> = (0..50)
        .map(|i| {
            let mut s = connect(&demo);
            s.write_all(&br#"{"cmd":"update_settings","settings":{"enabled":fal"#[..10 + i % 40]).unwrap();
            s
        })
        .collect();
    drop(halves);
    // Half a request, the write side closed: the rest is answered as a (bad) line.
    let mut s = connect(&demo);
    s.write_all(br#"{"cmd":"set_enab"#).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_errors(s), 1);
    // Bad lines do not cost the connection: a good request after them is served.
    let mut s = connect(&demo);
    for bad in [
        &br#"{"cmd":"reboot"}"#[..],
        br#"{"cmd":"set_enabled","enabled":"no"}"#,
        br#"{"cmd":"update_settings","settings":{"bind":"lan"}}"#,
        br#"{"cmd":"update_settings","settings":{"remap":{"80":0}}}"#,
        br#"[1,2,3]"#,
        br#"{"cmd":"status"}{"cmd":"status"}"#,
    ] {
        s.write_all(bad).unwrap();
        s.write_all(b"\n").unwrap();
    }
    s.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
    for _ in 0..6 {
        let v: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(v["ok"], false, "{v}");
    }
    let v: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(v["ok"], true, "the good request after the bad ones: {v}");
    assert_eq!(v["status"]["enabled"], true, "no bad update was applied");
    // Nothing bad reached the settings file either.
    let settings = std::fs::read_to_string(&demo.config).unwrap_or_default();
    assert!(!settings.contains("lan"), "{settings}");
    assert!(demo.alive());
    assert!(!demo.panicked());
    let mut sink = Vec::new();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = s.read_to_end(&mut sink);
}

/// Reads one answer line; `None` once the proxy has hung up.
fn answer(r: &mut impl BufRead) -> Option<serde_json::Value> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => None,
        Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => None,
        Err(e) => panic!("the proxy neither answered nor hung up: {e}"),
    }
}

/// The answer that says a connection was closed for sending no complete request in time.
fn is_idle_notice(v: &serde_json::Value) -> bool {
    v["ok"] == false && v["error"].as_str().is_some_and(|e| e.contains("no complete request"))
}

#[test]
fn an_unknown_field_is_refused_for_every_request_kind() {
    let mut demo = Demo::start();
    let s = connect(&demo);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    for line in [
        r#"{"cmd":"status","extra":1}"#,
        r#"{"cmd":"status","enabled":false}"#,
        r#"{"cmd":"get_settings","extra":1}"#,
        r#"{"cmd":"set_enabled","enabled":false,"extra":1}"#,
        r#"{"cmd":"update_settings","settings":{"enabled":false},"extra":1}"#,
        r#"{"cmd":"update_settings","settings":{"enabled":false,"extra":1}}"#,
    ] {
        writeln!(w, "{line}").unwrap();
        let v = answer(&mut r).expect("an answer, not a hang-up");
        assert_eq!(v["ok"], false, "{line} was accepted: {v}");
        assert!(v["error"].as_str().is_some_and(|e| e.contains("unknown field")), "{line}: {v}");
    }
    // The same requests without the extra field are served, on the same connection.
    for line in [r#"{"cmd":"status"}"#, r#"{"cmd":"get_settings"}"#] {
        writeln!(w, "{line}").unwrap();
        let v = answer(&mut r).unwrap();
        assert_eq!(v["ok"], true, "{line}: {v}");
    }
    assert_eq!(demo.status()["enabled"], true, "no refused request was applied");
    assert!(demo.alive());
    assert!(!demo.panicked());
}

#[test]
fn silent_connections_past_the_limit_lock_clients_out_for_at_most_the_idle_timeout() {
    let mut demo = Demo::start();
    let started = Instant::now();
    let crowd: Vec<UnixStream> = (0..MAX_CLIENTS + 36).map(|_| connect(&demo)).collect();
    // The first MAX_CLIENTS hold every place: the rest are told "busy" at once, and closed.
    let mut turned_away = 0;
    for s in &crowd[MAX_CLIENTS..] {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let v = answer(&mut r).expect("a busy answer");
        assert!(v["ok"] == false && v["busy"] == true, "{v}");
        assert_eq!(answer(&mut r), None, "closed after the busy answer");
        turned_away += 1;
    }
    // A real client (the CLI) still gets through: it retries until a place frees up.
    let asked = Instant::now();
    let out = demo.cli(&["status", "--json"]);
    let waited = asked.elapsed();
    let since_crowd = started.elapsed();
    assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["enabled"], true);
    eprintln!(
        "{} silent connections ({turned_away} turned away busy): `status` waited {waited:?}, \
         answered {since_crowd:?} after the crowd arrived",
        crowd.len()
    );
    assert!(
        since_crowd < IDLE_TIMEOUT + Duration::from_secs(3),
        "the silent connections held the API for {since_crowd:?}"
    );
    assert!(waited > IDLE_TIMEOUT / 2, "status got through at once ({waited:?}): were the places held?");
    // Each silent connection that held a place was told why, and closed.
    for s in &crowd[..MAX_CLIENTS] {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let v = answer(&mut r).expect("a closing notice");
        assert!(is_idle_notice(&v), "{v}");
        assert_eq!(answer(&mut r), None);
    }
    assert!(demo.log_text().contains("busy"), "the turned-away clients are logged");
    assert!(demo.alive());
    assert!(!demo.panicked());
}

#[test]
fn a_client_trickling_its_request_is_closed_at_the_idle_timeout() {
    let mut demo = Demo::start();
    // A valid request, padded to 211 bytes and sent one byte every 100 ms: it would take 21 s.
    let request = format!("{{\"cmd\":{}\"status\"}}\n", " ".repeat(194));
    let s = connect(&demo);
    let mut w = s.try_clone().unwrap();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut sent = 0;
        for b in request.as_bytes() {
            if w.write_all(std::slice::from_ref(b)).is_err() {
                break;
            }
            sent += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        (sent, request.len())
    });
    let mut r = BufReader::new(s);
    let v = answer(&mut r).expect("a closing notice");
    assert!(is_idle_notice(&v), "the trickled request was not served: {v}");
    assert_eq!(answer(&mut r), None, "closed after the notice");
    let closed = started.elapsed();
    let (sent, len) = writer.join().unwrap();
    eprintln!("a client trickling 10 bytes/s: closed after {closed:?}, having sent {sent} of {len} bytes");
    assert!(
        closed >= IDLE_TIMEOUT - Duration::from_millis(500) && closed < IDLE_TIMEOUT + Duration::from_secs(3),
        "closed after {closed:?}"
    );
    assert!(sent < len, "the proxy stopped the trickle before it was done");
    assert_eq!(demo.status()["enabled"], true);
    assert!(demo.alive());
}
