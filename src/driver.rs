//! The only code that knows libssh2 is non-blocking: a session bound to a socket registered with tokio.
//!
//! libssh2 reports "would block" and, through `block_directions`, which way the socket must become
//! ready before retrying. `SshIo` turns that into awaits on socket readiness: no sleeps, no polling.
//! Readiness is cleared *before* the retry, so data arriving after libssh2's last read re-arms it and
//! no wake-up is lost.
//!
//! Readiness says nothing about what libssh2 already took *out* of the socket: any call that reads
//! may queue packets for other channels. So libssh2 receives through our own `recv` callback, which
//! counts the bytes it takes (`transport_received`); the connection actor compares the count around
//! its passes to know whether a pass may have left work queued for a channel stepped earlier.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::raw::{c_int, c_void};
use std::sync::Arc;
use std::time::Duration;

use ssh2::{BlockDirections, Session};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::OwnedSemaphorePermit;

use crate::error::is_eagain;
use crate::keepalive::KeepAlive;
use crate::net;
use crate::raw_channel::Rc;

thread_local! {
    /// Bytes libssh2 received on this thread. A connection's pass is synchronous (it never awaits), so
    /// the difference across a pass is exactly what that pass's libssh2 calls took from its socket.
    static RECEIVED: Cell<u64> = const { Cell::new(0) };
}

/// Bytes libssh2 has received from any socket on the calling thread; compare two readings taken
/// within one synchronous stretch of code.
pub fn transport_received() -> u64 {
    RECEIVED.with(Cell::get)
}

const LIBSSH2_CALLBACK_RECV: c_int = 6;

type GenericCallback = unsafe extern "C" fn();

extern "C" {
    // In libssh2 (linked through libssh2-sys, which does not declare it).
    fn libssh2_session_callback_set2(
        session: *mut libssh2_sys::LIBSSH2_SESSION,
        cbtype: c_int,
        callback: Option<GenericCallback>,
    ) -> Option<GenericCallback>;
}

/// libssh2's own `recv` replacement, plus the count. Unlike libssh2's, an interrupted call is retried
/// here instead of being reported as "would block": the data it left in the socket would otherwise
/// wait for a readiness event that already fired.
unsafe extern "C" fn counting_recv(
    fd: c_int,
    buf: *mut c_void,
    len: libc::size_t,
    flags: c_int,
    _abstract: *mut *mut c_void,
) -> libc::ssize_t {
    loop {
        // SAFETY: libssh2 passes its own buffer of `len` bytes and the session's socket.
        let rc = unsafe { libc::recv(fd, buf, len, flags) };
        if rc > 0 {
            RECEIVED.with(|r| r.set(r.get() + rc as u64));
        }
        if rc >= 0 {
            return rc;
        }
        match io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) {
            libc::EINTR => continue,
            e => return -(e as libc::ssize_t),
        }
    }
}

fn count_received(sess: &Session) {
    let mut guard = sess.raw();
    let raw = &mut *guard as *mut libssh2_sys::LIBSSH2_SESSION;
    // SAFETY: the session is live and locked; the callback has libssh2's RECV signature, and libssh2
    // stores the pointer as its generic callback type.
    unsafe {
        let cb: GenericCallback = std::mem::transmute::<
            unsafe extern "C" fn(c_int, *mut c_void, libc::size_t, c_int, *mut *mut c_void) -> libc::ssize_t,
            GenericCallback,
        >(counting_recv);
        libssh2_session_callback_set2(raw, LIBSSH2_CALLBACK_RECV, Some(cb));
    }
}

/// Borrowed view of the session's socket for the reactor; the session owns and closes the fd.
struct SocketRef(RawFd);

