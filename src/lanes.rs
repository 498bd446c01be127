//! Channel opens of one shared destination spread over extra SSH connections ("lanes") while they
//! queue up, so that starting many kernels at once, or reopening a host's channels after a network
//! blip, costs round trips per kernel rather than per host.
//!
//! libssh2 opens one channel at a time per session (the open state lives in the session), so on one
//! connection every open waits one round trip for each open queued before it: 48 opens of eight
//! kernels take about 48 round trips, 600 channels reopening after a blip 600. Opens therefore wait
//! here, in one queue per destination, and each lane takes the next one whenever it has fewer than
//! `DEPTH` of its own in progress: a lane that is fast, or has just come up, takes more, and no open
//! waits behind a lane that is slow or reconnecting while another is free. A channel stays on the
//! lane it opened on.
//!
//! The pool's connection for the destination is lane 0 and carries everything else (remote commands,
//! requests, relayed sessions). Extra lanes start only while opens wait beyond what the live lanes
//! can take (`BACKLOG_PER_LANE` per lane), at most `EG_SSH_MAX_LANES` connections in all; each is an
//! ordinary `Connection` (own actor, keep-alive, reconnect) whose handshake goes through the same
//! per-server startup gate as every other (MaxStartups). An extra lane that has carried no channel for
//! `LANE_IDLE` closes, so an idle or steady host keeps one connection.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::debug;
use once_cell::sync::Lazy;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::{ConnectSpec, TunnelMode};
use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::forward_channel::DirectTcpip;
use crate::jump::Hops;
use crate::keepalive::KeepAlive;
use crate::ready::Nudge;

/// Opens one lane may have handed to its actor at once. Two keep libssh2's open slot busy (the next
/// open is queued in the actor when one completes) while the rest stay here for whichever lane frees
/// up first.
const DEPTH: usize = 2;
/// Opens waiting per lane (live or starting) beyond which another lane is worth a handshake: one
/// kernel's set (six opens) never starts one.
const BACKLOG_PER_LANE: usize = 4;
/// How long an extra lane with no channel and no open stays up, so that the next burst finds it.
pub const LANE_IDLE: Duration = Duration::from_secs(30);
/// Time per open below which the link is near: opens then wait for the CPU, which lanes do not add.
const NEAR_LINK: Duration = Duration::from_millis(8);
/// Round trips of a handshake, for a first guess at an open's cost.
const HANDSHAKE_ROUND_TRIPS: u32 = 5;
/// After an extra lane failed to come up, no other is started for this long.
const START_COOLDOWN: Duration = Duration::from_secs(5);
/// Connections per destination when EG_SSH_MAX_LANES is unset.
pub const DEFAULT_MAX_LANES: usize = 32;
/// The most a setting may ask for: every lane is a session process on the server.
const LIMIT_MAX_LANES: usize = 64;

/// `EG_SSH_MAX_LANES`: SSH connections one shared destination may use at most (1: a single connection).
pub fn max_lanes() -> Result<usize> {
    let Some(raw) = std::env::var_os("EG_SSH_MAX_LANES") else { return Ok(DEFAULT_MAX_LANES) };
    let text = raw.to_string_lossy();
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=LIMIT_MAX_LANES).contains(&n) => Ok(n),
        _ => Err(Error::Invalid(format!("EG_SSH_MAX_LANES must be an integer from 1 to {LIMIT_MAX_LANES}, got {text:?}"))),
    }
}

/// A direct-tcpip open waiting for a lane.
struct Waiting {
    open: DirectTcpip,
    deadline: Instant,
    reply: oneshot::Sender<Dispatched>,
}

struct Lane {
    conn: Arc<Connection>,
    /// Opens handed to the actor whose outcome has not come back yet.
    in_flight: usize,
    /// Channels opened (or opening) on this lane and still in use.
    in_use: usize,
    /// Bumped whenever the lane is given work, so that a stale idle timer does nothing.
    generation: u64,
}

#[derive(Default)]
struct Inner {
    /// Lane 0 is the pool's connection; the others are extra lanes.
    lanes: Vec<Lane>,
    waiting: VecDeque<Waiting>,
    starting: usize,
    no_start_until: Option<Instant>,
    /// Keep-alive wanted from every lane (the pool's strictest over the destination's forwards).
    keep_alive: KeepAlive,
    /// How long the last connection to this destination took to come up (TCP, key exchange,
    /// authentication): what another lane costs before it takes its first open.
    handshake: Duration,
    /// How long one open takes on a lane, smoothed: with `handshake`, whether the backlog would be
    /// gone before another lane could help.
    open_time: Option<Duration>,
    closed: bool,
}

