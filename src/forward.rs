//! Local port forwarding: a listener on 127.0.0.1 whose every accepted connection gets its own
//! direct-tcpip channel, with bytes pumped both ways and half-close carried across.
//!
//! Each local connection is one lightweight task (no thread) running `forward_channel::carry`; the
//! SSH side of it is a `ForwardChannel` stepped by the connection actor, which owns the session.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, warn};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::forward_channel::{carry, DirectTcpip, QUEUE_DEPTH};
use crate::keepalive::{Channel, KeepAlive};
use crate::lanes::LaneUse;
use crate::liveness::Liveness;
use crate::metrics::{ActiveGuard, ChannelGuard, ForwardStats};

/// How long a local connection waits for its channel (covers a reconnecting SSH link).
pub const OPEN_WAIT: Duration = Duration::from_secs(10);
/// Default for how long a local connection is held while the remote port refuses. A kernel's launcher
/// reports its ports before the kernel listens on them; holding the connection (instead of closing
/// it, which makes ZMQ back off and reconnect) lets subscriptions go through the moment the kernel is up.
pub const REFUSED_WAIT: Duration = Duration::from_secs(30);
/// First and longest pause between channel opens to a port that refuses.
const REFUSED_RETRY_FIRST: Duration = Duration::from_millis(10);
const REFUSED_RETRY_MAX: Duration = Duration::from_millis(200);
/// After a forward is closed, how long its accepted bytes and requests in flight may take to reach
/// the remote end before their channels are cut. This runs in the background: closing returns at once.
const DRAIN_WAIT: Duration = Duration::from_secs(15);

/// Identity and settings of one forward, shared with status().
pub struct ForwardInfo {
    pub id: u64,
    pub channel: Channel,
    pub kernel_id: Option<String>,
    pub remote_host: String,
    pub remote_port: u16,
    pub local_port: u16,
    /// What this forward wants from its connection (which applies the strictest of its users').
    pub keep_alive: KeepAlive,
    /// How long a local connection is held while the target refuses (see `REFUSED_WAIT`), as long as
    /// the target never accepted a channel: once it has, a refusal means it is gone, and the local
    /// connection is closed at once as a direct connection would be refused (a dead kernel's ZMQ
    /// sockets reconnect every 100 ms; holding each would keep sshd and the runtime busy for nothing).
    pub refused_wait: Duration,
    /// Set by the first channel the target accepted.
    pub listened: AtomicBool,
    pub stats: Arc<ForwardStats>,
    /// Set after a failed channel open was logged at warning; cleared by the next success. A dead
    /// kernel's ZMQ sockets retry many times a second, and one warning per outage says it all.
    pub failing: AtomicBool,
    /// What listens behind the forward, as the last request found it (see `requests`).
    pub liveness: Liveness,
}

impl ForwardInfo {
    /// A channel to this forward's target whose bytes flow through the given queues.
    pub fn direct_tcpip(&self, to_remote: mpsc::Receiver<Vec<u8>>, from_remote: mpsc::Sender<Vec<u8>>) -> DirectTcpip {
        DirectTcpip { host: self.remote_host.clone(), port: self.remote_port, to_remote, from_remote, stats: self.stats.clone() }
    }
}

/// A listening forward. Closing it is two steps: `close_listener` (synchronous: the port is free when
/// it returns, and nothing waits for the runtime or the network) and `finish` (drains in the background).
pub struct Forward {
    pub info: Arc<ForwardInfo>,
    pub conn: Arc<Connection>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Shared with the accept loop, which polls it under the lock; closing takes it out and drops it
    /// on the caller's thread, so a busy runtime cannot delay freeing the port.
    listener: Arc<Mutex<Option<TcpListener>>>,
    terminated: AtomicBool,
}

impl Forward {
    /// Starts serving an already bound listener over `conn`.
    pub fn start(listener: TcpListener, conn: Arc<Connection>, info: Arc<ForwardInfo>) -> Forward {
        let (stop, stop_rx) = watch::channel(false);
        let listener = Arc::new(Mutex::new(Some(listener)));
        let task = tokio::spawn(accept_loop(listener.clone(), conn.clone(), info.clone(), stop_rx));
        Forward { info, conn, stop, task: Mutex::new(Some(task)), listener, terminated: AtomicBool::new(false) }
    }

    /// Counts a request to the remote port as one of this forward's channels until the guard drops,
    /// so that closing the forward lets it finish first. None once the forward is terminated.
    pub fn begin_request(&self) -> Option<ChannelGuard> {
        (!self.is_terminated()).then(|| ChannelGuard::new(self.info.stats.clone()))
    }

    pub fn is_terminated(&self) -> bool {
        self.terminated.load(Ordering::Acquire)
    }

    /// Stops accepting and frees the local port; local connections hand their queues to the actor.
    /// Runs on the caller's thread and returns in microseconds, however busy the runtime or the SSH
    /// connection. False if the forward had already been closed.
    pub fn close_listener(&self) -> bool {
        if self.terminated.swap(true, Ordering::AcqRel) {
            return false;
        }
        let _ = self.stop.send(true);
        drop(self.listener.lock().unwrap().take());
        true
    }

