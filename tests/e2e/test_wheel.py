"""The portable wheel as a user installs it: `make wheel`'s output goes into a fresh virtualenv outside
the checkout together with Enterprise Gateway, and a gateway started from that virtualenv runs a kernel
on a remote host over native tunnels. Nothing here may come from the source tree: the gateway, the
kernelspec installer, the launcher and the kernel all run on the virtualenv's interpreter.

`make test` and `make wheel-test` build the wheel and name it in EGTUNNEL_WHEEL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from .conftest import E2EHosts, stop_gateway
from .gateway import Gateway, KernelSpecDef
from .support import CHANNELS, kernel_side_procs, report, wait_for

pytestmark = pytest.mark.e2e

WHEEL_ENV = "EGTUNNEL_WHEEL"
REPO = Path(__file__).resolve().parents[2]
# The gateway release the end-to-end tests are written against; the wheel's extras bring the rest
# (EG's supported range for the gateway, ipykernel and pycryptodomex for the launcher).
EG_REQUIREMENT = "jupyter_enterprise_gateway==3.3.0"
INSTALL_TIMEOUT = 600
# Variables that would put another copy of egtunnel (or another interpreter's packages) on sys.path.
LEAKY_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")


@pytest.fixture(scope="module")
def wheel() -> Path:
    value = os.environ.get(WHEEL_ENV)
    if not value:
        pytest.skip(f"{WHEEL_ENV} is not set: `make wheel-test` (or `make test`) builds the wheel and sets it")
    path = Path(value)
    assert path.is_file() and path.name.endswith(".whl"), f"{WHEEL_ENV}={value}: no such wheel"
    return path


@pytest.fixture(scope="module")
def wheel_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv under the temporary directory with the wheel and EG installed; its root."""
    venv = tmp_path_factory.mktemp("wheel-venv") / "venv"
    assert REPO not in venv.resolve().parents, f"{venv} is inside the checkout"
    env = {k: v for k, v in os.environ.items() if k not in LEAKY_ENV}
    started = time.monotonic()
    # Run from this interpreter, venv bases the new environment on the installation behind .venv.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, env=env, timeout=120)
    created = time.monotonic()
    # --no-compile: byte-compiling the whole Jupyter stack up front costs more than the few modules
    # the gateway and one kernel import.
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile",
         f"egtunnel[gateway,launcher] @ {wheel.resolve().as_uri()}", EG_REQUIREMENT],
        capture_output=True, text=True, env=env, cwd=venv.parent, timeout=INSTALL_TIMEOUT)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}{done.stderr}"
    report("wheel venv", wheel=wheel.name, venv_seconds=created - started,
           install_seconds=time.monotonic() - created)
    return venv


def _site_packages(venv: Path) -> Path:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('platlib'))"],
                         check=True, capture_output=True, text=True, timeout=60, cwd=venv.parent)
    return Path(out.stdout.strip()).resolve()


def _under(path: object, root: Path) -> bool:
    return isinstance(path, str) and root in Path(path).resolve().parents


def _mapped_native_modules(pid: int) -> set[str]:
    """Files named egtunnel's native module that process pid has mapped."""
    with open(f"/proc/{pid}/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f
                if len(line.split(None, 5)) == 6 and "/egtunnel/_native" in line}


def test_gateway_runs_a_kernel_from_the_installed_wheel(
        wheel_venv: Path, gateway_factory: Callable[..., Gateway], e2e_hosts: E2EHosts) -> None:
    python = str(wheel_venv / "bin" / "python")
    site = _site_packages(wheel_venv)
    started = time.monotonic()
    # The virtualenv's bin first on PATH, as for a user who activated it; the kernelspec is written
    # by the virtualenv's own `python -m egtunnel kernelspec install`.
    gateway = gateway_factory("wheel", python=python, kernelspecs=[KernelSpecDef("egt-wheel")],
                              env={"PATH": f"{wheel_venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"})
    client = gateway.client()
    try:
        kernel = client.start_kernel("egt-wheel")
        cell = kernel.execute("import sys, egtunnel\nprint(6 * 7)\nprint(sys.prefix)\nprint(egtunnel.__file__)")
        assert cell.status == "ok", cell
        answer, prefix, package = cell.stdout.splitlines()
        assert answer == "42"
        # The kernel on the remote host runs on the virtualenv's interpreter and sees its egtunnel.
        assert Path(prefix).resolve() == wheel_venv.resolve(), cell.stdout
        assert _under(package, site), cell.stdout

        status = gateway.status()
        proxy = status["kernels"][kernel.id]
        assert proxy["class"] == "egtunnel.proxy.DistributedProcessProxy"
        tunnels = proxy["tunnels"]
        assert set(tunnels) == set(CHANNELS), tunnels
        assert all(t.get("is_alive") is True for t in tunnels.values()), tunnels
        assert {c["host"] for c in status["connections"]} == {e2e_hosts.a.address}, status["connections"]

        # The gateway took egtunnel, Python and native parts alike, from the virtualenv, not the checkout.
        imported = status["imported"]
        assert Path(imported["prefix"]).resolve() == wheel_venv.resolve(), imported
        for name, path in imported["files"].items():
            assert _under(path, site), (name, imported)
            assert not _under(path, REPO), (name, imported)
        mapped = _mapped_native_modules(gateway.pid)
        assert mapped and all(_under(p, site) for p in mapped), mapped

        assert gateway.ssh_children() == []
        delete_seconds = kernel.delete()
        assert kernel.id not in gateway.status()["kernels"]
        assert gateway.ssh_children() == []
        wait_for(lambda: not kernel_side_procs(e2e_hosts.a), 10, what="nothing left on the remote host")
    finally:
        client.close()
        stop_gateway(gateway, e2e_hosts)
    report("wheel smoke", start_seconds=kernel.start_seconds, cell_seconds=cell.seconds,
           delete_seconds=delete_seconds, total_seconds=time.monotonic() - started)
