//! `recvmmsg`/`sendmmsg` on the raw IPv4 socket, one system call per batch.
//!
//! The message headers are built on the stack for each call, pointing at the caller's
//! buffers, so nothing is allocated and no header outlives the buffers it points into.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, BorrowedFd};

/// The most messages one call handles.
pub(crate) const MAX_MSGS: usize = 128;

fn sockaddr_v4(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Sends `msgs` (datagram, destination) with one `sendmmsg`. Returns how many were sent,
/// in order (at least 1 on success); an error belongs to the first message. Raw sockets
/// ignore the port (use 0).
pub(crate) fn send_v4(fd: BorrowedFd<'_>, msgs: &[(&[u8], SocketAddrV4)]) -> io::Result<usize> {
    let n = msgs.len().min(MAX_MSGS);
    if n == 0 {
        return Ok(0);
    }
    let mut addrs = [sockaddr_v4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); MAX_MSGS];
    let mut iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_MSGS];
    // SAFETY: mmsghdr is a plain C struct; all-zero is a valid value (null pointers, zero
    // lengths).
    let mut hdrs: [libc::mmsghdr; MAX_MSGS] = unsafe { std::mem::zeroed() };
    for (((m, a), iov), h) in msgs
        .iter()
        .zip(addrs.iter_mut())
        .zip(iovs.iter_mut())
        .zip(hdrs.iter_mut())
        .take(n)
    {
        *a = sockaddr_v4(m.1);
        // The kernel only reads from iov_base for a send; the cast to *mut is what the C
        // type requires.
        iov.iov_base = m.0.as_ptr() as *mut libc::c_void;
        iov.iov_len = m.0.len();
        h.msg_hdr.msg_name = (a as *mut libc::sockaddr_in).cast();
        h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: the first `n` headers point at `addrs`, `iovs` and the caller's slices, all
    // alive and unmoved for the duration of the call; `n` ≤ the array length.
    let r = unsafe {
        libc::sendmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// `UDP_SEGMENT` (linux/udp.h; not in every libc target): the GSO segment size of a send.
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h): receive coalesced datagrams with their segment size.
const UDP_GRO: libc::c_int = 104;
/// Most segments in one UDP GSO send (the kernel's UDP_MAX_SEGMENTS on older kernels).
const MAX_GSO_SEGMENTS: usize = 64;
/// Most payload bytes of one UDP GSO send: an IPv4 datagram less the IPv4 and UDP headers.
const MAX_GSO_BYTES: usize = 65_535 - 20 - 8;
/// Room for one `cmsghdr` carrying a `u16`, 8-byte aligned (CMSG_SPACE(2) on 64-bit, and
/// more than enough on 32-bit).
type CmsgBuf = [u64; 4];

/// Sends UDP datagrams `msgs` with one `sendmmsg`, using UDP GSO (`UDP_SEGMENT`): a run of
/// consecutive datagrams to one destination, all of one length except a shorter last one,
/// leaves as one super-datagram that the kernel (or the receiver's GRO) splits. One trip
/// through the stack, the veth and the bridge per run instead of per datagram. Returns how
/// many of `msgs` were sent, in order; an error belongs to the run of the first unsent one
/// (the caller may retry it without GSO).
pub(crate) fn send_v4_gso(fd: BorrowedFd<'_>, msgs: &[(&[u8], SocketAddrV4)]) -> io::Result<usize> {
    let n = msgs.len().min(MAX_MSGS);
    if n == 0 {
        return Ok(0);
    }
    let mut addrs = [sockaddr_v4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); MAX_MSGS];
    let mut iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_MSGS];
    let mut cmsgs = [CmsgBuf::default(); MAX_MSGS];
    // Per run: first message index and its number of messages.
    let mut runs = [(0usize, 0usize); MAX_MSGS];
    let mut n_runs = 0;
    let mut i = 0;
    while i < n {
        let Some((first, to)) = msgs.get(i) else {
            break;
        };
        let seg = first.len();
        let max_segs = MAX_GSO_BYTES
            .checked_div(seg)
            .map_or(1, |m| m.clamp(1, MAX_GSO_SEGMENTS));
        let mut k = 1;
        let mut total = seg;
        while k < max_segs && i + k < n {
            let Some((p, t)) = msgs.get(i + k) else {
                break;
            };
            if t != to || p.len() > seg || total + p.len() > MAX_GSO_BYTES {
                break;
            }
            total += p.len();
            k += 1;
            // A shorter datagram can only end a run.
            if p.len() < seg {
                break;
            }
        }
        if let Some(r) = runs.get_mut(n_runs) {
            *r = (i, k);
        }
        n_runs += 1;
        i += k;
    }
    // SAFETY: mmsghdr is a plain C struct; all-zero is a valid value.
    let mut hdrs: [libc::mmsghdr; MAX_MSGS] = unsafe { std::mem::zeroed() };
    for (r, &(start, k)) in runs.iter().enumerate().take(n_runs) {
        let (Some(h), Some(a), Some(c), Some(run_iovs), Some(run_msgs)) = (
            hdrs.get_mut(r),
            addrs.get_mut(r),
            cmsgs.get_mut(r),
            iovs.get_mut(start..start + k),
            msgs.get(start..start + k),
        ) else {
            continue;
        };
        for (iov, m) in run_iovs.iter_mut().zip(run_msgs) {
            // The kernel only reads from iov_base for a send.
            iov.iov_base = m.0.as_ptr() as *mut libc::c_void;
            iov.iov_len = m.0.len();
        }
        let (seg, to) = run_msgs
            .first()
            .map_or((0, a_unspec()), |m| (m.0.len(), m.1));
        *a = sockaddr_v4(to);
        h.msg_hdr.msg_name = (a as *mut libc::sockaddr_in).cast();
        h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_hdr.msg_iov = run_iovs.as_mut_ptr();
        h.msg_hdr.msg_iovlen = k as _;
        if k > 1 {
            let seg = u16::try_from(seg).unwrap_or(u16::MAX);
            // SAFETY: CMSG_LEN/CMSG_SPACE only compute sizes.
            let (len, space) = unsafe {
                (
                    libc::CMSG_LEN(std::mem::size_of::<u16>() as u32),
                    libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32),
                )
            };
            h.msg_hdr.msg_control = c.as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = space as _;
            // SAFETY: `c` is 8-byte aligned and at least CMSG_SPACE(2) bytes long, so the
            // first header and its u16 of data lie inside it.
            unsafe {
                let cm = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                if !cm.is_null() {
                    (*cm).cmsg_level = libc::SOL_UDP;
                    (*cm).cmsg_type = UDP_SEGMENT;
                    (*cm).cmsg_len = len as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), seg);
                }
            }
        }
    }
    // SAFETY: the first `n_runs` headers point at `addrs`, `cmsgs`, `iovs` and the
    // caller's slices, all alive and unmoved for the duration of the call.
    let r = unsafe {
        libc::sendmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n_runs as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(runs
        .iter()
        .take((r as usize).min(n_runs))
        .map(|&(_, k)| k)
        .sum())
}

