//! macOS: the listening sockets of every process this user may inspect, from
//! `proc_listallpids` + `proc_pidinfo(PROC_PIDLISTFDS)` + `proc_pidfdinfo(PROC_PIDFDSOCKETINFO)`
//! (libproc, declared by the `libc` crate; the answers are read by [`super::proc_info`]).
//! A process of another user cannot be inspected without root, so a proxy running as the
//! user sees its user's programs — the ones a guest→host forward is for.
//!
//! One scan of the processes fills all four tables; a table asked for again is a new scan,
//! so the watcher's round of four reads costs one scan.

use std::io;
use std::net::SocketAddr;

use hostnet_protocol::Proto;

use super::{OneScanPerRound, bind_errors, proc_info};
use crate::discovery::source::{Found, ListenerSource, Table};

/// Processes to expect beyond what `proc_listallpids` counted (some start in between).
const PID_SLACK: usize = 64;
/// Room for the descriptor list of one process at first (2048 descriptors), grown while a list
/// fills it, up to `FDS_MAX` (a million descriptors: beyond any process's limit).
const FDS_START: usize = 2048 * proc_info::PROC_FDINFO_LEN;
const FDS_MAX: usize = 1 << 20 << 3;

pub(super) fn source() -> io::Result<Box<dyn ListenerSource>> {
    let mut source = ProcSource::default();
    // Fail at start, with the reason, rather than on every tick.
    source.read(Table::ALL[0], &mut Vec::new())?;
    Ok(Box::new(source))
}

#[derive(Debug, Default)]
struct ProcSource {
    scans: OneScanPerRound,
    fds: Vec<u8>,
}

impl ListenerSource for ProcSource {
    fn read(&mut self, table: Table, out: &mut Vec<Found>) -> io::Result<()> {
        let fds = &mut self.fds;
        self.scans.read(table, out, |tables| scan(tables, fds))
    }
}

/// Every socket of the processes this user may inspect, into `tables` (in [`Table::ALL`]'s
/// order, empty before); `fds` is scratch space.
fn scan(tables: &mut [Vec<Found>; 4], fds: &mut Vec<u8>) -> io::Result<()> {
    let mut seen = std::collections::HashSet::new();
    let mut info = [0u8; proc_info::SOCKET_FDINFO_LEN];
    for pid in all_pids()? {
        // Gone, or another user's (EPERM): skipped.
        let Some(fds) = list_fds(pid, fds) else { continue };
        let mut uid = None;
        for fd in proc_info::socket_fds(fds) {
            if !socket_info(pid, fd, &mut info) {
                continue;
            }
            let pid_u32 = u32::try_from(pid).unwrap_or_default();
            let Some((table, mut found)) = proc_info::parse_socket(&info, pid_u32, None) else {
                continue;
            };
            // A socket shared by several processes (inherited) is listed once.
            if !seen.insert((table.proto, found.inode, found.listener)) {
                continue;
            }
            found.uid = *uid.get_or_insert_with(|| process_uid(pid));
            if let Some(t) = Table::ALL.iter().position(|t| *t == table).and_then(|i| tables.get_mut(i)) {
                t.push(found);
            }
        }
    }
    Ok(())
}

