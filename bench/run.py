#!/usr/bin/env python3
"""Benchmarks egtunnel against OpenSSH `ssh -N -L` (and against no tunnel) on one simulated remote host:
idle CPU of many forwards, 1 KiB round-trip latency, one-way throughput and time to open a forward.
Prints a table, writes JSON; bench/README.md explains every number. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402
import measure  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
# Run in this order: a shared connection lingers for a few seconds after its last forward, and
# here that happens while a section that does not care runs, instead of costing a wait.
SECTIONS = ("idle", "open", "latency", "throughput")
# sshd's DEBUG3 logs several lines per channel event, which costs the server time on the very paths
# being timed; DEBUG1 still records the negotiated cipher of every connection.
SSHD_LOG_LEVEL = "DEBUG1"
# The idle section opens 50 per-port connections, and 50 `ssh -L` processes, at once; raised limits
# keep the comparison about the data path rather than about the server's admission policy.
BENCH_SSHD_LIMITS = ("MaxStartups 1000", "MaxSessions 1000")
GCM = ["-c", "aes128-gcm@openssh.com"]


@dataclasses.dataclass(frozen=True)
class Settings:
    forwards: int
    idle_seconds: float
    settle_seconds: float
    round_trips: int
    block: int
    warmup: int
    message_size: int
    stream_bytes: int
    repeats: int
    opens: int
    deadline_seconds: int


FULL = Settings(
    forwards=50, idle_seconds=10.0, settle_seconds=2.0, round_trips=10_000, block=1_000, warmup=200,
    message_size=1024, stream_bytes=256 << 20, repeats=3, opens=10, deadline_seconds=900,
)  # fmt: skip
QUICK = Settings(
    forwards=4, idle_seconds=1.0, settle_seconds=0.2, round_trips=200, block=50, warmup=10,
    message_size=1024, stream_bytes=4 << 20, repeats=1, opens=2, deadline_seconds=180,
)  # fmt: skip


def log(msg: str) -> None:
    # Progress goes to stderr so that stdout carries only the report.
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def import_egtunnel(wait: float = 300.0):
    """Import the extension, waiting while a concurrent `maturin develop` replaces it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return importlib.import_module("egtunnel")
        except ImportError as e:
            if time.monotonic() >= deadline:
                raise
            log(f"import egtunnel failed ({e}); a build may be in progress, retrying")
            for name in [m for m in sys.modules if m == "egtunnel" or m.startswith("egtunnel.")]:
                del sys.modules[name]
            time.sleep(5)


# --- the remote host ---------------------------------------------------------------------------


