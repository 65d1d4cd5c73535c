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
/// `froms[i]` (unspecified if the kernel reported no IPv4 sender).
pub(crate) fn recv_from_v4(
    fd: BorrowedFd<'_>,
    bufs: &mut [Box<[u8]>],
    off: usize,
    lens: &mut [usize],
    froms: &mut [SocketAddrV4],
) -> io::Result<usize> {
    let n = bufs.len().min(lens.len()).min(froms.len()).min(MAX_MSGS);
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
    for ((h, iov), a) in hdrs
        .iter_mut()
        .zip(iovs.iter_mut())
        .zip(addrs.iter_mut())
        .take(n)
    {
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
        h.msg_hdr.msg_name = (a as *mut libc::sockaddr_in).cast();
        h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
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
    for (((l, f), h), a) in lens
        .iter_mut()
        .zip(froms.iter_mut())
        .zip(hdrs.iter())
        .zip(addrs.iter())
        .take(got)
    {
        *l = h.msg_len as usize;
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
}
