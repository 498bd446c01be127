//! Every counter egtunnel keeps, in one place: per destination for the Prometheus collector
//! (`egtunnel.metrics`), per connection and per forward for status().
//!
//! Prometheus needs counters that never go backwards, but a connection (and its status() entry) goes
//! away when its last forward closes. So each user@host:port has one entry (`DestTotals`), created on
//! first use and never removed: one per destination ever used, which a gateway keeps bounded by its
//! list of kernel hosts. Each event is counted once, where it happens: a connection's reconnects and
//! keep-alive probes in its `ConnStats`, a forward's bytes and channels in its `ForwardStats`, the
//! rest (connections and forwards opened, commands, failures) in the destination's entry. Connections
//! and forwards are registered with their destination while they live, and their counts are added to
//! it when they end, under the lock a scrape reads them with: a total is what ended plus what lives,
//! so it never goes backwards.
//!
//! Nothing here runs on the data path except relaxed atomic increments; a scrape reads the atomics,
//! and takes the live gauges (connection states, unanswered probes, forwards by channel) from the
//! pool's status, which its caller passes in.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use once_cell::sync::Lazy;
use tokio::sync::Notify;

use crate::config::ConnectSpec;
use crate::error::{Error, Result};
use crate::keepalive::Channel;

/// The environment variables that turn the endpoint on; read by `egtunnel.metrics`.
pub const PORT_VAR: &str = "EG_TUNNEL_METRICS_PORT";

/// Upper bounds (seconds) of the remote-command latency buckets. A pooled command answers in a few
/// milliseconds; a launch runs a shell with the kernel's environment (tens of ms); anything past a
/// few seconds waits on MaxSessions or a slow host. The last one is EG's 30 s command timeout.
pub const COMMAND_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// What the caller asked for when an open failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// A forward (`open_tunnel`) or a kernel's set of forwards (`open_forwards`), counted once per call.
    Forward,
    /// A remote command.
    Command,
}

impl Operation {
    pub const ALL: [Operation; 2] = [Operation::Forward, Operation::Command];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Forward => "forward",
            Operation::Command => "command",
        }
    }
}

/// Why an open failed, as the `cause` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    Connect,
    Auth,
    HostKey,
    Refused,
    Prohibited,
    Timeout,
    Down,
    SessionRefused,
    Bind,
    Other,
}

impl Cause {
    pub const ALL: [Cause; 10] = [
        Cause::Connect,
        Cause::Auth,
        Cause::HostKey,
        Cause::Refused,
        Cause::Prohibited,
        Cause::Timeout,
        Cause::Down,
        Cause::SessionRefused,
        Cause::Bind,
        Cause::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Connect => "connect",
            Cause::Auth => "auth",
            Cause::HostKey => "host-key",
            Cause::Refused => "refused",
            Cause::Prohibited => "prohibited",
            Cause::Timeout => "timeout",
            Cause::Down => "down",
            Cause::SessionRefused => "session-refused",
            Cause::Bind => "bind",
            Cause::Other => "other",
        }
    }

    /// The cause of an error the caller saw; None for bad arguments and unusable ssh_config files, which
    /// are the caller's to fix and say nothing about the SSH destination.
    pub fn of(err: &Error) -> Option<Cause> {
        Some(match err.primary() {
            Error::Invalid(_) | Error::Config { .. } => return None,
            Error::Connect { .. } => Cause::Connect,
            Error::Auth { .. } => Cause::Auth,
            Error::HostKey { .. } => Cause::HostKey,
            Error::Refused { .. } => Cause::Refused,
            Error::Prohibited { .. } => Cause::Prohibited,
            Error::Timeout { .. } => Cause::Timeout,
            Error::Down { .. } => Cause::Down,
            Error::Bind { .. } => Cause::Bind,
            // A command whose session channel the server kept refusing (MaxSessions) has no variant of
            // its own; the connection actor's message always names the setting, so it is told apart here
            // rather than by adding a variant every error match in the crate would have to learn.
            Error::Other { cause, .. } if cause.contains("MaxSessions") => Cause::SessionRefused,
            Error::Other { .. } | Error::Channels { .. } => Cause::Other,
        })
    }
}

