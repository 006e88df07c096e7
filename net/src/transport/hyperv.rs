//! Hyper-V sockets (`AF_HYPERV`), the proxy's transport on Windows hosts.
//!
//! A Hyper-V socket address is a VM id and a service id, both GUIDs. A Linux guest's
//! AF_VSOCK port P is the service `PPPPPPPP-FACB-11E6-BD58-64006A7986D3` (P in hex; Windows
//! calls the template `HV_GUID_VSOCK_TEMPLATE`), so the agent keeps listening on vsock port
//! 1024 unchanged and the proxy connects to `hyperv:<VMID>:1024`.
//!
//! The proxy also listens on a Hyper-V socket for the agent's guest→host streams (vsock port
//! 1025): `--listen hyperv:VMID:1025` takes connections from that VM only, `hyperv:any:1025`
//! (`HV_GUID_WILDCARD`) from every VM on the machine.
//!
//! Everything here but [`sys`] is portable and unit-tested on every platform — GUIDs, the
//! `SOCKADDR_HV` bytes both socket calls use, the accept thread; [`sys`] is the Windows-only
//! socket calls, written against `windows-sys` 0.61 and not compiled by CI (which runs on
//! Linux).

use std::fmt;
use std::io;
use std::str::FromStr;
use std::time::Duration;

use tokio::sync::mpsc;

/// A GUID (the `uuid` crate's), printed in upper case as Windows' registry and PowerShell
/// show service ids, and laid out in `SOCKADDR_HV` as Windows keeps it in memory: the first
/// three fields little-endian ([`Guid::to_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub uuid::Uuid);

/// `HV_GUID_VSOCK_TEMPLATE`: the service id of vsock port 0.
pub const VSOCK_TEMPLATE: Guid =
    Guid(uuid::Uuid::from_fields(0, 0xFACB, 0x11E6, &[0xBD, 0x58, 0x64, 0x00, 0x6A, 0x79, 0x86, 0xD3]));

/// `HV_GUID_WILDCARD` (all zeros): as a listener's VM id, connections from every partition.
pub const WILDCARD: Guid = Guid(uuid::Uuid::nil());

/// The Hyper-V service id of AF_VSOCK port `port`: the template with `port` as its first field.
pub fn vsock_service_id(port: u32) -> Guid {
    let (_, d2, d3, d4) = VSOCK_TEMPLATE.0.as_fields();
    Guid(uuid::Uuid::from_fields(port, d2, d3, d4))
}

/// The AF_VSOCK port a service id stands for, if it follows the vsock template.
pub fn vsock_port(service: &Guid) -> Option<u32> {
    let (port, ..) = service.0.as_fields();
    (vsock_service_id(port) == *service).then_some(port)
}

impl Guid {
    /// The GUID as Windows keeps it in memory (and in `SOCKADDR_HV`): the first three fields
    /// little-endian, then the last eight bytes as they are.
    pub fn to_bytes(&self) -> [u8; 16] {
        self.0.to_bytes_le()
    }

    /// The inverse of [`Guid::to_bytes`].
    pub fn from_bytes(b: [u8; 16]) -> Guid {
        Guid(uuid::Uuid::from_bytes_le(b))
    }
}

impl fmt::Display for Guid {
    /// Upper-case `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`, as the registry shows service ids.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}", self.0)
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
    /// PowerShell's `(Get-VM name).Id` and the registry print it); the `uuid` crate's other
    /// spellings (32 digits alone, `urn:uuid:`) are taken too.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(Guid).map_err(|_| BadGuid(s.to_owned()))
    }
}

/// `AF_HYPERV`, the address family of Hyper-V sockets.
pub const AF_HYPERV: u16 = 34;

/// Size of a `SOCKADDR_HV`: family (2), reserved (2), VM id (16), service id (16).
pub const SOCKADDR_HV_LEN: usize = 36;

/// A Hyper-V socket address: a VM (partition) and a service on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HvAddr {
    pub vm_id: Guid,
    pub service_id: Guid,
}

