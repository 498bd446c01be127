//! A libssh2 channel driven through libssh2's C API, for what ssh2-rs does not expose: whether a
//! command's exit-status request arrived (ssh2 reports a missing status as 0, the same as success), a
//! read that does not stop at EOF, and a look at many channels' queues under one lock (`Locked`), which
//! is what the connection actor does for every forward after libssh2 received packets.
//!
//! Every call takes ssh2's session lock, as ssh2's own calls do, so the channel and the session's
//! other users never run libssh2 concurrently. The channel is freed on drop; it holds the session, so
//! libssh2 frees the channel before the session it belongs to.

use std::os::raw::{c_char, c_int, c_uint, c_void};
use std::ptr;

use libssh2_sys as raw;
use ssh2::Session;

const CHANNEL_WINDOW_DEFAULT: c_uint = 2 * 1024 * 1024;
const CHANNEL_PACKET_DEFAULT: c_uint = 32768;
pub const EAGAIN: c_int = -37;

extern "C" {
    // In libssh2 (linked through libssh2-sys, which does not declare it).
    fn libssh2_channel_has_exit_status(channel: *mut raw::LIBSSH2_CHANNEL) -> c_int;
}

/// What a call returned: a count, "would block", or libssh2's error code and message.
pub enum Rc<T> {
    Done(T),
    Blocked,
    Failed(ssh2::Error),
}

impl Rc<usize> {
    /// For code that expects ssh2's results; "would block" becomes libssh2's EAGAIN error.
    pub fn into_result(self) -> std::result::Result<usize, ssh2::Error> {
        match self {
            Rc::Done(n) => Ok(n),
            Rc::Blocked => Err(ssh2::Error::new(ssh2::ErrorCode::Session(EAGAIN), "would block")),
            Rc::Failed(e) => Err(e),
        }
    }
}

pub struct RawChannel {
    ch: *mut raw::LIBSSH2_CHANNEL,
    sess: Session,
}

// SAFETY: the pointer is used only under ssh2's session lock (taken in every method, or proven held
// by a `Locked`) and only by the actor task that owns the session.
unsafe impl Send for RawChannel {}

/// ssh2's session lock (its guard type is not exported), held across many channel calls at once.
pub struct Locked<G>(#[allow(dead_code)] G);

pub fn lock(sess: &Session) -> Locked<impl Sized + '_> {
    Locked(sess.raw())
}

fn error(sess: &Session, code: c_int) -> ssh2::Error {
    ssh2::Error::last_session_error(sess).unwrap_or_else(|| ssh2::Error::new(ssh2::ErrorCode::Session(code), "channel call failed"))
}

/// One step of libssh2's open of a "session" channel: the channel, or null with the session's last
/// error saying why (would block, or refused). Shared with `idle_reader`, which keeps its channel
/// for the session's life instead of freeing it.
pub fn open_session(sess: &Session) -> *mut raw::LIBSSH2_CHANNEL {
    let kind = b"session";
    let mut guard = sess.raw();
    let raw_sess = &mut *guard as *mut raw::LIBSSH2_SESSION;
    // SAFETY: the session is live and locked for the call; libssh2 copies the type string.
    unsafe {
        raw::libssh2_channel_open_ex(
            raw_sess,
            kind.as_ptr() as *const c_char,
            kind.len() as c_uint,
            CHANNEL_WINDOW_DEFAULT,
            CHANNEL_PACKET_DEFAULT,
            ptr::null(),
            0,
        )
    }
}

impl RawChannel {
    /// One step of opening a "session" channel; Blocked until the server answers.
    pub fn open_session(sess: &Session) -> Rc<RawChannel> {
        Self::opened(sess, open_session(sess))
    }

    /// One step of opening a "direct-tcpip" channel to host:port; Blocked until the server answers.
    /// libssh2 keeps the open's progress in the session, so the same open is repeated until it ends.
    pub fn open_direct_tcpip(sess: &Session, host: &str, port: u16) -> Rc<RawChannel> {
        let Ok(host) = std::ffi::CString::new(host) else {
            return Rc::Failed(ssh2::Error::new(ssh2::ErrorCode::Session(-34), "host name contains a NUL byte"));
        };
        let origin = c"127.0.0.1";
        let ch = {
            let mut guard = sess.raw();
            let raw_sess = &mut *guard as *mut raw::LIBSSH2_SESSION;
            // SAFETY: the session is live and locked for the call; libssh2 copies both strings.
            unsafe { raw::libssh2_channel_direct_tcpip_ex(raw_sess, host.as_ptr(), c_int::from(port), origin.as_ptr(), 22) }
        };
        Self::opened(sess, ch)
    }

    /// Takes a channel the server opened to a remote forward's listener (see `remote_listen`); Blocked
    /// when none is waiting. The listener belongs to `sess`, which frees it with the session.
    ///
    /// # Safety
    /// `listener` must have been returned by libssh2 for `sess`, which must still hold it.
    pub unsafe fn accept_forwarded(sess: &Session, listener: *mut raw::LIBSSH2_LISTENER) -> Rc<RawChannel> {
        let ch = {
            let _lock = sess.raw();
            // SAFETY: the caller's promise; the session is locked for the call.
            unsafe { raw::libssh2_channel_forward_accept(listener) }
        };
        Self::opened(sess, ch)
    }

    fn opened(sess: &Session, ch: *mut raw::LIBSSH2_CHANNEL) -> Rc<RawChannel> {
        if !ch.is_null() {
            return Rc::Done(RawChannel { ch, sess: sess.clone() });
        }
        let e = error(sess, EAGAIN);
        if e.code() == ssh2::ErrorCode::Session(EAGAIN) {
            Rc::Blocked
        } else {
            Rc::Failed(e)
        }
    }

