"""Many kernels: 20 start/delete cycles in a row leave nothing behind, and 20 concurrent starts finish
sooner than 20 sequential ones while the gateway keeps answering other requests.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import pytest
import requests

import harness

from .conftest import E2EHosts
from .gateway import Gateway
from .kernel_client import GatewayClient, Kernel
from .support import kernel_side_procs, report, require_native, sshd_session_procs, wait_for

pytestmark = pytest.mark.e2e

CYCLES = 20
DELETE_BUDGET = 0.5
KERNELSPECS_P99_BUDGET = 0.1
# What tunnels may add to the event loop's p99 over tunneling off's in the same run.
KERNELSPECS_P99_MARGIN = 0.05
REMOTE_NICENESS = 10


@dataclass
class Cycles:
    start_seconds: list[float] = field(default_factory=list)
    delete_seconds: list[float] = field(default_factory=list)
    ports_before: set[int] = field(default_factory=set)


@pytest.fixture(scope="module")
def sequential(gateway: Gateway) -> Cycles:
    """20 start / cell / delete cycles, one after the other; both tests below read its figures."""
    require_native(gateway)
    out = Cycles(ports_before=gateway.listening_ports())
    client = gateway.client()
    try:
        for i in range(CYCLES):
            kernel = client.start_kernel("egt")
            out.start_seconds.append(kernel.start_seconds)
            assert kernel.execute(f"print({i})").stdout == f"{i}\n"
            out.delete_seconds.append(kernel.delete())
    finally:
        client.close()
    return out


def test_twenty_start_delete_cycles_leave_nothing_behind(
        gateway: Gateway, sequential: Cycles, e2e_hosts: E2EHosts) -> None:
    host = e2e_hosts.a
    report("sequential", starts_total=sum(sequential.start_seconds), start_max=max(sequential.start_seconds),
           delete_max=max(sequential.delete_seconds))
    assert max(sequential.delete_seconds) < DELETE_BUDGET, sequential.delete_seconds
    wait_for(lambda: not kernel_side_procs(host), 15,
             what=f"no kernel, launcher or listener on the remote host: {kernel_side_procs(host)}")
    wait_for(lambda: gateway.listening_ports() <= sequential.ports_before, 5, what="no tunnel listener left")
    wait_for(lambda: not gateway.status()["kernels"], 5, what="the gateway to hold no kernel")
    # Once the last forward is gone the shared connection closes too, and its sshd session with it.
    wait_for(lambda: not sshd_session_procs(host), 30, what="no sshd session left on the remote host")


def _sample_kernelspecs(url: str, stop: threading.Event, samples: list[float]) -> None:
    session = requests.Session()
    try:
        while not stop.is_set():
            started = time.monotonic()
            response = session.get(url + "/api/kernelspecs", timeout=10)
            samples.append(time.monotonic() - started)
            response.raise_for_status()
            stop.wait(0.02)
    finally:
        session.close()


@contextlib.contextmanager
def _remote_host_priority(host: harness.RemoteHost, niceness: int) -> Iterator[None]:
    """Run what sshd starts on `host` at a lower CPU priority than the gateway.

    The remote host here shares the gateway's CPUs; on a real cluster 20 kernels starting up burn
    another machine's. Everything sshd forks inherits its niceness, so renicing the listener makes the
    kernels yield to the gateway and the figure measures the gateway's event loop, not the CPU race.
    """
    pid = host.sshd.pid
    assert pid
    before = os.getpriority(os.PRIO_PROCESS, pid)
    os.setpriority(os.PRIO_PROCESS, pid, niceness)
    try:
        yield
    finally:
        if host.sshd.pid == pid:
            os.setpriority(os.PRIO_PROCESS, pid, before)


@dataclass
class Burst:
    wall: float
    samples: list[float]
    slowest_start: float


def _concurrent_starts(gateway: Gateway, spec: str, host: harness.RemoteHost) -> Burst:
    """CYCLES kernels of `spec` started at once, each running a cell, while GET /api/kernelspecs is
    sampled; every kernel is deleted again before this returns."""
    clients = [gateway.client(timeout=120) for _ in range(CYCLES)]
    samples: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_kernelspecs, args=(gateway.url, stop, samples))
    try:
        with _remote_host_priority(host, REMOTE_NICENESS):
            sampler.start()
            time.sleep(0.3)  # a few samples of the idle gateway first
            started = time.monotonic()
            with ThreadPoolExecutor(CYCLES) as pool:
                kernels: list[Kernel] = list(pool.map(lambda c: c.start_kernel(spec, timeout=120), clients))
            wall = time.monotonic() - started
            stop.set()
            sampler.join(15)
        with ThreadPoolExecutor(CYCLES) as pool:
            cells = list(pool.map(lambda ik: ik[1].execute(f"print({ik[0]})", timeout=60), enumerate(kernels)))
        assert [c.stdout for c in cells] == [f"{i}\n" for i in range(CYCLES)], spec
        return Burst(wall, samples, max(k.start_seconds for k in kernels))
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join(15)
        with ThreadPoolExecutor(CYCLES) as pool:
            list(pool.map(GatewayClient.close, clients))


def test_twenty_concurrent_starts(gateway: Gateway, sequential: Cycles, e2e_hosts: E2EHosts) -> None:
    # Tunneling off before and after, under whatever else this machine is running at the time: its
    # event-loop latency is the floor. An idle machine is held to the absolute budget; a loaded one to
    # the floor plus the same margin. A p99 of a few hundred samples is a burst's second-worst stall,
    # and on a loaded machine the stalls drift from one burst to the next: the floor is the worse of the
    # two bursts around egtunnel's, so both figures include the same period's CPU contention.
    before = _concurrent_starts(gateway, "egt-notunnel", e2e_hosts.a)
    wait_for(lambda: not kernel_side_procs(e2e_hosts.a), 20, what="nothing left on the remote host")
    burst = _concurrent_starts(gateway, "egt", e2e_hosts.a)
    wait_for(lambda: not kernel_side_procs(e2e_hosts.a), 20, what="nothing left on the remote host")
    after = _concurrent_starts(gateway, "egt-notunnel", e2e_hosts.a)
    p99 = harness.percentile(burst.samples, 99)
    floor_p99s = [harness.percentile(b.samples, 99) for b in (before, after)]
    floor_p99 = max(floor_p99s)
    sequential_total = sum(sequential.start_seconds)
    report("concurrent", wall=burst.wall, sequential_total=sequential_total, kernelspecs_p99=p99,
           kernelspecs_p50=harness.percentile(burst.samples, 50), kernelspecs_max=max(burst.samples),
           samples=len(burst.samples), slowest_start=burst.slowest_start, tunneling_off_wall=before.wall,
           tunneling_off_kernelspecs_p99=floor_p99s,
           tunneling_off_kernelspecs_max=[max(b.samples) for b in (before, after)])  # fmt: skip
    assert p99 < max(KERNELSPECS_P99_BUDGET, floor_p99 + KERNELSPECS_P99_MARGIN), (p99, floor_p99s)
    assert burst.wall < sequential_total
    wait_for(lambda: not kernel_side_procs(e2e_hosts.a), 20, what="nothing left on the remote host")
