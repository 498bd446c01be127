"""EG's lifecycle where it depends on the gateway's configuration rather than on one kernel's life:
local tunnel ports chosen within the kernel's port range, and a kernel revived from its persisted kernel
session by a new gateway process, whose tunnels are re-established from `tunneled_connect_info`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from harness import procs

from .conftest import E2EHosts, stop_gateway
from .gateway import Gateway
from .kernel_client import GatewayClient, Kernel
from .support import CHANNELS, kernel_side_procs, kernel_status, report, require_native, wait_for

pytestmark = pytest.mark.e2e

# EG refuses a range smaller than EG_MIN_PORT_RANGE_SIZE (1000 by default); the range stays below Linux's
# ephemeral ports (32768 up), so no outgoing connection of the gateway can crowd it.
PORT_RANGE_SIZE = 1000
PORT_RANGE_FLOOR = 20000
EPHEMERAL_FLOOR = 32768
REMOTE_PORT_KEYS = {"SHELL": "shell_port", "IOPUB": "iopub_port", "STDIN": "stdin_port", "HB": "hb_port",
                    "CONTROL": "control_port", "EG_COMM": "comm_port"}


@pytest.fixture
def gateways(gateway_factory: Callable[..., Gateway], e2e_hosts: E2EHosts
             ) -> Iterator[Callable[..., Gateway]]:
    """gateway_factory, with this test's gateways stopped when it ends (newest first) rather than at the
    end of the run; stopped at teardown, so that a failure report still carries their logs."""
    made: list[Gateway] = []

    def make(name: str, **overrides: object) -> Gateway:
        made.append(gateway_factory(name, **overrides))
        return made[-1]

    yield make
    for gw in reversed(made):
        stop_gateway(gw, e2e_hosts)


def _port_range() -> tuple[int, int]:
    lo = random.randrange(PORT_RANGE_FLOOR, EPHEMERAL_FLOOR - PORT_RANGE_SIZE - 1)
    return lo, lo + PORT_RANGE_SIZE


def _local_ports(status: dict) -> dict[str, int]:
    return {channel: int(t["local_port"]) for channel, t in status["tunnels"].items()}


def test_local_tunnel_ports_honour_the_port_range(
        gateways: Callable[..., Gateway], e2e_hosts: E2EHosts) -> None:
    lo, hi = _port_range()
    # EG_PORT_RANGE is the environment form of --EnterpriseGatewayApp.port_range; the kernel manager
    # links to the app's value, and that is where the proxy reads it from.
    gw = gateways("port-range", env={"EG_PORT_RANGE": f"{lo}..{hi}"})
    require_native(gw)
    client = gw.client()
    try:
        # Shared and per-port modes choose their local ports through different native paths.
        for spec in ("egt", "egt-perport"):
            kernel = client.start_kernel(spec)
            cell = kernel.execute("print(6 * 7)")
            assert (cell.status, cell.stdout) == ("ok", "42\n"), cell
            status = kernel_status(gw, kernel)
            assert set(status["tunnels"]) == set(CHANNELS), status["tunnels"]
            local = _local_ports(status)
            assert all(lo <= port <= hi for port in local.values()), (spec, lo, hi, local)
            assert len(set(local.values())) == len(CHANNELS), local
            # The comm port's is reserved, never listening: only the gateway's own requests reach the launcher.
            assert {p for ch, p in local.items() if ch != "EG_COMM"} <= gw.listening_ports()
            assert local["EG_COMM"] not in gw.listening_ports()
            assert all(t["is_alive"] for t in status["tunnels"].values()), status["tunnels"]
            # The gateway's ZMQ sockets and comm requests go to those same in-range ports.
            connection = status["kernel_manager_connection"]
            assert connection["ip"] == "127.0.0.1"
            for channel, key in REMOTE_PORT_KEYS.items():
                used = status["comm_port"] if channel == "EG_COMM" else connection[key]
                assert used == local[channel], (channel, used, local)
            # The launcher gets the same range through {port_range}: the remote ends honour it too.
            remote = {ch: int(status["tunneled_connect_info"][key]) for ch, key in REMOTE_PORT_KEYS.items()}
            assert all(lo <= port <= hi for port in remote.values()), (spec, lo, hi, remote)
            report("port range", spec=spec, range=f"{lo}..{hi}",
                   local=",".join(str(local[ch]) for ch in CHANNELS))
            kernel.delete()
            wait_for(lambda: not (set(local.values()) & gw.listening_ports()), 5,
                     what="the in-range tunnel ports to close")
    finally:
        client.close()
    wait_for(lambda: not kernel_side_procs(e2e_hosts.a), 15, what="nothing left on the remote host")


def _attach(client: GatewayClient, kernel_id: str, name: str) -> Kernel:
    """A kernel this client did not start (revived by a new gateway), deleted by the client when closed."""
    kernel = Kernel(client.rest, kernel_id, name, 0.0)
    client.kernels.append(kernel)
    return kernel


def _on_host(host_name: str, pid: int) -> bool:
    return any(p.pid == pid for p in procs.netns_procs(host_name))


def test_restarted_gateway_re_establishes_tunnels_of_persisted_kernels(
        gateways: Callable[..., Gateway], e2e_hosts: E2EHosts, tmp_path: Path) -> None:
    host = e2e_hosts.a
    root = tmp_path / "persistence"
    root.mkdir()
    # Standalone availability revives every persisted kernel session while the new gateway starts, before
    # it answers its first request; replication would revive a kernel only when a request names it.
    # EG answers GET /api/kernels with 403 unless listing is allowed.
    env = {"EG_KERNEL_SESSION_PERSISTENCE": "True", "EG_PERSISTENCE_ROOT": str(root),
           "EG_AVAILABILITY_MODE": "standalone", "EG_LIST_KERNELS": "True"}
    first = gateways("persist-first", env=env)
    client: GatewayClient | None = None
    try:
        require_native(first)
        first_client = first.client()
        try:
            kernel = first_client.start_kernel("egt")
            assert kernel.execute("x = 41").status == "ok"
            before = kernel_status(first, kernel)
            kernel.close_ws()
            # The gateway dies without a word to its kernels: nothing must try to shut this one down.
            kernel.deleted = True
        finally:
            first_client.close()
        session_file = root / "kernel_sessions" / f"{kernel.id}.json"
        persisted = json.loads(session_file.read_text())[kernel.id]["process_info"]
        assert persisted["tunneled_connect_info"], persisted
        remote_pid = int(before["pid"])
        assert _on_host(host.name, remote_pid)

        # SIGKILL to the gateway process alone: the kernel was started over SSH in the host's namespace,
        # so it is no child of the gateway and outlives it, as on a real cluster.
        assert first.status()["pid"] == first.pid
        killed_at = time.monotonic()
        os.kill(first.pid, signal.SIGKILL)
        assert first.process is not None
        first.process.wait(10)
        old_ports = set(_local_ports(before).values())
        wait_for(lambda: not (old_ports & procs.listening_ports()), 5,
                 what="the dead gateway's tunnels to go")
        assert _on_host(host.name, remote_pid), "the remote kernel died with the gateway"

        second = gateways("persist-second", env=env)
        revived_after = time.monotonic() - killed_at
        client = second.client()
        assert kernel.id in {k["id"] for k in client.list_kernels()}
        revived = _attach(client, kernel.id, "egt")
        assert revived.model()["name"] == "egt"
        status = kernel_status(second, kernel)
        assert int(status["pid"]) == remote_pid
        tunnels = status["tunnels"]
        assert set(tunnels) == set(CHANNELS), tunnels
        listening = second.listening_ports()
        for channel, tunnel in tunnels.items():
            assert tunnel["is_alive"] is True, (channel, tunnel)
            assert (tunnel["local_port"] in listening) == (channel != "EG_COMM"), (channel, tunnel)
            # The launcher bound the host's loopback; the revived forwards go there again.
            assert tunnel["remote_host"] == "127.0.0.1", (channel, tunnel)
            assert tunnel["remote_port"] == int(persisted["tunneled_connect_info"][REMOTE_PORT_KEYS[channel]])
        connection = status["kernel_manager_connection"]
        assert connection["ip"] == "127.0.0.1"
        for channel, key in REMOTE_PORT_KEYS.items():
            used = status["comm_port"] if channel == "EG_COMM" else connection[key]
            assert used == tunnels[channel]["local_port"], (channel, used, tunnels[channel])
        assert second.ssh_children() == []

        cell = revived.execute("print(x + 1)")
        assert (cell.status, cell.stdout) == ("ok", "42\n"), cell
        # The comm port answers too: a poll through the revived EG_COMM tunnel finds the kernel alive.
        assert second.poll(kernel.id)["result"] is None
        report("revival", gateway_restart_to_listed=revived_after, cell_seconds=cell.seconds)

        ports = {t["local_port"] for t in tunnels.values()}
        delete_seconds = revived.delete()
        assert kernel.id not in second.status()["kernels"]
        wait_for(lambda: not (ports & second.listening_ports()), 5, what="the revived tunnels to close")
        wait_for(lambda: not kernel_side_procs(host), 15,
                 what=f"no kernel, launcher or listener on the remote host: {kernel_side_procs(host)}")
        assert not session_file.exists()
        report("revival", delete_seconds=delete_seconds)
    finally:
        # Should the test fail half-way, the first gateway's teardown reaps the kernel it started (its
        # response address is in the kernel's argv), revived or not.
        if client is not None:
            client.close()
