//! Requests to a forward's remote port that the caller does not wait for: liveness probes whose
//! answer the next poll reads, and sends whose outcome is logged.
//!
//! Enterprise Gateway polls every kernel every few seconds and signals or shuts kernels down from
//! plain methods on its event loop. Here such a call only reads an atomic and starts a task on the
//! runtime: no thread, no Python future, and nothing that wakes the event loop when the answer comes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use log::{debug, warn};
use once_cell::sync::Lazy;

use crate::config::{ConnectSpec, TunnelMode};
use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::forward::Forward;
use crate::keepalive::Channel;
use crate::liveness::State;
use crate::metrics::ChannelGuard;
use crate::pool;
use crate::runtime;

/// How long after a delivered request a kernel's probes go on their own channel (see `Liveness`):
/// Enterprise Gateway waits this long at most for a killed kernel to go.
const DIRECT_AFTER_REQUEST: Duration = Duration::from_secs(10);

/// Returns the last known liveness behind `fwd` and, unless one is already out, starts a probe that
/// delivers `data` and records the answer for the next call. A terminated forward is `Dead`. Probes
/// of a shared connection's communication ports go through that host's batch (see `Batch`) first.
pub fn probe(fwd: &Arc<Forward>, data: Vec<u8>, timeout: Duration) -> State {
    let live = &fwd.info.liveness;
    let state = live.get();
    if !live.start_probe() {
        return state;
    }
    let Some(in_flight) = fwd.begin_request() else {
        live.probe_done();
        return State::Dead;
    };
    if fwd.info.channel == Channel::EgComm && fwd.conn.mode() == TunnelMode::Shared && !live.probes_directly() {
        if let Some(batch) = Batch::of(&fwd.conn) {
            batch.want(fwd.clone(), in_flight, data, timeout);
            return state;
        }
    }
    probe_on_channel(fwd.clone(), in_flight, data, timeout);
    state
}

/// The probe proper: `data` delivered on a channel of its own, the answer recorded. A remote end that
/// stalled is not asked again (see `Liveness::stall`); its liveness stays what the host's batch says.
fn probe_on_channel(fwd: Arc<Forward>, in_flight: ChannelGuard, data: Vec<u8>, timeout: Duration) {
    if fwd.info.liveness.is_stalled() {
        fwd.info.liveness.probe_done();
        return;
    }
    let pending = pool::start_request(&fwd, data, timeout);
    runtime::spawn(async move {
        let outcome = finish(&fwd, pending).await;
        drop(in_flight);
        answer(&fwd, &outcome);
        fwd.info.liveness.probe_done();
    });
}

/// Waits for a request's outcome; a remote end that took the connection and never answered is marked
/// stalled, and said so once.
async fn finish(fwd: &Forward, pending: Result<pool::PendingRequest>) -> Result<()> {
    let (outcome, unanswered) = pending?.finish().await;
    if unanswered && fwd.info.liveness.stall() {
        let i = &fwd.info;
        let whose = i.kernel_id.as_ref().map(|k| format!(" of KernelID '{k}'")).unwrap_or_default();
        warn!(
            "{} forward{whose}: {}:{} took a request's connection and did not answer it; no more requests go \
             to it (signals are sent by the fallback command, where there is one)",
            i.channel, i.remote_host, i.remote_port
        );
    }
    outcome
}

/// `probe` for a caller that can wait (off the event loop): delivers `data`, records the answer and
/// returns it. A terminated forward cannot be asked: its liveness is unknown.
pub async fn probe_wait(fwd: &Arc<Forward>, data: Vec<u8>, timeout: Duration) -> State {
    let outcome = match fwd.begin_request() {
        Some(_) if fwd.info.liveness.is_stalled() => return fwd.info.liveness.get(),
        Some(in_flight) => {
            let r = finish(fwd, pool::start_request(fwd, data, timeout)).await;
            drop(in_flight);
            r
        }
        None => Err(Error::Other { dest: fwd.conn.dest(), cause: format!("the {} tunnel was terminated", fwd.info.channel) }),
    };
    answer(fwd, &outcome)
}