/// The lanes of one shared destination.
pub struct Lanes {
    spec: ConnectSpec,
    /// Where a lane through a ProxyJump hop gets the hop's connection, as the pool's connection does.
    hops: Arc<dyn Hops>,
    max: usize,
    inner: Mutex<Inner>,
}

/// Destinations' lane sets by the id of their pool connection (lane 0).
static SETS: Lazy<Mutex<HashMap<u64, Arc<Lanes>>>> = Lazy::new(Mutex::default);

/// Gives the pool's new shared connection its lane set.
pub fn register(primary: &Arc<Connection>, max: usize, keep_alive: KeepAlive, handshake: Duration) {
    let set = Arc::new(Lanes {
        // Lanes carry channel opens only; the remote listener stays on the primary connection.
        spec: ConnectSpec { respond_to: None, ..primary.spec().clone() },
        hops: primary.hops(),
        max,
        inner: Mutex::new(Inner {
            lanes: vec![Lane { conn: primary.clone(), in_flight: 0, in_use: 0, generation: 0 }],
            keep_alive,
            handshake,
            ..Default::default()
        }),
    });
    SETS.lock().unwrap().insert(primary.id(), set);
}

/// The pool closed its connection: extra lanes close too, waiting opens fail.
pub fn unregister(primary_id: u64) {
    let Some(set) = SETS.lock().unwrap().remove(&primary_id) else { return };
    let (extra, waiting) = {
        let mut inner = set.inner.lock().unwrap();
        inner.closed = true;
        let extra: Vec<_> = inner.lanes.drain(..).skip(1).map(|l| l.conn).collect();
        (extra, std::mem::take(&mut inner.waiting))
    };
    drop(waiting); // their callers see the connection closed
    for conn in extra {
        crate::runtime::spawn(async move { conn.shutdown().await });
    }
}

fn set_of(primary_id: u64) -> Option<Arc<Lanes>> {
    SETS.lock().unwrap().get(&primary_id).cloned()
}

/// New keep-alive settings for every lane of the destination whose pool connection is `primary_id`.
pub fn set_keep_alive(primary_id: u64, keep_alive: KeepAlive) {
    let Some(set) = set_of(primary_id) else { return };
    let mut inner = set.inner.lock().unwrap();
    inner.keep_alive = keep_alive;
    for lane in inner.lanes.iter().skip(1) {
        lane.conn.set_keep_alive(keep_alive);
    }
}

/// The extra lanes of a destination, for status(): (lane number, connection).
pub fn extra_lanes(primary_id: u64) -> Vec<(usize, Arc<Connection>)> {
    let Some(set) = set_of(primary_id) else { return Vec::new() };
    let inner = set.inner.lock().unwrap();
    inner.lanes.iter().enumerate().skip(1).map(|(i, l)| (i, l.conn.clone())).collect()
}

/// A channel's hold on the lane it opened on, and the nudge its local side raises for that lane's
/// actor (see `ready`); the lane stays up while any such hold exists.
pub struct LaneUse {
    conn: Arc<Connection>,
    set: Option<Arc<Lanes>>,
    nudge: Nudge,
}

impl LaneUse {
    pub fn conn(&self) -> &Arc<Connection> {
        &self.conn
    }

    pub fn nudge(&self) -> &Nudge {
        &self.nudge
    }
}

impl Drop for LaneUse {
    fn drop(&mut self) {
        if let Some(set) = self.set.take() {
            set.channel_done(&self.conn);
        }
    }
}

/// An open handed to a lane: its actor's answer, and the lane's in-flight count until it comes.
struct Dispatched {
    lane: LaneUse,
    in_flight: InFlight,
    answer: oneshot::Receiver<Result<()>>,
}

/// Counts an open in its lane's `in_flight` until its answer came back or its caller left.
struct InFlight {
    conn: Arc<Connection>,
    set: Arc<Lanes>,
    /// When it was handed to the lane, and how many of the lane's opens (itself included) were ahead.
    since: Instant,
    position: u32,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set.answered(&self.conn);
    }
}

/// A direct-tcpip open queued for a destination; `wait` resolves once a lane has opened it.
pub struct Opening {
    inner: OpeningKind,
    dest: String,
    what: String,
    deadline: Instant,
    primary: Arc<Connection>,
}

enum OpeningKind {
    Queued(oneshot::Receiver<Dispatched>),
    /// No lane set (per-port mode): straight to the forward's own connection.
    Direct(oneshot::Receiver<Result<()>>, Nudge),
}

