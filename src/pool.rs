//! Which SSH connection a forward or remote command rides on, and when connections close.
//!
//! Shared mode keeps one connection per (user, host, port, credentials) for every kernel's forwards
//! and remote commands; per-port mode gives each forward its own, as Enterprise Gateway's `ssh -L`
//! processes do. A shared connection lingers briefly after its last user so a kernel restart reuses it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use once_cell::sync::Lazy;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::{ConnectSpec, TunnelMode};
use crate::connection::{Connection, OpenRequest, Target};
use crate::error::{Error, Result};
use crate::exec::ExecOutput;
use crate::forward::{bind_local, Forward, ForwardInfo, LocalGate, LocalLimits};
use crate::forward_channel::DirectTcpip;
use crate::jump::{HopConnection, Hops};
use crate::keepalive::{Channel, KeepAlive};
use crate::metrics::{self, ForwardStats};
use crate::random;
use crate::ready::Nudge;

/// How long an unused shared connection stays open.
pub const LINGER: Duration = Duration::from_secs(5);

struct Entry {
    conn: Arc<Connection>,
    /// Forwards attached, for the keep-alive minimum and for status().
    forwards: HashMap<u64, Arc<ForwardInfo>>,
    /// Sessions relayed through this connection (it is their ProxyJump hop), with the keep-alive
    /// policy each wants applied to the hop as well.
    relays: HashMap<u64, KeepAlive>,
    /// Bumped on every change of the connection's users, so a stale linger timer knows to do nothing.
    generation: u64,
}

impl Entry {
    /// A new connection's entry, counting its first user.
    fn new(conn: Arc<Connection>) -> Self {
        conn.set_users(1);
        Entry { conn, forwards: HashMap::new(), relays: HashMap::new(), generation: 0 }
    }
}

#[derive(Default)]
struct Pool {
    entries: HashMap<u64, Entry>,
    shared: HashMap<ConnectSpec, u64>,
    /// Serialises the first connection per destination so concurrent kernels share it.
    creating: HashMap<ConnectSpec, Arc<tokio::sync::Mutex<()>>>,
}

static POOL: Lazy<Mutex<Pool>> = Lazy::new(Mutex::default);
static NEXT_FORWARD: AtomicU64 = AtomicU64::new(1);
static NEXT_RELAY: AtomicU64 = AtomicU64::new(1);

/// Where sessions through a ProxyJump hop get the hop's connection: this pool (see `jump`).
struct PoolHops;

/// A relayed session's user slot on its hop's pooled connection.
struct PooledHop {
    conn: Arc<Connection>,
    /// The relay's key in the hop entry's keep-alive table.
    id: u64,
}

impl Hops for PoolHops {
    fn acquire(&self, hop: &ConnectSpec, keep_alive: KeepAlive) -> BoxFuture<'static, Result<Box<dyn HopConnection>>> {
        let hop = hop.clone();
        Box::pin(async move {
            let (conn, id) = acquire_relay(&hop, keep_alive).await?;
            Ok(Box::new(PooledHop { conn, id }) as Box<dyn HopConnection>)
        })
    }
}

impl HopConnection for PooledHop {
    fn dest(&self) -> String {
        self.conn.dest()
    }

    fn open_channel(&self, open: DirectTcpip, deadline: Instant) -> (oneshot::Receiver<Result<()>>, Nudge) {
        self.conn.open_channel(open, deadline)
    }

    fn set_keep_alive(&self, keep_alive: KeepAlive) {
        relay_keep_alive(&self.conn, self.id, Some(keep_alive));
    }

    fn release(&self) {
        release_relay(&self.conn, self.id);
    }
}

/// The pool as every connection it starts (and their lanes) reaches ProxyJump hops.
pub fn hops() -> Arc<dyn Hops> {
    static HOPS: Lazy<Arc<dyn Hops>> = Lazy::new(|| Arc::new(PoolHops));
    HOPS.clone()
}