fn a_unspec() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
}

/// Receives up to `bufs.len()` datagrams with one `recvmmsg` into `bufs`; sets `lens[i]`
/// to the length of datagram `i` and returns how many arrived. Datagrams larger than
/// their buffer are truncated (callers size buffers for the largest IPv4 datagram).
pub(crate) fn recv(
    fd: BorrowedFd<'_>,
    bufs: &mut [Box<[u8]>],
    lens: &mut [usize],
) -> io::Result<usize> {
    let n = bufs.len().min(lens.len()).min(MAX_MSGS);
    if n == 0 {
        return Ok(0);
    }
    let mut iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_MSGS];
    for (iov, b) in iovs.iter_mut().zip(bufs.iter_mut()).take(n) {
        iov.iov_base = b.as_mut_ptr().cast();
        iov.iov_len = b.len();
    }
    // SAFETY: as in `send_v4`, all-zero is a valid mmsghdr.
    let mut hdrs: [libc::mmsghdr; MAX_MSGS] = unsafe { std::mem::zeroed() };
    for (h, iov) in hdrs.iter_mut().zip(iovs.iter_mut()).take(n) {
        // No source address wanted: the raw socket delivers the IPv4 header.
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: the first `n` headers point at `iovs`, whose entries point at the caller's
    // exclusively borrowed buffers with their true lengths; everything outlives the call.
    let r = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = (r as usize).min(n);
    for (l, h) in lens.iter_mut().zip(hdrs.iter()).take(got) {
        *l = h.msg_len as usize;
    }
    Ok(got)
}