    /// Writes to the channel's stdin (stream 0); a short count means the peer's window is full.
    pub fn write(&mut self, buf: &[u8]) -> Rc<usize> {
        let _lock = self.sess.raw();
        // SAFETY: live channel under the session lock; `buf` is valid for its length.
        let rc = unsafe { raw::libssh2_channel_write_ex(self.ch, 0, buf.as_ptr() as *const c_char, buf.len()) };
        drop(_lock);
        self.rc(rc as isize)
    }

    /// The receive window libssh2 has left for the peer, and the window it started with.
    pub fn window(&self) -> (u64, u64) {
        let _lock = self.sess.raw();
        let mut initial: std::os::raw::c_ulong = 0;
        // SAFETY: live channel under the session lock; the queued-bytes pointer may be null.
        let remaining = unsafe { raw::libssh2_channel_window_read_ex(self.ch, ptr::null_mut(), &mut initial) };
        (remaining as u64, initial as u64)
    }

    /// Whether libssh2 holds bytes or the peer's EOF for this channel that no read took yet.
    pub fn has_inbound(&self) -> bool {
        self.has_inbound_under(&lock(&self.sess))
    }

    /// The same, for a caller that holds the session lock across many channels.
    pub fn has_inbound_under<G>(&self, _held: &Locked<G>) -> bool {
        let mut avail: std::os::raw::c_ulong = 0;
        // SAFETY: live channel; the session lock is held (`_held`); the initial-window pointer may be null.
        unsafe {
            raw::libssh2_channel_window_read_ex(self.ch, &mut avail, ptr::null_mut());
            avail > 0 || raw::libssh2_channel_eof(self.ch) != 0
        }
    }

    fn rc(&self, rc: isize) -> Rc<usize> {
        match rc {
            n if n >= 0 => Rc::Done(n as usize),
            n if n as c_int == EAGAIN => Rc::Blocked,
            n => Rc::Failed(error(&self.sess, n as c_int)),
        }
    }

    /// One step of the `exec` request (libssh2 keeps its progress between calls).
    pub fn exec(&mut self, command: &str) -> Rc<usize> {
        let _lock = self.sess.raw();
        let req = b"exec";
        // SAFETY: live channel under the session lock; libssh2 copies both strings.
        let rc = unsafe {
            raw::libssh2_channel_process_startup(
                self.ch,
                req.as_ptr() as *const c_char,
                req.len() as c_uint,
                command.as_ptr() as *const c_char,
                command.len() as c_uint,
            )
        };
        drop(_lock);
        self.rc(rc as isize)
    }

    pub fn send_eof(&mut self) -> Rc<usize> {
        let _lock = self.sess.raw();
        // SAFETY: live channel under the session lock.
        let rc = unsafe { raw::libssh2_channel_send_eof(self.ch) };
        drop(_lock);
        self.rc(rc as isize)
    }

    /// Reads stream 0 (stdout) or 1 (stderr); Done(0) means that stream ended. Unlike ssh2-rs it
    /// always calls into libssh2, so a zero-length read processes every packet the socket holds.
    pub fn read(&mut self, stream: c_int, buf: &mut [u8]) -> Rc<usize> {
        let _lock = self.sess.raw();
        // SAFETY: live channel under the session lock; `buf` is valid for its length.
        let rc = unsafe { raw::libssh2_channel_read_ex(self.ch, stream, buf.as_mut_ptr() as *mut c_char, buf.len()) };
        drop(_lock);
        self.rc(rc as isize)
    }

    /// Bytes libssh2 holds for this channel, all streams.
    pub fn queued(&self) -> u64 {
        let _lock = self.sess.raw();
        let mut avail: std::os::raw::c_ulong = 0;
        // SAFETY: live channel under the session lock; the initial-window pointer may be null.
        unsafe { raw::libssh2_channel_window_read_ex(self.ch, &mut avail, ptr::null_mut()) };
        avail as u64
    }

    /// The command's exit: Some(status) once the exit-status request arrived, Some(None) once the
    /// command was ended by a signal (reported with no status), None while neither came.
    pub fn exit(&self) -> Option<Option<i32>> {
        let guard = self.sess.raw();
        // SAFETY: live channel under the session lock.
        if unsafe { libssh2_channel_has_exit_status(self.ch) } == 1 {
            return Some(Some(unsafe { raw::libssh2_channel_get_exit_status(self.ch) }));
        }
        let raw_sess = &*guard as *const raw::LIBSSH2_SESSION as *mut raw::LIBSSH2_SESSION;
        let mut name: *mut c_char = ptr::null_mut();
        let mut len: libc::size_t = 0;
        // SAFETY: live channel under the session lock; libssh2 allocates the name with the session's
        // allocator, which libssh2_free releases.
        unsafe {
            raw::libssh2_channel_get_exit_signal(
                self.ch,
                &mut name,
                &mut len,
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::null_mut(),
            );
            if !name.is_null() {
                raw::libssh2_free(raw_sess, name as *mut c_void);
                return Some(None);
            }
        }
        None
    }

    /// Sends our close; after that the channel may be dropped (libssh2 discards what still comes).
    pub fn close(&mut self) -> Rc<usize> {
        let _lock = self.sess.raw();
        // SAFETY: live channel under the session lock.
        let rc = unsafe { raw::libssh2_channel_close(self.ch) };
        drop(_lock);
        self.rc(rc as isize)
    }
}

impl Drop for RawChannel {
    fn drop(&mut self) {
        let _lock = self.sess.raw();
        // SAFETY: the channel was returned by libssh2 for this session, which `self.sess` keeps alive,
        // and is freed exactly once here.
        unsafe { raw::libssh2_channel_free(self.ch) };
    }
}
