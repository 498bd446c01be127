"""bench/opens.py (channel opens behind a delay proxy) still runs end to end and writes its results.
Only the shape is checked: timings on a shared machine are not something a test can assert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import harness

REPO = Path(__file__).resolve().parents[1]
OPENS = REPO / "bench" / "opens.py"


def test_quick_opens_run(tmp_path: Path) -> None:
    reason = harness.sshd_unavailable_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "opens.json"
    proc = subprocess.run([sys.executable, str(OPENS), "--quick", "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=240)  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    rows = json.loads(out.read_text())["rows"]
    assert [r["rtt_ms"] for r in rows] == [0.0, 10.0]
    for r in rows:
        assert r["one_kernel_s"] > 0 and r["eight_cold_s"] > 0 and r["eight_warm_s"] > 0
        assert r["reopen_ok"] and r["reopen_carrying"] == r["reopen_channels"] == 30
        assert r["connections_after_reopen"] >= 1
    assert "(c) reopen s" in proc.stdout
