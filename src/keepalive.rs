//! Keep-alive, all of it: how often an idle SSH connection is probed (the policy, per kernel channel),
//! what one connection applies when several users want different things, and when each probe goes out
//! and the peer is declared dead (the schedule).
//!
//! The policy mirrors Enterprise Gateway's `RemoteProcessProxy._get_keep_alive_interval` exactly, so
//! that a gateway switching to egtunnel keeps its operators' culling-derived behaviour. SHELL, IOPUB,
//! STDIN and HB carry traffic whenever the user works, so a probe slightly longer than the culling
//! timeout is enough; CONTROL and EG_COMM may stay silent for the kernel's whole life, so they get the
//! maximum. The schedule is OpenSSH's ServerAlive rule (`probe_action`), run by the connection actor
//! through `Schedule`; the connection only sends the probes and reads the socket's idle time.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tokio::time::Instant;

/// EG's `max_keep_alive_interval`: 100 years in seconds. Fits libssh2's unsigned 32-bit interval.
pub const MAX_KEEP_ALIVE_INTERVAL: i64 = 100 * 365 * 24 * 60 * 60;

/// EG's default margin added to the culling timeout.
pub const DEFAULT_MARGIN: i64 = 60;

/// The ports egtunnel forwards for one kernel, named as EG's `KernelChannel` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    Shell,
    Iopub,
    Stdin,
    Hb,
    Control,
    EgComm,
}

impl Channel {
    pub const ALL: [Channel; 6] = [
        Channel::Shell,
        Channel::Iopub,
        Channel::Stdin,
        Channel::Hb,
        Channel::Control,
        Channel::EgComm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Shell => "SHELL",
            Channel::Iopub => "IOPUB",
            Channel::Stdin => "STDIN",
            Channel::Hb => "HB",
            Channel::Control => "CONTROL",
            Channel::EgComm => "EG_COMM",
        }
    }

    /// Channels that may stay silent for the kernel's whole life.
    fn is_quiet(self) -> bool {
        matches!(self, Channel::Control | Channel::EgComm)
    }

    pub fn names() -> String {
        Channel::ALL.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Channel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Channel::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown channel {s:?}; valid channels: {}", Channel::names()))
    }
}

/// The keep-alive interval in seconds for `channel`, given the gateway's culling timeout.
///
/// `margin` must be non-negative; EG's own value is 60. Note that a timeout of exactly the maximum
/// yields maximum + margin, as EG's comparison (`> max`) does.
pub fn keep_alive_interval(channel: Channel, cull_idle_timeout: i64, margin: i64) -> Result<i64, String> {
    if margin < 0 {
        return Err(format!("keepalive margin must be a non-negative integer, got {margin}"));
    }
    if channel.is_quiet() || cull_idle_timeout <= 0 || cull_idle_timeout > MAX_KEEP_ALIVE_INTERVAL {
        return Ok(MAX_KEEP_ALIVE_INTERVAL);
    }
    Ok(cull_idle_timeout.saturating_add(margin))
}

/// What one connection is asked to do: probe after `interval` seconds of silence from the server, and
/// give up after `count_max` probes in a row went unanswered (OpenSSH's ServerAliveInterval and
/// ServerAliveCountMax).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepAlive {
    pub interval: u64,
    pub count_max: u32,
}

impl KeepAlive {
    /// OpenSSH's default ServerAliveCountMax.
    pub const DEFAULT_COUNT_MAX: u32 = 3;

    /// No probes in practice (EG's maximum interval): connections that carry no forward (remote
    /// commands, diagnostics) until a forward or relayed session asks for more.
    pub const NEVER: KeepAlive = KeepAlive { interval: MAX_KEEP_ALIVE_INTERVAL as u64, count_max: Self::DEFAULT_COUNT_MAX };