/// Latency of remote commands in fixed buckets; per-bucket (not cumulative) counts, so recording is
/// one increment, plus one for the sum.
pub struct Histogram {
    /// One slot per bound of COMMAND_BUCKETS, then the overflow (+Inf) slot.
    buckets: [AtomicU64; COMMAND_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_nanos: AtomicU64::new(0) }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = COMMAND_BUCKETS.iter().position(|le| secs <= *le).unwrap_or(COMMAND_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Cumulative counts per bound, the count and the sum in seconds. The count is the sum of the
    /// buckets read, so the +Inf bucket always equals it even while commands are being recorded.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = Vec::with_capacity(COMMAND_BUCKETS.len());
        let mut total = 0;
        for (i, le) in COMMAND_BUCKETS.iter().enumerate() {
            total += self.buckets[i].load(Ordering::Relaxed);
            cumulative.push((*le, total));
        }
        total += self.buckets[COMMAND_BUCKETS.len()].load(Ordering::Relaxed);
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        HistogramSnapshot { buckets: cumulative, count: total, sum }
    }
}

pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations at or below it).
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

/// What a connection counts that its destination's totals include.
#[derive(Default)]
struct ConnTally {
    reconnects: AtomicU64,
    keepalives_sent: AtomicU64,
}

/// What a forward counts that its destination's totals include.
#[derive(Default)]
struct ForwardTally {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// SSH channels of the forward the driver still holds (a gauge).
    open_channels: AtomicUsize,
}

/// The destination's live connections and forwards, and what those that ended had counted.
#[derive(Default)]
struct Tallies {
    conns: Vec<Arc<ConnTally>>,
    forwards: Vec<Arc<ForwardTally>>,
    ended_reconnects: u64,
    ended_keepalives_sent: u64,
    ended_bytes_in: u64,
    ended_bytes_out: u64,
}

/// Everything counted for one destination over the life of the process.
#[derive(Default)]
pub struct DestTotals {
    /// Connections established by a caller's open (reconnects not included).
    connections_opened: AtomicU64,
    forwards_opened: AtomicU64,
    /// SSH channels open right now that belong to no forward (remote commands): a gauge.
    other_channels: AtomicU64,
    commands_ok: AtomicU64,
    commands_failed: AtomicU64,
    command_latency: Histogram,
    failures: [[AtomicU64; Cause::ALL.len()]; Operation::ALL.len()],
    tallies: Mutex<Tallies>,
}

