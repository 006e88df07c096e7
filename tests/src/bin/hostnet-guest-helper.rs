//! Runs inside hostnet's test guest image (static binary, started by its `/init`):
//!
//! - `hostnet-guest-helper echo --tcp PORT --udp PORT`: TCP and UDP echo services, the servers
//!   a desktop reaches through hostnet in the real-VM test.
//! - `hostnet-guest-helper ctl --vsock-port PORT`: a command channel for tests. Each vsock
//!   connection sends one line; it runs under `sh -c` and the answer is the output followed by
//!   `EXIT <code>`. Test images only: it runs anything it is sent.
//! - `hostnet-guest-helper bulk --tcp PORT --vsock-port PORT`: one bulk-transfer service on a
//!   TCP port (reached through hostnet) and on a vsock port (reached over the raw link), the
//!   same code behind both, so the real-VM test measures both paths the same way. Protocol in
//!   [`hostnet_tests::bulk_serve`].

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, UdpSocket};

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
            tcp_echo(tcp);
        }
        Some("ctl") => ctl(arg("--vsock-port").unwrap_or(1100)),
        Some("bulk") => {
            let tcp = arg("--tcp").unwrap_or(8008) as u16;
            let vsock = arg("--vsock-port").unwrap_or(1101);
            std::thread::spawn(move || bulk_vsock(vsock));
            let l = TcpListener::bind(("0.0.0.0", tcp)).expect("bulk tcp bind");
            for c in l.incoming().flatten() {
                std::thread::spawn(move || hostnet_tests::bulk_serve(c));
            }
        }
        _ => {
            eprintln!(
                "usage: hostnet-guest-helper echo --tcp PORT --udp PORT | ctl --vsock-port PORT \
                 | bulk --tcp PORT --vsock-port PORT"
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

fn vsock_listener(port: u32) -> Socket {
    let s = Socket::new(Domain::VSOCK, Type::STREAM, None).expect("vsock socket");
    s.bind(&SockAddr::vsock(u32::MAX, port)).expect("vsock bind");
    s.listen(16).expect("vsock listen");
    s
}

fn bulk_vsock(port: u32) {
    let s = vsock_listener(port);
    loop {
        let Ok((c, _)) = s.accept() else { continue };
        std::thread::spawn(move || hostnet_tests::bulk_serve(c));
    }
}

fn ctl(port: u32) {
    let s = vsock_listener(port);
    loop {
        let Ok((c, _)) = s.accept() else { continue };
        std::thread::spawn(move || {
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
        });
    }
}