class Lab:
    """sshd plus echo, sink and source services on a network-namespace host, or on loopback when
    namespaces are unavailable (then every path shares one kernel stack and the numbers say less)."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.kind = "netns"
        self.note = ""
        try:
            try:
                remote = self.stack.enter_context(harness.RemoteHost())
            except harness.NetnsUnavailable as e:
                self._start_on_loopback(str(e))
                return
            self.target = remote.address
            self.sshd = remote.ssh_server(log_level=SSHD_LOG_LEVEL, extra_config=BENCH_SSHD_LIMITS)
            self.echo = remote.echo_server()
            self.sink = remote.echo_server(mode="sink")
            self.source = remote.echo_server(mode="source")
        except BaseException:
            self.stack.close()
            raise

    def _start_on_loopback(self, reason: str) -> None:
        self.kind = "loopback"
        self.note = (
            f"no network namespace ({reason}): sshd and services run on 127.0.0.1, so tunnel and "
            "service share the loopback stack; numbers are not comparable with a netns run"
        )
        self.target = "127.0.0.1"
        self.sshd = self.stack.enter_context(harness.SshServer(log_level=SSHD_LOG_LEVEL, extra_config=BENCH_SSHD_LIMITS))
        self.echo = self.stack.enter_context(harness.EchoServer())
        self.sink = self.stack.enter_context(harness.EchoServer(mode="sink"))
        self.source = self.stack.enter_context(harness.EchoServer(mode="source"))

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "note": self.note,
            "sshd": f"{self.sshd.host}:{self.sshd.port}",
            "sshd_log_level": SSHD_LOG_LEVEL,
            "echo": self.echo.port,
            "sink": self.sink.port,
            "source": self.source.port,
        }

    def close(self) -> None:
        self.stack.close()


def wait_connections_closed(eg, lab: Lab, timeout: float = 15.0) -> None:
    """Wait out the linger of shared connections, which would otherwise see the server go away and
    log a reconnect attempt."""
    harness.wait_until(lambda: not [c for c in eg.status() if c["port"] == lab.sshd.port], timeout,
                     interval=0.1, what="egtunnel connections to close")  # fmt: skip


def open_forward(eg, lab: Lab, port: int, **kw):
    return eg.open_tunnel(**lab.sshd.connect_kwargs(), remote_host=lab.target, remote_port=port, **kw)


@contextlib.contextmanager
def ssh_forwards(lab: Lab, port: int, n: int, options: Sequence[str] = ()):
    """n `ssh -N -L` processes to port, started together, yielded once all listen."""
    procs: list = []
    try:
        for _ in range(n):
            procs.append(measure.start_ssh_forward(lab.sshd, lab.target, port, options))
        for proc, lp in procs:
            measure.wait_listening(proc, lp, timeout=30.0)
        yield procs
    finally:
        for proc, _ in procs:
            harness.stop_popen(proc)


def connect_through(stack: contextlib.ExitStack, port: int) -> None:
    """Open a client connection through a forward and prove it reaches the echo server, leaving it
    open: an idle forward in a gateway holds its kernel's ZMQ connections, not nothing."""
    s = stack.enter_context(harness.connect("127.0.0.1", port))
    s.settimeout(10.0)
    s.sendall(b"x")
    if s.recv(1) != b"x":
        raise RuntimeError(f"no echo through port {port}")


# --- sections ----------------------------------------------------------------------------------


def idle_window(st: Settings, server_pids: list[int], client_pids: Optional[list[int]]) -> dict:
    """CPU over one idle window: ours (client_pids None) or those processes', plus sshd's and the
    machine's, so that a busy neighbour shows up next to the number it may have disturbed.

    For ourselves the process total (getrusage) is the headline, since it is what a gateway would
    pay; the wake-ups leave out our main thread, which only sleeps and measures.
    """
    time.sleep(st.settle_seconds)
    own = client_pids is None
    pids = [os.getpid()] if own else client_pids
    skip = [os.getpid()] if own else []
    load = measure.loadavg()
    srv0 = measure.sched_sample(server_pids)
    cli0 = measure.sched_sample(pids, skip)
    self0 = measure.self_cpu()
    busy0, t0 = measure.machine_busy()
    time.sleep(st.idle_seconds)
    busy1, t1 = measure.machine_busy()
    self1 = measure.self_cpu()
    cli1 = measure.sched_sample(pids, skip)
    srv1 = measure.sched_sample(server_pids)
    wall = t1 - t0
    cli_cpu, cli_wakeups = measure.sched_delta(cli0, cli1)
    client = self1 - self0 if own else cli_cpu
    server, srv_wakeups = measure.sched_delta(srv0, srv1)
    machine = busy1 - busy0
    return {
        "seconds": round(wall, 3),
        "client_cpu_s": round(client, 6),
        "client_core_pct": round(100 * client / wall, 4),
        "client_wakeups": cli_wakeups,
        "sshd_cpu_s": round(server, 6),
        "sshd_core_pct": round(100 * server / wall, 4),
        "sshd_wakeups": srv_wakeups,
        "others_cores": round(max(0.0, machine - client - server) / wall, 3),
        "loadavg": load,
    }