/// Like [`recv`] for a UDP socket: each datagram goes to `bufs[i][off..]`, its sender to
/// `froms[i]` (unspecified if the kernel reported no IPv4 sender). With `UDP_GRO` on,
/// `bufs[i]` may hold several coalesced datagrams of `segs[i]` bytes each (the last may
/// be shorter); `segs[i]` is 0 for a single datagram.
pub(crate) fn recv_from_v4(
    fd: BorrowedFd<'_>,
    bufs: &mut [Box<[u8]>],
    off: usize,
    lens: &mut [usize],
    froms: &mut [SocketAddrV4],
    segs: &mut [usize],
) -> io::Result<usize> {
    let n = bufs
        .len()
        .min(lens.len())
        .min(froms.len())
        .min(segs.len())
        .min(MAX_MSGS);
    let mut cmsgs = [CmsgBuf::default(); MAX_MSGS];
    if n == 0 {
        return Ok(0);
    }
    let mut iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_MSGS];
    let mut addrs = [sockaddr_v4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); MAX_MSGS];
    for (iov, b) in iovs.iter_mut().zip(bufs.iter_mut()).take(n) {
        let room = b.get_mut(off..).unwrap_or_default();
        iov.iov_base = room.as_mut_ptr().cast();
        iov.iov_len = room.len();
    }
    // SAFETY: as in `send_v4`, all-zero is a valid mmsghdr.
    let mut hdrs: [libc::mmsghdr; MAX_MSGS] = unsafe { std::mem::zeroed() };
    for (((h, iov), a), c) in hdrs
        .iter_mut()
        .zip(iovs.iter_mut())
        .zip(addrs.iter_mut())
        .zip(cmsgs.iter_mut())
        .take(n)
    {
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
        h.msg_hdr.msg_name = (a as *mut libc::sockaddr_in).cast();
        h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_hdr.msg_control = c.as_mut_ptr().cast();
        h.msg_hdr.msg_controllen = std::mem::size_of::<CmsgBuf>() as _;
    }
    // SAFETY: the first `n` headers point at `iovs` and `addrs` (alive, unmoved, sized as
    // declared), whose entries point into the caller's exclusively borrowed buffers.
    let r = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = (r as usize).min(n);
    for ((((l, f), h), a), sg) in lens
        .iter_mut()
        .zip(froms.iter_mut())
        .zip(hdrs.iter())
        .zip(addrs.iter())
        .zip(segs.iter_mut())
        .take(got)
    {
        *l = h.msg_len as usize;
        *sg = gro_segment(&h.msg_hdr);
        *f = if h.msg_hdr.msg_namelen as usize >= std::mem::size_of::<libc::sockaddr_in>()
            && i32::from(a.sin_family) == libc::AF_INET
        {
            SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )
        } else {
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
        };
    }
    Ok(got)
}

