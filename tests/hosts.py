"""Real SSH servers, network-namespace "remote hosts" and TCP services for egtunnel's tests, benchmarks
and demo. Plain Python without pytest: every resource is a context manager, and anything left running
is stopped at interpreter exit.

Every process started here carries EGTUNNEL_TEST_OWNER=<our pid>:<serial> in its environment (sshd
sessions get it through sshd's SetEnv), because sshd's per-connection processes call setsid() and
escape any process group, and commands started over SSH may outlive their session. Stopping a server
kills what carries its mark; the next run kills what a crashed run left behind.

Import it with the tests directory on sys.path (pytest does that through conftest.py; scripts do
`sys.path.insert(0, "<repo>/tests")`).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import itertools
import math
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

if __package__:
    from . import echo_server
else:
    import echo_server

__all__ = [
    "SSHD",
    "KEEPALIVE_LOG_LINE",
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
    "free_port",
    "wait_port",
    "port_accepts",
    "is_listening",
    "wait_until",
    "fd_count",
    "thread_count",
    "descendants",
    "connect",
    "echo_once",
    "sha256_echo",
    "sink_send",
    "source_receive",
    "round_trips",
    "percentile",
    "reap_stale",
]

SSHD = "/usr/sbin/sshd"
ECHO_SERVER_SCRIPT = Path(__file__).with_name("echo_server.py")
# What sshd logs at DEBUG1 and above for each keepalive@openssh.com global request it receives.
KEEPALIVE_LOG_LINE = "server_input_global_request: rtype keepalive@openssh.com want_reply 1"
OWNER_ENV = "EGTUNNEL_TEST_OWNER"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# Private range for namespaces; 10.213.N.0/24 with N picked free per RemoteHost.
NETNS_PREFIX = "10.213"

_serial = itertools.count(1)
_live: dict[int, "object"] = {}
_live_lock = threading.Lock()
T = TypeVar("T")


def _mark() -> str:
    return f"{os.getpid()}:{next(_serial)}"


def _tagged_env(mark: str, base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    env[OWNER_ENV] = mark
    return env


def _register(obj: object) -> None:
    with _live_lock:
        _live[id(obj)] = obj


def _unregister(obj: object) -> None:
    with _live_lock:
        _live.pop(id(obj), None)


@atexit.register
def _close_everything() -> None:
    with _live_lock:
        objs = list(_live.values())
    for obj in reversed(objs):
        with contextlib.suppress(Exception):
            obj.close()  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------------
# Ports, waiting, process accounting


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on host a moment ago (callers that bind later retry on a race)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.02, what: str = "") -> T:
    """Poll predicate until it returns a truthy value (returned) or raise TimeoutError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what or predicate!r}")
        time.sleep(interval)


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


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


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


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def clear_stale_shell_lock() -> Optional[Path]:
    """Removes the lock of `pyenv rehash` once it is older than any rehash; returns it if removed.

    The remote hosts of these tests log in to this machine's own account, whose shell start-up may
    run `pyenv rehash` in every SSH session (root's ~/.bashrc does on the machines this project is
    built on). The rehash holds a lock file that a session killed half-way leaves behind (the tests
    kill sshd sessions, and a launch that times out has its process group killed, start-up files and
    all), and every later session's start-up then waits 60 s for it: a remote command of any later
    test would time out for a reason outside the code under test. A rehash holds the lock for well
    under a second; the shells waiting for it run `pyenv-rehash` too, so a running one proves nothing.
    """
    root = Path(os.environ.get("PYENV_ROOT") or Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".pyenv")
    lock = root / "shims" / ".pyenv-shim"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    if age < STALE_SHELL_LOCK_AGE:
        return None
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    return lock


