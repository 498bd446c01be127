//! Local port forwarding: a listener on 127.0.0.1 whose every accepted connection gets its own
//! direct-tcpip channel, with bytes pumped both ways and half-close carried across; or a local port
//! only reserved, for a forward whose remote port egtunnel alone talks to (through requests).
//!
//! Each local connection is one lightweight task (no thread) running `forward_channel::carry`; the
//! SSH side of it is a `ForwardChannel` stepped by the connection actor, which owns the session.
//! A forward caps its local use (`LocalLimits`), so that a local flood costs a bounded number of
//! descriptors and channel opens, on a connection other kernels of the host share.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, warn};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore, SemaphorePermit};
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
/// Default cap on the local connections a forward serves at once. A kernel's ZMQ sockets use a handful;
/// the cap only bounds what a runaway or hostile local client can take (descriptors, channels).
pub const MAX_LOCAL_CONNECTIONS: usize = 256;
/// Default cap on a forward's local connections waiting for their channel open at once. libssh2 opens
/// one channel at a time per connection, so every open queued delays the opens of the host's other
/// kernels; past this, local connections wait their turn here instead.
pub const MAX_QUEUED_OPENS: usize = 32;

/// How much local use one forward takes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalLimits {
    /// Local connections served at once; one more is closed as soon as it is accepted.
    pub connections: usize,
    /// Local connections waiting for a channel open at once; one more waits for a turn.
    pub queued_opens: usize,
}

impl Default for LocalLimits {
    fn default() -> Self {
        LocalLimits { connections: MAX_LOCAL_CONNECTIONS, queued_opens: MAX_QUEUED_OPENS }
    }
}

impl LocalLimits {
    pub fn check(&self) -> Result<()> {
        if self.connections == 0 || self.queued_opens == 0 {
            return Err(Error::Invalid(format!("local limits must be positive, got {self:?}")));
        }
        Ok(())
    }
}

/// Which of a forward's caps was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    Connections,
    QueuedOpens,
}

/// Enforces a forward's `LocalLimits`: permits for local connections and for channel opens.
pub struct LocalGate {
    limits: LocalLimits,
    connections: Arc<Semaphore>,
    opens: Semaphore,
    /// Set when each cap is first reached, so that only that time is worth a warning.
    connections_capped: AtomicBool,
    opens_capped: AtomicBool,
}

impl LocalGate {
    pub fn new(limits: LocalLimits) -> Self {
        LocalGate {
            limits,
            connections: Arc::new(Semaphore::new(limits.connections)),
            opens: Semaphore::new(limits.queued_opens),
            connections_capped: AtomicBool::new(false),
            opens_capped: AtomicBool::new(false),
        }
    }

    pub fn limits(&self) -> LocalLimits {
        self.limits
    }

    /// A slot for one more local connection, held while it is served; None at the cap.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// A turn to have one channel open queued; `on_cap` runs first when every turn is taken. The wait
    /// ends only with a turn, or with the caller giving up.
    pub async fn open_turn(&self, on_cap: impl FnOnce()) -> SemaphorePermit<'_> {
        if let Ok(turn) = self.opens.try_acquire() {
            return turn;
        }
        on_cap();
        match self.opens.acquire().await {
            Ok(turn) => turn,
            // Never closed; were it, no turn would ever come.
            Err(_) => std::future::pending().await,
        }
    }

    /// True the first time `cap` is reached, false on every later time.
    pub fn first_hit(&self, cap: Cap) -> bool {
        let flag = match cap {
            Cap::Connections => &self.connections_capped,
            Cap::QueuedOpens => &self.opens_capped,
        };
        !flag.swap(true, Ordering::Relaxed)
    }
}

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
    /// The local port is reserved, never listening (see `LocalPort::Reserved`).
    pub reserved: bool,
    /// Holds the forward to its `LocalLimits`.
    pub gate: LocalGate,
}

impl ForwardInfo {
    /// A channel to this forward's target whose bytes flow through the given queues.
    pub fn direct_tcpip(&self, to_remote: mpsc::Receiver<Vec<u8>>, from_remote: mpsc::Sender<Vec<u8>>) -> DirectTcpip {
        DirectTcpip { host: self.remote_host.clone(), port: self.remote_port, to_remote, from_remote, stats: self.stats.clone() }
    }

