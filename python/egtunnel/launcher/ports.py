"""The kernel's ports within EG's port range, and the connection file the kernel reads them from."""

from __future__ import annotations

import json
import os
import random
import socket
import tempfile
from typing import Any, Optional

from .errors import LaunchError
from .logs import log

KERNEL_PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")


def bind_in_range(ip: str, port_range: tuple[int, int], retries: int) -> socket.socket:
    """A TCP socket bound to a free port of the range (any port for 0..0)."""
    lower, upper = port_range
    attempts = 1 if lower == upper else retries + 1
    last_error: Optional[OSError] = None
    for _ in range(attempts):
        candidate = 0 if lower == upper else random.randint(lower, upper)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((ip, candidate))
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    raise LaunchError(f"no free port found in range {lower}..{upper} on {ip} after {attempts} attempts: {last_error}")


def write_connection_file(path: Optional[str], kernel_id: str, info: dict[str, Any]) -> str:
    if path is None or not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        fd, path = tempfile.mkstemp(prefix=f"kernel-{kernel_id}-", suffix=".json")
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # The file holds the message-signing key.
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(info, handle, indent=2)
    return path


def remove_connection_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove connection file %s: %s", path, exc)
