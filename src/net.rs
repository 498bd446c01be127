//! Socket options std does not expose: TCP_QUICKACK and TCP_INFO.
//!
//! sshd leaves Nagle on for connections without an interactive session, so its small packets wait
//! for our ACK; Linux delays ACKs by up to 40 ms in "pingpong" mode. Re-arming TCP_QUICKACK each time
//! we are about to read makes our ACKs immediate and removes that stall. TCP_INFO tells how long the
//! peer has been silent, which is what the keep-alive logic needs.

use std::os::fd::RawFd;
use std::time::Duration;

/// Asks the kernel to ACK immediately; the flag is not sticky, so callers re-arm it before each read.
pub fn set_quickack(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: `one` outlives the call and the length matches its type; a bad fd only yields EBADF.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Time since the peer last sent us any data, as the kernel saw it.
pub fn since_last_data_received(fd: RawFd) -> Option<Duration> {
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes of it.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        if rc != 0 {
            return None;
        }
        Some(Duration::from_millis(info.tcpi_last_data_recv as u64))
    }
}

/// Whether the peer has closed or reset the connection, as the kernel sees it. Checked on every
/// readable wake-up so a restarted sshd is noticed at once, even with no channel reading.
pub fn closed_by_peer(fd: RawFd) -> Option<String> {
    // SAFETY: as above.
    let state = unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        if libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut libc::tcp_info).cast(), &mut len) != 0 {
            return None;
        }
        info.tcpi_state
    };
    const TCP_ESTABLISHED: u8 = 1;
    const TCP_CLOSE: u8 = 7;
    const TCP_CLOSE_WAIT: u8 = 8;
    match state {
        TCP_ESTABLISHED => None,
        TCP_CLOSE_WAIT => Some("the server closed the connection".into()),
        TCP_CLOSE => Some("the connection was reset".into()),
        other => Some(format!("the connection left the established state (TCP state {other})")),
    }
}

/// Whether a small write would go out whole right now.
///
/// libssh2 builds a few tiny packets (channel EOF, keep-alive) in stack buffers; if one of them were
/// only partly sent, finishing it would need the very same buffer address again, which a retry from
/// another call path cannot provide. Sending them only when the socket has room avoids that state.
pub fn writable_now(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLOUT != 0
}