/// Every process id, from `proc_listallpids`.
fn all_pids() -> io::Result<Vec<libc::c_int>> {
    // SAFETY: a null buffer asks only for the number of processes.
    let n = unsafe { libc::proc_listallpids(std::ptr::null_mut(), 0) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let mut pids: Vec<libc::c_int> = vec![0; n + PID_SLACK];
    let bytes = libc::c_int::try_from(pids.len() * size_of::<libc::c_int>()).unwrap_or(libc::c_int::MAX);
    // SAFETY: the buffer holds `bytes` bytes of `c_int`s; the call writes at most that much.
    let got = unsafe { libc::proc_listallpids(pids.as_mut_ptr().cast(), bytes) };
    let got = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
    pids.truncate(got);
    pids.retain(|p| *p > 0);
    Ok(pids)
}

/// `pid`'s `proc_fdinfo` rows, read into `buf` (kept at its size from one process to the
/// next, so most processes cost one call); `None` if the process cannot be inspected.
fn list_fds(pid: libc::c_int, buf: &mut Vec<u8>) -> Option<&[u8]> {
    if buf.len() < FDS_START {
        buf.resize(FDS_START, 0);
    }
    loop {
        let size = libc::c_int::try_from(buf.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `buf` holds `size` writable bytes; the call writes at most that many.
        let got = unsafe { libc::proc_pidinfo(pid, libc::PROC_PIDLISTFDS, 0, buf.as_mut_ptr().cast(), size) };
        let got = usize::try_from(got).ok().filter(|got| *got > 0)?;
        // A full buffer may have cut the list short: ask again with twice the room.
        if got + proc_info::PROC_FDINFO_LEN <= buf.len() || buf.len() >= FDS_MAX {
            return buf.get(..got);
        }
        buf.resize(buf.len() * 2, 0);
    }
}

/// Fills `info` with `PROC_PIDFDSOCKETINFO` of `pid`'s descriptor `fd`; false if it is gone.
fn socket_info(pid: libc::c_int, fd: i32, info: &mut [u8; proc_info::SOCKET_FDINFO_LEN]) -> bool {
    const PROC_PIDFDSOCKETINFO: libc::c_int = 3;
    let size = proc_info::SOCKET_FDINFO_LEN as libc::c_int;
    // SAFETY: `info` is `size` writable bytes; the call writes at most that many.
    let got = unsafe { libc::proc_pidfdinfo(pid, fd, PROC_PIDFDSOCKETINFO, info.as_mut_ptr().cast(), size) };
    got == size
}

/// The uid `pid` runs as (`pbi_uid` of `PROC_PIDTBSDINFO`).
fn process_uid(pid: libc::c_int) -> Option<u32> {
    let mut info = std::mem::MaybeUninit::<libc::proc_bsdinfo>::uninit();
    let size = libc::c_int::try_from(size_of::<libc::proc_bsdinfo>()).ok()?;
    // SAFETY: `info` is `size` writable bytes; the call writes at most that many.
    let got = unsafe { libc::proc_pidinfo(pid, libc::PROC_PIDTBSDINFO, 0, info.as_mut_ptr().cast(), size) };
    // SAFETY: a full-size answer initialised the whole struct.
    (got == size).then(|| unsafe { info.assume_init() }.pbi_uid)
}

pub(super) fn is_this_users(found: &Found) -> Option<bool> {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    found.uid.map(|uid| uid == euid)
}

pub(super) fn port_holder(proto: Proto, port: u16) -> Option<String> {
    let mut tables = Default::default();
    scan(&mut tables, &mut Vec::new()).ok()?;
    let pid = tables
        .iter()
        .flatten()
        .find(|f| f.listener.proto == proto && f.listener.port == port)
        .and_then(|f| f.pid)?;
    let mut name = [0u8; 256];
    let pid_c = libc::c_int::try_from(pid).ok()?;
    // SAFETY: `name` is 256 writable bytes; `proc_name` writes at most that many.
    let len = unsafe { libc::proc_name(pid_c, name.as_mut_ptr().cast(), 256) };
    let name = usize::try_from(len).ok().and_then(|len| name.get(..len)).map(String::from_utf8_lossy);
    Some(match name {
        Some(name) if !name.is_empty() => format!("{name} (pid {pid})"),
        _ => format!("pid {pid}"),
    })
}

pub(super) fn explain_bind_error(_proto: Proto, addr: SocketAddr, e: &io::Error) -> Option<String> {
    if e.raw_os_error() != Some(libc::EACCES) {
        return None;
    }
    bind_errors::macos_low_port(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs on macOS only.
    #[test]
    fn the_scan_shows_our_listener_and_udp_socket_with_our_pid_and_uid() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let udp = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let udp_port = udp.local_addr().unwrap().port();
        let mut source = source().unwrap();
        let mut tcp = Vec::new();
        source.read(Table::ALL[0], &mut tcp).unwrap();
        let ours = tcp.iter().find(|f| f.listener.port == port).expect("our listener");
        assert_eq!(ours.pid, Some(std::process::id()));
        assert_eq!(is_this_users(ours), Some(true));
        let mut udp6 = Vec::new();
        source.read(Table::ALL[3], &mut udp6).unwrap();
        assert!(udp6.iter().any(|f| f.listener.port == udp_port && !f.connected));
        assert!(
            port_holder(Proto::Tcp, port).is_some_and(|h| h.contains(&format!("pid {}", std::process::id())))
        );
        drop(listener);
        tcp.clear();
        source.read(Table::ALL[0], &mut tcp).unwrap();
        assert!(!tcp.iter().any(|f| f.listener.port == port), "a closed listener is gone");
    }
}
