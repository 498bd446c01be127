"""The remote forward back to the gateway: a listener on the kernel host's loopback whose connections
reach the gateway's response port over the host's pooled SSH connection, so a host with no route to the
gateway can still send its connection info."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time

import pytest

import egtunnel
import harness
from egtunnel.config import SshSettings, TunnelSettings
from egtunnel.kernel_tunnels import KernelTunnels


def target(server: harness.SshServer, **kw: object) -> egtunnel.SshTarget:
    args = {k: v for k, v in server.connect_kwargs().items() if k != "host"}
    return egtunnel.SshTarget(server.host, **{**args, **kw})


class ResponsePort:
    """A stand-in for the gateway's response port: records what each connection sent, answers b"ok"."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.arrived = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                conn.sendall(b"ok")
            self.received.append(data)
            self.arrived.set()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def response_port():
    port = ResponsePort()
    yield port
    port.close()


SEND = (
    "python3 -c \"import socket,sys; s=socket.create_connection(('127.0.0.1',{port}),timeout=10); "
    "s.sendall(sys.argv[1].encode()); s.shutdown(socket.SHUT_WR); print(s.recv(100).decode())\" {payload}"
)


def listening(host: harness.RemoteHost) -> list[str]:
    out = host.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines()]


def test_connection_info_reaches_the_gateway_from_a_host_without_a_route_to_it(remote_host: harness.RemoteHost,
                                                                                response_port: ResponsePort) -> None:
    # The response port listens on the gateway's loopback, which the host's namespace cannot reach at
    # all: only the remote forward carries the bytes.
    t = target(remote_host.sshd).responding_to(f"127.0.0.1:{response_port.port}")
    assert t.respond_to == f"127.0.0.1:{response_port.port}"
    forward = t.response_forward(10)
    try:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", forward.address) and forward.port > 0
        # Bound on the host's loopback, nowhere else.
        assert f"127.0.0.1:{forward.port}" in listening(remote_host)
        assert not [a for a in listening(remote_host) if a.endswith(f":{forward.port}") and not a.startswith("127.0.0.1:")]
        direct = remote_host.run(["python3", "-c", f"import socket; socket.create_connection(('127.0.0.1', {response_port.port}), timeout=2)"],
                                 capture_output=True)
        assert direct.returncode != 0  # no route to the gateway's port except the forward
        out = t.exec(SEND.format(port=forward.port, payload="connection-info-1"), 20)
        assert out.exit_status == 0, out.stderr
        assert out.stdout.decode().strip() == "ok"
        assert response_port.received == [b"connection-info-1"]
        # A second start on the same host shares the listener and the connection.
        again = t.response_forward(10)
        assert again.port == forward.port
        mine = [c for c in egtunnel.status() if c["host"] == remote_host.sshd.host and c["port"] == remote_host.sshd.port]
        assert [(c["users"], c["remote_forward"]) for c in mine] == [(2, forward.port)]
        again.close()
        assert len([c for c in egtunnel.status() if c["host"] == remote_host.sshd.host and c["port"] == remote_host.sshd.port]) == 1
    finally:
        forward.close()
        forward.close()  # idempotent


def test_the_listener_comes_back_on_the_same_port_after_a_reconnect(remote_host: harness.RemoteHost,
                                                                     response_port: ResponsePort) -> None:
    t = target(remote_host.sshd).responding_to(f"127.0.0.1:{response_port.port}")
    forward = t.response_forward(10)
    try:
        port = forward.port
        remote_host.sshd.kill_sessions()
        # The same connection comes back (a start while it is down would get a connection of its own).
        mine = lambda: [c for c in egtunnel.status() if c["host"] == remote_host.sshd.host and c["port"] == remote_host.sshd.port]
        harness.wait_until(lambda: any(c["reconnects"] >= 1 and c["state"] == "connected" for c in mine()), 20)
        again = t.response_forward(5)
        assert again.port == port
        again.close()
        out = t.exec(SEND.format(port=port, payload="after-reconnect"), 20)
        assert out.stdout.decode().strip() == "ok", out.stderr
        assert response_port.received[-1] == b"after-reconnect"
    finally:
        forward.close()


