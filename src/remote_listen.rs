//! Remote forwarding back to the gateway: a listener on the kernel host's loopback ("tcpip-forward")
//! whose connections the connection actor carries to one local address, the gateway's response port.
//! A kernel launcher on a host with no route to the gateway sends its connection info there.
//!
//! The listener is asked for once per session, before anything else goes out on it, and keep-alive
//! probes wait while the request is pending. libssh2 takes the first queued reply of either kind
//! (REQUEST_SUCCESS or REQUEST_FAILURE) as the answer to a global request, and OpenSSH answers every
//! keep-alive probe (itself a global request) with REQUEST_FAILURE, which libssh2 queues and never
//! takes: a listen request sent after a probe would read the probe's reply as a refusal.

use std::os::raw::{c_char, c_int};

use tokio::time::Instant;

use libssh2_sys as raw;
use ssh2::Session;

use crate::driver::{is_fatal, Attempt, SshIo};
use crate::raw_channel::{RawChannel, EAGAIN};

/// The address the listener binds on the host: its loopback, so only processes there can connect.
pub const LOOPBACK: &str = "127.0.0.1";
/// Connections the server may have opened to the listener before the actor takes them.
const QUEUE_MAX: c_int = 16;
/// libssh2's "no such channel": what accepting reports when nothing waits and the socket was empty.
const CHANNEL_UNKNOWN: c_int = -23;

/// A connection's remote listener as its handles see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listening {
    /// Being asked for, or the connection is (re)connecting.
    Pending,
    /// Listening on the host's 127.0.0.1 at this port.
    Port(u16),
    /// The server refused: the cause, in the server's words where it gave any.
    Refused(String),
}

/// What a step of the listener did.
pub enum ListenStep {
    /// Nothing to do until the socket moves.
    Idle,
    /// The server answered the request.
    Answered(Listening),
    /// A connection to the listener, ready to be carried.
    Accepted(RawChannel),
    Fatal(String),
}

enum State {
    /// To ask for the port (0: any) on the next step; the request goes out in pieces if the socket is
    /// full. `since`: when the first piece went out (None before).
    Asking { port: u16, since: Option<Instant> },
    Up { listener: *mut raw::LIBSSH2_LISTENER, port: u16 },
    Refused,
}

/// One session's listener. The libssh2 listener belongs to the session, which frees it (and tells
/// the server) when the session goes.
pub struct RemoteListener {
    state: State,
}

// SAFETY: the listener pointer is used only by the actor task that owns the session, under ssh2's
// session lock.
unsafe impl Send for RemoteListener {}

impl RemoteListener {
    /// A listener to ask for on a new session: on the port a previous session had, so launchers told
    /// that port before a reconnect still reach the gateway, or any port.
    pub fn new(previous_port: u16) -> Self {
        RemoteListener { state: State::Asking { port: previous_port, since: None } }
    }

    /// Since when a request has been out without a reply: keep-alive probes must wait meanwhile (see
    /// the module comment).
    pub fn pending_since(&self) -> Option<Instant> {
        match self.state {
            State::Asking { since, .. } => since,
            _ => None,
        }
    }

    pub fn port(&self) -> Option<u16> {
        match self.state {
            State::Up { port, .. } => Some(port),
            _ => None,
        }
    }

    /// Continues the request, or takes one connection the server opened to the listener.
    pub fn step(&mut self, io: &SshIo, want_write: &mut bool) -> ListenStep {
        match self.state {
            State::Asking { port, since } => self.ask(io, want_write, port, since),
            // SAFETY: the listener came from this session, which frees listeners only when it goes.
            State::Up { listener, .. } => match io.attempt_rc(want_write, unsafe { RawChannel::accept_forwarded(&io.sess, listener) }) {
                Attempt::Done(ch) => ListenStep::Accepted(ch),
                Attempt::Blocked => ListenStep::Idle,
                Attempt::Failed(e) if is_fatal(&e) => ListenStep::Fatal(format!("remote forward: {}", e.message())),
                Attempt::Failed(_) => ListenStep::Idle,
            },
            State::Refused => ListenStep::Idle,
        }
    }

    fn ask(&mut self, io: &SshIo, want_write: &mut bool, port: u16, since: Option<Instant>) -> ListenStep {
        self.state = State::Asking { port, since: Some(since.unwrap_or_else(Instant::now)) };
        let mut bound: c_int = 0;
        let listener = {
            let mut guard = io.sess.raw();
            let raw_sess = &mut *guard as *mut raw::LIBSSH2_SESSION;
            let host = c"127.0.0.1";
            // SAFETY: the session is live and locked; libssh2 copies the host string. It keeps the
            // request's progress in the session, so the same call is repeated until it answers.
            unsafe { raw::libssh2_channel_forward_listen_ex(raw_sess, host.as_ptr() as *const c_char, c_int::from(port), &mut bound, QUEUE_MAX) }
        };
        if !listener.is_null() {
            let port = u16::try_from(bound).ok().filter(|p| *p > 0).unwrap_or(port);
            self.state = State::Up { listener, port };
            return ListenStep::Answered(Listening::Port(port));
        }
        let e = last_error(&io.sess);
        match e.code() {
            ssh2::ErrorCode::Session(EAGAIN) => {
                *want_write |= io.wants_write();
                ListenStep::Idle
            }
            _ if is_fatal(&e) => ListenStep::Fatal(format!("remote forward request: {}", e.message())),
            // The port a previous session held may still be taken on the host: any port will do.
            _ if port != 0 => {
                self.ask(io, want_write, 0, None)
            }
            _ => {
                self.state = State::Refused;
                ListenStep::Answered(Listening::Refused(format!(
                    "the server refused remote forwarding (tcpip-forward on {LOOPBACK}): {}",
                    e.message()
                )))
            }
        }
    }
}

fn last_error(sess: &Session) -> ssh2::Error {
    ssh2::Error::last_session_error(sess).unwrap_or_else(|| ssh2::Error::new(ssh2::ErrorCode::Session(CHANNEL_UNKNOWN), "no answer"))
}
