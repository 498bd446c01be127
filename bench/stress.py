#!/usr/bin/env python3
"""egtunnel's stress run: one shared SSH connection to a stock sshd carrying 200 forwards and remote
commands at once, on a machine whose cores are kept busy, with OpenSSH's ControlMaster as the
reference for command latency in the same run.

What runs at the same time, until the operation budget is spent:
  - one worker per forward (200 by default) doing echo operations: random bursts of 1 B to 4 MiB
    (log-uniform), each checked byte for byte, with random pauses; the client ends each operation by
    a half-close (the server then closes), an abrupt close, or, on the forwards to a `source` service,
    the server sends a random amount and closes first;
  - 8 workers running remote commands through egtunnel (up to 8 at once on the same connection) and
    8 running the same commands through one OpenSSH ControlMaster connection: random durations of
    0 to 300 ms, output on stdout only, stderr only or none, exit statuses 0/1/3/42, and some that
    start a background child the way Enterprise Gateway's launch does (`nohup ... & echo $!`);
  - two busy loops (`while :; do :; done`), one per core.

It holds when every byte comes back intact, every command is answered with its output and exit status,
no operation ends in a timeout, and the connection never went idle with unread packets
(EGTUNNEL_CHECK_SETTLED=1 counts that, `unsettled_sleeps` in status()). With --max-p99-ratio, egtunnel's
command latency p99 must also be within that factor of OpenSSH's.

    .venv/bin/python bench/stress.py                  # 2,000 operations
    .venv/bin/python bench/stress.py --ops 20000      # the soak size (make soak)
    .venv/bin/python bench/stress.py --json out.json

Exit status 0 when it held, 1 otherwise, 2 when sshd or ssh is missing. The sshd keeps OpenSSH's
default limits (MaxSessions 10, MaxStartups 10:30:100); only its log level is lowered to INFO, since
DEBUG3 logs every packet of every channel, and --rekey-limit, when given, sets its RekeyLimit.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# Read once, at the first connection: set before egtunnel opens anything.
os.environ["EGTUNNEL_CHECK_SETTLED"] = "1"
# Everything on one SSH connection, which is what this run stresses: no lanes (see README.md).
os.environ["EG_SSH_MAX_LANES"] = "1"

import harness  # noqa: E402
from harness import echo_server  # noqa: E402

import egtunnel  # noqa: E402

OP_TIMEOUT = 30.0
MAX_BURST = 4 << 20
EXIT_CODES = (0, 0, 0, 1, 3, 42)
COMMAND_KINDS = ("stdout", "stderr", "none", "background")
# Bursts are random slices of one random block: as random as fresh bytes at the same offsets, without
# spending the loaded cores on generating them.
NOISE = os.urandom(2 * MAX_BURST)
CHANNELS = ("SHELL", "IOPUB", "STDIN", "HB", "CONTROL", "EG_COMM")


def log(msg: str) -> None:
    print(f"[stress {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(samples: list[float], p: float) -> float:
    return harness.percentile(samples, p) if samples else float("nan")


@dataclass
class Command:
    index: int
    kind: str
    seconds: float
    exit_code: int

    def text(self) -> str:
        pause = f"sleep {self.seconds:.3f}"
        if self.kind == "stdout":
            body = f"{pause}; printf 'out-{self.index}\\n'"
        elif self.kind == "stderr":
            body = f"{pause}; printf 'err-{self.index}\\n' >&2"
        elif self.kind == "background":
            body = f"nohup sleep 0.5 >/dev/null 2>&1 & echo $!; {pause}"
        else:
            body = pause
        return f"{body}; exit {self.exit_code}"

    def problem(self, status: Optional[int], out: bytes, err: bytes) -> Optional[str]:
        """What is wrong with a result, or None. Only the command's own lines are compared: the remote
        user's shell start-up files may print to either stream before the command runs."""
        if status != self.exit_code:
            return f"exit status {status!r}, expected {self.exit_code}"
        outs = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("out-") or ln.isdigit()]
        errs = [ln for ln in err.decode(errors="replace").splitlines() if ln.startswith("err-")]
        want_out = {"stdout": [f"out-{self.index}"], "background": None}.get(self.kind, [])
        want_err = [f"err-{self.index}"] if self.kind == "stderr" else []
        if want_out is None:
            if len(outs) != 1 or not outs[0].isdigit():
                return f"stdout {out!r}, expected a pid"
        elif outs != want_out:
            return f"stdout {out!r}, expected {want_out!r}"
        if errs != want_err:
            return f"stderr {err!r}, expected {want_err!r}"
        return None


