"""Ownership marks: which test process started what, so that all of it can be stopped, now or by the
next run if this one crashes.

Every process the harness starts carries EGTUNNEL_TEST_OWNER=<our pid>:<serial> in its environment
(sshd sessions get it through sshd's SetEnv), because sshd's per-connection processes call setsid()
and escape any process group, and commands started over SSH may outlive their session. Stopping a
server kills what carries its mark; the next run kills what a crashed run left behind (reap_stale).
Every server and host registers here too, and whatever is still open at interpreter exit is closed.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import shutil
import threading
from typing import Optional

from . import netns
from .procs import alive, all_pids, kill_and_wait

OWNER_ENV = "EGTUNNEL_TEST_OWNER"

_serial = itertools.count(1)
_live: dict[int, "object"] = {}
_live_lock = threading.Lock()


def next_serial() -> int:
    """A number unique in this process: marks and namespace names share the sequence."""
    return next(_serial)


def new_mark() -> str:
    return f"{os.getpid()}:{next_serial()}"


def tagged_env(mark: str, base: Optional[dict] = None) -> dict:
    """base (default: our environment) with the owner mark set: the environment of a started process."""
    env = dict(os.environ if base is None else base)
    env[OWNER_ENV] = mark
    return env


def sshd_stderr_name(mark: str) -> str:
    """Name of the stderr file of an sshd owned by mark (see owner_marks)."""
    return f"sshd.{mark.replace(':', '-')}.stderr"


# sshd overwrites its environment with its process title, so sshd processes are recognised by the
# stderr file they all keep open, whose name (sshd_stderr_name) carries the mark.
_STDERR_MARK_RE = re.compile(r"/sshd\.(\d+)-(\d+)\.stderr(?: \(deleted\))?$")


def owner_marks() -> dict[int, str]:
    """pid -> owner mark for every readable process that carries one."""
    key = OWNER_ENV.encode() + b"="
    found = {}
    for p in all_pids():
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        for item in env.split(b"\0"):
            if item.startswith(key):
                found[p] = item[len(key) :].decode(errors="replace")
                break
        else:
            with contextlib.suppress(OSError):
                m = _STDERR_MARK_RE.search(os.readlink(f"/proc/{p}/fd/2"))
                if m:
                    found[p] = f"{m.group(1)}:{m.group(2)}"
    return found


def marked_pids(mark: str) -> list[int]:
    """Every process that carries mark."""
    return [p for p, m in owner_marks().items() if m == mark]


# ----------------------------------------------------------------------------------------------------
# What this process has open, closed at exit


def register(obj: object) -> None:
    with _live_lock:
        _live[id(obj)] = obj


def unregister(obj: object) -> None:
    with _live_lock:
        _live.pop(id(obj), None)


def live_objects() -> list[object]:
    """Every registered server and host, oldest first."""
    with _live_lock:
        return list(_live.values())


@atexit.register
def _close_everything() -> None:
    for obj in reversed(live_objects()):
        with contextlib.suppress(Exception):
            obj.close()  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------------
# What a crashed run left


_reaped = False


def reap_stale() -> None:
    """Kill processes left by a crashed earlier run (their owner pid is gone) and its namespaces."""
    global _reaped
    _reaped = True
    stale = [pid for pid, mark in owner_marks().items() if not alive(int(mark.split(":", 1)[0]))]
    kill_and_wait(stale)
    if os.geteuid() == 0 and shutil.which("ip"):
        with netns.lock():
            netns.remove_stale()


def reap_once() -> None:
    """reap_stale(), the first time anything of this process starts."""
    if not _reaped:
        reap_stale()