/// Takes a user slot on a connection for `spec`, creating it if needed.
async fn acquire(spec: &ConnectSpec, mode: TunnelMode, keep_alive: KeepAlive) -> Result<Arc<Connection>> {
    if mode == TunnelMode::PerPort {
        // A forward's own connection: the remote listener lives on the host's shared one.
        let own = ConnectSpec { respond_to: None, ..spec.clone() };
        let conn = Connection::start(own, mode, keep_alive, hops()).await?;
        let mut pool = POOL.lock().unwrap();
        pool.entries.insert(conn.id(), Entry::new(conn.clone()));
        return Ok(conn);
    }
    let gate = {
        let mut pool = POOL.lock().unwrap();
        if let Some(conn) = take_shared(&mut pool, spec) {
            return Ok(conn);
        }
        pool.creating.entry(spec.clone()).or_default().clone()
    };
    let _turn = gate.lock().await;
    if let Some(conn) = take_shared(&mut POOL.lock().unwrap(), spec) {
        return Ok(conn);
    }
    let max_lanes = match crate::lanes::max_lanes() {
        Ok(n) => n,
        Err(e) => {
            POOL.lock().unwrap().creating.remove(spec);
            return Err(e);
        }
    };
    let t0 = Instant::now();
    let conn = Connection::start(spec.clone(), mode, keep_alive, hops()).await;
    let mut pool = POOL.lock().unwrap();
    pool.creating.remove(spec);
    let conn = conn?;
    pool.shared.insert(spec.clone(), conn.id());
    pool.entries.insert(conn.id(), Entry::new(conn.clone()));
    crate::lanes::register(&conn, max_lanes, keep_alive, t0.elapsed());
    Ok(conn)
}

fn take_shared(pool: &mut Pool, spec: &ConnectSpec) -> Option<Arc<Connection>> {
    let id = *pool.shared.get(spec)?;
    let entry = pool.entries.get_mut(&id)?;
    if !entry.conn.is_alive() {
        // Down (reconnecting for its own forwards, or stopped on a changed host key): a new user gets
        // a fresh connection, so its start reports the real cause instead of hanging on the old one.
        return None;
    }
    entry.conn.add_user();
    entry.generation += 1;
    Some(entry.conn.clone())
}

/// Gives a user slot back. Bookkeeping only, so status() is right at once: a connection that is now
/// unused is closed in the background, at once (per-port, or dead) or after LINGER (shared).
fn release(conn: &Arc<Connection>, forward: Option<u64>) {
    let id = conn.id();
    let mut pool = POOL.lock().unwrap();
    let Some(entry) = pool.entries.get_mut(&id) else { return };
    if let Some(f) = forward {
        entry.forwards.remove(&f);
        apply_keep_alive(entry);
    }
    let left = entry.conn.users().saturating_sub(1);
    entry.conn.set_users(left);
    entry.generation += 1;
    if left > 0 {
        return;
    }
    if conn.mode() == TunnelMode::PerPort || !conn.is_alive() {
        // Per-port connections belong to their forward; a dead one has nothing to linger for
        // (and must stop reconnecting now).
        pool.entries.remove(&id);
        if pool.shared.get(conn.spec()) == Some(&id) {
            pool.shared.remove(conn.spec());
        }
        crate::lanes::unregister(id);
        let conn = conn.clone();
        crate::runtime::spawn(async move { conn.shutdown().await });
        return;
    }
    let generation = entry.generation;
    let conn = conn.clone();
    crate::runtime::spawn(async move {
        tokio::time::sleep(LINGER).await;
        let expired = {
            let mut pool = POOL.lock().unwrap();
            let idle = pool.entries.get(&id).is_some_and(|e| {
                e.conn.users() == 0 && e.generation == generation
            });
            if idle {
                pool.entries.remove(&id);
                if pool.shared.get(conn.spec()) == Some(&id) {
                    pool.shared.remove(conn.spec());
                }
                crate::lanes::unregister(id);
            }
            idle
        };
        if expired {
            conn.shutdown().await;
        }
    });
}

/// A connection (and each of its lanes) applies the strictest keep-alive its forwards and relayed
/// sessions want; with none, never.
fn apply_keep_alive(entry: &Entry) {
    let forwards = entry.forwards.values().map(|f| f.keep_alive);
    let keep_alive = KeepAlive::strictest(forwards.chain(entry.relays.values().copied()));
    entry.conn.set_keep_alive(keep_alive);
    crate::lanes::set_keep_alive(entry.conn.id(), keep_alive);
}

/// Takes a user slot on the shared connection for `spec` (diagnostics); give it back with `release_shared`.
pub async fn acquire_shared(spec: &ConnectSpec) -> Result<Arc<Connection>> {
    acquire(spec, TunnelMode::Shared, KeepAlive::NEVER).await
}

