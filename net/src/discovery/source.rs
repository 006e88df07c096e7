//! What a listener source reports: the sockets it found and the tables it reads. The bottom
//! of discovery: the sources ([`super::platform`], [`super::sock_diag`]), the kernel events,
//! the own-socket registry and the watcher all speak in these types.

use std::io;

use hostnet_protocol::{Listener, Proto};

/// One socket a [`ListenerSource`] reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub listener: Listener,
    /// The socket's identity where the OS gives one (Linux: its inode; macOS: its kernel
    /// handle folded to 32 bits); 0 where it does not (Windows).
    pub inode: u32,
    /// The owner's uid, where the OS says (Linux: the socket's; macOS: its process's).
    pub uid: Option<u32>,
    /// The owning process, where the OS says (macOS, Windows; not Wine, which says 0).
    pub pid: Option<u32>,
    /// A UDP socket with a peer (`connect`ed): a client's, unless it was listed as a server
    /// before it connected (the watcher keeps a server that connects listed).
    pub connected: bool,
}

/// One table of sockets a [`ListenerSource`] reads: a protocol in one address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    pub proto: Proto,
    pub v6: bool,
}

impl Table {
    /// Every table, in reading order.
    pub const ALL: [Table; 4] = [
        Table { proto: Proto::Tcp, v6: false },
        Table { proto: Proto::Tcp, v6: true },
        Table { proto: Proto::Udp, v6: false },
        Table { proto: Proto::Udp, v6: true },
    ];

    pub(crate) fn bit(self) -> u8 {
        1 << (u8::from(self.proto == Proto::Udp) * 2 + u8::from(self.v6))
    }
}

/// A set of [`Table`]s: the ones an event says may have changed. A TCP `listen()` changes
/// only its family's TCP table, so the watcher reads that one instead of all four (a
/// desktop's UDP table, full of QUIC clients, costs a TCP listener nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tables(u8);

impl Tables {
    pub const NONE: Tables = Tables(0);
    pub const ALL: Tables = Tables(0b1111);

    /// The tables of `proto` (both when `None`) in the IPv4 and/or IPv6 family.
    pub fn of(proto: Option<Proto>, v4: bool, v6: bool) -> Tables {
        let bits = Table::ALL
            .iter()
            .filter(|t| proto.is_none_or(|p| p == t.proto) && if t.v6 { v6 } else { v4 })
            .fold(0, |bits, t| bits | t.bit());
        Tables(bits)
    }

    pub fn contains(self, table: Table) -> bool {
        self.0 & table.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for Tables {
    type Output = Tables;
    fn bitor(self, other: Tables) -> Tables {
        Tables(self.0 | other.0)
    }
}

impl std::ops::BitOrAssign for Tables {
    fn bitor_assign(&mut self, other: Tables) {
        self.0 |= other.0;
    }
}

/// Where this machine's listening sockets come from.
pub trait ListenerSource: Send + 'static {
    /// Appends the sockets of `table`: TCP sockets in LISTEN state, or every bound UDP socket
    /// (connected ones marked so).
    fn read(&mut self, table: Table, out: &mut Vec<Found>) -> io::Result<()>;
}
