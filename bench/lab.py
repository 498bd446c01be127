"""The soak and scale runs' lab: remote hosts in network namespaces with stock sshd, and a real
Enterprise Gateway whose kernels run on them, built from the test suite's own helpers.

Every sshd here keeps OpenSSH's default limits. Nothing talks to anything but loopback and the
namespaces created here; `Lab.close()` (also on Ctrl-C) removes the gateway, kernels and namespaces.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402
from harness import procs  # noqa: E402
from e2e.gateway import Gateway, GatewayConfig, KernelSpecDef  # noqa: E402
from e2e.kernel_client import GatewayClient, Kernel  # noqa: E402

SPECS = [
    KernelSpecDef("egt"),
    KernelSpecDef("egt-perport", config={"tunnel_mode": "per-port"}),
    KernelSpecDef("egt-notunnel", config={"tunneling": False}),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "egtunnel-lab", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)  # fmt: skip
    return path


class Lab:
    """`n_hosts` namespace hosts with stock sshd on one port, and (after start_gateway) a gateway."""

    def __init__(self, n_hosts: int, cull_idle_timeout: int = 300, separate_cpus: bool = False) -> None:
        for reason in (harness.netns_unavailable_reason(), harness.sshd_unavailable_reason()):
            if reason:
                raise SystemExit(f"cannot build the lab: {reason}")
        self.dir = Path(tempfile.mkdtemp(prefix="egtunnel-lab-"))
        self.cull_idle_timeout = cull_idle_timeout
        self.hosts: list[harness.RemoteHost] = []
        self.gateway: Optional[Gateway] = None
        self.identity = _keygen(self.dir / "id_gateway")
        port = None
        for i in range(n_hosts):
            host = harness.RemoteHost().start()
            self.hosts.append(host)
            host.ssh_server(workdir=self.dir / f"sshd-{i}", port=port, log_level="VERBOSE")
            port = host.sshd.port
            host.sshd.authorized_keys.write_text(Path(f"{self.identity}.pub").read_text())
            self.separate_cpus = separate_cpus and len(os.sched_getaffinity(0)) >= 2
            if self.separate_cpus:
                # The "remote" kernels share the gateway's machine here; on a real cluster they start
                # and exit on another one. What sshd starts inherits its CPU affinity: the host's kernels
                # get the last CPU, and start_gateway gives the gateway the others.
                os.sched_setaffinity(host.sshd.pid, {max(os.sched_getaffinity(0))})
        first = self.hosts[0]
        for host in self.hosts[1:]:
            # Launchers on every host report to the gateway's response address on the first host's veth.
            host.run(["ip", "route", "add", f"{first.gateway_address}/32", "via", host.gateway_address],
                     check=True, capture_output=True)  # fmt: skip
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text("".join(h.sshd.known_hosts_line() for h in self.hosts))

    def start_gateway(self, name: str = "gateway", **overrides: object) -> Gateway:
        first = self.hosts[0]
        cfg = GatewayConfig(
            remote_hosts=[h.address for h in self.hosts],
            ssh_port=first.sshd.port,
            response_ip=first.gateway_address,
            identity_file=self.identity,
            known_hosts=self.known_hosts,
            remote_user=first.sshd.user,
            tunneling=True,
            cull_idle_timeout=self.cull_idle_timeout,
            kernelspecs=list(SPECS),
            log_level="INFO",
            launch_timeout=120,
        )
        for key, value in overrides.items():
            setattr(cfg, key, value)
        cfg.env = {harness.OWNER_ENV: f"{os.getpid()}:lab-gateway", **cfg.env}
        self.gateway = Gateway(self.dir / name, cfg).start()
        if getattr(self, "separate_cpus", False):
            cpus = os.sched_getaffinity(0) - {max(os.sched_getaffinity(0))}
            for tid in os.listdir(f"/proc/{self.gateway.pid}/task"):
                os.sched_setaffinity(int(tid), cpus)
        return self.gateway

    def stop_gateway(self) -> None:
        """Stops the gateway and whatever kernel it failed to stop (they carry its response address)."""
        if self.gateway is not None:
            gw, self.gateway = self.gateway, None
            try:
                gw.stop()
            finally:
                marker = f"{gw.config.response_ip}:{gw.response_port}"
                for host in self.hosts:
                    procs.kill_procs(p for p in procs.netns_procs(host.name) if marker in p.cmdline)

    def close(self) -> None:
        self.stop_gateway()
        for host in reversed(self.hosts):
            host.close()
        self.hosts.clear()

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- what the runs measure ------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process and its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kernel_side_procs(host: harness.RemoteHost) -> list[procs.Proc]:
    """Launchers, kernels and shells in the host's namespace: everything but sshd and its listener."""
    listener = host.sshd.pid if host.sshd else None
    return [p for p in procs.netns_procs(host.name) if p.comm != "sshd" and p.pid != listener]


