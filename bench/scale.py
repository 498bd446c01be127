#!/usr/bin/env python3
"""A gateway with many kernels: egtunnel against tunneling off, on one remote host with stock sshd.

For each mode, a fresh Enterprise Gateway: N kernels (default 100) start six at a time and each runs one
cell; all sit idle; then all are deleted at once. GET /api/kernelspecs is sampled throughout (every
50 ms) as a probe of the gateway's event loop. Tunneling off uses the same proxy class and host with
the kernelspec's `tunneling: false`, so the difference is the tunnels. The namespace host shares the
gateway's machine, so in both runs its kernels get one CPU and the gateway the other(s): on a real
cluster the kernels' start-up and exit burn another machine's CPU, not the gateway's.

    .venv/bin/python bench/scale.py                    # N = 100, 30 s idle (make scale)
    .venv/bin/python bench/scale.py -n 20 --idle 3     # the reduced run of the test suite
    .venv/bin/python bench/scale.py --json out.json

Exit status: 0 when every run completed and the targets hold (--no-targets: completed), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
from pathlib import Path
import sys
import time
from dataclasses import asdict, dataclass, field

from lab import (
    Lab,
    close_websockets,
    cpu_seconds,
    delete_all,
    first_cells,
    kernel_side_procs,
    second_cells,
    log,
    probing,
    rss_mb,
    start_many,
    table,
    wait_until,
)

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
import harness  # noqa: E402

AT_ONCE = 6


@dataclass
class Run:
    mode: str
    n: int
    start_s: float = 0.0
    cells_ok: int = 0
    working: int = 0
    probe_start: list[float] = field(default_factory=list)
    idle_cpu_pct: float = 0.0
    probe_idle: list[float] = field(default_factory=list)
    close_ws_s: float = 0.0
    probe_close: list[float] = field(default_factory=list)
    delete_s: float = 0.0
    probe_delete: list[float] = field(default_factory=list)
    rss_per_kernel_mb: float = 0.0
    threads_per_kernel: float = 0.0
    fds_per_kernel: float = 0.0
    threads_peak: int = 0
    left_on_host: int = 0


def one_run(lab: Lab, spec: str, n: int, idle: float, profile: str | None = None) -> Run:
    run = Run(mode=spec, n=n)
    gw = lab.start_gateway(f"gateway-{spec}-{int(time.time())}")
    try:
        clients, warm, _ = start_many(gw, spec, 2, 2)
        first_cells(warm, 2)
        delete_all(warm, clients)
        wait_until(lambda: not gw.status()["kernels"], 10)
        time.sleep(1.0)
        base_rss, base_threads, base_fds = rss_mb(gw.pid), gw.threads(), gw.fds()
        with probing(gw.url) as probe:
            time.sleep(0.5)
            probe.mark("start")
            started = time.monotonic()
            clients, kernels, _ = start_many(gw, spec, n, AT_ONCE)
            run.cells_ok = sum(first_cells(kernels, AT_ONCE))
            run.start_s = time.monotonic() - started
            run.working = sum(second_cells(kernels, AT_ONCE))
            run.threads_peak = gw.threads()
            probe.mark("idle")
            time.sleep(min(2.0, idle))  # let the starts' garbage settle before measuring
            cpu0, t0 = cpu_seconds(gw.pid), time.monotonic()
            if profile:
                # Samples the gateway's idle window, threads and call chains included, for `perf report`.
                # And the Python side with py-spy, when it is installed next to this interpreter.
                out = f"{profile}/{spec}.perf.data"
                spy = Path(sys.executable).with_name("py-spy")
                sampler = subprocess.Popen([str(spy), "record", "-p", str(gw.pid), "-d", str(int(idle)), "-f", "raw",
                                            "-o", f"{profile}/{spec}.py-spy.txt"], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL) if spy.exists() else None  # fmt: skip
                subprocess.run(["perf", "record", "-q", "-g", "-F", "997", "-p", str(gw.pid), "-o", out, "--",
                                "sleep", str(idle)], check=False)  # fmt: skip
                if sampler:
                    sampler.wait(30)
            else:
                time.sleep(idle)
            run.idle_cpu_pct = 100 * (cpu_seconds(gw.pid) - cpu0) / (time.monotonic() - t0)
            run.rss_per_kernel_mb = (rss_mb(gw.pid) - base_rss) / n
            run.threads_per_kernel = (gw.threads() - base_threads) / n
            run.fds_per_kernel = (gw.fds() - base_fds) / n
            probe.mark("close")
            run.close_ws_s = close_websockets(kernels)
            probe.mark("delete")
            run.delete_s = delete_all(kernels, clients)
            time.sleep(1.0)
            probe.mark("after")
        run.probe_start = probe.window("start")
        run.probe_idle = probe.window("idle")
        run.probe_close = probe.window("close")
        run.probe_delete = probe.window("delete")
        wait_until(lambda: not kernel_side_procs(lab.hosts[0]), 30)
        run.left_on_host = len(kernel_side_procs(lab.hosts[0]))
    finally:
        lab.stop_gateway()
    return run


def ms(samples: list[float], p: float) -> str:
    return f"{harness.percentile(samples, p) * 1000:.0f}" if samples else "-"


def render(off: Run, egt: Run) -> tuple[str, list[tuple[str, bool]]]:
    def ratio(a: float, b: float) -> str:
        return f"{b / a:.2f}x" if a > 0 else "-"

    rows = [
        [f"start + first cell, all {egt.n} ({AT_ONCE} at a time) (s)", f"{off.start_s:.1f}", f"{egt.start_s:.1f}", ratio(off.start_s, egt.start_s)],
        ["first cells whose output arrived", f"{off.cells_ok}/{off.n}", f"{egt.cells_ok}/{egt.n}", ""],
        ["kernels answering a second cell with their state", f"{off.working}/{off.n}", f"{egt.working}/{egt.n}", ""],
        ["GET /api/kernelspecs during starts p50 / p99 / max (ms)",
         f"{ms(off.probe_start, 50)} / {ms(off.probe_start, 99)} / {ms(off.probe_start, 100)}",
         f"{ms(egt.probe_start, 50)} / {ms(egt.probe_start, 99)} / {ms(egt.probe_start, 100)}", ""],
        [f"gateway CPU, {egt.n} idle kernels (% of a core)", f"{off.idle_cpu_pct:.1f}", f"{egt.idle_cpu_pct:.1f}", ratio(off.idle_cpu_pct, egt.idle_cpu_pct)],
        ["GET /api/kernelspecs p99, idle (ms)", ms(off.probe_idle, 99), ms(egt.probe_idle, 99), ""],
        [f"clients close all {egt.n} websockets at once (s)", f"{off.close_ws_s:.2f}", f"{egt.close_ws_s:.2f}", ""],
        ["GET /api/kernelspecs max, while they close (ms)", ms(off.probe_close, 100), ms(egt.probe_close, 100), ""],
        [f"delete all {egt.n} at once (s)", f"{off.delete_s:.2f}", f"{egt.delete_s:.2f}", ratio(off.delete_s, egt.delete_s)],
        ["GET /api/kernelspecs max, while deleting (ms)", ms(off.probe_delete, 100), ms(egt.probe_delete, 100), ""],
        ["gateway RSS per kernel (MB)", f"{off.rss_per_kernel_mb:.2f}", f"{egt.rss_per_kernel_mb:.2f}", ""],
        ["gateway threads per kernel", f"{off.threads_per_kernel:.2f}", f"{egt.threads_per_kernel:.2f}", ""],
        ["gateway fds per kernel", f"{off.fds_per_kernel:.2f}", f"{egt.fds_per_kernel:.2f}", ""],
        ["left on the host after deleting (processes)", off.left_on_host, egt.left_on_host, ""],
    ]  # fmt: skip
    off_max = max(off.probe_delete, default=0.0)
    egt_max = max(egt.probe_delete, default=0.0)
    checks = [
        ("every kernel works (second cell, state kept)", egt.working == egt.n and off.working == off.n),
        ("delete all within 1.3x of tunneling off (or +0.5 s)", egt.delete_s <= max(1.3 * off.delete_s, off.delete_s + 0.5)),
        ("kernelspecs while deleting <= tunneling off's max + 150 ms", egt_max <= off_max + 0.150),
        ("idle CPU within tunneling off's + 1 point of a core", egt.idle_cpu_pct <= off.idle_cpu_pct + 1.0),
        ("start + first cell within 1.1x", egt.start_s <= 1.1 * off.start_s),
        ("RSS per kernel <= tunneling off + 0.15 MB", egt.rss_per_kernel_mb <= off.rss_per_kernel_mb + 0.15),
        ("nothing left on the host", egt.left_on_host == 0 and off.left_on_host == 0),
    ]  # fmt: skip
    text = table(["N = %d, same host, one run" % egt.n, "tunneling off", "egtunnel", "ratio"], rows)
    text += "\n\n" + "\n".join(f"  [{'ok' if ok else 'MISSED'}] {name}" for name, ok in checks)
    return text, checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=100, help="kernels per run")
    p.add_argument("--idle", type=float, default=30.0, help="seconds all kernels sit idle")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--profile", metavar="DIR", help="record the idle window of each gateway with `perf record` into DIR")
    p.add_argument("--no-targets", action="store_true", help="exit 0 whenever the runs complete")
    args = p.parse_args(argv)
    with Lab(1, separate_cpus=True) as lab:
        log(f"tunneling off: {args.n} kernels")
        off = one_run(lab, "egt-notunnel", args.n, args.idle, args.profile)
        log(f"egtunnel: {args.n} kernels")
        egt = one_run(lab, "egt", args.n, args.idle, args.profile)
    text, checks = render(off, egt)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"off": asdict(off), "egtunnel": asdict(egt), "checks": dict(checks)}, f, indent=2)
    complete = egt.working == egt.n and off.working == off.n
    if not complete:
        return 1
    return 0 if args.no_targets or all(ok for _, ok in checks) else 1


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    sys.exit(main())