    /// Logs that a cap was reached, at warning and once per forward: what an operator needs to see.
    /// Later hits are only counted (`rejected_connections`): a flood reaches the cap once per
    /// connection, and a log record per connection would hand the flood the GIL (records go to
    /// Python's logging) on the gateway's event loop.
    fn cap_reached(&self, cap: Cap) {
        if !self.gate.first_hit(cap) {
            return;
        }
        let kernel = self.kernel_id.as_deref().map(|k| format!(" of kernel {k}")).unwrap_or_default();
        let limits = self.gate.limits();
        let what = match cap {
            Cap::Connections => format!(
                "{} local connections at once, its cap: further ones are closed as they arrive",
                limits.connections
            ),
            Cap::QueuedOpens => format!(
                "{} local connections waiting for a channel open, its cap: further ones wait their turn",
                limits.queued_opens
            ),
        };
        warn!("{} forward 127.0.0.1:{}{kernel} has {what} (logged once per forward; see rejected_connections)", self.channel, self.local_port);
    }
}

/// A forward's local end.
pub enum LocalPort {
    /// Accepts local connections, each carried over a channel of its own.
    Listener(TcpListener),
    /// Bound, so that the port number stays this forward's (Enterprise Gateway keeps it as the kernel's
    /// comm_port), but never listening: a local connect is refused. For a forward whose remote port
    /// only egtunnel's requests reach, on channels of their own: a listener would let any local user of
    /// the gateway host talk to it (the launcher's port shuts down or kills its kernel).
    Reserved(TcpSocket),
}

impl LocalPort {
    pub fn port(&self) -> std::io::Result<u16> {
        match self {
            LocalPort::Listener(l) => l.local_addr().map(|a| a.port()),
            LocalPort::Reserved(s) => s.local_addr().map(|a| a.port()),
        }
    }

    pub fn is_reserved(&self) -> bool {
        matches!(self, LocalPort::Reserved(_))
    }
}

/// A forward. Closing it is two steps: `close_listener` (synchronous: the port is free when
/// it returns, and nothing waits for the runtime or the network) and `finish` (drains in the background).
pub struct Forward {
    pub info: Arc<ForwardInfo>,
    pub conn: Arc<Connection>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Shared with the accept loop, which polls it under the lock; closing takes it out and drops it
    /// on the caller's thread, so a busy runtime cannot delay freeing the port.
    listener: Arc<Mutex<Option<LocalPort>>>,
    terminated: AtomicBool,
    requests: RequestQueue,
}

/// Requests taking turns: each waits until the one taken before it has finished.
#[derive(Default)]
pub struct RequestQueue {
    /// Ends when the turn taken last has finished.
    last: Mutex<Option<oneshot::Receiver<()>>>,
}

impl RequestQueue {
    pub fn turn(&self) -> RequestTurn {
        let (mine, done) = oneshot::channel();
        let before = self.last.lock().unwrap().replace(done);
        RequestTurn { before, _mine: mine }
    }
}

/// One request's place in its queue: `wait` returns once every request taken before it has
/// finished; dropping it lets the next one go.
pub struct RequestTurn {
    before: Option<oneshot::Receiver<()>>,
    _mine: oneshot::Sender<()>,
}

impl RequestTurn {
    pub async fn wait(&mut self) {
        if let Some(before) = self.before.take() {
            // A sender dropped without sending is the predecessor finishing, too.
            let _ = before.await;
        }
    }
}

impl Forward {
    /// Starts serving an already bound local port over `conn` (a reserved one has nothing to serve).
    pub fn start(local: LocalPort, conn: Arc<Connection>, info: Arc<ForwardInfo>) -> Forward {
        let (stop, stop_rx) = watch::channel(false);
        let serves = !local.is_reserved();
        let listener = Arc::new(Mutex::new(Some(local)));
        let task = serves.then(|| tokio::spawn(accept_loop(listener.clone(), conn.clone(), info.clone(), stop_rx)));
        Forward {
            info,
            conn,
            stop,
            task: Mutex::new(task),
            listener,
            terminated: AtomicBool::new(false),
            requests: RequestQueue::default(),
        }
    }

