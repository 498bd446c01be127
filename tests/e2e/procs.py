"""Read-only views of processes, sockets and namespaces, taken from /proc, `ip` and `ss`.

The end-to-end tests judge the gateway and the remote hosts from the outside, the way an operator
would: which processes exist, what listens, how many TCP connections reach an sshd.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Iterable, Optional


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
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = proc(int(name))
            if p is not None:
                out.append(p)
    return out


def descendants(pid: int) -> list[Proc]:
    procs = all_procs()
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    out: list[Proc] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child.pid)
    return out


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


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def netns_procs(netns: str) -> list[Proc]:
    """Processes whose network namespace is `netns` (what runs "on" that remote host)."""
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10)
    procs = []
    for word in out.stdout.split():
        p = proc(int(word))
        if p is not None:
            procs.append(p)
    return procs


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


def ssh_children(pid: int) -> list[Proc]:
    """`ssh` client processes below `pid`: EG's own tunnel form; egtunnel must leave none."""
    return [p for p in descendants(pid) if p.comm == "ssh"]
