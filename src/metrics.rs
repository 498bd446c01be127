//! Process-wide counters per SSH destination, for the Prometheus collector (`egtunnel.metrics`).
//!
//! Prometheus needs counters that never go backwards, but a connection (and its `status()` entry)
//! goes away when its last forward closes. So every counter lives here, in one entry per
//! user@host:port that connections and forwards hold an `Arc` to and increment directly, and that
//! outlives them all. Entries are never removed: there is one per destination ever used, which a
//! gateway keeps bounded by its list of kernel hosts.
//!
//! Nothing here runs on the data path except relaxed atomic increments; the snapshot (a scrape)
//! reads the atomics and the pool's live status, never asking a connection actor anything.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use once_cell::sync::Lazy;

use crate::config::ConnectSpec;
use crate::error::{Error, Result};

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

/// Everything counted for one destination over the life of the process.
#[derive(Default)]
pub struct DestTotals {
    /// Connections established by a caller's open (reconnects not included).
    pub connections_opened: AtomicU64,
    /// Connections re-established after dying.
    pub reconnects: AtomicU64,
    pub forwards_opened: AtomicU64,
    /// Bytes from local connections to the remote target.
    pub bytes_to_remote: AtomicU64,
    /// Bytes from the remote target to local connections.
    pub bytes_from_remote: AtomicU64,
    pub keepalives_sent: AtomicU64,
    /// SSH channels open right now (forwarded connections, requests, remote commands): a gauge, kept
    /// here because channels are counted where they open and close, not in status().
    pub open_channels: AtomicU64,
    pub commands_ok: AtomicU64,
    pub commands_failed: AtomicU64,
    pub command_latency: Histogram,
    failures: [[AtomicU64; Cause::ALL.len()]; Operation::ALL.len()],
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
}

/// Counts an SSH channel as open for as long as it lives.
pub struct OpenChannel(Arc<DestTotals>);

impl OpenChannel {
    pub fn new(totals: Arc<DestTotals>) -> Self {
        totals.open_channels.fetch_add(1, Ordering::Relaxed);
        OpenChannel(totals)
    }
}

impl Drop for OpenChannel {
    fn drop(&mut self) {
        self.0.open_channels.fetch_sub(1, Ordering::Relaxed);
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
    pub open_channels: u64,
    pub connections_opened: u64,
    pub reconnects: u64,
    pub forwards_opened: u64,
    pub bytes_to_remote: u64,
    pub bytes_from_remote: u64,
    pub keepalives_sent: u64,
    pub commands_ok: u64,
    pub commands_failed: u64,
    pub command_latency: HistogramSnapshot,
    /// Non-zero failure counts by (operation, cause).
    pub failures: Vec<(&'static str, &'static str, u64)>,
}

/// Every destination seen so far, sorted, with its live gauges.
pub fn snapshot() -> Vec<DestSnapshot> {
    // Live status first and without the totals' lock held: the two locks are never nested.
    let live = crate::pool::status();
    let totals: Vec<(DestKey, Arc<DestTotals>)> =
        TOTALS.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut out: BTreeMap<DestKey, DestSnapshot> = totals.into_iter().map(|(k, t)| (k.clone(), totals_snapshot(k, &t))).collect();
    for c in live {
        let key = DestKey { user: c.user.clone(), host: c.host.clone(), port: c.port };
        let Some(d) = out.get_mut(&key) else { continue };
        match c.state {
            "connected" => d.connected += 1,
            "stopped" => d.stopped += 1,
            _ => d.reconnecting += 1,
        }
        d.keepalives_unanswered += c.keepalives_unanswered;
        for f in &c.forwards {
            *d.forwards.entry(f.channel.as_str()).or_default() += 1;
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
    DestSnapshot {
        key,
        connected: 0,
        reconnecting: 0,
        stopped: 0,
        forwards: BTreeMap::new(),
        keepalives_unanswered: 0,
        open_channels: load(&t.open_channels),
        connections_opened: load(&t.connections_opened),
        reconnects: load(&t.reconnects),
        forwards_opened: load(&t.forwards_opened),
        bytes_to_remote: load(&t.bytes_to_remote),
        bytes_from_remote: load(&t.bytes_from_remote),
        keepalives_sent: load(&t.keepalives_sent),
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
        let set = Error::channels(vec![(crate::keepalive::Channel::Shell, Error::Auth { dest: d, cause: "x".into() })]);
        assert_eq!(Cause::of(&set), Some(Cause::Auth));
    }

    #[test]
    fn totals_outlive_their_users_and_failures_count_once_per_call() {
        let s = spec("metrics-test-host");
        let t = totals_for(&s);
        t.reconnects.fetch_add(2, Ordering::Relaxed);
        drop(t);
        assert_eq!(totals_for(&s).reconnects.load(Ordering::Relaxed), 2);

        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let refused = || async { Err::<(), _>(Error::Refused { dest: s.dest(), target: "t:1".into(), cause: "x".into() }) };
        for _ in 0..3 {
            let _ = rt.block_on(counted(&s, Operation::Forward, refused()));
        }
        let _ = rt.block_on(counted(&s, Operation::Command, async { Err::<(), _>(Error::Invalid("x".into())) }));
        let _ = rt.block_on(counted(&s, Operation::Command, async { Ok(()) }));
        let snap = snapshot().into_iter().find(|d| d.key == DestKey::of(&s)).unwrap();
        assert_eq!(snap.failures, vec![("forward", "refused", 3)]);
        assert_eq!(snap.reconnects, 2);
        assert_eq!((snap.connected, snap.reconnecting, snap.stopped), (0, 0, 0), "no live connection");
    }

    #[test]
    fn open_channel_is_a_gauge() {
        let t = Arc::new(DestTotals::default());
        let a = OpenChannel::new(t.clone());
        let b = OpenChannel::new(t.clone());
        assert_eq!(t.open_channels.load(Ordering::Relaxed), 2);
        drop(a);
        drop(b);
        assert_eq!(t.open_channels.load(Ordering::Relaxed), 0);
    }
}
