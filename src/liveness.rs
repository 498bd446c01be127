//! A kernel's liveness as its polls last found it: what listens behind a forward, as the last request
//! to its remote port found it (see `requests`), or the kernel's process, as the last remote command
//! found it (see `command_probe`). A forward holds one, a `Liveness` of the bindings another; status(),
//! `Tunnel.probe` and `Liveness.probe_command` read it without waiting on anything.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use log::{debug, warn};
use once_cell::sync::Lazy;

use crate::error::{Error, Result};

/// What the remote end said last: it took a request, it refused (nothing listens: the launcher is
/// gone), or it could not be asked (connection down, timeout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Alive = 0,
    Dead = 1,
    Unknown = 2,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Alive => "alive",
            State::Dead => "dead",
            State::Unknown => "unknown",
        }
    }

    pub fn of(outcome: &Result<()>) -> State {
        match outcome {
            Ok(()) => State::Alive,
            Err(Error::Refused { .. }) => State::Dead,
            Err(_) => State::Unknown,
        }
    }
}

/// The liveness of one kernel (or of what listens behind one forward), and whether a probe is out.
#[derive(Default)]
pub struct Liveness {
    state: AtomicU8,
    probing: AtomicBool,
    /// Until when (ms on `clock()`) probes skip the host's batch: a request was just delivered (a
    /// signal, a shutdown), the kernel may be on its way out, and Enterprise Gateway is polling every
    /// half second to see it gone. A batch would answer a kill only after up to `BATCH_WINDOW`, for
    /// every kernel a gateway shuts down, one after another.
    direct_until: AtomicU64,
    /// A poll without an answer was logged at warning; cleared by the next answer.
    unknown_told: AtomicBool,
    /// The remote end took a request's connection and never answered it: no channel goes to it any
    /// more. Each would wait in its listen queue, and once that is full the server's connect, and with
    /// it every channel open of the connection (libssh2 opens one at a time), waits for as long as
    /// TCP retries, minutes.
    stalled: AtomicBool,
}

impl Liveness {
    pub fn get(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            0 => State::Alive,
            1 => State::Dead,
            _ => State::Unknown,
        }
    }

    pub fn set(&self, s: State) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// Marks a probe as out; false if one already was.
    pub fn start_probe(&self) -> bool {
        !self.probing.swap(true, Ordering::AcqRel)
    }

    /// The probe out has its answer (or will not get one).
    pub fn probe_done(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// Records a poll's answer where an unanswered poll says nothing new: an Unknown never overrides a
    /// known Dead (a kernel found gone stays gone while its host cannot be reached).
    pub fn record(&self, answer: State) {
        if answer == State::Unknown && self.get() == State::Dead {
            return;
        }
        self.set(answer);
    }

    /// Logs that `what` (a poll) got no answer, the kernel being treated as alive. Polls come every
    /// few seconds: said once at warning, then at debug until an answer comes (`answered`).
    pub fn no_answer(&self, what: &dyn Display, cause: &dyn Display) {
        let message = format!("{what} got no answer ({cause}); liveness is unknown, so the kernel is treated as alive.");
        if self.unknown_told.swap(true, Ordering::AcqRel) {
            debug!("{message}");
        } else {
            warn!("{message}");
        }
    }

    /// A poll got an answer: the next one without is said at warning again.
    pub fn answered(&self) {
        self.unknown_told.store(false, Ordering::Release);
    }

    /// Marks the remote end as taking connections without answering; true the first time.
    pub fn stall(&self) -> bool {
        !self.stalled.swap(true, Ordering::AcqRel)
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire)
    }

    pub fn probe_directly_for(&self, span: Duration) {
        self.direct_until.store(clock() + span.as_millis() as u64, Ordering::Release);
    }

    pub fn probes_directly(&self) -> bool {
        clock() < self.direct_until.load(Ordering::Acquire)
    }
}

/// Milliseconds since the first call: a clock an atomic can hold.
fn clock() -> u64 {
    static START: Lazy<Instant> = Lazy::new(Instant::now);
    START.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_record_is_alive_with_no_probe_out() {
        let live = Liveness::default();
        assert_eq!(live.get(), State::Alive);
        assert!(live.start_probe());
        assert!(!live.start_probe(), "one probe out at a time");
        live.probe_done();
        assert!(live.start_probe());
    }

    #[test]
    fn a_stall_is_reported_once_and_stays() {
        let live = Liveness::default();
        assert!(!live.is_stalled());
        assert!(live.stall(), "the first stall is news");
        assert!(!live.stall(), "and only the first");
        assert!(live.is_stalled());
    }

    #[test]
    fn an_unknown_never_overrides_a_dead() {
        let live = Liveness::default();
        live.record(State::Dead);
        live.record(State::Unknown);
        assert_eq!(live.get(), State::Dead);
        live.record(State::Alive);
        assert_eq!(live.get(), State::Alive, "a kernel seen again is alive");
        live.record(State::Unknown);
        assert_eq!(live.get(), State::Unknown);
        live.record(State::Dead);
        assert_eq!(live.get(), State::Dead);
    }

    #[test]
    fn no_answer_is_told_at_warning_once_per_streak() {
        let live = Liveness::default();
        assert!(!live.unknown_told.load(Ordering::Acquire));
        live.no_answer(&"Poll", &"connection down");
        assert!(live.unknown_told.load(Ordering::Acquire));
        live.answered();
        assert!(!live.unknown_told.load(Ordering::Acquire));
    }

    #[test]
    fn requests_map_to_states() {
        assert_eq!(State::of(&Ok(())), State::Alive);
        let refused = Error::Refused { dest: "a@h:22".into(), target: "h:1".into(), cause: "x".into() };
        assert_eq!(State::of(&Err(refused)), State::Dead);
        let down = Error::Down { dest: "a@h:22".into(), cause: "x".into() };
        assert_eq!(State::of(&Err(down)), State::Unknown);
    }
}