def section_idle(eg, lab: Lab, st: Settings) -> dict:
    rows = []
    for mode in ("per-port", "shared"):
        log(f"idle: {st.forwards} egtunnel {mode} forwards, {st.idle_seconds:g} s")
        with contextlib.ExitStack() as stack:
            tunnels = [stack.enter_context(open_forward(eg, lab, lab.echo.port, mode=mode)) for _ in range(st.forwards)]
            for t in tunnels:
                connect_through(stack, t.local_port)
            threads = harness.thread_count()
            row = idle_window(st, lab.sshd.session_pids(), None)
            # Shared forwards all report their one connection's counter.
            counted = tunnels[:1] if mode == "shared" else tunnels
            keepalives = sum(t.stats()["keepalives_sent"] for t in counted)
        rows.append({"name": f"egtunnel {mode}", **row, "threads": threads,
                     "ssh_connections": st.forwards if mode == "per-port" else 1,
                     "keep_alive_interval": tunnels[0].keep_alive_interval, "keepalives_sent": keepalives})  # fmt: skip
    log(f"idle: {st.forwards} ssh -N -L processes, {st.idle_seconds:g} s")
    with contextlib.ExitStack() as stack:
        procs = stack.enter_context(ssh_forwards(lab, lab.echo.port, st.forwards))
        for _, lp in procs:
            connect_through(stack, lp)
        row = idle_window(st, lab.sshd.session_pids(), [p.pid for p, _ in procs])
    rows.append({"name": "ssh -N -L", **row, "processes": st.forwards, "ssh_connections": st.forwards})
    return {"forwards": st.forwards, "idle_seconds": st.idle_seconds, "rows": rows}


def section_latency(eg, lab: Lab, st: Settings) -> dict:
    log(f"latency: {st.round_trips} round trips of {st.message_size} B per path, in blocks of {st.block}")
    ciphers = {}
    with contextlib.ExitStack() as stack:
        since = lab.sshd.log_offset()
        tunnel = stack.enter_context(open_forward(eg, lab, lab.echo.port))
        ciphers["egtunnel"] = measure.negotiated_cipher(lab.sshd, since)
        since = lab.sshd.log_offset()
        ((_, ssh_port),) = stack.enter_context(ssh_forwards(lab, lab.echo.port, 1))
        ciphers["ssh -N -L"] = measure.negotiated_cipher(lab.sshd, since)
        paths = []
        for name, host, port in (("direct", lab.target, lab.echo.port),
                                 ("egtunnel", "127.0.0.1", tunnel.local_port),
                                 ("ssh -N -L", "127.0.0.1", ssh_port)):  # fmt: skip
            p = measure.RoundTripper(name, host, port, st.message_size)
            stack.callback(p.close)
            paths.append(p)
            p.run(st.warmup, record=False)
        # Alternating blocks spread a burst of background load over all paths instead of one.
        done = 0
        while done < st.round_trips:
            n = min(st.block, st.round_trips - done)
            for p in paths:
                p.run(n)
            done += n
        stats = tunnel.stats()
    rows = [{"name": p.name, **measure.latency_summary(p.samples)} for p in paths]
    by = {r["name"]: r for r in rows}
    return {
        "round_trips": st.round_trips,
        "message_size": st.message_size,
        "warmup": st.warmup,
        "ciphers": ciphers,
        "egtunnel_bytes": {"in": stats["bytes_in"], "out": stats["bytes_out"]},
        "rows": rows,
        "ratio_p50_egtunnel_vs_openssh": round(by["egtunnel"]["p50_us"] / by["ssh -N -L"]["p50_us"], 3),
        "ratio_p99_egtunnel_vs_openssh": round(by["egtunnel"]["p99_us"] / by["ssh -N -L"]["p99_us"], 3),
    }


