//! Listener events from the kernel: a small BPF program (`net/bpf/listeners.bpf.c`) tells the
//! watcher the moment a TCP socket enters or leaves LISTEN, or a UDP socket takes or gives up a
//! port. The watcher then reads `sock_diag` at once instead of on its next tick: a new listener
//! is seen within tens of microseconds at no idle cost (`../shared/notes/discovery.md`).
//!
//! Events only wake the watcher; `sock_diag` stays the truth, and a slow resync catches
//! anything an event could miss (a full ring, a socket that got its port without `bind`).
//! Loading needs `CAP_BPF` + `CAP_PERFMON` (or root); where it is refused, the watcher polls.

use std::io;
use std::time::Duration;

use hostnet_protocol::Proto;

use crate::discovery::source::Tables;

/// Why events are not available here; the watcher then polls.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("this build has no BPF program (clang was missing when it was built)")]
    NotBuilt,
    #[error("listener events are Linux's (eBPF); this system's listeners are read on a tick")]
    NotLinux,
    #[error("loading the BPF program failed: {0}")]
    Load(String),
}

/// Attached BPF programs and the ring they report into. Dropping it detaches them.
pub struct ListenerEvents {
    #[cfg(hostnet_bpf)]
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    // Holds the programs (and their links) alive; declared last so the ring drops first.
    #[cfg(hostnet_bpf)]
    _bpf: aya::Ebpf,
}

impl std::fmt::Debug for ListenerEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ListenerEvents")
    }
}

#[cfg(hostnet_bpf)]
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/listeners.bpf.o"));

