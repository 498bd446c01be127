"""The communication port: `CommListener` serves the gateway's ``{"signum": N}`` and ``{"shutdown": 1}``.

A daemon thread of the kernel's own process, so it dies with the kernel and the gateway's next poll
is refused. It serves up to `MAX_OPEN_CONNECTIONS` connections at once from that one thread (a
selector, each connection with its own read deadline), so a peer that connects and sends nothing
delays nobody. It delivers only the signals the gateway sends, stops a kernel the gateway never takes
up (no request within the take-up timeout after the report), and escalates a shutdown request to
SIGTERM and SIGKILL of the process group when the kernel does not stop on its own.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .logs import log
from .process import GATEWAY_SIGNALS, reap_exited_children, send_signal

# A gateway request is a few bytes; anything larger is not from the gateway.
MAX_REQUEST_BYTES = 64 * 1024
# EG closes its end right after sending; a peer that keeps its connection open without completing a
# request loses it this long after it was accepted.
REQUEST_READ_TIMEOUT = 5.0
# Connections served at once; the gateway has at most a few in flight per kernel.
MAX_OPEN_CONNECTIONS = 16
# Connections the kernel queues until this thread accepts them. Beyond it a client's connection
# attempt is dropped and retried only a second later, so a burst must not fill it.
LISTEN_BACKLOG = 128
# How often the listener rechecks whether it should stop while no request arrives.
ACCEPT_POLL_INTERVAL = 0.5
# After a shutdown request the kernel gets this long to stop on its own before its process group is
# terminated: long enough for the kernel's own shutdown, short enough that a kernel stuck in a cell
# does not run on for long after the gateway believes it gone (the closed port reads as "dead").
SHUTDOWN_GRACE = 5.0
# Between SIGTERM and SIGKILL, for kernels whose code handles or ignores SIGTERM.
TERMINATE_GRACE = 2.0


@dataclass
class _Pending:
    """A connection whose request is not complete yet."""

    deadline: float
    data: bytes = b""


class CommListener(threading.Thread):
    """Serves the gateway's requests on the communication port, one JSON object per connection.

    A daemon thread of the kernel's process: it cannot outlive the kernel, and it never keeps the
    process alive on its own.
    """

    def __init__(
        self,
        sock: socket.socket,
        request_kernel_stop: Callable[[], None],
        on_interrupt: Optional[Callable[[], None]] = None,
        alternate_sigint: Optional[int] = None,
    ) -> None:
        super().__init__(name="egtunnel-comm-listener", daemon=True)
        self._sock = sock
        self._sock.setblocking(False)
        self.port: int = sock.getsockname()[1]
        self._request_kernel_stop = request_kernel_stop
        self._on_interrupt = on_interrupt
        # The kernelspec's EG_ALTERNATE_SIGINT is EG's interrupt for this kernel, in place of SIGINT.
        self._interrupt_signals = {int(signal.SIGINT)} | ({alternate_sigint} if alternate_sigint else set())
        self._allowed_signals = GATEWAY_SIGNALS | self._interrupt_signals
        self._stopping = threading.Event()
        self._shutdown_requested = False
        # Open connections in the order they were accepted, which is also the order of their deadlines.
        self._conns: dict[socket.socket, _Pending] = {}
        self._selector = selectors.DefaultSelector()
        self._overloaded = False
        self._evicted = 0
        # Set by the gateway's first request; until then `_take_up_deadline` (monotonic) may stop the kernel.
        self.taken_up = threading.Event()
        self._take_up_deadline: Optional[float] = None
        # Set by the main thread once the kernel has returned; ends the shutdown escalation.
        self.kernel_stopped = threading.Event()
        # A process forked by kernel code (multiprocessing, os.fork) would otherwise hold the port
        # open after the kernel is gone, and the gateway would keep seeing a live kernel.
        os.register_at_fork(after_in_child=self._close_in_child)

    def stop(self) -> None:
        self._stopping.set()

    def expect_take_up(self, seconds: float) -> None:
        """The connection info is out: the gateway's first request must arrive within `seconds` (0: no limit)."""
        if seconds > 0:
            self._take_up_deadline = time.monotonic() + seconds

    def _abandoned(self) -> bool:
        deadline = self._take_up_deadline
        return deadline is not None and not self.taken_up.is_set() and time.monotonic() > deadline

    def run(self) -> None:
        # Signals sent to the process must land on the kernel's main thread: a SIGINT taken by this
        # thread would not wake a cell sleeping in a system call.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self._serve()
        finally:
            # Closed before the kernel is stopped, so the gateway's polls turn into refusals at once.
            for conn in list(self._conns):
                self._close(conn)
            self._selector.close()
            self._sock.close()
        if self._shutdown_requested:
            self._stop_kernel()

    def _serve(self) -> None:
        self._selector.register(self._sock, selectors.EVENT_READ)
        while not self._stopping.is_set():
            if self._abandoned():
                # Nothing holds this kernel: the gateway died or gave the start up after the report.
                log.error("no request from the gateway within the take-up timeout after the connection "
                          "info was sent; nobody uses this kernel, so it stops")  # fmt: skip
                self._shutdown_requested = True
                return
            for key, _ in self._selector.select(self._select_timeout()):
                if self._stopping.is_set():
                    return
                if key.fileobj is self._sock:
                    self._accept()
                elif key.fileobj in self._conns:
                    assert isinstance(key.fileobj, socket.socket)
                    self._receive(key.fileobj)
            self._expire()

    def _select_timeout(self) -> float:
        if not self._conns:
            return ACCEPT_POLL_INTERVAL
        nearest = next(iter(self._conns.values())).deadline
        return max(0.0, min(ACCEPT_POLL_INTERVAL, nearest - time.monotonic()))

    def _accept(self) -> None:
        # A burst is taken a round at a time rather than one per wake-up, so that it does not sit in
        # the backlog; the bound leaves the open connections their turn in between.
        for _ in range(MAX_OPEN_CONNECTIONS):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                # Reset before this thread got to it; nothing to serve.
                continue
            except OSError as exc:
                if not self._stopping.is_set():
                    log.warning("accepting on the communication port failed: %s", exc)
                    # Out of file descriptors, say: the port stays ready, and retrying at once would spin.
                    time.sleep(ACCEPT_POLL_INTERVAL)
                return
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if len(self._conns) >= MAX_OPEN_CONNECTIONS:
            self._make_room()
        self._conns[conn] = _Pending(time.monotonic() + REQUEST_READ_TIMEOUT)
        self._selector.register(conn, selectors.EVENT_READ)

    def _make_room(self) -> None:
        # The oldest connection is closed for the new one, rather than the new one refused or left in
        # the backlog: the gateway sends its request as soon as it is connected, so its connection is
        # never the oldest for more than a moment, while connections held open without a request are.
        # Refusing new connections would drop the gateway's requests (EG's send does not notice), and
        # the backlog would hold them until idle connections time out, seconds per connection.
        if not self._overloaded:
            self._overloaded = True
            log.warning("%d connections are open on the communication port; the oldest are closed "
                        "unserved to make room for new ones", MAX_OPEN_CONNECTIONS)  # fmt: skip
        oldest = next(iter(self._conns))
        # A request already waiting on it is still served.
        self._receive(oldest)
        if oldest in self._conns:
            self._close(oldest)
            self._evicted += 1

    def _receive(self, conn: socket.socket) -> None:
        pending = self._conns[conn]
        try:
            chunk = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("ignoring a request that was not completed: %s", exc)
            self._close(conn)
            return
        pending.data += chunk
        if len(pending.data) > MAX_REQUEST_BYTES:
            log.warning("ignoring a request larger than %d bytes", MAX_REQUEST_BYTES)
            self._close(conn)
            return
        # A complete object is the whole request (more bytes could only make it invalid), so it is
        # served without waiting for the sender to close; a relay that does not pass the close on
        # cannot delay it. At end of stream, what was sent is all there is.
        request = _json_object(pending.data) if chunk else _decode(pending.data)
        if request is None and chunk:
            return
        self._close(conn)
        if request is not None:
            self.handle(request)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn, pending in list(self._conns.items()):
            if pending.deadline > now:
                break
            if pending.data:
                log.warning("ignoring a request that was not completed within %.0f s", REQUEST_READ_TIMEOUT)
            self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        del self._conns[conn]
        conn.close()
        # Hysteresis, so that a peer holding the port full makes one warning, not one per request served.
        if self._overloaded and len(self._conns) <= MAX_OPEN_CONNECTIONS // 2:
            log.info("the communication port is no longer overloaded; %d connections were closed unserved",
                     self._evicted)  # fmt: skip
            self._overloaded = False
            self._evicted = 0

    def handle(self, request: dict[str, Any]) -> None:
        """Act on one decoded request; anything malformed is logged and ignored."""
        if "signum" in request or "shutdown" in request:
            self.taken_up.set()
        if "signum" in request:
            self._signal(request["signum"])
        if request.get("shutdown"):
            log.info("shutdown requested by the gateway")
            self._shutdown_requested = True
            self._stopping.set()
        unknown = set(request) - {"signum", "shutdown"}
        if unknown:
            log.warning("ignoring unknown request fields: %s", ", ".join(sorted(unknown)))

    def _signal(self, raw: Any) -> None:
        # EG's own listener takes int(value), so numeric strings are accepted too.
        try:
            if isinstance(raw, bool) or not isinstance(raw, (int, str)):
                raise ValueError
            signum = int(raw)
            if signum < 0:
                raise ValueError
        except ValueError:
            log.warning("ignoring a signal request with an invalid signal number: %r", raw)
            return
        if signum not in self._allowed_signals:
            log.warning("refusing signal %d: the gateway sends only signals %s",
                        signum, ", ".join(map(str, sorted(self._allowed_signals))))  # fmt: skip
            return
        if signum == 0:
            # A poll: that this thread answers proves the kernel's process is alive.
            return
        log.info("signal %d requested by the gateway", signum)
        try:
            send_signal(signum)
        except (OSError, ValueError) as exc:
            log.warning("sending signal %d failed: %s", signum, exc)
            return
        if signum in self._interrupt_signals and self._on_interrupt is not None:
            try:
                self._on_interrupt()
            except Exception:
                log.exception("interrupt hook failed")

    def _stop_kernel(self) -> None:
        try:
            self._request_kernel_stop()
        except Exception:
            log.exception("asking the kernel to shut down failed")
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while time.monotonic() < deadline:
            reap_exited_children()
            if self.kernel_stopped.wait(0.1):
                return
        log.warning("the kernel did not stop within %.0f s of the shutdown request; terminating it", SHUTDOWN_GRACE)
        for signum, grace in ((signal.SIGTERM, TERMINATE_GRACE), (signal.SIGKILL, None)):
            try:
                send_signal(signum)
            except OSError as exc:
                log.warning("sending signal %d failed: %s", signum, exc)
            if grace is not None and self.kernel_stopped.wait(grace):
                return

    def _close_in_child(self) -> None:
        # Only the child's descriptors are closed: unregistering from the selector here would remove
        # the parent's registrations, as the child shares the parent's epoll instance.
        for sock in (self._sock, *self._conns):
            try:
                sock.close()
            except OSError:
                pass


def _decode(data: bytes) -> Optional[dict[str, Any]]:
    """The request a sender completed by closing; None, with the reason logged, unless it is a JSON object."""
    if not data:
        return None
    try:
        request = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        log.warning("ignoring a request that is not JSON: %s", exc)
        return None
    if not isinstance(request, dict):
        log.warning("ignoring a request that is not a JSON object: %r", request)
        return None
    return request


def _json_object(data: bytes) -> Optional[dict[str, Any]]:
    if not data.rstrip().endswith(b"}"):
        return None
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None
