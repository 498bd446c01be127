//! One forwarded byte stream over a direct-tcpip channel, both halves: `carry` moves bytes between a
//! local stream and the channel's queues, `ForwardChannel` between those queues and libssh2, stepped
//! by the connection actor that owns the session. `DirectTcpip` is the request for such a channel.
//!
//! Forwards' local connections use it, and so do a ProxyJump relay and requests to a kernel's ports.

use std::sync::Arc;

use log::debug;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::driver::{is_fatal, Attempt, SshIo, Step};
use crate::metrics::{ChannelGuard, ForwardStats};
use crate::raw_channel::{Locked, RawChannel};
use crate::ready::{Flag, Nudge};

/// Chunks in flight per direction per local connection; bounds memory and gives backpressure.
pub const QUEUE_DEPTH: usize = 4;
/// Largest chunk moved at once. Several SSH packets per chunk means fewer wake-ups per byte.
pub const CHUNK: usize = 128 * 1024;
/// A local connection's first read buffer; it doubles (up to CHUNK) whenever a read fills it.
const FIRST_READ: usize = 4096;

/// A direct-tcpip channel to ask for: its target and the queues its bytes flow through (to the
/// remote end, and back from it).
pub struct DirectTcpip {
    pub host: String,
    pub port: u16,
    pub to_remote: mpsc::Receiver<Vec<u8>>,
    pub from_remote: mpsc::Sender<Vec<u8>>,
    pub stats: Arc<ForwardStats>,
}

/// The SSH half of one forwarded local connection.
pub struct ForwardChannel {
    ch: RawChannel,
    to_remote: mpsc::Receiver<Vec<u8>>,
    from_remote: Option<mpsc::Sender<Vec<u8>>>,
    /// A chunk being written and how much of it went out already.
    pending: Option<(Vec<u8>, usize)>,
    local_eof: bool,
    eof_sent: bool,
    remote_eof: bool,
    local_gone: bool,
    close_sent: bool,
    /// The last step stopped reading because the local side's queue was full; the local task wakes
    /// the actor as soon as it takes a chunk.
    waiting_for_room: bool,
    /// Not stepped yet: its first step must happen whatever else is known.
    fresh: bool,
    /// libssh2 received packets since this channel last read, which may include some for it.
    inbound_unchecked: bool,
    /// The last read returned "would block" although data was queued: libssh2 was sending this
    /// channel's window adjustment first. Until it is out, no other packet of the session can go out,
    /// so the channel is driven on every pass, room on the local side or not.
    read_blocked: bool,
    /// A chunk read from libssh2 that the local side had no room for yet.
    held: Option<Vec<u8>>,
    guard: ChannelGuard,
    /// Raised by the local side (see `ready`).
    flag: Flag,
}

impl ForwardChannel {
    pub fn new(
        ch: RawChannel,
        to_remote: mpsc::Receiver<Vec<u8>>,
        from_remote: mpsc::Sender<Vec<u8>>,
        guard: ChannelGuard,
        flag: Flag,
    ) -> Self {
        ForwardChannel {
            ch,
            to_remote,
            from_remote: Some(from_remote),
            pending: None,
            local_eof: false,
            eof_sent: false,
            remote_eof: false,
            local_gone: false,
            close_sent: false,
            waiting_for_room: false,
            fresh: true,
            inbound_unchecked: false,
            read_blocked: false,
            held: None,
            guard,
            flag,
        }
    }

    pub fn clear_flag(&self) {
        self.flag.clear();
    }

    /// In the middle of something that no local event announces: new, a chunk, EOF, window
    /// adjustment or close going out. Such a channel is stepped on every pass until it is through.
    pub fn busy(&self) -> bool {
        self.fresh || self.read_blocked || self.pending.is_some() || (self.local_eof && !self.eof_sent) || self.closing()
    }

    /// Whether libssh2 may hold bytes or EOF for this channel that it has not read yet; asked of every
    /// forward after packets were received, under one session lock (`held`), so it checks libssh2's
    /// queue only for a channel that still reads.
    pub fn may_have_inbound<G>(&self, held: &Locked<G>) -> bool {
        self.from_remote.is_some() && !self.remote_eof && !self.local_gone && self.ch.has_inbound_under(held)
    }

