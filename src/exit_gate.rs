//! Keeps every thread but the one shutting Python down out of the interpreter once it starts to close.
//!
//! When Python finalizes, a thread that takes the GIL is ended on the spot by `pthread_exit`, a forced
//! unwind. Through Rust frames that unwind aborts the whole process ("FATAL: exception not rethrown"),
//! so a gateway stopped while its tunnels log, or a command completes, would die with a core dump. The
//! gate closes from Python's `atexit` (before finalization begins), waits for the calls into Python
//! already in flight, and from then on:
//! - runtime threads skip Python: log records go to stderr, awaitables are never completed;
//! - a Python thread returning from a native wait (a daemon thread, say) parks for good instead of
//!   taking the GIL back; the process's exit ends it without unwinding.
//!
//! Plain Rust: an `Entry` is held across every call into Python made by a thread that does not
//! already hold the GIL, and dropped once that call has the GIL back or is done.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

static CLOSED: AtomicBool = AtomicBool::new(false);
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// The thread that closed the gate (the one finalizing Python); it alone keeps using Python.
static CLOSER: Mutex<Option<ThreadId>> = Mutex::new(None);
/// Signalled when the last entry in flight drops after the gate closed.
static DRAINED: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());

/// Permission for one call into Python; the gate waits for it before letting Python finalize.
#[must_use]
pub struct Entry(());

impl Drop for Entry {
    fn drop(&mut self) {
        if IN_FLIGHT.fetch_sub(1, Ordering::SeqCst) == 1 && CLOSED.load(Ordering::SeqCst) {
            let _guard = DRAINED.0.lock().unwrap_or_else(|e| e.into_inner());
            DRAINED.1.notify_all();
        }
    }
}

/// An entry, or None once the gate has closed (the caller must then not touch Python).
pub fn enter() -> Option<Entry> {
    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    // Counted before looking: `close` either sees this entry or this call sees the gate closed.
    if CLOSED.load(Ordering::SeqCst) {
        drop(Entry(()));
        return None;
    }
    Some(Entry(()))
}

/// For a Python thread about to take the GIL back after a native wait: an entry to drop once it has
/// the GIL. Once the gate is closed, every thread but the closer parks here for good.
pub fn before_returning_to_python() -> Option<Entry> {
    if let Some(e) = enter() {
        return Some(e);
    }
    if is_closer() {
        return None;
    }
    loop {
        std::thread::park();
    }
}

pub fn is_closed() -> bool {
    CLOSED.load(Ordering::SeqCst)
}

fn is_closer() -> bool {
    *CLOSER.lock().unwrap_or_else(|e| e.into_inner()) == Some(std::thread::current().id())
}

/// Closes the gate and waits (at most `wait`) for calls into Python in flight. Call without the GIL,
/// which those calls may need. Returns how many were still in flight when the wait ended.
pub fn close(wait: Duration) -> usize {
    *CLOSER.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current().id());
    CLOSED.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + wait;
    let mut guard = DRAINED.0.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let left = IN_FLIGHT.load(Ordering::SeqCst);
        let now = Instant::now();
        if left == 0 || now >= deadline {
            return left;
        }
        guard = DRAINED.1.wait_timeout(guard, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the gate is process-wide and closes once.
    #[test]
    fn close_waits_for_entries_in_flight_then_refuses_new_ones() {
        static RELEASED: AtomicBool = AtomicBool::new(false);
        let held = enter().expect("open gate");
        // What close saw is judged by the order of events, not by timings that a loaded machine
        // stretches (the waiter may start running well after it was spawned).
        let waiter = std::thread::spawn(|| {
            let started = Instant::now();
            let left = close(Duration::from_secs(5));
            (left, RELEASED.load(Ordering::SeqCst), started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "close returned while an entry was in flight");
        RELEASED.store(true, Ordering::SeqCst);
        drop(held);
        let (left, released_first, took) = waiter.join().unwrap();
        assert_eq!(left, 0);
        assert!(released_first, "close returned before the entry in flight was dropped");
        assert!(took < Duration::from_secs(5), "close waited for its deadline, not for the entry");
        assert!(enter().is_none(), "entries after close");
        assert!(is_closed());
        // A thread other than the closer would park for good; the closer goes on.
        let parked = std::thread::spawn(|| {
            let _ = before_returning_to_python();
            unreachable!("a thread returned to Python after the gate closed");
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!parked.is_finished());
    }
}