def section_throughput(eg, lab: Lab, st: Settings) -> dict:
    n = st.stream_bytes
    timeout = max(60.0, n / 20e6)
    log(f"throughput: {n >> 20} MiB one way per path and direction, {st.repeats} run(s) each")
    measure.pattern_digest(n)
    buffer = bytearray(n + (64 << 10))
    rows = []
    ciphers = {}
    me = os.getpid()
    with contextlib.ExitStack() as stack:
        # name -> (host, port, tunnel pids, threads of those to leave out)
        paths: dict[str, dict[str, tuple[str, int, list[int], list[int]]]] = {}
        for direction, service in (("sink", lab.sink), ("source", lab.source)):
            since = lab.sshd.log_offset()
            t = stack.enter_context(open_forward(eg, lab, service.port))
            ciphers.setdefault("egtunnel", measure.negotiated_cipher(lab.sshd, since))
            since = lab.sshd.log_offset()
            ((default_proc, default_port),) = stack.enter_context(ssh_forwards(lab, service.port, 1))
            ciphers.setdefault("ssh -N -L", measure.negotiated_cipher(lab.sshd, since))
            since = lab.sshd.log_offset()
            ((gcm_proc, gcm_port),) = stack.enter_context(ssh_forwards(lab, service.port, 1, GCM))
            ciphers.setdefault("ssh -N -L -c aes128-gcm", measure.negotiated_cipher(lab.sshd, since))
            paths[direction] = {
                "direct": (lab.target, service.port, [], []),
                # Our main thread runs the client, so the tunnel is every other thread of ours.
                "egtunnel": ("127.0.0.1", t.local_port, [me], [me]),
                "ssh -N -L": ("127.0.0.1", default_port, [default_proc.pid], []),
                "ssh -N -L -c aes128-gcm": ("127.0.0.1", gcm_port, [gcm_proc.pid], []),
            }
        for direction, label in (("sink", "local -> remote"), ("source", "remote -> local")):
            runs: dict[str, list[tuple[harness.StreamResult, float, float]]] = {name: [] for name in paths[direction]}
            for _ in range(st.repeats):
                # Round-robin, as for latency: a noisy moment hurts one run of each path, not one path.
                for name, (host, port, pids, skip) in paths[direction].items():
                    server_pids = lab.sshd.session_pids()
                    tun0, srv0 = measure.sched_sample(pids, skip), measure.sched_sample(server_pids)
                    if direction == "sink":
                        r = measure.send_to_sink(host, port, n, timeout)
                    else:
                        r = measure.receive_from_source(host, port, n, timeout, buffer)
                    tun1, srv1 = measure.sched_sample(pids, skip), measure.sched_sample(server_pids)
                    runs[name].append((r, measure.sched_delta(tun0, tun1)[0], measure.sched_delta(srv0, srv1)[0]))
            for name, rs in runs.items():
                mid = sorted(rs, key=lambda x: x[0].bytes_per_second)[len(rs) // 2]
                rows.append({
                    "name": name,
                    "direction": label,
                    "gb_per_s": round(mid[0].bytes_per_second / 1e9, 3),
                    "runs_gb_per_s": [round(x[0].bytes_per_second / 1e9, 3) for x in rs],
                    "sha256_ok": all(x[0].ok for x in rs),
                    # Cores kept busy during the median run: near 1.0 means CPU-bound, well below
                    # means the path spent its time waiting.
                    "tunnel_cores": round(mid[1] / mid[0].seconds, 2),
                    "sshd_cores": round(mid[2] / mid[0].seconds, 2),
                    "tunnel_cpu_s_per_gb": round(mid[1] / (n / 1e9), 2),
                })  # fmt: skip
    ratios = {}
    for label in ("local -> remote", "remote -> local"):
        by = {r["name"]: r["gb_per_s"] for r in rows if r["direction"] == label}
        ratios[label] = {
            "egtunnel_vs_openssh": round(by["egtunnel"] / by["ssh -N -L"], 3),
            "egtunnel_vs_openssh_gcm": round(by["egtunnel"] / by["ssh -N -L -c aes128-gcm"], 3),
            "egtunnel_vs_direct": round(by["egtunnel"] / by["direct"], 3),
        }
    return {"bytes": n, "repeats": st.repeats, "ciphers": ciphers, "rows": rows, "ratios": ratios}


def section_open(eg, lab: Lab, st: Settings) -> dict:
    log(f"open: {st.opens} forwards opened one after another per kind")
    times: dict[str, list[float]] = {"egtunnel per-port": [], "egtunnel shared (connection up)": [], "ssh -N -L": []}
    for _ in range(st.opens):
        t0 = time.perf_counter()
        t = open_forward(eg, lab, lab.echo.port)
        times["egtunnel per-port"].append(time.perf_counter() - t0)
        t.terminate()
    with contextlib.ExitStack() as stack:
        # The first shared forward pays for the connection; later ones only bind a port.
        stack.enter_context(open_forward(eg, lab, lab.echo.port, mode="shared"))
        for _ in range(st.opens):
            t0 = time.perf_counter()
            stack.enter_context(open_forward(eg, lab, lab.echo.port, mode="shared"))
            times["egtunnel shared (connection up)"].append(time.perf_counter() - t0)
    for _ in range(st.opens):
        # Spawning the process is part of what a gateway pays for an ssh -L, so it is inside the clock.
        t0 = time.perf_counter()
        proc, lp = measure.start_ssh_forward(lab.sshd, lab.target, lab.echo.port)
        try:
            measure.wait_listening(proc, lp, timeout=30.0)
            times["ssh -N -L"].append(time.perf_counter() - t0)
        finally:
            harness.stop_popen(proc)
    rows = [{"name": name, **measure.summary_ms(v)} for name, v in times.items()]
    by = {r["name"]: r for r in rows}
    return {
        "rows": rows,
        "ratio_median_egtunnel_vs_openssh": round(by["egtunnel per-port"]["median_ms"] / by["ssh -N -L"]["median_ms"], 3),
    }


RUNNERS: dict[str, Callable] = {
    "idle": section_idle,
    "latency": section_latency,
    "throughput": section_throughput,
    "open": section_open,
}


# --- report ------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(res: dict) -> str:
    m = res["meta"]
    out = [
        f"egtunnel benchmark  {m['started']}  egtunnel {m['egtunnel_version']} ({m['git']}, extension built "
        f"{m['extension']['built']})  {m['openssh']}",
        f"host: {m['lab']['kind']} (sshd {m['lab']['sshd']}, LogLevel {m['lab']['sshd_log_level']}); "
        f"{m['cpus']} CPUs; load average at start {m['loadavg_start']}, at end {m['loadavg_end']}; "
        f"took {m['seconds']:.0f} s{'  [--quick]' if m['quick'] else ''}",
    ]
    if m["lab"]["note"]:
        out.append(f"NOTE: {m['lab']['note']}")
    s = res["sections"]
    if "idle" in s:
        d = s["idle"]
        out += ["", f"Idle CPU: {d['forwards']} forwards, each with one open idle connection, over {d['idle_seconds']:g} s "
                    "(% of one core; target for egtunnel < 1%)"]  # fmt: skip
        out.append(table(
            ["", "client %core", "CPU ms", "wake-ups", "sshd %core", "sshd wake-ups", "SSH conns", "others (cores)", "load avg"],
            [[r["name"], f"{r['client_core_pct']:.3f}", f"{1000 * r['client_cpu_s']:.2f}", r["client_wakeups"],
              f"{r['sshd_core_pct']:.3f}", r["sshd_wakeups"], r["ssh_connections"], f"{r['others_cores']:.2f}",
              r["loadavg"][0]] for r in d["rows"]],
        ))  # fmt: skip
    if "latency" in s:
        d = s["latency"]
        out += ["", f"Latency: {d['round_trips']} round trips of {d['message_size']} B per path to the remote echo server "
                    f"(after {d['warmup']} warm-up trips; microseconds)"]  # fmt: skip
        out.append(table(
            ["", "p50", "p99", "p99.9", "max", "> 10 ms", "share > 10 ms", "cipher"],
            [[r["name"], r["p50_us"], r["p99_us"], r["p999_us"], r["max_us"], r["over_10ms"],
              f"{100 * r['share_over_10ms']:.2f}%", d["ciphers"].get(r["name"], "-") or "?"] for r in d["rows"]],
        ))  # fmt: skip
        out.append(f"egtunnel / OpenSSH: p50 {d['ratio_p50_egtunnel_vs_openssh']:.2f}x (target <= 1.2x), "
                   f"p99 {d['ratio_p99_egtunnel_vs_openssh']:.2f}x; load avg {d['loadavg'][0]}")  # fmt: skip
    if "throughput" in s:
        d = s["throughput"]
        out += ["", f"Throughput: {d['bytes'] >> 20} MiB one way, median of {d['repeats']} run(s), GB/s (1e9 bytes/s)"]
        out.append(table(
            ["", "direction", "GB/s", "runs", "sha256", "tunnel cores", "sshd cores", "cipher"],
            [[r["name"], r["direction"], f"{r['gb_per_s']:.3f}", " ".join(f"{x:.3f}" for x in r["runs_gb_per_s"]),
              "ok" if r["sha256_ok"] else "MISMATCH", "-" if r["name"] == "direct" else f"{r['tunnel_cores']:.2f}",
              "-" if r["name"] == "direct" else f"{r['sshd_cores']:.2f}", d["ciphers"].get(r["name"], "-") or "?"]
             for r in d["rows"]],
        ))  # fmt: skip
        for label, ratio in d["ratios"].items():
            out.append(f"{label}: egtunnel = {ratio['egtunnel_vs_openssh']:.2f}x ssh -L, "
                       f"{ratio['egtunnel_vs_openssh_gcm']:.2f}x ssh -L aes128-gcm, {ratio['egtunnel_vs_direct']:.2f}x direct")  # fmt: skip
        out.append(f"load avg {d['loadavg'][0]}")
    if "open" in s:
        d = s["open"]
        out += ["", "Time to open a forward: open_tunnel() returning vs ssh -N -L listening (ms)"]
        out.append(table(
            ["", "median", "min", "max", "n"],
            [[r["name"], r["median_ms"], r["min_ms"], r["max_ms"], r["count"]] for r in d["rows"]],
        ))  # fmt: skip
        out.append(f"egtunnel per-port / ssh -N -L (median): {d['ratio_median_egtunnel_vs_openssh']:.2f}x; load avg {d['loadavg'][0]}")
    targets = target_checks(s)
    if targets:
        out += ["", "Targets:"] + [f"  {'met' if ok else 'MISSED':<6}  {text}" for text, ok in targets]
    if res.get("errors"):
        out += ["", "ERRORS:"] + [f"  {e}" for e in res["errors"]]
    return "\n".join(out)


def target_checks(s: dict) -> list[tuple[str, bool]]:
    """The acceptance targets egtunnel is held to, each with whether this run met it."""
    out = []
    if "idle" in s:
        for r in s["idle"]["rows"]:
            if r["name"].startswith("egtunnel"):
                out.append((f"{r['name']}: {s['idle']['forwards']} idle forwards use {r['client_core_pct']:.3f}% "
                            "of a core (< 1%)", r["client_core_pct"] < 1.0))  # fmt: skip
    if "latency" in s:
        d = s["latency"]
        eg = next(r for r in d["rows"] if r["name"] == "egtunnel")
        out.append((f"latency p50 {d['ratio_p50_egtunnel_vs_openssh']:.2f}x OpenSSH (<= 1.2x)",
                    d["ratio_p50_egtunnel_vs_openssh"] <= 1.2))  # fmt: skip
        out.append((f"{eg['over_10ms']} of {eg['count']} round trips over 10 ms (0)", eg["over_10ms"] == 0))
    return out


# --- main --------------------------------------------------------------------------------------


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{'+dirty' if dirty else ''}" if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def extension_build(eg) -> dict:
    # The extension is rebuilt in place; its mtime tells which build a result belongs to.
    path = Path(eg._native.__file__)
    built = datetime.datetime.fromtimestamp(path.stat().st_mtime).astimezone().isoformat(timespec="seconds")
    return {"path": str(path), "built": built}


def openssh_version() -> str:
    try:
        return subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10).stderr.strip().split(",")[0]
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sha_errors(res: dict) -> list[str]:
    rows = res["sections"].get("throughput", {}).get("rows", [])
    return [f"sha256 mismatch: {r['name']} {r['direction']}" for r in rows if not r["sha256_ok"]]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and counts, 1 s idle: checks that everything runs")
    p.add_argument("--json", metavar="PATH", type=Path,
                   help="write results here (default bench/results/latest.json, or quick.json with --quick)")  # fmt: skip
    p.add_argument("--only", metavar="NAME", action="append", choices=SECTIONS,
                   help=f"run only this section (repeatable): {', '.join(SECTIONS)}")  # fmt: skip
    return p.parse_args(argv)