pub fn release_shared(conn: &Arc<Connection>) {
    release(conn, None);
}

/// A user slot on the shared connection for `spec` (which has `respond_to`) and the port of its
/// remote listener on the host's loopback, within `timeout`; give the slot back with `release_shared`.
pub async fn response_lease(spec: &ConnectSpec, timeout: Duration) -> Result<(Arc<Connection>, u16)> {
    let deadline = Instant::now() + timeout;
    let conn = tokio::time::timeout_at(deadline, acquire_shared(spec))
        .await
        .unwrap_or_else(|_| Err(Error::Timeout { dest: spec.dest(), what: "connecting".into(), secs: timeout.as_secs_f64() }))?;
    match conn.response_port(deadline).await {
        Ok(port) => Ok((conn, port)),
        Err(e) => {
            release_shared(&conn);
            Err(match e {
                Error::Timeout { dest, what, .. } => Error::Timeout { dest, what, secs: timeout.as_secs_f64() },
                e => e,
            })
        }
    }
}

/// Takes a user slot on the shared connection to a ProxyJump hop for one relayed session.
async fn acquire_relay(spec: &ConnectSpec, keep_alive: KeepAlive) -> Result<(Arc<Connection>, u64)> {
    let conn = acquire(spec, TunnelMode::Shared, keep_alive).await?;
    let id = NEXT_RELAY.fetch_add(1, Ordering::Relaxed);
    relay_keep_alive(&conn, id, Some(keep_alive));
    Ok((conn, id))
}

/// Records (or with None forgets) what keep-alive a relayed session wants from its hop.
fn relay_keep_alive(conn: &Connection, relay: u64, wanted: Option<KeepAlive>) {
    let mut pool = POOL.lock().unwrap();
    if let Some(entry) = pool.entries.get_mut(&conn.id()) {
        match wanted {
            Some(w) => entry.relays.insert(relay, w),
            None => entry.relays.remove(&relay),
        };
        apply_keep_alive(entry);
    }
}

/// The relayed session ended: its hop may close once nobody else uses it.
fn release_relay(conn: &Arc<Connection>, relay: u64) {
    relay_keep_alive(conn, relay, None);
    release(conn, None);
}

/// What a new forward needs besides the connection settings.
#[derive(Clone)]
pub struct ForwardRequest {
    pub channel: Channel,
    pub remote_host: String,
    pub remote_port: u16,
    pub local_port: u16,
    pub keep_alive: KeepAlive,
    pub kernel_id: Option<String>,
    /// Prove before returning that the server forwards to the target (see `verify_forward`).
    pub verify: bool,
    pub refused_wait: Duration,
    /// Reserve the local port instead of listening on it (see `LocalPort::Reserved`): for a forward
    /// whose remote port only egtunnel's requests reach.
    pub reserved: bool,
    pub limits: LocalLimits,
}

/// Opens a forward; returns once its local port is bound (and listens, unless reserved) and its
/// connection is authenticated. On failure nothing stays bound or running.
pub async fn open_forward(spec: &ConnectSpec, mode: TunnelMode, req: ForwardRequest) -> Result<Arc<Forward>> {
    if req.remote_host.is_empty() {
        return Err(Error::Invalid("remote_host must not be empty".into()));
    }
    if req.keep_alive.count_max == 0 {
        return Err(Error::Invalid("keepalive_count_max must be a positive integer, got 0".into()));
    }
    req.limits.check()?;
    let local = bind_local(req.local_port, req.reserved).await?;
    let local_port = local.port().map_err(|e| Error::Bind { port: req.local_port, in_use: false, cause: e.to_string() })?;
    let conn = acquire(spec, mode, req.keep_alive).await?;
    let info = Arc::new(ForwardInfo {
        id: NEXT_FORWARD.fetch_add(1, Ordering::Relaxed),
        channel: req.channel,
        kernel_id: req.kernel_id,
        remote_host: req.remote_host,
        remote_port: req.remote_port,
        local_port,
        keep_alive: req.keep_alive,
        refused_wait: req.refused_wait,
        listened: AtomicBool::new(false),
        stats: Arc::new(ForwardStats::new(conn.totals().clone())),
        failing: AtomicBool::new(false),
        liveness: Default::default(),
        reserved: local.is_reserved(),
        gate: LocalGate::new(req.limits),
    });
    {
        let mut pool = POOL.lock().unwrap();
        if let Some(entry) = pool.entries.get_mut(&conn.id()) {
            entry.forwards.insert(info.id, info.clone());
            apply_keep_alive(entry);
        }
    }
    let verify = req.verify;
    let fwd = Arc::new(Forward::start(local, conn, info));
    if verify {
        if let Err(e) = verify_forward(&fwd, VERIFY_WAIT).await {
            close_forward(&fwd);
            return Err(e);
        }
    }
    Ok(fwd)
}

