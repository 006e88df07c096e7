//! The tables Windows' `GetExtendedTcpTable` / `GetExtendedUdpTable` fill, read from their
//! bytes: pure, so it is compiled and tested everywhere (the call itself is in `windows.rs`).
//!
//! Layouts, per Microsoft's `iprtrmib.h` / `tcpmib.h` / `udpmib.h` (every field a `DWORD`
//! unless said, 4-byte aligned, rows right after the count):
//! - `MIB_TCPTABLE_OWNER_PID`: count, then 24-byte rows `MIB_TCPROW_OWNER_PID` { state,
//!   local addr, local port, remote addr, remote port, owning pid }.
//! - `MIB_TCP6TABLE_OWNER_PID`: count, then 56-byte rows `MIB_TCP6ROW_OWNER_PID` { local addr
//!   (16 bytes), local scope id, local port, remote addr (16 bytes), remote scope id, remote
//!   port, state, owning pid }.
//! - `MIB_UDPTABLE_OWNER_PID`: count, then 12-byte rows { local addr, local port, pid }.
//! - `MIB_UDP6TABLE_OWNER_PID`: count, then 28-byte rows { local addr (16 bytes), local scope
//!   id, local port, pid }.
//!
//! IPv4 addresses are in network byte order (the bytes in memory are the address's octets);
//! ports are in network byte order in the low 16 bits of their `DWORD` (so the first two bytes
//! in memory); the other integers are native (little-endian on every Windows target).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hostnet_protocol::{Listener, Proto};

use crate::discovery::source::{Found, Table};

/// `MIB_TCP_STATE_LISTEN`.
pub const MIB_TCP_STATE_LISTEN: u32 = 2;

const COUNT_LEN: usize = 4;

/// Row sizes of the four tables.
pub const TCP4_ROW_LEN: usize = 24;
pub const TCP6_ROW_LEN: usize = 56;
pub const UDP4_ROW_LEN: usize = 12;
pub const UDP6_ROW_LEN: usize = 28;

/// Why a table's bytes could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("the table is {len} bytes, too short for its row count")]
    TooShortForCount { len: usize },
    #[error("the table says it has {count} rows of {row_len} bytes but holds only {len} bytes")]
    Truncated { count: u32, row_len: usize, len: usize },
}

impl From<TableError> for std::io::Error {
    fn from(e: TableError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("Windows socket table: {e}"))
    }
}

/// Row length of `table`'s Windows layout.
pub fn row_len(table: Table) -> usize {
    match (table.proto, table.v6) {
        (Proto::Tcp, false) => TCP4_ROW_LEN,
        (Proto::Tcp, true) => TCP6_ROW_LEN,
        (Proto::Udp, false) => UDP4_ROW_LEN,
        (Proto::Udp, true) => UDP6_ROW_LEN,
    }
}

/// Appends the sockets in `bytes` — the table `GetExtended{Tcp,Udp}Table` filled for `table`
/// — to `out`: TCP listeners (rows in another state are skipped), every bound UDP socket.
/// Windows does not say whether a UDP socket is connected, so none is marked so; it gives no
/// socket identity either (`inode` 0) nor owner uid, but the owning pid (0 when unknown —
/// the System Idle process, or Wine, which cannot map Linux pids — is `None`).
/// A count the bytes cannot hold is an error, before anything is appended.
pub fn parse(table: Table, bytes: &[u8], out: &mut Vec<Found>) -> Result<(), TableError> {
    let row_len = row_len(table);
    let count = dword(bytes, 0).ok_or(TableError::TooShortForCount { len: bytes.len() })?;
    let rows = bytes.get(COUNT_LEN..).unwrap_or_default();
    let whole = usize::try_from(count).ok().and_then(|c| c.checked_mul(row_len));
    let Some(rows) = whole.and_then(|n| rows.get(..n)) else {
        return Err(TableError::Truncated { count, row_len, len: bytes.len() });
    };
    out.extend(rows.chunks_exact(row_len).filter_map(|row| parse_row(table, row)));
    Ok(())
}

