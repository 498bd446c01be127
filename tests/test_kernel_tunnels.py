"""The command a failed start runs on the kernel's host (`KernelTunnels.stop_launched_command`), run here
by a local shell as sshd runs it, against real processes: every process whose arguments carry the
kernel's id stops, in both of EG's spellings, and nothing else does, not even the shell running it.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid

import pytest

from egtunnel.config import SshSettings, TunnelSettings
from egtunnel.kernel_tunnels import STOP_LAUNCHED_GRACE, STOP_LAUNCHED_LATE, KernelTunnels


def kernel_tunnels(kernel_id: str) -> KernelTunnels:
    return KernelTunnels(kernel_id, logging.getLogger("test"), SshSettings(), TunnelSettings(), {}, lambda: 0)


def sleeper(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])


def test_stop_command_ends_the_kernels_processes_and_only_those() -> None:
    kernel_id, other = str(uuid.uuid4()), str(uuid.uuid4())
    victims = [sleeper("--kernel-id", kernel_id), sleeper("--RemoteProcessProxy.kernel-id", kernel_id, "--x", "y"),
               sleeper(f"--kernel-id={kernel_id}")]  # fmt: skip
    bystanders = [sleeper("--kernel-id", other), sleeper("--kernel-id", kernel_id + "0"), sleeper(kernel_id)]
    try:
        command = kernel_tunnels(kernel_id).stop_launched_command()
        assert command is not None
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                              timeout=STOP_LAUNCHED_GRACE + STOP_LAUNCHED_LATE + 10)  # fmt: skip
        # The shell ran to its end (pkill spared it) and reported pkill's status: some were signalled.
        assert (done.returncode, done.stdout.split()[-1:]) == (0, ["0"]), done
        for proc in victims:
            assert proc.wait(5) is not None
        assert all(proc.poll() is None for proc in bystanders)
        again = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=20)
        assert again.stdout.split()[-1:] == ["1"], again  # pkill's "none matched"
    finally:
        for proc in victims + bystanders:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize("kernel_id", ["a b", "x;reboot", "$(id)", "*", ""])
def test_an_id_unfit_for_a_command_gets_none(kernel_id: str) -> None:
    assert kernel_tunnels(kernel_id).stop_launched_command() is None
