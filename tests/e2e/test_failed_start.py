"""A start that fails after the launch command went out leaves nothing of that kernel on its host, within
EG's launch timeout plus 10 s, with egtunnel's launcher and with EG's own launch_ipykernel.py.

Three failures, all after the launcher runs on the host: the host's sshd forbids forwarding (the
launcher reported; the forwards are refused); EG's launch timeout passes while the launcher cannot reach
the gateway's response address (dropped by the host's firewall); and the launch command itself times
out (the launcher holds the command's output open, so its pid never comes back). The host's process list
is the judge: every process whose arguments carry the kernel's id counts, whatever its pid or group.
And when the gateway itself dies between the report and its first poll, egtunnel's launcher stops its
kernel by itself.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import harness
from egtunnel import launcher as egtunnel_launcher
from egtunnel.kernel_tunnels import EXEC_TIMEOUT
from harness import procs

from .conftest import MAIN_SPECS, E2EHosts
from .gateway import Gateway, KernelSpecDef
from .kernel_client import GatewayError
from .support import report, require_native, wait_for

pytestmark = pytest.mark.e2e

# What the requirement allows after EG's launch timeout for the host to be clean.
CLEAN_MARGIN = 10.0
# Per start (the client's KERNEL_LAUNCH_TIMEOUT): short, so that the timeout case is quick, and long
# enough for a launcher to start and report on a busy 2-core machine.
LAUNCH_TIMEOUT = 8
LAUNCHERS = ["egtunnel", "eg"]


@pytest.fixture(scope="module")
def gateway(gateway_factory: Callable[..., Gateway], eg_launcher: Path) -> Gateway:
    """A gateway of its own: the timeout case blocks its response port on host a."""
    eg = [sys.executable, str(eg_launcher)]
    specs = [s for s in MAIN_SPECS if s.name == "egt"]
    specs.append(KernelSpecDef("egt-eglauncher", launcher=eg))
    # `3>&1` lands after the argv in EG's `nohup ARGV >> LOG 2>&1 & echo $!`: the launcher keeps a copy of
    # the command's stdout, so the command never ends and its pid never comes back.
    specs.append(KernelSpecDef("egt-hangs", argv_tail=["3>&1"]))
    specs.append(KernelSpecDef("egt-eglauncher-hangs", launcher=eg, argv_tail=["3>&1"]))
    # Connection info goes straight to the response port here (not over SSH): the timeout case drops it
    # on its way, and the frozen-gateway case watches it arrive in the gateway's socket.
    gw = gateway_factory("failed-start", kernelspecs=specs, env={"EG_SSH_RESPONSE": "direct"})
    require_native(gw)
    return gw


def _spec(launcher: str, variant: str = "") -> str:
    return ("egt" if launcher == "egtunnel" else "egt-eglauncher") + variant


class KernelProcesses:
    """Samples a host's process list for processes whose arguments carry one kernel id, from before the
    start request until stopped: proves the launcher ran, and when the last of them was seen."""

    def __init__(self, host: harness.RemoteHost, kernel_id: str) -> None:
        self.host = host
        self.kernel_id = kernel_id
        self._argument = re.compile(f"kernel-id[ =]{re.escape(kernel_id)}")
        self.seen: dict[int, procs.Proc] = {}
        self.last_seen = 0.0  # time.monotonic() of the last sample that found one
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> list[procs.Proc]:
        # The id as a launcher argument (both launchers, a wrapper passing it on, EG's forked listener);
        # the gateway's stop command names it only inside a pattern and is not the kernel.
        return [p for p in procs.netns_procs(self.host.name) if self._argument.search(p.cmdline)]

    def _run(self) -> None:
        while not self._stop.is_set():
            found = self.now()
            for p in found:
                self.seen.setdefault(p.pid, p)
            if found:
                self.last_seen = time.monotonic()
            self._stop.wait(0.1)

    def __enter__(self) -> "KernelProcesses":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        procs.kill_procs(self.now())  # a failed test must not leave its kernel to the next one


def _failed_start(gateway: Gateway, host: harness.RemoteHost, launcher: str, variant: str = "",
                  failure_timeout: float = LAUNCH_TIMEOUT) -> tuple[GatewayError, float, KernelProcesses]:
    """Starts a kernel that fails after launch; returns the error, the seconds from the request until a
    process of the kernel was last seen on the host (sampled every 0.1 s), and what was seen. The host
    must be clean within `failure_timeout` (the timeout that fails the start) plus CLEAN_MARGIN."""
    kernel_id = str(uuid.uuid4())
    env = {"KERNEL_ID": kernel_id, "KERNEL_REMOTE_HOST": host.address, "KERNEL_LAUNCH_TIMEOUT": str(LAUNCH_TIMEOUT)}
    client = gateway.client()
    try:
        with KernelProcesses(host, kernel_id) as watch:
            requested = time.monotonic()
            with pytest.raises(GatewayError) as failure:
                client.start_kernel(_spec(launcher, variant), env=env, timeout=120)
            failed = time.monotonic() - requested
            budget = failure_timeout + CLEAN_MARGIN
            wait_for(lambda: not watch.now(), max(0.0, requested + budget - time.monotonic()),
                     what=f"no process of kernel {kernel_id} on {host.name} within {budget:.0f} s of the request: "
                          f"{watch.now()}")  # fmt: skip
            time.sleep(0.3)  # one more sample by the watcher, which dates the end
            clean = watch.last_seen - requested
            assert watch.seen, "the launcher never ran on the host: the failure came before the launch"
            # The wait above cannot judge a failure reported after the budget: the samples can.
            assert clean <= budget, f"a process of kernel {kernel_id} ran until {clean:.1f} s after the request"
    finally:
        client.close()
    report("failed start", launcher=launcher, failed_after=failed, clean_after=clean,
           processes_seen=len(watch.seen), status=failure.value.status)
    return failure.value, clean, watch


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_refused_forwards_leave_nothing(gateway: Gateway, no_forwarding_host: harness.RemoteHost,
                                        launcher: str) -> None:
    error, _, watch = _failed_start(gateway, no_forwarding_host, launcher)
    assert error.status == 500, error
    assert "ForwardingProhibited" in error.reason, error.reason
    # The launcher reported before the forwards were tried, and EG's own launcher then forks its listener:
    # a second process with the same arguments, which EG's kill of the reported pid does not reach.
    if launcher == "eg":
        seen = watch.seen
        assert any(p.ppid in seen and seen[p.ppid].cmdline == p.cmdline for p in seen.values()), seen


@pytest.fixture
def response_dropped(gateway: Gateway, e2e_hosts: E2EHosts) -> Iterator[None]:
    """Host a's firewall drops what goes to this gateway's response port: a launcher started there runs,
    but its report hangs in connect until EG's launch timeout has passed."""
    host = e2e_hosts.a
    rule = ["OUTPUT", "-p", "tcp", "-d", gateway.config.response_ip, "--dport", str(gateway.response_port),
            "-j", "DROP"]  # fmt: skip
    host.run(["iptables", "-I", *rule], check=True, capture_output=True)
    try:
        yield
    finally:
        host.run(["iptables", "-D", *rule], check=True, capture_output=True)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launch_timeout_leaves_nothing(gateway: Gateway, e2e_hosts: E2EHosts, response_dropped: None,
                                       launcher: str) -> None:
    error, clean, _ = _failed_start(gateway, e2e_hosts.a, launcher)
    assert error.status == 500, error
    assert f"Waited too long ({float(LAUNCH_TIMEOUT)}s)" in error.reason, error.reason
    assert clean >= LAUNCH_TIMEOUT - 1, "the kernel was stopped before EG's launch timeout: not this failure"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launch_command_timeout_leaves_nothing(gateway: Gateway, e2e_hosts: E2EHosts, launcher: str) -> None:
    error, clean, watch = _failed_start(gateway, e2e_hosts.a, launcher, "-hangs", EXEC_TIMEOUT)
    assert error.status == 500, error
    assert f"timed out after {EXEC_TIMEOUT:.0f} s" in error.reason, error.reason
    # The launcher ran (and reported to nobody) while the command hung: no pid, so only its id finds it.
    assert clean >= EXEC_TIMEOUT - 1, "the kernel was gone before the launch command timed out: not this failure"