impl HvAddr {
    /// AF_VSOCK port `port` of the VM `vm_id` — or, listening, of the VMs it stands for
    /// ([`WILDCARD`]).
    pub fn vsock(vm_id: Guid, port: u32) -> HvAddr {
        HvAddr { vm_id, service_id: vsock_service_id(port) }
    }

    /// The `SOCKADDR_HV` both socket calls pass to Winsock, byte for byte (every Windows
    /// target is little-endian).
    pub fn to_sockaddr(&self) -> [u8; SOCKADDR_HV_LEN] {
        let mut b = [0u8; SOCKADDR_HV_LEN];
        b[..2].copy_from_slice(&AF_HYPERV.to_le_bytes());
        b[4..20].copy_from_slice(&self.vm_id.to_bytes());
        b[20..].copy_from_slice(&self.service_id.to_bytes());
        b
    }

    /// Reads a `SOCKADDR_HV` (as `accept` fills it in); `None` if it is short or of another
    /// family.
    pub fn from_sockaddr(b: &[u8]) -> Option<HvAddr> {
        let b: [u8; SOCKADDR_HV_LEN] = b.get(..SOCKADDR_HV_LEN)?.try_into().ok()?;
        let [f0, f1, _, _, ids @ ..] = b;
        if u16::from_le_bytes([f0, f1]) != AF_HYPERV {
            return None;
        }
        let (vm_id, service_id) = ids.split_at(16);
        Some(HvAddr {
            vm_id: Guid::from_bytes(vm_id.try_into().ok()?),
            service_id: Guid::from_bytes(service_id.try_into().ok()?),
        })
    }
}

impl fmt::Display for HvAddr {
    /// `hyperv:VMID:PORT` for a vsock service, `hyperv:VMID:SERVICEID` otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match vsock_port(&self.service_id) {
            Some(port) => write!(f, "hyperv:{}:{port}", self.vm_id),
            None => write!(f, "hyperv:{}:{}", self.vm_id, self.service_id),
        }
    }
}

/// How long the accept thread waits for one connection before it looks whether anyone still
/// wants them: the thread, and the listener it owns, end at most this long after the receiver.
pub(crate) const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// Connections accepted but not yet taken by the async side.
const ACCEPT_QUEUE: usize = 16;

/// Connections accepted on a thread of its own, for async code. Neither std nor tokio accepts
/// on a listener whose addresses are not IP (both turn the peer's address into a `SocketAddr`
/// and fail), hence a thread for the Hyper-V listener.
#[derive(Debug)]
pub(crate) struct AcceptThread<S> {
    accepted: tokio::sync::Mutex<mpsc::Receiver<io::Result<S>>>,
}

#[cfg_attr(not(any(windows, test)), expect(dead_code, reason = "the Windows listener's; tested everywhere"))]
impl<S: Send + 'static> AcceptThread<S> {
    /// Runs `accept` — one blocking wait of at most the given time for a connection, `Ok(None)`
    /// when none came — in a loop on a new thread. The thread, and whatever `accept` owns (the
    /// listener), end at most [`ACCEPT_POLL`] after this value is dropped.
    pub(crate) fn spawn(
        mut accept: impl FnMut(Duration) -> io::Result<Option<S>> + Send + 'static,
    ) -> io::Result<AcceptThread<S>> {
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        std::thread::Builder::new().name("hyperv-accept".into()).spawn(move || {
            while !tx.is_closed() {
                let Some(item) = accept(ACCEPT_POLL).transpose() else { continue };
                let failed = item.is_err();
                if tx.blocking_send(item).is_err() {
                    return;
                }
                if failed {
                    // A lasting error (the listener gone bad) must not spin the thread.
                    std::thread::sleep(ACCEPT_POLL);
                }
            }
        })?;
        Ok(AcceptThread { accepted: tokio::sync::Mutex::new(rx) })
    }

    /// The next connection (or accept error).
    pub(crate) async fn next(&self) -> io::Result<S> {
        let next = self.accepted.lock().await.recv().await;
        next.unwrap_or_else(|| Err(io::Error::other("the Hyper-V accept thread has stopped")))
    }
}

