//! Counters shared between a forward, its local connections and the connection driver.
//!
//! Atomics rather than messages: status() and stats() read them from any thread without asking the
//! driver, so observing a busy tunnel never slows it down.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::metrics::{DestTotals, OpenChannel};

#[derive(Default)]
pub struct ForwardStats {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Local connections accepted since the forward opened.
    pub connections: AtomicU64,
    /// Local connections currently being served.
    pub active: AtomicU64,
    /// SSH channels of this forward the driver still holds; terminate waits for zero.
    open_channels: AtomicUsize,
    channels_closed: Notify,
    /// The destination's process-wide totals, which outlive this forward (see `metrics`).
    totals: Arc<DestTotals>,
}

impl ForwardStats {
    /// Counts for a new forward, adding to its destination's totals as well.
    pub fn new(totals: Arc<DestTotals>) -> Self {
        totals.forwards_opened.fetch_add(1, Ordering::Relaxed);
        ForwardStats { totals, ..Default::default() }
    }

    pub fn add_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        self.totals.bytes_from_remote.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn add_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        self.totals.bytes_to_remote.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn open_channels(&self) -> usize {
        self.open_channels.load(Ordering::Acquire)
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

/// Held by the driver for each live channel of a forward.
pub struct ChannelGuard(
    Arc<ForwardStats>,
    // Held only for its Drop: counts the channel in the destination's metrics while it lives.
    #[allow(dead_code)] OpenChannel,
);

impl ChannelGuard {
    pub fn new(stats: Arc<ForwardStats>) -> Self {
        stats.open_channels.fetch_add(1, Ordering::AcqRel);
        let open = OpenChannel::new(stats.totals.clone());
        ChannelGuard(stats, open)
    }

    pub fn stats(&self) -> &ForwardStats {
        &self.0
    }
}

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        if self.0.open_channels.fetch_sub(1, Ordering::AcqRel) == 1 {
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