    /// Whether nothing of this forward is left for the actor to flush.
    pub fn is_drained(&self) -> bool {
        self.info.stats.open_channels() == 0 && self.info.stats.active() == 0
    }

    /// After `close_listener`: waits until the local tasks are gone and (bounded) until the actor has
    /// flushed and closed their channels and any request in flight has finished.
    pub async fn finish(&self) {
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let drained = tokio::time::timeout(DRAIN_WAIT, self.info.stats.all_channels_closed()).await;
        if drained.is_err() {
            debug!("{} forward: channels still open after {:?}; cutting them", self.info.channel, DRAIN_WAIT);
        }
    }
}

/// Binds 127.0.0.1:`port` (0 = any free port). Only loopback: the tunnel's far end is trusted only
/// to the gateway process's host.
pub async fn bind_local(port: u16) -> Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| Error::Bind { port, in_use: e.kind() == std::io::ErrorKind::AddrInUse, cause: e.to_string() })
}

async fn accept_loop(
    listener: Arc<Mutex<Option<TcpListener>>>,
    conn: Arc<Connection>,
    info: Arc<ForwardInfo>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    // None once the forward was closed (the listener is gone).
    let accept = || {
        std::future::poll_fn(|cx| match listener.lock().unwrap().as_ref() {
            Some(l) => l.poll_accept(cx).map(Some),
            None => std::task::Poll::Ready(None),
        })
    };
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            r = accept() => match r {
                None => break,
                Some(Ok((stream, _))) => {
                    let _ = stream.set_nodelay(true);
                    tasks.spawn(serve_local(stream, conn.clone(), info.clone(), stop.clone()));
                }
                Some(Err(e)) => {
                    // Out of descriptors and the like: back off briefly instead of spinning.
                    warn!("{} forward on 127.0.0.1:{}: accept failed: {e}", info.channel, info.local_port);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    // The closer took the listener already; make sure it is gone whatever ended the loop.
    drop(listener.lock().unwrap().take());
    // Local tasks stop at once on the same signal (they only hand their queues to the actor); anything
    // slower is cut.
    let all_done = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_millis(10), all_done).await.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Asks for a channel to the forward's target on one of its destination's lanes (see `lanes`); on
/// success returns the lane (whose nudge the local side raises) and this connection's queues.
async fn open_channel(conn: &Arc<Connection>, info: &ForwardInfo) -> Result<(LaneUse, mpsc::Sender<Vec<u8>>, mpsc::Receiver<Vec<u8>>)> {
    let (to_remote_tx, to_remote_rx) = mpsc::channel::<Vec<u8>>(QUEUE_DEPTH);
    let (from_remote_tx, from_remote_rx) = mpsc::channel::<Vec<u8>>(QUEUE_DEPTH);
    let opening = crate::lanes::open_channel(conn, info.direct_tcpip(to_remote_rx, from_remote_tx), Instant::now() + OPEN_WAIT);
    let lane = opening.wait().await?;
    Ok((lane, to_remote_tx, from_remote_rx))
}

async fn serve_local(stream: TcpStream, conn: Arc<Connection>, info: Arc<ForwardInfo>, mut stop: watch::Receiver<bool>) {
    let _active = ActiveGuard::new(info.stats.clone());
    // Until the channel is open nothing is read from the local socket: whatever the client sent
    // waits in the kernel's buffer and goes out on the channel that finally opens.
    let started = Instant::now();
    let mut pause = REFUSED_RETRY_FIRST;
    let opened = loop {
        let attempt = tokio::select! {
            r = open_channel(&conn, &info) => r,
            _ = stop.changed() => return,
        };
        match attempt {
            Err(Error::Refused { .. })
                if !info.listened.load(Ordering::Acquire) && started.elapsed() + pause < info.refused_wait =>
            {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => return,
                }
                pause = (pause * 2).min(REFUSED_RETRY_MAX);
            }
            other => break other,
        }
    };
    let (lane, to_remote_tx, from_remote_rx) = match opened {
        Ok(queues) => queues,
        Err(e) => {
            // Closing only this local connection; the forward keeps serving.
            let waited = if matches!(e, Error::Refused { .. }) { format!(" for {:?}", started.elapsed()) } else { String::new() };
            let msg = format!(
                "{} forward 127.0.0.1:{} -> {}:{}: {e}{waited}; closing that local connection",
                info.channel, info.local_port, info.remote_host, info.remote_port
            );
            if info.failing.swap(true, Ordering::Relaxed) {
                debug!("{msg}");
            } else {
                warn!("{msg} (further failures of this forward are logged at debug until one succeeds)");
            }
            return;
        }
    };
    info.listened.store(true, Ordering::Release);
    if info.failing.swap(false, Ordering::Relaxed) {
        debug!("{} forward 127.0.0.1:{}: channel opens succeed again", info.channel, info.local_port);
    }

    let (rd, wr) = stream.into_split();
    // The channel lives on the lane it opened on: that lane's actor pumps it.
    let carried = carry(rd, wr, to_remote_tx, from_remote_rx, lane.nudge(), || {}, || {});
    tokio::select! {
        _ = carried => {}
        _ = stop.changed() => {}
    }
    // Dropping the queues and then the nudge lets the actor finish the channel.
}