/// How long `verify_forward` waits for the server's answer.
const VERIFY_WAIT: Duration = Duration::from_secs(10);

/// Opens one channel to the forward's target and closes it again, so that a server that forbids
/// forwarding there (AllowTcpForwarding no, PermitOpen, DisableForwarding) fails the open now instead
/// of every later connection. A target that refuses is fine: a kernel reports its ports before it
/// listens on them. The launcher's comm port gets a liveness poll rather than an empty connection,
/// which a launcher would try to parse as a request.
pub async fn verify_forward(fwd: &Forward, timeout: Duration) -> Result<()> {
    let outcome = if fwd.info.channel == Channel::EgComm {
        let _in_flight = fwd.begin_request();
        first_request(fwd, br#"{"signum": 0}"#.to_vec(), timeout).await
    } else {
        let conn = &fwd.conn;
        let (to_remote, to_remote_rx) = mpsc::channel(1);
        let (from_remote_tx, from_remote) = mpsc::channel(1);
        // Both queues closed from the start: the channel sends EOF and closes on its first step.
        drop((to_remote, from_remote));
        // Any lane will do: this channel carries nothing, and the kernel's later connections may open
        // on any lane too.
        let opening = crate::lanes::open_channel(conn, fwd.info.direct_tcpip(to_remote_rx, from_remote_tx), Instant::now() + timeout);
        match tokio::time::timeout(timeout + Duration::from_millis(500), opening.wait()).await {
            Ok(r) => r.map(drop),
            Err(_) => Err(Error::Timeout {
                dest: conn.dest(),
                what: format!("test channel to {}:{}", fwd.info.remote_host, fwd.info.remote_port),
                secs: timeout.as_secs_f64(),
            }),
        }
    };
    match outcome {
        Err(Error::Refused { .. }) => Ok(()),
        Ok(()) => {
            fwd.info.listened.store(true, Ordering::Release);
            Ok(())
        }
        other => other,
    }
}

/// Closes a forward: its port is free when this returns, and nothing here waits on the network.
/// Accepted bytes and requests in flight drain in the background before the connection is released.
/// Idempotent.
/// Runs on the caller's thread (any thread), never waiting for the runtime.
pub fn close_forward(fwd: &Arc<Forward>) {
    if !fwd.close_listener() {
        return;
    }
    if fwd.is_drained() {
        release(&fwd.conn, Some(fwd.info.id));
        return;
    }
    let fwd = fwd.clone();
    crate::runtime::spawn(async move {
        fwd.finish().await;
        release(&fwd.conn, Some(fwd.info.id));
    });
}

/// Runs `command` on the pooled connection for `spec`, within `timeout`.
pub async fn exec(spec: &ConnectSpec, command: &str, timeout: Duration) -> Result<ExecOutput> {
    let conn = acquire(spec, TunnelMode::Shared, KeepAlive::NEVER).await?;
    let (reply, rx) = oneshot::channel();
    // Latency as the connection serves it (queueing for a session slot included), not the handshake.
    let queued = Instant::now();
    conn.open(OpenRequest::new(Target::Exec { command: command.to_string(), reply }, Instant::now() + timeout));
    let out = match tokio::time::timeout(timeout + Duration::from_millis(500), rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(Error::Other { dest: conn.dest(), cause: "connection closed".into() }),
        Err(_) => Err(Error::Timeout { dest: conn.dest(), what: "remote command".into(), secs: timeout.as_secs_f64() }),
    };
    conn.totals().command_done(queued.elapsed(), out.is_ok());
    release(&conn, None);
    out
}

/// A request (see `requests::deliver`) for a forward not handed out yet: no other request to its port can be under way, so
/// there is no order to keep and any lane will do (see `lanes`).
async fn first_request(fwd: &Forward, data: Vec<u8>, timeout: Duration) -> Result<()> {
    let conn = &fwd.conn;
    let (to_remote, to_remote_rx) = mpsc::channel(1);
    to_remote.try_send(data).expect("an empty queue of one takes one message");
    drop(to_remote); // EOF after the request
    let (from_remote_tx, mut from_remote) = mpsc::channel(4);
    let deadline = Instant::now() + timeout;
    let opening = crate::lanes::open_channel(conn, fwd.info.direct_tcpip(to_remote_rx, from_remote_tx), deadline);
    let work = async {
        let lane = opening.wait().await?;
        // Drain until the remote end closes; the launcher closes after handling the request.
        while from_remote.recv().await.is_some() {
            lane.nudge().raise();
        }
        Ok(())
    };
    tokio::time::timeout_at(deadline, work).await.unwrap_or_else(|_| {
        Err(Error::Timeout {
            dest: conn.dest(),
            what: format!("request to {}:{}", fwd.info.remote_host, fwd.info.remote_port),
            secs: timeout.as_secs_f64(),
        })
    })
}

/// A request whose channel open is queued on the connection; `finish` waits for its outcome.
pub struct PendingRequest {
    conn: Arc<Connection>,
    reply: oneshot::Receiver<Result<()>>,
    from_remote: mpsc::Receiver<Vec<u8>>,
    nudge: Nudge,
    deadline: Instant,
    target: String,
    timeout: Duration,
}

/// Queues the request's channel open now, on the caller's thread (the connection opens channels first
/// come, first served, and the data and EOF go out as soon as the channel is open); `finish` waits
/// until the remote end has closed its side: by then the request was delivered. A refusal is reported
/// as `Refused`. The caller holds the forward's `begin_request` guard, so closing the forward
/// meanwhile lets the request finish first.
pub fn start_request(fwd: &Forward, data: Vec<u8>, timeout: Duration) -> Result<PendingRequest> {
    let conn = fwd.conn.clone();
    if !conn.is_alive() {
        // Liveness unknown: report it at once rather than queue a stale request until reconnection.
        let cause = conn.last_error().unwrap_or_else(|| "reconnecting".into());
        return Err(Error::Down { dest: conn.dest(), cause });
    }
    let (to_remote, to_remote_rx) = mpsc::channel(1);
    to_remote.try_send(data).expect("an empty queue of one takes one message");
    drop(to_remote); // EOF after the request
    let (from_remote_tx, from_remote) = mpsc::channel(4);
    let deadline = Instant::now() + timeout;
    let (reply_rx, nudge) = open_to_target(fwd, to_remote_rx, from_remote_tx, deadline);
    let target = format!("{}:{}", fwd.info.remote_host, fwd.info.remote_port);
    Ok(PendingRequest { conn, reply: reply_rx, from_remote, nudge, deadline, target, timeout })
}

/// Queues a channel to the forward's target on its connection; resolves with the open's outcome.
fn open_to_target(
    fwd: &Forward,
    to_remote: mpsc::Receiver<Vec<u8>>,
    from_remote: mpsc::Sender<Vec<u8>>,
    deadline: Instant,
) -> (oneshot::Receiver<Result<()>>, Nudge) {
    let opened = fwd.conn.open_channel(fwd.info.direct_tcpip(to_remote, from_remote), deadline);
    // No extra wake-up: the queued command wakes the actor, and the data and EOF already queued go
    // out on the new channel's first step.
    opened
}

impl PendingRequest {
    /// The request's outcome, and whether the remote end took the connection but never answered: the
    /// channel opened, the timeout came before the remote close.
    pub async fn finish(self) -> (Result<()>, bool) {
        let PendingRequest { conn, reply, mut from_remote, nudge, deadline, target, timeout } = self;
        let opened = AtomicBool::new(false);
        let work = async {
            reply.await.map_err(|_| Error::Other { dest: conn.dest(), cause: "connection closed".into() })??;
            opened.store(true, Ordering::Relaxed);
            // Drain until the remote end closes; the launcher closes after handling the request.
            while from_remote.recv().await.is_some() {
                nudge.raise();
            }
            Ok(())
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(outcome) => (outcome, false),
            Err(_) => {
                let what = format!("request to {target}");
                (Err(Error::Timeout { dest: conn.dest(), what, secs: timeout.as_secs_f64() }), opened.load(Ordering::Relaxed))
            }
        }
    }
}

/// A kernel's forwards as one unit: where each goes, and the local port range they must use.
pub struct KernelPlan {
    pub forwards: Vec<ForwardRequest>,
    /// Inclusive local port range; (0, 0) lets the system pick any free port.
    pub port_range: (u16, u16),
    /// Candidate ports tried per forward before giving up on the range.
    pub bind_attempts: u32,
    /// Prove each forward with a test channel before returning (see `verify_forward`).
    pub verify: bool,
}

/// Forwards opened so far by `open_kernel_forwards`; closed again unless the whole set came up,
/// including when the caller stops waiting (a cancelled open drops this).
struct Opened(std::sync::Mutex<Vec<Arc<Forward>>>);

impl Opened {
    fn push(&self, fwd: Arc<Forward>) {
        self.0.lock().unwrap().push(fwd);
    }

    fn take(&self) -> Vec<Arc<Forward>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        for fwd in self.take() {
            close_forward(&fwd);
        }
    }
}

