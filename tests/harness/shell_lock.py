"""The shell start-up lock that a killed SSH session can leave behind, and its removal.

Here because every SSH session of the tests logs in to this machine's own account: see
clear_stale_shell_lock.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import time
from pathlib import Path
from typing import Optional

# A `pyenv rehash` takes ~0.1 s; a lock this old was left by a killed one.
STALE_SHELL_LOCK_AGE = 10.0


def clear_stale_shell_lock() -> Optional[Path]:
    """Removes the lock of `pyenv rehash` once it is older than any rehash; returns it if removed.

    The remote hosts of these tests log in to this machine's own account, whose shell start-up may
    run `pyenv rehash` in every SSH session (root's ~/.bashrc does on the machines this project is
    built on). The rehash holds a lock file that a session killed half-way leaves behind (the tests
    kill sshd sessions, and a launch that times out has its process group killed, start-up files and
    all), and every later session's start-up then waits 60 s for it: a remote command of any later
    test would time out for a reason outside the code under test. A rehash holds the lock for well
    under a second; the shells waiting for it run `pyenv-rehash` too, so a running one proves nothing.
    """
    root = Path(os.environ.get("PYENV_ROOT") or Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".pyenv")
    lock = root / "shims" / ".pyenv-shim"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    if age < STALE_SHELL_LOCK_AGE:
        return None
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    return lock
