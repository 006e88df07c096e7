//! Hyper-V sockets (`AF_HYPERV`), the proxy's transport on Windows hosts.
//!
//! A Hyper-V socket address is a VM id and a service id, both GUIDs. A Linux guest's
//! AF_VSOCK port P is the service `PPPPPPPP-FACB-11E6-BD58-64006A7986D3` (P in hex; Windows
//! calls the template `HV_GUID_VSOCK_TEMPLATE`), so the agent keeps listening on vsock port
//! 1024 unchanged and the proxy connects to `hyperv:<VMID>:1024`.
//!
//! Everything here but [`sys`] is portable and unit-tested on every platform; [`sys`] is the
//! Windows-only socket call, written against `windows-sys` and not compiled by CI (which runs
//! on Linux).

use std::fmt;
use std::str::FromStr;

/// A GUID in Windows' layout (the first three fields are integers, stored little-endian in
/// `SOCKADDR_HV`; the text form prints them as numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid {
    pub data1: u32,
    pub data2: u16,
    pub data3: u16,
    pub data4: [u8; 8],
}

/// `HV_GUID_VSOCK_TEMPLATE`: the service id of vsock port 0.
pub const VSOCK_TEMPLATE: Guid =
    Guid { data1: 0, data2: 0xFACB, data3: 0x11E6, data4: [0xBD, 0x58, 0x64, 0x00, 0x6A, 0x79, 0x86, 0xD3] };

/// The Hyper-V service id of AF_VSOCK port `port`: the template with `port` as its first field.
pub fn vsock_service_id(port: u32) -> Guid {
    Guid { data1: port, ..VSOCK_TEMPLATE }
}

/// The AF_VSOCK port a service id stands for, if it follows the vsock template.
pub fn vsock_port(service: &Guid) -> Option<u32> {
    (Guid { data1: 0, ..*service } == VSOCK_TEMPLATE).then_some(service.data1)
}

impl fmt::Display for Guid {
    /// Upper-case `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`, as the registry shows service ids.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.data4;
        write!(
            f,
            "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
            self.data1, self.data2, self.data3, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
        )
    }
}

/// Why a GUID did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadGuid(pub String);

impl fmt::Display for BadGuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a GUID (expected XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX)", self.0)
    }
}

impl std::error::Error for BadGuid {}

impl FromStr for Guid {
    type Err = BadGuid;

    /// `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`, either case, optionally in braces (as
    /// PowerShell's `(Get-VM name).Id` and the registry print it).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadGuid(s.to_owned());
        let inner = match s.strip_prefix('{') {
            Some(rest) => rest.strip_suffix('}').ok_or_else(bad)?,
            None => s,
        };
        let groups: Vec<&str> = inner.split('-').collect();
        let [a, b, c, d, e] = groups.as_slice() else { return Err(bad()) };
        let lens = [a.len(), b.len(), c.len(), d.len(), e.len()];
        if lens != [8, 4, 4, 4, 12] || !inner.chars().all(|ch| ch == '-' || ch.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let tail = u64::from_str_radix(&format!("{d}{e}"), 16).map_err(|_| bad())?;
        Ok(Guid {
            data1: u32::from_str_radix(a, 16).map_err(|_| bad())?,
            data2: u16::from_str_radix(b, 16).map_err(|_| bad())?,
            data3: u16::from_str_radix(c, 16).map_err(|_| bad())?,
            data4: tail.to_be_bytes(),
        })
    }
}

/// The Windows socket call: a blocking `AF_HYPERV` connect, handed back as a `std` TCP stream
/// (Winsock treats any stream socket alike for `recv`/`send`), which the caller turns into a
/// tokio stream. Not compiled in CI: no Windows target there.
#[cfg(windows)]
pub(crate) mod sys {
    use std::io;
    use std::os::windows::io::FromRawSocket;

    use windows_sys::Win32::Networking::WinSock::{
        self as ws, AF_HYPERV, INVALID_SOCKET, SOCK_STREAM, SOCKADDR, SOCKET_ERROR, WSA_FLAG_OVERLAPPED,
        WSADATA,
    };
    use windows_sys::Win32::System::Hypervisor::{HV_PROTOCOL_RAW, SOCKADDR_HV};
    use windows_sys::core::GUID;

    use super::Guid;

    fn guid(g: &Guid) -> GUID {
        GUID { data1: g.data1, data2: g.data2, data3: g.data3, data4: g.data4 }
    }