/// Opens a kernel's forwards, all or nothing: concurrently (in shared mode after the first, which
/// brings up or reuses the host's connection, so that a failing host costs one handshake and reports
/// one cause), each on a local port within the range, retrying ports taken meanwhile. On failure
/// every forward opened is closed again and the error names each channel that failed.
pub async fn open_kernel_forwards(spec: &ConnectSpec, mode: TunnelMode, plan: KernelPlan) -> Result<Vec<Arc<Forward>>> {
    let (lo, hi) = plan.port_range;
    if lo > hi || (lo == 0) != (hi == 0) {
        return Err(Error::Invalid(format!("port_range must be (0, 0) or (lower, upper) with 0 < lower <= upper, got ({lo}, {hi})")));
    }
    if plan.bind_attempts == 0 {
        return Err(Error::Invalid("bind_attempts must be a positive integer, got 0".into()));
    }
    let opened = Opened(std::sync::Mutex::new(Vec::new()));
    let taken = std::sync::Mutex::new(std::collections::HashSet::new());
    let n = plan.forwards.len();
    let split = if mode == TunnelMode::Shared && n > 1 { 1 } else { 0 };
    let (first, rest) = plan.forwards.split_at(split);
    let mut failures: Vec<(Channel, Error)> = Vec::new();
    for group in [first, rest] {
        let outcomes = futures::future::join_all(group.iter().map(|req| async {
            let r = open_in_range(spec, mode, req, (lo, hi), plan.bind_attempts, &taken).await;
            r.map(|fwd| opened.push(fwd))
        }))
        .await;
        failures.extend(group.iter().zip(outcomes).filter_map(|(req, o)| o.err().map(|e| (req.channel, e))));
        if !failures.is_empty() {
            break;
        }
    }
    if failures.is_empty() && plan.verify {
        let forwards = opened.0.lock().unwrap().clone();
        let outcomes = futures::future::join_all(forwards.iter().map(|f| verify_forward(f, VERIFY_WAIT))).await;
        failures.extend(forwards.iter().zip(outcomes).filter_map(|(f, o)| o.err().map(|e| (f.info.channel, e))));
    }
    if !failures.is_empty() {
        return Err(Error::channels(failures));
    }
    let mut forwards = opened.take();
    // The caller's order, whatever order the opens finished in.
    forwards.sort_by_key(|f| plan.forwards.iter().position(|r| r.channel == f.info.channel));
    Ok(forwards)
}

