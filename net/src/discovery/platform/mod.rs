//! What each desktop OS says about its sockets and ports, behind one set of functions: where
//! the listening sockets come from ([`source`]), whose a socket is ([`Found::is_this_users`]), which
//! program holds a port ([`port_holder`]), and why a bind was refused
//! ([`explain_bind_error`]). One module per OS (`linux.rs`, `macos.rs`, `windows.rs`) holds
//! the calls into it; the OS structures are read by pure parsers compiled and tested on every
//! platform ([`win_tables`], [`proc_info`], [`bind_errors`]).

pub mod bind_errors;
pub mod proc_info;
pub mod win_tables;

#[cfg(target_os = "linux")]
#[path = "linux.rs"]
mod os;
#[cfg(target_os = "macos")]
#[path = "macos.rs"]
mod os;
#[cfg(windows)]
#[path = "windows.rs"]
mod os;
#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
#[path = "other.rs"]
mod os;

use std::io;
use std::net::SocketAddr;

use hostnet_protocol::Proto;

use crate::discovery::source::{Found, ListenerSource, Table};

/// This machine's source of listening sockets: `sock_diag` on Linux, the processes' socket
/// descriptors (`proc_pidfdinfo`) on macOS, `GetExtendedTcpTable`/`GetExtendedUdpTable` on
/// Windows.
pub fn source() -> io::Result<Box<dyn ListenerSource>> {
    os::source()
}

impl Found {
    /// Whether this socket belongs to the user this process runs as: its owner uid against our
    /// effective uid (Linux, macOS), its owning process's user SID against ours (Windows).
    /// `None` when the OS does not say (no owner given, pid unknown or 0, a process that cannot
    /// be opened).
    pub fn is_this_users(&self) -> Option<bool> {
        os::is_this_users(self)
    }
}

/// Which program holds `port` for `proto` on this machine, as `"name (pid N)"`, when the OS
/// tells (a program of another user may not be visible; Wine never tells). Reads the whole
/// socket table: call it once per conflict, not on a tick.
pub fn port_holder(proto: Proto, port: u16) -> Option<String> {
    os::port_holder(proto, port)
}

/// Why binding `addr` for `proto` failed with `e`, when this OS has a cause of its own to name
/// (Windows: an excluded port range; Linux and macOS: a privileged port), as a sentence the
/// user can act on. `None`: nothing more to say than the error itself.
pub fn explain_bind_error(proto: Proto, addr: SocketAddr, e: &io::Error) -> Option<String> {
    os::explain_bind_error(proto, addr, e)
}

/// For sources that learn all four tables in one pass (macOS: one scan of the processes):
/// hands out the tables of the latest pass and makes a new one when a table is asked for
/// again, so the watcher's round of four reads costs one pass, and no table handed out is
/// older than the round.
#[derive(Debug, Default)]
#[cfg_attr(not(any(test, target_os = "macos")), allow(dead_code))]
struct OneScanPerRound {
    /// The latest pass, per table in [`Table::ALL`]'s order.
    tables: [Vec<Found>; 4],
    /// Which tables were handed out since that pass; all of them before the first one.
    served: Option<[bool; 4]>,
}

#[cfg_attr(not(any(test, target_os = "macos")), allow(dead_code))]
impl OneScanPerRound {
    fn read(
        &mut self,
        table: Table,
        out: &mut Vec<Found>,
        scan: impl FnOnce(&mut [Vec<Found>; 4]) -> io::Result<()>,
    ) -> io::Result<()> {
        let i = Table::ALL.iter().position(|t| *t == table).unwrap_or_default();
        let served = match &mut self.served {
            Some(served) if !served.get(i).copied().unwrap_or(true) => served,
            _ => {
                self.tables.iter_mut().for_each(Vec::clear);
                self.served = None;
                scan(&mut self.tables)?;
                self.served.insert([false; 4])
            }
        };
        if let (Some(served), Some(found)) = (served.get_mut(i), self.tables.get(i)) {
            *served = true;
            out.extend_from_slice(found);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostnet_protocol::Listener;

    #[test]
    fn one_scan_serves_a_round_of_the_four_tables_and_a_table_asked_again_rescans() {
        let mut rounds = OneScanPerRound::default();
        let mut scans = 0u16;
        let read = |rounds: &mut OneScanPerRound, table: Table, scans: &mut u16| {
            let mut out = Vec::new();
            let result = rounds.read(table, &mut out, |tables| {
                *scans += 1;
                if *scans == 3 {
                    return Err(io::Error::other("scripted failure"));
                }
                // Each table gets one socket whose port says which scan made it.
                for (t, found) in Table::ALL.iter().zip(tables.iter_mut()) {
                    let listener =
                        Listener { proto: t.proto, addr: "127.0.0.1".parse().unwrap(), port: *scans };
                    found.push(Found { listener, inode: 0, uid: None, pid: None, connected: false });
                }
                Ok(())
            });
            result.map(|()| out.iter().map(|f| f.listener.port).collect::<Vec<_>>())
        };
        for table in Table::ALL {
            assert_eq!(
                read(&mut rounds, table, &mut scans).unwrap(),
                vec![1],
                "{table:?} from the first scan"
            );
        }
        assert_eq!(read(&mut rounds, Table::ALL[2], &mut scans).unwrap(), vec![2], "asked again: a new scan");
        assert_eq!(read(&mut rounds, Table::ALL[0], &mut scans).unwrap(), vec![2], "not served from it yet");
        assert_eq!(read(&mut rounds, Table::ALL[2], &mut scans).unwrap_err().to_string(), "scripted failure");
        assert_eq!(
            read(&mut rounds, Table::ALL[1], &mut scans).unwrap(),
            vec![4],
            "after a failed scan, a new one"
        );
        assert_eq!(scans, 4);
    }
}
