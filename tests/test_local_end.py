"""The local end of a kernel's forwards against a real OpenSSH server: the EG_COMM forward's port is
reserved (bound, never listening) while requests still reach the launcher's port, and a flood of local
connections to one forward is capped without harming the other forwards on the same SSH connection."""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import threading
import time
from typing import Iterator

import pytest

import egtunnel
import harness
from egtunnel.config import SshSettings, TunnelSettings
from egtunnel.kernel_tunnels import KernelTunnels

ZMQ = ["SHELL", "IOPUB", "STDIN", "HB", "CONTROL"]
# The forward's defaults (src/forward.rs).
MAX_LOCAL_CONNECTIONS = 256
FLOOD = 1000
CONNECTION_CAP_LINE = f"has {MAX_LOCAL_CONNECTIONS} local connections at once, its cap"
OPEN_CAP_LINE = "local connections waiting for a channel open, its cap"


def target(server: harness.SshServer) -> egtunnel.SshTarget:
    args = {k: v for k, v in server.connect_kwargs().items() if k != "host"}
    return egtunnel.SshTarget(server.host, **args)


class Launcher:
    """A launcher's communication port: reads each request to EOF, records it, closes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                with conn:
                    self.requests.append(b"".join(iter(lambda: conn.recv(4096), b"")))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    server = Launcher()
    yield server
    server.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def forward_status(port: int) -> dict:
    return next(f for c in egtunnel.status() for f in c["forwards"] if f["local_port"] == port)


# --- the reserved EG_COMM port -------------------------------------------------------------------


def test_the_comm_port_is_reserved_and_requests_still_reach_the_launcher(
        sshd: harness.SshServer, echo_server: harness.EchoServer, launcher: Launcher) -> None:  # fmt: skip
    forwards = [(ch, "127.0.0.1", echo_server.port) for ch in ZMQ] + [("EG_COMM", "127.0.0.1", launcher.port)]
    tunnels = target(sshd).open_forwards(forwards, kernel_id="k-reserved", reserved=["EG_COMM"])
    try:
        comm = tunnels[-1]
        assert comm.channel == "EG_COMM" and "(reserved)" in repr(comm)
        # The open proved the comm port with a liveness poll, on a channel of its own.
        assert launcher.requests == [b'{"signum": 0}']
        assert refused(comm.local_port)
        # The number stays the forward's: nobody else can bind it while the kernel lives.
        assert not harness.port_is_free(comm.local_port)
        comm.send_request(b'{"signum": 15}', timeout=5)
        assert launcher.requests[-1] == b'{"signum": 15}'
        assert comm.probe_blocking(b'{"signum": 0}') == "alive"
        assert refused(comm.local_port)
        for t in tunnels[:-1]:
            assert harness.echo_once("127.0.0.1", t.local_port) == b"hello egtunnel\n"
        assert {f["channel"]: f["reserved"] for f in map(forward_status, (t.local_port for t in tunnels))} == {
            **{ch: False for ch in ZMQ}, "EG_COMM": True}  # fmt: skip
        assert comm.stats()["connections"] == 0 and comm.stats()["bytes_out"] > 0
    finally:
        for t in tunnels:
            t.terminate()
    assert harness.port_is_free(comm.local_port)


def test_kernel_tunnels_reserve_the_comm_port_and_poll_and_signal_through_the_tunnel(
        sshd: harness.SshServer, echo_server: harness.EchoServer, launcher: Launcher) -> None:  # fmt: skip
    ssh = SshSettings(port=sshd.port, user=sshd.user, identity_file=str(sshd.identity_file),
                      known_hosts=str(sshd.known_hosts))  # fmt: skip
    store: dict = {}
    kernel = KernelTunnels("k-comm", logging.getLogger("test"), ssh, TunnelSettings(), store, lambda: 0)
    info = {"ip": "127.0.0.1", **{f"{ch.lower()}_port": echo_server.port for ch in ZMQ}, "comm_port": launcher.port}
    opened = kernel.open_blocking(kernel.layout(info, sshd.host))
    try:
        assert set(opened) == {*ZMQ, "EG_COMM"}
        assert refused(opened["EG_COMM"].local_port)
        assert harness.echo_once("127.0.0.1", opened["SHELL"].local_port) == b"hello egtunnel\n"
        kernel.request({"signum": 0})  # EG's poll: delivered, so the kernel is alive (no exception)
        kernel.request({"signum": 2})
        assert launcher.requests[-1] == b'{"signum": 2}'
        launcher.close()
        harness.wait_until(lambda: _poll_refused(kernel), 10, what="the launcher's exit seen by a poll")
    finally:
        for t in store.values():
            t.terminate()


def _poll_refused(kernel: KernelTunnels) -> bool:
    try:
        kernel.request({"signum": 0})
    except ConnectionRefusedError:
        return True
    return False


def test_reserved_must_name_channels_among_the_forwards(sshd: harness.SshServer) -> None:
    t = target(sshd)
    with pytest.raises(ValueError, match="HB, which is not among the forwards"):
        t.open_forwards([("SHELL", "127.0.0.1", 9)], reserved=["HB"])
    with pytest.raises(ValueError, match="SHELL, IOPUB"):
        t.open_forwards([("SHELL", "127.0.0.1", 9)], reserved=["COMM"])


# --- a flood of local connections ----------------------------------------------------------------


@pytest.fixture
def descriptors() -> Iterator[None]:
    """Room for the flood's client sockets and the forward's accepted ends, both in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * FLOOD
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def held(s: socket.socket) -> bool:
    """Whether the forward serves this local connection (an echo comes back) rather than closed it."""
    s.settimeout(20)
    try:
        s.sendall(b"ping\n")
        return harness.recv_exact(s, 5) == b"ping\n"
    except (ConnectionError, OSError):
        return False


