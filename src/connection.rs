//! One SSH connection as an actor: a single task owns the libssh2 session and serves every forward
//! and remote command that rides on it, re-establishing the session when it dies.
//!
//! Handles talk to the task over a command queue; local connections exchange bytes with it through
//! bounded queues and wake it through one `Notify`. libssh2 sessions are single-threaded state
//! machines, so one owner task avoids both lock contention and lost wake-ups.
//!
//! Remote commands take session channels, which sshd limits per connection (MaxSessions, 10 by
//! default); the actor keeps at most `max_sessions` of them open and queues the rest in arrival order.
//! A refused session channel lowers that budget to what was open and the command waits its turn again:
//! only its own deadline can fail it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, warn};
use once_cell::sync::Lazy;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};

use crate::config::{ConnectSpec, TunnelMode};
use crate::driver::{is_fatal, transport_received, Attempt, SshIo, Step};
use crate::error::{Error, Result};
use crate::exec::{ExecChannel, ExecOutput};
use crate::forward_channel::{carry, DirectTcpip, ForwardChannel, CHUNK, QUEUE_DEPTH};
use crate::idle_reader::{IdleReader, ReaderStep};
use crate::jump::Hops;
use crate::keepalive::{KeepAlive, ProbeAction, Schedule};
use crate::metrics::{self, ChannelGuard, ConnCounts, ConnStats, DestTotals, ForwardStats, OpenChannel};
use crate::net;
use crate::random;
use crate::raw_channel::{self, RawChannel};
use crate::ready::{Flag, Nudge, ReadyList};
use crate::remote_listen::{ListenStep, Listening, RemoteListener};
use crate::session;

/// Where a new channel goes.
pub enum Target {
    /// direct-tcpip to host:port, bytes exchanged with a local connection task.
    Forward {
        host: String,
        port: u16,
        to_remote: mpsc::Receiver<Vec<u8>>,
        from_remote: mpsc::Sender<Vec<u8>>,
        stats: Arc<ForwardStats>,
        reply: oneshot::Sender<Result<()>>,
        /// The actor's end of the flag the local side raises (see `ready`).
        flag: Flag,
    },
    /// A session channel running one command.
    Exec { command: String, reply: oneshot::Sender<Result<ExecOutput>> },
}

pub struct OpenRequest {
    pub target: Target,
    /// Past this instant the caller has given up; the request is answered with an error.
    pub deadline: Instant,
    /// How often the server refused this request's session channel, and its last word on it.
    refusals: u32,
    refused_cause: Option<String>,
}

impl OpenRequest {
    pub fn new(target: Target, deadline: Instant) -> Self {
        OpenRequest { target, deadline, refusals: 0, refused_cause: None }
    }

    /// Session channels count against the server's MaxSessions; direct-tcpip channels do not.
    fn is_session(&self) -> bool {
        matches!(self.target, Target::Exec { .. })
    }

    fn fail(self, err: Error) {
        match self.target {
            Target::Forward { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Target::Exec { reply, .. } => {
                let _ = reply.send(Err(err));
            }
        }
    }

    fn caller_gone(&self) -> bool {
        match &self.target {
            Target::Forward { reply, .. } => reply.is_closed(),
            Target::Exec { reply, .. } => reply.is_closed(),
        }
    }

    fn what(&self) -> String {
        match &self.target {
            Target::Forward { host, port, .. } => format!("channel to {host}:{port}"),
            Target::Exec { .. } => "remote command".to_string(),
        }
    }
}

pub enum Command {
    Open(OpenRequest),
    /// New keep-alive settings, recomputed whenever forwards come and go.
    KeepAlive(KeepAlive),
    Shutdown,
}

/// State the handle, status() and the actor share; read from outside through `Connection`'s methods
/// and `snapshot()`.
struct Shared {
    id: u64,
    spec: ConnectSpec,
    mode: TunnelMode,
    alive: AtomicBool,
    /// The keep-alive interval applied now (seconds), for status().
    interval: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Session channels allowed open at once: the configured budget, lowered by refusals.
    session_budget: AtomicUsize,
    /// Forwards and in-flight remote commands using this connection (kept by the pool). A connection
    /// that dies with no users is not worth re-establishing.
    users: AtomicUsize,
    /// The actor's wake-up, and which channels' local sides moved (see `ready`).
    ready: Arc<ReadyList>,
    /// Set when reconnecting stopped for good (host key changed, credentials refused).
    stopped: AtomicBool,
    /// This connection's counters, which its destination's totals include (see `metrics`).
    stats: ConnStats,
    /// The remote listener's state, for callers waiting for its port (see `remote_listen`).
    listening: watch::Sender<Listening>,
    /// The channels connections to the remote listener ride on, counted like a forward's (the
    /// listener is one, remote), on a connection with `respond_to`.
    responses: Option<Arc<ForwardStats>>,
}

impl Shared {
    fn set_error(&self, e: &str) {
        *self.last_error.lock().unwrap() = Some(e.to_string());
    }

    fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap().clone()
    }
}

