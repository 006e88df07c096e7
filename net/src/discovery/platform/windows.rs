//! Windows: the listening sockets from `GetExtendedTcpTable(TCP_TABLE_OWNER_PID_LISTENER)` and
//! `GetExtendedUdpTable(UDP_TABLE_OWNER_PID)` (read by [`super::win_tables`]), owners by
//! their process's user SID, holders by their process's image name, and bind refusals
//! explained by the excluded port ranges `netsh` lists.
//!
//! Under Wine the tables are the Linux machine's sockets, every owning pid 0: owners and
//! holders are unknown there.

use std::io;
use std::net::SocketAddr;
use std::os::windows::process::CommandExt;

use hostnet_protocol::Proto;
use windows_sys::Win32::Foundation::{CloseHandle, ERROR_INSUFFICIENT_BUFFER, HANDLE, NO_ERROR};
use windows_sys::Win32::NetworkManagement::IpHelper::{
    GetExtendedTcpTable, GetExtendedUdpTable, TCP_TABLE_OWNER_PID_LISTENER, UDP_TABLE_OWNER_PID,
};
use windows_sys::Win32::Networking::WinSock::{AF_INET, AF_INET6, WSAEACCES};
use windows_sys::Win32::Security::{EqualSid, GetTokenInformation, TOKEN_QUERY, TOKEN_USER, TokenUser};
use windows_sys::Win32::System::Threading::{
    GetCurrentProcess, OpenProcess, OpenProcessToken, PROCESS_NAME_WIN32, PROCESS_QUERY_LIMITED_INFORMATION,
    QueryFullProcessImageNameW,
};

use super::{bind_errors, win_tables};
use crate::discovery::source::{Found, ListenerSource, Table};

/// Tries at growing the table buffer before giving up (the table may grow between calls).
const SIZE_TRIES: usize = 8;
/// Room for rows that appear between sizing the buffer and filling it.
const SLACK_ROWS: usize = 16;

pub(super) fn source() -> io::Result<Box<dyn ListenerSource>> {
    let mut source = IpHelperSource::default();
    // Fail at start, with the reason, rather than on every tick.
    source.read(Table::ALL[0], &mut Vec::new())?;
    Ok(Box::new(source))
}

/// Reads the tables into one buffer, reused.
#[derive(Debug, Default)]
struct IpHelperSource {
    /// 4-byte units, so the table Windows writes is aligned as its `DWORD`s want.
    buf: Vec<u32>,
}

impl ListenerSource for IpHelperSource {
    fn read(&mut self, table: Table, out: &mut Vec<Found>) -> io::Result<()> {
        let bytes = fill(table, &mut self.buf)?;
        Ok(win_tables::parse(table, bytes, out)?)
    }
}

/// Fills `buf` with `table`, growing it while Windows says it is too small; the table's bytes.
fn fill(table: Table, buf: &mut Vec<u32>) -> io::Result<&[u8]> {
    let af = u32::from(if table.v6 { AF_INET6 } else { AF_INET });
    for _ in 0..SIZE_TRIES {
        let mut size = u32::try_from(buf.len() * 4).unwrap_or(u32::MAX);
        let ptr = buf.as_mut_ptr().cast();
        // SAFETY: `ptr` points to `size` writable bytes (or `size` is 0); Windows writes at
        // most `size` bytes, and sets `size` to what it needs when that is more.
        let ret = unsafe {
            match table.proto {
                Proto::Tcp => GetExtendedTcpTable(ptr, &mut size, 0, af, TCP_TABLE_OWNER_PID_LISTENER, 0),
                Proto::Udp => GetExtendedUdpTable(ptr, &mut size, 0, af, UDP_TABLE_OWNER_PID, 0),
            }
        };
        match ret {
            NO_ERROR => {
                // SAFETY: `u32`s viewed as their bytes, borrowed from `buf`.
                return Ok(unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), buf.len() * 4) });
            }
            ERROR_INSUFFICIENT_BUFFER => {
                let need = usize::try_from(size).unwrap_or(usize::MAX).div_ceil(4);
                buf.resize(need + SLACK_ROWS * win_tables::row_len(table) / 4, 0);
            }
            e => return Err(io::Error::from_raw_os_error(e as i32)),
        }
    }
    Err(io::Error::other("the socket table kept growing while it was read"))
}

/// A handle closed when dropped.
struct Handle(HANDLE);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: a handle this process opened and owns, closed once.
        unsafe { CloseHandle(self.0) };
    }
}

fn open_process(pid: u32) -> Option<Handle> {
    // SAFETY: no pointers; a null handle is failure.
    let h = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
    (!h.is_null()).then_some(Handle(h))
}

/// The `TOKEN_USER` of `process`'s token, in a buffer aligned for it (the SID it points to
/// lives in the same buffer).
fn token_user(process: HANDLE) -> Option<Vec<u64>> {
    let mut token: HANDLE = std::ptr::null_mut();
    // SAFETY: `token` is a valid place for the handle.
    if unsafe { OpenProcessToken(process, TOKEN_QUERY, &mut token) } == 0 {
        return None;
    }
    let token = Handle(token);
    let mut len = 0u32;
    // SAFETY: a null buffer of length 0 asks only for the length needed.
    unsafe { GetTokenInformation(token.0, TokenUser, std::ptr::null_mut(), 0, &mut len) };
    let mut buf = vec![0u64; usize::try_from(len).ok()?.div_ceil(8).max(size_of::<TOKEN_USER>().div_ceil(8))];
    let cap = u32::try_from(buf.len() * 8).ok()?;
    // SAFETY: `buf` holds `cap` writable bytes, aligned to 8.
    let ok = unsafe { GetTokenInformation(token.0, TokenUser, buf.as_mut_ptr().cast(), cap, &mut len) };
    (ok != 0).then_some(buf)
}

