//! Connections through a ProxyJump hop: a direct-tcpip channel on the hop's pooled connection, joined
//! to one end of a socket pair whose other end becomes the next session's socket.
//!
//! The hop's connection is shared, kept alive and re-established like any other (it is an ordinary
//! pool entry, so status() lists it); the session through it checks its own host key and
//! authenticates on its own. A relay holds a user slot on the hop's connection for as long as the
//! session through it lives, and asks for keep-alives as often as that session's own policy does,
//! so a silent hop is noticed as soon as the host behind it would be.
//!
//! A session through a hop is established by the code that pools connections, which established the
//! hop's connection too: the recursion goes through `Hops`, which the pool implements and hands down
//! (`Connection::start`, `session::establish`), so that this file and those below it never name the pool.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use log::debug;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout_at, Instant};

use crate::config::ConnectSpec;
use crate::driver::Carrier;
use crate::error::{Error, Result};
use crate::forward_channel::{carry, DirectTcpip, QUEUE_DEPTH};
use crate::keepalive::KeepAlive;
use crate::metrics::ForwardStats;
use crate::ready::Nudge;

/// Where relays get their hops' connections: the pool, which keeps them shared, alive and
/// re-established like any other connection.
pub trait Hops: Send + Sync {
    /// Takes a user slot on the shared connection to `hop` for one relayed session that wants
    /// `keep_alive` from it.
    fn acquire(&self, hop: &ConnectSpec, keep_alive: KeepAlive) -> BoxFuture<'static, Result<Box<dyn HopConnection>>>;
}

/// A relayed session's user slot on its hop's connection.
pub trait HopConnection: Send + Sync {
    /// user@host:port of the hop.
    fn dest(&self) -> String;
    /// Queues a direct-tcpip channel on the hop's connection (see `Connection::open_channel`).
    fn open_channel(&self, open: DirectTcpip, deadline: Instant) -> (oneshot::Receiver<Result<()>>, Nudge);
    /// The relayed session's keep-alive policy changed: the hop's connection follows.
    fn set_keep_alive(&self, keep_alive: KeepAlive);
    /// The relayed session ended: the hop may close once nobody else uses it. Called once.
    fn release(&self);
}

/// The hop end of one relayed session.
pub struct Relay {
    pub jump: Box<dyn HopConnection>,
    /// When the relay started; `last_rx` counts milliseconds from here.
    epoch: Instant,
    last_rx: AtomicU64,
    closed: AtomicBool,
    cause: Mutex<Option<String>>,
    pub stats: Arc<ForwardStats>,
}

impl Carrier for Relay {
    fn since_last_data(&self) -> Duration {
        let last = Duration::from_millis(self.last_rx.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    fn closed_cause(&self) -> Option<String> {
        if !self.closed.load(Ordering::Acquire) {
            return None;
        }
        Some(self.cause.lock().unwrap().clone().unwrap_or_else(|| format!("the channel through {} closed", self.jump.dest())))
    }

    fn set_keep_alive(&self, keep_alive: KeepAlive) {
        self.jump.set_keep_alive(keep_alive);
    }
}

impl Relay {
    fn mark_closed(&self, cause: String) {
        self.cause.lock().unwrap().get_or_insert(cause);
        self.closed.store(true, Ordering::Release);
    }
}

/// Opens a channel from `hop` to `spec`'s host and port, and returns the socket the session to `spec`
/// runs over. `keep_alive` is that session's policy, which the hop's connection adopts as well.
pub async fn connect_via(
    hops: &dyn Hops,
    hop: &ConnectSpec,
    spec: &ConnectSpec,
    keep_alive: KeepAlive,
    deadline: Instant,
) -> Result<(std::os::unix::net::UnixStream, Arc<Relay>)> {
    let through = |cause: String| Error::Connect { dest: spec.dest(), cause: format!("through ProxyJump {}: {cause}", hop.dest()) };
    // A boxed future: the hop's connection is established by the same code that called us, and the
    // recursive future type needs an indirection to be sized (and provably Send).
    let conn = match timeout_at(deadline, hops.acquire(hop, keep_alive)).await {
        Ok(r) => r?,
        Err(_) => return Err(through(format!("no connection to the hop within {} s", spec.connect_timeout().as_secs_f64()))),
    };
    // From here on the slot is ours: give it back on every failure below.
    let (to_remote, to_remote_rx) = mpsc::channel::<Vec<u8>>(QUEUE_DEPTH);
    let (from_remote_tx, from_remote) = mpsc::channel::<Vec<u8>>(QUEUE_DEPTH);
    let stats = Arc::new(ForwardStats::default());
    let open = DirectTcpip { host: spec.host.clone(), port: spec.port, to_remote: to_remote_rx, from_remote: from_remote_tx, stats: stats.clone() };
    let (reply_rx, nudge) = conn.open_channel(open, deadline);
    let opened = match timeout_at(deadline, reply_rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(Error::Other { dest: hop.dest(), cause: "connection closed".into() }),
        Err(_) => Err(Error::Timeout { dest: hop.dest(), what: format!("channel to {}:{}", spec.host, spec.port), secs: spec.connect_timeout().as_secs_f64() }),
    };
    if let Err(e) = opened {
        conn.release();
        return Err(match e {
            // The hop's own refusal says more than a generic connect failure.
            e @ (Error::Auth { .. } | Error::HostKey { .. } | Error::Config { .. } | Error::Invalid(_)) => e,
            e => through(e.to_string()),
        });
    }
    let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            conn.release();
            return Err(through(format!("socket pair: {e}")));
        }
    };
    let local = match ours.set_nonblocking(true).and_then(|()| tokio::net::UnixStream::from_std(ours)) {
        Ok(s) => s,
        Err(e) => {
            conn.release();
            return Err(through(format!("socket pair: {e}")));
        }
    };
    let relay = Arc::new(Relay {
        jump: conn,
        epoch: Instant::now(),
        last_rx: AtomicU64::new(0),
        closed: AtomicBool::new(false),
        cause: Mutex::new(None),
        stats,
    });
    tokio::spawn(pump(local, to_remote, from_remote, nudge, relay.clone()));
    debug!("{} reached through ProxyJump {}", spec.dest(), hop.dest());
    Ok((theirs, relay))
}

/// Moves bytes between the socket pair and the hop's channel until both sides end, then gives the
/// hop's user slot back.
async fn pump(
    stream: tokio::net::UnixStream,
    to_remote: mpsc::Sender<Vec<u8>>,
    from_remote: mpsc::Receiver<Vec<u8>>,
    nudge: Nudge,
    relay: Arc<Relay>,
) {
    let (rd, wr) = stream.into_split();
    let seen = || relay.last_rx.store(relay.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    // The hop's channel ended (the host behind it closed, or the hop's connection died): marked before
    // the session over this socket sees EOF, so it reports why when it reconnects.
    let ended = || relay.mark_closed(format!("the channel through ProxyJump {} closed", relay.jump.dest()));
    carry(rd, wr, to_remote, from_remote, &nudge, seen, ended).await;
    drop(nudge);
    relay.jump.release();
}
