#!/usr/bin/env python3
"""How long kernels wait for their channels when sshd is far away: egtunnel against a stock sshd
behind a delay proxy (bench/delay_proxy.py) at several round-trip times, on a warm shared connection.

  (a) one kernel's six verified forwards (`SshTarget.open_forwards`, as the process proxies open them);
  (b) eight kernels' forwards opened at once, until all eight are up, and the ratio to (a);
  (c) a host's channels reopening after a network cut: N kernels x 6 forwards, each carrying one
      local connection to an echo service; the proxy resets every connection, the local clients
      reconnect as ZMQ does (100 ms later), and the time from the cut until every one of them has
      an echo back is measured.

Everything runs on loopback (sshd, the echo service, the proxy); sshd keeps OpenSSH's default limits.
Prints a table; `--json PATH` writes the numbers. bench/README.md explains them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import egtunnel  # noqa: E402
import harness  # noqa: E402
from delay_proxy import DelayProxy  # noqa: E402

CHANNELS = ("SHELL", "IOPUB", "STDIN", "HB", "CONTROL", "EG_COMM")
# ZMQ's default reconnect interval (ZMQ_RECONNECT_IVL).
RECONNECT_IVL = 0.1
REOPEN_LIMIT = 120.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def destination_connections(port: int) -> int:
    return sum(1 for c in egtunnel.status() if c["port"] == port and c["host"] == "127.0.0.1")


class Clients:
    """One ZMQ-like client per forward: holds a connection, and when it ends reconnects after
    RECONNECT_IVL and checks with a one-byte echo that the new connection carries data."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.echoed: list[Optional[float]] = [None] * len(ports)
        self.since = 0.0
        self.progress = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._run(i, p)) for i, p in enumerate(self.ports)]

    def reset(self) -> None:
        """From now on, count echoes afresh."""
        self.since = time.monotonic()
        self.echoed = [None] * len(self.ports)

    def carrying(self) -> int:
        return sum(1 for t in self.echoed if t is not None)

    async def wait_all(self, limit: float) -> bool:
        deadline = time.monotonic() + limit
        while self.carrying() < len(self.ports):
            self.progress.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.progress.wait(), left)
            except asyncio.TimeoutError:
                return False
        return True

    async def _run(self, i: int, port: int) -> None:
        while True:
            writer = None
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"x")
                await writer.drain()
                if await reader.readexactly(1) == b"x":
                    self.echoed[i] = time.monotonic()
                    self.progress.set()
                await reader.read(1)  # held until the tunnel closes it
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                if writer is not None:
                    writer.close()
            await asyncio.sleep(RECONNECT_IVL)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def measure_rtt(server: harness.SshServer, echo_port: int, rtt_ms: float, a_repeats: int,
                      reopen_kernels: int, max_startups: int) -> dict:  # fmt: skip
    six = [(ch, "127.0.0.1", echo_port) for ch in CHANNELS]
    with DelayProxy(("127.0.0.1", server.port), rtt_ms / 2, env=harness.tagged_env(harness.new_mark())) as proxy:
        known_hosts = server.dir / f"known_hosts.proxy{proxy.port}"
        known_hosts.write_text(f"[127.0.0.1]:{proxy.port} {server.host_public_key}\n")
        target = egtunnel.SshTarget("127.0.0.1", port=proxy.port, user=server.user, ssh_config="none",
                                    identity_file=str(server.identity_file), known_hosts=str(known_hosts),
                                    max_startups=max_startups)  # fmt: skip
        # Keeps the shared connection up (and warm) for the whole measurement.
        keeper = await target.open_forwards_async(six[:1], verify=False, kernel_id="keeper")
        out: dict = {"rtt_ms": rtt_ms}
        try:
            one = []
            for i in range(a_repeats):
                t0 = time.monotonic()
                tunnels = await target.open_forwards_async(six, kernel_id=f"a{i}")
                one.append(time.monotonic() - t0)
                for t in tunnels:
                    t.terminate()
            out["one_kernel_s"] = statistics.median(one)
            out["one_kernel_all_s"] = one
            out["connections_after_one"] = destination_connections(proxy.port)
            for label in ("eight_cold", "eight_warm"):
                t0 = time.monotonic()
                sets = await asyncio.gather(*(target.open_forwards_async(six, kernel_id=f"{label}{i}") for i in range(8)))
                out[f"{label}_s"] = time.monotonic() - t0
                out[f"connections_{label}"] = destination_connections(proxy.port)
                for tunnels in sets:
                    for t in tunnels:
                        t.terminate()
            out["eight_ratio"] = out["eight_cold_s"] / out["one_kernel_s"]
            if reopen_kernels:
                out.update(await reopen(target, proxy, six, reopen_kernels))
        finally:
            for t in keeper:
                t.terminate()
    return out