/// The pid Windows gives the System process, which owns kernel-mode listeners (http.sys).
const SYSTEM_PID: u32 = 4;

pub(super) fn is_this_users(found: &Found) -> Option<bool> {
    static OURS: std::sync::OnceLock<Option<Vec<u64>>> = std::sync::OnceLock::new();
    // SAFETY: the current-process pseudo handle needs no closing.
    let ours = OURS.get_or_init(|| token_user(unsafe { GetCurrentProcess() })).as_ref()?;
    let process = open_process(found.pid.filter(|p| *p != 0)?)?;
    let theirs = token_user(process.0)?;
    // SAFETY: both buffers start with a `TOKEN_USER` GetTokenInformation wrote, whose SID
    // pointers point into the same (still alive) buffers.
    let equal = unsafe {
        let theirs = theirs.as_ptr().cast::<TOKEN_USER>().read();
        let ours = ours.as_ptr().cast::<TOKEN_USER>().read();
        EqualSid(theirs.User.Sid, ours.User.Sid)
    };
    Some(equal != 0)
}

pub(super) fn port_holder(proto: Proto, port: u16) -> Option<String> {
    let mut source = IpHelperSource::default();
    let mut found = Vec::new();
    for table in Table::ALL.into_iter().filter(|t| t.proto == proto) {
        let _ = source.read(table, &mut found);
    }
    let pid = found.iter().filter(|f| f.listener.port == port).find_map(|f| f.pid)?;
    Some(process_name(pid))
}

/// `"name.exe (pid N)"`, or `"pid N"` when the process cannot be asked.
fn process_name(pid: u32) -> String {
    if pid == SYSTEM_PID {
        return format!("Windows itself (System, pid {pid}: http.sys or another kernel-mode service)");
    }
    let name = open_process(pid).and_then(|process| {
        let mut path = vec![0u16; 1024];
        let mut len = u32::try_from(path.len()).ok()?;
        // SAFETY: `path` holds `len` writable UTF-16 units; Windows sets `len` to those written.
        let ok =
            unsafe { QueryFullProcessImageNameW(process.0, PROCESS_NAME_WIN32, path.as_mut_ptr(), &mut len) };
        let path = String::from_utf16_lossy(path.get(..usize::try_from(len).ok()?)?);
        (ok != 0).then(|| path.rsplit('\\').next().unwrap_or_default().to_owned())
    });
    match name {
        Some(name) if !name.is_empty() => format!("{name} (pid {pid})"),
        _ => format!("pid {pid}"),
    }
}

pub(super) fn explain_bind_error(proto: Proto, addr: SocketAddr, e: &io::Error) -> Option<String> {
    if e.raw_os_error() != Some(WSAEACCES) {
        return None;
    }
    let family = if addr.is_ipv6() { "ipv6" } else { "ipv4" };
    let protocol = match proto {
        Proto::Tcp => "protocol=tcp",
        Proto::Udp => "protocol=udp",
    };
    // No console window flashing up when a windowed app embeds the proxy.
    const CREATE_NO_WINDOW: u32 = 0x0800_0000;
    let excluded = std::process::Command::new("netsh")
        .args(["int", family, "show", "excludedportrange", protocol])
        .creation_flags(CREATE_NO_WINDOW)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| bind_errors::parse_excluded_port_ranges(&String::from_utf8_lossy(&out.stdout)));
    Some(bind_errors::windows_access_denied(proto, addr, excluded.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs on Windows (and under Wine, where the tables are the Linux machine's and every
    /// pid is 0).
    #[test]
    fn the_tables_show_our_listener_with_our_pid_where_windows_gives_pids() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut source = source().unwrap();
        let mut found = Vec::new();
        source.read(Table::ALL[0], &mut found).unwrap();
        let ours = found.iter().find(|f| f.listener.port == port).expect("our listener in the TCP table");
        assert_eq!(ours.listener.addr, std::net::Ipv4Addr::LOCALHOST);
        match ours.pid {
            Some(pid) => {
                assert_eq!(pid, std::process::id());
                assert_eq!(is_this_users(ours), Some(true));
                assert!(port_holder(Proto::Tcp, port).is_some_and(|h| h.contains(&format!("pid {pid}"))));
            }
            None => assert_eq!(is_this_users(ours), None, "Wine: no owner"),
        }
        drop(listener);
        found.clear();
        source.read(Table::ALL[0], &mut found).unwrap();
        assert!(!found.iter().any(|f| f.listener.port == port), "a closed listener is gone");
    }

    #[test]
    fn owner_and_name_of_a_process_by_pid() {
        let found = |pid| Found {
            listener: hostnet_protocol::Listener { proto: Proto::Tcp, addr: [127, 0, 0, 1].into(), port: 1 },
            inode: 0,
            uid: None,
            pid,
            connected: false,
        };
        let me = std::process::id();
        assert_eq!(is_this_users(&found(Some(me))), Some(true), "our own process is ours");
        assert_eq!(is_this_users(&found(None)), None);
        assert_eq!(is_this_users(&found(Some(0))), None);
        assert_eq!(is_this_users(&found(Some(0xffff_fff0))), None, "no such process");
        let name = process_name(me);
        assert!(name.ends_with(&format!(".exe (pid {me})")), "{name}");
        assert_eq!(process_name(0xffff_fff0), format!("pid {}", 0xffff_fff0u32));
    }

    #[test]
    fn the_udp_tables_show_a_bound_socket() {
        let socket = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let mut found = Vec::new();
        source().unwrap().read(Table::ALL[3], &mut found).unwrap();
        assert!(
            found.iter().any(|f| f.listener.port == port && f.listener.addr == std::net::Ipv6Addr::LOCALHOST)
        );
    }
}