@dataclass
class Results:
    echo_ops: int = 0
    source_ops: int = 0
    bytes_checked: int = 0
    burst_seconds: list[float] = field(default_factory=list)
    small_burst_seconds: list[float] = field(default_factory=list)
    closes: dict[str, int] = field(default_factory=lambda: {"half": 0, "abrupt": 0, "remote": 0})
    egtunnel_commands: list[float] = field(default_factory=list)
    openssh_commands: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    timeouts: int = 0


class Budget:
    def __init__(self, total: int) -> None:
        self.left = total

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


async def echo_worker(rng: random.Random, port: int, budget: Budget, res: Results) -> None:
    while budget.take():
        try:
            await asyncio.wait_for(echo_op(rng, port, res), OP_TIMEOUT)
        except asyncio.TimeoutError:
            res.timeouts += 1
            res.failures.append(f"echo operation on 127.0.0.1:{port} timed out after {OP_TIMEOUT} s")
        except Exception as e:  # noqa: BLE001 - every failure is a finding of the run
            res.failures.append(f"echo operation on 127.0.0.1:{port}: {type(e).__name__}: {e}")
        await asyncio.sleep(rng.uniform(0, 0.05))


async def echo_op(rng: random.Random, port: int, res: Results) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(rng.randint(1, 3)):
            n = int(math.exp(rng.uniform(0, math.log(MAX_BURST))))
            offset = rng.randrange(len(NOISE) - n + 1)
            data = NOISE[offset : offset + n]
            start = time.perf_counter()
            writer.write(data)
            got, _ = await asyncio.gather(reader.readexactly(n), writer.drain())
            took = time.perf_counter() - start
            if got != data:
                raise AssertionError(f"{n}-byte burst came back altered")
            res.bytes_checked += n
            res.burst_seconds.append(took)
            if n <= 64 << 10:
                res.small_burst_seconds.append(took)
            await asyncio.sleep(rng.uniform(0, 0.02))
        if rng.random() < 0.5:
            writer.write_eof()
            rest = await reader.read()
            if rest:
                raise AssertionError(f"{len(rest)} unexpected bytes after the half-close")
            res.closes["half"] += 1
        else:
            res.closes["abrupt"] += 1
        res.echo_ops += 1
    finally:
        writer.close()


async def source_worker(rng: random.Random, port: int, budget: Budget, res: Results) -> None:
    while budget.take():
        n = int(math.exp(rng.uniform(0, math.log(MAX_BURST))))
        try:
            await asyncio.wait_for(source_op(port, n, res), OP_TIMEOUT)
        except asyncio.TimeoutError:
            res.timeouts += 1
            res.failures.append(f"source operation on 127.0.0.1:{port} timed out after {OP_TIMEOUT} s")
        except Exception as e:  # noqa: BLE001
            res.failures.append(f"source operation on 127.0.0.1:{port}: {type(e).__name__}: {e}")
        await asyncio.sleep(rng.uniform(0, 0.05))


async def source_op(port: int, n: int, res: Results) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{n}\n".encode())
        got = await reader.read(-1)  # the server closes first, after n bytes
        want = hashlib.sha256()
        for piece in echo_server.pattern_chunks(n):
            want.update(piece)
        if len(got) != n or hashlib.sha256(got).hexdigest() != want.hexdigest():
            raise AssertionError(f"source sent {n} bytes, {len(got)} arrived (or altered)")
        res.bytes_checked += n
        res.closes["remote"] += 1
        res.source_ops += 1
    finally:
        writer.close()


