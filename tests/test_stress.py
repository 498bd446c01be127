"""The stress run, reduced: one shared connection to a stock sshd carrying 200 forwards and remote
commands at once, with both cores kept busy (bench/stress.py; `make soak` runs 20,000 operations).

A lost wake-up on the shared connection shows up here as an operation that hits its timeout, a
command answered without its exit status, or (with EGTUNNEL_CHECK_SETTLED, which the run sets) the
actor going idle while libssh2 still held packets for one of its channels.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import harness

REPO = Path(__file__).resolve().parents[1]
OPS = 300


def stress(tmp_path: Path, *extra: str) -> tuple[dict, subprocess.CompletedProcess]:
    if harness.sshd_unavailable_reason():
        pytest.skip(harness.sshd_unavailable_reason())
    out = tmp_path / "stress.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "stress.py"), "--ops", str(OPS), "--json", str(out), *extra],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.exists(), f"stress run produced no result (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc


def assert_every_operation_answered(r: dict, proc: subprocess.CompletedProcess) -> None:
    assert r["failures"] == [] and r["timeouts"] == 0, r
    assert r["unsettled_sleeps"] == 0, r
    # Every command of both paths was answered, and every operation of the budget ran.
    assert r["commands"] == {"egtunnel": OPS // 2, "openssh": OPS // 2}, r
    assert r["echo_operations"] + r["source_operations"] == OPS - OPS // 2, r
    assert r["held"] and proc.returncode == 0, r


def test_shared_connection_answers_every_command_and_byte_under_load(tmp_path: Path) -> None:
    r, proc = stress(tmp_path)
    assert_every_operation_answered(r, proc)
    assert r["closes"]["half"] > 0 and r["closes"]["abrupt"] > 0 and r["closes"]["remote"] > 0, r


def test_shared_connection_holds_through_key_re_exchanges_in_mid_traffic(tmp_path: Path) -> None:
    # A stock server re-keys about once per gigabyte, which only a soak reaches; this server does so
    # every 4 MiB (RekeyLimit, set by the run), so that dozens of key exchanges land in mid-burst, with
    # reads waiting to enlarge their windows and commands in flight.
    limit_mib = 4
    r, proc = stress(tmp_path, "--rekey-limit", f"{limit_mib}M")
    assert_every_operation_answered(r, proc)
    # Each direction carried every checked byte: at least ten key exchanges happened.
    assert r["bytes_checked"] > 10 * (limit_mib << 20), r
