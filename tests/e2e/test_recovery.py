"""Tunnels that heal: after an sshd restart or a 20 s link outage on the kernel's host, the same kernel
answers again through the same local ports, and the gateway never declared it dead meanwhile.
"""

from __future__ import annotations

import time
from typing import Callable

import pytest

from .conftest import E2EHosts
from .gateway import Gateway
from .kernel_client import GatewayClient, Kernel
from .support import connections_to, kernel_status, kill_sshd, report, require_native

pytestmark = pytest.mark.e2e

RECOVERY_BUDGET = 10.0
LINK_DOWN_SECONDS = 20.0
SSHD_DOWN_SECONDS = 2.0


def _first_good_cell(kernel: Kernel, budget: float) -> float:
    """Seconds until a cell runs start to finish; each attempt is short, because a request sent while
    the forwards were reconnecting may have lost its iopub messages."""
    started = time.monotonic()
    deadline = started + budget + 5
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        try:
            cell = kernel.execute(f"print('attempt {attempt}')", timeout=2.5)
        except TimeoutError:
            continue
        if cell.stdout == f"attempt {attempt}\n":
            return time.monotonic() - started
    raise AssertionError(f"no cell completed within {budget + 5}s")


def _outage(gateway: Gateway, client: GatewayClient, e2e_hosts: E2EHosts, name: str,
            cut: Callable[[], None]) -> None:
    require_native(gateway)
    host = e2e_hosts.a
    kernel = client.start_kernel("egt")
    assert kernel.execute("state = 41").status == "ok"
    before = kernel_status(gateway, kernel)
    ports = {ch: t["local_port"] for ch, t in before["tunnels"].items()}

    cut()  # returns once the host is reachable again
    recovered = _first_good_cell(kernel, RECOVERY_BUDGET)

    after = kernel_status(gateway, kernel)
    assert kernel.execute("print(state + 1)").stdout == "42\n"  # same kernel process, state intact
    assert after["pid"] == before["pid"]
    assert {ch: t["local_port"] for ch, t in after["tunnels"].items()} == ports
    assert kernel.lifecycle_states == [], "the gateway restarted or gave up on a healthy kernel"
    conns = connections_to(gateway, host)
    report(name, recovered_seconds=recovered, reconnects=sum(c["reconnects"] for c in conns))
    assert recovered < RECOVERY_BUDGET


def test_sshd_restart(gateway: Gateway, client: GatewayClient, e2e_hosts: E2EHosts) -> None:
    host = e2e_hosts.a

    _outage(gateway, client, e2e_hosts, "sshd restart", lambda: kill_sshd(host, SSHD_DOWN_SECONDS))


def test_link_down_for_20_seconds(gateway: Gateway, client: GatewayClient, e2e_hosts: E2EHosts) -> None:
    host = e2e_hosts.a

    def cut() -> None:
        host.link_down()
        try:
            time.sleep(LINK_DOWN_SECONDS)
        finally:
            host.link_up()

    _outage(gateway, client, e2e_hosts, "link down 20 s", cut)
