"""The OpenSSH client's `ssh -N -L` forward: the reference egtunnel's tunnels are compared with."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .owner import new_mark, tagged_env
from .ports import free_port, is_listening
from .procs import stop_popen
from .sshd import SshServer
from .waits import START_TIMEOUT


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
                                env=tagged_env(new_mark()))  # fmt: skip
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
