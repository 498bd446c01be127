"""SshTarget: a kernel's forwards in one all-or-nothing call, and remote commands and comm-port requests
as asyncio awaitables driven by egtunnel's runtime (no Python thread per call)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time

import pytest

import egtunnel
import harness
from harness import procs

CHANNELS = ["SHELL", "IOPUB", "STDIN", "HB", "CONTROL"]


def target(server: harness.SshServer, **kw: object) -> egtunnel.SshTarget:
    args = {k: v for k, v in server.connect_kwargs().items() if k != "host"}
    return egtunnel.SshTarget(server.host, **{**args, **kw})


def conn_status(server: harness.SshServer) -> list[dict]:
    return [c for c in egtunnel.status() if c["port"] == server.port and c["host"] == server.host]


def python_threads() -> int:
    return threading.active_count()


@pytest.mark.parametrize("mode", ["shared", "per-port"])
def test_open_forwards_opens_all_in_order_within_the_port_range(sshd: harness.SshServer, echo_server: harness.EchoServer,
                                                                mode: str) -> None:  # fmt: skip
    lo = harness.free_port()
    hi = min(lo + 200, 65535)
    t = target(sshd)
    tunnels = t.open_forwards([(ch, "127.0.0.1", echo_server.port) for ch in CHANNELS], port_range=(lo, hi),
                              mode=mode, cull_idle_timeout=300, kernel_id="k1")  # fmt: skip
    try:
        assert [x.channel for x in tunnels] == CHANNELS
        assert all(lo <= x.local_port <= hi for x in tunnels)
        assert len({x.local_port for x in tunnels}) == len(CHANNELS)
        assert [x.keep_alive_interval for x in tunnels] == [360] * 4 + [egtunnel.MAX_KEEP_ALIVE_INTERVAL]
        for x in tunnels:
            assert harness.echo_once("127.0.0.1", x.local_port) == b"hello egtunnel\n"
        assert len(conn_status(sshd)) == (1 if mode == "shared" else len(CHANNELS))
    finally:
        for x in tunnels:
            x.terminate()


def test_ports_taken_within_the_range_are_skipped(sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:
    lo = harness.free_port()
    busy = []
    for p in range(lo, lo + 3):  # two of the four candidates are taken by someone else
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
            s.listen()
            busy.append(s)
        except OSError:
            s.close()
    try:
        free = [p for p in range(lo, lo + 6) if p not in {s.getsockname()[1] for s in busy}]
        tunnels = target(sshd).open_forwards([("SHELL", "127.0.0.1", echo_server.port), ("HB", "127.0.0.1", echo_server.port)],
                                             port_range=(lo, lo + 5), bind_attempts=20)  # fmt: skip
        try:
            assert {x.local_port for x in tunnels} <= set(free)
        finally:
            for x in tunnels:
                x.terminate()
    finally:
        for s in busy:
            s.close()


def test_failure_closes_everything_and_names_each_failed_channel(sshd_factory, echo_server: harness.EchoServer) -> None:
    # PermitOpen lets SHELL's target through and forbids the others: the set fails as one.
    other = harness.free_port()
    server = sshd_factory(extra_config=[f"PermitOpen 127.0.0.1:{echo_server.port}"])
    ports_before = procs.listening_ports(pid=os.getpid())
    with pytest.raises(egtunnel.ForwardingProhibited) as info:
        target(server).open_forwards([("SHELL", "127.0.0.1", echo_server.port), ("IOPUB", "127.0.0.1", other),
                                      ("HB", "127.0.0.1", other)], mode="shared")  # fmt: skip
    message = str(info.value)
    assert "IOPUB" in message and "HB" in message and f"127.0.0.1:{other}" in message
    assert message.startswith("forwards HB, IOPUB failed") or message.startswith("forwards IOPUB, HB failed"), message
    assert procs.listening_ports(pid=os.getpid()) <= ports_before
    harness.wait_until(lambda: conn_status(server) == [], 10, what="no connection left")


def test_bad_plans_are_refused_before_any_network(sshd: harness.SshServer) -> None:
    t = target(sshd)
    with pytest.raises(ValueError, match="appears twice"):
        t.open_forwards([("SHELL", "127.0.0.1", 1), ("SHELL", "127.0.0.1", 2)])
    with pytest.raises(ValueError, match="port_range"):
        t.open_forwards([("SHELL", "127.0.0.1", 1)], port_range=(2000, 1000))
    with pytest.raises(ValueError, match="channel"):
        t.open_forwards([("NOPE", "127.0.0.1", 1)])
    with pytest.raises(ValueError, match="at least one"):
        t.open_forwards([])
    assert sshd.log_count("Connection from") == 0


def test_awaitables_run_without_python_threads(sshd: harness.SshServer, echo_server: harness.EchoServer) -> None:
    t = target(sshd)

    async def main() -> tuple[list, int]:
        before = python_threads()
        results = await asyncio.gather(*(t.exec_async(f"echo {i}") for i in range(12)))
        tunnels = await t.open_forwards_async([(ch, "127.0.0.1", echo_server.port) for ch in CHANNELS])
        peak = python_threads() - before
        for x in tunnels:
            x.terminate()
        return [r.lines() for r in results], peak

    lines, extra_threads = asyncio.run(main())
    assert lines == [[str(i)] for i in range(12)]
    assert extra_threads == 0


def test_cancelled_open_leaves_nothing_listening(sshd_factory, echo_server: harness.EchoServer) -> None:
    server = sshd_factory()
    t = target(server)
    ports_before = procs.listening_ports(pid=os.getpid())

    async def main() -> None:
        task = asyncio.ensure_future(t.open_forwards_async([(ch, "127.0.0.1", echo_server.port) for ch in CHANNELS],
                                                           mode="per-port"))  # fmt: skip
        await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    harness.wait_until(lambda: conn_status(server) == [] and server.established_connections() == 0, 10,
                     what="every connection of the cancelled open closed")  # fmt: skip
    assert procs.listening_ports(pid=os.getpid()) <= ports_before


def test_request_awaitable_and_terminate_lets_it_finish(sshd: harness.SshServer) -> None:
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        time.sleep(0.3)  # the launcher takes its time before closing
        received.append(data)
        conn.close()

    server_thread = threading.Thread(target=serve, daemon=True)
    server_thread.start()
    tunnel = egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1", remote_port=port,
                                  channel="EG_COMM", mode="per-port")  # fmt: skip

    async def main() -> float:
        pending = asyncio.ensure_future(tunnel.request(b'{"shutdown": 1}', 10.0))
        await asyncio.sleep(0)
        started = time.monotonic()
        tunnel.terminate()  # as EG does right after sending the shutdown request
        took = time.monotonic() - started
        await pending
        return took

    took = asyncio.run(main())
    server_thread.join(10)
    listener.close()
    assert took < 0.02
    assert received == [b'{"shutdown": 1}']
    with pytest.raises(egtunnel.TunnelError, match="terminated"):
        asyncio.run(_request(tunnel))


async def _request(tunnel: egtunnel.Tunnel) -> None:
    await tunnel.request(b"{}", 1.0)


def test_request_to_a_closed_port_raises_connection_refused(sshd: harness.SshServer) -> None:
    port = harness.free_port()
    with egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1", remote_port=port) as tunnel:
        with pytest.raises(ConnectionRefusedError):
            asyncio.run(_request(tunnel))


def test_probe_answers_at_once_and_the_next_call_sees_the_answer(sshd: harness.SshServer) -> None:
    port = harness.free_port()
    with egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1", remote_port=port,
                              channel="EG_COMM") as tunnel:  # fmt: skip
        started = time.monotonic()
        assert tunnel.probe(b'{"signum": 0}') == "alive"  # nothing known yet; a probe is now out
        assert time.monotonic() - started < 0.01
        harness.wait_until(lambda: tunnel.probe(b'{"signum": 0}') == "dead", 5, what="refusal recorded")
        with harness.EchoServer(port=port):
            harness.wait_until(lambda: tunnel.probe(b'{"signum": 0}') == "alive", 5, what="listener seen again")


def test_probes_of_many_kernels_on_one_host_share_one_remote_command(sshd: harness.SshServer) -> None:
    # Twelve kernels' communication ports on one host: their probes within one window are answered by
    # one command listing the host's listening ports, not by twelve channels; a port nothing listens on
    # still gets a channel of its own, whose refusal marks it dead.
    servers = [harness.EchoServer(port=harness.free_port()) for _ in range(12)]
    tunnels = []
    try:
        for server in servers:
            server.start()
            tunnels.append(egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1",
                                                remote_port=server.port, channel="EG_COMM", mode="shared"))  # fmt: skip
        mark = os.path.getsize(sshd.log_file)
        assert {t.probe(b'{"signum": 0}') for t in tunnels} == {"alive"}
        sshd.wait_for_log("Starting session: command", 10, since=mark)
        time.sleep(0.5)  # any channel of their own would have opened by now
        assert sshd.log_count("Starting session: command", mark) == 1
        assert sshd.log_count("server_request_direct_tcpip", mark) == 0
        servers[0].stop()
        harness.wait_until(lambda: tunnels[0].probe(b'{"signum": 0}') == "dead", 10, what="refusal recorded")
        assert all(t.probe(b'{"signum": 0}') == "alive" for t in tunnels[1:])
    finally:
        for t in tunnels:
            t.terminate()
        for server in servers:
            server.stop()


def test_a_kernel_sent_a_signal_is_probed_on_its_own_channel_so_its_exit_shows_at_the_next_poll(
        sshd: harness.SshServer) -> None:  # fmt: skip
    # After a delivered request (EG kills a kernel, then polls every 0.5 s until it is gone) the
    # kernel's probes skip the host's batch, which would answer only after its 3 s window: a gateway
    # shutting down N kernels one after another would wait that long for each.
    listener = socket.create_server(("127.0.0.1", 0))
    requests: list[bytes] = []

    def serve() -> None:  # a launcher's communication port: reads a request to EOF, closes
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    requests.append(b"".join(iter(lambda: conn.recv(4096), b"")))

    threading.Thread(target=serve, daemon=True).start()
    tunnel = egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1",
                                  remote_port=listener.getsockname()[1], channel="EG_COMM", mode="shared")  # fmt: skip
    try:
        mark = os.path.getsize(sshd.log_file)
        assert tunnel.probe(b'{"signum": 0}') == "alive"
        sshd.wait_for_log("Starting session: command", 10, since=mark)  # the batch answered
        tunnel.send_background(b'{"signum": 9}', "SIGKILL for a test kernel", 5.0, None, None)
        harness.wait_until(lambda: b'{"signum": 9}' in requests, 5, what="the request delivered")
        time.sleep(0.2)  # the delivery is recorded once the channel closes
        listener.shutdown(socket.SHUT_RDWR)  # the kernel is gone (this also ends the blocked accept)
        listener.close()
        started = time.monotonic()
        while tunnel.probe(b'{"signum": 0}') != "dead":
            assert time.monotonic() - started < 2.0, "the exit showed only through the batch"
            time.sleep(0.5)
    finally:
        tunnel.terminate()
        listener.close()


def test_send_background_delivers_and_runs_the_fallback_when_the_port_cannot_take_it(
        sshd: harness.SshServer, tmp_path) -> None:  # fmt: skip
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers nor closes
    port = silent.getsockname()[1]
    marker = tmp_path / "fallback-ran"
    tunnel = egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1", remote_port=port,
                                  channel="EG_COMM")  # fmt: skip
    try:
        started = time.monotonic()
        tunnel.send_background(b'{"signum": 9}', "SIGKILL for a test kernel", 0.5, target(sshd), f"touch {marker}")
        assert time.monotonic() - started < 0.01
        harness.wait_until(marker.exists, 10, what="fallback command ran")
        with pytest.raises(ValueError, match="together"):
            tunnel.send_background(b"{}", "x", 1.0, target(sshd), None)
    finally:
        tunnel.terminate()
        silent.close()