    /// Whether a step of a channel the actor picked (see `Channels::step_all`) could move anything,
    /// judged from the local queues alone unless libssh2 received packets since this channel last read
    /// (`rescan`; they may be for it). A channel in the middle of something (a chunk, EOF, window
    /// adjustment or close going out) is always stepped: it waits on the socket or on the peer's
    /// window, which no local event announces, and libssh2 sends nothing else of the session until
    /// that packet is out.
    pub fn wants_step(&mut self, rescan: bool) -> bool {
        if self.busy() {
            return true;
        }
        if !self.local_eof && (!self.to_remote.is_empty() || self.to_remote.is_closed()) {
            return true;
        }
        let Some(tx) = self.from_remote.as_ref() else { return false };
        if tx.is_closed() {
            return true;
        }
        if self.remote_eof {
            return false;
        }
        // Remembered until the local side has room to take what may be there.
        self.inbound_unchecked |= rescan;
        if tx.capacity() == 0 {
            // The local task wakes the actor when it takes a chunk; whatever is held or queued waits for that.
            self.waiting_for_room |= self.held.is_some() || self.inbound_unchecked;
            return false;
        }
        if self.held.is_some() {
            return true;
        }
        if !(self.inbound_unchecked || self.waiting_for_room) {
            return false;
        }
        let has_inbound = self.ch.has_inbound();
        if !has_inbound {
            self.inbound_unchecked = false;
            self.waiting_for_room = false;
        }
        has_inbound
    }

    /// Both directions are done and the channel's close is under way.
    fn closing(&self) -> bool {
        self.eof_sent && (self.remote_eof || self.local_gone)
    }

    /// Moves what can move now: local bytes out, then remote bytes in, then closing.
    pub fn step(&mut self, io: &SshIo, want_write: &mut bool, scratch: &mut [u8]) -> Step {
        self.fresh = false;
        // Outbound: local → remote. A chunk stays `pending` until fully written, so a retried write
        // passes libssh2 the same bytes it started with.
        loop {
            if self.pending.is_none() && !self.local_eof {
                match self.to_remote.try_recv() {
                    Ok(buf) => self.pending = Some((buf, 0)),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => self.local_eof = true,
                }
            }
            let Some((buf, off)) = self.pending.as_mut() else { break };
            match io.attempt_rc(want_write, self.ch.write(&buf[*off..])) {
                Attempt::Done(n) => {
                    *off += n;
                    self.guard.stats().add_out(n);
                    if *off == buf.len() {
                        self.pending = None;
                    }
                }
                Attempt::Blocked => break,
                Attempt::Failed(e) => return Self::failed(e),
            }
        }
        if self.local_eof && self.pending.is_none() && !self.eof_sent {
            match io.attempt_small(want_write, |ch: &mut RawChannel| ch.send_eof().into_result(), &mut self.ch) {
                Attempt::Done(_) => self.eof_sent = true,
                Attempt::Blocked => {}
                Attempt::Failed(e) => return Self::failed(e),
            }
        }

        // Inbound: remote → local, only as far as the local side has room (backpressure). The pump has
        // already pulled the socket into libssh2's queue, so a channel with nothing queued is skipped:
        // a read would only cost a recv() that says "try again", once per idle channel per wake-up.
        // A read may run ahead of the local side by one chunk (`held`): a read that libssh2 blocked
        // while sending this channel's window adjustment must be repeated as it was, room or not, since
        // libssh2 recomputes the adjustment from the length asked for when it resends it.
        self.waiting_for_room = false;
        self.inbound_unchecked = false;
        loop {
            if self.remote_eof || self.local_gone {
                break;
            }
            let Some(tx) = self.from_remote.as_ref() else { break };
            if tx.is_closed() {
                // Nobody reads this direction any more (the local socket failed): nothing to wait for.
                self.local_gone = true;
                break;
            }
            if let Some(chunk) = self.held.take() {
                match tx.try_reserve() {
                    Ok(permit) => permit.send(chunk),
                    Err(mpsc::error::TrySendError::Full(())) => {
                        self.held = Some(chunk);
                        self.waiting_for_room = true;
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(())) => {
                        self.local_gone = true;
                        break;
                    }
                }
            }
            if !(self.read_blocked || self.ch.has_inbound()) {
                break;
            }
            match io.attempt_rc(want_write, self.ch.read(0, scratch)) {
                Attempt::Done(0) => self.remote_eof = true,
                Attempt::Done(n) => {
                    self.read_blocked = false;
                    self.guard.stats().add_in(n);
                    self.held = Some(scratch[..n].to_vec());
                }
                // Data is queued (or the loop would not have read), so libssh2 is sending first.
                Attempt::Blocked => {
                    self.read_blocked = true;
                    break;
                }
                Attempt::Failed(e) => return Self::failed(e),
            }
        }
        if self.remote_eof || self.local_gone {
            // Dropping the sender lets the local task finish writing and half-close its socket.
            self.from_remote = None;
        }

        // Both directions finished: close the channel (after which libssh2 may free it at once).
        if self.closing() {
            return self.close(io, want_write);
        }
        Step::Continue
    }