def test_a_server_that_refuses_remote_forwarding_says_so(sshd_factory, response_port: ResponsePort) -> None:
    # Local forwarding only, a setting operators use: remote forwarding is refused.
    server = sshd_factory(extra_config=["AllowTcpForwarding local"])
    t = target(server).responding_to(f"127.0.0.1:{response_port.port}")
    with pytest.raises(egtunnel.ForwardingProhibited) as err:
        t.response_forward(10)
    message = str(err.value)
    assert server.host in message and "remote forward" in message and "response: direct" in message
    # The connection itself still serves commands.
    assert t.exec("echo fine", 10).stdout.decode().strip() == "fine"


def test_bad_addresses_are_refused_before_any_network(sshd: harness.SshServer) -> None:
    base = target(sshd)
    for bad in ["gateway.example:8877", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999"]:
        with pytest.raises(ValueError, match="respond_to"):
            base.responding_to(bad)
    assert base.responding_to("").respond_to is None
    with pytest.raises(ValueError, match="no respond_to"):
        base.response_forward(5)
    assert sshd.log_count("Connection from") == 0


# -- KernelTunnels: the proxies' choice between SSH and the direct address ---------------------------


def kernel_tunnels(server: harness.SshServer, response: str, respond_to: str) -> KernelTunnels:
    kw = server.connect_kwargs()
    ssh = SshSettings(port=kw["port"], user=kw["user"], identity_file=kw["identity_file"], known_hosts=kw["known_hosts"])
    tunnels = KernelTunnels("k-response", logging.getLogger("egtunnel.test.response"), ssh,
                            TunnelSettings(response=response), {}, lambda: 0)  # fmt: skip
    tunnels.respond_to = respond_to
    return tunnels


def test_the_kernel_gets_the_remote_forward_when_the_server_allows_it(sshd: harness.SshServer,
                                                                       response_port: ResponsePort) -> None:
    tunnels = kernel_tunnels(sshd, "auto", f"127.0.0.1:{response_port.port}")
    forward = asyncio.run(tunnels.response_forward(sshd.host))
    try:
        assert forward is not None and forward.address.startswith("127.0.0.1:")
        assert tunnels.target(sshd.host).respond_to == f"127.0.0.1:{response_port.port}"
    finally:
        forward.close()


@pytest.mark.parametrize(
    ("setting", "why"),
    [
        # sshd binds remote forwards on every address whatever the client asks: the host would expose it.
        ("GatewayPorts yes", "GatewayPorts yes"),
        # Remote forwarding refused outright.
        ("AllowTcpForwarding local", "remote forward"),
    ],
)
def test_auto_falls_back_to_the_direct_address_with_one_warning_and_ssh_refuses(
        sshd_factory, response_port: ResponsePort, caplog: pytest.LogCaptureFixture, setting: str, why: str) -> None:
    server = sshd_factory(extra_config=[setting])
    caplog.set_level(logging.WARNING, logger="egtunnel.test.response")
    auto = kernel_tunnels(server, "auto", f"127.0.0.1:{response_port.port}")
    assert asyncio.run(auto.response_forward(server.host)) is None
    assert asyncio.run(auto.response_forward(server.host)) is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "egtunnel.test.response"]
    assert len(warnings) == 1, warnings
    assert why in warnings[0] and f"127.0.0.1:{response_port.port}" in warnings[0] and "directly" in warnings[0]
    strict = kernel_tunnels(server, "ssh", f"127.0.0.1:{response_port.port}")
    with pytest.raises(egtunnel.ForwardingProhibited, match=why):
        asyncio.run(strict.response_forward(server.host))
    # Whatever the choice, no hold on the connection is left behind.
    harness.wait_until(lambda: not [c for c in egtunnel.status() if c["port"] == server.port and c["users"]], 10)
