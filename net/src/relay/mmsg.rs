//! Many datagrams per system call: `recvmmsg(2)` and `sendmmsg(2)` on Linux, one datagram per
//! call elsewhere. Each datagram keeps its boundaries: one receive slot each, and on the way out
//! either a message each or, for a run of datagrams of one size, one GSO message (`UDP_SEGMENT`:
//! the kernel builds one packet for the run, takes it through the IP stack once and cuts it into
//! the same datagrams again before any receiver sees it — the per-datagram send path was most of
//! the relay's CPU time in a datagram burst).
//!
//! Not nix's `recvmmsg`/`sendmmsg`: its `MultiHeaders` holds raw pointers (so it cannot live in
//! a task across an `.await`), and the only way to learn how many datagrams `sendmmsg` took is
//! to iterate its results, which reads sender addresses it never initialised. The wrapper below
//! is small, keeps its headers on the stack for the length of one call, and says why each
//! pointer is valid.

use std::io;
use std::net::SocketAddr;

use crate::relay::socket::UdpSocket;

/// Most datagrams one system call moves. 32 × 64 KiB receive slots, in the thread's scratch
/// buffer (`crate::scratch::with_scratch`), resident only as far as datagrams touch them (a burst of
/// 64-byte datagrams touches one page a slot).
pub const MMSG_BATCH: usize = 32;

/// One receive slot: room for any UDP payload (65 507 bytes over IPv4, 65 527 over IPv6) and
/// for one byte more than the framing carries, so an oversized datagram arrives whole and is
/// refused by the framing (as with `recv`), never cut.
pub const SLOT_LEN: usize = hostnet_protocol::datagram::MAX_DATAGRAM_LEN + 1;

/// What one batched receive took off the socket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Datagrams handed to the callback.
    pub datagrams: usize,
    /// Datagrams longer than a slot: dropped, since a cut datagram is a different datagram.
    pub truncated: usize,
}

impl Received {
    /// Datagrams taken off the socket, handed on or not.
    pub fn taken(&self) -> usize {
        self.datagrams + self.truncated
    }
}

/// Receives what already waits on `socket` — up to `max` datagrams (at most [`MMSG_BATCH`]) —
/// without waiting, and hands each to `each(payload, source)` in arrival order. `WouldBlock`
/// when nothing waits. An error after some datagrams were taken comes back on the next call.
///
/// The slots are the thread's scratch buffer: `each` must not use it (receive through this
/// module, relay) itself, or that nested use gets a buffer of its own.
pub fn try_recv_batch(
    socket: &UdpSocket,
    max: usize,
    mut each: impl FnMut(&[u8], Option<SocketAddr>),
) -> io::Result<Received> {
    let max = max.clamp(1, MMSG_BATCH);
    crate::scratch::with_scratch(MMSG_BATCH * SLOT_LEN, |slots| recv_into(socket, slots, max, &mut each))
}

