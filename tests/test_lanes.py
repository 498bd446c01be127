"""Extra connections ("lanes") to a shared host: they appear only while channel opens queue up behind a
slow link (a delay proxy in front of a stock sshd here), carry channels like the host's own connection,
are reported by status() and metrics, and EG_SSH_MAX_LANES=1 keeps strictly one connection."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Iterator

import pytest

import egtunnel
import harness

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from delay_proxy import DelayProxy  # noqa: E402

CHANNELS = ("SHELL", "IOPUB", "STDIN", "HB", "CONTROL", "EG_COMM")


@pytest.fixture
def slow_target(sshd: harness.SshServer) -> Iterator[tuple[egtunnel.SshTarget, int]]:
    """A target 40 ms (round trip) away from the gateway, and its port."""
    with DelayProxy((sshd.host, sshd.port), 20, env=harness.tagged_env(harness.new_mark())) as proxy:
        known_hosts = sshd.dir / f"known_hosts.proxy{proxy.port}"
        known_hosts.write_text(f"[127.0.0.1]:{proxy.port} {sshd.host_public_key}\n")
        target = egtunnel.SshTarget("127.0.0.1", port=proxy.port, user=sshd.user, ssh_config="none",
                                    identity_file=str(sshd.identity_file), known_hosts=str(known_hosts))  # fmt: skip
        yield target, proxy.port


def connections(port: int) -> list[dict]:
    return [c for c in egtunnel.status() if c["port"] == port]


async def eight_kernels(target: egtunnel.SshTarget, echo_port: int) -> list[list[egtunnel.Tunnel]]:
    six = [(ch, "127.0.0.1", echo_port) for ch in CHANNELS]
    keeper = await target.open_forwards_async(six[:1], verify=False, kernel_id="keeper")
    kernels = await asyncio.gather(*(target.open_forwards_async(six, kernel_id=f"k{i}") for i in range(8)))
    return [keeper, *kernels]


def test_lanes_take_queued_opens_and_are_reported(slow_target: tuple[egtunnel.SshTarget, int],
                                                  echo_server: harness.EchoServer, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # A cap below what the burst would use: lanes start, and no more than the cap.
    monkeypatch.setenv("EG_SSH_MAX_LANES", "4")
    target, port = slow_target
    kernels = asyncio.run(eight_kernels(target, echo_server.port))
    try:
        conns = connections(port)
        assert 1 < len(conns) <= 4
        assert sorted(c["lane"] for c in conns) == list(range(len(conns)))
        assert all(c["state"] == "connected" for c in conns)
        # Forwards are listed once, on lane 0, whichever lane their channels open on.
        lane0 = [c for c in conns if c["lane"] == 0][0]
        assert len(lane0["forwards"]) == 1 + 8 * 6
        assert all(not c["forwards"] for c in conns if c["lane"] > 0)
        for tunnels in kernels:
            for t in tunnels:
                assert harness.echo_once("127.0.0.1", t.local_port) == b"hello egtunnel\n"
        m = [d for d in egtunnel._native.metrics() if d["port"] == port][0]
        assert m["connections"]["connected"] == len(conns)
    finally:
        for tunnels in kernels:
            for t in tunnels:
                t.terminate()


def test_one_lane_keeps_one_connection(slow_target: tuple[egtunnel.SshTarget, int], echo_server: harness.EchoServer,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("EG_SSH_MAX_LANES", "1")
    target, port = slow_target
    kernels = asyncio.run(eight_kernels(target, echo_server.port))
    try:
        assert [c["lane"] for c in connections(port)] == [0]
    finally:
        for tunnels in kernels:
            for t in tunnels:
                t.terminate()


def test_invalid_max_lanes_names_the_setting(slow_target: tuple[egtunnel.SshTarget, int],
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("EG_SSH_MAX_LANES", "0")
    target, _ = slow_target
    with pytest.raises(ValueError, match="EG_SSH_MAX_LANES"):
        target.open_forwards([("SHELL", "127.0.0.1", 9)], verify=False)
