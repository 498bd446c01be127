//! The one error type of the Rust core. Bindings map each variant to a Python exception exactly once.
//!
//! Every message names the SSH destination (user@host:port) and the cause; secrets never appear here
//! because no variant carries a password, passphrase or key.

use std::fmt;

#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// Bad argument from the caller; the message says what to fix.
    Invalid(String),
    /// The local port could not be bound (taken, or not permitted).
    Bind { port: u16, cause: String, in_use: bool },
    /// TCP connect or SSH handshake failed or timed out.
    Connect { dest: String, cause: String },
    /// Every authentication method was refused.
    Auth { dest: String, cause: String },
    /// The host key is unknown (strict) or differs from known_hosts.
    HostKey { dest: String, cause: String },
    /// The remote end refused the forwarded connection (nothing listens on the target).
    Refused { dest: String, target: String, cause: String },
    /// The server's configuration forbids forwarding to the target (AllowTcpForwarding, PermitOpen,
    /// DisableForwarding): retrying cannot help.
    Prohibited { dest: String, target: String, cause: String },
    /// The SSH connection is down and being re-established.
    Down { dest: String, cause: String },
    /// An operation did not finish in time.
    Timeout { dest: String, what: String, secs: f64 },
    /// Anything else on an established connection (protocol error, channel failure, local I/O).
    Other { dest: String, cause: String },
    /// The OpenSSH client configuration cannot be used; `line` 0 when no single line is to blame.
    Config { file: String, line: usize, cause: String },
    /// Some of a kernel's forwards failed: `primary` (the most telling failure, whose kind this error
    /// takes) and every channel that failed.
    Channels { channels: Vec<String>, primary: Box<Error> },
}

pub type Result<T> = std::result::Result<T, Error>;

/// The `target` of a `Prohibited` error about the remote forward that carries connection info back.
pub const REMOTE_FORWARD: &str = "a remote forward on the host's 127.0.0.1 back to the gateway";

impl Error {
    /// A short tag used in status reports and tests.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid",
            Error::Bind { .. } => "bind",
            Error::Connect { .. } => "connect",
            Error::Auth { .. } => "auth",
            Error::HostKey { .. } => "host-key",
            Error::Refused { .. } => "refused",
            Error::Prohibited { .. } => "prohibited",
            Error::Down { .. } => "down",
            Error::Timeout { .. } => "timeout",
            Error::Other { .. } => "other",
            Error::Config { .. } => "config",
            Error::Channels { primary, .. } => primary.kind(),
        }
    }

    /// Errors that retrying cannot cure: a reconnect loop stops on them.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Channels { primary, .. } => primary.is_permanent(),
            e => matches!(e, Error::Auth { .. } | Error::HostKey { .. } | Error::Invalid(_) | Error::Config { .. }),
        }
    }

    /// One error for several failed channels; an authentication or host-key refusal explains the
    /// others (they fail for the same reason), so it is the primary one.
    pub fn channels(mut failures: Vec<(crate::keepalive::Channel, Error)>) -> Error {
        failures.sort_by_key(|(_, e)| !matches!(e, Error::Auth { .. } | Error::HostKey { .. }));
        let channels = failures.iter().map(|(c, _)| c.as_str().to_string()).collect();
        let primary = failures.into_iter().next().map(|(_, e)| e).unwrap_or(Error::Invalid("no failure".into()));
        Error::Channels { channels, primary: Box::new(primary) }
    }

    /// The error that decides the exception class: itself, or the primary one of a channel set.
    pub fn primary(&self) -> &Error {
        match self {
            Error::Channels { primary, .. } => primary.primary(),
            e => e,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid(msg) => f.write_str(msg),
            Error::Bind { port, cause, .. } => write!(f, "cannot listen on 127.0.0.1:{port}: {cause}"),
            Error::Connect { dest, cause } => write!(f, "cannot connect to {dest}: {cause}"),
            Error::Auth { dest, cause } => write!(f, "authentication to {dest} failed: {cause}"),
            Error::HostKey { dest, cause } => write!(f, "host key check for {dest} failed: {cause}"),
            Error::Refused { dest, target, cause } => {
                write!(f, "{target} refused the connection through {dest}: {cause}")
            }
            Error::Prohibited { dest, target, cause } if target == REMOTE_FORWARD => write!(
                f,
                "the SSH server {dest} refuses {target} ({cause}): its sshd_config forbids it (AllowTcpForwarding \
                 local or no, DisableForwarding or PermitListen); allow remote forwarding on the host's loopback, \
                 or send the connection info directly (response: direct)"
            ),
            Error::Prohibited { dest, target, cause } => write!(
                f,
                "the SSH server {dest} refuses to forward to {target} ({cause}): its sshd_config forbids it \
                 (AllowTcpForwarding, DisableForwarding or PermitOpen); allow TCP forwarding to the kernel's ports"
            ),
            Error::Down { dest, cause } => write!(f, "SSH connection {dest} is down: {cause}"),
            Error::Timeout { dest, what, secs } => write!(f, "{what} on {dest} timed out after {secs} s"),
            Error::Other { dest, cause } => write!(f, "{dest}: {cause}"),
            Error::Config { file, line: 0, cause } => {
                write!(f, "{file}: {cause} (fix the file, or set EG_SSH_CONFIG=none to read no ssh_config)")
            }
            Error::Config { file, line, cause } => {
                write!(f, "{file}:{line}: {cause} (fix that line, or set EG_SSH_CONFIG=none to read no ssh_config)")
            }
            Error::Channels { channels, primary } => write!(f, "forwards {} failed: {primary}", channels.join(", ")),
        }
    }
}

impl std::error::Error for Error {}

/// libssh2 says "try again" through this code; everything that drives a session checks for it.
pub fn is_eagain(e: &ssh2::Error) -> bool {
    e.code() == ssh2::ErrorCode::Session(libssh2_sys_eagain())
}

const fn libssh2_sys_eagain() -> i32 {
    -37 // LIBSSH2_ERROR_EAGAIN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_destination_and_cause() {
        let e = Error::Auth { dest: "alice@h:2222".into(), cause: "publickey refused".into() };
        assert_eq!(e.to_string(), "authentication to alice@h:2222 failed: publickey refused");
        assert!(e.is_permanent());
        let e = Error::Refused { dest: "a@h:22".into(), target: "10.0.0.2:5555".into(), cause: "connect failed".into() };
        assert!(e.to_string().contains("10.0.0.2:5555") && e.to_string().contains("a@h:22"));
        assert!(!e.is_permanent());
    }

    #[test]
    fn channel_sets_put_authentication_first_and_name_every_channel() {
        use crate::keepalive::Channel;
        let refused = Error::Refused { dest: "a@h:22".into(), target: "h:1".into(), cause: "x".into() };
        let auth = Error::Auth { dest: "a@h:22".into(), cause: "publickey refused".into() };
        let e = Error::channels(vec![(Channel::Shell, refused), (Channel::Iopub, auth.clone())]);
        assert_eq!(e.primary(), &auth);
        assert_eq!(e.kind(), "auth");
        assert!(e.is_permanent());
        let text = e.to_string();
        assert!(text.starts_with("forwards IOPUB, SHELL failed: authentication to a@h:22"), "{text}");
    }

    #[test]
    fn eagain_is_recognised() {
        let e = ssh2::Error::new(ssh2::ErrorCode::Session(-37), "would block");
        assert!(is_eagain(&e));
        let e = ssh2::Error::new(ssh2::ErrorCode::Session(-18), "auth");
        assert!(!is_eagain(&e));
    }
}
