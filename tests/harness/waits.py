"""Polling with a deadline, and the time the harness gives a server or service to come up.

Everything the harness starts is judged from the outside (a log line, a listening port, a process
gone), so waiting means polling; a timeout names what was awaited.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

# How long a server or service may take to start (sshd, an echo server, an `ssh -L`) or a port to open.
START_TIMEOUT = 10.0

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.02, what: str = "") -> T:
    """Poll predicate until it returns a truthy value (returned) or raise TimeoutError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what or predicate!r}")
        time.sleep(interval)
