"""Fixtures for the end-to-end tests: remote hosts in network namespaces with real sshd, and real
Enterprise Gateway 3.3 server processes whose kernels run on those hosts.

Hosts (session-wide, each its own namespace, sshd and 10.213.N.0/24):
  a  the kernels' host: the gateway's keys are authorized, its host key is in both known_hosts files.
  b  authorizes the gateway's keys, but its host key is absent from EG_SSH_KNOWN_HOSTS.
  c  its host key is known, but it authorizes none of the gateway's keys.
EG's own paramiko path (HOME/.ssh, used by the comparisons) has a second key, authorized on a and b,
and a known_hosts naming all three hosts, so that what fails on b and c is egtunnel's native SSH.
On demand (session-wide too): d, like a but its sshd says `AllowTcpForwarding no`.

After every test and every module, kernels left behind fail that test or module by name and are removed
(see "leftovers" below), so that one leak does not fail the tests that come after it.

The main gateway (session-wide) tunnels, culls after 300 s and has these kernelspecs, all written by
`python -m egtunnel kernelspec install`:
  egt            egtunnel.DistributedProcessProxy (shared connections, the default)
  egt-perport    the same with tunnel_mode per-port
  egt-notunnel   the same with tunneling off: the floor every tunneled number is compared with
  egt-badmargin  keepalive_margin "abc": every start must fail with 500
  eg             EG's own DistributedProcessProxy, same launcher argv
"""

from __future__ import annotations

import _thread
import faulthandler
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Optional

import pytest
import requests

import harness
from harness import procs

from .gateway import EG_PROXY, Gateway, GatewayConfig, KernelSpecDef, live_gateways
from .kernel_client import GatewayClient
from .support import kernel_side_procs

MAIN_SPECS = [
    KernelSpecDef("egt"),
    KernelSpecDef("egt-perport", config={"tunnel_mode": "per-port"}),
    KernelSpecDef("egt-notunnel", config={"tunneling": False}),
    KernelSpecDef("egt-badmargin", config={"keepalive_margin": "abc"}),
    KernelSpecDef("eg", class_name=EG_PROXY),
]
CULL_IDLE_TIMEOUT = 300
# Where `make eg-launcher` puts EG's own launcher.
EG_LAUNCHER = Path(__file__).resolve().parents[2] / ".venv" / "eg-launchers" / "launch_ipykernel.py"
# The slowest test takes about 30 s; its module fixture (20 sequential kernels) as long again.
TEST_BUDGET_SECONDS = 240
LOG_TAIL_CHARS = 20000
SSHD_LOG_TAIL_LINES = 60

_active_gateways: list[Gateway] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.netns)


@pytest.fixture(autouse=True)
def _gateway_log_offsets(request: pytest.FixtureRequest) -> Iterator[None]:
    # Remember where each gateway's log stood, so a failure shows only this test's part of it.
    request.node._gateway_log_offsets = {id(g): g.log_size() for g in _active_gateways}
    yield


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    """Every wait in these tests is bounded; should one still hang, print where every thread is and
    interrupt the run, so that the fixtures stop what they started instead of a CI timeout killing all."""
    faulthandler.dump_traceback_later(TEST_BUDGET_SECONDS, exit=False)
    timer = threading.Timer(TEST_BUDGET_SECONDS + 5, _thread.interrupt_main)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()


# -- leftovers ------------------------------------------------------------------------------------
#
# A kernel left running by one test must fail that test, not the later ones that look at the same host.
# After every test: a kernel a gateway holds that it did not hold when the test began is the test's and
# is deleted; then, as after every module (whose fixtures may keep kernels across its tests), the
# processes of kernels that no live gateway holds must be gone from every namespace host. What stays
# fails that test (or module) by name and is killed, so that the next test starts clean.

# How long a deleted kernel may take to go: EG's shutdown request, the launcher's grace for a kernel that
# does not stop on its own (5 s, then SIGTERM and 2 s more), and a loaded 2-core machine.
LEFTOVER_GRACE = 20.0
_KERNEL_ID_ARG = re.compile(r"kernel-id[ =]([0-9A-Za-z_-]+)")
# Launchers and kernels that did not get the id in their arguments (ipykernel started some other way).
_KERNEL_MARKERS = ("egtunnel.launcher", "launch_ipykernel", "ipykernel")


@dataclass(frozen=True)
class Stray:
    host: harness.RemoteHost
    proc: procs.Proc
    kernel_id: Optional[str]

    def __str__(self) -> str:
        return (f"kernel {self.kernel_id or '(no id)'} on {self.host.name} ({self.host.address}): "
                f"pid {self.proc.pid} {self.proc.cmdline[:160]}")


