#!/usr/bin/env python3
"""egtunnel's soak run: a real Enterprise Gateway, two remote hosts with stock sshd, many kernels at once.

Steps (each checked; the exit status is 0 only when every check holds):
 1. N kernels (default 40) start at once across both hosts in shared mode; each runs a cell.
 2. sshd on the first host is killed and restarted while kernels on both hosts run cells: those on the
    second host never notice, those on the first recover with their state.
 3. All N are deleted at once; the same N start at once with tunneling off (the reference wall time).
 4. M kernels (default 20) start at once in per-port mode (six SSH connections each); each runs a cell.
 5. C start / execute / delete cycles (default 200, four at a time); afterwards the gateway's fds,
    threads and listening ports are back to their baseline and nothing of egtunnel's is left on the hosts.

    .venv/bin/python bench/soak.py               # the full run (make soak)
    .venv/bin/python bench/soak.py --quick       # 8 / 4 / 12: about a minute
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lab import (
    Lab,
    cpu_seconds,  # noqa: F401 - re-exported for callers that extend the run
    delete_all,
    first_cells,
    kernel_side_procs,
    log,
    rss_mb,
    sshd_sessions,
    start_many,
    table,
    wait_until,
)

RECOVERY_BUDGET = 15.0


@dataclass
class Outcome:
    rows: list[list[object]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, step: str, what: str, value: object, ok: bool = True) -> None:
        self.rows.append([step, what, value, "ok" if ok else "FAILED"])
        if not ok:
            self.failures.append(f"{step}: {what} = {value}")


def host_of(gw, kernel_id: str) -> str:
    return gw.status()["kernels"][kernel_id]["ip"]


def cells_until_stopped(kernels, stop: threading.Event, results: list) -> None:
    """Runs cells round-robin on `kernels` until stopped; records (ok, seconds) per cell."""
    i = 0
    while not stop.is_set():
        k = kernels[i % len(kernels)]
        started = time.monotonic()
        try:
            ok = k.execute(f"print({i})", timeout=10).stdout == f"{i}\n"
        except Exception:
            ok = False
        results.append((ok, time.monotonic() - started))
        i += 1


def first_good_cell(kernel, budget: float) -> float:
    started = time.monotonic()
    attempt = 0
    while time.monotonic() - started < budget:
        attempt += 1
        try:
            if kernel.execute(f"print('a{attempt}')", timeout=2.5).stdout == f"a{attempt}\n":
                return time.monotonic() - started
        except Exception:
            pass
    return float("inf")


def run(args: argparse.Namespace) -> int:
    out = Outcome()
    with Lab(2) as lab:
        a, b = lab.hosts
        gw = lab.start_gateway()
        warm_clients, warm, _ = start_many(gw, "egt", 2, 2)
        delete_all(warm, warm_clients)

        # 1. N at once, shared mode, across both hosts.
        log(f"starting {args.shared} kernels at once (shared mode)")
        clients, kernels, wall = start_many(gw, "egt", args.shared, args.shared)
        out.add("1 shared", f"{args.shared} starts at once: wall (s)", f"{wall:.1f}")
        oks = first_cells(kernels, args.shared)
        out.add("1 shared", "kernels that ran their first cell", f"{sum(oks)}/{len(oks)}", all(oks))
        by_host: dict[str, list] = {a.address: [], b.address: []}
        for i, k in enumerate(kernels):
            by_host.setdefault(host_of(gw, k.id), []).append((i, k))
        out.add("1 shared", "kernels on host 1 / host 2",
                f"{len(by_host[a.address])}/{len(by_host[b.address])}",
                bool(by_host[a.address]) and bool(by_host[b.address]))  # fmt: skip

        # 2. sshd on host 1 restarted while both hosts' kernels run cells.
        log("restarting sshd on host 1 while cells run on both hosts")
        other = [k for _, k in by_host[b.address]][:4]
        stop = threading.Event()
        other_results: list = []
        worker = threading.Thread(target=cells_until_stopped, args=(other, stop, other_results))
        worker.start()
        time.sleep(1.0)
        listener = a.sshd.pid
        os.kill(listener, signal.SIGKILL)
        for p in sshd_sessions(a):
            os.kill(p.pid, signal.SIGKILL)
        time.sleep(2.0)
        a.sshd.start()
        back = time.monotonic()
        victims = by_host[a.address]
        with ThreadPoolExecutor(len(victims)) as pool:
            recovered = list(pool.map(lambda ik: first_good_cell(ik[1], RECOVERY_BUDGET), victims))
        worst = max(recovered)
        time.sleep(1.0)
        stop.set()
        worker.join(30)
        state_ok = all(k.execute("print(v)", timeout=30).stdout == f"{i}\n" for i, k in victims)
        out.add("2 restart", "host 1: recovery after sshd is back, worst kernel (s)", f"{worst:.2f}",
                worst < RECOVERY_BUDGET)  # fmt: skip
        out.add("2 restart", "host 1: kernels kept their state", f"{len(victims)} kernels", state_ok)
        bad = sum(not ok for ok, _ in other_results)
        slowest = max((s for _, s in other_results), default=0.0)
        out.add("2 restart", "host 2: cells during the restart (failed / slowest s)",
                f"{len(other_results)} ({bad} / {slowest:.2f})", bad == 0 and bool(other_results))  # fmt: skip
        out.add("2 restart", "gateway declared no kernel dead",
                sum(len(k.lifecycle_states) for k in kernels), all(not k.lifecycle_states for k in kernels))  # fmt: skip

        # 3. Delete all; the same starts with tunneling off.
        wall_delete = delete_all(kernels, clients)
        out.add("3 reference", f"delete {args.shared} at once (s)", f"{wall_delete:.2f}")
        log(f"starting {args.shared} kernels at once with tunneling off")
        clients, kernels, wall_off = start_many(gw, "egt-notunnel", args.shared, args.shared)
        oks = first_cells(kernels, args.shared)
        out.add("3 reference", f"tunneling off: {args.shared} starts at once: wall (s)", f"{wall_off:.1f}", all(oks))
        out.add("3 reference", "egtunnel / tunneling off, start wall", f"{wall / wall_off:.2f}x")
        delete_all(kernels, clients)

        # 4. Per-port mode.
        log(f"starting {args.perport} kernels at once (per-port mode)")
        clients, kernels, wall_pp = start_many(gw, "egt-perport", args.perport, args.perport)
        oks = first_cells(kernels, args.perport)
        out.add("4 per-port", f"{args.perport} starts at once: wall (s)", f"{wall_pp:.1f}")
        out.add("4 per-port", "kernels that ran their first cell", f"{sum(oks)}/{len(oks)}", all(oks))
        delete_all(kernels, clients)
        drops = sum(h.sshd.log_count("past MaxStartups") for h in lab.hosts)
        out.add("4 per-port", "handshakes sshd dropped (MaxStartups)", drops)

        # 5. Cycles, then back to baseline.
        settle(gw, lab)
        base = (gw.fds(), gw.threads(), len(gw.listening_ports()), rss_mb(gw.pid))
        log(f"{args.cycles} start/execute/delete cycles, {args.parallel} at a time")
        failures = cycles(gw, args.cycles, args.parallel)
        out.add("5 cycles", f"{args.cycles} cycles: failed", failures, failures == 0)
        settled = settle(gw, lab, base)
        after = (gw.fds(), gw.threads(), len(gw.listening_ports()), rss_mb(gw.pid))
        out.add("5 cycles", "gateway fds before -> after", f"{base[0]} -> {after[0]}", after[0] <= base[0])
        out.add("5 cycles", "gateway threads before -> after", f"{base[1]} -> {after[1]}", after[1] <= base[1])
        out.add("5 cycles", "listening ports before -> after", f"{base[2]} -> {after[2]}", after[2] <= base[2])
        out.add("5 cycles", "gateway RSS (MB) before -> after", f"{base[3]:.1f} -> {after[3]:.1f}")
        left = [p.cmdline[:60] for h in lab.hosts for p in kernel_side_procs(h)]
        out.add("5 cycles", "left on the hosts (processes, sshd sessions)",
                f"{len(left)}, {sum(len(sshd_sessions(h)) for h in lab.hosts)}", settled)  # fmt: skip

    print(table(["step", "what", "value", "check"], out.rows))
    if out.failures:
        print("FAILED: " + "; ".join(out.failures))
        return 1
    print(f"soak passed: {len(out.rows)} rows, 0 failed")
    return 0


def cycles(gw, n: int, parallel: int) -> int:
    failures = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal failures
        client = gw.client(timeout=120)
        try:
            k = client.start_kernel("egt", timeout=120)
            ok = k.execute(f"print({i})", timeout=60).stdout == f"{i}\n"
            k.delete(timeout=60)
        except Exception as exc:
            log(f"cycle {i} failed: {exc}")
            ok = False
        finally:
            client.close()
        if not ok:
            with lock:
                failures += 1

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, range(n)))
    return failures


def settle(gw, lab: Lab, base: tuple | None = None, timeout: float = 45.0) -> bool:
    """Waits until no kernel, launcher or sshd session is left, and the gateway is back to `base`."""

    def quiet() -> bool:
        if any(kernel_side_procs(h) or sshd_sessions(h) for h in lab.hosts):
            return False
        if gw.status()["kernels"]:
            return False
        if base is None:
            return True
        return gw.fds() <= base[0] and gw.threads() <= base[1] and len(gw.listening_ports()) <= base[2]

    return wait_until(quiet, timeout, 0.5)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=int, default=40, help="kernels started at once in shared mode")
    p.add_argument("--perport", type=int, default=20, help="kernels started at once in per-port mode")
    p.add_argument("--cycles", type=int, default=200, help="start/execute/delete cycles")
    p.add_argument("--parallel", type=int, default=4, help="cycles running at once")
    p.add_argument("--quick", action="store_true", help="8 / 4 / 12 cycles: proves the run works")
    args = p.parse_args(argv)
    if args.quick:
        args.shared, args.perport, args.cycles = 8, 4, 12
    return args


def _stop(signum: int, frame: object) -> None:
    # Unwind through Lab.__exit__: the gateway, the kernels and the namespaces go with the run.
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    arguments = parse_args(None)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGALRM, _stop)
    signal.alarm(240 if arguments.quick else 2400)  # a hung step must not outlive its budget
    sys.exit(run(arguments))
