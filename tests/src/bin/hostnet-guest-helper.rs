//! Runs inside hostnet's test guest image (static binary, started by its `/init`):
//!
//! - `hostnet-guest-helper echo --tcp PORT --udp PORT [--vsock-port PORT]`: TCP and UDP echo
//!   services, the servers a desktop reaches through hostnet in the real-VM test, and the same
//!   TCP echo on a vsock port (the raw link's side of the benchmark's round trips and new
//!   connections).
//! - `hostnet-guest-helper ctl --vsock-port PORT`: a command channel for tests. Each vsock
//!   connection sends one line; it runs under `sh -c` and the answer is the output followed by
//!   `EXIT <code>`. Test images only: it runs anything it is sent.
//! - `hostnet-guest-helper bulk --tcp PORT --vsock-port PORT`: one bulk-transfer service on a
//!   TCP port (reached through hostnet) and on a vsock port (reached over the raw link), the
//!   same code behind both, so the real-VM test measures both paths the same way. Protocol in
//!   [`hostnet_tests::bulk_serve`].
//! - `hostnet-guest-helper bulk-client --to tcp:ADDR:PORT|vsock:CID:PORT --upload|--download
//!   --bytes N`: the other end, run in the guest — one timed transfer to a desktop server, either
//!   through hostnet (`tcp:127.0.0.1:P`, caught by the agent) or over the raw vsock link
//!   (`vsock:2:P`, which hybrid vsock hands to the desktop's `<socket>_P`). Prints
//!   `bulk-client: BYTES bytes in NANOS ns`; the clock runs from before the connect until the
//!   last byte is accounted for, as the desktop side's does.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| -> Option<u32> {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
    };
    match args.first().map(String::as_str) {
        Some("echo") => {
            let tcp = arg("--tcp").unwrap_or(8007) as u16;
            let udp = arg("--udp").unwrap_or(8007) as u16;
            std::thread::spawn(move || udp_echo(udp));
            if let Some(port) = arg("--vsock-port") {
                std::thread::spawn(move || serve_vsock(port, hostnet_tests::echo));
            }
            tcp_echo(tcp);
        }
        Some("ctl") => serve_vsock(arg("--vsock-port").unwrap_or(1100), ctl),
        Some("bulk") => {
            let tcp = arg("--tcp").unwrap_or(8008) as u16;
            let vsock = arg("--vsock-port").unwrap_or(1101);
            std::thread::spawn(move || serve_vsock(vsock, hostnet_tests::bulk_serve));
            let l = TcpListener::bind(("0.0.0.0", tcp)).expect("bulk tcp bind");
            for c in l.incoming().flatten() {
                std::thread::spawn(move || hostnet_tests::bulk_serve(c));
            }
        }
        Some("bulk-client") => {
            let text = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
            let to = text("--to").map(String::as_str).unwrap_or_default();
            let bytes: u64 = text("--bytes").and_then(|v| v.parse().ok()).unwrap_or(32 << 20);
            let upload = args.iter().any(|a| a == "--upload");
            bulk_client(to, bytes, upload);
        }
        Some("conn-client") => {
            let to = args.iter().position(|a| a == "--to").and_then(|i| args.get(i + 1));
            conn_client(to.map(String::as_str).unwrap_or_default(), arg("--count").unwrap_or(100));
        }
        _ => {
            eprintln!(
                "usage: hostnet-guest-helper echo --tcp PORT --udp PORT [--vsock-port PORT] | ctl --vsock-port PORT \
                 | bulk --tcp PORT --vsock-port PORT \
                 | bulk-client --to tcp:ADDR:PORT|vsock:CID:PORT --upload|--download --bytes N \
                 | conn-client --to tcp:ADDR:PORT|vsock:CID:PORT --count N"
            );
            std::process::exit(2);
        }
    }
}

