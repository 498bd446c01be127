"""The launcher's logger, and where its messages go: the kernel log EG collects, never users' cells.

Every module of the launcher logs through the one logger named ``egtunnel.launcher``, so each line
carries that name whichever part of the launcher wrote it.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("egtunnel.launcher")


def log_to_original_stderr(level: int) -> None:
    # Once the kernel starts it redirects file descriptor 2 to the notebook; a duplicate taken now
    # keeps the launcher's messages in the kernel log and out of users' cells.
    stream = os.fdopen(os.dup(2), "w", buffering=1)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(levelname)1.1s %(asctime)s.%(msecs)03d %(name)s] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def log_level() -> int:
    raw = os.environ.get("LOG_LEVEL") or os.environ.get("EG_LOG_LEVEL") or "INFO"
    if raw.isdigit():
        return int(raw)
    level = logging.getLevelName(raw.upper())
    return level if isinstance(level, int) else logging.INFO
