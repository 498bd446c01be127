"""pytest fixtures around the test harness (tests/harness/): real OpenSSH servers, TCP services, and
remote hosts in network namespaces. Tests that need a namespace skip, saying why, where one cannot be
created (not root, no iproute2, no CAP_SYS_ADMIN); as root on Linux they always run.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator

import pytest

import harness

# Tests using these fixtures get the netns marker, so `-m "not netns"` leaves them out.
NETNS_FIXTURES = frozenset({"netns_host", "remote_host"})
LOG_TAIL_LINES = 80


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if NETNS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.netns)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    # A failing SSH test is mostly explained by the server's side of the story; attach it.
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    servers: list[harness.SshServer] = []
    if isinstance(funcargs.get("sshd"), harness.SshServer):
        servers.append(funcargs["sshd"])
    servers += getattr(funcargs.get("sshd_factory"), "servers", [])
    for name in NETNS_FIXTURES:
        if isinstance(funcargs.get(name), harness.RemoteHost):
            servers += funcargs[name].ssh_servers
    for server in dict.fromkeys(servers):
        tail = "\n".join(server.log_text().splitlines()[-LOG_TAIL_LINES:])
        report.sections.append((f"sshd log {server.host}:{server.port} (last {LOG_TAIL_LINES} lines)", tail))


@pytest.fixture(autouse=True, scope="session")
def _no_stale_shell_lock() -> Iterator[None]:
    """A shell start-up lock left by a killed session would stall every later remote command (see
    harness.clear_stale_shell_lock). Sessions are killed in the middle of tests too (a launch that times
    out is killed with its process group), so the lock is looked at throughout the run, not just
    between tests."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(2.0):
            harness.clear_stale_shell_lock()

    harness.clear_stale_shell_lock()
    watcher = threading.Thread(target=watch, name="stale-shell-lock", daemon=True)
    watcher.start()
    yield
    stop.set()
    watcher.join()


@pytest.fixture(autouse=True)
def _fresh_log_levels() -> Iterator[None]:
    """egtunnel caches its loggers' levels; a test that sets them (caplog.set_level) does so before
    its first record, so forgetting the cache at the start of each test makes the new level count."""
    try:
        import egtunnel
    except ImportError:
        yield
        return
    egtunnel.refresh_log_levels()
    yield
    egtunnel.refresh_log_levels()


def _require_sshd() -> None:
    reason = harness.sshd_unavailable_reason()
    if reason:
        pytest.skip(reason)


def _require_netns() -> None:
    reason = harness.netns_unavailable_reason()
    if reason:
        pytest.skip(f"remote-host test: {reason}")


@pytest.fixture
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.SshServer]:
    """A running OpenSSH server on 127.0.0.1 and a free port; files (and log) kept under pytest's tmp."""
    _require_sshd()
    with harness.SshServer(workdir=tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def sshd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., harness.SshServer]]:
    """make(**SshServer kwargs) -> a started SshServer; all of them are stopped at teardown."""
    _require_sshd()
    servers: list[harness.SshServer] = []

    def make(**kwargs: object) -> harness.SshServer:
        kwargs.setdefault("workdir", tmp_path_factory.mktemp("sshd"))
        server = harness.SshServer(**kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server.start()

    make.servers = servers  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for server in reversed(servers):
            server.close()


@pytest.fixture
def echo_server() -> Iterator[harness.EchoServer]:
    """An echo server process on 127.0.0.1 and a free port."""
    with harness.EchoServer() as server:
        yield server


@pytest.fixture
def netns_host() -> Iterator[harness.RemoteHost]:
    """A bare RemoteHost (namespace + veth, nothing running in it)."""
    _require_netns()
    with harness.RemoteHost() as host:
        yield host


@pytest.fixture
def remote_host(netns_host: harness.RemoteHost, tmp_path_factory: pytest.TempPathFactory) -> harness.RemoteHost:
    """A RemoteHost with .sshd (an SshServer on its address) and .echo (an echo server on its address)."""
    _require_sshd()
    netns_host.ssh_server(workdir=tmp_path_factory.mktemp("remote-sshd"))
    netns_host.echo_server()
    return netns_host
