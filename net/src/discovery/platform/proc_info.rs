//! macOS's `proc_info` structures, read from their bytes: pure, so compiled and tested
//! everywhere (the `proc_pidinfo` / `proc_pidfdinfo` calls are in `macos.rs`). Apple's SDK
//! headers are not needed to build: the structures are transcribed by hand from xnu's
//! `bsd/sys/proc_info.h` ([`layout`]), and the offsets the parser reads are checked against
//! that transcription at compile time, on every target (`cargo check --target
//! aarch64-apple-darwin` checks them with Apple's layout rules).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hostnet_protocol::{Listener, Proto};

use crate::discovery::source::{Found, Table};

/// `PROC_PIDFDSOCKETINFO_SIZE`: `sizeof(struct socket_fdinfo)`.
pub const SOCKET_FDINFO_LEN: usize = 792;
/// `PROC_PIDLISTFD_SIZE`: `sizeof(struct proc_fdinfo)` { `int32_t proc_fd`, `uint32_t proc_fdtype` }.
pub const PROC_FDINFO_LEN: usize = 8;
/// `PROX_FDTYPE_SOCKET`.
pub const PROX_FDTYPE_SOCKET: u32 = 2;

// Byte offsets in `struct socket_fdinfo` { `proc_fileinfo pfi`; `socket_info psi` }.
const PSI: usize = 24;
const SOI_SO: usize = PSI + 136;
const SOI_PROTOCOL: usize = PSI + 156;
const SOI_FAMILY: usize = PSI + 160;
const SOI_KIND: usize = PSI + 232;
const SOI_PROTO: usize = PSI + 240;
// In `soi_proto`'s `in_sockinfo` (first member of `tcp_sockinfo` too).
const INSI_FPORT: usize = SOI_PROTO;
const INSI_LPORT: usize = SOI_PROTO + 4;
const INSI_FADDR: usize = SOI_PROTO + 32;
const INSI_LADDR: usize = SOI_PROTO + 48;
const TCPSI_STATE: usize = SOI_PROTO + 80;

/// `soi_kind` values.
const SOCKINFO_IN: i32 = 1;
const SOCKINFO_TCP: i32 = 2;
/// macOS's `AF_INET` / `AF_INET6` (30, not Linux's 10).
const AF_INET: i32 = 2;
const AF_INET6: i32 = 30;
const IPPROTO_UDP: i32 = 17;
/// `TSI_S_LISTEN`.
const TSI_S_LISTEN: i32 = 1;

/// The descriptors in a `PROC_PIDLISTFDS` answer (`proc_fdinfo` rows) that are sockets.
/// Trailing bytes short of a row are ignored.
pub fn socket_fds(bytes: &[u8]) -> impl Iterator<Item = i32> + '_ {
    bytes.chunks_exact(PROC_FDINFO_LEN).filter_map(|row| {
        let fd = i32::from_ne_bytes(row.get(..4)?.try_into().ok()?);
        let ty = u32::from_ne_bytes(row.get(4..8)?.try_into().ok()?);
        (ty == PROX_FDTYPE_SOCKET).then_some(fd)
    })
}

/// The socket a `PROC_PIDFDSOCKETINFO` answer describes, if it belongs in a listener table:
/// a TCP socket in LISTEN state, or a UDP socket bound to a port (marked `connected` when it
/// has a peer), of `pid` owned by `uid`. Anything else — other families and protocols, short
/// or garbled answers — is `None`. Its identity (`inode`) is the kernel's opaque socket handle
/// folded to 32 bits: the same socket seen in two processes (inherited) has the same one.
pub fn parse_socket(bytes: &[u8], pid: u32, uid: Option<u32>) -> Option<(Table, Found)> {
    if bytes.len() < SOCKET_FDINFO_LEN {
        return None;
    }
    let v6 = match int(bytes, SOI_FAMILY)? {
        AF_INET => false,
        AF_INET6 => true,
        _ => return None,
    };
    let proto = match int(bytes, SOI_KIND)? {
        SOCKINFO_TCP if int(bytes, TCPSI_STATE)? == TSI_S_LISTEN => Proto::Tcp,
        SOCKINFO_IN if int(bytes, SOI_PROTOCOL)? == IPPROTO_UDP => Proto::Udp,
        _ => return None,
    };
    // Ports: `inp_lport`/`inp_fport`, network-order 16 bits stored in an `int`.
    let port = u16::from_be(int(bytes, INSI_LPORT)? as u16);
    let peer_port = u16::from_be(int(bytes, INSI_FPORT)? as u16);
    if port == 0 {
        return None; // an unbound UDP socket
    }
    let addr: IpAddr = if v6 {
        Ipv6Addr::from(<[u8; 16]>::try_from(bytes.get(INSI_LADDR..INSI_LADDR + 16)?).ok()?).into()
    } else {
        // `in4in6_addr`: 12 bytes of padding, then the IPv4 address.
        Ipv4Addr::from(<[u8; 4]>::try_from(bytes.get(INSI_LADDR + 12..INSI_LADDR + 16)?).ok()?).into()
    };
    let peer_addr = bytes.get(INSI_FADDR..INSI_FADDR + 16)?;
    let connected = proto == Proto::Udp && (peer_port != 0 || peer_addr.iter().any(|b| *b != 0));
    let so = u64::from_ne_bytes(bytes.get(SOI_SO..SOI_SO + 8)?.try_into().ok()?);
    let found = Found {
        listener: Listener { proto, addr, port },
        inode: (so ^ (so >> 32)) as u32,
        uid,
        pid: (pid != 0).then_some(pid),
        connected,
    };
    Some((Table { proto, v6 }, found))
}