class Deadline(BaseException):
    """Not an Exception, so that the per-section error handling lets it end the whole run."""


def _on_alarm(signum, frame) -> None:
    raise Deadline("benchmark exceeded its time limit")


def _on_term(signum, frame) -> None:
    # Unwinds through every context manager, so forwards, ssh processes and the namespace go away.
    raise SystemExit(128 + signum)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    st = QUICK if args.quick else FULL
    sections = [s for s in SECTIONS if not args.only or s in args.only]
    json_path = args.json or RESULTS_DIR / ("quick.json" if args.quick else "latest.json")
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(st.deadline_seconds)

    eg = import_egtunnel()
    reason = harness.sshd_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    start = time.monotonic()
    res: dict = {
        "meta": {
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "quick": args.quick,
            "settings": dataclasses.asdict(st),
            "egtunnel_version": getattr(eg, "__version__", None) or _dist_version(),
            "git": git_describe(),
            "extension": extension_build(eg),
            "openssh": openssh_version(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "loadavg_start": measure.loadavg(),
        },
        "sections": {},
        "errors": [],
    }
    status = 0
    try:
        log("starting the remote host")
        lab = Lab()
        try:
            res["meta"]["lab"] = lab.describe()
            if lab.note:
                log(f"NOTE: {lab.note}")
            for name in sections:
                load = measure.loadavg()
                t0 = time.monotonic()
                try:
                    res["sections"][name] = RUNNERS[name](eg, lab, st)
                except Exception as e:
                    # One broken section should not cost the numbers of the others.
                    log(f"{name} failed: {type(e).__name__}: {e}")
                    res["errors"].append(f"{name}: {type(e).__name__}: {e}")
                    continue
                res["sections"][name]["loadavg"] = load
                res["sections"][name]["seconds"] = round(time.monotonic() - t0, 1)
            wait_connections_closed(eg, lab)
        finally:
            log("cleaning up")
            lab.close()
    except (Exception, Deadline) as e:
        res["errors"].append(f"{type(e).__name__}: {e}")
        status = 1
    finally:
        signal.alarm(0)
    res["errors"] += sha_errors(res)
    if res["errors"]:
        status = 1
    res["meta"]["loadavg_end"] = measure.loadavg()
    res["meta"]["seconds"] = round(time.monotonic() - start, 1)
    res["meta"].setdefault("lab", {"kind": "none", "note": "remote host did not start", "sshd": "-", "sshd_log_level": "-"})
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(json_path)
    print(render(res))
    print(f"\nresults: {json_path}")
    return status


def _dist_version() -> str:
    try:
        from importlib.metadata import version

        return version("egtunnel")
    except Exception:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
