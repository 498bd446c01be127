"""SshServer: a real OpenSSH server for one test, with its own keys, known_hosts, config and log.

It serves on loopback or (through RemoteHost.ssh_server) inside a network namespace, and can be
stopped, restarted with its sessions left running, given a new host key, or have its sessions paused;
its log and `ss` tell what it saw. Every limit stays at OpenSSH's default (see _config_text).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from .keys import keygen
from .netns import exec_prefix
from .owner import OWNER_ENV, marked_pids, new_mark, reap_once, register, sshd_stderr_name, tagged_env, unregister
from .ports import free_port
from .procs import STOP_TIMEOUT, alive, descendant_pids, kill_and_wait, run, signal_all
from .shell_lock import clear_stale_shell_lock
from .waits import START_TIMEOUT, wait_until

SSHD = "/usr/sbin/sshd"
# What sshd logs at DEBUG1 and above for each keepalive@openssh.com global request it receives.
KEEPALIVE_LOG_LINE = "server_input_global_request: rtype keepalive@openssh.com want_reply 1"


def sshd_unavailable_reason() -> Optional[str]:
    """Why an SshServer cannot run here, or None."""
    for program in (SSHD, "ssh", "ssh-keygen"):
        if not shutil.which(program):
            return f"{program} is not installed (apt-get install openssh-server)"
    if not shutil.which("ss"):
        return "ss is not installed (apt-get install iproute2)"
    return None


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
        self.mark = new_mark()
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.identity_file = self.dir / "id_ed25519"
        self.wrong_identity_file = self.dir / "id_ed25519_wrong"
        self.authorized_keys = self.dir / "authorized_keys"
        self.known_hosts = self.dir / "known_hosts"
        self.config_file = self.dir / "sshd_config"
        self.log_file = self.dir / "sshd.log"
        self.stderr_file = self.dir / sshd_stderr_name(self.mark)
        self.pid_file = self.dir / "sshd.pid"
        self._proc: Optional[subprocess.Popen] = None
        self._orphans: list[int] = []
        self._log_start = 0
        self._started_once = False
        keygen(self.host_key, "egtunnel-test-host")
        keygen(self.identity_file, "egtunnel-test-user")
        keygen(self.wrong_identity_file, "egtunnel-test-unauthorized")
        self.authorized_keys.write_text(self.identity_file.with_name(self.identity_file.name + ".pub").read_text())
        self.write_known_hosts()
        register(self)

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
        keygen(self.host_key, "egtunnel-test-host")
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
                if run([SSHD, "-t", "-f", str(probe)], check=False).returncode == 0:
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
        reap_once()
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
        argv = [*exec_prefix(self.netns), SSHD, "-D", "-f", str(self.config_file), "-E", str(self.log_file)]
        with open(self.stderr_file, "ab") as err:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=tagged_env(self.mark)
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
            victims = descendant_pids(proc.pid)
        victims += marked_pids(self.mark)
        victims += self._orphans
        self._orphans = []
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
            # Reaped above, so its pid may already belong to someone else.
            victims = [p for p in victims if p != proc.pid]
        kill_and_wait(sorted(set(victims)))
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
                self._orphans += descendant_pids(proc.pid)
                proc.terminate()
                proc.wait(timeout=STOP_TIMEOUT)
        return self.start()

    def close(self) -> None:
        self.stop()
        unregister(self)
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
        pids = descendant_pids(self._proc.pid) if self.running else []
        pids += [p for p in self._orphans if alive(p)]
        return pids

    def pause_sessions(self) -> list[int]:
        """SIGSTOP every session process: connections stay open but nothing answers (a dead peer)."""
        pids = self.session_pids()
        signal_all(pids, signal.SIGSTOP)
        return pids

    def resume_sessions(self) -> list[int]:
        pids = self.session_pids()
        signal_all(pids, signal.SIGCONT)
        return pids

    def kill_sessions(self) -> None:
        kill_and_wait(self.session_pids())
        clear_stale_shell_lock()

    def established_connections(self) -> int:
        """Established TCP connections to the server's port, counted on the server side with ss."""
        argv = [*exec_prefix(self.netns), "ss", "-Htn", "state", "established", f"( sport = :{self.port} )"]
        return sum(1 for line in run(argv).stdout.splitlines() if line.strip())

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
            env=tagged_env(new_mark()),
        )