/// The `UDP_GRO` segment size in a received message's control data, 0 if none.
fn gro_segment(m: &libc::msghdr) -> usize {
    // SAFETY: `m` is a header the kernel filled: msg_control/msg_controllen describe our
    // buffer (still alive) and the kernel's cmsg chain inside it; the CMSG_* macros stay
    // within msg_controllen.
    unsafe {
        let mut cm = libc::CMSG_FIRSTHDR(m);
        while !cm.is_null() {
            if (*cm).cmsg_level == libc::SOL_UDP
                && (*cm).cmsg_type == UDP_GRO
                && (*cm).cmsg_len as usize
                    >= libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize
            {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(cm).cast::<libc::c_int>());
                return usize::try_from(v).unwrap_or(0);
            }
            cm = libc::CMSG_NXTHDR(m, cm);
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    /// Batched send and receive over loopback UDP (same system calls, no privileges).
    #[test]
    fn batch_round_trip_over_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, rx.local_addr().unwrap().port());
        let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let msgs: Vec<(&[u8], SocketAddrV4)> = payloads.iter().map(|p| (&p[..], to)).collect();
        assert_eq!(send_v4(tx.as_fd(), &msgs).unwrap(), 5);
        let mut bufs: Vec<Box<[u8]>> = (0..8).map(|_| vec![0u8; 2048].into_boxed_slice()).collect();
        let mut lens = [0usize; 8];
        let mut got = 0;
        for _ in 0..100 {
            match recv(rx.as_fd(), &mut bufs[got..], &mut lens[got..]) {
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
            if got == 5 {
                break;
            }
        }
        assert_eq!(got, 5);
        for (i, p) in payloads.iter().enumerate() {
            assert_eq!(&bufs[i][..lens[i]], &p[..]);
        }
        assert!(matches!(
            recv(rx.as_fd(), &mut bufs, &mut lens),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        ));
    }

    /// UDP GSO send and GRO receive over loopback: runs of equal-sized datagrams to one
    /// destination go out as super-datagrams; whatever the kernel coalesces on the way
    /// in, splitting each buffer by its segment size gives back the datagrams in order.
    #[test]
    fn gso_send_and_gro_receive_preserve_datagrams() {
        use nix::sys::socket::{setsockopt, sockopt};
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        setsockopt(&rx, sockopt::UdpGroSegment, &true).unwrap();
        let rx2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = |s: &UdpSocket| s.local_addr().unwrap().port();
        let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port(&rx));
        let to2 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port(&rx2));
        // Four of 1000 bytes and a shorter one (one run), one to another socket, then
        // 70 of 900 bytes (more than one run can carry).
        let mut payloads: Vec<(Vec<u8>, SocketAddrV4)> = (0..4u8)
            .map(|i| (vec![i; 1000], to))
            .chain([(vec![9u8; 300], to), (vec![7u8; 1000], to2)])
            .collect();
        payloads.extend((0..70u8).map(|i| (vec![100 + i; 900], to)));
        let msgs: Vec<(&[u8], SocketAddrV4)> = payloads.iter().map(|(p, a)| (&p[..], *a)).collect();
        let mut sent = 0;
        while sent < msgs.len() {
            sent += send_v4_gso(tx.as_fd(), &msgs[sent..]).unwrap();
        }
        let want: Vec<&Vec<u8>> = payloads
            .iter()
            .filter(|(_, a)| *a == to)
            .map(|(p, _)| p)
            .collect();
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut bufs: Vec<Box<[u8]>> = (0..8)
            .map(|_| vec![0u8; 65_536].into_boxed_slice())
            .collect();
        let (mut lens, mut froms, mut segs) = ([0usize; 8], [a_unspec(); 8], [0usize; 8]);
        for _ in 0..200 {
            match recv_from_v4(rx.as_fd(), &mut bufs, 4, &mut lens, &mut froms, &mut segs) {
                Ok(k) => {
                    for i in 0..k {
                        assert_eq!(froms[i].port(), port(&tx));
                        let data = &bufs[i][4..4 + lens[i]];
                        let seg = if segs[i] == 0 { data.len() } else { segs[i] };
                        got.extend(data.chunks(seg).map(<[u8]>::to_vec));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if got.len() >= want.len() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, *w);
        }
        let mut b = [0u8; 2000];
        rx2.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let (l, _) = rx2.recv_from(&mut b).unwrap();
        assert_eq!(&b[..l], &[7u8; 1000][..]);
    }
}