    fn last_error() -> io::Error {
        // SAFETY: reads this thread's last Winsock error; no arguments.
        io::Error::from_raw_os_error(unsafe { ws::WSAGetLastError() })
    }

    pub(crate) fn connect(vm_id: &Guid, service_id: &Guid) -> io::Result<std::net::TcpStream> {
        static STARTUP: std::sync::Once = std::sync::Once::new();
        STARTUP.call_once(|| {
            // SAFETY: WSADATA is plain data that WSAStartup fills in; WSAStartup is reference
            // counted, so calling it besides std's own start-up is harmless.
            let mut data: WSADATA = unsafe { std::mem::zeroed() };
            let _ = unsafe { ws::WSAStartup(0x0202, &mut data) };
        });
        // SAFETY: plain socket creation; the result is checked. Overlapped, as tokio's
        // reactor expects of the sockets it polls.
        let s = unsafe {
            ws::WSASocketW(
                i32::from(AF_HYPERV),
                SOCK_STREAM,
                HV_PROTOCOL_RAW as i32,
                std::ptr::null(),
                0,
                WSA_FLAG_OVERLAPPED,
            )
        };
        if s == INVALID_SOCKET {
            return Err(last_error());
        }
        // SAFETY: `s` is a new socket owned by nothing else; the stream closes it on drop
        // (also on the error path below).
        let stream = unsafe { std::net::TcpStream::from_raw_socket(s as u64) };
        let addr =
            SOCKADDR_HV { Family: AF_HYPERV, Reserved: 0, VmId: guid(vm_id), ServiceId: guid(service_id) };
        // SAFETY: `addr` lives across the call and the length is its size.
        let r = unsafe {
            ws::connect(s, (&raw const addr).cast::<SOCKADDR>(), std::mem::size_of::<SOCKADDR_HV>() as i32)
        };
        if r == SOCKET_ERROR {
            return Err(last_error());
        }
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_ports_map_to_the_documented_service_ids() {
        assert_eq!(vsock_service_id(1024).to_string(), "00000400-FACB-11E6-BD58-64006A7986D3");
        assert_eq!(vsock_service_id(1025).to_string(), "00000401-FACB-11E6-BD58-64006A7986D3");
        assert_eq!(vsock_service_id(0).to_string(), "00000000-FACB-11E6-BD58-64006A7986D3");
        assert_eq!(vsock_service_id(u32::MAX).to_string(), "FFFFFFFF-FACB-11E6-BD58-64006A7986D3");
        for port in [0, 1, 1024, 1025, 0x1234_5678, u32::MAX] {
            assert_eq!(vsock_port(&vsock_service_id(port)), Some(port));
        }
        let other: Guid = "00000400-FACB-11E6-BD58-64006A7986D4".parse().unwrap();
        assert_eq!(vsock_port(&other), None, "not the vsock template");
    }

    #[test]
    fn guids_parse_in_every_usual_spelling_and_print_back() {
        let g: Guid = "{a42e7cda-d03f-480c-9cc2-a4de20abb878}".parse().unwrap();
        assert_eq!(g.data1, 0xa42e_7cda);
        assert_eq!(g.data2, 0xd03f);
        assert_eq!(g.data3, 0x480c);
        assert_eq!(g.data4, [0x9c, 0xc2, 0xa4, 0xde, 0x20, 0xab, 0xb8, 0x78]);
        assert_eq!(g.to_string(), "A42E7CDA-D03F-480C-9CC2-A4DE20ABB878");
        assert_eq!("A42E7CDA-D03F-480C-9CC2-A4DE20ABB878".parse::<Guid>(), Ok(g));
    }

    #[test]
    fn bad_guids_are_refused_with_the_expected_form() {
        for s in [
            "",
            "{}",
            "a42e7cda-d03f-480c-9cc2",
            "a42e7cda-d03f-480c-9cc2-a4de20abb87",
            "a42e7cda-d03f-480c-9cc2-a4de20abb8788",
            "a42e7cdad03f480c9cc2a4de20abb878",
            "{a42e7cda-d03f-480c-9cc2-a4de20abb878",
            "g42e7cda-d03f-480c-9cc2-a4de20abb878",
            "+42e7cda-d03f-480c-9cc2-a4de20abb878",
            "a42e7cda-d03f-480c-9cc2-a4de20abb878-",
        ] {
            let err = s.parse::<Guid>().unwrap_err();
            assert!(err.to_string().contains("XXXXXXXX-XXXX"), "{s}: {err}");
        }
    }
}