impl DestTotals {
    pub fn record_failure(&self, op: Operation, err: &Error) {
        if let Some(cause) = Cause::of(err) {
            self.failures[op as usize][cause as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn failures(&self, op: Operation, cause: Cause) -> u64 {
        self.failures[op as usize][cause as usize].load(Ordering::Relaxed)
    }

    /// A remote command answered (`ok`: it ran and its status came back) after `took` on the connection.
    pub fn command_done(&self, took: Duration, ok: bool) {
        let n = if ok { &self.commands_ok } else { &self.commands_failed };
        n.fetch_add(1, Ordering::Relaxed);
        self.command_latency.observe(took);
    }

    fn register_conn(&self, t: &Arc<ConnTally>) {
        self.tallies.lock().unwrap().conns.push(t.clone());
    }

    fn register_forward(&self, t: &Arc<ForwardTally>) {
        self.forwards_opened.fetch_add(1, Ordering::Relaxed);
        self.tallies.lock().unwrap().forwards.push(t.clone());
    }

    /// A connection ended: its counts join the destination's history, in one step a scrape cannot split.
    fn retire_conn(&self, t: &Arc<ConnTally>) {
        let mut all = self.tallies.lock().unwrap();
        all.conns.retain(|c| !Arc::ptr_eq(c, t));
        all.ended_reconnects += t.reconnects.load(Ordering::Relaxed);
        all.ended_keepalives_sent += t.keepalives_sent.load(Ordering::Relaxed);
    }

    fn retire_forward(&self, t: &Arc<ForwardTally>) {
        let mut all = self.tallies.lock().unwrap();
        all.forwards.retain(|f| !Arc::ptr_eq(f, t));
        all.ended_bytes_in += t.bytes_in.load(Ordering::Relaxed);
        all.ended_bytes_out += t.bytes_out.load(Ordering::Relaxed);
    }
}

/// Counts an SSH channel that belongs to no forward as open for as long as it lives.
pub struct OpenChannel(Arc<DestTotals>);

impl OpenChannel {
    pub fn new(totals: Arc<DestTotals>) -> Self {
        totals.other_channels.fetch_add(1, Ordering::Relaxed);
        OpenChannel(totals)
    }
}

impl Drop for OpenChannel {
    fn drop(&mut self) {
        self.0.other_channels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connection's counters: those its destination totals (reconnects, keep-alive probes) and those
/// only status() shows. Registered with the destination while the connection lives.
pub struct ConnStats {
    tally: Arc<ConnTally>,
    dest: Arc<DestTotals>,
    /// Keep-alive probes sent since the server last sent anything (a gauge).
    keepalives_unanswered: AtomicU64,
    /// Session channels the server refused (each retried).
    session_refusals: AtomicU64,
    /// Times the actor went idle while a channel still had unread packets (checked only with
    /// EGTUNNEL_CHECK_SETTLED=1; by construction it stays 0).
    unsettled_sleeps: AtomicU64,
}

/// A connection's counts at one moment, for status().
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCounts {
    pub reconnects: u64,
    pub keepalives_sent: u64,
    pub keepalives_unanswered: u64,
    pub session_refusals: u64,
    pub unsettled_sleeps: u64,
}

impl ConnStats {
    pub fn new(dest: Arc<DestTotals>) -> Self {
        let tally = Arc::new(ConnTally::default());
        dest.register_conn(&tally);
        ConnStats {
            tally,
            dest,
            keepalives_unanswered: AtomicU64::new(0),
            session_refusals: AtomicU64::new(0),
            unsettled_sleeps: AtomicU64::new(0),
        }
    }

    /// The destination's totals, for the forwards and commands riding on this connection.
    pub fn dest(&self) -> &Arc<DestTotals> {
        &self.dest
    }

    /// The connection a caller opened is up (a reconnect is `reconnected`).
    pub fn opened(&self) {
        self.dest.connections_opened.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reconnected(&self) {
        self.tally.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub fn keepalive_sent(&self) {
        self.tally.keepalives_sent.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_keepalives_unanswered(&self, n: u64) {
        self.keepalives_unanswered.store(n, Ordering::Relaxed);
    }

    pub fn session_refused(&self) {
        self.session_refusals.fetch_add(1, Ordering::Relaxed);
    }

    pub fn unsettled_sleep(&self) {
        self.unsettled_sleeps.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ConnCounts {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ConnCounts {
            reconnects: load(&self.tally.reconnects),
            keepalives_sent: load(&self.tally.keepalives_sent),
            keepalives_unanswered: load(&self.keepalives_unanswered),
            session_refusals: load(&self.session_refusals),
            unsettled_sleeps: load(&self.unsettled_sleeps),
        }
    }
}

impl Drop for ConnStats {
    fn drop(&mut self) {
        self.dest.retire_conn(&self.tally);
    }
}

/// Counters shared between a forward, its local connections and the connection driver. Atomics rather
/// than messages: status() and stats() read them from any thread without asking the driver, so
/// observing a busy tunnel never slows it down.
#[derive(Default)]
pub struct ForwardStats {
    tally: Arc<ForwardTally>,
    /// Local connections accepted since the forward opened.
    connections: AtomicU64,
    /// Local connections currently being served.
    active: AtomicU64,
    /// Local connections closed at once because the forward served its cap of them.
    rejected: AtomicU64,
    channels_closed: Notify,
    /// The destination the forward's counts add to; None (the default) for channels counted nowhere
    /// else (a session's channel through its hop, a diagnostic's test channel).
    dest: Option<Arc<DestTotals>>,
}

/// A forward's counts at one moment, for status() and stats().
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardCounts {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connections: u64,
    pub active: u64,
    pub rejected: u64,
}

impl ForwardStats {
    /// Counts for a new forward, registered with its destination.
    pub fn new(dest: Arc<DestTotals>) -> Self {
        let tally = Arc::new(ForwardTally::default());
        dest.register_forward(&tally);
        ForwardStats {
            tally,
            connections: AtomicU64::new(0),
            active: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            channels_closed: Notify::new(),
            dest: Some(dest),
        }
    }

    pub fn add_in(&self, n: usize) {
        self.tally.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn add_out(&self, n: usize) {
        self.tally.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// SSH channels of this forward the driver still holds; terminate waits for zero.
    pub fn open_channels(&self) -> usize {
        self.tally.open_channels.load(Ordering::Acquire)
    }

    /// A local connection was closed at once, over the forward's cap.
    pub fn reject(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Local connections being served right now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> ForwardCounts {
        ForwardCounts {
            bytes_in: self.tally.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.tally.bytes_out.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }

    /// Resolves once the driver has closed every channel of this forward.
    pub async fn all_channels_closed(&self) {
        loop {
            let notified = self.channels_closed.notified();
            if self.open_channels() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ForwardStats {
    fn drop(&mut self) {
        if let Some(dest) = &self.dest {
            dest.retire_forward(&self.tally);
        }
    }
}

/// Held by the driver for each live channel of a forward (and by each request in flight).
pub struct ChannelGuard(Arc<ForwardStats>);

impl ChannelGuard {
    pub fn new(stats: Arc<ForwardStats>) -> Self {
        stats.tally.open_channels.fetch_add(1, Ordering::AcqRel);
        ChannelGuard(stats)
    }

    pub fn stats(&self) -> &ForwardStats {
        &self.0
    }
}

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        if self.0.tally.open_channels.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.channels_closed.notify_waiters();
        }
    }
}

/// Counts a local connection as active for as long as it lives.
pub struct ActiveGuard(Arc<ForwardStats>);

impl ActiveGuard {
    pub fn new(stats: Arc<ForwardStats>) -> Self {
        stats.connections.fetch_add(1, Ordering::Relaxed);
        stats.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(stats)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The destination as metrics label it. The credentials of a spec are left out: one host seen with two
/// keys is still one host to its operators.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DestKey {
    pub user: String,
    pub host: String,
    pub port: u16,
}

impl DestKey {
    pub fn of(spec: &ConnectSpec) -> Self {
        DestKey { user: spec.user.clone(), host: spec.host.clone(), port: spec.port }
    }
}

static TOTALS: Lazy<Mutex<BTreeMap<DestKey, Arc<DestTotals>>>> = Lazy::new(Mutex::default);

/// The destination's totals, created on first use. Taken once per connection or failed open, never
/// per byte or channel.
pub fn totals_for(spec: &ConnectSpec) -> Arc<DestTotals> {
    TOTALS.lock().unwrap().entry(DestKey::of(spec)).or_default().clone()
}

/// Awaits `fut` and counts its failure, if any, against the destination.
pub async fn counted<T>(spec: &ConnectSpec, op: Operation, fut: impl Future<Output = Result<T>>) -> Result<T> {
    let r = fut.await;
    if let Err(e) = &r {
        if Cause::of(e).is_some() {
            totals_for(spec).record_failure(op, e);
        }
    }
    r
}

/// What a scrape reads from one live connection; the pool's status entries provide it.
pub trait LiveConnection {
    fn dest_key(&self) -> DestKey;
    /// "connected", "reconnecting" or "stopped".
    fn state(&self) -> &str;
    fn keepalives_unanswered(&self) -> u64;
    /// The kernel channel of each live forward on the connection.
    fn channels(&self) -> Vec<Channel>;
}

/// One destination at scrape time: its totals and the gauges read from the live connections.
pub struct DestSnapshot {
    pub key: DestKey,
    /// Live connections by state: connected, reconnecting (down, retrying) and stopped (down, given
    /// up: a changed host key or refused credentials).
    pub connected: u64,
    pub reconnecting: u64,
    pub stopped: u64,
    /// Live forwards by kernel channel name.
    pub forwards: BTreeMap<&'static str, u64>,
    pub keepalives_unanswered: u64,
    /// SSH channels open right now (forwarded connections, requests, remote commands).
    pub open_channels: u64,
    pub connections_opened: u64,
    pub reconnects: u64,
    pub forwards_opened: u64,
    /// Bytes from local connections to the remote target.
    pub bytes_to_remote: u64,
    /// Bytes from the remote target to local connections.
    pub bytes_from_remote: u64,
    pub keepalives_sent: u64,
    pub commands_ok: u64,
    pub commands_failed: u64,
    pub command_latency: HistogramSnapshot,
    /// Non-zero failure counts by (operation, cause).
    pub failures: Vec<(&'static str, &'static str, u64)>,
}

/// Every destination seen so far, sorted, with the gauges of `live`, the pool's status taken just before
/// (never under the totals' locks: the two are never nested).
pub fn snapshot<L: LiveConnection>(live: &[L]) -> Vec<DestSnapshot> {
    let totals: Vec<(DestKey, Arc<DestTotals>)> =
        TOTALS.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut out: BTreeMap<DestKey, DestSnapshot> = totals.into_iter().map(|(k, t)| (k.clone(), totals_snapshot(k, &t))).collect();
    for c in live {
        let Some(d) = out.get_mut(&c.dest_key()) else { continue };
        match c.state() {
            "connected" => d.connected += 1,
            "stopped" => d.stopped += 1,
            _ => d.reconnecting += 1,
        }
        d.keepalives_unanswered += c.keepalives_unanswered();
        for ch in c.channels() {
            *d.forwards.entry(ch.as_str()).or_default() += 1;
        }
    }
    out.into_values().collect()
}

fn totals_snapshot(key: DestKey, t: &DestTotals) -> DestSnapshot {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut failures = Vec::new();
    for op in Operation::ALL {
        for cause in Cause::ALL {
            let n = t.failures(op, cause);
            if n > 0 {
                failures.push((op.as_str(), cause.as_str(), n));
            }
        }
    }
    // What ended plus what lives, read under the lock that retiring takes.
    let all = t.tallies.lock().unwrap();
    let conns = |f: fn(&ConnTally) -> &AtomicU64| all.conns.iter().map(|c| load(f(c))).sum::<u64>();
    let forwards = |f: fn(&ForwardTally) -> &AtomicU64| all.forwards.iter().map(|c| load(f(c))).sum::<u64>();
    let forward_channels: u64 = all.forwards.iter().map(|f| f.open_channels.load(Ordering::Relaxed) as u64).sum();
    DestSnapshot {
        key,
        connected: 0,
        reconnecting: 0,
        stopped: 0,
        forwards: BTreeMap::new(),
        keepalives_unanswered: 0,
        open_channels: load(&t.other_channels) + forward_channels,
        connections_opened: load(&t.connections_opened),
        reconnects: all.ended_reconnects + conns(|c| &c.reconnects),
        forwards_opened: load(&t.forwards_opened),
        bytes_to_remote: all.ended_bytes_out + forwards(|f| &f.bytes_out),
        bytes_from_remote: all.ended_bytes_in + forwards(|f| &f.bytes_in),
        keepalives_sent: all.ended_keepalives_sent + conns(|c| &c.keepalives_sent),
        commands_ok: load(&t.commands_ok),
        commands_failed: load(&t.commands_failed),
        command_latency: t.command_latency.snapshot(),
        failures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(host: &str) -> ConnectSpec {
        ConnectSpec::new(host, 2222, Some("alice"), None, None, None, "strict", 5.0).unwrap()
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_matches_inf() {
        let h = Histogram::default();
        for ms in [1, 4, 7, 30, 600, 45_000] {
            h.observe(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 6);
        let at = |le: f64| s.buckets.iter().find(|(b, _)| *b == le).unwrap().1;
        assert_eq!(at(0.005), 2);
        assert_eq!(at(0.01), 3);
        assert_eq!(at(0.05), 4);
        assert_eq!(at(1.0), 5);
        assert_eq!(at(30.0), 5, "45 s lands only in +Inf");
        assert!((s.sum - 45.642).abs() < 1e-9, "{}", s.sum);
        assert!(s.buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn causes_follow_the_error_variants() {
        let d = "a@h:22".to_string();
        let cases = [
            (Error::Connect { dest: d.clone(), cause: "refused".into() }, Some("connect")),
            (Error::Auth { dest: d.clone(), cause: "x".into() }, Some("auth")),
            (Error::HostKey { dest: d.clone(), cause: "x".into() }, Some("host-key")),
            (Error::Refused { dest: d.clone(), target: "t:1".into(), cause: "x".into() }, Some("refused")),
            (Error::Prohibited { dest: d.clone(), target: "t:1".into(), cause: "x".into() }, Some("prohibited")),
            (Error::Timeout { dest: d.clone(), what: "x".into(), secs: 1.0 }, Some("timeout")),
            (Error::Down { dest: d.clone(), cause: "x".into() }, Some("down")),
            (Error::Bind { port: 1, cause: "x".into(), in_use: true }, Some("bind")),
            (Error::Other { dest: d.clone(), cause: "refused 3 time(s); set EG_SSH_MAX_SESSIONS below the server's MaxSessions".into() }, Some("session-refused")),
            (Error::Other { dest: d.clone(), cause: "x".into() }, Some("other")),
            (Error::Invalid("bad".into()), None),
        ];
        for (e, want) in cases {
            assert_eq!(Cause::of(&e).map(Cause::as_str), want, "{e}");
        }
        // A kernel's failed set counts by its primary cause.
        let set = Error::channels(vec![(Channel::Shell, Error::Auth { dest: d, cause: "x".into() })]);
        assert_eq!(Cause::of(&set), Some(Cause::Auth));
    }

    /// No live connection: a scrape's gauges are all zero.
    struct NoLive;

    impl LiveConnection for NoLive {
        fn dest_key(&self) -> DestKey {
            unreachable!()
        }
        fn state(&self) -> &str {
            unreachable!()
        }
        fn keepalives_unanswered(&self) -> u64 {
            unreachable!()
        }
        fn channels(&self) -> Vec<Channel> {
            unreachable!()
        }
    }

    #[test]
    fn totals_outlive_their_users_and_failures_count_once_per_call() {
        let s = spec("metrics-test-host");
        let conn = ConnStats::new(totals_for(&s));
        conn.reconnected();
        conn.reconnected();
        drop(conn);
        assert_eq!(totals_snapshot(DestKey::of(&s), &totals_for(&s)).reconnects, 2);

        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let refused = || async { Err::<(), _>(Error::Refused { dest: s.dest(), target: "t:1".into(), cause: "x".into() }) };
        for _ in 0..3 {
            let _ = rt.block_on(counted(&s, Operation::Forward, refused()));
        }
        let _ = rt.block_on(counted(&s, Operation::Command, async { Err::<(), _>(Error::Invalid("x".into())) }));
        let _ = rt.block_on(counted(&s, Operation::Command, async { Ok(()) }));
        let snap = snapshot::<NoLive>(&[]).into_iter().find(|d| d.key == DestKey::of(&s)).unwrap();
        assert_eq!(snap.failures, vec![("forward", "refused", 3)]);
        assert_eq!(snap.reconnects, 2);
        assert_eq!((snap.connected, snap.reconnecting, snap.stopped), (0, 0, 0), "no live connection");
    }

    #[test]
    fn each_event_counts_once_and_totals_keep_what_ended() {
        let s = spec("metrics-test-once");
        let t = totals_for(&s);
        let conn = ConnStats::new(t.clone());
        conn.opened();
        conn.keepalive_sent();
        conn.reconnected();
        let fwd = Arc::new(ForwardStats::new(t.clone()));
        fwd.add_in(10);
        fwd.add_out(5);
        let channel = ChannelGuard::new(fwd.clone());
        let command = OpenChannel::new(t.clone());
        let live = totals_snapshot(DestKey::of(&s), &t);
        assert_eq!((live.connections_opened, live.reconnects, live.keepalives_sent), (1, 1, 1));
        assert_eq!((live.forwards_opened, live.bytes_from_remote, live.bytes_to_remote), (1, 10, 5));
        assert_eq!(live.open_channels, 2);
        assert_eq!(conn.snapshot(), ConnCounts { reconnects: 1, keepalives_sent: 1, ..Default::default() });
        assert_eq!(fwd.snapshot(), ForwardCounts { bytes_in: 10, bytes_out: 5, ..Default::default() });
        drop((channel, command, fwd, conn));
        let ended = totals_snapshot(DestKey::of(&s), &t);
        assert_eq!((ended.connections_opened, ended.reconnects, ended.keepalives_sent), (1, 1, 1));
        assert_eq!((ended.forwards_opened, ended.bytes_from_remote, ended.bytes_to_remote), (1, 10, 5));
        assert_eq!(ended.open_channels, 0);
        assert!(t.tallies.lock().unwrap().conns.is_empty() && t.tallies.lock().unwrap().forwards.is_empty());
    }

    #[test]
    fn open_channel_is_a_gauge() {
        let t = Arc::new(DestTotals::default());
        let a = OpenChannel::new(t.clone());
        let b = OpenChannel::new(t.clone());
        assert_eq!(t.other_channels.load(Ordering::Relaxed), 2);
        drop(a);
        drop(b);
        assert_eq!(t.other_channels.load(Ordering::Relaxed), 0);
    }
}
