"""The gateway's event loop while many kernels come and go: the reduced `make scale` run, and the
gateway's threads during concurrent starts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import harness

from .gateway import Gateway
from .support import report, require_native

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCALE = REPO / "bench" / "scale.py"
# Deleting every kernel at once may delay GET /api/kernelspecs no more than this beyond tunneling off's worst.
DELETE_PROBE_MARGIN = 0.150


def test_deleting_twenty_kernels_at_once_does_not_hold_the_event_loop(tmp_path: Path) -> None:
    for reason in (harness.netns_unavailable_reason(), harness.sshd_unavailable_reason()):
        if reason:
            pytest.skip(f"scale: {reason}")
    out = tmp_path / "scale.json"
    proc = subprocess.Popen([sys.executable, str(SCALE), "-n", "20", "--idle", "3", "--no-targets", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"bench/scale.py did not finish in 240 s\n{stderr[-4000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout}\n{stderr[-4000:]}"
    res = json.loads(out.read_text())
    off, egt = res["off"], res["egtunnel"]
    assert egt["working"] == egt["n"] == 20 and off["working"] == 20
    worst_off, worst_egt = max(off["probe_delete"]), max(egt["probe_delete"])
    report("scale n=20", delete_off=off["delete_s"], delete_egt=egt["delete_s"],
           probe_max_off=worst_off, probe_max_egt=worst_egt)  # fmt: skip
    assert worst_egt <= worst_off + DELETE_PROBE_MARGIN, (worst_off, worst_egt)
    assert egt["left_on_host"] == 0


def test_concurrent_starts_start_no_thread_per_operation(gateway: Gateway) -> None:
    # Opening a kernel's forwards, its remote launch and its comm-port requests are awaited native calls:
    # ten kernels starting at once must not grow the gateway by a thread per tunnel, command or request.
    require_native(gateway)
    n = 10
    baseline = gateway.threads()
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, gateway.threads())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = [gateway.client(timeout=120) for _ in range(n)]
    try:
        with ThreadPoolExecutor(n) as pool:
            kernels = list(pool.map(lambda c: c.start_kernel("egt", timeout=120), clients))
        with ThreadPoolExecutor(n) as pool:
            cells = list(pool.map(lambda ik: ik[1].execute(f"print({ik[0]})", timeout=60), enumerate(kernels)))
        assert [c.stdout for c in cells] == [f"{i}\n" for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda k: k.delete(), kernels))
    finally:
        stop.set()
        sampler.join(5)
        for c in clients:
            c.close()
    report("threads during 10 concurrent starts", baseline=baseline, peak=peak)
    assert peak - baseline <= 2, f"gateway threads {baseline} -> peak {peak}"
