"""A process using egtunnel exits cleanly however busy egtunnel is: no runtime thread enters Python
once the interpreter has begun to shut down (that would abort it with "FATAL: exception not rethrown"
and a core dump), whether Python exits by itself or through a SIGTERM handler as a gateway does."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harness

CHILD = Path(__file__).resolve().parent / "exit_child.py"
RUNS = 6


@pytest.mark.parametrize("how", ["exit", "sigterm"])
def test_exit_with_traffic_commands_and_debug_logging_never_aborts(how: str) -> None:
    if harness.sshd_unavailable_reason():
        pytest.skip(harness.sshd_unavailable_reason())
    rng = random.Random()
    for run in range(RUNS):
        delay = rng.uniform(0.05, 0.6)
        proc = subprocess.Popen([sys.executable, str(CHILD), f"{delay:.3f}", how],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            if how == "sigterm":
                time.sleep(delay)
                proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        tail = err[-2000:]
        assert "exception not rethrown" not in err and "FATAL" not in err, f"run {run} ({delay:.2f} s): {tail}"
        assert proc.returncode == 0, f"run {run} ({delay:.2f} s) exited {proc.returncode}: {tail}"
        # The child really was busy: it logged from the runtime's threads at DEBUG.
        assert "egtunnel." in err, tail