async def command_worker(
    commands: asyncio.Queue, target: egtunnel.SshTarget, ssh_argv: list[str], res: Results, which: str
) -> None:
    while True:
        try:
            cmd: Command = commands.get_nowait()
        except asyncio.QueueEmpty:
            return
        start = time.perf_counter()
        try:
            if which == "egtunnel":
                r = await asyncio.wait_for(target.exec_async(cmd.text(), timeout=OP_TIMEOUT), OP_TIMEOUT + 5)
                status, out, err = r.exit_status, r.stdout, r.stderr
            else:
                proc = await asyncio.create_subprocess_exec(
                    *ssh_argv, cmd.text(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
                out, err = await asyncio.wait_for(proc.communicate(), OP_TIMEOUT)
                status = proc.returncode
        except (asyncio.TimeoutError, egtunnel.TunnelTimeout) as e:
            res.timeouts += 1
            res.failures.append(f"{which} command {cmd.index} timed out: {e}")
            continue
        except Exception as e:  # noqa: BLE001
            res.failures.append(f"{which} command {cmd.index}: {type(e).__name__}: {e}")
            continue
        took = time.perf_counter() - start
        (res.egtunnel_commands if which == "egtunnel" else res.openssh_commands).append(took)
        problem = cmd.problem(status, out, err)
        if problem:
            res.failures.append(f"{which} command {cmd.index} ({cmd.kind}): {problem}")


def openssh_argv(server: harness.SshServer, control: Path) -> list[str]:
    return [
        "ssh", "-F", "/dev/null", "-p", str(server.port), "-i", str(server.identity_file),
        "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
        "-o", "ControlMaster=auto", "-o", f"ControlPath={control}",
        # Ends by itself 30 s after its last client, should this run be killed before it says "exit".
        "-o", "ControlPersist=30",
        f"{server.user}@{server.host}",
    ]  # fmt: skip


async def run(args: argparse.Namespace, server: harness.SshServer, echo_port_host: str, echo_port: int,
              source_port: int) -> Results:  # fmt: skip
    rng = random.Random(args.seed)
    res = Results()
    kw = server.connect_kwargs()
    target = egtunnel.SshTarget(kw.pop("host"), **kw)
    n_source = max(1, args.forwards // 4)
    # Forwards come in kernels of six channels, as Enterprise Gateway opens them.
    ports = [source_port if i < n_source else echo_port for i in range(args.forwards)]
    tunnels = []
    for k in range(0, len(ports), len(CHANNELS)):
        specs = [(ch, echo_port_host, p) for ch, p in zip(CHANNELS, ports[k : k + len(CHANNELS)])]
        tunnels += await target.open_forwards_async(specs, mode="shared", kernel_id=f"stress-{k}", verify=True)
    log(f"{len(tunnels)} forwards open on one connection ({n_source} to the source service)")
    control = Path(tempfile.mkdtemp(prefix="egt-stress-")) / "ctl"
    argv = openssh_argv(server, control)
    warm = subprocess.run([*argv, "true"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    if warm.returncode != 0:
        raise RuntimeError(f"OpenSSH ControlMaster did not start: {warm.stderr.strip()}")
    n_commands = args.ops // 2
    commands = [Command(i, rng.choice(COMMAND_KINDS), rng.uniform(0, 0.3), rng.choice(EXIT_CODES))
                for i in range(n_commands)]  # fmt: skip
    queues = {w: asyncio.Queue() for w in ("egtunnel", "openssh")}
    for q in queues.values():
        for c in commands:
            q.put_nowait(c)
    budget = Budget(args.ops - n_commands)
    busy = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(args.busy)]
    started = time.monotonic()
    try:
        workers = [
            *(echo_worker(random.Random(rng.random()), t.local_port, budget, res) for t in tunnels[n_source:]),
            *(source_worker(random.Random(rng.random()), t.local_port, budget, res) for t in tunnels[:n_source]),
        ]
        # Started in random order, so that a small budget still reaches both kinds of forward.
        rng.shuffle(workers)
        commanders = [command_worker(queues[w], target, argv, res, w) for w in ("egtunnel", "openssh") for _ in range(8)]
        await asyncio.gather(*workers, *commanders)
    finally:
        for p in busy:
            p.kill()
            p.wait()
        subprocess.run([*argv[:-1], "-O", "exit", argv[-1]], capture_output=True, timeout=10)
        for t in tunnels:
            t.terminate()
    res.__dict__["seconds"] = time.monotonic() - started
    return res


def summary(res: Results, unsettled: int, max_ratio: Optional[float]) -> dict:
    eg, os_ = res.egtunnel_commands, res.openssh_commands
    p99_ratio = percentile(eg, 99) / percentile(os_, 99) if eg and os_ else float("nan")
    out = {
        "seconds": round(res.__dict__.get("seconds", 0.0), 1),
        "echo_operations": res.echo_ops,
        "source_operations": res.source_ops,
        "bytes_checked": res.bytes_checked,
        "closes": res.closes,
        "commands": {"egtunnel": len(eg), "openssh": len(os_)},
        "command_ms": {
            name: {"p50": round(percentile(s, 50) * 1e3, 1), "p99": round(percentile(s, 99) * 1e3, 1),
                   "max": round(max(s, default=float("nan")) * 1e3, 1)}
            for name, s in (("egtunnel", eg), ("openssh", os_))
        },  # fmt: skip
        "command_p99_ratio": round(p99_ratio, 2),
        "echo_burst_ms": {"small_p99": round(percentile(res.small_burst_seconds, 99) * 1e3, 1),
                          "small_max": round(max(res.small_burst_seconds, default=float("nan")) * 1e3, 1),
                          "all_p99": round(percentile(res.burst_seconds, 99) * 1e3, 1),
                          "all_max": round(max(res.burst_seconds, default=float("nan")) * 1e3, 1)},  # fmt: skip
        "timeouts": res.timeouts,
        "unsettled_sleeps": unsettled,
        "failures": res.failures[:20],
        "failure_count": len(res.failures),
    }
    held = not res.failures and res.timeouts == 0 and unsettled == 0
    if max_ratio is not None and not p99_ratio <= max_ratio:
        held = False
        out["failures"].append(f"egtunnel's command p99 is {p99_ratio:.2f}x OpenSSH's (limit {max_ratio}x)")
    out["held"] = held
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=2000, help="operations in all: half commands, half echo/source")
    parser.add_argument("--forwards", type=int, default=200)
    parser.add_argument("--busy", type=int, default=2, help="busy loops kept running (one per core)")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--max-p99-ratio", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--loopback", action="store_true", help="no network namespace: sshd on 127.0.0.1")
    parser.add_argument("--rekey-limit", default=None, metavar="SIZE",
                        help="sshd's RekeyLimit (e.g. 32M): key re-exchanges in mid-traffic every SIZE bytes, "
                             "rather than every gigabyte or so")
    args = parser.parse_args()
    if harness.sshd_unavailable_reason() or not shutil.which("ssh"):
        print(f"stress: cannot run: {harness.sshd_unavailable_reason() or 'no ssh client'}", file=sys.stderr)
        return 2
    log(f"seed {args.seed}, {args.ops} operations, {args.forwards} forwards, {args.busy} busy loops")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    remote: Optional[harness.RemoteHost] = None
    # Only the run that asks for it departs from a stock server: a small RekeyLimit makes the key
    # re-exchanges that a long run meets once per gigabyte happen often enough to be tested.
    extra = [f"RekeyLimit {args.rekey_limit}"] if args.rekey_limit else []
    try:
        if args.loopback or harness.netns_unavailable_reason():
            server = harness.SshServer(log_level="INFO", extra_config=extra).start()
            echo = harness.EchoServer().start()
            source = harness.EchoServer(mode="source").start()
            svc_host = "127.0.0.1"
        else:
            remote = harness.RemoteHost().start()
            server = remote.ssh_server(log_level="INFO", extra_config=extra)
            echo = remote.echo_server()
            source = remote.echo_server(mode="source")
            svc_host = remote.address
        res = asyncio.run(run(args, server, svc_host, echo.port, source.port))
        unsettled = sum(int(c.get("unsettled_sleeps", 0)) for c in egtunnel.status())
        out = summary(res, unsettled, args.max_p99_ratio)
    finally:
        if remote is not None:
            remote.close()
        pass  # the loopback servers are closed at exit (the harness registers them)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if out["held"] else 1


if __name__ == "__main__":
    sys.exit(main())
