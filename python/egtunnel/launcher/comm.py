"""The communication port: `CommListener` serves the gateway's ``{"signum": N}`` and ``{"shutdown": 1}``.

A daemon thread of the kernel's own process, so it dies with the kernel and the gateway's next poll
is refused. It also stops a kernel the gateway never takes up (no request within the take-up timeout
after the report), and escalates a shutdown request to SIGTERM and SIGKILL of the process group when
the kernel does not stop on its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Optional

from .logs import log
from .process import reap_exited_children, send_signal

# A gateway request is a few bytes; anything larger is not from the gateway.
MAX_REQUEST_BYTES = 64 * 1024
# EG closes its end right after sending; a peer that keeps the connection open must not stall the
# listener, because polls and interrupts queue behind it.
REQUEST_READ_TIMEOUT = 5.0
# How often the listener rechecks whether it should stop while no request arrives.
ACCEPT_POLL_INTERVAL = 0.5
# After a shutdown request the kernel gets this long to stop on its own before its process group is
# terminated: long enough for the kernel's own shutdown, short enough that a kernel stuck in a cell
# does not run on for long after the gateway believes it gone (the closed port reads as "dead").
SHUTDOWN_GRACE = 5.0
# Between SIGTERM and SIGKILL, for kernels whose code handles or ignores SIGTERM.
TERMINATE_GRACE = 2.0


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
    ) -> None:
        super().__init__(name="egtunnel-comm-listener", daemon=True)
        self._sock = sock
        self._sock.settimeout(ACCEPT_POLL_INTERVAL)
        self.port: int = sock.getsockname()[1]
        self._request_kernel_stop = request_kernel_stop
        self._on_interrupt = on_interrupt
        self._stopping = threading.Event()
        self._shutdown_requested = False
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
            while not self._stopping.is_set():
                if self._abandoned():
                    # Nothing holds this kernel: the gateway died or gave the start up after the report.
                    log.error("no request from the gateway within the take-up timeout after the connection "
                              "info was sent; nobody uses this kernel, so it stops")  # fmt: skip
                    self._shutdown_requested = True
                    break
                try:
                    conn, _ = self._sock.accept()
                except socket.timeout:
                    continue
                except OSError as exc:
                    if self._stopping.is_set():
                        break
                    log.warning("accepting on the communication port failed: %s", exc)
                    time.sleep(ACCEPT_POLL_INTERVAL)
                    continue
                with conn:
                    request = self._read_request(conn)
                if request is not None:
                    self.handle(request)
        finally:
            # Closed before the kernel is stopped, so the gateway's polls turn into refusals at once.
            self._sock.close()
        if self._shutdown_requested:
            self._stop_kernel()

    def _read_request(self, conn: socket.socket) -> Optional[dict[str, Any]]:
        conn.settimeout(REQUEST_READ_TIMEOUT)
        data = b""
        try:
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_REQUEST_BYTES:
                    log.warning("ignoring a request larger than %d bytes", MAX_REQUEST_BYTES)
                    return None
                # A complete object is the whole request (more bytes could only make it invalid), so
                # it is served without waiting for the sender to close; a relay that does not pass
                # the close on cannot delay it.
                request = _json_object(data)
                if request is not None:
                    return request
        except OSError as exc:
            log.warning("ignoring a request that was not completed: %s", exc)
            return None
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
        if signum == 0:
            # A poll: that this thread answers proves the kernel's process is alive.
            return
        log.info("signal %d requested by the gateway", signum)
        try:
            send_signal(signum)
        except (OSError, ValueError) as exc:
            log.warning("sending signal %d failed: %s", signum, exc)
            return
        if signum == signal.SIGINT and self._on_interrupt is not None:
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
        try:
            self._sock.close()
        except OSError:
            pass


def _json_object(data: bytes) -> Optional[dict[str, Any]]:
    if not data.rstrip().endswith(b"}"):
        return None
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None