def _held_kernels() -> Optional[dict[str, Gateway]]:
    """The kernels every live gateway still holds, by id; None when one does not answer.

    Read from the gateway's kernel manager (gateway_app.py's /egtunnel/status) rather than GET
    /api/kernels, which EG answers with 403 unless EG_LIST_KERNELS is set."""
    held: dict[str, Gateway] = {}
    for gw in live_gateways():
        try:
            response = requests.get(gw.url + "/egtunnel/status", timeout=10)
            response.raise_for_status()
        except requests.RequestException:
            return None
        held.update((kernel_id, gw) for kernel_id in response.json()["kernels"])
    return held


def _listed_kernels() -> Optional[set[str]]:
    held = _held_kernels()
    return None if held is None else set(held)


def check_no_kernels_left_held(who: str, before: set[str]) -> None:
    """Kernels a gateway holds now that it did not hold when `who` began were started by it (wider
    fixtures are set up before) and left running: deleted through their gateway, then named."""
    held = _held_kernels() or {}
    left = {kernel_id: gw for kernel_id, gw in held.items() if kernel_id not in before}
    if not left:
        return
    for kernel_id, gw in left.items():
        try:
            requests.delete(f"{gw.url}/api/kernels/{kernel_id}", timeout=30)
        except requests.RequestException:
            pass  # the process check that follows names and kills what stays
    pytest.fail(f"{who} left kernels running in their gateways (deleted now): "
                + ", ".join(f"{kernel_id} in {gw.workdir.name}" for kernel_id, gw in left.items()), pytrace=False)


def stray_kernels() -> list[Stray]:
    """Processes of kernels on the namespace hosts that no live gateway lists.

    A process counts as a kernel's when its arguments, or an ancestor's, carry `kernel-id ID` (both
    launchers, EG's forked listener, what a kernel started), or name a launcher or ipykernel. Remote
    commands in flight (below an sshd session: launches, polls) are the gateways' business, not kernels.
    Kernels of a revived session keep their old response address, so ownership goes by id, not address.
    """
    live = harness.live_hosts()
    if not live:
        return []
    listed = _listed_kernels()
    if listed is None:
        return []  # a gateway that does not answer cannot say which kernels are its own
    everything = {p.pid: p for p in procs.all_procs()}
    out = []
    for host in live:
        for p in kernel_side_procs(host):
            chain = _ancestors(p, everything)
            if any(a.comm == "sshd" for a in chain):
                continue
            kernel_id = next((m.group(1) for q in (p, *chain) if (m := _KERNEL_ID_ARG.search(q.cmdline))), None)
            if kernel_id is None and not any(marker in p.cmdline for marker in _KERNEL_MARKERS):
                continue
            if kernel_id is None or kernel_id not in listed:
                out.append(Stray(host, p, kernel_id))
    return out


def _ancestors(p: procs.Proc, everything: dict[int, procs.Proc]) -> list[procs.Proc]:
    chain = []
    parent = everything.get(p.ppid)
    while parent is not None and parent.pid > 1 and len(chain) < 64:
        chain.append(parent)
        parent = everything.get(parent.ppid)
    return chain