impl AsRawFd for SocketRef {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The far side of a session's socket pair when the session runs through a ProxyJump hop: the hop's
/// channel (`jump::Relay`), which knows what the socket cannot tell.
pub trait Carrier: Send + Sync {
    /// Time since the hop last delivered bytes from the server behind it.
    fn since_last_data(&self) -> Duration;
    /// Why the hop's channel ended, once it has.
    fn closed_cause(&self) -> Option<String>;
    /// The session changed its keep-alive policy: the hop follows.
    fn set_keep_alive(&self, keep_alive: KeepAlive);
}

/// The socket a session runs over: TCP to the host, or one end of a socket pair whose other end a
/// ProxyJump hop's channel serves.
pub enum Stream {
    Tcp(std::net::TcpStream),
    Relayed(std::os::unix::net::UnixStream, Arc<dyn Carrier>),
}

pub struct SshIo {
    /// Declared before `sess` so the fd leaves the reactor before libssh2 closes it.
    afd: AsyncFd<SocketRef>,
    pub sess: Session,
    /// Set when the session runs through a hop: the hop's channel, and when it last brought data.
    pub relay: Option<Arc<dyn Carrier>>,
    /// The address a direct connection reached (none through a hop).
    pub peer: Option<std::net::IpAddr>,
    /// The server's handshake slot, held past authentication (see `hold_startup`).
    startup: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
}

impl SshIo {
    /// Takes a connected stream and hands it, non-blocking, to a fresh libssh2 session.
    pub fn new(stream: Stream) -> io::Result<Self> {
        let mut sess = Session::new().map_err(io::Error::from)?;
        let (fd, relay, peer) = match stream {
            Stream::Tcp(s) => {
                s.set_nonblocking(true)?;
                s.set_nodelay(true)?;
                let fd = s.as_raw_fd();
                let peer = s.peer_addr().ok().map(|a| a.ip());
                sess.set_tcp_stream(s);
                (fd, None, peer)
            }
            Stream::Relayed(s, relay) => {
                s.set_nonblocking(true)?;
                let fd = s.as_raw_fd();
                sess.set_tcp_stream(s);
                (fd, Some(relay), None)
            }
        };
        sess.set_blocking(false);
        count_received(&sess);
        // SAFETY: the session owns the socket and outlives `afd` (field order drops `afd` first), so
        // the fd stays open for as long as it is registered with the reactor.
        let afd = unsafe { AsyncFd::register_with_interest(SocketRef(fd), Interest::READABLE | Interest::WRITABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(SshIo { afd, sess, relay, peer, startup: Default::default() })
    }

    /// Keeps a handshake slot (session.rs) until the server has answered something after
    /// authentication. sshd counts a connection against MaxStartups until its listener reads the
    /// child's "authenticated" note, which the child sends before it serves any request but which the
    /// listener may read well after the client saw its authentication succeed (on a busy machine,
    /// tens of ms). Once a reply to a channel open is here, the note was sent first, and sshd's
    /// listener takes notes before it accepts new connections: the slot is free by sshd's count too.
    pub fn hold_startup(&self, permit: OwnedSemaphorePermit) {
        *self.startup.lock().unwrap() = Some(permit);
    }

    /// The server answered after authentication: its handshake slot is free (see `hold_startup`).
    pub fn past_startup(&self) {
        if let Ok(mut slot) = self.startup.try_lock() {
            slot.take();
        }
    }

    pub fn fd(&self) -> RawFd {
        self.afd.get_ref().0
    }

    /// How long the server has been silent: the kernel's TCP_INFO for a direct connection, the hop
    /// channel's last delivery for a relayed one (a socket pair has no TCP_INFO).
    pub fn idle(&self) -> Duration {
        match &self.relay {
            Some(r) => r.since_last_data(),
            None => net::since_last_data_received(self.fd()).unwrap_or(Duration::ZERO),
        }
    }

    /// Whether the peer closed the connection, as far as the socket tells without reading.
    pub fn closed_by_peer(&self) -> Option<String> {
        match &self.relay {
            Some(r) => r.closed_cause(),
            None => net::closed_by_peer(self.fd()),
        }
    }

    /// Waits until the socket is ready the way libssh2 last said it was blocked.
    pub async fn wait(&self, dirs: BlockDirections) -> io::Result<()> {
        match dirs {
            BlockDirections::Outbound => self.writable().await,
            BlockDirections::Both => {
                tokio::select! {
                    r = self.readable() => r,
                    r = self.writable() => r,
                }
            }
            // Inbound, or nothing recorded: only the peer can make progress.
            _ => self.readable().await,
        }
    }

    pub async fn readable(&self) -> io::Result<()> {
        let mut guard = self.afd.readable().await?;
        guard.clear_ready();
        net::set_quickack(self.fd());
        Ok(())
    }

    pub async fn writable(&self) -> io::Result<()> {
        let mut guard = self.afd.writable().await?;
        guard.clear_ready();
        Ok(())
    }

    /// Runs one libssh2 call to completion, retrying on EAGAIN when the socket is ready again.
    pub async fn retry<T>(
        &self,
        mut op: impl FnMut(&Session) -> Result<T, ssh2::Error>,
    ) -> Result<T, RetryError> {
        loop {
            match op(&self.sess) {
                Err(e) if is_eagain(&e) => {
                    self.wait(self.sess.block_directions()).await.map_err(RetryError::Io)?
                }
                Err(e) => return Err(RetryError::Ssh(e)),
                Ok(v) => return Ok(v),
            }
        }
    }

    /// Whether the last EAGAIN needs the socket writable (libssh2 holds a partly sent packet).
    pub fn wants_write(&self) -> bool {
        matches!(self.sess.block_directions(), BlockDirections::Outbound | BlockDirections::Both)
    }
}

#[derive(Debug)]
pub enum RetryError {
    Ssh(ssh2::Error),
    Io(io::Error),
}

impl std::fmt::Display for RetryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RetryError::Ssh(e) => write!(f, "{}", e.message()),
            RetryError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// What one step of a channel (a forward's, a remote command's) concluded, as the actor reads it.
pub enum Step {
    Continue,
    Finished,
    /// The whole session failed; the cause is reported once by the actor.
    Fatal(String),
}

/// The outcome of one non-blocking libssh2 call inside the connection's event loop.
pub enum Attempt<T> {
    Done(T),
    /// Would block: retry on the next wake-up (the caller's `want_write` says which one).
    Blocked,
    Failed(ssh2::Error),
}

impl<T> Attempt<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Attempt<U> {
        match self {
            Attempt::Done(v) => Attempt::Done(f(v)),
            Attempt::Blocked => Attempt::Blocked,
            Attempt::Failed(e) => Attempt::Failed(e),
        }
    }
}

impl SshIo {
    /// Classifies a libssh2 result; records when the retry must wait for a writable socket.
    pub fn attempt<T>(&self, want_write: &mut bool, r: Result<T, ssh2::Error>) -> Attempt<T> {
        match r {
            Ok(v) => Attempt::Done(v),
            Err(e) if is_eagain(&e) => {
                *want_write |= self.wants_write();
                Attempt::Blocked
            }
            Err(e) => Attempt::Failed(e),
        }
    }