impl ListenerEvents {
    /// Loads and attaches the programs.
    #[cfg(hostnet_bpf)]
    pub fn load() -> Result<Self, EventsError> {
        use aya::programs::{CgroupAttachMode, CgroupSock, SockOps};
        let err = |what: &str, e: &dyn std::error::Error| {
            let mut msg = format!("{what}: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            EventsError::Load(msg)
        };

        let netns = own_netns_cookie().map_err(|e| err("reading this network namespace's cookie", &e))?;
        let mut bpf = aya::EbpfLoader::new()
            .set_global("HOSTNET_NETNS", &netns, true)
            .load(PROGRAM)
            .map_err(|e| err("loading", &e))?;
        let root = cgroup2_root().map_err(|e| err("opening the root cgroup (v2)", &e))?;
        // Attached through BPF links (kernel >= 5.7), which coexist with other programs and
        // take no flags (`AllowMultiple` is refused there with EINVAL). The links live as long
        // as `bpf`.
        fn program<'a>(
            bpf: &'a mut aya::Ebpf,
            name: &str,
        ) -> Result<&'a mut aya::programs::Program, EventsError> {
            bpf.program_mut(name).ok_or_else(|| EventsError::Load(format!("{name} missing")))
        }
        let tcp: &mut SockOps =
            program(&mut bpf, "hostnet_tcp")?.try_into().map_err(|e| err("hostnet_tcp", &e))?;
        tcp.load().map_err(|e| err("hostnet_tcp", &e))?;
        tcp.attach(&root, CgroupAttachMode::Single).map_err(|e| err("hostnet_tcp", &e))?;
        for name in ["hostnet_udp_bound4", "hostnet_udp_bound6", "hostnet_udp_released"] {
            let p: &mut CgroupSock = program(&mut bpf, name)?.try_into().map_err(|e| err(name, &e))?;
            p.load().map_err(|e| err(name, &e))?;
            p.attach(&root, CgroupAttachMode::Single).map_err(|e| err(name, &e))?;
        }
        let map = bpf
            .take_map("HOSTNET_EVENTS")
            .ok_or_else(|| EventsError::Load("HOSTNET_EVENTS map missing".into()))?;
        let ring = aya::maps::RingBuf::try_from(map).map_err(|e| err("HOSTNET_EVENTS", &e))?;
        Ok(Self { ring, _bpf: bpf })
    }

    /// Loads and attaches the programs.
    #[cfg(not(hostnet_bpf))]
    pub fn load() -> Result<Self, EventsError> {
        if cfg!(target_os = "linux") { Err(EventsError::NotBuilt) } else { Err(EventsError::NotLinux) }
    }

    /// Waits up to `timeout` for events and drains every one already there. Returns the
    /// tables they say changed (none: the timeout passed).
    #[cfg(hostnet_bpf)]
    pub fn wait(&mut self, timeout: Duration) -> io::Result<Tables> {
        use std::os::fd::AsRawFd;
        let tables = self.drain();
        if !tables.is_empty() {
            return Ok(tables);
        }
        let mut pfd = libc::pollfd { fd: self.ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // `ppoll`, not `poll`: the watcher's confirming reads wait tens of microseconds, which
        // `poll`'s milliseconds would round to none.
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: timeout.subsec_nanos().into(),
        };
        // SAFETY: one valid pollfd and a valid timespec for the duration of the call; no mask.
        let r = unsafe { libc::ppoll(&raw mut pfd, 1, &raw const ts, std::ptr::null()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(self.drain())
    }

    #[cfg(hostnet_bpf)]
    fn drain(&mut self) -> Tables {
        let mut tables = Tables::NONE;
        while let Some(event) = self.ring.next() {
            tables |= changed_tables(&event);
        }
        tables
    }

    /// Waits up to `timeout` for events. Never called: [`Self::load`] fails in this build.
    #[cfg(not(hostnet_bpf))]
    pub fn wait(&mut self, timeout: Duration) -> io::Result<Tables> {
        std::thread::sleep(timeout);
        Ok(Tables::NONE)
    }
}

/// The tables one event from the program says changed: its kind tells the protocol, the byte
/// above it the address family. Anything unexpected reads every table.
#[cfg_attr(not(hostnet_bpf), allow(dead_code))]
fn changed_tables(event: &[u8]) -> Tables {
    const TCP_LISTEN_START: u32 = 1;
    const TCP_LISTEN_STOP: u32 = 2;
    const UDP_BOUND: u32 = 3;
    const UDP_UNBOUND: u32 = 4;
    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;
    let Some(event) = event.first_chunk::<4>().map(|b| u32::from_ne_bytes(*b)) else {
        return Tables::ALL;
    };
    let proto = match event & 0xff {
        TCP_LISTEN_START | TCP_LISTEN_STOP => Some(Proto::Tcp),
        UDP_BOUND | UDP_UNBOUND => Some(Proto::Udp),
        _ => None,
    };
    match event >> 8 {
        AF_INET => Tables::of(proto, true, false),
        AF_INET6 => Tables::of(proto, false, true),
        _ => Tables::of(proto, true, true),
    }
}

/// The cookie of this thread's network namespace, which the programs compare against.
#[cfg(hostnet_bpf)]
fn own_netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // Any socket tells its namespace; this one is never bound (no loopback needed, no event).
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The root of the cgroup v2 hierarchy, where the programs attach (they then see every
/// process). Where none is mounted in this mount namespace (`ip netns exec` remounts `/sys`;
/// minimal guest inits mount nothing), it is mounted on a private directory just long enough
/// to open it: the open directory keeps the cgroup, not the mount.
#[cfg(hostnet_bpf)]
fn cgroup2_root() -> io::Result<std::fs::File> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounted = mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split(' ').collect();
        (right.starts_with("cgroup2 ") && fields.get(3) == Some(&"/")).then(|| fields.get(4).copied())?
    });
    if let Some(path) = mounted {
        return std::fs::File::open(path.replace("\\040", " "));
    }
    let dir = std::env::temp_dir().join(format!("hostnet-cgroup2-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = mount_and_open(&dir);
    let _ = std::fs::remove_dir(&dir);
    result
}

#[cfg(hostnet_bpf)]
fn mount_and_open(dir: &std::path::Path) -> io::Result<std::fs::File> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let target = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let r =
        unsafe { libc::mount(c"none".as_ptr(), target.as_ptr(), c"cgroup2".as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let opened = std::fs::File::open(dir);
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    opened
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::source::Table;

    fn only(tables: Tables) -> Vec<Table> {
        Table::ALL.into_iter().filter(|t| tables.contains(*t)).collect()
    }

    #[test]
    fn an_event_names_the_table_of_its_protocol_and_family() {
        let event = |kind: u32, family: u32| (kind | family << 8).to_ne_bytes();
        assert_eq!(only(changed_tables(&event(1, 2))), vec![Table { proto: Proto::Tcp, v6: false }]);
        assert_eq!(only(changed_tables(&event(2, 10))), vec![Table { proto: Proto::Tcp, v6: true }]);
        assert_eq!(only(changed_tables(&event(3, 10))), vec![Table { proto: Proto::Udp, v6: true }]);
        assert_eq!(only(changed_tables(&event(4, 2))), vec![Table { proto: Proto::Udp, v6: false }]);
        // An unknown family: both of the protocol's; an unknown kind or a short event: all.
        assert_eq!(changed_tables(&event(3, 0)), Tables::of(Some(Proto::Udp), true, true));
        assert_eq!(changed_tables(&event(9, 2)), Tables::of(None, true, false));
        assert_eq!(changed_tables(&[1, 2]), Tables::ALL);
    }
}
