#!/usr/bin/env python3
"""What a wake-up of the shared connection costs as idle channels pile up beside a busy one.

One connection carries N idle channels (a local connection held open on each of N forwards, as a
kernel's ZMQ sockets hold them) and one busy channel doing small echo round trips. The number is the
gateway process's CPU time (all threads) per round trip, measured for N = 0 and N = 600 (100 kernels'
worth) in the same run, alternating, so that the ratio shows what the idle channels add.

    .venv/bin/python bench/wakeup.py [--idle 600] [--trips 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402

# Every channel on one SSH connection, which is what this measures: no lanes (see README.md).
os.environ["EG_SSH_MAX_LANES"] = "1"

import egtunnel  # noqa: E402

CHANNELS = ("SHELL", "IOPUB", "STDIN", "HB", "CONTROL", "EG_COMM")


def cpu_per_trip(port: int, trips: int) -> tuple[float, float]:
    """(CPU seconds per round trip, wall seconds per round trip) for `trips` 64-byte echoes."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = b"x" * 64
    for _ in range(50):  # warm up
        s.sendall(payload)
        harness.recv_exact(s, len(payload))
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(trips):
        s.sendall(payload)
        harness.recv_exact(s, len(payload))
    c1, w1 = time.process_time(), time.perf_counter()
    s.close()
    return (c1 - c0) / trips, (w1 - w0) / trips


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", type=int, default=600)
    ap.add_argument("--trips", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if harness.sshd_unavailable_reason():
        print(f"wakeup: cannot run: {harness.sshd_unavailable_reason()}", file=sys.stderr)
        return 2
    server = harness.SshServer(log_level="INFO").start()
    echo = harness.EchoServer().start()
    kw = server.connect_kwargs()
    target = egtunnel.SshTarget(kw.pop("host"), **kw)
    busy = target.open_forwards([("SHELL", "127.0.0.1", echo.port)], kernel_id="busy")[0]
    idle_socks: list[socket.socket] = []
    results: dict[str, list[float]] = {"0": [], str(args.idle): []}
    try:
        forwards = []
        for k in range(0, args.idle, len(CHANNELS)):
            n = min(len(CHANNELS), args.idle - k)
            forwards += target.open_forwards([(ch, "127.0.0.1", echo.port) for ch in CHANNELS[:n]], kernel_id=f"idle-{k}")
        for r in range(args.rounds):
            for idle in (0, args.idle):
                while len(idle_socks) < idle:
                    s = socket.create_connection(("127.0.0.1", forwards[len(idle_socks)].local_port))
                    s.sendall(b"!")
                    harness.recv_exact(s, 1)  # the channel is open end to end
                    idle_socks.append(s)
                while len(idle_socks) > idle:
                    idle_socks.pop().close()
                time.sleep(0.5)
                cpu, wall = cpu_per_trip(busy.local_port, args.trips)
                results[str(idle)].append(cpu)
                print(f"round {r}: {idle:4d} idle channels: {cpu * 1e6:7.1f} us CPU, {wall * 1e6:7.1f} us wall per round trip",
                      file=sys.stderr, flush=True)  # fmt: skip
        best = {k: min(v) for k, v in results.items()}
        out = {"cpu_us_per_trip": {k: round(v * 1e6, 1) for k, v in best.items()},
               "ratio": round(best[str(args.idle)] / best["0"], 2)}  # fmt: skip
        print(json.dumps(out))
        return 0
    finally:
        for s in idle_socks:
            s.close()
        server.close()
        echo.close()


if __name__ == "__main__":
    sys.exit(main())
