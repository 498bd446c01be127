"""The reduced soak (bench/soak.py --quick) in the test suite: a real gateway, two stock-sshd hosts,
kernels started at once in both modes, an sshd restart under load, and start/execute/delete cycles
after which nothing is left. The full run is `make soak`; this one proves every step still holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import harness

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SOAK = REPO / "bench" / "soak.py"


def test_quick_soak_passes_every_check() -> None:
    for reason in (harness.netns_unavailable_reason(), harness.sshd_unavailable_reason()):
        if reason:
            pytest.skip(f"soak: {reason}")
    proc = subprocess.Popen([sys.executable, str(SOAK), "--quick"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the run unwinds: gateway, kernels and namespaces go
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"bench/soak.py --quick did not finish in 200 s\n{stderr[-4000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout}\n{stderr[-4000:]}"
    assert "soak passed" in stdout and "FAILED" not in stdout
    for step in ("1 shared", "2 restart", "3 reference", "4 per-port", "5 cycles"):
        assert step in stdout
