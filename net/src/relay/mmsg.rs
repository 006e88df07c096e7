//! Many datagrams per system call: `recvmmsg(2)` and `sendmmsg(2)` on Linux, one datagram per
//! call elsewhere. Each datagram keeps its boundaries: one receive slot, one send message each.
//!
//! Not nix's `recvmmsg`/`sendmmsg`: its `MultiHeaders` holds raw pointers (so it cannot live in
//! a task across an `.await`), and the only way to learn how many datagrams `sendmmsg` took is
//! to iterate its results, which reads sender addresses it never initialised. The wrapper below
//! is small, keeps its headers on the stack for the length of one call, and says why each
//! pointer is valid.

use std::io;
use std::net::SocketAddr;

use tokio::net::UdpSocket;

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

/// Sends `datagrams` in order from `socket`, to `to` or (with `None`) to its connected peer,
/// as many per system call as the kernel takes; waits while the socket's buffer is full. A
/// datagram the kernel refuses goes to `refused(error)`: `true` drops that one datagram and
/// carries on with the next, `false` stops with the error. Returns how many were sent.
pub async fn send_batch<D: AsRef<[u8]>>(
    socket: &UdpSocket,
    datagrams: &[D],
    to: Option<SocketAddr>,
    mut refused: impl FnMut(&io::Error) -> bool,
) -> io::Result<usize> {
    let (mut done, mut sent) = (0, 0);
    while let Some(rest) = datagrams.get(done..).filter(|r| !r.is_empty()) {
        socket.writable().await?;
        match send_some(socket, rest, to) {
            Ok(n) => {
                done += n;
                sent += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // The head of `rest` is the datagram the kernel refused.
            Err(e) if refused(&e) => done += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
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
    let n = socket
        .try_io(tokio::io::Interest::READABLE, || sys::recvmmsg(socket.as_raw_fd(), slots, max, &mut got))?;
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

/// Sends the first datagrams of `datagrams` (at least one, unless it fails).
#[cfg(target_os = "linux")]
fn send_some<D: AsRef<[u8]>>(
    socket: &UdpSocket,
    datagrams: &[D],
    to: Option<SocketAddr>,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let to = to.map(socket2::SockAddr::from);
    socket.try_io(tokio::io::Interest::WRITABLE, || sys::sendmmsg(socket.as_raw_fd(), datagrams, to.as_ref()))
}

#[cfg(not(target_os = "linux"))]
fn send_some<D: AsRef<[u8]>>(
    socket: &UdpSocket,
    datagrams: &[D],
    to: Option<SocketAddr>,
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
        for ((meta, header), name) in got.iter_mut().zip(&headers).zip(names).take(n) {
            // SAFETY: the kernel wrote `msg_namelen` bytes of a socket address into `name`.
            let from = unsafe { SockAddr::new(name, header.msg_hdr.msg_namelen) }.as_socket();
            *meta = Meta {
                len: header.msg_len as usize,
                from,
                truncated: header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            };
        }
        Ok(n)
    }

    /// `sendmmsg(2)` of up to [`MMSG_BATCH`] of `datagrams`, to `to` or the connected peer,
    /// without waiting; returns how many the kernel took (it stops at the first it refuses,
    /// and fails only if that is the first).
    pub(super) fn sendmmsg<D: AsRef<[u8]>>(
        fd: RawFd,
        datagrams: &[D],
        to: Option<&SockAddr>,
    ) -> io::Result<usize> {
        let mut iovs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MMSG_BATCH];
        let mut headers: [libc::mmsghdr; MMSG_BATCH] = std::array::from_fn(|_| empty_header());
        let mut count = 0;
        for ((d, iov), header) in datagrams.iter().zip(&mut iovs).zip(&mut headers) {
            let d = d.as_ref();
            // The kernel only reads through a send's iovec; the cast is what the C type asks.
            *iov = libc::iovec { iov_base: d.as_ptr().cast_mut().cast(), iov_len: d.len() };
            if let Some(to) = to {
                header.msg_hdr.msg_name = to.as_ptr().cast_mut().cast();
                header.msg_hdr.msg_namelen = to.len();
            }
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
            count += 1;
        }
        if count == 0 {
            return Ok(0);
        }
        // SAFETY: the first `count` headers each point at one iovec over a datagram borrowed
        // for the whole call and, when given, at `to`'s address of its stated length; the
        // kernel only reads them (and writes each header's `msg_len`).
        let n = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), count as libc::c_uint, 0) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
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
