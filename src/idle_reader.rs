//! Reading the SSH transport of a connection that has no channel of its own to read through.
//!
//! libssh2 processes incoming packets (among them a server's `keepalive@openssh.com` probes, which it
//! answers) only inside calls that take a channel; it has no public "read whatever arrived" call on a
//! bare session. A connection with no open channel (a per-port CONTROL forward nobody uses, an idle
//! shared connection) would leave such probes in the socket, and a server with ClientAliveInterval
//! would cut it after ClientAliveCountMax probes.
//!
//! The smallest sound route: open one session channel, close it at once (sshd frees its MaxSessions
//! slot as soon as it sees the close, and starts nothing for a channel that never ran a command), and
//! keep libssh2's channel structure unfreed. A zero-length `libssh2_channel_read_ex` on it runs
//! libssh2's transport read loop until the socket is empty, then returns 0 (the channel is closed),
//! moving no data and sending nothing itself. ssh2-rs would skip that read for a channel at EOF, and
//! some servers send EOF before their close, so the three calls go to libssh2 directly.

use std::os::raw::{c_char, c_int};

use ssh2::Session;

use libssh2_sys as raw;

const EAGAIN: c_int = -37;

/// What one step concluded.
pub enum ReaderStep {
    /// Still opening or closing: call again when the socket is ready.
    Pending,
    /// Closed and usable for reading.
    Ready,
    /// The server refused the channel (e.g. MaxSessions 0): live without it.
    Refused(String),
    /// The session failed.
    Fatal(String),
}

enum State {
    Opening,
    Closing(*mut raw::LIBSSH2_CHANNEL),
    Ready(*mut raw::LIBSSH2_CHANNEL),
    Unavailable,
}

/// The closed channel used to pump the transport. libssh2 frees it with its session
/// (`libssh2_session_free` frees every channel still listed), so it needs no destructor of its own.
pub struct IdleReader {
    state: State,
}

// SAFETY: the raw channel is only touched from the connection actor's task, which owns the session
// (and holds ssh2's session lock around every call below); the pointer is never shared.
unsafe impl Send for IdleReader {}

impl IdleReader {
    pub fn new() -> Self {
        IdleReader { state: State::Opening }
    }

    /// Whether the channel may hold one of the server's session slots right now (opening, or not
    /// yet acknowledged as closed).
    pub fn holds_session(&self) -> bool {
        matches!(self.state, State::Opening | State::Closing(_))
    }

    pub fn is_opening(&self) -> bool {
        matches!(self.state, State::Opening)
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready(_))
    }

    /// Advances opening and closing; libssh2 runs one channel open per session at a time, so the
    /// caller starts no other open while this returns Pending from the opening state.
    pub fn step(&mut self, sess: &Session, fatal: impl Fn(c_int) -> bool) -> ReaderStep {
        loop {
            match self.state {
                State::Opening => {
                    let ch = crate::raw_channel::open_session(sess);
                    if ch.is_null() {
                        let (code, msg) = last_error(sess);
                        if code == EAGAIN {
                            return ReaderStep::Pending;
                        }
                        self.state = State::Unavailable;
                        return if fatal(code) { ReaderStep::Fatal(msg) } else { ReaderStep::Refused(msg) };
                    }
                    self.state = State::Closing(ch);
                }
                State::Closing(ch) => {
                    let _lock = sess.raw();
                    // SAFETY: `ch` was returned by libssh2 for this session and is not freed yet.
                    let rc = unsafe { raw::libssh2_channel_close(ch) };
                    drop(_lock);
                    if rc == EAGAIN {
                        return ReaderStep::Pending;
                    }
                    if rc < 0 && fatal(rc) {
                        return ReaderStep::Fatal(last_error(sess).1);
                    }
                    self.state = State::Ready(ch);
                }
                State::Ready(_) => return ReaderStep::Ready,
                State::Unavailable => return ReaderStep::Refused("no idle reader".into()),
            }
        }
    }

    /// Lets libssh2 process every packet waiting in the socket. Err(cause) when the session failed.
    pub fn read(&mut self, sess: &Session, fatal: impl Fn(c_int) -> bool) -> Result<(), String> {
        let State::Ready(ch) = self.state else { return Ok(()) };
        let rc = {
            let _lock = sess.raw();
            let mut empty = [0u8; 0];
            // SAFETY: as above; a zero-length buffer is valid and nothing is written to it.
            unsafe { raw::libssh2_channel_read_ex(ch, 0, empty.as_mut_ptr() as *mut c_char, 0) }
        };
        if rc < 0 && rc as c_int != EAGAIN && fatal(rc as c_int) {
            return Err(last_error(sess).1);
        }
        Ok(())
    }
}

impl Default for IdleReader {
    fn default() -> Self {
        Self::new()
    }
}

fn last_error(sess: &Session) -> (c_int, String) {
    match ssh2::Error::last_session_error(sess) {
        Some(e) => match e.code() {
            ssh2::ErrorCode::Session(c) => (c, e.message().to_string()),
            ssh2::ErrorCode::SFTP(c) => (c, e.message().to_string()),
        },
        None => (0, "unknown error".into()),
    }
}