    /// EG's policy for a forward of `channel` (see `keep_alive_interval`), giving up after the default
    /// count unless `with_count_max` says otherwise.
    pub fn for_channel(channel: Channel, cull_idle_timeout: i64, margin: i64) -> Result<KeepAlive, String> {
        let interval = keep_alive_interval(channel, cull_idle_timeout, margin)?;
        Ok(KeepAlive { interval: interval as u64, count_max: Self::DEFAULT_COUNT_MAX })
    }

    /// The same interval, giving up after `count_max` unanswered probes.
    pub fn with_count_max(self, count_max: u32) -> KeepAlive {
        KeepAlive { count_max, ..self }
    }

    /// What a connection serving several users applies: as often as the most demanding wants, giving up
    /// as soon as the least patient would; with no user, `NEVER`.
    pub fn strictest(wanted: impl IntoIterator<Item = KeepAlive>) -> KeepAlive {
        wanted
            .into_iter()
            .reduce(|a, b| KeepAlive { interval: a.interval.min(b.interval), count_max: a.count_max.min(b.count_max) })
            .unwrap_or(KeepAlive::NEVER)
    }

    /// The interval as libssh2 stores it: unsigned 32-bit (EG's maximum, 100 years, fits), and never
    /// below 2 s, libssh2's own floor.
    pub fn native_interval(self) -> u32 {
        self.interval.clamp(2, u32::MAX as u64) as u32
    }
}

/// A connection nobody asked anything of yet never probes.
impl Default for KeepAlive {
    fn default() -> Self {
        KeepAlive::NEVER
    }
}

/// The probe schedule of one connected session: its policy, when the last probe went out and how many
/// in a row are unanswered. A reconnected session starts a fresh one.
pub struct Schedule {
    policy: KeepAlive,
    last_probe: Option<Instant>,
    unanswered: u64,
}

impl Schedule {
    pub fn new(policy: KeepAlive) -> Self {
        Schedule { policy, last_probe: None, unanswered: 0 }
    }

    pub fn policy(&self) -> KeepAlive {
        self.policy
    }

    /// New settings apply from the next check on; probes already out still count.
    pub fn set_policy(&mut self, policy: KeepAlive) {
        self.policy = policy;
    }

    /// Probes sent since the server last sent anything.
    pub fn unanswered(&self) -> u64 {
        self.unanswered
    }

    /// While probes are out, whether the server sent anything since the last one (`since_data`: how long
    /// ago it last sent data, when the socket can tell); if so the count restarts and this is true.
    /// Asked only while probes are out, so an ordinary wake-up costs nothing.
    pub fn heard_from_peer(&mut self, since_data: impl FnOnce() -> Option<Duration>, now: Instant) -> bool {
        if self.unanswered == 0 {
            return false;
        }
        let answered = match (self.last_probe, since_data()) {
            (Some(p), Some(idle)) => idle < now - p,
            _ => true,
        };
        if answered {
            self.unanswered = 0;
        }
        answered
    }

    /// What to do now, given how long the server has been silent (`idle`, asked only when it matters).
    pub fn action(&self, idle: impl FnOnce() -> Duration, now: Instant) -> ProbeAction {
        if self.policy.interval >= MAX_KEEP_ALIVE_INTERVAL as u64 {
            return ProbeAction::Wait(Duration::from_secs(86_400));
        }
        let interval = Duration::from_secs(self.policy.interval);
        probe_action(interval, self.policy.count_max, idle(), self.last_probe.map(|p| now - p))
    }

    /// libssh2 answered a probe call with `next`, the seconds until its next probe: the full interval
    /// when it sent one now, less when its own (whole-second) clock says "not yet". True when a probe
    /// went out, which is then counted as unanswered.
    pub fn probe_sent(&mut self, next: u32, now: Instant) -> bool {
        if next < self.policy.native_interval() {
            return false;
        }
        self.unanswered += 1;
        self.last_probe = Some(now);
        true
    }

    /// Why the connection is declared dead when `action` says so.
    pub fn dead_cause(&self) -> String {
        format!("no answer to {} keep-alive probes at {} s intervals", self.policy.count_max, self.policy.interval)
    }
}