/// One row of `table`'s layout (`row` is exactly one row long); `None` for a TCP row that is
/// not listening.
fn parse_row(table: Table, row: &[u8]) -> Option<Found> {
    // (address, port, pid, TCP state) at their offsets in each layout.
    let (addr, port, pid, state): (IpAddr, _, _, _) = match (table.proto, table.v6) {
        (Proto::Tcp, false) => (ipv4(row, 4)?.into(), port(row, 8)?, dword(row, 20)?, dword(row, 0)?),
        (Proto::Tcp, true) => (ipv6(row, 0)?.into(), port(row, 20)?, dword(row, 52)?, dword(row, 48)?),
        (Proto::Udp, false) => (ipv4(row, 0)?.into(), port(row, 4)?, dword(row, 8)?, MIB_TCP_STATE_LISTEN),
        (Proto::Udp, true) => (ipv6(row, 0)?.into(), port(row, 20)?, dword(row, 24)?, MIB_TCP_STATE_LISTEN),
    };
    (state == MIB_TCP_STATE_LISTEN).then_some(Found {
        listener: Listener { proto: table.proto, addr, port },
        inode: 0,
        uid: None,
        pid: (pid != 0).then_some(pid),
        connected: false,
    })
}

fn dword(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// A port: network byte order, in the low 16 bits of a little-endian `DWORD` — its first two
/// bytes in memory.
fn port(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn ipv4(bytes: &[u8], at: usize) -> Option<Ipv4Addr> {
    Some(<[u8; 4]>::try_from(bytes.get(at..at + 4)?).ok()?.into())
}

fn ipv6(bytes: &[u8], at: usize) -> Option<Ipv6Addr> {
    Some(<[u8; 16]>::try_from(bytes.get(at..at + 16)?).ok()?.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP4: Table = Table::ALL[0];
    const TCP6: Table = Table::ALL[1];
    const UDP4: Table = Table::ALL[2];
    const UDP6: Table = Table::ALL[3];

    /// A port `DWORD` as Windows stores it: network order in the low 16 bits.
    fn port_dword(port: u16) -> [u8; 4] {
        let [hi, lo] = port.to_be_bytes();
        [hi, lo, 0, 0]
    }

    fn table(count: u32, rows: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = count.to_le_bytes().to_vec();
        rows.iter().for_each(|r| bytes.extend_from_slice(r));
        bytes
    }

    fn tcp4_row(state: u32, addr: [u8; 4], port: u16, pid: u32) -> Vec<u8> {
        let mut row = Vec::new();
        row.extend(state.to_le_bytes());
        row.extend(addr);
        row.extend(port_dword(port));
        row.extend([0; 4]); // remote addr
        row.extend(port_dword(0)); // remote port
        row.extend(pid.to_le_bytes());
        assert_eq!(row.len(), TCP4_ROW_LEN);
        row
    }

    fn tcp6_row(addr: Ipv6Addr, scope: u32, port: u16, state: u32, pid: u32) -> Vec<u8> {
        let mut row = Vec::new();
        row.extend(addr.octets());
        row.extend(scope.to_le_bytes());
        row.extend(port_dword(port));
        row.extend([0; 16]); // remote addr
        row.extend(0u32.to_le_bytes()); // remote scope
        row.extend(port_dword(0)); // remote port
        row.extend(state.to_le_bytes());
        row.extend(pid.to_le_bytes());
        assert_eq!(row.len(), TCP6_ROW_LEN);
        row
    }

    fn udp4_row(addr: [u8; 4], port: u16, pid: u32) -> Vec<u8> {
        let mut row = addr.to_vec();
        row.extend(port_dword(port));
        row.extend(pid.to_le_bytes());
        assert_eq!(row.len(), UDP4_ROW_LEN);
        row
    }

    fn udp6_row(addr: Ipv6Addr, scope: u32, port: u16, pid: u32) -> Vec<u8> {
        let mut row = addr.octets().to_vec();
        row.extend(scope.to_le_bytes());
        row.extend(port_dword(port));
        row.extend(pid.to_le_bytes());
        assert_eq!(row.len(), UDP6_ROW_LEN);
        row
    }

    fn parsed(t: Table, bytes: &[u8]) -> Vec<(IpAddr, u16, Option<u32>)> {
        let mut out = Vec::new();
        parse(t, bytes, &mut out).unwrap();
        assert!(out.iter().all(|f| f.listener.proto == t.proto && !f.connected && f.uid.is_none()));
        out.iter().map(|f| (f.listener.addr, f.listener.port, f.pid)).collect()
    }

    #[test]
    fn tcp4_listeners_with_ports_in_network_order_and_their_pids() {
        let bytes = table(
            3,
            &[
                tcp4_row(MIB_TCP_STATE_LISTEN, [127, 0, 0, 1], 8000, 4242),
                tcp4_row(5, [10, 0, 0, 2], 50_123, 7), // ESTABLISHED: not a listener
                tcp4_row(MIB_TCP_STATE_LISTEN, [0, 0, 0, 0], 0x1234, 0),
            ],
        );
        assert_eq!(
            parsed(TCP4, &bytes),
            vec![
                (Ipv4Addr::LOCALHOST.into(), 8000, Some(4242)),
                (Ipv4Addr::UNSPECIFIED.into(), 0x1234, None), // pid 0: unknown owner
            ]
        );
    }

    #[test]
    fn tcp6_listeners_address_and_port_at_their_offsets() {
        let addr: Ipv6Addr = "fe80::1:2:3:4".parse().unwrap();
        let bytes = table(
            2,
            &[
                tcp6_row(Ipv6Addr::LOCALHOST, 0, 443, MIB_TCP_STATE_LISTEN, 99),
                tcp6_row(addr, 12, 65_535, MIB_TCP_STATE_LISTEN, 1),
            ],
        );
        assert_eq!(
            parsed(TCP6, &bytes),
            vec![(Ipv6Addr::LOCALHOST.into(), 443, Some(99)), (addr.into(), 65_535, Some(1))]
        );
    }

    #[test]
    fn udp_tables_of_both_families() {
        let bytes = table(2, &[udp4_row([127, 0, 0, 1], 5353, 10), udp4_row([192, 168, 1, 5], 53, 0)]);
        assert_eq!(
            parsed(UDP4, &bytes),
            vec![
                (Ipv4Addr::LOCALHOST.into(), 5353, Some(10)),
                (Ipv4Addr::new(192, 168, 1, 5).into(), 53, None)
            ]
        );
        let bytes = table(1, &[udp6_row(Ipv6Addr::UNSPECIFIED, 0, 0x0102, 3)]);
        assert_eq!(parsed(UDP6, &bytes), vec![(Ipv6Addr::UNSPECIFIED.into(), 0x0102, Some(3))]);
    }

    #[test]
    fn an_empty_table_and_trailing_bytes_past_the_rows() {
        assert_eq!(parsed(TCP4, &table(0, &[])), vec![]);
        // Windows may hand back a buffer larger than the rows: the count decides.
        let mut bytes = table(1, &[udp4_row([127, 0, 0, 1], 9, 1)]);
        bytes.extend([0xff; 40]);
        assert_eq!(parsed(UDP4, &bytes), vec![(Ipv4Addr::LOCALHOST.into(), 9, Some(1))]);
    }

    #[test]
    fn hostile_and_truncated_tables_are_errors_not_panics() {
        let mut out = Vec::new();
        for t in Table::ALL {
            assert_eq!(parse(t, &[], &mut out), Err(TableError::TooShortForCount { len: 0 }));
            assert_eq!(parse(t, &[1, 0, 0], &mut out), Err(TableError::TooShortForCount { len: 3 }));
            // A count larger than the rows the buffer holds (one byte short of the last row).
            let mut short = table(2, &[]);
            short.extend(vec![0; 2 * row_len(t) - 1]);
            assert!(matches!(parse(t, &short, &mut out), Err(TableError::Truncated { count: 2, .. })));
            // A count whose byte size overflows.
            let huge = table(u32::MAX, &[vec![0; 64]]);
            assert!(matches!(parse(t, &huge, &mut out), Err(TableError::Truncated { count: u32::MAX, .. })));
        }
        assert!(out.is_empty(), "nothing appended from a bad table: {out:?}");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every length up to a few rows, every count near it.
        let mut out = Vec::new();
        let noise: Vec<u8> = (0..300u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        for t in Table::ALL {
            for len in 0..noise.len() {
                let mut bytes = noise[..len].to_vec();
                if len >= 4 {
                    let count = u32::try_from(len / row_len(t)).unwrap();
                    bytes[..4].copy_from_slice(&count.to_le_bytes());
                }
                let _ = parse(t, &bytes, &mut out);
            }
        }
        assert!(!out.is_empty(), "some noise tables parse (with every count that fits)");
    }
}
