"""Reference figures from the same run and the same remote host: the time to a kernel's first cell
with egtunnel against tunneling off (the floor), and what EG's own `ssh -L` tunnels do here.
"""

from __future__ import annotations

import time

import pytest
import requests

from harness import procs

from .conftest import E2EHosts
from .gateway import Gateway
from .kernel_client import GatewayClient
from .support import (
    connections_to,
    kernel_status,
    median,
    report,
    require_native,
    shells,
    sshd_session_procs,
    wait_for,
)

pytestmark = pytest.mark.e2e

ROUNDS = 4
# Opening six forwards over an authenticated connection is a few round trips on a local link.
TUNNEL_OVERHEAD_BUDGET = 0.5


def test_first_cell_with_egtunnel_against_the_floor(gateway: Gateway, client: GatewayClient) -> None:
    require_native(gateway)
    seconds: dict[str, list[float]] = {"egt": [], "egt-notunnel": []}
    for _ in range(ROUNDS):
        for spec, samples in seconds.items():  # interleaved, so that drift hits both alike
            started = time.monotonic()
            kernel = client.start_kernel(spec)
            assert kernel.execute("1 + 1").result == "2"
            samples.append(time.monotonic() - started)
            kernel.delete()
    native, floor = median(seconds["egt"]), median(seconds["egt-notunnel"])
    report("POST to first cell", egtunnel_median=native, floor_median=floor, overhead=native - floor)
    assert native - floor < TUNNEL_OVERHEAD_BUDGET


def test_eg_own_tunnels_for_reference(gateway: Gateway, client: GatewayClient, e2e_hosts: E2EHosts) -> None:
    """EG's DistributedProcessProxy with tunneling on: one `ssh -L` per channel. Its figures go to the
    report; what is asserted is only what the native form is compared against (the ssh processes)."""
    host = e2e_hosts.a
    # Let egtunnel's connection from earlier kernels close, so that the remote figures are EG's alone.
    wait_for(lambda: not connections_to(gateway, host), 30, what="earlier native connections to close")
    kernel = client.start_kernel("eg")  # EG answers as soon as it has spawned its ssh processes
    try:
        spawned = len(gateway.ssh_children())  # some may already have exited: see alive_after_2s
        time.sleep(2)  # long enough for ssh to connect, or to reject its options
        status = kernel_status(gateway, kernel)
        tunnels = status["tunnels"]
        alive = sorted(ch for ch, t in tunnels.items() if t.get("is_alive"))
        remote_sessions = len(sshd_session_procs(host))
        remote_shells = len(shells(host))
        assert len(tunnels) == 6 and all(t["type"].startswith("pexpect") for t in tunnels.values())
        assert spawned > 0
        # With no client attached, EG removes a kernel its poll reports dead rather than restarting it.
        removed_after = None
        started = time.monotonic()
        while time.monotonic() - started < 15:
            if requests.get(f"{gateway.url}/api/kernels/{kernel.id}", timeout=5).status_code == 404:
                removed_after = time.monotonic() - started
                break
            time.sleep(0.25)
        report("EG's own tunnels", ssh_processes=spawned, alive_after_2s=",".join(alive) or "none",
               remote_sshd_sessions=remote_sessions, remote_shells=remote_shells,
               removed_as_dead_after=removed_after)
    finally:
        # EG cannot deliver the shutdown through a tunnel that never came up: its launcher is orphaned.
        procs.kill_procs(p for p in procs.netns_procs(host.name) if kernel.id in p.cmdline)
