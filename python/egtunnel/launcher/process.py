"""The launcher's process: its own process group, signals to it, its exited children, and its exit.

The kernel runs in the launcher's process, which leads its own process group: the reported ``pid``
and ``pgid`` are equal, so EG's ``kill -SIG -<pgid>`` reaches the kernel and whatever it started and
nothing else. Of the signals asked for on the communication port, only those the gateway sends are
delivered (`GATEWAY_SIGNALS` and the kernelspec's ``EG_ALTERNATE_SIGINT``).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping
from typing import Optional

from .logs import log

# What EG sends to the communication port: 0 polls, SIGINT interrupts, SIGTERM then SIGKILL end the
# kernel. Anyone who can connect could otherwise stop the kernel while it still answers polls
# (SIGSTOP), or end it in ways the gateway does not expect (SIGHUP, SIGUSR1 and the like).
GATEWAY_SIGNALS = frozenset({0, int(signal.SIGINT), int(signal.SIGKILL), int(signal.SIGTERM)})
# EG interrupts with this signal instead of SIGINT when the kernelspec's env sets it; EG puts that env
# into the launch environment, so the launcher sees the same value.
ALTERNATE_SIGINT_VARIABLE = "EG_ALTERNATE_SIGINT"

# Once the kernel has stopped, interpreter exit must not hang on threads started by user code.
EXIT_DEADLINE = 5.0


def reap_exited_children() -> None:
    # ipykernel's shutdown terminates the kernel's children and then waits until none is left, but
    # it does not collect them; an uncollected child stays a zombie and the wait runs to its end
    # (about 30 s). Once the kernel is shutting down, nobody else needs their exit status.
    while True:
        try:
            pid, _ = os.waitpid(-os.getpgrp(), os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def alternate_sigint(environ: Mapping[str, str]) -> Optional[int]:
    """The kernelspec's interrupt signal (``EG_ALTERNATE_SIGINT``) as a number; None when unset or unusable.

    EG converts a name such as ``SIGUSR2`` with ``getattr(signal, name)``; a number is taken too.
    """
    raw = environ.get(ALTERNATE_SIGINT_VARIABLE, "").strip()
    if not raw:
        return None
    value = int(raw) if raw.isdigit() else getattr(signal, raw, None)
    # Only a real signal: the module also holds SIG_IGN, NSIG and functions under such names.
    if (isinstance(value, signal.Signals) or type(value) is int) and value in signal.valid_signals():
        return int(value)
    log.warning("%s=%r names no signal; interrupts arrive as SIGINT only", ALTERNATE_SIGINT_VARIABLE, raw)
    return None


def send_signal(signum: int) -> None:
    """Signal the kernel the way EG's remote_signal does: its process group when it leads one."""
    pid = os.getpid()
    if os.getpgrp() == pid:
        os.killpg(pid, signum)
    else:
        os.kill(pid, signum)


def lead_process_group() -> None:
    """Become the leader of a new process group unless already one (e.g. started with setsid).

    Started by a shell without job control or by another program, the launcher would share that
    caller's group, and EG's `kill -SIG -<pgid>` would hit the caller too.
    """
    if os.getpgrp() == os.getpid():
        return
    try:
        os.setpgid(0, 0)
    except OSError as exc:
        log.warning("could not start a process group (%s); signals will target the process only", exc)


def exit_deadline(code: int) -> None:
    # Interpreter exit waits for non-daemon threads; one left running by kernel code would keep this
    # process (and its group) alive with nobody listening for the gateway.
    timer = threading.Timer(EXIT_DEADLINE, os._exit, args=(code,))
    timer.daemon = True
    timer.start()