def check_no_stray_kernels(who: str, before: frozenset[tuple[int, int]] = frozenset(),
                           grace: float = LEFTOVER_GRACE) -> None:
    """Waits up to `grace` seconds for stray kernel processes to go; kills and names those that stay.

    `before` holds (pid, start) of strays already there when `who` began: named as left by a fixture
    set up before it, so that the failure points at the right place.
    """
    try:
        harness.wait_until(lambda: not stray_kernels(), grace, interval=0.5)
        return
    except TimeoutError:
        pass
    stayed = stray_kernels()
    if not stayed:
        return
    for stray in stayed:
        procs.kill_procs([stray.proc, *procs.descendants(stray.proc.pid)])
    mine = [s for s in stayed if (s.proc.pid, s.proc.start) not in before]
    earlier = [s for s in stayed if (s.proc.pid, s.proc.start) in before]
    lines = [f"{who} left kernel processes that no gateway lists, still running {grace:.0f} s "
             f"after it ended (killed now):"]
    lines += [f"  {s}" for s in mine]
    if earlier:
        lines.append("and these were already there when it began (left by a fixture set up before it):")
        lines += [f"  {s}" for s in earlier]
    pytest.fail("\n".join(lines), pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def _no_stray_kernels_after_module(request: pytest.FixtureRequest) -> Iterator[None]:
    # Set up before the module's own fixtures, so torn down after them: what they kept across the
    # module's tests is checked once they have deleted it.
    yield
    check_no_stray_kernels(f"module {request.node.nodeid}")


@pytest.fixture(autouse=True)
def _no_stray_kernels_after_test(request: pytest.FixtureRequest) -> Iterator[None]:
    # Set up after the module and session fixtures the test uses and torn down after its other
    # function fixtures (a client deleting its kernels): what the gateways hold now and did not hold
    # before is this test's, and what wider fixtures hold is theirs.
    who = f"test {request.node.nodeid}"
    held = _listed_kernels() or set()
    before = frozenset((s.proc.pid, s.proc.start) for s in stray_kernels())
    yield
    try:
        check_no_kernels_left_held(who, held)
    finally:
        check_no_stray_kernels(who, before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed or report.when == "teardown":
        return
    offsets = getattr(item, "_gateway_log_offsets", {})
    funcargs = getattr(item, "funcargs", {})

    def gateway_sections(gw: Gateway) -> None:
        kernel_logs = gw.kernel_logs()
        if kernel_logs:
            report.sections.append((f"kernel logs {gw.workdir.name}", kernel_logs[-LOG_TAIL_CHARS:]))
        text = gw.log_text(since=offsets.get(id(gw), 0))
        report.sections.append((f"gateway log {gw.workdir.name} (this test, last {LOG_TAIL_CHARS} chars)",
                                text[-LOG_TAIL_CHARS:]))

    # The test's own gateways come last: a long report is cut in its middle, and its end stays read.
    used = {id(v) for v in funcargs.values() if isinstance(v, Gateway)}
    for gw in [g for g in _active_gateways if id(g) not in used]:
        gateway_sections(gw)
    hosts: list[tuple[str, harness.RemoteHost]] = []
    e2e = funcargs.get("e2e_hosts")
    if isinstance(e2e, E2EHosts):
        hosts += [("a", e2e.a), ("b", e2e.b), ("c", e2e.c)]
    # Hosts a test made for itself (a module fixture) tell the server's side of its own failure.
    hosts += [(name, v) for name, v in funcargs.items() if isinstance(v, harness.RemoteHost)]
    for name, host in hosts:
        if host.sshd is not None:
            tail = "\n".join(host.sshd.log_text().splitlines()[-SSHD_LOG_TAIL_LINES:])
            report.sections.append((f"sshd log of host {name} {host.address} (last lines)", tail))
    for gw in [g for g in _active_gateways if id(g) in used]:
        gateway_sections(gw)


# -- hosts ----------------------------------------------------------------------------------------


@dataclass
class E2EHosts:
    a: harness.RemoteHost
    b: harness.RemoteHost
    c: harness.RemoteHost
    identity_file: Path          # EG_SSH_IDENTITY_FILE: authorized on a and b
    paramiko_identity_file: Path  # HOME/.ssh/id_ed25519 for EG's own paramiko path: on a and b too
    known_hosts: Path            # EG_SSH_KNOWN_HOSTS: a and c
    paramiko_known_hosts: Path   # HOME/.ssh/known_hosts: a, b and c
    workdir: Path

    def all(self) -> list[harness.RemoteHost]:
        return [self.a, self.b, self.c]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "egtunnel-e2e", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return path


@pytest.fixture(scope="session")
def e2e_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EHosts]:
    for reason in (harness.netns_unavailable_reason(), harness.sshd_unavailable_reason()):
        if reason:
            pytest.skip(f"end-to-end test: {reason}")
    workdir = tmp_path_factory.mktemp("e2e-keys")
    identity = _keygen(workdir / "id_gateway")
    paramiko_identity = _keygen(workdir / "id_paramiko")
    made: list[harness.RemoteHost] = []
    try:
        port = None
        for name in ("a", "b", "c"):
            host = harness.RemoteHost().start()
            made.append(host)
            # One port everywhere, as in a real cluster: EG_SSH_PORT is a single gateway-wide setting.
            host.ssh_server(workdir=tmp_path_factory.mktemp(f"sshd-{name}"), port=port)
            port = host.sshd.port
        a, b, c = made
        for host in made:
            # Reach the response address on a's veth from b and c too: the gateway binds it there, and a
            # launcher that got that far must be able to report rather than hang until the launch timeout.
            if host is not a:
                host.run(["ip", "route", "add", f"{a.gateway_address}/32", "via", host.gateway_address],
                         check=True, capture_output=True)
            if host is not c:  # c keeps authorizing only its own fixture key, which the gateway lacks
                keys = [identity, paramiko_identity]
                host.sshd.authorized_keys.write_text("".join(Path(f"{k}.pub").read_text() for k in keys))
        known = workdir / "known_hosts"
        known.write_text(a.sshd.known_hosts_line() + c.sshd.known_hosts_line())
        paramiko_known = workdir / "known_hosts.paramiko"
        paramiko_known.write_text("".join(h.sshd.known_hosts_line() for h in made))
        yield E2EHosts(a=a, b=b, c=c, identity_file=identity, paramiko_identity_file=paramiko_identity,
                       known_hosts=known, paramiko_known_hosts=paramiko_known, workdir=workdir)
    finally:
        for host in reversed(made):
            host.close()


@pytest.fixture(scope="session")
def no_forwarding_host(e2e_hosts: E2EHosts, tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[harness.RemoteHost]:
    """Host d: like a, but its sshd says `AllowTcpForwarding no` (a common hardening)."""
    host = harness.RemoteHost().start()
    try:
        host.ssh_server(workdir=tmp_path_factory.mktemp("sshd-d"), port=e2e_hosts.a.sshd.port,
                        extra_config=["AllowTcpForwarding no"])  # fmt: skip
        host.run(["ip", "route", "add", f"{e2e_hosts.a.gateway_address}/32", "via", host.gateway_address],
                 check=True, capture_output=True)  # fmt: skip
        host.sshd.authorized_keys.write_text(Path(f"{e2e_hosts.identity_file}.pub").read_text())
        with e2e_hosts.known_hosts.open("a") as f:
            f.write(host.sshd.known_hosts_line())
        yield host
    finally:
        host.close()


# -- gateways -------------------------------------------------------------------------------------


def gateway_config(h: E2EHosts, **overrides: object) -> GatewayConfig:
    cfg = GatewayConfig(
        remote_hosts=[h.a.address],
        ssh_port=h.a.sshd.port,
        response_ip=h.a.gateway_address,
        identity_file=h.identity_file,
        paramiko_identity_file=h.paramiko_identity_file,
        known_hosts=h.known_hosts,
        paramiko_known_hosts=h.paramiko_known_hosts,
        remote_user=h.a.sshd.user,
        tunneling=True,
        cull_idle_timeout=CULL_IDLE_TIMEOUT,
        kernelspecs=list(MAIN_SPECS),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    # The harness's ownership mark: should this test process die without cleaning up, the next run
    # reaps the gateway and, since EG exports its environment into remote launches, the kernels it
    # started.
    cfg.env = {harness.OWNER_ENV: f"{os.getpid()}:e2e-gateway", **cfg.env}
    return cfg


@pytest.fixture(scope="session")
def gateway_factory(e2e_hosts: E2EHosts, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[Callable[..., Gateway]]:
    """make(name, python=..., **GatewayConfig overrides) -> a started gateway, stopped at the end of the
    session (or earlier by the test calling stop()). `python` runs the gateway, the kernelspec installer
    and the kernels (default: this interpreter)."""
    started: list[Gateway] = []

    def make(name: str, python: str = sys.executable, **overrides: object) -> Gateway:
        gw = Gateway(tmp_path_factory.mktemp(f"gateway-{name}"), gateway_config(e2e_hosts, **overrides),
                     python=python)
        started.append(gw)
        _active_gateways.append(gw)
        gw.start()
        return gw

    try:
        yield make
    finally:
        for gw in reversed(started):
            stop_gateway(gw, e2e_hosts)


def stop_gateway(gw: Gateway, h: E2EHosts) -> None:
    try:
        gw.stop()
    finally:
        if gw in _active_gateways:
            _active_gateways.remove(gw)
        # A kernel the gateway failed to stop still carries the gateway's response address in its argv.
        if gw.response_port:
            marker = f"{gw.config.response_ip}:{gw.response_port}"
            for host in h.all():
                procs.kill_procs(p for p in procs.netns_procs(host.name) if marker in p.cmdline)


@pytest.fixture(scope="session")
def gateway(gateway_factory: Callable[..., Gateway]) -> Gateway:
    gw = gateway_factory("main")
    warm_up(gw)
    return gw


def warm_up(gw: Gateway) -> None:
    """One kernel start and stop: the response socket, thread pools and the native runtime exist
    from then on, so later baselines measure the kernels, not the gateway's first use."""
    client = gw.client()
    try:
        kernel = client.start_kernel("egt")
        assert kernel.execute("1 + 1").result == "2"
        kernel.delete()
    finally:
        client.close()


@pytest.fixture(scope="session")
def eg_launcher() -> Path:
    """EG 3.3's own launch_ipykernel.py, which EG's wheel leaves out: `make eg-launcher` fetches it from EG's
    source distribution (EGTUNNEL_EG_LAUNCHER may name another copy)."""
    path = Path(os.environ.get("EGTUNNEL_EG_LAUNCHER") or EG_LAUNCHER)
    if not path.is_file():
        pytest.skip(f"EG's launch_ipykernel.py is not at {path}: run `make eg-launcher`")
    return path


@pytest.fixture
def client(gateway: Gateway) -> Iterator[GatewayClient]:
    """A client of the main gateway; kernels it started and the test left running are deleted after."""
    c = gateway.client()
    try:
        yield c
    finally:
        c.close()
