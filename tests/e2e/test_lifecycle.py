"""A kernel's life through a real gateway with egtunnel's proxy: cells, interrupt, restart, shutdown,
the live tunnels' keep-alive intervals, what runs on the remote host, and what is left afterwards.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from enterprise_gateway.services.processproxies.processproxy import max_keep_alive_interval

from harness import procs

from .conftest import CULL_IDLE_TIMEOUT, E2EHosts
from .gateway import Gateway
from .kernel_client import GatewayClient
from .support import (
    CHANNELS,
    kernel_side_procs,
    kernel_status,
    live_tunnels,
    report,
    require_native,
    shells,
    sshd_session_procs,
    wait_for,
)

pytestmark = pytest.mark.e2e

DELETE_BUDGET = 0.5
# EG's default keep-alive margin over the culling timeout; CONTROL and EG_COMM get EG's maximum.
EXPECTED_INTERVALS = {
    "SHELL": CULL_IDLE_TIMEOUT + 60,
    "IOPUB": CULL_IDLE_TIMEOUT + 60,
    "STDIN": CULL_IDLE_TIMEOUT + 60,
    "HB": CULL_IDLE_TIMEOUT + 60,
    "CONTROL": max_keep_alive_interval,
    "EG_COMM": max_keep_alive_interval,
}
CONNECT_INFO_PORTS = {"SHELL": "shell_port", "IOPUB": "iopub_port", "STDIN": "stdin_port", "HB": "hb_port",
                      "CONTROL": "control_port", "EG_COMM": "comm_port"}


def test_cell_interrupt_restart_and_shutdown(gateway: Gateway, client: GatewayClient) -> None:
    kernel = client.start_kernel("egt")
    cell = kernel.execute("print(6 * 7)")
    assert (cell.status, cell.stdout) == ("ok", "42\n")

    # The interrupt travels REST -> gateway -> EG_COMM tunnel -> launcher's listener -> SIGINT.
    interrupted_after: list[float] = []

    def interrupt() -> None:
        time.sleep(0.5)  # let the cell get into time.sleep, where SIGINT lands as KeyboardInterrupt
        interrupted_after.append(kernel.interrupt())

    cell = kernel.execute("import time; time.sleep(30)", timeout=20, on_busy=interrupt)
    assert cell.ename == "KeyboardInterrupt", cell
    assert cell.seconds < 10
    report("interrupt", rest_seconds=interrupted_after[0], cell_seconds=cell.seconds)

    first = live_tunnels(gateway, kernel)
    restart_seconds = kernel.restart()
    cell = kernel.execute("print('after restart')")
    assert (cell.status, cell.stdout) == ("ok", "after restart\n")
    again = live_tunnels(gateway, kernel)
    assert set(again) == set(CHANNELS), again
    assert all(t.get("is_alive") for t in again.values()), again
    old_ports = {t["local_port"] for t in first.values()}
    report("restart", seconds=restart_seconds, ports_reused=len(old_ports & {t["local_port"] for t in again.values()}))

    ports = {t["local_port"] for t in again.values()}
    delete_seconds = kernel.delete()
    assert delete_seconds < DELETE_BUDGET
    assert kernel.id not in gateway.status()["kernels"]
    wait_for(lambda: not (ports & gateway.listening_ports()), 5, what="tunnel ports to close")
    report("delete", seconds=delete_seconds)


def test_running_kernel_has_six_native_tunnels_and_no_ssh_process(
        gateway: Gateway, client: GatewayClient, e2e_hosts: E2EHosts) -> None:
    require_native(gateway)
    host = e2e_hosts.a
    kernel = client.start_kernel("egt")
    assert kernel.execute("1 + 1").result == "2"

    assert gateway.ssh_children() == []
    status = kernel_status(gateway, kernel)
    assert status["class"] == "egtunnel.proxy.DistributedProcessProxy"
    tunnels = status["tunnels"]
    assert set(tunnels) == set(CHANNELS)
    intervals = {channel: t["keep_alive_interval"] for channel, t in tunnels.items()}
    assert intervals == EXPECTED_INTERVALS
    listening = gateway.listening_ports()
    remote = status["tunneled_connect_info"]
    for channel, tunnel in tunnels.items():
        assert tunnel["is_alive"] is True, (channel, tunnel)
        assert tunnel["channel"] == channel
        # The comm port's local end is reserved, never listening: only the gateway's own requests reach the launcher.
        assert (tunnel["local_port"] in listening) == (channel != "EG_COMM"), (channel, tunnel)
        # egtunnel's launcher binds the kernel's ports on the host's loopback; sshd there forwards to it.
        assert tunnel["remote_host"] == "127.0.0.1"
        assert tunnel["remote_port"] == int(remote[CONNECT_INFO_PORTS[channel]])
    report("intervals", **intervals)
    # The gateway's own ZMQ sockets and comm requests use the tunnels' local ends, and traffic flowed.
    connection = status["kernel_manager_connection"]
    assert connection["ip"] == "127.0.0.1"
    for channel, key in CONNECT_INFO_PORTS.items():
        local = status["comm_port"] if channel == "EG_COMM" else connection[key]
        assert local == tunnels[channel]["local_port"], (channel, connection, tunnels[channel])
    for channel in ("SHELL", "IOPUB"):
        assert tunnels[channel]["stats"]["bytes_in"] > 0 and tunnels[channel]["stats"]["bytes_out"] > 0

    # EG's own form runs `ssh -L` with a login shell per tunnel: 6 sshd sessions and 6 shells per
    # kernel. Native forwards are direct-tcpip channels: no shell, no pty, one session per connection.
    assert shells(host) == []
    sessions = sshd_session_procs(host)
    assert not [p for p in sessions if "pts/" in p.cmdline], sessions
    assert len(sessions) <= host.sshd.established_connections(), sessions
    report("remote host", sshd_sessions=len(sessions), connections=host.sshd.established_connections())


def _quiet(gateway: Gateway) -> tuple[int, int]:
    return gateway.fds(), gateway.threads()


def test_shutdown_returns_gateway_to_baseline(gateway: Gateway, e2e_hosts: E2EHosts) -> None:
    require_native(gateway)
    # Quiet first: no kernels, and the shared connection of earlier kernels closed by its own timer.
    wait_for(lambda: not gateway.status()["kernels"], 30, what="no kernels")
    wait_for(lambda: not gateway.status()["connections"], 30, what="no SSH connections")
    ports0 = gateway.listening_ports()
    fds0, threads0 = wait_for(lambda: _stable(gateway), 10, what="stable fd/thread counts")

    client = gateway.client()
    try:
        kernel = client.start_kernel("egt")
        assert kernel.execute("1 + 1").result == "2"
        report("running", fds=gateway.fds(), threads=gateway.threads())
        delete_seconds = kernel.delete()
    finally:
        client.close()
    assert delete_seconds < DELETE_BUDGET
    wait_for(lambda: gateway.listening_ports() == ports0, 5, what="listeners back to baseline")
    wait_for(lambda: not gateway.status()["connections"], 30, what="the SSH connection to close")
    counts = wait_for(lambda: (lambda c: c if c == (fds0, threads0) else None)(_quiet(gateway)), 15,
                      what=f"fds/threads back to {(fds0, threads0)} (now {_quiet(gateway)})")
    report("baseline", fds=counts[0], threads=counts[1], delete_seconds=delete_seconds)
    wait_for(lambda: not kernel_side_procs(e2e_hosts.a), 10, what="nothing left on the remote host")


def _stable(gateway: Gateway) -> tuple[int, int] | None:
    first = _quiet(gateway)
    time.sleep(0.5)
    return first if _quiet(gateway) == first else None


@pytest.mark.parametrize("spec", ["egt", "egt-notunnel"])
def test_kill_9_on_the_remote_host_is_noticed(gateway: Gateway, client: GatewayClient,
                                              e2e_hosts: E2EHosts, spec: str) -> None:
    host = e2e_hosts.a
    kernel = client.start_kernel(spec)
    assert kernel.execute("1 + 1").result == "2"  # also opens the websocket: EG restarts only watched kernels
    status = kernel_status(gateway, kernel)
    pid, pgid = int(status["pid"]), int(status["pgid"] or 0)
    on_host = {p.pid: p for p in procs.netns_procs(host.name)}
    assert pid in on_host, (pid, on_host)
    victims = [p for p in kernel_side_procs(host) if p.pid == pid or (pgid > 0 and _pgid(p.pid) == pgid)]
    victims += [d for v in list(victims) for d in procs.descendants(v.pid)]
    assert victims
    killed_at = time.monotonic()
    for p in victims:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    state = kernel.wait_for_lifecycle({"restarting", "dead"}, timeout=15)
    noticed = time.monotonic() - killed_at
    assert state is not None, "the gateway never reported the killed kernel"
    assert noticed < 10
    report("liveness", spec=spec, noticed_seconds=noticed, state=state)


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1
