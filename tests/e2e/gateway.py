"""A real Enterprise Gateway 3.3 server process, its kernelspecs and its private home, for tests and the demo.

The gateway runs as a subprocess of the test run, never in-process, so that what is measured (ssh
children, fds, threads, event-loop latency) is the gateway's alone. It gets a throwaway HOME (EG's
paramiko path reads ~/.ssh) and JUPYTER_* directories, so none of the user's Jupyter or SSH settings
is read or written; stop() leaves no process behind, even those that left the gateway's process group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import requests

from harness import procs

from .kernel_client import GatewayClient

HERE = Path(__file__).resolve().parent
GATEWAY_APP = HERE / "gateway_app.py"

EG_PROXY = "enterprise_gateway.services.processproxies.distributed.DistributedProcessProxy"
EGTUNNEL_PROXY = "egtunnel.DistributedProcessProxy"
SYSTEM_SSH_CONFIG = "/etc/ssh/ssh_config"


def free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


@dataclass
class KernelSpecDef:
    """A kernelspec to install: the launcher argv comes from `python -m egtunnel kernelspec install`."""

    name: str
    class_name: str = EGTUNNEL_PROXY
    config: dict[str, Any] = field(default_factory=dict)  # metadata.process_proxy.config
    display_name: Optional[str] = None
    # Replaces `python -m egtunnel.launcher` at the head of the argv (EG's own launch_ipykernel.py takes
    # the same arguments); None keeps the installer's.
    launcher: Optional[list[str]] = None
    # Appended to the argv. EG joins the argv with spaces into the remote shell command, so a shell
    # redirection here applies to the launch itself.
    argv_tail: list[str] = field(default_factory=list)


@dataclass
class GatewayConfig:
    remote_hosts: list[str]
    ssh_port: int
    response_ip: str
    identity_file: Path
    known_hosts: Path
    # EG's own paramiko path reads ~/.ssh: its key and known_hosts default to the native ones.
    paramiko_identity_file: Optional[Path] = None
    paramiko_known_hosts: Optional[Path] = None
    remote_user: str = "root"
    tunneling: bool = True
    cull_idle_timeout: int = 300
    # Culling must not act during most tests: only the timeout's value matters (keep-alive policy).
    cull_interval: int = 86400
    launch_timeout: int = 60
    kernelspecs: list[KernelSpecDef] = field(default_factory=list)
    env: dict[str, Optional[str]] = field(default_factory=dict)  # last word over every default above; None unsets
    ip: str = "127.0.0.1"
    log_level: str = "DEBUG"
    # OpenSSH finds ~/.ssh through the password database, not $HOME, so EG's own `ssh -L` tunnels would
    # use the real one. As root, the gateway gets a private mount namespace in which the system-wide
    # ssh_config points OpenSSH at the throwaway HOME's key and known_hosts and forbids adding keys.
    private_ssh_config: bool = field(
        default_factory=lambda: os.geteuid() == 0 and shutil.which("unshare") is not None
        and os.path.exists(SYSTEM_SSH_CONFIG))


class GatewayStartError(RuntimeError):
    pass


# Started and not yet stopped, whoever made them (fixtures, a test, bench/lab.py in this process).
_live: list["Gateway"] = []


def live_gateways() -> list["Gateway"]:
    """Gateways whose kernels are still theirs: started here, not stopped, process alive."""
    return [gw for gw in _live if gw.alive()]


class Gateway:
    """One gateway process; use as a context manager or call start()/stop()."""

    def __init__(self, workdir: Path, config: GatewayConfig, python: str = sys.executable):
        self.workdir = Path(workdir)
        self.config = config
        self.python = python
        self.port = 0
        self.response_port = 0
        self.process: Optional[subprocess.Popen] = None
        self.log_path = self.workdir / "gateway.log"
        self.kernel_log_dir = self.workdir / "kernel-logs"
        self.home = self.workdir / "home"
        self.kernels_prefix = self.workdir / "kernelspecs"
        self._log_file: Any = None
        self._known_procs: dict[int, procs.Proc] = {}

    # -- setup ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.config.ip}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _prepare_home(self) -> None:
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        os.chmod(ssh_dir, 0o700)
        identity = self.config.paramiko_identity_file or self.config.identity_file
        key = ssh_dir / "id_ed25519"
        shutil.copyfile(identity, key)
        os.chmod(key, 0o600)
        pub = Path(str(identity) + ".pub")
        if pub.exists():
            shutil.copyfile(pub, ssh_dir / "id_ed25519.pub")
        shutil.copyfile(self.config.paramiko_known_hosts or self.config.known_hosts, ssh_dir / "known_hosts")

    def _write_ssh_config(self) -> Path:
        ssh_dir = self.home / ".ssh"
        path = self.workdir / "ssh_config"
        path.write_text(
            "Host *\n"
            f"  IdentityFile {ssh_dir / 'id_ed25519'}\n"
            f"  UserKnownHostsFile {ssh_dir / 'known_hosts'}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n")
        return path

    def kernel_env(self) -> dict[str, str]:
        """Environment for kernels on the remote hosts: keeps IPython and Jupyter out of the real home."""
        remote = self.workdir / "remote-home"
        return {
            "HOME": str(remote),
            "IPYTHONDIR": str(remote / "ipython"),
            "JUPYTER_CONFIG_DIR": str(remote / "jupyter-config"),
            "JUPYTER_DATA_DIR": str(remote / "jupyter-data"),
            "JUPYTER_RUNTIME_DIR": str(remote / "jupyter-runtime"),
            "MPLCONFIGDIR": str(remote / "mpl"),
        }

    def install_kernelspecs(self) -> None:
        for spec in self.config.kernelspecs:
            self.install_kernelspec(spec)

    def install_kernelspec(self, spec: KernelSpecDef) -> Path:
        cmd = [self.python, "-m", "egtunnel", "kernelspec", "install", "--name", spec.name,
               "--prefix", str(self.kernels_prefix), "--python", self.python,
               "--class-name", spec.class_name]
        if spec.display_name:
            cmd += ["--display-name", spec.display_name]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise GatewayStartError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        found = [p for p in self.kernels_prefix.rglob("kernel.json") if p.parent.name == spec.name]
        if len(found) != 1:
            raise GatewayStartError(f"kernelspec {spec.name} not found under {self.kernels_prefix}: {found}")
        path = found[0]
        kernel = json.loads(path.read_text())
        proxy = kernel.setdefault("metadata", {}).setdefault("process_proxy", {})
        if proxy.get("class_name") != spec.class_name:
            raise GatewayStartError(f"{path}: class_name {proxy.get('class_name')!r}, wanted {spec.class_name!r}")
        if spec.config:
            proxy.setdefault("config", {}).update(spec.config)
        if spec.launcher is not None:
            head = [self.python, "-m", "egtunnel.launcher"]
            if kernel["argv"][:3] != head:
                raise GatewayStartError(f"{path}: argv does not start with {head}: {kernel['argv']}")
            kernel["argv"] = [*spec.launcher, *kernel["argv"][3:]]
        kernel["argv"] += spec.argv_tail
        kernel.setdefault("env", {}).update(self.kernel_env())
        path.write_text(json.dumps(kernel, indent=2))
        return path

    def jupyter_path(self) -> str:
        dirs = sorted({str(p.parent.parent.parent) for p in self.kernels_prefix.rglob("kernel.json")})
        return os.pathsep.join(dirs)

    def environment(self) -> dict[str, str]:
        cfg = self.config
        # EG exports its whole environment into every remote launch command: start from a minimal one,
        # so that what the kernels see is what this class sets and nothing of the caller's.
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR")}
        jupyter = self.workdir / "jupyter"
        env.update({
            "HOME": str(self.home),
            "JUPYTER_PATH": self.jupyter_path(),
            "JUPYTER_CONFIG_DIR": str(jupyter / "config"),
            "JUPYTER_DATA_DIR": str(jupyter / "data"),
            "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"),
            "IPYTHONDIR": str(jupyter / "ipython"),
            "EG_ENABLE_TUNNELING": "True" if cfg.tunneling else "False",
            "EG_REMOTE_HOSTS": ",".join(cfg.remote_hosts),
            "EG_REMOTE_USER": cfg.remote_user,
            "EG_SSH_PORT": str(cfg.ssh_port),
            "EG_RESPONSE_IP": cfg.response_ip,
            "EG_RESPONSE_PORT": str(self.response_port),
            "EG_RESPONSE_PORT_RETRIES": "0",
            "EG_SSH_KNOWN_HOSTS": str(cfg.known_hosts),
            "EG_SSH_IDENTITY_FILE": str(cfg.identity_file),
            "EG_SSH_HOST_KEY_POLICY": "strict",
            "EG_KERNEL_LAUNCH_TIMEOUT": str(cfg.launch_timeout),
            "EG_KERNEL_LOG_DIR": str(self.kernel_log_dir),
            # EG refuses kernels for root by default; the remote user here is root by design (netns hosts).
            "EG_UNAUTHORIZED_USERS": "nobody",
            "PYTHONUNBUFFERED": "1",
        })
        for key, value in cfg.env.items():
            # None removes a variable set above (a gateway that leaves a setting to ssh_config).
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def command(self) -> list[str]:
        cfg = self.config
        prefix: list[str] = []
        if cfg.private_ssh_config:
            prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                      'mount --bind "$1" "$2" || exit 97; shift 2; exec "$@"', "gateway",
                      str(self._write_ssh_config()), SYSTEM_SSH_CONFIG]
        return prefix + [
            self.python, str(GATEWAY_APP),
            f"--ip={cfg.ip}", f"--port={self.port}", "--port_retries=0",
            f"--MappingKernelManager.cull_idle_timeout={cfg.cull_idle_timeout}",
            f"--MappingKernelManager.cull_interval={cfg.cull_interval}",
            f"--log-level={cfg.log_level}",
        ]

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "Gateway":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kernel_log_dir.mkdir(exist_ok=True)
        for path in self.kernel_env().values():
            Path(path).mkdir(parents=True, exist_ok=True)
        self._prepare_home()
        self.install_kernelspecs()
        self.port = free_port(self.config.ip)
        self.response_port = free_port(self.config.response_ip)
        self._log_file = open(self.log_path, "ab")
        _live.append(self)
        self.process = subprocess.Popen(
            self.command(), env=self.environment(), cwd=self.workdir, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self.stop()
                raise GatewayStartError(f"gateway exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if requests.get(self.url + "/api/kernelspecs", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise GatewayStartError(f"gateway did not answer within {timeout}s:\n{self.log_text()}")
            time.sleep(0.1)

    def _remember_descendants(self) -> None:
        # EG's ssh tunnels (pexpect) start their own sessions, so killpg would miss them: track them.
        if self.process is not None and self.process.poll() is None:
            for p in procs.descendants(self.process.pid):
                self._known_procs[p.pid] = p

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (EG shuts its kernels down), then SIGKILL to the group and to every known descendant."""
        if self in _live:
            _live.remove(self)
        if self.process is None:
            return
        self._remember_descendants()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        procs.kill_procs(self._known_procs.values())
        self._known_procs.clear()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation ------------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def kernel_logs(self) -> str:
        out = []
        for path in sorted(self.kernel_log_dir.glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    def client(self, timeout: float = 30.0) -> GatewayClient:
        return GatewayClient(self.url, timeout)

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The live proxies and tunnels, as the objects inside the gateway report them."""
        self._remember_descendants()
        response = requests.get(self.url + "/egtunnel/status", timeout=timeout)
        response.raise_for_status()
        return response.json()

    def poll(self, kernel_id: str, timeout: float = 30.0) -> dict[str, Any]:
        response = requests.post(self.url + f"/egtunnel/poll/{kernel_id}", timeout=timeout)
        response.raise_for_status()
        return response.json()

    def remote_signal_probe(self, kernel_id: str, n: int, path: str, timeout: float = 120.0) -> list[dict]:
        response = requests.post(self.url + f"/egtunnel/remote-signal/{kernel_id}",
                                 params={"n": str(n), "path": path}, timeout=timeout)
        response.raise_for_status()
        return response.json()["calls"]

    def connection_file(self, kernel_id: str, path: Path) -> Path:
        """Write the kernel's connection file (its local tunnel ports) for `jupyter console --existing`."""
        response = requests.get(self.url + f"/egtunnel/connection-file/{kernel_id}", timeout=10)
        response.raise_for_status()
        path.write_text(json.dumps(response.json(), indent=2))
        os.chmod(path, 0o600)
        return path

    def fds(self) -> int:
        return procs.fd_count(self.pid)

    def threads(self) -> int:
        return procs.thread_count(self.pid)

    def ssh_children(self) -> list[procs.Proc]:
        self._remember_descendants()
        return procs.ssh_children(self.pid)

    def listening_ports(self) -> set[int]:
        return procs.listening_ports(pid=self.pid)