/// Queues a channel for a forward riding on `conn` (its pool connection), now, on the caller's
/// thread. In per-port mode it goes to `conn` itself.
pub fn open_channel(conn: &Arc<Connection>, open: DirectTcpip, deadline: Instant) -> Opening {
    let what = format!("channel to {}:{}", open.host, open.port);
    let dest = conn.dest();
    let inner = match set_of(conn.id()) {
        Some(set) => {
            let (reply, rx) = oneshot::channel();
            let waiting = Waiting { open, deadline, reply };
            set.inner.lock().unwrap().waiting.push_back(waiting);
            set.dispatch();
            OpeningKind::Queued(rx)
        }
        None => {
            let (rx, nudge) = conn.open_channel(open, deadline);
            OpeningKind::Direct(rx, nudge)
        }
    };
    Opening { inner, dest, what, deadline, primary: conn.clone() }
}

impl Opening {
    /// The open's outcome and, on success, the lane the channel is on.
    pub async fn wait(self) -> Result<LaneUse> {
        let Opening { inner, dest, what, deadline, primary } = self;
        let closed = || Error::Other { dest: dest.clone(), cause: "connection closed".into() };
        match inner {
            OpeningKind::Direct(rx, nudge) => {
                rx.await.unwrap_or_else(|_| Err(closed()))?;
                Ok(LaneUse { conn: primary, set: None, nudge })
            }
            OpeningKind::Queued(rx) => {
                // The actor that takes the open answers by its deadline; while the open still waits here
                // (every lane busy or down), this side keeps the deadline.
                let dispatched = match tokio::time::timeout_at(deadline, rx).await {
                    Ok(Ok(d)) => d,
                    Ok(Err(_)) => return Err(closed()),
                    Err(_) if primary.is_alive() => return Err(Error::Timeout { dest, what, secs: 0.0 }),
                    Err(_) => {
                        let cause = primary.last_error().unwrap_or_else(|| "connecting".into());
                        return Err(Error::Down { dest, cause });
                    }
                };
                let Dispatched { lane, in_flight, answer } = dispatched;
                let outcome = answer.await.unwrap_or_else(|_| Err(closed()));
                if outcome.is_ok() {
                    in_flight.set.opened_in(in_flight.since.elapsed() / in_flight.position);
                }
                drop(in_flight);
                outcome.map(|()| lane)
            }
        }
    }
}

impl Lanes {
    /// Hands waiting opens to lanes with room, and starts another lane if opens still wait beyond
    /// what the lanes can take.
    fn dispatch(self: &Arc<Self>) {
        let mut inner = self.inner.lock().unwrap();
        if inner.closed {
            return;
        }
        // A lane that gave up for good (host key changed, credentials refused) takes nothing more.
        let before = inner.lanes.len();
        let mut stopped = Vec::new();
        let mut i = 1;
        while i < inner.lanes.len() {
            if inner.lanes[i].conn.is_stopped() && inner.lanes[i].in_flight == 0 {
                stopped.push(inner.lanes.remove(i).conn);
            } else {
                i += 1;
            }
        }
        if inner.lanes.len() != before {
            for conn in stopped {
                crate::runtime::spawn(async move { conn.shutdown().await });
            }
        }
        while !inner.waiting.is_empty() {
            // While any lane is up, opens go to live lanes only: one reconnecting (with backoff) would
            // hold them. With none up, each lane takes its share, and the first to come back asks for more.
            let any_alive = inner.lanes.iter().any(|l| l.conn.is_alive());
            let pick = inner
                .lanes
                .iter()
                .enumerate()
                .filter(|(_, l)| l.in_flight < DEPTH && (!any_alive || l.conn.is_alive()))
                .min_by_key(|(i, l)| (l.in_flight, *i))
                .map(|(i, _)| i);
            let Some(i) = pick else { break };
            let w = inner.waiting.pop_front().expect("not empty");
            if w.reply.is_closed() {
                continue;
            }
            let lane = &mut inner.lanes[i];
            let (answer, nudge) = lane.conn.open_channel(w.open, w.deadline);
            lane.in_flight += 1;
            lane.in_use += 1;
            lane.generation += 1;
            let conn = lane.conn.clone();
            let dispatched = Dispatched {
                lane: LaneUse { conn: conn.clone(), set: Some(self.clone()), nudge },
                in_flight: InFlight { conn, set: self.clone(), since: Instant::now(), position: lane.in_flight as u32 },
                answer,
            };
            if let Err(d) = w.reply.send(dispatched) {
                // The caller left between the check and now: its guards undo the counts, outside the lock.
                drop(inner);
                drop(d);
                inner = self.inner.lock().unwrap();
            }
        }
        let backlog = inner.waiting.iter().filter(|w| !w.reply.is_closed()).count();
        let lanes = inner.lanes.len() + inner.starting;
        let cooling = inner.no_start_until.is_some_and(|t| Instant::now() < t);
        // Worth a handshake only if the lanes there are would still be busy with the backlog when the
        // new one comes up (on a near link they clear it first, and a handshake only costs CPU).
        // Before the first open has come back, an open is taken to cost a round trip, a fifth of a
        // handshake (TCP, key exchange, service request, authentication, the first channel).
        let open_time = inner.open_time.unwrap_or(inner.handshake / HANDSHAKE_ROUND_TRIPS);
        // An open quicker than `NEAR_LINK` waits for the CPU, not the link: another connection's
        // handshake would only take CPU from the opens it was meant to speed up.
        let outlasts = open_time >= NEAR_LINK && open_time * backlog as u32 / lanes as u32 > inner.handshake;
        if backlog > BACKLOG_PER_LANE * lanes && lanes < self.max && !cooling && outlasts {
            inner.starting += 1;
            let keep_alive = inner.keep_alive;
            drop(inner);
            self.start_lane(keep_alive, backlog);
        }
    }

