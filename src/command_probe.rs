//! Liveness polls by remote command: Enterprise Gateway's `kill -0 PID; echo $?` on the kernel's host,
//! for kernels without a communication port to ask (tunneling off, a launcher without one).
//!
//! The rule is `requests::probe`'s: a poll on the gateway's event loop answers from the kernel's last
//! known liveness at once and, unless one is already out, starts the command on the runtime; its answer
//! is what the next poll reads. Callers that can wait (`probe_wait`) run the command and get its answer.

use std::sync::Arc;
use std::time::Duration;

use log::warn;

use crate::config::ConnectSpec;
use crate::error::{Error, Result};
use crate::exec::ExecOutput;
use crate::liveness::{Liveness, State};
use crate::metrics::{counted, Operation};
use crate::pool;
use crate::runtime;

/// What a poll command's outcome says: its last line "0" (`kill` found the process) is alive, any
/// other output dead. SSH refusing us (authentication, host key) counts as dead, as Enterprise Gateway
/// counts every failed poll; a host that cannot be reached (connection down, timeout) says nothing
/// about the kernel: unknown.
pub fn state_of(outcome: &Result<ExecOutput>) -> State {
    match outcome {
        Ok(out) if out.lines().last().map(|l| l.trim()) == Some("0") => State::Alive,
        Ok(_) => State::Dead,
        Err(e) => match e.primary() {
            Error::Auth { .. } | Error::HostKey { .. } | Error::Invalid(_) | Error::Refused { .. } | Error::Bind { .. } => State::Dead,
            _ => State::Unknown,
        },
    }
}

/// Returns `live`'s last known state and, unless a probe is already out, runs `command` on `spec`'s
/// pooled connection in the background, recording its answer for the next call. `what` names the
/// poll in log lines. Never waits.
pub fn probe(live: &Arc<Liveness>, what: &Arc<str>, spec: &ConnectSpec, command: &str, timeout: Duration) -> State {
    let state = live.get();
    if !live.start_probe() {
        return state;
    }
    let (live, what, spec, command) = (live.clone(), what.clone(), spec.clone(), command.to_string());
    runtime::spawn(async move {
        let outcome = counted(&spec, Operation::Command, pool::exec(&spec, &command, timeout)).await;
        answer(&live, &what, &outcome);
        live.probe_done();
    });
    state
}

/// `probe` for a caller that can wait: runs `command`, records its answer and returns the state that
/// results (a kernel known dead stays dead when the host cannot be reached).
pub async fn probe_wait(live: &Liveness, what: &str, spec: &ConnectSpec, command: &str, timeout: Duration) -> State {
    let outcome = counted(spec, Operation::Command, pool::exec(spec, command, timeout)).await;
    answer(live, what, &outcome);
    live.get()
}

fn answer(live: &Liveness, what: &str, outcome: &Result<ExecOutput>) {
    let new = state_of(outcome);
    match outcome {
        Err(e) if new == State::Unknown => live.no_answer(&what, e),
        Err(e) => {
            warn!("{what} failed with exception 'remote command: {e}'.");
            live.answered();
        }
        Ok(_) => live.answered(),
    }
    live.record(new);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(stdout: &str, stderr: &str) -> Result<ExecOutput> {
        Ok(ExecOutput { exit_status: Some(0), stdout: stdout.into(), stderr: stderr.into() })
    }

    #[test]
    fn the_last_line_zero_is_alive_anything_else_dead() {
        assert_eq!(state_of(&out("0\n", "")), State::Alive);
        assert_eq!(state_of(&out("noise\n 0 \n", "")), State::Alive);
        assert_eq!(state_of(&out("1\n", "")), State::Dead);
        assert_eq!(state_of(&out("0\n1\n", "")), State::Dead);
        assert_eq!(state_of(&out("", "")), State::Dead);
        // Enterprise Gateway's rsh contract: stderr's lines when stdout has none.
        assert_eq!(state_of(&out("", "kill: (42) - No such process\n1\n")), State::Dead);
    }

    #[test]
    fn ssh_refusing_us_is_dead_an_unreachable_host_unknown() {
        let d = || "a@h:22".to_string();
        for dead in [
            Error::Auth { dest: d(), cause: "publickey refused".into() },
            Error::HostKey { dest: d(), cause: "changed".into() },
            Error::Invalid("bad".into()),
        ] {
            assert_eq!(state_of(&Err(dead.clone())), State::Dead, "{dead:?}");
        }
        for unknown in [
            Error::Down { dest: d(), cause: "keep-alive limit".into() },
            Error::Timeout { dest: d(), what: "remote command".into(), secs: 30.0 },
            Error::Connect { dest: d(), cause: "no route".into() },
            Error::Other { dest: d(), cause: "connection closed".into() },
        ] {
            assert_eq!(state_of(&Err(unknown.clone())), State::Unknown, "{unknown:?}");
        }
    }

    #[test]
    fn an_unreachable_host_never_revives_a_dead_kernel() {
        let live = Liveness::default();
        answer(&live, "Remote poll", &out("1\n", ""));
        assert_eq!(live.get(), State::Dead);
        answer(&live, "Remote poll", &Err(Error::Down { dest: "a@h:22".into(), cause: "x".into() }));
        assert_eq!(live.get(), State::Dead);
        answer(&live, "Remote poll", &out("0\n", ""));
        assert_eq!(live.get(), State::Alive);
        answer(&live, "Remote poll", &Err(Error::Auth { dest: "a@h:22".into(), cause: "x".into() }));
        assert_eq!(live.get(), State::Dead);
    }
}
