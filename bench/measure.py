"""Measuring primitives for bench/run.py: CPU accounting from /proc, round-trip and one-way stream
clients, and the wait for an `ssh -L` listener. Kept apart from run.py so that the orchestration there
reads as a list of experiments."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import socket
import statistics
import subprocess
import time
from typing import Iterable, Optional, Sequence

import harness
from harness import echo_server

CLK_TCK = os.sysconf("SC_CLK_TCK")
SLOW_ROUND_TRIP = 0.010


# --- CPU accounting ----------------------------------------------------------------------------


def self_cpu() -> float:
    """CPU seconds of this whole process, every thread included (the tunnels run in our threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sched_sample(pids: Iterable[int], skip_tids: Iterable[int] = ()) -> dict[tuple[int, int], tuple[float, int]]:
    """(pid, tid) -> (CPU seconds, times scheduled) for every thread of pids, minus skip_tids.

    schedstat counts nanoseconds actually run, while utime/stime in /proc/<pid>/stat are sampled at
    the 100 Hz tick: an idle process waking for microseconds would mostly be credited zero there, or a
    whole 10 ms now and then. Its count of timeslices is the number of wake-ups, which is what idle
    cost really is made of.
    """
    skip = set(skip_tids)
    out = {}
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            if tid in skip:
                continue
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    fields = f.read().split()
                out[(pid, tid)] = (int(fields[0]) / 1e9, int(fields[2]))
            except FileNotFoundError:
                # No schedstat at all (kernel without CONFIG_SCHED_INFO) or the thread just ended.
                ticks = _stat_cpu(pid, tid)
                if ticks is not None:
                    out[(pid, tid)] = (ticks, 0)
            except OSError:
                continue
    return out


def sched_delta(before: dict, after: dict) -> tuple[float, int]:
    """(CPU seconds, wake-ups) between two samples, over the threads present in both."""
    keys = before.keys() & after.keys()
    return (sum(after[k][0] - before[k][0] for k in keys), sum(after[k][1] - before[k][1] for k in keys))


def _stat_cpu(pid: int, tid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may hold spaces or parentheses; the fields after the last ")" are positional.
    rest = data[data.rindex(b")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds, wall seconds) of the whole machine so far, from /proc/stat.

    Subtracting our own share from the machine's over a window tells how much other work was running,
    which is what makes a 2-core measurement trustworthy or not.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already counted in user time.
    busy = sum(fields[:8]) - idle
    return busy / CLK_TCK, time.monotonic()


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- round trips -------------------------------------------------------------------------------


class RoundTripper:
    """One open connection to an echo server that times fixed-size round trips.

    The connection stays open across blocks so that several paths can be sampled in alternation, and
    warm-up trips (channel open, first-packet costs) stay out of the samples.
    """

    def __init__(self, name: str, host: str, port: int, size: int, timeout: float = 10.0) -> None:
        self.name = name
        self.sock = harness.connect(host, port, timeout)
        self.sock.settimeout(timeout)
        self.payload = os.urandom(size)
        self.buf = bytearray(size)
        self.samples: list[float] = []

    def run(self, count: int, record: bool = True) -> None:
        s, payload, buf = self.sock, self.payload, self.buf
        view = memoryview(buf)
        clock = time.perf_counter
        out = self.samples if record else []
        for _ in range(count):
            t0 = clock()
            s.sendall(payload)
            harness.recv_exact_into(s, view, f"{self.name}: echo")
            out.append(clock() - t0)
            if buf != payload:
                raise AssertionError(f"{self.name}: echo returned different bytes")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def latency_summary(samples: Sequence[float]) -> dict:
    slow = [s for s in samples if s > SLOW_ROUND_TRIP]
    return {
        "count": len(samples),
        "p50_us": round(harness.percentile(samples, 50) * 1e6, 1),
        "p99_us": round(harness.percentile(samples, 99) * 1e6, 1),
        "p999_us": round(harness.percentile(samples, 99.9) * 1e6, 1),
        "max_us": round(max(samples) * 1e6, 1),
        "mean_us": round(statistics.fmean(samples) * 1e6, 1),
        "over_10ms": len(slow),
        "share_over_10ms": len(slow) / len(samples),
        "slowest_ms": [round(s * 1000, 1) for s in sorted(slow, reverse=True)[:10]],
    }


# --- one-way streams ---------------------------------------------------------------------------
# Unlike harness.sink_send/source_receive, the client hashes outside the timed part: with sha256 at
# ~1.7 GB/s per core, hashing inline would cap the direct path near the tunnels' speed and hide the
# difference being measured. The services still hash on their side (sink) or send the pattern (source).


_digests: dict[int, str] = {}


def pattern_digest(nbytes: int) -> str:
    if nbytes not in _digests:
        _digests[nbytes] = echo_server.pattern_digest(nbytes)
    return _digests[nbytes]


def send_to_sink(host: str, port: int, nbytes: int, timeout: float) -> harness.StreamResult:
    """Timed from the first byte sent until the sink has counted and hashed the last one."""
    expected = pattern_digest(nbytes)
    with harness.connect(host, port, timeout) as s:
        s.settimeout(timeout)
        start = time.perf_counter()
        for piece in echo_server.pattern_chunks(nbytes):
            s.sendall(piece)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            piece = s.recv(256)
            if not piece:
                break
            reply += piece
        seconds = time.perf_counter() - start
    count, digest = reply.decode().split()
    return harness.StreamResult(nbytes, expected, int(count), digest, seconds)


def receive_from_source(host: str, port: int, nbytes: int, timeout: float, into: bytearray) -> harness.StreamResult:
    """Timed from the request until EOF; the bytes land in a preallocated buffer hashed afterwards.

    into should be somewhat larger than nbytes, so that a source sending too much shows up as a wrong
    count instead of being cut off unnoticed.
    """
    view = memoryview(into)
    got = 0
    with harness.connect(host, port, timeout) as s:
        s.settimeout(timeout)
        start = time.perf_counter()
        s.sendall(f"{nbytes}\n".encode())
        while got < len(into):
            k = s.recv_into(view[got:])
            if k == 0:
                break
            got += k
        seconds = time.perf_counter() - start
    digest = hashlib.sha256(view[:got]).hexdigest()
    return harness.StreamResult(nbytes, pattern_digest(nbytes), got, digest, seconds)


# --- OpenSSH client processes -----------------------------------------------------------------


def owner_env() -> dict:
    # The owner mark lets a later run of the harness reap these clients if this one is SIGKILLed.
    env = dict(os.environ)
    env[harness.OWNER_ENV] = f"{os.getpid()}:0"
    return env


def start_ssh_forward(
    server: harness.SshServer, remote_host: str, remote_port: int, options: Sequence[str] = ()
) -> tuple[subprocess.Popen, int]:
    """Spawn `ssh -N -L 127.0.0.1:LP:RH:RP` without waiting; returns (process, LP)."""
    lp = harness.free_port()
    argv = server.ssh_argv(
        options=["-N", "-L", f"127.0.0.1:{lp}:{remote_host}:{remote_port}", "-o", "ExitOnForwardFailure=yes", *options]
    )
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=owner_env()
    )
    return proc, lp


def wait_listening(proc: subprocess.Popen, port: int, timeout: float, poll: float = 0.0005) -> float:
    """Seconds until port listens (read from /proc, without connecting); raises if ssh exits first."""
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    while not harness.is_listening(port):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise RuntimeError(f"ssh -L on port {port} exited with {proc.returncode}: {err}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"ssh -L on port {port} not listening after {timeout:g}s")
        time.sleep(poll)
    return time.perf_counter() - start


# --- sshd log ---------------------------------------------------------------------------------

_KEX_RE = re.compile(r"kex: client->server cipher: (\S+) MAC: (\S+)")


def negotiated_cipher(server: harness.SshServer, since: int) -> Optional[str]:
    """Cipher of the first connection the server logged after offset since (needs LogLevel DEBUG1+)."""
    m = _KEX_RE.search(server.log_text(since))
    if not m:
        return None
    return m.group(1) if m.group(2) == "<implicit>" else f"{m.group(1)}+{m.group(2)}"


def summary_ms(values: Sequence[float]) -> dict:
    return {
        "count": len(values),
        "median_ms": round(statistics.median(values) * 1000, 2),
        "min_ms": round(min(values) * 1000, 2),
        "max_ms": round(max(values) * 1000, 2),
    }
