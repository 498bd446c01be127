//! Remote command execution over a pooled SSH connection, replacing a fresh SSH login per call.
//!
//! Contract of Enterprise Gateway's `rsh`: the caller gets stdout lines, or stderr lines when stdout
//! is empty, plus (here) the exit status. The command's stdin is closed at once, so commands that
//! would read it cannot hang the gateway.

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::driver::{is_fatal, Attempt, SshIo, Step};
use crate::error::{Error, Result};
use crate::metrics::OpenChannel;
use crate::raw_channel::{Rc, RawChannel};

/// Everything a finished command produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_status: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// EG's `rsh` contract: stdout lines, or stderr lines when stdout is empty.
    pub fn lines(&self) -> Vec<String> {
        let src = if self.stdout.iter().any(|b| !b.is_ascii_whitespace()) { &self.stdout } else { &self.stderr };
        String::from_utf8_lossy(src).lines().map(str::to_string).collect()
    }
}

/// The SSH half of one remote command, stepped by the connection actor. Messages never quote the
/// command: it carries the kernel's environment, which may hold secrets.
pub struct ExecChannel {
    ch: RawChannel,
    command: String,
    reply: Option<oneshot::Sender<Result<ExecOutput>>>,
    deadline: Instant,
    created: Instant,
    dest: String,
    /// The `exec` request was handed to libssh2 (it may be only partly sent, or awaiting its reply).
    requested: bool,
    started: bool,
    stdin_closed: bool,
    out: Vec<u8>,
    err: Vec<u8>,
    out_eof: bool,
    err_eof: bool,
    /// Counts this channel as open in the destination's metrics until it is dropped.
    _open: OpenChannel,
}