/// One connection at one moment, for status().
#[derive(Clone, Debug)]
pub struct ConnectionSnapshot {
    pub alive: bool,
    /// "connected", "reconnecting" or "stopped" (reconnecting gave up: host key, credentials).
    pub state: &'static str,
    pub keep_alive_interval: u64,
    pub last_error: Option<String>,
    pub session_budget: usize,
    pub counts: ConnCounts,
    /// The remote listener's port on the host (a connection with `respond_to`, once listening).
    pub remote_forward: Option<u16>,
}

/// A handle on the actor; dropping the last handle does not stop it, `shutdown` does.
pub struct Connection {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Where a session through a ProxyJump hop gets the hop's connection (the pool).
    hops: Arc<dyn Hops>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Connection {
    /// Starts the actor and waits for the first connection; on failure nothing is left running. A
    /// session through a ProxyJump hop takes the hop's connection from `hops`.
    pub async fn start(spec: ConnectSpec, mode: TunnelMode, keep_alive: KeepAlive, hops: Arc<dyn Hops>) -> Result<Arc<Connection>> {
        let max_sessions = spec.max_sessions;
        let stats = ConnStats::new(metrics::totals_for(&spec));
        let responses = spec.respond_to.map(|_| Arc::new(ForwardStats::new(stats.dest().clone())));
        let shared = Arc::new(Shared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            spec,
            mode,
            alive: AtomicBool::new(false),
            interval: AtomicU64::new(keep_alive.interval),
            last_error: Mutex::new(None),
            session_budget: AtomicUsize::new(max_sessions),
            users: AtomicUsize::new(0),
            ready: Arc::new(ReadyList::default()),
            stopped: AtomicBool::new(false),
            stats,
            listening: watch::Sender::new(Listening::Pending),
            responses,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let actor = Actor {
            shared: shared.clone(),
            commands: rx,
            queue: VecDeque::new(),
            keep_alive,
            hops: hops.clone(),
            stopped: None,
            session_retry_at: None,
            listen_port: 0,
        };
        let task = spawn_actor(actor, ready_tx);
        let conn = Arc::new(Connection { shared, commands: tx, task: Mutex::new(Some(task)), hops });
        // A caller that stops waiting (a cancelled kernel start) must not leave the actor running.
        let abandoned = StopOnDrop(Some(conn.commands.clone()));
        let ready = ready_rx.await;
        abandoned.disarm();
        match ready {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(e)) => {
                conn.shutdown().await;
                Err(e)
            }
            Err(_) => Err(Error::Other { dest: conn.shared.spec.dest(), cause: "connection task ended".into() }),
        }
    }

    pub fn dest(&self) -> String {
        self.shared.spec.dest()
    }

    /// Unique within the process; the pool and lanes key their entries by it.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    pub fn spec(&self) -> &ConnectSpec {
        &self.shared.spec
    }

    pub fn mode(&self) -> TunnelMode {
        self.shared.mode
    }

    /// Where this connection's ProxyJump hop, if any, comes from (another connection to the same
    /// destination takes it from there too).
    pub fn hops(&self) -> Arc<dyn Hops> {
        self.hops.clone()
    }

    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// Reconnecting stopped for good (host key changed, credentials refused).
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Relaxed)
    }

    /// Why the connection last went down (None while it has been up since).
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error()
    }

    /// The destination's totals, for what rides on this connection (forwards, remote commands).
    pub fn totals(&self) -> &Arc<DestTotals> {
        self.shared.stats.dest()
    }

    /// Users of this connection (see `Shared::users`); kept by the pool and lanes, under their locks.
    pub fn users(&self) -> usize {
        self.shared.users.load(Ordering::Acquire)
    }

    pub fn set_users(&self, n: usize) {
        self.shared.users.store(n, Ordering::Release);
    }

    pub fn add_user(&self) {
        self.shared.users.fetch_add(1, Ordering::AcqRel);
    }

    pub fn snapshot(&self) -> ConnectionSnapshot {
        let s = &self.shared;
        let alive = self.is_alive();
        ConnectionSnapshot {
            alive,
            state: match (alive, self.is_stopped()) {
                (true, _) => "connected",
                (false, false) => "reconnecting",
                (false, true) => "stopped",
            },
            keep_alive_interval: s.interval.load(Ordering::Relaxed),
            last_error: s.last_error(),
            session_budget: s.session_budget.load(Ordering::Relaxed),
            counts: s.stats.snapshot(),
            remote_forward: match *s.listening.borrow() {
                Listening::Port(port) if alive => Some(port),
                _ => None,
            },
        }
    }

    pub fn set_keep_alive(&self, keep_alive: KeepAlive) {
        self.shared.interval.store(keep_alive.interval, Ordering::Relaxed);
        let _ = self.commands.send(Command::KeepAlive(keep_alive));
    }

    /// Queues a channel open; the actor answers through the request's reply.
    pub fn open(&self, req: OpenRequest) {
        if let Err(mpsc::error::SendError(Command::Open(req))) = self.commands.send(Command::Open(req)) {
            req.fail(Error::Other { dest: self.dest(), cause: "connection is closed".into() });
        }
    }

    /// Queues a direct-tcpip channel; the receiver answers with the open's outcome (or is dropped if
    /// the connection ends first). The local side raises the `Nudge` after every move on the
    /// channel's queues, and drops it when done.
    pub fn open_channel(&self, open: DirectTcpip, deadline: Instant) -> (oneshot::Receiver<Result<()>>, Nudge) {
        let (reply, reply_rx) = oneshot::channel();
        let (nudge, flag) = self.shared.ready.pair();
        let DirectTcpip { host, port, to_remote, from_remote, stats } = open;
        self.open(OpenRequest::new(Target::Forward { host, port, to_remote, from_remote, stats, reply, flag }, deadline));
        (reply_rx, nudge)
    }

    /// The port of the remote listener on the host's 127.0.0.1 (a connection with `respond_to`), once
    /// the server has answered; waits through a reconnect until `deadline`.
    pub async fn response_port(&self, deadline: Instant) -> Result<u16> {
        if self.shared.spec.respond_to.is_none() {
            return Err(Error::Invalid(format!("the connection to {} has no respond_to address", self.dest())));
        }
        let mut rx = self.shared.listening.subscribe();
        let answer = tokio::time::timeout_at(deadline, async {
            loop {
                let state = rx.borrow_and_update().clone();
                match state {
                    Listening::Port(port) => return Ok(port),
                    Listening::Refused(cause) => {
                        return Err(Error::Prohibited { dest: self.dest(), target: crate::error::REMOTE_FORWARD.into(), cause })
                    }
                    Listening::Pending if self.is_stopped() => {
                        return Err(Error::Down { dest: self.dest(), cause: self.last_error().unwrap_or_else(|| "stopped".into()) })
                    }
                    Listening::Pending => {}
                }
                if rx.changed().await.is_err() {
                    return Err(Error::Other { dest: self.dest(), cause: "connection closed".into() });
                }
            }
        })
        .await;
        answer.unwrap_or_else(|_| match self.last_error() {
            Some(cause) if !self.is_alive() => Err(Error::Down { dest: self.dest(), cause }),
            _ => Err(Error::Timeout { dest: self.dest(), what: "remote forward request".into(), secs: 0.0 }),
        })
    }

    /// Stops the actor (and any reconnecting) and waits until its socket is closed.
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            if tokio::time::timeout(Duration::from_millis(200), &mut Box::pin(task)).await.is_err() {
                warn!("connection {} did not stop in time", self.dest());
            }
        }
    }
}