    /// For libssh2 calls whose packet lives on libssh2's stack (channel EOF, keep-alive): run only when
    /// the socket can take the whole packet, so none is ever left half-sent (see `net::writable_now`).
    pub fn attempt_small<C, T>(
        &self,
        want_write: &mut bool,
        op: impl FnOnce(&mut C) -> Result<T, ssh2::Error>,
        target: &mut C,
    ) -> Attempt<T> {
        if !net::writable_now(self.fd()) {
            *want_write = true;
            return Attempt::Blocked;
        }
        self.attempt(want_write, op(target))
    }

    /// Same for the calls of `raw_channel`.
    pub fn attempt_rc<T>(&self, want_write: &mut bool, r: Rc<T>) -> Attempt<T> {
        match r {
            Rc::Done(v) => Attempt::Done(v),
            Rc::Blocked => {
                *want_write |= self.wants_write();
                Attempt::Blocked
            }
            Rc::Failed(e) => Attempt::Failed(e),
        }
    }

    /// Same for the `std::io` face of channels, recovering libssh2's error code from the session.
    pub fn attempt_io<T>(&self, want_write: &mut bool, r: io::Result<T>) -> Attempt<T> {
        match r {
            Ok(v) => Attempt::Done(v),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *want_write |= self.wants_write();
                Attempt::Blocked
            }
            Err(_) => Attempt::Failed(
                ssh2::Error::last_session_error(&self.sess)
                    .unwrap_or_else(|| ssh2::Error::new(ssh2::ErrorCode::Session(-1), "channel I/O failed")),
            ),
        }
    }
}

/// Errors after which the whole SSH connection is unusable (as opposed to one channel failing).
pub fn is_fatal(e: &ssh2::Error) -> bool {
    const FATAL: [i32; 12] = [
        -4,  // INVALID_MAC
        -5,  // KEX_FAILURE
        -7,  // SOCKET_SEND
        -8,  // KEY_EXCHANGE_FAILURE
        -9,  // TIMEOUT
        -12, // DECRYPT
        -13, // SOCKET_DISCONNECT
        -14, // PROTO
        -29, // ZLIB
        -43, // SOCKET_RECV
        -44, // ENCRYPT
        -45, // BAD_SOCKET
    ];
    matches!(e.code(), ssh2::ErrorCode::Session(c) if FATAL.contains(&c))
}