/// The proxy's Hyper-V listener: [`sys::listen`], with [`sys::accept`] on an [`AcceptThread`].
#[cfg(windows)]
#[derive(Debug)]
pub(crate) struct HyperVListener(AcceptThread<(std::net::TcpStream, String)>);

#[cfg(windows)]
impl HyperVListener {
    pub(crate) fn bind(addr: &HvAddr) -> io::Result<HyperVListener> {
        let listener = sys::listen(addr)?;
        Ok(HyperVListener(AcceptThread::spawn(move |wait| sys::accept(&listener, wait))?))
    }

    /// The next guest connection as a tokio stream, and its peer for logs.
    pub(crate) async fn accept(&self) -> io::Result<(tokio::net::TcpStream, String)> {
        let (stream, peer) = self.0.next().await?;
        stream.set_nonblocking(true)?;
        Ok((tokio::net::TcpStream::from_std(stream)?, peer))
    }
}

/// The Windows socket calls: a blocking `AF_HYPERV` connect, and a listener with a bounded
/// wait for the next connection (for an [`AcceptThread`]). Sockets are handed back as `std`
/// TCP types — Winsock treats every stream socket alike for `recv`/`send`/`accept` — which the
/// caller turns into tokio streams. Addresses are [`HvAddr::to_sockaddr`]'s bytes. Not
/// compiled in CI: no Windows target there.
#[cfg(windows)]
pub(crate) mod sys {
    use std::io;
    use std::os::windows::io::{AsRawSocket, FromRawSocket};
    use std::time::Duration;

    use windows_sys::Win32::Networking::WinSock::{
        self as ws, INVALID_SOCKET, POLLRDNORM, SOCK_STREAM, SOCKADDR, SOCKET, SOCKET_ERROR,
        WSA_FLAG_OVERLAPPED, WSADATA, WSAPOLLFD,
    };
    use windows_sys::Win32::System::Hypervisor::{HV_PROTOCOL_RAW, SOCKADDR_HV};

    use super::{AF_HYPERV, HvAddr, SOCKADDR_HV_LEN};

    const _: () = assert!(std::mem::size_of::<SOCKADDR_HV>() == SOCKADDR_HV_LEN);

    /// Pending connections the listener holds (go-winio's figure).
    const LISTEN_BACKLOG: i32 = 16;

    fn last_error() -> io::Error {
        // SAFETY: reads this thread's last Winsock error; no arguments.
        io::Error::from_raw_os_error(unsafe { ws::WSAGetLastError() })
    }

    fn sockaddr(addr: &HvAddr) -> SOCKADDR_HV {
        // SAFETY: SOCKADDR_HV is plain data of exactly these bytes (size checked above).
        unsafe { std::mem::transmute::<[u8; SOCKADDR_HV_LEN], SOCKADDR_HV>(addr.to_sockaddr()) }
    }

    /// A new overlapped `AF_HYPERV` stream socket, owned by the returned value.
    fn socket<T: FromRawSocket>() -> io::Result<(T, SOCKET)> {
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
        // SAFETY: `s` is a new socket owned by nothing else; the value closes it on drop
        // (also on the callers' error paths).
        Ok((unsafe { T::from_raw_socket(s as u64) }, s))
    }

    pub(crate) fn connect(addr: &HvAddr) -> io::Result<std::net::TcpStream> {
        let (stream, s) = socket::<std::net::TcpStream>()?;
        let sa = sockaddr(addr);
        // SAFETY: `sa` lives across the call and the length is its size.
        if unsafe { ws::connect(s, (&raw const sa).cast::<SOCKADDR>(), SOCKADDR_HV_LEN as i32) }
            == SOCKET_ERROR
        {
            return Err(last_error());
        }
        Ok(stream)
    }

