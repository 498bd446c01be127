"""Network namespaces as the harness uses them: whether they can be made here, their names, the lock
that serialises their set-up between test processes, and the removal of what a crashed run left.

RemoteHost (remote_host.py) builds a "remote machine" from one of them. Names carry the creating
pid (egt<pid>n<serial> for a namespace, egt<pid>h<serial> and egt<pid>p<serial> for the two ends of
its veth pair), so a namespace whose creator is gone is known to be stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from .procs import alive, kill_and_wait, run


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no iproute2, or no CAP_SYS_ADMIN)."""


_netns_reason: Optional[tuple[Optional[str]]] = None
_NAME_RE = re.compile(r"^egt(\d+)([nhp])(\d+)$")


def names(serial: int) -> tuple[str, str, str]:
    """This process's namespace, host-side and namespace-side interface names for serial."""
    pid = os.getpid()
    return f"egt{pid}n{serial}", f"egt{pid}h{serial}", f"egt{pid}p{serial}"


def exec_prefix(netns: Optional[str]) -> list[str]:
    """What runs the argv that follows inside netns (nothing for None: in our own namespace)."""
    return ["ip", "netns", "exec", netns] if netns else []


def netns_unavailable_reason() -> Optional[str]:
    """Why RemoteHost cannot work here, or None. Probes once per process by creating a namespace."""
    global _netns_reason
    if _netns_reason is None:
        _netns_reason = (_probe_netns(),)
    return _netns_reason[0]


def _probe_netns() -> Optional[str]:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not shutil.which("ip"):
        return "the ip command is not installed (apt-get install iproute2)"
    name = f"egt{os.getpid()}probe"
    res = run(["ip", "netns", "add", name], check=False)
    if res.returncode != 0:
        return f"ip netns add failed: {res.stderr.strip()}"
    run(["ip", "netns", "del", name], check=False)
    return None


@contextlib.contextmanager
def lock() -> Iterator[None]:
    # Serialises subnet choice and stale cleanup between concurrent test processes.
    path = Path(tempfile.gettempdir()) / "egtunnel-netns.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def netns_names() -> list[str]:
    res = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def link_names() -> list[str]:
    res = run(["ip", "-o", "link", "show"], check=False)
    # "7: egt123h1@if6: <...>" -> egt123h1
    return [line.split(":")[1].strip().split("@")[0] for line in res.stdout.splitlines() if ":" in line]


def destroy(name: str, host_ifname: Optional[str]) -> None:
    """Kill everything in namespace name, then delete it and (if given) its veth pair."""
    res = run(["ip", "netns", "pids", name], check=False)
    kill_and_wait([int(p) for p in res.stdout.split() if p.isdigit()])
    if host_ifname and host_ifname in link_names():
        # Deleting one end deletes both, at once; a dying namespace would only do it later.
        run(["ip", "link", "del", host_ifname], check=False)
    run(["ip", "netns", "del", name], check=False)


def remove_stale() -> None:
    """Destroy the namespaces and veth ends whose creating process is gone (call under lock())."""
    for name in netns_names():
        m = _NAME_RE.match(name)
        if m and m.group(2) == "n" and not alive(int(m.group(1))):
            destroy(name, f"egt{m.group(1)}h{m.group(3)}")
    for link in link_names():
        m = _NAME_RE.match(link)
        if m and m.group(2) == "h" and not alive(int(m.group(1))):
            run(["ip", "link", "del", link], check=False)