# A `pyenv rehash` takes ~0.1 s; a lock this old was left by a killed one.
STALE_SHELL_LOCK_AGE = 10.0


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (children first), found through /proc."""
    children: dict[int, list[int]] = {}
    for p in _all_pids():
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


# sshd overwrites its environment with its process title, so sshd processes are recognised by the
# stderr file they all keep open, whose name carries the mark.
_STDERR_MARK_RE = re.compile(r"/sshd\.(\d+)-(\d+)\.stderr(?: \(deleted\))?$")


def _owner_marks() -> dict[int, str]:
    """pid -> owner mark for every readable process that carries one."""
    key = OWNER_ENV.encode() + b"="
    found = {}
    for p in _all_pids():
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        for item in env.split(b"\0"):
            if item.startswith(key):
                found[p] = item[len(key) :].decode(errors="replace")
                break
        else:
            with contextlib.suppress(OSError):
                m = _STDERR_MARK_RE.search(os.readlink(f"/proc/{p}/fd/2"))
                if m:
                    found[p] = f"{m.group(1)}:{m.group(2)}"
    return found


def _protected_pids() -> set[int]:
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


def _signal_all(pids: Iterable[int], sig: int) -> None:
    protected = _protected_pids()
    for p in pids:
        if p in protected:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def _kill_and_wait(pids: Sequence[int], timeout: float = STOP_TIMEOUT) -> None:
    """SIGKILL pids (stopped ones included) and wait until they are gone or zombies."""
    pids = [p for p in pids if p not in _protected_pids()]
    _signal_all(pids, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
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


_reaped = False


def reap_stale() -> None:
    """Kill processes left by a crashed earlier run (their owner pid is gone) and its namespaces."""
    global _reaped
    _reaped = True
    stale = [pid for pid, mark in _owner_marks().items() if not _alive(int(mark.split(":", 1)[0]))]
    _kill_and_wait(stale)
    if os.geteuid() == 0 and shutil.which("ip"):
        with _netns_lock():
            _remove_stale_namespaces()


def _reap_once() -> None:
    if not _reaped:
        reap_stale()


def _netns_prefix(netns: Optional[str]) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def _run(argv: Sequence[str], timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _keygen(path: Path, comment: str) -> None:
    for p in (path, path.with_name(path.name + ".pub")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def sshd_unavailable_reason() -> Optional[str]:
    """Why an SshServer cannot run here, or None."""
    for program in (SSHD, "ssh", "ssh-keygen"):
        if not shutil.which(program):
            return f"{program} is not installed (apt-get install openssh-server)"
    if not shutil.which("ss"):
        return "ss is not installed (apt-get install iproute2)"
    return None


# ----------------------------------------------------------------------------------------------------
# SshServer


class SshServer:
    """A real OpenSSH server with its own keys, known_hosts and DEBUG3 log, on one port.

    Logs in as the current user: as root through PermitRootLogin prohibit-password, as an ordinary user
    by running sshd unprivileged on a high port (sshd then serves only its own user).
    """

    # Config lines that only some OpenSSH versions know; each is kept when `sshd -t` accepts it.
    _OPTIONAL_LINES = ("KbdInteractiveAuthentication no", "PerSourcePenalties no")
    _optional_ok: Optional[list[str]] = None

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        *,
        netns: Optional[str] = None,
        workdir: Optional[os.PathLike | str] = None,
        log_level: str = "DEBUG3",
        extra_config: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.netns = netns
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.log_level = log_level
        self.extra_config = list(extra_config)
        self._fixed_port = port is not None
        # Inside a namespace we own every port, so any number is free there.
        self.port = port if port is not None else free_port("127.0.0.1" if netns else host)
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="egtunnel-sshd-")) if workdir is None else Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mark = _mark()
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.identity_file = self.dir / "id_ed25519"
        self.wrong_identity_file = self.dir / "id_ed25519_wrong"
        self.authorized_keys = self.dir / "authorized_keys"
        self.known_hosts = self.dir / "known_hosts"
        self.config_file = self.dir / "sshd_config"
        self.log_file = self.dir / "sshd.log"
        self.stderr_file = self.dir / f"sshd.{self.mark.replace(':', '-')}.stderr"
        self.pid_file = self.dir / "sshd.pid"
        self._proc: Optional[subprocess.Popen] = None
        self._orphans: list[int] = []
        self._log_start = 0
        self._started_once = False
        _keygen(self.host_key, "egtunnel-test-host")
        _keygen(self.identity_file, "egtunnel-test-user")
        _keygen(self.wrong_identity_file, "egtunnel-test-unauthorized")
        self.authorized_keys.write_text(self.identity_file.with_name(self.identity_file.name + ".pub").read_text())
        self.write_known_hosts()
        _register(self)

    # --- keys and known_hosts

    @property
    def host_public_key(self) -> str:
        """'ssh-ed25519 AAAA...' of the current host key."""
        fields = self.host_key.with_name(self.host_key.name + ".pub").read_text().split()
        return f"{fields[0]} {fields[1]}"

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH and libssh2 name this server in known_hosts: host, or [host]:port off port 22."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def known_hosts_line(self) -> str:
        return f"{self.known_hosts_name} {self.host_public_key}\n"

    def write_known_hosts(self, path: Optional[os.PathLike | str] = None) -> Path:
        """Write a known_hosts file holding the current host key (default: self.known_hosts)."""
        target = Path(path) if path is not None else self.known_hosts
        target.write_text(self.known_hosts_line())
        return target

    def empty_known_hosts(self, name: str = "known_hosts.empty") -> Path:
        """A new empty known_hosts file next to the server's files (for unknown-key tests)."""
        target = self.dir / name
        target.write_text("")
        return target

    def regenerate_host_key(self, restart: bool = True) -> str:
        """Give the server a new host key, leaving every known_hosts file as it was.

        Restarts a running server (same port, sessions killed) so new connections see the new key.
        Returns the new public key ('ssh-ed25519 AAAA...').
        """
        _keygen(self.host_key, "egtunnel-test-host")
        if restart and self.running:
            self.restart()
        return self.host_public_key

    def connect_kwargs(self) -> dict:
        """host, port, user, identity_file and known_hosts, as open_tunnel and remote_exec take them."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "identity_file": str(self.identity_file),
            "known_hosts": str(self.known_hosts),
        }

    # --- lifecycle

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        """pid of the listening sshd (the process that forks one child per connection)."""
        return self._proc.pid if self.running else None

    def _config_text(self, optional: Sequence[str]) -> str:
        lines = [
            "# Generated test server; paths are absolute because sshd re-executes itself per connection.",
            # sshd keeps the first value of each keyword: a test's own settings go first to win.
            *self.extra_config,
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes",
            "PermitOpen any",
            "X11Forwarding no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            # Every limit (MaxStartups, MaxSessions, ClientAlive*) stays at OpenSSH's default: egtunnel must
            # work against the sshd a distribution ships. Tests and benchmarks that need other values
            # pass them in `extra_config` and say why.
            f"LogLevel {self.log_level}",
            f"SetEnv {OWNER_ENV}={self.mark}",
            "Subsystem sftp internal-sftp",
            *optional,
        ]
        return "\n".join(lines) + "\n"

    def _supported_optional_lines(self) -> list[str]:
        if SshServer._optional_ok is None:
            ok = []
            for line in self._OPTIONAL_LINES:
                probe = self.dir / "sshd_config.probe"
                probe.write_text(self._config_text([line]))
                if _run([SSHD, "-t", "-f", str(probe)], check=False).returncode == 0:
                    ok.append(line)
                probe.unlink()
            SshServer._optional_ok = ok
        return SshServer._optional_ok

    @staticmethod
    def _ensure_privsep_dir() -> None:
        # A root sshd refuses to start without its privilege separation directory.
        if os.geteuid() == 0:
            path = Path("/run/sshd")
            path.mkdir(mode=0o755, exist_ok=True)

    def start(self) -> "SshServer":
        if self.running:
            return self
        reason = sshd_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        _reap_once()
        self._ensure_privsep_dir()
        retry_port = not self._fixed_port and not self._started_once
        attempts = 5 if retry_port else 1
        for attempt in range(attempts):
            if attempt:
                self.port = free_port("127.0.0.1" if self.netns else self.host)
                self.write_known_hosts()
            error = self._start_once()
            if error is None:
                self._started_once = True
                return self
            if not (retry_port and "Address already in use" in error):
                break
        raise RuntimeError(f"sshd failed to start on {self.host}:{self.port}:\n{error}")

    def _start_once(self) -> Optional[str]:
        self.config_file.write_text(self._config_text(self._supported_optional_lines()))
        self._log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        argv = [*_netns_prefix(self.netns), SSHD, "-D", "-f", str(self.config_file), "-E", str(self.log_file)]
        with open(self.stderr_file, "ab") as err:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=_tagged_env(self.mark)
            )
        ready = f"Server listening on {self.host} port {self.port}."
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if ready in self.log_text(since=self._log_start):
                return None
            if self._proc.poll() is not None:
                break
            time.sleep(0.01)
        self.stop()
        return (self.log_text(since=self._log_start) + self.stderr_file.read_text(errors="replace"))[-4000:] or (
            "no output"
        )

    def stop(self) -> None:
        """Stop the listener and kill every session process and every process started over SSH."""
        proc, self._proc = self._proc, None
        victims: list[int] = []
        if proc is not None and proc.poll() is None:
            # A stopped listener cannot fork, so the process tree read next is complete.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGSTOP)
            victims = descendants(proc.pid)
        victims += [p for p, m in _owner_marks().items() if m == self.mark]
        victims += self._orphans
        self._orphans = []
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
            # Reaped above, so its pid may already belong to someone else.
            victims = [p for p in victims if p != proc.pid]
        _kill_and_wait(sorted(set(victims)))
        clear_stale_shell_lock()

    def restart(self, kill_sessions: bool = True) -> "SshServer":
        """Stop and start again on the same port with the same host key.

        kill_sessions=False models a distro restart that leaves established sessions running
        (systemd's KillMode=process): only the listener is replaced.
        """
        if kill_sessions:
            self.stop()
        else:
            proc, self._proc = self._proc, None
            if proc is not None and proc.poll() is None:
                self._orphans += descendants(proc.pid)
                proc.terminate()
                proc.wait(timeout=STOP_TIMEOUT)
        return self.start()

    def close(self) -> None:
        self.stop()
        _unregister(self)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SshServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" netns={self.netns}" if self.netns else ""
        return f"<SshServer {self.user}@{self.host}:{self.port}{where} {'running' if self.running else 'stopped'}>"

    # --- sessions and connections

    def session_pids(self) -> list[int]:
        """pids of every per-connection sshd process and what runs under it (not the listener)."""
        pids = descendants(self._proc.pid) if self.running else []
        pids += [p for p in self._orphans if _alive(p)]
        return pids

    def pause_sessions(self) -> list[int]:
        """SIGSTOP every session process: connections stay open but nothing answers (a dead peer)."""
        pids = self.session_pids()
        _signal_all(pids, signal.SIGSTOP)
        return pids

    def resume_sessions(self) -> list[int]:
        pids = self.session_pids()
        _signal_all(pids, signal.SIGCONT)
        return pids

    def kill_sessions(self) -> None:
        _kill_and_wait(self.session_pids())
        clear_stale_shell_lock()

    def established_connections(self) -> int:
        """Established TCP connections to the server's port, counted on the server side with ss."""
        argv = [*_netns_prefix(self.netns), "ss", "-Htn", "state", "established", f"( sport = :{self.port} )"]
        return sum(1 for line in _run(argv).stdout.splitlines() if line.strip())

    # --- log

    def log_offset(self) -> int:
        """Current end of the log; pass it as since= to look only at what comes after."""
        return self.log_file.stat().st_size if self.log_file.exists() else 0

    def log_text(self, since: int = 0) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_count(self, pattern: str, since: int = 0) -> int:
        """Number of log lines after since that contain pattern (a plain substring)."""
        return sum(1 for line in self.log_text(since).splitlines() if pattern in line)

    def wait_for_log(self, pattern: str, timeout: float = START_TIMEOUT, since: int = 0, count: int = 1) -> None:
        wait_until(lambda: self.log_count(pattern, since) >= count, timeout, what=f"{count}x {pattern!r} in sshd log")

    # --- OpenSSH client

    def ssh_argv(
        self,
        *remote_command: str,
        identity_file: Optional[os.PathLike | str] = None,
        known_hosts: Optional[os.PathLike | str] = None,
        options: Sequence[str] = (),
    ) -> list[str]:
        """argv of an OpenSSH client for this server that ignores every user or system setting."""
        return [
            "ssh",
            "-F", "/dev/null",
            "-p", str(self.port),
            "-i", str(identity_file or self.identity_file),
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10",
            "-o", "ControlMaster=no",
            "-o", "ControlPath=none",
            *options,
            f"{self.user}@{self.host}",
            *remote_command,
        ]  # fmt: skip

    def ssh(self, *remote_command: str, timeout: float = 30.0, **kwargs) -> subprocess.CompletedProcess:
        """Run a command on the server with the OpenSSH client; returns the completed process (text)."""
        return subprocess.run(
            self.ssh_argv(*remote_command, **kwargs),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            # Its own mark: stopping or restarting the server must not kill the client.
            env=_tagged_env(_mark()),
        )


# ----------------------------------------------------------------------------------------------------
# OpenSSH `ssh -N -L` forward, the reference egtunnel is compared with


@dataclass
class OpenSshForward:
    local_port: int
    process: subprocess.Popen
    stderr_file: Path

    def stderr(self) -> str:
        return self.stderr_file.read_text(errors="replace") if self.stderr_file.exists() else ""


@contextlib.contextmanager
def openssh_forward(
    server: SshServer,
    local_port: int = 0,
    remote_host: Optional[str] = None,
    remote_port: Optional[int] = None,
    *,
    options: Sequence[str] = (),
    timeout: float = START_TIMEOUT,
) -> Iterator[OpenSshForward]:
    """Run `ssh -N -L 127.0.0.1:LP:RH:RP` against server until the block ends.

    Yields once the local port listens (checked without connecting, so no channel is opened).
    local_port 0 picks a free port; remote_host defaults to the server's own address.
    """
    if remote_port is None:
        raise ValueError("remote_port is required")
    lp = local_port or free_port()
    rh = remote_host or server.host
    forward = f"127.0.0.1:{lp}:[{rh}]:{remote_port}" if ":" in rh else f"127.0.0.1:{lp}:{rh}:{remote_port}"
    argv = server.ssh_argv(options=["-N", "-L", forward, "-o", "ExitOnForwardFailure=yes", *options])
    stderr_file = Path(tempfile.mkstemp(prefix="egtunnel-ssh-L-", suffix=".stderr")[1])
    with open(stderr_file, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=_tagged_env(_mark()))  # fmt: skip
    fwd = OpenSshForward(lp, proc, stderr_file)
    try:
        deadline = time.monotonic() + timeout
        while not is_listening(lp):
            if proc.poll() is not None or time.monotonic() >= deadline:
                raise RuntimeError(f"ssh -L {forward} did not come up (exit {proc.poll()}): {fwd.stderr().strip()}")
            time.sleep(0.01)
        yield fwd
    finally:
        stop_popen(proc)
        stderr_file.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# TCP services (echo, sink, source) in their own process


class EchoServer:
    """tests/echo_server.py in a child process, on loopback or inside a namespace (see that file)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, mode: str = "echo", netns: Optional[str] = None):
        if mode not in echo_server.MODES:
            raise ValueError(f"mode must be one of {echo_server.MODES}")
        self.host = host
        self.port = port
        self.mode = mode
        self.netns = netns
        self.mark = _mark()
        self._proc: Optional[subprocess.Popen] = None
        _register(self)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def start(self) -> "EchoServer":
        if self.running:
            return self
        _reap_once()
        argv = [*_netns_prefix(self.netns), sys.executable, str(ECHO_SERVER_SCRIPT),
                "--host", self.host, "--port", str(self.port), "--mode", self.mode]  # fmt: skip
        # stdin stays open for the child's lifetime: its EOF tells the server that we are gone.
        # stderr goes to an unnamed file, which can neither fill up like a pipe nor be left behind.
        with tempfile.TemporaryFile() as err:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=_tagged_env(self.mark)
            )
            line = self._read_line(self._proc, START_TIMEOUT)
            m = re.fullmatch(r"listening (\d+)", line.strip())
            if not m:
                self.stop()
                err.seek(0)
                detail = err.read().decode(errors="replace").strip()
                raise RuntimeError(f"{self.mode} server on {self.host}:{self.port} failed: {line!r} {detail}")
        self.port = int(m.group(1))
        return self

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout: float) -> str:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        data = b""
        deadline = time.monotonic() + timeout
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return data.decode(errors="replace")
            piece = os.read(fd, 256)
            if not piece:
                break
            data += piece
        return data.decode(errors="replace")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_popen(proc)
        # Connection threads die with the process; anything else carrying our mark goes too.
        _kill_and_wait([p for p, m in _owner_marks().items() if m == self.mark])

    def close(self) -> None:
        self.stop()
        _unregister(self)

    def __enter__(self) -> "EchoServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" netns={self.netns}" if self.netns else ""
        return f"<EchoServer {self.mode} {self.host}:{self.port}{where}>"


# ----------------------------------------------------------------------------------------------------
# Clients for those services


def connect(host: str, port: int, timeout: float = START_TIMEOUT) -> socket.socket:
    """A TCP connection with TCP_NODELAY, so measurements are not skewed by our own Nagle."""
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact_into(s: socket.socket, view: memoryview, what: str = "connection") -> None:
    """Fill view from s; allocation-free, so timed loops can call it."""
    got, n = 0, len(view)
    while got < n:
        k = s.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"{what} closed after {got} of {n} bytes")
        got += k


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_exact_into(s, memoryview(buf))
    return bytes(buf)


def _recv_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        piece = s.recv(echo_server.BUFFER_SIZE)
        if not piece:
            return b"".join(chunks)
        chunks.append(piece)


def echo_once(host: str, port: int, payload: bytes = b"hello egtunnel\n", timeout: float = START_TIMEOUT) -> bytes:
    """Send payload, half-close, and return everything the echo server sends back before closing."""
    with connect(host, port, timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return _recv_all(s)


@dataclass
class StreamResult:
    sent_bytes: int
    sent_sha256: str
    received_bytes: int
    received_sha256: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.sent_bytes == self.received_bytes and self.sent_sha256 == self.received_sha256

    @property
    def bytes_per_second(self) -> float:
        return max(self.sent_bytes, self.received_bytes) / self.seconds if self.seconds > 0 else float("inf")


def sha256_echo(host: str, port: int, nbytes: int = 64 << 20, timeout: float = 120.0) -> StreamResult:
    """Send nbytes to an echo server while reading the echo back concurrently; compare sha256.

    Writing and reading at once matters: a client that wrote everything first would deadlock as soon
    as the buffers along the path are full.
    """
    sent = hashlib.sha256()
    errors: list[BaseException] = []
    with connect(host, port, timeout) as s:
        s.settimeout(timeout)

        def writer() -> None:
            try:
                for piece in echo_server.pattern_chunks(nbytes):
                    sent.update(piece)
                    s.sendall(piece)
                s.shutdown(socket.SHUT_WR)
            except BaseException as e:  # re-raised in the calling thread
                errors.append(e)

        start = time.perf_counter()
        t = threading.Thread(target=writer, name="sha256_echo-writer", daemon=True)
        t.start()
        received = hashlib.sha256()
        count = 0
        buf = bytearray(echo_server.BUFFER_SIZE)
        view = memoryview(buf)
        try:
            while True:
                k = s.recv_into(buf)
                if k == 0:
                    break
                received.update(view[:k])
                count += k
        finally:
            if t.is_alive():
                # Unblock a writer stuck in sendall before waiting for it.
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            t.join(timeout)
        seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return StreamResult(nbytes, sent.hexdigest(), count, received.hexdigest(), seconds)


def sink_send(host: str, port: int, nbytes: int, timeout: float = 120.0) -> StreamResult:
    """Send nbytes one way to a sink server; received_* is what the server counted and hashed."""
    sent = hashlib.sha256()
    with connect(host, port, timeout) as s:
        s.settimeout(timeout)
        start = time.perf_counter()
        for piece in echo_server.pattern_chunks(nbytes):
            sent.update(piece)
            s.sendall(piece)
        s.shutdown(socket.SHUT_WR)
        reply = _recv_all(s).decode()
        seconds = time.perf_counter() - start
    count, digest = reply.split()
    return StreamResult(nbytes, sent.hexdigest(), int(count), digest, seconds)


def source_receive(host: str, port: int, nbytes: int, timeout: float = 120.0) -> StreamResult:
    """Ask a source server for nbytes and read them; sent_* is what the server's pattern should be."""
    received = hashlib.sha256()
    count = 0
    with connect(host, port, timeout) as s:
        s.settimeout(timeout)
        start = time.perf_counter()
        s.sendall(f"{nbytes}\n".encode())
        buf = bytearray(echo_server.BUFFER_SIZE)
        view = memoryview(buf)
        while True:
            k = s.recv_into(buf)
            if k == 0:
                break
            received.update(view[:k])
            count += k
        seconds = time.perf_counter() - start
    return StreamResult(nbytes, echo_server.pattern_digest(nbytes), count, received.hexdigest(), seconds)


def round_trips(host: str, port: int, count: int = 10_000, size: int = 1024, timeout: float = 10.0) -> list[float]:
    """Seconds of each of count round trips of size bytes through one connection to an echo server."""
    payload = os.urandom(size)
    samples = []
    clock = time.perf_counter
    with connect(host, port, timeout) as s:
        s.settimeout(timeout)
        for _ in range(count):
            t0 = clock()
            s.sendall(payload)
            back = _recv_exact(s, size)
            samples.append(clock() - t0)
            if back != payload:
                raise AssertionError("echo returned different bytes")
    return samples


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile, p in [0, 100]."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


# ----------------------------------------------------------------------------------------------------
# RemoteHost: a network namespace joined to ours by a veth pair


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no iproute2, or no CAP_SYS_ADMIN)."""


_netns_reason: Optional[tuple[Optional[str]]] = None
_NAME_RE = re.compile(r"^egt(\d+)([nhp])(\d+)$")


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
    res = _run(["ip", "netns", "add", name], check=False)
    if res.returncode != 0:
        return f"ip netns add failed: {res.stderr.strip()}"
    _run(["ip", "netns", "del", name], check=False)
    return None


@contextlib.contextmanager
def _netns_lock() -> Iterator[None]:
    # Serialises subnet choice and stale cleanup between concurrent test processes.
    path = Path(tempfile.gettempdir()) / "egtunnel-netns.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _netns_names() -> list[str]:
    res = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _link_names() -> list[str]:
    res = _run(["ip", "-o", "link", "show"], check=False)
    # "7: egt123h1@if6: <...>" -> egt123h1
    return [line.split(":")[1].strip().split("@")[0] for line in res.stdout.splitlines() if ":" in line]


def _destroy_netns(name: str, host_ifname: Optional[str]) -> None:
    res = _run(["ip", "netns", "pids", name], check=False)
    _kill_and_wait([int(p) for p in res.stdout.split() if p.isdigit()])
    if host_ifname and host_ifname in _link_names():
        # Deleting one end deletes both, at once; a dying namespace would only do it later.
        _run(["ip", "link", "del", host_ifname], check=False)
    _run(["ip", "netns", "del", name], check=False)


def _remove_stale_namespaces() -> None:
    for name in _netns_names():
        m = _NAME_RE.match(name)
        if m and m.group(2) == "n" and not _alive(int(m.group(1))):
            _destroy_netns(name, f"egt{m.group(1)}h{m.group(3)}")
    for link in _link_names():
        m = _NAME_RE.match(link)
        if m and m.group(2) == "h" and not _alive(int(m.group(1))):
            _run(["ip", "link", "del", link], check=False)


class RemoteHost:
    """A network namespace that plays a remote machine: its own address, reached through a veth pair.

    The host side of the pair has `gateway_address` (.1), the namespace side `address` (.2) in a
    10.213.N.0/24 that no interface uses yet. The namespace has no default route, so nothing in it
    reaches beyond that /24 and its own loopback.
    """

    def __init__(self) -> None:
        serial = next(_serial)
        pid = os.getpid()
        self.name = f"egt{pid}n{serial}"
        self.host_ifname = f"egt{pid}h{serial}"
        self.peer_ifname = f"egt{pid}p{serial}"
        self.subnet: Optional[int] = None
        self.sshd: Optional[SshServer] = None
        self.echo: Optional[EchoServer] = None
        self._children: list = []
        self._procs: list[subprocess.Popen] = []
        self._created = False
        self.mark = _mark()
        _register(self)

    @property
    def address(self) -> str:
        """The namespace's own address (where its services listen)."""
        return f"{NETNS_PREFIX}.{self._require_subnet()}.2"

    @property
    def gateway_address(self) -> str:
        """Our side of the veth pair: how processes in the namespace reach the test process."""
        return f"{NETNS_PREFIX}.{self._require_subnet()}.1"

    def _require_subnet(self) -> int:
        if self.subnet is None:
            raise RuntimeError("RemoteHost is not started")
        return self.subnet

    def _pick_subnet(self) -> int:
        used = set()
        for argv in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
            used.update(int(n) for n in re.findall(NETNS_PREFIX.replace(".", r"\.") + r"\.(\d+)\.", _run(argv).stdout))
        # Rotate the start so back-to-back namespaces do not reuse an address that just went away.
        start = (os.getpid() * 7 + next(_serial)) % 254
        for i in range(254):
            n = (start + i) % 254 + 1
            if n not in used:
                return n
        raise RuntimeError(f"no free /24 left in {NETNS_PREFIX}.0.0/16")

    def start(self) -> "RemoteHost":
        if self._created:
            return self
        reason = netns_unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        _reap_once()
        with _netns_lock():
            _remove_stale_namespaces()
            if self.name in _netns_names() or self.host_ifname in _link_names():
                # Left by an earlier process with our pid that crashed.
                _destroy_netns(self.name, self.host_ifname)
            self.subnet = self._pick_subnet()
            self._created = True
            try:
                self._create()
            except BaseException:
                self.close()
                raise
        return self

    def _create(self) -> None:
        n, gw, addr = self.name, self.gateway_address, self.address
        for argv in (
            ["ip", "netns", "add", n],
            ["ip", "link", "add", self.host_ifname, "type", "veth", "peer", "name", self.peer_ifname, "netns", n],
            ["ip", "addr", "add", f"{gw}/24", "dev", self.host_ifname],
            ["ip", "link", "set", self.host_ifname, "up"],
            ["ip", "-n", n, "link", "set", "lo", "up"],
            ["ip", "-n", n, "addr", "add", f"{addr}/24", "dev", self.peer_ifname],
            ["ip", "-n", n, "link", "set", self.peer_ifname, "up"],
        ):
            _run(argv)

    @property
    def ssh_servers(self) -> list[SshServer]:
        return [c for c in self._children if isinstance(c, SshServer)]

    def netns_argv(self, argv: Sequence[str]) -> list[str]:
        return [*_netns_prefix(self.name), *argv]

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run inside the namespace (timeout defaults to 30 s)."""
        kwargs.setdefault("timeout", 30.0)
        kwargs["env"] = _tagged_env(self.mark, kwargs.get("env"))
        return subprocess.run(self.netns_argv(argv), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """subprocess.Popen inside the namespace; stopped by close() if still running."""
        kwargs["env"] = _tagged_env(self.mark, kwargs.get("env"))
        proc = subprocess.Popen(self.netns_argv(argv), **kwargs)
        self._procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process whose network namespace is this one."""
        res = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in res.stdout.split() if p.isdigit()]

    def link_down(self) -> None:
        """Cut the link from the far side: our routes stay, packets to the namespace vanish silently,
        as when a remote machine or the network beyond the first hop dies."""
        _run(["ip", "-n", self.name, "link", "set", self.peer_ifname, "down"])

    def link_up(self) -> None:
        _run(["ip", "-n", self.name, "link", "set", self.peer_ifname, "up"])

    def move_behind(self, jump: "RemoteHost", reach: Sequence[str] = ()) -> None:
        """Make this host reachable only through `jump`, like a machine behind a bastion.

        Our end of the veth pair moves into the jump host's namespace, so the test process (the gateway's
        side) has no route here at all, while the jump host reaches `address` directly. Traffic from here
        to the addresses in `reach` (e.g. a gateway's response address) goes out through the jump host,
        which masquerades it as its own, as NAT on a real bastion would.
        """
        gw = self.gateway_address
        _run(["ip", "link", "set", self.host_ifname, "netns", jump.name])
        jump.run(["ip", "addr", "add", f"{gw}/24", "dev", self.host_ifname], check=True, capture_output=True)
        jump.run(["ip", "link", "set", self.host_ifname, "up"], check=True, capture_output=True)
        if reach:
            jump.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True, capture_output=True)
            jump.run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", f"{self.address}/32",
                      "-o", jump.peer_ifname, "-j", "MASQUERADE"], check=True, capture_output=True)  # fmt: skip
        for address in reach:
            self.run(["ip", "route", "add", f"{address}/32", "via", gw], check=True, capture_output=True)
            if not address.startswith(f"{NETNS_PREFIX}.{jump.subnet}."):
                jump.run(["ip", "route", "add", f"{address}/32", "via", jump.gateway_address], check=True, capture_output=True)

    def ssh_server(self, **kwargs) -> SshServer:
        """Start an SshServer inside the namespace, listening on `address` (the first becomes .sshd)."""
        kwargs.setdefault("host", self.address)
        server = SshServer(netns=self.name, **kwargs).start()
        self._children.append(server)
        if self.sshd is None:
            self.sshd = server
        return server

    def echo_server(self, port: int = 0, *, mode: str = "echo", host: Optional[str] = None) -> EchoServer:
        """Start a TCP service inside the namespace (default on `address`; the first echo becomes .echo)."""
        server = EchoServer(host or self.address, port, mode=mode, netns=self.name).start()
        self._children.append(server)
        if self.echo is None and mode == "echo":
            self.echo = server
        return server

    def close(self) -> None:
        for child in reversed(self._children):
            with contextlib.suppress(Exception):
                child.close()
        self._children.clear()
        for proc in self._procs:
            stop_popen(proc)
        self._procs.clear()
        if self._created:
            self._created = False
            _kill_and_wait([p for p, m in _owner_marks().items() if m == self.mark])
            _destroy_netns(self.name, self.host_ifname)
        _unregister(self)

    @property
    def created(self) -> bool:
        """Whether the namespace exists (started and not yet closed)."""
        return self._created

    def __enter__(self) -> "RemoteHost":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        addr = self.address if self.subnet is not None else "-"
        return f"<RemoteHost {self.name} {addr}>"


def live_hosts() -> list[RemoteHost]:
    """Every namespace host this process has started and not closed, oldest first: what a check for
    leftovers on "remote hosts" has to look at, whichever fixture or test made them."""
    with _live_lock:
        objs = list(_live.values())
    return [o for o in objs if isinstance(o, RemoteHost) and o.created]