fn tcp_echo(port: u16) {
    let l = TcpListener::bind(("0.0.0.0", port)).expect("tcp echo bind");
    for c in l.incoming().flatten() {
        std::thread::spawn(move || hostnet_tests::echo(c));
    }
}

fn udp_echo(port: u16) {
    let s = UdpSocket::bind(("0.0.0.0", port)).expect("udp echo bind");
    let mut buf = vec![0u8; 65_536];
    loop {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    }
}

/// Serves every connection to vsock port `port` with `serve`, a thread each, forever.
fn serve_vsock(port: u32, serve: fn(Socket)) {
    let s = Socket::new(Domain::VSOCK, Type::STREAM, None).expect("vsock socket");
    s.bind(&SockAddr::vsock(u32::MAX, port)).expect("vsock bind");
    s.listen(16).expect("vsock listen");
    loop {
        let Ok((c, _)) = s.accept() else { continue };
        std::thread::spawn(move || serve(c));
    }
}

/// Longest a bulk-client read may wait: a stalled path fails the transfer, with a message,
/// before the test's command channel gives up on it (20 s).
const BULK_CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

fn bulk_client(to: &str, bytes: u64, upload: bool) {
    let t = Instant::now();
    let mut s = connect_to(to);
    let got = if upload {
        hostnet_tests::bulk_upload(&mut s, bytes)
    } else {
        hostnet_tests::bulk_download(&mut s, bytes)
    };
    println!("bulk-client: {got} bytes in {} ns", t.elapsed().as_nanos());
}

/// `count` new connections to an echo service one after another — connect, a 1-byte request,
/// its answer, close — and each one's time in µs, on one line.
fn conn_client(to: &str, count: u32) {
    let times: Vec<String> = (0..count)
        .map(|_| {
            let t = Instant::now();
            let mut s = connect_to(to);
            s.write_all(b"c").unwrap();
            let mut answer = [0u8; 1];
            std::io::Read::read_exact(&mut s, &mut answer).unwrap();
            assert_eq!(&answer, b"c", "the echo answered something else");
            drop(s);
            t.elapsed().as_micros().to_string()
        })
        .collect();
    println!("conn-client: {}", times.join(" "));
}

/// A connected stream to `tcp:ADDR:PORT` or `vsock:CID:PORT`, reads bounded by
/// [`BULK_CLIENT_TIMEOUT`].
fn connect_to(to: &str) -> Socket {
    let s = if let Some(addr) = to.strip_prefix("tcp:") {
        let addr: SocketAddr = addr.parse().expect("--to tcp:ADDR:PORT");
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_nodelay(true).unwrap();
        Socket::from(s)
    } else if let Some((cid, port)) = to.strip_prefix("vsock:").and_then(|a| a.split_once(':')) {
        let (cid, port) = (cid.parse().expect("vsock CID"), port.parse().expect("vsock port"));
        let s = Socket::new(Domain::VSOCK, Type::STREAM, None).expect("vsock socket");
        s.connect(&SockAddr::vsock(cid, port)).unwrap_or_else(|e| panic!("connect vsock {cid}:{port}: {e}"));
        s
    } else {
        panic!("--to {to:?}: expected tcp:ADDR:PORT or vsock:CID:PORT");
    };
    s.set_read_timeout(Some(BULK_CLIENT_TIMEOUT)).unwrap();
    s
}

/// One command-channel connection: a line run under `sh -c`, its output and `EXIT <code>`.
fn ctl(c: Socket) {
    let mut reader = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let out = std::process::Command::new("/bin/sh").arg("-c").arg(line.trim()).output();
    let mut c = c;
    match out {
        Ok(o) => {
            let _ = c.write_all(&o.stdout);
            let _ = c.write_all(&o.stderr);
            let _ = write!(c, "\nEXIT {}\n", o.status.code().unwrap_or(-1));
        }
        Err(e) => {
            let _ = write!(c, "{e}\nEXIT 127\n");
        }
    }
}
