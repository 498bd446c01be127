//! What listens behind a forward, as the last request to its remote port found it (see `requests`).
//! A forward holds one; status() and `Tunnel.probe` read it without waiting on anything.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

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

/// The liveness of what listens behind one forward, and whether a probe is out.
#[derive(Default)]
pub struct Liveness {
    state: AtomicU8,
    probing: AtomicBool,
    /// Until when (ms on `clock()`) probes skip the host's batch: a request was just delivered (a
    /// signal, a shutdown), the kernel may be on its way out, and Enterprise Gateway is polling every
    /// half second to see it gone. A batch would answer a kill only after up to `BATCH_WINDOW`, for
    /// every kernel a gateway shuts down, one after another.
    direct_until: AtomicU64,
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
