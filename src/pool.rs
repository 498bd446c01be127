//! Which SSH connection a forward or remote command rides on, and when connections close.
//!
//! Shared mode keeps one connection per (user, host, port, credentials) for every kernel's forwards
//! and remote commands; per-port mode gives each forward its own, as Enterprise Gateway's `ssh -L`
//! processes do. A shared connection lingers briefly after its last user so a kernel restart reuses it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use once_cell::sync::Lazy;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::{ConnectSpec, TunnelMode};
use crate::connection::{Connection, OpenRequest, Target};
use crate::error::{Error, Result};
use crate::exec::ExecOutput;
use crate::forward::{bind_local, Forward, ForwardInfo};
use crate::keepalive::{Channel, MAX_KEEP_ALIVE_INTERVAL};
use crate::stats::ForwardStats;

/// How long an unused shared connection stays open.
pub const LINGER: Duration = Duration::from_secs(5);

struct Entry {
    conn: Arc<Connection>,
    /// Forwards attached, for the keep-alive minimum and for status().
    forwards: HashMap<u64, Arc<ForwardInfo>>,
    /// Bumped on every change of the connection's users, so a stale linger timer knows to do nothing.
    generation: u64,
}

impl Entry {
    /// A new connection's entry, counting its first user.
    fn new(conn: Arc<Connection>) -> Self {
        conn.shared.users.store(1, Ordering::Release);
        Entry { conn, forwards: HashMap::new(), generation: 0 }
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

/// Takes a user slot on a connection for `spec`, creating it if needed.
async fn acquire(spec: &ConnectSpec, mode: TunnelMode, interval: u64, count_max: u32) -> Result<Arc<Connection>> {
    if mode == TunnelMode::PerPort {
        let conn = Connection::start(spec.clone(), mode, interval, count_max).await?;
        let mut pool = POOL.lock().unwrap();
        pool.entries.insert(conn.shared.id, Entry::new(conn.clone()));
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
    let conn = Connection::start(spec.clone(), mode, interval, count_max).await;
    let mut pool = POOL.lock().unwrap();
    pool.creating.remove(spec);
    let conn = conn?;
    pool.shared.insert(spec.clone(), conn.shared.id);
    pool.entries.insert(conn.shared.id, Entry::new(conn.clone()));
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
    entry.conn.shared.users.fetch_add(1, Ordering::AcqRel);
    entry.generation += 1;
    Some(entry.conn.clone())
}

/// Gives a user slot back; closes the connection now (per-port) or after LINGER (shared).
async fn release(conn: &Arc<Connection>, forward: Option<u64>) {
    let id = conn.shared.id;
    let close_now = {
        let mut pool = POOL.lock().unwrap();
        let Some(entry) = pool.entries.get_mut(&id) else { return };
        if let Some(f) = forward {
            entry.forwards.remove(&f);
            apply_keep_alive(entry);
        }
        let users = &entry.conn.shared.users;
        let left = users.load(Ordering::Acquire).saturating_sub(1);
        users.store(left, Ordering::Release);
        entry.generation += 1;
        if left > 0 {
            return;
        }
        if conn.shared.mode == TunnelMode::PerPort || !conn.is_alive() {
            // Per-port connections belong to their forward; a dead one has nothing to linger for
            // (and must stop reconnecting now).
            pool.entries.remove(&id);
            if pool.shared.get(&conn.shared.spec) == Some(&id) {
                pool.shared.remove(&conn.shared.spec);
            }
            true
        } else {
            let generation = entry.generation;
            let conn = conn.clone();
            tokio::spawn(async move {
                tokio::time::sleep(LINGER).await;
                let expired = {
                    let mut pool = POOL.lock().unwrap();
                    let idle = pool.entries.get(&id).is_some_and(|e| {
                        e.conn.shared.users.load(Ordering::Acquire) == 0 && e.generation == generation
                    });
                    if idle {
                        pool.entries.remove(&id);
                        if pool.shared.get(&conn.shared.spec) == Some(&id) {
                            pool.shared.remove(&conn.shared.spec);
                        }
                    }
                    idle
                };
                if expired {
                    conn.shutdown().await;
                }
            });
            false
        }
    };
    if close_now {
        conn.shutdown().await;
    }
}

/// A connection probes as often as its most demanding forward needs; with none, never.
fn apply_keep_alive(entry: &Entry) {
    let interval = entry.forwards.values().map(|f| f.keep_alive_interval).min().unwrap_or(MAX_KEEP_ALIVE_INTERVAL as u64);
    let count_max = entry.forwards.values().map(|f| f.count_max).min().unwrap_or(3);
    entry.conn.set_keep_alive(interval, count_max);
}

/// What a new forward needs besides the connection settings.
pub struct ForwardRequest {
    pub channel: Channel,
    pub remote_host: String,
    pub remote_port: u16,
    pub local_port: u16,
    pub keep_alive_interval: u64,
    pub count_max: u32,
    pub kernel_id: Option<String>,
    /// Prove before returning that the server forwards to the target (see `verify_forward`).
    pub verify: bool,
    pub refused_wait: Duration,
}

/// Opens a forward; returns once it listens and its connection is authenticated. On failure
/// nothing stays bound or running.
pub async fn open_forward(spec: &ConnectSpec, mode: TunnelMode, req: ForwardRequest) -> Result<Arc<Forward>> {
    if req.remote_host.is_empty() {
        return Err(Error::Invalid("remote_host must not be empty".into()));
    }
    if req.count_max == 0 {
        return Err(Error::Invalid("keepalive_count_max must be a positive integer, got 0".into()));
    }
    let listener = bind_local(req.local_port).await?;
    let local_port = listener
        .local_addr()
        .map_err(|e| Error::Bind { port: req.local_port, in_use: false, cause: e.to_string() })?
        .port();
    let conn = acquire(spec, mode, req.keep_alive_interval, req.count_max).await?;
    let info = Arc::new(ForwardInfo {
        id: NEXT_FORWARD.fetch_add(1, Ordering::Relaxed),
        channel: req.channel,
        kernel_id: req.kernel_id,
        remote_host: req.remote_host,
        remote_port: req.remote_port,
        local_port,
        keep_alive_interval: req.keep_alive_interval,
        count_max: req.count_max,
        refused_wait: req.refused_wait,
        stats: Arc::new(ForwardStats::default()),
        failing: AtomicBool::new(false),
    });
    {
        let mut pool = POOL.lock().unwrap();
        if let Some(entry) = pool.entries.get_mut(&conn.shared.id) {
            entry.forwards.insert(info.id, info.clone());
            apply_keep_alive(entry);
        }
    }
    let verify = req.verify;
    let fwd = Arc::new(Forward::start(listener, conn, info));
    if verify {
        if let Err(e) = verify_forward(&fwd, VERIFY_WAIT).await {
            close_forward(&fwd).await;
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
        send_request(fwd, br#"{"signum": 0}"#.to_vec(), timeout).await
    } else {
        let conn = &fwd.conn;
        let (to_remote, to_remote_rx) = mpsc::channel(1);
        let (from_remote_tx, from_remote) = mpsc::channel(1);
        // Both queues closed from the start: the channel sends EOF and closes on its first step.
        drop((to_remote, from_remote));
        let (reply, reply_rx) = oneshot::channel();
        conn.open(OpenRequest::new(
            Target::Forward {
                host: fwd.info.remote_host.clone(),
                port: fwd.info.remote_port,
                to_remote: to_remote_rx,
                from_remote: from_remote_tx,
                stats: fwd.info.stats.clone(),
                reply,
            },
            Instant::now() + timeout,
        ));
        conn.wake().notify_one();
        match tokio::time::timeout(timeout + Duration::from_millis(500), reply_rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Other { dest: conn.dest(), cause: "connection closed".into() }),
            Err(_) => Err(Error::Timeout {
                dest: conn.dest(),
                what: format!("test channel to {}:{}", fwd.info.remote_host, fwd.info.remote_port),
                secs: timeout.as_secs_f64(),
            }),
        }
    };
    match outcome {
        Err(Error::Refused { .. }) => Ok(()),
        other => other,
    }
}

/// Terminates a forward and releases its connection. Idempotent.
pub async fn close_forward(fwd: &Forward) {
    if fwd.terminate().await {
        release(&fwd.conn, Some(fwd.info.id)).await;
    }
}

/// Runs `command` on the pooled connection for `spec`, within `timeout`.
pub async fn exec(spec: &ConnectSpec, command: &str, timeout: Duration) -> Result<ExecOutput> {
    let conn = acquire(spec, TunnelMode::Shared, MAX_KEEP_ALIVE_INTERVAL as u64, 3).await?;
    let (reply, rx) = oneshot::channel();
    conn.open(OpenRequest::new(Target::Exec { command: command.to_string(), reply }, Instant::now() + timeout));
    let out = match tokio::time::timeout(timeout + Duration::from_millis(500), rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(Error::Other { dest: conn.dest(), cause: "connection closed".into() }),
        Err(_) => Err(Error::Timeout { dest: conn.dest(), what: "remote command".into(), secs: timeout.as_secs_f64() }),
    };
    release(&conn, None).await;
    out
}

/// Sends one request to the forward's remote port on a fresh channel and waits until the remote end
/// has closed its side: by then the request was delivered. A refusal is reported as `Refused`.
pub async fn send_request(fwd: &Forward, data: Vec<u8>, timeout: Duration) -> Result<()> {
    if fwd.is_terminated() {
        return Err(Error::Other { dest: fwd.conn.dest(), cause: format!("the {} tunnel was terminated", fwd.info.channel) });
    }
    let conn = &fwd.conn;
    if !conn.is_alive() {
        // Liveness unknown: report it at once rather than queue a stale request until reconnection.
        let cause = conn.shared.last_error.lock().unwrap().clone().unwrap_or_else(|| "reconnecting".into());
        return Err(Error::Down { dest: conn.dest(), cause });
    }
    let (to_remote, to_remote_rx) = mpsc::channel(1);
    let (from_remote_tx, mut from_remote) = mpsc::channel(4);
    let (reply, reply_rx) = oneshot::channel();
    let deadline = Instant::now() + timeout;
    conn.open(OpenRequest::new(
        Target::Forward {
            host: fwd.info.remote_host.clone(),
            port: fwd.info.remote_port,
            to_remote: to_remote_rx,
            from_remote: from_remote_tx,
            stats: fwd.info.stats.clone(),
            reply,
        },
        deadline,
    ));
    let timed_out = || Error::Timeout {
        dest: conn.dest(),
        what: format!("request to {}:{}", fwd.info.remote_host, fwd.info.remote_port),
        secs: timeout.as_secs_f64(),
    };
    let work = async {
        reply_rx.await.map_err(|_| Error::Other { dest: conn.dest(), cause: "connection closed".into() })??;
        let _ = to_remote.send(data).await;
        drop(to_remote);
        conn.wake().notify_one();
        // Drain until the remote end closes; the launcher closes after handling the request.
        while from_remote.recv().await.is_some() {
            conn.wake().notify_one();
        }
        Ok(())
    };
    tokio::time::timeout_at(deadline, work).await.unwrap_or_else(|_| Err(timed_out()))
}

/// A snapshot of one live connection for status().
pub struct ConnectionStatus {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub mode: &'static str,
    pub alive: bool,
    pub reconnects: u64,
    pub keep_alive_interval: u64,
    pub keepalives_sent: u64,
    pub last_error: Option<String>,
    pub session_budget: usize,
    pub session_refusals: u64,
    pub forwards: Vec<Arc<ForwardInfo>>,
}

pub fn status() -> Vec<ConnectionStatus> {
    let pool = POOL.lock().unwrap();
    let mut out: Vec<_> = pool
        .entries
        .values()
        .map(|e| {
            let s = &e.conn.shared;
            let mut forwards: Vec<_> = e.forwards.values().cloned().collect();
            forwards.sort_by_key(|f| f.id);
            ConnectionStatus {
                user: s.spec.user.clone(),
                host: s.spec.host.clone(),
                port: s.spec.port,
                mode: s.mode.as_str(),
                alive: e.conn.is_alive(),
                reconnects: s.reconnects.load(Ordering::Relaxed),
                keep_alive_interval: s.interval.load(Ordering::Relaxed),
                keepalives_sent: s.keepalives_sent.load(Ordering::Relaxed),
                last_error: s.last_error.lock().unwrap().clone(),
                session_budget: s.session_budget.load(Ordering::Relaxed),
                session_refusals: s.session_refusals.load(Ordering::Relaxed),
                forwards,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    out
}
