"""SSH connections per host, counted on the remote sshd: one shared connection for all kernels of a
host, or EG's topology (one per forwarded port) on request; and remote polls that reuse it.
"""

from __future__ import annotations

import pytest

from .conftest import E2EHosts
from .gateway import Gateway
from .kernel_client import GatewayClient
from .support import connections_to, median, report, require_native, wait_for

pytestmark = pytest.mark.e2e

KERNELS = 3


def _start(client: GatewayClient, spec: str) -> list:
    kernels = [client.start_kernel(spec) for _ in range(KERNELS)]
    for i, kernel in enumerate(kernels):
        assert kernel.execute(f"print({i})").stdout == f"{i}\n"
    return kernels


def test_shared_mode_one_connection_for_three_kernels(
        gateway: Gateway, client: GatewayClient, e2e_hosts: E2EHosts) -> None:
    require_native(gateway)
    host = e2e_hosts.a
    # Start from no connection at all (an earlier test's may still be closing), so that every one
    # counted belongs to these kernels.
    wait_for(lambda: host.sshd.established_connections() == 0 and not connections_to(gateway, host), 30,
             what="earlier connections to close")
    kernels = _start(client, "egt")
    established = host.sshd.established_connections()
    conns = connections_to(gateway, host)
    forwards = [f for c in conns for f in c["forwards"] if f["kernel_id"] in {k.id for k in kernels}]
    report("shared", kernels=KERNELS, connections=established, forwards=len(forwards))
    assert established == 1
    assert [c["mode"] for c in conns] == ["shared"]
    assert len(forwards) == 6 * KERNELS
    for kernel in kernels:
        kernel.delete()


def test_per_port_mode_six_connections_per_kernel(
        gateway: Gateway, client: GatewayClient, e2e_hosts: E2EHosts) -> None:
    require_native(gateway)
    host = e2e_hosts.a
    # Start from no connection at all, so that every one counted belongs to these kernels.
    wait_for(lambda: host.sshd.established_connections() == 0 and not connections_to(gateway, host), 30,
             what="earlier connections to close")
    kernels = _start(client, "egt-perport")
    established = host.sshd.established_connections()
    conns = connections_to(gateway, host)
    per_port = [c for c in conns if c["mode"] == "per-port"]
    report("per-port", kernels=KERNELS, connections=established, per_port=len(per_port),
           other=len(conns) - len(per_port))
    assert len(per_port) == 6 * KERNELS
    assert all(len(c["forwards"]) == 1 for c in per_port)
    # What sshd sees is exactly what the gateway holds: nothing opened behind status()'s back.
    assert established == len(conns)
    for kernel in kernels:
        kernel.delete()
    wait_for(lambda: not [c for c in connections_to(gateway, host) if c["mode"] == "per-port"], 10,
             what="per-port connections to close with their kernels")


def test_remote_signal_reuses_the_connection_and_beats_paramiko(
        gateway: Gateway, client: GatewayClient, e2e_hosts: E2EHosts) -> None:
    require_native(gateway)
    sshd = e2e_hosts.a.sshd
    kernel = client.start_kernel("egt")
    assert kernel.execute("1").result == "1"
    gateway.remote_signal_probe(kernel.id, 1, "proxy")  # a connection exists from here on
    since = sshd.log_offset()
    native = gateway.remote_signal_probe(kernel.id, 20, "proxy")
    new_logins = sshd.log_count("Accepted publickey", since=since)
    paramiko = gateway.remote_signal_probe(kernel.id, 10, "paramiko")
    native_s = [c["seconds"] for c in native]
    paramiko_s = [c["seconds"] for c in paramiko]
    report("remote_signal(0)", native_median=median(native_s), paramiko_median=median(paramiko_s),
           native_logins=new_logins)
    assert all(c["result"] is None for c in native), native  # None is EG's "alive"
    assert all(c["result"] == ["0"] for c in paramiko), paramiko
    assert new_logins == 0
    assert median(native_s) < median(paramiko_s)
