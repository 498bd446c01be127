"""Kernel liveness polls as Enterprise Gateway makes them: on the gateway's event loop a poll answers
from the kernel's last known liveness at once while one refresh is in flight, and a host that cannot be
reached (liveness unknown) never revives a kernel known dead. The record is native: `_native.Liveness`
for polls by remote command, the EG_COMM forward's own for polls through its tunnel."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import egtunnel
import harness
from egtunnel import _native
from egtunnel.config import SshSettings, TunnelSettings
from egtunnel.kernel_tunnels import KernelTunnels


def target(server: harness.SshServer) -> egtunnel.SshTarget:
    args = {k: v for k, v in server.connect_kwargs().items() if k != "host"}
    return egtunnel.SshTarget(server.host, **args)


def kernel_tunnels(server: harness.SshServer) -> KernelTunnels:
    ssh = SshSettings(port=server.port, user=server.user, identity_file=str(server.identity_file),
                      known_hosts=str(server.known_hosts))  # fmt: skip
    return KernelTunnels("k-liveness", logging.getLogger("test"), ssh, TunnelSettings(), {}, lambda: 0)


def test_a_remote_poll_on_the_event_loop_never_waits_on_the_network(sshd: harness.SshServer) -> None:
    kernel = kernel_tunnels(sshd)

    async def polls() -> None:
        # The host's settings are resolved when a kernel starts (`ssh -G`, a local command), not by polls.
        kernel.target(sshd.host)
        mark = os.path.getsize(sshd.log_file)
        started = time.monotonic()
        # The answer takes a connection and a 2 s command; the poll answers from the last known state.
        # Judged against the command's length, not an absolute budget a loaded machine would break.
        assert kernel.remote_signal(sshd.host, "sleep 2; echo 1", 0) is None
        assert kernel.remote_signal(sshd.host, "sleep 2; echo 1", 0) is None
        assert time.monotonic() - started < 1.0, "a poll on the event loop waited for its command"
        sshd.wait_for_log("Starting session: command", 10, since=mark)
        await asyncio.sleep(0.5)
        assert kernel.remote_signal(sshd.host, "sleep 2; echo 1", 0) is None  # still out: no second command
        assert sshd.log_count("Starting session: command", mark) == 1
        # The answer ("1": no such process) is what a later poll reports.
        deadline = time.monotonic() + 10
        while kernel.remote_signal(sshd.host, "echo 1", 0) is not False:
            assert time.monotonic() < deadline, "the poll's answer was never recorded"
            await asyncio.sleep(0.2)

    asyncio.run(polls())


def test_an_unreachable_host_never_revives_a_kernel_known_dead(sshd: harness.SshServer) -> None:
    live = _native.Liveness("Remote poll for a test kernel")
    fresh = _native.Liveness("Remote poll for another test kernel")
    t = target(sshd)
    assert live.state == "alive"
    assert live.probe_command_blocking(t, "echo 1", 10) == "dead"
    assert fresh.probe_command_blocking(t, "echo 0", 10) == "alive"
    sshd.stop()
    # The command would say alive, but it cannot run: liveness unknown, which a dead kernel does not leave.
    assert fresh.probe_command_blocking(t, "echo 0", 2) == "unknown"
    assert live.probe_command_blocking(t, "echo 0", 2) == "dead"
    # The same on the event loop's form, once its background answer is in.
    assert live.probe_command(t, "echo 0", 1) == "dead"
    time.sleep(3)
    assert live.probe_command(t, "echo 0", 1) == "dead"
    assert live.state == "dead"


def test_a_signal_that_finds_no_process_marks_the_kernel_dead() -> None:
    live = _native.Liveness("Remote poll for a test kernel")
    live.mark_dead()
    assert live.state == "dead"
    assert "dead" in repr(live)


def test_a_blocking_comm_probe_records_its_answer(sshd: harness.SshServer) -> None:
    port = harness.free_port()
    with egtunnel.open_tunnel(**sshd.connect_kwargs(), remote_host="127.0.0.1", remote_port=port,
                              channel="EG_COMM", kernel_id="k-liveness") as tunnel:  # fmt: skip
        assert tunnel.probe_blocking(b'{"signum": 0}') == "dead"
        # The event loop's form now starts from that answer.
        assert tunnel.probe(b'{"signum": 0}') == "dead"
        with harness.EchoServer(port=port):
            assert tunnel.probe_blocking(b'{"signum": 0}') == "alive"
    assert tunnel.probe_blocking(b'{"signum": 0}') == "unknown"  # terminated: it cannot be asked