/// Records what a probe of `fwd` found, logging a change and an unanswered poll.
fn answer(fwd: &Forward, outcome: &Result<()>) -> State {
    let live = &fwd.info.liveness;
    let i = &fwd.info;
    let new = State::of(outcome);
    if new != live.get() {
        let cause = outcome.as_ref().err().map(|e| format!(" ({e})")).unwrap_or_default();
        debug!("{} forward to {}:{}: {} -> {}{cause}", i.channel, i.remote_host, i.remote_port, live.get().as_str(), new.as_str());
    }
    match outcome {
        Err(e) if new == State::Unknown => {
            let what = match &i.kernel_id {
                Some(k) => format!("Poll through the {} tunnel for KernelID '{k}'", i.channel),
                None => format!("Poll through the {} tunnel to {}:{}", i.channel, i.remote_host, i.remote_port),
            };
            live.no_answer(&what, e);
        }
        _ => live.answered(),
    }
    live.set(new);
    new
}

/// How long a host's batch collects probes before its command runs: Enterprise Gateway's poll
/// interval, so that one command answers every kernel of the host once. Each command starts the
/// remote user's shell, start-up files included, which on some hosts costs a noticeable share of a
/// CPU; one every 3 s keeps that small while an answer is at most one poll interval older.
const BATCH_WINDOW: Duration = Duration::from_secs(3);
/// Time the batch command may take.
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The liveness probes of one host's communication ports, answered by one remote command.
///
/// A probe of its own costs a channel open and close on the host's connection, and libssh2's work for
/// an open grows with the channels the connection carries: at a hundred kernels, a probe every 3 s per
/// kernel was most of an idle gateway's CPU. So the probes that arrive within `BATCH_WINDOW` are
/// answered together: one command lists which of their ports something listens on (from the host's
/// `/proc/net/tcp` and `tcp6`), and those kernels are alive. A port nothing listens on is not taken
/// as proof of death: that kernel gets the probe of its own, whose refusal is what marks it dead, as
/// before. A host where the command fails (no `/proc`, no `awk`) is probed one channel at a time from
/// then on.
struct Batch {
    conn: Weak<Connection>,
    spec: ConnectSpec,
    waiting: Mutex<Vec<Waiting>>,
    unsupported: AtomicBool,
}

struct Waiting {
    fwd: Arc<Forward>,
    in_flight: ChannelGuard,
    data: Vec<u8>,
    timeout: Duration,
}

static BATCHES: Lazy<Mutex<HashMap<u64, Arc<Batch>>>> = Lazy::new(Mutex::default);

impl Batch {
    /// The batch of `conn`'s host, unless its command failed there before.
    fn of(conn: &Arc<Connection>) -> Option<Arc<Batch>> {
        let mut batches = BATCHES.lock().unwrap();
        // Batches of connections that are gone go with them.
        batches.retain(|_, b| b.conn.strong_count() > 0);
        let batch = batches
            .entry(conn.id())
            .or_insert_with(|| {
                Arc::new(Batch {
                    conn: Arc::downgrade(conn),
                    spec: conn.spec().clone(),
                    waiting: Mutex::default(),
                    unsupported: AtomicBool::new(false),
                })
            })
            .clone();
        (!batch.unsupported.load(Ordering::Relaxed)).then_some(batch)
    }

    /// Adds a probe; the first of a window starts the batch's command after `BATCH_WINDOW`.
    fn want(self: Arc<Self>, fwd: Arc<Forward>, in_flight: ChannelGuard, data: Vec<u8>, timeout: Duration) {
        let first = {
            let mut waiting = self.waiting.lock().unwrap();
            waiting.push(Waiting { fwd, in_flight, data, timeout });
            waiting.len() == 1
        };
        if first {
            runtime::spawn(async move {
                tokio::time::sleep(BATCH_WINDOW).await;
                self.run().await;
            });
        }
    }

    async fn run(&self) {
        let batch = std::mem::take(&mut *self.waiting.lock().unwrap());
        let mut ports: Vec<u16> = batch.iter().map(|w| w.fwd.info.remote_port).collect();
        ports.sort_unstable();
        ports.dedup();
        let outcome = pool::exec(&self.spec, &listening_command(&ports), BATCH_TIMEOUT).await;
        let listening = match &outcome {
            Ok(out) if out.exit_status == Some(0) => parse_listening(&out.stdout),
            Ok(out) => {
                self.unsupported.store(true, Ordering::Relaxed);
                debug!("{}: liveness batch not available (exit {:?}); probing each kernel on its own", self.spec.dest(), out.exit_status);
                Vec::new()
            }
            Err(e) => {
                debug!("{}: liveness batch failed ({e}); probing each kernel on its own", self.spec.dest());
                Vec::new()
            }
        };
        if listening.is_empty() && outcome.is_ok() && batch.iter().any(|w| w.fwd.info.liveness.get() == State::Alive) {
            // Kernels known alive, yet none of their ports listens there: the forwards reach another
            // machine than the SSH server, whose /proc says nothing about them.
            self.unsupported.store(true, Ordering::Relaxed);
            debug!("{}: the communication ports are not the SSH server's own; probing each kernel on its own", self.spec.dest());
        }
        for w in batch {
            if listening.contains(&w.fwd.info.remote_port) {
                let live = &w.fwd.info.liveness;
                live.set(State::Alive);
                live.answered();
                live.probe_done();
            } else {
                probe_on_channel(w.fwd, w.in_flight, w.data, w.timeout);
            }
        }
    }
}

