//! Which channels the connection actor must step: each channel's local side says so itself.
//!
//! Stepping every channel on every wake-up to find the few with work made an idle connection's cost
//! grow with its channel count: at a hundred kernels (six hundred channels) that search was most of an
//! idle gateway's CPU. Instead, the task on a channel's local side holds a `Nudge`. Queuing bytes,
//! taking bytes, ending a direction or going away raises it: the channel's key goes on the connection's
//! ready list (once, until the actor takes it) and the actor wakes. The actor steps what is on that
//! list, the channels in the middle of something, and, after libssh2 received packets, the channels
//! libssh2 now holds something for (see `Channels::step_all`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// A connection's wake-up, and the keys of the channels whose local side moved since the actor last looked.
#[derive(Default)]
pub struct ReadyList {
    keys: Mutex<Vec<u64>>,
    pub wake: Notify,
}

impl ReadyList {
    /// A new channel's two ends of one flag: the local side's `Nudge` and the actor's `Flag`.
    pub fn pair(self: &Arc<Self>) -> (Nudge, Flag) {
        let inner = Arc::new(Inner { key: NEXT_KEY.fetch_add(1, Ordering::Relaxed), raised: AtomicBool::new(false), list: self.clone() });
        (Nudge(inner.clone()), Flag(inner))
    }

    /// Appends the keys raised since the last call to `into`.
    pub fn take(&self, into: &mut Vec<u64>) {
        into.append(&mut self.keys.lock().unwrap());
    }
}

struct Inner {
    key: u64,
    raised: AtomicBool,
    list: Arc<ReadyList>,
}

impl Inner {
    fn raise(&self) {
        // Already on the list: the actor has not looked yet, and will see whatever this raise announces.
        if !self.raised.swap(true, Ordering::AcqRel) {
            self.list.keys.lock().unwrap().push(self.key);
        }
        self.list.wake.notify_one();
    }
}

/// The local side's end: raise after every change the actor must act on. Dropping it raises too, so
/// a local side that goes away (a cancelled request, a closed socket) is noticed at once.
pub struct Nudge(Arc<Inner>);

impl Nudge {
    pub fn raise(&self) {
        self.0.raise();
    }
}

impl Drop for Nudge {
    fn drop(&mut self) {
        self.0.raise();
    }
}

/// The actor's end, kept with the channel.
pub struct Flag(Arc<Inner>);

impl Flag {
    pub fn key(&self) -> u64 {
        self.0.key
    }

    /// Called before the channel is stepped: any raise from here on puts it back on the list.
    pub fn clear(&self) {
        self.0.raised.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raise_lists_the_key_once_until_the_actor_clears_it() {
        let list = Arc::new(ReadyList::default());
        let (nudge, flag) = list.pair();
        let mut keys = Vec::new();
        nudge.raise();
        nudge.raise();
        list.take(&mut keys);
        assert_eq!(keys, vec![flag.key()]);
        keys.clear();
        nudge.raise();
        list.take(&mut keys);
        assert!(keys.is_empty(), "raised while still listed");
        flag.clear();
        nudge.raise();
        list.take(&mut keys);
        assert_eq!(keys, vec![flag.key()]);
    }

    #[test]
    fn dropping_the_local_end_raises() {
        let list = Arc::new(ReadyList::default());
        let (nudge, flag) = list.pair();
        drop(nudge);
        let mut keys = Vec::new();
        list.take(&mut keys);
        assert_eq!(keys, vec![flag.key()]);
    }
}