    /// Whether libssh2 holds something for this channel that nothing will wake the actor for: queued
    /// bytes or the server's EOF, unless the channel is waiting for its local side to take a chunk, or
    /// for libssh2 (`read_blocked`). Asked only when the session has nothing waiting to go out, so a
    /// blocked read then means a key re-exchange: libssh2 sends the window adjustment that comes
    /// before the read only once the new keys are in, and those come from the server, whose packets
    /// the socket's readability announces. The channel is stepped on every pass until then (`busy`).
    pub fn has_unread(&self) -> bool {
        let open = self.from_remote.is_some() && !self.remote_eof && !self.local_gone;
        open && !self.waiting_for_room && !self.read_blocked && (self.held.is_some() || self.ch.has_inbound())
    }

    /// What the settle check reports of a channel it found holding unread packets: enough to tell
    /// which rule of `wants_step` left it alone.
    pub fn settle_report(&self) -> String {
        format!("forward held={} wfr={} rb={} busy={} reof={} leof={} cap={:?} inb={} unchecked={} pending={} fresh={}",
            self.held.as_ref().map(|h| h.len()).unwrap_or(0), self.waiting_for_room, self.read_blocked, self.busy(), self.remote_eof,
            self.local_eof, self.from_remote.as_ref().map(|t| t.capacity()), self.ch.has_inbound(), self.inbound_unchecked,
            self.pending.is_some(), self.fresh)
    }

    /// Reads nothing but makes libssh2 pull every packet the socket holds into its queue. Returns
    /// whether that happened (a channel already at EOF short-circuits without reading).
    pub fn drain(&mut self, io: &SshIo, want_write: &mut bool) -> std::result::Result<bool, String> {
        // A read libssh2 left mid-way must be repeated with its own length, not an empty one; and a
        // channel whose receive window libssh2 would enlarge on this read is not used either: an
        // adjustment sent for an empty read and booked for a full one (or the reverse) leaves libssh2
        // and the server disagreeing about the window, which loses data or stalls the channel.
        let (remaining, initial) = self.ch.window();
        if self.remote_eof || self.read_blocked || remaining < initial / 4 * 3 {
            return Ok(false);
        }
        match io.attempt_rc(want_write, self.ch.read(0, &mut [])) {
            Attempt::Blocked => Ok(true),
            Attempt::Done(_) => Ok(false),
            Attempt::Failed(e) if is_fatal(&e) => Err(e.message().to_string()),
            Attempt::Failed(_) => Ok(false),
        }
    }

    fn close(&mut self, io: &SshIo, want_write: &mut bool) -> Step {
        if self.close_sent {
            return Step::Finished;
        }
        match io.attempt_rc(want_write, self.ch.close()) {
            Attempt::Done(_) => {
                self.close_sent = true;
                Step::Finished
            }
            Attempt::Blocked => Step::Continue,
            Attempt::Failed(e) if is_fatal(&e) => Step::Fatal(e.message().to_string()),
            Attempt::Failed(_) => Step::Finished,
        }
    }

    fn failed(e: ssh2::Error) -> Step {
        if is_fatal(&e) {
            return Step::Fatal(e.message().to_string());
        }
        debug!("forwarded channel failed: {}", e.message());
        Step::Finished
    }
}

/// Moves bytes between a local stream and a channel's queues until both directions have ended, raising
/// the channel's nudge after each move. `on_remote_data` runs for each chunk from the remote end,
/// `on_remote_end` once that direction has ended, before the local side sees EOF.
pub async fn carry<R, W>(
    mut rd: R,
    mut wr: W,
    to_remote: mpsc::Sender<Vec<u8>>,
    mut from_remote: mpsc::Receiver<Vec<u8>>,
    wake: &Nudge,
    on_remote_data: impl Fn(),
    on_remote_end: impl FnOnce(),
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let upstream = async move {
        let tx = to_remote;
        // One read buffer per connection, small until reads fill it: an idle kernel's ZMQ connection
        // (a hundred kernels hold six or seven each) keeps a page, a bulk transfer grows to CHUNK.
        // Each message is an exact-size copy.
        let mut buf = vec![0u8; FIRST_READ];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                    wake.raise();
                    if n == buf.len() && n < CHUNK {
                        buf.resize((2 * n).min(CHUNK), 0);
                    }
                }
            }
        }
        // Dropping `tx` tells the actor: local EOF, send the channel EOF once flushed.
        drop(tx);
        wake.raise();
    };
    let downstream = async {
        while let Some(buf) = from_remote.recv().await {
            on_remote_data();
            wake.raise();
            if wr.write_all(&buf).await.is_err() {
                break;
            }
        }
        on_remote_end();
        let _ = wr.shutdown().await;
        // Closing the receiver tells the actor nobody reads this direction any more.
        from_remote.close();
        wake.raise();
    };
    tokio::join!(upstream, downstream);
}