def sshd_sessions(host: harness.RemoteHost) -> list[procs.Proc]:
    listener = host.sshd.pid if host.sshd else None
    return [p for p in procs.netns_procs(host.name) if p.comm == "sshd" and p.pid != listener]


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def start_many(gw: Gateway, spec: str, n: int, at_once: int) -> tuple[list[GatewayClient], list[Kernel], float]:
    """n kernels, `at_once` starting at a time; returns their clients, kernels and the wall time."""
    clients = [gw.client(timeout=180) for _ in range(n)]
    started = time.monotonic()
    with ThreadPoolExecutor(at_once) as pool:
        kernels = list(pool.map(lambda c: c.start_kernel(spec, timeout=180), clients))
    return clients, kernels, time.monotonic() - started


def first_cells(kernels: list[Kernel], at_once: int, timeout: float = 30.0) -> list[bool]:
    """Each kernel runs `v = i; print(i)`; True where the output arrived intact."""

    def run(ik: tuple[int, Kernel]) -> bool:
        i, k = ik
        try:
            return k.execute(f"v = {i}; print({i})", timeout=timeout).stdout == f"{i}\n"
        except Exception:
            return False

    with ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(run, enumerate(kernels)))


def second_cells(kernels: list[Kernel], at_once: int) -> list[bool]:
    """Each kernel prints `v` (set by its first cell): True where it answers with its own state."""

    def run(ik: tuple[int, Kernel]) -> bool:
        i, k = ik
        try:
            return k.execute("print(v)", timeout=30).stdout == f"{i}\n"
        except Exception:
            return False

    with ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(run, enumerate(kernels)))


def close_websockets(kernels: list[Kernel]) -> float:
    """Closes every kernel's websocket at once (as clients leave); returns the wall time."""
    started = time.monotonic()
    with ThreadPoolExecutor(max(1, len(kernels))) as pool:
        list(pool.map(lambda k: k.close_ws(), kernels))
    return time.monotonic() - started


def delete_all(kernels: list[Kernel], clients: list[GatewayClient]) -> float:
    """Deletes every kernel at once; returns the wall time until the last DELETE answered."""
    close_websockets(kernels)
    started = time.monotonic()
    with ThreadPoolExecutor(max(1, len(kernels))) as pool:
        list(pool.map(lambda k: k.delete(timeout=120), kernels))
    wall = time.monotonic() - started
    for c in clients:
        c.close()
    return wall


class LoopProbe:
    """Samples GET /api/kernelspecs, the gateway's event-loop latency, until stopped."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        import requests

        self._session = requests.Session()
        self._url = url + "/api/kernelspecs"
        self._interval = interval
        self._stop = threading.Event()
        self._marks: list[tuple[str, int]] = []
        self.samples: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._session.get(self._url, timeout=30).raise_for_status()
                self.samples.append(time.monotonic() - started)
            except Exception:
                self.samples.append(30.0)
            self._stop.wait(self._interval)

    def mark(self, name: str) -> None:
        self._marks.append((name, len(self.samples)))

    def window(self, name: str) -> list[float]:
        """Samples from mark `name` to the next mark (or now)."""
        for i, (n, start) in enumerate(self._marks):
            if n == name:
                end = self._marks[i + 1][1] if i + 1 < len(self._marks) else len(self.samples)
                return self.samples[start:end]
        raise KeyError(name)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(35)
        self._session.close()


@contextlib.contextmanager
def probing(url: str) -> Iterator[LoopProbe]:
    probe = LoopProbe(url)
    try:
        yield probe
    finally:
        probe.stop()


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])  # fmt: skip