    /// The next place among this forward's requests, taken on the caller's thread so that requests
    /// reach the remote port one at a time, in the order they were sent. A launcher serving one
    /// connection at a time (Enterprise Gateway's listens with a queue of one) then never has more
    /// than one of ours waiting, and each request is acted on before the next arrives.
    pub fn request_turn(&self) -> RequestTurn {
        self.requests.turn()
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

/// Binds 127.0.0.1:`port` (0 = any free port), listening unless `reserved`. Only loopback: the
/// tunnel's far end is trusted only to the gateway process's host.
pub async fn bind_local(port: u16, reserved: bool) -> Result<LocalPort> {
    let bind_error = |e: std::io::Error| Error::Bind { port, in_use: e.kind() == std::io::ErrorKind::AddrInUse, cause: e.to_string() };
    if !reserved {
        return TcpListener::bind(("127.0.0.1", port)).await.map(LocalPort::Listener).map_err(bind_error);
    }
    // Without SO_REUSEADDR (a listener sets it), so that no other socket can bind the number either,
    // and without listen(), so that the kernel refuses every connect.
    let socket = TcpSocket::new_v4().map_err(bind_error)?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], port))).map_err(bind_error)?;
    Ok(LocalPort::Reserved(socket))
}

async fn accept_loop(
    listener: Arc<Mutex<Option<LocalPort>>>,
    conn: Arc<Connection>,
    info: Arc<ForwardInfo>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    // None once the forward was closed (the listener is gone).
    let accept = || {
        std::future::poll_fn(|cx| match listener.lock().unwrap().as_ref() {
            Some(LocalPort::Listener(l)) => l.poll_accept(cx).map(Some),
            _ => std::task::Poll::Ready(None),
        })
    };
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            r = accept() => match r {
                None => break,
                Some(Ok((stream, _))) => match info.gate.admit() {
                    Some(slot) => {
                        let _ = stream.set_nodelay(true);
                        tasks.spawn(serve_local(stream, slot, conn.clone(), info.clone(), stop.clone()));
                    }
                    None => {
                        // Closed before anything is read or opened: the client sees the end at once,
                        // and the flood costs neither a task nor a channel.
                        drop(stream);
                        info.stats.reject();
                        info.cap_reached(Cap::Connections);
                    }
                },
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
///
/// The open waits for a turn first (see `LocalLimits::queued_opens`), held until the open is answered;
/// the turn and the open share the connection's `OPEN_WAIT`.
async fn open_channel(conn: &Arc<Connection>, info: &ForwardInfo) -> Result<(LaneUse, mpsc::Sender<Vec<u8>>, mpsc::Receiver<Vec<u8>>)> {
    let deadline = Instant::now() + OPEN_WAIT;
    let turn = tokio::time::timeout_at(deadline, info.gate.open_turn(|| info.cap_reached(Cap::QueuedOpens))).await;
    let Ok(_turn) = turn else {
        return Err(Error::Timeout {
            dest: conn.dest(),
            what: format!("a turn to open a channel to {}:{}", info.remote_host, info.remote_port),
            secs: OPEN_WAIT.as_secs_f64(),
        });
    };
    let (to_remote_tx, to_remote_rx) = mpsc::channel::<Vec<u8>>(QUEUE_DEPTH);
    let (from_remote_tx, from_remote_rx) = mpsc::channel::<Vec<u8>>(QUEUE_DEPTH);
    let opening = crate::lanes::open_channel(conn, info.direct_tcpip(to_remote_rx, from_remote_tx), deadline);
    let lane = opening.wait().await?;
    Ok((lane, to_remote_tx, from_remote_rx))
}

/// Serves one local connection, holding its `slot` among the forward's local connections throughout.
async fn serve_local(
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    conn: Arc<Connection>,
    info: Arc<ForwardInfo>,
    mut stop: watch::Receiver<bool>,
) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    #[tokio::test]
    async fn requests_take_turns_in_the_order_they_were_queued() {
        let queue = RequestQueue::default();
        let (first, second, third) = (queue.turn(), queue.turn(), queue.turn());
        let order = Arc::new(Mutex::new(Vec::new()));
        // Started in reverse: each still runs only after the one queued before it has finished.
        let mut tasks = JoinSet::new();
        for (n, mut turn) in [(3, third), (2, second), (1, first)] {
            let order = order.clone();
            tasks.spawn(async move {
                turn.wait().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                order.lock().unwrap().push(n);
            });
        }
        while tasks.join_next().await.is_some() {}
        assert_eq!(*order.lock().unwrap(), vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn a_turn_dropped_unused_lets_the_next_go() {
        let queue = RequestQueue::default();
        let abandoned = queue.turn();
        let mut next = queue.turn();
        drop(abandoned);
        tokio::time::timeout(Duration::from_secs(1), next.wait()).await.expect("the next turn comes");
    }

    fn connect(port: u16) -> std::io::Result<std::net::TcpStream> {
        std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5))
    }

    #[test]
    fn a_reserved_port_refuses_connects_and_stays_taken_until_dropped() {
        crate::runtime::block_on(async {
            let local = bind_local(0, true).await.unwrap();
            let port = local.port().unwrap();
            assert!(local.is_reserved() && port > 0);
            assert_eq!(connect(port).unwrap_err().kind(), ErrorKind::ConnectionRefused);
            // Nobody else gets the number meanwhile: not a listener (which sets SO_REUSEADDR), not the
            // all-interfaces probe with which a kernel's port range is searched.
            assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());
            assert!(std::net::TcpListener::bind(("0.0.0.0", port)).is_err());
            assert!(matches!(bind_local(port, true).await, Err(Error::Bind { in_use: true, .. })));
            drop(local);
            assert_eq!(connect(port).unwrap_err().kind(), ErrorKind::ConnectionRefused);
            assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
        });
    }

    #[test]
    fn a_listening_port_accepts() {
        crate::runtime::block_on(async {
            let local = bind_local(0, false).await.unwrap();
            assert!(!local.is_reserved());
            assert!(connect(local.port().unwrap()).is_ok());
        });
    }

    #[test]
    fn connections_beyond_the_cap_are_not_admitted_until_one_ends() {
        let gate = LocalGate::new(LocalLimits { connections: 2, queued_opens: 1 });
        let (a, b) = (gate.admit().unwrap(), gate.admit().unwrap());
        assert!(gate.admit().is_none());
        drop(a);
        assert!(gate.admit().is_some());
        drop(b);
    }

    #[test]
    fn opens_beyond_the_cap_wait_for_a_turn_and_say_so_once_per_wait() {
        crate::runtime::block_on(async {
            let gate = LocalGate::new(LocalLimits { connections: 8, queued_opens: 2 });
            let capped = std::cell::Cell::new(0);
            let on_cap = || capped.set(capped.get() + 1);
            let first = gate.open_turn(on_cap).await;
            let _second = gate.open_turn(on_cap).await;
            assert_eq!(capped.get(), 0);
            let third = gate.open_turn(on_cap);
            tokio::pin!(third);
            // The third waits while both turns are held...
            assert!(tokio::time::timeout(Duration::from_millis(50), &mut third).await.is_err());
            // ...and goes as soon as one is given back (its open answered).
            drop(first);
            let _turn = tokio::time::timeout(Duration::from_secs(5), third).await.expect("a turn after one was given back");
            assert_eq!(capped.get(), 1);
        });
    }

    #[test]
    fn each_cap_counts_as_first_hit_once() {
        let gate = LocalGate::new(LocalLimits::default());
        assert!(gate.first_hit(Cap::Connections));
        assert!(!gate.first_hit(Cap::Connections));
        assert!(gate.first_hit(Cap::QueuedOpens));
        assert!(!gate.first_hit(Cap::QueuedOpens));
    }

    #[test]
    fn limits_must_be_positive() {
        assert_eq!(LocalLimits::default(), LocalLimits { connections: 256, queued_opens: 32 });
        assert!(LocalLimits::default().check().is_ok());
        assert!(LocalLimits { connections: 0, queued_opens: 1 }.check().is_err());
        assert!(LocalLimits { connections: 1, queued_opens: 0 }.check().is_err());
    }
}
