"""Kernel starts that must fail, and how: the HTTP status and message a gateway client sees, nothing
left listening or running, and the same gateway still serving its other kernels.
"""

from __future__ import annotations

from typing import Callable, Optional

import pytest

import harness

from .conftest import MAIN_SPECS, E2EHosts, stop_gateway
from .gateway import Gateway, KernelSpecDef
from .kernel_client import GatewayClient, GatewayError, Kernel
from .support import kernel_side_procs, report, require_native, wait_for

pytestmark = pytest.mark.e2e


def _failed_start(gateway: Gateway, client: GatewayClient, spec: str, host: Optional[harness.RemoteHost],
                  serving: Kernel) -> GatewayError:
    """Start a kernel that must fail; check that it leaves nothing and that `serving` still works."""
    ports0 = gateway.listening_ports()
    before = {p.pid for p in kernel_side_procs(host)} if host else set()
    env = {"KERNEL_REMOTE_HOST": host.address} if host else None
    with pytest.raises(GatewayError) as failure:
        client.start_kernel(spec, env=env, timeout=120)
    error = failure.value
    wait_for(lambda: gateway.listening_ports() <= ports0, 10,
             what=f"no new listener (new: {gateway.listening_ports() - ports0})")
    if host is not None:
        wait_for(lambda: not ({p.pid for p in kernel_side_procs(host)} - before), 15,
                 what="nothing left running on the failed host")
    assert gateway.alive()
    # The gateway goes on: the running kernel still answers, and a new one starts and answers.
    assert serving.execute("print(x)").stdout == "1\n"
    fresh = client.start_kernel(serving.name)
    assert fresh.execute("1 + 1").result == "2"
    fresh.delete()
    return error


@pytest.fixture
def serving(client: GatewayClient) -> Kernel:
    kernel = client.start_kernel("egt")
    kernel.execute("x = 1")
    return kernel


def test_unknown_host_key_fails_with_403_naming_the_host(
        gateway: Gateway, client: GatewayClient, serving: Kernel, e2e_hosts: E2EHosts) -> None:
    require_native(gateway)
    error = _failed_start(gateway, client, "egt", e2e_hosts.b, serving)
    assert error.status == 403, error
    assert e2e_hosts.b.address in error.reason
    report("unknown host key", status=error.status, seconds=error.elapsed, reason=error.reason[:200])


def test_wrong_identity_fails_with_403(
        gateway: Gateway, client: GatewayClient, serving: Kernel, e2e_hosts: E2EHosts) -> None:
    require_native(gateway)
    error = _failed_start(gateway, client, "egt", e2e_hosts.c, serving)
    assert error.status == 403, error
    assert e2e_hosts.c.address in error.reason
    report("wrong identity", status=error.status, seconds=error.elapsed, reason=error.reason[:200])


def test_bad_keepalive_margin_in_kernelspec_fails_with_500_naming_it(
        gateway: Gateway, client: GatewayClient, serving: Kernel, e2e_hosts: E2EHosts) -> None:
    require_native(gateway)
    error = _failed_start(gateway, client, "egt-badmargin", e2e_hosts.a, serving)
    assert error.status == 500, error
    assert "keepalive_margin" in error.reason and "abc" in error.reason, error.reason


def test_bad_keepalive_margin_env_fails_with_500_naming_it(
        gateway_factory: Callable[..., Gateway], e2e_hosts: E2EHosts) -> None:
    specs = MAIN_SPECS + [KernelSpecDef("egt-margin60", config={"keepalive_margin": 60})]
    gateway = gateway_factory("margin-abc", kernelspecs=specs, env={"EG_SSH_KEEPALIVE_MARGIN": "abc"})
    require_native(gateway)
    client = gateway.client()
    try:
        # The kernelspec's own margin overrides the bad environment: this gateway can still serve.
        serving = client.start_kernel("egt-margin60")
        serving.execute("x = 1")
        error = _failed_start(gateway, client, "egt", e2e_hosts.a, serving)
        assert error.status == 500, error
        assert "EG_SSH_KEEPALIVE_MARGIN" in error.reason and "abc" in error.reason, error.reason
        report("EG_SSH_KEEPALIVE_MARGIN=abc", status=error.status, reason=error.reason[:200])
    finally:
        client.close()
        stop_gateway(gateway, e2e_hosts)