def test_a_flood_is_capped_per_forward_and_the_shared_connection_keeps_serving(
        sshd: harness.SshServer, echo_server: harness.EchoServer, caplog: pytest.LogCaptureFixture,
        descriptors: None) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="egtunnel")
    flooded, other = target(sshd).open_forwards([("SHELL", "127.0.0.1", echo_server.port),
                                                 ("IOPUB", "127.0.0.1", echo_server.port)],
                                                mode="shared", kernel_id="k-flood")  # fmt: skip
    socks: list[socket.socket] = []
    try:
        assert flooded.destination == other.destination
        assert len([c for c in egtunnel.status() if c["port"] == sshd.port and c["lane"] == 0]) == 1

        def flood() -> None:
            for _ in range(FLOOD):
                socks.append(socket.create_connection(("127.0.0.1", flooded.local_port), timeout=20))

        started = time.monotonic()
        flooder = threading.Thread(target=flood)
        flooder.start()
        # The other forward carries bytes end to end while the flood arrives and while it is held.
        echoes = 0
        while flooder.is_alive() or echoes < 3:
            assert harness.echo_once("127.0.0.1", other.local_port, b"beside the flood\n") == b"beside the flood\n"
            echoes += 1
        flooder.join()
        assert len(socks) == FLOOD

        stats = harness.wait_until(lambda: (s := flooded.stats())["active_connections"] + s["rejected_connections"] == FLOOD
                                   and s, 20, what="every flood connection served or closed")  # fmt: skip
        assert stats["active_connections"] <= MAX_LOCAL_CONNECTIONS
        assert stats["rejected_connections"] >= FLOOD - MAX_LOCAL_CONNECTIONS
        served = sum(held(s) for s in socks)
        assert served == stats["active_connections"] == MAX_LOCAL_CONNECTIONS
        assert forward_status(flooded.local_port)["rejected_connections"] == stats["rejected_connections"]
        assert harness.echo_once("127.0.0.1", other.local_port) == b"hello egtunnel\n"
        flood_seconds = time.monotonic() - started

        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        capped = [m for m in warnings if CONNECTION_CAP_LINE in m]
        assert len(capped) == 1, warnings
        assert f"SHELL forward 127.0.0.1:{flooded.local_port} of kernel k-flood" in capped[0]
        assert len([m for m in warnings if OPEN_CAP_LINE in m]) <= 1, warnings
    finally:
        for s in socks:
            s.close()

    try:
        harness.wait_until(lambda: flooded.stats()["active_connections"] == 0, 20, what="the flood's connections to end")
        assert harness.echo_once("127.0.0.1", flooded.local_port, b"after the flood\n") == b"after the flood\n"
        assert flooded.stats()["connections"] == MAX_LOCAL_CONNECTIONS + 1
        assert other.is_alive() and flooded.is_alive()
    finally:
        flooded.terminate()
        other.terminate()
    print(f"flood of {FLOOD}: {flood_seconds:.2f} s")