fn int(bytes: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// The structures of xnu's `bsd/sys/proc_info.h` this module reads, transcribed field by field
/// (LP64: `int` 32 bits, `off_t` 64; `in6_addr`/`in4in6_addr` 16 bytes aligned to 4), so the
/// compiler lays them out as the C compiler does and the offsets above can be checked.
#[allow(dead_code, non_camel_case_types)] // Only their layout is used.
pub(crate) mod layout {
    use std::mem::{offset_of, size_of};

    #[repr(C)]
    pub struct proc_fileinfo {
        fi_openflags: u32,
        fi_status: u32,
        fi_offset: i64,
        fi_type: i32,
        fi_guardflags: u32,
    }

    #[repr(C)]
    pub struct vinfo_stat {
        vst_dev: u32,
        vst_mode: u16,
        vst_nlink: u16,
        vst_ino: u64,
        vst_uid: u32,
        vst_gid: u32,
        vst_times: [i64; 8], // atime, atimensec, mtime, mtimensec, ctime, …, birthtimensec
        vst_size: i64,
        vst_blocks: i64,
        vst_blksize: i32,
        vst_flags: u32,
        vst_gen: u32,
        vst_rdev: u32,
        vst_qspare: [i64; 2],
    }

    #[repr(C)]
    pub struct sockbuf_info {
        sbi_cc: u32,
        sbi_hiwat: u32,
        sbi_mbcnt: u32,
        sbi_mbmax: u32,
        sbi_lowat: u32,
        sbi_flags: i16,
        sbi_timeo: i16,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct insi_v6 {
        in6_hlim: u8,
        in6_cksum: i32,
        in6_ifindex: u16,
        in6_hops: i16,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct in_sockinfo {
        pub insi_fport: i32,
        pub insi_lport: i32,
        insi_gencnt: u64,
        insi_flags: u32,
        insi_flow: u32,
        pub insi_vflag: u8,
        insi_ip_ttl: u8,
        rfu_1: u32,
        pub insi_faddr: [u32; 4],
        pub insi_laddr: [u32; 4],
        insi_v4: u8,
        insi_v6: insi_v6,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct tcp_sockinfo {
        pub tcpsi_ini: in_sockinfo,
        pub tcpsi_state: i32,
        tcpsi_timer: [i32; 4],
        tcpsi_mss: i32,
        tcpsi_flags: u32,
        rfu_1: u32,
        tcpsi_tp: u64,
    }

    /// The largest member of `soi_proto`: `SOCK_MAXADDRLEN` is 255.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct un_sockinfo {
        unsi_conn_so: u64,
        unsi_conn_pcb: u64,
        unsi_addr: [u8; 255],
        unsi_caddr: [u8; 255],
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct kern_ctl_info {
        kcsi_ids: [u32; 6],
        kcsi_name: [u8; 96], // MAX_KCTL_NAME
    }

    #[repr(C)]
    pub union soi_proto {
        pub pri_in: in_sockinfo,
        pub pri_tcp: tcp_sockinfo,
        pri_un: un_sockinfo,
        pri_kern_ctl: kern_ctl_info,
    }

    #[repr(C)]
    pub struct socket_info {
        soi_stat: vinfo_stat,
        pub soi_so: u64,
        soi_pcb: u64,
        soi_type: i32,
        pub soi_protocol: i32,
        pub soi_family: i32,
        soi_options: i16,
        soi_linger: i16,
        soi_state: i16,
        soi_qlen: i16,
        soi_incqlen: i16,
        soi_qlimit: i16,
        soi_timeo: i16,
        soi_error: u16,
        soi_oobmark: u32,
        soi_rcv: sockbuf_info,
        soi_snd: sockbuf_info,
        pub soi_kind: i32,
        rfu_1: u32,
        pub soi_proto: soi_proto,
    }

    #[repr(C)]
    pub struct socket_fdinfo {
        pfi: proc_fileinfo,
        pub psi: socket_info,
    }

    const _: () = {
        assert!(size_of::<proc_fileinfo>() == 24);
        assert!(size_of::<vinfo_stat>() == 136);
        assert!(size_of::<in_sockinfo>() == 80);
        assert!(size_of::<tcp_sockinfo>() == 120);
        assert!(size_of::<socket_info>() == 768);
        assert!(size_of::<socket_fdinfo>() == super::SOCKET_FDINFO_LEN);
        assert!(offset_of!(socket_fdinfo, psi) == super::PSI);
        assert!(offset_of!(socket_fdinfo, psi.soi_so) == super::SOI_SO);
        assert!(offset_of!(socket_fdinfo, psi.soi_protocol) == super::SOI_PROTOCOL);
        assert!(offset_of!(socket_fdinfo, psi.soi_family) == super::SOI_FAMILY);
        assert!(offset_of!(socket_fdinfo, psi.soi_kind) == super::SOI_KIND);
        assert!(offset_of!(socket_fdinfo, psi.soi_proto) == super::SOI_PROTO);
        let insi = super::SOI_PROTO;
        assert!(insi + offset_of!(in_sockinfo, insi_fport) == super::INSI_FPORT);
        assert!(insi + offset_of!(in_sockinfo, insi_lport) == super::INSI_LPORT);
        assert!(insi + offset_of!(in_sockinfo, insi_faddr) == super::INSI_FADDR);
        assert!(insi + offset_of!(in_sockinfo, insi_laddr) == super::INSI_LADDR);
        assert!(insi + offset_of!(tcp_sockinfo, tcpsi_state) == super::TCPSI_STATE);
        assert!(offset_of!(in_sockinfo, insi_vflag) == 24);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `socket_fdinfo` answer, built field by field at the transcribed layout's offsets.
    struct Fixture(Vec<u8>);

    impl Fixture {
        fn new(family: i32, kind: i32, protocol: i32) -> Self {
            let mut f = Fixture(vec![0; SOCKET_FDINFO_LEN]);
            f.int(SOI_FAMILY, family).int(SOI_KIND, kind).int(SOI_PROTOCOL, protocol);
            f.0[SOI_SO..SOI_SO + 8].copy_from_slice(&0x1122_3344_5566_7788u64.to_ne_bytes());
            f
        }

        fn tcp(family: i32, state: i32) -> Self {
            let mut f = Self::new(family, SOCKINFO_TCP, 6);
            f.int(TCPSI_STATE, state);
            f
        }

        fn udp(family: i32) -> Self {
            Self::new(family, SOCKINFO_IN, IPPROTO_UDP)
        }

        fn int(&mut self, at: usize, v: i32) -> &mut Self {
            self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
            self
        }

        /// Ports as the kernel stores them: `u_short` in network order, widened to `int`.
        fn ports(&mut self, local: u16, peer: u16) -> &mut Self {
            self.int(INSI_LPORT, i32::from(local.to_be())).int(INSI_FPORT, i32::from(peer.to_be()))
        }

        fn local(&mut self, addr: IpAddr) -> &mut Self {
            self.addr(INSI_LADDR, addr)
        }

        fn addr(&mut self, at: usize, addr: IpAddr) -> &mut Self {
            match addr {
                IpAddr::V4(a) => self.0[at + 12..at + 16].copy_from_slice(&a.octets()),
                IpAddr::V6(a) => self.0[at..at + 16].copy_from_slice(&a.octets()),
            }
            self
        }

        fn parse(&self) -> Option<(Table, Found)> {
            parse_socket(&self.0, 501, Some(501))
        }
    }

    #[test]
    fn a_tcp_listener_of_each_family() {
        let mut f = Fixture::tcp(AF_INET, TSI_S_LISTEN);
        f.ports(8080, 0).local("127.0.0.1".parse().unwrap());
        let (table, found) = f.parse().unwrap();
        assert_eq!(table, Table::ALL[0]);
        assert_eq!(
            found.listener,
            Listener { proto: Proto::Tcp, addr: "127.0.0.1".parse().unwrap(), port: 8080 }
        );
        assert_eq!((found.uid, found.pid, found.connected), (Some(501), Some(501), false));
        assert_eq!(found.inode, 0x1122_3344 ^ 0x5566_7788, "the socket handle, folded");

        let mut f = Fixture::tcp(AF_INET6, TSI_S_LISTEN);
        f.ports(443, 0).local("::1".parse().unwrap());
        let (table, found) = f.parse().unwrap();
        assert_eq!(table, Table::ALL[1]);
        assert_eq!(found.listener.addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(found.listener.port, 443);
    }

    #[test]
    fn tcp_sockets_not_listening_are_left_out() {
        for state in [0, 2, 4, 10] {
            let mut f = Fixture::tcp(AF_INET, state);
            f.ports(8080, 5000).local("127.0.0.1".parse().unwrap());
            assert_eq!(f.parse(), None, "state {state}");
        }
    }

    #[test]
    fn udp_bound_and_connected_and_unbound() {
        let mut f = Fixture::udp(AF_INET);
        f.ports(5353, 0);
        let (table, found) = f.parse().unwrap();
        assert_eq!(table, Table::ALL[2]);
        assert_eq!(found.listener.addr, "0.0.0.0".parse::<IpAddr>().unwrap());
        assert!(!found.connected);

        let mut f = Fixture::udp(AF_INET6);
        f.ports(40_000, 443).local("::1".parse().unwrap()).addr(INSI_FADDR, "::1".parse().unwrap());
        let (table, found) = f.parse().unwrap();
        assert_eq!((table, found.listener.port, found.connected), (Table::ALL[3], 40_000, true));

        assert_eq!(Fixture::udp(AF_INET).parse(), None, "port 0: not bound");
    }

    #[test]
    fn other_families_protocols_and_short_answers_are_none() {
        let mut unix = Fixture::new(1, 3, 0); // AF_UNIX, SOCKINFO_UN
        unix.ports(1234, 0);
        assert_eq!(unix.parse(), None);
        let mut raw = Fixture::new(AF_INET, SOCKINFO_IN, 1); // ICMP
        raw.ports(1, 0);
        assert_eq!(raw.parse(), None);
        let mut linux_af_inet6 = Fixture::tcp(10, TSI_S_LISTEN);
        linux_af_inet6.ports(80, 0);
        assert_eq!(linux_af_inet6.parse(), None, "10 is not AF_INET6 on macOS");
        let mut ok = Fixture::tcp(AF_INET, TSI_S_LISTEN);
        ok.ports(80, 0);
        for len in 0..SOCKET_FDINFO_LEN {
            assert_eq!(parse_socket(&ok.0[..len], 1, None), None, "{len} bytes");
        }
        assert!(parse_socket(&ok.0, 0, None).is_some_and(|(_, f)| f.pid.is_none()), "pid 0 is unknown");
    }

    #[test]
    fn the_parser_reads_what_the_transcribed_structs_hold() {
        // Fill the repr(C) struct through its fields and parse its bytes: the parser's offsets
        // and the compiler's layout of the transcription agree.
        let mut s: layout::socket_fdinfo = unsafe {
            // SAFETY: every field is an integer or array of integers; all-zero is valid.
            std::mem::zeroed()
        };
        s.psi.soi_family = AF_INET6;
        s.psi.soi_kind = SOCKINFO_TCP;
        s.psi.soi_so = 42;
        let addr: Ipv6Addr = "fd00::7".parse().unwrap();
        // SAFETY: writing `Copy` fields of a union member, all of it zeroed before.
        unsafe {
            s.psi.soi_proto.pri_tcp.tcpsi_state = TSI_S_LISTEN;
            s.psi.soi_proto.pri_tcp.tcpsi_ini.insi_lport = i32::from(3000u16.to_be());
            s.psi.soi_proto.pri_tcp.tcpsi_ini.insi_laddr =
                std::mem::transmute::<[u8; 16], [u32; 4]>(addr.octets());
        }
        // SAFETY: a plain-old-data struct viewed as its bytes, for as long as it lives.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw const s).cast::<u8>(),
                std::mem::size_of::<layout::socket_fdinfo>(),
            )
        };
        let (table, found) = parse_socket(bytes, 7, None).unwrap();
        assert_eq!(table, Table::ALL[1]);
        assert_eq!(found.listener, Listener { proto: Proto::Tcp, addr: addr.into(), port: 3000 });
        assert_eq!((found.pid, found.inode), (Some(7), 42));
    }

    #[test]
    fn socket_descriptors_from_a_fd_list() {
        let mut bytes = Vec::new();
        for (fd, ty) in [(0, 1u32), (3, PROX_FDTYPE_SOCKET), (4, 6), (7, PROX_FDTYPE_SOCKET)] {
            bytes.extend(i32::to_ne_bytes(fd));
            bytes.extend(ty.to_ne_bytes());
        }
        bytes.extend([2, 0, 0]); // a partial row
        assert_eq!(socket_fds(&bytes).collect::<Vec<_>>(), vec![3, 7]);
        assert_eq!(socket_fds(&[]).count(), 0);
    }
}
