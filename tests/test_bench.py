"""bench/run.py still runs end to end and writes well-formed results. Only the shape of the output is
checked: timings on a shared machine are not something a test can assert."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import harness

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "bench" / "run.py"

LATENCY_KEYS = {"count", "p50_us", "p99_us", "p999_us", "max_us", "over_10ms", "share_over_10ms"}


def _marked_by(pid: int) -> list[int]:
    """Processes still carrying an owner mark of pid (what the harness tags everything it starts with)."""
    key = f"{harness.OWNER_ENV}={pid}:".encode()
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                if any(item.startswith(key) for item in f.read().split(b"\0")):
                    found.append(int(p))
        except OSError:
            continue
    return found


def _run(tmp_path: Path, *args: str) -> tuple[str, dict]:
    out = tmp_path / "results.json"
    proc = subprocess.Popen(
        [sys.executable, str(RUN), "--quick", "--json", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the benchmark unwinds and removes its namespace and processes.
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"bench/run.py --quick did not finish in 240 s\n{stderr[-4000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr[-4000:]}"
    assert not _marked_by(proc.pid), "bench/run.py left processes running"
    return stdout, json.loads(out.read_text())


def test_quick_run_produces_every_section(tmp_path: Path) -> None:
    reason = harness.sshd_unavailable_reason()
    if reason:
        pytest.skip(reason)
    stdout, res = _run(tmp_path)
    meta, sections = res["meta"], res["sections"]
    assert res["errors"] == []
    assert meta["quick"] is True and meta["lab"]["kind"] in ("netns", "loopback")
    assert len(meta["loadavg_start"]) == 3 and len(meta["loadavg_end"]) == 3
    assert set(sections) == {"idle", "latency", "throughput", "open"}

    idle = sections["idle"]["rows"]
    assert [r["name"] for r in idle] == ["egtunnel per-port", "egtunnel shared", "ssh -N -L"]
    for r in idle:
        assert r["client_cpu_s"] >= 0 and r["client_core_pct"] >= 0 and r["seconds"] > 0

    lat = sections["latency"]
    assert [r["name"] for r in lat["rows"]] == ["direct", "egtunnel", "ssh -N -L"]
    for r in lat["rows"]:
        assert LATENCY_KEYS <= set(r) and r["count"] == lat["round_trips"]
        assert 0 < r["p50_us"] <= r["p99_us"] <= r["max_us"]
    assert lat["ratio_p50_egtunnel_vs_openssh"] > 0

    tp = sections["throughput"]
    assert len(tp["rows"]) == 8
    assert all(r["sha256_ok"] and r["gb_per_s"] > 0 for r in tp["rows"])
    assert set(tp["ratios"]) == {"local -> remote", "remote -> local"}

    assert [r["name"] for r in sections["open"]["rows"]] == ["egtunnel per-port", "egtunnel shared (connection up)", "ssh -N -L"]

    # The human-readable report names every section.
    for title in ("Idle CPU", "Latency", "Throughput", "Time to open a forward"):
        assert title in stdout


def test_only_runs_one_section(tmp_path: Path) -> None:
    reason = harness.sshd_unavailable_reason()
    if reason:
        pytest.skip(reason)
    stdout, res = _run(tmp_path, "--only", "open")
    assert set(res["sections"]) == {"open"} and res["errors"] == []
    assert "Latency" not in stdout