    /// A non-blocking listener on `addr` (a VM id or the wildcard, and a service id).
    pub(crate) fn listen(addr: &HvAddr) -> io::Result<std::net::TcpListener> {
        let (listener, s) = socket::<std::net::TcpListener>()?;
        let sa = sockaddr(addr);
        // SAFETY: `sa` lives across the call and the length is its size.
        if unsafe { ws::bind(s, (&raw const sa).cast::<SOCKADDR>(), SOCKADDR_HV_LEN as i32) } == SOCKET_ERROR
        {
            return Err(last_error());
        }
        // SAFETY: `s` is bound and ours.
        if unsafe { ws::listen(s, LISTEN_BACKLOG) } == SOCKET_ERROR {
            return Err(last_error());
        }
        // Non-blocking: a connection that goes away between the wait and `accept` must not
        // leave the accept thread blocked (and the listener open) past shutdown.
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// Waits at most `wait` for a connection on `listener`; `Ok(None)` if none came. The
    /// stream is non-blocking (inherited from the listener); the string names the peer.
    pub(crate) fn accept(
        listener: &std::net::TcpListener,
        wait: Duration,
    ) -> io::Result<Option<(std::net::TcpStream, String)>> {
        let s = listener.as_raw_socket() as SOCKET;
        let mut poll = WSAPOLLFD { fd: s, events: POLLRDNORM, revents: 0 };
        let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid WSAPOLLFD, count 1.
        match unsafe { ws::WSAPoll(&mut poll, 1, ms) } {
            SOCKET_ERROR => return Err(last_error()),
            0 => return Ok(None),
            _ => {}
        }
        // SAFETY: plain data, filled in by accept.
        let mut peer: SOCKADDR_HV = unsafe { std::mem::zeroed() };
        let mut len = SOCKADDR_HV_LEN as i32;
        // SAFETY: `peer` and `len` live across the call; `len` is `peer`'s size.
        let c = unsafe { ws::accept(s, (&raw mut peer).cast::<SOCKADDR>(), &mut len) };
        if c == INVALID_SOCKET {
            let e = last_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
        }
        // SAFETY: `c` is the new connection, owned by nothing else.
        let stream = unsafe { std::net::TcpStream::from_raw_socket(c as u64) };
        // SAFETY: SOCKADDR_HV is plain data of exactly SOCKADDR_HV_LEN bytes.
        let bytes = unsafe { std::mem::transmute::<SOCKADDR_HV, [u8; SOCKADDR_HV_LEN]>(peer) };
        let peer = match HvAddr::from_sockaddr(&bytes) {
            Some(a) => format!("Hyper-V VM {}", a.vm_id),
            None => "Hyper-V peer".to_owned(),
        };
        Ok(Some((stream, peer)))
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
        let other: Guid = "00000400-FACB-11E7-BD58-64006A7986D3".parse().unwrap();
        assert_eq!(vsock_port(&other), None, "not the vsock template");
    }

    #[test]
    fn guids_parse_in_every_usual_spelling_and_print_back() {
        let g: Guid = "{a42e7cda-d03f-480c-9cc2-a4de20abb878}".parse().unwrap();
        let (d1, d2, d3, d4) = g.0.as_fields();
        assert_eq!((d1, d2, d3), (0xa42e_7cda, 0xd03f, 0x480c));
        assert_eq!(d4, &[0x9c, 0xc2, 0xa4, 0xde, 0x20, 0xab, 0xb8, 0x78]);
        assert_eq!(g.to_string(), "A42E7CDA-D03F-480C-9CC2-A4DE20ABB878");
        assert_eq!("A42E7CDA-D03F-480C-9CC2-A4DE20ABB878".parse::<Guid>(), Ok(g));
        assert_eq!("a42e7cdad03f480c9cc2a4de20abb878".parse::<Guid>(), Ok(g));
    }

    /// The example of Microsoft's docs and Linux's `hv_sock`: the vsock template is stored as
    /// `00 00 00 00 cb fa e6 11 bd 58 64 00 6a 79 86 d3`.
    #[test]
    fn guids_are_laid_out_as_windows_keeps_them() {
        let b = vsock_service_id(1025).to_bytes();
        assert_eq!(
            b,
            [0x01, 0x04, 0, 0, 0xcb, 0xfa, 0xe6, 0x11, 0xbd, 0x58, 0x64, 0x00, 0x6a, 0x79, 0x86, 0xd3]
        );
        let g: Guid = "a42e7cda-d03f-480c-9cc2-a4de20abb878".parse().unwrap();
        assert_eq!(Guid::from_bytes(g.to_bytes()), g);
        assert_eq!(WILDCARD.to_bytes(), [0; 16]);
        assert_eq!("00000000-0000-0000-0000-000000000000".parse::<Guid>(), Ok(WILDCARD));
    }

    #[test]
    fn sockaddr_hv_bytes_are_family_reserved_vm_service() {
        let vm: Guid = "a42e7cda-d03f-480c-9cc2-a4de20abb878".parse().unwrap();
        let addr = HvAddr::vsock(vm, 1025);
        let b = addr.to_sockaddr();
        assert_eq!(&b[..4], &[34, 0, 0, 0], "AF_HYPERV little-endian, then a zero reserved field");
        assert_eq!(&b[4..8], &[0xda, 0x7c, 0x2e, 0xa4], "the VM id's first field, little-endian");
        assert_eq!(&b[4..20], &vm.to_bytes());
        assert_eq!(&b[20..], &vsock_service_id(1025).to_bytes());
        assert_eq!(HvAddr::from_sockaddr(&b), Some(addr));
        assert_eq!(addr.to_string(), "hyperv:A42E7CDA-D03F-480C-9CC2-A4DE20ABB878:1025");

        let listen = HvAddr::vsock(WILDCARD, 1025).to_sockaddr();
        assert_eq!(&listen[4..20], &[0; 16], "the wildcard VM id");

        assert_eq!(HvAddr::from_sockaddr(&b[..35]), None, "short");
        let mut other = b;
        other[0] = 2;
        assert_eq!(HvAddr::from_sockaddr(&other), None, "AF_INET");
        let odd = HvAddr { vm_id: vm, service_id: vm };
        assert_eq!(odd.to_string(), format!("hyperv:{vm}:{vm}"), "not a vsock service");
    }

    #[tokio::test]
    async fn the_accept_thread_hands_over_connections_and_errors_in_order() {
        let mut script =
            vec![Ok(Some(1)), Ok(None), Err(io::Error::other("boom")), Ok(None), Ok(Some(2))].into_iter();
        let accepted = AcceptThread::spawn(move |_| script.next().unwrap_or(Ok(None))).unwrap();
        assert_eq!(accepted.next().await.unwrap(), 1);
        assert_eq!(accepted.next().await.unwrap_err().to_string(), "boom");
        assert_eq!(accepted.next().await.unwrap(), 2);
    }

    #[test]
    fn the_accept_thread_ends_soon_after_its_owner() {
        // `gone` is owned by the accept closure: it is dropped when the thread ends.
        let (gone, ended) = std::sync::mpsc::channel::<()>();
        let accepted = AcceptThread::<u32>::spawn(move |wait| {
            let _owned = &gone;
            std::thread::sleep(wait);
            Ok(None)
        })
        .unwrap();
        drop(accepted);
        let r = ended.recv_timeout(ACCEPT_POLL * 10);
        assert_eq!(r, Err(std::sync::mpsc::RecvTimeoutError::Disconnected), "the thread ended");
    }

    #[test]
    fn bad_guids_are_refused_with_the_expected_form() {
        for s in [
            "",
            "{}",
            "a42e7cda-d03f-480c-9cc2",
            "a42e7cda-d03f-480c-9cc2-a4de20abb87",
            "a42e7cda-d03f-480c-9cc2-a4de20abb8788",
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
