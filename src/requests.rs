//! Requests to a forward's remote port that the caller does not wait for: liveness probes whose
//! answer the next poll reads, and sends whose outcome is logged.
//!
//! Enterprise Gateway polls every kernel every few seconds and signals or shuts kernels down from
//! plain methods on its event loop. Here such a call only reads an atomic and starts a task on the
//! runtime: no thread, no Python future, and nothing that wakes the event loop when the answer comes.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};

use crate::config::ConnectSpec;
use crate::error::{Error, Result};
use crate::forward::Forward;
use crate::pool;
use crate::runtime;

/// What the remote end said last: it took a request, it refused (nothing listens: the launcher is
/// gone), or it could not be asked (connection down, timeout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Alive = 0,
    Dead = 1,
    Unknown = 2,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Alive => "alive",
            State::Dead => "dead",
            State::Unknown => "unknown",
        }
    }

    fn of(outcome: &Result<()>) -> State {
        match outcome {
            Ok(()) => State::Alive,
            Err(Error::Refused { .. }) => State::Dead,
            Err(_) => State::Unknown,
        }
    }
}

/// The liveness of what listens behind one forward, and whether a probe is out.
#[derive(Default)]
pub struct Liveness {
    state: AtomicU8,
    probing: AtomicBool,
}

impl Liveness {
    pub fn get(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            0 => State::Alive,
            1 => State::Dead,
            _ => State::Unknown,
        }
    }

    fn set(&self, s: State) {
        self.state.store(s as u8, Ordering::Release);
    }
}

/// Returns the last known liveness behind `fwd` and, unless one is already out, starts a probe that
/// delivers `data` and records the answer for the next call. A terminated forward is `Dead`.
pub fn probe(fwd: &Arc<Forward>, data: Vec<u8>, timeout: Duration) -> State {
    let live = &fwd.info.liveness;
    let state = live.get();
    if live.probing.swap(true, Ordering::AcqRel) {
        return state;
    }
    let Some(in_flight) = fwd.begin_request() else {
        live.probing.store(false, Ordering::Release);
        return State::Dead;
    };
    let pending = pool::start_request(fwd, data, timeout);
    let fwd = fwd.clone();
    runtime::spawn(async move {
        let outcome = pool::finish_request(pending).await;
        drop(in_flight);
        let live = &fwd.info.liveness;
        let new = State::of(&outcome);
        if new != live.get() {
            let cause = outcome.as_ref().err().map(|e| format!(" ({e})")).unwrap_or_default();
            let i = &fwd.info;
            debug!("{} forward to {}:{}: {} -> {}{cause}", i.channel, i.remote_host, i.remote_port, live.get().as_str(), new.as_str());
        }
        live.set(new);
        live.probing.store(false, Ordering::Release);
    });
    state
}

/// A command to run on the host when the remote port cannot take a request (Enterprise Gateway's
/// own fallback for signals: `kill` through a remote shell).
pub struct Fallback {
    pub spec: ConnectSpec,
    pub command: String,
    pub timeout: Duration,
}

/// Delivers `data` in the background; closing the forward meanwhile lets it finish first. The channel
/// open is queued before this returns, so sends to one forward reach the remote end in the order they
/// were made, as Enterprise Gateway sends them (a launcher told to shut down before it got SIGTERM
/// stops its kernel the slow way). `what` names the request in the log line that reports its outcome.
/// A refusal marks the remote end dead; a failure other than a down connection runs `fallback`.
pub fn send(fwd: &Arc<Forward>, data: Vec<u8>, timeout: Duration, what: String, fallback: Option<Fallback>) -> Result<()> {
    let in_flight = fwd.begin_request().ok_or_else(|| Error::Other {
        dest: fwd.conn.dest(),
        cause: format!("the {} tunnel was terminated", fwd.info.channel),
    })?;
    let pending = pool::start_request(fwd, data, timeout);
    let fwd = fwd.clone();
    runtime::spawn(async move {
        let outcome = pool::finish_request(pending).await;
        drop(in_flight);
        match outcome {
            Ok(()) => debug!("{what}: delivered"),
            Err(e @ Error::Refused { .. }) => {
                fwd.info.liveness.set(State::Dead);
                debug!("{what}: nothing listens any more ({e})");
            }
            Err(e @ Error::Down { .. }) => warn!("{what}: not delivered: {e}"),
            Err(e) => {
                warn!("{what}: failed: {e}");
                if let Some(fb) = fallback {
                    match pool::exec(&fb.spec, &fb.command, fb.timeout).await {
                        Ok(out) => debug!("{what}: fallback command ended with {:?}", out.exit_status),
                        Err(e) => warn!("{what}: fallback command failed: {e}"),
                    }
                }
            }
        }
    });
    Ok(())
}
