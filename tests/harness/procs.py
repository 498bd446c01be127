"""Processes, seen through /proc, `ip` and `ss`, and stopped: every process helper of the harness.

Two views of the process tree: bare pids (cheap: only /proc/<pid>/stat is read), which the servers use
to stop what they started, and `Proc` records (with command line and start time), with which the
end-to-end tests judge the gateway and the remote hosts from the outside, the way an operator would:
which processes exist, what listens, how many TCP connections reach an sshd.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

# How long a process gets to go after it was told to (terminate, then kill).
STOP_TIMEOUT = 5.0


def run(argv: Sequence[str], timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
    """A command's text output; with check, its failure raises with its stderr in the message."""
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


# ----------------------------------------------------------------------------------------------------
# pids


def _stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, ppid) of pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces and parentheses; the fields after the last ")" are fixed.
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[1])


def alive(pid: int) -> bool:
    """Whether pid exists and is neither a zombie nor dead."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendant_pids(pid: int) -> list[int]:
    """All live descendants of pid (children first), found through /proc."""
    children: dict[int, list[int]] = {}
    for p in all_pids():
        st = _stat(p)
        if st is not None and st[0] not in ("Z", "X"):
            children.setdefault(st[1], []).append(p)
    out: list[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# ----------------------------------------------------------------------------------------------------
# Proc records


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    comm: str
    cmdline: str
    start: int  # clock ticks since boot: with pid, identifies a process across pid reuse


def proc(pid: int) -> Optional[Proc]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may hold spaces and parentheses; the fields after the last ')' are fixed.
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None  # a zombie holds no resources worth counting and cannot be signalled
    return Proc(pid=pid, ppid=int(fields[1]), comm=comm, cmdline=cmdline, start=int(fields[19]))


def all_procs() -> list[Proc]:
    out = []
    for pid in all_pids():
        p = proc(pid)
        if p is not None:
            out.append(p)
    return out


def descendants(pid: int) -> list[Proc]:
    """descendant_pids(pid) as Proc records (children first)."""
    return [p for p in map(proc, descendant_pids(pid)) if p is not None]


def still_same(p: Proc) -> bool:
    now = proc(p.pid)
    return now is not None and now.start == p.start


def kill_procs(procs: Iterable[Proc], sig: int = 9) -> None:
    for p in procs:
        if still_same(p):
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass


def netns_procs(netns: str) -> list[Proc]:
    """Processes whose network namespace is `netns` (what runs "on" that remote host)."""
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10)
    procs = []
    for word in out.stdout.split():
        p = proc(int(word))
        if p is not None:
            procs.append(p)
    return procs


def ssh_children(pid: int) -> list[Proc]:
    """`ssh` client processes below `pid`: EG's own tunnel form; egtunnel must leave none."""
    return [p for p in descendants(pid) if p.comm == "ssh"]


# ----------------------------------------------------------------------------------------------------
# Sockets, as `ss` lists them


def _ss(args: list[str], netns: Optional[str]) -> list[str]:
    cmd = ["ss", "-H", "-n", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def listening_ports(netns: Optional[str] = None, pid: Optional[int] = None) -> set[int]:
    """TCP ports in LISTEN state, in a namespace, optionally only those owned by `pid`."""
    lines = _ss(["-l", "-t", "-p"], netns)
    ports = set()
    for line in lines:
        fields = line.split()
        if pid is not None and f"pid={pid}," not in line:
            continue
        ports.add(_port_of(fields[3]))
    return ports


def tcp_connections(dst_ip: str, dst_port: int, netns: Optional[str] = None) -> list[str]:
    """Established TCP connections to dst_ip:dst_port seen from a namespace (root one by default)."""
    return _ss(["-t", "state", "established", "dst", f"{dst_ip}:{dst_port}"], netns)


# ----------------------------------------------------------------------------------------------------
# Stopping


def protected_pids() -> set[int]:
    # Never signal ourselves or an ancestor, even if one inherited a stale mark.
    out = set()
    p = os.getpid()
    while p > 1:
        out.add(p)
        st = _stat(p)
        if st is None:
            break
        p = st[1]
    return out


def signal_all(pids: Iterable[int], sig: int) -> None:
    """Send sig to each of pids that still exists, never to this process or one of its ancestors."""
    protected = protected_pids()
    for p in pids:
        if p in protected:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def kill_and_wait(pids: Sequence[int], timeout: float = STOP_TIMEOUT) -> None:
    """SIGKILL pids (stopped ones included) and wait until they are gone or zombies."""
    pids = [p for p in pids if p not in protected_pids()]
    signal_all(pids, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def stop_popen(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """terminate(), then kill() if it lingers; closes its pipes."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=timeout / 2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout / 2)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
