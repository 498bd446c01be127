"""egtunnel's test harness: real SSH servers, network-namespace "remote hosts" and TCP services for the
tests, benchmarks and demo. Plain Python without pytest: every resource is a context manager, and
anything left running is stopped at interpreter exit.

  sshd.py         SshServer: a real OpenSSH server with its own keys, config and log
  openssh.py      openssh_forward: the OpenSSH client's `ssh -L`, the reference to compare with
  remote_host.py  RemoteHost: a network namespace with its own address that plays a remote machine
  netns.py        namespaces: availability, naming, locking, removal of stale ones
  echo.py         EchoServer: echo_server.py's services in a child process
  echo_server.py  the echo, sink and source services (run as a script; its pattern is imported)
  clients.py      clients of those services: exchanges, sha256-checked streams, round trips
  owner.py        ownership marks on every started process, reaping of a crashed run's leftovers
  procs.py        processes through /proc, `ip` and `ss`, and stopping them
  ports.py        free ports, listening checks;  waits.py  polling with a deadline
  keys.py         ssh-keygen;  shell_lock.py  the shell start-up lock a killed session leaves

Import it with the tests directory on sys.path (pytest does that through conftest.py; scripts do
`sys.path.insert(0, "<repo>/tests")`). The names below are the ones tests use most; the rest is in
the modules (`harness.procs.alive`, `harness.netns.netns_names`, ...).
"""

from __future__ import annotations

from . import (
    clients, echo, echo_server, keys, netns, openssh, owner, ports, procs, remote_host, shell_lock, sshd, waits,
)
from .clients import (
    StreamResult,
    connect,
    echo_once,
    percentile,
    recv_all,
    recv_exact,
    recv_exact_into,
    round_trips,
    sha256_echo,
    sink_send,
    source_receive,
)
from .echo import EchoServer
from .netns import NetnsUnavailable, netns_unavailable_reason
from .openssh import OpenSshForward, openssh_forward
from .owner import OWNER_ENV, new_mark, reap_stale, tagged_env
from .ports import free_port, is_listening, port_accepts, port_is_free, wait_port
from .procs import descendant_pids, fd_count, stop_popen, thread_count
from .remote_host import RemoteHost, live_hosts
from .shell_lock import clear_stale_shell_lock
from .sshd import KEEPALIVE_LOG_LINE, SSHD, SshServer, sshd_unavailable_reason
from .waits import START_TIMEOUT, wait_until

__all__ = [
    "SSHD",
    "KEEPALIVE_LOG_LINE",
    "OWNER_ENV",
    "START_TIMEOUT",
    "NetnsUnavailable",
    "SshServer",
    "RemoteHost",
    "live_hosts",
    "EchoServer",
    "OpenSshForward",
    "StreamResult",
    "openssh_forward",
    "netns_unavailable_reason",
    "sshd_unavailable_reason",
    "clear_stale_shell_lock",
    "free_port",
    "wait_port",
    "port_accepts",
    "port_is_free",
    "is_listening",
    "wait_until",
    "fd_count",
    "thread_count",
    "descendant_pids",
    "stop_popen",
    "new_mark",
    "tagged_env",
    "connect",
    "recv_exact",
    "recv_exact_into",
    "recv_all",
    "echo_once",
    "sha256_echo",
    "sink_send",
    "source_receive",
    "round_trips",
    "percentile",
    "reap_stale",
    # modules
    "clients", "echo", "echo_server", "keys", "netns", "openssh", "owner", "ports", "procs", "remote_host",
    "shell_lock", "sshd", "waits",
]