    /// Connects another lane in the background; it takes waiting opens as soon as it is up.
    fn start_lane(self: &Arc<Self>, keep_alive: KeepAlive, backlog: usize) {
        let set = self.clone();
        debug!("SSH connection {}: {backlog} channel opens waiting; starting another lane", self.spec.dest());
        crate::runtime::spawn(async move {
            let t0 = Instant::now();
            let started = Connection::start(set.spec.clone(), TunnelMode::Shared, keep_alive, set.hops.clone()).await;
            let unwanted = {
                let mut inner = set.inner.lock().unwrap();
                inner.starting -= 1;
                if started.is_ok() {
                    inner.handshake = t0.elapsed();
                }
                match started {
                    Ok(conn) if !inner.closed => {
                        // Held by the set: a lane that dies reconnects, since the opens of a host whose
                        // link blipped are exactly what lanes are for; only idleness closes it.
                        conn.set_users(1);
                        debug!("SSH connection {}: lane {} up", set.spec.dest(), inner.lanes.len());
                        inner.lanes.push(Lane { conn: conn.clone(), in_flight: 0, in_use: 0, generation: 0 });
                        drop(inner);
                        set.dispatch();
                        set.idle_check(conn, 0);
                        None
                    }
                    Ok(conn) => Some(conn),
                    Err(e) => {
                        inner.no_start_until = Some(Instant::now() + START_COOLDOWN);
                        debug!("another lane to {} did not come up: {e}", set.spec.dest());
                        None
                    }
                }
            };
            if let Some(conn) = unwanted {
                conn.shutdown().await;
            }
        });
    }

    /// One open took `took` on its lane (its share of the time since it was handed over).
    fn opened_in(&self, took: Duration) {
        let mut inner = self.inner.lock().unwrap();
        inner.open_time = Some(match inner.open_time {
            Some(t) => (t * 3 + took) / 4,
            None => took,
        });
    }

    /// An open's answer came back from `conn`'s actor: that lane has room for the next one.
    fn answered(self: &Arc<Self>, conn: &Arc<Connection>) {
        {
            let mut inner = self.inner.lock().unwrap();
            if let Some(lane) = inner.lanes.iter_mut().find(|l| Arc::ptr_eq(&l.conn, conn)) {
                lane.in_flight = lane.in_flight.saturating_sub(1);
            }
        }
        self.dispatch();
    }

    /// A channel on `conn` ended (or its open failed): an extra lane left with nothing may close.
    fn channel_done(self: &Arc<Self>, conn: &Arc<Connection>) {
        let mut inner = self.inner.lock().unwrap();
        let Some(i) = inner.lanes.iter().position(|l| Arc::ptr_eq(&l.conn, conn)) else { return };
        let lane = &mut inner.lanes[i];
        lane.in_use = lane.in_use.saturating_sub(1);
        if i > 0 && lane.in_use == 0 && lane.in_flight == 0 {
            let (conn, generation) = (lane.conn.clone(), lane.generation);
            drop(inner);
            self.idle_check(conn, generation);
        }
    }

    /// Closes the extra lane on `conn` after LANE_IDLE unless it was given work meanwhile.
    fn idle_check(self: &Arc<Self>, conn: Arc<Connection>, generation: u64) {
        let set = self.clone();
        crate::runtime::spawn(async move {
            tokio::time::sleep(LANE_IDLE).await;
            let closing = {
                let mut inner = set.inner.lock().unwrap();
                let idle = inner.lanes.iter().position(|l| Arc::ptr_eq(&l.conn, &conn)).filter(|&i| {
                    let l = &inner.lanes[i];
                    i > 0 && l.in_use == 0 && l.in_flight == 0 && l.generation == generation
                });
                idle.map(|i| inner.lanes.remove(i).conn)
            };
            if let Some(conn) = closing {
                debug!("SSH connection {}: an idle lane closed", set.spec.dest());
                conn.shutdown().await;
            }
        });
    }
}