impl ExecChannel {
    pub fn new(
        ch: RawChannel,
        command: String,
        reply: oneshot::Sender<Result<ExecOutput>>,
        deadline: Instant,
        dest: String,
        open: OpenChannel,
    ) -> Self {
        ExecChannel {
            ch,
            command,
            reply: Some(reply),
            deadline,
            created: Instant::now(),
            dest,
            requested: false,
            started: false,
            stdin_closed: false,
            out: Vec::new(),
            err: Vec::new(),
            out_eof: false,
            err_eof: false,
            _open: open,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether libssh2 holds something this channel has not acted on (see the connection's
    /// `settled` check): queued output, or an exit that was not yet answered.
    pub fn has_unread(&self) -> bool {
        self.reply.is_some() && self.started && (self.ch.queued() > 0 || (self.out_eof && self.err_eof && self.ch.exit().is_some()))
    }

    /// What the settle check reports of a command it found holding unread packets.
    pub fn settle_report(&self) -> String {
        format!("command started={} requested={} oeof={} eeof={} queued={} exit={:?} stdin_closed={}",
            self.started, self.requested, self.out_eof, self.err_eof, self.ch.queued(), self.ch.exit(), self.stdin_closed)
    }

    /// The `exec` request went out and its reply has not been read yet.
    pub fn awaiting_reply(&self) -> bool {
        self.requested && !self.started
    }

    /// One step. `may_request` is false while another command's `exec` request awaits its reply:
    /// libssh2 takes a channel-request reply for any channel as the reply it waits for and, finding it
    /// is another channel's, fails its own request ("Failed waiting for channel success") although the
    /// server runs the command. So requests go out one at a time per connection.
    pub fn step(&mut self, io: &SshIo, want_write: &mut bool, scratch: &mut [u8], may_request: bool) -> Step {
        if self.reply.as_ref().is_none_or(|r| r.is_closed()) {
            return self.close(io, want_write);
        }
        if Instant::now() >= self.deadline {
            let secs = self.deadline.duration_since(self.created).as_secs_f64().round();
            self.answer(Err(Error::Timeout { dest: self.dest.clone(), what: "remote command".into(), secs }));
            return self.close(io, want_write);
        }
        if !self.started {
            if !self.requested && !may_request {
                return Step::Continue;
            }
            self.requested = true;
            match self.ch.exec(&self.command) {
                Rc::Done(_) => self.started = true,
                Rc::Blocked => return self.blocked(io, want_write),
                Rc::Failed(e) => return self.fail(io, want_write, e),
            }
        }
        if !self.stdin_closed {
            match io.attempt_small(want_write, |ch: &mut RawChannel| ch.send_eof().into_result(), &mut self.ch) {
                Attempt::Done(_) => self.stdin_closed = true,
                Attempt::Blocked => return Step::Continue,
                Attempt::Failed(e) => return self.fail(io, want_write, e),
            }
        }
        for stream_id in [0, 1] {
            loop {
                let (eof, buf) = if stream_id == 0 { (&mut self.out_eof, &mut self.out) } else { (&mut self.err_eof, &mut self.err) };
                if *eof {
                    break;
                }
                match self.ch.read(stream_id, scratch) {
                    // libssh2 returns 0 once the server's EOF (or close) arrived and nothing of this
                    // stream is left queued.
                    Rc::Done(0) => *eof = true,
                    Rc::Done(n) => buf.extend_from_slice(&scratch[..n]),
                    Rc::Blocked => {
                        *want_write |= io.wants_write();
                        break;
                    }
                    Rc::Failed(e) => return self.fail(io, want_write, e),
                }
            }
        }
        if self.out_eof && self.err_eof {
            // sshd may send the streams' EOF before the exit-status request (the pipe drains before
            // the child is reaped), and always sends the status (or the signal that ended the command)
            // before its close. Answer as soon as it is here; closing needs no answer from the server.
            if let Some(exit_status) = self.ch.exit() {
                let out = ExecOutput { exit_status, stdout: std::mem::take(&mut self.out), stderr: std::mem::take(&mut self.err) };
                self.answer(Ok(out));
                return self.close(io, want_write);
            }
        }
        Step::Continue
    }

    fn blocked(&self, io: &SshIo, want_write: &mut bool) -> Step {
        *want_write |= io.wants_write();
        Step::Continue
    }

    fn answer(&mut self, r: Result<ExecOutput>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(r);
        }
    }

    fn fail(&mut self, io: &SshIo, want_write: &mut bool, e: ssh2::Error) -> Step {
        if is_fatal(&e) {
            self.answer(Err(Error::Down { dest: self.dest.clone(), cause: e.message().to_string() }));
            return Step::Fatal(e.message().to_string());
        }
        let cause = format!("remote command failed: {} (libssh2 error {:?})", e.message(), e.code());
        self.answer(Err(Error::Other { dest: self.dest.clone(), cause }));
        self.close(io, want_write)
    }

    /// Sends our EOF (if not yet) and our close. The caller has its answer already (or is gone).
    fn close(&mut self, io: &SshIo, want_write: &mut bool) -> Step {
        // libssh2's close sends a missing EOF from a stack buffer; send it ourselves, safely, first.
        if !self.stdin_closed {
            match io.attempt_small(want_write, |ch: &mut RawChannel| ch.send_eof().into_result(), &mut self.ch) {
                Attempt::Blocked => return Step::Continue,
                _ => self.stdin_closed = true,
            }
        }
        // Done once the server's close arrived (or libssh2 processed any packet meanwhile); only then
        // can libssh2 free the channel, so until then it stays here and keeps its session slot.
        match self.ch.close() {
            Rc::Blocked => self.blocked(io, want_write),
            Rc::Failed(e) if is_fatal(&e) => Step::Fatal(e.message().to_string()),
            _ => Step::Finished,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_prefer_stdout_then_stderr() {
        let o = ExecOutput { exit_status: Some(0), stdout: b"123\n".to_vec(), stderr: b"warn\n".to_vec() };
        assert_eq!(o.lines(), vec!["123"]);
        let o = ExecOutput { exit_status: Some(1), stdout: b"\n".to_vec(), stderr: b"kill: (42) - No such process\n".to_vec() };
        assert_eq!(o.lines(), vec!["kill: (42) - No such process"]);
    }
}