/// A plain function, so that proving the actor's future `Send` stays outside `start`'s own future: a
/// connection through a ProxyJump hop starts the hop's connection from inside its actor.
fn spawn_actor(actor: Actor, ready: oneshot::Sender<Result<()>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(actor.run(ready))
}

/// Stops an actor whose start was abandoned; disarmed once the start has an answer.
struct StopOnDrop(Option<mpsc::UnboundedSender<Command>>);

impl StopOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Command::Shutdown);
        }
    }
}

/// How the connected phase ended.
enum Exit {
    Shutdown,
    Dead(String),
}

struct Actor {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Opens waiting for the session (while connecting) or for their turn (libssh2 opens one at a time).
    queue: VecDeque<OpenRequest>,
    /// The keep-alive policy a (re)connected session starts with.
    keep_alive: KeepAlive,
    hops: Arc<dyn Hops>,
    /// Set when retrying cannot help (host key changed, credentials refused): every request fails with it.
    stopped: Option<Error>,
    /// After the server refused a session channel while none of ours was open, the next try waits
    /// until then (the server may still be freeing a slot).
    session_retry_at: Option<Instant>,
    /// The remote listener's port on the last session (0: none yet), asked for again after a reconnect.
    listen_port: u16,
}

impl Actor {
    async fn run(mut self, ready: oneshot::Sender<Result<()>>) {
        let dest = self.shared.spec.dest();
        let mut ready = Some(ready);
        let mut attempt: u32 = 0;
        let mut just_lost = false;
        loop {
            let connected = match self.connect().await {
                None => break, // shut down while connecting
                Some(r) => r,
            };
            match connected {
                Ok(io) => {
                    // Alive before anyone hears of it, so a caller never sees a fresh connection as down.
                    self.shared.alive.store(true, Ordering::Release);
                    *self.shared.last_error.lock().unwrap() = None;
                    if let Some(r) = ready.take() {
                        self.shared.stats.opened();
                        let _ = r.send(Ok(()));
                    } else {
                        warn!("SSH connection {dest} re-established after {} attempt(s)", attempt + 1);
                        self.shared.stats.reconnected();
                    }
                    attempt = 0;
                    let exit = self.connected(io).await;
                    self.shared.alive.store(false, Ordering::Release);
                    self.shared.listening.send_replace(Listening::Pending);
                    match exit {
                        Exit::Shutdown => break,
                        Exit::Dead(cause) if self.shared.users.load(Ordering::Acquire) == 0 => {
                            debug!("idle SSH connection {dest} closed: {cause}");
                            self.shared.set_error(&cause);
                            break;
                        }
                        Exit::Dead(cause) => {
                            warn!("SSH connection {dest} lost: {cause}; reconnecting");
                            self.shared.set_error(&cause);
                            just_lost = true;
                        }
                    }
                }
                Err(e) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Err(e));
                        break;
                    }
                    self.shared.set_error(&e.to_string());
                    if e.is_permanent() {
                        warn!("SSH connection {dest}: giving up reconnecting: {e}");
                        for req in self.queue.drain(..) {
                            req.fail(e.clone());
                        }
                        self.stopped = Some(e);
                        self.shared.stopped.store(true, Ordering::Relaxed);
                    } else {
                        debug!("reconnect attempt {} to {dest} failed: {e}", attempt + 1);
                    }
                }
            }
            if self.stopped.is_some() {
                if !self.idle_until(None).await {
                    break;
                }
                continue;
            }
            // A connection that was up has just died: its local clients are already reconnecting, so the
            // first try goes out at once (jittered); only a failed try backs off.
            let wait = if std::mem::take(&mut just_lost) {
                session::retry_after_loss(self.shared.id ^ random::nanos())
            } else {
                attempt = attempt.saturating_add(1);
                session::backoff(attempt - 1, self.shared.id ^ u64::from(attempt) ^ random::nanos())
            };
            if !self.idle_until(Some(Instant::now() + wait)).await {
                break;
            }
        }
        let dest = self.shared.spec.dest();
        for req in self.queue.drain(..) {
            req.fail(Error::Other { dest: dest.clone(), cause: "connection closed".into() });
        }
        self.commands.close();
        while let Ok(cmd) = self.commands.try_recv() {
            if let Command::Open(req) = cmd {
                req.fail(Error::Other { dest: dest.clone(), cause: "connection closed".into() });
            }
        }
    }

    /// Runs `establish` while still serving commands; None means a shutdown arrived.
    async fn connect(&mut self) -> Option<Result<SshIo>> {
        let spec = self.shared.spec.clone();
        let hops = self.hops.clone();
        let fut = session::establish(&spec, self.keep_alive, &*hops);
        tokio::pin!(fut);
        loop {
            let expiry = self.next_expiry();
            tokio::select! {
                r = &mut fut => return Some(r),
                cmd = self.commands.recv() => {
                    if !self.accept(cmd) {
                        return None;
                    }
                }
                _ = sleep_until(expiry) => self.expire(),
            }
        }
    }

    /// Serves commands while disconnected until `until` (or forever when None); false on shutdown.
    async fn idle_until(&mut self, until: Option<Instant>) -> bool {
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let until = until.unwrap_or(far);
        loop {
            let expiry = self.next_expiry().min(until);
            tokio::select! {
                cmd = self.commands.recv() => {
                    if !self.accept(cmd) {
                        return false;
                    }
                }
                _ = sleep_until(expiry) => {
                    self.expire();
                    if Instant::now() >= until {
                        return true;
                    }
                }
            }
        }
    }

    /// Takes one command while not connected; false means stop.
    fn accept(&mut self, cmd: Option<Command>) -> bool {
        match cmd {
            None | Some(Command::Shutdown) => false,
            Some(Command::KeepAlive(keep_alive)) => {
                self.shared.interval.store(keep_alive.interval, Ordering::Relaxed);
                self.keep_alive = keep_alive;
                true
            }
            Some(Command::Open(req)) => {
                match &self.stopped {
                    Some(e) => req.fail(e.clone()),
                    None => self.queue.push_back(req),
                }
                true
            }
        }
    }

    fn next_expiry(&self) -> Instant {
        let retry = self.session_retry_at.filter(|_| self.queue.iter().any(OpenRequest::is_session));
        self.queue
            .iter()
            .map(|r| r.deadline)
            .chain(retry)
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
    }

    /// Answers requests whose callers stopped waiting.
    fn expire(&mut self) {
        let now = Instant::now();
        let dest = self.shared.spec.dest();
        let cause = self.shared.last_error().unwrap_or_else(|| "connecting".into());
        let (expired, kept): (VecDeque<_>, VecDeque<_>) =
            self.queue.drain(..).partition(|r| r.deadline <= now || r.caller_gone());
        self.queue = kept;
        for req in expired {
            if req.refusals > 0 {
                let cause = format!(
                    "the server refused session channels {} time(s) ({}) and none freed up in time; its \
                     MaxSessions limit is lower than egtunnel's budget of {}: set EG_SSH_MAX_SESSIONS (or the \
                     kernelspec's max_sessions) below the server's MaxSessions, or raise MaxSessions in its sshd_config",
                    req.refusals,
                    req.refused_cause.as_deref().unwrap_or("refused"),
                    self.shared.spec.max_sessions
                );
                req.fail(Error::Other { dest: dest.clone(), cause });
            } else if self.shared.alive.load(Ordering::Acquire) {
                let what = req.what();
                req.fail(Error::Timeout { dest: dest.clone(), what, secs: 0.0 });
            } else {
                req.fail(Error::Down { dest: dest.clone(), cause: cause.clone() });
            }
        }
    }

    /// The connected phase: pump channels until shutdown or the session dies.
    async fn connected(&mut self, io: SshIo) -> Exit {
        let mut chans = Channels::default();
        if self.shared.spec.respond_to.is_some() {
            chans.listener = Some(RemoteListener::new(self.listen_port));
        }
        let mut schedule = Schedule::new(self.keep_alive);
        io.sess.set_keepalive(true, schedule.policy().native_interval());
        self.shared.stats.set_keepalives_unanswered(0);
        loop {
            let mut want_write = false;
            match self.pump(&io, &mut chans, &mut want_write) {
                Err(cause) => return Exit::Dead(cause),
                // Not settled within one turn: take commands first, then come straight back.
                Ok(false) => self.shared.ready.wake.notify_one(),
                Ok(true) => self.check_settled(&chans, want_write),
            }
            // Our own sends may have put the socket back into delayed-ACK mode; push out any ACK
            // still pending before going idle, or sshd's Nagle holds its next packet for ~40 ms.
            net::set_quickack(io.fd());
            let now = Instant::now();
            if schedule.heard_from_peer(|| net::since_last_data_received(io.fd()), now) {
                self.shared.stats.set_keepalives_unanswered(0);
            }
            let keepalive_at = match schedule.action(|| io.idle(), now) {
                ProbeAction::Dead => return Exit::Dead(schedule.dead_cause()),
                // A probe's reply would pass for the listen request's (see `remote_listen`): it waits,
                // but not longer than a connect may take.
                ProbeAction::Probe if chans.listen_pending_since().is_some() => {
                    let asked = chans.listen_pending_since().unwrap_or(now);
                    let limit = asked + Duration::from_millis(self.shared.spec.connect_timeout_ms);
                    if now >= limit {
                        return Exit::Dead("no answer to the remote forward request".into());
                    }
                    limit
                }
                ProbeAction::Probe => match io.attempt_small(&mut want_write, |s: &mut &ssh2::Session| s.keepalive_send(), &mut &io.sess) {
                    Attempt::Done(next) => {
                        if schedule.probe_sent(next, now) {
                            self.shared.stats.set_keepalives_unanswered(schedule.unanswered());
                            self.shared.stats.keepalive_sent();
                            continue;
                        }
                        now + Duration::from_secs(u64::from(next.max(1)))
                    }
                    // Another packet is still going out: retry once the socket drains.
                    Attempt::Blocked => now + Duration::from_secs(schedule.policy().interval),
                    Attempt::Failed(e) => return Exit::Dead(format!("keep-alive failed: {}", e.message())),
                },
                ProbeAction::Wait(d) => now + d,
            };
            let expiry = self.next_expiry().min(chans.next_deadline()).min(keepalive_at);
            tokio::select! {
                biased;
                cmd = self.commands.recv() => match cmd {
                    None | Some(Command::Shutdown) => {
                        // One last pass so bytes already accepted go out, then say goodbye.
                        let mut ww = false;
                        let _ = self.pump(&io, &mut chans, &mut ww);
                        let _ = io.sess.disconnect(None, "egtunnel closing", None);
                        return Exit::Shutdown;
                    }
                    Some(Command::KeepAlive(keep_alive)) => {
                        self.keep_alive = keep_alive;
                        schedule.set_policy(keep_alive);
                        io.sess.set_keepalive(true, keep_alive.native_interval());
                        if let Some(relay) = &io.relay {
                            relay.set_keep_alive(keep_alive);
                        }
                    }
                    Some(Command::Open(req)) => self.queue.push_back(req),
                },
                r = io.readable() => {
                    if let Err(e) = r {
                        return Exit::Dead(format!("socket error: {e}"));
                    }
                    if let Some(cause) = io.closed_by_peer() {
                        return Exit::Dead(cause);
                    }
                }
                r = io.writable(), if want_write => {
                    if let Err(e) = r {
                        return Exit::Dead(format!("socket error: {e}"));
                    }
                }
                _ = self.shared.ready.wake.notified() => {}
                _ = sleep_until(expiry) => self.expire(),
            }
        }
    }

    /// The first queued request that may open now: forwards always, commands within the session budget.
    fn next_request(&mut self, chans: &Channels) -> Option<OpenRequest> {
        let now = Instant::now();
        let sessions_ok = chans.sessions_open() < self.shared.session_budget.load(Ordering::Relaxed)
            && self.session_retry_at.is_none_or(|t| now >= t);
        loop {
            let i = self.queue.iter().position(|r| sessions_ok || !r.is_session())?;
            let req = self.queue.remove(i).expect("position is in range");
            if !req.caller_gone() {
                return Some(req);
            }
        }
    }

    /// The server refused a session channel: lower the budget to what was open and queue the command
    /// again at the head, so it keeps its place.
    fn session_refused(&mut self, chans: &Channels, mut req: OpenRequest, e: &ssh2::Error) {
        let open = chans.sessions_open();
        let budget = open.max(1);
        let before = self.shared.session_budget.swap(budget, Ordering::Relaxed);
        self.shared.stats.session_refused();
        req.refusals += 1;
        req.refused_cause = Some(e.message().to_string());
        self.session_retry_at = (open == 0).then(|| Instant::now() + refusal_backoff(req.refusals));
        let msg = format!(
            "SSH connection {}: the server refused a session channel with {open} open ({}); session budget {before} -> {budget} (its MaxSessions is lower than EG_SSH_MAX_SESSIONS)",
            self.shared.spec.dest(),
            e.message()
        );
        if budget < before {
            warn!("{msg}");
        } else {
            debug!("{msg}");
        }
        self.queue.push_front(req);
    }

    /// Moves everything that can move without blocking. Ok(true) when the connection has settled
    /// and the actor may sleep until the socket, a command or a local connection wakes it; Ok(false)
    /// when it must come back at once. Err means the session is dead.
    ///
    /// Why sleeping is safe only after a settled pass: libssh2 reads its socket on behalf of every
    /// channel, so a call made for one channel may queue packets (data, EOF, exit status, window
    /// space) for a channel stepped earlier in the same pass. The socket is then empty, no readiness
    /// event follows, and that channel would wait for an unrelated wake-up. So each pass first lets
    /// libssh2 process everything the socket holds (after which libssh2 holds no complete packet it
    /// has not queued), then steps every channel against that queue, and the pass counts as settled
    /// only if none of those steps received another byte (`transport_received`, counted in libssh2's
    /// receive callback) and no channel was added. Any byte received mid-pass means another pass.
    /// Two waits are left to the socket: libssh2 waiting to send (writability wakes the actor), and a
    /// key re-exchange, during which a read that must first enlarge its window is blocked until the
    /// server's key packets arrive (readability wakes it; see `ForwardChannel::has_unread`).
    fn pump(&mut self, io: &SshIo, chans: &mut Channels, want_write: &mut bool) -> std::result::Result<bool, String> {
        for _ in 0..MAX_PASSES {
            let before = transport_received();
            chans.drain(io, want_write)?;
            let mark = transport_received();
            // Whatever arrived may be for any channel: the next step looks at all of them once.
            chans.rescan |= mark != before;
            // Channels first: a partly sent packet of theirs must be finished before anything new goes out.
            chans.step_all(io, &self.shared.ready, want_write)?;
            let added = self.open_queued(io, chans, want_write)?;
            let accepted = self.step_listener(io, chans, want_write)?;
            let settled = transport_received() == mark;
            chans.rescan |= !settled;
            if settled && !added && !accepted {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Continues the remote listener's request, or takes the connections the server opened to it and
    /// carries each to `respond_to`; true if a channel was added (it is stepped on the next pass).
    fn step_listener(&mut self, io: &SshIo, chans: &mut Channels, want_write: &mut bool) -> std::result::Result<bool, String> {
        let Some(to) = self.shared.spec.respond_to else { return Ok(false) };
        let mut added = false;
        loop {
            let Some(listener) = chans.listener.as_mut() else { return Ok(added) };
            match listener.step(io, want_write) {
                ListenStep::Idle => return Ok(added),
                ListenStep::Fatal(cause) => return Err(cause),
                ListenStep::Answered(state) => {
                    match &state {
                        Listening::Port(port) => {
                            self.listen_port = *port;
                            debug!("SSH connection {}: remote forward 127.0.0.1:{port} on the host -> {to}", self.shared.spec.dest());
                        }
                        Listening::Refused(cause) => warn!("SSH connection {}: {cause}", self.shared.spec.dest()),
                        Listening::Pending => {}
                    }
                    self.shared.listening.send_replace(state);
                }
                ListenStep::Accepted(ch) => {
                    chans.carry_response(ch, to, &self.shared);
                    added = true;
                }
            }
        }
    }

    /// Starts or continues channel opens; true if a channel was added (it is stepped on the next pass).
    fn open_queued(&mut self, io: &SshIo, chans: &mut Channels, want_write: &mut bool) -> std::result::Result<bool, String> {
        let mut added = false;
        // libssh2 runs one channel open at a time per session. The idle reader opens first on every
        // connection: it is what lets each pass empty the socket into libssh2 (see `pump`), whatever
        // channels exist, and it answers server keep-alives on a connection with no channel. (Opening
        // it after a fresh connection's queued forwards saves a round trip, but leaves the passes of
        // that phase to forwards' zero-length reads, and the settle check then found channels with
        // packets queued: the round trip is the price.)
        if chans.reader.is_none() {
            chans.reader = Some(IdleReader::new());
        }
        loop {
            if chans.opening.is_none() {
                if let Some(reader) = chans.reader.as_mut().filter(|r| r.holds_session()) {
                    match reader.step(&io.sess, is_fatal_code) {
                        ReaderStep::Pending if reader.is_opening() => break,
                        ReaderStep::Pending | ReaderStep::Ready => io.past_startup(),
                        ReaderStep::Refused(cause) => {
                            io.past_startup();
                            debug!("SSH connection {}: no idle reader ({cause}); server keep-alives are answered only while a channel is open", self.shared.spec.dest());
                        }
                        ReaderStep::Fatal(cause) => return Err(format!("opening a channel: {cause}")),
                    }
                }
                match self.next_request(chans) {
                    Some(req) => chans.opening = Some(req),
                    None => break,
                }
            }
            let req = chans.opening.as_ref().expect("set above");
            let r = match &req.target {
                Target::Forward { host, port, .. } => io.attempt_rc(want_write, RawChannel::open_direct_tcpip(&io.sess, host, *port)).map(Opened::Forward),
                Target::Exec { .. } => io.attempt_rc(want_write, RawChannel::open_session(&io.sess)).map(Opened::Session),
            };
            match r {
                Attempt::Blocked => break,
                Attempt::Failed(e) if is_fatal(&e) => return Err(format!("opening a channel: {}", e.message())),
                Attempt::Failed(e) => {
                    io.past_startup();
                    let req = chans.opening.take().expect("set above");
                    if req.is_session() {
                        self.session_refused(chans, req, &e);
                    } else {
                        let err = open_error(&self.shared.spec, &req, &e);
                        req.fail(err);
                    }
                }
                Attempt::Done(ch) => {
                    io.past_startup();
                    let req = chans.opening.take().expect("set above");
                    if req.is_session() {
                        self.session_retry_at = None;
                    }
                    chans.add(ch, req, &self.shared);
                    added = true;
                }
            }
        }
        Ok(added)
    }

    /// With EGTUNNEL_CHECK_SETTLED set: after a settled pass, looks for a channel with something libssh2
    /// holds for it, which `pump` promises cannot exist, and counts each finding (`status()`). While
    /// libssh2 waits to send (a window adjustment, say), a channel may hold data legitimately: the
    /// socket's writability wakes the actor then.
    fn check_settled(&self, chans: &Channels, want_write: bool) {
        if !*CHECK_SETTLED || want_write {
            return;
        }
        let unread = chans.unread();
        if unread > 0 {
            self.shared.stats.unsettled_sleep();
            let detail: Vec<String> = chans.forwards.values().filter(|f| f.has_unread()).map(|f| f.settle_report())
                .chain(chans.execs.iter().filter(|x| x.has_unread()).map(|x| x.settle_report()))
                .collect();
            warn!("SSH connection {}: going idle with {unread} channel(s) holding unread packets: {}", self.shared.spec.dest(), detail.join("; "));
        }
    }
}

/// Passes one wake-up may take before the actor serves its commands again (it then wakes itself).
const MAX_PASSES: usize = 64;

static CHECK_SETTLED: Lazy<bool> = Lazy::new(|| std::env::var_os("EGTUNNEL_CHECK_SETTLED").is_some_and(|v| v == "1"));

/// A channel the server has just opened, of either kind.
enum Opened {
    Forward(RawChannel),
    Session(RawChannel),
}

fn is_fatal_code(code: std::os::raw::c_int) -> bool {
    is_fatal(&ssh2::Error::new(ssh2::ErrorCode::Session(code), "fatal?"))
}

/// 50 ms doubling to 1 s between tries of a session channel refused while none of ours was open.
fn refusal_backoff(refusals: u32) -> Duration {
    Duration::from_millis((50u64 << refusals.saturating_sub(1).min(5)).min(1000))
}

fn open_error(spec: &ConnectSpec, req: &OpenRequest, e: &ssh2::Error) -> Error {
    let msg = e.message().to_string();
    match &req.target {
        Target::Forward { host, port, .. } if msg.contains("connect failed") || msg.contains("Connection refused") => {
            Error::Refused { dest: spec.dest(), target: format!("{host}:{port}"), cause: msg }
        }
        Target::Forward { host, port, .. } if msg.contains("administratively prohibited") => Error::Prohibited {
            dest: spec.dest(),
            target: format!("{host}:{port}"),
            cause: msg,
        },
        _ => Error::Other { dest: spec.dest(), cause: format!("cannot open {}: {msg}", req.what()) },
    }
}

/// The live channels of one session, by kind.
#[derive(Default)]
struct Channels {
    opening: Option<OpenRequest>,
    /// By key (see `ready`); keys grow with age, so sorting them steps older channels first.
    forwards: HashMap<u64, ForwardChannel>,
    /// Forwards to step on the next pass whatever else is known: new, or in the middle of something.
    active: Vec<u64>,
    /// Reused list of the forwards one pass steps.
    todo: Vec<u64>,
    execs: Vec<ExecChannel>,
    /// Reads the transport when no other channel does (see `idle_reader`); set up once idle.
    reader: Option<IdleReader>,
    /// Reused read buffer; channels copy out only what they read.
    scratch: Vec<u8>,
    /// The remote listener back to the gateway, on a connection with `respond_to`.
    listener: Option<RemoteListener>,
    /// libssh2 received packets that no step has looked for yet: every forward's libssh2 queue is
    /// checked on the next pass. Otherwise only forwards with local work or something in progress are.
    rescan: bool,
}

impl Channels {
    /// Since when the listener's request has been out unanswered.
    fn listen_pending_since(&self) -> Option<Instant> {
        self.listener.as_ref().and_then(RemoteListener::pending_since)
    }

    /// A connection the server opened to the remote listener: its channel joins the forwards, and a
    /// local task connects to `to` and carries the bytes (one lightweight task, as a forward's local
    /// connection). A gateway that refuses closes the channel, which the launcher sees as a refusal.
    fn carry_response(&mut self, ch: RawChannel, to: std::net::SocketAddr, shared: &Shared) {
        let (to_remote_tx, to_remote_rx) = mpsc::channel::<Vec<u8>>(QUEUE_DEPTH);
        let (from_remote_tx, from_remote_rx) = mpsc::channel::<Vec<u8>>(QUEUE_DEPTH);
        let (nudge, flag) = shared.ready.pair();
        let key = flag.key();
        let stats = shared.responses.clone().expect("a connection with respond_to counts its responses");
        let guard = ChannelGuard::new(stats);
        self.forwards.insert(key, ForwardChannel::new(ch, to_remote_rx, from_remote_tx, guard, flag));
        self.active.push(key);
        let dest = shared.spec.dest();
        tokio::spawn(async move {
            // An address, not a name: connecting never waits on a resolver thread.
            match TcpStream::connect(to).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let (rd, wr) = stream.into_split();
                    carry(rd, wr, to_remote_tx, from_remote_rx, &nudge, || {}, || {}).await;
                }
                Err(e) => warn!("SSH connection {dest}: a connection to the remote forward could not reach {to}: {e}"),
            }
            drop(nudge);
        });
    }

    /// Session channels that may occupy one of the server's MaxSessions slots.
    fn sessions_open(&self) -> usize {
        self.execs.len() + usize::from(self.reader.as_ref().is_some_and(IdleReader::holds_session))
    }

    fn add(&mut self, ch: Opened, req: OpenRequest, shared: &Shared) {
        match (ch, req.target) {
            (Opened::Forward(ch), Target::Forward { to_remote, from_remote, stats, reply, flag, .. }) => {
                // If the caller gave up waiting, its queues are closed too: the channel then sends
                // EOF and closes on its first step, like any finished connection.
                let _ = reply.send(Ok(()));
                let key = flag.key();
                // Whatever the local side raised before now is covered by the first step.
                flag.clear();
                self.forwards.insert(key, ForwardChannel::new(ch, to_remote, from_remote, ChannelGuard::new(stats), flag));
                self.active.push(key);
            }
            (Opened::Session(ch), Target::Exec { command, reply }) => {
                let open = OpenChannel::new(shared.stats.dest().clone());
                self.execs.push(ExecChannel::new(ch, command, reply, req.deadline, shared.spec.dest(), open));
            }
            // The open was chosen by the same request's target.
            _ => unreachable!("channel kind follows the request"),
        }
    }

    /// Lets libssh2 process every packet waiting in the socket (its transport loop runs until the
    /// socket is empty), through the idle reader or, until it is ready, a forward's zero-length read.
    /// This also answers the server's keep-alive probes, channels or not.
    fn drain(&mut self, io: &SshIo, want_write: &mut bool) -> std::result::Result<(), String> {
        match self.reader.as_mut() {
            Some(reader) if reader.is_ready() => reader.read(&io.sess, is_fatal_code),
            _ => {
                for f in self.forwards.values_mut() {
                    if f.drain(io, want_write)? {
                        break;
                    }
                }
                Ok(())
            }
        }
    }

    /// Steps the forwards that may have work, and every remote command. A forward may have work when
    /// its local side raised its flag (`ready`), when it is in the middle of something (see
    /// `ForwardChannel::busy`), or, after libssh2 received packets, when libssh2 holds something for
    /// it. Everything else is left alone: an idle channel costs nothing on a wake-up that is not
    /// about it, and only a flag check on one that followed received packets.
    fn step_all(&mut self, io: &SshIo, ready: &ReadyList, want_write: &mut bool) -> std::result::Result<(), String> {
        if self.scratch.is_empty() {
            self.scratch = vec![0u8; CHUNK];
        }
        let mut fatal = None;
        let rescan = std::mem::take(&mut self.rescan);
        let mut todo = std::mem::take(&mut self.todo);
        todo.append(&mut self.active);
        ready.take(&mut todo);
        if rescan {
            let held = raw_channel::lock(&io.sess);
            todo.extend(self.forwards.iter().filter(|(_, f)| f.may_have_inbound(&held)).map(|(k, _)| *k));
        }
        todo.sort_unstable();
        todo.dedup();
        for key in todo.drain(..) {
            let Some(f) = self.forwards.get_mut(&key) else { continue };
            f.clear_flag();
            if !f.wants_step(rescan) {
                continue;
            }
            match f.step(io, want_write, &mut self.scratch) {
                Step::Continue if f.busy() => self.active.push(key),
                Step::Continue => {}
                Step::Finished => {
                    self.forwards.remove(&key);
                }
                Step::Fatal(cause) => {
                    fatal.get_or_insert(cause);
                    self.forwards.remove(&key);
                }
            }
        }
        self.todo = todo;
        // One `exec` request awaiting its reply at a time (see `ExecChannel::step`); the oldest first.
        let mut requesting = false;
        self.execs.retain_mut(|x| match x.step(io, want_write, &mut self.scratch, !requesting) {
            Step::Continue => {
                requesting |= x.awaiting_reply();
                true
            }
            Step::Finished => false,
            Step::Fatal(cause) => {
                fatal.get_or_insert(cause);
                false
            }
        });
        match fatal {
            Some(cause) => Err(cause),
            None => Ok(()),
        }
    }

    /// Channels for which libssh2 holds something they could act on now (see `Actor::check_settled`).
    fn unread(&self) -> usize {
        self.forwards.values().filter(|f| f.has_unread()).count() + self.execs.iter().filter(|x| x.has_unread()).count()
    }

    fn next_deadline(&self) -> Instant {
        self.execs
            .iter()
            .map(|x| x.deadline())
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
    }
}