/// What the connection should do about keep-alive right now.
#[derive(Debug, PartialEq, Eq)]
pub enum ProbeAction {
    /// Nothing yet; check again after this long.
    Wait(std::time::Duration),
    /// Send a probe now (then check again after the returned wait).
    Probe,
    /// The peer missed `count_max` consecutive probes: the connection is dead.
    Dead,
}

/// Tolerance for the kernel's millisecond (jiffy) clock behind "time since last data received".
const SLACK: std::time::Duration = std::time::Duration::from_millis(5);

/// OpenSSH's ServerAlive rule: after `interval` of silence from the peer, probe once per interval;
/// `count_max` unanswered probes in a row mean the peer is gone. Any data from the peer (a probe's
/// reply included) restarts the count. `since_probe` is None before the first probe.
pub fn probe_action(
    interval: std::time::Duration,
    count_max: u32,
    idle: std::time::Duration,
    since_probe: Option<std::time::Duration>,
) -> ProbeAction {
    let dead_after = interval.saturating_mul(count_max + 1);
    if idle + SLACK >= dead_after {
        return ProbeAction::Dead;
    }
    let probe_spacing_ok = since_probe.is_none_or(|p| p >= interval);
    if idle + SLACK >= interval && probe_spacing_ok {
        return ProbeAction::Probe;
    }
    let until_idle = interval.saturating_sub(idle);
    let until_spacing = since_probe.map_or(std::time::Duration::ZERO, |p| interval.saturating_sub(p));
    let until_dead = dead_after.saturating_sub(idle);
    ProbeAction::Wait(until_idle.max(until_spacing).min(until_dead).max(std::time::Duration::from_millis(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: i64 = MAX_KEEP_ALIVE_INTERVAL;

    use std::time::Duration;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Replays a silent peer: returns the times at which probes go out and death is declared.
    fn silent_peer(interval: f64, count_max: u32) -> (Vec<f64>, f64) {
        let mut t = 0.0;
        let mut last_probe: Option<f64> = None;
        let mut probes = Vec::new();
        loop {
            match probe_action(secs(interval), count_max, secs(t), last_probe.map(|p| secs(t - p))) {
                ProbeAction::Dead => return (probes, t),
                ProbeAction::Probe => {
                    probes.push(t);
                    last_probe = Some(t);
                }
                ProbeAction::Wait(d) => t += d.as_secs_f64(),
            }
        }
    }

    #[test]
    fn silent_peer_gets_count_max_probes_then_is_dead() {
        let (probes, dead) = silent_peer(2.0, 3);
        assert_eq!(probes.len(), 3, "{probes:?}");
        for (i, p) in probes.iter().enumerate() {
            assert!((p - 2.0 * (i as f64 + 1.0)).abs() < 0.01, "{probes:?}");
        }
        assert!((dead - 8.0).abs() < 0.01, "{dead}");
    }

    #[test]
    fn answered_probes_keep_the_connection_alive() {
        // The reply resets idle to zero; the next probe waits a full interval again.
        assert_eq!(probe_action(secs(2.0), 3, secs(2.0), None), ProbeAction::Probe);
        assert_eq!(probe_action(secs(2.0), 3, secs(0.001), Some(secs(0.002))), ProbeAction::Wait(secs(1.999)));
    }

    #[test]
    fn probes_are_never_closer_than_one_interval() {
        assert_eq!(probe_action(secs(2.0), 3, secs(2.5), Some(secs(1.0))), ProbeAction::Wait(secs(1.0)));
    }

    #[test]
    fn maximum_interval_never_probes_within_a_century() {
        let max = Duration::from_secs(MAX_KEEP_ALIVE_INTERVAL as u64);
        match probe_action(max, 3, secs(86_400.0), None) {
            ProbeAction::Wait(d) => assert!(d > Duration::from_secs(3_000_000_000)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn max_is_one_hundred_years_and_fits_u32() {
        assert_eq!(MAX, 3_153_600_000);
        assert!(MAX + DEFAULT_MARGIN <= u32::MAX as i64);
    }

    #[test]
    fn busy_channels_follow_the_culling_timeout() {
        for ch in [Channel::Shell, Channel::Iopub, Channel::Stdin, Channel::Hb] {
            assert_eq!(keep_alive_interval(ch, 300, 60).unwrap(), 360);
            assert_eq!(keep_alive_interval(ch, 1, 60).unwrap(), 61);
            assert_eq!(keep_alive_interval(ch, 1, 1).unwrap(), 2);
            assert_eq!(keep_alive_interval(ch, MAX - 60, 60).unwrap(), MAX);
            assert_eq!(keep_alive_interval(ch, MAX, 60).unwrap(), MAX + 60);
        }
    }

    #[test]
    fn quiet_channels_always_get_the_maximum() {
        for ch in [Channel::Control, Channel::EgComm] {
            for t in [-5, 0, 1, 300, MAX, MAX + 1] {
                assert_eq!(keep_alive_interval(ch, t, 60).unwrap(), MAX);
            }
        }
    }

    #[test]
    fn culling_off_or_out_of_range_gives_the_maximum() {
        for t in [i64::MIN, -1, 0, MAX + 1, i64::MAX] {
            assert_eq!(keep_alive_interval(Channel::Shell, t, 60).unwrap(), MAX);
        }
    }

    #[test]
    fn negative_margin_is_refused() {
        let err = keep_alive_interval(Channel::Shell, 300, -1).unwrap_err();
        assert!(err.contains("non-negative"), "{err}");
    }

    #[test]
    fn a_connection_applies_the_strictest_wish_or_never() {
        let a = KeepAlive { interval: 360, count_max: 5 };
        let b = KeepAlive { interval: MAX as u64, count_max: 2 };
        assert_eq!(KeepAlive::strictest([a, b]), KeepAlive { interval: 360, count_max: 2 });
        assert_eq!(KeepAlive::strictest([]), KeepAlive::NEVER);
        assert_eq!(KeepAlive::for_channel(Channel::Hb, 300, 60).unwrap(), KeepAlive { interval: 360, count_max: 3 });
        assert_eq!(KeepAlive::for_channel(Channel::Control, 300, 60).unwrap().with_count_max(4), KeepAlive { interval: MAX as u64, count_max: 4 });
        assert_eq!(KeepAlive { interval: 0, count_max: 1 }.native_interval(), 2);
        assert_eq!(KeepAlive::NEVER.native_interval() as i64, MAX);
    }

    #[test]
    fn the_schedule_counts_unanswered_probes_until_the_peer_speaks() {
        let t0 = Instant::now();
        let mut s = Schedule::new(KeepAlive { interval: 2, count_max: 3 });
        assert_eq!(s.action(|| secs(2.0), t0), ProbeAction::Probe);
        assert!(!s.probe_sent(1, t0), "libssh2 said not yet");
        assert!(s.probe_sent(2, t0));
        assert_eq!(s.unanswered(), 1);
        // Silent since before the probe: not answered.
        assert!(!s.heard_from_peer(|| Some(secs(3.0)), t0 + secs(1.0)));
        // Data 0.5 s ago, after the probe went out 1 s ago: answered.
        assert!(s.heard_from_peer(|| Some(secs(0.5)), t0 + secs(1.0)));
        assert_eq!(s.unanswered(), 0);
        let never = Schedule::new(KeepAlive::NEVER);
        assert_eq!(never.action(|| unreachable!("no syscall for a connection that never probes"), t0), ProbeAction::Wait(secs(86_400.0)));
    }

    #[test]
    fn channel_names_round_trip_and_unknown_lists_valid() {
        for ch in Channel::ALL {
            assert_eq!(ch.as_str().parse::<Channel>().unwrap(), ch);
        }
        let err = "shell".parse::<Channel>().unwrap_err();
        assert!(err.contains("SHELL, IOPUB, STDIN, HB, CONTROL, EG_COMM"), "{err}");
    }
}