async def reopen(target: "egtunnel.SshTarget", proxy: DelayProxy, six: list, kernels: int) -> dict:
    t0 = time.monotonic()
    sets = await asyncio.gather(*(target.open_forwards_async(six, kernel_id=f"r{i}", verify=False) for i in range(kernels)))
    res: dict = {"reopen_kernels": kernels, "reopen_channels": 6 * kernels, "setup_forwards_s": time.monotonic() - t0}
    clients = Clients([t.local_port for tunnels in sets for t in tunnels])
    try:
        clients.reset()
        clients.start()
        ok = await clients.wait_all(REOPEN_LIMIT)
        res["first_open_s"] = time.monotonic() - clients.since
        res["first_open_ok"] = ok
        res["connections_before_cut"] = destination_connections(proxy.port)
        clients.reset()
        proxy.cut()
        ok = await clients.wait_all(REOPEN_LIMIT)
        res["reopen_s"] = time.monotonic() - clients.since
        res["reopen_ok"] = ok
        res["reopen_carrying"] = clients.carrying()
        res["connections_after_reopen"] = destination_connections(proxy.port)
    finally:
        await clients.stop()
        for tunnels in sets:
            for t in tunnels:
                t.terminate()
    return res


def report(rows: list[dict]) -> str:
    head = ["RTT ms", "(a) 1 kernel s", "(b) 8 kernels s", "ratio", "8 warm s", "conns", "(c) first s",
            "(c) reopen s", "carrying", "conns"]  # fmt: skip
    lines = []
    for r in rows:
        lines.append([
            f"{r['rtt_ms']:g}", f"{r['one_kernel_s']:.3f}", f"{r['eight_cold_s']:.3f}", f"{r['eight_ratio']:.2f}",
            f"{r['eight_warm_s']:.3f}", str(r["connections_eight_warm"]),
            f"{r['first_open_s']:.2f}" if "first_open_s" in r else "-",
            (f"{r['reopen_s']:.2f}" + ("" if r["reopen_ok"] else " (limit)")) if "reopen_s" in r else "-",
            f"{r['reopen_carrying']}/{r['reopen_channels']}" if "reopen_s" in r else "-",
            str(r.get("connections_after_reopen", "-")),
        ])  # fmt: skip
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*l) for l in lines)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rtt", default="0,10,50", help="round-trip times in ms, comma-separated (default 0,10,50)")
    p.add_argument("--kernels", type=int, default=100, help="kernels whose channels reopen in (c); 0 skips (c)")
    p.add_argument("--repeats", type=int, default=5, help="samples of (a); the median is reported")
    p.add_argument("--quick", action="store_true", help="RTT 0 and 10 ms, 5 kernels in (c), 1 sample: only proves it runs")
    p.add_argument("--max-startups", type=int, default=8,
                   help="egtunnel's handshakes in flight to the host (EG_SSH_MAX_STARTUPS; default 8, sshd allows 10)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    if a.quick:
        a.rtt, a.kernels, a.repeats = "0,10", 5, 1
    reason = harness.sshd_unavailable_reason()
    if reason:
        log(reason)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    with harness.SshServer(log_level="INFO") as server, harness.EchoServer() as echo:
        server.start()
        echo.start()
        for rtt in [float(x) for x in a.rtt.split(",") if x]:
            log(f"RTT {rtt:g} ms ...")
            rows.append(asyncio.run(measure_rtt(server, echo.port, rtt, a.repeats, a.kernels, a.max_startups)))
            log(json.dumps(rows[-1]))
    print(report(rows))
    meta = {"max_lanes": os.environ.get("EG_SSH_MAX_LANES", "default"), "max_startups": a.max_startups,
            "egtunnel": getattr(egtunnel, "__version__", "?"), "loadavg": os.getloadavg()}  # fmt: skip
    print(f"EG_SSH_MAX_LANES={meta['max_lanes']}  max_startups={a.max_startups}  load average {meta['loadavg'][0]:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    failed = [r["rtt_ms"] for r in rows if not r.get("reopen_ok", True) or not r.get("first_open_ok", True)]
    if failed:
        print(f"ERRORS: channels not all carrying data within {REOPEN_LIMIT:g} s at RTT {failed} ms")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
