"""What the end-to-end tests look at on a remote host and in the gateway, in one place, so that every
test judges "nothing left behind" and "native tunnels" by the same rules.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import pytest

import harness
from harness import procs

from .gateway import Gateway
from .kernel_client import Kernel

CHANNELS = ("SHELL", "IOPUB", "STDIN", "HB", "CONTROL", "EG_COMM")


def sshd_listener_pids(host: harness.RemoteHost) -> set[int]:
    return {s.pid for s in host.ssh_servers if s.pid}


def sshd_session_procs(host: harness.RemoteHost) -> list[procs.Proc]:
    """Per-connection sshd processes in the host's namespace (the listener excluded)."""
    listeners = sshd_listener_pids(host)
    return [p for p in procs.netns_procs(host.name) if p.comm == "sshd" and p.pid not in listeners]


def kill_sshd(host: harness.RemoteHost, down_seconds: float) -> None:
    """Every sshd process dies (listener first, so nothing reconnects in between), but not what was
    started over SSH: the kernel outlives sshd as it would on a real host. sshd is back after `down_seconds`."""
    listener = host.sshd.pid
    assert listener
    os.kill(listener, signal.SIGKILL)
    for p in sshd_session_procs(host):
        os.kill(p.pid, signal.SIGKILL)
    time.sleep(down_seconds)
    host.sshd.start()


def kernel_side_procs(host: harness.RemoteHost) -> list[procs.Proc]:
    """What runs in the host's namespace besides sshd and the fixtures' own services: launchers,
    kernels, comm listeners, shells. After the last kernel is gone this must be empty."""
    services = {s.pid for s in [*host.ssh_servers, host.echo] if s is not None and s.pid}
    return [p for p in procs.netns_procs(host.name) if p.comm != "sshd" and p.pid not in services]


def shells(host: harness.RemoteHost) -> list[procs.Proc]:
    return [p for p in procs.netns_procs(host.name) if p.comm in ("bash", "sh", "dash", "zsh")]


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "") -> Any:
    """harness.wait_until at a pace suited to asking a gateway over HTTP."""
    return harness.wait_until(predicate, timeout, interval, what)


def kernel_status(gw: Gateway, kernel: Kernel) -> dict[str, Any]:
    return gw.status()["kernels"][kernel.id]


def live_tunnels(gw: Gateway, kernel: Kernel) -> dict[str, dict[str, Any]]:
    return kernel_status(gw, kernel)["tunnels"]


def connections_to(gw: Gateway, host: harness.RemoteHost) -> list[dict[str, Any]]:
    """egtunnel.status() entries (live SSH connections in the gateway) whose host is `host`."""
    conns = gw.status()["connections"]
    return [c for c in conns if c.get("host") == host.address and int(c.get("port", 0)) == host.sshd.port]


def require_native(gw: Gateway) -> None:
    """Skip, naming what is missing, where the gateway cannot load egtunnel's native module."""
    connections = gw.status()["connections"]
    if isinstance(connections, dict) and "error" in connections:
        pytest.skip(f"egtunnel is not importable in the gateway: {connections['error']}")


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def report(name: str, **values: Any) -> None:
    """One line per measured figure in the test's output (shown with -s or -rA, and in the log)."""
    parts = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"[e2e] {name}: {parts}")