# -- a gateway that dies after the report ---------------------------------------------------------

# The client's launch timeout for this start: egtunnel's launcher waits that long plus its margin for the
# gateway's first request before it stops the kernel.
DYING_LAUNCH_TIMEOUT = 5


def test_launcher_stops_when_its_gateway_died_before_taking_the_kernel_up(
        gateway_factory: Callable[..., Gateway], e2e_hosts: E2EHosts) -> None:
    """The gateway is frozen once it has launched the kernel, before the launcher reports; the report
    lands in the frozen gateway's socket (the system completes the connection and buffers the bytes),
    and the gateway is then killed: no request ever reaches the communication port (egtunnel's proxy
    sends its first when it opens the kernel's tunnels), and nothing is left to stop the kernel from
    the gateway's side. egtunnel's launcher stops it by itself.

    Killing the gateway before the report arrives would test something else: the launcher's connect is
    refused and it stops the kernel at once, which says nothing about its take-up timeout."""
    # The report goes straight to the response port, where the frozen gateway's socket holds it.
    gw = gateway_factory("dies-after-report", kernelspecs=[s for s in MAIN_SPECS if s.name == "egt"],
                         env={"EG_SSH_RESPONSE": "direct"})
    require_native(gw)
    host = e2e_hosts.a
    kernel_id = str(uuid.uuid4())
    env = {"KERNEL_ID": kernel_id, "KERNEL_LAUNCH_TIMEOUT": str(DYING_LAUNCH_TIMEOUT)}
    kernel_log = gw.kernel_log_dir / f"kernel-{kernel_id}.log"
    client = gw.client()
    starter = threading.Thread(target=lambda: _start_ignoring_failure(client, env), daemon=True)
    with KernelProcesses(host, kernel_id) as watch:
        starter.start()
        # EG logs this once its launch command has returned, a good 0.2 s before the launcher (a fresh
        # Python importing ipykernel) can report.
        wait_for(lambda: f"ID: {kernel_id}" in gw.log_path.read_text(errors="replace"), 60,
                 interval=0.01, what="the gateway to launch the kernel")  # fmt: skip
        os.kill(gw.pid, signal.SIGSTOP)
        response_port = _response_port(gw, kernel_id)
        wait_for(lambda: _report_waiting(response_port), 60, interval=0.05,
                 what=f"the launcher's report in the frozen gateway's socket (port {response_port})")
        assert f"kernel {kernel_id}: pid" in kernel_log.read_text()
        gw.process.kill()  # type: ignore[union-attr]  # no SIGTERM: EG would shut its kernels down
        gw.process.wait(10)  # type: ignore[union-attr]
        killed = time.monotonic()
        assert watch.now(), "the kernel was not running when its gateway died"
        take_up = DYING_LAUNCH_TIMEOUT + egtunnel_launcher.TAKE_UP_MARGIN
        budget = take_up + egtunnel_launcher.SHUTDOWN_GRACE + egtunnel_launcher.TERMINATE_GRACE + CLEAN_MARGIN
        wait_for(lambda: not watch.now(), budget, interval=0.5,
                 what=f"egtunnel's launcher to stop within {budget:.0f} s of its gateway's death: {watch.now()}")
        gone = time.monotonic() - killed
    starter.join(10)
    client.rest.close()
    report("gateway died before take-up", stopped_after=gone, take_up_timeout=take_up)
    # It waited for the gateway's first request as long as it should have, counted from its report.
    assert gone >= take_up - 5, gone
    assert "take-up timeout" in kernel_log.read_text()


def _response_port(gw: Gateway, kernel_id: str) -> int:
    """The port EG bound for this kernel's connection info (it logs it before the launch)."""
    text = gw.log_path.read_text(errors="replace")
    ports = re.findall(r"bound to port (\d+) for remote kernel connection information", text)
    assert ports, f"the gateway did not log its response port for {kernel_id}"
    return int(ports[-1])


def _report_waiting(port: int) -> bool:
    """Bytes wait unread on a connection to the gateway's response port: the report has arrived."""
    out = procs.run(["ss", "-Htn", f"( sport = :{port} )"], check=False).stdout
    # Columns: state, Recv-Q, Send-Q, local, peer (`-t` without `-a` lists no listener).
    return any(len(fields) > 1 and fields[1] != "0" for fields in map(str.split, out.splitlines()))


def _start_ignoring_failure(client: Any, env: dict) -> None:
    try:
        client.start_kernel("egt", env=env, timeout=120)
    except Exception:  # noqa: BLE001 - the gateway is killed under this request on purpose
        pass