/// Like [`try_recv_batch`], but waits until at least one datagram (or an error) arrives.
pub async fn recv_batch(
    socket: &UdpSocket,
    max: usize,
    mut each: impl FnMut(&[u8], Option<SocketAddr>),
) -> io::Result<Received> {
    loop {
        socket.readable().await?;
        match try_recv_batch(socket, max, &mut each) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Most datagrams in one GSO message: the kernel's `UDP_MAX_SEGMENTS` before Linux 6.9 (128
/// since).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO message: what one IPv4 UDP datagram may carry.
const GSO_MAX_BYTES: usize = 65_507;

/// How many datagrams at the head of `datagrams` can leave as one GSO message: a run of one
/// non-zero size, ended early by one shorter datagram (the kernel's rule: every segment the
/// same size but the last, which may be shorter), within the kernel's bounds. 1 where the head
/// goes alone; 0 for no datagrams.
pub fn gso_run<D: AsRef<[u8]>>(datagrams: &[D]) -> usize {
    let mut lens = datagrams.iter().map(|d| d.as_ref().len());
    let Some(size) = lens.next() else { return 0 };
    if size == 0 {
        return 1;
    }
    let (mut n, mut total) = (1, size);
    for len in lens {
        if n == GSO_MAX_SEGMENTS || len == 0 || len > size || total + len > GSO_MAX_BYTES {
            break;
        }
        n += 1;
        total += len;
        if len < size {
            break;
        }
    }
    n
}

/// Whether this kernel cuts GSO messages for UDP (`UDP_SEGMENT`, Linux 4.18 and later). Asked
/// once, the way quinn-udp asks, by setting the option on a spare socket: a kernel without it
/// would ignore the control message and send the whole run as one datagram.
#[cfg(target_os = "linux")]
pub fn gso_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(sys::probe_gso)
}

/// GSO is Linux's: elsewhere every datagram is a message of its own.
#[cfg(not(target_os = "linux"))]
pub fn gso_supported() -> bool {
    false
}

/// Sends `datagrams` in order from `socket`, to `to` or (with `None`) to its connected peer,
/// as many per system call as the kernel takes, runs of one size as GSO messages; waits while
/// the socket's buffer is full. A datagram the kernel refuses goes to `refused(error)`: `true`
/// drops that one datagram and carries on with the next, `false` stops with the error. Returns
/// how many were sent.
pub async fn send_batch<D: AsRef<[u8]>>(
    socket: &UdpSocket,
    datagrams: &[D],
    to: Option<SocketAddr>,
    mut refused: impl FnMut(&io::Error) -> bool,
) -> io::Result<usize> {
    let (mut done, mut sent) = (0, 0);
    // Datagrams before this index leave one per message: their GSO message was refused.
    let mut plain_until = 0;
    while let Some(rest) = datagrams.get(done..).filter(|r| !r.is_empty()) {
        let gso = done >= plain_until && gso_supported();
        match send_some(socket, rest, to, gso) {
            Ok(n) => {
                done += n;
                sent += n;
            }
            // Tried first, waited for only when full: the socket watches for room only while a
            // sender waits (`relay::socket`).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket.writable().await?,
            // A refusal of GSO itself (a route whose MTU is below the datagram size, a device
            // without checksum offload, a run the kernel finds too long): the same datagrams
            // again one by one, each accepted or refused on its own.
            Err(e) if gso && gso_run(rest) > 1 && refuses_gso(&e) => plain_until = done + gso_run(rest),
            // The head of `rest` is the datagram the kernel refused (for a GSO message, an
            // error of the socket's, such as an earlier ICMP error: as without GSO, it costs
            // the first datagram only).
            Err(e) if refused(&e) => done += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

/// Errors with which the kernel refuses a GSO message for what GSO asks, not for the socket.
fn refuses_gso(e: &io::Error) -> bool {
    #[cfg(target_os = "linux")]
    {
        matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::EIO | libc::EMSGSIZE | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
        )
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = e;
        false
    }
}

#[cfg(target_os = "linux")]
fn recv_into(
    socket: &UdpSocket,
    slots: &mut [u8],
    max: usize,
    each: &mut impl FnMut(&[u8], Option<SocketAddr>),
) -> io::Result<Received> {
    use std::os::fd::AsRawFd;
    let mut got = [sys::Meta::default(); MMSG_BATCH];
    // Fewer than `max` means the queue ran dry (or an error stopped the batch, which arrived
    // after the readiness this call acts on, so it brings an event of its own): the socket's
    // readiness is cleared now, as a `WouldBlock` clears it — not by one more call that finds
    // nothing, a system call per wake-up saved.
    let mut short = 0;
    let n = match socket.try_io(tokio::io::Interest::READABLE, || {
        let n = sys::recvmmsg(socket.as_raw_fd(), slots, max, &mut got)?;
        if n < max {
            short = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => short,
        r => r?,
    };
    let mut received = Received::default();
    for (meta, slot) in got.iter().take(n).zip(slots.chunks(SLOT_LEN)) {
        match slot.get(..meta.len).filter(|_| !meta.truncated) {
            Some(payload) => {
                each(payload, meta.from);
                received.datagrams += 1;
            }
            None => received.truncated += 1,
        }
    }
    Ok(received)
}

#[cfg(not(target_os = "linux"))]
fn recv_into(
    socket: &UdpSocket,
    slots: &mut [u8],
    max: usize,
    each: &mut impl FnMut(&[u8], Option<SocketAddr>),
) -> io::Result<Received> {
    // One datagram per call; the first slot serves them all, as each is handed on at once.
    let slot = slots.get_mut(..SLOT_LEN).unwrap_or_default();
    let mut received = Received::default();
    while received.datagrams < max {
        match socket.try_recv_from(slot) {
            Ok((n, from)) => {
                each(slot.get(..n).unwrap_or_default(), Some(from));
                received.datagrams += 1;
            }
            Err(e) if received.datagrams == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(received)
}

/// Sends the first datagrams of `datagrams` (at least one, unless it fails), runs of one size
/// as GSO messages if `gso`.
#[cfg(target_os = "linux")]
fn send_some<D: AsRef<[u8]>>(
    socket: &UdpSocket,
    datagrams: &[D],
    to: Option<SocketAddr>,
    gso: bool,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let to = to.map(socket2::SockAddr::from);
    socket.try_io(tokio::io::Interest::WRITABLE, || {
        sys::sendmmsg(socket.as_raw_fd(), datagrams, to.as_ref(), gso)
    })
}

#[cfg(not(target_os = "linux"))]
fn send_some<D: AsRef<[u8]>>(
    socket: &UdpSocket,
    datagrams: &[D],
    to: Option<SocketAddr>,
    _gso: bool,
) -> io::Result<usize> {
    let Some(d) = datagrams.first() else { return Ok(0) };
    match to {
        Some(to) => socket.try_send_to(d.as_ref(), to)?,
        None => socket.try_send(d.as_ref())?,
    };
    Ok(1)
}

#[cfg(target_os = "linux")]
mod sys {
    use std::io;
    use std::net::SocketAddr;
    use std::os::fd::RawFd;

    use socket2::{SockAddr, SockAddrStorage};

    use super::{MMSG_BATCH, SLOT_LEN};

    /// One received datagram's length and source.
    #[derive(Debug, Default, Clone, Copy)]
    pub(super) struct Meta {
        pub len: usize,
        pub from: Option<SocketAddr>,
        pub truncated: bool,
    }

    fn empty_header() -> libc::mmsghdr {
        // SAFETY: `mmsghdr` is plain C data; all zeroes is a valid value (null pointers, zero
        // lengths, no flags), and what the kernel reads is set before each call.
        unsafe { std::mem::zeroed() }
    }

    /// `recvmmsg(2)` into up to `max` slots of `slots` (each `SLOT_LEN` bytes), without
    /// waiting; fills `got` for each datagram received and returns how many.
    pub(super) fn recvmmsg(
        fd: RawFd,
        slots: &mut [u8],
        max: usize,
        got: &mut [Meta; MMSG_BATCH],
    ) -> io::Result<usize> {
        let mut names: [SockAddrStorage; MMSG_BATCH] = std::array::from_fn(|_| SockAddrStorage::zeroed());
        let mut iovs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MMSG_BATCH];
        let mut headers: [libc::mmsghdr; MMSG_BATCH] = std::array::from_fn(|_| empty_header());
        let mut count = 0;
        for (((slot, iov), name), header) in
            slots.chunks_exact_mut(SLOT_LEN).zip(&mut iovs).zip(&mut names).zip(&mut headers).take(max)
        {
            *iov = libc::iovec { iov_base: slot.as_mut_ptr().cast(), iov_len: slot.len() };
            header.msg_hdr.msg_name = (name as *mut SockAddrStorage).cast();
            header.msg_hdr.msg_namelen = name.size_of();
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
            count += 1;
        }
        // SAFETY: the first `count` headers each point at one iovec over a distinct slot of
        // `slots` and at a name buffer of the size given; slots, iovecs and names outlive the
        // call, and the kernel writes at most the lengths given. No timeout pointer.
        let n = unsafe {
            libc::recvmmsg(fd, headers.as_mut_ptr(), count as libc::c_uint, 0, std::ptr::null_mut())
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?.min(count);
        // By reference: only the `n` names the kernel wrote are copied out, not the whole array.
        for ((meta, header), name) in got.iter_mut().zip(&headers).zip(&names).take(n) {
            // SAFETY: the kernel wrote `msg_namelen` bytes of a socket address into `name`;
            // `SockAddrStorage` is plain C data (no `Drop`), so reading a copy out is sound.
            let from = unsafe { SockAddr::new(std::ptr::read(name), header.msg_hdr.msg_namelen) }.as_socket();
            *meta = Meta {
                len: header.msg_len as usize,
                from,
                truncated: header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            };
        }
        Ok(n)
    }

    /// Room for one `UDP_SEGMENT` control message (a `u16`), aligned as a `cmsghdr` must be.
    #[derive(Clone, Copy)]
    #[repr(C, align(8))]
    struct GsoControl([u8; 32]);

    /// `sendmmsg(2)` of up to [`MMSG_BATCH`] of `datagrams`, to `to` or the connected peer,
    /// without waiting; with `gso`, each run of one size (see [`super::gso_run`]) is one
    /// message the kernel cuts into its datagrams. Returns how many datagrams the kernel took
    /// (it stops at the first message it refuses, and fails only if that is the first).
    pub(super) fn sendmmsg<D: AsRef<[u8]>>(
        fd: RawFd,
        datagrams: &[D],
        to: Option<&SockAddr>,
        gso: bool,
    ) -> io::Result<usize> {
        let datagrams = datagrams.get(..MMSG_BATCH).unwrap_or(datagrams);
        let mut iovs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MMSG_BATCH];
        for (d, iov) in datagrams.iter().zip(&mut iovs) {
            let d = d.as_ref();
            // The kernel only reads through a send's iovec; the cast is what the C type asks.
            *iov = libc::iovec { iov_base: d.as_ptr().cast_mut().cast(), iov_len: d.len() };
        }
        // Messages: (first datagram, datagrams in it, each one's size when more than one).
        let mut messages = [(0usize, 0usize, 0u16); MMSG_BATCH];
        let (mut count, mut used) = (0, 0);
        while let Some(rest) = datagrams.get(used..).filter(|r| !r.is_empty()) {
            let run = if gso { super::gso_run(rest) } else { 1 };
            let size = rest.first().map_or(0, |d| d.as_ref().len());
            if let Some(m) = messages.get_mut(count) {
                *m = (used, run, u16::try_from(size).unwrap_or(u16::MAX));
            }
            count += 1;
            used += run;
        }
        if count == 0 {
            return Ok(0);
        }
        let mut controls = [GsoControl([0; 32]); MMSG_BATCH];
        let mut headers: [libc::mmsghdr; MMSG_BATCH] = std::array::from_fn(|_| empty_header());
        // One base pointer for each array, taken after the last write through the arrays
        // themselves: the headers point into them by offset.
        let (iov_base, control_base) = (iovs.as_mut_ptr(), controls.as_mut_ptr());
        for (i, (header, &(first, run, size))) in headers.iter_mut().zip(&messages).take(count).enumerate() {
            if let Some(to) = to {
                header.msg_hdr.msg_name = to.as_ptr().cast_mut().cast();
                header.msg_hdr.msg_namelen = to.len();
            }
            // SAFETY: `first + run <= datagrams.len() <= MMSG_BATCH`: inside `iovs`.
            header.msg_hdr.msg_iov = unsafe { iov_base.add(first) };
            header.msg_hdr.msg_iovlen = run as _;
            if run > 1 {
                // SAFETY: `i < count <= MMSG_BATCH`: inside `controls`; each message has its
                // own, 8-byte aligned and larger than `CMSG_SPACE(2)` (24 bytes on 64-bit,
                // checked below). `CMSG_FIRSTHDR` of a header whose control buffer is that
                // space is its start, and `CMSG_DATA` lies within it.
                unsafe {
                    let space = libc::CMSG_SPACE(std::mem::size_of::<u16>() as _) as usize;
                    debug_assert!(space <= std::mem::size_of::<GsoControl>());
                    header.msg_hdr.msg_control = control_base.add(i).cast();
                    header.msg_hdr.msg_controllen = space as _;
                    let cmsg = libc::CMSG_FIRSTHDR(&header.msg_hdr);
                    (*cmsg).cmsg_level = libc::SOL_UDP;
                    (*cmsg).cmsg_type = libc::UDP_SEGMENT;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as _) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size);
                }
            }
        }
        // SAFETY: the first `count` headers each point at `run` iovecs over datagrams borrowed
        // for the whole call, at their own control buffer when GSO cuts them, and when given at
        // `to`'s address of its stated length; `iovs`, `controls` and `to` outlive the call, and
        // the kernel only reads them (and writes each header's `msg_len`).
        let n = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), count as libc::c_uint, 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        Ok(messages.iter().take(n).map(|&(_, run, _)| run).sum())
    }

    /// Whether the kernel knows `UDP_SEGMENT` (setting it on a spare socket works).
    pub(super) fn probe_gso() -> bool {
        let Ok(s) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None) else {
            return false;
        };
        let size: libc::c_int = 1200;
        // SAFETY: a valid socket, and an option value of the size given, read by the kernel.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        r == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DEADLINE: Duration = Duration::from_secs(10);

    async fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let _ = socket2::SockRef::from(&b).set_recv_buffer_size(4 << 20);
        a.connect(b.local_addr().unwrap()).await.unwrap();
        (a, b)
    }

    /// Sizes from empty to the largest IPv4 UDP payload, mixed; few large ones, so they fit a
    /// default-sized receive buffer all at once.
    fn sizes(n: usize) -> Vec<usize> {
        (0..n)
            .map(|i| if i == 5 || i + 1 == n { 65_507 } else { [0, 1, 64, 1400, 4000][i % 5] + i % 3 })
            .collect()
    }

    fn datagram(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 31 + j) as u8).collect()
    }

    /// Receives until `n` datagrams came, or the deadline; returns them and the largest batch.
    async fn recv_all(socket: &UdpSocket, n: usize) -> (Vec<(Vec<u8>, Option<SocketAddr>)>, usize) {
        let mut got = Vec::new();
        let mut largest = 0;
        tokio::time::timeout(DEADLINE, async {
            while got.len() < n {
                let r = recv_batch(socket, MMSG_BATCH, |d, from| got.push((d.to_vec(), from))).await.unwrap();
                largest = largest.max(r.datagrams);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("only {} of {n} datagrams arrived", got.len()));
        (got, largest)
    }

    #[tokio::test]
    async fn a_batch_keeps_every_boundary_and_source() {
        let (a, b) = pair().await;
        let n = 100;
        let sent: Vec<Vec<u8>> = sizes(n).into_iter().enumerate().map(|(i, len)| datagram(i, len)).collect();
        for d in &sent {
            a.send(d).await.unwrap();
        }
        let (got, largest) = recv_all(&b, n).await;
        for (i, (d, from)) in got.iter().enumerate() {
            assert_eq!(d, &sent[i], "datagram {i}");
            assert_eq!(*from, Some(a.local_addr().unwrap()));
        }
        #[cfg(target_os = "linux")]
        assert!(largest > 1, "all {n} datagrams waited, yet no call took more than one");
        let _ = largest;
        // Nothing left: a receive without waiting says so.
        let e = try_recv_batch(&b, MMSG_BATCH, |_, _| panic!("no datagram was sent")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[tokio::test]
    async fn max_bounds_one_call() {
        let (a, b) = pair().await;
        for i in 0..10u8 {
            a.send(&[i]).await.unwrap();
        }
        let mut got = Vec::new();
        b.readable().await.unwrap();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while got.len() < 10 {
            assert!(tokio::time::Instant::now() < deadline, "only {} of 10 arrived", got.len());
            match try_recv_batch(&b, 3, |d, _| got.push(d.to_vec())) {
                Ok(r) => assert!(r.datagrams <= 3, "asked for 3, took {}", r.datagrams),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => b.readable().await.unwrap(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, (0..10u8).map(|i| vec![i]).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn send_batch_delivers_more_than_one_call_takes_in_order() {
        let (a, b) = pair().await;
        let n = 3 * MMSG_BATCH + 5;
        let sent: Vec<Vec<u8>> = sizes(n).into_iter().enumerate().map(|(i, len)| datagram(i, len)).collect();
        let count = send_batch(&a, &sent, None, |e| panic!("refused: {e}")).await.unwrap();
        assert_eq!(count, n);
        let (got, _) = recv_all(&b, n).await;
        let got: Vec<Vec<u8>> = got.into_iter().map(|(d, _)| d).collect();
        assert_eq!(got, sent);
    }

    #[test]
    fn gso_runs_are_one_size_with_at_most_one_shorter_last() {
        let lens = |v: &[usize]| v.iter().map(|&n| vec![0u8; n]).collect::<Vec<_>>();
        assert_eq!(gso_run::<Vec<u8>>(&[]), 0);
        assert_eq!(gso_run(&lens(&[64, 64, 64])), 3);
        assert_eq!(gso_run(&lens(&[64, 64, 10, 64])), 3, "a shorter one ends the run");
        assert_eq!(gso_run(&lens(&[64, 100, 64])), 1, "a longer one cannot follow");
        assert_eq!(gso_run(&lens(&[0, 0])), 1, "empty datagrams go alone");
        assert_eq!(gso_run(&lens(&[64, 0])), 1);
        assert_eq!(gso_run(&lens(&[1; 100])), GSO_MAX_SEGMENTS);
        assert_eq!(gso_run(&lens(&[30_000, 30_000, 30_000])), 2, "within one datagram's bytes");
        assert_eq!(gso_run(&lens(&[65_507, 65_507])), 1);
    }

    /// Runs of one size (GSO messages where the kernel has them), runs ended by a shorter
    /// datagram, empty ones and single ones, in one batch: every datagram arrives whole, alone
    /// and in order.
    #[tokio::test]
    async fn runs_of_one_size_arrive_as_the_datagrams_sent() {
        let (a, b) = pair().await;
        let mut lens = vec![1400; 20];
        lens.extend([1400, 700, 64, 64, 64, 0, 0, 64, 3, 3, 3, 3, 1]);
        lens.extend([1; 70]);
        lens.extend([20_000; 4]);
        let sent: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &len)| datagram(i, len)).collect();
        let count = send_batch(&a, &sent, None, |e| panic!("refused: {e}")).await.unwrap();
        assert_eq!(count, sent.len());
        let (got, _) = recv_all(&b, sent.len()).await;
        let got: Vec<Vec<u8>> = got.into_iter().map(|(d, _)| d).collect();
        assert_eq!(got, sent);
    }

    /// A GSO message the kernel refuses for GSO's sake (here: a socket sending without UDP
    /// checksums, which GSO needs; elsewhere a route whose MTU is below the datagrams) goes
    /// again one datagram at a time, and nothing is reported refused.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_run_gso_refuses_goes_one_by_one() {
        use std::os::fd::AsRawFd;
        let (a, b) = pair().await;
        let on: libc::c_int = 1;
        // SAFETY: a valid socket and an option value of the size given.
        let r = unsafe {
            libc::setsockopt(
                a.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_NO_CHECK: {}", io::Error::last_os_error());
        let sent: Vec<Vec<u8>> = (0..40).map(|i| datagram(i, 100)).collect();
        let count = send_batch(&a, &sent, None, |e| panic!("refused: {e}")).await.unwrap();
        assert_eq!(count, sent.len());
        let (got, _) = recv_all(&b, sent.len()).await;
        assert_eq!(got.into_iter().map(|(d, _)| d).collect::<Vec<_>>(), sent);
    }

    #[tokio::test]
    async fn send_batch_to_an_address() {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (_, b) = pair().await;
        let sent = [b"one".to_vec(), Vec::new(), b"three".to_vec()];
        send_batch(&a, &sent, Some(b.local_addr().unwrap()), |e| panic!("refused: {e}")).await.unwrap();
        let (got, _) = recv_all(&b, 3).await;
        assert_eq!(got.into_iter().map(|(d, _)| d).collect::<Vec<_>>(), sent);
    }

    /// The kernel takes the datagrams before one it refuses and stops there: the rest must
    /// still go, in order, and the refused one must be reported, not lost silently.
    #[cfg(unix)] // the error code checked is errno's
    #[tokio::test]
    async fn a_refused_datagram_mid_batch_is_reported_and_the_rest_still_go() {
        let (a, b) = pair().await;
        let too_big = vec![0u8; 65_508]; // one byte over the IPv4 UDP payload limit
        let sent = [b"a".to_vec(), b"b".to_vec(), too_big.clone(), b"c".to_vec(), too_big, b"d".to_vec()];
        let mut refusals = Vec::new();
        let count = send_batch(&a, &sent, None, |e| {
            refusals.push(e.raw_os_error());
            true
        })
        .await
        .unwrap();
        assert_eq!(count, 4);
        assert_eq!(refusals, [Some(libc::EMSGSIZE); 2]);
        let (got, _) = recv_all(&b, 4).await;
        assert_eq!(got.into_iter().map(|(d, _)| d).collect::<Vec<_>>(), [b"a", b"b", b"c", b"d"]);

        // Told to stop, it stops at the refused datagram, after sending those before it.
        let e = send_batch(&a, &sent, None, |_| false).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
        let (got, _) = recv_all(&b, 2).await;
        assert_eq!(got.into_iter().map(|(d, _)| d).collect::<Vec<_>>(), [b"a", b"b"]);
    }

    #[tokio::test]
    async fn ipv6_sources_are_reported() {
        let Ok(a) = UdpSocket::bind("[::1]:0").await else { return }; // no IPv6 here
        let b = UdpSocket::bind("[::1]:0").await.unwrap();
        let sent = [b"x".to_vec(), b"yy".to_vec()];
        send_batch(&a, &sent, Some(b.local_addr().unwrap()), |e| panic!("refused: {e}")).await.unwrap();
        let (got, _) = recv_all(&b, 2).await;
        assert_eq!(
            got,
            vec![
                (b"x".to_vec(), Some(a.local_addr().unwrap())),
                (b"yy".to_vec(), Some(a.local_addr().unwrap()))
            ]
        );
    }
}