/// The host's listening TCP ports among `ports`, one hexadecimal port per line, as Linux lists them in
/// `/proc/net/tcp` and `tcp6` (state 0A is LISTEN). Exits 3 where there is no such file.
fn listening_command(ports: &[u16]) -> String {
    let wanted: Vec<String> = ports.iter().map(|p| format!("{p:04X}")).collect();
    format!(
        "[ -r /proc/net/tcp ] || exit 3; cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk 'BEGIN {{ n = split(\"{}\", w, \" \"); \
         for (i = 1; i <= n; i++) want[w[i]] = 1 }} $4 == \"0A\" {{ split($2, a, \":\"); if (a[2] in want) {{ print a[2]; delete want[a[2]] }} }}'",
        wanted.join(" ")
    )
}

fn parse_listening(stdout: &[u8]) -> Vec<u16> {
    String::from_utf8_lossy(stdout).lines().filter_map(|l| u16::from_str_radix(l.trim(), 16).ok()).collect()
}

/// Delivers `data` on a channel of its own and waits for the remote end to close, in turn with the
/// forward's other requests (see `Forward::request_turn`): the turn is taken now, on the caller's
/// thread; `timeout` counts from when it comes. A stalled remote end is not asked.
pub fn deliver(fwd: &Arc<Forward>, data: Vec<u8>, timeout: Duration) -> impl Future<Output = Result<()>> + Send + 'static {
    let mut turn = fwd.request_turn();
    let fwd = fwd.clone();
    async move {
        turn.wait().await;
        if fwd.info.liveness.is_stalled() {
            let i = &fwd.info;
            return Err(Error::Other {
                dest: fwd.conn.dest(),
                cause: format!("{}:{} took an earlier request without answering it", i.remote_host, i.remote_port),
            });
        }
        finish(&fwd, pool::start_request(&fwd, data, timeout)).await
    }
}

/// A command to run on the host when the remote port cannot take a request (Enterprise Gateway's
/// own fallback for signals: `kill` through a remote shell).
pub struct Fallback {
    pub spec: ConnectSpec,
    pub command: String,
    pub timeout: Duration,
}

/// Delivers `data` in the background; closing the forward meanwhile lets it finish first. Sends to one
/// forward go one at a time, in the order they were made (`Forward::request_turn`), as Enterprise
/// Gateway sends them (a launcher told to shut down before it got SIGTERM stops its kernel the slow
/// way), each with `timeout` from its turn. `what` names the request in the log line that reports its
/// outcome. A refusal marks the remote end dead; a failure other than a down connection, a stalled
/// remote end included, runs `fallback`.
pub fn send(fwd: &Arc<Forward>, data: Vec<u8>, timeout: Duration, what: String, fallback: Option<Fallback>) -> Result<()> {
    let in_flight = fwd.begin_request().ok_or_else(|| Error::Other {
        dest: fwd.conn.dest(),
        cause: format!("the {} tunnel was terminated", fwd.info.channel),
    })?;
    let delivery = deliver(fwd, data, timeout);
    let fwd = fwd.clone();
    runtime::spawn(async move {
        let outcome = delivery.await;
        drop(in_flight);
        match outcome {
            Ok(()) => {
                fwd.info.liveness.probe_directly_for(DIRECT_AFTER_REQUEST);
                debug!("{what}: delivered");
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_command_asks_for_exactly_the_ports_in_hex() {
        let cmd = listening_command(&[50000, 22]);
        assert!(cmd.contains("\"C350 0016\""), "{cmd}");
        assert!(cmd.starts_with("[ -r /proc/net/tcp ] || exit 3;"));
    }

    #[test]
    fn listening_ports_are_read_back_from_hex_lines() {
        assert_eq!(parse_listening(b"C350\n0016\n\nzz\n"), vec![50000, 22]);
    }
}
