"""TCP ports: picking a free one, and telling whether one listens, by connecting or without connecting.

Looking without connecting (/proc/<pid>/net/tcp) matters where a connection would itself be an event
under test: through an `ssh -L` forward, a connect opens an SSH channel.
"""

from __future__ import annotations

import socket
from typing import Optional

from .waits import START_TIMEOUT, wait_until


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on host a moment ago (callers that bind later retry on a race)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = START_TIMEOUT) -> None:
    """Wait until host:port accepts a TCP connection (each probe is a real connect and close)."""
    wait_until(lambda: port_accepts(host, port, timeout=0.5), timeout, what=f"{host}:{port} to accept")


def _proc_net_tcp_listening(port: int, pid: str = "self") -> bool:
    # /proc/<pid>/net/tcp shows the sockets of that process's network namespace.
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except FileNotFoundError:
            continue
    return False


def is_listening(port: int, *, in_netns_of: Optional[int] = None) -> bool:
    """Whether some socket listens on TCP port, without connecting to it (in the namespace of pid)."""
    return _proc_net_tcp_listening(port, str(in_netns_of) if in_netns_of else "self")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens there and a server could bind it again (with SO_REUSEADDR, as servers do:
    connections closed on that port may linger in TIME_WAIT)."""
    if is_listening(port):
        return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
