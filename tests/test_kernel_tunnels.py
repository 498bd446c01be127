"""The commands egtunnel runs on a kernel's host to stop it, run here by a local shell as sshd runs them,
against real processes. After a failed start (`stop_launched_command`): every process whose arguments
carry the kernel's id stops, in both of EG's spellings, and nothing else does, not even the shell running
it. After a shutdown (`leftovers_command`): what is left of one launch (its process group, with the id)
is killed once the grace has passed, and nothing else is.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from egtunnel.config import SshSettings, TunnelSettings
from egtunnel import kernel_tunnels as kt
from egtunnel.kernel_tunnels import STOP_LAUNCHED_GRACE, STOP_LAUNCHED_LATE, KernelTunnels


def kernel_tunnels(kernel_id: str) -> KernelTunnels:
    return KernelTunnels(kernel_id, logging.getLogger("test"), SshSettings(), TunnelSettings(), {}, lambda: 0)


def sleeper(*args: str, seconds: float = 60, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})", *args], **popen)


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


def _path_without_pidwait(tmp_path: Path) -> str:
    """A PATH with the tools the command needs, pidwait left out (a host with procps before 4)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "pgrep", "pkill", "timeout", "tail"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


@pytest.mark.parametrize("waiter", ["pidwait", "tail"])
def test_leftovers_of_a_launch_are_killed_after_the_grace_and_nothing_else(
        waiter: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kt, "LEFTOVER_GRACE", 2)
    kernel_id = str(uuid.uuid4())
    leader = sleeper("--kernel-id", kernel_id, process_group=0)  # a group of its own, as a launch gets
    group = leader.pid
    listener = sleeper("--RemoteProcessProxy.kernel-id", kernel_id, process_group=group)
    quick = sleeper("--kernel-id", kernel_id, seconds=0.5, process_group=group)
    bystanders = [sleeper(process_group=group), sleeper("--kernel-id", kernel_id)]  # no id / another group
    env = {**os.environ, "PATH": _path_without_pidwait(tmp_path)} if waiter == "tail" else None
    try:
        command = kernel_tunnels(kernel_id).leftovers_command(group)
        assert command is not None
        started = time.monotonic()
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=20, env=env)
        elapsed = time.monotonic() - started
        assert done.returncode == 0, done  # pkill killed some
        killed = sorted(int(line.rsplit("pid ", 1)[1].rstrip(")")) for line in done.stdout.splitlines())
        assert killed == sorted([leader.pid, listener.pid]), done.stdout
        assert quick.wait(5) == 0, "the process that exited by itself was not killed"
        assert 2 <= elapsed < 6, elapsed
        assert leader.wait(5) is not None and listener.wait(5) is not None
        assert all(proc.poll() is None for proc in bystanders)
        again = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=20, env=env)
        assert (again.returncode, again.stdout) == (1, ""), again  # nothing of the launch left: no wait
    finally:
        for proc in [leader, listener, quick, *bystanders]:
            proc.kill()
            proc.wait(5)


def test_leftovers_need_a_group_and_a_plain_id() -> None:
    assert kernel_tunnels(str(uuid.uuid4())).leftovers_command(0) is None
    assert kernel_tunnels("$(id)").leftovers_command(1234) is None