/// One forward on a free local port within `range` ((0, 0): any port).
async fn open_in_range(
    spec: &ConnectSpec,
    mode: TunnelMode,
    req: &ForwardRequest,
    range: (u16, u16),
    attempts: u32,
    taken: &std::sync::Mutex<std::collections::HashSet<u16>>,
) -> Result<Arc<Forward>> {
    if range == (0, 0) {
        return open_forward(spec, mode, ForwardRequest { local_port: 0, ..req.clone() }).await;
    }
    let mut seed = random::seed(req.remote_port);
    for _ in 0..attempts {
        let Some(candidate) = pick_port(range, &mut seed, &taken.lock().unwrap()) else { break };
        taken.lock().unwrap().insert(candidate);
        match open_forward(spec, mode, ForwardRequest { local_port: candidate, ..req.clone() }).await {
            // Taken by someone else between the check and the bind: try another.
            Err(Error::Bind { .. }) => continue,
            other => return other,
        }
    }
    Err(Error::Bind {
        port: range.0,
        in_use: true,
        cause: format!("no free local port within the range {}..{} after {attempts} attempts", range.0, range.1),
    })
}

/// A port of `range` that no forward of this kernel took and nothing listens on (tested like
/// Enterprise Gateway does, on all interfaces, since kernels and other services share the range):
/// the first such port from a random start, so that every free port is found and kernels spread out.
fn pick_port(range: (u16, u16), seed: &mut u64, taken: &std::collections::HashSet<u16>) -> Option<u16> {
    let span = u64::from(range.1 - range.0) + 1;
    *seed = random::splitmix(*seed);
    let start = *seed % span;
    (0..span.min(4096))
        .map(|k| range.0 + ((start + k) % span) as u16)
        .find(|p| !taken.contains(p) && std::net::TcpListener::bind(("0.0.0.0", *p)).is_ok())
}

