"""Prometheus metrics of a real gateway: with EG_TUNNEL_METRICS_PORT in its environment, /metrics shows a
running kernel's host connection and its six forwards, and after the host's sshd restarts and the
kernel recovers, the reconnect is counted and no total went backwards.
"""

from __future__ import annotations

from typing import Callable

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import harness

from .conftest import E2EHosts
from .gateway import Gateway, KernelSpecDef
from .support import CHANNELS, kill_sshd, report, require_native, wait_for
from .test_recovery import RECOVERY_BUDGET, SSHD_DOWN_SECONDS, _first_good_cell

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset], float]


def scrape(port: int) -> Samples:
    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    response.raise_for_status()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(response.text) for s in f.samples}  # fmt: skip


def value(samples: Samples, name: str, **labels: object) -> float:
    want = {k: str(v) for k, v in labels.items()}
    found = [v for (n, ls), v in samples.items() if n == name and want.items() <= dict(ls).items()]
    assert len(found) <= 1, f"{name}{want} is ambiguous: {found}"
    return found[0] if found else 0.0


def test_gateway_metrics_show_the_kernel_and_count_its_recovery(
        gateway_factory: Callable[..., Gateway], e2e_hosts: E2EHosts) -> None:  # fmt: skip
    port = harness.free_port()
    gw = gateway_factory("metrics", kernelspecs=[KernelSpecDef("egt")], env={"EG_TUNNEL_METRICS_PORT": str(port)})
    require_native(gw)
    host = e2e_hosts.a
    dest = {"user": host.sshd.user, "host": host.address, "port": host.sshd.port}
    client = gw.client()
    try:
        kernel = client.start_kernel("egt")
        assert kernel.execute("state = 41").status == "ok"
        before = scrape(port)
        assert value(before, "egtunnel_ssh_connections", **dest, state="connected") == 1
        for channel in CHANNELS:
            assert value(before, "egtunnel_forwards", **dest, channel=channel) == 1, channel
        assert value(before, "egtunnel_remote_commands_total", **dest, outcome="ok") >= 1  # the launch
        assert value(before, "egtunnel_remote_command_duration_seconds_count", **dest) >= 1
        assert value(before, "egtunnel_forwarded_bytes_total", **dest, direction="from_remote") > 0
        assert value(before, "egtunnel_ssh_reconnects_total", **dest) == 0

        kill_sshd(host, SSHD_DOWN_SECONDS)  # every sshd process dies, the kernel does not
        recovered = _first_good_cell(kernel, RECOVERY_BUDGET)
        assert kernel.execute("print(state + 1)").stdout == "42\n"

        after = wait_for(lambda: (lambda s: s if value(s, "egtunnel_ssh_reconnects_total", **dest) >= 1 else None)(
            scrape(port)), 5, what="the reconnect in /metrics")  # fmt: skip
        assert value(after, "egtunnel_ssh_connections", **dest, state="connected") == 1
        for name, labels in [("egtunnel_forwarded_bytes_total", {"direction": "to_remote"}),
                             ("egtunnel_forwarded_bytes_total", {"direction": "from_remote"}),
                             ("egtunnel_forwards_opened_total", {}), ("egtunnel_ssh_connections_opened_total", {}),
                             ("egtunnel_remote_command_duration_seconds_count", {})]:  # fmt: skip
            assert value(after, name, **dest, **labels) >= value(before, name, **dest, **labels) > 0, name
        report("metrics", recovered_seconds=recovered,
               reconnects=value(after, "egtunnel_ssh_reconnects_total", **dest))  # fmt: skip
        kernel.delete()
    finally:
        client.close()