/// A snapshot of one live connection for status().
pub struct ConnectionStatus {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub mode: &'static str,
    /// 0 for the destination's pool connection, 1.. for its extra lanes (see `lanes`).
    pub lane: usize,
    pub alive: bool,
    /// "connected", "reconnecting" or "stopped" (reconnecting gave up: host key, credentials).
    pub state: &'static str,
    pub reconnects: u64,
    pub keep_alive_interval: u64,
    pub keepalives_sent: u64,
    pub keepalives_unanswered: u64,
    pub last_error: Option<String>,
    pub session_budget: usize,
    pub session_refusals: u64,
    /// Idle moments with unread packets found (EGTUNNEL_CHECK_SETTLED=1 only; 0 by construction).
    pub unsettled_sleeps: u64,
    /// The ProxyJump hop this connection runs through.
    pub via: Option<String>,
    /// Sessions relayed through this connection (it is their hop).
    pub relays: usize,
    /// Forwards, commands in flight and other holds keeping the connection open (0: it lingers).
    pub users: usize,
    /// The remote forward back to the gateway: its port on the host's 127.0.0.1, once listening.
    pub remote_forward: Option<u16>,
    pub forwards: Vec<Arc<ForwardInfo>>,
}

/// What a metrics scrape reads from the live connections.
impl metrics::LiveConnection for ConnectionStatus {
    fn dest_key(&self) -> metrics::DestKey {
        metrics::DestKey { user: self.user.clone(), host: self.host.clone(), port: self.port }
    }

    fn state(&self) -> &str {
        self.state
    }

    fn keepalives_unanswered(&self) -> u64 {
        self.keepalives_unanswered
    }

    fn channels(&self) -> Vec<Channel> {
        self.forwards.iter().map(|f| f.channel).collect()
    }
}

pub fn status() -> Vec<ConnectionStatus> {
    let pool = POOL.lock().unwrap();
    let mut out = Vec::new();
    for e in pool.entries.values() {
        let mut forwards: Vec<_> = e.forwards.values().cloned().collect();
        forwards.sort_by_key(|f| f.id);
        out.push(connection_status(&e.conn, 0, e.relays.len(), forwards));
        // Extra lanes carry channels of the forwards listed on lane 0.
        for (lane, conn) in crate::lanes::extra_lanes(e.conn.id()) {
            out.push(connection_status(&conn, lane, 0, Vec::new()));
        }
    }
    out.sort_by(|a, b| (&a.host, a.port, a.lane).cmp(&(&b.host, b.port, b.lane)));
    out
}

fn connection_status(conn: &Connection, lane: usize, relays: usize, forwards: Vec<Arc<ForwardInfo>>) -> ConnectionStatus {
    let spec = conn.spec();
    let s = conn.snapshot();
    ConnectionStatus {
        user: spec.user.clone(),
        host: spec.host.clone(),
        port: spec.port,
        mode: conn.mode().as_str(),
        lane,
        alive: s.alive,
        state: s.state,
        reconnects: s.counts.reconnects,
        keep_alive_interval: s.keep_alive_interval,
        keepalives_sent: s.counts.keepalives_sent,
        keepalives_unanswered: s.counts.keepalives_unanswered,
        last_error: s.last_error,
        session_budget: s.session_budget,
        session_refusals: s.counts.session_refusals,
        unsettled_sleeps: s.counts.unsettled_sleeps,
        via: spec.jump.as_ref().map(|j| j.dest()),
        relays,
        users: conn.users(),
        remote_forward: s.remote_forward,
        forwards,
    }
}
